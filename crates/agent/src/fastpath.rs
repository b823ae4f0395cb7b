//! The tc-BPF fast path on the node ([`underlay_dataplane::fastpath`]): which devices carry its programs and
//! which pods are in its map, kept in step with the kernel and with NetworkPolicy.
//!
//! ```text
//!   reconcile (every second, node netns):  links + addresses ─► uplinks (an address in the VPC) ─► ul_fp_uplink
//!                                          main-table /32 routes to host veths (ul…) ─► pods ─► ul_fp_pod
//!                                          pods no policy selects ─► ul_fp_pods
//!   PolicyEngine, before each nft commit ─► selected(veths) ─► those pods leave ul_fp_pods first
//! ```
//!
//! Policy holds because the fast path only carries pods whose verdict is known to be "no policy here": a pod
//! any NetworkPolicy selects (either direction) is never in the map, and it is removed *before* the nft
//! transaction that starts selecting it commits. With network policy enabled and its inputs not synced yet, no
//! pod is in the map. Destinations outside the VPC and the pod CIDR (the metadata service, the internet) never
//! take it, so the IMDS guard and SNAT see every packet they judge.
//!
//! The agent removes every program, filter and qdisc it added when it stops (an uninstall leaves nothing; a
//! restart runs on the kernel path until the new agent attaches again). A pod's own filter goes with its veth.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use underlay_core::veth_names::is_host_veth_name;
use underlay_dataplane::Netns;
use underlay_dataplane::fastpath::{FastPath, FastPathError, Role};

use crate::policy::SelectionObserver;

/// How often the devices and pods are re-read from the kernel.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

struct Inner {
    fp: FastPath,
    /// Host veths some policy selects; `None` while policy is on but its inputs have not been compiled yet.
    selected: Option<BTreeSet<String>>,
    /// Devices carrying a program now (name → role).
    attached: BTreeMap<String, Role>,
    /// Pods in the map (address → host veth name).
    pods: BTreeMap<Ipv4Addr, String>,
}

/// The node's fast path. Dropping it does not detach: call [`NodeFastPath::shutdown`].
pub struct NodeFastPath {
    netns: Netns,
    inner: Mutex<Inner>,
    vpc: Vec<Ipv4Net>,
    stop: AtomicBool,
}

impl std::fmt::Debug for NodeFastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeFastPath").finish_non_exhaustive()
    }
}

/// What the kernel shows: uplinks (name, index) and pods (address → (host veth, index)).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub uplinks: BTreeMap<String, u32>,
    pub pods: BTreeMap<Ipv4Addr, (String, u32)>,
}

impl NodeFastPath {
    /// Loads the programs (the kernel probe) and prepares the maps; `None`, with the reason logged, when the
    /// kernel cannot run them: the node then uses the kernel path only. `vpc` are the VPC's CIDRs, `inside`
    /// every prefix the fast path may serve (the VPC's and, in routed mode, the pod CIDR); `policy` says
    /// whether NetworkPolicy is enforced (then no pod is fast until the engine has reported its selection).
    pub fn start(
        netns_path: &Path,
        vpc: Vec<Ipv4Net>,
        inside: &[Ipv4Net],
        policy: bool,
    ) -> Option<Arc<NodeFastPath>> {
        let setup = || -> Result<NodeFastPath, FastPathError> {
            let netns = Netns::open(netns_path)?;
            let mut fp = FastPath::load()?;
            fp.set_inside(inside)?;
            Ok(NodeFastPath {
                netns,
                inner: Mutex::new(Inner {
                    fp,
                    selected: if policy { None } else { Some(BTreeSet::new()) },
                    attached: BTreeMap::new(),
                    pods: BTreeMap::new(),
                }),
                vpc,
                stop: AtomicBool::new(false),
            })
        };
        match setup() {
            Ok(n) => {
                tracing::info!("tc-BPF fast path loaded");
                Some(Arc::new(n))
            }
            Err(e) => {
                tracing::warn!(error = %e, "tc-BPF fast path not available on this kernel; using the kernel path");
                None
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads uplinks and pods from the node's namespace.
    pub fn observe(&self) -> Result<Observed, FastPathError> {
        let vpc = self.vpc.clone();
        Ok(self.netns.run(move || {
            let mut nl = underlay_dataplane::Netlink::open_here()?;
            let links = nl.links()?;
            let addrs = nl.addrs_all()?;
            let routes = nl.routes(underlay_dataplane::Route::MAIN)?;
            let mut o = Observed::default();
            for l in &links {
                let in_vpc = addrs.iter().any(|(i, a)| {
                    *i == l.index
                        && matches!(a, IpNet::V4(n) if vpc.iter().any(|c| c.contains(&n.addr())))
                });
                if in_vpc && !is_host_veth_name(&l.name) {
                    o.uplinks.insert(l.name.clone(), l.index);
                }
            }
            for r in routes {
                let (IpNet::V4(dst), Some(oif)) = (r.dst, r.oif) else {
                    continue;
                };
                if dst.prefix_len() != 32 {
                    continue;
                }
                if let Some(l) = links
                    .iter()
                    .find(|l| l.index == oif && is_host_veth_name(&l.name))
                {
                    o.pods.insert(dst.addr(), (l.name.clone(), l.index));
                }
            }
            Ok(o)
        })?)
    }

    /// One pass: attach to new devices, fill the uplink and pod maps. Errors on one device do not stop the
    /// others; the first is returned.
    pub fn reconcile(&self) -> Result<(), FastPathError> {
        let observed = self.observe()?;
        let mut g = self.lock();
        let mut first_err = None;
        let g = &mut *g;
        g.attached.retain(|dev, role| match role {
            Role::Uplink => observed.uplinks.contains_key(dev),
            Role::Pod => observed.pods.values().any(|(v, _)| v == dev),
        });
        let wanted = observed
            .uplinks
            .keys()
            .map(|d| (d.clone(), Role::Uplink))
            .chain(observed.pods.values().map(|(v, _)| (v.clone(), Role::Pod)));
        for (dev, role) in wanted {
            if g.attached.get(&dev) == Some(&role) {
                continue;
            }
            match g.fp.attach(&self.netns, &dev, role) {
                Ok(()) => {
                    g.attached.insert(dev, role);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let idx: Vec<u32> = observed.uplinks.values().copied().collect();
        g.fp.set_uplinks(&idx)?;
        // A pod is fast only once its own program is attached (so its replies can take the fast path too)
        // and no policy selects it.
        let fast: BTreeMap<Ipv4Addr, (String, u32)> = match &g.selected {
            None => BTreeMap::new(),
            Some(sel) => observed
                .pods
                .into_iter()
                .filter(|(_, (v, _))| !sel.contains(v) && g.attached.contains_key(v))
                .collect(),
        };
        let stale: Vec<Ipv4Addr> = g
            .pods
            .keys()
            .filter(|a| !fast.contains_key(a))
            .copied()
            .collect();
        for a in stale {
            g.fp.remove_pod(a)?;
            g.pods.remove(&a);
        }
        for (a, (veth, index)) in fast {
            if g.pods.get(&a) != Some(&veth) {
                g.fp.insert_pod(a, index)?;
                g.pods.insert(a, veth);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The pods in the map now.
    pub fn fast_pods(&self) -> BTreeSet<Ipv4Addr> {
        self.lock().pods.keys().copied().collect()
    }

    /// Runs [`NodeFastPath::reconcile`] every [`RECONCILE_INTERVAL`] on a thread of its own until
    /// [`NodeFastPath::shutdown`].
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("fastpath".into())
            .spawn(move || {
                let mut last_err = String::new();
                while !me.stop.load(Ordering::Relaxed) {
                    match me.reconcile() {
                        Ok(()) => last_err.clear(),
                        Err(e) => {
                            let msg = e.to_string();
                            if msg != last_err {
                                tracing::warn!(error = %msg, "fast path pass incomplete; retrying");
                                last_err = msg;
                            }
                        }
                    }
                    let mut slept = Duration::ZERO;
                    while slept < RECONCILE_INTERVAL && !me.stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                        slept += Duration::from_millis(50);
                    }
                }
            })
    }

    /// Stops the reconciler and removes every filter (and the clsact qdiscs left empty) from the devices it
    /// attached to; the maps go with the programs. The node is on the kernel path when this returns.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let mut g = self.lock();
        let pods: Vec<Ipv4Addr> = g.pods.keys().copied().collect();
        for a in pods {
            let _ = g.fp.remove_pod(a);
        }
        g.pods.clear();
        let devices: Vec<String> = g.attached.keys().cloned().collect();
        for dev in devices {
            if let Err(e) = FastPath::detach(&self.netns, &dev) {
                tracing::warn!(device = %dev, error = %e, "fast path filter not removed");
            }
        }
        g.attached.clear();
    }
}

impl SelectionObserver for NodeFastPath {
    fn selected(&self, veths: &BTreeSet<&str>) {
        let mut g = self.lock();
        let g = &mut *g;
        let drop: Vec<Ipv4Addr> = g
            .pods
            .iter()
            .filter(|(_, v)| veths.contains(v.as_str()))
            .map(|(a, _)| *a)
            .collect();
        for a in drop {
            // A failed delete would leave a selected pod on the fast path: never happens for a present key,
            // and the pod is then kept out of the map by `selected` on the next pass.
            if let Err(e) = g.fp.remove_pod(a) {
                tracing::error!(pod = %a, error = %e, "could not take a selected pod off the fast path");
            }
            g.pods.remove(&a);
        }
        g.selected = Some(veths.iter().map(|s| s.to_string()).collect());
    }
}

/// The fast path as the agent runs it: started with the agent, stopped (everything detached) with it.
#[derive(Debug)]
pub(crate) struct Running {
    node: Arc<NodeFastPath>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts the fast path when `on` and the kernel supports it (and tells the policy engine to report its
/// selection to it); when `off`, removes whatever a previous agent left attached, so "forced off" is clean.
pub(crate) fn start_for_agent(
    on: bool,
    netns_path: &Path,
    vpc: &[Ipv4Net],
    inside: &[Ipv4Net],
    policy: Option<&Arc<crate::policy::PolicyEngine>>,
) -> Option<Running> {
    if !on {
        if let Err(e) = remove_all(netns_path) {
            tracing::warn!(error = %e, "could not remove a previous fast path");
        }
        tracing::info!("tc-BPF fast path off (--no-fast-path)");
        return None;
    }
    let node = NodeFastPath::start(netns_path, vpc.to_vec(), inside, policy.is_some())?;
    if let Some(engine) = policy {
        engine.set_observer(node.clone());
    }
    let thread = match node.spawn() {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "fast path reconciler not started; using the kernel path");
            return None;
        }
    };
    Some(Running { node, thread })
}

impl Running {
    pub(crate) fn stop(mut self) {
        self.node.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The reconciler may have attached once more between the flag and its exit.
        self.node.shutdown();
    }
}

/// Removes the fast path's filters from every device of the namespace (uplinks and pod veths), whoever
/// attached them.
pub fn remove_all(netns_path: &Path) -> Result<(), FastPathError> {
    let netns = Netns::open(netns_path)?;
    let links = netns.run(|| underlay_dataplane::Netlink::open_here()?.links())?;
    for l in links.iter().filter(|l| l.name != "lo") {
        FastPath::detach(&netns, &l.name)?;
    }
    Ok(())
}
