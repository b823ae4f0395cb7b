//! `underlay lab` end to end: the demo on a small cluster (every pair reachable, no encapsulation, a forwarder
//! killed and its routes moved and returned after the hold-down), the background lab driven command by command,
//! and `lab down` cleaning up after a lab whose process was killed. Needs root.
#![cfg(feature = "root-tests")]

mod common;

use std::process::Command;

use common::{Guard, lab_namespaces, plugin, run};
use serde_json::Value;

/// After `lab recover <victim>`: every pair answers again within 20 s (a check every 2 s).
fn assert_heals(lab: &str, victim: &str) {
    let healed = (0..10).any(|_| {
        std::thread::sleep(std::time::Duration::from_secs(2));
        run(&["lab", "check", "--name", lab]).status.success()
    });
    assert!(
        healed,
        "pairs still unreachable 20 s after {victim} recovered"
    );
}

/// The labs run one at a time: each is a whole cluster, and the failover timing wants the machine to itself.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn name(tag: &str) -> String {
    format!("{tag}{:03x}", std::process::id() % 4096)
}

/// Eni mode: pods get ENI addresses (16 per m5.xlarge node outgrow the primary ENI's 14 secondaries, so second
/// ENIs carry pods), source/dest check stays on for every ENI, and every path class answers: pod↔pod across
/// zones, a VPC host outside the cluster, the internet. Then the churn: 15 more pods per node grow every pool
/// by an ENI's worth, leave, and the excess is unassigned while the 16 pods that stayed keep their addresses.
#[test]
fn eni_demo_passes_with_source_dest_check_on_everywhere() {
    let _s = serial();
    let plugin = plugin();
    let lab = name("e");
    let _g = Guard(lab.clone());
    let out = run(&[
        "lab",
        "demo",
        "--name",
        &lab,
        "--mode",
        "eni",
        "--instance-type",
        "m5.xlarge",
        "--zones",
        "2",
        "--subnets-per-zone",
        "1",
        "--nodes",
        "4",
        "--pods-per-node",
        "16",
        "--format",
        "json",
        "--cni-plugin",
        plugin.to_str().unwrap(),
    ]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert!(out.status.success(), "{report:#}");
    assert_eq!(report["passed"], true);
    assert_eq!(report["pods"], 64);
    assert_eq!(report["status"]["mode"], "eni");
    // More than one ENI per node, none with the check off.
    assert!(
        report["status"]["enis"].as_u64().unwrap() > 4,
        "{:#}",
        report["status"]
    );
    assert!(
        report["status"]["source_dest_check_off"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(report["pairs_ok"], report["pairs_checked"]);
    for class in [
        "same_node",
        "same_subnet",
        "other_subnet_eni",
        "pod_to_vpc_host",
        "pod_to_internet",
    ] {
        let c = &report["check"]["classes"][class];
        assert!(c["pairs"].as_u64().unwrap() > 0, "{class}: {c:#}");
        assert_eq!(c["ok"], c["pairs"], "{class}");
    }
    // No VPC route for pods, no failover: eni mode has no forwarders.
    assert!(report["failover"].is_null());
    assert!(
        report["api_calls"]["AttachNetworkInterface"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(report["status"]["throttled"], 0);
    // The churn: pools grew by at least an ENI's worth per node (14 addresses), shrank back, EC2 holds exactly
    // the pools, and no staying pod lost its address or its connectivity.
    let churn = &report["churn"];
    assert_eq!(churn["pods_added"], 60, "{churn:#}");
    let (before, peak, after) = (
        churn["pool_before"].as_u64().unwrap(),
        churn["pool_peak"].as_u64().unwrap(),
        churn["pool_after"].as_u64().unwrap(),
    );
    assert!(peak >= before + 4 * 14, "{churn:#}");
    assert!(after < peak, "{churn:#}");
    assert_eq!(churn["assigned_after"], churn["pool_after"]);
    assert!(churn["unassign_calls"].as_u64().unwrap() > 0);
    // The ENI each node grew by was emptied, detached and deleted.
    assert!(
        churn["enis_peak"].as_u64().unwrap() > churn["enis_before"].as_u64().unwrap(),
        "{churn:#}"
    );
    assert_eq!(churn["enis_after"], churn["enis_before"], "{churn:#}");
    assert!(churn["detach_calls"].as_u64().unwrap() > 0);
    assert_eq!(churn["delete_calls"], churn["detach_calls"]);
    assert!(churn["settle_ms"].is_number(), "{churn:#}");
    assert!(churn["kept_pods_unassigned"].as_array().unwrap().is_empty());
    assert_eq!(churn["check"]["pairs_ok"], churn["check"]["pairs_checked"]);
    assert!(lab_namespaces(&lab).is_empty());
}

#[test]
fn demo_on_a_small_cluster_passes_and_leaves_nothing() {
    let _s = serial();
    let plugin = plugin();
    let lab = name("d");
    let _g = Guard(lab.clone());
    let out = run(&[
        "lab",
        "demo",
        "--name",
        &lab,
        "--zones",
        "2",
        "--subnets-per-zone",
        "1",
        "--nodes",
        "4",
        "--pods-per-node",
        "2",
        "--route-limit",
        "4",
        "--hold-down-s",
        "3",
        "--format",
        "json",
        "--cni-plugin",
        plugin.to_str().unwrap(),
    ]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert!(out.status.success(), "{report:#}");
    assert_eq!(report["passed"], true);
    assert_eq!(report["nodes"], 4);
    assert_eq!(report["pods"], 8);
    assert!(report["pairs_checked"].as_u64().unwrap() > 0);
    assert_eq!(report["pairs_ok"], report["pairs_checked"]);
    for (_, n) in report["routes_per_table"].as_object().unwrap() {
        assert!(n.as_u64().unwrap() <= 4);
    }
    // Two subnets of two nodes, one pod route per table: one block of each subnet sits behind a forwarder.
    assert!(
        report["check"]["classes"]["other_subnet_forwarder"]["pairs"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(
        report["check"]["encap_devices"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let f = &report["failover"];
    assert!(f["blackhole_ms"].as_f64().unwrap() < 3000.0, "{f:#}");
    assert_eq!(f["only_its_routes_moved"], true);
    assert!(f["failback_ms"].as_f64().unwrap() >= 3000.0, "{f:#}");
    assert!(report["api_calls"]["CreateRoute"].as_u64().unwrap() > 0);
    // Every controller call waits in the rate-aware queue: vpcsim, which enforces AWS's buckets, throttles none.
    assert_eq!(report["status"]["throttled"], 0);
    assert!(lab_namespaces(&lab).is_empty());
}

#[test]
fn a_background_lab_answers_each_command_and_down_removes_it() {
    let _s = serial();
    let plugin = plugin();
    let lab = name("b");
    let _g = Guard(lab.clone());
    let p = plugin.to_str().unwrap();
    let shape = [
        "--name",
        &lab,
        "--zones",
        "1",
        "--subnets-per-zone",
        "2",
        "--nodes",
        "3",
        "--pods-per-node",
        "1",
        "--route-limit",
        "4",
        "--hold-down-s",
        "2",
    ];
    let up = run(&[
        &["lab", "up"][..],
        &shape[..],
        &["--format", "json", "--cni-plugin", p],
    ]
    .concat());
    assert!(up.status.success());
    let status: Value = serde_json::from_slice(&up.stdout).unwrap();
    assert_eq!(status["nodes"], 3);
    // A second `up` of the same lab is refused.
    let again = run(&[&["lab", "up"][..], &shape[..], &["--cni-plugin", p]].concat());
    assert!(!again.status.success());

    let check = run(&["lab", "check", "--name", &lab, "--format", "json"]);
    assert!(check.status.success());
    let check: Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(check["pairs_ok"], check["pairs_checked"]);

    let st: Value =
        serde_json::from_slice(&run(&["lab", "status", "--name", &lab, "--format", "json"]).stdout)
            .unwrap();
    assert_eq!(st["pods"], 3);
    // The human forms are the reports' own renderings, not a dump of the JSON.
    let human = String::from_utf8(run(&["lab", "status", "--name", &lab]).stdout).unwrap();
    assert!(
        human.contains("3 nodes, 3 pods") && human.contains("routes per table:"),
        "{human}"
    );
    let human = String::from_utf8(run(&["lab", "check", "--name", &lab]).stdout).unwrap();
    assert!(
        human.contains("connectivity: ") && human.contains("same_subnet"),
        "{human}"
    );

    // Failing a node the lab does not have is an error, and the lab carries on.
    assert!(
        !run(&["lab", "fail", "--name", &lab, "no-such-node"])
            .status
            .success()
    );
    // A failed node's pod is unreachable; recovered, every pair is reachable again.
    let victim = st["node_names"][2].as_str().unwrap().to_owned();
    assert!(
        run(&["lab", "fail", "--name", &lab, &victim])
            .status
            .success()
    );
    assert!(!run(&["lab", "check", "--name", &lab]).status.success());
    assert!(
        run(&["lab", "recover", "--name", &lab, &victim])
            .status
            .success()
    );
    assert_heals(&lab, &victim);

    let down = run(&["lab", "down", "--name", &lab]);
    assert!(down.status.success());
    assert!(lab_namespaces(&lab).is_empty());
    assert!(!run(&["lab", "status", "--name", &lab]).status.success());
    // Nothing of it stays on disk either: state directory and log.
    let tmp = std::env::temp_dir();
    assert!(!tmp.join(format!("underlay-lab-{lab}")).exists());
    assert!(!tmp.join(format!("underlay-lab-{lab}.log")).exists());
}

#[test]
fn down_cleans_up_after_a_killed_lab_process() {
    let _s = serial();
    let plugin = plugin();
    let lab = name("k");
    let _g = Guard(lab.clone());
    let up = run(&[
        "lab",
        "up",
        "--name",
        &lab,
        "--zones",
        "1",
        "--subnets-per-zone",
        "1",
        "--nodes",
        "1",
        "--pods-per-node",
        "1",
        "--cni-plugin",
        plugin.to_str().unwrap(),
    ]);
    assert!(up.status.success());
    assert!(!lab_namespaces(&lab).is_empty());
    // Kill the background process the hard way: nothing of its own teardown runs.
    let pids = Command::new("pgrep")
        .args(["-f", &format!("lab serve --name={lab} ")])
        .output()
        .unwrap();
    let pids = String::from_utf8_lossy(&pids.stdout).to_string();
    assert!(!pids.trim().is_empty(), "no serve process found");
    for pid in pids.split_whitespace() {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
    let down = run(&["lab", "down", "--name", &lab]);
    assert!(down.status.success());
    assert!(lab_namespaces(&lab).is_empty());
}

/// Interfaces of a lab node's namespace (found by the node's IP on eth0), with whether each is up.
fn node_links(lab: &str, node_ip: &str) -> Vec<(String, bool)> {
    let ns = lab_namespaces(lab)
        .into_iter()
        .find(|ns| {
            let out = Command::new("ip")
                .args(["-n", ns, "-4", "-o", "addr", "show", "dev", "eth0"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains(&format!(" {node_ip}/"))
        })
        .expect("the node's namespace");
    let out = Command::new("ip")
        .args(["-n", &ns, "-j", "link", "show"])
        .output()
        .unwrap();
    let links: Value = serde_json::from_slice(&out.stdout).unwrap();
    links
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let up = l["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "UP"));
            (l["ifname"].as_str().unwrap().to_string(), up)
        })
        .collect()
}

/// Eni mode's `fail` stops a node as a dead instance stops: every ENI goes down, not only the primary (with 12
/// pods on an m5.large, 9 addresses per ENI, the second ENI carries pods and would keep answering); `recover`
/// brings them back and every pair answers again. (A check while the node is down is not run here: each of
/// its hundreds of dead pairs costs three timed-out tries.)
#[test]
fn eni_fail_stops_every_eni_of_the_node_and_recover_brings_it_back() {
    let _s = serial();
    let plugin = plugin();
    let lab = name("f");
    let _g = Guard(lab.clone());
    let up = run(&[
        "lab",
        "up",
        "--name",
        &lab,
        "--mode",
        "eni",
        "--zones",
        "2",
        "--subnets-per-zone",
        "1",
        "--nodes",
        "2",
        "--pods-per-node",
        "12",
        "--format",
        "json",
        "--cni-plugin",
        plugin.to_str().unwrap(),
    ]);
    assert!(up.status.success());
    let status: Value = serde_json::from_slice(&up.stdout).unwrap();
    let victim = status["node_names"][0].as_str().unwrap().to_string();
    let ip = victim.trim_start_matches("ip-").replace('-', ".");
    let enis = |links: &[(String, bool)]| -> Vec<(String, bool)> {
        links
            .iter()
            .filter(|(n, _)| n.starts_with("eth"))
            .cloned()
            .collect()
    };
    let before = enis(&node_links(&lab, &ip));
    assert!(before.len() >= 2, "{before:?}");
    assert!(before.iter().all(|(_, up)| *up), "{before:?}");
    assert!(
        run(&["lab", "fail", "--name", &lab, &victim])
            .status
            .success()
    );
    let failed = enis(&node_links(&lab, &ip));
    assert_eq!(failed.len(), before.len());
    assert!(
        failed.iter().all(|(_, up)| !*up),
        "an ENI of the failed node is still up: {failed:?}"
    );
    assert!(
        run(&["lab", "recover", "--name", &lab, &victim])
            .status
            .success()
    );
    assert_heals(&lab, &victim);
    assert!(
        enis(&node_links(&lab, &ip)).iter().all(|(_, up)| *up),
        "recovered"
    );
    assert!(run(&["lab", "down", "--name", &lab]).status.success());
    assert!(lab_namespaces(&lab).is_empty());
}
