//! The NetworkPolicy follower: the pure index fed with watch events, and the follower against the API
//! stand-in through a real `kube::Client` (objects in, compiler inputs out).

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::watcher::Event;
use underlay_agent::policy_api::{
    NotReady, PeerWatch, PolicyFollower, PolicyIndex, PolicyState, forward_synced,
};
use underlay_apisim::objects::{namespace, network_policy, pod};
use underlay_apisim::{ApiSim, Kind};
use underlay_core::policy::{PortRef, Protocol};

const STEP: Duration = Duration::from_secs(10);
const PORTS: &[(&str, i32, &str)] = &[("serve-80-tcp", 80, "TCP"), ("serve-81-udp", 81, "UDP")];

fn np(yaml: &str) -> NetworkPolicy {
    network_policy(yaml).expect("test manifest parses")
}

/// x/a selected; ingress from pods `pod: b` of its namespace and from namespaces `team: y` (pods `pod: c`).
fn allow_policy() -> NetworkPolicy {
    np(r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
    - from:
        - podSelector: {matchLabels: {pod: b}}
        - namespaceSelector: {matchLabels: {team: y}}
          podSelector: {matchExpressions: [{key: pod, operator: In, values: [c, b]}]}
        - ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.8/29]}
      ports:
        - port: serve-80-tcp
        - {port: 81, endPort: 90, protocol: UDP}
"#)
}

fn list<K>(items: Vec<K>) -> Vec<Event<K>> {
    let mut evs = vec![Event::Init];
    evs.extend(items.into_iter().map(Event::InitApply));
    evs.push(Event::InitDone);
    evs
}

fn synced_index() -> PolicyIndex {
    let mut idx = PolicyIndex::default();
    for ev in list(vec![
        namespace("x", &[("team", "x")]),
        namespace("y", &[("team", "y")]),
        namespace("z", &[("team", "y")]),
    ]) {
        idx.apply_namespace(ev);
    }
    for ev in list(vec![allow_policy()]) {
        idx.apply_policy(ev);
    }
    for ev in list(vec![pod(
        "x",
        "a",
        "n1",
        Some("100.64.0.2"),
        &[("pod", "a")],
        PORTS,
    )]) {
        idx.apply_local_pod(ev);
    }
    idx
}

fn watch(ns: &str, sel: &str) -> PeerWatch {
    PeerWatch {
        namespace: ns.into(),
        selector: sel.into(),
    }
}

#[test]
fn a_selected_local_pod_needs_one_watch_per_peer_namespace_and_selector() {
    let idx = synced_index();
    let needed = idx.needed_peer_watches();
    assert_eq!(
        needed,
        BTreeSet::from([
            watch("x", "pod=b"),
            watch("y", "pod in (b,c)"),
            watch("z", "pod in (b,c)"),
        ])
    );
    // No local pod selected: nothing to watch.
    let mut other = synced_index();
    other.apply_local_pod(Event::Delete(pod("x", "a", "n1", None, &[], &[])));
    other.apply_local_pod(Event::Apply(pod(
        "x",
        "q",
        "n1",
        None,
        &[("pod", "q")],
        &[],
    )));
    assert!(other.needed_peer_watches().is_empty());
    // A namespace relabelled out of the selector drops its watch.
    let mut idx = synced_index();
    idx.apply_namespace(Event::Apply(namespace("z", &[("team", "z")])));
    assert!(
        !idx.needed_peer_watches()
            .contains(&watch("z", "pod in (b,c)"))
    );
}

/// Egress to every destination on a named port: the name resolves on each destination pod, so every pod's
/// container ports must be known (the lab's "egress on one named port" case failed without this watch).
#[test]
fn egress_to_anyone_on_a_named_port_watches_every_namespace() {
    let mut idx = synced_index();
    idx.apply_policy(Event::Apply(np(r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-named, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
    - ports: [{port: serve-80-tcp}]
"#)));
    let needed = idx.needed_peer_watches();
    for ns in ["x", "y", "z"] {
        assert!(needed.contains(&watch(ns, "")), "{ns}: {needed:?}");
    }
    // The same rule on a numeric port needs no peer.
    let mut idx = synced_index();
    idx.apply_policy(Event::Apply(np(r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-80, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
    - ports: [{port: 80}]
"#)));
    assert!(!idx.needed_peer_watches().contains(&watch("y", "")));
}

#[test]
fn ready_only_when_the_pod_and_its_policies_peers_are_listed() {
    let mut idx = PolicyIndex::default();
    assert_eq!(
        idx.ready_for("x", "a"),
        Err(NotReady::NotListed("namespaces"))
    );
    idx = synced_index();
    let needed = idx.needed_peer_watches();
    idx.set_peer_watches(&needed);
    assert!(matches!(
        idx.ready_for("x", "a"),
        Err(NotReady::PeersNotListed(_))
    ));
    // A pod no policy selects is decided without any peer.
    idx.apply_local_pod(Event::Apply(pod(
        "x",
        "free",
        "n1",
        None,
        &[("pod", "free")],
        &[],
    )));
    assert_eq!(idx.ready_for("x", "free"), Ok(()));
    assert_eq!(
        idx.ready_for("x", "late"),
        Err(NotReady::UnknownPod("x".into(), "late".into()))
    );
    for w in &needed {
        for ev in list(vec![]) {
            idx.apply_peer_pod(w, ev);
        }
    }
    assert_eq!(idx.ready_for("x", "a"), Ok(()));
    assert_eq!(idx.synced(), Ok(()));
}

#[test]
fn cluster_holds_local_pods_and_peers_once_and_converts_the_policy() {
    let mut idx = synced_index();
    let needed = idx.needed_peer_watches();
    idx.set_peer_watches(&needed);
    let peer_b = pod("x", "b", "n2", Some("100.64.1.3"), &[("pod", "b")], PORTS);
    for ev in list(vec![peer_b.clone()]) {
        idx.apply_peer_pod(&watch("x", "pod=b"), ev);
    }
    for ev in list(vec![pod(
        "y",
        "c",
        "n3",
        Some("100.64.2.4"),
        &[("pod", "c")],
        &[],
    )]) {
        idx.apply_peer_pod(&watch("y", "pod in (b,c)"), ev);
    }
    // A finished pod's address is not its own any more.
    let mut done = pod("x", "b", "n2", Some("100.64.1.3"), &[("pod", "b")], PORTS);
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    let c = idx.cluster();
    let keys: Vec<String> = c
        .pods
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    assert_eq!(keys, ["x/a", "x/b", "y/c"]);
    let a = &c.pods[0];
    assert_eq!(a.ip, Some("100.64.0.2".parse().unwrap()));
    assert_eq!(a.named_ports[0].name, "serve-80-tcp");
    assert_eq!(a.named_ports[1].protocol, Protocol::Udp);
    let p = &c.policies[0];
    assert_eq!(p.key(), "x/allow");
    assert_eq!(p.ingress[0].peers.len(), 3);
    assert_eq!(
        p.ingress[0].peers[2].ip_block.as_ref().unwrap().except,
        ["203.0.113.8/29"]
    );
    assert_eq!(
        p.ingress[0].ports[0].port,
        Some(PortRef::Name("serve-80-tcp".into()))
    );
    assert_eq!(p.ingress[0].ports[1].end_port, Some(90));
    assert_eq!(c.namespaces.len(), 3);

    idx.apply_peer_pod(&watch("x", "pod=b"), Event::Apply(done));
    assert!(!idx.cluster().pods.iter().any(|p| p.name == "b"));
}

#[test]
fn a_relist_replaces_objects_only_when_complete() {
    let mut idx = synced_index();
    // The watch is cut and re-lists: until InitDone the old policy stays.
    idx.apply_policy(Event::Init);
    assert_eq!(idx.cluster().policies.len(), 1);
    idx.apply_policy(Event::InitDone);
    assert!(idx.cluster().policies.is_empty());
    assert_eq!(idx.synced(), Ok(()));
}

#[test]
fn an_invalid_peer_selector_watches_nothing() {
    let mut idx = synced_index();
    idx.apply_policy(Event::Apply(np(r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broken, namespace: x}
spec:
  podSelector: {}
  ingress:
    - from:
        - podSelector: {matchExpressions: [{key: pod, operator: Near, values: [a]}]}
        - podSelector: {matchExpressions: [{key: pod, operator: In, values: []}]}
"#)));
    let needed = idx.needed_peer_watches();
    assert_eq!(needed.len(), 3, "{needed:?}");
}

// ---- the follower against the API stand-in ----

async fn until(
    rx: &mut tokio::sync::watch::Receiver<PolicyState>,
    what: &str,
    pred: impl Fn(&PolicyState) -> bool,
) -> PolicyState {
    let r = tokio::time::timeout(STEP, async {
        loop {
            {
                let s = rx.borrow_and_update();
                if pred(&s) {
                    return s.clone();
                }
            }
            rx.changed().await.expect("follower running");
        }
    })
    .await;
    match r {
        Ok(s) => s,
        Err(_) => panic!(
            "timed out waiting for: {what}; last state: {:?}",
            rx.borrow().synced
        ),
    }
}

fn pod_names(s: &PolicyState) -> Vec<String> {
    s.cluster
        .pods
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect()
}

/// x, y, z (y and z `team: y`), pods a, b, c in each, a on n1, b on n2, c on n3.
fn model(sim: &ApiSim) {
    for (ns, team) in [("x", "x"), ("y", "y"), ("z", "y")] {
        sim.insert(&namespace(ns, &[("team", team)]));
        for (i, (name, node)) in [("a", "n1"), ("b", "n2"), ("c", "n3")]
            .into_iter()
            .enumerate()
        {
            let ip = format!("100.64.{}.{}", i, ns.as_bytes()[0] - b'w');
            sim.insert(&pod(ns, name, node, Some(&ip), &[("pod", name)], PORTS));
        }
    }
}

#[tokio::test]
async fn the_follower_watches_only_what_its_pods_policies_name() {
    let sim = ApiSim::new();
    model(&sim);
    let follower = PolicyFollower::start(sim.client(), "n1");
    let mut rx = follower.subscribe();
    let s = until(&mut rx, "synced without policies", |s| s.synced.is_ok()).await;
    // No policy: only this node's pods.
    assert_eq!(pod_names(&s), ["x/a", "y/a", "z/a"]);
    assert_eq!(s.peer_watches, 0);
    assert_eq!(s.ready_for("x", "a"), Ok(()));

    sim.insert(&allow_policy());
    let s = until(&mut rx, "peers of x/allow", |s| {
        s.synced.is_ok() && s.peer_watches == 3
    })
    .await;
    // x/b (same namespace, pod=b), y and z pods b and c (team y): never x/c, never other pods.
    assert_eq!(
        pod_names(&s),
        ["x/a", "x/b", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"]
    );
    // Labels move a pod into a peer selection and out of it.
    sim.label::<Pod>(Some("x"), "c", &[("pod", Some("b"))]);
    let s = until(&mut rx, "x/c joins", |s| {
        pod_names(s).contains(&"x/c".to_string())
    })
    .await;
    assert_eq!(
        s.cluster
            .pods
            .iter()
            .find(|p| p.name == "c" && p.namespace == "x")
            .unwrap()
            .labels["pod"],
        "b"
    );
    sim.label::<Pod>(Some("x"), "c", &[("pod", Some("c"))]);
    until(&mut rx, "x/c leaves", |s| {
        !pod_names(s).contains(&"x/c".to_string())
    })
    .await;
    // A namespace relabelled out of the namespace selector: its peers go.
    sim.label::<Namespace>(None, "z", &[("team", Some("z"))]);
    let s = until(&mut rx, "z's peers dropped", |s| {
        s.peer_watches == 2 && s.synced.is_ok()
    })
    .await;
    assert!(!pod_names(&s).contains(&"z/b".to_string()));
    // The policy deleted: back to the node's own pods.
    sim.remove::<NetworkPolicy>(Some("x"), "allow");
    let s = until(&mut rx, "no peers", |s| s.peer_watches == 0).await;
    assert_eq!(pod_names(&s), ["x/a", "y/a", "z/a"]);
    assert!(sim.take_unexpected().is_empty());
}

#[tokio::test]
async fn not_synced_until_listed_and_the_last_state_holds_while_the_api_is_down() {
    let sim = ApiSim::new();
    model(&sim);
    sim.set_unreachable(true);
    let follower = PolicyFollower::start(sim.client(), "n1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = follower.state();
    assert!(s.synced.is_err(), "never synced while the API is down");
    assert!(s.ready_for("x", "a").is_err());
    sim.set_unreachable(false);
    let mut rx = follower.subscribe();
    sim.insert(&allow_policy());
    let s = until(&mut rx, "synced with peers", |s| {
        s.synced.is_ok() && s.peer_watches == 3
    })
    .await;
    let before = s.cluster.clone();

    // Down: watches fail, the state stays; changes made meanwhile and a compaction force a re-list.
    sim.set_unreachable(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = follower.state();
    assert_eq!(*during.cluster, *before, "the last good state is kept");
    assert!(during.synced.is_ok());
    sim.insert(&pod(
        "x",
        "d",
        "n1",
        Some("100.64.0.99"),
        &[("pod", "d")],
        &[],
    ));
    sim.remove::<Pod>(Some("x"), "b");
    sim.compact();
    sim.set_unreachable(false);
    let s = until(&mut rx, "re-listed after 410", |s| {
        let names = pod_names(s);
        s.synced.is_ok()
            && names.contains(&"x/d".to_string())
            && !names.contains(&"x/b".to_string())
    })
    .await;
    assert_eq!(s.ready_for("x", "d"), Ok(()));
}

#[tokio::test]
async fn a_pod_change_reaches_only_the_watches_that_select_it() {
    // The fan-out measured: one pod change is one stored event; which followers receive it depends only on
    // their selections.
    let sim = ApiSim::new();
    model(&sim);
    sim.insert(&allow_policy());
    let followers: Vec<PolicyFollower> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| PolicyFollower::start(sim.client(), n))
        .collect();
    for f in &followers {
        let mut rx = f.subscribe();
        until(&mut rx, "synced", |s| s.synced.is_ok()).await;
    }
    let rv = sim.resource_version();
    sim.label::<Pod>(Some("y"), "b", &[("v", Some("2"))]);
    assert_eq!(sim.events_since(rv, Kind::Pod), 1);
    // n1 holds y/b as a peer of x/a, n2 as its own pod; n3 neither.
    for (f, expect) in followers.iter().zip([true, true, false]) {
        let mut rx = f.subscribe();
        if expect {
            until(&mut rx, "y/b v=2", |s| {
                s.cluster.pods.iter().any(|p| {
                    p.name == "b"
                        && p.namespace == "y"
                        && p.labels.get("v").map(String::as_str) == Some("2")
                })
            })
            .await;
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!pod_names(&f.state()).contains(&"y/b".to_string()));
        }
    }
}

/// The fan-out measured (docs/policy.md, "Fan-out"): 10 nodes, 5 namespaces of 20 pods (label `app: app-{j%4}`,
/// pod j of namespace i on node (i+j)%10), one policy per namespace selecting `app-0` and allowing from
/// `app-1`. The same 40 pod changes (every pod of ns0 and ns1 relabelled) are made once with 10 policy
/// followers and once with 10 watchers of all Pods (the all-Pods design); the watch events the stand-in
/// delivers are counted and must equal the arithmetic: all-Pods 40 × 10; followers 1 per change (the pod's
/// own node) plus, for an `app-1` pod, one per node holding an `app-0` pod of its namespace.
#[tokio::test]
async fn fan_out_per_pod_change_peers_only_against_all_pods() {
    use futures::StreamExt;
    use kube::api::Api;
    use kube::runtime::watcher;

    const NODES: usize = 10;
    fn build(sim: &ApiSim) {
        for i in 0..5 {
            let ns = format!("ns{i}");
            sim.insert(&namespace(&ns, &[]));
            sim.insert(&np(&format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: {ns}}}\n\
                 spec:\n  podSelector: {{matchLabels: {{app: app-0}}}}\n  ingress:\n    - from: [{{podSelector: {{matchLabels: {{app: app-1}}}}}}]\n"
            )));
            for j in 0..20 {
                let app = format!("app-{}", j % 4);
                let ip = format!("100.64.{i}.{}", j + 1);
                let node = format!("n{}", (i + j) % NODES);
                sim.insert(&pod(
                    &ns,
                    &format!("p{j}"),
                    &node,
                    Some(&ip),
                    &[("app", &app)],
                    &[],
                ));
            }
        }
    }
    fn change(sim: &ApiSim) {
        for i in 0..2 {
            for j in 0..20 {
                sim.label::<Pod>(
                    Some(&format!("ns{i}")),
                    &format!("p{j}"),
                    &[("rev", Some("2"))],
                );
            }
        }
    }
    // The arithmetic: nodes holding app-0 pods of namespace i.
    let app0_nodes = |i: usize| {
        (0..20)
            .filter(|j| j % 4 == 0)
            .map(|j| (i + j) % NODES)
            .collect::<BTreeSet<_>>()
            .len() as u64
    };
    let expected_peers: u64 = (0..2)
        .flat_map(|i| (0..20).map(move |j| (i, j)))
        .map(|(i, j)| 1 + if j % 4 == 1 { app0_nodes(i) } else { 0 })
        .sum();
    let expected_all = 40 * NODES as u64;

    async fn settle(sim: &ApiSim, target: u64, base: u64) -> u64 {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let got = sim.watch_events_delivered(Kind::Pod) - base;
            if got >= target || tokio::time::Instant::now() > deadline {
                // Anything still in flight would show within a few scheduler turns.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return sim.watch_events_delivered(Kind::Pod) - base;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // Peers only.
    let sim = ApiSim::new();
    build(&sim);
    let followers: Vec<PolicyFollower> = (0..NODES)
        .map(|n| PolicyFollower::start(sim.client(), &format!("n{n}")))
        .collect();
    for f in &followers {
        let mut rx = f.subscribe();
        until(&mut rx, "synced", |s| {
            s.synced.is_ok() && s.peer_watches > 0
        })
        .await;
    }
    let base = sim.watch_events_delivered(Kind::Pod);
    let rv = sim.resource_version();
    change(&sim);
    assert_eq!(
        sim.events_since(rv, Kind::Pod),
        40,
        "one stored event per change"
    );
    let peers = settle(&sim, expected_peers, base).await;
    drop(followers);

    // All Pods to every node.
    let sim = ApiSim::new();
    build(&sim);
    let mut streams = vec![];
    for _ in 0..NODES {
        let mut s =
            watcher::watcher(Api::<Pod>::all(sim.client()), watcher::Config::default()).boxed();
        loop {
            if let Ok(Event::InitDone) = s.next().await.expect("watch open") {
                break;
            }
        }
        streams.push(tokio::spawn(
            async move { while s.next().await.is_some() {} },
        ));
    }
    let base = sim.watch_events_delivered(Kind::Pod);
    change(&sim);
    let all = settle(&sim, expected_all, base).await;
    for s in streams {
        s.abort();
    }
    println!(
        "fan-out: 40 pod changes, {NODES} nodes: all-Pods watchers received {all} events ({:.1}/change), \
         peers-only followers {peers} ({:.2}/change)",
        all as f64 / 40.0,
        peers as f64 / 40.0
    );
    assert_eq!(all, expected_all);
    assert_eq!(peers, expected_peers);
}

/// The datapath sees only synced snapshots: never one without the policies, never one without the peers of
/// a selected local pod.
#[tokio::test]
async fn only_synced_snapshots_are_forwarded() {
    let sim = ApiSim::new();
    model(&sim);
    sim.insert(&allow_policy());
    sim.set_unreachable(true);
    let follower = PolicyFollower::start(sim.client(), "n1");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let fwd = tokio::spawn(forward_synced(follower.subscribe(), move |c| {
        let _ = tx.send(c);
    }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        rx.try_recv().is_err(),
        "nothing forwarded before the first lists"
    );
    sim.set_unreachable(false);
    let first = tokio::time::timeout(STEP, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.policies.len(), 1);
    let names: Vec<String> = first
        .pods
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    assert!(
        names.contains(&"x/b".to_string()) && names.contains(&"y/c".to_string()),
        "{names:?}"
    );
    fwd.abort();
}
