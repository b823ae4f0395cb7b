//! The IMDS guard against a real kernel, in both modes: a node namespace converged by the agent, a fabric
//! namespace standing for AWS that answers on the metadata addresses (169.254.169.254 and fd00:ec2::254, outside the
//! node, reached over its uplink), and two pods wired as underlay-cni wires them. The node reaches IMDS; a pod does
//! not (IPv4 and IPv6); a pod whose address the agent lets through reaches it, and loses it when withdrawn.
//! Needs root (creates network namespaces).
#![cfg(feature = "root-tests")]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use underlay_agent::eni::EniAgent;
use underlay_agent::imds::ImdsAllowed;
use underlay_agent::routed::RoutedAgent;
use underlay_core::eni::{EniNodeSpec, NodeEni};
use underlay_core::names;
use underlay_core::node::RoutedNodeSpec;
use underlay_dataplane::testns::TestNs;
use underlay_dataplane::{Netns, format_mac};

const PREFIX: &str = "agimds";
const NODE_IP: &str = "198.18.0.10";
const ANSWER: &str = "i-0123456789abcdef0";

fn ip(ns: &TestNs, args: &[&str]) {
    let out = ns.command("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sysctl(ns: &TestNs, kv: &str) {
    let out = ns.command("sysctl").args(["-qw", kv]).output().unwrap();
    assert!(out.status.success(), "sysctl {kv}");
}

/// The metadata responder: HTTP answers with [`ANSWER`] on both IMDS addresses, port 80, in the fabric namespace
/// (and on the fabric's VPC address, to show the pods' other traffic passes).
struct Responder {
    stop: Arc<AtomicBool>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn responder(fab: &Netns) -> Responder {
    let stop = Arc::new(AtomicBool::new(false));
    for addr in ["169.254.169.254:80", "[fd00:ec2::254]:80", "198.18.0.1:80"] {
        let listener = fab.run(|| Ok(TcpListener::bind(addr).unwrap())).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                        let mut buf = [0u8; 512];
                        let _ = s.read(&mut buf);
                        let _ = write!(s, "HTTP/1.0 200 OK\r\n\r\n{ANSWER}");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
    }
    Responder { stop }
}

/// [`try_reach`], retried (bounded: 20 tries) while it fails: a fresh path may first wait for neighbour discovery.
/// A negative answer is a single try, after the same path was shown to work.
fn reaches(ns: &Netns, addr: IpAddr) -> bool {
    (0..20).any(|_| try_reach(ns, addr))
}

/// `GET /latest/meta-data/instance-id` from `ns` to `addr`: true when the responder's answer came back.
fn try_reach(ns: &Netns, addr: IpAddr) -> bool {
    ns.run(move || {
        Ok((|| {
            let mut s =
                TcpStream::connect_timeout(&SocketAddr::new(addr, 80), Duration::from_millis(700))
                    .ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(b"GET /latest/meta-data/instance-id HTTP/1.0\r\n\r\n")
                .ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            Some(text.ends_with(ANSWER))
        })()
        .unwrap_or(false))
    })
    .unwrap()
}

const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));
/// A VPC address the responder also answers on: pods' other traffic.
const FABRIC: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
fn v6() -> IpAddr {
    "fd00:ec2::254".parse().unwrap()
}

/// Node, fabric (IMDS answers there, as on AWS: outside the instance, over its primary interface) and two pods
/// with `pod_ips`, wired as underlay-cni does (host veth, /32 route, the pod's gateway 169.254.1.1 answered by
/// proxy ARP), each with an IPv6 address too so the IPv6 guard is tested on a path that would otherwise work.
struct Lab {
    node: TestNs,
    fab: TestNs,
    pods: Vec<TestNs>,
}

fn lab(pod_ips: [&str; 2]) -> Lab {
    let node = TestNs::new(PREFIX).unwrap();
    let fab = TestNs::new(PREFIX).unwrap();
    ip(
        &node,
        &[
            "link",
            "add",
            "up0",
            "address",
            "02:00:00:00:00:10",
            "type",
            "veth",
            "peer",
            "name",
            "wire0",
            "netns",
            &fab.path(),
        ],
    );
    ip(
        &node,
        &["addr", "add", &format!("{NODE_IP}/24"), "dev", "up0"],
    );
    ip(
        &node,
        &["addr", "add", "fd00:ec2::10/64", "dev", "up0", "nodad"],
    );
    ip(&node, &["link", "set", "up0", "up"]);
    ip(&node, &["route", "add", "default", "via", "198.18.0.1"]);
    ip(&fab, &["addr", "add", "198.18.0.1/24", "dev", "wire0"]);
    ip(&fab, &["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    ip(
        &fab,
        &["addr", "add", "fd00:ec2::254/64", "dev", "wire0", "nodad"],
    );
    ip(&fab, &["link", "set", "wire0", "up"]);
    ip(&fab, &["link", "set", "lo", "up"]);
    // IPv6 is not NATed: the fabric routes the pods' IPv6 range back to the node.
    ip(
        &fab,
        &["-6", "route", "add", "fd00:64::/64", "via", "fd00:ec2::10"],
    );
    sysctl(&node, "net.ipv6.conf.all.forwarding=1");
    let mut pods = vec![];
    for (i, pod_ip) in pod_ips.iter().enumerate() {
        let pod = TestNs::new(PREFIX).unwrap();
        let host = format!("ulimds{i}");
        ip(
            &node,
            &[
                "link",
                "add",
                &host,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &pod.path(),
            ],
        );
        ip(&node, &["link", "set", &host, "up"]);
        sysctl(&node, &format!("net.ipv4.conf.{host}.proxy_arp=1"));
        ip(
            &node,
            &["route", "add", &format!("{pod_ip}/32"), "dev", &host],
        );
        ip(
            &fab,
            &["route", "add", &format!("{pod_ip}/32"), "via", NODE_IP],
        );
        ip(
            &node,
            &["addr", "add", "fd00:64::1/128", "dev", &host, "nodad"],
        );
        ip(
            &node,
            &[
                "-6",
                "route",
                "add",
                &format!("fd00:64::{}/128", i + 2),
                "dev",
                &host,
            ],
        );
        ip(
            &pod,
            &["addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"],
        );
        ip(
            &pod,
            &[
                "addr",
                "add",
                &format!("fd00:64::{}/128", i + 2),
                "dev",
                "eth0",
                "nodad",
            ],
        );
        ip(&pod, &["link", "set", "eth0", "up"]);
        ip(
            &pod,
            &[
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ],
        );
        ip(
            &pod,
            &[
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ],
        );
        ip(&pod, &["-6", "route", "add", "fd00:64::1", "dev", "eth0"]);
        ip(
            &pod,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                "fd00:64::1",
                "dev",
                "eth0",
            ],
        );
        pods.push(pod);
    }
    Lab { node, fab, pods }
}

/// The bar, given a converge of the node: node → IMDS works, pods → IMDS dropped (IPv4 and IPv6), the pod let
/// through reaches it over IPv4 (only it), and loses it again when withdrawn.
fn check(lab: &Lab, pod_ips: [&str; 2], allowed: &ImdsAllowed, converge: &dyn Fn()) {
    let _r = responder(lab.fab.netns());
    let node = lab.node.netns();
    let pods: Vec<&Netns> = lab.pods.iter().map(|p| p.netns()).collect();
    // Without the guard the path works: the test would otherwise prove nothing.
    assert!(
        reaches(pods[1], V4),
        "the pod path to IMDS is broken before the guard"
    );
    assert!(
        reaches(pods[0], V4),
        "the pod path to IMDS is broken before the guard"
    );
    assert!(
        reaches(pods[0], v6()),
        "the pod IPv6 path to IMDS is broken before the guard"
    );

    converge();
    assert!(reaches(node, V4), "the node lost IMDS");
    assert!(reaches(node, v6()), "the node lost IMDS over IPv6");
    for p in &pods {
        assert!(!try_reach(p, V4), "a pod reached IMDS");
        assert!(!try_reach(p, v6()), "a pod reached IMDS over IPv6");
    }
    // Other traffic of the pods still flows (the guard drops IMDS only).
    for p in &pods {
        assert!(reaches(p, FABRIC), "the guard dropped more than IMDS");
    }

    allowed.set([pod_ips[1].parse().unwrap()].into());
    converge();
    assert!(reaches(pods[1], V4), "the opted-in pod does not reach IMDS");
    assert!(!try_reach(pods[0], V4), "the other pod reached IMDS");
    assert!(
        !try_reach(pods[1], v6()),
        "IPv6 IMDS is closed to every pod"
    );
    assert!(reaches(node, V4));

    allowed.set(Default::default());
    converge();
    assert!(
        !try_reach(pods[1], V4),
        "a withdrawn pod still reaches IMDS"
    );
    assert!(reaches(node, V4));
}

#[test]
fn routed_node_reaches_imds_pods_do_not_unless_opted_in() {
    let pod_ips = ["100.64.0.2", "100.64.0.3"];
    let lab = lab(pod_ips);
    let spec = RoutedNodeSpec {
        node: "node-a".into(),
        subnet: "subnet-1".into(),
        node_ip: NODE_IP.parse().unwrap(),
        uplink: Some("up0".into()),
        pod_block: "100.64.0.0/26".parse().unwrap(),
        pod_cidr: "100.64.0.0/10".parse().unwrap(),
        vpc_cidrs: vec!["198.18.0.0/15".parse().unwrap()],
        peer_routes: vec![],
        mtu: 1500,
    };
    let agent = RoutedAgent::new(Netns::named(lab.node.name()).unwrap());
    let allowed = agent.imds_allowed().clone();
    // Forwarding (and the SNAT of pod traffic leaving the VPC) come from the agent's converge; before it the path
    // is checked with forwarding and masquerade set by hand.
    sysctl(&lab.node, "net.ipv4.ip_forward=1");
    let out = lab
        .node
        .command("nft")
        .args(["add table ip agimds; add chain ip agimds nat { type nat hook postrouting priority 100; }; add rule ip agimds nat ip saddr 100.64.0.0/10 oifname up0 masquerade"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let converge = || {
        let _ = lab
            .node
            .command("nft")
            .args(["delete", "table", "ip", "agimds"])
            .output();
        agent.converge(&spec).unwrap();
        // The second converge finds the table as wanted and changes nothing.
        assert!(agent.converge(&spec).unwrap().ops.is_empty());
    };
    check(&lab, pod_ips, &allowed, &converge);
    let table = underlay_agent::routed::nft::nft_in(
        agent.netns().path(),
        &[
            "list",
            "chain",
            names::NFT_FAMILY,
            names::NFT_TABLE,
            names::NFT_CHAIN_IMDS_GUARD,
        ],
        None,
    )
    .unwrap();
    assert!(table.contains("drop"), "{table}");
}

#[test]
fn eni_node_reaches_imds_pods_do_not_unless_opted_in() {
    let pod_ips = ["198.18.0.20", "198.18.0.21"];
    let lab = lab(pod_ips);
    let spec = EniNodeSpec {
        node: "node-a".into(),
        node_ip: NODE_IP.parse().unwrap(),
        vpc_cidrs: vec!["198.18.0.0/15".parse().unwrap()],
        external_snat: false,
        mtu: 1500,
        enis: vec![NodeEni {
            id: "eni-primary".into(),
            device_index: 0,
            mac: format_mac(&[2, 0, 0, 0, 0, 0x10]),
            subnet_cidr: "198.18.0.0/24".parse().unwrap(),
            primary_ip: Some(NODE_IP.parse().unwrap()),
            addresses: pod_ips.iter().map(|a| a.parse().unwrap()).collect(),
            prefixes: vec![],
        }],
    };
    let agent = EniAgent::new(Netns::named(lab.node.name()).unwrap());
    let allowed = agent.imds_allowed().clone();
    sysctl(&lab.node, "net.ipv4.ip_forward=1");
    let out = lab
        .node
        .command("nft")
        .args(["add table ip agimds; add chain ip agimds nat { type nat hook postrouting priority 100; }; add rule ip agimds nat ip saddr 198.18.0.16/28 oifname up0 ip daddr 169.254.0.0/16 masquerade"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let converge = || {
        let _ = lab
            .node
            .command("nft")
            .args(["delete", "table", "ip", "agimds"])
            .output();
        agent.converge(&spec).unwrap();
        assert!(agent.converge(&spec).unwrap().ops.is_empty());
    };
    check(&lab, pod_ips, &allowed, &converge);
}
