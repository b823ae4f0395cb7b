//! Ownership by proof on vpcsim: routes inside the pod CIDR that are not this cluster's (another cluster's with the
//! same pod CIDR, a transit gateway's, a VPC secondary CIDR's `local`) stay untouched through 1,000 passes with
//! node churn and failovers; a second cluster with the same pod CIDR in the same VPC refuses to start.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{mk_world, net};
use ipnet::Ipv4Net;
use underlay_cloud::{RouteTableId, RouteTarget};
use underlay_controller::{ClusterNode, Priority, ReconcileError, RouteReconciler};
use underlay_core::routeops::RouteOp;
use underlay_vpcsim::RunInstance;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }
}

/// One cluster on the shared VPC: its nodes, its reconciler, every ENI it ever had.
struct Cluster {
    name: &'static str,
    nodes: Vec<ClusterNode>,
    reconciler: RouteReconciler,
    ever: BTreeSet<String>,
    next: usize,
}

impl Cluster {
    fn launch(&mut self, w: &common::World) {
        let subnet = w.subnets[self.next % w.subnets.len()].clone();
        let inst = w
            .sim
            .run_instance(RunInstance::new("m5.large", &subnet))
            .unwrap();
        let eni = inst.primary_eni().unwrap().id.clone();
        self.ever.insert(eni.0.clone());
        self.nodes.push(ClusterNode {
            name: format!("{}-{:03}", self.name, self.next),
            subnet,
            ip: inst.private_ip,
            eni,
        });
        self.next += 1;
    }
}

/// Every route of every managed table (`local` ones included), by (table, destination).
fn snapshot(w: &common::World) -> BTreeMap<(RouteTableId, Ipv4Net), RouteTarget> {
    w.tables
        .iter()
        .flat_map(|t| {
            w.table(t)
                .routes
                .into_iter()
                .map(|r| ((t.clone(), r.destination), r.target))
        })
        .collect()
}

fn target_of(r: &RouteTarget) -> String {
    match r {
        RouteTarget::NetworkInterface(e) => e.0.clone(),
        RouteTarget::Gateway(g) => g.clone(),
        RouteTarget::Instance(i) => i.0.clone(),
        RouteTarget::Local => "local".into(),
    }
}

#[tokio::test(start_paused = true)]
async fn foreign_routes_inside_the_pod_cidr_survive_a_thousand_passes_of_churn_and_failover() {
    let w = mk_world(14, 0, 100);
    // Foreign routes inside the pod CIDR (100.64.0.0/16): a transit gateway's and a secondary CIDR's `local` (in
    // every table, as EC2 adds it) from the start; later, another cluster's route to a live ENI.
    let tgw = w.sim.create_transit_gateway(&w.vpc).unwrap();
    let tgw_dest = net("100.64.40.0/24");
    for t in &w.tables {
        w.sim
            .add_route(t, tgw_dest, &RouteTarget::Gateway(tgw.clone()))
            .unwrap();
    }
    let secondary = net("100.64.128.0/20");
    w.sim.associate_vpc_cidr_block(&w.vpc, secondary).unwrap();
    let mut a = Cluster {
        name: "a",
        nodes: vec![],
        reconciler: RouteReconciler::new(w.config(), w.lanes()),
        ever: BTreeSet::new(),
        next: 0,
    };
    for _ in 0..9 {
        a.launch(&w);
    }
    // The other cluster's node and its route inside the pod CIDR, added at pass 100.
    let mut other = Cluster {
        name: "other",
        nodes: vec![],
        reconciler: RouteReconciler::new(w.config(), w.lanes()),
        ever: BTreeSet::new(),
        next: 0,
    };
    other.launch(&w);
    let other_eni = other.nodes[0].eni.clone();
    let other_dest = net("100.64.1.0/26");

    let foreign = |s: &BTreeMap<(RouteTableId, Ipv4Net), RouteTarget>| {
        s.iter()
            .filter(|((_, d), _)| [tgw_dest, secondary, other_dest].contains(d))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    let fixed_before = foreign(&snapshot(&w));
    assert_eq!(fixed_before.len(), 2 * w.tables.len());

    let mut rng = Rng(0x5eed_0f0a_7e00);
    let (mut failovers, mut churn, mut applied) = (0usize, 0usize, 0usize);
    let mut reported = BTreeSet::new();
    for pass in 0..1000 {
        if pass == 100 {
            for t in &w.tables {
                w.sim
                    .add_route(
                        t,
                        other_dest,
                        &RouteTarget::NetworkInterface(other_eni.clone()),
                    )
                    .unwrap();
            }
        }
        // Churn: a node leaves (its instance stays: a Node deleted in Kubernetes) or one joins.
        match rng.below(10) {
            0 if a.nodes.len() > 4 => {
                let i = rng.below(a.nodes.len());
                a.nodes.remove(i);
                churn += 1;
            }
            1 if a.nodes.len() < 16 => {
                a.launch(&w);
                churn += 1;
            }
            _ => {}
        }
        // Failover: now and then one node fails its probes.
        let mut healthy: BTreeSet<String> = a.nodes.iter().map(|n| n.name.clone()).collect();
        let priority = if rng.below(5) == 0 {
            let victim = a.nodes[rng.below(a.nodes.len())].name.clone();
            healthy.remove(&victim);
            failovers += 1;
            Priority::Failover
        } else {
            Priority::Normal
        };
        // A controller's passes are seconds apart: EC2's buckets refill in between.
        tokio::time::advance(std::time::Duration::from_secs(5)).await;
        let before = snapshot(&w);
        let rep = a.reconciler.reconcile(&a.nodes, &healthy, priority).await;
        assert!(rep.errors.is_empty(), "pass {pass}: {:?}", rep.errors);
        let after = snapshot(&w);
        applied += rep.applied.len();
        // Nothing the cluster cannot prove its own was changed: every route that did not target one of its ENIs
        // (the other cluster's, the gateway's, `local`, outside the pod CIDR) is exactly as it was.
        for (k, v) in &before {
            if !a.ever.contains(&target_of(v)) {
                assert_eq!(after.get(k), Some(v), "pass {pass}: {k:?} changed");
            }
        }
        for op in &rep.applied {
            if let RouteOp::Replace { previous, .. } | RouteOp::Delete { previous, .. } = &op.op {
                assert!(a.ever.contains(previous), "pass {pass}: {}", op.op);
            }
            let d = op.op.destination();
            assert!(
                [tgw_dest, secondary, other_dest]
                    .iter()
                    .all(|f| !f.contains(&d)),
                "pass {pass}: {} on or inside a foreign destination",
                op.op
            );
        }
        reported.extend(rep.foreign_routes.iter().map(|f| f.target.clone()));
        // No block overlaps a foreign destination.
        let plan = a.reconciler.previous().unwrap();
        for blk in &plan.blocks {
            for f in [tgw_dest, secondary]
                .into_iter()
                .chain((pass >= 100).then_some(other_dest))
            {
                assert!(
                    !f.contains(&blk.block) && !blk.block.contains(&f),
                    "pass {pass}: block {} overlaps {f}",
                    blk.block
                );
            }
        }
    }
    let mut fixed_after = fixed_before.clone();
    for t in &w.tables {
        fixed_after.insert(
            (t.clone(), other_dest),
            RouteTarget::NetworkInterface(other_eni.clone()),
        );
    }
    assert_eq!(foreign(&snapshot(&w)), fixed_after);
    assert!(
        failovers > 150 && churn > 100,
        "{failovers} failovers, {churn} churn"
    );
    assert!(applied > 0);
    let want: BTreeSet<String> = [tgw.clone(), "local".to_string(), other_eni.0.clone()].into();
    assert_eq!(reported, want);

    // Converged with everyone healthy: no route is left to a node the cluster no longer has (the memory of the
    // ENIs it routed to cleans up after nodes that left).
    let healthy = a.nodes.iter().map(|n| n.name.clone()).collect();
    for _ in 0..3 {
        let rep = a
            .reconciler
            .reconcile(&a.nodes, &healthy, Priority::Normal)
            .await;
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
    }
    let current: BTreeSet<String> = a.nodes.iter().map(|n| n.eni.0.clone()).collect();
    for ((t, d), r) in snapshot(&w) {
        let target = target_of(&r);
        if a.ever.contains(&target) {
            assert!(current.contains(&target), "{t} {d} → {target} left behind");
        }
    }
    assert_eq!(a.reconciler.previous().unwrap().blocks.len(), a.nodes.len());
}

#[tokio::test(start_paused = true)]
async fn a_second_cluster_with_the_same_pod_cidr_refuses_to_start_naming_the_conflict() {
    let w = mk_world(15, 0, 50);
    let mut a = Cluster {
        name: "a",
        nodes: vec![],
        reconciler: RouteReconciler::new(w.config(), w.lanes()),
        ever: BTreeSet::new(),
        next: 0,
    };
    let mut b = Cluster {
        name: "b",
        nodes: vec![],
        reconciler: RouteReconciler::new(w.config(), w.lanes()),
        ever: BTreeSet::new(),
        next: 0,
    };
    for _ in 0..6 {
        a.launch(&w);
        b.launch(&w);
    }
    let healthy_a = a.nodes.iter().map(|n| n.name.clone()).collect();
    let rep = a
        .reconciler
        .reconcile(&a.nodes, &healthy_a, Priority::Normal)
        .await;
    assert!(rep.converged(), "{:?}", rep.errors);
    let before = snapshot(&w);
    let healthy_b = b.nodes.iter().map(|n| n.name.clone()).collect();
    for _ in 0..5 {
        let rep = b
            .reconciler
            .reconcile(&b.nodes, &healthy_b, Priority::Normal)
            .await;
        assert!(rep.applied.is_empty() && rep.plan.is_none());
        assert!(!rep.errors.is_empty());
        for e in &rep.errors {
            let ReconcileError::PodCidrConflict { target, .. } = e else {
                panic!("{e}");
            };
            assert!(a.ever.contains(target), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains(target) && msg.contains("refusing to start"),
                "{msg}"
            );
        }
    }
    assert_eq!(snapshot(&w), before, "the refused cluster changed a route");
    // The running cluster goes on: another pass changes nothing.
    let rep = a
        .reconciler
        .reconcile(&a.nodes, &healthy_a, Priority::Normal)
        .await;
    assert!(rep.converged() && rep.applied.is_empty(), "{:?}", rep);
}
