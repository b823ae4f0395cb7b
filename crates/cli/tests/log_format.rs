//! `UNDERLAY_LOG_FORMAT=json` makes the agent log one JSON object per line on stderr (the chart's `logFormat`).
//! The agent here serves only its IPAM socket in temp directories (no routed spec, no link reaper): it changes
//! nothing in any network namespace.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The agent's stderr lines up to "IPAM socket listening" (bounded: 20 s), with `format` in the environment.
fn agent_log(format: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut child = Command::new(env!("CARGO_BIN_EXE_underlay"))
        .args(["agent", "--pool", "100.64.0.0/28", "--no-link-reaper"])
        .arg("--socket")
        .arg(d.join("agent.sock"))
        .arg("--state-dir")
        .arg(d)
        .arg("--cni-conf-dir")
        .arg(d.join("net.d"))
        .arg("--cni-bin-dir")
        .arg(d.join("bin"))
        .env("RUST_LOG", "info")
        .env(underlay_core::names::LOG_FORMAT_ENV, format)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => {
                let done = l.contains("IPAM socket listening");
                lines.push(l);
                if done {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.iter().any(|l| l.contains("IPAM socket listening")),
        "the agent did not start: {lines:?}"
    );
    lines
}

#[test]
fn json_log_format_writes_one_object_per_line() {
    let lines = agent_log("json");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
        assert!(v["fields"]["message"].is_string(), "{l}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains(r#""message":"IPAM socket listening""#))
    );
}

#[test]
fn text_is_the_default_and_an_unknown_format_says_so() {
    let text = agent_log("");
    assert!(
        text.iter()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_err())
    );
    let odd = agent_log("yaml");
    assert!(
        odd.iter().any(|l| l.contains("neither text nor json")),
        "{odd:?}"
    );
}
