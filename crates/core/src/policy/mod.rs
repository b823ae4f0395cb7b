//! Kubernetes NetworkPolicy (`networking.k8s.io/v1`), pure: the inputs ([`model`]), label selectors
//! ([`selector`]), the evaluator ([`eval`], the oracle), the checks of bad input ([`validate`]), the compiler
//! to a node's nftables model ([`compile`], [`ruleset`]) and the smallest change between two models
//! ([`diff`]), rendered as one `nft -f` transaction.
//!
//! ```text
//!   API objects ──► (converter) ──► Cluster ──┬─► eval::evaluate(cluster, packet) ──► Decision   (oracle, lab)
//!                                             └─► compile(cluster, local pods) ──► PolicyModel
//!                                                   diff(previous, next) ──► Vec<PolicyOp> ──► render ──► nft -f
//! ```
//!
//! docs/policy.md states the semantics, every choice the API leaves open, and the datapath.

pub mod compile;
pub mod diff;
pub mod eval;
pub mod model;
pub mod ranges;
pub mod ruleset;
pub mod selector;
pub mod validate;

pub use compile::{CompileCache, Compiled, LocalPod, compile, compile_with};
pub use diff::{
    PolicyOp, apply, diff, next_generation, render_generation, render_install, render_ops,
    render_remove_all, revokes,
};
pub use eval::{Decision, DirectionVerdict, Exemption, allows, evaluate};
pub use model::{
    Cluster, IpBlock, Labels, NamedPort, Namespace, NetworkPolicy, Node, Packet, Peer, Pod,
    PolicyPort, PolicyRule, PolicyType, PortRef, Protocol, Transport,
};
pub use ruleset::{ChainRule, Element, NftSet, PolicyModel, PortMatch, SetKind};
pub use selector::{LabelSelector, Operator, Requirement, SelectorError};
pub use validate::{PolicyWarning, Problem, SelectorRole, validate};
