//! The node's fast path as the agent runs it, in namespaces this test creates: which pods it carries as the
//! policy engine's selection changes, and that stopping it leaves nothing. Needs root.
#![cfg(feature = "root-tests")]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;

use underlay_agent::fastpath::NodeFastPath;
use underlay_agent::policy::SelectionObserver;
use underlay_dataplane::testns::TestNs;

const POD: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const VETH: &str = "ul0123456789a";

fn sh(ns: &TestNs, script: &str) {
    let out = ns.command("sh").arg("-ec").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn filters(node: &TestNs) -> usize {
    let mut nl = node.netns().netlink().unwrap();
    let mut n = 0;
    for l in nl.links().unwrap() {
        n += nl.tc_bpf_filters(l.index, true).unwrap().len();
        n += nl.tc_bpf_filters(l.index, false).unwrap().len();
        assert!(
            nl.tc_bpf_filters(l.index, true).unwrap().is_empty() || nl.has_clsact(l.index).unwrap()
        );
    }
    n
}

fn clsacts(node: &TestNs) -> usize {
    let mut nl = node.netns().netlink().unwrap();
    let links = nl.links().unwrap();
    links
        .iter()
        .filter(|l| nl.has_clsact(l.index).unwrap())
        .count()
}

#[test]
fn selected_pods_leave_the_fast_path_at_once_and_stopping_leaves_nothing() {
    let vpc = TestNs::new("ulagfp-vpc").unwrap();
    let node = TestNs::new("ulagfp-node").unwrap();
    let pod = TestNs::new("ulagfp-pod").unwrap();
    for args in [
        format!(
            "link add eth0 netns {} type veth peer name up0 netns {}",
            node.name(),
            vpc.name()
        ),
        format!(
            "link add {VETH} netns {} type veth peer name eth0 netns {}",
            node.name(),
            pod.name()
        ),
    ] {
        assert!(
            Command::new("ip")
                .args(args.split_whitespace())
                .status()
                .unwrap()
                .success()
        );
    }
    sh(
        &node,
        &format!(
            "ip addr add 198.18.0.10/24 dev eth0; ip link set eth0 up; ip link set {VETH} up; \
         ip route add {POD}/32 dev {VETH}"
        ),
    );
    let fp = NodeFastPath::start(
        std::path::Path::new(&node.path()),
        vec!["198.18.0.0/15".parse().unwrap()],
        &[
            "198.18.0.0/15".parse().unwrap(),
            "100.64.0.0/10".parse().unwrap(),
        ],
        true,
    )
    .expect("the kernel runs the fast path");

    let seen = fp.observe().unwrap();
    assert_eq!(seen.uplinks.keys().collect::<Vec<_>>(), vec!["eth0"]);
    assert_eq!(seen.pods.get(&POD).map(|(v, _)| v.as_str()), Some(VETH));

    // Policy on, selection not reported yet: programs attached, no pod carried.
    fp.reconcile().unwrap();
    assert!(fp.fast_pods().is_empty());
    assert_eq!(
        filters(&node),
        3,
        "uplink ingress, pod veth ingress and egress"
    );

    // Nothing selected: the pod is carried.
    fp.selected(&BTreeSet::new());
    fp.reconcile().unwrap();
    assert_eq!(fp.fast_pods(), BTreeSet::from([POD]));

    // Selected: out of the map before `selected` returns (the engine commits nft after), and kept out.
    fp.selected(&BTreeSet::from([VETH]));
    assert!(fp.fast_pods().is_empty());
    fp.reconcile().unwrap();
    assert!(fp.fast_pods().is_empty());

    // Unselected again, then the pod's veth goes (DEL): it leaves the map with its route.
    fp.selected(&BTreeSet::new());
    fp.reconcile().unwrap();
    assert_eq!(fp.fast_pods(), BTreeSet::from([POD]));
    sh(&node, &format!("ip link del {VETH}"));
    fp.reconcile().unwrap();
    assert!(fp.fast_pods().is_empty());
    assert_eq!(filters(&node), 1);

    // Stopping removes every filter and the qdisc it added.
    fp.shutdown();
    assert_eq!(filters(&node), 0);
    assert_eq!(clsacts(&node), 0);
    let _ = vpc;
}
