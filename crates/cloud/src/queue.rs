//! The rate-aware queue: a [`Cloud`] wrapper that waits for a token of the right EC2 bucket before each call,
//! lets failover route changes jump ahead of bulk work, and retries transient failures with jittered
//! exponential backoff within a deadline.
//!
//! ```text
//!   controller ──► RateLimitedCloud ─(per-bucket FIFO, failover lane first)─► token? ─► inner Cloud ─► EC2
//!                     │      ▲                                                              │
//!                     │      └────── retry: throttled / 5xx / transport, full jitter, deadline ◄┘
//!                     └─► QueueStats (depth, waits, retries); CloudMetrics (Prometheus) when given one
//! ```
//!
//! Why here and not in the adapter: the queue is pure policy over the [`Cloud`] port, so vpcsim-backed
//! controllers in tests and in the lab get the same pacing and the same retries as production.
//!
//! - **Buckets.** The local model is a [`BucketSet`] built from [`RateLimits`] (by default AWS's published
//!   account limits scaled by [`QueueConfig::share`], since other tools draw from the same account). Every EC2
//!   action has a bucket of its own, and a call waits in its action's lane until that bucket has a token:
//!   CreateRoute, ReplaceRoute and DeleteRoute never wait for each other, nor ENI work for route work.
//!   [`RateLimitedCloud::outlook`] tells a caller what a bucket holds and who waits on it, so it can choose
//!   between ways that draw on different buckets (the eni reconciler's first addresses of a node).
//! - **Order.** Within a bucket, callers are served first come, first served, except that every
//!   [`Priority::Failover`] caller is served before any [`Priority::Normal`] one. A handle's priority is chosen
//!   with [`RateLimitedCloud::with_priority`]; handles share one queue.
//! - **Retries.** `RequestLimitExceeded` (throttled: EC2 did not run the call) is retried for every operation.
//!   5xx and transport failures are retried only where repeating the call cannot do the work twice (describes,
//!   route changes, CreateNetworkInterface with its client token, tags, attributes, unassigns, explicit
//!   assigns); AttachNetworkInterface and counted assigns are returned to the caller, who observes and replans.
//!   Every attempt takes a token. No attempt starts after the deadline, measured from the first attempt.
//! - **Multi-call operations.** `attach_network_interface(.., delete_on_termination = true)` is two EC2 calls
//!   (AttachNetworkInterface, ModifyNetworkInterfaceAttribute) and takes a token from each bucket.
//!   CreateNetworkInterface with addresses also takes an AssignPrivateIpAddresses token when
//!   [`RateLimits::creation_draws_assign`] says so. A paginated describe is charged one token (pages beyond the
//!   first are rare at underlay's page sizes: 1,000 items, or 100 route tables).
//!
//! Time comes from `tokio::time`, so tests run it with a paused clock.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ipnet::Ipv4Net;
use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics::CloudMetrics;
use crate::ratelimit::{Bucket, BucketOutlook, BucketSet, Operation, RateLimits};
use crate::{
    AddressRequest, AttachmentId, Cloud, CreateEniRequest, EniFilter, EniId, Instance,
    InstanceFilter, InstanceId, InstanceTypeInfo, NetworkInterface, Result, RouteTable,
    RouteTableId, RouteTarget, Subnet, Tags, Vpc, VpcId,
};

/// Which lane a call waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Priority {
    /// Route changes that restore connectivity after a forwarder failed: served before any normal call.
    Failover,
    /// Everything else (planned route changes, ENI and address work, describes).
    #[default]
    Normal,
}

impl Priority {
    /// Label for metrics (`lane`).
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Failover => "failover",
            Priority::Normal => "normal",
        }
    }
}

/// Backoff policy for retryable errors.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Upper bound of the first backoff; doubles per retry.
    pub base: Duration,
    /// Cap of a single backoff.
    pub max_backoff: Duration,
    /// No attempt starts later than this after the first one.
    pub deadline: Duration,
    /// Attempts in all, the first included.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            max_backoff: Duration::from_secs(20),
            deadline: Duration::from_secs(120),
            max_attempts: 10,
        }
    }
}

impl RetryPolicy {
    /// Never retry.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Full-jitter backoff before retry number `retry` (1-based): uniform in `[0, min(cap, base·2^(retry-1))]`.
    pub fn backoff(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let exp = self.base.saturating_mul(
            1u32.checked_shl(retry.saturating_sub(1))
                .unwrap_or(u32::MAX),
        );
        let ceiling = exp.min(self.max_backoff);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }
}

/// How the queue paces and retries.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    /// The account's buckets (AWS defaults unless the account has raised limits).
    pub limits: RateLimits,
    /// Fraction of the account's limits this queue may use (0 < share ≤ 1); other tools share the account.
    pub share: f64,
    pub retry: RetryPolicy,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            limits: RateLimits::aws_default(),
            share: 0.8,
            retry: RetryPolicy::default(),
        }
    }
}

/// Counters for metrics. Durations are sums over completed waits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueStats {
    /// Callers waiting for a token now, per bucket.
    pub depth: BTreeMap<Bucket, usize>,
    /// Tokens granted (EC2 calls made through the queue).
    pub granted: u64,
    /// Total time callers waited for tokens.
    pub waited: Duration,
    /// Longest single wait for a token.
    pub max_wait: Duration,
    /// Retries made, by error kind label ([`crate::ErrorKind::metric_label`]).
    pub retries: BTreeMap<&'static str, u64>,
}

impl QueueStats {
    /// Callers waiting, all buckets together.
    pub fn total_depth(&self) -> usize {
        self.depth.values().sum()
    }
}

#[derive(Debug, Default)]
struct Lanes {
    failover: VecDeque<u64>,
    normal: VecDeque<u64>,
}

impl Lanes {
    fn head(&self) -> Option<u64> {
        self.failover
            .front()
            .or_else(|| self.normal.front())
            .copied()
    }
    fn remove(&mut self, ticket: u64) {
        self.failover.retain(|t| *t != ticket);
        self.normal.retain(|t| *t != ticket);
    }
    fn len(&self) -> usize {
        self.failover.len() + self.normal.len()
    }
}

#[derive(Debug)]
struct State {
    buckets: BucketSet,
    lanes: BTreeMap<Bucket, Lanes>,
    next_ticket: u64,
    stats: QueueStats,
}

#[derive(Debug)]
struct Shared<C> {
    inner: C,
    retry: RetryPolicy,
    /// The buckets' limits as this queue paces them (the account's, scaled by its share).
    limits: RateLimits,
    metrics: Option<CloudMetrics>,
    state: Mutex<State>,
    /// Woken whenever a lane's head may have changed.
    changed: Notify,
}

impl<C> Shared<C> {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves only counters and queues behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A [`Cloud`] that paces, orders and retries calls to another [`Cloud`]. Cheap to clone; clones and
/// [`with_priority`](Self::with_priority) handles share one queue and one set of buckets.
#[derive(Debug)]
pub struct RateLimitedCloud<C> {
    shared: Arc<Shared<C>>,
    priority: Priority,
}

impl<C> Clone for RateLimitedCloud<C> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            priority: self.priority,
        }
    }
}

/// Removes a caller from its lane however its wait ends (token granted, or the future dropped).
struct Ticket<'a, C> {
    shared: &'a Shared<C>,
    bucket: Bucket,
    lane: Priority,
    ticket: u64,
}

impl<C> Drop for Ticket<'_, C> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if let Some(lanes) = state.lanes.get_mut(&self.bucket) {
            lanes.remove(self.ticket);
        }
        drop(state);
        if let Some(m) = &self.shared.metrics {
            m.queue_depth_add(self.bucket, self.lane, -1);
        }
        self.shared.changed.notify_waiters();
    }
}

impl<C: Cloud> RateLimitedCloud<C> {
    pub fn new(inner: C, config: QueueConfig) -> Self {
        Self::build(inner, config, None)
    }

    /// A queue that also reports to `metrics` (see [`crate::metrics`]).
    pub fn new_with_metrics(inner: C, config: QueueConfig, metrics: CloudMetrics) -> Self {
        Self::build(inner, config, Some(metrics))
    }

    fn build(inner: C, config: QueueConfig, metrics: Option<CloudMetrics>) -> Self {
        let share = if config.share > 0.0 && config.share <= 1.0 {
            config.share
        } else {
            1.0
        };
        Self {
            shared: Arc::new(Shared {
                inner,
                retry: config.retry,
                limits: config.limits.scaled(share),
                metrics,
                state: Mutex::new(State {
                    buckets: BucketSet::new(config.limits.scaled(share)),
                    lanes: BTreeMap::new(),
                    next_ticket: 0,
                    stats: QueueStats::default(),
                }),
                changed: Notify::new(),
            }),
            priority: Priority::Normal,
        }
    }

    /// A handle on the same queue whose calls wait in `priority`'s lane.
    pub fn with_priority(&self, priority: Priority) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            priority,
        }
    }

    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// The wrapped implementation (calls made on it bypass the queue).
    pub fn inner(&self) -> &C {
        &self.shared.inner
    }

    /// A snapshot of the queue's counters.
    pub fn stats(&self) -> QueueStats {
        let state = self.shared.lock();
        let mut stats = state.stats.clone();
        stats.depth = state
            .lanes
            .iter()
            .filter(|(_, l)| l.len() > 0)
            .map(|(b, l)| (*b, l.len()))
            .collect();
        stats
    }

    /// What a caller of `bucket` can expect now: tokens left, refill, callers already waiting.
    pub fn outlook(&self, bucket: Bucket) -> BucketOutlook {
        let mut state = self.shared.lock();
        let waiting = state.lanes.get(&bucket).map_or(0, Lanes::len);
        let tokens = state.buckets.available(bucket, Instant::now().into_std());
        BucketOutlook {
            tokens,
            refill_per_sec: self.shared.limits.limits(bucket).refill_per_sec,
            waiting,
        }
    }

    /// Wait in `op`'s lane until its bucket grants a token.
    pub async fn acquire(&self, op: Operation) {
        let shared = &*self.shared;
        let bucket = op.bucket(false);
        let ticket = {
            let mut state = shared.lock();
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            let lanes = state.lanes.entry(bucket).or_default();
            match self.priority {
                Priority::Failover => lanes.failover.push_back(ticket),
                Priority::Normal => lanes.normal.push_back(ticket),
            }
            ticket
        };
        let guard = Ticket {
            shared,
            bucket,
            lane: self.priority,
            ticket,
        };
        if let Some(m) = &shared.metrics {
            m.queue_depth_add(bucket, self.priority, 1);
        }
        // A newcomer in the failover lane may have become the head: let the current head re-check.
        shared.changed.notify_waiters();
        let started = Instant::now();
        loop {
            let notified = shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait = {
                let mut state = shared.lock();
                if state.lanes.get(&bucket).and_then(Lanes::head) == Some(ticket) {
                    match state.buckets.try_take(op, false, Instant::now().into_std()) {
                        Ok(()) => {
                            let waited = started.elapsed();
                            state.stats.granted += 1;
                            state.stats.waited += waited;
                            state.stats.max_wait = state.stats.max_wait.max(waited);
                            if let Some(m) = &shared.metrics {
                                m.record_wait(bucket, self.priority, waited.as_secs_f64());
                            }
                            None
                        }
                        Err(d) => Some(Some(d)),
                    }
                } else {
                    Some(None)
                }
            };
            match wait {
                None => break,
                Some(Some(d)) => {
                    // A sub-millisecond wait (float rounding) must still let the clock move.
                    let d = d.max(Duration::from_millis(1));
                    tokio::select! {
                        () = tokio::time::sleep(d) => {}
                        () = &mut notified => {}
                    }
                }
                Some(None) => notified.await,
            }
        }
        drop(guard);
    }

    /// Run one logical call: tokens for each of `ops`, then `call`, retried per the policy.
    async fn run<T, F, Fut>(&self, ops: &[Operation], idempotent: bool, call: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let policy = &self.shared.retry;
        let first = Instant::now();
        let mut attempt = 1u32;
        loop {
            for op in ops {
                self.acquire(*op).await;
            }
            let started = Instant::now();
            let result = call().await;
            if let Some(m) = &self.shared.metrics {
                // A multi-call operation is reported under its first action.
                m.record_call(
                    ops[0],
                    result.as_ref().map(|_| ()),
                    started.elapsed().as_secs_f64(),
                );
            }
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let retryable = err.is_throttled() || (idempotent && err.is_retryable());
            if !retryable || attempt >= policy.max_attempts {
                return Err(err);
            }
            let delay = policy.backoff(attempt, &mut rand::rng());
            if first.elapsed() + delay > policy.deadline {
                return Err(err);
            }
            tracing::debug!(
                op = %ops[0],
                attempt,
                code = %err.code,
                delay_ms = delay.as_millis() as u64,
                "retrying EC2 call"
            );
            *self
                .shared
                .lock()
                .stats
                .retries
                .entry(err.kind.metric_label())
                .or_default() += 1;
            if let Some(m) = &self.shared.metrics {
                m.record_retry(ops[0], err.kind);
            }
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

#[async_trait::async_trait]
impl<C: Cloud> Cloud for RateLimitedCloud<C> {
    fn rate_limits(&self) -> Option<RateLimits> {
        Some(self.shared.limits.clone())
    }

    fn bucket_outlook(&self, bucket: Bucket) -> Option<BucketOutlook> {
        Some(self.outlook(bucket))
    }

    async fn describe_vpc(&self, vpc: &VpcId) -> Result<Vpc> {
        let c = &self.shared.inner;
        self.run(&[Operation::DescribeVpcs], true, || c.describe_vpc(vpc))
            .await
    }

    async fn describe_subnets(&self, vpc: &VpcId) -> Result<Vec<Subnet>> {
        let c = &self.shared.inner;
        self.run(&[Operation::DescribeSubnets], true, || {
            c.describe_subnets(vpc)
        })
        .await
    }

    async fn describe_route_tables(&self, vpc: &VpcId) -> Result<Vec<RouteTable>> {
        let c = &self.shared.inner;
        self.run(&[Operation::DescribeRouteTables], true, || {
            c.describe_route_tables(vpc)
        })
        .await
    }

    async fn describe_instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>> {
        let c = &self.shared.inner;
        self.run(&[Operation::DescribeInstances], true, || {
            c.describe_instances(filter)
        })
        .await
    }

    async fn describe_instance_types(&self, types: &[String]) -> Result<Vec<InstanceTypeInfo>> {
        let c = &self.shared.inner;
        self.run(&[Operation::DescribeInstanceTypes], true, || {
            c.describe_instance_types(types)
        })
        .await
    }

    async fn describe_network_interfaces(
        &self,
        filter: &EniFilter,
    ) -> Result<Vec<NetworkInterface>> {
        let c = &self.shared.inner;
        self.run(&[Operation::DescribeNetworkInterfaces], true, || {
            c.describe_network_interfaces(filter)
        })
        .await
    }

    async fn create_route(
        &self,
        table: &RouteTableId,
        destination: Ipv4Net,
        target: &RouteTarget,
    ) -> Result<()> {
        let c = &self.shared.inner;
        // A repeat after a lost reply answers RouteAlreadyExists, which callers already treat as done.
        self.run(&[Operation::CreateRoute], true, || {
            c.create_route(table, destination, target)
        })
        .await
    }

    async fn replace_route(
        &self,
        table: &RouteTableId,
        destination: Ipv4Net,
        target: &RouteTarget,
    ) -> Result<()> {
        let c = &self.shared.inner;
        self.run(&[Operation::ReplaceRoute], true, || {
            c.replace_route(table, destination, target)
        })
        .await
    }

    async fn delete_route(&self, table: &RouteTableId, destination: Ipv4Net) -> Result<()> {
        let c = &self.shared.inner;
        self.run(&[Operation::DeleteRoute], true, || {
            c.delete_route(table, destination)
        })
        .await
    }

    async fn create_network_interface(
        &self,
        request: &CreateEniRequest,
    ) -> Result<NetworkInterface> {
        let c = &self.shared.inner;
        let with_addresses = request.secondary_ip_count > 0 || request.prefix_count > 0;
        let ops = self.shared.limits.create_eni_draws(with_addresses);
        // The client token makes a repeat return the first ENI.
        self.run(&ops, true, || c.create_network_interface(request))
            .await
    }

    async fn attach_network_interface(
        &self,
        eni: &EniId,
        instance: &InstanceId,
        device_index: u32,
        delete_on_termination: bool,
    ) -> Result<AttachmentId> {
        let c = &self.shared.inner;
        let ops: &[Operation] = if delete_on_termination {
            &[
                Operation::AttachNetworkInterface,
                Operation::ModifyNetworkInterfaceAttribute,
            ]
        } else {
            &[Operation::AttachNetworkInterface]
        };
        self.run(ops, false, || {
            c.attach_network_interface(eni, instance, device_index, delete_on_termination)
        })
        .await
    }

    async fn set_delete_on_termination(
        &self,
        eni: &EniId,
        attachment: &AttachmentId,
        enabled: bool,
    ) -> Result<()> {
        let c = &self.shared.inner;
        self.run(&[Operation::ModifyNetworkInterfaceAttribute], true, || {
            c.set_delete_on_termination(eni, attachment, enabled)
        })
        .await
    }

    async fn detach_network_interface(&self, attachment: &AttachmentId, force: bool) -> Result<()> {
        let c = &self.shared.inner;
        self.run(&[Operation::DetachNetworkInterface], true, || {
            c.detach_network_interface(attachment, force)
        })
        .await
    }

    async fn delete_network_interface(&self, eni: &EniId) -> Result<()> {
        let c = &self.shared.inner;
        self.run(&[Operation::DeleteNetworkInterface], true, || {
            c.delete_network_interface(eni)
        })
        .await
    }

    async fn assign_private_ips(
        &self,
        eni: &EniId,
        request: &AddressRequest<Ipv4Addr>,
    ) -> Result<Vec<Ipv4Addr>> {
        let c = &self.shared.inner;
        let idempotent = matches!(request, AddressRequest::Explicit(_));
        self.run(&[Operation::AssignPrivateIpAddresses], idempotent, || {
            c.assign_private_ips(eni, request)
        })
        .await
    }

    async fn unassign_private_ips(&self, eni: &EniId, addresses: &[Ipv4Addr]) -> Result<()> {
        let c = &self.shared.inner;
        self.run(&[Operation::UnassignPrivateIpAddresses], true, || {
            c.unassign_private_ips(eni, addresses)
        })
        .await
    }

    async fn assign_prefixes(
        &self,
        eni: &EniId,
        request: &AddressRequest<Ipv4Net>,
    ) -> Result<Vec<Ipv4Net>> {
        let c = &self.shared.inner;
        let idempotent = matches!(request, AddressRequest::Explicit(_));
        self.run(&[Operation::AssignPrivateIpAddresses], idempotent, || {
            c.assign_prefixes(eni, request)
        })
        .await
    }

    async fn unassign_prefixes(&self, eni: &EniId, prefixes: &[Ipv4Net]) -> Result<()> {
        let c = &self.shared.inner;
        self.run(&[Operation::UnassignPrivateIpAddresses], true, || {
            c.unassign_prefixes(eni, prefixes)
        })
        .await
    }

    async fn set_source_dest_check(&self, eni: &EniId, enabled: bool) -> Result<()> {
        let c = &self.shared.inner;
        self.run(&[Operation::ModifyNetworkInterfaceAttribute], true, || {
            c.set_source_dest_check(eni, enabled)
        })
        .await
    }

    async fn create_tags(&self, resources: &[String], tags: &Tags) -> Result<()> {
        let c = &self.shared.inner;
        self.run(&[Operation::CreateTags], true, || {
            c.create_tags(resources, tags)
        })
        .await
    }
}
