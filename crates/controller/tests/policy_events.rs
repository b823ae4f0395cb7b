//! Bad NetworkPolicy input: one Warning Event on the policy and a metric, never a crash; a fixed or deleted
//! policy is forgotten. The pure check first, then through the API stand-in.

use std::time::Duration;

use k8s_openapi::api::events::v1::Event as EventV1;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, ListParams};
use kube::runtime::watcher::Event;
use underlay_apisim::ApiSim;
use underlay_apisim::objects::{namespace, network_policy};
use underlay_controller::policy_events::{
    PolicyCheck, PolicyCheckMetrics, REASON_POLICY_NOT_EXPRESSIBLE, note, run_policy_check,
};

fn np(yaml: &str) -> NetworkPolicy {
    network_policy(yaml).expect("test manifest parses")
}

fn bad() -> NetworkPolicy {
    np(r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: x}
spec:
  podSelector: {}
  ingress:
    - from: [{ipBlock: {cidr: 10.0.0.0/33}}]
      ports: [{protocol: ICMP, port: 1}, {protocol: TCP, port: 80}]
"#)
}

fn good() -> NetworkPolicy {
    np(r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: x}
spec:
  podSelector: {}
  ingress:
    - from: [{ipBlock: {cidr: 10.0.0.0/8}}]
"#)
}

#[test]
fn warnings_are_reported_once_per_change_and_forgotten_when_fixed() {
    let mut check = PolicyCheck::default();
    let first = check
        .apply(Event::Apply(bad()))
        .expect("a bad policy is reported");
    assert_eq!(first.1.len(), 2, "{:?}", first.1);
    let text = note(&first.1);
    assert!(
        text.contains("10.0.0.0/33") && text.contains("ICMP"),
        "{text}"
    );
    assert_eq!((check.policies_with_warnings(), check.warnings()), (1, 2));
    // The same warnings again (a resync, a label change): no new report.
    assert!(check.apply(Event::Apply(bad())).is_none());
    // A re-list that still holds it: no new report either.
    check.apply(Event::Init);
    assert!(check.apply(Event::InitApply(bad())).is_none());
    check.apply(Event::InitDone);
    assert_eq!(check.policies_with_warnings(), 1);
    // Fixed: nothing to report, and counted no more.
    assert!(check.apply(Event::Apply(good())).is_none());
    assert_eq!(check.policies_with_warnings(), 0);
    // Broken again: reported again.
    assert!(check.apply(Event::Apply(bad())).is_some());
    check.apply(Event::Delete(bad()));
    assert_eq!(check.warnings(), 0);
}

#[test]
fn the_note_fits_the_api_limit() {
    let mut yaml = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: many, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n    - from:\n",
    );
    for i in 0..200 {
        yaml.push_str(&format!("        - ipBlock: {{cidr: not-a-cidr-{i}}}\n"));
    }
    let mut check = PolicyCheck::default();
    let (_, w) = check.apply(Event::Apply(np(&yaml))).unwrap();
    assert_eq!(w.len(), 200);
    assert!(note(&w).len() <= 1024);
}

#[tokio::test]
async fn a_bad_policy_gets_one_warning_event_and_a_metric() {
    let sim = ApiSim::new();
    sim.insert(&namespace("x", &[]));
    sim.insert(&good());
    let metrics = PolicyCheckMetrics::default();
    let task = tokio::spawn(run_policy_check(sim.client(), metrics.clone(), None));
    let events: Api<EventV1> = Api::namespaced(sim.client(), "x");
    sim.insert(&bad());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let found = loop {
        let list = events.list(&ListParams::default()).await.unwrap().items;
        if let Some(e) = list
            .into_iter()
            .find(|e| e.reason.as_deref() == Some(REASON_POLICY_NOT_EXPRESSIBLE))
        {
            break e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Warning Event on the bad policy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(found.type_.as_deref(), Some("Warning"));
    let regarding = found.regarding.expect("the Event regards the policy");
    assert_eq!(
        (
            regarding.kind.as_deref(),
            regarding.namespace.as_deref(),
            regarding.name.as_deref()
        ),
        (Some("NetworkPolicy"), Some("x"), Some("bad"))
    );
    assert_eq!(metrics.policies_with_warnings.get(), 1);
    assert_eq!(metrics.policy_warnings.get(), 2);
    assert_eq!(metrics.policy_warning_events.get(), 1);
    // Fixed: the gauges drop, no further Event.
    sim.insert(&good());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metrics.policies_with_warnings.get() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gauge never dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metrics.policy_warning_events.get(), 1);
    assert!(
        sim.take_unexpected().is_empty(),
        "{:?}",
        sim.take_unexpected()
    );
    task.abort();
}
