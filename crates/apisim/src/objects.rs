//! Builders for the policy-relevant objects tests and the lab put into the stand-in (or send through a client):
//! Namespaces, Pods with named container ports and an address, NetworkPolicies from plain YAML.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// A Namespace with `labels` (the API server adds `kubernetes.io/metadata.name` itself).
pub fn namespace(name: &str, extra_labels: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: labels(extra_labels),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// One container port: `(name, port, protocol)` such as `("serve-80-tcp", 80, "TCP")`.
pub type NamedPort<'a> = (&'a str, i32, &'a str);

/// A running Pod on `node` with address `ip` (`None`: not yet assigned) and one container exposing `ports`.
pub fn pod(
    namespace: &str,
    name: &str,
    node: &str,
    ip: Option<&str>,
    pod_labels: &[(&str, &str)],
    ports: &[NamedPort<'_>],
) -> Pod {
    let container_ports = ports
        .iter()
        .map(|(n, p, proto)| ContainerPort {
            name: Some(n.to_string()),
            container_port: *p,
            protocol: Some(proto.to_string()),
            ..Default::default()
        })
        .collect::<Vec<_>>();
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: labels(pod_labels),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "c".into(),
                image: Some("pause".into()),
                ports: (!container_ports.is_empty()).then_some(container_ports),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some(if ip.is_some() { "Running" } else { "Pending" }.into()),
            pod_ip: ip.map(str::to_string),
            pod_ips: ip.map(|ip| vec![PodIP { ip: ip.to_string() }]),
            ..Default::default()
        }),
    }
}

/// A NetworkPolicy from a plain Kubernetes manifest (YAML or JSON).
pub fn network_policy(manifest: &str) -> Result<NetworkPolicy, serde_yaml::Error> {
    serde_yaml::from_str(manifest)
}
