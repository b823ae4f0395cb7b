//! The leader lease of both modes: a coordination.k8s.io/v1 Lease held by one replica, and [`lead`], the loop that
//! campaigns for it and runs the leader's work while it is held.
//!
//! ```text
//!            Lease underlay-controller (coordination.k8s.io/v1)
//!   campaign ──acquired──► lead: spawn work(stop) ──── renew every `renew_every`
//!      ▲                          │
//!      └──── lost (another holder, or no renewal for `lease_duration`): stop, abort the work at once
//! ```
//!
//! Only the lease holder writes (UnderlayNodes, Nodes, Events, EC2): the leader's work runs in one task that is
//! aborted the moment the lease is lost, so a write in flight is dropped with it.

use std::future::Future;
use std::time::Duration;

use ::kube::api::{Api, PostParams};
use ::kube::{Client, ResourceExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use tokio::time::Instant;
use underlay_core::names;

use crate::objects::is_conflict;
use crate::selector::NodeSelector;

/// Default lease duration: a new leader takes over this long after the last renewal it saw.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// Default renewal period (and campaign retry period) of the lease.
pub const DEFAULT_RENEW_EVERY: Duration = Duration::from_secs(5);
/// Default retry period of a failed API or EC2 call of the leader (describe, UnderlayNode, taint, status).
pub const DEFAULT_RETRY_EVERY: Duration = Duration::from_secs(2);
/// Default namespace of the leader Lease.
pub const DEFAULT_LEASE_NAMESPACE: &str = "kube-system";

/// How this replica campaigns and leads.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// Holder identity written into the Lease (unique per replica: the pod name).
    pub identity: String,
    pub lease_namespace: String,
    /// Written as the Lease's `leaseDurationSeconds` (rounded up to whole seconds); a leader that could not
    /// renew for this long stops.
    pub lease_duration: Duration,
    /// Renewal period while leading, and campaign retry period otherwise. Must be shorter than `lease_duration`.
    pub renew_every: Duration,
    /// Retry period of a failed API or EC2 call while leading.
    pub retry_every: Duration,
    /// Told `true` when this replica starts leading and `false` once its work has stopped (after losing the
    /// lease or at shutdown). For observers: health endpoints, metrics, tests.
    pub leading: Option<watch::Sender<bool>>,
    /// `eni` mode: counts the leader's completed passes (each runs the reconciler over complete watch caches),
    /// for the readiness endpoint. Routed mode reports its passes as `ControllerEvent::Pass` instead.
    pub passes: Option<watch::Sender<u64>>,
    /// The Nodes this controller manages (`--node-selector`); the rest get no UnderlayNode, taint, podCIDR,
    /// route or ENI. Default: every Node.
    pub node_selector: NodeSelector,
}

impl Default for KubeOptions {
    fn default() -> Self {
        let identity = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| {
                format!("{}-{}", names::FIELD_MANAGER_CONTROLLER, std::process::id())
            });
        Self {
            identity,
            lease_namespace: DEFAULT_LEASE_NAMESPACE.to_string(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_every: DEFAULT_RENEW_EVERY,
            retry_every: DEFAULT_RETRY_EVERY,
            leading: None,
            passes: None,
            node_selector: NodeSelector::all(),
        }
    }
}

/// Why [`run_routed_on_kube`] returned early.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("invalid options: {0}")]
    Options(String),
    #[error("kubernetes API: {0}")]
    Api(#[from] ::kube::Error),
}

pub(crate) fn check_lease_timing(opts: &KubeOptions) -> Result<(), KubeError> {
    if opts.renew_every.is_zero() || opts.renew_every >= opts.lease_duration {
        return Err(KubeError::Options(format!(
            "renew_every ({:?}) must be non-zero and shorter than lease_duration ({:?})",
            opts.renew_every, opts.lease_duration
        )));
    }
    Ok(())
}

/// The lease loop of both modes: campaign for the lease; while holding it, run the leader's work — one task per
/// term, made by `work` from a receiver told `true` when the term ends — and renew every `renew_every`. The term
/// ends when the lease is lost (another holder, or no renewal for `lease_duration`), when the work task ends on
/// its own, or at shutdown; the task is aborted at once, so a write in flight is dropped with it and only the
/// lease holder writes. Returns when `shutdown` turns true (releasing the lease if held) or its sender is dropped.
/// `opts.leading` is told `true` when a term starts and `false` once its work has stopped.
pub(crate) async fn lead<W, F>(
    client: &Client,
    opts: &KubeOptions,
    mode: &'static str,
    mut shutdown: watch::Receiver<bool>,
    mut work: W,
) -> Result<(), KubeError>
where
    W: FnMut(watch::Receiver<bool>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    check_lease_timing(opts)?;
    if opts.identity.is_empty() {
        return Err(KubeError::Options("identity must be non-empty".to_string()));
    }
    let set_leading = |v: bool| {
        if let Some(tx) = &opts.leading {
            tx.send_replace(v);
        }
    };
    let mut elector = Elector::new(
        Api::namespaced(client.clone(), &opts.lease_namespace),
        opts.identity.clone(),
        opts.lease_duration,
    );
    loop {
        // Campaign.
        let mut acquired_at;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            acquired_at = Instant::now();
            match tokio::time::timeout(opts.renew_every, elector.try_acquire_or_renew()).await {
                Ok(Ok(LeaseState::Held)) => break,
                Ok(Ok(LeaseState::Other(holder))) => {
                    tracing::debug!(identity = %opts.identity, %holder, "lease held by another replica");
                }
                Ok(Ok(LeaseState::Conflict)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "campaigning for the lease"),
                Err(_) => tracing::warn!("campaigning for the lease: request timed out"),
            }
            tokio::select! {
                _ = tokio::time::sleep(opts.renew_every) => {}
                r = shutdown.changed() => if r.is_err() { return Ok(()); },
            }
        }

        // Lead.
        tracing::info!(identity = %opts.identity, lease = names::LEADER_LEASE, mode, "leading");
        set_leading(true);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut task = tokio::spawn(work(stop_rx));
        let mut last_renewed = acquired_at;
        let mut next_renew = Instant::now() + opts.renew_every;
        let shutting_down = loop {
            let deadline = last_renewed + opts.lease_duration;
            tokio::select! {
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { break true; },
                r = &mut task => {
                    tracing::error!(result = ?r, "leader task ended on its own; stepping down");
                    break false;
                }
                _ = tokio::time::sleep_until(next_renew.min(deadline)) => {
                    if Instant::now() >= deadline {
                        tracing::warn!("lease not renewed within its duration; stepping down");
                        break false;
                    }
                    let started = Instant::now();
                    let limit = (started + opts.renew_every).min(deadline);
                    match tokio::time::timeout_at(limit, elector.try_acquire_or_renew()).await {
                        Ok(Ok(LeaseState::Held)) => {
                            last_renewed = started;
                            next_renew = started + opts.renew_every;
                        }
                        Ok(Ok(LeaseState::Other(holder))) => {
                            tracing::warn!(%holder, "lease taken by another replica; stepping down");
                            break false;
                        }
                        Ok(Ok(LeaseState::Conflict)) => next_renew = Instant::now() + opts.renew_every / 10,
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "renewing the lease");
                            next_renew = Instant::now() + opts.renew_every / 4;
                        }
                        Err(_) => {
                            tracing::warn!("renewing the lease: request timed out");
                            next_renew = Instant::now();
                        }
                    }
                }
            }
        };
        // Stop writing at once: the leader's work and every write in flight are dropped with its task.
        let _ = stop_tx.send(true);
        task.abort();
        let _ = (&mut task).await;
        set_leading(false);
        tracing::info!(identity = %opts.identity, mode, "stopped leading");
        if shutting_down {
            if let Err(e) = elector.release().await {
                tracing::warn!(error = %e, "releasing the lease");
            }
            return Ok(());
        }
    }
}

// ───────────────────────────────────────── leader election ─────────────────────────────────────────

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LeaseState {
    /// This replica holds the lease (acquired or renewed just now).
    Held,
    /// Another replica holds an unexpired lease.
    Other(String),
    /// A write lost a race (409): read again.
    Conflict,
}

/// A coordination.k8s.io/v1 Lease as a lock. Expiry is judged by local observation, as client-go does: a lease
/// whose record (holder, renew time, resourceVersion) has not changed for its duration, as seen from here, is
/// free. No clock comparison across machines.
#[derive(Debug)]
pub(crate) struct Elector {
    api: Api<Lease>,
    identity: String,
    duration: Duration,
    observed: Option<(String, Instant)>,
}

impl Elector {
    pub(crate) fn new(api: Api<Lease>, identity: String, duration: Duration) -> Self {
        Self {
            api,
            identity,
            duration,
            observed: None,
        }
    }

    fn seconds(&self) -> i32 {
        i32::try_from(self.duration.as_millis().div_ceil(1000))
            .unwrap_or(i32::MAX)
            .max(1)
    }

    fn record_key(lease: &Lease) -> String {
        let spec = lease.spec.clone().unwrap_or_default();
        format!(
            "{}|{:?}|{}",
            spec.holder_identity.unwrap_or_default(),
            spec.renew_time.map(|t| t.0),
            lease.resource_version().unwrap_or_default()
        )
    }

    fn observe(&mut self, lease: &Lease) -> Instant {
        let key = Self::record_key(lease);
        match &self.observed {
            Some((k, at)) if *k == key => *at,
            _ => {
                let now = Instant::now();
                self.observed = Some((key, now));
                now
            }
        }
    }

    pub(crate) async fn try_acquire_or_renew(&mut self) -> Result<LeaseState, ::kube::Error> {
        let now = MicroTime(Timestamp::now());
        let pp = PostParams {
            field_manager: Some(names::FIELD_MANAGER_CONTROLLER.to_string()),
            ..Default::default()
        };
        let Some(mut lease) = self.api.get_opt(names::LEADER_LEASE).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(names::LEADER_LEASE.to_string()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&pp, &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(LeaseState::Held)
                }
                Err(e) if is_conflict(&e) => Ok(LeaseState::Conflict),
                Err(::kube::Error::Api(s)) if s.is_already_exists() => Ok(LeaseState::Conflict),
                Err(e) => Err(e),
            };
        };
        let seen_at = self.observe(&lease);
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.identity;
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.duration);
        if !mine && !holder.is_empty() && seen_at.elapsed() < duration {
            return Ok(LeaseState::Other(holder));
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.seconds()),
            acquire_time: if mine {
                spec.acquire_time.clone()
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if mine { transitions } else { transitions + 1 }),
            ..spec
        });
        // `lease` carries the resourceVersion read above: a concurrent writer makes this a 409.
        match self.api.replace(names::LEADER_LEASE, &pp, &lease).await {
            Ok(updated) => {
                self.observe(&updated);
                Ok(LeaseState::Held)
            }
            Err(e) if is_conflict(&e) => Ok(LeaseState::Conflict),
            Err(e) => Err(e),
        }
    }

    /// Give the lease up (holder cleared) so another replica takes over without waiting for expiry.
    pub(crate) async fn release(&mut self) -> Result<(), ::kube::Error> {
        let Some(mut lease) = self.api.get_opt(names::LEADER_LEASE).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        let pp = PostParams {
            field_manager: Some(names::FIELD_MANAGER_CONTROLLER.to_string()),
            ..Default::default()
        };
        match self.api.replace(names::LEADER_LEASE, &pp, &lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
