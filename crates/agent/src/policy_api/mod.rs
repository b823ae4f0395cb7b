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
pub use kube::{PolicyFollower, PolicyState};
