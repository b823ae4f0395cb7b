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
    /// Time from a route change (CreateRoute, ReplaceRoute, DeleteRoute answered; or a world-side route) to the
    /// data plane carrying it: stamped on the change event as its `effective_at`, which the lab's fabric waits
    /// for. The API's own view (describes) changes at once. `None` by default.
    #[serde(default)]
    pub route_propagation: Latency,
}

/// Modelled latency of one route call (CreateRoute, ReplaceRoute, DeleteRoute) in [`Faults::aws_route_model`].
/// AWS publishes no latency figure for these calls; 100–300 ms is an assumption on the slow side of a regional
/// EC2 API round trip from inside the region (see `docs/vpcsim.md`, "Modelled route latency").
pub const AWS_ROUTE_CALL_LATENCY: Latency = Latency::Uniform {
    min: Duration::from_millis(100),
    max: Duration::from_millis(300),
};
/// Modelled latency of a DescribeRouteTables call in [`Faults::aws_route_model`] (an assumption, as above).
pub const AWS_DESCRIBE_ROUTE_TABLES_LATENCY: Latency = Latency::Uniform {
    min: Duration::from_millis(100),
    max: Duration::from_millis(300),
};
/// Modelled time from a route call's answer to the VPC's data plane using the new route, in
/// [`Faults::aws_route_model`]. AWS publishes no figure; 200–500 ms is a conservative assumption.
pub const AWS_ROUTE_PROPAGATION: Latency = Latency::Uniform {
    min: Duration::from_millis(200),
    max: Duration::from_millis(500),
};

impl Faults {
    /// AWS-like timing for routes: [`AWS_ROUTE_CALL_LATENCY`] on CreateRoute, ReplaceRoute and DeleteRoute,
    /// [`AWS_DESCRIBE_ROUTE_TABLES_LATENCY`] on DescribeRouteTables and [`AWS_ROUTE_PROPAGATION`] before the
    /// data plane carries a change; every other knob as in `self`.
    pub fn aws_route_model(mut self) -> Self {
        for op in [
            Operation::CreateRoute,
            Operation::ReplaceRoute,
            Operation::DeleteRoute,
        ] {
            self.op_latency.insert(op, AWS_ROUTE_CALL_LATENCY);
        }
        self.op_latency.insert(
            Operation::DescribeRouteTables,
            AWS_DESCRIBE_ROUTE_TABLES_LATENCY,
        );
        self.route_propagation = AWS_ROUTE_PROPAGATION;
        self
    }

    pub(crate) fn latency_of(&self, op: Operation) -> Latency {
        self.op_latency.get(&op).copied().unwrap_or(self.latency)
    }
}
