//! The agent's `/metrics` over real TCP on 127.0.0.1 (an ephemeral port), after real IPAM requests through the
//! plugin's client on the real socket: request counters and latency histogram by method, pool size and usage,
//! allocations and releases, and exhaustion. No root needed: temp dirs only.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use underlay_agent::health_http::{HealthServer, METRICS_CONTENT_TYPE, Ready};
use underlay_agent::{AgentConfig, AgentMetrics, Fault, config::PoolConfig};
use underlay_core::ipam::{Ipam, PoolSpec};
use underlay_ipam_api::{AllocateRequest, AttachmentKey, Client, ClientError};

const BLOCK: &str = "100.64.3.0/29";

fn mk_config(dir: &Path) -> AgentConfig {
    AgentConfig {
        pool: PoolConfig {
            block: Some(BLOCK.parse().unwrap()),
            addresses: vec![],
        },
        socket: dir.join("run/agent.sock"),
        checkpoint: dir.join("state/ipam.json"),
        cni_conf_dir: dir.join("net.d"),
        cni_bin_dir: dir.join("bin"),
        reap_links: false,
        ..AgentConfig::default()
    }
}

/// GET `path`: status line, headers and body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("server answers")
        .unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (
        head[9..12].parse().unwrap(),
        head.to_string(),
        body.to_string(),
    )
}

/// The value of the sample whose name and labels are exactly `series`.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

fn req(id: &str) -> AllocateRequest {
    AllocateRequest {
        key: Some(AttachmentKey::new(id, "eth0")),
        netns: format!("/var/run/netns/{id}"),
        pod_namespace: "default".into(),
        pod_name: format!("pod-{id}"),
    }
}

/// Runs `f` with a client on the agent's socket, off the runtime (the client blocks).
async fn with_client<T: Send + 'static>(
    socket: &Path,
    f: impl FnOnce(&Client) -> T + Send + 'static,
) -> T {
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || f(&Client::connect(&socket).unwrap()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipam_requests_move_the_histogram_the_counters_and_the_pool_gauges() {
    let dir = tempfile::tempdir().unwrap();
    let config = mk_config(dir.path());
    std::fs::create_dir_all(config.checkpoint.parent().unwrap()).unwrap();
    let metrics = AgentMetrics::new();
    let service = Arc::new(underlay_agent::open_service(&config, Fault::None).unwrap());
    service.set_metrics(metrics.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(underlay_agent::serve(config.clone(), service, async {
        let _ = stop_rx.await;
    }));
    let server = HealthServer::bind("127.0.0.1:0".parse().unwrap(), Ready::default(), None)
        .await
        .unwrap()
        .with_metrics(metrics);
    let addr = server.local_addr().unwrap();
    let health = tokio::spawn(server.serve());
    for _ in 0..500 {
        if Client::connect(&config.socket).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let capacity = Ipam::new(
        PoolSpec::Block(BLOCK.parse().unwrap()),
        Duration::from_secs(60),
    )
    .unwrap()
    .capacity() as f64;
    assert!(capacity >= 2.0);

    let (code, head, m) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(head.contains(METRICS_CONTENT_TYPE), "{head}");
    assert_eq!(
        sample(&m, "underlay_agent_pool_size_addresses"),
        Some(capacity)
    );
    assert_eq!(sample(&m, "underlay_agent_pool_used_addresses"), Some(0.0));
    let build = format!(
        r#"underlay_build_info{{component="agent",version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&m, &build), Some(1.0), "{m}");
    assert_eq!(
        sample(
            &m,
            r#"underlay_agent_ipam_request_duration_seconds_count{method="allocate"}"#
        ),
        None
    );

    // Two ADDs, one repeated, one DEL, one CHECK.
    with_client(&config.socket, |c| {
        c.allocate(&req("a")).unwrap();
        c.allocate(&req("b")).unwrap();
        c.allocate(&req("a")).unwrap();
        c.release(&AttachmentKey::new("b", "eth0"))
            .unwrap()
            .unwrap();
        c.list().unwrap();
    })
    .await;
    let (_, _, m) = get(addr, "/metrics").await;
    let v = |s: &str| sample(&m, s);
    assert_eq!(
        v(r#"underlay_agent_ipam_requests_total{method="allocate",result="ok"}"#),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        v(r#"underlay_agent_ipam_request_duration_seconds_count{method="allocate"}"#),
        Some(3.0)
    );
    assert_eq!(
        v(r#"underlay_agent_ipam_request_duration_seconds_count{method="release"}"#),
        Some(1.0)
    );
    assert_eq!(
        v(r#"underlay_agent_ipam_requests_total{method="list",result="ok"}"#),
        Some(1.0)
    );
    // The repeat of a's ADD answered the same address: not a new allocation.
    assert_eq!(v("underlay_agent_ipam_allocations_total"), Some(2.0));
    assert_eq!(
        v(r#"underlay_agent_ipam_releases_total{reason="del"}"#),
        Some(1.0)
    );
    assert_eq!(v("underlay_agent_pool_used_addresses"), Some(1.0));
    // The +Inf bucket holds every request; the sum is a real, positive duration.
    assert_eq!(
        v(r#"underlay_agent_ipam_request_duration_seconds_bucket{le="+Inf",method="allocate"}"#),
        Some(3.0)
    );
    assert!(
        v(r#"underlay_agent_ipam_request_duration_seconds_sum{method="allocate"}"#)
            .is_some_and(|s| s > 0.0)
    );

    // ADD until the pool is exhausted (b's address is cooling down): the refusal is counted by its code.
    let exhausted = with_client(&config.socket, move |c| {
        (0..capacity as usize + 2).find(|i| match c.allocate(&req(&format!("p{i}"))) {
            Ok(_) => false,
            Err(ClientError::PoolExhausted(_)) => true,
            Err(e) => panic!("{e}"),
        })
    })
    .await
    .expect("the pool runs out");
    let (_, _, m) = get(addr, "/metrics").await;
    assert_eq!(
        sample(
            &m,
            r#"underlay_agent_ipam_requests_total{method="allocate",result="pool_exhausted"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "underlay_agent_pool_used_addresses"),
        Some(1.0 + exhausted as f64)
    );
    assert_eq!(
        sample(&m, "underlay_agent_ipam_allocations_total"),
        Some(2.0 + exhausted as f64)
    );

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    health.abort();
}
