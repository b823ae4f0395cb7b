//! The targets. Each feeds its bytes to the parser exactly as the product does, then hands whatever parsed to
//! the code that consumes it (a parser that accepts what its consumer cannot handle is the same bug). No
//! target touches the network, the kernel or a file outside a private temporary directory.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::net::Ipv4Addr;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::networking::v1::NetworkPolicy as K8sNetworkPolicy;
use prost::Message;
use underlay_agent::checkpoint::{self, Checkpoint};
use underlay_agent::eni::kube::{EniKubeOptions, eni_spec_from_record};
use underlay_agent::routed::kube::{AgentStatus, KubeAgentOptions, spec_from_record};
use underlay_agent::{AgentConfig, Fault, IpamService};
use underlay_api::UnderlayNode;
use underlay_cni::invocation;
use underlay_cni::spec::{self as cni_spec, Attached};
use underlay_core::ipam::{AttachmentKey, Ipam, PodInfo, PoolAddress, PoolSpec};
use underlay_core::node::{RoutedNodeSpec, plan_node};
use underlay_core::topology::Topology;
use underlay_core::{eni, nft, planner, policy, routeops};
use underlay_ipam_api::{pb, wire};

/// A fixed wall clock, so that a crash replays exactly.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// `KEY=VALUE` lines up to the first blank line are the environment; the rest is stdin. Without a blank
/// line, everything is stdin and the environment is an ADD's.
pub fn split_env(data: &[u8]) -> (Vec<(String, String)>, &[u8]) {
    let (head, stdin) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => {
            let env = [
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "fuzz0"),
                ("CNI_NETNS", "/var/run/netns/fuzz"),
                ("CNI_IFNAME", "eth0"),
            ];
            let env = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            return (env, data);
        }
    };
    let env = String::from_utf8_lossy(head)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (env, stdin)
}

fn lookup(env: &[(String, String)]) -> impl Fn(&str) -> Option<String> + '_ {
    |k| {
        env.iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    }
}

fn mk_attached(ifname: &str, sandbox: &str) -> Attached {
    Attached {
        host_ifname: "ul0123456789a".into(),
        host_mac: "02:aa:00:00:00:01".into(),
        pod_ifname: ifname.into(),
        pod_mac: "02:bb:00:00:00:01".into(),
        sandbox: sandbox.into(),
        address: "100.64.1.5/32".parse().expect("constant"),
        gateway: underlay_ipam_api::POD_GATEWAY,
    }
}

/// The plugin's environment and stdin: `invocation::parse`, then the pure steps that read what it accepted
/// (the previous result for CHECK and chained ADDs, the reply version, the error JSON).
pub fn cni_invocation(data: &[u8]) {
    let (env, stdin) = split_env(data);
    cni_stdin(&lookup(&env), stdin);
}

fn cni_stdin(env: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) {
    let version = invocation::reply_version(stdin);
    assert!(
        cni_spec::SUPPORTED_VERSIONS.contains(&version.as_str()),
        "reply version {version:?} is not one the plugin speaks"
    );
    match invocation::parse(env, stdin) {
        Ok(inv) => {
            let prev = inv.conf.prev_result.as_ref();
            if let Some(prev) = prev {
                let _ = cni_spec::find_attachment(prev, &inv.ifname);
            }
            let result = cni_spec::add_result(
                &inv.conf.cni_version,
                prev,
                &mk_attached(&inv.ifname, &inv.netns),
            );
            // What ADD prints must find its own attachment again (CHECK reads it back).
            if !inv.ifname.is_empty() && !inv.netns.is_empty() {
                assert!(
                    cni_spec::find_attachment(&result, &inv.ifname).is_some(),
                    "ADD result does not hold its own interface: {result}"
                );
            }
            serde_json::to_vec(&result).expect("a JSON value serializes");
            let _ = cni_spec::version_result(&inv.conf.cni_version);
        }
        Err(e) => {
            let _ = e.to_json(&version).to_string();
        }
    }
}

/// A conflist as the runtime reads it: every entry becomes the stdin of one plugin call (with the list's
/// `cniVersion` and `name`, and the previous entry's result, as libcni injects them), for every command.
pub fn cni_conflist(data: &[u8]) {
    let Ok(list) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Some(plugins) = list.get("plugins").and_then(|p| p.as_array()) else {
        return;
    };
    let mut prev: Option<serde_json::Value> = None;
    for entry in plugins.iter().take(16) {
        let mut conf = entry.clone();
        if let Some(obj) = conf.as_object_mut() {
            for key in ["cniVersion", "name"] {
                if let Some(v) = list.get(key) {
                    obj.insert(key.into(), v.clone());
                }
            }
            if let Some(p) = &prev {
                obj.insert("prevResult".into(), p.clone());
            }
        }
        let stdin = serde_json::to_vec(&conf).expect("a JSON value serializes");
        for command in ["ADD", "CHECK", "DEL", "STATUS", "GC", "VERSION"] {
            let env = [
                ("CNI_COMMAND".to_string(), command.to_string()),
                ("CNI_CONTAINERID".into(), "fuzz0".into()),
                ("CNI_NETNS".into(), "/var/run/netns/fuzz".into()),
                ("CNI_IFNAME".into(), "eth0".into()),
                (
                    "CNI_ARGS".into(),
                    "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0".into(),
                ),
            ];
            cni_stdin(&lookup(&env), &stdin);
        }
        if let Ok(inv) = invocation::parse(
            &lookup(&[
                ("CNI_COMMAND".into(), "ADD".into()),
                ("CNI_CONTAINERID".into(), "fuzz0".into()),
                ("CNI_NETNS".into(), "/x".into()),
                ("CNI_IFNAME".into(), "eth0".into()),
            ]),
            &stdin,
        ) {
            prev = Some(cni_spec::add_result(
                &inv.conf.cni_version,
                inv.conf.prev_result.as_ref(),
                &mk_attached("eth0", "/x"),
            ));
        }
    }
}

/// Where the `ipam_frames` service keeps its checkpoint: tmpfs when there is one (a checkpoint write per
/// change is the service's contract, and the fuzzer makes many).
fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("underlay-fuzz-")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("a temporary directory")
}

/// The pools the IPAM targets restore over: a block, and an `eni`-mode address list.
fn pools() -> [PoolSpec; 2] {
    let addresses = (0..8u8)
        .map(|i| PoolAddress {
            address: Ipv4Addr::new(100, 64, 1, i),
            egress_interface: format!("eni{}", i % 2 + 1),
            route_table: 30_000 + u32::from(i % 2),
        })
        .collect();
    [
        PoolSpec::Block("100.64.1.0/29".parse().expect("constant")),
        PoolSpec::Addresses(addresses),
    ]
}

/// The agent's side of the IPAM socket: the first byte picks the pool (block or addresses), then frames as
/// the server reads them (`u32` BE length, bounded by `MAX_REQUEST_LEN`, then a prost `Request`), each
/// answered by the real `IpamService` over a checkpoint in a private directory. The replies are decoded as
/// the plugin's client decodes them. The whole input is also read as a stream of replies (a hostile agent).
pub fn ipam_frames(data: &[u8]) {
    let Some((&selector, mut rest)) = data.split_first() else {
        return;
    };
    // A hostile agent: the client's framing must refuse or decode, never allocate more than its limit.
    let mut cursor = Cursor::new(rest);
    for _ in 0..8 {
        match wire::read_frame::<_, pb::Reply>(&mut cursor) {
            Ok(reply) => client_reads(&reply),
            Err(_) => break,
        }
    }

    let dir = scratch_dir();
    let [block, addresses] = pools();
    let spec = if selector & 1 == 0 { block } else { addresses };
    let service = IpamService::open(
        spec,
        Duration::from_secs(u64::from(selector >> 1)),
        Checkpoint::new(dir.path().join("ipam.json")),
        9001,
        Fault::None,
    )
    .expect("an empty checkpoint opens")
    .with_clock(now);
    while rest.len() >= wire::HEADER_LEN {
        let header: [u8; wire::HEADER_LEN] = rest[..wire::HEADER_LEN].try_into().expect("4 bytes");
        let Ok(len) = wire::body_len_at_most(header, wire::MAX_REQUEST_LEN) else {
            return;
        };
        rest = &rest[wire::HEADER_LEN..];
        if rest.len() < len {
            return; // the server would wait for the rest, then close the idle connection
        }
        let (body, tail) = rest.split_at(len);
        rest = tail;
        let Ok(req) = pb::Request::decode(body) else {
            return; // the server closes the connection
        };
        let reply = service.handle(req);
        let bytes = wire::encode_frame(&reply);
        let back: pb::Reply = wire::read_frame(bytes.as_slice()).expect("a reply frame decodes");
        assert_eq!(back, reply, "a reply does not survive its own framing");
        client_reads(&back);
    }
    // Whatever the requests did, the checkpoint on disk must load and restore over the same pool.
    let state = Checkpoint::new(dir.path().join("ipam.json"))
        .load()
        .expect("the service's own checkpoint reads back");
    if let Some(state) = state {
        let [block, addresses] = pools();
        let spec = if selector & 1 == 0 { block } else { addresses };
        Ipam::restore(spec, Duration::from_secs(60), state)
            .expect("the service's own checkpoint restores");
    }
}

/// What the plugin does with a reply: the allocation's address and gateway parsed, errors mapped.
fn client_reads(reply: &pb::Reply) {
    use pb::reply::Method;
    let allocations: Vec<&pb::Allocation> = match &reply.method {
        Some(Method::Allocate(pb::AllocateReply {
            result: Some(pb::allocate_reply::Result::Allocation(a)),
        })) => vec![a],
        Some(Method::Release(r)) => r.released.iter().collect(),
        Some(Method::List(r)) => r.allocations.iter().collect(),
        Some(Method::Gc(r)) => r.released.iter().collect(),
        _ => vec![],
    };
    for a in allocations {
        let _ = a.address_v4();
        let _ = a.gateway_v4();
    }
}

/// An IPAM checkpoint file: parsed as the agent parses it at start, restored over both pool kinds, then used
/// (allocate, release, gc) and snapshotted; a snapshot must restore to itself.
pub fn checkpoint(data: &[u8]) {
    let Ok(state) = checkpoint::parse(data) else {
        return;
    };
    for spec in pools() {
        let Ok(mut ipam) = Ipam::restore(spec.clone(), Duration::from_secs(60), state.clone())
        else {
            continue;
        };
        let t = now();
        let keys: Vec<AttachmentKey> = state.allocations.iter().map(|a| a.key.clone()).collect();
        for i in 0..3 {
            let _ = ipam.allocate(
                &AttachmentKey::new(format!("fuzz{i}"), "eth0"),
                PodInfo::default(),
                t,
            );
        }
        if let Some(k) = keys.first() {
            ipam.release(k, t);
        }
        let valid: BTreeSet<AttachmentKey> = keys.iter().skip(1).cloned().collect();
        let _ = ipam.gc(&valid, t);
        let snap = ipam.snapshot();
        let again = Ipam::restore(spec, Duration::from_secs(60), snap.clone())
            .expect("a snapshot restores over its own pool");
        assert_eq!(
            again.snapshot(),
            snap,
            "restore(snapshot) changed the state"
        );
    }
}

/// The files an agent is started with: its YAML configuration (validated, then its pool built), and the
/// routed-mode node record file (`--node-record`: validated, then planned against an empty node).
pub fn agent_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = AgentConfig::from_yaml(text)
        && let Ok(spec) = config.validate()
    {
        let _ = Ipam::new(spec, config.cooldown());
        let _ = (config.reclaim_interval(), config.reclaim_grace());
    }
    if let Ok(spec) = serde_yaml::from_str::<RoutedNodeSpec>(text)
        && spec.validate().is_ok()
    {
        routed_consumers(&spec);
        let mut config = AgentConfig::default();
        underlay_agent::routed::pool_from_record(&mut config, &spec);
        if let Ok(pool) = config.validate() {
            let _ = Ipam::new(pool, config.cooldown());
        }
    }
}

fn routed_consumers(spec: &RoutedNodeSpec) {
    let _ = plan_node(spec, &Default::default());
    let _ = nft::Ruleset::routed(spec).render();
}

struct RecordOptions {
    routed: KubeAgentOptions,
    eni: EniKubeOptions,
}

fn record_options() -> &'static RecordOptions {
    static OPTS: OnceLock<RecordOptions> = OnceLock::new();
    OPTS.get_or_init(|| {
        let vpc = vec!["198.18.0.0/15".parse().expect("constant")];
        RecordOptions {
            routed: KubeAgentOptions::new(
                "fuzz-node",
                "100.64.0.0/10".parse().expect("constant"),
                vpc.clone(),
            ),
            eni: EniKubeOptions::new("fuzz-node", vpc),
        }
    })
}

/// An `UnderlayNode` as the agent reads it (API watch or its on-disk record cache): turned into the routed
/// and the `eni` converge spec, and each accepted spec planned against an empty node and its pool built.
pub fn node_record(data: &[u8]) {
    let Ok(node) = serde_json::from_slice::<UnderlayNode>(data) else {
        return;
    };
    let opts = record_options();
    let _ = AgentStatus::of(node.status.as_ref()).merge_patch();
    if let Ok(Some(spec)) = spec_from_record(&node, &opts.routed) {
        routed_consumers(&spec);
    }
    if let Ok(spec) = eni_spec_from_record(&node, &opts.eni) {
        let devices: BTreeMap<String, String> = spec
            .enis
            .iter()
            .map(|e| (e.id.clone(), format!("eth{}", e.device_index)))
            .collect();
        let pool = eni::pool_addresses(&spec, &devices);
        assert_eq!(
            pool.len(),
            spec.pool_size(),
            "pool size disagrees with the pool"
        );
        let _ = eni::wanted_routes(&spec, &devices);
        let _ = eni::ruleset(&spec).render();
        let _ = eni::plan_eni(&spec, &Default::default());
        if !pool.is_empty() {
            let _ = Ipam::new(PoolSpec::Addresses(pool), Duration::from_secs(60));
        }
    }
}

/// `underlay plan --topology`: the YAML parsed, planned from scratch, planned again on top of that plan
/// (nothing may move), and diffed against the tables as the first plan would have left them.
pub fn plan_topology(data: &[u8]) {
    let Ok(topo) = serde_yaml::from_slice::<Topology>(data) else {
        return;
    };
    let Ok(first) = planner::plan(&topo, None) else {
        return;
    };
    let again = planner::plan(&topo, Some(&first)).expect("a topology that planned plans again");
    assert!(
        routeops::diff_plans(&first, &again).is_empty(),
        "planning the same topology twice moved routes"
    );
    let tables: Vec<_> = topo
        .vpc
        .route_tables
        .iter()
        .map(|t| routeops::observed_from_plan(&first, &t.id))
        .collect();
    let _ = routeops::diff(&again, &tables);
}

/// The cluster the `network_policy` target compiles against: the Kubernetes e2e model (namespaces x, y, z;
/// pods a, b, c in each, labelled `pod: <name>`, serving named ports), x's pods and y/a on this node.
fn policy_cluster() -> &'static (policy::Cluster, Vec<policy::LocalPod>) {
    static CLUSTER: OnceLock<(policy::Cluster, Vec<policy::LocalPod>)> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let mut cluster = policy::Cluster::default();
        let mut local = Vec::new();
        for (n, ns) in ["x", "y", "z"].into_iter().enumerate() {
            cluster.namespaces.push(policy::Namespace {
                name: ns.into(),
                labels: [("kubernetes.io/metadata.name".to_string(), ns.to_string())].into(),
            });
            for (p, pod) in ["a", "b", "c"].into_iter().enumerate() {
                let ip = Ipv4Addr::new(100, 64, n as u8, 10 + p as u8);
                let on_this_node = ns == "x" || (ns, pod) == ("y", "a");
                cluster.pods.push(policy::Pod {
                    namespace: ns.into(),
                    name: pod.into(),
                    labels: [("pod".to_string(), pod.to_string())].into(),
                    ip: Some(ip),
                    node: if on_this_node { "n1" } else { "n2" }.into(),
                    host_network: false,
                    named_ports: policy::Protocol::ALL
                        .iter()
                        .flat_map(|&protocol| {
                            [80u16, 81].map(|port| policy::NamedPort {
                                name: format!(
                                    "serve-{port}-{}",
                                    protocol.as_api_str().to_lowercase()
                                ),
                                protocol,
                                port,
                            })
                        })
                        .collect(),
                });
                if on_this_node {
                    local.push(policy::LocalPod {
                        namespace: ns.into(),
                        name: pod.into(),
                        ifname: format!("ul{n}{p}0000000000"),
                        ip,
                    });
                }
            }
        }
        for (name, ip) in [("n1", [198, 18, 0, 10]), ("n2", [198, 18, 0, 11])] {
            cluster.nodes.push(policy::Node {
                name: name.into(),
                addresses: vec![Ipv4Addr::from(ip)],
            });
        }
        (cluster, local)
    })
}

/// The policy compiler's input: a NetworkPolicy as the API gives it (YAML or JSON), converted as the agent
/// converts it, validated, compiled for a node of the e2e model, diffed from nothing (applying the diff must
/// give the model) and to itself (nothing), rendered, and evaluated on a few packets.
pub fn network_policy(data: &[u8]) {
    let Ok(np) = serde_yaml::from_slice::<K8sNetworkPolicy>(data) else {
        return;
    };
    let converted = underlay_api::policy::network_policy(&np);
    let _ = policy::validate(&converted);
    let (base, local) = policy_cluster();
    let mut cluster = base.clone();
    cluster.policies.push(converted);
    let compiled = policy::compile(&cluster, local);
    let empty = policy::PolicyModel::default();
    let ops = policy::diff(&empty, &compiled.model);
    let mut applied = empty.clone();
    policy::apply(&mut applied, &ops);
    assert_eq!(
        applied, compiled.model,
        "apply(diff(empty, model)) is not the model"
    );
    assert!(
        policy::diff(&compiled.model, &compiled.model).is_empty(),
        "a model differs from itself"
    );
    let _ = policy::render_ops(&ops);
    let _ = policy::render_install(&compiled.model, &Default::default(), 1);
    let sources = [
        [100, 64, 0, 10],
        [100, 64, 1, 11],
        [100, 64, 2, 12],
        [203, 0, 113, 5],
    ];
    let destinations = [[100, 64, 0, 10], [100, 64, 0, 11], [100, 64, 1, 10]];
    let transports = [
        policy::Transport::Port(policy::Protocol::Tcp, 80),
        policy::Transport::Port(policy::Protocol::Udp, 81),
        policy::Transport::Other(1),
    ];
    for src in sources {
        for dst in destinations {
            for transport in transports {
                let _ = policy::evaluate(
                    &cluster,
                    &policy::Packet {
                        src: Ipv4Addr::from(src),
                        dst: Ipv4Addr::from(dst),
                        transport,
                    },
                );
            }
        }
    }
}
