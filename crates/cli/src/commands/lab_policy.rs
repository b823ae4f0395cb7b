//! `underlay lab policy`: the Kubernetes e2e NetworkPolicy model (namespaces x, y, z × pods a, b, c) on a lab in
//! routed mode, eni mode or both; the built-in sequence of the e2e suite's cases, or the user's own
//! (`--cases FILE`); every pair, port and protocol checked after each case. Exits non-zero if any case fails.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use underlay_lab::scenario::policy::oracle::{CoreEvaluator, Evaluator};
use underlay_lab::scenario::policy::{PolicyLab, PolicyReport, ProbeOptions, cases, check_cases};
use underlay_lab::scenario::{LabConfig, default_state_dir};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyMode {
    Routed,
    Eni,
    Both,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PolicyArgs {
    /// Lab id (1–6 lowercase letters or digits); namespaces are `ul-<name>-…`.
    #[arg(long, default_value = "pol")]
    pub name: String,
    /// Address mode of the lab, or both one after the other.
    #[arg(long, value_enum, default_value = "both")]
    pub mode: PolicyMode,
    /// Cases to run instead of the built-in sequence (YAML; see docs/lab.md, "Testing your policies"). The
    /// built-in sequence is followed by the first-packet and change-under-load cases; a cases file is not.
    #[arg(long)]
    pub cases: Option<PathBuf>,
    /// Run the first-packet and change-under-load cases after a cases file too.
    #[arg(long)]
    pub timing: bool,
    /// A probe with no answer within this is blocked (ms).
    #[arg(long, default_value_t = 400)]
    pub timeout_ms: u64,
    /// Wait after a change at the API before probing (ms).
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// Probes in flight at once.
    #[arg(long, default_value_t = 64)]
    pub workers: usize,
    /// `human` or `json` (one document on stdout).
    #[arg(long, default_value = "human")]
    pub format: String,
    /// The underlay-cni binary (default: next to this executable).
    #[arg(long)]
    pub cni_plugin: Option<PathBuf>,
    /// Run every agent with the tc-BPF fast path forced off (the kernel path only).
    #[arg(long)]
    pub no_fast_path: bool,
}

/// The evaluator the expected tables come from where a case gives none.
fn evaluator() -> Box<dyn Evaluator> {
    Box::new(CoreEvaluator)
}

pub fn exec(args: PolicyArgs) -> anyhow::Result<()> {
    if !matches!(args.format.as_str(), "human" | "json") {
        bail!("--format must be human or json");
    }
    let text = match &args.cases {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => cases::UPSTREAM.to_string(),
    };
    // A mistake in the file shows before any lab is built.
    let n = check_cases(&text)
        .with_context(|| {
            args.cases
                .as_ref()
                .map_or("the built-in sequence".into(), |p| p.display().to_string())
        })?
        .len();
    let modes: &[underlay_api::Mode] = match args.mode {
        PolicyMode::Routed => &[underlay_api::Mode::Routed],
        PolicyMode::Eni => &[underlay_api::Mode::Eni],
        PolicyMode::Both => &[underlay_api::Mode::Routed, underlay_api::Mode::Eni],
    };
    let options = ProbeOptions {
        timeout: Duration::from_millis(args.timeout_ms),
        settle: Duration::from_millis(args.settle_ms),
        workers: args.workers,
        ..Default::default()
    };
    let mut reports = Vec::new();
    for mode in modes {
        eprintln!(
            "underlay lab policy ({} mode): {n} case(s)",
            match mode {
                underlay_api::Mode::Routed => "routed",
                underlay_api::Mode::Eni => "eni",
            }
        );
        reports.push(run_mode(&args, *mode, &text, options.clone())?);
    }
    let passed = reports.iter().all(|r| r.passed);
    if args.format == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"passed": passed, "modes": reports}))?
        );
    } else {
        for r in &reports {
            print!("{}", r.human());
        }
    }
    if !passed {
        let failed: Vec<String> = reports
            .iter()
            .flat_map(|r| r.failures.iter().map(move |f| format!("{}: {f}", r.mode)))
            .collect();
        bail!(
            "lab policy failed: {} case(s): {}",
            failed.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

fn run_mode(
    args: &PolicyArgs,
    mode: underlay_api::Mode,
    text: &str,
    options: ProbeOptions,
) -> anyhow::Result<PolicyReport> {
    let mut config = LabConfig::demo(super::plugin_path(args.cni_plugin.clone())?);
    config.name = args.name.clone();
    config.state_dir = default_state_dir(&args.name);
    config.mode = mode;
    config.fast_path = !args.no_fast_path;
    // Every namespace of an earlier, killed run goes first.
    underlay_lab::sweep(&args.name)?;
    let mut lab = PolicyLab::up(config, options)?;
    let report = lab.load_cases(text).map(|cases| {
        lab.run(
            &cases,
            evaluator().as_ref(),
            args.cases.is_none() || args.timing,
        )
    });
    let down = lab.down();
    let report = report?;
    down?;
    Ok(report)
}
