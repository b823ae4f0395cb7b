//! Which pods of this node may reach the instance metadata service (IMDS).
//!
//! ```text
//!   pods opted in (label underlay.dev/imds-access=allow) ─┐
//!   IPAM allocations (namespace, name → address) ─────────┴─► allowed_addresses ─► ImdsAllowed
//!   ImdsAllowed ──► set `imds_allowed` of `inet underlay` (RoutedAgent / EniAgent: re-added with every table
//!                   replace, diffed by core::nft::plan_set_elements otherwise)
//! ```
//!
//! The guard itself (a chain dropping forwarded packets to 169.254.169.254 from any source outside the set, and
//! every forwarded packet to fd00:ec2::254) is part of the table model, `core::nft::Ruleset::with_imds_guard`. An
//! empty set is the default: no pod reaches IMDS until something fills the set, so a pod that opted in may see
//! its first requests dropped until the agent has learned its label (fail closed, never open).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, RwLock};

use underlay_core::names;
use underlay_core::nft::{ObservedNft, Ruleset, SetElements, plan_set_elements};

use crate::routed::{RoutedError, nft};

/// The addresses let through to IMDS, shared between whoever learns the opt-ins and the node's converge loop.
#[derive(Debug, Clone, Default)]
pub struct ImdsAllowed(Arc<RwLock<BTreeSet<Ipv4Addr>>>);

impl ImdsAllowed {
    /// Replaces the allowed addresses; true when they changed.
    pub fn set(&self, addrs: BTreeSet<Ipv4Addr>) -> bool {
        let mut g = self.0.write().unwrap_or_else(|p| p.into_inner());
        let changed = *g != addrs;
        *g = addrs;
        changed
    }

    pub fn get(&self) -> BTreeSet<Ipv4Addr> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The wanted elements of the table's sets.
    pub fn elements(&self) -> SetElements {
        [(names::NFT_SET_IMDS_ALLOWED.to_string(), self.get())].into()
    }
}

/// True when a pod's labels opt it in (`underlay.dev/imds-access: allow`).
pub fn opts_in(labels: &BTreeMap<String, String>) -> bool {
    labels.get(names::LABEL_IMDS_ACCESS).map(String::as_str) == Some(names::IMDS_ACCESS_ALLOW)
}

/// The addresses of the allocations whose pod (namespace, name) opted in.
pub fn allowed_addresses<'a>(
    allocations: impl IntoIterator<Item = (&'a str, &'a str, Ipv4Addr)>,
    opted_in: &BTreeSet<(String, String)>,
) -> BTreeSet<Ipv4Addr> {
    allocations
        .into_iter()
        .filter(|(ns, name, _)| opted_in.contains(&(ns.to_string(), name.to_string())))
        .map(|(_, _, a)| a)
        .collect()
}

/// Brings the set's elements in the table of `netns` to `allowed`, given what `observed` read. Does nothing when
/// the table is absent (the next replace writes the elements with it). Returns true when it wrote.
pub fn sync_elements(
    netns: &Path,
    want: &Ruleset,
    observed: Option<&ObservedNft>,
    allowed: &ImdsAllowed,
) -> Result<bool, RoutedError> {
    let Some(observed) = observed else {
        return Ok(false);
    };
    match plan_set_elements(want, &observed.elements, &allowed.elements()) {
        Some(batch) => {
            tracing::info!(allowed = ?allowed.get(), "IMDS access: updating the allowed pod addresses");
            nft::apply_batch(netns, &batch)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Reads the table of `netns` and brings the set to `allowed` (for a caller that learned a change between
/// converges). A table without the set is left to the next converge.
pub fn sync_now(netns: &Path, allowed: &ImdsAllowed) -> Result<bool, RoutedError> {
    let guard_only = Ruleset {
        sets: vec![],
        chains: vec![],
    }
    .with_imds_guard();
    let observed = nft::observe(netns)?;
    let declared = observed
        .as_ref()
        .filter(|o| o.elements.contains_key(names::NFT_SET_IMDS_ALLOWED));
    sync_elements(netns, &guard_only, declared, allowed)
}

/// Both modes' start-up of [`follow_opt_ins`]: a task that follows the opt-ins once a second when `on`, and ends
/// at once otherwise (the table then keeps every pod away from IMDS).
pub(crate) fn spawn_opt_ins(
    on: bool,
    client: kube::Client,
    node: String,
    service: impl Fn() -> Option<Arc<crate::IpamService>> + Send + 'static,
    allowed: ImdsAllowed,
    netns: std::path::PathBuf,
) -> tokio::task::JoinHandle<()> {
    let follow = follow_opt_ins(
        client,
        node,
        service,
        allowed,
        netns,
        std::time::Duration::from_secs(1),
    );
    tokio::spawn(async move {
        if on {
            follow.await;
        }
    })
}

/// On Kubernetes: follows the pods of `node` that carry the opt-in label (one watch, field selector
/// `spec.nodeName`, label selector `underlay.dev/imds-access=allow`: the API server sends nothing about other
/// pods), and every `every` brings `allowed` to the addresses the IPAM service allocated to them, writing a change
/// into the table of `netns` at once. API errors are retried with backoff; meanwhile the last known opt-ins hold.
pub(crate) async fn follow_opt_ins(
    client: kube::Client,
    node: String,
    service: impl Fn() -> Option<Arc<crate::IpamService>> + Send + 'static,
    allowed: ImdsAllowed,
    netns: std::path::PathBuf,
    every: std::time::Duration,
) {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::WatchStreamExt;
    use kube::runtime::watcher::{self, Event};

    let api: kube::Api<Pod> = kube::Api::all(client);
    let config = watcher::Config::default()
        .fields(&format!("spec.nodeName={node}"))
        .labels(&format!(
            "{}={}",
            names::LABEL_IMDS_ACCESS,
            names::IMDS_ACCESS_ALLOW
        ));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut opted: BTreeSet<(String, String)> = BTreeSet::new();
    let mut relisting: Option<BTreeSet<(String, String)>> = None;
    let mut tick = tokio::time::interval(every);
    let id = |p: &Pod| {
        (
            p.metadata.namespace.clone().unwrap_or_default(),
            p.metadata.name.clone().unwrap_or_default(),
        )
    };
    let labels = |p: &Pod| p.metadata.labels.clone().unwrap_or_default();
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                None => return,
                Some(Ok(Event::Init)) => relisting = Some(BTreeSet::new()),
                Some(Ok(Event::InitApply(p))) => {
                    if opts_in(&labels(&p)) {
                        relisting.get_or_insert_with(BTreeSet::new).insert(id(&p));
                    }
                }
                Some(Ok(Event::InitDone)) => opted = relisting.take().unwrap_or_default(),
                Some(Ok(Event::Apply(p))) => {
                    if opts_in(&labels(&p)) {
                        opted.insert(id(&p));
                    } else {
                        opted.remove(&id(&p));
                    }
                }
                Some(Ok(Event::Delete(p))) => {
                    opted.remove(&id(&p));
                }
                Some(Err(e)) => tracing::debug!(error = %e, "IMDS opt-in watch failed; retrying with backoff"),
            },
            _ = tick.tick() => {
                let Some(svc) = service() else { continue };
                let list = svc.list();
                let addrs = allowed_addresses(
                    list.allocations.iter().filter_map(|a| {
                        let addr = a.address.split('/').next()?.parse().ok()?;
                        Some((a.pod_namespace.as_str(), a.pod_name.as_str(), addr))
                    }),
                    &opted,
                );
                if allowed.set(addrs) {
                    let (netns, allowed) = (netns.clone(), allowed.clone());
                    match tokio::task::spawn_blocking(move || sync_now(&netns, &allowed)).await {
                        Ok(Err(e)) => tracing::warn!(error = %e, "IMDS access: writing the allowed set failed; the converge retries"),
                        Err(e) => tracing::warn!(error = %e, "IMDS access: sync task failed"),
                        Ok(Ok(_)) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_allow_label_opts_in() {
        let l = |v: &str| BTreeMap::from([(names::LABEL_IMDS_ACCESS.to_string(), v.to_string())]);
        assert!(opts_in(&l("allow")));
        assert!(!opts_in(&l("true")));
        assert!(!opts_in(&l("")));
        assert!(!opts_in(&BTreeMap::new()));
    }

    #[test]
    fn allowed_addresses_are_the_opted_in_pods_only() {
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let allocs = [
            ("default", "web", a("100.64.0.2")),
            ("default", "meta", a("100.64.0.3")),
            ("other", "web", a("100.64.0.4")),
        ];
        let opted: BTreeSet<(String, String)> = [("default".into(), "meta".into())].into();
        assert_eq!(allowed_addresses(allocs, &opted), [a("100.64.0.3")].into());
        let allowed = ImdsAllowed::default();
        assert!(allowed.set([a("100.64.0.3")].into()));
        assert!(!allowed.set([a("100.64.0.3")].into()));
        assert_eq!(
            allowed.elements()[names::NFT_SET_IMDS_ALLOWED],
            [a("100.64.0.3")].into()
        );
    }
}
