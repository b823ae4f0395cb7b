//! One module per subcommand, each with `Args` and `exec`.

pub mod bench;
pub mod names;
pub mod plan;
