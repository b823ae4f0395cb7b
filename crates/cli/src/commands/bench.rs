//! `underlay bench <kind>`: benchmarks with JSON on stdout. Each kind lives in its own `bench_<kind>` module.

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    kind: Kind,
}

#[derive(Debug, clap::Subcommand)]
enum Kind {
    /// Time and peak memory of the routed-mode planner, and the churn of a join, a leave and a failure.
    Plan(super::bench_plan::PlanArgs),
    /// Pod ADD/DEL latency: underlay-cni + agent against the reference ptp + host-local, same harness.
    Cni(super::bench_cni::Args),
    /// A whole lab (60 nodes, 600 pods): build time, time to untaint, latency per path class, memory.
    Lab(super::bench_lab::Args),
    /// eni mode: N nodes join at once; time until every pool is at its targets, EC2 calls, throttles, and the
    /// token-bucket lower bound.
    Scaleout(super::bench_scaleout::Args),
    /// NetworkPolicy: event → kernel, CNI ADD and pod↔pod latency/throughput with and without policies, nft
    /// objects and memory, on the x/y/z lab.
    Policy(super::bench_policy::Args),
    /// The NetworkPolicy compiler alone, on bench policy's shape: a cold compile, an ADD's compile with the
    /// engine's cache, a peer relabel, the diffs, the model's object count.
    PolicyCompile(super::bench_policy_compile::Args),
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    // Reports go to stdout; the components a bench runs log errors to stderr (more with `RUST_LOG`).
    super::init_tracing("error");
    match args.kind {
        Kind::Plan(a) => super::bench_plan::exec(a),
        Kind::Cni(a) => super::bench_cni::exec(a),
        Kind::Lab(a) => super::bench_lab::exec(a),
        Kind::Scaleout(a) => super::bench_scaleout::exec(a),
        Kind::Policy(a) => super::bench_policy::exec(a),
        Kind::PolicyCompile(a) => super::bench_policy_compile::exec(a),
    }
}
