//! Forwarder health probing: every interval, one round over every target, results fed to the [`HealthTracker`],
//! state changes sent to the run loop.
//!
//! ```text
//!   targets (watch) ─► every interval: Prober::probe_round(targets), bounded by the timeout
//!                        UdpProber (default): one socket, one datagram out and one back per target
//!                        HttpProber: one GET /healthz per target, all at once
//!                                        │ (node, Success | Miss), observed at the end of the round
//!                                        ▼
//!                             HealthTracker::record ─► Transition ─► mpsc ─► run loop: reconcile now
//! ```
//!
//! The default [`UdpProber`] is a BFD-style echo: a round is one `send_to` of a 13-byte datagram per target
//! (`underlay_core::health::wire`) on one socket, then the replies as they come until every target answered or
//! the timeout passed; no task, connection or timer per target. The agent answers on UDP
//! [`AGENT_PROBE_UDP_PORT`](underlay_core::names::AGENT_PROBE_UDP_PORT) with its health (the `/healthz` verdict).
//!
//! Targets are the nodes that carry VPC routes (the plan's forwarders) plus nodes that are not healthy (failed:
//! to see them recover; pending: to see them come up). Before the first plan every node is a target. A healthy node
//! that forwards nothing is not probed: if it is chosen as a new forwarder while dead, it is failed N intervals
//! after it becomes a target.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::{OnceCell, mpsc, watch};
use underlay_core::health::{HealthState, HealthTracker, Probe, Transition, wire};
use underlay_core::planner::RoutedPlan;

use crate::config::ClusterNode;

/// A node to probe and where.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProbeTarget {
    pub node: String,
    pub addr: SocketAddr,
}

/// Probes targets. [`UdpProber`] in clusters by default; tests and the lab may pass another.
#[async_trait::async_trait]
pub trait Prober: Send + Sync + std::fmt::Debug + 'static {
    /// One probe of one target.
    async fn probe(&self, target: &ProbeTarget) -> Probe;

    /// One round over every target, results in target order. The default probes every target at once with
    /// [`Prober::probe`]; a prober that can do better in bulk (one socket for all) overrides it.
    async fn probe_round(&self, targets: &[ProbeTarget]) -> Vec<Probe> {
        futures::future::join_all(targets.iter().map(|t| self.probe(t))).await
    }
}

/// Makes the prober's socket (e.g. bound inside a network namespace); called once, on the first round.
pub type SocketFactory = Box<dyn Fn() -> std::io::Result<std::net::UdpSocket> + Send + Sync>;

/// The BFD-style echo prober: one UDP socket; a round sends one request per target and collects the replies
/// until each target has answered or `timeout` has passed. A reply from an earlier round, from another address
/// or saying "not healthy" is a miss for this round.
pub struct UdpProber {
    /// Each round's replies must come within this.
    pub timeout: Duration,
    seq: AtomicU64,
    make: SocketFactory,
    socket: OnceCell<UdpSocket>,
}

impl std::fmt::Debug for UdpProber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpProber")
            .field("timeout", &self.timeout)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl UdpProber {
    /// A prober on an unspecified IPv4 address and an ephemeral port of the current namespace.
    pub fn new(timeout: Duration) -> Self {
        Self::with_socket(timeout, Box::new(|| std::net::UdpSocket::bind("0.0.0.0:0")))
    }

    /// A prober whose socket `make` creates (it is made non-blocking and registered on first use).
    pub fn with_socket(timeout: Duration, make: SocketFactory) -> Self {
        Self {
            timeout,
            seq: AtomicU64::new(0),
            make,
            socket: OnceCell::new(),
        }
    }

    async fn socket(&self) -> std::io::Result<&UdpSocket> {
        self.socket
            .get_or_try_init(|| async {
                let s = (self.make)()?;
                s.set_nonblocking(true)?;
                UdpSocket::from_std(s)
            })
            .await
    }
}

#[async_trait::async_trait]
impl Prober for UdpProber {
    async fn probe(&self, target: &ProbeTarget) -> Probe {
        self.probe_round(std::slice::from_ref(target))
            .await
            .pop()
            .unwrap_or(Probe::Miss)
    }

    async fn probe_round(&self, targets: &[ProbeTarget]) -> Vec<Probe> {
        let mut out = vec![Probe::Miss; targets.len()];
        let socket = match self.socket().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "forwarder probe socket");
                return out;
            }
        };
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let request = wire::request(seq);
        let deadline = tokio::time::Instant::now() + self.timeout;
        // Who is still to answer, by address (several nodes never share one).
        let mut waiting: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        for (i, t) in targets.iter().enumerate() {
            // A full send buffer or an unreachable network is that target's miss.
            if socket.send_to(&request, t.addr).await.is_ok() {
                waiting.insert(t.addr, i);
            }
        }
        let mut buf = [0u8; 64];
        while !waiting.is_empty() {
            let Ok(got) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
            else {
                break;
            };
            // An ICMP error from an earlier send (port unreachable) surfaces here: read on.
            let Ok((n, from)) = got else { continue };
            if let Some((s, healthy)) = wire::parse_reply(&buf[..n])
                && s == seq
                && let Some(i) = waiting.remove(&from)
                && healthy
            {
                out[i] = Probe::Success;
            }
        }
        out
    }
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

/// Probe every target in one round of `prober`; results in target order (a target without a result missed).
pub async fn probe_round(
    prober: &Arc<dyn Prober>,
    targets: &[ProbeTarget],
) -> Vec<(String, Probe)> {
    let mut results = prober.probe_round(targets).await.into_iter();
    targets
        .iter()
        .map(|t| (t.node.clone(), results.next().unwrap_or(Probe::Miss)))
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
