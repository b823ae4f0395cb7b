//! The compiler: (cluster inputs, this node's pods) → [`PolicyModel`]. Pure and deterministic: the output
//! depends on the inputs' content, not their order.
//!
//! Chains depend only on the policies' structure (which rules, which set names); every address and port that
//! depends on pods lives in set elements. So a pod coming, going or changing labels changes set elements and,
//! for a pod of this node, its entries in the verdict maps: never an existing chain's rules.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::model::{Cluster, Labels, NetworkPolicy, Pod, PolicyType, Protocol};
use super::ranges::{AddrRange, merge_overlapping};
use super::ruleset::{ChainRule, Element, NftSet, PolicyModel, PortMatch, SetKind};
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
    let mut local: Vec<&LocalPod> = local.iter().collect();
    local.sort();
    // Local addresses are authoritative: the API may not have published them yet.
    let mut pods: Vec<Pod> = cluster.pods.clone();
    for lp in &local {
        if let Some(p) = pods
            .iter_mut()
            .find(|p| p.namespace == lp.namespace && p.name == lp.name)
        {
            p.ip = Some(lp.ip);
        }
    }
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let namespaces: BTreeMap<&str, &Labels> = cluster
        .namespaces
        .iter()
        .map(|n| (n.name.as_str(), &n.labels))
        .collect();
    let mut policies: Vec<&NetworkPolicy> = cluster.policies.iter().collect();
    policies.sort_by_key(|p| p.key());

    let cx = Cx {
        pods: &pods,
        namespaces,
    };
    let mut out = Compiled::default();
    // (policy index, direction) → local pods it selects.
    let mut needed: BTreeMap<(usize, DirKey), Vec<&LocalPod>> = BTreeMap::new();
    for lp in &local {
        let Some(pod) = pods
            .iter()
            .find(|p| p.namespace == lp.namespace && p.name == lp.name)
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

struct Cx<'a> {
    pods: &'a [Pod],
    namespaces: BTreeMap<&'a str, &'a Labels>,
}

impl Cx<'_> {
    /// Addresses of the pods a selector peer matches.
    fn peer_pods(&self, pol: &NetworkPolicy, peer: &NormPeer) -> Vec<AddrRange> {
        match peer {
            NormPeer::Block(r) => r.clone(),
            NormPeer::Pods { namespace, pods } => self
                .pods
                .iter()
                .filter(|p| !p.host_network)
                .filter(|p| match namespace {
                    None => p.namespace == pol.namespace,
                    Some(sel) => self
                        .namespaces
                        .get(p.namespace.as_str())
                        .is_some_and(|l| sel.matches(l)),
                })
                .filter(|p| pods.as_ref().is_none_or(|s| s.matches(&p.labels)))
                .filter_map(|p| p.ip.map(AddrRange::single))
                .collect(),
        }
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
            // Peers: None = every address.
            let peer_ranges: Option<Vec<AddrRange>> = if rule.peers.is_empty() {
                None
            } else {
                let valid: Vec<NormPeer> = rule
                    .peers
                    .iter()
                    .filter_map(|p| norm_peer(p).ok())
                    .collect();
                if valid.is_empty() {
                    continue; // every peer invalid: the rule matches nothing
                }
                let all: Vec<(Ipv4Addr, Ipv4Addr)> = valid
                    .iter()
                    .flat_map(|p| self.peer_pods(pol, p))
                    .map(|r| (r.start, r.end))
                    .collect();
                Some(
                    merge_overlapping(all)
                        .into_iter()
                        .map(|(s, e)| AddrRange::new(s, e))
                        .collect(),
                )
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
            let peers_set = peer_ranges.as_ref().map(|r| {
                let name = format!("{stem}_{}", SetKind::Addr.suffix());
                model.sets.insert(
                    name.clone(),
                    NftSet {
                        kind: SetKind::Addr,
                        elements: r.iter().map(|r| Element::Addr(*r)).collect(),
                    },
                );
                name
            });
            if rule.ports.is_empty() {
                lines.push(ChainRule::Accept {
                    dir,
                    peers: peers_set.clone(),
                    ports: None,
                });
                continue;
            }
            if !ranges.is_empty() {
                let mut by_proto: BTreeMap<Protocol, Vec<(u16, u16)>> = BTreeMap::new();
                for r in &ranges {
                    if let NormPort::Range(p, lo, hi) = r {
                        by_proto.entry(*p).or_default().push((*lo, *hi));
                    }
                }
                let elements = by_proto
                    .into_iter()
                    .flat_map(|(p, v)| {
                        merge_overlapping(v)
                            .into_iter()
                            .map(move |(lo, hi)| Element::ProtoPort(p, lo, hi))
                    })
                    .collect();
                let name = format!("{stem}_{}", SetKind::ProtoPort.suffix());
                model.sets.insert(
                    name.clone(),
                    NftSet {
                        kind: SetKind::ProtoPort,
                        elements,
                    },
                );
                lines.push(ChainRule::Accept {
                    dir,
                    peers: peers_set.clone(),
                    ports: Some(PortMatch::ProtoPort(name)),
                });
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
                            if let Some(pod) = self
                                .pods
                                .iter()
                                .find(|p| p.namespace == lp.namespace && p.name == lp.name)
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
                        lines.push(ChainRule::Accept {
                            dir,
                            peers: peers_set.clone(),
                            ports: Some(PortMatch::IfProtoPort(name)),
                        });
                    }
                    PolicyType::Egress => {
                        // Resolved on each destination: every pod among the peers (or anywhere, with no peers).
                        let mut elements = BTreeSet::new();
                        for pod in self.pods.iter().filter(|p| !p.host_network) {
                            let Some(ip) = pod.ip else { continue };
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
