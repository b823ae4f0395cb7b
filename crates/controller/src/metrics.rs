//! The controller's Prometheus metrics and its `/healthz`, `/readyz` and `/metrics` endpoint.
//!
//! ```text
//!   run_routed_on_kube ── ControllerEvent (Pass, Health) ──┐
//!                      ── leading (watch<bool>) ───────────┼─► observe() ─► ControllerMetrics (gauges, counters)
//!                                                          │              └► ControllerHealth (last pass, leader)
//!   GET /metrics  ◄── Registry (these families + the queue's CloudMetrics) ◄┘
//!   GET /healthz  200 while the process lives and, when leading, a pass ended within `stale_after`
//!   GET /readyz   200 with a Kubernetes client, as a standby or as a leader whose first pass ended
//! ```
//!
//! Everything here observes what the controller already publishes (its events and its leadership), so the run
//! loop carries no metrics code. The endpoint is a minimal HTTP/1.1 server (one request per connection, GET
//! only, like the agent's): three fixed paths do not justify an HTTP stack.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use underlay_core::health::{HealthState, Transition};
use underlay_core::routeops::RouteOp;

use crate::controller::{ControllerEvent, PassReport};

/// `/healthz` fails when a leader has not finished a pass for this many resync periods.
pub const STALE_PASSES: u32 = 10;
/// Longest request head accepted.
pub const MAX_REQUEST_HEAD: usize = 4096;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once; more wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 32;
/// Content type of the exposition (`prometheus-client` writes OpenMetrics text, which Prometheus reads).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `priority` (normal, failover) and `result` (ok, error, retryable_error) of a pass.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PassLabels {
    pub priority: &'static str,
    pub result: &'static str,
}

/// `op` (create, replace, delete) and `priority` of an applied route operation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteOpLabels {
    pub op: &'static str,
    pub priority: &'static str,
}

/// `route_table` and `owner` (underlay, foreign).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RoutesLabels {
    pub route_table: String,
    pub owner: &'static str,
}

/// `route_table` alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TableLabels {
    pub route_table: String,
}

/// `kind` of an error ([`crate::ReconcileError::metric_label`], or `srcdst`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// `from` and `to` health state of a forwarder transition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TransitionLabels {
    pub from: &'static str,
    pub to: &'static str,
}

/// The controller's metric families (names and meaning in `docs/metrics.md`). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ControllerMetrics {
    leader: Gauge,
    passes: Family<PassLabels, Counter>,
    pass_errors: Family<KindLabels, Counter>,
    last_pass: Gauge<f64, std::sync::atomic::AtomicU64>,
    route_operations: Family<RouteOpLabels, Counter>,
    routes: Family<RoutesLabels, Gauge>,
    route_limit: Family<TableLabels, Gauge>,
    foreign_in_pod_cidr: Family<TableLabels, Gauge>,
    nodes: Gauge,
    healthy_nodes: Gauge,
    routed_nodes: Gauge,
    forwarders: Gauge,
    pod_blocks: Gauge,
    pod_block_capacity: Gauge,
    failovers: Counter,
    failbacks: Counter,
    transitions: Family<TransitionLabels, Counter>,
    srcdst_disabled: Counter,
}

impl ControllerMetrics {
    /// Creates the families and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry;
        r.register(
            "underlay_build",
            "The running build: version and component (value 1)",
            prometheus_client::metrics::info::Info::new(vec![
                ("component", "controller"),
                ("version", env!("CARGO_PKG_VERSION")),
            ]),
        );
        r.register(
            "underlay_controller_leader",
            "1 while this replica holds the leader lease, else 0",
            m.leader.clone(),
        );
        r.register(
            "underlay_controller_passes",
            "Reconcile passes finished, by priority and result (ok, error, retryable_error)",
            m.passes.clone(),
        );
        r.register(
            "underlay_controller_pass_errors",
            "Errors reported by reconcile passes, by kind (observe, plan, apply, unknown_route_table, pod_cidr_conflict, srcdst)",
            m.pass_errors.clone(),
        );
        r.register(
            "underlay_controller_last_pass_timestamp_seconds",
            "Unix time the last reconcile pass of this replica finished",
            m.last_pass.clone(),
        );
        r.register(
            "underlay_controller_route_operations",
            "VPC route operations applied, by op (create, replace, delete) and priority (normal, failover)",
            m.route_operations.clone(),
        );
        r.register(
            "underlay_controller_routes",
            "Routes in a managed route table as of the last plan, by owner (underlay, foreign)",
            m.routes.clone(),
        );
        r.register(
            "underlay_controller_route_limit",
            "Route limit of a managed route table (the account quota underlay was told)",
            m.route_limit.clone(),
        );
        r.register(
            "underlay_controller_foreign_routes_in_pod_cidr",
            "Routes inside the pod CIDR of a managed route table that are not this cluster's (another cluster's, a transit gateway's, a secondary CIDR's local): never changed, their destinations planned around",
            m.foreign_in_pod_cidr.clone(),
        );
        r.register(
            "underlay_controller_nodes",
            "Nodes in the last plan",
            m.nodes.clone(),
        );
        r.register(
            "underlay_controller_healthy_nodes",
            "Nodes in the last plan whose health probe passes",
            m.healthy_nodes.clone(),
        );
        r.register(
            "underlay_controller_routed_nodes",
            "Nodes whose pod block every managed table delivers after the last pass (a node keeps its not-ready taint until routed)",
            m.routed_nodes.clone(),
        );
        r.register(
            "underlay_controller_forwarders",
            "Nodes that VPC routes target in the last plan",
            m.forwarders.clone(),
        );
        r.register(
            "underlay_controller_pod_blocks",
            "Pod blocks assigned in the last plan",
            m.pod_blocks.clone(),
        );
        r.register(
            "underlay_controller_pod_block_capacity",
            "Pod blocks the pod CIDR holds at the configured block size",
            m.pod_block_capacity.clone(),
        );
        r.register(
            "underlay_controller_failovers",
            "Forwarders that failed their health probes (healthy to failed): their routes move away",
            m.failovers.clone(),
        );
        r.register(
            "underlay_controller_failbacks",
            "Failed forwarders healthy again after the hold-down (failed to healthy): routes may return",
            m.failbacks.clone(),
        );
        r.register(
            "underlay_controller_forwarder_transitions",
            "Forwarder health state changes, by from and to state (pending, healthy, failed)",
            m.transitions.clone(),
        );
        r.register(
            "underlay_controller_srcdst_disabled",
            "Primary ENIs whose source/destination check the controller turned off",
            m.srcdst_disabled.clone(),
        );
        m
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
        if !leading {
            // A standby reports no tables: the leader's figures would go stale here.
            self.routes.clear();
            self.route_limit.clear();
            self.foreign_in_pod_cidr.clear();
        }
    }

    /// Counts a finished pass and takes the figures of its plan.
    pub fn record_pass(&self, report: &PassReport) {
        let errors = !report.routes.errors.is_empty() || !report.srcdst.errors.is_empty();
        let result = if report.retryable() {
            "retryable_error"
        } else if errors {
            "error"
        } else {
            "ok"
        };
        self.passes
            .get_or_create(&PassLabels {
                priority: report.routes.priority.as_str(),
                result,
            })
            .inc();
        for e in &report.routes.errors {
            self.pass_errors
                .get_or_create(&KindLabels {
                    kind: e.metric_label(),
                })
                .inc();
        }
        if !report.srcdst.errors.is_empty() {
            self.pass_errors
                .get_or_create(&KindLabels { kind: "srcdst" })
                .inc_by(report.srcdst.errors.len() as u64);
        }
        self.srcdst_disabled
            .inc_by(report.srcdst.turned_off.len() as u64);
        for a in &report.routes.applied {
            let op = match a.op {
                RouteOp::Create { .. } => "create",
                RouteOp::Replace { .. } => "replace",
                RouteOp::Delete { .. } => "delete",
            };
            self.route_operations
                .get_or_create(&RouteOpLabels {
                    op,
                    priority: a.priority.as_str(),
                })
                .inc();
        }
        self.last_pass.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        if let Some(routed) = report.routes.routed_nodes() {
            self.routed_nodes.set(routed.len() as i64);
        }
        if !report.routes.managed_tables.is_empty() {
            self.foreign_in_pod_cidr.clear();
            for t in &report.routes.managed_tables {
                let n = report
                    .routes
                    .foreign_routes
                    .iter()
                    .filter(|f| &f.route_table == t)
                    .count();
                self.foreign_in_pod_cidr
                    .get_or_create(&TableLabels {
                        route_table: t.0.clone(),
                    })
                    .set(n as i64);
            }
        }
        let Some(plan) = &report.routes.plan else {
            return;
        };
        self.routes.clear();
        self.route_limit.clear();
        for t in &plan.route_tables {
            for (owner, n) in [
                ("underlay", t.underlay_routes),
                ("foreign", t.foreign_routes),
            ] {
                self.routes
                    .get_or_create(&RoutesLabels {
                        route_table: t.id.clone(),
                        owner,
                    })
                    .set(i64::from(n));
            }
            self.route_limit
                .get_or_create(&TableLabels {
                    route_table: t.id.clone(),
                })
                .set(i64::from(t.route_limit));
        }
        self.nodes.set(i64::from(plan.nodes));
        self.healthy_nodes.set(i64::from(plan.healthy_nodes));
        self.forwarders.set(i64::from(plan.forwarders));
        self.pod_blocks.set(plan.blocks.len() as i64);
        let bits = u32::from(
            plan.block_prefix_len
                .saturating_sub(plan.pod_cidr.prefix_len()),
        );
        self.pod_block_capacity
            .set(1i64.checked_shl(bits).unwrap_or(i64::MAX));
    }

    /// Counts a forwarder health transition (failovers and fail-backs among them).
    pub fn record_transition(&self, t: &Transition) {
        self.transitions
            .get_or_create(&TransitionLabels {
                from: t.from.as_str(),
                to: t.to.as_str(),
            })
            .inc();
        if t.is_failure() {
            self.failovers.inc();
        } else if t.from == HealthState::Failed && t.to == HealthState::Healthy {
            self.failbacks.inc();
        }
    }
}

#[derive(Debug, Default)]
struct HealthInner {
    has_client: bool,
    leading_since: Option<Instant>,
    /// Passes finished since this replica last started leading.
    passes: u64,
    last_pass: Option<Instant>,
}

/// What `/healthz` and `/readyz` answer from. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct ControllerHealth {
    inner: Arc<Mutex<HealthInner>>,
    stale_after: Duration,
}

impl ControllerHealth {
    /// A leader is unhealthy when no pass ended for `stale_after` (e.g. [`STALE_PASSES`] × the resync period; a
    /// leader passes at least once per resync period).
    pub fn new(stale_after: Duration) -> Self {
        Self {
            inner: Arc::default(),
            stale_after,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The process has a Kubernetes client (set once it is built).
    pub fn set_client(&self, has: bool) {
        self.lock().has_client = has;
    }

    pub fn set_leading(&self, leading: bool) {
        let mut g = self.lock();
        if leading {
            if g.leading_since.is_none() {
                g.leading_since = Some(Instant::now());
                g.passes = 0;
            }
        } else {
            g.leading_since = None;
        }
    }

    pub fn pass_done(&self) {
        let mut g = self.lock();
        g.passes += 1;
        g.last_pass = Some(Instant::now());
    }

    /// `Ok` while alive: a standby always; a leader while its loop finishes passes (the first within
    /// `stale_after` of taking the lease, then each within `stale_after` of the previous).
    pub fn liveness(&self) -> Result<(), String> {
        let g = self.lock();
        let Some(since) = g.leading_since else {
            return Ok(());
        };
        let reference = match g.last_pass {
            Some(p) if g.passes > 0 => p.max(since),
            _ => since,
        };
        let idle = reference.elapsed();
        if idle > self.stale_after {
            return Err(format!(
                "leading, but no pass finished for {}s (limit {}s)",
                idle.as_secs(),
                self.stale_after.as_secs()
            ));
        }
        Ok(())
    }

    /// `Ok` when the replica may count as available: it has a Kubernetes client, is alive, and is either a
    /// standby (standbys must be Ready, or a rollout of the Deployment stalls) or a leader with a finished pass.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.lock().has_client {
            return Err("no Kubernetes client yet".into());
        }
        self.liveness()?;
        let g = self.lock();
        if g.leading_since.is_some() && g.passes == 0 {
            return Err("leading; first pass not finished".into());
        }
        Ok(())
    }
}

/// Follows the controller's events and leadership into `metrics` and `health` until both senders are gone.
/// `events` must be the receiver of the sender given to [`crate::routed::run_routed_on_kube`], and `leading` of
/// the `KubeOptions::leading` sender.
pub async fn observe(
    metrics: ControllerMetrics,
    health: ControllerHealth,
    mut events: broadcast::Receiver<ControllerEvent>,
    mut leading: watch::Receiver<bool>,
) {
    let mut leading_open = true;
    let apply_leading = |v: bool| {
        metrics.set_leader(v);
        health.set_leading(v);
    };
    apply_leading(*leading.borrow_and_update());
    loop {
        tokio::select! {
            // Leadership first: it changes before the new leader's first event is sent.
            biased;
            r = leading.changed(), if leading_open => match r {
                Ok(()) => apply_leading(*leading.borrow_and_update()),
                Err(_) => {
                    leading_open = false;
                    apply_leading(false);
                }
            },
            ev = events.recv() => match ev {
                Ok(ControllerEvent::Pass(report)) => {
                    metrics.record_pass(&report);
                    health.pass_done();
                }
                Ok(ControllerEvent::Health(t)) => metrics.record_transition(&t),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "metrics: controller events lagged; counters undercount");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// The controller's HTTP endpoint: `/healthz`, `/readyz`, `/metrics`.
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
    registry: Arc<Registry>,
    health: ControllerHealth,
}

impl MetricsServer {
    pub async fn bind(
        addr: SocketAddr,
        registry: Arc<Registry>,
        health: ControllerHealth,
    ) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
            registry,
            health,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the future is dropped.
    pub async fn serve(self) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let ctx = Arc::new((self.registry, self.health));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match self.listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "health endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _ = handle(stream, &ctx.0, &ctx.1).await;
            });
        }
    }
}

/// The response to a request head: status, content type, body.
pub fn respond(
    head: &[u8],
    registry: &Registry,
    health: &ControllerHealth,
) -> (u16, String, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let plain = |code: u16, body: &str| (code, TEXT.to_string(), format!("{body}\n"));
    let Some(line) = std::str::from_utf8(head)
        .ok()
        .and_then(|t| t.split("\r\n").next())
    else {
        return plain(400, "bad request");
    };
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return plain(400, "bad request");
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return plain(400, "bad request");
    }
    if method != "GET" {
        return plain(405, "method not allowed");
    }
    let verdict = match target.split('?').next().unwrap_or(target) {
        "/healthz" => health.liveness(),
        "/readyz" => health.readiness(),
        "/metrics" => {
            let mut body = String::new();
            return match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => (200, METRICS_CONTENT_TYPE.to_string(), body),
                Err(_) => plain(500, "encoding metrics failed"),
            };
        }
        _ => return plain(404, "not found"),
    };
    match verdict {
        Ok(()) => plain(200, "ok"),
        Err(reason) => plain(503, &reason),
    }
}

async fn handle(
    mut stream: TcpStream,
    registry: &Registry,
    health: &ControllerHealth,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => b"BAD".to_vec(),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()), // too slow: drop
    };
    let (code, content_type, body) = respond(&head, registry, health);
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    };
    let msg = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\nCache-Control: no-store\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(msg.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads until the blank line ending the head; `None` if it does not come within [`MAX_REQUEST_HEAD`] bytes.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Some(buf));
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_leader_is_ready_after_its_first_pass_and_unhealthy_when_passes_stop() {
        let h = ControllerHealth::new(Duration::from_secs(60));
        assert_eq!(h.readiness(), Err("no Kubernetes client yet".into()));
        assert!(h.liveness().is_ok());
        h.set_client(true);
        // A standby is ready and alive.
        assert!(h.readiness().is_ok());
        h.set_leading(true);
        assert_eq!(
            h.readiness(),
            Err("leading; first pass not finished".into())
        );
        h.pass_done();
        assert!(h.readiness().is_ok());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(h.liveness().unwrap_err().contains("no pass finished"));
        assert!(h.readiness().is_err());
        h.pass_done();
        assert!(h.liveness().is_ok());
        // Stepping down: a standby again, whatever the loop did.
        tokio::time::advance(Duration::from_secs(120)).await;
        h.set_leading(false);
        assert!(h.liveness().is_ok() && h.readiness().is_ok());
        // Leading again: the first pass of this term counts, not the last one of the previous.
        h.set_leading(true);
        assert!(h.readiness().is_err());
    }

    #[test]
    fn requests_are_routed_by_method_and_path() {
        let mut registry = Registry::default();
        let m = ControllerMetrics::register(&mut registry);
        m.set_leader(true);
        let h = ControllerHealth::new(Duration::from_secs(60));
        let code = |head: &[u8]| respond(head, &registry, &h).0;
        assert_eq!(code(b"GET /healthz HTTP/1.1\r\n\r\n"), 200);
        assert_eq!(code(b"GET /readyz HTTP/1.1\r\n\r\n"), 503);
        assert_eq!(code(b"POST /healthz HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(code(b"GET /nope HTTP/1.1\r\n\r\n"), 404);
        assert_eq!(code(b"GET /healthz\r\n\r\n"), 400);
        let (c, ty, body) = respond(b"GET /metrics HTTP/1.1\r\n\r\n", &registry, &h);
        assert_eq!((c, ty.as_str()), (200, METRICS_CONTENT_TYPE));
        assert!(
            body.lines().any(|l| l == "underlay_controller_leader 1"),
            "{body}"
        );
        let build = format!(
            "underlay_build_info{{component=\"controller\",version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(body.lines().any(|l| l == build), "{body}");
    }
}
