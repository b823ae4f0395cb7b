//! The routed-mode leader's watch loop: Nodes and UnderlayNodes into the indexes, node instances described, the
//! node set handed to [`Controller::run`], its passes and health transitions turned into writes
//! ([`super::records`]) and Events.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, Patch, PatchParams};
use ::kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use ::kube::runtime::watcher::{self, Event as WatchEvent};
use ::kube::runtime::{WatchStreamExt, watcher::watcher as watch_stream};
use ::kube::{Client, Resource, ResourceExt};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use serde_json::Value;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use underlay_api::UnderlayNode;
use underlay_cloud::{Cloud, InstanceId, InstanceState};
use underlay_core::health::{HealthState, Transition};
use underlay_core::names;
use underlay_core::planner::RoutedPlan;
use underlay_core::routeops::RouteOp;

use super::{
    ACTION_FAILOVER, ACTION_PLAN_AROUND, NodeInstance, REASON_FOREIGN_ROUTE,
    REASON_FORWARDER_FAILED, REASON_FORWARDER_HEALTHY, REASON_ROUTES_MOVED, previous_plan,
};
use crate::config::{ClusterNode, ControllerConfig};
use crate::controller::{Controller, ControllerEvent};
use crate::describe::describe_instances;
use crate::index::{apply_watch_event, instance_id_of, slim_node};
use crate::lanes::{CloudLanes, Priority};
use crate::lease::{KubeError, KubeOptions, check_lease_timing, lead};
use crate::probe::Prober;
use crate::routes::{ForeignRouteFinding, ReconcileReport};
use crate::selector::NodeSelector;

/// A missing instance is described again after this many retry periods.
const MISSING_RECHECK: u32 = 5;

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
        .reporting_on_lease(&opts.lease_namespace)
        .run(stop)
    })
    .await
}

// ───────────────────────────────────────── the leader's work ─────────────────────────────────────────

/// Everything the lease holder does; dropped (aborted) when the lease is lost.
pub(super) struct Leader {
    pub(super) nodes_api: Api<Node>,
    pub(super) uns_api: Api<UnderlayNode>,
    pub(super) cloud: Arc<dyn Cloud>,
    pub(super) lanes: Arc<dyn CloudLanes>,
    pub(super) config: ControllerConfig,
    pub(super) prober: Option<Arc<dyn Prober>>,
    pub(super) retry_every: Duration,
    pub(super) events: Option<broadcast::Sender<ControllerEvent>>,
    pub(super) recorder: Recorder,
    pub(super) nodes: BTreeMap<String, Node>,
    pub(super) uns: BTreeMap<String, UnderlayNode>,
    pub(super) nodes_synced: bool,
    pub(super) uns_synced: bool,
    /// Described instances by id; `None`: the instance does not exist or is not running.
    pub(super) instances: HashMap<InstanceId, Option<NodeInstance>>,
    /// When each missing instance was last described.
    pub(super) missing_checked: HashMap<InstanceId, Instant>,
    /// Nodes already reported as not on AWS.
    pub(super) foreign: BTreeSet<String>,
    pub(super) plan: Option<RoutedPlan>,
    /// Nodes whose block the latest pass that planned left routed in every managed table
    /// ([`ReconcileReport::routed_nodes`]); `None` until this leader's first such pass.
    pub(super) routed: Option<BTreeSet<String>>,
    pub(super) nodes_tx: Option<watch::Sender<Vec<ClusterNode>>>,
    /// The Nodes this controller manages; the Node watch carries it as its label selector.
    pub(super) selector: NodeSelector,
    /// Nodes that left the selection (or may have: a deleted Node is checked too) whose underlay taints are to be
    /// removed.
    pub(super) released: BTreeSet<String>,
    /// This term's sweep of unselected Nodes for leftover underlay taints is done.
    pub(super) swept: bool,
    /// Where cluster-wide Events go (the leader Lease); `None`: not recorded.
    pub(super) lease_ref: Option<ObjectReference>,
    /// Foreign routes inside the pod CIDR already reported (an Event each) as of the last pass.
    pub(super) foreign_reported: BTreeSet<ForeignRouteFinding>,
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
        let recorder = crate::objects::recorder(client.clone());
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
            lease_ref: None,
            foreign_reported: BTreeSet::new(),
        }
    }

    /// Manage only the Nodes `selector` selects.
    /// Record cluster-wide Events (foreign routes) on the leader Lease in `namespace`.
    fn reporting_on_lease(mut self, namespace: &str) -> Self {
        self.lease_ref = Some(ObjectReference {
            api_version: Some("coordination.k8s.io/v1".to_string()),
            kind: Some("Lease".to_string()),
            name: Some(names::LEADER_LEASE.to_string()),
            namespace: Some(namespace.to_string()),
            ..ObjectReference::default()
        });
        self
    }

    fn selecting(mut self, selector: NodeSelector) -> Self {
        self.selector = selector;
        self
    }

    async fn run(mut self, stop: watch::Receiver<bool>) {
        let mut node_config = watcher::Config::default();
        if let Some(q) = self.selector.to_query() {
            node_config = node_config.labels(&q);
        }
        let node_events = watch_stream(self.nodes_api.clone(), node_config)
            .default_backoff()
            .modify(|n| *n = slim_node(std::mem::take(n)));
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
                                self.record_foreign_routes(&report.routes).await;
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

    pub(super) fn resolved(&self, node: &Node) -> Option<&NodeInstance> {
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

    /// Describe the instances of Nodes not seen yet (batched: [`describe_instances`]), and again, every
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
        let ids: Vec<InstanceId> = wanted.iter().cloned().collect();
        let found = match describe_instances(self.cloud.as_ref(), &ids).await {
            Ok(found) => found,
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

    /// A current Node's instance was found missing.
    fn any_missing(&self) -> bool {
        self.nodes.values().any(|n| {
            self.instance_of(n)
                .is_some_and(|id| matches!(self.instances.get(&id), Some(None)))
        })
    }

    pub(super) async fn patch_un(
        &self,
        name: &str,
        patch: &Value,
    ) -> Result<UnderlayNode, ::kube::Error> {
        self.uns_api
            .patch(
                name,
                &PatchParams::apply(names::FIELD_MANAGER_CONTROLLER),
                &Patch::Merge(patch),
            )
            .await
    }

    pub(super) async fn refresh_un(&mut self, name: &str) {
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

    pub(super) async fn refresh_node(&mut self, name: &str) {
        match self.nodes_api.get_opt(name).await {
            Ok(Some(n)) => {
                self.nodes.insert(name.to_string(), slim_node(n));
            }
            Ok(None) => {
                self.nodes.remove(name);
            }
            Err(e) => tracing::warn!(node = %name, error = %e, "reading Node"),
        }
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

    /// A Warning Event on the leader Lease for each foreign route inside the pod CIDR not reported yet in this
    /// term (best effort): such a route is left untouched and its destination planned around.
    async fn record_foreign_routes(&mut self, report: &ReconcileReport) {
        if report.managed_tables.is_empty() {
            return;
        }
        let now: BTreeSet<ForeignRouteFinding> = report.foreign_routes.iter().cloned().collect();
        let new: Vec<&ForeignRouteFinding> = now.difference(&self.foreign_reported).collect();
        for f in &new {
            tracing::warn!(route_table = %f.route_table, destination = %f.destination, target = %f.target, "foreign route inside the pod CIDR: left untouched, its destination planned around");
        }
        if let Some(lease) = &self.lease_ref {
            for f in new {
                let ev = KubeEvent {
                    type_: EventType::Warning,
                    reason: REASON_FOREIGN_ROUTE.to_string(),
                    note: Some(truncate_note(f.to_string())),
                    action: ACTION_PLAN_AROUND.to_string(),
                    secondary: None,
                };
                if let Err(e) = self.recorder.publish(&ev, lease).await {
                    tracing::debug!(error = %e, "recording event");
                }
            }
        }
        self.foreign_reported = now;
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
