//! The configuration list the agent writes, run as a runtime runs it (CNI spec: ADD through the plugins in
//! order, each given the previous result as `prevResult`; DEL in reverse order with the list's result):
//! underlay-cni, then Debian's reference `portmap` (capability portMappings) and `bandwidth` (capability
//! bandwidth), with their `runtimeConfig`. Checks portmap's DNAT and bandwidth's qdisc in the node namespace
//! after ADD, CHECK through the list (portmap's known IPv4-only failure pinned), and that DEL removes them.
#![cfg(feature = "root-tests")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Node, PLUGIN, REFERENCE_PLUGINS, exec_in};
use serde_json::{Value, json};
use underlay_cni::naming::host_veth_name;
use underlay_dataplane::testns::TestNs;

const HOST_PORT: u16 = 18080;
const CONTAINER_PORT: u16 = 80;
/// bits/s and bits, as the bandwidth capability takes them.
const INGRESS_RATE: u64 = 8_000_000;
const INGRESS_BURST: u64 = 800_000;

fn plugin_path(ty: &str) -> PathBuf {
    if ty == "underlay-cni" {
        PathBuf::from(PLUGIN)
    } else {
        Path::new(REFERENCE_PLUGINS).join(ty)
    }
}

/// One plugin's configuration as the runtime derives it from the list (spec §"Deriving execution
/// configuration"): the list's `cniVersion` and `name`, `runtimeConfig` for the capabilities it declares,
/// and `prevResult`.
fn plugin_conf(list: &Value, plugin: &Value, runtime: &Value, prev: Option<&Value>) -> Value {
    let mut c = plugin.clone();
    c["cniVersion"] = list["cniVersion"].clone();
    c["name"] = list["name"].clone();
    if let Some(caps) = plugin["capabilities"].as_object() {
        let mut rc = serde_json::Map::new();
        for (cap, on) in caps {
            if on == &json!(true)
                && let Some(v) = runtime.get(cap)
            {
                rc.insert(cap.clone(), v.clone());
            }
        }
        if !rc.is_empty() {
            c["runtimeConfig"] = Value::Object(rc);
        }
    }
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    c
}

/// Runs `command` over the list; ADD in order (threading results), DEL in reverse with `result`.
fn run_list(
    node: &Node,
    list: &Value,
    runtime: &Value,
    command: &str,
    pod: &TestNs,
    result: Option<&Value>,
) -> Option<Value> {
    let plugins: Vec<&Value> = list["plugins"].as_array().unwrap().iter().collect();
    let ordered: Vec<&Value> = if command == "DEL" {
        plugins.into_iter().rev().collect()
    } else {
        plugins
    };
    let mut prev = result.cloned();
    for p in ordered {
        let ty = p["type"].as_str().unwrap();
        let conf = plugin_conf(list, p, runtime, prev.as_ref());
        let pod_path = pod.path();
        let reply = exec_in(
            &node.ns,
            &plugin_path(ty),
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", "chain1"),
                ("CNI_NETNS", &pod_path),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", REFERENCE_PLUGINS),
            ],
            &serde_json::to_vec(&conf).unwrap(),
        );
        assert!(reply.ok, "{command} {ty} failed: {reply:?}\nconf: {conf}");
        if command == "ADD" {
            assert_eq!(
                reply.json["cniVersion"], list["cniVersion"],
                "{ty}: {reply:?}"
            );
            prev = Some(reply.json.clone());
        }
    }
    prev
}

/// `iptables-save -t nat` in the node namespace (iptables-nft: tables of that namespace only).
fn node_nat(node: &Node) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", node.ns.path()))
        .args(["iptables-save", "-t", "nat"])
        .output()
        .expect("iptables-save");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn node_qdiscs(node: &Node, dev: &str) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", node.ns.path()))
        .args(["tc", "qdisc", "show", "dev", dev])
        .output()
        .expect("tc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn agent_conflist_chains_with_portmap_and_bandwidth() {
    let node = Node::new("ulcni-chain", "100.64.23.0/28");
    let pod = TestNs::new("ulcni-chain-p").unwrap();
    // Exactly what the agent writes (with this node's socket).
    let list = underlay_agent::cni_install::conflist(&node.socket(), 1500);
    let types: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["underlay-cni", "portmap", "bandwidth"]);
    let runtime = json!({
        "portMappings": [{ "hostPort": HOST_PORT, "containerPort": CONTAINER_PORT, "protocol": "tcp" }],
        "bandwidth": { "ingressRate": INGRESS_RATE, "ingressBurst": INGRESS_BURST },
    });
    let host_veth = host_veth_name("chain1", "eth0");

    assert!(!node_nat(&node).contains(&format!("--dport {HOST_PORT}")));
    let result = run_list(&node, &list, &runtime, "ADD", &pod, None).unwrap();
    let pod_ip = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .to_string();
    assert_eq!(result["interfaces"][0]["name"], host_veth.as_str());

    // portmap: DNAT of the host port to the pod.
    let nat = node_nat(&node);
    assert!(
        nat.lines()
            .any(|l| l.contains(&format!("--dport {HOST_PORT}"))
                && l.contains(&format!("--to-destination {pod_ip}:{CONTAINER_PORT}"))),
        "no DNAT {HOST_PORT} → {pod_ip}:{CONTAINER_PORT} in:\n{nat}"
    );
    // bandwidth: ingress shaping is a tbf qdisc on the host veth.
    let q = node_qdiscs(&node, &host_veth);
    assert!(q.contains("tbf"), "no tbf qdisc on {host_veth}: {q}");

    // underlay-cni's CHECK with the list's result as prevResult.
    let conf = plugin_conf(&list, &list["plugins"][0], &runtime, Some(&result));
    let pod_path = pod.path();
    let r = exec_in(
        &node.ns,
        Path::new(PLUGIN),
        &[
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "chain1"),
            ("CNI_NETNS", &pod_path),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", REFERENCE_PLUGINS),
        ],
        &serde_json::to_vec(&conf).unwrap(),
    );
    assert!(r.ok, "{r:?}");

    // CHECK through the whole list, as a runtime runs it (each plugin with the list's result). underlay-cni and
    // bandwidth pass. Debian 12's portmap (containernetworking-plugins 1.1.1) fails on an IPv4-only pod: it
    // checks an IPv6 DNAT chain it never created (containernetworking/plugins#819). Pinned here so the day the
    // shipped portmap is fixed this fails and the whole chain's CHECK becomes the assertion (docs/cni.md).
    for p in list["plugins"].as_array().unwrap() {
        let ty = p["type"].as_str().unwrap();
        let conf = plugin_conf(&list, p, &runtime, Some(&result));
        let r = exec_in(
            &node.ns,
            &plugin_path(ty),
            &[
                ("CNI_COMMAND", "CHECK"),
                ("CNI_CONTAINERID", "chain1"),
                ("CNI_NETNS", &pod_path),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", REFERENCE_PLUGINS),
            ],
            &serde_json::to_vec(&conf).unwrap(),
        );
        if ty == "portmap" {
            assert!(
                !r.ok
                    && r.json["msg"]
                        .as_str()
                        .is_some_and(|m| m.contains("could not check ipv6 dnat")),
                "portmap's CHECK no longer fails on IPv4-only pods: assert the whole chain passes: {r:?}"
            );
        } else {
            assert!(r.ok, "CHECK {ty}: {r:?}");
        }
    }

    run_list(&node, &list, &runtime, "DEL", &pod, Some(&result));
    let nat = node_nat(&node);
    assert!(
        !nat.contains(&format!("--dport {HOST_PORT}")) && !nat.contains(&pod_ip),
        "portmap left rules after DEL:\n{nat}"
    );
    assert!(node.allocations().is_empty());
    assert!(node.pod_routes().is_empty());
    // The qdisc goes with the veth, which the agent deletes after DEL.
    assert!(node.wait_host_veths_gone().is_empty());
    assert!(!node_qdiscs(&node, &host_veth).contains("tbf"));
}
