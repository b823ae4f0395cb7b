//! The soak's report: JSON (serde) and a summary for a person.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::checks::{CheckCount, Dist, Violation};
use super::pods::ChurnStats;
use super::{Lab, POLICY_GRACE, Run, SoakOptions, mode_str};

/// Faults the soak does not inject yet (the issue lists them).
pub const NOT_INJECTED: [&str; 1] = ["instance_terminated"];

/// One kind of fault.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultStats {
    pub injected: u64,
    /// Due but nothing to inject into (no live node, no leader, no client pod).
    pub skipped: u64,
    /// From the fault's end (a leader kill: from the kill) to the first second every live pod answered (a leader
    /// kill: another replica leading). Measured on the run's one-second tick.
    pub recovery: Dist,
}

/// The longest stretch a pod went unanswered.
#[derive(Debug, Clone, Serialize)]
pub struct Unreachability {
    pub pod: String,
    pub node: String,
    pub ms: f64,
    /// When it was measured (s from the start).
    pub at_s: f64,
}

/// EC2 as the VPC saw it during the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ec2Stats {
    pub calls: u64,
    pub throttled: u64,
    pub errors: u64,
    pub calls_by_operation: BTreeMap<String, u64>,
}

/// How the run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub ran: Duration,
    pub interrupted: bool,
    pub settle_ms: Option<f64>,
}

/// What `lab soak` found in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub lab: String,
    pub mode: String,
    pub seed: u64,
    pub minutes: f64,
    pub ran_s: f64,
    pub interrupted: bool,
    pub nodes: usize,
    pub controller_replicas: usize,
    /// The reachability bound after the last fault touching a pod's path, and a policy change's grace.
    pub reach_bound_s: f64,
    pub policy_grace_ms: f64,
    pub faults_planned: usize,
    /// Most faults active at the same time.
    pub max_concurrent_faults: usize,
    pub faults: BTreeMap<&'static str, FaultStats>,
    pub faults_not_injected: Vec<&'static str>,
    pub checks: BTreeMap<&'static str, CheckCount>,
    pub checks_run: u64,
    pub violations_total: u64,
    pub first_violation: Option<Violation>,
    pub violations: Vec<Violation>,
    pub ec2: Ec2Stats,
    pub longest_unreachable: Option<Unreachability>,
    pub churn: ChurnStats,
    pub policy_changes: u64,
    /// Datagrams to guarded pods the policy allowed (shows the policy path works), and denied ones delivered.
    pub allowed_delivered: u64,
    pub denied_delivered: u64,
    pub leader_changes: u64,
    /// After the run: from faults off to settled; `None` if it did not settle.
    pub settle_ms: Option<f64>,
    /// A violation injected on purpose (`--inject-violation`).
    pub injected: Option<String>,
    /// The command that replays this run's faults.
    pub replay: String,
    pub passed: bool,
}

pub(super) fn build(
    lab: &Lab,
    opts: &SoakOptions,
    run: Run,
    outcome: Outcome,
    churn: ChurnStats,
    planned: usize,
) -> SoakReport {
    let mode = mode_str(lab.config.mode);
    let c = lab.sim.counters();
    let ec2 = Ec2Stats {
        calls: c.total_calls(),
        throttled: c.total_throttled(),
        errors: c.errors.values().flat_map(|m| m.values()).sum(),
        calls_by_operation: c.calls.iter().map(|(op, n)| (op.to_string(), *n)).collect(),
    };
    let mut faults: BTreeMap<&'static str, FaultStats> = BTreeMap::new();
    for (kind, mut stats) in run.faults {
        stats.recovery = Dist::of(run.recovery.get(&kind).map(Vec::as_slice).unwrap_or(&[]));
        faults.insert(kind.as_str(), stats);
    }
    let minutes = opts.run.as_secs_f64() / 60.0;
    let mut replay = format!(
        "underlay lab soak --mode {mode} --seed {} --minutes {}",
        opts.seed,
        trim(minutes)
    );
    if opts.inject.is_some() {
        replay.push_str(" --inject-violation reused-address");
    }
    let checks_run = run.ledger.counts.values().map(|c| c.runs).sum();
    let passed =
        run.ledger.total_violations == 0 && !outcome.interrupted && outcome.settle_ms.is_some();
    SoakReport {
        lab: lab.config.name.clone(),
        mode: mode.to_string(),
        seed: opts.seed,
        minutes,
        ran_s: outcome.ran.as_secs_f64(),
        interrupted: outcome.interrupted,
        nodes: lab.nodes.len(),
        controller_replicas: lab.config.controller_replicas,
        reach_bound_s: opts.reach_bound.as_secs_f64(),
        policy_grace_ms: POLICY_GRACE.as_secs_f64() * 1e3,
        faults_planned: planned,
        max_concurrent_faults: run.max_active,
        faults,
        faults_not_injected: NOT_INJECTED.to_vec(),
        checks: run.ledger.counts.clone(),
        checks_run,
        violations_total: run.ledger.total_violations,
        first_violation: run.ledger.first().cloned(),
        violations: run.ledger.violations.clone(),
        ec2,
        longest_unreachable: run.longest,
        churn,
        policy_changes: run.policy_changes,
        allowed_delivered: run.allowed_delivered,
        denied_delivered: run.denied_delivered,
        leader_changes: run.leader_changes,
        settle_ms: outcome.settle_ms,
        injected: run.injected,
        replay,
        passed,
    }
}

fn trim(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl SoakReport {
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "lab soak ({} mode, seed {}): {:.0} s with {} nodes, {} controller replicas",
            self.mode, self.seed, self.ran_s, self.nodes, self.controller_replicas
        );
        let _ = writeln!(
            s,
            "  pods: {} added ({} ADDs failed and undone), {} removed ({} DEL retries), {} namespaces deleted before DEL",
            self.churn.adds,
            self.churn.adds_failed,
            self.churn.dels,
            self.churn.dels_retried,
            self.churn.netns_deleted
        );
        let _ = writeln!(
            s,
            "  policy: {} changes; {} allowed datagrams delivered to guarded pods, {} denied ones",
            self.policy_changes, self.allowed_delivered, self.denied_delivered
        );
        let _ = writeln!(
            s,
            "  faults ({} planned, up to {} at once):",
            self.faults_planned, self.max_concurrent_faults
        );
        for (kind, f) in &self.faults {
            let _ = writeln!(
                s,
                "    {kind:<14} {:>4} injected{}  recovery p50 {:>6.0} ms  p90 {:>6.0} ms  max {:>6.0} ms (n={})",
                f.injected,
                if f.skipped > 0 {
                    format!(" ({} skipped)", f.skipped)
                } else {
                    String::new()
                },
                f.recovery.p50_ms,
                f.recovery.p90_ms,
                f.recovery.max_ms,
                f.recovery.n
            );
        }
        let _ = writeln!(
            s,
            "    not injected yet: {}",
            self.faults_not_injected.join(", ")
        );
        let _ = writeln!(s, "  checks ({} runs):", self.checks_run);
        for (name, c) in &self.checks {
            let _ = writeln!(
                s,
                "    {name:<26} {:>6} runs  {:>4} violated",
                c.runs, c.violations
            );
        }
        let _ = writeln!(
            s,
            "  EC2: {} calls, {} throttled, {} errors; leader changes {}",
            self.ec2.calls, self.ec2.throttled, self.ec2.errors, self.leader_changes
        );
        match &self.longest_unreachable {
            Some(u) => {
                let _ = writeln!(
                    s,
                    "  longest unreachability: {} on {} for {:.1} s (at {:.0} s)",
                    u.pod,
                    u.node,
                    u.ms / 1e3,
                    u.at_s
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "  longest unreachability: none (every probed pod answered every second)"
                );
            }
        }
        match self.settle_ms {
            Some(ms) => {
                let _ = writeln!(s, "  settled {:.1} s after the run", ms / 1e3);
            }
            None => {
                let _ = writeln!(s, "  did not settle");
            }
        }
        if let Some(i) = &self.injected {
            let _ = writeln!(s, "  injected on purpose: {i}");
        }
        if let Some(v) = &self.first_violation {
            let _ = writeln!(
                s,
                "FAILED: {} violation(s), seed {}; first: {} at {:.1} s: {}",
                self.violations_total, self.seed, v.check, v.at_s, v.detail
            );
            let _ = writeln!(s, "  replay: {}", self.replay);
        } else if self.passed {
            let _ = writeln!(s, "PASSED: no invariant violated");
        } else {
            let _ = writeln!(
                s,
                "FAILED: seed {} (interrupted or not settled); replay: {}",
                self.seed, self.replay
            );
        }
        s
    }

    /// One line naming the seed and the first violating event, for the error a failed run exits with.
    pub fn failure(&self) -> Option<String> {
        if self.passed {
            return None;
        }
        Some(match &self.first_violation {
            Some(v) => format!(
                "{} mode, seed {}: {} violation(s); first: {} at {:.1} s: {} (replay: {})",
                self.mode, self.seed, self.violations_total, v.check, v.at_s, v.detail, self.replay
            ),
            None => format!(
                "{} mode, seed {}: {} (replay: {})",
                self.mode,
                self.seed,
                if self.interrupted {
                    "interrupted"
                } else {
                    "did not settle"
                },
                self.replay
            ),
        })
    }
}
