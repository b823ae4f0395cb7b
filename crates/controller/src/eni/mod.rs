//! `eni` mode: the reconciler that gives each node ENIs and addresses, keeps its pool between the warm targets,
//! and collects leaked ENIs. Everything it knows comes from EC2 describes at the start of each pass (and from the
//! node set it is given): a restarted controller carries on where the last one stopped.
//!
//! ```text
//!   pass(nodes) ─► DescribeInstances(ids) + DescribeNetworkInterfaces(tag cluster) ─► per node: EniView[]
//!        │
//!        ├─► core::eni_pool::plan_pool per node ─► sort by deficit, largest first
//!        │     (a node whose type cannot have the mode's addresses, prefixes on non-Nitro, is refused: no call;
//!        │      growth into a subnet EC2 found out of addresses waits 5 s, doubling to 5 min, then one node tries)
//!        │
//!        ├─► apply every node's ops concurrently, in that order, through the given Cloud (the rate-aware queue);
//!        │     CreateEni = CreateNetworkInterface(client token, tags) + Attach(DeleteOnTermination);
//!        │     then DeleteOnTermination set again on any pod ENI attached without it (a failed modify);
//!        │     an ENI emptied by releases is detached, and deleted by the next pass;
//!        │     each node's NodeReport handed over as its ops finish (`pass_with`), before the pass ends
//!        │
//!        └─► GC: `available` ENIs tagged with the cluster whose node is gone, once seen for `gc_grace`
//! ```
//!
//! Releases are two-phase (see `core::eni_pool`): a pass first *withdraws* free addresses — it writes them to the
//! node's pool status as releasing, bumping `pool.releaseGeneration` — and a later pass unassigns those the agent
//! no longer holds once the agent reports serving that generation. The withdrawn set lives in the UnderlayNode
//! status, not in memory, so a restarted controller neither forgets nor repeats a withdrawal.
//!
//! Crash safety: the client token of a create is `cluster · instance · device index · generation`, so a
//! controller that dies after CreateNetworkInterface and re-issues it gets the same ENI back; an ENI created but
//! never attached carries the node's tag and is attached (or deleted) by the next pass's plan. The generation
//! only moves when a token's ENI turns out to be gone or taken, so the next create makes a fresh one.

pub mod kube;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use ipnet::Ipv4Net;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;
use underlay_api::{Pool, PoolEni, UnderlayNodeStatus};
use underlay_cloud::{
    AddressRequest, Attachment, AttachmentId, Bucket, BucketOutlook, Cloud, CloudError,
    CreateEniRequest, EniFilter, EniId, EniStatus, Instance, InstanceId, NetworkInterface,
    Operation, SecurityGroupId, SubnetId, Tags, choose_paths,
};
use underlay_core::eni_pool::{
    AddressMode, EniView, PoolInput, PoolLimits, PoolOp, PoolPlan, Releasing, Targets, Used,
    first_growth_by_create, max_pods, plan_pool,
};
use underlay_core::instance_types;
use underlay_core::names::{TAG_CLUSTER, TAG_NODE};

use crate::describe::describe_instances;

/// Default delay before excess addresses are released (amazon-vpc-cni's pool-decrease interval).
pub const DEFAULT_RELEASE_DELAY: Duration = Duration::from_secs(30);
/// Default time an `available` ENI of a gone node is left alone before it is deleted: longer than a create and
/// an attach take, so an ENI between the two is never collected.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(120);
/// Default first wait before growing into a subnet again after EC2 found it out of addresses
/// (`InsufficientFreeAddressesInSubnet`, `InsufficientCidrBlocks`); it doubles while the subnet stays full.
pub const DEFAULT_SUBNET_BACKOFF: Duration = Duration::from_secs(5);
/// Default cap of that wait.
pub const DEFAULT_SUBNET_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// EC2's answer to a CreateNetworkInterface past the account's network-interface quota (5,000 per Region by
/// default, enforced per zone).
pub const ENI_QUOTA_CODE: &str = "NetworkInterfaceLimitExceeded";

/// The `eni`-mode knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct EniSettings {
    /// Value of the `underlay.dev/cluster` tag on every ENI this controller creates (and the only ENIs it
    /// deletes).
    pub cluster_name: String,
    pub mode: AddressMode,
    pub targets: Targets,
    /// Zone → subnet for pod ENIs (custom networking: the primary ENI then carries no pods). A zone not listed
    /// uses the node's own subnet, primary ENI included.
    pub subnets: BTreeMap<String, SubnetId>,
    /// Security groups of pod ENIs; empty: the primary ENI's.
    pub security_groups: Vec<SecurityGroupId>,
    pub release_delay: Duration,
    pub gc_grace: Duration,
    /// After a subnet answers that it is out of addresses, no node grows into it for this long; the wait
    /// doubles with each further refusal up to `subnet_backoff_max` and ends with the first success.
    pub subnet_backoff: Duration,
    pub subnet_backoff_max: Duration,
    /// Give a joining node its first addresses through CreateNetworkInterface with them (then attach) instead of
    /// AssignPrivateIpAddresses on its primary ENI, node by node, whichever way's EC2 buckets would serve it
    /// sooner (the queue's [`Cloud::bucket_outlook`]). Only where the node's pods may use its primary ENI and
    /// the addresses fit one ENI of its type.
    pub spread_first_growth: bool,
}

impl EniSettings {
    pub fn new(cluster_name: impl Into<String>) -> Self {
        Self {
            cluster_name: cluster_name.into(),
            mode: AddressMode::SecondaryIps,
            targets: Targets::default(),
            subnets: BTreeMap::new(),
            security_groups: Vec::new(),
            release_delay: DEFAULT_RELEASE_DELAY,
            gc_grace: DEFAULT_GC_GRACE,
            subnet_backoff: DEFAULT_SUBNET_BACKOFF,
            subnet_backoff_max: DEFAULT_SUBNET_BACKOFF_MAX,
            spread_first_growth: true,
        }
    }
}

/// One node as the reconciler is given it.
#[derive(Debug, Clone, PartialEq)]
pub struct EniNode {
    /// Kubernetes node name.
    pub name: String,
    pub instance: InstanceId,
    /// What its agent reports as used.
    pub used: Used,
    /// What the node's pool status lists as withdrawn, and whether `used` was reported while the agent served
    /// `release_generation`.
    pub releasing: Releasing,
    /// The pool status's `releaseGeneration`.
    pub release_generation: u64,
    /// Of the used addresses, those cooling down after a pod (withdrawable, not yet unassignable).
    pub cooling: BTreeSet<Ipv4Addr>,
}

impl EniNode {
    /// A node with nothing withdrawn.
    pub fn new(name: impl Into<String>, instance: InstanceId, used: Used) -> Self {
        Self {
            name: name.into(),
            instance,
            used,
            releasing: Releasing::default(),
            release_generation: 0,
            cooling: BTreeSet::new(),
        }
    }

    /// Usage and withdrawals as an UnderlayNode status states them: the held addresses when the agent reports
    /// them (else only the count, which releases nothing), the pool's releasing lists and generation.
    /// Unparsable entries are left out (a held address so lost could be withdrawn: the allocator still refuses
    /// it to new pods, and it is unassigned only once no longer held).
    pub fn from_status(
        name: impl Into<String>,
        instance: InstanceId,
        status: Option<&UnderlayNodeStatus>,
    ) -> Self {
        let mut node = Self::new(name, instance, Used::Count(0));
        let Some(s) = status else {
            return node;
        };
        node.used = match &s.pool_held {
            Some(held) => {
                let parsed: Option<BTreeSet<Ipv4Addr>> =
                    held.iter().map(|a| a.parse().ok()).collect();
                match parsed {
                    Some(set) => Used::Known(set),
                    None => Used::Count(s.pool_used.max(held.len() as u32)),
                }
            }
            None => Used::Count(s.pool_used),
        };
        node.cooling = s
            .pool_cooling
            .iter()
            .flatten()
            .filter_map(|a| a.parse().ok())
            .collect();
        if let Some(pool) = &s.pool {
            node.release_generation = pool.release_generation;
            for e in &pool.enis {
                node.releasing.addresses.extend(
                    e.releasing_addresses
                        .iter()
                        .filter_map(|a| a.parse::<Ipv4Addr>().ok()),
                );
                node.releasing.prefixes.extend(
                    e.releasing_prefixes
                        .iter()
                        .filter_map(|p| p.parse::<Ipv4Net>().ok()),
                );
            }
            node.releasing.acknowledged =
                s.observed_release_generation == Some(pool.release_generation);
        }
        node
    }
}

/// What one pass did for one node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    pub name: String,
    pub instance: InstanceId,
    /// The plan the pass applied (want/have before the pass).
    pub plan: PoolPlan,
    /// Every op succeeded (or there were none), and none was held back.
    pub applied: bool,
    /// The first failed op's error, or why the node's ops were not tried (e.g. prefix mode on a non-Nitro
    /// instance type: refused up front, no EC2 call for the node).
    pub error: Option<String>,
    /// The pool after the pass, in the UnderlayNode status's terms.
    #[serde(skip)]
    pub pool: Pool,
    pub pool_size: u32,
    pub max_pods: u32,
    /// When the node's ops finished, on the reconciler's clock (time since it was created).
    pub finished_at: Duration,
    /// Where the instance sits (for the UnderlayNode spec).
    pub zone: String,
    pub subnet: SubnetId,
    pub node_ip: Ipv4Addr,
    pub primary_eni: Option<String>,
    /// Pod ENIs found attached without DeleteOnTermination (its ModifyNetworkInterfaceAttribute after the attach
    /// had failed), set again this pass.
    pub repairs: Vec<EniId>,
    /// The zone's network-interface quota refused this node's ENI (`NetworkInterfaceLimitExceeded`), or the
    /// node's new ENI waits while that quota's backoff runs.
    pub eni_quota: Option<String>,
}

impl NodeReport {
    /// After the pass the pool is non-empty and holds at least what the targets ask for.
    pub fn ready(&self) -> bool {
        self.applied && self.pool_size > 0 && self.pool_size >= self.plan.want
    }

    /// The pool was within its targets before the pass, nothing needed doing or repairing, and nothing was
    /// refused.
    pub fn converged(&self) -> bool {
        self.plan.ops.is_empty()
            && self.plan.within_targets()
            && self.repairs.is_empty()
            && self.error.is_none()
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EniPassReport {
    pub nodes: Vec<NodeReport>,
    /// Nodes whose instance EC2 no longer describes (terminated).
    pub gone: Vec<String>,
    /// ENIs deleted by the leaked-ENI collector.
    pub collected: Vec<EniId>,
    /// `available` ENIs of the cluster no live node claims, still within the grace period.
    pub awaiting_collection: usize,
    pub errors: Vec<String>,
}

impl EniPassReport {
    /// Every live node converged and nothing was collected or failed.
    pub fn quiet(&self) -> bool {
        self.nodes.iter().all(NodeReport::converged)
            && self.collected.is_empty()
            && self.awaiting_collection == 0
            && self.errors.is_empty()
    }
}

/// One live node, planned.
struct Planned<'a> {
    node: &'a EniNode,
    instance: &'a Instance,
    observed: Vec<Observed>,
    plan: PoolPlan,
    use_primary: bool,
    max_pods: u32,
    /// Why none of the node's plan is applied (the address mode is impossible on its instance type).
    refused: Option<String>,
    /// The plan's ops this pass applies: all of them, or all but the growth into subnets backing off.
    ops: Vec<PoolOp>,
    /// Why some growth was held back (a subnet out of addresses).
    held: Option<String>,
    /// Pod ENIs attached without DeleteOnTermination: set it again.
    repairs: Vec<(EniId, AttachmentId)>,
    /// The same first growth through an ENI created with its addresses, where that can replace `ops`.
    by_create: Option<Vec<PoolOp>>,
    /// Why a new ENI of this node waits for its zone's network-interface quota.
    quota_held: Option<String>,
}

/// Pod ENIs of the node (ours: device index 0 is the instance's own) attached without DeleteOnTermination, as
/// when the ModifyNetworkInterfaceAttribute after an attach failed. Such an ENI would outlive its instance.
fn dot_repairs(observed: &[Observed]) -> Vec<(EniId, AttachmentId)> {
    observed
        .iter()
        .filter(|o| o.view.pods)
        .filter_map(|o| {
            let a = o.attachment.as_ref()?;
            (a.device_index != 0 && !a.delete_on_termination)
                .then(|| (EniId::new(o.view.id.as_str()), a.id.clone()))
        })
        .collect()
}

/// A subnet EC2 found out of addresses (or a zone at its ENI quota): nobody grows into it until `until`, then
/// one node tries.
#[derive(Debug, Clone, Default)]
struct SubnetBackoff {
    /// Refusals in a row, each after the previous wait ended.
    refusals: u32,
    /// On the reconciler's clock.
    until: Duration,
    /// The last refusal's AWS error code.
    code: String,
}

impl SubnetBackoff {
    /// Counts a refusal at `now`: start waiting `first`, or twice the last wait (at most `max`) when the wait just
    /// ended. A refusal while already waiting came from the same moment and counts once: `None`.
    fn refuse(
        &mut self,
        code: &str,
        now: Duration,
        first: Duration,
        max: Duration,
    ) -> Option<Duration> {
        self.code = code.to_owned();
        if self.refusals > 0 && now < self.until {
            return None;
        }
        self.refusals += 1;
        let wait = first
            .saturating_mul(1u32.checked_shl(self.refusals - 1).unwrap_or(u32::MAX))
            .min(max);
        self.until = now + wait;
        Some(wait)
    }
}

/// An ENI as the pass sees it: the planner's view plus what the status needs.
#[derive(Debug, Clone)]
struct Observed {
    view: EniView,
    mac: String,
    /// The ENI's own primary private IP (the pool status carries it for the agent).
    primary_ip: Ipv4Addr,
    subnet: SubnetId,
    /// Set when attached.
    attachment: Option<Attachment>,
}

#[derive(Debug, Default)]
struct Memory {
    /// When each node's pool was first seen above its targets.
    excess_since: BTreeMap<String, Duration>,
    /// Client-token generation per (instance, device index).
    generation: BTreeMap<(InstanceId, u32), u32>,
    /// When each `available` cluster ENI was first seen so.
    available_since: BTreeMap<EniId, Duration>,
    subnet_cidrs: BTreeMap<SubnetId, Ipv4Net>,
    /// Subnets EC2 last found out of addresses, and until when nothing grows into them.
    subnet_backoff: BTreeMap<SubnetId, SubnetBackoff>,
    /// Zones whose network-interface quota EC2 last refused a create, and until when no ENI is created there.
    zone_quota: BTreeMap<String, SubnetBackoff>,
    /// Limits of instance types the built-in table lacks, from DescribeInstanceTypes.
    described_types: BTreeMap<String, PoolLimits>,
}

/// The `eni`-mode reconciler. Holds no state EC2 does not also hold, except timers (release delay, GC grace)
/// that restart from zero with the process.
#[derive(Debug)]
pub struct EniReconciler {
    cloud: Arc<dyn Cloud>,
    settings: EniSettings,
    started: Instant,
    memory: Mutex<Memory>,
}

/// The `CreateNetworkInterface` client token of the ENI for `instance` at `device_index` (ASCII, ≤ 64
/// characters, as EC2 requires).
pub fn client_token(
    cluster: &str,
    instance: &InstanceId,
    device_index: u32,
    generation: u32,
) -> String {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let hash = cluster.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let instance: String = instance.as_str().chars().take(32).collect();
    format!("ul-{hash:08x}-{instance}-d{device_index}-g{generation}")
}

impl EniReconciler {
    pub fn new(cloud: Arc<dyn Cloud>, settings: EniSettings) -> Self {
        Self {
            cloud,
            settings,
            started: Instant::now(),
            memory: Mutex::new(Memory::default()),
        }
    }

    pub fn settings(&self) -> &EniSettings {
        &self.settings
    }

    fn memory(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn limits_of(&self, instance_type: &str) -> Option<PoolLimits> {
        instance_types::lookup(instance_type)
            .map(PoolLimits::from)
            .or_else(|| self.memory().described_types.get(instance_type).copied())
    }

    /// DescribeInstanceTypes for the types neither the built-in table nor an earlier describe knows.
    async fn learn_types<'a>(
        &self,
        instances: impl Iterator<Item = &'a Instance>,
    ) -> Result<(), CloudError> {
        let unknown: BTreeSet<String> = instances
            .map(|i| i.instance_type.clone())
            .filter(|t| self.limits_of(t).is_none())
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let types: Vec<String> = unknown.into_iter().collect();
        let described = self.cloud.describe_instance_types(&types).await?;
        let mut memory = self.memory();
        for t in described {
            memory.described_types.insert(
                t.instance_type,
                PoolLimits {
                    max_enis: t.max_enis,
                    ipv4_per_eni: t.ipv4_per_eni,
                    vcpus: t.vcpus,
                    prefix_delegation: t.prefix_delegation,
                },
            );
        }
        Ok(())
    }

    /// Max pods of a node of `instance_type` in `zone` under these settings (the max-pods annotation).
    pub fn max_pods(&self, instance_type: &str, zone: &str) -> Option<u32> {
        let limits = self.limits_of(instance_type)?;
        Some(max_pods(
            &limits,
            self.settings.mode,
            self.use_primary(zone),
        ))
    }

    fn use_primary(&self, zone: &str) -> bool {
        !self.settings.subnets.contains_key(zone)
    }

    fn owned(&self, eni: &NetworkInterface) -> bool {
        eni.tags.get(TAG_CLUSTER) == Some(&self.settings.cluster_name)
    }

    /// One pass over `nodes`: observe, plan, apply, collect. Errors of one node never stop the others.
    pub async fn pass(&self, nodes: &[EniNode]) -> EniPassReport {
        self.pass_with(nodes, None).await
    }

    /// [`Self::pass`], handing each node's [`NodeReport`] to `finished` as soon as that node's ops are done (and
    /// the subnet CIDRs its status carries are known), while other nodes' ops still run: a caller writes the
    /// first nodes' statuses without waiting for the slowest node. The returned report holds every node's report
    /// too. `finished` is dropped when the pass returns.
    pub async fn pass_with(
        &self,
        nodes: &[EniNode],
        finished: Option<UnboundedSender<NodeReport>>,
    ) -> EniPassReport {
        let mut report = EniPassReport::default();
        let ids: Vec<InstanceId> = nodes.iter().map(|n| n.instance.clone()).collect();
        let filter = EniFilter {
            tags: Tags::from([(TAG_CLUSTER.to_owned(), self.settings.cluster_name.clone())]),
            ..EniFilter::default()
        };
        // Every describe at once: they draw from the same (large) bucket and nothing else waits on one of them.
        let (described, cluster_enis) = futures::join!(
            describe_instances(self.cloud.as_ref(), &ids),
            self.cloud.describe_network_interfaces(&filter),
        );
        let instances: BTreeMap<InstanceId, Instance> = match described {
            Ok(found) => found.into_iter().map(|i| (i.id.clone(), i)).collect(),
            Err(e) => {
                report.errors.push(format!("DescribeInstances: {e}"));
                return report;
            }
        };
        let cluster_enis = match cluster_enis {
            Ok(enis) => enis,
            Err(e) => {
                report
                    .errors
                    .push(format!("DescribeNetworkInterfaces: {e}"));
                return report;
            }
        };

        if let Err(e) = self.learn_types(instances.values()).await {
            report.errors.push(format!("DescribeInstanceTypes: {e}"));
        }

        // Plan every live node.
        let now = self.now();
        let mut planned = Vec::new();
        for node in nodes {
            let Some(instance) = instances.get(&node.instance) else {
                report.gone.push(node.name.clone());
                continue;
            };
            let Some(limits) = self.limits_of(&instance.instance_type) else {
                report.errors.push(format!(
                    "{}: unknown instance type {}",
                    node.name, instance.instance_type
                ));
                continue;
            };
            let observed = self.observe(instance, &cluster_enis);
            let views: Vec<EniView> = observed.iter().map(|o| o.view.clone()).collect();
            let use_primary = self.use_primary(&instance.zone);
            let excess_since = self.memory().excess_since.get(&node.name).copied();
            let mut plan = plan_pool(&PoolInput {
                limits,
                mode: self.settings.mode,
                targets: self.settings.targets,
                enis: &views,
                use_primary,
                used: &node.used,
                cooling: &node.cooling,
                releasing: &node.releasing,
                now,
                excess_since,
                release_delay: self.settings.release_delay,
            });
            // Refused up front: every call of this node's plan would fail, pass after pass.
            let refused = (!limits.supports(self.settings.mode)).then(|| {
                format!(
                    "{} is not a Nitro instance type: prefix delegation needs Nitro; use secondary IPs for this \
                     node group (a controller without prefix delegation whose node selector selects it)",
                    instance.instance_type
                )
            });
            if refused.is_some() {
                plan.ops.clear();
                plan.excess_since = None;
            }
            {
                let mut memory = self.memory();
                match plan.excess_since {
                    Some(t) => memory.excess_since.insert(node.name.clone(), t),
                    None => memory.excess_since.remove(&node.name),
                };
            }
            let repairs = if refused.is_some() {
                Vec::new()
            } else {
                dot_repairs(&observed)
            };
            let by_create = (self.settings.spread_first_growth && use_primary && refused.is_none())
                .then(|| first_growth_by_create(&plan.ops, &views, &limits))
                .flatten();
            planned.push(Planned {
                node,
                instance,
                observed,
                repairs,
                max_pods: max_pods(&limits, self.settings.mode, use_primary),
                ops: plan.ops.clone(),
                plan,
                use_primary,
                refused,
                held: None,
                by_create,
                quota_held: None,
            });
        }
        self.spread_first_growth(&mut planned);
        // Largest deficit first: the queue serves callers of a bucket in arrival order.
        planned.sort_by_key(|p| std::cmp::Reverse(p.plan.deficit()));
        self.hold_growth(&mut planned, now);
        self.hold_creates_at_quota(&mut planned, now);
        // Subnet CIDRs (for the status) are learnt while the work runs; a node is reported once its ops are done
        // and they are known.
        let subnets = self
            .learn_subnets(instances.values())
            .map(|r| r.map_err(|e| e.to_string()))
            .shared();
        let finished = &finished;
        let applies = planned.into_iter().map(|p| {
            let subnets = subnets.clone();
            async move {
                let mut observed = p.observed.clone();
                let mut releasing = p.node.releasing.clone();
                let mut eni_quota = p.quota_held.clone();
                let result = match &p.refused {
                    Some(why) => Err(why.clone()),
                    None => {
                        let applied = self
                            .apply(p.instance, &mut observed, &mut releasing, &p.ops)
                            .await;
                        if let Err(e) = &applied
                            && e.code == ENI_QUOTA_CODE
                        {
                            eni_quota = Some(format!("{} ({})", p.instance.zone, e.message));
                        }
                        // Whatever became of the plan: an ENI that would outlive its instance is worth the call.
                        let repaired = self.repair(&p.repairs).await;
                        match (applied, repaired) {
                            (Err(e), _) | (Ok(()), Err(e)) => Err(e.to_string()),
                            (Ok(()), Ok(())) => p.held.clone().map_or(Ok(()), Err),
                        }
                    }
                };
                let finished_at = self.now();
                let _ = subnets.await;
                let (pool, pool_size) =
                    self.pool_status(&observed, p.use_primary, &releasing, p.node);
                let report = NodeReport {
                    name: p.node.name.clone(),
                    instance: p.node.instance.clone(),
                    plan: p.plan,
                    applied: result.is_ok(),
                    error: result.err(),
                    pool,
                    pool_size,
                    max_pods: p.max_pods,
                    finished_at,
                    zone: p.instance.zone.clone(),
                    subnet: p.instance.subnet.clone(),
                    node_ip: p.instance.private_ip,
                    primary_eni: p.instance.primary_eni().map(|e| e.id.to_string()),
                    repairs: p.repairs.into_iter().map(|(eni, _)| eni).collect(),
                    eni_quota,
                };
                if let Some(tx) = finished {
                    // A receiver gone (a caller that stopped listening) changes nothing for the pass.
                    let _ = tx.send(report.clone());
                }
                report
            }
        });
        let (applied, subnets) = futures::join!(futures::future::join_all(applies), subnets);
        if let Err(e) = subnets {
            report.errors.push(format!("DescribeSubnets: {e}"));
        }
        report.nodes = applied;

        let live: BTreeSet<&str> = instances.keys().map(InstanceId::as_str).collect();
        self.collect(&cluster_enis, &live, &mut report).await;
        report
    }

    /// For every joining node that can take its first addresses either way, choose the way whose buckets would
    /// serve it sooner, node after node, counting the nodes already sent each way (see
    /// [`underlay_cloud::choose_paths`]). Nothing changes when the cloud does not pace (no outlook).
    fn spread_first_growth(&self, planned: &mut [Planned<'_>]) {
        let Some(limits) = self.cloud.rate_limits() else {
            return;
        };
        let candidates: Vec<usize> = (0..planned.len())
            .filter(|i| planned[*i].by_create.is_some())
            .collect();
        if candidates.is_empty() {
            return;
        }
        let assign = vec![Bucket::Action(Operation::AssignPrivateIpAddresses)];
        let mut create: Vec<Bucket> = limits
            .create_eni_draws(true)
            .into_iter()
            .map(|op| op.bucket(false))
            .collect();
        create.push(Bucket::Action(Operation::AttachNetworkInterface));
        create.push(Bucket::Action(Operation::ModifyNetworkInterfaceAttribute));
        let outlook: BTreeMap<Bucket, BucketOutlook> = assign
            .iter()
            .chain(&create)
            .filter_map(|b| self.cloud.bucket_outlook(*b).map(|o| (*b, o)))
            .collect();
        let chosen = choose_paths(candidates.len(), &[assign, create], &outlook);
        for (i, way) in candidates.into_iter().zip(chosen) {
            let p = &mut planned[i];
            if way == 1
                && let Some(ops) = p.by_create.take()
            {
                p.ops = ops;
            }
        }
    }

    /// The subnet pod ENIs of `instance` are created in: the zone's ENI subnet, else the node's own.
    fn eni_subnet(&self, instance: &Instance) -> SubnetId {
        self.settings
            .subnets
            .get(&instance.zone)
            .cloned()
            .unwrap_or_else(|| instance.subnet.clone())
    }

    /// The subnet an op takes new addresses from, if it takes any.
    fn growth_subnet(
        &self,
        op: &PoolOp,
        instance: &Instance,
        observed: &[Observed],
    ) -> Option<SubnetId> {
        match op {
            PoolOp::CreateEni { .. } => Some(self.eni_subnet(instance)),
            PoolOp::AssignIps { eni, .. } | PoolOp::AssignPrefixes { eni, .. } => observed
                .iter()
                .find(|o| &o.view.id == eni)
                .map(|o| o.subnet.clone()),
            _ => None,
        }
    }

    /// Hold back growth into subnets that are backing off. Once a subnet's wait is over, only the first node
    /// (largest deficit) that grows into it tries this pass; the others wait for its answer.
    fn hold_growth(&self, planned: &mut [Planned<'_>], now: Duration) {
        let memory = self.memory();
        if memory.subnet_backoff.is_empty() {
            return;
        }
        let mut trying: BTreeSet<SubnetId> = BTreeSet::new();
        for p in planned.iter_mut().filter(|p| p.refused.is_none()) {
            let mut held: BTreeMap<SubnetId, String> = BTreeMap::new();
            let mut ops = Vec::with_capacity(p.ops.len());
            for op in &p.ops {
                let hold = self
                    .growth_subnet(op, p.instance, &p.observed)
                    .and_then(|s| {
                        let b = memory.subnet_backoff.get(&s)?;
                        let why = if now < b.until {
                            format!(
                                "subnet {s} is out of addresses ({}): not growing into it for another {}s",
                                b.code,
                                (b.until - now).as_secs_f64().ceil()
                            )
                        } else if trying.contains(&s) || held.contains_key(&s) {
                            format!(
                                "subnet {s} is out of addresses ({}): another node tries it first",
                                b.code
                            )
                        } else {
                            return None;
                        };
                        Some((s, why))
                    });
                match hold {
                    Some((s, why)) => {
                        held.entry(s).or_insert(why);
                    }
                    None => ops.push(op.clone()),
                }
            }
            // The node that tries a subnet this pass is the first one whose growth into it is not held.
            for op in &ops {
                if let Some(s) = self.growth_subnet(op, p.instance, &p.observed)
                    && memory.subnet_backoff.contains_key(&s)
                {
                    trying.insert(s);
                }
            }
            if !held.is_empty() {
                p.ops = ops;
                p.held = Some(held.into_values().collect::<Vec<_>>().join("; "));
            }
        }
    }

    /// New ENIs in a zone whose network-interface quota EC2 refused wait out a doubling backoff (the subnet
    /// backoff's settings); when it ends one node tries first. Other growth (assigns onto attached ENIs) goes on.
    /// Never a retry storm: at most one CreateNetworkInterface per zone per backoff period while refused.
    fn hold_creates_at_quota(&self, planned: &mut [Planned<'_>], now: Duration) {
        let memory = self.memory();
        if memory.zone_quota.is_empty() {
            return;
        }
        let mut trying: BTreeSet<String> = BTreeSet::new();
        for p in planned.iter_mut().filter(|p| p.refused.is_none()) {
            let zone = &p.instance.zone;
            let Some(b) = memory.zone_quota.get(zone) else {
                continue;
            };
            let creates = p
                .ops
                .iter()
                .any(|op| matches!(op, PoolOp::CreateEni { .. }));
            if !creates {
                continue;
            }
            let why = if now < b.until {
                format!(
                    "zone {zone} is at its network-interface quota ({}): no new ENI for another {}s",
                    b.code,
                    (b.until - now).as_secs_f64().ceil()
                )
            } else if trying.contains(zone) {
                format!(
                    "zone {zone} is at its network-interface quota ({}): another node tries it first",
                    b.code
                )
            } else {
                trying.insert(zone.clone());
                continue;
            };
            p.ops.retain(|op| !matches!(op, PoolOp::CreateEni { .. }));
            p.quota_held = Some(why.clone());
            p.held = Some(match p.held.take() {
                Some(h) => format!("{h}; {why}"),
                None => why,
            });
        }
    }

    /// A create in `zone` was refused for the zone's network-interface quota: back off (doubling).
    fn zone_at_quota(&self, zone: &str, e: &CloudError) {
        let now = self.now();
        let (first, max) = (
            self.settings.subnet_backoff,
            self.settings.subnet_backoff_max,
        );
        let mut memory = self.memory();
        let b = memory.zone_quota.entry(zone.to_owned()).or_default();
        let Some(wait) = b.refuse(&e.code, now, first, max) else {
            return;
        };
        tracing::warn!(
            zone = %zone,
            code = %e.code,
            wait_s = wait.as_secs(),
            "network-interface quota reached: no new ENI in this zone for a while"
        );
    }

    /// An op that takes addresses from `subnet` succeeded: the subnet has room again.
    fn subnet_has_room(&self, subnet: &SubnetId) {
        self.memory().subnet_backoff.remove(subnet);
    }

    /// EC2 found `subnet` out of addresses: start waiting, or wait twice as long when the wait just ended
    /// (a refusal while already waiting came from the same moment and counts once).
    fn subnet_full(&self, subnet: &SubnetId, e: &CloudError) {
        let now = self.now();
        let (first, max) = (
            self.settings.subnet_backoff,
            self.settings.subnet_backoff_max,
        );
        let mut memory = self.memory();
        let b = memory.subnet_backoff.entry(subnet.clone()).or_default();
        let Some(wait) = b.refuse(&e.code, now, first, max) else {
            return;
        };
        tracing::info!(
            subnet = %subnet,
            code = %e.code,
            wait_s = wait.as_secs(),
            "subnet out of addresses: backing off"
        );
    }

    /// Note what a growth op's answer says about its subnet.
    fn growth_answer<T>(&self, subnet: &SubnetId, result: &Result<T, CloudError>) {
        match result {
            Ok(_) => self.subnet_has_room(subnet),
            Err(e) if e.is_insufficient_addresses() => self.subnet_full(subnet, e),
            Err(_) => {}
        }
    }

    async fn learn_subnets<'a>(
        &self,
        instances: impl Iterator<Item = &'a Instance>,
    ) -> Result<(), CloudError> {
        let mut vpcs = BTreeSet::new();
        {
            let memory = self.memory();
            for i in instances {
                let mut wanted = vec![&i.subnet];
                wanted.extend(self.settings.subnets.get(&i.zone));
                if wanted.iter().any(|s| !memory.subnet_cidrs.contains_key(*s)) {
                    vpcs.insert(i.vpc.clone());
                }
            }
        }
        for vpc in vpcs {
            let subnets = self.cloud.describe_subnets(&vpc).await?;
            let mut memory = self.memory();
            for s in subnets {
                memory.subnet_cidrs.insert(s.id, s.cidr);
            }
        }
        Ok(())
    }

    /// The node's ENIs: attached ones from the instance, unattached ones tagged for it.
    fn observe(&self, instance: &Instance, cluster_enis: &[NetworkInterface]) -> Vec<Observed> {
        let mut out: Vec<Observed> = instance
            .enis
            .iter()
            .filter_map(|e| {
                let attachment = e.attachment.clone()?;
                let device = attachment.device_index;
                Some(Observed {
                    view: EniView {
                        id: e.id.to_string(),
                        device_index: Some(device),
                        addresses: e.secondary_ips.clone(),
                        prefixes: e.prefixes.clone(),
                        pods: device == 0 || self.owned(e),
                    },
                    mac: e.mac.clone(),
                    primary_ip: e.primary_ip,
                    subnet: e.subnet.clone(),
                    attachment: Some(attachment),
                })
            })
            .collect();
        for e in cluster_enis {
            let detached = e.status == EniStatus::Available && e.attachment.is_none();
            if detached && e.tags.get(TAG_NODE).map(String::as_str) == Some(instance.id.as_str()) {
                out.push(Observed {
                    view: EniView {
                        id: e.id.to_string(),
                        device_index: None,
                        addresses: e.secondary_ips.clone(),
                        prefixes: e.prefixes.clone(),
                        pods: true,
                    },
                    mac: e.mac.clone(),
                    primary_ip: e.primary_ip,
                    subnet: e.subnet.clone(),
                    attachment: None,
                });
            }
        }
        out
    }

    /// Apply one node's ops in order, keeping `observed` and `releasing` up to date; stop at the first failure.
    async fn apply(
        &self,
        instance: &Instance,
        observed: &mut Vec<Observed>,
        releasing: &mut Releasing,
        ops: &[PoolOp],
    ) -> Result<(), CloudError> {
        for op in ops {
            match op {
                PoolOp::CreateEni {
                    device_index,
                    units,
                } => {
                    let eni = self.create(instance, *device_index, *units).await?;
                    observed.push(Observed {
                        view: EniView {
                            id: eni.id.to_string(),
                            device_index: Some(*device_index),
                            addresses: eni.secondary_ips.clone(),
                            prefixes: eni.prefixes.clone(),
                            pods: true,
                        },
                        mac: eni.mac,
                        primary_ip: eni.primary_ip,
                        subnet: eni.subnet,
                        attachment: None,
                    });
                }
                PoolOp::AttachEni { eni, device_index } => {
                    self.cloud
                        .attach_network_interface(
                            &EniId::new(eni.as_str()),
                            &instance.id,
                            *device_index,
                            true,
                        )
                        .await?;
                    if let Some(o) = observed.iter_mut().find(|o| &o.view.id == eni) {
                        o.view.device_index = Some(*device_index);
                    }
                }
                PoolOp::AssignIps { eni, count } => {
                    let subnet = self.growth_subnet(op, instance, observed);
                    let added = self
                        .cloud
                        .assign_private_ips(
                            &EniId::new(eni.as_str()),
                            &AddressRequest::Count(*count),
                        )
                        .await;
                    if let Some(s) = &subnet {
                        self.growth_answer(s, &added);
                    }
                    let added = added?;
                    if let Some(o) = observed.iter_mut().find(|o| &o.view.id == eni) {
                        o.view.addresses.extend(added);
                    }
                }
                PoolOp::AssignPrefixes { eni, count } => {
                    let subnet = self.growth_subnet(op, instance, observed);
                    let added = self
                        .cloud
                        .assign_prefixes(&EniId::new(eni.as_str()), &AddressRequest::Count(*count))
                        .await;
                    if let Some(s) = &subnet {
                        self.growth_answer(s, &added);
                    }
                    let added = added?;
                    if let Some(o) = observed.iter_mut().find(|o| &o.view.id == eni) {
                        o.view.prefixes.extend(added);
                    }
                }
                PoolOp::UnassignIps { eni, addresses } => {
                    self.cloud
                        .unassign_private_ips(&EniId::new(eni.as_str()), addresses)
                        .await?;
                    if let Some(o) = observed.iter_mut().find(|o| &o.view.id == eni) {
                        o.view.addresses.retain(|a| !addresses.contains(a));
                    }
                    releasing.addresses.retain(|a| !addresses.contains(a));
                }
                PoolOp::UnassignPrefixes { eni, prefixes } => {
                    self.cloud
                        .unassign_prefixes(&EniId::new(eni.as_str()), prefixes)
                        .await?;
                    if let Some(o) = observed.iter_mut().find(|o| &o.view.id == eni) {
                        o.view.prefixes.retain(|p| !prefixes.contains(p));
                    }
                    releasing.prefixes.retain(|p| !prefixes.contains(p));
                }
                PoolOp::DetachEni { eni } => {
                    let attachment = instance
                        .enis
                        .iter()
                        .find(|e| e.id.as_str() == eni)
                        .and_then(|e| e.attachment.as_ref());
                    if let Some(a) = attachment {
                        match self.cloud.detach_network_interface(&a.id, false).await {
                            Ok(()) => {}
                            Err(e) if e.is_not_found() => {}
                            Err(e) => return Err(e),
                        }
                    }
                    observed.retain(|o| &o.view.id != eni);
                }
                PoolOp::WithdrawIps { addresses, .. } => {
                    releasing.addresses.extend(addresses.iter().copied());
                }
                PoolOp::WithdrawPrefixes { prefixes, .. } => {
                    releasing.prefixes.extend(prefixes.iter().copied());
                }
                PoolOp::DeleteEni { eni } => {
                    match self
                        .cloud
                        .delete_network_interface(&EniId::new(eni.as_str()))
                        .await
                    {
                        Ok(()) => {}
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e),
                    }
                    observed.retain(|o| &o.view.id != eni);
                }
            }
        }
        Ok(())
    }

    /// Set DeleteOnTermination on each attachment again; an attachment gone meanwhile needs nothing. Every repair
    /// is tried; the first failure is returned.
    async fn repair(&self, repairs: &[(EniId, AttachmentId)]) -> Result<(), CloudError> {
        let mut first = Ok(());
        for (eni, attachment) in repairs {
            match self
                .cloud
                .set_delete_on_termination(eni, attachment, true)
                .await
            {
                Ok(()) => tracing::info!(eni = %eni, "DeleteOnTermination set again"),
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    if first.is_ok() {
                        first = Err(e);
                    }
                }
            }
        }
        first
    }

    /// CreateNetworkInterface with the deterministic client token, then attach with DeleteOnTermination.
    async fn create(
        &self,
        instance: &Instance,
        device_index: u32,
        units: u32,
    ) -> Result<NetworkInterface, CloudError> {
        let primary = instance.primary_eni();
        let subnet = self.eni_subnet(instance);
        let security_groups = if self.settings.security_groups.is_empty() {
            primary
                .map(|p| p.security_groups.clone())
                .unwrap_or_default()
        } else {
            self.settings.security_groups.clone()
        };
        let key = (instance.id.clone(), device_index);
        let generation = self.memory().generation.get(&key).copied().unwrap_or(0);
        let (secondary_ip_count, prefix_count) = match self.settings.mode {
            AddressMode::SecondaryIps => (units, 0),
            AddressMode::Prefixes => (0, units),
        };
        let request = CreateEniRequest {
            subnet,
            security_groups,
            description: format!("underlay pods of {}", instance.id),
            tags: Tags::from([
                (TAG_CLUSTER.to_owned(), self.settings.cluster_name.clone()),
                (TAG_NODE.to_owned(), instance.id.to_string()),
            ]),
            client_token: client_token(
                &self.settings.cluster_name,
                &instance.id,
                device_index,
                generation,
            ),
            secondary_ip_count,
            prefix_count,
        };
        let bump = || {
            *self.memory().generation.entry(key.clone()).or_default() = generation + 1;
        };
        let created = self.cloud.create_network_interface(&request).await;
        self.growth_answer(&request.subnet, &created);
        match &created {
            Ok(_) => {
                self.memory().zone_quota.remove(&instance.zone);
            }
            Err(e) if e.code == ENI_QUOTA_CODE => self.zone_at_quota(&instance.zone, e),
            Err(_) => {}
        }
        let eni = match created {
            Ok(eni) => eni,
            Err(e) => {
                if e.code == "IdempotentParameterMismatch" {
                    // The token made an ENI for other parameters (it is tagged for the node and will be attached
                    // or deleted by a later plan); the next create needs a token of its own.
                    bump();
                }
                return Err(e);
            }
        };
        match self
            .cloud
            .attach_network_interface(&eni.id, &instance.id, device_index, true)
            .await
        {
            Ok(_) => Ok(eni),
            Err(e) => {
                if e.code.starts_with("InvalidNetworkInterfaceID")
                    || e.code == "InvalidNetworkInterface.InUse"
                {
                    // The token's ENI is gone or attached elsewhere: a fresh token next time.
                    bump();
                }
                Err(e)
            }
        }
    }

    /// The node's pool in the UnderlayNode status's terms: every attached ENI that carries pod addresses, its
    /// withdrawn ones listed apart (and left out of the size). The release generation moves on when the pass
    /// withdrew anything the status did not already list.
    fn pool_status(
        &self,
        observed: &[Observed],
        use_primary: bool,
        releasing: &Releasing,
        node: &EniNode,
    ) -> (Pool, u32) {
        let memory = self.memory();
        let mut enis: Vec<PoolEni> = observed
            .iter()
            .filter(|o| o.view.pods)
            .filter_map(|o| {
                let device_index = o.view.device_index?;
                if (device_index == 0 && !use_primary)
                    || (o.view.addresses.is_empty() && o.view.prefixes.is_empty())
                {
                    return None;
                }
                let (releasing_addresses, addresses): (Vec<&Ipv4Addr>, Vec<&Ipv4Addr>) = o
                    .view
                    .addresses
                    .iter()
                    .partition(|a| releasing.addresses.contains(a));
                let (releasing_prefixes, prefixes): (Vec<&Ipv4Net>, Vec<&Ipv4Net>) = o
                    .view
                    .prefixes
                    .iter()
                    .partition(|p| releasing.prefixes.contains(p));
                let strings = |v: Vec<&Ipv4Addr>| v.iter().map(ToString::to_string).collect();
                let cidrs = |v: Vec<&Ipv4Net>| v.iter().map(ToString::to_string).collect();
                Some(PoolEni {
                    id: o.view.id.clone(),
                    device_index,
                    mac: Some(o.mac.clone()),
                    subnet_cidr: memory.subnet_cidrs.get(&o.subnet).map(ToString::to_string),
                    primary_ip: Some(o.primary_ip.to_string()),
                    addresses: strings(addresses),
                    prefixes: cidrs(prefixes),
                    releasing_addresses: strings(releasing_addresses),
                    releasing_prefixes: cidrs(releasing_prefixes),
                })
            })
            .collect();
        enis.sort_by_key(|e| e.device_index);
        let size = enis
            .iter()
            .map(|e| (e.addresses.len() + e.prefixes.len() * 16) as u32)
            .sum();
        let release_generation =
            releasing.next_generation(&node.releasing, node.release_generation);
        (
            Pool {
                block: None,
                enis,
                release_generation,
            },
            size,
        )
    }

    /// Delete `available` cluster ENIs whose node is gone (or that name no node), once seen for the grace period.
    async fn collect(
        &self,
        cluster_enis: &[NetworkInterface],
        live: &BTreeSet<&str>,
        report: &mut EniPassReport,
    ) {
        let now = self.now();
        let mut due = Vec::new();
        {
            let mut memory = self.memory();
            let available: BTreeSet<&EniId> = cluster_enis
                .iter()
                .filter(|e| e.status == EniStatus::Available && e.attachment.is_none())
                .map(|e| &e.id)
                .collect();
            memory
                .available_since
                .retain(|id, _| available.contains(id));
            for e in cluster_enis {
                if !available.contains(&e.id) {
                    continue;
                }
                let claimed = e
                    .tags
                    .get(TAG_NODE)
                    .is_some_and(|n| live.contains(n.as_str()));
                if claimed {
                    memory.available_since.remove(&e.id);
                    continue;
                }
                let since = *memory.available_since.entry(e.id.clone()).or_insert(now);
                if now.saturating_sub(since) >= self.settings.gc_grace {
                    due.push(e.id.clone());
                } else {
                    report.awaiting_collection += 1;
                }
            }
        }
        for id in due {
            match self.cloud.delete_network_interface(&id).await {
                Ok(()) => {
                    self.memory().available_since.remove(&id);
                    report.collected.push(id);
                }
                Err(e) if e.is_not_found() => {
                    self.memory().available_since.remove(&id);
                }
                Err(e) => report
                    .errors
                    .push(format!("DeleteNetworkInterface {id}: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_tokens_are_short_ascii_and_distinct_per_slot() {
        let i = InstanceId::new("i-0123456789abcdef0");
        let t = client_token("prod-eu-west-1", &i, 2, 0);
        assert!(t.len() <= 64 && t.is_ascii(), "{t}");
        assert_eq!(t, client_token("prod-eu-west-1", &i, 2, 0));
        assert_ne!(t, client_token("prod-eu-west-1", &i, 1, 0));
        assert_ne!(t, client_token("prod-eu-west-1", &i, 2, 1));
        assert_ne!(t, client_token("staging", &i, 2, 0));
    }
}
