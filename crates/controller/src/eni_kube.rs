//! `eni` mode on the Kubernetes API: the same Lease as routed mode; while leading, every `resync` the leader
//! lists Nodes and UnderlayNodes, runs one [`EniReconciler::pass`] and writes what it found.
//!
//! ```text
//!   Nodes (providerID → instance) + UnderlayNode.status (agent: poolHeld,  ─► EniReconciler::pass ─► EC2
//!     observedReleaseGeneration; controller: pool.releasing*, releaseGeneration)
//!        ▲                                                                        │
//!        └── Node: taints not-ready / no-free-ips, max-pods annotation ◄──────────┤
//!            UnderlayNode: created (spec, labels, owner), status.pool / poolSize ◄┘
//! ```
//!
//! Taints (only the controller touches them): `underlay.dev/not-ready` until the pool is non-empty and the agent
//! reports Ready; `underlay.dev/no-free-ips` while `poolSize - poolUsed == 0` with a non-empty pool.
//!
//! Only the Nodes `KubeOptions::node_selector` selects are listed. A Node leaving the selection loses its
//! UnderlayNode and its underlay taints; the ENIs attached to it stay.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use ::kube::{Client, Resource, ResourceExt};
use k8s_openapi::api::core::v1::{Node, Taint};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use underlay_api::{Mode, UnderlayNode, UnderlayNodeSpec};
use underlay_cloud::Cloud;
use underlay_core::names;

use crate::eni::{EniNode, EniReconciler, EniSettings, NodeReport};
use crate::kube::{
    Elector, KubeError, KubeOptions, LeaseState, has_underlay_taint, instance_id_of, owner_ref,
    ready, untaint_if_unselected,
};
use crate::selector::NodeSelector;

/// Default period of an `eni`-mode pass.
pub const DEFAULT_ENI_RESYNC: Duration = Duration::from_secs(5);

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

/// Campaign for the lease; while holding it, run `eni` mode every `resync`. Returns when `shutdown` turns true
/// (releasing the lease if held) or its sender is dropped. API and EC2 errors are logged and retried.
pub async fn run_eni_on_kube(
    client: Client,
    cloud: Arc<dyn Cloud>,
    settings: EniSettings,
    resync: Duration,
    opts: KubeOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), KubeError> {
    if opts.renew_every.is_zero() || opts.renew_every >= opts.lease_duration || resync.is_zero() {
        return Err(KubeError::Options(
            "renew_every must be non-zero and shorter than lease_duration; resync non-zero".into(),
        ));
    }
    let mut elector = Elector::new(
        Api::namespaced(client.clone(), &opts.lease_namespace),
        opts.identity.clone(),
        opts.lease_duration,
    );
    loop {
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            match tokio::time::timeout(opts.renew_every, elector.try_acquire_or_renew()).await {
                Ok(Ok(LeaseState::Held)) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "campaigning for the lease"),
                Err(_) => tracing::warn!("campaigning for the lease: request timed out"),
            }
            tokio::select! {
                _ = tokio::time::sleep(opts.renew_every) => {}
                r = shutdown.changed() => if r.is_err() { return Ok(()); },
            }
        }
        tracing::info!(identity = %opts.identity, mode = "eni", "leading");
        if let Some(tx) = &opts.leading {
            tx.send_replace(true);
        }
        // A fresh reconciler per term: everything it needs is in EC2 and the API.
        let mut leader = EniLeader {
            nodes_api: Api::all(client.clone()),
            uns_api: Api::all(client.clone()),
            reconciler: EniReconciler::new(cloud.clone(), settings.clone()),
            selector: opts.node_selector.clone(),
            swept: false,
        };
        let passes = opts.passes.clone();
        let mut task = tokio::spawn(async move {
            loop {
                if leader.pass().await
                    && let Some(tx) = &passes
                {
                    tx.send_modify(|n| *n += 1);
                }
                tokio::time::sleep(resync).await;
            }
        });
        let mut last_renewed = Instant::now();
        let shutting_down = loop {
            let deadline = last_renewed + opts.lease_duration;
            tokio::select! {
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { break true; },
                r = &mut task => {
                    tracing::error!(result = ?r, "eni leader task ended; stepping down");
                    break false;
                }
                _ = tokio::time::sleep(opts.renew_every) => {
                    if Instant::now() >= deadline {
                        break false;
                    }
                    let started = Instant::now();
                    match tokio::time::timeout_at(deadline, elector.try_acquire_or_renew()).await {
                        Ok(Ok(LeaseState::Held)) => last_renewed = started,
                        Ok(Ok(LeaseState::Other(holder))) => {
                            tracing::warn!(%holder, "lease taken by another replica; stepping down");
                            break false;
                        }
                        Ok(Ok(LeaseState::Conflict)) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "renewing the lease"),
                        Err(_) => tracing::warn!("renewing the lease: request timed out"),
                    }
                }
            }
        };
        task.abort();
        let _ = (&mut task).await;
        if let Some(tx) = &opts.leading {
            tx.send_replace(false);
        }
        if shutting_down {
            if let Err(e) = elector.release().await {
                tracing::warn!(error = %e, "releasing the lease");
            }
            return Ok(());
        }
    }
}

struct EniLeader {
    nodes_api: Api<Node>,
    uns_api: Api<UnderlayNode>,
    reconciler: EniReconciler,
    /// The Nodes this controller manages: the Node list's label selector.
    selector: NodeSelector,
    /// This term's sweep of unselected Nodes for leftover underlay taints is done.
    swept: bool,
}

impl EniLeader {
    /// One pass; `false` when the API could not be listed (nothing was reconciled).
    async fn pass(&mut self) -> bool {
        let mut lp = ListParams::default();
        if let Some(q) = self.selector.to_query() {
            lp = lp.labels(&q);
        }
        let nodes = match self.nodes_api.list(&lp).await {
            Ok(l) => l.items,
            Err(e) => {
                tracing::warn!(error = %e, "listing Nodes");
                return false;
            }
        };
        let uns: BTreeMap<String, UnderlayNode> =
            match self.uns_api.list(&ListParams::default()).await {
                Ok(l) => l.items.into_iter().map(|u| (u.name_any(), u)).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "listing UnderlayNodes");
                    return false;
                }
            };
        let by_name: BTreeMap<String, &Node> = nodes.iter().map(|n| (n.name_any(), n)).collect();
        let eni_nodes: Vec<EniNode> = nodes
            .iter()
            .filter(|n| n.meta().deletion_timestamp.is_none())
            .filter_map(|n| {
                let provider = n.spec.as_ref()?.provider_id.as_deref()?;
                let name = n.name_any();
                let status = uns.get(&name).and_then(|u| u.status.as_ref());
                Some(EniNode::from_status(
                    name,
                    instance_id_of(provider)?,
                    status,
                ))
            })
            .collect();
        let report = self.reconciler.pass(&eni_nodes).await;
        for e in &report.errors {
            tracing::warn!(error = %e, "eni pass");
        }
        for n in &report.nodes {
            if let Some(err) = &n.error {
                tracing::warn!(node = %n.name, error = %err, "eni provisioning");
            }
            let Some(node) = by_name.get(&n.name) else {
                continue;
            };
            let un = match uns.get(&n.name) {
                Some(un) => un.clone(),
                None => match self.create_underlay_node(node, n).await {
                    Some(un) => un,
                    None => continue,
                },
            };
            self.write_status(&un, n).await;
            let status = un.status.as_ref();
            let used = status.map_or(0, |s| s.pool_used);
            if let Some(patch) = node_patch(node, ready(&un), n.pool_size, used, n.max_pods) {
                let pp = PatchParams::apply(names::FIELD_MANAGER_CONTROLLER);
                if let Err(e) = self
                    .nodes_api
                    .patch(&n.name, &pp, &Patch::Merge(&patch))
                    .await
                {
                    tracing::warn!(node = %n.name, error = %e, "patching Node");
                }
            }
        }
        self.release_unselected(&by_name, &uns).await;
        true
    }

    /// Nodes outside the selection are not managed: an UnderlayNode whose Node left the selection is deleted and
    /// the Node's underlay taints removed (once per term, every unselected Node's). Their ENIs are left as they
    /// are: attached ENIs stay with the instance (and go with it, DeleteOnTermination); the node is planned again
    /// from them if it is selected again.
    async fn release_unselected(
        &mut self,
        selected: &BTreeMap<String, &Node>,
        uns: &BTreeMap<String, UnderlayNode>,
    ) {
        if self.selector.is_all() {
            return;
        }
        let mut names: BTreeSet<String> = uns
            .values()
            .filter(|u| u.spec.mode == Mode::Eni && !selected.contains_key(&u.name_any()))
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
                Err(e) => tracing::warn!(error = %e, "listing Nodes for leftover taints"),
            }
        }
        for name in names {
            if let Err(e) = untaint_if_unselected(&self.nodes_api, &self.selector, &name).await {
                tracing::warn!(node = %name, error = %e, "untainting unselected Node");
                continue;
            }
            if !uns.contains_key(&name) {
                continue;
            }
            match self.uns_api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(node = %name, "Node outside the node selector: UnderlayNode deleted")
                }
                Err(::kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => tracing::warn!(node = %name, error = %e, "deleting UnderlayNode"),
            }
        }
    }

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
            Err(e) => {
                tracing::warn!(node = %n.name, error = %e, "creating UnderlayNode");
                None
            }
        }
    }

    async fn write_status(&self, un: &UnderlayNode, n: &NodeReport) {
        let current = un.status.as_ref();
        if current.and_then(|s| s.pool.as_ref()) == Some(&n.pool)
            && current.map(|s| s.pool_size) == Some(n.pool_size)
        {
            return;
        }
        let patch = json!({ "status": { "pool": n.pool, "poolSize": n.pool_size } });
        let pp = PatchParams::apply(names::FIELD_MANAGER_CONTROLLER);
        if let Err(e) = self
            .uns_api
            .patch_status(&n.name, &pp, &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(node = %n.name, error = %e, "writing UnderlayNode status");
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
