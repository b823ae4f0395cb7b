//! [`VpcSim`]: the simulated region, its "world" side (set-up operations no EC2 caller in underlay makes) and
//! the admission path every [`Cloud`] call goes through (latency, throttling, injected errors, counters).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::Ipv4Net;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::time::Instant;
use underlay_cloud::{
    Attachment, AttachmentId, BucketSet, CloudError, EniId, EniStatus, Instance, InstanceId,
    InstanceState, InstanceTypeInfo, NetworkInterface, Operation, RateLimits, Result, RouteTable,
    RouteTableId, RouteTarget, SecurityGroupId, Subnet, SubnetId, Tags, Vpc, VpcId,
};
use underlay_core::instance_types::{self, InstanceTypeLimits};

use crate::counters::Counters;
use crate::events::{Change, Event};
use crate::faults::Faults;
use crate::state::{
    AddressOrder, InstanceRecord, RouteTableState, SecurityGroupRecord, State, SubnetState,
    VpcState, err,
};

/// AWS's default quota of routes per route table (`local` routes not counted): 500 non-propagated routes,
/// adjustable to 1,000 (see docs/aws.md). The lab sets small limits of its own so aggregation shows.
pub const DEFAULT_ROUTE_LIMIT: usize = underlay_core::owned::DEFAULT_ROUTE_LIMIT;
/// AWS's default quota of network interfaces per Region (5,000), which EC2 enforces per Availability Zone.
pub const DEFAULT_ENIS_PER_ZONE: usize = 5_000;
/// Tags per resource.
pub const TAG_LIMIT: usize = 50;
const EVENT_BUFFER: usize = 65_536;

/// How a [`VpcSim`] is built. Everything here survives [`VpcSim::reset`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Drives ids, MACs, address choice (one generator) and fault draws (another).
    pub seed: u64,
    /// Token buckets; `None` admits every call.
    pub rate_limits: Option<RateLimits>,
    /// Route limit of every new route table.
    pub route_limit: usize,
    /// Network interfaces per zone (primary ENIs of instances included); CreateNetworkInterface past it answers
    /// `NetworkInterfaceLimitExceeded`.
    #[serde(default = "default_enis_per_zone")]
    pub enis_per_zone: usize,
    /// `MaxResults` of the port's paginated describes (clamped to what EC2 accepts per action: 5–100 route
    /// tables, 5–1,000 otherwise), as the aws-sdk adapter's page size; small values make readers follow pages.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    pub address_order: AddressOrder,
    pub faults: Faults,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            seed: 0,
            rate_limits: Some(RateLimits::aws_default()),
            route_limit: DEFAULT_ROUTE_LIMIT,
            enis_per_zone: DEFAULT_ENIS_PER_ZONE,
            page_size: DEFAULT_PAGE_SIZE,
            address_order: AddressOrder::Random,
            faults: Faults::default(),
        }
    }
}

/// Default `MaxResults` of the port's describes (the aws-sdk adapter's default page size).
pub const DEFAULT_PAGE_SIZE: u32 = 1_000;

fn default_page_size() -> u32 {
    DEFAULT_PAGE_SIZE
}

fn default_enis_per_zone() -> usize {
    DEFAULT_ENIS_PER_ZONE
}

/// Builder of a [`VpcSim`]: `VpcSim::builder(seed).route_limit(100).rate_limits(None).build()`.
#[derive(Debug, Clone, Default)]
pub struct VpcSimBuilder {
    config: Config,
}

impl VpcSimBuilder {
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = seed;
        self
    }
    /// `None` turns throttling off.
    pub fn rate_limits(mut self, limits: Option<RateLimits>) -> Self {
        self.config.rate_limits = limits;
        self
    }
    pub fn route_limit(mut self, limit: usize) -> Self {
        self.config.route_limit = limit;
        self
    }
    /// `MaxResults` of the port's paginated describes (default 1,000; see [`Config::page_size`]).
    pub fn page_size(mut self, size: u32) -> Self {
        self.config.page_size = size;
        self
    }
    /// Network interfaces per zone (default 5,000, AWS's per-Region quota, enforced per zone).
    pub fn enis_per_zone(mut self, quota: usize) -> Self {
        self.config.enis_per_zone = quota;
        self
    }
    pub fn address_order(mut self, order: AddressOrder) -> Self {
        self.config.address_order = order;
        self
    }
    pub fn faults(mut self, faults: Faults) -> Self {
        self.config.faults = faults;
        self
    }
    pub fn build(self) -> VpcSim {
        VpcSim::new(self.config)
    }
}

/// Everything the lab needs to rebuild its fabric: the current (never delayed) state, and the number of the
/// last [`Change`] it includes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub seq: u64,
    pub vpcs: Vec<Vpc>,
    pub subnets: Vec<Subnet>,
    pub route_tables: Vec<RouteTable>,
    /// Terminated instances included.
    pub instances: Vec<Instance>,
    pub enis: Vec<NetworkInterface>,
}

/// What [`VpcSim::run_instance`] launches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInstance {
    pub instance_type: String,
    pub subnet: SubnetId,
    /// Empty: the VPC's default security group.
    pub security_groups: Vec<SecurityGroupId>,
    /// The primary address; `None` lets the simulator choose.
    pub private_ip: Option<Ipv4Addr>,
    pub tags: Tags,
}

impl RunInstance {
    pub fn new(instance_type: impl Into<String>, subnet: &SubnetId) -> Self {
        Self {
            instance_type: instance_type.into(),
            subnet: subnet.clone(),
            security_groups: Vec::new(),
            private_ip: None,
            tags: Tags::new(),
        }
    }
}

pub(crate) struct World {
    pub config: Config,
    pub state: State,
    rng: StdRng,
    fault_rng: StdRng,
    ids: BTreeSet<String>,
    buckets: Option<BucketSet>,
    pub faults: Faults,
    pub counters: Counters,
    /// States after each change, oldest first, kept only while `faults.describe_delay` is non-zero.
    history: VecDeque<(Instant, Arc<State>)>,
    /// ENIs created with a client token: the token's request and the ENI it made.
    pub tokens: BTreeMap<String, (underlay_cloud::CreateEniRequest, NetworkInterface)>,
    seq: u64,
    events: broadcast::Sender<Change>,
}

impl World {
    fn new(config: Config, events: broadcast::Sender<Change>) -> Self {
        let mut w = Self {
            rng: StdRng::seed_from_u64(config.seed),
            fault_rng: StdRng::seed_from_u64(config.seed ^ 0x5eed_fa17_0000_0001),
            buckets: config.rate_limits.clone().map(BucketSet::new),
            faults: config.faults.clone(),
            config,
            state: State::default(),
            ids: BTreeSet::new(),
            counters: Counters::default(),
            history: VecDeque::new(),
            tokens: BTreeMap::new(),
            seq: 0,
            events,
        };
        // With a describe delay, describes start from the empty region.
        w.committed(Instant::now());
        w
    }

    /// A fresh AWS-style id: `prefix-` and 17 lower-case hex digits.
    pub fn new_id(&mut self, prefix: &str) -> String {
        loop {
            let n: u128 = self.rng.random();
            let id = format!("{prefix}-{:017x}", n & ((1u128 << 68) - 1));
            if self.ids.insert(id.clone()) {
                return id;
            }
        }
    }

    /// A locally administered unicast MAC, lower-case, as EC2 reports ENI MACs.
    pub fn new_mac(&mut self) -> String {
        loop {
            let mut b: [u8; 6] = self.rng.random();
            b[0] = (b[0] & 0xfc) | 0x02;
            let mac = b
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            if self.ids.insert(mac.clone()) {
                return mac;
            }
        }
    }

    pub fn emit(&mut self, event: Event) {
        self.seq += 1;
        let at = Instant::now();
        // Only route changes take the modelled propagation: the lab's fabric applies them that much later.
        let propagation = match event {
            Event::RouteChanged { .. } => self.faults.route_propagation.draw(&mut self.fault_rng),
            _ => std::time::Duration::ZERO,
        };
        // No subscriber is fine: the lab may not be listening.
        let _ = self.events.send(Change {
            seq: self.seq,
            event,
            at: Some(at),
            effective_at: Some(at + propagation),
        });
    }

    /// Record the state after a change, for delayed describes.
    pub fn committed(&mut self, now: Instant) {
        let delay = self.faults.describe_delay;
        if delay.is_zero() {
            self.history.clear();
            return;
        }
        self.history.push_back((now, Arc::new(self.state.clone())));
        // Keep the newest entry at or before the cutoff (what describes see now) and everything after it.
        if let Some(cutoff) = now.checked_sub(delay) {
            while self.history.len() > 1 && self.history[1].0 <= cutoff {
                self.history.pop_front();
            }
        }
    }

    /// Run a read on what a describe at `now` sees: the live state, or with `describe_delay` the state as it
    /// was that long ago.
    pub fn read<T>(&self, now: Instant, f: impl FnOnce(&State) -> T) -> T {
        let delay = self.faults.describe_delay;
        if !delay.is_zero()
            && let Some(cutoff) = now.checked_sub(delay)
        {
            let seen = self
                .history
                .iter()
                .rev()
                .find(|(t, _)| *t <= cutoff)
                .or(self.history.front());
            if let Some((_, s)) = seen {
                return f(s);
            }
        }
        f(&self.state)
    }

    fn record_error(&mut self, op: Operation, e: &CloudError) {
        *self
            .counters
            .errors
            .entry(op)
            .or_default()
            .entry(e.kind)
            .or_default() += 1;
        if e.is_throttled() {
            *self.counters.throttled.entry(op).or_default() += 1;
        }
    }

    /// Admission: scripted failures, forced throttling, token buckets, injected error rates.
    fn admit(&mut self, op: Operation, unfiltered: bool, now: Instant) -> Result<()> {
        if let Some(code) = self
            .faults
            .fail_next
            .get_mut(&op)
            .and_then(VecDeque::pop_front)
        {
            return Err(err(&code, format!("injected failure of {op}")));
        }
        if self.faults.throttle_all || self.faults.throttled.contains(&op) {
            return Err(err("RequestLimitExceeded", "Request limit exceeded."));
        }
        if let Some(b) = self.buckets.as_mut()
            && b.try_take(op, unfiltered, now.into_std()).is_err()
        {
            return Err(err("RequestLimitExceeded", "Request limit exceeded."));
        }
        if let Some(rate) = self.faults.error_rates.get(&op)
            && rate.probability > 0.0
            && self.fault_rng.random_bool(rate.probability.min(1.0))
        {
            return Err(err(&rate.code, format!("injected {} on {op}", rate.code)));
        }
        Ok(())
    }

    pub fn route_limit(&self) -> usize {
        self.config.route_limit
    }

    /// A further token a call takes besides its own action's (CreateNetworkInterface with addresses, when the
    /// limits say creation draws on AssignPrivateIpAddresses' bucket).
    pub fn take_token(&mut self, op: Operation, now: Instant) -> Result<()> {
        if let Some(b) = self.buckets.as_mut()
            && b.try_take(op, false, now.into_std()).is_err()
        {
            // Counted as the calling action's throttle by the caller.
            return Err(err("RequestLimitExceeded", "Request limit exceeded."));
        }
        Ok(())
    }

    /// Whether CreateNetworkInterface with addresses also takes an AssignPrivateIpAddresses token.
    pub fn creation_draws_assign(&self) -> bool {
        self.buckets
            .as_ref()
            .is_some_and(|b| b.limits().creation_draws_assign)
    }
}

/// The simulated region. Cheap to clone (a handle); all clones share one region.
#[derive(Clone)]
pub struct VpcSim {
    world: Arc<Mutex<World>>,
    events: broadcast::Sender<Change>,
}

impl std::fmt::Debug for VpcSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = self.lock();
        f.debug_struct("VpcSim")
            .field("seed", &w.config.seed)
            .field("vpcs", &w.state.vpcs.len())
            .field("instances", &w.state.instances.len())
            .field("enis", &w.state.enis.len())
            .field("seq", &w.seq)
            .finish()
    }
}

impl Default for VpcSim {
    fn default() -> Self {
        Self::new(Config::default())
    }
}

impl VpcSim {
    pub fn builder(seed: u64) -> VpcSimBuilder {
        VpcSimBuilder::default().seed(seed)
    }

    pub fn new(config: Config) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Self {
            world: Arc::new(Mutex::new(World::new(config, events.clone()))),
            events,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, World> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The common path of every [`underlay_cloud::Cloud`] call: count, sleep the latency, admit, run `f`.
    pub(crate) async fn call<T>(
        &self,
        op: Operation,
        unfiltered: bool,
        f: impl FnOnce(&mut World, Instant) -> Result<T>,
    ) -> Result<T> {
        let latency = {
            let mut w = self.lock();
            *w.counters.calls.entry(op).or_default() += 1;
            let l = w.faults.latency_of(op);
            l.draw(&mut w.fault_rng)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut w = self.lock();
        let now = Instant::now();
        let out = w.admit(op, unfiltered, now).and_then(|()| f(&mut w, now));
        match &out {
            Err(e) => w.record_error(op, e),
            Ok(_) if !op.is_describe() => w.committed(now),
            Ok(_) => {}
        }
        out
    }

    // ---- observation ---------------------------------------------------------------------------------

    /// Subscribe to changes from now on. The channel holds 65,536 changes; a subscriber that falls further
    /// behind gets `Lagged` and should resynchronise from [`VpcSim::snapshot`].
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.events.subscribe()
    }

    /// The current state (never delayed), terminated instances included.
    pub fn snapshot(&self) -> Snapshot {
        let w = self.lock();
        let s = &w.state;
        Snapshot {
            seq: w.seq,
            vpcs: s
                .vpcs
                .keys()
                .filter_map(|v| s.describe_vpc(v).ok())
                .collect(),
            subnets: s.subnets.values().map(SubnetState::view).collect(),
            route_tables: s
                .route_tables
                .values()
                .map(|t| s.route_table_view(t))
                .collect(),
            instances: s.instances.values().map(|i| s.instance_view(i)).collect(),
            enis: s.enis.values().cloned().collect(),
        }
    }

    pub fn counters(&self) -> Counters {
        self.lock().counters.clone()
    }

    pub fn reset_counters(&self) {
        self.lock().counters = Counters::default();
    }

    pub fn config(&self) -> Config {
        self.lock().config.clone()
    }

    // ---- fault knobs ---------------------------------------------------------------------------------

    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        let mut w = self.lock();
        w.faults = faults;
        let now = Instant::now();
        w.history.clear();
        w.committed(now);
    }

    /// Change the fault knobs in place: `sim.update_faults(|f| f.throttle_all = true)`.
    pub fn update_faults(&self, change: impl FnOnce(&mut Faults)) {
        let mut f = self.faults();
        change(&mut f);
        self.set_faults(f);
    }

    /// The next call of `op` answers `code` (queued after earlier scripted failures).
    pub fn fail_next(&self, op: Operation, code: &str) {
        self.lock()
            .faults
            .fail_next
            .entry(op)
            .or_default()
            .push_back(code.to_owned());
    }

    /// Replace the token buckets (full again); `None` turns throttling off.
    pub fn set_rate_limits(&self, limits: Option<RateLimits>) {
        let mut w = self.lock();
        w.buckets = limits.clone().map(BucketSet::new);
        w.config.rate_limits = limits;
    }

    /// Forget the whole region and every counter, and start again from the configured seed and faults.
    /// Subscribers stay subscribed; numbering of changes restarts at 1.
    pub fn reset(&self) {
        let mut w = self.lock();
        let config = w.config.clone();
        *w = World::new(config, self.events.clone());
    }

    // ---- the world side: set-up operations, not part of the Cloud port ----------------------------------
    //
    // None of these is counted or throttled: they stand for whoever built the account (Terraform, an
    // autoscaling group), not for underlay's controller.

    /// CreateVpc: the VPC with its main route table (holding the `local` route) and default security group.
    pub fn create_vpc(&self, cidr: Ipv4Net, tags: Tags) -> Result<VpcId> {
        if cidr.trunc() != cidr || !(16..=28).contains(&cidr.prefix_len()) {
            return Err(err(
                "InvalidVpc.Range",
                format!("The CIDR '{cidr}' is invalid."),
            ));
        }
        let mut w = self.lock();
        let vpc = VpcId::new(w.new_id("vpc"));
        let rtb = RouteTableId::new(w.new_id("rtb"));
        let sg = SecurityGroupId::new(w.new_id("sg"));
        let limit = w.route_limit();
        w.state.vpcs.insert(
            vpc.clone(),
            VpcState {
                id: vpc.clone(),
                cidrs: vec![cidr],
                tags,
                main_route_table: rtb.clone(),
                default_security_group: sg.clone(),
            },
        );
        w.state.security_groups.insert(
            sg,
            SecurityGroupRecord {
                vpc: vpc.clone(),
                tags: Tags::new(),
            },
        );
        w.state.route_tables.insert(
            rtb.clone(),
            RouteTableState {
                id: rtb.clone(),
                vpc: vpc.clone(),
                main: true,
                subnets: Vec::new(),
                routes: BTreeMap::from([(cidr, RouteTarget::Local)]),
                tags: Tags::new(),
                limit,
            },
        );
        w.emit(Event::VpcCreated {
            vpc: vpc.clone(),
            cidr,
        });
        w.emit(Event::RouteTableCreated {
            table: rtb,
            vpc: vpc.clone(),
            main: true,
        });
        w.committed(Instant::now());
        Ok(vpc)
    }

    pub fn main_route_table(&self, vpc: &VpcId) -> Result<RouteTableId> {
        Ok(self.lock().state.vpc(vpc)?.main_route_table.clone())
    }

    pub fn default_security_group(&self, vpc: &VpcId) -> Result<SecurityGroupId> {
        Ok(self.lock().state.vpc(vpc)?.default_security_group.clone())
    }

    /// CreateSubnet: /16 to /28, inside one of the VPC's CIDRs, overlapping no other subnet.
    pub fn create_subnet(&self, vpc: &VpcId, zone: &str, cidr: Ipv4Net) -> Result<SubnetId> {
        let mut w = self.lock();
        let v = w.state.vpc(vpc)?;
        let inside = v.cidrs.iter().any(|c| c.contains(&cidr));
        if cidr.trunc() != cidr || !(16..=28).contains(&cidr.prefix_len()) || !inside {
            return Err(err(
                "InvalidSubnet.Range",
                format!("The CIDR '{cidr}' is invalid."),
            ));
        }
        if let Some(other) = w
            .state
            .subnets
            .values()
            .find(|s| s.cidr.contains(&cidr) || cidr.contains(&s.cidr))
        {
            return Err(err(
                "InvalidSubnet.Conflict",
                format!(
                    "The CIDR '{cidr}' conflicts with another subnet ({})",
                    other.id
                ),
            ));
        }
        let id = SubnetId::new(w.new_id("subnet"));
        w.state.subnets.insert(
            id.clone(),
            SubnetState::new(id.clone(), vpc.clone(), zone.to_owned(), cidr),
        );
        w.emit(Event::SubnetCreated {
            subnet: id.clone(),
            vpc: vpc.clone(),
            zone: zone.to_owned(),
            cidr,
        });
        w.committed(Instant::now());
        Ok(id)
    }

    /// CreateRouteTable: a non-main table holding the VPC's `local` routes.
    pub fn create_route_table(&self, vpc: &VpcId, tags: Tags) -> Result<RouteTableId> {
        let mut w = self.lock();
        let cidrs = w.state.vpc(vpc)?.cidrs.clone();
        let id = RouteTableId::new(w.new_id("rtb"));
        let limit = w.route_limit();
        w.state.route_tables.insert(
            id.clone(),
            RouteTableState {
                id: id.clone(),
                vpc: vpc.clone(),
                main: false,
                subnets: Vec::new(),
                routes: cidrs.into_iter().map(|c| (c, RouteTarget::Local)).collect(),
                tags,
                limit,
            },
        );
        w.emit(Event::RouteTableCreated {
            table: id.clone(),
            vpc: vpc.clone(),
            main: false,
        });
        w.committed(Instant::now());
        Ok(id)
    }

    /// AssociateRouteTable (or ReplaceRouteTableAssociation when the subnet already has an explicit table).
    pub fn associate_route_table(&self, table: &RouteTableId, subnet: &SubnetId) -> Result<()> {
        let mut w = self.lock();
        let s_vpc = w.state.subnet(subnet)?.vpc.clone();
        if w.state.route_table(table)?.vpc != s_vpc {
            return Err(err(
                "InvalidParameterValue",
                format!("route table {table} and subnet {subnet} belong to different networks"),
            ));
        }
        for t in w.state.route_tables.values_mut() {
            t.subnets.retain(|s| s != subnet);
        }
        w.state.route_table_mut(table)?.subnets.push(subnet.clone());
        w.emit(Event::RouteTableAssociated {
            table: table.clone(),
            subnet: subnet.clone(),
        });
        w.committed(Instant::now());
        Ok(())
    }

    /// The route table a subnet uses: its explicit association, or the VPC's main table.
    pub fn route_table_of(&self, subnet: &SubnetId) -> Result<RouteTableId> {
        let w = self.lock();
        let vpc = w.state.subnet(subnet)?.vpc.clone();
        if let Some(t) = w
            .state
            .route_tables
            .values()
            .find(|t| t.subnets.contains(subnet))
        {
            return Ok(t.id.clone());
        }
        Ok(w.state.vpc(&vpc)?.main_route_table.clone())
    }

    /// Set one table's route limit (AWS: a quota increase; 1,000 at most).
    pub fn set_route_limit(&self, table: &RouteTableId, limit: usize) -> Result<()> {
        self.lock().state.route_table_mut(table)?.limit = limit;
        Ok(())
    }

    /// CreateInternetGateway + AttachInternetGateway: a gateway id routes can target.
    pub fn create_internet_gateway(&self, vpc: &VpcId) -> Result<String> {
        let mut w = self.lock();
        w.state.vpc(vpc)?;
        let id = w.new_id("igw");
        w.state.gateways.insert(id.clone(), vpc.clone());
        w.committed(Instant::now());
        Ok(id)
    }

    /// CreateTransitGateway + CreateTransitGatewayVpcAttachment: a `tgw-…` id routes in this VPC can target.
    pub fn create_transit_gateway(&self, vpc: &VpcId) -> Result<String> {
        let mut w = self.lock();
        w.state.vpc(vpc)?;
        let id = w.new_id("tgw");
        w.state.gateways.insert(id.clone(), vpc.clone());
        w.committed(Instant::now());
        Ok(id)
    }

    /// AssociateVpcCidrBlock: a secondary CIDR; every route table of the VPC gets its `local` route, as in EC2
    /// (e.g. 100.64.0.0/16 for EKS custom networking).
    pub fn associate_vpc_cidr_block(&self, vpc: &VpcId, cidr: Ipv4Net) -> Result<()> {
        if cidr.trunc() != cidr || !(16..=28).contains(&cidr.prefix_len()) {
            return Err(err(
                "InvalidVpc.Range",
                format!("The CIDR '{cidr}' is invalid."),
            ));
        }
        let mut w = self.lock();
        let cidrs = &w.state.vpc(vpc)?.cidrs;
        if let Some(c) = cidrs
            .iter()
            .find(|c| c.contains(&cidr.network()) || cidr.contains(&c.network()))
        {
            return Err(err(
                "InvalidVpc.Range",
                format!("The CIDR '{cidr}' conflicts with another CIDR block {c} of the VPC."),
            ));
        }
        w.state
            .vpcs
            .get_mut(vpc)
            .expect("checked above")
            .cidrs
            .push(cidr);
        for t in w.state.route_tables.values_mut().filter(|t| &t.vpc == vpc) {
            t.routes.insert(cidr, RouteTarget::Local);
        }
        w.committed(Instant::now());
        Ok(())
    }

    /// A route made by someone else (e.g. `0.0.0.0/0 → igw-…`): no call counted or throttled, but the same
    /// validation and route limit as CreateRoute.
    pub fn add_route(
        &self,
        table: &RouteTableId,
        destination: Ipv4Net,
        target: &RouteTarget,
    ) -> Result<()> {
        let mut w = self.lock();
        w.put_route(table, destination, target)?;
        w.committed(Instant::now());
        Ok(())
    }

    /// CreateSecurityGroup.
    pub fn create_security_group(&self, vpc: &VpcId, tags: Tags) -> Result<SecurityGroupId> {
        let mut w = self.lock();
        w.state.vpc(vpc)?;
        let id = SecurityGroupId::new(w.new_id("sg"));
        w.state.security_groups.insert(
            id.clone(),
            SecurityGroupRecord {
                vpc: vpc.clone(),
                tags,
            },
        );
        w.committed(Instant::now());
        Ok(id)
    }

    /// RunInstances (one instance, already `running`): its primary ENI is created at device index 0 with
    /// DeleteOnTermination set, as EC2 does.
    pub fn run_instance(&self, spec: RunInstance) -> Result<Instance> {
        let limits = instance_type(&spec.instance_type)?;
        let mut w = self.lock();
        let subnet = w.state.subnet(&spec.subnet)?;
        let (vpc, zone) = (subnet.vpc.clone(), subnet.zone.clone());
        let groups = w.resolve_groups(&vpc, &spec.security_groups)?;
        let addr = w.take_primary(&spec.subnet, spec.private_ip)?;
        let id = InstanceId::new(w.new_id("i"));
        let eni = w.insert_eni(
            &spec.subnet,
            addr,
            groups,
            "Primary network interface".to_owned(),
            Tags::new(),
        );
        w.state.instances.insert(
            id.clone(),
            InstanceRecord {
                id: id.clone(),
                instance_type: limits.name.to_owned(),
                state: InstanceState::Running,
                vpc,
                subnet: spec.subnet.clone(),
                zone,
                private_ip: addr,
                tags: spec.tags,
                enis: BTreeMap::new(),
            },
        );
        w.attach(&eni, &id, 0, true);
        w.emit(Event::InstanceLaunched {
            instance: id.clone(),
            instance_type: limits.name.to_owned(),
            subnet: spec.subnet,
            private_ip: addr,
        });
        w.committed(Instant::now());
        let i = &w.state.instances[&id];
        Ok(w.state.instance_view(i))
    }

    /// TerminateInstances: ENIs with DeleteOnTermination are deleted with their addresses; the others are
    /// detached and left `available` (leaked, until someone deletes them). Routes to the instance or its
    /// ENIs turn `blackhole`.
    pub fn terminate_instance(&self, id: &InstanceId) -> Result<()> {
        let mut w = self.lock();
        let enis: Vec<(u32, EniId)> = w
            .state
            .instance(id)?
            .enis
            .iter()
            .map(|(d, e)| (*d, e.clone()))
            .collect();
        for (device_index, eni) in enis {
            let dot = w
                .state
                .enis
                .get(&eni)
                .and_then(|e| e.attachment.as_ref())
                .is_some_and(|a| a.delete_on_termination);
            w.detach(&eni);
            w.emit(Event::EniDetached {
                eni: eni.clone(),
                instance: id.clone(),
                device_index,
            });
            if dot {
                w.remove_eni(&eni);
            }
        }
        if let Some(i) = w.state.instances.get_mut(id) {
            i.state = InstanceState::Terminated;
        }
        w.emit(Event::InstanceTerminated {
            instance: id.clone(),
        });
        w.committed(Instant::now());
        Ok(())
    }
}

/// The instance-type table, in the port's terms.
pub fn instance_type(name: &str) -> Result<&'static InstanceTypeLimits> {
    instance_types::lookup(name).ok_or_else(|| {
        err(
            "InvalidInstanceType",
            format!("The instance type '{name}' does not exist"),
        )
    })
}

pub(crate) fn type_info(t: &InstanceTypeLimits) -> InstanceTypeInfo {
    InstanceTypeInfo {
        instance_type: t.name.to_owned(),
        vcpus: t.vcpus,
        max_enis: t.max_enis,
        ipv4_per_eni: t.ipv4_per_eni,
        prefix_delegation: t.nitro,
    }
}

// ---- mutations shared by the world side and the Cloud side ----------------------------------------------

impl World {
    pub fn resolve_groups(
        &self,
        vpc: &VpcId,
        groups: &[SecurityGroupId],
    ) -> Result<Vec<SecurityGroupId>> {
        if groups.is_empty() {
            return Ok(vec![self.state.vpc(vpc)?.default_security_group.clone()]);
        }
        for g in groups {
            match self.state.security_groups.get(g) {
                Some(r) if &r.vpc == vpc => {}
                Some(_) => {
                    return Err(err(
                        "InvalidParameterValue",
                        format!("Security group {g} and subnet belong to different networks."),
                    ));
                }
                None => {
                    return Err(err(
                        "InvalidGroup.NotFound",
                        format!("The security group '{g}' does not exist"),
                    ));
                }
            }
        }
        Ok(groups.to_vec())
    }

    /// Take a primary address: the given one, or one the simulator picks.
    pub fn take_primary(&mut self, subnet: &SubnetId, ip: Option<Ipv4Addr>) -> Result<Ipv4Addr> {
        self.with_subnet(subnet, |s, rng, order| match ip {
            Some(ip) => {
                s.check_free(ip)?;
                s.take(ip);
                Ok(ip)
            }
            None => Ok(s.take_any(1, rng, order)?[0]),
        })
    }

    /// Run `f` on a subnet with the id generator, for address choice.
    pub fn with_subnet<T>(
        &mut self,
        subnet: &SubnetId,
        f: impl FnOnce(&mut SubnetState, &mut StdRng, AddressOrder) -> Result<T>,
    ) -> Result<T> {
        let order = self.config.address_order;
        let s = self.state.subnets.get_mut(subnet).ok_or_else(|| {
            err(
                "InvalidSubnetID.NotFound",
                format!("The subnet ID '{subnet}' does not exist"),
            )
        })?;
        f(s, &mut self.rng, order)
    }

    /// Insert an `available` ENI owning `primary` (already taken from the subnet).
    pub fn insert_eni(
        &mut self,
        subnet: &SubnetId,
        primary: Ipv4Addr,
        groups: Vec<SecurityGroupId>,
        description: String,
        tags: Tags,
    ) -> EniId {
        let id = EniId::new(self.new_id("eni"));
        let mac = self.new_mac();
        let s = &self.state.subnets[subnet];
        let eni = NetworkInterface {
            id: id.clone(),
            vpc: s.vpc.clone(),
            subnet: subnet.clone(),
            zone: s.zone.clone(),
            mac: mac.clone(),
            primary_ip: primary,
            secondary_ips: Vec::new(),
            prefixes: Vec::new(),
            status: EniStatus::Available,
            attachment: None,
            source_dest_check: true,
            security_groups: groups,
            description,
            tags,
        };
        self.state.enis.insert(id.clone(), eni);
        self.emit(Event::EniCreated {
            eni: id.clone(),
            subnet: subnet.clone(),
            mac,
            primary_ip: primary,
        });
        id
    }

    /// Attach (caller validated). Returns the attachment id.
    pub fn attach(
        &mut self,
        eni: &EniId,
        instance: &InstanceId,
        device_index: u32,
        delete_on_termination: bool,
    ) -> AttachmentId {
        let att = AttachmentId::new(self.new_id("eni-attach"));
        let e = self.state.enis.get_mut(eni).expect("validated eni");
        e.status = EniStatus::InUse;
        e.attachment = Some(Attachment {
            id: att.clone(),
            instance: instance.clone(),
            device_index,
            delete_on_termination,
        });
        let (mac, subnet) = (e.mac.clone(), e.subnet.clone());
        self.state.attachments.insert(att.clone(), eni.clone());
        if let Some(i) = self.state.instances.get_mut(instance) {
            i.enis.insert(device_index, eni.clone());
        }
        self.emit(Event::EniAttached {
            eni: eni.clone(),
            attachment: att.clone(),
            instance: instance.clone(),
            device_index,
            mac,
            subnet,
        });
        att
    }

    /// Detach without validation or event (callers emit).
    pub fn detach(&mut self, eni: &EniId) {
        let Some(e) = self.state.enis.get_mut(eni) else {
            return;
        };
        if let Some(a) = e.attachment.take() {
            e.status = EniStatus::Available;
            self.state.attachments.remove(&a.id);
            if let Some(i) = self.state.instances.get_mut(&a.instance) {
                i.enis.remove(&a.device_index);
            }
        }
    }

    /// Delete an ENI and free its addresses.
    pub fn remove_eni(&mut self, eni: &EniId) {
        let Some(e) = self.state.enis.remove(eni) else {
            return;
        };
        if let Some(s) = self.state.subnets.get_mut(&e.subnet) {
            s.release(e.primary_ip);
            for ip in &e.secondary_ips {
                s.release(*ip);
            }
            for p in &e.prefixes {
                s.release_prefix(*p);
            }
        }
        self.emit(Event::EniDeleted { eni: eni.clone() });
    }
}
