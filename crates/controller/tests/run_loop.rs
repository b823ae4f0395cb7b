//! The run loop end to end against vpcsim on tokio's paused clock, with a scripted prober: converge, fail a
//! forwarder (failover pass, Replace only, high priority), recover it (fail-back only after the hold-down), a
//! node joining, shutdown. Times below are virtual (paused clock), so bounds on them are exact, not wall time.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{check_covered, mk_world};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use underlay_cloud::Operation;
use underlay_controller::{
    Controller, ControllerConfig, ControllerEvent, PassReport, Priority, ProbeTarget, Prober,
};
use underlay_core::health::{HealthConfig, Probe};
use underlay_core::routeops::RouteOp;
use underlay_vpcsim::Latency;

/// Nodes in `down` miss every probe.
#[derive(Debug, Default)]
struct ScriptedProber {
    down: Mutex<BTreeSet<String>>,
}

#[async_trait::async_trait]
impl Prober for ScriptedProber {
    async fn probe(&self, t: &ProbeTarget) -> Probe {
        if self.down.lock().unwrap().contains(&t.node) {
            Probe::Miss
        } else {
            Probe::Success
        }
    }
}

/// The next pass report satisfying `f`, within `limit` of virtual time.
async fn next_pass(
    rx: &mut broadcast::Receiver<ControllerEvent>,
    limit: Duration,
    mut f: impl FnMut(&PassReport) -> bool,
    seen: &mut Vec<Arc<PassReport>>,
) -> Arc<PassReport> {
    let deadline = Instant::now() + limit;
    loop {
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("no such pass in time")
            .unwrap();
        if let ControllerEvent::Pass(p) = ev {
            seen.push(p.clone());
            if f(&p) {
                return p;
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn fails_over_fails_back_after_hold_down_and_takes_joins() {
    let mut w = mk_world(21, 12, 50);
    let mut cfg = ControllerConfig::new(w.config());
    cfg.health = HealthConfig {
        misses_to_fail: 2,
        hold_down: Duration::from_secs(30),
        ..HealthConfig::default()
    };
    let interval = cfg.probe.interval;
    let prober = Arc::new(ScriptedProber::default());
    let controller = Controller::new(cfg, w.lanes()).with_prober(prober.clone());
    let tracker = controller.tracker();
    let mut events = controller.subscribe();
    let (nodes_tx, nodes_rx) = watch::channel(w.nodes.clone());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let run = tokio::spawn(controller.run(nodes_rx, shutdown_rx));
    let mut seen = Vec::new();

    // Converge: routes and source/dest check.
    let first = next_pass(&mut events, Duration::from_secs(5), |_| true, &mut seen).await;
    assert!(first.routes.converged(), "{:?}", first.routes.errors);
    assert_eq!(first.routes.applied.len(), 36);
    assert_eq!(first.srcdst.turned_off.len(), 12);
    check_covered(&w, first.routes.plan.as_ref().unwrap(), &w.all_healthy());

    // Kill a forwarder.
    let victim = w.nodes[4].clone();
    prober.down.lock().unwrap().insert(victim.name.clone());
    let killed = Instant::now();
    let failover = next_pass(
        &mut events,
        Duration::from_secs(10),
        |p| !p.routes.applied.is_empty(),
        &mut seen,
    )
    .await;
    let detected = Instant::now() - killed;
    eprintln!("virtual failover time: {detected:?}");
    assert_eq!(failover.routes.priority, Priority::Failover);
    assert_eq!(failover.routes.applied.len(), 3);
    assert!(
        failover
            .routes
            .applied
            .iter()
            .all(|a| a.priority == Priority::Failover
                && matches!(&a.op, RouteOp::Replace { previous, .. } if *previous == victim.eni.0))
    );
    // 2 misses at a 1 s interval: the failure pass runs within 2 intervals of the kill (+ the next tick's phase).
    assert!(
        detected <= interval * 3,
        "virtual detection time {detected:?}"
    );

    // Recover: no route moves until the hold-down has passed.
    seen.clear();
    prober.down.lock().unwrap().remove(&victim.name);
    let recovered = Instant::now();
    let back = next_pass(
        &mut events,
        Duration::from_secs(60),
        |p| !p.routes.applied.is_empty(),
        &mut seen,
    )
    .await;
    assert!(
        Instant::now() - recovered >= Duration::from_secs(30),
        "failed back before the hold-down"
    );
    assert_eq!(back.routes.priority, Priority::Normal);
    assert_eq!(back.routes.applied.len(), 3);
    assert!(
        back.routes
            .applied
            .iter()
            .all(|a| matches!(&a.op, RouteOp::Replace { eni, .. } if *eni == victim.eni.0))
    );
    assert!(
        seen[..seen.len() - 1]
            .iter()
            .all(|p| p.routes.applied.is_empty()),
        "routes changed during the hold-down"
    );

    // A node joins: its source/dest check is turned off, it gets routes, and (pending until its first probe
    // answers) it ends up forwarding its own block.
    let joined = w.add_node();
    nodes_tx.send(w.nodes.clone()).unwrap();
    let join = next_pass(
        &mut events,
        Duration::from_secs(5),
        |p| !p.srcdst.turned_off.is_empty(),
        &mut seen,
    )
    .await;
    assert_eq!(join.srcdst.turned_off, vec![joined.eni.clone()]);
    let mut own = false;
    for _ in 0..10 {
        tokio::time::sleep(interval).await;
        let t = w.table(&w.tables[0]);
        if t.routes
            .iter()
            .any(|r| r.target == underlay_cloud::RouteTarget::NetworkInterface(joined.eni.clone()))
        {
            own = true;
            break;
        }
    }
    assert!(own, "the joined node never forwarded its own route");
    assert!(tracker.lock().unwrap().is_healthy(&joined.name));

    shutdown_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("run loop did not stop")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_throttled_pass_is_retried_with_backoff_until_it_converges() {
    let w = mk_world(22, 6, 50);
    w.sim.update_faults(|f| {
        f.throttled.insert(underlay_cloud::Operation::CreateRoute);
    });
    let controller = Controller::new(ControllerConfig::new(w.config()), w.lanes())
        .with_prober(Arc::new(ScriptedProber::default()));
    let mut events = controller.subscribe();
    let (_nodes_tx, nodes_rx) = watch::channel(w.nodes.clone());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let run = tokio::spawn(controller.run(nodes_rx, shutdown_rx));
    let mut seen = Vec::new();
    let failed = next_pass(&mut events, Duration::from_secs(5), |_| true, &mut seen).await;
    assert!(failed.retryable());
    let throttled_at = Instant::now();
    // Let a few retries fail, then lift the throttle: a retry (not the 30 s resync) converges.
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.sim.update_faults(|f| f.throttled.clear());
    let ok = next_pass(
        &mut events,
        Duration::from_secs(20),
        |p| p.routes.converged(),
        &mut seen,
    )
    .await;
    assert_eq!(ok.routes.applied.len(), 18);
    assert!(!ok.full, "converged by a retry, not by the periodic resync");
    assert!(Instant::now() - throttled_at < Duration::from_secs(30));
    assert!(
        seen.len() >= 3,
        "retried with backoff: {} passes",
        seen.len()
    );
    shutdown_tx.send(true).unwrap();
    run.await.unwrap();
}

/// Nodes that join a running controller: one prober round's transitions are taken into one pass (not one pass
/// each, ahead of everything else), a node joining meanwhile is planned in the next pass, and a capped pass
/// reports the nodes its covering routes deliver before the rest of the diff lands.
#[tokio::test(start_paused = true)]
async fn joins_coalesce_and_capped_passes_report_routed_nodes_early() {
    let mut w = mk_world(33, 12, 50);
    let mut routed_cfg = w.config();
    routed_cfg.max_ops_per_pass = Some(4);
    let cfg = ControllerConfig::new(routed_cfg);
    let (nodes_tx, nodes_rx) = watch::channel(Vec::new());
    let prober = Arc::new(ScriptedProber::default());
    let controller = Controller::new(cfg, w.lanes()).with_prober(prober);
    let mut events = controller.subscribe();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let run = tokio::spawn(controller.run(nodes_rx, shutdown_rx));
    let mut seen = Vec::new();
    next_pass(&mut events, Duration::from_secs(5), |_| true, &mut seen).await;

    // Twelve nodes join at once (pending); after their join pass, the next probe round finds all twelve healthy
    // together. Every EC2 call then takes a second, so the pass those transitions start is still running when a
    // thirteenth node joins.
    nodes_tx.send_replace(w.nodes.clone());
    next_pass(
        &mut events,
        Duration::from_secs(5),
        |p| p.routes.plan.as_ref().is_some_and(|p| p.blocks.len() == 12),
        &mut seen,
    )
    .await;
    w.sim
        .update_faults(|f| f.latency = Latency::Fixed(Duration::from_secs(1)));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("no transition in time")
            .unwrap();
        if matches!(ev, ControllerEvent::Health(_)) {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let late = w.add_node();
    nodes_tx.send_replace(w.nodes.clone());
    let mut passes_without = 0;
    let mut early: Option<Arc<PassReport>> = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("the late node was never planned")
            .unwrap();
        let ControllerEvent::Pass(p) = ev else {
            continue;
        };
        let planned = p
            .routes
            .plan
            .as_ref()
            .is_some_and(|plan| plan.block_of(&late.name).is_some());
        if planned {
            break;
        }
        passes_without += 1;
        if !p.routes.deferred.is_empty() && early.is_none() {
            early = Some(p);
        }
    }
    // Only the pass already running when the node joined: the round's other transitions went into that pass
    // (one pass per transition, each ahead of the node set, would be twelve).
    assert!(
        passes_without <= 1,
        "{passes_without} passes ran before the joining node was planned"
    );

    w.sim.update_faults(|f| f.latency = Latency::None);
    // Converge in capped passes; some pass that still deferred calls already reported every node routed.
    let mut all_routed_early = false;
    let done = next_pass(
        &mut events,
        Duration::from_secs(120),
        |p| {
            let routed = p.routes.routed_nodes().unwrap_or_default();
            if !p.routes.deferred.is_empty() && routed.len() == w.nodes.len() {
                all_routed_early = true;
            }
            p.routes.deferred.is_empty() && p.routes.converged() && p.routes.applied.is_empty()
        },
        &mut seen,
    )
    .await;
    assert!(
        seen.iter().all(|p| p.routes.applied.len() <= 4),
        "a pass made more route calls than its cap"
    );
    assert!(
        all_routed_early,
        "no capped pass reported the nodes routed before the diff was done"
    );
    assert_eq!(done.routes.routed_nodes().unwrap().len(), w.nodes.len());
    check_covered(&w, done.routes.plan.as_ref().unwrap(), &w.all_healthy());
    let _ = early;
    shutdown_tx.send_replace(true);
    run.await.unwrap();
}

/// A confirmed failure sends its ReplaceRoute calls at once, planned from the last pass's observation: with
/// DescribeRouteTables taking 1 s and ReplaceRoute 200 ms (virtual), the route changes 200 ms after the failure
/// is confirmed, and a normal pass that describes follows. With the observation's maximum age at zero the
/// failover pass describes first (1.2 s).
async fn replace_after_confirmation(max_age: Duration) -> Duration {
    let w = mk_world(23, 12, 50);
    let mut routed = w.config();
    routed.failover_observation_max_age = max_age;
    let cfg = ControllerConfig::new(routed);
    let prober = Arc::new(ScriptedProber::default());
    let controller = Controller::new(cfg, w.lanes()).with_prober(prober.clone());
    let mut events = controller.subscribe();
    let (_nodes_tx, nodes_rx) = watch::channel(w.nodes.clone());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let run = tokio::spawn(controller.run(nodes_rx, shutdown_rx));
    let mut seen = Vec::new();
    let first = next_pass(&mut events, Duration::from_secs(5), |_| true, &mut seen).await;
    assert!(first.routes.converged());
    assert!(!first.routes.observed_from_cache);

    w.sim.update_faults(|f| {
        f.op_latency.insert(
            Operation::DescribeRouteTables,
            Latency::Fixed(Duration::from_secs(1)),
        );
        f.op_latency.insert(
            Operation::ReplaceRoute,
            Latency::Fixed(Duration::from_millis(200)),
        );
    });
    let mut changes = w.sim.subscribe();
    let victim = w.nodes[5].clone();
    prober.down.lock().unwrap().insert(victim.name.clone());
    // The failure's transition, then the route change.
    let confirmed = loop {
        match tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("no failure")
            .unwrap()
        {
            ControllerEvent::Health(t) if t.is_failure() => break Instant::now(),
            _ => {}
        }
    };
    let change = tokio::time::timeout(Duration::from_secs(5), changes.recv())
        .await
        .expect("no route change")
        .unwrap();
    let took = change.at.unwrap() - confirmed;
    let failover = next_pass(
        &mut events,
        Duration::from_secs(5),
        |p| p.routes.priority == Priority::Failover,
        &mut seen,
    )
    .await;
    assert_eq!(
        failover.routes.observed_from_cache,
        max_age > Duration::ZERO
    );
    assert!(
        failover.routes.applied.iter().all(
            |a| matches!(&a.op, RouteOp::Replace { previous, .. } if *previous == victim.eni.0)
        )
    );
    if max_age > Duration::ZERO {
        // The pass that follows describes, finds the tables as the failover left them, and changes nothing.
        let after = next_pass(&mut events, Duration::from_secs(5), |_| true, &mut seen).await;
        assert_eq!(after.routes.priority, Priority::Normal);
        assert!(!after.routes.observed_from_cache);
        assert!(
            after.routes.applied.is_empty(),
            "{:?}",
            after.routes.planned
        );
    }
    shutdown_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("run loop did not stop")
        .unwrap();
    took
}

#[tokio::test(start_paused = true)]
async fn a_confirmed_failure_replaces_at_once_from_the_last_observation() {
    let took = replace_after_confirmation(Duration::from_secs(60)).await;
    assert!(
        (Duration::from_millis(200)..Duration::from_millis(250)).contains(&took),
        "route changed {took:?} after the failure was confirmed"
    );
    let took = replace_after_confirmation(Duration::ZERO).await;
    assert!(
        took >= Duration::from_millis(1200),
        "without the observation the pass describes first: {took:?}"
    );
}
