//! `underlay bench plan`: times the routed-mode planner from scratch at
//! several sizes and the cost and VPC route churn of one join, one leave and one forwarder failure.
//!
//! Peak memory is measured per size in a child process (this binary, re-run with a hidden flag) that builds the
//! topology, reads its resident-set high-water mark (VmHWM in /proc/self/status), plans once and reads it again, so
//! each figure is that process's true peak and sizes do not pollute each other.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;
use underlay_core::planner::{RoutedPlan, plan};
use underlay_core::routeops::{Churn, churn, diff_plans};
use underlay_core::topology::{Node, SynthSpec, Topology, synthesise};

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// Cluster sizes to plan from scratch.
    #[arg(long, value_delimiter = ',', default_values_t = [100usize, 1000, 5000])]
    pub sizes: Vec<usize>,
    /// Size at which join, leave and failure are measured.
    #[arg(long, default_value_t = 5000)]
    pub churn_size: usize,
    #[arg(long, default_value_t = 3)]
    pub zones: usize,
    #[arg(long, default_value_t = 2)]
    pub subnets_per_zone: usize,
    #[arg(long, default_value_t = 50)]
    pub route_limit: u32,
    /// Timed runs per measurement (the median is the headline figure).
    #[arg(long, default_value_t = 15)]
    pub iterations: usize,
    /// Internal: plan once at this size and print this process's memory figures.
    #[arg(long, hide = true)]
    pub child_size: Option<usize>,
}

pub fn exec(args: PlanArgs) -> anyhow::Result<()> {
    plan_bench(args)
}

#[derive(Debug, Serialize)]
struct Timing {
    min_ms: f64,
    median_ms: f64,
    max_ms: f64,
    iterations: usize,
}

fn time<T>(
    iterations: usize,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<(Timing, T)> {
    let mut ms = Vec::with_capacity(iterations);
    let mut last = None;
    for _ in 0..iterations.max(1) {
        let t = Instant::now();
        let out = f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        last = Some(out);
    }
    ms.sort_by(f64::total_cmp);
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    Ok((
        Timing {
            min_ms: r(ms[0]),
            median_ms: r(ms[ms.len() / 2]),
            max_ms: r(ms[ms.len() - 1]),
            iterations: ms.len(),
        },
        last.expect("at least one iteration"),
    ))
}

#[derive(Debug, Serialize)]
struct Memory {
    /// Peak resident set of the measuring child process (VmHWM), whole process.
    peak_rss_kib: u64,
    /// Its peak before planning (binary, allocator, the synthesised topology).
    rss_before_plan_kib: u64,
    /// What planning added to the peak.
    plan_rss_delta_kib: u64,
}

#[derive(Debug, Serialize)]
struct FromScratch {
    nodes: usize,
    routes_per_table: u32,
    budget: u32,
    max_nodes_per_forwarder: u32,
    extra_hop_fraction: f64,
    time: Timing,
    memory: Option<Memory>,
}

#[derive(Debug, Serialize)]
struct ChurnCase {
    what: String,
    time: Timing,
    route_changes_per_table: Churn,
    total_route_changes_per_table: u32,
    blocks_moved: usize,
    max_nodes_per_forwarder: u32,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    profile: &'static str,
    cpus: usize,
    shape: String,
    memory_method: &'static str,
    from_scratch: Vec<FromScratch>,
    churn_nodes: usize,
    churn: Vec<ChurnCase>,
}

fn topology(args: &PlanArgs, nodes: usize) -> anyhow::Result<Topology> {
    Ok(synthesise(&SynthSpec::new(
        nodes,
        args.zones,
        args.subnets_per_zone,
        args.route_limit,
    ))?)
}

pub(crate) fn status_kib(field: &str) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("{field} not in /proc/self/status"))?;
    line.split_whitespace()
        .nth(1)
        .context("malformed status line")?
        .parse()
        .context("malformed status value")
}

fn child(args: &PlanArgs, n: usize) -> anyhow::Result<()> {
    let topo = topology(args, n)?;
    let before = status_kib("VmHWM:")?;
    let p = plan(&topo, None)?;
    let peak = status_kib("VmHWM:")?;
    std::hint::black_box(&p);
    let m = Memory {
        peak_rss_kib: peak,
        rss_before_plan_kib: before,
        plan_rss_delta_kib: peak - before,
    };
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}

fn measure_memory(args: &PlanArgs, n: usize) -> anyhow::Result<Memory> {
    let exe = std::env::current_exe().context("locating the underlay binary")?;
    let out = Command::new(exe)
        .args(["bench", "plan", "--child-size", &n.to_string()])
        .args([
            "--zones",
            &args.zones.to_string(),
            "--subnets-per-zone",
            &args.subnets_per_zone.to_string(),
        ])
        .args(["--route-limit", &args.route_limit.to_string()])
        .output()
        .context("running the memory-measuring child")?;
    if !out.status.success() {
        bail!(
            "memory child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    #[derive(serde::Deserialize)]
    struct M {
        peak_rss_kib: u64,
        rss_before_plan_kib: u64,
        plan_rss_delta_kib: u64,
    }
    let m: M = serde_json::from_slice(&out.stdout).context("parsing the child's output")?;
    Ok(Memory {
        peak_rss_kib: m.peak_rss_kib,
        rss_before_plan_kib: m.rss_before_plan_kib,
        plan_rss_delta_kib: m.plan_rss_delta_kib,
    })
}

fn moved(a: &RoutedPlan, b: &RoutedPlan) -> usize {
    let before: BTreeSet<(&str, ipnet::Ipv4Net)> = a
        .blocks
        .iter()
        .map(|x| (x.node.as_str(), x.block))
        .collect();
    b.blocks
        .iter()
        .filter(|x| {
            a.blocks.iter().any(|y| y.node == x.node)
                && !before.contains(&(x.node.as_str(), x.block))
        })
        .count()
}

fn plan_bench(args: PlanArgs) -> anyhow::Result<()> {
    if let Some(n) = args.child_size {
        return child(&args, n);
    }
    let mut from_scratch = Vec::new();
    for &n in &args.sizes {
        let topo = topology(&args, n)?;
        let (time, p) = time(args.iterations, || Ok(plan(&topo, None)?))?;
        let memory = if cfg!(target_os = "linux") {
            Some(measure_memory(&args, n)?)
        } else {
            None
        };
        from_scratch.push(FromScratch {
            nodes: n,
            routes_per_table: p.routes_per_table,
            budget: p.budget,
            max_nodes_per_forwarder: p.max_nodes_per_forwarder,
            extra_hop_fraction: p.extra_hop_fraction,
            time,
            memory,
        });
    }

    let n = args.churn_size;
    let topo = topology(&args, n)?;
    let base = plan(&topo, None)?;
    let mut cases = Vec::new();
    let mut case = |what: String, t: &Topology| -> anyhow::Result<()> {
        let (time, p) = time(args.iterations, || Ok(plan(t, Some(&base))?))?;
        let c = churn(&diff_plans(&base, &p));
        cases.push(ChurnCase {
            what,
            time,
            route_changes_per_table: c,
            total_route_changes_per_table: c.total(),
            blocks_moved: moved(&base, &p),
            max_nodes_per_forwarder: p.max_nodes_per_forwarder,
        });
        Ok(())
    };
    // Join: a new node in the first subnet.
    let mut joined = topo.clone();
    let first = &topo.vpc.subnets[0];
    let ip = std::net::Ipv4Addr::from(u32::from(first.cidr.broadcast()) - 1);
    joined.nodes.push(Node {
        id: "node-joined".into(),
        subnet: first.id.clone(),
        ip,
        eni: "eni-joined".into(),
        healthy: true,
    });
    case(format!("join: node-joined into {}", first.id), &joined)?;
    // Leave: a node that forwards nothing, then a forwarder.
    let forwarders: BTreeSet<&str> = base
        .routes
        .iter()
        .filter_map(|r| r.forwarder.as_deref())
        .collect();
    let quiet = topo
        .nodes
        .iter()
        .rev()
        .find(|x| !forwarders.contains(x.id.as_str()))
        .context("no non-forwarder")?;
    let mut left = topo.clone();
    left.nodes.retain(|x| x.id != quiet.id);
    case(format!("leave: {} (not a forwarder)", quiet.id), &left)?;
    let fwd = base.routes[0]
        .forwarder
        .clone()
        .context("first route has no forwarder")?;
    let mut left = topo.clone();
    left.nodes.retain(|x| x.id != fwd);
    case(format!("leave: {fwd} (a forwarder)"), &left)?;
    // Failure of a forwarder.
    let mut failed = topo.clone();
    if let Some(x) = failed.nodes.iter_mut().find(|x| x.id == fwd) {
        x.healthy = false;
    }
    case(format!("forwarder failure: {fwd} unhealthy"), &failed)?;

    let report = Report {
        bench: "plan",
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        shape: format!(
            "{} zones × {} subnets, route limit {}, 1 foreign route and headroom 1 per table, pod CIDR 100.64.0.0/10, /26 blocks",
            args.zones, args.subnets_per_zone, args.route_limit
        ),
        memory_method: "VmHWM of a child process per size (whole process), before and after one plan",
        from_scratch,
        churn_nodes: n,
        churn: cases,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
