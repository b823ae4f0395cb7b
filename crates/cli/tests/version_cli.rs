//! `underlay version`: text and JSON agree with `--version`; a bad format is a usage error (exit code 2).

use std::process::Command;

fn underlay(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_underlay"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn version_in_text_and_json_matches_dash_dash_version() {
    let flag = String::from_utf8(underlay(&["--version"]).stdout).unwrap();
    let text = String::from_utf8(underlay(&["version"]).stdout).unwrap();
    assert_eq!(text.lines().next(), Some(flag.trim()));
    assert!(text.contains("platform linux/x86_64"), "{text}");
    let out = underlay(&["version", "--format", "json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        format!("underlay {}", v["version"].as_str().unwrap()),
        flag.trim()
    );
    assert_eq!(v["os"], "linux");
    let bad = underlay(&["version", "--format", "xml"]);
    assert_eq!(bad.status.code(), Some(2));
}
