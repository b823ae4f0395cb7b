//! `underlay controller`: the controller on a cluster — Kubernetes through kube-rs (in-cluster or kubeconfig), EC2
//! through aws-sdk-ec2 behind the rate-aware queue. `--mode routed` (default) runs `run_routed_on_kube`, the same
//! the lab runs; `--mode eni` runs `run_eni_on_kube`. Serves `/healthz`, `/readyz` and `/metrics` on
//! `--health-addr` (docs/metrics.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ipnet::Ipv4Net;
use prometheus_client::registry::Registry;
use underlay_cloud::queue::QueueConfig;
use underlay_cloud::{CloudMetrics, SecurityGroupId, SubnetId, VpcId};
use underlay_cloud_aws::{AwsOptions, Ec2Cloud};
use underlay_controller::config::DEFAULT_RESYNC;
use underlay_controller::eni::EniSettings;
use underlay_controller::eni::kube::{DEFAULT_ENI_RESYNC, run_eni_on_kube};
use underlay_controller::metrics::{
    ControllerHealth, ControllerMetrics, MetricsServer, STALE_PASSES, observe,
};
use underlay_controller::policy_events::{PolicyCheckMetrics, run_policy_check};
use underlay_controller::{CloudLanes, ControllerConfig, NodeSelector, RoutedConfig, TwoLanes};
use underlay_controller::{KubeOptions, run_routed_on_kube};
use underlay_core::eni_pool::{AddressMode, Targets};
use underlay_core::names;

/// Address mode of the cluster's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Routed,
    Eni,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, value_enum, default_value = "routed")]
    mode: Mode,
    /// The cluster's VPC (vpc-…). Routed mode.
    #[arg(long, required_if_eq("mode", "routed"))]
    vpc: Option<String>,
    /// The cluster pod CIDR; every route inside it in a managed table is underlay's. Routed mode.
    #[arg(long, required_if_eq("mode", "routed"))]
    pod_cidr: Option<Ipv4Net>,
    #[command(flatten)]
    eni: EniArgs,
    /// Whether CreateNetworkInterface with addresses also draws on AssignPrivateIpAddresses' throttling bucket
    /// (AWS does not say; `true`, the conservative reading, keeps joins on AssignPrivateIpAddresses). `false`
    /// lets eni mode spread joining nodes' first addresses over both ways (docs/aws.md).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    creation_draws_assign: bool,
    /// Pod block per node (prefix length).
    #[arg(long, default_value_t = 26)]
    block: u8,
    /// Route limit of the managed route tables (an account quota EC2 does not report: 500 by default, at most
    /// 1,000).
    #[arg(long, default_value_t = underlay_core::topology::DEFAULT_ROUTE_LIMIT)]
    route_limit: u32,
    /// Forwarder health probe interval (ms).
    #[arg(long, default_value_t = underlay_controller::config::DEFAULT_PROBE_INTERVAL.as_millis() as u64)]
    probe_interval_ms: u64,
    /// Time a probe round waits for replies (ms; at most the interval).
    #[arg(long, default_value_t = underlay_controller::config::DEFAULT_PROBE_TIMEOUT.as_millis() as u64)]
    probe_timeout_ms: u64,
    /// Consecutive missed probe rounds that fail a forwarder.
    #[arg(long, default_value_t = underlay_core::health::DEFAULT_MISSES_TO_FAIL)]
    probe_misses: u32,
    /// Consecutive missed probes that restart a recovering forwarder's hold-down (1: any miss does).
    #[arg(long, default_value_t = underlay_core::health::DEFAULT_HOLD_DOWN_MISSES)]
    hold_down_misses: u32,
    /// Probe forwarders over HTTP (`GET /healthz`, a TCP connection per probe) instead of the UDP echo.
    #[arg(long)]
    probe_http: bool,
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
    /// Manage only the Nodes this Kubernetes label selector selects (e.g. `underlay.dev/managed=true` or
    /// `eks.amazonaws.com/nodegroup in (ng-underlay)`); the others get no UnderlayNode, taint, podCIDR, route or
    /// ENI. Default: every Node.
    #[arg(long, default_value = "")]
    node_selector: String,
}

/// `0.0.0.0:9651`.
fn default_health_addr() -> SocketAddr {
    SocketAddr::new(
        std::net::Ipv4Addr::UNSPECIFIED.into(),
        names::CONTROLLER_HEALTH_PORT,
    )
}

/// `--mode eni` knobs (amazon-vpc-cni's meanings for the targets).
#[derive(Debug, clap::Args)]
struct EniArgs {
    /// Value of the `underlay.dev/cluster` tag on the ENIs this controller creates and collects.
    #[arg(long, required_if_eq("mode", "eni"))]
    cluster_name: Option<String>,
    /// Free addresses to keep on each node.
    #[arg(long)]
    warm_ip_target: Option<u32>,
    /// Addresses each node holds at least.
    #[arg(long)]
    minimum_ip_target: Option<u32>,
    /// Free /28 prefixes to keep on each node (with --prefix-delegation).
    #[arg(long)]
    warm_prefix_target: Option<u32>,
    /// Delegate /28 prefixes instead of secondary addresses (Nitro instances).
    #[arg(long)]
    prefix_delegation: bool,
    /// Pod ENIs of nodes in ZONE go to this subnet (custom networking), e.g. `us-east-1a=subnet-0abc`.
    #[arg(long = "eni-subnet", value_parser = parse_zone_subnet)]
    eni_subnets: Vec<(String, String)>,
    /// Security groups of pod ENIs (default: the primary ENI's).
    #[arg(long = "eni-security-group")]
    eni_security_groups: Vec<String>,
    /// Fill every ENI slot when a node joins.
    #[arg(long)]
    fill_at_join: bool,
    /// Excess addresses are released after this long (s).
    #[arg(long, default_value_t = 30)]
    release_delay_secs: u64,
}

fn parse_zone_subnet(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((zone, subnet)) if !zone.is_empty() && subnet.starts_with("subnet-") => {
            Ok((zone.to_string(), subnet.to_string()))
        }
        _ => Err(format!("expected ZONE=subnet-…, got {s:?}")),
    }
}

fn eni_settings(args: &EniArgs) -> anyhow::Result<EniSettings> {
    let cluster = args
        .cluster_name
        .clone()
        .context("--cluster-name is required")?;
    Ok(EniSettings {
        mode: if args.prefix_delegation {
            AddressMode::Prefixes
        } else {
            AddressMode::SecondaryIps
        },
        targets: Targets {
            warm_ip_target: args.warm_ip_target,
            minimum_ip_target: args.minimum_ip_target,
            warm_prefix_target: args.warm_prefix_target,
            fill_at_join: args.fill_at_join,
            ..Targets::default()
        },
        subnets: args
            .eni_subnets
            .iter()
            .map(|(z, s)| (z.clone(), SubnetId::new(s.as_str())))
            .collect(),
        security_groups: args
            .eni_security_groups
            .iter()
            .map(|g| SecurityGroupId::new(g.as_str()))
            .collect(),
        release_delay: Duration::from_secs(args.release_delay_secs),
        ..EniSettings::new(cluster)
    })
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    // Validate before touching AWS or Kubernetes.
    let node_selector: NodeSelector = args.node_selector.parse().context("--node-selector")?;
    if args.mode == Mode::Routed && (args.vpc.is_none() || args.pod_cidr.is_none()) {
        anyhow::bail!("routed mode needs --vpc and --pod-cidr");
    }
    let eni = if args.mode == Mode::Eni {
        Some(eni_settings(&args.eni)?)
    } else {
        None
    };
    super::init_tracing("info");
    if node_selector.is_all() {
        tracing::info!("managing every Node");
    } else {
        tracing::info!(node_selector = %node_selector, "managing only the selected Nodes");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut registry = Registry::default();
        let cloud_metrics = CloudMetrics::register(&mut registry);
        let metrics = ControllerMetrics::register(&mut registry);
        let policy_metrics = PolicyCheckMetrics::register(&mut registry);
        let resync = if eni.is_some() {
            DEFAULT_ENI_RESYNC
        } else {
            DEFAULT_RESYNC
        };
        let health = ControllerHealth::new(resync * STALE_PASSES);
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
            QueueConfig {
                limits: underlay_cloud::RateLimits::aws_default()
                    .with_creation_draws_assign(args.creation_draws_assign),
                ..QueueConfig::default()
            },
            cloud_metrics,
        );
        let lanes: Arc<dyn CloudLanes> = Arc::new(TwoLanes::over_queue(queue.clone()));
        let cloud: Arc<dyn underlay_cloud::Cloud> = Arc::new(queue);
        let client = kube::Client::try_default()
            .await
            .context("no Kubernetes client configuration (in-cluster or kubeconfig)")?;
        health.set_client(true);
        let (leading_tx, leading_rx) = tokio::sync::watch::channel(false);
        // NetworkPolicies the agents cannot fully enforce: one Event each, from the leader.
        tokio::spawn(run_policy_check(
            client.clone(),
            policy_metrics,
            Some(leading_rx.clone()),
        ));
        let (events_tx, events_rx) = tokio::sync::broadcast::channel(1024);
        tokio::spawn(observe(metrics, health.clone(), events_rx, leading_rx));
        let mut opts = KubeOptions {
            lease_namespace: args.lease_namespace.clone(),
            leading: Some(leading_tx),
            node_selector,
            ..KubeOptions::default()
        };
        let (stop, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop.send(true);
        });
        if let Some(settings) = eni {
            // eni mode sends no controller events; its completed passes feed the readiness endpoint.
            let (passes_tx, mut passes_rx) = tokio::sync::watch::channel(0u64);
            opts.passes = Some(passes_tx);
            tokio::spawn(async move {
                while passes_rx.changed().await.is_ok() {
                    health.pass_done();
                }
            });
            run_eni_on_kube(client, cloud, settings, DEFAULT_ENI_RESYNC, opts, rx).await?;
            drop(events_tx);
            return anyhow::Ok(());
        }
        let vpc = args
            .vpc
            .as_deref()
            .context("--vpc is required in routed mode")?;
        let pod_cidr = args
            .pod_cidr
            .context("--pod-cidr is required in routed mode")?;
        let mut routed = RoutedConfig::new(VpcId::new(vpc), pod_cidr);
        routed.block_prefix_len = args.block;
        routed.route_limit = args.route_limit;
        // Behind the rate-aware queue: a pass reports (and nodes are untainted) after a burst's worth of calls.
        routed.max_ops_per_pass = Some(underlay_controller::routes::DEFAULT_QUEUED_OPS_PER_PASS);
        let mut config = ControllerConfig::new(routed);
        config.probe.interval = Duration::from_millis(args.probe_interval_ms);
        config.probe.timeout =
            Duration::from_millis(args.probe_timeout_ms).min(config.probe.interval);
        config.health.misses_to_fail = args.probe_misses.max(1);
        config.health.hold_down_misses = args.hold_down_misses.max(1);
        if args.probe_http {
            config.probe.transport = underlay_controller::ProbeTransport::Http;
        }
        config.health.hold_down = Duration::from_secs(args.hold_down_s);
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
