//! The route reconciler and the source/dest check reconciler against vpcsim (AWS buckets, limits, error codes).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{POD_CIDR, check_covered, mk_world, mutating_calls, net};
use underlay_cloud::{ErrorKind, Operation, RouteTableId, RouteTarget};
use underlay_controller::{
    ManagedTables, Outcome, Priority, ReconcileError, RouteReconciler, SrcDstReconciler,
    apply_route_op,
};
use underlay_core::health::{HealthConfig, HealthTracker, Probe};
use underlay_core::routeops::RouteOp;

fn eni(id: &str) -> RouteTarget {
    RouteTarget::NetworkInterface(id.into())
}

#[tokio::test(start_paused = true)]
async fn converges_from_empty_per_node_and_a_second_pass_calls_nothing_mutating() {
    let w = mk_world(1, 12, 50);
    let mut r = RouteReconciler::new(w.config(), w.lanes());
    let healthy = w.all_healthy();
    let rep = r.reconcile(&w.nodes, &healthy, Priority::Normal).await;
    assert!(rep.converged(), "{:?}", rep.errors);
    assert_eq!(rep.managed_tables.len(), 3);
    let plan = rep.plan.as_ref().unwrap();
    assert_eq!(
        plan.routes_per_table, 12,
        "12 nodes fit a 50-route table: one route each"
    );
    assert_eq!(rep.applied.len(), 36);
    assert!(
        rep.applied
            .iter()
            .all(|a| matches!(a.op, RouteOp::Create { .. })
                && a.outcome == Outcome::Done
                && a.priority == Priority::Normal)
    );
    for t in &w.tables {
        assert_eq!(w.owned(t).len(), 12);
        assert_eq!(w.foreign(t).len(), 2);
    }
    check_covered(&w, plan, &healthy);

    w.sim.reset_counters();
    let rep2 = r.reconcile(&w.nodes, &healthy, Priority::Normal).await;
    assert!(rep2.converged());
    assert!(rep2.planned.is_empty() && rep2.applied.is_empty());
    assert_eq!(mutating_calls(&w.sim), 0);
    // One filtered describe, subnets cached.
    let c = w.sim.counters();
    assert_eq!(c.calls_of(Operation::DescribeRouteTables), 1);
    assert_eq!(c.calls_of(Operation::DescribeSubnets), 0);
}

#[tokio::test(start_paused = true)]
async fn converges_aggregated_within_budget_when_nodes_exceed_it() {
    // Limit 10, 2 foreign routes, headroom 1: budget 7 routes for 30 nodes in 6 subnets.
    let w = mk_world(2, 30, 10);
    let mut r = RouteReconciler::new(w.config(), w.lanes());
    let healthy = w.all_healthy();
    let rep = r.reconcile(&w.nodes, &healthy, Priority::Normal).await;
    assert!(rep.converged(), "{:?}", rep.errors);
    let plan = rep.plan.as_ref().unwrap();
    assert_eq!(plan.budget, 7);
    assert_eq!(plan.routes_per_table, 7);
    for t in &w.tables {
        assert_eq!(w.owned(t).len(), 7);
        assert!(w.routes(t).len() <= 10);
    }
    check_covered(&w, plan, &healthy);
    w.sim.reset_counters();
    let rep2 = r.reconcile(&w.nodes, &healthy, Priority::Normal).await;
    assert!(rep2.applied.is_empty());
    assert_eq!(mutating_calls(&w.sim), 0);
}

#[tokio::test(start_paused = true)]
async fn foreign_and_out_of_cidr_routes_are_untouched_and_stale_owned_routes_go() {
    let w = mk_world(3, 6, 50);
    let t0 = &w.tables[0];
    let someone = w.nodes[0].eni.clone();
    // An ENI-targeted route outside the pod CIDR (looks like ours, is not), a route containing the pod CIDR.
    w.sim
        .add_route(
            t0,
            net("172.16.0.0/24"),
            &RouteTarget::NetworkInterface(someone.clone()),
        )
        .unwrap();
    w.sim
        .add_route(t0, net("100.0.0.0/8"), &RouteTarget::Gateway(w.igw.clone()))
        .unwrap();
    // A stale owned route: a block no node has, to a node's ENI. Inside the pod CIDR but foreign: a route to a
    // gateway.
    w.sim
        .add_route(
            t0,
            net("100.64.255.0/26"),
            &RouteTarget::NetworkInterface(someone.clone()),
        )
        .unwrap();
    w.sim
        .add_route(
            &w.tables[1],
            net("100.64.254.0/24"),
            &RouteTarget::Gateway(w.igw.clone()),
        )
        .unwrap();
    let foreign_before: Vec<_> = w.tables.iter().map(|t| w.foreign(t)).collect();
    assert_eq!(foreign_before[0].len(), 4);

    let mut r = RouteReconciler::new(w.config(), w.lanes());
    let healthy = w.all_healthy();
    let rep = r.reconcile(&w.nodes, &healthy, Priority::Normal).await;
    assert!(rep.converged(), "{:?}", rep.errors);
    let foreign_after: Vec<_> = w.tables.iter().map(|t| w.foreign(t)).collect();
    assert_eq!(foreign_before, foreign_after, "foreign routes changed");
    assert!(!w.owned(t0).contains_key(&net("100.64.255.0/26")));
    assert_eq!(
        w.owned(&w.tables[1]).get(&net("100.64.254.0/24")),
        Some(&RouteTarget::Gateway(w.igw.clone())),
        "a foreign route inside the pod CIDR is left as it is"
    );
    assert_eq!(
        rep.foreign_routes
            .iter()
            .map(|f| (f.route_table.clone(), f.destination))
            .collect::<Vec<_>>(),
        [(w.tables[1].clone(), net("100.64.254.0/24"))]
    );
    let deletes: BTreeSet<_> = rep
        .applied
        .iter()
        .filter_map(|a| match &a.op {
            RouteOp::Delete { destination, .. } => Some(*destination),
            _ => None,
        })
        .collect();
    assert_eq!(deletes, [net("100.64.255.0/26")].into());
    // Nothing ever touched outside the pod CIDR.
    assert!(
        rep.applied
            .iter()
            .all(|a| net(POD_CIDR).contains(&a.op.destination()))
    );
    check_covered(&w, rep.plan.as_ref().unwrap(), &healthy);
}

#[tokio::test(start_paused = true)]
async fn a_wrong_target_is_replaced_and_a_missing_route_recreated() {
    let w = mk_world(4, 6, 50);
    let mut r = RouteReconciler::new(w.config(), w.lanes());
    let healthy = w.all_healthy();
    let plan = r
        .reconcile(&w.nodes, &healthy, Priority::Normal)
        .await
        .plan
        .unwrap();
    let route = plan.routes[0].clone();
    let cloud = w.cloud();
    // Someone points our route at another of the cluster's ENIs in one table and deletes it in another. (Pointed
    // at something not the cluster's, it would be foreign: left alone, see `ownership.rs`.)
    let wrong = w
        .nodes
        .iter()
        .map(|n| n.eni.clone())
        .find(|e| Some(e.0.as_str()) != route.eni.as_deref())
        .unwrap();
    cloud
        .replace_route(
            &w.tables[0],
            route.destination,
            &RouteTarget::NetworkInterface(wrong),
        )
        .await
        .unwrap();
    cloud
        .delete_route(&w.tables[1], route.destination)
        .await
        .unwrap();
    w.sim.reset_counters();
    let rep = r.reconcile(&w.nodes, &healthy, Priority::Normal).await;
    assert!(rep.converged());
    let c = w.sim.counters();
    assert_eq!(c.calls_of(Operation::ReplaceRoute), 1);
    assert_eq!(c.calls_of(Operation::CreateRoute), 1);
    assert_eq!(c.calls_of(Operation::DeleteRoute), 0);
    check_covered(&w, &plan, &healthy);
}

#[tokio::test(start_paused = true)]
async fn apply_turns_not_found_into_success_in_one_place_and_never_takes_an_existing_route() {
    let w = mk_world(5, 2, 50);
    let cloud = w.cloud();
    let t = w.tables[0].0.clone();
    let (a, b) = (w.nodes[0].eni.0.clone(), w.nodes[1].eni.0.clone());
    let d = net("100.64.0.0/26");
    let create = |e: &str| RouteOp::Create {
        route_table: t.clone(),
        destination: d,
        eni: e.to_string(),
    };
    assert_eq!(
        apply_route_op(cloud.as_ref(), &create(&a)).await,
        Ok(Outcome::Done)
    );
    // Create of an existing destination: an error, and the route keeps its target (it may be another
    // cluster's, created since the describe).
    assert_eq!(
        apply_route_op(cloud.as_ref(), &create(&b))
            .await
            .unwrap_err()
            .kind,
        ErrorKind::AlreadyExists
    );
    assert_eq!(w.routes(&w.tables[0])[&d], eni(&a));
    let delete = RouteOp::Delete {
        route_table: t.clone(),
        destination: d,
        previous: a.clone(),
    };
    assert_eq!(
        apply_route_op(cloud.as_ref(), &delete).await,
        Ok(Outcome::Done)
    );
    assert_eq!(
        apply_route_op(cloud.as_ref(), &delete).await,
        Ok(Outcome::AlreadyDeleted)
    );
    let replace = RouteOp::Replace {
        route_table: t.clone(),
        destination: d,
        eni: a.clone(),
        previous: b.clone(),
    };
    assert_eq!(
        apply_route_op(cloud.as_ref(), &replace).await,
        Ok(Outcome::ReplaceBecameCreate)
    );
    assert_eq!(w.routes(&w.tables[0])[&d], eni(&a));
    // A real error stays an error: an ENI that does not exist, a table that does not exist.
    let bad = RouteOp::Replace {
        route_table: t.clone(),
        destination: d,
        eni: "eni-00000000000000000".into(),
        previous: a.clone(),
    };
    assert_eq!(
        apply_route_op(cloud.as_ref(), &bad).await.unwrap_err().kind,
        ErrorKind::NotFound
    );
    let gone = RouteOp::Delete {
        route_table: "rtb-00000000000000000".into(),
        destination: d,
        previous: a.clone(),
    };
    assert!(apply_route_op(cloud.as_ref(), &gone).await.is_err());
}

/// Which (table, destination) pairs target `eni`.
fn routes_to(w: &common::World, eni: &str) -> BTreeSet<(RouteTableId, ipnet::Ipv4Net)> {
    w.tables
        .iter()
        .flat_map(|t| {
            w.owned(t)
                .into_iter()
                .filter(|(_, tg)| *tg == RouteTarget::NetworkInterface(eni.into()))
                .map(move |(d, _)| (t.clone(), d))
        })
        .collect()
}

fn snapshot_owned(w: &common::World) -> BTreeMap<(RouteTableId, ipnet::Ipv4Net), RouteTarget> {
    w.tables
        .iter()
        .flat_map(|t| {
            w.owned(t)
                .into_iter()
                .map(move |(d, tg)| ((t.clone(), d), tg))
        })
        .collect()
}

async fn failover_moves_only_the_failed_forwarders_routes(nodes: usize, limit: usize) {
    let w = mk_world(6, nodes, limit);
    let mut r = RouteReconciler::new(w.config(), w.lanes());
    let mut healthy = w.all_healthy();
    let plan = r
        .reconcile(&w.nodes, &healthy, Priority::Normal)
        .await
        .plan
        .unwrap();
    // The busiest forwarder.
    let victim = plan
        .routes
        .iter()
        .max_by_key(|r| r.nodes)
        .unwrap()
        .forwarder
        .clone()
        .unwrap();
    let victim_eni = w.node(&victim).eni.0.clone();
    let moved = routes_to(&w, &victim_eni);
    assert!(!moved.is_empty());
    let before = snapshot_owned(&w);

    healthy.remove(&victim);
    w.sim.reset_counters();
    let rep = r.reconcile(&w.nodes, &healthy, Priority::Failover).await;
    assert!(rep.converged(), "{:?}", rep.errors);
    let c = w.sim.counters();
    assert_eq!(c.calls_of(Operation::CreateRoute), 0);
    assert_eq!(c.calls_of(Operation::DeleteRoute), 0);
    assert_eq!(c.calls_of(Operation::ReplaceRoute), moved.len() as u64);
    assert!(rep.applied.iter().all(|a| a.priority == Priority::Failover
        && matches!(&a.op, RouteOp::Replace { previous, .. } if *previous == victim_eni)));
    // Exactly the victim's routes changed; every other route is as it was.
    let after = snapshot_owned(&w);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (k, tg) in &before {
        if moved.contains(k) {
            assert_ne!(after[k], *tg, "{k:?} still targets the failed node");
        } else {
            assert_eq!(
                after[k], *tg,
                "{k:?} moved but did not target the failed node"
            );
        }
    }
    assert!(routes_to(&w, &victim_eni).is_empty());
    check_covered(&w, rep.plan.as_ref().unwrap(), &healthy);

    // Healthy again (the tracker's hold-down is over): exactly those routes come back, per node and aggregated,
    // and the tables are as before the failure.
    healthy.insert(victim.clone());
    w.sim.reset_counters();
    let rep = r.reconcile(&w.nodes, &healthy, Priority::Normal).await;
    assert!(rep.converged(), "{:?}", rep.errors);
    let c = w.sim.counters();
    assert_eq!(c.calls_of(Operation::CreateRoute), 0);
    assert_eq!(c.calls_of(Operation::DeleteRoute), 0);
    assert_eq!(c.calls_of(Operation::ReplaceRoute), moved.len() as u64);
    assert_eq!(routes_to(&w, &victim_eni), moved);
    assert_eq!(snapshot_owned(&w), before);
    check_covered(&w, rep.plan.as_ref().unwrap(), &healthy);
    // And it stays there.
    w.sim.reset_counters();
    let rep = r.reconcile(&w.nodes, &healthy, Priority::Normal).await;
    assert!(rep.applied.is_empty(), "{:?}", rep.applied);
    assert_eq!(mutating_calls(&w.sim), 0);
}

#[tokio::test(start_paused = true)]
async fn failover_per_node_replaces_only_that_route() {
    failover_moves_only_the_failed_forwarders_routes(12, 50).await;
}

#[tokio::test(start_paused = true)]
async fn failover_aggregated_replaces_only_the_routes_it_forwarded() {
    failover_moves_only_the_failed_forwarders_routes(30, 10).await;
}

/// Drive the tracker with explicit time, one probe per second, and reconcile after every probe.
#[tokio::test(start_paused = true)]
async fn fail_back_only_after_the_hold_down_and_a_flapping_node_does_not_churn() {
    let w = mk_world(7, 12, 50);
    let mut r = RouteReconciler::new(w.config(), w.lanes());
    let hold = Duration::from_secs(30);
    let mut tracker = HealthTracker::new(HealthConfig {
        misses_to_fail: 2,
        hold_down: hold,
        ..HealthConfig::default()
    });
    for n in &w.nodes {
        tracker.insert_healthy(&n.name);
    }
    r.reconcile(&w.nodes, &tracker.healthy(), Priority::Normal)
        .await;
    let victim = w.nodes[3].clone();
    let own_route = routes_to(&w, &victim.eni.0);
    assert_eq!(own_route.len(), 3, "per-node: its own route in each table");
    let t0 = Instant::now();
    let mut second = 0u64;
    let mut step = |tracker: &mut HealthTracker, p: Probe| {
        second += 1;
        tracker.record(&victim.name, p, t0 + Duration::from_secs(second))
    };

    // Two misses: failed, routes move away (Replace ×3).
    step(&mut tracker, Probe::Miss);
    assert!(tracker.is_healthy(&victim.name));
    step(&mut tracker, Probe::Miss).expect("failed");
    w.sim.reset_counters();
    let rep = r
        .reconcile(&w.nodes, &tracker.healthy(), Priority::Failover)
        .await;
    assert_eq!(rep.applied.len(), 3);
    assert_eq!(w.sim.counters().calls_of(Operation::ReplaceRoute), 3);
    assert!(routes_to(&w, &victim.eni.0).is_empty());

    // Flapping for 200 probes (success, miss, success, success, miss, …): no route changes at all.
    w.sim.reset_counters();
    for k in 0..200 {
        let p = if k % 3 == 1 {
            Probe::Miss
        } else {
            Probe::Success
        };
        assert_eq!(step(&mut tracker, p), None);
        // One probe per second: keeps the describes within AWS's describe bucket, as in a real run.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rep = r
            .reconcile(&w.nodes, &tracker.healthy(), Priority::Normal)
            .await;
        assert!(rep.converged(), "{:?}", rep.errors);
        assert!(
            rep.applied.is_empty(),
            "flap {k} changed routes: {:?}",
            rep.applied
        );
    }
    assert_eq!(mutating_calls(&w.sim), 0);

    // Steady successes: nothing until the run spans the hold-down, then the per-node route fails back.
    let mut back = None;
    for k in 0..=hold.as_secs() {
        let tr = step(&mut tracker, Probe::Success);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rep = r
            .reconcile(&w.nodes, &tracker.healthy(), Priority::Normal)
            .await;
        if tr.is_some() {
            back = Some((k, rep));
            break;
        }
        assert!(rep.converged(), "{:?}", rep.errors);
        assert!(rep.applied.is_empty(), "moved back before the hold-down");
    }
    let (k, rep) = back.expect("recovered within the hold-down plus one probe");
    assert_eq!(
        k,
        hold.as_secs(),
        "recovery exactly when successes span the hold-down"
    );
    assert_eq!(rep.applied.len(), 3, "{:?}", rep.errors);
    assert!(rep.applied.iter().all(|a| a.priority == Priority::Normal
        && matches!(&a.op, RouteOp::Replace { eni, .. } if *eni == victim.eni.0)));
    assert_eq!(routes_to(&w, &victim.eni.0), own_route);
}

#[tokio::test(start_paused = true)]
async fn throttling_stops_the_pass_as_retryable_and_a_later_pass_converges() {
    let w = mk_world(8, 12, 50);
    let mut r = RouteReconciler::new(w.config(), w.lanes());
    let healthy = w.all_healthy();
    // Describes throttled: nothing planned, retryable.
    w.sim.update_faults(|f| {
        f.throttled.insert(Operation::DescribeRouteTables);
    });
    let rep = r.reconcile(&w.nodes, &healthy, Priority::Normal).await;
    assert!(rep.retryable && rep.plan.is_none());
    assert!(
        matches!(&rep.errors[..], [ReconcileError::Observe { error, .. }] if error.is_throttled())
    );

    // CreateRoute throttled after 5 calls succeed: the pass stops, reports, skips the rest.
    w.sim.update_faults(|f| {
        f.throttled.clear();
    });
    w.sim.set_rate_limits(Some({
        let mut l = underlay_cloud::RateLimits::aws_default();
        l.mutating = underlay_cloud::BucketLimits {
            capacity: 5.0,
            refill_per_sec: 1.0,
        };
        l
    }));
    let rep = r.reconcile(&w.nodes, &healthy, Priority::Normal).await;
    assert!(rep.retryable, "{:?}", rep.errors);
    assert!(rep.errors.iter().any(|e| e.is_retryable()));
    assert!(
        rep.errors
            .iter()
            .all(|e| matches!(e, ReconcileError::Apply { error, .. } if error.is_throttled()))
    );
    assert!(!rep.skipped.is_empty());
    assert_eq!(rep.applied.len(), 5);
    assert_eq!(rep.applied.len() + rep.skipped.len() + rep.errors.len(), 36);

    // Later passes (after the bucket refills) converge to the same plan.
    let mut passes = 0;
    loop {
        passes += 1;
        assert!(passes < 50, "did not converge");
        tokio::time::sleep(Duration::from_secs(10)).await;
        let rep = r.reconcile(&w.nodes, &healthy, Priority::Normal).await;
        if rep.converged() {
            assert!(!rep.retryable);
            check_covered(&w, rep.plan.as_ref().unwrap(), &healthy);
            break;
        }
        assert!(rep.retryable);
    }
    for t in &w.tables {
        assert_eq!(w.owned(t).len(), 12);
    }
}

#[tokio::test(start_paused = true)]
async fn a_non_retryable_error_stops_only_its_table() {
    let w = mk_world(9, 6, 50);
    let mut r = RouteReconciler::new(w.config(), w.lanes());
    w.sim
        .fail_next(Operation::CreateRoute, "UnauthorizedOperation");
    let rep = r
        .reconcile(&w.nodes, &w.all_healthy(), Priority::Normal)
        .await;
    assert!(!rep.retryable);
    assert_eq!(rep.errors.len(), 1);
    let ReconcileError::Apply { op, error } = &rep.errors[0] else {
        panic!("{:?}", rep.errors)
    };
    assert_eq!(error.kind, ErrorKind::Unauthorized);
    // The failing table stopped (5 skipped), the two others converged.
    assert_eq!(rep.skipped.len(), 5);
    assert!(
        rep.skipped
            .iter()
            .all(|s| s.route_table() == op.route_table())
    );
    assert_eq!(rep.applied.len(), 12);
    let rep = r
        .reconcile(&w.nodes, &w.all_healthy(), Priority::Normal)
        .await;
    assert!(rep.converged());
    assert_eq!(rep.applied.len(), 6);
}

#[tokio::test(start_paused = true)]
async fn a_table_near_its_limit_still_converges_within_budget_through_joins_and_leaves() {
    // Limit 20 everywhere; the first table also holds 9 peering-like routes: 11 foreign routes, budget 8.
    let mut w = mk_world(10, 24, 20);
    let crowded = w.tables[0].clone();
    for i in 0..9u8 {
        w.sim
            .add_route(
                &crowded,
                net(&format!("10.{}.0.0/16", 20 + i)),
                &RouteTarget::Gateway(w.peer_gw.clone()),
            )
            .unwrap();
    }
    let mut r = RouteReconciler::new(w.config(), w.lanes());
    let healthy = w.all_healthy();
    let rep = r.reconcile(&w.nodes, &healthy, Priority::Normal).await;
    assert!(rep.converged(), "{:?}", rep.errors);
    assert_eq!(rep.plan.as_ref().unwrap().budget, 8);
    assert_eq!(w.routes(&crowded).len(), 19);
    check_covered(&w, rep.plan.as_ref().unwrap(), &healthy);

    // Joins and leaves keep every table within its limit (vpcsim would answer RouteLimitExceeded).
    for round in 0..6 {
        if round % 2 == 0 {
            w.add_node();
        } else {
            let gone = w.nodes.remove(round);
            let inst = w
                .sim
                .snapshot()
                .instances
                .into_iter()
                .find(|i| i.private_ip == gone.ip)
                .unwrap();
            w.sim.terminate_instance(&inst.id).unwrap();
        }
        let healthy = w.all_healthy();
        let rep = r.reconcile(&w.nodes, &healthy, Priority::Normal).await;
        assert!(rep.converged(), "round {round}: {:?}", rep.errors);
        for t in &w.tables {
            assert!(w.routes(t).len() <= 20);
            assert_eq!(
                w.owned(t).len() as u32,
                rep.plan.as_ref().unwrap().routes_per_table
            );
        }
        check_covered(&w, rep.plan.as_ref().unwrap(), &healthy);
    }
}

#[tokio::test(start_paused = true)]
async fn explicit_tables_and_unknown_ones_are_reported() {
    let w = mk_world(11, 6, 50);
    let mut cfg = w.config();
    cfg.route_tables = ManagedTables::Explicit(vec![
        w.tables[0].clone(),
        RouteTableId::new("rtb-00000000000000000"),
    ]);
    let mut r = RouteReconciler::new(cfg, w.lanes());
    let rep = r
        .reconcile(&w.nodes, &w.all_healthy(), Priority::Normal)
        .await;
    assert_eq!(rep.managed_tables, vec![w.tables[0].clone()]);
    assert!(matches!(
        &rep.errors[..],
        [ReconcileError::UnknownRouteTable { .. }]
    ));
    assert_eq!(w.owned(&w.tables[0]).len(), 6);
    assert!(w.owned(&w.tables[1]).is_empty());
}

#[tokio::test(start_paused = true)]
async fn source_dest_check_is_turned_off_exactly_once_per_node() {
    let mut w = mk_world(12, 6, 50);
    // One node already has it off.
    w.cloud()
        .set_source_dest_check(&w.nodes[0].eni, false)
        .await
        .unwrap();
    w.sim.reset_counters();
    let mut s = SrcDstReconciler::new(w.lanes());
    let rep = s.reconcile(&w.nodes).await;
    assert_eq!(rep.turned_off.len(), 5);
    assert_eq!(rep.already_off, vec![w.nodes[0].eni.clone()]);
    let c = w.sim.counters();
    assert_eq!(c.calls_of(Operation::ModifyNetworkInterfaceAttribute), 5);
    assert_eq!(c.calls_of(Operation::DescribeNetworkInterfaces), 1);
    // Steady state: no call at all.
    w.sim.reset_counters();
    assert_eq!(s.reconcile(&w.nodes).await, Default::default());
    assert_eq!(w.sim.counters().total_calls(), 0);
    // A new node: one describe, one modify.
    let n = w.add_node();
    let rep = s.reconcile(&w.nodes).await;
    assert_eq!(rep.turned_off, vec![n.eni.clone()]);
    assert_eq!(
        w.sim
            .counters()
            .calls_of(Operation::ModifyNetworkInterfaceAttribute),
        1
    );
    // A resync describes again but modifies nothing.
    s.forget();
    w.sim.reset_counters();
    let rep = s.reconcile(&w.nodes).await;
    assert_eq!(rep.already_off.len(), 7);
    assert_eq!(
        w.sim
            .counters()
            .calls_of(Operation::ModifyNetworkInterfaceAttribute),
        0
    );
    for e in w.sim.snapshot().enis {
        if w.nodes.iter().any(|n| n.eni == e.id) {
            assert!(!e.source_dest_check, "{}", e.id);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn source_dest_check_survives_a_vanished_eni() {
    let w = mk_world(13, 3, 50);
    let mut nodes = w.nodes.clone();
    nodes[1].eni = "eni-00000000000000000".into();
    let mut s = SrcDstReconciler::new(w.lanes());
    let rep = s.reconcile(&nodes).await;
    assert_eq!(rep.missing, vec![nodes[1].eni.clone()]);
    assert_eq!(rep.turned_off.len(), 2);
    assert!(rep.errors.is_empty());
}

/// Whether `node`'s block, looked up by longest-prefix match in every managed table as the simulator holds it,
/// lands on the plan's route for it, and that route targets the ENI of a healthy node of the block's subnet. (A
/// less specific route of the same subnet is not enough: its forwarder reaches the block only once its agent has
/// installed the peer route, which the controller cannot see.)
fn reachable_in_tables(
    w: &common::World,
    managed: &[RouteTableId],
    plan: &underlay_core::planner::RoutedPlan,
    healthy: &BTreeSet<String>,
    node: &str,
) -> bool {
    let Some(b) = plan.blocks.iter().find(|b| b.node == node) else {
        return false;
    };
    !managed.is_empty()
        && managed.iter().all(|t| {
            let owned = w.owned(t);
            let Some((dest, RouteTarget::NetworkInterface(eni))) = owned
                .iter()
                .filter(|(d, _)| d.contains(&b.block))
                .max_by_key(|(d, _)| d.prefix_len())
            else {
                return false;
            };
            // Any healthy node of the block's subnet delivers it (each routes to every block of its subnet): a
            // covering route lands before the plan's most specific one, and the node is routed from then on.
            let _ = (plan, dest);
            w.nodes
                .iter()
                .any(|n| n.eni == *eni && healthy.contains(&n.name) && n.subnet.0 == b.subnet)
        })
}

/// `routed_nodes` names exactly the nodes whose block the tables (read back from the simulator) route to a
/// healthy node of its subnet.
fn check_routed_matches_tables(
    w: &common::World,
    rep: &underlay_controller::ReconcileReport,
    healthy: &BTreeSet<String>,
) -> BTreeSet<String> {
    let routed = rep.routed_nodes().expect("the pass planned");
    let plan = rep.plan.as_ref().unwrap();
    let want: BTreeSet<String> = w
        .nodes
        .iter()
        .filter(|n| reachable_in_tables(w, &rep.managed_tables, plan, healthy, &n.name))
        .map(|n| n.name.clone())
        .collect();
    assert_eq!(routed, want);
    routed
}

#[tokio::test(start_paused = true)]
async fn routed_nodes_are_those_whose_routes_landed_on_a_healthy_forwarder() {
    let mut w = mk_world(12, 6, 50);
    let mut r = RouteReconciler::new(w.config(), w.lanes());
    let old: BTreeSet<String> = w.all_healthy();
    let rep = r.reconcile(&w.nodes, &old, Priority::Normal).await;
    assert!(rep.converged());
    assert_eq!(check_routed_matches_tables(&w, &rep, &old), old);

    // Six nodes join; one table's first CreateRoute fails, so that table skips the rest of its creates: the old
    // nodes are still routed, and a new one only where a route that landed delivers its block (the oracle).
    for _ in 0..6 {
        w.add_node();
    }
    let all = w.all_healthy();
    w.sim
        .fail_next(Operation::CreateRoute, "UnauthorizedOperation");
    let rep = r.reconcile(&w.nodes, &all, Priority::Normal).await;
    assert!(!rep.converged());
    assert!(check_routed_matches_tables(&w, &rep, &all).is_superset(&old));

    // Throttled creates: a retryable stop; nothing new is routed.
    w.sim
        .update_faults(|f| _ = f.throttled.insert(Operation::CreateRoute));
    let rep = r.reconcile(&w.nodes, &all, Priority::Normal).await;
    assert!(rep.retryable);
    assert!(check_routed_matches_tables(&w, &rep, &all).is_superset(&old));

    w.sim.update_faults(|f| f.throttled.clear());
    let rep = r.reconcile(&w.nodes, &all, Priority::Normal).await;
    assert!(rep.converged(), "{:?}", rep.errors);
    assert_eq!(check_routed_matches_tables(&w, &rep, &all), all);

    // No healthy node left in the first subnet: its routes keep their (failed) target, its nodes are unrouted.
    let subnet0 = w.subnets[0].clone();
    let down: BTreeSet<String> = w
        .nodes
        .iter()
        .filter(|n| n.subnet == subnet0)
        .map(|n| n.name.clone())
        .collect();
    assert_eq!(down.len(), 2);
    let healthy: BTreeSet<String> = all.difference(&down).cloned().collect();
    let rep = r.reconcile(&w.nodes, &healthy, Priority::Failover).await;
    let routed = check_routed_matches_tables(&w, &rep, &healthy);
    assert_eq!(routed, healthy);
}

/// Passes capped below their diff apply the least specific routes first and each reports as routed exactly the
/// nodes the tables already deliver (read back from the simulator), not those whose routes were deferred; later
/// passes converge.
#[tokio::test(start_paused = true)]
async fn capped_passes_report_the_nodes_the_tables_already_deliver() {
    // More nodes than the route limit: blocks are aggregated.
    let w = mk_world(12, 30, 20);
    let mut cfg = w.config();
    cfg.max_ops_per_pass = Some(8);
    let mut r = RouteReconciler::new(cfg, w.lanes());
    let all = w.all_healthy();
    let mut early = false;
    for _ in 0..200 {
        // Virtual time for vpcsim's mutating bucket to refill the cap's calls (no queue here).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rep = r.reconcile(&w.nodes, &all, Priority::Normal).await;
        assert!(rep.applied.len() <= 8);
        assert!(rep.plan.is_some(), "{:?} {:?}", rep.errors, rep.warnings);
        let routed = check_routed_matches_tables(&w, &rep, &all);
        let plan = rep.plan.as_ref().unwrap();
        // Nodes are reported routed as their routes land, while calls still wait for later passes.
        early |= !rep.deferred.is_empty() && !routed.is_empty();
        if rep.deferred.is_empty() {
            assert!(rep.converged(), "{:?}", rep.errors);
            assert_eq!(routed, all);
            assert!(
                early,
                "no node was reported routed before its most specific route landed"
            );
            check_covered(&w, plan, &all);
            return;
        }
    }
    panic!("capped passes did not converge");
}
