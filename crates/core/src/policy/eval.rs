//! The evaluator: a direct reading of the NetworkPolicy API, one packet at a time. It is the oracle the
//! compiler's output is checked against (property tests) and computes the lab's expected reachability
//! matrices, so it is written for obviousness, not speed, and shares no code with the compiler beyond the
//! input types and [`LabelSelector::matches`].
//!
//! A packet (the first of a connection, original direction) is allowed when the source pod's egress allows
//! it AND the destination pod's ingress allows it. A direction is allowed when no policy of that direction
//! selects the pod (not isolated), or when at least one rule of one policy of that direction selecting the pod
//! matches (the union of policies). Choices the API leaves open are made as docs/policy.md says: a pod's traffic
//! to itself and its node's traffic to it (kubelet probes) are always allowed; host-network pods are neither
//! selected nor matched by pod selectors; ipBlocks match pod addresses too.

use std::net::Ipv4Addr;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use super::model::Packet;
use super::model::{
    Cluster, NetworkPolicy, Peer, Pod, PolicyPort, PolicyRule, PolicyType, PortRef, Protocol,
    Transport,
};
use super::selector::LabelSelector;

/// Why a direction lets a packet through without a rule matching it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Exemption {
    /// The endpoint is not a (pod-network) pod: an external or node address, or a host-network pod.
    NotAPod,
    /// No policy of this direction selects the pod.
    NotIsolated,
    /// A pod talking to itself (never leaves its network namespace).
    Loopback,
    /// From the destination pod's own node (kubelet probes).
    FromOwnNode,
}

/// The decision for one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirectionVerdict {
    Exempt(Exemption),
    /// Allowed by these policies (`namespace/name`), each with a matching rule.
    Allowed(Vec<String>),
    /// Isolated by these policies, none of which has a matching rule.
    Denied(Vec<String>),
}

impl DirectionVerdict {
    pub fn allows(&self) -> bool {
        !matches!(self, DirectionVerdict::Denied(_))
    }
}

/// The decision for a packet, per direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The source pod's egress.
    pub egress: DirectionVerdict,
    /// The destination pod's ingress.
    pub ingress: DirectionVerdict,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

/// Whether `packet` is allowed in `cluster`.
pub fn allows(cluster: &Cluster, packet: &Packet) -> bool {
    evaluate(cluster, packet).allowed()
}

/// The decision, with the policies that made it.
pub fn evaluate(cluster: &Cluster, packet: &Packet) -> Decision {
    let src = pod_by_ip(cluster, packet.src);
    let dst = pod_by_ip(cluster, packet.dst);
    if let (Some(s), Some(d)) = (src, dst)
        && s.namespace == d.namespace
        && s.name == d.name
    {
        return Decision {
            egress: DirectionVerdict::Exempt(Exemption::Loopback),
            ingress: DirectionVerdict::Exempt(Exemption::Loopback),
        };
    }
    let egress = match src {
        None => DirectionVerdict::Exempt(Exemption::NotAPod),
        Some(s) => direction(cluster, s, PolicyType::Egress, packet.dst, dst, packet),
    };
    let ingress = match dst {
        None => DirectionVerdict::Exempt(Exemption::NotAPod),
        Some(d) if from_own_node(cluster, d, packet.src) => {
            DirectionVerdict::Exempt(Exemption::FromOwnNode)
        }
        Some(d) => direction(cluster, d, PolicyType::Ingress, packet.src, src, packet),
    };
    Decision { egress, ingress }
}

/// The pod-network pod with this address (host-network pods share their node's and are never it).
fn pod_by_ip(cluster: &Cluster, ip: Ipv4Addr) -> Option<&Pod> {
    cluster
        .pods
        .iter()
        .filter(|p| !p.host_network && p.ip == Some(ip))
        .min_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
}

fn from_own_node(cluster: &Cluster, pod: &Pod, src: Ipv4Addr) -> bool {
    cluster
        .nodes
        .iter()
        .any(|n| n.name == pod.node && !pod.node.is_empty() && n.addresses.contains(&src))
}

/// `subject`'s verdict in `dir` for a packet whose other end is `peer_ip` (the pod `peer`, if it is one).
fn direction(
    cluster: &Cluster,
    subject: &Pod,
    dir: PolicyType,
    peer_ip: Ipv4Addr,
    peer: Option<&Pod>,
    packet: &Packet,
) -> DirectionVerdict {
    // Named ports are resolved on the destination pod, in both directions.
    let dst_pod = match dir {
        PolicyType::Ingress => Some(subject),
        PolicyType::Egress => peer,
    };
    let mut isolating = Vec::new();
    let mut allowing = Vec::new();
    for pol in &cluster.policies {
        if pol.namespace != subject.namespace || !pol.has_type(dir) || !selects(pol, subject) {
            continue;
        }
        isolating.push(pol.key());
        if pol
            .rules(dir)
            .iter()
            .any(|r| rule_matches(cluster, pol, r, peer_ip, peer, dst_pod, packet.transport))
        {
            allowing.push(pol.key());
        }
    }
    isolating.sort();
    allowing.sort();
    if isolating.is_empty() {
        DirectionVerdict::Exempt(Exemption::NotIsolated)
    } else if allowing.is_empty() {
        DirectionVerdict::Denied(isolating)
    } else {
        DirectionVerdict::Allowed(allowing)
    }
}

/// Whether `pol` selects `pod` (same namespace checked by the caller). An invalid `podSelector` selects the
/// whole namespace: a policy the API would have rejected isolates more, never less.
fn selects(pol: &NetworkPolicy, pod: &Pod) -> bool {
    if pod.host_network {
        return false;
    }
    pol.pod_selector.validate().is_err() || pol.pod_selector.matches(&pod.labels)
}

fn rule_matches(
    cluster: &Cluster,
    pol: &NetworkPolicy,
    rule: &PolicyRule,
    peer_ip: Ipv4Addr,
    peer: Option<&Pod>,
    dst_pod: Option<&Pod>,
    transport: Transport,
) -> bool {
    let peer_ok = rule.peers.is_empty()
        || rule
            .peers
            .iter()
            .any(|p| peer_matches(cluster, pol, p, peer_ip, peer));
    let port_ok = rule.ports.is_empty()
        || rule
            .ports
            .iter()
            .any(|p| port_matches(p, dst_pod, transport));
    peer_ok && port_ok
}

fn valid_selector(s: &Option<LabelSelector>) -> bool {
    s.as_ref().is_none_or(|s| s.validate().is_ok())
}

fn peer_matches(
    cluster: &Cluster,
    pol: &NetworkPolicy,
    peer: &Peer,
    ip: Ipv4Addr,
    pod: Option<&Pod>,
) -> bool {
    match (&peer.pod_selector, &peer.namespace_selector, &peer.ip_block) {
        (None, None, Some(block)) => ip_block_matches(&block.cidr, &block.except, ip),
        (None, None, None) | (_, _, Some(_)) => false, // not a shape the API accepts
        (ps, ns, None) => {
            if !valid_selector(ps) || !valid_selector(ns) {
                return false;
            }
            let Some(pod) = pod else { return false };
            let ns_ok = match ns {
                None => pod.namespace == pol.namespace,
                Some(sel) => cluster
                    .namespaces
                    .iter()
                    .find(|n| n.name == pod.namespace)
                    .is_some_and(|n| sel.matches(&n.labels)),
            };
            ns_ok && ps.as_ref().is_none_or(|s| s.matches(&pod.labels))
        }
    }
}

/// Parses an ipBlock CIDR: `Some(Some(net))` for IPv4 (host bits cleared), `Some(None)` for IPv6 (valid,
/// matches no IPv4 packet), `None` when it is not a CIDR.
fn parse_cidr(s: &str) -> Option<Option<Ipv4Net>> {
    if let Ok(n) = s.parse::<Ipv4Net>() {
        Some(Some(n.trunc()))
    } else if s.parse::<Ipv6Net>().is_ok() {
        Some(None)
    } else {
        None
    }
}

fn ip_block_matches(cidr: &str, except: &[String], ip: Ipv4Addr) -> bool {
    let Some(Some(net)) = parse_cidr(cidr) else {
        return false;
    };
    if !net.contains(&ip) {
        return false;
    }
    for e in except {
        match parse_cidr(e) {
            None => return false, // an except we cannot read: the block matches nothing rather than too much
            Some(Some(x)) if x.contains(&ip) => return false,
            Some(_) => {}
        }
    }
    true
}

fn port_matches(p: &PolicyPort, dst_pod: Option<&Pod>, transport: Transport) -> bool {
    let proto = match p.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(s) => match Protocol::from_api_str(s) {
            Some(proto) => proto,
            None => return false,
        },
    };
    let Transport::Port(pkt_proto, pkt_port) = transport else {
        return false;
    };
    if pkt_proto != proto {
        return false;
    }
    match (&p.port, p.end_port) {
        (None, None) => true,
        (None, Some(_)) => false,
        (Some(PortRef::Number(n)), end) => {
            let n = *n;
            if !(1..=65535).contains(&n) {
                return false;
            }
            match end {
                None => i32::from(pkt_port) == n,
                Some(e) if e < n || e > 65535 => false,
                Some(e) => (n..=e).contains(&i32::from(pkt_port)),
            }
        }
        (Some(PortRef::Name(_)), Some(_)) => false,
        (Some(PortRef::Name(name)), None) => dst_pod.is_some_and(|d| {
            d.named_ports
                .iter()
                .any(|np| &np.name == name && np.protocol == proto && np.port == pkt_port)
        }),
    }
}
