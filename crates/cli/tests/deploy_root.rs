//! The agent DaemonSet's security settings, as the chart renders them, are enough and each capability is needed:
//! the chart's init-container script sets the node's sysctls, then `underlay agent --routed-spec` runs under
//! podman/runc with exactly the container's capabilities (no SYS_ADMIN), podman's default seccomp filter, no
//! privilege escalation, no `nsenter` in its image and a read-only root file system, in a test namespace standing
//! for the node's: it turns ready and serves a pod's ADD and DEL from `underlay-cni`; with the capability dropped it
//! does not converge. Needs root, podman and runc (scripts/setup.sh), helm (.tools/bin).
#![cfg(feature = "root-tests")]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml::Value;
use underlay_dataplane::testns::TestNs;
use underlay_dataplane::{Netns, VethSpec};

const BIN: &str = env!("CARGO_BIN_EXE_underlay");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The rendered DaemonSet `underlay-agent` (default values and the example's required ones).
fn agent_daemonset() -> Value {
    let helm = root().join(".tools/bin/helm");
    assert!(
        helm.is_file(),
        "{} not found: run scripts/setup.sh",
        helm.display()
    );
    let out = Command::new(helm)
        .current_dir(root())
        .args([
            "template",
            "underlay",
            "deploy/helm/underlay",
            "-n",
            "kube-system",
            "-f",
            "examples/values-routed.yaml",
        ])
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("underlay-deploy-root-helm"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "underlay-agent")
        .expect("no DaemonSet underlay-agent")
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// A root file system holding `files` (host path → path inside) and the shared libraries they load.
fn rootfs(dir: &Path, files: &[(&str, &str)]) {
    for sub in ["proc", "sys", "dev", "tmp", "etc", "run", "state"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    for (host, inside) in files {
        let to = dir.join(inside.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(host, &to).unwrap();
        let ldd = Command::new("ldd").arg(host).output().unwrap();
        for lib in String::from_utf8_lossy(&ldd.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            let to = dir.join(lib.trim_start_matches('/'));
            if !to.exists() {
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                std::fs::copy(lib, &to).unwrap();
            }
        }
    }
}

fn which(program: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .unwrap();
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        !path.is_empty(),
        "{program} not found: run scripts/setup.sh"
    );
    path
}

/// Removes the container on every exit path.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "-f", &self.0]).output();
    }
}

/// `GET /readyz` on 127.0.0.1:<port> inside `ns`: (status, body), or None if nothing answers.
fn readyz(ns: &Netns, port: u16) -> Option<(u16, String)> {
    ns.run(move || {
        Ok((|| {
            let mut s = TcpStream::connect_timeout(
                &format!("127.0.0.1:{port}").parse().unwrap(),
                Duration::from_secs(1),
            )
            .ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                .ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            let code = text.get(9..12)?.parse().ok()?;
            Some((code, text.split("\r\n\r\n").nth(1)?.trim().to_string()))
        })())
    })
    .unwrap()
}

/// underlay-cni next to the underlay binary, built (or brought up to date) here.
fn plugin() -> PathBuf {
    let p = Path::new(BIN).parent().unwrap().join("underlay-cni");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "-p", "underlay-cni"])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(p.is_file(), "{} missing", p.display());
    p
}

/// Runs underlay-cni `command` in `node` for a pod whose namespace is `pod`, against the agent socket `socket`;
/// returns the plugin's stdout (its JSON result) or panics with its error.
fn cni(node: &TestNs, pod: &TestNs, socket: &Path, command: &str) -> String {
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "underlay", "type": "underlay-cni",
        "socket": socket, "mtu": 1500,
    });
    let plugin = plugin();
    let mut child = node
        .command(plugin.to_str().unwrap())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "deployroot0")
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", plugin.parent().unwrap())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "underlay-cni {command}: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// While the agent is ready: a pod's ADD gets an address of the node's block, wired in the pod's namespace, and
/// its DEL gives it back.
fn add_and_del(node: &TestNs, state: &Path) {
    let pod = TestNs::new("uldep").unwrap();
    let socket = state.join("agent.sock");
    let added: serde_json::Value = serde_json::from_str(&cni(node, &pod, &socket, "ADD")).unwrap();
    let ip = added["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(ip.starts_with("100.64.0."), "{added}");
    let listed = underlay_ipam_api::Client::connect(&socket)
        .unwrap()
        .list()
        .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let out = pod
        .command("ip")
        .args(["-4", "addr", "show", "eth0"])
        .output()
        .unwrap();
    let addrs = String::from_utf8_lossy(&out.stdout);
    assert!(addrs.contains(&ip), "{ip} not on the pod's eth0: {addrs}");
    cni(node, &pod, &socket, "DEL");
    let listed = underlay_ipam_api::Client::connect(&socket)
        .unwrap()
        .list()
        .unwrap();
    assert!(listed.is_empty(), "DEL released nothing: {listed:?}");
}

/// Runs the agent in `node` under podman with `caps`: the last /readyz answer once it is ready or has reported a
/// failed converge (bounded: 100 × 100 ms), and the agent's log. Once ready, `while_ready` runs with the host
/// path of the agent's state directory (socket and checkpoint).
fn run_agent(
    node: &TestNs,
    caps: &[String],
    read_only: bool,
    tag: &str,
    while_ready: impl FnOnce(&Path),
) -> (Option<(u16, String)>, String) {
    let dir = tempfile::tempdir().unwrap();
    let fs = dir.path().join("rootfs");
    // No nsenter in the image: the agent runs nft directly in its own namespace.
    let nft = which("nft");
    rootfs(
        &fs,
        &[
            (BIN, "/usr/local/bin/underlay"),
            (nft.as_str(), "/usr/sbin/nft"),
        ],
    );
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("node.yaml"),
        "node: i-a\nsubnet: subnet-1\nnode_ip: 198.18.0.10\npod_block: 100.64.0.0/26\n\
         pod_cidr: 100.64.0.0/10\nvpc_cidrs: [198.18.0.0/15]\nmtu: 1500\n\
         peer_routes:\n  - { destination: 100.64.0.64/26, via: 198.18.0.11, peer: i-b }\n",
    )
    .unwrap();
    let name = format!("{}-{tag}", node.name());
    let guard = Container(name.clone());
    let mut c = Command::new("podman");
    c.args(["run", "-d", "--name", &name])
        .arg(format!("--network=ns:{}", node.path()))
        .arg("--cap-drop=ALL")
        // Lower limits than podman's defaults: raising them needs CAP_SYS_RESOURCE, which the pod does not get.
        .args([
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=4096:4096",
        ])
        .args(["--security-opt", "label=disable"])
        // The manifest's allowPrivilegeEscalation: false; podman's default seccomp filter stands for RuntimeDefault.
        .args(["--security-opt", "no-new-privileges"])
        .arg("-v")
        .arg(format!("{}:/state:rw", state.display()));
    if !caps.is_empty() {
        c.arg(format!("--cap-add={}", caps.join(",")));
    }
    if read_only {
        c.arg("--read-only");
    }
    // The root file system, then the command: podman takes everything after it as the command.
    c.arg("--rootfs").arg(&fs);
    c.args([
        "/usr/local/bin/underlay",
        "agent",
        "--routed-spec",
        "/state/node.yaml",
        "--health-addr",
        "127.0.0.1:9650",
        "--socket",
        "/state/agent.sock",
        "--state-dir",
        "/state",
        "--cni-conf-dir",
        "/state/net.d",
        "--cni-bin-dir",
        "/state/bin",
    ]);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut last = None;
    for _ in 0..100 {
        last = readyz(node.netns(), 9650);
        match &last {
            Some((200, _)) => break,
            Some((_, body)) if body.contains("not converged") => break,
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    if matches!(&last, Some((200, _))) {
        while_ready(&state);
    }
    let logs = Command::new("podman")
        .args(["logs", &name])
        .output()
        .unwrap();
    drop(guard);
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );
    (last, logs)
}

#[test]
fn agent_runs_with_the_daemonsets_capabilities_and_needs_each() {
    let ds = agent_daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    let agent = &pod["containers"][0];
    let caps = strs(&agent["securityContext"]["capabilities"]["add"]);
    let read_only = agent["securityContext"]["readOnlyRootFilesystem"] == true;
    let script = strs(&pod["initContainers"][0]["command"]);
    assert_eq!(script[..2], ["/bin/sh", "-ec"]);

    let node = TestNs::new("uldep").unwrap();
    let wire = TestNs::new("uldep").unwrap();
    let mut nl = node.netns().netlink().unwrap();
    nl.veth_add(&VethSpec {
        name: "up0",
        peer_name: "wire0",
        peer_netns: Some(wire.netns()),
        mtu: None,
        mac: None,
        peer_mac: None,
        up: true,
    })
    .unwrap();
    let up = nl.link_by_name("up0").unwrap().unwrap().index;
    nl.addr_add(up, "198.18.0.10/24".parse().unwrap()).unwrap();

    // Before the init container: the agent cannot write the sysctls from its read-only /proc/sys.
    let (before, logs) = run_agent(&node, &caps, read_only, "a", |_| {});
    assert!(
        matches!(&before, Some((503, b)) if b.contains("Read-only file system")),
        "without the init container: {before:?}\n{logs}"
    );

    // The init container's script, in the node's namespace (the DaemonSet is hostNetwork).
    let out = node
        .command("sh")
        .args(["-ec", &script[2]])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut served = false;
    let (ready, logs) = run_agent(&node, &caps, read_only, "b", |state| {
        add_and_del(&node, state);
        served = true;
    });
    assert_eq!(
        ready,
        Some((200, "ok".to_string())),
        "caps {caps:?}\n{logs}"
    );
    assert!(served, "ADD and DEL did not run");
    assert!(
        !caps.iter().any(|c| c == "SYS_ADMIN"),
        "the agent must not need SYS_ADMIN: {caps:?}"
    );
    assert_eq!(
        agent["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "the agent must run under the runtime's seccomp filter"
    );

    for dropped in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        let tag = format!("no-{}", dropped.to_lowercase());
        let (got, logs) = run_agent(&node, &fewer, read_only, &tag, |_| {});
        // Not ready, and the kernel said why.
        assert!(
            !matches!(got, Some((200, _))) && logs.contains("Operation not permitted"),
            "without {dropped}: {got:?}\n{logs}"
        );
    }
}
