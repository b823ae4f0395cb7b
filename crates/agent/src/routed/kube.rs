//! Routed mode driven by the node's `UnderlayNode` (the agent in a cluster, and in the lab against the API
//! stand-in).
//!
//! ```text
//!   watch UnderlayNode <node> ──► record channel (latest object) ──┬─► converge loop: RoutedAgent::converge
//!     (field selector, backoff;                                   │     on every change + every interval
//!      unreachable: keep the last)                                │
//!                                                                 ├─► start IPAM once status.pool.block is known
//!                                                                 │     (crate::serve; a later block change is
//!                                                                 │      applied only while no pod holds an
//!                                                                 │      address, else reported)
//!   health endpoint (node netns) ◄── Ready ◄──────────────────────┴─► status writer: merge patch of
//!                                                                       conditions + poolUsed + observedGeneration
//! ```
//!
//! Each new record is also written beside the IPAM checkpoint ([`names::AGENT_RECORD_CACHE`]); an agent that
//! restarts while the API server is unreachable starts from it, so it serves the same block from the checkpoint
//! instead of waiting for the API.
//!
//! The controller owns `spec` and `status.{pool,poolSize,routes,forwarder}`; the agent writes only
//! `status.{conditions,poolUsed,observedGeneration}`. The record → spec conversion ([`spec_from_record`]) and
//! the status computation ([`desired_status`]) are pure; the rest is I/O around them.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ::kube::api::{Api, Patch, PatchParams};
use ::kube::runtime::WatchStreamExt;
use ::kube::runtime::watcher::{self, Event};
use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use tokio::sync::watch;
use underlay_api::{Mode, UnderlayNode, UnderlayNodeStatus, conditions};
use underlay_core::ipam::PoolSpec;
use underlay_core::names;
use underlay_core::node::{NodeSpecError, RoutedNodeSpec};
use underlay_core::planner::PeerRoute;

use super::runner::{DEFAULT_CONVERGE_INTERVAL, default_health_addr, node_health};
use super::{RoutedAgent, pool_from_record};
use crate::config::DEFAULT_MTU;
use crate::health_http::Ready;
use crate::{AgentConfig, AgentError, Fault, IpamService};

/// Default interval between status writes (a write happens only when something changed).
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// Longest wait between status write attempts while the API fails.
const STATUS_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Re-reads after a 409 before giving up until the next interval.
const STATUS_CONFLICT_RETRIES: u32 = 3;
/// Time the IPAM socket has to accept a connection when the status writer checks it.
const IPAM_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// How to run routed mode from the Kubernetes API.
#[derive(Debug, Clone)]
pub struct KubeAgentOptions {
    /// This node's name: the `UnderlayNode` (and `Node`) name.
    pub node_name: String,
    /// The cluster's pod CIDR (every node's block lies inside it).
    pub pod_cidr: Ipv4Net,
    /// The VPC's CIDRs: traffic to them keeps its pod source address.
    pub vpc_cidrs: Vec<Ipv4Net>,
    /// Pod MTU (the VPC's: nothing encapsulates).
    pub mtu: u32,
    /// The node's namespace; `None` is the agent's own (hostNetwork in a cluster).
    pub netns: Option<PathBuf>,
    pub health_addr: SocketAddr,
    pub converge_interval: Duration,
    /// Shortest time between two status writes.
    pub status_interval: Duration,
    /// Served on the health endpoint's `/metrics`.
    pub metrics: crate::metrics::AgentMetrics,
    /// Watch this node's pods labelled `underlay.dev/imds-access=allow` and let their addresses reach IMDS
    /// ([`crate::imds`]). Off: no pod reaches IMDS.
    pub imds_opt_ins: bool,
    /// Enforce NetworkPolicy ([`crate::policy`], inputs from [`crate::policy_api`]): ADD waits for each pod's
    /// policy state. Off: every pod is reachable, whatever the policies say.
    pub network_policy: bool,
    /// Run the tc-BPF fast path ([`crate::fastpath`]) where the kernel supports it. Off: the kernel path only,
    /// and any fast path a previous agent left is removed.
    pub fast_path: bool,
}

impl KubeAgentOptions {
    /// Options with the defaults: jumbo MTU, own namespace, `0.0.0.0:9650`, the default intervals.
    pub fn new(node_name: impl Into<String>, pod_cidr: Ipv4Net, vpc_cidrs: Vec<Ipv4Net>) -> Self {
        KubeAgentOptions {
            node_name: node_name.into(),
            pod_cidr,
            vpc_cidrs,
            mtu: DEFAULT_MTU,
            netns: None,
            health_addr: default_health_addr(),
            converge_interval: DEFAULT_CONVERGE_INTERVAL,
            status_interval: DEFAULT_STATUS_INTERVAL,
            metrics: crate::metrics::AgentMetrics::new(),
            imds_opt_ins: true,
            network_policy: true,
            fast_path: true,
        }
    }
}

/// Why an `UnderlayNode` cannot be turned into a [`RoutedNodeSpec`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the record's mode is {0:?}; this agent runs routed mode")]
    NotRouted(Mode),
    #[error("spec.nodeIP {0:?} is not an IPv4 address")]
    NodeIp(String),
    #[error("status.pool.block {0:?} is not an IPv4 CIDR")]
    Block(String),
    #[error("status.routes: {field} {value:?} is not {expected}")]
    Route {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{0}")]
    Spec(#[from] NodeSpecError),
}

/// The record as a converge spec: node, subnet and node IP from `spec`; the pod block from `status.pool.block`;
/// the peer routes from `status.routes` (`peer` is the via IP: the record does not name peers); pod CIDR, VPC
/// CIDRs and MTU from `opts`. `Ok(None)` while the controller has not allocated a block.
pub fn spec_from_record(
    node: &UnderlayNode,
    opts: &KubeAgentOptions,
) -> Result<Option<RoutedNodeSpec>, RecordError> {
    if node.spec.mode != Mode::Routed {
        return Err(RecordError::NotRouted(node.spec.mode));
    }
    let node_ip: Ipv4Addr = node
        .spec
        .node_ip
        .parse()
        .map_err(|_| RecordError::NodeIp(node.spec.node_ip.clone()))?;
    let status = node.status.clone().unwrap_or_default();
    let Some(block) = status.pool.as_ref().and_then(|p| p.block.as_deref()) else {
        return Ok(None);
    };
    let pod_block: Ipv4Net = block
        .parse()
        .map_err(|_| RecordError::Block(block.to_string()))?;
    let peer_routes = status
        .routes
        .iter()
        .map(|r| {
            let destination: Ipv4Net = r.destination.parse().map_err(|_| RecordError::Route {
                field: "destination",
                value: r.destination.clone(),
                expected: "an IPv4 CIDR",
            })?;
            let via: Ipv4Addr = r.via.parse().map_err(|_| RecordError::Route {
                field: "via",
                value: r.via.clone(),
                expected: "an IPv4 address",
            })?;
            Ok(PeerRoute {
                destination,
                via,
                peer: via.to_string(),
            })
        })
        .collect::<Result<Vec<_>, RecordError>>()?;
    let spec = RoutedNodeSpec {
        node: node.metadata.name.clone().unwrap_or_default(),
        subnet: node.spec.subnet_id.clone(),
        node_ip,
        uplink: None,
        pod_block,
        pod_cidr: opts.pod_cidr,
        vpc_cidrs: opts.vpc_cidrs.clone(),
        peer_routes,
        mtu: opts.mtu,
    };
    spec.validate()?;
    Ok(Some(spec))
}

/// Where the node's pool stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolFact {
    /// No block in the record yet.
    Waiting,
    /// The record cannot be used (message).
    Invalid(String),
    /// The IPAM service serves this block, the record's.
    Serving(Ipv4Net),
    /// The IPAM service serves `served`, but the record now says `record`: not applied (restart to apply).
    BlockChanged { served: Ipv4Net, record: Ipv4Net },
    /// `eni` mode: no ENI of the record has a pod address on a device of the node yet.
    WaitingForEnis,
    /// `eni` mode: the IPAM service serves this many interface addresses.
    ServingAddresses(usize),
}

/// What the agent knows about itself when it writes status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentFacts {
    pub pool: PoolFact,
    /// The conflist is on disk (and the IPAM service that it points at was started).
    pub cni_configured: bool,
    /// The IPAM socket accepts connections.
    pub ipam_serving: bool,
    /// The last converge: `None` before the first, the error message on failure.
    pub converged: Option<Result<(), String>>,
    pub pool_used: u32,
    /// `eni` mode: every address held (allocated or cooling), sorted; `None` in routed mode.
    pub pool_held: Option<Vec<String>>,
    /// `eni` mode: the cooling part of `pool_held`.
    pub pool_cooling: Option<Vec<String>>,
    /// `eni` mode: the record's `pool.releaseGeneration` the allocator serves, when it serves this record's.
    pub observed_release_generation: Option<u64>,
}

/// The part of `status` the agent owns: what its merge patch writes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub conditions: Vec<Condition>,
    pub pool_used: u32,
    /// Written as `null` when absent, so that a value the agent can no longer vouch for is removed.
    pub pool_held: Option<Vec<String>>,
    pub pool_cooling: Option<Vec<String>>,
    pub observed_release_generation: Option<u64>,
    pub observed_generation: Option<i64>,
}

impl AgentStatus {
    /// The agent-owned part of a record's status.
    pub fn of(status: Option<&UnderlayNodeStatus>) -> AgentStatus {
        let s = status.cloned().unwrap_or_default();
        AgentStatus {
            conditions: s.conditions,
            pool_used: s.pool_used,
            pool_held: s.pool_held,
            pool_cooling: s.pool_cooling,
            observed_release_generation: s.observed_release_generation,
            observed_generation: s.observed_generation,
        }
    }

    /// The JSON merge patch writing exactly these fields.
    pub fn merge_patch(&self) -> serde_json::Value {
        serde_json::json!({ "status": self })
    }
}

/// The status the agent wants: PoolReady, CniConfigured, Converged, Ready (in that order). A condition whose
/// status is unchanged from `previous` keeps its `lastTransitionTime`; others get `now`.
pub fn desired_status(
    previous: &AgentStatus,
    facts: &AgentFacts,
    generation: Option<i64>,
    now: Timestamp,
) -> AgentStatus {
    let (pool_ok, pool_reason, pool_msg) = match &facts.pool {
        PoolFact::Serving(b) => (true, "Allocated", format!("serving pod block {b}")),
        PoolFact::Waiting => (
            false,
            "Pending",
            "waiting for the controller to allocate a pod block".to_string(),
        ),
        PoolFact::WaitingForEnis => (
            false,
            "Pending",
            "waiting for an attached ENI with pod addresses".to_string(),
        ),
        PoolFact::ServingAddresses(n) => (true, "Allocated", format!("serving {n} ENI addresses")),
        PoolFact::Invalid(e) => (false, "InvalidRecord", e.clone()),
        PoolFact::BlockChanged { served, record } => (
            false,
            "BlockChanged",
            format!(
                "the record's block is {record} but the agent serves {served}; a running node's block is \
                 moved while pods hold addresses in it (it moves once none does)"
            ),
        ),
    };
    let (cni_reason, cni_msg) = if facts.cni_configured {
        ("ConflistWritten", "CNI configuration list written")
    } else {
        ("ConflistMissing", "CNI configuration list not written yet")
    };
    let (conv_status, conv_reason, conv_msg) = match &facts.converged {
        None => ("Unknown", "Pending", "no converge yet".to_string()),
        Some(Ok(())) => (
            "True",
            "Converged",
            "routes, sysctls and nftables as planned".to_string(),
        ),
        Some(Err(e)) => ("False", "ConvergeFailed", e.clone()),
    };
    let converged = matches!(facts.converged, Some(Ok(())));
    let (ready_ok, ready_reason, ready_msg) = if !pool_ok {
        (false, "PoolNotReady", pool_msg.clone())
    } else if !facts.cni_configured {
        (false, "CniNotConfigured", cni_msg.to_string())
    } else if !converged {
        (false, "NotConverged", conv_msg.clone())
    } else if !facts.ipam_serving {
        (
            false,
            "IpamNotServing",
            "the IPAM socket does not answer".to_string(),
        )
    } else {
        (true, "Ready", "the node can run pods".to_string())
    };
    let tf = |b: bool| if b { "True" } else { "False" };
    let wanted = [
        (conditions::POOL_READY, tf(pool_ok), pool_reason, pool_msg),
        (
            conditions::CNI_CONFIGURED,
            tf(facts.cni_configured),
            cni_reason,
            cni_msg.to_string(),
        ),
        (conditions::CONVERGED, conv_status, conv_reason, conv_msg),
        (conditions::READY, tf(ready_ok), ready_reason, ready_msg),
    ];
    let conditions = wanted
        .into_iter()
        .map(|(ty, status, reason, message)| {
            let since = previous
                .conditions
                .iter()
                .find(|c| c.type_ == ty && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: ty.to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message,
                last_transition_time: since,
                observed_generation: generation,
            }
        })
        .collect();
    AgentStatus {
        conditions,
        pool_used: facts.pool_used,
        pool_held: facts.pool_held.clone(),
        pool_cooling: facts.pool_cooling.clone(),
        observed_release_generation: facts.observed_release_generation,
        observed_generation: generation,
    }
}

/// What the tasks share.
#[derive(Debug, Default)]
struct Shared {
    ready: Ready,
    /// The IPAM service, once started.
    ipam: OnceLock<Arc<IpamService>>,
    /// The block it serves.
    served: Mutex<Option<Ipv4Net>>,
}

impl Shared {
    fn served(&self) -> Option<Ipv4Net> {
        *self.served.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_served(&self, block: Ipv4Net) {
        *self.served.lock().unwrap_or_else(|p| p.into_inner()) = Some(block);
    }

    fn pool_fact(&self, record: Option<&Result<Option<RoutedNodeSpec>, RecordError>>) -> PoolFact {
        let served = self.served();
        match (served, record) {
            (Some(served), Some(Ok(Some(spec)))) if spec.pod_block != served => {
                PoolFact::BlockChanged {
                    served,
                    record: spec.pod_block,
                }
            }
            (Some(served), _) => PoolFact::Serving(served),
            (None, Some(Err(e))) => PoolFact::Invalid(e.to_string()),
            (None, _) => PoolFact::Waiting,
        }
    }
}

pub(crate) type Record = Option<Arc<UnderlayNode>>;

/// Runs the agent in routed mode from the node's `UnderlayNode` until `shutdown` completes. Must run inside a
/// multi-threaded tokio runtime. Never returns because the API fails: it keeps the last record it saw.
pub async fn run_routed_on_kube(
    mut config: AgentConfig,
    client: ::kube::Client,
    opts: KubeAgentOptions,
    fault: Fault,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let opts = Arc::new(opts);
    let shared = Arc::new(Shared::default());
    let (ns, health) = node_health(
        opts.netns.as_deref(),
        opts.health_addr,
        shared.ready.clone(),
        config.socket.clone(),
        opts.metrics.clone(),
        &opts.node_name,
    )?;

    let node_agent = Arc::new(RoutedAgent::new(ns));
    let ipam_shared = shared.clone();
    let imds = crate::imds::spawn_opt_ins(
        opts.imds_opt_ins,
        client.clone(),
        opts.node_name.clone(),
        move || ipam_shared.ipam.get().cloned(),
        node_agent.imds_allowed().clone(),
        node_agent.netns().path().to_owned(),
    );
    let policy = crate::policy_api::spawn_enforcement(
        opts.network_policy,
        client.clone(),
        &opts.node_name,
        node_agent.netns().path().to_owned(),
        opts.metrics.clone(),
    );
    let mut inside = opts.vpc_cidrs.clone();
    inside.push(opts.pod_cidr);
    let fast_path = crate::fastpath::start_for_agent(
        opts.fast_path,
        node_agent.netns().path(),
        &opts.vpc_cidrs,
        &inside,
        policy.as_ref().map(|p| &p.engine),
    );
    let api: Api<UnderlayNode> = Api::all(client);
    let cache = RecordCache::beside(&config.checkpoint);
    let cached = cache.load(&opts.node_name);
    if let Some(n) = &cached {
        tracing::info!(
            node = %opts.node_name,
            path = %cache.0.display(),
            resource_version = n.metadata.resource_version.as_deref().unwrap_or(""),
            "resuming from the last UnderlayNode seen until the API answers"
        );
    }
    let (tx, rx) = watch::channel::<Record>(cached.map(Arc::new));
    let mut tasks = vec![
        imds,
        tokio::spawn(health.serve()),
        tokio::spawn(watch_record(api.clone(), opts.node_name.clone(), tx, cache)),
        tokio::spawn(converge_loop(
            node_agent,
            rx.clone(),
            opts.clone(),
            shared.clone(),
        )),
        tokio::spawn({
            let (ipam_shared, fact_shared, fact_opts) =
                (shared.clone(), shared.clone(), opts.clone());
            status_loop(
                api,
                rx.clone(),
                opts.node_name.clone(),
                opts.status_interval,
                shared.ready.clone(),
                move || ipam_shared.ipam.get().cloned(),
                move |node| fact_shared.pool_fact(Some(&spec_from_record(node, &fact_opts))),
                config.socket.clone(),
                config.cni_conf_dir.join(names::CNI_CONFLIST),
            )
        }),
    ];

    tokio::pin!(shutdown);
    let result = tokio::select! {
        () = &mut shutdown => {
            tracing::info!("shutting down before a pool was known");
            Ok(())
        }
        spec = first_spec(rx, &opts) => {
            pool_from_record(&mut config, &spec);
            match crate::open_service(&config, fault) {
                Ok(service) => {
                    let service = Arc::new(service);
                    service.set_metrics(opts.metrics.clone());
                    if let Some(p) = &policy {
                        service.set_policy(p.engine.clone());
                    }
                    shared.set_served(spec.pod_block);
                    let _ = shared.ipam.set(service.clone());
                    shared.ready.update(|s| s.pool_present = true);
                    tracing::info!(block = %spec.pod_block, "pod block known: starting the IPAM service");
                    crate::serve(config, service, &mut shutdown).await
                }
                Err(e) => Err(e),
            }
        }
    };
    if let Some(p) = policy {
        tasks.push(p.task);
    }
    if let Some(f) = fast_path {
        f.stop();
    }
    for t in tasks.drain(..) {
        t.abort();
    }
    result
}

/// Waits for the first record that converts to a spec with a block.
async fn first_spec(mut rx: watch::Receiver<Record>, opts: &KubeAgentOptions) -> RoutedNodeSpec {
    loop {
        if let Some(node) = rx.borrow_and_update().clone()
            && let Ok(Some(spec)) = spec_from_record(&node, opts)
        {
            return spec;
        }
        if rx.changed().await.is_err() {
            // The watcher never ends on its own; without it nothing will come.
            std::future::pending::<()>().await;
        }
    }
}

/// Follows the node's own `UnderlayNode`, publishing each new version. API errors are logged and retried with
/// kube-runtime's default backoff; the channel keeps the last record meanwhile. A deleted record is kept too:
/// the node goes on running its pods until the agent is stopped.
pub(crate) async fn watch_record(
    api: Api<UnderlayNode>,
    name: String,
    tx: watch::Sender<Record>,
    cache: RecordCache,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut failing = false;
    while let Some(ev) = events.next().await {
        match ev {
            Ok(Event::Apply(node) | Event::InitApply(node)) => {
                if failing {
                    tracing::info!(node = %name, "API reachable again");
                    failing = false;
                }
                let node = Arc::new(node);
                let changed = tx.send_if_modified(|cur| {
                    let same = cur.as_ref().is_some_and(|c| {
                        c.metadata.resource_version.is_some()
                            && c.metadata.resource_version == node.metadata.resource_version
                    });
                    if !same {
                        *cur = Some(node.clone());
                    }
                    !same
                });
                if changed {
                    let (cache, node) = (cache.clone(), node.clone());
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || cache.save(&node)).await
                    {
                        tracing::warn!(error = %e, "cannot cache the UnderlayNode; a restart will wait for the API");
                    }
                }
            }
            Ok(Event::Delete(_)) => {
                tracing::warn!(node = %name, "UnderlayNode deleted; keeping the last record")
            }
            Ok(Event::Init | Event::InitDone) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(node = %name, error = %e, "watching the UnderlayNode failed; retrying with backoff, converging to the last record");
            }
            Err(e) => tracing::debug!(node = %name, error = %e, "watch retry failed"),
        }
    }
}

/// The last record seen, on disk beside the IPAM checkpoint (same lifetime: tmpfs, survives agent restarts).
#[derive(Debug, Clone)]
pub(crate) struct RecordCache(pub(crate) PathBuf);

impl RecordCache {
    pub(crate) fn beside(checkpoint: &std::path::Path) -> RecordCache {
        RecordCache(checkpoint.with_file_name(names::AGENT_RECORD_CACHE))
    }

    /// The cached record of `node`, if there is a readable one (anything else is ignored: the API decides).
    pub(crate) fn load(&self, node: &str) -> Option<UnderlayNode> {
        let bytes = match std::fs::read(&self.0) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %self.0.display(), error = %e, "cannot read the cached UnderlayNode");
                return None;
            }
        };
        match serde_json::from_slice::<UnderlayNode>(&bytes) {
            Ok(n) if n.metadata.name.as_deref() == Some(node) => Some(n),
            Ok(n) => {
                tracing::warn!(path = %self.0.display(), cached = n.metadata.name.as_deref().unwrap_or(""), "the cached UnderlayNode is another node's; ignoring it");
                None
            }
            Err(e) => {
                tracing::warn!(path = %self.0.display(), error = %e, "the cached UnderlayNode does not parse; ignoring it");
                None
            }
        }
    }

    /// Writes `node` atomically (temp file, fsync, rename).
    fn save(&self, node: &UnderlayNode) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = self.0.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(node).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.0)?;
        crate::checkpoint::sync_dir(&self.0)
    }
}

/// Converges on every record change and every `converge_interval`, to the latest usable record (with the
/// served block, if the record's changed).
async fn converge_loop(
    agent: Arc<RoutedAgent>,
    mut rx: watch::Receiver<Record>,
    opts: Arc<KubeAgentOptions>,
    shared: Arc<Shared>,
) {
    let mut tick = tokio::time::interval(opts.converge_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<RoutedNodeSpec> = None;
    let mut logged_error: Option<String> = None;
    loop {
        let woken_by_change = tokio::select! {
            _ = tick.tick() => false,
            r = rx.changed() => if r.is_err() { return } else { true },
        };
        let record = rx.borrow_and_update().clone();
        if let Some(node) = record {
            match spec_from_record(&node, &opts) {
                // A new version that changes nothing converged (the agent's own status writes, the
                // controller's forwarder role) waits for the next tick.
                Ok(Some(spec)) if woken_by_change && last.as_ref() == Some(&spec) => continue,
                Ok(Some(spec)) => last = Some(spec),
                Ok(None) => {}
                Err(e) => {
                    let msg = e.to_string();
                    if logged_error.as_ref() != Some(&msg) {
                        tracing::error!(error = %msg, "unusable UnderlayNode; converging to the last usable one");
                        logged_error = Some(msg);
                    }
                }
            }
        }
        let Some(mut spec) = last.clone() else {
            continue;
        };
        if let (Some(service), Some(served)) = (shared.ipam.get(), shared.served())
            && served != spec.pod_block
        {
            // Free to move while no pod holds an address; otherwise reported (PoolReady=False), not applied.
            match service.replace_pool(PoolSpec::Block(spec.pod_block)) {
                Ok(()) => {
                    tracing::info!(from = %served, to = %spec.pod_block, "the record's pod block changed while no address was allocated; serving the new block");
                    shared.set_served(spec.pod_block);
                }
                Err(e) => {
                    let msg = e.to_string();
                    if logged_error.as_ref() != Some(&msg) {
                        tracing::error!(record = %spec.pod_block, served = %served, error = %msg, "the record's pod block changed for a running node; keeping the served block");
                        logged_error = Some(msg);
                    }
                    spec.pod_block = served;
                }
            }
        }
        let a = agent.clone();
        let started = std::time::Instant::now();
        let r = tokio::task::spawn_blocking(move || a.converge(&spec))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        opts.metrics.record_converge(
            r.as_ref().map(|rep| rep.ops.len()).map_err(|_| ()),
            started.elapsed().as_secs_f64(),
        );
        match &r {
            Ok(rep) if !rep.ops.is_empty() => {
                tracing::info!(ops = rep.ops.len(), uplink = %rep.uplink, "node converged")
            }
            Ok(_) => tracing::debug!("node already converged"),
            Err(e) => tracing::warn!(error = %e, "converge failed"),
        }
        shared.ready.converge_result(&r);
    }
}

/// The status writer of both modes. Every `interval`: refresh the IPAM facts, compute the wanted status
/// (`pool_fact` says what the pool is, given the current record), and merge-patch it when it differs from what
/// was last written. Failures back off (doubling, capped); a 409 re-reads and retries.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn status_loop(
    api: Api<UnderlayNode>,
    rx: watch::Receiver<Record>,
    name: String,
    interval: Duration,
    ready: Ready,
    ipam: impl Fn() -> Option<Arc<IpamService>>,
    pool_fact: impl Fn(&UnderlayNode) -> PoolFact,
    socket: PathBuf,
    conflist: PathBuf,
) {
    let mut written: Option<AgentStatus> = None;
    let mut delay = interval;
    loop {
        tokio::time::sleep(delay).await;
        let started = ipam().is_some();
        let serving = started
            && matches!(
                tokio::time::timeout(IPAM_PROBE_TIMEOUT, tokio::net::UnixStream::connect(&socket))
                    .await,
                Ok(Ok(_))
            );
        let cni = started && conflist.is_file();
        ready.update(|s| {
            s.ipam_serving = serving;
            s.conflist_written = cni;
        });
        let Some(node) = rx.borrow().clone() else {
            continue;
        };
        let state = ready.snapshot();
        let held = ipam().and_then(|s| s.held_report());
        // A generation counts only for the object it came from: a recreated UnderlayNode starts again at 0.
        let observed_release_generation = held
            .as_ref()
            .and_then(|h| h.release.as_ref())
            .filter(|r| node.metadata.uid.as_deref() == Some(r.record_uid.as_str()))
            .map(|r| r.generation);
        let facts = AgentFacts {
            pool: pool_fact(&node),
            cni_configured: cni,
            ipam_serving: serving,
            converged: match (state.converged, state.last_error) {
                (true, _) => Some(Ok(())),
                (false, Some(e)) => Some(Err(e)),
                (false, None) => None,
            },
            pool_used: ipam()
                .map(|s| u32::try_from(s.allocated()).unwrap_or(u32::MAX))
                .unwrap_or(0),
            pool_held: held
                .as_ref()
                .map(|h| h.held.iter().map(ToString::to_string).collect()),
            pool_cooling: held
                .as_ref()
                .map(|h| h.cooling.iter().map(ToString::to_string).collect()),
            observed_release_generation,
        };
        let generation = node.metadata.generation;
        let base = written
            .clone()
            .unwrap_or_else(|| AgentStatus::of(node.status.as_ref()));
        match write_status(&api, &name, base, &facts, generation).await {
            Ok(w) => {
                if delay > interval {
                    tracing::info!(node = %name, "status written again");
                }
                written = Some(w);
                delay = interval;
            }
            Err(e) => {
                if delay == interval {
                    tracing::warn!(node = %name, error = %e, "writing UnderlayNode status failed; retrying with backoff");
                } else {
                    tracing::debug!(node = %name, error = %e, "status retry failed");
                }
                delay = (delay * 2).min(STATUS_BACKOFF_MAX.max(interval));
            }
        }
    }
}

/// Writes the wanted status if it differs from `base` (the last written, or the server's); returns what the
/// server now holds for the agent's fields.
pub(crate) async fn write_status(
    api: &Api<UnderlayNode>,
    name: &str,
    mut base: AgentStatus,
    facts: &AgentFacts,
    generation: Option<i64>,
) -> Result<AgentStatus, ::kube::Error> {
    let params = PatchParams {
        field_manager: Some(names::FIELD_MANAGER_AGENT.to_string()),
        ..PatchParams::default()
    };
    let mut attempt = 0;
    loop {
        let want = desired_status(&base, facts, generation, Timestamp::now());
        if want == base {
            return Ok(base);
        }
        match api
            .patch_status(name, &params, &Patch::Merge(want.merge_patch()))
            .await
        {
            Ok(node) => {
                tracing::debug!(node = %name, "status written");
                return Ok(AgentStatus::of(node.status.as_ref()));
            }
            Err(::kube::Error::Api(s)) if s.code == 409 && attempt < STATUS_CONFLICT_RETRIES => {
                attempt += 1;
                tracing::debug!(node = %name, attempt, "status write conflicted; re-reading");
                let node = api.get_status(name).await?;
                base = AgentStatus::of(node.status.as_ref());
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use underlay_api::{Pool, UnderlayNodeSpec};

    fn opts() -> KubeAgentOptions {
        KubeAgentOptions::new(
            "n1",
            "100.64.0.0/10".parse().unwrap(),
            vec!["198.18.0.0/15".parse().unwrap()],
        )
    }

    fn record(block: Option<&str>) -> UnderlayNode {
        let mut n = UnderlayNode::new(
            "n1",
            UnderlayNodeSpec {
                instance_id: "i-1".into(),
                subnet_id: "subnet-1".into(),
                zone: "z".into(),
                mode: Mode::Routed,
                node_ip: "198.18.0.10".into(),
                primary_eni_id: "eni-1".into(),
            },
        );
        n.status = Some(UnderlayNodeStatus {
            pool: block.map(|b| Pool {
                block: Some(b.into()),
                ..Pool::default()
            }),
            ..Default::default()
        });
        n
    }

    fn facts() -> AgentFacts {
        AgentFacts {
            pool: PoolFact::Serving("100.64.0.0/26".parse().unwrap()),
            cni_configured: true,
            ipam_serving: true,
            converged: Some(Ok(())),
            pool_used: 3,
            pool_held: None,
            pool_cooling: None,
            observed_release_generation: None,
        }
    }

    fn cond<'a>(s: &'a AgentStatus, ty: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == ty).unwrap()
    }

    #[test]
    fn no_block_is_no_spec_yet() {
        assert_eq!(spec_from_record(&record(None), &opts()), Ok(None));
    }

    #[test]
    fn eni_mode_is_refused() {
        let mut r = record(Some("100.64.0.0/26"));
        r.spec.mode = Mode::Eni;
        assert_eq!(
            spec_from_record(&r, &opts()),
            Err(RecordError::NotRouted(Mode::Eni))
        );
    }

    #[test]
    fn transition_time_moves_only_on_a_status_change() {
        let t0 = Timestamp::from_second(1_000_000).unwrap();
        let t1 = Timestamp::from_second(2_000_000).unwrap();
        let first = desired_status(&AgentStatus::of(None), &facts(), Some(1), t0);
        assert_eq!(cond(&first, conditions::READY).status, "True");
        assert_eq!(first.pool_used, 3);
        let mut f = facts();
        f.converged = Some(Err("boom".into()));
        let second = desired_status(&first, &f, Some(2), t1);
        assert_eq!(cond(&second, conditions::CONVERGED).status, "False");
        assert_eq!(cond(&second, conditions::CONVERGED).message, "boom");
        assert_eq!(
            cond(&second, conditions::CONVERGED).last_transition_time,
            Time(t1)
        );
        assert_eq!(cond(&second, conditions::READY).reason, "NotConverged");
        assert_eq!(
            cond(&second, conditions::POOL_READY).last_transition_time,
            Time(t0)
        );
        assert_eq!(second.observed_generation, Some(2));
        // Same facts again: nothing to write.
        assert_eq!(desired_status(&second, &f, Some(2), t1), second);
    }
}
