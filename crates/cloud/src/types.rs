//! Data the [`crate::Cloud`] port speaks: the parts of EC2's model underlay reads and writes.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// EC2 tags, ordered for deterministic output.
pub type Tags = BTreeMap<String, String>;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}

id_type!(
    /// `vpc-…`
    VpcId
);
id_type!(
    /// `subnet-…`
    SubnetId
);
id_type!(
    /// `rtb-…`
    RouteTableId
);
id_type!(
    /// `i-…`
    InstanceId
);
id_type!(
    /// `eni-…`
    EniId
);
id_type!(
    /// `eni-attach-…`
    AttachmentId
);
id_type!(
    /// `sg-…`
    SecurityGroupId
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vpc {
    pub id: VpcId,
    /// Primary CIDR first, then associated secondary CIDRs.
    pub cidrs: Vec<Ipv4Net>,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub id: SubnetId,
    pub vpc: VpcId,
    /// Availability zone name, e.g. `us-east-1a`.
    pub zone: String,
    pub cidr: Ipv4Net,
    /// Addresses not yet used (AWS keeps 5 per subnet reserved and never counts them).
    pub available_ips: u32,
    pub tags: Tags,
}

/// Where a route sends traffic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "id")]
pub enum RouteTarget {
    /// The VPC's own `local` route.
    Local,
    NetworkInterface(EniId),
    /// Only as observed: underlay never creates routes by instance id.
    Instance(InstanceId),
    /// Internet, NAT, transit, peering or VPC-endpoint gateways: anything else, by id.
    Gateway(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteState {
    Active,
    /// The target is gone (e.g. a terminated instance or deleted ENI).
    Blackhole,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub destination: Ipv4Net,
    pub target: RouteTarget,
    pub state: RouteState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTable {
    pub id: RouteTableId,
    pub vpc: VpcId,
    /// The VPC's main table (used by subnets without an explicit association).
    pub main: bool,
    /// Subnets explicitly associated with this table.
    pub subnets: Vec<SubnetId>,
    pub routes: Vec<Route>,
    pub tags: Tags,
}

impl RouteTable {
    /// The route a packet to `dst` takes: the longest prefix containing it (a whole network: every address of
    /// it), as the VPC's router picks one.
    pub fn longest_match(&self, dst: Ipv4Net) -> Option<&Route> {
        self.routes
            .iter()
            .filter(|r| r.destination.contains(&dst))
            .max_by_key(|r| r.destination.prefix_len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Pending,
    Running,
    Stopping,
    Stopped,
    ShuttingDown,
    Terminated,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: InstanceId,
    pub instance_type: String,
    pub state: InstanceState,
    pub vpc: VpcId,
    pub subnet: SubnetId,
    pub zone: String,
    pub private_ip: Ipv4Addr,
    /// Attached network interfaces, ordered by device index (the primary, index 0, first).
    pub enis: Vec<NetworkInterface>,
    pub tags: Tags,
}

impl Instance {
    /// The ENI at device index 0.
    pub fn primary_eni(&self) -> Option<&NetworkInterface> {
        self.enis
            .iter()
            .find(|e| e.attachment.as_ref().is_some_and(|a| a.device_index == 0))
    }
}

/// Which instances to describe. At least one field must be set: this port never describes unfiltered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceFilter {
    pub ids: Vec<InstanceId>,
    pub vpc: Option<VpcId>,
}

/// Network limits of an instance type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceTypeInfo {
    pub instance_type: String,
    pub vcpus: u32,
    pub max_enis: u32,
    /// IPv4 addresses per ENI, the primary included.
    pub ipv4_per_eni: u32,
    /// EC2 delegates /28 prefixes to the type's ENIs: Nitro types (`Hypervisor` = `nitro`) and bare-metal
    /// types (no hypervisor, built on Nitro). Xen types refuse prefixes.
    pub prefix_delegation: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EniStatus {
    Available,
    Attaching,
    InUse,
    Detaching,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub id: AttachmentId,
    pub instance: InstanceId,
    pub device_index: u32,
    pub delete_on_termination: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub id: EniId,
    pub vpc: VpcId,
    pub subnet: SubnetId,
    pub zone: String,
    /// Lower-case colon-separated MAC, as EC2 reports it.
    pub mac: String,
    pub primary_ip: Ipv4Addr,
    /// Secondary private addresses (the primary excluded).
    pub secondary_ips: Vec<Ipv4Addr>,
    /// Delegated /28 prefixes.
    pub prefixes: Vec<Ipv4Net>,
    pub status: EniStatus,
    pub attachment: Option<Attachment>,
    pub source_dest_check: bool,
    pub security_groups: Vec<SecurityGroupId>,
    pub description: String,
    pub tags: Tags,
}

impl NetworkInterface {
    /// Every address the ENI holds besides its primary: the secondary addresses, then each prefix's addresses
    /// (all of them: a delegated prefix is the ENI's whole, network and broadcast addresses included).
    pub fn secondary_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.secondary_ips.iter().copied().chain(
            self.prefixes.iter().flat_map(|p| {
                (u32::from(p.network())..=u32::from(p.broadcast())).map(Ipv4Addr::from)
            }),
        )
    }
}

/// Which ENIs to describe; every given field must match. At least one field must be set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EniFilter {
    pub ids: Vec<EniId>,
    pub vpc: Option<VpcId>,
    pub instance: Option<InstanceId>,
    pub status: Option<EniStatus>,
    /// `tag:<key>` = value filters; an empty value matches any value of the key (`tag-key`).
    pub tags: Tags,
}

impl EniFilter {
    pub fn is_unfiltered(&self) -> bool {
        self.ids.is_empty()
            && self.vpc.is_none()
            && self.instance.is_none()
            && self.status.is_none()
            && self.tags.is_empty()
    }
}

/// CreateNetworkInterface's inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateEniRequest {
    pub subnet: SubnetId,
    pub security_groups: Vec<SecurityGroupId>,
    pub description: String,
    pub tags: Tags,
    /// Idempotency token: the same token returns the ENI created the first time.
    pub client_token: String,
    /// Secondary addresses to assign at creation.
    pub secondary_ip_count: u32,
    /// /28 prefixes to delegate at creation.
    pub prefix_count: u32,
}

/// Either let EC2 choose `n` addresses (or prefixes) or ask for explicit ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddressRequest<T> {
    Count(u32),
    Explicit(Vec<T>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str, eni: &str) -> Route {
        Route {
            destination: dst.parse().unwrap(),
            target: RouteTarget::NetworkInterface(EniId::new(eni)),
            state: RouteState::Active,
        }
    }

    #[test]
    fn longest_match_picks_the_most_specific_route_covering_the_whole_destination() {
        let table = RouteTable {
            id: RouteTableId::new("rtb-1"),
            vpc: VpcId::new("vpc-1"),
            main: true,
            subnets: Vec::new(),
            routes: vec![
                route("0.0.0.0/0", "eni-default"),
                route("100.64.0.0/17", "eni-aggregate"),
                route("100.64.0.64/26", "eni-block"),
            ],
            tags: Tags::new(),
        };
        let at = |d: &str| {
            table
                .longest_match(d.parse().unwrap())
                .map(|r| r.target.clone())
        };
        let eni = |e: &str| Some(RouteTarget::NetworkInterface(EniId::new(e)));
        assert_eq!(at("100.64.0.70/32"), eni("eni-block"));
        assert_eq!(at("100.64.0.64/26"), eni("eni-block"));
        // A block wider than the specific route is only wholly covered by the aggregate.
        assert_eq!(at("100.64.0.0/25"), eni("eni-aggregate"));
        assert_eq!(at("100.64.1.5/32"), eni("eni-aggregate"));
        assert_eq!(at("203.0.113.1/32"), eni("eni-default"));
        let empty = RouteTable {
            routes: Vec::new(),
            ..table.clone()
        };
        assert_eq!(empty.longest_match("10.0.0.0/8".parse().unwrap()), None);
    }
}
