//! underlay-agent: the node agent. It owns the node's pod address pool and serves it to the
//! `underlay-cni` plugin, and converges routes (`routed`) or ENI devices and tables (`eni`) and nftables from
//! its UnderlayNode.
//!
//! ```text
//!   AgentConfig (YAML) ──► run()
//!                            ├─ IpamService = Mutex{ core::ipam::Ipam + Checkpoint }   load (corrupt: rebuild from kernel)
//!                            ├─ install <cni_bin_dir>/underlay-cni                     atomic copy, 0755
//!                            ├─ IpamListener on <socket> (0600)  ◄── underlay-cni: Allocate/Release/List/Gc
//!                            │      each change: allocator → checkpoint (fsync, rename, fsync dir) → reply
//!                            ├─ LinkReaper thread: deletes the veths Release names, sweeps orphans
//!                            └─ write <cni_conf_dir>/10-underlay.conflist              once the socket answers
//! ```
//!
//! The protocol and its schema live in `underlay-ipam-api`; the allocator is pure, in `underlay-core`.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

pub mod checkpoint;
pub mod cni_install;
pub mod config;
pub mod eni;
pub mod fastpath;
pub mod health_http;
pub mod imds;
pub mod metrics;
pub mod policy;
pub mod policy_api;
pub mod reaper;
pub mod rebuild;
pub mod reclaim;
pub mod routed;
pub mod server;
pub mod service;

pub use config::AgentConfig;
pub use metrics::AgentMetrics;
pub use service::{Fault, IpamService};

/// Everything that stops the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid agent configuration: {0}")]
    Config(String),
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint cannot be trusted and the agent's namespace is not the node's (`reap_links: false`), so the
    /// state cannot be rebuilt from the node's pod veths ([`rebuild`]). Starting empty would hand out addresses
    /// that live pods hold, so the agent refuses to start.
    #[error(
        "IPAM checkpoint {} is corrupt ({reason}); refusing to start: starting empty could give \
         live pods' addresses to new pods. Repair the file, or remove it only if no pod on this node runs",
        path.display()
    )]
    CorruptCheckpoint { path: PathBuf, reason: String },
    #[error("another agent is already serving {}", .0.display())]
    AlreadyRunning(PathBuf),
}

impl AgentError {
    /// True when retrying the same start may succeed (transient I/O); configuration and corruption are not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, AgentError::Io { .. } | AgentError::AlreadyRunning(_))
    }
}

/// Opens the IPAM service from `config` (loading the checkpoint). A corrupt checkpoint is moved aside to
/// `<file>.corrupt` and the state rebuilt from the kernel ([`rebuild`]) when the agent's namespace is the node's
/// (`reap_links`, the same condition under which it owns the node's pod veths); otherwise it is refused.
pub fn open_service(config: &AgentConfig, fault: Fault) -> Result<IpamService, AgentError> {
    let spec = config.validate()?;
    let open = || {
        IpamService::open(
            spec.clone(),
            config.cooldown(),
            checkpoint::Checkpoint::new(&config.checkpoint),
            config.mtu,
            fault,
        )
    };
    match open() {
        Err(AgentError::CorruptCheckpoint { path, reason }) if config.reap_links => {
            let state = rebuild::from_kernel(&spec).map_err(|e| AgentError::CorruptCheckpoint {
                path: path.clone(),
                reason: format!("{reason}; rebuilding from the kernel failed too: {e}"),
            })?;
            let mut aside = path.clone().into_os_string();
            aside.push(".corrupt");
            std::fs::rename(&path, &aside).map_err(|source| AgentError::Io {
                what: "move the corrupt checkpoint aside",
                path: path.clone(),
                source,
            })?;
            checkpoint::Checkpoint::new(&path).save(&state)?;
            tracing::error!(
                checkpoint = %path.display(),
                kept_as = %std::path::Path::new(&aside).display(),
                %reason,
                pods = state.allocations.len(),
                "IPAM checkpoint corrupt: rebuilt from the node's pod veths and routes"
            );
            let service = open()?;
            service.note_rebuilt(reason);
            Ok(service)
        }
        other => other,
    }
}

/// Runs the agent until `shutdown` completes. Must run inside a tokio runtime.
pub async fn run(
    config: AgentConfig,
    fault: Fault,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let service = Arc::new(open_service(&config, fault)?);
    serve(config, service, shutdown).await
}

/// Serves an opened `service` (from [`open_service`] over the same `config`) until `shutdown` completes: link
/// reaper, plugin install, IPAM socket, conflist. A caller that keeps the `Arc` can read the service meanwhile
/// (the Kubernetes status writer reports [`IpamService::allocated`]).
pub async fn serve(
    config: AgentConfig,
    service: Arc<IpamService>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    if config.reap_links {
        let owner = Arc::downgrade(&service);
        match reaper::LinkReaper::spawn(Box::new(move || {
            owner.upgrade().map(|s| s.owned_veth_names())
        })) {
            Ok(r) => {
                service.set_reaper(r);
                service.sweep_links();
            }
            Err(e) => tracing::warn!(error = %e, "no link reaper: DEL deletes pod veths itself"),
        }
        match reclaim::spawn(
            Arc::downgrade(&service),
            config.reclaim_interval(),
            config.reclaim_grace(),
        ) {
            Ok(()) => tracing::info!(
                interval_secs = config.reclaim_interval_secs,
                grace_secs = config.reclaim_grace_secs,
                "reclaiming addresses whose sandbox is gone"
            ),
            Err(e) => tracing::warn!(error = %e, "no reclaim of addresses whose sandbox is gone"),
        }
    } else {
        tracing::info!(
            "link reaper and reclaim off (reap_links: false): DEL deletes pod veths itself"
        );
    }
    tracing::info!(
        pool = %config.validate()?,
        allocated = service.allocated(),
        checkpoint = %config.checkpoint.display(),
        cooldown_secs = config.cooldown_secs,
        "IPAM state loaded"
    );
    match &config.plugin_source {
        Some(src) => {
            let installed = cni_install::install_plugin(src, &config.cni_bin_dir)?;
            tracing::info!(from = %src.display(), to = %installed.display(), "CNI plugin installed");
        }
        None => tracing::info!("no plugin_source configured: CNI plugin not installed"),
    }
    match &config.chained_plugins_dir {
        Some(dir) => {
            let installed = cni_install::install_chained_plugins(dir, &config.cni_bin_dir)?;
            tracing::info!(from = %dir.display(), plugins = ?installed, "chained CNI plugins installed");
        }
        None => tracing::info!(
            "no chained_plugins_dir configured: portmap and bandwidth must already be in the CNI bin directory"
        ),
    }
    let listener = server::IpamListener::bind(&config.socket)?;
    tracing::info!(socket = %listener.path().display(), "IPAM socket listening");
    let conflist = cni_install::write_conflist(&config.cni_conf_dir, &config.socket, config.mtu)?;
    tracing::info!(path = %conflist.display(), "CNI configuration written");
    if config.cni_exclusive {
        for moved in cni_install::move_aside_other_configs(&config.cni_conf_dir)? {
            tracing::info!(to = %moved.display(), "cni exclusive: other CNI configuration moved aside");
        }
    }
    tokio::select! {
        () = listener.serve(service) => {}
        () = shutdown => tracing::info!("shutting down"),
    }
    Ok(())
}
