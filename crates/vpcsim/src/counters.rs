//! Per-operation call counters.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use underlay_cloud::{ErrorKind, Operation};

/// What the simulated EC2 endpoint has seen. Serializable for benchmark reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Calls received, throttled and failed ones included.
    pub calls: BTreeMap<Operation, u64>,
    /// Failed calls by error kind (throttling included, as `throttled`).
    pub errors: BTreeMap<Operation, BTreeMap<ErrorKind, u64>>,
    /// Calls answered `RequestLimitExceeded` (by a bucket, a forced throttle, or an injected error).
    pub throttled: BTreeMap<Operation, u64>,
}

impl Counters {
    pub fn calls_of(&self, op: Operation) -> u64 {
        self.calls.get(&op).copied().unwrap_or(0)
    }
    pub fn throttled_of(&self, op: Operation) -> u64 {
        self.throttled.get(&op).copied().unwrap_or(0)
    }
    pub fn errors_of(&self, op: Operation, kind: ErrorKind) -> u64 {
        self.errors
            .get(&op)
            .and_then(|m| m.get(&kind))
            .copied()
            .unwrap_or(0)
    }
    pub fn total_calls(&self) -> u64 {
        self.calls.values().sum()
    }
    pub fn total_throttled(&self) -> u64 {
        self.throttled.values().sum()
    }
}
