//! Addresses whose DEL never came are reclaimed once their sandbox is gone, and only then: 110 pods with real
//! network namespaces and host veths in a node namespace; the namespaces of 100 are deleted behind the agent's
//! back (their veths go with them), and all 100 addresses come back within the grace period plus one reconcile
//! interval (plus scheduling slack), while the 10 live pods keep theirs. Needs root (creates network namespaces).
#![cfg(feature = "root-tests")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use underlay_agent::checkpoint::Checkpoint;
use underlay_agent::{AgentMetrics, Fault, IpamService, reclaim};
use underlay_core::ipam::PoolSpec;
use underlay_core::veth_names;
use underlay_dataplane::VethSpec;
use underlay_dataplane::testns::TestNs;
use underlay_ipam_api::{self as api, pb};

const GRACE: Duration = Duration::from_secs(3);
const INTERVAL: Duration = Duration::from_secs(1);

#[test]
fn hundred_pods_without_del_come_back_live_pods_keep_theirs() {
    let node = TestNs::new("agrc").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let svc = Arc::new(
        IpamService::open(
            PoolSpec::Block("100.64.8.0/24".parse().unwrap()),
            Duration::ZERO,
            Checkpoint::new(dir.path().join("ipam.json")),
            1500,
            Fault::None,
        )
        .unwrap(),
    );
    let metrics = AgentMetrics::new();
    svc.set_metrics(metrics.clone());
    let mut nl = node.netns().netlink().unwrap();
    let mut pods = vec![];
    for i in 0..110 {
        let pod = TestNs::new("agrc").unwrap();
        let id = format!("reclaim-{i}");
        let reply = svc.allocate(pb::AllocateRequest {
            key: Some(api::AttachmentKey::new(&id, "eth0")),
            netns: pod.path(),
            pod_namespace: "default".into(),
            pod_name: id.clone(),
        });
        assert!(matches!(
            reply.result,
            Some(pb::allocate_reply::Result::Allocation(_))
        ));
        nl.veth_add(&VethSpec {
            name: &veth_names::host_veth_name(&id, "eth0"),
            peer_name: "eth0",
            peer_netns: Some(pod.netns()),
            mtu: None,
            mac: None,
            peer_mac: None,
            up: true,
        })
        .unwrap();
        pods.push(pod);
    }
    // The reclaimer runs in the node's namespace, as the agent's does.
    let weak = Arc::downgrade(&svc);
    node.netns()
        .run(move || {
            reclaim::spawn(weak, INTERVAL, GRACE).unwrap();
            Ok(())
        })
        .unwrap();
    // Several passes over live sandboxes reclaim nothing.
    std::thread::sleep(GRACE + 2 * INTERVAL);
    assert_eq!(svc.allocated(), 110, "a live pod's address was reclaimed");

    // The runtime loses 100 pods without DEL: their namespaces go (and their veths with them).
    let live = pods.split_off(100);
    drop(pods);
    let killed = Instant::now();
    let deadline = killed + GRACE + INTERVAL + Duration::from_secs(3);
    while svc.allocated() > 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = killed.elapsed();
    assert_eq!(
        svc.allocated(),
        10,
        "not all 100 reclaimed within grace + interval (+3 s slack): {took:?}"
    );
    eprintln!(
        "100 sandboxes gone → reclaimed in {took:?} (grace {GRACE:?}, interval {INTERVAL:?})"
    );
    let held: Vec<String> = svc
        .list()
        .allocations
        .iter()
        .map(|a| a.pod_name.clone())
        .collect();
    for i in 100..110 {
        assert!(
            held.contains(&format!("reclaim-{i}")),
            "live pod reclaim-{i} lost its address"
        );
    }
    assert!(
        metrics
            .encode()
            .contains("underlay_agent_ipam_releases_total{reason=\"reclaim\"} 100"),
        "{}",
        metrics.encode()
    );
    // The live pods keep theirs over more passes.
    std::thread::sleep(GRACE + 2 * INTERVAL);
    assert_eq!(svc.allocated(), 10);
    drop(live);
}
