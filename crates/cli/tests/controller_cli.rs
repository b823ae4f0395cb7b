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

#[test]
fn a_malformed_node_selector_is_refused_before_anything_is_contacted() {
    // A Kubernetes API that would be contacted if the run got that far: it must see no connection.
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    api.set_nonblocking(true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n\
             users:\n- name: u\n  user: {{}}\n",
            api.local_addr().unwrap()
        ),
    )
    .unwrap();
    for (mode, extra) in [
        ("routed", ["--vpc", "vpc-1", "--pod-cidr", "100.64.0.0/16"]),
        ("eni", ["--cluster-name", "c1", "--warm-ip-target", "1"]),
    ] {
        let out = underlay()
            .args(["controller", "--mode", mode])
            .args(extra)
            .args([
                "--node-selector",
                "eks.amazonaws.com/nodegroup in (ng-underlay",
                "--region",
                "us-east-1",
                "--endpoint",
                "http://127.0.0.1:9",
                "--health-addr",
                "127.0.0.1:0",
            ])
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{mode}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--node-selector") && err.contains("invalid node selector"),
            "{mode}: {err}"
        );
        // Refused before tracing, the health endpoint, AWS or Kubernetes.
        assert!(
            !err.contains("health and metrics endpoint"),
            "{mode}: {err}"
        );
        assert!(
            matches!(api.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{mode}: the Kubernetes API was contacted"
        );
    }
}

#[test]
fn a_valid_node_selector_gets_past_validation() {
    let dir = tempfile::tempdir().unwrap();
    let out = underlay()
        .args([
            "controller",
            "--vpc",
            "vpc-1",
            "--pod-cidr",
            "100.64.0.0/16",
            "--node-selector",
            "eks.amazonaws.com/nodegroup in (ng-underlay),underlay.dev/managed=true",
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
    // It got as far as the Kubernetes client.
    assert!(err.contains("no Kubernetes client configuration"), "{err}");
    assert!(err.contains("managing only the selected Nodes"), "{err}");
}
