//! One module per subcommand, each with `Args` and `exec`.

pub mod inspect;
pub mod names;
