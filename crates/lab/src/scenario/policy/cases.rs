//! The cases file of `underlay lab policy --cases FILE` (and the built-in sequence, which is written in the same
//! form): YAML, a list of cases run one after the other on the x/y/z model.
//!
//! ```yaml
//! cases:
//! - name: deny all ingress to x
//!   namespaceLabels:            # optional: set (a value) or remove (null) labels of the model's namespaces
//!     y: {team: blue}
//!   podLabels:                  # optional: the same for pods, named ns/pod
//!     x/a: {app: web}
//!   policies:                   # plain NetworkPolicy manifests, any namespace of the model
//!   - apiVersion: networking.k8s.io/v1
//!     kind: NetworkPolicy
//!     metadata: {name: deny-ingress, namespace: x}
//!     spec: {podSelector: {}, policyTypes: [Ingress]}
//!   expect:                     # optional, per protocol/port: the truth table, as the e2e suite prints it
//!     tcp/80: |
//!       -  x/a  x/b  …
//!       x/a  .  X  …
//! ```
//!
//! Two placeholders stand for addresses known only once the pods are wired: `{{ip:x/b}}` is pod x/b's address,
//! `{{net:x/b:16}}` the /16 network holding it (for ipBlock cidr and except).
//!
//! Each case starts from the model as built (its labels, no policy): the previous case's policies are deleted
//! and its label changes undone. A protocol/port with a table is checked against that table; every other one
//! against the core's evaluator.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;

use super::probe::{PORTS, Protocol};
use super::table::TruthTable;

/// Label changes: `Some(value)` sets, `None` (YAML null) removes.
pub type LabelChanges = BTreeMap<String, Option<String>>;

/// One case, parsed and checked.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub namespace_labels: BTreeMap<String, LabelChanges>,
    pub pod_labels: BTreeMap<String, LabelChanges>,
    pub policies: Vec<NetworkPolicy>,
    pub expect: BTreeMap<(Protocol, u16), TruthTable>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    cases: Vec<CaseDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CaseDoc {
    name: String,
    #[serde(default)]
    namespace_labels: BTreeMap<String, LabelChanges>,
    #[serde(default)]
    pod_labels: BTreeMap<String, LabelChanges>,
    #[serde(default)]
    policies: Vec<serde_yaml::Value>,
    #[serde(default)]
    expect: BTreeMap<String, String>,
}

/// What a cases file may name: the model's namespaces and `ns/pod` keys.
#[derive(Debug, Clone)]
pub struct ModelNames {
    pub namespaces: Vec<String>,
    pub pods: Vec<String>,
}

/// Parses a cases file and checks every name in it against the model.
pub fn parse(text: &str, model: &ModelNames) -> anyhow::Result<Vec<Case>> {
    let doc: FileDoc = serde_yaml::from_str(text).context("reading the cases file")?;
    if doc.cases.is_empty() {
        bail!("the cases file holds no case");
    }
    let mut names = std::collections::BTreeSet::new();
    doc.cases
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let name = c.name.clone();
            if !names.insert(name.clone()) {
                bail!("case {}: the name {name:?} is used twice", i + 1);
            }
            case(c, model).with_context(|| format!("case {} ({name})", i + 1))
        })
        .collect()
}

fn case(c: CaseDoc, model: &ModelNames) -> anyhow::Result<Case> {
    for ns in c.namespace_labels.keys() {
        if !model.namespaces.contains(ns) {
            bail!(
                "namespaceLabels: {ns:?} is not a namespace of the model ({})",
                model.namespaces.join(", ")
            );
        }
    }
    for pod in c.pod_labels.keys() {
        if !model.pods.contains(pod) {
            bail!("podLabels: {pod:?} is not a pod of the model (ns/pod, e.g. x/a)");
        }
    }
    let mut policies = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (k, v) in c.policies.into_iter().enumerate() {
        let json = serde_json::to_value(&v).context("policy as JSON")?;
        let kind = json["kind"].as_str().unwrap_or_default();
        let api = json["apiVersion"].as_str().unwrap_or_default();
        if kind != "NetworkPolicy" || api != "networking.k8s.io/v1" {
            bail!(
                "policies[{k}]: kind {kind:?} apiVersion {api:?}: only networking.k8s.io/v1 NetworkPolicy"
            );
        }
        let p: NetworkPolicy = serde_json::from_value(json)
            .with_context(|| format!("policies[{k}]: not a NetworkPolicy"))?;
        let name = p.metadata.name.clone().unwrap_or_default();
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        if name.is_empty() {
            bail!("policies[{k}]: metadata.name is missing");
        }
        if !model.namespaces.contains(&ns) {
            bail!(
                "policies[{k}] ({name}): metadata.namespace {ns:?} is not a namespace of the model ({})",
                model.namespaces.join(", ")
            );
        }
        if !seen.insert((ns.clone(), name.clone())) {
            bail!("policies[{k}]: {ns}/{name} appears twice");
        }
        policies.push(p);
    }
    let mut expect = BTreeMap::new();
    for (key, text) in c.expect {
        let service = parse_service(&key)?;
        let table = TruthTable::parse(&text).with_context(|| format!("expect {key}: the table"))?;
        for n in table.froms.iter().chain(table.tos.iter()) {
            if !model.pods.contains(n) {
                bail!("expect {key}: {n:?} is not a pod of the model");
            }
        }
        expect.insert(service, table);
    }
    Ok(Case {
        name: c.name,
        namespace_labels: c.namespace_labels,
        pod_labels: c.pod_labels,
        policies,
        expect,
    })
}

/// The built-in sequence: the e2e suite's cases the model expresses.
pub const UPSTREAM: &str = include_str!("upstream.yaml");

/// Replaces `{{ip:ns/pod}}` and `{{net:ns/pod:len}}` with the pod's address and the network of that length
/// holding it.
pub fn expand(text: &str, ips: &BTreeMap<String, std::net::Ipv4Addr>) -> anyhow::Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let j = after.find("}}").with_context(|| {
            format!(
                "unclosed placeholder at {:?}",
                &rest[i..rest.len().min(i + 20)]
            )
        })?;
        let inner = after[..j].trim();
        let value = if let Some(pod) = inner.strip_prefix("ip:") {
            ips.get(pod)
                .with_context(|| format!("{{{{{inner}}}}}: {pod:?} is not a pod of the model"))?
                .to_string()
        } else if let Some(spec) = inner.strip_prefix("net:") {
            let (pod, len) = spec
                .rsplit_once(':')
                .with_context(|| format!("{{{{{inner}}}}}: expected net:ns/pod:length"))?;
            let ip = ips
                .get(pod)
                .with_context(|| format!("{{{{{inner}}}}}: {pod:?} is not a pod of the model"))?;
            let len: u8 = len
                .parse()
                .ok()
                .filter(|l| *l <= 32)
                .with_context(|| format!("{{{{{inner}}}}}: the length must be 0 to 32"))?;
            ipnet::Ipv4Net::new(*ip, len)
                .expect("length checked")
                .trunc()
                .to_string()
        } else {
            bail!("{{{{{inner}}}}}: unknown placeholder (ip:ns/pod or net:ns/pod:length)");
        };
        out.push_str(&value);
        rest = &after[j + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `tcp/80` → (TCP, 80); only the served ports.
pub fn parse_service(key: &str) -> anyhow::Result<(Protocol, u16)> {
    let (p, port) = key
        .split_once('/')
        .with_context(|| format!("{key:?}: expected protocol/port, e.g. tcp/80"))?;
    let proto =
        Protocol::parse(p).with_context(|| format!("{key:?}: protocol tcp, udp or sctp"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("{key:?}: port must be a number"))?;
    if !PORTS.contains(&port) {
        bail!("{key:?}: the model's pods serve ports {PORTS:?} only");
    }
    Ok((proto, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelNames {
        let namespaces: Vec<String> = ["x", "y", "z"].iter().map(|s| s.to_string()).collect();
        let pods = namespaces
            .iter()
            .flat_map(|n| ["a", "b", "c"].map(|p| format!("{n}/{p}")))
            .collect();
        ModelNames { namespaces, pods }
    }

    const GOOD: &str = r#"
cases:
- name: deny ingress to x
  namespaceLabels:
    y: {team: blue, "kubernetes.io/metadata.name": null}
  podLabels:
    x/a: {app: web}
  policies:
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: deny, namespace: x}
    spec:
      podSelector: {}
      policyTypes: [Ingress]
  expect:
    tcp/80: |
      -	x/a	y/a
      x/a	.	.
      y/a	X	.
    SCTP/81: "-   x/a\n  x/a   ."
- name: nothing
"#;

    #[test]
    fn a_good_file_parses_with_its_tables_and_label_changes() {
        let cases = parse(GOOD, &model()).unwrap();
        assert_eq!(cases.len(), 2);
        let c = &cases[0];
        assert_eq!(c.policies.len(), 1);
        assert_eq!(c.policies[0].metadata.namespace.as_deref(), Some("x"));
        assert_eq!(
            c.policies[0].spec.as_ref().unwrap().policy_types,
            Some(vec!["Ingress".to_string()])
        );
        assert_eq!(c.namespace_labels["y"]["team"], Some("blue".into()));
        assert_eq!(c.namespace_labels["y"]["kubernetes.io/metadata.name"], None);
        assert_eq!(c.pod_labels["x/a"]["app"], Some("web".into()));
        let t = &c.expect[&(Protocol::Tcp, 80)];
        assert_eq!(t.get("y/a", "x/a"), Some(false));
        assert_eq!(t.get("x/a", "y/a"), Some(true));
        assert!(c.expect.contains_key(&(Protocol::Sctp, 81)));
        assert!(cases[1].policies.is_empty() && cases[1].expect.is_empty());
    }

    fn err(text: &str) -> String {
        format!("{:#}", parse(text, &model()).unwrap_err())
    }

    fn ips() -> BTreeMap<String, std::net::Ipv4Addr> {
        model()
            .pods
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), std::net::Ipv4Addr::new(100, 64, 1, 10 + i as u8)))
            .collect()
    }

    #[test]
    fn placeholders_become_addresses_and_networks() {
        let ips = ips();
        assert_eq!(
            expand("a {{ip:x/b}}/32 b {{ net:x/b:16 }} c", &ips).unwrap(),
            "a 100.64.1.11/32 b 100.64.0.0/16 c"
        );
        assert!(format!("{:#}", expand("{{ip:w/a}}", &ips).unwrap_err()).contains("not a pod"));
        assert!(format!("{:#}", expand("{{net:x/a:33}}", &ips).unwrap_err()).contains("0 to 32"));
        assert!(format!("{:#}", expand("{{host:x/a}}", &ips).unwrap_err()).contains("unknown"));
        assert!(format!("{:#}", expand("{{ip:x/a", &ips).unwrap_err()).contains("unclosed"));
    }

    #[test]
    fn the_built_in_sequence_parses_and_its_tables_are_complete() {
        let cases = parse(&expand(UPSTREAM, &ips()).unwrap(), &model()).unwrap();
        assert!(cases.len() >= 30, "{} cases", cases.len());
        assert!(cases[0].policies.is_empty());
        assert!(cases.last().unwrap().policies.is_empty());
        for c in &cases {
            for t in c.expect.values() {
                assert!(
                    t.is_complete() && t.froms.len() == 9 && t.tos.len() == 9,
                    "{}",
                    c.name
                );
            }
        }
        let except = cases
            .iter()
            .find(|c| c.name == "egress to an ipBlock with except")
            .unwrap();
        let spec = except.policies[0].spec.as_ref().unwrap();
        let block = spec.egress.as_ref().unwrap()[0].to.as_ref().unwrap()[0]
            .ip_block
            .as_ref()
            .unwrap();
        assert_eq!(block.cidr, "100.0.0.0/8");
        assert_eq!(
            block.except.as_deref(),
            Some(&["100.64.1.11/32".to_string()][..])
        );
    }

    #[test]
    fn names_outside_the_model_and_malformed_entries_are_refused() {
        assert!(err("cases: []").contains("no case"));
        assert!(err("cases:\n- name: a\n- name: a\n").contains("used twice"));
        assert!(err("cases:\n- name: a\n  podLabels: {w/a: {k: v}}\n").contains("not a pod"));
        assert!(
            err("cases:\n- name: a\n  namespaceLabels: {w: {k: v}}\n").contains("not a namespace")
        );
        let pol = |ns: &str, kind: &str| {
            format!(
                "cases:\n- name: a\n  policies:\n  - apiVersion: networking.k8s.io/v1\n    kind: {kind}\n    metadata: {{name: p, namespace: {ns}}}\n    spec: {{podSelector: {{}}}}\n"
            )
        };
        assert!(err(&pol("default", "NetworkPolicy")).contains("not a namespace of the model"));
        assert!(err(&pol("x", "Pod")).contains("only networking.k8s.io/v1 NetworkPolicy"));
        assert!(
            err("cases:\n- name: a\n  expect: {tcp/8080: \"-\\tx/a\\nx/a\\t.\"}\n")
                .contains("serve ports")
        );
        assert!(
            err("cases:\n- name: a\n  expect: {icmp/80: \"-\\tx/a\\nx/a\\t.\"}\n")
                .contains("tcp, udp or sctp")
        );
        assert!(
            err("cases:\n- name: a\n  expect: {tcp/80: \"-\\tq/a\\nx/a\\t.\"}\n")
                .contains("not a pod of the model")
        );
        assert!(
            err("cases:\n- name: a\n  expect: {tcp/80: \"-\\tx/a\\nx/a\\t.\\t.\"}\n")
                .contains("marks")
        );
        assert!(err("cases:\n- name: a\n  bogus: 1\n").contains("unknown field"));
    }
}
