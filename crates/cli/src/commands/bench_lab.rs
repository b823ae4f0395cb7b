//! `underlay bench lab`: a whole routed-mode lab (default 60 nodes, 600 pods, a 50-route limit, low on purpose so blocks aggregate) built on this
//! machine: build time per step, each node's time from its Node object to its taint's removal, pod↔pod latency per
//! path class next to node↔node in the same fabric, and memory.
//!
//! Memory: the controller and every agent run in this one process (the lab gives them an in-process API server),
//! so the peak resident set is the whole lab's; the per-agent figure is the growth of the process's resident set
//! while the agents started and converged, divided by the node count — an estimate, not a per-process peak.

use std::path::PathBuf;

use serde::Serialize;
use underlay_lab::scenario::{CheckReport, Lab, StatusReport};

use super::bench_plan::status_kib;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value = "bench")]
    name: String,
    #[arg(long, default_value_t = 60)]
    nodes: usize,
    #[arg(long, default_value_t = 10)]
    pods_per_node: usize,
    #[arg(long, default_value_t = 3)]
    zones: usize,
    #[arg(long, default_value_t = 2)]
    subnets_per_zone: usize,
    #[arg(long, default_value_t = 50)]
    route_limit: usize,
    /// The underlay-cni binary (default: next to this executable).
    #[arg(long)]
    cni_plugin: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    nodes: usize,
    pods: usize,
    route_limit: usize,
    /// Seconds per build step (fabric, controller, nodes ready, pods, total).
    build_s: std::collections::BTreeMap<String, f64>,
    /// Node object created → `underlay.dev/not-ready` taint removed, per node (ms).
    taint_removed_ms_p50: f64,
    taint_removed_ms_max: f64,
    /// Median pod↔pod latency per path class and node↔node in the same run (µs).
    latency_us: std::collections::BTreeMap<&'static str, f64>,
    direct_vs_node_ratio: Option<f64>,
    pairs_checked: usize,
    pairs_ok: usize,
    sampled: bool,
    /// Whole lab process (controller + agents + harness) peak resident set.
    process_peak_rss_kib: u64,
    /// Resident set before the lab was built.
    baseline_rss_kib: u64,
    /// (resident set after every node was ready − before the agents started) / nodes: an estimate.
    per_agent_rss_estimate_kib: u64,
    memory_scope: &'static str,
    status: StatusReport,
    check: CheckReport,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    // The same shape and validation as `underlay lab up`, at benchmark size; AWS's 30 s hold-down.
    let c = super::lab::config(&super::lab::Shape {
        name: args.name,
        zones: args.zones,
        subnets_per_zone: args.subnets_per_zone,
        nodes: args.nodes,
        pods_per_node: args.pods_per_node,
        route_limit: args.route_limit,
        seed: 1,
        block: 26,
        probe_interval_ms: 1000,
        hold_down_s: 30,
        cni_plugin: args.cni_plugin,
        mode: super::lab::LabMode::Routed,
        instance_type: underlay_lab::scenario::NODE_TYPE.to_string(),
        // Build times comparable with earlier runs: EC2 answers at once (the token buckets still apply).
        no_aws_latency: true,
    })?;
    let baseline = status_kib("VmRSS:")?;
    let lab = Lab::up(c)?;
    let status = lab.status();
    let after_up = status_kib("VmRSS:")?;
    let check = lab.check();
    let peak = status_kib("VmHWM:")?;
    let down = lab.down();
    let check = check?;
    down?;
    let report = Report {
        nodes: status.nodes,
        pods: status.pods,
        route_limit: status.route_limit,
        build_s: status.build_s.clone(),
        taint_removed_ms_p50: status.ready_ms_p50,
        taint_removed_ms_max: status.ready_ms_max,
        latency_us: check.latency_us.clone(),
        direct_vs_node_ratio: check.direct_vs_node_ratio,
        pairs_checked: check.pairs_checked,
        pairs_ok: check.pairs_ok,
        sampled: check.sampled,
        process_peak_rss_kib: peak,
        baseline_rss_kib: baseline,
        per_agent_rss_estimate_kib: after_up.saturating_sub(baseline) / status.nodes.max(1) as u64,
        memory_scope: "one process: controller, every agent and the lab harness",
        status,
        check,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    if report.pairs_ok != report.pairs_checked {
        anyhow::bail!(
            "{} of {} pairs unreachable",
            report.pairs_checked - report.pairs_ok,
            report.pairs_checked
        );
    }
    Ok(())
}
