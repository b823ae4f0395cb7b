//! The controller's `/metrics`, `/healthz` and `/readyz`, scraped over real TCP on 127.0.0.1:0: the queue's EC2
//! counters against vpcsim with injected throttling and errors, and the controller's own figures (leader, routes
//! per table vs limit, failovers) and readiness as a leader and as a standby, on apisim. Real clock; every wait is
//! a bounded poll.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{World, mk_world, net};
use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, watch};
use underlay_apisim::ApiSim;
use underlay_cloud::queue::{QueueConfig, RateLimitedCloud, RetryPolicy};
use underlay_cloud::{Cloud, CloudMetrics, Operation};
use underlay_controller::metrics::{ControllerHealth, ControllerMetrics, MetricsServer, observe};
use underlay_controller::{
    CloudLanes, ControllerConfig, Priority, ProbeTarget, Prober, RouteReconciler, TwoLanes,
};
use underlay_controller::{KubeOptions, run_routed_on_kube};
use underlay_core::health::Probe;
use underlay_vpcsim::{Faults, RunInstance};

const WAIT: Duration = Duration::from_secs(30);

/// GET `path` on `addr`: status code and body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .expect("answer in time")
        .expect("HTTP exchange");
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// The value of the sample whose name and labels are exactly `series` (e.g. `x_total{a="b"}`).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// Route operations applied at `priority`, all ops together.
fn ops(body: &str, priority: &str) -> f64 {
    ["create", "replace", "delete"]
        .iter()
        .filter_map(|op| {
            sample(
                body,
                &format!(
                    r#"underlay_controller_route_operations_total{{op="{op}",priority="{priority}"}}"#
                ),
            )
        })
        .sum()
}

async fn scrape(addr: SocketAddr) -> String {
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    body
}

/// Poll until `f` holds, for at most [`WAIT`].
async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn fast_retries() -> QueueConfig {
    QueueConfig {
        retry: RetryPolicy {
            base: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            deadline: Duration::from_secs(5),
            max_attempts: 4,
        },
        ..QueueConfig::default()
    }
}

struct Endpoint {
    addr: SocketAddr,
    health: ControllerHealth,
    metrics: ControllerMetrics,
    cloud: CloudMetrics,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn endpoint() -> Endpoint {
    let mut registry = Registry::default();
    let cloud = CloudMetrics::register(&mut registry);
    let metrics = ControllerMetrics::register(&mut registry);
    let health = ControllerHealth::new(Duration::from_secs(300));
    let server = MetricsServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(registry),
        health.clone(),
    )
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    Endpoint {
        addr,
        health,
        metrics,
        cloud,
        server: tokio::spawn(server.serve()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_calls_are_counted_by_result_with_throttles_and_retries() {
    let w = mk_world(11, 6, 50);
    let ep = endpoint().await;
    let queue = RateLimitedCloud::new_with_metrics(
        w.sim.as_ref().clone(),
        fast_retries(),
        ep.cloud.clone(),
    );
    // The first two CreateRoutes are throttled (and retried by the queue), the first describe fails in EC2.
    let mut faults = Faults::default();
    faults.fail_next.insert(
        Operation::CreateRoute,
        ["RequestLimitExceeded", "RequestLimitExceeded"]
            .map(String::from)
            .into(),
    );
    faults.fail_next.insert(
        Operation::DescribeSubnets,
        ["InternalError"].map(String::from).into(),
    );
    w.sim.set_faults(faults);

    let before = scrape(ep.addr).await;
    assert_eq!(
        sample(
            &before,
            r#"underlay_ec2_throttles_total{operation="CreateRoute"}"#
        ),
        None
    );

    let lanes: Arc<dyn CloudLanes> = Arc::new(TwoLanes::over_queue(queue.clone()));
    let mut r = RouteReconciler::new(w.config(), lanes);
    let rep = r
        .reconcile(&w.nodes, &w.all_healthy(), Priority::Normal)
        .await;
    assert!(rep.converged(), "{:?}", rep.errors);
    let creates = rep.applied.len() as f64;
    assert!(creates > 0.0);
    // A client error: deleting a route that is not there.
    let missing = queue
        .delete_route(&w.tables[0], net("100.127.0.0/24"))
        .await
        .unwrap_err();
    assert!(missing.is_not_found());

    let m = scrape(ep.addr).await;
    let v = |s: &str| sample(&m, s);
    assert_eq!(
        v(r#"underlay_ec2_throttles_total{operation="CreateRoute"}"#),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        v(r#"underlay_ec2_requests_total{operation="CreateRoute",result="throttled"}"#),
        Some(2.0)
    );
    assert_eq!(
        v(r#"underlay_ec2_retries_total{operation="CreateRoute",kind="throttled"}"#),
        Some(2.0)
    );
    assert_eq!(
        v(r#"underlay_ec2_requests_total{operation="CreateRoute",result="ok"}"#),
        Some(creates)
    );
    assert_eq!(
        v(r#"underlay_ec2_requests_total{operation="DescribeSubnets",result="server_error"}"#),
        Some(1.0)
    );
    assert_eq!(
        v(r#"underlay_ec2_retries_total{operation="DescribeSubnets",kind="service"}"#),
        Some(1.0)
    );
    assert_eq!(
        v(r#"underlay_ec2_requests_total{operation="DeleteRoute",result="client_error"}"#),
        Some(1.0)
    );
    assert_eq!(
        v(r#"underlay_ec2_errors_total{operation="DeleteRoute",kind="not_found"}"#),
        Some(1.0)
    );
    assert_eq!(
        v(r#"underlay_ec2_request_duration_seconds_count{operation="CreateRoute"}"#),
        Some(creates + 2.0)
    );
    // Every caller left the queue; each token granted was timed, in the bucket of its own action (EC2 throttles
    // per action): every CreateRoute including the two throttled tries, and the one DeleteRoute.
    for bucket in ["CreateRoute", "DeleteRoute"] {
        assert_eq!(
            v(&format!(
                r#"underlay_ec2_queue_depth{{bucket="{bucket}",lane="normal"}}"#
            )),
            Some(0.0),
            "{bucket}"
        );
    }
    assert_eq!(
        v(r#"underlay_ec2_queue_wait_seconds_count{bucket="CreateRoute",lane="normal"}"#),
        Some(creates + 2.0)
    );
    assert_eq!(
        v(r#"underlay_ec2_queue_wait_seconds_count{bucket="DeleteRoute",lane="normal"}"#),
        Some(1.0)
    );
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
            ..Default::default()
        }),
        status: None,
    });
}

struct Replica {
    ep: Endpoint,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    observer: tokio::task::JoinHandle<()>,
}

impl Replica {
    async fn stop(self) {
        self.shutdown.send_replace(true);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("replica stops")
            .unwrap();
        self.observer.abort();
    }
}

/// A replica behind its own metered queue, with its endpoint and observer, as `underlay controller` wires them.
async fn start(w: &World, api: &ApiSim, identity: &str, prober: Arc<dyn Prober>) -> Replica {
    let ep = endpoint().await;
    let queue = RateLimitedCloud::new_with_metrics(
        w.sim.as_ref().clone(),
        fast_retries(),
        ep.cloud.clone(),
    );
    let lanes: Arc<dyn CloudLanes> = Arc::new(TwoLanes::over_queue(queue.clone()));
    let cloud: Arc<dyn Cloud> = Arc::new(queue);
    let (leading_tx, leading_rx) = watch::channel(false);
    let (events_tx, events_rx) = broadcast::channel(1024);
    let observer = tokio::spawn(observe(
        ep.metrics.clone(),
        ep.health.clone(),
        events_rx,
        leading_rx,
    ));
    let client = kube::Client::new(api.service(), "default");
    ep.health.set_client(true);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let opts = KubeOptions {
        identity: identity.to_string(),
        lease_namespace: "kube-system".into(),
        lease_duration: Duration::from_secs(2),
        renew_every: Duration::from_millis(300),
        retry_every: Duration::from_millis(100),
        leading: Some(leading_tx),
        passes: None,
        node_selector: Default::default(),
    };
    let mut config = ControllerConfig::new(w.config());
    config.probe.interval = Duration::from_millis(100);
    config.health.misses_to_fail = 2;
    let task = tokio::spawn(async move {
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
    });
    Replica {
        ep,
        shutdown,
        task,
        observer,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_and_standby_report_health_routes_and_failovers() {
    let w = mk_world(23, 0, 50);
    let api = ApiSim::new();
    for (i, name) in ["node-0", "node-1", "node-2"].into_iter().enumerate() {
        // node-0 and node-1 share a subnet: node-1 takes over node-0's route when it fails.
        mk_node(&w, &api, name, if i < 2 { 0 } else { 1 });
    }
    // Without a Kubernetes client a replica is alive but not ready.
    let bare = endpoint().await;
    assert_eq!(get(bare.addr, "/healthz").await.0, 200);
    let (code, body) = get(bare.addr, "/readyz").await;
    assert_eq!((code, body.trim()), (503, "no Kubernetes client yet"));
    drop(bare);

    // The leader cannot describe its nodes' instances yet: it leads, but has no pass, so it is not ready.
    let mut faults = Faults::default();
    faults.throttled.insert(Operation::DescribeInstances);
    w.sim.set_faults(faults);
    let prober = Arc::new(ScriptedProber::default());
    let a = start(&w, &api, "replica-a", prober.clone()).await;
    wait_until("replica-a leading", || async {
        sample(&scrape(a.ep.addr).await, "underlay_controller_leader") == Some(1.0)
    })
    .await;
    wait_until("throttled describes counted", || async {
        sample(
            &scrape(a.ep.addr).await,
            r#"underlay_ec2_throttles_total{operation="DescribeInstances"}"#,
        )
        .is_some_and(|n| n >= 2.0)
    })
    .await;
    let (code, body) = get(a.ep.addr, "/readyz").await;
    assert_eq!(
        (code, body.trim()),
        (503, "leading; first pass not finished")
    );
    assert_eq!(get(a.ep.addr, "/healthz").await.0, 200);

    // EC2 answers again: the first pass lands, the leader becomes ready and reports every managed table.
    w.sim.set_faults(Faults::default());
    wait_until("replica-a ready", || async {
        get(a.ep.addr, "/readyz").await.0 == 200
    })
    .await;
    let m = scrape(a.ep.addr).await;
    let managed: Vec<_> = w
        .tables
        .iter()
        .filter(|t| {
            sample(
                &m,
                &format!(
                    r#"underlay_controller_route_limit{{route_table="{}"}}"#,
                    t.0
                ),
            )
            .is_some()
        })
        .collect();
    assert!(!managed.is_empty(), "{m}");
    for t in &managed {
        assert_eq!(
            sample(
                &m,
                &format!(
                    r#"underlay_controller_route_limit{{route_table="{}"}}"#,
                    t.0
                )
            ),
            Some(50.0)
        );
        // Two foreign routes per table (internet, peering); underlay's as the table holds them.
        assert_eq!(
            sample(
                &m,
                &format!(
                    r#"underlay_controller_routes{{route_table="{}",owner="foreign"}}"#,
                    t.0
                )
            ),
            Some(2.0)
        );
        let owned = w.owned(t).len() as f64;
        assert!(owned > 0.0);
        assert_eq!(
            sample(
                &m,
                &format!(
                    r#"underlay_controller_routes{{route_table="{}",owner="underlay"}}"#,
                    t.0
                )
            ),
            Some(owned),
            "{m}"
        );
    }
    assert_eq!(sample(&m, "underlay_controller_nodes"), Some(3.0));
    assert_eq!(sample(&m, "underlay_controller_failovers_total"), Some(0.0));
    assert!(ops(&m, "normal") > 0.0, "{m}");

    // A standby is ready (or a rollout would stall) and says it is not the leader.
    let b = start(&w, &api, "replica-b", Arc::new(ScriptedProber::default())).await;
    wait_until("replica-b ready as a standby", || async {
        get(b.ep.addr, "/readyz").await.0 == 200
    })
    .await;
    let mb = scrape(b.ep.addr).await;
    assert_eq!(sample(&mb, "underlay_controller_leader"), Some(0.0));
    assert!(!mb.contains("underlay_controller_routes{"), "{mb}");

    // node-0 stops answering its probes: one failover, its route moved in the failover lane.
    prober.down.lock().unwrap().insert("node-0".into());
    wait_until("the failover counted", || async {
        let m = scrape(a.ep.addr).await;
        sample(&m, "underlay_controller_failovers_total") == Some(1.0) && ops(&m, "failover") > 0.0
    })
    .await;
    let m = scrape(a.ep.addr).await;
    assert_eq!(
        sample(
            &m,
            r#"underlay_controller_forwarder_transitions_total{from="healthy",to="failed"}"#
        ),
        Some(1.0)
    );
    assert_eq!(sample(&m, "underlay_controller_healthy_nodes"), Some(2.0));

    b.stop().await;
    a.stop().await;
}
