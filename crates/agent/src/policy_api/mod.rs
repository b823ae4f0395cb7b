//! NetworkPolicy inputs from the Kubernetes API: what this node's policies need, and nothing cluster-wide but
//! Namespaces and NetworkPolicies (docs/policy.md, "Fan-out").
//!
//! ```text
//!   API server ──► kube::PolicyFollower (watches) ──► index::PolicyIndex (pure) ──► PolicyState
//!                                                        │  underlay_api::policy: k8s-openapi → core inputs
//!                                                        └─ ready_for(pod): ADD decides or says what is missing
//! ```
//!
//! The agent watches all Namespaces and NetworkPolicies, its own node's Pods (`spec.nodeName`), and, for each
//! policy that selects one of its pods, the peer Pods that policy names: one watch per (namespace, pod
//! selector), namespaces resolved through the namespace selector over the Namespaces it holds.

pub mod index;
pub mod kube;

pub use index::{NotReady, PeerWatch, PolicyIndex};
pub use kube::{PolicyFollower, PolicyState, forward_synced};

use std::path::PathBuf;
use std::sync::Arc;

use crate::metrics::AgentMetrics;
use crate::policy::{NsNft, PolicyEngine, PolicyInputs};

/// Network policy enforcement on Kubernetes, as both modes start it: the engine (nft in `netns`) and the task
/// that follows this node's policy inputs and hands every synced snapshot to the engine. The engine is attached
/// to the IPAM service once the service opens ([`crate::IpamService::set_policy`]); from then on ADD waits for
/// each pod's policy state.
pub(crate) struct Enforcement {
    pub engine: Arc<PolicyEngine>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts [`Enforcement`] for node `node`; `None` when `on` is false (no policy is enforced, ADD never waits).
pub(crate) fn spawn_enforcement(
    on: bool,
    client: ::kube::Client,
    node: &str,
    netns: PathBuf,
    metrics: AgentMetrics,
) -> Option<Enforcement> {
    if !on {
        tracing::warn!(
            "network policy enforcement is off (--no-network-policy): NetworkPolicies are ignored"
        );
        return None;
    }
    // Inputs may arrive before the IPAM service has read its checkpoint: nothing is committed until the
    // service restores the pods this node already has (else their verdicts would be dropped meanwhile).
    let engine = Arc::new(PolicyEngine::awaiting_restore(Box::new(NsNft::new(netns))));
    engine.set_metrics(metrics);
    let follower = PolicyFollower::start(client, node);
    let states = follower.subscribe();
    let publish_to = engine.clone();
    let task = tokio::spawn(async move {
        // The follower's watches live as long as this task.
        let _follower = follower;
        forward_synced(states, move |cluster| {
            // nft runs synchronously under the engine's lock; keep the runtime's other tasks moving.
            tokio::task::block_in_place(|| publish_to.publish(cluster));
        })
        .await;
    });
    Some(Enforcement { engine, task })
}
