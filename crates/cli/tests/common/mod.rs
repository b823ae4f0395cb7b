//! What the `underlay lab` end-to-end tests share: the binaries, running a command with its stderr shown, the
//! lab's namespaces, and a guard that takes a lab down whatever happens to the test.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn underlay() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_underlay"))
}

/// underlay-cni next to the underlay binary (a workspace test run builds it; a lone package run builds it here).
pub fn plugin() -> PathBuf {
    let p = underlay().parent().unwrap().join("underlay-cni");
    if !p.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "underlay-cni"])
            .status()
            .unwrap();
        assert!(st.success());
    }
    assert!(p.is_file(), "{} missing", p.display());
    p
}

/// `underlay <args>`, its stderr printed (shown when the test fails).
pub fn run(args: &[&str]) -> Output {
    let out = Command::new(underlay()).args(args).output().unwrap();
    eprintln!(
        "underlay {}:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The network namespaces of lab `name` that exist now.
pub fn lab_namespaces(name: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("ul-{name}-")))
        .map(str::to_owned)
        .collect()
}

/// Removes the lab whatever happens to the test.
pub struct Guard(pub String);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new(underlay())
            .args(["lab", "down", "--name", &self.0])
            .output();
    }
}
