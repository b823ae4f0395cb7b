//! The `eni`-mode reconciler against vpcsim: what each setting gives a node, release of excess, custom
//! networking, leaked-ENI collection, restart from EC2 alone.

mod eni_common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use eni_common::*;
use underlay_api::UnderlayNodeStatus;
use underlay_cloud::{
    Cloud, CreateEniRequest, EniFilter, EniStatus, InstanceFilter, Operation, Tags,
};
use underlay_controller::eni::{EniNode, EniReconciler, EniSettings, client_token};
use underlay_core::eni_pool::{AddressMode, Targets, Used};
use underlay_core::names::{TAG_CLUSTER, TAG_NODE};
use underlay_vpcsim::RunInstance;

fn settings() -> EniSettings {
    EniSettings {
        gc_grace: Duration::from_secs(20),
        release_delay: Duration::from_secs(30),
        ..EniSettings::new(CLUSTER)
    }
}

async fn enis_of(w: &EniWorld, node: usize) -> Vec<underlay_cloud::NetworkInterface> {
    let i = w
        .sim
        .describe_instances(&InstanceFilter {
            ids: vec![w.nodes[node].instance.clone()],
            vpc: None,
        })
        .await
        .unwrap();
    i[0].enis.clone()
}

#[tokio::test(start_paused = true)]
async fn default_targets_fill_the_primary_eni_of_each_node() {
    let mut w = mk_world(1, None);
    w.add_nodes(4, "m5.large");
    let r = EniReconciler::new(w.sim.clone(), settings());
    let first = r.pass(&w.nodes).await;
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    for n in &first.nodes {
        assert!(n.applied, "{n:?}");
        assert_eq!(n.pool_size, 9);
        assert_eq!(n.max_pods, 29);
        assert_eq!(n.pool.enis.len(), 1);
        let e = &n.pool.enis[0];
        assert_eq!(e.device_index, 0);
        assert_eq!(e.addresses.len(), 9);
        assert!(e.mac.is_some() && e.subnet_cidr.is_some());
        // The primary ENI's own address is the node IP, and never one of the pod addresses.
        assert_eq!(e.primary_ip, Some(n.node_ip.to_string()));
        assert!(!e.addresses.contains(&n.node_ip.to_string()));
    }
    converge(&r, &mut w.nodes, 3).await;
    // One AssignPrivateIpAddresses per node; no ENI created.
    let c = w.sim.counters();
    assert_eq!(c.calls_of(Operation::AssignPrivateIpAddresses), 4);
    assert_eq!(c.calls_of(Operation::CreateNetworkInterface), 0);
    // Used addresses grow past the warm ENI: a second ENI comes, tagged and deleted on termination.
    w.nodes[0].used = Used::Count(5);
    let report = converge(&r, &mut w.nodes, 5).await;
    let _ = report;
    let enis = enis_of(&w, 0).await;
    assert_eq!(enis.len(), 2);
    let second = enis
        .iter()
        .find(|e| e.attachment.as_ref().unwrap().device_index == 1)
        .unwrap();
    assert_eq!(
        second.tags.get(TAG_CLUSTER).map(String::as_str),
        Some(CLUSTER)
    );
    assert_eq!(
        second.tags.get(TAG_NODE),
        Some(&w.nodes[0].instance.to_string())
    );
    assert!(second.attachment.as_ref().unwrap().delete_on_termination);
    assert_eq!(second.secondary_ips.len(), 9);
    // The pool lists the second ENI with its own primary IP (what the agent puts on its device).
    let pass = r.pass(&w.nodes).await;
    let pooled = pass.nodes[0]
        .pool
        .enis
        .iter()
        .find(|e| e.device_index == 1)
        .unwrap();
    assert_eq!(pass.nodes[0].instance, w.nodes[0].instance);
    assert_eq!(pooled.id, second.id.to_string());
    assert_eq!(pooled.primary_ip, Some(second.primary_ip.to_string()));
    assert!(!pooled.addresses.contains(&second.primary_ip.to_string()));
    assert_no_leaks_and_no_duplicates(&w.sim);
}

#[tokio::test(start_paused = true)]
async fn fill_at_join_takes_every_slot_in_three_calls_per_eni_at_most() {
    let mut w = mk_world(2, None);
    w.add_nodes(3, "m5.large");
    let r = EniReconciler::new(
        w.sim.clone(),
        EniSettings {
            targets: Targets {
                fill_at_join: true,
                ..Targets::default()
            },
            ..settings()
        },
    );
    let first = r.pass(&w.nodes).await;
    for n in &first.nodes {
        assert_eq!(n.pool_size, 27, "{n:?}");
        assert_eq!(n.pool.enis.len(), 3);
    }
    converge(&r, &mut w.nodes, 3).await;
    let c = w.sim.counters();
    assert_eq!(c.calls_of(Operation::CreateNetworkInterface), 6);
    assert_eq!(c.calls_of(Operation::AttachNetworkInterface), 6);
    // Addresses come with the create: one assign per node (the primary ENI) only.
    assert_eq!(c.calls_of(Operation::AssignPrivateIpAddresses), 3);
    assert_no_leaks_and_no_duplicates(&w.sim);
}

#[tokio::test(start_paused = true)]
async fn prefix_delegation_and_max_pods_110() {
    let mut w = mk_world(3, None);
    w.add_nodes(2, "m5.large");
    let r = EniReconciler::new(
        w.sim.clone(),
        EniSettings {
            mode: AddressMode::Prefixes,
            targets: Targets {
                warm_prefix_target: Some(1),
                ..Targets::default()
            },
            ..settings()
        },
    );
    let first = r.pass(&w.nodes).await;
    for n in &first.nodes {
        assert_eq!(n.max_pods, 110);
        assert_eq!(n.pool_size, 16);
        assert_eq!(n.pool.enis[0].prefixes.len(), 1);
    }
    w.nodes[1].used = Used::Count(40);
    converge(&r, &mut w.nodes, 4).await;
    let enis = enis_of(&w, 1).await;
    assert_eq!(enis.iter().map(|e| e.prefixes.len()).sum::<usize>(), 4);
    assert_no_leaks_and_no_duplicates(&w.sim);
}

#[tokio::test(start_paused = true)]
async fn custom_networking_puts_pod_enis_in_the_zone_subnet_with_the_configured_groups() {
    let mut w = mk_world(4, None);
    w.add_nodes(3, "m5.large");
    let sg = w.sim.create_security_group(&w.vpc, Tags::new()).unwrap();
    let r = EniReconciler::new(
        w.sim.clone(),
        EniSettings {
            subnets: w.pod_subnets.clone(),
            security_groups: vec![sg.clone()],
            ..settings()
        },
    );
    let report = converge(&r, &mut w.nodes, 4).await;
    for (i, n) in report.nodes.iter().enumerate() {
        assert_eq!(n.max_pods, 20, "one ENI fewer carries pods");
        assert!(n.pool.enis.iter().all(|e| e.device_index != 0));
        let enis = enis_of(&w, i).await;
        let primary = enis
            .iter()
            .find(|e| e.attachment.as_ref().unwrap().device_index == 0)
            .unwrap();
        assert!(primary.secondary_ips.is_empty());
        let pod = enis
            .iter()
            .find(|e| e.attachment.as_ref().unwrap().device_index == 1)
            .unwrap();
        let zone = ZONES[i % 3];
        assert_eq!(pod.subnet, w.pod_subnets[zone]);
        assert_eq!(pod.security_groups, vec![sg.clone()]);
        assert_eq!(pod.secondary_ips.len(), 9);
    }
    assert_no_leaks_and_no_duplicates(&w.sim);
}

#[tokio::test(start_paused = true)]
async fn excess_is_released_after_the_delay_and_never_a_used_address() {
    let mut w = mk_world(5, None);
    w.add_nodes(1, "m5.large");
    let r = EniReconciler::new(
        w.sim.clone(),
        EniSettings {
            targets: Targets {
                warm_ip_target: Some(3),
                minimum_ip_target: Some(5),
                ..Targets::default()
            },
            ..settings()
        },
    );
    // Twenty pods: the pool grows to 23.
    w.nodes[0].used = Used::Count(20);
    let report = converge(&r, &mut w.nodes, 4).await;
    assert_eq!(report.nodes[0].pool_size, 23);
    // Pods leave; two stay, on addresses of the last ENI.
    let enis = enis_of(&w, 0).await;
    let last = enis
        .iter()
        .max_by_key(|e| e.attachment.as_ref().unwrap().device_index)
        .unwrap();
    let in_use: BTreeSet<Ipv4Addr> = last.secondary_ips.iter().take(2).copied().collect();
    w.nodes[0].used = Used::Known(in_use.clone());
    let before = w
        .sim
        .counters()
        .calls_of(Operation::UnassignPrivateIpAddresses);
    let report = r.pass(&w.nodes).await;
    assert!(
        report.nodes[0].plan.ops.is_empty(),
        "released before the delay"
    );
    tokio::time::sleep(Duration::from_secs(31)).await;
    // Withdraw, unassign, detach the emptied ENI, delete it.
    let report = converge(&r, &mut w.nodes, 6).await;
    assert_eq!(report.nodes[0].pool_size, 5);
    // ENI 1 was emptied (the used addresses are on ENI 2): detached and deleted; the primary stays.
    let left: Vec<u32> = enis_of(&w, 0)
        .await
        .iter()
        .map(|e| e.attachment.as_ref().unwrap().device_index)
        .collect();
    assert_eq!(left, vec![0, 2]);
    let counters = w.sim.counters();
    assert_eq!(counters.calls_of(Operation::DetachNetworkInterface), 1);
    assert_eq!(counters.calls_of(Operation::DeleteNetworkInterface), 1);
    assert!(
        w.sim
            .counters()
            .calls_of(Operation::UnassignPrivateIpAddresses)
            > before
    );
    let still: BTreeSet<Ipv4Addr> = enis_of(&w, 0)
        .await
        .iter()
        .flat_map(|e| e.secondary_ips.clone())
        .collect();
    assert!(in_use.is_subset(&still), "a used address was released");
    assert_no_leaks_and_no_duplicates(&w.sim);
}

/// Two phases, as the UnderlayNode status carries them: a pass withdraws (no EC2 call, the pool lists them as
/// releasing, the generation moves on); nothing is unassigned until the agent reports serving that generation;
/// an address a pod took just before the agent stopped handing it out waits for the pod.
#[tokio::test(start_paused = true)]
async fn withdrawn_addresses_are_unassigned_only_once_the_agent_acknowledges_and_holds_none() {
    let mut w = mk_world(8, None);
    w.add_nodes(1, "m5.large");
    let r = EniReconciler::new(
        w.sim.clone(),
        EniSettings {
            targets: Targets {
                warm_ip_target: Some(3),
                minimum_ip_target: Some(5),
                ..Targets::default()
            },
            ..settings()
        },
    );
    w.nodes[0].used = Used::Count(20);
    converge(&r, &mut w.nodes, 4).await;
    let unassigns = || {
        w.sim
            .counters()
            .calls_of(Operation::UnassignPrivateIpAddresses)
    };
    let before = unassigns();

    // Two pods stay. Past the delay, a pass withdraws 18 addresses and calls nothing.
    let pool: Vec<Ipv4Addr> = enis_of(&w, 0)
        .await
        .iter()
        .flat_map(|e| e.secondary_ips.clone())
        .collect();
    let in_use: BTreeSet<Ipv4Addr> = pool.iter().take(2).copied().collect();
    let held = |set: &BTreeSet<Ipv4Addr>| Some(set.iter().map(ToString::to_string).collect());
    let mut status = UnderlayNodeStatus {
        pool_held: held(&in_use),
        observed_release_generation: Some(0),
        ..UnderlayNodeStatus::default()
    };
    let node = |status: &UnderlayNodeStatus| {
        EniNode::from_status("node-0", w.nodes[0].instance.clone(), Some(status))
    };
    r.pass(&[node(&status)]).await;
    tokio::time::sleep(Duration::from_secs(31)).await;
    let report = r.pass(&[node(&status)]).await;
    let pool_status = report.nodes[0].pool.clone();
    let withdrawn: BTreeSet<String> = pool_status
        .enis
        .iter()
        .flat_map(|e| e.releasing_addresses.clone())
        .collect();
    assert_eq!(withdrawn.len(), 18, "{pool_status:?}");
    assert_eq!(pool_status.release_generation, 1);
    assert_eq!(
        report.nodes[0].pool_size, 5,
        "withdrawn addresses leave the pool size"
    );
    assert!(
        pool_status
            .enis
            .iter()
            .all(|e| e.addresses.iter().all(|a| !withdrawn.contains(a)))
    );
    assert_eq!(unassigns(), before);

    // The status now lists them; the agent still reports generation 0: nothing is unassigned, nothing more
    // withdrawn, the generation stays.
    status.pool = Some(pool_status);
    for _ in 0..2 {
        let report = r.pass(&[node(&status)]).await;
        assert_eq!(unassigns(), before);
        assert_eq!(report.nodes[0].pool, *status.pool.as_ref().unwrap());
    }

    // The agent serves generation 1, but a pod got one withdrawn address just before: all others go.
    let late: Ipv4Addr = withdrawn.iter().next().unwrap().parse().unwrap();
    let mut holding = in_use.clone();
    holding.insert(late);
    status.pool_held = held(&holding);
    status.observed_release_generation = Some(1);
    let report = r.pass(&[node(&status)]).await;
    assert!(unassigns() > before);
    let assigned: BTreeSet<Ipv4Addr> = enis_of(&w, 0)
        .await
        .iter()
        .flat_map(|e| e.secondary_ips.clone())
        .collect();
    assert!(
        holding.is_subset(&assigned),
        "a held address was unassigned"
    );
    assert_eq!(assigned.len(), 5 + 1);
    let still: Vec<String> = report.nodes[0]
        .pool
        .enis
        .iter()
        .flat_map(|e| e.releasing_addresses.clone())
        .collect();
    assert_eq!(still, vec![late.to_string()]);

    // The pod leaves: the last one goes.
    status.pool = Some(report.nodes[0].pool.clone());
    status.pool_held = held(&in_use);
    r.pass(&[node(&status)]).await;
    let assigned: BTreeSet<Ipv4Addr> = enis_of(&w, 0)
        .await
        .iter()
        .flat_map(|e| e.secondary_ips.clone())
        .collect();
    assert_eq!(assigned.len(), 5);
    assert!(!assigned.contains(&late));
    // Emptied ENIs are detached, then deleted by the next pass.
    let mut node0 = node(&status);
    node0.used = Used::Known(in_use.clone());
    converge(&r, &mut [node0], 3).await;
    assert!(w.sim.counters().calls_of(Operation::DetachNetworkInterface) > 0);
    assert_no_leaks_and_no_duplicates(&w.sim);
}

#[tokio::test(start_paused = true)]
async fn leaked_enis_are_collected_after_the_grace_period_and_claimed_ones_attached() {
    let mut w = mk_world(6, None);
    w.add_nodes(2, "m5.large");
    let subnet = w.node_subnets[ZONES[0]].clone();
    let create = |token: &str, node: &str| CreateEniRequest {
        subnet: subnet.clone(),
        security_groups: Vec::new(),
        description: String::new(),
        tags: Tags::from([
            (TAG_CLUSTER.to_owned(), CLUSTER.to_owned()),
            (TAG_NODE.to_owned(), node.to_owned()),
        ]),
        client_token: token.to_owned(),
        secondary_ip_count: 2,
        prefix_count: 0,
    };
    // Leaked by a node long gone, and one left between create and attach for a live node.
    let leaked = w
        .sim
        .create_network_interface(&create("a", "i-gone"))
        .await
        .unwrap();
    let pending = w
        .sim
        .create_network_interface(&create("b", w.nodes[0].instance.as_str()))
        .await
        .unwrap();
    // Another cluster's available ENI is never touched.
    let foreign = w
        .sim
        .create_network_interface(&CreateEniRequest {
            tags: Tags::from([(TAG_CLUSTER.to_owned(), "other".to_owned())]),
            ..create("c", "i-gone")
        })
        .await
        .unwrap();
    let r = EniReconciler::new(w.sim.clone(), settings());
    let first = r.pass(&w.nodes).await;
    assert!(
        first.collected.is_empty(),
        "collected within the grace period"
    );
    let enis = enis_of(&w, 0).await;
    assert!(
        enis.iter().any(|e| e.id == pending.id),
        "the pending ENI was not attached"
    );
    tokio::time::sleep(Duration::from_secs(21)).await;
    let report = r.pass(&w.nodes).await;
    assert_eq!(report.collected, vec![leaked.id.clone()]);
    let left = w
        .sim
        .describe_network_interfaces(&EniFilter {
            status: Some(EniStatus::Available),
            vpc: Some(w.vpc.clone()),
            ..EniFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(
        left.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        vec![foreign.id]
    );
}

#[tokio::test(start_paused = true)]
async fn a_restarted_controller_reuses_the_eni_its_token_made() {
    let mut w = mk_world(7, None);
    let id = w.add_node("m5.large");
    let r = EniReconciler::new(w.sim.clone(), settings());
    // Describes lag ten seconds behind, so the new controller cannot see the ENI and creates it again.
    tokio::time::sleep(Duration::from_secs(20)).await;
    w.sim
        .update_faults(|f| f.describe_delay = Duration::from_secs(10));
    // The first controller created the ENI for device 1 and died before attaching it.
    let token = client_token(CLUSTER, &id, 1, 0);
    let subnet = w.node_subnets[ZONES[0]].clone();
    let sg = w.sim.default_security_group(&w.vpc).unwrap();
    let made = w
        .sim
        .create_network_interface(&CreateEniRequest {
            subnet,
            security_groups: vec![sg],
            description: format!("underlay pods of {id}"),
            tags: Tags::from([
                (TAG_CLUSTER.to_owned(), CLUSTER.to_owned()),
                (TAG_NODE.to_owned(), id.to_string()),
            ]),
            client_token: token,
            secondary_ip_count: 9,
            prefix_count: 0,
        })
        .await
        .unwrap();
    w.nodes[0].used = Used::Count(9);
    let first = r.pass(&w.nodes).await;
    assert!(first.nodes[0].applied, "{:?}", first.nodes[0]);
    assert_eq!(
        w.sim.counters().calls_of(Operation::CreateNetworkInterface),
        2,
        "the pass did not re-issue the create"
    );
    converge(&r, &mut w.nodes, 5).await;
    assert_eq!(
        w.sim.snapshot().enis.len(),
        2,
        "the re-issued create made a second ENI"
    );
    let enis = enis_of(&w, 0).await;
    assert!(enis.iter().any(|e| e.id == made.id));
    assert_eq!(enis.len(), 2);
    assert_no_leaks_and_no_duplicates(&w.sim);
}

#[tokio::test(start_paused = true)]
async fn pass_with_hands_over_each_node_as_soon_as_its_ops_are_done() {
    let mut w = mk_world(12, None);
    w.add_nodes(2, "m5.large");
    let fill = EniSettings {
        targets: Targets {
            fill_at_join: true,
            ..Targets::default()
        },
        ..settings()
    };
    let r = EniReconciler::new(w.sim.clone(), fill);
    // node-0 is full already; node-1 needs ENIs, and every create takes a minute.
    assert!(r.pass(&w.nodes[..1]).await.nodes[0].ready());
    w.sim.update_faults(|f| {
        f.op_latency.insert(
            Operation::CreateNetworkInterface,
            underlay_vpcsim::Latency::Fixed(Duration::from_secs(60)),
        );
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let pass = r.pass_with(&w.nodes, Some(tx));
    tokio::pin!(pass);
    let first = tokio::select! {
        n = rx.recv() => n.expect("a node handed over"),
        _ = &mut pass => panic!("the pass ended before handing over any node"),
    };
    assert_eq!(first.name, "node-0");
    assert!(first.ready() && first.plan.ops.is_empty(), "{first:?}");
    assert!(first.pool.enis.iter().all(|e| e.subnet_cidr.is_some()));
    let report = pass.await;
    let second = rx.recv().await.expect("node-1 handed over");
    assert_eq!(second.name, "node-1");
    assert!(second.ready(), "{second:?}");
    assert!(first.finished_at < second.finished_at);
    assert!(
        rx.recv().await.is_none(),
        "one report per node, then closed"
    );
    let mut names: Vec<&str> = report.nodes.iter().map(|n| n.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["node-0", "node-1"]);
    assert_no_leaks_and_no_duplicates(&w.sim);
}

/// Prefix delegation on a non-Nitro type fails on every call, forever: such a node is refused up front (no EC2
/// mutation for it, its error says why, its max pods are the host-network pods only) and the others carry on.
/// Whether a type is Nitro comes from the built-in table, or from DescribeInstanceTypes for a type the table
/// lacks.
#[tokio::test(start_paused = true)]
async fn prefix_mode_refuses_non_nitro_nodes_up_front_and_serves_the_others() {
    for learnt in [false, true] {
        let mut w = mk_world(9, None);
        w.add_nodes(2, "m5.large");
        w.add_node("c4.large");
        w.add_node("t2.medium");
        let xen = if learnt {
            ["x9.large", "x9.medium"]
        } else {
            ["c4.large", "t2.medium"]
        };
        let cloud: std::sync::Arc<dyn Cloud> = if learnt {
            std::sync::Arc::new(AliasedTypes::new(
                w.sim.clone(),
                &[
                    ("c4.large", "x9.large"),
                    ("t2.medium", "x9.medium"),
                    ("m5.large", "x9n.large"),
                ],
            ))
        } else {
            w.sim.clone()
        };
        let r = EniReconciler::new(
            cloud,
            EniSettings {
                mode: AddressMode::Prefixes,
                targets: Targets {
                    warm_prefix_target: Some(1),
                    ..Targets::default()
                },
                ..settings()
            },
        );
        let before = w.sim.snapshot();
        for _ in 0..4 {
            let report = r.pass(&w.nodes).await;
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            assert_eq!(report.nodes.len(), 4);
            carry(&mut w.nodes, &report);
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let report = r.pass(&w.nodes).await;
        let by_name = |name: &str| report.nodes.iter().find(|n| n.name == name).unwrap();
        for n in ["node-0", "node-1"].map(by_name) {
            assert!(n.converged() && n.ready(), "{n:?}");
            assert_eq!(n.max_pods, 110);
        }
        for (n, ty) in ["node-2", "node-3"].map(by_name).into_iter().zip(xen) {
            let error = n.error.as_deref().unwrap_or_default();
            assert!(
                error.contains("is not a Nitro instance type: prefix delegation needs Nitro"),
                "{n:?}"
            );
            assert!(error.starts_with(ty), "{error}");
            assert!(n.plan.ops.is_empty() && !n.applied && !n.converged() && !n.ready());
            assert_eq!(n.max_pods, 2, "no prefixes, so no pod addresses: {n:?}");
            assert_eq!(n.pool_size, 0);
        }
        assert!(!report.quiet());
        // No EC2 call ever touched the refused nodes: their only ENIs are the primaries as launched, and EC2 never
        // refused a request.
        let snap = w.sim.snapshot();
        for node in &w.nodes[2..] {
            let was: Vec<_> = before
                .enis
                .iter()
                .filter(|e| {
                    e.attachment
                        .as_ref()
                        .is_some_and(|a| a.instance == node.instance)
                })
                .collect();
            let now: Vec<_> = snap
                .enis
                .iter()
                .filter(|e| {
                    e.attachment
                        .as_ref()
                        .is_some_and(|a| a.instance == node.instance)
                })
                .collect();
            assert_eq!(was, now);
            assert!(
                !snap
                    .enis
                    .iter()
                    .any(|e| e.tags.get(TAG_NODE) == Some(&node.instance.to_string())),
                "an ENI was created for a refused node"
            );
        }
        let c = w.sim.counters();
        assert!(c.errors.is_empty(), "EC2 refused calls: {:?}", c.errors);
        assert_no_leaks_and_no_duplicates(&w.sim);
    }
}

/// A subnet out of addresses is not asked again on every pass: after EC2's refusal nothing grows into it for
/// 5 s, then one node tries, and each further refusal doubles the wait (up to 5 min). Growth resumes with the
/// first success once addresses are freed.
#[tokio::test(start_paused = true)]
async fn a_full_subnet_is_retried_on_a_doubling_schedule_and_growth_resumes_once_freed() {
    let mut w = mk_world(10, None);
    // 27 usable addresses: two nodes' primaries and a foreign ENI with 20 secondaries leave 4 free, short of
    // the 9 each node's primary ENI wants.
    let tiny = w
        .sim
        .create_subnet(&w.vpc, ZONES[0], net("198.18.96.0/27"))
        .unwrap();
    for n in 0..2 {
        let i = w
            .sim
            .run_instance(RunInstance::new("m5.large", &tiny))
            .unwrap();
        w.nodes
            .push(EniNode::new(format!("node-{n}"), i.id, Used::Count(0)));
    }
    let filler = w
        .sim
        .create_network_interface(&CreateEniRequest {
            subnet: tiny.clone(),
            security_groups: Vec::new(),
            description: "someone else's".to_owned(),
            tags: Tags::new(),
            client_token: String::new(),
            secondary_ip_count: 20,
            prefix_count: 0,
        })
        .await
        .unwrap();
    let calls = || {
        let c = w.sim.counters();
        c.calls_of(Operation::AssignPrivateIpAddresses)
            + c.calls_of(Operation::CreateNetworkInterface)
    };
    let before = calls();
    let growth = || calls() - before;
    let r = EniReconciler::new(w.sim.clone(), settings());
    let s = r.settings().clone();
    assert_eq!(
        (s.subnet_backoff, s.subnet_backoff_max),
        (Duration::from_secs(5), Duration::from_secs(300))
    );
    let first = r.pass(&w.nodes).await;
    assert_eq!(growth(), 2, "one refused assign per node");
    for n in &first.nodes {
        assert!(
            n.error
                .as_deref()
                .is_some_and(|e| e.contains("InsufficientFreeAddressesInSubnet")),
            "{n:?}"
        );
    }
    // A pass every 5 s for 10 minutes.
    let passes = 120u32;
    let mut held = 0;
    for _ in 0..passes {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let report = r.pass(&w.nodes).await;
        for n in &report.nodes {
            assert!(!n.applied && n.pool_size == 0, "{n:?}");
            let e = n.error.as_deref().unwrap_or_default();
            assert!(e.contains("InsufficientFreeAddressesInSubnet"), "{e}");
            held += usize::from(e.contains(&format!("subnet {tiny} is out of addresses")));
        }
    }
    // The waits since the first refusal: 5, 10, 20, … 300 s. At most one try per wait that ended.
    let elapsed = Duration::from_secs(5) * passes;
    let mut ended = 0;
    let (mut wait, mut at) = (s.subnet_backoff, Duration::ZERO);
    while at + wait <= elapsed {
        at += wait;
        ended += 1;
        wait = (wait * 2).min(s.subnet_backoff_max);
    }
    let tries = growth() - 2;
    assert!(
        tries <= ended && tries >= ended - 1,
        "{tries} tries in {elapsed:?}; the schedule allows {ended} (without backoff: {})",
        2 * passes
    );
    assert!(
        held >= 2 * passes as usize - tries as usize,
        "passes that held back: {held}"
    );
    // Addresses come free: the next try succeeds and every node grows.
    w.sim.delete_network_interface(&filler.id).await.unwrap();
    let report = converge(&r, &mut w.nodes, 70).await;
    for n in &report.nodes {
        assert_eq!(n.pool_size, 9, "{n:?}");
    }
    assert_no_leaks_and_no_duplicates(&w.sim);
}
