//! What the routed-mode planner is told about the world: the VPC (subnets, managed route tables and the routes in
//! them that are not ours), the cluster's pod CIDR and block size, and the nodes.
//!
//! ```text
//!   Topology ─ cluster: pod_cidr, block_prefix_len, headroom
//!            ├ vpc: subnets (id, zone, cidr), route_tables (id, subnets, route_limit, foreign_routes)
//!            └ nodes (id, subnet, ip, eni, healthy)
//! ```
//!
//! The same types are read from YAML by `underlay plan --topology` and built by [`synthesise`] for
//! `underlay plan --nodes …` and the benchmarks.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Default size of a node's pod block: a /26 holds 64 addresses, enough for the 110-pod kubelet default only with
/// address reuse; a platform team that wants more sets `block_prefix_len: 25`.
pub const DEFAULT_BLOCK_PREFIX_LEN: u8 = 26;
/// AWS's default limit of non-propagated routes in one route table ([`crate::owned::DEFAULT_ROUTE_LIMIT`]).
pub const DEFAULT_ROUTE_LIMIT: u32 = crate::owned::DEFAULT_ROUTE_LIMIT as u32;
/// Routes left free in every managed table so that a change can create the new route before deleting the old one.
pub const DEFAULT_HEADROOM: u32 = 1;

/// Everything the planner reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub cluster: ClusterConfig,
    pub vpc: Vpc,
    #[serde(default)]
    pub nodes: Vec<Node>,
}

/// Cluster-wide address settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Where pod addresses come from; must not overlap any VPC subnet.
    pub pod_cidr: Ipv4Net,
    /// Prefix length of each node's pod block.
    #[serde(default = "default_block_prefix_len")]
    pub block_prefix_len: u8,
    /// Routes kept free in every managed route table (see [`DEFAULT_HEADROOM`]).
    #[serde(default = "default_headroom")]
    pub headroom: u32,
}

fn default_block_prefix_len() -> u8 {
    DEFAULT_BLOCK_PREFIX_LEN
}
fn default_headroom() -> u32 {
    DEFAULT_HEADROOM
}
fn default_route_limit() -> u32 {
    DEFAULT_ROUTE_LIMIT
}
fn default_true() -> bool {
    true
}

/// The VPC as far as the planner cares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vpc {
    #[serde(default)]
    pub id: String,
    pub subnets: Vec<Subnet>,
    /// The route tables underlay manages. Every one receives the same set of pod-CIDR routes.
    pub route_tables: Vec<RouteTable>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subnet {
    pub id: String,
    pub zone: String,
    pub cidr: Ipv4Net,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTable {
    pub id: String,
    /// Subnets associated with this table (a subnet is associated with at most one table).
    #[serde(default)]
    pub subnets: Vec<String>,
    /// Maximum number of non-propagated routes (500 by default in AWS, adjustable to 1,000).
    #[serde(default = "default_route_limit")]
    pub route_limit: u32,
    /// Routes in this table that are not underlay's: they count against the limit; one inside the pod CIDR also
    /// takes its destination (no block overlapping it is handed out).
    #[serde(default)]
    pub foreign_routes: Vec<ForeignRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForeignRoute {
    pub destination: Ipv4Net,
    /// Whatever the route points at (igw-…, nat-…, pcx-…, tgw-…); only shown, never interpreted.
    pub target: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Kubernetes node name.
    pub id: String,
    pub subnet: String,
    /// Primary private IP (the next hop of its same-subnet peers' routes to its block).
    pub ip: Ipv4Addr,
    /// Primary ENI id: the target of every VPC route this node forwards.
    pub eni: String,
    /// An unhealthy node keeps its block but is never a forwarder.
    #[serde(default = "default_true")]
    pub healthy: bool,
}

/// Shape of a synthetic cluster for `underlay plan --nodes …`, tests and benchmarks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSpec {
    pub nodes: usize,
    pub zones: usize,
    pub subnets_per_zone: usize,
    pub route_limit: u32,
    /// Foreign routes per route table (a default route to the zone's NAT gateway, then peering routes).
    pub foreign_routes: u32,
    pub headroom: u32,
    pub pod_cidr: Ipv4Net,
    pub block_prefix_len: u8,
}

impl SynthSpec {
    /// The defaults of `underlay plan`: lab pod CIDR 100.64.0.0/10, /26 blocks, one foreign route, headroom 1.
    pub fn new(nodes: usize, zones: usize, subnets_per_zone: usize, route_limit: u32) -> Self {
        Self {
            nodes,
            zones,
            subnets_per_zone,
            route_limit,
            foreign_routes: 1,
            headroom: DEFAULT_HEADROOM,
            pod_cidr: "100.64.0.0/10".parse().expect("static CIDR"),
            block_prefix_len: DEFAULT_BLOCK_PREFIX_LEN,
        }
    }
}

/// Errors building a synthetic topology.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SynthError {
    #[error(
        "a synthetic cluster needs at least one zone and one subnet per zone (got {zones} × {subnets_per_zone})"
    )]
    NoSubnets {
        zones: usize,
        subnets_per_zone: usize,
    },
    #[error("at most 26 zones can be synthesised (got {0})")]
    TooManyZones(usize),
    #[error(
        "{nodes} nodes over {subnets} subnets do not fit the lab VPC 198.18.0.0/15 ({per_subnet} addresses per subnet)"
    )]
    VpcTooSmall {
        nodes: usize,
        subnets: usize,
        per_subnet: u64,
    },
}

/// Node name of the `i`-th synthetic node (1-based, zero-padded so names sort in creation order).
pub fn synth_node_name(i: usize, total: usize) -> String {
    let width = total.max(1).to_string().len().max(4);
    format!("node-{i:0width$}")
}

/// Builds a cluster as an autoscaling group spreads it: `zones` zones named `zone-a`, `zone-b`, …, each with
/// `subnets_per_zone` equal subnets of the lab VPC 198.18.0.0/15 and one route table per zone (associated with that
/// zone's subnets, holding `foreign_routes` foreign routes), and nodes dealt round-robin over the subnets.
pub fn synthesise(spec: &SynthSpec) -> Result<Topology, SynthError> {
    let subnets_n = spec.zones * spec.subnets_per_zone;
    if subnets_n == 0 {
        return Err(SynthError::NoSubnets {
            zones: spec.zones,
            subnets_per_zone: spec.subnets_per_zone,
        });
    }
    if spec.zones > 26 {
        return Err(SynthError::TooManyZones(spec.zones));
    }
    let vpc_net: Ipv4Net = "198.18.0.0/15".parse().expect("static CIDR");
    // Equal power-of-two subnets carved from the VPC.
    let split_bits = usize::BITS - (subnets_n - 1).leading_zeros();
    let subnet_len = vpc_net.prefix_len() as u32 + split_bits;
    let per_subnet: u64 = 1u64 << (32 - subnet_len.min(32));
    let nodes_per_subnet = spec.nodes.div_ceil(subnets_n) as u64;
    // AWS reserves 5 addresses per subnet; we also skip the first 10 for readability.
    if subnet_len > 28 || nodes_per_subnet + 10 + 1 > per_subnet {
        return Err(SynthError::VpcTooSmall {
            nodes: spec.nodes,
            subnets: subnets_n,
            per_subnet,
        });
    }
    let mut subnets = Vec::with_capacity(subnets_n);
    let mut tables = Vec::with_capacity(spec.zones);
    for z in 0..spec.zones {
        let letter = (b'a' + z as u8) as char;
        let zone = format!("zone-{letter}");
        let mut assoc = Vec::new();
        for s in 0..spec.subnets_per_zone {
            let idx = (z * spec.subnets_per_zone + s) as u32;
            let base = u32::from(vpc_net.network()) + idx * per_subnet as u32;
            let id = format!("subnet-{letter}{}", s + 1);
            subnets.push(Subnet {
                id: id.clone(),
                zone: zone.clone(),
                cidr: Ipv4Net::new(Ipv4Addr::from(base), subnet_len as u8).expect("valid prefix"),
            });
            assoc.push(id);
        }
        let foreign_routes = (0..spec.foreign_routes)
            .map(|i| {
                if i == 0 {
                    ForeignRoute {
                        destination: "0.0.0.0/0".parse().expect("static"),
                        target: format!("nat-{letter}"),
                    }
                } else {
                    // Peering routes into the documentation range 192.0.2.0/24 style: 10.<i>.0.0/16.
                    ForeignRoute {
                        destination: Ipv4Net::new(Ipv4Addr::new(10, (i % 256) as u8, 0, 0), 16)
                            .expect("valid"),
                        target: format!("pcx-{i:04}"),
                    }
                }
            })
            .collect();
        tables.push(RouteTable {
            id: format!("rtb-{letter}"),
            subnets: assoc,
            route_limit: spec.route_limit,
            foreign_routes,
        });
    }
    let mut nodes = Vec::with_capacity(spec.nodes);
    for i in 0..spec.nodes {
        let s = i % subnets_n;
        let k = (i / subnets_n) as u32;
        let subnet = &subnets[s];
        let ip = Ipv4Addr::from(u32::from(subnet.cidr.network()) + 10 + k);
        nodes.push(Node {
            id: synth_node_name(i + 1, spec.nodes),
            subnet: subnet.id.clone(),
            ip,
            eni: format!("eni-{:08x}", i + 1),
            healthy: true,
        });
    }
    Ok(Topology {
        cluster: ClusterConfig {
            pod_cidr: spec.pod_cidr,
            block_prefix_len: spec.block_prefix_len,
            headroom: spec.headroom,
        },
        vpc: Vpc {
            id: "vpc-synthetic".into(),
            subnets,
            route_tables: tables,
        },
        nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthesise_spreads_nodes_round_robin_inside_their_subnets() {
        let t = synthesise(&SynthSpec::new(5000, 3, 2, 50)).unwrap();
        assert_eq!(t.vpc.subnets.len(), 6);
        assert_eq!(t.vpc.route_tables.len(), 3);
        assert_eq!(t.nodes.len(), 5000);
        for n in &t.nodes {
            let s = t.vpc.subnets.iter().find(|s| s.id == n.subnet).unwrap();
            assert!(
                s.cidr.contains(&n.ip),
                "{} {} not in {}",
                n.id,
                n.ip,
                s.cidr
            );
        }
        let in_a1 = t.nodes.iter().filter(|n| n.subnet == "subnet-a1").count();
        assert_eq!(in_a1, 834);
        assert_eq!(t.nodes[0].id, "node-0001");
    }

    #[test]
    fn synthesise_rejects_what_does_not_fit() {
        assert!(matches!(
            synthesise(&SynthSpec::new(10, 0, 2, 50)),
            Err(SynthError::NoSubnets { .. })
        ));
        assert!(matches!(
            synthesise(&SynthSpec::new(200_000, 1, 1, 50)),
            Err(SynthError::VpcTooSmall { .. })
        ));
    }

    #[test]
    fn serde_defaults_apply() {
        let t: Topology = serde_json::from_value(serde_json::json!({
            "cluster": {"pod_cidr": "100.64.0.0/16"},
            "vpc": {"subnets": [{"id": "s1", "zone": "z", "cidr": "198.18.0.0/24"}],
                    "route_tables": [{"id": "rtb-1", "subnets": ["s1"]}]},
            "nodes": [{"id": "n1", "subnet": "s1", "ip": "198.18.0.10", "eni": "eni-1"}]
        }))
        .unwrap();
        assert_eq!(t.cluster.block_prefix_len, DEFAULT_BLOCK_PREFIX_LEN);
        assert_eq!(t.cluster.headroom, DEFAULT_HEADROOM);
        assert_eq!(t.vpc.route_tables[0].route_limit, DEFAULT_ROUTE_LIMIT);
        assert!(t.nodes[0].healthy);
    }
}
