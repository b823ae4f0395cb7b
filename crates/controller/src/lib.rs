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
//! Kubernetes). [`kube::run_routed_on_kube`] runs it on the Kubernetes API: leader election on a Lease, Nodes in,
//! UnderlayNodes, taints and podCIDRs out. See `docs/controller.md`.

pub mod config;
pub mod controller;
pub mod eni;
pub mod eni_kube;
pub mod kube;
pub mod lanes;
pub mod metrics;
pub mod policy_events;
pub mod probe;
pub mod routes;
pub mod selector;
pub mod srcdst;

pub use config::{ClusterNode, ControllerConfig, ManagedTables, ProbeConfig, RoutedConfig};
pub use controller::{Controller, ControllerEvent, PassReport};
pub use eni::{EniNode, EniPassReport, EniReconciler, EniSettings, NodeReport};
pub use lanes::{CloudLanes, OneLane, Priority, TwoLanes};
pub use probe::{HealthProber, HttpProber, ProbeTarget, Prober};
pub use routes::{Outcome, ReconcileError, ReconcileReport, RouteReconciler, apply_route_op};
pub use selector::{NodeSelector, SelectorError};
pub use srcdst::{SrcDstReconciler, SrcDstReport};
