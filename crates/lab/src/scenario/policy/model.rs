//! The model the Kubernetes e2e NetworkPolicy tests use: namespaces x, y, z (labelled
//! `kubernetes.io/metadata.name: <ns>` as the API server labels them), pods a, b, c in each (label `pod: <name>`),
//! every pod serving TCP, UDP and SCTP on ports 80 and 81 with the container ports named `serve-<port>-<proto>`.
//!
//! [`World`] is the model's state at one moment (labels after a case's changes, the policies in force): what the
//! evaluator computes the expected reachability from, and what the API holds.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::cases::LabelChanges;
use super::probe::{Protocol, port_name, services};

/// The model's namespaces and pod names, in table order.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];
/// The label the API server puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The label each model pod carries with its own name.
pub const POD_LABEL: &str = "pod";

pub type Labels = BTreeMap<String, String>;

/// One pod of the model, once wired.
#[derive(Debug, Clone)]
pub struct WorldPod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ip: Ipv4Addr,
    /// The node it runs on (Kubernetes name) and that node's address.
    pub node: String,
    pub host_ip: Ipv4Addr,
}

impl WorldPod {
    /// `ns/pod`, as the truth tables name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The pod's named container ports: `(name, port, protocol)`.
    pub fn ports(&self) -> Vec<(String, u16, Protocol)> {
        services()
            .into_iter()
            .map(|(p, port)| (port_name(port, p), port, p))
            .collect()
    }
}

/// The model at one moment.
#[derive(Debug, Clone, Default)]
pub struct World {
    pub namespaces: BTreeMap<String, Labels>,
    pub pods: Vec<WorldPod>,
    pub policies: Vec<NetworkPolicy>,
}

impl World {
    /// Table row and column names, in order: x/a, x/b, x/c, y/a, …
    pub fn keys(&self) -> Vec<String> {
        self.pods.iter().map(WorldPod::key).collect()
    }

    /// The model's labels as built.
    pub fn base_namespace_labels(ns: &str) -> Labels {
        [(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())].into()
    }

    pub fn base_pod_labels(pod: &str) -> Labels {
        [(POD_LABEL.to_string(), pod.to_string())].into()
    }

    /// This world with a case's label changes and policies (the labels start from the model as built).
    pub fn with_case(
        &self,
        namespace_labels: &BTreeMap<String, LabelChanges>,
        pod_labels: &BTreeMap<String, LabelChanges>,
        policies: &[NetworkPolicy],
    ) -> World {
        let mut w = self.clone();
        for (ns, labels) in &mut w.namespaces {
            *labels = Self::base_namespace_labels(ns);
            if let Some(c) = namespace_labels.get(ns) {
                apply(labels, c);
            }
        }
        for p in &mut w.pods {
            p.labels = Self::base_pod_labels(&p.name);
            if let Some(c) = pod_labels.get(&p.key()) {
                apply(&mut p.labels, c);
            }
        }
        w.policies = policies.to_vec();
        w
    }
}

fn apply(labels: &mut Labels, changes: &LabelChanges) {
    for (k, v) in changes {
        match v {
            Some(v) => {
                labels.insert(k.clone(), v.clone());
            }
            None => {
                labels.remove(k);
            }
        }
    }
}

/// The Namespace object of `ns` with `labels`.
pub fn kube_namespace(ns: &str, labels: &Labels) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(ns.to_string()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The Pod object of a model pod: scheduled on its node; with its address and phase Running once `ip` is known
/// (kubelet writes the status after the sandbox's CNI ADD).
pub fn kube_pod(
    ns: &str,
    name: &str,
    labels: &Labels,
    node: &str,
    ip: Option<(Ipv4Addr, Ipv4Addr)>,
) -> Pod {
    // One container per served port and protocol, as the e2e suite's pods have.
    let containers = services()
        .into_iter()
        .map(|(proto, port)| Container {
            name: format!("cont-{port}-{}", proto.as_str()),
            image: Some("underlay-lab/serve".to_string()),
            ports: Some(vec![ContainerPort {
                name: Some(port_name(port, proto)),
                container_port: i32::from(port),
                protocol: Some(proto.kube_name().to_string()),
                ..Default::default()
            }]),
            ..Default::default()
        })
        .collect();
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(ns.to_string()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_string()),
            containers,
            ..Default::default()
        }),
        status: Some(match ip {
            Some((ip, host)) => PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(ip.to_string()),
                pod_ips: Some(vec![PodIP { ip: ip.to_string() }]),
                host_ip: Some(host.to_string()),
                ..Default::default()
            },
            None => PodStatus {
                phase: Some("Pending".into()),
                ..Default::default()
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> World {
        World {
            namespaces: NAMESPACES
                .iter()
                .map(|n| (n.to_string(), World::base_namespace_labels(n)))
                .collect(),
            pods: NAMESPACES
                .iter()
                .flat_map(|ns| {
                    POD_NAMES.iter().map(move |p| WorldPod {
                        namespace: ns.to_string(),
                        name: p.to_string(),
                        labels: World::base_pod_labels(p),
                        ip: Ipv4Addr::new(100, 64, 0, 1),
                        node: "n".into(),
                        host_ip: Ipv4Addr::new(198, 18, 0, 5),
                    })
                })
                .collect(),
            policies: vec![],
        }
    }

    #[test]
    fn a_case_starts_from_the_built_labels_and_applies_its_changes() {
        let w = world();
        let ns: BTreeMap<String, LabelChanges> = [(
            "y".to_string(),
            [
                ("team".to_string(), Some("blue".to_string())),
                (NAMESPACE_NAME_LABEL.to_string(), None),
            ]
            .into(),
        )]
        .into();
        let pods: BTreeMap<String, LabelChanges> = [(
            "x/a".to_string(),
            [("pod".to_string(), Some("z".to_string()))].into(),
        )]
        .into();
        let changed = w.with_case(&ns, &pods, &[]);
        assert_eq!(
            changed.namespaces["y"],
            [("team".into(), "blue".into())].into()
        );
        assert_eq!(changed.pods[0].labels["pod"], "z");
        // The next case starts over from the model as built.
        let back = changed.with_case(&BTreeMap::new(), &BTreeMap::new(), &[]);
        assert_eq!(back.namespaces["y"], World::base_namespace_labels("y"));
        assert_eq!(back.pods[0].labels, World::base_pod_labels("a"));
        assert_eq!(back.keys()[..4], ["x/a", "x/b", "x/c", "y/a"]);
    }

    #[test]
    fn pods_carry_the_e2e_port_names() {
        let w = world();
        let names: Vec<String> = w.pods[0].ports().into_iter().map(|p| p.0).collect();
        assert_eq!(
            names,
            [
                "serve-80-tcp",
                "serve-81-tcp",
                "serve-80-udp",
                "serve-81-udp",
                "serve-80-sctp",
                "serve-81-sctp"
            ]
        );
        let pod = kube_pod(
            "x",
            "a",
            &World::base_pod_labels("a"),
            "ip-198-18-0-5",
            Some((Ipv4Addr::new(100, 64, 0, 9), Ipv4Addr::new(198, 18, 0, 5))),
        );
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("ip-198-18-0-5"));
        let port = &spec.containers[5].ports.as_ref().unwrap()[0];
        assert_eq!(
            (
                port.name.as_deref(),
                port.container_port,
                port.protocol.as_deref()
            ),
            (Some("serve-81-sctp"), 81, Some("SCTP"))
        );
        assert_eq!(pod.status.unwrap().pod_ip.as_deref(), Some("100.64.0.9"));
    }
}
