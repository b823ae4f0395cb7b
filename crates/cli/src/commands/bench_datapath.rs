//! `underlay bench datapath`: pod↔pod against node↔node on the same path, in one lab (1 zone, 2 subnets,
//! 4 nodes, 2 pods each, one aggregated route per subnet so that a forwarder path exists), with the tc-BPF fast
//! path on and forced off: TCP and UDP request/response latency (p50, p99, p99.9, jitter = p99/p50) from
//! interleaved round trips, and iperf3 throughput with 1 and 4 streams. JSON on stdout, progress on stderr.

use std::path::PathBuf;

use serde::Serialize;
use underlay_lab::scenario::{DatapathOptions, DatapathRun, Lab};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Modes {
    Routed,
    Eni,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FastPath {
    On,
    Off,
    Both,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Lab id (1–6 lowercase letters or digits).
    #[arg(long, default_value = "bdp")]
    name: String,
    #[arg(long, value_enum, default_value = "both")]
    mode: Modes,
    /// Measure with the fast path on, forced off, or both in the same lab (on first).
    #[arg(long, value_enum, default_value = "both")]
    fast_path: FastPath,
    /// Round trips per class and protocol.
    #[arg(long, default_value_t = 100_000)]
    round_trips: usize,
    /// Seconds per iperf3 run (0: skip throughput).
    #[arg(long, default_value_t = 5)]
    iperf_seconds: u32,
    /// The underlay-cni binary (default: next to this executable).
    #[arg(long)]
    cni_plugin: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Bar {
    bar: &'static str,
    value: Option<f64>,
    met: bool,
}

#[derive(Debug, Serialize)]
struct ModeReport {
    mode: &'static str,
    runs: Vec<DatapathRun>,
    /// Issue 15's bars, on the fast-path-on run: same-subnet pod↔pod over node↔node.
    bars: Vec<Bar>,
}

#[derive(Debug, Serialize)]
struct Report {
    /// `dev` or `release`: the harness's own build (the datapath under test is the kernel's either way).
    build: &'static str,
    round_trips: usize,
    iperf_seconds: u32,
    rr_bytes: usize,
    modes: Vec<ModeReport>,
}

fn bars(run: Option<&DatapathRun>) -> Vec<Bar> {
    let c = run.and_then(|r| r.classes.get("same_subnet"));
    let le = |bar, v: Option<f64>, max: f64| Bar {
        bar,
        value: v,
        met: v.is_some_and(|v| v > 0.0 && v <= max),
    };
    vec![
        le("tcp_rr_p50_ratio <= 1.05", c.map(|c| c.tcp_p50_ratio), 1.05),
        le("tcp_rr_p99_ratio <= 1.10", c.map(|c| c.tcp_p99_ratio), 1.10),
        {
            let v = c.and_then(|c| c.tcp_1_stream_ratio);
            Bar {
                bar: "tcp_1_stream_ratio >= 0.95",
                value: v,
                met: v.is_some_and(|v| v >= 0.95),
            }
        },
    ]
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    if args.round_trips == 0 {
        anyhow::bail!("--round-trips must be at least 1");
    }
    let modes: &[(super::lab::LabMode, &'static str)] = match args.mode {
        Modes::Routed => &[(super::lab::LabMode::Routed, "routed")],
        Modes::Eni => &[(super::lab::LabMode::Eni, "eni")],
        Modes::Both => &[
            (super::lab::LabMode::Routed, "routed"),
            (super::lab::LabMode::Eni, "eni"),
        ],
    };
    let settings: &[bool] = match args.fast_path {
        FastPath::On => &[true],
        FastPath::Off => &[false],
        FastPath::Both => &[true, false],
    };
    let opts = DatapathOptions {
        round_trips: args.round_trips,
        iperf_seconds: args.iperf_seconds,
    };
    let mut report = Report {
        build: if cfg!(debug_assertions) {
            "dev"
        } else {
            "release"
        },
        round_trips: args.round_trips,
        iperf_seconds: args.iperf_seconds,
        rr_bytes: underlay_lab::scenario::datapath_rr_bytes(),
        modes: Vec::new(),
    };
    for &(mode, mode_name) in modes {
        let c = super::lab::config(&super::lab::Shape {
            name: args.name.clone(),
            zones: 1,
            subnets_per_zone: 2,
            nodes: 4,
            pods_per_node: 2,
            route_limit: 4,
            seed: 1,
            block: 26,
            probe_interval_ms: 1000,
            hold_down_s: 30,
            cni_plugin: args.cni_plugin.clone(),
            mode,
            instance_type: underlay_lab::scenario::NODE_TYPE.to_string(),
            no_fast_path: !settings[0],
            // Steady-state packets only: the route calls' modelled latency would only slow the build.
            no_aws_latency: true,
        })?;
        underlay_lab::sweep(&args.name)?;
        eprintln!("underlay bench datapath: {mode_name} mode");
        let mut lab = Lab::up(c)?;
        let mut runs = Vec::new();
        let result = (|| -> anyhow::Result<()> {
            for &on in settings {
                eprintln!("  fast path {}", if on { "on" } else { "off" });
                lab.set_fast_path(on)?;
                runs.push(lab.bench_datapath(&opts)?);
            }
            Ok(())
        })();
        lab.down()?;
        result?;
        let on = runs.iter().find(|r| r.fast_path);
        report.modes.push(ModeReport {
            mode: mode_name,
            bars: bars(on),
            runs,
        });
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
