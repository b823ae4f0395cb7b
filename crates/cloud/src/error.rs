//! One error type for every [`crate::Cloud`] implementation, classifying AWS error codes in one place.

use serde::{Deserialize, Serialize};

/// What a caller can do about an error. Matchable; the AWS code is kept alongside for people and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// `RequestLimitExceeded`, `Throttling`: back off and retry.
    Throttled,
    /// `Invalid*.NotFound`: the object does not exist (or is not yet visible: describes are eventually consistent).
    NotFound,
    /// Route, attachment, address or ENI limits: retrying the same call will not help.
    LimitExceeded,
    /// `RouteAlreadyExists`, `InvalidParameterValue` on a duplicate address, idempotent-token reuse mismatch.
    AlreadyExists,
    /// `InsufficientFreeAddressesInSubnet`: the subnet is full.
    InsufficientAddresses,
    /// The request is wrong (bad parameter, wrong state, unsupported on this instance): a bug or bad config.
    InvalidRequest,
    /// Credentials or IAM: `UnauthorizedOperation`, `AuthFailure`.
    Unauthorized,
    /// EC2 failed (5xx, `InternalError`, `Unavailable`): retry.
    Service,
    /// The request never got an answer (connection, timeout): retry.
    Transport,
}

impl ErrorKind {
    /// Label for metrics (`result` label of EC2 call counters).
    pub fn metric_label(self) -> &'static str {
        match self {
            ErrorKind::Throttled => "throttled",
            ErrorKind::NotFound => "not_found",
            ErrorKind::LimitExceeded => "limit_exceeded",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::InsufficientAddresses => "insufficient_addresses",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Service => "service",
            ErrorKind::Transport => "transport",
        }
    }

    /// Coarse class for the `result` label of EC2 call counters: `throttled`, `server_error` (EC2 failed),
    /// `transport_error` (no answer), or `client_error` (EC2 refused the request as asked).
    pub fn result_class(self) -> &'static str {
        match self {
            ErrorKind::Throttled => "throttled",
            ErrorKind::Service => "server_error",
            ErrorKind::Transport => "transport_error",
            ErrorKind::NotFound
            | ErrorKind::LimitExceeded
            | ErrorKind::AlreadyExists
            | ErrorKind::InsufficientAddresses
            | ErrorKind::InvalidRequest
            | ErrorKind::Unauthorized => "client_error",
        }
    }
}

/// An EC2 error: its kind, AWS error code, and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{code}: {message}")]
pub struct CloudError {
    pub kind: ErrorKind,
    /// The AWS error code (e.g. `RouteLimitExceeded`), or a local code for transport failures.
    pub code: String,
    pub message: String,
}

impl CloudError {
    pub fn new(kind: ErrorKind, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            code: code.into(),
            message: message.into(),
        }
    }

    /// Classify an AWS error code. The single table of code → kind in underlay.
    pub fn from_code(code: &str, message: impl Into<String>) -> Self {
        Self::new(classify(code), code, message)
    }

    /// Worth retrying the same call later: throttling, EC2-side failures, lost requests.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Throttled | ErrorKind::Service | ErrorKind::Transport
        )
    }
    pub fn is_throttled(&self) -> bool {
        self.kind == ErrorKind::Throttled
    }
    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }
    pub fn is_already_exists(&self) -> bool {
        self.kind == ErrorKind::AlreadyExists
    }
    pub fn is_limit_exceeded(&self) -> bool {
        self.kind == ErrorKind::LimitExceeded
    }
    pub fn is_insufficient_addresses(&self) -> bool {
        self.kind == ErrorKind::InsufficientAddresses
    }
}

/// AWS error codes underlay meets, by kind. Unknown `*.NotFound` / `*LimitExceeded` codes follow their suffix;
/// anything else unknown is an invalid request (not retried: retrying a request EC2 rejects only adds load).
pub fn classify(code: &str) -> ErrorKind {
    match code {
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" | "RequestThrottled" => {
            ErrorKind::Throttled
        }
        "RouteAlreadyExists"
        | "InvalidNetworkInterface.InUse"
        | "IdempotentParameterMismatch"
        | "InvalidIPAddress.InUse" => ErrorKind::AlreadyExists,
        "InsufficientFreeAddressesInSubnet" | "InsufficientCidrBlocks" => {
            ErrorKind::InsufficientAddresses
        }
        "RouteLimitExceeded"
        | "AttachmentLimitExceeded"
        | "PrivateIpAddressLimitExceeded"
        | "NetworkInterfaceLimitExceeded"
        | "TagLimitExceeded" => ErrorKind::LimitExceeded,
        "UnauthorizedOperation" | "AuthFailure" | "Blocked" | "OptInRequired" => {
            ErrorKind::Unauthorized
        }
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" => {
            ErrorKind::Service
        }
        c if c.ends_with(".NotFound") => ErrorKind::NotFound,
        c if c.ends_with("LimitExceeded") => ErrorKind::LimitExceeded,
        _ => ErrorKind::InvalidRequest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_codes_underlay_meets() {
        let cases = [
            ("RequestLimitExceeded", ErrorKind::Throttled),
            ("InvalidRoute.NotFound", ErrorKind::NotFound),
            ("InvalidNetworkInterfaceID.NotFound", ErrorKind::NotFound),
            ("InvalidInstanceID.NotFound", ErrorKind::NotFound),
            ("RouteAlreadyExists", ErrorKind::AlreadyExists),
            ("InvalidIPAddress.InUse", ErrorKind::AlreadyExists),
            ("InsufficientCidrBlocks", ErrorKind::InsufficientAddresses),
            ("RouteLimitExceeded", ErrorKind::LimitExceeded),
            ("AttachmentLimitExceeded", ErrorKind::LimitExceeded),
            ("PrivateIpAddressLimitExceeded", ErrorKind::LimitExceeded),
            ("SomeNewLimitExceeded", ErrorKind::LimitExceeded),
            (
                "InsufficientFreeAddressesInSubnet",
                ErrorKind::InsufficientAddresses,
            ),
            ("UnauthorizedOperation", ErrorKind::Unauthorized),
            ("InternalError", ErrorKind::Service),
            ("InvalidParameterValue", ErrorKind::InvalidRequest),
            ("IncorrectState", ErrorKind::InvalidRequest),
        ];
        for (code, kind) in cases {
            assert_eq!(classify(code), kind, "{code}");
        }
    }

    #[test]
    fn only_transient_kinds_are_retryable() {
        assert!(CloudError::from_code("RequestLimitExceeded", "").is_retryable());
        assert!(CloudError::from_code("InternalError", "").is_retryable());
        assert!(!CloudError::from_code("RouteLimitExceeded", "").is_retryable());
        assert!(!CloudError::from_code("InvalidRoute.NotFound", "").is_retryable());
        assert!(!CloudError::from_code("InvalidParameterValue", "").is_retryable());
    }
}
