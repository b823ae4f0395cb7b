//! The policy datapath's kernel side: one `nft -f` transaction per change, inside the node's namespace, and the
//! read-back of which policy objects exist (what a restarted agent replaces in its first transaction).

use std::fmt::Debug;
use std::path::PathBuf;

use underlay_core::names;
use underlay_core::policy::diff::PolicyObjects;

use super::PolicyError;
use crate::routed::{RoutedError, nft};

/// Where policy transactions go. The real one runs `nft` in the node namespace; tests pass a recorder.
pub trait PolicyNft: Send + Sync + Debug {
    /// The policy objects (names with [`names::NFT_POLICY_PREFIX`]) in `inet underlay` now.
    fn existing(&self) -> Result<PolicyObjects, PolicyError>;
    /// Applies one batch atomically (all of it or nothing).
    fn apply(&self, batch: &str) -> Result<(), PolicyError>;
}

/// `nft` run inside the namespace at `netns` (`/proc/self/ns/net` for the agent's own).
#[derive(Debug, Clone)]
pub struct NsNft {
    pub netns: PathBuf,
}

impl NsNft {
    pub fn new(netns: impl Into<PathBuf>) -> Self {
        NsNft {
            netns: netns.into(),
        }
    }
}

fn nft_error(e: RoutedError) -> PolicyError {
    PolicyError::Nft(e.to_string())
}

impl PolicyNft for NsNft {
    fn existing(&self) -> Result<PolicyObjects, PolicyError> {
        Ok(nft::list_table_json(&self.netns)
            .map_err(nft_error)?
            .as_ref()
            .map(policy_objects_from_json)
            .unwrap_or_default())
    }

    fn apply(&self, batch: &str) -> Result<(), PolicyError> {
        nft::apply_batch(&self.netns, batch).map_err(nft_error)
    }
}

/// The policy chains, sets and maps of `inet underlay` in `nft -j list table` output.
pub fn policy_objects_from_json(v: &serde_json::Value) -> PolicyObjects {
    let mut out = PolicyObjects::default();
    let Some(items) = v.get("nftables").and_then(|x| x.as_array()) else {
        return out;
    };
    for item in items {
        for (kind, into) in [
            ("chain", &mut out.chains),
            ("set", &mut out.sets),
            ("map", &mut out.maps),
        ] {
            let Some(obj) = item.get(kind) else { continue };
            let field = |k: &str| obj.get(k).and_then(|x| x.as_str()).unwrap_or("");
            if field("family") == names::NFT_FAMILY
                && field("table") == names::NFT_TABLE
                && field("name").starts_with(names::NFT_POLICY_PREFIX)
            {
                into.insert(field("name").to_string());
            }
        }
        if let Some(rule) = item.get("rule") {
            out.generation = out.generation.or_else(|| generation_of(rule));
        }
    }
    out
}

/// The generation `pol_established`'s rule tests (`ct mark and 0xffff0000 == G << 16`, which `nft -j` lists as
/// a prefix match on `ct mark`).
fn generation_of(rule: &serde_json::Value) -> Option<u16> {
    let field = |k: &str| rule.get(k).and_then(|x| x.as_str()).unwrap_or("");
    if field("family") != names::NFT_FAMILY
        || field("table") != names::NFT_TABLE
        || field("chain") != names::NFT_CHAIN_POLICY_ESTABLISHED
    {
        return None;
    }
    rule.get("expr")?.as_array()?.iter().find_map(|e| {
        let m = e.get("match")?;
        let key = m.get("left")?.get("ct")?.get("key")?.as_str()?;
        let value = m.get("right")?.get("prefix")?.get("addr")?.as_u64()?;
        (key == "mark")
            .then(|| u16::try_from(value >> 16).ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_only_our_policy_objects() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
              {"table": {"family": "inet", "name": "underlay", "handle": 3}},
              {"chain": {"family": "inet", "table": "underlay", "name": "forward", "handle": 2}},
              {"chain": {"family": "inet", "table": "underlay", "name": "pol_forward_egress", "handle": 4}},
              {"map": {"family": "inet", "table": "underlay", "name": "pol_egress_if", "handle": 5}},
              {"set": {"family": "inet", "table": "underlay", "name": "pol_p0_in0_a", "handle": 6}},
              {"set": {"family": "inet", "table": "other", "name": "pol_x", "handle": 7}}]}"#,
        )
        .unwrap();
        let o = policy_objects_from_json(&v);
        assert_eq!(o.generation, None);
        assert_eq!(o.chains.iter().collect::<Vec<_>>(), ["pol_forward_egress"]);
        assert_eq!(o.maps.iter().collect::<Vec<_>>(), ["pol_egress_if"]);
        assert_eq!(o.sets.iter().collect::<Vec<_>>(), ["pol_p0_in0_a"]);
    }

    /// What `nft -j list table` prints for the generation chain's rule (nft 1.0.6).
    #[test]
    fn reads_the_generation_the_kernel_stamps() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"nftables": [
              {"chain": {"family": "inet", "table": "underlay", "name": "pol_established", "handle": 2}},
              {"rule": {"family": "inet", "table": "underlay", "chain": "pol_established", "handle": 4,
                "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "established"}},
                         {"match": {"op": "==", "left": {"ct": {"key": "mark"}},
                                    "right": {"prefix": {"addr": 2752512, "len": 16}}}},
                         {"accept": null}]}}]}"#,
        )
        .unwrap();
        assert_eq!(policy_objects_from_json(&v).generation, Some(42));
    }
}
