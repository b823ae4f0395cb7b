//! The inputs of network policy, as plain data: what the API follower hands the agent and what the lab hands
//! the evaluator. Shapes mirror `networking.k8s.io/v1` field by field, and values the API server would reject
//! (an unknown protocol, an ipBlock that is not a CIDR, a port out of range) are representable on purpose: the
//! compiler reports them as [`super::PolicyWarning`]s instead of the converter dropping them silently.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::selector::LabelSelector;

/// Labels of a namespace or a pod.
pub type Labels = BTreeMap<String, String>;

/// A namespace: its name and labels (the API server sets `kubernetes.io/metadata.name` itself; the converter
/// passes labels as they are).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

/// A transport protocol a NetworkPolicy port can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// All of them, in a fixed order.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The API's spelling (`TCP`, `UDP`, `SCTP`).
    pub fn as_api_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// Parses the API's spelling (exact, as the API server validates it).
    pub fn from_api_str(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The IP protocol number.
    pub fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

/// A named container port of a pod (`spec.containers[].ports[]` with a name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// A pod, as policy sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    /// Its IPv4 address (`status.podIP`); `None` until it has one. A pod without an address is in no set.
    pub ip: Option<Ipv4Addr>,
    /// The node it runs on (`spec.nodeName`), empty while unscheduled.
    #[serde(default)]
    pub node: String,
    /// `spec.hostNetwork`: such a pod shares its node's addresses; policy never selects it and pod selectors
    /// never match it as a peer (see docs/policy.md).
    #[serde(default)]
    pub host_network: bool,
    /// Named container ports, for ports a policy names.
    #[serde(default)]
    pub named_ports: Vec<NamedPort>,
}

/// A node's own addresses (its InternalIPs): traffic from them to the node's own pods is the kubelet's
/// (probes) and is always allowed (see docs/policy.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    #[serde(default)]
    pub addresses: Vec<Ipv4Addr>,
}

/// `spec.policyTypes[]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyType {
    Ingress,
    Egress,
}

/// `ipBlock`: kept as text, so a value that is not an IPv4 CIDR reaches the compiler and becomes a warning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default)]
    pub except: Vec<String>,
}

/// One `from`/`to` entry. Valid shapes (as the API validates them): an `ip_block` alone, or one or both of the
/// selectors. `namespace_selector` alone selects every pod of the matching namespaces; `pod_selector` alone
/// selects pods of the policy's own namespace; both select matching pods in matching namespaces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    #[serde(default)]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default)]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default)]
    pub ip_block: Option<IpBlock>,
}

/// A port as the API writes it: a number or the name of a container port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortRef {
    /// Kept as the API's int32 so an out-of-range value reaches the compiler.
    Number(i32),
    Name(String),
}

/// One `ports[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyPort {
    /// The API's string (`TCP` when absent): kept as text so an unsupported value becomes a warning.
    #[serde(default)]
    pub protocol: Option<String>,
    /// `None`: every port of the protocol.
    #[serde(default)]
    pub port: Option<PortRef>,
    /// With a numeric `port`: the inclusive end of a range.
    #[serde(default)]
    pub end_port: Option<i32>,
}

/// One ingress rule (`from` + `ports`) or egress rule (`to` + `ports`). Empty `peers`: every address; empty
/// `ports`: every port and protocol (ICMP included).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRule {
    #[serde(default)]
    pub peers: Vec<Peer>,
    #[serde(default)]
    pub ports: Vec<PolicyPort>,
}

/// A NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    /// Selects the pods of `namespace` the policy applies to (empty selector: all of them).
    pub pod_selector: LabelSelector,
    /// Explicit `spec.policyTypes`; empty means inferred as the API does: `Ingress` always, `Egress` when
    /// there are egress rules.
    #[serde(default)]
    pub policy_types: Vec<PolicyType>,
    #[serde(default)]
    pub ingress: Vec<PolicyRule>,
    #[serde(default)]
    pub egress: Vec<PolicyRule>,
}

impl NetworkPolicy {
    /// Whether the policy applies in `dir` (explicit types, or the API's inference when none are given).
    pub fn has_type(&self, dir: PolicyType) -> bool {
        if self.policy_types.is_empty() {
            match dir {
                PolicyType::Ingress => true,
                PolicyType::Egress => !self.egress.is_empty(),
            }
        } else {
            self.policy_types.contains(&dir)
        }
    }

    /// The rules for `dir`.
    pub fn rules(&self, dir: PolicyType) -> &[PolicyRule] {
        match dir {
            PolicyType::Ingress => &self.ingress,
            PolicyType::Egress => &self.egress,
        }
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Everything policy depends on, cluster-wide (or the projection of it an agent needs).
///
/// Pods are expected to have distinct addresses (the converter drops pods that are finished: `Succeeded`,
/// `Failed`); host-network pods may share their node's address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub pods: Vec<Pod>,
    #[serde(default)]
    pub policies: Vec<NetworkPolicy>,
    #[serde(default)]
    pub nodes: Vec<Node>,
}

/// A packet's transport header, as far as policy looks at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Transport {
    /// TCP, UDP or SCTP with the destination port.
    Port(Protocol, u16),
    /// Any other IP protocol (ICMP is 1), by number: only rules without ports match it.
    Other(u8),
}

/// The first packet of a connection (original direction): what the evaluator decides about. Replies of an
/// allowed connection are allowed by conntrack and are not asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub transport: Transport,
}
