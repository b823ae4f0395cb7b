//! Routed mode end to end on the lab's VPC: a forwarder converged by the agent carries traffic for a
//! same-subnet peer's pod block (an aggregated VPC route points at the forwarder), replies take the direct
//! path (asymmetric), transit TCP survives a host firewall that drops conntrack-invalid packets only thanks to
//! the notrack rule, and pod traffic to the internet leaves with the node's address. Needs root.
#![cfg(feature = "root-tests")]

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use underlay_agent::routed::{RoutedAgent, nft};
use underlay_cloud::{Cloud, Instance, RouteTarget};
use underlay_core::node::RoutedNodeSpec;
use underlay_core::planner::PeerRoute;
use underlay_dataplane::testns::TestNs;
use underlay_dataplane::{Netns, VethSpec};
use underlay_lab::{Fabric, FabricOptions, INTERNET_HOST};
use underlay_vpcsim::{AddressOrder, RunInstance, VpcSim};

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Up to 3 bounded pings (1 packet, 1 s each) with `program` already aimed at a namespace.
fn reachable(mut ping: impl FnMut() -> std::process::Command, dst: Ipv4Addr) -> bool {
    (0..3).any(|_| {
        ping()
            .args(["ping", "-c", "1", "-W", "1", &dst.to_string()])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn in_ns(ns: &str) -> impl FnMut() -> std::process::Command + '_ {
    move || {
        let mut c = std::process::Command::new("nsenter");
        c.arg(format!("--net=/var/run/netns/{ns}")).arg("busybox");
        c
    }
}

/// Packets counted by one of our nft rules (by id).
fn counter(ns: &Netns, rule_id: &str) -> u64 {
    let json = nft::list_table_json(ns.path()).unwrap().unwrap();
    let prefix = format!("{rule_id}@");
    let rule = json["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("rule"))
        .find(|r| r["comment"].as_str().unwrap_or("").starts_with(&prefix))
        .unwrap()
        .clone();
    rule["expr"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|e| e.get("counter"))
        .unwrap()["packets"]
        .as_u64()
        .unwrap()
}

fn spec(me: &Instance, block: &str, peer: &Instance, peer_block: &str) -> RoutedNodeSpec {
    RoutedNodeSpec {
        node: me.id.to_string(),
        subnet: me.subnet.to_string(),
        node_ip: me.private_ip,
        uplink: Some("eth0".into()),
        pod_block: net(block),
        pod_cidr: net("100.64.0.0/10"),
        vpc_cidrs: vec![net("198.18.0.0/16")],
        peer_routes: vec![PeerRoute {
            destination: net(peer_block),
            via: peer.private_ip,
            peer: peer.id.to_string(),
        }],
        mtu: 1500,
    }
}

#[test]
fn a_forwarder_carries_a_peers_block_and_pods_reach_the_internet_through_snat() {
    let rt = rt();
    let sim = VpcSim::builder(11)
        .rate_limits(None)
        .address_order(AddressOrder::Lowest)
        .build();
    let vpc = sim
        .create_vpc(net("198.18.0.0/16"), Default::default())
        .unwrap();
    let s1 = sim
        .create_subnet(&vpc, "us-east-1a", net("198.18.0.0/24"))
        .unwrap();
    let s2 = sim
        .create_subnet(&vpc, "us-east-1b", net("198.18.1.0/24"))
        .unwrap();
    let main = sim.main_route_table(&vpc).unwrap();
    let lab = format!("ar{:03x}", std::process::id() % 4096);
    let mut fabric = Fabric::build(&lab, &sim, FabricOptions { internet: true }).unwrap();
    let a = sim.run_instance(RunInstance::new("m5.large", &s1)).unwrap();
    let b = sim.run_instance(RunInstance::new("m5.large", &s1)).unwrap();
    let c = sim.run_instance(RunInstance::new("m5.large", &s2)).unwrap();
    // The subnet's aggregate points at A only (A forwards for B); check off on both nodes.
    let eni = |i: &Instance| i.primary_eni().unwrap().id.clone();
    rt.block_on(sim.create_route(
        &main,
        net("100.64.0.0/25"),
        &RouteTarget::NetworkInterface(eni(&a)),
    ))
    .unwrap();
    let igw = sim.create_internet_gateway(&vpc).unwrap();
    sim.add_route(&main, net("0.0.0.0/0"), &RouteTarget::Gateway(igw))
        .unwrap();
    for i in [&a, &b] {
        rt.block_on(sim.set_source_dest_check(&eni(i), false))
            .unwrap();
    }
    fabric.catch_up().unwrap();
    let ns_of = |i: &Instance| fabric.instance_netns(&i.id).unwrap().to_owned();
    let (ns_a, ns_b, ns_c) = (ns_of(&a), ns_of(&b), ns_of(&c));

    // A pod behind B: 100.64.0.70 in its own namespace, a veth to B, B's side answering as 169.254.1.1.
    let pod = TestNs::new("arpod").unwrap();
    let pod_ip: Ipv4Addr = "100.64.0.70".parse().unwrap();
    let node_b = Netns::named(&ns_b).unwrap();
    let mut nl = node_b.netlink().unwrap();
    nl.veth_add(&VethSpec {
        name: "vpod0",
        peer_name: "eth0",
        peer_netns: Some(pod.netns()),
        mtu: None,
        mac: None,
        peer_mac: None,
        up: true,
    })
    .unwrap();
    let vpod = nl.link_by_name("vpod0").unwrap().unwrap().index;
    nl.addr_add(vpod, "169.254.1.1/32".parse().unwrap())
        .unwrap();
    nl.route_add(&underlay_dataplane::Route::link(
        format!("{pod_ip}/32").parse().unwrap(),
        vpod,
    ))
    .unwrap();
    let mut pl = pod.netns().netlink().unwrap();
    let pe = pl.link_by_name("eth0").unwrap().unwrap().index;
    pl.link_set_up(pe, true).unwrap();
    pl.addr_add(pe, format!("{pod_ip}/32").parse().unwrap())
        .unwrap();
    let gw = std::net::IpAddr::V4("169.254.1.1".parse().unwrap());
    pl.route_add(&underlay_dataplane::Route::via_onlink(
        "0.0.0.0/0".parse().unwrap(),
        gw,
        pe,
    ))
    .unwrap();

    // Before the agents run, A neither forwards nor knows B's block: C cannot reach the pod.
    assert!(
        !reachable(in_ns(&ns_c), pod_ip),
        "reached the pod before converging"
    );

    let agent_a = RoutedAgent::new(Netns::named(&ns_a).unwrap());
    let agent_b = RoutedAgent::new(Netns::named(&ns_b).unwrap());
    let spec_a = spec(&a, "100.64.0.0/26", &b, "100.64.0.64/26");
    let spec_b = spec(&b, "100.64.0.64/26", &a, "100.64.0.0/26");
    agent_a.converge(&spec_a).unwrap();
    agent_b.converge(&spec_b).unwrap();
    assert_eq!(agent_a.converge(&spec_a).unwrap().ops, vec![]);
    assert_eq!(agent_b.converge(&spec_b).unwrap().ops, vec![]);

    // C (other subnet) → VPC route → A → peer route → B → pod; the reply goes B → C directly.
    let transit_before = counter(agent_a.netns(), "transit-notrack");
    assert!(
        reachable(in_ns(&ns_c), pod_ip),
        "C cannot reach the pod through A"
    );
    assert!(
        counter(agent_a.netns(), "transit-notrack") > transit_before,
        "transit through A was not untracked"
    );
    // The pod reaches a VPC address with its own source (no SNAT inside the VPC)…
    let snat_before = counter(agent_b.netns(), "pod-egress-snat");
    assert!(
        reachable(|| pod.command("busybox"), c.private_ip),
        "pod cannot reach C"
    );
    assert_eq!(
        counter(agent_b.netns(), "pod-egress-snat"),
        snat_before,
        "VPC traffic was SNATed"
    );
    // …and the internet with B's (the IGW drops sources no ENI owns, so this only works with SNAT).
    assert!(
        reachable(|| pod.command("busybox"), INTERNET_HOST),
        "pod cannot reach the internet"
    );
    assert!(
        counter(agent_b.netns(), "pod-egress-snat") > snat_before,
        "internet traffic not SNATed"
    );

    // Why notrack: give A a host firewall that drops conntrack-invalid packets (a common host policy). A sees
    // only the client's half of a TCP flow (SYN, then ACK and data, never the SYN-ACK), which conntrack calls
    // invalid: transit TCP through A works only while the transit rule keeps it out of conntrack.
    let ns_c_handle = Netns::named(&ns_c).unwrap();
    nft::apply_batch(
        agent_a.netns().path(),
        "table inet hostfw {\n\tchain forward {\n\t\ttype filter hook forward priority 10; policy accept;\n\t\tct state invalid counter drop\n\t}\n}\n",
    )
    .unwrap();
    assert!(
        tcp_echo(pod.netns(), pod_ip, 7001, &ns_c_handle),
        "TCP through A failed with notrack in place"
    );
    let handle = rule_handle(agent_a.netns(), "transit-notrack");
    nft::nft_in(
        agent_a.netns().path(),
        &[
            "delete",
            "rule",
            "inet",
            "underlay",
            "raw_prerouting",
            "handle",
            &handle.to_string(),
        ],
        None,
    )
    .unwrap();
    assert!(
        !tcp_echo(pod.netns(), pod_ip, 7002, &ns_c_handle),
        "TCP through A worked without notrack: the firewall did not see invalid state"
    );
    let repaired = agent_a.converge(&spec_a).unwrap();
    assert_eq!(repaired.ops.len(), 1, "{:?}", repaired.ops);
    assert!(
        tcp_echo(pod.netns(), pod_ip, 7003, &ns_c_handle),
        "TCP through A failed after the converge restored notrack"
    );

    drop(pod);
    fabric.down().unwrap();
}

/// Handle of one of our nft rules (by id).
fn rule_handle(ns: &Netns, rule_id: &str) -> u64 {
    let json = nft::list_table_json(ns.path()).unwrap().unwrap();
    let prefix = format!("{rule_id}@");
    json["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("rule"))
        .find(|r| r["comment"].as_str().unwrap_or("").starts_with(&prefix))
        .unwrap()["handle"]
        .as_u64()
        .unwrap()
}

/// A TCP connection from `client` to a listener at `ip:port` inside `server`, one 5-byte message echoed back.
/// Every wait is bounded (2 s connect, 3 s per read, 5 s for the accept).
fn tcp_echo(server: &Netns, ip: Ipv4Addr, port: u16, client: &Netns) -> bool {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::{Duration, Instant};
    let addr = SocketAddr::from((ip, port));
    let listener = server
        .run(move || Ok(TcpListener::bind(addr)))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let srv = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                    let mut buf = [0u8; 5];
                    if s.read_exact(&mut buf).is_ok() {
                        let _ = s.write_all(&buf);
                    }
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    let stream = client
        .run(move || Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(2))))
        .unwrap();
    let ok = match stream {
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut buf = [0u8; 5];
            s.write_all(b"hello").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"hello"
        }
        Err(_) => false,
    };
    srv.join().unwrap();
    ok
}
