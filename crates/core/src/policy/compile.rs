//! The compiler: (cluster inputs, this node's pods) → [`PolicyModel`]. Pure and deterministic: the output
//! depends on the inputs' content, not their order.
//!
//! Chains depend only on the policies' structure (which rules, which set names); every address and port that
//! depends on pods lives in set elements. So a pod coming, going or changing labels changes set elements and,
//! for a pod of this node, its entries in the verdict maps: never an existing chain's rules.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::model::{Cluster, Labels, NetworkPolicy, Pod, PolicyType, Protocol};
use super::ranges::{AddrRange, merge_overlapping};
use super::ruleset::{ChainRule, Element, NftSet, PolicyModel, PortMatch, SetKind};
use super::selector::LabelSelector;
use super::validate::{
    NormPeer, NormPort, PolicyWarning, in_ranges, norm_peer, norm_port, validate,
};
use crate::names;

/// A pod attached on this node: who it is (to find its labels and named ports in the inputs), its host veth
/// and its address (authoritative from IPAM, before the API server has it in `status.podIP`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LocalPod {
    pub namespace: String,
    pub name: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
}

/// The compiler's output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compiled {
    pub model: PolicyModel,
    /// Problems of the policies that select a pod of this node, in policy order.
    pub warnings: Vec<PolicyWarning>,
    /// Local pods (`namespace/name`) absent from the inputs: isolated in both directions until they appear.
    pub unknown_local_pods: Vec<String>,
}

/// The chain every direction of a local pod missing from the inputs is sent to: drop.
pub const CHAIN_UNKNOWN_POD: &str = "pol_unknown_pod";

/// Compiles the policy state of the node whose attached pods are `local`.
pub fn compile(cluster: &Cluster, local: &[LocalPod]) -> Compiled {
    compile_with(cluster, local, &mut CompileCache::default())
}

/// What [`compile_with`] reuses between compiles of the same inputs: the addresses each selector peer
/// resolved to. A pod's ADD or DEL changes the local pods, not the inputs, and most peers not at all, so the
/// node's thousand policies are not resolved against the cluster's pods again for each ADD.
#[derive(Debug, Clone, Default)]
pub struct CompileCache {
    peers: HashMap<PeerKey, Vec<AddrRange>>,
    /// The local addresses the cached resolutions were made with (`namespace/name` → address).
    local_addresses: BTreeMap<(String, String), Ipv4Addr>,
}

impl CompileCache {
    /// Forget everything.
    pub fn clear(&mut self) {
        self.peers.clear();
        self.local_addresses.clear();
    }

    /// The inputs changed from `old` to `new`: keep the resolutions the change cannot affect. Policies do not
    /// enter a resolution (it is keyed by its selectors), so only pods that changed, came or went evict the
    /// resolutions they are or were in; a namespace change, or a change of many pods, clears everything.
    pub fn invalidate(&mut self, old: &Cluster, new: &Cluster) {
        if old.namespaces != new.namespaces {
            return self.clear();
        }
        fn key(p: &Pod) -> (&str, &str) {
            (p.namespace.as_str(), p.name.as_str())
        }
        let before: HashMap<(&str, &str), &Pod> = old.pods.iter().map(|p| (key(p), p)).collect();
        let mut after: HashMap<(&str, &str), &Pod> = HashMap::with_capacity(new.pods.len());
        let mut changed: Vec<&Pod> = Vec::new();
        for p in &new.pods {
            match before.get(&key(p)) {
                Some(q) if *q == p => {}
                Some(q) => changed.extend([*q, p]),
                None => changed.push(p),
            }
            after.insert(key(p), p);
        }
        changed.extend(old.pods.iter().filter(|p| !after.contains_key(&key(p))));
        // Past a few hundred, scanning the resolutions per pod costs more than resolving again.
        if changed.len() > 256 {
            return self.clear();
        }
        let namespaces: BTreeMap<&str, &Labels> = new
            .namespaces
            .iter()
            .map(|n| (n.name.as_str(), &n.labels))
            .collect();
        for pod in changed {
            self.evict(pod, &namespaces);
        }
    }

    /// Drops the resolutions `pod` could be in (by its namespace and labels).
    fn evict(&mut self, pod: &Pod, namespaces: &BTreeMap<&str, &Labels>) {
        self.peers.retain(|(own, ns_sel, pod_sel), _| {
            let in_namespace = match own {
                Some(own) => *own == pod.namespace,
                None => ns_sel.as_ref().is_some_and(|sel| {
                    namespaces
                        .get(pod.namespace.as_str())
                        .is_some_and(|l| sel.matches(l))
                }),
            };
            !(in_namespace && pod_sel.as_ref().is_none_or(|s| s.matches(&pod.labels)))
        });
    }

    /// Keeps only the resolutions that cannot include a pod whose local address changed since the last compile
    /// (a local address overrides the API's, which may not have published it yet).
    fn invalidate_for(
        &mut self,
        local: &[&LocalPod],
        pods: &BTreeMap<(&str, &str), &Pod>,
        namespaces: &BTreeMap<&str, &Labels>,
    ) {
        let now: BTreeMap<(String, String), Ipv4Addr> = local
            .iter()
            .map(|lp| ((lp.namespace.clone(), lp.name.clone()), lp.ip))
            .collect();
        let changed: Vec<&Pod> = now
            .iter()
            .filter(|(k, ip)| self.local_addresses.get(*k) != Some(*ip))
            .map(|(k, _)| k)
            .chain(
                self.local_addresses
                    .keys()
                    .filter(|k| !now.contains_key(*k)),
            )
            .filter_map(|(ns, name)| pods.get(&(ns.as_str(), name.as_str())).copied())
            .collect();
        for pod in changed {
            self.evict(pod, namespaces);
        }
        self.local_addresses = now;
    }
}

/// [`compile`], reusing and refilling `cache`. The result is the same as [`compile`]'s as long as the cache is
/// told of every change of `cluster` ([`CompileCache::invalidate`], or [`CompileCache::clear`]).
pub fn compile_with(cluster: &Cluster, local: &[LocalPod], cache: &mut CompileCache) -> Compiled {
    let mut local: Vec<&LocalPod> = local.iter().collect();
    local.sort();
    let namespaces: BTreeMap<&str, &Labels> = cluster
        .namespaces
        .iter()
        .map(|n| (n.name.as_str(), &n.labels))
        .collect();
    let by_name: BTreeMap<(&str, &str), &Pod> = cluster
        .pods
        .iter()
        .map(|p| ((p.namespace.as_str(), p.name.as_str()), p))
        .collect();
    cache.invalidate_for(&local, &by_name, &namespaces);
    // Local addresses are authoritative: the API may not have published them yet.
    let local_ip: HashMap<(&str, &str), Ipv4Addr> = local
        .iter()
        .map(|lp| ((lp.namespace.as_str(), lp.name.as_str()), lp.ip))
        .collect();
    // Sorted by namespace/name (a pod listed twice counts once).
    let pods: Vec<&Pod> = by_name.values().copied().collect();
    let mut policies: Vec<&NetworkPolicy> = cluster.policies.iter().collect();
    policies.sort_by_key(|p| p.key());

    let mut pods_by_ns: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
    for p in pods.iter().filter(|p| !p.host_network) {
        pods_by_ns.entry(p.namespace.as_str()).or_default().push(p);
    }
    let cx = Cx {
        by_name: &by_name,
        local_ip,
        pods: &pods,
        pods_by_ns,
        namespaces,
        peers: RefCell::new(std::mem::take(&mut cache.peers)),
        peer_sets: RefCell::new(HashMap::new()),
    };
    let mut out = Compiled::default();
    // (policy index, direction) → local pods it selects.
    let mut needed: BTreeMap<(usize, DirKey), Vec<&LocalPod>> = BTreeMap::new();
    for lp in &local {
        let Some(pod) = by_name
            .get(&(lp.namespace.as_str(), lp.name.as_str()))
            .copied()
        else {
            out.unknown_local_pods
                .push(format!("{}/{}", lp.namespace, lp.name));
            out.model
                .chains
                .insert(CHAIN_UNKNOWN_POD.into(), vec![ChainRule::Drop]);
            out.model
                .egress_if
                .insert(lp.ifname.clone(), CHAIN_UNKNOWN_POD.into());
            out.model
                .ingress_if
                .insert(lp.ifname.clone(), CHAIN_UNKNOWN_POD.into());
            continue;
        };
        for dir in [PolicyType::Ingress, PolicyType::Egress] {
            let selecting: Vec<usize> = policies
                .iter()
                .enumerate()
                .filter(|(_, p)| p.namespace == pod.namespace && p.has_type(dir) && selects(p, pod))
                .map(|(i, _)| i)
                .collect();
            if selecting.is_empty() {
                continue;
            }
            let keys: Vec<String> = selecting.iter().map(|&i| policies[i].key()).collect();
            let comb = format!(
                "{}c{}_{}",
                names::NFT_POLICY_PREFIX,
                short_hash(&keys.join("\n")),
                dk(dir).suffix()
            );
            let mut rules: Vec<ChainRule> = selecting
                .iter()
                .map(|&i| ChainRule::Jump(policy_chain(policies[i], dir)))
                .collect();
            rules.push(ChainRule::Drop);
            out.model.chains.insert(comb.clone(), rules);
            let map = match dir {
                PolicyType::Ingress => &mut out.model.ingress_if,
                PolicyType::Egress => &mut out.model.egress_if,
            };
            map.insert(lp.ifname.clone(), comb);
            for i in selecting {
                needed.entry((i, dk(dir))).or_default().push(lp);
            }
        }
    }
    let mut warned = BTreeSet::new();
    for ((i, d), selected) in &needed {
        let pol = policies[*i];
        cx.emit_policy(&mut out.model, pol, d.dir(), selected);
        if warned.insert(*i) {
            out.warnings.extend(validate(pol));
        }
    }
    cache.peers = cx.peers.into_inner();
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum DirKey {
    In,
    Eg,
}

impl DirKey {
    fn dir(self) -> PolicyType {
        match self {
            DirKey::In => PolicyType::Ingress,
            DirKey::Eg => PolicyType::Egress,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            DirKey::In => "in",
            DirKey::Eg => "eg",
        }
    }
}

fn dk(dir: PolicyType) -> DirKey {
    match dir {
        PolicyType::Ingress => DirKey::In,
        PolicyType::Egress => DirKey::Eg,
    }
}

/// Whether `pol` selects `pod`: an invalid podSelector selects the whole namespace (closes, never opens).
fn selects(pol: &NetworkPolicy, pod: &Pod) -> bool {
    !pod.host_network
        && (pol.pod_selector.validate().is_err() || pol.pod_selector.matches(&pod.labels))
}

/// The canonical text of what a rule's peers select: the same text for the same members, whatever policy
/// names them (sorted, so the order of `from`/`to` entries does not matter).
fn peers_identity(pol: &NetworkPolicy, peers: &[NormPeer]) -> String {
    let mut parts: Vec<String> = peers
        .iter()
        .map(|p| match p {
            NormPeer::Block(r) => format!("block {r:?}"),
            NormPeer::Pods {
                namespace: None,
                pods,
            } => format!("pods in {:?} {pods:?}", pol.namespace),
            NormPeer::Pods {
                namespace: Some(ns),
                pods,
            } => format!("pods of {ns:?} {pods:?}"),
        })
        .collect();
    parts.sort();
    parts.dedup();
    parts.join("\n")
}

/// 48 bits of FNV-1a as 12 hex digits: stable across releases and platforms.
fn short_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:012x}", h >> 16)
}

fn policy_id(pol: &NetworkPolicy) -> String {
    format!("{}p{}", names::NFT_POLICY_PREFIX, short_hash(&pol.key()))
}

/// The chain of one policy in one direction.
pub(crate) fn policy_chain(pol: &NetworkPolicy, dir: PolicyType) -> String {
    format!("{}_{}", policy_id(pol), dk(dir).suffix())
}

/// A selector peer's identity: what decides the pods it matches (the policy's own namespace when the peer has
/// no namespace selector). Policies naming the same peer share one resolution per compile.
type PeerKey = (Option<String>, Option<LabelSelector>, Option<LabelSelector>);

struct Cx<'a> {
    by_name: &'a BTreeMap<(&'a str, &'a str), &'a Pod>,
    /// This node's pods' addresses, which win over the API's.
    local_ip: HashMap<(&'a str, &'a str), Ipv4Addr>,
    pods: &'a [&'a Pod],
    /// Pods that can be peers (host-network pods are never a selector's), by namespace.
    pods_by_ns: BTreeMap<&'a str, Vec<&'a Pod>>,
    namespaces: BTreeMap<&'a str, &'a Labels>,
    /// Resolved selector peers, so a thousand policies naming a hundred peer groups scan the pods a hundred times.
    peers: RefCell<HashMap<PeerKey, Vec<AddrRange>>>,
    /// This compile's shared peer sets (by name) and their ranges.
    peer_sets: RefCell<HashMap<String, Vec<AddrRange>>>,
}

impl Cx<'_> {
    /// A pod's address: this node's for its own pods, else the API's.
    fn ip(&self, p: &Pod) -> Option<Ipv4Addr> {
        self.local_ip
            .get(&(p.namespace.as_str(), p.name.as_str()))
            .copied()
            .or(p.ip)
    }

    /// Addresses of the pods a selector peer matches.
    fn peer_pods(&self, pol: &NetworkPolicy, peer: &NormPeer) -> Vec<AddrRange> {
        let (namespace, pods) = match peer {
            NormPeer::Block(r) => return r.clone(),
            NormPeer::Pods { namespace, pods } => (namespace, pods),
        };
        let key: PeerKey = (
            namespace.is_none().then(|| pol.namespace.clone()),
            namespace.clone(),
            pods.clone(),
        );
        if let Some(hit) = self.peers.borrow().get(&key) {
            return hit.clone();
        }
        let in_namespaces: Vec<&str> = match namespace {
            None => vec![pol.namespace.as_str()],
            Some(sel) => self
                .namespaces
                .iter()
                .filter(|(_, labels)| sel.matches(labels))
                .map(|(name, _)| *name)
                .collect(),
        };
        let found: Vec<AddrRange> = in_namespaces
            .iter()
            .filter_map(|ns| self.pods_by_ns.get(ns))
            .flatten()
            .filter(|p| pods.as_ref().is_none_or(|s| s.matches(&p.labels)))
            .filter_map(|p| self.ip(p).map(AddrRange::single))
            .collect();
        self.peers.borrow_mut().insert(key, found.clone());
        found
    }

    /// The shared set of `group`'s addresses (all ipBlocks for [`SetKind::Addr`], all selector peers for
    /// [`SetKind::PodAddr`]), created in `model` on first use, and its ranges. The set is named by what selects
    /// its members (the peers, the policy's namespace standing in for a missing namespace selector), so policies
    /// naming the same peers share one set: a thousand policies allowing a hundred groups hold a hundred sets,
    /// not a thousand copies.
    fn peer_set(
        &self,
        model: &mut PolicyModel,
        pol: &NetworkPolicy,
        group: &[NormPeer],
        kind: SetKind,
    ) -> (String, Vec<AddrRange>) {
        let name = format!(
            "{}a{}_{}",
            names::NFT_POLICY_PREFIX,
            short_hash(&peers_identity(pol, group)),
            kind.suffix()
        );
        // (The borrow ends with this statement, before the insert below borrows mutably.)
        let known = self.peer_sets.borrow().get(&name).cloned();
        if let Some(ranges) = known {
            return (name, ranges);
        }
        let all: Vec<(Ipv4Addr, Ipv4Addr)> = group
            .iter()
            .flat_map(|p| self.peer_pods(pol, p))
            .map(|r| (r.start, r.end))
            .collect();
        let ranges: Vec<AddrRange> = merge_overlapping(all)
            .into_iter()
            .map(|(s, e)| AddrRange::new(s, e))
            .collect();
        let elements = match kind {
            // Pod addresses one by one: a hash set holds no ranges.
            SetKind::PodAddr => ranges
                .iter()
                .flat_map(|r| (u32::from(r.start)..=u32::from(r.end)).map(Ipv4Addr::from))
                .map(|ip| Element::Addr(AddrRange::single(ip)))
                .collect(),
            _ => ranges.iter().map(|r| Element::Addr(*r)).collect(),
        };
        model.sets.insert(name.clone(), NftSet { kind, elements });
        self.peer_sets
            .borrow_mut()
            .insert(name.clone(), ranges.clone());
        (name, ranges)
    }

    fn emit_policy(
        &self,
        model: &mut PolicyModel,
        pol: &NetworkPolicy,
        dir: PolicyType,
        selected: &[&LocalPod],
    ) {
        let d = dk(dir);
        let base = format!("{}_{}", policy_id(pol), d.suffix());
        let mut lines = Vec::new();
        for (i, rule) in pol.rules(dir).iter().enumerate() {
            let stem = format!("{base}{i}");
            let mut peer_ranges: Option<Vec<AddrRange>> = None;
            // Empty: every address (the rule names no peers).
            let mut peer_sets: Vec<String> = Vec::new();
            if !rule.peers.is_empty() {
                let valid: Vec<NormPeer> = rule
                    .peers
                    .iter()
                    .filter_map(|p| norm_peer(p).ok())
                    .collect();
                if valid.is_empty() {
                    continue; // every peer invalid: the rule matches nothing
                }
                // ipBlocks go to an interval set, selector peers to a hash set of pod addresses: one accept
                // line per set, the same ports on each.
                let (blocks, pods): (Vec<NormPeer>, Vec<NormPeer>) = valid
                    .into_iter()
                    .partition(|p| matches!(p, NormPeer::Block(_)));
                let mut all = Vec::new();
                for (group, kind) in [(blocks, SetKind::Addr), (pods, SetKind::PodAddr)] {
                    if group.is_empty() {
                        continue;
                    }
                    let (name, ranges) = self.peer_set(model, pol, &group, kind);
                    all.extend(ranges);
                    peer_sets.push(name);
                }
                peer_ranges = Some(all);
            }
            let accept = |lines: &mut Vec<ChainRule>, ports: Option<PortMatch>| {
                if peer_sets.is_empty() {
                    lines.push(ChainRule::Accept {
                        dir,
                        peers: None,
                        ports: ports.clone(),
                    });
                }
                for set in &peer_sets {
                    lines.push(ChainRule::Accept {
                        dir,
                        peers: Some(set.clone()),
                        ports: ports.clone(),
                    });
                }
            };
            let (ranges, named): (Vec<NormPort>, Vec<NormPort>) = if rule.ports.is_empty() {
                (Vec::new(), Vec::new())
            } else {
                let valid: Vec<NormPort> = rule
                    .ports
                    .iter()
                    .filter_map(|p| norm_port(p).ok())
                    .collect();
                if valid.is_empty() {
                    continue; // every port entry invalid: the rule matches nothing
                }
                valid
                    .into_iter()
                    .partition(|p| matches!(p, NormPort::Range(..)))
            };
            if rule.ports.is_empty() {
                accept(&mut lines, None);
                continue;
            }
            if !ranges.is_empty() {
                let mut by_proto: BTreeMap<Protocol, Vec<(u16, u16)>> = BTreeMap::new();
                for r in &ranges {
                    if let NormPort::Range(p, lo, hi) = r {
                        by_proto.entry(*p).or_default().push((*lo, *hi));
                    }
                }
                let elements: BTreeSet<Element> = by_proto
                    .into_iter()
                    .flat_map(|(p, v)| {
                        merge_overlapping(v)
                            .into_iter()
                            .map(move |(lo, hi)| Element::ProtoPort(p, lo, hi))
                    })
                    .collect();
                // An interval set only when a range needs one (see [`SetKind::PodAddr`]).
                let kind = if elements
                    .iter()
                    .any(|e| matches!(e, Element::ProtoPort(_, lo, hi) if lo != hi))
                {
                    SetKind::ProtoPort
                } else {
                    SetKind::ProtoPortExact
                };
                let name = format!("{stem}_{}", kind.suffix());
                model.sets.insert(name.clone(), NftSet { kind, elements });
                accept(&mut lines, Some(PortMatch::ProtoPort(name)));
            }
            if !named.is_empty() {
                let wanted: BTreeSet<(Protocol, &str)> = named
                    .iter()
                    .filter_map(|p| match p {
                        NormPort::Named(proto, n) => Some((*proto, n.as_str())),
                        NormPort::Range(..) => None,
                    })
                    .collect();
                let resolve = |pod: &Pod| -> Vec<(Protocol, u16)> {
                    pod.named_ports
                        .iter()
                        .filter(|np| wanted.contains(&(np.protocol, np.name.as_str())))
                        .map(|np| (np.protocol, np.port))
                        .collect()
                };
                match dir {
                    PolicyType::Ingress => {
                        // Resolved on each destination: the local pods this policy selects.
                        let mut elements = BTreeSet::new();
                        for lp in selected {
                            if let Some(pod) =
                                self.by_name.get(&(lp.namespace.as_str(), lp.name.as_str()))
                            {
                                for (proto, port) in resolve(pod) {
                                    elements.insert(Element::IfProtoPort(
                                        lp.ifname.clone(),
                                        proto,
                                        port,
                                    ));
                                }
                            }
                        }
                        let name = format!("{stem}_{}", SetKind::IfProtoPort.suffix());
                        model.sets.insert(
                            name.clone(),
                            NftSet {
                                kind: SetKind::IfProtoPort,
                                elements,
                            },
                        );
                        accept(&mut lines, Some(PortMatch::IfProtoPort(name)));
                    }
                    PolicyType::Egress => {
                        // Resolved on each destination: every pod among the peers (or anywhere, with no peers).
                        let mut elements = BTreeSet::new();
                        for pod in self.pods.iter().filter(|p| !p.host_network) {
                            let Some(ip) = self.ip(pod) else { continue };
                            if peer_ranges.as_ref().is_some_and(|r| !in_ranges(r, ip)) {
                                continue;
                            }
                            for (proto, port) in resolve(pod) {
                                elements.insert(Element::AddrProtoPort(ip, proto, port));
                            }
                        }
                        let name = format!("{stem}_{}", SetKind::AddrProtoPort.suffix());
                        model.sets.insert(
                            name.clone(),
                            NftSet {
                                kind: SetKind::AddrProtoPort,
                                elements,
                            },
                        );
                        // The set already holds only peer addresses.
                        lines.push(ChainRule::Accept {
                            dir,
                            peers: None,
                            ports: Some(PortMatch::AddrProtoPort(name)),
                        });
                    }
                }
            }
        }
        model.chains.insert(base, lines);
    }
}
