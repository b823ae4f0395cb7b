//! AWS's EC2 request throttling, as data: which token bucket each call draws from, and the buckets themselves.
//!
//! EC2 throttles per account and region, and (as AWS's throttling page now says) per API action: every action
//! has a token bucket of its own, so CreateRoute, ReplaceRoute and DeleteRoute never draw from one another's
//! bucket. Each bucket holds up to `capacity` tokens, refills `refill_per_sec` tokens per second, and every call
//! takes one token from its bucket or fails with `RequestLimitExceeded`. Published defaults
//! (<https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html>; see docs/aws.md for the copy read):
//!
//! ```text
//!   each action's own bucket                         capacity  refill/s
//!   Describe* (filtered or paginated)                     100        20
//!   Describe* (unfiltered and unpaginated)                 50        10
//!   mutating default (CreateRoute, ReplaceRoute,           50         5
//!     DeleteRoute, AttachNetworkInterface, …)
//!   AssignPrivateIpAddresses                              100         5
//!   UnassignPrivateIpAddresses                            100         5
//!   CreateNetworkInterface                                100         5
//!   DeleteNetworkInterface                                100         5
//!   ModifyNetworkInterfaceAttribute                       100         5
//!   CreateTags                                            100        10
//! ```
//!
//! Where AWS is silent the model takes the conservative reading and makes it a setting:
//! [`RateLimits::creation_draws_assign`] (does CreateNetworkInterface with secondary addresses or prefixes also
//! draw on AssignPrivateIpAddresses' bucket? assumed yes by default).
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

    /// The bucket a call draws from: the action's own. `unfiltered` only matters for describes (this port never
    /// sends one, but vpcsim models the smaller bucket of an unfiltered, unpaginated describe).
    pub fn bucket(self, unfiltered: bool) -> Bucket {
        if self.is_describe() && unfiltered {
            Bucket::Unfiltered(self)
        } else {
            Bucket::Action(self)
        }
    }

    /// Whether AWS lists the action with a 100 / 5 bucket of its own (the ENI and address actions).
    pub fn has_resource_sized_bucket(self) -> bool {
        matches!(
            self,
            Operation::AssignPrivateIpAddresses
                | Operation::UnassignPrivateIpAddresses
                | Operation::CreateNetworkInterface
                | Operation::DeleteNetworkInterface
                | Operation::ModifyNetworkInterfaceAttribute
        )
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

/// One of EC2's token buckets: every action has its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Bucket {
    /// The action's bucket (for a describe: filtered or paginated calls).
    Action(Operation),
    /// The smaller bucket of an unfiltered, unpaginated describe of this action.
    Unfiltered(Operation),
}

impl Bucket {
    /// The action whose bucket this is.
    pub fn operation(self) -> Operation {
        match self {
            Bucket::Action(op) | Bucket::Unfiltered(op) => op,
        }
    }

    /// Label for metrics (`bucket` label of queue metrics): the action's name, or `unfiltered_describe` for an
    /// unfiltered describe's bucket (which this port never draws on).
    pub fn metric_label(self) -> &'static str {
        match self {
            Bucket::Action(op) => op.name(),
            Bucket::Unfiltered(_) => "unfiltered_describe",
        }
    }
}

impl std::fmt::Display for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bucket::Action(op) => write!(f, "{op}"),
            Bucket::Unfiltered(op) => write!(f, "{op} (unfiltered)"),
        }
    }
}

/// Size and refill of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BucketLimits {
    pub capacity: f64,
    pub refill_per_sec: f64,
}

/// The limits of every bucket, by class of action (each action still has a bucket of its own of that size).
/// [`RateLimits::aws_default`] is AWS's published account default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateLimits {
    /// Each describe's bucket (filtered or paginated calls).
    pub describe: BucketLimits,
    /// Each describe's bucket for unfiltered, unpaginated calls.
    pub unfiltered_describe: BucketLimits,
    /// Each other mutating action's bucket (route changes, attach, detach).
    pub mutating: BucketLimits,
    /// Each ENI and address action's bucket (ENI create/delete/modify, address assign/unassign).
    pub resource: BucketLimits,
    /// CreateTags's bucket.
    pub create_tags: BucketLimits,
    /// Limits of single actions' buckets that differ from their class (e.g. a raised limit, or a caller's own
    /// pacing of one action with a headroom of its own).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub per_action: BTreeMap<Operation, BucketLimits>,
    /// Whether CreateNetworkInterface that asks for secondary addresses or prefixes also takes a token from
    /// AssignPrivateIpAddresses' bucket. AWS does not say; `true` (the conservative reading) by default.
    #[serde(default = "yes")]
    pub creation_draws_assign: bool,
}

fn yes() -> bool {
    true
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
            creation_draws_assign: true,
        }
    }

    /// These limits with [`RateLimits::creation_draws_assign`] set to `draws`.
    pub fn with_creation_draws_assign(mut self, draws: bool) -> Self {
        self.creation_draws_assign = draws;
        self
    }

    /// The actions whose buckets one CreateNetworkInterface takes a token from: its own, and AssignPrivateIp-
    /// Addresses' when it asks for addresses and [`RateLimits::creation_draws_assign`] holds.
    pub fn create_eni_draws(&self, with_addresses: bool) -> Vec<Operation> {
        let mut ops = vec![Operation::CreateNetworkInterface];
        if with_addresses && self.creation_draws_assign {
            ops.push(Operation::AssignPrivateIpAddresses);
        }
        ops
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
            creation_draws_assign: self.creation_draws_assign,
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
            creation_draws_assign: self.creation_draws_assign,
        }
    }

    /// These limits with `op`'s own bucket set to `limits`.
    pub fn with_action(mut self, op: Operation, limits: BucketLimits) -> Self {
        self.per_action.insert(op, limits);
        self
    }

    pub fn limits(&self, bucket: Bucket) -> BucketLimits {
        match bucket {
            Bucket::Unfiltered(_) => self.unfiltered_describe,
            Bucket::Action(op) if self.per_action.contains_key(&op) => self.per_action[&op],
            Bucket::Action(op) if op.is_describe() => self.describe,
            Bucket::Action(Operation::CreateTags) => self.create_tags,
            Bucket::Action(op) if op.has_resource_sized_bucket() => self.resource,
            Bucket::Action(_) => self.mutating,
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

    /// Tokens in `bucket` now (a bucket never used is full).
    pub fn available(&mut self, bucket: Bucket, now: Instant) -> f64 {
        let limits = self.limits.limits(bucket);
        self.buckets
            .entry(bucket)
            .or_insert_with(|| TokenBucket::new(limits, now))
            .available(now)
    }
}

/// What a caller can expect of one bucket now: the tokens in it, its refill, and the callers already waiting.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BucketOutlook {
    pub tokens: f64,
    pub refill_per_sec: f64,
    pub waiting: usize,
}

impl BucketOutlook {
    /// Seconds until the `n`-th further caller (1-based, behind those waiting) would get its token.
    pub fn wait_for(&self, n: usize) -> f64 {
        let short = (self.waiting + n) as f64 - self.tokens;
        if short <= 0.0 {
            0.0
        } else if self.refill_per_sec <= 0.0 {
            f64::INFINITY
        } else {
            short / self.refill_per_sec
        }
    }
}

/// For `n` callers that can each do their work in one of several ways (`paths[i]`: the buckets way `i` takes a
/// token from, one each), choose a way per caller, in order: the one whose last token would come soonest given
/// the outlook of every bucket and the callers already sent down each way. Ties go to the earlier way. A bucket
/// missing from `outlook` is taken as never short.
pub fn choose_paths(
    n: usize,
    paths: &[Vec<Bucket>],
    outlook: &BTreeMap<Bucket, BucketOutlook>,
) -> Vec<usize> {
    let mut sent: BTreeMap<Bucket, usize> = BTreeMap::new();
    let mut chosen = Vec::with_capacity(n);
    for _ in 0..n {
        let finish = |path: &Vec<Bucket>| {
            path.iter()
                .map(|b| {
                    outlook
                        .get(b)
                        .map_or(0.0, |o| o.wait_for(sent.get(b).copied().unwrap_or(0) + 1))
                })
                .fold(0.0, f64::max)
        };
        let Some(best) = (0..paths.len()).min_by(|a, b| {
            finish(&paths[*a])
                .total_cmp(&finish(&paths[*b]))
                .then(a.cmp(b))
        }) else {
            break;
        };
        for b in &paths[best] {
            *sent.entry(*b).or_default() += 1;
        }
        chosen.push(best);
    }
    chosen
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
        // Every action has its own bucket: DeleteRoute and ReplaceRoute are untouched by CreateRoute's burst.
        assert!(set.try_take(Operation::DeleteRoute, false, t0).is_ok());
        assert!(set.try_take(Operation::CreateTags, false, t0).is_ok());
        assert!(
            set.try_take(Operation::AssignPrivateIpAddresses, false, t0)
                .is_ok()
        );
        let ok = (0..60)
            .filter(|_| set.try_take(Operation::ReplaceRoute, false, t0).is_ok())
            .count();
        assert_eq!(ok, 50);
        // One second later exactly five more CreateRoute calls succeed.
        let t1 = t0 + Duration::from_secs(1);
        let ok = (0..10)
            .filter(|_| set.try_take(Operation::CreateRoute, false, t1).is_ok())
            .count();
        assert_eq!(ok, 5);
    }

    #[test]
    fn published_sizes_per_action() {
        let l = RateLimits::aws_default();
        let of = |op: Operation| {
            let b = l.limits(op.bucket(false));
            (b.capacity, b.refill_per_sec)
        };
        assert_eq!(of(Operation::CreateRoute), (50.0, 5.0));
        assert_eq!(of(Operation::ReplaceRoute), (50.0, 5.0));
        assert_eq!(of(Operation::AttachNetworkInterface), (50.0, 5.0));
        assert_eq!(of(Operation::CreateNetworkInterface), (100.0, 5.0));
        assert_eq!(of(Operation::AssignPrivateIpAddresses), (100.0, 5.0));
        assert_eq!(of(Operation::ModifyNetworkInterfaceAttribute), (100.0, 5.0));
        assert_eq!(of(Operation::CreateTags), (100.0, 10.0));
        assert_eq!(of(Operation::DescribeRouteTables), (100.0, 20.0));
        let u = l.limits(Operation::DescribeRouteTables.bucket(true));
        assert_eq!((u.capacity, u.refill_per_sec), (50.0, 10.0));
    }

    #[test]
    fn creation_with_addresses_draws_assign_only_when_set() {
        let l = RateLimits::aws_default();
        assert!(
            l.creation_draws_assign,
            "the conservative reading is the default"
        );
        assert_eq!(
            l.create_eni_draws(true),
            [
                Operation::CreateNetworkInterface,
                Operation::AssignPrivateIpAddresses
            ]
        );
        assert_eq!(
            l.create_eni_draws(false),
            [Operation::CreateNetworkInterface]
        );
        let l = l.with_creation_draws_assign(false);
        assert_eq!(
            l.create_eni_draws(true),
            [Operation::CreateNetworkInterface]
        );
        assert!(!l.scaled(0.5).creation_draws_assign);
    }

    #[test]
    fn paths_spread_over_independent_buckets_and_not_over_a_shared_one() {
        let assign = Bucket::Action(Operation::AssignPrivateIpAddresses);
        let create = Bucket::Action(Operation::CreateNetworkInterface);
        let attach = Bucket::Action(Operation::AttachNetworkInterface);
        let full = |tokens: f64| BucketOutlook {
            tokens,
            refill_per_sec: 5.0,
            waiting: 0,
        };
        let outlook = BTreeMap::from([
            (assign, full(100.0)),
            (create, full(100.0)),
            (attach, full(50.0)),
        ]);
        let independent = vec![vec![assign], vec![create, attach]];
        let chosen = choose_paths(1000, &independent, &outlook);
        let by_create = chosen.iter().filter(|c| **c == 1).count();
        // Both ways finish together: 100 + 5t on Assign, 50 + 5t through attach.
        assert_eq!(by_create, 475, "{by_create}");
        // When creation also draws on Assign, the second way can never be sooner: everything goes by Assign.
        let shared = vec![vec![assign], vec![create, assign, attach]];
        assert!(
            choose_paths(1000, &shared, &outlook)
                .iter()
                .all(|c| *c == 0)
        );
        // Callers already waiting on Assign push newcomers the other way at once.
        let mut busy = outlook.clone();
        busy.insert(
            assign,
            BucketOutlook {
                tokens: 0.0,
                refill_per_sec: 5.0,
                waiting: 10,
            },
        );
        assert_eq!(choose_paths(1, &independent, &busy), [1]);
    }

    #[test]
    fn buckets_per_operation() {
        for op in Operation::ALL {
            assert_eq!(op.bucket(false), Bucket::Action(op));
            assert_eq!(op.bucket(false).operation(), op);
        }
        assert_eq!(
            Operation::DescribeRouteTables.bucket(true),
            Bucket::Unfiltered(Operation::DescribeRouteTables)
        );
        assert_eq!(
            Operation::CreateRoute.bucket(true),
            Bucket::Action(Operation::CreateRoute)
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
            .limits(Bucket::Action(modify))
            .less_headroom(Duration::from_secs(1));
        let l = l.with_action(modify, own);
        assert_eq!(
            l.limits(Bucket::Action(modify)).capacity,
            100.0 - 6.0 - 1.0 - 5.0 - 1.0
        );
        assert_eq!(
            l.limits(Bucket::Action(Operation::AssignPrivateIpAddresses))
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
