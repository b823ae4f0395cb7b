//! Network policy on the node: the compiled model of [`underlay_core::policy`] kept in the kernel, and the
//! admission of each new pod at CNI ADD.
//!
//! ```text
//!   API follower ──► PolicyInputs::publish(Cluster snapshot) ─┐
//!   IPAM Allocate (ADD) ──► PolicyEngine::admit(pod, veth, ip) ┼─► compile(inputs, local pods) ─► diff(installed)
//!   IPAM Release / Gc (DEL) ──► PolicyEngine::forget(key) ─────┘        ─► one nft -f transaction ─► installed
//! ```
//!
//! Before the first packet: ADD allocates the address, then asks [`PolicyEngine::admit`], which returns only
//! once the pod's policy state (its verdict-map entries, its address in its peers' sets) is committed, keyed
//! by the host veth name the plugin creates afterwards. So the veth is born into the right state. When the
//! inputs are not synced yet, or do not hold the pod, admission waits for them (bounded, [`DEFAULT_ADMISSION_WAIT`])
//! and then fails with a retryable "not ready" error that names what is missing (the plugin answers CNI error
//! 11); nothing is guessed.
//!
//! Restart: the kernel keeps the previous agent's policy objects (nothing is opened meanwhile); the first
//! transaction of the new agent, once inputs arrive, replaces all of them with the state rebuilt from the
//! inputs and the IPAM checkpoint's attachments (`render_install`), atomically.

pub mod nft;

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use underlay_core::policy::diff::{self, PolicyObjects};
use underlay_core::policy::{
    Cluster, CompileCache, LocalPod, PolicyModel, PolicyWarning, compile_with,
};

use crate::metrics::AgentMetrics;
pub use nft::{NsNft, PolicyNft};

/// Why a policy step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The inputs cannot decide yet; ADD answers "try again later" with this text.
    #[error("network policy not ready: {0}")]
    NotReady(String),
    #[error("nft: {0}")]
    Nft(String),
}

/// What the API follower feeds: complete snapshots of the policy inputs this node needs. The first call marks
/// the inputs synced; until then no pod is admitted.
pub trait PolicyInputs: Send + Sync {
    fn publish(&self, inputs: Arc<Cluster>);
}

/// Told, before every transaction commits, which host veths the policies select in either direction (the
/// tc-BPF fast path takes those pods off itself, so that no packet of a selected pod skips nftables).
pub trait SelectionObserver: Send + Sync + std::fmt::Debug {
    fn selected(&self, veths: &std::collections::BTreeSet<&str>);
}

/// An attachment: the IPAM key (container id, interface).
pub type AttachmentKey = (String, String);

#[derive(Debug, Default)]
struct State {
    inputs: Option<Arc<Cluster>>,
    local: BTreeMap<AttachmentKey, LocalPod>,
    /// What this process last committed; `None` until its first transaction (which replaces whatever a
    /// previous agent left).
    installed: Option<PolicyModel>,
    /// Whether this node's existing attachments are known ([`PolicyEngine::restore`]). Until then nothing is
    /// committed: the first transaction replaces what a previous agent left, and made without the pods that
    /// agent served it would drop their verdicts (their traffic unpoliced until the restore).
    restored: bool,
    warnings: Vec<PolicyWarning>,
    unknown: Vec<String>,
    /// Peer resolutions of the current inputs, reused by every compile; new inputs evict what they change.
    cache: CompileCache,
    /// The generation the kernel stamps on connections that passed policy (valid once `installed` is).
    generation: u16,
}

/// The node's policy engine. Every change is serialized under one lock and committed as one transaction.
#[derive(Debug)]
pub struct PolicyEngine {
    state: Mutex<State>,
    /// Notified whenever new inputs are in (what [`PolicyEngine::ready_for`] waits for).
    inputs_changed: Condvar,
    nft: Box<dyn PolicyNft>,
    metrics: OnceLock<AgentMetrics>,
    /// How long an ADD waits for the inputs to hold its pod before it answers "try again later".
    admission_wait: Duration,
    observer: OnceLock<Arc<dyn SelectionObserver>>,
}

/// How long ADD waits, by default, for the API follower to deliver its pod: the Pod reaches the agent's watch
/// about when it reaches the kubelet, so the wait is usually milliseconds; past it the runtime retries the
/// sandbox (CNI error 11). Well inside the plugin's 10 s socket timeout.
pub const DEFAULT_ADMISSION_WAIT: Duration = Duration::from_secs(5);

/// What one sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    /// No inputs yet, or the node's existing attachments not restored yet: the kernel was left as it was.
    Waiting,
    /// The kernel already held the compiled state.
    Unchanged,
    /// A transaction of this many ops was committed (`full`: the install that replaces everything).
    Applied { ops: usize, full: bool },
}

impl PolicyEngine {
    /// An engine for a node with no attachments of an earlier agent to restore.
    pub fn new(nft: Box<dyn PolicyNft>) -> Self {
        let engine = Self::awaiting_restore(nft);
        engine.lock().restored = true;
        engine
    }

    /// An engine that commits nothing until [`PolicyEngine::restore`] has registered the attachments that exist
    /// already (an agent's start: its policy inputs may arrive before its IPAM checkpoint is read).
    pub fn awaiting_restore(nft: Box<dyn PolicyNft>) -> Self {
        PolicyEngine {
            state: Mutex::new(State::default()),
            inputs_changed: Condvar::new(),
            nft,
            metrics: OnceLock::new(),
            admission_wait: DEFAULT_ADMISSION_WAIT,
            observer: OnceLock::new(),
        }
    }

    /// The engine with another admission wait ([`DEFAULT_ADMISSION_WAIT`]); zero answers at once.
    pub fn with_admission_wait(mut self, wait: Duration) -> Self {
        self.admission_wait = wait;
        self
    }

    pub fn set_metrics(&self, metrics: AgentMetrics) {
        let _ = self.metrics.set(metrics);
    }

    /// Registers the one [`SelectionObserver`] and tells it the selection committed so far, if any.
    pub fn set_observer(&self, observer: Arc<dyn SelectionObserver>) {
        let g = self.lock();
        if let Some(m) = &g.installed {
            observer.selected(&selected_veths(m));
        }
        let _ = self.observer.set(observer);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // State is only replaced whole after a successful commit; a panic leaves it consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the attachments that exist already (from the IPAM checkpoint at start), without applying:
    /// the first sync with inputs installs them all.
    pub fn restore(&self, attachments: impl IntoIterator<Item = (AttachmentKey, LocalPod)>) {
        let mut g = self.lock();
        for (k, p) in attachments {
            if !p.namespace.is_empty() && !p.name.is_empty() {
                g.local.insert(k, p);
            }
        }
        g.restored = true;
    }

    /// Replaces the inputs and brings the kernel to them.
    pub fn set_inputs(&self, inputs: impl Into<Arc<Cluster>>) -> Result<SyncOutcome, PolicyError> {
        let started = Instant::now();
        let mut g = self.lock();
        let inputs = inputs.into();
        match g.inputs.replace(inputs.clone()) {
            // Resolutions the change cannot touch stay: a policy or peer event does not re-resolve every
            // peer of the node's policies.
            Some(old) => g.cache.invalidate(&old, &inputs),
            None => g.cache.clear(),
        }
        self.inputs_changed.notify_all();
        self.sync(&mut g, started)
    }

    /// Whether inputs have arrived.
    pub fn synced(&self) -> bool {
        self.lock().inputs.is_some()
    }

    /// ADD: commits the state of the pod `pod` attached as `key` (an address already allocated), and returns
    /// once it is in the kernel. A pod without Kubernetes identity (empty namespace or name) is no policy's
    /// and is admitted as is.
    pub fn admit(&self, key: AttachmentKey, pod: LocalPod) -> Result<(), PolicyError> {
        let started = Instant::now();
        let result = self.admit_inner(key, pod, started);
        if let Some(m) = self.metrics.get() {
            m.record_policy_admission(match &result {
                Ok(()) => "ok",
                Err(PolicyError::NotReady(_)) => "not_ready",
                Err(_) => "error",
            });
        }
        result
    }

    fn admit_inner(
        &self,
        key: AttachmentKey,
        pod: LocalPod,
        started: Instant,
    ) -> Result<(), PolicyError> {
        if pod.namespace.is_empty() || pod.name.is_empty() {
            return Ok(());
        }
        let mut g = self.lock();
        Self::check_known(&g, &pod.namespace, &pod.name)?;
        let previous = g.local.insert(key.clone(), pod);
        let result = match self.sync(&mut g, started) {
            // Nothing committed (the node's attachments not restored yet): the pod's state is not in the kernel.
            Ok(SyncOutcome::Waiting) => Err(PolicyError::NotReady(
                "the agent has not restored this node's pods yet".into(),
            )),
            other => other.map(|_| ()),
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                match previous {
                    Some(p) => g.local.insert(key, p),
                    None => g.local.remove(&key),
                };
                Err(e)
            }
        }
    }

    /// Whether ADD of `namespace/name` can be admitted (checked before an address is allocated): waits up to
    /// the admission wait for inputs that hold the pod, so an ADD racing the pod's watch event is answered
    /// when the event lands instead of failing and waiting for the runtime's retry.
    pub fn ready_for(&self, namespace: &str, name: &str) -> Result<(), PolicyError> {
        if namespace.is_empty() || name.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + self.admission_wait;
        let mut g = self.lock();
        loop {
            let known = Self::check_known(&g, namespace, name);
            let left = deadline.saturating_duration_since(Instant::now());
            if known.is_ok() || left.is_zero() {
                return known;
            }
            g = self
                .inputs_changed
                .wait_timeout(g, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn check_known(g: &State, namespace: &str, name: &str) -> Result<(), PolicyError> {
        let Some(inputs) = &g.inputs else {
            return Err(PolicyError::NotReady(
                "the agent has not synced NetworkPolicies, Pods and Namespaces from the API server yet".into(),
            ));
        };
        if !inputs
            .pods
            .iter()
            .any(|p| p.namespace == namespace && p.name == name)
        {
            return Err(PolicyError::NotReady(format!(
                "pod {namespace}/{name} is not in the agent's policy inputs yet (its labels decide which \
                 policies select it)"
            )));
        }
        Ok(())
    }

    /// DEL: the attachment is gone; its state leaves the kernel. Never fails DEL: an error is logged and the
    /// next sync retries.
    pub fn forget(&self, key: &AttachmentKey) {
        let started = Instant::now();
        let mut g = self.lock();
        if g.local.remove(key).is_none() {
            return;
        }
        if let Err(e) = self.sync(&mut g, started) {
            tracing::warn!(error = %e, container = %key.0, "policy state of a deleted pod not removed yet");
        }
    }

    /// Problems of the policies selecting this node's pods (for the API side's Events).
    pub fn warnings(&self) -> Vec<PolicyWarning> {
        self.lock().warnings.clone()
    }

    /// The model last committed.
    pub fn installed(&self) -> Option<PolicyModel> {
        self.lock().installed.clone()
    }

    /// Re-applies the compiled state (drift repair, retries after a failed transaction).
    pub fn resync(&self) -> Result<SyncOutcome, PolicyError> {
        let started = Instant::now();
        let mut g = self.lock();
        self.sync(&mut g, started)
    }

    fn sync(&self, g: &mut State, started: Instant) -> Result<SyncOutcome, PolicyError> {
        let Some(inputs) = g.inputs.clone() else {
            return Ok(SyncOutcome::Waiting);
        };
        if !g.restored {
            return Ok(SyncOutcome::Waiting);
        }
        let local: Vec<LocalPod> = g.local.values().cloned().collect();
        let compile_started = Instant::now();
        let compiled = compile_with(&inputs, &local, &mut g.cache);
        let compile_ms = compile_started.elapsed().as_secs_f64() * 1e3;
        let mut generation = g.generation;
        let (batch, outcome) = match &g.installed {
            Some(prev) => {
                let ops = diff::diff(prev, &compiled.model);
                if ops.is_empty() {
                    return Ok(SyncOutcome::Unchanged);
                }
                let mut batch = diff::render_ops(&ops);
                if diff::revokes(&ops) {
                    generation = diff::next_generation(g.generation);
                    batch.push_str(&diff::render_generation(generation));
                }
                (
                    batch,
                    SyncOutcome::Applied {
                        ops: ops.len(),
                        full: false,
                    },
                )
            }
            None => {
                let existing: PolicyObjects = self.nft.existing()?;
                // Connections keep their stamp across agent restarts: never reuse the kernel's generation.
                generation =
                    diff::next_generation(existing.generation.unwrap_or_else(seed_generation));
                (
                    diff::render_install(&compiled.model, &existing, generation),
                    SyncOutcome::Applied {
                        ops: compiled.model.object_count(),
                        full: true,
                    },
                )
            }
        };
        let nft_started = Instant::now();
        if let Some(o) = self.observer.get() {
            o.selected(&selected_veths(&compiled.model));
        }
        let applied = self.nft.apply(&batch);
        let nft_ms = nft_started.elapsed().as_secs_f64() * 1e3;
        if let Some(m) = self.metrics.get() {
            m.record_policy_apply(applied.is_ok(), started.elapsed().as_secs_f64());
        }
        if let Err(e) = applied {
            tracing::warn!(error = %e, "policy transaction refused; the kernel keeps the previous state");
            // The next sync starts over from what the kernel holds.
            g.installed = None;
            return Err(e);
        }
        for w in &compiled.warnings {
            if !g.warnings.contains(w) {
                tracing::warn!(policy = %w.policy, field = %w.field, problem = %w.problem, "network policy entry cannot be expressed; it matches nothing");
            }
        }
        if let Some(m) = self.metrics.get() {
            m.set_policy_state(
                compiled.warnings.len(),
                compiled.unknown_local_pods.len(),
                compiled.model.object_count(),
            );
        }
        tracing::debug!(
            ?outcome,
            objects = compiled.model.object_count(),
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            compile_ms,
            nft_ms,
            "policy state committed"
        );
        g.warnings = compiled.warnings;
        g.unknown = compiled.unknown_local_pods;
        g.installed = Some(compiled.model);
        g.generation = generation;
        Ok(outcome)
    }
}

/// A generation to start from when the kernel holds none (first start, or policy objects removed): connections
/// may still carry a stamp from an earlier install, so not a fixed value.
fn seed_generation() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos ^ std::process::id().rotate_left(16)) as u16
}

/// Host veths of the pods some policy selects, in either direction.
fn selected_veths(m: &PolicyModel) -> std::collections::BTreeSet<&str> {
    m.egress_if
        .keys()
        .chain(m.ingress_if.keys())
        .map(String::as_str)
        .collect()
}

impl PolicyInputs for PolicyEngine {
    fn publish(&self, inputs: Arc<Cluster>) {
        if let Err(e) = self.set_inputs(inputs) {
            tracing::warn!(error = %e, "policy inputs not applied yet");
        }
    }
}
