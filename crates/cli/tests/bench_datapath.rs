//! `underlay bench datapath` end to end with few round trips (routed mode, fast path on and off): the JSON's
//! shape, every class with samples on both sides, the fast path attached in one run and absent in the other,
//! and nothing left behind. No timing is asserted: the figures are the benchmark's, not the test's. Needs root.
#![cfg(feature = "root-tests")]

mod common;

use common::{Guard, lab_namespaces, plugin, run};
use serde_json::Value;

#[test]
fn bench_datapath_measures_every_class_with_the_fast_path_on_and_off() {
    let name = format!("bd{:03x}", std::process::id() % 4096);
    let _guard = Guard(name.clone());
    let plugin = plugin();
    let out = run(&[
        "bench",
        "datapath",
        "--name",
        &name,
        "--mode",
        "routed",
        "--fast-path",
        "both",
        "--round-trips",
        "600",
        "--iperf-seconds",
        "1",
        "--cni-plugin",
        plugin.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "bench datapath failed");
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["round_trips"], 600);
    let modes = v["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 1);
    assert_eq!(modes[0]["mode"], "routed");
    assert_eq!(modes[0]["bars"].as_array().unwrap().len(), 3);
    let runs = modes[0]["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["fast_path"], true);
    assert_eq!(runs[1]["fast_path"], false);
    // 4 uplinks and 8 pod veths carry a program with the fast path on; nothing with it off.
    assert_eq!(runs[0]["fast_path_filters"], 12);
    assert_eq!(runs[1]["fast_path_filters"], 0);
    for r in runs {
        let classes = r["classes"].as_object().unwrap();
        for class in [
            "same_node",
            "same_subnet",
            "other_subnet_direct",
            "other_subnet_forwarder",
        ] {
            let c = &classes[class];
            for side in ["pod", "node"] {
                for proto in ["tcp_rr", "udp_rr"] {
                    let rr = &c[side][proto];
                    assert_eq!(
                        rr["samples"].as_u64().unwrap() + rr["errors"].as_u64().unwrap(),
                        600
                    );
                    assert!(
                        rr["samples"].as_u64().unwrap() > 0,
                        "{class} {side} {proto}"
                    );
                    assert!(rr["p50_us"].as_f64().unwrap() > 0.0);
                    assert!(rr["p999_us"].as_f64().unwrap() >= rr["p99_us"].as_f64().unwrap());
                    assert!(rr["p99_us"].as_f64().unwrap() >= rr["p50_us"].as_f64().unwrap());
                }
                assert!(
                    c[side]["tcp_1_stream_gbps"].as_f64().unwrap() > 0.0,
                    "{class} {side}"
                );
                assert!(
                    c[side]["tcp_4_streams_gbps"].as_f64().unwrap() > 0.0,
                    "{class} {side}"
                );
            }
            assert!(c["tcp_p50_ratio"].as_f64().unwrap() > 0.0);
        }
    }
    assert!(lab_namespaces(&name).is_empty(), "namespaces left behind");
}
