//! underlay-core: the pure domain of underlay. No I/O, no async runtime, no cloud or kernel clients.
//!
//! Everything here is data in, data out, so it can be property-tested and snapshot-tested:
//!
//! ```text
//!   observed state ──► plan_* (this crate) ──► Vec<Op> ──► apply_* (adapters: cloud, dataplane)
//! ```
//!
//! Every name the project owns in the kernel and in Kubernetes lives in [`names`].

pub mod instance_types;
pub mod names;
pub mod owned;
