//! The dataplane error type and the one place where EEXIST/ENOENT become success.

use std::io;

/// A failed kernel operation. `op` names what was attempted (e.g. `route add 100.64.0.5/32`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel refused a request (netlink NACK or a failed system call).
    #[error("{op}: {source}")]
    Kernel {
        op: String,
        #[source]
        source: io::Error,
    },
    /// The kernel answered something this crate could not decode.
    #[error("{op}: unexpected netlink reply: {detail}")]
    Protocol { op: String, detail: String },
}

impl Error {
    pub(crate) fn kernel(op: impl Into<String>, source: io::Error) -> Self {
        Error::Kernel {
            op: op.into(),
            source,
        }
    }

    pub(crate) fn errno(op: impl Into<String>, errno: i32) -> Self {
        Error::kernel(op, io::Error::from_raw_os_error(errno))
    }

    /// The raw errno, when the kernel refused the request.
    pub fn raw_errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { source, .. } => source.raw_os_error(),
            Error::Protocol { .. } => None,
        }
    }

    /// The object to create is already there.
    pub fn is_exists(&self) -> bool {
        self.raw_errno() == Some(libc::EEXIST)
    }

    /// The object to change or delete (or the device or namespace it lives in) is gone.
    pub fn is_missing(&self) -> bool {
        matches!(
            self.raw_errno(),
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ESRCH) | Some(libc::EADDRNOTAVAIL)
        )
    }

    /// Worth retrying as is (the kernel was busy or out of buffer space).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.raw_errno(),
            Some(libc::EBUSY) | Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::EINTR)
        )
    }
}

/// Idempotency in one place: "already exists" after an add, "not found" after a delete, are success.
pub trait ResultExt {
    /// `Ok(true)` if this call created the object, `Ok(false)` if it was already there.
    fn ignore_exists(self) -> Result<bool, Error>;
    /// `Ok(true)` if this call removed the object, `Ok(false)` if it was already gone.
    fn ignore_missing(self) -> Result<bool, Error>;
}

impl ResultExt for Result<(), Error> {
    fn ignore_exists(self) -> Result<bool, Error> {
        match self {
            Ok(()) => Ok(true),
            Err(e) if e.is_exists() => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn ignore_missing(self) -> Result<bool, Error> {
        match self {
            Ok(()) => Ok(true),
            Err(e) if e.is_missing() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exists_and_missing_are_success_only_for_their_errno() {
        let exists: Result<(), Error> = Err(Error::errno("add", libc::EEXIST));
        assert!(!exists.ignore_exists().unwrap());
        let exists: Result<(), Error> = Err(Error::errno("add", libc::EEXIST));
        assert!(exists.ignore_missing().is_err());

        for errno in [libc::ENOENT, libc::ENODEV, libc::ESRCH] {
            let missing: Result<(), Error> = Err(Error::errno("del", errno));
            assert!(!missing.ignore_missing().unwrap());
        }
        let other: Result<(), Error> = Err(Error::errno("add", libc::EPERM));
        assert!(other.ignore_exists().is_err());
        assert!(Ok::<(), Error>(()).ignore_exists().unwrap());
    }

    #[test]
    fn message_names_the_operation() {
        let e = Error::errno("route add 100.64.0.5/32", libc::ENETUNREACH);
        assert!(e.to_string().starts_with("route add 100.64.0.5/32: "));
        assert!(!e.is_retryable());
        assert!(Error::errno("x", libc::EBUSY).is_retryable());
    }
}
