//! `underlay bench policy-compile` answers JSON for a small shape, and what it times is what it says: a peer's
//! relabel is two element changes (out of one shared set, into another), an ADD a handful of ops.

use std::process::Command;

use serde_json::Value;

#[test]
fn a_small_shape_reports_its_timings_and_a_relabel_is_two_element_changes() {
    let out = Command::new(env!("CARGO_BIN_EXE_underlay"))
        .args([
            "bench",
            "policy-compile",
            "--pods",
            "300",
            "--policies",
            "20",
            "--groups",
            "10",
            "--rounds",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["relabel_ops"], 2, "{r}");
    assert!(r["add_ops"].as_u64().unwrap() >= 1, "{r}");
    // 10 shared peer sets of 30 pods each, not 20 per-policy copies.
    assert!(r["objects"].as_u64().unwrap() < 20 * 30, "{r}");
    for k in [
        "cold_compile",
        "add_compile_warm_cache",
        "add_diff",
        "relabel_compile_and_diff",
    ] {
        assert_eq!(r[k]["rounds"], 2, "{k}: {r}");
        assert!(r[k]["median_ms"].as_f64().unwrap() >= 0.0, "{k}: {r}");
    }
    // Bad input is refused with a message, not a panic.
    let bad = Command::new(env!("CARGO_BIN_EXE_underlay"))
        .args(["bench", "policy-compile", "--groups", "0"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--groups"));
}
