//! The agent's Prometheus metrics, served on its health endpoint as `/metrics` (see `health_http`).
//!
//! ```text
//!   underlay-cni ──► IPAM socket ──► IpamService::handle ──► ipam_requests_total{method,result}
//!                                         │                  ipam_request_duration_seconds{method}
//!                                         └─ after each change: pool_size_addresses, pool_used_addresses,
//!                                                               allocations_total, releases_total{reason}
//!   converge loop (routed, eni) ──► converges_total{result}, converge_duration_seconds, converge_operations_total
//!   policy engine ──► policy_applies_total{result}, policy_apply_duration_seconds, policy_admissions_total{result},
//!                     policy_warnings, policy_unknown_local_pods, policy_nft_objects
//! ```
//!
//! The IPAM service sees the plugin's requests as methods: ADD is `allocate`, DEL is `release`, CHECK is `list`,
//! GC is `gc`. Names and meaning in `docs/metrics.md`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the IPAM request histogram: a request is a lock and an fsync, well under 10 ms on
/// a healthy node; the top buckets show a stalled disk.
pub const IPAM_DURATION_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Upper bounds (seconds) of the converge histogram: netlink and nft calls, milliseconds to seconds.
pub const CONVERGE_DURATION_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// `method` (allocate, release, list, gc, invalid) and `result` (ok, or the error code).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    pub result: &'static str,
}

/// `method` alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

/// `reason` of a release (`del`, `gc`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// `result` (ok, error).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn ipam_histogram() -> Histogram {
    Histogram::new(IPAM_DURATION_BUCKETS)
}

/// The agent's registry and metric families. Cheap to clone: clones update and expose the same series.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<MethodLabels>,
    allocations: Counter,
    releases: Family<ReasonLabels, Counter>,
    pool_size: Gauge,
    pool_used: Gauge,
    converges: Family<ResultLabels, Counter>,
    converge_duration: Histogram,
    converge_operations: Counter,
    checkpoint_rebuilds: Counter,
    policy_applies: Family<ResultLabels, Counter>,
    policy_apply_duration: Histogram,
    policy_admissions: Family<ResultLabels, Counter>,
    policy_warnings: Gauge,
    policy_unknown_local_pods: Gauge,
    policy_objects: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// A registry holding every agent family.
    pub fn new() -> Self {
        let mut r = Registry::default();
        r.register(
            "underlay_build",
            "The running build: version and component (value 1)",
            prometheus_client::metrics::info::Info::new(vec![
                ("component", "agent"),
                ("version", env!("CARGO_PKG_VERSION")),
            ]),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration: HistogramFamily<MethodLabels> =
            Family::new_with_constructor(ipam_histogram);
        let allocations = Counter::default();
        let releases = Family::<ReasonLabels, Counter>::default();
        let pool_size = Gauge::default();
        let pool_used = Gauge::default();
        let converges = Family::<ResultLabels, Counter>::default();
        let converge_duration = Histogram::new(CONVERGE_DURATION_BUCKETS);
        let converge_operations = Counter::default();
        let checkpoint_rebuilds = Counter::default();
        r.register(
            "underlay_agent_checkpoint_rebuilds",
            "Starts that found the IPAM checkpoint corrupt and rebuilt it from the node's pod veths and routes",
            checkpoint_rebuilds.clone(),
        );
        let policy_applies = Family::<ResultLabels, Counter>::default();
        let policy_apply_duration = Histogram::new(CONVERGE_DURATION_BUCKETS);
        let policy_admissions = Family::<ResultLabels, Counter>::default();
        let policy_warnings = Gauge::default();
        let policy_unknown_local_pods = Gauge::default();
        let policy_objects = Gauge::default();
        r.register(
            "underlay_agent_policy_applies",
            "Network policy transactions applied to the kernel, by result (ok, error)",
            policy_applies.clone(),
        );
        r.register(
            "underlay_agent_policy_apply_duration_seconds",
            "Time from a policy input change (or a pod's ADD) to its nft transaction committed: compile, diff, nft -f",
            policy_apply_duration.clone(),
        );
        r.register(
            "underlay_agent_policy_admissions",
            "Pods ADD asked the policy engine about, by result (ok; not_ready: inputs or the pod not known yet, CNI error 11; error)",
            policy_admissions.clone(),
        );
        r.register(
            "underlay_agent_policy_warnings",
            "Entries of the policies selecting this node's pods that cannot be expressed (each matches nothing)",
            policy_warnings.clone(),
        );
        r.register(
            "underlay_agent_policy_unknown_local_pods",
            "Pods attached on this node that the policy inputs do not hold (isolated both ways until they appear)",
            policy_unknown_local_pods.clone(),
        );
        r.register(
            "underlay_agent_policy_nft_objects",
            "Policy sets, chains, rules, set and map elements in the node's inet underlay table",
            policy_objects.clone(),
        );
        r.register(
            "underlay_agent_ipam_requests",
            "IPAM requests answered, by method (allocate=ADD, release=DEL, list=CHECK, gc=GC) and result (ok or error code)",
            requests.clone(),
        );
        r.register(
            "underlay_agent_ipam_request_duration_seconds",
            "Time to answer one IPAM request (lock, allocator, checkpoint fsync), by method",
            request_duration.clone(),
        );
        r.register(
            "underlay_agent_ipam_allocations",
            "Addresses handed to pods (repeats of an ADD not counted)",
            allocations.clone(),
        );
        r.register(
            "underlay_agent_ipam_releases",
            "Addresses taken back, by reason (del, gc, reclaim: the pod's sandbox gone without DEL)",
            releases.clone(),
        );
        r.register(
            "underlay_agent_pool_size_addresses",
            "Pod addresses the node's pool holds",
            pool_size.clone(),
        );
        r.register(
            "underlay_agent_pool_used_addresses",
            "Pod addresses allocated now",
            pool_used.clone(),
        );
        r.register(
            "underlay_agent_converges",
            "Routed-mode converges of the node's kernel state, by result (ok, error)",
            converges.clone(),
        );
        r.register(
            "underlay_agent_converge_duration_seconds",
            "Time one routed-mode converge took (observe, plan, apply)",
            converge_duration.clone(),
        );
        r.register(
            "underlay_agent_converge_operations",
            "Kernel operations (routes, rules, nft changes) converges applied",
            converge_operations.clone(),
        );
        Self {
            registry: Arc::new(r),
            requests,
            request_duration,
            allocations,
            releases,
            pool_size,
            pool_used,
            converges,
            converge_duration,
            converge_operations,
            checkpoint_rebuilds,
            policy_applies,
            policy_apply_duration,
            policy_admissions,
            policy_warnings,
            policy_unknown_local_pods,
            policy_objects,
        }
    }

    /// One start that rebuilt the IPAM checkpoint from the kernel.
    pub fn record_checkpoint_rebuild(&self) {
        self.checkpoint_rebuilds.inc();
    }

    /// The exposition (OpenMetrics text).
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }

    pub fn record_request(&self, method: &'static str, result: &'static str, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels { method, result })
            .inc();
        self.request_duration
            .get_or_create(&MethodLabels { method })
            .observe(seconds);
    }

    pub fn record_allocation(&self) {
        self.allocations.inc();
    }

    pub fn record_releases(&self, reason: &'static str, n: usize) {
        if n > 0 {
            self.releases
                .get_or_create(&ReasonLabels { reason })
                .inc_by(n as u64);
        }
    }

    pub fn set_pool(&self, size: usize, used: usize) {
        self.pool_size.set(i64::try_from(size).unwrap_or(i64::MAX));
        self.pool_used.set(i64::try_from(used).unwrap_or(i64::MAX));
    }

    /// One converge ended: `Ok(operations applied)` or an error, after `seconds`.
    pub fn record_converge(&self, result: Result<usize, ()>, seconds: f64) {
        let label = match result {
            Ok(ops) => {
                self.converge_operations.inc_by(ops as u64);
                "ok"
            }
            Err(()) => "error",
        };
        self.converges
            .get_or_create(&ResultLabels { result: label })
            .inc();
        self.converge_duration.observe(seconds);
    }

    /// One policy transaction: applied (`true`) or refused by the kernel, `seconds` from input to commit.
    pub fn record_policy_apply(&self, ok: bool, seconds: f64) {
        self.policy_applies
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
        self.policy_apply_duration.observe(seconds);
    }

    /// A pod's admission at ADD: `ok`, `not_ready` or `error`.
    pub fn record_policy_admission(&self, result: &'static str) {
        self.policy_admissions
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The compiled state's figures: warnings, unknown local pods, nft objects.
    pub fn set_policy_state(&self, warnings: usize, unknown_local_pods: usize, objects: usize) {
        let g = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.policy_warnings.set(g(warnings));
        self.policy_unknown_local_pods.set(g(unknown_local_pods));
        self.policy_objects.set(g(objects));
    }
}
