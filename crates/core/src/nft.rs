//! The nftables ruleset underlay owns on a node (`table inet underlay`), as typed data, and its rendering to
//! one `nft -f` batch that replaces exactly that table and nothing else.
//!
//! ```text
//!   RoutedNodeSpec ──► Ruleset::routed(spec) ──► render() ──► "table inet underlay / delete chain … / table … { … }"
//! ```
//!
//! The table is shared with the network policy datapath ([`crate::policy`]), whose objects all start with
//! [`names::NFT_POLICY_PREFIX`]: the base ruleset replaces its own chains one by one (never the whole table),
//! and its read-back ignores policy chains, so neither can wipe or fight the other.
//!
//! Every rule carries the comment `<rule id>@<fingerprint>`, the fingerprint being a digest of the whole
//! rendered table. The agent reads the `(chain, comment)` pairs back from `nft -j list table` (nft 1.0's JSON
//! drops table comments but keeps rule comments) and compares them with [`Ruleset::rule_ids`]: any change to
//! the wanted table changes every comment, and a deleted rule is a missing pair.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use ipnet::Ipv4Net;
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

/// A match on an IPv4 address: inside (or outside) a set of prefixes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddrMatch {
    In(Vec<Ipv4Net>),
    NotIn(Vec<Ipv4Net>),
}

/// What a rule does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Accept,
    /// Skip connection tracking (raw chains only).
    Notrack,
    /// Source NAT to one address (nat postrouting chains only).
    Snat(std::net::Ipv4Addr),
}

/// One rule: every match must hold (IPv4 only; IPv6 traffic is not touched by this table's rules).
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

/// The whole `inet underlay` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ruleset {
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
    let (neg, nets) = match m {
        AddrMatch::In(n) => ("", n),
        AddrMatch::NotIn(n) => ("!= ", n),
    };
    let set = if nets.len() == 1 {
        nets[0].to_string()
    } else {
        let items: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
        format!("{{ {} }}", items.join(", "))
    };
    format!("ip {field} {neg}{set} ")
}

/// What the agent read back from `nft -j list table inet underlay`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedNft {
    /// `(chain, rule comment)` of every rule in the table (rules without a comment appear with `""`).
    pub rules: BTreeSet<(String, String)>,
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
