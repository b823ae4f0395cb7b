//! The routed-mode planner against its guarantees: validity (every block reachable by longest-prefix match from
//! every table through a healthy forwarder of its own subnet, no overlap, route count within budget), balance,
//! stability and churn bounds, plus the figures the project promises at 40 and 5,000 nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use proptest::prelude::*;
use underlay_core::planner::{PlanError, PlanMode, RoutedPlan, plan};
use underlay_core::routeops::{
    self, ObservedRoute, ObservedTable, RouteOp, churn, diff, diff_plans,
};
use underlay_core::topology::{Node, SynthSpec, Topology, synthesise};

// ───────────────────────────── checks ─────────────────────────────

fn lpm(plan: &RoutedPlan, addr: Ipv4Addr) -> Option<&underlay_core::planner::VpcRoute> {
    plan.routes
        .iter()
        .filter(|r| r.destination.contains(&addr))
        .max_by_key(|r| r.destination.prefix_len())
}

/// Everything a valid plan must satisfy, checked independently of the planner's own bookkeeping.
fn check_valid(topo: &Topology, plan: &RoutedPlan) {
    let nodes: BTreeMap<&str, &Node> = topo.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let pod = topo.cluster.pod_cidr.trunc();
    // One block per node, the right size, inside the pod CIDR, no overlap.
    assert_eq!(plan.blocks.len(), topo.nodes.len(), "one block per node");
    let mut seen = BTreeSet::new();
    for b in &plan.blocks {
        assert!(
            nodes.contains_key(b.node.as_str()),
            "block for unknown node {}",
            b.node
        );
        assert_eq!(b.block.prefix_len(), topo.cluster.block_prefix_len);
        assert!(pod.contains(&b.block), "{} outside {}", b.block, pod);
        assert!(
            seen.insert(b.block.network()),
            "block {} assigned twice",
            b.block
        );
        assert_eq!(nodes[b.node.as_str()].subnet, b.subnet);
    }
    // Route count and shape.
    assert_eq!(plan.routes_per_table as usize, plan.routes.len());
    assert!(
        plan.routes_per_table <= plan.budget,
        "{} routes > budget {}",
        plan.routes_per_table,
        plan.budget
    );
    let dests: BTreeSet<Ipv4Net> = plan.routes.iter().map(|r| r.destination).collect();
    assert_eq!(
        dests.len(),
        plan.routes.len(),
        "duplicate route destinations"
    );
    for r in &plan.routes {
        assert!(
            underlay_core::owned::in_pod_cidr(r.destination, pod),
            "route {} outside pod CIDR",
            r.destination
        );
        if let Some(f) = &r.forwarder {
            let n = nodes[f.as_str()];
            assert!(
                n.healthy,
                "route {} forwarded by unhealthy {}",
                r.destination, f
            );
            assert_eq!(
                n.subnet, r.subnet,
                "route {} forwarded from another subnet",
                r.destination
            );
            assert_eq!(r.eni.as_deref(), Some(n.eni.as_str()));
        }
        // A home is a node of the route's subnet that is still failed (a healthy home takes its route back).
        if let Some(h) = &r.home {
            let n = nodes
                .get(h.as_str())
                .unwrap_or_else(|| panic!("route {} homed on unknown node {h}", r.destination));
            assert_eq!(
                n.subnet, r.subnet,
                "route {} homed in another subnet",
                r.destination
            );
            assert!(
                !n.healthy,
                "route {} not back on its healthy home {h}",
                r.destination
            );
            assert_ne!(r.forwarder.as_deref(), Some(h.as_str()));
        }
    }
    // Reachability: each block's longest-prefix match belongs to its subnet and targets a healthy node there.
    let healthy_in: BTreeSet<&str> = topo
        .nodes
        .iter()
        .filter(|n| n.healthy)
        .map(|n| n.subnet.as_str())
        .collect();
    let mut load: BTreeMap<Ipv4Net, u32> = BTreeMap::new();
    for b in &plan.blocks {
        let r = lpm(plan, b.block.network())
            .unwrap_or_else(|| panic!("block {} of {} has no route", b.block, b.node));
        // The whole block matches the same route (no more specific route splits it).
        assert!(r.destination.contains(&b.block.broadcast()));
        assert!(r.destination.prefix_len() <= b.block.prefix_len());
        assert_eq!(
            r.subnet, b.subnet,
            "block {} of {} routed into subnet {}",
            b.block, b.node, r.subnet
        );
        assert_eq!(b.route, Some(r.destination));
        if healthy_in.contains(b.subnet.as_str()) {
            let f = r
                .forwarder
                .as_deref()
                .unwrap_or_else(|| panic!("route {} has no forwarder", r.destination));
            assert_eq!(b.via.as_deref(), Some(f));
            assert_eq!(b.extra_hop, f != b.node);
        }
        *load.entry(r.destination).or_insert(0) += 1;
    }
    let mut per_fwd: BTreeMap<&str, u32> = BTreeMap::new();
    for r in &plan.routes {
        assert_eq!(
            r.nodes,
            load.get(&r.destination).copied().unwrap_or(0),
            "load of {}",
            r.destination
        );
        assert!(r.nodes > 0, "route {} carries nothing", r.destination);
        if let Some(f) = &r.forwarder {
            *per_fwd.entry(f).or_insert(0) += r.nodes;
        }
    }
    assert_eq!(
        plan.max_nodes_per_forwarder,
        per_fwd.values().copied().max().unwrap_or(0)
    );
    // Identical in every managed table: applying the diff to empty tables creates the same set everywhere.
    let tables: Vec<ObservedTable> = topo
        .vpc
        .route_tables
        .iter()
        .map(|t| ObservedTable {
            id: t.id.clone(),
            route_limit: t.route_limit,
            routes: vec![],
        })
        .collect();
    let ops = diff(plan, &tables);
    for t in &tables {
        let created: BTreeSet<Ipv4Net> = ops
            .iter()
            .filter(|o| o.route_table() == t.id && matches!(o, RouteOp::Create { .. }))
            .map(|o| o.destination())
            .collect();
        let routable: BTreeSet<Ipv4Net> = plan
            .routes
            .iter()
            .filter(|r| r.eni.is_some())
            .map(|r| r.destination)
            .collect();
        assert_eq!(created, routable, "table {}", t.id);
    }
    // Peer routes: every other node of the same subnet, via its IP.
    if let Some(b) = plan.blocks.first() {
        let peers = plan.peer_routes(&b.node);
        let expect = plan
            .blocks
            .iter()
            .filter(|x| x.subnet == b.subnet && x.node != b.node)
            .count();
        assert_eq!(peers.len(), expect);
        for p in peers {
            assert_eq!(nodes[p.peer.as_str()].ip, p.via);
            assert_eq!(nodes[p.peer.as_str()].subnet, b.subnet);
        }
    }
}

/// From-scratch balance: with every node healthy, no forwarder carries more than ⌈subnet nodes ÷ subnet routes⌉.
fn check_balanced(plan: &RoutedPlan) {
    for s in &plan.subnets {
        if s.nodes > 0 && s.healthy_nodes == s.nodes {
            assert!(
                s.max_nodes_per_forwarder <= s.nodes.div_ceil(s.routes),
                "subnet {}: {} per forwarder > ⌈{}/{}⌉",
                s.id,
                s.max_nodes_per_forwarder,
                s.nodes,
                s.routes
            );
        }
    }
}

fn blocks(plan: &RoutedPlan) -> BTreeMap<String, Ipv4Net> {
    plan.blocks
        .iter()
        .map(|b| (b.node.clone(), b.block))
        .collect()
}

fn assert_blocks_kept(before: &RoutedPlan, after: &RoutedPlan) {
    let a = blocks(after);
    for (n, b) in blocks(before) {
        if let Some(x) = a.get(&n) {
            assert_eq!(*x, b, "block of {n} moved");
        }
    }
}

fn routes_targeting(plan: &RoutedPlan, node: &str) -> BTreeSet<Ipv4Net> {
    plan.routes
        .iter()
        .filter(|r| r.forwarder.as_deref() == Some(node))
        .map(|r| r.destination)
        .collect()
}

fn forwarders(plan: &RoutedPlan) -> BTreeMap<Ipv4Net, Option<String>> {
    plan.routes
        .iter()
        .map(|r| (r.destination, r.forwarder.clone()))
        .collect()
}

fn homes(plan: &RoutedPlan) -> BTreeMap<Ipv4Net, String> {
    plan.routes
        .iter()
        .filter_map(|r| Some((r.destination, r.home.clone()?)))
        .collect()
}

fn set_healthy(topo: &mut Topology, node: &str, healthy: bool) {
    topo.nodes
        .iter_mut()
        .find(|n| n.id == node)
        .unwrap_or_else(|| panic!("no node {node}"))
        .healthy = healthy;
}

// ───────────────────────────── builders ─────────────────────────────

fn mk_topology(nodes: usize, zones: usize, spz: usize, limit: u32) -> Topology {
    synthesise(&SynthSpec::new(nodes, zones, spz, limit)).unwrap()
}

/// A node for subnet `subnet` that does not exist yet in `topo`.
fn mk_joiner(topo: &Topology, subnet: &str, tag: usize) -> Node {
    let s = topo.vpc.subnets.iter().find(|s| s.id == subnet).unwrap();
    let used: BTreeSet<Ipv4Addr> = topo.nodes.iter().map(|n| n.ip).collect();
    let ip = (10u32..)
        .map(|k| Ipv4Addr::from(u32::from(s.cidr.network()) + k))
        .find(|ip| !used.contains(ip))
        .unwrap();
    Node {
        id: format!("join-{tag:05}"),
        subnet: subnet.into(),
        ip,
        eni: format!("eni-j{tag:05}"),
        healthy: true,
    }
}

// ───────────────────────────── the promised figures ─────────────────────────────

#[test]
fn five_thousand_nodes_three_zones_fifty_routes() {
    let topo = mk_topology(5000, 3, 2, 50);
    let p = plan(&topo, None).unwrap();
    check_valid(&topo, &p);
    check_balanced(&p);
    assert!(p.routes_per_table + p.foreign_routes <= 50);
    assert_eq!(p.routes_per_table, p.budget, "the whole budget is used");
    assert_eq!(p.mode, PlanMode::Aggregated);
    // 6 subnets × 8 routes for 834 or 833 nodes each: ⌈834 / 8⌉ = 105.
    assert_eq!(p.max_nodes_per_forwarder, 105);
    let fwds: BTreeSet<&str> = p
        .routes
        .iter()
        .filter_map(|r| r.forwarder.as_deref())
        .collect();
    assert_eq!(fwds.len(), p.routes.len(), "distinct forwarders");
    assert!(
        p.routes.iter().all(|r| r.forwarder_inside),
        "every forwarder carries its own block"
    );
}

#[test]
fn forty_nodes_one_route_each_no_extra_hop() {
    let topo = mk_topology(40, 3, 2, 50);
    let p = plan(&topo, None).unwrap();
    check_valid(&topo, &p);
    assert_eq!(p.routes_per_table, 40);
    assert_eq!(p.extra_hop_fraction, 0.0);
    assert_eq!(p.mode, PlanMode::PerNode);
    assert_eq!(p.max_nodes_per_forwarder, 1);
}

#[test]
fn join_at_five_thousand_changes_at_most_two_routes() {
    let mut topo = mk_topology(5000, 3, 2, 50);
    let before = plan(&topo, None).unwrap();
    for (i, subnet) in ["subnet-a1", "subnet-b2", "subnet-c1"].iter().enumerate() {
        let mut t = topo.clone();
        t.nodes.push(mk_joiner(&t, subnet, i));
        let after = plan(&t, Some(&before)).unwrap();
        check_valid(&t, &after);
        check_balanced(&after);
        assert_blocks_kept(&before, &after);
        let c = churn(&diff_plans(&before, &after));
        assert!(c.total() <= 2, "join into {subnet}: {c:?}");
    }
    // Many joins in a row, each planned from the last: each costs at most two route changes.
    let mut prev = before;
    for i in 0..200 {
        let subnet = topo.vpc.subnets[i % 6].id.clone();
        let n = mk_joiner(&topo, &subnet, 100 + i);
        topo.nodes.push(n);
        let next = plan(&topo, Some(&prev)).unwrap();
        let c = churn(&diff_plans(&prev, &next));
        assert!(c.total() <= 2, "join {i}: {c:?}");
        assert_blocks_kept(&prev, &next);
        prev = next;
    }
    check_valid(&topo, &prev);
    check_balanced(&prev);
}

#[test]
fn forwarder_failure_moves_only_its_routes() {
    let topo = mk_topology(5000, 3, 2, 50);
    let before = plan(&topo, None).unwrap();
    let victim = before.routes[7].forwarder.clone().unwrap();
    let moved = routes_targeting(&before, &victim);
    let mut t = topo.clone();
    t.nodes.iter_mut().find(|n| n.id == victim).unwrap().healthy = false;
    let after = plan(&t, Some(&before)).unwrap();
    check_valid(&t, &after);
    assert_blocks_kept(&before, &after);
    let ops = diff_plans(&before, &after);
    let c = churn(&ops);
    assert_eq!(c.created + c.deleted, 0, "{ops:?}");
    let changed: BTreeSet<Ipv4Net> = ops.iter().map(|o| o.destination()).collect();
    assert_eq!(changed, moved);
    for r in &after.routes {
        let b = before
            .routes
            .iter()
            .find(|x| x.destination == r.destination)
            .unwrap();
        assert_eq!(r.forwarder != b.forwarder, moved.contains(&r.destination));
    }
}

/// An aggregated cluster (200 nodes, 18 routes of budget) and the forwarder of its first shared route.
fn aggregated_with_victim() -> (Topology, RoutedPlan, String) {
    let topo = mk_topology(200, 3, 2, 20);
    let before = plan(&topo, None).unwrap();
    assert_eq!(before.mode, PlanMode::Aggregated);
    let victim = before
        .routes
        .iter()
        .find(|r| r.nodes > 1)
        .and_then(|r| r.forwarder.clone())
        .unwrap();
    (topo, before, victim)
}

#[test]
fn failed_forwarder_gets_exactly_its_routes_back_when_healthy_again() {
    let (topo, before, victim) = aggregated_with_victim();
    let targeted = routes_targeting(&before, &victim);
    assert!(!targeted.is_empty());

    // Failure: only the victim's routes move, each remembering the victim as its home.
    let mut failed = topo.clone();
    set_healthy(&mut failed, &victim, false);
    let pf = plan(&failed, Some(&before)).unwrap();
    check_valid(&failed, &pf);
    let ops = diff_plans(&before, &pf);
    assert!(
        ops.iter().all(|o| matches!(o, RouteOp::Replace { .. })),
        "{ops:?}"
    );
    let changed: BTreeSet<Ipv4Net> = ops.iter().map(|o| o.destination()).collect();
    assert_eq!(changed, targeted);
    let homed: BTreeMap<Ipv4Net, String> = targeted.iter().map(|d| (*d, victim.clone())).collect();
    assert_eq!(homes(&pf), homed);
    // Still failed (a flapping node stays failed through the tracker's hold-down): nothing moves.
    let still = plan(&failed, Some(&pf)).unwrap();
    assert_eq!(still, pf);

    // Recovery: exactly those routes return, by Replace, and the plan is the one before the failure.
    let pr = plan(&topo, Some(&pf)).unwrap();
    check_valid(&topo, &pr);
    let ops = diff_plans(&pf, &pr);
    assert!(
        ops.iter().all(|o| matches!(o, RouteOp::Replace { .. })),
        "{ops:?}"
    );
    let back: BTreeSet<Ipv4Net> = ops.iter().map(|o| o.destination()).collect();
    assert_eq!(back, targeted);
    assert_eq!(routes_targeting(&pr, &victim), targeted);
    assert_eq!(forwarders(&pr), forwarders(&before));
    assert!(homes(&pr).is_empty());
    assert_eq!(pr.routes, before.routes);

    // Planning the recovered state again changes nothing.
    let again = plan(&topo, Some(&pr)).unwrap();
    assert!(diff_plans(&pr, &again).is_empty());
    assert_eq!(again, pr);
}

#[test]
fn routes_return_to_their_first_home_when_the_replacement_also_failed() {
    let (topo, before, a) = aggregated_with_victim();
    let a_routes = routes_targeting(&before, &a);
    let mut t = topo.clone();
    set_healthy(&mut t, &a, false);
    let p1 = plan(&t, Some(&before)).unwrap();
    check_valid(&t, &p1);
    let moved = *a_routes.first().unwrap();
    let b = p1
        .routes
        .iter()
        .find(|r| r.destination == moved)
        .and_then(|r| r.forwarder.clone())
        .unwrap();
    assert_ne!(a, b);
    let b_routes = routes_targeting(&p1, &b);
    let b_own = routes_targeting(&before, &b);

    // The replacement fails too: its routes move again; those from A keep A as home, B's own ones get home B.
    set_healthy(&mut t, &b, false);
    let p2 = plan(&t, Some(&p1)).unwrap();
    check_valid(&t, &p2);
    let changed: BTreeSet<Ipv4Net> = diff_plans(&p1, &p2)
        .iter()
        .map(|o| o.destination())
        .collect();
    assert_eq!(changed, b_routes);
    for r in &p2.routes {
        let want = if a_routes.contains(&r.destination) {
            Some(a.as_str())
        } else if b_own.contains(&r.destination) {
            Some(b.as_str())
        } else {
            None
        };
        assert_eq!(r.home.as_deref(), want, "home of {}", r.destination);
    }

    // A recovers first: exactly A's routes go back to A; B's stay moved (B is still failed).
    set_healthy(&mut t, &a, true);
    let p3 = plan(&t, Some(&p2)).unwrap();
    check_valid(&t, &p3);
    let back: BTreeSet<Ipv4Net> = diff_plans(&p2, &p3)
        .iter()
        .map(|o| o.destination())
        .collect();
    assert_eq!(back, a_routes);
    assert_eq!(routes_targeting(&p3, &a), a_routes);
    let homed_b: BTreeMap<Ipv4Net, String> = b_own.iter().map(|d| (*d, b.clone())).collect();
    assert_eq!(homes(&p3), homed_b);

    // Then B: the plan is the one before both failures, and stable.
    set_healthy(&mut t, &b, true);
    let p4 = plan(&t, Some(&p3)).unwrap();
    check_valid(&t, &p4);
    let back: BTreeSet<Ipv4Net> = diff_plans(&p3, &p4)
        .iter()
        .map(|o| o.destination())
        .collect();
    assert_eq!(back, b_own);
    assert_eq!(p4.routes, before.routes);
    assert!(diff_plans(&p4, &plan(&t, Some(&p4)).unwrap()).is_empty());
}

#[test]
fn a_home_that_leaves_the_cluster_is_forgotten() {
    let (topo, before, victim) = aggregated_with_victim();
    let targeted = routes_targeting(&before, &victim);
    let mut t = topo.clone();
    set_healthy(&mut t, &victim, false);
    let pf = plan(&t, Some(&before)).unwrap();
    assert_eq!(homes(&pf).len(), targeted.len());
    // The failed node is removed: its routes stay on their replacements, with no home left.
    t.nodes.retain(|n| n.id != victim);
    let pl = plan(&t, Some(&pf)).unwrap();
    check_valid(&t, &pl);
    assert!(homes(&pl).is_empty(), "{:?}", homes(&pl));
    for d in &targeted {
        let fwd = |p: &RoutedPlan| {
            p.routes
                .iter()
                .find(|r| r.destination == *d)
                .map(|r| r.forwarder.clone())
        };
        if let Some(now) = fwd(&pl) {
            assert_eq!(
                now,
                fwd(&pf).unwrap(),
                "route {d} moved although only its home left"
            );
        }
    }
    // A new node with the same name later is not a home either.
    let mut back = t.clone();
    let mut n = topo.nodes.iter().find(|n| n.id == victim).unwrap().clone();
    n.healthy = true;
    back.nodes.push(n);
    let pb = plan(&back, Some(&pl)).unwrap();
    check_valid(&back, &pb);
    let returned: BTreeSet<Ipv4Net> = routes_targeting(&pb, &victim)
        .intersection(&targeted)
        .copied()
        .collect();
    assert!(returned.is_empty(), "{returned:?}");
}

#[test]
fn home_is_optional_in_plan_json() {
    let (topo, before, victim) = aggregated_with_victim();
    let mut t = topo.clone();
    set_healthy(&mut t, &victim, false);
    let pf = plan(&t, Some(&before)).unwrap();
    // Written only where set.
    let json = serde_json::to_value(&pf).unwrap();
    let routes = json["routes"].as_array().unwrap();
    let with_home = routes.iter().filter(|r| r.get("home").is_some()).count();
    assert_eq!(with_home, homes(&pf).len());
    assert!(with_home > 0);
    assert_eq!(
        serde_json::from_value::<RoutedPlan>(json.clone()).unwrap(),
        pf
    );
    // A plan written before homes existed (no `home` field) still loads, with no home.
    let mut old = json;
    for r in old["routes"].as_array_mut().unwrap() {
        r.as_object_mut().unwrap().remove("home");
    }
    let loaded: RoutedPlan = serde_json::from_value(old).unwrap();
    assert!(homes(&loaded).is_empty());
    assert_eq!(forwarders(&loaded), forwarders(&pf));
    // Planned from such a plan, the moved routes stay where they are (stability without the home).
    let pr = plan(&topo, Some(&loaded)).unwrap();
    check_valid(&topo, &pr);
    assert!(diff_plans(&loaded, &pr).is_empty());
}

#[test]
fn leave_at_five_thousand_replaces_only_the_leavers_routes() {
    let topo = mk_topology(5000, 3, 2, 50);
    let before = plan(&topo, None).unwrap();
    for victim in [
        before.routes[3].forwarder.clone().unwrap(),
        "node-2500".to_string(),
    ] {
        let mut t = topo.clone();
        t.nodes.retain(|n| n.id != victim);
        let after = plan(&t, Some(&before)).unwrap();
        check_valid(&t, &after);
        assert_blocks_kept(&before, &after);
        let c = churn(&diff_plans(&before, &after));
        assert_eq!(
            c.total() as usize,
            routes_targeting(&before, &victim).len(),
            "{victim}: {c:?}"
        );
    }
}

#[test]
fn planning_a_state_to_itself_changes_nothing() {
    for (n, limit) in [(5000, 50), (40, 50), (51, 50), (0, 50), (7, 5)] {
        let topo = mk_topology(n, 3, 2, limit);
        let Ok(p) = plan(&topo, None) else { continue };
        let again = plan(&topo, Some(&p)).unwrap();
        assert_eq!(again, p, "{n} nodes, limit {limit}");
    }
}

#[test]
fn growing_past_the_budget_and_back() {
    // 48 routes of budget (limit 50 − 1 foreign − headroom 1). Grow one node at a time from 40 to 60, then shrink.
    let full = mk_topology(60, 3, 2, 50);
    let mut topo = full.clone();
    topo.nodes.truncate(40);
    let mut prev = plan(&topo, None).unwrap();
    for k in 41..=60 {
        topo.nodes = full.nodes[..k].to_vec();
        let next = plan(&topo, Some(&prev)).unwrap();
        check_valid(&topo, &next);
        assert_blocks_kept(&prev, &next);
        let c = churn(&diff_plans(&prev, &next));
        assert!(c.total() <= 2, "{k} nodes: {c:?}");
        if k <= 48 {
            assert_eq!(next.extra_hop_fraction, 0.0, "{k} nodes fit the budget");
        }
        prev = next;
    }
    for k in (30..60).rev() {
        topo.nodes = full.nodes[..k].to_vec();
        let next = plan(&topo, Some(&prev)).unwrap();
        check_valid(&topo, &next);
        assert_blocks_kept(&prev, &next);
        if k <= 48 {
            assert_eq!(
                next.extra_hop_fraction, 0.0,
                "{k} nodes fit the budget again"
            );
            assert_eq!(next.mode, PlanMode::PerNode);
        }
        prev = next;
    }
}

#[test]
fn errors_say_what_does_not_fit() {
    let mut t = mk_topology(12, 3, 2, 50);
    t.cluster.pod_cidr = "100.64.0.0/24".parse().unwrap();
    let e = plan(&t, None).unwrap_err();
    assert!(matches!(e, PlanError::PodCidrTooSmall { .. }));
    assert_eq!(
        e.to_string(),
        "pod CIDR 100.64.0.0/24 holds 4 /26 blocks but 12 nodes need blocks"
    );

    let t = mk_topology(12, 3, 2, 4);
    let e = plan(&t, None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "budget 2 < 6 subnets with nodes: every subnet needs at least one route"
    );

    let t = mk_topology(12, 3, 2, 2);
    let e = plan(&t, None).unwrap_err();
    assert!(matches!(e, PlanError::NoBudget { .. }), "{e}");

    let mut t = mk_topology(12, 3, 2, 50);
    t.cluster.pod_cidr = "198.18.0.0/16".parse().unwrap();
    assert!(matches!(
        plan(&t, None),
        Err(PlanError::PodCidrOverlapsSubnet { .. })
    ));

    // 60 blocks fit a /20 of /26 (64 blocks), but 48 routes over 6 subnets need aligned groups with room.
    let mut t = mk_topology(60, 3, 2, 50);
    t.cluster.pod_cidr = "100.64.0.0/20".parse().unwrap();
    match plan(&t, None) {
        Ok(p) => check_valid(&t, &p),
        Err(e) => assert!(matches!(e, PlanError::PodCidrFragmented { .. }), "{e}"),
    }
}

#[test]
fn subnet_without_healthy_node_is_reported_and_left_alone() {
    let topo = mk_topology(60, 3, 2, 50);
    let before = plan(&topo, None).unwrap();
    let mut t = topo.clone();
    for n in t.nodes.iter_mut().filter(|n| n.subnet == "subnet-b1") {
        n.healthy = false;
    }
    let after = plan(&t, Some(&before)).unwrap();
    check_valid(&t, &after);
    assert!(
        after
            .warnings
            .iter()
            .any(|w| w.to_string().contains("subnet-b1: no healthy node"))
    );
    let ops = diff_plans(&before, &after);
    assert!(
        ops.is_empty(),
        "routes of a dead subnet are left as they are: {ops:?}"
    );
}

#[test]
fn diff_touches_only_owned_routes_and_respects_the_limit() {
    let other_cluster: Ipv4Net = "100.127.254.0/24".parse().unwrap();
    let mut topo = mk_topology(5000, 3, 2, 50);
    for t in &mut topo.vpc.route_tables {
        for (d, target) in [
            ("0.0.0.0/0", "nat-a"),
            ("100.0.0.0/8", "tgw-1"),
            ("100.127.254.0/24", "eni-other-cluster"),
        ] {
            t.foreign_routes
                .push(underlay_core::topology::ForeignRoute {
                    destination: d.parse().unwrap(),
                    target: target.into(),
                });
        }
    }
    let p = plan(&topo, None).unwrap();
    let table = ObservedTable {
        id: "rtb-a".into(),
        route_limit: 50,
        routes: vec![
            ObservedRoute {
                destination: "0.0.0.0/0".parse().unwrap(),
                target: "nat-a".into(),
            },
            ObservedRoute {
                destination: "100.0.0.0/8".parse().unwrap(),
                target: "tgw-1".into(),
            },
            ObservedRoute {
                destination: "100.64.0.0/26".parse().unwrap(),
                target: "eni-stale".into(),
            },
            ObservedRoute {
                destination: "100.127.255.0/24".parse().unwrap(),
                target: "eni-gone".into(),
            },
            // Inside the pod CIDR, to an ENI that is not the cluster's: foreign.
            ObservedRoute {
                destination: other_cluster,
                target: "eni-other-cluster".into(),
            },
        ],
    };
    // eni-stale and eni-gone were the cluster's (nodes that left); eni-other-cluster never was.
    let mut ownership = routeops::plan_ownership(&p);
    ownership
        .cluster_enis
        .extend(["eni-stale".to_string(), "eni-gone".to_string()]);
    let ops = routeops::diff_owned(&p, std::slice::from_ref(&table), &ownership);
    assert!(
        ops.iter()
            .all(|o| underlay_core::owned::in_pod_cidr(o.destination(), p.pod_cidr))
    );
    assert!(
        ops.iter()
            .all(|o| !other_cluster.contains(&o.destination())),
        "an op on or inside a foreign route: {ops:?}"
    );
    // The plan alone does not own the stale routes: without proof they are left alone.
    let unproven = diff(&p, std::slice::from_ref(&table));
    assert!(
        unproven
            .iter()
            .all(|o| !matches!(o, RouteOp::Delete { previous, .. } | RouteOp::Replace { previous, .. } if previous.starts_with("eni-stale") || previous.starts_with("eni-gone"))),
        "{unproven:?}"
    );
    // Apply and check the limit is never exceeded and the result is the plan.
    let mut state: BTreeMap<Ipv4Net, String> = table
        .routes
        .iter()
        .map(|r| (r.destination, r.target.clone()))
        .collect();
    for op in &ops {
        match op {
            RouteOp::Create {
                destination, eni, ..
            }
            | RouteOp::Replace {
                destination, eni, ..
            } => {
                state.insert(*destination, eni.clone());
            }
            RouteOp::Delete { destination, .. } => {
                state.remove(destination);
            }
        }
        assert!(state.len() <= 50, "limit exceeded after {op}");
    }
    assert_eq!(
        state.get(&other_cluster).map(String::as_str),
        Some("eni-other-cluster")
    );
    let ours: BTreeMap<Ipv4Net, String> = state
        .into_iter()
        .filter(|(d, t)| ownership.owns(*d, t))
        .collect();
    let want: BTreeMap<Ipv4Net, String> = p
        .routes
        .iter()
        .filter(|r| !other_cluster.contains(&r.destination))
        .map(|r| (r.destination, r.eni.clone().unwrap()))
        .collect();
    assert_eq!(ours, want);
}

#[test]
fn foreign_destinations_inside_the_pod_cidr_are_never_handed_out() {
    use underlay_core::topology::ForeignRoute;
    let foreign: Vec<(Ipv4Net, &str)> = vec![
        ("100.64.3.0/24".parse().unwrap(), "tgw-1"),
        ("100.64.0.64/26".parse().unwrap(), "eni-other-cluster"),
        ("100.96.0.0/16".parse().unwrap(), "local"),
        ("100.65.0.8/29".parse().unwrap(), "pcx-1"),
    ];
    let overlaps = |p: &RoutedPlan| {
        p.blocks
            .iter()
            .filter(|b| {
                foreign
                    .iter()
                    .any(|(f, _)| f.contains(&b.block) || b.block.contains(f))
            })
            .map(|b| b.block)
            .collect::<Vec<_>>()
    };
    let mut topo = mk_topology(300, 3, 2, 50);
    for (d, t) in &foreign {
        topo.vpc.route_tables[0].foreign_routes.push(ForeignRoute {
            destination: *d,
            target: (*t).into(),
        });
    }
    // From scratch.
    let fresh = plan(&topo, None).unwrap();
    check_valid(&topo, &fresh);
    assert_eq!(overlaps(&fresh), Vec::<Ipv4Net>::new());
    // Joins over a previous plan.
    let mut t = topo.clone();
    t.nodes.truncate(100);
    let mut prev = plan(&t, None).unwrap();
    for n in (100..300).step_by(20) {
        let mut t = topo.clone();
        t.nodes.truncate(n + 20);
        let next = plan(&t, Some(&prev)).unwrap();
        check_valid(&t, &next);
        assert_eq!(overlaps(&next), Vec::<Ipv4Net>::new(), "after {n} nodes");
        assert_blocks_kept(&prev, &next);
        prev = next;
    }
    // A foreign route appears over blocks already given: those blocks (only) move off it.
    let bare = mk_topology(300, 3, 2, 50);
    let before = plan(&bare, None).unwrap();
    let covered = before.blocks[0].block;
    let mut t = bare.clone();
    t.vpc.route_tables[0].foreign_routes.push(ForeignRoute {
        destination: covered,
        target: "tgw-9".into(),
    });
    let after = plan(&t, Some(&before)).unwrap();
    check_valid(&t, &after);
    assert!(after.blocks.iter().all(|b| b.block != covered));
    let moved = before
        .blocks
        .iter()
        .filter(|b| after.block_of(&b.node) != Some(b.block))
        .count();
    assert_eq!(moved, 1);
    assert!(after.routes.iter().all(|r| r.destination != covered));
}

// ───────────────────────────── properties ─────────────────────────────

#[derive(Debug, Clone)]
struct Shape {
    zones: usize,
    spz: usize,
    nodes: usize,
    limit: u32,
    foreign: u32,
    headroom: u32,
    pod_len: u8,
    unhealthy: Vec<usize>,
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        1usize..=3,
        1usize..=3,
        0usize..=260,
        2u32..=70,
        0u32..=2,
        0u32..=2,
        prop_oneof![Just(16u8), Just(18), Just(14)],
    )
        .prop_flat_map(|(zones, spz, nodes, limit, foreign, headroom, pod_len)| {
            (proptest::collection::vec(0..nodes.max(1), 0..=(nodes / 10)),).prop_map(
                move |(unhealthy,)| Shape {
                    zones,
                    spz,
                    nodes,
                    limit,
                    foreign,
                    headroom,
                    pod_len,
                    unhealthy,
                },
            )
        })
}

fn build(s: &Shape) -> Topology {
    let mut spec = SynthSpec::new(s.nodes, s.zones, s.spz, s.limit);
    spec.foreign_routes = s.foreign;
    spec.headroom = s.headroom;
    spec.pod_cidr = Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), s.pod_len).unwrap();
    let mut t = synthesise(&spec).unwrap();
    for &i in &s.unhealthy {
        if let Some(n) = t.nodes.get_mut(i) {
            n.healthy = false;
        }
    }
    t
}

/// Plans from scratch; `None` when the planner rightly refused (and checks that the refusal was right).
fn plan_or_expected_error(t: &Topology) -> Option<RoutedPlan> {
    match plan(t, None) {
        Ok(p) => Some(p),
        Err(PlanError::BudgetTooSmall { budget, subnets }) => {
            assert!((budget as usize) < subnets);
            None
        }
        Err(PlanError::NoBudget { .. }) => {
            let r = &t.vpc.route_tables[0];
            assert!(r.route_limit <= r.foreign_routes.len() as u32 + t.cluster.headroom);
            None
        }
        Err(PlanError::PodCidrTooSmall { blocks, nodes, .. }) => {
            assert!(nodes as u64 > blocks);
            None
        }
        Err(PlanError::PodCidrFragmented { .. }) => None,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn from_scratch_plans_are_valid_balanced_and_stable(s in shape()) {
        let t = build(&s);
        let Some(p) = plan_or_expected_error(&t) else { return Ok(()) };
        check_valid(&t, &p);
        check_balanced(&p);
        if t.nodes.len() as u32 <= p.budget {
            prop_assert_eq!(p.routes_per_table as usize, t.nodes.len());
            prop_assert_eq!(p.mode, PlanMode::PerNode);
            let extra_healthy = p.blocks.iter().filter(|b| b.extra_hop && b.healthy).count();
            prop_assert_eq!(extra_healthy, 0);
        } else {
            prop_assert_eq!(p.routes_per_table, p.budget, "aggregated plans use the whole budget");
        }
        let again = plan(&t, Some(&p)).unwrap();
        prop_assert_eq!(&again, &p);
        prop_assert!(diff_plans(&p, &again).is_empty());
    }

    #[test]
    fn join_leave_and_failure_churn_is_bounded(s in shape(), pick in any::<prop::sample::Index>(), sub in any::<prop::sample::Index>()) {
        let t = build(&s);
        let Some(p) = plan_or_expected_error(&t) else { return Ok(()) };
        // Join.
        let mut tj = t.clone();
        let subnet = tj.vpc.subnets[sub.index(tj.vpc.subnets.len())].id.clone();
        tj.nodes.push(mk_joiner(&tj, &subnet, 1));
        if let Ok(pj) = plan(&tj, Some(&p)) {
            check_valid(&tj, &pj);
            assert_blocks_kept(&p, &pj);
            let c = churn(&diff_plans(&p, &pj));
            // With the budget full, a node no route of its subnet can take within the balanced bound (nor by
            // growing into an empty buddy) gets its own route by merging two others: 3–4 changes. A subnet's first
            // node is one such case; a subnet whose routes are all full at the bound is another.
            let first_in_subnet = !t.nodes.iter().any(|n| n.subnet == subnet);
            if p.routes_per_table == p.budget {
                prop_assert!(c.total() <= 4, "join with the budget full: {:?}", c);
            } else {
                prop_assert!(c.total() <= 2, "join: {:?}", c);
            }
            // Balance: never worse than before and never above the balanced share for the joined subnet's forwarders.
            let sb = pj.subnets.iter().find(|x| x.id == subnet).unwrap();
            let before = p.subnets.iter().find(|x| x.id == subnet).unwrap();
            if sb.healthy_nodes == sb.nodes && !first_in_subnet {
                prop_assert!(sb.max_nodes_per_forwarder <= before.max_nodes_per_forwarder.max(sb.nodes.div_ceil(sb.routes)));
            }
        }
        if t.nodes.is_empty() {
            return Ok(());
        }
        let victim = t.nodes[pick.index(t.nodes.len())].id.clone();
        let targeted = routes_targeting(&p, &victim);
        // Leave.
        let mut tl = t.clone();
        tl.nodes.retain(|n| n.id != victim);
        let pl = plan(&tl, Some(&p)).unwrap();
        check_valid(&tl, &pl);
        assert_blocks_kept(&p, &pl);
        let ops = diff_plans(&p, &pl);
        let c = churn(&ops);
        // The leaver's routes get a new forwarder, a route left empty goes; once the cluster fits the budget again,
        // nodes that shared the leaver's route get their own (one more create each).
        let shared = p.blocks.iter().find(|b| b.node == victim).and_then(|b| b.route);
        let sharing = p.routes.iter().find(|r| Some(r.destination) == shared).map_or(0, |r| r.nodes);
        let back_to_per_node = (tl.nodes.len() as u32) <= p.budget && p.mode == PlanMode::Aggregated;
        if !back_to_per_node {
            prop_assert!(c.total() as usize <= targeted.len() + 1, "leave {}: {:?} {:?}", victim, c, ops);
        } else {
            prop_assert!(c.total() as usize <= targeted.len() + sharing as usize + t.nodes.len(), "leave: {:?}", c);
        }
        // Failure.
        let mut tf = t.clone();
        let was_healthy = {
            let n = tf.nodes.iter_mut().find(|n| n.id == victim).unwrap();
            std::mem::replace(&mut n.healthy, false)
        };
        let pf = plan(&tf, Some(&p)).unwrap();
        check_valid(&tf, &pf);
        prop_assert_eq!(blocks(&p), blocks(&pf));
        let ops = diff_plans(&p, &pf);
        let changed: BTreeSet<Ipv4Net> = ops.iter().map(|o| o.destination()).collect();
        prop_assert!(ops.iter().all(|o| matches!(o, RouteOp::Replace { .. })), "{:?}", ops);
        prop_assert!(changed.is_subset(&targeted), "failure of {} moved {:?}, it targeted {:?}", victim, changed, targeted);
        if was_healthy {
            // The routes moved off the victim remember it as their home.
            for r in &pf.routes {
                let homed = r.home.as_deref() == Some(victim.as_str());
                prop_assert_eq!(homed, targeted.contains(&r.destination), "home of {}", r.destination);
            }
            // Recovery: plan with the node healthy again, from the failed-over plan. Exactly the routes that moved
            // off it come back, and nothing else moves: the forwarders are those before the failure.
            let pr = plan(&t, Some(&pf)).unwrap();
            check_valid(&t, &pr);
            let back: BTreeSet<Ipv4Net> = diff_plans(&pf, &pr).iter().map(|o| o.destination()).collect();
            prop_assert!(back.is_subset(&targeted));
            prop_assert_eq!(routes_targeting(&pr, &victim), targeted.clone());
            prop_assert_eq!(forwarders(&pr), forwarders(&p));
            prop_assert!(pr.routes.iter().all(|r| r.home.is_none()));
            let again = plan(&t, Some(&pr)).unwrap();
            prop_assert!(diff_plans(&pr, &again).is_empty());
            prop_assert_eq!(&again.routes, &pr.routes);
        }
    }

    #[test]
    fn churn_sequences_stay_valid(s in shape(), steps in proptest::collection::vec((0u8..4, any::<prop::sample::Index>()), 1..12)) {
        let mut t = build(&s);
        let Some(mut p) = plan_or_expected_error(&t) else { return Ok(()) };
        let mut joined = 0;
        for (kind, idx) in steps {
            let mut next = t.clone();
            match kind {
                0 => {
                    let subnet = next.vpc.subnets[idx.index(next.vpc.subnets.len())].id.clone();
                    joined += 1;
                    next.nodes.push(mk_joiner(&next, &subnet, joined));
                }
                1 if !next.nodes.is_empty() => { let i = idx.index(next.nodes.len()); next.nodes.remove(i); }
                2 if !next.nodes.is_empty() => { let i = idx.index(next.nodes.len()); next.nodes[i].healthy = false; }
                3 if !next.nodes.is_empty() => { let i = idx.index(next.nodes.len()); next.nodes[i].healthy = true; }
                _ => continue,
            }
            match plan(&next, Some(&p)) {
                Ok(np) => {
                    check_valid(&next, &np);
                    assert_blocks_kept(&p, &np);
                    let again = plan(&next, Some(&np)).unwrap();
                    prop_assert!(diff_plans(&np, &again).is_empty());
                    prop_assert_eq!(blocks(&np), blocks(&again));
                    t = next;
                    p = np;
                }
                Err(PlanError::BudgetTooSmall { .. } | PlanError::RegionFull { .. }) => {}
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
    }
}
