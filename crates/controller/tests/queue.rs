//! The controller behind the rate-aware queue, on vpcsim with AWS's token buckets: a cluster whose first
//! convergence needs more mutating calls than the mutating bucket holds converges in one pass without a single
//! `RequestLimitExceeded`, and the same pass without the queue is throttled (so the first check can fail).

mod common;

use std::sync::Arc;

use common::{check_covered, mk_world};
use underlay_cloud::queue::{QueueConfig, RateLimitedCloud};
use underlay_controller::{CloudLanes, OneLane, Priority, RouteReconciler, TwoLanes};

/// 150 nodes in 6 subnets with a 50-route limit and 2 foreign routes per table: 47 routes in each of 3 tables,
/// 141 CreateRoutes, against a mutating bucket of 50 (40 at the queue's default 0.8 share).
const NODES: usize = 150;

#[tokio::test(start_paused = true)]
async fn without_the_queue_a_large_first_pass_is_throttled() {
    let w = mk_world(7, NODES, 50);
    let lanes: Arc<dyn CloudLanes> = Arc::new(OneLane(w.cloud()));
    let mut r = RouteReconciler::new(w.config(), lanes);
    let rep = r
        .reconcile(&w.nodes, &w.all_healthy(), Priority::Normal)
        .await;
    assert!(!rep.converged());
    assert!(
        rep.errors.iter().any(|e| e.is_retryable()),
        "{:?}",
        rep.errors
    );
    assert!(w.sim.counters().total_throttled() > 0);
}

#[tokio::test(start_paused = true)]
async fn behind_the_queue_the_same_pass_converges_without_throttling() {
    let w = mk_world(7, NODES, 50);
    let queue = RateLimitedCloud::new(w.sim.as_ref().clone(), QueueConfig::default());
    let lanes: Arc<dyn CloudLanes> = Arc::new(TwoLanes::over_queue(queue.clone()));
    let mut r = RouteReconciler::new(w.config(), lanes);
    let healthy = w.all_healthy();
    let rep = r.reconcile(&w.nodes, &healthy, Priority::Normal).await;
    assert!(rep.converged(), "{:?}", rep.errors);
    assert_eq!(rep.applied.len(), rep.planned.len());
    assert!(rep.applied.len() > 100, "{} creates", rep.applied.len());
    assert_eq!(w.sim.counters().total_throttled(), 0);
    check_covered(&w, rep.plan.as_ref().unwrap(), &healthy);

    // A forwarder fails: its replacements go through the queue's failover lane, still unthrottled.
    let plan = rep.plan.unwrap();
    let victim = plan.routes[0].forwarder.clone().unwrap();
    let mut healthy = healthy;
    healthy.remove(&victim);
    let rep = r.reconcile(&w.nodes, &healthy, Priority::Failover).await;
    assert!(rep.converged(), "{:?}", rep.errors);
    assert!(!rep.applied.is_empty());
    assert!(rep.applied.iter().all(|a| a.priority == Priority::Failover));
    assert_eq!(w.sim.counters().total_throttled(), 0);
    check_covered(&w, rep.plan.as_ref().unwrap(), &healthy);
}
