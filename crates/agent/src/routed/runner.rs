//! `underlay agent --routed-spec FILE`: the IPAM service with its pool taken from the node record, plus the
//! routed-mode converge loop and the health endpoint, in one process.
//!
//! ```text
//!   load RoutedNodeSpec ──► pool_from_record(config) ──► crate::run (IPAM socket, conflist)   until shutdown
//!        ├─ health endpoint (bound inside the node's namespace), with /metrics   ◄── controller probe, Prometheus
//!        ├─ converge loop: RoutedAgent::converge every `interval` (blocking thread) ──► Ready.converged
//!        └─ status loop, every second: the IPAM socket answers? the conflist exists? ──► Ready
//! ```
//!
//! The IPAM side is observed from outside (a connect to its socket, the conflist on disk) so this module
//! needs no hook inside `crate::run`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use underlay_core::names;
use underlay_core::node::RoutedNodeSpec;
use underlay_dataplane::Netns;

use super::{RoutedAgent, pool_from_record};
use crate::health_http::{HealthServer, Ready};
use crate::metrics::AgentMetrics;
use crate::{AgentConfig, AgentError, Fault};

/// Default interval between converges (drift repair; a changed record restarts the agent for now).
pub const DEFAULT_CONVERGE_INTERVAL: Duration = Duration::from_secs(10);
/// Interval of the IPAM status check.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// How to run routed mode.
#[derive(Debug, Clone)]
pub struct RoutedOptions {
    pub spec: RoutedNodeSpec,
    /// The node's namespace; `None` is the agent's own (hostNetwork in a cluster).
    pub netns: Option<PathBuf>,
    pub health_addr: SocketAddr,
    pub converge_interval: Duration,
    /// Served on the health endpoint's `/metrics`.
    pub metrics: AgentMetrics,
}

impl RoutedOptions {
    pub fn new(spec: RoutedNodeSpec) -> Self {
        RoutedOptions {
            spec,
            netns: None,
            health_addr: default_health_addr(),
            converge_interval: DEFAULT_CONVERGE_INTERVAL,
            metrics: AgentMetrics::new(),
        }
    }
}

/// `0.0.0.0:9650`.
pub fn default_health_addr() -> SocketAddr {
    SocketAddr::new(
        std::net::Ipv4Addr::UNSPECIFIED.into(),
        names::AGENT_HEALTH_PORT,
    )
}

/// Reads a node record (YAML or JSON).
pub fn load_spec(path: &Path) -> Result<RoutedNodeSpec, AgentError> {
    let text = std::fs::read_to_string(path).map_err(|source| AgentError::Io {
        what: "read the node record",
        path: path.to_owned(),
        source,
    })?;
    let spec: RoutedNodeSpec = serde_yaml::from_str(&text)
        .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
    spec.validate()
        .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
    Ok(spec)
}

/// Runs the agent in routed mode until `shutdown` completes. Must run inside a multi-threaded tokio runtime.
pub async fn run_routed(
    mut config: AgentConfig,
    opts: RoutedOptions,
    fault: Fault,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    pool_from_record(&mut config, &opts.spec);
    let ready = Ready::default();
    ready.update(|s| s.pool_present = config.validate().is_ok());

    let ns = match &opts.netns {
        Some(p) => Netns::open(p),
        None => Netns::current(),
    }
    .map_err(|e| AgentError::Config(format!("node namespace: {e}")))?;
    let listener = bind_in(&ns, opts.health_addr)?;
    let health = HealthServer::from_std(listener, ready.clone(), Some(config.socket.clone()))?
        .with_metrics(opts.metrics.clone());
    tracing::info!(addr = %opts.health_addr, "health endpoint listening");
    let health_task = tokio::spawn(health.serve());

    let agent = Arc::new(RoutedAgent::new(ns));
    let converge_task = {
        let (agent, ready, spec) = (agent.clone(), ready.clone(), opts.spec.clone());
        let metrics = opts.metrics.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(opts.converge_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (agent, spec) = (agent.clone(), spec.clone());
                let started = std::time::Instant::now();
                let r = tokio::task::spawn_blocking(move || agent.converge(&spec))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                metrics.record_converge(
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
                ready.converge_result(&r);
            }
        })
    };
    let status_task = {
        let ready = ready.clone();
        let socket = config.socket.clone();
        let conflist = config.cni_conf_dir.join(names::CNI_CONFLIST);
        tokio::spawn(async move {
            loop {
                let serving = matches!(
                    tokio::time::timeout(
                        Duration::from_millis(500),
                        tokio::net::UnixStream::connect(&socket)
                    )
                    .await,
                    Ok(Ok(_))
                );
                let written = conflist.is_file();
                ready.update(|s| {
                    s.ipam_serving = serving;
                    s.conflist_written = written;
                });
                tokio::time::sleep(STATUS_INTERVAL).await;
            }
        })
    };

    let result = match crate::open_service(&config, fault) {
        Ok(service) => {
            let service = Arc::new(service);
            service.set_metrics(opts.metrics.clone());
            crate::serve(config, service, shutdown).await
        }
        Err(e) => Err(e),
    };
    health_task.abort();
    converge_task.abort();
    status_task.abort();
    result
}

/// The node's namespace (`netns`, or the agent's own) and the health endpoint bound inside it on `addr`, serving
/// `ready` (and `/metrics`); both modes on Kubernetes start this way.
pub(crate) fn node_health(
    netns: Option<&Path>,
    addr: SocketAddr,
    ready: Ready,
    socket: PathBuf,
    metrics: AgentMetrics,
    node: &str,
) -> Result<(Netns, HealthServer), AgentError> {
    let ns = match netns {
        Some(p) => Netns::open(p),
        None => Netns::current(),
    }
    .map_err(|e| AgentError::Config(format!("node namespace: {e}")))?;
    let listener = bind_in(&ns, addr)?;
    let echo = bind_echo_in(&ns, addr)?;
    let health = HealthServer::from_std(listener, ready, Some(socket))?
        .with_metrics(metrics)
        .with_probe_echo(echo)?;
    tracing::info!(addr = %addr, node = %node, "health endpoint and probe echo listening");
    Ok((ns, health))
}

/// The forwarder probe's UDP socket on `addr`, created inside `ns`.
pub(crate) fn bind_echo_in(
    ns: &Netns,
    addr: SocketAddr,
) -> Result<std::net::UdpSocket, AgentError> {
    ns.run(move || Ok(std::net::UdpSocket::bind(addr)))
        .map_err(|e| AgentError::Config(format!("entering the node namespace: {e}")))?
        .map_err(|source| AgentError::Io {
            what: "bind the probe echo",
            path: PathBuf::from(addr.to_string()),
            source,
        })
}

/// A listening TCP socket created inside `ns` (it stays there whichever thread uses it).
pub(crate) fn bind_in(ns: &Netns, addr: SocketAddr) -> Result<std::net::TcpListener, AgentError> {
    let io = |source| AgentError::Io {
        what: "bind the health endpoint",
        path: PathBuf::from(addr.to_string()),
        source,
    };
    let l = ns
        .run(move || Ok(std::net::TcpListener::bind(addr)))
        .map_err(|e| AgentError::Config(format!("entering the node namespace: {e}")))?
        .map_err(io)?;
    l.set_nonblocking(true).map_err(io)?;
    Ok(l)
}
