//! The contract every [`Cloud`] implementation meets, as named async cases (feature `contract`).
//!
//! One suite, several backends: vpcsim runs it in-process; the aws-sdk-ec2 adapter runs it over HTTP against
//! moto server. A backend plugs in by implementing [`Fixture`] (set-up the port does not have: a VPC with
//! subnets, instances) and declaring its [`Capabilities`]; a case that needs a behaviour the backend lacks is
//! skipped with the reason, never silently passed.
//!
//! ```text
//!   run_all(&fixture) ─► for each Case: capabilities cover case.needs? ─no─► Skipped("needs …")
//!                                              │ yes
//!                                              ▼
//!                          fixture.reset() ─► (case.run)(&fixture) ─► Passed | Failed(message)
//! ```
//!
//! Cases are written to pass on AWS itself, so they avoid what moto 5.2 gets wrong: after an assign they
//! describe again instead of trusting the returned list, and they filter only by `vpc-id`, ids, instance,
//! status and tags (moto answers HTTP 500 to `route.instance-id` and `attachment.status`).

mod cases;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{
    Cloud, CloudError, ErrorKind, InstanceId, RouteTableId, RouteTarget, SecurityGroupId, SubnetId,
    VpcId,
};

pub use cases::cases;

/// Errors of fixture set-up (anything: an SDK error, an HTTP error, a `CloudError`).
pub type FixtureError = Box<dyn std::error::Error + Send + Sync>;
pub type FixtureResult<T> = std::result::Result<T, FixtureError>;

/// One subnet of a [`WorldSpec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetSpec {
    pub zone: String,
    pub cidr: Ipv4Net,
}

/// The account a case starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorldSpec {
    pub vpc_cidr: Ipv4Net,
    pub subnets: Vec<SubnetSpec>,
    /// Route limit of the world's route table, for backends with [`Capability::RouteLimit`] (others ignore it).
    pub route_limit: Option<u32>,
}

impl WorldSpec {
    /// The world every case uses unless it says otherwise: VPC 198.18.0.0/16; two /24 subnets in zones a and b;
    /// a /26 (few aligned /28 blocks, for fragmentation) and a /28 (11 usable addresses) in zone a.
    pub fn standard() -> Self {
        let s = |zone: &str, cidr: &str| SubnetSpec {
            zone: zone.to_owned(),
            cidr: cidr.parse().expect("valid literal"),
        };
        Self {
            vpc_cidr: "198.18.0.0/16".parse().expect("valid literal"),
            subnets: vec![
                s(ZONE_A, "198.18.0.0/24"),
                s(ZONE_B, "198.18.1.0/24"),
                s(ZONE_A, "198.18.2.0/26"),
                s(ZONE_A, "198.18.3.0/28"),
            ],
            route_limit: None,
        }
    }
}

/// Zones of [`WorldSpec::standard`] (moto's default region is us-east-1).
pub const ZONE_A: &str = "us-east-1a";
pub const ZONE_B: &str = "us-east-1b";

/// What [`Fixture::create_world`] made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct World {
    pub vpc: VpcId,
    /// In the order of [`WorldSpec::subnets`].
    pub subnets: Vec<SubnetId>,
    /// A non-main route table associated with every subnet, holding `local` and `0.0.0.0/0 → gateway`.
    pub route_table: RouteTableId,
    /// The internet gateway of the default route.
    pub gateway: String,
    /// A security group of the VPC (other than the default one).
    pub security_group: SecurityGroupId,
}

/// Set-up a backend provides for the suite: the "world" operations the [`Cloud`] port does not have.
///
/// Implementations: vpcsim's (in-process), and the aws adapter's against moto server (RunInstances,
/// CreateVpc, … over HTTP; `reset` is `POST /moto-api/reset`).
#[async_trait::async_trait]
pub trait Fixture: Send + Sync {
    /// Backend name for reports, e.g. `vpcsim` or `aws-sdk-ec2 → moto 5.2.5`.
    fn name(&self) -> String;
    /// The port under test.
    fn cloud(&self) -> &dyn Cloud;
    /// What the backend enforces; cases needing more are skipped.
    fn capabilities(&self) -> Capabilities;
    /// Forget every resource (and, where modelled, refill the token buckets). Called before each case.
    async fn reset(&self) -> FixtureResult<()>;
    /// Create the VPC, its subnets, a security group, an internet gateway and a route table associated with
    /// every subnet that routes `0.0.0.0/0` to the gateway.
    async fn create_world(&self, spec: &WorldSpec) -> FixtureResult<World>;
    /// Launch one running instance of `instance_type` in `subnet` (its primary ENI at device index 0, with
    /// DeleteOnTermination, as RunInstances does).
    async fn run_instance(
        &self,
        subnet: &SubnetId,
        instance_type: &str,
    ) -> FixtureResult<InstanceId>;
    /// Terminate an instance (and wait until EC2 reports it terminated).
    async fn terminate_instance(&self, instance: &InstanceId) -> FixtureResult<()>;
    /// Add many routes to `table` as another tool would (by default CreateRoute through the port, one by one;
    /// a backend that throttles may add them on its world side instead).
    async fn add_routes(
        &self,
        table: &RouteTableId,
        destinations: &[Ipv4Net],
        target: &RouteTarget,
    ) -> FixtureResult<()> {
        for d in destinations {
            self.cloud().create_route(table, *d, target).await?;
        }
        Ok(())
    }
}

/// A behaviour of real EC2 that some backends do not reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// `RouteLimitExceeded` at the table's route limit.
    RouteLimit,
    /// Per-type ENI count and device-index limits (`AttachmentLimitExceeded`) and IPv4-per-ENI limits
    /// (`PrivateIpAddressLimitExceeded`).
    InstanceLimits,
    /// /28 prefixes are actually delegated, placed in free aligned blocks, refused on non-Nitro types.
    PrefixDelegation,
    /// `RequestLimitExceeded` once a token bucket is empty.
    Throttling,
    /// Routes to a terminated instance's ENIs turn `blackhole`.
    BlackholeOnTerminate,
    /// Terminate deletes DeleteOnTermination ENIs and detaches the others (left `available`).
    TerminateSemantics,
    /// Wrong-state and unknown-id requests are refused (deleting an attached ENI, attaching an attached one,
    /// a used device index, tagging an unknown id).
    StateChecks,
    /// Explicit addresses are validated (outside the subnet, reserved, in use) and subnets count free addresses.
    AddressValidation,
    /// A full subnet answers `InsufficientFreeAddressesInSubnet` (moto hangs instead).
    SubnetExhaustion,
    /// CreateNetworkInterface honours `ClientToken`.
    ClientToken,
    /// CreateRoute by instance id fails on an instance with several ENIs.
    InstanceRouteRule,
    /// CreateRoute to a network interface on a taken destination answers `RouteAlreadyExists` (moto checks
    /// this only for gateway targets and overwrites the route otherwise).
    DuplicateRouteCheck,
    /// ModifyNetworkInterfaceAttribute `Attachment.DeleteOnTermination` changes what the attachment describes
    /// (moto accepts the call and records nothing).
    DeleteOnTermination,
}

impl Capability {
    pub const ALL: [Capability; 13] = [
        Capability::RouteLimit,
        Capability::InstanceLimits,
        Capability::PrefixDelegation,
        Capability::Throttling,
        Capability::BlackholeOnTerminate,
        Capability::TerminateSemantics,
        Capability::StateChecks,
        Capability::AddressValidation,
        Capability::SubnetExhaustion,
        Capability::ClientToken,
        Capability::InstanceRouteRule,
        Capability::DuplicateRouteCheck,
        Capability::DeleteOnTermination,
    ];
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The behaviours a backend reproduces. Real EC2 and vpcsim have them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    pub route_limit: bool,
    pub instance_limits: bool,
    pub prefix_delegation: bool,
    pub throttling: bool,
    pub blackhole_on_terminate: bool,
    pub terminate_semantics: bool,
    pub state_checks: bool,
    pub address_validation: bool,
    pub subnet_exhaustion: bool,
    pub client_token: bool,
    pub instance_route_rule: bool,
    pub duplicate_route_check: bool,
    pub delete_on_termination: bool,
}

impl Capabilities {
    /// Everything (real EC2, vpcsim).
    pub fn all() -> Self {
        Self {
            route_limit: true,
            instance_limits: true,
            prefix_delegation: true,
            throttling: true,
            blackhole_on_terminate: true,
            terminate_semantics: true,
            state_checks: true,
            address_validation: true,
            subnet_exhaustion: true,
            client_token: true,
            instance_route_rule: true,
            duplicate_route_check: true,
            delete_on_termination: true,
        }
    }

    /// moto server 5.2 (read from its source): enforces no limits, no throttling, no prefix delegation
    /// (assignment succeeds and assigns nothing), ignores ClientToken and DeleteOnTermination changes, deletes
    /// attached ENIs, leaves a terminated instance's ENIs attached and its routes `active`, does not validate
    /// explicit addresses, overwrites a network-interface route on a taken destination, and hangs when a subnet
    /// runs out.
    pub fn moto_5_2() -> Self {
        Self {
            route_limit: false,
            instance_limits: false,
            prefix_delegation: false,
            throttling: false,
            blackhole_on_terminate: false,
            terminate_semantics: false,
            state_checks: false,
            address_validation: false,
            subnet_exhaustion: false,
            client_token: false,
            instance_route_rule: false,
            duplicate_route_check: false,
            delete_on_termination: false,
        }
    }

    pub fn has(&self, c: Capability) -> bool {
        match c {
            Capability::RouteLimit => self.route_limit,
            Capability::InstanceLimits => self.instance_limits,
            Capability::PrefixDelegation => self.prefix_delegation,
            Capability::Throttling => self.throttling,
            Capability::BlackholeOnTerminate => self.blackhole_on_terminate,
            Capability::TerminateSemantics => self.terminate_semantics,
            Capability::StateChecks => self.state_checks,
            Capability::AddressValidation => self.address_validation,
            Capability::SubnetExhaustion => self.subnet_exhaustion,
            Capability::ClientToken => self.client_token,
            Capability::InstanceRouteRule => self.instance_route_rule,
            Capability::DuplicateRouteCheck => self.duplicate_route_check,
            Capability::DeleteOnTermination => self.delete_on_termination,
        }
    }
}

/// Why a case failed: one readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseError(pub String);

impl fmt::Display for CaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CaseError {}

impl From<CloudError> for CaseError {
    fn from(e: CloudError) -> Self {
        CaseError(format!("unexpected cloud error {e} (kind {:?})", e.kind))
    }
}

impl From<FixtureError> for CaseError {
    fn from(e: FixtureError) -> Self {
        CaseError(format!("fixture: {e}"))
    }
}

pub type CaseResult = std::result::Result<(), CaseError>;
pub type CaseFuture<'a> = Pin<Box<dyn Future<Output = CaseResult> + Send + 'a>>;

/// One named case of the suite.
#[derive(Clone, Copy)]
pub struct Case {
    pub name: &'static str,
    /// Capabilities the case needs; the runner skips it on a backend lacking any.
    pub needs: &'static [Capability],
    pub run: for<'a> fn(&'a dyn Fixture) -> CaseFuture<'a>,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("needs", &self.needs)
            .finish()
    }
}

/// What happened to one case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "detail")]
pub enum Outcome {
    Passed,
    Failed(String),
    /// Why: the capabilities the backend lacks.
    Skipped(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseReport {
    pub name: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Results of a run, in case order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub backend: String,
    pub cases: Vec<CaseReport>,
}

impl Report {
    pub fn passed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Passed))
    }
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed(_)))
    }
    pub fn skipped(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Skipped(_)))
    }
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.cases.iter().filter(|c| f(&c.outcome)).count()
    }

    /// `Err` with the whole report when any case failed (for `assert!`-style use in tests).
    pub fn ensure_passed(&self) -> std::result::Result<(), String> {
        if self.failed() == 0 {
            Ok(())
        } else {
            Err(self.to_string())
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "contract suite on {}: {} passed, {} failed, {} skipped",
            self.backend,
            self.passed(),
            self.failed(),
            self.skipped()
        )?;
        for c in &self.cases {
            match &c.outcome {
                Outcome::Passed => writeln!(f, "  ok      {}", c.name)?,
                Outcome::Failed(m) => writeln!(f, "  FAILED  {}: {m}", c.name)?,
                Outcome::Skipped(m) => writeln!(f, "  skipped {}: {m}", c.name)?,
            }
        }
        Ok(())
    }
}

/// Run one case: skip it if the backend lacks a capability, else reset the backend and run it.
pub async fn run_case(fixture: &dyn Fixture, case: &Case) -> Outcome {
    let caps = fixture.capabilities();
    let missing: Vec<String> = case
        .needs
        .iter()
        .filter(|c| !caps.has(**c))
        .map(|c| c.to_string())
        .collect();
    if !missing.is_empty() {
        return Outcome::Skipped(format!(
            "{} does not reproduce {}",
            fixture.name(),
            missing.join(", ")
        ));
    }
    if let Err(e) = fixture.reset().await {
        return Outcome::Failed(format!("reset before the case failed: {e}"));
    }
    match (case.run)(fixture).await {
        Ok(()) => Outcome::Passed,
        Err(e) => Outcome::Failed(e.0),
    }
}

/// Run every case whose name contains `filter` (all of them for `""`), in order.
pub async fn run_matching(fixture: &dyn Fixture, filter: &str) -> Report {
    let mut out = Vec::new();
    for case in cases().iter().filter(|c| c.name.contains(filter)) {
        out.push(CaseReport {
            name: case.name.to_owned(),
            outcome: run_case(fixture, case).await,
        });
    }
    Report {
        backend: fixture.name(),
        cases: out,
    }
}

/// Run the whole suite.
pub async fn run_all(fixture: &dyn Fixture) -> Report {
    run_matching(fixture, "").await
}

/// `Err(CaseError)` unless `result` failed with `kind` (and, if given, the AWS `code`).
pub fn expect_error<T: fmt::Debug>(
    result: std::result::Result<T, CloudError>,
    kind: ErrorKind,
    code: Option<&str>,
    what: &str,
) -> CaseResult {
    match result {
        Ok(v) => Err(CaseError(format!(
            "{what}: expected {kind:?}{}, got success {v:?}",
            code.map(|c| format!(" ({c})")).unwrap_or_default()
        ))),
        Err(e) if e.kind == kind && code.is_none_or(|c| c == e.code) => Ok(()),
        Err(e) => Err(CaseError(format!(
            "{what}: expected {kind:?}{}, got {:?} {e}",
            code.map(|c| format!(" ({c})")).unwrap_or_default(),
            e.kind
        ))),
    }
}
