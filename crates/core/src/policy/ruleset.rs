//! The policy part of a node's `inet underlay` table, as data: named sets, regular chains and the two verdict
//! maps keyed by host veth name. The fixed part (three base chains and the maps' declarations) is
//! [`skeleton`](super::render); everything here is what the compiler derives from the inputs.
//!
//! ```text
//!  forward ─► pol_forward_egress:  ct direction reply accept; iifname vmap @pol_egress_if ─┐
//!  input   ─► pol_input_egress:    ct direction reply accept; iifname vmap @pol_egress_if ─┤
//!  forward ─► pol_forward_ingress: ct direction reply accept; oifname vmap @pol_ingress_if ┤
//!                                                                                         ▼
//!    pol_c<hash>_<dir> (one per set of policies selecting a pod): jump pol_p<id>_<dir> …; drop
//!    pol_p<id>_<dir>   (one per policy): one line per rule, `accept` on a set hit
//! ```
//!
//! An interface absent from a map is a pod no policy selects in that direction: nothing is evaluated for it.
//! Each direction is its own base chain, so `accept` ends that direction's evaluation only.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::model::{PolicyType, Protocol, Transport};
use super::ranges::AddrRange;

/// The type of a named set; the set's name ends with its kind's suffix, so a name never changes type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SetKind {
    /// `ipv4_addr`, intervals: ipBlock peers (CIDRs minus excepts).
    Addr,
    /// `ipv4_addr`, a hash set of single addresses: the pods a selector peer matches.
    ///
    /// Only ipBlocks and port ranges need interval sets. `nft` 1.0 reads every element of every interval set
    /// in the table before it commits any batch, so a thousand interval sets made each ADD's transaction
    /// ~100 ms; with hash sets it is ~10 ms.
    PodAddr,
    /// `inet_proto . inet_service`, intervals: numeric ports with at least one range (`endPort`).
    ProtoPort,
    /// `inet_proto . inet_service`, a hash set: numeric ports without ranges.
    ProtoPortExact,
    /// `ipv4_addr . inet_proto . inet_service`: egress named ports, resolved on each destination pod.
    AddrProtoPort,
    /// `ifname . inet_proto . inet_service`: ingress named ports, resolved on each local destination pod.
    IfProtoPort,
}

impl SetKind {
    pub fn suffix(self) -> &'static str {
        match self {
            SetKind::Addr => "a",
            SetKind::PodAddr => "h",
            SetKind::ProtoPort => "pp",
            SetKind::ProtoPortExact => "p",
            SetKind::AddrProtoPort => "app",
            SetKind::IfProtoPort => "ipp",
        }
    }
}

/// One element of a set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Element {
    Addr(AddrRange),
    ProtoPort(Protocol, u16, u16),
    AddrProtoPort(Ipv4Addr, Protocol, u16),
    IfProtoPort(String, Protocol, u16),
}

/// A named set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NftSet {
    pub kind: SetKind,
    pub elements: BTreeSet<Element>,
}

/// How a rule matches the packet's port, against a named set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortMatch {
    /// `meta l4proto . th dport @set` ([`SetKind::ProtoPort`] or [`SetKind::ProtoPortExact`]).
    ProtoPort(String),
    /// `ip daddr . meta l4proto . th dport @set` ([`SetKind::AddrProtoPort`]).
    AddrProtoPort(String),
    /// `oifname . meta l4proto . th dport @set` ([`SetKind::IfProtoPort`]).
    IfProtoPort(String),
}

/// One line of a regular chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChainRule {
    /// `jump <chain>`.
    Jump(String),
    /// `counter drop`: the end of a pod's chain in one direction.
    Drop,
    /// Accept when the peer (source for ingress, destination for egress) is in `peers` (if given) and the
    /// port matches `ports` (if given). Neither given: accept.
    Accept {
        dir: PolicyType,
        peers: Option<String>,
        ports: Option<PortMatch>,
    },
}

/// The compiled policy state of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyModel {
    pub sets: BTreeMap<String, NftSet>,
    pub chains: BTreeMap<String, Vec<ChainRule>>,
    /// `iifname` → the chain of the policies selecting that pod for egress.
    pub egress_if: BTreeMap<String, String>,
    /// `oifname` → the chain of the policies selecting that pod for ingress.
    pub ingress_if: BTreeMap<String, String>,
}

impl PolicyModel {
    /// How many nftables objects and elements the model holds (sets, chains, rules, set and map elements).
    pub fn object_count(&self) -> usize {
        self.sets.len()
            + self.sets.values().map(|s| s.elements.len()).sum::<usize>()
            + self.chains.len()
            + self.chains.values().map(Vec::len).sum::<usize>()
            + self.egress_if.len()
            + self.ingress_if.len()
    }
}

/// Where a packet meets the node's policy chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hook {
    /// Routed through the node, from `iif` to `oif`.
    Forward { iif: String, oif: String },
    /// Delivered to the node itself, arriving on `iif`.
    Input { iif: String },
    /// Sent by the node itself (not policed).
    Output,
}

/// What the kernel would do with the packet, by the model: an interpreter of [`PolicyModel`] with the
/// skeleton's semantics, used by the property tests to compare the compiled model with the evaluator.
/// `reply` is conntrack's direction: replies of tracked connections are accepted before any policy.
pub fn interpret(
    model: &PolicyModel,
    hook: &Hook,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    t: Transport,
    reply: bool,
) -> bool {
    if reply {
        return true;
    }
    let pkt = Pkt { src, dst, t };
    match hook {
        Hook::Output => true,
        Hook::Input { iif } => direction(model, &model.egress_if, iif, "", &pkt),
        Hook::Forward { iif, oif } => {
            direction(model, &model.egress_if, iif, oif, &pkt)
                && direction(model, &model.ingress_if, oif, oif, &pkt)
        }
    }
}

struct Pkt {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    t: Transport,
}

fn direction(
    model: &PolicyModel,
    map: &BTreeMap<String, String>,
    key: &str,
    oif: &str,
    pkt: &Pkt,
) -> bool {
    match map.get(key) {
        None => true,
        Some(chain) => run(model, chain, oif, pkt, 0).unwrap_or(true),
    }
}

/// `Some(verdict)` when the chain ends the base chain, `None` when it returns.
fn run(model: &PolicyModel, chain: &str, oif: &str, pkt: &Pkt, depth: usize) -> Option<bool> {
    assert!(depth < 16, "chain loop at {chain}");
    let rules = model
        .chains
        .get(chain)
        .unwrap_or_else(|| panic!("missing chain {chain}"));
    for r in rules {
        match r {
            ChainRule::Jump(c) => {
                if let Some(v) = run(model, c, oif, pkt, depth + 1) {
                    return Some(v);
                }
            }
            ChainRule::Drop => return Some(false),
            ChainRule::Accept { dir, peers, ports } => {
                let peer = match dir {
                    PolicyType::Ingress => pkt.src,
                    PolicyType::Egress => pkt.dst,
                };
                let peer_ok = peers.as_ref().is_none_or(|s| {
                    set(model, s)
                        .elements
                        .iter()
                        .any(|e| matches!(e, Element::Addr(r) if r.contains(peer)))
                });
                let port_ok = ports
                    .as_ref()
                    .is_none_or(|pm| port_hit(model, pm, oif, pkt));
                if peer_ok && port_ok {
                    return Some(true);
                }
            }
        }
    }
    None
}

fn set<'a>(model: &'a PolicyModel, name: &str) -> &'a NftSet {
    model
        .sets
        .get(name)
        .unwrap_or_else(|| panic!("missing set {name}"))
}

fn port_hit(model: &PolicyModel, pm: &PortMatch, oif: &str, pkt: &Pkt) -> bool {
    let Transport::Port(proto, port) = pkt.t else {
        return false;
    };
    match pm {
        PortMatch::ProtoPort(s) => set(model, s)
            .elements
            .iter()
            .any(|e| matches!(e, Element::ProtoPort(p, lo, hi) if *p == proto && (*lo..=*hi).contains(&port))),
        PortMatch::AddrProtoPort(s) => set(model, s)
            .elements
            .contains(&Element::AddrProtoPort(pkt.dst, proto, port)),
        PortMatch::IfProtoPort(s) => set(model, s)
            .elements
            .contains(&Element::IfProtoPort(oif.to_string(), proto, port)),
    }
}
