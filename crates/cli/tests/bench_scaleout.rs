//! `underlay bench scaleout` runs to the end and reports a clean run: every node ready, nothing throttled,
//! leaked or held twice, and a lower bound computed from the calls it made.

use std::process::Command;

#[test]
fn a_small_scaleout_reports_a_clean_run() {
    let out = Command::new(env!("CARGO_BIN_EXE_underlay"))
        .args(["bench", "scaleout", "--nodes", "40", "--fill-at-join"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["nodes"], 40);
    assert_eq!(r["throttles_seen"], 0);
    assert_eq!(r["leaked_enis"], 0);
    assert_eq!(r["addresses_held_twice"], 0);
    assert_eq!(r["pool_size_per_node"]["p50"], 27.0);
    assert_eq!(r["calls"]["CreateNetworkInterface"], 80);
    assert_eq!(r["calls"]["AttachNetworkInterface"], 80);
    // 80 attaches in AttachNetworkInterface's own bucket (50 burst, 5 per s): 6 s at least.
    assert_eq!(r["lower_bound_s"], 6.0);
    assert_eq!(r["lower_bound_bucket"], "AttachNetworkInterface");
    assert!(r["all_ready_s"].as_f64().unwrap() >= 6.0);
}
