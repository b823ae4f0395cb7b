//! `underlay agent` as a real process: kill -9 after 1,000 allocations, a crash between checkpoint and reply
//! (the `UNDERLAY_AGENT_FAULT=exit-after-checkpoint` knob), restarts, and a refused corrupt checkpoint.
//! Every run lives in its own temp dir (socket, checkpoint, CNI dirs); nothing needs root.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use underlay_ipam_api::{AllocateRequest, AttachmentKey, Client, ClientError};

const BIN: &str = env!("CARGO_BIN_EXE_underlay");

/// A running agent process, killed (SIGKILL) and reaped on drop.
struct AgentProc {
    child: Option<Child>,
    socket: PathBuf,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl AgentProc {
    fn kill9(mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap(); // SIGKILL
        let status = c.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }

    /// Waits (bounded) for the process to exit on its own.
    fn wait_exit(mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        for _ in 0..500 {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        panic!("agent did not exit within 5 s");
    }
}

fn agent_cmd(dir: &Path, pool: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("agent")
        .args(["--pool", pool])
        .arg("--socket")
        .arg(dir.join("agent.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--cni-conf-dir")
        .arg(dir.join("net.d"))
        .arg("--cni-bin-dir")
        .arg(dir.join("bin"))
        // This agent runs in the test process's namespace (the host's): its veths are not the agent's to sweep.
        .arg("--no-link-reaper")
        .env("RUST_LOG", "warn")
        .env_remove("UNDERLAY_AGENT_FAULT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Starts the agent and waits (bounded) for its socket to answer.
fn start(mut cmd: Command, socket: PathBuf) -> AgentProc {
    let child = cmd.spawn().expect("spawn underlay agent");
    let mut proc = AgentProc {
        child: Some(child),
        socket,
    };
    for _ in 0..1000 {
        if let Some(status) = proc.child.as_mut().unwrap().try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            let _ = proc
                .child
                .take()
                .unwrap()
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err);
            panic!("agent exited early ({status}): {err}");
        }
        if Client::connect(&proc.socket).is_ok() {
            return proc;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("agent did not answer within 10 s");
}

fn req(id: &str) -> AllocateRequest {
    AllocateRequest {
        key: Some(AttachmentKey::new(id, "eth0")),
        netns: format!("/var/run/netns/{id}"),
        pod_namespace: "crash".into(),
        pod_name: id.into(),
    }
}

fn listed(socket: &Path) -> BTreeMap<String, String> {
    Client::connect(socket)
        .unwrap()
        .list()
        .unwrap()
        .into_iter()
        .map(|a| (a.key.unwrap().container_id, a.address))
        .collect()
}

fn assert_one_owner(map: &BTreeMap<String, String>) {
    let distinct: BTreeSet<_> = map.values().collect();
    assert_eq!(distinct.len(), map.len(), "an address is held by two keys");
}

#[test]
fn thousand_adds_kill9_restart_then_crash_between_checkpoint_and_reply() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let pool = "100.64.0.0/22"; // 1,024 addresses

    // 1,000 ADDs, one connection each, as the plugin does.
    let agent = start(agent_cmd(dir.path(), pool), socket.clone());
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut want = BTreeMap::new();
    for i in 0..1000 {
        let id = format!("pod{i:04}");
        let a = Client::connect(&socket)
            .unwrap()
            .allocate(&req(&id))
            .unwrap();
        want.insert(id, a.address);
    }
    assert_one_owner(&want);
    agent.kill9();
    assert!(socket.exists(), "kill -9 leaves the socket file behind");

    // Restart over the stale socket: every address still assigned to exactly one container.
    let agent = start(agent_cmd(dir.path(), pool), socket.clone());
    assert_eq!(listed(&socket), want);
    let c = Client::connect(&socket).unwrap();
    for (id, addr) in &want {
        assert_eq!(&c.allocate(&req(id)).unwrap().address, addr, "{id}");
    }
    agent.kill9();

    // Crash after the checkpoint write and before the reply.
    let mut cmd = agent_cmd(dir.path(), pool);
    cmd.env("UNDERLAY_AGENT_FAULT", "exit-after-checkpoint");
    let agent = start(cmd, socket.clone());
    let err = Client::connect(&socket)
        .unwrap()
        .allocate(&req("crashy"))
        .unwrap_err();
    assert!(matches!(err, ClientError::Transport(_)), "{err:?}");
    assert!(err.is_retryable());
    let status = agent.wait_exit();
    assert_eq!(status.code(), Some(86), "{status:?}");

    // Restart: the unacknowledged allocation was durable; the retry gets the same address; nothing is shared.
    let agent = start(agent_cmd(dir.path(), pool), socket.clone());
    let after = listed(&socket);
    let crashy = after
        .get("crashy")
        .expect("the checkpointed allocation survived")
        .clone();
    assert_eq!(after.len(), 1001);
    assert_one_owner(&after);
    let retry = Client::connect(&socket)
        .unwrap()
        .allocate(&req("crashy"))
        .unwrap();
    assert_eq!(retry.address, crashy);

    // DEL of all of them leaves no allocation behind.
    let c = Client::connect(&socket).unwrap();
    for id in after.keys() {
        assert!(
            c.release(&AttachmentKey::new(id, "eth0"))
                .unwrap()
                .is_some()
        );
    }
    assert!(listed(&socket).is_empty());
    agent.kill9();
    let agent = start(agent_cmd(dir.path(), pool), socket.clone());
    assert!(listed(&socket).is_empty(), "releases were durable too");
    drop(agent);
}

#[test]
fn corrupt_checkpoint_stops_the_binary_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(dir.path().join("state/ipam.json"), "{\"version\":1,").unwrap();
    let out = agent_cmd(dir.path(), "100.64.0.0/28")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is corrupt"), "{err}");
    assert!(err.contains("refusing to start"), "{err}");
    assert!(!dir.path().join("agent.sock").exists());
    assert!(
        !dir.path().join("net.d").exists(),
        "no CNI config for a refused start"
    );
}

#[test]
fn config_file_is_read_and_conflist_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let socket = d.join("s/agent.sock");
    let plugin = d.join("underlay-cni-src");
    std::fs::write(&plugin, b"#!/bin/sh\nexit 0\n").unwrap();
    let yaml = format!(
        "pool:\n  block: 100.64.9.0/29\ncooldown_secs: 5\nsocket: {}\ncheckpoint: {}\ncni_conf_dir: {}\ncni_bin_dir: {}\nmtu: 1400\nplugin_source: {}\n",
        socket.display(),
        d.join("st/ipam.json").display(),
        d.join("net.d").display(),
        d.join("bin").display(),
        plugin.display(),
    );
    std::fs::write(d.join("agent.yaml"), yaml).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("agent")
        .arg("--config")
        .arg(d.join("agent.yaml"))
        .arg("--no-link-reaper")
        .env("RUST_LOG", "warn")
        .env_remove("UNDERLAY_AGENT_FAULT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let agent = start(cmd, socket.clone());
    let a = Client::connect(&socket)
        .unwrap()
        .allocate(&req("x"))
        .unwrap();
    assert_eq!(a.address, "100.64.9.0/32");
    assert_eq!(a.mtu, 1400);
    let conflist: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("net.d/10-underlay.conflist")).unwrap())
            .unwrap();
    assert_eq!(conflist["plugins"][0]["type"], "underlay-cni");
    assert_eq!(conflist["plugins"][0]["mtu"], 1400);
    assert_eq!(conflist["plugins"][0]["socket"], socket.to_str().unwrap());
    let installed = d.join("bin/underlay-cni");
    assert_eq!(std::fs::read(&installed).unwrap(), b"#!/bin/sh\nexit 0\n");
    assert_eq!(
        std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
        0o755
    );
    // SIGTERM: clean shutdown removes the socket.
    let pid = agent.child.as_ref().unwrap().id();
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = agent.wait_exit();
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists());
}
