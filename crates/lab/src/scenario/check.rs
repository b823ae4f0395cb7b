//! `lab check`: a connectivity matrix over every path class, with per-class latency, and the proof that no
//! encapsulation device exists anywhere in the lab.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::Serialize;
use underlay_cloud::RouteTarget;

use super::echo::{EchoClient, EchoServers};
use super::{Lab, progress};
use crate::{INTERNET_HOST, kernel};

/// How a packet travels between two endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathClass {
    /// Pod → pod on the same node (through the node, no fabric).
    SameNode,
    /// Pod → pod on a peer in the same subnet (the agent's peer route, one hop through the fabric).
    SameSubnet,
    /// Pod → pod in another subnet whose VPC route targets the destination's own node.
    OtherSubnetDirect,
    /// Pod → pod in another subnet through an aggregated VPC route to a forwarder.
    OtherSubnetForwarder,
    /// Pod → pod in another subnet whose block no VPC route in the source's table covers (a fault).
    OtherSubnetUnrouted,
    /// Eni mode: pod → pod in another subnet; the VPC delivers to the ENI that owns the address (no route).
    OtherSubnetEni,
    /// Pod → a node's address (its own and others).
    PodToNode,
    /// Eni mode: pod → a VPC host outside the cluster (the controller's host: no agent, no pod routes).
    PodToVpcHost,
    /// Pod → the internet host (SNAT to the node's address, through the IGW).
    PodToInternet,
    /// Reference: node → node in the same subnet.
    NodeNodeSameSubnet,
    /// Reference: node → node in another subnet.
    NodeNodeOtherSubnet,
}

impl PathClass {
    pub fn as_str(self) -> &'static str {
        match self {
            PathClass::SameNode => "same_node",
            PathClass::SameSubnet => "same_subnet",
            PathClass::OtherSubnetDirect => "other_subnet_direct",
            PathClass::OtherSubnetForwarder => "other_subnet_forwarder",
            PathClass::OtherSubnetUnrouted => "other_subnet_unrouted",
            PathClass::OtherSubnetEni => "other_subnet_eni",
            PathClass::PodToVpcHost => "pod_to_vpc_host",
            PathClass::PodToNode => "pod_to_node",
            PathClass::PodToInternet => "pod_to_internet",
            PathClass::NodeNodeSameSubnet => "node_node_same_subnet",
            PathClass::NodeNodeOtherSubnet => "node_node_other_subnet",
        }
    }
}

/// Reachability and latency of one class.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClassResult {
    pub pairs: usize,
    pub ok: usize,
    /// Median and 99th percentile round trip (µs) over timed exchanges on reachable pairs.
    pub p50_us: f64,
    pub p99_us: f64,
    /// A few pairs that failed, for the report.
    pub failed: Vec<String>,
}

/// What `lab check` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub pairs_checked: usize,
    pub pairs_ok: usize,
    /// Some classes were sampled rather than checked pair by pair (large labs).
    pub sampled: bool,
    pub classes: BTreeMap<&'static str, ClassResult>,
    /// Median round trip per class (µs).
    pub latency_us: BTreeMap<&'static str, f64>,
    /// Pod↔pod on the same-subnet direct path over node↔node in the same subnet (medians).
    pub direct_vs_node_ratio: Option<f64>,
    /// Encapsulation devices found (vxlan, geneve, ipip, gre, sit…): must be empty.
    pub encap_devices: Vec<String>,
    /// Namespaces whose links were inspected.
    pub namespaces_inspected: usize,
}

impl CheckReport {
    pub fn passed(&self) -> bool {
        self.pairs_checked > 0
            && self.pairs_ok == self.pairs_checked
            && self.encap_devices.is_empty()
    }
}

/// Full pod×pod matrices up to this many pairs; beyond it, each pod checks a sample per class.
const FULL_MATRIX_MAX: usize = 20_000;
/// Per source pod and class when sampling.
const SAMPLE_PER_CLASS: usize = 6;
/// Timed round trips per pair on the latency sample, and pairs per class in it.
const LATENCY_ROUNDS: usize = 40;
const LATENCY_PAIRS: usize = 12;

struct Endpoint {
    netns: String,
    ip: Ipv4Addr,
    node: usize,
}

impl Lab {
    /// The path class of pod `a` → pod `b`, from the VPC route tables as they are now.
    pub fn pod_class(&self, snap: &underlay_vpcsim::Snapshot, a: usize, b: usize) -> PathClass {
        let (pa, pb) = (&self.pods[a], &self.pods[b]);
        let (na, nb) = (&self.nodes[pa.node], &self.nodes[pb.node]);
        if pa.node == pb.node {
            return PathClass::SameNode;
        }
        if na.subnet == nb.subnet {
            return PathClass::SameSubnet;
        }
        if self.config.mode == underlay_api::Mode::Eni {
            return PathClass::OtherSubnetEni;
        }
        let table = &self.subnets[na.subnet].table;
        let target = super::route_to(snap, table, pb.ip.into());
        let own = nb.instance.primary_eni().map(|e| e.id.clone());
        match (target, own) {
            (Some(RouteTarget::NetworkInterface(eni)), Some(own)) if eni == own => {
                PathClass::OtherSubnetDirect
            }
            (Some(RouteTarget::NetworkInterface(_)), _) => PathClass::OtherSubnetForwarder,
            _ => PathClass::OtherSubnetUnrouted,
        }
    }

    /// Runs the connectivity matrix and the encapsulation check.
    pub fn check(&self) -> anyhow::Result<CheckReport> {
        self.wait_fabric()?;
        let snap = self.sim.snapshot();
        let pods: Vec<Endpoint> = self
            .pods
            .iter()
            .map(|p| Endpoint {
                netns: p.netns.clone(),
                ip: p.ip,
                node: p.node,
            })
            .collect();
        let nodes: Vec<Endpoint> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| Endpoint {
                netns: n.netns.clone(),
                ip: n.instance.private_ip,
                node: i,
            })
            .collect();
        let mut servers: Vec<(String, Ipv4Addr)> = pods
            .iter()
            .chain(nodes.iter())
            .map(|e| (e.netns.clone(), e.ip))
            .collect();
        servers.push((self.id().internet_netns(), INTERNET_HOST));
        let eni = self.config.mode == underlay_api::Mode::Eni;
        let vpc_host = self.controller_host.private_ip;
        if eni {
            servers.push((self.id().instance_netns(&self.controller_host.id), vpc_host));
        }
        let _echo = EchoServers::start(&servers)?;

        // Pairs per class: (source endpoint, destination ip).
        let mut pairs: BTreeMap<PathClass, Vec<(usize, bool, Ipv4Addr, String)>> = BTreeMap::new();
        let n = pods.len();
        let sampled = n * n > FULL_MATRIX_MAX;
        for a in 0..n {
            let mut per_class: BTreeMap<PathClass, usize> = BTreeMap::new();
            // Deterministic rotation so samples differ between sources.
            for step in 1..n {
                let b = (a + step * 7919) % n;
                if b == a {
                    continue;
                }
                let class = self.pod_class(&snap, a, b);
                let count = per_class.entry(class).or_default();
                if sampled && class != PathClass::SameNode && *count >= SAMPLE_PER_CLASS {
                    continue;
                }
                *count += 1;
                pairs.entry(class).or_default().push((
                    a,
                    false,
                    pods[b].ip,
                    format!("{}→{}", self.pods[a].name, self.pods[b].name),
                ));
            }
            // Its own node, and one node in every other subnet.
            let mut seen_subnets = std::collections::BTreeSet::new();
            for (i, node) in nodes.iter().enumerate() {
                let s = self.nodes[i].subnet;
                if i == pods[a].node || (!sampled || seen_subnets.insert(s)) {
                    pairs.entry(PathClass::PodToNode).or_default().push((
                        a,
                        false,
                        node.ip,
                        format!("{}→{}", self.pods[a].name, self.nodes[i].name),
                    ));
                }
            }
            if eni {
                pairs.entry(PathClass::PodToVpcHost).or_default().push((
                    a,
                    false,
                    vpc_host,
                    format!("{}→vpc-host", self.pods[a].name),
                ));
            }
            pairs.entry(PathClass::PodToInternet).or_default().push((
                a,
                false,
                INTERNET_HOST,
                format!("{}→internet", self.pods[a].name),
            ));
        }
        for (i, ni) in self.nodes.iter().enumerate() {
            for (j, nj) in self.nodes.iter().enumerate() {
                if i == j || (sampled && (i + j) % 5 != 0) {
                    continue;
                }
                let class = if ni.subnet == nj.subnet {
                    PathClass::NodeNodeSameSubnet
                } else {
                    PathClass::NodeNodeOtherSubnet
                };
                pairs.entry(class).or_default().push((
                    i,
                    true,
                    nj.instance.private_ip,
                    format!("{}→{}", ni.name, nj.name),
                ));
            }
        }

        let total: usize = pairs.values().map(Vec::len).sum();
        progress(format!(
            "checking {total} pairs over {} path classes{}",
            pairs.len(),
            if sampled { " (sampled)" } else { "" }
        ));
        let mut clients: Vec<Option<EchoClient>> = (0..n).map(|_| None).collect();
        let mut node_clients: Vec<Option<EchoClient>> = (0..nodes.len()).map(|_| None).collect();
        let mut report = CheckReport {
            sampled,
            ..Default::default()
        };
        // Phase 1: reachability of every pair (up to 3 tries: the first may wait for neighbour resolution).
        let mut results: BTreeMap<PathClass, ClassResult> = BTreeMap::new();
        let mut reachable: BTreeMap<PathClass, Vec<(usize, bool, Ipv4Addr)>> = BTreeMap::new();
        for (class, list) in &pairs {
            let mut result = ClassResult {
                pairs: list.len(),
                ..Default::default()
            };
            for (src, is_node, dst, label) in list {
                let client = client_of(
                    &mut clients,
                    &mut node_clients,
                    &pods,
                    &nodes,
                    *src,
                    *is_node,
                )?;
                if client.reach(*dst, 3, Duration::from_millis(700)).is_some() {
                    result.ok += 1;
                    reachable
                        .entry(*class)
                        .or_default()
                        .push((*src, *is_node, *dst));
                } else if result.failed.len() < 5 {
                    result.failed.push(match client.last_error.take() {
                        Some(e) => format!("{label} ({e})"),
                        None => label.clone(),
                    });
                }
            }
            results.insert(*class, result);
        }
        // Phase 2: latency on a spread of reachable pairs per class, rounds interleaved across classes so that
        // load on the machine falls on every class alike (the pod/node ratio compares like with like).
        let sample: BTreeMap<PathClass, Vec<(usize, bool, Ipv4Addr)>> = reachable
            .iter()
            .map(|(c, l)| {
                let step = (l.len() / LATENCY_PAIRS).max(1);
                (
                    *c,
                    l.iter()
                        .step_by(step)
                        .take(LATENCY_PAIRS)
                        .copied()
                        .collect(),
                )
            })
            .collect();
        let mut rtts: BTreeMap<PathClass, Vec<f64>> = BTreeMap::new();
        for _ in 0..LATENCY_ROUNDS {
            for (class, list) in &sample {
                for (src, is_node, dst) in list {
                    let client = client_of(
                        &mut clients,
                        &mut node_clients,
                        &pods,
                        &nodes,
                        *src,
                        *is_node,
                    )?;
                    if let Some(r) = client.round_trip(*dst, Duration::from_millis(500)) {
                        rtts.entry(*class).or_default().push(r.as_secs_f64() * 1e6);
                    }
                }
            }
        }
        for (class, mut result) in results {
            let mut r = rtts.remove(&class).unwrap_or_default();
            r.sort_by(f64::total_cmp);
            result.p50_us = percentile(&r, 0.50);
            result.p99_us = percentile(&r, 0.99);
            report.pairs_checked += result.pairs;
            report.pairs_ok += result.ok;
            report.latency_us.insert(class.as_str(), result.p50_us);
            progress(format!(
                "{:<24} {:>6}/{:<6} reachable, p50 {:>7.1} µs",
                class.as_str(),
                result.ok,
                result.pairs,
                result.p50_us
            ));
            report.classes.insert(class.as_str(), result);
        }
        if let (Some(pod), Some(node)) = (
            report.latency_us.get(PathClass::SameSubnet.as_str()),
            report
                .latency_us
                .get(PathClass::NodeNodeSameSubnet.as_str()),
        ) && *node > 0.0
        {
            report.direct_vs_node_ratio = Some(pod / node);
        }
        let (devices, inspected) = encapsulation_devices(&self.id().netns_prefix())?;
        report.encap_devices = devices;
        report.namespaces_inspected = inspected;
        Ok(report)
    }
}

fn client_of<'a>(
    clients: &'a mut [Option<EchoClient>],
    node_clients: &'a mut [Option<EchoClient>],
    pods: &[Endpoint],
    nodes: &[Endpoint],
    src: usize,
    is_node: bool,
) -> anyhow::Result<&'a mut EchoClient> {
    if is_node {
        slot(&mut node_clients[src], &nodes[src].netns, nodes[src].ip)
    } else {
        slot(&mut clients[src], &pods[src].netns, pods[src].ip)
    }
}

fn slot<'a>(
    slot: &'a mut Option<EchoClient>,
    netns: &str,
    ip: Ipv4Addr,
) -> anyhow::Result<&'a mut EchoClient> {
    if slot.is_none() {
        *slot = Some(EchoClient::new(netns, ip)?);
    }
    Ok(slot.as_mut().expect("just set"))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Link kinds that would mean encapsulation.
const ENCAP_KINDS: [&str; 9] = [
    "vxlan",
    "geneve",
    "ipip",
    "gre",
    "gretap",
    "sit",
    "ip6tnl",
    "ip6gre",
    "wireguard",
];

/// Devices the kernel creates in every namespace once a tunnel module is loaded; they carry nothing unless
/// configured, so they are not counted (any other device of an encapsulating kind is).
const FALLBACK_DEVICES: [&str; 9] = [
    "tunl0", "gre0", "gretap0", "erspan0", "sit0", "ip6tnl0", "ip6gre0", "ip_vti0", "ip6_vti0",
];

/// Every link of every namespace carrying `prefix` whose kind is an encapsulation; and how many namespaces.
pub fn encapsulation_devices(prefix: &str) -> anyhow::Result<(Vec<String>, usize)> {
    let namespaces = kernel::netns_with_prefix(prefix);
    let mut found = Vec::new();
    for ns in &namespaces {
        let out = kernel::ip(ns, &["-d", "-j", "link", "show"])?;
        let links: serde_json::Value = serde_json::from_str(&out)?;
        for l in links.as_array().into_iter().flatten() {
            let kind = l["linkinfo"]["info_kind"].as_str().unwrap_or("");
            let name = l["ifname"].as_str().unwrap_or("?");
            if ENCAP_KINDS.contains(&kind) && !FALLBACK_DEVICES.contains(&name) {
                found.push(format!("{ns}/{name} ({kind})"));
            }
        }
    }
    Ok((found, namespaces.len()))
}
