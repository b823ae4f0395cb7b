//! `underlay bench policy-compile`: the policy compiler alone (JSON), on the shape `underlay bench policy` puts
//! in the API: `--pods` pods over namespaces x, y, z and `--groups` peer groups, `--policies` policies that
//! each select the node's nine model pods and allow one group on a port of their own. It times what the agent
//! does per event: a cold compile (new inputs), an ADD's compile with the cache the engine keeps (one more local
//! pod, its address new), a peer's relabel (new inputs: cold compile and diff), and each diff.

use std::net::Ipv4Addr;
use std::time::Instant;

use serde::Serialize;
use underlay_core::policy::{
    Cluster, CompileCache, LabelSelector, LocalPod, Namespace, NetworkPolicy, Operator, Peer, Pod,
    PolicyPort, PolicyRule, PortRef, Requirement, compile_with, diff,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Pods in the inputs besides the node's nine model pods.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 1_000)]
    policies: usize,
    /// Peer groups (label `bench: g<k>`) the pods are spread over; policy k allows group k mod groups.
    #[arg(long, default_value_t = 100)]
    groups: usize,
    /// Repetitions of each timing.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(Debug, Serialize)]
struct Timing {
    min_ms: f64,
    median_ms: f64,
    max_ms: f64,
    rounds: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    build: &'static str,
    pods: usize,
    policies: usize,
    groups: usize,
    /// Sets, chains, rules and elements of the compiled model.
    objects: usize,
    cold_compile: Timing,
    add_compile_warm_cache: Timing,
    add_diff: Timing,
    add_ops: usize,
    relabel_compile_and_diff: Timing,
    relabel_ops: usize,
}

const NAMESPACES: [&str; 3] = ["x", "y", "z"];

pub fn exec(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.groups > 0 && args.rounds > 0,
        "--groups and --rounds must be at least 1"
    );
    let cluster = inputs(&args);
    let local = model_pods();
    let mut added = local.clone();
    added.push(LocalPod {
        namespace: "x".into(),
        name: "added".into(),
        ifname: "ul0000000add0".into(),
        ip: Ipv4Addr::new(100, 64, 3, 1),
    });
    let mut relabelled = cluster.clone();
    if let Some(p) = relabelled.pods.first_mut() {
        p.labels
            .insert("bench".into(), format!("g{}", 1 % args.groups));
    }

    let (mut cold, mut add, mut add_diff, mut relabel) = (vec![], vec![], vec![], vec![]);
    let (mut objects, mut add_ops, mut relabel_ops) = (0, 0, 0);
    for _ in 0..args.rounds {
        let mut cache = CompileCache::default();
        let t = Instant::now();
        let base = compile_with(&cluster, &local, &mut cache).model;
        cold.push(ms(t));
        objects = base.object_count();

        let t = Instant::now();
        let with_pod = compile_with(&cluster, &added, &mut cache).model;
        add.push(ms(t));
        let t = Instant::now();
        add_ops = diff(&base, &with_pod).len();
        add_diff.push(ms(t));

        let t = Instant::now();
        let after = compile_with(&relabelled, &local, &mut CompileCache::default()).model;
        relabel_ops = diff(&base, &after).len();
        relabel.push(ms(t));
    }
    let report = Report {
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        pods: args.pods,
        policies: args.policies,
        groups: args.groups,
        objects,
        cold_compile: timing(cold),
        add_compile_warm_cache: timing(add),
        add_diff: timing(add_diff),
        add_ops,
        relabel_compile_and_diff: timing(relabel),
        relabel_ops,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn timing(mut v: Vec<f64>) -> Timing {
    v.sort_by(f64::total_cmp);
    Timing {
        min_ms: v[0],
        median_ms: v[v.len() / 2],
        max_ms: v[v.len() - 1],
        rounds: v.len(),
    }
}

/// The node's nine model pods (x/y/z × a/b/c), attached here.
fn model_pods() -> Vec<LocalPod> {
    NAMESPACES
        .iter()
        .enumerate()
        .flat_map(|(j, ns)| {
            ["a", "b", "c"]
                .iter()
                .enumerate()
                .map(move |(k, p)| LocalPod {
                    namespace: (*ns).into(),
                    name: (*p).into(),
                    ifname: format!("ul00000000{j}{k}0"),
                    ip: Ipv4Addr::new(100, 64, j as u8, 10 + k as u8),
                })
        })
        .collect()
}

fn inputs(args: &Args) -> Cluster {
    let namespaces = NAMESPACES
        .iter()
        .map(|n| Namespace {
            name: (*n).into(),
            labels: [("kubernetes.io/metadata.name".to_string(), n.to_string())].into(),
        })
        .collect();
    let mut pods: Vec<Pod> = (0..args.pods)
        .map(|i| Pod {
            namespace: NAMESPACES[i % 3].into(),
            name: format!("bench-{i}"),
            labels: [
                ("pod".to_string(), format!("bench-{i}")),
                ("bench".to_string(), format!("g{}", i % args.groups)),
            ]
            .into(),
            ip: Some(Ipv4Addr::from(
                u32::from(Ipv4Addr::new(100, 64, 128, 0)) + i as u32,
            )),
            node: format!("bench-node-{}", i / 30),
            host_network: false,
            named_ports: vec![],
        })
        .collect();
    pods.extend(model_pods().into_iter().map(|lp| Pod {
        labels: [("pod".to_string(), lp.name.clone())].into(),
        namespace: lp.namespace,
        name: lp.name,
        ip: Some(lp.ip),
        node: "this-node".into(),
        host_network: false,
        named_ports: vec![],
    }));
    let policies = (0..args.policies)
        .map(|k| NetworkPolicy {
            namespace: NAMESPACES[k % 3].into(),
            name: format!("bench-{k}"),
            pod_selector: LabelSelector {
                match_labels: Default::default(),
                match_expressions: vec![Requirement {
                    key: "pod".into(),
                    operator: Operator::In,
                    values: vec!["a".into(), "b".into(), "c".into()],
                }],
            },
            policy_types: vec![],
            ingress: vec![PolicyRule {
                peers: vec![Peer {
                    namespace_selector: Some(LabelSelector::everything()),
                    pod_selector: Some(LabelSelector {
                        match_labels: [("bench".to_string(), format!("g{}", k % args.groups))]
                            .into(),
                        match_expressions: vec![],
                    }),
                    ip_block: None,
                }],
                ports: vec![PolicyPort {
                    protocol: Some("TCP".into()),
                    port: Some(PortRef::Number(1000 + (k % 60_000) as i32)),
                    end_port: None,
                }],
            }],
            egress: vec![],
        })
        .collect();
    Cluster {
        namespaces,
        pods,
        policies,
        nodes: vec![],
    }
}
