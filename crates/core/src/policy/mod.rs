//! Kubernetes NetworkPolicy (`networking.k8s.io/v1`), pure: the inputs ([`model`]), label selectors
//! ([`selector`]), and the evaluator ([`eval`]) that reads the API's semantics directly and serves as the
//! oracle.
//!
//! ```text
//!   API objects ──► (converter, agent/lab) ──► Cluster ──► eval::evaluate(cluster, packet) ──► Decision
//! ```
//!
//! docs/policy.md states the semantics and every choice the API leaves open.

pub mod eval;
pub mod model;
pub mod selector;

pub use eval::{Decision, DirectionVerdict, Exemption, allows, evaluate};
pub use model::{
    Cluster, IpBlock, Labels, NamedPort, Namespace, NetworkPolicy, Node, Packet, Peer, Pod,
    PolicyPort, PolicyRule, PolicyType, PortRef, Protocol, Transport,
};
pub use selector::{LabelSelector, Operator, Requirement, SelectorError};
