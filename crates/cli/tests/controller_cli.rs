//! `underlay controller` fails fast, and says why, when it has no Kubernetes configuration or bad arguments.

use std::process::Command;

fn underlay() -> Command {
    Command::new(env!("CARGO_BIN_EXE_underlay"))
}

#[test]
fn without_kubernetes_configuration_it_says_so_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let out = underlay()
        .args([
            "controller",
            "--vpc",
            "vpc-1",
            "--pod-cidr",
            "100.64.0.0/16",
            "--region",
            "us-east-1",
            // Never contacted: the run stops at the Kubernetes client.
            "--endpoint",
            "http://127.0.0.1:9",
            // The health endpoint comes up first: loopback, any free port.
            "--health-addr",
            "127.0.0.1:0",
        ])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("KUBECONFIG", dir.path().join("missing"))
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Kubernetes client configuration"), "{err}");
}

#[test]
fn a_malformed_pod_cidr_is_rejected() {
    let out = underlay()
        .args([
            "controller",
            "--vpc",
            "vpc-1",
            "--pod-cidr",
            "100.64.0.0/33",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pod-cidr"));
}

#[test]
fn a_taken_health_address_is_reported_before_anything_else() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = underlay()
        .args([
            "controller",
            "--vpc",
            "vpc-1",
            "--pod-cidr",
            "100.64.0.0/16",
            "--region",
            "us-east-1",
            "--endpoint",
            "http://127.0.0.1:9",
            "--health-addr",
            &addr,
        ])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("KUBECONFIG", dir.path().join("missing"))
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("binding the health endpoint on {addr}")),
        "{stderr}"
    );
}

#[test]
fn eni_mode_takes_its_flags_and_needs_a_cluster_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = underlay()
        .args([
            "controller",
            "--mode",
            "eni",
            "--cluster-name",
            "prod",
            "--warm-ip-target",
            "5",
            "--minimum-ip-target",
            "10",
            "--eni-subnet",
            "us-east-1a=subnet-0abc",
            "--eni-subnet",
            "us-east-1b=subnet-0def",
            "--eni-security-group",
            "sg-1",
            "--fill-at-join",
            "--release-delay-secs",
            "60",
            "--region",
            "us-east-1",
            "--endpoint",
            "http://127.0.0.1:9",
            "--health-addr",
            "127.0.0.1:0",
        ])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("KUBECONFIG", dir.path().join("missing"))
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Kubernetes client configuration"), "{err}");

    let out = underlay()
        .args(["controller", "--mode", "eni"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cluster-name"));
    let out = underlay().args(["controller"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vpc"));
}
