//! A corrupt checkpoint is rebuilt from the kernel instead of stopping the agent: in a node namespace holding two
//! pods' host veths and /32 routes (as underlay-cni wires them), the agent opens on a hand-corrupted file, keeps the
//! corrupt file aside, gives neither live address to a new pod, serves ADD, releases a rebuilt pod by the veth its
//! DEL names, keeps rebuilt pods through GC, and counts the rebuild. Needs root (creates network namespaces).
#![cfg(feature = "root-tests")]

use underlay_agent::config::PoolConfig;
use underlay_agent::{AgentConfig, AgentMetrics, Fault, IpamService};
use underlay_core::veth_names;
use underlay_dataplane::testns::TestNs;
use underlay_ipam_api::{self as api, pb};

fn ip(ns: &TestNs, args: &[&str]) {
    let out = ns.command("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn open(ns: &TestNs, config: &AgentConfig) -> Result<IpamService, underlay_agent::AgentError> {
    let config = config.clone();
    ns.netns()
        .run(move || Ok(underlay_agent::open_service(&config, Fault::None)))
        .unwrap()
}

fn allocate(svc: &IpamService, id: &str) -> String {
    match svc
        .allocate(pb::AllocateRequest {
            key: Some(api::AttachmentKey::new(id, "eth0")),
            netns: String::new(),
            pod_namespace: "default".into(),
            pod_name: id.into(),
        })
        .result
    {
        Some(pb::allocate_reply::Result::Allocation(a)) => a.address,
        other => panic!("{other:?}"),
    }
}

#[test]
fn corrupt_checkpoint_is_rebuilt_from_pod_veths_and_routes() {
    let node = TestNs::new("agrb").unwrap();
    let mut pods = vec![];
    let mut veths = vec![];
    for (i, addr) in ["100.64.3.0", "100.64.3.1"].iter().enumerate() {
        let pod = TestNs::new("agrb").unwrap();
        let veth = veth_names::host_veth_name(&format!("rebuild-test-{i}"), "eth0");
        ip(
            &node,
            &[
                "link",
                "add",
                &veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &pod.path(),
            ],
        );
        ip(&node, &["link", "set", &veth, "up"]);
        ip(
            &node,
            &["route", "add", &format!("{addr}/32"), "dev", &veth],
        );
        pods.push(pod);
        veths.push(veth);
    }
    let dir = tempfile::tempdir().unwrap();
    let config = AgentConfig {
        pool: PoolConfig {
            block: Some("100.64.3.0/29".parse().unwrap()),
            addresses: vec![],
        },
        checkpoint: dir.path().join("ipam.json"),
        socket: dir.path().join("agent.sock"),
        cni_conf_dir: dir.path().join("net.d"),
        cni_bin_dir: dir.path().join("bin"),
        reap_links: true,
        ..AgentConfig::default()
    };
    std::fs::write(
        &config.checkpoint,
        "{\"version\":1,\"allocations\":[{\"key\":",
    )
    .unwrap();

    let svc = open(&node, &config).expect("a corrupt checkpoint must not stop the agent");
    assert!(svc.rebuilt().is_some());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ipam.json.corrupt")).unwrap(),
        "{\"version\":1,\"allocations\":[{\"key\":",
        "the corrupt file is kept for inspection"
    );
    let metrics = AgentMetrics::new();
    svc.set_metrics(metrics.clone());
    assert!(
        metrics
            .encode()
            .contains("underlay_agent_checkpoint_rebuilds_total 1"),
        "{}",
        metrics.encode()
    );
    assert_eq!(svc.allocated(), 2);
    // A new pod gets neither live address.
    let got = allocate(&svc, "new-pod");
    assert_eq!(got, "100.64.3.2/32");
    // GC from a runtime that knows only the new pod keeps the rebuilt ones.
    let gc = svc.gc(pb::GcRequest {
        valid: vec![api::AttachmentKey::new("new-pod", "eth0")],
    });
    assert!(gc.released.is_empty(), "{gc:?}");
    // The runtime's DEL names the pod's container id (unknown to the rebuilt state) and its host veth.
    let del = svc.release(pb::ReleaseRequest {
        key: Some(api::AttachmentKey::new("rebuild-test-0", "eth0")),
        host_ifindex: 0,
        host_ifname: veths[0].clone(),
    });
    assert_eq!(
        del.released.map(|a| a.address),
        Some("100.64.3.0/32".to_string())
    );
    assert_eq!(svc.allocated(), 2);
    // The rebuilt state was checkpointed: a restart reads it back as a sound checkpoint.
    drop(svc);
    let again = open(&node, &config).unwrap();
    assert!(again.rebuilt().is_none());
    assert_eq!(again.allocated(), 2);
    // The link sweep keeps the remaining rebuilt pod's veth.
    assert!(again.owned_veth_names().contains(&veths[1]));
}
