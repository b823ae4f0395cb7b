//! Root tests: every typed operation against real namespaces this test creates and deletes.
#![cfg(feature = "root-tests")]

use std::net::IpAddr;

use underlay_dataplane::testns::TestNs;
use underlay_dataplane::{Netns, ResultExt, Route, RouteScope, Rule, VethSpec};

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa1];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb1];

#[test]
fn veth_peer_is_created_directly_in_the_target_namespace() {
    let host = TestNs::new("uldp-veth-h").unwrap();
    let pod = TestNs::new("uldp-veth-p").unwrap();
    let mut h = host.netns().netlink().unwrap();
    let spec = VethSpec {
        name: "uldpv0",
        peer_name: "eth0",
        peer_netns: Some(pod.netns()),
        mtu: Some(1400),
        mac: Some(MAC_A),
        peer_mac: Some(MAC_B),
        up: true,
    };
    h.veth_add(&spec).unwrap();
    // A second add is EEXIST, which the one idempotency helper turns into "already there".
    assert!(!h.veth_add(&spec).ignore_exists().unwrap());

    let hv = h.link_by_name("uldpv0").unwrap().unwrap();
    assert_eq!(hv.mac, Some(MAC_A));
    assert_eq!(hv.mtu, 1400);
    assert!(hv.up);
    assert_eq!(hv.kind.as_deref(), Some("veth"));
    assert!(
        h.link_by_name("eth0").unwrap().is_none(),
        "peer must not appear in the host namespace"
    );

    let mut p = pod.netns().netlink().unwrap();
    let pv = p.link_by_name("eth0").unwrap().unwrap();
    assert_eq!(pv.mac, Some(MAC_B));
    assert_eq!(pv.mtu, 1400);
    assert!(!pv.up);
    p.link_set_up(pv.index, true).unwrap();
    assert!(p.link_by_name("eth0").unwrap().unwrap().up);

    // Set operations.
    p.link_set_mtu(pv.index, 1300).unwrap();
    p.link_set_up(pv.index, false).unwrap();
    p.link_set_name(pv.index, "eth9").unwrap();
    let pv2 = p.link_by_name("eth9").unwrap().unwrap();
    assert_eq!((pv2.mtu, pv2.up), (1300, false));

    // Move to another namespace and back.
    let third = TestNs::new("uldp-veth-t").unwrap();
    p.link_set_netns(pv2.index, third.netns()).unwrap();
    assert!(p.link_by_name("eth9").unwrap().is_none());
    assert!(
        third
            .netns()
            .netlink()
            .unwrap()
            .link_by_name("eth9")
            .unwrap()
            .is_some()
    );

    // Deleting one end deletes the pair; deleting again is "missing".
    h.link_del(hv.index).unwrap();
    assert!(
        third
            .netns()
            .netlink()
            .unwrap()
            .link_by_name("eth9")
            .unwrap()
            .is_none()
    );
    assert!(!h.link_del_by_name("uldpv0").ignore_missing().unwrap());
}

#[test]
fn addresses_routes_neighbours_and_rules() {
    let ns = TestNs::new("uldp-l3").unwrap();
    let peer = TestNs::new("uldp-l3p").unwrap();
    let mut nl = ns.netns().netlink().unwrap();
    nl.veth_add(&VethSpec {
        name: "uldpa",
        peer_name: "uldpb",
        peer_netns: Some(peer.netns()),
        mtu: None,
        mac: Some(MAC_A),
        peer_mac: None,
        up: true,
    })
    .unwrap();
    let a = nl.link_by_name("uldpa").unwrap().unwrap();

    let net = "100.64.7.2/32".parse().unwrap();
    nl.addr_add(a.index, net).unwrap();
    assert!(!nl.addr_add(a.index, net).ignore_exists().unwrap());
    assert_eq!(nl.addrs(a.index).unwrap(), vec![net]);

    let gw: IpAddr = "169.254.1.1".parse().unwrap();
    nl.neigh_add_permanent(a.index, gw, MAC_B).unwrap();
    nl.neigh_add_permanent(a.index, gw, MAC_B).unwrap(); // replace semantics
    let n = nl.neighbours(a.index).unwrap();
    assert!(
        n.iter()
            .any(|n| n.ip == gw && n.mac == Some(MAC_B) && n.permanent),
        "{n:?}"
    );

    let default = Route::via_onlink("0.0.0.0/0".parse().unwrap(), gw, a.index);
    nl.route_add(&default).unwrap();
    assert!(!nl.route_add(&default).ignore_exists().unwrap());
    let host = Route::link("100.64.9.9/32".parse().unwrap(), a.index);
    nl.route_replace(&host).unwrap();
    nl.route_replace(&host).unwrap();
    let in_table = Route {
        table: 1234,
        ..Route::link("100.64.0.0/24".parse().unwrap(), a.index)
    };
    nl.route_add(&in_table).unwrap();

    let main = nl.routes(Route::MAIN).unwrap();
    assert!(main.contains(&default), "{main:?}");
    assert!(
        main.iter()
            .any(|r| r.dst == host.dst && r.oif == Some(a.index) && r.scope == RouteScope::Link)
    );
    assert_eq!(nl.routes(1234).unwrap(), vec![in_table.clone()]);

    nl.route_del(&in_table).unwrap();
    assert!(!nl.route_del(&in_table).ignore_missing().unwrap());
    assert!(nl.routes(1234).unwrap().is_empty());

    let rule = Rule {
        priority: 1536,
        from: Some("100.64.7.0/24".parse().unwrap()),
        to: None,
        table: 1234,
        v6: false,
    };
    nl.rule_add(&rule).unwrap();
    assert!(!nl.rule_add(&rule).ignore_exists().unwrap());
    assert!(nl.rules(false).unwrap().contains(&rule));
    nl.rule_del(&rule).unwrap();
    assert!(!nl.rule_del(&rule).ignore_missing().unwrap());

    nl.neigh_del(a.index, gw).unwrap();
    nl.addr_del(a.index, net).unwrap();
    assert!(!nl.addr_del(a.index, net).ignore_missing().unwrap());
    assert!(nl.addrs(a.index).unwrap().is_empty());
}

#[test]
fn read_sysctls_reads_the_namespace_and_leaves_out_unreadable_keys() {
    let ns = TestNs::new("uldp-sysctls").unwrap();
    let root = Netns::current().unwrap();
    let before = root.read_sysctl("net.ipv4.conf.lo.rp_filter").unwrap();
    let want = if before == "2" { "1" } else { "2" };
    ns.netns()
        .write_sysctl("net.ipv4.conf.lo.rp_filter", want)
        .unwrap();
    let got = ns
        .netns()
        .read_sysctls([
            "net/ipv4/conf/lo/rp_filter",
            "net.ipv4.conf.lo.rp_filter",
            "net/ipv4/conf/nosuchdev/rp_filter",
        ])
        .unwrap();
    assert_eq!(
        got.into_iter().collect::<Vec<_>>(),
        [
            ("net.ipv4.conf.lo.rp_filter".to_string(), want.to_string()),
            ("net/ipv4/conf/lo/rp_filter".to_string(), want.to_string()),
        ]
    );
    assert_eq!(
        root.read_sysctl("net.ipv4.conf.lo.rp_filter").unwrap(),
        before
    );
}

#[test]
fn sysctl_writes_land_in_the_namespace_not_the_caller() {
    let ns = TestNs::new("uldp-sysctl").unwrap();
    let root = Netns::current().unwrap();
    let before = root.read_sysctl("net.ipv4.conf.lo.rp_filter").unwrap();
    let want = if before == "2" { "1" } else { "2" };
    ns.netns()
        .write_sysctl("net.ipv4.conf.lo.rp_filter", want)
        .unwrap();
    assert_eq!(
        ns.netns()
            .read_sysctl("net.ipv4.conf.lo.rp_filter")
            .unwrap(),
        want
    );
    assert_eq!(
        root.read_sysctl("net.ipv4.conf.lo.rp_filter").unwrap(),
        before
    );
    assert!(
        ns.netns()
            .write_sysctl("net.ipv4.conf.nosuchdev.rp_filter", "1")
            .unwrap_err()
            .is_missing()
    );
}

#[test]
fn test_namespace_is_gone_after_drop() {
    let path;
    {
        let ns = TestNs::new("uldp-drop").unwrap();
        path = ns.path();
        assert!(std::path::Path::new(&path).exists());
    }
    assert!(!std::path::Path::new(&path).exists());
}

#[test]
fn netlink_in_place_opens_in_the_target_and_returns_home() {
    let ns = TestNs::new("uldp-inplace").unwrap();
    // On a thread of our own, so the switch cannot affect other tests' threads.
    let (home_before, home_after, links, peer_index) = std::thread::spawn(move || {
        let before = Netns::current().unwrap().inode().unwrap();
        let mut nl = ns.netns().netlink_in_place().unwrap();
        let after = Netns::current().unwrap().inode().unwrap();
        let links: Vec<String> = nl.links().unwrap().into_iter().map(|l| l.name).collect();
        // IFLA_LINK: the creator learns the peer's index in the peer's namespace.
        let mut here = ns.netns().netlink().unwrap();
        let peer = TestNs::new("uldp-inplace-p").unwrap();
        here.veth_add(&VethSpec {
            name: "uldpip0",
            peer_name: "uldpip1",
            peer_netns: Some(peer.netns()),
            mtu: None,
            mac: None,
            peer_mac: None,
            up: false,
        })
        .unwrap();
        let host = here.link_by_name("uldpip0").unwrap().unwrap();
        let far = peer
            .netns()
            .netlink()
            .unwrap()
            .link_by_name("uldpip1")
            .unwrap()
            .unwrap();
        (before, after, links, host.peer_index == Some(far.index))
    })
    .join()
    .unwrap();
    assert_eq!(home_before, home_after, "thread did not return home");
    assert_eq!(links, vec!["lo".to_string()]);
    assert!(peer_index, "IFLA_LINK is not the peer's index");
}
