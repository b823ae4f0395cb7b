//! The routed-mode controller on the Kubernetes API: Nodes in, UnderlayNodes and taints out, under the lease of
//! [`crate::lease`].
//!
//! ```text
//!   lead (crate::lease) ──► Leader::run (kube.rs)
//!        watch Nodes ─► providerID ─► DescribeInstances (crate::describe, cached) ─► ClusterNode set ─► Controller::run
//!        watch UnderlayNodes (Ready condition, cached status)                                            │ Pass(plan)
//!        records.rs: UnderlayNode per Node (owner ref, finalizer, labels)                                ▼
//!                    status: pool.block, poolSize, routes, forwarder  ◄────────────────────── plan per node (this file)
//!                    Node: not-ready taint until Ready=True and block routed, podCIDR = block
//! ```
//!
//! The controller starts only once the Node list is complete and every listed node's instance has been described:
//! a pass over a partial node set would delete the routes of the nodes left out.
//!
//! Only the Nodes [`crate::lease::KubeOptions::node_selector`] selects are watched (the watch carries it as its
//! label selector). A Node leaving the selection is released as a deleted one is, and its underlay taints are
//! removed.
//!
//! This file holds the pure parts: what the plan says each UnderlayNode's status and Node's taint should be, and
//! the previous plan as the UnderlayNodes record it.

mod kube;
mod records;

use std::collections::BTreeMap;

use ::kube::ResourceExt;
use k8s_openapi::api::core::v1::{Node, Taint};
use underlay_api::{
    ForwarderRole, ForwarderRoute, Mode, PeerRoute, Pool, UnderlayNode, UnderlayNodeSpec,
};
use underlay_cloud::InstanceId;
use underlay_core::names;
use underlay_core::planner::RoutedPlan;

use crate::config::ClusterNode;

pub use kube::run_routed_on_kube;

/// Reasons and action of the Kubernetes Events the leader records on Nodes.
pub const REASON_FORWARDER_FAILED: &str = "ForwarderFailed";
pub const REASON_FORWARDER_HEALTHY: &str = "ForwarderHealthy";
pub const REASON_ROUTES_MOVED: &str = "RoutesMoved";
/// Reason of the Warning Event recorded on the leader Lease for each route inside the pod CIDR that is not this
/// cluster's (left untouched, its destination planned around).
pub const REASON_FOREIGN_ROUTE: &str = "ForeignRoute";
pub const ACTION_PLAN_AROUND: &str = "PlanAround";
pub const ACTION_FAILOVER: &str = "Failover";

/// What the controller learned about a node's instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInstance {
    pub instance: InstanceId,
    pub zone: String,
    pub node: ClusterNode,
}

/// The controller-owned part of an UnderlayNode's status for `node` under `plan`: pool, poolSize, peer routes,
/// forwarder role. `None` when the plan gives the node no block.
pub fn status_fields(
    plan: &RoutedPlan,
    node: &str,
) -> Option<(Pool, u32, Vec<PeerRoute>, Option<ForwarderRole>)> {
    let block = plan.block_of(node)?;
    let size = 1u64 << (32 - u32::from(block.prefix_len()));
    let routes = plan
        .peer_routes(node)
        .into_iter()
        .map(|r| PeerRoute {
            destination: r.destination.to_string(),
            via: r.via.to_string(),
        })
        .collect();
    let forwarded: Vec<ForwarderRoute> = plan
        .route_tables
        .iter()
        .flat_map(|t| {
            plan.routes
                .iter()
                .filter(|r| r.forwarder.as_deref() == Some(node))
                .map(|r| ForwarderRoute {
                    route_table_id: t.id.clone(),
                    destination: r.destination.to_string(),
                })
        })
        .collect();
    Some((
        Pool {
            block: Some(block.to_string()),
            ..Pool::default()
        },
        u32::try_from(size).unwrap_or(u32::MAX),
        routes,
        (!forwarded.is_empty()).then(|| ForwarderRole::new(forwarded)),
    ))
}

/// The previous plan as the UnderlayNodes record it (block, subnet, forwarder routes in status; subnet region in
/// the [`names::ANNOTATION_SUBNET_REGION`] annotation), for a new leader to plan from so blocks never move. Only
/// what the planner reads back is filled in (subnet regions, blocks, routes and their forwarders); the figures
/// are zero. `None` when no UnderlayNode has a block.
pub fn previous_plan(
    pod_cidr: ipnet::Ipv4Net,
    block_prefix_len: u8,
    uns: &[UnderlayNode],
) -> Option<RoutedPlan> {
    use underlay_core::planner::{BlockAssignment, PlanMode, SubnetPlan, VpcRoute};
    let mut blocks = Vec::new();
    let mut routes: BTreeMap<ipnet::Ipv4Net, VpcRoute> = BTreeMap::new();
    let mut subnets: BTreeMap<String, SubnetPlan> = BTreeMap::new();
    for un in uns.iter().filter(|u| u.spec.mode == Mode::Routed) {
        let name = un.name_any();
        let Some(st) = &un.status else { continue };
        let Some(block) = st
            .pool
            .as_ref()
            .and_then(|p| p.block.as_deref())
            .and_then(|b| b.parse::<ipnet::Ipv4Net>().ok())
        else {
            continue;
        };
        let Ok(node_ip) = un.spec.node_ip.parse() else {
            continue;
        };
        let region = un
            .annotations()
            .get(names::ANNOTATION_SUBNET_REGION)
            .and_then(|r| r.parse().ok());
        let sp = subnets
            .entry(un.spec.subnet_id.clone())
            .or_insert_with(|| SubnetPlan {
                id: un.spec.subnet_id.clone(),
                zone: un.spec.zone.clone(),
                region: None,
                route_table: None,
                nodes: 0,
                healthy_nodes: 0,
                routes: 0,
                forwarders: 0,
                max_nodes_per_forwarder: 0,
                balanced_bound: 0,
                extra_hop_nodes: 0,
            });
        sp.region = sp.region.or(region);
        blocks.push(BlockAssignment {
            node: name.clone(),
            subnet: un.spec.subnet_id.clone(),
            zone: un.spec.zone.clone(),
            node_ip,
            eni: un.spec.primary_eni_id.clone(),
            healthy: true,
            block,
            route: None,
            via: None,
            extra_hop: false,
        });
        for r in st.forwarder.iter().flat_map(|f| &f.routes) {
            let Ok(destination) = r.destination.parse() else {
                continue;
            };
            routes.entry(destination).or_insert_with(|| VpcRoute {
                destination,
                subnet: un.spec.subnet_id.clone(),
                zone: un.spec.zone.clone(),
                forwarder: Some(name.clone()),
                eni: Some(un.spec.primary_eni_id.clone()),
                forwarder_ip: Some(node_ip),
                nodes: 0,
                forwarder_inside: false,
                // Statuses do not record homes: failed-over routes stay on their replacement after a leader change.
                home: None,
            });
        }
    }
    if blocks.is_empty() {
        return None;
    }
    Some(RoutedPlan {
        pod_cidr,
        block_prefix_len,
        mode: PlanMode::Aggregated,
        route_limit: 0,
        foreign_routes: 0,
        headroom: 0,
        budget: 0,
        routes_per_table: 0,
        nodes: u32::try_from(blocks.len()).unwrap_or(u32::MAX),
        healthy_nodes: 0,
        forwarders: 0,
        max_nodes_per_forwarder: 0,
        extra_hop_fraction: 0.0,
        route_tables: vec![],
        subnets: subnets.into_values().collect(),
        routes: routes.into_values().collect(),
        blocks,
        warnings: vec![],
    })
}

/// The region of `node`'s subnet in `plan`.
fn region_of(plan: &RoutedPlan, node: &str) -> Option<ipnet::Ipv4Net> {
    let subnet = &plan.blocks.iter().find(|b| b.node == node)?.subnet;
    plan.subnets.iter().find(|s| &s.id == subnet)?.region
}

/// The plan still gives `node` a block or makes it a forwarder.
pub fn in_plan(plan: &RoutedPlan, node: &str) -> bool {
    plan.blocks.iter().any(|b| b.node == node)
        || plan
            .routes
            .iter()
            .any(|r| r.forwarder.as_deref() == Some(node))
}

/// Whether a Node should carry the not-ready taint: not while its UnderlayNode is Ready and its block routed
/// (`routed`: `None` before the leader's first pass that planned — a new leader keeps a Ready node's taint as it
/// is rather than taint every node of the cluster until its first pass). Pure.
pub fn wants_not_ready_taint(ready: bool, routed: Option<bool>, tainted: bool) -> bool {
    match (ready, routed) {
        (false, _) => true,
        (true, Some(routed)) => !routed,
        (true, None) => tainted,
    }
}

fn has_not_ready_taint(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == names::TAINT_NOT_READY))
}

fn not_ready_taint() -> Taint {
    Taint {
        key: names::TAINT_NOT_READY.to_string(),
        effect: "NoSchedule".to_string(),
        ..Default::default()
    }
}

fn spec_of(inst: &NodeInstance) -> UnderlayNodeSpec {
    UnderlayNodeSpec {
        instance_id: inst.instance.0.clone(),
        subnet_id: inst.node.subnet.0.clone(),
        zone: inst.zone.clone(),
        mode: Mode::Routed,
        node_ip: inst.node.ip.to_string(),
        primary_eni_id: inst.node.eni.0.clone(),
    }
}

fn labels_for(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (names::LABEL_NODE.to_string(), name.to_string()),
        (names::LABEL_MODE.to_string(), "routed".to_string()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_taint_needs_ready_and_routed() {
        for tainted in [false, true] {
            assert!(wants_not_ready_taint(false, Some(true), tainted));
            assert!(wants_not_ready_taint(false, None, tainted));
            assert!(wants_not_ready_taint(true, Some(false), tainted));
            assert!(!wants_not_ready_taint(true, Some(true), tainted));
            // Routing unknown (a new leader before its first pass): left as it is.
            assert_eq!(wants_not_ready_taint(true, None, tainted), tainted);
        }
    }
}
