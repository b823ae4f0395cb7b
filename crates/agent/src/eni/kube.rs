//! `eni` mode driven by the node's `UnderlayNode` (the agent in a cluster, and in the lab against the API
//! stand-in).
//!
//! ```text
//!   watch UnderlayNode <node> ──► record channel (latest) ──► converge loop: EniAgent::converge(spec)
//!     (shared with routed mode:                                 │   devices by MAC, ENI tables, SNAT
//!      field selector, backoff,                                 │
//!      record cache on disk)                                    ├─► pool = pool_addresses(spec, devices)
//!                                                               │     first non-empty pool: start IPAM (crate::serve)
//!                                                               │     later: IpamService::update_pool (keeps every
//!                                                               │     allocation: only free addresses can go)
//!   health endpoint (node netns) ◄── Ready ◄────────────────────┴─► status writer: conditions, poolUsed,
//!                                                                     poolHeld, poolCooling,
//!                                                                     observedReleaseGeneration
//! ```
//!
//! The controller owns `spec` and `status.{pool,poolSize}` and taints the Node `underlay.dev/no-free-ips` from
//! `poolSize`/`poolUsed`; the agent writes only `status.{conditions,poolUsed,poolHeld,poolCooling,
//! observedReleaseGeneration,observedGeneration}`. Addresses the controller withdraws are in the ENIs' `releasing*` lists, not in
//! `addresses`/`prefixes`, so the pool built from the record leaves them out; once the allocator serves that
//! pool, the agent reports the record's `releaseGeneration` and what it still holds, and the controller
//! unassigns the rest.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ::kube::api::Api;
use ipnet::Ipv4Net;
use tokio::sync::watch;
use underlay_api::{Mode, UnderlayNode};
use underlay_core::eni::{EniNodeSpec, EniSpecError, NodeEni, pool_addresses};
use underlay_core::ipam::{PoolAddress, PoolSpec};
use underlay_core::names;

use super::EniAgent;
use crate::config::DEFAULT_MTU;
use crate::health_http::Ready;
use crate::routed::kube::{
    DEFAULT_STATUS_INTERVAL, PoolFact, Record, RecordCache, status_loop, watch_record,
};
use crate::routed::runner::{DEFAULT_CONVERGE_INTERVAL, default_health_addr, node_health};
use crate::service::ReleaseEpoch;
use crate::{AgentConfig, AgentError, Fault, IpamService};

/// How to run `eni` mode from the Kubernetes API.
#[derive(Debug, Clone)]
pub struct EniKubeOptions {
    /// This node's name: the `UnderlayNode` (and `Node`) name.
    pub node_name: String,
    /// The VPC's CIDRs: traffic to them keeps its pod source address and leaves by the pod's ENI.
    pub vpc_cidrs: Vec<Ipv4Net>,
    /// Source NAT of off-VPC traffic happens outside the node (`--external-snat`).
    pub external_snat: bool,
    /// MTU of secondary ENI devices and of pods.
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

impl EniKubeOptions {
    /// Options with the defaults: jumbo MTU, node SNAT, own namespace, `0.0.0.0:9650`, the default intervals.
    pub fn new(node_name: impl Into<String>, vpc_cidrs: Vec<Ipv4Net>) -> Self {
        EniKubeOptions {
            node_name: node_name.into(),
            vpc_cidrs,
            external_snat: false,
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

/// Why an `UnderlayNode` cannot be turned into an [`EniNodeSpec`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EniRecordError {
    #[error("the record's mode is {0:?}; this agent runs eni mode")]
    NotEni(Mode),
    #[error("spec.nodeIP {0:?} is not an IPv4 address")]
    NodeIp(String),
    #[error("status.pool.enis[{eni}].{field}: {value:?} is not {expected}")]
    Eni {
        eni: String,
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{0}")]
    Spec(#[from] EniSpecError),
}

/// The record as a converge spec: node IP from `spec`, the ENIs from `status.pool.enis`, VPC CIDRs, SNAT and
/// MTU from `opts`. A record without ENIs is a spec without ENIs (the node converges, the pool waits).
pub fn eni_spec_from_record(
    node: &UnderlayNode,
    opts: &EniKubeOptions,
) -> Result<EniNodeSpec, EniRecordError> {
    if node.spec.mode != Mode::Eni {
        return Err(EniRecordError::NotEni(node.spec.mode));
    }
    let node_ip: Ipv4Addr = node
        .spec
        .node_ip
        .parse()
        .map_err(|_| EniRecordError::NodeIp(node.spec.node_ip.clone()))?;
    let enis = node
        .status
        .as_ref()
        .and_then(|s| s.pool.as_ref())
        .map(|p| p.enis.as_slice())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(enis.len());
    for e in enis {
        let bad = |field, value: &str, expected| EniRecordError::Eni {
            eni: e.id.clone(),
            field,
            value: value.to_string(),
            expected,
        };
        let mac = e
            .mac
            .as_deref()
            .ok_or_else(|| bad("mac", "", "a MAC address"))?;
        let subnet = e.subnet_cidr.as_deref().unwrap_or_default();
        let subnet_cidr: Ipv4Net = subnet
            .parse()
            .map_err(|_| bad("subnetCidr", subnet, "an IPv4 CIDR"))?;
        let primary_ip = e
            .primary_ip
            .as_deref()
            .map(|p| {
                p.parse()
                    .map_err(|_| bad("primaryIp", p, "an IPv4 address"))
            })
            .transpose()?;
        let addresses = e
            .addresses
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|_| bad("addresses", a, "an IPv4 address"))
            })
            .collect::<Result<Vec<Ipv4Addr>, _>>()?;
        let prefixes = e
            .prefixes
            .iter()
            .map(|p| p.parse().map_err(|_| bad("prefixes", p, "an IPv4 CIDR")))
            .collect::<Result<Vec<Ipv4Net>, _>>()?;
        out.push(NodeEni {
            id: e.id.clone(),
            device_index: e.device_index,
            mac: mac.to_ascii_lowercase(),
            subnet_cidr,
            primary_ip,
            addresses,
            prefixes,
        });
    }
    let spec = EniNodeSpec {
        node: node.metadata.name.clone().unwrap_or_default(),
        node_ip,
        vpc_cidrs: opts.vpc_cidrs.clone(),
        external_snat: opts.external_snat,
        mtu: opts.mtu,
        enis: out,
    };
    spec.validate()?;
    Ok(spec)
}

/// What the tasks share.
#[derive(Debug, Default)]
struct Shared {
    ready: Ready,
    /// The IPAM service, once started.
    ipam: OnceLock<Arc<IpamService>>,
}

/// Runs the agent in `eni` mode from the node's `UnderlayNode` until `shutdown` completes. Must run inside a
/// multi-threaded tokio runtime. Never returns because the API fails: it keeps the last record it saw.
pub async fn run_eni_on_kube(
    mut config: AgentConfig,
    client: ::kube::Client,
    opts: EniKubeOptions,
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

    let node_agent = Arc::new(EniAgent::new(ns));
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
    let inside = opts.vpc_cidrs.clone();
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
    let (tx, rx) = watch::channel::<Record>(cached.map(Arc::new));
    let (pool_tx, pool_rx) = watch::channel::<Vec<PoolAddress>>(Vec::new());
    let mut tasks = vec![
        imds,
        tokio::spawn(health.serve()),
        tokio::spawn(watch_record(api.clone(), opts.node_name.clone(), tx, cache)),
        tokio::spawn(converge_loop(
            node_agent,
            rx.clone(),
            opts.clone(),
            shared.clone(),
            pool_tx,
        )),
        tokio::spawn({
            let (ipam_shared, fact_shared, fact_opts) =
                (shared.clone(), shared.clone(), opts.clone());
            status_loop(
                api,
                rx,
                opts.node_name.clone(),
                opts.status_interval,
                shared.ready.clone(),
                move || ipam_shared.ipam.get().cloned(),
                move |node| match (
                    fact_shared.ipam.get(),
                    eni_spec_from_record(node, &fact_opts),
                ) {
                    (Some(s), _) => PoolFact::ServingAddresses(s.capacity()),
                    (None, Err(e)) => PoolFact::Invalid(e.to_string()),
                    (None, Ok(_)) => PoolFact::WaitingForEnis,
                },
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
        pool = first_pool(pool_rx) => {
            config.pool.block = None;
            config.pool.addresses = pool;
            config.mtu = opts.mtu;
            match crate::open_service(&config, fault) {
                Ok(service) => {
                    let service = Arc::new(service);
                    service.set_metrics(opts.metrics.clone());
                    if let Some(p) = &policy {
                        service.set_policy(p.engine.clone());
                    }
                    let _ = shared.ipam.set(service.clone());
                    shared.ready.update(|s| s.pool_present = true);
                    tracing::info!(addresses = service.capacity(), "ENI addresses known: starting the IPAM service");
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

/// The withdrawals a pool built from `node` leaves out (its releasing lists are not in [`EniNodeSpec`]): the
/// record's uid and `pool.releaseGeneration`. `None` for a record without a uid (never from the API server).
fn release_epoch(node: &UnderlayNode) -> Option<ReleaseEpoch> {
    Some(ReleaseEpoch {
        record_uid: node.metadata.uid.clone()?,
        generation: node
            .status
            .as_ref()
            .and_then(|s| s.pool.as_ref())
            .map_or(0, |p| p.release_generation),
    })
}

/// Waits for the first non-empty pool the converge loop publishes.
async fn first_pool(mut rx: watch::Receiver<Vec<PoolAddress>>) -> Vec<PoolAddress> {
    loop {
        let pool = rx.borrow_and_update().clone();
        if !pool.is_empty() {
            return pool;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Converges on every record change and every `converge_interval`, then hands the pool of the ENIs whose
/// devices are present to the IPAM service (or publishes it for the first start).
async fn converge_loop(
    agent: Arc<EniAgent>,
    mut rx: watch::Receiver<Record>,
    opts: Arc<EniKubeOptions>,
    shared: Arc<Shared>,
    pool_tx: watch::Sender<Vec<PoolAddress>>,
) {
    let mut tick = tokio::time::interval(opts.converge_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(EniNodeSpec, Option<ReleaseEpoch>)> = None;
    let mut logged_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = rx.changed() => if r.is_err() { return },
        }
        let record = rx.borrow_and_update().clone();
        if let Some(node) = record {
            match eni_spec_from_record(&node, &opts) {
                Ok(spec) => last = Some((spec, release_epoch(&node))),
                Err(e) => {
                    let msg = e.to_string();
                    if logged_error.as_ref() != Some(&msg) {
                        tracing::error!(error = %msg, "unusable UnderlayNode; converging to the last usable one");
                        logged_error = Some(msg);
                    }
                }
            }
        }
        let Some((spec, release)) = last.clone() else {
            continue;
        };
        let a = agent.clone();
        let s = spec.clone();
        let started = std::time::Instant::now();
        let r = tokio::task::spawn_blocking(move || a.converge(&s))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        opts.metrics.record_converge(
            r.as_ref().map(|rep| rep.ops.len()).map_err(|_| ()),
            started.elapsed().as_secs_f64(),
        );
        match &r {
            Ok(rep) => {
                if !rep.ops.is_empty() {
                    tracing::info!(
                        ops = rep.ops.len(),
                        devices = rep.devices.len(),
                        "node converged"
                    );
                }
                if !rep.missing.is_empty() {
                    tracing::info!(enis = ?rep.missing, "ENIs of the record without a device yet");
                }
                let pool = pool_addresses(&spec, &rep.devices);
                if let Some(service) = shared.ipam.get()
                    && !pool.is_empty()
                {
                    match service.update_pool(PoolSpec::Addresses(pool.clone()), release) {
                        Ok(true) => tracing::info!(addresses = pool.len(), "pool updated"),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "cannot update the pool; serving the previous one")
                        }
                    }
                }
                pool_tx.send_if_modified(|cur| {
                    let changed = *cur != pool;
                    *cur = pool;
                    changed
                });
            }
            Err(e) => tracing::warn!(error = %e, "converge failed"),
        }
        shared.ready.converge_result(&r);
    }
}

/// The node's address mode, from its `UnderlayNode`: the cached record beside `checkpoint` if there is one
/// (an agent restarting while the API is unreachable), else the API, retried (doubling to 30 s) until the
/// record exists.
pub async fn node_mode(
    client: ::kube::Client,
    node_name: &str,
    checkpoint: &std::path::Path,
) -> Mode {
    if let Some(n) = RecordCache::beside(checkpoint).load(node_name) {
        return n.spec.mode;
    }
    let api: Api<UnderlayNode> = Api::all(client);
    let mut delay = Duration::from_millis(200);
    loop {
        match api.get_opt(node_name).await {
            Ok(Some(n)) => return n.spec.mode,
            Ok(None) => {
                tracing::info!(node = %node_name, "no UnderlayNode yet; waiting for the controller")
            }
            Err(e) => {
                tracing::warn!(node = %node_name, error = %e, "reading the UnderlayNode failed")
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use underlay_api::{Pool, PoolEni, UnderlayNodeSpec, UnderlayNodeStatus};

    fn record(enis: Vec<PoolEni>) -> UnderlayNode {
        let mut n = UnderlayNode::new(
            "n1",
            UnderlayNodeSpec {
                instance_id: "i-1".into(),
                subnet_id: "subnet-1".into(),
                zone: "z".into(),
                mode: Mode::Eni,
                node_ip: "198.18.0.10".into(),
                primary_eni_id: "eni-1".into(),
            },
        );
        n.status = Some(UnderlayNodeStatus {
            pool: Some(Pool {
                enis,
                ..Pool::default()
            }),
            ..Default::default()
        });
        n
    }

    fn eni(id: &str, index: u32, addrs: &[&str], prefixes: &[&str]) -> PoolEni {
        PoolEni {
            id: id.into(),
            device_index: index,
            mac: Some(format!("02:00:00:00:00:0{index}").to_uppercase()),
            subnet_cidr: Some("198.18.0.0/24".into()),
            primary_ip: Some(format!("198.18.0.{}", 100 + index)),
            addresses: addrs.iter().map(|s| s.to_string()).collect(),
            prefixes: prefixes.iter().map(|s| s.to_string()).collect(),
            ..PoolEni::default()
        }
    }

    fn opts() -> EniKubeOptions {
        EniKubeOptions::new("n1", vec!["198.18.0.0/15".parse().unwrap()])
    }

    #[test]
    fn status_enis_become_the_spec() {
        let r = record(vec![
            eni("eni-1", 0, &["198.18.0.11"], &[]),
            eni("eni-2", 1, &["198.18.0.20"], &["198.18.0.32/28"]),
        ]);
        let s = eni_spec_from_record(&r, &opts()).unwrap();
        assert_eq!(s.node_ip, "198.18.0.10".parse::<Ipv4Addr>().unwrap());
        assert_eq!(s.enis.len(), 2);
        assert_eq!(s.enis[1].mac, "02:00:00:00:00:01");
        assert_eq!(s.pool_size(), 18);
        assert_eq!(s.enis[1].primary_ip, Some("198.18.0.101".parse().unwrap()));
        assert!(!s.external_snat);
        // No ENIs yet: a spec with none (the pool waits).
        assert!(
            eni_spec_from_record(&record(vec![]), &opts())
                .unwrap()
                .enis
                .is_empty()
        );
    }

    #[test]
    fn malformed_records_name_the_field() {
        let mut bad = eni("eni-2", 1, &["nope"], &[]);
        let e = eni_spec_from_record(&record(vec![bad.clone()]), &opts()).unwrap_err();
        assert!(
            e.to_string().contains("addresses") && e.to_string().contains("nope"),
            "{e}"
        );
        bad.addresses.clear();
        bad.primary_ip = Some("198.18.0".into());
        let e = eni_spec_from_record(&record(vec![bad.clone()]), &opts()).unwrap_err();
        assert!(e.to_string().contains("primaryIp"), "{e}");
        bad.mac = None;
        let e = eni_spec_from_record(&record(vec![bad]), &opts()).unwrap_err();
        assert!(e.to_string().contains("mac"), "{e}");
        let mut r = record(vec![]);
        r.spec.mode = Mode::Routed;
        assert_eq!(
            eni_spec_from_record(&r, &opts()),
            Err(EniRecordError::NotEni(Mode::Routed))
        );
        // An address outside its ENI's subnet fails the spec's own validation.
        let r = record(vec![eni("eni-2", 1, &["198.19.0.20"], &[])]);
        assert!(matches!(
            eni_spec_from_record(&r, &opts()),
            Err(EniRecordError::Spec(_))
        ));
    }
}
