//! The fabric's mirror of the region: just what the fabric needs, built from a [`Snapshot`] and kept current
//! by applying vpcsim's [`Change`]s. Pure data; no kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use underlay_cloud::{
    EniId, InstanceId, InstanceState, RouteTableId, RouteTarget, SubnetId, VpcId,
};
use underlay_vpcsim::{Change, Event, Snapshot};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetModel {
    pub vpc: VpcId,
    pub cidr: Ipv4Net,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableModel {
    pub vpc: VpcId,
    pub main: bool,
    /// Explicitly associated subnets.
    pub subnets: BTreeSet<SubnetId>,
    pub routes: BTreeMap<Ipv4Net, RouteTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniModel {
    pub subnet: SubnetId,
    /// Lower-case colon-separated, as EC2 reports it.
    pub mac: String,
    pub primary: Ipv4Addr,
    pub secondaries: BTreeSet<Ipv4Addr>,
    pub prefixes: BTreeSet<Ipv4Net>,
    pub source_dest_check: bool,
    /// Instance and device index while attached.
    pub attachment: Option<(InstanceId, u32)>,
}

impl EniModel {
    /// Every address block this ENI owns: primary and secondaries as /32, and its /28 prefixes.
    pub fn owned(&self) -> Vec<Ipv4Net> {
        std::iter::once(self.primary)
            .chain(self.secondaries.iter().copied())
            .map(|a| Ipv4Net::new(a, 32).expect("/32"))
            .chain(self.prefixes.iter().copied())
            .collect()
    }
}

/// What the fabric knows of the region, and the number of the last change it includes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    pub seq: u64,
    pub vpcs: BTreeMap<VpcId, Vec<Ipv4Net>>,
    pub subnets: BTreeMap<SubnetId, SubnetModel>,
    pub tables: BTreeMap<RouteTableId, TableModel>,
    /// Running instances only (vpcsim launches them running; terminated ones are dropped).
    pub instances: BTreeSet<InstanceId>,
    pub enis: BTreeMap<EniId, EniModel>,
}

/// How a change relates to the model it was applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The change was the next one and is now included.
    Yes,
    /// Already included (its `seq` is at or below the model's).
    Stale,
    /// One or more changes before it were missed: resynchronise from a snapshot.
    Gap,
}

impl Model {
    pub fn from_snapshot(s: &Snapshot) -> Self {
        let mut m = Model {
            seq: s.seq,
            ..Model::default()
        };
        for v in &s.vpcs {
            m.vpcs.insert(v.id.clone(), v.cidrs.clone());
        }
        for sn in &s.subnets {
            m.subnets.insert(
                sn.id.clone(),
                SubnetModel {
                    vpc: sn.vpc.clone(),
                    cidr: sn.cidr,
                },
            );
        }
        for t in &s.route_tables {
            m.tables.insert(
                t.id.clone(),
                TableModel {
                    vpc: t.vpc.clone(),
                    main: t.main,
                    subnets: t.subnets.iter().cloned().collect(),
                    routes: t
                        .routes
                        .iter()
                        .map(|r| (r.destination, r.target.clone()))
                        .collect(),
                },
            );
        }
        for i in &s.instances {
            if i.state == InstanceState::Running {
                m.instances.insert(i.id.clone());
            }
        }
        for e in &s.enis {
            m.enis.insert(
                e.id.clone(),
                EniModel {
                    subnet: e.subnet.clone(),
                    mac: e.mac.clone(),
                    primary: e.primary_ip,
                    secondaries: e.secondary_ips.iter().copied().collect(),
                    prefixes: e.prefixes.iter().copied().collect(),
                    source_dest_check: e.source_dest_check,
                    attachment: e
                        .attachment
                        .as_ref()
                        .map(|a| (a.instance.clone(), a.device_index)),
                },
            );
        }
        m
    }

    /// Applies one change if it is the next one.
    pub fn apply(&mut self, change: &Change) -> Applied {
        if change.seq <= self.seq {
            return Applied::Stale;
        }
        if change.seq != self.seq + 1 {
            return Applied::Gap;
        }
        self.apply_event(&change.event);
        self.seq = change.seq;
        Applied::Yes
    }

    /// Counts a change whose event was already applied out of order ([`Model::apply_route_early`]): the same
    /// numbering checks as [`Model::apply`], without applying the event again.
    pub fn advance(&mut self, change: &Change) -> Applied {
        if change.seq <= self.seq {
            return Applied::Stale;
        }
        if change.seq != self.seq + 1 {
            return Applied::Gap;
        }
        self.seq = change.seq;
        Applied::Yes
    }

    /// Applies a route change ahead of earlier changes still propagating in other tables (the VPC's tables are
    /// independent); `seq` does not move until [`Model::advance`] counts it in order. Other events are ignored.
    pub fn apply_route_early(&mut self, change: &Change) {
        if matches!(change.event, Event::RouteChanged { .. }) && change.seq > self.seq {
            self.apply_event(&change.event);
        }
    }

    fn apply_event(&mut self, event: &Event) {
        match event {
            Event::VpcCreated { vpc, cidr } => {
                self.vpcs.insert(vpc.clone(), vec![*cidr]);
            }
            Event::SubnetCreated {
                subnet, vpc, cidr, ..
            } => {
                self.subnets.insert(
                    subnet.clone(),
                    SubnetModel {
                        vpc: vpc.clone(),
                        cidr: *cidr,
                    },
                );
            }
            Event::RouteTableCreated { table, vpc, main } => {
                // A new table holds the VPC's `local` routes.
                let routes = self
                    .vpcs
                    .get(vpc)
                    .into_iter()
                    .flatten()
                    .map(|c| (*c, RouteTarget::Local))
                    .collect();
                self.tables.insert(
                    table.clone(),
                    TableModel {
                        vpc: vpc.clone(),
                        main: *main,
                        subnets: BTreeSet::new(),
                        routes,
                    },
                );
            }
            Event::RouteTableAssociated { table, subnet } => {
                for t in self.tables.values_mut() {
                    t.subnets.remove(subnet);
                }
                if let Some(t) = self.tables.get_mut(table) {
                    t.subnets.insert(subnet.clone());
                }
            }
            Event::InstanceLaunched { instance, .. } => {
                self.instances.insert(instance.clone());
            }
            Event::InstanceTerminated { instance } => {
                self.instances.remove(instance);
            }
            Event::EniCreated {
                eni,
                subnet,
                mac,
                primary_ip,
            } => {
                self.enis.insert(
                    eni.clone(),
                    EniModel {
                        subnet: subnet.clone(),
                        mac: mac.clone(),
                        primary: *primary_ip,
                        secondaries: BTreeSet::new(),
                        prefixes: BTreeSet::new(),
                        source_dest_check: true,
                        attachment: None,
                    },
                );
            }
            Event::EniAttached {
                eni,
                instance,
                device_index,
                ..
            } => {
                if let Some(e) = self.enis.get_mut(eni) {
                    e.attachment = Some((instance.clone(), *device_index));
                }
            }
            Event::EniDetached { eni, .. } => {
                if let Some(e) = self.enis.get_mut(eni) {
                    e.attachment = None;
                }
            }
            Event::EniDeleted { eni } => {
                self.enis.remove(eni);
            }
            Event::AddressesAssigned { eni, addresses } => {
                if let Some(e) = self.enis.get_mut(eni) {
                    e.secondaries.extend(addresses.iter().copied());
                }
            }
            Event::AddressesUnassigned { eni, addresses } => {
                if let Some(e) = self.enis.get_mut(eni) {
                    for a in addresses {
                        e.secondaries.remove(a);
                    }
                }
            }
            Event::PrefixesAssigned { eni, prefixes } => {
                if let Some(e) = self.enis.get_mut(eni) {
                    e.prefixes.extend(prefixes.iter().copied());
                }
            }
            Event::PrefixesUnassigned { eni, prefixes } => {
                if let Some(e) = self.enis.get_mut(eni) {
                    for p in prefixes {
                        e.prefixes.remove(p);
                    }
                }
            }
            Event::SourceDestCheckChanged { eni, enabled } => {
                if let Some(e) = self.enis.get_mut(eni) {
                    e.source_dest_check = *enabled;
                }
            }
            Event::RouteChanged {
                table,
                destination,
                new,
                ..
            } => {
                if let Some(t) = self.tables.get_mut(table) {
                    match new {
                        Some(target) => {
                            t.routes.insert(*destination, target.clone());
                        }
                        None => {
                            t.routes.remove(destination);
                        }
                    }
                }
            }
        }
    }

    /// The route table a subnet uses: its explicit association, or its VPC's main table.
    pub fn table_of(&self, subnet: &SubnetId) -> Option<&RouteTableId> {
        if let Some((id, _)) = self.tables.iter().find(|(_, t)| t.subnets.contains(subnet)) {
            return Some(id);
        }
        let vpc = &self.subnets.get(subnet)?.vpc;
        self.tables
            .iter()
            .find(|(_, t)| t.main && &t.vpc == vpc)
            .map(|(id, _)| id)
    }

    /// The ENI's attachment, if it is attached to a running instance (the only ENIs the VPC delivers to).
    pub fn live_attachment(&self, eni: &EniId) -> Option<(&InstanceId, u32)> {
        let e = self.enis.get(eni)?;
        let (i, d) = e.attachment.as_ref()?;
        self.instances.contains(i).then_some((i, *d))
    }
}
