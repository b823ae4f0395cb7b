//! Kubernetes objects (k8s-openapi) → the plain inputs of [`underlay_core::policy`]. Pure; shared by the agent's
//! follower and the controller's policy check.
//!
//! Values the API server would reject are passed through as they are (an unknown protocol, an ipBlock that is
//! not a CIDR, a port out of range, an unknown selector operator): the compiler turns each into a warning and an
//! entry that matches nothing. Only what the model cannot hold at all is dropped here, and said so: an unknown
//! `policyTypes` value (the API server refuses it), and pods that have finished (`Succeeded`, `Failed`), whose
//! address may already belong to another pod.

use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Pod as K8sPod};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy as K8sNetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as K8sSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use underlay_core::policy::{
    IpBlock, LabelSelector, NamedPort, Namespace, NetworkPolicy, Operator, Peer, Pod, PolicyPort,
    PolicyRule, PolicyType, PortRef, Protocol, Requirement,
};

/// `namespace/name` of an object.
pub type ObjectKey = (String, String);

/// The key of a namespaced object (`("", name)` for a cluster-scoped one).
pub fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// A label selector as the model holds it.
pub fn selector(s: &K8sSelector) -> LabelSelector {
    LabelSelector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: s
            .match_expressions
            .iter()
            .flatten()
            .map(|r| Requirement {
                key: r.key.clone(),
                operator: match r.operator.as_str() {
                    "In" => Operator::In,
                    "NotIn" => Operator::NotIn,
                    "Exists" => Operator::Exists,
                    "DoesNotExist" => Operator::DoesNotExist,
                    other => Operator::Other(other.to_string()),
                },
                values: r.values.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

pub fn namespace(ns: &K8sNamespace) -> Namespace {
    Namespace {
        name: ns.metadata.name.clone().unwrap_or_default(),
        labels: ns.metadata.labels.clone().unwrap_or_default(),
    }
}

/// Whether a pod has finished: its address is no longer its own.
pub fn is_finished(pod: &K8sPod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// A pod as policy sees it. Container ports without a name, or with a protocol or number the model cannot
/// hold, cannot be named by a policy and are left out.
pub fn pod(pod: &K8sPod) -> Pod {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let ip = status
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok());
    let mut named_ports: Vec<NamedPort> = spec
        .into_iter()
        .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(NamedPort {
                name: p.name.clone()?,
                protocol: Protocol::from_api_str(p.protocol.as_deref().unwrap_or("TCP"))?,
                port: u16::try_from(p.container_port).ok()?,
            })
        })
        .collect();
    named_ports.sort();
    named_ports.dedup();
    Pod {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ip,
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        named_ports,
    }
}

fn peer(p: &NetworkPolicyPeer) -> Peer {
    Peer {
        pod_selector: p.pod_selector.as_ref().map(selector),
        namespace_selector: p.namespace_selector.as_ref().map(selector),
        ip_block: p.ip_block.as_ref().map(|b: &IPBlock| IpBlock {
            cidr: b.cidr.clone(),
            except: b.except.clone().unwrap_or_default(),
        }),
    }
}

fn port(p: &NetworkPolicyPort) -> PolicyPort {
    PolicyPort {
        protocol: p.protocol.clone(),
        port: p.port.as_ref().map(|port| match port {
            IntOrString::Int(n) => PortRef::Number(*n),
            IntOrString::String(s) => PortRef::Name(s.clone()),
        }),
        end_port: p.end_port,
    }
}

fn rule(
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
) -> PolicyRule {
    PolicyRule {
        peers: peers.into_iter().flatten().map(peer).collect(),
        ports: ports.into_iter().flatten().map(port).collect(),
    }
}

/// A NetworkPolicy as the model holds it. A missing `spec.podSelector` is the empty selector (every pod of
/// the namespace), as the API server defaults it.
pub fn network_policy(np: &K8sNetworkPolicy) -> NetworkPolicy {
    let spec = np.spec.clone().unwrap_or_default();
    NetworkPolicy {
        namespace: np.metadata.namespace.clone().unwrap_or_default(),
        name: np.metadata.name.clone().unwrap_or_default(),
        pod_selector: spec.pod_selector.as_ref().map(selector).unwrap_or_default(),
        policy_types: spec
            .policy_types
            .iter()
            .flatten()
            .filter_map(|t| match t.as_str() {
                "Ingress" => Some(PolicyType::Ingress),
                "Egress" => Some(PolicyType::Egress),
                _ => None,
            })
            .collect(),
        ingress: spec
            .ingress
            .iter()
            .flatten()
            .map(|r| rule(r.from.as_ref(), r.ports.as_ref()))
            .collect(),
        egress: spec
            .egress
            .iter()
            .flatten()
            .map(|r| rule(r.to.as_ref(), r.ports.as_ref()))
            .collect(),
    }
}

/// A selector as the API server's `labelSelector` query parameter, or `None` if it is invalid (an unknown
/// operator, `In` without values, …): such a selector selects nothing as a peer, so nothing is watched.
pub fn selector_query(s: &LabelSelector) -> Option<String> {
    s.validate().ok()?;
    let mut terms: Vec<String> = s
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for r in &s.match_expressions {
        let mut values = r.values.clone();
        values.sort();
        terms.push(match r.operator {
            Operator::In => format!("{} in ({})", r.key, values.join(",")),
            Operator::NotIn => format!("{} notin ({})", r.key, values.join(",")),
            Operator::Exists => r.key.clone(),
            Operator::DoesNotExist => format!("!{}", r.key),
            Operator::Other(_) => return None,
        });
    }
    terms.sort();
    terms.dedup();
    Some(terms.join(","))
}
