//! The describable state of the simulated region: VPCs, subnets (with address accounting), route tables,
//! instances, ENIs. Plain data, cloned for eventual-consistency snapshots; every rule that only reads lives here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};
use underlay_cloud::{
    AttachmentId, CloudError, EniFilter, EniId, Instance, InstanceFilter, InstanceId,
    InstanceState, NetworkInterface, Result, Route, RouteState, RouteTable, RouteTableId,
    RouteTarget, SecurityGroupId, Subnet, SubnetId, Tags, Vpc, VpcId,
};

/// Addresses AWS keeps in every subnet: network, router (+1), DNS (+2), future use (+3), and broadcast (last).
pub const RESERVED_PER_SUBNET: u32 = 5;
/// Size of a delegated IPv4 prefix.
pub const PREFIX_LEN: u8 = 28;
const PREFIX_SIZE: u32 = 16;

/// How the simulator picks addresses when the caller asks for a count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddressOrder {
    /// Seeded random choice, as AWS appears to do: secondaries scatter and fragment the /28 space.
    #[default]
    Random,
    /// Lowest free address first: compact, easy to read in tests.
    Lowest,
}

pub(crate) fn err(code: &str, message: impl Into<String>) -> CloudError {
    CloudError::from_code(code, message)
}

/// One subnet with its address accounting. `used` holds offsets from the network address.
#[derive(Debug, Clone)]
pub(crate) struct SubnetState {
    pub id: SubnetId,
    pub vpc: VpcId,
    pub zone: String,
    pub cidr: Ipv4Net,
    pub tags: Tags,
    used: BTreeSet<u32>,
}

impl SubnetState {
    pub fn new(id: SubnetId, vpc: VpcId, zone: String, cidr: Ipv4Net) -> Self {
        Self {
            id,
            vpc,
            zone,
            cidr,
            tags: Tags::new(),
            used: BTreeSet::new(),
        }
    }

    fn size(&self) -> u32 {
        1u32 << (32 - self.cidr.prefix_len())
    }

    fn is_reserved(&self, offset: u32) -> bool {
        offset < 4 || offset == self.size() - 1
    }

    /// Free addresses, as DescribeSubnets' `AvailableIpAddressCount` reports them.
    pub fn available(&self) -> u32 {
        self.size() - RESERVED_PER_SUBNET - self.used.len() as u32
    }

    fn offset(&self, ip: Ipv4Addr) -> Option<u32> {
        self.cidr
            .contains(&ip)
            .then(|| u32::from(ip) - u32::from(self.cidr.network()))
    }

    fn addr(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr.network()) + offset)
    }

    pub fn view(&self) -> Subnet {
        Subnet {
            id: self.id.clone(),
            vpc: self.vpc.clone(),
            zone: self.zone.clone(),
            cidr: self.cidr,
            available_ips: self.available(),
            tags: self.tags.clone(),
        }
    }

    /// Check that `ip` could be taken (in range, not reserved, not used) without taking it.
    pub fn check_free(&self, ip: Ipv4Addr) -> Result<()> {
        let Some(off) = self.offset(ip) else {
            return Err(err(
                "InvalidParameterValue",
                format!(
                    "Address {ip} does not fall within the subnet's address range ({})",
                    self.cidr
                ),
            ));
        };
        if self.is_reserved(off) {
            return Err(err(
                "InvalidParameterValue",
                format!("Address {ip} is in subnet's reserved address range"),
            ));
        }
        if self.used.contains(&off) {
            return Err(err(
                "InvalidIPAddress.InUse",
                format!("The specified address {ip} is already in use"),
            ));
        }
        Ok(())
    }

    /// Take an explicit address (caller checked it with [`Self::check_free`]).
    pub fn take(&mut self, ip: Ipv4Addr) {
        let off = self.offset(ip).expect("checked address");
        self.used.insert(off);
    }

    /// Take `n` addresses the simulator chooses, or fail without taking any.
    pub fn take_any(
        &mut self,
        n: u32,
        rng: &mut StdRng,
        order: AddressOrder,
    ) -> Result<Vec<Ipv4Addr>> {
        if self.available() < n {
            return Err(err(
                "InsufficientFreeAddressesInSubnet",
                format!(
                    "The specified subnet {} does not have enough free addresses to satisfy the request.",
                    self.id
                ),
            ));
        }
        let (first, last) = (4, self.size() - 2);
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let start = match order {
                AddressOrder::Random => rng.random_range(first..=last),
                AddressOrder::Lowest => first,
            };
            // Scan forward from `start`, wrapping once; a free slot exists because available() >= n.
            let off = (start..=last)
                .chain(first..start)
                .find(|o| !self.used.contains(o))
                .expect("a free address exists");
            self.used.insert(off);
            out.push(self.addr(off));
        }
        Ok(out)
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        if let Some(off) = self.offset(ip) {
            self.used.remove(&off);
        }
    }

    fn block_free(&self, start: u32) -> bool {
        !(start..start + PREFIX_SIZE).any(|o| self.is_reserved(o))
            && self.used.range(start..start + PREFIX_SIZE).next().is_none()
    }

    /// Check an explicit /28 could be delegated from this subnet.
    pub fn check_prefix_free(&self, prefix: Ipv4Net) -> Result<()> {
        if prefix.prefix_len() != PREFIX_LEN || prefix.trunc() != prefix {
            return Err(err(
                "InvalidParameterValue",
                format!("{prefix} is not a valid /28 IPv4 prefix"),
            ));
        }
        let Some(start) = self
            .offset(prefix.network())
            .filter(|_| self.cidr.contains(&prefix))
        else {
            return Err(err(
                "InvalidParameterValue",
                format!(
                    "Prefix {prefix} does not fall within the subnet's address range ({})",
                    self.cidr
                ),
            ));
        };
        if !self.block_free(start) {
            return Err(err(
                "InvalidIPAddress.InUse",
                format!("Some addresses of prefix {prefix} are reserved or already in use"),
            ));
        }
        Ok(())
    }

    pub fn take_prefix(&mut self, prefix: Ipv4Net) {
        let start = self.offset(prefix.network()).expect("checked prefix");
        self.used.extend(start..start + PREFIX_SIZE);
    }

    /// Delegate `n` /28 prefixes the simulator chooses. A prefix needs an aligned run of 16 addresses of which
    /// none is reserved or used, so a fragmented subnet can fail (`InsufficientCidrBlocks`) while it still has
    /// plenty of free addresses, as in AWS.
    pub fn take_any_prefixes(
        &mut self,
        n: u32,
        rng: &mut StdRng,
        order: AddressOrder,
    ) -> Result<Vec<Ipv4Net>> {
        let candidates: Vec<u32> = (0..self.size() / PREFIX_SIZE)
            .map(|b| b * PREFIX_SIZE)
            .filter(|&s| self.block_free(s))
            .collect();
        if (candidates.len() as u32) < n {
            return Err(err(
                "InsufficientCidrBlocks",
                format!(
                    "The specified subnet {} does not have enough free cidr blocks to satisfy the request \
                     ({} free addresses, {} free aligned /28 blocks).",
                    self.id,
                    self.available(),
                    candidates.len()
                ),
            ));
        }
        let mut chosen: Vec<u32> = match order {
            AddressOrder::Random => candidates
                .choose_multiple(rng, n as usize)
                .copied()
                .collect(),
            AddressOrder::Lowest => candidates[..n as usize].to_vec(),
        };
        chosen.sort_unstable();
        Ok(chosen
            .into_iter()
            .map(|s| {
                self.used.extend(s..s + PREFIX_SIZE);
                Ipv4Net::new(self.addr(s), PREFIX_LEN).expect("valid /28")
            })
            .collect())
    }

    pub fn release_prefix(&mut self, prefix: Ipv4Net) {
        if let Some(start) = self.offset(prefix.network()) {
            for o in start..start + PREFIX_SIZE {
                self.used.remove(&o);
            }
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct VpcState {
    pub id: VpcId,
    pub cidrs: Vec<Ipv4Net>,
    pub tags: Tags,
    pub main_route_table: RouteTableId,
    pub default_security_group: SecurityGroupId,
}

#[derive(Debug, Clone)]
pub(crate) struct RouteTableState {
    pub id: RouteTableId,
    pub vpc: VpcId,
    pub main: bool,
    pub subnets: Vec<SubnetId>,
    pub routes: BTreeMap<Ipv4Net, RouteTarget>,
    pub tags: Tags,
    /// Routes this table may hold, `local` routes not counted.
    pub limit: usize,
}

impl RouteTableState {
    pub fn counted_routes(&self) -> usize {
        self.routes
            .values()
            .filter(|t| **t != RouteTarget::Local)
            .count()
    }
}

#[derive(Debug, Clone)]
pub(crate) struct InstanceRecord {
    pub id: InstanceId,
    pub instance_type: String,
    pub state: InstanceState,
    pub vpc: VpcId,
    pub subnet: SubnetId,
    pub zone: String,
    pub private_ip: Ipv4Addr,
    pub tags: Tags,
    /// Attached ENIs by device index.
    pub enis: BTreeMap<u32, EniId>,
}

#[derive(Debug, Clone)]
pub(crate) struct SecurityGroupRecord {
    pub vpc: VpcId,
    pub tags: Tags,
}

/// Everything a describe can see.
#[derive(Debug, Clone, Default)]
pub(crate) struct State {
    pub vpcs: BTreeMap<VpcId, VpcState>,
    pub subnets: BTreeMap<SubnetId, SubnetState>,
    pub route_tables: BTreeMap<RouteTableId, RouteTableState>,
    pub instances: BTreeMap<InstanceId, InstanceRecord>,
    pub enis: BTreeMap<EniId, NetworkInterface>,
    pub attachments: BTreeMap<AttachmentId, EniId>,
    pub security_groups: BTreeMap<SecurityGroupId, SecurityGroupRecord>,
    /// Internet, NAT and other gateways by id, with their VPC.
    pub gateways: BTreeMap<String, VpcId>,
}

fn not_found(code: &str, what: &str, id: &str) -> CloudError {
    err(code, format!("The {what} ID '{id}' does not exist"))
}

impl State {
    pub fn vpc(&self, id: &VpcId) -> Result<&VpcState> {
        self.vpcs
            .get(id)
            .ok_or_else(|| not_found("InvalidVpcID.NotFound", "vpc", id.as_str()))
    }
    pub fn subnet(&self, id: &SubnetId) -> Result<&SubnetState> {
        self.subnets
            .get(id)
            .ok_or_else(|| not_found("InvalidSubnetID.NotFound", "subnet", id.as_str()))
    }
    pub fn subnet_mut(&mut self, id: &SubnetId) -> Result<&mut SubnetState> {
        self.subnets
            .get_mut(id)
            .ok_or_else(|| not_found("InvalidSubnetID.NotFound", "subnet", id.as_str()))
    }
    pub fn route_table(&self, id: &RouteTableId) -> Result<&RouteTableState> {
        self.route_tables
            .get(id)
            .ok_or_else(|| not_found("InvalidRouteTableID.NotFound", "routeTable", id.as_str()))
    }
    pub fn route_table_mut(&mut self, id: &RouteTableId) -> Result<&mut RouteTableState> {
        self.route_tables
            .get_mut(id)
            .ok_or_else(|| not_found("InvalidRouteTableID.NotFound", "routeTable", id.as_str()))
    }
    pub fn eni(&self, id: &EniId) -> Result<&NetworkInterface> {
        self.enis.get(id).ok_or_else(|| {
            not_found(
                "InvalidNetworkInterfaceID.NotFound",
                "networkInterface",
                id.as_str(),
            )
        })
    }
    pub fn eni_mut(&mut self, id: &EniId) -> Result<&mut NetworkInterface> {
        self.enis.get_mut(id).ok_or_else(|| {
            not_found(
                "InvalidNetworkInterfaceID.NotFound",
                "networkInterface",
                id.as_str(),
            )
        })
    }
    /// A live (not terminated) instance.
    pub fn instance(&self, id: &InstanceId) -> Result<&InstanceRecord> {
        self.instances
            .get(id)
            .filter(|i| i.state != InstanceState::Terminated)
            .ok_or_else(|| not_found("InvalidInstanceID.NotFound", "instance", id.as_str()))
    }

    fn route_state(&self, target: &RouteTarget) -> RouteState {
        let active = match target {
            RouteTarget::Local => true,
            RouteTarget::Gateway(g) => self.gateways.contains_key(g),
            RouteTarget::Instance(i) => self
                .instances
                .get(i)
                .is_some_and(|i| i.state == InstanceState::Running),
            RouteTarget::NetworkInterface(e) => self
                .enis
                .get(e)
                .and_then(|e| e.attachment.as_ref())
                .and_then(|a| self.instances.get(&a.instance))
                .is_some_and(|i| i.state == InstanceState::Running),
        };
        if active {
            RouteState::Active
        } else {
            RouteState::Blackhole
        }
    }

    pub fn route_table_view(&self, t: &RouteTableState) -> RouteTable {
        let mut routes: Vec<Route> = t
            .routes
            .iter()
            .map(|(d, target)| Route {
                destination: *d,
                target: target.clone(),
                state: self.route_state(target),
            })
            .collect();
        // `local` first, as EC2 lists it.
        routes.sort_by_key(|r| r.target != RouteTarget::Local);
        RouteTable {
            id: t.id.clone(),
            vpc: t.vpc.clone(),
            main: t.main,
            subnets: t.subnets.clone(),
            routes,
            tags: t.tags.clone(),
        }
    }

    pub fn instance_view(&self, i: &InstanceRecord) -> Instance {
        Instance {
            id: i.id.clone(),
            instance_type: i.instance_type.clone(),
            state: i.state,
            vpc: i.vpc.clone(),
            subnet: i.subnet.clone(),
            zone: i.zone.clone(),
            private_ip: i.private_ip,
            enis: i
                .enis
                .values()
                .filter_map(|e| self.enis.get(e).cloned())
                .collect(),
            tags: i.tags.clone(),
        }
    }

    // ---- describes -------------------------------------------------------------------------------------

    pub fn describe_vpc(&self, id: &VpcId) -> Result<Vpc> {
        let v = self.vpc(id)?;
        Ok(Vpc {
            id: v.id.clone(),
            cidrs: v.cidrs.clone(),
            tags: v.tags.clone(),
        })
    }

    pub fn describe_subnets(&self, vpc: &VpcId) -> Vec<Subnet> {
        self.subnets
            .values()
            .filter(|s| &s.vpc == vpc)
            .map(SubnetState::view)
            .collect()
    }

    pub fn describe_route_tables(&self, vpc: &VpcId) -> Vec<RouteTable> {
        self.route_tables
            .values()
            .filter(|t| &t.vpc == vpc)
            .map(|t| self.route_table_view(t))
            .collect()
    }

    pub fn describe_instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>> {
        for id in &filter.ids {
            if !self.instances.contains_key(id) {
                return Err(not_found(
                    "InvalidInstanceID.NotFound",
                    "instance",
                    id.as_str(),
                ));
            }
        }
        Ok(self
            .instances
            .values()
            .filter(|i| i.state != InstanceState::Terminated)
            .filter(|i| filter.ids.is_empty() || filter.ids.contains(&i.id))
            .filter(|i| filter.vpc.as_ref().is_none_or(|v| v == &i.vpc))
            .map(|i| self.instance_view(i))
            .collect())
    }

    pub fn describe_enis(&self, filter: &EniFilter) -> Result<Vec<NetworkInterface>> {
        for id in &filter.ids {
            self.eni(id)?;
        }
        Ok(self
            .enis
            .values()
            .filter(|e| filter.ids.is_empty() || filter.ids.contains(&e.id))
            .filter(|e| filter.vpc.as_ref().is_none_or(|v| v == &e.vpc))
            .filter(|e| {
                filter
                    .instance
                    .as_ref()
                    .is_none_or(|i| e.attachment.as_ref().is_some_and(|a| &a.instance == i))
            })
            .filter(|e| filter.status.is_none_or(|s| s == e.status))
            .filter(|e| {
                filter.tags.iter().all(|(k, v)| match e.tags.get(k) {
                    Some(have) => v.is_empty() || have == v,
                    None => false,
                })
            })
            .cloned()
            .collect())
    }

    /// Tags of any resource by id, for CreateTags.
    pub fn tags_mut(&mut self, id: &str) -> Result<&mut Tags> {
        let missing = || {
            let (code, what) = match id.split('-').next().unwrap_or("") {
                "vpc" => ("InvalidVpcID.NotFound", "vpc"),
                "subnet" => ("InvalidSubnetID.NotFound", "subnet"),
                "rtb" => ("InvalidRouteTableID.NotFound", "routeTable"),
                "i" => ("InvalidInstanceID.NotFound", "instance"),
                "eni" => ("InvalidNetworkInterfaceID.NotFound", "networkInterface"),
                "sg" => ("InvalidGroup.NotFound", "security group"),
                _ => ("InvalidID", "resource"),
            };
            not_found(code, what, id)
        };
        let tags = if let Some(v) = self.vpcs.get_mut(&VpcId::from(id)) {
            &mut v.tags
        } else if let Some(s) = self.subnets.get_mut(&SubnetId::from(id)) {
            &mut s.tags
        } else if let Some(t) = self.route_tables.get_mut(&RouteTableId::from(id)) {
            &mut t.tags
        } else if let Some(i) = self
            .instances
            .get_mut(&InstanceId::from(id))
            .filter(|i| i.state != InstanceState::Terminated)
        {
            &mut i.tags
        } else if let Some(e) = self.enis.get_mut(&EniId::from(id)) {
            &mut e.tags
        } else if let Some(g) = self.security_groups.get_mut(&SecurityGroupId::from(id)) {
            &mut g.tags
        } else {
            return Err(missing());
        };
        Ok(tags)
    }
}
