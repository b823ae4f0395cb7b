//! The controller's knobs, with their defaults, and the node set it is given.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use underlay_cloud::{EniId, RouteTableId, SubnetId, VpcId};
use underlay_core::health::HealthConfig;
use underlay_core::topology::{DEFAULT_BLOCK_PREFIX_LEN, DEFAULT_HEADROOM, DEFAULT_ROUTE_LIMIT};

/// How old the last pass's observation of the route tables may be for a failover pass to plan from it instead of
/// describing first (every pass describes, and the resync runs every 30 s, so it is normally younger than that).
pub const DEFAULT_FAILOVER_OBSERVATION_MAX_AGE: Duration = Duration::from_secs(60);
/// Default period of a full resync (every table described, planned and diffed even without a trigger).
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(30);
/// Default probe period of each forwarder. With [`DEFAULT_PROBE_TIMEOUT`] and 6 misses to fail
/// (`underlay_core::health::DEFAULT_MISSES_TO_FAIL`) a dead forwarder is failed 290–340 ms after it dies, and a
/// forwarder losing 1 % of its probes at random fails falsely about once in 1,600 years (see
/// `docs/controller.md`, "Failover timing").
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// Default time a round waits for its replies (clamped to the interval). Shorter than the interval, so that a
/// round with a dead target still ends before the next tick and the rounds keep their cadence.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(40);
/// Default port of the agent's health endpoint on the node IP (TCP for HTTP, UDP for the echo).
pub const DEFAULT_HEALTH_PORT: u16 = 9650;
/// Path of the agent's health endpoint.
pub const DEFAULT_HEALTH_PATH: &str = "/healthz";
/// First retry delay after a pass stopped on a retryable error; doubled each time, up to the maximum.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(250);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Which route tables receive the pod-CIDR routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "ids")]
pub enum ManagedTables {
    /// The tables the nodes' subnets use (explicit association, else the VPC's main table), plus any table of
    /// the VPC that already holds a route inside the pod CIDR (so routes are cleaned up after the last node of a
    /// subnet leaves). Subnets without nodes reach pods only if their table is one of these.
    NodeSubnets,
    /// Exactly these tables (e.g. to add the tables of subnets whose clients must reach pods).
    Explicit(Vec<RouteTableId>),
}

/// Routed-mode settings of the route reconciler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutedConfig {
    pub vpc: VpcId,
    /// Route calls a normal pass makes at most (least specific first); the rest go to the next pass, run at once.
    /// `None`: every call in one pass. Behind a rate-aware queue, a cap near its burst lets a large first pass
    /// report (and nodes become ready) while the refill rate paces the rest.
    pub max_ops_per_pass: Option<usize>,
    /// Where pod addresses come from; every route inside it in a managed table is underlay's.
    pub pod_cidr: Ipv4Net,
    pub block_prefix_len: u8,
    /// Routes kept free in every managed table (make-before-break needs one).
    pub headroom: u32,
    pub route_tables: ManagedTables,
    /// Route limit of a managed table (EC2 does not report it: it is an account quota), 500 by default (AWS's
    /// default since mid-2025; at most 1,000).
    pub route_limit: u32,
    /// Per-table overrides of `route_limit`.
    pub route_limits: BTreeMap<RouteTableId, u32>,
    /// A failover pass plans from the last observation of the tables (kept up to date with this controller's
    /// own calls) when it is at most this old, and issues its ReplaceRoute calls without describing first;
    /// `Duration::ZERO` always describes first.
    #[serde(default = "default_failover_observation_max_age")]
    pub failover_observation_max_age: Duration,
}

fn default_failover_observation_max_age() -> Duration {
    DEFAULT_FAILOVER_OBSERVATION_MAX_AGE
}

impl RoutedConfig {
    pub fn new(vpc: VpcId, pod_cidr: Ipv4Net) -> Self {
        Self {
            max_ops_per_pass: None,
            vpc,
            pod_cidr,
            block_prefix_len: DEFAULT_BLOCK_PREFIX_LEN,
            headroom: DEFAULT_HEADROOM,
            route_tables: ManagedTables::NodeSubnets,
            route_limit: DEFAULT_ROUTE_LIMIT,
            route_limits: BTreeMap::new(),
            failover_observation_max_age: DEFAULT_FAILOVER_OBSERVATION_MAX_AGE,
        }
    }

    pub fn route_limit_of(&self, table: &RouteTableId) -> u32 {
        self.route_limits
            .get(table)
            .copied()
            .unwrap_or(self.route_limit)
    }
}

/// How the controller probes forwarders.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeTransport {
    /// One UDP datagram each way per forwarder and interval, on one socket ([`crate::probe::UdpProber`]).
    #[default]
    Udp,
    /// `GET /healthz` over a new TCP connection per forwarder and interval ([`crate::probe::HttpProber`]).
    Http,
}

/// Forwarder health probing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeConfig {
    pub interval: Duration,
    /// Must be shorter than `interval` (clamped to it).
    pub timeout: Duration,
    /// The agent's port (TCP for HTTP, UDP for the echo).
    pub port: u16,
    pub path: String,
    #[serde(default)]
    pub transport: ProbeTransport,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_PROBE_INTERVAL,
            timeout: DEFAULT_PROBE_TIMEOUT,
            port: DEFAULT_HEALTH_PORT,
            path: DEFAULT_HEALTH_PATH.to_string(),
            transport: ProbeTransport::Udp,
        }
    }
}

/// Everything the run loop needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerConfig {
    pub routed: RoutedConfig,
    pub probe: ProbeConfig,
    pub health: HealthConfig,
    pub resync: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl ControllerConfig {
    pub fn new(routed: RoutedConfig) -> Self {
        Self {
            routed,
            probe: ProbeConfig::default(),
            health: HealthConfig::default(),
            resync: DEFAULT_RESYNC,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }
}

/// A node as the controller needs it. Later filled from the Kubernetes Node and its UnderlayNode; for now given
/// by the caller (tests, lab).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClusterNode {
    /// Kubernetes node name.
    pub name: String,
    pub subnet: SubnetId,
    /// Primary private IP: next hop of same-subnet peers, and where its health endpoint listens.
    pub ip: Ipv4Addr,
    /// Primary ENI: target of the VPC routes it forwards, and the ENI whose source/dest check is turned off.
    pub eni: EniId,
}
