//! `underlay bench datapath`: request/response latency (TCP and UDP) and iperf3 throughput for each pod path
//! class next to node↔node on the same path, in one lab, with the fast path on and off.
//!
//! ```text
//!   flows:  pod class (same_node, same_subnet, other_subnet_direct, other_subnet_forwarder | other_subnet_eni)
//!           └─ its node reference: the two pods' nodes (same_node: the node to itself)
//!   RR:     one TCP connection and one UDP socket per flow; rounds of `batch` round trips per flow and protocol,
//!           flows in turn, so that noise falls on every flow alike
//!   iperf3: one run per flow with 1 and with 4 streams, in the flows' namespaces
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use underlay_dataplane::Netns;

use super::{Lab, PathClass, progress};

/// Bytes of each request and response.
pub const RR_BYTES: usize = 64;
/// Round trips per flow and protocol between two switches of flow.
const BATCH: usize = 500;
/// First port of the RR servers (one TCP and one UDP port per flow) and of iperf3.
const RR_PORT_BASE: u16 = 17100;
const IPERF_PORT_BASE: u16 = 17300;

/// What one run measures.
#[derive(Debug, Clone)]
pub struct DatapathOptions {
    /// Round trips per flow and protocol.
    pub round_trips: usize,
    /// Seconds of each iperf3 run (0: no throughput).
    pub iperf_seconds: u32,
}

/// One endpoint of a flow.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    pub netns: String,
    pub ip: Ipv4Addr,
}

/// A measured pair: a pod class, or the node reference of one.
#[derive(Debug, Clone, Serialize)]
pub struct Flow {
    pub name: String,
    pub client: Endpoint,
    pub server: Endpoint,
}

/// Latency of one flow and protocol (µs).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rr {
    pub samples: usize,
    pub errors: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// p99 / p50.
    pub jitter: f64,
}

/// One flow's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlowResult {
    pub tcp_rr: Rr,
    pub udp_rr: Rr,
    /// iperf3 receiver throughput (Gbit/s), one stream and four; `None` when not measured or failed.
    pub tcp_1_stream_gbps: Option<f64>,
    pub tcp_4_streams_gbps: Option<f64>,
}

/// A pod class next to its node reference.
#[derive(Debug, Clone, Serialize)]
pub struct ClassResult {
    pub pod_flow: String,
    pub node_flow: String,
    pub pod: FlowResult,
    pub node: FlowResult,
    /// pod / node, same run: latency ratios (lower is better) and throughput ratios (higher is better).
    pub tcp_p50_ratio: f64,
    pub tcp_p99_ratio: f64,
    pub udp_p50_ratio: f64,
    pub udp_p99_ratio: f64,
    pub tcp_1_stream_ratio: Option<f64>,
    pub tcp_4_streams_ratio: Option<f64>,
}

/// One fast-path setting's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct DatapathRun {
    pub fast_path: bool,
    /// Devices carrying a fast-path program (uplinks and pod veths) over all nodes when measured.
    pub fast_path_filters: usize,
    pub classes: BTreeMap<&'static str, ClassResult>,
    pub seconds: f64,
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

fn rr_of(mut ns: Vec<u32>, errors: usize) -> Rr {
    ns.sort_unstable();
    let p50 = percentile(&ns, 0.50);
    let p99 = percentile(&ns, 0.99);
    Rr {
        samples: ns.len(),
        errors,
        p50_us: p50,
        p99_us: p99,
        p999_us: percentile(&ns, 0.999),
        jitter: if p50 > 0.0 { p99 / p50 } else { 0.0 },
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

impl Lab {
    /// The flows of the benchmark: for each pod path class present in the lab, the first pod pair of that
    /// class and the node pair under it (the same node to itself for `same_node`). Returns (class, pod flow,
    /// node flow).
    pub fn datapath_flows(&self) -> Vec<(PathClass, Flow, Flow)> {
        let snap = self.sim.snapshot();
        let wanted = [
            PathClass::SameNode,
            PathClass::SameSubnet,
            PathClass::OtherSubnetDirect,
            PathClass::OtherSubnetForwarder,
            PathClass::OtherSubnetEni,
        ];
        let mut out = Vec::new();
        for class in wanted {
            let found = (0..self.pods.len())
                .flat_map(|a| (0..self.pods.len()).map(move |b| (a, b)))
                .find(|&(a, b)| a != b && self.pod_class(&snap, a, b) == class);
            let Some((a, b)) = found else { continue };
            let (pa, pb) = (&self.pods[a], &self.pods[b]);
            let (na, nb) = (&self.nodes[pa.node], &self.nodes[pb.node]);
            let ep = |netns: &str, ip| Endpoint {
                netns: netns.to_string(),
                ip,
            };
            out.push((
                class,
                Flow {
                    name: format!("pod:{}", class.as_str()),
                    client: ep(&pa.netns, pa.ip),
                    server: ep(&pb.netns, pb.ip),
                },
                Flow {
                    name: format!("node:{}", class.as_str()),
                    client: ep(&na.netns, na.instance.private_ip),
                    server: ep(&nb.netns, nb.instance.private_ip),
                },
            ));
        }
        out
    }

    /// Restarts every agent with the fast path on or off (when it is not so already) and waits until the
    /// kernel shows it (programs on every uplink and pod veth, or none anywhere) and the maps are filled.
    pub fn set_fast_path(&mut self, on: bool) -> anyhow::Result<()> {
        if self.config.fast_path != on {
            self.config.fast_path = on;
            for i in 0..self.nodes.len() {
                self.stop_agent(i);
                self.start_agent(i)?;
            }
        }
        let want = if on {
            self.pods.len() + self.nodes.len()
        } else {
            0
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n = self.fast_path_filters()?;
            if (on && n >= want) || (!on && n == 0) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "fast path {}: {n} filters after 30 s (want {want})",
                    if on { "on" } else { "off" }
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // The policy engine reports its selection once its inputs sync; the reconciler fills the map a pass
        // later.
        std::thread::sleep(Duration::from_secs(3));
        Ok(())
    }

    /// Devices in the nodes' namespaces that carry a fast-path program.
    pub fn fast_path_filters(&self) -> anyhow::Result<usize> {
        let mut n = 0;
        for node in &self.nodes {
            let ns = Netns::named(&node.netns)?;
            n += ns.run(|| {
                let mut nl = underlay_dataplane::Netlink::open_here()?;
                let mut c = 0;
                for l in nl.links()? {
                    c += nl.tc_ingress_bpf_filters(l.index)?.len();
                }
                Ok(c)
            })?;
        }
        Ok(n)
    }

    /// Measures every flow with the fast path as it is now.
    pub fn bench_datapath(&self, opts: &DatapathOptions) -> anyhow::Result<DatapathRun> {
        let started = Instant::now();
        let triples = self.datapath_flows();
        if triples.is_empty() {
            bail!("the lab has no pod pair to measure");
        }
        let flows: Vec<&Flow> = triples.iter().flat_map(|(_, p, n)| [p, n]).collect();
        let rr = rr_all(&flows, opts.round_trips)?;
        let mut tput: Vec<(Option<f64>, Option<f64>)> = Vec::new();
        for (i, f) in flows.iter().enumerate() {
            if opts.iperf_seconds == 0 {
                tput.push((None, None));
                continue;
            }
            progress(format!("iperf3 {}", f.name));
            let port = IPERF_PORT_BASE + i as u16;
            let one = iperf(f, port, 1, opts.iperf_seconds);
            let four = iperf(f, port, 4, opts.iperf_seconds);
            tput.push((one, four));
        }
        let results: Vec<FlowResult> = rr
            .into_iter()
            .zip(tput)
            .map(|((tcp, udp), (one, four))| FlowResult {
                tcp_rr: tcp,
                udp_rr: udp,
                tcp_1_stream_gbps: one,
                tcp_4_streams_gbps: four,
            })
            .collect();
        let mut classes = BTreeMap::new();
        for (k, (class, pf, nf)) in triples.iter().enumerate() {
            let (pod, node) = (results[2 * k].clone(), results[2 * k + 1].clone());
            let t = |p: Option<f64>, n: Option<f64>| Some(ratio(p?, n?));
            classes.insert(
                class.as_str(),
                ClassResult {
                    pod_flow: pf.name.clone(),
                    node_flow: nf.name.clone(),
                    tcp_p50_ratio: ratio(pod.tcp_rr.p50_us, node.tcp_rr.p50_us),
                    tcp_p99_ratio: ratio(pod.tcp_rr.p99_us, node.tcp_rr.p99_us),
                    udp_p50_ratio: ratio(pod.udp_rr.p50_us, node.udp_rr.p50_us),
                    udp_p99_ratio: ratio(pod.udp_rr.p99_us, node.udp_rr.p99_us),
                    tcp_1_stream_ratio: t(pod.tcp_1_stream_gbps, node.tcp_1_stream_gbps),
                    tcp_4_streams_ratio: t(pod.tcp_4_streams_gbps, node.tcp_4_streams_gbps),
                    pod,
                    node,
                },
            );
        }
        Ok(DatapathRun {
            fast_path: self.config.fast_path,
            fast_path_filters: self.fast_path_filters()?,
            classes,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// Echo servers for one flow: TCP (one connection at a time) and UDP, in the server's namespace.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn start_servers(flows: &[&Flow]) -> anyhow::Result<Servers> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut s = Servers {
        stop: stop.clone(),
        threads: Vec::new(),
    };
    for (i, f) in flows.iter().enumerate() {
        let ns = Netns::named(&f.server.netns)?;
        let tcp_addr = SocketAddrV4::new(f.server.ip, RR_PORT_BASE + 2 * i as u16);
        let udp_addr = SocketAddrV4::new(f.server.ip, RR_PORT_BASE + 2 * i as u16 + 1);
        let (listener, udp) =
            ns.run(move || Ok((TcpListener::bind(tcp_addr), UdpSocket::bind(udp_addr))))?;
        let listener = listener.with_context(|| format!("listening on {tcp_addr}"))?;
        let udp = udp.with_context(|| format!("binding {udp_addr}"))?;
        listener.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        let st = stop.clone();
        s.threads.push(std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = c.set_nonblocking(false);
                let _ = c.set_nodelay(true);
                let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                let mut buf = [0u8; RR_BYTES];
                while !st.load(Ordering::Relaxed) {
                    match c.read_exact(&mut buf) {
                        Ok(()) => {
                            if c.write_all(&buf).is_err() {
                                break;
                            }
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            continue;
                        }
                        Err(_) => break,
                    }
                }
            }
        }));
        let st = stop.clone();
        s.threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; RR_BYTES];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            }
        }));
    }
    Ok(s)
}

/// Runs the interleaved round trips; per flow (TCP, UDP).
fn rr_all(flows: &[&Flow], round_trips: usize) -> anyhow::Result<Vec<(Rr, Rr)>> {
    let _servers = start_servers(flows)?;
    let mut clients = Vec::new();
    for (i, f) in flows.iter().enumerate() {
        let ns = Netns::named(&f.client.netns)?;
        let tcp_to = SocketAddrV4::new(f.server.ip, RR_PORT_BASE + 2 * i as u16);
        let udp_to = SocketAddrV4::new(f.server.ip, RR_PORT_BASE + 2 * i as u16 + 1);
        let from = f.client.ip;
        let (tcp, udp) = ns.run(move || {
            Ok((
                TcpStream::connect_timeout(&tcp_to.into(), Duration::from_secs(3)),
                UdpSocket::bind((from, 0)),
            ))
        })?;
        let tcp = tcp.with_context(|| format!("{}: connecting to {tcp_to}", f.name))?;
        let udp = udp.with_context(|| format!("{}: binding {from}", f.name))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(Duration::from_secs(2)))?;
        udp.set_read_timeout(Some(Duration::from_millis(200)))?;
        udp.connect(udp_to)?;
        clients.push((tcp, udp));
    }
    let mut samples: Vec<(Vec<u32>, Vec<u32>)> = flows
        .iter()
        .map(|_| {
            (
                Vec::with_capacity(round_trips),
                Vec::with_capacity(round_trips),
            )
        })
        .collect();
    let mut errors = vec![(0usize, 0usize); flows.len()];
    let buf = [0x5au8; RR_BYTES];
    let mut back = [0u8; RR_BYTES];
    let rounds = round_trips.div_ceil(BATCH);
    let deadline = Instant::now() + Duration::from_secs(900);
    for round in 0..rounds {
        if round % 20 == 0 {
            progress(format!("round trips: round {round} of {rounds}"));
        }
        let n = BATCH.min(round_trips - round * BATCH);
        // Rotate the starting flow so that no flow always runs first after a switch.
        for k in 0..flows.len() {
            let i = (k + round) % flows.len();
            let (tcp, udp) = &mut clients[i];
            for _ in 0..n {
                let t = Instant::now();
                if tcp.write_all(&buf).is_ok() && tcp.read_exact(&mut back).is_ok() {
                    samples[i]
                        .0
                        .push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
                } else {
                    errors[i].0 += 1;
                }
                let t = Instant::now();
                if udp.send(&buf).is_ok() && udp.recv(&mut back).is_ok() {
                    samples[i]
                        .1
                        .push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
                } else {
                    errors[i].1 += 1;
                }
            }
        }
        if Instant::now() > deadline {
            bail!("round trips did not finish within 900 s");
        }
    }
    Ok(samples
        .into_iter()
        .zip(errors)
        .map(|((t, u), (et, eu))| (rr_of(t, et), rr_of(u, eu)))
        .collect())
}

/// One iperf3 run (receiver's throughput, Gbit/s); `None` (with a progress line) when it fails.
fn iperf(f: &Flow, port: u16, streams: u32, seconds: u32) -> Option<f64> {
    let ns_cmd = |ns: &str| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, "iperf3"]);
        c
    };
    let mut server = ns_cmd(&f.server.netns)
        .args([
            "-s",
            "-1",
            "-B",
            &f.server.ip.to_string(),
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = ns_cmd(&f.client.netns)
        .args([
            "-c",
            &f.server.ip.to_string(),
            "-B",
            &f.client.ip.to_string(),
            "-p",
            &port.to_string(),
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ])
        .stderr(Stdio::null())
        .output();
    // The server exits after one test (-1); make sure of it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = server.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = server.kill();
    let _ = server.wait();
    let out = out.ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64();
    if bps.is_none() {
        progress(format!(
            "iperf3 {} ({streams} streams) failed: {}",
            f.name,
            v["error"].as_str().unwrap_or("no result")
        ));
    }
    bps.map(|b| b / 1e9)
}
