//! underlay-core: the pure domain of underlay. No I/O, no async runtime, no cloud or kernel clients.
//!
//! Everything here is data in, data out, so it can be property-tested and snapshot-tested:
//!
//! ```text
//!   observed state ──► plan_* (this crate) ──► Vec<Op> ──► apply_* (adapters: cloud, dataplane)
//!
//!   Topology ──► planner::plan(topology, previous) ──► RoutedPlan ──► routeops::diff(plan, observed) ──► Vec<RouteOp>
//! ```
//!
//! Every name the project owns in the kernel and in Kubernetes lives in [`names`].

pub mod eni;
pub mod eni_pool;
pub mod health;
pub mod instance_types;
pub mod ipam;
pub mod names;
pub mod nft;
pub mod node;
pub mod owned;
pub mod planner;
pub mod policy;
mod prefix;
pub mod routeops;
pub mod topology;
pub mod veth_names;

pub use planner::{PlanError, PlanWarning, RoutedPlan, plan};
pub use routeops::{RouteOp, diff};
pub use topology::Topology;
