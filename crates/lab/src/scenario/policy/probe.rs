//! In-pod servers and probes for the policy matrix: every pod serves TCP, UDP and SCTP on each of its ports, from
//! sockets bound inside its namespace (threads in this process, no process per pod); probes open their socket in
//! the source pod's namespace and run on a bounded pool of threads, each with a timeout.
//!
//! | protocol | server | reachable when |
//! |---|---|---|
//! | TCP | listener (accept, close) | the connection is established |
//! | UDP | echo | the datagram comes back |
//! | SCTP | raw IP socket (protocol 132): answers an INIT to a served port with INIT-ACK | the INIT-ACK comes back |

use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol as SockProto, SockAddr, Socket, Type};
use underlay_dataplane::Netns;

use super::sctp;

/// The ports every pod of the model serves, as the e2e suite's pods do.
pub const PORTS: [u16; 2] = [80, 81];

/// A transport protocol NetworkPolicy names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// Lowercase, as in `serve-80-tcp` and `tcp/80`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// As a NetworkPolicy and a container port spell it.
    pub fn kube_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    pub fn parse(s: &str) -> Option<Protocol> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
    }
}

/// The container port name the e2e suite gives a served port: `serve-80-tcp`.
pub fn port_name(port: u16, proto: Protocol) -> String {
    format!("serve-{port}-{}", proto.as_str())
}

/// Every `(protocol, port)` a pod serves, in report order (tcp/80, tcp/81, udp/80, …).
pub fn services() -> Vec<(Protocol, u16)> {
    Protocol::ALL
        .into_iter()
        .flat_map(|p| PORTS.into_iter().map(move |port| (p, port)))
        .collect()
}

fn service_index(proto: Protocol, port: u16) -> Option<usize> {
    services().iter().position(|s| *s == (proto, port))
}

/// A pod the servers run in.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub netns: String,
    pub ip: Ipv4Addr,
}

/// Packets (UDP datagrams, TCP connections, SCTP INITs) each endpoint's servers received, per service.
#[derive(Debug, Default)]
pub struct Received {
    counts: Vec<Vec<AtomicU64>>,
}

impl Received {
    fn new(endpoints: usize) -> Self {
        let n = services().len();
        Self {
            counts: (0..endpoints)
                .map(|_| (0..n).map(|_| AtomicU64::new(0)).collect())
                .collect(),
        }
    }

    fn bump(&self, endpoint: usize, service: usize) {
        self.counts[endpoint][service].fetch_add(1, Ordering::Relaxed);
    }

    /// What endpoint `i` received on `proto/port` so far.
    pub fn get(&self, endpoint: usize, proto: Protocol, port: u16) -> u64 {
        service_index(proto, port)
            .map(|s| self.counts[endpoint][s].load(Ordering::Relaxed))
            .unwrap_or(0)
    }
}

/// Servers for every service in every endpoint; they stop when dropped.
#[allow(missing_debug_implementations)]
pub struct PodServers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub received: Arc<Received>,
}

/// How long a server thread blocks before it looks at the stop flag.
const SERVER_TICK: Duration = Duration::from_millis(100);

impl PodServers {
    pub fn start(endpoints: &[Endpoint]) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(Received::new(endpoints.len()));
        let mut servers = PodServers {
            stop: stop.clone(),
            threads: Vec::new(),
            received: received.clone(),
        };
        for (i, ep) in endpoints.iter().enumerate() {
            let ns = Netns::named(&ep.netns).with_context(|| format!("opening {}", ep.netns))?;
            let ip = ep.ip;
            let (tcp, udp, raw) = ns
                .run(move || {
                    let mut tcp = Vec::new();
                    let mut udp = Vec::new();
                    for port in PORTS {
                        let addr = SockAddr::from(SocketAddrV4::new(ip, port));
                        let l = Socket::new(Domain::IPV4, Type::STREAM, Some(SockProto::TCP))
                            .map_err(kernel("tcp socket"))?;
                        l.set_reuse_address(true).map_err(kernel("SO_REUSEADDR"))?;
                        l.bind(&addr).map_err(kernel("tcp bind"))?;
                        l.listen(256).map_err(kernel("listen"))?;
                        // accept(2) honours SO_RCVTIMEO: the thread wakes to check its stop flag.
                        l.set_read_timeout(Some(SERVER_TICK))
                            .map_err(kernel("SO_RCVTIMEO"))?;
                        tcp.push((port, l));
                        let u = UdpSocket::bind(SocketAddrV4::new(ip, port))
                            .map_err(kernel("udp bind"))?;
                        u.set_read_timeout(Some(SERVER_TICK))
                            .map_err(kernel("SO_RCVTIMEO"))?;
                        udp.push((port, u));
                    }
                    let raw = Socket::new(
                        Domain::IPV4,
                        Type::RAW,
                        Some(SockProto::from(sctp::IPPROTO_SCTP)),
                    )
                    .map_err(kernel("raw SCTP socket"))?;
                    raw.set_read_timeout(Some(SERVER_TICK))
                        .map_err(kernel("SO_RCVTIMEO"))?;
                    Ok((tcp, udp, raw))
                })
                .with_context(|| format!("servers in {}", ep.netns))?;
            for (port, l) in tcp {
                let (stop, rx) = (stop.clone(), received.clone());
                let s = service_index(Protocol::Tcp, port).expect("served");
                servers.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((conn, _)) = l.accept() {
                            rx.bump(i, s);
                            drop(conn);
                        }
                    }
                })?;
            }
            for (port, u) in udp {
                let (stop, rx) = (stop.clone(), received.clone());
                let s = service_index(Protocol::Udp, port).expect("served");
                servers.spawn(move || {
                    let mut buf = [0u8; 256];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = u.recv_from(&mut buf) {
                            rx.bump(i, s);
                            let _ = u.send_to(&buf[..n], from);
                        }
                    }
                })?;
            }
            let (stop, rx) = (stop.clone(), received.clone());
            servers.spawn(move || sctp_responder(&raw, ip, i, &rx, &stop))?;
        }
        Ok(servers)
    }

    fn spawn(&mut self, f: impl FnOnce() + Send + 'static) -> anyhow::Result<()> {
        let t = std::thread::Builder::new()
            .name("lab-policy-srv".into())
            .stack_size(64 * 1024)
            .spawn(f)?;
        self.threads.push(t);
        Ok(())
    }
}

impl Drop for PodServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn kernel(what: &'static str) -> impl Fn(std::io::Error) -> underlay_dataplane::Error {
    move |source| underlay_dataplane::Error::Kernel {
        op: what.to_string(),
        source,
    }
}

/// Answers each INIT to `ip` on a served port with an INIT-ACK.
fn sctp_responder(raw: &Socket, ip: Ipv4Addr, i: usize, rx: &Received, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    let mut tag = 0x5EED_0000u32 ^ u32::from(ip);
    while !stop.load(Ordering::Relaxed) {
        let Ok(n) = (&*raw).read(&mut buf) else {
            continue;
        };
        let Some((src, dst, payload)) = sctp::split_ipv4(&buf[..n]) else {
            continue;
        };
        let Some(p) = sctp::parse(payload) else {
            continue;
        };
        if dst != ip || p.chunk != sctp::CHUNK_INIT || !PORTS.contains(&p.dst_port) {
            continue;
        }
        if let Some(s) = service_index(Protocol::Sctp, p.dst_port) {
            rx.bump(i, s);
        }
        tag = tag.wrapping_mul(1_664_525).wrapping_add(1_013_904_223) | 1;
        let reply = sctp::init_ack(&p, tag);
        let _ = raw.send_to(&reply, &SockAddr::from(SocketAddrV4::new(src, 0)));
    }
}

/// One probe: from a source namespace to `dst:port` over `proto`.
#[derive(Debug, Clone)]
pub struct ProbeJob {
    pub source: Arc<Netns>,
    pub dst: Ipv4Addr,
    pub proto: Protocol,
    pub port: u16,
}

/// Source ports and SCTP tags of concurrent probes must differ: a process-wide counter feeds both.
static NEXT: AtomicU32 = AtomicU32::new(0);

fn fresh() -> u32 {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    n.wrapping_mul(0x9E37_79B9) ^ seed
}

/// Whether `job`'s destination answers within `timeout`. Errors opening the socket count as unreachable (and
/// are returned for the report).
pub fn probe(job: &ProbeJob, timeout: Duration) -> Result<bool, String> {
    let proto = job.proto;
    let sock = job
        .source
        .run(move || {
            let s = match proto {
                Protocol::Tcp => Socket::new(Domain::IPV4, Type::STREAM, Some(SockProto::TCP)),
                Protocol::Udp => Socket::new(Domain::IPV4, Type::DGRAM, Some(SockProto::UDP)),
                Protocol::Sctp => Socket::new(
                    Domain::IPV4,
                    Type::RAW,
                    Some(SockProto::from(sctp::IPPROTO_SCTP)),
                ),
            };
            s.map_err(kernel("probe socket"))
        })
        .map_err(|e| e.to_string())?;
    let to = SocketAddrV4::new(job.dst, job.port);
    Ok(match proto {
        Protocol::Tcp => sock.connect_timeout(&SockAddr::from(to), timeout).is_ok(),
        Protocol::Udp => udp_round_trip(sock, to, timeout),
        Protocol::Sctp => sctp_handshake(&sock, to, timeout),
    })
}

fn udp_round_trip(sock: Socket, to: SocketAddrV4, timeout: Duration) -> bool {
    let u: UdpSocket = sock.into();
    if u.connect(to).is_err() {
        return false;
    }
    let msg = fresh().to_be_bytes();
    if u.send(&msg).is_err() {
        return false;
    }
    let start = Instant::now();
    let mut buf = [0u8; 64];
    while let Some(left) = timeout.checked_sub(start.elapsed()) {
        let _ = u.set_read_timeout(Some(left.max(Duration::from_micros(100))));
        match u.recv(&mut buf) {
            Ok(4) if buf[..4] == msg => return true,
            Ok(_) => {}
            // Refused (ICMP port unreachable or a policy's reject) or timed out.
            Err(_) => return false,
        }
    }
    false
}

fn sctp_handshake(sock: &Socket, to: SocketAddrV4, timeout: Duration) -> bool {
    let r = fresh();
    let src_port = 20_000 + (r % 30_000) as u16;
    let tag = r | 1;
    let init = sctp::init(src_port, to.port(), tag);
    let dst = SockAddr::from(SocketAddrV4::new(*to.ip(), 0));
    if sock.send_to(&init, &dst).is_err() {
        return false;
    }
    let start = Instant::now();
    let mut buf = [0u8; 2048];
    while let Some(left) = timeout.checked_sub(start.elapsed()) {
        let _ = sock.set_read_timeout(Some(left.max(Duration::from_micros(100))));
        let Ok(n) = (&*sock).read(&mut buf) else {
            return false;
        };
        let Some((src, _, payload)) = sctp::split_ipv4(&buf[..n]) else {
            continue;
        };
        if src != *to.ip() {
            continue;
        }
        if let Some(p) = sctp::parse(payload)
            && p.chunk == sctp::CHUNK_INIT_ACK
            && p.src_port == to.port()
            && p.dst_port == src_port
            && p.vtag == tag
        {
            return true;
        }
    }
    false
}

/// Runs `jobs` on up to `workers` threads; each result is the job's reachability.
pub fn run_probes(jobs: &[ProbeJob], workers: usize, timeout: Duration) -> Vec<bool> {
    let results: Vec<AtomicU64> = jobs.iter().map(|_| AtomicU64::new(0)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, jobs.len().max(1)) {
            let (results, next) = (&results, &next);
            std::thread::Builder::new()
                .name("lab-policy-probe".into())
                .stack_size(128 * 1024)
                .spawn_scoped(s, move || {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(job) = jobs.get(i) else { break };
                        let ok = probe(job, timeout).unwrap_or(false);
                        results[i].store(u64::from(ok), Ordering::Relaxed);
                    }
                })
                .expect("spawning a probe thread");
        }
    });
    results
        .iter()
        .map(|r| r.load(Ordering::Relaxed) == 1)
        .collect()
}
