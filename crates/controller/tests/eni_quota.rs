//! `eni` mode at the zone's network-interface quota: EC2 answers `NetworkInterfaceLimitExceeded`; the reconciler
//! reports it per node (the Event's source) and backs off per zone — no retry storm of CreateNetworkInterface.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use underlay_cloud::{Cloud, ErrorKind, Operation, Tags};
use underlay_controller::eni::{ENI_QUOTA_CODE, EniNode, EniReconciler, EniSettings};
use underlay_core::eni_pool::Used;
use underlay_vpcsim::{RunInstance, VpcSim};

const ZONE: &str = "us-east-1a";

#[tokio::test(start_paused = true)]
async fn the_eni_quota_is_reported_and_backed_off_not_retried_in_a_storm() {
    // Six nodes in one zone, quota 8 network interfaces: their six primaries leave room for two pod ENIs.
    let sim = Arc::new(
        VpcSim::builder(4)
            .rate_limits(None)
            .enis_per_zone(8)
            .build(),
    );
    let vpc = sim
        .create_vpc("198.18.0.0/16".parse().unwrap(), Tags::new())
        .unwrap();
    let nodes_subnet = sim
        .create_subnet(
            &vpc,
            ZONE,
            Ipv4Net::new(Ipv4Addr::new(198, 18, 0, 0), 19).unwrap(),
        )
        .unwrap();
    let pods_subnet = sim
        .create_subnet(
            &vpc,
            ZONE,
            Ipv4Net::new(Ipv4Addr::new(198, 18, 128, 0), 19).unwrap(),
        )
        .unwrap();
    let nodes: Vec<EniNode> = (0..6)
        .map(|n| {
            let i = sim
                .run_instance(RunInstance::new("t3.medium", &nodes_subnet))
                .unwrap();
            EniNode::new(format!("node-{n}"), i.id, Used::Count(0))
        })
        .collect();
    // Custom networking: every node's pods need an ENI of their own.
    let mut settings = EniSettings::new("quota");
    settings.subnets.insert(ZONE.to_owned(), pods_subnet);
    let cloud: Arc<dyn Cloud> = sim.clone();
    let r = EniReconciler::new(cloud, settings);

    let first = r.pass(&nodes).await;
    let refused = first.nodes.iter().filter(|n| n.eni_quota.is_some()).count();
    assert_eq!(refused, 4, "{:#?}", first.nodes);
    let errors = sim
        .counters()
        .errors_of(Operation::CreateNetworkInterface, ErrorKind::LimitExceeded);
    assert_eq!(errors, 4);
    assert!(
        first
            .nodes
            .iter()
            .filter_map(|n| n.eni_quota.as_deref())
            .all(|why| why.contains(ZONE)),
    );
    let creates = |sim: &VpcSim| sim.counters().calls_of(Operation::CreateNetworkInterface);
    let after_first = creates(&sim);

    // Passes within the first backoff (5 s): no create at all, and the nodes still say why they wait.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rep = r.pass(&nodes).await;
        assert_eq!(
            rep.nodes.iter().filter(|n| n.eni_quota.is_some()).count(),
            4
        );
    }
    assert_eq!(
        creates(&sim),
        after_first,
        "no CreateNetworkInterface during the backoff"
    );

    // Backoff over: one node tries, is refused again, and the wait doubles (10 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    r.pass(&nodes).await;
    assert_eq!(creates(&sim), after_first + 1, "one node tries first");
    for _ in 0..9 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        r.pass(&nodes).await;
    }
    assert_eq!(creates(&sim), after_first + 1, "the doubled backoff holds");

    // Room again (two nodes gone): the next try succeeds and the rest follow.
    for n in &nodes[..2] {
        sim.terminate_instance(&n.instance).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let live = &nodes[2..];
    let mut held = usize::MAX;
    for _ in 0..6 {
        let rep = r.pass(live).await;
        held = rep.nodes.iter().filter(|n| n.eni_quota.is_some()).count();
        if held == 0 && rep.nodes.iter().all(|n| n.ready()) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(held, 0);
    assert_eq!(ENI_QUOTA_CODE, "NetworkInterfaceLimitExceeded");
}
