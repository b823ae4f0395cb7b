//! The aws-sdk-ec2 adapter over HTTP against moto server. Each test starts its own server on a free port (the
//! guard kills it, panics included) and builds its VPC with raw SDK calls, then checks the adapter's view.

use std::net::Ipv4Addr;

use aws_sdk_ec2::types as ec2;
use ipnet::Ipv4Net;
use underlay_cloud::queue::QueueConfig;
use underlay_cloud::*;
use underlay_cloud_aws::moto::{MotoServer, TestVpc};
use underlay_cloud_aws::{AwsOptions, Ec2Cloud, connect};
use underlay_core::names;

fn moto() -> MotoServer {
    MotoServer::start().unwrap_or_else(|e| panic!("{e}"))
}

async fn mk_vpc(cloud: &Ec2Cloud) -> anyhow::Result<TestVpc> {
    Ok(TestVpc::create(cloud).await?)
}

fn mk_eni_request(subnet: &SubnetId, token: &str, node: &str) -> CreateEniRequest {
    CreateEniRequest {
        subnet: subnet.clone(),
        security_groups: vec![],
        description: "underlay test ENI".into(),
        tags: Tags::from([
            (names::TAG_CLUSTER.to_owned(), "c1".to_owned()),
            (names::TAG_NODE.to_owned(), node.to_owned()),
        ]),
        client_token: token.into(),
        secondary_ip_count: 0,
        prefix_count: 0,
    }
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

#[tokio::test]
async fn describes_are_scoped_paginated_and_converted() -> anyhow::Result<()> {
    let server = moto();
    let cloud = server.cloud().await;
    let v = mk_vpc(&cloud).await?;
    // A second VPC that no scoped describe may return.
    let other = mk_vpc(&cloud).await?;

    let vpc = cloud.describe_vpc(&v.vpc).await?;
    assert_eq!(vpc.cidrs, vec![net("198.18.0.0/16")]);

    let mut subnets = cloud.describe_subnets(&v.vpc).await?;
    subnets.sort_by_key(|s| s.cidr);
    assert_eq!(subnets.len(), 2);
    assert_eq!(subnets[0].id, v.subnet_a);
    assert_eq!(subnets[0].zone, "us-east-1a");
    assert_eq!(subnets[1].id, v.subnet_b);
    assert_eq!(subnets[1].cidr, net("198.18.1.0/24"));
    // 256 − 5 reserved, and the instance's primary address in subnet a.
    assert_eq!(subnets[1].available_ips, 251);
    assert_eq!(subnets[0].available_ips, 250);

    let tables = cloud.describe_route_tables(&v.vpc).await?;
    assert_eq!(tables.len(), 1);
    let main = &tables[0];
    assert_eq!(main.id, v.main_table);
    assert!(main.main);
    assert!(
        main.routes
            .iter()
            .any(|r| r.destination == net("198.18.0.0/16")
                && r.target == RouteTarget::Local
                && r.state == RouteState::Active)
    );
    assert!(main.routes.iter().any(|r| r.destination == net("0.0.0.0/0")
        && matches!(&r.target, RouteTarget::Gateway(g) if g.starts_with("igw-"))));
    assert!(tables.iter().all(|t| t.id != other.main_table));

    let by_vpc = cloud
        .describe_instances(&InstanceFilter {
            vpc: Some(v.vpc.clone()),
            ..InstanceFilter::default()
        })
        .await?;
    assert_eq!(by_vpc.len(), 1);
    let i = &by_vpc[0];
    assert_eq!(i.id, v.instance);
    assert_eq!(i.instance_type, "m5.large");
    assert_eq!(i.state, InstanceState::Running);
    assert_eq!(i.subnet, v.subnet_a);
    assert_eq!(i.zone, "us-east-1a");
    let primary = i.primary_eni().expect("primary ENI");
    assert_eq!(primary.primary_ip, i.private_ip);
    assert_eq!(primary.attachment.as_ref().unwrap().instance, v.instance);
    let by_id = cloud
        .describe_instances(&InstanceFilter {
            ids: vec![v.instance.clone()],
            ..InstanceFilter::default()
        })
        .await?;
    assert_eq!(by_id, by_vpc);

    let types = cloud
        .describe_instance_types(&[
            "m5.large".to_owned(),
            "t2.micro".to_owned(),
            "m5.metal".to_owned(),
        ])
        .await?;
    let m5 = types
        .iter()
        .find(|t| t.instance_type == "m5.large")
        .unwrap();
    assert_eq!((m5.max_enis, m5.ipv4_per_eni, m5.vcpus), (3, 10, 2));
    assert!(m5.prefix_delegation);
    let t2 = types
        .iter()
        .find(|t| t.instance_type == "t2.micro")
        .unwrap();
    assert!(!t2.prefix_delegation);
    // Bare metal reports no hypervisor, and is Nitro all the same.
    let metal = types
        .iter()
        .find(|t| t.instance_type == "m5.metal")
        .unwrap();
    assert!(metal.prefix_delegation, "{metal:?}");

    // Never unfiltered: refused before any request.
    let err = cloud
        .describe_network_interfaces(&EniFilter::default())
        .await
        .unwrap_err();
    assert_eq!(err.code, "UnfilteredDescribe");
    let err = cloud
        .describe_instances(&InstanceFilter::default())
        .await
        .unwrap_err();
    assert_eq!(err.code, "UnfilteredDescribe");

    let err = cloud
        .describe_vpc(&VpcId::new("vpc-0000000000000dead"))
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn routes_target_network_interfaces_and_errors_are_classified() -> anyhow::Result<()> {
    let server = moto();
    let cloud = server.cloud().await;
    let v = mk_vpc(&cloud).await?;
    let a = cloud
        .create_network_interface(&mk_eni_request(&v.subnet_a, "t-a", "n1"))
        .await?;
    let b = cloud
        .create_network_interface(&mk_eni_request(&v.subnet_a, "t-b", "n2"))
        .await?;
    let block = net("100.64.1.0/24");
    let to_a = RouteTarget::NetworkInterface(a.id.clone());
    let to_b = RouteTarget::NetworkInterface(b.id.clone());

    cloud.create_route(&v.main_table, block, &to_a).await?;
    let routes = |tables: Vec<RouteTable>| -> Vec<Route> {
        tables
            .into_iter()
            .flat_map(|t| t.routes)
            .filter(|r| r.destination == block)
            .collect()
    };
    let got = routes(cloud.describe_route_tables(&v.vpc).await?);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].target, to_a);

    // A taken destination is RouteAlreadyExists. (moto only checks this for gateway targets: for a network
    // interface target it overwrites the route.)
    let err = cloud
        .create_route(
            &v.main_table,
            net("0.0.0.0/0"),
            &RouteTarget::Gateway(v.igw.clone()),
        )
        .await
        .unwrap_err();
    assert!(err.is_already_exists(), "{err:?}");

    cloud.replace_route(&v.main_table, block, &to_b).await?;
    assert_eq!(
        routes(cloud.describe_route_tables(&v.vpc).await?)[0].target,
        to_b
    );

    cloud.delete_route(&v.main_table, block).await?;
    assert!(routes(cloud.describe_route_tables(&v.vpc).await?).is_empty());
    let err = cloud.delete_route(&v.main_table, block).await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    // ReplaceRoute on a missing destination: EC2's InvalidParameterValue ("no route defined"), as the port says.
    let err = cloud
        .replace_route(&v.main_table, block, &to_a)
        .await
        .unwrap_err();
    assert_eq!(
        (err.kind, err.code.as_str()),
        (ErrorKind::InvalidRequest, "InvalidParameterValue"),
        "{err:?}"
    );

    // Routes are never created by instance id (EC2 refuses them on multi-ENI instances).
    let err = cloud
        .create_route(
            &v.main_table,
            block,
            &RouteTarget::Instance(v.instance.clone()),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidRequest);

    let err = cloud
        .create_route(&RouteTableId::new("rtb-00000000dead"), block, &to_a)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn eni_lifecycle_by_tags_with_addresses() -> anyhow::Result<()> {
    let server = moto();
    let cloud = server.cloud().await;
    let v = mk_vpc(&cloud).await?;

    let mut request = mk_eni_request(&v.subnet_a, "token-1", "node-1");
    request.secondary_ip_count = 2;
    let eni = cloud.create_network_interface(&request).await?;
    assert_eq!(eni.status, EniStatus::Available);
    assert_eq!(eni.secondary_ips.len(), 2);
    assert_eq!(eni.tags, request.tags);
    assert_eq!(eni.subnet, v.subnet_a);
    assert!(eni.mac.contains(':') && eni.mac == eni.mac.to_lowercase());

    let by_tags = EniFilter {
        vpc: Some(v.vpc.clone()),
        tags: Tags::from([(names::TAG_CLUSTER.to_owned(), "c1".to_owned())]),
        ..EniFilter::default()
    };
    let found = cloud.describe_network_interfaces(&by_tags).await?;
    assert_eq!(found.len(), 1, "the instance's primary ENI is not tagged");
    assert_eq!(found[0].id, eni.id);
    let other_cluster = EniFilter {
        tags: Tags::from([(names::TAG_CLUSTER.to_owned(), "c2".to_owned())]),
        ..by_tags.clone()
    };
    assert!(
        cloud
            .describe_network_interfaces(&other_cluster)
            .await?
            .is_empty()
    );
    let any_value = EniFilter {
        tags: Tags::from([(names::TAG_NODE.to_owned(), String::new())]),
        ..by_tags.clone()
    };
    assert_eq!(
        cloud.describe_network_interfaces(&any_value).await?.len(),
        1
    );

    // Attach with DeleteOnTermination (two EC2 calls), then find it by instance and by status.
    let attachment = cloud
        .attach_network_interface(&eni.id, &v.instance, 1, true)
        .await?;
    let by_instance = cloud
        .describe_network_interfaces(&EniFilter {
            instance: Some(v.instance.clone()),
            ..EniFilter::default()
        })
        .await?;
    assert_eq!(by_instance.len(), 2);
    let attached = by_instance.iter().find(|e| e.id == eni.id).unwrap();
    assert_eq!(attached.status, EniStatus::InUse);
    let a = attached.attachment.as_ref().unwrap();
    // moto accepts ModifyNetworkInterfaceAttribute(Attachment.DeleteOnTermination) but does not record it, so
    // `a.delete_on_termination` cannot be checked here.
    assert_eq!(
        (&a.id, &a.instance, a.device_index),
        (&attachment, &v.instance, 1)
    );
    let available = EniFilter {
        status: Some(EniStatus::Available),
        ..by_tags.clone()
    };
    assert!(
        cloud
            .describe_network_interfaces(&available)
            .await?
            .is_empty()
    );

    // Source/dest check, per ENI.
    cloud.set_source_dest_check(&eni.id, false).await?;
    let ids = EniFilter {
        ids: vec![eni.id.clone()],
        ..EniFilter::default()
    };
    assert!(!cloud.describe_network_interfaces(&ids).await?[0].source_dest_check);

    // Addresses: a counted assign returns only what it added (moto lists every address; the adapter diffs).
    let added = cloud
        .assign_private_ips(&eni.id, &AddressRequest::Count(3))
        .await?;
    assert_eq!(added.len(), 3, "{added:?}");
    let now = cloud.describe_network_interfaces(&ids).await?.remove(0);
    assert_eq!(now.secondary_ips.len(), 5);
    assert!(added.iter().all(|a| now.secondary_ips.contains(a)));
    assert!(added.iter().all(|a| !eni.secondary_ips.contains(a)));
    let explicit = Ipv4Addr::new(198, 18, 0, 200);
    let added = cloud
        .assign_private_ips(&eni.id, &AddressRequest::Explicit(vec![explicit]))
        .await?;
    assert_eq!(added, vec![explicit]);
    cloud
        .unassign_private_ips(&eni.id, &[explicit, eni.secondary_ips[0]])
        .await?;
    let now = cloud.describe_network_interfaces(&ids).await?.remove(0);
    assert_eq!(now.secondary_ips.len(), 4);
    assert!(!now.secondary_ips.contains(&explicit));

    cloud
        .create_tags(
            &[eni.id.to_string()],
            &Tags::from([("team".to_owned(), "net".to_owned())]),
        )
        .await?;
    let now = cloud.describe_network_interfaces(&ids).await?.remove(0);
    assert_eq!(now.tags.get("team").map(String::as_str), Some("net"));

    // Detach, delete; a deleted ENI is NotFound.
    cloud.detach_network_interface(&attachment, false).await?;
    let now = cloud.describe_network_interfaces(&ids).await?.remove(0);
    assert_eq!(now.status, EniStatus::Available);
    assert!(now.attachment.is_none());
    assert_eq!(
        cloud.describe_network_interfaces(&available).await?.len(),
        1
    );
    cloud.delete_network_interface(&eni.id).await?;
    let err = cloud.describe_network_interfaces(&ids).await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    let err = cloud.delete_network_interface(&eni.id).await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn server_failures_and_lost_requests_are_retryable_kinds() -> anyhow::Result<()> {
    let server = moto();
    let cloud = server.cloud().await;
    let v = mk_vpc(&cloud).await?;

    // moto answers HTTP 500 to a filter it does not implement: a Service error.
    let err = cloud
        .client()
        .describe_network_interfaces()
        .filters(
            ec2::Filter::builder()
                .name("attachment.status")
                .values("attached")
                .build(),
        )
        .filters(
            ec2::Filter::builder()
                .name("vpc-id")
                .values(v.vpc.as_str())
                .build(),
        )
        .send()
        .await
        .map_err(underlay_cloud_aws::classify_sdk_error)
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Service, "{err:?}");
    assert!(err.is_retryable());

    // Nothing listens: a Transport error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let nowhere = Ec2Cloud::new(&AwsOptions {
        endpoint: Some(format!("http://127.0.0.1:{closed}")),
        ..server.options()
    })
    .await?;
    let err = nowhere.describe_vpc(&v.vpc).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Transport, "{err:?}");
    Ok(())
}

#[tokio::test]
async fn the_queued_adapter_reaches_moto_and_counts_its_tokens() -> anyhow::Result<()> {
    let server = moto();
    let v = mk_vpc(&server.cloud().await).await?;
    let cloud = connect(&server.options(), QueueConfig::default()).await?;
    let eni = cloud
        .create_network_interface(&mk_eni_request(&v.subnet_b, "q-1", "n1"))
        .await?;
    cloud
        .attach_network_interface(&eni.id, &v.instance, 1, true)
        .await?;
    assert_eq!(cloud.describe_subnets(&v.vpc).await?.len(), 2);
    // Create, attach + modify, describe.
    assert_eq!(cloud.stats().granted, 4);
    assert_eq!(cloud.stats().total_depth(), 0);
    Ok(())
}

#[test]
fn a_missing_venv_fails_with_what_to_run() {
    let err = MotoServer::start_with(std::path::Path::new("/nonexistent/.venv/bin/moto_server"))
        .unwrap_err();
    assert!(err.contains("run scripts/setup.sh"), "{err}");
}

#[test]
fn the_server_is_killed_when_a_test_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let server = moto();
        tx.send((server.pid(), server.port())).unwrap();
        panic!("a failing test");
    })
    .join();
    assert!(result.is_err());
    let (pid, port) = rx.recv().unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "moto server {pid} outlived the panic"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}
