//! underlay-lab: a VPC made of Linux network namespaces, driven by vpcsim's state.
//!
//! ```text
//!            VpcSim ──subscribe()/snapshot()──► Model ──plan_fabric──► FabricSpec ──diff──► Op… ──► kernel
//!
//!   ul-<lab>-<instance>          ul-<lab>-fab (the VPC fabric)                         ul-<lab>-inet
//!   ┌──────────────┐   veth   ┌─────────────────────────────────────────────┐  veth  ┌──────────────┐
//!   │ eth0 (ENI MAC│──────────│<lab>-e… ─┐ bridge <lab>-s… per subnet        │────────│ eth0         │
//!   │ primary/len, │          │          ├ .1/32 (the subnet router)        │<lab>-  │ 203.0.113.1  │
//!   │ default→.1)  │          │<lab>-e… ─┘ ARP answered from permanent neighs│ igw    │ (on lo)      │
//!   └──────────────┘          │ rules: iif bridge → owned table (1000)       │        └──────────────┘
//!                             │                  → the subnet's VPC table    │
//!                             │ nft bridge: source/dest check per port       │
//!                             │ nft inet:   IGW drops unowned sources        │
//!                             └─────────────────────────────────────────────┘
//! ```
//!
//! Within a subnet, frames go to the port of the ENI whose MAC they carry (as the VPC delivers within a
//! subnet, so a node can route via a same-subnet peer's address). Across subnets, the fabric routes: an
//! ENI-owned address first, then the subnet's VPC route table. See `docs/lab.md`.

mod error;
mod fabric;
pub mod kernel;
pub mod model;
pub mod names;
pub mod plan;
pub mod scenario;

pub use error::{Error, Result};
pub use fabric::{
    CatchUp, Fabric, FabricOptions, Pending, Step, sweep, take_effective, teardown_lab,
};
pub use model::Model;
pub use names::LabId;
pub use plan::{FabricSpec, INTERNET_HOST, Op, PlanError, diff, plan_fabric};
