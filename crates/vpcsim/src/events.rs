//! Change events: what the lab needs to keep its emulated fabric in step with the simulated region.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use underlay_cloud::{AttachmentId, EniId, InstanceId, RouteTableId, RouteTarget, SubnetId, VpcId};

/// One change, numbered. `seq` increases by one per change; [`crate::Snapshot::seq`] is the last change a
/// snapshot includes, so a subscriber that lagged can take a snapshot and skip changes with `seq <= snapshot.seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub seq: u64,
    pub event: Event,
    /// When the change was made (on tokio's clock). Not serialized.
    #[serde(skip)]
    pub at: Option<Instant>,
    /// When the data plane carries it: `at` plus the modelled propagation for a route change
    /// ([`crate::Faults::route_propagation`]), `at` for everything else. A fabric applies the change no sooner,
    /// and keeps the order of changes (a later change waits for an earlier one). Not serialized.
    #[serde(skip)]
    pub effective_at: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum Event {
    VpcCreated {
        vpc: VpcId,
        cidr: Ipv4Net,
    },
    SubnetCreated {
        subnet: SubnetId,
        vpc: VpcId,
        zone: String,
        cidr: Ipv4Net,
    },
    RouteTableCreated {
        table: RouteTableId,
        vpc: VpcId,
        main: bool,
    },
    /// `subnet` now uses `table`.
    RouteTableAssociated {
        table: RouteTableId,
        subnet: SubnetId,
    },
    InstanceLaunched {
        instance: InstanceId,
        instance_type: String,
        subnet: SubnetId,
        private_ip: Ipv4Addr,
    },
    /// Sent after the instance's ENIs were detached or deleted (their own events come first).
    InstanceTerminated {
        instance: InstanceId,
    },
    EniCreated {
        eni: EniId,
        subnet: SubnetId,
        mac: String,
        primary_ip: Ipv4Addr,
    },
    EniAttached {
        eni: EniId,
        attachment: AttachmentId,
        instance: InstanceId,
        device_index: u32,
        mac: String,
        subnet: SubnetId,
    },
    EniDetached {
        eni: EniId,
        instance: InstanceId,
        device_index: u32,
    },
    /// The ENI and every address it held are gone.
    EniDeleted {
        eni: EniId,
    },
    AddressesAssigned {
        eni: EniId,
        addresses: Vec<Ipv4Addr>,
    },
    AddressesUnassigned {
        eni: EniId,
        addresses: Vec<Ipv4Addr>,
    },
    PrefixesAssigned {
        eni: EniId,
        prefixes: Vec<Ipv4Net>,
    },
    PrefixesUnassigned {
        eni: EniId,
        prefixes: Vec<Ipv4Net>,
    },
    SourceDestCheckChanged {
        eni: EniId,
        enabled: bool,
    },
    /// A route was created (`old` = None), replaced, or deleted (`new` = None).
    RouteChanged {
        table: RouteTableId,
        destination: Ipv4Net,
        old: Option<RouteTarget>,
        new: Option<RouteTarget>,
    },
}
