//! The link reaper: deletes pod veths off the CNI hot path, on one OS thread of the agent.
//!
//! Deleting a veth costs the kernel an RCU grace period inside the netlink call (16–24 ms measured on the lab
//! machine), most of what a DEL would otherwise take. So `underlay-cni` DEL names the attachment's host veth
//! (ifindex + name) in its Release request; the agent checkpoints the release, deletes the host route to the
//! released address through that link (fast: no grace period, so nothing routes to the pod once DEL returns),
//! replies, and this thread then deletes the link — only if the link with that index still has that name, so
//! a retried ADD's new veth (a new index) is never touched.
//!
//! It also sweeps: every veth named like underlay-cni's host veths (`ul` + 11 hex digits) that no live
//! allocation owns is deleted — at agent start (a crash between veth creation and rollback, or links whose
//! reaping a restart interrupted) and after each GC. The owned set is read *after* the link dump: ADD takes
//! its allocation before it creates its veth, so a veth in the dump whose allocation is live is always kept.
//!
//! [`WORKERS`] threads share the queue, each with a NETLINK_ROUTE socket opened in the agent's namespace (the
//! node's): the grace period is waited out after the kernel's RTNL lock is dropped, so parallel deletions
//! overlap their waits (one thread alone reaps ~50 veths/s). The handle keeps one more socket for the
//! synchronous route deletion. The threads end when the [`LinkReaper`] is dropped.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, mpsc};

use ipnet::{IpNet, Ipv4Net};
use underlay_core::veth_names;
use underlay_dataplane::{Netlink, ResultExt, Route};

/// The host veth names the live allocations own; `None` when the owner is gone (nothing is swept then).
pub type OwnedNames = Box<dyn Fn() -> Option<HashSet<String>> + Send + Sync>;

/// Reaper threads: veth deletions in flight at once.
pub const WORKERS: usize = 8;

#[derive(Debug)]
enum Job {
    Reap { index: u32, name: String },
    Sweep,
}

/// Handle to the reaper thread. Submitting never blocks.
#[derive(Debug)]
pub struct LinkReaper {
    tx: mpsc::Sender<Job>,
    routes: Mutex<Netlink>,
}

impl LinkReaper {
    /// Opens a netlink socket in the calling thread's namespace and starts the thread. `owned` tells a sweep
    /// which veths are still in use.
    pub fn spawn(owned: OwnedNames) -> std::io::Result<LinkReaper> {
        let routes = Mutex::new(Netlink::open_here().map_err(std::io::Error::other)?);
        let (tx, rx) = mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        let owned = Arc::new(owned);
        for i in 0..WORKERS {
            let nl = Netlink::open_here().map_err(std::io::Error::other)?;
            let (rx, owned) = (rx.clone(), owned.clone());
            std::thread::Builder::new()
                .name(format!("link-reaper-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || run(nl, &rx, &owned))?;
        }
        Ok(LinkReaper { tx, routes })
    }

    /// Deletes the host route `route` through link `index` now (the exact route: a retried ADD's route
    /// through its new veth does not match), then queues the deletion of link `index` if it is still called
    /// `name`. Refuses (false, nothing done) a name that is not an underlay-cni host veth's.
    pub fn reap(&self, index: u32, name: &str, route: Option<Ipv4Net>) -> bool {
        if index == 0 || !veth_names::is_host_veth_name(name) {
            return false;
        }
        if let Some(dst) = route {
            let mut nl = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = nl
                .route_del(&Route::link(IpNet::V4(dst), index))
                .ignore_missing()
            {
                tracing::warn!(veth = %name, route = %dst, error = %e, "deleting the host route failed");
            }
        }
        self.tx
            .send(Job::Reap {
                index,
                name: name.to_string(),
            })
            .is_ok()
    }

    /// Queues a sweep of orphaned host veths.
    pub fn sweep(&self) {
        let _ = self.tx.send(Job::Sweep);
    }
}

fn run(mut nl: Netlink, rx: &Mutex<mpsc::Receiver<Job>>, owned: &OwnedNames) {
    loop {
        // The lock is held only while waiting for the next job.
        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(job) = next else { return };
        match job {
            Job::Reap { index, name } => {
                if let Err(e) = reap(&mut nl, index, &name) {
                    tracing::warn!(veth = %name, ifindex = index, error = %e, "reaping a pod veth failed");
                }
            }
            Job::Sweep => match sweep(&mut nl, owned) {
                Ok(0) => tracing::debug!("sweep: no orphaned pod veth"),
                Ok(n) => tracing::info!(deleted = n, "sweep: orphaned pod veths deleted"),
                Err(e) => tracing::warn!(error = %e, "sweeping orphaned pod veths failed"),
            },
        }
    }
}

fn reap(nl: &mut Netlink, index: u32, name: &str) -> Result<(), underlay_dataplane::Error> {
    match nl.link_by_name(name)? {
        Some(l) if l.index == index => {
            nl.link_del(index).ignore_missing()?;
            tracing::debug!(veth = %name, ifindex = index, "pod veth deleted");
        }
        _ => tracing::debug!(veth = %name, ifindex = index, "pod veth already gone or replaced"),
    }
    Ok(())
}

/// Deletes every underlay-cni host veth no live allocation owns; returns how many.
fn sweep(nl: &mut Netlink, owned: &OwnedNames) -> Result<usize, underlay_dataplane::Error> {
    let candidates: Vec<_> = nl
        .links()?
        .into_iter()
        .filter(|l| l.kind.as_deref() == Some("veth") && veth_names::is_host_veth_name(&l.name))
        .collect();
    if candidates.is_empty() {
        return Ok(0);
    }
    // Read after the dump (see the module docs).
    let Some(keep) = owned() else {
        return Ok(0);
    };
    let mut deleted = 0;
    for l in candidates.iter().filter(|l| !keep.contains(&l.name)) {
        // By index, and only if the index still carries the name (it may have been replaced meanwhile).
        if matches!(nl.link_by_name(&l.name)?, Some(now) if now.index == l.index) {
            tracing::info!(veth = %l.name, "sweep: deleting a pod veth no allocation owns");
            nl.link_del(l.index).ignore_missing()?;
            deleted += 1;
        }
    }
    Ok(deleted)
}
