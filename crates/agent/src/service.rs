//! The IPAM service: the allocator and its checkpoint behind one lock, answering schema messages.
//!
//! Every request takes the lock, changes the allocator, writes the checkpoint, and only then builds the
//! reply, so concurrent ADDs serialize and nothing is acknowledged that is not on disk. If the checkpoint
//! write fails, the in-memory state is reloaded from the last checkpoint (what the disk says is the truth)
//! and the caller gets a retryable internal error.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use underlay_core::ipam::{self, Ipam, IpamError, PodInfo, PoolSpec};
use underlay_ipam_api::{self as api, ErrorCode, POD_GATEWAY, pb};

use crate::AgentError;
use crate::checkpoint::Checkpoint;
use crate::metrics::AgentMetrics;
use crate::policy::{PolicyEngine, PolicyError};
use crate::reaper::LinkReaper;

/// Test-only fault injection, chosen by `underlay agent` from [`underlay_core::names::AGENT_FAULT_ENV`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// Exit the process right after a change is checkpointed and before its reply is sent: what a crash
    /// (kill -9) in that window looks like to the caller.
    ExitAfterCheckpoint,
}

/// Exit status of the process when [`Fault::ExitAfterCheckpoint`] fires.
pub const FAULT_EXIT_CODE: i32 = 86;

impl std::str::FromStr for Fault {
    type Err = AgentError;
    fn from_str(s: &str) -> Result<Fault, AgentError> {
        match s {
            "" | "none" => Ok(Fault::None),
            "exit-after-checkpoint" => Ok(Fault::ExitAfterCheckpoint),
            other => Err(AgentError::Config(format!(
                "unknown fault {other:?} (known: none, exit-after-checkpoint)"
            ))),
        }
    }
}

type Clock = Box<dyn Fn() -> SystemTime + Send + Sync>;

struct Inner {
    ipam: Ipam,
    checkpoint: Checkpoint,
    /// `eni` mode: the withdrawals the pool served now leaves out (see [`IpamService::update_pool`]).
    release: Option<ReleaseEpoch>,
}

/// Which withdrawals of the controller an `eni`-mode pool leaves out: the `UnderlayNode` it came from (its
/// uid: a recreated object starts its generations again) and that record's `pool.releaseGeneration`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseEpoch {
    pub record_uid: String,
    pub generation: u64,
}

/// What an `eni`-mode agent reports so that the controller can release addresses: every address it holds, and
/// the withdrawals the pool it serves already leaves out. Both read under one lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldReport {
    /// Allocated or cooling down, sorted.
    pub held: Vec<std::net::Ipv4Addr>,
    /// The part of `held` cooling down, sorted.
    pub cooling: Vec<std::net::Ipv4Addr>,
    pub release: Option<ReleaseEpoch>,
}

/// The service the socket servers call.
pub struct IpamService {
    inner: Mutex<Inner>,
    mtu: u32,
    fault: Fault,
    clock: Clock,
    /// Deletes the veths DEL hands over; absent until [`IpamService::set_reaper`] (then DEL deletes its own).
    reaper: OnceLock<LinkReaper>,
    /// Where requests and pool figures are reported; absent until [`IpamService::set_metrics`].
    metrics: OnceLock<AgentMetrics>,
    /// Why the checkpoint was rebuilt from the kernel at start, if it was (reported once metrics attach).
    rebuilt: OnceLock<String>,
    /// Network policy: Allocate returns only once the pod's policy state is in the kernel; absent until
    /// [`IpamService::set_policy`] (no policy enforced).
    policy: OnceLock<Arc<PolicyEngine>>,
}

impl std::fmt::Debug for IpamService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpamService")
            .field("mtu", &self.mtu)
            .field("fault", &self.fault)
            .finish_non_exhaustive()
    }
}

impl IpamService {
    /// Loads the checkpoint (refusing a corrupt one) and restores the allocator over `spec`.
    pub fn open(
        spec: PoolSpec,
        cooldown: Duration,
        checkpoint: Checkpoint,
        mtu: u32,
        fault: Fault,
    ) -> Result<IpamService, AgentError> {
        let ipam = load_ipam(&spec, cooldown, &checkpoint)?;
        Ok(IpamService {
            inner: Mutex::new(Inner {
                ipam,
                checkpoint,
                release: None,
            }),
            mtu,
            fault,
            clock: Box::new(SystemTime::now),
            reaper: OnceLock::new(),
            metrics: OnceLock::new(),
            rebuilt: OnceLock::new(),
            policy: OnceLock::new(),
        })
    }

    /// Attaches the link reaper: from now on Release takes the veth it names, and GC sweeps orphaned veths.
    pub fn set_reaper(&self, reaper: LinkReaper) {
        if self.reaper.set(reaper).is_err() {
            tracing::warn!("a link reaper is already attached; ignoring the second");
        }
    }

    /// Reports requests and pool figures to `metrics` from now on (the pool gauges at once, and a checkpoint
    /// rebuild at start).
    pub fn set_metrics(&self, metrics: AgentMetrics) {
        if self.rebuilt.get().is_some() {
            metrics.record_checkpoint_rebuild();
        }
        if self.metrics.set(metrics).is_err() {
            tracing::warn!("metrics are already attached; ignoring the second");
        }
        self.report_pool();
    }

    /// Records that the state was rebuilt from the kernel because the checkpoint was corrupt (`reason`).
    pub fn note_rebuilt(&self, reason: String) {
        let _ = self.rebuilt.set(reason);
    }

    /// Why the checkpoint was rebuilt at start, if it was (for an Event and /metrics).
    pub fn rebuilt(&self) -> Option<&str> {
        self.rebuilt.get().map(String::as_str)
    }

    fn report_pool(&self) {
        if let Some(m) = self.metrics.get() {
            let g = self.lock();
            m.set_pool(g.ipam.capacity(), g.ipam.allocations().count());
        }
    }

    /// Enforces network policy from now on: the engine learns every live attachment (applied at once if its
    /// inputs are in, else with its first inputs), and each Allocate waits for the pod's policy state (see
    /// `crate::policy`).
    pub fn set_policy(&self, engine: Arc<PolicyEngine>) {
        let g = self.lock();
        engine.restore(g.ipam.allocations().map(|a| {
            (
                (a.key.container_id.clone(), a.key.ifname.clone()),
                local_pod(a),
            )
        }));
        drop(g);
        // Inputs may have arrived before the service opened: bring the restored pods' state in now rather
        // than at the next input change (until then their veths would have no verdict of their own).
        if let Err(e) = engine.resync() {
            tracing::warn!(error = %e, "policy state of the restored pods not committed yet; retried at the next change");
        }
        if self.policy.set(engine).is_err() {
            tracing::warn!("a policy engine is already attached; ignoring the second");
        }
    }

    /// Queues a sweep of host veths no allocation owns (no-op without a reaper).
    pub fn sweep_links(&self) {
        if let Some(r) = self.reaper.get() {
            r.sweep();
        }
    }

    /// The host veth names of every live allocation.
    pub fn owned_veth_names(&self) -> HashSet<String> {
        self.lock()
            .ipam
            .allocations()
            .map(|a| match crate::rebuild::rebuilt_veth(&a.key) {
                Some(veth) => veth.to_string(),
                None => {
                    underlay_core::veth_names::host_veth_name(&a.key.container_id, &a.key.ifname)
                }
            })
            .collect()
    }

    /// Every allocation with the sandbox it was made for (netns path, host veth), for the reclaimer.
    pub fn sandboxes(&self) -> Vec<crate::reclaim::Sandbox> {
        self.lock()
            .ipam
            .allocations()
            .map(|a| crate::reclaim::Sandbox {
                key: a.key.clone(),
                netns: a.pod.netns.clone(),
                veth: match crate::rebuild::rebuilt_veth(&a.key) {
                    Some(v) => v.to_string(),
                    None => underlay_core::veth_names::host_veth_name(
                        &a.key.container_id,
                        &a.key.ifname,
                    ),
                },
            })
            .collect()
    }

    /// Releases `keys` (their sandbox is gone, so no DEL will come), checkpointed; counted as releases with
    /// reason `reclaim`. Returns how many were released.
    pub fn reclaim(&self, keys: &[ipam::AttachmentKey]) -> usize {
        let now = (self.clock)();
        let mut g = self.lock();
        let released: Vec<ipam::Allocation> =
            keys.iter().filter_map(|k| g.ipam.release(k, now)).collect();
        if let Err(e) = self.commit(&mut g, !released.is_empty()) {
            tracing::warn!(error = ?e, "reclaim: checkpoint write failed; retried next pass");
            return 0;
        }
        drop(g);
        for a in &released {
            tracing::warn!(key = %a.key, address = %a.address, pod_namespace = %a.pod.pod_namespace, pod_name = %a.pod.pod_name, netns = %a.pod.netns, "reclaimed: the pod's sandbox is gone and no DEL came");
        }
        if let Some(m) = self.metrics.get() {
            m.record_releases("reclaim", released.len());
        }
        self.report_pool();
        released.len()
    }

    /// Replaces the wall clock (tests).
    pub fn with_clock(mut self, clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        self.clock = Box::new(clock);
        self
    }

    /// Number of live allocations.
    pub fn allocated(&self) -> usize {
        self.lock().ipam.allocations().count()
    }

    /// Serves `spec` from now on instead of the current pool, but only while no address is allocated (a live
    /// pod's address must stay in the pool). Cooling addresses of the old pool are forgotten. The empty state is
    /// checkpointed before the swap takes effect.
    pub fn replace_pool(&self, spec: PoolSpec) -> Result<(), AgentError> {
        let mut g = self.lock();
        let allocated = g.ipam.allocations().count();
        if allocated > 0 {
            return Err(AgentError::Config(format!(
                "cannot replace {} with {spec}: {allocated} address(es) allocated",
                g.ipam.spec()
            )));
        }
        let ipam =
            Ipam::new(spec, g.ipam.cooldown()).map_err(|e| AgentError::Config(e.to_string()))?;
        g.checkpoint.save(&ipam.snapshot())?;
        g.ipam = ipam;
        drop(g);
        self.report_pool();
        Ok(())
    }

    /// `eni` mode: serves `spec` from now on, keeping every allocation (an allocated address the new pool no
    /// longer lists stays with its pod and is never handed out again) and every cooling address. `release` says
    /// which withdrawals `spec` already leaves out; it is recorded only once `spec` is served. Returns false
    /// when `spec` is the pool already served. The new state is checkpointed before it takes effect.
    pub fn update_pool(
        &self,
        spec: PoolSpec,
        release: Option<ReleaseEpoch>,
    ) -> Result<bool, AgentError> {
        let mut g = self.lock();
        if g.ipam.spec() == &spec {
            g.release = release;
            return Ok(false);
        }
        let ipam = Ipam::restore(spec, g.ipam.cooldown(), g.ipam.snapshot())
            .map_err(|e| AgentError::Config(e.to_string()))?;
        g.checkpoint.save(&ipam.snapshot())?;
        g.ipam = ipam;
        g.release = release;
        drop(g);
        self.report_pool();
        Ok(true)
    }

    /// `eni` mode: the addresses held and the withdrawals already left out; `None` for a block pool.
    pub fn held_report(&self) -> Option<HeldReport> {
        let now = (self.clock)();
        let g = self.lock();
        if !matches!(g.ipam.spec(), PoolSpec::Addresses(_)) {
            return None;
        }
        let cooling: BTreeSet<std::net::Ipv4Addr> =
            g.ipam.cooling_at(now).map(|(a, _)| a).collect();
        let held: BTreeSet<std::net::Ipv4Addr> = g
            .ipam
            .allocations()
            .map(|a| a.address)
            .chain(cooling.iter().copied())
            .collect();
        Some(HeldReport {
            held: held.into_iter().collect(),
            cooling: cooling.into_iter().collect(),
            release: g.release.clone(),
        })
    }

    /// Number of addresses in the pool served.
    pub fn capacity(&self) -> usize {
        self.lock().ipam.capacity()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the allocator possibly half-changed; the checkpoint is
        // still consistent, so reload from it rather than propagate the poison.
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => {
                let mut g = poisoned.into_inner();
                let spec = g.ipam.spec().clone();
                let cooldown = g.ipam.cooldown();
                if let Ok(ipam) = load_ipam(&spec, cooldown, &g.checkpoint) {
                    g.ipam = ipam;
                }
                self.inner.clear_poison();
                g
            }
        }
    }

    /// Answers one request.
    pub fn handle(&self, req: pb::Request) -> pb::Reply {
        use pb::reply::Method as R;
        use pb::request::Method as Q;
        let started = std::time::Instant::now();
        let name = match &req.method {
            Some(Q::Allocate(_)) => "allocate",
            Some(Q::Release(_)) => "release",
            Some(Q::List(_)) => "list",
            Some(Q::Gc(_)) => "gc",
            None => "invalid",
        };
        let method = match req.method {
            Some(Q::Allocate(r)) => R::Allocate(self.allocate(r)),
            Some(Q::Release(r)) => R::Release(self.release(r)),
            Some(Q::List(_)) => R::List(self.list()),
            Some(Q::Gc(r)) => R::Gc(self.gc(r)),
            None => R::Allocate(pb::AllocateReply {
                result: Some(pb::allocate_reply::Result::Error(wire_error(
                    ErrorCode::InvalidRequest,
                    "request without a method (client newer than this agent?)".into(),
                    false,
                ))),
            }),
        };
        if let Some(m) = self.metrics.get() {
            let error = match &method {
                R::Allocate(r) => match &r.result {
                    Some(pb::allocate_reply::Result::Error(e)) => Some(e),
                    _ => None,
                },
                R::Release(r) => r.error.as_ref(),
                R::List(r) => r.error.as_ref(),
                R::Gc(r) => r.error.as_ref(),
            };
            m.record_request(
                name,
                error.map_or("ok", error_label),
                started.elapsed().as_secs_f64(),
            );
            if name != "list" {
                self.report_pool();
            }
        }
        pb::Reply {
            method: Some(method),
        }
    }

    pub fn allocate(&self, req: pb::AllocateRequest) -> pb::AllocateReply {
        use pb::allocate_reply::Result as Res;
        let Some(key) = req.key.map(from_wire_key) else {
            return pb::AllocateReply {
                result: Some(Res::Error(wire_error(
                    ErrorCode::InvalidRequest,
                    "allocate: missing attachment key".into(),
                    false,
                ))),
            };
        };
        let pod = PodInfo {
            netns: req.netns,
            pod_namespace: req.pod_namespace,
            pod_name: req.pod_name,
        };
        if let Some(policy) = self.policy.get()
            && let Err(e) = policy.ready_for(&pod.pod_namespace, &pod.pod_name)
        {
            tracing::info!(key = %key, error = %e, "allocate deferred: network policy not ready");
            return pb::AllocateReply {
                result: Some(Res::Error(policy_error(&e))),
            };
        }
        let now = (self.clock)();
        let mut g = self.lock();
        let result = match g.ipam.allocate(&key, pod, now) {
            Ok((alloc, changed)) => match self.commit(&mut g, changed) {
                Ok(()) => {
                    if changed {
                        if let Some(m) = self.metrics.get() {
                            m.record_allocation();
                        }
                        tracing::info!(key = %key, address = %alloc.address, pod_namespace = %alloc.pod.pod_namespace, pod_name = %alloc.pod.pod_name, "allocated");
                    } else {
                        tracing::debug!(key = %key, address = %alloc.address, "allocate repeated: same address");
                    }
                    Res::Allocation(self.to_wire(&alloc))
                }
                Err(e) => Res::Error(e),
            },
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "allocate refused");
                Res::Error(ipam_error(&e))
            }
        };
        drop(g);
        let result = match (result, self.policy.get()) {
            (Res::Allocation(a), Some(policy)) => self.admit(policy, &key, a),
            (other, _) => other,
        };
        pb::AllocateReply {
            result: Some(result),
        }
    }

    /// Commits the new pod's policy state before its allocation is returned; on failure the address goes back
    /// (a retried ADD allocates again), so no pod runs without its policy.
    fn admit(
        &self,
        policy: &PolicyEngine,
        key: &ipam::AttachmentKey,
        a: pb::Allocation,
    ) -> pb::allocate_reply::Result {
        use pb::allocate_reply::Result as Res;
        let ip = match a.address.parse::<Ipv4Net>() {
            Ok(n) => n.addr(),
            Err(e) => {
                return Res::Error(wire_error(ErrorCode::Internal, e.to_string(), false));
            }
        };
        let pod = underlay_core::policy::LocalPod {
            namespace: a.pod_namespace.clone(),
            name: a.pod_name.clone(),
            ifname: underlay_core::veth_names::host_veth_name(&key.container_id, &key.ifname),
            ip,
        };
        match policy.admit((key.container_id.clone(), key.ifname.clone()), pod) {
            Ok(()) => Res::Allocation(a),
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "network policy not committed; allocation undone");
                let now = (self.clock)();
                let mut g = self.lock();
                let released = g.ipam.release(key, now);
                if let Err(ce) = self.commit(&mut g, released.is_some()) {
                    tracing::warn!(key = %key, error = ?ce, "undoing the allocation failed");
                }
                Res::Error(policy_error(&e))
            }
        }
    }

    pub fn release(&self, req: pb::ReleaseRequest) -> pb::ReleaseReply {
        let Some(key) = req.key.map(from_wire_key) else {
            return pb::ReleaseReply {
                released: None,
                error: Some(wire_error(
                    ErrorCode::InvalidRequest,
                    "release: missing attachment key".into(),
                    false,
                )),
                link_queued: false,
            };
        };
        let now = (self.clock)();
        let mut g = self.lock();
        // An allocation rebuilt from the kernel is known by its host veth only.
        let released = g.ipam.release(&key, now).or_else(|| {
            (!req.host_ifname.is_empty())
                .then(|| {
                    g.ipam
                        .release(&crate::rebuild::rebuilt_key(&req.host_ifname), now)
                })
                .flatten()
        });
        let committed = self.commit(&mut g, released.is_some());
        // The route deletion below takes the kernel's RTNL lock: never while holding the allocator's.
        drop(g);
        match committed {
            Ok(()) => {
                if let Some(m) = self.metrics.get() {
                    m.record_releases("del", usize::from(released.is_some()));
                }
                match &released {
                    Some(a) => tracing::info!(key = %key, address = %a.address, "released"),
                    None => tracing::debug!(key = %key, "release of an unknown attachment"),
                }
                if let Some(policy) = self.policy.get() {
                    policy.forget(&(key.container_id.clone(), key.ifname.clone()));
                }
                // Route deleted now; the link queued (the reaper's thread waits out the kernel's grace period).
                let link_queued = self.reaper.get().is_some_and(|r| {
                    r.reap(
                        req.host_ifindex,
                        &req.host_ifname,
                        released.as_ref().map(|a| Ipv4Net::from(a.address)),
                    )
                });
                pb::ReleaseReply {
                    released: released.map(|a| self.to_wire(&a)),
                    error: None,
                    link_queued,
                }
            }
            Err(e) => pb::ReleaseReply {
                released: None,
                error: Some(e),
                link_queued: false,
            },
        }
    }

    pub fn list(&self) -> pb::ListReply {
        let g = self.lock();
        pb::ListReply {
            allocations: g.ipam.allocations().map(|a| self.to_wire(a)).collect(),
            error: None,
        }
    }

    pub fn gc(&self, req: pb::GcRequest) -> pb::GcReply {
        let mut valid: BTreeSet<ipam::AttachmentKey> =
            req.valid.into_iter().map(from_wire_key).collect();
        let now = (self.clock)();
        let mut g = self.lock();
        // A rebuilt allocation's key is never in a runtime's list: GC keeps it (DEL by veth releases it).
        valid.extend(
            g.ipam
                .allocations()
                .filter(|a| crate::rebuild::rebuilt_veth(&a.key).is_some())
                .map(|a| a.key.clone()),
        );
        let released = g.ipam.gc(&valid, now);
        match self.commit(&mut g, !released.is_empty()) {
            Ok(()) => {
                if let Some(m) = self.metrics.get() {
                    m.record_releases("gc", released.len());
                }
                for a in &released {
                    tracing::info!(key = %a.key, address = %a.address, "released by gc");
                    if let Some(policy) = self.policy.get() {
                        policy.forget(&(a.key.container_id.clone(), a.key.ifname.clone()));
                    }
                }
                self.sweep_links();
                pb::GcReply {
                    released: released.iter().map(|a| self.to_wire(a)).collect(),
                    error: None,
                }
            }
            Err(e) => pb::GcReply {
                released: vec![],
                error: Some(e),
            },
        }
    }

    /// Writes the checkpoint after a change; on failure reloads the last good one.
    fn commit(&self, g: &mut Inner, changed: bool) -> Result<(), pb::Error> {
        if !changed {
            return Ok(());
        }
        if let Err(e) = g.checkpoint.save(&g.ipam.snapshot()) {
            tracing::error!(error = %e, "checkpoint write failed; change undone");
            let spec = g.ipam.spec().clone();
            let cooldown = g.ipam.cooldown();
            match load_ipam(&spec, cooldown, &g.checkpoint) {
                Ok(ipam) => g.ipam = ipam,
                Err(e2) => tracing::error!(error = %e2, "reloading the checkpoint failed too"),
            }
            return Err(wire_error(ErrorCode::Internal, e.to_string(), true));
        }
        if self.fault == Fault::ExitAfterCheckpoint {
            tracing::warn!("fault injection: exiting after the checkpoint, before the reply");
            std::process::exit(FAULT_EXIT_CODE);
        }
        Ok(())
    }

    fn to_wire(&self, a: &ipam::Allocation) -> pb::Allocation {
        pb::Allocation {
            key: Some(api::AttachmentKey::new(&a.key.container_id, &a.key.ifname)),
            address: format!("{}/32", a.address),
            gateway: POD_GATEWAY.to_string(),
            mtu: self.mtu,
            egress_interface: a
                .egress
                .as_ref()
                .map(|e| e.interface.clone())
                .unwrap_or_default(),
            route_table: a.egress.as_ref().map(|e| e.route_table).unwrap_or(0),
            netns: a.pod.netns.clone(),
            pod_namespace: a.pod.pod_namespace.clone(),
            pod_name: a.pod.pod_name.clone(),
        }
    }
}

fn load_ipam(spec: &PoolSpec, cooldown: Duration, cp: &Checkpoint) -> Result<Ipam, AgentError> {
    Ipam::new(spec.clone(), cooldown).map_err(|e| AgentError::Config(e.to_string()))?;
    let state = cp.load()?.unwrap_or_default();
    Ipam::restore(spec.clone(), cooldown, state).map_err(|e| match e {
        IpamError::Inconsistent(reason) => AgentError::CorruptCheckpoint {
            path: cp.path().to_owned(),
            reason,
        },
        other => AgentError::Config(other.to_string()),
    })
}

/// A live allocation as the policy engine sees it.
fn local_pod(a: &ipam::Allocation) -> underlay_core::policy::LocalPod {
    underlay_core::policy::LocalPod {
        namespace: a.pod.pod_namespace.clone(),
        name: a.pod.pod_name.clone(),
        ifname: underlay_core::veth_names::host_veth_name(&a.key.container_id, &a.key.ifname),
        ip: a.address,
    }
}

fn policy_error(e: &PolicyError) -> pb::Error {
    match e {
        PolicyError::NotReady(m) => wire_error(ErrorCode::NotReady, m.clone(), true),
        PolicyError::Nft(m) => wire_error(
            ErrorCode::Internal,
            format!("network policy not committed: {m}"),
            true,
        ),
    }
}

fn from_wire_key(k: api::AttachmentKey) -> ipam::AttachmentKey {
    ipam::AttachmentKey::new(k.container_id, k.ifname)
}

fn wire_error(code: ErrorCode, message: String, retryable: bool) -> pb::Error {
    pb::Error {
        code: code as i32,
        message,
        retryable,
    }
}

/// The `result` label of a failed request: its error code.
fn error_label(e: &pb::Error) -> &'static str {
    match ErrorCode::try_from(e.code) {
        Ok(ErrorCode::PoolExhausted) => "pool_exhausted",
        Ok(ErrorCode::InvalidRequest) => "invalid_request",
        Ok(ErrorCode::Internal) => "internal",
        Ok(ErrorCode::NotReady) => "not_ready",
        _ => "unspecified",
    }
}

fn ipam_error(e: &IpamError) -> pb::Error {
    let code = match e {
        IpamError::Exhausted { .. } => ErrorCode::PoolExhausted,
        IpamError::InvalidKey(_) => ErrorCode::InvalidRequest,
        IpamError::Inconsistent(_) => ErrorCode::Internal,
    };
    wire_error(code, e.to_string(), e.is_retryable())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc_req(id: &str) -> pb::AllocateRequest {
        pb::AllocateRequest {
            key: Some(api::AttachmentKey::new(id, "eth0")),
            netns: format!("/var/run/netns/{id}"),
            pod_namespace: "default".into(),
            pod_name: id.into(),
        }
    }

    fn allocated_ip(r: pb::AllocateReply) -> String {
        match r.result {
            Some(pb::allocate_reply::Result::Allocation(a)) => a.address,
            other => panic!("allocation failed: {other:?}"),
        }
    }

    #[test]
    fn the_pool_is_replaced_only_while_nothing_is_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::new(dir.path().join("ipam.json"));
        let block = |s: &str| PoolSpec::Block(s.parse().unwrap());
        let svc = IpamService::open(
            block("100.64.0.0/28"),
            Duration::from_secs(60),
            cp,
            1500,
            Fault::None,
        )
        .unwrap();
        svc.replace_pool(block("100.64.0.16/28")).unwrap();
        let ip = allocated_ip(svc.allocate(alloc_req("a")));
        let net: Ipv4Net = ip.parse().unwrap();
        assert!(
            "100.64.0.16/28"
                .parse::<Ipv4Net>()
                .unwrap()
                .contains(&net.addr()),
            "{ip}"
        );
        let e = svc.replace_pool(block("100.64.0.32/28")).unwrap_err();
        assert!(e.to_string().contains("1 address"), "{e}");
        // The allocation and its pool survive a reopen from the checkpoint.
        let reopened = IpamService::open(
            block("100.64.0.16/28"),
            Duration::from_secs(60),
            Checkpoint::new(dir.path().join("ipam.json")),
            1500,
            Fault::None,
        )
        .unwrap();
        assert_eq!(reopened.allocated(), 1);
    }
}
