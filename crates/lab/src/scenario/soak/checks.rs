//! The soak's invariants: each a named check with a count of runs and of violations, and the pure parts of the
//! checks (what a policy denied when, which nft elements are addresses, a distribution) tested on their own.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::Serialize;

use super::pods::Group;

/// No address held by two pods: pods' `eth0` addresses in their namespaces, and live allocations across every
/// node's checkpoint.
pub const UNIQUE_ADDRESS: &str = "unique_address";
/// No datagram a policy denies reaches a guarded pod (counted at the guarded pods' recorders).
pub const DENIED_NOT_DELIVERED: &str = "denied_not_delivered";
/// Every live pod answers one of its sampled peers within the bound after the last fault touching its path.
pub const REACHABLE_WITHIN_BOUND: &str = "reachable_within_bound";
/// Every managed route table holds at most its limit.
pub const ROUTE_TABLE_WITHIN_LIMIT: &str = "route_table_within_limit";
/// The planted foreign route (inside the pod CIDR, to a transit gateway) is never changed.
pub const FOREIGN_ROUTE_UNCHANGED: &str = "foreign_route_unchanged";
/// After settling: checkpoint allocations are exactly the live pods'.
pub const NO_LEAKED_CHECKPOINT_ENTRY: &str = "no_leaked_checkpoint_entry";
/// After settling: host-side pod veths are exactly the live pods'.
pub const NO_LEAKED_VETH: &str = "no_leaked_veth";
/// After settling: per-pod policy-routing rules name only live pods' addresses.
pub const NO_LEAKED_RULE: &str = "no_leaked_rule";
/// After settling: no nft set or map element is the address of a pod that is gone.
pub const NO_LEAKED_NFT_ELEMENT: &str = "no_leaked_nft_element";
/// After settling (eni mode): no detached ENI of the cluster, EC2 assigns each node exactly its pool, no
/// withdrawn address left.
pub const NO_LEAKED_ENI_OR_ADDRESS: &str = "no_leaked_eni_or_address";
/// After settling: every live pod answers.
pub const SETTLED_REACHABLE: &str = "settled_reachable";

/// Runs and violations of one check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckCount {
    pub runs: u64,
    pub violations: u64,
}

/// One violation.
#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub check: &'static str,
    /// From the start of the run.
    pub at_s: f64,
    pub detail: String,
}

/// Every check's counts, and the violations (the first ones kept whole).
#[derive(Debug, Default)]
pub struct Ledger {
    pub counts: BTreeMap<&'static str, CheckCount>,
    pub violations: Vec<Violation>,
    pub total_violations: u64,
}

/// Violations kept in the report beyond the first.
const KEEP: usize = 50;

impl Ledger {
    /// Records one run of `check`: violated with these details, or not.
    pub fn record(&mut self, check: &'static str, at_s: f64, failures: Vec<String>) {
        let c = self.counts.entry(check).or_default();
        c.runs += 1;
        if failures.is_empty() {
            return;
        }
        c.violations += 1;
        self.total_violations += 1;
        if self.violations.len() < KEEP {
            self.violations.push(Violation {
                check,
                at_s,
                detail: failures.join("; "),
            });
        }
    }

    pub fn first(&self) -> Option<&Violation> {
        self.violations.first()
    }
}

/// Which client group the policy lets in, from `at_ms` on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyState {
    pub at_ms: u64,
    pub allowed: Group,
}

/// Whether a datagram of `group` sent at `sent_ms` was denied by every policy in force during the `grace_ms`
/// before it (a change takes up to the grace to reach every node's kernel, so the state before a change still
/// counts for that long). `history` is sorted by time and starts before any datagram.
pub fn denied(history: &[PolicyState], group: Group, sent_ms: u64, grace_ms: u64) -> bool {
    let from = sent_ms.saturating_sub(grace_ms);
    // The state in force at `from`, and every change up to `sent_ms`.
    let start = history.iter().rposition(|s| s.at_ms <= from).unwrap_or(0);
    let Some(first) = history.get(start) else {
        return false;
    };
    std::iter::once(first)
        .chain(
            history[start + 1..]
                .iter()
                .take_while(|s| s.at_ms <= sent_ms),
        )
        .all(|s| s.allowed != group)
}

/// Every IPv4 address (a plain element, not a prefix or range) anywhere in `nft -j list table …` output.
pub fn nft_addresses(v: &serde_json::Value) -> BTreeSet<Ipv4Addr> {
    let mut out = BTreeSet::new();
    fn walk(v: &serde_json::Value, out: &mut BTreeSet<Ipv4Addr>, in_elem: bool) {
        match v {
            serde_json::Value::String(s) if in_elem => {
                if let Ok(a) = s.parse() {
                    out.insert(a);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out, in_elem)),
            serde_json::Value::Object(o) => {
                for (k, x) in o {
                    // Prefixes and ranges cover many addresses: not a pod's element.
                    if k == "prefix" || k == "range" {
                        continue;
                    }
                    walk(x, out, in_elem || k == "elem");
                }
            }
            _ => {}
        }
    }
    walk(v, &mut out, false);
    out
}

/// Keys held by more than one owner: `(key, owners)`.
pub fn duplicates<K: Ord + Clone, O: Clone>(
    items: impl IntoIterator<Item = (K, O)>,
) -> Vec<(K, Vec<O>)> {
    let mut by: BTreeMap<K, Vec<O>> = BTreeMap::new();
    for (k, o) in items {
        by.entry(k).or_default().push(o);
    }
    by.into_iter().filter(|(_, o)| o.len() > 1).collect()
}

/// A distribution of durations (ms).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Dist {
    pub n: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub max_ms: f64,
}

impl Dist {
    pub fn of(values: &[f64]) -> Dist {
        if values.is_empty() {
            return Dist::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[(((v.len() - 1) as f64) * q).round() as usize];
        Dist {
            n: v.len(),
            p50_ms: at(0.5),
            p90_ms: at(0.9),
            max_ms: *v.last().expect("non-empty"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h() -> Vec<PolicyState> {
        vec![
            PolicyState {
                at_ms: 0,
                allowed: Group::A,
            },
            PolicyState {
                at_ms: 10_000,
                allowed: Group::B,
            },
        ]
    }

    #[test]
    fn a_group_is_denied_only_when_every_state_in_the_grace_denies_it() {
        let h = h();
        // Before the change: A allowed, B denied.
        assert!(!denied(&h, Group::A, 5_000, 2_000));
        assert!(denied(&h, Group::B, 5_000, 2_000));
        // Just after it: both were allowed by some state within the grace.
        assert!(!denied(&h, Group::A, 11_000, 2_000));
        assert!(!denied(&h, Group::B, 11_000, 2_000));
        // Past the grace: A denied, B allowed.
        assert!(denied(&h, Group::A, 12_500, 2_000));
        assert!(!denied(&h, Group::B, 12_500, 2_000));
        // Sent before the first state: the first state counts.
        assert!(denied(&h, Group::B, 0, 2_000));
    }

    #[test]
    fn nft_addresses_are_the_plain_elements() {
        let v = serde_json::json!({"nftables": [
            {"set": {"name": "pol_x", "elem": ["100.64.0.5", {"prefix": {"addr": "100.64.0.0", "len": 16}},
                {"elem": {"val": "100.64.0.9", "timeout": 3}}]}},
            {"map": {"name": "pol_if", "elem": [["100.64.0.7", "ul123"]]}},
            {"rule": {"expr": [{"match": {"right": "169.254.169.254"}}]}}
        ]});
        let got: Vec<String> = nft_addresses(&v).iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["100.64.0.5", "100.64.0.7", "100.64.0.9"]);
    }

    #[test]
    fn duplicates_name_every_owner() {
        let d = duplicates([(1, "a"), (2, "b"), (1, "c")]);
        assert_eq!(d, vec![(1, vec!["a", "c"])]);
    }

    #[test]
    fn the_ledger_counts_runs_and_violations() {
        let mut l = Ledger::default();
        l.record(UNIQUE_ADDRESS, 1.0, vec![]);
        l.record(UNIQUE_ADDRESS, 2.0, vec!["x".into(), "y".into()]);
        let c = &l.counts[UNIQUE_ADDRESS];
        assert_eq!((c.runs, c.violations), (2, 1));
        assert_eq!(l.first().unwrap().detail, "x; y");
        assert_eq!(l.first().unwrap().at_s, 2.0);
    }

    #[test]
    fn dist_percentiles() {
        let d = Dist::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((d.n, d.p50_ms, d.max_ms), (5, 3.0, 5.0));
        assert_eq!(Dist::of(&[]).n, 0);
    }
}
