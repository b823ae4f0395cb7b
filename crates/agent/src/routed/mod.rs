//! Routed mode on the node: converge the kernel of one network namespace to a [`RoutedNodeSpec`].
//!
//! ```text
//!   RoutedAgent::converge(spec)
//!     observe  ── dataplane: uplink (by name or by node IP), sysctls, table AGENT_ROUTE_TABLE, its rules
//!              └─ nft -j list table inet underlay (nsenter into the namespace)
//!     plan     ── underlay_core::node::plan_node (pure)
//!     apply    ── dataplane: sysctl writes, route replace/delete, rule add/delete (EEXIST/ENOENT = done)
//!              └─ nft -f - : one atomic batch replacing only `inet underlay`
//! ```
//!
//! Converging twice applies nothing the second time: the report's `ops` is empty.

pub mod kube;
pub mod nft;
pub mod runner;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use serde::Serialize;
use underlay_core::names;
use underlay_core::nft::Ruleset;
use underlay_core::node::{
    NodeObserved, NodeOp, NodeSpecError, OwnedRoute, OwnedRule, RoutedNodeSpec, plan_node,
    wanted_sysctls,
};
use underlay_dataplane::{Netlink, Netns, ResultExt, Route, RouteScope, Rule};

/// Why a converge failed.
#[derive(Debug, thiserror::Error)]
pub enum RoutedError {
    #[error("invalid node record: {0}")]
    Spec(#[from] NodeSpecError),
    #[error(transparent)]
    Dataplane(#[from] underlay_dataplane::Error),
    #[error("no device holds the node IP {0} (and the record names no uplink)")]
    NoUplink(Ipv4Addr),
    #[error("uplink device {0} does not exist")]
    UplinkMissing(String),
    #[error("{what}: {detail}")]
    Nft { what: String, detail: String },
}

/// What one converge did.
#[derive(Debug, Clone, Serialize)]
pub struct ConvergeReport {
    pub uplink: String,
    /// The ops planned and applied, in order; empty when the node was already converged.
    pub ops: Vec<NodeOp>,
}

/// The routed-mode agent of one node namespace.
#[derive(Debug)]
pub struct RoutedAgent {
    ns: Netns,
    /// Pod addresses let through to IMDS (the table's `imds_allowed` set).
    imds: crate::imds::ImdsAllowed,
}

impl RoutedAgent {
    /// Converges the namespace `ns` (the host's own, `Netns::current()`, in a cluster; a lab node's in the lab).
    pub fn new(ns: Netns) -> Self {
        RoutedAgent {
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
    pub fn converge(&self, spec: &RoutedNodeSpec) -> Result<ConvergeReport, RoutedError> {
        spec.validate()?;
        let observed = self.observe(spec)?;
        let ops = plan_node(spec, &observed);
        self.apply(&ops)?;
        // A replaced table got the set's elements in its batch; a kept one gets only what changed.
        if !ops.iter().any(|o| matches!(o, NodeOp::ReplaceNft(_))) {
            crate::imds::sync_elements(
                self.ns.path(),
                &Ruleset::routed(spec),
                observed.nft.as_ref(),
                &self.imds,
            )?;
        }
        Ok(ConvergeReport {
            uplink: observed.uplink,
            ops,
        })
    }

    /// Reads everything [`plan_node`] compares.
    pub fn observe(&self, spec: &RoutedNodeSpec) -> Result<NodeObserved, RoutedError> {
        let mut nl = self.ns.netlink()?;
        let uplink = resolve_uplink(&mut nl, spec)?;
        let names_by_index: BTreeMap<u32, String> =
            nl.links()?.into_iter().map(|l| (l.index, l.name)).collect();
        let routes = nl
            .routes(names::AGENT_ROUTE_TABLE)?
            .into_iter()
            .filter_map(|r| {
                let IpNet::V4(destination) = r.dst else {
                    return None;
                };
                Some(OwnedRoute {
                    destination,
                    via: match r.via {
                        Some(IpAddr::V4(v)) => Some(v),
                        _ => None,
                    },
                    dev: r.oif.and_then(|i| names_by_index.get(&i).cloned()),
                })
            })
            .collect();
        let rules = nl
            .rules(false)?
            .into_iter()
            .filter(|r| r.table == names::AGENT_ROUTE_TABLE)
            .map(|r| OwnedRule {
                priority: r.priority,
                to: match r.to {
                    Some(IpNet::V4(n)) => Some(n),
                    _ => None,
                },
            })
            .collect();
        // Unreadable means "not as wanted": the plan writes it, and the write reports the error.
        let sysctls = self
            .ns
            .read_sysctls(wanted_sysctls(&uplink).into_iter().map(|(k, _)| k))?;
        let nft = nft::observe(self.ns.path())?;
        Ok(NodeObserved {
            uplink,
            sysctls,
            routes,
            rules,
            nft,
        })
    }

    /// Applies ops in order; every op is idempotent (an existing object or a missing one to delete is fine).
    pub fn apply(&self, ops: &[NodeOp]) -> Result<(), RoutedError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut nl = self.ns.netlink()?;
        for op in ops {
            tracing::debug!(?op, "routed: apply");
            match op {
                NodeOp::SetSysctl { key, value } => self.ns.write_sysctl(key, value)?,
                NodeOp::PutRoute {
                    destination,
                    via,
                    dev,
                } => {
                    let oif = link_index(&mut nl, dev)?;
                    let mut r = Route::via_onlink(IpNet::V4(*destination), IpAddr::V4(*via), oif);
                    r.table = names::AGENT_ROUTE_TABLE;
                    nl.route_replace(&r)?;
                }
                NodeOp::DelRoute(o) => {
                    let oif = match &o.dev {
                        Some(d) => nl.link_by_name(d)?.map(|l| l.index),
                        None => None,
                    };
                    let r = Route {
                        dst: IpNet::V4(o.destination),
                        via: o.via.map(IpAddr::V4),
                        oif,
                        table: names::AGENT_ROUTE_TABLE,
                        scope: RouteScope::Universe,
                        onlink: false,
                    };
                    nl.route_del(&r).ignore_missing()?;
                }
                NodeOp::AddRule(r) => {
                    nl.rule_add(&rule(r)).ignore_exists()?;
                }
                NodeOp::DelRule(r) => {
                    nl.rule_del(&rule(r)).ignore_missing()?;
                }
                NodeOp::ReplaceNft(ruleset) => nft::apply_batch(
                    self.ns.path(),
                    &ruleset.render_with_elements(&self.imds.elements()),
                )?,
            }
        }
        Ok(())
    }
}

fn rule(r: &OwnedRule) -> Rule {
    Rule {
        priority: r.priority,
        from: None,
        to: r.to.map(IpNet::V4),
        table: names::AGENT_ROUTE_TABLE,
        v6: false,
    }
}

fn link_index(nl: &mut Netlink, name: &str) -> Result<u32, RoutedError> {
    nl.link_by_name(name)?
        .map(|l| l.index)
        .ok_or_else(|| RoutedError::UplinkMissing(name.to_string()))
}

/// The uplink's name: the record's, if it names one (and it exists), else the device holding the node IP.
fn resolve_uplink(nl: &mut Netlink, spec: &RoutedNodeSpec) -> Result<String, RoutedError> {
    if let Some(name) = &spec.uplink {
        link_index(nl, name)?;
        return Ok(name.clone());
    }
    for l in nl.links()? {
        let holds = nl.addrs(l.index)?.iter().any(|a| match a {
            IpNet::V4(n) => n.addr() == spec.node_ip,
            IpNet::V6(_) => false,
        });
        if holds {
            return Ok(l.name);
        }
    }
    Err(RoutedError::NoUplink(spec.node_ip))
}

/// Takes the IPAM pool and the pod MTU from the record: in routed mode the pool is the node's block, and pods
/// get the VPC MTU because nothing encapsulates.
pub fn pool_from_record(config: &mut crate::AgentConfig, spec: &RoutedNodeSpec) {
    config.pool.block = Some(spec.pod_block);
    config.pool.addresses.clear();
    config.mtu = spec.mtu;
}
