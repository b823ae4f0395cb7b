//! A small VPC in vpcsim for controller tests: 3 zones × 2 subnets, one route table per zone with an internet
//! route and a second gateway route standing in for peering, and nodes spread round-robin over the subnets.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use underlay_cloud::{
    Cloud, Operation, RouteTable, RouteTableId, RouteTarget, SubnetId, Tags, VpcId,
};
use underlay_controller::{CloudLanes, ClusterNode, OneLane, RoutedConfig};
use underlay_core::owned::in_pod_cidr;
use underlay_core::planner::RoutedPlan;
use underlay_vpcsim::{RunInstance, VpcSim};

pub const POD_CIDR: &str = "100.64.0.0/16";

pub fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

#[derive(Debug)]
pub struct World {
    pub sim: Arc<VpcSim>,
    pub vpc: VpcId,
    pub subnets: Vec<SubnetId>,
    /// One per zone.
    pub tables: Vec<RouteTableId>,
    pub igw: String,
    /// A second gateway id standing in for a peering connection's target.
    pub peer_gw: String,
    pub nodes: Vec<ClusterNode>,
    pub route_limit: usize,
    next_node: usize,
}

/// `nodes` nodes; every table gets `0.0.0.0/0 → igw` and `10.1.0.0/16 → peer_gw` and the given route limit.
pub fn mk_world(seed: u64, nodes: usize, route_limit: usize) -> World {
    let sim = Arc::new(VpcSim::builder(seed).route_limit(route_limit).build());
    let vpc = sim.create_vpc(net("198.18.0.0/16"), Tags::new()).unwrap();
    let igw = sim.create_internet_gateway(&vpc).unwrap();
    let peer_gw = sim.create_internet_gateway(&vpc).unwrap();
    let mut subnets = Vec::new();
    let mut tables = Vec::new();
    for z in 0..3u8 {
        let zone = format!("us-east-1{}", (b'a' + z) as char);
        let rtb = sim.create_route_table(&vpc, Tags::new()).unwrap();
        sim.add_route(&rtb, net("0.0.0.0/0"), &RouteTarget::Gateway(igw.clone()))
            .unwrap();
        sim.add_route(
            &rtb,
            net("10.1.0.0/16"),
            &RouteTarget::Gateway(peer_gw.clone()),
        )
        .unwrap();
        for s in 0..2u8 {
            let cidr = Ipv4Net::new(Ipv4Addr::new(198, 18, z * 16 + s * 8, 0), 21).unwrap();
            let subnet = sim.create_subnet(&vpc, &zone, cidr).unwrap();
            sim.associate_route_table(&rtb, &subnet).unwrap();
            subnets.push(subnet);
        }
        tables.push(rtb);
    }
    let mut w = World {
        sim,
        vpc,
        subnets,
        tables,
        igw,
        peer_gw,
        nodes: Vec::new(),
        route_limit,
        next_node: 0,
    };
    for _ in 0..nodes {
        w.add_node();
    }
    w
}

impl World {
    /// Launch one more node, in the next subnet round-robin.
    pub fn add_node(&mut self) -> ClusterNode {
        let i = self.next_node;
        self.next_node += 1;
        let subnet = self.subnets[i % self.subnets.len()].clone();
        let inst = self
            .sim
            .run_instance(RunInstance::new("m5.large", &subnet))
            .unwrap();
        let node = ClusterNode {
            name: format!("node-{i:02}"),
            subnet,
            ip: inst.private_ip,
            eni: inst.primary_eni().unwrap().id.clone(),
        };
        self.nodes.push(node.clone());
        node
    }

    pub fn config(&self) -> RoutedConfig {
        let mut c = RoutedConfig::new(self.vpc.clone(), net(POD_CIDR));
        c.route_limit = self.route_limit as u32;
        c
    }

    pub fn cloud(&self) -> Arc<dyn Cloud> {
        self.sim.clone()
    }

    pub fn lanes(&self) -> Arc<dyn CloudLanes> {
        Arc::new(OneLane(self.cloud()))
    }

    pub fn all_healthy(&self) -> BTreeSet<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    pub fn node(&self, name: &str) -> &ClusterNode {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    pub fn table(&self, id: &RouteTableId) -> RouteTable {
        self.sim
            .snapshot()
            .route_tables
            .into_iter()
            .find(|t| &t.id == id)
            .unwrap()
    }

    /// Every non-local route of a table.
    pub fn routes(&self, id: &RouteTableId) -> BTreeMap<Ipv4Net, RouteTarget> {
        self.table(id)
            .routes
            .into_iter()
            .filter(|r| r.target != RouteTarget::Local)
            .map(|r| (r.destination, r.target))
            .collect()
    }

    /// Routes of a table inside the pod CIDR.
    pub fn owned(&self, id: &RouteTableId) -> BTreeMap<Ipv4Net, RouteTarget> {
        self.routes(id)
            .into_iter()
            .filter(|(d, _)| in_pod_cidr(*d, net(POD_CIDR)))
            .collect()
    }

    pub fn foreign(&self, id: &RouteTableId) -> BTreeMap<Ipv4Net, RouteTarget> {
        self.routes(id)
            .into_iter()
            .filter(|(d, _)| !in_pod_cidr(*d, net(POD_CIDR)))
            .collect()
    }
}

/// EC2 mutating calls the simulator has counted since its counters were last reset.
pub fn mutating_calls(sim: &VpcSim) -> u64 {
    let c = sim.counters();
    [
        Operation::CreateRoute,
        Operation::ReplaceRoute,
        Operation::DeleteRoute,
        Operation::ModifyNetworkInterfaceAttribute,
    ]
    .iter()
    .map(|op| c.calls_of(*op))
    .sum()
}

/// Every node's block, looked up by longest-prefix match in every managed table as it is in the simulator, lands
/// on a route inside the pod CIDR whose target is the ENI of a healthy node of the block owner's subnet (the
/// owner itself when healthy and the plan gives it its own route).
pub fn check_covered(w: &World, plan: &RoutedPlan, healthy: &BTreeSet<String>) {
    let eni_owner: BTreeMap<String, &ClusterNode> =
        w.nodes.iter().map(|n| (n.eni.0.clone(), n)).collect();
    for table in &w.tables {
        let owned = w.owned(table);
        for b in &plan.blocks {
            let (dest, target) = owned
                .iter()
                .filter(|(d, _)| d.contains(&b.block))
                .max_by_key(|(d, _)| d.prefix_len())
                .unwrap_or_else(|| panic!("{table}: block {} of {} has no route", b.block, b.node));
            let RouteTarget::NetworkInterface(eni) = target else {
                panic!("{table}: {dest} targets {target:?}, not an ENI");
            };
            let fwd = eni_owner
                .get(&eni.0)
                .unwrap_or_else(|| panic!("{table}: {dest} → {eni} is no node's ENI"));
            assert!(
                healthy.contains(&fwd.name),
                "{table}: {dest} → {} which is not healthy",
                fwd.name
            );
            assert_eq!(
                fwd.subnet.0, b.subnet,
                "{table}: block {} of {} forwarded by {} of another subnet",
                b.block, b.node, fwd.name
            );
        }
    }
}
