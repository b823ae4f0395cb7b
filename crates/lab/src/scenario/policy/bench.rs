//! `underlay bench policy`: the cost of NetworkPolicy on the x/y/z lab, with and without policies in the same run.
//!
//! 1. The model lab; `pods` Pod objects more in the API (on nodes that exist only in the API, addresses in
//!    100.64.128.0/17) so that selectors have a cluster's worth of peers to resolve.
//! 2. Without policies: CNI ADD of `adds` pods on one node (Pod object first, identity in `CNI_ARGS`), pod↔pod
//!    UDP round trips and TCP throughput between two model pods on different nodes.
//! 3. `policies` NetworkPolicies that select every model pod (each allowing a peer group on a port of its own)
//!    plus one allowing the measured flows; then event → kernel: a policy added, or a peer Pod relabelled, at the
//!    API, timed until the destination node's nftables ruleset changes (polled); then the same ADDs, latency and
//!    throughput again, the node's nftables object count and the process's memory.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Serialize;
use underlay_dataplane::Netns;

use super::PolicyLab;
use super::model::{self, World};

/// What the bench measures.
#[derive(Debug, Clone)]
pub struct BenchShape {
    /// Pod objects in the API besides the model's.
    pub pods: usize,
    pub policies: usize,
    /// Pods wired per CNI ADD sample (with and without policies).
    pub adds: usize,
    /// Policy events and Pod events timed.
    pub events: usize,
    /// How long an event may take to reach the kernel before it counts as not arrived.
    pub event_timeout: Duration,
    /// How long the burst of `policies` may take to reach every node before events are timed anyway.
    pub burst_timeout: Duration,
    pub rtt_rounds: usize,
    pub throughput_for: Duration,
}

/// p50/p99 of a sample (ms or µs as named), with its size.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Dist {
    pub n: usize,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

impl Dist {
    pub fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        let q = |q: f64| -> Option<f64> {
            (!v.is_empty()).then(|| v[(((v.len() - 1) as f64) * q).round() as usize])
        };
        Dist {
            n: v.len(),
            p50: q(0.5),
            p99: q(0.99),
            max: v.last().copied(),
        }
    }
}

/// Round trips to two destinations, alternated.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Interleaved {
    pub selected: Dist,
    pub unselected: Dist,
}

/// One side of the comparison: without policies, or with them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Side {
    pub policies: usize,
    pub cni_add_ms: Dist,
    pub rtt_us: Dist,
    pub throughput_mbit_s: Option<f64>,
    /// Rules plus set and map elements in the measured node's namespace.
    pub nft_objects: usize,
    pub process_rss_kib: u64,
    /// The first pod this side wired (namespace x, selected by no policy): the interleaved RTT's reference.
    #[serde(skip)]
    pub first_added: Option<(String, Ipv4Addr)>,
}

/// The report (`underlay bench policy` prints it as JSON).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub mode: String,
    /// `debug` or `release`: the profile of the binary that ran the bench (in debug builds the policy compiler,
    /// `underlay-core`, is still optimised; see Cargo.toml).
    pub build: &'static str,
    pub api_pods: usize,
    pub model_pods: usize,
    pub without: Side,
    pub with: Side,
    /// From the first of the `policies` writes (all in one burst) to every node with a model pod holding them
    /// all; `None` when that took longer than the burst timeout.
    pub policies_burst_to_kernel_ms: Option<f64>,
    /// From the API write to the first change of the destination node's ruleset (timed once the burst is in).
    pub policy_event_to_kernel_ms: Dist,
    pub pod_event_to_kernel_ms: Dist,
    /// With every policy in: UDP round trips from the source alternating between the measured destination
    /// (selected by every policy) and a pod on the same node no policy selects (µs).
    pub rtt_interleaved_us: Option<Interleaved>,
    /// Events whose change never showed within the timeout.
    pub events_not_in_kernel: usize,
    pub event_timeout_ms: f64,
    pub bars: Bars,
    pub memory_scope: &'static str,
}

/// The bars, with whether this run met them (`None`: not measurable in this run).
#[derive(Debug, Clone, Serialize)]
pub struct Bars {
    /// Whether the measured node's nftables objects grew with the policies: when not, the CNI ADD and latency
    /// comparisons measure no policy datapath and their `met` is `None`.
    pub policy_objects_in_kernel: bool,
    pub event_to_kernel_p99_ms_max: f64,
    pub event_to_kernel_met: Option<bool>,
    pub cni_add_p50_ratio: Option<f64>,
    pub cni_add_p50_ratio_max: f64,
    pub cni_add_met: Option<bool>,
    /// Interleaved: the selected destination's p50 over the unselected one's, same run, same nodes
    /// (`rtt_interleaved_us`); the sequential ratio when that was not measured.
    pub rtt_p50_ratio: Option<f64>,
    /// `with.rtt_us` over `without.rtt_us`: minutes apart, so it carries whatever else the machine did.
    pub rtt_p50_ratio_sequential: Option<f64>,
    pub rtt_p50_ratio_max: f64,
    pub rtt_met: Option<bool>,
}

const SINK_PORT: u16 = 5201;

impl PolicyLab {
    /// Runs the bench; see the module doc.
    pub fn bench(&mut self, shape: &BenchShape) -> anyhow::Result<BenchReport> {
        let (src, dst) = (0usize, 4usize); // x/a and y/b: different nodes
        let dst_node = self.lab.pods[dst].node;
        self.add_api_pods(shape.pods);
        // Agents settle after the build (their first converge passes) before the baseline is taken.
        std::thread::sleep(Duration::from_secs(2));
        let mut without = self.side(shape, src, dst, dst_node, "pre")?;
        without.policies = 0;
        // The policies: every model pod selected by all of them, the measured flows allowed by one more.
        let t = Instant::now();
        for k in 0..shape.policies {
            self.lab.api().insert(&bench_policy(k));
        }
        self.lab.api().insert(&allow_measured());
        super::progress(format!(
            "{} policies written in {:.1} s",
            shape.policies + 1,
            t.elapsed().as_secs_f64()
        ));
        // Events are timed from a converged cluster: every node with a model pod holds every policy (the burst
        // of a thousand policies makes each agent list their peers first). How long that took is reported.
        // A node holds the chain of each policy of a namespace it has a model pod of (bench policies select
        // their namespace's model pods; the measured flows' policy, y's).
        let expected: Vec<(usize, usize)> = (0..self.lab.nodes.len())
            .map(|n| {
                let nss: std::collections::BTreeSet<&str> = self
                    .world
                    .pods
                    .iter()
                    .filter(|p| p.node == self.lab.nodes[n].name)
                    .map(|p| p.namespace.as_str())
                    .collect();
                let of_bench = (0..shape.policies)
                    .filter(|k| nss.contains(model::NAMESPACES[k % 3]))
                    .count();
                (n, of_bench + usize::from(nss.contains("y")))
            })
            .filter(|&(_, want)| want > 0)
            .collect();
        let deadline = t + shape.burst_timeout;
        let mut policies_burst_to_kernel_ms = None;
        loop {
            let mut held = Vec::new();
            for &(n, want) in &expected {
                held.push((policy_chains(&self.lab.nodes[n].netns).unwrap_or(0), want));
            }
            if held.iter().all(|&(h, want)| h >= want) {
                policies_burst_to_kernel_ms = Some(t.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if Instant::now() > deadline {
                super::progress(format!(
                    "policies not all in the kernel after {:.0} s (per node, held and wanted: {held:?})",
                    shape.burst_timeout.as_secs_f64()
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        if let Some(ms) = policies_burst_to_kernel_ms {
            super::progress(format!(
                "every policy in every node's kernel {:.1} s after the first write",
                ms / 1e3
            ));
        }
        std::thread::sleep(self.options.settle);
        let node_ns = self.lab.nodes[dst_node].netns.clone();
        let mut policy_events = Vec::new();
        let mut pod_events = Vec::new();
        let mut missed = 0;
        for i in 0..shape.events {
            let p = bench_policy(shape.policies + i);
            match self.time_to_kernel(&node_ns, shape.event_timeout, || {
                self.lab.api().insert(&p);
            })? {
                Some(ms) => policy_events.push(ms),
                None => missed += 1,
            }
            // A peer joins a group a policy allows: its address enters that policy's set.
            let (ns, name) = api_pod_name(i % shape.pods.max(1));
            let group = format!("g{}", (i + 1) % 100);
            match self.time_to_kernel(&node_ns, shape.event_timeout, || {
                self.lab.api().modify::<Pod>(Some(&ns), &name, |p| {
                    p.metadata
                        .labels
                        .get_or_insert_with(Default::default)
                        .insert("bench".into(), group.clone());
                });
            })? {
                Some(ms) => pod_events.push(ms),
                None => missed += 1,
            }
        }
        // The last events' follow-ups (every agent's recompile) settle before the with-policy side is measured.
        std::thread::sleep(self.options.settle);
        let mut with = self.side(shape, src, dst, dst_node, "post")?;
        with.policies = shape.policies + 1 + shape.events;
        // The same moment, the same nodes: the source's round trips alternate between the destination (selected
        // by every policy) and a pod of that node no policy selects, so load and noise fall on both alike.
        let rtt_interleaved_us = match with.first_added.clone() {
            Some(unselected) if shape.rtt_rounds > 0 => {
                let (sel, unsel) =
                    self.rtts_interleaved(src, dst, &unselected, shape.rtt_rounds)?;
                Some(Interleaved {
                    selected: Dist::of(sel),
                    unselected: Dist::of(unsel),
                })
            }
            _ => None,
        };
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let policy_event_to_kernel_ms = Dist::of(policy_events);
        let pod_event_to_kernel_ms = Dist::of(pod_events);
        let cni_ratio = ratio(with.cni_add_ms.p50, without.cni_add_ms.p50);
        let rtt_ratio_sequential = ratio(with.rtt_us.p50, without.rtt_us.p50);
        let rtt_ratio = match &rtt_interleaved_us {
            Some(i) => ratio(i.selected.p50, i.unselected.p50),
            None => rtt_ratio_sequential,
        };
        let worst_p99 = [policy_event_to_kernel_ms.p99, pod_event_to_kernel_ms.p99]
            .into_iter()
            .flatten()
            .fold(None::<f64>, |m, x| Some(m.map_or(x, |m| m.max(x))));
        // Without policy objects in the kernel, the with/without comparisons say nothing about policy.
        let in_kernel = with.nft_objects > without.nft_objects;
        let bars = Bars {
            policy_objects_in_kernel: in_kernel,
            event_to_kernel_p99_ms_max: 500.0,
            event_to_kernel_met: if missed > 0 {
                Some(false)
            } else {
                worst_p99.map(|p| p <= 500.0)
            },
            cni_add_p50_ratio: cni_ratio,
            cni_add_p50_ratio_max: 1.5,
            cni_add_met: cni_ratio.filter(|_| in_kernel).map(|r| r <= 1.5),
            rtt_p50_ratio: rtt_ratio,
            rtt_p50_ratio_sequential: rtt_ratio_sequential,
            rtt_p50_ratio_max: 1.05,
            rtt_met: rtt_ratio.filter(|_| in_kernel).map(|r| r <= 1.05),
        };
        Ok(BenchReport {
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            mode: match self.lab.config.mode {
                underlay_api::Mode::Routed => "routed".into(),
                underlay_api::Mode::Eni => "eni".into(),
            },
            api_pods: shape.pods,
            model_pods: self.world.pods.len(),
            without,
            with,
            policies_burst_to_kernel_ms,
            policy_event_to_kernel_ms,
            pod_event_to_kernel_ms,
            rtt_interleaved_us,
            events_not_in_kernel: missed,
            event_timeout_ms: shape.event_timeout.as_secs_f64() * 1e3,
            bars,
            memory_scope: "one process: controller, every agent and the lab harness",
        })
    }

    /// Pod objects on nodes that exist only in the API, spread over x, y, z and 100 peer groups.
    fn add_api_pods(&self, n: usize) {
        let t = Instant::now();
        for i in 0..n {
            let (ns, name) = api_pod_name(i);
            let mut labels = World::base_pod_labels(&name);
            labels.insert("bench".into(), format!("g{}", i % 100));
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 128, 0)) + i as u32);
            let node = format!("bench-node-{}", i / 30);
            api_insert(
                self.lab.api(),
                &model::kube_pod(
                    &ns,
                    &name,
                    &labels,
                    &node,
                    Some((ip, Ipv4Addr::new(198, 19, 0, 1))),
                ),
            );
        }
        super::progress(format!(
            "{n} Pod objects written to the API in {:.1} s",
            t.elapsed().as_secs_f64()
        ));
    }

    fn side(
        &mut self,
        shape: &BenchShape,
        src: usize,
        dst: usize,
        node: usize,
        tag: &str,
    ) -> anyhow::Result<Side> {
        let mut adds = Vec::new();
        let mut first_added = None;
        for k in 0..shape.adds {
            let name = format!("add-{tag}-{k}");
            let netns = format!("{}b{tag}{k}", self.lab.id().netns_prefix());
            let base = if tag == "pre" { 0xB00 } else { 0xC00 };
            let cid = format!("{:0>12x}{:0>4x}{:0>4x}", self.lab.config.seed, base, k);
            let labels = World::base_pod_labels(&name);
            let node_name = self.lab.nodes[node].name.clone();
            api_insert(
                self.lab.api(),
                &model::kube_pod("x", &name, &labels, &node_name, None),
            );
            let t = Instant::now();
            let ip = self
                .lab
                .wire_pod(node, &name, &netns, &cid, Some(("x", &name)))?;
            adds.push(t.elapsed().as_secs_f64() * 1e3);
            first_added.get_or_insert((netns, ip));
        }
        let rtt = self.rtts(src, dst, shape.rtt_rounds)?;
        let throughput = self.throughput(src, dst, shape.throughput_for).ok();
        Ok(Side {
            policies: 0,
            cni_add_ms: Dist::of(adds),
            rtt_us: Dist::of(rtt),
            throughput_mbit_s: throughput,
            nft_objects: nft_objects(&self.lab.nodes[node].netns).unwrap_or(0),
            process_rss_kib: rss_kib(),
            first_added,
        })
    }

    /// UDP round trips to the destination's echo server on port 80 (µs).
    fn rtts(&self, src: usize, dst: usize, rounds: usize) -> anyhow::Result<Vec<f64>> {
        let ns = Netns::named(&self.lab.pods[src].netns)?;
        let sock = ns.run(|| {
            std::net::UdpSocket::bind("0.0.0.0:0").map_err(|source| {
                underlay_dataplane::Error::Kernel {
                    op: "udp bind".into(),
                    source,
                }
            })
        })?;
        sock.connect(SocketAddrV4::new(self.lab.pods[dst].ip, 80))?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut out = Vec::with_capacity(rounds);
        let mut buf = [0u8; 64];
        const WARMUP: usize = 100;
        for i in 0..rounds + WARMUP {
            let msg = (i as u64).to_be_bytes();
            let t = Instant::now();
            sock.send(&msg)?;
            while let Ok(n) = sock.recv(&mut buf) {
                if n == 8 && buf[..8] == msg {
                    // The first rounds warm caches and neighbours.
                    if i >= WARMUP {
                        out.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    break;
                }
            }
        }
        Ok(out)
    }

    /// UDP round trips from `src`, alternating between `dst` and `other`, each answered by the same kind of echo
    /// server started for this (µs each).
    fn rtts_interleaved(
        &self,
        src: usize,
        dst: usize,
        other: &(String, Ipv4Addr),
        rounds: usize,
    ) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        let dst_end = (self.lab.pods[dst].netns.clone(), self.lab.pods[dst].ip);
        let _servers = crate::scenario::echo::EchoServers::start(&[dst_end, other.clone()])?;
        // The lab's echo client: numbered datagrams, replies matched, stale ICMP errors skipped.
        let mut client = crate::scenario::echo::EchoClient::new(
            &self.lab.pods[src].netns,
            Ipv4Addr::UNSPECIFIED,
        )?;
        let targets = [self.lab.pods[dst].ip, other.1];
        let mut out = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
        const WARMUP: usize = 100;
        for i in 0..rounds + WARMUP {
            for (t, to) in targets.iter().enumerate() {
                let Some(rtt) = client.round_trip(*to, Duration::from_millis(200)) else {
                    continue;
                };
                if i >= WARMUP {
                    let us = rtt.as_secs_f64() * 1e6;
                    if t == 0 {
                        out.0.push(us)
                    } else {
                        out.1.push(us)
                    }
                }
            }
        }
        Ok(out)
    }

    /// TCP bulk transfer for `dur` into a sink in the destination pod (Mbit/s).
    fn throughput(&self, src: usize, dst: usize, dur: Duration) -> anyhow::Result<f64> {
        let dst_ip = self.lab.pods[dst].ip;
        let lns = Netns::named(&self.lab.pods[dst].netns)?;
        let listener = lns.run(move || {
            TcpListener::bind(SocketAddrV4::new(dst_ip, SINK_PORT)).map_err(|source| {
                underlay_dataplane::Error::Kernel {
                    op: "sink bind".into(),
                    source,
                }
            })
        })?;
        let sink = std::thread::spawn(move || -> u64 {
            let Ok((mut s, _)) = listener.accept() else {
                return 0;
            };
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0u64;
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            total
        });
        let cns = Netns::named(&self.lab.pods[src].netns)?;
        let sock = cns.run(|| {
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(
                |source| underlay_dataplane::Error::Kernel {
                    op: "tcp socket".into(),
                    source,
                },
            )
        })?;
        sock.connect_timeout(
            &SocketAddrV4::new(dst_ip, SINK_PORT).into(),
            Duration::from_secs(2),
        )
        .context("connecting to the sink")?;
        let mut stream: TcpStream = sock.into();
        let chunk = vec![0x5au8; 1 << 16];
        let start = Instant::now();
        while start.elapsed() < dur {
            stream.write_all(&chunk)?;
        }
        drop(stream);
        let bytes = sink.join().unwrap_or(0);
        Ok(bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e6)
    }

    /// Runs `event`, then polls the node's ruleset until it differs from before (ms), or `None` after `timeout`.
    fn time_to_kernel(
        &self,
        node_ns: &str,
        timeout: Duration,
        event: impl FnOnce(),
    ) -> anyhow::Result<Option<f64>> {
        // `nft monitor` in the node's namespace prints each committed change as the kernel announces it: no
        // polling, so the measurement takes no CPU from the agents it measures (listing a ruleset of 10,000+
        // objects every few milliseconds did, on two cores).
        let mut monitor = std::process::Command::new("ip")
            .args(["netns", "exec", node_ns, "nft", "monitor", "ruleset"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("nft monitor")?;
        let stdout = monitor.stdout.take().context("nft monitor stdout")?;
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                match line {
                    Ok(l) if l.trim().is_empty() => continue,
                    Ok(_) => {
                        let _ = tx.send(());
                    }
                    Err(_) => return,
                }
            }
        });
        // The monitor subscribes as it starts; give it that instant before the event.
        std::thread::sleep(Duration::from_millis(100));
        while rx.try_recv().is_ok() {}
        let t = Instant::now();
        event();
        let got = rx
            .recv_timeout(timeout)
            .ok()
            .map(|()| t.elapsed().as_secs_f64() * 1e3);
        let _ = monitor.kill();
        let _ = monitor.wait();
        let _ = reader.join();
        Ok(got)
    }
}

fn api_insert<K>(api: &underlay_apisim::ApiSim, obj: &K)
where
    K: kube::Resource<DynamicType = ()> + Serialize,
{
    if underlay_apisim::Kind::of::<K>().is_some() {
        api.insert(obj);
    }
}

fn api_pod_name(i: usize) -> (String, String) {
    let ns = model::NAMESPACES[i % 3].to_string();
    (ns, format!("bench-{i}"))
}

/// Policy `k`: selects every model pod of its namespace; allows its peer group on a port of its own.
fn bench_policy(k: usize) -> NetworkPolicy {
    let ns = model::NAMESPACES[k % 3];
    serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": format!("bench-{k}"), "namespace": ns},
        "spec": {
            "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b", "c"]}]},
            "ingress": [{
                "from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"bench": format!("g{}", k % 100)}}}],
                "ports": [{"port": 1000 + (k % 60000) as i64, "protocol": "TCP"}]
            }]
        }
    }))
    .expect("a valid NetworkPolicy")
}

/// Lets the measured flows (UDP 80 and the echo port, TCP to the sink) in to every model pod of y.
fn allow_measured() -> NetworkPolicy {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "bench-measured", "namespace": "y"},
        "spec": {
            "podSelector": {},
            "ingress": [{"ports": [
                {"port": 80, "protocol": "UDP"},
                {"port": crate::scenario::echo::ECHO_PORT, "protocol": "UDP"},
                {"port": SINK_PORT, "protocol": "TCP"}
            ]}]
        }
    }))
    .expect("a valid NetworkPolicy")
}

/// `nft -j <args>` in the named namespace, parsed (`null` when nft printed nothing parsable).
fn nft_json(netns: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-j"])
        .args(args)
        .output()
        .with_context(|| format!("nft -j {}", args.join(" ")))?;
    Ok(serde_json::from_slice(&out.stdout).unwrap_or_default())
}

/// Policy chains (one per policy selecting a pod there, ingress) in the namespace's `inet underlay` table.
fn policy_chains(netns: &str) -> anyhow::Result<usize> {
    let v = nft_json(netns, &["list", "chains", "inet"])?;
    Ok(v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("chain"))
        .filter(|c| c["table"] == "underlay")
        .filter_map(|c| c["name"].as_str())
        .filter(|n| n.starts_with("pol_p") && n.ends_with("_in"))
        .count())
}

/// Rules plus set and map elements in a namespace.
fn nft_objects(netns: &str) -> anyhow::Result<usize> {
    let v = nft_json(netns, &["list", "ruleset"])?;
    let mut n = 0;
    for o in v["nftables"].as_array().into_iter().flatten() {
        if o.get("rule").is_some() {
            n += 1;
        }
        for k in ["set", "map"] {
            if let Some(e) = o
                .get(k)
                .and_then(|s| s.get("elem"))
                .and_then(|e| e.as_array())
            {
                n += e.len();
            }
        }
    }
    Ok(n)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dist_takes_nearest_rank_percentiles_and_is_empty_without_samples() {
        let d = Dist::of((1..=100).rev().map(f64::from).collect());
        assert_eq!(
            (d.n, d.p50, d.p99, d.max),
            (100, Some(51.0), Some(99.0), Some(100.0))
        );
        let e = Dist::of(vec![]);
        assert_eq!((e.n, e.p50, e.p99), (0, None, None));
    }

    #[test]
    fn bench_policies_are_valid_and_distinct() {
        let a = bench_policy(0);
        let b = bench_policy(1);
        assert_ne!(a.metadata.name, b.metadata.name);
        assert_ne!(a.metadata.namespace, b.metadata.namespace);
        let spec = a.spec.unwrap();
        assert_eq!(spec.ingress.unwrap()[0].ports.as_ref().unwrap().len(), 1);
        assert!(allow_measured().spec.is_some());
    }
}
