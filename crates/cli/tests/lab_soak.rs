//! `underlay lab soak` end to end, bounded: a minute in each mode with a fixed seed (pods churning, the guard
//! policy flipping, every fault kind of the mode injected and overlapping) violates no invariant and leaves
//! nothing behind; and an invariant broken on purpose (one pod's address on another pod's eth0) fails the run
//! with its seed and the check that caught it. Longer runs are `underlay lab soak --minutes M`. Needs root.
#![cfg(feature = "root-tests")]

mod common;

use common::{Guard, lab_namespaces, plugin, run};
use serde_json::Value;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn name(tag: &str) -> String {
    format!("{tag}{:03x}", std::process::id() % 4096)
}

fn lab_soak(lab: &str, extra: &[&str]) -> std::process::Output {
    let plugin = plugin();
    let mut args = vec!["lab", "soak", "--name", lab, "--json"];
    args.extend_from_slice(extra);
    args.extend(["--cni-plugin", plugin.to_str().unwrap()]);
    run(&args)
}

/// The checks every second runs, and those after settling.
const EVERY_SECOND: [&str; 5] = [
    "unique_address",
    "denied_not_delivered",
    "reachable_within_bound",
    "route_table_within_limit",
    "foreign_route_unchanged",
];
const AFTER_SETTLING: [&str; 5] = [
    "no_leaked_checkpoint_entry",
    "no_leaked_veth",
    "no_leaked_rule",
    "no_leaked_nft_element",
    "settled_reachable",
];

#[test]
fn a_bounded_soak_in_both_modes_violates_nothing_and_leaves_nothing() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = name("sk");
    let _g = Guard(lab.clone());
    let out = lab_soak(&lab, &["--mode", "both", "--minutes", "1", "--seed", "11"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(out.status.success(), "lab soak failed: {report:#}");
    assert_eq!(report["passed"], true);
    let modes = report["modes"].as_array().unwrap();
    assert_eq!(
        modes.iter().map(|m| m["mode"].clone()).collect::<Vec<_>>(),
        ["routed", "eni"]
    );
    for m in modes {
        let mode = m["mode"].as_str().unwrap();
        assert_eq!(m["violations_total"], 0, "{mode}: {:#}", m["violations"]);
        assert_eq!(m["controller_replicas"], 2);
        // Every kind of the mode was due and injected; they overlapped.
        let faults = m["faults"].as_object().unwrap();
        let kinds: Vec<&str> = faults.keys().map(String::as_str).collect();
        let mut want = vec![
            "agent_kill",
            "api_outage",
            "ec2_errors",
            "ec2_latency",
            "ec2_throttle",
            "leader_kill",
            "netns_delete",
        ];
        want.push(if mode == "routed" {
            "node_death"
        } else {
            "eni_detach"
        });
        want.sort();
        assert_eq!(kinds, want, "{mode}");
        for (kind, f) in faults {
            assert!(f["injected"].as_u64().unwrap() >= 1, "{mode}: {kind} {f}");
        }
        assert!(m["max_concurrent_faults"].as_u64().unwrap() >= 2, "{mode}");
        assert!(m["leader_changes"].as_u64().unwrap() >= 1, "{mode}");
        let checks = &m["checks"];
        for c in EVERY_SECOND {
            assert!(checks[c]["runs"].as_u64().unwrap() >= 50, "{mode}: {c}");
            assert_eq!(checks[c]["violations"], 0, "{mode}: {c}");
        }
        for c in AFTER_SETTLING {
            assert_eq!(checks[c]["runs"], 1, "{mode}: {c}");
            assert_eq!(checks[c]["violations"], 0, "{mode}: {c}");
        }
        if mode == "eni" {
            assert_eq!(checks["no_leaked_eni_or_address"]["violations"], 0);
        }
        // The checks had something to check: pods churned, the policy flipped and let its group through.
        assert!(m["churn"]["adds"].as_u64().unwrap() > 20, "{mode}");
        assert!(m["churn"]["netns_deleted"].as_u64().unwrap() >= 1, "{mode}");
        assert!(m["policy_changes"].as_u64().unwrap() >= 1, "{mode}");
        assert!(m["allowed_delivered"].as_u64().unwrap() > 0, "{mode}");
        assert!(m["ec2"]["calls"].as_u64().unwrap() > 0, "{mode}");
        assert!(m["settle_ms"].is_number(), "{mode}");
    }
    assert!(lab_namespaces(&lab).is_empty(), "namespaces left behind");
}

#[test]
fn a_broken_invariant_fails_the_soak_with_its_seed_and_check() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = name("sv");
    let _g = Guard(lab.clone());
    let out = lab_soak(
        &lab,
        &[
            "--mode",
            "routed",
            "--minutes",
            "0.5",
            "--seed",
            "3",
            "--inject-violation",
            "reused-address",
        ],
    );
    assert!(!out.status.success(), "a reused address must fail the run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("seed 3") && stderr.contains("first: unique_address at "),
        "{stderr}"
    );
    assert!(
        stderr.contains("replay: underlay lab soak --mode routed --seed 3"),
        "{stderr}"
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["passed"], false);
    let m = &report["modes"][0];
    assert!(
        m["injected"].as_str().unwrap().contains("eth0"),
        "{}",
        m["injected"]
    );
    assert_eq!(m["first_violation"]["check"], "unique_address");
    assert!(
        m["checks"]["unique_address"]["violations"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert!(lab_namespaces(&lab).is_empty(), "namespaces left behind");
}
