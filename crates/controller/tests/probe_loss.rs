//! No flapping: forwarders that lose 1 % of their probes — every 100th, or at random with a seeded generator —
//! over a long simulated period move no route, at the controller's default probing (50 ms, 6 misses to fail,
//! 30 s hold-down). The run loop runs against vpcsim on tokio's paused clock with an in-process prober, so an
//! hour of probing takes seconds and nothing depends on wall time. A forwarder that dies afterwards is still
//! failed over within the detection bound, so the harness can see a failure when there is one.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::mk_world;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use underlay_cloud::Operation;
use underlay_controller::{Controller, ControllerConfig, ControllerEvent, ProbeTarget, Prober};
use underlay_core::health::Probe;

/// How a node loses probes: given its probe count so far, whether this one is lost.
type Loss = Box<dyn Fn(&str, u64) -> bool + Send + Sync>;

/// An in-process prober: each node's probes are lost as `loss` says; nodes in `dead` lose every probe.
struct LossyProber {
    loss: Mutex<Loss>,
    sent: Mutex<BTreeMap<String, u64>>,
    lost: AtomicU64,
    dead: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for LossyProber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LossyProber").finish_non_exhaustive()
    }
}

impl LossyProber {
    fn new(loss: Loss) -> Self {
        Self {
            loss: Mutex::new(loss),
            sent: Mutex::new(BTreeMap::new()),
            lost: AtomicU64::new(0),
            dead: Mutex::new(BTreeSet::new()),
        }
    }
}

#[async_trait::async_trait]
impl Prober for LossyProber {
    async fn probe(&self, t: &ProbeTarget) -> Probe {
        let k = {
            let mut sent = self.sent.lock().unwrap();
            let k = sent.entry(t.node.clone()).or_default();
            *k += 1;
            *k
        };
        if self.dead.lock().unwrap().contains(&t.node) {
            return Probe::Miss;
        }
        if (self.loss.lock().unwrap())(&t.node, k) {
            self.lost.fetch_add(1, Ordering::Relaxed);
            return Probe::Miss;
        }
        Probe::Success
    }
}

#[derive(Debug, Default)]
struct Seen {
    failures: Vec<String>,
    passes_with_calls: usize,
}

/// Counts health failures and passes that changed a route, as they come.
fn watch_events(mut rx: broadcast::Receiver<ControllerEvent>) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(ControllerEvent::Health(t)) if t.is_failure() => {
                    s.lock().unwrap().failures.push(t.node.clone())
                }
                Ok(ControllerEvent::Pass(p)) if !p.routes.applied.is_empty() => {
                    s.lock().unwrap().passes_with_calls += 1
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    panic!("missed {n} controller events")
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    seen
}

fn route_calls(w: &common::World) -> u64 {
    let c = w.sim.counters();
    [
        Operation::CreateRoute,
        Operation::ReplaceRoute,
        Operation::DeleteRoute,
    ]
    .into_iter()
    .map(|op| c.calls.get(&op).copied().unwrap_or(0))
    .sum()
}

/// Converge, probe for `period` with every forwarder losing probes as `loss` says, then kill one forwarder.
async fn no_route_moves_under(loss: Loss, period: Duration) {
    let w = mk_world(31, 12, 50);
    let cfg = ControllerConfig::new(w.config());
    let (interval, misses) = (cfg.probe.interval, cfg.health.misses_to_fail);
    assert_eq!(
        interval,
        Duration::from_millis(50),
        "the defaults are what this test holds"
    );
    assert_eq!(misses, 6);
    let prober = Arc::new(LossyProber::new(Box::new(|_, _| false)));
    let controller = Controller::new(cfg, w.lanes()).with_prober(prober.clone());
    let tracker = controller.tracker();
    let seen = watch_events(controller.subscribe());
    let (_nodes_tx, nodes_rx) = watch::channel(w.nodes.clone());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let run = tokio::spawn(controller.run(nodes_rx, shutdown_rx));

    // Converge with lossless probes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        seen.lock().unwrap().passes_with_calls,
        1,
        "the first pass creates every route, and nothing more"
    );
    let calls = route_calls(&w);
    let sent_before: u64 = prober.sent.lock().unwrap().values().sum();

    // The long lossy period.
    *prober.loss.lock().unwrap() = loss;
    tokio::time::sleep(period).await;
    let sent: u64 = prober.sent.lock().unwrap().values().sum::<u64>() - sent_before;
    let lost = prober.lost.load(Ordering::Relaxed);
    eprintln!("{sent} probes, {lost} lost over {period:?} of virtual time");
    // Every one of the 12 forwarders was probed every interval, and about 1 % of the probes were lost.
    let rounds = period.as_millis() as u64 / interval.as_millis() as u64;
    assert!(
        sent >= 12 * rounds * 99 / 100,
        "{sent} probes for {rounds} rounds"
    );
    assert!(
        (sent / 120..=sent / 80).contains(&lost),
        "{lost} of {sent} probes lost: not about 1 %"
    );
    {
        let seen = seen.lock().unwrap();
        assert!(seen.failures.is_empty(), "failed: {:?}", seen.failures);
        assert_eq!(seen.passes_with_calls, 1, "a route moved");
    }
    assert_eq!(
        route_calls(&w),
        calls,
        "route calls while no forwarder died"
    );
    assert_eq!(tracker.lock().unwrap().healthy().len(), 12);

    // The same harness sees a real death: failed within (misses + 1) intervals, its route replaced.
    let victim = w.nodes[3].name.clone();
    prober.dead.lock().unwrap().insert(victim.clone());
    let killed = Instant::now();
    while seen.lock().unwrap().failures.is_empty() {
        assert!(
            killed.elapsed() <= interval * (misses + 1),
            "a dead forwarder was not failed in time"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(seen.lock().unwrap().failures, vec![victim]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        route_calls(&w) > calls,
        "no route moved off the dead forwarder"
    );

    shutdown_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("run loop did not stop")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn every_hundredth_probe_lost_for_an_hour_moves_no_route() {
    // Each forwarder loses its every 100th probe, the forwarders out of phase with each other.
    let phase: BTreeMap<String, u64> = (0..12).map(|i| (format!("node-{i:02}"), i * 7)).collect();
    no_route_moves_under(
        Box::new(move |node, k| (k + phase.get(node).copied().unwrap_or(0)) % 100 == 0),
        Duration::from_secs(3600),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn one_percent_random_probe_loss_for_an_hour_moves_no_route() {
    // Independent 1 % loss per probe, from a seeded generator (the same draws on every run).
    let rng = Mutex::new(StdRng::seed_from_u64(0x1055));
    no_route_moves_under(
        Box::new(move |_, _| rng.lock().unwrap().random_bool(0.01)),
        Duration::from_secs(3600),
    )
    .await;
}
