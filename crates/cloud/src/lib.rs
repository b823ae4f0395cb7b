//! underlay-cloud: the port through which the controller (the only EC2 caller in underlay) reaches EC2.
//!
//! ```text
//!   controller ──► dyn Cloud ──┬─► underlay-cloud-aws  (aws-sdk-ec2, behind a rate-aware queue)
//!                              └─► underlay-vpcsim      (in-memory EC2/VPC for tests, lab and benchmarks)
//! ```
//!
//! This crate holds only what both sides share: the [`Cloud`] trait and its data types ([`types`]), the error
//! type that classifies AWS error codes in one place ([`error`]), and the model of AWS's per-account token
//! buckets ([`ratelimit`]) that vpcsim enforces and the adapter's queue respects. With feature `contract`, the
//! shared contract suite every implementation runs (`contract`).

#[cfg(feature = "contract")]
pub mod contract;
pub mod error;
pub mod metrics;
pub mod queue;
pub mod ratelimit;
pub mod types;

pub use error::{CloudError, ErrorKind};
pub use metrics::CloudMetrics;
pub use ratelimit::{
    Bucket, BucketLimits, BucketOutlook, BucketSet, ControllerMode, Operation, RateLimits,
    TokenBucket, choose_paths,
};
pub use types::*;

/// Result of every [`Cloud`] operation.
pub type Result<T> = std::result::Result<T, CloudError>;

/// Every EC2 operation either address mode uses. Implementations: the aws-sdk-ec2 adapter and vpcsim.
///
/// Rules every implementation follows:
/// - Describe calls are always scoped (a VPC, ids, or tags); there is no unfiltered describe in this port.
/// - Routes are targeted by network interface, never by instance (fails on multi-ENI instances in AWS).
/// - Errors carry the AWS error code and are classified by [`CloudError::from_code`].
/// - Mutations are not retried here; callers (the adapter's queue, the controller) decide.
#[async_trait::async_trait]
pub trait Cloud: Send + Sync + std::fmt::Debug {
    /// The bucket limits this implementation paces calls by (the rate-aware queue); `None` when it does not
    /// pace (vpcsim, the bare adapter).
    fn rate_limits(&self) -> Option<RateLimits> {
        None
    }

    /// What a call drawing on `bucket` can expect now (the rate-aware queue); `None` when not pacing.
    fn bucket_outlook(&self, _bucket: Bucket) -> Option<BucketOutlook> {
        None
    }

    /// DescribeVpcs for one VPC.
    async fn describe_vpc(&self, vpc: &VpcId) -> Result<Vpc>;
    /// DescribeSubnets filtered by `vpc-id`, with each subnet's free address count.
    async fn describe_subnets(&self, vpc: &VpcId) -> Result<Vec<Subnet>>;
    /// DescribeRouteTables filtered by `vpc-id`, with routes and subnet associations.
    async fn describe_route_tables(&self, vpc: &VpcId) -> Result<Vec<RouteTable>>;
    /// DescribeInstances by ids or by VPC; terminated instances are not returned.
    async fn describe_instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>>;
    /// DescribeInstanceTypes: network limits of the given types.
    async fn describe_instance_types(&self, types: &[String]) -> Result<Vec<InstanceTypeInfo>>;
    /// DescribeNetworkInterfaces by ids, VPC, attached instance, status or tags (all given filters apply).
    async fn describe_network_interfaces(
        &self,
        filter: &EniFilter,
    ) -> Result<Vec<NetworkInterface>>;

    /// CreateRoute. `RouteAlreadyExists` when the destination is taken.
    async fn create_route(
        &self,
        table: &RouteTableId,
        destination: ipnet::Ipv4Net,
        target: &RouteTarget,
    ) -> Result<()>;
    /// ReplaceRoute: retarget an existing route. When there is none, EC2 answers `InvalidParameterValue`
    /// ("There is no route defined for …"), not `InvalidRoute.NotFound` as DeleteRoute does.
    async fn replace_route(
        &self,
        table: &RouteTableId,
        destination: ipnet::Ipv4Net,
        target: &RouteTarget,
    ) -> Result<()>;
    /// DeleteRoute. `InvalidRoute.NotFound` when there is none.
    async fn delete_route(&self, table: &RouteTableId, destination: ipnet::Ipv4Net) -> Result<()>;

    /// CreateNetworkInterface, idempotent on `client_token`, tagged at creation.
    async fn create_network_interface(
        &self,
        request: &CreateEniRequest,
    ) -> Result<NetworkInterface>;
    /// AttachNetworkInterface, then (if asked) ModifyNetworkInterfaceAttribute to set DeleteOnTermination. When
    /// the second call fails, the ENI stays attached without it (as in EC2); [`Cloud::set_delete_on_termination`]
    /// repairs that.
    async fn attach_network_interface(
        &self,
        eni: &EniId,
        instance: &InstanceId,
        device_index: u32,
        delete_on_termination: bool,
    ) -> Result<AttachmentId>;
    /// ModifyNetworkInterfaceAttribute `Attachment.DeleteOnTermination` of the ENI's current attachment
    /// (`InvalidAttachmentID.NotFound` when `attachment` is not it).
    async fn set_delete_on_termination(
        &self,
        eni: &EniId,
        attachment: &AttachmentId,
        enabled: bool,
    ) -> Result<()>;
    /// DetachNetworkInterface.
    async fn detach_network_interface(&self, attachment: &AttachmentId, force: bool) -> Result<()>;
    /// DeleteNetworkInterface (must be `available`).
    async fn delete_network_interface(&self, eni: &EniId) -> Result<()>;

    /// AssignPrivateIpAddresses; returns the addresses this call added.
    async fn assign_private_ips(
        &self,
        eni: &EniId,
        request: &AddressRequest<std::net::Ipv4Addr>,
    ) -> Result<Vec<std::net::Ipv4Addr>>;
    /// UnassignPrivateIpAddresses.
    async fn unassign_private_ips(
        &self,
        eni: &EniId,
        addresses: &[std::net::Ipv4Addr],
    ) -> Result<()>;
    /// AssignPrivateIpAddresses with Ipv4Prefix(Count); returns the /28 prefixes this call added.
    async fn assign_prefixes(
        &self,
        eni: &EniId,
        request: &AddressRequest<ipnet::Ipv4Net>,
    ) -> Result<Vec<ipnet::Ipv4Net>>;
    /// UnassignPrivateIpAddresses with Ipv4Prefixes.
    async fn unassign_prefixes(&self, eni: &EniId, prefixes: &[ipnet::Ipv4Net]) -> Result<()>;
    /// ModifyNetworkInterfaceAttribute SourceDestCheck.
    async fn set_source_dest_check(&self, eni: &EniId, enabled: bool) -> Result<()>;

    /// CreateTags on any resource id.
    async fn create_tags(&self, resources: &[String], tags: &Tags) -> Result<()>;
}
