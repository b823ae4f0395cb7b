//! Property tests of the policy compiler against the evaluator (the oracle), and of the diff.
//!
//! A random cluster (3 namespaces, 2 nodes, pods with random labels and named ports, random policies mixing
//! every peer and port form, invalid entries included) is compiled for each node; random packets are walked
//! through the nodes they cross (the source pod's node, then the destination pod's node) with the model's
//! interpreter, and the verdict must equal the evaluator's. SCTP is covered here, at the model level: the
//! test kernel has no SCTP sockets, while nftables and conntrack match SCTP like TCP and UDP.

use std::net::Ipv4Addr;

use proptest::prelude::*;
use underlay_core::policy::ruleset::{Hook, interpret};
use underlay_core::policy::{
    Cluster, CompileCache, Element, IpBlock, LabelSelector, LocalPod, NamedPort, Namespace,
    NetworkPolicy, Node, Operator, Packet, Peer, Pod, PolicyOp, PolicyPort, PolicyRule, PolicyType,
    PortRef, Protocol, Requirement, Transport, allows, apply, compile, compile_with, diff,
};
use underlay_core::veth_names::host_veth_name;

const NODES: [(&str, [u8; 4]); 2] = [("n1", [198, 18, 0, 10]), ("n2", [198, 18, 0, 11])];
const UPLINK: &str = "eth0";

fn labels(pairs: Vec<(&'static str, &'static str)>) -> underlay_core::policy::Labels {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn arb_labels() -> impl Strategy<Value = underlay_core::policy::Labels> {
    (
        prop::sample::select(vec!["a", "b", "c"]),
        prop::option::of(prop::sample::select(vec!["web", "db"])),
    )
        .prop_map(|(p, app)| {
            let mut v = vec![("pod", p)];
            if let Some(a) = app {
                v.push(("app", a));
            }
            labels(v)
        })
}

fn arb_proto() -> impl Strategy<Value = Protocol> {
    prop::sample::select(Protocol::ALL.to_vec())
}

fn arb_named_ports() -> impl Strategy<Value = Vec<NamedPort>> {
    prop::collection::vec(
        (
            prop::sample::select(vec!["http", "dns"]),
            arb_proto(),
            prop::sample::select(vec![80u16, 81, 53]),
        ),
        0..3,
    )
    .prop_map(|v| {
        let mut seen = std::collections::BTreeSet::new();
        v.into_iter()
            .filter(|(n, _, _)| seen.insert(*n)) // a pod's port names are unique
            .map(|(n, protocol, port)| NamedPort {
                name: n.into(),
                protocol,
                port,
            })
            .collect()
    })
}

fn arb_selector() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::everything()),
        prop::sample::select(vec!["a", "b", "c"]).prop_map(|p| LabelSelector::labels([("pod", p)])),
        prop::sample::select(vec!["web", "db"]).prop_map(|a| LabelSelector::labels([("app", a)])),
        (
            prop::sample::select(vec!["pod", "app"]),
            prop::sample::select(vec![
                Operator::In,
                Operator::NotIn,
                Operator::Exists,
                Operator::DoesNotExist
            ]),
            prop::collection::vec(prop::sample::select(vec!["a", "b", "web"]), 0..2)
        )
            .prop_map(|(k, op, vals)| {
                let values = match op {
                    Operator::In | Operator::NotIn if vals.is_empty() => vec!["a".to_string()],
                    Operator::Exists | Operator::DoesNotExist => vec![],
                    _ => vals.into_iter().map(String::from).collect(),
                };
                LabelSelector {
                    match_expressions: vec![Requirement {
                        key: k.into(),
                        operator: op,
                        values,
                    }],
                    ..LabelSelector::default()
                }
            }),
        // Invalid selectors, rarely.
        Just(LabelSelector {
            match_expressions: vec![Requirement {
                key: "pod".into(),
                operator: Operator::Other("Gt".into()),
                values: vec![]
            }],
            ..LabelSelector::default()
        }),
    ]
}

fn arb_ns_selector() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::everything()),
        prop::sample::select(vec!["red", "blue"])
            .prop_map(|t| LabelSelector::labels([("team", t)])),
        prop::sample::select(vec!["x", "y", "z"])
            .prop_map(|n| LabelSelector::labels([("kubernetes.io/metadata.name", n)])),
    ]
}

fn arb_peer() -> impl Strategy<Value = Peer> {
    let cidrs = vec![
        "100.64.0.0/16",
        "100.64.0.0/10",
        "100.64.1.0/24",
        "0.0.0.0/0",
        "203.0.113.0/24",
        "198.18.0.0/15",
        "100.64.0.5/32",
        "100.64.0.7/24",
        "2001:db8::/64",
        "not-a-cidr",
    ];
    let excepts = vec![
        "100.64.0.0/28",
        "100.64.1.16/28",
        "100.64.0.5/32",
        "203.0.113.5/32",
        "198.18.0.10/32",
        "bad",
    ];
    prop_oneof![
        3 => arb_selector().prop_map(|s| Peer { pod_selector: Some(s), ..Peer::default() }),
        2 => arb_ns_selector().prop_map(|s| Peer { namespace_selector: Some(s), ..Peer::default() }),
        2 => (arb_selector(), arb_ns_selector()).prop_map(|(p, n)| Peer {
            pod_selector: Some(p), namespace_selector: Some(n), ip_block: None
        }),
        3 => (prop::sample::select(cidrs), prop::collection::vec(prop::sample::select(excepts), 0..3)).prop_map(|(c, e)| Peer {
            ip_block: Some(IpBlock { cidr: c.into(), except: e.into_iter().map(String::from).collect() }),
            ..Peer::default()
        }),
        1 => Just(Peer::default()),
    ]
}

fn arb_port() -> impl Strategy<Value = PolicyPort> {
    let proto = prop::option::of(prop::sample::select(vec!["TCP", "UDP", "SCTP", "ICMP"]));
    let port = prop_oneof![
        Just((None, None)),
        prop::sample::select(vec![80i32, 81, 53, 0, 70000])
            .prop_map(|p| (Some(PortRef::Number(p)), None)),
        prop::sample::select(vec![(80i32, 81i32), (50, 90), (81, 80), (1000, 1000)])
            .prop_map(|(p, e)| (Some(PortRef::Number(p)), Some(e))),
        prop::sample::select(vec!["http", "dns", "nope"])
            .prop_map(|n| (Some(PortRef::Name(n.into())), None)),
    ];
    (proto, port).prop_map(|(pr, (port, end_port))| PolicyPort {
        protocol: pr.map(String::from),
        port,
        end_port,
    })
}

fn arb_rule() -> impl Strategy<Value = PolicyRule> {
    (
        prop::collection::vec(arb_peer(), 0..3),
        prop::collection::vec(arb_port(), 0..3),
    )
        .prop_map(|(peers, ports)| PolicyRule { peers, ports })
}

fn arb_policy(i: usize) -> impl Strategy<Value = NetworkPolicy> {
    (
        prop::sample::select(vec!["x", "y", "z"]),
        arb_selector(),
        prop::sample::select(vec![
            vec![],
            vec![PolicyType::Ingress],
            vec![PolicyType::Egress],
            vec![PolicyType::Ingress, PolicyType::Egress],
        ]),
        prop::collection::vec(arb_rule(), 0..3),
        prop::collection::vec(arb_rule(), 0..3),
    )
        .prop_map(move |(ns, sel, types, ingress, egress)| NetworkPolicy {
            namespace: ns.into(),
            name: format!("p{i}"),
            pod_selector: sel,
            policy_types: types,
            ingress,
            egress,
        })
}

/// Pods: per namespace, 1..4 pods over the two nodes; addresses unique; a host-network pod sometimes.
fn arb_cluster() -> impl Strategy<Value = Cluster> {
    let pods = prop::collection::vec(
        (
            arb_labels(),
            arb_named_ports(),
            0usize..3,
            prop::bool::weighted(0.1),
        ),
        3..10,
    );
    let nslabels = prop::collection::vec(prop::sample::select(vec!["red", "blue"]), 3);
    let npol = 0usize..5;
    (pods, nslabels, npol)
        .prop_flat_map(|(pods, nsl, npol)| {
            let policies: Vec<_> = (0..npol).map(arb_policy).collect();
            (Just(pods), Just(nsl), policies)
        })
        .prop_map(|(pods, nsl, policies)| {
            let nss = ["x", "y", "z"];
            let namespaces = nss
                .iter()
                .zip(&nsl)
                .map(|(n, t)| Namespace {
                    name: n.to_string(),
                    labels: labels(vec![("kubernetes.io/metadata.name", n), ("team", t)]),
                })
                .collect();
            let pods = pods
                .into_iter()
                .enumerate()
                .map(|(i, (l, np, where_, host))| {
                    let ns = nss[i % 3];
                    let (node, ip) = match where_ {
                        0 | 1 => (
                            NODES[where_].0.to_string(),
                            Some(Ipv4Addr::new(100, 64, where_ as u8, i as u8 + 1)),
                        ),
                        _ => (String::new(), None),
                    };
                    let (ip, host_network) = if host && where_ < 2 {
                        (Some(Ipv4Addr::from(NODES[where_].1)), true)
                    } else {
                        (ip, false)
                    };
                    Pod {
                        namespace: ns.into(),
                        name: format!("pod{i}"),
                        labels: l,
                        ip,
                        node,
                        host_network,
                        named_ports: np,
                    }
                })
                .collect();
            let nodes = NODES
                .iter()
                .map(|(n, a)| Node {
                    name: n.to_string(),
                    addresses: vec![Ipv4Addr::from(*a)],
                })
                .collect();
            Cluster {
                namespaces,
                pods,
                policies,
                nodes,
            }
        })
}

fn local_pods(c: &Cluster, node: &str) -> Vec<LocalPod> {
    c.pods
        .iter()
        .filter(|p| p.node == node && !p.host_network)
        .filter_map(|p| {
            p.ip.map(|ip| LocalPod {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                ifname: host_veth_name(&format!("{}/{}", p.namespace, p.name), "eth0"),
                ip,
            })
        })
        .collect()
}

/// Where an address lives: a pod (node, veth), a node's own address, or elsewhere.
enum At {
    Pod(usize, String, String), // node index, veth, namespace/name
    Node(usize),
    Elsewhere,
}

fn locate(c: &Cluster, ip: Ipv4Addr) -> At {
    if let Some(p) = c.pods.iter().find(|p| !p.host_network && p.ip == Some(ip)) {
        let n = NODES
            .iter()
            .position(|(name, _)| *name == p.node)
            .expect("pods with addresses are placed");
        return At::Pod(
            n,
            host_veth_name(&format!("{}/{}", p.namespace, p.name), "eth0"),
            format!("{}/{}", p.namespace, p.name),
        );
    }
    if let Some(n) = NODES.iter().position(|(_, a)| Ipv4Addr::from(*a) == ip) {
        return At::Node(n);
    }
    At::Elsewhere
}

/// The packet's walk through the nodes' compiled models.
fn walk(c: &Cluster, models: &[underlay_core::policy::PolicyModel], pkt: &Packet) -> bool {
    let (s, d) = (locate(c, pkt.src), locate(c, pkt.dst));
    let run =
        |n: usize, hook: Hook| interpret(&models[n], &hook, pkt.src, pkt.dst, pkt.transport, false);
    match (s, d) {
        (At::Pod(_, _, a), At::Pod(_, _, b)) if a == b => true, // never leaves the pod
        (At::Pod(sn, sif, _), At::Pod(dn, dif, _)) if sn == dn => {
            run(sn, Hook::Forward { iif: sif, oif: dif })
        }
        (At::Pod(sn, sif, _), At::Pod(dn, dif, _)) => {
            run(
                sn,
                Hook::Forward {
                    iif: sif,
                    oif: UPLINK.into(),
                },
            ) && run(
                dn,
                Hook::Forward {
                    iif: UPLINK.into(),
                    oif: dif,
                },
            )
        }
        (At::Pod(sn, sif, _), At::Node(dn)) if sn == dn => run(sn, Hook::Input { iif: sif }),
        (At::Pod(sn, sif, _), At::Node(dn)) => {
            run(
                sn,
                Hook::Forward {
                    iif: sif,
                    oif: UPLINK.into(),
                },
            ) && run(dn, Hook::Input { iif: UPLINK.into() })
        }
        (At::Pod(sn, sif, _), At::Elsewhere) => run(
            sn,
            Hook::Forward {
                iif: sif,
                oif: UPLINK.into(),
            },
        ),
        (At::Node(sn), At::Pod(dn, _, _)) if sn == dn => run(sn, Hook::Output),
        (_, At::Pod(dn, dif, _)) => run(
            dn,
            Hook::Forward {
                iif: UPLINK.into(),
                oif: dif,
            },
        ),
        (_, _) => true,
    }
}

fn arb_packet_parts() -> impl Strategy<Value = (usize, usize, Transport)> {
    let t = prop_oneof![
        4 => (arb_proto(), prop::sample::select(vec![80u16, 81, 53, 1000, 9])).prop_map(|(p, n)| Transport::Port(p, n)),
        1 => Just(Transport::Other(1)),
    ];
    (0usize..64, 0usize..64, t)
}

fn addresses(c: &Cluster) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = c.pods.iter().filter_map(|p| p.ip).collect();
    v.extend(NODES.iter().map(|(_, a)| Ipv4Addr::from(*a)));
    v.push(Ipv4Addr::new(203, 0, 113, 5));
    v.push(Ipv4Addr::new(203, 0, 113, 77));
    v.push(Ipv4Addr::new(100, 64, 9, 9)); // a pod-range address no pod has
    v.sort();
    v.dedup();
    v
}

fn models(c: &Cluster) -> Vec<underlay_core::policy::PolicyModel> {
    NODES
        .iter()
        .map(|(n, _)| compile(c, &local_pods(c, n)).model)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn compiled_model_agrees_with_the_evaluator(
        c in arb_cluster(),
        pkts in prop::collection::vec(arb_packet_parts(), 40),
    ) {
        let ms = models(&c);
        let addrs = addresses(&c);
        for (s, d, t) in pkts {
            let pkt = Packet { src: addrs[s % addrs.len()], dst: addrs[d % addrs.len()], transport: t };
            let want = allows(&c, &pkt);
            let got = walk(&c, &ms, &pkt);
            prop_assert_eq!(got, want, "packet {:?}\nevaluator: {:?}\nmodels: {:#?}", pkt, underlay_core::policy::evaluate(&c, &pkt), ms);
        }
    }

    #[test]
    fn compiling_is_deterministic_and_order_independent(c in arb_cluster(), seed in any::<u64>()) {
        let local = local_pods(&c, "n1");
        let a = compile(&c, &local);
        prop_assert_eq!(&a, &compile(&c, &local));
        let mut shuffled = c.clone();
        let mut local_r = local.clone();
        let k = (seed % 7) as usize + 1;
        let n = shuffled.pods.len().max(1);
        shuffled.pods.rotate_left(k % n);
        shuffled.policies.reverse();
        shuffled.namespaces.reverse();
        local_r.reverse();
        prop_assert_eq!(a.model, compile(&shuffled, &local_r).model);
    }

    /// The engine keeps one cache across the ADDs and DELs of unchanged inputs: whatever pods come and go, and
    /// with local addresses the API does not hold yet, a warm cache compiles exactly what a cold one does.
    #[test]
    fn a_warm_cache_compiles_what_a_cold_one_does(
        c in arb_cluster(),
        steps in prop::collection::vec((any::<u32>(), any::<u8>()), 1..6),
    ) {
        let all: Vec<LocalPod> = c
            .pods
            .iter()
            .filter(|p| !p.host_network)
            .enumerate()
            .map(|(i, p)| LocalPod {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                ifname: host_veth_name(&format!("{}/{}", p.namespace, p.name), "eth0"),
                ip: p.ip.unwrap_or(Ipv4Addr::new(100, 64, 200, i as u8)),
            })
            .collect();
        let mut cache = CompileCache::default();
        for (mask, bump) in steps {
            let local: Vec<LocalPod> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| (mask >> (i % 32)) & 1 == 1)
                .map(|(i, lp)| {
                    let mut lp = lp.clone();
                    if usize::from(bump) % 4 == i % 4 {
                        lp.ip = Ipv4Addr::new(100, 64, 201, (i as u8).wrapping_add(bump));
                    }
                    lp
                })
                .collect();
            prop_assert_eq!(compile_with(&c, &local, &mut cache), compile(&c, &local));
        }
    }

    #[test]
    fn diff_applied_to_prev_gives_next(a in arb_cluster(), b in arb_cluster()) {
        let (ma, mb) = (compile(&a, &local_pods(&a, "n1")).model, compile(&b, &local_pods(&b, "n1")).model);
        prop_assert!(diff(&ma, &ma).is_empty());
        let mut x = ma.clone();
        apply(&mut x, &diff(&ma, &mb));
        prop_assert_eq!(x, mb);
    }

    #[test]
    fn a_pod_label_change_touches_only_what_that_pod_is_in(
        c in arb_cluster(),
        which in any::<prop::sample::Index>(),
        new in arb_labels(),
    ) {
        let i = which.index(c.pods.len());
        let mut c2 = c.clone();
        c2.pods[i].labels = new;
        let pod = &c.pods[i];
        for (node, _) in NODES {
            let (m1, m2) = (compile(&c, &local_pods(&c, node)).model, compile(&c2, &local_pods(&c2, node)).model);
            let ops = diff(&m1, &m2);
            let local = pod.node == node && !pod.host_network && pod.ip.is_some();
            let veth = host_veth_name(&format!("{}/{}", pod.namespace, pod.name), "eth0");
            let mine = |e: &Element| match e {
                Element::Addr(r) => pod.ip.is_some_and(|ip| r.contains(ip)),
                Element::AddrProtoPort(ip, _, _) => pod.ip == Some(*ip),
                Element::IfProtoPort(i, _, _) => *i == veth,
                Element::ProtoPort(..) => false,
            };
            for op in &ops {
                let ok = match op {
                    PolicyOp::AddElements { elements, .. } | PolicyOp::DeleteElements { elements, .. } => {
                        elements.iter().all(mine)
                    }
                    PolicyOp::SetMapEntry { ifname, .. } | PolicyOp::DeleteMapEntry { ifname, .. } => local && *ifname == veth,
                    // Objects only this pod's new selection needs (or its old one needed).
                    PolicyOp::AddSet { .. } | PolicyOp::DeleteSet { .. } | PolicyOp::AddChain { .. } | PolicyOp::DeleteChain { .. } => local,
                    PolicyOp::ReplaceChain { .. } => false,
                };
                prop_assert!(ok, "pod {}/{} on {} ({}local): unexpected {:?}", pod.namespace, pod.name, node, if local { "" } else { "not " }, op);
            }
        }
    }
}

/// One change to a cluster, as the API delivers them: a policy added or removed, a pod's labels changed, a
/// pod gone, or a new pod.
fn arb_change() -> impl Strategy<
    Value = (
        u8,
        prop::sample::Index,
        NetworkPolicy,
        underlay_core::policy::Labels,
    ),
> {
    (
        0u8..5,
        any::<prop::sample::Index>(),
        arb_policy(9),
        arb_labels(),
    )
}

fn changed(
    c: &Cluster,
    (kind, which, pol, labels): &(
        u8,
        prop::sample::Index,
        NetworkPolicy,
        underlay_core::policy::Labels,
    ),
) -> Cluster {
    let mut c = c.clone();
    match kind {
        0 => c.policies.push(pol.clone()),
        1 if !c.policies.is_empty() => {
            c.policies.remove(which.index(c.policies.len()));
        }
        2 if !c.pods.is_empty() => {
            let i = which.index(c.pods.len());
            c.pods[i].labels = labels.clone();
        }
        3 if !c.pods.is_empty() => {
            c.pods.remove(which.index(c.pods.len()));
        }
        _ => c.pods.push(Pod {
            namespace: "y".into(),
            name: "newcomer".into(),
            labels: labels.clone(),
            ip: Some(Ipv4Addr::new(100, 64, 0, 250)),
            node: "n1".into(),
            host_network: false,
            named_ports: vec![],
        }),
    }
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The engine keeps its cache across new inputs, evicting only what each change touches: after any chain
    /// of API changes (policies, pod labels, pods coming and going), a warm cache compiles what a cold one does.
    #[test]
    fn a_cache_kept_across_input_changes_compiles_what_a_cold_one_does(
        c in arb_cluster(),
        changes in prop::collection::vec(arb_change(), 1..5),
    ) {
        let mut cache = CompileCache::default();
        let mut now = c;
        for node in ["n1", "n2"] {
            compile_with(&now, &local_pods(&now, node), &mut cache);
        }
        for change in &changes {
            let next = changed(&now, change);
            cache.invalidate(&now, &next);
            now = next;
            for node in ["n1", "n2"] {
                let local = local_pods(&now, node);
                prop_assert_eq!(compile_with(&now, &local, &mut cache), compile(&now, &local));
            }
        }
    }

    /// Connections stamped by the current generation skip the policy chains, so a change that keeps the
    /// generation must not deny anything the previous state allowed: whenever `revokes` says no, every packet
    /// the old model accepted on any hook of the node, the new one accepts too.
    #[test]
    fn a_change_that_keeps_the_generation_denies_nothing(
        c in arb_cluster(),
        change in arb_change(),
        pkts in prop::collection::vec((arb_packet_parts(), 0usize..4, 0usize..4, any::<bool>()), 40),
    ) {
        let c2 = changed(&c, &change);
        for (node, _) in NODES {
            let (l1, l2) = (local_pods(&c, node), local_pods(&c2, node));
            let (m1, m2) = (compile(&c, &l1).model, compile(&c2, &l2).model);
            if underlay_core::policy::revokes(&diff(&m1, &m2)) {
                continue;
            }
            let mut ifs: Vec<String> = l1.iter().chain(&l2).map(|p| p.ifname.clone()).collect();
            ifs.push(UPLINK.into());
            let mut addrs = addresses(&c);
            addrs.extend(addresses(&c2));
            for ((s, d, t), i, o, input) in &pkts {
                let (iif, oif) = (ifs[i % ifs.len()].clone(), ifs[o % ifs.len()].clone());
                let hook = if *input { Hook::Input { iif } } else { Hook::Forward { iif, oif } };
                let (src, dst) = (addrs[s % addrs.len()], addrs[d % addrs.len()]);
                if interpret(&m1, &hook, src, dst, *t, false) {
                    prop_assert!(
                        interpret(&m2, &hook, src, dst, *t, false),
                        "{hook:?} {src} -> {dst} {t:?} allowed before, denied after a change that keeps the generation\nops: {:#?}",
                        diff(&m1, &m2)
                    );
                }
            }
        }
    }
}
