//! Fault injection: injected errors, latency, forced throttling, eventual consistency of describes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use underlay_cloud::Operation;

/// Time a call takes before EC2 answers it. Slept on tokio's clock, so a paused test clock skips it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Latency {
    #[default]
    None,
    Fixed(Duration),
    /// Uniform between `min` and `max`, drawn from the seeded fault generator.
    Uniform {
        min: Duration,
        max: Duration,
    },
}

impl Latency {
    pub(crate) fn draw(&self, rng: &mut StdRng) -> Duration {
        match *self {
            Latency::None => Duration::ZERO,
            Latency::Fixed(d) => d,
            Latency::Uniform { min, max } if max > min => {
                min + Duration::from_nanos(rng.random_range(0..=(max - min).as_nanos() as u64))
            }
            Latency::Uniform { min, .. } => min,
        }
    }
}

/// An error injected with some probability into every call of an operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorRate {
    /// 0.0 ..= 1.0.
    pub probability: f64,
    /// AWS error code to answer, e.g. `InternalError`, `RequestLimitExceeded`, `UnauthorizedOperation`.
    pub code: String,
}

/// Every fault knob. `Faults::default()` injects nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Faults {
    /// Per-operation injected error rates.
    pub error_rates: BTreeMap<Operation, ErrorRate>,
    /// Latency of every call, unless `op_latency` has the operation.
    pub latency: Latency,
    pub op_latency: BTreeMap<Operation, Latency>,
    /// Operations every call of which answers `RequestLimitExceeded`, whatever the buckets hold.
    pub throttled: BTreeSet<Operation>,
    /// Every call answers `RequestLimitExceeded`.
    pub throttle_all: bool,
    /// Describes see the region as it was this long ago (new objects are `*.NotFound`, changes are late).
    pub describe_delay: Duration,
    /// Errors to answer on the next calls of an operation, in order, before any other check.
    pub fail_next: BTreeMap<Operation, VecDeque<String>>,
}

impl Faults {
    pub(crate) fn latency_of(&self, op: Operation) -> Latency {
        self.op_latency.get(&op).copied().unwrap_or(self.latency)
    }
}
