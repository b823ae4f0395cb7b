//! The commands: ADD (setup), DEL (teardown), CHECK, STATUS, GC. Kernel work goes through underlay-dataplane;
//! addresses come from the agent through underlay-ipam-api's blocking client.
//!
//! ```text
//!   pod netns                          node netns (where the runtime runs us)
//!   eth0 100.64.1.5/32 ◄── veth ──►   ul<hash11>  (no address)
//!   default via 169.254.1.1 onlink     100.64.1.5/32 dev ul<hash11> scope link
//!   neigh 169.254.1.1 → MAC(ul…) permanent     neigh 100.64.1.5 → MAC(eth0) permanent
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;
use underlay_core::names;
use underlay_dataplane::{Netlink, Netns, ResultExt, Route, Rule, VethSpec, format_mac};
use underlay_ipam_api::{AllocateRequest, Allocation, AttachmentKey, Client, ClientError};

use crate::invocation::Invocation;
use crate::naming;
use crate::spec::{self, Attached, CniError, Command, code};

/// MTU when neither the configuration nor the agent gives one.
pub const FALLBACK_MTU: u32 = 1500;

/// Runs one invocation. `Some(json)` is printed on stdout; commands without output return `None`.
pub fn run(inv: &Invocation) -> Result<Option<Value>, CniError> {
    match inv.command {
        Command::Version => Ok(Some(spec::version_result(&inv.conf.cni_version))),
        Command::Add => add(inv).map(Some),
        Command::Del => del(inv).map(|()| None),
        Command::Check => check(inv).map(|()| None),
        Command::Status => status(inv).map(|()| None),
        Command::Gc => gc(inv).map(|()| None),
    }
}

fn socket_path(inv: &Invocation) -> PathBuf {
    inv.conf
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(names::AGENT_SOCKET))
}

fn connect(inv: &Invocation) -> Result<Client, CniError> {
    Client::connect(&socket_path(inv)).map_err(ipam_error)
}

/// How an IPAM failure reaches the runtime: anything a retry may fix is 11 ("try again later").
pub fn ipam_error(e: ClientError) -> CniError {
    let c = match &e {
        ClientError::InvalidRequest(_) => code::INVALID_CONFIG,
        e if e.is_retryable() => code::TRY_AGAIN_LATER,
        _ => code::IPAM_FAILED,
    };
    let msg = match &e {
        ClientError::AgentUnavailable { .. } => "the underlay agent is not running".to_string(),
        ClientError::PoolExhausted(_) => "no free pod address on this node".to_string(),
        ClientError::NotReady(m) => {
            format!("the underlay agent cannot enforce this pod's network policy yet: {m}")
        }
        _ => "IPAM request to the underlay agent failed".to_string(),
    };
    CniError::new(c, msg).with_details(e)
}

fn dp_error(what: &str, e: underlay_dataplane::Error) -> CniError {
    CniError::new(code::DATAPLANE, what.to_string()).with_details(e)
}

fn key(inv: &Invocation) -> AttachmentKey {
    AttachmentKey::new(inv.container_id.clone(), inv.ifname.clone())
}

fn open_pod_netns(path: &str) -> Result<Netns, CniError> {
    Netns::open(path).map_err(|e| {
        if e.is_missing() {
            CniError::new(
                code::UNKNOWN_CONTAINER,
                format!("network namespace {path} does not exist"),
            )
        } else {
            CniError::new(code::IO, format!("cannot open network namespace {path}")).with_details(e)
        }
    })
}

/// The per-pod rules of `eni` mode, in the order ADD installs them (empty in routed mode): `to <pod> lookup main`
/// (traffic to the pod, from its node's other pods too, takes the host route to its veth) and
/// `from <pod> lookup <ENI table>` (the pod's traffic leaves by the ENI that owns its address).
fn pod_rules(alloc: &Allocation, addr: Ipv4Net) -> Vec<Rule> {
    if alloc.route_table == 0 {
        return Vec::new();
    }
    vec![
        Rule {
            priority: names::RULE_PRIORITY_TO_POD,
            from: None,
            to: Some(IpNet::V4(addr)),
            table: Route::MAIN,
            v6: false,
        },
        Rule {
            priority: names::RULE_PRIORITY_FROM_POD,
            from: Some(IpNet::V4(addr)),
            to: None,
            table: alloc.route_table,
            v6: false,
        },
    ]
}

/// Deletes the pod's rules (each one missing is fine); the first error, after trying all.
fn del_pod_rules(host: &mut Netlink, alloc: &Allocation, addr: Ipv4Net) -> Result<(), CniError> {
    let mut first = None;
    for rule in pod_rules(alloc, addr) {
        if let Err(e) = host.rule_del(&rule).ignore_missing() {
            first.get_or_insert(dp_error("deleting a pod rule", e));
        }
    }
    first.map_or(Ok(()), Err)
}

// ---------------------------------------------------------------- ADD

fn add(inv: &Invocation) -> Result<Value, CniError> {
    // Everything that can be checked without changing anything comes first.
    let client = connect(inv)?;
    let pod_ns = open_pod_netns(&inv.netns)?;
    let mut host = Netlink::open_here().map_err(|e| dp_error("netlink", e))?;
    // The plugin is single-threaded: switching this thread in and out is cheaper than a helper thread.
    let mut pod = pod_ns
        .netlink_in_place()
        .map_err(|e| dp_error("netlink in the pod namespace", e))?;

    let alloc = client
        .allocate(&AllocateRequest {
            key: Some(key(inv)),
            netns: inv.netns.clone(),
            pod_namespace: inv.arg("K8S_POD_NAMESPACE").unwrap_or_default().to_string(),
            pod_name: inv.arg("K8S_POD_NAME").unwrap_or_default().to_string(),
        })
        .map_err(ipam_error)?;
    tracing::debug!(container = %inv.container_id, address = %alloc.address, "allocated");

    match setup(inv, &alloc, &mut host, &mut pod, &pod_ns) {
        Ok(attached) => Ok(spec::add_result(
            &inv.conf.cni_version,
            inv.conf.prev_result.as_ref(),
            &attached,
        )),
        Err(e) => {
            // Roll back what this call did: the veth (its peer and host route go with it), the rule, the address.
            let host_name = naming::host_veth_name(&inv.container_id, &inv.ifname);
            if let Err(re) = host.link_del_by_name(&host_name).ignore_missing() {
                tracing::warn!(error = %re, "rollback: deleting the veth failed");
            }
            if let Ok(addr) = alloc.address_v4()
                && let Err(re) = del_pod_rules(&mut host, &alloc, addr)
            {
                tracing::warn!(error = %re, "rollback: deleting the pod rules failed");
            }
            if let Err(re) = client.release(&key(inv)) {
                tracing::warn!(error = %re, "rollback: releasing the address failed");
            }
            Err(e)
        }
    }
}

fn setup(
    inv: &Invocation,
    alloc: &Allocation,
    host: &mut Netlink,
    pod: &mut Netlink,
    pod_ns: &Netns,
) -> Result<Attached, CniError> {
    let address = alloc.address_v4().map_err(ipam_error)?;
    let gateway = alloc.gateway_v4().map_err(ipam_error)?;
    let mtu = inv
        .conf
        .mtu
        .or((alloc.mtu != 0).then_some(alloc.mtu))
        .unwrap_or(FALLBACK_MTU);
    let host_name = naming::host_veth_name(&inv.container_id, &inv.ifname);
    let (host_mac, pod_mac) = naming::macs(&inv.container_id, &inv.ifname);

    let spec = VethSpec {
        name: &host_name,
        peer_name: &inv.ifname,
        peer_netns: Some(pod_ns),
        mtu: Some(mtu),
        mac: Some(host_mac),
        peer_mac: Some(pod_mac),
        up: true,
    };
    // A retried ADD finds its own veth from last time: replace it, so the result is the same either way.
    if !host
        .veth_add(&spec)
        .ignore_exists()
        .map_err(|e| dp_error("creating the veth pair", e))?
    {
        tracing::info!(veth = %host_name, "veth exists from an earlier ADD; recreating");
        host.link_del_by_name(&host_name)
            .ignore_missing()
            .map_err(|e| dp_error("deleting the old veth", e))?;
        host.veth_add(&spec).map_err(|e| {
            dp_error(
                &format!(
                    "creating the veth pair (is {} already used in the pod namespace?)",
                    inv.ifname
                ),
                e,
            )
        })?;
    }

    // The host end tells us the pod end's index (IFLA_LINK), which saves a lookup in the pod namespace.
    let hv = host
        .link_by_name(&host_name)
        .map_err(|e| dp_error("reading the host veth", e))?
        .ok_or_else(|| CniError::new(code::DATAPLANE, format!("{host_name} vanished")))?;
    let eth_index = match hv.peer_index {
        Some(i) => i,
        None => {
            pod.link_by_name(&inv.ifname)
                .map_err(|e| dp_error("reading the pod interface", e))?
                .ok_or_else(|| {
                    CniError::new(
                        code::DATAPLANE,
                        format!("{} vanished from the pod namespace", inv.ifname),
                    )
                })?
                .index
        }
    };

    // Pod side.
    pod.link_set_up(eth_index, true)
        .map_err(|e| dp_error("setting the pod interface up", e))?;
    pod.addr_add(eth_index, IpNet::V4(address))
        .ignore_exists()
        .map_err(|e| dp_error("adding the pod address", e))?;
    pod.neigh_add_permanent(eth_index, IpAddr::V4(gateway), host_mac)
        .map_err(|e| dp_error("adding the gateway neighbour", e))?;
    // The default route, unless the pod already has one through another interface: this attachment is then a
    // secondary one (a Multus-style second underlay network), and replacing the route would move the pod's
    // default to it — and take it away with it on DEL, leaving the pod with no route at all. Every underlay
    // interface uses the same gateway address, so "replace" would match the first interface's route.
    let routes = pod
        .routes(Route::MAIN)
        .map_err(|e| dp_error("reading the pod's routes", e))?;
    let default_elsewhere = routes
        .iter()
        .find(|r| r.dst == default_v4() && r.oif.is_some_and(|i| i != eth_index));
    match default_elsewhere {
        Some(r) => tracing::info!(
            ifname = %inv.ifname,
            default_oif = ?r.oif,
            "the pod routes by default through another interface: secondary attachment, no default route"
        ),
        None => pod
            .route_replace(&Route::via_onlink(
                default_v4(),
                IpAddr::V4(gateway),
                eth_index,
            ))
            .map_err(|e| dp_error("adding the default route", e))?,
    }

    // Host side. The pod's neighbour entry is permanent too: the node never ARPs for its pods (so a pod never
    // learns the node's address from an ARP request either). The kernel's ARP table is shared by every
    // namespace on the host with one garbage-collection limit (gc_thresh3, 1024 by default); two dynamic
    // entries per pod overflow it at a few hundred pods, and an overflowing table drops new resolutions.
    host.route_replace(&Route::link(IpNet::V4(address), hv.index))
        .map_err(|e| dp_error("adding the host route to the pod", e))?;
    host.neigh_add_permanent(hv.index, IpAddr::V4(address.addr()), pod_mac)
        .map_err(|e| dp_error("adding the pod's neighbour entry", e))?;
    for rule in pod_rules(alloc, address) {
        host.rule_add(&rule)
            .ignore_exists()
            .map_err(|e| dp_error("adding a pod rule", e))?;
    }

    Ok(Attached {
        host_ifname: host_name,
        host_mac: format_mac(&host_mac),
        pod_ifname: inv.ifname.clone(),
        pod_mac: format_mac(&pod_mac),
        sandbox: inv.netns.clone(),
        address,
        gateway,
    })
}

fn default_v4() -> IpNet {
    IpNet::V4(Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("valid prefix"))
}

// ---------------------------------------------------------------- DEL

/// Tolerant of everything already gone: the netns, the veth, the allocation. Never enters the pod namespace.
///
/// Deleting a veth costs the kernel an RCU grace period (~20 ms here) inside the netlink call. DEL does not
/// wait for it: it finds the host veth, and its Release request names it (ifindex + name); the agent
/// checkpoints the release, replies, and then deletes the host route and the veth on its reaper thread —
/// only if that index still carries that name, so a retried ADD's new veth is never touched. An agent
/// without a reaper says so (`link_queued = false`) and DEL deletes the veth itself. An agent that is not
/// reachable fails DEL with 11 before anything changes; the runtime retries.
fn del(inv: &Invocation) -> Result<(), CniError> {
    let client = connect(inv)?;
    let mut host = Netlink::open_here().map_err(|e| dp_error("netlink", e))?;
    let host_name = naming::host_veth_name(&inv.container_id, &inv.ifname);
    let link = host
        .link_by_name(&host_name)
        .map_err(|e| dp_error("reading the host veth", e))?;
    let (released, queued) = client
        .release_with_link(
            &key(inv),
            link.as_ref().map(|l| (l.index, host_name.as_str())),
        )
        .map_err(ipam_error)?;
    if let Some(link) = &link
        && !queued
    {
        // The host route goes with the link.
        host.link_del(link.index)
            .ignore_missing()
            .map_err(|e| dp_error("deleting the veth", e))?;
    }
    if let Some(alloc) = released
        && let Ok(addr) = alloc.address_v4()
    {
        del_pod_rules(&mut host, &alloc, addr)?;
    }
    Ok(())
}

// ---------------------------------------------------------------- CHECK

/// Verifies that the attachment is as ADD left it; the first difference is the error.
fn check(inv: &Invocation) -> Result<(), CniError> {
    let prev = inv.conf.prev_result.as_ref().expect("validated by parse");
    let (address, gw) = spec::find_attachment(prev, &inv.ifname).ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("prevResult has no address for {}", inv.ifname),
        )
    })?;
    let gateway = gw.unwrap_or(underlay_ipam_api::POD_GATEWAY);
    let bad = |what: String| CniError::new(code::DATAPLANE, format!("CHECK failed: {what}"));

    let client = connect(inv)?;
    let allocs = client.list().map_err(ipam_error)?;
    let mine = allocs.iter().find(|a| {
        a.key
            .as_ref()
            .is_some_and(|k| k.container_id == inv.container_id && k.ifname == inv.ifname)
    });
    match mine.map(|a| a.address_v4()) {
        Some(Ok(a)) if a == address => {}
        Some(Ok(a)) => {
            return Err(bad(format!(
                "the agent holds {a} for this container, prevResult says {address}"
            )));
        }
        _ => {
            return Err(bad(format!(
                "the agent holds no address for this container (prevResult says {address})"
            )));
        }
    }

    let pod_ns = open_pod_netns(&inv.netns)?;
    let mut host = Netlink::open_here().map_err(|e| dp_error("netlink", e))?;
    let mut pod = pod_ns
        .netlink()
        .map_err(|e| dp_error("netlink in the pod namespace", e))?;
    let host_name = naming::host_veth_name(&inv.container_id, &inv.ifname);
    let hv = host
        .link_by_name(&host_name)
        .map_err(|e| dp_error("reading the host veth", e))?
        .ok_or_else(|| bad(format!("host veth {host_name} is missing")))?;
    if !hv.up {
        return Err(bad(format!("host veth {host_name} is down")));
    }
    let eth = pod
        .link_by_name(&inv.ifname)
        .map_err(|e| dp_error("reading the pod interface", e))?
        .ok_or_else(|| bad(format!("{} is missing in {}", inv.ifname, inv.netns)))?;
    if !eth.up {
        return Err(bad(format!("{} is down", inv.ifname)));
    }
    if let Some(mtu) = inv.conf.mtu
        && (eth.mtu != mtu || hv.mtu != mtu)
    {
        return Err(bad(format!(
            "MTU is {}/{} (pod/host), configuration says {mtu}",
            eth.mtu, hv.mtu
        )));
    }
    let addrs = pod
        .addrs(eth.index)
        .map_err(|e| dp_error("reading pod addresses", e))?;
    if !addrs.contains(&IpNet::V4(address)) {
        return Err(bad(format!("{address} is not on {}", inv.ifname)));
    }
    let neigh = pod
        .neighbours(eth.index)
        .map_err(|e| dp_error("reading pod neighbours", e))?;
    if !neigh
        .iter()
        .any(|n| n.ip == IpAddr::V4(gateway) && n.permanent && n.mac == hv.mac)
    {
        return Err(bad(format!(
            "no permanent neighbour {gateway} → {host_name}'s MAC in the pod"
        )));
    }
    let routes = pod
        .routes(Route::MAIN)
        .map_err(|e| dp_error("reading pod routes", e))?;
    // The default route through this interface; or, for a secondary attachment, through the interface that
    // had it first (ADD leaves that one in place).
    if !routes.iter().any(|r| {
        r.dst == default_v4() && r.via == Some(IpAddr::V4(gateway)) && r.oif == Some(eth.index)
    }) && !routes
        .iter()
        .any(|r| r.dst == default_v4() && r.oif.is_some_and(|i| i != eth.index))
    {
        return Err(bad(format!(
            "no default route via {gateway} dev {} in the pod",
            inv.ifname
        )));
    }
    let host_routes = host
        .routes(Route::MAIN)
        .map_err(|e| dp_error("reading host routes", e))?;
    if !host_routes
        .iter()
        .any(|r| r.dst == IpNet::V4(address) && r.oif == Some(hv.index))
    {
        return Err(bad(format!("no host route {address} dev {host_name}")));
    }
    let wanted = mine.map(|a| pod_rules(a, address)).unwrap_or_default();
    if !wanted.is_empty() {
        let rules = host
            .rules(false)
            .map_err(|e| dp_error("reading host rules", e))?;
        for w in wanted {
            if !rules.contains(&w) {
                return Err(bad(format!(
                    "no rule {}{} lookup {} priority {}",
                    w.from.map(|f| format!("from {f} ")).unwrap_or_default(),
                    w.to.map(|t| format!("to {t}")).unwrap_or_default(),
                    w.table,
                    w.priority
                )));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- STATUS, GC

fn status(inv: &Invocation) -> Result<(), CniError> {
    Client::connect(&socket_path(inv)).map(drop).map_err(|e| {
        CniError::new(
            code::PLUGIN_NOT_AVAILABLE,
            "the underlay agent is not reachable",
        )
        .with_details(e)
    })
}

/// Releases every allocation not in `cni.dev/valid-attachments`, and deletes host veths of this plugin that
/// belong to no valid attachment (left by a crash between veth creation and rollback).
fn gc(inv: &Invocation) -> Result<(), CniError> {
    let valid = inv.conf.valid_attachments.as_deref().unwrap_or_default();
    let client = connect(inv)?;
    let keys: Vec<AttachmentKey> = valid
        .iter()
        .map(|a| AttachmentKey::new(a.container_id.clone(), a.ifname.clone()))
        .collect();
    let released = client.gc(&keys).map_err(ipam_error)?;
    let mut host = Netlink::open_here().map_err(|e| dp_error("netlink", e))?;
    let keep: std::collections::HashSet<String> = valid
        .iter()
        .map(|a| naming::host_veth_name(&a.container_id, &a.ifname))
        .collect();
    let mut errors = Vec::new();
    for alloc in &released {
        if let Ok(addr) = alloc.address_v4()
            && let Err(e) = del_pod_rules(&mut host, alloc, addr)
        {
            errors.push(e.to_string());
        }
    }
    for link in host.links().map_err(|e| dp_error("listing links", e))? {
        if link.kind.as_deref() == Some("veth")
            && naming::is_host_veth_name(&link.name)
            && !keep.contains(&link.name)
        {
            tracing::info!(veth = %link.name, "GC: deleting a veth of no valid attachment");
            if let Err(e) = host.link_del(link.index).ignore_missing() {
                errors.push(e.to_string());
            }
        }
    }
    tracing::info!(released = released.len(), "GC done");
    if errors.is_empty() {
        Ok(())
    } else {
        Err(
            CniError::new(code::DATAPLANE, "GC could not remove everything")
                .with_details(errors.join("; ")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipam_errors_map_to_retry_or_fail() {
        let unavailable = ClientError::AgentUnavailable {
            path: "/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(ipam_error(unavailable).code, code::TRY_AGAIN_LATER);
        let not_ready = ipam_error(ClientError::NotReady("pod x/a is not in the inputs".into()));
        assert_eq!(not_ready.code, code::TRY_AGAIN_LATER);
        assert!(not_ready.msg.contains("pod x/a"), "{}", not_ready.msg);
        assert_eq!(
            ipam_error(ClientError::PoolExhausted("full".into())).code,
            code::TRY_AGAIN_LATER
        );
        assert_eq!(
            ipam_error(ClientError::InvalidRequest("bad".into())).code,
            code::INVALID_CONFIG
        );
        let fatal = ClientError::Internal {
            message: "disk".into(),
            retryable: false,
        };
        assert_eq!(ipam_error(fatal).code, code::IPAM_FAILED);
        let transient = ClientError::Internal {
            message: "disk".into(),
            retryable: true,
        };
        assert_eq!(ipam_error(transient).code, code::TRY_AGAIN_LATER);
    }
}
