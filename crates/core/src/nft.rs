//! The nftables ruleset underlay owns on a node (`table inet underlay`), as typed data, and its rendering to
//! one `nft -f` batch that replaces exactly that table and nothing else.
//!
//! ```text
//!   RoutedNodeSpec ──► Ruleset::routed(spec) ──► render() ──► "table inet underlay / delete chain … / table … { … }"
//!   EniNodeSpec    ──► eni::ruleset(spec)   ──┘        (both end with the IMDS guard: Ruleset::with_imds_guard)
//!   opted-in pods' addresses ──► plan_set_elements(observed, wanted) ──► "add/delete element …" (no table rewrite)
//! ```
//!
//! The table is shared with the network policy datapath ([`crate::policy`]), whose objects all start with
//! [`names::NFT_POLICY_PREFIX`]: the base ruleset replaces its own chains one by one (never the whole table),
//! and its read-back ignores policy chains, so neither can wipe or fight the other.
//!
//! The IMDS guard ([`Ruleset::with_imds_guard`]) is a base chain of its own (`imds_guard`, forward hook, before
//! every filter chain) and a named set (`imds_allowed`): forwarded packets to the instance metadata service,
//! `169.254.169.254` and `[fd00:ec2::254]`, are dropped unless their IPv4 source is in the set. The node's own
//! requests are not forwarded (output hook) and pass. The set's declaration belongs to the table (and to its
//! fingerprint); its elements, the addresses of the pods that opted in, do not: they change per pod, so the agent
//! adds and deletes them by [`plan_set_elements`]. A replace of the base chains declares the set again (a no-op
//! when it exists, so its elements survive) and re-adds the wanted elements in the same batch
//! ([`Ruleset::render_with_elements`]), so a first install or a set a restart lost is whole in one transaction.
//!
//! Every rule carries the comment `<rule id>@<fingerprint>`, the fingerprint being a digest of the whole
//! rendered table. The agent reads the `(chain, comment)` pairs back from `nft -j list table` (nft 1.0's JSON
//! drops table comments but keeps rule comments) and compares them with [`Ruleset::rule_ids`]: any change to
//! the wanted table changes every comment, and a deleted rule is a missing pair.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::names;
use crate::node::RoutedNodeSpec;

/// The hook a base chain attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Prerouting,
    Forward,
    Postrouting,
}

/// A base chain's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChainType {
    Filter,
    Nat,
}

/// The instance metadata service's IPv4 address (link-local, answered by the instance's hypervisor).
pub const IMDS_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The instance metadata service's IPv6 address (Nitro instances).
pub const IMDS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// A match on an address: inside (or outside) a list of prefixes, or inside (or outside) a named set of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddrMatch {
    In(Vec<Ipv4Net>),
    NotIn(Vec<Ipv4Net>),
    /// IPv6: inside a list of prefixes (`ip6 saddr/daddr …`).
    In6(Vec<Ipv6Net>),
    /// IPv4: in the named set (`ip saddr @name`).
    InSet(String),
    /// IPv4: not in the named set (`ip saddr != @name`).
    NotInSet(String),
}

/// What a rule does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Accept,
    /// Skip connection tracking (raw chains only).
    Notrack,
    /// Source NAT to one address (nat postrouting chains only).
    Snat(std::net::Ipv4Addr),
    /// Drop the packet (final: no later chain sees it).
    Drop,
}

/// One rule: every match must hold. IPv4 matches only see IPv4 packets and [`AddrMatch::In6`] only IPv6 ones;
/// no rule mixes the two.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Names the rule; rendered as its nft comment and used to recognise it when read back.
    pub id: String,
    pub saddr: Vec<AddrMatch>,
    pub daddr: Vec<AddrMatch>,
    pub verdict: Verdict,
}

/// A base chain with policy accept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    pub name: String,
    pub kind: ChainType,
    pub hook: Hook,
    pub priority: i32,
    pub rules: Vec<Rule>,
}

/// A named set of IPv4 addresses in the table (`type ipv4_addr`). Only its declaration is part of the ruleset;
/// its elements are managed apart (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrSet {
    pub name: String,
}

/// The elements of the table's named sets: set name → addresses.
pub type SetElements = BTreeMap<String, BTreeSet<Ipv4Addr>>;

/// The whole `inet underlay` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ruleset {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<AddrSet>,
    pub chains: Vec<Chain>,
}

impl Ruleset {
    /// Routed mode's table for a node:
    ///
    /// - `raw_prerouting` (priority raw): transit traffic — to the pod CIDR but not to this node's block, from
    ///   the VPC or pod CIDR but not from this node's block — is `notrack`. A forwarder sees one direction of such
    ///   flows only, so conntrack would classify them as invalid; traffic to and from this node's own pods stays
    ///   tracked (kube-proxy's DNAT replies and SNAT need it), and so does everything addressed to the node.
    /// - `forward` (priority filter, policy accept): counts pod-CIDR transit; no policy yet.
    /// - `nat_postrouting` (priority srcnat): traffic from the pod CIDR to anywhere outside the VPC and pod
    ///   CIDRs leaves with the node IP (the VPC delivers pod addresses, the internet gateway does not).
    pub fn routed(spec: &RoutedNodeSpec) -> Ruleset {
        let inside = spec.inside_cidrs();
        let pod = vec![spec.pod_cidr];
        let own = vec![spec.pod_block];
        Ruleset {
            sets: vec![],
            chains: vec![
                Chain {
                    name: names::NFT_CHAIN_RAW_PREROUTING.into(),
                    kind: ChainType::Filter,
                    hook: Hook::Prerouting,
                    priority: names::NFT_PRIORITY_RAW,
                    rules: vec![Rule {
                        id: "transit-notrack".into(),
                        saddr: vec![AddrMatch::In(inside.clone()), AddrMatch::NotIn(own.clone())],
                        daddr: vec![AddrMatch::In(pod.clone()), AddrMatch::NotIn(own)],
                        verdict: Verdict::Notrack,
                    }],
                },
                Chain {
                    name: names::NFT_CHAIN_FORWARD.into(),
                    kind: ChainType::Filter,
                    hook: Hook::Forward,
                    priority: names::NFT_PRIORITY_FILTER,
                    rules: vec![
                        Rule {
                            id: "pod-dst-accept".into(),
                            saddr: vec![],
                            daddr: vec![AddrMatch::In(pod.clone())],
                            verdict: Verdict::Accept,
                        },
                        Rule {
                            id: "pod-src-accept".into(),
                            saddr: vec![AddrMatch::In(pod.clone())],
                            daddr: vec![],
                            verdict: Verdict::Accept,
                        },
                    ],
                },
                Chain {
                    name: names::NFT_CHAIN_NAT_POSTROUTING.into(),
                    kind: ChainType::Nat,
                    hook: Hook::Postrouting,
                    priority: names::NFT_PRIORITY_SRCNAT,
                    rules: vec![Rule {
                        id: "pod-egress-snat".into(),
                        saddr: vec![AddrMatch::In(pod)],
                        daddr: vec![AddrMatch::NotIn(inside)],
                        verdict: Verdict::Snat(spec.node_ip),
                    }],
                },
            ],
        }
        .with_imds_guard()
    }

    /// Adds the IMDS guard: the set `imds_allowed` and the chain `imds_guard` (forward hook, priority
    /// [`names::NFT_PRIORITY_IMDS_GUARD`], before every filter chain, so no accept elsewhere lets a packet by),
    /// which drops forwarded IPv4 packets to [`IMDS_V4`] whose source is not in the set and every forwarded
    /// packet to [`IMDS_V6`] (pods have no IPv6 address, so no pod can be let through to it).
    pub fn with_imds_guard(mut self) -> Ruleset {
        self.sets.push(AddrSet {
            name: names::NFT_SET_IMDS_ALLOWED.into(),
        });
        self.chains.push(Chain {
            name: names::NFT_CHAIN_IMDS_GUARD.into(),
            kind: ChainType::Filter,
            hook: Hook::Forward,
            priority: names::NFT_PRIORITY_IMDS_GUARD,
            rules: vec![
                Rule {
                    id: "imds-v4-drop".into(),
                    saddr: vec![AddrMatch::NotInSet(names::NFT_SET_IMDS_ALLOWED.into())],
                    daddr: vec![AddrMatch::In(vec![Ipv4Net::from(IMDS_V4)])],
                    verdict: Verdict::Drop,
                },
                Rule {
                    id: "imds-v6-drop".into(),
                    saddr: vec![],
                    daddr: vec![AddrMatch::In6(vec![Ipv6Net::from(IMDS_V6)])],
                    verdict: Verdict::Drop,
                },
            ],
        });
        self
    }

    /// [`Ruleset::render`], followed in the same batch by each declared set's flush and then its elements (those
    /// `elements` names for it): the replace keeps an existing set and its elements, so the flush is what makes
    /// the set hold exactly `elements` when the batch commits, with no instant in which it is empty.
    pub fn render_with_elements(&self, elements: &SetElements) -> String {
        let (f, t) = (names::NFT_FAMILY, names::NFT_TABLE);
        let mut s = self.render();
        for set in &self.sets {
            let _ = writeln!(s, "flush set {f} {t} {}", set.name);
            if let Some(addrs) = elements.get(&set.name).filter(|a| !a.is_empty()) {
                s.push_str(&render_elements("add", &set.name, addrs));
            }
        }
        s
    }

    /// Every `(chain, rule comment)` pair, what the agent compares with what it reads back.
    pub fn rule_ids(&self) -> BTreeSet<(String, String)> {
        let fp = self.fingerprint();
        self.chains
            .iter()
            .flat_map(|c| {
                c.rules
                    .iter()
                    .map(|r| (c.name.clone(), rule_comment(&r.id, &fp)))
            })
            .collect()
    }

    /// The table's body (chains and rules); rule comments only when `fingerprint` is given.
    fn render_body(&self, fingerprint: Option<&str>) -> String {
        let mut s = String::new();
        for set in &self.sets {
            let _ = writeln!(s, "\tset {} {{\n\t\ttype ipv4_addr\n\t}}", set.name);
        }
        for c in &self.chains {
            let kind = match c.kind {
                ChainType::Filter => "filter",
                ChainType::Nat => "nat",
            };
            let hook = match c.hook {
                Hook::Prerouting => "prerouting",
                Hook::Forward => "forward",
                Hook::Postrouting => "postrouting",
            };
            let _ = writeln!(s, "\tchain {} {{", c.name);
            let _ = writeln!(
                s,
                "\t\ttype {kind} hook {hook} priority {}; policy accept;",
                c.priority
            );
            for r in &c.rules {
                let mut line = String::from("\t\t");
                for m in &r.saddr {
                    line.push_str(&render_match("saddr", m));
                }
                for m in &r.daddr {
                    line.push_str(&render_match("daddr", m));
                }
                line.push_str("counter ");
                match &r.verdict {
                    Verdict::Accept => line.push_str("accept"),
                    Verdict::Notrack => line.push_str("notrack"),
                    Verdict::Snat(ip) => {
                        let _ = write!(line, "snat ip to {ip}");
                    }
                    Verdict::Drop => line.push_str("drop"),
                }
                match fingerprint {
                    Some(fp) => {
                        let _ = writeln!(line, " comment \"{}\"", rule_comment(&r.id, fp));
                    }
                    None => line.push('\n'),
                }
                s.push_str(&line);
            }
            s.push_str("\t}\n");
        }
        s
    }

    /// A stable 64-bit FNV-1a digest of the rendered body, as 16 hex digits.
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.render_body(None).bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// One `nft -f` batch that atomically replaces the base chains of `inet underlay` (this ruleset's and every
    /// base chain name in [`names::NFT_BASE_CHAINS`]) and touches nothing else, neither another table nor the
    /// policy objects in this one. Declaring each chain first makes its flush and delete succeed when it does
    /// not exist yet; the kernel applies the batch as one transaction, so no packet ever sees a chain
    /// half-written or missing.
    pub fn render(&self) -> String {
        let (f, t) = (names::NFT_FAMILY, names::NFT_TABLE);
        let mut replaced: BTreeSet<&str> = names::NFT_BASE_CHAINS.iter().copied().collect();
        replaced.extend(self.chains.iter().map(|c| c.name.as_str()));
        let mut s = format!("table {f} {t}\n");
        for c in replaced {
            debug_assert!(!c.starts_with(names::NFT_POLICY_PREFIX));
            let _ = writeln!(
                s,
                "add chain {f} {t} {c}\nflush chain {f} {t} {c}\ndelete chain {f} {t} {c}"
            );
        }
        let _ = write!(
            s,
            "table {f} {t} {{\n{}}}\n",
            self.render_body(Some(&self.fingerprint()))
        );
        s
    }

    /// The batch that removes the table (and only it).
    pub fn render_delete() -> String {
        let (f, t) = (names::NFT_FAMILY, names::NFT_TABLE);
        format!("table {f} {t}\ndelete table {f} {t}\n")
    }
}

fn rule_comment(id: &str, fingerprint: &str) -> String {
    format!("{id}@{fingerprint}")
}

fn render_match(field: &str, m: &AddrMatch) -> String {
    fn list<T: ToString>(nets: &[T]) -> String {
        if nets.len() == 1 {
            nets[0].to_string()
        } else {
            let items: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
            format!("{{ {} }}", items.join(", "))
        }
    }
    match m {
        AddrMatch::In(n) => format!("ip {field} {} ", list(n)),
        AddrMatch::NotIn(n) => format!("ip {field} != {} ", list(n)),
        AddrMatch::In6(n) => format!("ip6 {field} {} ", list(n)),
        AddrMatch::InSet(name) => format!("ip {field} @{name} "),
        AddrMatch::NotInSet(name) => format!("ip {field} != @{name} "),
    }
}

/// `<verb> element inet underlay <set> { a, b }` (one line; `verb` is `add` or `delete`).
fn render_elements(verb: &str, set: &str, addrs: &BTreeSet<Ipv4Addr>) -> String {
    let items: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    format!(
        "{verb} element {} {} {set} {{ {} }}\n",
        names::NFT_FAMILY,
        names::NFT_TABLE,
        items.join(", ")
    )
}

/// The batch that brings the elements of `want`'s sets from `observed` to `wanted` (a set missing from either
/// map is empty there), adding before deleting; `None` when nothing differs. Sets `want` does not declare are
/// left alone. Apply it after the table exists (after a replace, or on a table that matches `want`).
pub fn plan_set_elements(
    want: &Ruleset,
    observed: &SetElements,
    wanted: &SetElements,
) -> Option<String> {
    let empty = BTreeSet::new();
    let mut batch = String::new();
    for set in &want.sets {
        let have = observed.get(&set.name).unwrap_or(&empty);
        let need = wanted.get(&set.name).unwrap_or(&empty);
        let add: BTreeSet<Ipv4Addr> = need.difference(have).copied().collect();
        let del: BTreeSet<Ipv4Addr> = have.difference(need).copied().collect();
        if !add.is_empty() {
            batch.push_str(&render_elements("add", &set.name, &add));
        }
        if !del.is_empty() {
            batch.push_str(&render_elements("delete", &set.name, &del));
        }
    }
    (!batch.is_empty()).then_some(batch)
}

/// What the agent read back from `nft -j list table inet underlay`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedNft {
    /// `(chain, rule comment)` of every rule in the table (rules without a comment appear with `""`).
    pub rules: BTreeSet<(String, String)>,
    /// The IPv4 elements of the table's named sets (a declared set without elements may be absent).
    #[serde(default)]
    pub elements: SetElements,
}

impl ObservedNft {
    /// True when the table's base chains hold exactly the rules `want` renders (policy chains, named with
    /// [`names::NFT_POLICY_PREFIX`], are the policy datapath's and not compared).
    pub fn matches(&self, want: &Ruleset) -> bool {
        let base: BTreeSet<(String, String)> = self
            .rules
            .iter()
            .filter(|(chain, _)| !chain.starts_with(names::NFT_POLICY_PREFIX))
            .cloned()
            .collect();
        base == want.rule_ids()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard_only() -> Ruleset {
        Ruleset {
            sets: vec![],
            chains: vec![],
        }
        .with_imds_guard()
    }

    fn addrs(v: &[&str]) -> BTreeSet<Ipv4Addr> {
        v.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn imds_guard_drops_both_addresses_before_every_filter_chain() {
        let text = guard_only().render();
        assert!(
            text.contains("\tset imds_allowed {\n\t\ttype ipv4_addr\n\t}\n"),
            "{text}"
        );
        assert!(
            text.contains("type filter hook forward priority -10; policy accept;"),
            "{text}"
        );
        assert!(
            text.contains("ip saddr != @imds_allowed ip daddr 169.254.169.254/32 counter drop"),
            "{text}"
        );
        assert!(
            text.contains("ip6 daddr fd00:ec2::254/128 counter drop"),
            "{text}"
        );
        const _: () = assert!(names::NFT_PRIORITY_IMDS_GUARD < names::NFT_PRIORITY_FILTER);
    }

    #[test]
    fn elements_ride_with_the_replace_and_are_diffed_otherwise() {
        let rs = guard_only();
        let set = names::NFT_SET_IMDS_ALLOWED.to_string();
        let want: SetElements = [(set.clone(), addrs(&["100.64.0.2", "100.64.0.3"]))].into();
        let text = rs.render_with_elements(&want);
        assert!(
            text.ends_with("add element inet underlay imds_allowed { 100.64.0.2, 100.64.0.3 }\n"),
            "{text}"
        );
        // Elements are not part of the fingerprint: an opt-in does not rewrite the table.
        assert_eq!(rs.fingerprint(), guard_only().fingerprint());
        // The replace keeps the set; the flush in the same batch drops elements no longer wanted.
        assert_eq!(
            rs.render_with_elements(&SetElements::new()),
            format!("{}flush set inet underlay imds_allowed\n", rs.render())
        );
        let have: SetElements = [(set.clone(), addrs(&["100.64.0.3", "100.64.0.9"]))].into();
        assert_eq!(
            plan_set_elements(&rs, &have, &want).unwrap(),
            "add element inet underlay imds_allowed { 100.64.0.2 }\n\
             delete element inet underlay imds_allowed { 100.64.0.9 }\n"
        );
        assert_eq!(plan_set_elements(&rs, &want, &want), None);
        // A set the ruleset does not declare is not touched.
        let other: SetElements = [("other".to_string(), addrs(&["10.0.0.1"]))].into();
        assert_eq!(plan_set_elements(&rs, &other, &SetElements::new()), None);
    }
}
