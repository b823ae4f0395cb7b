//! underlay-ipam-transport-bench: gRPC (tonic over the unix socket) vs. the lean framing (length-prefixed prost
//! over a std UnixStream), measured the way the CNI plugin uses the socket: a fresh process per call that
//! connects, allocates, releases and exits.
//!
//! ```text
//!   bench ──spawn──► client --transport lean|grpc   (N times each, interleaved)
//!     │                 connect + Allocate + Release, prints its own elapsed ns
//!     └─ in-process: lean server (the agent's) + tonic server, each over the same IpamService code
//! ```
//!
//! Output: one JSON object on stdout (p50/p99 of the in-process call time and of the whole process
//! lifetime, per transport). Usage: `underlay-ipam-transport-bench [--n 300]`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use underlay_agent::checkpoint::Checkpoint;
use underlay_agent::server::IpamListener;
use underlay_agent::{Fault, IpamService};
use underlay_core::ipam::PoolSpec;
use underlay_ipam_api::{AllocateRequest, AttachmentKey, Client, pb};

#[allow(clippy::all, missing_debug_implementations)]
mod grpc {
    include!(concat!(env!("OUT_DIR"), "/underlay.ipam.v1.rs"));
}

struct GrpcIpam(Arc<IpamService>);

impl std::fmt::Debug for GrpcIpam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrpcIpam")
    }
}

type Res<T> = Result<tonic::Response<T>, tonic::Status>;

#[tonic::async_trait]
impl grpc::ipam_server::Ipam for GrpcIpam {
    async fn allocate(&self, r: tonic::Request<pb::AllocateRequest>) -> Res<pb::AllocateReply> {
        let svc = self.0.clone();
        let reply = tokio::task::spawn_blocking(move || svc.allocate(r.into_inner()))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(reply))
    }
    async fn release(&self, r: tonic::Request<pb::ReleaseRequest>) -> Res<pb::ReleaseReply> {
        let svc = self.0.clone();
        let reply = tokio::task::spawn_blocking(move || svc.release(r.into_inner()))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(reply))
    }
    async fn list(&self, _r: tonic::Request<pb::ListRequest>) -> Res<pb::ListReply> {
        Ok(tonic::Response::new(self.0.list()))
    }
    async fn gc(&self, r: tonic::Request<pb::GcRequest>) -> Res<pb::GcReply> {
        let svc = self.0.clone();
        let reply = tokio::task::spawn_blocking(move || svc.gc(r.into_inner()))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(reply))
    }
}

fn req(id: &str) -> AllocateRequest {
    AllocateRequest {
        key: Some(AttachmentKey::new(id, "eth0")),
        netns: format!("/var/run/netns/{id}"),
        pod_namespace: "bench".into(),
        pod_name: id.into(),
    }
}

/// The lean client, exactly as the plugin calls it.
fn client_lean(socket: &Path, id: &str) -> Result<(), Box<dyn std::error::Error>> {
    let c = Client::connect(socket)?;
    c.allocate(&req(id))?;
    c.release(&AttachmentKey::new(id, "eth0"))?;
    Ok(())
}

/// The tonic client as a plugin would have to call it: its own current_thread runtime, one HTTP/2 connection.
fn client_grpc(socket: &Path, id: &str) -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let socket = socket.to_owned();
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::try_from("http://[::1]:50051")?
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await?;
        let mut c = grpc::ipam_client::IpamClient::new(channel);
        let a = c.allocate(req(id)).await?.into_inner();
        if let Some(pb::allocate_reply::Result::Error(e)) = a.result {
            return Err(e.message.into());
        }
        c.release(pb::ReleaseRequest {
            key: Some(AttachmentKey::new(id, "eth0")),
            ..Default::default()
        })
        .await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(|a, b| a.total_cmp(b));
    serde_json::json!({
        "p50_us": (percentile(&v, 0.50) * 10.0).round() / 10.0,
        "p99_us": (percentile(&v, 0.99) * 10.0).round() / 10.0,
        "mean_us": ((v.iter().sum::<f64>() / v.len() as f64) * 10.0).round() / 10.0,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("client") {
        // client <lean|grpc> <socket> <id>
        let (transport, socket, id) = (&args[2], PathBuf::from(&args[3]), &args[4]);
        let start = Instant::now();
        match transport.as_str() {
            "lean" => client_lean(&socket, id)?,
            "grpc" => client_grpc(&socket, id)?,
            other => return Err(format!("unknown transport {other}").into()),
        }
        println!("{}", start.elapsed().as_nanos());
        return Ok(());
    }
    let n: usize = match args.iter().position(|a| a == "--n") {
        Some(i) => args.get(i + 1).ok_or("--n needs a value")?.parse()?,
        None => 300,
    };

    // State under /dev/shm when present, so fsync latency of the build machine's disk does not drown the
    // transport difference (both transports pay the same checkpoint write).
    let base = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm")?
    } else {
        tempfile::tempdir()?
    };
    let open = |name: &str| {
        IpamService::open(
            PoolSpec::Block("100.64.0.0/20".parse().unwrap()),
            Duration::from_secs(60),
            Checkpoint::new(base.path().join(format!("{name}.json"))),
            9001,
            Fault::None,
        )
        .map(Arc::new)
    };
    let lean_svc = open("lean")?;
    let grpc_svc = open("grpc")?;
    let lean_sock = base.path().join("lean.sock");
    let grpc_sock = base.path().join("grpc.sock");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let lean_listener = rt.block_on(async { IpamListener::bind(&lean_sock) })?;
    let lean_listener = Arc::new(lean_listener);
    {
        let l = lean_listener.clone();
        rt.spawn(async move { l.serve(lean_svc).await });
    }
    let grpc_uds = rt.block_on(async { tokio::net::UnixListener::bind(&grpc_sock) })?;
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(grpc::ipam_server::IpamServer::new(GrpcIpam(grpc_svc)))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(grpc_uds)),
    );

    let exe = std::env::current_exe()?;
    let mut in_proc: [Vec<f64>; 2] = [vec![], vec![]];
    let mut whole: [Vec<f64>; 2] = [vec![], vec![]];
    let transports = [("lean", &lean_sock), ("grpc", &grpc_sock)];
    // A few warm-up rounds (page cache, first connection), then interleaved measured rounds.
    for round in 0..(n + 5) {
        for (t, (name, sock)) in transports.iter().enumerate() {
            let id = format!("{name}-{round}");
            let start = Instant::now();
            let out = Command::new(&exe)
                .args(["client", name])
                .arg(sock)
                .arg(&id)
                .output()?;
            let wall = start.elapsed().as_nanos() as f64 / 1000.0;
            if !out.status.success() {
                return Err(format!(
                    "{name} client failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            }
            let ns: f64 = String::from_utf8(out.stdout)?.trim().parse()?;
            if round >= 5 {
                in_proc[t].push(ns / 1000.0);
                whole[t].push(wall);
            }
        }
    }
    let [lean_in, grpc_in] = in_proc;
    let [lean_whole, grpc_whole] = whole;
    let p50 = |v: &Vec<f64>| {
        let mut s = v.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        percentile(&s, 0.5)
    };
    let grpc_cost_in = p50(&grpc_in) - p50(&lean_in);
    let grpc_cost_whole = p50(&grpc_whole) - p50(&lean_whole);
    let report = serde_json::json!({
        "bench": "ipam-transport",
        "calls_per_transport": n,
        "what": "fresh process per call: connect + Allocate + Release",
        "lean": { "in_process": summary(lean_in), "process_wall": summary(lean_whole) },
        "grpc": { "in_process": summary(grpc_in), "process_wall": summary(grpc_whole) },
        "grpc_extra_p50_us": {
            "in_process": (grpc_cost_in * 10.0).round() / 10.0,
            "process_wall": (grpc_cost_whole * 10.0).round() / 10.0,
        },
        "bar_us": 300,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    drop(lean_listener);
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}
