//! The soak's pods and their churn: created as kubelet creates them (the Pod object, `underlay-cni` ADD with the
//! pod's identity, retried while the agent answers "try again later", the Pod's status), removed with DEL, and a
//! failed ADD or DEL handled as kubelet does (DEL the sandbox; retry a failed DEL until it succeeds).
//!
//! ```text
//!   churn thread ──add/remove every 0.3–1.2 s──► Population { live pods, pending DELs, every address seen }
//!   burst (agent kill) ──n ADDs at once on one node──┘          ▲ read every second by the checks
//!   each live pod: UDP echo on 7007 (reachability), a sender socket (policy probes), guarded pods a recorder
//!   on 7100 (what the policy let through)
//! ```

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;

use super::super::echo::{EchoClient, EchoServers, udp_in};
use super::super::policy::model::kube_pod;
use super::super::{cni, is_try_again_later};
use super::schedule::Rng;
use crate::kernel;

/// The Kubernetes namespace of every soak pod.
pub const NAMESPACE: &str = "soak";
/// The UDP port guarded pods record datagrams on (the policy lets one client group in).
pub const GUARD_PORT: u16 = 7100;
/// Client pods carry `soak-client: a|b`; guarded pods `soak-role: guarded`.
pub const GROUP_LABEL: &str = "soak-client";
pub const ROLE_LABEL: &str = "soak-role";
/// How long an ADD is retried while the agent answers "try again later" (or an eni pool is exhausted).
const ADD_PATIENCE: Duration = Duration::from_secs(20);

/// Which side of the policy a pod is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    A,
    B,
    Guarded,
}

impl Group {
    pub fn label(self) -> &'static str {
        match self {
            Group::A => "a",
            Group::B => "b",
            Group::Guarded => "guarded",
        }
    }

    fn labels(self) -> std::collections::BTreeMap<String, String> {
        match self {
            Group::Guarded => [(ROLE_LABEL.to_string(), "guarded".to_string())].into(),
            g => [(GROUP_LABEL.to_string(), g.label().to_string())].into(),
        }
    }
}

/// A datagram a guarded pod's recorder took in.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub guarded: String,
    pub from_id: u32,
    /// When the sender sent it, and when it arrived (ms from the start of the run).
    pub sent_ms: u64,
    pub at_ms: u64,
}

/// The sockets a pod holds open in its namespace (dropped, the namespace can go).
struct PodSockets {
    _servers: EchoServers,
    client: EchoClient,
    sender: UdpSocket,
    _guard: Option<GuardRecorder>,
}

/// One live pod.
#[allow(missing_debug_implementations)]
pub struct SoakPod {
    pub id: u32,
    pub name: String,
    pub netns: String,
    pub node: usize,
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub group: Group,
    pub wired_at: Instant,
    sockets: Mutex<Option<PodSockets>>,
}

impl SoakPod {
    /// One echo round trip to `dst`.
    pub fn round_trip(&self, dst: Ipv4Addr, timeout: Duration) -> bool {
        let mut s = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        s.as_mut()
            .is_some_and(|s| s.client.round_trip(dst, timeout).is_some())
    }

    /// One policy probe to a guarded pod: our id and the send time.
    pub fn send_probe(&self, dst: Ipv4Addr, sent_ms: u64) {
        let s = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = s.as_ref() {
            let mut msg = [0u8; 12];
            msg[..4].copy_from_slice(&self.id.to_be_bytes());
            msg[4..].copy_from_slice(&sent_ms.to_be_bytes());
            let _ = s.sender.send_to(&msg, SocketAddrV4::new(dst, GUARD_PORT));
        }
    }

    /// Closes every socket the pod holds (its namespace can then go away).
    fn close(&self) {
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

/// Records every datagram on `GUARD_PORT` until dropped.
struct GuardRecorder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GuardRecorder {
    fn start(
        netns: &str,
        ip: Ipv4Addr,
        name: String,
        t0: Instant,
        out: Arc<Mutex<Vec<Delivery>>>,
    ) -> anyhow::Result<Self> {
        let sock = udp_in(netns, SocketAddrV4::new(ip, GUARD_PORT))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("soak-guard".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut buf = [0u8; 32];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((12, _)) = sock.recv_from(&mut buf) {
                        let from_id = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes"));
                        let sent_ms = u64::from_be_bytes(buf[4..12].try_into().expect("8 bytes"));
                        out.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(Delivery {
                                guarded: name.clone(),
                                from_id,
                                sent_ms,
                                at_ms: t0.elapsed().as_millis() as u64,
                            });
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for GuardRecorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A node as the churn sees it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub netns: String,
    pub conflist: PathBuf,
    pub host_ip: Ipv4Addr,
    pub checkpoint: PathBuf,
}

/// What the churn needs, shared with the run.
#[allow(missing_debug_implementations)]
pub struct Ctx {
    pub plugin: PathBuf,
    pub nodes: Vec<NodeInfo>,
    pub api: underlay_apisim::ApiSim,
    /// `ul-<lab>-`: every pod namespace starts with it.
    pub prefix: String,
    pub seed: u64,
    pub t0: Instant,
    /// Nodes that are dead (no kubelet adds pods there).
    pub node_down: Vec<AtomicBool>,
    /// While set, nothing is added or removed (the API is down: no scheduler, no kubelet sync).
    pub paused: AtomicBool,
    pub deliveries: Arc<Mutex<Vec<Delivery>>>,
}

/// A DEL still to succeed.
#[derive(Debug, Clone)]
pub struct PendingDel {
    pub name: String,
    pub netns: String,
    pub node: usize,
    pub container_id: String,
    pub not_before: Instant,
}

/// Every pod of the run.
#[derive(Default)]
#[allow(missing_debug_implementations)]
pub struct Population {
    pub live: Vec<Arc<SoakPod>>,
    pub pending_del: Vec<PendingDel>,
    /// Every address a pod ever had in this run.
    pub ever: BTreeSet<Ipv4Addr>,
    /// Every pod of the run by id: its group and name (a datagram names its sender by id).
    pub groups: std::collections::BTreeMap<u32, (Group, String)>,
    pub next_id: u32,
    pub stats: ChurnStats,
}

/// Counts of the churn.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChurnStats {
    pub adds: u64,
    /// ADDs that failed (agent killed, API down, …) and were undone with DEL, as kubelet undoes a sandbox.
    pub adds_failed: u64,
    pub dels: u64,
    /// DEL attempts that failed and were retried.
    pub dels_retried: u64,
    /// Pods whose namespace was deleted before their DEL.
    pub netns_deleted: u64,
}

pub type Shared = Arc<Mutex<Population>>;

fn lock(p: &Shared) -> std::sync::MutexGuard<'_, Population> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ctx {
    fn node_name(&self, n: usize) -> &str {
        &self.nodes[n].name
    }

    fn cni(
        &self,
        n: usize,
        cmd: &str,
        container: &str,
        netns: &str,
        args: Option<&str>,
    ) -> anyhow::Result<serde_json::Value> {
        let node = &self.nodes[n];
        cni(
            &self.plugin,
            &node.netns,
            &node.conflist,
            cmd,
            container,
            netns,
            args,
        )
    }

    /// Adds a pod of `group` on node `n` as kubelet would. `Ok(None)`: the ADD failed and was undone.
    pub fn add_pod(
        &self,
        pop: &Shared,
        n: usize,
        group: Group,
    ) -> anyhow::Result<Option<Arc<SoakPod>>> {
        let id = {
            let mut p = lock(pop);
            p.next_id += 1;
            let id = p.next_id;
            p.groups.insert(id, (group, format!("p{id}")));
            id
        };
        let name = format!("p{id}");
        let netns = format!("{}s{id}", self.prefix);
        let container_id = format!("{:08x}{:08x}", self.seed as u32, id);
        let labels = group.labels();
        self.api.insert(&kube_pod(
            NAMESPACE,
            &name,
            &labels,
            self.node_name(n),
            None,
        ));
        kernel::netns_add(&netns).with_context(|| format!("creating {netns}"))?;
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id}"
        );
        let deadline = Instant::now() + ADD_PATIENCE;
        let reply = loop {
            match self.cni(n, "ADD", &container_id, &netns, Some(&args)) {
                Err(e)
                    if Instant::now() < deadline
                        && (e.to_string().contains("exhausted") || is_try_again_later(&e)) =>
                {
                    std::thread::sleep(Duration::from_millis(300));
                }
                r => break r,
            }
        };
        let ip = reply.and_then(|v| {
            v["ips"][0]["address"]
                .as_str()
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
                .with_context(|| format!("no address in the CNI result: {v}"))
        });
        let wired = ip.and_then(|ip| {
            let sockets = self.open_sockets(&netns, ip, &name, group)?;
            Ok((ip, sockets))
        });
        let (ip, sockets) = match wired {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(pod = %name, error = %format!("{e:#}"), "soak ADD failed; undoing");
                lock(pop).stats.adds_failed += 1;
                let pending = PendingDel {
                    name,
                    netns,
                    node: n,
                    container_id,
                    not_before: Instant::now(),
                };
                self.del(pop, pending);
                return Ok(None);
            }
        };
        self.api.insert(&kube_pod(
            NAMESPACE,
            &name,
            &labels,
            self.node_name(n),
            Some((ip, self.nodes[n].host_ip)),
        ));
        let pod = Arc::new(SoakPod {
            id,
            name,
            netns,
            node: n,
            ip,
            container_id,
            group,
            wired_at: Instant::now(),
            sockets: Mutex::new(Some(sockets)),
        });
        let mut p = lock(pop);
        p.stats.adds += 1;
        p.ever.insert(ip);
        p.live.push(pod.clone());
        Ok(Some(pod))
    }

    fn open_sockets(
        &self,
        netns: &str,
        ip: Ipv4Addr,
        name: &str,
        group: Group,
    ) -> anyhow::Result<PodSockets> {
        let guard = if group == Group::Guarded {
            Some(GuardRecorder::start(
                netns,
                ip,
                name.to_string(),
                self.t0,
                self.deliveries.clone(),
            )?)
        } else {
            None
        };
        Ok(PodSockets {
            _servers: EchoServers::start(&[(netns.to_string(), ip)])?,
            client: EchoClient::new(netns, ip)?,
            sender: udp_in(netns, SocketAddrV4::new(ip, 0))?,
            _guard: guard,
        })
    }

    /// DEL (the namespace may be gone already), then the namespace and the Pod object; a failed DEL is queued.
    fn del(&self, pop: &Shared, d: PendingDel) {
        let r = self.cni(d.node, "DEL", &d.container_id, &d.netns, None);
        let _ = kernel::netns_del(&d.netns);
        match r {
            Ok(_) => {
                self.api.remove::<Pod>(Some(NAMESPACE), &d.name);
                lock(pop).stats.dels += 1;
            }
            Err(e) => {
                tracing::debug!(pod = %d.name, error = %format!("{e:#}"), "soak DEL failed; retrying later");
                let mut p = lock(pop);
                p.stats.dels_retried += 1;
                p.pending_del.push(PendingDel {
                    not_before: Instant::now() + Duration::from_millis(500),
                    ..d
                });
            }
        }
    }

    /// Removes a live pod: sockets closed, DEL, namespace and Pod object gone.
    pub fn remove_pod(&self, pop: &Shared, pod: &Arc<SoakPod>) {
        lock(pop).live.retain(|p| p.id != pod.id);
        pod.close();
        self.del(
            pop,
            PendingDel {
                name: pod.name.clone(),
                netns: pod.netns.clone(),
                node: pod.node,
                container_id: pod.container_id.clone(),
                not_before: Instant::now(),
            },
        );
    }

    /// Deletes a live pod's namespace with no DEL; the runtime's DEL comes after `delay`.
    pub fn delete_netns(
        &self,
        pop: &Shared,
        pod: &Arc<SoakPod>,
        delay: Duration,
    ) -> anyhow::Result<()> {
        lock(pop).live.retain(|p| p.id != pod.id);
        pod.close();
        kernel::netns_del(&pod.netns)?;
        let mut p = lock(pop);
        p.stats.netns_deleted += 1;
        p.pending_del.push(PendingDel {
            name: pod.name.clone(),
            netns: pod.netns.clone(),
            node: pod.node,
            container_id: pod.container_id.clone(),
            not_before: Instant::now() + delay,
        });
        Ok(())
    }

    /// Retries the DELs that are due.
    pub fn retry_dels(&self, pop: &Shared) {
        let now = Instant::now();
        let due: Vec<PendingDel> = {
            let mut p = lock(pop);
            let (due, later) = std::mem::take(&mut p.pending_del)
                .into_iter()
                .partition(|d| d.not_before <= now);
            p.pending_del = later;
            due
        };
        for d in due {
            self.del(pop, d);
        }
    }

    /// The churn: until `stop`, every 0.3–1.2 s add a client pod on a random live node or remove a random client,
    /// keeping about `target` clients; due DELs retried on every step.
    pub fn churn(&self, pop: &Shared, stop: &AtomicBool, target: usize, mut rng: Rng) {
        while !stop.load(Ordering::Relaxed) {
            let wait = rng.millis(300, 1200);
            let until = Instant::now() + wait;
            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            self.retry_dels(pop);
            if self.paused.load(Ordering::Relaxed) {
                continue;
            }
            let clients: Vec<Arc<SoakPod>> = lock(pop)
                .live
                .iter()
                .filter(|p| p.group != Group::Guarded)
                .cloned()
                .collect();
            let add = clients.len() < target / 2
                || (clients.len() < target + target / 2 && rng.chance(0.55));
            if add {
                let up: Vec<usize> = (0..self.nodes.len())
                    .filter(|&n| !self.node_down[n].load(Ordering::Relaxed))
                    .collect();
                if up.is_empty() {
                    continue;
                }
                let n = up[rng.below(up.len() as u64) as usize];
                let group = if rng.chance(0.5) { Group::A } else { Group::B };
                if let Err(e) = self.add_pod(pop, n, group) {
                    tracing::warn!(error = %format!("{e:#}"), "soak churn: adding a pod");
                }
            } else if !clients.is_empty() {
                let pod = &clients[rng.below(clients.len() as u64) as usize];
                if !self.node_down[pod.node].load(Ordering::Relaxed) {
                    self.remove_pod(pop, pod);
                }
            }
        }
    }
}

/// `n` ADDs at once on node `node` (a Deployment's scale-up landing there), each on its own thread.
pub fn burst(
    ctx: &Arc<Ctx>,
    pop: &Shared,
    node: usize,
    n: usize,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..n)
        .map(|k| {
            let (ctx, pop) = (ctx.clone(), pop.clone());
            std::thread::spawn(move || {
                let group = if k % 2 == 0 { Group::A } else { Group::B };
                if let Err(e) = ctx.add_pod(&pop, node, group) {
                    tracing::warn!(error = %format!("{e:#}"), "soak burst: adding a pod");
                }
            })
        })
        .collect()
}
