//! `underlay plan` and `underlay bench plan` as a user runs them: JSON fields and the promised figures.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

fn underlay(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_underlay"))
        .args(args)
        .output()
        .expect("run underlay");
    assert!(
        out.status.success(),
        "underlay {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn plan_json(args: &[&str]) -> Value {
    let mut a = vec!["plan", "--format", "json"];
    a.extend_from_slice(args);
    serde_json::from_str(&underlay(&a)).expect("JSON")
}

const SHAPE: [&str; 6] = [
    "--zones",
    "3",
    "--subnets-per-zone",
    "2",
    "--route-limit",
    "50",
];

#[test]
fn five_thousand_nodes_json_fields_and_bounds() {
    let mut a = vec!["--nodes", "5000"];
    a.extend_from_slice(&SHAPE);
    let v = plan_json(&a);
    for f in [
        "routes_per_table",
        "budget",
        "nodes",
        "max_nodes_per_forwarder",
        "extra_hop_fraction",
        "blocks",
        "routes",
    ] {
        assert!(v.get(f).is_some(), "missing field {f}");
    }
    let routes = v["routes_per_table"].as_u64().unwrap();
    assert!(routes + v["foreign_routes"].as_u64().unwrap() <= 50);
    assert_eq!(v["nodes"], 5000);
    assert_eq!(v["blocks"].as_array().unwrap().len(), 5000);
    assert!(
        v["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["route"].is_string() && b["via"].is_string())
    );
    for s in v["subnets"].as_array().unwrap() {
        let (n, r) = (s["nodes"].as_u64().unwrap(), s["routes"].as_u64().unwrap());
        assert!(
            s["max_nodes_per_forwarder"].as_u64().unwrap() <= n.div_ceil(r),
            "{s}"
        );
    }
}

#[test]
fn forty_nodes_one_route_each() {
    let mut a = vec!["--nodes", "40"];
    a.extend_from_slice(&SHAPE);
    let v = plan_json(&a);
    assert_eq!(v["routes_per_table"], 40);
    assert_eq!(v["extra_hop_fraction"], 0.0);
    assert_eq!(v["mode"], "per-node");
}

#[test]
fn fail_moves_only_the_failed_forwarders_routes() {
    let mut a = vec!["--nodes", "5000"];
    a.extend_from_slice(&SHAPE);
    let before = plan_json(&a);
    let victim_routes: BTreeSet<String> = before["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["forwarder"] == "node-0001")
        .map(|r| r["destination"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !victim_routes.is_empty(),
        "node-0001 forwards in the synthetic plan"
    );
    a.extend_from_slice(&["--fail", "node-0001"]);
    let after = plan_json(&a);
    let moved = after["failover"]["moved"].as_array().unwrap();
    // One replace per route it forwarded, in each of the 3 tables.
    assert_eq!(moved.len(), victim_routes.len() * 3);
    for op in moved {
        assert_eq!(op["op"], "replace");
        assert!(victim_routes.contains(op["destination"].as_str().unwrap()));
        assert_eq!(op["previous"], "eni-00000001");
    }
    assert!(
        after["routes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["forwarder"] != "node-0001")
    );
}

#[test]
fn previous_plan_round_trips_and_a_join_changes_at_most_two_routes() {
    let dir = std::env::temp_dir().join(format!("underlay-plan-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prev_path = dir.join("prev.json");
    let mut a = vec!["--nodes", "5000"];
    a.extend_from_slice(&SHAPE);
    std::fs::write(&prev_path, serde_json::to_string(&plan_json(&a)).unwrap()).unwrap();
    let prev = prev_path.to_str().unwrap();
    // Same state from the saved plan: identical routes.
    let mut same = a.clone();
    same.extend_from_slice(&["--previous", prev]);
    let again = plan_json(&same);
    let before = plan_json(&a);
    assert_eq!(again["routes"], before["routes"]);
    // One more node (the synthetic cluster grows by one): at most two route changes.
    let mut join = vec!["--nodes", "5001"];
    join.extend_from_slice(&SHAPE);
    join.extend_from_slice(&["--previous", prev]);
    let joined = plan_json(&join);
    let set = |v: &Value| -> BTreeSet<(String, String)> {
        v["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["destination"].as_str().unwrap().into(),
                    r["eni"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let (x, y) = (set(&before), set(&joined));
    let changed = x
        .symmetric_difference(&y)
        .map(|(d, _)| d.clone())
        .collect::<BTreeSet<_>>()
        .len();
    assert!(changed <= 2, "{changed} routes changed");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn example_topology_table_dot_and_summary() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/topology.yaml");
    let t = underlay(&["plan", "--topology", root]);
    assert!(
        t.contains("ROUTE TABLE") && t.contains("rtb-private-1a") && t.contains("EXTRA-HOP"),
        "{t}"
    );
    let d = underlay(&["plan", "--topology", root, "--format", "dot"]);
    assert!(d.starts_with("digraph underlay {") && d.trim_end().ends_with('}'));
    assert!(d.contains("cluster_z0") && d.contains("->"));
    let s = underlay(&["plan", "--nodes", "40", "--summary"]);
    assert!(s.contains("one route per node"), "{s}");
}

#[test]
fn errors_are_precise() {
    let out = Command::new(env!("CARGO_BIN_EXE_underlay"))
        .args(["plan", "--nodes", "12", "--pod-cidr", "100.64.0.0/24"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pod CIDR 100.64.0.0/24 holds 4 /26 blocks but 12 nodes need blocks"),
        "{err}"
    );
}

#[test]
fn bench_plan_reports_json() {
    let out = underlay(&[
        "bench",
        "plan",
        "--sizes",
        "100",
        "--churn-size",
        "300",
        "--iterations",
        "1",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["bench"], "plan");
    let fs = &v["from_scratch"][0];
    assert_eq!(fs["nodes"], 100);
    assert!(fs["time"]["median_ms"].as_f64().unwrap() >= 0.0);
    assert!(fs["memory"]["peak_rss_kib"].as_u64().unwrap() > 0);
    let churn = v["churn"].as_array().unwrap();
    assert_eq!(churn.len(), 4);
    assert!(churn[0]["what"].as_str().unwrap().starts_with("join"));
    assert!(churn[0]["total_route_changes_per_table"].as_u64().unwrap() <= 2);
    assert!(churn.iter().all(|c| c["blocks_moved"] == 0));
}
