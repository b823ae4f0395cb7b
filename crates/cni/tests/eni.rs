//! underlay-cni in `eni` mode, per spec version: ADD installs the pod's `to <pod> lookup main` and
//! `from <pod> lookup <ENI table>` rules with the table the agent names, CHECK verifies them (and fails once one
//! is removed), DEL removes them (twice is fine), a failed ADD leaves none behind: neither one that fails before
//! the rules nor a retried ADD that fails while the attachment's rules are in place.
#![cfg(feature = "root-tests")]

mod common;

use common::Node;
use serde_json::json;
use underlay_core::eni::route_table;
use underlay_core::names;
use underlay_dataplane::testns::TestNs;
use underlay_dataplane::{Route, Rule, VethSpec};

/// Rules of the node that mention `ip` (either way).
fn pod_rules(node: &Node, ip: &str) -> Vec<Rule> {
    let net: ipnet::IpNet = format!("{ip}/32").parse().unwrap();
    let mut v: Vec<Rule> = node
        .nl()
        .rules(false)
        .unwrap()
        .into_iter()
        .filter(|r| r.from == Some(net) || r.to == Some(net))
        .collect();
    v.sort_by_key(|r| r.priority);
    v
}

fn expected(ip: &str, table: u32) -> Vec<Rule> {
    let net: ipnet::IpNet = format!("{ip}/32").parse().unwrap();
    vec![
        Rule {
            priority: names::RULE_PRIORITY_TO_POD,
            from: None,
            to: Some(net),
            table: Route::MAIN,
            v6: false,
        },
        Rule {
            priority: names::RULE_PRIORITY_FROM_POD,
            from: Some(net),
            to: None,
            table,
            v6: false,
        },
    ]
}

fn add_check_del(version: &str, prefix: &str) {
    let (t0, t1) = (route_table(0), route_table(1));
    let node = Node::new_eni(
        prefix,
        &[("198.18.0.20", "eth1", t1), ("198.18.0.11", "eth0", t0)],
        "198.18.0.0/24",
    );
    let pod_a = TestNs::new(&format!("{prefix}-a")).unwrap();
    let pod_b = TestNs::new(&format!("{prefix}-b")).unwrap();
    let conf = node.conf(version);

    let ra = node
        .cni("ADD", "ca", &pod_a.path(), "eth0", &conf)
        .expect_ok()
        .clone();
    let rb = node
        .cni("ADD", "cb", &pod_b.path(), "eth0", &conf)
        .expect_ok()
        .clone();
    assert_eq!(ra["ips"][0]["address"], "198.18.0.20/32");
    assert_eq!(rb["ips"][0]["address"], "198.18.0.11/32");
    assert_eq!(pod_rules(&node, "198.18.0.20"), expected("198.18.0.20", t1));
    assert_eq!(pod_rules(&node, "198.18.0.11"), expected("198.18.0.11", t0));

    // A retried ADD leaves the same rules, not two of each.
    node.cni("ADD", "ca", &pod_a.path(), "eth0", &conf)
        .expect_ok();
    assert_eq!(pod_rules(&node, "198.18.0.20"), expected("198.18.0.20", t1));

    // CHECK passes, then fails once the source rule is gone, and passes again when it is back.
    let mut check = conf.clone();
    check["prevResult"] = ra.clone();
    node.cni("CHECK", "ca", &pod_a.path(), "eth0", &check)
        .expect_ok();
    let from = expected("198.18.0.20", t1)[1].clone();
    node.nl().rule_del(&from).unwrap();
    let r = node.cni("CHECK", "ca", &pod_a.path(), "eth0", &check);
    r.expect_err(underlay_cni::spec::code::DATAPLANE);
    node.nl().rule_add(&from).unwrap();
    let to = expected("198.18.0.20", t1)[0].clone();
    node.nl().rule_del(&to).unwrap();
    node.cni("CHECK", "ca", &pod_a.path(), "eth0", &check)
        .expect_err(underlay_cni::spec::code::DATAPLANE);
    node.nl().rule_add(&to).unwrap();
    node.cni("CHECK", "ca", &pod_a.path(), "eth0", &check)
        .expect_ok();

    // DEL removes this pod's rules only; twice is fine.
    node.cni("DEL", "ca", &pod_a.path(), "eth0", &conf)
        .expect_ok();
    assert!(pod_rules(&node, "198.18.0.20").is_empty());
    assert_eq!(pod_rules(&node, "198.18.0.11"), expected("198.18.0.11", t0));
    node.cni("DEL", "ca", &pod_a.path(), "eth0", &conf)
        .expect_ok();
    // GC with no valid attachment releases the other pod and removes its rules.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    if version == "1.1.0" {
        node.cni("GC", "", "", "", &gc).expect_ok();
    } else {
        node.cni("DEL", "cb", &pod_b.path(), "eth0", &conf)
            .expect_ok();
    }
    assert!(pod_rules(&node, "198.18.0.11").is_empty());
    assert!(node.allocations().is_empty());
}

#[test]
fn eni_rules_0_4_0() {
    add_check_del("0.4.0", "ulcnie-040");
}

#[test]
fn eni_rules_1_0_0() {
    add_check_del("1.0.0", "ulcnie-100");
}

#[test]
fn eni_rules_1_1_0() {
    add_check_del("1.1.0", "ulcnie-110");
}

#[test]
fn failed_add_leaves_no_rule() {
    let node = Node::new_eni(
        "ulcnie-fail",
        &[("198.18.0.20", "eth1", route_table(1))],
        "198.18.0.0/24",
    );
    let pod = TestNs::new("ulcnie-fail-p").unwrap();
    // The pod namespace already has an eth0 (another plugin's veth): the pair cannot be created, after the
    // allocation and before any rule; the rollback must give the address back, and no rule may appear.
    let other = TestNs::new("ulcnie-fail-o").unwrap();
    foreign_eth0(&pod, &other);
    let r = node.cni("ADD", "cx", &pod.path(), "eth0", &node.conf("1.1.0"));
    assert!(!r.ok, "ADD should fail: {:?}", r.json);
    assert!(pod_rules(&node, "198.18.0.20").is_empty());
    assert!(node.allocations().is_empty());
}

/// The rollback must delete rules that are in place when the ADD fails, not only avoid adding them. Within one
/// ADD the rules are its last step, so nothing after them can fail; a retried ADD of the same attachment gets the
/// same address and table and finds the first ADD's rules in place, so its failure is where the rollback has
/// rules to delete. Left behind, they would steer the next holder of the address (which may sit on another ENI)
/// by the old table.
#[test]
fn failed_retried_add_deletes_the_rules_in_place() {
    let t1 = route_table(1);
    let node = Node::new_eni(
        "ulcnie-retry",
        &[("198.18.0.20", "eth1", t1)],
        "198.18.0.0/24",
    );
    let pod = TestNs::new("ulcnie-retry-p").unwrap();
    let other = TestNs::new("ulcnie-retry-o").unwrap();
    let conf = node.conf("1.1.0");
    node.cni("ADD", "cr", &pod.path(), "eth0", &conf)
        .expect_ok();
    assert_eq!(pod_rules(&node, "198.18.0.20"), expected("198.18.0.20", t1));

    // Between the ADD and its retry the pod's eth0 is replaced by a foreign one: our veth goes (its pod end
    // with it) and another plugin's eth0 takes the name, so the retry cannot create the pair.
    let ours = node.host_veths();
    assert_eq!(ours.len(), 1, "{ours:?}");
    node.nl().link_del(ours[0].index).unwrap();
    foreign_eth0(&pod, &other);

    node.cni("ADD", "cr", &pod.path(), "eth0", &conf)
        .expect_err(underlay_cni::spec::code::DATAPLANE);
    assert_eq!(pod_rules(&node, "198.18.0.20"), Vec::<Rule>::new());
    assert!(node.allocations().is_empty());
}

/// Puts a veth named eth0 into `pod`, its peer in `other` (another plugin's interface, as far as we know).
fn foreign_eth0(pod: &TestNs, other: &TestNs) {
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
}
