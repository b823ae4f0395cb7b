//! `underlay bench scaleout`: N nodes (default 150 m5.large) join an `eni`-mode cluster at once; the real
//! `eni` reconciler gives them their pools through the real rate-aware queue, against vpcsim with AWS's token
//! buckets and per-call latency. Reports the time until every node holds its target pool (the condition the
//! not-ready taint waits for, with a Ready agent), EC2 calls by operation, throttling the controller saw, and the
//! token-bucket lower bound of the same calls.
//!
//! What is simulated: the Kubernetes side is left out — the reconciler is driven directly with the node set (as
//! the Node watch would hand it over), and agents are taken as Ready and using no address yet. EC2 is vpcsim.
//! Time is tokio's clock, paused by default (virtual seconds: EC2 latency and bucket refill are the only things
//! that take time, so the run is exact and reproducible); `--real-time` runs on the wall clock.
//!
//! Latency (assumed, not measured: AWS publishes no EC2 API latency figures): describes uniform in 100–300 ms,
//! mutating calls uniform in 200–800 ms. The queue is configured with AWS's default limits (share 1.0: the
//! controller is alone in the account) less the headroom that latency jitter can bunch up
//! ([`RateLimits::less_headroom`]), so its pacing never exceeds vpcsim's buckets.
//!
//! Lower bound: for each bucket (every EC2 action has its own), `max(0, (calls − capacity) / refill)` with AWS's
//! default buckets and this run's calls (a bucket that starts full cannot serve them sooner); the bound is the
//! largest. The ratio compares the time until every node was ready with it.
//!
//! Past one bucket: a joining node's first addresses come either from AssignPrivateIpAddresses on its primary
//! ENI or from CreateNetworkInterface with the addresses, then AttachNetworkInterface (+ DeleteOnTermination);
//! the reconciler picks per node by the queue's bucket outlook. The report gives two bounds from the same
//! table: `single_bucket_bound_s`, every node through the Assign bucket, and `multi_bucket_bound_s`, the best
//! split over both ways (with `--creation-draws-assign true`, AWS's silence read conservatively, creation also
//! takes an Assign token, so the two bounds are equal). The bar: every node ready within 0.55 × the
//! single-bucket bound, no throttling, no failed attach, no leaked ENI.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use ipnet::Ipv4Net;
use serde::Serialize;
use underlay_cloud::queue::{QueueConfig, RateLimitedCloud, RetryPolicy};
use underlay_cloud::{Bucket, Cloud, EniStatus, Operation, RateLimits, Tags};
use underlay_controller::eni::{EniNode, EniReconciler, EniSettings};
use underlay_core::eni_pool::{AddressMode, Targets, Used};
use underlay_core::names::TAG_CLUSTER;
use underlay_vpcsim::{Faults, Latency, RunInstance, VpcSim};

const CLUSTER: &str = "bench-scaleout";
const ZONES: [&str; 3] = ["us-east-1a", "us-east-1b", "us-east-1c"];

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 150)]
    nodes: usize,
    #[arg(long, default_value = "m5.large")]
    instance_type: String,
    /// Fill every slot of every ENI at join (k8s-vpcnet).
    #[arg(long)]
    fill_at_join: bool,
    #[arg(long)]
    prefix_delegation: bool,
    #[arg(long)]
    warm_ip_target: Option<u32>,
    #[arg(long)]
    minimum_ip_target: Option<u32>,
    #[arg(long)]
    warm_prefix_target: Option<u32>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run on the wall clock instead of tokio's paused clock.
    #[arg(long)]
    real_time: bool,
    /// Passes at most before giving up.
    #[arg(long, default_value_t = 20)]
    max_passes: usize,
    /// Whether CreateNetworkInterface with addresses also draws on AssignPrivateIpAddresses' bucket (vpcsim and
    /// the queue alike). AWS does not say; `true` is the conservative reading.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    creation_draws_assign: bool,
    /// Give every node its first addresses by AssignPrivateIpAddresses only (the single-bucket way).
    #[arg(long)]
    single_bucket: bool,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
struct BucketBound {
    bucket: String,
    calls: u64,
    capacity: f64,
    refill_per_sec: f64,
    bound_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    nodes: usize,
    instance_type: String,
    mode: AddressMode,
    targets: Targets,
    clock: &'static str,
    latency_ms: BTreeMap<&'static str, [u64; 2]>,
    /// Seconds from the join until every node held its target pool.
    all_ready_s: f64,
    node_ready_s: Percentiles,
    passes: usize,
    calls: BTreeMap<String, u64>,
    total_calls: u64,
    /// `RequestLimitExceeded` answers the controller got (vpcsim's count: every one reaches the queue).
    throttles_seen: u64,
    /// Retries the queue made, by error kind.
    queue_retries: BTreeMap<&'static str, u64>,
    lower_bound_s: f64,
    lower_bound_bucket: String,
    buckets: Vec<BucketBound>,
    /// all_ready_s / lower_bound_s (absent when the bound is zero).
    ratio: Option<f64>,
    /// Whether creation with addresses drew on the Assign bucket in this run (vpcsim and queue).
    creation_draws_assign: bool,
    /// Nodes that got their first addresses through a created ENI, and through Assign.
    first_growth_by_create: usize,
    first_growth_by_assign: usize,
    /// Every node's first addresses through the Assign bucket: `(nodes − capacity) / refill`.
    single_bucket_bound_s: f64,
    /// The best split of first growths over Assign and Create + Attach + Modify, from the same table.
    multi_bucket_bound_s: f64,
    /// all_ready_s / single_bucket_bound_s.
    ratio_to_single_bucket: Option<f64>,
    /// all_ready_s / multi_bucket_bound_s.
    ratio_to_multi_bucket: Option<f64>,
    /// The bar on ratio_to_single_bucket.
    bar: f64,
    meets_bar: bool,
    attach_failures: u64,
    pool_size_per_node: Percentiles,
    max_pods: u32,
    leaked_enis: usize,
    addresses_held_twice: usize,
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if v.is_empty() {
            0.0
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize]
        }
    };
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    Percentiles {
        p50: r(at(0.5)),
        p90: r(at(0.9)),
        max: r(at(1.0)),
    }
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let mut rt = tokio::runtime::Builder::new_current_thread();
    rt.enable_time();
    if !args.real_time {
        rt.start_paused(true);
    }
    let report = rt.build()?.block_on(run(args))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<Report> {
    let describe = (100, 300);
    let mutating = (200, 800);
    let ms = Duration::from_millis;
    let mut faults = Faults {
        latency: Latency::Uniform {
            min: ms(mutating.0),
            max: ms(mutating.1),
        },
        ..Faults::default()
    };
    for op in Operation::ALL.into_iter().filter(|op| op.is_describe()) {
        faults.op_latency.insert(
            op,
            Latency::Uniform {
                min: ms(describe.0),
                max: ms(describe.1),
            },
        );
    }
    let account = RateLimits::aws_default().with_creation_draws_assign(args.creation_draws_assign);
    let sim = VpcSim::builder(args.seed)
        .rate_limits(Some(account.clone()))
        .faults(faults)
        .build();
    let vpc = sim.create_vpc("198.18.0.0/16".parse()?, Tags::new())?;
    let mut subnets = Vec::new();
    for (z, zone) in ZONES.iter().enumerate() {
        let cidr = Ipv4Net::new(Ipv4Addr::new(198, 18, z as u8 * 64, 0), 18)?;
        subnets.push(sim.create_subnet(&vpc, zone, cidr)?);
    }
    let mut nodes = Vec::new();
    for n in 0..args.nodes {
        let i = sim
            .run_instance(RunInstance::new(
                &args.instance_type,
                &subnets[n % subnets.len()],
            ))
            .with_context(|| format!("launching {}", args.instance_type))?;
        nodes.push(EniNode::new(format!("node-{n}"), i.id, Used::Count(0)));
    }

    // The spread of arrival times after a token: one latency's spread, except for the DeleteOnTermination
    // modify, which reaches EC2 after the attach's latency and its own.
    let jitter = ms(mutating.1 - mutating.0);
    let modify = Operation::ModifyNetworkInterfaceAttribute;
    let pacing = account.less_headroom(jitter).with_action(
        modify,
        account
            .limits(Bucket::Action(modify))
            .less_headroom(2 * jitter),
    );
    let queue = RateLimitedCloud::new(
        sim.clone(),
        QueueConfig {
            limits: pacing,
            share: 1.0,
            retry: RetryPolicy::default(),
        },
    );
    let settings = EniSettings {
        mode: if args.prefix_delegation {
            AddressMode::Prefixes
        } else {
            AddressMode::SecondaryIps
        },
        targets: Targets {
            warm_ip_target: args.warm_ip_target,
            minimum_ip_target: args.minimum_ip_target,
            warm_prefix_target: args.warm_prefix_target,
            fill_at_join: args.fill_at_join,
            ..Targets::default()
        },
        spread_first_growth: !args.single_bucket,
        ..EniSettings::new(CLUSTER)
    };
    let queue_handle = queue.clone();
    let reconciler = EniReconciler::new(Arc::new(queue), settings.clone());
    sim.reset_counters();

    let mut ready_at: BTreeMap<String, f64> = BTreeMap::new();
    let mut passes = 0;
    let mut last = None;
    while passes < args.max_passes {
        passes += 1;
        let report = reconciler.pass(&nodes).await;
        for n in &report.nodes {
            if n.ready() {
                ready_at
                    .entry(n.name.clone())
                    .or_insert(n.finished_at.as_secs_f64());
            }
        }
        let quiet = report.quiet();
        last = Some(report);
        if quiet && ready_at.len() == nodes.len() {
            break;
        }
    }
    let last = last.context("no pass ran")?;
    if ready_at.len() != nodes.len() || !last.quiet() {
        bail!(
            "not converged after {passes} passes: {} of {} nodes ready; last errors {:?}",
            ready_at.len(),
            nodes.len(),
            last.errors
        );
    }
    // The last pass (quiet) made only describes; they belong to the run as the confirmation it needs.
    let counters = sim.counters();
    let mut per_bucket: BTreeMap<Bucket, u64> = BTreeMap::new();
    for (op, n) in &counters.calls {
        *per_bucket.entry(op.bucket(false)).or_default() += n;
    }
    // Every create here asks for addresses: with the conservative reading each took an Assign token too.
    let creates = counters.calls_of(Operation::CreateNetworkInterface);
    if account.creation_draws_assign && creates > 0 {
        *per_bucket
            .entry(Operation::AssignPrivateIpAddresses.bucket(false))
            .or_default() += creates;
    }
    let buckets: Vec<BucketBound> = per_bucket
        .iter()
        .map(|(b, calls)| {
            let l = account.limits(*b);
            BucketBound {
                bucket: b.to_string(),
                calls: *calls,
                capacity: l.capacity,
                refill_per_sec: l.refill_per_sec,
                bound_s: ((*calls as f64 - l.capacity) / l.refill_per_sec).max(0.0),
            }
        })
        .collect();
    let worst = buckets
        .iter()
        .max_by(|a, b| a.bound_s.total_cmp(&b.bound_s))
        .context("no calls")?;
    let all_ready = ready_at.values().copied().fold(0.0, f64::max);
    let ratio = (worst.bound_s > 0.0).then(|| all_ready / worst.bound_s);
    let (single, multi) = first_growth_bounds(&account, nodes.len());
    let by_create = last
        .nodes
        .iter()
        .filter(|n| n.pool.enis.iter().any(|e| e.device_index == 1))
        .count();
    let attach_failures: u64 = counters
        .errors
        .get(&Operation::AttachNetworkInterface)
        .map(|m| m.values().sum())
        .unwrap_or(0);
    let bar = 0.55;

    let snap = sim.snapshot();
    let leaked = snap
        .enis
        .iter()
        .filter(|e| {
            e.status == EniStatus::Available
                && e.tags.get(TAG_CLUSTER).map(String::as_str) == Some(CLUSTER)
        })
        .count();
    let mut seen = std::collections::BTreeSet::new();
    let mut twice = 0;
    for e in &snap.enis {
        twice += std::iter::once(e.primary_ip)
            .chain(e.secondary_addresses())
            .filter(|a| !seen.insert(*a))
            .count();
    }
    let _ = sim.describe_vpc(&vpc).await?; // the region is still answering
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    Ok(Report {
        nodes: nodes.len(),
        instance_type: args.instance_type,
        mode: settings.mode,
        targets: settings.targets,
        clock: if args.real_time {
            "wall"
        } else {
            "virtual (paused tokio clock)"
        },
        latency_ms: BTreeMap::from([
            ("describe", [describe.0, describe.1]),
            ("mutating", [mutating.0, mutating.1]),
        ]),
        all_ready_s: r3(all_ready),
        node_ready_s: percentiles(ready_at.values().copied().collect()),
        passes,
        calls: counters
            .calls
            .iter()
            .map(|(op, n)| (op.name().to_owned(), *n))
            .collect(),
        total_calls: counters.total_calls(),
        throttles_seen: counters.total_throttled(),
        queue_retries: queue_handle.stats().retries,
        lower_bound_s: r3(worst.bound_s),
        lower_bound_bucket: worst.bucket.clone(),
        ratio: ratio.map(r3),
        creation_draws_assign: account.creation_draws_assign,
        first_growth_by_create: by_create,
        first_growth_by_assign: nodes.len() - by_create,
        single_bucket_bound_s: r3(single),
        multi_bucket_bound_s: r3(multi),
        ratio_to_single_bucket: (single > 0.0).then(|| r3(all_ready / single)),
        ratio_to_multi_bucket: (multi > 0.0).then(|| r3(all_ready / multi)),
        bar,
        meets_bar: (single <= 0.0 || all_ready <= bar * single)
            && counters.total_throttled() == 0
            && attach_failures == 0
            && leaked == 0,
        attach_failures,
        pool_size_per_node: percentiles(
            last.nodes.iter().map(|n| f64::from(n.pool_size)).collect(),
        ),
        max_pods: last.nodes.first().map(|n| n.max_pods).unwrap_or(0),
        leaked_enis: leaked,
        addresses_held_twice: twice,
        buckets,
    })
}

/// Lower bounds of `nodes` first growths from AWS's table: all through the Assign bucket, and the best split
/// between Assign and CreateNetworkInterface + AttachNetworkInterface + ModifyNetworkInterfaceAttribute (each
/// created ENI also takes an Assign token when `limits.creation_draws_assign`).
fn first_growth_bounds(limits: &RateLimits, nodes: usize) -> (f64, f64) {
    let bound = |op: Operation, calls: usize| {
        let l = limits.limits(op.bucket(false));
        ((calls as f64 - l.capacity) / l.refill_per_sec).max(0.0)
    };
    let single = bound(Operation::AssignPrivateIpAddresses, nodes);
    let multi = (0..=nodes)
        .map(|by_create| {
            let assign_calls = if limits.creation_draws_assign {
                nodes
            } else {
                nodes - by_create
            };
            [
                bound(Operation::AssignPrivateIpAddresses, assign_calls),
                bound(Operation::CreateNetworkInterface, by_create),
                bound(Operation::AttachNetworkInterface, by_create),
                bound(Operation::ModifyNetworkInterfaceAttribute, by_create),
            ]
            .into_iter()
            .fold(0.0, f64::max)
        })
        .fold(f64::INFINITY, f64::min);
    (single, multi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_of_a_thousand_first_growths() {
        let l = RateLimits::aws_default();
        // Conservative: creation draws on Assign too, so no split beats the single bucket.
        assert_eq!(first_growth_bounds(&l, 1000), (180.0, 180.0));
        // Independent buckets: Assign 100 + 5t and Attach 50 + 5t share the 1,000 nodes: t = 85 s.
        let (single, multi) = first_growth_bounds(&l.with_creation_draws_assign(false), 1000);
        assert_eq!(single, 180.0);
        assert_eq!(multi, 85.0);
    }
}
