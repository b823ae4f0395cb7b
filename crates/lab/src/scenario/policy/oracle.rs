//! The expected matrix: what the API's semantics say for a [`World`], per protocol and port.
//!
//! Loopback is always reachable (a pod talking to itself never leaves its namespace, so no node-side policy sees
//! it), as the e2e suite's `AllowLoopback` has it.

use underlay_core::policy;

use super::model::World;
use super::probe::Protocol;
use super::table::TruthTable;

/// Computes the expected truth table of a world for one protocol and port.
pub trait Evaluator {
    /// A short name for reports.
    fn name(&self) -> &'static str;
    fn table(&self, world: &World, proto: Protocol, port: u16) -> anyhow::Result<TruthTable>;
}

/// Sets every `p → p` cell reachable.
pub fn allow_loopback(t: &mut TruthTable) {
    for k in t.froms.clone() {
        t.set(&k, &k, true);
    }
}

/// The evaluator that knows only the world without policies: everything reachable. Any policy is an error, not a
/// guess.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPolicies;

impl Evaluator for NoPolicies {
    fn name(&self) -> &'static str {
        "no-policies"
    }

    fn table(&self, world: &World, _: Protocol, _: u16) -> anyhow::Result<TruthTable> {
        if !world.policies.is_empty() {
            anyhow::bail!(
                "no evaluator of NetworkPolicy semantics is available: give this case's tables in `expect`"
            );
        }
        Ok(TruthTable::filled(world.keys(), world.keys(), true))
    }
}

/// The core's evaluator (`underlay_core::policy::evaluate`), a direct reading of the API's semantics, over the
/// world converted as the agents convert the API's objects.
#[derive(Debug, Clone, Copy, Default)]
pub struct CoreEvaluator;

impl CoreEvaluator {
    /// The world as the core's inputs.
    pub fn cluster(world: &World) -> policy::Cluster {
        let mut nodes: std::collections::BTreeMap<String, policy::Node> = Default::default();
        for p in &world.pods {
            nodes.entry(p.node.clone()).or_insert_with(|| policy::Node {
                name: p.node.clone(),
                addresses: vec![p.host_ip],
            });
        }
        policy::Cluster {
            namespaces: world
                .namespaces
                .iter()
                .map(|(name, labels)| policy::Namespace {
                    name: name.clone(),
                    labels: labels.clone(),
                })
                .collect(),
            pods: world
                .pods
                .iter()
                .map(|p| policy::Pod {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    labels: p.labels.clone(),
                    ip: Some(p.ip),
                    node: p.node.clone(),
                    host_network: false,
                    named_ports: p
                        .ports()
                        .into_iter()
                        .map(|(name, port, proto)| policy::NamedPort {
                            name,
                            protocol: core_protocol(proto),
                            port,
                        })
                        .collect(),
                })
                .collect(),
            policies: world
                .policies
                .iter()
                .map(underlay_api::policy::network_policy)
                .collect(),
            nodes: nodes.into_values().collect(),
        }
    }
}

fn core_protocol(p: Protocol) -> policy::Protocol {
    match p {
        Protocol::Tcp => policy::Protocol::Tcp,
        Protocol::Udp => policy::Protocol::Udp,
        Protocol::Sctp => policy::Protocol::Sctp,
    }
}

impl Evaluator for CoreEvaluator {
    fn name(&self) -> &'static str {
        "core"
    }

    fn table(&self, world: &World, proto: Protocol, port: u16) -> anyhow::Result<TruthTable> {
        let cluster = Self::cluster(world);
        let keys = world.keys();
        let mut t = TruthTable::new(keys.clone(), keys);
        for s in &world.pods {
            for d in &world.pods {
                let packet = policy::Packet {
                    src: s.ip,
                    dst: d.ip,
                    transport: policy::Transport::Port(core_protocol(proto), port),
                };
                t.set(&s.key(), &d.key(), policy::allows(&cluster, &packet));
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::policy::cases::{ModelNames, expand, parse};
    use crate::scenario::policy::model::{NAMESPACES, POD_NAMES, WorldPod};

    fn world() -> World {
        let mut pods = Vec::new();
        for (i, ns) in NAMESPACES.iter().enumerate() {
            for (j, p) in POD_NAMES.iter().enumerate() {
                pods.push(WorldPod {
                    namespace: ns.to_string(),
                    name: p.to_string(),
                    labels: World::base_pod_labels(p),
                    ip: std::net::Ipv4Addr::new(100, 64, i as u8, 10 + j as u8),
                    node: format!("node-{j}"),
                    host_ip: std::net::Ipv4Addr::new(198, 18, 0, 10 + j as u8),
                });
            }
        }
        World {
            namespaces: NAMESPACES
                .iter()
                .map(|n| (n.to_string(), World::base_namespace_labels(n)))
                .collect(),
            pods,
            policies: vec![],
        }
    }

    /// Checks every hand-written table of a cases file against the core's evaluator.
    fn agrees(text: &str) -> usize {
        let w = world();
        let names = ModelNames {
            namespaces: NAMESPACES.iter().map(|s| s.to_string()).collect(),
            pods: w.keys(),
        };
        let ips = w.pods.iter().map(|p| (p.key(), p.ip)).collect();
        let cases = parse(&expand(text, &ips).unwrap(), &names).unwrap();
        let mut checked = 0;
        for c in &cases {
            let cw = w.with_case(&c.namespace_labels, &c.pod_labels, &c.policies);
            for ((proto, port), want) in &c.expect {
                let mut got = CoreEvaluator.table(&cw, *proto, *port).unwrap();
                allow_loopback(&mut got);
                assert!(
                    want.mismatches(&got).is_empty(),
                    "{} {proto:?}/{port}:\n{}",
                    c.name,
                    super::super::table::side_by_side(&[("table", want), ("core", &got)])
                );
                checked += 1;
            }
            // Every other case has an answer too (no policy the evaluator cannot read).
            for (proto, port) in crate::scenario::policy::probe::services() {
                CoreEvaluator.table(&cw, proto, port).unwrap();
            }
        }
        checked
    }

    /// The lab's two sources of truth agree before any packet is sent: the hand-written tables of the built-in
    /// sequence and of the shipped example are what the core's evaluator computes.
    #[test]
    fn the_core_evaluator_agrees_with_every_hand_written_table() {
        assert!(agrees(super::super::cases::UPSTREAM) >= 3);
        assert!(agrees(include_str!("../../../../../examples/policy-cases.yaml")) >= 5);
    }

    #[test]
    fn default_deny_ingress_blocks_only_the_namespace_it_is_in() {
        let w = world();
        let policies = parse(
            "cases:\n- name: d\n  policies:\n  - apiVersion: networking.k8s.io/v1\n    kind: NetworkPolicy\n    metadata: {name: d, namespace: y}\n    spec: {podSelector: {}, policyTypes: [Ingress]}\n",
            &ModelNames {
                namespaces: NAMESPACES.iter().map(|s| s.to_string()).collect(),
                pods: w.keys(),
            },
        )
        .unwrap()
        .remove(0)
        .policies;
        let cw = w.with_case(&Default::default(), &Default::default(), &policies);
        let t = CoreEvaluator.table(&cw, Protocol::Sctp, 81).unwrap();
        assert_eq!(t.get("x/a", "y/b"), Some(false));
        assert_eq!(t.get("y/a", "y/b"), Some(false));
        assert_eq!(t.get("y/b", "x/a"), Some(true));
        assert_eq!(t.get("y/b", "y/b"), Some(true), "loopback");
    }
}
