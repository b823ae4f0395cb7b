//! AWS's EC2 request throttling, as data: which token bucket each call draws from, and the buckets themselves.
//!
//! EC2 throttles per account and region. Each bucket holds up to `capacity` tokens, refills `refill_per_sec`
//! tokens per second, and every call takes one token from its bucket or fails with `RequestLimitExceeded`.
//! Published defaults (<https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html>):
//!
//! ```text
//!   bucket                                   capacity  refill/s
//!   non-mutating (Describe*, filtered)            100        20
//!   unfiltered, unpaginated Describe*              50        10
//!   mutating (CreateRoute, CreateTags, …)          50         5
//!   AssignPrivateIpAddresses                      100         5   ┐
//!   UnassignPrivateIpAddresses                    100         5   │ resource-rate buckets,
//!   CreateNetworkInterface                        100         5   │ one per action
//!   DeleteNetworkInterface                        100         5   │
//!   ModifyNetworkInterfaceAttribute               100         5   ┘
//!   CreateTags                                    100        10     its own bucket too
//! ```
//!
//! vpcsim enforces these; the adapter's queue waits for a token before it calls, so underlay itself never
//! causes `RequestLimitExceeded` under normal load. Time is passed in (`now`), so both stay deterministic.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Every EC2 action the [`crate::Cloud`] port issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Operation {
    DescribeVpcs,
    DescribeSubnets,
    DescribeRouteTables,
    DescribeInstances,
    DescribeInstanceTypes,
    DescribeNetworkInterfaces,
    CreateRoute,
    ReplaceRoute,
    DeleteRoute,
    CreateNetworkInterface,
    AttachNetworkInterface,
    DetachNetworkInterface,
    DeleteNetworkInterface,
    AssignPrivateIpAddresses,
    UnassignPrivateIpAddresses,
    ModifyNetworkInterfaceAttribute,
    CreateTags,
}

impl Operation {
    pub const ALL: [Operation; 17] = [
        Operation::DescribeVpcs,
        Operation::DescribeSubnets,
        Operation::DescribeRouteTables,
        Operation::DescribeInstances,
        Operation::DescribeInstanceTypes,
        Operation::DescribeNetworkInterfaces,
        Operation::CreateRoute,
        Operation::ReplaceRoute,
        Operation::DeleteRoute,
        Operation::CreateNetworkInterface,
        Operation::AttachNetworkInterface,
        Operation::DetachNetworkInterface,
        Operation::DeleteNetworkInterface,
        Operation::AssignPrivateIpAddresses,
        Operation::UnassignPrivateIpAddresses,
        Operation::ModifyNetworkInterfaceAttribute,
        Operation::CreateTags,
    ];

    /// The EC2 action name, as in the API and in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Operation::DescribeVpcs => "DescribeVpcs",
            Operation::DescribeSubnets => "DescribeSubnets",
            Operation::DescribeRouteTables => "DescribeRouteTables",
            Operation::DescribeInstances => "DescribeInstances",
            Operation::DescribeInstanceTypes => "DescribeInstanceTypes",
            Operation::DescribeNetworkInterfaces => "DescribeNetworkInterfaces",
            Operation::CreateRoute => "CreateRoute",
            Operation::ReplaceRoute => "ReplaceRoute",
            Operation::DeleteRoute => "DeleteRoute",
            Operation::CreateNetworkInterface => "CreateNetworkInterface",
            Operation::AttachNetworkInterface => "AttachNetworkInterface",
            Operation::DetachNetworkInterface => "DetachNetworkInterface",
            Operation::DeleteNetworkInterface => "DeleteNetworkInterface",
            Operation::AssignPrivateIpAddresses => "AssignPrivateIpAddresses",
            Operation::UnassignPrivateIpAddresses => "UnassignPrivateIpAddresses",
            Operation::ModifyNetworkInterfaceAttribute => "ModifyNetworkInterfaceAttribute",
            Operation::CreateTags => "CreateTags",
        }
    }

    pub fn is_describe(self) -> bool {
        self.name().starts_with("Describe")
    }

    /// The bucket a call draws from. `unfiltered` only matters for describes (this port never sends one, but
    /// vpcsim models the bucket for completeness).
    pub fn bucket(self, unfiltered: bool) -> Bucket {
        match self {
            op if op.is_describe() && unfiltered => Bucket::UnfilteredDescribe,
            op if op.is_describe() => Bucket::Describe,
            Operation::AssignPrivateIpAddresses
            | Operation::UnassignPrivateIpAddresses
            | Operation::CreateNetworkInterface
            | Operation::DeleteNetworkInterface
            | Operation::ModifyNetworkInterfaceAttribute
            | Operation::CreateTags => Bucket::Resource(self),
            _ => Bucket::Mutating,
        }
    }
}

/// The controller's address mode, as far as its EC2 calls go: the IAM policy a controller needs is the set of
/// actions [`Operation::used_in`] says it issues (`underlay iam-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControllerMode {
    /// Aggregated VPC routes to forwarder nodes; ENIs are only described and have source/dest check turned off.
    Routed,
    /// Pods on secondary IPs or prefixes of ENIs the controller creates, attaches and tags.
    Eni,
}

impl ControllerMode {
    pub const ALL: [ControllerMode; 2] = [ControllerMode::Routed, ControllerMode::Eni];

    pub fn name(self) -> &'static str {
        match self {
            ControllerMode::Routed => "routed",
            ControllerMode::Eni => "eni",
        }
    }
}

impl Operation {
    /// Whether a controller in `mode` issues this call. Every describe in both modes (read-only; EC2 cannot
    /// scope them to resources anyway) and ModifyNetworkInterfaceAttribute (routed: source/dest check off; eni:
    /// DeleteOnTermination after an attach, and again where that failed); routed mode adds the route calls; eni
    /// mode adds creating (with tags on create), attaching, detaching (an ENI emptied by releases) and deleting
    /// ENIs, and assigning and unassigning addresses and prefixes.
    pub fn used_in(self, mode: ControllerMode) -> bool {
        match self {
            Operation::DescribeVpcs
            | Operation::DescribeSubnets
            | Operation::DescribeRouteTables
            | Operation::DescribeInstances
            | Operation::DescribeInstanceTypes
            | Operation::DescribeNetworkInterfaces
            | Operation::ModifyNetworkInterfaceAttribute => true,
            Operation::CreateRoute | Operation::ReplaceRoute | Operation::DeleteRoute => {
                mode == ControllerMode::Routed
            }
            Operation::CreateNetworkInterface
            | Operation::AttachNetworkInterface
            | Operation::DeleteNetworkInterface
            | Operation::DetachNetworkInterface
            | Operation::AssignPrivateIpAddresses
            | Operation::UnassignPrivateIpAddresses
            | Operation::CreateTags => mode == ControllerMode::Eni,
        }
    }

    /// Every call a controller in `mode` issues, in [`Operation::ALL`] order.
    pub fn for_mode(mode: ControllerMode) -> Vec<Operation> {
        Operation::ALL
            .into_iter()
            .filter(|op| op.used_in(mode))
            .collect()
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One of EC2's token buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Bucket {
    Describe,
    UnfilteredDescribe,
    Mutating,
    /// A resource-rate bucket of its own for one action.
    Resource(Operation),
}

impl Bucket {
    /// Label for metrics (`bucket` label of queue metrics): `describe`, `unfiltered_describe`, `mutating`, or the
    /// action's name for a resource-rate bucket.
    pub fn metric_label(self) -> &'static str {
        match self {
            Bucket::Describe => "describe",
            Bucket::UnfilteredDescribe => "unfiltered_describe",
            Bucket::Mutating => "mutating",
            Bucket::Resource(op) => op.name(),
        }
    }
}

/// Size and refill of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BucketLimits {
    pub capacity: f64,
    pub refill_per_sec: f64,
}

/// The limits of every bucket. [`RateLimits::aws_default`] is AWS's published account default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateLimits {
    pub describe: BucketLimits,
    pub unfiltered_describe: BucketLimits,
    pub mutating: BucketLimits,
    /// Applied to each resource-rate action's own bucket (ENI create/delete/modify, address assign/unassign).
    pub resource: BucketLimits,
    /// CreateTags's own bucket.
    pub create_tags: BucketLimits,
    /// Limits of single resource-rate actions' buckets that differ from `resource` (e.g. a caller's own pacing
    /// of one action with a headroom of its own).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub per_action: BTreeMap<Operation, BucketLimits>,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self::aws_default()
    }
}

impl RateLimits {
    pub fn aws_default() -> Self {
        Self {
            describe: BucketLimits {
                capacity: 100.0,
                refill_per_sec: 20.0,
            },
            unfiltered_describe: BucketLimits {
                capacity: 50.0,
                refill_per_sec: 10.0,
            },
            mutating: BucketLimits {
                capacity: 50.0,
                refill_per_sec: 5.0,
            },
            resource: BucketLimits {
                capacity: 100.0,
                refill_per_sec: 5.0,
            },
            create_tags: BucketLimits {
                capacity: 100.0,
                refill_per_sec: 10.0,
            },
            per_action: BTreeMap::new(),
        }
    }

    /// Every bucket scaled (e.g. 0.5 to stay under half of the account's budget when other tools share it).
    pub fn scaled(&self, factor: f64) -> Self {
        let s = |b: BucketLimits| BucketLimits {
            capacity: (b.capacity * factor).max(1.0),
            refill_per_sec: b.refill_per_sec * factor,
        };
        Self {
            describe: s(self.describe),
            unfiltered_describe: s(self.unfiltered_describe),
            mutating: s(self.mutating),
            resource: s(self.resource),
            create_tags: s(self.create_tags),
            per_action: self.per_action.iter().map(|(o, b)| (*o, s(*b))).collect(),
        }
    }

    /// Every bucket's capacity lowered by what `jitter` (the spread of the time between taking a token and the
    /// call reaching EC2) lets bunch up, plus one. A caller pacing itself with these limits never exceeds the
    /// real buckets: calls granted in any window of length `w` reach EC2 within a window of `w + jitter`, and
    /// `capacity - refill·jitter - 1 + refill·(w + jitter) < capacity + refill·w`.
    pub fn less_headroom(&self, jitter: Duration) -> Self {
        let h = |b: BucketLimits| BucketLimits {
            capacity: (b.capacity - (b.refill_per_sec * jitter.as_secs_f64()).ceil() - 1.0)
                .max(1.0),
            refill_per_sec: b.refill_per_sec,
        };
        Self {
            describe: h(self.describe),
            unfiltered_describe: h(self.unfiltered_describe),
            mutating: h(self.mutating),
            resource: h(self.resource),
            create_tags: h(self.create_tags),
            per_action: self.per_action.iter().map(|(o, b)| (*o, h(*b))).collect(),
        }
    }

    /// These limits with `op`'s own bucket set to `limits` (only resource-rate actions have one).
    pub fn with_action(mut self, op: Operation, limits: BucketLimits) -> Self {
        self.per_action.insert(op, limits);
        self
    }

    pub fn limits(&self, bucket: Bucket) -> BucketLimits {
        match bucket {
            Bucket::Describe => self.describe,
            Bucket::UnfilteredDescribe => self.unfiltered_describe,
            Bucket::Mutating => self.mutating,
            Bucket::Resource(op) if self.per_action.contains_key(&op) => self.per_action[&op],
            Bucket::Resource(Operation::CreateTags) => self.create_tags,
            Bucket::Resource(_) => self.resource,
        }
    }
}

impl BucketLimits {
    /// Capacity lowered by what `jitter` lets bunch up (see [`RateLimits::less_headroom`]).
    pub fn less_headroom(self, jitter: Duration) -> Self {
        Self {
            capacity: (self.capacity - (self.refill_per_sec * jitter.as_secs_f64()).ceil() - 1.0)
                .max(1.0),
            refill_per_sec: self.refill_per_sec,
        }
    }
}

/// A token bucket that starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    limits: BucketLimits,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(limits: BucketLimits, now: Instant) -> Self {
        Self {
            limits,
            tokens: limits.capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * self.limits.refill_per_sec).min(self.limits.capacity);
        self.last = self.last.max(now);
    }

    /// Take a token now, or say how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if self.limits.refill_per_sec <= 0.0 {
            Err(Duration::MAX)
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.limits.refill_per_sec,
            ))
        }
    }

    /// Tokens available now.
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }
}

/// All of an account's buckets, created full on first use.
#[derive(Debug, Clone)]
pub struct BucketSet {
    limits: RateLimits,
    buckets: BTreeMap<Bucket, TokenBucket>,
}

impl BucketSet {
    pub fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            buckets: BTreeMap::new(),
        }
    }

    pub fn limits(&self) -> &RateLimits {
        &self.limits
    }

    /// Take a token for `op` from its bucket, or say how long until one is available.
    pub fn try_take(
        &mut self,
        op: Operation,
        unfiltered: bool,
        now: Instant,
    ) -> Result<(), Duration> {
        let bucket = op.bucket(unfiltered);
        let limits = self.limits.limits(bucket);
        self.buckets
            .entry(bucket)
            .or_insert_with(|| TokenBucket::new(limits, now))
            .try_take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutating_burst_is_fifty_then_five_per_second() {
        let t0 = Instant::now();
        let mut set = BucketSet::new(RateLimits::aws_default());
        for i in 0..50 {
            assert!(
                set.try_take(Operation::CreateRoute, false, t0).is_ok(),
                "call {i} of the burst"
            );
        }
        let wait = set.try_take(Operation::CreateRoute, false, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(200));
        // Other mutating calls share the bucket; resource-rate actions do not.
        assert!(set.try_take(Operation::DeleteRoute, false, t0).is_err());
        assert!(set.try_take(Operation::CreateTags, false, t0).is_ok());
        assert!(
            set.try_take(Operation::AssignPrivateIpAddresses, false, t0)
                .is_ok()
        );
        // One second later exactly five more succeed.
        let t1 = t0 + Duration::from_secs(1);
        let ok = (0..10)
            .filter(|_| set.try_take(Operation::ReplaceRoute, false, t1).is_ok())
            .count();
        assert_eq!(ok, 5);
    }

    #[test]
    fn buckets_per_operation() {
        assert_eq!(
            Operation::DescribeRouteTables.bucket(false),
            Bucket::Describe
        );
        assert_eq!(
            Operation::DescribeRouteTables.bucket(true),
            Bucket::UnfilteredDescribe
        );
        assert_eq!(Operation::CreateRoute.bucket(false), Bucket::Mutating);
        assert_eq!(
            Operation::AttachNetworkInterface.bucket(false),
            Bucket::Mutating
        );
        assert_eq!(
            Operation::CreateNetworkInterface.bucket(false),
            Bucket::Resource(Operation::CreateNetworkInterface)
        );
    }

    #[test]
    fn routed_mode_calls_are_describes_routes_and_source_dest_check() {
        let routed: Vec<&str> = Operation::for_mode(ControllerMode::Routed)
            .into_iter()
            .map(Operation::name)
            .collect();
        assert_eq!(
            routed,
            [
                "DescribeVpcs",
                "DescribeSubnets",
                "DescribeRouteTables",
                "DescribeInstances",
                "DescribeInstanceTypes",
                "DescribeNetworkInterfaces",
                "CreateRoute",
                "ReplaceRoute",
                "DeleteRoute",
                "ModifyNetworkInterfaceAttribute",
            ]
        );
    }

    #[test]
    fn headroom_takes_what_jitter_can_bunch_up() {
        let l = RateLimits::aws_default().less_headroom(Duration::from_millis(1200));
        assert_eq!(l.mutating.capacity, 50.0 - 6.0 - 1.0);
        assert_eq!(l.mutating.refill_per_sec, 5.0);
        assert_eq!(l.describe.capacity, 100.0 - 24.0 - 1.0);
        let modify = Operation::ModifyNetworkInterfaceAttribute;
        let own = l
            .limits(Bucket::Resource(modify))
            .less_headroom(Duration::from_secs(1));
        let l = l.with_action(modify, own);
        assert_eq!(
            l.limits(Bucket::Resource(modify)).capacity,
            100.0 - 6.0 - 1.0 - 5.0 - 1.0
        );
        assert_eq!(
            l.limits(Bucket::Resource(Operation::AssignPrivateIpAddresses))
                .capacity,
            100.0 - 6.0 - 1.0
        );
    }

    #[test]
    fn eni_mode_calls_are_describes_and_the_eni_lifecycle_without_routes() {
        let eni: Vec<&str> = Operation::for_mode(ControllerMode::Eni)
            .into_iter()
            .map(Operation::name)
            .collect();
        assert_eq!(
            eni,
            [
                "DescribeVpcs",
                "DescribeSubnets",
                "DescribeRouteTables",
                "DescribeInstances",
                "DescribeInstanceTypes",
                "DescribeNetworkInterfaces",
                "CreateNetworkInterface",
                "AttachNetworkInterface",
                "DetachNetworkInterface",
                "DeleteNetworkInterface",
                "AssignPrivateIpAddresses",
                "UnassignPrivateIpAddresses",
                "ModifyNetworkInterfaceAttribute",
                "CreateTags",
            ]
        );
        assert!(!Operation::DetachNetworkInterface.used_in(ControllerMode::Routed));
    }

    #[test]
    fn bucket_never_exceeds_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(
            BucketLimits {
                capacity: 3.0,
                refill_per_sec: 1.0,
            },
            t0,
        );
        assert_eq!(b.available(t0 + Duration::from_secs(3600)), 3.0);
    }
}
