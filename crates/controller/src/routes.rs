//! The routed-mode route reconciler: observe every managed route table → plan → apply only the diff.
//!
//! ```text
//!   DescribeSubnets (cached) ─┐
//!   DescribeRouteTables ──────┼─► managed_tables ─► build_topology ─► planner::plan(topo, previous)
//!   nodes + healthy set ──────┘                                            │
//!                                                  observed tables ─► routeops::diff ─► Vec<RouteOp>
//!                                                                          │  (per table, in order)
//!                                                  apply_route_op ◄────────┘  one task per table
//! ```
//!
//! Ownership by proof ([`underlay_core::owned`]): a route in a managed table is underlay's only when its
//! destination lies inside the pod CIDR **and** it targets an ENI of this cluster — a node's primary ENI, an ENI
//! the previous plan names, or one an earlier pass found targeted by an owned route (kept while a route still
//! targets it, so the route of a node that left is still cleaned up). Every other route is foreign: never touched,
//! counted against the table's limit; one inside the pod CIDR (another cluster's, a transit gateway's, a secondary
//! CIDR's `local`) is also planned around (its destination is taken) and reported in
//! [`ReconcileReport::foreign_routes`]. `local` routes do not count against the limit (EC2 and vpcsim do not count
//! them).
//!
//! Idempotency lives in [`apply_route_op`] only: a Create that finds the route already there is an error, never a
//! Replace (the route appeared since the describe and nothing proves it ours: another cluster may have just made
//! it; the next pass's describe decides — ours, no change; foreign, planned around), a
//! Replace that finds none becomes a Create, a Delete that finds none is done.
//!
//! Errors: a retryable error (throttling, EC2 5xx, transport) stops the pass (every table stops before its next
//! call) and the report says `retryable`, so the caller requeues with backoff. Any other error stops the rest of
//! that table's operations (they are ordered make-before-break: a Delete after a failed Create would break
//! traffic) and the other tables go on.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ipnet::Ipv4Net;

use serde::Serialize;
use underlay_cloud::{
    CloudError, EniId, ErrorKind, Route, RouteState, RouteTable, RouteTableId, RouteTarget, Subnet,
    SubnetId,
};
use underlay_core::owned::{Ownership, RouteOwner, in_pod_cidr};
use underlay_core::planner::{PlanError, RoutedPlan, plan};
use underlay_core::routeops::{ObservedRoute, ObservedTable, RouteOp, diff_owned, plan_ownership};
use underlay_core::topology::{
    ClusterConfig, ForeignRoute, Node, RouteTable as TopoTable, Subnet as TopoSubnet, Topology, Vpc,
};

use crate::config::{ClusterNode, ManagedTables, RoutedConfig};
use crate::lanes::{CloudLanes, Priority};

/// Why a pass (or part of it) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReconcileError {
    #[error("describing {what}: {error}")]
    Observe {
        what: &'static str,
        error: CloudError,
    },
    #[error("managed route table {table} is not in VPC {vpc}")]
    UnknownRouteTable { table: RouteTableId, vpc: String },
    #[error(
        "pod CIDR conflict: route table {table} routes {destination} (inside the pod CIDR) to {target}, a live ENI \
         that is not this cluster's (another cluster with the same pod CIDR?); refusing to start: give this cluster \
         another pod CIDR, or remove that route"
    )]
    PodCidrConflict {
        table: RouteTableId,
        destination: Ipv4Net,
        target: String,
    },
    #[error("planning: {0}")]
    Plan(#[serde(serialize_with = "ser_display")] PlanError),
    #[error("{op}: {error}")]
    Apply { op: RouteOp, error: CloudError },
}

fn ser_display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl ReconcileError {
    /// Worth requeueing the pass with backoff.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReconcileError::Observe { error, .. } | ReconcileError::Apply { error, .. } => {
                error.is_retryable()
            }
            ReconcileError::UnknownRouteTable { .. }
            | ReconcileError::PodCidrConflict { .. }
            | ReconcileError::Plan(_) => false,
        }
    }

    /// Label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::Observe { .. } => "observe",
            ReconcileError::UnknownRouteTable { .. } => "unknown_route_table",
            ReconcileError::PodCidrConflict { .. } => "pod_cidr_conflict",
            ReconcileError::Plan(_) => "plan",
            ReconcileError::Apply { .. } => "apply",
        }
    }
}

/// How an operation landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The call did what the operation says.
    Done,
    /// ReplaceRoute found no route; CreateRoute made it.
    ReplaceBecameCreate,
    /// DeleteRoute found no route (`InvalidRoute.NotFound`): nothing to do.
    AlreadyDeleted,
}

/// One applied operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub op: RouteOp,
    pub priority: Priority,
    pub outcome: Outcome,
}

/// What one pass observed, planned and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReconcileReport {
    /// The pass's priority (a failure-triggered pass is `failover`).
    pub priority: Priority,
    pub managed_tables: Vec<RouteTableId>,
    /// The plan this pass applied (also kept as the next pass's previous plan).
    pub plan: Option<RoutedPlan>,
    /// Operations the diff asked for, in order.
    pub planned: Vec<RouteOp>,
    pub applied: Vec<Applied>,
    /// Operations not attempted: after a retryable error, or after an error earlier in their table.
    pub skipped: Vec<RouteOp>,
    pub errors: Vec<ReconcileError>,
    /// Non-fatal findings: planner warnings, nodes left out.
    pub warnings: Vec<String>,
    /// The pass stopped on a retryable error: requeue it with backoff.
    pub retryable: bool,
    /// Operations left for the next pass: a normal pass applies at most `max_ops_per_pass`, the
    /// least specific first, so that it reports (and nodes become ready) while the rate limit paces the rest.
    pub deferred: Vec<RouteOp>,
    /// Nodes whose block the managed tables deliver now (after this pass's calls): in every table, the most
    /// specific route covering the block targets a healthy node of the block's subnet. `None` when not computed.
    pub reachable: Option<BTreeSet<String>>,
    /// Foreign routes inside the pod CIDR in the managed tables: left untouched, their destinations planned around.
    pub foreign_routes: Vec<ForeignRouteFinding>,
    /// A failover pass that planned from the previous pass's observation (kept up to date with this
    /// controller's own calls) instead of describing the tables first: its ReplaceRoute calls leave the moment
    /// the failure is confirmed. The run loop follows it with a normal pass, which describes.
    pub observed_from_cache: bool,
}

/// A route inside the pod CIDR that is not this cluster's (its target is no ENI of this cluster).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ForeignRouteFinding {
    pub route_table: RouteTableId,
    pub destination: Ipv4Net,
    /// As EC2 reports it: `eni-…` (another cluster's), `tgw-…`, `pcx-…`, `local` (a secondary CIDR), ….
    pub target: String,
}

impl std::fmt::Display for ForeignRouteFinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} → {} is inside the pod CIDR but not this cluster's: left untouched, its destination taken",
            self.route_table, self.destination, self.target
        )
    }
}

impl ReconcileReport {
    /// No error and nothing skipped: the tables match the plan.
    pub fn converged(&self) -> bool {
        self.errors.is_empty() && self.skipped.is_empty() && self.plan.is_some()
    }
    /// EC2 mutating calls' worth of operations applied.
    pub fn mutations(&self) -> usize {
        self.applied.len()
    }

    /// The nodes whose pod block this pass left reachable from every managed table; `None` when the pass did not
    /// plan (it learned nothing about the tables). A node is routed when
    ///
    /// - the plan gives it a block, and the plan's longest-prefix route covering the block targets the primary ENI
    ///   of a healthy node of the block's subnet (not so in a subnet without a healthy node), and
    /// - no operation on that route, nor on a more specific owned route overlapping the block, was skipped or
    ///   failed in any managed table: every other operation the diff asked for was applied, and a table the diff
    ///   asked nothing of already held the plan's routes.
    ///
    /// A failure elsewhere (another block's route, a less specific route the block does not depend on) does not
    /// count against the node. Pure.
    pub fn routed_nodes(&self) -> Option<BTreeSet<String>> {
        let plan = self.plan.as_ref()?;
        if let Some(r) = &self.reachable {
            return Some(r.clone());
        }
        let mut routed = BTreeSet::new();
        if self.managed_tables.is_empty() {
            return Some(routed);
        }
        let unsettled: Vec<Ipv4Net> = self
            .skipped
            .iter()
            .chain(self.errors.iter().filter_map(|e| match e {
                ReconcileError::Apply { op, .. } => Some(op),
                _ => None,
            }))
            .map(RouteOp::destination)
            .collect();
        for b in &plan.blocks {
            let Some(route) = plan
                .routes
                .iter()
                .filter(|r| r.destination.contains(&b.block))
                .max_by_key(|r| r.destination.prefix_len())
            else {
                continue;
            };
            let (Some(eni), Some(forwarder)) = (route.eni.as_deref(), route.forwarder.as_deref())
            else {
                continue;
            };
            let forwards = plan
                .blocks
                .iter()
                .any(|f| f.node == forwarder && f.healthy && f.subnet == b.subnet && f.eni == eni);
            let blocked = unsettled.iter().any(|d| {
                d.prefix_len() >= route.destination.prefix_len()
                    && (d.contains(&b.block) || b.block.contains(d))
            });
            if forwards && !blocked {
                routed.insert(b.node.clone());
            }
        }
        Some(routed)
    }
}

fn target_string(t: &RouteTarget) -> String {
    match t {
        RouteTarget::Local => "local".to_string(),
        RouteTarget::NetworkInterface(e) => e.0.clone(),
        RouteTarget::Instance(i) => i.0.clone(),
        RouteTarget::Gateway(g) => g.clone(),
    }
}

/// The tables to manage, with the subnets each serves (explicit associations, plus the implicitly associated
/// subnets for the main table). Pure.
pub fn managed_tables(
    config: &RoutedConfig,
    ownership: &Ownership,
    tables: &[RouteTable],
    subnets: &[Subnet],
    nodes: &[ClusterNode],
) -> (Vec<(RouteTable, Vec<SubnetId>)>, Vec<ReconcileError>) {
    let explicit: BTreeSet<&SubnetId> = tables.iter().flat_map(|t| &t.subnets).collect();
    let served = |t: &RouteTable| -> Vec<SubnetId> {
        let mut s: Vec<SubnetId> = t.subnets.clone();
        if t.main {
            s.extend(
                subnets
                    .iter()
                    .filter(|x| !explicit.contains(&x.id))
                    .map(|x| x.id.clone()),
            );
        }
        s.sort();
        s.dedup();
        s
    };
    let mut errors = Vec::new();
    let chosen: Vec<&RouteTable> = match &config.route_tables {
        ManagedTables::Explicit(ids) => ids
            .iter()
            .filter_map(|id| {
                let t = tables.iter().find(|t| &t.id == id);
                if t.is_none() {
                    errors.push(ReconcileError::UnknownRouteTable {
                        table: id.clone(),
                        vpc: config.vpc.0.clone(),
                    });
                }
                t
            })
            .collect(),
        ManagedTables::NodeSubnets => {
            let node_subnets: BTreeSet<&SubnetId> = nodes.iter().map(|n| &n.subnet).collect();
            tables
                .iter()
                .filter(|t| {
                    served(t).iter().any(|s| node_subnets.contains(s))
                        || t.routes
                            .iter()
                            .any(|r| ownership.owns(r.destination, &target_string(&r.target)))
                })
                .collect()
        }
    };
    let mut out: Vec<(RouteTable, Vec<SubnetId>)> =
        chosen.into_iter().map(|t| (t.clone(), served(t))).collect();
    out.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    out.dedup_by(|a, b| a.0.id == b.0.id);
    (out, errors)
}

/// The planner's view and the diff's view of the world. Pure. Nodes whose subnet is not among `subnets` are left
/// out and named in the returned warnings. Every route `ownership` does not prove ours is the planner's foreign
/// route (it counts against the limit; inside the pod CIDR its destination is taken).
pub fn build_topology(
    config: &RoutedConfig,
    ownership: &Ownership,
    subnets: &[Subnet],
    managed: &[(RouteTable, Vec<SubnetId>)],
    nodes: &[ClusterNode],
    healthy: &BTreeSet<String>,
) -> (Topology, Vec<ObservedTable>, Vec<String>) {
    let known: BTreeSet<&SubnetId> = subnets.iter().map(|s| &s.id).collect();
    let mut warnings = Vec::new();
    let mut topo_nodes = Vec::with_capacity(nodes.len());
    for n in nodes {
        if !known.contains(&n.subnet) {
            warnings.push(format!(
                "node {} left out: subnet {} is not in VPC {}",
                n.name, n.subnet, config.vpc
            ));
            continue;
        }
        topo_nodes.push(Node {
            id: n.name.clone(),
            subnet: n.subnet.0.clone(),
            ip: n.ip,
            eni: n.eni.0.clone(),
            healthy: healthy.contains(&n.name),
        });
    }
    let mut topo_tables = Vec::with_capacity(managed.len());
    let mut observed = Vec::with_capacity(managed.len());
    for (t, served) in managed {
        let limit = config.route_limit_of(&t.id);
        // `local` routes do not count against the limit, but one inside the pod CIDR (a secondary CIDR's) is a
        // foreign destination like any other (counting it costs at most one route of budget).
        let routes: Vec<ObservedRoute> = t
            .routes
            .iter()
            .filter(|r| {
                r.target != RouteTarget::Local || in_pod_cidr(r.destination, config.pod_cidr)
            })
            .map(|r| ObservedRoute {
                destination: r.destination,
                target: target_string(&r.target),
            })
            .collect();
        topo_tables.push(TopoTable {
            id: t.id.0.clone(),
            subnets: served
                .iter()
                .filter(|s| known.contains(s))
                .map(|s| s.0.clone())
                .collect(),
            route_limit: limit,
            foreign_routes: routes
                .iter()
                .filter(|r| !ownership.owns(r.destination, &r.target))
                .map(|r| ForeignRoute {
                    destination: r.destination,
                    target: r.target.clone(),
                })
                .collect(),
        });
        observed.push(ObservedTable {
            id: t.id.0.clone(),
            route_limit: limit,
            routes,
        });
    }
    let topo = Topology {
        cluster: ClusterConfig {
            pod_cidr: config.pod_cidr,
            block_prefix_len: config.block_prefix_len,
            headroom: config.headroom,
        },
        vpc: Vpc {
            id: config.vpc.0.clone(),
            subnets: subnets
                .iter()
                .map(|s| TopoSubnet {
                    id: s.id.0.clone(),
                    zone: s.zone.clone(),
                    cidr: s.cidr,
                })
                .collect(),
            route_tables: topo_tables,
        },
        nodes: topo_nodes,
    };
    (topo, observed, warnings)
}

/// An operation that moves a route away from a target that is not a healthy node's ENI (a failed forwarder, a
/// node that left) is a failover; everything else is normal.
pub fn op_priority(op: &RouteOp, healthy_enis: &BTreeSet<&str>) -> Priority {
    match op {
        RouteOp::Replace { previous, .. } if !healthy_enis.contains(previous.as_str()) => {
            Priority::Failover
        }
        _ => Priority::Normal,
    }
}

/// Apply one operation. The only place where "already exists" and "not found" become success.
pub async fn apply_route_op(
    cloud: &dyn underlay_cloud::Cloud,
    op: &RouteOp,
) -> Result<Outcome, CloudError> {
    match op {
        RouteOp::Create {
            route_table,
            destination,
            eni,
        } => {
            let (table, target) = (RouteTableId::new(route_table), eni_target(eni));
            // `RouteAlreadyExists` stays an error: taking the route over could take another cluster's.
            cloud
                .create_route(&table, *destination, &target)
                .await
                .map(|()| Outcome::Done)
        }
        RouteOp::Replace {
            route_table,
            destination,
            eni,
            ..
        } => {
            let (table, target) = (RouteTableId::new(route_table), eni_target(eni));
            match cloud.replace_route(&table, *destination, &target).await {
                Ok(()) => Ok(Outcome::Done),
                // EC2 answers a ReplaceRoute of a missing route with InvalidParameterValue ("There is no route
                // defined for …"); a route that vanished since the describe becomes a Create. If the parameter
                // was wrong for another reason, CreateRoute rejects it too and its error is reported.
                Err(e)
                    if e.code == "InvalidParameterValue" || e.code == "InvalidRoute.NotFound" =>
                {
                    match cloud.create_route(&table, *destination, &target).await {
                        Ok(()) => Ok(Outcome::ReplaceBecameCreate),
                        Err(create) if create.kind == ErrorKind::AlreadyExists => Err(e),
                        Err(create) => Err(create),
                    }
                }
                Err(e) => Err(e),
            }
        }
        RouteOp::Delete {
            route_table,
            destination,
            ..
        } => match cloud
            .delete_route(&RouteTableId::new(route_table), *destination)
            .await
        {
            Ok(()) => Ok(Outcome::Done),
            Err(e) if e.kind == ErrorKind::NotFound && e.code == "InvalidRoute.NotFound" => {
                Ok(Outcome::AlreadyDeleted)
            }
            Err(e) => Err(e),
        },
    }
}

fn eni_target(eni: &str) -> RouteTarget {
    RouteTarget::NetworkInterface(EniId::new(eni))
}

#[derive(Debug, Default)]
struct TableResult {
    applied: Vec<Applied>,
    skipped: Vec<RouteOp>,
    errors: Vec<ReconcileError>,
    retryable: bool,
}

/// Apply one table's operations in order; stop at the first error (and every table at a retryable one).
async fn apply_table(
    lanes: Arc<dyn CloudLanes>,
    ops: Vec<(RouteOp, Priority)>,
    stop: Arc<AtomicBool>,
) -> TableResult {
    let mut r = TableResult::default();
    let mut ops = ops.into_iter();
    for (op, priority) in ops.by_ref() {
        if stop.load(Ordering::SeqCst) {
            r.skipped.push(op);
            break;
        }
        match apply_route_op(lanes.lane(priority), &op).await {
            Ok(outcome) => {
                tracing::info!(%op, priority = priority.as_str(), ?outcome, "route applied");
                r.applied.push(Applied {
                    op,
                    priority,
                    outcome,
                });
            }
            Err(error) => {
                let retryable = error.is_retryable();
                tracing::warn!(%op, %error, retryable, "route operation failed");
                if retryable {
                    stop.store(true, Ordering::SeqCst);
                    r.retryable = true;
                }
                r.errors.push(ReconcileError::Apply { op, error });
                break;
            }
        }
    }
    r.skipped.extend(ops.map(|(op, _)| op));
    r
}

/// Observes, plans and applies routed-mode VPC routes. Keeps the previous plan in memory (blocks never move
/// while it is kept) and the VPC's subnets (refreshed on [`RouteReconciler::invalidate_subnets`] or when a node
/// names a subnet not seen yet).
#[derive(Debug)]
pub struct RouteReconciler {
    config: RoutedConfig,
    lanes: Arc<dyn CloudLanes>,
    previous: Option<RoutedPlan>,
    subnets: Option<Vec<Subnet>>,
    /// ENIs an owned route targeted when last observed (beyond the nodes' and the previous plan's): the route
    /// of a node that left stays provably ours until it is gone.
    routed_enis: BTreeSet<String>,
    /// The route tables as the last describe saw them, with this controller's successful calls since applied,
    /// and when they were described. A failover pass plans from it while it is younger than
    /// [`RoutedConfig::failover_observation_max_age`]; any failed call drops it.
    observed: Option<(Vec<RouteTable>, tokio::time::Instant)>,
}

/// `tables` after `applied` (this controller's successful calls): what a describe would show, barring other
/// writers. Pure.
pub fn apply_to_tables(tables: &mut [RouteTable], applied: &[Applied]) {
    for a in applied {
        let Some(t) = tables
            .iter_mut()
            .find(|t| t.id.as_str() == a.op.route_table())
        else {
            continue;
        };
        let dst = a.op.destination();
        t.routes.retain(|r| r.destination != dst);
        match &a.op {
            RouteOp::Create { eni, .. } | RouteOp::Replace { eni, .. } => t.routes.push(Route {
                destination: dst,
                target: eni_target(eni),
                state: RouteState::Active,
            }),
            RouteOp::Delete { .. } => {}
        }
    }
}

impl RouteReconciler {
    pub fn new(config: RoutedConfig, lanes: Arc<dyn CloudLanes>) -> Self {
        Self {
            config,
            lanes,
            previous: None,
            subnets: None,
            routed_enis: BTreeSet::new(),
            observed: None,
        }
    }

    /// What proves a route ours in this pass: the nodes' primary ENIs, the previous plan's ENIs and the ENIs
    /// owned routes targeted when last observed.
    pub fn ownership(&self, nodes: &[ClusterNode]) -> Ownership {
        let mut o = self
            .previous
            .as_ref()
            .map(plan_ownership)
            .unwrap_or_default();
        o.pod_cidr = self.config.pod_cidr;
        o.cluster_enis.extend(nodes.iter().map(|n| n.eni.0.clone()));
        o.cluster_enis.extend(self.routed_enis.iter().cloned());
        o
    }

    pub fn config(&self) -> &RoutedConfig {
        &self.config
    }

    /// The plan of the last pass that planned (the next pass's previous plan).
    pub fn previous(&self) -> Option<&RoutedPlan> {
        self.previous.as_ref()
    }

    /// Start from a persisted plan (e.g. read back from UnderlayNode status after a restart).
    pub fn set_previous(&mut self, plan: Option<RoutedPlan>) {
        self.previous = plan;
    }

    /// Describe the VPC's subnets again on the next pass.
    pub fn invalidate_subnets(&mut self) {
        self.subnets = None;
    }

    /// One pass: observe → plan → diff → apply. `healthy` names the nodes that may forward; `priority` is the
    /// pass's (a failure-triggered pass describes on the failover lane). Never panics on cloud errors: everything
    /// goes into the report.
    pub async fn reconcile(
        &mut self,
        nodes: &[ClusterNode],
        healthy: &BTreeSet<String>,
        priority: Priority,
    ) -> ReconcileReport {
        let mut report = ReconcileReport {
            priority,
            ..Default::default()
        };
        let lane = self.lanes.lane(priority);
        let vpc = self.config.vpc.clone();

        // Observe.
        let stale = match &self.subnets {
            None => true,
            Some(s) => nodes.iter().any(|n| !s.iter().any(|x| x.id == n.subnet)),
        };
        if stale {
            match lane.describe_subnets(&vpc).await {
                Ok(s) => self.subnets = Some(s),
                Err(error) => {
                    report.retryable = error.is_retryable();
                    report.errors.push(ReconcileError::Observe {
                        what: "subnets",
                        error,
                    });
                    return report;
                }
            }
        }
        let subnets = self.subnets.as_deref().unwrap_or_default();
        // A failure is confirmed: plan from what the last pass saw (and did) rather than wait for a describe, so
        // the ReplaceRoute calls leave now; the normal pass that follows describes and corrects anything missed.
        let cached = match &self.observed {
            Some((t, at))
                if priority == Priority::Failover
                    && at.elapsed() <= self.config.failover_observation_max_age =>
            {
                Some(t.clone())
            }
            _ => None,
        };
        report.observed_from_cache = cached.is_some();
        let tables = match cached {
            Some(t) => t,
            None => match lane.describe_route_tables(&vpc).await {
                Ok(t) => {
                    self.observed = Some((t.clone(), tokio::time::Instant::now()));
                    t
                }
                Err(error) => {
                    self.observed = None;
                    report.retryable = error.is_retryable();
                    report.errors.push(ReconcileError::Observe {
                        what: "route tables",
                        error,
                    });
                    return report;
                }
            },
        };
        let ownership = self.ownership(nodes);
        let (managed, errors) = managed_tables(&self.config, &ownership, &tables, subnets, nodes);
        report.errors.extend(errors);
        // Remember the ENIs owned routes target now; forget those no route targets any more.
        self.routed_enis = managed
            .iter()
            .flat_map(|(t, _)| &t.routes)
            .map(|r| (r.destination, target_string(&r.target)))
            .filter(|(d, t)| ownership.owns(*d, t))
            .map(|(_, t)| t)
            .collect();
        report.foreign_routes = managed
            .iter()
            .flat_map(|(t, _)| {
                t.routes.iter().filter_map(|r| {
                    let target = target_string(&r.target);
                    (ownership.classify(r.destination, &target) == RouteOwner::Foreign).then(|| {
                        ForeignRouteFinding {
                            route_table: t.id.clone(),
                            destination: r.destination,
                            target,
                        }
                    })
                })
            })
            .collect();
        report.managed_tables = managed.iter().map(|(t, _)| t.id.clone()).collect();
        if managed.is_empty() {
            report
                .warnings
                .push("no managed route table: nothing to reconcile".to_string());
            return report;
        }

        // A cluster that has not planned yet refuses to start beside another's routes: a live ENI that is not
        // ours holding a route inside the pod CIDR. Once running, such a route is planned around like any foreign
        // one (failover must go on), and reported.
        if self.previous.is_none() {
            let conflicts: Vec<ReconcileError> = managed
                .iter()
                .flat_map(|(t, _)| {
                    t.routes
                        .iter()
                        .filter(|r| {
                            matches!(r.target, RouteTarget::NetworkInterface(_))
                                && r.state == RouteState::Active
                                && ownership.classify(r.destination, &target_string(&r.target))
                                    == RouteOwner::Foreign
                        })
                        .map(|r| ReconcileError::PodCidrConflict {
                            table: t.id.clone(),
                            destination: r.destination,
                            target: target_string(&r.target),
                        })
                })
                .collect();
            if !conflicts.is_empty() {
                report.errors.extend(conflicts);
                return report;
            }
        }

        // Plan.
        let (topo, observed, warnings) =
            build_topology(&self.config, &ownership, subnets, &managed, nodes, healthy);
        report.warnings.extend(warnings);
        let plan = match plan(&topo, self.previous.as_ref()) {
            Ok(p) => p,
            Err(e) => {
                report.errors.push(ReconcileError::Plan(e));
                return report;
            }
        };
        report
            .warnings
            .extend(plan.warnings.iter().map(ToString::to_string));
        let mut ops = diff_owned(&plan, &observed, &ownership);
        self.previous = Some(plan.clone());
        report.planned = ops.clone();
        if let Some(max) = self.config.max_ops_per_pass
            && priority == Priority::Normal
            && ops.len() > max
        {
            report.deferred = defer_specific(&mut ops, max.max(1));
        }

        // Apply: one task per table, each in the diff's order.
        let healthy_enis: BTreeSet<&str> = nodes
            .iter()
            .filter(|n| healthy.contains(&n.name))
            .map(|n| n.eni.as_str())
            .collect();
        let mut by_table: BTreeMap<String, Vec<(RouteOp, Priority)>> = BTreeMap::new();
        for op in ops {
            let p = op_priority(&op, &healthy_enis);
            by_table
                .entry(op.route_table().to_string())
                .or_default()
                .push((op, p));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        let order: Vec<String> = by_table.keys().cloned().collect();
        for (i, (_, ops)) in by_table.into_iter().enumerate() {
            let (lanes, stop) = (self.lanes.clone(), stop.clone());
            tasks.spawn(async move { (i, apply_table(lanes, ops, stop).await) });
        }
        let mut results: Vec<Option<TableResult>> = order.iter().map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, r)) => results[i] = Some(r),
                Err(e) => report
                    .warnings
                    .push(format!("route table task ended abnormally: {e}")),
            }
        }
        for r in results.into_iter().flatten() {
            report.applied.extend(r.applied);
            report.skipped.extend(r.skipped);
            report.errors.extend(r.errors);
            report.retryable |= r.retryable;
        }
        // Keep the observation in step with what this pass did; after a failed call nothing is sure any more.
        if report.errors.is_empty() {
            if let Some((t, _)) = &mut self.observed {
                apply_to_tables(t, &report.applied);
            }
        } else {
            self.observed = None;
        }
        report.reachable = Some(reachable_nodes(
            &plan,
            &managed,
            &report.applied,
            nodes,
            healthy,
        ));
        report.plan = Some(plan);
        report
    }
}

/// A cap for [`RoutedConfig::max_ops_per_pass`] behind the default rate-aware queue: under its burst of mutating
/// calls, so a pass that would take minutes under the refill rate reports after a few seconds at most.
pub const DEFAULT_QUEUED_OPS_PER_PASS: usize = 8;

/// Keep in `ops` the `max` least specific operations (covering routes first: one route to a subnet's region
/// delivers every block in it), in their original order; return the rest, in their original order. Pure.
pub fn defer_specific(ops: &mut Vec<RouteOp>, max: usize) -> Vec<RouteOp> {
    let mut idx: Vec<usize> = (0..ops.len()).collect();
    idx.sort_by_key(|&i| (ops[i].destination().prefix_len(), i));
    let keep: BTreeSet<usize> = idx.into_iter().take(max).collect();
    let (mut kept, mut deferred) = (Vec::new(), Vec::new());
    for (i, op) in ops.drain(..).enumerate() {
        if keep.contains(&i) {
            kept.push(op);
        } else {
            deferred.push(op);
        }
    }
    *ops = kept;
    deferred
}

/// The nodes whose block the managed tables deliver, as observed at the start of the pass plus the calls that
/// succeeded: in every table the longest-prefix route covering the block targets the ENI of a healthy node in
/// the block's subnet (every node of a subnet routes to every block of it, so any of them delivers). Pure.
pub fn reachable_nodes(
    plan: &RoutedPlan,
    managed: &[(RouteTable, Vec<SubnetId>)],
    applied: &[Applied],
    nodes: &[ClusterNode],
    healthy: &BTreeSet<String>,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if managed.is_empty() {
        return out;
    }
    let mut tables: BTreeMap<&str, BTreeMap<Ipv4Net, String>> = BTreeMap::new();
    for (t, _) in managed {
        let routes = tables.entry(t.id.0.as_str()).or_default();
        for r in t.routes.iter().filter(|r| r.state == RouteState::Active) {
            routes.insert(r.destination, target_string(&r.target));
        }
    }
    for a in applied {
        let Some(routes) = tables.get_mut(a.op.route_table()) else {
            continue;
        };
        match &a.op {
            RouteOp::Create {
                destination, eni, ..
            }
            | RouteOp::Replace {
                destination, eni, ..
            } => {
                routes.insert(*destination, eni.clone());
            }
            RouteOp::Delete { destination, .. } => {
                routes.remove(destination);
            }
        }
    }
    for b in &plan.blocks {
        let delivers: BTreeSet<&str> = nodes
            .iter()
            .filter(|n| n.subnet.0 == b.subnet && healthy.contains(&n.name))
            .map(|n| n.eni.0.as_str())
            .collect();
        let all = tables.values().all(|routes| {
            routes
                .iter()
                .filter(|(d, _)| d.contains(&b.block))
                .max_by_key(|(d, _)| d.prefix_len())
                .is_some_and(|(_, target)| delivers.contains(target.as_str()))
        });
        if all {
            out.insert(b.node.clone());
        }
    }
    out
}

#[cfg(test)]
mod pacing_tests {
    use super::*;

    fn create(t: &str, d: &str) -> RouteOp {
        RouteOp::Create {
            route_table: t.into(),
            destination: d.parse().unwrap(),
            eni: "eni-1".into(),
        }
    }

    #[test]
    fn a_capped_pass_keeps_the_covering_routes_of_every_table_first() {
        let mut ops = vec![
            create("rtb-a", "100.64.0.0/19"),
            create("rtb-a", "100.64.0.0/22"),
            create("rtb-a", "100.64.4.0/22"),
            create("rtb-b", "100.64.0.0/19"),
            create("rtb-b", "100.64.0.0/22"),
            create("rtb-c", "100.64.0.0/19"),
        ];
        let deferred = defer_specific(&mut ops, 4);
        // Every table's /19 is kept (in diff order), then the most specific routes wait.
        assert_eq!(
            ops,
            vec![
                create("rtb-a", "100.64.0.0/19"),
                create("rtb-a", "100.64.0.0/22"),
                create("rtb-b", "100.64.0.0/19"),
                create("rtb-c", "100.64.0.0/19"),
            ]
        );
        assert_eq!(
            deferred,
            vec![
                create("rtb-a", "100.64.4.0/22"),
                create("rtb-b", "100.64.0.0/22")
            ]
        );
        let mut few = vec![create("rtb-a", "100.64.0.0/19")];
        assert!(defer_specific(&mut few, 4).is_empty());
        assert_eq!(few.len(), 1);
    }
}
