//! What both modes write on the Kubernetes objects they share — the UnderlayNode's owner reference, the Node's
//! underlay taints, the release of a Node outside the selection — and the classes of API errors their writes
//! retry on.

use ::kube::ResourceExt;
use ::kube::api::{Api, Patch, PatchParams};
use k8s_openapi::api::core::v1::{Node, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::json;
use underlay_api::{UnderlayNode, conditions};
use underlay_core::names;

use crate::selector::NodeSelector;

/// Attempts of one status or Node write answered 409 Conflict (each after re-reading the object).
pub(crate) const CONFLICT_ATTEMPTS: usize = 4;

/// The Event recorder both modes write with, as the controller's field manager.
pub(crate) fn recorder(client: ::kube::Client) -> ::kube::runtime::events::Recorder {
    ::kube::runtime::events::Recorder::new(
        client,
        ::kube::runtime::events::Reporter {
            controller: names::FIELD_MANAGER_CONTROLLER.to_string(),
            instance: None,
        },
    )
}

pub(crate) fn is_conflict(e: &::kube::Error) -> bool {
    matches!(e, ::kube::Error::Api(s) if s.is_conflict())
}

pub(crate) fn is_not_found(e: &::kube::Error) -> bool {
    matches!(e, ::kube::Error::Api(s) if s.is_not_found())
}

pub(crate) fn ready(un: &UnderlayNode) -> bool {
    un.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == conditions::READY && c.status == "True")
    })
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
