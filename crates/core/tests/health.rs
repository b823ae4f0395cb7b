//! The forwarder health tracker against its promises, on random probe sequences with explicit time: fewer than N
//! misses in a row never fail a node, a flapping node never comes back, recovery needs an unbroken hold-down, and
//! a node changes state only through the transitions the state machine allows.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use underlay_core::health::{HealthConfig, HealthState, HealthTracker, Probe};

fn mk_tracker(misses: u32, hold_down: Duration) -> HealthTracker {
    // Any miss restarts the hold-down here (`hold_down_misses: 1`): the properties below are about that rule.
    let mut t = HealthTracker::new(HealthConfig {
        misses_to_fail: misses,
        hold_down,
        hold_down_misses: 1,
    });
    t.insert_healthy("n");
    t
}

fn probe(ok: bool) -> Probe {
    if ok { Probe::Success } else { Probe::Miss }
}

proptest! {
    /// Runs of at most N−1 misses, separated by at least one success, never fail a healthy node.
    #[test]
    fn fewer_than_n_misses_in_a_row_never_fail(
        n in 2u32..6,
        runs in prop::collection::vec((0u32..10, 1u32..4), 1..40),
        interval_ms in 100u64..2000,
    ) {
        let mut t = mk_tracker(n, Duration::from_secs(30));
        let t0 = Instant::now();
        let mut k = 0u64;
        for (misses, successes) in runs {
            for _ in 0..misses % n {
                prop_assert_eq!(t.record("n", Probe::Miss, t0 + Duration::from_millis(k * interval_ms)), None);
                k += 1;
            }
            for _ in 0..successes {
                prop_assert_eq!(t.record("n", Probe::Success, t0 + Duration::from_millis(k * interval_ms)), None);
                k += 1;
            }
        }
        prop_assert!(t.is_healthy("n"));
    }

    /// N misses in a row always fail a healthy node, on the N-th miss exactly.
    #[test]
    fn n_misses_in_a_row_fail_on_the_nth(n in 1u32..8, interval_ms in 100u64..2000) {
        let mut t = mk_tracker(n, Duration::from_secs(30));
        let t0 = Instant::now();
        for k in 0..n {
            let tr = t.record("n", Probe::Miss, t0 + Duration::from_millis(u64::from(k) * interval_ms));
            if k + 1 < n {
                prop_assert_eq!(tr, None);
            } else {
                let tr = tr.expect("N-th miss fails");
                prop_assert!(tr.is_failure());
            }
        }
    }

    /// Once failed, a node whose probes alternate (or that misses at least once per hold-down) never becomes
    /// healthy again: its routes are moved once and stay moved.
    #[test]
    fn a_flapping_node_never_returns(
        n in 1u32..5,
        hold_secs in 2u64..60,
        interval_ms in 100u64..2000,
        pattern in prop::collection::vec(any::<bool>(), 1..8),
        rounds in 1usize..200,
    ) {
        let hold = Duration::from_secs(hold_secs);
        let mut t = mk_tracker(n, hold);
        let t0 = Instant::now();
        let mut k = 0u64;
        let at = |k: u64| t0 + Duration::from_millis(k * interval_ms);
        for _ in 0..n {
            t.record("n", Probe::Miss, at(k));
            k += 1;
        }
        prop_assert_eq!(t.state("n"), Some(HealthState::Failed));
        // A pattern with at least one miss, repeated; a run of successes shorter than the hold-down between misses.
        let mut pattern = pattern;
        pattern.push(false);
        let max_run = (hold.as_millis() as u64).saturating_sub(1) / interval_ms; // successes spanning < hold
        let mut run = 0u64;
        for r in 0..rounds {
            let ok = pattern[r % pattern.len()] && run < max_run;
            run = if ok { run + 1 } else { 0 };
            prop_assert_eq!(t.record("n", probe(ok), at(k)), None);
            k += 1;
        }
        prop_assert!(!t.is_healthy("n"));
    }

    /// A failed node answering every probe is healthy again exactly when its successes span the hold-down.
    #[test]
    fn recovery_comes_exactly_after_the_hold_down(
        hold_secs in 0u64..60,
        interval_ms in 100u64..3000,
        leading_misses in 0u32..5,
    ) {
        let hold = Duration::from_secs(hold_secs);
        let mut t = mk_tracker(1, hold);
        let t0 = Instant::now();
        let at = |k: u64| t0 + Duration::from_millis(k * interval_ms);
        t.record("n", Probe::Miss, at(0)).expect("fails");
        let mut k = 1;
        for _ in 0..leading_misses {
            prop_assert_eq!(t.record("n", Probe::Miss, at(k)), None);
            k += 1;
        }
        let first = k;
        loop {
            let tr = t.record("n", Probe::Success, at(k));
            let elapsed = at(k) - at(first);
            if elapsed >= hold {
                let tr = tr.expect("healthy once the hold-down has passed");
                prop_assert_eq!(tr.to, HealthState::Healthy);
                break;
            }
            prop_assert_eq!(tr, None);
            k += 1;
        }
        prop_assert!(t.is_healthy("n"));
    }

    /// Any sequence: transitions are only pending→healthy, healthy→failed, failed→healthy; the number of
    /// failovers never exceeds one per (N misses + a hold-down's worth of successes).
    #[test]
    fn only_allowed_transitions_and_bounded_churn(
        n in 1u32..5,
        hold_secs in 1u64..20,
        start_pending in any::<bool>(),
        seq in prop::collection::vec(any::<bool>(), 0..400),
    ) {
        let hold = Duration::from_secs(hold_secs);
        let mut t = HealthTracker::new(HealthConfig { misses_to_fail: n, hold_down: hold, hold_down_misses: 1 });
        if start_pending { t.insert_pending("n") } else { t.insert_healthy("n") }
        let t0 = Instant::now();
        let mut failures = 0u64;
        for (k, ok) in seq.iter().enumerate() {
            let before = t.state("n").unwrap();
            if let Some(tr) = t.record("n", probe(*ok), t0 + Duration::from_secs(k as u64)) {
                prop_assert_eq!(tr.from, before);
                prop_assert!(matches!(
                    (tr.from, tr.to),
                    (HealthState::Pending, HealthState::Healthy)
                        | (HealthState::Healthy, HealthState::Failed)
                        | (HealthState::Failed, HealthState::Healthy)
                ), "{:?}", tr);
                if tr.is_failure() { failures += 1; }
            }
        }
        // Probes are 1 s apart: each failure after the first needs ≥ hold_secs+1 successes and n misses before it.
        let per_cycle = u64::from(n) + hold_secs + 1;
        prop_assert!(failures <= seq.len() as u64 / per_cycle + 1, "{} failures in {} probes", failures, seq.len());
    }
}
