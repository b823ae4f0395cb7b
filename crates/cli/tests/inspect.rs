//! `underlay inspect` end to end: a moto server (started here, killed by its guard) holds a VPC built with raw
//! EC2 calls; the built `underlay` binary reads it back, in the human and the JSON format.

use std::process::Command;

use ipnet::Ipv4Net;
use underlay_cloud::{Cloud, CreateEniRequest, RouteTarget, Tags};
use underlay_cloud_aws::moto::{MotoServer, REGION, TestVpc};
use underlay_core::names;

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn eni_request(subnet: &underlay_cloud::SubnetId, cluster: &str, node: &str) -> CreateEniRequest {
    CreateEniRequest {
        subnet: subnet.clone(),
        security_groups: vec![],
        description: format!("underlay {cluster} {node}"),
        tags: Tags::from([
            (names::TAG_CLUSTER.to_owned(), cluster.to_owned()),
            (names::TAG_NODE.to_owned(), node.to_owned()),
        ]),
        client_token: format!("{cluster}-{node}"),
        secondary_ip_count: 2,
        prefix_count: 0,
    }
}

fn underlay(server: &MotoServer, vpc: &str, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_underlay"))
        .args([
            "inspect",
            "--endpoint",
            &server.endpoint(),
            "--region",
            REGION,
        ])
        .args(["--vpc", vpc, "--cluster", "c1"])
        .args(extra)
        // Credentials from the standard chain's environment provider; nothing else of the chain is consulted
        // (no profile files, no instance metadata).
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/underlay-test")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/underlay-test")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .output()
        .expect("running underlay");
    assert!(
        out.status.success(),
        "underlay inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn inspect_shows_route_tables_owned_routes_and_leaked_enis() -> anyhow::Result<()> {
    let server = MotoServer::start().unwrap_or_else(|e| panic!("{e}"));
    let cloud = server.cloud().await;
    let v = TestVpc::create(&cloud).await?;
    let table_b = v.create_route_table(&cloud, &v.subnet_b).await?;

    // Node n1's ENI, attached; node n2's ENI, left available (leaked); another cluster's ENI.
    let attached = cloud
        .create_network_interface(&eni_request(&v.subnet_a, "c1", "n1"))
        .await?;
    cloud
        .attach_network_interface(&attached.id, &v.instance, 1, true)
        .await?;
    let leaked = cloud
        .create_network_interface(&eni_request(&v.subnet_b, "c1", "n2"))
        .await?;
    let foreign = cloud
        .create_network_interface(&eni_request(&v.subnet_b, "c2", "n9"))
        .await?;

    // Main table: the IGW default route (foreign), two owned pod blocks, one foreign route to the same ENI.
    let to_n1 = RouteTarget::NetworkInterface(attached.id.clone());
    for dest in ["100.64.0.0/24", "100.64.1.0/24", "10.0.0.0/8"] {
        cloud.create_route(&v.main_table, net(dest), &to_n1).await?;
    }
    cloud
        .create_route(&table_b, net("100.64.2.0/24"), &to_n1)
        .await?;

    // Human format.
    let human = underlay(&server, v.vpc.as_str(), &[]);
    // Non-local routes: 0.0.0.0/0 and three to the ENI in the main table; one in table b.
    assert!(
        human.contains(&format!("{} 4/500 routes (2 owned)  [main]", v.main_table)),
        "{human}"
    );
    assert!(
        human.contains(&format!(
            "{} 1/500 routes (1 owned)  [subnets {}]",
            table_b, v.subnet_b
        )),
        "{human}"
    );
    assert!(human.contains(&format!("    100.64.0.0/24      -> {}\n", attached.id)));
    assert!(human.contains(&format!("    100.64.1.0/24      -> {}\n", attached.id)));
    assert!(human.contains(&format!("    100.64.2.0/24      -> {}\n", attached.id)));
    assert!(
        !human.contains("10.0.0.0/8"),
        "foreign routes are not listed"
    );
    let line = |id: &str| {
        human
            .lines()
            .find(|l| l.trim_start().starts_with(id))
            .unwrap_or_else(|| panic!("no line for {id} in\n{human}"))
            .to_owned()
    };
    let n1 = line(attached.id.as_str());
    assert!(n1.contains("in-use") && n1.contains("node=n1"), "{n1}");
    assert!(n1.contains(&format!("{}#1", v.instance)), "{n1}");
    assert!(!n1.contains("LEAKED"), "{n1}");
    let n2 = line(leaked.id.as_str());
    assert!(n2.contains("available") && n2.contains("node=n2") && n2.ends_with("LEAKED"));
    assert!(
        !human.contains(foreign.id.as_str()),
        "another cluster's ENI"
    );
    let subnet_a = line(&format!("{} us-east-1a", v.subnet_a));
    // 251 usable; the instance and the n1 ENI with 2 secondaries hold 4.
    assert!(subnet_a.ends_with(" 247 free"), "{subnet_a}\n{human}");

    // JSON format, same data.
    let json: serde_json::Value =
        serde_json::from_str(&underlay(&server, v.vpc.as_str(), &["--format", "json"]))?;
    assert_eq!(json["vpc"], v.vpc.as_str());
    assert_eq!(json["pod_cidr"], "100.64.0.0/10");
    let tables = json["route_tables"].as_array().unwrap();
    assert_eq!(tables.len(), 2);
    assert_eq!(tables[0]["id"], v.main_table.as_str());
    assert_eq!(tables[0]["main"], true);
    assert_eq!(tables[0]["routes"], 4);
    assert_eq!(tables[0]["route_limit"], 500);
    let owned: Vec<&str> = tables[0]["owned"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["destination"].as_str().unwrap())
        .collect();
    assert_eq!(owned, ["100.64.0.0/24", "100.64.1.0/24"]);
    assert_eq!(tables[0]["owned"][0]["target"], attached.id.as_str());
    let enis = json["enis"].as_array().unwrap();
    assert_eq!(enis.len(), 2);
    let leaked_ids: Vec<&str> = enis
        .iter()
        .filter(|e| e["leaked"] == true)
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(leaked_ids, [leaked.id.as_str()]);
    assert_eq!(json["subnets"].as_array().unwrap().len(), 2);

    // A narrower pod CIDR and a lower limit change the verdicts.
    let human = underlay(
        &server,
        v.vpc.as_str(),
        &["--pod-cidr", "100.64.0.0/24", "--route-limit", "4"],
    );
    assert!(
        human.contains(&format!(
            "{} 4/4 routes (1 owned)  [main; FULL]",
            v.main_table
        )),
        "{human}"
    );
    Ok(())
}

#[test]
fn inspect_fails_clearly_on_an_unknown_vpc() {
    let server = MotoServer::start().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(env!("CARGO_BIN_EXE_underlay"))
        .args([
            "inspect",
            "--endpoint",
            &server.endpoint(),
            "--region",
            REGION,
        ])
        .args(["--vpc", "vpc-0000000000000dead", "--cluster", "c1"])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/underlay-test")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/underlay-test")
        .output()
        .expect("running underlay");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("InvalidVpcID.NotFound"), "{stderr}");
}
