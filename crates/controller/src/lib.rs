//! underlay-controller: the routed-mode controller's reconcilers and run loop. The only EC2 caller in underlay;
//! every call goes through a [`lanes::CloudLanes`] (the rate-aware queue, with a failover lane).
//!
//! ```text
//!                ┌──────────────────────────── Controller::run ───────────────────────────┐
//!   node set ───►│ SrcDstReconciler   source/dest check off on each primary ENI, once      │
//!                │ RouteReconciler    DescribeRouteTables → plan (core) → diff → apply     │──► CloudLanes ──► EC2
//!                │ HealthProber       GET /healthz on forwarders → HealthTracker (core)    │    Normal | Failover
//!                └──────────── transitions trigger a pass; failures are Failover ─────────┘
//! ```
//!
//! [`Controller::run`] takes the node set as [`config::ClusterNode`]s on a watch channel (tests, the lab without
//! Kubernetes). On the Kubernetes API, one module per concern, one folder per mode:
//!
//! ```text
//!   lease      the Lease and the campaign/renew loop (`lead`): one leader task per term, aborted when lost
//!   index      watched Nodes/UnderlayNodes (pure; a Node slimmed to what is read)
//!   objects    owner refs, Ready, underlay taints, release of unselected Nodes (both modes)
//!   describe   the one chunked DescribeInstances
//!   routed/    mod.rs: status and taint from the plan (pure) · kube.rs: the leader loop · records.rs: its writes
//!   eni/       mod.rs: EniReconciler (describe → plan → apply → GC) · kube.rs: the leader loop and its writes
//! ```
//!
//! [`routed::run_routed_on_kube`] runs routed mode there: Nodes in, UnderlayNodes, taints and podCIDRs out;
//! [`eni::kube::run_eni_on_kube`] runs `eni` mode. See `docs/controller.md`.

pub mod config;
pub mod controller;
pub mod describe;
pub mod eni;
pub mod index;
pub mod lanes;
pub mod lease;
pub mod metrics;
pub mod objects;
pub mod policy_events;
pub mod probe;
pub mod routed;
pub mod routes;
pub mod selector;
pub mod srcdst;

pub use config::{
    ClusterNode, ControllerConfig, ManagedTables, ProbeConfig, ProbeTransport, RoutedConfig,
};
pub use controller::{Controller, ControllerEvent, PassReport};
pub use eni::kube::run_eni_on_kube;
pub use eni::{EniNode, EniPassReport, EniReconciler, EniSettings, NodeReport};
pub use lanes::{CloudLanes, OneLane, Priority, TwoLanes};
pub use lease::{KubeError, KubeOptions};
pub use probe::{HealthProber, HttpProber, ProbeTarget, Prober, UdpProber};
pub use routed::run_routed_on_kube;
pub use routes::{
    ForeignRouteFinding, Outcome, ReconcileError, ReconcileReport, RouteReconciler, apply_route_op,
};
pub use selector::{NodeSelector, SelectorError};
pub use srcdst::{SrcDstReconciler, SrcDstReport};
