//! `underlay`: parses arguments and hands each subcommand to `commands::<verb>::exec`. Nothing else lives here.

use clap::{Parser, Subcommand};

mod commands;

/// Overlay-free Kubernetes pod networking for AWS VPC.
#[derive(Debug, Parser)]
#[command(name = "underlay", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the names underlay owns in the kernel and in Kubernetes.
    Names(commands::names::Args),
    /// Run the controller (`--mode routed` or `eni`): Kubernetes through kube-rs, EC2 through aws-sdk-ec2 (the only
    /// EC2 caller).
    Controller(commands::controller::Args),
    /// Run the node agent: the IPAM service for underlay-cni, the CNI configuration and plugin install.
    Agent(commands::agent::Args),
    /// Plan routed-mode pod blocks and VPC routes for a topology file or a synthetic cluster.
    Plan(commands::plan::Args),
    /// Benchmarks, JSON on stdout.
    Bench(commands::bench::Args),
    /// Show a cluster's VPC as underlay sees it: route tables and owned routes, ENIs (leaked ones marked),
    /// free addresses per subnet.
    Inspect(commands::inspect::Args),
    /// Print the UnderlayNode CustomResourceDefinition (YAML), generated from the Rust types.
    Crd(commands::crd::Args),
    /// Print the controller's IAM policy (JSON) for a mode, built from the EC2 calls it issues in that mode.
    IamPolicy(commands::iam_policy::Args),
    /// A routed-mode cluster on a VPC made of network namespaces: the real controller, agents and CNI plugin.
    Lab(commands::lab::Args),
    /// Print this build's version and platform (`--format table|json`).
    Version(commands::version::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Names(args) => commands::names::exec(args),
        Command::Controller(args) => commands::controller::exec(args),
        Command::Agent(args) => commands::agent::exec(args),
        Command::Plan(args) => commands::plan::exec(args),
        Command::Bench(args) => commands::bench::exec(args),
        Command::Inspect(args) => commands::inspect::exec(args),
        Command::Crd(args) => commands::crd::exec(args),
        Command::IamPolicy(args) => commands::iam_policy::exec(args),
        Command::Lab(args) => commands::lab::exec(args),
        Command::Version(args) => commands::version::exec(args),
    }
}
