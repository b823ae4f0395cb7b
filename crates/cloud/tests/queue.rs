//! The rate-aware queue against a stub EC2 that enforces AWS's account buckets ([`BucketSet`]) and answers
//! `RequestLimitExceeded` when a bucket is empty, as EC2 does. All tests run on tokio's paused clock: time only
//! moves when every task waits, so pacing is checked by counts and by virtual time, never by wall time.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::time::Instant;
use underlay_cloud::queue::{Priority, QueueConfig, RateLimitedCloud, RetryPolicy};
use underlay_cloud::*;

/// EC2 as far as throttling goes: every call takes a token from the account's buckets at tokio's `now`, or fails
/// with `RequestLimitExceeded`. Scripted errors (front first) are answered before the bucket is consulted.
/// One call the stub answered: operation, result, when, and what it was about.
type Call = (Operation, Result<()>, Instant, String);

#[derive(Debug, Clone)]
struct ThrottlingStub(Arc<StubState>);

impl std::ops::Deref for ThrottlingStub {
    type Target = StubState;
    fn deref(&self) -> &StubState {
        &self.0
    }
}

#[derive(Debug)]
struct StubState {
    buckets: Mutex<BucketSet>,
    log: Mutex<Vec<Call>>,
    script: Mutex<VecDeque<CloudError>>,
}

impl ThrottlingStub {
    fn new() -> Self {
        Self(Arc::new(StubState {
            buckets: Mutex::new(BucketSet::new(RateLimits::aws_default())),
            log: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
        }))
    }
}

impl StubState {
    fn call(&self, op: Operation, what: String) -> Result<()> {
        let now = Instant::now();
        let result = match self.script.lock().unwrap().pop_front() {
            Some(e) => Err(e),
            None => match self
                .buckets
                .lock()
                .unwrap()
                .try_take(op, false, now.into_std())
            {
                Ok(()) => Ok(()),
                Err(_) => Err(CloudError::from_code(
                    "RequestLimitExceeded",
                    "Request limit exceeded.",
                )),
            },
        };
        self.log
            .lock()
            .unwrap()
            .push((op, result.clone(), now, what));
        result
    }

    fn throttled(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r, _, _)| r.as_ref().is_err_and(CloudError::is_throttled))
            .count()
    }

    fn calls(&self) -> usize {
        self.log.lock().unwrap().len()
    }
}

fn mk_eni(id: &str) -> NetworkInterface {
    NetworkInterface {
        id: EniId::new(id),
        vpc: VpcId::new("vpc-1"),
        subnet: SubnetId::new("subnet-1"),
        zone: "us-east-1a".into(),
        mac: "02:00:00:00:00:01".into(),
        primary_ip: Ipv4Addr::new(198, 18, 0, 10),
        secondary_ips: vec![],
        prefixes: vec![],
        status: EniStatus::Available,
        attachment: None,
        source_dest_check: true,
        security_groups: vec![],
        description: String::new(),
        tags: Tags::new(),
    }
}

#[async_trait::async_trait]
impl Cloud for ThrottlingStub {
    async fn describe_vpc(&self, vpc: &VpcId) -> Result<Vpc> {
        self.call(Operation::DescribeVpcs, vpc.to_string())?;
        Ok(Vpc {
            id: vpc.clone(),
            cidrs: vec!["198.18.0.0/16".parse().unwrap()],
            tags: Tags::new(),
        })
    }
    async fn describe_subnets(&self, vpc: &VpcId) -> Result<Vec<Subnet>> {
        self.call(Operation::DescribeSubnets, vpc.to_string())
            .map(|()| vec![])
    }
    async fn describe_route_tables(&self, vpc: &VpcId) -> Result<Vec<RouteTable>> {
        self.call(Operation::DescribeRouteTables, vpc.to_string())
            .map(|()| vec![])
    }
    async fn describe_instances(&self, _: &InstanceFilter) -> Result<Vec<Instance>> {
        self.call(Operation::DescribeInstances, String::new())
            .map(|()| vec![])
    }
    async fn describe_instance_types(&self, _: &[String]) -> Result<Vec<InstanceTypeInfo>> {
        self.call(Operation::DescribeInstanceTypes, String::new())
            .map(|()| vec![])
    }
    async fn describe_network_interfaces(&self, _: &EniFilter) -> Result<Vec<NetworkInterface>> {
        self.call(Operation::DescribeNetworkInterfaces, String::new())
            .map(|()| vec![])
    }
    async fn create_route(&self, _: &RouteTableId, d: Ipv4Net, _: &RouteTarget) -> Result<()> {
        self.call(Operation::CreateRoute, d.to_string())
    }
    async fn replace_route(&self, _: &RouteTableId, d: Ipv4Net, _: &RouteTarget) -> Result<()> {
        self.call(Operation::ReplaceRoute, d.to_string())
    }
    async fn delete_route(&self, _: &RouteTableId, d: Ipv4Net) -> Result<()> {
        self.call(Operation::DeleteRoute, d.to_string())
    }
    async fn create_network_interface(&self, r: &CreateEniRequest) -> Result<NetworkInterface> {
        self.call(Operation::CreateNetworkInterface, r.client_token.clone())
            .map(|()| mk_eni("eni-new"))
    }
    async fn attach_network_interface(
        &self,
        eni: &EniId,
        _: &InstanceId,
        _: u32,
        dot: bool,
    ) -> Result<AttachmentId> {
        self.call(Operation::AttachNetworkInterface, eni.to_string())?;
        if dot {
            self.call(Operation::ModifyNetworkInterfaceAttribute, eni.to_string())?;
        }
        Ok(AttachmentId::new("eni-attach-1"))
    }
    async fn set_delete_on_termination(
        &self,
        eni: &EniId,
        _: &AttachmentId,
        _: bool,
    ) -> Result<()> {
        self.call(Operation::ModifyNetworkInterfaceAttribute, eni.to_string())
    }
    async fn detach_network_interface(&self, a: &AttachmentId, _: bool) -> Result<()> {
        self.call(Operation::DetachNetworkInterface, a.to_string())
    }
    async fn delete_network_interface(&self, eni: &EniId) -> Result<()> {
        self.call(Operation::DeleteNetworkInterface, eni.to_string())
    }
    async fn assign_private_ips(
        &self,
        eni: &EniId,
        _: &AddressRequest<Ipv4Addr>,
    ) -> Result<Vec<Ipv4Addr>> {
        self.call(Operation::AssignPrivateIpAddresses, eni.to_string())
            .map(|()| vec![Ipv4Addr::new(198, 18, 0, 11)])
    }
    async fn unassign_private_ips(&self, eni: &EniId, _: &[Ipv4Addr]) -> Result<()> {
        self.call(Operation::UnassignPrivateIpAddresses, eni.to_string())
    }
    async fn assign_prefixes(
        &self,
        eni: &EniId,
        _: &AddressRequest<Ipv4Net>,
    ) -> Result<Vec<Ipv4Net>> {
        self.call(Operation::AssignPrivateIpAddresses, eni.to_string())
            .map(|()| vec![])
    }
    async fn unassign_prefixes(&self, eni: &EniId, _: &[Ipv4Net]) -> Result<()> {
        self.call(Operation::UnassignPrivateIpAddresses, eni.to_string())
    }
    async fn set_source_dest_check(&self, eni: &EniId, _: bool) -> Result<()> {
        self.call(Operation::ModifyNetworkInterfaceAttribute, eni.to_string())
    }
    async fn create_tags(&self, r: &[String], _: &Tags) -> Result<()> {
        self.call(Operation::CreateTags, r.join(","))
    }
}

fn dest(i: u32) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::from(0x6440_0000 + (i << 8)), 24).unwrap()
}

fn eni_target() -> RouteTarget {
    RouteTarget::NetworkInterface(EniId::new("eni-fwd"))
}

/// A 300-call burst mixing every mutating bucket and describes, all issued at once.
async fn burst(cloud: Arc<dyn Cloud>) -> Vec<Result<()>> {
    let mut tasks = Vec::new();
    for i in 0..300u32 {
        let c = Arc::clone(&cloud);
        tasks.push(tokio::spawn(async move {
            let rtb = RouteTableId::new("rtb-1");
            let eni = EniId::new(format!("eni-{i}"));
            match i % 6 {
                0 | 1 => c.create_route(&rtb, dest(i), &eni_target()).await,
                2 => c
                    .assign_private_ips(&eni, &AddressRequest::Count(1))
                    .await
                    .map(drop),
                3 => c.set_source_dest_check(&eni, false).await,
                4 => c
                    .create_tags(&[eni.to_string()], &Tags::new())
                    .await
                    .map(drop),
                _ => c
                    .describe_network_interfaces(&EniFilter {
                        ids: vec![eni],
                        ..EniFilter::default()
                    })
                    .await
                    .map(drop),
            }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_300_call_burst_through_the_queue_is_never_throttled() {
    let stub = ThrottlingStub::new();
    let queue = RateLimitedCloud::new(
        stub.clone(),
        QueueConfig {
            retry: RetryPolicy::none(),
            ..QueueConfig::default()
        },
    );
    let started = Instant::now();
    let results = burst(Arc::new(queue.clone())).await;

    assert_eq!(stub.throttled(), 0, "the queue let a call exceed a bucket");
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(stub.calls(), 300);
    // 100 CreateRoutes at 80% of a 50 burst / 5 per s bucket: 40 at once, then 60 at 4 per s.
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(14) && elapsed <= Duration::from_secs(16),
        "virtual time {elapsed:?}"
    );
    let stats = queue.stats();
    assert_eq!(stats.granted, 300);
    assert_eq!(stats.total_depth(), 0);
    assert!(stats.max_wait >= Duration::from_secs(14));
}

#[tokio::test(start_paused = true)]
async fn without_the_queue_the_same_burst_is_throttled() {
    // The check above can fail: the stub does throttle a burst that nothing paces.
    let stub = ThrottlingStub::new();
    let results = burst(Arc::new(stub.clone())).await;
    assert!(stub.throttled() >= 50, "throttled {}", stub.throttled());
    assert_eq!(
        results.iter().filter(|r| r.is_err()).count(),
        stub.throttled()
    );
}

#[tokio::test(start_paused = true)]
async fn a_full_share_queue_uses_the_whole_bucket_and_still_is_not_throttled() {
    let stub = ThrottlingStub::new();
    let queue = RateLimitedCloud::new(
        stub.clone(),
        QueueConfig {
            share: 1.0,
            retry: RetryPolicy::none(),
            ..QueueConfig::default()
        },
    );
    let rtb = RouteTableId::new("rtb-1");
    for i in 0..60 {
        queue
            .create_route(&rtb, dest(i), &eni_target())
            .await
            .unwrap();
    }
    assert_eq!(stub.throttled(), 0);
    let log = stub.log.lock().unwrap();
    let t0 = log[0].2;
    // 50 at once (the burst), then one per 200 ms.
    assert!(log[..50].iter().all(|e| e.2 == t0));
    assert_eq!(log[59].2 - t0, Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn failover_route_changes_jump_ahead_of_queued_bulk_work() {
    let stub = ThrottlingStub::new();
    let queue = RateLimitedCloud::new(
        stub.clone(),
        QueueConfig {
            share: 1.0,
            retry: RetryPolicy::none(),
            ..QueueConfig::default()
        },
    );
    let rtb = RouteTableId::new("rtb-1");
    // Drain ReplaceRoute's bucket with planned retargets, then queue 40 more of them.
    for i in 0..50 {
        queue
            .replace_route(&rtb, dest(i), &eni_target())
            .await
            .unwrap();
    }
    let mut bulk = Vec::new();
    for i in 50..90 {
        let q = queue.clone();
        let rtb = rtb.clone();
        bulk.push(tokio::spawn(async move {
            q.replace_route(&rtb, dest(i), &eni_target()).await
        }));
    }
    // Let the bulk callers enter the queue.
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(queue.stats().total_depth(), 40);

    let failover = queue.with_priority(Priority::Failover);
    assert_eq!(failover.priority(), Priority::Failover);
    failover
        .replace_route(&rtb, dest(7), &eni_target())
        .await
        .unwrap();
    for t in bulk {
        t.await.unwrap().unwrap();
    }

    let log = stub.log.lock().unwrap();
    // The bucket was empty: the failover call took the very next token, ahead of all 40 queued calls.
    assert_eq!(log[50].3, dest(7).to_string(), "call 50 was {:?}", log[50]);
    assert!(
        log[51..]
            .iter()
            .all(|e| e.0 == Operation::ReplaceRoute && e.3 != dest(7).to_string())
    );
    drop(log);
    assert_eq!(stub.throttled(), 0);
}

#[tokio::test(start_paused = true)]
async fn route_actions_do_not_wait_for_each_other() {
    let stub = ThrottlingStub::new();
    let queue = RateLimitedCloud::new(
        stub.clone(),
        QueueConfig {
            share: 1.0,
            retry: RetryPolicy::none(),
            ..QueueConfig::default()
        },
    );
    let rtb = RouteTableId::new("rtb-1");
    // 200 route creations at once: 50 at once, then 5 per second for 30 s.
    let mut bulk = Vec::new();
    for i in 0..200 {
        let q = queue.clone();
        let rtb = rtb.clone();
        bulk.push(tokio::spawn(async move {
            q.create_route(&rtb, dest(i), &eni_target()).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(queue.stats().total_depth(), 150);
    // A deletion and a (normal-lane) retarget behind that backlog are served at once: own buckets.
    let t0 = Instant::now();
    queue.delete_route(&rtb, dest(300)).await.unwrap();
    queue
        .replace_route(&rtb, dest(301), &eni_target())
        .await
        .unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(10),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        queue
            .outlook(Bucket::Action(Operation::CreateRoute))
            .waiting
            > 100
    );
    for t in bulk {
        t.await.unwrap().unwrap();
    }
    assert_eq!(stub.throttled(), 0);
}

#[tokio::test(start_paused = true)]
async fn callers_of_one_bucket_are_served_in_arrival_order() {
    let stub = ThrottlingStub::new();
    let queue = RateLimitedCloud::new(
        stub.clone(),
        QueueConfig {
            share: 0.1, // 5 burst, 0.5 per s
            retry: RetryPolicy::none(),
            ..QueueConfig::default()
        },
    );
    let mut tasks = Vec::new();
    for i in 0..20u32 {
        let q = queue.clone();
        tasks.push(tokio::spawn(async move {
            q.delete_route(&RouteTableId::new("rtb-1"), dest(i)).await
        }));
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let order: Vec<String> = stub
        .log
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.3.clone())
        .collect();
    let want: Vec<String> = (0..20).map(|i| dest(i).to_string()).collect();
    assert_eq!(order, want);
}

#[tokio::test(start_paused = true)]
async fn transient_errors_are_retried_with_backoff_and_others_are_not() {
    let stub = ThrottlingStub::new();
    let queue = RateLimitedCloud::new(stub.clone(), QueueConfig::default());
    let rtb = RouteTableId::new("rtb-1");

    stub.script.lock().unwrap().extend([
        CloudError::from_code("RequestLimitExceeded", "slow down"),
        CloudError::from_code("InternalError", "oops"),
        CloudError::new(ErrorKind::Transport, "Timeout", "no answer"),
    ]);
    let t0 = Instant::now();
    queue
        .replace_route(&rtb, dest(1), &eni_target())
        .await
        .unwrap();
    assert_eq!(stub.calls(), 4);
    let retries = queue.stats().retries;
    assert_eq!(retries.get("throttled"), Some(&1));
    assert_eq!(retries.get("service"), Some(&1));
    assert_eq!(retries.get("transport"), Some(&1));
    // Backoffs are at most 100 + 200 + 400 ms (full jitter below each ceiling).
    assert!(t0.elapsed() <= Duration::from_millis(700));

    // A limit is not transient: one call, the error comes back.
    stub.script
        .lock()
        .unwrap()
        .push_back(CloudError::from_code("RouteLimitExceeded", "full"));
    let err = queue
        .create_route(&rtb, dest(2), &eni_target())
        .await
        .unwrap_err();
    assert!(err.is_limit_exceeded());
    assert_eq!(stub.calls(), 5);

    // A counted assign is not repeated after a 5xx (it could assign twice), but is after throttling.
    stub.script
        .lock()
        .unwrap()
        .push_back(CloudError::from_code("InternalError", "oops"));
    let eni = EniId::new("eni-1");
    assert!(
        queue
            .assign_private_ips(&eni, &AddressRequest::Count(2))
            .await
            .is_err()
    );
    assert_eq!(stub.calls(), 6);
    stub.script
        .lock()
        .unwrap()
        .push_back(CloudError::from_code("RequestLimitExceeded", "slow down"));
    queue
        .assign_private_ips(&eni, &AddressRequest::Count(2))
        .await
        .unwrap();
    assert_eq!(stub.calls(), 8);
}

#[tokio::test(start_paused = true)]
async fn retries_stop_at_the_deadline() {
    let stub = ThrottlingStub::new();
    let policy = RetryPolicy {
        base: Duration::from_secs(1),
        max_backoff: Duration::from_secs(4),
        deadline: Duration::from_secs(10),
        max_attempts: 1000,
    };
    let queue = RateLimitedCloud::new(
        stub.clone(),
        QueueConfig {
            retry: policy,
            ..QueueConfig::default()
        },
    );
    stub.script.lock().unwrap().extend(
        std::iter::repeat_with(|| CloudError::from_code("Unavailable", "down")).take(10_000),
    );
    let t0 = Instant::now();
    let err = queue.describe_vpc(&VpcId::new("vpc-1")).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Service);
    let log = stub.log.lock().unwrap();
    assert!(log.len() >= 3, "only {} attempts", log.len());
    assert!(log.iter().all(|e| e.2 - t0 <= Duration::from_secs(10)));
    assert!(t0.elapsed() <= Duration::from_secs(10));
}

#[test]
fn backoff_is_jittered_below_an_exponential_ceiling() {
    use rand::SeedableRng;
    let policy = RetryPolicy {
        base: Duration::from_millis(100),
        max_backoff: Duration::from_secs(2),
        ..RetryPolicy::default()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for retry in 1..12u32 {
        let ceiling =
            (Duration::from_millis(100) * 2u32.pow(retry - 1)).min(Duration::from_secs(2));
        let samples: Vec<Duration> = (0..200).map(|_| policy.backoff(retry, &mut rng)).collect();
        assert!(samples.iter().all(|d| *d <= ceiling));
        // Jitter: the samples spread over the range rather than sitting on one value.
        let distinct: std::collections::BTreeSet<_> = samples.iter().collect();
        assert!(distinct.len() > 100);
    }
}
