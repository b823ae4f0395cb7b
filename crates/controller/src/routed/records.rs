//! What the routed-mode leader writes: an UnderlayNode per Node (spec, labels, owner, finalizer), its status from
//! the plan, the Node's not-ready taint and podCIDR, and the release of Nodes that left (deleted or unselected).

use ::kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use ::kube::{Resource, ResourceExt};
use k8s_openapi::api::core::v1::{Node, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::json;
use underlay_api::UnderlayNode;
use underlay_core::names;

use super::kube::Leader;
use super::{
    NodeInstance, has_not_ready_taint, in_plan, labels_for, not_ready_taint, region_of, spec_of,
    status_fields, wants_not_ready_taint,
};
use crate::index::slim_node;
use crate::objects::{
    CONFLICT_ATTEMPTS, has_underlay_taint, is_conflict, is_not_found, owner_ref, ready,
    untaint_if_unselected,
};

impl Leader {
    /// An UnderlayNode for every Node whose instance is known, with the spec, labels, owner and finalizer.
    pub(super) async fn ensure_underlay_nodes(&mut self) -> bool {
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

    /// UnderlayNodes whose Node is gone: delete them; drop the finalizer once the plan no longer has the node.
    pub(super) async fn collect_underlay_nodes(&mut self) -> bool {
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
    pub(super) async fn write_statuses(&mut self) -> bool {
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
    pub(super) async fn write_node_specs(&mut self) -> bool {
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
                        self.nodes.insert(name.clone(), slim_node(n));
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
    pub(super) async fn release_unselected(&mut self) -> bool {
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
}
