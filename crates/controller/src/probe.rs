//! Forwarder health probing: every interval, one HTTP GET to each target's agent health endpoint, results fed to
//! the [`HealthTracker`], state changes sent to the run loop.
//!
//! ```text
//!   targets (watch) ─► every interval: probe all targets at once (each bounded by the timeout)
//!                                        │ (node, Success | Miss), observed at the end of the round
//!                                        ▼
//!                             HealthTracker::record ─► Transition ─► mpsc ─► run loop: reconcile now
//! ```
//!
//! Targets are the nodes that carry VPC routes (the plan's forwarders) plus nodes that are not healthy (failed:
//! to see them recover; pending: to see them come up). Before the first plan every node is a target. A healthy node
//! that forwards nothing is not probed: if it is chosen as a new forwarder while dead, it is failed N intervals
//! after it becomes a target.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use underlay_core::health::{HealthState, HealthTracker, Probe, Transition};
use underlay_core::planner::RoutedPlan;

use crate::config::ClusterNode;

/// A node to probe and where.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProbeTarget {
    pub node: String,
    pub addr: SocketAddr,
}

/// One probe of one target. [`HttpProber`] in clusters; tests and the lab may pass another.
#[async_trait::async_trait]
pub trait Prober: Send + Sync + std::fmt::Debug + 'static {
    async fn probe(&self, target: &ProbeTarget) -> Probe;
}

/// `GET <path>` over plain HTTP/1.1; success is a 2xx status line within the timeout.
#[derive(Debug, Clone)]
pub struct HttpProber {
    pub path: String,
    pub timeout: Duration,
}

#[async_trait::async_trait]
impl Prober for HttpProber {
    async fn probe(&self, target: &ProbeTarget) -> Probe {
        probe_http(target.addr, &self.path, self.timeout).await
    }
}

/// Connect, send one request, read the status line; all within `timeout`.
pub async fn probe_http(addr: SocketAddr, path: &str, timeout: Duration) -> Probe {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: underlay-controller\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut buf = Vec::with_capacity(64);
        let mut chunk = [0u8; 256];
        // The status line is short; stop at its end or after 1 KiB.
        while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 1024 {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Some(status_is_success(&buf))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Some(true)) => Probe::Success,
        _ => Probe::Miss,
    }
}

/// `HTTP/1.x 2xx …` at the start of a response.
fn status_is_success(head: &[u8]) -> bool {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return false;
    };
    version.starts_with(b"HTTP/1.") && code.len() == 3 && code[0] == b'2'
}

/// The nodes to probe: forwarders of `plan` plus nodes the tracker does not hold healthy; every node when there is
/// no plan yet. Pure.
pub fn probe_targets(
    plan: Option<&RoutedPlan>,
    nodes: &[ClusterNode],
    tracker: &HealthTracker,
    port: u16,
) -> Vec<ProbeTarget> {
    let forwarders: Option<BTreeSet<&str>> = plan.map(|p| {
        p.routes
            .iter()
            .filter_map(|r| r.forwarder.as_deref())
            .collect()
    });
    let mut out: Vec<ProbeTarget> = nodes
        .iter()
        .filter(|n| match &forwarders {
            None => true,
            Some(f) => {
                f.contains(n.name.as_str()) || tracker.state(&n.name) != Some(HealthState::Healthy)
            }
        })
        .map(|n| ProbeTarget {
            node: n.name.clone(),
            addr: SocketAddr::new(n.ip.into(), port),
        })
        .collect();
    out.sort();
    out
}

/// Probe every target at once; results in target order.
pub async fn probe_round(
    prober: &Arc<dyn Prober>,
    targets: &[ProbeTarget],
) -> Vec<(String, Probe)> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, t) in targets.iter().cloned().enumerate() {
        let prober = prober.clone();
        tasks.spawn(async move { (i, prober.probe(&t).await) });
    }
    let mut results: Vec<Option<Probe>> = vec![None; targets.len()];
    while let Some(joined) = tasks.join_next().await {
        if let Ok((i, p)) = joined {
            results[i] = Some(p);
        }
    }
    targets
        .iter()
        .zip(results)
        .map(|(t, p)| (t.node.clone(), p.unwrap_or(Probe::Miss)))
        .collect()
}

/// Feed one round's results into the tracker at `now`; the transitions they caused.
pub fn record_round(
    tracker: &Mutex<HealthTracker>,
    results: &[(String, Probe)],
    now: std::time::Instant,
) -> Vec<Transition> {
    let mut t = tracker.lock().unwrap_or_else(|e| e.into_inner());
    results
        .iter()
        .filter_map(|(node, probe)| t.record(node, *probe, now))
        .collect()
}

/// The probing task.
#[derive(Debug, Clone)]
pub struct HealthProber {
    interval: Duration,
    prober: Arc<dyn Prober>,
    tracker: Arc<Mutex<HealthTracker>>,
    rounds: Arc<AtomicU64>,
}

impl HealthProber {
    pub fn new(
        interval: Duration,
        prober: Arc<dyn Prober>,
        tracker: Arc<Mutex<HealthTracker>>,
    ) -> Self {
        Self {
            interval,
            prober,
            tracker,
            rounds: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Rounds completed so far (shared with clones).
    pub fn rounds(&self) -> Arc<AtomicU64> {
        self.rounds.clone()
    }

    /// Probe until `shutdown` turns true (or its sender is dropped). Transitions go to `transitions`; a full
    /// channel never blocks probing for longer than a send.
    pub async fn run(
        self,
        mut targets: watch::Receiver<Vec<ProbeTarget>>,
        transitions: mpsc::Sender<Transition>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        return;
                    }
                    continue;
                }
            }
            if *shutdown.borrow() {
                return;
            }
            let round: Vec<ProbeTarget> = targets.borrow_and_update().clone();
            let results = probe_round(&self.prober, &round).await;
            let now = tokio::time::Instant::now().into_std();
            let changes = record_round(&self.tracker, &results, now);
            self.rounds.fetch_add(1, Ordering::SeqCst);
            for t in changes {
                if is_alarming(&t) {
                    tracing::warn!(node = %t.node, from = %t.from, to = %t.to, "forwarder health changed");
                } else {
                    tracing::info!(node = %t.node, from = %t.from, to = %t.to, "forwarder health changed");
                }
                if transitions.send(t).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A transition worth a WARN: a forwarder failing. Every node joins as pending → healthy and a recovered one
/// fails back as failed → healthy: normal operation, logged at INFO.
pub fn is_alarming(t: &Transition) -> bool {
    t.to == HealthState::Failed
}

#[cfg(test)]
mod level_tests {
    use super::*;

    #[test]
    fn only_failures_are_warnings() {
        let t = |from, to| Transition {
            node: "n".into(),
            from,
            to,
            at: std::time::Instant::now(),
        };
        use HealthState::*;
        assert!(!is_alarming(&t(Pending, Healthy)), "a normal join");
        assert!(!is_alarming(&t(Failed, Healthy)), "a fail-back");
        assert!(is_alarming(&t(Healthy, Failed)));
        assert!(is_alarming(&t(Pending, Failed)));
    }
}
