//! One module per subcommand, each with `Args` and `exec`.

pub mod agent;
pub mod bench;
pub mod bench_cni;
pub mod bench_datapath;
pub mod bench_lab;
pub mod bench_plan;
pub mod bench_policy;
pub mod bench_policy_compile;
pub mod bench_scaleout;
pub mod controller;
pub mod crd;
pub mod iam_policy;
pub mod inspect;
pub mod lab;
pub mod lab_policy;
pub mod lab_soak;
pub mod names;
pub mod plan;
pub mod version;

/// Logs to stderr (stdout carries reports and protocols), filtered by `RUST_LOG`, else at `default`; one JSON
/// object per line when `UNDERLAY_LOG_FORMAT=json` (the chart's `logFormat`), else text.
pub fn init_tracing(default: &str) {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default))
    };
    let format = std::env::var(underlay_core::names::LOG_FORMAT_ENV).unwrap_or_default();
    if format == "json" {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_env_filter(filter())
            .try_init();
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter())
        .try_init();
    if !format.is_empty() && format != "text" {
        tracing::warn!(
            "{}={format:?} is neither text nor json: logging text",
            underlay_core::names::LOG_FORMAT_ENV
        );
    }
}

/// The `underlay-cni` binary: `given`, else the one installed next to this executable.
pub fn plugin_path(given: Option<std::path::PathBuf>) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    match given {
        Some(p) => Ok(p),
        None => Ok(std::env::current_exe()
            .context("locating this executable")?
            .parent()
            .context("executable has no directory")?
            .join(underlay_core::names::CNI_PLUGIN)),
    }
}
