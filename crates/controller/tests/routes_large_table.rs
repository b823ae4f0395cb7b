//! A managed route table past AWS's 125-route pagination advice and its 500-route default (quota raised to
//! 1,000): the reconciler reads it whole and leaves every foreign route as it was.

mod common;

use std::net::Ipv4Addr;

use common::*;
use ipnet::Ipv4Net;
use underlay_cloud::RouteTarget;
use underlay_controller::{Priority, RouteReconciler};

#[tokio::test]
async fn a_600_route_table_with_foreign_routes_is_read_whole_and_foreign_routes_survive() {
    let w = mk_world(5, 6, 1_000);
    let t0 = &w.tables[0];
    // 600 foreign routes (another tool's, outside the pod CIDR) next to the default route.
    for i in 0..600u32 {
        let dst = Ipv4Net::new(Ipv4Addr::from(0xAC10_0000 + (i << 6)), 26).unwrap();
        w.sim
            .add_route(t0, dst, &RouteTarget::Gateway(w.peer_gw.clone()))
            .unwrap();
    }
    let before = w.foreign(t0);
    assert!(before.len() >= 601, "{}", before.len());

    let mut r = RouteReconciler::new(w.config(), w.lanes());
    let healthy = w.all_healthy();
    let rep = r.reconcile(&w.nodes, &healthy, Priority::Normal).await;
    assert!(rep.converged(), "{:?}", rep.errors);
    assert_eq!(w.foreign(t0), before, "foreign routes changed");
    // Our routes went in beside them: the table now holds more than 600 routes.
    assert!(!w.owned(t0).is_empty());
    assert!(w.routes(t0).len() > 600, "{}", w.routes(t0).len());
    // A second reconcile reads the same whole table and changes nothing.
    let calls = mutating_calls(&w.sim);
    let rep = r.reconcile(&w.nodes, &healthy, Priority::Normal).await;
    assert!(rep.converged(), "{:?}", rep.errors);
    assert_eq!(mutating_calls(&w.sim), calls);
    assert_eq!(w.foreign(t0), before);
}
