//! The faults of a soak, drawn from its seed before the run starts (pure: the same seed and length give the same
//! plan, so a failed run can be replayed with its faults at the same offsets).
//!
//! ```text
//!   seed ──SplitMix64──► per kind: first arrival within min(mean gap, run/2), then every mean gap ± 50 %
//!                        hold drawn from the kind's range; a kind never overlaps itself; all end before the run
//!   ──► Vec<PlannedFault> sorted by start: kinds overlap one another as they fall
//! ```

use std::time::Duration;

use serde::Serialize;

/// SplitMix64: small, seedable, and the same on every platform (the plan must replay from the seed alone).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5eed_50a6_0000_0016)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Uniform in `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// A burst of CNI ADDs on a node, and its agent killed (`kill -9`: its runtime dropped) in the middle of it;
    /// restarted after the hold.
    AgentKill,
    /// The leading controller replica killed; the standby takes the Lease once it expires; the killed replica
    /// restarts (as a new pod) after the hold.
    LeaderKill,
    /// Every request to the API stand-in fails at the transport for the hold; running watches end.
    ApiOutage,
    /// 20 % of EC2 calls of every operation answer `InternalError`.
    Ec2Errors,
    /// Every EC2 call answers `RequestLimitExceeded`.
    Ec2Throttle,
    /// Every EC2 call takes 200 ms to 1.5 s.
    Ec2Latency,
    /// Routed mode: a forwarder node dies (agent killed, every ENI link down) and recovers after the hold.
    NodeDeath,
    /// A pod's network namespace deleted without a CNI DEL; the runtime's DEL (namespace gone) comes after the
    /// hold, as kubelet's sandbox cleanup would.
    NetnsDelete,
    /// Eni mode: a secondary ENI carrying pods detached through the EC2 API behind the controller's back (as a
    /// person or another tool would); the hold is only how long the fault counts as active.
    EniDetach,
}

impl FaultKind {
    pub const ALL: [FaultKind; 9] = [
        FaultKind::AgentKill,
        FaultKind::LeaderKill,
        FaultKind::ApiOutage,
        FaultKind::Ec2Errors,
        FaultKind::Ec2Throttle,
        FaultKind::Ec2Latency,
        FaultKind::NodeDeath,
        FaultKind::NetnsDelete,
        FaultKind::EniDetach,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::AgentKill => "agent_kill",
            FaultKind::LeaderKill => "leader_kill",
            FaultKind::ApiOutage => "api_outage",
            FaultKind::Ec2Errors => "ec2_errors",
            FaultKind::Ec2Throttle => "ec2_throttle",
            FaultKind::Ec2Latency => "ec2_latency",
            FaultKind::NodeDeath => "node_death",
            FaultKind::NetnsDelete => "netns_delete",
            FaultKind::EniDetach => "eni_detach",
        }
    }

    /// Whether the kind applies to a lab in `mode`.
    pub fn applies(self, mode: underlay_api::Mode) -> bool {
        match self {
            // Eni mode has no forwarders: the VPC delivers to the ENI that owns the address.
            FaultKind::NodeDeath => mode == underlay_api::Mode::Routed,
            // Routed mode's pods live behind the primary ENI, which cannot be detached.
            FaultKind::EniDetach => mode == underlay_api::Mode::Eni,
            _ => true,
        }
    }

    /// Mean gap between two faults of the kind, the range of its hold (ms), and the least quiet time after one
    /// ends before the next starts.
    fn shape(self) -> (Duration, (u64, u64), Duration) {
        let s = Duration::from_secs;
        match self {
            FaultKind::AgentKill => (s(25), (1_000, 4_000), s(2)),
            // The standby needs the Lease to expire; the killed replica restarts after the hold.
            FaultKind::LeaderKill => (s(45), (3_000, 8_000), s(10)),
            FaultKind::ApiOutage => (s(40), (2_000, 6_000), s(3)),
            FaultKind::Ec2Errors => (s(30), (3_000, 10_000), s(2)),
            FaultKind::Ec2Throttle => (s(35), (2_000, 8_000), s(2)),
            FaultKind::Ec2Latency => (s(30), (3_000, 10_000), s(2)),
            // Fail-back waits for the hold-down: the next death waits for it.
            FaultKind::NodeDeath => (s(60), (5_000, 15_000), s(15)),
            FaultKind::NetnsDelete => (s(15), (2_000, 8_000), s(1)),
            FaultKind::EniDetach => (s(50), (1_000, 2_000), s(20)),
        }
    }
}

/// One fault of the plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedFault {
    /// From the start of the run.
    #[serde(serialize_with = "ser_ms")]
    pub at: Duration,
    pub kind: FaultKind,
    #[serde(serialize_with = "ser_ms")]
    pub hold: Duration,
    /// Picks the fault's target (node, pod) among those eligible when it starts.
    pub pick: u64,
}

impl PlannedFault {
    pub fn end(&self) -> Duration {
        self.at + self.hold
    }
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// No fault starts before this: the cluster settles first.
pub const WARM_UP: Duration = Duration::from_secs(3);

/// The faults of a run of length `run` in `mode`, from `seed`, sorted by start.
pub fn plan(seed: u64, run: Duration, mode: underlay_api::Mode) -> Vec<PlannedFault> {
    let mut out = Vec::new();
    for (k, kind) in FaultKind::ALL.into_iter().enumerate() {
        if !kind.applies(mode) {
            continue;
        }
        // One generator per kind: adding a kind does not move the others.
        let mut rng = Rng::new(seed.wrapping_add((k as u64 + 1).wrapping_mul(0x1000_0001)));
        let (gap, (lo, hi), quiet) = kind.shape();
        let gap_ms = gap.as_millis() as u64;
        let first_window = gap_ms.min(run.as_millis() as u64 / 2);
        let mut at = WARM_UP + Duration::from_millis(rng.below(first_window.max(1)));
        loop {
            let hold = rng.millis(lo, hi);
            if at + hold >= run {
                break;
            }
            out.push(PlannedFault {
                at,
                kind,
                hold,
                pick: rng.next_u64(),
            });
            let next = at + rng.millis(gap_ms / 2, gap_ms * 3 / 2);
            at = next.max(at + hold + quiet);
        }
    }
    out.sort_by_key(|f| (f.at, f.kind));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use underlay_api::Mode;

    #[test]
    fn the_plan_is_the_seeds_and_differs_between_seeds() {
        let run = Duration::from_secs(300);
        assert_eq!(plan(7, run, Mode::Routed), plan(7, run, Mode::Routed));
        assert_ne!(plan(7, run, Mode::Routed), plan(8, run, Mode::Routed));
    }

    #[test]
    fn a_minute_holds_every_kind_of_the_mode_and_they_overlap() {
        for mode in [Mode::Routed, Mode::Eni] {
            for seed in 1..20 {
                let run = Duration::from_secs(60);
                let p = plan(seed, run, mode);
                for kind in FaultKind::ALL {
                    let n = p.iter().filter(|f| f.kind == kind).count();
                    assert_eq!(n > 0, kind.applies(mode), "{kind:?} {mode:?} seed {seed}");
                }
                assert!(p.iter().all(|f| f.at >= WARM_UP && f.end() < run));
                let overlaps = p
                    .iter()
                    .enumerate()
                    .any(|(i, a)| p[i + 1..].iter().any(|b| b.at < a.end()));
                assert!(overlaps, "seed {seed}: faults must overlap");
            }
        }
    }

    #[test]
    fn a_kind_never_overlaps_itself() {
        for mode in [Mode::Routed, Mode::Eni] {
            a_kind_never_overlaps_itself_in(mode);
        }
    }

    fn a_kind_never_overlaps_itself_in(mode: Mode) {
        let p = plan(3, Duration::from_secs(1800), mode);
        for kind in FaultKind::ALL.into_iter().filter(|k| k.applies(mode)) {
            let of: Vec<_> = p.iter().filter(|f| f.kind == kind).collect();
            assert!(of.len() > 10, "{kind:?}: {}", of.len());
            for w in of.windows(2) {
                assert!(w[1].at >= w[0].end() + kind.shape().2, "{kind:?}");
            }
        }
    }

    #[test]
    fn rng_is_uniform_enough_and_bounded() {
        let mut r = Rng::new(1);
        let mut hits = [0u32; 4];
        for _ in 0..4000 {
            hits[r.below(4) as usize] += 1;
        }
        assert!(hits.iter().all(|&h| (800..1200).contains(&h)), "{hits:?}");
        assert_eq!(r.below(0), 0);
        let d = r.millis(5, 5);
        assert_eq!(d, Duration::from_millis(5));
    }
}
