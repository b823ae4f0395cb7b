//! `underlay bench policy`: NetworkPolicy's cost on the lab (JSON): event → kernel for NetworkPolicy and Pod
//! events, CNI ADD with and without policies, the node's nftables object count, memory, and pod↔pod latency and
//! throughput with `--policies` policies against none, in the same run. See
//! `underlay_lab::scenario::policy::bench`.

use std::path::PathBuf;
use std::time::Duration;

use underlay_lab::scenario::policy::bench::BenchShape;
use underlay_lab::scenario::policy::{PolicyLab, ProbeOptions};
use underlay_lab::scenario::{LabConfig, default_state_dir};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value = "bpol")]
    name: String,
    /// `routed` or `eni`.
    #[arg(long, default_value = "routed")]
    mode: String,
    /// Pod objects in the API besides the model's nine.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 1_000)]
    policies: usize,
    /// Pods wired per CNI ADD sample.
    #[arg(long, default_value_t = 20)]
    adds: usize,
    /// NetworkPolicy events and Pod events timed to the kernel (each).
    #[arg(long, default_value_t = 20)]
    events: usize,
    #[arg(long, default_value_t = 2000)]
    event_timeout_ms: u64,
    /// How long the burst of policies may take to reach every node before events are timed anyway.
    #[arg(long, default_value_t = 180)]
    burst_timeout_s: u64,
    #[arg(long, default_value_t = 500)]
    rtt_rounds: usize,
    #[arg(long, default_value_t = 2000)]
    throughput_ms: u64,
    /// The underlay-cni binary (default: next to this executable).
    #[arg(long)]
    cni_plugin: Option<PathBuf>,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let mut config = LabConfig::demo(super::plugin_path(args.cni_plugin)?);
    config.name = args.name.clone();
    config.state_dir = default_state_dir(&args.name);
    config.mode = match args.mode.as_str() {
        "routed" => underlay_api::Mode::Routed,
        "eni" => underlay_api::Mode::Eni,
        other => anyhow::bail!("--mode {other}: routed or eni"),
    };
    if args.pods > 30_000 {
        anyhow::bail!("--pods: at most 30,000 (their addresses are taken from 100.64.128.0/17)");
    }
    underlay_lab::sweep(&args.name)?;
    let shape = BenchShape {
        pods: args.pods,
        policies: args.policies,
        adds: args.adds,
        events: args.events,
        event_timeout: Duration::from_millis(args.event_timeout_ms),
        burst_timeout: Duration::from_secs(args.burst_timeout_s),
        rtt_rounds: args.rtt_rounds,
        throughput_for: Duration::from_millis(args.throughput_ms),
    };
    let mut lab = PolicyLab::up(config, ProbeOptions::default())?;
    let report = lab.bench(&shape);
    let down = lab.down();
    let report = report?;
    down?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
