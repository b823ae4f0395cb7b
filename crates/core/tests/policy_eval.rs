//! The evaluator (the oracle) against hand-written cases of the NetworkPolicy API.

use std::net::Ipv4Addr;

use underlay_core::policy::{
    Cluster, DirectionVerdict, Exemption, IpBlock, LabelSelector, NamedPort, Namespace,
    NetworkPolicy, Node, Operator, Packet, Peer, Pod, PolicyPort, PolicyRule, PolicyType, PortRef,
    Protocol, Requirement, Transport, allows, evaluate,
};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn mk_ns(name: &str, labels: &[(&str, &str)]) -> Namespace {
    let mut l: underlay_core::policy::Labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.insert("kubernetes.io/metadata.name".into(), name.into());
    Namespace {
        name: name.into(),
        labels: l,
    }
}

fn mk_pod(ns: &str, name: &str, addr: &str, node: &str) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: [("pod".to_string(), name.to_string())].into(),
        ip: Some(ip(addr)),
        node: node.into(),
        host_network: false,
        named_ports: vec![
            NamedPort {
                name: "serve-80-tcp".into(),
                protocol: Protocol::Tcp,
                port: 80,
            },
            NamedPort {
                name: "serve-81-udp".into(),
                protocol: Protocol::Udp,
                port: 81,
            },
        ],
    }
}

fn mk_pol(ns: &str, name: &str, sel: LabelSelector) -> NetworkPolicy {
    NetworkPolicy {
        namespace: ns.into(),
        name: name.into(),
        pod_selector: sel,
        policy_types: vec![],
        ingress: vec![],
        egress: vec![],
    }
}

fn pods_peer(sel: LabelSelector) -> Peer {
    Peer {
        pod_selector: Some(sel),
        ..Peer::default()
    }
}

fn ns_peer(sel: LabelSelector) -> Peer {
    Peer {
        namespace_selector: Some(sel),
        ..Peer::default()
    }
}

fn tcp(port: i32) -> PolicyPort {
    PolicyPort {
        protocol: None,
        port: Some(PortRef::Number(port)),
        end_port: None,
    }
}

/// x/a 100.64.0.1 (n1), x/b .2 (n1), y/a .3 (n2), y/b .4 (n2); nodes n1 198.18.0.10, n2 198.18.0.11.
fn cluster() -> Cluster {
    Cluster {
        namespaces: vec![
            mk_ns("x", &[("team", "red")]),
            mk_ns("y", &[("team", "blue")]),
        ],
        pods: vec![
            mk_pod("x", "a", "100.64.0.1", "n1"),
            mk_pod("x", "b", "100.64.0.2", "n1"),
            mk_pod("y", "a", "100.64.0.3", "n2"),
            mk_pod("y", "b", "100.64.0.4", "n2"),
        ],
        policies: vec![],
        nodes: vec![
            Node {
                name: "n1".into(),
                addresses: vec![ip("198.18.0.10")],
            },
            Node {
                name: "n2".into(),
                addresses: vec![ip("198.18.0.11")],
            },
        ],
    }
}

fn pkt(src: &str, dst: &str, proto: Protocol, port: u16) -> Packet {
    Packet {
        src: ip(src),
        dst: ip(dst),
        transport: Transport::Port(proto, port),
    }
}

const XA: &str = "100.64.0.1";
const XB: &str = "100.64.0.2";
const YA: &str = "100.64.0.3";
const YB: &str = "100.64.0.4";

#[test]
fn no_policy_allows_everything() {
    let c = cluster();
    for (s, d) in [(XA, XB), (YA, XA), ("203.0.113.5", XA), (XA, "203.0.113.5")] {
        assert!(allows(&c, &pkt(s, d, Protocol::Tcp, 80)), "{s} -> {d}");
    }
}

#[test]
fn default_deny_ingress_isolates_only_the_selected_pods() {
    let mut c = cluster();
    c.policies
        .push(mk_pol("x", "deny", LabelSelector::labels([("pod", "a")])));
    assert!(!allows(&c, &pkt(XB, XA, Protocol::Tcp, 80)));
    assert!(!allows(&c, &pkt(YA, XA, Protocol::Udp, 81)));
    assert!(
        allows(&c, &pkt(XA, XB, Protocol::Tcp, 80)),
        "egress not isolated (type inferred)"
    );
    assert!(allows(&c, &pkt(XA, YA, Protocol::Tcp, 80)));
    let d = evaluate(&c, &pkt(XB, XA, Protocol::Tcp, 80));
    assert_eq!(d.ingress, DirectionVerdict::Denied(vec!["x/deny".into()]));
    assert_eq!(d.egress, DirectionVerdict::Exempt(Exemption::NotIsolated));
}

#[test]
fn egress_type_is_inferred_from_rules_or_given_explicitly() {
    let mut c = cluster();
    let mut p = mk_pol("x", "eg", LabelSelector::everything());
    p.egress.push(PolicyRule {
        peers: vec![pods_peer(LabelSelector::labels([("pod", "b")]))],
        ports: vec![],
    });
    c.policies.push(p.clone());
    // Ingress is inferred too: x/b is isolated for ingress and no ingress rule lets x/a in.
    assert!(!allows(&c, &pkt(XA, XB, Protocol::Tcp, 80)));
    let d = evaluate(&c, &pkt(XA, XB, Protocol::Tcp, 80));
    assert_eq!(d.egress, DirectionVerdict::Allowed(vec!["x/eg".into()]));
    let mut c2 = cluster();
    p.policy_types = vec![PolicyType::Egress];
    c2.policies.push(p);
    assert!(allows(&c2, &pkt(XA, XB, Protocol::Tcp, 80)));
    assert!(!allows(&c2, &pkt(XA, YA, Protocol::Tcp, 80)));
    assert!(
        allows(&c2, &pkt(YA, XA, Protocol::Tcp, 80)),
        "Egress only: ingress open"
    );
}

#[test]
fn selector_shapes_pod_namespace_and_both() {
    let only_pods = PolicyRule {
        peers: vec![pods_peer(LabelSelector::labels([("pod", "a")]))],
        ports: vec![],
    };
    let only_ns = PolicyRule {
        peers: vec![ns_peer(LabelSelector::labels([("team", "blue")]))],
        ports: vec![],
    };
    let both = PolicyRule {
        peers: vec![Peer {
            pod_selector: Some(LabelSelector::labels([("pod", "b")])),
            namespace_selector: Some(LabelSelector::labels([("team", "blue")])),
            ip_block: None,
        }],
        ports: vec![],
    };
    let target = LabelSelector::labels([("pod", "b")]);
    let case = |rule: PolicyRule| {
        let mut c = cluster();
        let mut p = mk_pol("x", "p", target.clone());
        p.ingress.push(rule);
        c.policies.push(p);
        [XA, YA, YB].map(|s| allows(&c, &pkt(s, XB, Protocol::Tcp, 80)))
    };
    assert_eq!(
        case(only_pods),
        [true, false, false],
        "podSelector alone: own namespace only"
    );
    assert_eq!(case(only_ns), [false, true, true]);
    assert_eq!(case(both), [false, false, true]);
}

#[test]
fn match_expressions_in_peers() {
    let mut c = cluster();
    let mut p = mk_pol("x", "p", LabelSelector::labels([("pod", "a")]));
    p.ingress.push(PolicyRule {
        peers: vec![Peer {
            namespace_selector: Some(LabelSelector {
                match_expressions: vec![Requirement {
                    key: "team".into(),
                    operator: Operator::NotIn,
                    values: vec!["red".into()],
                }],
                ..LabelSelector::default()
            }),
            ..Peer::default()
        }],
        ports: vec![],
    });
    c.policies.push(p);
    assert!(!allows(&c, &pkt(XB, XA, Protocol::Tcp, 80)));
    assert!(allows(&c, &pkt(YA, XA, Protocol::Tcp, 80)));
}

#[test]
fn ip_block_with_except_matches_pods_and_external_addresses() {
    let mut c = cluster();
    let mut p = mk_pol("x", "p", LabelSelector::labels([("pod", "a")]));
    p.policy_types = vec![PolicyType::Egress];
    p.egress.push(PolicyRule {
        peers: vec![Peer {
            ip_block: Some(IpBlock {
                cidr: "100.64.0.0/30".into(),
                except: vec!["100.64.0.2/32".into()],
            }),
            ..Peer::default()
        }],
        ports: vec![],
    });
    c.policies.push(p);
    assert!(allows(&c, &pkt(XA, YA, Protocol::Tcp, 80)), ".3 inside /30");
    assert!(!allows(&c, &pkt(XA, XB, Protocol::Tcp, 80)), ".2 excepted");
    assert!(!allows(&c, &pkt(XA, YB, Protocol::Tcp, 80)), ".4 outside");
    assert!(!allows(&c, &pkt(XA, "203.0.113.1", Protocol::Tcp, 80)));
}

#[test]
fn ports_numbers_ranges_names_and_protocols() {
    let mut c = cluster();
    let mut p = mk_pol("x", "p", LabelSelector::labels([("pod", "a")]));
    p.ingress.push(PolicyRule {
        peers: vec![],
        ports: vec![
            tcp(80),
            PolicyPort {
                protocol: Some("UDP".into()),
                port: Some(PortRef::Number(1000)),
                end_port: Some(1010),
            },
            PolicyPort {
                protocol: Some("UDP".into()),
                port: Some(PortRef::Name("serve-81-udp".into())),
                end_port: None,
            },
            PolicyPort {
                protocol: Some("SCTP".into()),
                port: None,
                end_port: None,
            },
        ],
    });
    c.policies.push(p);
    assert!(allows(&c, &pkt(XB, XA, Protocol::Tcp, 80)));
    assert!(!allows(&c, &pkt(XB, XA, Protocol::Tcp, 81)));
    assert!(!allows(&c, &pkt(XB, XA, Protocol::Udp, 80)));
    assert!(allows(&c, &pkt(XB, XA, Protocol::Udp, 1005)));
    assert!(allows(&c, &pkt(XB, XA, Protocol::Udp, 1010)));
    assert!(!allows(&c, &pkt(XB, XA, Protocol::Udp, 1011)));
    assert!(
        allows(&c, &pkt(XB, XA, Protocol::Udp, 81)),
        "named port on the destination"
    );
    assert!(
        allows(&c, &pkt(XB, XA, Protocol::Sctp, 9)),
        "every SCTP port"
    );
    let icmp = Packet {
        src: ip(XB),
        dst: ip(XA),
        transport: Transport::Other(1),
    };
    assert!(!allows(&c, &icmp), "a rule with ports does not match ICMP");
}

#[test]
fn egress_named_ports_resolve_on_the_destination_pod() {
    let mut c = cluster();
    c.pods[2].named_ports = vec![NamedPort {
        name: "web".into(),
        protocol: Protocol::Tcp,
        port: 8080,
    }];
    c.pods[3].named_ports = vec![NamedPort {
        name: "web".into(),
        protocol: Protocol::Tcp,
        port: 9090,
    }];
    let mut p = mk_pol("x", "p", LabelSelector::labels([("pod", "a")]));
    p.policy_types = vec![PolicyType::Egress];
    p.egress.push(PolicyRule {
        peers: vec![],
        ports: vec![PolicyPort {
            protocol: None,
            port: Some(PortRef::Name("web".into())),
            end_port: None,
        }],
    });
    c.policies.push(p);
    assert!(allows(&c, &pkt(XA, YA, Protocol::Tcp, 8080)));
    assert!(!allows(&c, &pkt(XA, YA, Protocol::Tcp, 9090)));
    assert!(allows(&c, &pkt(XA, YB, Protocol::Tcp, 9090)));
    assert!(
        !allows(&c, &pkt(XA, "203.0.113.1", Protocol::Tcp, 8080)),
        "no named port outside the cluster"
    );
}

#[test]
fn union_of_policies() {
    let mut c = cluster();
    let sel = LabelSelector::labels([("pod", "a")]);
    let mut p1 = mk_pol("x", "p1", sel.clone());
    p1.ingress.push(PolicyRule {
        peers: vec![],
        ports: vec![tcp(80)],
    });
    let mut p2 = mk_pol("x", "p2", sel);
    p2.ingress.push(PolicyRule {
        peers: vec![],
        ports: vec![tcp(81)],
    });
    c.policies.extend([p1, p2]);
    assert!(allows(&c, &pkt(YA, XA, Protocol::Tcp, 80)));
    assert!(allows(&c, &pkt(YA, XA, Protocol::Tcp, 81)));
    assert!(!allows(&c, &pkt(YA, XA, Protocol::Tcp, 82)));
}

#[test]
fn loopback_own_node_and_host_network() {
    let mut c = cluster();
    let mut p = mk_pol("x", "deny-all", LabelSelector::everything());
    p.policy_types = vec![PolicyType::Ingress, PolicyType::Egress];
    c.policies.push(p);
    c.pods.push(Pod {
        host_network: true,
        ip: Some(ip("198.18.0.10")),
        ..mk_pod("x", "h", "198.18.0.10", "n1")
    });
    assert!(allows(&c, &pkt(XA, XA, Protocol::Tcp, 80)), "loopback");
    assert!(
        allows(&c, &pkt("198.18.0.10", XA, Protocol::Tcp, 80)),
        "own node (kubelet)"
    );
    assert!(
        !allows(&c, &pkt("198.18.0.11", XA, Protocol::Tcp, 80)),
        "another node"
    );
    assert!(
        !allows(&c, &pkt(XA, "198.18.0.10", Protocol::Tcp, 80)),
        "egress to the node is policed"
    );
}

#[test]
fn invalid_input_never_opens_traffic() {
    let mut c = cluster();
    let mut p = mk_pol("x", "bad", LabelSelector::labels([("pod", "a")]));
    p.ingress.push(PolicyRule {
        peers: vec![Peer {
            ip_block: Some(IpBlock {
                cidr: "not-a-cidr".into(),
                except: vec![],
            }),
            ..Peer::default()
        }],
        ports: vec![],
    });
    p.ingress.push(PolicyRule {
        peers: vec![],
        ports: vec![PolicyPort {
            protocol: Some("ICMP".into()),
            port: None,
            end_port: None,
        }],
    });
    p.ingress.push(PolicyRule {
        peers: vec![Peer {
            ip_block: Some(IpBlock {
                cidr: "0.0.0.0/0".into(),
                except: vec!["garbage".into()],
            }),
            ..Peer::default()
        }],
        ports: vec![],
    });
    c.policies.push(p);
    for t in [Transport::Port(Protocol::Tcp, 80), Transport::Other(1)] {
        assert!(!allows(
            &c,
            &Packet {
                src: ip(XB),
                dst: ip(XA),
                transport: t
            }
        ));
    }
    // An unknown operator in the policy's own selector isolates the whole namespace.
    let mut c = cluster();
    c.policies.push(mk_pol(
        "x",
        "bad-sel",
        LabelSelector {
            match_expressions: vec![Requirement {
                key: "pod".into(),
                operator: Operator::Other("Gt".into()),
                values: vec![],
            }],
            ..LabelSelector::default()
        },
    ));
    assert!(!allows(&c, &pkt(YA, XB, Protocol::Tcp, 80)));
    assert!(allows(&c, &pkt(XA, YB, Protocol::Tcp, 80)));
}
