//! The node's pod address allocator: pure, with time passed in.
//!
//! ```text
//!            allocate(key)                release(key) / gc(valid)
//!   free ───────────────────► allocated ──────────────────────────► cooling (until now + cooldown)
//!    ▲                                                                   │
//!    └──────────────────────────── deadline passed ◄────────────────────┘
//! ```
//!
//! - The pool is either a block (every address of it is usable: pods get /32 routes, so the block has no
//!   on-link network or broadcast address to reserve) or a list of addresses each tied to an egress
//!   interface and route table (`eni` mode).
//! - Allocations are keyed by the CNI attachment (container id, interface name); allocating an existing key
//!   returns its address unchanged, so a retried ADD is harmless.
//! - A released address cools down before reuse (conntrack entries and stale endpoints die first). Free
//!   addresses are handed out round-robin from a cursor, so the most recently freed address is also the
//!   last to come back.
//! - [`Ipam::snapshot`] / [`Ipam::restore`] move the state to and from plain serde data; the agent
//!   checkpoints it. Restore refuses state that holds an address twice.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Default time a released address waits before reuse, so that conntrack entries and stale Service
/// endpoints of the old pod are gone before a new pod answers on the address. Configurable in the agent.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(60);

/// Largest block a node pool may be (65,536 addresses).
pub const MIN_BLOCK_PREFIX: u8 = 16;

/// Longest interface name Linux accepts (IFNAMSIZ − 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// One address of an `eni`-mode pool and the way out for pods that hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolAddress {
    pub address: Ipv4Addr,
    /// Host interface (the ENI) the pod's traffic must leave by.
    pub egress_interface: String,
    /// Policy-routing table that sends it there.
    pub route_table: u32,
}

/// Where a node's pod addresses come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolSpec {
    /// `routed` mode: a block routed to this node; every address in it is a pod address.
    Block(Ipv4Net),
    /// `eni` mode: individual addresses, each tied to the interface that owns it.
    Addresses(Vec<PoolAddress>),
}

impl fmt::Display for PoolSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolSpec::Block(net) => write!(f, "pool {net}"),
            PoolSpec::Addresses(a) => write!(f, "pool of {} interface addresses", a.len()),
        }
    }
}

/// The key of one allocation: a CNI attachment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

impl AttachmentKey {
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> Self {
        AttachmentKey {
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }

    /// Checks what the allocator relies on: a non-empty container id, a valid Linux interface name.
    pub fn validate(&self) -> Result<(), IpamError> {
        if self.container_id.is_empty() {
            return Err(IpamError::InvalidKey("container id is empty".into()));
        }
        if self.ifname.is_empty()
            || self.ifname.len() > MAX_IFNAME_LEN
            || self.ifname == "."
            || self.ifname == ".."
            || self
                .ifname
                .bytes()
                .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(IpamError::InvalidKey(format!(
                "interface name {:?} is not a valid Linux interface name",
                self.ifname
            )));
        }
        Ok(())
    }
}

impl fmt::Display for AttachmentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

/// What the caller knows about the pod; stored with the allocation for `list` and debugging.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub netns: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
}

/// One live allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub key: AttachmentKey,
    pub address: Ipv4Addr,
    #[serde(flatten)]
    pub pod: PodInfo,
    /// Egress interface and route table in `eni` mode; `None` for a block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
}

/// How an `eni`-mode pod's traffic leaves the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Egress {
    pub interface: String,
    pub route_table: u32,
}

/// An address waiting out its cooldown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cooling {
    pub address: Ipv4Addr,
    /// Wall-clock deadline, milliseconds since the Unix epoch.
    pub until_unix_ms: u64,
}

/// The allocator's whole state as plain data (what the agent checkpoints).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamState {
    pub allocations: Vec<Allocation>,
    pub cooling: Vec<Cooling>,
    /// Index into the pool where the next search for a free address starts.
    #[serde(default)]
    pub cursor: usize,
}

/// Why the allocator refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// No free address now. Retryable: cooling addresses come back, pods go away.
    #[error(
        "{pool} exhausted: {allocated} allocated, {cooling} cooling down{}",
        next_free_in.map(|d| format!(" (the first frees in {} s)", d.as_secs().max(1))).unwrap_or_default()
    )]
    Exhausted {
        pool: String,
        allocated: usize,
        cooling: usize,
        next_free_in: Option<Duration>,
    },
    /// The key is malformed. Not retryable.
    #[error("invalid attachment: {0}")]
    InvalidKey(String),
    /// Restored state contradicts itself (an address held twice, …). The agent must not start on it.
    #[error("inconsistent IPAM state: {0}")]
    Inconsistent(String),
}

impl IpamError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, IpamError::Exhausted { .. })
    }
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The allocator.
#[derive(Debug, Clone)]
pub struct Ipam {
    spec: PoolSpec,
    /// Pool addresses in allocation order, with their egress in `eni` mode.
    pool: Vec<(Ipv4Addr, Option<Egress>)>,
    cooldown: Duration,
    allocations: BTreeMap<AttachmentKey, Allocation>,
    by_address: BTreeMap<Ipv4Addr, AttachmentKey>,
    /// Address → wall-clock deadline (unix ms).
    cooling: BTreeMap<Ipv4Addr, u64>,
    cursor: usize,
}

impl Ipam {
    /// An empty allocator over `spec`. Duplicate addresses in an address list are an error.
    pub fn new(spec: PoolSpec, cooldown: Duration) -> Result<Ipam, IpamError> {
        let pool: Vec<(Ipv4Addr, Option<Egress>)> = match &spec {
            PoolSpec::Block(net) => {
                if net.prefix_len() < MIN_BLOCK_PREFIX {
                    return Err(IpamError::Inconsistent(format!(
                        "block {net} is larger than a /{MIN_BLOCK_PREFIX}"
                    )));
                }
                let first = u32::from(net.network());
                let last = u32::from(net.broadcast());
                (first..=last).map(|a| (Ipv4Addr::from(a), None)).collect()
            }
            PoolSpec::Addresses(list) => list
                .iter()
                .map(|p| {
                    (
                        p.address,
                        Some(Egress {
                            interface: p.egress_interface.clone(),
                            route_table: p.route_table,
                        }),
                    )
                })
                .collect(),
        };
        let distinct: BTreeSet<_> = pool.iter().map(|(a, _)| *a).collect();
        if distinct.len() != pool.len() {
            return Err(IpamError::Inconsistent(
                "the pool lists an address more than once".into(),
            ));
        }
        if pool.is_empty() {
            return Err(IpamError::Inconsistent("the pool is empty".into()));
        }
        Ok(Ipam {
            spec,
            pool,
            cooldown,
            allocations: BTreeMap::new(),
            by_address: BTreeMap::new(),
            cooling: BTreeMap::new(),
            cursor: 0,
        })
    }

    /// An allocator over `spec` holding `state`. Allocations of addresses no longer in the pool are kept
    /// (the pods still use them; release works) but those addresses are never handed out again.
    pub fn restore(
        spec: PoolSpec,
        cooldown: Duration,
        state: IpamState,
    ) -> Result<Ipam, IpamError> {
        let mut ipam = Ipam::new(spec, cooldown)?;
        for a in state.allocations {
            if let Some(other) = ipam.by_address.get(&a.address) {
                return Err(IpamError::Inconsistent(format!(
                    "address {} is held by both {} and {}",
                    a.address, other, a.key
                )));
            }
            if ipam.allocations.contains_key(&a.key) {
                return Err(IpamError::Inconsistent(format!(
                    "attachment {} holds two addresses",
                    a.key
                )));
            }
            ipam.by_address.insert(a.address, a.key.clone());
            ipam.allocations.insert(a.key.clone(), a);
        }
        for c in state.cooling {
            if ipam.by_address.contains_key(&c.address) {
                return Err(IpamError::Inconsistent(format!(
                    "address {} is both allocated and cooling down",
                    c.address
                )));
            }
            ipam.cooling.insert(c.address, c.until_unix_ms);
        }
        ipam.cursor = state.cursor % ipam.pool.len();
        Ok(ipam)
    }

    /// The state as plain data, in a deterministic order.
    pub fn snapshot(&self) -> IpamState {
        IpamState {
            allocations: self.allocations.values().cloned().collect(),
            cooling: self
                .cooling
                .iter()
                .map(|(a, t)| Cooling {
                    address: *a,
                    until_unix_ms: *t,
                })
                .collect(),
            cursor: self.cursor,
        }
    }

    pub fn spec(&self) -> &PoolSpec {
        &self.spec
    }

    pub fn cooldown(&self) -> Duration {
        self.cooldown
    }

    /// Number of addresses in the pool.
    pub fn capacity(&self) -> usize {
        self.pool.len()
    }

    pub fn get(&self, key: &AttachmentKey) -> Option<&Allocation> {
        self.allocations.get(key)
    }

    /// Every live allocation, ordered by key.
    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.values()
    }

    /// Addresses cooling down at `now`, with their deadlines.
    pub fn cooling_at(&self, now: SystemTime) -> impl Iterator<Item = (Ipv4Addr, u64)> + '_ {
        let now = unix_ms(now);
        self.cooling
            .iter()
            .filter(move |(_, t)| **t > now)
            .map(|(a, t)| (*a, *t))
    }

    /// Returns `key`'s allocation, taking a free address for it if it has none. The bool says whether
    /// the state changed (false: an idempotent repeat).
    pub fn allocate(
        &mut self,
        key: &AttachmentKey,
        pod: PodInfo,
        now: SystemTime,
    ) -> Result<(Allocation, bool), IpamError> {
        key.validate()?;
        if let Some(a) = self.allocations.get(key) {
            return Ok((a.clone(), false));
        }
        let now_ms = unix_ms(now);
        self.cooling.retain(|_, until| *until > now_ms);
        let n = self.pool.len();
        let found = (0..n).map(|i| (self.cursor + i) % n).find(|&i| {
            let addr = self.pool[i].0;
            !self.by_address.contains_key(&addr) && !self.cooling.contains_key(&addr)
        });
        let Some(i) = found else {
            let next_free_in = self
                .cooling
                .values()
                .min()
                .map(|t| Duration::from_millis(t.saturating_sub(now_ms)));
            return Err(IpamError::Exhausted {
                pool: self.spec.to_string(),
                allocated: self.allocations.len(),
                cooling: self.cooling.len(),
                next_free_in,
            });
        };
        let (address, egress) = self.pool[i].clone();
        self.cursor = (i + 1) % n;
        let alloc = Allocation {
            key: key.clone(),
            address,
            pod,
            egress,
        };
        self.by_address.insert(address, key.clone());
        self.allocations.insert(key.clone(), alloc.clone());
        Ok((alloc, true))
    }

    /// Releases `key`'s address into cooldown. `None` when the key held nothing.
    pub fn release(&mut self, key: &AttachmentKey, now: SystemTime) -> Option<Allocation> {
        let alloc = self.allocations.remove(key)?;
        self.by_address.remove(&alloc.address);
        if self.pool.iter().any(|(a, _)| *a == alloc.address) {
            let until = unix_ms(now).saturating_add(self.cooldown.as_millis() as u64);
            self.cooling.insert(alloc.address, until);
        }
        Some(alloc)
    }

    /// Releases every allocation whose key is not in `valid`; returns the released allocations.
    pub fn gc(&mut self, valid: &BTreeSet<AttachmentKey>, now: SystemTime) -> Vec<Allocation> {
        let stale: Vec<AttachmentKey> = self
            .allocations
            .keys()
            .filter(|k| !valid.contains(*k))
            .cloned()
            .collect();
        stale.iter().filter_map(|k| self.release(k, now)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn mk_block(cidr: &str) -> Ipam {
        Ipam::new(PoolSpec::Block(cidr.parse().unwrap()), DEFAULT_COOLDOWN).unwrap()
    }

    fn key(i: usize) -> AttachmentKey {
        AttachmentKey::new(format!("c{i}"), "eth0")
    }

    #[test]
    fn block_uses_every_address() {
        let mut ipam = mk_block("100.64.1.0/30");
        assert_eq!(ipam.capacity(), 4);
        let got: Vec<_> = (0..4)
            .map(|i| {
                ipam.allocate(&key(i), PodInfo::default(), t(0))
                    .unwrap()
                    .0
                    .address
            })
            .collect();
        assert_eq!(
            got,
            ["100.64.1.0", "100.64.1.1", "100.64.1.2", "100.64.1.3"]
                .map(|s| s.parse::<Ipv4Addr>().unwrap())
        );
    }

    #[test]
    fn exhaustion_is_retryable_and_explains_itself() {
        let mut ipam = mk_block("100.64.1.0/30");
        for i in 0..4 {
            ipam.allocate(&key(i), PodInfo::default(), t(0)).unwrap();
        }
        ipam.release(&key(0), t(10));
        let err = ipam
            .allocate(&key(9), PodInfo::default(), t(20))
            .unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(
            err.to_string(),
            "pool 100.64.1.0/30 exhausted: 3 allocated, 1 cooling down (the first frees in 50 s)"
        );
        // After the cooldown the released address comes back.
        let (a, _) = ipam.allocate(&key(9), PodInfo::default(), t(70)).unwrap();
        assert_eq!(a.address, "100.64.1.0".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn invalid_keys_are_refused() {
        let mut ipam = mk_block("100.64.1.0/30");
        for k in [
            AttachmentKey::new("", "eth0"),
            AttachmentKey::new("c", ""),
            AttachmentKey::new("c", "a/b"),
            AttachmentKey::new("c", "x".repeat(16)),
        ] {
            let err = ipam.allocate(&k, PodInfo::default(), t(0)).unwrap_err();
            assert!(matches!(err, IpamError::InvalidKey(_)), "{k}: {err}");
            assert!(!err.is_retryable());
        }
    }

    #[test]
    fn eni_pool_carries_egress() {
        let spec = PoolSpec::Addresses(vec![PoolAddress {
            address: "198.18.1.10".parse().unwrap(),
            egress_interface: "eni1".into(),
            route_table: 101,
        }]);
        let mut ipam = Ipam::new(spec, DEFAULT_COOLDOWN).unwrap();
        let (a, changed) = ipam.allocate(&key(0), PodInfo::default(), t(0)).unwrap();
        assert!(changed);
        assert_eq!(
            a.egress,
            Some(Egress {
                interface: "eni1".into(),
                route_table: 101
            })
        );
        let err = ipam
            .allocate(&key(1), PodInfo::default(), t(0))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "pool of 1 interface addresses exhausted: 1 allocated, 0 cooling down"
        );
    }

    #[test]
    fn restore_refuses_duplicates_and_keeps_out_of_pool_allocations() {
        let mut ipam = mk_block("100.64.1.0/30");
        ipam.allocate(&key(0), PodInfo::default(), t(0)).unwrap();
        let mut state = ipam.snapshot();
        let mut dup = state.allocations[0].clone();
        dup.key = key(1);
        state.allocations.push(dup);
        let err = Ipam::restore(
            PoolSpec::Block("100.64.1.0/30".parse().unwrap()),
            DEFAULT_COOLDOWN,
            state,
        )
        .unwrap_err();
        assert!(matches!(err, IpamError::Inconsistent(_)), "{err}");

        // A shrunk pool keeps the old allocation but never hands out its address.
        let state = ipam.snapshot();
        let mut r = Ipam::restore(
            PoolSpec::Block("100.64.2.0/31".parse().unwrap()),
            DEFAULT_COOLDOWN,
            state,
        )
        .unwrap();
        assert_eq!(r.allocations().count(), 1);
        r.release(&key(0), t(1)).unwrap();
        assert_eq!(r.cooling_at(t(1)).count(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(usize),
        Release(usize),
        Gc(Vec<usize>),
        Advance(u64),
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..24usize).prop_map(Op::Alloc),
            2 => (0..24usize).prop_map(Op::Release),
            1 => proptest::collection::vec(0..24usize, 0..12).prop_map(Op::Gc),
            1 => (0..90u64).prop_map(Op::Advance),
            1 => Just(Op::Restart),
        ]
    }

    proptest! {
        /// No address is held twice; a released address is not handed out before its cooldown ends;
        /// allocating a live key returns its address; snapshot → restore changes nothing.
        #[test]
        fn allocator_invariants(ops in proptest::collection::vec(op(), 1..200)) {
            let spec = PoolSpec::Block("100.64.7.0/28".parse().unwrap());
            let cooldown = Duration::from_secs(60);
            let mut ipam = Ipam::new(spec.clone(), cooldown).unwrap();
            let mut now = 0u64;
            // Model: key → address, address → time it was released.
            let mut held: BTreeMap<AttachmentKey, Ipv4Addr> = BTreeMap::new();
            let mut released_at: BTreeMap<Ipv4Addr, u64> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Alloc(i) => {
                        let k = key(i);
                        match ipam.allocate(&k, PodInfo::default(), t(now)) {
                            Ok((a, changed)) => {
                                if let Some(prev) = held.get(&k) {
                                    prop_assert_eq!(*prev, a.address, "idempotency");
                                    prop_assert!(!changed);
                                } else {
                                    prop_assert!(changed);
                                    prop_assert!(!held.values().any(|v| *v == a.address), "address twice");
                                    if let Some(r) = released_at.get(&a.address) {
                                        prop_assert!(now >= r + 60, "cooldown not respected");
                                    }
                                    held.insert(k, a.address);
                                }
                            }
                            Err(e) => {
                                prop_assert!(e.is_retryable());
                                prop_assert!(!held.contains_key(&k));
                                // Exhausted really means every address is held or cooling.
                                let busy = held.len()
                                    + released_at.values().filter(|r| now < *r + 60).count();
                                prop_assert!(busy >= 16, "exhausted with {busy} busy");
                            }
                        }
                    }
                    Op::Release(i) => {
                        let k = key(i);
                        let r = ipam.release(&k, t(now));
                        let expected = held.remove(&k);
                        prop_assert_eq!(r.map(|a| a.address), expected);
                        if let Some(a) = expected { released_at.insert(a, now); }
                    }
                    Op::Gc(keep) => {
                        let valid: BTreeSet<_> = keep.into_iter().map(key).collect();
                        let released = ipam.gc(&valid, t(now));
                        for a in released {
                            prop_assert!(!valid.contains(&a.key));
                            prop_assert_eq!(held.remove(&a.key), Some(a.address));
                            released_at.insert(a.address, now);
                        }
                        prop_assert!(held.keys().all(|k| valid.contains(k)));
                    }
                    Op::Advance(s) => now += s,
                    Op::Restart => {
                        let snap = ipam.snapshot();
                        ipam = Ipam::restore(spec.clone(), cooldown, snap.clone()).unwrap();
                        prop_assert_eq!(ipam.snapshot(), snap);
                    }
                }
                for (k, a) in &held {
                    prop_assert_eq!(ipam.get(k).map(|x| x.address), Some(*a));
                }
                prop_assert_eq!(ipam.allocations().count(), held.len());
            }
        }
    }
}
