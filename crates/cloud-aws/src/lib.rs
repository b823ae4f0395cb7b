//! underlay-cloud-aws: the [`Cloud`] port over aws-sdk-ec2.
//!
//! ```text
//!   controller / `underlay inspect`
//!        │
//!        ▼
//!   RateLimitedCloud  (underlay-cloud: token buckets, failover lane, jittered retries within a deadline)
//!        │
//!        ▼
//!   Ec2Cloud (this crate) ── aws-sdk-ec2 ── HTTPS (rustls + ring) ──► EC2, a VPC endpoint, or moto server
//! ```
//!
//! [`connect`] builds the whole stack. [`Ec2Cloud`] alone is one EC2 call per port call (two for an attach with
//! DeleteOnTermination, plus one describe for a counted assign) with no retries of its own: the SDK's retry
//! layer is switched off so that pacing and retries happen in one place, the queue in front of it.
//!
//! - **Endpoint and credentials.** Region and credentials come from the standard chain (environment, profile,
//!   IMDS, web identity/IRSA); [`AwsOptions::endpoint`] overrides the endpoint (a VPC interface endpoint, or
//!   moto in tests) and [`AwsOptions::static_credentials`] replaces the chain (tests only).
//! - **Describes** are always scoped (VPC, ids, instance, tags: a port call that would describe everything
//!   is refused locally) and always read through the SDK paginators.
//! - **Errors** are classified once, by [`CloudError::from_code`] on the service error code; replies without a
//!   code map to `Service` (5xx) or `InvalidRequest`; timeouts and connection failures map to `Transport`.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types as ec2;
use ipnet::Ipv4Net;
use underlay_cloud::queue::{QueueConfig, RateLimitedCloud};
use underlay_cloud::{
    AddressRequest, Attachment, AttachmentId, Cloud, CloudError, CreateEniRequest, EniFilter,
    EniId, EniStatus, ErrorKind, Instance, InstanceFilter, InstanceId, InstanceState,
    InstanceTypeInfo, NetworkInterface, Result, Route, RouteState, RouteTable, RouteTableId,
    RouteTarget, SecurityGroupId, Subnet, SubnetId, Tags, Vpc, VpcId,
};

#[cfg(feature = "test-harness")]
pub mod moto;

/// How to reach EC2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsOptions {
    /// Region; `None` takes it from the standard chain (`AWS_REGION`, profile, IMDS).
    pub region: Option<String>,
    /// Endpoint URL override, e.g. `https://vpce-….ec2.us-east-1.vpce.amazonaws.com` or `http://127.0.0.1:5000`.
    pub endpoint: Option<String>,
    /// Fixed access key and secret instead of the standard chain (for emulators in tests).
    pub static_credentials: Option<(String, String)>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Timeout of one HTTP attempt (a hung endpoint becomes a `Transport` error the queue may retry).
    pub attempt_timeout: Duration,
    /// Page size of describes (EC2 accepts 5–1000).
    pub page_size: i32,
}

impl Default for AwsOptions {
    fn default() -> Self {
        Self {
            region: None,
            endpoint: None,
            static_credentials: None,
            connect_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(30),
            page_size: 1000,
        }
    }
}

/// The adapter behind the rate-aware queue: what the controller and `underlay inspect` use.
pub async fn connect(
    options: &AwsOptions,
    queue: QueueConfig,
) -> std::result::Result<RateLimitedCloud<Ec2Cloud>, ConfigError> {
    Ok(RateLimitedCloud::new(Ec2Cloud::new(options).await?, queue))
}

/// The configuration could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no AWS region: pass one or set AWS_REGION")]
    NoRegion,
}

/// [`Cloud`] over aws-sdk-ec2. See the crate documentation for what it does and does not do.
#[derive(Debug, Clone)]
pub struct Ec2Cloud {
    client: Client,
    page_size: i32,
}

impl Ec2Cloud {
    pub async fn new(options: &AwsOptions) -> std::result::Result<Self, ConfigError> {
        use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(options.connect_timeout)
                    .operation_attempt_timeout(options.attempt_timeout)
                    .build(),
            );
        if let Some(region) = &options.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(endpoint) = &options.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some((key, secret)) = &options.static_credentials {
            loader = loader.credentials_provider(Credentials::new(
                key,
                secret,
                None,
                None,
                "underlay-static",
            ));
        }
        let config = loader.load().await;
        if config.region().is_none() {
            return Err(ConfigError::NoRegion);
        }
        Ok(Self {
            client: Client::new(&config),
            page_size: options.page_size.clamp(5, 1000),
        })
    }

    /// Wrap an SDK client built elsewhere.
    pub fn from_client(client: Client) -> Self {
        Self {
            client,
            page_size: 1000,
        }
    }

    /// The SDK client, for calls outside the port (tests and tools that set up fixtures).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Errors

/// Classify an SDK error: the service's error code when there is one, otherwise by HTTP status or failure kind.
pub fn classify_sdk_error<E>(err: SdkError<E, HttpResponse>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    match &err {
        SdkError::ServiceError(ctx) => {
            let service = ctx.err();
            let message = service.message().unwrap_or_default().to_owned();
            match service.code() {
                Some(code) => {
                    let mut e = CloudError::from_code(code, message);
                    if e.kind == ErrorKind::InvalidRequest && status.is_some_and(|s| s >= 500) {
                        e.kind = ErrorKind::Service;
                    }
                    e
                }
                None => by_status(status, &err),
            }
        }
        SdkError::TimeoutError(_) => CloudError::new(
            ErrorKind::Transport,
            "Timeout",
            error_chain(&err).to_string(),
        ),
        SdkError::DispatchFailure(_) => CloudError::new(
            ErrorKind::Transport,
            "DispatchFailure",
            error_chain(&err).to_string(),
        ),
        SdkError::ResponseError(_) => by_status(status, &err),
        SdkError::ConstructionFailure(_) => CloudError::new(
            ErrorKind::InvalidRequest,
            "ConstructionFailure",
            error_chain(&err).to_string(),
        ),
        _ => CloudError::new(
            ErrorKind::Transport,
            "Unknown",
            error_chain(&err).to_string(),
        ),
    }
}

fn by_status(status: Option<u16>, err: &dyn std::error::Error) -> CloudError {
    let message = error_chain(err);
    match status {
        Some(s) if s >= 500 => {
            CloudError::new(ErrorKind::Service, format!("HttpStatus{s}"), message)
        }
        Some(s) => CloudError::new(ErrorKind::InvalidRequest, format!("HttpStatus{s}"), message),
        None => CloudError::new(ErrorKind::Transport, "NoResponse", message),
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

fn unfiltered(what: &str) -> CloudError {
    CloudError::new(
        ErrorKind::InvalidRequest,
        "UnfilteredDescribe",
        format!("{what} without a filter: underlay never describes a whole account"),
    )
}

fn bad_reply(what: &str) -> CloudError {
    CloudError::new(
        ErrorKind::Service,
        "MalformedReply",
        format!("EC2 reply without {what}"),
    )
}

// ---------------------------------------------------------------------------------------------------------------
// Conversions from EC2's model

fn filter(name: &str, values: impl IntoIterator<Item = impl Into<String>>) -> ec2::Filter {
    ec2::Filter::builder()
        .name(name)
        .set_values(Some(values.into_iter().map(Into::into).collect()))
        .build()
}

fn tags_of(tags: &[ec2::Tag]) -> Tags {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_owned(),
                t.value().unwrap_or_default().to_owned(),
            ))
        })
        .collect()
}

fn ip(s: Option<&str>, what: &str) -> Result<Ipv4Addr> {
    s.and_then(|s| s.parse().ok())
        .ok_or_else(|| bad_reply(what))
}

fn net(s: Option<&str>, what: &str) -> Result<Ipv4Net> {
    s.and_then(|s| s.parse().ok())
        .ok_or_else(|| bad_reply(what))
}

fn eni_status(s: Option<&ec2::NetworkInterfaceStatus>) -> EniStatus {
    match s {
        Some(ec2::NetworkInterfaceStatus::Available) => EniStatus::Available,
        Some(ec2::NetworkInterfaceStatus::Attaching) => EniStatus::Attaching,
        Some(ec2::NetworkInterfaceStatus::Detaching) => EniStatus::Detaching,
        // in-use, associated (trunk branches) and anything newer: the ENI is held by something.
        _ => EniStatus::InUse,
    }
}

fn eni_status_value(s: EniStatus) -> &'static str {
    match s {
        EniStatus::Available => "available",
        EniStatus::Attaching => "attaching",
        EniStatus::InUse => "in-use",
        EniStatus::Detaching => "detaching",
    }
}

fn convert_eni(e: &ec2::NetworkInterface) -> Result<NetworkInterface> {
    let primary_ip = ip(e.private_ip_address(), "PrivateIpAddress")?;
    let secondary_ips = e
        .private_ip_addresses()
        .iter()
        .filter(|a| a.primary() != Some(true))
        .filter_map(|a| a.private_ip_address()?.parse().ok())
        .filter(|a| *a != primary_ip)
        .collect();
    let attachment = e.attachment().and_then(|a| {
        Some(Attachment {
            id: AttachmentId::new(a.attachment_id()?),
            instance: InstanceId::new(a.instance_id()?),
            device_index: u32::try_from(a.device_index()?).ok()?,
            delete_on_termination: a.delete_on_termination().unwrap_or(false),
        })
    });
    Ok(NetworkInterface {
        id: EniId::new(
            e.network_interface_id()
                .ok_or_else(|| bad_reply("NetworkInterfaceId"))?,
        ),
        vpc: VpcId::new(e.vpc_id().unwrap_or_default()),
        subnet: SubnetId::new(e.subnet_id().unwrap_or_default()),
        zone: e.availability_zone().unwrap_or_default().to_owned(),
        mac: e.mac_address().unwrap_or_default().to_ascii_lowercase(),
        primary_ip,
        secondary_ips,
        prefixes: e
            .ipv4_prefixes()
            .iter()
            .filter_map(|p| p.ipv4_prefix()?.parse().ok())
            .collect(),
        status: eni_status(e.status()),
        attachment,
        source_dest_check: e.source_dest_check().unwrap_or(true),
        security_groups: e
            .groups()
            .iter()
            .filter_map(|g| g.group_id().map(SecurityGroupId::new))
            .collect(),
        description: e.description().unwrap_or_default().to_owned(),
        tags: tags_of(e.tag_set()),
    })
}

fn convert_instance_eni(
    e: &ec2::InstanceNetworkInterface,
    instance: &InstanceId,
    zone: &str,
) -> Option<NetworkInterface> {
    let primary_ip: Ipv4Addr = e.private_ip_address()?.parse().ok()?;
    let attachment = e.attachment().and_then(|a| {
        Some(Attachment {
            id: AttachmentId::new(a.attachment_id()?),
            instance: instance.clone(),
            device_index: u32::try_from(a.device_index()?).ok()?,
            delete_on_termination: a.delete_on_termination().unwrap_or(false),
        })
    });
    Some(NetworkInterface {
        id: EniId::new(e.network_interface_id()?),
        vpc: VpcId::new(e.vpc_id().unwrap_or_default()),
        subnet: SubnetId::new(e.subnet_id().unwrap_or_default()),
        zone: zone.to_owned(),
        mac: e.mac_address().unwrap_or_default().to_ascii_lowercase(),
        primary_ip,
        secondary_ips: e
            .private_ip_addresses()
            .iter()
            .filter(|a| a.primary() != Some(true))
            .filter_map(|a| a.private_ip_address()?.parse().ok())
            .filter(|a| *a != primary_ip)
            .collect(),
        prefixes: e
            .ipv4_prefixes()
            .iter()
            .filter_map(|p| p.ipv4_prefix()?.parse().ok())
            .collect(),
        status: eni_status(e.status()),
        attachment,
        source_dest_check: e.source_dest_check().unwrap_or(true),
        security_groups: e
            .groups()
            .iter()
            .filter_map(|g| g.group_id().map(SecurityGroupId::new))
            .collect(),
        description: e.description().unwrap_or_default().to_owned(),
        tags: Tags::new(),
    })
}

fn instance_state(s: Option<&ec2::InstanceStateName>) -> InstanceState {
    match s {
        Some(ec2::InstanceStateName::Pending) => InstanceState::Pending,
        Some(ec2::InstanceStateName::Running) => InstanceState::Running,
        Some(ec2::InstanceStateName::Stopping) => InstanceState::Stopping,
        Some(ec2::InstanceStateName::Stopped) => InstanceState::Stopped,
        Some(ec2::InstanceStateName::ShuttingDown) => InstanceState::ShuttingDown,
        _ => InstanceState::Terminated,
    }
}

fn convert_instance(i: &ec2::Instance) -> Result<Instance> {
    let id = InstanceId::new(i.instance_id().ok_or_else(|| bad_reply("InstanceId"))?);
    let zone = i
        .placement()
        .and_then(|p| p.availability_zone())
        .unwrap_or_default()
        .to_owned();
    let mut enis: Vec<NetworkInterface> = i
        .network_interfaces()
        .iter()
        .filter_map(|e| convert_instance_eni(e, &id, &zone))
        .collect();
    enis.sort_by_key(|e| e.attachment.as_ref().map_or(u32::MAX, |a| a.device_index));
    Ok(Instance {
        instance_type: i
            .instance_type()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
        state: instance_state(i.state().and_then(|s| s.name())),
        vpc: VpcId::new(i.vpc_id().unwrap_or_default()),
        subnet: SubnetId::new(i.subnet_id().unwrap_or_default()),
        zone,
        private_ip: ip(i.private_ip_address(), "PrivateIpAddress")?,
        enis,
        tags: tags_of(i.tags()),
        id,
    })
}

fn convert_route(r: &ec2::Route) -> Option<Route> {
    // IPv6 and prefix-list routes are outside the port (underlay routes IPv4 pod blocks).
    let destination: Ipv4Net = r.destination_cidr_block()?.parse().ok()?;
    let target = if let Some(eni) = r.network_interface_id() {
        RouteTarget::NetworkInterface(EniId::new(eni))
    } else if let Some(i) = r.instance_id() {
        RouteTarget::Instance(InstanceId::new(i))
    } else if r.gateway_id() == Some("local") {
        RouteTarget::Local
    } else {
        let gw = [
            r.gateway_id(),
            r.nat_gateway_id(),
            r.transit_gateway_id(),
            r.vpc_peering_connection_id(),
            r.egress_only_internet_gateway_id(),
            r.local_gateway_id(),
            r.carrier_gateway_id(),
            r.core_network_arn(),
        ]
        .into_iter()
        .flatten()
        .next()
        .unwrap_or("unknown");
        RouteTarget::Gateway(gw.to_owned())
    };
    let state = match r.state() {
        Some(ec2::RouteState::Blackhole) => RouteState::Blackhole,
        _ => RouteState::Active,
    };
    Some(Route {
        destination,
        target,
        state,
    })
}

fn convert_route_table(t: &ec2::RouteTable) -> Result<RouteTable> {
    let associations = t.associations();
    Ok(RouteTable {
        id: RouteTableId::new(
            t.route_table_id()
                .ok_or_else(|| bad_reply("RouteTableId"))?,
        ),
        vpc: VpcId::new(t.vpc_id().unwrap_or_default()),
        main: associations.iter().any(|a| a.main() == Some(true)),
        subnets: associations
            .iter()
            .filter_map(|a| a.subnet_id().map(SubnetId::new))
            .collect(),
        routes: t.routes().iter().filter_map(convert_route).collect(),
        tags: tags_of(t.tags()),
    })
}

fn convert_subnet(s: &ec2::Subnet) -> Result<Subnet> {
    Ok(Subnet {
        id: SubnetId::new(s.subnet_id().ok_or_else(|| bad_reply("SubnetId"))?),
        vpc: VpcId::new(s.vpc_id().unwrap_or_default()),
        zone: s.availability_zone().unwrap_or_default().to_owned(),
        cidr: net(s.cidr_block(), "CidrBlock")?,
        available_ips: s
            .available_ip_address_count()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
        tags: tags_of(s.tags()),
    })
}

fn route_target_args(target: &RouteTarget) -> Result<(Option<String>, Option<String>)> {
    match target {
        RouteTarget::NetworkInterface(eni) => Ok((Some(eni.to_string()), None)),
        RouteTarget::Gateway(gw) => Ok((None, Some(gw.clone()))),
        RouteTarget::Local | RouteTarget::Instance(_) => Err(CloudError::new(
            ErrorKind::InvalidRequest,
            "InvalidRouteTarget",
            format!("underlay routes by network interface or gateway, not {target:?}"),
        )),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The port

#[async_trait::async_trait]
impl Cloud for Ec2Cloud {
    async fn describe_vpc(&self, vpc: &VpcId) -> Result<Vpc> {
        let vpcs: Vec<ec2::Vpc> = self
            .client
            .describe_vpcs()
            .vpc_ids(vpc.as_str())
            .into_paginator()
            .items()
            .send()
            .collect::<std::result::Result<_, _>>()
            .await
            .map_err(classify_sdk_error)?;
        let v = vpcs
            .into_iter()
            .find(|v| v.vpc_id() == Some(vpc.as_str()))
            .ok_or_else(|| {
                CloudError::from_code(
                    "InvalidVpcID.NotFound",
                    format!("The vpc ID '{vpc}' does not exist"),
                )
            })?;
        let primary: Option<Ipv4Net> = v.cidr_block().and_then(|c| c.parse().ok());
        let mut cidrs: Vec<Ipv4Net> = primary.into_iter().collect();
        for assoc in v.cidr_block_association_set() {
            let associated = assoc
                .cidr_block_state()
                .and_then(|s| s.state())
                .is_none_or(|s| *s == ec2::VpcCidrBlockStateCode::Associated);
            if let Some(c) = assoc.cidr_block().and_then(|c| c.parse().ok())
                && associated
                && !cidrs.contains(&c)
            {
                cidrs.push(c);
            }
        }
        Ok(Vpc {
            id: vpc.clone(),
            cidrs,
            tags: tags_of(v.tags()),
        })
    }

    async fn describe_subnets(&self, vpc: &VpcId) -> Result<Vec<Subnet>> {
        let subnets: Vec<ec2::Subnet> = self
            .client
            .describe_subnets()
            .filters(filter("vpc-id", [vpc.as_str()]))
            .max_results(self.page_size)
            .into_paginator()
            .items()
            .send()
            .collect::<std::result::Result<_, _>>()
            .await
            .map_err(classify_sdk_error)?;
        subnets.iter().map(convert_subnet).collect()
    }

    async fn describe_route_tables(&self, vpc: &VpcId) -> Result<Vec<RouteTable>> {
        let tables: Vec<ec2::RouteTable> = self
            .client
            .describe_route_tables()
            .filters(filter("vpc-id", [vpc.as_str()]))
            .max_results(self.page_size.min(100))
            .into_paginator()
            .items()
            .send()
            .collect::<std::result::Result<_, _>>()
            .await
            .map_err(classify_sdk_error)?;
        tables.iter().map(convert_route_table).collect()
    }

    async fn describe_instances(&self, f: &InstanceFilter) -> Result<Vec<Instance>> {
        if f.ids.is_empty() && f.vpc.is_none() {
            return Err(unfiltered("DescribeInstances"));
        }
        let mut req = self.client.describe_instances().filters(filter(
            "instance-state-name",
            ["pending", "running", "stopping", "stopped", "shutting-down"],
        ));
        if f.ids.is_empty() {
            // EC2 refuses MaxResults together with instance ids.
            req = req.max_results(self.page_size);
        } else {
            req = req.set_instance_ids(Some(f.ids.iter().map(ToString::to_string).collect()));
        }
        if let Some(vpc) = &f.vpc {
            req = req.filters(filter("vpc-id", [vpc.as_str()]));
        }
        let reservations: Vec<ec2::Reservation> = req
            .into_paginator()
            .items()
            .send()
            .collect::<std::result::Result<_, _>>()
            .await
            .map_err(classify_sdk_error)?;
        reservations
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| {
                i.state().and_then(|s| s.name()) != Some(&ec2::InstanceStateName::Terminated)
            })
            .map(convert_instance)
            .collect()
    }

    async fn describe_instance_types(&self, types: &[String]) -> Result<Vec<InstanceTypeInfo>> {
        if types.is_empty() {
            return Ok(Vec::new());
        }
        let infos: Vec<ec2::InstanceTypeInfo> = self
            .client
            .describe_instance_types()
            .set_instance_types(Some(
                types
                    .iter()
                    .map(|t| ec2::InstanceType::from(t.as_str()))
                    .collect(),
            ))
            .into_paginator()
            .items()
            .send()
            .collect::<std::result::Result<_, _>>()
            .await
            .map_err(classify_sdk_error)?;
        Ok(infos
            .iter()
            .map(|i| {
                let net = i.network_info();
                let count = |v: Option<i32>| v.and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
                InstanceTypeInfo {
                    instance_type: i
                        .instance_type()
                        .map(|t| t.as_str().to_owned())
                        .unwrap_or_default(),
                    vcpus: count(i.v_cpu_info().and_then(|v| v.default_v_cpus())),
                    max_enis: count(net.and_then(|n| n.maximum_network_interfaces())),
                    ipv4_per_eni: count(net.and_then(|n| n.ipv4_addresses_per_interface())),
                    // Nitro types report hypervisor `nitro`; bare-metal ones (also built on Nitro) report none.
                    prefix_delegation: i.hypervisor() == Some(&ec2::InstanceTypeHypervisor::Nitro)
                        || i.bare_metal() == Some(true),
                }
            })
            .collect())
    }

    async fn describe_network_interfaces(&self, f: &EniFilter) -> Result<Vec<NetworkInterface>> {
        if f.is_unfiltered() {
            return Err(unfiltered("DescribeNetworkInterfaces"));
        }
        let mut req = self.client.describe_network_interfaces();
        if f.ids.is_empty() {
            // EC2 refuses MaxResults together with ids.
            req = req.max_results(self.page_size);
        } else {
            req = req
                .set_network_interface_ids(Some(f.ids.iter().map(ToString::to_string).collect()));
        }
        if let Some(vpc) = &f.vpc {
            req = req.filters(filter("vpc-id", [vpc.as_str()]));
        }
        if let Some(instance) = &f.instance {
            req = req.filters(filter("attachment.instance-id", [instance.as_str()]));
        }
        if let Some(status) = f.status {
            req = req.filters(filter("status", [eni_status_value(status)]));
        }
        for (key, value) in &f.tags {
            req = if value.is_empty() {
                req.filters(filter("tag-key", [key.as_str()]))
            } else {
                req.filters(filter(&format!("tag:{key}"), [value.as_str()]))
            };
        }
        let enis: Vec<ec2::NetworkInterface> = req
            .into_paginator()
            .items()
            .send()
            .collect::<std::result::Result<_, _>>()
            .await
            .map_err(classify_sdk_error)?;
        enis.iter().map(convert_eni).collect()
    }

    async fn create_route(
        &self,
        table: &RouteTableId,
        destination: Ipv4Net,
        target: &RouteTarget,
    ) -> Result<()> {
        let (eni, gateway) = route_target_args(target)?;
        self.client
            .create_route()
            .route_table_id(table.as_str())
            .destination_cidr_block(destination.to_string())
            .set_network_interface_id(eni)
            .set_gateway_id(gateway)
            .send()
            .await
            .map_err(classify_sdk_error)?;
        Ok(())
    }

    async fn replace_route(
        &self,
        table: &RouteTableId,
        destination: Ipv4Net,
        target: &RouteTarget,
    ) -> Result<()> {
        let (eni, gateway) = route_target_args(target)?;
        self.client
            .replace_route()
            .route_table_id(table.as_str())
            .destination_cidr_block(destination.to_string())
            .set_network_interface_id(eni)
            .set_gateway_id(gateway)
            .send()
            .await
            .map_err(classify_sdk_error)?;
        Ok(())
    }

    async fn delete_route(&self, table: &RouteTableId, destination: Ipv4Net) -> Result<()> {
        self.client
            .delete_route()
            .route_table_id(table.as_str())
            .destination_cidr_block(destination.to_string())
            .send()
            .await
            .map_err(classify_sdk_error)?;
        Ok(())
    }

    async fn create_network_interface(
        &self,
        request: &CreateEniRequest,
    ) -> Result<NetworkInterface> {
        let mut req = self
            .client
            .create_network_interface()
            .subnet_id(request.subnet.as_str())
            .description(&request.description)
            .client_token(&request.client_token)
            .set_groups((!request.security_groups.is_empty()).then(|| {
                request
                    .security_groups
                    .iter()
                    .map(ToString::to_string)
                    .collect()
            }));
        if request.secondary_ip_count > 0 {
            req = req.secondary_private_ip_address_count(request.secondary_ip_count as i32);
        }
        if request.prefix_count > 0 {
            req = req.ipv4_prefix_count(request.prefix_count as i32);
        }
        if !request.tags.is_empty() {
            req = req.tag_specifications(
                ec2::TagSpecification::builder()
                    .resource_type(ec2::ResourceType::NetworkInterface)
                    .set_tags(Some(ec2_tags(&request.tags)))
                    .build(),
            );
        }
        let out = req.send().await.map_err(classify_sdk_error)?;
        convert_eni(
            out.network_interface()
                .ok_or_else(|| bad_reply("NetworkInterface"))?,
        )
    }

    async fn attach_network_interface(
        &self,
        eni: &EniId,
        instance: &InstanceId,
        device_index: u32,
        delete_on_termination: bool,
    ) -> Result<AttachmentId> {
        let out = self
            .client
            .attach_network_interface()
            .network_interface_id(eni.as_str())
            .instance_id(instance.as_str())
            .device_index(device_index as i32)
            .send()
            .await
            .map_err(classify_sdk_error)?;
        let attachment = AttachmentId::new(
            out.attachment_id()
                .ok_or_else(|| bad_reply("AttachmentId"))?,
        );
        if delete_on_termination {
            // If this fails the ENI stays attached without DeleteOnTermination; the caller sees the error, and
            // the next reconcile observes the attachment and sets the attribute again.
            self.set_delete_on_termination(eni, &attachment, true)
                .await?;
        }
        Ok(attachment)
    }

    async fn set_delete_on_termination(
        &self,
        eni: &EniId,
        attachment: &AttachmentId,
        enabled: bool,
    ) -> Result<()> {
        self.client
            .modify_network_interface_attribute()
            .network_interface_id(eni.as_str())
            .attachment(
                ec2::NetworkInterfaceAttachmentChanges::builder()
                    .attachment_id(attachment.as_str())
                    .delete_on_termination(enabled)
                    .build(),
            )
            .send()
            .await
            .map_err(classify_sdk_error)?;
        Ok(())
    }

    async fn detach_network_interface(&self, attachment: &AttachmentId, force: bool) -> Result<()> {
        self.client
            .detach_network_interface()
            .attachment_id(attachment.as_str())
            .force(force)
            .send()
            .await
            .map_err(classify_sdk_error)?;
        Ok(())
    }

    async fn delete_network_interface(&self, eni: &EniId) -> Result<()> {
        self.client
            .delete_network_interface()
            .network_interface_id(eni.as_str())
            .send()
            .await
            .map_err(classify_sdk_error)?;
        Ok(())
    }

    async fn assign_private_ips(
        &self,
        eni: &EniId,
        request: &AddressRequest<Ipv4Addr>,
    ) -> Result<Vec<Ipv4Addr>> {
        let req = self
            .client
            .assign_private_ip_addresses()
            .network_interface_id(eni.as_str());
        match request {
            AddressRequest::Explicit(addresses) => {
                let out = req
                    .set_private_ip_addresses(Some(
                        addresses.iter().map(ToString::to_string).collect(),
                    ))
                    .send()
                    .await
                    .map_err(classify_sdk_error)?;
                let wanted: BTreeSet<Ipv4Addr> = addresses.iter().copied().collect();
                Ok(out
                    .assigned_private_ip_addresses()
                    .iter()
                    .filter_map(|a| a.private_ip_address()?.parse().ok())
                    .filter(|a| wanted.contains(a))
                    .collect())
            }
            AddressRequest::Count(n) => {
                // The reply should list only the new addresses; some emulators list every address of the ENI,
                // so the addresses the ENI held before are taken out of the reply.
                let before = self.eni_addresses(eni).await?;
                let out = req
                    .secondary_private_ip_address_count(*n as i32)
                    .send()
                    .await
                    .map_err(classify_sdk_error)?;
                Ok(out
                    .assigned_private_ip_addresses()
                    .iter()
                    .filter_map(|a| a.private_ip_address()?.parse().ok())
                    .filter(|a| !before.0.contains(a))
                    .collect())
            }
        }
    }

    async fn unassign_private_ips(&self, eni: &EniId, addresses: &[Ipv4Addr]) -> Result<()> {
        self.client
            .unassign_private_ip_addresses()
            .network_interface_id(eni.as_str())
            .set_private_ip_addresses(Some(addresses.iter().map(ToString::to_string).collect()))
            .send()
            .await
            .map_err(classify_sdk_error)?;
        Ok(())
    }

    async fn assign_prefixes(
        &self,
        eni: &EniId,
        request: &AddressRequest<Ipv4Net>,
    ) -> Result<Vec<Ipv4Net>> {
        let req = self
            .client
            .assign_private_ip_addresses()
            .network_interface_id(eni.as_str());
        let (req, before) = match request {
            AddressRequest::Explicit(prefixes) => (
                req.set_ipv4_prefixes(Some(prefixes.iter().map(ToString::to_string).collect())),
                BTreeSet::new(),
            ),
            AddressRequest::Count(n) => (
                req.ipv4_prefix_count(*n as i32),
                self.eni_addresses(eni).await?.1,
            ),
        };
        let out = req.send().await.map_err(classify_sdk_error)?;
        let assigned = out
            .assigned_ipv4_prefixes()
            .iter()
            .filter_map(|p| p.ipv4_prefix()?.parse().ok())
            .filter(|p| !before.contains(p));
        Ok(match request {
            AddressRequest::Explicit(wanted) => assigned.filter(|p| wanted.contains(p)).collect(),
            AddressRequest::Count(_) => assigned.collect(),
        })
    }

    async fn unassign_prefixes(&self, eni: &EniId, prefixes: &[Ipv4Net]) -> Result<()> {
        self.client
            .unassign_private_ip_addresses()
            .network_interface_id(eni.as_str())
            .set_ipv4_prefixes(Some(prefixes.iter().map(ToString::to_string).collect()))
            .send()
            .await
            .map_err(classify_sdk_error)?;
        Ok(())
    }

    async fn set_source_dest_check(&self, eni: &EniId, enabled: bool) -> Result<()> {
        self.client
            .modify_network_interface_attribute()
            .network_interface_id(eni.as_str())
            .source_dest_check(ec2::AttributeBooleanValue::builder().value(enabled).build())
            .send()
            .await
            .map_err(classify_sdk_error)?;
        Ok(())
    }

    async fn create_tags(&self, resources: &[String], tags: &Tags) -> Result<()> {
        self.client
            .create_tags()
            .set_resources(Some(resources.to_vec()))
            .set_tags(Some(ec2_tags(tags)))
            .send()
            .await
            .map_err(classify_sdk_error)?;
        Ok(())
    }
}

impl Ec2Cloud {
    /// The ENI's addresses (primary and secondary) and prefixes now.
    async fn eni_addresses(&self, eni: &EniId) -> Result<(BTreeSet<Ipv4Addr>, BTreeSet<Ipv4Net>)> {
        let enis = self
            .describe_network_interfaces(&EniFilter {
                ids: vec![eni.clone()],
                ..EniFilter::default()
            })
            .await?;
        let e = enis.into_iter().next().ok_or_else(|| {
            CloudError::from_code(
                "InvalidNetworkInterfaceID.NotFound",
                format!("The networkInterface ID '{eni}' does not exist"),
            )
        })?;
        let mut ips: BTreeSet<Ipv4Addr> = e.secondary_ips.into_iter().collect();
        ips.insert(e.primary_ip);
        Ok((ips, e.prefixes.into_iter().collect()))
    }
}

fn ec2_tags(tags: &Tags) -> Vec<ec2::Tag> {
    tags.iter()
        .map(|(k, v)| ec2::Tag::builder().key(k).value(v).build())
        .collect()
}
