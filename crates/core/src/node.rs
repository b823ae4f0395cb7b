//! Routed mode on one node: the record the agent converges to ([`RoutedNodeSpec`]), what it observed
//! ([`NodeObserved`]), and the pure plan between them ([`plan_node`] → [`NodeOp`]s).
//!
//! ```text
//!   RoutedPlan + Topology ──► node_spec(plan, topology, node) ──► RoutedNodeSpec   (controller side, later a CRD)
//!   RoutedNodeSpec + NodeObserved ──► plan_node ──► Vec<NodeOp> ──► agent applies them through dataplane / nft
//! ```
//!
//! Ownership: the agent owns the routing table [`names::AGENT_ROUTE_TABLE`] (every route in it), the policy rules
//! that look it up, the sysctls listed in [`wanted_sysctls`], and the nftables table `inet underlay`. It never
//! reads or writes anything else.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::names;
use crate::nft::{ObservedNft, Ruleset};
use crate::planner::{PeerRoute, RoutedPlan};
use crate::topology::Topology;

/// Default MTU of a node record when the caller has no better figure (the VPC's jumbo frames).
pub const DEFAULT_VPC_MTU: u32 = 9001;

/// The routed-mode record of one node: everything its agent needs to converge the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutedNodeSpec {
    pub node: String,
    pub subnet: String,
    pub node_ip: Ipv4Addr,
    /// Name of the uplink (primary ENI) device; when absent, the agent uses the device holding `node_ip`.
    #[serde(default)]
    pub uplink: Option<String>,
    /// This node's pod block: its IPAM pool.
    pub pod_block: Ipv4Net,
    pub pod_cidr: Ipv4Net,
    /// The VPC's address ranges: traffic to them (and to the pod CIDR) keeps its pod source address.
    pub vpc_cidrs: Vec<Ipv4Net>,
    /// Same-subnet peers' blocks and the peer IP each is reached through.
    #[serde(default)]
    pub peer_routes: Vec<PeerRoute>,
    pub mtu: u32,
}

impl RoutedNodeSpec {
    /// The VPC CIDRs and the pod CIDR, merged (overlaps and adjacent ranges folded, as nft sets need).
    pub fn inside_cidrs(&self) -> Vec<Ipv4Net> {
        let mut all = self.vpc_cidrs.clone();
        all.push(self.pod_cidr);
        Ipv4Net::aggregate(&all)
    }

    /// Checks the record for contradictions the kernel would accept silently.
    pub fn validate(&self) -> Result<(), NodeSpecError> {
        if !self.pod_cidr.contains(&self.pod_block) {
            return Err(NodeSpecError::BlockOutsidePodCidr {
                block: self.pod_block,
                pod_cidr: self.pod_cidr,
            });
        }
        for (i, r) in self.peer_routes.iter().enumerate() {
            if self.peer_routes[..i].iter().any(|o| {
                o.destination.contains(&r.destination.network())
                    || r.destination.contains(&o.destination.network())
            }) {
                return Err(NodeSpecError::PeerOverlap(r.destination));
            }
            if !self.pod_cidr.contains(&r.destination) {
                return Err(NodeSpecError::PeerOutsidePodCidr(r.destination));
            }
            if r.destination.contains(&self.pod_block.network())
                || self.pod_block.contains(&r.destination.network())
            {
                return Err(NodeSpecError::PeerOverlapsOwnBlock(r.destination));
            }
        }
        if self.vpc_cidrs.is_empty() {
            return Err(NodeSpecError::NoVpcCidr);
        }
        Ok(())
    }
}

/// A node record that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeSpecError {
    #[error("pod block {block} is outside the pod CIDR {pod_cidr}")]
    BlockOutsidePodCidr { block: Ipv4Net, pod_cidr: Ipv4Net },
    #[error("peer route {0} is outside the pod CIDR")]
    PeerOutsidePodCidr(Ipv4Net),
    #[error("peer route {0} overlaps another peer route")]
    PeerOverlap(Ipv4Net),
    #[error("peer route {0} overlaps the node's own block")]
    PeerOverlapsOwnBlock(Ipv4Net),
    #[error("the record lists no VPC CIDR")]
    NoVpcCidr,
    #[error("node {0} has no block in the plan")]
    NotInPlan(String),
}

/// The record of `node` from a routed plan and its topology. The VPC CIDRs are the subnets' CIDRs (merged).
pub fn node_spec(
    plan: &RoutedPlan,
    topology: &Topology,
    node: &str,
) -> Result<RoutedNodeSpec, NodeSpecError> {
    let b = plan
        .blocks
        .iter()
        .find(|b| b.node == node)
        .ok_or_else(|| NodeSpecError::NotInPlan(node.to_string()))?;
    let subnets: Vec<Ipv4Net> = topology.vpc.subnets.iter().map(|s| s.cidr).collect();
    Ok(RoutedNodeSpec {
        node: b.node.clone(),
        subnet: b.subnet.clone(),
        node_ip: b.node_ip,
        uplink: None,
        pod_block: b.block,
        pod_cidr: plan.pod_cidr,
        vpc_cidrs: Ipv4Net::aggregate(&subnets),
        peer_routes: plan.peer_routes(node),
        mtu: DEFAULT_VPC_MTU,
    })
}

/// A route in the agent's table as observed (or wanted): `destination via <via> dev <dev> onlink`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OwnedRoute {
    pub destination: Ipv4Net,
    pub via: Option<Ipv4Addr>,
    pub dev: Option<String>,
}

/// A policy rule that looks up the agent's table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OwnedRule {
    pub priority: u32,
    pub to: Option<Ipv4Net>,
}

/// What the agent read from the node before planning.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeObserved {
    /// The resolved uplink device name.
    pub uplink: String,
    /// Current value of each sysctl in [`wanted_sysctls`] that could be read.
    pub sysctls: BTreeMap<String, String>,
    /// Every IPv4 route in [`names::AGENT_ROUTE_TABLE`].
    pub routes: Vec<OwnedRoute>,
    /// Every IPv4 rule whose table is [`names::AGENT_ROUTE_TABLE`].
    pub rules: Vec<OwnedRule>,
    /// The `inet underlay` table, if it exists.
    pub nft: Option<ObservedNft>,
}

/// One change to a node's kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum NodeOp {
    SetSysctl {
        key: String,
        value: String,
    },
    /// Add or replace `destination via <via> dev <dev> onlink` in the agent's table.
    PutRoute {
        destination: Ipv4Net,
        via: Ipv4Addr,
        dev: String,
    },
    DelRoute(OwnedRoute),
    AddRule(OwnedRule),
    DelRule(OwnedRule),
    /// Replace the whole `inet underlay` table (one atomic `nft -f` batch).
    ReplaceNft(Ruleset),
}

/// The sysctls routed mode needs, `/`-separated (interface names may contain dots):
///
/// - forwarding on;
/// - ICMP redirects neither sent nor accepted: a forwarder sends transit packets back out the interface they
///   came in on, which is exactly when the kernel would otherwise tell the sender to go direct (it cannot: the
///   VPC router, not the peer, decides). `all` and the uplink both, because the kernel ORs them; `default` so
///   later devices (pod veths) inherit it;
/// - rp_filter 2 (loose) on `all`, `default` and the uplink: the kernel uses max(all, device), so this makes
///   every device at least loose. Loose accepts a packet whose source is routable through any device, which
///   tolerates asymmetric paths (strict, 1, drops them whenever the reverse route uses another device), while
///   still dropping sources that are not routable at all, which 0 would let through.
pub fn wanted_sysctls(uplink: &str) -> Vec<(String, String)> {
    let mut v = vec![("net/ipv4/ip_forward".to_string(), "1".to_string())];
    for dev in ["all", "default", uplink] {
        v.push((format!("net/ipv4/conf/{dev}/send_redirects"), "0".into()));
        v.push((format!("net/ipv4/conf/{dev}/accept_redirects"), "0".into()));
        v.push((format!("net/ipv4/conf/{dev}/rp_filter"), "2".into()));
    }
    v
}

/// The routes the agent's table must hold.
pub fn wanted_routes(spec: &RoutedNodeSpec, uplink: &str) -> Vec<OwnedRoute> {
    let mut v: Vec<OwnedRoute> = spec
        .peer_routes
        .iter()
        .map(|r| OwnedRoute {
            destination: r.destination,
            via: Some(r.via),
            dev: Some(uplink.to_string()),
        })
        .collect();
    v.sort();
    v.dedup_by(|a, b| a.destination == b.destination);
    v
}

/// The rule that sends pod-CIDR destinations to the agent's table.
pub fn wanted_rule(spec: &RoutedNodeSpec) -> OwnedRule {
    OwnedRule {
        priority: names::AGENT_RULE_PRIORITY_PEERS,
        to: Some(spec.pod_cidr),
    }
}

/// Plans the changes that bring a node from `observed` to `spec`. Deletes come before adds for rules
/// (priorities are unique per rule), routes are put before stale ones are deleted (make-before-break), the nft
/// table is replaced last. An empty plan means the node is converged.
pub fn plan_node(spec: &RoutedNodeSpec, observed: &NodeObserved) -> Vec<NodeOp> {
    let uplink = observed.uplink.as_str();
    let mut ops = Vec::new();

    for (key, value) in wanted_sysctls(uplink) {
        if observed.sysctls.get(&key) != Some(&value) {
            ops.push(NodeOp::SetSysctl { key, value });
        }
    }

    let want_rule = wanted_rule(spec);
    for r in &observed.rules {
        if *r != want_rule {
            ops.push(NodeOp::DelRule(r.clone()));
        }
    }
    if !observed.rules.contains(&want_rule) {
        ops.push(NodeOp::AddRule(want_rule));
    }

    let want_routes = wanted_routes(spec, uplink);
    for w in &want_routes {
        if !observed.routes.contains(w) {
            ops.push(NodeOp::PutRoute {
                destination: w.destination,
                via: w.via.expect("wanted routes have a gateway"),
                dev: uplink.to_string(),
            });
        }
    }
    for o in &observed.routes {
        if !want_routes.iter().any(|w| w.destination == o.destination) {
            ops.push(NodeOp::DelRoute(o.clone()));
        }
    }

    let ruleset = Ruleset::routed(spec);
    if !observed.nft.as_ref().is_some_and(|n| n.matches(&ruleset)) {
        ops.push(NodeOp::ReplaceNft(ruleset));
    }
    ops
}
