//! Routed-mode node planning: the nft ruleset snapshot, the sysctl/route/rule diff, idempotency.

use std::collections::BTreeSet;

use underlay_core::names;
use underlay_core::nft::{ObservedNft, Ruleset};
use underlay_core::node::{
    NodeObserved, NodeOp, NodeSpecError, OwnedRoute, OwnedRule, RoutedNodeSpec, plan_node,
    wanted_sysctls,
};
use underlay_core::planner::PeerRoute;

fn spec() -> RoutedNodeSpec {
    RoutedNodeSpec {
        node: "node-a".into(),
        subnet: "subnet-1".into(),
        node_ip: "198.18.0.10".parse().unwrap(),
        uplink: Some("eth0".into()),
        pod_block: "100.64.0.0/26".parse().unwrap(),
        pod_cidr: "100.64.0.0/10".parse().unwrap(),
        vpc_cidrs: vec![
            "198.18.0.0/16".parse().unwrap(),
            "198.19.0.0/16".parse().unwrap(),
        ],
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
        mtu: 9001,
    }
}

/// What the node looks like after every op of a plan has been applied.
fn converged(spec: &RoutedNodeSpec) -> NodeObserved {
    let ruleset = Ruleset::routed(spec);
    NodeObserved {
        uplink: "eth0".into(),
        sysctls: wanted_sysctls("eth0").into_iter().collect(),
        routes: spec
            .peer_routes
            .iter()
            .map(|r| OwnedRoute {
                destination: r.destination,
                via: Some(r.via),
                dev: Some("eth0".into()),
            })
            .collect(),
        rules: vec![OwnedRule {
            priority: names::AGENT_RULE_PRIORITY_PEERS,
            to: Some(spec.pod_cidr),
        }],
        nft: Some(ObservedNft {
            rules: ruleset.rule_ids(),
            ..Default::default()
        }),
    }
}

#[test]
fn rendered_ruleset_matches_snapshot() {
    let got = Ruleset::routed(&spec()).render();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/snapshots/routed_ruleset.nft"
    );
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(path, &got).unwrap();
    }
    let want =
        std::fs::read_to_string(path).expect("snapshot exists (UPDATE_SNAPSHOTS=1 writes it)");
    assert_eq!(
        got, want,
        "rendered ruleset changed; review and rerun with UPDATE_SNAPSHOTS=1"
    );
}

#[test]
fn ruleset_scopes_snat_and_notrack() {
    let text = Ruleset::routed(&spec()).render();
    // The two VPC /16s merge into one /15 (nft interval sets refuse overlaps; merging is also shorter).
    assert!(
        text.contains("ip saddr 100.64.0.0/10 ip daddr != { 100.64.0.0/10, 198.18.0.0/15 } counter snat ip to 198.18.0.10"),
        "{text}"
    );
    assert!(
        text.contains("ip saddr { 100.64.0.0/10, 198.18.0.0/15 } ip saddr != 100.64.0.0/26 ip daddr 100.64.0.0/10 ip daddr != 100.64.0.0/26 counter notrack"),
        "{text}"
    );
    assert!(text.contains("type filter hook prerouting priority -300; policy accept;"));
    assert!(text.contains("type nat hook postrouting priority 100; policy accept;"));
    // Only our table is ever named.
    for line in text
        .lines()
        .filter(|l| l.starts_with("table") || l.starts_with("delete"))
    {
        assert!(line.contains("inet underlay"), "{line}");
    }
}

#[test]
fn fingerprint_follows_content() {
    let a = Ruleset::routed(&spec());
    let mut s2 = spec();
    s2.node_ip = "198.18.0.99".parse().unwrap();
    let b = Ruleset::routed(&s2);
    assert_eq!(a.fingerprint(), Ruleset::routed(&spec()).fingerprint());
    assert_ne!(a.fingerprint(), b.fingerprint());
}

#[test]
fn fresh_node_plans_everything() {
    let s = spec();
    let obs = NodeObserved {
        uplink: "eth0".into(),
        ..Default::default()
    };
    let ops = plan_node(&s, &obs);
    let sysctls = ops
        .iter()
        .filter(|o| matches!(o, NodeOp::SetSysctl { .. }))
        .count();
    assert_eq!(sysctls, wanted_sysctls("eth0").len());
    assert!(ops.contains(&NodeOp::SetSysctl {
        key: "net/ipv4/conf/eth0/rp_filter".into(),
        value: "2".into()
    }));
    assert!(ops.contains(&NodeOp::SetSysctl {
        key: "net/ipv4/conf/all/send_redirects".into(),
        value: "0".into()
    }));
    assert!(ops.contains(&NodeOp::SetSysctl {
        key: "net/ipv4/ip_forward".into(),
        value: "1".into()
    }));
    assert!(ops.contains(&NodeOp::AddRule(OwnedRule {
        priority: names::AGENT_RULE_PRIORITY_PEERS,
        to: Some(s.pod_cidr)
    })));
    let puts: Vec<_> = ops
        .iter()
        .filter_map(|o| match o {
            NodeOp::PutRoute {
                destination,
                via,
                dev,
            } => Some((*destination, *via, dev.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        puts,
        vec![
            (
                "100.64.0.64/26".parse().unwrap(),
                "198.18.0.11".parse().unwrap(),
                "eth0".to_string()
            ),
            (
                "100.64.0.128/26".parse().unwrap(),
                "198.18.0.12".parse().unwrap(),
                "eth0".to_string()
            ),
        ]
    );
    assert!(matches!(ops.last(), Some(NodeOp::ReplaceNft(_))));
}

#[test]
fn converged_node_plans_nothing() {
    let s = spec();
    assert_eq!(plan_node(&s, &converged(&s)), vec![]);
}

#[test]
fn stale_routes_and_rules_are_removed_and_changed_routes_replaced() {
    let s = spec();
    let mut obs = converged(&s);
    // A peer left: its block is still in our table.
    let stale = OwnedRoute {
        destination: "100.64.1.0/26".parse().unwrap(),
        via: Some("198.18.0.13".parse().unwrap()),
        dev: Some("eth0".into()),
    };
    obs.routes.push(stale.clone());
    // A peer's IP changed.
    obs.routes[0].via = Some("198.18.0.50".parse().unwrap());
    // A rule from an older pod CIDR.
    let old_rule = OwnedRule {
        priority: 29999,
        to: Some("100.96.0.0/11".parse().unwrap()),
    };
    obs.rules.push(old_rule.clone());
    let ops = plan_node(&s, &obs);
    assert_eq!(
        ops,
        vec![
            NodeOp::DelRule(old_rule),
            NodeOp::PutRoute {
                destination: "100.64.0.64/26".parse().unwrap(),
                via: "198.18.0.11".parse().unwrap(),
                dev: "eth0".into()
            },
            NodeOp::DelRoute(stale),
        ]
    );
}

#[test]
fn drifted_sysctl_or_nft_is_repaired() {
    let s = spec();
    let mut obs = converged(&s);
    obs.sysctls
        .insert("net/ipv4/conf/all/rp_filter".into(), "1".into());
    let nft = obs.nft.as_mut().unwrap();
    // Someone deleted the SNAT rule but left the table comment.
    nft.rules = nft
        .rules
        .iter()
        .filter(|(_, id)| !id.starts_with("pod-egress-snat@"))
        .cloned()
        .collect::<BTreeSet<_>>();
    let ops = plan_node(&s, &obs);
    assert_eq!(ops.len(), 2, "{ops:?}");
    assert_eq!(
        ops[0],
        NodeOp::SetSysctl {
            key: "net/ipv4/conf/all/rp_filter".into(),
            value: "2".into()
        }
    );
    assert!(matches!(ops[1], NodeOp::ReplaceNft(_)));
}

#[test]
fn spec_validation_rejects_contradictions() {
    let mut s = spec();
    s.pod_block = "10.0.0.0/26".parse().unwrap();
    assert!(matches!(
        s.validate(),
        Err(NodeSpecError::BlockOutsidePodCidr { .. })
    ));
    let mut s = spec();
    s.peer_routes[0].destination = "100.64.0.0/25".parse().unwrap();
    assert!(matches!(
        s.validate(),
        Err(NodeSpecError::PeerOverlapsOwnBlock(_))
    ));
    let mut s = spec();
    s.peer_routes[1].destination = s.peer_routes[0].destination;
    assert!(matches!(s.validate(), Err(NodeSpecError::PeerOverlap(_))));
    assert_eq!(spec().validate(), Ok(()));
}

#[test]
fn spec_round_trips_through_json() {
    let s = spec();
    let j = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<RoutedNodeSpec>(&j).unwrap(), s);
}

#[test]
fn node_spec_comes_from_the_plan() {
    use underlay_core::topology::{SynthSpec, synthesise};
    let topo = synthesise(&SynthSpec::new(12, 3, 2, 50)).unwrap();
    let plan = underlay_core::plan(&topo, None).unwrap();
    let node = &topo.nodes[0];
    let s = underlay_core::node::node_spec(&plan, &topo, &node.id).unwrap();
    assert_eq!(s.node_ip, node.ip);
    assert_eq!(s.subnet, node.subnet);
    assert_eq!(Some(s.pod_block), plan.block_of(&node.id));
    assert_eq!(s.peer_routes, plan.peer_routes(&node.id));
    assert!(
        !s.peer_routes.is_empty(),
        "12 nodes in 6 subnets: every node has a peer"
    );
    for sub in &topo.vpc.subnets {
        assert!(
            s.vpc_cidrs.iter().any(|c| c.contains(&sub.cidr)),
            "{} not covered",
            sub.cidr
        );
    }
    s.validate().unwrap();
    assert!(matches!(
        underlay_core::node::node_spec(&plan, &topo, "no-such-node"),
        Err(NodeSpecError::NotInPlan(_))
    ));
}
