//! The smallest change between two [`PolicyModel`]s, and its rendering as one `nft -f` transaction.
//!
//! A change is set element adds and deletes, map entry changes, and whole chains added, deleted or rewritten
//! only when their rules differ: nothing unchanged is flushed and reloaded. The kernel applies a batch as one
//! transaction, so no packet sees a half-applied change.
//!
//! **Generations.** A packet of an established connection skips the policy chains when its conntrack mark
//! carries the current generation, stamped when an earlier packet of that connection passed both directions'
//! policy ([`names::NFT_CHAIN_POLICY_ESTABLISHED`], [`names::NFT_CHAIN_POLICY_VERIFIED`]). So the per-packet cost
//! of a connection that policy allowed does not grow with the policies selecting its pods. A change that may
//! deny something ([`revokes`]) moves to the next generation in the same transaction, so every connection is
//! evaluated again at its next packet against the new rules: a connection a change denies still stops there.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::model::{PolicyType, Protocol};
use super::ruleset::{ChainRule, Element, NftSet, PolicyModel, PortMatch, SetKind};
use crate::names;

/// One change to the kernel's policy objects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyOp {
    AddSet {
        name: String,
        set: NftSet,
    },
    DeleteSet {
        name: String,
    },
    AddElements {
        set: String,
        elements: Vec<Element>,
    },
    DeleteElements {
        set: String,
        elements: Vec<Element>,
    },
    AddChain {
        name: String,
        rules: Vec<ChainRule>,
    },
    ReplaceChain {
        name: String,
        rules: Vec<ChainRule>,
    },
    DeleteChain {
        name: String,
    },
    /// Points `ifname` at `chain` in the map of `dir`; `previous` is the entry it replaces, if any.
    SetMapEntry {
        dir: PolicyType,
        ifname: String,
        chain: String,
        previous: Option<String>,
    },
    DeleteMapEntry {
        dir: PolicyType,
        ifname: String,
    },
}

/// The ops that turn `prev` into `next` (empty when they are equal).
pub fn diff(prev: &PolicyModel, next: &PolicyModel) -> Vec<PolicyOp> {
    let mut ops = Vec::new();
    for (name, set) in &next.sets {
        match prev.sets.get(name) {
            None => ops.push(PolicyOp::AddSet {
                name: name.clone(),
                set: set.clone(),
            }),
            Some(old) => {
                debug_assert_eq!(old.kind, set.kind, "a set's name carries its kind");
                let del: Vec<Element> = old.elements.difference(&set.elements).cloned().collect();
                let add: Vec<Element> = set.elements.difference(&old.elements).cloned().collect();
                if !del.is_empty() {
                    ops.push(PolicyOp::DeleteElements {
                        set: name.clone(),
                        elements: del,
                    });
                }
                if !add.is_empty() {
                    ops.push(PolicyOp::AddElements {
                        set: name.clone(),
                        elements: add,
                    });
                }
            }
        }
    }
    for name in prev.sets.keys().filter(|n| !next.sets.contains_key(*n)) {
        ops.push(PolicyOp::DeleteSet { name: name.clone() });
    }
    for (name, rules) in &next.chains {
        match prev.chains.get(name) {
            None => ops.push(PolicyOp::AddChain {
                name: name.clone(),
                rules: rules.clone(),
            }),
            Some(old) if old != rules => ops.push(PolicyOp::ReplaceChain {
                name: name.clone(),
                rules: rules.clone(),
            }),
            Some(_) => {}
        }
    }
    for name in prev.chains.keys().filter(|n| !next.chains.contains_key(*n)) {
        ops.push(PolicyOp::DeleteChain { name: name.clone() });
    }
    for dir in [PolicyType::Egress, PolicyType::Ingress] {
        let (p, n) = (map_of(prev, dir), map_of(next, dir));
        for (ifname, chain) in n {
            let previous = p.get(ifname);
            if previous != Some(chain) {
                ops.push(PolicyOp::SetMapEntry {
                    dir,
                    ifname: ifname.clone(),
                    chain: chain.clone(),
                    previous: previous.cloned(),
                });
            }
        }
        for ifname in p.keys().filter(|i| !n.contains_key(*i)) {
            ops.push(PolicyOp::DeleteMapEntry {
                dir,
                ifname: ifname.clone(),
            });
        }
    }
    ops
}

fn map_of(m: &PolicyModel, dir: PolicyType) -> &std::collections::BTreeMap<String, String> {
    match dir {
        PolicyType::Egress => &m.egress_if,
        PolicyType::Ingress => &m.ingress_if,
    }
}

/// Applies `ops` to `model` (what the kernel does with the rendered batch; the property tests check
/// `apply(prev, diff(prev, next)) == next`).
pub fn apply(model: &mut PolicyModel, ops: &[PolicyOp]) {
    for op in ops {
        match op {
            PolicyOp::AddSet { name, set } => {
                model.sets.insert(name.clone(), set.clone());
            }
            PolicyOp::DeleteSet { name } => {
                model.sets.remove(name);
            }
            PolicyOp::AddElements { set, elements } => {
                if let Some(s) = model.sets.get_mut(set) {
                    s.elements.extend(elements.iter().cloned());
                }
            }
            PolicyOp::DeleteElements { set, elements } => {
                if let Some(s) = model.sets.get_mut(set) {
                    for e in elements {
                        s.elements.remove(e);
                    }
                }
            }
            PolicyOp::AddChain { name, rules } | PolicyOp::ReplaceChain { name, rules } => {
                model.chains.insert(name.clone(), rules.clone());
            }
            PolicyOp::DeleteChain { name } => {
                model.chains.remove(name);
            }
            PolicyOp::SetMapEntry {
                dir, ifname, chain, ..
            } => {
                let m = match dir {
                    PolicyType::Egress => &mut model.egress_if,
                    PolicyType::Ingress => &mut model.ingress_if,
                };
                m.insert(ifname.clone(), chain.clone());
            }
            PolicyOp::DeleteMapEntry { dir, ifname } => {
                let m = match dir {
                    PolicyType::Egress => &mut model.egress_if,
                    PolicyType::Ingress => &mut model.ingress_if,
                };
                m.remove(ifname);
            }
        }
    }
}

/// Policy objects found in the kernel (names starting with [`names::NFT_POLICY_PREFIX`]), what
/// [`render_install`] deletes before it creates the model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyObjects {
    pub chains: BTreeSet<String>,
    pub sets: BTreeSet<String>,
    pub maps: BTreeSet<String>,
    /// The generation the kernel's policy chains stamp, if they exist (the next install must use another).
    pub generation: Option<u16>,
}

impl PolicyObjects {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.sets.is_empty() && self.maps.is_empty()
    }
}

/// Whether applying `ops` may deny a packet the previous state allowed, so that connections stamped with the
/// current generation must be evaluated again: elements leaving a set, a chain rewritten, a map entry set (a
/// pod newly selected counts: its connections were stamped while nothing selected it). Additions only open; a
/// map entry leaving means a pod no policy selects any more (or gone), and the sets and chains deleted with it
/// are no longer referenced.
pub fn revokes(ops: &[PolicyOp]) -> bool {
    ops.iter().any(|op| {
        matches!(
            op,
            PolicyOp::DeleteElements { .. }
                | PolicyOp::ReplaceChain { .. }
                | PolicyOp::SetMapEntry { .. }
        )
    })
}

/// The generation after `g`: 16 bits of the conntrack mark, never 0 (an unstamped connection's value).
pub fn next_generation(g: u16) -> u16 {
    g.checked_add(1).unwrap_or(1)
}

/// The lines that make `generation` current: the two generation chains rewritten (in the same batch as the
/// change that needs it).
pub fn render_generation(generation: u16) -> String {
    let mut s = String::new();
    let value = u32::from(generation) << 16;
    let mask = names::CT_MARK_POLICY_MASK;
    let _ = writeln!(
        s,
        "flush chain {} {}",
        t(),
        names::NFT_CHAIN_POLICY_ESTABLISHED
    );
    let _ = writeln!(
        s,
        "add rule {} {} ct state established ct mark and {mask:#010x} == {value:#010x} counter accept",
        t(),
        names::NFT_CHAIN_POLICY_ESTABLISHED
    );
    let _ = writeln!(
        s,
        "flush chain {} {}",
        t(),
        names::NFT_CHAIN_POLICY_VERIFIED
    );
    let _ = writeln!(
        s,
        "add rule {} {} ct mark set ct mark and {:#010x} or {value:#010x} accept",
        t(),
        names::NFT_CHAIN_POLICY_VERIFIED,
        !mask
    );
    s
}

/// Elements per `add element` line.
const ELEMENTS_PER_LINE: usize = 512;

fn t() -> String {
    format!("{} {}", names::NFT_FAMILY, names::NFT_TABLE)
}

fn map_name(dir: PolicyType) -> &'static str {
    match dir {
        PolicyType::Egress => names::NFT_MAP_POLICY_EGRESS_IF,
        PolicyType::Ingress => names::NFT_MAP_POLICY_INGRESS_IF,
    }
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn element(e: &Element) -> String {
    match e {
        Element::Addr(r) => r.render(),
        Element::ProtoPort(p, lo, hi) if lo == hi => format!("{} . {lo}", proto(*p)),
        Element::ProtoPort(p, lo, hi) => format!("{} . {lo}-{hi}", proto(*p)),
        Element::AddrProtoPort(ip, p, port) => format!("{ip} . {} . {port}", proto(*p)),
        Element::IfProtoPort(i, p, port) => format!("\"{i}\" . {} . {port}", proto(*p)),
    }
}

fn set_type(kind: SetKind) -> &'static str {
    match kind {
        SetKind::Addr => "type ipv4_addr; flags interval;",
        SetKind::PodAddr => "type ipv4_addr;",
        SetKind::ProtoPort => "type inet_proto . inet_service; flags interval;",
        SetKind::ProtoPortExact => "type inet_proto . inet_service;",
        SetKind::AddrProtoPort => "type ipv4_addr . inet_proto . inet_service;",
        SetKind::IfProtoPort => "type ifname . inet_proto . inet_service;",
    }
}

fn elements_lines(s: &mut String, verb: &str, set: &str, elements: &[&Element]) {
    for chunk in elements.chunks(ELEMENTS_PER_LINE) {
        let items: Vec<String> = chunk.iter().map(|e| element(e)).collect();
        let _ = writeln!(s, "{verb} element {} {set} {{ {} }}", t(), items.join(", "));
    }
}

fn rule_text(r: &ChainRule) -> String {
    match r {
        ChainRule::Jump(c) => format!("jump {c}"),
        ChainRule::Drop => "counter drop".into(),
        ChainRule::Accept { dir, peers, ports } => {
            let mut s = String::new();
            if let Some(p) = peers {
                let field = match dir {
                    PolicyType::Ingress => "saddr",
                    PolicyType::Egress => "daddr",
                };
                let _ = write!(s, "ip {field} @{p} ");
            }
            match ports {
                None => {}
                Some(PortMatch::ProtoPort(set)) => {
                    let _ = write!(s, "meta l4proto . th dport @{set} ");
                }
                Some(PortMatch::AddrProtoPort(set)) => {
                    let _ = write!(s, "ip daddr . meta l4proto . th dport @{set} ");
                }
                Some(PortMatch::IfProtoPort(set)) => {
                    let _ = write!(s, "oifname . meta l4proto . th dport @{set} ");
                }
            }
            // An ingress accept is the last policy step of a forwarded packet (egress is evaluated first): it
            // stamps the connection with the generation as it accepts.
            match dir {
                PolicyType::Ingress => {
                    let _ = write!(s, "goto {}", names::NFT_CHAIN_POLICY_VERIFIED);
                }
                PolicyType::Egress => s.push_str("accept"),
            }
            s
        }
    }
}

fn add_rules(s: &mut String, chain: &str, rules: &[ChainRule]) {
    for r in rules {
        let _ = writeln!(s, "add rule {} {chain} {}", t(), rule_text(r));
    }
}

/// One `nft -f` batch applying `ops` to a kernel that holds the model they were computed from (and the
/// skeleton). Order: new sets and chains, element changes, rewritten chains, map entries, then what is
/// deleted (after every reference to it is gone).
pub fn render_ops(ops: &[PolicyOp]) -> String {
    let mut s = format!("table {}\n", t());
    for op in ops {
        if let PolicyOp::AddSet { name, set } = op {
            let _ = writeln!(s, "add set {} {name} {{ {} }}", t(), set_type(set.kind));
            elements_lines(
                &mut s,
                "add",
                name,
                &set.elements.iter().collect::<Vec<_>>(),
            );
        }
    }
    for op in ops {
        if let PolicyOp::AddChain { name, .. } = op {
            let _ = writeln!(s, "add chain {} {name}", t());
        }
    }
    for op in ops {
        if let PolicyOp::AddChain { name, rules } = op {
            add_rules(&mut s, name, rules);
        }
    }
    for op in ops {
        if let PolicyOp::DeleteElements { set, elements } = op {
            elements_lines(&mut s, "delete", set, &elements.iter().collect::<Vec<_>>());
        }
    }
    for op in ops {
        if let PolicyOp::AddElements { set, elements } = op {
            elements_lines(&mut s, "add", set, &elements.iter().collect::<Vec<_>>());
        }
    }
    for op in ops {
        if let PolicyOp::ReplaceChain { name, rules } = op {
            let _ = writeln!(s, "flush chain {} {name}", t());
            add_rules(&mut s, name, rules);
        }
    }
    for op in ops {
        match op {
            PolicyOp::DeleteMapEntry { dir, ifname }
            | PolicyOp::SetMapEntry {
                dir,
                ifname,
                previous: Some(_),
                ..
            } => {
                let _ = writeln!(
                    s,
                    "delete element {} {} {{ \"{ifname}\" }}",
                    t(),
                    map_name(*dir)
                );
            }
            _ => {}
        }
    }
    for op in ops {
        if let PolicyOp::SetMapEntry {
            dir, ifname, chain, ..
        } = op
        {
            let _ = writeln!(
                s,
                "add element {} {} {{ \"{ifname}\" : jump {chain} }}",
                t(),
                map_name(*dir)
            );
        }
    }
    for op in ops {
        if let PolicyOp::DeleteChain { name } = op {
            let _ = writeln!(s, "flush chain {} {name}", t());
        }
    }
    for op in ops {
        if let PolicyOp::DeleteChain { name } = op {
            let _ = writeln!(s, "delete chain {} {name}", t());
        }
    }
    for op in ops {
        if let PolicyOp::DeleteSet { name } = op {
            let _ = writeln!(s, "delete set {} {name}", t());
        }
    }
    s
}

/// Deletes `existing` policy objects (base chains first, then the maps, then every other chain, then sets).
fn render_delete(s: &mut String, existing: &PolicyObjects) {
    let bases = [
        names::NFT_CHAIN_POLICY_FORWARD_EGRESS,
        names::NFT_CHAIN_POLICY_FORWARD_INGRESS,
        names::NFT_CHAIN_POLICY_INPUT_EGRESS,
    ];
    for c in &existing.chains {
        let _ = writeln!(s, "flush chain {} {c}", t());
    }
    for c in existing
        .chains
        .iter()
        .filter(|c| bases.contains(&c.as_str()))
    {
        let _ = writeln!(s, "delete chain {} {c}", t());
    }
    for m in &existing.maps {
        let _ = writeln!(s, "delete map {} {m}", t());
    }
    for c in existing
        .chains
        .iter()
        .filter(|c| !bases.contains(&c.as_str()))
    {
        let _ = writeln!(s, "delete chain {} {c}", t());
    }
    for set in &existing.sets {
        let _ = writeln!(s, "delete set {} {set}", t());
    }
}

/// One batch that removes every `existing` policy object and installs `model` with the skeleton, stamping
/// `generation` (use one `existing` does not: see [`PolicyObjects::generation`]): what the agent applies at start
/// (state rebuilt from the inputs, with no instant without policy in between).
pub fn render_install(model: &PolicyModel, existing: &PolicyObjects, generation: u16) -> String {
    let mut s = format!("table {}\n", t());
    render_delete(&mut s, existing);
    for chain in [
        names::NFT_CHAIN_POLICY_ESTABLISHED,
        names::NFT_CHAIN_POLICY_VERIFIED,
    ] {
        let _ = writeln!(s, "add chain {} {chain}", t());
    }
    s.push_str(&render_generation(generation));
    for dir in [PolicyType::Egress, PolicyType::Ingress] {
        let _ = writeln!(
            s,
            "add map {} {} {{ type ifname : verdict; }}",
            t(),
            map_name(dir)
        );
    }
    let ops = diff(&PolicyModel::default(), model);
    // Everything in `ops` is an addition: sets, chains, then map entries.
    let body = render_ops(&ops);
    s.push_str(
        body.strip_prefix(&format!("table {}\n", t()))
            .unwrap_or(&body),
    );
    // (chain, hook, priority, key, map, stamped): egress is evaluated before ingress on forwarded packets, and
    // only a forwarded packet that passed both is stamped; packets to the node itself are evaluated each time.
    let skeleton = [
        (
            names::NFT_CHAIN_POLICY_FORWARD_EGRESS,
            "forward",
            names::NFT_PRIORITY_POLICY_EGRESS,
            "iifname",
            names::NFT_MAP_POLICY_EGRESS_IF,
            false,
        ),
        (
            names::NFT_CHAIN_POLICY_INPUT_EGRESS,
            "input",
            names::NFT_PRIORITY_POLICY_EGRESS,
            "iifname",
            names::NFT_MAP_POLICY_EGRESS_IF,
            false,
        ),
        (
            names::NFT_CHAIN_POLICY_FORWARD_INGRESS,
            "forward",
            names::NFT_PRIORITY_POLICY_INGRESS,
            "oifname",
            names::NFT_MAP_POLICY_INGRESS_IF,
            true,
        ),
    ];
    for (chain, hook, prio, key, map, stamps) in skeleton {
        let _ = writeln!(
            s,
            "add chain {} {chain} {{ type filter hook {hook} priority {prio}; policy accept; }}",
            t()
        );
        // Replies of tracked connections pass. An original-direction packet passes without evaluation only
        // when its connection was stamped by the current generation; any change that may deny moves the
        // generation, so a connection a policy change now denies stops at its next packet.
        let _ = writeln!(s, "add rule {} {chain} ct direction reply accept", t());
        if hook == "forward" {
            let _ = writeln!(
                s,
                "add rule {} {chain} jump {}",
                t(),
                names::NFT_CHAIN_POLICY_ESTABLISHED
            );
        }
        let _ = writeln!(
            s,
            "add rule {} {chain} meta nfproto ipv4 {key} vmap @{map}",
            t()
        );
        if stamps {
            // No policy selects the destination for ingress: the packet passed; stamp it.
            let _ = writeln!(
                s,
                "add rule {} {chain} goto {}",
                t(),
                names::NFT_CHAIN_POLICY_VERIFIED
            );
        }
    }
    s
}

/// One batch that removes every `existing` policy object (the agent's cleanup when policy is turned off).
pub fn render_remove_all(existing: &PolicyObjects) -> String {
    let mut s = format!("table {}\n", t());
    render_delete(&mut s, existing);
    s
}
