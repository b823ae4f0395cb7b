//! `eni` mode on the node: converge the kernel of one network namespace to an [`EniNodeSpec`].
//!
//! ```text
//!   EniAgent::converge(spec)
//!     observe  ── dataplane: links (name, MAC, MTU, up), IPv4 addresses, routes of the ENI tables, sysctls
//!              └─ nft -j list table inet underlay (nsenter into the namespace)
//!     plan     ── underlay_core::eni::plan_eni (pure): ENI id → device, ops
//!     apply    ── dataplane: sysctl writes, link up / MTU, ENI primary IP (noprefixroute),
//!                 route replace/delete (EEXIST/ENOENT = done)
//!              └─ nft -f - : one atomic batch replacing only `inet underlay`
//! ```
//!
//! The per-pod rules (`to <pod> lookup main`, `from <pod> lookup <ENI table>`) are underlay-cni's: it adds them
//! on ADD and removes them on DEL, with the table the IPAM reply names. Converging twice applies nothing the
//! second time: the report's `ops` is empty.

pub mod kube;

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};
use serde::Serialize;
use underlay_core::eni::{
    EniNodeSpec, EniObserved, EniOp, EniSpecError, ObservedDevice, TableRoute, format_mac,
    is_eni_table, plan_eni, wanted_sysctls,
};
use underlay_dataplane::{Netlink, Netns, ResultExt, Route, RouteScope};

use crate::routed::{RoutedError, nft};

/// Why a converge failed.
#[derive(Debug, thiserror::Error)]
pub enum EniError {
    #[error("invalid node record: {0}")]
    Spec(#[from] EniSpecError),
    #[error(transparent)]
    Dataplane(#[from] underlay_dataplane::Error),
    #[error("device {0} vanished while converging")]
    DeviceMissing(String),
    #[error("{what}: {detail}")]
    Nft { what: String, detail: String },
}

impl From<RoutedError> for EniError {
    fn from(e: RoutedError) -> Self {
        match e {
            RoutedError::Nft { what, detail } => EniError::Nft { what, detail },
            RoutedError::Dataplane(d) => EniError::Dataplane(d),
            other => EniError::Nft {
                what: "nft".into(),
                detail: other.to_string(),
            },
        }
    }
}

/// What one converge did.
#[derive(Debug, Clone, Serialize)]
pub struct EniReport {
    /// ENI id → device name, for every ENI whose device is present.
    pub devices: BTreeMap<String, String>,
    /// ENIs of the record with no device yet.
    pub missing: Vec<String>,
    /// The ops planned and applied, in order; empty when the node was already converged.
    pub ops: Vec<EniOp>,
}

/// The `eni`-mode agent of one node namespace.
#[derive(Debug)]
pub struct EniAgent {
    ns: Netns,
    /// Pod addresses let through to IMDS (the table's `imds_allowed` set).
    imds: crate::imds::ImdsAllowed,
}

impl EniAgent {
    /// Converges the namespace `ns` (the host's own, `Netns::current()`, in a cluster; a lab node's in the lab).
    pub fn new(ns: Netns) -> Self {
        EniAgent {
            ns,
            imds: Default::default(),
        }
    }

    /// The pod addresses this agent lets through to IMDS: a handle whoever learns the opt-ins fills
    /// ([`crate::imds`]); the converge writes them into the table.
    pub fn imds_allowed(&self) -> &crate::imds::ImdsAllowed {
        &self.imds
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Observe → plan → apply.
    pub fn converge(&self, spec: &EniNodeSpec) -> Result<EniReport, EniError> {
        spec.validate()?;
        let observed = self.observe()?;
        let plan = plan_eni(spec, &observed);
        self.apply(&plan.ops)?;
        // A replaced table got the set's elements in its batch; a kept one gets only what changed.
        if !plan.ops.iter().any(|o| matches!(o, EniOp::ReplaceNft(_))) {
            crate::imds::sync_elements(
                self.ns.path(),
                &underlay_core::eni::ruleset(spec),
                observed.nft.as_ref(),
                &self.imds,
            )?;
        }
        Ok(EniReport {
            devices: plan.devices,
            missing: plan.missing,
            ops: plan.ops,
        })
    }

    /// Reads everything [`plan_eni`] compares.
    pub fn observe(&self) -> Result<EniObserved, EniError> {
        let mut nl = self.ns.netlink()?;
        let links = nl.links()?;
        let names_by_index: BTreeMap<u32, String> =
            links.iter().map(|l| (l.index, l.name.clone())).collect();
        let devices = links
            .iter()
            .map(|l| ObservedDevice {
                name: l.name.clone(),
                mac: l.mac.as_ref().map(format_mac),
                mtu: l.mtu,
                up: l.up,
            })
            .collect();
        let mut addresses: BTreeMap<String, Vec<Ipv4Net>> = BTreeMap::new();
        for (index, net) in nl.addrs_all()? {
            if let (IpNet::V4(net), Some(name)) = (net, names_by_index.get(&index)) {
                addresses.entry(name.clone()).or_default().push(net);
            }
        }
        let mut routes = Vec::new();
        // One dump of every table, keeping the ENI tables' IPv4 routes.
        for r in nl.routes_v4_all_tables()? {
            let IpNet::V4(destination) = r.dst else {
                continue;
            };
            if !is_eni_table(r.table) {
                continue;
            }
            routes.push(TableRoute {
                table: r.table,
                destination,
                via: match r.via {
                    Some(IpAddr::V4(v)) => Some(v),
                    _ => None,
                },
                dev: r.oif.and_then(|i| names_by_index.get(&i).cloned()),
            });
        }
        routes.sort();
        // Unreadable means "not as wanted": the plan writes it, and the write reports the error.
        let sysctls = self
            .ns
            .read_sysctls(wanted_sysctls().into_iter().map(|(k, _)| k))?;
        let nft = nft::observe(self.ns.path())?;
        Ok(EniObserved {
            devices,
            sysctls,
            routes,
            addresses,
            nft,
        })
    }

    /// Applies ops in order; every op is idempotent (an existing object or a missing one to delete is fine).
    pub fn apply(&self, ops: &[EniOp]) -> Result<(), EniError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut nl = self.ns.netlink()?;
        for op in ops {
            tracing::debug!(?op, "eni: apply");
            match op {
                EniOp::SetSysctl { key, value } => self.ns.write_sysctl(key, value)?,
                EniOp::LinkUp { dev } => {
                    let i = link_index(&mut nl, dev)?;
                    nl.link_set_up(i, true)?;
                }
                EniOp::SetMtu { dev, mtu } => {
                    let i = link_index(&mut nl, dev)?;
                    nl.link_set_mtu(i, *mtu)?;
                }
                EniOp::AddAddress { dev, address } => {
                    let i = link_index(&mut nl, dev)?;
                    nl.addr_add_no_prefix_route(i, IpNet::V4(*address))
                        .ignore_exists()?;
                }
                EniOp::PutRoute(r) => {
                    let dev = r.dev.as_deref().unwrap_or_default();
                    let oif = link_index(&mut nl, dev)?;
                    let mut route = match r.via {
                        Some(gw) => {
                            Route::via_onlink(IpNet::V4(r.destination), IpAddr::V4(gw), oif)
                        }
                        None => Route::link(IpNet::V4(r.destination), oif),
                    };
                    route.table = r.table;
                    nl.route_replace(&route)?;
                }
                EniOp::DelRoute(r) => {
                    let oif = match &r.dev {
                        Some(d) => nl.link_by_name(d)?.map(|l| l.index),
                        None => None,
                    };
                    let route = Route {
                        dst: IpNet::V4(r.destination),
                        via: r.via.map(IpAddr::V4),
                        oif,
                        table: r.table,
                        scope: if r.via.is_some() {
                            RouteScope::Universe
                        } else {
                            RouteScope::Link
                        },
                        onlink: false,
                    };
                    nl.route_del(&route).ignore_missing()?;
                }
                EniOp::ReplaceNft(ruleset) => nft::apply_batch(
                    self.ns.path(),
                    &ruleset.render_with_elements(&self.imds.elements()),
                )?,
            }
        }
        Ok(())
    }
}

fn link_index(nl: &mut Netlink, name: &str) -> Result<u32, EniError> {
    nl.link_by_name(name)?
        .map(|l| l.index)
        .ok_or_else(|| EniError::DeviceMissing(name.to_string()))
}
