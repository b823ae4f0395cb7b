//! Sockets inside lab namespaces: UDP echo servers and clients (the connectivity matrix, the failover probe) and
//! the controller's health prober, which connects from the controller host's namespace as a controller pod on a
//! node would.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use underlay_dataplane::Netns;

/// UDP port every lab echo server listens on.
pub const ECHO_PORT: u16 = 7007;

/// A UDP socket bound inside `netns` (it stays in that namespace whichever thread uses it).
pub fn udp_in(netns: &str, addr: SocketAddrV4) -> anyhow::Result<UdpSocket> {
    let ns = Netns::named(netns).with_context(|| format!("opening namespace {netns}"))?;
    let sock = ns
        .run(move || Ok(UdpSocket::bind(addr)))
        .with_context(|| format!("entering {netns}"))?
        .with_context(|| format!("binding {addr} in {netns}"))?;
    Ok(sock)
}

/// Echo servers: one thread per socket, answering every datagram with itself until stopped.
pub struct EchoServers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl EchoServers {
    /// Starts a server on `ip:ECHO_PORT` in each `(netns, ip)`.
    pub fn start(endpoints: &[(String, Ipv4Addr)]) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut servers = EchoServers {
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for (ns, ip) in endpoints {
            let sock = udp_in(ns, SocketAddrV4::new(*ip, ECHO_PORT))?;
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            let stop = stop.clone();
            let t = std::thread::Builder::new()
                .name("lab-echo".into())
                .stack_size(64 * 1024)
                .spawn(move || {
                    let mut buf = [0u8; 64];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = sock.recv_from(&mut buf) {
                            let _ = sock.send_to(&buf[..n], from);
                        }
                    }
                })?;
            servers.threads.push(t);
        }
        Ok(servers)
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A client socket in a namespace, sending numbered datagrams and matching replies.
pub struct EchoClient {
    sock: UdpSocket,
    seq: u64,
    /// The last socket error seen (an ICMP error of some earlier datagram, typically).
    pub last_error: Option<String>,
}

impl EchoClient {
    pub fn new(netns: &str, ip: Ipv4Addr) -> anyhow::Result<Self> {
        Ok(Self {
            sock: udp_in(netns, SocketAddrV4::new(ip, 0))?,
            seq: 0,
            last_error: None,
        })
    }

    /// One round trip to `dst`: the RTT, or `None` when no matching reply came within `timeout`.
    pub fn round_trip(&mut self, dst: Ipv4Addr, timeout: Duration) -> Option<Duration> {
        self.seq += 1;
        let msg = self.seq.to_be_bytes();
        let to = SocketAddr::V4(SocketAddrV4::new(dst, ECHO_PORT));
        let start = Instant::now();
        self.sock.send_to(&msg, to).ok()?;
        let mut buf = [0u8; 64];
        loop {
            let Some(left) = timeout.checked_sub(start.elapsed()) else {
                // Past the deadline: this thread may itself have been kept off the CPU, with the reply already
                // waiting in the socket. Drain what is there before calling the exchange lost.
                return self.drain_for(&msg, to).then(|| start.elapsed());
            };
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_micros(100))))
                .ok()?;
            match self.sock.recv_from(&mut buf) {
                Ok((8, from)) if from == to && buf[..8] == msg => return Some(start.elapsed()),
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None;
                }
                // Linux hands an unconnected UDP socket the ICMP errors of its earlier datagrams (to any
                // destination) on a later call: one stale error must not fail this exchange.
                Err(e) => {
                    self.last_error = Some(e.to_string());
                    continue;
                }
            }
        }
    }

    /// Whether the matching reply is already queued on the socket (non-blocking).
    fn drain_for(&mut self, msg: &[u8; 8], to: SocketAddr) -> bool {
        let mut buf = [0u8; 64];
        if self.sock.set_nonblocking(true).is_err() {
            return false;
        }
        let mut found = false;
        while let Ok((n, from)) = self.sock.recv_from(&mut buf) {
            if n == 8 && from == to && buf[..8] == msg[..] {
                found = true;
                break;
            }
        }
        let _ = self.sock.set_nonblocking(false);
        found
    }

    /// Reachability: up to `attempts` round trips (the first may wait for neighbour resolution).
    pub fn reach(&mut self, dst: Ipv4Addr, attempts: usize, timeout: Duration) -> Option<Duration> {
        (0..attempts).find_map(|_| self.round_trip(dst, timeout))
    }
}

/// The controller's default prober ([`underlay_controller::UdpProber`]) with its socket bound inside `netns`.
pub fn netns_udp_prober(netns: String, timeout: Duration) -> underlay_controller::UdpProber {
    underlay_controller::UdpProber::with_socket(
        timeout,
        Box::new(move || {
            let ns = Netns::named(&netns).map_err(std::io::Error::other)?;
            ns.run(|| Ok(std::net::UdpSocket::bind("0.0.0.0:0")))
                .map_err(std::io::Error::other)?
        }),
    )
}
