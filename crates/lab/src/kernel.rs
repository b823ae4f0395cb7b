//! Applies [`Op`]s with the kernel's own tools, always inside a lab namespace (`ip -n`, `bridge -n`,
//! `nsenter --net=… nft`): never in the caller's namespace. Each op either completes or is rolled back.
//!
//! Bridges, bridge-port flags, static FDB entries, typed routes (blackhole), `iif` rules and nftables are
//! not in `underlay-dataplane` yet; this module is where they live until they move there.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use underlay_core::names::LAB_NFT_TABLE;
use underlay_dataplane::Netns;

use crate::error::{Error, Result};
use crate::plan::{NftSpec, Op, PortSpec, RouteAction, RuleSpec};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

fn run(program: &str, args: &[String], stdin: Option<&str>) -> Result<String> {
    let cmd = format!("{program} {}", args.join(" "));
    let mut c = Command::new(program);
    c.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = c.spawn().map_err(|source| Error::Spawn {
        cmd: cmd.clone(),
        source,
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|source| Error::Spawn {
                cmd: cmd.clone(),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| Error::Spawn {
        cmd: cmd.clone(),
        source,
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `ip -n <ns> …`
pub fn ip(ns: &str, args: &[&str]) -> Result<String> {
    let mut a = strings(&["-n", ns]);
    a.extend(strings(args));
    run("ip", &a, None)
}

/// `bridge -n <ns> …`
pub fn bridge(ns: &str, args: &[&str]) -> Result<String> {
    let mut a = strings(&["-n", ns]);
    a.extend(strings(args));
    run("bridge", &a, None)
}

/// A program run inside a namespace: `nsenter --net=/var/run/netns/<ns> <program> <args>`.
pub fn in_netns(ns: &str, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut a = vec![format!("--net={NETNS_DIR}/{ns}"), program.to_owned()];
    a.extend(strings(args));
    run("nsenter", &a, stdin)
}

/// `nft -f -` inside a namespace: one atomic transaction.
pub fn nft(ns: &str, script: &str) -> Result<()> {
    in_netns(ns, "nft", &["-f", "-"], Some(script)).map(|_| ())
}

pub fn netns_exists(name: &str) -> bool {
    std::path::Path::new(NETNS_DIR).join(name).exists()
}

/// Creates a namespace with `lo` up.
pub fn netns_add(name: &str) -> Result<()> {
    run("ip", &strings(&["netns", "add", name]), None)?;
    if let Err(e) = ip(name, &["link", "set", "lo", "up"]) {
        let _ = netns_del(name);
        return Err(e);
    }
    Ok(())
}

/// Deletes a namespace (and with it every interface inside, and the peers of its veths). A missing
/// namespace is success.
pub fn netns_del(name: &str) -> Result<()> {
    if !netns_exists(name) {
        return Ok(());
    }
    run("ip", &strings(&["netns", "del", name]), None).map(|_| ())
}

/// Namespaces whose name starts with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    out.sort();
    out
}

pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    Ok(Netns::named(ns)?.write_sysctl(key, value)?)
}

/// Runs one op in the fabric namespace `fab` (and, for ports and instances, their instance namespace).
pub fn apply(fab: &str, op: &Op) -> Result<()> {
    match op {
        Op::DelRule(r) => rule(fab, "del", r),
        Op::AddRule(r) => rule(fab, "add", r),
        Op::DelRoute { table, dst } => ip(
            fab,
            &[
                "route",
                "del",
                &dst.to_string(),
                "table",
                &table.to_string(),
            ],
        )
        .map(|_| ()),
        Op::SetRoute { table, dst, action } => {
            let (dst, table) = (dst.to_string(), table.to_string());
            let via;
            let args: Vec<&str> = match action {
                RouteAction::Dev { dev } => {
                    vec!["route", "replace", &dst, "dev", dev, "table", &table]
                }
                RouteAction::Via { dev, via: gw } => {
                    via = gw.to_string();
                    vec![
                        "route", "replace", &dst, "via", &via, "dev", dev, "onlink", "table",
                        &table,
                    ]
                }
                RouteAction::Blackhole => {
                    vec!["route", "replace", "blackhole", &dst, "table", &table]
                }
            };
            ip(fab, &args).map(|_| ())
        }
        Op::DelNeighbour { bridge, ip: addr } => {
            ip(fab, &["neigh", "del", &addr.to_string(), "dev", bridge]).map(|_| ())
        }
        Op::SetNeighbour {
            bridge,
            ip: addr,
            mac,
        } => ip(
            fab,
            &[
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                mac,
                "dev",
                bridge,
                "nud",
                "permanent",
            ],
        )
        .map(|_| ()),
        Op::DelPort { name } => link_del(fab, name),
        Op::AddPort { name, spec } => add_port(fab, name, spec).inspect_err(|_| {
            let _ = link_del(fab, name);
        }),
        Op::DelInstance { netns, .. } => netns_del(netns),
        Op::AddInstance { netns, .. } => netns_add(netns),
        Op::DelBridge { name } => link_del(fab, name),
        Op::AddBridge { name, spec } => add_bridge(fab, name, spec.router).inspect_err(|_| {
            let _ = link_del(fab, name);
        }),
        Op::SetNft(spec) => nft(fab, &render_nft(spec)),
    }
}

/// A locally administered unicast MAC derived from the bridge's name (FNV-1a).
pub fn bridge_mac(name: &str) -> String {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let b = h.to_be_bytes();
    format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

fn link_del(ns: &str, name: &str) -> Result<()> {
    ip(ns, &["link", "del", name]).map(|_| ())
}

fn rule(fab: &str, verb: &str, r: &RuleSpec) -> Result<()> {
    ip(
        fab,
        &[
            "rule",
            verb,
            "priority",
            &r.priority.to_string(),
            "iif",
            &r.iif,
            "lookup",
            &r.table.to_string(),
        ],
    )
    .map(|_| ())
}

fn add_bridge(fab: &str, name: &str, router: Ipv4Addr) -> Result<()> {
    // A fixed MAC: a bridge without one takes its lowest port's MAC, so adding a port could change it, and a
    // MAC change flushes the bridge's neighbours, permanent ones included.
    ip(
        fab,
        &[
            "link",
            "add",
            name,
            "address",
            &bridge_mac(name),
            "type",
            "bridge",
        ],
    )?;
    ip(fab, &["addr", "add", &format!("{router}/32"), "dev", name])?;
    ip(fab, &["link", "set", name, "up"])?;
    Ok(())
}

/// The veth of one ENI: created in the fabric with its peer born inside the instance namespace (so it never
/// appears in the caller's namespace), bridged into its subnet, and configured on the instance side the way
/// EC2's images configure the primary interface (device 0: its primary address with the subnet's length, the
/// default route via the subnet router); a secondary ENI's device is only brought up.
fn add_port(fab: &str, name: &str, p: &PortSpec) -> Result<()> {
    ip(
        fab,
        &[
            "link", "add", name, "type", "veth", "peer", "name", &p.ifname, "address", &p.mac,
            "netns", &p.netns,
        ],
    )?;
    ip(fab, &["link", "set", name, "master", &p.bridge])?;
    // Only the fabric answers ARP: with the port flag `proxy_arp` the bridge itself replies to a request from
    // the bridge's permanent neighbour entries (the owning ENI's MAC) and floods nothing to the port. Frames go
    // only to the port that owns their destination MAC (static FDB, no learning, no unknown-unicast flood).
    // (`neigh_suppress` would not do: it ignores requests that arrive on a suppressed port.)
    ip(
        fab,
        &[
            "link",
            "set",
            "dev",
            name,
            "type",
            "bridge_slave",
            "learning",
            "off",
            "flood",
            "off",
            "proxy_arp",
            "on",
        ],
    )?;
    bridge(
        fab,
        &["fdb", "replace", &p.mac, "dev", name, "master", "static"],
    )?;
    ip(fab, &["link", "set", name, "up"])?;
    if let Some(address) = p.address {
        ip(
            &p.netns,
            &["addr", "add", &address.to_string(), "dev", &p.ifname],
        )?;
    }
    ip(&p.netns, &["link", "set", &p.ifname, "up"])?;
    if let Some(gw) = p.gateway {
        ip(
            &p.netns,
            &[
                "route",
                "replace",
                "default",
                "via",
                &gw.to_string(),
                "dev",
                &p.ifname,
            ],
        )?;
    }
    Ok(())
}

/// The fabric's nftables ruleset, replaced atomically (declare, delete, redeclare in one transaction).
///
/// - `bridge` family, on the subnet bridges' ports: the source/dest check. A frame an ENI sends from an
///   address it does not own, or a frame delivered to an ENI for an address it does not own, is dropped when
///   the ENI's check is on. ARP between ports is dropped: the fabric alone answers ARP, as the VPC does.
/// - `inet` family, on the IGW link: what leaves for the internet must come from an address some ENI owns
///   (so missing SNAT shows); what comes back must be for one.
pub fn render_nft(spec: &NftSpec) -> String {
    let t = LAB_NFT_TABLE;
    let mut owned_pairs = Vec::new();
    let mut owned_all = Vec::new();
    for (port, blocks) in &spec.owned {
        for b in blocks {
            let e = if b.prefix_len() == 32 {
                b.addr().to_string()
            } else {
                b.to_string()
            };
            owned_pairs.push(format!("\"{port}\" . {e}"));
            owned_all.push(e);
        }
    }
    let checked: Vec<String> = spec.checked.iter().map(|p| format!("\"{p}\"")).collect();
    let elements = |v: &[String]| {
        if v.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", v.join(", "))
        }
    };
    let mut s = format!(
        "table bridge {t}\ndelete table bridge {t}\n\
         table bridge {t} {{\n\
         \tset owned {{ type ifname . ipv4_addr; flags interval;{} }}\n\
         \tset checked {{ type ifname;{} }}\n\
         \tchain prerouting {{\n\t\ttype filter hook prerouting priority 0; policy accept;\n\
         \t\tether type ip iifname @checked iifname . ip saddr != @owned counter drop\n\t}}\n\
         \tchain postrouting {{\n\t\ttype filter hook postrouting priority 0; policy accept;\n\
         \t\tether type ip oifname @checked oifname . ip daddr != @owned counter drop\n\t}}\n\
         \tchain forward {{\n\t\ttype filter hook forward priority 0; policy accept;\n\
         \t\tether type arp counter drop\n\t}}\n\
         }}\n",
        elements(&owned_pairs),
        elements(&checked),
    );
    if let Some(igw) = &spec.igw {
        s.push_str(&format!(
            "table inet {t}\ndelete table inet {t}\n\
             table inet {t} {{\n\
             \tset owned {{ type ipv4_addr; flags interval; auto-merge;{} }}\n\
             \tchain forward {{\n\t\ttype filter hook forward priority 0; policy accept;\n\
             \t\toifname \"{igw}\" ip saddr != @owned counter drop\n\
             \t\tiifname \"{igw}\" ip daddr != @owned counter drop\n\t}}\n\
             }}\n",
            elements(&owned_all),
        ));
    }
    s
}
