//! `eni` mode: the arithmetic of one node's address pool. Given the node's instance-type limits, the address mode
//! (secondary IPs or /28 prefixes), its ENIs and what they hold, what the pods use and the warm targets,
//! [`plan_pool`] returns the EC2 work that brings the pool within its targets, as data.
//!
//! ```text
//!   PoolInput { limits, mode, targets, enis, used, releasing, now, excess_since }
//!        │
//!        ▼ plan_pool (pure)
//!   PoolPlan { ops: [UnassignIps | UnassignPrefixes | AttachEni | DeleteEni | CreateEni | AssignIps
//!                    | AssignPrefixes | WithdrawIps | WithdrawPrefixes | DetachEni], want, have, high, excess_since }
//! ```
//!
//! The targets mean what amazon-vpc-cni's knobs mean:
//! - `warm_ip_target` / `minimum_ip_target` (either set): keep `max(used + warm_ip_target, minimum_ip_target)`
//!   addresses; anything above that is excess.
//! - `warm_prefix_target` (prefix mode, neither of the above set): keep `warm_prefix_target` prefixes' worth of
//!   free addresses beyond the prefixes the used addresses need.
//! - otherwise `warm_eni_target` (default 1): keep that many ENIs' worth of free slots, counted in whole ENIs;
//!   excess only once a whole ENI's worth is free.
//! - `fill_at_join` (k8s-vpcnet): every slot of every ENI, always.
//!
//! Work is counted in *units*: one secondary address, or one /28 prefix. Each ENI has `ipv4_per_eni - 1` slots
//! (its primary address takes one); a prefix takes a slot. Every assign is one call for at most the ENI's free
//! slots.
//!
//! Releasing excess takes two phases, because what the agent reports is always a little old: an address it
//! reported free may be handed to a pod a moment later.
//! 1. *Withdraw*: once the pool has been above its targets for `release_delay`, free units (by the agent's last
//!    report) are withdrawn: no EC2 call, the node's pool status lists them as releasing and the agent stops
//!    handing them out. Withdrawn units no longer count in the pool.
//! 2. *Unassign*: once the agent reports usage made while already serving the pool without them
//!    ([`Releasing::acknowledged`]), the withdrawn units it does not hold can never be handed out again and are
//!    unassigned. A withdrawn unit a pod still holds waits until the pod is gone.
//!
//! A unit is never un-withdrawn: when the pool must grow again, fresh units are assigned. Nothing is released
//! when only a count of used addresses is known (it cannot say which ones are free).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::instance_types::InstanceTypeLimits;

/// Addresses in a delegated IPv4 prefix (/28).
pub const PREFIX_ADDRESSES: u32 = 16;
/// Default `warm_eni_target`, as amazon-vpc-cni's `WARM_ENI_TARGET`.
pub const DEFAULT_WARM_ENI_TARGET: u32 = 1;
/// Kubernetes' recommended pod caps EKS applies to max pods: 110 up to 30 vCPUs, 250 above.
pub const EKS_MAX_PODS_SMALL: u32 = 110;
pub const EKS_MAX_PODS_LARGE: u32 = 250;
const EKS_SMALL_VCPUS: u32 = 30;

/// Where pod addresses come from on an ENI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AddressMode {
    /// One secondary private address per pod.
    #[default]
    SecondaryIps,
    /// Delegated /28 prefixes (Nitro only): 16 pod addresses per slot.
    Prefixes,
}

impl AddressMode {
    /// Pod addresses in one unit.
    pub fn addresses_per_unit(self) -> u32 {
        match self {
            AddressMode::SecondaryIps => 1,
            AddressMode::Prefixes => PREFIX_ADDRESSES,
        }
    }
}

/// The network limits the pool arithmetic needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolLimits {
    pub max_enis: u32,
    /// IPv4 addresses per ENI, its primary included.
    pub ipv4_per_eni: u32,
    pub vcpus: u32,
    /// EC2 delegates /28 prefixes to this type's ENIs (Nitro: DescribeInstanceTypes' `Hypervisor` is `nitro`, or
    /// the type is bare metal). On any other type, `AssignPrivateIpAddresses` with prefixes always fails.
    pub prefix_delegation: bool,
}

impl From<&InstanceTypeLimits> for PoolLimits {
    fn from(t: &InstanceTypeLimits) -> Self {
        Self {
            max_enis: t.max_enis,
            ipv4_per_eni: t.ipv4_per_eni,
            vcpus: t.vcpus,
            prefix_delegation: t.nitro,
        }
    }
}

impl PoolLimits {
    /// Slots an ENI offers to pods (addresses or prefixes): all but its primary address.
    pub fn slots_per_eni(&self) -> u32 {
        self.ipv4_per_eni.saturating_sub(1)
    }

    /// Whether pods can get addresses in `mode` on this type at all: prefixes only where EC2 delegates them.
    pub fn supports(&self, mode: AddressMode) -> bool {
        match mode {
            AddressMode::SecondaryIps => true,
            AddressMode::Prefixes => self.prefix_delegation,
        }
    }

    /// Slots of an ENI pods can use in `mode`: none when the type does not support the mode.
    fn pod_slots_per_eni(&self, mode: AddressMode) -> u32 {
        if self.supports(mode) {
            self.slots_per_eni()
        } else {
            0
        }
    }

    /// ENIs that may carry pod addresses.
    pub fn pod_enis(&self, use_primary: bool) -> u32 {
        if use_primary {
            self.max_enis
        } else {
            self.max_enis.saturating_sub(1)
        }
    }
}

/// Max pods of a node, as EKS computes its recommendation: `ENIs × (IPs per ENI − 1) + 2` with secondary IPs,
/// `ENIs × (IPs per ENI − 1) × 16 + 2` with prefixes, one ENI fewer when the primary ENI carries no pods (custom
/// networking), and Kubernetes' 110 (≤ 30 vCPUs) or 250 cap. m5.large: 29 with secondary IPs, 110 with prefixes.
/// A type that cannot have prefixes has no pod slots in prefix mode: 2 (the host-network pods only).
pub fn max_pods(limits: &PoolLimits, mode: AddressMode, use_primary: bool) -> u32 {
    let raw =
        limits.pod_enis(use_primary) * limits.pod_slots_per_eni(mode) * mode.addresses_per_unit()
            + 2;
    let cap = if limits.vcpus <= EKS_SMALL_VCPUS {
        EKS_MAX_PODS_SMALL
    } else {
        EKS_MAX_PODS_LARGE
    };
    raw.min(cap)
}

/// Warm-pool targets, with amazon-vpc-cni's meanings (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    pub warm_ip_target: Option<u32>,
    pub minimum_ip_target: Option<u32>,
    pub warm_prefix_target: Option<u32>,
    /// Used only when none of the three above applies.
    pub warm_eni_target: u32,
    /// Fill every slot of every ENI (k8s-vpcnet).
    pub fill_at_join: bool,
}

impl Default for Targets {
    fn default() -> Self {
        Self {
            warm_ip_target: None,
            minimum_ip_target: None,
            warm_prefix_target: None,
            warm_eni_target: DEFAULT_WARM_ENI_TARGET,
            fill_at_join: false,
        }
    }
}

/// One ENI of the node as observed: attached at `device_index`, or created for the node and not attached yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EniView {
    pub id: String,
    /// `None`: not attached (created for this node, e.g. before a crash, or detached).
    pub device_index: Option<u32>,
    /// Secondary addresses (the primary excluded).
    pub addresses: Vec<Ipv4Addr>,
    pub prefixes: Vec<Ipv4Net>,
    /// Whether its addresses are the pool's: false for an attached ENI underlay does not own (it only holds its
    /// device index).
    pub pods: bool,
}

impl EniView {
    fn slots_taken(&self) -> u32 {
        (self.addresses.len() + self.prefixes.len()) as u32
    }
    /// Units that pods may get: withdrawn ones left out.
    fn units(&self, mode: AddressMode, releasing: &Releasing) -> u32 {
        match mode {
            AddressMode::SecondaryIps => self
                .addresses
                .iter()
                .filter(|a| !releasing.addresses.contains(a))
                .count() as u32,
            AddressMode::Prefixes => self
                .prefixes
                .iter()
                .filter(|p| !releasing.prefixes.contains(p))
                .count() as u32,
        }
    }
}

/// What the node's pods use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Used {
    /// The addresses in use: excess can be released (never one of these).
    Known(BTreeSet<Ipv4Addr>),
    /// Only how many: the pool grows, but nothing is ever released.
    Count(u32),
}

impl Used {
    pub fn count(&self) -> u32 {
        match self {
            Used::Known(s) => s.len() as u32,
            Used::Count(n) => *n,
        }
    }
}

/// Units withdrawn from the node's pods and waiting to be unassigned (the two-phase release, see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Releasing {
    pub addresses: BTreeSet<Ipv4Addr>,
    pub prefixes: BTreeSet<Ipv4Net>,
    /// The `used` report was made by an agent already serving the pool without these units: whichever of them
    /// it does not hold is free for good.
    pub acknowledged: bool,
}

/// No address (for [`PoolInput::cooling`] when nothing cools down).
pub static NO_ADDRESSES: BTreeSet<Ipv4Addr> = BTreeSet::new();

/// Nothing withdrawn.
pub static NOTHING_RELEASING: Releasing = Releasing {
    addresses: BTreeSet::new(),
    prefixes: BTreeSet::new(),
    acknowledged: false,
};

impl Releasing {
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.prefixes.is_empty()
    }

    /// The pool status's release generation once the withdrawals are `self`, given they were `before` at
    /// `generation`: it moves on when a unit was withdrawn that `before` did not list (unassigned units only
    /// leave), so that an agent's acknowledgement of an older set never counts for a newer one.
    pub fn next_generation(&self, before: &Releasing, generation: u64) -> u64 {
        let withdrew = self.addresses.iter().any(|a| !before.addresses.contains(a))
            || self.prefixes.iter().any(|p| !before.prefixes.contains(p));
        generation + u64::from(withdrew)
    }

    /// `address` is withdrawn (itself, or the prefix it belongs to).
    pub fn covers(&self, address: &Ipv4Addr) -> bool {
        self.addresses.contains(address) || self.prefixes.iter().any(|p| p.contains(address))
    }
}

/// Everything [`plan_pool`] looks at. Times are offsets on one monotonic clock chosen by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolInput<'a> {
    pub limits: PoolLimits,
    pub mode: AddressMode,
    pub targets: Targets,
    /// Every ENI of the node (attached, or created for it and unattached).
    pub enis: &'a [EniView],
    /// Whether the primary ENI (device 0) carries pod addresses (false with a per-zone ENI subnet).
    pub use_primary: bool,
    pub used: &'a Used,
    /// Of the `Used::Known` addresses, those no pod has: cooling down after one. They may be withdrawn (the
    /// agent keeps them out of its pool and reports them held until they have cooled), never unassigned before.
    /// Withdrawing them lets a release empty the highest ENIs rather than whatever happened to be cool.
    pub cooling: &'a BTreeSet<Ipv4Addr>,
    /// What earlier plans withdrew (from the node's pool status), and whether `used` postdates it.
    pub releasing: &'a Releasing,
    pub now: Duration,
    /// When the pool was first seen above its targets (from the previous plan's [`PoolPlan::excess_since`]).
    pub excess_since: Option<Duration>,
    pub release_delay: Duration,
}

/// One step of EC2 work on a node. A node's ops are applied in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum PoolOp {
    /// Attach an ENI already created for the node.
    AttachEni {
        eni: String,
        device_index: u32,
    },
    /// Create an ENI with `units` addresses (or prefixes) and attach it at `device_index`.
    CreateEni {
        device_index: u32,
        units: u32,
    },
    AssignIps {
        eni: String,
        count: u32,
    },
    AssignPrefixes {
        eni: String,
        count: u32,
    },
    /// Unassign withdrawn addresses no pod holds.
    UnassignIps {
        eni: String,
        addresses: Vec<Ipv4Addr>,
    },
    UnassignPrefixes {
        eni: String,
        prefixes: Vec<Ipv4Net>,
    },
    /// Withdraw free addresses from the pods (no EC2 call: the pool status lists them as releasing).
    WithdrawIps {
        eni: String,
        addresses: Vec<Ipv4Addr>,
    },
    WithdrawPrefixes {
        eni: String,
        prefixes: Vec<Ipv4Net>,
    },
    /// Detach an attached secondary ENI that holds no address any more; a later plan deletes it once
    /// `available`.
    DetachEni {
        eni: String,
    },
    /// Delete an unattached ENI of the node that has no device index to go to, or that holds no address.
    DeleteEni {
        eni: String,
    },
}

/// [`plan_pool`]'s answer. `want`, `have` and `high` are pod addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolPlan {
    pub ops: Vec<PoolOp>,
    /// Pool size the targets ask for (capped at what the instance can hold).
    pub want: u32,
    /// Pool size now (attached ENIs that carry pods, withdrawn units left out).
    pub have: u32,
    /// Largest pool size that is not excess.
    pub high: u32,
    /// Carry into the next [`PoolInput::excess_since`].
    pub excess_since: Option<Duration>,
}

impl PoolPlan {
    /// Addresses missing to reach the targets: what orders nodes, largest first.
    pub fn deficit(&self) -> u32 {
        self.want.saturating_sub(self.have)
    }

    /// The pool is between its targets.
    pub fn within_targets(&self) -> bool {
        self.want <= self.have && self.have <= self.high
    }
}

fn div_ceil(a: u32, b: u32) -> u32 {
    if b == 0 { 0 } else { a.div_ceil(b) }
}

/// Units the targets ask for, and the most units that are not excess, before capping.
fn wanted_units(input: &PoolInput<'_>, cap: u32) -> (u32, u32) {
    let t = &input.targets;
    let per_unit = input.mode.addresses_per_unit();
    // Pods on withdrawn units leave with them: they do not count toward the pool's targets.
    let used = match input.used {
        Used::Known(held) => held.iter().filter(|a| !input.releasing.covers(a)).count() as u32,
        Used::Count(n) => *n,
    };
    let slots = input.limits.slots_per_eni().max(1);
    if t.fill_at_join {
        return (cap, cap);
    }
    if t.warm_ip_target.is_some() || t.minimum_ip_target.is_some() {
        let addresses =
            (used + t.warm_ip_target.unwrap_or(0)).max(t.minimum_ip_target.unwrap_or(0));
        let units = div_ceil(addresses, per_unit);
        return (units, units);
    }
    if input.mode == AddressMode::Prefixes
        && let Some(warm) = t.warm_prefix_target
    {
        let units = div_ceil(used, per_unit) + warm;
        return (units, units);
    }
    // Whole ENIs' worth of slots beyond what the used addresses need; excess only past one more whole ENI.
    let needed = div_ceil(used, per_unit);
    let units = div_ceil(needed + t.warm_eni_target * slots, slots) * slots;
    (units, units + slots - 1)
}

/// Plan one node's pool: see the module doc.
pub fn plan_pool(input: &PoolInput<'_>) -> PoolPlan {
    let mode = input.mode;
    let per_unit = mode.addresses_per_unit();
    let slots = input.limits.slots_per_eni();
    let max_enis = input.limits.max_enis;
    let carries = |e: &EniView| {
        e.pods
            && e.device_index
                .is_some_and(|d| d < max_enis && (input.use_primary || d != 0))
    };
    // Nothing can be assigned in a mode the type does not support (prefixes on a non-Nitro type).
    let cap = input.limits.pod_enis(input.use_primary) * input.limits.pod_slots_per_eni(mode);
    let (want_raw, high_raw) = wanted_units(input, cap);
    let want = want_raw.min(cap);
    let high = high_raw.min(cap).max(want);
    let have: u32 = input
        .enis
        .iter()
        .filter(|e| carries(e))
        .map(|e| e.units(mode, input.releasing))
        .sum();

    let mut ops = Vec::new();
    // Phase two of a release first: the slots it frees serve this plan's assigns.
    let freed = match input.used {
        Used::Known(held) if input.releasing.acknowledged => unassign(input, held, &mut ops),
        _ => BTreeMap::new(),
    };
    let mut excess_since = None;
    let mut taken: BTreeSet<u32> = input.enis.iter().filter_map(|e| e.device_index).collect();
    let first_pod_index = if input.use_primary { 0 } else { 1 };
    let free_index = |taken: &mut BTreeSet<u32>| {
        let i = (first_pod_index..max_enis).find(|i| !taken.contains(i))?;
        taken.insert(i);
        Some(i)
    };

    // Unattached ENIs created for this node: attach them where there is room, delete the others. One without
    // any address was detached after its addresses were released (a create always carries some): deleted.
    let mut adopted = Vec::new();
    for e in input
        .enis
        .iter()
        .filter(|e| e.device_index.is_none() && e.pods)
    {
        if e.slots_taken() == 0 {
            ops.push(PoolOp::DeleteEni { eni: e.id.clone() });
            continue;
        }
        match free_index(&mut taken) {
            Some(device_index) => {
                ops.push(PoolOp::AttachEni {
                    eni: e.id.clone(),
                    device_index,
                });
                adopted.push(EniView {
                    device_index: Some(device_index),
                    ..e.clone()
                });
            }
            None => ops.push(PoolOp::DeleteEni { eni: e.id.clone() }),
        }
    }
    let have_after_adopt = have
        + adopted
            .iter()
            .map(|e| e.units(mode, input.releasing))
            .sum::<u32>();

    if have_after_adopt < want {
        let mut missing = want - have_after_adopt;
        let mut enis: Vec<&EniView> = input
            .enis
            .iter()
            .filter(|e| carries(e))
            .chain(adopted.iter())
            .collect();
        enis.sort_by_key(|e| e.device_index);
        for e in enis {
            if missing == 0 {
                break;
            }
            let free =
                (slots + freed.get(&e.id).copied().unwrap_or(0)).saturating_sub(e.slots_taken());
            let n = free.min(missing);
            if n > 0 {
                ops.push(match mode {
                    AddressMode::SecondaryIps => PoolOp::AssignIps {
                        eni: e.id.clone(),
                        count: n,
                    },
                    AddressMode::Prefixes => PoolOp::AssignPrefixes {
                        eni: e.id.clone(),
                        count: n,
                    },
                });
                missing -= n;
            }
        }
        while missing > 0 && slots > 0 {
            let Some(device_index) = free_index(&mut taken) else {
                break;
            };
            let n = slots.min(missing);
            ops.push(PoolOp::CreateEni {
                device_index,
                units: n,
            });
            missing -= n;
        }
    } else if have_after_adopt > high
        && let Used::Known(used) = input.used
    {
        let since = input.excess_since.unwrap_or(input.now);
        if input.now.saturating_sub(since) >= input.release_delay {
            // Never the last unit: the agent serves no empty pool, so it could not acknowledge that withdrawal.
            let keep = want.max(1);
            withdraw(
                input,
                used,
                have_after_adopt.saturating_sub(keep),
                &adopted,
                &mut ops,
            );
        } else {
            excess_since = Some(since);
        }
    }

    // Emptied secondary ENIs go when the pool needs no growth: their device index and the account's ENI quota
    // come back (a later growth creates a fresh ENI, as amazon-vpc-cni frees ENIs beyond its warm target).
    if have_after_adopt >= want {
        for e in input
            .enis
            .iter()
            .filter(|e| carries(e) && e.device_index != Some(0) && e.slots_taken() == 0)
        {
            ops.push(PoolOp::DetachEni { eni: e.id.clone() });
        }
    }

    PoolPlan {
        ops,
        want: want * per_unit,
        have: have * per_unit,
        high: high * per_unit,
        excess_since,
    }
}

/// Phase two: unassign every withdrawn unit of an attached ENI that `held` (acknowledged) does not hold.
/// Returns the slots freed per ENI.
fn unassign(
    input: &PoolInput<'_>,
    held: &BTreeSet<Ipv4Addr>,
    ops: &mut Vec<PoolOp>,
) -> BTreeMap<String, u32> {
    let mut freed = BTreeMap::new();
    let r = input.releasing;
    for e in input
        .enis
        .iter()
        .filter(|e| e.pods && e.device_index.is_some())
    {
        let addresses: Vec<Ipv4Addr> = e
            .addresses
            .iter()
            .filter(|a| r.addresses.contains(a) && !held.contains(a))
            .copied()
            .collect();
        let prefixes: Vec<Ipv4Net> = e
            .prefixes
            .iter()
            .filter(|p| r.prefixes.contains(p) && !held.iter().any(|a| p.contains(a)))
            .copied()
            .collect();
        let n = (addresses.len() + prefixes.len()) as u32;
        if !addresses.is_empty() {
            ops.push(PoolOp::UnassignIps {
                eni: e.id.clone(),
                addresses,
            });
        }
        if !prefixes.is_empty() {
            ops.push(PoolOp::UnassignPrefixes {
                eni: e.id.clone(),
                prefixes,
            });
        }
        if n > 0 {
            freed.insert(e.id.clone(), n);
        }
    }
    freed
}

/// Phase one: withdraw up to `excess` units no pod has (by the last report; cooling ones included), from the
/// highest device index down.
fn withdraw(
    input: &PoolInput<'_>,
    used: &BTreeSet<Ipv4Addr>,
    mut excess: u32,
    adopted: &[EniView],
    ops: &mut Vec<PoolOp>,
) {
    let max_enis = input.limits.max_enis;
    let r = input.releasing;
    let allocated = |a: &Ipv4Addr| used.contains(a) && !input.cooling.contains(a);
    let mut enis: Vec<&EniView> = input
        .enis
        .iter()
        .filter(|e| {
            e.pods
                && e.device_index
                    .is_some_and(|d| d < max_enis && (input.use_primary || d != 0))
        })
        .chain(adopted.iter())
        .collect();
    enis.sort_by_key(|e| std::cmp::Reverse(e.device_index));
    for e in enis {
        if excess == 0 {
            break;
        }
        match input.mode {
            AddressMode::SecondaryIps => {
                let free: Vec<Ipv4Addr> = e
                    .addresses
                    .iter()
                    .rev()
                    .filter(|a| !allocated(a) && !r.addresses.contains(a))
                    .take(excess as usize)
                    .copied()
                    .collect();
                if !free.is_empty() {
                    excess -= free.len() as u32;
                    ops.push(PoolOp::WithdrawIps {
                        eni: e.id.clone(),
                        addresses: free,
                    });
                }
            }
            AddressMode::Prefixes => {
                let free: Vec<Ipv4Net> = e
                    .prefixes
                    .iter()
                    .rev()
                    .filter(|p| {
                        !r.prefixes.contains(p)
                            && !used.iter().any(|a| allocated(a) && p.contains(a))
                    })
                    .take(excess as usize)
                    .copied()
                    .collect();
                if !free.is_empty() {
                    excess -= free.len() as u32;
                    ops.push(PoolOp::WithdrawPrefixes {
                        eni: e.id.clone(),
                        prefixes: free,
                    });
                }
            }
        }
    }
}

/// A joining node's first addresses, given instead through a new ENI that carries them from its creation
/// (CreateNetworkInterface with a count of secondary addresses or prefixes, then AttachNetworkInterface): the
/// same pool, drawn from other EC2 buckets than AssignPrivateIpAddresses. `Some` only when `ops` is that node's
/// first growth — one count assign onto an ENI at device index 0, the node's only ENI, which holds no pod
/// addresses yet — and the new ENI stays within the type's per-ENI limit (EC2 refuses to attach an ENI that
/// holds more addresses than the type allows per interface) and the type takes a second ENI.
pub fn first_growth_by_create(
    ops: &[PoolOp],
    enis: &[EniView],
    limits: &PoolLimits,
) -> Option<Vec<PoolOp>> {
    let [op] = ops else {
        return None;
    };
    let (eni, units) = match op {
        PoolOp::AssignIps { eni, count } | PoolOp::AssignPrefixes { eni, count } => (eni, *count),
        _ => return None,
    };
    let [only] = enis else {
        return None;
    };
    let joining = only.id == *eni
        && only.device_index == Some(0)
        && only.addresses.is_empty()
        && only.prefixes.is_empty();
    (joining && limits.max_enis >= 2 && units >= 1 && units <= limits.slots_per_eni()).then(|| {
        vec![PoolOp::CreateEni {
            device_index: 1,
            units,
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance_types::lookup;
    use proptest::prelude::*;

    fn limits(name: &str) -> PoolLimits {
        PoolLimits::from(lookup(name).unwrap())
    }

    fn mk_eni(id: &str, device: Option<u32>, addresses: &[u32]) -> EniView {
        EniView {
            id: id.into(),
            device_index: device,
            addresses: addresses
                .iter()
                .map(|n| Ipv4Addr::from(0xc612_0000 + n))
                .collect(),
            prefixes: Vec::new(),
            pods: true,
        }
    }

    fn mk_input<'a>(
        limits: PoolLimits,
        mode: AddressMode,
        targets: Targets,
        enis: &'a [EniView],
        used: &'a Used,
    ) -> PoolInput<'a> {
        PoolInput {
            limits,
            mode,
            targets,
            enis,
            use_primary: true,
            used,
            cooling: &NO_ADDRESSES,
            releasing: &NOTHING_RELEASING,
            now: Duration::from_secs(1000),
            excess_since: None,
            release_delay: Duration::from_secs(30),
        }
    }

    #[test]
    fn max_pods_of_m5_large_are_29_and_110() {
        let l = limits("m5.large");
        assert_eq!(max_pods(&l, AddressMode::SecondaryIps, true), 29);
        assert_eq!(max_pods(&l, AddressMode::Prefixes, true), 110);
        // Custom networking: one ENI fewer.
        assert_eq!(max_pods(&l, AddressMode::SecondaryIps, false), 20);
        assert_eq!(
            max_pods(&limits("t3.medium"), AddressMode::SecondaryIps, true),
            17
        );
        // Over 30 vCPUs the cap is 250.
        assert_eq!(
            max_pods(&limits("m5.24xlarge"), AddressMode::SecondaryIps, true),
            250
        );
        assert_eq!(
            max_pods(&limits("m5.24xlarge"), AddressMode::Prefixes, true),
            250
        );
        assert_eq!(
            max_pods(&limits("c6g.medium"), AddressMode::Prefixes, true),
            2 * 3 * 16 + 2
        );
    }

    #[test]
    fn prefix_mode_on_a_non_nitro_type_has_no_pod_slots() {
        let c4 = limits("c4.large");
        assert!(!c4.supports(AddressMode::Prefixes) && c4.supports(AddressMode::SecondaryIps));
        assert_eq!(max_pods(&c4, AddressMode::SecondaryIps, true), 29);
        assert_eq!(max_pods(&c4, AddressMode::Prefixes, true), 2);
        let enis = [mk_eni("eni-p", Some(0), &[])];
        let used = Used::Count(20);
        let targets = Targets {
            warm_prefix_target: Some(1),
            ..Targets::default()
        };
        let plan = plan_pool(&mk_input(c4, AddressMode::Prefixes, targets, &enis, &used));
        assert_eq!(plan.ops, Vec::new(), "{plan:?}");
        assert_eq!(plan.want, 0);
        // The same node on a Nitro type of the same size gets its prefixes.
        let plan = plan_pool(&mk_input(
            limits("c5.large"),
            AddressMode::Prefixes,
            targets,
            &enis,
            &used,
        ));
        assert!(!plan.ops.is_empty());
    }

    #[test]
    fn a_new_m5_large_fills_its_primary_eni_by_default() {
        let enis = [mk_eni("eni-p", Some(0), &[])];
        let used = Used::Count(0);
        let plan = plan_pool(&mk_input(
            limits("m5.large"),
            AddressMode::SecondaryIps,
            Targets::default(),
            &enis,
            &used,
        ));
        assert_eq!(
            plan.ops,
            vec![PoolOp::AssignIps {
                eni: "eni-p".into(),
                count: 9
            }]
        );
        assert_eq!((plan.want, plan.have, plan.high), (9, 0, 17));
        assert_eq!(plan.deficit(), 9);
    }

    #[test]
    fn fill_at_join_creates_every_eni_in_batches_of_its_slots() {
        let enis = [mk_eni("eni-p", Some(0), &[1, 2])];
        let used = Used::Count(0);
        let targets = Targets {
            fill_at_join: true,
            ..Targets::default()
        };
        let plan = plan_pool(&mk_input(
            limits("m5.large"),
            AddressMode::SecondaryIps,
            targets,
            &enis,
            &used,
        ));
        assert_eq!(
            plan.ops,
            vec![
                PoolOp::AssignIps {
                    eni: "eni-p".into(),
                    count: 7
                },
                PoolOp::CreateEni {
                    device_index: 1,
                    units: 9
                },
                PoolOp::CreateEni {
                    device_index: 2,
                    units: 9
                },
            ]
        );
        assert_eq!(plan.want, 27);
    }

    #[test]
    fn prefix_mode_with_warm_prefix_target() {
        let enis = [mk_eni("eni-p", Some(0), &[])];
        let used = Used::Count(20);
        let targets = Targets {
            warm_prefix_target: Some(1),
            ..Targets::default()
        };
        let plan = plan_pool(&mk_input(
            limits("m5.large"),
            AddressMode::Prefixes,
            targets,
            &enis,
            &used,
        ));
        // 20 used need 2 prefixes, plus one warm.
        assert_eq!(
            plan.ops,
            vec![PoolOp::AssignPrefixes {
                eni: "eni-p".into(),
                count: 3
            }]
        );
        assert_eq!(plan.want, 48);
    }

    #[test]
    fn an_unattached_eni_of_the_node_is_attached_not_recreated() {
        let enis = [
            mk_eni("eni-p", Some(0), &[1, 2, 3, 4, 5, 6, 7, 8, 9]),
            mk_eni("eni-orphan", None, &[10, 11, 12]),
        ];
        let used = Used::Count(9);
        let plan = plan_pool(&mk_input(
            limits("m5.large"),
            AddressMode::SecondaryIps,
            Targets::default(),
            &enis,
            &used,
        ));
        assert_eq!(
            plan.ops,
            vec![
                PoolOp::AttachEni {
                    eni: "eni-orphan".into(),
                    device_index: 1
                },
                PoolOp::AssignIps {
                    eni: "eni-orphan".into(),
                    count: 6
                },
            ]
        );
    }

    #[test]
    fn an_eni_underlay_does_not_own_keeps_its_device_index_and_gets_no_addresses() {
        let enis = [
            mk_eni("eni-p", Some(0), &[1, 2, 3, 4, 5, 6, 7, 8, 9]),
            EniView {
                pods: false,
                ..mk_eni("eni-foreign", Some(1), &[])
            },
        ];
        let used = Used::Count(9);
        let plan = plan_pool(&mk_input(
            limits("m5.large"),
            AddressMode::SecondaryIps,
            Targets::default(),
            &enis,
            &used,
        ));
        assert_eq!(
            plan.ops,
            vec![PoolOp::CreateEni {
                device_index: 2,
                units: 9
            }]
        );
        // A full primary ENI and one warm ENI.
        assert_eq!(plan.want, 18);
    }

    #[test]
    fn excess_is_withdrawn_after_the_release_delay_and_unassigned_once_acknowledged() {
        let enis = [
            mk_eni("eni-p", Some(0), &[1, 2, 3, 4, 5, 6, 7, 8, 9]),
            mk_eni("eni-1", Some(1), &[11, 12, 13, 14, 15, 16, 17, 18, 19]),
        ];
        let ip = |n: u32| Ipv4Addr::from(0xc612_0000 + n);
        let in_use: BTreeSet<Ipv4Addr> = [1u32, 18].into_iter().map(ip).collect();
        let used = Used::Known(in_use.clone());
        let targets = Targets {
            warm_ip_target: Some(2),
            minimum_ip_target: Some(4),
            ..Targets::default()
        };
        let mut input = mk_input(
            limits("m5.large"),
            AddressMode::SecondaryIps,
            targets,
            &enis,
            &used,
        );
        let first = plan_pool(&input);
        assert!(first.ops.is_empty());
        assert_eq!(first.excess_since, Some(input.now));
        input.excess_since = first.excess_since;
        input.now += Duration::from_secs(29);
        assert!(plan_pool(&input).ops.is_empty());
        input.now += Duration::from_secs(1);

        // Phase one: 14 free addresses withdrawn (18 assigned, 4 wanted), none a pod holds; no EC2 call.
        let plan = plan_pool(&input);
        let withdrawn: BTreeSet<Ipv4Addr> = plan
            .ops
            .iter()
            .flat_map(|op| match op {
                PoolOp::WithdrawIps { addresses, .. } => addresses.clone(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(withdrawn.len(), 14);
        assert!(withdrawn.iter().all(|a| !in_use.contains(a)));

        // Withdrawn, not yet acknowledged: they no longer count, and nothing is unassigned or withdrawn again.
        let releasing = Releasing {
            addresses: withdrawn.clone(),
            ..Releasing::default()
        };
        input.releasing = &releasing;
        input.excess_since = plan.excess_since;
        let waiting = plan_pool(&input);
        assert_eq!(waiting.have, 4);
        assert!(waiting.ops.is_empty(), "{waiting:?}");

        // Phase two: acknowledged, and a pod got one of them just before the agent stopped handing them out:
        // every other withdrawn address is unassigned, that one waits.
        let late = *withdrawn.iter().next().unwrap();
        let mut holding = in_use.clone();
        holding.insert(late);
        let holding = Used::Known(holding);
        let acknowledged = Releasing {
            acknowledged: true,
            ..releasing.clone()
        };
        let input = PoolInput {
            used: &holding,
            releasing: &acknowledged,
            ..input
        };
        let plan = plan_pool(&input);
        let unassigned: BTreeSet<Ipv4Addr> = plan
            .ops
            .iter()
            .flat_map(|op| match op {
                PoolOp::UnassignIps { addresses, .. } => addresses.clone(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        let mut expected = withdrawn.clone();
        expected.remove(&late);
        assert_eq!(unassigned, expected);

        // The same report, not acknowledged: nothing is unassigned.
        let input = PoolInput {
            releasing: &releasing,
            ..input
        };
        assert!(plan_pool(&input).ops.is_empty());

        // With only a count, nothing is withdrawn.
        let count = Used::Count(2);
        let input = PoolInput {
            used: &count,
            cooling: &NO_ADDRESSES,
            releasing: &NOTHING_RELEASING,
            excess_since: Some(Duration::ZERO),
            ..input
        };
        assert!(plan_pool(&input).ops.is_empty());
    }

    #[test]
    fn cooling_addresses_are_withdrawn_to_empty_the_highest_eni_but_unassigned_only_once_cool() {
        // One pod on the primary; ENI 1's addresses all just left their pods, two of them still cool down.
        let ip = |n: u32| Ipv4Addr::from(0xc612_0000 + n);
        let enis = [
            mk_eni("eni-p", Some(0), &[1, 2, 3, 4, 5, 6, 7, 8, 9]),
            mk_eni("eni-1", Some(1), &[11, 12, 13]),
        ];
        let cooling: BTreeSet<Ipv4Addr> = [12u32, 13].into_iter().map(ip).collect();
        let mut held = cooling.clone();
        held.insert(ip(1));
        let used = Used::Known(held);
        let targets = Targets {
            warm_ip_target: Some(2),
            minimum_ip_target: Some(9),
            ..Targets::default()
        };
        let mut input = mk_input(
            limits("m5.large"),
            AddressMode::SecondaryIps,
            targets,
            &enis,
            &used,
        );
        input.cooling = &cooling;
        input.excess_since = Some(Duration::ZERO);
        // 12 assigned, 9 wanted: the three of ENI 1 go, cooling or not (not three of the primary's).
        let plan = plan_pool(&input);
        assert_eq!(
            plan.ops,
            vec![PoolOp::WithdrawIps {
                eni: "eni-1".into(),
                addresses: vec![ip(13), ip(12), ip(11)],
            }]
        );
        // Acknowledged while two still cool: only the cool one is unassigned.
        let releasing = Releasing {
            addresses: [11u32, 12, 13].into_iter().map(ip).collect(),
            prefixes: BTreeSet::new(),
            acknowledged: true,
        };
        let input = PoolInput {
            releasing: &releasing,
            ..input
        };
        assert_eq!(
            plan_pool(&input).ops,
            vec![PoolOp::UnassignIps {
                eni: "eni-1".into(),
                addresses: vec![ip(11)],
            }]
        );
    }

    #[test]
    fn the_release_generation_moves_only_when_something_new_is_withdrawn() {
        let ip = |n: u32| Ipv4Addr::from(0xc612_0000 + n);
        let before = Releasing {
            addresses: [1u32, 2].into_iter().map(ip).collect(),
            ..Releasing::default()
        };
        // Unassigned ones left: same generation.
        let fewer = Releasing {
            addresses: [2u32].into_iter().map(ip).collect(),
            ..Releasing::default()
        };
        assert_eq!(fewer.next_generation(&before, 7), 7);
        assert_eq!(before.next_generation(&before, 7), 7);
        // One more withdrawn (even as others left): the next generation.
        let other = Releasing {
            addresses: [2u32, 3].into_iter().map(ip).collect(),
            ..Releasing::default()
        };
        assert_eq!(other.next_generation(&before, 7), 8);
        let prefix = Releasing {
            prefixes: ["100.64.0.16/28".parse().unwrap()].into_iter().collect(),
            ..Releasing::default()
        };
        assert_eq!(prefix.next_generation(&Releasing::default(), 0), 1);
    }

    #[test]
    fn the_last_address_is_never_withdrawn() {
        // No pods and targets that ask for nothing: everything but one address goes.
        let enis = [mk_eni("eni-p", Some(0), &[1, 2, 3, 4])];
        let used = Used::Known(BTreeSet::new());
        let targets = Targets {
            warm_ip_target: Some(0),
            minimum_ip_target: Some(0),
            ..Targets::default()
        };
        let mut input = mk_input(
            limits("m5.large"),
            AddressMode::SecondaryIps,
            targets,
            &enis,
            &used,
        );
        input.excess_since = Some(Duration::ZERO);
        let plan = plan_pool(&input);
        assert_eq!(
            plan.ops,
            vec![PoolOp::WithdrawIps {
                eni: "eni-p".into(),
                addresses: [4u32, 3, 2]
                    .into_iter()
                    .map(|n| Ipv4Addr::from(0xc612_0000 + n))
                    .collect(),
            }]
        );
    }

    #[test]
    fn an_emptied_eni_is_detached_then_deleted_unless_the_pool_must_grow() {
        let targets = Targets {
            warm_ip_target: Some(2),
            ..Targets::default()
        };
        let used = Used::Known(BTreeSet::new());
        // ENI 1 lost its last addresses to a release: detached (never the primary, empty as it may be).
        let enis = [
            mk_eni("eni-p", Some(0), &[1, 2, 3]),
            mk_eni("eni-1", Some(1), &[]),
        ];
        let input = mk_input(
            limits("m5.large"),
            AddressMode::SecondaryIps,
            targets,
            &enis,
            &used,
        );
        assert_eq!(
            plan_pool(&input).ops,
            vec![PoolOp::DetachEni {
                eni: "eni-1".into()
            }]
        );
        // Once detached (available, still tagged for the node), it is deleted, not attached again.
        let detached = [
            mk_eni("eni-p", Some(0), &[1, 2, 3]),
            mk_eni("eni-1", None, &[]),
        ];
        let input = PoolInput {
            enis: &detached,
            ..input
        };
        assert_eq!(
            plan_pool(&input).ops,
            vec![PoolOp::DeleteEni {
                eni: "eni-1".into()
            }]
        );
        // Pods need more than the primary holds: the empty ENI is filled, not detached.
        let busy = Used::Known(
            [1u32, 2, 3]
                .into_iter()
                .map(|n| Ipv4Addr::from(0xc612_0000 + n))
                .collect(),
        );
        let input = PoolInput {
            enis: &enis,
            used: &busy,
            ..input
        };
        assert_eq!(
            plan_pool(&input).ops,
            vec![PoolOp::AssignIps {
                eni: "eni-p".into(),
                count: 2
            }]
        );
    }

    #[test]
    fn slots_freed_by_an_unassign_serve_the_same_plans_assigns() {
        // A full ENI (9 of 9 slots) with 5 withdrawn addresses, acknowledged and free; the pods now need more
        // than the 4 left: the unassigns come first and the assign reuses their slots.
        let enis = [mk_eni("eni-p", Some(0), &[1, 2, 3, 4, 5, 6, 7, 8, 9])];
        let ip = |n: u32| Ipv4Addr::from(0xc612_0000 + n);
        let releasing = Releasing {
            addresses: [5u32, 6, 7, 8, 9].into_iter().map(ip).collect(),
            prefixes: BTreeSet::new(),
            acknowledged: true,
        };
        let used = Used::Known([1u32, 2, 3].into_iter().map(ip).collect());
        let targets = Targets {
            warm_ip_target: Some(3),
            ..Targets::default()
        };
        let limits = PoolLimits {
            max_enis: 1,
            ipv4_per_eni: 10,
            vcpus: 2,
            prefix_delegation: true,
        };
        let mut input = mk_input(limits, AddressMode::SecondaryIps, targets, &enis, &used);
        input.releasing = &releasing;
        let plan = plan_pool(&input);
        assert_eq!(plan.have, 4);
        assert_eq!(plan.want, 6);
        assert_eq!(
            plan.ops,
            vec![
                PoolOp::UnassignIps {
                    eni: "eni-p".into(),
                    addresses: releasing.addresses.iter().copied().collect(),
                },
                PoolOp::AssignIps {
                    eni: "eni-p".into(),
                    count: 2,
                },
            ]
        );
    }

    // ---- properties --------------------------------------------------------------------------------------

    /// Apply a plan the way EC2 would, handing out fresh addresses.
    fn apply(enis: &mut Vec<EniView>, ops: &[PoolOp], next: &mut u32, limits: &PoolLimits) {
        let mut fresh_ips = |n: u32| -> Vec<Ipv4Addr> {
            (0..n)
                .map(|_| {
                    *next += 1;
                    Ipv4Addr::from(0x0a00_0000 + *next)
                })
                .collect()
        };
        for op in ops {
            match op {
                PoolOp::AttachEni { eni, device_index } => {
                    let e = enis.iter_mut().find(|e| &e.id == eni).unwrap();
                    e.device_index = Some(*device_index);
                }
                PoolOp::CreateEni {
                    device_index,
                    units,
                } => {
                    // Units land as addresses; the caller turns them into prefixes in prefix mode.
                    let addresses = fresh_ips(*units);
                    enis.push(EniView {
                        id: format!("eni-{device_index}-{}", u32::from(addresses[0])),
                        device_index: Some(*device_index),
                        addresses,
                        prefixes: Vec::new(),
                        pods: true,
                    });
                }
                PoolOp::AssignIps { eni, count } => {
                    let ips = fresh_ips(*count);
                    enis.iter_mut()
                        .find(|e| &e.id == eni)
                        .unwrap()
                        .addresses
                        .extend(ips);
                }
                PoolOp::AssignPrefixes { eni, count } => {
                    let ps: Vec<Ipv4Net> = fresh_ips(*count)
                        .into_iter()
                        .map(|a| Ipv4Net::new(Ipv4Addr::from(u32::from(a) << 4), 28).unwrap())
                        .collect();
                    enis.iter_mut()
                        .find(|e| &e.id == eni)
                        .unwrap()
                        .prefixes
                        .extend(ps);
                }
                PoolOp::UnassignIps { eni, addresses } => {
                    let e = enis.iter_mut().find(|e| &e.id == eni).unwrap();
                    for a in addresses {
                        assert!(e.addresses.contains(a), "unassigning {a} the ENI lacks");
                    }
                    e.addresses.retain(|a| !addresses.contains(a));
                }
                PoolOp::UnassignPrefixes { eni, prefixes } => {
                    let e = enis.iter_mut().find(|e| &e.id == eni).unwrap();
                    e.prefixes.retain(|p| !prefixes.contains(p));
                }
                PoolOp::DeleteEni { eni } => enis.retain(|e| &e.id != eni),
                PoolOp::DetachEni { eni } => {
                    let e = enis.iter_mut().find(|e| &e.id == eni).unwrap();
                    assert!(
                        e.slots_taken() == 0 && e.device_index != Some(0),
                        "detaching {e:?}"
                    );
                    e.device_index = None;
                }
                PoolOp::WithdrawIps { .. } | PoolOp::WithdrawPrefixes { .. } => {}
            }
        }
        for e in enis.iter() {
            assert!(
                e.slots_taken() <= limits.slots_per_eni(),
                "ENI {} over its slots",
                e.id
            );
        }
        let attached: Vec<u32> = enis.iter().filter_map(|e| e.device_index).collect();
        let unique: BTreeSet<u32> = attached.iter().copied().collect();
        assert_eq!(unique.len(), attached.len(), "two ENIs on one device index");
        assert!(attached.iter().all(|d| *d < limits.max_enis));
    }

    fn arb_targets() -> impl Strategy<Value = Targets> {
        (
            prop::option::of(0u32..40),
            prop::option::of(0u32..60),
            prop::option::of(0u32..4),
            0u32..3,
            prop::bool::weighted(0.15),
        )
            .prop_map(|(w, m, p, e, f)| Targets {
                warm_ip_target: w,
                minimum_ip_target: m,
                warm_prefix_target: p,
                warm_eni_target: e,
                fill_at_join: f,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn plans_keep_limits_reach_targets_and_never_release_used_addresses(
            type_index in 0..crate::instance_types::INSTANCE_TYPES.len(),
            prefixes in any::<bool>(),
            use_primary in any::<bool>(),
            targets in arb_targets(),
            used_steps in prop::collection::vec(0u32..400, 1..5),
            orphans in 0usize..3,
            pick in any::<u64>(),
        ) {
            let t = &crate::instance_types::INSTANCE_TYPES[type_index];
            let limits = PoolLimits::from(t);
            let mode = if prefixes && t.nitro { AddressMode::Prefixes } else { AddressMode::SecondaryIps };
            let mut next = 0u32;
            let mut enis = vec![EniView { id: "eni-primary".into(), device_index: Some(0), addresses: vec![], prefixes: vec![], pods: true }];
            for i in 0..orphans {
                enis.push(EniView { id: format!("eni-orphan-{i}"), device_index: None, addresses: vec![], prefixes: vec![], pods: true });
            }
            let release_delay = Duration::from_secs(30);
            let mut now = Duration::ZERO;
            // The agent, modelled exactly: it serves the pool without withdrawn units and its report is current
            // (acknowledged); the release's safety under stale reports is the unit tests'.
            let mut releasing = Releasing { acknowledged: true, ..Releasing::default() };
            for used_target in used_steps {
                // Pods take up to `used_target` of the pool's addresses, a pseudo-random subset.
                let pool: Vec<Ipv4Addr> = enis.iter()
                    .filter(|e| e.device_index.is_some_and(|d| use_primary || d != 0))
                    .flat_map(|e| match mode {
                        AddressMode::SecondaryIps => e.addresses.clone(),
                        AddressMode::Prefixes => e.prefixes.iter().flat_map(|p| p.hosts().chain([p.network(), p.broadcast()])).collect(),
                    })
                    .filter(|a| !releasing.covers(a))
                    .collect();
                let mut used_set = BTreeSet::new();
                for (i, a) in pool.iter().enumerate() {
                    if (used_set.len() as u32) < used_target && (pick.rotate_left(i as u32 % 64) & 1 == 0 || pool.len() as u32 <= used_target) {
                        used_set.insert(*a);
                    }
                }
                let used = Used::Known(used_set.clone());
                // Plan twice (the second after the release delay), applying each plan.
                let mut excess_since = None;
                let mut last = None;
                for _ in 0..6 {
                    let input = PoolInput { limits, mode, targets, enis: &enis, use_primary, used: &used, cooling: &NO_ADDRESSES, releasing: &releasing, now, excess_since, release_delay };
                    let plan = plan_pool(&input);
                    for op in &plan.ops {
                        match op {
                            PoolOp::UnassignIps { addresses, .. } => prop_assert!(addresses.iter().all(|a| !used_set.contains(a) && releasing.addresses.contains(a))),
                            PoolOp::UnassignPrefixes { prefixes, .. } => prop_assert!(prefixes.iter().all(|p| !used_set.iter().any(|a| p.contains(a)) && releasing.prefixes.contains(p))),
                            PoolOp::WithdrawIps { addresses, .. } => {
                                prop_assert!(addresses.iter().all(|a| !used_set.contains(a) && !releasing.addresses.contains(a)));
                                releasing.addresses.extend(addresses.iter().copied());
                            }
                            PoolOp::WithdrawPrefixes { prefixes, .. } => {
                                prop_assert!(prefixes.iter().all(|p| !used_set.iter().any(|a| p.contains(a)) && !releasing.prefixes.contains(p)));
                                releasing.prefixes.extend(prefixes.iter().copied());
                            }
                            PoolOp::CreateEni { units, .. } | PoolOp::AssignIps { count: units, .. } | PoolOp::AssignPrefixes { count: units, .. } => {
                                prop_assert!(*units >= 1 && *units <= limits.slots_per_eni());
                            }
                            _ => {}
                        }
                    }
                    let mut after = enis.clone();
                    apply(&mut after, &plan.ops, &mut next, &limits);
                    if mode == AddressMode::Prefixes {
                        // `apply` models CreateEni with addresses; in prefix mode they are prefixes.
                        for e in after.iter_mut().filter(|e| !enis.iter().any(|o| o.id == e.id)) {
                            e.prefixes = e.addresses.drain(..).map(|a| Ipv4Net::new(Ipv4Addr::from(u32::from(a) << 4), 28).unwrap()).collect();
                        }
                    }
                    enis = after;
                    // Unassigned units leave the releasing set with the ENI's addresses.
                    let assigned: BTreeSet<Ipv4Addr> = enis.iter().flat_map(|e| e.addresses.iter().copied()).collect();
                    let assigned_prefixes: BTreeSet<Ipv4Net> = enis.iter().flat_map(|e| e.prefixes.iter().copied()).collect();
                    releasing.addresses.retain(|a| assigned.contains(a));
                    releasing.prefixes.retain(|p| assigned_prefixes.contains(p));
                    excess_since = plan.excess_since;
                    now += release_delay;
                    last = Some(plan);
                }
                let final_plan = plan_pool(&PoolInput { limits, mode, targets, enis: &enis, use_primary, used: &used, cooling: &NO_ADDRESSES, releasing: &releasing, now, excess_since, release_delay });
                let _ = last;
                prop_assert!(releasing.is_empty(), "withdrawn but never unassigned: {:?}", releasing);
                // Converged: nothing left to do, and the pool is between its targets, except that prefixes
                // holding a used address cannot be released.
                prop_assert!(final_plan.ops.is_empty(), "not converged: {:?}", final_plan);
                prop_assert!(final_plan.have >= final_plan.want);
                let pinned: u32 = match mode {
                    AddressMode::SecondaryIps => used_set.len() as u32,
                    AddressMode::Prefixes => enis.iter()
                        .filter(|e| e.device_index.is_some_and(|d| use_primary || d != 0))
                        .flat_map(|e| e.prefixes.iter())
                        .filter(|p| used_set.iter().any(|a| p.contains(a)))
                        .count() as u32 * PREFIX_ADDRESSES,
                };
                // The last unit is never withdrawn.
                prop_assert!(final_plan.have <= final_plan.high.max(pinned).max(mode.addresses_per_unit()), "above targets: {:?}", final_plan);
                prop_assert!(enis.iter().all(|e| e.device_index.is_some()), "an orphan left unattached");
                prop_assert!(enis.len() as u32 <= limits.max_enis);
            }
        }
    }

    #[test]
    fn a_joining_nodes_first_assign_can_become_an_eni_created_with_its_addresses() {
        let limits = PoolLimits {
            max_enis: 3,
            ipv4_per_eni: 10,
            vcpus: 2,
            prefix_delegation: true,
        };
        let primary = EniView {
            id: "eni-p".into(),
            device_index: Some(0),
            addresses: Vec::new(),
            prefixes: Vec::new(),
            pods: true,
        };
        let assign = |count| {
            vec![PoolOp::AssignIps {
                eni: "eni-p".into(),
                count,
            }]
        };
        assert_eq!(
            first_growth_by_create(&assign(9), std::slice::from_ref(&primary), &limits),
            Some(vec![PoolOp::CreateEni {
                device_index: 1,
                units: 9
            }])
        );
        // More than one ENI holds: attach would fail with PrivateIpAddressLimitExceeded.
        assert_eq!(
            first_growth_by_create(&assign(10), std::slice::from_ref(&primary), &limits),
            None
        );
        // Not a first growth: the primary already holds pod addresses, or another ENI exists.
        let mut grown = primary.clone();
        grown.addresses.push(Ipv4Addr::new(198, 18, 0, 9));
        assert_eq!(first_growth_by_create(&assign(3), &[grown], &limits), None);
        let other = EniView {
            id: "eni-1".into(),
            device_index: Some(1),
            ..primary.clone()
        };
        assert_eq!(
            first_growth_by_create(&assign(3), &[primary.clone(), other], &limits),
            None
        );
        // A type with one ENI only, or a plan that is not a single assign, stays as it is.
        let single = PoolLimits {
            max_enis: 1,
            ..limits
        };
        assert_eq!(
            first_growth_by_create(&assign(3), std::slice::from_ref(&primary), &single),
            None
        );
        let two = [assign(1), assign(1)].concat();
        assert_eq!(
            first_growth_by_create(&two, std::slice::from_ref(&primary), &limits),
            None
        );
    }
}
