//! Forwarder health with hysteresis: a per-node state machine fed by probe results, pure and clock-free (every
//! result carries the [`Instant`] it was observed at, so tests drive time explicitly).
//!
//! ```text
//!              first success                  N consecutive misses
//!   Pending ────────────────► Healthy ─────────────────────────────► Failed
//!      ▲ misses: stay           ▲  a success resets the miss count     │ success: hold-down starts (or continues)
//!      │                        │                                      │ miss: hold-down restarts from zero
//!   (new node)                  └──── successes without a miss ────────┘
//!                                     spanning ≥ hold-down
//! ```
//!
//! - **Pending**: a node added while the controller runs, not yet answered. It is not a forwarder candidate; misses
//!   do not fail it (its agent may still be starting). Nodes known when the controller starts are seeded
//!   `Healthy` instead, so that a controller restart does not move routes (see `docs/controller.md`).
//! - **Healthy → Failed** after `misses_to_fail` consecutive misses (default 6); a single success resets the count,
//!   so a node missing every other probe never fails.
//! - **Failed → Healthy** only once probes have succeeded for `hold_down` (default 30 s) without
//!   `hold_down_misses` misses in a row (default 1: any miss), measured from the first success of the run to the latest one.
//!   One success does not restore a node (unless `hold_down` is zero); that many misses in a row during the
//!   hold-down restart it. A flapping node therefore stays failed: its routes move once and stay moved.
//!
//! [`HealthTracker::healthy`] is the set the planner treats as healthy; every state change is returned as a
//! [`Transition`] for events and metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Consecutive missed rounds that fail a healthy node. Six at the controller's 50 ms probe interval (40 ms
/// timeout): a dead forwarder is failed 290–340 ms after it dies, and a forwarder losing 1 % of its probes at random needs six
/// losses in a row to fail (10⁻¹² per round: about once in 1,600 years at 20 rounds a second); a false failure
/// costs one ReplaceRoute away and one back after the hold-down.
pub const DEFAULT_MISSES_TO_FAIL: u32 = 6;
/// How long a failed node must answer every probe before it is healthy again.
pub const DEFAULT_HOLD_DOWN: Duration = Duration::from_secs(30);
/// Consecutive misses that restart a recovering node's hold-down: one, any miss does, so a node that misses
/// one probe in three never comes back. At 20 probes a second a 30 s hold-down is 600 answers in a row, and on a
/// busy node one late reply restarts it: fail-back can take longer than the hold-down (never less). Two would
/// forgive isolated late replies (1 % random loss restarts it with 10⁻⁴ per round), at the price of letting back a
/// node whose misses never come two in a row.
pub const DEFAULT_HOLD_DOWN_MISSES: u32 = 1;

/// Tracker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthConfig {
    /// Consecutive misses that fail a healthy node (at least 1; 0 is treated as 1).
    pub misses_to_fail: u32,
    /// Run of successes a failed node needs before it is healthy again.
    pub hold_down: Duration,
    /// Consecutive misses that restart the hold-down (at least 1; 1: any miss does).
    #[serde(default = "default_hold_down_misses")]
    pub hold_down_misses: u32,
}

fn default_hold_down_misses() -> u32 {
    DEFAULT_HOLD_DOWN_MISSES
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            misses_to_fail: DEFAULT_MISSES_TO_FAIL,
            hold_down: DEFAULT_HOLD_DOWN,
            hold_down_misses: DEFAULT_HOLD_DOWN_MISSES,
        }
    }
}

/// One probe's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// The health endpoint answered 2xx within the timeout.
    Success,
    /// No answer, a refused connection, a timeout, or a non-2xx status.
    Miss,
}

/// A node's health state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NodeHealth {
    /// Never answered since it was added; not a forwarder candidate.
    Pending { misses: u32 },
    /// Forwarder candidate; `misses` consecutive misses so far.
    Healthy { misses: u32 },
    /// Failed at `since`; `recovering_since` is the first success of the current run of successes (a run that
    /// fewer than `hold_down_misses` misses in a row do not break); `misses` the misses in a row so far.
    Failed {
        #[serde(default)]
        misses: u32,
        #[serde(skip)]
        since: Option<Instant>,
        #[serde(skip)]
        recovering_since: Option<Instant>,
    },
}

/// The coarse state, for transitions, metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Pending,
    Healthy,
    Failed,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Pending => "pending",
            HealthState::Healthy => "healthy",
            HealthState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for HealthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl NodeHealth {
    pub fn state(&self) -> HealthState {
        match self {
            NodeHealth::Pending { .. } => HealthState::Pending,
            NodeHealth::Healthy { .. } => HealthState::Healthy,
            NodeHealth::Failed { .. } => HealthState::Failed,
        }
    }
}

/// A node changed state at `at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub node: String,
    pub from: HealthState,
    pub to: HealthState,
    pub at: Instant,
}

impl Transition {
    /// The node stopped being a forwarder candidate: its routes must move now (a failover).
    pub fn is_failure(&self) -> bool {
        self.from == HealthState::Healthy && self.to == HealthState::Failed
    }
}

/// Health of every tracked node.
#[derive(Debug, Clone, Default)]
pub struct HealthTracker {
    config: HealthConfig,
    nodes: BTreeMap<String, NodeHealth>,
}

impl HealthTracker {
    pub fn new(config: HealthConfig) -> Self {
        Self {
            config,
            nodes: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> HealthConfig {
        self.config
    }

    /// Start tracking `node` as `Healthy` (a node known when the controller starts). No-op if already tracked.
    pub fn insert_healthy(&mut self, node: &str) {
        self.nodes
            .entry(node.to_string())
            .or_insert(NodeHealth::Healthy { misses: 0 });
    }

    /// Start tracking `node` as `Pending` (a node that appeared later). No-op if already tracked.
    pub fn insert_pending(&mut self, node: &str) {
        self.nodes
            .entry(node.to_string())
            .or_insert(NodeHealth::Pending { misses: 0 });
    }

    /// Forget every node not in `keep` (nodes that left the cluster).
    pub fn retain<'a>(&mut self, keep: impl IntoIterator<Item = &'a str>) {
        let keep: BTreeSet<&str> = keep.into_iter().collect();
        self.nodes.retain(|n, _| keep.contains(n.as_str()));
    }

    pub fn get(&self, node: &str) -> Option<&NodeHealth> {
        self.nodes.get(node)
    }

    pub fn state(&self, node: &str) -> Option<HealthState> {
        self.nodes.get(node).map(NodeHealth::state)
    }

    /// Whether the planner may use `node` as a forwarder. Untracked nodes are not healthy.
    pub fn is_healthy(&self, node: &str) -> bool {
        self.state(node) == Some(HealthState::Healthy)
    }

    /// Every node the planner may use as a forwarder.
    pub fn healthy(&self) -> BTreeSet<String> {
        self.nodes
            .iter()
            .filter(|(_, h)| h.state() == HealthState::Healthy)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Nodes in `state`.
    pub fn in_state(&self, state: HealthState) -> BTreeSet<String> {
        self.nodes
            .iter()
            .filter(|(_, h)| h.state() == state)
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &NodeHealth)> {
        self.nodes.iter().map(|(n, h)| (n.as_str(), h))
    }

    /// Feed one probe result observed at `now`. An untracked node is ignored (it left while its probe ran).
    /// Returns the transition, if the result changed the node's state.
    pub fn record(&mut self, node: &str, probe: Probe, now: Instant) -> Option<Transition> {
        let misses_to_fail = self.config.misses_to_fail.max(1);
        let hold_down = self.config.hold_down;
        let hold_down_misses = self.config.hold_down_misses.max(1);
        let h = self.nodes.get_mut(node)?;
        let from = h.state();
        let next = match (*h, probe) {
            (NodeHealth::Pending { .. }, Probe::Success) => NodeHealth::Healthy { misses: 0 },
            (NodeHealth::Pending { misses }, Probe::Miss) => NodeHealth::Pending {
                misses: misses.saturating_add(1),
            },
            (NodeHealth::Healthy { .. }, Probe::Success) => NodeHealth::Healthy { misses: 0 },
            (NodeHealth::Healthy { misses }, Probe::Miss) => {
                let misses = misses.saturating_add(1);
                if misses >= misses_to_fail {
                    NodeHealth::Failed {
                        misses: 0,
                        since: Some(now),
                        recovering_since: None,
                    }
                } else {
                    NodeHealth::Healthy { misses }
                }
            }
            (
                NodeHealth::Failed {
                    misses,
                    since,
                    recovering_since,
                },
                Probe::Miss,
            ) => {
                let misses = misses.saturating_add(1);
                NodeHealth::Failed {
                    misses,
                    since,
                    recovering_since: if misses >= hold_down_misses {
                        None
                    } else {
                        recovering_since
                    },
                }
            }
            (
                NodeHealth::Failed {
                    since,
                    recovering_since,
                    ..
                },
                Probe::Success,
            ) => {
                let start = recovering_since.unwrap_or(now);
                if now.saturating_duration_since(start) >= hold_down {
                    NodeHealth::Healthy { misses: 0 }
                } else {
                    NodeHealth::Failed {
                        misses: 0,
                        since,
                        recovering_since: Some(start),
                    }
                }
            }
        };
        *h = next;
        let to = next.state();
        (from != to).then(|| Transition {
            node: node.to_string(),
            from,
            to,
            at: now,
        })
    }

    /// How long until `node`, failed and answering, would be healthy again if every probe keeps succeeding.
    pub fn hold_down_remaining(&self, node: &str, now: Instant) -> Option<Duration> {
        match self.nodes.get(node)? {
            NodeHealth::Failed {
                recovering_since: Some(start),
                ..
            } => Some(
                self.config
                    .hold_down
                    .saturating_sub(now.saturating_duration_since(*start)),
            ),
            NodeHealth::Failed { .. } => Some(self.config.hold_down),
            _ => None,
        }
    }
}

/// The forwarder probe's datagrams (UDP, controller → agent → controller), pure encode and decode.
///
/// ```text
///   request  "ULP1" | seq (u64, big endian) | 0
///   reply    "ULP1" | seq (the request's)   | 1 healthy, 2 not healthy
/// ```
///
/// The reply is no larger than the request, so the echo amplifies nothing; anything else is ignored.
pub mod wire {
    /// Every probe datagram starts with this.
    pub const MAGIC: [u8; 4] = *b"ULP1";
    /// Length of a request and of a reply.
    pub const LEN: usize = 13;
    const REQUEST: u8 = 0;
    const HEALTHY: u8 = 1;
    const UNHEALTHY: u8 = 2;

    /// The request of round `seq`.
    pub fn request(seq: u64) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4..12].copy_from_slice(&seq.to_be_bytes());
        b[12] = REQUEST;
        b
    }

    /// The agent's answer to `datagram`, if it is a request.
    pub fn reply(datagram: &[u8], healthy: bool) -> Option<[u8; LEN]> {
        if datagram.len() != LEN || datagram[..4] != MAGIC || datagram[12] != REQUEST {
            return None;
        }
        let mut b = [0u8; LEN];
        b.copy_from_slice(datagram);
        b[12] = if healthy { HEALTHY } else { UNHEALTHY };
        Some(b)
    }

    /// `(seq, healthy)` of a reply; `None` for anything else.
    pub fn parse_reply(datagram: &[u8]) -> Option<(u64, bool)> {
        if datagram.len() != LEN || datagram[..4] != MAGIC {
            return None;
        }
        let seq = u64::from_be_bytes(datagram[4..12].try_into().ok()?);
        match datagram[12] {
            HEALTHY => Some((seq, true)),
            UNHEALTHY => Some((seq, false)),
            _ => None,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn request_reply_round_trip_and_junk_is_ignored() {
            let r = request(0x0102_0304_0506_0708);
            assert_eq!(parse_reply(&r), None, "a request is not a reply");
            assert_eq!(
                parse_reply(&reply(&r, true).unwrap()),
                Some((0x0102_0304_0506_0708, true))
            );
            assert_eq!(
                parse_reply(&reply(&r, false).unwrap()),
                Some((0x0102_0304_0506_0708, false))
            );
            // Only requests are answered: a reply, a short, long or foreign datagram is not.
            assert_eq!(reply(&reply(&r, true).unwrap(), true), None);
            assert_eq!(reply(&r[..12], true), None);
            assert_eq!(reply(&[r.as_slice(), &[0]].concat(), true), None);
            let mut foreign = r;
            foreign[0] = b'X';
            assert_eq!(reply(&foreign, true), None);
            assert_eq!(parse_reply(b"HTTP/1.1 200"), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_tracker(misses: u32, hold_secs: u64) -> (HealthTracker, Instant) {
        let mut t = HealthTracker::new(HealthConfig {
            misses_to_fail: misses,
            hold_down: Duration::from_secs(hold_secs),
            hold_down_misses: 1,
        });
        t.insert_healthy("a");
        (t, Instant::now())
    }

    #[test]
    fn only_enough_misses_in_a_row_restart_the_hold_down() {
        let mut t = HealthTracker::new(HealthConfig {
            misses_to_fail: 1,
            hold_down: Duration::from_secs(30),
            hold_down_misses: 2,
        });
        t.insert_healthy("a");
        let t0 = Instant::now();
        t.record("a", Probe::Miss, at(t0, 0)).unwrap();
        assert_eq!(t.record("a", Probe::Success, at(t0, 1)), None);
        // Single misses, each followed by a success, leave the run of successes standing.
        for s in [5, 12, 20, 27] {
            assert_eq!(t.record("a", Probe::Miss, at(t0, s)), None);
            assert_eq!(t.record("a", Probe::Success, at(t0, s + 1)), None);
        }
        assert_eq!(
            t.hold_down_remaining("a", at(t0, 28)),
            Some(Duration::from_secs(3))
        );
        // Two in a row restart it.
        t.record("a", Probe::Miss, at(t0, 29));
        t.record("a", Probe::Miss, at(t0, 30));
        assert_eq!(t.record("a", Probe::Success, at(t0, 31)), None);
        assert_eq!(t.record("a", Probe::Success, at(t0, 60)), None);
        let tr = t.record("a", Probe::Success, at(t0, 61)).unwrap();
        assert_eq!(
            (tr.from, tr.to),
            (HealthState::Failed, HealthState::Healthy)
        );
        // The default keeps the strict rule: any miss restarts it.
        assert_eq!(HealthConfig::default().hold_down_misses, 1);
    }

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    #[test]
    fn fails_after_n_consecutive_misses_and_not_before() {
        let (mut t, t0) = mk_tracker(3, 30);
        assert_eq!(t.record("a", Probe::Miss, at(t0, 1)), None);
        assert_eq!(t.record("a", Probe::Miss, at(t0, 2)), None);
        assert!(t.is_healthy("a"));
        let tr = t.record("a", Probe::Miss, at(t0, 3)).unwrap();
        assert!(tr.is_failure());
        assert_eq!(
            (tr.from, tr.to),
            (HealthState::Healthy, HealthState::Failed)
        );
        assert!(!t.is_healthy("a"));
        assert!(t.healthy().is_empty());
    }

    #[test]
    fn a_success_resets_the_miss_count() {
        let (mut t, t0) = mk_tracker(3, 30);
        for s in 0..20 {
            t.record("a", Probe::Miss, at(t0, 3 * s));
            t.record("a", Probe::Miss, at(t0, 3 * s + 1));
            assert_eq!(t.record("a", Probe::Success, at(t0, 3 * s + 2)), None);
        }
        assert!(t.is_healthy("a"));
    }

    #[test]
    fn recovery_needs_an_unbroken_hold_down() {
        let (mut t, t0) = mk_tracker(1, 30);
        t.record("a", Probe::Miss, at(t0, 0)).unwrap();
        // One success does not restore.
        assert_eq!(t.record("a", Probe::Success, at(t0, 1)), None);
        assert_eq!(
            t.hold_down_remaining("a", at(t0, 11)),
            Some(Duration::from_secs(20))
        );
        // 29 s of success, then a miss: the hold-down restarts.
        assert_eq!(t.record("a", Probe::Success, at(t0, 30)), None);
        t.record("a", Probe::Miss, at(t0, 31));
        assert_eq!(t.record("a", Probe::Success, at(t0, 32)), None);
        assert_eq!(t.record("a", Probe::Success, at(t0, 61)), None);
        let tr = t.record("a", Probe::Success, at(t0, 62)).unwrap();
        assert_eq!(
            (tr.from, tr.to),
            (HealthState::Failed, HealthState::Healthy)
        );
        assert!(!tr.is_failure());
        assert!(t.is_healthy("a"));
    }

    #[test]
    fn pending_nodes_become_healthy_on_first_success_and_never_fail() {
        let mut t = HealthTracker::new(HealthConfig::default());
        t.insert_pending("p");
        assert!(!t.is_healthy("p"));
        let t0 = Instant::now();
        for s in 0..10 {
            assert_eq!(t.record("p", Probe::Miss, at(t0, s)), None);
        }
        assert_eq!(t.state("p"), Some(HealthState::Pending));
        let tr = t.record("p", Probe::Success, at(t0, 11)).unwrap();
        assert_eq!(
            (tr.from, tr.to),
            (HealthState::Pending, HealthState::Healthy)
        );
        // Inserting again does not reset it.
        t.insert_pending("p");
        assert!(t.is_healthy("p"));
    }

    #[test]
    fn untracked_nodes_are_ignored_and_retain_forgets() {
        let (mut t, t0) = mk_tracker(1, 30);
        assert_eq!(t.record("ghost", Probe::Miss, t0), None);
        assert!(!t.is_healthy("ghost"));
        t.insert_healthy("b");
        t.retain(["b"]);
        assert_eq!(t.state("a"), None);
        assert!(t.is_healthy("b"));
    }
}
