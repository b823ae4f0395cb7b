//! `eni` mode on one node: the record the agent converges to ([`EniNodeSpec`]), what it observed
//! ([`EniObserved`]), and the pure plan between them ([`plan_eni`] → [`EniOp`]s), plus the IPAM pool the
//! record yields ([`pool_addresses`]).
//!
//! ```text
//!   UnderlayNode status.pool.enis ──► EniNodeSpec ──┐
//!   kernel: links (by MAC), ENI tables, sysctls, nft ──► EniObserved ──► plan_eni ──► EniPlan { devices, ops }
//!                                                                                       │
//!   devices (ENI id → device) + spec ──► pool_addresses ──► PoolSpec::Addresses ──► IPAM (egress = device, table)
//! ```
//!
//! Policy routing, per pod address `P` of ENI `k` (device index `k`, table `ENI_ROUTE_TABLE_BASE + k`):
//!
//! ```text
//!   512   to P lookup main          (underlay-cni)  traffic to a pod: the host route to its veth
//!   1536  from P lookup <table k>   (underlay-cni)  traffic from a pod: the ENI that owns P
//!   table k: <subnet> dev <eni k> scope link
//!            <each VPC CIDR> via <subnet gateway> dev <eni k> onlink
//!            default via <subnet gateway> dev <eni k> onlink     only with external SNAT
//! ```
//!
//! Without external SNAT, table `k` has no default route: a lookup for a destination outside the VPC finds
//! nothing there and falls through to `main`, so the packet leaves by the primary interface, where the
//! `inet underlay` table rewrites its source to the node IP (the address the primary ENI owns).
//!
//! A secondary ENI's device (`k > 0`) carries the ENI's own primary IP with the subnet's prefix length, added
//! with `noprefixroute`: ARP for the subnet gateway and anything the node originates there use an address that
//! ENI owns, and `main` gets no `<subnet> dev <eni k>` route (which would send the node's own traffic to the
//! subnet out of a secondary ENI); pods reach their subnet through table `k` as before.
//!
//! Ownership: every route in tables `ENI_ROUTE_TABLE_BASE ..= ENI_ROUTE_TABLE_BASE + ENI_MAX_DEVICE_INDEX`, the
//! link state (up, MTU) of secondary ENIs' devices, the address on a secondary ENI's device equal to that ENI's
//! primary IP (added when missing, never removed: it goes with the device), the sysctls of [`wanted_sysctls`], the `inet underlay` table.
//! The primary interface (device index 0) is only read: its addresses, link state and MTU are the host's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::ipam::PoolAddress;
use crate::names;
use crate::nft::{AddrMatch, Chain, ChainType, Hook, ObservedNft, Rule, Ruleset, Verdict};

/// One ENI of the node record: the device to find (by MAC) and the pod addresses it owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEni {
    pub id: String,
    pub device_index: u32,
    /// Lower-case `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub subnet_cidr: Ipv4Net,
    /// The ENI's own primary private IP: put on the device of a secondary ENI (device index > 0).
    #[serde(default)]
    pub primary_ip: Option<Ipv4Addr>,
    /// Secondary private IPs (never the ENI's primary address).
    #[serde(default)]
    pub addresses: Vec<Ipv4Addr>,
    /// Delegated prefixes (/28 on EC2); every address in them is a pod address.
    #[serde(default)]
    pub prefixes: Vec<Ipv4Net>,
}

/// The `eni`-mode record of one node: everything its agent needs to converge the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EniNodeSpec {
    pub node: String,
    pub node_ip: Ipv4Addr,
    /// The VPC's address ranges: traffic to them keeps its pod source and leaves by the pod's ENI.
    pub vpc_cidrs: Vec<Ipv4Net>,
    /// Source NAT of off-VPC traffic is done outside the node (a NAT gateway): pods' traffic to anywhere
    /// leaves by their ENI with their own address.
    #[serde(default)]
    pub external_snat: bool,
    /// MTU of secondary ENI devices (and of pods).
    pub mtu: u32,
    pub enis: Vec<NodeEni>,
}

/// A node record that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EniSpecError {
    #[error("the record lists no VPC CIDR")]
    NoVpcCidr,
    #[error("ENI {eni}: MAC {mac:?} is not of the form aa:bb:cc:dd:ee:ff")]
    Mac { eni: String, mac: String },
    #[error(
        "ENI {eni}: device index {index} is above {}",
        names::ENI_MAX_DEVICE_INDEX
    )]
    DeviceIndex { eni: String, index: u32 },
    #[error("ENIs {0} and {1} share a device index or a MAC")]
    Duplicate(String, String),
    #[error("ENI {eni}: {what} {value} is outside its subnet {subnet}")]
    OutsideSubnet {
        eni: String,
        what: &'static str,
        value: String,
        subnet: Ipv4Net,
    },
    #[error(
        "ENI {eni}: prefix {prefix} is not a /{DELEGATED_PREFIX_LEN} (EC2 delegates only those)"
    )]
    PrefixLength { eni: String, prefix: Ipv4Net },
    #[error("pod address {0} is listed more than once")]
    AddressTwice(Ipv4Addr),
    #[error("the node IP {0} is listed as a pod address")]
    NodeIpAsPod(Ipv4Addr),
    #[error("the primary IP {address} of ENI {eni} is listed as a pod address")]
    PrimaryAsPod { eni: String, address: Ipv4Addr },
}

/// Length of the IPv4 prefixes EC2 delegates to an ENI: every one is a /28 (16 pod addresses).
pub const DELEGATED_PREFIX_LEN: u8 = 28;

/// Parses `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Formats a MAC the way the record and `ip link` write it.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The routing table of the ENI with device index `device_index`.
pub fn route_table(device_index: u32) -> u32 {
    names::ENI_ROUTE_TABLE_BASE + device_index
}

/// True for the tables the agent owns in `eni` mode.
pub fn is_eni_table(table: u32) -> bool {
    (names::ENI_ROUTE_TABLE_BASE..=names::ENI_ROUTE_TABLE_BASE + names::ENI_MAX_DEVICE_INDEX)
        .contains(&table)
}

/// The VPC router of a subnet: its network address plus one (AWS reserves it in every subnet).
pub fn subnet_gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1))
}

impl NodeEni {
    /// The address a secondary ENI's device carries: its primary IP with the subnet's prefix length. `None`
    /// for the primary ENI (the host's own) and when the record does not give the primary IP.
    pub fn device_address(&self) -> Option<Ipv4Net> {
        if self.device_index == 0 {
            return None;
        }
        self.primary_ip.map(|ip| {
            Ipv4Net::new(ip, self.subnet_cidr.prefix_len()).expect("a subnet's length is valid")
        })
    }

    /// Every pod address of the ENI: secondaries, then each prefix's addresses, in order.
    pub fn pod_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.addresses
            .iter()
            .copied()
            .chain(self.prefixes.iter().flat_map(|p| p.hosts_all()))
    }
}

/// Every address of a prefix, network and broadcast included (pods get /32s; nothing is on-link).
trait HostsAll {
    fn hosts_all(&self) -> Box<dyn Iterator<Item = Ipv4Addr>>;
}

impl HostsAll for Ipv4Net {
    fn hosts_all(&self) -> Box<dyn Iterator<Item = Ipv4Addr>> {
        let first = u32::from(self.network());
        let last = u32::from(self.broadcast());
        Box::new((first..=last).map(Ipv4Addr::from))
    }
}

impl EniNodeSpec {
    /// Checks the record for contradictions the kernel would accept silently.
    pub fn validate(&self) -> Result<(), EniSpecError> {
        if self.vpc_cidrs.is_empty() {
            return Err(EniSpecError::NoVpcCidr);
        }
        let mut seen: BTreeSet<Ipv4Addr> = BTreeSet::new();
        for (i, e) in self.enis.iter().enumerate() {
            if parse_mac(&e.mac).is_none() {
                return Err(EniSpecError::Mac {
                    eni: e.id.clone(),
                    mac: e.mac.clone(),
                });
            }
            if e.device_index > names::ENI_MAX_DEVICE_INDEX {
                return Err(EniSpecError::DeviceIndex {
                    eni: e.id.clone(),
                    index: e.device_index,
                });
            }
            if let Some(o) = self.enis[..i]
                .iter()
                .find(|o| o.device_index == e.device_index || o.mac.eq_ignore_ascii_case(&e.mac))
            {
                return Err(EniSpecError::Duplicate(o.id.clone(), e.id.clone()));
            }
            let outside = |what, value: String| EniSpecError::OutsideSubnet {
                eni: e.id.clone(),
                what,
                value,
                subnet: e.subnet_cidr,
            };
            if let Some(p) = e.primary_ip.filter(|p| !e.subnet_cidr.contains(p)) {
                return Err(outside("primary IP", p.to_string()));
            }
            if let Some(a) = e.addresses.iter().find(|a| !e.subnet_cidr.contains(*a)) {
                return Err(outside("address", a.to_string()));
            }
            if let Some(p) = e.prefixes.iter().find(|p| !e.subnet_cidr.contains(*p)) {
                return Err(outside("prefix", p.to_string()));
            }
            // Before the addresses are expanded: a /0 would be four billion of them.
            if let Some(p) = e
                .prefixes
                .iter()
                .find(|p| p.prefix_len() != DELEGATED_PREFIX_LEN)
            {
                return Err(EniSpecError::PrefixLength {
                    eni: e.id.clone(),
                    prefix: *p,
                });
            }
            for a in e.pod_addresses() {
                if a == self.node_ip {
                    return Err(EniSpecError::NodeIpAsPod(a));
                }
                if let Some(o) = self.enis.iter().find(|o| o.primary_ip == Some(a)) {
                    return Err(EniSpecError::PrimaryAsPod {
                        eni: o.id.clone(),
                        address: a,
                    });
                }
                if !seen.insert(a) {
                    return Err(EniSpecError::AddressTwice(a));
                }
            }
        }
        Ok(())
    }

    /// The VPC CIDRs, merged (overlaps and adjacent ranges folded, as nft sets need).
    pub fn inside_cidrs(&self) -> Vec<Ipv4Net> {
        Ipv4Net::aggregate(&self.vpc_cidrs)
    }

    /// Every pod address and prefix of the record, merged: the sources the SNAT rule matches.
    pub fn pod_sources(&self) -> Vec<Ipv4Net> {
        let nets: Vec<Ipv4Net> = self
            .enis
            .iter()
            .flat_map(|e| {
                e.addresses
                    .iter()
                    .map(|a| Ipv4Net::new(*a, 32).expect("a /32 is valid"))
                    .chain(e.prefixes.iter().map(|p| p.trunc()))
            })
            .collect();
        Ipv4Net::aggregate(&nets)
    }

    /// Number of pod addresses the record gives the node.
    pub fn pool_size(&self) -> usize {
        self.enis.iter().map(|e| e.pod_addresses().count()).sum()
    }
}

/// The IPAM pool of a record: every pod address of every ENI whose device was found (`devices`: ENI id →
/// device name), tied to that device and the ENI's table, ordered by device index. Addresses of an ENI
/// whose device has not appeared yet are left out until it does.
pub fn pool_addresses(spec: &EniNodeSpec, devices: &BTreeMap<String, String>) -> Vec<PoolAddress> {
    let mut enis: Vec<&NodeEni> = spec.enis.iter().collect();
    enis.sort_by_key(|e| e.device_index);
    enis.into_iter()
        .filter_map(|e| devices.get(&e.id).map(|dev| (e, dev)))
        .flat_map(|(e, dev)| {
            e.pod_addresses().map(move |address| PoolAddress {
                address,
                egress_interface: dev.clone(),
                route_table: route_table(e.device_index),
            })
        })
        .collect()
}

/// A network device as observed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedDevice {
    pub name: String,
    /// Lower-case `aa:bb:cc:dd:ee:ff`; `None` for devices without one.
    pub mac: Option<String>,
    pub mtu: u32,
    pub up: bool,
}

/// A route in one of the agent's ENI tables, as observed or wanted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TableRoute {
    pub table: u32,
    pub destination: Ipv4Net,
    /// `None`: a link route (`scope link`); else `via <gateway> onlink`.
    pub via: Option<Ipv4Addr>,
    pub dev: Option<String>,
}

/// What the agent read from the node before planning.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EniObserved {
    pub devices: Vec<ObservedDevice>,
    /// Current value of each sysctl the plan compares (those that could be read).
    pub sysctls: BTreeMap<String, String>,
    /// Every IPv4 route in the ENI tables ([`is_eni_table`]).
    pub routes: Vec<TableRoute>,
    /// IPv4 addresses (with prefix length) per device name, for the devices that carry any.
    #[serde(default)]
    pub addresses: BTreeMap<String, Vec<Ipv4Net>>,
    /// The `inet underlay` table, if it exists.
    pub nft: Option<ObservedNft>,
}

/// One change to a node's kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum EniOp {
    SetSysctl {
        key: String,
        value: String,
    },
    LinkUp {
        dev: String,
    },
    SetMtu {
        dev: String,
        mtu: u32,
    },
    /// Add the address to the device, without the kernel's prefix route in `main`.
    AddAddress {
        dev: String,
        address: Ipv4Net,
    },
    /// Add or replace the route (by table and destination).
    PutRoute(TableRoute),
    DelRoute(TableRoute),
    /// Replace the whole `inet underlay` table (one atomic `nft -f` batch).
    ReplaceNft(Ruleset),
}

/// The plan of one converge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EniPlan {
    /// ENI id → device name, for every ENI whose MAC a device carries.
    pub devices: BTreeMap<String, String>,
    /// ENIs of the record whose device is not there (yet): their routes and addresses wait.
    pub missing: Vec<String>,
    pub ops: Vec<EniOp>,
}

/// The sysctls `eni` mode needs, `/`-separated: forwarding on, and loose reverse-path filtering (`all`, so the
/// kernel's max(all, device) makes every device at least loose: a pod's replies come in by its ENI while the
/// node's own traffic uses the primary interface).
pub fn wanted_sysctls() -> Vec<(String, String)> {
    vec![
        ("net/ipv4/ip_forward".to_string(), "1".to_string()),
        ("net/ipv4/conf/all/rp_filter".to_string(), "2".to_string()),
    ]
}

/// The routes of every ENI whose device is known.
pub fn wanted_routes(spec: &EniNodeSpec, devices: &BTreeMap<String, String>) -> Vec<TableRoute> {
    let mut v = Vec::new();
    for e in &spec.enis {
        let Some(dev) = devices.get(&e.id) else {
            continue;
        };
        let table = route_table(e.device_index);
        let gw = subnet_gateway(e.subnet_cidr);
        v.push(TableRoute {
            table,
            destination: e.subnet_cidr.trunc(),
            via: None,
            dev: Some(dev.clone()),
        });
        for cidr in spec.inside_cidrs() {
            if cidr == e.subnet_cidr.trunc() {
                continue;
            }
            v.push(TableRoute {
                table,
                destination: cidr,
                via: Some(gw),
                dev: Some(dev.clone()),
            });
        }
        if spec.external_snat {
            v.push(TableRoute {
                table,
                destination: Ipv4Net::default(),
                via: Some(gw),
                dev: Some(dev.clone()),
            });
        }
    }
    v.sort();
    v
}

/// The `inet underlay` table of `eni` mode: a `nat_postrouting` chain whose one rule rewrites the source of
/// pod traffic to destinations outside the VPC to the node IP; no rule with external SNAT (or no pod address).
/// Then the IMDS guard ([`Ruleset::with_imds_guard`]).
pub fn ruleset(spec: &EniNodeSpec) -> Ruleset {
    let sources = spec.pod_sources();
    let rules = if spec.external_snat || sources.is_empty() {
        vec![]
    } else {
        vec![Rule {
            id: "pod-egress-snat".into(),
            saddr: vec![AddrMatch::In(sources)],
            daddr: vec![AddrMatch::NotIn(spec.inside_cidrs())],
            verdict: Verdict::Snat(spec.node_ip),
        }]
    };
    Ruleset {
        sets: vec![],
        chains: vec![Chain {
            name: names::NFT_CHAIN_NAT_POSTROUTING.into(),
            kind: ChainType::Nat,
            hook: Hook::Postrouting,
            priority: names::NFT_PRIORITY_SRCNAT,
            rules,
        }],
    }
    .with_imds_guard()
}

/// Plans the changes that bring a node from `observed` to `spec`: sysctls, secondary ENI devices up with the
/// record's MTU and the ENI's primary IP, the ENI tables' routes (new ones put before stale ones are deleted), the nft table last. An
/// empty `ops` means the node is converged.
pub fn plan_eni(spec: &EniNodeSpec, observed: &EniObserved) -> EniPlan {
    let mut plan = EniPlan::default();
    let mut enis: Vec<&NodeEni> = spec.enis.iter().collect();
    enis.sort_by_key(|e| e.device_index);
    for e in &enis {
        let dev = observed.devices.iter().find(|d| {
            d.mac
                .as_deref()
                .is_some_and(|m| m.eq_ignore_ascii_case(&e.mac))
        });
        match dev {
            Some(d) => {
                plan.devices.insert(e.id.clone(), d.name.clone());
            }
            None => plan.missing.push(e.id.clone()),
        }
    }

    for (key, value) in wanted_sysctls() {
        if observed.sysctls.get(&key) != Some(&value) {
            plan.ops.push(EniOp::SetSysctl { key, value });
        }
    }
    for e in enis.iter().filter(|e| e.device_index != 0) {
        let Some(name) = plan.devices.get(&e.id) else {
            continue;
        };
        let d = observed
            .devices
            .iter()
            .find(|d| &d.name == name)
            .expect("resolved from observed devices");
        if d.mtu != spec.mtu {
            plan.ops.push(EniOp::SetMtu {
                dev: name.clone(),
                mtu: spec.mtu,
            });
        }
        if !d.up {
            plan.ops.push(EniOp::LinkUp { dev: name.clone() });
        }
        if let Some(address) = e.device_address()
            && !observed
                .addresses
                .get(name)
                .is_some_and(|have| have.contains(&address))
        {
            plan.ops.push(EniOp::AddAddress {
                dev: name.clone(),
                address,
            });
        }
    }

    let want = wanted_routes(spec, &plan.devices);
    for w in &want {
        if !observed.routes.contains(w) {
            plan.ops.push(EniOp::PutRoute(w.clone()));
        }
    }
    for o in &observed.routes {
        if !want
            .iter()
            .any(|w| w.table == o.table && w.destination == o.destination)
        {
            plan.ops.push(EniOp::DelRoute(o.clone()));
        }
    }

    let rs = ruleset(spec);
    if !observed.nft.as_ref().is_some_and(|n| n.matches(&rs)) {
        plan.ops.push(EniOp::ReplaceNft(rs));
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> EniNodeSpec {
        EniNodeSpec {
            node: "n1".into(),
            node_ip: "198.18.0.10".parse().unwrap(),
            vpc_cidrs: vec!["198.18.0.0/15".parse().unwrap()],
            external_snat: false,
            mtu: 9001,
            enis: vec![
                NodeEni {
                    id: "eni-2".into(),
                    device_index: 1,
                    mac: "02:00:00:00:00:02".into(),
                    subnet_cidr: "198.18.0.0/24".parse().unwrap(),
                    primary_ip: Some("198.18.0.12".parse().unwrap()),
                    addresses: vec!["198.18.0.20".parse().unwrap()],
                    prefixes: vec!["198.18.0.32/28".parse().unwrap()],
                },
                NodeEni {
                    id: "eni-1".into(),
                    device_index: 0,
                    mac: "02:00:00:00:00:01".into(),
                    subnet_cidr: "198.18.0.0/24".parse().unwrap(),
                    primary_ip: Some("198.18.0.10".parse().unwrap()),
                    addresses: vec!["198.18.0.11".parse().unwrap()],
                    prefixes: vec![],
                },
            ],
        }
    }

    /// Found writing the `node_record` fuzz target (its libFuzzer binary times out on the input): a record whose
    /// ENI lists a /0 prefix inside a /0 subnet made `validate` expand four billion addresses into a set (a hang,
    /// then out of memory) instead of refusing it.
    #[test]
    fn a_prefix_other_than_a_28_is_refused_before_it_is_expanded() {
        for bad in ["0.0.0.0/0", "198.18.0.0/24", "198.18.0.32/29"] {
            let mut s = spec();
            s.enis[0].subnet_cidr = "0.0.0.0/0".parse().unwrap();
            s.enis[0].prefixes = vec![bad.parse().unwrap()];
            assert!(
                matches!(s.validate(), Err(EniSpecError::PrefixLength { .. })),
                "{bad}: {:?}",
                s.validate()
            );
        }
        assert_eq!(spec().validate(), Ok(()));
    }

    fn observed() -> EniObserved {
        EniObserved {
            devices: vec![
                ObservedDevice {
                    name: "eth0".into(),
                    mac: Some("02:00:00:00:00:01".into()),
                    mtu: 9001,
                    up: true,
                },
                ObservedDevice {
                    name: "eth1".into(),
                    mac: Some("02:00:00:00:00:02".into()),
                    mtu: 1500,
                    up: false,
                },
            ],
            ..Default::default()
        }
    }

    /// Applies a plan to an observation the way the kernel would.
    fn apply(mut o: EniObserved, ops: &[EniOp]) -> EniObserved {
        for op in ops {
            match op {
                EniOp::SetSysctl { key, value } => {
                    o.sysctls.insert(key.clone(), value.clone());
                }
                EniOp::LinkUp { dev } => {
                    o.devices.iter_mut().find(|d| &d.name == dev).unwrap().up = true
                }
                EniOp::SetMtu { dev, mtu } => {
                    o.devices.iter_mut().find(|d| &d.name == dev).unwrap().mtu = *mtu
                }
                EniOp::AddAddress { dev, address } => {
                    let have = o.addresses.entry(dev.clone()).or_default();
                    assert!(!have.contains(address), "{address} added twice to {dev}");
                    have.push(*address);
                }
                EniOp::PutRoute(r) => {
                    o.routes
                        .retain(|x| !(x.table == r.table && x.destination == r.destination));
                    o.routes.push(r.clone());
                }
                EniOp::DelRoute(r) => o.routes.retain(|x| x != r),
                EniOp::ReplaceNft(rs) => {
                    o.nft = Some(ObservedNft {
                        rules: rs.rule_ids(),
                        ..Default::default()
                    })
                }
            }
        }
        o
    }

    #[test]
    fn mac_round_trip() {
        assert_eq!(
            parse_mac("02:AB:00:00:00:0f"),
            Some([2, 0xab, 0, 0, 0, 0xf])
        );
        assert_eq!(format_mac(&[2, 0xab, 0, 0, 0, 0xf]), "02:ab:00:00:00:0f");
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "0g:00:00:00:00:00",
            "2:00:00:00:00:00:0",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn plan_brings_up_secondary_devices_only_and_routes_each_eni_by_its_own_device() {
        let plan = plan_eni(&spec(), &observed());
        assert_eq!(plan.devices["eni-1"], "eth0");
        assert_eq!(plan.devices["eni-2"], "eth1");
        assert!(plan.missing.is_empty());
        assert!(plan.ops.contains(&EniOp::LinkUp { dev: "eth1".into() }));
        assert!(plan.ops.contains(&EniOp::SetMtu {
            dev: "eth1".into(),
            mtu: 9001
        }));
        // The secondary ENI's device gets the ENI's primary IP with the subnet's length.
        assert!(plan.ops.contains(&EniOp::AddAddress {
            dev: "eth1".into(),
            address: "198.18.0.12/24".parse().unwrap()
        }));
        // The primary device is never touched.
        assert!(!plan.ops.iter().any(|op| matches!(op,
            EniOp::LinkUp { dev } | EniOp::SetMtu { dev, .. } | EniOp::AddAddress { dev, .. }
                if dev == "eth0")));
        let puts: Vec<&TableRoute> = plan
            .ops
            .iter()
            .filter_map(|op| match op {
                EniOp::PutRoute(r) => Some(r),
                _ => None,
            })
            .collect();
        let gw: Ipv4Addr = "198.18.0.1".parse().unwrap();
        assert_eq!(
            puts,
            vec![
                &TableRoute {
                    table: names::ENI_ROUTE_TABLE_BASE,
                    destination: "198.18.0.0/15".parse().unwrap(),
                    via: Some(gw),
                    dev: Some("eth0".into())
                },
                &TableRoute {
                    table: names::ENI_ROUTE_TABLE_BASE,
                    destination: "198.18.0.0/24".parse().unwrap(),
                    via: None,
                    dev: Some("eth0".into())
                },
                &TableRoute {
                    table: names::ENI_ROUTE_TABLE_BASE + 1,
                    destination: "198.18.0.0/15".parse().unwrap(),
                    via: Some(gw),
                    dev: Some("eth1".into())
                },
                &TableRoute {
                    table: names::ENI_ROUTE_TABLE_BASE + 1,
                    destination: "198.18.0.0/24".parse().unwrap(),
                    via: None,
                    dev: Some("eth1".into())
                },
            ]
        );
        // No default route in the tables: off-VPC traffic falls through to main and is SNATed.
        let rs = ruleset(&spec());
        let snat = &rs.chains[0].rules[0];
        assert_eq!(snat.verdict, Verdict::Snat("198.18.0.10".parse().unwrap()));
        assert_eq!(
            snat.saddr,
            vec![AddrMatch::In(vec![
                "198.18.0.11/32".parse().unwrap(),
                "198.18.0.20/32".parse().unwrap(),
                "198.18.0.32/28".parse().unwrap()
            ])]
        );
    }

    #[test]
    fn converged_plans_nothing_and_stale_routes_go() {
        let s = spec();
        let plan = plan_eni(&s, &observed());
        let mut o = apply(observed(), &plan.ops);
        assert_eq!(plan_eni(&s, &o).ops, vec![]);
        // Other addresses on the ENI devices (the host's, or ones the record no longer names) are left alone.
        o.addresses
            .entry("eth1".into())
            .or_default()
            .push("198.18.0.99/24".parse().unwrap());
        o.addresses
            .entry("eth0".into())
            .or_default()
            .push("198.18.0.10/24".parse().unwrap());
        assert_eq!(plan_eni(&s, &o).ops, vec![]);
        // An address missing again (removed by hand) is put back, and only it.
        o.addresses.get_mut("eth1").unwrap().retain(|a| {
            a.prefix_len() != 24 || a.addr() != "198.18.0.12".parse::<Ipv4Addr>().unwrap()
        });
        assert_eq!(
            plan_eni(&s, &o).ops,
            vec![EniOp::AddAddress {
                dev: "eth1".into(),
                address: "198.18.0.12/24".parse().unwrap()
            }]
        );
        let again = plan_eni(&s, &o).ops;
        o = apply(o, &again);
        assert_eq!(plan_eni(&s, &o).ops, vec![]);
        // A detached ENI's leftovers and a foreign route in an owned table are deleted.
        let stale = TableRoute {
            table: names::ENI_ROUTE_TABLE_BASE + 5,
            destination: "198.18.9.0/24".parse().unwrap(),
            via: None,
            dev: Some("eth5".into()),
        };
        o.routes.push(stale.clone());
        assert_eq!(plan_eni(&s, &o).ops, vec![EniOp::DelRoute(stale)]);
    }

    #[test]
    fn external_snat_routes_everything_by_the_eni_and_drops_the_snat_rule() {
        let mut s = spec();
        s.external_snat = true;
        let routes = wanted_routes(&s, &plan_eni(&s, &observed()).devices);
        assert!(routes.contains(&TableRoute {
            table: names::ENI_ROUTE_TABLE_BASE + 1,
            destination: Ipv4Net::default(),
            via: Some("198.18.0.1".parse().unwrap()),
            dev: Some("eth1".into())
        }));
        assert!(ruleset(&s).chains[0].rules.is_empty());
    }

    #[test]
    fn missing_device_waits_and_its_addresses_stay_out_of_the_pool() {
        let mut o = observed();
        o.devices.pop();
        let plan = plan_eni(&spec(), &o);
        assert_eq!(plan.missing, vec!["eni-2".to_string()]);
        let pool = pool_addresses(&spec(), &plan.devices);
        assert_eq!(pool.len(), 1);
        assert_eq!(pool[0].egress_interface, "eth0");
        assert_eq!(pool[0].route_table, names::ENI_ROUTE_TABLE_BASE);
        // With both devices: 1 + 1 + 16 addresses, primary's first, prefixes expanded.
        let full = pool_addresses(&spec(), &plan_eni(&spec(), &observed()).devices);
        assert_eq!(full.len(), 18);
        assert_eq!(spec().pool_size(), 18);
        assert_eq!(full[2].address, "198.18.0.32".parse::<Ipv4Addr>().unwrap());
        assert_eq!(full[17].address, "198.18.0.47".parse::<Ipv4Addr>().unwrap());
        assert!(
            full[1..]
                .iter()
                .all(|a| a.route_table == names::ENI_ROUTE_TABLE_BASE + 1)
        );
    }

    #[test]
    fn validation_catches_contradictions() {
        let mut s = spec();
        s.enis[1].addresses.push("198.18.0.20".parse().unwrap());
        assert_eq!(
            s.validate(),
            Err(EniSpecError::AddressTwice("198.18.0.20".parse().unwrap()))
        );
        let mut s = spec();
        s.enis[0].addresses.push("198.19.0.5".parse().unwrap());
        assert!(matches!(
            s.validate(),
            Err(EniSpecError::OutsideSubnet { .. })
        ));
        let mut s = spec();
        s.enis[0].device_index = 0;
        assert!(matches!(s.validate(), Err(EniSpecError::Duplicate(..))));
        let mut s = spec();
        s.enis[0].mac = "nope".into();
        assert!(matches!(s.validate(), Err(EniSpecError::Mac { .. })));
        let mut s = spec();
        s.enis[1].addresses.push("198.18.0.10".parse().unwrap());
        assert!(matches!(s.validate(), Err(EniSpecError::NodeIpAsPod(_))));
        let mut s = spec();
        s.enis[1].addresses.push("198.18.0.12".parse().unwrap());
        assert!(matches!(
            s.validate(),
            Err(EniSpecError::PrimaryAsPod { .. })
        ));
        let mut s = spec();
        s.enis[0].primary_ip = Some("198.19.0.12".parse().unwrap());
        assert!(matches!(
            s.validate(),
            Err(EniSpecError::OutsideSubnet { .. })
        ));
        // Without the primary IP in the record, the device gets no address.
        let mut s = spec();
        s.enis[0].primary_ip = None;
        assert!(
            !plan_eni(&s, &observed())
                .ops
                .iter()
                .any(|op| matches!(op, EniOp::AddAddress { .. }))
        );
        assert_eq!(spec().validate(), Ok(()));
    }
}
