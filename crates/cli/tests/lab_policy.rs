//! `underlay lab policy` end to end on the e2e model (x/y/z × a/b/c, TCP/UDP/SCTP on 80 and 81): a cases file
//! whose table holds passes in both modes and leaves nothing behind; a table that does not hold fails, with the
//! expected, observed and evaluator's tables side by side. Needs root.
#![cfg(feature = "root-tests")]

mod common;

use std::path::PathBuf;

use common::{Guard, lab_namespaces, plugin, run};
use serde_json::Value;

/// `underlay lab policy --name <lab> --mode <mode> <extra> --cni-plugin <built plugin>`.
fn lab_policy(lab: &str, mode: &str, extra: &[&str]) -> std::process::Output {
    let plugin = plugin();
    let mut args = vec!["lab", "policy", "--name", lab, "--mode", mode];
    args.extend_from_slice(extra);
    args.extend(["--cni-plugin", plugin.to_str().unwrap()]);
    run(&args)
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn name(tag: &str) -> String {
    format!("{tag}{:03x}", std::process::id() % 4096)
}

/// The full table of the model with every cell `mark`, except `x/b → x/a` set to `odd`.
fn table(mark: &str, odd: &str) -> String {
    let pods: Vec<String> = ["x", "y", "z"]
        .iter()
        .flat_map(|n| ["a", "b", "c"].map(|p| format!("{n}/{p}")))
        .collect();
    let mut t = format!("      -\t{}\n", pods.join("\t"));
    for from in &pods {
        let row: Vec<&str> = pods
            .iter()
            .map(|to| {
                if from == "x/b" && to == "x/a" {
                    odd
                } else {
                    mark
                }
            })
            .collect();
        t.push_str(&format!("      {from}\t{}\n", row.join("\t")));
    }
    t
}

fn cases_file(dir: &tempfile::TempDir, body: &str) -> PathBuf {
    let p = dir.path().join("cases.yaml");
    std::fs::write(&p, body).unwrap();
    p
}

/// The bar: the built-in sequence (the upstream e2e cases underlay can express, each checked on every
/// pair, port and protocol), then the first-packet and change-under-load cases, in both modes, on the real
/// controller, agents and plugin; and a cases file's own table checked instead of the evaluator's.
#[test]
fn the_builtin_sequence_and_a_cases_file_pass_in_both_modes() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = name("pb");
    let _g = Guard(lab.clone());
    let out = lab_policy(&lab, "both", &["--format", "json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "lab policy failed: {:#}",
        report["modes"]
    );
    assert_eq!(report["passed"], true);
    let modes = report["modes"].as_array().unwrap();
    assert_eq!(
        modes.iter().map(|m| m["mode"].clone()).collect::<Vec<_>>(),
        ["routed", "eni"]
    );
    for m in modes {
        assert_eq!(m["pods"].as_array().unwrap().len(), 9);
        let zones: std::collections::BTreeSet<&str> = m["pods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["zone"].as_str().unwrap())
            .collect();
        assert_eq!(zones.len(), 3, "pods spread over the zones");
        let cases = m["cases"].as_array().unwrap();
        assert!(cases.len() >= 30, "{} cases", cases.len());
        for case in cases {
            assert_eq!(case["passed"], true, "{}", case["name"]);
            // 486 probes, and a retry for any that a lost first datagram or a resolving neighbour failed.
            assert!(case["probes"].as_u64().unwrap() >= 486);
        }
        // Some case blocks something: the datapath enforces, not only the evaluator agrees with "all open".
        assert!(
            cases
                .iter()
                .flat_map(|c| c["services"].as_array().unwrap())
                .any(|s| s["reachable"].as_u64() < Some(81))
        );
        let fp = &m["first_packet"];
        assert_eq!(fp["passed"], true, "{fp}");
        assert_eq!(fp["denied"]["received_at_peer"], 0, "{fp}");
        assert!(
            fp["control"]["received_at_peer"].as_u64().unwrap() > 0,
            "{fp}"
        );
        let ul = &m["under_load"];
        assert_eq!(ul["passed"], true, "{ul}");
    }
    assert!(lab_namespaces(&lab).is_empty(), "namespaces left behind");

    // A user's cases file: its tables, not the evaluator, decide.
    let lab = name("pc");
    let _g = Guard(lab.clone());
    let dir = tempfile::tempdir().unwrap();
    let full = table(".", ".");
    let file = cases_file(
        &dir,
        &format!(
            "cases:\n- name: baseline\n  expect:\n    tcp/80: |\n{full}    udp/81: |\n{full}    sctp/80: |\n{full}"
        ),
    );
    let out = lab_policy(
        &lab,
        "routed",
        &["--format", "json", "--cases", file.to_str().unwrap()],
    );
    assert!(out.status.success(), "lab policy --cases failed");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let case = &report["modes"][0]["cases"][0];
    assert_eq!(case["passed"], true);
    let services = case["services"].as_array().unwrap();
    assert_eq!(services.len(), 6);
    for s in services {
        assert_eq!(s["reachable"].as_u64(), Some(81), "{s}");
        let from = s["expected_from"].as_str().unwrap();
        let given = ["tcp/80", "udp/81", "sctp/80"].contains(&s["service"].as_str().unwrap());
        assert_eq!(from, if given { "table" } else { "core" }, "{s}");
    }
    assert!(lab_namespaces(&lab).is_empty(), "namespaces left behind");
}

#[test]
fn a_table_that_does_not_hold_fails_with_the_tables_side_by_side() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = name("pf");
    let _g = Guard(lab.clone());
    let dir = tempfile::tempdir().unwrap();
    // Claims x/b cannot reach x/a over SCTP/81 while nothing blocks it.
    let wrong = table(".", "X");
    let file = cases_file(
        &dir,
        &format!("cases:\n- name: wrong claim\n  expect:\n    sctp/81: |\n{wrong}"),
    );
    let out = lab_policy(&lab, "routed", &["--cases", file.to_str().unwrap()]);
    assert!(!out.status.success(), "a wrong table must fail the run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sctp/81: 1 mismatch(es)"), "{text}");
    assert!(
        text.contains("expected (table)") && text.contains("observed"),
        "{text}"
    );
    assert!(text.contains("evaluator (core)"), "{text}");
    assert!(
        text.contains("FAIL wrong claim: ")
            && text.contains(" probes, 486 reachable, 0 blocked, 1 mismatch(es)"),
        "{text}"
    );
    assert!(lab_namespaces(&lab).is_empty(), "namespaces left behind");
}
