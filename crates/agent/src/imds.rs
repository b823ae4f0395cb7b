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
