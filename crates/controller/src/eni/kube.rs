//! `eni` mode on the Kubernetes API: the same Lease and lease loop as routed mode ([`crate::lease`]); while leading,
//! the leader keeps Nodes and UnderlayNodes in caches fed by watches, runs an [`EniReconciler::pass`] over them
//! when something a pass reads changed (after [`ENI_DEBOUNCE`], so a burst of changes makes one pass) and at least
//! every `resync` (pools follow EC2 state and usage even without API events), and writes what it found.
//!
//! ```text
//!   watch Nodes (selector) ──► cache ─┐  relevant change: pass in ENI_DEBOUNCE; else every resync
//!   watch UnderlayNodes ─────► cache ─┤
//!     (agent: poolHeld, observedReleaseGeneration; controller: pool.releasing*, releaseGeneration)
//!                                     ▼
//!                      EniNode per Node ─► EniReconciler::pass ─► EC2
//!                                                                   │
//!   Node: taints not-ready / no-free-ips, max-pods annotation ◄─────┤
//!   UnderlayNode: created (spec, labels, owner), status.pool / poolSize ◄┘
//! ```
//!
//! No pass runs before both watches have completed their initial list: a partial node set must not drive
//! decisions. The leader's own writes go into the caches at once (a watch event older than a write's response does
//! not undo it), so the next pass reads what the last one wrote, as a fresh list would have shown it.
//!
//! Taints (only the controller touches them): `underlay.dev/not-ready` until the pool is non-empty and the agent
//! reports Ready; `underlay.dev/no-free-ips` while `poolSize - poolUsed == 0` with a non-empty pool.
//!
//! Only the Nodes `KubeOptions::node_selector` selects are watched (the watch carries it as its label selector).
//! A Node leaving the selection loses its UnderlayNode and its underlay taints; the ENIs attached to it stay.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use ::kube::runtime::WatchStreamExt;
use ::kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use ::kube::runtime::watcher::{self, Event as WatchEvent, watcher as watch_stream};
use ::kube::{Client, Resource, ResourceExt};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Taint};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use underlay_api::{Mode, UnderlayNode, UnderlayNodeSpec};
use underlay_cloud::Cloud;
use underlay_core::names;

use super::{EniNode, EniReconciler, EniSettings, NodeReport};
use crate::index::{Cache, instance_id_of, slim_node};
use crate::lease::{KubeError, KubeOptions, lead};
use crate::objects::{
    CONFLICT_ATTEMPTS, has_underlay_taint, is_conflict, is_not_found, owner_ref, ready,
    untaint_if_unselected,
};
use crate::selector::NodeSelector;

/// Default period of an `eni`-mode pass when nothing on the API changes.
pub const DEFAULT_ENI_RESYNC: Duration = Duration::from_secs(5);
/// Delay between the first API change a pass reads and the pass it triggers, and the least time between the end
/// of a pass and a pass an API change triggers: a join of many nodes, or an agent's burst of status writes, makes
/// one pass, and passes never run back to back (each costs EC2 describes).
pub const ENI_DEBOUNCE: Duration = Duration::from_secs(1);
/// Nodes whose UnderlayNode and Node the leader writes at once.
const WRITE_CONCURRENCY: usize = 8;

/// The Node patch (taints and max-pods annotation) that brings `node` in line, if any. Pure.
pub fn node_patch(
    node: &Node,
    agent_ready: bool,
    pool_size: u32,
    pool_used: u32,
    max_pods: u32,
) -> Option<serde_json::Value> {
    let taints: Vec<Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let has = |key: &str| taints.iter().any(|t| t.key == key);
    let want_not_ready = !(agent_ready && pool_size > 0);
    let want_no_free = pool_size > 0 && pool_used >= pool_size;
    let annotation = max_pods.to_string();
    let annotated = node
        .annotations()
        .get(names::MAX_PODS_ANNOTATION)
        .map(String::as_str)
        == Some(&annotation);
    let taints_ok = has(names::TAINT_NOT_READY) == want_not_ready
        && has(names::TAINT_NO_FREE_IPS) == want_no_free;
    if taints_ok && annotated {
        return None;
    }
    let mut patch = json!({ "metadata": { "resourceVersion": node.resource_version() } });
    if !annotated {
        patch["metadata"]["annotations"] = json!({ names::MAX_PODS_ANNOTATION: annotation });
    }
    if !taints_ok {
        let mut next: Vec<Taint> = taints
            .into_iter()
            .filter(|t| t.key != names::TAINT_NOT_READY && t.key != names::TAINT_NO_FREE_IPS)
            .collect();
        for (want, key) in [
            (want_not_ready, names::TAINT_NOT_READY),
            (want_no_free, names::TAINT_NO_FREE_IPS),
        ] {
            if want {
                next.push(Taint {
                    key: key.to_string(),
                    effect: "NoSchedule".to_string(),
                    ..Default::default()
                });
            }
        }
        patch["spec"] = json!({ "taints": next });
    }
    Some(patch)
}

/// Event reason on a Node whose new ENI the zone's network-interface quota refused (or holds back).
pub const REASON_ENI_QUOTA: &str = "EniQuotaExceeded";
const ACTION_CREATE_ENI: &str = "CreateNetworkInterface";

/// Campaign for the lease; while holding it, run `eni` mode: a pass when the watched Nodes or UnderlayNodes
/// change, and at least every `resync`. Returns when `shutdown` turns true (releasing the lease if held) or its
/// sender is dropped. API and EC2 errors are logged and retried.
pub async fn run_eni_on_kube(
    client: Client,
    cloud: Arc<dyn Cloud>,
    settings: EniSettings,
    resync: Duration,
    opts: KubeOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<(), KubeError> {
    if resync.is_zero() || opts.retry_every.is_zero() {
        return Err(KubeError::Options(
            "resync and retry_every must be non-zero".into(),
        ));
    }
    let timing = Timing {
        resync,
        debounce: ENI_DEBOUNCE,
        retry_every: opts.retry_every,
    };
    lead(&client, &opts, "eni", shutdown, |stop| {
        // A fresh reconciler per term: everything it needs is in EC2 and the API.
        EniLeader::new(
            client.clone(),
            EniReconciler::new(cloud.clone(), settings.clone()),
            opts.node_selector.clone(),
            timing,
            opts.passes.clone(),
        )
        .run(stop)
    })
    .await
}

/// When the leader passes.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// Longest time between passes.
    resync: Duration,
    /// Coalescing delay of a pass an API change triggers ([`ENI_DEBOUNCE`]).
    debounce: Duration,
    /// Next pass after one whose API writes failed.
    retry_every: Duration,
}

/// What a pass reads of a Node.
fn node_facts(n: &Node) -> impl PartialEq + use<> {
    let spec = n.spec.as_ref();
    (
        n.uid(),
        n.meta().deletion_timestamp.is_some(),
        spec.and_then(|s| s.provider_id.clone()),
        spec.and_then(|s| s.taints.clone()),
        n.annotations().get(names::MAX_PODS_ANNOTATION).cloned(),
    )
}

/// What a pass reads of an UnderlayNode: its spec, the agent's report (usage, held addresses, acknowledged
/// release generation, Ready) and the pool the controller wrote.
fn underlay_node_facts(u: &UnderlayNode) -> impl PartialEq + use<> {
    let status = u.status.clone().unwrap_or_default();
    (
        u.spec.clone(),
        u.meta().deletion_timestamp.is_some(),
        ready(u),
        status.pool,
        status.pool_size,
        status.pool_used,
        status.pool_held,
        status.observed_release_generation,
    )
}

/// What writing one node's report produced: the objects as the API answered them (for the caches).
#[derive(Debug, Default)]
struct Written {
    node: Option<Node>,
    underlay_node: Option<UnderlayNode>,
    /// Every write needed succeeded.
    ok: bool,
}

struct EniLeader {
    nodes_api: Api<Node>,
    uns_api: Api<UnderlayNode>,
    recorder: Recorder,
    reconciler: EniReconciler,
    /// The Nodes this controller manages: the Node watch's label selector.
    selector: NodeSelector,
    timing: Timing,
    passes: Option<watch::Sender<u64>>,
    /// The selected Nodes.
    nodes: Cache<Node>,
    uns: Cache<UnderlayNode>,
    /// This term's sweep of unselected Nodes for leftover underlay taints is done.
    swept: bool,
}

impl EniLeader {
    fn new(
        client: Client,
        reconciler: EniReconciler,
        selector: NodeSelector,
        timing: Timing,
        passes: Option<watch::Sender<u64>>,
    ) -> Self {
        let recorder = crate::objects::recorder(client.clone());
        Self {
            nodes_api: Api::all(client.clone()),
            uns_api: Api::all(client),
            recorder,
            reconciler,
            selector,
            timing,
            passes,
            nodes: Cache::new(),
            uns: Cache::new(),
            swept: false,
        }
    }

    /// Watch, and pass when due, until `stop` turns true.
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
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
        // The first pass runs as soon as both caches are complete.
        let mut due = Instant::now();
        loop {
            let synced = self.nodes.synced && self.uns.synced;
            tokio::select! {
                r = stop.changed() => if r.is_err() || *stop.borrow() { return; },
                Some(ev) = node_events.next() => {
                    if self.absorb_node(ev) {
                        due = due.min(Instant::now() + self.timing.debounce);
                    }
                }
                Some(ev) = un_events.next() => {
                    if self.absorb_underlay_node(ev) {
                        due = due.min(Instant::now() + self.timing.debounce);
                    }
                }
                _ = tokio::time::sleep_until(due), if synced => {
                    // The watches keep being read while the pass runs (a stalled watch is dropped by the API
                    // server); what they bring is applied after it.
                    let (mut held_nodes, mut held_uns) = (Vec::new(), Vec::new());
                    let ok = {
                        let pass = self.pass();
                        futures::pin_mut!(pass);
                        loop {
                            tokio::select! {
                                ok = &mut pass => break ok,
                                Some(ev) = node_events.next() => held_nodes.push(ev),
                                Some(ev) = un_events.next() => held_uns.push(ev),
                            }
                        }
                    };
                    if let Some(tx) = &self.passes {
                        tx.send_modify(|n| *n += 1);
                    }
                    let now = Instant::now();
                    let wait = if ok {
                        self.timing.resync
                    } else {
                        self.timing.retry_every.min(self.timing.resync)
                    };
                    due = now + wait;
                    let mut changed = false;
                    for ev in held_nodes {
                        changed |= self.absorb_node(ev);
                    }
                    for ev in held_uns {
                        changed |= self.absorb_underlay_node(ev);
                    }
                    if changed {
                        due = due.min(now + self.timing.debounce);
                    }
                }
            }
        }
    }

    /// Apply a Node watch event; `true` when a pass should follow.
    fn absorb_node(&mut self, ev: Result<WatchEvent<Node>, watcher::Error>) -> bool {
        match ev {
            Ok(ev) => self.nodes.absorb(ev, node_facts),
            Err(e) => {
                tracing::warn!(error = %e, "watching Nodes");
                false
            }
        }
    }

    /// Apply an UnderlayNode watch event; `true` when a pass should follow.
    fn absorb_underlay_node(
        &mut self,
        ev: Result<WatchEvent<UnderlayNode>, watcher::Error>,
    ) -> bool {
        match ev {
            Ok(ev) => self.uns.absorb(ev, underlay_node_facts),
            Err(e) => {
                tracing::warn!(error = %e, "watching UnderlayNodes");
                false
            }
        }
    }

    /// The reconciler's view of the selected Nodes: instance from `spec.providerID`, usage and withdrawals from
    /// the UnderlayNode status.
    fn eni_nodes(&self) -> Vec<EniNode> {
        self.nodes
            .objects
            .values()
            .filter(|n| n.meta().deletion_timestamp.is_none())
            .filter_map(|n| {
                let provider = n.spec.as_ref()?.provider_id.as_deref()?;
                let name = n.name_any();
                let status = self.uns.objects.get(&name).and_then(|u| u.status.as_ref());
                Some(EniNode::from_status(
                    name,
                    instance_id_of(provider)?,
                    status,
                ))
            })
            .collect()
    }

    /// One pass over the cached Nodes; `false` when an API write failed (the pass is retried sooner). Each node's
    /// UnderlayNode and Node are written as soon as the reconciler hands over its report, not after the whole pass:
    /// on a large join the first nodes' pools are ready (and their not-ready taint lifted) long before the last.
    async fn pass(&mut self) -> bool {
        let eni_nodes = self.eni_nodes();
        let (tx, rx) = mpsc::unbounded_channel();
        let this = &*self;
        let finished =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|n| (n, rx)) });
        let writes = finished
            .map(|n| async move { this.write_node(&n).await })
            .buffer_unordered(WRITE_CONCURRENCY)
            .collect::<Vec<Written>>();
        let (report, written) =
            futures::join!(this.reconciler.pass_with(&eni_nodes, Some(tx)), writes);
        for e in &report.errors {
            tracing::warn!(error = %e, "eni pass");
        }
        let mut ok = true;
        for w in written {
            ok &= w.ok;
            self.remember(w);
        }
        ok & self.release_unselected().await
    }

    fn remember(&mut self, written: Written) {
        if let Some(n) = written.node {
            self.nodes.remember(slim_node(n));
        }
        if let Some(u) = written.underlay_node {
            self.uns.remember(u);
        }
    }

    /// Bring one node's UnderlayNode (created if missing, status) and Node (taints, max-pods annotation) in line
    /// with its report.
    async fn write_node(&self, n: &NodeReport) -> Written {
        let mut out = Written {
            ok: true,
            ..Written::default()
        };
        if let Some(err) = &n.error {
            tracing::warn!(node = %n.name, error = %err, "eni provisioning");
        }
        // Gone from the selection (or deleted) since the pass began: nothing to write.
        let Some(node) = self.nodes.objects.get(&n.name) else {
            return out;
        };
        if let Some(why) = &n.eni_quota {
            // Best effort; the Recorder folds repeats into one series.
            let ev = KubeEvent {
                type_: EventType::Warning,
                reason: REASON_ENI_QUOTA.to_string(),
                note: Some(format!(
                    "network-interface quota reached, no new ENI for this node until it has room: {why}"
                )),
                action: ACTION_CREATE_ENI.to_string(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&ev, &node.object_ref(&())).await {
                tracing::debug!(error = %e, "recording event");
            }
        }
        if node.meta().deletion_timestamp.is_some() {
            return out;
        }
        let mut un = match self.uns.objects.get(&n.name) {
            Some(un) => un.clone(),
            None => match self.create_underlay_node(node, n).await {
                Some(un) => {
                    out.underlay_node = Some(un.clone());
                    un
                }
                None => {
                    out.ok = false;
                    return out;
                }
            },
        };
        match self.write_status(&un, n).await {
            Ok(Some(written)) => {
                un = written;
                out.underlay_node = Some(un.clone());
            }
            Ok(None) => {}
            Err(()) => out.ok = false,
        }
        let used = un.status.as_ref().map_or(0, |s| s.pool_used);
        let pp = PatchParams::apply(names::FIELD_MANAGER_CONTROLLER);
        let mut node = node.clone();
        for attempt in 1..=CONFLICT_ATTEMPTS {
            let Some(patch) = node_patch(&node, ready(&un), n.pool_size, used, n.max_pods) else {
                break;
            };
            match self
                .nodes_api
                .patch(&n.name, &pp, &Patch::Merge(&patch))
                .await
            {
                Ok(patched) => {
                    out.node = Some(patched);
                    break;
                }
                // The cache was behind (a kubelet status update, a taint by someone else): read it again.
                Err(e) if is_conflict(&e) && attempt < CONFLICT_ATTEMPTS => {
                    match self.nodes_api.get_opt(&n.name).await {
                        Ok(Some(fresh)) => {
                            out.node = Some(fresh.clone());
                            node = fresh;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(node = %n.name, error = %e, "reading Node");
                            out.ok = false;
                            break;
                        }
                    }
                }
                Err(e) if is_not_found(&e) => break,
                Err(e) => {
                    tracing::warn!(node = %n.name, error = %e, "patching Node");
                    out.ok = false;
                    break;
                }
            }
        }
        out
    }

    /// Nodes outside the selection are not managed: an UnderlayNode whose Node left the selection is deleted and
    /// the Node's underlay taints removed (once per term, every unselected Node's). Their ENIs are left as they
    /// are: attached ENIs stay with the instance (and go with it, DeleteOnTermination); the node is planned again
    /// from them if it is selected again. `false` when something failed.
    async fn release_unselected(&mut self) -> bool {
        if self.selector.is_all() {
            return true;
        }
        let mut ok = true;
        let mut names: BTreeSet<String> = self
            .uns
            .objects
            .values()
            .filter(|u| u.spec.mode == Mode::Eni && !self.nodes.objects.contains_key(&u.name_any()))
            .map(ResourceExt::name_any)
            .collect();
        if !self.swept {
            match self.nodes_api.list(&ListParams::default()).await {
                Ok(list) => {
                    names.extend(
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
        for name in names {
            if let Err(e) = untaint_if_unselected(&self.nodes_api, &self.selector, &name).await {
                tracing::warn!(node = %name, error = %e, "untainting unselected Node");
                ok = false;
                continue;
            }
            if !self.uns.objects.contains_key(&name) {
                continue;
            }
            match self.uns_api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(node = %name, "Node outside the node selector: UnderlayNode deleted");
                    self.uns.objects.remove(&name);
                }
                Err(e) if is_not_found(&e) => {
                    self.uns.objects.remove(&name);
                }
                Err(e) => {
                    tracing::warn!(node = %name, error = %e, "deleting UnderlayNode");
                    ok = false;
                }
            }
        }
        ok
    }

    /// Create the node's UnderlayNode; the existing one when the cache had not seen it yet.
    async fn create_underlay_node(&self, node: &Node, n: &NodeReport) -> Option<UnderlayNode> {
        let spec = UnderlayNodeSpec {
            instance_id: n.instance.to_string(),
            subnet_id: n.subnet.to_string(),
            zone: n.zone.clone(),
            mode: Mode::Eni,
            node_ip: n.node_ip.to_string(),
            primary_eni_id: n.primary_eni.clone().unwrap_or_default(),
        };
        let mut un = UnderlayNode::new(&n.name, spec);
        un.metadata.labels = Some(BTreeMap::from([
            (names::LABEL_NODE.to_string(), n.name.clone()),
            (names::LABEL_MODE.to_string(), "eni".to_string()),
        ]));
        un.metadata.owner_references = Some(vec![owner_ref(node)]);
        let pp = PostParams {
            field_manager: Some(names::FIELD_MANAGER_CONTROLLER.to_string()),
            ..Default::default()
        };
        match self.uns_api.create(&pp, &un).await {
            Ok(created) => Some(created),
            Err(::kube::Error::Api(s)) if s.is_already_exists() => {
                match self.uns_api.get_opt(&n.name).await {
                    Ok(found) => found,
                    Err(e) => {
                        tracing::warn!(node = %n.name, error = %e, "reading UnderlayNode");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::warn!(node = %n.name, error = %e, "creating UnderlayNode");
                None
            }
        }
    }

    /// The pool and its size into the status; `Ok(None)` when it already says so.
    /// Writes the node's pool, on condition that the object is still the one the pass read: the two-phase
    /// release must never write a withdrawal (and its generation) over one it did not see — say its own earlier
    /// write, whose response was lost — or a generation could stand for two different sets. A conflict caused by
    /// the agent's writes alone (the pool is as the pass read it) is retried once against the fresh object.
    async fn write_status(
        &self,
        un: &UnderlayNode,
        n: &NodeReport,
    ) -> Result<Option<UnderlayNode>, ()> {
        let current = un.status.as_ref();
        if current.and_then(|s| s.pool.as_ref()) == Some(&n.pool)
            && current.map(|s| s.pool_size) == Some(n.pool_size)
        {
            return Ok(None);
        }
        let pp = PatchParams::apply(names::FIELD_MANAGER_CONTROLLER);
        let patch = |rv: Option<String>| {
            json!({
                "metadata": { "resourceVersion": rv },
                "status": { "pool": n.pool, "poolSize": n.pool_size },
            })
        };
        let first = self
            .uns_api
            .patch_status(&n.name, &pp, &Patch::Merge(&patch(un.resource_version())))
            .await;
        let result = match first {
            Err(::kube::Error::Api(s)) if s.code == 409 => {
                match self.uns_api.get_status(&n.name).await {
                    Ok(fresh)
                        if fresh.status.as_ref().and_then(|s| s.pool.as_ref())
                            == current.and_then(|s| s.pool.as_ref()) =>
                    {
                        self.uns_api
                            .patch_status(
                                &n.name,
                                &pp,
                                &Patch::Merge(&patch(fresh.resource_version())),
                            )
                            .await
                    }
                    Ok(_) => {
                        tracing::info!(node = %n.name, "UnderlayNode pool changed since the pass read it; the next pass plans from the new one");
                        return Err(());
                    }
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        match result {
            Ok(written) => Ok(Some(written)),
            Err(e) => {
                tracing::warn!(node = %n.name, error = %e, "writing UnderlayNode status");
                Err(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;

    fn mk_node(taints: &[&str], max_pods: Option<&str>) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some("n1".into());
        n.metadata.resource_version = Some("7".into());
        if let Some(m) = max_pods {
            n.metadata.annotations = Some(BTreeMap::from([(
                names::MAX_PODS_ANNOTATION.to_string(),
                m.to_string(),
            )]));
        }
        n.spec = Some(NodeSpec {
            taints: Some(
                taints
                    .iter()
                    .map(|k| Taint {
                        key: (*k).to_string(),
                        effect: "NoSchedule".into(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        });
        n
    }

    fn taint_keys(patch: &serde_json::Value) -> Vec<String> {
        patch["spec"]["taints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["key"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn not_ready_until_the_pool_is_non_empty_and_the_agent_ready() {
        let n = mk_node(&[names::TAINT_NOT_READY, "other"], Some("29"));
        assert_eq!(node_patch(&n, true, 0, 0, 29), None);
        assert_eq!(node_patch(&n, false, 9, 0, 29), None);
        let p = node_patch(&n, true, 9, 0, 29).unwrap();
        assert_eq!(taint_keys(&p), vec!["other"]);
        assert_eq!(p["metadata"]["resourceVersion"], "7");
    }

    #[test]
    fn no_free_ips_while_every_address_is_used() {
        let n = mk_node(&[], Some("29"));
        let p = node_patch(&n, true, 9, 9, 29).unwrap();
        assert_eq!(taint_keys(&p), vec![names::TAINT_NO_FREE_IPS]);
        let full = mk_node(&[names::TAINT_NO_FREE_IPS], Some("29"));
        assert_eq!(node_patch(&full, true, 9, 9, 29), None);
        let p = node_patch(&full, true, 18, 9, 29).unwrap();
        assert!(taint_keys(&p).is_empty());
    }

    #[test]
    fn max_pods_annotation_is_set_once() {
        let n = mk_node(&[], None);
        let p = node_patch(&n, true, 9, 0, 110).unwrap();
        assert_eq!(
            p["metadata"]["annotations"][names::MAX_PODS_ANNOTATION],
            "110"
        );
        assert!(p.get("spec").is_none());
    }
}
