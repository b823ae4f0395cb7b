//! `underlay lab soak`: the lab cluster under pod churn, policy changes and overlapping faults drawn from a seed,
//! with invariants checked every second; in routed mode, eni mode or both. Exits non-zero, naming the seed and
//! the first violating event, if any invariant is violated (docs/soak.md).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::bail;
use serde_json::json;
use underlay_lab::scenario::soak::{INTERRUPTED, InjectViolation, SoakOptions, run_soak};
use underlay_lab::scenario::{LabConfig, default_state_dir};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SoakMode {
    Routed,
    Eni,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Violation {
    /// One pod's address added to another pod's eth0.
    ReusedAddress,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// Lab id (1–6 lowercase letters or digits); namespaces are `ul-<name>-…`.
    #[arg(long, default_value = "soak")]
    pub name: String,
    /// Length of the run in each mode (fractions allowed: 0.5 is 30 s). Settling follows.
    #[arg(long, default_value_t = 5.0)]
    pub minutes: f64,
    /// Seed of the fault plan (and of the churn): the same seed replays the same faults at the same offsets.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "both")]
    pub mode: SoakMode,
    /// One JSON document on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// A live pod must answer within this many seconds after the last fault touching its path.
    #[arg(long, default_value_t = 30)]
    pub reach_bound_s: u64,
    /// Client pods per node the churn keeps around (± half).
    #[arg(long, default_value_t = 2)]
    pub clients_per_node: usize,
    /// The underlay-cni binary (default: next to this executable).
    #[arg(long)]
    pub cni_plugin: Option<PathBuf>,
    /// Print the fault plan of this seed, length and mode (JSON) and exit: nothing is built.
    #[arg(long)]
    pub plan: bool,
    /// Break an invariant on purpose (tests that the soak catches it).
    #[arg(long, value_enum, hide = true)]
    pub inject_violation: Option<Violation>,
}

pub fn exec(args: SoakArgs) -> anyhow::Result<()> {
    if !(args.minutes > 0.0 && args.minutes <= 24.0 * 60.0) {
        bail!("--minutes must be above 0 and at most a day");
    }
    if args.clients_per_node == 0 || args.clients_per_node > 10 {
        bail!("--clients-per-node must be 1 to 10");
    }
    let modes: &[underlay_api::Mode] = match args.mode {
        SoakMode::Routed => &[underlay_api::Mode::Routed],
        SoakMode::Eni => &[underlay_api::Mode::Eni],
        SoakMode::Both => &[underlay_api::Mode::Routed, underlay_api::Mode::Eni],
    };
    let opts = SoakOptions {
        run: Duration::from_secs_f64(args.minutes * 60.0),
        seed: args.seed,
        reach_bound: Duration::from_secs(args.reach_bound_s),
        clients_per_node: args.clients_per_node,
        inject: args.inject_violation.map(|v| match v {
            Violation::ReusedAddress => InjectViolation::ReusedAddress,
        }),
    };
    if args.plan {
        let plans: Vec<_> = modes
            .iter()
            .map(|m| {
                json!({
                    "mode": underlay_lab::scenario::soak::mode_str(*m),
                    "faults": underlay_lab::scenario::soak::schedule::plan(args.seed, opts.run, *m),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&plans)?);
        return Ok(());
    }
    watch_signals();
    let mut reports = Vec::new();
    for mode in modes {
        let mut config = LabConfig::demo(super::plugin_path(args.cni_plugin.clone())?);
        config.name = args.name.clone();
        config.state_dir = default_state_dir(&args.name);
        config.mode = *mode;
        eprintln!(
            "underlay lab soak ({} mode): {} min, seed {}",
            underlay_lab::scenario::soak::mode_str(*mode),
            args.minutes,
            args.seed
        );
        // Every namespace of an earlier, killed run goes first.
        underlay_lab::sweep(&args.name)?;
        reports.push(run_soak(config, &opts)?);
        if INTERRUPTED.load(Ordering::Relaxed) {
            break;
        }
    }
    let passed = reports.iter().all(|r| r.passed);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"passed": passed, "seed": args.seed, "modes": reports})
            )?
        );
    } else {
        for r in &reports {
            print!("{}", r.human());
        }
    }
    let failures: Vec<String> = reports.iter().filter_map(|r| r.failure()).collect();
    if !failures.is_empty() {
        bail!("lab soak failed: {}", failures.join("; "));
    }
    Ok(())
}

/// Ctrl-C and SIGTERM stop the soak at its next second; it then removes everything it built.
fn watch_signals() {
    let _ = std::thread::Builder::new()
        .name("soak-signals".into())
        .spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let Ok(mut term) = signal(SignalKind::terminate()) else {
                    return;
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                eprintln!("signal received: stopping the soak and removing the lab");
                INTERRUPTED.store(true, Ordering::Relaxed);
            });
        });
}
