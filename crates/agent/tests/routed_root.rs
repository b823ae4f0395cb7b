//! Routed mode against a real kernel: a node namespace converged twice, ownership of routes and rules,
//! sysctls, the `inet underlay` table. Needs root (creates network namespaces).
#![cfg(feature = "root-tests")]

use std::net::Ipv4Addr;

use ipnet::IpNet;
use underlay_agent::routed::{RoutedAgent, nft};
use underlay_core::names;
use underlay_core::node::{NodeOp, OwnedRoute, RoutedNodeSpec};
use underlay_core::planner::PeerRoute;
use underlay_dataplane::testns::TestNs;
use underlay_dataplane::{Netns, Route, VethSpec};

const PREFIX: &str = "agr";

fn spec(uplink: Option<&str>) -> RoutedNodeSpec {
    RoutedNodeSpec {
        node: "node-a".into(),
        subnet: "subnet-1".into(),
        node_ip: "198.18.0.10".parse().unwrap(),
        uplink: uplink.map(str::to_string),
        pod_block: "100.64.0.0/26".parse().unwrap(),
        pod_cidr: "100.64.0.0/10".parse().unwrap(),
        vpc_cidrs: vec!["198.18.0.0/15".parse().unwrap()],
        peer_routes: vec![
            PeerRoute {
                destination: "100.64.0.64/26".parse().unwrap(),
                via: "198.18.0.11".parse().unwrap(),
                peer: "node-b".into(),
            },
            PeerRoute {
                destination: "100.64.0.128/26".parse().unwrap(),
                via: "198.18.0.12".parse().unwrap(),
                peer: "node-c".into(),
            },
        ],
        mtu: 1500,
    }
}

/// A node namespace with an uplink `up0` holding 198.18.0.10/24 (its veth peer sits in a second namespace).
fn node() -> (TestNs, TestNs) {
    let node = TestNs::new(PREFIX).unwrap();
    let wire = TestNs::new(PREFIX).unwrap();
    let mut nl = node.netns().netlink().unwrap();
    nl.veth_add(&VethSpec {
        name: "up0",
        peer_name: "wire0",
        peer_netns: Some(wire.netns()),
        mtu: None,
        mac: None,
        peer_mac: None,
        up: true,
    })
    .unwrap();
    let up = nl.link_by_name("up0").unwrap().unwrap();
    nl.addr_add(up.index, "198.18.0.10/24".parse().unwrap())
        .unwrap();
    let mut wl = wire.netns().netlink().unwrap();
    let w = wl.link_by_name("wire0").unwrap().unwrap();
    wl.link_set_up(w.index, true).unwrap();
    (node, wire)
}

fn owned_routes(ns: &Netns) -> Vec<Route> {
    let mut v = ns
        .netlink()
        .unwrap()
        .routes(names::AGENT_ROUTE_TABLE)
        .unwrap();
    v.sort_by_key(|r| r.dst.to_string());
    v
}

#[test]
fn converging_twice_changes_nothing_the_second_time() {
    let (node, _wire) = node();
    let agent = RoutedAgent::new(Netns::named(node.name()).unwrap());
    // No uplink named: found by the node IP.
    let first = agent.converge(&spec(None)).unwrap();
    assert_eq!(first.uplink, "up0");
    assert!(first.ops.len() > 10, "{:?}", first.ops);
    let second = agent.converge(&spec(None)).unwrap();
    assert_eq!(second.ops, vec![], "second converge planned work");

    // Sysctls.
    let ns = node.netns();
    assert_eq!(ns.read_sysctl("net.ipv4.ip_forward").unwrap(), "1");
    for dev in ["all", "default", "up0"] {
        assert_eq!(
            ns.read_sysctl(&format!("net/ipv4/conf/{dev}/send_redirects"))
                .unwrap(),
            "0"
        );
        assert_eq!(
            ns.read_sysctl(&format!("net/ipv4/conf/{dev}/accept_redirects"))
                .unwrap(),
            "0"
        );
        assert_eq!(
            ns.read_sysctl(&format!("net/ipv4/conf/{dev}/rp_filter"))
                .unwrap(),
            "2"
        );
    }

    // Peer routes in the owned table, via the peer, on the uplink, onlink.
    let up = ns
        .netlink()
        .unwrap()
        .link_by_name("up0")
        .unwrap()
        .unwrap()
        .index;
    let routes = owned_routes(ns);
    let got: Vec<(String, String, Option<u32>)> = routes
        .iter()
        .map(|r| (r.dst.to_string(), r.via.unwrap().to_string(), r.oif))
        .collect();
    assert_eq!(
        got,
        vec![
            ("100.64.0.128/26".into(), "198.18.0.12".into(), Some(up)),
            ("100.64.0.64/26".into(), "198.18.0.11".into(), Some(up)),
        ]
    );
    // The rule that makes the kernel consult that table for pod destinations.
    let rules: Vec<_> = ns
        .netlink()
        .unwrap()
        .rules(false)
        .unwrap()
        .into_iter()
        .filter(|r| r.table == names::AGENT_ROUTE_TABLE)
        .collect();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0].priority, names::AGENT_RULE_PRIORITY_PEERS);
    assert_eq!(rules[0].to, Some("100.64.0.0/10".parse().unwrap()));
    // And the kernel's own lookup agrees: a peer's pod resolves through the peer.
    let out = node
        .command("ip")
        .args(["-4", "route", "get", "100.64.0.70"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("via 198.18.0.11 dev up0"), "{text}");

    // The nft table, read back as JSON.
    let json = nft::list_table_json(ns.path())
        .unwrap()
        .expect("table exists");
    let rules = json["nftables"].as_array().unwrap();
    let find = |prefix: &str| {
        rules
            .iter()
            .filter_map(|i| i.get("rule"))
            .find(|r| r["comment"].as_str().unwrap_or("").starts_with(prefix))
            .unwrap_or_else(|| panic!("no rule {prefix} in {json}"))
            .clone()
    };
    let snat = find("pod-egress-snat@");
    assert_eq!(snat["chain"], names::NFT_CHAIN_NAT_POSTROUTING);
    let exprs = snat["expr"].to_string();
    assert!(
        exprs.contains("\"snat\"") && exprs.contains("198.18.0.10"),
        "{exprs}"
    );
    let notrack = find("transit-notrack@");
    assert_eq!(notrack["chain"], names::NFT_CHAIN_RAW_PREROUTING);
    assert!(notrack["expr"].to_string().contains("\"notrack\""));
    let chains: Vec<_> = rules.iter().filter_map(|i| i.get("chain")).collect();
    let raw = chains
        .iter()
        .find(|c| c["name"] == names::NFT_CHAIN_RAW_PREROUTING)
        .unwrap();
    assert_eq!(raw["prio"], names::NFT_PRIORITY_RAW);
    assert_eq!(raw["hook"], "prerouting");
}

#[test]
fn stale_owned_state_goes_and_foreign_state_stays() {
    let (node, _wire) = node();
    let ns = node.netns();
    let agent = RoutedAgent::new(Netns::named(node.name()).unwrap());
    let s = spec(Some("up0"));
    agent.converge(&s).unwrap();

    let mut nl = ns.netlink().unwrap();
    let up = nl.link_by_name("up0").unwrap().unwrap().index;
    let gw = |a: &str| std::net::IpAddr::V4(a.parse::<Ipv4Addr>().unwrap());
    // A peer that left: its block is still in our table.
    let mut stale = Route::via_onlink("100.64.1.0/26".parse().unwrap(), gw("198.18.0.13"), up);
    stale.table = names::AGENT_ROUTE_TABLE;
    nl.route_add(&stale).unwrap();
    // Someone else's routes inside the pod CIDR: main table and another table.
    let foreign_main = Route::via_onlink("100.64.2.0/26".parse().unwrap(), gw("198.18.0.14"), up);
    nl.route_add(&foreign_main).unwrap();
    let mut foreign_other = foreign_main.clone();
    foreign_other.table = 100;
    nl.route_add(&foreign_other).unwrap();
    // Someone else's nft table.
    nft::apply_batch(ns.path(), "table inet other {\n\tchain c {\n\t\ttype filter hook forward priority 10; policy accept;\n\t}\n}\n").unwrap();
    // Drift in our own table: a peer route's gateway changed behind our back.
    let mut drifted = Route::via_onlink("100.64.0.64/26".parse().unwrap(), gw("198.18.0.99"), up);
    drifted.table = names::AGENT_ROUTE_TABLE;
    nl.route_replace(&drifted).unwrap();

    let r = agent.converge(&s).unwrap();
    assert_eq!(
        r.ops,
        vec![
            NodeOp::PutRoute {
                destination: "100.64.0.64/26".parse().unwrap(),
                via: "198.18.0.11".parse().unwrap(),
                dev: "up0".into(),
            },
            NodeOp::DelRoute(OwnedRoute {
                destination: "100.64.1.0/26".parse().unwrap(),
                via: Some("198.18.0.13".parse().unwrap()),
                dev: Some("up0".into()),
            }),
        ]
    );
    let dsts: Vec<IpNet> = owned_routes(ns).into_iter().map(|r| r.dst).collect();
    assert_eq!(
        dsts,
        vec![
            "100.64.0.128/26".parse::<IpNet>().unwrap(),
            "100.64.0.64/26".parse().unwrap()
        ]
    );
    assert!(
        owned_routes(ns)
            .iter()
            .any(|r| r.via == Some(gw("198.18.0.11")))
    );
    let main = nl.routes(Route::MAIN).unwrap();
    assert!(
        main.iter().any(|r| r.dst == foreign_main.dst),
        "foreign main route removed"
    );
    assert!(
        nl.routes(100)
            .unwrap()
            .iter()
            .any(|r| r.dst == foreign_main.dst)
    );
    let other = nft::nft_in(ns.path(), &["list", "table", "inet", "other"], None).unwrap();
    assert!(other.contains("chain c"), "{other}");

    // Deleting one of our nft rules by hand is drift the next converge repairs.
    let json = nft::list_table_json(ns.path()).unwrap().unwrap();
    let handle = json["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("rule"))
        .find(|r| {
            r["comment"]
                .as_str()
                .unwrap()
                .starts_with("pod-egress-snat@")
        })
        .unwrap()["handle"]
        .as_u64()
        .unwrap();
    nft::nft_in(
        ns.path(),
        &[
            "delete",
            "rule",
            "inet",
            "underlay",
            names::NFT_CHAIN_NAT_POSTROUTING,
            "handle",
            &handle.to_string(),
        ],
        None,
    )
    .unwrap();
    let r = agent.converge(&s).unwrap();
    assert_eq!(r.ops.len(), 1, "{:?}", r.ops);
    assert!(matches!(r.ops[0], NodeOp::ReplaceNft(_)));
    assert_eq!(agent.converge(&s).unwrap().ops, vec![]);
    // The foreign table survived our atomic replace.
    assert!(nft::nft_in(ns.path(), &["list", "table", "inet", "other"], None).is_ok());
}

#[test]
fn a_missing_uplink_is_an_error_not_a_guess() {
    let (node, _wire) = node();
    let agent = RoutedAgent::new(Netns::named(node.name()).unwrap());
    let e = agent.converge(&spec(Some("nope0"))).unwrap_err();
    assert!(e.to_string().contains("nope0"), "{e}");
    let mut s = spec(None);
    s.node_ip = "198.18.0.77".parse().unwrap();
    let e = agent.converge(&s).unwrap_err();
    assert!(e.to_string().contains("198.18.0.77"), "{e}");
}
