//! deploy/: the Helm chart lints and renders in both modes, every manifest passes kubernetes-validate, the plain
//! manifests are the chart rendered with its defaults, the chart's CRD is deploy/'s, and the RBAC rules, ports,
//! taints and flags in the chart are the ones the code uses. helm comes from .tools/bin and kubernetes-validate
//! from .venv (both installed by scripts/setup.sh); without them every test here fails and says so.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;
use underlay_core::names;

const CHART: &str = "deploy/helm/underlay";
const DEPLOY_CRD: &str = "deploy/crds/underlaynode.yaml";
const CHART_CRD: &str = "deploy/helm/underlay/crds/underlaynode.yaml";
const DEPLOY_MANIFEST: &str = "deploy/underlay.yaml";
const NAMESPACE: &str = "kube-system";
/// The values the chart requires (VPC id and CIDRs have no default), as deploy/underlay.yaml is rendered with.
const EXAMPLE_ROUTED: &str = "examples/values-routed.yaml";
/// Placeholders the chart once shipped as defaults: no render of the defaults may contain one.
const PLACEHOLDERS: &[&str] = &["CHANGEME", "CHANGE ME", "CLUSTER_NAME", "111122223333"];

/// eni-mode values exercising every eni key.
const ENI_VALUES: &[&str] = &[
    "mode=eni",
    "eni.clusterName=prod",
    "eni.warmIPTarget=5",
    "eni.minimumIPTarget=10",
    "eni.prefixDelegation=true",
    "eni.warmPrefixTarget=1",
    "eni.subnets.us-east-1a=subnet-0aaa1111",
    "eni.subnets.us-east-1b=subnet-0bbb2222",
    "eni.securityGroups={sg-01111111,sg-02222222}",
    "eni.fillAtJoin=true",
    "eni.releaseDelaySeconds=60",
    "eni.externalSNAT=true",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn tool(rel: &str) -> PathBuf {
    let path = root().join(rel);
    assert!(
        path.is_file(),
        "{} not found: run scripts/setup.sh (it installs helm and kubectl into .tools/bin and kubernetes-validate \
         into .venv)",
        path.display()
    );
    path
}

fn helm() -> Command {
    let mut c = Command::new(tool(".tools/bin/helm"));
    c.current_dir(root());
    // Keep helm's caches and config out of the home directory.
    let home = std::env::temp_dir().join("underlay-deploy-test-helm");
    c.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    c
}

fn run(mut c: Command) -> Result<String, String> {
    let out = c.output().map_err(|e| format!("{c:?}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{c:?} failed:\n{text}"))
    }
}

/// `helm template` of the chart with the example's required values and `--set` values.
fn render(set: &[&str]) -> Result<String, String> {
    render_with(&[EXAMPLE_ROUTED], set)
}

/// `helm template` of the chart with `-f` value files (relative to the repository) and `--set` values.
fn render_with(files: &[&str], set: &[&str]) -> Result<String, String> {
    let mut c = helm();
    c.args(["template", "underlay", CHART, "--namespace", NAMESPACE]);
    for f in files {
        c.args(["-f", f]);
    }
    for s in set {
        c.args(["--set", s]);
    }
    run(c)
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered chart"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|x| match x {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => panic!("not a scalar: {other:?}"),
        })
        .collect()
}

/// (apiGroups, resources, resourceNames, verbs) of each rule, in order.
type Rule = (Vec<String>, Vec<String>, Vec<String>, Vec<String>);

fn rules(role: &Value) -> Vec<Rule> {
    role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| {
            let names = if r["resourceNames"].is_null() {
                vec![]
            } else {
                strs(&r["resourceNames"])
            };
            (
                strs(&r["apiGroups"]),
                strs(&r["resources"]),
                names,
                strs(&r["verbs"]),
            )
        })
        .collect()
}

fn rule(groups: &[&str], resources: &[&str], names: &[&str], verbs: &[&str]) -> Rule {
    let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect();
    (v(groups), v(resources), v(names), v(verbs))
}

fn kubernetes_validate(path: &Path) -> Result<(), String> {
    let mut c = Command::new(tool(".venv/bin/kubernetes-validate"));
    c.args(["--strict", "--kubernetes-version", "1.33"])
        .arg(path);
    run(c).map(|_| ())
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn helm_lint_passes_in_both_modes() {
    let mut c = helm();
    c.args(["lint", "--strict", CHART, "-f", EXAMPLE_ROUTED]);
    run(c).unwrap();
    let mut c = helm();
    c.args(["lint", "--strict", CHART, "-f", EXAMPLE_ROUTED]);
    for s in ENI_VALUES {
        c.args(["--set", s]);
    }
    run(c).unwrap();
}

#[test]
fn an_unknown_mode_does_not_render() {
    // The schema refuses it first; the template's own check stays for a chart rendered without the schema.
    let err = render(&["mode=overlay"]).unwrap_err();
    assert!(
        err.contains("at '/mode'") && err.contains("routed") && err.contains("eni"),
        "{err}"
    );
}

#[test]
fn chart_crd_is_the_deploy_crd() {
    let read = |rel: &str| std::fs::read_to_string(root().join(rel)).unwrap();
    assert!(
        read(CHART_CRD) == read(DEPLOY_CRD),
        "{CHART_CRD} differs from {DEPLOY_CRD}: run `cp {DEPLOY_CRD} {CHART_CRD}` (after `underlay crd > {DEPLOY_CRD}`)"
    );
}

#[test]
fn deploy_manifest_is_the_rendered_chart() {
    tool(".tools/bin/helm");
    let mut c = Command::new("bash");
    c.arg(root().join("scripts/render-deploy.sh"));
    let rendered = run(c).unwrap();
    let on_disk = std::fs::read_to_string(root().join(DEPLOY_MANIFEST)).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "{DEPLOY_MANIFEST} differs from the chart rendered with its defaults: run \
         `scripts/render-deploy.sh > {DEPLOY_MANIFEST}` and commit it"
    );
    // The plain manifests carry the CRD, first, so `kubectl apply -f deploy/` needs nothing else.
    let all = docs(&on_disk);
    assert_eq!(all[0]["kind"], "CustomResourceDefinition");
    let crd: Value =
        serde_yaml::from_str(&std::fs::read_to_string(root().join(DEPLOY_CRD)).unwrap()).unwrap();
    assert_eq!(all[0], crd);
}

#[test]
fn every_manifest_passes_kubernetes_validate() {
    let dir = tempfile::tempdir().unwrap();
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, set) in [("routed.yaml", &[][..]), ("eni.yaml", ENI_VALUES)] {
        let path = dir.path().join(name);
        std::fs::write(&path, render(set).unwrap()).unwrap();
        files.push(path);
    }
    // Every example values file, on its own.
    for e in std::fs::read_dir(root().join("examples")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.starts_with("values-") && name.ends_with(".yaml") {
            let path = dir.path().join(format!("rendered-{name}"));
            let text = render_with(&[&format!("examples/{name}")], &[]).unwrap();
            std::fs::write(&path, text).unwrap();
            files.push(path);
        }
    }
    // Every manifest under deploy/; the chart's sources (templates, values, Chart.yaml) are not manifests.
    let templates = root().join(CHART);
    let mut stack = vec![root().join("deploy")];
    let mut checked_in = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml")
                && (!p.starts_with(&templates) || p.starts_with(templates.join("crds")))
            {
                files.push(p);
                checked_in += 1;
            }
        }
    }
    assert!(
        checked_in >= 3,
        "expected deploy/underlay.yaml and both CRD copies"
    );
    let failures: Vec<String> = files
        .iter()
        .filter_map(|f| kubernetes_validate(f).err())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn kubernetes_validate_rejects_a_broken_manifest() {
    // The check above is only worth something if the validator fails on a bad field.
    let dir = tempfile::tempdir().unwrap();
    let bad = render(&[]).unwrap().replace(
        "hostNetwork: true",
        "hostNetwork: true\n      hostNetworking: true",
    );
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, bad).unwrap();
    assert!(kubernetes_validate(&path).is_err());
}

#[test]
fn rbac_allows_exactly_what_the_code_calls() {
    let all = docs(&render(&[]).unwrap());
    let group = names::API_GROUP;
    assert_eq!(
        rules(find(&all, "ClusterRole", "underlay-controller")),
        vec![
            rule(&[""], &["nodes"], &[], &["get", "list", "watch", "patch"]),
            rule(
                &[group],
                &["underlaynodes"],
                &[],
                &["get", "list", "watch", "create", "patch", "delete"]
            ),
            rule(&[group], &["underlaynodes/status"], &[], &["patch"]),
            rule(
                &["networking.k8s.io"],
                &["networkpolicies"],
                &[],
                &["list", "watch"]
            ),
            rule(&["events.k8s.io"], &["events"], &[], &["create", "patch"]),
        ]
    );
    let lease = find(&all, "Role", "underlay-controller-lease");
    assert_eq!(lease["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        rules(lease),
        vec![
            rule(
                &["coordination.k8s.io"],
                &["leases"],
                &[names::LEADER_LEASE],
                &["get", "update"]
            ),
            rule(&["coordination.k8s.io"], &["leases"], &[], &["create"]),
        ]
    );
    // kube-runtime's Recorder: events.k8s.io/v1, in `default` for cluster-scoped Nodes.
    let events = find(&all, "Role", "underlay-controller-events");
    assert_eq!(events["metadata"]["namespace"], "default");
    assert_eq!(
        rules(events),
        vec![rule(
            &["events.k8s.io"],
            &["events"],
            &[],
            &["create", "patch"]
        )]
    );
    let agent = rules(find(&all, "ClusterRole", "underlay-agent"));
    assert_eq!(
        agent,
        vec![
            rule(&[group], &["underlaynodes"], &[], &["list", "watch"]),
            rule(&[group], &["underlaynodes/status"], &[], &["get", "patch"]),
            rule(&[""], &["namespaces", "pods"], &[], &["list", "watch"]),
            rule(
                &["networking.k8s.io"],
                &["networkpolicies"],
                &[],
                &["list", "watch"]
            ),
        ]
    );
    assert!(
        agent
            .iter()
            .all(|r| !r.3.iter().any(|v| v != "list" && v != "watch")
                || r.1.iter().all(|x| x.starts_with("underlaynodes"))),
        "the agent only reads policy inputs"
    );
    assert!(
        agent.iter().all(|r| !r.1.iter().any(|x| x == "nodes")),
        "the agent must not touch Nodes"
    );
    // Bindings point at the ServiceAccounts the workloads run as.
    for (binding, kind, sa) in [
        (
            "underlay-controller",
            "ClusterRoleBinding",
            "underlay-controller",
        ),
        ("underlay-agent", "ClusterRoleBinding", "underlay-agent"),
        (
            "underlay-controller-lease",
            "RoleBinding",
            "underlay-controller",
        ),
        (
            "underlay-controller-events",
            "RoleBinding",
            "underlay-controller",
        ),
    ] {
        let b = find(&all, kind, binding);
        assert_eq!(b["subjects"][0]["name"], sa, "{binding}");
        assert_eq!(b["subjects"][0]["namespace"], NAMESPACE, "{binding}");
    }
}

#[test]
fn agent_daemonset_runs_everywhere_with_net_admin_only_and_runtime_seccomp() {
    let all = docs(&render(&[]).unwrap());
    let ds = find(&all, "DaemonSet", "underlay-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], "underlay-agent");
    let tolerations = pod["tolerations"].as_sequence().unwrap();
    for effect in ["NoSchedule", "NoExecute"] {
        assert!(
            tolerations
                .iter()
                .any(|t| t["operator"] == "Exists" && t["key"].is_null() && t["effect"] == effect),
            "no blanket toleration for {effect} (so {} would keep the agent off its node)",
            names::TAINT_NOT_READY
        );
    }
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        "10%"
    );
    // The only privileged step: the sysctls the agent checks, written before it starts.
    let inits = pod["initContainers"].as_sequence().unwrap();
    assert_eq!(inits.len(), 1);
    assert_eq!(inits[0]["securityContext"]["privileged"], true);
    let script = strs(&inits[0]["command"]).join(" ");
    for key in [
        "ip_forward",
        "send_redirects",
        "accept_redirects",
        "rp_filter",
    ] {
        assert!(
            script.contains(key),
            "the init container does not set {key}"
        );
    }
    let c = container(ds, "agent");
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    // BPF only with the fast path on (`fast_path_is_off_unless_the_chart_turns_it_on`).
    assert_eq!(strs(&sc["capabilities"]["add"]), ["NET_ADMIN"]);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["ports"][0]["containerPort"], names::AGENT_HEALTH_PORT);
    // The forwarder probe's UDP echo listens on the same address as the health endpoint.
    assert_eq!(c["ports"][1]["containerPort"], names::AGENT_PROBE_UDP_PORT);
    assert_eq!(c["ports"][1]["protocol"], "UDP");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        c["env"][0],
        serde_yaml::from_str::<Value>(
            "{name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}"
        )
        .unwrap()
    );
    let args = strs(&c["args"]);
    let health = format!("--health-addr=0.0.0.0:{}", names::AGENT_HEALTH_PORT);
    let state = Path::new(names::AGENT_SOCKET).parent().unwrap();
    for want in [
        "agent".to_string(),
        "--kube".into(),
        "--pod-cidr=100.64.0.0/10".into(),
        "--vpc-cidr=198.18.0.0/15".into(),
        health,
        format!("--state-dir={}", state.display()),
        format!("--socket={}", names::AGENT_SOCKET),
        format!("--cni-bin-dir={}", names::CNI_BIN_DIR),
        format!("--cni-conf-dir={}", names::CNI_CONF_DIR),
    ] {
        assert!(args.contains(&want), "agent args {args:?} lack {want}");
    }
    // The host directories are mounted at their own paths (the CNI configuration names the socket's).
    let mounts: BTreeSet<String> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap().to_string())
        .collect();
    let host: BTreeSet<String> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v["hostPath"]["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(mounts, host);
    for dir in [
        names::CNI_BIN_DIR,
        names::CNI_CONF_DIR,
        &state.display().to_string(),
    ] {
        assert!(mounts.contains(dir), "{dir} not mounted");
    }
}

#[test]
fn controller_runs_on_the_host_network_unprivileged() {
    let all = docs(&render(&[]).unwrap());
    let d = find(&all, "Deployment", "underlay-controller");
    assert_eq!(d["spec"]["replicas"], 2);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], "underlay-controller");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(
        pod["tolerations"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|t| t["key"] == names::TAINT_NOT_READY && t["effect"] == "NoSchedule"),
        "the controller must start on nodes still tainted {}",
        names::TAINT_NOT_READY
    );
    assert!(
        !pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            .is_null()
    );
    let c = container(d, "controller");
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    assert!(sc["capabilities"]["add"].is_null());
    assert_eq!(
        c["ports"][0]["containerPort"],
        names::CONTROLLER_HEALTH_PORT
    );
    // Lease identity: the pod's name, not the node's (hostNetwork makes HOSTNAME the node's).
    assert_eq!(c["env"][0]["name"], "HOSTNAME");
    assert_eq!(
        c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    let args = strs(&c["args"]);
    for want in [
        "controller",
        "--vpc=vpc-0123456789abcdef0",
        "--pod-cidr=100.64.0.0/10",
        "--block=26",
        "--route-limit=500",
        "--lease-namespace=kube-system",
        "--health-addr=0.0.0.0:9651",
    ] {
        assert!(args.iter().any(|a| a == want), "{args:?} lacks {want}");
    }
    assert!(!args.iter().any(|a| a.starts_with("--mode")), "{args:?}");
    let pdb = find(&all, "PodDisruptionBudget", "underlay-controller");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let sa = find(&all, "ServiceAccount", "underlay-controller");
    // No placeholder role: IRSA is the user's to configure (EKS Pod Identity needs no annotation).
    assert!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].is_null(),
        "{sa:?}"
    );
    let all = docs(&render(&[
        "controller.serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/r",
    ])
    .unwrap());
    let sa = find(&all, "ServiceAccount", "underlay-controller");
    assert_eq!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::1:role/r"
    );
}

#[test]
fn eni_mode_renders_the_eni_flags() {
    let all = docs(&render(ENI_VALUES).unwrap());
    let args = strs(
        &container(
            find(&all, "Deployment", "underlay-controller"),
            "controller",
        )["args"],
    );
    for want in [
        "--mode=eni",
        "--cluster-name=prod",
        "--warm-ip-target=5",
        "--minimum-ip-target=10",
        "--warm-prefix-target=1",
        "--prefix-delegation",
        "--eni-subnet=us-east-1a=subnet-0aaa1111",
        "--eni-subnet=us-east-1b=subnet-0bbb2222",
        "--eni-security-group=sg-01111111",
        "--eni-security-group=sg-02222222",
        "--fill-at-join",
        "--release-delay-secs=60",
        "--vpc=vpc-0123456789abcdef0",
    ] {
        assert!(args.iter().any(|a| a == want), "{args:?} lacks {want}");
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--pod-cidr")),
        "{args:?}"
    );
    let agent = strs(&container(find(&all, "DaemonSet", "underlay-agent"), "agent")["args"]);
    assert!(agent.iter().any(|a| a == "--external-snat"), "{agent:?}");
    assert!(
        !agent.iter().any(|a| a.starts_with("--pod-cidr")),
        "{agent:?}"
    );
    // Routed mode never passes the eni flags.
    let routed = docs(&render(&[]).unwrap());
    let agent = strs(&container(find(&routed, "DaemonSet", "underlay-agent"), "agent")["args"]);
    assert!(!agent.iter().any(|a| a == "--external-snat"));
}

#[test]
fn network_policy_is_enforced_unless_the_chart_turns_it_off() {
    let agent_args = |set: &[&str]| {
        let all = docs(&render(set).unwrap());
        strs(&container(find(&all, "DaemonSet", "underlay-agent"), "agent")["args"])
    };
    assert!(!agent_args(&[]).iter().any(|a| a == "--no-network-policy"));
    assert!(
        agent_args(&["networkPolicy.enabled=false"])
            .iter()
            .any(|a| a == "--no-network-policy")
    );
    let err = render(&["networkPolicy.enabled=banana"]).unwrap_err();
    assert!(err.contains("networkPolicy"), "{err}");
}

#[test]
fn fast_path_is_off_unless_the_chart_turns_it_on() {
    let agent_args = |set: &[&str]| {
        let all = docs(&render(set).unwrap());
        strs(&container(find(&all, "DaemonSet", "underlay-agent"), "agent")["args"])
    };
    assert!(agent_args(&[]).iter().any(|a| a == "--no-fast-path"));
    assert!(
        !agent_args(&["fastPath.enabled=true"])
            .iter()
            .any(|a| a == "--no-fast-path")
    );
    // The fast path's programs need CAP_BPF; forced off, the agent keeps NET_ADMIN alone.
    let caps = |set: &[&str]| {
        let all = docs(&render(set).unwrap());
        strs(
            &container(find(&all, "DaemonSet", "underlay-agent"), "agent")["securityContext"]["capabilities"]
                ["add"],
        )
    };
    assert_eq!(caps(&["fastPath.enabled=true"]), ["NET_ADMIN", "BPF"]);
    assert_eq!(caps(&[]), ["NET_ADMIN"]);
    let err = render(&["fastPath.enabled=banana"]).unwrap_err();
    assert!(err.contains("fastPath"), "{err}");
}

#[test]
fn the_managed_nodes_selector_reaches_the_controller_and_pairs_with_the_agent_node_selector() {
    // Default: every node, no flag.
    let all = docs(&render(&[]).unwrap());
    let args = strs(
        &container(
            find(&all, "Deployment", "underlay-controller"),
            "controller",
        )["args"],
    );
    assert!(
        !args.iter().any(|a| a.starts_with("--node-selector")),
        "{args:?}"
    );

    let selector = "eks.amazonaws.com/nodegroup in (ng-underlay)";
    let set_selector = format!("controller.manageNodesSelector={selector}");
    let rendered = |extra: &[&str]| {
        let mut set = vec![
            set_selector.as_str(),
            r"agent.nodeSelector.eks\.amazonaws\.com/nodegroup=ng-underlay",
            // For running the binary on the rendered arguments below: nothing real is contacted.
            "vpc.region=us-east-1",
            "vpc.endpoint=http://127.0.0.1:9",
            "controller.healthPort=0",
        ];
        set.extend_from_slice(extra);
        docs(&render(&set).unwrap())
    };
    for mode in [&[][..], ENI_VALUES] {
        let all = rendered(mode);
        let args = strs(
            &container(
                find(&all, "Deployment", "underlay-controller"),
                "controller",
            )["args"],
        );
        let want = format!("--node-selector={selector}");
        assert!(args.contains(&want), "{args:?} lacks {want}");
        let ds = find(&all, "DaemonSet", "underlay-agent");
        let node_selector = &ds["spec"]["template"]["spec"]["nodeSelector"];
        assert_eq!(node_selector["eks.amazonaws.com/nodegroup"], "ng-underlay");
        assert_eq!(node_selector["kubernetes.io/os"], "linux");

        // The binary takes the rendered arguments: validation passes and it stops only at the missing
        // Kubernetes configuration.
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_underlay"))
            .args(&args)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("KUBECONFIG", dir.path().join("missing"))
            .env("HOME", dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("managing only the selected Nodes"), "{err}");
        assert!(err.contains("no Kubernetes client configuration"), "{err}");
    }
}

#[test]
fn cni_exclusive_renders_the_agents_flag_which_the_agent_knows() {
    let agent_args = |set: &[&str]| {
        let all = docs(&render(set).unwrap());
        strs(&container(find(&all, "DaemonSet", "underlay-agent"), "agent")["args"])
    };
    assert!(!agent_args(&[]).iter().any(|a| a == "--cni-exclusive"));
    assert!(
        agent_args(&["cni.exclusive=true"])
            .iter()
            .any(|a| a == "--cni-exclusive")
    );
    let help = Command::new(env!("CARGO_BIN_EXE_underlay"))
        .args(["agent", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--cni-exclusive"));
}

#[test]
fn the_schema_rejects_bad_values_with_its_message_and_requires_the_vpc() {
    // No values: the VPC is required, there is no placeholder to fall back to.
    let err = render_with(&[], &[]).unwrap_err();
    assert!(
        err.contains("missing properties 'id', 'cidrs'") && err.contains("/vpc"),
        "{err}"
    );
    let err = render(&["routed.podCIDR=banana"]).unwrap_err();
    assert!(
        err.contains("/routed/podCIDR") && err.contains("'banana' does not match pattern"),
        "{err}"
    );
    for (set, at) in [
        ("mode=overlay", "/mode"),
        ("vpc.id=vpc-CHANGEME", "/vpc/id"),
        ("vpc.cidrs={10.0.0.0/33}", "/vpc/cidrs/0"),
        ("routed.blockPrefixLength=31", "/routed/blockPrefixLength"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("image.digest=latest", "/image/digest"),
        ("eni.securityGroups={default}", "/eni/securityGroups/0"),
        ("controller.antiAffinity=maybe", "/controller/antiAffinity"),
        ("logFormat=xml", "/logFormat"),
    ] {
        let err = render(&[set]).unwrap_err();
        assert!(err.contains(at), "{set}: {err}");
    }
    // eni mode needs its cluster name.
    let err = render(&["mode=eni"]).unwrap_err();
    assert!(err.contains("/eni/clusterName"), "{err}");
    assert!(render(&["mode=eni", "eni.clusterName=prod"]).is_ok());
}

#[test]
fn the_rendered_defaults_hold_no_placeholder() {
    let text = render(&[]).unwrap();
    let values = std::fs::read_to_string(root().join(CHART).join("values.yaml")).unwrap();
    for p in PLACEHOLDERS {
        assert!(!text.contains(p), "the default render holds {p}");
        assert!(!values.contains(p), "values.yaml holds {p}");
    }
}

#[test]
fn an_image_digest_pins_both_workloads() {
    let digest = format!("sha256:{}", "ab".repeat(32));
    let set = format!("image.digest={digest}");
    let all = docs(
        &render(&[
            "image.repository=r.example/underlay",
            "image.tag=1.2.3",
            &set,
        ])
        .unwrap(),
    );
    let want = format!("r.example/underlay:1.2.3@{digest}");
    assert_eq!(
        container(find(&all, "DaemonSet", "underlay-agent"), "agent")["image"],
        want.as_str()
    );
    assert_eq!(
        container(
            find(&all, "Deployment", "underlay-controller"),
            "controller"
        )["image"],
        want.as_str()
    );
}

#[test]
fn metrics_services_select_each_components_pods_on_its_health_port() {
    let all = docs(&render(&[]).unwrap());
    for (component, port) in [
        ("controller", names::CONTROLLER_HEALTH_PORT),
        ("agent", names::AGENT_HEALTH_PORT),
    ] {
        let svc = find(&all, "Service", &format!("underlay-{component}-metrics"));
        assert_eq!(
            svc["spec"]["selector"]["app.kubernetes.io/component"],
            component
        );
        assert_eq!(svc["spec"]["ports"][0]["port"], port);
        assert_eq!(svc["spec"]["ports"][0]["name"], "metrics");
    }
    // The Prometheus Operator objects only when asked for.
    assert!(
        !all.iter()
            .any(|d| d["kind"] == "ServiceMonitor" || d["kind"] == "PrometheusRule")
    );
    let off = docs(&render(&["metrics.service.enabled=false"]).unwrap());
    assert!(!off.iter().any(|d| d["kind"] == "Service"));
}

#[test]
fn the_prometheus_rule_holds_exactly_the_documented_alerts() {
    let all = docs(
        &render(&[
            "metrics.serviceMonitor.enabled=true",
            "metrics.prometheusRule.enabled=true",
        ])
        .unwrap(),
    );
    let rule = find(&all, "PrometheusRule", "underlay");
    let md = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    let alerts = &md[md.find("## Alerts").unwrap()..];
    let start = alerts.find("```yaml\n").unwrap() + "```yaml\n".len();
    let block = &alerts[start..start + alerts[start..].find("```").unwrap()];
    let documented: Value = serde_yaml::from_str(block).unwrap();
    assert_eq!(rule["spec"]["groups"], documented["groups"]);
    assert!(
        rule["spec"]["groups"][0]["rules"]
            .as_sequence()
            .unwrap()
            .len()
            >= 8,
        "{rule:?}"
    );
    for component in ["controller", "agent"] {
        let sm = find(&all, "ServiceMonitor", &format!("underlay-{component}"));
        assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
        assert_eq!(
            sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
            component
        );
    }
}

#[test]
fn pod_annotations_and_priority_classes_reach_both_workloads() {
    let all = docs(
        &render(&[
            "controller.podAnnotations.a=x1",
            "agent.podAnnotations.b=y2",
            "controller.priorityClassName=pc-c",
            "agent.priorityClassName=pc-a",
        ])
        .unwrap(),
    );
    let ds = &find(&all, "DaemonSet", "underlay-agent")["spec"]["template"];
    let dep = &find(&all, "Deployment", "underlay-controller")["spec"]["template"];
    assert_eq!(ds["metadata"]["annotations"]["b"], "y2");
    assert_eq!(dep["metadata"]["annotations"]["a"], "x1");
    assert_eq!(ds["spec"]["priorityClassName"], "pc-a");
    assert_eq!(dep["spec"]["priorityClassName"], "pc-c");
    // Defaults: the critical classes a CNI runs at.
    let all = docs(&render(&[]).unwrap());
    let ds = &find(&all, "DaemonSet", "underlay-agent")["spec"]["template"];
    assert_eq!(ds["spec"]["priorityClassName"], "system-node-critical");
    assert!(ds["metadata"]["annotations"].is_null());
}

#[test]
fn the_log_format_reaches_both_containers() {
    let env_of = |all: &[Value], kind: &str, name: &str, container_name: &str| {
        container(find(all, kind, name), container_name)["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == names::LOG_FORMAT_ENV)
            .map(|e| e["value"].as_str().unwrap().to_string())
    };
    let all = docs(&render(&[]).unwrap());
    assert_eq!(
        env_of(&all, "DaemonSet", "underlay-agent", "agent").as_deref(),
        Some("text")
    );
    let all = docs(&render(&["logFormat=json"]).unwrap());
    assert_eq!(
        env_of(&all, "DaemonSet", "underlay-agent", "agent").as_deref(),
        Some("json")
    );
    assert_eq!(
        env_of(&all, "Deployment", "underlay-controller", "controller").as_deref(),
        Some("json")
    );
}
