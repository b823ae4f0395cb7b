//! nftables in a namespace: `nft` run with the namespace entered. Every call names the namespace explicitly;
//! nothing here ever runs `nft` in the caller's namespace unless the caller passes that namespace. When the caller
//! already is in that namespace (the agent on a node: hostNetwork, converging its own namespace) `nft` runs
//! directly; otherwise it is spawned from a thread that entered the namespace (`setns`, which needs
//! CAP_SYS_ADMIN): one process per call, where `nsenter --net=… nft` made two.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use underlay_core::names;
use underlay_core::nft::ObservedNft;

use super::RoutedError;

/// Runs `nft <args>` inside the namespace at `netns`, feeding `stdin` if given; returns stdout.
pub fn nft_in(netns: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, RoutedError> {
    if is_current_netns(netns) {
        return run_nft(args, stdin);
    }
    let what = format!("nft {}", args.join(" "));
    let ns = underlay_dataplane::Netns::open(netns).map_err(|e| RoutedError::Nft {
        what: what.clone(),
        detail: format!("opening the namespace: {e}"),
    })?;
    // The child inherits the namespace of the thread that spawns it.
    ns.run(|| Ok(run_nft(args, stdin)))
        .map_err(|e| RoutedError::Nft {
            what,
            detail: format!("entering the namespace: {e}"),
        })?
}

/// Runs `nft <args>` in the calling thread's namespace.
fn run_nft(args: &[&str], stdin: Option<&str>) -> Result<String, RoutedError> {
    let what = format!("nft {}", args.join(" "));
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RoutedError::Nft {
            what: what.clone(),
            detail: format!("cannot run nft: {e}"),
        })?;
    if let Some(text) = stdin {
        // Dropping the handle closes the pipe so nft sees end of input.
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(text.as_bytes())
            .map_err(|e| RoutedError::Nft {
                what: what.clone(),
                detail: format!("writing the batch: {e}"),
            })?;
    }
    let out = child.wait_with_output().map_err(|e| RoutedError::Nft {
        what: what.clone(),
        detail: e.to_string(),
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(RoutedError::Nft {
            what,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// True when `netns` is the calling thread's own network namespace (same nsfs device and inode).
fn is_current_netns(netns: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::metadata(netns),
        std::fs::metadata("/proc/thread-self/ns/net"),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Applies one `nft -f` batch (atomic: all of it or none).
pub fn apply_batch(netns: &Path, script: &str) -> Result<(), RoutedError> {
    nft_in(netns, &["-f", "-"], Some(script)).map(|_| ())
}

/// The `inet underlay` table as JSON (`nft -j list table inet underlay`), or `None` when it does not exist.
pub fn list_table_json(netns: &Path) -> Result<Option<serde_json::Value>, RoutedError> {
    match nft_in(
        netns,
        &["-j", "list", "table", names::NFT_FAMILY, names::NFT_TABLE],
        None,
    ) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| RoutedError::Nft {
                what: "nft -j list table".into(),
                detail: format!("unparsable JSON: {e}"),
            }),
        Err(RoutedError::Nft { detail, .. }) if detail.contains("No such file or directory") => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Reads `(chain, rule comment)` pairs of the `inet underlay` table out of `nft -j` output.
pub fn observed_from_json(v: &serde_json::Value) -> ObservedNft {
    let mut out = ObservedNft::default();
    let Some(items) = v.get("nftables").and_then(|x| x.as_array()) else {
        return out;
    };
    for item in items {
        if let Some(set) = item.get("set") {
            let field = |k: &str| set.get(k).and_then(|x| x.as_str()).unwrap_or("");
            if field("family") == names::NFT_FAMILY && field("table") == names::NFT_TABLE {
                let elems = set
                    .get("elem")
                    .and_then(|e| e.as_array())
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.as_str()?.parse::<std::net::Ipv4Addr>().ok());
                out.elements
                    .entry(field("name").to_string())
                    .or_default()
                    .extend(elems);
            }
            continue;
        }
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let field = |k: &str| rule.get(k).and_then(|x| x.as_str()).unwrap_or("");
        if field("family") != names::NFT_FAMILY || field("table") != names::NFT_TABLE {
            continue;
        }
        out.rules
            .insert((field("chain").to_string(), field("comment").to_string()));
    }
    out
}

/// Observes the table: `None` when absent.
pub fn observe(netns: &Path) -> Result<Option<ObservedNft>, RoutedError> {
    Ok(list_table_json(netns)?.as_ref().map(observed_from_json))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn reads_rule_comments_of_our_table_only() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
              {"table": {"family": "inet", "name": "underlay", "handle": 3}},
              {"chain": {"family": "inet", "table": "underlay", "name": "forward", "handle": 2}},
              {"rule": {"family": "inet", "table": "underlay", "chain": "forward", "handle": 5,
                        "comment": "pod-dst-accept@00", "expr": []}},
              {"rule": {"family": "inet", "table": "underlay", "chain": "forward", "handle": 6, "expr": []}},
              {"rule": {"family": "inet", "table": "other", "chain": "forward", "handle": 7,
                        "comment": "x", "expr": []}},
              {"set": {"family": "inet", "name": "imds_allowed", "table": "underlay", "type": "ipv4_addr",
                       "handle": 8, "elem": ["100.64.0.5", "100.64.0.7"]}},
              {"set": {"family": "inet", "name": "empty", "table": "underlay", "type": "ipv4_addr", "handle": 9}},
              {"set": {"family": "inet", "name": "imds_allowed", "table": "other", "type": "ipv4_addr",
                       "handle": 10, "elem": ["10.0.0.1"]}}]}"#,
        )
        .unwrap();
        let o = observed_from_json(&v);
        let allowed: BTreeSet<std::net::Ipv4Addr> =
            ["100.64.0.5".parse().unwrap(), "100.64.0.7".parse().unwrap()].into();
        assert_eq!(o.elements.get("imds_allowed"), Some(&allowed));
        assert_eq!(o.elements.get("empty"), Some(&BTreeSet::new()));
        assert_eq!(o.elements.len(), 2);
        let want: BTreeSet<(String, String)> = [
            ("forward".to_string(), "pod-dst-accept@00".to_string()),
            ("forward".to_string(), String::new()),
        ]
        .into_iter()
        .collect();
        assert_eq!(o.rules, want);
        assert_eq!(
            observed_from_json(&serde_json::json!({})),
            ObservedNft::default()
        );
    }
}
