//! The policy datapath against a real kernel: a node namespace with pod namespaces over veths (named as
//! underlay-cni names them), the agent's policy engine applying its transactions with `nft` in the node
//! namespace, and real TCP and UDP packets. Checks: an unselected pod is reachable; allow and deny by peer,
//! port and protocol; replies of an allowed connection pass; an established connection a policy change now
//! denies stops; a pod admitted under a deny policy sends its first packet into a counted receiver and zero
//! arrive, while an unselected pod's first packets arrive; replacing the base ruleset keeps the policy state.
//! Needs root. SCTP is checked at the model level only (this kernel has no SCTP sockets).
#![cfg(feature = "root-tests")]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use underlay_agent::policy::{NsNft, PolicyEngine};
use underlay_core::names;
use underlay_core::nft::{AddrMatch, Chain, ChainType, Hook, Rule, Ruleset, Verdict};
use underlay_core::policy::{
    Cluster, LabelSelector, LocalPod, Namespace, NetworkPolicy, Peer, Pod, PolicyPort, PolicyRule,
    PolicyType, PortRef,
};
use underlay_core::veth_names::host_veth_name;
use underlay_dataplane::testns::TestNs;

const PREFIX: &str = "agpol";
const SHORT: Duration = Duration::from_millis(700);

fn sh(ns: &TestNs, args: &[&str]) {
    let out = ns.command(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct PodNs {
    name: String,
    ip: Ipv4Addr,
    veth: String,
    ns: TestNs,
}

/// A pod namespace whose `eth0` (address `ip`/32, default route on-link) is a veth to `node`'s `veth`.
fn attach(node: &TestNs, name: &str, ip: &str) -> PodNs {
    let ns = TestNs::new(PREFIX).unwrap();
    let veth = host_veth_name(&format!("container-{name}"), "eth0");
    let path = ns.path();
    sh(
        node,
        &[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &path,
        ],
    );
    sh(node, &["ip", "link", "set", &veth, "up"]);
    sh(
        node,
        &[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{veth}.proxy_arp=1"),
        ],
    );
    sh(
        node,
        &["ip", "route", "add", &format!("{ip}/32"), "dev", &veth],
    );
    sh(
        &ns,
        &["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"],
    );
    sh(&ns, &["ip", "link", "set", "eth0", "up"]);
    sh(
        &ns,
        &[
            "ip", "route", "add", "default", "dev", "eth0", "scope", "link",
        ],
    );
    // Packets sent before the pair has carrier are lost: wait for it, bounded.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let out = node
            .command("ip")
            .args(["link", "show", "dev", &veth])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("state UP") {
            break;
        }
        assert!(Instant::now() < end, "{veth} never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    PodNs {
        name: name.into(),
        ip: ip.parse().unwrap(),
        veth,
        ns,
    }
}

fn local(p: &PodNs) -> LocalPod {
    LocalPod {
        namespace: "x".into(),
        name: p.name.clone(),
        ifname: p.veth.clone(),
        ip: p.ip,
    }
}

fn pod(name: &str, ip: &str, role: &str) -> Pod {
    Pod {
        namespace: "x".into(),
        name: name.into(),
        labels: [
            ("pod".to_string(), name.to_string()),
            ("role".to_string(), role.to_string()),
        ]
        .into(),
        ip: Some(ip.parse().unwrap()),
        node: "n1".into(),
        host_network: false,
        named_ports: vec![],
    }
}

fn tcp(port: i32) -> PolicyPort {
    PolicyPort {
        protocol: None,
        port: Some(PortRef::Number(port)),
        end_port: None,
    }
}

/// `a` admits TCP 80 from pods with role=client; `d` may send nothing.
fn policies() -> Vec<NetworkPolicy> {
    vec![
        NetworkPolicy {
            namespace: "x".into(),
            name: "a-from-clients".into(),
            pod_selector: LabelSelector::labels([("pod", "a")]),
            policy_types: vec![],
            ingress: vec![PolicyRule {
                peers: vec![Peer {
                    pod_selector: Some(LabelSelector::labels([("role", "client")])),
                    ..Peer::default()
                }],
                ports: vec![tcp(80)],
            }],
            egress: vec![],
        },
        NetworkPolicy {
            namespace: "x".into(),
            name: "d-no-egress".into(),
            pod_selector: LabelSelector::labels([("pod", "d")]),
            policy_types: vec![PolicyType::Egress],
            ingress: vec![],
            egress: vec![],
        },
    ]
}

fn cluster(b_role: &str, with_policies: bool) -> Cluster {
    Cluster {
        namespaces: vec![Namespace {
            name: "x".into(),
            labels: Default::default(),
        }],
        pods: vec![
            pod("a", "100.64.0.1", "server"),
            pod("b", "100.64.0.2", b_role),
            pod("c", "100.64.0.3", "other"),
            pod("d", "100.64.0.4", "client"),
            pod("e", "100.64.0.5", "client"),
        ],
        policies: if with_policies { policies() } else { vec![] },
        nodes: vec![],
    }
}

/// A TCP echo server in `p` on `port`, accepting for at most 60 s.
fn echo_server(p: &PodNs, port: u16) {
    let addr = SocketAddr::from((p.ip, port));
    let l =
        p.ns.netns()
            .run(move || Ok(TcpListener::bind(addr)))
            .unwrap()
            .unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    std::thread::spawn(move || {
                        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                        let mut buf = [0u8; 64];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
}

/// A connection expected to succeed: retried for up to 3 s (the first SYN may wait for ARP).
fn connect_allowed(from: &PodNs, to: Ipv4Addr, port: u16) -> Option<TcpStream> {
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(s) = connect(from, to, port) {
            return Some(s);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn connect(from: &PodNs, to: Ipv4Addr, port: u16) -> Option<TcpStream> {
    let addr = SocketAddr::from((to, port));
    from.ns
        .netns()
        .run(move || Ok(TcpStream::connect_timeout(&addr, SHORT)))
        .unwrap()
        .ok()
}

/// Sends one byte and waits for its echo (the reply direction).
fn round_trip(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(SHORT)).unwrap();
    let mut b = [0u8; 1];
    s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok()
}

fn udp_receiver(p: &PodNs, port: u16) -> UdpSocket {
    let addr = SocketAddr::from((p.ip, port));
    let s =
        p.ns.netns()
            .run(move || Ok(UdpSocket::bind(addr)))
            .unwrap()
            .unwrap();
    s.set_read_timeout(Some(SHORT)).unwrap();
    s
}

fn received(s: &UdpSocket) -> usize {
    let mut n = 0;
    let mut buf = [0u8; 64];
    while s.recv(&mut buf).is_ok() {
        n += 1;
    }
    n
}

fn udp_send(from: &PodNs, to: Ipv4Addr, port: u16, count: usize) {
    let dst = SocketAddr::from((to, port));
    let s = from
        .ns
        .netns()
        .run(|| Ok(UdpSocket::bind("0.0.0.0:0")))
        .unwrap()
        .unwrap();
    for _ in 0..count {
        let _ = s.send_to(b"p", dst);
    }
}

/// Packets that took the established-connection shortcut (the counter of `pol_established`'s rule).
fn shortcut_packets(node: &TestNs) -> u64 {
    let out = node
        .command("nft")
        .args(["-j", "list", "chain", "inet", "underlay", "pol_established"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("rule"))
        .flat_map(|r| r["expr"].as_array().unwrap().clone())
        .filter_map(|e| e.get("counter").and_then(|c| c["packets"].as_u64()))
        .sum()
}

#[test]
fn policy_is_enforced_on_real_packets_from_the_first_one() {
    underlay_dataplane::testns::sweep(PREFIX);
    let node = TestNs::new(PREFIX).unwrap();
    sh(&node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    // The node's own address: the source of its ARP requests to pods.
    sh(&node, &["ip", "addr", "add", "198.18.0.10/32", "dev", "lo"]);
    let (a, b, c) = (
        attach(&node, "a", "100.64.0.1"),
        attach(&node, "b", "100.64.0.2"),
        attach(&node, "c", "100.64.0.3"),
    );
    echo_server(&a, 80);
    echo_server(&a, 81);

    let engine = PolicyEngine::new(Box::new(NsNft::new(node.path())));
    for p in [&a, &b, &c] {
        engine.restore([((format!("container-{}", p.name), "eth0".into()), local(p))]);
    }
    // No policy: everyone reaches a.
    engine.set_inputs(cluster("client", false)).unwrap();
    let mut open = connect_allowed(&c, a.ip, 80).expect("unselected pod reachable");
    assert!(round_trip(&mut open), "unselected pod reachable");

    // A policy now selects a: c's connection, stamped while nothing selected a, stops at its next packet.
    engine.set_inputs(cluster("client", true)).unwrap();
    assert!(
        !round_trip(&mut open),
        "a connection to a newly selected pod is evaluated again"
    );
    let mut kept = connect_allowed(&b, a.ip, 80).expect("b is a client: allowed");
    assert!(
        round_trip(&mut kept),
        "replies of an allowed connection pass"
    );
    // Its later packets skip the policy chains: the connection carries the generation that let it through.
    let before = shortcut_packets(&node);
    for _ in 0..5 {
        assert!(round_trip(&mut kept));
    }
    assert!(
        shortcut_packets(&node) >= before + 5,
        "established packets are not taking the shortcut: {before} -> {}",
        shortcut_packets(&node)
    );
    assert!(connect(&c, a.ip, 80).is_none(), "c is not a client: denied");
    assert!(connect(&b, a.ip, 81).is_none(), "port 81 not allowed");
    let udp_a = udp_receiver(&a, 80);
    udp_send(&b, a.ip, 80, 5);
    assert_eq!(
        received(&udp_a),
        0,
        "UDP 80 not allowed (the rule says TCP)"
    );
    // Egress of a is not isolated: a reaches c.
    echo_server(&c, 80);
    assert!(connect_allowed(&a, c.ip, 80).is_some_and(|mut s| round_trip(&mut s)));

    // b stops being a client: its established connection stops at its next packet.
    engine.set_inputs(cluster("other", true)).unwrap();
    assert!(
        !round_trip(&mut kept),
        "a newly denied established flow must stop"
    );
    assert!(connect(&b, a.ip, 80).is_none());

    // Replacing the base ruleset (what a fingerprint change does), IMDS guard and its set's flush included,
    // keeps every policy object.
    let base = Ruleset {
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
    .with_imds_guard();
    let batch = base.render_with_elements(&Default::default());
    underlay_agent::routed::nft::apply_batch(node.netns().path(), &batch).unwrap();
    underlay_agent::routed::nft::apply_batch(node.netns().path(), &batch).unwrap();
    assert!(
        connect(&c, a.ip, 80).is_none(),
        "still denied after the base ruleset was replaced twice"
    );

    // First packets. d is admitted (as ADD does) before its veth exists, under a policy denying its egress;
    // e, selected by nothing, likewise. Both send the instant their interface is up.
    let udp_c = udp_receiver(&c, 9000);
    // Long enough for the new pod's first ARP (the plugin's permanent neighbour entry is not set up here).
    udp_c
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    engine.set_inputs(cluster("other", true)).unwrap();
    let admit = |name: &str, ip: &str| {
        let veth = host_veth_name(&format!("container-{name}"), "eth0");
        engine
            .admit(
                (format!("container-{name}"), "eth0".into()),
                LocalPod {
                    namespace: "x".into(),
                    name: name.into(),
                    ifname: veth,
                    ip: ip.parse().unwrap(),
                },
            )
            .unwrap();
    };
    admit("d", "100.64.0.4");
    let d = attach(&node, "d", "100.64.0.4");
    udp_send(&d, c.ip, 9000, 20);
    assert_eq!(
        received(&udp_c),
        0,
        "a denied pod's first packets never arrive"
    );
    admit("e", "100.64.0.5");
    let e = attach(&node, "e", "100.64.0.5");
    udp_send(&e, c.ip, 9000, 20);
    assert!(
        received(&udp_c) > 0,
        "an unselected pod's first packets arrive"
    );

    // The kernel holds what the engine says it committed.
    let listed = node
        .command("nft")
        .args([
            "list",
            "map",
            "inet",
            "underlay",
            names::NFT_MAP_POLICY_EGRESS_IF,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains(&d.veth) && !text.contains(&e.veth), "{text}");
}

/// Every element and rule form the compiler emits is accepted by the kernel, as an install and as diffs in both
/// directions (overlapping ports and ranges, excepts cutting ranges, every-port-of-a-protocol, SCTP, named ports
/// both ways, empty sets, chain and set deletion).
#[test]
fn the_kernel_accepts_every_form_as_install_and_as_diffs() {
    use underlay_core::policy::{IpBlock, NamedPort, Protocol, compile, diff};
    // Its own prefix: the other test sweeps `agpol-` leftovers while this one runs.
    underlay_dataplane::testns::sweep("agpolk");
    let node = TestNs::new("agpolk").unwrap();
    let nft = NsNft::new(node.path());
    use underlay_agent::policy::PolicyNft;
    let port = |proto: Option<&str>, p: Option<PortRef>, end: Option<i32>| PolicyPort {
        protocol: proto.map(String::from),
        port: p,
        end_port: end,
    };
    let rich = |variant: bool| {
        let mut c = cluster(if variant { "other" } else { "client" }, true);
        for p in &mut c.pods {
            p.named_ports = vec![
                NamedPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 8080,
                },
                NamedPort {
                    name: "sig".into(),
                    protocol: Protocol::Sctp,
                    port: 3868,
                },
            ];
        }
        let block = |cidr: &str, except: &[&str]| Peer {
            ip_block: Some(IpBlock {
                cidr: cidr.into(),
                except: except.iter().map(|s| s.to_string()).collect(),
            }),
            ..Peer::default()
        };
        c.policies.push(NetworkPolicy {
            namespace: "x".into(),
            name: "rich".into(),
            pod_selector: LabelSelector::labels([(
                "role",
                if variant { "server" } else { "client" },
            )]),
            policy_types: vec![PolicyType::Ingress, PolicyType::Egress],
            ingress: vec![
                PolicyRule {
                    peers: vec![
                        block("0.0.0.0/0", &["100.64.0.0/10", "203.0.113.7/32"]),
                        block("100.64.0.0/29", &[]),
                    ],
                    ports: vec![
                        tcp(80),
                        port(Some("TCP"), Some(PortRef::Number(50)), Some(90)),
                        port(Some("SCTP"), None, None),
                        port(Some("UDP"), Some(PortRef::Name("http".into())), None),
                        port(Some("SCTP"), Some(PortRef::Name("sig".into())), None),
                        port(Some("ICMP"), None, None),
                    ],
                },
                PolicyRule {
                    peers: vec![block("not-a-cidr", &[])],
                    ports: vec![],
                },
            ],
            egress: vec![
                PolicyRule {
                    peers: vec![Peer {
                        namespace_selector: Some(LabelSelector::everything()),
                        ..Peer::default()
                    }],
                    ports: vec![port(None, Some(PortRef::Name("http".into())), None)],
                },
                PolicyRule {
                    peers: vec![block("203.0.113.0/24", &["203.0.113.128/25"])],
                    ports: vec![],
                },
                PolicyRule {
                    peers: vec![],
                    ports: vec![port(Some("UDP"), Some(PortRef::Number(53)), None)],
                },
            ],
        });
        c
    };
    let locals: Vec<LocalPod> = ["a", "b", "c", "d", "e"]
        .iter()
        .enumerate()
        .map(|(i, n)| LocalPod {
            namespace: "x".into(),
            name: n.to_string(),
            ifname: host_veth_name(&format!("container-{n}"), "eth0"),
            ip: Ipv4Addr::new(100, 64, 0, i as u8 + 1),
        })
        .collect();
    let m1 = compile(&rich(false), &locals).model;
    let m2 = compile(&rich(true), &locals).model;
    let m3 = compile(&cluster("client", false), &locals).model;
    assert!(m1.sets.values().any(|s| !s.elements.is_empty()) && m1 != m2);
    nft.apply(&underlay_core::policy::render_install(
        &m1,
        &nft.existing().unwrap(),
        7,
    ))
    .unwrap();
    assert_eq!(nft.existing().unwrap().generation, Some(7));
    for (a, b) in [(&m1, &m2), (&m2, &m1), (&m1, &m3), (&m3, &m2)] {
        let ops = diff(a, b);
        assert!(!ops.is_empty());
        nft.apply(&underlay_core::policy::render_ops(&ops))
            .unwrap_or_else(|e| panic!("{e}\n{}", underlay_core::policy::render_ops(&ops)));
    }
    // What the kernel holds is m2: reinstalling over it (a restart) works and leaves the same object names.
    let existing = nft.existing().unwrap();
    let want: std::collections::BTreeSet<String> = m2.sets.keys().cloned().collect();
    assert_eq!(existing.sets, want);
    nft.apply(&underlay_core::policy::render_install(&m2, &existing, 8))
        .unwrap();
    assert_eq!(
        nft.existing().unwrap(),
        underlay_core::policy::diff::PolicyObjects {
            generation: Some(8),
            ..existing
        }
    );
}
