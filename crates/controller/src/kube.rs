//! The routed-mode controller on the Kubernetes API: leader election, Nodes in, UnderlayNodes and taints out.
//!
//! ```text
//!            Lease underlay-controller (coordination.k8s.io/v1)
//!   campaign ──acquired──► lead ──────────────────────────────────────────────────── renew every `renew_every`
//!      ▲                    │ watch Nodes ─► providerID ─► DescribeInstances (cached) ─► ClusterNode set ─► Controller::run
//!      │                    │ watch UnderlayNodes (Ready condition, cached status)              │ Pass(plan)
//!      │                    │ ensure UnderlayNode per Node (owner ref, finalizer, labels)        ▼
//!      │                    │ status: pool.block, poolSize, routes, forwarder  ◄──────────── plan per node
//!      │                    │ Node: not-ready taint until Ready=True and block routed, podCIDR = block
//!      └──── lost (another holder, or no renewal for `lease_duration`): abort at once, no further writes
//! ```
//!
//! Only the lease holder writes (UnderlayNodes, Nodes, Events, EC2): the leader's work runs in one task that is
//! aborted the moment the lease is lost, so a write in flight is dropped with it.
//!
//! The controller starts only once the Node list is complete and every listed node's instance has been described:
//! a pass over a partial node set would delete the routes of the nodes left out.
//!
//! Only the Nodes [`KubeOptions::node_selector`] selects are watched (the watch carries it as its label
//! selector). A Node leaving the selection is released as a deleted one is, and its underlay taints are removed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use ::kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use ::kube::runtime::watcher::{self, Event as WatchEvent};
use ::kube::runtime::{WatchStreamExt, watcher::watcher as watch_stream};
use ::kube::{Client, Resource, ResourceExt};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use underlay_api::{
    ForwarderRole, ForwarderRoute, Mode, PeerRoute, Pool, UnderlayNode, UnderlayNodeSpec,
    conditions,
};
use underlay_cloud::{Cloud, InstanceFilter, InstanceId, InstanceState};
use underlay_core::health::{HealthState, Transition};
use underlay_core::names;
use underlay_core::planner::RoutedPlan;
use underlay_core::routeops::RouteOp;

use crate::config::{ClusterNode, ControllerConfig};
use crate::controller::{Controller, ControllerEvent};
use crate::lanes::{CloudLanes, Priority};
use crate::probe::Prober;
use crate::routes::ReconcileReport;
use crate::selector::NodeSelector;

/// Default lease duration: a new leader takes over this long after the last renewal it saw.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// Default renewal period (and campaign retry period) of the lease.
pub const DEFAULT_RENEW_EVERY: Duration = Duration::from_secs(5);
/// Default retry period of a failed API or EC2 call of the leader (describe, UnderlayNode, taint, status).
pub const DEFAULT_RETRY_EVERY: Duration = Duration::from_secs(2);
/// Default namespace of the leader Lease.
pub const DEFAULT_LEASE_NAMESPACE: &str = "kube-system";
/// Reasons and action of the Kubernetes Events the leader records on Nodes.
pub const REASON_FORWARDER_FAILED: &str = "ForwarderFailed";
pub const REASON_FORWARDER_HEALTHY: &str = "ForwarderHealthy";
pub const REASON_ROUTES_MOVED: &str = "RoutesMoved";
pub const ACTION_FAILOVER: &str = "Failover";
/// A missing instance is described again after this many retry periods.
const MISSING_RECHECK: u32 = 5;
/// Attempts of one status or Node write answered 409 Conflict (each after re-reading the object).
pub(crate) const CONFLICT_ATTEMPTS: usize = 4;

/// How this replica campaigns and leads.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// Holder identity written into the Lease (unique per replica: the pod name).
    pub identity: String,
    pub lease_namespace: String,
    /// Written as the Lease's `leaseDurationSeconds` (rounded up to whole seconds); a leader that could not
    /// renew for this long stops.
    pub lease_duration: Duration,
    /// Renewal period while leading, and campaign retry period otherwise. Must be shorter than `lease_duration`.
    pub renew_every: Duration,
    /// Retry period of a failed API or EC2 call while leading.
    pub retry_every: Duration,
    /// Told `true` when this replica starts leading and `false` once its work has stopped (after losing the
    /// lease or at shutdown). For observers: health endpoints, metrics, tests.
    pub leading: Option<watch::Sender<bool>>,
    /// `eni` mode: counts the leader's completed passes (each runs the reconciler over complete watch caches),
    /// for the readiness endpoint. Routed mode reports its passes as `ControllerEvent::Pass` instead.
    pub passes: Option<watch::Sender<u64>>,
    /// The Nodes this controller manages (`--node-selector`); the rest get no UnderlayNode, taint, podCIDR,
    /// route or ENI. Default: every Node.
    pub node_selector: NodeSelector,
}

impl Default for KubeOptions {
    fn default() -> Self {
        let identity = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| {
                format!("{}-{}", names::FIELD_MANAGER_CONTROLLER, std::process::id())
            });
        Self {
            identity,
            lease_namespace: DEFAULT_LEASE_NAMESPACE.to_string(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_every: DEFAULT_RENEW_EVERY,
            retry_every: DEFAULT_RETRY_EVERY,
            leading: None,
            passes: None,
            node_selector: NodeSelector::all(),
        }
    }
}

/// Why [`run_routed_on_kube`] returned early.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("invalid options: {0}")]
    Options(String),
    #[error("kubernetes API: {0}")]
    Api(#[from] ::kube::Error),
}

/// Campaign for the lease; while holding it, run the routed-mode controller on the Kubernetes API. Returns when
/// `shutdown` turns true (releasing the lease if held) or its sender is dropped. API and EC2 errors are retried,
/// never returned. The controller's events are forwarded to `events` while leading.
#[allow(clippy::too_many_arguments)]
pub async fn run_routed_on_kube(
    client: Client,
    cloud: Arc<dyn Cloud>,
    lanes: Arc<dyn CloudLanes>,
    config: ControllerConfig,
    prober: Option<Arc<dyn Prober>>,
    opts: KubeOptions,
    shutdown: watch::Receiver<bool>,
    events: Option<broadcast::Sender<ControllerEvent>>,
) -> Result<(), KubeError> {
    check_lease_timing(&opts)?;
    if opts.retry_every.is_zero() || opts.identity.is_empty() {
        return Err(KubeError::Options(
            "retry_every must be non-zero and identity non-empty".to_string(),
        ));
    }
    lead(&client, &opts, "routed", shutdown, |stop| {
        Leader::new(
            client.clone(),
            cloud.clone(),
            lanes.clone(),
            config.clone(),
            prober.clone(),
            opts.retry_every,
            events.clone(),
        )
        .selecting(opts.node_selector.clone())
        .run(stop)
    })
    .await
}

fn check_lease_timing(opts: &KubeOptions) -> Result<(), KubeError> {
    if opts.renew_every.is_zero() || opts.renew_every >= opts.lease_duration {
        return Err(KubeError::Options(format!(
            "renew_every ({:?}) must be non-zero and shorter than lease_duration ({:?})",
            opts.renew_every, opts.lease_duration
        )));
    }
    Ok(())
}

/// The lease loop of both modes: campaign for the lease; while holding it, run the leader's work — one task per
/// term, made by `work` from a receiver told `true` when the term ends — and renew every `renew_every`. The term
/// ends when the lease is lost (another holder, or no renewal for `lease_duration`), when the work task ends on
/// its own, or at shutdown; the task is aborted at once, so a write in flight is dropped with it and only the
/// lease holder writes. Returns when `shutdown` turns true (releasing the lease if held) or its sender is dropped.
/// `opts.leading` is told `true` when a term starts and `false` once its work has stopped.
pub(crate) async fn lead<W, F>(
    client: &Client,
    opts: &KubeOptions,
    mode: &'static str,
    mut shutdown: watch::Receiver<bool>,
    mut work: W,
) -> Result<(), KubeError>
where
    W: FnMut(watch::Receiver<bool>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    check_lease_timing(opts)?;
    if opts.identity.is_empty() {
        return Err(KubeError::Options("identity must be non-empty".to_string()));
    }
    let set_leading = |v: bool| {
        if let Some(tx) = &opts.leading {
            tx.send_replace(v);
        }
    };
    let mut elector = Elector::new(
        Api::namespaced(client.clone(), &opts.lease_namespace),
        opts.identity.clone(),
        opts.lease_duration,
    );
    loop {
        // Campaign.
        let mut acquired_at;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            acquired_at = Instant::now();
            match tokio::time::timeout(opts.renew_every, elector.try_acquire_or_renew()).await {
                Ok(Ok(LeaseState::Held)) => break,
                Ok(Ok(LeaseState::Other(holder))) => {
                    tracing::debug!(identity = %opts.identity, %holder, "lease held by another replica");
                }
                Ok(Ok(LeaseState::Conflict)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "campaigning for the lease"),
                Err(_) => tracing::warn!("campaigning for the lease: request timed out"),
            }
            tokio::select! {
                _ = tokio::time::sleep(opts.renew_every) => {}
                r = shutdown.changed() => if r.is_err() { return Ok(()); },
            }
        }

        // Lead.
        tracing::info!(identity = %opts.identity, lease = names::LEADER_LEASE, mode, "leading");
        set_leading(true);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut task = tokio::spawn(work(stop_rx));
        let mut last_renewed = acquired_at;
        let mut next_renew = Instant::now() + opts.renew_every;
        let shutting_down = loop {
            let deadline = last_renewed + opts.lease_duration;
            tokio::select! {
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { break true; },
                r = &mut task => {
                    tracing::error!(result = ?r, "leader task ended on its own; stepping down");
                    break false;
                }
                _ = tokio::time::sleep_until(next_renew.min(deadline)) => {
                    if Instant::now() >= deadline {
                        tracing::warn!("lease not renewed within its duration; stepping down");
                        break false;
                    }
                    let started = Instant::now();
                    let limit = (started + opts.renew_every).min(deadline);
                    match tokio::time::timeout_at(limit, elector.try_acquire_or_renew()).await {
                        Ok(Ok(LeaseState::Held)) => {
                            last_renewed = started;
                            next_renew = started + opts.renew_every;
                        }
                        Ok(Ok(LeaseState::Other(holder))) => {
                            tracing::warn!(%holder, "lease taken by another replica; stepping down");
                            break false;
                        }
                        Ok(Ok(LeaseState::Conflict)) => next_renew = Instant::now() + opts.renew_every / 10,
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "renewing the lease");
                            next_renew = Instant::now() + opts.renew_every / 4;
                        }
                        Err(_) => {
                            tracing::warn!("renewing the lease: request timed out");
                            next_renew = Instant::now();
                        }
                    }
                }
            }
        };
        // Stop writing at once: the leader's work and every write in flight are dropped with its task.
        let _ = stop_tx.send(true);
        task.abort();
        let _ = (&mut task).await;
        set_leading(false);
        tracing::info!(identity = %opts.identity, mode, "stopped leading");
        if shutting_down {
            if let Err(e) = elector.release().await {
                tracing::warn!(error = %e, "releasing the lease");
            }
            return Ok(());
        }
    }
}

// ───────────────────────────────────────── leader election ─────────────────────────────────────────

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LeaseState {
    /// This replica holds the lease (acquired or renewed just now).
    Held,
    /// Another replica holds an unexpired lease.
    Other(String),
    /// A write lost a race (409): read again.
    Conflict,
}

/// A coordination.k8s.io/v1 Lease as a lock. Expiry is judged by local observation, as client-go does: a lease
/// whose record (holder, renew time, resourceVersion) has not changed for its duration, as seen from here, is
/// free. No clock comparison across machines.
#[derive(Debug)]
pub(crate) struct Elector {
    api: Api<Lease>,
    identity: String,
    duration: Duration,
    observed: Option<(String, Instant)>,
}

pub(crate) fn is_conflict(e: &::kube::Error) -> bool {
    matches!(e, ::kube::Error::Api(s) if s.is_conflict())
}

pub(crate) fn is_not_found(e: &::kube::Error) -> bool {
    matches!(e, ::kube::Error::Api(s) if s.is_not_found())
}

impl Elector {
    pub(crate) fn new(api: Api<Lease>, identity: String, duration: Duration) -> Self {
        Self {
            api,
            identity,
            duration,
            observed: None,
        }
    }

    fn seconds(&self) -> i32 {
        i32::try_from(self.duration.as_millis().div_ceil(1000))
            .unwrap_or(i32::MAX)
            .max(1)
    }

    fn record_key(lease: &Lease) -> String {
        let spec = lease.spec.clone().unwrap_or_default();
        format!(
            "{}|{:?}|{}",
            spec.holder_identity.unwrap_or_default(),
            spec.renew_time.map(|t| t.0),
            lease.resource_version().unwrap_or_default()
        )
    }

    fn observe(&mut self, lease: &Lease) -> Instant {
        let key = Self::record_key(lease);
        match &self.observed {
            Some((k, at)) if *k == key => *at,
            _ => {
                let now = Instant::now();
                self.observed = Some((key, now));
                now
            }
        }
    }

    pub(crate) async fn try_acquire_or_renew(&mut self) -> Result<LeaseState, ::kube::Error> {
        let now = MicroTime(Timestamp::now());
        let pp = PostParams {
            field_manager: Some(names::FIELD_MANAGER_CONTROLLER.to_string()),
            ..Default::default()
        };
        let Some(mut lease) = self.api.get_opt(names::LEADER_LEASE).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(names::LEADER_LEASE.to_string()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&pp, &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(LeaseState::Held)
                }
                Err(e) if is_conflict(&e) => Ok(LeaseState::Conflict),
                Err(::kube::Error::Api(s)) if s.is_already_exists() => Ok(LeaseState::Conflict),
                Err(e) => Err(e),
            };
        };
        let seen_at = self.observe(&lease);
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.identity;
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.duration);
        if !mine && !holder.is_empty() && seen_at.elapsed() < duration {
            return Ok(LeaseState::Other(holder));
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.seconds()),
            acquire_time: if mine {
                spec.acquire_time.clone()
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if mine { transitions } else { transitions + 1 }),
            ..spec
        });
        // `lease` carries the resourceVersion read above: a concurrent writer makes this a 409.
        match self.api.replace(names::LEADER_LEASE, &pp, &lease).await {
            Ok(updated) => {
                self.observe(&updated);
                Ok(LeaseState::Held)
            }
            Err(e) if is_conflict(&e) => Ok(LeaseState::Conflict),
            Err(e) => Err(e),
        }
    }

    /// Give the lease up (holder cleared) so another replica takes over without waiting for expiry.
    pub(crate) async fn release(&mut self) -> Result<(), ::kube::Error> {
        let Some(mut lease) = self.api.get_opt(names::LEADER_LEASE).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        let pp = PostParams {
            field_manager: Some(names::FIELD_MANAGER_CONTROLLER.to_string()),
            ..Default::default()
        };
        match self.api.replace(names::LEADER_LEASE, &pp, &lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

// ───────────────────────────────────────── pure parts ─────────────────────────────────────────

/// The EC2 instance id of an AWS Node's `spec.providerID` (`aws:///<zone>/<instance-id>`); `None` otherwise.
pub fn instance_id_of(provider_id: &str) -> Option<InstanceId> {
    let rest = provider_id.strip_prefix("aws://")?;
    let id = rest.rsplit('/').next()?;
    (id.starts_with("i-")
        && id.len() > 2
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    .then(|| InstanceId(id.to_string()))
}

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

pub(crate) fn ready(un: &UnderlayNode) -> bool {
    un.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == conditions::READY && c.status == "True")
    })
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

/// Remove the underlay taints of Node `name` unless it is selected (or gone, or untainted already).
pub(crate) async fn untaint_if_unselected(
    api: &Api<Node>,
    selector: &NodeSelector,
    name: &str,
) -> Result<(), ::kube::Error> {
    let Some(node) = api.get_opt(name).await? else {
        return Ok(());
    };
    if selector.matches(node.labels()) || !has_underlay_taint(&node) {
        return Ok(());
    }
    let taints: Vec<Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| !is_underlay_taint(t))
        .collect();
    let patch = json!({
        "metadata": { "resourceVersion": node.resource_version() },
        "spec": { "taints": taints },
    });
    let pp = PatchParams::apply(names::FIELD_MANAGER_CONTROLLER);
    match api.patch(name, &pp, &Patch::Merge(&patch)).await {
        Ok(_) => {
            tracing::info!(node = %name, "Node outside the node selector: underlay taints removed");
            Ok(())
        }
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

fn is_underlay_taint(t: &Taint) -> bool {
    t.key == names::TAINT_NOT_READY || t.key == names::TAINT_NO_FREE_IPS
}

pub(crate) fn has_underlay_taint(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(is_underlay_taint))
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

pub(crate) fn owner_ref(node: &Node) -> OwnerReference {
    OwnerReference {
        api_version: "v1".to_string(),
        kind: "Node".to_string(),
        name: node.name_any(),
        uid: node.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

fn labels_for(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (names::LABEL_NODE.to_string(), name.to_string()),
        (names::LABEL_MODE.to_string(), "routed".to_string()),
    ])
}

// ───────────────────────────────────────── the leader's work ─────────────────────────────────────────

/// Everything the lease holder does; dropped (aborted) when the lease is lost.
struct Leader {
    nodes_api: Api<Node>,
    uns_api: Api<UnderlayNode>,
    cloud: Arc<dyn Cloud>,
    lanes: Arc<dyn CloudLanes>,
    config: ControllerConfig,
    prober: Option<Arc<dyn Prober>>,
    retry_every: Duration,
    events: Option<broadcast::Sender<ControllerEvent>>,
    recorder: Recorder,
    nodes: BTreeMap<String, Node>,
    uns: BTreeMap<String, UnderlayNode>,
    nodes_synced: bool,
    uns_synced: bool,
    /// Described instances by id; `None`: the instance does not exist or is not running.
    instances: HashMap<InstanceId, Option<NodeInstance>>,
    /// When each missing instance was last described.
    missing_checked: HashMap<InstanceId, Instant>,
    /// Nodes already reported as not on AWS.
    foreign: BTreeSet<String>,
    plan: Option<RoutedPlan>,
    /// Nodes whose block the latest pass that planned left routed in every managed table
    /// ([`ReconcileReport::routed_nodes`]); `None` until this leader's first such pass.
    routed: Option<BTreeSet<String>>,
    nodes_tx: Option<watch::Sender<Vec<ClusterNode>>>,
    /// The Nodes this controller manages; the Node watch carries it as its label selector.
    selector: NodeSelector,
    /// Nodes that left the selection (or may have: a deleted Node is checked too) whose underlay taints are to be
    /// removed.
    released: BTreeSet<String>,
    /// This term's sweep of unselected Nodes for leftover underlay taints is done.
    swept: bool,
}

impl std::fmt::Debug for Leader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leader")
            .field("nodes", &self.nodes.len())
            .field("underlay_nodes", &self.uns.len())
            .field("started", &self.nodes_tx.is_some())
            .finish_non_exhaustive()
    }
}

fn rv_number<K: Resource>(o: &K) -> Option<u64> {
    o.meta().resource_version.as_deref()?.parse().ok()
}

/// Objects of a watch, kept complete across restarts of the watch (buffered between `Init` and `InitDone`).
pub(crate) fn apply_watch_event<K: Resource + Clone>(
    map: &mut BTreeMap<String, K>,
    buffer: &mut Option<BTreeMap<String, K>>,
    synced: &mut bool,
    ev: WatchEvent<K>,
) {
    match ev {
        WatchEvent::Apply(o) => {
            let name = o.meta().name.clone().unwrap_or_default();
            // Writes store their response at once; a watch event older than it would undo that (and cause a
            // redundant write). resourceVersions are opaque, but etcd's are integers: compare only those.
            let older = map
                .get(&name)
                .and_then(|cur| rv_number(cur))
                .zip(rv_number(&o))
                .is_some_and(|(cur, new)| new < cur);
            if !older {
                map.insert(name, o);
            }
        }
        WatchEvent::Delete(o) => {
            map.remove(o.meta().name.as_deref().unwrap_or_default());
        }
        WatchEvent::Init => *buffer = Some(BTreeMap::new()),
        WatchEvent::InitApply(o) => {
            buffer
                .get_or_insert_with(BTreeMap::new)
                .insert(o.meta().name.clone().unwrap_or_default(), o);
        }
        WatchEvent::InitDone => {
            *map = buffer.take().unwrap_or_default();
            *synced = true;
        }
    }
}

impl Leader {
    fn new(
        client: Client,
        cloud: Arc<dyn Cloud>,
        lanes: Arc<dyn CloudLanes>,
        config: ControllerConfig,
        prober: Option<Arc<dyn Prober>>,
        retry_every: Duration,
        events: Option<broadcast::Sender<ControllerEvent>>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: names::FIELD_MANAGER_CONTROLLER.to_string(),
                instance: None,
            },
        );
        Self {
            nodes_api: Api::all(client.clone()),
            uns_api: Api::all(client),
            cloud,
            lanes,
            config,
            prober,
            retry_every,
            events,
            recorder,
            nodes: BTreeMap::new(),
            uns: BTreeMap::new(),
            nodes_synced: false,
            uns_synced: false,
            instances: HashMap::new(),
            missing_checked: HashMap::new(),
            foreign: BTreeSet::new(),
            plan: None,
            routed: None,
            nodes_tx: None,
            selector: NodeSelector::all(),
            released: BTreeSet::new(),
            swept: false,
        }
    }

    /// Manage only the Nodes `selector` selects.
    fn selecting(mut self, selector: NodeSelector) -> Self {
        self.selector = selector;
        self
    }

    async fn run(mut self, stop: watch::Receiver<bool>) {
        let mut node_config = watcher::Config::default();
        if let Some(q) = self.selector.to_query() {
            node_config = node_config.labels(&q);
        }
        let node_events = watch_stream(self.nodes_api.clone(), node_config).default_backoff();
        let un_events =
            watch_stream(self.uns_api.clone(), watcher::Config::default()).default_backoff();
        futures::pin_mut!(node_events, un_events);
        let (mut node_buf, mut un_buf) = (None, None);
        let mut controller_events: Option<broadcast::Receiver<ControllerEvent>> = None;
        // Aborted when this task is (losing the lease drops it mid-await): no pass outlives leadership.
        let mut controller_task: Option<AbortOnDrop> = None;
        let mut stop_rx = stop.clone();
        let mut retry = tokio::time::interval(self.retry_every);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dirty = false;
        let mut failed = false;
        loop {
            tokio::select! {
                r = stop_rx.changed() => if r.is_err() || *stop_rx.borrow() { break; },
                Some(ev) = node_events.next() => match ev {
                    Ok(ev) => {
                        // A Node that leaves the selection arrives as a deletion.
                        if let WatchEvent::Delete(n) = &ev {
                            self.released.insert(n.name_any());
                        }
                        apply_watch_event(&mut self.nodes, &mut node_buf, &mut self.nodes_synced, ev);
                        dirty = true;
                    }
                    Err(e) => tracing::warn!(error = %e, "watching Nodes"),
                },
                Some(ev) = un_events.next() => match ev {
                    Ok(ev) => {
                        apply_watch_event(&mut self.uns, &mut un_buf, &mut self.uns_synced, ev);
                        dirty = true;
                    }
                    Err(e) => tracing::warn!(error = %e, "watching UnderlayNodes"),
                },
                ev = recv_opt(&mut controller_events) => match ev {
                    Ok(ev) => {
                        if let Some(tx) = &self.events {
                            let _ = tx.send(ev.clone());
                        }
                        match ev {
                            ControllerEvent::Pass(report) => {
                                if let Some(plan) = &report.routes.plan {
                                    self.plan = Some(plan.clone());
                                    dirty = true;
                                }
                                if let Some(routed) = report.routes.routed_nodes()
                                    && self.routed.as_ref() != Some(&routed)
                                {
                                    tracing::debug!(routed = routed.len(), "routed blocks changed");
                                    self.routed = Some(routed);
                                    dirty = true;
                                }
                                self.record_route_moves(&report.routes).await;
                            }
                            ControllerEvent::Health(t) => self.record_transition(&t).await,
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "controller events lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        tracing::error!("controller stopped");
                        break;
                    }
                },
                _ = retry.tick() => dirty |= failed,
            }
            if dirty && self.nodes_synced && self.uns_synced {
                dirty = false;
                failed = !self.reconcile().await;
                if self.nodes_tx.is_none() && self.all_resolved() {
                    let set = self.cluster_nodes();
                    let (tx, rx) = watch::channel(set);
                    let mut controller = Controller::new(self.config.clone(), self.lanes.clone());
                    let recorded: Vec<UnderlayNode> = self.uns.values().cloned().collect();
                    let previous = previous_plan(
                        self.config.routed.pod_cidr,
                        self.config.routed.block_prefix_len,
                        &recorded,
                    );
                    if let Some(p) = &previous {
                        tracing::info!(
                            blocks = p.blocks.len(),
                            "planning from the blocks UnderlayNodes record"
                        );
                    }
                    controller.routes().set_previous(previous);
                    if let Some(p) = &self.prober {
                        controller = controller.with_prober(p.clone());
                    }
                    controller_events = Some(controller.subscribe());
                    controller_task =
                        Some(AbortOnDrop(tokio::spawn(controller.run(rx, stop.clone()))));
                    self.nodes_tx = Some(tx);
                    tracing::info!(
                        nodes = self.nodes.len(),
                        "node set complete: controller started"
                    );
                }
            }
        }
        if let Some(mut t) = controller_task {
            t.0.abort();
            let _ = (&mut t.0).await;
        }
    }

    /// Every listed AWS node's instance has been described (found or known gone).
    fn all_resolved(&self) -> bool {
        self.nodes.values().all(|n| match self.instance_of(n) {
            Some(id) => self.instances.contains_key(&id),
            None => true,
        })
    }

    fn instance_of(&self, node: &Node) -> Option<InstanceId> {
        let pid = node.spec.as_ref()?.provider_id.as_deref()?;
        instance_id_of(pid)
    }

    fn resolved(&self, node: &Node) -> Option<&NodeInstance> {
        self.instances.get(&self.instance_of(node)?)?.as_ref()
    }

    /// The node set for the controller: every Node with a described, running instance.
    fn cluster_nodes(&self) -> Vec<ClusterNode> {
        let mut v: Vec<ClusterNode> = self
            .nodes
            .values()
            .filter_map(|n| {
                let mut c = self.resolved(n)?.node.clone();
                c.name = n.name_any();
                Some(c)
            })
            .collect();
        v.sort();
        v
    }

    /// One idempotent pass over everything the leader writes. Returns false when something failed and should be
    /// retried.
    async fn reconcile(&mut self) -> bool {
        let mut ok = self.describe_new_instances().await;
        if let Some(tx) = &self.nodes_tx {
            let set = self.cluster_nodes();
            tx.send_if_modified(|cur| {
                if *cur == set {
                    false
                } else {
                    *cur = set;
                    true
                }
            });
        }
        ok &= self.ensure_underlay_nodes().await;
        ok &= self.collect_underlay_nodes().await;
        ok &= self.write_statuses().await;
        ok &= self.write_node_specs().await;
        ok &= self.release_unselected().await;
        ok
    }

    /// Describe the instances of Nodes not seen yet (one batched call), and again, every
    /// [`MISSING_RECHECK`] retry periods, those found missing (describes are eventually consistent). Returns false
    /// when the call failed or an instance is still missing.
    async fn describe_new_instances(&mut self) -> bool {
        let mut wanted: BTreeSet<InstanceId> = BTreeSet::new();
        let recheck = self.retry_every * MISSING_RECHECK;
        for n in self.nodes.values() {
            let Some(pid) = n.spec.as_ref().and_then(|s| s.provider_id.as_deref()) else {
                continue;
            };
            match instance_id_of(pid) {
                Some(id) => match self.instances.get(&id) {
                    None => {
                        wanted.insert(id);
                    }
                    Some(None)
                        if self
                            .missing_checked
                            .get(&id)
                            .is_none_or(|at| at.elapsed() >= recheck) =>
                    {
                        wanted.insert(id);
                    }
                    Some(_) => {}
                },
                None => {
                    if self.foreign.insert(n.name_any()) {
                        tracing::warn!(node = %n.name_any(), provider_id = pid, "not an AWS provider id; node left out");
                    }
                }
            }
        }
        if wanted.is_empty() {
            return !self.any_missing();
        }
        let described = self.describe(wanted.iter().cloned().collect()).await;
        let found = match described {
            Ok(found) => found,
            // EC2 fails the whole call when one id is unknown: describe them one by one.
            Err(e) if e.kind == underlay_cloud::ErrorKind::NotFound && wanted.len() > 1 => {
                let mut found = Vec::new();
                for id in &wanted {
                    match self.describe(vec![id.clone()]).await {
                        Ok(f) => found.extend(f),
                        Err(e) if e.kind == underlay_cloud::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(error = %e, instance = %id.0, "describing node instance");
                            return false;
                        }
                    }
                }
                found
            }
            Err(e) if e.kind == underlay_cloud::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, instances = wanted.len(), "describing node instances");
                return false;
            }
        };
        for id in wanted {
            let inst = found.iter().find(|i| i.id == id);
            let resolved = inst.and_then(|i| {
                if matches!(
                    i.state,
                    InstanceState::Terminated | InstanceState::ShuttingDown
                ) {
                    return None;
                }
                let eni = i.primary_eni()?;
                Some(NodeInstance {
                    instance: i.id.clone(),
                    zone: i.zone.clone(),
                    node: ClusterNode {
                        name: String::new(),
                        subnet: eni.subnet.clone(),
                        ip: eni.primary_ip,
                        eni: eni.id.clone(),
                    },
                })
            });
            if resolved.is_none() {
                tracing::warn!(instance = %id.0, "node instance not found, not running or without primary ENI; node left out");
                self.missing_checked.insert(id.clone(), Instant::now());
            } else {
                self.missing_checked.remove(&id);
            }
            self.instances.insert(id, resolved);
        }
        !self.any_missing()
    }

    async fn describe(
        &self,
        ids: Vec<InstanceId>,
    ) -> Result<Vec<underlay_cloud::Instance>, underlay_cloud::CloudError> {
        let filter = InstanceFilter { ids, vpc: None };
        self.cloud.describe_instances(&filter).await
    }

    /// A current Node's instance was found missing.
    fn any_missing(&self) -> bool {
        self.nodes.values().any(|n| {
            self.instance_of(n)
                .is_some_and(|id| matches!(self.instances.get(&id), Some(None)))
        })
    }

    /// An UnderlayNode for every Node whose instance is known, with the spec, labels, owner and finalizer.
    async fn ensure_underlay_nodes(&mut self) -> bool {
        let mut ok = true;
        let pp = PostParams {
            field_manager: Some(names::FIELD_MANAGER_CONTROLLER.to_string()),
            ..Default::default()
        };
        let work: Vec<(Node, NodeInstance)> = self
            .nodes
            .values()
            .filter(|n| n.meta().deletion_timestamp.is_none())
            .filter_map(|n| Some((n.clone(), self.resolved(n)?.clone())))
            .collect();
        for (node, inst) in work {
            let name = node.name_any();
            let spec = spec_of(&inst);
            let owner = owner_ref(&node);
            let labels = labels_for(&name);
            match self.uns.get(&name) {
                None => {
                    let mut un = UnderlayNode::new(&name, spec);
                    un.metadata.labels = Some(labels);
                    un.metadata.owner_references = Some(vec![owner]);
                    un.metadata.finalizers = Some(vec![names::FINALIZER_CLEANUP.to_string()]);
                    match self.uns_api.create(&pp, &un).await {
                        Ok(created) => {
                            tracing::info!(node = %name, "UnderlayNode created");
                            self.uns.insert(name, created);
                        }
                        Err(::kube::Error::Api(s)) if s.is_already_exists() => ok = false,
                        Err(e) => {
                            tracing::warn!(node = %name, error = %e, "creating UnderlayNode");
                            ok = false;
                        }
                    }
                }
                Some(un) if un.meta().deletion_timestamp.is_some() => {}
                Some(un) => {
                    let cur_labels = un.labels();
                    let labels_ok = labels.iter().all(|(k, v)| cur_labels.get(k) == Some(v));
                    let owner_ok = un
                        .owner_references()
                        .iter()
                        .any(|o| o.uid == owner.uid && o.controller == Some(true));
                    let fin_ok = un
                        .finalizers()
                        .iter()
                        .any(|f| f == names::FINALIZER_CLEANUP);
                    if un.spec == spec && labels_ok && owner_ok && fin_ok {
                        continue;
                    }
                    let mut finalizers = un.finalizers().to_vec();
                    if !fin_ok {
                        finalizers.push(names::FINALIZER_CLEANUP.to_string());
                    }
                    let mut owners: Vec<OwnerReference> = un
                        .owner_references()
                        .iter()
                        .filter(|o| !(o.kind == "Node" && o.api_version == "v1"))
                        .cloned()
                        .collect();
                    owners.push(owner);
                    let patch = json!({
                        "metadata": {
                            "resourceVersion": un.resource_version(),
                            "labels": labels,
                            "ownerReferences": owners,
                            "finalizers": finalizers,
                        },
                        "spec": spec,
                    });
                    match self.patch_un(&name, &patch).await {
                        Ok(u) => {
                            self.uns.insert(name, u);
                        }
                        Err(e) => {
                            if !is_conflict(&e) {
                                tracing::warn!(node = %name, error = %e, "updating UnderlayNode");
                            }
                            self.refresh_un(&name).await;
                            ok = false;
                        }
                    }
                }
            }
        }
        ok
    }

    async fn patch_un(&self, name: &str, patch: &Value) -> Result<UnderlayNode, ::kube::Error> {
        self.uns_api
            .patch(
                name,
                &PatchParams::apply(names::FIELD_MANAGER_CONTROLLER),
                &Patch::Merge(patch),
            )
            .await
    }

    async fn refresh_un(&mut self, name: &str) {
        match self.uns_api.get_opt(name).await {
            Ok(Some(u)) => {
                self.uns.insert(name.to_string(), u);
            }
            Ok(None) => {
                self.uns.remove(name);
            }
            Err(e) => tracing::warn!(node = %name, error = %e, "reading UnderlayNode"),
        }
    }

    async fn refresh_node(&mut self, name: &str) {
        match self.nodes_api.get_opt(name).await {
            Ok(Some(n)) => {
                self.nodes.insert(name.to_string(), n);
            }
            Ok(None) => {
                self.nodes.remove(name);
            }
            Err(e) => tracing::warn!(node = %name, error = %e, "reading Node"),
        }
    }

    /// UnderlayNodes whose Node is gone: delete them; drop the finalizer once the plan no longer has the node.
    async fn collect_underlay_nodes(&mut self) -> bool {
        let mut ok = true;
        let orphans: Vec<UnderlayNode> = self
            .uns
            .values()
            .filter(|u| !self.nodes.contains_key(&u.name_any()))
            .cloned()
            .collect();
        for un in orphans {
            let name = un.name_any();
            // Its Node may still exist, outside the selection: its taints go too.
            if !self.selector.is_all() {
                self.released.insert(name.clone());
            }
            if un.meta().deletion_timestamp.is_none() {
                match self.uns_api.delete(&name, &DeleteParams::default()).await {
                    Ok(either) => {
                        tracing::info!(node = %name, "Node gone: UnderlayNode deleted");
                        match either.left() {
                            Some(u) if u.meta().deletion_timestamp.is_some() => {
                                self.uns.insert(name.clone(), u);
                            }
                            _ => {
                                self.uns.remove(&name);
                                continue;
                            }
                        }
                    }
                    Err(e) if is_not_found(&e) => {
                        self.uns.remove(&name);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(node = %name, error = %e, "deleting UnderlayNode");
                        ok = false;
                        continue;
                    }
                }
            }
            let Some(un) = self.uns.get(&name).cloned() else {
                continue;
            };
            if !un
                .finalizers()
                .iter()
                .any(|f| f == names::FINALIZER_CLEANUP)
            {
                continue;
            }
            // Routed mode holds no per-node cloud resource but routes: wait until a plan without the node.
            let released = self.plan.as_ref().is_some_and(|p| !in_plan(p, &name));
            if !released {
                continue;
            }
            let finalizers: Vec<&String> = un
                .finalizers()
                .iter()
                .filter(|f| *f != names::FINALIZER_CLEANUP)
                .collect();
            let patch = json!({
                "metadata": { "resourceVersion": un.resource_version(), "finalizers": finalizers }
            });
            match self.patch_un(&name, &patch).await {
                Ok(u) => {
                    tracing::info!(node = %name, "routes released: finalizer removed");
                    if u.finalizers().is_empty() {
                        self.uns.remove(&name);
                    } else {
                        self.uns.insert(name, u);
                    }
                }
                Err(e) if is_not_found(&e) => {
                    self.uns.remove(&name);
                }
                Err(e) => {
                    if !is_conflict(&e) {
                        tracing::warn!(node = %name, error = %e, "removing finalizer");
                    }
                    self.refresh_un(&name).await;
                    ok = false;
                }
            }
        }
        ok
    }

    /// Status of every UnderlayNode the plan gives a block: merge patch of the controller's fields only.
    async fn write_statuses(&mut self) -> bool {
        let Some(plan) = self.plan.clone() else {
            return true;
        };
        let mut ok = true;
        let names: Vec<String> = self.uns.keys().cloned().collect();
        for name in names {
            let Some((pool, size, routes, forwarder)) = status_fields(&plan, &name) else {
                continue;
            };
            // The subnet's region first: with it, the status lets a later leader rebuild this plan.
            let region = region_of(&plan, &name).map(|r| r.to_string());
            let stale = self.uns.get(&name).is_some_and(|u| {
                u.meta().deletion_timestamp.is_none()
                    && region.is_some()
                    && u.annotations().get(names::ANNOTATION_SUBNET_REGION) != region.as_ref()
            });
            if stale {
                let patch = json!({
                    "metadata": { "annotations": { names::ANNOTATION_SUBNET_REGION: region } }
                });
                match self.patch_un(&name, &patch).await {
                    Ok(u) => {
                        self.uns.insert(name.clone(), u);
                    }
                    Err(e) => {
                        tracing::warn!(node = %name, error = %e, "annotating UnderlayNode");
                        ok = false;
                        continue;
                    }
                }
            }
            let patch = json!({
                "status": {
                    "pool": pool,
                    "poolSize": size,
                    "routes": routes,
                    "forwarder": forwarder,
                }
            });
            let mut attempt = 0;
            while let Some(un) = self.uns.get(&name) {
                if un.meta().deletion_timestamp.is_some() {
                    break;
                }
                let cur = un.status.clone().unwrap_or_default();
                if cur.pool.as_ref() == Some(&pool)
                    && cur.pool_size == size
                    && cur.routes == routes
                    && cur.forwarder == forwarder
                {
                    break;
                }
                attempt += 1;
                match self
                    .uns_api
                    .patch_status(
                        &name,
                        &PatchParams::apply(names::FIELD_MANAGER_CONTROLLER),
                        &Patch::Merge(&patch),
                    )
                    .await
                {
                    Ok(u) => {
                        tracing::debug!(node = %name, "status written");
                        self.uns.insert(name.clone(), u);
                        break;
                    }
                    Err(e) if is_conflict(&e) && attempt < CONFLICT_ATTEMPTS => {
                        tracing::debug!(node = %name, "status write conflicted; reading again");
                        self.refresh_un(&name).await;
                    }
                    Err(e) => {
                        tracing::warn!(node = %name, error = %e, "writing UnderlayNode status");
                        ok = false;
                        break;
                    }
                }
            }
        }
        ok
    }

    /// On every Node: the not-ready taint unless its UnderlayNode is Ready and its block routed; `spec.podCIDR` =
    /// its block when empty.
    async fn write_node_specs(&mut self) -> bool {
        let mut ok = true;
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            let mut attempt = 0;
            while let Some(node) = self.nodes.get(&name) {
                if node.meta().deletion_timestamp.is_some() {
                    break;
                }
                let is_ready = self.uns.get(&name).is_some_and(ready);
                let routed = self.routed.as_ref().map(|r| r.contains(&name));
                let tainted = has_not_ready_taint(node);
                let want_taint = wants_not_ready_taint(is_ready, routed, tainted);
                let spec = node.spec.clone().unwrap_or_default();
                let block = self
                    .plan
                    .as_ref()
                    .and_then(|p| p.block_of(&name))
                    .filter(|_| self.resolved(node).is_some());
                let set_cidr =
                    spec.pod_cidr.as_deref().unwrap_or_default().is_empty() && block.is_some();
                if tainted == want_taint && !set_cidr {
                    break;
                }
                let mut spec_patch = serde_json::Map::new();
                if tainted != want_taint {
                    let mut taints: Vec<Taint> = spec
                        .taints
                        .clone()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|t| t.key != names::TAINT_NOT_READY)
                        .collect();
                    if want_taint {
                        taints.push(not_ready_taint());
                    }
                    spec_patch.insert("taints".into(), json!(taints));
                }
                if let Some(b) = block.filter(|_| set_cidr) {
                    spec_patch.insert("podCIDR".into(), json!(b.to_string()));
                    spec_patch.insert("podCIDRs".into(), json!([b.to_string()]));
                }
                let patch = json!({
                    "metadata": { "resourceVersion": node.resource_version() },
                    "spec": spec_patch,
                });
                attempt += 1;
                match self
                    .nodes_api
                    .patch(
                        &name,
                        &PatchParams::apply(names::FIELD_MANAGER_CONTROLLER),
                        &Patch::Merge(&patch),
                    )
                    .await
                {
                    Ok(n) => {
                        tracing::info!(node = %name, ready = is_ready, ?routed, tainted = want_taint, pod_cidr = ?block.filter(|_| set_cidr), "Node updated");
                        self.nodes.insert(name.clone(), n);
                        break;
                    }
                    Err(e) if is_conflict(&e) && attempt < CONFLICT_ATTEMPTS => {
                        self.refresh_node(&name).await;
                    }
                    Err(e) if is_not_found(&e) => {
                        self.nodes.remove(&name);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(node = %name, error = %e, "patching Node");
                        ok = false;
                        break;
                    }
                }
            }
        }
        ok
    }

    /// Nodes outside the selection carry no underlay taint: those that left it (a deletion from the selecting
    /// watch, or an UnderlayNode without a selected Node) and, once per term, any unselected Node a previous
    /// configuration tainted. Their UnderlayNodes go the way of a deleted Node's ([`Self::collect_underlay_nodes`]).
    async fn release_unselected(&mut self) -> bool {
        if self.selector.is_all() {
            self.released.clear();
            return true;
        }
        let mut ok = true;
        if !self.swept {
            match self.nodes_api.list(&ListParams::default()).await {
                Ok(list) => {
                    self.released.extend(
                        list.items
                            .iter()
                            .filter(|n| !self.selector.matches(n.labels()) && has_underlay_taint(n))
                            .map(ResourceExt::name_any),
                    );
                    self.swept = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listing Nodes for leftover taints");
                    ok = false;
                }
            }
        }
        let names: Vec<String> = self.released.iter().cloned().collect();
        for name in names {
            if self.nodes.contains_key(&name) {
                self.released.remove(&name);
                continue;
            }
            match untaint_if_unselected(&self.nodes_api, &self.selector, &name).await {
                Ok(()) => {
                    self.released.remove(&name);
                }
                Err(e) => {
                    if !is_conflict(&e) {
                        tracing::warn!(node = %name, error = %e, "untainting unselected Node");
                    }
                    ok = false;
                }
            }
        }
        ok
    }

    /// A Kubernetes Event on each Node that took over VPC routes in a failover pass (best effort).
    async fn record_route_moves(&self, report: &ReconcileReport) {
        if report.priority != Priority::Failover {
            return;
        }
        let mut moved: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for a in &report.applied {
            if let RouteOp::Replace {
                route_table,
                destination,
                eni,
                previous,
            } = &a.op
            {
                moved
                    .entry(eni.as_str())
                    .or_default()
                    .push(format!("{destination} in {route_table} (from {previous})"));
            }
        }
        for (eni, routes) in moved {
            let Some(node) = self
                .nodes
                .values()
                .find(|n| self.resolved(n).is_some_and(|i| i.node.eni.0 == eni))
            else {
                continue;
            };
            let ev = KubeEvent {
                type_: EventType::Normal,
                reason: REASON_ROUTES_MOVED.to_string(),
                note: Some(truncate_note(format!(
                    "failover: {} VPC route(s) now target this node: {}",
                    routes.len(),
                    routes.join(", ")
                ))),
                action: ACTION_FAILOVER.to_string(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&ev, &node.object_ref(&())).await {
                tracing::debug!(error = %e, "recording event");
            }
        }
    }

    /// A Kubernetes Event on the Node for a forwarder health transition (best effort).
    async fn record_transition(&self, t: &Transition) {
        let Some(node) = self.nodes.get(&t.node) else {
            return;
        };
        let (type_, reason) = match t.to {
            HealthState::Failed => (EventType::Warning, REASON_FORWARDER_FAILED),
            HealthState::Healthy => (EventType::Normal, REASON_FORWARDER_HEALTHY),
            HealthState::Pending => return,
        };
        let ev = KubeEvent {
            type_,
            reason: reason.to_string(),
            note: Some(format!(
                "forwarder health {} -> {}: the VPC routes targeting this node are planned again",
                t.from, t.to
            )),
            action: ACTION_FAILOVER.to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &node.object_ref(&())).await {
            tracing::debug!(error = %e, "recording event");
        }
    }
}

/// A task aborted when its handle is dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An Event note fits in 1 kB.
fn truncate_note(mut s: String) -> String {
    const MAX: usize = 1000;
    if s.len() > MAX {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Receive from an optional broadcast receiver; pending forever when there is none.
async fn recv_opt(
    rx: &mut Option<broadcast::Receiver<ControllerEvent>>,
) -> Result<ControllerEvent, broadcast::error::RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_ids() {
        assert_eq!(
            instance_id_of("aws:///us-east-1a/i-0123abcd"),
            Some(InstanceId("i-0123abcd".into()))
        );
        assert_eq!(
            instance_id_of("aws:///i-0123abcd"),
            Some(InstanceId("i-0123abcd".into()))
        );
        assert_eq!(instance_id_of("gce://proj/zone/vm-1"), None);
        assert_eq!(instance_id_of("aws:///us-east-1a/"), None);
        assert_eq!(instance_id_of("kind://docker/kind/kind-worker"), None);
        assert_eq!(instance_id_of("aws:///us-east-1a/i-"), None);
    }

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
