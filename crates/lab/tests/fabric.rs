//! Root tests: each builds a fabric of its own (lab id from the test's tag and the process id) and removes it
//! on every exit path (the `Fabric` drop guard), then checks nothing with its prefix is left.
#![cfg(feature = "root-tests")]

use std::net::Ipv4Addr;
use std::process::Command;

use ipnet::Ipv4Net;
use underlay_cloud::{AddressRequest, Cloud, EniId, Instance, RouteTableId, RouteTarget, SubnetId};
use underlay_lab::{Fabric, FabricOptions, INTERNET_HOST, LabId, kernel};
use underlay_vpcsim::{AddressOrder, RunInstance, VpcSim};

fn lab_id(tag: &str) -> String {
    format!("{tag}{:03x}", std::process::id() % 4096)
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// A region with two subnets in two zones (main route table), and a fabric for it.
struct World {
    sim: VpcSim,
    main: RouteTableId,
    subnet_a: SubnetId,
    subnet_b: SubnetId,
    fabric: Fabric,
}

impl World {
    fn new(tag: &str, options: FabricOptions) -> World {
        let sim = VpcSim::builder(7)
            .rate_limits(None)
            .address_order(AddressOrder::Lowest)
            .build();
        let vpc = sim
            .create_vpc(net("198.18.0.0/16"), Default::default())
            .unwrap();
        let subnet_a = sim
            .create_subnet(&vpc, "us-east-1a", net("198.18.0.0/24"))
            .unwrap();
        let subnet_b = sim
            .create_subnet(&vpc, "us-east-1b", net("198.18.1.0/24"))
            .unwrap();
        let main = sim.main_route_table(&vpc).unwrap();
        let fabric = Fabric::build(&lab_id(tag), &sim, options).unwrap();
        World {
            sim,
            main,
            subnet_a,
            subnet_b,
            fabric,
        }
    }

    fn launch(&mut self, subnet: &SubnetId) -> Instance {
        let i = self
            .sim
            .run_instance(RunInstance::new("m5.large", subnet))
            .unwrap();
        self.fabric.catch_up().unwrap();
        i
    }

    fn ns(&self, i: &Instance) -> String {
        self.fabric.instance_netns(&i.id).unwrap().to_owned()
    }

    fn sync(&mut self) {
        self.fabric.catch_up().unwrap();
    }

    /// Removes the lab and checks nothing with its prefix is left.
    fn down(self) {
        let lab = self.fabric.lab().clone();
        self.fabric.down().unwrap();
        assert_no_leftovers(&lab);
    }
}

fn assert_no_leftovers(lab: &LabId) {
    assert_eq!(
        kernel::netns_with_prefix(&lab.netns_prefix()),
        Vec::<String>::new()
    );
    // Read-only look at the caller's namespace: no link of the lab ever appears there.
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&out.stdout);
    for line in links.lines() {
        let name = line.split(':').nth(1).unwrap_or("").trim();
        assert!(
            !name.starts_with(&lab.link_prefix()),
            "leftover link {name}"
        );
    }
}

fn eni(i: &Instance) -> EniId {
    i.primary_eni().unwrap().id.clone()
}

/// One bounded ping (1 packet, 1 s) from a namespace, optionally from a given source address.
fn ping(ns: &str, dst: Ipv4Addr, src: Option<Ipv4Addr>) -> bool {
    let mut args = vec!["ping", "-c", "1", "-W", "1"];
    let s;
    if let Some(src) = src {
        s = src.to_string();
        args.extend(["-I", &s]);
    }
    let d = dst.to_string();
    args.push(&d);
    kernel::in_netns(ns, "busybox", &args, None).is_ok()
}

/// Up to 3 pings: reachable if any answers (the first may be spent on ARP).
fn reachable(ns: &str, dst: Ipv4Addr, src: Option<Ipv4Addr>) -> bool {
    (0..3).any(|_| ping(ns, dst, src))
}

fn add_lo(ns: &str, addr: Ipv4Addr) {
    kernel::ip(ns, &["addr", "add", &format!("{addr}/32"), "dev", "lo"]).unwrap();
}

/// Routes of one fabric table, as the kernel lists them.
fn kernel_routes(fabric: &Fabric, table: u32) -> Vec<serde_json::Value> {
    let out = kernel::ip(
        &fabric.fabric_netns(),
        &["-j", "route", "show", "table", &table.to_string()],
    )
    .unwrap();
    serde_json::from_str(&out).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn instances_reach_each_other_within_and_across_subnets() {
    let mut w = World::new("xs", FabricOptions { internet: false });
    let sa = w.subnet_a.clone();
    let sb = w.subnet_b.clone();
    let a = w.launch(&sa);
    let c = w.launch(&sa);
    let b = w.launch(&sb);

    // The ENI's interface carries the ENI's MAC and primary address with the subnet's length.
    let shown = kernel::ip(&w.ns(&a), &["-br", "link", "show", "eth0"]).unwrap();
    assert!(shown.contains(&a.primary_eni().unwrap().mac), "{shown}");
    let addrs = kernel::ip(&w.ns(&a), &["-br", "addr", "show", "eth0"]).unwrap();
    assert!(addrs.contains(&format!("{}/24", a.private_ip)), "{addrs}");

    // Every permanent neighbour survived the later ports joining the bridge (a bridge MAC change would have
    // flushed them).
    let neigh = kernel::ip(
        &w.fabric.fabric_netns(),
        &["neigh", "show", "nud", "permanent"],
    )
    .unwrap();
    assert_eq!(
        neigh.lines().count(),
        w.fabric.spec().neighbours.len(),
        "{neigh}"
    );

    assert!(reachable(&w.ns(&a), b.private_ip, None), "across subnets");
    assert!(reachable(&w.ns(&b), a.private_ip, None), "back");
    assert!(reachable(&w.ns(&a), c.private_ip, None), "same subnet");
    assert!(
        reachable(&w.ns(&a), ip4("198.18.0.1"), None),
        "subnet router"
    );
    // The same-subnet peer's address resolves to its ENI's MAC (the VPC's ARP answer), not the fabric's.
    let neigh = kernel::ip(&w.ns(&a), &["neigh", "show", &c.private_ip.to_string()]).unwrap();
    assert!(neigh.contains(&c.primary_eni().unwrap().mac), "{neigh}");
    // An address nobody owns is not reachable.
    assert!(!ping(&w.ns(&a), ip4("198.18.1.200"), None));
    w.down();
}

#[test]
fn pod_cidr_route_needs_source_dest_check_off() {
    let rt = rt();
    let mut w = World::new("pc", FabricOptions { internet: false });
    let (sa, sb) = (w.subnet_a.clone(), w.subnet_b.clone());
    let a = w.launch(&sa);
    let c = w.launch(&sa);
    let b = w.launch(&sb);
    let pod = ip4("100.64.1.5");
    add_lo(&w.ns(&a), pod);
    rt.block_on(w.sim.create_route(
        &w.main,
        net("100.64.1.0/26"),
        &RouteTarget::NetworkInterface(eni(&a)),
    ))
    .unwrap();
    w.sync();
    assert!(!reachable(&w.ns(&b), pod, None), "delivered with check on");

    rt.block_on(w.sim.set_source_dest_check(&eni(&a), false))
        .unwrap();
    w.sync();
    assert!(reachable(&w.ns(&b), pod, None), "check off");

    // A same-subnet peer routing via A's address reaches a block no VPC route covers: the VPC delivers
    // within a subnet by MAC (what routed mode's same-subnet routes rely on).
    let other = ip4("100.64.2.7");
    add_lo(&w.ns(&a), other);
    kernel::ip(
        &w.ns(&c),
        &[
            "route",
            "add",
            "100.64.2.0/26",
            "via",
            &a.private_ip.to_string(),
        ],
    )
    .unwrap();
    assert!(
        reachable(&w.ns(&c), other, None),
        "via a same-subnet next hop"
    );
    rt.block_on(w.sim.set_source_dest_check(&eni(&a), true))
        .unwrap();
    w.sync();
    assert!(!ping(&w.ns(&c), other, None), "check back on");
    w.down();
}

#[test]
fn secondary_addresses_and_prefixes_follow_assignment() {
    let rt = rt();
    let mut w = World::new("sp", FabricOptions { internet: false });
    let (sa, sb) = (w.subnet_a.clone(), w.subnet_b.clone());
    let a = w.launch(&sa);
    let c = w.launch(&sa);
    let b = w.launch(&sb);
    let secondary = ip4("198.18.0.50");
    add_lo(&w.ns(&a), secondary);
    assert!(!ping(&w.ns(&b), secondary, None), "unassigned");
    rt.block_on(
        w.sim
            .assign_private_ips(&eni(&a), &AddressRequest::Explicit(vec![secondary])),
    )
    .unwrap();
    w.sync();
    assert!(
        reachable(&w.ns(&b), secondary, None),
        "assigned, other subnet"
    );
    assert!(
        reachable(&w.ns(&c), secondary, None),
        "assigned, same subnet"
    );
    rt.block_on(w.sim.unassign_private_ips(&eni(&a), &[secondary]))
        .unwrap();
    w.sync();
    assert!(!ping(&w.ns(&b), secondary, None), "unassigned again");

    let prefix = net("198.18.0.64/28");
    let in_prefix = ip4("198.18.0.70");
    add_lo(&w.ns(&a), in_prefix);
    assert!(!ping(&w.ns(&b), in_prefix, None), "prefix not delegated");
    rt.block_on(
        w.sim
            .assign_prefixes(&eni(&a), &AddressRequest::Explicit(vec![prefix])),
    )
    .unwrap();
    w.sync();
    assert!(
        reachable(&w.ns(&b), in_prefix, None),
        "prefix, other subnet"
    );
    assert!(reachable(&w.ns(&c), in_prefix, None), "prefix, same subnet");
    rt.block_on(w.sim.unassign_prefixes(&eni(&a), &[prefix]))
        .unwrap();
    w.sync();
    assert!(!ping(&w.ns(&b), in_prefix, None), "prefix released");
    w.down();
}

#[test]
fn spoofed_sources_are_dropped_while_the_check_is_on() {
    let rt = rt();
    let mut w = World::new("sf", FabricOptions { internet: false });
    let (sa, sb) = (w.subnet_a.clone(), w.subnet_b.clone());
    let a = w.launch(&sa);
    let b = w.launch(&sb);
    let spoofed = ip4("100.64.9.9");
    add_lo(&w.ns(&b), spoofed);
    // The way back exists, so only the check can stop the packet.
    rt.block_on(w.sim.create_route(
        &w.main,
        net("100.64.9.0/24"),
        &RouteTarget::NetworkInterface(eni(&b)),
    ))
    .unwrap();
    w.sync();
    assert!(
        !reachable(&w.ns(&b), a.private_ip, Some(spoofed)),
        "spoofed"
    );
    let drops = kernel::in_netns(
        &w.fabric.fabric_netns(),
        "nft",
        &["list", "chain", "bridge", "underlay_lab", "prerouting"],
        None,
    )
    .unwrap();
    assert!(
        !drops.contains("packets 0 "),
        "the check counted nothing: {drops}"
    );
    rt.block_on(w.sim.set_source_dest_check(&eni(&b), false))
        .unwrap();
    w.sync();
    assert!(
        reachable(&w.ns(&b), a.private_ip, Some(spoofed)),
        "check off"
    );
    w.down();
}

#[test]
fn route_tables_mirror_the_limit_and_replace_moves_traffic() {
    let rt = rt();
    let mut w = World::new("rl", FabricOptions { internet: false });
    let (sa, sb) = (w.subnet_a.clone(), w.subnet_b.clone());
    let a = w.launch(&sa);
    let b = w.launch(&sa);
    let c = w.launch(&sb);
    w.sim.set_route_limit(&w.main, 3).unwrap();
    for (dst, to) in [
        ("100.64.0.0/26", &a),
        ("100.64.0.64/26", &b),
        ("100.64.0.128/26", &a),
    ] {
        rt.block_on(
            w.sim
                .create_route(&w.main, net(dst), &RouteTarget::NetworkInterface(eni(to))),
        )
        .unwrap();
    }
    let over = rt.block_on(w.sim.create_route(
        &w.main,
        net("100.64.0.192/26"),
        &RouteTarget::NetworkInterface(eni(&b)),
    ));
    assert!(over.unwrap_err().is_limit_exceeded());
    w.sync();
    let table = underlay_lab::names::vpc_table(&w.main);
    let sim_routes = w
        .sim
        .snapshot()
        .route_tables
        .iter()
        .find(|t| t.id == w.main)
        .unwrap()
        .routes
        .len();
    assert_eq!(sim_routes, 4, "local + 3");
    assert_eq!(kernel_routes(&w.fabric, table).len(), sim_routes);
    assert_eq!(w.fabric.spec().table_len(table), sim_routes);

    let pod = ip4("100.64.0.5");
    for i in [&a, &b] {
        rt.block_on(w.sim.set_source_dest_check(&eni(i), false))
            .unwrap();
    }
    add_lo(&w.ns(&a), pod);
    w.sync();
    assert!(reachable(&w.ns(&c), pod, None), "to A");
    rt.block_on(w.sim.replace_route(
        &w.main,
        net("100.64.0.0/26"),
        &RouteTarget::NetworkInterface(eni(&b)),
    ))
    .unwrap();
    w.sync();
    assert!(
        !ping(&w.ns(&c), pod, None),
        "now to B, which does not hold it"
    );
    add_lo(&w.ns(&b), pod);
    assert!(reachable(&w.ns(&c), pod, None), "B holds it");
    assert_eq!(kernel_routes(&w.fabric, table).len(), sim_routes);
    w.down();
}

#[test]
fn internet_gateway_passes_owned_sources_only() {
    let rt = rt();
    let mut w = World::new("ig", FabricOptions { internet: true });
    let sa = w.subnet_a.clone();
    let a = w.launch(&sa);
    assert!(!ping(&w.ns(&a), INTERNET_HOST, None), "no route yet");
    let vpc = w.sim.snapshot().vpcs[0].id.clone();
    let igw = w.sim.create_internet_gateway(&vpc).unwrap();
    w.sim
        .add_route(&w.main, net("0.0.0.0/0"), &RouteTarget::Gateway(igw))
        .unwrap();
    w.sync();
    assert!(reachable(&w.ns(&a), INTERNET_HOST, None), "via the IGW");
    let inet = w.fabric.internet_netns().unwrap();
    assert!(
        reachable(&inet, a.private_ip, None),
        "return traffic to an owned address"
    );

    // A pod address leaving without SNAT: the IGW drops it even with the check off.
    rt.block_on(w.sim.set_source_dest_check(&eni(&a), false))
        .unwrap();
    w.sync();
    let pod = ip4("100.64.3.3");
    add_lo(&w.ns(&a), pod);
    assert!(
        !reachable(&w.ns(&a), INTERNET_HOST, Some(pod)),
        "unowned source"
    );
    w.down();
}

#[test]
fn terminate_removes_the_instance_and_down_removes_everything() {
    let mut w = World::new("td", FabricOptions::default());
    let (sa, sb) = (w.subnet_a.clone(), w.subnet_b.clone());
    let a = w.launch(&sa);
    let b = w.launch(&sb);
    let ns_b = w.ns(&b);
    let port_b = w.fabric.lab().eni_port(&eni(&b));
    assert!(kernel::netns_exists(&ns_b));
    w.sim.terminate_instance(&b.id).unwrap();
    w.sync();
    assert!(!kernel::netns_exists(&ns_b), "instance namespace removed");
    assert!(w.fabric.instance_netns(&b.id).is_none());
    let links = kernel::ip(&w.fabric.fabric_netns(), &["-br", "link", "show"]).unwrap();
    assert!(!links.contains(&port_b), "{links}");
    assert!(!ping(&w.ns(&a), b.private_ip, None));
    w.down();
}

#[test]
fn a_lagged_receiver_resyncs_from_a_snapshot() {
    let rt = rt();
    let mut w = World::new("rs", FabricOptions { internet: false });
    let (sa, sb) = (w.subnet_a.clone(), w.subnet_b.clone());
    let a = w.launch(&sa);
    let b = w.launch(&sb);
    let secondary = ip4("198.18.0.60");
    add_lo(&w.ns(&a), secondary);
    // More changes than the channel holds (65,536): the fabric's receiver lags and misses some.
    rt.block_on(async {
        for _ in 0..33_000 {
            let r = AddressRequest::Explicit(vec![secondary]);
            w.sim.assign_private_ips(&eni(&a), &r).await.unwrap();
            w.sim
                .unassign_private_ips(&eni(&a), &[secondary])
                .await
                .unwrap();
        }
        w.sim
            .assign_private_ips(&eni(&a), &AddressRequest::Explicit(vec![secondary]))
            .await
            .unwrap();
    });
    let c = w.fabric.catch_up().unwrap();
    assert!(c.resynced, "{c:?}");
    assert!(reachable(&w.ns(&b), secondary, None), "converged");
    let sim_seq = w.sim.snapshot().seq;
    assert_eq!(w.fabric.model().seq, sim_seq);
    w.down();
}

#[test]
fn a_second_lab_with_the_same_id_is_refused_and_leaves_the_first_alone() {
    let w = World::new("dup", FabricOptions { internet: false });
    let id = w.fabric.lab().as_str().to_owned();
    let err = Fabric::build(&id, &w.sim, FabricOptions::default()).unwrap_err();
    assert!(matches!(err, underlay_lab::Error::LabExists(..)), "{err}");
    assert!(kernel::netns_exists(&w.fabric.fabric_netns()));
    w.down();
}
