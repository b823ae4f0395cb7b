//! `underlay controller`: the routed-mode controller on a cluster — Kubernetes through kube-rs (in-cluster or
//! kubeconfig), EC2 through aws-sdk-ec2 behind the rate-aware queue. The same `run_routed_on_kube` the lab runs.
//! Serves `/healthz`, `/readyz` and `/metrics` on `--health-addr` (docs/metrics.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ipnet::Ipv4Net;
use prometheus_client::registry::Registry;
use underlay_cloud::queue::QueueConfig;
use underlay_cloud::{CloudMetrics, VpcId};
use underlay_cloud_aws::{AwsOptions, Ec2Cloud};
use underlay_controller::config::DEFAULT_RESYNC;
use underlay_controller::kube::{KubeOptions, run_routed_on_kube};
use underlay_controller::metrics::{
    ControllerHealth, ControllerMetrics, MetricsServer, STALE_PASSES, observe,
};
use underlay_controller::{CloudLanes, ControllerConfig, RoutedConfig, TwoLanes};
use underlay_core::names;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The cluster's VPC (vpc-…).
    #[arg(long)]
    vpc: String,
    /// The cluster pod CIDR; every route inside it in a managed table is underlay's.
    #[arg(long)]
    pod_cidr: Ipv4Net,
    /// Pod block per node (prefix length).
    #[arg(long, default_value_t = 26)]
    block: u8,
    /// Route limit of the managed route tables (an account quota EC2 does not report).
    #[arg(long, default_value_t = 50)]
    route_limit: u32,
    /// Forwarder health probe interval (ms).
    #[arg(long, default_value_t = 1000)]
    probe_interval_ms: u64,
    /// A failed forwarder must stay healthy this long before routes return to it (s).
    #[arg(long, default_value_t = 30)]
    hold_down_s: u64,
    /// Namespace of the leader-election Lease.
    #[arg(long, default_value = "kube-system")]
    lease_namespace: String,
    /// EC2 endpoint URL (a VPC interface endpoint); default: the region's.
    #[arg(long)]
    endpoint: Option<String>,
    /// AWS region; default: the standard chain.
    #[arg(long)]
    region: Option<String>,
    /// Address of the `/healthz`, `/readyz` and `/metrics` endpoint.
    #[arg(long, default_value_t = default_health_addr())]
    health_addr: SocketAddr,
}

/// `0.0.0.0:9651`.
fn default_health_addr() -> SocketAddr {
    SocketAddr::new(
        std::net::Ipv4Addr::UNSPECIFIED.into(),
        names::CONTROLLER_HEALTH_PORT,
    )
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    super::init_tracing("info");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut registry = Registry::default();
        let cloud_metrics = CloudMetrics::register(&mut registry);
        let metrics = ControllerMetrics::register(&mut registry);
        let health = ControllerHealth::new(DEFAULT_RESYNC * STALE_PASSES);
        let server = MetricsServer::bind(args.health_addr, Arc::new(registry), health.clone())
            .await
            .with_context(|| format!("binding the health endpoint on {}", args.health_addr))?;
        tracing::info!(addr = %args.health_addr, "health and metrics endpoint listening");
        tokio::spawn(server.serve());
        let options = AwsOptions {
            region: args.region.clone(),
            endpoint: args.endpoint.clone(),
            ..AwsOptions::default()
        };
        let ec2 = Ec2Cloud::new(&options).await?;
        let queue = underlay_cloud::queue::RateLimitedCloud::new_with_metrics(
            ec2.clone(),
            QueueConfig::default(),
            cloud_metrics,
        );
        let lanes: Arc<dyn CloudLanes> = Arc::new(TwoLanes::over_queue(queue.clone()));
        let cloud: Arc<dyn underlay_cloud::Cloud> = Arc::new(queue);
        let client = kube::Client::try_default()
            .await
            .context("no Kubernetes client configuration (in-cluster or kubeconfig)")?;
        health.set_client(true);
        let mut routed = RoutedConfig::new(VpcId::new(&args.vpc), args.pod_cidr);
        routed.block_prefix_len = args.block;
        routed.route_limit = args.route_limit;
        // Behind the rate-aware queue: a pass reports (and nodes are untainted) after a burst's worth of calls.
        routed.max_ops_per_pass = Some(underlay_controller::routes::DEFAULT_QUEUED_OPS_PER_PASS);
        let mut config = ControllerConfig::new(routed);
        config.probe.interval = Duration::from_millis(args.probe_interval_ms);
        config.health.hold_down = Duration::from_secs(args.hold_down_s);
        let (leading_tx, leading_rx) = tokio::sync::watch::channel(false);
        let (events_tx, events_rx) = tokio::sync::broadcast::channel(1024);
        tokio::spawn(observe(metrics, health, events_rx, leading_rx));
        let opts = KubeOptions {
            lease_namespace: args.lease_namespace.clone(),
            leading: Some(leading_tx),
            ..KubeOptions::default()
        };
        let (stop, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop.send(true);
        });
        run_routed_on_kube(
            client,
            cloud,
            lanes,
            config,
            None,
            opts,
            rx,
            Some(events_tx),
        )
        .await?;
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
