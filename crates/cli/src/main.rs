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
    /// Show a cluster's VPC as underlay sees it: route tables and owned routes, ENIs (leaked ones marked),
    /// free addresses per subnet.
    Inspect(commands::inspect::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Names(args) => commands::names::exec(args),
        Command::Inspect(args) => commands::inspect::exec(args),
    }
}
