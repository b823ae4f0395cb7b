//! The lab's error type.

use crate::plan::PlanError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid lab id {0:?}: 1 to 6 characters of a-z and 0-9")]
    InvalidLabId(String),
    /// A namespace with this lab's prefix exists already (another lab with the same id, or a crashed run:
    /// see [`crate::sweep`]).
    #[error("lab {0} exists already (namespace {1})")]
    LabExists(String, String),
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A kernel tool (`ip`, `bridge`, `nft`) refused a request.
    #[error("{cmd}: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("run {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Dataplane(#[from] underlay_dataplane::Error),
    /// Every error met while removing a lab (removal carries on past each one).
    #[error("teardown: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Teardown(Vec<Error>),
    /// A failure, and what went wrong while removing what had been built.
    #[error("{cause} (and while cleaning up: {teardown})")]
    WithTeardown {
        cause: Box<Error>,
        teardown: Box<Error>,
    },
}

impl Error {
    /// Worth retrying as is: the kernel tool may have lost a race with a concurrent change.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Dataplane(e) => e.is_retryable(),
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
