//! `lab churn` (eni mode; part of `lab demo --mode eni`): a burst of pods on every node outgrows its pool, then
//! leaves. The controller grows each pool (pods wait for addresses as kubelet retries a sandbox), then releases
//! the excess in two phases — withdrawn from the agent's pool first, unassigned in EC2 once the agent
//! acknowledges — and the pods that stayed keep their addresses and their connectivity.
//!
//! ```text
//!   before ──ADD × burst per node──► grown (pool ≥ pods) ──DEL × burst per node──► settled: nothing releasing,
//!                                                                                  EC2 holds exactly the pools
//! ```

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use underlay_cloud::Operation;
use underlay_core::names;

use super::check::CheckReport;
use super::{Lab, LabPod, cni, progress};
use crate::kernel;

/// How long pools may take to settle after the burst leaves: the cooldown, the release delay and a few passes.
const SETTLE_WAIT: Duration = Duration::from_secs(60);
/// Pools count as settled once unchanged and tidy for this long (a few of the lab controller's 1 s passes).
const QUIET: Duration = Duration::from_secs(3);

/// What `lab churn` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnReport {
    /// Pods added to (then removed from) every node.
    pub burst_per_node: usize,
    pub pods_added: usize,
    /// From the burst's first ADD to its last pod wired, growth of the pools included.
    pub grow_ms: f64,
    /// Pool addresses over all nodes (UnderlayNode `poolSize`): before the burst, at its peak, after it left.
    pub pool_before: u32,
    pub pool_peak: u32,
    pub pool_after: u32,
    /// Pod addresses assigned in EC2 to the nodes' ENIs (secondary addresses, prefixes × 16), same moments.
    pub assigned_before: usize,
    pub assigned_peak: usize,
    pub assigned_after: usize,
    /// ENIs attached to the nodes, same moments: a growth by an ENI's worth attaches one per node; an ENI the
    /// release empties is detached and deleted.
    pub enis_before: usize,
    pub enis_peak: usize,
    pub enis_after: usize,
    /// Unassign, detach and delete calls the controller made while the burst left.
    pub unassign_calls: u64,
    pub detach_calls: u64,
    pub delete_calls: u64,
    /// The controller's release delay.
    pub release_delay_ms: f64,
    /// From the burst's last DEL to every node settled (nothing releasing, EC2 holding exactly the pool, no
    /// emptied ENI attached, no detached one left behind); `None` if that took longer than the wait.
    pub settle_ms: Option<f64>,
    /// Addresses of the pods that stayed that EC2 no longer assigns to their node (must be none).
    pub kept_pods_unassigned: Vec<String>,
    /// The connectivity check over the pods that stayed, after the burst left.
    pub check: CheckReport,
}

impl ChurnReport {
    pub fn passed(&self) -> bool {
        self.settle_ms.is_some()
            && self.pool_peak > self.pool_before
            && self.pool_after < self.pool_peak
            && self.assigned_after == self.pool_after as usize
            && self.kept_pods_unassigned.is_empty()
            && self.check.pairs_checked > 0
            && self.check.pairs_ok == self.check.pairs_checked
    }

    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "churn: {} pods ({} per node) added in {:.1} s and removed",
            self.pods_added,
            self.burst_per_node,
            self.grow_ms / 1e3
        );
        let _ = writeln!(
            s,
            "  pool addresses {} → {} → {} (EC2 assigned {} → {} → {}), {} unassign call(s)",
            self.pool_before,
            self.pool_peak,
            self.pool_after,
            self.assigned_before,
            self.assigned_peak,
            self.assigned_after,
            self.unassign_calls
        );
        let _ = writeln!(
            s,
            "  node ENIs {} → {} → {} ({} detached, {} deleted)",
            self.enis_before, self.enis_peak, self.enis_after, self.detach_calls, self.delete_calls
        );
        match self.settle_ms {
            Some(ms) => {
                let _ = writeln!(
                    s,
                    "  pools settled {:.1} s after the last pod left (release delay {:.1} s)",
                    ms / 1e3,
                    self.release_delay_ms / 1e3
                );
            }
            None => {
                let _ = writeln!(s, "  pools did not settle within {SETTLE_WAIT:?}");
            }
        }
        if !self.kept_pods_unassigned.is_empty() {
            let _ = writeln!(
                s,
                "  addresses of staying pods unassigned: {}",
                self.kept_pods_unassigned.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "  staying pods: {}/{} pairs answer",
            self.check.pairs_ok, self.check.pairs_checked
        );
        s
    }
}

/// One node's pool as its record and EC2 state it.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct NodePool {
    /// `status.poolSize`.
    size: u32,
    /// Entries of the ENIs' `releasing*` lists.
    releasing: usize,
    /// Pod addresses EC2 assigns to the node's ENIs.
    assigned: BTreeSet<Ipv4Addr>,
    /// ENIs attached to the node.
    enis: usize,
    /// Attached secondary ENIs without any address (the controller detaches them).
    empty_enis: usize,
}

/// Pool addresses, EC2-assigned addresses and attached ENIs over all nodes.
fn totals(pools: &[NodePool]) -> (u32, usize, usize) {
    (
        pools.iter().map(|p| p.size).sum(),
        pools.iter().map(|p| p.assigned.len()).sum(),
        pools.iter().map(|p| p.enis).sum(),
    )
}

impl Lab {
    /// Every node tidy — nothing withdrawn, EC2 holding exactly the pool, no emptied ENI attached — and no
    /// detached ENI of the cluster left.
    pub(super) fn pools_tidy(&self, pools: &[NodePool]) -> bool {
        let detached_left = self
            .sim
            .snapshot()
            .enis
            .iter()
            .any(|e| e.attachment.is_none() && e.tags.contains_key(names::TAG_CLUSTER));
        !detached_left
            && pools.iter().all(|p| {
                p.releasing == 0 && p.empty_enis == 0 && p.assigned.len() == p.size as usize
            })
    }

    /// Waits until the pools are tidy, `done`, and unchanged for [`QUIET`], or `deadline`. Returns the pools and
    /// when the quiet stretch began (`None` at the deadline). `each` sees every sample first.
    fn wait_pools_quiet(
        &self,
        deadline: Instant,
        mut each: impl FnMut(&[NodePool]),
        done: impl Fn(&[NodePool]) -> bool,
    ) -> (Vec<NodePool>, Option<Instant>) {
        let mut quiet_since: Option<(Instant, (u32, usize, usize))> = None;
        loop {
            let pools = self.node_pools();
            each(&pools);
            let now = Instant::now();
            if self.pools_tidy(&pools) && done(&pools) {
                let t = totals(&pools);
                match quiet_since {
                    Some((since, seen)) if seen == t => {
                        if now.duration_since(since) >= QUIET {
                            return (pools, Some(since));
                        }
                    }
                    _ => quiet_since = Some((now, t)),
                }
            } else {
                quiet_since = None;
            }
            if now > deadline {
                return (pools, None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(super) fn node_pools(&self) -> Vec<NodePool> {
        let snap = self.sim.snapshot();
        self.nodes
            .iter()
            .map(|n| {
                let status = self
                    .api
                    .get::<underlay_api::UnderlayNode>(None, &n.name)
                    .and_then(|r| r.status)
                    .unwrap_or_default();
                let releasing = status.pool.as_ref().map_or(0, |p| {
                    p.enis
                        .iter()
                        .map(|e| e.releasing_addresses.len() + e.releasing_prefixes.len())
                        .sum()
                });
                let attached: Vec<_> = snap
                    .enis
                    .iter()
                    .filter(|e| {
                        e.attachment
                            .as_ref()
                            .is_some_and(|a| a.instance == n.instance.id)
                    })
                    .collect();
                let assigned = attached
                    .iter()
                    .flat_map(|e| e.secondary_addresses())
                    .collect();
                let empty_enis = attached
                    .iter()
                    .filter(|e| {
                        e.attachment.as_ref().is_some_and(|a| a.device_index != 0)
                            && e.secondary_ips.is_empty()
                            && e.prefixes.is_empty()
                    })
                    .count();
                NodePool {
                    size: status.pool_size,
                    releasing,
                    assigned,
                    enis: attached.len(),
                    empty_enis,
                }
            })
            .collect()
    }

    /// CNI DEL of a pod, then its namespace goes.
    fn remove_pod(&self, pod: &LabPod) -> anyhow::Result<()> {
        let node = &self.nodes[pod.node];
        cni(
            &self.config.cni_plugin,
            &node.netns,
            &node.dir.join("net.d").join(names::CNI_CONFLIST),
            "DEL",
            &pod.container_id,
            &pod.netns,
            None,
        )
        .with_context(|| format!("removing {} from {}", pod.name, node.name))?;
        kernel::netns_del(&pod.netns)?;
        Ok(())
    }

    /// Add `burst` pods to every node, then remove them; see the module doc. Eni mode only.
    pub fn churn(&mut self, burst: usize) -> anyhow::Result<ChurnReport> {
        if self.config.mode != underlay_api::Mode::Eni {
            bail!("churn exercises eni mode's pools; this lab runs routed mode");
        }
        if burst == 0 {
            bail!("a burst of 0 pods changes nothing");
        }
        self.wait_fabric()?;
        let sum = totals;
        // Pools may still be growing to their targets for the pods already there.
        let (before, quiet) = self.wait_pools_quiet(Instant::now() + SETTLE_WAIT, |_| {}, |_| true);
        if quiet.is_none() {
            progress("pools still changing before the burst; measuring from here");
        }
        let (pool_before, assigned_before, enis_before) = sum(&before);
        // Prefixes are unassigned by the same call.
        let calls = |lab: &Lab| {
            let c = lab.sim.counters();
            [
                c.calls_of(Operation::UnassignPrivateIpAddresses),
                c.calls_of(Operation::DetachNetworkInterface),
                c.calls_of(Operation::DeleteNetworkInterface),
            ]
        };

        let total = burst * self.nodes.len();
        progress(format!(
            "churn: {burst} more pods on each of {} nodes (pools grow as they fill)",
            self.nodes.len()
        ));
        let started = Instant::now();
        let mut added = Vec::with_capacity(total);
        let first = self.config.pods_per_node;
        let mut last = Instant::now();
        for k in first..first + burst {
            // Round-robin over nodes: every node grows at once, as a Deployment's scale-up spreads.
            for n in 0..self.nodes.len() {
                let pod = match self.add_pod(n, k) {
                    Ok(p) => p,
                    Err(e) => {
                        for p in &added {
                            let _ = self.remove_pod(p);
                        }
                        return Err(e.context("churn: adding the burst"));
                    }
                };
                added.push(pod);
                if last.elapsed() > Duration::from_secs(3) {
                    progress(format!("{} of {total} burst pods wired", added.len()));
                    last = Instant::now();
                }
            }
        }
        let grow_ms = started.elapsed().as_secs_f64() * 1e3;
        let peak = self.node_pools();
        let (pool_peak, assigned_peak, enis_peak) = sum(&peak);
        progress(format!(
            "{total} burst pods wired in {:.1} s; pools {pool_before} → {pool_peak} addresses",
            grow_ms / 1e3
        ));

        let calls_before = calls(self);
        for p in &added {
            self.remove_pod(p)?;
        }
        let left = Instant::now();
        progress(format!(
            "burst removed; waiting for the controller to release the excess (addresses cool down {:.0} s, \
             release delay {:.0} s)",
            super::LAB_COOLDOWN.as_secs_f64(),
            self.config.release_delay.as_secs_f64()
        ));
        let deadline = left + SETTLE_WAIT;
        let mut last = Instant::now();
        // Pools may still grow for a moment: the burst's addresses count as held while they cool down.
        let peak = std::cell::Cell::new((pool_peak, assigned_peak, enis_peak));
        let (after, quiet) = self.wait_pools_quiet(
            deadline,
            |pools| {
            let (size, assigned, enis) = sum(pools);
            let (p, a, e) = peak.get();
            peak.set((p.max(size), a.max(assigned), e.max(enis)));
            if last.elapsed() > Duration::from_secs(5) {
                let releasing: usize = pools.iter().map(|p| p.releasing).sum();
                progress(format!(
                    "pools {size} addresses, {releasing} withdrawn, {assigned} assigned in EC2, {enis} ENIs"
                ));
                last = Instant::now();
            }
            },
            // Shrunk from the peak (during the cooldown the pools hold still, tidy but not released).
            |pools| sum(pools).0 < peak.get().0,
        );
        let (pool_peak, assigned_peak, enis_peak) = peak.get();
        let settle_ms = quiet.map(|since| since.duration_since(left).as_secs_f64() * 1e3);
        let (pool_after, assigned_after, enis_after) = sum(&after);
        let kept_pods_unassigned = self
            .pods
            .iter()
            .filter(|p| !after[p.node].assigned.contains(&p.ip))
            .map(|p| format!("{} {}", p.name, p.ip))
            .collect();
        progress(format!(
            "pools {pool_peak} → {pool_after} addresses; checking the pods that stayed"
        ));
        let check = self.check()?;
        Ok(ChurnReport {
            burst_per_node: burst,
            pods_added: total,
            grow_ms,
            pool_before,
            pool_peak,
            pool_after,
            assigned_before,
            assigned_peak,
            assigned_after,
            enis_before,
            enis_peak,
            enis_after,
            unassign_calls: calls(self)[0] - calls_before[0],
            detach_calls: calls(self)[1] - calls_before[1],
            delete_calls: calls(self)[2] - calls_before[2],
            release_delay_ms: self.config.release_delay.as_secs_f64() * 1e3,
            settle_ms,
            kept_pods_unassigned,
            check,
        })
    }
}

/// Pods per node a churn adds by default: one more than an ENI's slots on `instance_type`, so that every node
/// needs another ENI's worth of addresses and gives it back.
pub fn default_burst(instance_type: &str) -> usize {
    underlay_core::instance_types::lookup(instance_type).map_or(10, |t| t.ipv4_per_eni as usize)
}
