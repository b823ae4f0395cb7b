//! What underlay owns in a VPC, as pure rules shared by the controller and `underlay inspect`.
//!
//! underlay manages only routes whose destination lies inside the cluster's pod CIDR (in the route tables it was
//! told to manage); every other route (the VPC's `local` route, internet and NAT gateways, peering, other tools'
//! routes) is foreign and never touched.

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

/// A route is underlay's when its destination lies wholly inside the cluster pod CIDR.
pub fn is_owned_route(destination: Ipv4Net, pod_cidr: Ipv4Net) -> bool {
    pod_cidr.contains(&destination)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn owned_routes_are_those_inside_the_pod_cidr() {
        let pods = DEFAULT_POD_CIDR;
        assert_eq!(pods, net("100.64.0.0/10"));
        assert!(is_owned_route(net("100.64.0.0/24"), pods));
        assert!(is_owned_route(net("100.127.255.0/24"), pods));
        assert!(is_owned_route(net("100.64.0.0/10"), pods));
        // Foreign: the VPC, the default route, a wider block that covers the pod CIDR, a neighbour block.
        assert!(!is_owned_route(net("198.18.0.0/16"), pods));
        assert!(!is_owned_route(net("0.0.0.0/0"), pods));
        assert!(!is_owned_route(net("100.0.0.0/8"), pods));
        assert!(!is_owned_route(net("100.128.0.0/24"), pods));
    }
}
