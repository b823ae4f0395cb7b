//! What underlay owns in a VPC, as pure rules shared by the controller, the planner and `underlay inspect`.
//!
//! A route is underlay's only by proof: its destination lies inside the cluster's pod CIDR **and** its target is
//! an ENI of this cluster (an ENI of a node it manages, one it routed to before, or one tagged with its cluster).
//! Every other route is foreign and never touched: outside the pod CIDR (the VPC's `local` route, gateways,
//! peering), and — the case that matters — inside it: another cluster's route, a transit gateway's or peering
//! route, the `local` route of a VPC secondary CIDR. A foreign route inside the pod CIDR is reported and its
//! destination is taken: no block overlapping it is handed out.
//!
//! ```text
//!   destination ∉ pod CIDR ─────────────────────────────► Outside   (foreign, counts against the limit)
//!   destination ∈ pod CIDR, target ∈ cluster ENIs ──────► Ours      (planned, diffed, changed)
//!   destination ∈ pod CIDR, any other target ───────────► Foreign   (untouched, reported, planned around)
//! ```

use std::collections::BTreeSet;

use ipnet::Ipv4Net;

/// Default cluster pod CIDR (RFC 6598 shared address space), outside any VPC subnet.
pub const DEFAULT_POD_CIDR: Ipv4Net = match Ipv4Net::new(std::net::Ipv4Addr::new(100, 64, 0, 0), 10)
{
    Ok(net) => net,
    Err(_) => panic!("valid prefix length"),
};

/// AWS's default number of non-propagated routes per route table: 500 since mid-2025 (50 before), counted
/// separately for IPv4 and IPv6, adjustable per account up to [`MAX_ROUTE_LIMIT`]. EC2 does not report it.
pub const DEFAULT_ROUTE_LIMIT: usize = 500;

/// The most a route table's quota can be raised to; AWS warns that network performance might be impacted.
pub const MAX_ROUTE_LIMIT: usize = 1_000;

/// The destination lies wholly inside the cluster pod CIDR (where underlay's routes live; not proof of ownership).
pub fn in_pod_cidr(destination: Ipv4Net, pod_cidr: Ipv4Net) -> bool {
    pod_cidr.contains(&destination)
}

/// Whose a route is (see the module doc).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum RouteOwner {
    /// Outside the pod CIDR: not underlay's business (it only counts against the table's limit).
    Outside,
    /// Inside the pod CIDR, targeting an ENI of this cluster: underlay's.
    Ours,
    /// Inside the pod CIDR, targeting anything else: never changed; its destination is taken.
    Foreign,
}

/// What proves a route underlay's: the pod CIDR and the ENIs of this cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ownership {
    pub pod_cidr: Ipv4Net,
    /// ENI ids (`eni-…`) of this cluster.
    pub cluster_enis: BTreeSet<String>,
}

impl Ownership {
    pub fn new(pod_cidr: Ipv4Net, cluster_enis: impl IntoIterator<Item = String>) -> Self {
        Self {
            pod_cidr,
            cluster_enis: cluster_enis.into_iter().collect(),
        }
    }

    /// Whose the route `destination → target` is; `target` as the cloud reports it (`eni-…`, `tgw-…`, `local`, …).
    pub fn classify(&self, destination: Ipv4Net, target: &str) -> RouteOwner {
        if !in_pod_cidr(destination, self.pod_cidr) {
            RouteOwner::Outside
        } else if self.cluster_enis.contains(target) {
            RouteOwner::Ours
        } else {
            RouteOwner::Foreign
        }
    }

    /// The route is underlay's.
    pub fn owns(&self, destination: Ipv4Net, target: &str) -> bool {
        self.classify(destination, target) == RouteOwner::Ours
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn outside_the_pod_cidr_is_never_ours() {
        let o = Ownership::new(DEFAULT_POD_CIDR, ["eni-1".to_string()]);
        assert_eq!(DEFAULT_POD_CIDR, net("100.64.0.0/10"));
        // The VPC, the default route, a wider block that covers the pod CIDR, a neighbour block: even to our ENI.
        for d in [
            "198.18.0.0/16",
            "0.0.0.0/0",
            "100.0.0.0/8",
            "100.128.0.0/24",
        ] {
            assert_eq!(o.classify(net(d), "eni-1"), RouteOwner::Outside, "{d}");
        }
    }

    #[test]
    fn inside_the_pod_cidr_ours_only_by_target() {
        let o = Ownership::new(DEFAULT_POD_CIDR, ["eni-1".to_string(), "eni-2".to_string()]);
        for d in ["100.64.0.0/24", "100.127.255.0/24", "100.64.0.0/10"] {
            assert!(o.owns(net(d), "eni-1"), "{d}");
            assert!(o.owns(net(d), "eni-2"), "{d}");
        }
        // Another cluster's ENI, a transit gateway, peering, a secondary CIDR's local route, an instance id.
        for t in ["eni-other", "tgw-0abc", "pcx-1", "local", "i-0123"] {
            assert_eq!(
                o.classify(net("100.64.0.0/16"), t),
                RouteOwner::Foreign,
                "{t}"
            );
            assert!(!o.owns(net("100.64.0.0/16"), t));
        }
        // No cluster ENI known: nothing is ours.
        let none = Ownership::new(DEFAULT_POD_CIDR, []);
        assert_eq!(
            none.classify(net("100.64.0.0/24"), "eni-1"),
            RouteOwner::Foreign
        );
    }
}
