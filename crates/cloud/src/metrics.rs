//! Prometheus metrics of the rate-aware queue: every EC2 call by operation and result, throttles, retries, call
//! latency, and the queue itself (callers waiting per bucket and lane, time waited for a token).
//!
//! ```text
//!   binary: Registry ──► CloudMetrics::register ──► RateLimitedCloud::new_with_metrics(inner, config, metrics)
//!                                                        │ each attempt: requests_total{operation,result} …
//!   /metrics (served by the binary, never by this crate) ◄┘
//! ```
//!
//! This crate serves nothing: the controller registers these families in its registry and serves them with its
//! own. Every attempt counts (a retried call counts once per attempt), so `result="throttled"` is exactly the
//! number of `RequestLimitExceeded` answers.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::{CloudError, ErrorKind};
use crate::queue::Priority;
use crate::ratelimit::{Bucket, Operation};

/// Upper bounds (seconds) of the EC2 call latency histogram: EC2 answers in tens to hundreds of milliseconds.
pub const REQUEST_DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds (seconds) of the token-wait histogram: from no wait to minutes behind a drained bucket.
pub const QUEUE_WAIT_BUCKETS: [f64; 13] = [
    0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// `operation` and `result` of an EC2 call.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CallLabels {
    pub operation: &'static str,
    pub result: &'static str,
}

/// `operation` and error `kind` ([`ErrorKind::metric_label`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ErrorLabels {
    pub operation: &'static str,
    pub kind: &'static str,
}

/// `operation` alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

/// A token bucket ([`Bucket::metric_label`]) and a queue lane (`failover`, `normal`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LaneLabels {
    pub bucket: &'static str,
    pub lane: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_DURATION_BUCKETS)
}

fn wait_histogram() -> Histogram {
    Histogram::new(QUEUE_WAIT_BUCKETS)
}

/// The queue's metric families. Cheap to clone: clones update the same series.
#[derive(Debug, Clone)]
pub struct CloudMetrics {
    requests: Family<CallLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    throttles: Family<OperationLabels, Counter>,
    retries: Family<ErrorLabels, Counter>,
    request_duration: HistogramFamily<OperationLabels>,
    queue_depth: Family<LaneLabels, Gauge>,
    queue_wait: HistogramFamily<LaneLabels>,
}

impl Default for CloudMetrics {
    /// Families registered nowhere (counting still works; nothing exposes them).
    fn default() -> Self {
        Self {
            requests: Family::default(),
            errors: Family::default(),
            throttles: Family::default(),
            retries: Family::default(),
            request_duration: Family::new_with_constructor(request_histogram),
            queue_depth: Family::default(),
            queue_wait: Family::new_with_constructor(wait_histogram),
        }
    }
}

impl CloudMetrics {
    /// Creates the families and registers them in `registry` (names in `docs/metrics.md`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "underlay_ec2_requests",
            "EC2 calls made (every attempt), by operation and result (ok, throttled, client_error, server_error, transport_error)",
            m.requests.clone(),
        );
        registry.register(
            "underlay_ec2_errors",
            "EC2 calls that failed, by operation and error kind",
            m.errors.clone(),
        );
        registry.register(
            "underlay_ec2_throttles",
            "RequestLimitExceeded answers from EC2, by operation",
            m.throttles.clone(),
        );
        registry.register(
            "underlay_ec2_retries",
            "EC2 calls retried after a backoff, by operation and the kind of error retried",
            m.retries.clone(),
        );
        registry.register(
            "underlay_ec2_request_duration_seconds",
            "Latency of one EC2 call (one attempt, after its token was granted), by operation",
            m.request_duration.clone(),
        );
        registry.register(
            "underlay_ec2_queue_depth",
            "Callers waiting in the rate-aware queue for a token, by token bucket and lane",
            m.queue_depth.clone(),
        );
        registry.register(
            "underlay_ec2_queue_wait_seconds",
            "Time a caller waited in the rate-aware queue for a token, by token bucket and lane",
            m.queue_wait.clone(),
        );
        m
    }

    /// One attempt of `op` ended with `result` after `seconds`.
    pub fn record_call(&self, op: Operation, result: Result<(), &CloudError>, seconds: f64) {
        let operation = op.name();
        let label = match result {
            Ok(()) => "ok",
            Err(e) => {
                self.errors
                    .get_or_create(&ErrorLabels {
                        operation,
                        kind: e.kind.metric_label(),
                    })
                    .inc();
                if e.is_throttled() {
                    self.throttles
                        .get_or_create(&OperationLabels { operation })
                        .inc();
                }
                e.kind.result_class()
            }
        };
        self.requests
            .get_or_create(&CallLabels {
                operation,
                result: label,
            })
            .inc();
        self.request_duration
            .get_or_create(&OperationLabels { operation })
            .observe(seconds);
    }

    /// A retry of `op` after an error of `kind`.
    pub fn record_retry(&self, op: Operation, kind: ErrorKind) {
        self.retries
            .get_or_create(&ErrorLabels {
                operation: op.name(),
                kind: kind.metric_label(),
            })
            .inc();
    }

    /// A caller joined (`+1`) or left (`-1`) a lane.
    pub fn queue_depth_add(&self, bucket: Bucket, lane: Priority, delta: i64) {
        self.queue_depth
            .get_or_create(&lane_labels(bucket, lane))
            .inc_by(delta);
    }

    /// A caller got its token after waiting `seconds`.
    pub fn record_wait(&self, bucket: Bucket, lane: Priority, seconds: f64) {
        self.queue_wait
            .get_or_create(&lane_labels(bucket, lane))
            .observe(seconds);
    }
}

fn lane_labels(bucket: Bucket, lane: Priority) -> LaneLabels {
    LaneLabels {
        bucket: bucket.metric_label(),
        lane: lane.as_str(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(registry: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, registry).unwrap();
        s
    }

    #[test]
    fn calls_are_counted_by_operation_and_result_class() {
        let mut registry = Registry::default();
        let m = CloudMetrics::register(&mut registry);
        m.record_call(Operation::CreateRoute, Ok(()), 0.01);
        let throttled = CloudError::from_code("RequestLimitExceeded", "slow down");
        m.record_call(Operation::CreateRoute, Err(&throttled), 0.01);
        let missing = CloudError::from_code("InvalidRoute.NotFound", "");
        m.record_call(Operation::DeleteRoute, Err(&missing), 0.01);
        m.record_retry(Operation::CreateRoute, ErrorKind::Throttled);
        m.queue_depth_add(
            Bucket::Action(Operation::ReplaceRoute),
            Priority::Failover,
            1,
        );
        let t = text(&registry);
        for line in [
            r#"underlay_ec2_requests_total{operation="CreateRoute",result="ok"} 1"#,
            r#"underlay_ec2_requests_total{operation="CreateRoute",result="throttled"} 1"#,
            r#"underlay_ec2_requests_total{operation="DeleteRoute",result="client_error"} 1"#,
            r#"underlay_ec2_errors_total{operation="DeleteRoute",kind="not_found"} 1"#,
            r#"underlay_ec2_throttles_total{operation="CreateRoute"} 1"#,
            r#"underlay_ec2_retries_total{operation="CreateRoute",kind="throttled"} 1"#,
            r#"underlay_ec2_request_duration_seconds_count{operation="CreateRoute"} 2"#,
            r#"underlay_ec2_queue_depth{bucket="ReplaceRoute",lane="failover"} 1"#,
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line:?} in\n{t}");
        }
        assert!(!t.contains(r#"underlay_ec2_throttles_total{operation="DeleteRoute"}"#));
    }
}
