//! `eni` mode under faults: the controller killed at random points of provisioning and restarted (with nothing
//! but EC2 to go on), instances terminated mid-attach, EC2 errors and throttling injected. Every test ends with
//! no leaked ENI, no address held twice, and every live node's pool within its targets (a quiet pass).

mod eni_common;

use std::sync::Arc;
use std::time::Duration;

use eni_common::*;
use underlay_cloud::queue::{QueueConfig, RateLimitedCloud, RetryPolicy};
use underlay_cloud::{Cloud, Operation, RateLimits};
use underlay_controller::eni::{EniReconciler, EniSettings};
use underlay_core::eni_pool::Targets;
use underlay_vpcsim::{ErrorRate, Latency, VpcSim};

/// xorshift64*: the tests' own seeded draws.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const JITTER: Duration = Duration::from_millis(800);

fn slow_world(seed: u64) -> EniWorld {
    let w = mk_world(seed, Some(RateLimits::aws_default()));
    w.sim.update_faults(|f| {
        f.latency = Latency::Uniform {
            min: Duration::from_millis(50),
            max: Duration::from_millis(400),
        }
    });
    w
}

/// A controller process: the reconciler over its own rate-aware queue (paced below vpcsim's buckets).
fn controller(sim: &Arc<VpcSim>, settings: EniSettings) -> EniReconciler {
    let queue = RateLimitedCloud::new(
        VpcSim::clone(sim),
        QueueConfig {
            limits: RateLimits::aws_default().less_headroom(JITTER),
            share: 1.0,
            retry: RetryPolicy::default(),
        },
    );
    EniReconciler::new(Arc::new(queue), settings)
}

fn settings(targets: Targets) -> EniSettings {
    EniSettings {
        targets,
        gc_grace: Duration::from_secs(20),
        release_delay: Duration::from_secs(10),
        ..EniSettings::new(CLUSTER)
    }
}

#[tokio::test(start_paused = true)]
async fn killed_at_random_points_and_restarted_twenty_five_times() {
    for seed in [11u64, 12] {
        let mut w = slow_world(seed);
        w.add_nodes(4, "m5.large");
        let targets = Targets {
            minimum_ip_target: Some(20),
            warm_ip_target: Some(2),
            ..Targets::default()
        };
        let mut draw = Draw(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut kills = 0;
        let mut caught_between_create_and_attach = 0;
        for round in 0..25 {
            // Nodes join (each needs two ENIs created and attached), sometimes one leaves, and pods come and
            // go, so every restarted controller finds work to do.
            w.add_nodes(1 + draw.below(2) as usize, "m5.large");
            if draw.below(3) == 0 {
                let victim = draw.below(w.nodes.len() as u64) as usize;
                w.terminate(victim);
            }
            let n = draw.below(w.nodes.len() as u64) as usize;
            let k = draw.below(26) as usize;
            use_addresses(&mut w, n, k);
            let r = controller(&w.sim, settings(targets));
            let nodes = w.nodes.clone();
            let task = tokio::spawn(async move { r.pass(&nodes).await });
            let kill_after = Duration::from_millis(draw.below(1500));
            tokio::time::sleep(kill_after).await;
            if !task.is_finished() {
                kills += 1;
            }
            task.abort();
            let _ = task.await;
            assert_no_duplicates_mid_run(&w, round);
            caught_between_create_and_attach += available_cluster_enis(&w);
        }
        assert!(kills >= 20, "only {kills} of 25 passes were killed mid-way");
        assert!(
            caught_between_create_and_attach > 0,
            "no kill landed between a create and its attach"
        );
        let r = controller(&w.sim, settings(targets));
        converge(&r, &mut w.nodes, 30).await;
        assert_no_leaks_and_no_duplicates(&w.sim);
        // Nothing but the nodes' ENIs: at most three per live node.
        let snap = w.sim.snapshot();
        assert!(
            snap.enis.len() <= 3 * w.nodes.len(),
            "{} ENIs for {} nodes",
            snap.enis.len(),
            w.nodes.len()
        );
    }
}

fn available_cluster_enis(w: &EniWorld) -> usize {
    w.sim
        .snapshot()
        .enis
        .iter()
        .filter(|e| {
            e.status == underlay_cloud::EniStatus::Available
                && e.tags
                    .get(underlay_core::names::TAG_CLUSTER)
                    .map(String::as_str)
                    == Some(CLUSTER)
        })
        .count()
}

/// Mid-run, an ENI may sit between create and attach; only addresses must never be doubled.
fn assert_no_duplicates_mid_run(w: &EniWorld, round: usize) {
    let snap = w.sim.snapshot();
    let mut seen = std::collections::BTreeSet::new();
    for e in &snap.enis {
        for a in std::iter::once(e.primary_ip).chain(e.secondary_ips.iter().copied()) {
            assert!(seen.insert(a), "round {round}: {a} held twice");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn instances_terminated_mid_attach_leave_no_eni_behind() {
    let mut left_for_the_collector = 0;
    for seed in 21u64..27 {
        let mut w = slow_world(seed);
        w.add_nodes(8, "m5.large");
        let r = controller(
            &w.sim,
            settings(Targets {
                fill_at_join: true,
                ..Targets::default()
            }),
        );
        let r = Arc::new(r);
        let nodes = w.nodes.clone();
        let pass = {
            let r = Arc::clone(&r);
            tokio::spawn(async move { r.pass(&nodes).await })
        };
        let mut draw = Draw(seed | 1);
        // Terminate two nodes at random moments while their ENIs are being created and attached.
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(200 + draw.below(2500))).await;
            let victim = draw.below(w.nodes.len() as u64) as usize;
            w.terminate(victim);
        }
        let report = pass.await.unwrap();
        assert_eq!(report.nodes.len(), 8);
        left_for_the_collector += available_cluster_enis(&w);
        converge(&r, &mut w.nodes, 20).await;
        assert_no_leaks_and_no_duplicates(&w.sim);
    }
    assert!(
        left_for_the_collector > 0,
        "no termination left an ENI behind: the collector was never exercised"
    );
}

#[tokio::test(start_paused = true)]
async fn injected_errors_and_throttling_then_recovery() {
    let mut w = slow_world(31);
    w.add_nodes(10, "m5.large");
    w.sim.update_faults(|f| {
        for (op, code, p) in [
            (Operation::CreateNetworkInterface, "InternalError", 0.3),
            (Operation::AttachNetworkInterface, "InternalError", 0.3),
            (
                Operation::ModifyNetworkInterfaceAttribute,
                "InternalError",
                0.2,
            ),
            (
                Operation::AssignPrivateIpAddresses,
                "RequestLimitExceeded",
                0.3,
            ),
            (
                Operation::DescribeNetworkInterfaces,
                "ServiceUnavailable",
                0.2,
            ),
            (Operation::DescribeInstances, "RequestLimitExceeded", 0.3),
        ] {
            f.error_rates.insert(
                op,
                ErrorRate {
                    probability: p,
                    code: code.to_owned(),
                },
            );
        }
        f.fail_next.insert(
            Operation::AssignPrivateIpAddresses,
            ["InsufficientFreeAddressesInSubnet".to_owned()].into(),
        );
    });
    let targets = Targets {
        minimum_ip_target: Some(15),
        warm_ip_target: Some(3),
        ..Targets::default()
    };
    let r = controller(&w.sim, settings(targets));
    let mut draw = Draw(31);
    let mut failed_ops = 0;
    for _ in 0..12 {
        let n = draw.below(w.nodes.len() as u64) as usize;
        let k = draw.below(25) as usize;
        use_addresses(&mut w, n, k);
        let report = r.pass(&w.nodes).await;
        failed_ops += report.nodes.iter().filter(|n| !n.applied).count();
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    assert!(
        failed_ops > 0,
        "the injected errors never reached the controller"
    );
    assert!(w.sim.counters().total_throttled() > 0);
    w.sim.update_faults(|f| {
        f.error_rates.clear();
    });
    converge(&r, &mut w.nodes, 20).await;
    assert_no_leaks_and_no_duplicates(&w.sim);
    // The throttled describes and assigns were retried by the queue, not surfaced as failures only.
    assert!(w.sim.describe_vpc(&w.vpc).await.is_ok());
}

/// The ModifyNetworkInterfaceAttribute that sets DeleteOnTermination after an attach fails once: the ENI is
/// attached without it (it would outlive its instance) until the next pass sets it again.
#[tokio::test(start_paused = true)]
async fn a_failed_delete_on_termination_is_set_again_by_the_next_pass() {
    let mut w = mk_world(41, None);
    w.add_nodes(1, "m5.large");
    // Five pods: the warm ENI target asks for a second ENI.
    w.nodes[0].used = underlay_core::eni_pool::Used::Count(5);
    let r = controller(&w.sim, settings(Targets::default()));
    let dot = || -> Vec<(underlay_cloud::EniId, bool)> {
        w.sim
            .snapshot()
            .enis
            .iter()
            .filter_map(|e| {
                let a = e.attachment.as_ref()?;
                (a.device_index != 0).then(|| (e.id.clone(), a.delete_on_termination))
            })
            .collect()
    };
    let modifies = || {
        w.sim
            .counters()
            .calls_of(Operation::ModifyNetworkInterfaceAttribute)
    };
    // Half of a non-idempotent pair: the queue does not retry it.
    w.sim
        .fail_next(Operation::ModifyNetworkInterfaceAttribute, "InternalError");
    let first = r.pass(&w.nodes).await;
    assert!(
        first.nodes[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("InternalError")),
        "{:?}",
        first.nodes[0]
    );
    let attached = dot();
    assert_eq!(attached.len(), 1);
    let (eni, set) = attached[0].clone();
    assert!(!set, "the failed modify set DeleteOnTermination");
    assert_eq!(modifies(), 1);

    let second = r.pass(&w.nodes).await;
    let n = &second.nodes[0];
    assert_eq!(n.repairs, vec![eni.clone()]);
    assert!(n.applied && n.error.is_none() && !n.converged(), "{n:?}");
    assert_eq!(dot(), vec![(eni.clone(), true)]);
    assert_eq!(modifies(), 2, "one call repairs it");
    let third = r.pass(&w.nodes).await;
    assert!(third.quiet(), "{third:?}");
    assert_eq!(modifies(), 2);
    assert_no_leaks_and_no_duplicates(&w.sim);

    // The ENI goes with its instance: nothing is left for the collector.
    w.terminate(0);
    assert!(
        w.sim.snapshot().enis.iter().all(|e| e.id != eni),
        "the ENI outlived its instance"
    );
    assert_eq!(available_cluster_enis(&w), 0);
}
