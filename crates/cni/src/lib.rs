//! underlay-cni: the CNI plugin the container runtime runs for every pod (spec 1.1.0; 0.4.0 and 1.0.0
//! configurations accepted). Addresses come from the node agent over its unix socket.
//!
//! ```text
//!   env + stdin ──► invocation::parse (pure, validated) ──► plugin::run ──► stdout: result JSON
//!                                                              │             or spec error JSON + exit 1
//!                     underlay-ipam-api Client ◄───────────────┤ (Allocate/Release/List/Gc)
//!                     underlay-dataplane Netlink ◄─────────────┘ (veth, /32, routes, neighbour)
//! ```
//!
//! Stdout is the protocol: logs go to stderr or to `logFile`. No async runtime: every step is one
//! synchronous system call or socket round trip. See docs/cni.md for the configuration and the contract.

pub mod invocation;
pub mod naming;
pub mod plugin;
pub mod spec;

use serde_json::Value;

pub use spec::CniError;

/// Parses and runs one invocation. On error, the caller prints `CniError::to_json(version)` with the
/// returned version and exits non-zero.
pub fn run(
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Result<Option<Value>, (CniError, String)> {
    let inv = invocation::parse(env, stdin).map_err(|e| (e, invocation::reply_version(stdin)))?;
    init_logging(&inv.conf);
    tracing::debug!(command = ?inv.command, container = %inv.container_id, ifname = %inv.ifname, "invoked");
    plugin::run(&inv).map_err(|e| {
        tracing::error!(command = ?inv.command, container = %inv.container_id, error = %e, "failed");
        (e, inv.conf.cni_version.clone())
    })
}

fn init_logging(conf: &spec::NetConf) {
    use tracing_subscriber::filter::LevelFilter;
    let level = match conf.log_level.as_deref() {
        Some("error") => LevelFilter::ERROR,
        Some("info") => LevelFilter::INFO,
        Some("debug") => LevelFilter::DEBUG,
        Some("trace") => LevelFilter::TRACE,
        _ => LevelFilter::WARN,
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false);
    let file = conf.log_file.as_ref().and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    let _ = match file {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}
