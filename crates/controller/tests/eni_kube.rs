//! `eni` mode on the Kubernetes API, against apisim (a real kube::Client) and vpcsim: UnderlayNodes created with
//! their ENI pool in the status, the max-pods annotation, the not-ready taint lifted once the agent is Ready, the
//! no-free-ips taint while every address is used. Real clock; every wait is a bounded poll.

mod eni_common;

use std::time::Duration;

use eni_common::*;
use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use underlay_api::{Mode, UnderlayNode, conditions};
use underlay_apisim::ApiSim;
use underlay_controller::eni::EniSettings;
use underlay_controller::eni::kube::run_eni_on_kube;
use underlay_controller::lease::KubeOptions;
use underlay_core::eni_pool::Targets;
use underlay_core::names;

const WAIT: Duration = Duration::from_secs(30);

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn taints(api: &ApiSim, name: &str) -> Vec<String> {
    let node: Node = api.get(None, name).unwrap();
    node.spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .map(|t| t.key)
        .collect()
}

#[tokio::test]
async fn eni_mode_pools_status_taints_and_max_pods_on_the_api() {
    let mut w = mk_world(41, None);
    let api = ApiSim::new();
    for i in 0..2 {
        let id = w.add_node("m5.large");
        let zone = ZONES[i % ZONES.len()];
        api.insert(&Node {
            metadata: ObjectMeta {
                name: Some(format!("node-{i}")),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                provider_id: Some(format!("aws:///{zone}/{id}")),
                ..Default::default()
            }),
            status: None,
        });
    }
    let settings = EniSettings {
        targets: Targets {
            fill_at_join: true,
            ..Targets::default()
        },
        ..EniSettings::new(CLUSTER)
    };
    let (shutdown, rx) = watch::channel(false);
    let (passes_tx, passes_rx) = tokio::sync::watch::channel(0u64);
    let opts = KubeOptions {
        identity: "eni-test".into(),
        lease_namespace: "kube-system".into(),
        lease_duration: Duration::from_secs(3),
        renew_every: Duration::from_millis(500),
        retry_every: Duration::from_millis(200),
        leading: None,
        passes: Some(passes_tx),
        node_selector: Default::default(),
    };
    let task = tokio::spawn(run_eni_on_kube(
        api.client(),
        w.sim.clone(),
        settings,
        Duration::from_millis(100),
        opts,
        rx,
    ));

    // UnderlayNodes with the whole pool (three ENIs of nine addresses), the primary ENI included.
    for i in 0..2 {
        let name = format!("node-{i}");
        let un = wait_for("a full pool in the status", || {
            let un: UnderlayNode = api.get(None, &name)?;
            (un.status.as_ref()?.pool_size == 27).then_some(un)
        })
        .await;
        assert_eq!(un.spec.mode, Mode::Eni);
        assert_eq!(un.spec.instance_id, w.nodes[i].instance.to_string());
        let pool = un.status.unwrap().pool.unwrap();
        assert_eq!(
            pool.enis.iter().map(|e| e.device_index).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(
            *passes_rx.borrow() > 0,
            "a pass that wrote statuses is counted"
        );
        assert!(
            pool.enis
                .iter()
                .all(|e| e.addresses.len() == 9 && e.mac.is_some() && e.subnet_cidr.is_some())
        );
        // Not ready until the agent says so; max pods from the type.
        wait_for("the not-ready taint and max pods", || {
            let node: Node = api.get(None, &name)?;
            let annotated = node
                .metadata
                .annotations
                .as_ref()?
                .get(names::MAX_PODS_ANNOTATION)?
                == "29";
            (annotated && taints(&api, &name) == vec![names::TAINT_NOT_READY]).then_some(())
        })
        .await;
    }

    // The agent of node-0 is Ready: the taint goes.
    assert!(api.modify::<UnderlayNode>(None, "node-0", |u| {
        let status = u.status.get_or_insert_with(Default::default);
        status.conditions.push(Condition {
            type_: conditions::READY.into(),
            status: "True".into(),
            reason: "Test".into(),
            message: String::new(),
            last_transition_time: Time(Timestamp::now()),
            observed_generation: None,
        });
    }));
    wait_for("the not-ready taint lifted", || {
        taints(&api, "node-0").is_empty().then_some(())
    })
    .await;
    assert_eq!(taints(&api, "node-1"), vec![names::TAINT_NOT_READY]);

    // Every address used: no-free-ips, until pods leave.
    assert!(
        api.modify::<UnderlayNode>(None, "node-0", |u| u.status.as_mut().unwrap().pool_used =
            27)
    );
    wait_for("the no-free-ips taint", || {
        (taints(&api, "node-0") == vec![names::TAINT_NO_FREE_IPS]).then_some(())
    })
    .await;
    assert!(
        api.modify::<UnderlayNode>(None, "node-0", |u| u.status.as_mut().unwrap().pool_used =
            20)
    );
    wait_for("the no-free-ips taint lifted", || {
        taints(&api, "node-0").is_empty().then_some(())
    })
    .await;

    shutdown.send_replace(true);
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_no_leaks_and_no_duplicates(&w.sim);
}

/// The label the selector test manages nodes by.
const MANAGED: &str = "underlay.dev/managed";

fn set_managed(api: &ApiSim, name: &str, managed: bool) {
    assert!(api.modify::<Node>(None, name, |n| {
        let labels = n.metadata.labels.get_or_insert_with(Default::default);
        if managed {
            labels.insert(MANAGED.into(), "true".into());
        } else {
            labels.remove(MANAGED);
        }
    }));
}

/// ENIs attached to `instance` (the primary one included).
fn enis_of(w: &EniWorld, instance: &underlay_cloud::InstanceId) -> usize {
    w.sim
        .snapshot()
        .enis
        .iter()
        .filter(|e| {
            e.attachment
                .as_ref()
                .is_some_and(|a| &a.instance == instance)
        })
        .count()
}

#[tokio::test]
async fn eni_mode_manages_only_selected_nodes() {
    let mut w = mk_world(43, None);
    let api = ApiSim::new();
    for i in 0..2 {
        let id = w.add_node("m5.large");
        let zone = ZONES[i % ZONES.len()];
        api.insert(&Node {
            metadata: ObjectMeta {
                name: Some(format!("node-{i}")),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                provider_id: Some(format!("aws:///{zone}/{id}")),
                ..Default::default()
            }),
            status: None,
        });
    }
    set_managed(&api, "node-0", true);
    let settings = EniSettings {
        targets: Targets {
            fill_at_join: true,
            ..Targets::default()
        },
        ..EniSettings::new(CLUSTER)
    };
    let (shutdown, rx) = watch::channel(false);
    let (passes_tx, passes_rx) = tokio::sync::watch::channel(0u64);
    let opts = KubeOptions {
        identity: "eni-test".into(),
        lease_namespace: "kube-system".into(),
        lease_duration: Duration::from_secs(3),
        renew_every: Duration::from_millis(500),
        retry_every: Duration::from_millis(200),
        leading: None,
        passes: Some(passes_tx),
        node_selector: "underlay.dev/managed in (true)".parse().unwrap(),
    };
    let task = tokio::spawn(run_eni_on_kube(
        api.client(),
        w.sim.clone(),
        settings,
        Duration::from_millis(100),
        opts,
        rx,
    ));

    wait_for("the selected node's full pool", || {
        let un: UnderlayNode = api.get(None, "node-0")?;
        (un.status.as_ref()?.pool_size == 27).then_some(())
    })
    .await;
    wait_for("the selected node tainted", || {
        (taints(&api, "node-0") == vec![names::TAINT_NOT_READY]).then_some(())
    })
    .await;
    // Several more passes: the unselected node gets nothing.
    let seen = *passes_rx.borrow();
    wait_for("three more passes", || {
        (*passes_rx.borrow() >= seen + 3).then_some(())
    })
    .await;
    assert!(api.get::<UnderlayNode>(None, "node-1").is_none());
    assert!(taints(&api, "node-1").is_empty());
    let node1: Node = api.get(None, "node-1").unwrap();
    assert!(node1.metadata.annotations.is_none_or(|a| a.is_empty()));
    assert_eq!(enis_of(&w, &w.nodes[1].instance), 1, "only its primary ENI");

    // Labelled: it joins.
    set_managed(&api, "node-1", true);
    wait_for("the joining node's full pool and taint", || {
        let un: UnderlayNode = api.get(None, "node-1")?;
        (un.status.as_ref()?.pool_size == 27
            && taints(&api, "node-1") == vec![names::TAINT_NOT_READY])
        .then_some(())
    })
    .await;
    assert_eq!(enis_of(&w, &w.nodes[1].instance), 3);

    // Unlabelled: its UnderlayNode and taint go; its ENIs stay attached.
    set_managed(&api, "node-0", false);
    wait_for("the unselected node released", || {
        (api.get::<UnderlayNode>(None, "node-0").is_none() && taints(&api, "node-0").is_empty())
            .then_some(())
    })
    .await;
    let seen = *passes_rx.borrow();
    wait_for("three more passes", || {
        (*passes_rx.borrow() >= seen + 3).then_some(())
    })
    .await;
    assert!(api.get::<UnderlayNode>(None, "node-0").is_none());
    assert!(taints(&api, "node-0").is_empty());
    assert_eq!(enis_of(&w, &w.nodes[0].instance), 3);

    shutdown.send_replace(true);
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_no_leaks_and_no_duplicates(&w.sim);
}

/// A running `eni`-mode controller: its shutdown switch, its task and its pass counter.
struct Running {
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), underlay_controller::lease::KubeError>>,
    passes: watch::Receiver<u64>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.send_replace(true);
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// Node `node-<i>` on `w`'s instance `i`.
fn insert_node(w: &EniWorld, api: &ApiSim, i: usize) {
    let zone = ZONES[i % ZONES.len()];
    api.insert(&Node {
        metadata: ObjectMeta {
            name: Some(format!("node-{i}")),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            provider_id: Some(format!("aws:///{zone}/{}", w.nodes[i].instance)),
            ..Default::default()
        }),
        status: None,
    });
}

/// Run the controller with pools filled at join and the given resync period.
fn start_filling(w: &EniWorld, api: &ApiSim, resync: Duration) -> Running {
    start_filling_retrying(w, api, resync, Duration::from_millis(200))
}

/// [`start_filling`] with the pass after a failed API write `retry_every` away.
fn start_filling_retrying(
    w: &EniWorld,
    api: &ApiSim,
    resync: Duration,
    retry_every: Duration,
) -> Running {
    let settings = EniSettings {
        targets: Targets {
            fill_at_join: true,
            ..Targets::default()
        },
        ..EniSettings::new(CLUSTER)
    };
    let (shutdown, rx) = watch::channel(false);
    let (passes_tx, passes) = watch::channel(0u64);
    let opts = KubeOptions {
        identity: "eni-test".into(),
        lease_namespace: "kube-system".into(),
        lease_duration: Duration::from_secs(3),
        renew_every: Duration::from_millis(500),
        retry_every,
        leading: None,
        passes: Some(passes_tx),
        node_selector: Default::default(),
    };
    let task = tokio::spawn(run_eni_on_kube(
        api.client(),
        w.sim.clone(),
        settings,
        resync,
        opts,
        rx,
    ));
    Running {
        shutdown,
        task,
        passes,
    }
}

fn mark_ready(api: &ApiSim, name: &str) {
    assert!(api.modify::<UnderlayNode>(None, name, |u| {
        let status = u.status.get_or_insert_with(Default::default);
        status.conditions.push(Condition {
            type_: conditions::READY.into(),
            status: "True".into(),
            reason: "Test".into(),
            message: String::new(),
            last_transition_time: Time(Timestamp::now()),
            observed_generation: None,
        });
    }));
}

/// Lists (not watches) of `path` among `requests`.
fn lists(requests: &[underlay_apisim::RecordedRequest], path: &str) -> usize {
    requests
        .iter()
        .filter(|r| r.method == "GET" && r.path == path && !r.query.contains("watch=true"))
        .count()
}

#[tokio::test]
async fn passes_read_watch_caches_instead_of_listing() {
    let mut w = mk_world(44, None);
    let api = ApiSim::new();
    for i in 0..2 {
        w.add_node("m5.large");
        insert_node(&w, &api, i);
    }
    let r = start_filling(&w, &api, Duration::from_millis(100));
    for i in 0..2 {
        wait_for("a full pool in the status", || {
            let un: UnderlayNode = api.get(None, &format!("node-{i}"))?;
            (un.status.as_ref()?.pool_size == 27).then_some(())
        })
        .await;
    }
    // Passes keep coming every resync (pools follow EC2 even without API events) ...
    let seen = *r.passes.borrow();
    wait_for("ten more passes", || {
        (*r.passes.borrow() >= seen + 10).then_some(())
    })
    .await;
    // ... but each kind was listed once, when its watch started.
    let requests = api.take_requests();
    assert_eq!(lists(&requests, "/api/v1/nodes"), 1, "{requests:#?}");
    assert_eq!(
        lists(&requests, "/apis/underlay.dev/v1alpha1/underlaynodes"),
        1,
        "{requests:#?}"
    );
    r.stop().await;
    assert_no_leaks_and_no_duplicates(&w.sim);
}

#[tokio::test]
async fn a_change_is_acted_on_without_waiting_for_the_resync() {
    let mut w = mk_world(45, None);
    let api = ApiSim::new();
    w.add_node("m5.large");
    insert_node(&w, &api, 0);
    // A resync far longer than any wait below: only API events can drive the passes that follow the first.
    let r = start_filling(&w, &api, Duration::from_secs(600));
    wait_for("node-0's full pool and not-ready taint", || {
        let un: UnderlayNode = api.get(None, "node-0")?;
        (un.status.as_ref()?.pool_size == 27
            && taints(&api, "node-0") == vec![names::TAINT_NOT_READY])
        .then_some(())
    })
    .await;

    // The agent reports Ready: the taint goes.
    mark_ready(&api, "node-0");
    wait_for("the not-ready taint lifted", || {
        taints(&api, "node-0").is_empty().then_some(())
    })
    .await;

    // A node joins: it gets its pool.
    w.add_node("m5.large");
    insert_node(&w, &api, 1);
    wait_for("the joining node's full pool", || {
        let un: UnderlayNode = api.get(None, "node-1")?;
        (un.status.as_ref()?.pool_size == 27).then_some(())
    })
    .await;
    assert_eq!(enis_of(&w, &w.nodes[1].instance), 3);
    r.stop().await;
    assert_no_leaks_and_no_duplicates(&w.sim);
}

#[tokio::test]
async fn a_node_whose_work_is_done_is_written_before_a_slow_node_finishes() {
    let mut w = mk_world(46, None);
    let api = ApiSim::new();
    for i in 0..2 {
        w.add_node("m5.large");
        insert_node(&w, &api, i);
    }
    // node-0's pool is already full (a previous leader filled it): its pass has nothing to do.
    let settings = EniSettings {
        targets: Targets {
            fill_at_join: true,
            ..Targets::default()
        },
        ..EniSettings::new(CLUSTER)
    };
    let filled = underlay_controller::eni::EniReconciler::new(w.sim.clone(), settings)
        .pass(&w.nodes[..1])
        .await;
    assert!(filled.nodes[0].ready(), "{filled:#?}");
    // node-1 needs ENIs, and creating one takes far longer than the test waits.
    w.sim.update_faults(|f| {
        f.op_latency.insert(
            underlay_cloud::Operation::CreateNetworkInterface,
            underlay_vpcsim::Latency::Fixed(Duration::from_secs(3600)),
        );
    });
    let r = start_filling(&w, &api, Duration::from_millis(100));

    // node-0 gets its status, max pods and taint while node-1's pass is still creating its ENI.
    wait_for("node-0's status, max pods and taint", || {
        let un: UnderlayNode = api.get(None, "node-0")?;
        let node: Node = api.get(None, "node-0")?;
        let annotated = node
            .metadata
            .annotations
            .as_ref()?
            .get(names::MAX_PODS_ANNOTATION)?
            == "29";
        (un.status.as_ref()?.pool_size == 27
            && annotated
            && taints(&api, "node-0") == vec![names::TAINT_NOT_READY])
        .then_some(())
    })
    .await;
    wait_for("node-1's ENI being created", || {
        let calls = w.sim.counters().calls;
        (calls.get(&underlay_cloud::Operation::CreateNetworkInterface) >= Some(&1)).then_some(())
    })
    .await;
    assert!(api.get::<UnderlayNode>(None, "node-1").is_none());
    assert_eq!(*r.passes.borrow(), 0, "the first pass has not ended");
    r.stop().await;
    assert_no_leaks_and_no_duplicates(&w.sim);
}

#[tokio::test]
async fn lease_write_conflicts_do_not_end_the_term() {
    let mut w = mk_world(47, None);
    let api = ApiSim::new();
    w.add_node("m5.large");
    insert_node(&w, &api, 0);
    let r = start_filling(&w, &api, Duration::from_millis(100));
    wait_for("node-0's full pool", || {
        let un: UnderlayNode = api.get(None, "node-0")?;
        (un.status.as_ref()?.pool_size == 27).then_some(())
    })
    .await;
    // Renewals answered 409 for longer than the lease lasts at one renewal per period (6 × 500 ms ≥ 3 s): a
    // leader that reads the lease again at once keeps its term.
    api.take_requests();
    let mut requests = Vec::new();
    for _ in 0..6 {
        api.inject_conflict(underlay_apisim::Kind::Lease);
    }
    let lease_writes = |requests: &[underlay_apisim::RecordedRequest]| -> Vec<u16> {
        requests
            .iter()
            .filter(|r| r.method == "PUT" && r.path.contains("/leases/"))
            .map(|r| r.status)
            .collect()
    };
    wait_for("six conflicts, then a renewal", || {
        requests.extend(api.take_requests());
        let writes = lease_writes(&requests);
        (writes.iter().filter(|s| **s == 409).count() == 6 && writes.last() == Some(&200))
            .then_some(())
    })
    .await;
    let seen = *r.passes.borrow();
    wait_for("five more passes", || {
        (*r.passes.borrow() >= seen + 5).then_some(())
    })
    .await;
    // One term: the watches were started (and the Nodes listed) once.
    requests.extend(api.take_requests());
    assert_eq!(lists(&requests, "/api/v1/nodes"), 0, "{requests:#?}");
    r.stop().await;
    assert_no_leaks_and_no_duplicates(&w.sim);
}

/// The pool is written on condition that the object is the one the pass read (a stale write could pair a
/// release generation with a set the agent never saw). A conflict caused by the agent's half of the status alone
/// is retried at once against the re-read object, not left to a later pass.
#[tokio::test]
async fn a_conflicting_pool_write_is_retried_against_the_reread_object() {
    let mut w = mk_world(47, None);
    let api = ApiSim::new();
    w.add_node("m5.large");
    insert_node(&w, &api, 0);
    // Neither a resync nor a retry pass within the test: only the write's own retry can land the pool.
    let r = start_filling_retrying(&w, &api, Duration::from_secs(600), Duration::from_secs(600));
    let un = wait_for("node-0's full pool", || {
        let un: UnderlayNode = api.get(None, "node-0")?;
        (un.status.as_ref()?.pool_size == 27).then_some(un)
    })
    .await;
    // EC2 loses one address of the pool (fill-at-join assigns another), the next status write conflicts, and
    // the agent's Ready report drives the pass.
    let eni = &un.status.as_ref().unwrap().pool.as_ref().unwrap().enis[1];
    let gone: std::net::Ipv4Addr = eni.addresses[0].parse().unwrap();
    underlay_cloud::Cloud::unassign_private_ips(
        w.sim.as_ref(),
        &underlay_cloud::EniId::new(eni.id.as_str()),
        &[gone],
    )
    .await
    .unwrap();
    api.take_requests();
    api.inject_conflict(underlay_apisim::Kind::UnderlayNode);
    mark_ready(&api, "node-0");
    wait_for("the pool written without the lost address", || {
        let un: UnderlayNode = api.get(None, "node-0")?;
        let s = un.status?;
        let listed = s
            .pool?
            .enis
            .iter()
            .any(|e| e.addresses.contains(&gone.to_string()));
        (s.pool_size == 27 && !listed).then_some(())
    })
    .await;
    let status_calls: Vec<(String, u16)> = api
        .take_requests()
        .into_iter()
        .filter(|q| q.path.ends_with("/underlaynodes/node-0/status"))
        .map(|q| (q.method, q.status))
        .collect();
    let conflict = status_calls
        .iter()
        .position(|c| c.1 == 409)
        .expect("the injected conflict");
    assert_eq!(
        status_calls[conflict + 1..].first().map(|c| c.0.as_str()),
        Some("GET"),
        "{status_calls:?}"
    );
    r.stop().await;
    assert_no_leaks_and_no_duplicates(&w.sim);
}
