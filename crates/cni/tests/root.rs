//! Root tests of underlay-cni in network namespaces: every command and failure path, per spec version.
#![cfg(feature = "root-tests")]

mod common;

use common::{NODE_IP, Node, ping};
use serde_json::{Value, json};
use underlay_cni::naming::host_veth_name;
use underlay_dataplane::testns::TestNs;
use underlay_dataplane::{Route, VethSpec};

/// Everything that an invocation could have changed, to prove that a failed one changed nothing.
fn snapshot(node: &Node, pods: &[&TestNs]) -> Value {
    let mut pod_links = Vec::new();
    for p in pods {
        let mut nl = p.netns().netlink().unwrap();
        let links: Vec<String> = nl.links().unwrap().into_iter().map(|l| l.name).collect();
        let routes = nl.routes(Route::MAIN).unwrap().len();
        pod_links.push(json!({"links": links, "routes": routes}));
    }
    let mut node_links: Vec<String> = node
        .nl()
        .links()
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    node_links.sort();
    let allocs: Vec<String> = node
        .allocations()
        .iter()
        .map(|a| a.address.clone())
        .collect();
    json!({ "node": node_links, "node_routes": node.nl().routes(Route::MAIN).unwrap().len(),
            "pods": pod_links, "allocations": allocs })
}

fn add_check_del(version: &str, prefix: &str, pool: &str) {
    let node = Node::new(prefix, pool);
    let pod = TestNs::new(&format!("{prefix}-p")).unwrap();
    let conf = node.conf(version);

    let v = node
        .cni("VERSION", "", "", "", &json!({"cniVersion": version}))
        .expect_ok()
        .clone();
    assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
    assert_eq!(v["cniVersion"], version);

    let res = node
        .cni("ADD", "c1", &pod.path(), "eth0", &conf)
        .expect_ok()
        .clone();
    assert_eq!(res["cniVersion"], version);
    let addr = res["ips"][0]["address"].as_str().unwrap().to_string();
    assert_eq!(res["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(res["interfaces"][1]["name"], "eth0");
    assert_eq!(res["interfaces"][1]["sandbox"], pod.path());
    assert_eq!(res["ips"][0].get("version").is_some(), version == "0.4.0");
    let ip = addr.trim_end_matches("/32");

    // Kernel state as documented: pod /32, default route, neighbour; host veth and /32 route.
    let host_name = host_veth_name("c1", "eth0");
    assert_eq!(res["interfaces"][0]["name"], host_name.as_str());
    let hv = node
        .nl()
        .link_by_name(&host_name)
        .unwrap()
        .expect("host veth");
    assert!(hv.up);
    assert_eq!(hv.mtu, 1400);
    assert_eq!(node.pod_routes().len(), 1);
    let mut pnl = pod.netns().netlink().unwrap();
    let eth = pnl.link_by_name("eth0").unwrap().unwrap();
    assert!(
        pnl.addrs(eth.index)
            .unwrap()
            .contains(&addr.parse().unwrap())
    );
    assert_eq!(node.allocations().len(), 1);
    // Both ends' neighbour entries are permanent: no ARP in either direction, nothing for the host-wide
    // neighbour table's garbage collector to count.
    let pod_mac = pnl.link_by_name("eth0").unwrap().unwrap().mac;
    let host_neigh = node.nl().neighbours(hv.index).unwrap();
    assert!(
        host_neigh
            .iter()
            .any(|n| n.permanent && n.ip.to_string() == ip && n.mac.is_some() && n.mac == pod_mac),
        "{host_neigh:?}"
    );

    // Traffic both ways between the node and the pod (bounded: one packet each).
    assert!(ping(&node.ns, ip), "node → pod");
    assert!(ping(&pod, NODE_IP), "pod → node");

    // CHECK passes on the untouched attachment.
    let mut check_conf = conf.clone();
    check_conf["prevResult"] = res.clone();
    node.cni("CHECK", "c1", &pod.path(), "eth0", &check_conf)
        .expect_ok();

    // STATUS (1.1.0 only) and DEL, twice.
    if version == "1.1.0" {
        node.cni("STATUS", "", "", "", &conf).expect_ok();
    }
    node.cni("DEL", "c1", &pod.path(), "eth0", &conf)
        .expect_ok();
    // Address and route are gone when DEL returns; the veth shortly after (the agent's link reaper).
    assert!(node.pod_routes().is_empty());
    assert!(node.allocations().is_empty());
    assert!(node.wait_host_veths_gone().is_empty());
    assert!(pnl.link_by_name("eth0").unwrap().is_none());
    node.cni("DEL", "c1", &pod.path(), "eth0", &conf)
        .expect_ok();
}

#[test]
fn conformance_0_4_0() {
    add_check_del("0.4.0", "ulcni-v040", "100.64.10.0/28");
}

#[test]
fn conformance_1_0_0() {
    add_check_del("1.0.0", "ulcni-v100", "100.64.11.0/28");
}

#[test]
fn conformance_1_1_0() {
    add_check_del("1.1.0", "ulcni-v110", "100.64.12.0/28");
}

#[test]
fn add_is_idempotent_for_the_same_container() {
    let node = Node::new("ulcni-idem", "100.64.13.0/28");
    let pod = TestNs::new("ulcni-idem-p").unwrap();
    let conf = node.conf("1.0.0");
    let a = node
        .cni("ADD", "c1", &pod.path(), "eth0", &conf)
        .expect_ok()
        .clone();
    let b = node
        .cni("ADD", "c1", &pod.path(), "eth0", &conf)
        .expect_ok()
        .clone();
    assert_eq!(a["ips"], b["ips"]);
    assert_eq!(node.host_veths().len(), 1);
    assert_eq!(node.allocations().len(), 1);
    assert_eq!(node.pod_routes().len(), 1);
    let mut check = conf.clone();
    check["prevResult"] = b;
    node.cni("CHECK", "c1", &pod.path(), "eth0", &check)
        .expect_ok();
}

/// A Multus-style second underlay interface in the same pod: it does not take over the first's default route,
/// both pass CHECK, and removing it (DEL) leaves the pod routing through the first.
#[test]
fn a_second_attachment_keeps_the_first_ones_default_route() {
    let node = Node::new("ulcni-multi", "100.64.16.0/28");
    let pod = TestNs::new("ulcni-multi-p").unwrap();
    let conf = node.conf("1.0.0");
    let first = node
        .cni("ADD", "c1", &pod.path(), "eth0", &conf)
        .expect_ok()
        .clone();
    let second = node
        .cni("ADD", "c1", &pod.path(), "net1", &conf)
        .expect_ok()
        .clone();
    assert_ne!(first["ips"][0]["address"], second["ips"][0]["address"]);

    let default_oifs = |pod: &TestNs| -> Vec<Option<u32>> {
        let mut nl = pod.netns().netlink().unwrap();
        nl.routes(Route::MAIN)
            .unwrap()
            .into_iter()
            .filter(|r| r.dst == "0.0.0.0/0".parse().unwrap())
            .map(|r| r.oif)
            .collect()
    };
    let eth0 = {
        let mut nl = pod.netns().netlink().unwrap();
        nl.link_by_name("eth0").unwrap().unwrap().index
    };
    assert_eq!(
        default_oifs(&pod),
        [Some(eth0)],
        "the second ADD took the default route"
    );
    assert!(ping(&pod, NODE_IP));
    for (ifname, res) in [("eth0", &first), ("net1", &second)] {
        let mut check = conf.clone();
        check["prevResult"] = res.clone();
        node.cni("CHECK", "c1", &pod.path(), ifname, &check)
            .expect_ok();
    }

    node.cni("DEL", "c1", &pod.path(), "net1", &conf)
        .expect_ok();
    assert_eq!(
        default_oifs(&pod),
        [Some(eth0)],
        "DEL of the second left no route"
    );
    assert!(
        ping(&pod, NODE_IP),
        "the pod lost its network with the second interface"
    );
    assert_eq!(node.allocations().len(), 1);
    node.cni("DEL", "c1", &pod.path(), "eth0", &conf)
        .expect_ok();
    assert!(node.wait_host_veths_gone().is_empty());
    assert!(node.allocations().is_empty());
}

#[test]
fn del_succeeds_when_the_netns_is_gone() {
    let node = Node::new("ulcni-gone", "100.64.14.0/28");
    let conf = node.conf("1.0.0");
    let pod = TestNs::new("ulcni-gone-p").unwrap();
    let path = pod.path();
    node.cni("ADD", "c1", &path, "eth0", &conf).expect_ok();
    drop(pod); // the runtime tore the sandbox down first
    node.cni("DEL", "c1", &path, "eth0", &conf).expect_ok();
    node.cni("DEL", "c1", "", "eth0", &conf).expect_ok();
    assert!(node.wait_host_veths_gone().is_empty());
    assert!(node.pod_routes().is_empty());
    assert!(node.allocations().is_empty());
}

#[test]
fn check_fails_after_tampering() {
    let node = Node::new("ulcni-tamper", "100.64.15.0/28");
    let pod = TestNs::new("ulcni-tamper-p").unwrap();
    let mut conf = node.conf("1.1.0");
    let res = node
        .cni("ADD", "c1", &pod.path(), "eth0", &conf)
        .expect_ok()
        .clone();
    conf["prevResult"] = res.clone();
    node.cni("CHECK", "c1", &pod.path(), "eth0", &conf)
        .expect_ok();

    // Pod default route removed → CHECK fails.
    let mut pnl = pod.netns().netlink().unwrap();
    let eth = pnl.link_by_name("eth0").unwrap().unwrap();
    let default = Route::via_onlink(
        "0.0.0.0/0".parse().unwrap(),
        "169.254.1.1".parse().unwrap(),
        eth.index,
    );
    pnl.route_del(&default).unwrap();
    let r = node.cni("CHECK", "c1", &pod.path(), "eth0", &conf);
    r.expect_err(101);
    assert!(
        r.json["msg"].as_str().unwrap().contains("default route"),
        "{r:?}"
    );

    // Restored → passes; host route removed → fails.
    pnl.route_add(&default).unwrap();
    node.cni("CHECK", "c1", &pod.path(), "eth0", &conf)
        .expect_ok();
    let hv = node
        .nl()
        .link_by_name(&host_veth_name("c1", "eth0"))
        .unwrap()
        .unwrap();
    let addr = res["ips"][0]["address"].as_str().unwrap().parse().unwrap();
    node.nl().route_del(&Route::link(addr, hv.index)).unwrap();
    let r = node.cni("CHECK", "c1", &pod.path(), "eth0", &conf);
    r.expect_err(101);
    assert!(
        r.json["msg"].as_str().unwrap().contains("host route"),
        "{r:?}"
    );

    // An allocation the agent no longer holds → fails.
    underlay_ipam_api::Client::connect(&node.socket())
        .unwrap()
        .release(&underlay_ipam_api::AttachmentKey::new("c1", "eth0"))
        .unwrap();
    node.cni("CHECK", "c1", &pod.path(), "eth0", &conf)
        .expect_err(101);
}

#[test]
fn gc_releases_and_deletes_what_is_not_valid() {
    let node = Node::new("ulcni-gc", "100.64.16.0/28");
    let pods: Vec<TestNs> = (0..3).map(|_| TestNs::new("ulcni-gc-p").unwrap()).collect();
    let mut conf = node.conf("1.1.0");
    let mut first = Value::Null;
    for (i, p) in pods.iter().enumerate() {
        let r = node
            .cni("ADD", &format!("c{i}"), &p.path(), "eth0", &conf)
            .expect_ok()
            .clone();
        if i == 0 {
            first = r;
        }
    }
    assert_eq!(node.allocations().len(), 3);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "c0", "ifname": "eth0"}]);
    node.cni("GC", "", "", "", &gc).expect_ok();
    let left = node.allocations();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].key.as_ref().unwrap().container_id, "c0");
    let veths: Vec<String> = node.host_veths().into_iter().map(|l| l.name).collect();
    assert_eq!(veths, vec![host_veth_name("c0", "eth0")]);
    assert_eq!(node.pod_routes().len(), 1);
    conf["prevResult"] = first;
    node.cni("CHECK", "c0", &pods[0].path(), "eth0", &conf)
        .expect_ok();
}

#[test]
fn rejected_invocations_change_nothing() {
    let node = Node::new("ulcni-reject", "100.64.17.0/28");
    let pod = TestNs::new("ulcni-reject-p").unwrap();
    let path = pod.path();
    let conf = node.conf("1.0.0");
    let before = snapshot(&node, &[&pod]);
    let base = |cmd: &'static str| {
        vec![
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", path.as_str()),
            ("CNI_IFNAME", "eth0"),
        ]
    };

    // Malformed stdin → 6 (decoding).
    node.cni_raw(&base("ADD"), b"{\"cniVersion\": \"1.0.0\", ")
        .expect_err(6);
    // Missing CNI_NETNS → 4 (invalid environment).
    let env: Vec<_> = base("ADD")
        .into_iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .collect();
    node.cni_raw(&env, &serde_json::to_vec(&conf).unwrap())
        .expect_err(4);
    // Unknown cniVersion → 1 (incompatible version).
    let mut bad = conf.clone();
    bad["cniVersion"] = json!("7.0.0");
    node.cni("ADD", "c1", &path, "eth0", &bad).expect_err(1);
    // An ipam section → 2 (unsupported field).
    let mut ipam = conf.clone();
    ipam["ipam"] = json!({"type": "host-local"});
    node.cni("ADD", "c1", &path, "eth0", &ipam).expect_err(2);
    // A netns that does not exist → 3.
    node.cni(
        "ADD",
        "c1",
        "/var/run/netns/ulcni-no-such-ns",
        "eth0",
        &conf,
    )
    .expect_err(3);
    assert_eq!(snapshot(&node, &[&pod]), before);

    // Agent not running → 11 (try again later) for ADD and DEL, 50 for STATUS; nothing changes.
    let mut node = node;
    node.kill_agent();
    node.cni("ADD", "c1", &path, "eth0", &conf).expect_err(11);
    node.cni("DEL", "c1", &path, "eth0", &conf).expect_err(11);
    node.cni("STATUS", "", "", "", &node.conf("1.1.0"))
        .expect_err(50);
    assert!(node.host_veths().is_empty());
    assert!(
        pod.netns()
            .netlink()
            .unwrap()
            .link_by_name("eth0")
            .unwrap()
            .is_none()
    );
    node.start_agent();
    assert_eq!(snapshot(&node, &[&pod]), before);
}

#[test]
fn failed_add_rolls_back_and_releases() {
    let node = Node::new("ulcni-rollback", "100.64.18.0/28");
    let pod = TestNs::new("ulcni-rollback-p").unwrap();
    // The pod namespace already has an eth0 (another plugin's): the veth cannot be created.
    let other = TestNs::new("ulcni-rollback-o").unwrap();
    pod.netns()
        .netlink()
        .unwrap()
        .veth_add(&VethSpec {
            name: "eth0",
            peer_name: "x0",
            peer_netns: Some(other.netns()),
            mtu: None,
            mac: None,
            peer_mac: None,
            up: false,
        })
        .unwrap();
    let before = snapshot(&node, &[&pod]);
    let r = node.cni("ADD", "c1", &pod.path(), "eth0", &node.conf("1.0.0"));
    r.expect_err(101);
    assert_eq!(snapshot(&node, &[&pod]), before, "{r:?}");
    assert!(node.allocations().is_empty());
}

#[test]
fn exhaustion_is_try_again_later_and_leaks_nothing() {
    // A /30 pool holds a handful of addresses: fill it, then one more ADD must fail with 11.
    let node = Node::new("ulcni-full", "100.64.19.0/30");
    let conf = node.conf("1.0.0");
    let pods: Vec<TestNs> = (0..6)
        .map(|_| TestNs::new("ulcni-full-p").unwrap())
        .collect();
    let mut added = 0;
    let mut failed = None;
    for (i, p) in pods.iter().enumerate() {
        let r = node.cni("ADD", &format!("c{i}"), &p.path(), "eth0", &conf);
        if r.ok {
            added += 1;
        } else {
            failed = Some((i, r));
            break;
        }
    }
    let (i, r) = failed.expect("a /30 pool must run out within 6 pods");
    r.expect_err(11);
    assert!(added >= 1);
    assert_eq!(node.allocations().len(), added);
    assert_eq!(node.host_veths().len(), added);
    assert!(
        pods[i]
            .netns()
            .netlink()
            .unwrap()
            .link_by_name("eth0")
            .unwrap()
            .is_none()
    );
}

#[test]
fn thousand_adds_survive_an_agent_kill_and_del_leaves_nothing() {
    // 1,000 attachments: 100 pod namespaces × 10 interfaces (each its own container id), lean on namespaces.
    const PODS: usize = 100;
    const IFS: usize = 10;
    let mut node = Node::new("ulcni-1k", "100.64.20.0/22");
    let conf = node.conf("1.0.0");
    let pods: Vec<TestNs> = (0..PODS)
        .map(|_| TestNs::new("ulcni-1k-p").unwrap())
        .collect();
    let mut given = std::collections::HashMap::new();
    for (p, pod) in pods.iter().enumerate() {
        for i in 0..IFS {
            let (id, ifname) = (format!("c{p}-{i}"), format!("eth{i}"));
            let r = node
                .cni("ADD", &id, &pod.path(), &ifname, &conf)
                .expect_ok()
                .clone();
            let addr = r["ips"][0]["address"].as_str().unwrap().to_string();
            assert!(
                given.insert(addr, (id, ifname)).is_none(),
                "address handed out twice"
            );
        }
    }
    assert_eq!(given.len(), PODS * IFS);

    node.kill_agent(); // SIGKILL
    node.start_agent();
    let allocs = node.allocations();
    assert_eq!(allocs.len(), PODS * IFS);
    for a in &allocs {
        let k = a.key.as_ref().unwrap();
        assert_eq!(
            given.get(&a.address),
            Some(&(k.container_id.clone(), k.ifname.clone())),
            "{a:?}"
        );
    }

    for (p, pod) in pods.iter().enumerate() {
        for i in 0..IFS {
            node.cni(
                "DEL",
                &format!("c{p}-{i}"),
                &pod.path(),
                &format!("eth{i}"),
                &conf,
            )
            .expect_ok();
        }
    }
    assert!(node.allocations().is_empty());
    assert!(node.pod_routes().is_empty());
    assert!(node.wait_host_veths_gone().is_empty());
}

/// The agent's link reaper sweeps host veths no allocation owns when it starts (and after GC), and keeps
/// every veth a live allocation owns, including across a kill -9 and restart.
#[test]
fn agent_sweeps_orphaned_veths_and_keeps_owned_ones() {
    let mut node = Node::new("ulcni-sweep", "100.64.21.0/28");
    let pod = TestNs::new("ulcni-sweep-p").unwrap();
    let conf = node.conf("1.0.0");
    node.cni("ADD", "c1", &pod.path(), "eth0", &conf)
        .expect_ok();
    let owned = host_veth_name("c1", "eth0");

    node.kill_agent();
    // Left by a crash between veth creation and rollback: named like ours, no allocation.
    let orphan = host_veth_name("orphan", "eth0");
    node.nl()
        .veth_add(&VethSpec {
            name: &orphan,
            peer_name: "ulcni-sweep-o",
            peer_netns: None,
            mtu: None,
            mac: None,
            peer_mac: None,
            up: false,
        })
        .unwrap();
    // Not named like ours: never touched.
    node.nl()
        .veth_add(&VethSpec {
            name: "ulcni-sweep-x",
            peer_name: "ulcni-sweep-y",
            peer_netns: None,
            mtu: None,
            mac: None,
            peer_mac: None,
            up: false,
        })
        .unwrap();
    node.start_agent();

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while node.nl().link_by_name(&orphan).unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "orphan {orphan} not swept"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let veths: Vec<String> = node.host_veths().into_iter().map(|l| l.name).collect();
    assert_eq!(veths, vec![owned.clone()]);
    assert!(node.nl().link_by_name("ulcni-sweep-x").unwrap().is_some());
    assert_eq!(node.allocations().len(), 1);

    node.cni("DEL", "c1", &pod.path(), "eth0", &conf)
        .expect_ok();
    assert!(node.wait_host_veths_gone().is_empty());
    node.nl().link_del_by_name("ulcni-sweep-x").unwrap();
}
