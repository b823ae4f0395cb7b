//! A whole cluster (routed or eni mode) in the lab: vpcsim + fabric, a Kubernetes API stand-in, the real controller and
//! one real agent per node (in this process, each agent bound to its node's namespace), and pods wired by the
//! real `underlay-cni` binary.
//!
//! ```text
//!   LabConfig ──up──► VpcSim ──events──► Fabric (follower thread)
//!                       ▲ EC2 calls (rate-aware queue)
//!                  controller ──kube::Client──► ApiSim ◄──kube::Client── agent × nodes (node netns)
//!                       │ probes /healthz over the VPC from the controller host's namespace
//!   pods: nsenter --net=<node> underlay-cni ADD  ──unix socket──► that node's agent (IPAM)
//! ```
//!
//! [`Lab::check`] measures a connectivity matrix with UDP echo across every path class; [`Lab::failover`] kills a
//! forwarder under a steady probe; [`Lab::soak`] runs churn, policy changes and seeded overlapping faults with
//! invariants checked every second. Each agent and each controller replica (`controller_replicas`, on the Lease)
//! runs on a tokio runtime of its own, so that killing one (`kill_agent`, `kill_controller`) drops every task it
//! spawned, as `kill -9` would. Everything the lab creates carries its prefix and goes on [`Lab::down`] or drop.

mod check;
mod churn;
mod datapath;
mod echo;
mod failover;
pub mod policy;
mod report;
pub mod soak;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use tokio::sync::watch;
use underlay_cloud::queue::{QueueConfig, RateLimitedCloud};
use underlay_cloud::{Cloud, Instance, RouteTableId, SubnetId, VpcId};
use underlay_core::names;
use underlay_vpcsim::{AddressOrder, RunInstance, VpcSim};

use crate::{Fabric, FabricOptions, LabId, kernel};

pub use check::{CheckReport, PathClass};
pub use churn::{ChurnReport, default_burst};
pub use datapath::{DatapathOptions, DatapathRun};
pub use failover::{BLACKHOLE_BAR, FailoverReport, FailoverStages};
pub use report::{DemoReport, StatusReport};

/// Bytes of each request and response of `bench datapath`'s round trips.
pub fn datapath_rr_bytes() -> usize {
    datapath::RR_BYTES
}

/// Zones of the lab's region, in order.
pub const ZONES: [&str; 3] = ["us-east-1a", "us-east-1b", "us-east-1c"];
/// The lab VPC.
pub const VPC_CIDR: Ipv4Net = crate::plan::ipnet_v4(198, 18, 0, 0, 16);
/// The lab cluster's pod CIDR.
pub const POD_CIDR: Ipv4Net = crate::plan::ipnet_v4(100, 64, 0, 0, 16);
/// Instance type of every lab node.
pub const NODE_TYPE: &str = "m5.large";
/// How long a released pod address cools down before reuse in the lab's agents (60 s in a cluster): while it
/// cools it counts as held, so `lab churn` would otherwise wait a minute for pools to shrink.
pub const LAB_COOLDOWN: Duration = Duration::from_secs(5);
/// Pod MTU in the lab (veths carry 1500 by default; the fabric does not model jumbo frames).
pub const LAB_MTU: u32 = 1500;

/// What `underlay lab up` builds.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Lab id: 1–6 lowercase letters or digits; every namespace is `ul-<name>-…`.
    pub name: String,
    pub zones: usize,
    pub subnets_per_zone: usize,
    pub nodes: usize,
    pub pods_per_node: usize,
    /// Route limit of every VPC route table (AWS's default is 50; lower makes aggregation visible).
    pub route_limit: usize,
    pub seed: u64,
    pub block_prefix_len: u8,
    pub probe_interval: Duration,
    /// How long a recovered forwarder must stay healthy before routes fail back to it.
    pub hold_down: Duration,
    /// The `underlay-cni` binary pods are wired with.
    pub cni_plugin: PathBuf,
    /// Agents' sockets, checkpoints and CNI configuration.
    pub state_dir: PathBuf,
    /// Address mode of the cluster: `routed` (pod blocks, aggregated VPC routes) or `eni` (secondary addresses
    /// and prefixes of ENIs the controller attaches; source/dest check stays on).
    pub mode: underlay_api::Mode,
    /// EC2 instance type of every node (vpcsim enforces its ENI and address limits).
    pub instance_type: String,
    /// Eni mode: how long the controller waits before releasing excess addresses (30 s by default in a cluster;
    /// shorter in the lab so that `lab churn` sees pools shrink within the demo).
    pub release_delay: Duration,
    /// Controller replicas campaigning for the leader Lease (one leads, the others stand by).
    pub controller_replicas: usize,
    /// The Lease's duration and renewal period (a standby takes over this long after the leader's last renewal).
    pub lease_duration: Duration,
    pub lease_renew: Duration,
    /// vpcsim's AWS-like route timing (`Faults::aws_route_model`: route calls 100–300 ms, DescribeRouteTables
    /// 100–300 ms, a route change reaching the fabric 200–500 ms after its call answered). On by default.
    pub aws_route_latency: bool,
    /// Agents run the tc-BPF fast path where the kernel supports it (false: forced off, the kernel path only).
    pub fast_path: bool,
}

impl LabConfig {
    /// The demo's shape: 3 zones × 2 subnets, 12 nodes, 4 pods each, 8 routes per table.
    pub fn demo(cni_plugin: PathBuf) -> Self {
        let name = "demo".to_string();
        Self {
            state_dir: default_state_dir(&name),
            name,
            zones: 3,
            subnets_per_zone: 2,
            nodes: 12,
            pods_per_node: 4,
            route_limit: 8,
            seed: 1,
            block_prefix_len: 26,
            probe_interval: underlay_controller::config::DEFAULT_PROBE_INTERVAL,
            hold_down: Duration::from_secs(10),
            cni_plugin,
            mode: underlay_api::Mode::Routed,
            instance_type: NODE_TYPE.to_string(),
            release_delay: Duration::from_secs(3),
            controller_replicas: 1,
            lease_duration: underlay_controller::lease::DEFAULT_LEASE_DURATION,
            lease_renew: underlay_controller::lease::DEFAULT_RENEW_EVERY,
            aws_route_latency: true,
            fast_path: true,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        LabId::new(&self.name)?;
        if self.zones == 0 || self.zones > ZONES.len() {
            bail!("--zones must be 1 to {}", ZONES.len());
        }
        if self.subnets_per_zone == 0 || self.zones * self.subnets_per_zone > 64 {
            bail!("--subnets-per-zone must be at least 1, and zones × subnets at most 64");
        }
        if self.nodes == 0 || self.nodes > 200 {
            bail!("--nodes must be 1 to 200");
        }
        let block = 1usize << (32 - u32::from(self.block_prefix_len));
        if self.pods_per_node + 2 > block {
            bail!(
                "--pods-per-node {} does not fit a /{} block",
                self.pods_per_node,
                self.block_prefix_len
            );
        }
        if self.controller_replicas == 0 || self.controller_replicas > 3 {
            bail!("controller replicas must be 1 to 3");
        }
        if self.lease_renew.is_zero() || self.lease_renew >= self.lease_duration {
            bail!("the lease renewal period must be non-zero and shorter than the lease");
        }
        if underlay_core::instance_types::lookup(&self.instance_type).is_none() {
            bail!(
                "--instance-type {}: not a known instance type",
                self.instance_type
            );
        }
        // Each table holds the IGW default route and keeps one route of headroom; every subnet with nodes
        // needs at least one pod route (routed mode: eni mode adds no VPC route).
        let subnets_used = (self.zones * self.subnets_per_zone).min(self.nodes);
        if self.mode == underlay_api::Mode::Routed && self.route_limit < 2 + subnets_used {
            bail!(
                "--route-limit {} leaves no pod route for some of the {subnets_used} subnets with nodes: \
                 each table holds the IGW default route, one route of headroom and at least one route per \
                 subnet (use at least {})",
                self.route_limit,
                2 + subnets_used
            );
        }
        if !self.cni_plugin.is_file() {
            bail!(
                "CNI plugin {} not found (build it: cargo build -p underlay-cni)",
                self.cni_plugin.display()
            );
        }
        Ok(())
    }
}

/// Where a lab keeps its agents' state: `<tmp>/underlay-lab-<name>`.
pub fn default_state_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("underlay-lab-{name}"))
}

/// One subnet of the lab VPC.
#[derive(Debug, Clone)]
pub struct LabSubnet {
    pub id: SubnetId,
    pub zone: String,
    pub cidr: Ipv4Net,
    pub table: RouteTableId,
}

/// One node: its instance, namespace and agent.
#[derive(Debug)]
pub struct LabNode {
    pub name: String,
    pub instance: Instance,
    pub subnet: usize,
    pub netns: String,
    agent: Option<AgentHandle>,
    dir: PathBuf,
    /// From the Node's creation to its taint's removal.
    pub ready_after: Option<Duration>,
}

/// A running agent: its own runtime (a node has its agent to itself), so that killing it drops every task it
/// spawned at once, as `kill -9` would.
#[derive(Debug)]
struct AgentHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    rt: tokio::runtime::Runtime,
}

/// One controller replica, on its own runtime (see [`AgentHandle`]).
#[derive(Debug)]
struct ControllerReplica {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    rt: tokio::runtime::Runtime,
    /// `true` while this replica leads.
    leading: watch::Receiver<bool>,
}

/// A one-worker runtime for one component of the lab.
fn component_runtime(name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("starting the runtime of {name}"))
}

/// One pod: its namespace, address and node.
#[derive(Debug, Clone)]
pub struct LabPod {
    pub name: String,
    pub netns: String,
    pub node: usize,
    pub ip: Ipv4Addr,
    pub container_id: String,
}

/// A running lab.
#[allow(missing_debug_implementations)]
pub struct Lab {
    pub config: LabConfig,
    id: LabId,
    pub sim: VpcSim,
    pub vpc: VpcId,
    pub subnets: Vec<LabSubnet>,
    fabric: Option<FabricFollower>,
    api: underlay_apisim::ApiSim,
    /// Controller replicas by index (`None`: killed or stopped); each campaigns for the leader Lease.
    controllers: Vec<Option<ControllerReplica>>,
    /// Starts of each replica, for unique identities across restarts.
    controller_starts: Vec<u32>,
    controller_events: tokio::sync::broadcast::Sender<underlay_controller::ControllerEvent>,
    pub controller_host: Instance,
    pub nodes: Vec<LabNode>,
    pub pods: Vec<LabPod>,
    /// Time `up` took, by step.
    pub build_steps: Vec<(String, Duration)>,
}

struct FabricFollower {
    stop: Arc<AtomicBool>,
    seq: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<(Fabric, crate::Result<()>)>,
}

/// Progress lines on stderr (stdout carries the report).
pub fn progress(msg: impl AsRef<str>) {
    eprintln!("  {}", msg.as_ref());
}

impl Lab {
    /// Builds the VPC, the fabric, the control plane, the nodes and their pods; waits until every node is
    /// untainted and every pod wired. On any failure everything built so far is removed.
    pub fn up(config: LabConfig) -> anyhow::Result<Lab> {
        config.validate()?;
        let id = LabId::new(&config.name)?;
        if let Some(ns) = kernel::netns_with_prefix(&id.netns_prefix())
            .into_iter()
            .next()
        {
            bail!(
                "lab {} exists already ({ns}); remove it with `underlay lab down --name {}`",
                config.name,
                config.name
            );
        }
        let _ = std::fs::remove_dir_all(&config.state_dir);
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating {}", config.state_dir.display()))?;
        let sim = VpcSim::builder(config.seed)
            .route_limit(config.route_limit)
            .address_order(AddressOrder::Lowest)
            .build();
        if config.aws_route_latency {
            sim.update_faults(|f| *f = std::mem::take(f).aws_route_model());
        }
        let started = Instant::now();
        progress(format!(
            "VPC {VPC_CIDR}: {} zones × {} subnets, route limit {} per table",
            config.zones, config.subnets_per_zone, config.route_limit
        ));
        let (vpc, subnets) = build_vpc(&sim, &config)?;
        let ctl_subnet = subnets[0].id.clone();
        let controller_host = sim
            .run_instance(RunInstance::new(NODE_TYPE, &ctl_subnet))
            .context("launching the controller host")?;
        let mut lab = Lab {
            id,
            sim: sim.clone(),
            vpc,
            subnets,
            fabric: None,
            api: underlay_apisim::ApiSim::new(),
            controllers: Vec::new(),
            controller_starts: Vec::new(),
            controller_events: tokio::sync::broadcast::channel(4096).0,
            controller_host,
            nodes: Vec::new(),
            pods: Vec::new(),
            build_steps: Vec::new(),
            config,
        };
        match lab.build(started) {
            Ok(()) => Ok(lab),
            Err(e) => {
                progress(format!("lab up failed: {e:#}; removing what was built"));
                if let Err(t) = lab.teardown() {
                    progress(format!("teardown: {t:#}"));
                }
                Err(e)
            }
        }
    }

    fn step(&mut self, name: &str, since: Instant) {
        self.build_steps.push((name.to_string(), since.elapsed()));
    }

    fn build(&mut self, started: Instant) -> anyhow::Result<()> {
        let t = Instant::now();
        let fabric = Fabric::build(
            self.id.as_str(),
            &self.sim,
            FabricOptions { internet: true },
        )?;
        self.fabric = Some(FabricFollower::start(fabric));
        self.wait_fabric()?;
        self.step("fabric", t);
        progress(format!(
            "fabric {} and internet {} up",
            self.id.fabric_netns(),
            self.id.internet_netns()
        ));

        let t = Instant::now();
        for r in 0..self.config.controller_replicas {
            self.start_controller(r)?;
        }
        let mut passes = self.controller_events.subscribe();
        self.step("controller", t);

        let t = Instant::now();
        let n = self.config.nodes;
        let mut created = Vec::with_capacity(n);
        for i in 0..n {
            let subnet = i % self.subnets.len();
            let inst = self
                .sim
                .run_instance(RunInstance::new(
                    &self.config.instance_type,
                    &self.subnets[subnet].id,
                ))
                .with_context(|| format!("launching node {i}"))?;
            let name = node_name(inst.private_ip);
            created.push((name, inst, subnet));
        }
        self.wait_fabric()?;
        for (name, inst, subnet) in created {
            let netns = self.id.instance_netns(&inst.id);
            let dir = self.config.state_dir.join(&name);
            let node = LabNode {
                name: name.clone(),
                instance: inst,
                subnet,
                netns,
                agent: None,
                dir,
                ready_after: None,
            };
            self.nodes.push(node);
        }
        let appeared = Instant::now();
        for i in 0..self.nodes.len() {
            self.api
                .insert(&kube_node(&self.nodes[i], &self.config.instance_type));
            self.start_agent(i)?;
        }
        progress(format!(
            "{} nodes launched, agents started; waiting for the controller to untaint them",
            self.nodes.len()
        ));
        self.wait_untainted(appeared, Duration::from_secs(60 + 2 * n as u64))?;
        self.step("nodes ready", t);
        match self.config.mode {
            underlay_api::Mode::Routed => {
                let t = Instant::now();
                self.wait_routed(Duration::from_secs(60 + n as u64))?;
                self.step("routes", t);
                // Passes are capped (the rate-aware queue paces the rest): the tables are complete once a pass
                // applies the whole remaining diff without error.
                let t = Instant::now();
                self.wait_converged(&mut passes, Duration::from_secs(120 + 2 * n as u64))?;
                self.step("route tables complete", t);
            }
            underlay_api::Mode::Eni => {
                let t = Instant::now();
                self.wait_pools(Duration::from_secs(60 + 2 * n as u64))?;
                self.step("pools", t);
            }
        }

        let t = Instant::now();
        self.wait_fabric()?;
        self.add_pods()?;
        self.step("pods", t);
        self.step("total", started);
        Ok(())
    }

    /// Waits until the fabric has applied every change the sim has made.
    pub fn wait_fabric(&self) -> anyhow::Result<()> {
        let target = self.sim.snapshot().seq;
        let f = self.fabric.as_ref().context("no fabric")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while f.seq.load(Ordering::Acquire) < target {
            if f.thread.is_finished() {
                bail!("the fabric follower stopped");
            }
            if Instant::now() > deadline {
                bail!("the fabric did not catch up with the VPC within 30 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    pub fn id(&self) -> &LabId {
        &self.id
    }

    pub fn api(&self) -> &underlay_apisim::ApiSim {
        &self.api
    }

    pub fn subscribe_controller(
        &self,
    ) -> tokio::sync::broadcast::Receiver<underlay_controller::ControllerEvent> {
        self.controller_events.subscribe()
    }

    /// Starts (or restarts) controller replica `r` on a runtime of its own; it campaigns for the leader Lease.
    pub fn start_controller(&mut self, r: usize) -> anyhow::Result<()> {
        if self.controllers.len() <= r {
            self.controllers.resize_with(r + 1, || None);
            self.controller_starts.resize(r + 1, 0);
        }
        if self.controllers[r].is_some() {
            bail!("controller replica {r} is running");
        }
        self.controller_starts[r] += 1;
        let rt = component_runtime(&format!("lab-ctl-{r}"))?;
        let (leading_tx, leading) = watch::channel(false);
        let opts = underlay_controller::lease::KubeOptions {
            // A restarted replica is a new pod: a new identity.
            identity: format!(
                "lab-{}-controller-{r}-{}",
                self.id.as_str(),
                self.controller_starts[r]
            ),
            lease_duration: self.config.lease_duration,
            renew_every: self.config.lease_renew,
            leading: Some(leading_tx),
            ..Default::default()
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        // kube::Client spawns its buffer task: it must be made inside the runtime.
        let client = {
            let _rt = rt.enter();
            self.api.client()
        };
        let task = if self.config.mode == underlay_api::Mode::Eni {
            self.spawn_eni_controller(&rt, client, opts, stop_rx)
        } else {
            self.spawn_routed_controller(&rt, client, opts, stop_rx)
        };
        self.controllers[r] = Some(ControllerReplica {
            stop: stop_tx,
            task,
            rt,
            leading,
        });
        Ok(())
    }

    fn spawn_routed_controller(
        &self,
        rt: &tokio::runtime::Runtime,
        client: kube::Client,
        opts: underlay_controller::lease::KubeOptions,
        stop_rx: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let mut routed = underlay_controller::RoutedConfig::new(self.vpc.clone(), POD_CIDR);
        routed.block_prefix_len = self.config.block_prefix_len;
        routed.route_limit = self.config.route_limit as u32;
        routed.max_ops_per_pass = Some(underlay_controller::routes::DEFAULT_QUEUED_OPS_PER_PASS);
        let mut config = underlay_controller::ControllerConfig::new(routed);
        config.probe.interval = self.config.probe_interval;
        config.health.hold_down = self.config.hold_down;
        // Every EC2 call the controller makes, describes included, waits in the one rate-aware queue (vpcsim
        // enforces AWS's token buckets: a call around the queue would be throttled as in AWS).
        let queue = {
            let _rt = rt.enter();
            RateLimitedCloud::new(self.sim.clone(), QueueConfig::default())
        };
        let cloud: Arc<dyn Cloud> = Arc::new(queue.clone());
        let lanes: Arc<dyn underlay_controller::CloudLanes> =
            Arc::new(underlay_controller::TwoLanes::over_queue(queue));
        // The controller's prober as in a cluster (one UDP socket, one datagram per forwarder and round), its
        // socket opened in the controller host's namespace: probes cross the fabric as they would the VPC.
        let prober: Arc<dyn underlay_controller::probe::Prober> = {
            let _rt = rt.enter();
            Arc::new(echo::netns_udp_prober(
                self.id.instance_netns(&self.controller_host.id),
                config.probe.timeout.min(config.probe.interval),
            ))
        };
        let events = self.controller_events.clone();
        rt.spawn(async move {
            if let Err(e) = underlay_controller::routed::run_routed_on_kube(
                client,
                cloud,
                lanes,
                config,
                Some(prober),
                opts,
                stop_rx,
                Some(events),
            )
            .await
            {
                tracing::error!(error = %format!("{e:#}"), "lab controller stopped");
            }
        })
    }

    /// Eni mode: the real eni controller (ENIs created, attached and filled through the rate-aware queue, the
    /// UnderlayNodes' `status.pool.enis`, the Nodes' taints), leader-elected on the API stand-in.
    fn spawn_eni_controller(
        &self,
        rt: &tokio::runtime::Runtime,
        client: kube::Client,
        opts: underlay_controller::lease::KubeOptions,
        stop_rx: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let settings = underlay_controller::EniSettings {
            release_delay: self.config.release_delay,
            ..underlay_controller::EniSettings::new(format!("lab-{}", self.id.as_str()))
        };
        let queue = {
            let _rt = rt.enter();
            RateLimitedCloud::new(self.sim.clone(), QueueConfig::default())
        };
        let cloud: Arc<dyn Cloud> = Arc::new(queue);
        rt.spawn(async move {
            if let Err(e) = underlay_controller::eni::kube::run_eni_on_kube(
                client,
                cloud,
                settings,
                Duration::from_secs(1),
                opts,
                stop_rx,
            )
            .await
            {
                tracing::error!(error = %format!("{e:#}"), "lab eni controller stopped");
            }
        })
    }

    /// The replica leading now, if any.
    pub fn leader(&self) -> Option<usize> {
        self.controllers
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| *c.leading.borrow()))
    }

    /// Replicas running (killed or stopped ones excluded).
    pub fn controllers_running(&self) -> usize {
        self.controllers.iter().flatten().count()
    }

    /// Kills controller replica `r` as `kill -9` would: its runtime goes with every task on it, nothing is
    /// released (the Lease stays held until it expires).
    pub fn kill_controller(&mut self, r: usize) {
        if let Some(c) = self.controllers.get_mut(r).and_then(Option::take) {
            c.rt.shutdown_background();
        }
    }

    /// Stops replica `r` gracefully (it releases the Lease if it holds it).
    fn stop_controller(&mut self, r: usize) {
        if let Some(c) = self.controllers.get_mut(r).and_then(Option::take) {
            let _ = c.stop.send(true);
            let task = c.task;
            let _ =
                c.rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await });
            c.rt.shutdown_timeout(Duration::from_secs(1));
        }
    }

    /// Starts (or restarts) node `i`'s agent in its namespace.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        std::fs::create_dir_all(&node.dir)?;
        let config = underlay_agent::AgentConfig {
            socket: node.dir.join("agent.sock"),
            checkpoint: node.dir.join("ipam.json"),
            cni_conf_dir: node.dir.join("net.d"),
            cni_bin_dir: node.dir.join("bin"),
            mtu: LAB_MTU,
            plugin_source: None,
            // DEL deletes the pod's veth itself: the agent runs outside the node namespace.
            reap_links: false,
            cooldown_secs: LAB_COOLDOWN.as_secs(),
            ..Default::default()
        };
        let netns = PathBuf::from(format!("/var/run/netns/{}", node.netns));
        let health_addr =
            SocketAddr::new(node.instance.private_ip.into(), names::AGENT_HEALTH_PORT);
        // Spread over a second: agents started together would otherwise all converge (and spawn nft) on the
        // same tick, every tick, on one machine — a node in a cluster has its agent to itself.
        let converge_interval = Duration::from_millis(5000 + (i as u64 % 20) * 50);
        let status_interval = Duration::from_millis(200);
        let (stop, mut rx) = watch::channel(false);
        let rt = component_runtime(&format!("lab-agent-{i}"))?;
        let client = {
            let _rt = rt.enter();
            self.api.client()
        };
        let name = node.name.clone();
        let mode = self.config.mode;
        let fast_path = self.config.fast_path;
        let task = rt.spawn(async move {
            let shutdown = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            let r = match mode {
                underlay_api::Mode::Routed => {
                    let opts = underlay_agent::routed::kube::KubeAgentOptions {
                        node_name: name.clone(),
                        pod_cidr: POD_CIDR,
                        vpc_cidrs: vec![VPC_CIDR],
                        mtu: LAB_MTU,
                        netns: Some(netns),
                        health_addr,
                        converge_interval,
                        status_interval,
                        metrics: underlay_agent::AgentMetrics::new(),
                        // The API stand-in serves no Pods yet: no pod of the lab opts in to IMDS.
                        imds_opt_ins: false,
                        network_policy: true,
                        fast_path,
                    };
                    underlay_agent::routed::kube::run_routed_on_kube(
                        config,
                        client,
                        opts,
                        underlay_agent::Fault::None,
                        shutdown,
                    )
                    .await
                }
                underlay_api::Mode::Eni => {
                    let mut opts = underlay_agent::eni::kube::EniKubeOptions::new(
                        name.clone(),
                        vec![VPC_CIDR],
                    );
                    opts.mtu = LAB_MTU;
                    opts.imds_opt_ins = false;
                    opts.netns = Some(netns);
                    opts.health_addr = health_addr;
                    opts.converge_interval = converge_interval;
                    opts.status_interval = status_interval;
                    opts.fast_path = fast_path;
                    underlay_agent::eni::kube::run_eni_on_kube(
                        config,
                        client,
                        opts,
                        underlay_agent::Fault::None,
                        shutdown,
                    )
                    .await
                }
            };
            if let Err(e) = r {
                tracing::error!(node = %name, error = %e, "lab agent stopped");
            }
        });
        self.nodes[i].agent = Some(AgentHandle { stop, task, rt });
        Ok(())
    }

    /// Stops node `i`'s agent and waits for it to finish.
    pub fn stop_agent(&mut self, i: usize) {
        if let Some(a) = self.nodes[i].agent.take() {
            let _ = a.stop.send(true);
            let task = a.task;
            let _ =
                a.rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await });
            a.rt.shutdown_timeout(Duration::from_secs(1));
        }
    }

    /// Kills node `i`'s agent as `kill -9` would: its runtime goes with every task it spawned (IPAM server,
    /// watches, health endpoint); nothing is cleaned up. Its socket file, checkpoint and kernel state stay.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(a) = self.nodes[i].agent.take() {
            a.rt.shutdown_background();
        }
    }

    /// Whether node `i`'s agent is running.
    pub fn agent_running(&self, i: usize) -> bool {
        self.nodes[i].agent.is_some()
    }

    fn wait_untainted(&mut self, since: Instant, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last_report = Instant::now();
        loop {
            let mut pending = 0;
            for n in &mut self.nodes {
                if n.ready_after.is_some() {
                    continue;
                }
                let node: Option<Node> = self.api.get(None, &n.name);
                let tainted = node.as_ref().is_none_or(|node| {
                    node.spec
                        .as_ref()
                        .and_then(|s| s.taints.as_ref())
                        .is_some_and(|t| t.iter().any(|t| t.key == names::TAINT_NOT_READY))
                        // A node the controller has not looked at yet carries no taint and no pod CIDR (routed)
                        // or no max-pods annotation (eni).
                        || match self.config.mode {
                            underlay_api::Mode::Routed => {
                                node.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()).is_none()
                            }
                            underlay_api::Mode::Eni => !node
                                .metadata
                                .annotations
                                .as_ref()
                                .is_some_and(|a| a.contains_key(names::MAX_PODS_ANNOTATION)),
                        }
                });
                if tainted {
                    pending += 1;
                } else {
                    n.ready_after = Some(since.elapsed());
                }
            }
            if pending == 0 {
                progress(format!(
                    "all {} nodes ready (untainted) after {:.1} s",
                    self.nodes.len(),
                    since.elapsed().as_secs_f64()
                ));
                return Ok(());
            }
            if Instant::now() > deadline {
                let names: Vec<&str> = self
                    .nodes
                    .iter()
                    .filter(|n| n.ready_after.is_none())
                    .map(|n| n.name.as_str())
                    .take(5)
                    .collect();
                bail!(
                    "{pending} node(s) still tainted {} after {:?}: {}",
                    names::TAINT_NOT_READY,
                    timeout,
                    names.join(", ")
                );
            }
            if last_report.elapsed() > Duration::from_secs(3) {
                progress(format!(
                    "{} of {} nodes ready",
                    self.nodes.len() - pending,
                    self.nodes.len()
                ));
                last_report = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every node's block (as its UnderlayNode records it) covered, in every subnet's route table, by a route to
    /// the primary ENI of a node of the block's subnet.
    pub fn unrouted_blocks(&self) -> Vec<String> {
        let snap = self.sim.snapshot();
        let mut missing = Vec::new();
        for n in &self.nodes {
            let rec: Option<underlay_api::UnderlayNode> = self.api.get(None, &n.name);
            let Some(block) = rec
                .and_then(|r| r.status)
                .and_then(|s| s.pool)
                .and_then(|p| p.block)
                .and_then(|b| b.parse::<Ipv4Net>().ok())
            else {
                missing.push(format!("{} (no block)", n.name));
                continue;
            };
            let subnet_enis: Vec<_> = self
                .nodes
                .iter()
                .filter(|m| m.subnet == n.subnet)
                .filter_map(|m| m.instance.primary_eni().map(|e| e.id.clone()))
                .collect();
            for s in &self.subnets {
                let target = route_to(&snap, &s.table, block);
                match target {
                    Some(underlay_cloud::RouteTarget::NetworkInterface(e))
                        if subnet_enis.contains(&e) => {}
                    _ => missing.push(format!("{} {block} in {}", n.name, s.table)),
                }
            }
        }
        missing
    }

    /// Eni mode: waits until every node's record lists a non-empty pool (the controller grows pools with use,
    /// by its warm targets: pods beyond the first addresses wait for it in [`Lab::add_pod`]).
    fn wait_pools(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let want = 1;
        loop {
            let short: Vec<String> = self
                .nodes
                .iter()
                .filter_map(|n| {
                    let size = self
                        .api
                        .get::<underlay_api::UnderlayNode>(None, &n.name)
                        .and_then(|r| r.status)
                        .map(|s| s.pool_size)
                        .unwrap_or(0);
                    (size < want).then(|| format!("{} ({size})", n.name))
                })
                .collect();
            if short.is_empty() {
                self.wait_fabric()?;
                progress("every node has ENI addresses in its pool");
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} node pool(s) below {want} addresses after {timeout:?}: {}",
                    short.len(),
                    short.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_routed(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = self.unrouted_blocks();
            if missing.is_empty() {
                self.wait_fabric()?;
                progress(format!(
                    "every node block routed in all {} route tables",
                    self.subnets.len()
                ));
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} block route(s) missing after {timeout:?}: {}",
                    missing.len(),
                    missing
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_converged(
        &self,
        passes: &mut tokio::sync::broadcast::Receiver<underlay_controller::ControllerEvent>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        use tokio::sync::broadcast::error::TryRecvError;
        let deadline = Instant::now() + timeout;
        let mut last_report = Instant::now();
        loop {
            match passes.try_recv() {
                Ok(underlay_controller::ControllerEvent::Pass(p))
                    if p.routes.converged() && p.routes.deferred.is_empty() =>
                {
                    self.wait_fabric()?;
                    progress(format!(
                        "route tables complete: {:?} routes per table",
                        self.routes_per_table().values().collect::<Vec<_>>()
                    ));
                    return Ok(());
                }
                Ok(_) | Err(TryRecvError::Lagged(_)) => continue,
                Err(TryRecvError::Closed) => bail!("the controller stopped"),
                Err(TryRecvError::Empty) => {}
            }
            if Instant::now() > deadline {
                bail!("the controller did not complete the route tables within {timeout:?}");
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                progress(format!(
                    "filling route tables: {:?} routes per table",
                    self.routes_per_table().values().collect::<Vec<_>>()
                ));
                last_report = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn add_pods(&mut self) -> anyhow::Result<()> {
        let total = self.nodes.len() * self.config.pods_per_node;
        let mut last = Instant::now();
        for n in 0..self.nodes.len() {
            for k in 0..self.config.pods_per_node {
                let pod = self.add_pod(n, k)?;
                self.pods.push(pod);
                if last.elapsed() > Duration::from_secs(3) {
                    progress(format!("{} of {total} pods wired", self.pods.len()));
                    last = Instant::now();
                }
            }
        }
        progress(format!("{total} pods wired by underlay-cni"));
        Ok(())
    }

    fn add_pod(&self, n: usize, k: usize) -> anyhow::Result<LabPod> {
        let name = format!("pod-{n}-{k}");
        let netns = format!("{}p{n}x{k}", self.id.netns_prefix());
        let container_id = format!("{:0>12x}{:0>4x}{:0>4x}", self.config.seed, n, k);
        let ip = self.wire_pod(n, &name, &netns, &container_id, None)?;
        Ok(LabPod {
            name,
            netns,
            node: n,
            ip,
            container_id,
        })
    }

    /// Creates the pod namespace `netns` and wires it on node `n` with `underlay-cni` ADD, as kubelet would: with
    /// `K8S_POD_NAMESPACE`/`K8S_POD_NAME` in `CNI_ARGS` when the pod has a Kubernetes identity. Returns its address.
    pub(crate) fn wire_pod(
        &self,
        n: usize,
        name: &str,
        netns: &str,
        container_id: &str,
        identity: Option<(&str, &str)>,
    ) -> anyhow::Result<Ipv4Addr> {
        let node = &self.nodes[n];
        // A caller may have made the namespace already (to have a process in it before the sandbox is wired).
        if !std::path::Path::new("/var/run/netns").join(netns).exists() {
            kernel::netns_add(netns)?;
        }
        let args = identity.map(|(ns, pod)| {
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container_id}"
            )
        });
        // Eni mode: a full pool is "try again later" (the controller assigns more addresses as poolUsed grows, as
        // kubelet retries a pod's sandbox); so is CNI error 11 in either mode (the agent does not know the pod's
        // network policy yet: its watch has not delivered the Pod). Bounded.
        let deadline = Instant::now() + Duration::from_secs(60);
        let reply = loop {
            let r = cni(
                &self.config.cni_plugin,
                &node.netns,
                &node.dir.join("net.d").join(names::CNI_CONFLIST),
                "ADD",
                container_id,
                netns,
                args.as_deref(),
            );
            match r {
                Err(e)
                    if Instant::now() < deadline
                        && (self.config.mode == underlay_api::Mode::Eni
                            && e.to_string().contains("exhausted")
                            || is_try_again_later(&e)) =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                r => break r.with_context(|| format!("wiring {name} on {}", node.name))?,
            }
        };
        reply["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no address in the CNI result: {reply}"))
    }

    /// Counts of VPC routes inside the pod CIDR per managed table, and their limit.
    pub fn routes_per_table(&self) -> BTreeMap<String, usize> {
        let snap = self.sim.snapshot();
        snap.route_tables
            .iter()
            .filter(|t| self.subnets.iter().any(|s| s.table == t.id))
            .map(|t| {
                let n = t
                    .routes
                    .iter()
                    .filter(|r| r.target != underlay_cloud::RouteTarget::Local)
                    .count();
                (t.id.to_string(), n)
            })
            .collect()
    }

    /// EC2 calls seen by the VPC, by operation.
    pub fn api_calls(&self) -> BTreeMap<String, u64> {
        self.sim
            .counters()
            .calls
            .iter()
            .map(|(op, n)| (op.to_string(), *n))
            .collect()
    }

    /// Removes everything: agents, controller, pods, instances, fabric, state directory.
    pub fn down(mut self) -> anyhow::Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.stop_agent(i);
        }
        for r in 0..self.controllers.len() {
            self.stop_controller(r);
        }
        let mut errors = Vec::new();
        if let Some(f) = self.fabric.take() {
            match f.stop() {
                Ok(fabric) => {
                    if let Err(e) = fabric.down() {
                        errors.push(format!("{e}"));
                    }
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        if let Err(e) = crate::teardown_lab(&self.id) {
            errors.push(format!("{e}"));
        }
        let _ = std::fs::remove_dir_all(&self.config.state_dir);
        self.pods.clear();
        self.nodes.clear();
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("lab teardown: {}", errors.join("; "))
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if (self.fabric.is_some() || !self.nodes.is_empty())
            && let Err(e) = self.teardown()
        {
            eprintln!("lab teardown on drop: {e:#}");
        }
    }
}

impl FabricFollower {
    fn start(mut fabric: Fabric) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seq = Arc::new(AtomicU64::new(0));
        let (s, q) = (stop.clone(), seq.clone());
        let thread = std::thread::Builder::new()
            .name("lab-fabric".into())
            .spawn(move || {
                let r = fabric.follow(&q, Duration::from_millis(2), &|| s.load(Ordering::Relaxed));
                if let Err(e) = &r {
                    tracing::error!(error = %e, "fabric follower stopped");
                }
                (fabric, r)
            })
            .expect("spawning the fabric thread");
        Self { stop, seq, thread }
    }

    fn stop(self) -> anyhow::Result<Fabric> {
        self.stop.store(true, Ordering::Relaxed);
        let (fabric, r) = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("fabric thread panicked"))?;
        if let Err(e) = r {
            progress(format!("fabric follower had stopped: {e}"));
        }
        Ok(fabric)
    }
}

/// The VPC, one subnet (/24) per zone × subnets-per-zone with a route table each, an IGW and a default route to it.
fn build_vpc(sim: &VpcSim, config: &LabConfig) -> anyhow::Result<(VpcId, Vec<LabSubnet>)> {
    let vpc = sim.create_vpc(VPC_CIDR, Default::default())?;
    let igw = sim.create_internet_gateway(&vpc)?;
    let mut subnets = Vec::new();
    for (z, zone) in ZONES.iter().enumerate().take(config.zones) {
        for s in 0..config.subnets_per_zone {
            let k = (z * config.subnets_per_zone + s) as u8;
            let cidr = crate::plan::ipnet_v4(198, 18, k, 0, 24);
            let id = sim.create_subnet(&vpc, zone, cidr)?;
            let table = sim.create_route_table(&vpc, Default::default())?;
            sim.associate_route_table(&table, &id)?;
            sim.add_route(
                &table,
                "0.0.0.0/0".parse().expect("literal"),
                &underlay_cloud::RouteTarget::Gateway(igw.clone()),
            )?;
            subnets.push(LabSubnet {
                id,
                zone: zone.to_string(),
                cidr,
                table,
            });
        }
    }
    Ok((vpc, subnets))
}

/// Target of the route `dst` takes in `table` (longest prefix match), from a snapshot.
pub(crate) fn route_to(
    snap: &underlay_vpcsim::Snapshot,
    table: &RouteTableId,
    dst: Ipv4Net,
) -> Option<underlay_cloud::RouteTarget> {
    snap.route_tables
        .iter()
        .find(|t| &t.id == table)
        .and_then(|t| t.longest_match(dst))
        .map(|r| r.target.clone())
}

/// Kubernetes node name of an instance, as EKS names them.
pub fn node_name(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("ip-{}-{}-{}-{}", o[0], o[1], o[2], o[3])
}

/// The Node object kubelet would register for a lab node.
fn kube_node(n: &LabNode, instance_type: &str) -> Node {
    let mut node = Node::default();
    node.metadata.name = Some(n.name.clone());
    node.metadata.labels = Some(
        [
            (
                "topology.kubernetes.io/zone".to_string(),
                n.instance.zone.clone(),
            ),
            (
                "node.kubernetes.io/instance-type".to_string(),
                instance_type.to_string(),
            ),
        ]
        .into(),
    );
    node.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
        provider_id: Some(format!("aws:///{}/{}", n.instance.zone, n.instance.id)),
        ..Default::default()
    });
    node
}

/// Runs the CNI plugin in `node_ns` for `command` on the pod namespace `pod_ns`; returns its JSON result.
fn cni(
    plugin: &std::path::Path,
    node_ns: &str,
    conflist: &std::path::Path,
    command: &str,
    container_id: &str,
    pod_ns: &str,
    cni_args: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    use std::io::Write;
    let list: serde_json::Value = serde_json::from_slice(
        &std::fs::read(conflist).with_context(|| format!("reading {}", conflist.display()))?,
    )?;
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    let mut nsenter = std::process::Command::new("nsenter");
    if let Some(a) = cni_args {
        nsenter.env("CNI_ARGS", a);
    }
    let mut child = nsenter
        .arg(format!("--net=/var/run/netns/{node_ns}"))
        .arg(plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", format!("/var/run/netns/{pod_ns}"))
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_PATH",
            plugin.parent().unwrap_or(std::path::Path::new("/")),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running the CNI plugin")?;
    child
        .stdin
        .take()
        .context("plugin stdin")?
        .write_all(&serde_json::to_vec(&conf)?)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "underlay-cni {command} failed: {} {}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if out.stdout.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Whether a failed plugin call answered CNI error 11, "try again later" (the runtime retries the sandbox). The
/// plugin prints its error as one JSON object on stdout.
fn is_try_again_later(e: &anyhow::Error) -> bool {
    const TRY_AGAIN_LATER: u32 = 11;
    let text = e.to_string();
    let Some(start) = text.find('{') else {
        return false;
    };
    let mut de =
        serde_json::Deserializer::from_str(&text[start..]).into_iter::<serde_json::Value>();
    matches!(de.next(), Some(Ok(v)) if v["code"] == TRY_AGAIN_LATER)
}
