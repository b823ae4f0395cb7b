//! `underlay agent`: the node agent (the IPAM service, the CNI configuration and plugin install; with
//! `--routed-spec`, also the routed-mode converge loop and the health endpoint; with `--kube`, the same
//! driven by the node's UnderlayNode, whose status it writes).
//!
//! Configuration comes from `--config FILE` (YAML, see docs/agent.md), then the flags override single
//! fields, which is what tests and local runs use. The test-only fault knob `UNDERLAY_AGENT_FAULT` is read
//! here, at the edge, and handed to the library as data.

use std::path::PathBuf;

use anyhow::Context;
use ipnet::Ipv4Net;
use underlay_agent::{AgentConfig, Fault};
use underlay_core::names;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("routed_mode").args(["routed_spec", "kube"]).multiple(false)))]
pub struct Args {
    /// YAML configuration file (pool, cooldown, socket, checkpoint, CNI dirs, MTU, plugin source).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Pod address block (routed mode), overriding the file's pool.
    #[arg(long, value_name = "CIDR")]
    pool: Option<Ipv4Net>,
    /// IPAM socket path.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Directory of the IPAM checkpoint (`<dir>/ipam.json`).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Directory the CNI configuration list is written to.
    #[arg(long, value_name = "DIR")]
    cni_conf_dir: Option<PathBuf>,
    /// Directory the `underlay-cni` binary is installed into.
    #[arg(long, value_name = "DIR")]
    cni_bin_dir: Option<PathBuf>,
    /// The `underlay-cni` binary to install (default: `underlay-cni` next to this executable, if present).
    #[arg(long, value_name = "FILE")]
    plugin_source: Option<PathBuf>,
    /// Directory of the chained reference plugins (portmap, bandwidth) to install next to `underlay-cni`
    /// (default: `../lib/underlay/cni` from this executable, as in the image, if present).
    #[arg(long, value_name = "DIR")]
    chained_plugins_dir: Option<PathBuf>,
    /// Move every other CNI configuration in the configuration directory aside (`<name>.underlay_bak`), so
    /// the runtime can only use underlay's (a node switching from another CNI).
    #[arg(long)]
    cni_exclusive: bool,
    /// Seconds a released address waits before reuse.
    #[arg(long, value_name = "SECS")]
    cooldown_secs: Option<u64>,
    /// Pod MTU.
    #[arg(long)]
    mtu: Option<u32>,
    /// Do not run the link reaper (DEL then deletes pod veths itself; nothing is swept).
    #[arg(long)]
    no_link_reaper: bool,
    /// Routed mode: the node record (YAML or JSON) to converge the node to; its block becomes the pool and
    /// its MTU the pod MTU. Also serves the health endpoint.
    #[arg(long, value_name = "FILE")]
    routed_spec: Option<PathBuf>,
    /// From the Kubernetes API: follow this node's UnderlayNode and write its status. The record's mode decides:
    /// `routed` (pool block, peer routes; needs --pod-cidr) or `eni` (ENIs and their addresses). Uses the
    /// standard client configuration (in-cluster service account, or KUBECONFIG).
    #[arg(long, requires_all = ["node_name", "vpc_cidr"])]
    kube: bool,
    /// With --kube: this node's name (the UnderlayNode's).
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    node_name: Option<String>,
    /// With --kube, routed mode: the cluster's pod CIDR.
    #[arg(long, value_name = "CIDR", requires = "kube")]
    pod_cidr: Option<Ipv4Net>,
    /// With --kube, eni mode: do not SNAT pods' traffic to destinations outside the VPC; it leaves by the pod's
    /// ENI with the pod's address (a NAT gateway translates it).
    #[arg(long, requires = "kube")]
    external_snat: bool,
    /// With --kube: do not enforce NetworkPolicy (no policy watches; ADD never waits for a pod's policy state).
    /// For clusters that enforce policy with another component.
    #[arg(long, requires = "kube")]
    no_network_policy: bool,
    /// With --kube: never run the tc-BPF fast path (docs/datapath.md), and remove one a previous agent left;
    /// every packet takes the kernel's path. By default it runs where the kernel supports it.
    #[arg(long, requires = "kube")]
    no_fast_path: bool,
    /// With --kube: a VPC CIDR (repeat for each).
    #[arg(long, value_name = "CIDR", requires = "kube")]
    vpc_cidr: Vec<Ipv4Net>,
    /// Routed mode: the network namespace holding the node's uplink (default: the agent's own).
    #[arg(long, value_name = "PATH", requires = "routed_mode")]
    netns: Option<PathBuf>,
    /// Routed mode: address of the health endpoint, which also serves /metrics (default 0.0.0.0:9650).
    #[arg(long, value_name = "ADDR", requires = "routed_mode")]
    health_addr: Option<std::net::SocketAddr>,
}

/// File name of the checkpoint inside `--state-dir`.
const CHECKPOINT_FILE: &str = "ipam.json";

/// The configuration from the file and flags. `needs_pool` is false with --kube: the pool comes from the record.
fn resolve(args: Args, needs_pool: bool) -> anyhow::Result<AgentConfig> {
    let mut config = match &args.config {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    if let Some(block) = args.pool {
        config.pool.block = Some(block);
        config.pool.addresses.clear();
    }
    if let Some(s) = args.socket {
        config.socket = s;
    }
    if let Some(d) = args.state_dir {
        config.checkpoint = d.join(CHECKPOINT_FILE);
    }
    if let Some(d) = args.cni_conf_dir {
        config.cni_conf_dir = d;
    }
    if let Some(d) = args.cni_bin_dir {
        config.cni_bin_dir = d;
    }
    if let Some(c) = args.cooldown_secs {
        config.cooldown_secs = c;
    }
    if let Some(m) = args.mtu {
        config.mtu = m;
    }
    if args.no_link_reaper {
        config.reap_links = false;
    }
    if let Some(p) = args.plugin_source {
        config.plugin_source = Some(p);
    } else if config.plugin_source.is_none() {
        config.plugin_source = std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.join(names::CNI_PLUGIN)))
            .filter(|p| p.is_file());
    }
    if let Some(d) = args.chained_plugins_dir {
        config.chained_plugins_dir = Some(d);
    } else if config.chained_plugins_dir.is_none() {
        config.chained_plugins_dir = std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.join("../lib/underlay/cni")))
            .filter(|d| d.is_dir());
    }
    if args.cni_exclusive {
        config.cni_exclusive = true;
    }
    if needs_pool {
        config.validate()?;
    }
    Ok(config)
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    super::init_tracing("info");
    let fault: Fault = std::env::var(names::AGENT_FAULT_ENV)
        .unwrap_or_default()
        .parse()?;
    if fault != Fault::None {
        tracing::warn!(
            ?fault,
            "fault injection enabled ({})",
            names::AGENT_FAULT_ENV
        );
    }
    let mut args = args;
    if args.kube {
        return exec_kube(args, fault);
    }
    let routed = match args.routed_spec.take() {
        Some(path) => {
            let spec = underlay_agent::routed::runner::load_spec(&path)?;
            args.pool = Some(spec.pod_block);
            args.mtu = Some(spec.mtu);
            let mut opts = underlay_agent::routed::runner::RoutedOptions::new(spec);
            opts.netns = args.netns.take();
            if let Some(a) = args.health_addr {
                opts.health_addr = a;
            }
            Some(opts)
        }
        None => None,
    };
    let config = resolve(args, true)?;
    let runtime = prepare(&config)?;
    match routed {
        Some(opts) => runtime.block_on(underlay_agent::routed::runner::run_routed(
            config,
            opts,
            fault,
            shutdown_signal(),
        ))?,
        None => runtime.block_on(underlay_agent::run(config, fault, shutdown_signal()))?,
    }
    Ok(())
}

/// `--kube`: the node's UnderlayNode decides the mode (routed or eni); the agent follows it.
fn exec_kube(mut args: Args, fault: Fault) -> anyhow::Result<()> {
    use underlay_agent::eni::kube::{EniKubeOptions, node_mode, run_eni_on_kube};
    use underlay_agent::routed::kube::{KubeAgentOptions, run_routed_on_kube};
    // clap enforces these with --kube.
    let node_name = args.node_name.take().context("--node-name is required")?;
    let vpc_cidrs = std::mem::take(&mut args.vpc_cidr);
    let pod_cidr = args.pod_cidr;
    let external_snat = args.external_snat;
    let network_policy = !args.no_network_policy;
    let fast_path = !args.no_fast_path;
    let netns = args.netns.take();
    let health_addr = args.health_addr;
    let config = resolve(args, false)?;
    let runtime = prepare(&config)?;
    runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("building the Kubernetes client (in-cluster or KUBECONFIG)")?;
        let mode = node_mode(client.clone(), &node_name, &config.checkpoint).await;
        tracing::info!(node = %node_name, ?mode, "mode from the UnderlayNode");
        match mode {
            underlay_api::Mode::Routed => {
                let pod_cidr = pod_cidr.context("routed mode needs --pod-cidr")?;
                let mut opts = KubeAgentOptions::new(node_name, pod_cidr, vpc_cidrs);
                opts.netns = netns;
                opts.network_policy = network_policy;
                opts.fast_path = fast_path;
                if let Some(a) = health_addr {
                    opts.health_addr = a;
                }
                opts.mtu = config.mtu;
                run_routed_on_kube(config, client, opts, fault, shutdown_signal()).await?;
            }
            underlay_api::Mode::Eni => {
                let mut opts = EniKubeOptions::new(node_name, vpc_cidrs);
                opts.netns = netns;
                opts.external_snat = external_snat;
                opts.network_policy = network_policy;
                opts.fast_path = fast_path;
                if let Some(a) = health_addr {
                    opts.health_addr = a;
                }
                opts.mtu = config.mtu;
                run_eni_on_kube(config, client, opts, fault, shutdown_signal()).await?;
            }
        }
        anyhow::Ok(())
    })
}

/// Creates the state directory and the runtime.
fn prepare(config: &AgentConfig) -> anyhow::Result<tokio::runtime::Runtime> {
    if let Some(dir) = config.checkpoint.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state directory {}", dir.display()))?;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
