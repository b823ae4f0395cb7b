//! The run loop: decides when to run a pass; every decision about what to do lives in the reconcilers.
//!
//! ```text
//!   node set (watch) ──────┐
//!   health transitions ────┤      ┌─► SrcDstReconciler::reconcile
//!   resync tick (30 s) ────┼─► pass ─► RouteReconciler::reconcile ─► probe targets (watch) ─► HealthProber
//!   retry after backoff ───┤
//!   deferred route calls ──┘      └─► ControllerEvent::Pass (broadcast)
//! ```
//!
//! Triggers arriving while a pass runs coalesce into one next pass, at the highest priority asked. A pass that
//! stopped on a retryable error is retried after a backoff (doubling from `backoff_min` to `backoff_max`); other
//! triggers wait for it, except a failover, which runs at once. A pass that left route calls for later
//! ([`RoutedConfig::max_ops_per_pass`](crate::RoutedConfig::max_ops_per_pass)) is followed at once by another, once
//! the triggers that arrived meanwhile are taken in.

use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use underlay_core::health::{HealthTracker, Transition};

use crate::config::ProbeTransport;
use crate::config::{ClusterNode, ControllerConfig};
use crate::lanes::{CloudLanes, Priority};
use crate::probe::{HealthProber, HttpProber, Prober, UdpProber, probe_targets};
use crate::routes::{ReconcileReport, RouteReconciler};
use crate::srcdst::{SrcDstReconciler, SrcDstReport};

/// One pass of both reconcilers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PassReport {
    pub routes: ReconcileReport,
    pub srcdst: SrcDstReport,
    /// A resync pass: subnets and ENIs described again.
    pub full: bool,
}

impl PassReport {
    pub fn retryable(&self) -> bool {
        self.routes.retryable || self.srcdst.retryable
    }
}

/// What the controller tells observers (tests, metrics, events).
#[derive(Debug, Clone)]
pub enum ControllerEvent {
    Pass(Arc<PassReport>),
    Health(Transition),
}

/// Track every current node: nodes seen at start-up as healthy, later ones as pending; forget nodes that left.
pub fn sync_membership(tracker: &Mutex<HealthTracker>, nodes: &[ClusterNode], at_start: bool) {
    let mut t = tracker.lock().unwrap_or_else(|e| e.into_inner());
    t.retain(nodes.iter().map(|n| n.name.as_str()));
    for n in nodes {
        if at_start {
            t.insert_healthy(&n.name);
        } else {
            t.insert_pending(&n.name);
        }
    }
}

/// The routed-mode controller (without Kubernetes: the node set is given through a watch channel).
#[derive(Debug)]
pub struct Controller {
    config: ControllerConfig,
    routes: RouteReconciler,
    srcdst: SrcDstReconciler,
    tracker: Arc<Mutex<HealthTracker>>,
    prober: Arc<dyn Prober>,
    events: broadcast::Sender<ControllerEvent>,
}

impl Controller {
    /// A controller issuing EC2 calls through `lanes` and probing as `config.probe.transport` says
    /// ([`UdpProber`] by default, or [`HttpProber`]).
    pub fn new(config: ControllerConfig, lanes: Arc<dyn CloudLanes>) -> Self {
        let timeout = config.probe.timeout.min(config.probe.interval);
        let prober: Arc<dyn Prober> = match config.probe.transport {
            ProbeTransport::Udp => Arc::new(UdpProber::new(timeout)),
            ProbeTransport::Http => Arc::new(HttpProber {
                path: config.probe.path.clone(),
                timeout,
            }),
        };
        Self {
            routes: RouteReconciler::new(config.routed.clone(), lanes.clone()),
            srcdst: SrcDstReconciler::new(lanes),
            tracker: Arc::new(Mutex::new(HealthTracker::new(config.health))),
            prober,
            events: broadcast::channel(1024).0,
            config,
        }
    }

    /// Probe with another [`Prober`] (tests, the lab).
    pub fn with_prober(mut self, prober: Arc<dyn Prober>) -> Self {
        self.prober = prober;
        self
    }

    pub fn tracker(&self) -> Arc<Mutex<HealthTracker>> {
        self.tracker.clone()
    }

    pub fn routes(&mut self) -> &mut RouteReconciler {
        &mut self.routes
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ControllerEvent> {
        self.events.subscribe()
    }

    /// One pass of both reconcilers. A failover pass moves routes first; others turn source/dest check off first
    /// (so a new node forwards as soon as its route exists).
    pub async fn pass(
        &mut self,
        nodes: &[ClusterNode],
        priority: Priority,
        full: bool,
    ) -> PassReport {
        if full {
            self.routes.invalidate_subnets();
            self.srcdst.forget();
        }
        let healthy = self
            .tracker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .healthy();
        let (routes, srcdst) = if priority == Priority::Failover {
            let r = self.routes.reconcile(nodes, &healthy, priority).await;
            (r, self.srcdst.reconcile(nodes).await)
        } else {
            let s = self.srcdst.reconcile(nodes).await;
            (self.routes.reconcile(nodes, &healthy, priority).await, s)
        };
        for e in &routes.errors {
            tracing::warn!(error = %e, retryable = e.is_retryable(), kind = e.metric_label(), "route pass error");
        }
        PassReport {
            routes,
            srcdst,
            full,
        }
    }

    /// Run until `shutdown` turns true or either channel's sender is dropped.
    pub async fn run(
        mut self,
        mut nodes: watch::Receiver<Vec<ClusterNode>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let (transitions_tx, mut transitions) = mpsc::channel::<Transition>(256);
        let (targets_tx, targets_rx) = watch::channel(Vec::new());
        let port = self.config.probe.port;

        let mut current = nodes.borrow_and_update().clone();
        sync_membership(&self.tracker, &current, true);
        targets_tx.send_replace(probe_targets(
            None,
            &current,
            &self.tracker.lock().unwrap_or_else(|e| e.into_inner()),
            port,
        ));
        let prober = HealthProber::new(
            self.config.probe.interval,
            self.prober.clone(),
            self.tracker.clone(),
        );
        let prober_task = tokio::spawn(prober.run(targets_rx, transitions_tx, shutdown.clone()));

        let mut want: Option<Priority> = Some(Priority::Normal);
        let mut full = true;
        let mut retry: Option<(Instant, Priority)> = None;
        let mut backoff = self.config.backoff_min;
        let mut more = false;
        let mut resync =
            tokio::time::interval_at(Instant::now() + self.config.resync, self.config.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            if let Some(p) = want
                && (retry.is_none() || p == Priority::Failover)
            {
                want = None;
                retry = None;
                more = false;
                let started = Instant::now();
                let report = self.pass(&current, p, full).await;
                tracing::debug!(
                    nodes = current.len(),
                    priority = p.as_str(),
                    full,
                    applied = report.routes.applied.len(),
                    deferred = report.routes.deferred.len(),
                    routed = report.routes.routed_nodes().map(|r| r.len()),
                    ms = started.elapsed().as_millis() as u64,
                    "pass done"
                );
                full = false;
                let targets = probe_targets(
                    self.routes.previous(),
                    &current,
                    &self.tracker.lock().unwrap_or_else(|e| e.into_inner()),
                    port,
                );
                targets_tx.send_replace(targets);
                if report.retryable() {
                    retry = Some((Instant::now() + backoff, p));
                    backoff = (backoff * 2).min(self.config.backoff_max);
                } else {
                    backoff = self.config.backoff_min;
                    // The rest of the diff: another pass at once (the queue paces the calls), but only after the
                    // other triggers are looked at, so nodes that joined meanwhile are planned in it. A failover
                    // that planned from the cached observation is followed at once by a pass that describes.
                    more = !report.routes.deferred.is_empty() || report.routes.observed_from_cache;
                }
                let _ = self.events.send(ControllerEvent::Pass(Arc::new(report)));
            }
            let retry_at = retry.map(|(at, _)| at);
            tokio::select! {
                biased;
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                Some(t) = transitions.recv() => {
                    let p = if t.is_failure() { Priority::Failover } else { Priority::Normal };
                    want = want.max(Some(p));
                    let _ = self.events.send(ControllerEvent::Health(t));
                }
                r = nodes.changed() => {
                    if r.is_err() {
                        break;
                    }
                    current = nodes.borrow_and_update().clone();
                    sync_membership(&self.tracker, &current, false);
                    want = want.max(Some(Priority::Normal));
                }
                _ = resync.tick() => {
                    full = true;
                    want = want.max(Some(Priority::Normal));
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    let p = retry.map(|(_, p)| p).unwrap_or_default();
                    retry = None;
                    want = want.max(Some(p));
                }
                () = tokio::task::yield_now(), if more && retry.is_none() => {
                    more = false;
                    want = want.max(Some(Priority::Normal));
                }
            }
            // Every trigger already waiting joins the next pass: a prober round's transitions arrive together, and
            // taking one per pass would queue a pass per node ahead of the node set (minutes behind a rate limit).
            while let Ok(t) = transitions.try_recv() {
                let p = if t.is_failure() {
                    Priority::Failover
                } else {
                    Priority::Normal
                };
                want = want.max(Some(p));
                let _ = self.events.send(ControllerEvent::Health(t));
            }
            if nodes.has_changed().unwrap_or(false) {
                current = nodes.borrow_and_update().clone();
                sync_membership(&self.tracker, &current, false);
                want = want.max(Some(Priority::Normal));
            }
        }
        prober_task.abort();
        let _ = prober_task.await;
    }
}
