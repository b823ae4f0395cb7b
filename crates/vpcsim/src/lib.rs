//! underlay-vpcsim: an in-memory EC2/VPC that behaves like AWS, implementing underlay's [`Cloud`] port.
//!
//! ```text
//!   world side (set-up: VpcSim::create_vpc, create_subnet, run_instance, terminate_instance …)
//!        │
//!        ▼
//!   ┌──────────────────────── VpcSim (one region, shared by every clone of the handle) ───────────────────┐
//!   │ Cloud call ─► count ─► latency ─► scripted / forced throttle ─► token bucket ─► injected error ─►  │
//!   │              validate like EC2 (limits, states, AWS error codes) ─► mutate ─► Change event          │
//!   │ state: VPCs · subnets (5 reserved, free-address accounting, /28 placement) · route tables (local,    │
//!   │        limit) · instances (real type limits) · ENIs (addresses, prefixes, attachments, tags)        │
//!   └───────────┬──────────────────────────────────────────────────┬───────────────────────────────────────┘
//!               ▼ subscribe(): Change { seq, Event }                ▼ snapshot(), counters()
//!             the lab's fabric                                    tests, benchmarks
//! ```
//!
//! Deterministic from a seed: ids (`eni-` + 17 hex digits), MACs and address choice come from one seeded
//! generator, injected faults from another. Time is tokio's (latency, bucket refill, describe delay), so tests
//! run on a paused clock. See `docs/vpcsim.md`.

mod cloud_impl;
mod counters;
mod events;
mod faults;
mod paging;
mod sim;
mod state;

pub use counters::Counters;
pub use events::{Change, Event};
pub use faults::{
    AWS_DESCRIBE_ROUTE_TABLES_LATENCY, AWS_ROUTE_CALL_LATENCY, AWS_ROUTE_PROPAGATION, ErrorRate,
    Faults, Latency,
};
pub use paging::{Page, max_page};
pub use sim::{
    Config, DEFAULT_ENIS_PER_ZONE, DEFAULT_PAGE_SIZE, DEFAULT_ROUTE_LIMIT, RunInstance, Snapshot,
    TAG_LIMIT, VpcSim, VpcSimBuilder, instance_type,
};
pub use state::{AddressOrder, PREFIX_LEN, RESERVED_PER_SUBNET};
pub use underlay_cloud::Cloud;
