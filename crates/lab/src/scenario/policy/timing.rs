//! The two timing cases of `lab policy`:
//!
//! - **First packet.** A new pod sends UDP datagrams to y/b:81 from the instant its namespace has a route (a
//!   thread in its namespace tries every 200 µs while `underlay-cni` ADD runs), and for a second after the ADD
//!   returned. A control pod no policy selects must get its datagrams through; a pod an egress deny-all policy
//!   selects (the policy is in the API before the Pod) must have zero datagrams counted at y/b.
//! - **Change under load.** x/a → y/a on one UDP socket (an established flow) and x/b → y/b with a fresh socket
//!   per datagram (new connections), every 2 ms; a policy isolating y/b's ingress is written mid-run. The
//!   allowed flow must keep flowing; the denied one must stop within the bound (500 ms) after the write.

use std::net::{SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Serialize;
use underlay_dataplane::Netns;

use super::probe::Protocol;
use super::{PolicyLab, model};

/// The bound from a policy event to the kernel.
pub const BOUND: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Serialize)]
pub struct FirstPacketRun {
    pub pod: String,
    pub selected_by_deny: bool,
    /// Datagrams the pod's socket accepted (the first ones may precede the ADD's return).
    pub sent: u64,
    /// When the first datagram left, relative to the ADD's return (ms; negative: before it returned).
    pub first_sent_ms: Option<f64>,
    /// Datagrams y/b's server counted.
    pub received_at_peer: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FirstPacketReport {
    pub control: FirstPacketRun,
    pub denied: FirstPacketRun,
    pub passed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct UnderLoadReport {
    /// Allowed flow: replies lost after the policy write, of those sent, and the longest gap between replies.
    pub allowed_sent_after: u64,
    pub allowed_lost_after: u64,
    pub allowed_longest_gap_ms: f64,
    /// Denied flow: the last reply after the write (ms after it), and replies still arriving later than the
    /// bound.
    pub denied_last_reply_ms: Option<f64>,
    pub denied_replies_after_bound: u64,
    pub bound_ms: f64,
    pub passed: bool,
}

fn policy(json: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(json).expect("a valid NetworkPolicy")
}

impl PolicyLab {
    /// The first-packet case; see the module doc. Leaves the model as built (policies removed).
    pub fn first_packet(&mut self) -> anyhow::Result<FirstPacketReport> {
        let deny = policy(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "first-packet-deny", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"first-packet": "deny"}}, "policyTypes": ["Egress"]}
        }));
        let next = self
            .world
            .with_case(&Default::default(), &Default::default(), &[deny]);
        self.publish(&next)?;
        std::thread::sleep(self.options.settle);
        let control = self.first_packet_run("fp-open", false);
        let denied = self.first_packet_run("fp-deny", true);
        let clean = self
            .world
            .with_case(&Default::default(), &Default::default(), &[]);
        self.publish(&clean)?;
        let (control, denied) = (control?, denied?);
        let passed =
            control.received_at_peer > 0 && denied.received_at_peer == 0 && denied.sent > 0;
        Ok(FirstPacketReport {
            control,
            denied,
            passed,
        })
    }

    fn first_packet_run(&mut self, name: &str, deny: bool) -> anyhow::Result<FirstPacketRun> {
        let peer = 4; // y/b
        let peer_ip = self.world.pods[peer].ip;
        let node = 0;
        let netns = format!("{}{name}", self.lab.id().netns_prefix());
        let mut labels = model::World::base_pod_labels(name);
        if deny {
            labels.insert("first-packet".into(), "deny".into());
        }
        let node_name = self.lab.nodes[node].name.clone();
        if underlay_apisim::Kind::of::<k8s_openapi::api::core::v1::Pod>().is_some() {
            self.lab
                .api()
                .insert(&model::kube_pod("x", name, &labels, &node_name, None));
        }
        let before = self.received().get(peer, Protocol::Udp, 81);
        crate::kernel::netns_add(&netns)?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let first = Arc::new(std::sync::Mutex::new(None::<Instant>));
        let sender = {
            let (stop, sent, first) = (stop.clone(), sent.clone(), first.clone());
            let ns = Netns::named(&netns)?;
            std::thread::spawn(move || {
                let _ = ns.run(move || {
                    let to = SocketAddrV4::new(peer_ip, 81);
                    while !stop.load(Ordering::Relaxed) {
                        // Fails (no address, no route) until the sandbox is wired.
                        if let Ok(s) = UdpSocket::bind("0.0.0.0:0")
                            && s.send_to(b"first", to).is_ok()
                            && sent.fetch_add(1, Ordering::Relaxed) == 0
                        {
                            *first.lock().expect("lock") = Some(Instant::now());
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    Ok(())
                });
            })
        };
        let cid = format!(
            "{:0>12x}{:0>8x}",
            self.lab.config.seed,
            0xF000 + usize::from(deny)
        );
        let wired = self
            .lab
            .wire_pod(node, name, &netns, &cid, Some(("x", name)));
        let returned = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        let _ = sender.join();
        let ip = wired?;
        if underlay_apisim::Kind::of::<k8s_openapi::api::core::v1::Pod>().is_some() {
            let host = self.lab.nodes[node].instance.private_ip;
            self.lab.api().insert(&model::kube_pod(
                "x",
                name,
                &labels,
                &node_name,
                Some((ip, host)),
            ));
        }
        // Datagrams in flight when the sender stopped.
        std::thread::sleep(Duration::from_millis(200));
        let first_sent_ms = first.lock().expect("lock").map(|f| {
            if f <= returned {
                -(returned - f).as_secs_f64() * 1e3
            } else {
                (f - returned).as_secs_f64() * 1e3
            }
        });
        Ok(FirstPacketRun {
            pod: format!("x/{name}"),
            selected_by_deny: deny,
            sent: sent.load(Ordering::Relaxed),
            first_sent_ms,
            received_at_peer: self.received().get(peer, Protocol::Udp, 81) - before,
        })
    }

    /// The change-under-load case; see the module doc. Leaves the model as built.
    pub fn under_load(&mut self) -> anyhow::Result<UnderLoadReport> {
        let (xa, ya, xb, yb) = (0usize, 3usize, 1usize, 4usize);
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let flow = |src: usize, dst: usize, fresh: bool| -> anyhow::Result<_> {
            let ns = Netns::named(&self.lab.pods[src].netns)?;
            let to = SocketAddrV4::new(self.world.pods[dst].ip, 80);
            let stop = stop.clone();
            Ok(std::thread::spawn(move || {
                // (sent at, replied) per datagram.
                let mut log: Vec<(Duration, bool)> = Vec::new();
                let open = || {
                    ns.run(|| {
                        UdpSocket::bind("0.0.0.0:0").map_err(|source| {
                            underlay_dataplane::Error::Kernel {
                                op: "udp bind".into(),
                                source,
                            }
                        })
                    })
                };
                let mut sock = open().ok();
                while !stop.load(Ordering::Relaxed) {
                    if fresh {
                        sock = open().ok();
                    }
                    let Some(s) = sock.as_ref() else { break };
                    let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
                    let at = start.elapsed();
                    let mut ok = false;
                    if s.send_to(b"load", to).is_ok() {
                        let mut buf = [0u8; 16];
                        ok = matches!(s.recv_from(&mut buf), Ok((4, _)));
                    }
                    log.push((at, ok));
                    std::thread::sleep(Duration::from_millis(2));
                }
                log
            }))
        };
        let allowed = flow(xa, ya, false)?;
        let denied = flow(xb, yb, true)?;
        std::thread::sleep(Duration::from_secs(1));
        let deny = policy(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "under-load-deny", "namespace": "y"},
            "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}
        }));
        let next = self
            .world
            .with_case(&Default::default(), &Default::default(), &[deny]);
        let t0 = start.elapsed();
        let published = self.publish(&next);
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        let allowed = allowed.join().unwrap_or_default();
        let denied = denied.join().unwrap_or_default();
        let clean = self
            .world
            .with_case(&Default::default(), &Default::default(), &[]);
        self.publish(&clean)?;
        published?;
        let after: Vec<_> = allowed.iter().filter(|(at, _)| *at >= t0).collect();
        let lost = after.iter().filter(|(_, ok)| !ok).count() as u64;
        let mut gap = Duration::ZERO;
        let mut last = t0;
        for (at, ok) in &after {
            if *ok {
                gap = gap.max(*at - last);
                last = *at;
            }
        }
        let late: Vec<Duration> = denied
            .iter()
            .filter(|(at, ok)| *ok && *at >= t0)
            .map(|(at, _)| *at - t0)
            .collect();
        let after_bound = late.iter().filter(|d| **d > BOUND).count() as u64;
        let passed = after_bound == 0 && lost <= after.len() as u64 / 100 && !after.is_empty();
        Ok(UnderLoadReport {
            allowed_sent_after: after.len() as u64,
            allowed_lost_after: lost,
            allowed_longest_gap_ms: gap.as_secs_f64() * 1e3,
            denied_last_reply_ms: late.last().map(|d| d.as_secs_f64() * 1e3),
            denied_replies_after_bound: after_bound,
            bound_ms: BOUND.as_secs_f64() * 1e3,
            passed,
        })
    }
}
