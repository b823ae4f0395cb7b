//! Rebuilding the IPAM state from the kernel when the checkpoint is corrupt, instead of refusing to start.
//!
//! ```text
//!   corrupt checkpoint ──► moved aside (<file>.corrupt) ──► from_kernel(pool): host veths (ul…) + their /32 routes
//!        ──► plan_rebuild (pure) ──► one allocation per live pod, key "rebuilt-<veth>/eth0" ──► checkpoint saved
//! ```
//!
//! Every pod underlay-cni wired has a host veth named `ul…` in the node's namespace and a main-table route to its
//! address through it (both modes). Those are what survives a lost checkpoint, so the rebuilt state holds
//! exactly the addresses live pods use: no live pod's address is handed out again. The container ids are lost
//! (a veth name is a digest of them), so a rebuilt allocation is keyed by its veth: DEL finds it by the host veth
//! it names ([`rebuilt_key`]), GC keeps it (its key is never in a runtime's list), and the link sweep keeps its
//! veth. Only addresses inside the pool served are taken; anything else on the node is not underlay's.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::IpNet;
use underlay_core::ipam::{Allocation, AttachmentKey, Egress, IpamState, PodInfo, PoolSpec};
use underlay_core::veth_names;
use underlay_dataplane::Netlink;

/// Container-id prefix of an allocation rebuilt from the kernel.
pub const REBUILT_PREFIX: &str = "rebuilt-";
/// Interface name of a rebuilt allocation's key (underlay-cni's attachments are the pod's `eth0`).
pub const REBUILT_IFNAME: &str = "eth0";

/// The key a rebuilt allocation of the pod behind host veth `veth` carries.
pub fn rebuilt_key(veth: &str) -> AttachmentKey {
    AttachmentKey::new(format!("{REBUILT_PREFIX}{veth}"), REBUILT_IFNAME)
}

/// The host veth of a rebuilt allocation's key; `None` for a runtime's key.
pub fn rebuilt_veth(key: &AttachmentKey) -> Option<&str> {
    key.container_id.strip_prefix(REBUILT_PREFIX)
}

/// Pure: the state that gives every pod address routed through an underlay host veth back to that pod.
/// `veths` are host veth names by ifindex; `routes` are (destination /32, outgoing ifindex) of the main table.
pub fn plan_rebuild(
    pool: &PoolSpec,
    veths: &BTreeMap<u32, String>,
    routes: &[(Ipv4Addr, u32)],
) -> IpamState {
    let egress: BTreeMap<Ipv4Addr, Egress> = match pool {
        PoolSpec::Block(_) => BTreeMap::new(),
        PoolSpec::Addresses(a) => a
            .iter()
            .map(|p| {
                (
                    p.address,
                    Egress {
                        interface: p.egress_interface.clone(),
                        route_table: p.route_table,
                    },
                )
            })
            .collect(),
    };
    let in_pool = |a: &Ipv4Addr| match pool {
        PoolSpec::Block(net) => net.contains(a),
        PoolSpec::Addresses(_) => egress.contains_key(a),
    };
    let mut by_address: BTreeMap<Ipv4Addr, Allocation> = BTreeMap::new();
    let mut seen_veth = std::collections::BTreeSet::new();
    for (address, oif) in routes {
        let Some(veth) = veths.get(oif) else { continue };
        if !in_pool(address) || by_address.contains_key(address) || !seen_veth.insert(veth) {
            continue;
        }
        by_address.insert(
            *address,
            Allocation {
                key: rebuilt_key(veth),
                address: *address,
                pod: PodInfo::default(),
                egress: egress.get(address).cloned(),
            },
        );
    }
    IpamState {
        allocations: by_address.into_values().collect(),
        cooling: vec![],
        cursor: 0,
    }
}

/// Reads the calling thread's namespace (the node's) and plans the state from it.
pub fn from_kernel(pool: &PoolSpec) -> Result<IpamState, underlay_dataplane::Error> {
    let mut nl = Netlink::open_here()?;
    let veths: BTreeMap<u32, String> = nl
        .links()?
        .into_iter()
        .filter(|l| l.kind.as_deref() == Some("veth") && veth_names::is_host_veth_name(&l.name))
        .map(|l| (l.index, l.name))
        .collect();
    let routes: Vec<(Ipv4Addr, u32)> = nl
        .routes(254)?
        .into_iter()
        .filter_map(|r| match (r.dst, r.oif) {
            (IpNet::V4(d), Some(oif)) if d.prefix_len() == 32 => Some((d.addr(), oif)),
            _ => None,
        })
        .collect();
    Ok(plan_rebuild(pool, &veths, &routes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use underlay_core::ipam::PoolAddress;

    #[test]
    fn only_pool_addresses_routed_through_host_veths_come_back() {
        let veths: BTreeMap<u32, String> = [
            (7, "ul0123456789a".to_string()),
            (8, "ul0123456789b".to_string()),
        ]
        .into();
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let routes = [
            (a("100.64.0.2"), 7),
            (a("100.64.0.3"), 8),
            (a("100.64.0.4"), 3),  // not a host veth
            (a("10.0.0.9"), 8),    // outside the pool (and a second route of veth 8)
            (a("100.64.0.5"), 99), // no such veth
        ];
        let st = plan_rebuild(
            &PoolSpec::Block("100.64.0.0/26".parse().unwrap()),
            &veths,
            &routes,
        );
        let got: Vec<(Ipv4Addr, &str)> = st
            .allocations
            .iter()
            .map(|x| (x.address, rebuilt_veth(&x.key).unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                (a("100.64.0.2"), "ul0123456789a"),
                (a("100.64.0.3"), "ul0123456789b")
            ]
        );
        assert_eq!(rebuilt_veth(&AttachmentKey::new("abc", "eth0")), None);

        let pool = PoolSpec::Addresses(vec![PoolAddress {
            address: a("198.18.0.20"),
            egress_interface: "eth1".into(),
            route_table: 30209,
        }]);
        let st = plan_rebuild(
            &pool,
            &veths,
            &[(a("198.18.0.20"), 7), (a("198.18.0.21"), 8)],
        );
        assert_eq!(st.allocations.len(), 1);
        assert_eq!(st.allocations[0].egress.as_ref().unwrap().interface, "eth1");
    }
}
