//! `eni` mode against a real kernel: a node namespace with two ENI devices (found by MAC) converged twice; a
//! pod address of each ENI leaves by that ENI, through a "VPC" namespace that drops what an ENI sends for an
//! address it does not own (source/dest check on); off-VPC traffic leaves by the primary ENI with the node IP.
//! Needs root (creates network namespaces).
#![cfg(feature = "root-tests")]

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::time::Duration;

use ipnet::IpNet;
use underlay_agent::eni::EniAgent;
use underlay_core::eni::{EniNodeSpec, EniOp, NodeEni, route_table};
use underlay_core::names;
use underlay_dataplane::testns::TestNs;
use underlay_dataplane::{Mac, Netns, VethSpec, format_mac};

const PREFIX: &str = "agen";
const PRIMARY_MAC: Mac = [0x02, 0xe0, 0, 0, 0, 0x01];
const ENI2_MAC: Mac = [0x02, 0xe0, 0, 0, 0, 0x02];
const NODE_IP: &str = "198.18.0.10";
/// Pod addresses: one secondary of the primary ENI, one of the second ENI.
const POD1: &str = "198.18.0.11";
const POD2: &str = "198.18.0.20";
/// The second ENI's own primary IP (the agent puts it on eth1).
const ENI2_PRIMARY: &str = "198.18.0.30";
/// An address of the node's subnet the node does not own (only routed, never sent to).
const SAME_SUBNET: &str = "198.18.0.50";
const VPC_HOST: &str = "198.18.1.5";
const INTERNET_HOST: &str = "203.0.113.10";
const ECHO_PORT: u16 = 7101;

fn ip(a: &str) -> Ipv4Addr {
    a.parse().unwrap()
}

fn run(mut c: Command) -> String {
    let out = c.output().expect("spawn");
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sh(ns: &TestNs, program: &str, args: &[&str]) -> String {
    let mut c = ns.command(program);
    c.args(args);
    run(c)
}

fn spec() -> EniNodeSpec {
    EniNodeSpec {
        node: "node-a".into(),
        node_ip: ip(NODE_IP),
        vpc_cidrs: vec!["198.18.0.0/15".parse().unwrap()],
        external_snat: false,
        mtu: 9001,
        enis: vec![
            NodeEni {
                id: "eni-primary".into(),
                device_index: 0,
                mac: format_mac(&PRIMARY_MAC),
                subnet_cidr: "198.18.0.0/24".parse().unwrap(),
                primary_ip: Some(ip(NODE_IP)),
                addresses: vec![ip(POD1)],
                prefixes: vec![],
            },
            NodeEni {
                id: "eni-second".into(),
                device_index: 1,
                mac: format_mac(&ENI2_MAC),
                subnet_cidr: "198.18.0.0/24".parse().unwrap(),
                primary_ip: Some(ip(ENI2_PRIMARY)),
                addresses: vec![ip(POD2)],
                prefixes: vec![],
            },
        ],
    }
}

/// The namespaces of one test: node, VPC fabric, a VPC host, an internet host, two pods.
struct World {
    node: TestNs,
    vpc: TestNs,
    host: TestNs,
    inet: TestNs,
    pod1: TestNs,
    pod2: TestNs,
}

fn veth(a: &TestNs, name: &str, b: &TestNs, peer: &str, mac: Option<Mac>) {
    let mut nl = a.netns().netlink().unwrap();
    nl.veth_add(&VethSpec {
        name,
        peer_name: peer,
        peer_netns: Some(b.netns()),
        mtu: None,
        mac,
        peer_mac: None,
        up: false,
    })
    .unwrap();
    let mut pl = b.netns().netlink().unwrap();
    let p = pl.link_by_name(peer).unwrap().unwrap();
    pl.link_set_up(p.index, true).unwrap();
}

fn mac_of(ns: &TestNs, dev: &str) -> String {
    let l = ns
        .netns()
        .netlink()
        .unwrap()
        .link_by_name(dev)
        .unwrap()
        .unwrap();
    format_mac(&l.mac.unwrap())
}

impl World {
    fn new() -> World {
        let w = World {
            node: TestNs::new(PREFIX).unwrap(),
            vpc: TestNs::new(PREFIX).unwrap(),
            host: TestNs::new(PREFIX).unwrap(),
            inet: TestNs::new(PREFIX).unwrap(),
            pod1: TestNs::new(PREFIX).unwrap(),
            pod2: TestNs::new(PREFIX).unwrap(),
        };
        // Node: the primary ENI (eth0, up, node IP, default route: the host's own setup) and a second ENI
        // (eth1: down, no address, default MTU — the agent brings it up).
        veth(&w.node, "eth0", &w.vpc, "e0", Some(PRIMARY_MAC));
        veth(&w.node, "eth1", &w.vpc, "e1", Some(ENI2_MAC));
        sh(&w.node, "ip", &["link", "set", "eth0", "up"]);
        sh(
            &w.node,
            "ip",
            &["addr", "add", "198.18.0.10/24", "dev", "eth0"],
        );
        sh(
            &w.node,
            "ip",
            &[
                "route",
                "add",
                "default",
                "via",
                "198.18.0.1",
                "dev",
                "eth0",
            ],
        );
        // VPC: the subnet router answers ARP for 198.18.0.1 on both ENI wires; every ENI-owned address has a
        // /32 route and a permanent neighbour to the ENI that owns it (delivery by ownership).
        sh(&w.vpc, "ip", &["addr", "add", "198.18.0.1/32", "dev", "lo"]);
        for (addr, dev, mac) in [
            (NODE_IP, "e0", PRIMARY_MAC),
            (POD1, "e0", PRIMARY_MAC),
            (POD2, "e1", ENI2_MAC),
            (ENI2_PRIMARY, "e1", ENI2_MAC),
        ] {
            sh(
                &w.vpc,
                "ip",
                &["route", "add", &format!("{addr}/32"), "dev", dev],
            );
            sh(
                &w.vpc,
                "ip",
                &[
                    "neigh",
                    "add",
                    addr,
                    "lladdr",
                    &format_mac(&mac),
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ],
            );
        }
        veth(&w.vpc, "h0", &w.host, "eth0", None);
        sh(&w.vpc, "ip", &["link", "set", "h0", "up"]);
        sh(&w.vpc, "ip", &["addr", "add", "198.18.1.1/24", "dev", "h0"]);
        sh(
            &w.host,
            "ip",
            &["addr", "add", "198.18.1.5/24", "dev", "eth0"],
        );
        sh(
            &w.host,
            "ip",
            &["route", "add", "default", "via", "198.18.1.1"],
        );
        veth(&w.vpc, "i0", &w.inet, "eth0", None);
        sh(&w.vpc, "ip", &["link", "set", "i0", "up"]);
        sh(
            &w.vpc,
            "ip",
            &["addr", "add", "203.0.113.1/24", "dev", "i0"],
        );
        sh(
            &w.inet,
            "ip",
            &["addr", "add", "203.0.113.10/24", "dev", "eth0"],
        );
        sh(
            &w.inet,
            "ip",
            &["route", "add", "default", "via", "203.0.113.1"],
        );
        w.vpc
            .netns()
            .write_sysctl("net/ipv4/ip_forward", "1")
            .unwrap();
        // Source/dest check on both ENIs, with counters of what each ENI sent from its own pod address.
        let check = format!(
            "table inet srcdst {{
                counter pod1_by_eni1 {{}}
                counter pod2_by_eni2 {{}}
                counter dropped {{}}
                chain pre {{
                    type filter hook prerouting priority -300; policy accept;
                    iifname \"e0\" ip saddr != {{ {NODE_IP}, {POD1} }} counter name \"dropped\" drop
                    iifname \"e1\" ip saddr != {{ {POD2}, {ENI2_PRIMARY} }} counter name \"dropped\" drop
                    iifname \"e0\" ip saddr {POD1} counter name \"pod1_by_eni1\"
                    iifname \"e1\" ip saddr {POD2} counter name \"pod2_by_eni2\"
                }}
            }}"
        );
        let mut c = w.vpc.command("nft");
        c.args(["-f", "-"]).stdin(std::process::Stdio::piped());
        let mut child = c.stdout(std::process::Stdio::null()).spawn().expect("nft");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(check.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
        // Pods, wired as underlay-cni wires them: a /32, a default route via 169.254.1.1 with a permanent
        // neighbour, a host route and permanent neighbour on the node.
        for (pod, addr, host_dev) in [(&w.pod1, POD1, "vp1"), (&w.pod2, POD2, "vp2")] {
            veth(&w.node, host_dev, pod, "eth0", None);
            sh(&w.node, "ip", &["link", "set", host_dev, "up"]);
            let host_mac = mac_of(&w.node, host_dev);
            let pod_mac = mac_of(pod, "eth0");
            sh(
                pod,
                "ip",
                &["addr", "add", &format!("{addr}/32"), "dev", "eth0"],
            );
            sh(
                pod,
                "ip",
                &[
                    "neigh",
                    "add",
                    "169.254.1.1",
                    "lladdr",
                    &host_mac,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ],
            );
            sh(
                pod,
                "ip",
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    "169.254.1.1",
                    "dev",
                    "eth0",
                    "onlink",
                ],
            );
            sh(
                &w.node,
                "ip",
                &["route", "add", &format!("{addr}/32"), "dev", host_dev],
            );
            sh(
                &w.node,
                "ip",
                &[
                    "neigh",
                    "add",
                    addr,
                    "lladdr",
                    &pod_mac,
                    "dev",
                    host_dev,
                    "nud",
                    "permanent",
                ],
            );
        }
        w
    }

    /// The pod rules underlay-cni installs for a pod address of ENI `device_index`.
    fn pod_rules(&self, addr: &str, device_index: u32) {
        let to = names::RULE_PRIORITY_TO_POD.to_string();
        let from = names::RULE_PRIORITY_FROM_POD.to_string();
        let table = route_table(device_index).to_string();
        sh(
            &self.node,
            "ip",
            &["rule", "add", "to", addr, "lookup", "main", "pref", &to],
        );
        sh(
            &self.node,
            "ip",
            &["rule", "add", "from", addr, "lookup", &table, "pref", &from],
        );
    }

    fn counter(&self, name: &str) -> u64 {
        let out = sh(
            &self.vpc,
            "nft",
            &["list", "counter", "inet", "srcdst", name],
        );
        let packets = out
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .unwrap_or_else(|| panic!("no packet count in {out}"));
        packets.parse().unwrap()
    }
}

/// Sends one UDP datagram from `src` in `client` to `dst` in `server` (echo server bound there) and waits for the
/// echo; returns the source address the server saw, `None` when no echo came back. Bounded: 3 attempts of 1 s.
fn udp_probe(client: &Netns, src: Ipv4Addr, server: &Netns, dst: Ipv4Addr) -> Option<Ipv4Addr> {
    let srv: UdpSocket = server
        .run(move || Ok(UdpSocket::bind(SocketAddrV4::new(dst, ECHO_PORT))))
        .unwrap()
        .unwrap();
    srv.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
    let cli: UdpSocket = client
        .run(move || Ok(UdpSocket::bind(SocketAddrV4::new(src, 0))))
        .unwrap()
        .unwrap();
    cli.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        let mut seen = None;
        for _ in 0..3 {
            match srv.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let _ = srv.send_to(&buf[..n], from);
                    if let std::net::SocketAddr::V4(a) = from {
                        seen = Some(*a.ip());
                    }
                }
                Err(_) => break,
            }
        }
        seen
    });
    let mut echoed = false;
    for _ in 0..3 {
        cli.send_to(b"underlay", SocketAddrV4::new(dst, ECHO_PORT))
            .unwrap();
        let mut buf = [0u8; 16];
        if cli.recv_from(&mut buf).is_ok() {
            echoed = true;
            break;
        }
    }
    drop(cli);
    let seen = server.join().unwrap();
    echoed.then_some(seen).flatten()
}

#[test]
fn each_pod_address_leaves_by_its_own_eni_and_off_vpc_traffic_is_snated() {
    let w = World::new();
    let agent = EniAgent::new(Netns::named(w.node.name()).unwrap());

    // Before converging, ENI 2's pod has no way out: eth1 is down and nothing routes by it.
    w.pod_rules(POD1, 0);
    w.pod_rules(POD2, 1);
    assert_eq!(
        udp_probe(w.pod2.netns(), ip(POD2), w.host.netns(), ip(VPC_HOST)),
        None
    );

    let first = agent.converge(&spec()).unwrap();
    assert_eq!(first.devices["eni-primary"], "eth0");
    assert_eq!(first.devices["eni-second"], "eth1");
    assert!(first.missing.is_empty());
    assert!(first.ops.contains(&EniOp::LinkUp { dev: "eth1".into() }));
    assert!(first.ops.contains(&EniOp::AddAddress {
        dev: "eth1".into(),
        address: format!("{ENI2_PRIMARY}/24").parse().unwrap()
    }));
    let second = agent.converge(&spec()).unwrap();
    assert_eq!(second.ops, vec![], "second converge planned work");

    // The second ENI is up with the record's MTU; the primary interface is as the host left it.
    let mut nl = w.node.netns().netlink().unwrap();
    let eth1 = nl.link_by_name("eth1").unwrap().unwrap();
    assert!(eth1.up);
    assert_eq!(eth1.mtu, 9001);
    let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
    assert_eq!(eth0.mtu, 1500);
    let v4 = |addrs: Vec<IpNet>| -> Vec<IpNet> {
        addrs
            .into_iter()
            .filter(|a| matches!(a, IpNet::V4(_)))
            .collect()
    };
    assert_eq!(
        v4(nl.addrs(eth0.index).unwrap()),
        vec!["198.18.0.10/24".parse::<IpNet>().unwrap()]
    );
    // The second ENI's device carries that ENI's primary IP with the subnet's length, and nothing else.
    assert_eq!(
        v4(nl.addrs(eth1.index).unwrap()),
        vec![format!("{ENI2_PRIMARY}/24").parse::<IpNet>().unwrap()]
    );
    // ... without a prefix route in `main`: the node's own traffic to its subnet still leaves by the primary
    // interface with the node IP, while a pod of ENI 2 reaches the same subnet by ENI 2 (its table).
    let main = sh(&w.node, "ip", &["-4", "route", "show", "table", "main"]);
    assert!(!main.contains("dev eth1"), "main table: {main}");
    let own = sh(&w.node, "ip", &["-4", "route", "get", SAME_SUBNET]);
    assert!(
        own.contains("dev eth0") && own.contains(&format!("src {NODE_IP}")),
        "{own}"
    );
    let from_pod2 = sh(
        &w.node,
        "ip",
        &[
            "-4",
            "route",
            "get",
            SAME_SUBNET,
            "from",
            POD2,
            "iif",
            "vp2",
        ],
    );
    assert!(from_pod2.contains("dev eth1"), "{from_pod2}");
    let from_pod1 = sh(
        &w.node,
        "ip",
        &[
            "-4",
            "route",
            "get",
            SAME_SUBNET,
            "from",
            POD1,
            "iif",
            "vp1",
        ],
    );
    assert!(from_pod1.contains("dev eth0"), "{from_pod1}");

    // ENI 2's pod reaches the VPC host by ENI 2 with its own address; ENI 1's pod by ENI 1.
    assert_eq!(
        udp_probe(w.pod2.netns(), ip(POD2), w.host.netns(), ip(VPC_HOST)),
        Some(ip(POD2))
    );
    assert!(w.counter("pod2_by_eni2") > 0);
    assert_eq!(
        udp_probe(w.pod1.netns(), ip(POD1), w.host.netns(), ip(VPC_HOST)),
        Some(ip(POD1))
    );
    assert!(w.counter("pod1_by_eni1") > 0);

    // Pod to pod on the node: the `to <pod>` rule keeps it on the node (the VPC never sees it).
    let before = (w.counter("pod1_by_eni1"), w.counter("pod2_by_eni2"));
    assert_eq!(
        udp_probe(w.pod2.netns(), ip(POD2), w.pod1.netns(), ip(POD1)),
        Some(ip(POD2))
    );
    assert_eq!(
        (w.counter("pod1_by_eni1"), w.counter("pod2_by_eni2")),
        before
    );

    // Off the VPC: ENI 2's pod reaches the internet host as the node IP (SNAT), leaving by the primary ENI.
    assert_eq!(
        udp_probe(w.pod2.netns(), ip(POD2), w.inet.netns(), ip(INTERNET_HOST)),
        Some(ip(NODE_IP))
    );
    assert_eq!(
        w.counter("dropped"),
        0,
        "the VPC dropped a packet an ENI does not own"
    );
}

#[test]
fn a_pod_address_sent_by_the_wrong_eni_is_dropped() {
    // The check the first test relies on really bites: a rule naming the wrong table sends ENI 2's pod address
    // out of the primary ENI.
    let w = World::new();
    w.pod_rules(POD2, 0);
    let agent = EniAgent::new(Netns::named(w.node.name()).unwrap());
    agent.converge(&spec()).unwrap();
    assert_eq!(
        udp_probe(w.pod2.netns(), ip(POD2), w.host.netns(), ip(VPC_HOST)),
        None
    );
    assert!(w.counter("dropped") > 0);
}

#[test]
fn external_snat_sends_off_vpc_traffic_by_the_pod_eni_and_stale_tables_are_emptied() {
    let w = World::new();
    w.pod_rules(POD2, 1);
    let agent = EniAgent::new(Netns::named(w.node.name()).unwrap());
    let mut s = spec();
    s.external_snat = true;
    agent.converge(&s).unwrap();
    // No SNAT: the internet host sees the pod address, and it left by ENI 2 (counted there, not dropped).
    let before = w.counter("pod2_by_eni2");
    sh(
        &w.inet,
        "ip",
        &["route", "add", "198.18.0.0/15", "via", "203.0.113.1"],
    );
    assert_eq!(
        udp_probe(w.pod2.netns(), ip(POD2), w.inet.netns(), ip(INTERNET_HOST)),
        Some(ip(POD2))
    );
    assert!(w.counter("pod2_by_eni2") > before);

    // The second ENI leaves the record (detached): its table is emptied, the pod's traffic falls to main.
    let mut s2 = s.clone();
    s2.enis.pop();
    let r = agent.converge(&s2).unwrap();
    assert!(
        r.ops
            .iter()
            .any(|op| matches!(op, EniOp::DelRoute(t) if t.table == route_table(1))),
        "{:?}",
        r.ops
    );
    let mut nl = w.node.netns().netlink().unwrap();
    assert!(nl.routes(route_table(1)).unwrap().is_empty());
    assert_eq!(agent.converge(&s2).unwrap().ops, vec![]);
}
