//! One module per subcommand, each with `Args` and `exec`.

pub mod agent;
pub mod bench;
pub mod bench_cni;
pub mod bench_lab;
pub mod bench_plan;
pub mod controller;
pub mod crd;
pub mod inspect;
pub mod lab;
pub mod names;
pub mod plan;
