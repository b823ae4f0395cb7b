//! The routed-mode route-aggregation planner: which pod block each node gets, which VPC routes every managed route
//! table holds, and which node forwards each of them. Pure: [`plan`] takes a [`Topology`] and the previous
//! [`RoutedPlan`] and returns the next one; [`crate::routeops`] turns a plan into operations on route tables.
//!
//! ```text
//!  pod CIDR ──split──► region per subnet ──► routes (aligned prefixes, longest-prefix match) ──► blocks (one per node)
//!                      100.64.0.0/13          100.64.0.0/16 → eni of node-0007 (105 nodes)       100.64.0.0/26 node-0007
//! ```
//!
//! Algorithm and guarantees: `docs/planner.md`. In short:
//! - Each subnet owns an aligned region of the pod CIDR; all its blocks and routes live there, so every route
//!   covers blocks of one subnet only, and its forwarder is a healthy node of that subnet.
//! - From scratch, the route budget is split over subnets so as to minimise the largest ⌈nodes ÷ routes⌉; a subnet
//!   with `k` routes lays its blocks out in `k` evenly spaced groups of ⌈n/k⌉ or ⌊n/k⌋ blocks, one route each.
//!   With a budget of at least one route per node every node gets its own route (no extra hop).
//! - With a previous plan, blocks never move; a joining node takes its own route while the budget has room, else
//!   the least-loaded route that stays within ⌈n/k⌉ (0 route changes), else grows a route into its empty buddy
//!   (2 changes), else merges two routes (3–4 changes). A forwarder that leaves or fails is replaced on its routes
//!   only; a failed one gets exactly those routes back once it is healthy again ([`VpcRoute::home`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::prefix::{MAX_ORDER, Pfx, Space, ceil_log2};
use crate::topology::{Node, Topology};

/// Why no plan could be made. Every message names the numbers that do not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no managed route table: the topology must list at least one route table")]
    NoRouteTables,
    #[error("duplicate {what} id {id:?}")]
    Duplicate { what: &'static str, id: String },
    #[error("{what} {id:?} refers to unknown subnet {subnet:?}")]
    UnknownSubnet {
        what: &'static str,
        id: String,
        subnet: String,
    },
    #[error("subnet {subnet} is associated with route tables {first} and {second}; AWS allows one")]
    SubnetInTwoTables {
        subnet: String,
        first: String,
        second: String,
    },
    #[error("node {node} has IP {ip}, outside its subnet {subnet} ({cidr})")]
    NodeIpOutsideSubnet {
        node: String,
        ip: Ipv4Addr,
        subnet: String,
        cidr: Ipv4Net,
    },
    #[error(
        "pod CIDR {pod_cidr} overlaps subnet {subnet} ({cidr}); pod addresses must lie outside the VPC's subnets"
    )]
    PodCidrOverlapsSubnet {
        pod_cidr: Ipv4Net,
        subnet: String,
        cidr: Ipv4Net,
    },
    #[error(
        "block size /{block_prefix_len} does not fit pod CIDR {pod_cidr}: it must be at least /{min} and at most /32 \
         (at most 2^24 blocks)"
    )]
    BadBlockSize {
        block_prefix_len: u8,
        pod_cidr: Ipv4Net,
        min: u8,
    },
    #[error(
        "route table {table}: limit {limit} − {foreign} foreign routes − headroom {headroom} leaves no route for pods"
    )]
    NoBudget {
        table: String,
        limit: u32,
        foreign: u32,
        headroom: u32,
    },
    #[error(
        "pod CIDR {pod_cidr} holds {blocks} /{block_prefix_len} blocks but {nodes} nodes need blocks"
    )]
    PodCidrTooSmall {
        pod_cidr: Ipv4Net,
        blocks: u64,
        block_prefix_len: u8,
        nodes: usize,
    },
    #[error(
        "pod CIDR {pod_cidr} holds {blocks} /{block_prefix_len} blocks, but spreading {nodes} nodes over {subnets} \
         subnets with {routes} routes in aligned groups needs {needed}; use a larger pod CIDR or a smaller block"
    )]
    PodCidrFragmented {
        pod_cidr: Ipv4Net,
        blocks: u64,
        block_prefix_len: u8,
        nodes: usize,
        subnets: usize,
        routes: u32,
        needed: u64,
    },
    #[error(
        "budget {budget} < {subnets} subnets with nodes: every subnet needs at least one route"
    )]
    BudgetTooSmall { budget: u32, subnets: usize },
    #[error(
        "subnet {subnet}'s region {region} has no free /{block_prefix_len} block for node {node}"
    )]
    RegionFull {
        subnet: String,
        region: Ipv4Net,
        block_prefix_len: u8,
        node: String,
    },
}

/// Something the plan could not do well, reported next to a plan that is still valid for everything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PlanWarning {
    /// No healthy node in the subnet: its routes keep whatever target the route tables have (no operation is
    /// planned for them) and its pods are unreachable from other subnets until a node recovers.
    #[error(
        "subnet {subnet}: no healthy node among {nodes}; its {routes} routes cannot be forwarded"
    )]
    SubnetUnroutable {
        subnet: String,
        nodes: u32,
        routes: u32,
    },
    /// Nodes in a subnet that no managed route table is associated with: other subnets reach its pods, but its own
    /// pods reach other subnets' pods only if its (unmanaged) table routes the pod CIDR somewhere sensible.
    #[error("subnet {subnet} has {nodes} nodes but is associated with no managed route table")]
    SubnetWithoutRouteTable { subnet: String, nodes: u32 },
    #[error("previous plan ignored: {reason}")]
    PreviousPlanIgnored { reason: String },
    #[error("node {node}: previous block {block} dropped ({reason}); the node gets a new block")]
    BlockReassigned {
        node: String,
        block: Ipv4Net,
        reason: String,
    },
    /// Churn left a forwarder above the balanced share (blocks never move, so only a re-plan from scratch with
    /// drained nodes restores it); joins fill the lightest routes first and so reduce it over time.
    #[error(
        "subnet {subnet}: a forwarder carries {max} nodes, above the balanced ⌈{nodes}/{routes}⌉ = {bound}; joins \
         go to the lightest routes first"
    )]
    AboveBalance {
        subnet: String,
        max: u32,
        nodes: u32,
        routes: u32,
        bound: u32,
    },
}

/// Whether every node has a route of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanMode {
    /// One route per node (kubenet-like, no extra hop).
    PerNode,
    /// Some routes cover several nodes and reach them through a forwarder.
    Aggregated,
}

/// Route-table usage of one managed table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableUsage {
    pub id: String,
    pub route_limit: u32,
    pub foreign_routes: u32,
    pub underlay_routes: u32,
    pub free: u32,
}

/// Per-subnet figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetPlan {
    pub id: String,
    pub zone: String,
    /// The aligned part of the pod CIDR holding this subnet's blocks and routes.
    pub region: Option<Ipv4Net>,
    pub route_table: Option<String>,
    pub nodes: u32,
    pub healthy_nodes: u32,
    pub routes: u32,
    pub forwarders: u32,
    pub max_nodes_per_forwarder: u32,
    /// ⌈nodes ÷ routes⌉: what a perfectly balanced plan would put on its busiest forwarder.
    pub balanced_bound: u32,
    pub extra_hop_nodes: u32,
}

/// One VPC route, identical in every managed table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpcRoute {
    pub destination: Ipv4Net,
    pub subnet: String,
    pub zone: String,
    /// Forwarder node; `None` when its subnet has no healthy node (see [`PlanWarning::SubnetUnroutable`]).
    pub forwarder: Option<String>,
    /// Target of the route: the forwarder's primary ENI.
    pub eni: Option<String>,
    pub forwarder_ip: Option<Ipv4Addr>,
    /// Node blocks whose longest-prefix match is this route.
    pub nodes: u32,
    /// The forwarder's own block is among them.
    pub forwarder_inside: bool,
    /// The forwarder this route was moved off because it failed: the route returns to it once it is healthy again
    /// (the health tracker's hold-down keeps a flapping node unhealthy). `None` while the route is on its home.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
}

/// A node's pod block and how the VPC reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockAssignment {
    pub node: String,
    pub subnet: String,
    pub zone: String,
    pub node_ip: Ipv4Addr,
    pub eni: String,
    pub healthy: bool,
    pub block: Ipv4Net,
    /// The VPC route that matches the block (longest prefix).
    pub route: Option<Ipv4Net>,
    /// The node that route targets.
    pub via: Option<String>,
    /// Traffic from other subnets takes one extra hop (through `via`).
    pub extra_hop: bool,
}

/// A route a node installs in its own kernel: a same-subnet peer's block via the peer's IP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRoute {
    pub destination: Ipv4Net,
    pub via: Ipv4Addr,
    pub peer: String,
}

/// The routed-mode plan: data for the controller (VPC routes), the agents (blocks, peer routes) and people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutedPlan {
    pub pod_cidr: Ipv4Net,
    pub block_prefix_len: u8,
    pub mode: PlanMode,
    /// Smallest route limit among the managed tables.
    pub route_limit: u32,
    /// Largest number of foreign routes in a managed table.
    pub foreign_routes: u32,
    pub headroom: u32,
    /// Routes underlay may use in every table: min over tables of limit − foreign − headroom.
    pub budget: u32,
    pub routes_per_table: u32,
    pub nodes: u32,
    pub healthy_nodes: u32,
    pub forwarders: u32,
    pub max_nodes_per_forwarder: u32,
    /// Share of nodes whose block is reached through another node.
    pub extra_hop_fraction: f64,
    pub route_tables: Vec<TableUsage>,
    pub subnets: Vec<SubnetPlan>,
    pub routes: Vec<VpcRoute>,
    pub blocks: Vec<BlockAssignment>,
    pub warnings: Vec<PlanWarning>,
}

impl RoutedPlan {
    /// Every subnet's peer routes (each node of the subnet installs all of them except its own block).
    pub fn peer_routes_by_subnet(&self) -> BTreeMap<&str, Vec<PeerRoute>> {
        let mut out: BTreeMap<&str, Vec<PeerRoute>> = BTreeMap::new();
        for b in &self.blocks {
            out.entry(b.subnet.as_str()).or_default().push(PeerRoute {
                destination: b.block,
                via: b.node_ip,
                peer: b.node.clone(),
            });
        }
        out
    }

    /// The intra-subnet routes `node` installs: every other block of its subnet via that block's node.
    pub fn peer_routes(&self, node: &str) -> Vec<PeerRoute> {
        let Some(me) = self.blocks.iter().find(|b| b.node == node) else {
            return Vec::new();
        };
        self.blocks
            .iter()
            .filter(|b| b.subnet == me.subnet && b.node != me.node)
            .map(|b| PeerRoute {
                destination: b.block,
                via: b.node_ip,
                peer: b.node.clone(),
            })
            .collect()
    }

    pub fn block_of(&self, node: &str) -> Option<Ipv4Net> {
        self.blocks.iter().find(|b| b.node == node).map(|b| b.block)
    }
}

/// Plans `topology`, keeping what `previous` decided wherever it is still valid (blocks never move).
pub fn plan(topology: &Topology, previous: Option<&RoutedPlan>) -> Result<RoutedPlan, PlanError> {
    let mut p = Planner::new(topology)?;
    let mut warnings = Vec::new();
    let previous = match previous {
        Some(prev) if prev.pod_cidr != topology.cluster.pod_cidr => {
            warnings.push(PlanWarning::PreviousPlanIgnored {
                reason: format!(
                    "pod CIDR changed from {} to {}",
                    prev.pod_cidr, topology.cluster.pod_cidr
                ),
            });
            None
        }
        Some(prev) if prev.block_prefix_len != topology.cluster.block_prefix_len => {
            warnings.push(PlanWarning::PreviousPlanIgnored {
                reason: format!(
                    "block size changed from /{} to /{}",
                    prev.block_prefix_len, topology.cluster.block_prefix_len
                ),
            });
            None
        }
        other => other,
    };
    match previous {
        None => p.plan_fresh()?,
        Some(prev) => p.incremental(prev, &mut warnings)?,
    }
    p.assign_targets();
    Ok(p.output(warnings))
}

// ───────────────────────────────────────── internals ─────────────────────────────────────────

/// Who a route targets, and where it returns after a failover.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Target {
    /// Forwarder node index (`None`: to be chosen).
    fwd: Option<usize>,
    /// The failed forwarder the route was moved off (see [`VpcRoute::home`]).
    home: Option<usize>,
}

#[derive(Debug)]
struct SubnetSt {
    id: String,
    zone: String,
    table: Option<String>,
    region: Option<Pfx>,
    /// Node indices, sorted by node id.
    members: Vec<usize>,
    /// slot → node index.
    blocks: BTreeMap<u32, usize>,
    /// prefix → forwarder and home.
    routes: BTreeMap<Pfx, Target>,
    /// prefix → blocks whose longest-prefix match it is.
    loads: BTreeMap<Pfx, u32>,
    /// Destinations of foreign routes inside the pod CIDR (the same for every subnet): no block is placed there.
    reserved: Vec<Pfx>,
}

impl SubnetSt {
    fn lpm(&self, slot: u32) -> Option<Pfx> {
        let region = self.region?;
        (0..=region.order)
            .map(|o| Pfx::of_slot(slot, o))
            .find(|p| self.routes.contains_key(p))
    }
    fn recount(&mut self) {
        let mut loads: BTreeMap<Pfx, u32> = self.routes.keys().map(|p| (*p, 0)).collect();
        for &slot in self.blocks.keys() {
            if let Some(p) = self.lpm(slot) {
                *loads.get_mut(&p).expect("route present") += 1;
            }
        }
        self.loads = loads;
    }
    fn load(&self, p: Pfx) -> u32 {
        self.loads.get(&p).copied().unwrap_or(0)
    }
    fn any_block_in(&self, p: Pfx) -> bool {
        self.blocks.range(p.start..p.end()).next().is_some()
    }
    /// A route lies inside `p` (or equals it).
    fn route_inside(&self, p: Pfx) -> bool {
        self.routes
            .range(
                Pfx {
                    start: p.start,
                    order: 0,
                }..Pfx {
                    start: p.end(),
                    order: 0,
                },
            )
            .any(|(r, _)| r.order <= p.order)
    }
    fn is_empty(&self, p: Pfx) -> bool {
        !self.any_block_in(p) && !self.route_inside(p) && !self.overlaps_reserved(p)
    }
    /// `p` overlaps a foreign route's destination.
    fn overlaps_reserved(&self, p: Pfx) -> bool {
        self.reserved
            .iter()
            .any(|r| r.contains(p) || p.contains(*r))
    }
    /// A block at `slot` would overlap a foreign route's destination.
    fn slot_reserved(&self, slot: u32) -> bool {
        self.overlaps_reserved(Pfx {
            start: slot,
            order: 0,
        })
    }
    /// Largest aligned prefix inside `p` holding no block and no route (lowest address on ties).
    fn largest_empty(&self, p: Pfx) -> Option<Pfx> {
        if self.is_empty(p) {
            return Some(p);
        }
        if p.order == 0 {
            return None;
        }
        let (l, r) = p.children();
        match (self.largest_empty(l), self.largest_empty(r)) {
            (Some(a), Some(b)) => Some(if b.order > a.order { b } else { a }),
            (a, b) => a.or(b),
        }
    }
    /// Lowest free slot whose longest-prefix match is `r`.
    fn free_slot_in(&self, r: Pfx) -> Option<u32> {
        let mut slot = r.start;
        while slot < r.end() {
            if self.blocks.contains_key(&slot) || self.slot_reserved(slot) {
                slot += 1;
                continue;
            }
            match self.lpm(slot) {
                Some(p) if p == r => return Some(slot),
                // A more specific route: skip all of it.
                Some(p) => slot = p.end().max(slot + 1),
                None => slot += 1,
            }
        }
        None
    }
    fn top_level(&self) -> Vec<Pfx> {
        let mut out: Vec<Pfx> = Vec::new();
        for &r in self.routes.keys() {
            if !self.routes.keys().any(|&q| q != r && q.contains(r)) {
                out.push(r);
            }
        }
        out
    }
}

struct Planner<'t> {
    topo: &'t Topology,
    space: Space,
    budget: u32,
    route_limit: u32,
    foreign_max: u32,
    /// Nodes sorted by id.
    nodes: Vec<&'t Node>,
    node_subnet: Vec<usize>,
    node_slot: Vec<Option<u32>>,
    /// Subnets sorted by (zone, id).
    subnets: Vec<SubnetSt>,
    /// Region size (order) each subnet gets when the pod CIDR is split evenly.
    share_order: u8,
    /// Destinations of foreign routes inside the pod CIDR.
    reserved: Vec<Pfx>,
}

impl std::fmt::Debug for Planner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Planner")
            .field("budget", &self.budget)
            .field("subnets", &self.subnets)
            .finish()
    }
}

impl<'t> Planner<'t> {
    fn new(topo: &'t Topology) -> Result<Self, PlanError> {
        let pod = topo.cluster.pod_cidr.trunc();
        let blen = topo.cluster.block_prefix_len;
        let min = pod.prefix_len();
        if blen < min || blen > 32 || blen - min > MAX_ORDER {
            return Err(PlanError::BadBlockSize {
                block_prefix_len: blen,
                pod_cidr: pod,
                min,
            });
        }
        if topo.vpc.route_tables.is_empty() {
            return Err(PlanError::NoRouteTables);
        }
        let mut subnet_ids = BTreeSet::new();
        for s in &topo.vpc.subnets {
            if !subnet_ids.insert(s.id.as_str()) {
                return Err(PlanError::Duplicate {
                    what: "subnet",
                    id: s.id.clone(),
                });
            }
            if s.cidr.contains(&pod.network()) || pod.contains(&s.cidr.network()) {
                return Err(PlanError::PodCidrOverlapsSubnet {
                    pod_cidr: pod,
                    subnet: s.id.clone(),
                    cidr: s.cidr,
                });
            }
        }
        let mut table_of: BTreeMap<&str, &str> = BTreeMap::new();
        let mut table_ids = BTreeSet::new();
        let mut budget = u32::MAX;
        let mut route_limit = u32::MAX;
        let mut foreign_max = 0;
        let mut reserved: Vec<Pfx> = Vec::new();
        for t in &topo.vpc.route_tables {
            if !table_ids.insert(t.id.as_str()) {
                return Err(PlanError::Duplicate {
                    what: "route table",
                    id: t.id.clone(),
                });
            }
            for s in &t.subnets {
                if !subnet_ids.contains(s.as_str()) {
                    return Err(PlanError::UnknownSubnet {
                        what: "route table",
                        id: t.id.clone(),
                        subnet: s.clone(),
                    });
                }
                if let Some(first) = table_of.insert(s, &t.id) {
                    return Err(PlanError::SubnetInTwoTables {
                        subnet: s.clone(),
                        first: first.to_string(),
                        second: t.id.clone(),
                    });
                }
            }
            for f in &t.foreign_routes {
                // A foreign route inside the pod CIDR (another cluster's, a transit gateway's, a secondary CIDR's
                // `local`): its destination is taken, to the block when it is smaller than one.
                if pod.contains(&f.destination) {
                    let at_block = Ipv4Net::new(
                        f.destination.network(),
                        f.destination.prefix_len().min(blen),
                    )
                    .map(|n| n.trunc());
                    if let Some(p) = at_block.ok().and_then(|n| Space::new(pod, blen).pfx(n))
                        && !reserved.contains(&p)
                    {
                        reserved.push(p);
                    }
                }
            }
            let foreign = t.foreign_routes.len() as u32;
            let headroom = topo.cluster.headroom;
            let avail = t
                .route_limit
                .saturating_sub(foreign)
                .saturating_sub(headroom);
            if avail == 0 {
                return Err(PlanError::NoBudget {
                    table: t.id.clone(),
                    limit: t.route_limit,
                    foreign,
                    headroom,
                });
            }
            budget = budget.min(avail);
            route_limit = route_limit.min(t.route_limit);
            foreign_max = foreign_max.max(foreign);
        }

        let mut sorted: Vec<&crate::topology::Subnet> = topo.vpc.subnets.iter().collect();
        sorted.sort_by(|a, b| (&a.zone, &a.id).cmp(&(&b.zone, &b.id)));
        let index: BTreeMap<&str, usize> = sorted
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        let mut subnets: Vec<SubnetSt> = sorted
            .iter()
            .map(|s| SubnetSt {
                id: s.id.clone(),
                zone: s.zone.clone(),
                table: table_of.get(s.id.as_str()).map(|t| t.to_string()),
                region: None,
                members: Vec::new(),
                blocks: BTreeMap::new(),
                routes: BTreeMap::new(),
                loads: BTreeMap::new(),
                reserved: reserved.clone(),
            })
            .collect();

        let mut nodes: Vec<&Node> = topo.nodes.iter().collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let mut node_subnet = Vec::with_capacity(nodes.len());
        for (i, n) in nodes.iter().enumerate() {
            if i > 0 && nodes[i - 1].id == n.id {
                return Err(PlanError::Duplicate {
                    what: "node",
                    id: n.id.clone(),
                });
            }
            let Some(&s) = index.get(n.subnet.as_str()) else {
                return Err(PlanError::UnknownSubnet {
                    what: "node",
                    id: n.id.clone(),
                    subnet: n.subnet.clone(),
                });
            };
            let cidr = sorted[s].cidr;
            if !cidr.contains(&n.ip) {
                return Err(PlanError::NodeIpOutsideSubnet {
                    node: n.id.clone(),
                    ip: n.ip,
                    subnet: n.subnet.clone(),
                    cidr,
                });
            }
            subnets[s].members.push(i);
            node_subnet.push(s);
        }
        let space = Space::new(pod, blen);
        let slots = 1u64 << space.total_order;
        if nodes.len() as u64 > slots {
            return Err(PlanError::PodCidrTooSmall {
                pod_cidr: pod,
                blocks: slots,
                block_prefix_len: blen,
                nodes: nodes.len(),
            });
        }
        let with_nodes = subnets.iter().filter(|s| !s.members.is_empty()).count();
        if (budget as usize) < with_nodes {
            return Err(PlanError::BudgetTooSmall {
                budget,
                subnets: with_nodes,
            });
        }
        let share_order = space
            .total_order
            .saturating_sub(ceil_log2(subnets.len() as u64));
        Ok(Self {
            topo,
            space,
            budget,
            route_limit,
            foreign_max,
            node_slot: vec![None; nodes.len()],
            nodes,
            node_subnet,
            subnets,
            share_order,
            reserved,
        })
    }

    fn total_routes(&self) -> u32 {
        self.subnets.iter().map(|s| s.routes.len() as u32).sum()
    }

    fn fragmented(&self, needed: u64) -> PlanError {
        PlanError::PodCidrFragmented {
            pod_cidr: self.topo.cluster.pod_cidr.trunc(),
            blocks: 1u64 << self.space.total_order,
            block_prefix_len: self.space.block_len,
            nodes: self.nodes.len(),
            subnets: self
                .subnets
                .iter()
                .filter(|s| !s.members.is_empty())
                .count(),
            routes: self.budget,
            needed,
        }
    }

    // ── from scratch ──

    fn plan_fresh(&mut self) -> Result<(), PlanError> {
        let n_total = self.nodes.len() as u64;
        let active: Vec<usize> = (0..self.subnets.len())
            .filter(|&i| !self.subnets[i].members.is_empty())
            .collect();
        // Routes per subnet.
        let mut k: BTreeMap<usize, u64> = BTreeMap::new();
        if n_total <= self.budget as u64 {
            for &i in &active {
                k.insert(i, self.subnets[i].members.len() as u64);
            }
        } else {
            for &i in &active {
                k.insert(i, 1);
            }
            let mut spare = self.budget as u64 - active.len() as u64;
            while spare > 0 {
                // The subnet whose forwarders carry the most (by n/k, ties: more nodes, then order) gets a route.
                let best = active
                    .iter()
                    .copied()
                    .filter(|i| k[i] < self.subnets[*i].members.len() as u64)
                    .max_by(|&a, &b| {
                        let (na, nb) = (
                            self.subnets[a].members.len() as u64,
                            self.subnets[b].members.len() as u64,
                        );
                        (na * k[&b])
                            .cmp(&(nb * k[&a]))
                            .then(na.cmp(&nb))
                            .then(b.cmp(&a))
                    });
                let Some(best) = best else { break };
                *k.get_mut(&best).expect("active") += 1;
                spare -= 1;
            }
        }
        // Group size per subnet and the space it needs.
        let group_order: BTreeMap<usize, u8> = k
            .iter()
            .map(|(&i, &ki)| {
                (
                    i,
                    ceil_log2((self.subnets[i].members.len() as u64).div_ceil(ki)),
                )
            })
            .collect();
        let demand: BTreeMap<usize, u64> = k
            .iter()
            .map(|(&i, &ki)| (i, ki << group_order[&i]))
            .collect();
        let total_demand: u64 = demand.values().sum();
        let slots = 1u64 << self.space.total_order;
        if demand.values().all(|&d| d <= 1u64 << self.share_order) {
            // Even split: every subnet of the VPC gets the same aligned share, in (zone, id) order.
            for (i, s) in self.subnets.iter_mut().enumerate() {
                s.region = Some(Pfx {
                    start: (i as u32) << self.share_order,
                    order: self.share_order,
                });
            }
        } else {
            // Uneven: regions sized by demand, biggest first so that each is aligned; double them if all fit.
            let mut order: Vec<usize> = active.clone();
            order.sort_by(|a, b| demand[b].cmp(&demand[a]).then(a.cmp(b)));
            let exact: u64 = order.iter().map(|i| 1u64 << ceil_log2(demand[i])).sum();
            if exact > slots {
                return Err(self.fragmented(exact.max(total_demand)));
            }
            let extra = u8::from(exact * 2 <= slots);
            let mut at = 0u32;
            for i in order {
                let o = ceil_log2(demand[&i]) + extra;
                self.subnets[i].region = Some(Pfx {
                    start: at,
                    order: o,
                });
                at += 1u32 << o;
            }
        }
        // Lay out each subnet: k groups spread evenly over the region, ⌈n/k⌉ or ⌊n/k⌋ blocks at each group's start.
        for &i in &active {
            let ki = k[&i];
            let region = self.subnets[i].region.expect("assigned above");
            let stride_order = region.order - ceil_log2(ki);
            let n = self.subnets[i].members.len() as u64;
            let (q, rem) = (n / ki, n % ki);
            let members = self.subnets[i].members.clone();
            let mut it = members.into_iter();
            let mut next = region.start;
            for g in 0..ki {
                let start = region.start + ((g as u32) << stride_order);
                let load = q + u64::from(g < rem);
                // Foreign destinations are skipped (a group may then run on into the next one's room).
                let mut slot = start.max(next);
                for _ in 0..load {
                    let node = it.next().expect("loads sum to n");
                    while slot < region.end() && self.subnets[i].slot_reserved(slot) {
                        slot += 1;
                    }
                    if slot >= region.end() {
                        return Err(self.region_full(i, node));
                    }
                    self.subnets[i].blocks.insert(slot, node);
                    self.node_slot[node] = Some(slot);
                    slot += 1;
                }
                next = slot;
            }
            self.cover(i, ki as u32);
        }
        Ok(())
    }

    /// Replaces subnet `i`'s routes by a cover of its blocks with at most `k` routes whose largest load is as small
    /// as possible; each route is the largest aligned prefix (top-most trie node) within that load, so routes keep
    /// room for joins. Targets of prefixes that survive are kept.
    fn cover(&mut self, i: usize, k: u32) {
        let s = &self.subnets[i];
        let Some(region) = s.region else { return };
        let slots: Vec<u32> = s.blocks.keys().copied().collect();
        if slots.is_empty() {
            self.subnets[i].routes.clear();
            self.subnets[i].loads.clear();
            return;
        }
        let n = slots.len() as u32;
        let k = k.clamp(1, n);
        let count = |p: Pfx| -> u32 {
            (slots.partition_point(|&x| x < p.end()) - slots.partition_point(|&x| x < p.start))
                as u32
        };
        fn walk(
            p: Pfx,
            l: u32,
            count: &dyn Fn(Pfx) -> u32,
            out: &mut Option<&mut Vec<(Pfx, u32)>>,
        ) -> u32 {
            let c = count(p);
            if c == 0 {
                return 0;
            }
            if c <= l {
                if let Some(o) = out.as_mut() {
                    o.push((p, c));
                }
                return 1;
            }
            let (a, b) = p.children();
            walk(a, l, count, out) + walk(b, l, count, out)
        }
        let (mut lo, mut hi) = (n.div_ceil(k), n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if walk(region, mid, &count, &mut None) <= k {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        let mut routes: Vec<(Pfx, u32)> = Vec::new();
        walk(region, lo, &count, &mut Some(&mut routes));
        let old = std::mem::take(&mut self.subnets[i].routes);
        let s = &mut self.subnets[i];
        for (p, _) in &routes {
            s.routes.insert(*p, old.get(p).copied().unwrap_or_default());
        }
        s.recount();
        // Spend any routes left over on the busiest routes: a nested route for the fuller half of the first
        // level where the blocks split.
        while (s.routes.len() as u32) < k {
            let Some((&p, &l)) = s
                .loads
                .iter()
                .filter(|(_, l)| **l >= 2)
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            else {
                break;
            };
            let _ = l;
            let mut q = p;
            let nested = loop {
                let (a, b) = q.children();
                let (ca, cb) = (s.blocks_lpm_count(a, p), s.blocks_lpm_count(b, p));
                if ca > 0 && cb > 0 {
                    break if s.route_inside(b) || s.route_inside(a) {
                        None
                    } else if cb >= ca {
                        Some(b)
                    } else {
                        Some(a)
                    };
                }
                q = if ca > 0 { a } else { b };
                if q.order == 0 {
                    break None;
                }
            };
            let Some(nq) = nested else { break };
            s.routes.insert(nq, Target::default());
            s.recount();
        }
    }

    // ── incremental ──

    fn incremental(
        &mut self,
        prev: &RoutedPlan,
        warnings: &mut Vec<PlanWarning>,
    ) -> Result<(), PlanError> {
        let node_index: BTreeMap<&str, usize> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.as_str(), i))
            .collect();
        let subnet_index: BTreeMap<String, usize> = self
            .subnets
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        // Regions. A new region never overlaps a foreign route's destination.
        let mut taken: Vec<Pfx> = self.reserved.clone();
        for sp in &prev.subnets {
            let (Some(&i), Some(net)) = (subnet_index.get(sp.id.as_str()), sp.region) else {
                continue;
            };
            let Some(r) = self.space.pfx(net) else {
                continue;
            };
            if taken
                .iter()
                .filter(|t| !self.reserved.contains(t))
                .any(|t| t.contains(r) || r.contains(*t))
            {
                continue;
            }
            taken.push(r);
            self.subnets[i].region = Some(r);
        }
        // Blocks of nodes still here.
        for b in &prev.blocks {
            let Some(&ni) = node_index.get(b.node.as_str()) else {
                continue;
            };
            let si = self.node_subnet[ni];
            let reason = match (self.space.pfx(b.block), self.subnets[si].region) {
                _ if b.subnet != self.subnets[si].id => Some(format!(
                    "node moved from {} to {}",
                    b.subnet, self.subnets[si].id
                )),
                (Some(p), _) if self.subnets[si].slot_reserved(p.start) => {
                    Some("a foreign route inside the pod CIDR covers it".to_string())
                }
                (Some(p), Some(r)) if p.order == 0 && r.contains(p) => {
                    if self.subnets[si].blocks.contains_key(&p.start)
                        || self.node_slot[ni].is_some()
                    {
                        Some("block assigned twice in the previous plan".to_string())
                    } else {
                        self.subnets[si].blocks.insert(p.start, ni);
                        self.node_slot[ni] = Some(p.start);
                        None
                    }
                }
                _ => Some("not inside its subnet's region".to_string()),
            };
            if let Some(reason) = reason {
                warnings.push(PlanWarning::BlockReassigned {
                    node: b.node.clone(),
                    block: b.block,
                    reason,
                });
            }
        }
        // Routes inside their subnet's region.
        for r in &prev.routes {
            let Some(&si) = subnet_index.get(r.subnet.as_str()) else {
                continue;
            };
            let (Some(p), Some(region)) = (self.space.pfx(r.destination), self.subnets[si].region)
            else {
                continue;
            };
            if !region.contains(p) || self.reserved.iter().any(|f| f.contains(p)) {
                continue;
            }
            // A forwarder or home that left the cluster is dropped here.
            let target = Target {
                fwd: r
                    .forwarder
                    .as_deref()
                    .and_then(|f| node_index.get(f).copied()),
                home: r.home.as_deref().and_then(|h| node_index.get(h).copied()),
            };
            self.subnets[si].routes.entry(p).or_insert(target);
        }
        // Routes that now cover no block (their nodes left) go.
        for s in &mut self.subnets {
            s.recount();
            let empty: Vec<Pfx> = s
                .loads
                .iter()
                .filter(|(_, l)| **l == 0)
                .map(|(p, _)| *p)
                .collect();
            for p in empty {
                s.routes.remove(&p);
                s.loads.remove(&p);
            }
        }
        // Blocks that lost their route (only with a damaged previous plan): re-cover that subnet.
        for i in 0..self.subnets.len() {
            let s = &self.subnets[i];
            if s.blocks.keys().any(|&slot| s.lpm(slot).is_none()) {
                let k = (s.routes.len() as u32).max(1);
                if s.routes.is_empty() && self.total_routes() >= self.budget {
                    self.merge_once();
                }
                self.cover(i, k);
            }
        }
        // Budget shrank: merge until it fits.
        while self.total_routes() > self.budget {
            if !self.merge_once() {
                let subnets = self.subnets.iter().filter(|s| !s.blocks.is_empty()).count();
                return Err(PlanError::BudgetTooSmall {
                    budget: self.budget,
                    subnets,
                });
            }
        }
        // New nodes, subnet by subnet.
        let mut new: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| self.node_slot[n].is_none())
            .collect();
        new.sort_by_key(|&n| (self.node_subnet[n], n));
        for n in new {
            self.join(n, &mut taken)?;
        }
        // Back to one route per node when the budget allows it again.
        if self.nodes.len() as u64 <= self.budget as u64 {
            self.split_to_per_node();
        }
        Ok(())
    }

    /// Gives a subnet that has none a region: the even share if free, else the largest free aligned prefix.
    fn ensure_region(&mut self, si: usize, taken: &mut Vec<Pfx>) {
        if self.subnets[si].region.is_some() {
            return;
        }
        fn find(p: Pfx, want: u8, taken: &[Pfx]) -> Option<Pfx> {
            if !taken.iter().any(|t| t.contains(p) || p.contains(*t)) {
                return Some(if p.order > want {
                    Pfx {
                        start: p.start,
                        order: want,
                    }
                } else {
                    p
                });
            }
            if p.order == 0 || taken.iter().any(|t| t.contains(p)) {
                return None;
            }
            let (a, b) = p.children();
            match (find(a, want, taken), find(b, want, taken)) {
                (Some(x), Some(y)) => Some(if y.order > x.order { y } else { x }),
                (x, y) => x.or(y),
            }
        }
        if let Some(r) = find(self.space.root(), self.share_order, taken) {
            taken.push(r);
            self.subnets[si].region = Some(r);
        }
    }

    fn join(&mut self, n: usize, taken: &mut Vec<Pfx>) -> Result<(), PlanError> {
        let si = self.node_subnet[n];
        self.ensure_region(si, taken);
        if self.subnets[si].region.is_none() {
            return Err(self.region_full(si, n));
        }
        // (i) Room in the budget: the node gets its own route.
        if self.total_routes() < self.budget && self.own_route_new(si, n) {
            return Ok(());
        }
        if self.subnets[si].routes.is_empty() {
            // A subnet's first node with the budget full: free a route elsewhere.
            if !self.merge_once() {
                let subnets = self.subnets.iter().filter(|s| !s.blocks.is_empty()).count() + 1;
                return Err(PlanError::BudgetTooSmall {
                    budget: self.budget,
                    subnets,
                });
            }
            if self.own_route_new(si, n) {
                return Ok(());
            }
            return Err(self.region_full(si, n));
        }
        let s = &self.subnets[si];
        let nodes_after = s.blocks.len() as u32 + 1;
        let bound = nodes_after.div_ceil(s.routes.len() as u32);
        let mut by_load: Vec<(u32, Pfx)> = s.routes.keys().map(|&p| (s.load(p), p)).collect();
        by_load.sort();
        // (ii) The lightest route with a free slot, if it stays within the balanced bound: no route changes.
        for &(l, p) in &by_load {
            if l + 1 > bound {
                break;
            }
            if let Some(slot) = self.subnets[si].free_slot_in(p) {
                self.put(si, n, slot);
                return Ok(());
            }
        }
        // (iii) Grow the lightest route whose buddy is empty into its parent: two route changes.
        for &(l, p) in &by_load {
            if l + 1 > bound {
                break;
            }
            if self.try_grow(si, n, p) {
                return Ok(());
            }
        }
        // (iv) Merge the cheapest pair (here or elsewhere) and give the node its own route.
        if self.merge_once() && self.own_route_new(si, n) {
            return Ok(());
        }
        // Last resort (budget exhausted everywhere): ignore the balance bound.
        let s = &self.subnets[si];
        let mut by_load: Vec<(u32, Pfx)> = s.routes.keys().map(|&p| (s.load(p), p)).collect();
        by_load.sort();
        for &(_, p) in &by_load {
            if let Some(slot) = self.subnets[si].free_slot_in(p) {
                self.put(si, n, slot);
                return Ok(());
            }
        }
        for &(_, p) in &by_load {
            if self.try_grow(si, n, p) {
                return Ok(());
            }
        }
        Err(self.region_full(si, n))
    }

    fn region_full(&self, si: usize, n: usize) -> PlanError {
        PlanError::RegionFull {
            subnet: self.subnets[si].id.clone(),
            region: self.subnets[si]
                .region
                .map_or(self.topo.cluster.pod_cidr, |r| self.space.net(r)),
            block_prefix_len: self.space.block_len,
            node: self.nodes[n].id.clone(),
        }
    }

    fn put(&mut self, si: usize, n: usize, slot: u32) {
        let s = &mut self.subnets[si];
        s.blocks.insert(slot, n);
        if let Some(p) = s.lpm(slot) {
            *s.loads.entry(p).or_insert(0) += 1;
        }
        self.node_slot[n] = Some(slot);
    }

    /// New block at the start of the largest empty prefix of the region, routed by that prefix.
    fn own_route_new(&mut self, si: usize, n: usize) -> bool {
        let s = &mut self.subnets[si];
        let Some(region) = s.region else { return false };
        let Some(p) = s.largest_empty(region) else {
            return false;
        };
        s.routes.insert(p, Target::default());
        s.loads.insert(p, 0);
        self.put(si, n, p.start);
        true
    }

    fn try_grow(&mut self, si: usize, n: usize, p: Pfx) -> bool {
        let s = &mut self.subnets[si];
        let Some(region) = s.region else { return false };
        if p.order >= region.order {
            return false;
        }
        let (parent, buddy) = (p.parent(), p.buddy());
        if s.routes.contains_key(&parent) || !s.is_empty(buddy) {
            return false;
        }
        let target = s.routes.remove(&p).unwrap_or_default();
        s.routes.insert(parent, target);
        let l = s.loads.remove(&p).unwrap_or(0);
        s.loads.insert(parent, l);
        self.put(si, n, buddy.start);
        true
    }

    /// Removes one route, choosing the change that leaves the lightest resulting route: dropping a nested route
    /// (its blocks fall to the enclosing route, one change) or replacing two neighbouring top-level routes by their
    /// smallest common prefix (three changes).
    fn merge_once(&mut self) -> bool {
        #[derive(Clone, Copy)]
        enum M {
            DropNested(Pfx),
            Pair(Pfx, Pfx),
        }
        // (resulting load, changes, subnet, prefix) → the smallest wins.
        type Key = (u32, u32, usize, Pfx);
        let mut best: Option<(Key, usize, M)> = None;
        for (si, s) in self.subnets.iter().enumerate() {
            if s.routes.len() < 2 {
                continue;
            }
            for &r in s.routes.keys() {
                let anc = (r.order + 1..=s.region.map_or(r.order, |g| g.order))
                    .map(|o| Pfx::of_slot(r.start, o))
                    .find(|q| s.routes.contains_key(q));
                if let Some(a) = anc {
                    let key = (s.load(a) + s.load(r), 1, si, r);
                    if best.as_ref().is_none_or(|b| key < b.0) {
                        best = Some((key, si, M::DropNested(r)));
                    }
                }
            }
            let top = s.top_level();
            for w in top.windows(2) {
                let (a, b) = (w[0], w[1]);
                let key = (s.load(a) + s.load(b), 3, si, a);
                if best.as_ref().is_none_or(|x| key < x.0) {
                    best = Some((key, si, M::Pair(a, b)));
                }
            }
        }
        let Some((_, si, m)) = best else { return false };
        let s = &mut self.subnets[si];
        match m {
            M::DropNested(r) => {
                s.routes.remove(&r);
            }
            M::Pair(a, b) => {
                let keep = if s.load(a) >= s.load(b) { a } else { b };
                let target = s.routes.get(&keep).copied().unwrap_or_default();
                s.routes.remove(&a);
                s.routes.remove(&b);
                s.routes.insert(Pfx::lca(a, b), target);
            }
        }
        s.recount();
        true
    }

    /// Every node whose block shares its route gets a route of its own (the largest prefix around its block holding
    /// no other block and no route); routes left without blocks go.
    fn split_to_per_node(&mut self) {
        for s in &mut self.subnets {
            let Some(region) = s.region else { continue };
            let slots: Vec<u32> = s.blocks.keys().copied().collect();
            for slot in slots {
                let Some(r) = s.lpm(slot) else { continue };
                if s.load(r) <= 1 {
                    continue;
                }
                let mut best = None;
                for o in 0..region.order {
                    let p = Pfx::of_slot(slot, o);
                    if p.order >= r.order
                        || s.route_inside(p)
                        || s.blocks.range(p.start..p.end()).count() > 1
                    {
                        break;
                    }
                    best = Some(p);
                }
                if let Some(p) = best {
                    s.routes.insert(p, Target::default());
                    *s.loads.get_mut(&r).expect("lpm route") -= 1;
                    s.loads.insert(p, 1);
                }
            }
            let empty: Vec<Pfx> = s
                .loads
                .iter()
                .filter(|(_, l)| **l == 0)
                .map(|(p, _)| *p)
                .collect();
            for p in empty {
                s.routes.remove(&p);
            }
            s.recount();
        }
    }

    // ── forwarders ──

    /// Chooses every route's forwarder. In order: a route carrying one healthy node targets it; a route whose home
    /// (the forwarder it was moved off when that failed) is healthy again returns to it; a healthy forwarder is kept;
    /// the rest get the best healthy node of the subnet, and remember the failed forwarder they leave as their home.
    fn assign_targets(&mut self) {
        for si in 0..self.subnets.len() {
            let s = &self.subnets[si];
            // Which blocks each route carries.
            let mut carried: BTreeMap<Pfx, Vec<usize>> =
                s.routes.keys().map(|p| (*p, Vec::new())).collect();
            for (&slot, &n) in &s.blocks {
                if let Some(p) = s.lpm(slot) {
                    carried.get_mut(&p).expect("route").push(n);
                }
            }
            let member = |n: usize| self.node_subnet[n] == si && self.node_slot[n].is_some();
            let healthy = |n: usize| self.nodes[n].healthy && member(n);
            let mut targets: BTreeMap<Pfx, Target> = BTreeMap::new();
            let mut forwarded: BTreeMap<usize, u32> = BTreeMap::new();
            // Routes to place, with the home each keeps.
            let mut pending: Vec<(Pfx, Option<usize>)> = Vec::new();
            for (&p, &Target { fwd, home }) in &s.routes {
                let load = carried[&p].len() as u32;
                // A home that is no longer a node of this subnet is forgotten.
                let home = home.filter(|&h| member(h));
                // A route carrying one healthy node targets that node (no extra hop, and fail-back after recovery).
                let own = (load == 1 && healthy(carried[&p][0])).then(|| carried[&p][0]);
                let chosen = match (own, home) {
                    (Some(t), _) => Some((t, None)),
                    // Fail-back: the home is healthy again (after the tracker's hold-down).
                    (None, Some(h)) if healthy(h) => Some((h, None)),
                    _ => fwd.filter(|&t| healthy(t)).map(|t| (t, home)),
                };
                match chosen {
                    Some((t, home)) => {
                        targets.insert(p, Target { fwd: Some(t), home });
                        *forwarded.entry(t).or_insert(0) += load;
                    }
                    None => {
                        // Moved off a forwarder that failed: remember it, unless an earlier home is still owed.
                        let failed = fwd.filter(|&t| member(t) && !self.nodes[t].healthy);
                        pending.push((p, home.or(failed)));
                    }
                }
            }
            pending
                .sort_by(|(a, _), (b, _)| carried[b].len().cmp(&carried[a].len()).then(a.cmp(b)));
            for (p, home) in pending {
                let inside: BTreeSet<usize> = carried[&p].iter().copied().collect();
                let best = s
                    .members
                    .iter()
                    .copied()
                    .filter(|&m| healthy(m))
                    .min_by_key(|m| {
                        let f = forwarded.get(m).copied().unwrap_or(0);
                        (f > 0, !inside.contains(m), f, *m)
                    });
                if let Some(t) = best {
                    *forwarded.entry(t).or_insert(0) += carried[&p].len() as u32;
                }
                targets.insert(p, Target { fwd: best, home });
            }
            let s = &mut self.subnets[si];
            s.routes = targets;
            s.recount();
        }
    }

    // ── output ──

    fn output(&self, mut warnings: Vec<PlanWarning>) -> RoutedPlan {
        let mut routes = Vec::new();
        let mut blocks = Vec::with_capacity(self.nodes.len());
        let mut subnets = Vec::with_capacity(self.subnets.len());
        let mut forwarded_all: BTreeMap<usize, u32> = BTreeMap::new();
        let mut extra_total = 0u32;
        for s in &self.subnets {
            let mut forwarded: BTreeMap<usize, u32> = BTreeMap::new();
            for (&p, &Target { fwd: t, home }) in &s.routes {
                let load = s.load(p);
                if let Some(t) = t {
                    *forwarded.entry(t).or_insert(0) += load;
                }
                let node = t.map(|t| self.nodes[t]);
                routes.push(VpcRoute {
                    destination: self.space.net(p),
                    subnet: s.id.clone(),
                    zone: s.zone.clone(),
                    forwarder: node.map(|n| n.id.clone()),
                    eni: node.map(|n| n.eni.clone()),
                    forwarder_ip: node.map(|n| n.ip),
                    nodes: load,
                    forwarder_inside: t
                        .is_some_and(|t| self.node_slot[t].and_then(|x| s.lpm(x)) == Some(p)),
                    home: home.map(|h| self.nodes[h].id.clone()),
                });
            }
            let mut extra = 0u32;
            for &m in &s.members {
                let n = self.nodes[m];
                let slot = self.node_slot[m].expect("every node has a block");
                let route = s.lpm(slot);
                let via = route.and_then(|p| s.routes[&p].fwd);
                let extra_hop = via != Some(m);
                extra += u32::from(extra_hop);
                blocks.push(BlockAssignment {
                    node: n.id.clone(),
                    subnet: s.id.clone(),
                    zone: s.zone.clone(),
                    node_ip: n.ip,
                    eni: n.eni.clone(),
                    healthy: n.healthy,
                    block: self.space.net(Pfx {
                        start: slot,
                        order: 0,
                    }),
                    route: route.map(|p| self.space.net(p)),
                    via: via.map(|v| self.nodes[v].id.clone()),
                    extra_hop,
                });
            }
            extra_total += extra;
            let healthy = s.members.iter().filter(|&&m| self.nodes[m].healthy).count() as u32;
            let nodes = s.members.len() as u32;
            let k = s.routes.len() as u32;
            let max = forwarded.values().copied().max().unwrap_or(0);
            let bound = if k == 0 { 0 } else { nodes.div_ceil(k) };
            if nodes > 0 && healthy == 0 {
                warnings.push(PlanWarning::SubnetUnroutable {
                    subnet: s.id.clone(),
                    nodes,
                    routes: k,
                });
            }
            if nodes > 0 && s.table.is_none() {
                warnings.push(PlanWarning::SubnetWithoutRouteTable {
                    subnet: s.id.clone(),
                    nodes,
                });
            }
            // With fewer healthy nodes than routes, forwarders must share; that is reported as unhealthy nodes.
            if healthy >= k && max > bound {
                warnings.push(PlanWarning::AboveBalance {
                    subnet: s.id.clone(),
                    max,
                    nodes,
                    routes: k,
                    bound,
                });
            }
            for (t, l) in forwarded.iter() {
                forwarded_all.insert(*t, *l);
            }
            subnets.push(SubnetPlan {
                id: s.id.clone(),
                zone: s.zone.clone(),
                region: s.region.map(|r| self.space.net(r)),
                route_table: s.table.clone(),
                nodes,
                healthy_nodes: healthy,
                routes: k,
                forwarders: forwarded.len() as u32,
                max_nodes_per_forwarder: max,
                balanced_bound: bound,
                extra_hop_nodes: extra,
            });
        }
        routes.sort_by(|a, b| {
            (a.destination.network(), a.destination.prefix_len())
                .cmp(&(b.destination.network(), b.destination.prefix_len()))
        });
        blocks.sort_by(|a, b| a.node.cmp(&b.node));
        let routes_per_table = routes.len() as u32;
        let route_tables = self
            .topo
            .vpc
            .route_tables
            .iter()
            .map(|t| {
                let foreign = t.foreign_routes.len() as u32;
                TableUsage {
                    id: t.id.clone(),
                    route_limit: t.route_limit,
                    foreign_routes: foreign,
                    underlay_routes: routes_per_table,
                    free: t.route_limit.saturating_sub(foreign + routes_per_table),
                }
            })
            .collect();
        let nodes = self.nodes.len() as u32;
        RoutedPlan {
            pod_cidr: self.topo.cluster.pod_cidr.trunc(),
            block_prefix_len: self.space.block_len,
            mode: if routes.iter().all(|r| r.nodes <= 1) {
                PlanMode::PerNode
            } else {
                PlanMode::Aggregated
            },
            route_limit: self.route_limit,
            foreign_routes: self.foreign_max,
            headroom: self.topo.cluster.headroom,
            budget: self.budget,
            routes_per_table,
            nodes,
            healthy_nodes: self.nodes.iter().filter(|n| n.healthy).count() as u32,
            forwarders: forwarded_all.len() as u32,
            max_nodes_per_forwarder: forwarded_all.values().copied().max().unwrap_or(0),
            extra_hop_fraction: if nodes == 0 {
                0.0
            } else {
                extra_total as f64 / nodes as f64
            },
            route_tables,
            subnets,
            routes,
            blocks,
            warnings,
        }
    }
}

impl SubnetSt {
    /// Blocks inside `p` whose longest-prefix match is `route`.
    fn blocks_lpm_count(&self, p: Pfx, route: Pfx) -> u32 {
        self.blocks
            .range(p.start..p.end())
            .filter(|(slot, _)| self.lpm(**slot) == Some(route))
            .count() as u32
    }
}
