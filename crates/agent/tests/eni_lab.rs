//! `eni` mode end to end on the lab's VPC, source/dest check ON for every ENI: two nodes in two zones, each
//! with a second ENI carrying secondary addresses (and a prefix), created and attached through the `Cloud` port
//! (test setup standing in for the controller). The agents converge; pods of both ENIs reach each other across
//! zones, a VPC host outside the cluster, and the internet (SNAT to the node IP); a pod address sent out of the
//! wrong ENI is dropped by the fabric as AWS drops it. Needs root.
#![cfg(feature = "root-tests")]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;

use ipnet::Ipv4Net;
use underlay_agent::eni::EniAgent;
use underlay_agent::fastpath::NodeFastPath;
use underlay_cloud::{
    AddressRequest, Cloud, CreateEniRequest, EniFilter, Instance, NetworkInterface, RouteTarget,
};
use underlay_core::eni::{EniNodeSpec, NodeEni, route_table};
use underlay_core::names;
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

/// Up to 3 bounded pings (1 packet, 1 s each) from namespace `ns`.
fn reachable(ns: &str, dst: Ipv4Addr) -> bool {
    (0..3).any(|_| {
        Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{ns}"))
            .args(["busybox", "ping", "-c", "1", "-W", "1", &dst.to_string()])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn ip(ns: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip -n {ns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The node's record as the controller writes it: every attached ENI with its secondaries and prefixes.
fn record(rt: &tokio::runtime::Runtime, sim: &VpcSim, node: &Instance) -> EniNodeSpec {
    let enis: Vec<NetworkInterface> = rt
        .block_on(sim.describe_network_interfaces(&EniFilter {
            instance: Some(node.id.clone()),
            ..Default::default()
        }))
        .unwrap();
    let subnets = rt.block_on(sim.describe_subnets(&enis[0].vpc)).unwrap();
    EniNodeSpec {
        node: node.id.to_string(),
        node_ip: node.private_ip,
        vpc_cidrs: vec![net("198.18.0.0/16")],
        external_snat: false,
        mtu: 1500,
        enis: enis
            .iter()
            .map(|e| NodeEni {
                id: e.id.to_string(),
                device_index: e.attachment.as_ref().unwrap().device_index,
                mac: e.mac.clone(),
                subnet_cidr: subnets.iter().find(|s| s.id == e.subnet).unwrap().cidr,
                primary_ip: Some(e.primary_ip),
                addresses: e.secondary_ips.clone(),
                prefixes: e.prefixes.clone(),
            })
            .collect(),
    }
}

/// A pod in its own namespace on `node_ns`, wired as underlay-cni wires it in eni mode (veth, /32, gateway
/// 169.254.1.1, host route, `to`/`from` rules with the ENI's table).
fn pod(node_ns: &str, host_dev: &str, addr: Ipv4Addr, device_index: u32) -> TestNs {
    let pod = TestNs::new("aelpod").unwrap();
    let node = Netns::named(node_ns).unwrap();
    let mut nl = node.netlink().unwrap();
    nl.veth_add(&VethSpec {
        name: host_dev,
        peer_name: "eth0",
        peer_netns: Some(pod.netns()),
        mtu: None,
        mac: None,
        peer_mac: None,
        up: true,
    })
    .unwrap();
    let hv = nl.link_by_name(host_dev).unwrap().unwrap();
    let mut pl = pod.netns().netlink().unwrap();
    let pe = pl.link_by_name("eth0").unwrap().unwrap();
    pl.link_set_up(pe.index, true).unwrap();
    pl.addr_add(pe.index, format!("{addr}/32").parse().unwrap())
        .unwrap();
    pl.neigh_add_permanent(pe.index, "169.254.1.1".parse().unwrap(), hv.mac.unwrap())
        .unwrap();
    pl.route_add(&underlay_dataplane::Route::via_onlink(
        "0.0.0.0/0".parse().unwrap(),
        "169.254.1.1".parse().unwrap(),
        pe.index,
    ))
    .unwrap();
    nl.route_add(&underlay_dataplane::Route::link(
        format!("{addr}/32").parse().unwrap(),
        hv.index,
    ))
    .unwrap();
    nl.neigh_add_permanent(hv.index, addr.into(), pe.mac.unwrap())
        .unwrap();
    let a = addr.to_string();
    ip(
        node_ns,
        &[
            "rule",
            "add",
            "to",
            &a,
            "lookup",
            "main",
            "pref",
            &names::RULE_PRIORITY_TO_POD.to_string(),
        ],
    );
    ip(
        node_ns,
        &[
            "rule",
            "add",
            "from",
            &a,
            "lookup",
            &route_table(device_index).to_string(),
            "pref",
            &names::RULE_PRIORITY_FROM_POD.to_string(),
        ],
    );
    pod
}

#[test]
fn pods_of_every_eni_reach_across_zones_a_vpc_host_and_the_internet_with_source_dest_check_on() {
    let rt = rt();
    let sim = VpcSim::builder(12)
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
    let igw = sim.create_internet_gateway(&vpc).unwrap();
    sim.add_route(&main, net("0.0.0.0/0"), &RouteTarget::Gateway(igw))
        .unwrap();
    let lab = format!("ae{:03x}", std::process::id() % 4096);
    let mut fabric = Fabric::build(&lab, &sim, FabricOptions { internet: true }).unwrap();
    let a = sim.run_instance(RunInstance::new("m5.large", &s1)).unwrap();
    let b = sim.run_instance(RunInstance::new("m5.large", &s2)).unwrap();
    // A VPC host outside the cluster: no agent, no underlay anything.
    let h = sim.run_instance(RunInstance::new("m5.large", &s2)).unwrap();

    // What the controller does for each node: a secondary on the primary ENI, a second ENI with two secondaries
    // (and a /28 prefix on A's), attached as device 1. Source/dest check stays on everywhere.
    for (node, subnet, prefixes) in [(&a, &s1, 1), (&b, &s2, 0)] {
        let primary = node.primary_eni().unwrap().id.clone();
        rt.block_on(sim.assign_private_ips(&primary, &AddressRequest::Count(1)))
            .unwrap();
        let eni = rt
            .block_on(sim.create_network_interface(&CreateEniRequest {
                subnet: subnet.clone(),
                security_groups: vec![],
                description: "pods".into(),
                tags: Default::default(),
                client_token: format!("{}-1", node.id),
                secondary_ip_count: 2,
                prefix_count: prefixes,
            }))
            .unwrap();
        rt.block_on(sim.attach_network_interface(&eni.id, &node.id, 1, true))
            .unwrap();
    }
    fabric.catch_up().unwrap();
    let all: Vec<NetworkInterface> = rt
        .block_on(sim.describe_network_interfaces(&EniFilter::default()))
        .unwrap();
    assert!(
        all.iter().all(|e| e.source_dest_check),
        "check is off somewhere"
    );

    let ns_of = |i: &Instance| fabric.instance_netns(&i.id).unwrap().to_owned();
    let (ns_a, ns_b, ns_h) = (ns_of(&a), ns_of(&b), ns_of(&h));
    let (rec_a, rec_b) = (record(&rt, &sim, &a), record(&rt, &sim, &b));
    let eni =
        |r: &EniNodeSpec, d: u32| r.enis.iter().find(|e| e.device_index == d).unwrap().clone();
    assert_eq!(eni(&rec_a, 1).prefixes.len(), 1);

    let agent_a = EniAgent::new(Netns::named(&ns_a).unwrap());
    let agent_b = EniAgent::new(Netns::named(&ns_b).unwrap());
    for (agent, rec) in [(&agent_a, &rec_a), (&agent_b, &rec_b)] {
        let r = agent.converge(rec).unwrap();
        assert!(r.missing.is_empty(), "{:?}", r.missing);
        assert_eq!(r.devices.len(), 2);
        assert_eq!(agent.converge(rec).unwrap().ops, vec![]);
    }

    // Pods: on A, one of ENI 1 (the prefix's first address) and one of the primary ENI; on B, one of ENI 1.
    let a1_ip = eni(&rec_a, 1).prefixes[0].network();
    let a0_ip = eni(&rec_a, 0).addresses[0];
    let b1_ip = eni(&rec_b, 1).addresses[0];
    let pa1 = pod(&ns_a, "ul000000000a1", a1_ip, 1);
    let pa0 = pod(&ns_a, "ul000000000a0", a0_ip, 0);
    let pb1 = pod(&ns_b, "ul000000000b1", b1_ip, 1);

    // Across zones, both ENIs, both ways; node-local pod to pod; a VPC host outside the cluster both ways.
    assert!(reachable(pa1.name(), b1_ip), "A/eni1 pod → B/eni1 pod");
    assert!(reachable(pb1.name(), a1_ip), "B/eni1 pod → A/eni1 pod");
    assert!(reachable(pa0.name(), b1_ip), "A/eni0 pod → B/eni1 pod");
    assert!(reachable(pb1.name(), a0_ip), "B/eni1 pod → A/eni0 pod");
    assert!(reachable(pa1.name(), a0_ip), "pod → pod on the same node");
    assert!(reachable(pa1.name(), h.private_ip), "pod → VPC host");
    assert!(reachable(&ns_h, b1_ip), "VPC host → pod");
    // The internet: SNAT to the node IP (the IGW drops sources no ENI owns; the fabric drops what an ENI
    // sends for an address it does not own).
    assert!(
        reachable(pa1.name(), INTERNET_HOST),
        "A/eni1 pod → internet"
    );
    assert!(
        reachable(pb1.name(), INTERNET_HOST),
        "B/eni1 pod → internet"
    );

    // The same with the tc-BPF fast path carrying every pod (no policy): its FIB lookup applies the pod's
    // rule, so a pod's packets still leave by the pod's own ENI.
    let vpc_cidrs = vec![net("198.18.0.0/16")];
    let fast: Vec<_> = [&ns_a, &ns_b]
        .iter()
        .map(|ns| {
            let path = format!("/var/run/netns/{ns}");
            let fp = NodeFastPath::start(
                std::path::Path::new(&path),
                vpc_cidrs.clone(),
                &vpc_cidrs,
                false,
            )
            .expect("the kernel runs the fast path");
            fp.reconcile().unwrap();
            fp
        })
        .collect();
    assert_eq!(fast[0].fast_pods(), BTreeSet::from([a0_ip, a1_ip]));
    assert_eq!(fast[1].fast_pods(), BTreeSet::from([b1_ip]));
    assert_eq!(
        fast[0].observe().unwrap().uplinks.len(),
        2,
        "both ENI devices of A"
    );
    assert!(
        reachable(pa1.name(), b1_ip),
        "fast path: A/eni1 pod → B/eni1 pod"
    );
    assert!(
        reachable(pb1.name(), a1_ip),
        "fast path: B/eni1 pod → A/eni1 pod"
    );
    assert!(
        reachable(pa0.name(), b1_ip),
        "fast path: A/eni0 pod → B/eni1 pod"
    );
    assert!(
        reachable(pb1.name(), a0_ip),
        "fast path: B/eni1 pod → A/eni0 pod"
    );
    assert!(
        reachable(pa1.name(), a0_ip),
        "fast path: pod → pod on the same node"
    );
    assert!(
        reachable(pa1.name(), h.private_ip),
        "fast path: pod → VPC host"
    );
    assert!(reachable(&ns_h, b1_ip), "fast path: VPC host → pod");

    // The check bites: ENI 1's pod address sent out of the primary ENI is dropped (on the fast path: the FIB
    // follows the rule to the wrong ENI, and the fabric drops it there).
    ip(
        &ns_a,
        &[
            "rule",
            "add",
            "from",
            &a1_ip.to_string(),
            "lookup",
            &route_table(0).to_string(),
            "pref",
            &(names::RULE_PRIORITY_FROM_POD - 1).to_string(),
        ],
    );
    assert!(
        !reachable(pa1.name(), b1_ip),
        "a pod address leaving by the wrong ENI got through"
    );
    for fp in &fast {
        fp.shutdown();
    }
    drop((pa0, pa1, pb1));
    fabric.down().unwrap();
}
