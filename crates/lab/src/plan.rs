//! Pure planning: [`plan_fabric`] turns a [`Model`] into the kernel objects the fabric should hold
//! ([`FabricSpec`]), and [`diff`] turns two specs into the ordered [`Op`]s that take one to the other.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use underlay_cloud::{EniId, InstanceId, RouteTarget};
use underlay_core::names::{LAB_RULE_PRIORITY_OWNED, LAB_RULE_PRIORITY_VPC, LAB_TABLE_OWNED};

use crate::model::Model;
use crate::names::{LabId, instance_ifname, vpc_table};

/// The fabric end of the veth to the internet namespace, and the internet end (the IGW's next hop).
pub const IGW_FABRIC_ADDR: Ipv4Net = ipnet_v4(169, 254, 0, 1, 30);
pub const IGW_INTERNET_ADDR: Ipv4Net = ipnet_v4(169, 254, 0, 2, 30);
/// A host on the emulated internet (on the internet namespace's loopback), e.g. a ping target.
pub const INTERNET_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

/// A subnet's router address, as the VPC has it: the first host address (`.1` of a /24).
pub fn subnet_router(cidr: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()) + 1)
}

pub(crate) const fn ipnet_v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    match Ipv4Net::new(Ipv4Addr::new(a, b, c, d), len) {
        Ok(n) => n,
        Err(_) => panic!("invalid constant prefix"),
    }
}

/// A subnet's bridge in the fabric; it holds the subnet's router address (`.1`) as a /32.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSpec {
    pub router: Ipv4Addr,
}

/// An attached ENI: a veth from its subnet's bridge to `ifname` (with the ENI's MAC) in the instance namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub eni: EniId,
    pub bridge: String,
    pub netns: String,
    pub ifname: String,
    pub mac: String,
    /// The ENI's primary address with the subnet's prefix length, configured as the image configures the
    /// primary interface: device index 0 only. A secondary ENI's device comes up bare; in eni mode the
    /// agent puts the address there itself (without a prefix route in `main`).
    pub address: Option<Ipv4Net>,
    /// Default route of the instance, via the subnet router (device index 0 only).
    pub gateway: Option<Ipv4Addr>,
}

/// What a route in a fabric table does.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteAction {
    /// Out of `dev` to whoever owns the destination (neighbour entries give the ENI's MAC).
    Dev { dev: String },
    /// Out of `dev` to `via` (an ENI's primary address, or the internet's end of the IGW link).
    Via { dev: String, via: Ipv4Addr },
    /// Dropped without an answer, as the VPC drops traffic it has nowhere to send.
    Blackhole,
}

/// A policy rule `priority P iif DEV lookup TABLE`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleSpec {
    pub priority: u32,
    pub iif: String,
    pub table: u32,
}

/// The source/dest-check and IGW filter inputs (rendered as one nftables transaction).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftSpec {
    /// Per bridge port: the blocks its ENI owns.
    pub owned: BTreeMap<String, Vec<Ipv4Net>>,
    /// Ports whose ENI has source/dest check on.
    pub checked: BTreeSet<String>,
    /// The IGW link, when the internet is emulated.
    pub igw: Option<String>,
}

/// Everything the fabric should hold for one model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FabricSpec {
    /// Bridge name → bridge.
    pub bridges: BTreeMap<String, BridgeSpec>,
    /// Instance namespaces, by instance.
    pub instances: BTreeMap<InstanceId, String>,
    /// Port name → port.
    pub ports: BTreeMap<String, PortSpec>,
    /// (bridge, address) → MAC: permanent neighbours, also the ARP answers the bridges give.
    pub neighbours: BTreeMap<(String, Ipv4Addr), String>,
    /// (table, destination) → action. Table [`LAB_TABLE_OWNED`] and one table per VPC route table.
    pub routes: BTreeMap<(u32, Ipv4Net), RouteAction>,
    pub rules: BTreeSet<RuleSpec>,
    pub nft: NftSpec,
}

impl FabricSpec {
    /// Routes of one fabric table.
    pub fn table_len(&self, table: u32) -> usize {
        self.routes.keys().filter(|(t, _)| *t == table).count()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Two objects would get the same interface name (their ids share the tail that fits in IFNAMSIZ).
    #[error("interface name {name} would be used by both {a} and {b}")]
    NameClash { name: String, a: String, b: String },
    #[error("VPC route tables {a} and {b} map to the same fabric table {table}")]
    TableClash { table: u32, a: String, b: String },
}

/// The fabric for `model`. `internet`: whether the internet namespace and IGW exist.
pub fn plan_fabric(lab: &LabId, model: &Model, internet: bool) -> Result<FabricSpec, PlanError> {
    let mut spec = FabricSpec::default();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut claim = |name: &str, owner: &str| match names.insert(name.to_owned(), owner.to_owned())
    {
        Some(a) if a != owner => Err(PlanError::NameClash {
            name: name.to_owned(),
            a,
            b: owner.to_owned(),
        }),
        _ => Ok(()),
    };
    let igw = internet.then(|| lab.igw_link());
    if let Some(igw) = &igw {
        claim(igw, "igw")?;
    }

    // VPC route tables → fabric tables.
    let mut table_ids: BTreeMap<u32, String> = BTreeMap::new();
    for id in model.tables.keys() {
        let t = vpc_table(id);
        if let Some(a) = table_ids.insert(t, id.to_string()) {
            return Err(PlanError::TableClash {
                table: t,
                a,
                b: id.to_string(),
            });
        }
    }

    for (id, s) in &model.subnets {
        let bridge = lab.subnet_bridge(id);
        claim(&bridge, id.as_str())?;
        let router = subnet_router(s.cidr);
        spec.bridges.insert(bridge.clone(), BridgeSpec { router });
        spec.rules.insert(RuleSpec {
            priority: LAB_RULE_PRIORITY_OWNED,
            iif: bridge.clone(),
            table: LAB_TABLE_OWNED,
        });
        if let Some(t) = model.table_of(id) {
            spec.rules.insert(RuleSpec {
                priority: LAB_RULE_PRIORITY_VPC,
                iif: bridge,
                table: vpc_table(t),
            });
        }
    }
    // Replies from the fabric itself (the router answering ping, ICMP errors) and return traffic from the
    // internet reach owned addresses only.
    for iif in std::iter::once("lo".to_owned()).chain(igw.clone()) {
        spec.rules.insert(RuleSpec {
            priority: LAB_RULE_PRIORITY_OWNED,
            iif,
            table: LAB_TABLE_OWNED,
        });
    }

    for i in &model.instances {
        spec.instances.insert(i.clone(), lab.instance_netns(i));
    }

    for (id, e) in &model.enis {
        let Some((instance, device_index)) = model.live_attachment(id) else {
            continue;
        };
        let Some(subnet) = model.subnets.get(&e.subnet) else {
            continue;
        };
        let bridge = lab.subnet_bridge(&e.subnet);
        let port = lab.eni_port(id);
        claim(&port, id.as_str())?;
        let router = spec.bridges[&bridge].router;
        spec.ports.insert(
            port.clone(),
            PortSpec {
                eni: id.clone(),
                bridge: bridge.clone(),
                netns: lab.instance_netns(instance),
                ifname: instance_ifname(device_index),
                mac: e.mac.clone(),
                address: (device_index == 0).then(|| {
                    Ipv4Net::new(e.primary, subnet.cidr.prefix_len()).expect("valid prefix")
                }),
                gateway: (device_index == 0).then_some(router),
            },
        );
        for block in e.owned() {
            spec.routes.insert(
                (LAB_TABLE_OWNED, block),
                RouteAction::Dev {
                    dev: bridge.clone(),
                },
            );
            for a in u32::from(block.network())..=u32::from(block.broadcast()) {
                spec.neighbours
                    .insert((bridge.clone(), Ipv4Addr::from(a)), e.mac.clone());
            }
        }
        spec.nft.owned.insert(port.clone(), e.owned());
        if e.source_dest_check {
            spec.nft.checked.insert(port);
        }
    }
    spec.nft.igw = igw.clone();

    for (id, t) in &model.tables {
        let table = vpc_table(id);
        for (dst, target) in &t.routes {
            let action = match target {
                RouteTarget::Local => RouteAction::Blackhole,
                RouteTarget::NetworkInterface(eni) => eni_action(lab, model, eni),
                RouteTarget::Instance(i) => model
                    .enis
                    .iter()
                    .find(|(_, e)| {
                        e.attachment
                            .as_ref()
                            .is_some_and(|(ai, d)| ai == i && *d == 0)
                    })
                    .map(|(eni, _)| eni_action(lab, model, eni))
                    .unwrap_or(RouteAction::Blackhole),
                RouteTarget::Gateway(g) => match &igw {
                    Some(dev) if g.starts_with("igw-") => RouteAction::Via {
                        dev: dev.clone(),
                        via: IGW_INTERNET_ADDR.addr(),
                    },
                    _ => RouteAction::Blackhole,
                },
            };
            spec.routes.insert((table, *dst), action);
        }
    }
    Ok(spec)
}

/// A route to an ENI: via its primary address on its subnet's bridge, or a blackhole when the ENI is not
/// attached to a running instance (EC2 shows such a route as `blackhole`).
fn eni_action(lab: &LabId, model: &Model, eni: &EniId) -> RouteAction {
    match (model.enis.get(eni), model.live_attachment(eni)) {
        (Some(e), Some(_)) => RouteAction::Via {
            dev: lab.subnet_bridge(&e.subnet),
            via: e.primary,
        },
        _ => RouteAction::Blackhole,
    }
}

/// One kernel change. `diff` orders them so that nothing refers to an object that does not exist yet or any
/// more: removals (rules, routes, neighbours, ports, namespaces, bridges), then additions in the reverse order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    DelRule(RuleSpec),
    DelRoute {
        table: u32,
        dst: Ipv4Net,
    },
    DelNeighbour {
        bridge: String,
        ip: Ipv4Addr,
    },
    DelPort {
        name: String,
    },
    DelInstance {
        instance: InstanceId,
        netns: String,
    },
    DelBridge {
        name: String,
    },
    AddBridge {
        name: String,
        spec: BridgeSpec,
    },
    AddInstance {
        instance: InstanceId,
        netns: String,
    },
    AddPort {
        name: String,
        spec: PortSpec,
    },
    /// Add or replace.
    SetNeighbour {
        bridge: String,
        ip: Ipv4Addr,
        mac: String,
    },
    /// Add or replace (a replaced VPC route moves traffic atomically, like ReplaceRoute).
    SetRoute {
        table: u32,
        dst: Ipv4Net,
        action: RouteAction,
    },
    AddRule(RuleSpec),
    /// Replace the whole nftables ruleset of the fabric in one transaction.
    SetNft(NftSpec),
}

/// The ops that take the kernel from `have` to `want`. `diff(x, x)` is empty.
pub fn diff(have: &FabricSpec, want: &FabricSpec) -> Vec<Op> {
    let mut ops = Vec::new();
    // A port whose bridge or namespace is recreated must be recreated too; so must a changed object.
    let bridges_changed: BTreeSet<&String> = have
        .bridges
        .iter()
        .filter(|(n, b)| want.bridges.get(*n) != Some(b))
        .map(|(n, _)| n)
        .collect();
    let ns_gone: BTreeSet<&String> = have
        .instances
        .iter()
        .filter(|(i, n)| want.instances.get(*i) != Some(n))
        .map(|(_, n)| n)
        .collect();
    let port_redo = |n: &String, p: &PortSpec| {
        want.ports.get(n) != Some(p)
            || bridges_changed.contains(&p.bridge)
            || ns_gone.contains(&p.netns)
    };

    for r in have.rules.difference(&want.rules) {
        ops.push(Op::DelRule(r.clone()));
    }
    for (table, dst) in have.routes.keys() {
        if !want.routes.contains_key(&(*table, *dst)) {
            ops.push(Op::DelRoute {
                table: *table,
                dst: *dst,
            });
        }
    }
    for (bridge, ip) in have.neighbours.keys() {
        if !want.neighbours.contains_key(&(bridge.clone(), *ip))
            && !bridges_changed.contains(bridge)
        {
            ops.push(Op::DelNeighbour {
                bridge: bridge.clone(),
                ip: *ip,
            });
        }
    }
    for (n, p) in &have.ports {
        if port_redo(n, p) {
            ops.push(Op::DelPort { name: n.clone() });
        }
    }
    for (i, n) in &have.instances {
        if want.instances.get(i) != Some(n) {
            ops.push(Op::DelInstance {
                instance: i.clone(),
                netns: n.clone(),
            });
        }
    }
    for n in &bridges_changed {
        ops.push(Op::DelBridge { name: (*n).clone() });
    }

    for (n, b) in &want.bridges {
        if have.bridges.get(n) != Some(b) {
            ops.push(Op::AddBridge {
                name: n.clone(),
                spec: b.clone(),
            });
        }
    }
    for (i, n) in &want.instances {
        if have.instances.get(i) != Some(n) {
            ops.push(Op::AddInstance {
                instance: i.clone(),
                netns: n.clone(),
            });
        }
    }
    for (n, p) in &want.ports {
        if have.ports.get(n).is_none_or(|old| port_redo(n, old)) {
            ops.push(Op::AddPort {
                name: n.clone(),
                spec: p.clone(),
            });
        }
    }
    for ((bridge, ip), mac) in &want.neighbours {
        let stale = bridges_changed.contains(bridge)
            || have.neighbours.get(&(bridge.clone(), *ip)) != Some(mac);
        if stale {
            ops.push(Op::SetNeighbour {
                bridge: bridge.clone(),
                ip: *ip,
                mac: mac.clone(),
            });
        }
    }
    for ((table, dst), action) in &want.routes {
        let dev_recreated = match action {
            RouteAction::Dev { dev } | RouteAction::Via { dev, .. } => {
                bridges_changed.contains(dev)
            }
            RouteAction::Blackhole => false,
        };
        if dev_recreated || have.routes.get(&(*table, *dst)) != Some(action) {
            ops.push(Op::SetRoute {
                table: *table,
                dst: *dst,
                action: action.clone(),
            });
        }
    }
    // Rules match `iif` by name, so they survive a recreated bridge and need no redo.
    for r in &want.rules {
        if !have.rules.contains(r) {
            ops.push(Op::AddRule(r.clone()));
        }
    }
    if have.nft != want.nft {
        ops.push(Op::SetNft(want.nft.clone()));
    }
    ops
}

/// Records a successfully applied op in `have`, so that `have` always describes what the kernel holds.
pub fn record(have: &mut FabricSpec, op: &Op) {
    match op {
        Op::DelRule(r) => {
            have.rules.remove(r);
        }
        Op::DelRoute { table, dst } => {
            have.routes.remove(&(*table, *dst));
        }
        Op::DelNeighbour { bridge, ip } => {
            have.neighbours.remove(&(bridge.clone(), *ip));
        }
        Op::DelPort { name } => {
            have.ports.remove(name);
        }
        Op::DelInstance { instance, netns } => {
            have.instances.remove(instance);
            have.ports.retain(|_, p| &p.netns != netns);
        }
        Op::DelBridge { name } => {
            // The kernel removes the bridge's routes, neighbours and rules' matches with it.
            have.bridges.remove(name);
            have.neighbours.retain(|(b, _), _| b != name);
            have.routes.retain(|_, a| match a {
                RouteAction::Dev { dev } | RouteAction::Via { dev, .. } => dev != name,
                RouteAction::Blackhole => true,
            });
            have.ports.retain(|_, p| &p.bridge != name);
        }
        Op::AddBridge { name, spec } => {
            have.bridges.insert(name.clone(), spec.clone());
        }
        Op::AddInstance { instance, netns } => {
            have.instances.insert(instance.clone(), netns.clone());
        }
        Op::AddPort { name, spec } => {
            have.ports.insert(name.clone(), spec.clone());
        }
        Op::SetNeighbour { bridge, ip, mac } => {
            have.neighbours.insert((bridge.clone(), *ip), mac.clone());
        }
        Op::SetRoute { table, dst, action } => {
            have.routes.insert((*table, *dst), action.clone());
        }
        Op::AddRule(r) => {
            have.rules.insert(r.clone());
        }
        Op::SetNft(n) => have.nft = n.clone(),
    }
}
