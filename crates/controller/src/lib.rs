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
//! No Kubernetes here yet: the node set comes in as [`config::ClusterNode`]s on a watch channel, and the previous
//! plan is kept in memory. See `docs/controller.md`.

pub mod config;
pub mod controller;
pub mod kube;
pub mod lanes;
pub mod probe;
pub mod routes;
pub mod srcdst;

pub use config::{ClusterNode, ControllerConfig, ManagedTables, ProbeConfig, RoutedConfig};
pub use controller::{Controller, ControllerEvent, PassReport};
pub use lanes::{CloudLanes, OneLane, Priority, TwoLanes};
pub use probe::{HealthProber, HttpProber, ProbeTarget, Prober};
pub use routes::{Outcome, ReconcileError, ReconcileReport, RouteReconciler, apply_route_op};
pub use srcdst::{SrcDstReconciler, SrcDstReport};
