//! `underlay lab soak`: the lab cluster under continuous pod churn and policy changes, with faults drawn from a
//! seed and overlapping, and invariants checked every second.
//!
//! ```text
//!   seed ──schedule::plan──► faults (agent kill in an ADD burst, leader kill, API outage, EC2 errors /
//!                            throttling / latency, forwarder death, netns deleted without DEL)
//!                                 │ started and ended on the second they fall
//!   Lab (2 controller replicas on the Lease, agents, underlay-cni) ◄── churn thread (pods::Ctx::churn)
//!                                 │
//!   every second: unique addresses · denied datagrams not delivered · reachability within the bound ·
//!                 route tables within their limit · the foreign route unchanged        ──► checks::Ledger
//!   after the run: faults off, churn stopped, settle ──► no leaked checkpoint entry, veth, rule, nft element,
//!                                                        ENI or address; every pod reachable
//!   ──► SoakReport (JSON + human): faults by kind with recovery times, checks run/violated, EC2 calls and
//!       throttles, the longest unreachability; a violation names the seed and the first violating event
//! ```
//!
//! The fault plan is the seed's (replayable); what the threads interleave around it is not, so a replay meets
//! the same faults at the same offsets, not the same packet-level history.

pub mod checks;
pub mod pods;
mod report;
pub mod schedule;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipnet::Ipv4Net;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use underlay_cloud::{Operation, RouteTarget};
use underlay_core::names;
use underlay_vpcsim::{ErrorRate, Faults, Latency};

use super::policy::model::{World, kube_namespace};
use super::{Lab, LabConfig, progress};
use crate::kernel;
use checks::{Ledger, PolicyState};
use pods::{Ctx, Group, NodeInfo, Population, Shared, SoakPod};
pub use report::{FaultStats, SoakReport, Unreachability};
use schedule::{FaultKind, PlannedFault, Rng};

/// Set by a signal handler (Ctrl-C, SIGTERM): the run stops at the next second and tears everything down.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A check broken on purpose, to prove the soak fails when an invariant does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectViolation {
    /// A third of the way in, one pod's address is added to another pod's `eth0` (the lab hands one address to
    /// two pods).
    ReusedAddress,
}

/// How a soak runs.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub run: Duration,
    pub seed: u64,
    /// A live pod must answer within this after the last fault touching its path.
    pub reach_bound: Duration,
    /// Client pods per node the churn keeps around (± half).
    pub clients_per_node: usize,
    pub inject: Option<InjectViolation>,
}

impl Default for SoakOptions {
    fn default() -> Self {
        Self {
            run: Duration::from_secs(300),
            seed: 1,
            reach_bound: Duration::from_secs(30),
            clients_per_node: 2,
            inject: None,
        }
    }
}

/// A policy change counts from this long after it was written (the bar from event to kernel is 500 ms).
pub const POLICY_GRACE: Duration = Duration::from_secs(3);
/// After an API outage, how long agents' watches may take to come back: kube-runtime's watcher retries with an
/// exponential backoff (0.8 s doubling, jittered), so after a 6 s outage the next attempt may be 6 s or more after
/// the API returns. A policy change counts from this long after the outage's end, not from its write.
pub const WATCH_RECOVERY: Duration = Duration::from_secs(15);
/// How often the guard policy flips between the client groups (± a quarter).
const POLICY_EVERY: Duration = Duration::from_secs(20);
/// A round trip without an answer within this is lost.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// Peers each live pod is probed from, every second.
const PEERS: usize = 2;
/// After the run: how long everything may take to settle.
const SETTLE_WAIT: Duration = Duration::from_secs(90);
/// The foreign route planted in the first subnet's table: inside the pod CIDR, to a transit gateway.
const FOREIGN_ROUTE: Ipv4Net = crate::plan::ipnet_v4(100, 64, 240, 0, 20);
/// The guard policy's name.
const GUARD_POLICY: &str = "soak-guard";

/// The soak's lab: 3 zones, one subnet each, 6 nodes (two per subnet, so routed mode aggregates behind
/// forwarders), two controller replicas on a short Lease, no pods of the ordinary kind (the soak makes its own).
pub fn soak_lab_config(mut base: LabConfig) -> LabConfig {
    base.zones = 3;
    base.subnets_per_zone = 1;
    base.nodes = 6;
    base.pods_per_node = 0;
    // The IGW default route, the planted foreign route, a route of headroom, and room for one route per
    // subnet's pair of blocks or so: aggregation shows.
    base.route_limit = 6;
    base.controller_replicas = 2;
    base.lease_duration = Duration::from_secs(6);
    base.lease_renew = Duration::from_secs(2);
    base.hold_down = Duration::from_secs(5);
    base
}

/// What the run tracks between seconds.
struct Run {
    t0: Instant,
    ledger: Ledger,
    faults: BTreeMap<FaultKind, FaultStats>,
    recovery: BTreeMap<FaultKind, Vec<f64>>,
    /// Faults ended (or a leader killed) whose recovery is not seen yet: kind, since.
    awaiting: Vec<(FaultKind, Instant)>,
    active: Vec<Active>,
    /// Most faults active at once.
    max_active: usize,
    /// The last start or end of a fault touching pods' paths (agent kill, node death: aggregation means any
    /// node may carry any pod's traffic).
    last_path_event: Instant,
    node_dead: Vec<bool>,
    agent_killed: Vec<bool>,
    api_down: bool,
    /// When the API last came back (the start of the run if it never went).
    api_up_since: Instant,
    ec2: BTreeSet<FaultKind>,
    /// Per guarded pod, which group the policy lets in, from when.
    policy: BTreeMap<String, Vec<PolicyState>>,
    guarded_nodes: BTreeMap<String, usize>,
    /// Guarded pods whose last policy change a fault held back (it counts from the fault's end).
    deferred: BTreeSet<String>,
    allowed_now: Group,
    policy_changes: u64,
    next_policy_at: Duration,
    last_ok: BTreeMap<u32, Instant>,
    flagged: BTreeSet<u32>,
    longest: Option<Unreachability>,
    allowed_delivered: u64,
    denied_delivered: u64,
    leader_changes: u64,
    leader: Option<usize>,
    bursts: Vec<std::thread::JoinHandle<()>>,
    injected: Option<String>,
    rng: Rng,
}

#[derive(Debug)]
struct Active {
    fault: PlannedFault,
    target: Target,
}

#[derive(Debug, Clone)]
enum Target {
    None,
    Node(usize),
    Replica(usize),
}

impl Run {
    fn secs(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
    fn ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }
}

fn guard_policy(allowed: Group) -> NetworkPolicy {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": GUARD_POLICY, "namespace": pods::NAMESPACE},
        "spec": {
            "podSelector": {"matchLabels": {pods::ROLE_LABEL: "guarded"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {pods::GROUP_LABEL: allowed.label()}}}],
                 "ports": [{"protocol": "UDP", "port": pods::GUARD_PORT}]},
                {"ports": [{"protocol": "UDP", "port": super::echo::ECHO_PORT}]}
            ]
        }
    }))
    .expect("a valid NetworkPolicy")
}

impl Lab {
    /// The EC2 fault knobs for the EC2 faults active now.
    fn set_ec2_faults(&self, active: &BTreeSet<FaultKind>) {
        let mut f = Faults::default();
        if active.contains(&FaultKind::Ec2Errors) {
            for op in Operation::ALL {
                f.error_rates.insert(
                    op,
                    ErrorRate {
                        probability: 0.2,
                        code: "InternalError".into(),
                    },
                );
            }
        }
        f.throttle_all = active.contains(&FaultKind::Ec2Throttle);
        if active.contains(&FaultKind::Ec2Latency) {
            f.latency = Latency::Uniform {
                min: Duration::from_millis(200),
                max: Duration::from_millis(1500),
            };
        }
        self.sim.set_faults(f);
    }

    /// Plants a route inside the pod CIDR to a transit gateway in the first subnet's table, as another team's
    /// attachment would be: the controller must plan around it and never change it.
    fn plant_foreign_route(&self) -> anyhow::Result<(underlay_cloud::RouteTableId, RouteTarget)> {
        let tgw = self.sim.create_transit_gateway(&self.vpc)?;
        let table = self.subnets[0].table.clone();
        let target = RouteTarget::Gateway(tgw);
        self.sim.add_route(&table, FOREIGN_ROUTE, &target)?;
        Ok((table, target))
    }

    /// Nodes whose primary ENI a pod route targets (routed mode's forwarders).
    fn forwarders(&self) -> BTreeSet<usize> {
        let snap = self.sim.snapshot();
        let targets: BTreeSet<_> = snap
            .route_tables
            .iter()
            .flat_map(|t| t.routes.iter())
            .filter(|r| super::POD_CIDR.contains(&r.destination))
            .filter_map(|r| match &r.target {
                RouteTarget::NetworkInterface(e) => Some(e.clone()),
                _ => None,
            })
            .collect();
        (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i]
                    .instance
                    .primary_eni()
                    .is_some_and(|e| targets.contains(&e.id))
            })
            .collect()
    }

    /// Runs the soak on this lab (built with [`soak_lab_config`]); see the module doc. Pods, faults and the
    /// churn are stopped and removed before it returns, whatever happens; the lab itself stays up.
    pub fn soak(&mut self, opts: &SoakOptions) -> anyhow::Result<SoakReport> {
        let mode = self.config.mode;
        let plan = schedule::plan(opts.seed, opts.run, mode);
        progress(format!(
            "soak ({} mode, seed {}): {} faults planned over {:.0} s",
            mode_str(mode),
            opts.seed,
            plan.len(),
            opts.run.as_secs_f64()
        ));
        self.api.insert(&kube_namespace(
            pods::NAMESPACE,
            &World::base_namespace_labels(pods::NAMESPACE),
        ));
        self.api.insert(&guard_policy(Group::A));
        let (foreign_table, foreign_target) = self.plant_foreign_route()?;
        self.sim.reset_counters();
        let t0 = Instant::now();
        let ctx = Arc::new(Ctx {
            plugin: self.config.cni_plugin.clone(),
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeInfo {
                    name: n.name.clone(),
                    netns: n.netns.clone(),
                    conflist: n.dir.join("net.d").join(names::CNI_CONFLIST),
                    host_ip: n.instance.private_ip,
                    checkpoint: n.dir.join("ipam.json"),
                })
                .collect(),
            api: self.api.clone(),
            prefix: self.id.netns_prefix(),
            seed: opts.seed,
            t0,
            node_down: self.nodes.iter().map(|_| AtomicBool::new(false)).collect(),
            paused: AtomicBool::new(false),
            deliveries: Arc::new(Mutex::new(Vec::new())),
        });
        let pop: Shared = Arc::new(Mutex::new(Population::default()));
        let mut run = Run {
            t0,
            ledger: Ledger::default(),
            faults: BTreeMap::new(),
            recovery: BTreeMap::new(),
            awaiting: Vec::new(),
            active: Vec::new(),
            max_active: 0,
            last_path_event: t0,
            node_dead: vec![false; self.nodes.len()],
            agent_killed: vec![false; self.nodes.len()],
            api_down: false,
            api_up_since: t0,
            ec2: BTreeSet::new(),
            policy: BTreeMap::new(),
            guarded_nodes: BTreeMap::new(),
            deferred: BTreeSet::new(),
            allowed_now: Group::A,
            policy_changes: 0,
            next_policy_at: POLICY_EVERY,
            last_ok: BTreeMap::new(),
            flagged: BTreeSet::new(),
            longest: None,
            allowed_delivered: 0,
            denied_delivered: 0,
            leader_changes: 0,
            leader: self.leader(),
            bursts: Vec::new(),
            injected: None,
            rng: Rng::new(opts.seed ^ 0x7e57),
        };
        for kind in FaultKind::ALL.into_iter().filter(|k| k.applies(mode)) {
            run.faults.insert(kind, FaultStats::default());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut churn = None;
        let result = self.soak_run(
            opts,
            &plan,
            &ctx,
            &pop,
            &mut run,
            &stop,
            &mut churn,
            &foreign_table,
            &foreign_target,
        );
        // Whatever happened: faults off, churn stopped, every pod removed.
        stop.store(true, Ordering::Relaxed);
        if let Some(c) = churn {
            let _ = c.join();
        }
        for b in run.bursts.drain(..) {
            let _ = b.join();
        }
        self.end_all_faults(&ctx, &mut run);
        let leftover: Vec<Arc<SoakPod>> = pods_lock(&pop).live.clone();
        for p in &leftover {
            ctx.remove_pod(&pop, p);
        }
        ctx.retry_dels(&pop);
        let outcome = result?;
        let stats = pods_lock(&pop).stats.clone();
        Ok(report::build(self, opts, run, outcome, stats, plan.len()))
    }

    #[allow(clippy::too_many_arguments)]
    fn soak_run(
        &mut self,
        opts: &SoakOptions,
        plan: &[PlannedFault],
        ctx: &Arc<Ctx>,
        pop: &Shared,
        run: &mut Run,
        stop: &Arc<AtomicBool>,
        churn: &mut Option<std::thread::JoinHandle<()>>,
        foreign_table: &underlay_cloud::RouteTableId,
        foreign_target: &RouteTarget,
    ) -> anyhow::Result<report::Outcome> {
        // Two guarded pods (on different subnets), then the clients.
        let n = self.nodes.len();
        for node in [0, n / 2] {
            let pod = ctx
                .add_pod(pop, node, Group::Guarded)?
                .context("wiring a guarded pod")?;
            run.guarded_nodes.insert(pod.name.clone(), node);
            run.policy.insert(
                pod.name.clone(),
                vec![PolicyState {
                    at_ms: 0,
                    allowed: Group::A,
                }],
            );
        }
        for k in 0..opts.clients_per_node {
            for node in 0..n {
                let group = if (node + k) % 2 == 0 {
                    Group::A
                } else {
                    Group::B
                };
                ctx.add_pod(pop, node, group)?;
            }
        }
        progress(format!(
            "{} pods wired (2 guarded); churn, policy changes and faults start",
            pods_lock(pop).live.len()
        ));
        std::thread::sleep(POLICY_GRACE);
        {
            let (ctx, pop, stop) = (ctx.clone(), pop.clone(), stop.clone());
            let target = opts.clients_per_node * n;
            let rng = Rng::new(opts.seed ^ 0xc4a2);
            *churn = Some(
                std::thread::Builder::new()
                    .name("soak-churn".into())
                    .spawn(move || ctx.churn(&pop, &stop, target, rng))?,
            );
        }
        let started = Instant::now();
        let mut next = 0;
        let mut tick = Instant::now();
        let mut last_progress = Instant::now();
        let mut interrupted = false;
        loop {
            if INTERRUPTED.load(Ordering::Relaxed) {
                progress("interrupted: stopping the soak and removing everything");
                interrupted = true;
                break;
            }
            let elapsed = started.elapsed();
            if elapsed >= opts.run {
                break;
            }
            // Ends first: a kind's next fault may start on the second its last one ends.
            let due: Vec<usize> = (0..run.active.len())
                .filter(|&i| run.active[i].fault.end() <= elapsed)
                .collect();
            for i in due.into_iter().rev() {
                let a = run.active.remove(i);
                self.end_fault(ctx, run, a)?;
            }
            while next < plan.len() && plan[next].at <= elapsed {
                self.start_fault(ctx, pop, run, plan[next].clone())?;
                next += 1;
            }
            self.maybe_change_policy(run, plan, elapsed);
            if let Some(InjectViolation::ReusedAddress) = opts.inject
                && run.injected.is_none()
                && elapsed >= (opts.run / 3).max(Duration::from_secs(5))
            {
                self.inject_reused_address(pop, run)?;
            }
            let seen = run.ledger.violations.len();
            self.check_second(opts, ctx, pop, run, foreign_table, foreign_target);
            for v in &run.ledger.violations[seen..] {
                progress(format!(
                    "VIOLATION (seed {}) {} at {:.1} s: {}",
                    opts.seed, v.check, v.at_s, v.detail
                ));
            }
            if last_progress.elapsed() >= Duration::from_secs(15) {
                let live = pods_lock(pop).live.len();
                progress(format!(
                    "{:>5.0} s: {live} pods, {} faults active, {} violation(s)",
                    elapsed.as_secs_f64(),
                    run.active.len(),
                    run.ledger.total_violations
                ));
                last_progress = Instant::now();
            }
            tick += Duration::from_secs(1);
            let now = Instant::now();
            if tick > now {
                std::thread::sleep(tick - now);
            } else {
                tick = now;
            }
        }
        let ran = started.elapsed();
        // Settle: faults off, churn stopped, every DEL through, then the cluster must converge.
        stop.store(true, Ordering::Relaxed);
        if let Some(c) = churn.take() {
            let _ = c.join();
        }
        for b in run.bursts.drain(..) {
            let _ = b.join();
        }
        self.end_all_faults(ctx, run);
        if interrupted {
            return Ok(report::Outcome {
                ran,
                interrupted,
                settle_ms: None,
            });
        }
        progress("run over: faults off, churn stopped; settling");
        let settle_start = Instant::now();
        let seen = run.ledger.violations.len();
        let settled = self.settle(ctx, pop, run);
        let settle_ms = settled.then(|| settle_start.elapsed().as_secs_f64() * 1e3);
        self.check_leaks(ctx, pop, run);
        for v in &run.ledger.violations[seen..] {
            progress(format!(
                "VIOLATION (seed {}) {} after settling: {}",
                opts.seed, v.check, v.detail
            ));
        }
        Ok(report::Outcome {
            ran,
            interrupted,
            settle_ms,
        })
    }

    fn start_fault(
        &mut self,
        ctx: &Arc<Ctx>,
        pop: &Shared,
        run: &mut Run,
        fault: PlannedFault,
    ) -> anyhow::Result<()> {
        let kind = fault.kind;
        let up_nodes = |run: &Run| -> Vec<usize> {
            (0..run.node_dead.len())
                .filter(|&i| !run.node_dead[i] && !run.agent_killed[i])
                .collect()
        };
        let target = match kind {
            FaultKind::AgentKill => {
                let c = up_nodes(run);
                if c.is_empty() {
                    return self.skip(run, kind);
                }
                let node = c[(fault.pick % c.len() as u64) as usize];
                if !run.api_down {
                    let b = pods::burst(ctx, pop, node, 3);
                    run.bursts.extend(b);
                }
                // In the middle of the burst's ADDs.
                std::thread::sleep(Duration::from_millis(50 + (fault.pick >> 20) % 350));
                self.kill_agent(node);
                run.agent_killed[node] = true;
                run.last_path_event = Instant::now();
                Target::Node(node)
            }
            FaultKind::LeaderKill => {
                let Some(r) = self.leader() else {
                    return self.skip(run, kind);
                };
                if self.controllers_running() < 2 {
                    return self.skip(run, kind);
                }
                self.kill_controller(r);
                run.awaiting.push((kind, Instant::now()));
                Target::Replica(r)
            }
            FaultKind::ApiOutage => {
                self.api.set_unreachable(true);
                ctx.paused.store(true, Ordering::Relaxed);
                run.api_down = true;
                Target::None
            }
            FaultKind::Ec2Errors | FaultKind::Ec2Throttle | FaultKind::Ec2Latency => {
                run.ec2.insert(kind);
                self.set_ec2_faults(&run.ec2);
                Target::None
            }
            FaultKind::NodeDeath => {
                let up: BTreeSet<usize> = up_nodes(run).into_iter().collect();
                let mut c: Vec<usize> = self.forwarders().intersection(&up).copied().collect();
                if c.is_empty() {
                    c = up.into_iter().collect();
                }
                if c.is_empty() {
                    return self.skip(run, kind);
                }
                let node = c[(fault.pick % c.len() as u64) as usize];
                ctx.node_down[node].store(true, Ordering::Relaxed);
                self.kill_agent(node);
                for dev in self.node_ifnames(node) {
                    kernel::ip(&self.nodes[node].netns, &["link", "set", &dev, "down"])?;
                }
                run.node_dead[node] = true;
                run.last_path_event = Instant::now();
                Target::Node(node)
            }
            FaultKind::EniDetach => {
                let live: Vec<Ipv4Addr> = pods_lock(pop).live.iter().map(|p| p.ip).collect();
                let snap = self.sim.snapshot();
                // Secondary ENIs of the nodes; those carrying pods first (a pool small enough for the primary
                // ENI leaves the warm ENIs empty).
                let secondary: Vec<_> = snap
                    .enis
                    .iter()
                    .filter(|e| e.attachment.as_ref().is_some_and(|a| a.device_index > 0))
                    .collect();
                let with_pods: Vec<_> = secondary
                    .iter()
                    .copied()
                    .filter(|e| e.secondary_addresses().any(|a| live.contains(&a)))
                    .collect();
                let c = if with_pods.is_empty() {
                    secondary
                } else {
                    with_pods
                };
                if c.is_empty() {
                    return self.skip(run, kind);
                }
                let eni = c[(fault.pick % c.len() as u64) as usize];
                let attachment = eni.attachment.clone().expect("filtered on attachment");
                let node = self
                    .nodes
                    .iter()
                    .position(|n| n.instance.id == attachment.instance);
                // Through the EC2 API (it counts as a call, and the fault knobs apply to it as to anyone's).
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let sim = self.sim.clone();
                if let Err(e) = rt.block_on(async move {
                    use underlay_cloud::Cloud;
                    sim.detach_network_interface(&attachment.id, true).await
                }) {
                    tracing::info!(error = %e, "soak: detaching an ENI failed; skipped");
                    return self.skip(run, kind);
                }
                run.last_path_event = Instant::now();
                node.map_or(Target::None, Target::Node)
            }
            FaultKind::NetnsDelete => {
                let c: Vec<Arc<SoakPod>> = pods_lock(pop)
                    .live
                    .iter()
                    .filter(|p| p.group != Group::Guarded && !run.node_dead[p.node])
                    .cloned()
                    .collect();
                if c.is_empty() {
                    return self.skip(run, kind);
                }
                let pod = &c[(fault.pick % c.len() as u64) as usize];
                ctx.delete_netns(pop, pod, fault.hold)?;
                Target::None
            }
        };
        tracing::info!(fault = kind.as_str(), ?target, "soak: fault starts");
        run.faults.entry(kind).or_default().injected += 1;
        self.policy_disturbed(run, &target, kind, false);
        run.active.push(Active { fault, target });
        run.max_active = run.max_active.max(run.active.len());
        Ok(())
    }

    fn skip(&self, run: &mut Run, kind: FaultKind) -> anyhow::Result<()> {
        run.faults.entry(kind).or_default().skipped += 1;
        Ok(())
    }

    fn end_fault(&mut self, ctx: &Arc<Ctx>, run: &mut Run, a: Active) -> anyhow::Result<()> {
        let kind = a.fault.kind;
        match (kind, &a.target) {
            (FaultKind::AgentKill, Target::Node(n)) => {
                run.agent_killed[*n] = false;
                if !run.node_dead[*n] {
                    self.start_agent(*n)?;
                }
                run.last_path_event = Instant::now();
            }
            (FaultKind::LeaderKill, Target::Replica(r)) => {
                self.start_controller(*r)?;
            }
            (FaultKind::ApiOutage, _) => {
                self.api.set_unreachable(false);
                ctx.paused.store(false, Ordering::Relaxed);
                run.api_down = false;
                run.api_up_since = Instant::now();
            }
            (FaultKind::Ec2Errors | FaultKind::Ec2Throttle | FaultKind::Ec2Latency, _) => {
                run.ec2.remove(&kind);
                self.set_ec2_faults(&run.ec2);
            }
            (FaultKind::NodeDeath, Target::Node(n)) => {
                let name = self.nodes[*n].name.clone();
                self.recover_node(&name)?;
                run.node_dead[*n] = false;
                ctx.node_down[*n].store(false, Ordering::Relaxed);
                run.last_path_event = Instant::now();
            }
            _ => {}
        }
        tracing::info!(fault = kind.as_str(), "soak: fault ends");
        self.policy_disturbed(run, &a.target, kind, true);
        if kind != FaultKind::LeaderKill {
            run.awaiting.push((kind, Instant::now()));
        }
        Ok(())
    }

    fn end_all_faults(&mut self, ctx: &Arc<Ctx>, run: &mut Run) {
        for a in std::mem::take(&mut run.active) {
            if let Err(e) = self.end_fault(ctx, run, a) {
                progress(format!("ending a fault: {e:#}"));
            }
        }
        // Whatever state a failed step left: everything back on.
        self.api.set_unreachable(false);
        self.sim.set_faults(Faults::default());
        ctx.paused.store(false, Ordering::Relaxed);
        for r in 0..self.config.controller_replicas {
            if self.controllers.get(r).is_none_or(Option::is_none) {
                let _ = self.start_controller(r);
            }
        }
    }

    /// A fault that keeps a guarded pod's node (or every node) from applying a policy change: a change written
    /// within the grace before it starts counts only from the fault's end (the agent applies it once back).
    fn policy_disturbed(&self, run: &mut Run, target: &Target, kind: FaultKind, ending: bool) {
        let nodes: Vec<usize> = match (kind, target) {
            (FaultKind::AgentKill | FaultKind::NodeDeath, Target::Node(n)) => vec![*n],
            (FaultKind::ApiOutage, _) => (0..self.nodes.len()).collect(),
            _ => return,
        };
        let now = run.ms();
        let grace = POLICY_GRACE.as_millis() as u64;
        for (name, hist) in run.policy.iter_mut() {
            if !run
                .guarded_nodes
                .get(name)
                .is_some_and(|n| nodes.contains(n))
            {
                continue;
            }
            let changes = hist.len();
            let Some(last) = hist.last_mut() else {
                continue;
            };
            if ending {
                if run.deferred.remove(name) {
                    // An ended watch comes back only after its backoff.
                    last.at_ms = if kind == FaultKind::ApiOutage {
                        now + WATCH_RECOVERY.as_millis() as u64
                    } else {
                        now
                    };
                }
            } else if changes > 1 && now.saturating_sub(last.at_ms) < grace {
                run.deferred.insert(name.clone());
            }
        }
    }

    /// Flips the guard policy every [`POLICY_EVERY`] (± a quarter), but never while the API is down or a guarded
    /// pod's agent is, within [`WATCH_RECOVERY`] after the API came back (the agents' watches are still in
    /// backoff), nor within the grace before a planned API outage, agent kill or node death (a write then may
    /// reach no agent).
    fn maybe_change_policy(&self, run: &mut Run, plan: &[PlannedFault], elapsed: Duration) {
        if elapsed < run.next_policy_at
            || run.api_down
            || run.api_up_since.elapsed() < WATCH_RECOVERY
        {
            return;
        }
        let guarded_down = run
            .policy
            .keys()
            .filter_map(|name| run.guarded_node(name))
            .any(|n| run.node_dead[n] || run.agent_killed[n]);
        let outage_soon = plan.iter().any(|f| {
            matches!(
                f.kind,
                FaultKind::ApiOutage | FaultKind::AgentKill | FaultKind::NodeDeath
            ) && f.at >= elapsed
                && f.at <= elapsed + POLICY_GRACE + Duration::from_secs(1)
        });
        if guarded_down || outage_soon {
            return;
        }
        let next = if run.allowed_now == Group::A {
            Group::B
        } else {
            Group::A
        };
        self.api.insert(&guard_policy(next));
        let at_ms = run.ms();
        for hist in run.policy.values_mut() {
            hist.push(PolicyState {
                at_ms,
                allowed: next,
            });
        }
        run.allowed_now = next;
        run.policy_changes += 1;
        let q = POLICY_EVERY.as_millis() as u64 / 4;
        run.next_policy_at =
            elapsed + POLICY_EVERY - Duration::from_millis(q) + run.rng.millis(0, 2 * q);
    }

    fn inject_reused_address(&self, pop: &Shared, run: &mut Run) -> anyhow::Result<()> {
        let clients: Vec<Arc<SoakPod>> = pods_lock(pop)
            .live
            .iter()
            .filter(|p| p.group != Group::Guarded)
            .cloned()
            .collect();
        if clients.len() < 2 {
            return Ok(());
        }
        let (a, b) = (&clients[0], &clients[1]);
        kernel::ip(
            &b.netns,
            &["addr", "add", &format!("{}/32", a.ip), "dev", "eth0"],
        )?;
        let what = format!("{}'s address {} added to {}'s eth0", a.name, a.ip, b.name);
        progress(format!("injected violation: {what}"));
        run.injected = Some(what);
        Ok(())
    }

    /// Every check of one second.
    fn check_second(
        &mut self,
        opts: &SoakOptions,
        ctx: &Arc<Ctx>,
        pop: &Shared,
        run: &mut Run,
        foreign_table: &underlay_cloud::RouteTableId,
        foreign_target: &RouteTarget,
    ) {
        let at = run.secs();
        let live: Vec<Arc<SoakPod>> = pods_lock(pop).live.clone();
        let guarded: Vec<Arc<SoakPod>> = live
            .iter()
            .filter(|p| p.group == Group::Guarded)
            .cloned()
            .collect();
        let sent_ms = run.ms();
        let round = self.probe_round(&live, &guarded, run, sent_ms);

        // Unique addresses: in the pods' namespaces, and across the nodes' checkpoints.
        let mut failures = Vec::new();
        for (addr, owners) in
            checks::duplicates(round.addresses.iter().map(|(a, p)| (*a, p.clone())))
        {
            failures.push(format!("{addr} on eth0 of {}", owners.join(" and ")));
        }
        let allocations = ctx
            .nodes
            .iter()
            .flat_map(|n| {
                read_checkpoint(&n.checkpoint)
                    .into_iter()
                    .map(move |(c, a)| (a, format!("{}/{c}", n.name)))
            })
            .collect::<Vec<_>>();
        for (addr, owners) in checks::duplicates(allocations) {
            failures.push(format!("{addr} allocated to {}", owners.join(" and ")));
        }
        run.ledger.record(checks::UNIQUE_ADDRESS, at, failures);

        // Denied datagrams: what the guarded pods' recorders took in.
        let deliveries =
            std::mem::take(&mut *ctx.deliveries.lock().unwrap_or_else(|e| e.into_inner()));
        let groups = pods_lock(pop).groups.clone();
        let grace = POLICY_GRACE.as_millis() as u64;
        let mut failures = Vec::new();
        for d in &deliveries {
            let Some((group, name)) = groups.get(&d.from_id) else {
                continue;
            };
            let hist = run.policy.get(&d.guarded).map(Vec::as_slice).unwrap_or(&[]);
            if checks::denied(hist, *group, d.sent_ms, grace) {
                run.denied_delivered += 1;
                let allowed = hist.last().map_or("?", |s| s.allowed.label());
                failures.push(format!(
                    "{name} (group {}) → {}:{} delivered at {:.1} s (sent {:.1} s); the policy lets in group {allowed}",
                    group.label(),
                    d.guarded,
                    pods::GUARD_PORT,
                    d.at_ms as f64 / 1e3,
                    d.sent_ms as f64 / 1e3
                ));
            } else {
                run.allowed_delivered += 1;
            }
        }
        run.ledger
            .record(checks::DENIED_NOT_DELIVERED, at, failures);

        // Reachability within the bound after the last fault touching the pod's path.
        let now = Instant::now();
        let mut failures = Vec::new();
        let mut all_ok = true;
        for p in &live {
            if run.node_dead[p.node] {
                all_ok = false;
                continue;
            }
            let Some(ok) = round.reached.get(&p.id) else {
                continue;
            };
            let last = *run.last_ok.entry(p.id).or_insert(p.wired_at);
            if *ok {
                run.last_ok.insert(p.id, now);
                run.flagged.remove(&p.id);
                continue;
            }
            all_ok = false;
            let gap = now.duration_since(last);
            if run
                .longest
                .as_ref()
                .is_none_or(|l| gap.as_secs_f64() * 1e3 > l.ms)
            {
                run.longest = Some(Unreachability {
                    pod: p.name.clone(),
                    node: self.nodes[p.node].name.clone(),
                    ms: gap.as_secs_f64() * 1e3,
                    at_s: at,
                });
            }
            let since = last.max(run.last_path_event).max(p.wired_at);
            if now.duration_since(since) > opts.reach_bound && run.flagged.insert(p.id) {
                failures.push(format!(
                    "{} ({}) on {} unanswered for {:.1} s, {:.1} s after the last fault touching its path",
                    p.name,
                    p.ip,
                    self.nodes[p.node].name,
                    gap.as_secs_f64(),
                    now.duration_since(run.last_path_event).as_secs_f64()
                ));
            }
        }
        run.ledger
            .record(checks::REACHABLE_WITHIN_BOUND, at, failures);
        if all_ok {
            for (kind, since) in run.awaiting.drain(..).collect::<Vec<_>>() {
                if kind == FaultKind::LeaderKill {
                    run.awaiting.push((kind, since));
                    continue;
                }
                run.recovery
                    .entry(kind)
                    .or_default()
                    .push(now.duration_since(since).as_secs_f64() * 1e3);
            }
        }
        // A killed leader has recovered once another replica leads.
        let leader = self.leader();
        if run.leader.is_some() && leader.is_some() && leader != run.leader {
            run.leader_changes += 1;
        }
        if leader.is_some() {
            run.leader = leader;
            let mut keep = Vec::new();
            for (kind, since) in run.awaiting.drain(..) {
                if kind == FaultKind::LeaderKill {
                    run.recovery
                        .entry(kind)
                        .or_default()
                        .push(now.duration_since(since).as_secs_f64() * 1e3);
                } else {
                    keep.push((kind, since));
                }
            }
            run.awaiting = keep;
        }

        // Route tables within their limit; the foreign route as planted.
        let snap = self.sim.snapshot();
        let mut over = Vec::new();
        let mut foreign = Vec::new();
        for s in &self.subnets {
            let Some(t) = snap.route_tables.iter().find(|t| t.id == s.table) else {
                continue;
            };
            let n = t
                .routes
                .iter()
                .filter(|r| r.target != RouteTarget::Local)
                .count();
            if n > self.config.route_limit {
                over.push(format!(
                    "{} holds {n} routes (limit {})",
                    t.id, self.config.route_limit
                ));
            }
            if &t.id == foreign_table {
                match t.routes.iter().find(|r| r.destination == FOREIGN_ROUTE) {
                    Some(r) if &r.target == foreign_target => {}
                    Some(r) => foreign.push(format!(
                        "{FOREIGN_ROUTE} in {} now targets {:?}",
                        t.id, r.target
                    )),
                    None => foreign.push(format!("{FOREIGN_ROUTE} gone from {}", t.id)),
                }
            }
        }
        run.ledger
            .record(checks::ROUTE_TABLE_WITHIN_LIMIT, at, over);
        run.ledger
            .record(checks::FOREIGN_ROUTE_UNCHANGED, at, foreign);
    }

    /// One second's probes: every live pod reads its `eth0` addresses and sends a datagram to each guarded pod;
    /// every pod wired for a second is probed from [`PEERS`] peers on live nodes.
    fn probe_round(
        &self,
        live: &[Arc<SoakPod>],
        guarded: &[Arc<SoakPod>],
        run: &mut Run,
        sent_ms: u64,
    ) -> Round {
        let sources: Vec<usize> = (0..live.len())
            .filter(|&i| !run.node_dead[live[i].node])
            .collect();
        let mut jobs: Vec<Vec<(u32, Ipv4Addr)>> = vec![Vec::new(); live.len()];
        let mut reached: BTreeMap<u32, bool> = BTreeMap::new();
        for t in live {
            if t.wired_at.elapsed() < Duration::from_secs(1) {
                continue;
            }
            let peers: Vec<usize> = sources
                .iter()
                .copied()
                .filter(|&s| live[s].id != t.id)
                .collect();
            if peers.is_empty() {
                continue;
            }
            reached.insert(t.id, false);
            let start = run.rng.below(peers.len() as u64) as usize;
            for k in 0..PEERS.min(peers.len()) {
                jobs[peers[(start + k) % peers.len()]].push((t.id, t.ip));
            }
        }
        let results: Vec<PodProbes> = std::thread::scope(|s| {
            let handles: Vec<_> = live
                .iter()
                .zip(&jobs)
                .map(|(p, jobs)| {
                    s.spawn(move || {
                        let addrs = eth0_addresses(&p.netns);
                        for g in guarded {
                            if g.id != p.id {
                                p.send_probe(g.ip, sent_ms);
                            }
                        }
                        let r = jobs
                            .iter()
                            .map(|(id, ip)| (*id, p.round_trip(*ip, PROBE_TIMEOUT)))
                            .collect();
                        (r, addrs)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        let mut addresses = Vec::new();
        for (p, (r, addrs)) in live.iter().zip(results) {
            for (id, ok) in r {
                if ok {
                    reached.insert(id, true);
                }
            }
            for a in addrs {
                addresses.push((a, p.name.clone()));
            }
        }
        Round { reached, addresses }
    }

    /// Waits until every agent and a leader run, every DEL went through, every pod answers and (eni mode) the
    /// pools are tidy. Returns whether that happened within [`SETTLE_WAIT`].
    fn settle(&mut self, ctx: &Arc<Ctx>, pop: &Shared, run: &mut Run) -> bool {
        let deadline = Instant::now() + SETTLE_WAIT;
        let mut quiet_since: Option<Instant> = None;
        loop {
            if INTERRUPTED.load(Ordering::Relaxed) {
                return false;
            }
            ctx.retry_dels(pop);
            let pending = pods_lock(pop).pending_del.len();
            let live: Vec<Arc<SoakPod>> = pods_lock(pop).live.clone();
            let guarded: Vec<Arc<SoakPod>> = Vec::new();
            let round = self.probe_round(&live, &guarded, run, run.ms());
            let all_ok = round.reached.values().all(|ok| *ok);
            let tidy =
                self.config.mode != underlay_api::Mode::Eni || self.pools_tidy(&self.node_pools());
            let agents = (0..self.nodes.len()).all(|i| self.agent_running(i));
            if pending == 0 && all_ok && tidy && agents && self.leader().is_some() {
                // The last DELs' Pod deletions reach the agents' policy state within the grace: the leak
                // checks come after it.
                match quiet_since {
                    Some(t) if t.elapsed() >= POLICY_GRACE => {
                        run.ledger
                            .record(checks::SETTLED_REACHABLE, run.secs(), vec![]);
                        return true;
                    }
                    Some(_) => {}
                    None => quiet_since = Some(Instant::now()),
                }
            } else {
                quiet_since = None;
            }
            if Instant::now() > deadline {
                let unanswered: Vec<String> = live
                    .iter()
                    .filter(|p| round.reached.get(&p.id) == Some(&false))
                    .map(|p| format!("{} ({})", p.name, p.ip))
                    .collect();
                let mut what = Vec::new();
                if !unanswered.is_empty() {
                    what.push(format!("unanswered: {}", unanswered.join(", ")));
                }
                if pending > 0 {
                    what.push(format!("{pending} DEL(s) still failing"));
                }
                if !tidy {
                    what.push("eni pools not tidy".into());
                }
                if !agents {
                    what.push("an agent is not running".into());
                }
                if self.leader().is_none() {
                    what.push("no controller leads".into());
                }
                run.ledger.record(
                    checks::SETTLED_REACHABLE,
                    run.secs(),
                    vec![format!(
                        "not settled within {:?}: {}",
                        SETTLE_WAIT,
                        what.join("; ")
                    )],
                );
                return false;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// After settling: nothing of a pod that is gone may remain.
    fn check_leaks(&self, ctx: &Arc<Ctx>, pop: &Shared, run: &mut Run) {
        let at = run.secs();
        let (live, ever) = {
            let p = pods_lock(pop);
            (p.live.clone(), p.ever.clone())
        };
        let live_addrs: BTreeSet<Ipv4Addr> = live.iter().map(|p| p.ip).collect();
        let gone: BTreeSet<Ipv4Addr> = ever.difference(&live_addrs).copied().collect();
        let (mut entries, mut veths, mut rules, mut nft) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, n) in ctx.nodes.iter().enumerate() {
            let here: Vec<&Arc<SoakPod>> = live.iter().filter(|p| p.node == i).collect();
            let containers: BTreeSet<&str> = here.iter().map(|p| p.container_id.as_str()).collect();
            let held = read_checkpoint(&n.checkpoint);
            for (c, a) in &held {
                if !containers.contains(c.as_str()) {
                    entries.push(format!("{}: {c} holds {a}", n.name));
                }
            }
            for p in &here {
                if !held.iter().any(|(c, _)| c == &p.container_id) {
                    entries.push(format!(
                        "{}: live pod {} missing from the checkpoint",
                        n.name, p.name
                    ));
                }
            }
            let links = kernel::ip(&n.netns, &["-j", "link", "show"]).unwrap_or_default();
            let links: serde_json::Value = serde_json::from_str(&links).unwrap_or_default();
            let pod_veths = links
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l["ifname"].as_str())
                .filter(|name| {
                    name.starts_with(names::HOST_VETH_PREFIX) && !name.starts_with("eth")
                })
                .count();
            if pod_veths != here.len() {
                veths.push(format!(
                    "{}: {pod_veths} pod veths for {} live pods",
                    n.name,
                    here.len()
                ));
            }
            let rs = kernel::ip(&n.netns, &["-j", "-4", "rule", "show"]).unwrap_or_default();
            let rs: serde_json::Value = serde_json::from_str(&rs).unwrap_or_default();
            for r in rs.as_array().into_iter().flatten() {
                let prio = r["priority"].as_u64().unwrap_or(0) as u32;
                if prio != names::RULE_PRIORITY_FROM_POD && prio != names::RULE_PRIORITY_TO_POD {
                    continue;
                }
                let addr = r["src"]
                    .as_str()
                    .filter(|s| *s != "all")
                    .or(r["dst"].as_str());
                let Some(addr) = addr.and_then(|a| a.parse::<Ipv4Addr>().ok()) else {
                    continue;
                };
                if !here.iter().any(|p| p.ip == addr) {
                    rules.push(format!("{}: rule {prio} for {addr}", n.name));
                }
            }
            let out = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &n.netns,
                    "nft",
                    "-j",
                    "list",
                    "table",
                    names::NFT_FAMILY,
                    names::NFT_TABLE,
                ])
                .output();
            if let Ok(out) = out
                && out.status.success()
            {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                for a in checks::nft_addresses(&v).intersection(&gone) {
                    nft.push(format!("{}: {a}", n.name));
                }
            }
        }
        run.ledger
            .record(checks::NO_LEAKED_CHECKPOINT_ENTRY, at, entries);
        run.ledger.record(checks::NO_LEAKED_VETH, at, veths);
        run.ledger.record(checks::NO_LEAKED_RULE, at, rules);
        run.ledger.record(checks::NO_LEAKED_NFT_ELEMENT, at, nft);
        if self.config.mode == underlay_api::Mode::Eni {
            let mut leaks = Vec::new();
            if !self.pools_tidy(&self.node_pools()) {
                leaks.push("a detached cluster ENI, an emptied ENI, a withdrawn address, or EC2 assigning other than the pool".into());
            }
            run.ledger
                .record(checks::NO_LEAKED_ENI_OR_ADDRESS, at, leaks);
        }
    }
}

/// One pod's part of a second's probes: (probed pod, answered) per round trip, and its `eth0` addresses.
type PodProbes = (Vec<(u32, bool)>, Vec<Ipv4Addr>);

/// What one second's probes found.
struct Round {
    /// Probed pods: answered by at least one peer.
    reached: BTreeMap<u32, bool>,
    /// `eth0` addresses found in each live pod's namespace.
    addresses: Vec<(Ipv4Addr, String)>,
}

impl Run {
    /// The node a guarded pod runs on.
    fn guarded_node(&self, name: &str) -> Option<usize> {
        self.guarded_nodes.get(name).copied()
    }
}

fn pods_lock(p: &Shared) -> std::sync::MutexGuard<'_, Population> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// IPv4 addresses on `eth0` of a namespace.
fn eth0_addresses(netns: &str) -> Vec<Ipv4Addr> {
    let Ok(out) = kernel::ip(netns, &["-j", "-4", "addr", "show", "dev", "eth0"]) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().into_iter().flatten())
        .filter_map(|a| a["local"].as_str().and_then(|s| s.parse().ok()))
        .collect()
}

/// Live allocations of an agent's checkpoint: (container id, address).
fn read_checkpoint(path: &std::path::Path) -> Vec<(String, Ipv4Addr)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["allocations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            Some((
                a["key"]["container_id"].as_str()?.to_string(),
                a["address"].as_str()?.parse().ok()?,
            ))
        })
        .collect()
}

pub fn mode_str(mode: underlay_api::Mode) -> &'static str {
    match mode {
        underlay_api::Mode::Routed => "routed",
        underlay_api::Mode::Eni => "eni",
    }
}

/// Runs one soak in `config`'s mode: builds the lab ([`soak_lab_config`]), soaks it, takes it down.
pub fn run_soak(config: LabConfig, opts: &SoakOptions) -> anyhow::Result<SoakReport> {
    let mut lab = Lab::up(soak_lab_config(config))?;
    if INTERRUPTED.load(Ordering::Relaxed) {
        lab.down()?;
        bail!("interrupted");
    }
    let report = lab.soak(opts);
    let down = lab.down();
    let report = report?;
    down?;
    Ok(report)
}
