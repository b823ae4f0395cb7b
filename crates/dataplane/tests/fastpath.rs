//! Root tests of the tc-BPF fast path, in namespaces this test creates: a node with an uplink to a VPC host
//! and two pods. Whether a packet took the fast path is read from an nft counter on the node's forward hook
//! (the fast path never reaches it; the kernel path always does).
#![cfg(feature = "root-tests")]

use std::net::Ipv4Addr;
use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use underlay_core::names;
use underlay_dataplane::fastpath::{FastPath, Role};
use underlay_dataplane::testns::TestNs;

fn sh(ns: &TestNs, script: &str) -> String {
    let out = ns.command("sh").arg("-ec").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Three UDP round trips from `from` (bound to `src`) to an echo socket on `dst` in `to`; true when all came back.
fn ping_udp(from: &TestNs, src: Ipv4Addr, to: &TestNs, dst: Ipv4Addr) -> bool {
    ping_udp_ports(from, (src, 0), to, (dst, 0))
}

/// [`ping_udp`] between given ports (0: any).
fn ping_udp_ports(from: &TestNs, src: (Ipv4Addr, u16), to: &TestNs, dst: (Ipv4Addr, u16)) -> bool {
    let bind = |ns: &TestNs, a: (Ipv4Addr, u16)| {
        ns.netns()
            .run(move || Ok(UdpSocket::bind(a).unwrap()))
            .unwrap()
    };
    let server = bind(to, dst);
    let client = bind(from, src);
    server
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let to_addr = server.local_addr().unwrap();
    let mut buf = [0u8; 16];
    for i in 0..3u8 {
        if client.send_to(&[i], to_addr).is_err() {
            return false;
        }
        let Ok((_, peer)) = server.recv_from(&mut buf) else {
            return false;
        };
        server.send_to(&buf[..1], peer).unwrap();
        match client.recv_from(&mut buf) {
            Ok((1, _)) if buf[0] == i => {}
            _ => return false,
        }
    }
    true
}

/// Packets the node's netfilter forward hook has seen.
fn forwarded(node: &TestNs) -> u64 {
    let out = sh(node, "nft list chain inet uldpfp fcount");
    let i = out.find("packets ").expect("counter") + "packets ".len();
    out[i..].split_whitespace().next().unwrap().parse().unwrap()
}

struct Topology {
    vpc: TestNs,
    node: TestNs,
    pods: Vec<TestNs>,
}

const POD_A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);
const VPC_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
const INTERNET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

fn topology() -> Topology {
    let vpc = TestNs::new("uldpfp-vpc").unwrap();
    let node = TestNs::new("uldpfp-node").unwrap();
    let pa = TestNs::new("uldpfp-pa").unwrap();
    let pb = TestNs::new("uldpfp-pb").unwrap();
    let ip = |args: String| {
        let st = Command::new("ip")
            .args(args.split_whitespace())
            .status()
            .unwrap();
        assert!(st.success(), "ip {args}");
    };
    ip(format!(
        "link add eth0 netns {} type veth peer name up0 netns {}",
        node.name(),
        vpc.name()
    ));
    sh(
        &vpc,
        "ip addr add 198.18.0.20/24 dev up0; ip link set up0 up; ip route add 100.64.0.0/16 via 198.18.0.10; \
         ip addr add 203.0.113.1/32 dev lo",
    );
    sh(
        &node,
        "ip addr add 198.18.0.10/24 dev eth0; ip link set eth0 up; sysctl -qw net.ipv4.ip_forward=1; \
         ip route add 203.0.113.0/24 via 198.18.0.20; \
         printf 'table inet uldpfp {\n chain fcount {\n type filter hook forward priority 0\n counter\n }\n}\n' | nft -f -",
    );
    for (pod, addr, veth) in [(&pa, POD_A, "ulfpa"), (&pb, POD_B, "ulfpb")] {
        ip(format!(
            "link add {veth} netns {} type veth peer name eth0 netns {}",
            node.name(),
            pod.name()
        ));
        sh(
            &node,
            &format!("ip link set {veth} up; ip route add {addr}/32 dev {veth}"),
        );
        let mac = sh(
            &node,
            &format!("ip -br link show {veth} | awk '{{print $3}}'"),
        );
        sh(
            pod,
            &format!(
                "ip addr add {addr}/32 dev eth0; ip link set eth0 up; ip route add 169.254.1.1 dev eth0; \
                 ip neigh add 169.254.1.1 lladdr {} dev eth0 nud permanent; \
                 ip route add default via 169.254.1.1",
                mac.trim()
            ),
        );
    }
    Topology {
        vpc,
        node,
        pods: vec![pa, pb],
    }
}

fn ifindex(ns: &TestNs, dev: &str) -> u32 {
    let mut nl = ns.netns().netlink().unwrap();
    nl.link_by_name(dev).unwrap().unwrap().index
}

fn filters(ns: &TestNs, dev: &str) -> Vec<String> {
    let i = ifindex(ns, dev);
    ns.netns()
        .netlink()
        .unwrap()
        .tc_ingress_bpf_filters(i)
        .unwrap()
}

#[test]
fn fast_path_skips_the_host_stack_only_for_known_pods_and_inside_destinations() {
    let t = topology();
    let (node, vpc) = (&t.node, &t.vpc);
    let (pa, pb) = (&t.pods[0], &t.pods[1]);
    // The kernel path works before anything is attached, and goes through the forward hook.
    assert!(ping_udp(pa, POD_A, vpc, VPC_HOST) && ping_udp(pa, POD_A, pb, POD_B));
    assert!(forwarded(node) > 0);

    let mut fp = FastPath::load().expect("the kernel accepts the fast path");
    fp.set_inside(&[
        "198.18.0.0/15".parse().unwrap(),
        "100.64.0.0/10".parse().unwrap(),
    ])
    .unwrap();
    fp.set_uplinks(&[ifindex(node, "eth0")]).unwrap();
    fp.attach(node.netns(), "eth0", Role::Uplink).unwrap();
    // Attaching twice replaces: still exactly one filter.
    fp.attach(node.netns(), "eth0", Role::Uplink).unwrap();
    assert_eq!(filters(node, "eth0"), vec![names::FASTPATH_PROG_UPLINK]);
    for veth in ["ulfpa", "ulfpb"] {
        fp.attach(node.netns(), veth, Role::Pod).unwrap();
        fp.attach(node.netns(), veth, Role::Pod).unwrap();
        assert_eq!(filters(node, veth), vec![names::FASTPATH_PROG_POD]);
        let i = ifindex(node, veth);
        let egress = node
            .netns()
            .netlink()
            .unwrap()
            .tc_bpf_filters(i, false)
            .unwrap();
        assert_eq!(egress, vec![names::FASTPATH_PROG_TO_POD]);
    }

    // Attached but no pod in the map: the kernel path, exactly.
    let before = forwarded(node);
    assert!(ping_udp(pa, POD_A, vpc, VPC_HOST));
    assert!(
        forwarded(node) > before,
        "an unknown pod must take the kernel path"
    );
    // Flows the kernel carries now (to B's port 7100, and from B's port 7200) stay with the kernel later.
    assert!(ping_udp_ports(vpc, (VPC_HOST, 0), pb, (POD_B, 7100)));
    assert!(ping_udp_ports(pb, (POD_B, 7200), vpc, (VPC_HOST, 0)));
    assert!(fp.kernel_flows().unwrap() >= 2);

    fp.insert_pod(POD_A, ifindex(node, "ulfpa")).unwrap();
    fp.insert_pod(POD_B, ifindex(node, "ulfpb")).unwrap();
    assert_eq!(fp.pods().unwrap().len(), 2);
    let before = forwarded(node);
    assert!(
        ping_udp(pa, POD_A, vpc, VPC_HOST),
        "pod → VPC and back on the fast path"
    );
    assert!(
        ping_udp(pa, POD_A, pb, POD_B),
        "pod → pod on one node on the fast path"
    );
    assert!(
        ping_udp(vpc, VPC_HOST, pb, POD_B),
        "VPC → pod on the fast path"
    );
    assert_eq!(
        forwarded(node),
        before,
        "no packet may reach the forward hook"
    );

    // The flows the kernel carried before the pods were in the map stay on the kernel path, both ways.
    let before = forwarded(node);
    assert!(ping_udp_ports(vpc, (VPC_HOST, 0), pb, (POD_B, 7100)));
    let mid = forwarded(node);
    assert!(
        mid >= before + 6,
        "a kernel-carried flow to the pod left the kernel: {before} → {mid}"
    );
    assert!(ping_udp_ports(pb, (POD_B, 7200), vpc, (VPC_HOST, 0)));
    assert!(
        forwarded(node) >= mid + 6,
        "a kernel-carried flow from the pod left the kernel"
    );

    // A destination outside the VPC and pod CIDR (the internet, the metadata service) is the kernel's.
    let before = forwarded(node);
    assert!(ping_udp(pa, POD_A, vpc, INTERNET));
    assert!(
        forwarded(node) > before,
        "outside destinations must take the kernel path"
    );

    // A pod taken out of the map (a policy now selects it) is back on the kernel path in both directions.
    fp.remove_pod(POD_B).unwrap();
    fp.remove_pod(POD_B).unwrap();
    let before = forwarded(node);
    assert!(ping_udp(vpc, VPC_HOST, pb, POD_B));
    let after_in = forwarded(node);
    assert!(
        after_in >= before + 6,
        "both directions through the hook: {before} → {after_in}"
    );
    assert!(ping_udp(pa, POD_A, pb, POD_B));
    assert!(forwarded(node) > after_in, "to a removed pod: kernel path");

    // A pod's veth cannot send as another pod: A's address from B's veth is not fast-pathed.
    fp.insert_pod(POD_B, ifindex(node, "ulfpb")).unwrap();
    fp.insert_pod(POD_A, ifindex(node, "ulfpb")).unwrap();
    let before = forwarded(node);
    let _ = ping_udp(pa, POD_A, vpc, VPC_HOST);
    assert!(
        forwarded(node) > before,
        "a source that does not own the veth: kernel path"
    );

    // Detach leaves nothing: no filter, no clsact qdisc, twice.
    for dev in ["eth0", "ulfpa", "ulfpb"] {
        FastPath::detach(node.netns(), dev).unwrap();
        FastPath::detach(node.netns(), dev).unwrap();
        assert!(filters(node, dev).is_empty());
        let i = ifindex(node, dev);
        assert!(
            node.netns()
                .netlink()
                .unwrap()
                .tc_bpf_filters(i, false)
                .unwrap()
                .is_empty()
        );
        assert!(
            !node.netns().netlink().unwrap().has_clsact(i).unwrap(),
            "{dev}: clsact left"
        );
    }
    FastPath::detach(node.netns(), "no-such-dev").unwrap();
    let _ = pb;
}
