//! Reclaiming addresses whose DEL never came: a pod's sandbox gone (its network namespace file and its host veth
//! both absent) for a grace period gives its address back.
//!
//! ```text
//!   every interval: allocations (key, netns path, host veth) ─┐
//!                   netns files present? host veths present? ─┴─► plan_reclaim (pure, remembers since when
//!                   each sandbox has looked gone) ──► keys gone ≥ grace ──► IpamService::reclaim (checkpointed,
//!                   counted as releases{reason="reclaim"}, logged per address)
//! ```
//!
//! Both must be absent: a pod being set up has its namespace before ADD (the runtime creates it first), and a pod
//! whose DEL is in progress still has one of them until the runtime finished. The grace period covers the short
//! window in which a runtime removes the namespace before it calls DEL. "Gone since" is kept in memory only: an
//! agent restart starts every grace period again (later reclaim, never earlier). A netns path the agent cannot see
//! (not under a mounted directory, e.g. `/proc/<pid>/ns/net` of another PID namespace) reads as absent, so for
//! such pods the host veth decides alone.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::Weak;
use std::time::{Duration, Instant};

use underlay_core::ipam::AttachmentKey;
use underlay_dataplane::Netlink;

use crate::service::IpamService;

/// One allocation as the reclaimer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    pub key: AttachmentKey,
    /// The netns path the runtime gave at ADD (may be empty).
    pub netns: String,
    /// The pod's host veth name.
    pub veth: String,
}

/// Since when each sandbox has looked gone.
#[derive(Debug, Default)]
pub struct GoneSince(BTreeMap<AttachmentKey, Instant>);

/// Pure: the keys whose sandbox has been gone for at least `grace` at `now`. Updates `since` (a sandbox seen again
/// is forgotten, as are keys no longer allocated).
pub fn plan_reclaim(
    sandboxes: &[Sandbox],
    netns_present: impl Fn(&str) -> bool,
    veths_present: &HashSet<String>,
    since: &mut GoneSince,
    now: Instant,
    grace: Duration,
) -> Vec<AttachmentKey> {
    let keys: BTreeSet<&AttachmentKey> = sandboxes.iter().map(|s| &s.key).collect();
    since.0.retain(|k, _| keys.contains(k));
    let mut due = vec![];
    for s in sandboxes {
        let gone =
            !veths_present.contains(&s.veth) && (s.netns.is_empty() || !netns_present(&s.netns));
        if !gone {
            since.0.remove(&s.key);
            continue;
        }
        let first = *since.0.entry(s.key.clone()).or_insert(now);
        if now.duration_since(first) >= grace {
            due.push(s.key.clone());
        }
    }
    due
}

/// Starts the reclaim thread over `service` in the calling thread's network namespace (the node's): every
/// `interval`, addresses whose sandbox has been gone for `grace` are released. Ends when the service is dropped.
pub fn spawn(
    service: Weak<IpamService>,
    interval: Duration,
    grace: Duration,
) -> std::io::Result<()> {
    let mut nl = Netlink::open_here().map_err(std::io::Error::other)?;
    std::thread::Builder::new()
        .name("reclaim".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let mut since = GoneSince::default();
            loop {
                std::thread::sleep(interval);
                let Some(svc) = service.upgrade() else { return };
                let sandboxes = svc.sandboxes();
                // Links are read after the allocations: a veth created since is seen, never missed.
                let veths = match nl.links() {
                    Ok(l) => l.into_iter().map(|l| l.name).collect::<HashSet<_>>(),
                    Err(e) => {
                        tracing::warn!(error = %e, "reclaim: listing links failed; skipping this pass");
                        continue;
                    }
                };
                let due = plan_reclaim(
                    &sandboxes,
                    |p| Path::new(p).exists(),
                    &veths,
                    &mut since,
                    Instant::now(),
                    grace,
                );
                if !due.is_empty() {
                    svc.reclaim(&due);
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(id: &str, netns: &str) -> Sandbox {
        Sandbox {
            key: AttachmentKey::new(id, "eth0"),
            netns: netns.into(),
            veth: format!("v-{id}"),
        }
    }

    #[test]
    fn only_sandboxes_gone_for_the_whole_grace_are_due() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let all = [
            sb("live", "/n/live"),
            sb("veth-only", "/n/gone"),
            sb("ns-only", "/n/ns"),
            sb("gone", "/n/gone2"),
        ];
        let ns = |p: &str| p == "/n/live" || p == "/n/ns";
        let veths: HashSet<String> = ["v-live".to_string(), "v-veth-only".to_string()].into();
        let mut since = GoneSince::default();
        assert!(plan_reclaim(&all, ns, &veths, &mut since, t0, grace).is_empty());
        let t9 = t0 + Duration::from_secs(9);
        assert!(plan_reclaim(&all, ns, &veths, &mut since, t9, grace).is_empty());
        let t10 = t0 + grace;
        assert_eq!(
            plan_reclaim(&all, ns, &veths, &mut since, t10, grace),
            [AttachmentKey::new("gone", "eth0")]
        );
        // A sandbox that comes back restarts its clock.
        let mut since = GoneSince::default();
        let only = [sb("flap", "/n/flap")];
        let none = HashSet::new();
        plan_reclaim(&only, |_| false, &none, &mut since, t0, grace);
        plan_reclaim(&only, |_| true, &none, &mut since, t9, grace);
        assert!(plan_reclaim(&only, |_| false, &none, &mut since, t10, grace).is_empty());
        assert_eq!(
            plan_reclaim(&only, |_| false, &none, &mut since, t10 + grace, grace).len(),
            1
        );
    }
}
