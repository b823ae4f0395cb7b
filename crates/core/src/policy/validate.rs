//! Checking a NetworkPolicy the way the API server would, and reducing its peers and ports to what the
//! compiler emits. Every value the compiler cannot express becomes a [`PolicyWarning`]; the entry it sits in
//! then matches nothing (never everything), so invalid input can only close traffic.

use std::net::Ipv4Addr;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use super::model::{NetworkPolicy, Peer, PolicyPort, PolicyType, PortRef, Protocol};
use super::ranges::{AddrRange, subtract};
use super::selector::{LabelSelector, SelectorError};

/// What is wrong with one entry of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Problem {
    #[error("protocol {0:?} is not TCP, UDP or SCTP; this port entry matches nothing")]
    UnsupportedProtocol(String),
    #[error("ipBlock cidr {0:?} is not a CIDR; this peer matches nothing")]
    NotACidr(String),
    #[error("ipBlock except {except:?} of {cidr:?} is not a CIDR; this peer matches nothing")]
    ExceptNotACidr { cidr: String, except: String },
    #[error("port {0} is outside 1-65535; this port entry matches nothing")]
    PortOutOfRange(i32),
    #[error("endPort {end} is below port {port} or above 65535; this port entry matches nothing")]
    EndPortInvalid { port: i32, end: i32 },
    #[error("endPort needs a numeric port; this port entry matches nothing")]
    EndPortWithoutNumericPort,
    #[error("invalid {role}: {error}; {consequence}")]
    InvalidSelector {
        role: SelectorRole,
        error: SelectorError,
        consequence: String,
    },
    #[error("a peer must be an ipBlock alone or one or both selectors; this peer matches nothing")]
    PeerShape,
}

/// Which selector of a policy is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectorRole {
    PodSelector,
    PeerPodSelector,
    PeerNamespaceSelector,
}

impl std::fmt::Display for SelectorRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SelectorRole::PodSelector => "spec.podSelector",
            SelectorRole::PeerPodSelector => "peer podSelector",
            SelectorRole::PeerNamespaceSelector => "peer namespaceSelector",
        })
    }
}

/// A problem, located: the policy (`namespace/name`) and where in it. This is what the API side turns into
/// an Event on the policy and what the agent counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyWarning {
    pub policy: String,
    /// `spec.podSelector`, `spec.ingress[0].from[1]`, `spec.egress[2].ports[0]`, …
    pub field: String,
    pub problem: Problem,
}

impl std::fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.policy, self.field, self.problem)
    }
}

/// A peer reduced to what the compiler emits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NormPeer {
    /// The IPv4 ranges of an ipBlock minus its excepts (empty for an IPv6 block).
    Block(Vec<AddrRange>),
    /// Pods matched by selectors; `namespace: None` means the policy's own namespace.
    Pods {
        namespace: Option<LabelSelector>,
        pods: Option<LabelSelector>,
    },
}

/// A port entry reduced to what the compiler emits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NormPort {
    Range(Protocol, u16, u16),
    Named(Protocol, String),
}

/// All problems of one policy, in field order.
pub fn validate(policy: &NetworkPolicy) -> Vec<PolicyWarning> {
    let mut out = Vec::new();
    if let Err(error) = policy.pod_selector.validate() {
        out.push(PolicyWarning {
            policy: policy.key(),
            field: "spec.podSelector".into(),
            problem: Problem::InvalidSelector {
                role: SelectorRole::PodSelector,
                error,
                consequence: "the policy selects every pod of its namespace".into(),
            },
        });
    }
    for dir in [PolicyType::Ingress, PolicyType::Egress] {
        let (section, peers_field) = match dir {
            PolicyType::Ingress => ("ingress", "from"),
            PolicyType::Egress => ("egress", "to"),
        };
        for (i, rule) in policy.rules(dir).iter().enumerate() {
            for (j, peer) in rule.peers.iter().enumerate() {
                if let Err(problem) = norm_peer(peer) {
                    out.push(PolicyWarning {
                        policy: policy.key(),
                        field: format!("spec.{section}[{i}].{peers_field}[{j}]"),
                        problem,
                    });
                }
            }
            for (j, port) in rule.ports.iter().enumerate() {
                if let Err(problem) = norm_port(port) {
                    out.push(PolicyWarning {
                        policy: policy.key(),
                        field: format!("spec.{section}[{i}].ports[{j}]"),
                        problem,
                    });
                }
            }
        }
    }
    out
}

fn parse_cidr(s: &str) -> Option<Option<Ipv4Net>> {
    if let Ok(n) = s.parse::<Ipv4Net>() {
        Some(Some(n.trunc()))
    } else if s.parse::<Ipv6Net>().is_ok() {
        Some(None)
    } else {
        None
    }
}

fn net_range(n: Ipv4Net) -> AddrRange {
    AddrRange::new(n.network(), n.broadcast())
}

fn selector_ok(s: &Option<LabelSelector>, role: SelectorRole) -> Result<(), Problem> {
    match s {
        Some(sel) => sel.validate().map_err(|error| Problem::InvalidSelector {
            role,
            error,
            consequence: "this peer matches nothing".into(),
        }),
        None => Ok(()),
    }
}

pub(crate) fn norm_peer(peer: &Peer) -> Result<NormPeer, Problem> {
    match (&peer.pod_selector, &peer.namespace_selector, &peer.ip_block) {
        (None, None, Some(block)) => {
            let Some(net) = parse_cidr(&block.cidr) else {
                return Err(Problem::NotACidr(block.cidr.clone()));
            };
            let mut holes = Vec::new();
            for e in &block.except {
                match parse_cidr(e) {
                    None => {
                        return Err(Problem::ExceptNotACidr {
                            cidr: block.cidr.clone(),
                            except: e.clone(),
                        });
                    }
                    Some(Some(x)) => holes.push(net_range(x)),
                    Some(None) => {}
                }
            }
            Ok(NormPeer::Block(match net {
                Some(n) => subtract(net_range(n), &holes),
                None => Vec::new(),
            }))
        }
        (None, None, None) | (_, _, Some(_)) => Err(Problem::PeerShape),
        (ps, ns, None) => {
            selector_ok(ps, SelectorRole::PeerPodSelector)?;
            selector_ok(ns, SelectorRole::PeerNamespaceSelector)?;
            Ok(NormPeer::Pods {
                namespace: ns.clone(),
                pods: ps.clone(),
            })
        }
    }
}

pub(crate) fn norm_port(p: &PolicyPort) -> Result<NormPort, Problem> {
    let proto = match p.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(s) => {
            Protocol::from_api_str(s).ok_or_else(|| Problem::UnsupportedProtocol(s.into()))?
        }
    };
    match (&p.port, p.end_port) {
        (None, None) => Ok(NormPort::Range(proto, 0, u16::MAX)),
        (None, Some(_)) | (Some(PortRef::Name(_)), Some(_)) => {
            Err(Problem::EndPortWithoutNumericPort)
        }
        (Some(PortRef::Name(n)), None) => Ok(NormPort::Named(proto, n.clone())),
        (Some(PortRef::Number(n)), end) => {
            let n = *n;
            if !(1..=65535).contains(&n) {
                return Err(Problem::PortOutOfRange(n));
            }
            let e = end.unwrap_or(n);
            if e < n || e > 65535 {
                return Err(Problem::EndPortInvalid { port: n, end: e });
            }
            Ok(NormPort::Range(proto, n as u16, e as u16))
        }
    }
}

/// Whether `ip` lies in one of `ranges`.
pub(crate) fn in_ranges(ranges: &[AddrRange], ip: Ipv4Addr) -> bool {
    ranges.iter().any(|r| r.contains(ip))
}
