//! The controller on the Kubernetes API, against apisim (a real kube::Client) and vpcsim: UnderlayNode lifecycle,
//! status from the plan, the not-ready taint and podCIDR, a 409 on a status write, and leader election. Real
//! clock; every wait is a bounded poll.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{World, mk_world};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeSpec, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use tokio::sync::{broadcast, watch};
use tower::ServiceExt;
use underlay_api::{Mode, UnderlayNode, conditions};
use underlay_apisim::{ApiSim, Kind};
use underlay_cloud::RouteTarget;
use underlay_controller::{ControllerConfig, ControllerEvent, NodeSelector, ProbeTarget, Prober};
use underlay_controller::{KubeOptions, run_routed_on_kube};
use underlay_core::health::Probe;
use underlay_core::names;
use underlay_vpcsim::RunInstance;

const WAIT: Duration = Duration::from_secs(30);

/// Every forwarder answers.
#[derive(Debug)]
struct AlwaysUp;

#[async_trait::async_trait]
impl Prober for AlwaysUp {
    async fn probe(&self, _: &ProbeTarget) -> Probe {
        Probe::Success
    }
}

/// Poll `f` every 20 ms until it returns `Some`, for at most [`WAIT`].
async fn wait_for<T, F: FnMut() -> Option<T>>(what: &str, mut f: F) -> T {
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

/// A Node in apisim for a fresh instance in subnet `i % subnets`; carries a foreign taint that must survive.
fn mk_node(w: &World, api: &ApiSim, name: &str, i: usize) {
    let subnet = w.subnets[i % w.subnets.len()].clone();
    let inst = w
        .sim
        .run_instance(RunInstance::new("m5.large", &subnet))
        .unwrap();
    api.insert(&Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            provider_id: Some(format!("aws:///{}/{}", inst.zone, inst.id.0)),
            taints: Some(vec![Taint {
                key: "example.com/dedicated".into(),
                value: Some("infra".into()),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    });
}

fn taint_keys(api: &ApiSim, name: &str) -> Vec<String> {
    let node: Node = api.get(None, name).unwrap();
    node.spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .map(|t| t.key)
        .collect()
}

fn set_ready(api: &ApiSim, name: &str, ready: bool) {
    assert!(api.modify::<UnderlayNode>(None, name, |u| {
        let status = u.status.get_or_insert_with(Default::default);
        status.conditions.retain(|c| c.type_ != conditions::READY);
        status.conditions.push(Condition {
            type_: conditions::READY.into(),
            status: if ready { "True" } else { "False" }.into(),
            reason: "Test".into(),
            message: String::new(),
            last_transition_time: Time(Timestamp::now()),
            observed_generation: None,
        });
    }));
}

struct Replica {
    shutdown: watch::Sender<bool>,
    leading: watch::Receiver<bool>,
    events: broadcast::Receiver<ControllerEvent>,
    /// Requests this replica sent: (method, path, leading at the time).
    requests: Arc<Mutex<Vec<(String, String, bool)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Replica {
    /// Writes (anything but GET, and not to the Lease) this replica sent while it was not leading.
    fn writes_while_not_leading(&self) -> Vec<(String, String)> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, p, leading)| m != "GET" && !p.contains("/leases") && !leading)
            .map(|(m, p, _)| (m.clone(), p.clone()))
            .collect()
    }
    fn writes(&self) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, p, _)| m != "GET" && !p.contains("/leases"))
            .count()
    }
    fn lease_requests(&self) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p, _)| p.contains("/leases"))
            .count()
    }
    async fn stop(self) {
        self.shutdown.send_replace(true);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("replica stops")
            .unwrap();
    }
}

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

/// Start a controller replica on its own kube::Client (recording its requests) over the shared apisim.
fn start(w: &World, api: &ApiSim, identity: &str, lease: Duration, renew: Duration) -> Replica {
    start_with(w, api, identity, lease, renew, Arc::new(AlwaysUp))
}

fn start_with(
    w: &World,
    api: &ApiSim,
    identity: &str,
    lease: Duration,
    renew: Duration,
    prober: Arc<dyn Prober>,
) -> Replica {
    start_tuned(w, api, identity, lease, renew, prober, |_| {})
}

fn start_tuned(
    w: &World,
    api: &ApiSim,
    identity: &str,
    lease: Duration,
    renew: Duration,
    prober: Arc<dyn Prober>,
    tune: impl FnOnce(&mut ControllerConfig),
) -> Replica {
    let replica = (identity, lease, renew);
    start_selecting(w, api, replica, prober, tune, NodeSelector::all())
}

/// A replica (identity, lease duration, renewal period) that manages only the Nodes `selector` selects.
fn start_selecting(
    w: &World,
    api: &ApiSim,
    (identity, lease, renew): (&str, Duration, Duration),
    prober: Arc<dyn Prober>,
    tune: impl FnOnce(&mut ControllerConfig),
    selector: NodeSelector,
) -> Replica {
    let (leading_tx, leading) = watch::channel(false);
    let requests: Arc<Mutex<Vec<(String, String, bool)>>> = Arc::default();
    let (rec, lead_rx) = (requests.clone(), leading.clone());
    let service = api
        .service()
        .map_request(move |req: http::Request<kube::client::Body>| {
            rec.lock().unwrap().push((
                req.method().to_string(),
                req.uri().path().to_string(),
                *lead_rx.borrow(),
            ));
            req
        });
    let client = kube::Client::new(service, "default");
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (events_tx, events) = broadcast::channel(1024);
    let opts = KubeOptions {
        identity: identity.to_string(),
        lease_namespace: "kube-system".into(),
        lease_duration: lease,
        renew_every: renew,
        retry_every: Duration::from_millis(200),
        leading: Some(leading_tx),
        passes: None,
        node_selector: selector,
    };
    let mut config = ControllerConfig::new(w.config());
    config.probe.interval = Duration::from_millis(100);
    config.health.misses_to_fail = 2;
    tune(&mut config);
    let task = tokio::spawn({
        let (cloud, lanes) = (w.cloud(), w.lanes());
        async move {
            run_routed_on_kube(
                client,
                cloud,
                lanes,
                config,
                Some(prober),
                opts,
                shutdown_rx,
                Some(events_tx),
            )
            .await
            .unwrap()
        }
    });
    Replica {
        shutdown,
        leading,
        events,
        requests,
        task,
    }
}

fn start_one(w: &World, api: &ApiSim) -> Replica {
    start(
        w,
        api,
        "replica-a",
        Duration::from_secs(2),
        Duration::from_millis(300),
    )
}

/// Every UnderlayNode's status carries a pool; returns them by name.
async fn converged(api: &ApiSim, n: usize) -> BTreeMap<String, UnderlayNode> {
    wait_for("every UnderlayNode to get its pool", || {
        let uns = api.list::<UnderlayNode>();
        (uns.len() == n
            && uns
                .iter()
                .all(|u| u.status.as_ref().is_some_and(|s| s.pool.is_some())))
        .then(|| {
            uns.into_iter()
                .map(|u| (u.metadata.name.clone().unwrap(), u))
                .collect()
        })
    })
    .await
}

async fn with_timeout<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.expect("in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underlay_nodes_status_taints_and_pod_cidr_follow_the_plan() {
    let w = mk_world(31, 0, 50);
    let api = ApiSim::new();
    for i in 0..6 {
        mk_node(&w, &api, &format!("node-{i}"), i);
    }
    // Three nodes in the first subnet so some have same-subnet peers.
    mk_node(&w, &api, "node-6", 0);
    mk_node(&w, &api, "node-7", 0);
    let mut r = start_one(&w, &api);
    let uns = converged(&api, 8).await;

    for (name, un) in &uns {
        let node: Node = api.get(None, name).unwrap();
        // Spec from the instance, owner reference, finalizer, labels.
        let pid = node.spec.as_ref().unwrap().provider_id.clone().unwrap();
        assert!(
            pid.ends_with(&un.spec.instance_id),
            "{pid} vs {}",
            un.spec.instance_id
        );
        assert_eq!(un.spec.mode, Mode::Routed);
        let owners = un.metadata.owner_references.clone().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "Node");
        assert_eq!(&owners[0].name, name);
        assert_eq!(owners[0].uid, node.metadata.uid.clone().unwrap());
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(
            un.metadata.finalizers.clone().unwrap(),
            vec![names::FINALIZER_CLEANUP.to_string()]
        );
        let labels = un.metadata.labels.clone().unwrap();
        assert_eq!(labels[names::LABEL_NODE], *name);
        assert_eq!(labels[names::LABEL_MODE], "routed");

        // Status from the plan: block of 64 addresses (/26), peer routes to the same-subnet nodes.
        let st = un.status.clone().unwrap();
        let block: ipnet::Ipv4Net = st.pool.unwrap().block.unwrap().parse().unwrap();
        assert_eq!(block.prefix_len(), 26);
        assert_eq!(st.pool_size, 64);
        let peers: Vec<&UnderlayNode> = uns
            .values()
            .filter(|o| {
                o.spec.subnet_id == un.spec.subnet_id && o.metadata.name != un.metadata.name
            })
            .collect();
        assert_eq!(st.routes.len(), peers.len(), "{name}: {:?}", st.routes);
        for p in peers {
            let pb = p
                .status
                .as_ref()
                .unwrap()
                .pool
                .as_ref()
                .unwrap()
                .block
                .clone()
                .unwrap();
            assert!(
                st.routes
                    .iter()
                    .any(|r| r.destination == pb && r.via == p.spec.node_ip),
                "{name} lacks a route to {pb} via {}",
                p.spec.node_ip
            );
        }
        // Forwarder role: exactly the VPC routes in vpcsim that target this node's ENI.
        let mut want: Vec<(String, String)> = Vec::new();
        for t in &w.tables {
            for (dest, target) in w.owned(t) {
                if target
                    == RouteTarget::NetworkInterface(underlay_cloud::EniId(
                        un.spec.primary_eni_id.clone(),
                    ))
                {
                    want.push((t.0.clone(), dest.to_string()));
                }
            }
        }
        want.sort();
        let mut got: Vec<(String, String)> = st
            .forwarder
            .map(|f| {
                f.routes
                    .into_iter()
                    .map(|r| (r.route_table_id, r.destination))
                    .collect()
            })
            .unwrap_or_default();
        got.sort();
        assert_eq!(got, want, "{name}: forwarder role");

        // podCIDR set to the block.
        let node = wait_for("podCIDR", || {
            let n: Node = api.get(None, name).unwrap();
            n.spec.as_ref().unwrap().pod_cidr.is_some().then_some(n)
        })
        .await;
        assert_eq!(node.spec.unwrap().pod_cidr.unwrap(), block.to_string());
    }
    // Every node got the not-ready taint, next to the foreign one.
    for name in uns.keys() {
        wait_for("not-ready taint", || {
            let keys = taint_keys(&api, name);
            (keys.contains(&names::TAINT_NOT_READY.to_string())
                && keys.contains(&"example.com/dedicated".to_string()))
            .then_some(())
        })
        .await;
    }

    // Ready=True removes the taint on that node only; Ready=False puts it back.
    set_ready(&api, "node-1", true);
    wait_for("taint removed on Ready", || {
        (taint_keys(&api, "node-1") == vec!["example.com/dedicated".to_string()]).then_some(())
    })
    .await;
    assert!(taint_keys(&api, "node-2").contains(&names::TAINT_NOT_READY.to_string()));
    set_ready(&api, "node-1", false);
    wait_for("taint back on Ready=False", || {
        taint_keys(&api, "node-1")
            .contains(&names::TAINT_NOT_READY.to_string())
            .then_some(())
    })
    .await;
    // The agent's condition survived the controller's status writes.
    let un: UnderlayNode = api.get(None, "node-1").unwrap();
    assert_eq!(un.status.unwrap().conditions.len(), 1);

    // Events were forwarded.
    let mut passes = 0;
    while let Ok(ev) = r.events.try_recv() {
        passes += matches!(ev, ControllerEvent::Pass(_)) as usize;
    }
    assert!(passes >= 1);
    assert!(api.take_unexpected().is_empty());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_node_removes_its_underlay_node_after_its_routes() {
    let w = mk_world(32, 0, 50);
    let api = ApiSim::new();
    for i in 0..4 {
        mk_node(&w, &api, &format!("node-{i}"), i);
    }
    let r = start_one(&w, &api);
    let uns = converged(&api, 4).await;
    let block = uns["node-2"]
        .status
        .as_ref()
        .unwrap()
        .pool
        .as_ref()
        .unwrap()
        .block
        .clone()
        .unwrap();
    let block: ipnet::Ipv4Net = block.parse().unwrap();
    assert!(
        w.tables
            .iter()
            .any(|t| w.owned(t).keys().any(|d| d.contains(&block)))
    );

    assert!(api.remove::<Node>(None, "node-2"));
    wait_for("UnderlayNode of the deleted Node gone", || {
        api.get::<UnderlayNode>(None, "node-2")
            .is_none()
            .then_some(())
    })
    .await;
    // Its routes were gone from the plan (and so from the tables) before the finalizer went.
    for t in &w.tables {
        assert!(
            !w.owned(t).keys().any(|d| *d == block),
            "{t}: route for the deleted node's block remains"
        );
    }
    assert_eq!(api.list::<UnderlayNode>().len(), 3);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_on_a_status_write_is_retried() {
    let w = mk_world(33, 0, 50);
    let api = ApiSim::new();
    for i in 0..3 {
        mk_node(&w, &api, &format!("node-{i}"), i);
    }
    let r = start_one(&w, &api);
    let uns = converged(&api, 3).await;
    // Wait until the controller is idle: taints and podCIDRs written.
    for name in uns.keys() {
        wait_for("node spec written", || {
            let n: Node = api.get(None, name).unwrap();
            n.spec.unwrap().pod_cidr.is_some().then_some(())
        })
        .await;
    }
    let want = uns["node-0"].status.clone().unwrap();
    api.take_requests();
    api.inject_conflict(Kind::UnderlayNode);
    // Another writer wipes the controller's fields; the controller writes them again, through a 409.
    assert!(api.modify::<UnderlayNode>(None, "node-0", |u| {
        let s = u.status.as_mut().unwrap();
        s.pool = None;
        s.pool_size = 0;
    }));
    wait_for("status restored", || {
        let u: UnderlayNode = api.get(None, "node-0").unwrap();
        let s = u.status.unwrap();
        (s.pool == want.pool && s.pool_size == want.pool_size).then_some(())
    })
    .await;
    // The conflict falls on the next UnderlayNode write, node-0's or (on a loaded machine) a late one of
    // another node: either way that write is retried and lands.
    let status_writes: Vec<(String, u16)> = api
        .take_requests()
        .into_iter()
        .filter(|q| q.method == "PATCH" && q.path.ends_with("/status"))
        .map(|q| (q.path, q.status))
        .collect();
    let conflict = status_writes
        .iter()
        .position(|w| w.1 == 409)
        .expect("the injected conflict");
    assert_eq!(
        status_writes.iter().filter(|w| w.1 == 409).count(),
        1,
        "{status_writes:?}"
    );
    let path = &status_writes[conflict].0;
    assert!(
        status_writes[conflict + 1..]
            .iter()
            .any(|w| &w.0 == path && w.1 == 200),
        "{status_writes:?}"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_writes() {
    let w = mk_world(34, 0, 50);
    let api = ApiSim::new();
    for i in 0..3 {
        mk_node(&w, &api, &format!("node-{i}"), i);
    }
    let (lease, renew) = (Duration::from_secs(2), Duration::from_millis(200));
    let mut a = start(&w, &api, "replica-a", lease, renew);
    wait_for("a leads", || a.leading.borrow().then_some(())).await;
    converged(&api, 3).await;
    let mut b = start(&w, &api, "replica-b", lease, renew);
    // b campaigns for a while (several lease reads) without leading or writing.
    wait_for("b campaigns", || (b.lease_requests() >= 5).then_some(())).await;
    assert!(!*b.leading.borrow());
    assert_eq!(b.writes(), 0, "b wrote while a held the lease");
    assert!(b.events.try_recv().is_err(), "b ran a controller");
    assert!(a.writes() > 0);

    // Someone else takes the lease from a: a stops at once (its next renewal sees the holder).
    assert!(
        api.modify::<Lease>(Some("kube-system"), names::LEADER_LEASE, |l| {
            let s = l.spec.as_mut().unwrap();
            s.holder_identity = Some("intruder".into());
            s.lease_duration_seconds = Some(1);
            s.renew_time = Some(MicroTime(Timestamp::now()));
        })
    );
    wait_for("a steps down", || (!*a.leading.borrow()).then_some(())).await;
    // A node joins: once the intruder's lease expires, one replica takes over and creates its UnderlayNode.
    mk_node(&w, &api, "node-3", 3);
    with_timeout(async {
        loop {
            if *a.leading.borrow_and_update() || *b.leading.borrow_and_update() {
                break;
            }
            tokio::select! {
                _ = a.leading.changed() => {}
                _ = b.leading.changed() => {}
            }
        }
    })
    .await;
    converged(&api, 4).await;
    let lease: Lease = api.get(Some("kube-system"), names::LEADER_LEASE).unwrap();
    let holder = lease.spec.unwrap().holder_identity.unwrap();
    assert!(holder == "replica-a" || holder == "replica-b", "{holder}");
    assert!(
        a.writes_while_not_leading().is_empty(),
        "a wrote without the lease: {:?}",
        a.writes_while_not_leading()
    );
    assert!(
        b.writes_while_not_leading().is_empty(),
        "b wrote without the lease: {:?}",
        b.writes_while_not_leading()
    );
    // Shutdown releases the lease.
    a.stop().await;
    b.stop().await;
    let lease: Lease = api.get(Some("kube-system"), names::LEADER_LEASE).unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_keeps_every_block() {
    let w = mk_world(35, 0, 50);
    let api = ApiSim::new();
    // Three nodes of one subnet; the first leaves, so a plan from scratch would lay the others out anew.
    for i in 0..3 {
        mk_node(&w, &api, &format!("node-{i}"), 0);
    }
    let (lease, renew) = (Duration::from_secs(2), Duration::from_millis(200));
    let a = start(&w, &api, "replica-a", lease, renew);
    converged(&api, 3).await;
    assert!(api.remove::<Node>(None, "node-0"));
    wait_for("node-0's UnderlayNode gone", || {
        api.get::<UnderlayNode>(None, "node-0")
            .is_none()
            .then_some(())
    })
    .await;
    let before = converged(&api, 2).await;
    let blocks = |uns: &BTreeMap<String, UnderlayNode>| -> BTreeMap<String, String> {
        uns.iter()
            .map(|(n, u)| {
                let b = u.status.as_ref().unwrap().pool.as_ref().unwrap();
                (n.clone(), b.block.clone().unwrap())
            })
            .collect()
    };
    let tables_before: Vec<_> = w.tables.iter().map(|t| w.owned(t)).collect();
    a.stop().await;

    let mut b = start(&w, &api, "replica-b", lease, renew);
    let pass = with_timeout(async {
        loop {
            if let ControllerEvent::Pass(p) = b.events.recv().await.unwrap() {
                break p;
            }
        }
    })
    .await;
    let plan = pass.routes.plan.clone().unwrap();
    for (node, block) in blocks(&before) {
        assert_eq!(
            plan.block_of(&node).unwrap().to_string(),
            block,
            "{node}'s block moved"
        );
    }
    assert!(pass.routes.planned.is_empty(), "{:?}", pass.routes.planned);
    let tables_after: Vec<_> = w.tables.iter().map(|t| w.owned(t)).collect();
    assert_eq!(tables_before, tables_after);
    assert_eq!(blocks(&converged(&api, 2).await), blocks(&before));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_off_aws_or_without_instance_are_left_out() {
    let w = mk_world(36, 0, 50);
    let api = ApiSim::new();
    for i in 0..3 {
        mk_node(&w, &api, &format!("node-{i}"), i);
    }
    let foreign = |name: &str, pid: &str| Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            provider_id: Some(pid.into()),
            ..Default::default()
        }),
        status: None,
    };
    api.insert(&foreign("gce-node", "gce://project/zone/vm-1"));
    // An instance id no VPC holds: EC2 fails the whole batch for it, so the others are described one by one.
    api.insert(&foreign("ghost", "aws:///us-east-1a/i-0000000000000dead"));
    let r = start_one(&w, &api);
    let uns = converged(&api, 3).await;
    assert!(
        uns.keys().all(|n| n.starts_with("node-")),
        "{:?}",
        uns.keys()
    );
    // Nodes left out still carry the not-ready taint: they cannot run pods on the underlay network.
    for name in ["gce-node", "ghost"] {
        wait_for("taint on a node left out", || {
            taint_keys(&api, name)
                .contains(&names::TAINT_NOT_READY.to_string())
                .then_some(())
        })
        .await;
    }
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_is_recorded_as_events_on_the_nodes() {
    use k8s_openapi::api::events::v1::Event;
    let w = mk_world(37, 0, 50);
    let api = ApiSim::new();
    mk_node(&w, &api, "node-0", 0);
    mk_node(&w, &api, "node-1", 0);
    mk_node(&w, &api, "node-2", 1);
    let prober = Arc::new(ScriptedProber::default());
    let r = start_with(
        &w,
        &api,
        "replica-a",
        Duration::from_secs(2),
        Duration::from_millis(300),
        prober.clone(),
    );
    let uns = converged(&api, 3).await;
    let eni1 = underlay_cloud::EniId(uns["node-1"].spec.primary_eni_id.clone());
    prober.down.lock().unwrap().insert("node-0".into());
    // node-0's route moves to node-1, the other node of its subnet.
    let block0: ipnet::Ipv4Net = uns["node-0"]
        .status
        .as_ref()
        .unwrap()
        .pool
        .as_ref()
        .unwrap()
        .block
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    wait_for("node-0's route on node-1", || {
        // The managed tables: those of the nodes' zone (the others hold no pod route).
        let managed: Vec<_> = w.tables.iter().filter(|t| !w.owned(t).is_empty()).collect();
        (!managed.is_empty()
            && managed.iter().all(|t| {
                w.owned(t).iter().any(|(d, target)| {
                    d.contains(&block0) && *target == RouteTarget::NetworkInterface(eni1.clone())
                })
            }))
        .then_some(())
    })
    .await;
    let events = wait_for("failover events", || {
        let evs = api.list::<Event>();
        let has = |reason: &str, node: &str| {
            evs.iter().any(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|o| o.name.as_deref()) == Some(node)
            })
        };
        (has(
            underlay_controller::routed::REASON_FORWARDER_FAILED,
            "node-0",
        ) && has(underlay_controller::routed::REASON_ROUTES_MOVED, "node-1"))
        .then_some(evs)
    })
    .await;
    assert!(!events.iter().any(|e| {
        e.reason.as_deref() == Some(underlay_controller::routed::REASON_ROUTES_MOVED)
            && e.regarding.as_ref().and_then(|o| o.name.as_deref()) != Some("node-1")
    }));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_steps_down_and_leads_again() {
    let w = mk_world(38, 0, 50);
    let api = ApiSim::new();
    for i in 0..2 {
        mk_node(&w, &api, &format!("node-{i}"), i);
    }
    let mut r = start(
        &w,
        &api,
        "replica-a",
        Duration::from_secs(1),
        Duration::from_millis(200),
    );
    converged(&api, 2).await;
    api.set_unreachable(true);
    // No renewal for the lease's duration: it stops.
    with_timeout(async {
        while *r.leading.borrow_and_update() {
            r.leading.changed().await.unwrap();
        }
    })
    .await;
    api.set_unreachable(false);
    // Back: it campaigns, retakes its own lease and catches up with a node that joined meanwhile.
    mk_node(&w, &api, "node-2", 2);
    with_timeout(async {
        while !*r.leading.borrow_and_update() {
            r.leading.changed().await.unwrap();
        }
    })
    .await;
    converged(&api, 3).await;
    assert!(r.writes_while_not_leading().is_empty());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_plans_only_once_every_instance_is_described() {
    use underlay_cloud::Operation;
    let route_calls = |w: &World| {
        let c = w.sim.counters();
        [
            Operation::CreateRoute,
            Operation::ReplaceRoute,
            Operation::DeleteRoute,
        ]
        .iter()
        .map(|op| c.calls_of(*op))
        .sum::<u64>()
    };
    let w = mk_world(39, 0, 50);
    let api = ApiSim::new();
    for i in 0..3 {
        mk_node(&w, &api, &format!("node-{i}"), i);
    }
    let (lease, renew) = (Duration::from_secs(2), Duration::from_millis(200));
    let a = start(&w, &api, "replica-a", lease, renew);
    converged(&api, 3).await;
    a.stop().await;
    let tables_before: Vec<_> = w.tables.iter().map(|t| w.owned(t)).collect();
    assert!(tables_before.iter().any(|t| !t.is_empty()));

    // The next leader cannot describe instances for a while.
    w.sim
        .update_faults(|f| _ = f.throttled.insert(Operation::DescribeInstances));
    let routes_before = route_calls(&w);
    let described = w.sim.counters().calls_of(Operation::DescribeInstances);
    let mut b = start(&w, &api, "replica-b", lease, renew);
    wait_for("b leads and retries its describes", || {
        (*b.leading.borrow()
            && w.sim.counters().calls_of(Operation::DescribeInstances) >= described + 3)
            .then_some(())
    })
    .await;
    // No pass ran over the incomplete node set: no route changed.
    assert!(
        b.events.try_recv().is_err(),
        "a pass ran before every instance was known"
    );
    assert_eq!(route_calls(&w), routes_before);

    w.sim
        .update_faults(|f| _ = f.throttled.remove(&Operation::DescribeInstances));
    let pass = with_timeout(async {
        loop {
            if let ControllerEvent::Pass(p) = b.events.recv().await.unwrap() {
                break p;
            }
        }
    })
    .await;
    assert!(pass.routes.converged(), "{:?}", pass.routes.errors);
    assert!(pass.routes.planned.is_empty(), "{:?}", pass.routes.planned);
    let tables_after: Vec<_> = w.tables.iter().map(|t| w.owned(t)).collect();
    assert_eq!(tables_before, tables_after);
    b.stop().await;
}

/// The managed tables all route `block` (by longest prefix) to `eni`.
fn routed_to(w: &World, block: ipnet::Ipv4Net, eni: &str) -> bool {
    let managed: Vec<_> = w.tables.iter().filter(|t| !w.owned(t).is_empty()).collect();
    !managed.is_empty()
        && managed.iter().all(|t| {
            w.owned(t)
                .into_iter()
                .filter(|(d, _)| d.contains(&block))
                .max_by_key(|(d, _)| d.prefix_len())
                .is_some_and(|(_, target)| {
                    target == RouteTarget::NetworkInterface(underlay_cloud::EniId(eni.into()))
                })
        })
}

fn block_of(un: &UnderlayNode) -> ipnet::Ipv4Net {
    un.status
        .as_ref()
        .unwrap()
        .pool
        .as_ref()
        .unwrap()
        .block
        .as_ref()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_node_stays_tainted_until_its_block_is_routed() {
    use underlay_cloud::Operation;
    let w = mk_world(40, 0, 50);
    let api = ApiSim::new();
    // Alone in their subnets (two zones): each node forwards its own block.
    mk_node(&w, &api, "node-0", 0);
    mk_node(&w, &api, "node-1", 2);
    // EC2 throttles every CreateRoute: passes plan (blocks, statuses) but no route lands.
    w.sim
        .update_faults(|f| _ = f.throttled.insert(Operation::CreateRoute));
    let prober = Arc::new(ScriptedProber::default());
    let r = start_tuned(
        &w,
        &api,
        "replica-a",
        Duration::from_secs(2),
        Duration::from_millis(300),
        prober.clone(),
        |c| {
            c.backoff_max = Duration::from_millis(500);
            c.health.hold_down = Duration::from_millis(300);
        },
    );
    let uns = converged(&api, 2).await;
    let (block0, eni0) = (
        block_of(&uns["node-0"]),
        uns["node-0"].spec.primary_eni_id.clone(),
    );
    for name in ["node-0", "node-1"] {
        wait_for("not-ready taint", || {
            taint_keys(&api, name)
                .contains(&names::TAINT_NOT_READY.to_string())
                .then_some(())
        })
        .await;
    }
    // The agent of node-0 has its block and reports Ready; the controller keeps retrying its passes.
    set_ready(&api, "node-0", true);
    let throttled = w.sim.counters().throttled_of(Operation::CreateRoute);
    wait_for("more throttled passes", || {
        (w.sim.counters().throttled_of(Operation::CreateRoute) >= throttled + 3).then_some(())
    })
    .await;
    assert!(!routed_to(&w, block0, &eni0));
    assert!(
        taint_keys(&api, "node-0").contains(&names::TAINT_NOT_READY.to_string()),
        "untainted before its route exists"
    );

    // Routes land: node-0 loses the taint, and its route was there first. node-1, routed but not Ready, keeps it.
    w.sim
        .update_faults(|f| _ = f.throttled.remove(&Operation::CreateRoute));
    wait_for("taint removed once routed", || {
        (!taint_keys(&api, "node-0").contains(&names::TAINT_NOT_READY.to_string())).then_some(())
    })
    .await;
    assert!(routed_to(&w, block0, &eni0));
    assert!(taint_keys(&api, "node-0").contains(&"example.com/dedicated".to_string()));
    assert!(taint_keys(&api, "node-1").contains(&names::TAINT_NOT_READY.to_string()));

    // node-0 stops answering probes: no healthy node is left in its subnet, so its block is unrouted and the
    // taint comes back although its agent still says Ready.
    prober.down.lock().unwrap().insert("node-0".into());
    wait_for("taint back once unrouted", || {
        taint_keys(&api, "node-0")
            .contains(&names::TAINT_NOT_READY.to_string())
            .then_some(())
    })
    .await;
    // It answers again: healthy after the hold-down, routed, untainted.
    prober.down.lock().unwrap().clear();
    wait_for("taint removed after recovery", || {
        (!taint_keys(&api, "node-0").contains(&names::TAINT_NOT_READY.to_string())).then_some(())
    })
    .await;
    assert!(routed_to(&w, block0, &eni0));
    assert!(api.take_unexpected().is_empty());
    r.stop().await;
}

/// The label the selector tests manage nodes by.
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

fn pod_cidr(api: &ApiSim, name: &str) -> Option<String> {
    api.get::<Node>(None, name)?.spec?.pod_cidr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_selected_nodes_are_managed_and_a_node_leaving_the_selection_is_released() {
    let w = mk_world(32, 0, 50);
    let api = ApiSim::new();
    for i in 0..4 {
        mk_node(&w, &api, &format!("node-{i}"), i);
    }
    set_managed(&api, "node-0", true);
    set_managed(&api, "node-1", true);
    // node-2 still carries the taint of a configuration that managed every node.
    assert!(api.modify::<Node>(None, "node-2", |n| {
        let spec = n.spec.as_mut().unwrap();
        spec.taints.as_mut().unwrap().push(Taint {
            key: names::TAINT_NOT_READY.into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        });
    }));
    let selector: NodeSelector = "underlay.dev/managed=true".parse().unwrap();
    let r = start_selecting(
        &w,
        &api,
        (
            "replica-a",
            Duration::from_secs(2),
            Duration::from_millis(300),
        ),
        Arc::new(AlwaysUp),
        |_| {},
        selector,
    );
    let uns = converged(&api, 2).await;
    assert_eq!(
        uns.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["node-0", "node-1"]
    );
    for name in ["node-0", "node-1"] {
        wait_for("selected nodes tainted and given a podCIDR", || {
            (taint_keys(&api, name).contains(&names::TAINT_NOT_READY.to_string())
                && pod_cidr(&api, name).is_some())
            .then_some(())
        })
        .await;
    }
    wait_for("the leftover taint of an unselected node removed", || {
        (taint_keys(&api, "node-2") == vec!["example.com/dedicated"]).then_some(())
    })
    .await;
    // The unselected nodes: no UnderlayNode, no podCIDR, no route, and node-3 never written to.
    for name in ["node-2", "node-3"] {
        assert!(api.get::<UnderlayNode>(None, name).is_none());
        assert_eq!(pod_cidr(&api, name), None);
    }
    assert_eq!(taint_keys(&api, "node-3"), vec!["example.com/dedicated"]);
    assert!(
        !r.requests
            .lock()
            .unwrap()
            .iter()
            .any(|(m, p, _)| m != "GET" && p.ends_with("/nodes/node-3")),
        "an unselected Node was written"
    );
    let selected_blocks: Vec<ipnet::Ipv4Net> = uns.values().map(block_of).collect();
    for t in &w.tables {
        for d in w.owned(t).keys() {
            assert!(
                selected_blocks
                    .iter()
                    .any(|b| d.contains(b) || b.contains(d)),
                "{t}: route {d} covers no selected node's block"
            );
        }
    }

    // Labelling a node makes it join.
    set_managed(&api, "node-3", true);
    let uns = converged(&api, 3).await;
    assert!(uns.contains_key("node-3"));
    wait_for("the joining node tainted and given a podCIDR", || {
        (taint_keys(&api, "node-3").contains(&names::TAINT_NOT_READY.to_string())
            && pod_cidr(&api, "node-3").is_some())
        .then_some(())
    })
    .await;

    // Unlabelling releases a node as a deletion would: routes first, then the UnderlayNode; and its taint goes.
    let block = block_of(&uns["node-1"]);
    set_managed(&api, "node-1", false);
    wait_for("the UnderlayNode of the unselected node gone", || {
        api.get::<UnderlayNode>(None, "node-1")
            .is_none()
            .then_some(())
    })
    .await;
    for t in &w.tables {
        assert!(
            !w.owned(t).keys().any(|d| *d == block),
            "{t}: route for the unselected node's block remains"
        );
    }
    wait_for("the unselected node's taint removed", || {
        (taint_keys(&api, "node-1") == vec!["example.com/dedicated"]).then_some(())
    })
    .await;
    // The Node itself stays, and later passes leave it alone.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(api.get::<UnderlayNode>(None, "node-1").is_none());
    assert_eq!(taint_keys(&api, "node-1"), vec!["example.com/dedicated"]);
    assert_eq!(api.list::<UnderlayNode>().len(), 2);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_route_inside_the_pod_cidr_is_an_event_on_the_lease_and_left_alone() {
    use k8s_openapi::api::events::v1::Event;
    let w = mk_world(38, 0, 50);
    let tgw = w.sim.create_transit_gateway(&w.vpc).unwrap();
    let dest = common::net("100.64.200.0/24");
    w.sim
        .add_route(&w.tables[0], dest, &RouteTarget::Gateway(tgw.clone()))
        .unwrap();
    let api = ApiSim::new();
    mk_node(&w, &api, "node-0", 0);
    mk_node(&w, &api, "node-1", 1);
    let r = start_with(
        &w,
        &api,
        "replica-a",
        Duration::from_secs(2),
        Duration::from_millis(300),
        Arc::new(ScriptedProber::default()),
    );
    let uns = converged(&api, 2).await;
    let ev = wait_for("ForeignRoute event", || {
        api.list::<Event>().into_iter().find(|e| {
            e.reason.as_deref() == Some(underlay_controller::routed::REASON_FOREIGN_ROUTE)
        })
    })
    .await;
    let regarding = ev.regarding.clone().unwrap();
    assert_eq!(regarding.kind.as_deref(), Some("Lease"));
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    let note = ev.note.clone().unwrap_or_default();
    assert!(
        note.contains(&tgw) && note.contains("100.64.200.0/24"),
        "{note}"
    );
    assert_eq!(
        w.routes(&w.tables[0]).get(&dest),
        Some(&RouteTarget::Gateway(tgw.clone()))
    );
    for un in uns.values() {
        let block: ipnet::Ipv4Net = un
            .status
            .as_ref()
            .unwrap()
            .pool
            .as_ref()
            .unwrap()
            .block
            .as_ref()
            .unwrap()
            .parse()
            .unwrap();
        assert!(!dest.contains(&block) && !block.contains(&dest));
    }
    r.stop().await;
}
