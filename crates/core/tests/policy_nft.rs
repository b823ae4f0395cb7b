//! The policy datapath's rendering, and its coexistence with the base ruleset in the one `inet underlay` table.

use underlay_core::names;
use underlay_core::nft::{AddrMatch, Chain, ChainType, Hook, ObservedNft, Rule, Ruleset, Verdict};
use underlay_core::policy::diff::PolicyObjects;
use underlay_core::policy::{
    LabelSelector, LocalPod, Namespace, NetworkPolicy, Pod, PolicyOp, PolicyPort, PolicyRule,
    PortRef, compile, diff, render_install, render_ops,
};

fn base() -> Ruleset {
    Ruleset {
        sets: vec![],
        chains: vec![Chain {
            name: names::NFT_CHAIN_FORWARD.into(),
            kind: ChainType::Filter,
            hook: Hook::Forward,
            priority: names::NFT_PRIORITY_FILTER,
            rules: vec![Rule {
                id: "pod-dst-accept".into(),
                saddr: vec![],
                daddr: vec![AddrMatch::In(vec!["100.64.0.0/10".parse().unwrap()])],
                verdict: Verdict::Accept,
            }],
        }],
    }
}

#[test]
fn the_base_ruleset_replaces_its_chains_never_the_table() {
    let text = base().render();
    assert!(!text.contains("delete table"), "{text}");
    for c in names::NFT_BASE_CHAINS {
        assert!(
            text.contains(&format!("delete chain inet underlay {c}\n")),
            "{text}"
        );
    }
    assert!(!text.contains(names::NFT_POLICY_PREFIX), "{text}");
}

#[test]
fn the_base_read_back_ignores_policy_chains() {
    let want = base();
    let mut seen = ObservedNft {
        rules: want.rule_ids(),
        elements: Default::default(),
    };
    assert!(seen.matches(&want));
    seen.rules
        .insert((names::NFT_CHAIN_POLICY_FORWARD_EGRESS.into(), String::new()));
    seen.rules
        .insert(("pol_p0123456789ab_in".into(), String::new()));
    assert!(
        seen.matches(&want),
        "policy chains are not the base's business"
    );
    seen.rules.insert(("forward".into(), "stray".into()));
    assert!(!seen.matches(&want));
}

fn cluster(app: &str) -> underlay_core::policy::Cluster {
    let pod = |name: &str, ip: &str, labels: &[(&str, &str)]| Pod {
        namespace: "x".into(),
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ip: Some(ip.parse().unwrap()),
        node: "n1".into(),
        host_network: false,
        named_ports: vec![],
    };
    underlay_core::policy::Cluster {
        namespaces: vec![Namespace {
            name: "x".into(),
            labels: Default::default(),
        }],
        pods: vec![
            pod("a", "100.64.0.1", &[("pod", "a")]),
            pod("b", "100.64.0.2", &[("pod", "b"), ("app", app)]),
        ],
        policies: vec![NetworkPolicy {
            namespace: "x".into(),
            name: "allow-web".into(),
            pod_selector: LabelSelector::labels([("pod", "a")]),
            policy_types: vec![],
            ingress: vec![PolicyRule {
                peers: vec![underlay_core::policy::Peer {
                    pod_selector: Some(LabelSelector::labels([("app", "web")])),
                    ..Default::default()
                }],
                ports: vec![PolicyPort {
                    protocol: None,
                    port: Some(PortRef::Number(80)),
                    end_port: None,
                }],
            }],
            egress: vec![],
        }],
        nodes: vec![],
    }
}

fn local() -> Vec<LocalPod> {
    vec![LocalPod {
        namespace: "x".into(),
        name: "a".into(),
        ifname: "ul00000000001".into(),
        ip: "100.64.0.1".parse().unwrap(),
    }]
}

#[test]
fn install_renders_skeleton_sets_chains_and_map_entries() {
    let m = compile(&cluster("web"), &local()).model;
    let text = render_install(&m, &PolicyObjects::default(), 0x2a);
    for needle in [
        "add map inet underlay pol_ingress_if { type ifname : verdict; }",
        "add element inet underlay pol_ingress_if { \"ul00000000001\" : jump pol_c",
        "add rule inet underlay pol_forward_ingress ct direction reply accept",
        "add rule inet underlay pol_forward_ingress meta nfproto ipv4 oifname vmap @pol_ingress_if",
        "add rule inet underlay pol_input_egress meta nfproto ipv4 iifname vmap @pol_egress_if",
        "type filter hook forward priority 20; policy accept;",
        "{ 100.64.0.2 }",
        "{ tcp . 80 }",
        "meta l4proto . th dport @",
        "counter drop",
        // The generation: established connections stamped by it skip the chains; an ingress accept, and a
        // forwarded packet no ingress policy selects, stamp it.
        "add rule inet underlay pol_established ct state established ct mark and 0xffff0000 == 0x002a0000 counter accept",
        "add rule inet underlay pol_verified ct mark set ct mark and 0x0000ffff or 0x002a0000 accept",
        "add rule inet underlay pol_forward_egress jump pol_established",
        "add rule inet underlay pol_forward_ingress jump pol_established",
        "add rule inet underlay pol_forward_ingress goto pol_verified",
        "goto pol_verified",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    assert!(
        !text.contains("pol_input_egress jump pol_established"),
        "packets to the node itself are evaluated every time:\n{text}"
    );
}

/// Only a change that may deny something moves the generation (so established connections are evaluated
/// again at their next packet); pure additions keep every stamp valid.
#[test]
fn only_changes_that_may_deny_move_the_generation() {
    let (web, db) = (
        compile(&cluster("web"), &local()).model,
        compile(&cluster("db"), &local()).model,
    );
    // A peer leaves the allowed set: deny.
    assert!(underlay_core::policy::revokes(&diff(&web, &db)));
    // A peer joins it: open only.
    assert!(!underlay_core::policy::revokes(&diff(&db, &web)));
    // A pod newly selected: its connections were stamped while nothing selected it.
    assert!(underlay_core::policy::revokes(&diff(
        &underlay_core::policy::PolicyModel::default(),
        &web
    )));
    // The selected pod leaves: nothing it had is denied to anyone.
    assert!(!underlay_core::policy::revokes(&diff(
        &web,
        &compile(&cluster("web"), &[]).model
    )));
    assert_eq!(underlay_core::policy::next_generation(u16::MAX), 1);
}

#[test]
fn a_peer_label_change_is_one_element_change() {
    let (m1, m2) = (
        compile(&cluster("web"), &local()).model,
        compile(&cluster("db"), &local()).model,
    );
    let ops = diff(&m1, &m2);
    assert!(
        matches!(ops.as_slice(), [PolicyOp::DeleteElements { elements, .. }] if elements.len() == 1),
        "{ops:?}"
    );
    let text = render_ops(&ops);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.lines()
            .nth(1)
            .unwrap()
            .starts_with("delete element inet underlay pol_a"),
        "{text}"
    );
}

/// Policies that name the same peers share one address set (named by what selects its members), so a thousand
/// policies allowing a hundred groups hold a hundred sets; the set leaves only with its last policy.
#[test]
fn policies_naming_the_same_peers_share_one_set() {
    let addr_sets = |m: &underlay_core::policy::PolicyModel| -> Vec<String> {
        m.sets
            .iter()
            .filter(|(_, s)| s.kind == underlay_core::policy::SetKind::PodAddr)
            .map(|(n, _)| n.clone())
            .collect()
    };
    let one = cluster("web");
    let mut two = one.clone();
    let mut copy = two.policies[0].clone();
    copy.name = "allow-web-too".into();
    copy.ingress[0].ports[0].port = Some(PortRef::Number(81));
    two.policies.push(copy);
    let (m1, m2) = (compile(&one, &local()).model, compile(&two, &local()).model);
    assert_eq!(addr_sets(&m1).len(), 1);
    assert_eq!(addr_sets(&m2), addr_sets(&m1), "shared, not copied");
    // Removing one of the two keeps the set its twin still uses; removing the last one deletes it.
    let back = diff(&m2, &m1);
    let shared = addr_sets(&m1)[0].clone();
    assert!(
        !back
            .iter()
            .any(|op| matches!(op, PolicyOp::DeleteSet { name } if *name == shared)),
        "{back:?}"
    );
    let mut none = one.clone();
    none.policies.clear();
    let gone = diff(&m1, &compile(&none, &local()).model);
    assert!(
        gone.iter()
            .any(|op| matches!(op, PolicyOp::DeleteSet { name } if *name == addr_sets(&m1)[0])),
        "{gone:?}"
    );
}
