//! One module per subcommand, each with `Args` and `exec`.

pub mod agent;
pub mod names;
