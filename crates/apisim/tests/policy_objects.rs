//! Namespaces, Pods and NetworkPolicies through a real `kube::Client`: namespaced and all-namespaces paths,
//! label selectors (equality and set-based) and field selectors on lists and watches, the Pod status
//! subresource, 409s, and 410 Gone for a watch older than the kept history.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use underlay_apisim::objects::{namespace, network_policy, pod};
use underlay_apisim::{ApiSim, Kind, NAMESPACE_NAME_LABEL};

const STEP: Duration = Duration::from_secs(10);

fn is_status(err: &kube::Error, code: u16) -> bool {
    matches!(err, kube::Error::Api(s) if s.code == code)
}

fn names(pods: impl IntoIterator<Item = Pod>) -> Vec<String> {
    let mut v: Vec<String> = pods
        .into_iter()
        .map(|p| {
            format!(
                "{}/{}",
                p.metadata.namespace.unwrap_or_default(),
                p.metadata.name.unwrap_or_default()
            )
        })
        .collect();
    v.sort();
    v
}

const PORTS: &[(&str, i32, &str)] = &[("serve-80-tcp", 80, "TCP"), ("serve-81-udp", 81, "UDP")];

/// x and y, each with pods a (node n1) and b (node n2).
async fn model(sim: &ApiSim) -> anyhow::Result<()> {
    let client = sim.client();
    let nss: Api<Namespace> = Api::all(client.clone());
    for ns in ["x", "y"] {
        nss.create(&PostParams::default(), &namespace(ns, &[("team", ns)]))
            .await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        for (name, node) in [("a", "n1"), ("b", "n2")] {
            pods.create(
                &PostParams::default(),
                &pod(ns, name, node, None, &[("pod", name)], PORTS),
            )
            .await?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn namespaces_are_labelled_with_their_name_and_gate_creation() -> anyhow::Result<()> {
    let sim = ApiSim::new();
    let client = sim.client();
    let nss: Api<Namespace> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "x");
    // No namespace yet: the API server refuses to create in it.
    let err = pods
        .create(&PostParams::default(), &pod("x", "a", "n1", None, &[], &[]))
        .await
        .unwrap_err();
    assert!(is_status(&err, 404), "{err}");

    let created = nss
        .create(&PostParams::default(), &namespace("x", &[("team", "x")]))
        .await?;
    let labels = created.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels[NAMESPACE_NAME_LABEL], "x");
    assert_eq!(labels["team"], "x");
    assert_eq!(
        created.status.and_then(|s| s.phase).as_deref(),
        Some("Active")
    );
    // The name label cannot be removed or changed.
    let patched = nss
        .patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { (NAMESPACE_NAME_LABEL): "other", "team": null } } })),
        )
        .await?;
    let labels = patched.metadata.labels.unwrap_or_default();
    assert_eq!(labels[NAMESPACE_NAME_LABEL], "x");
    assert!(!labels.contains_key("team"));

    pods.create(&PostParams::default(), &pod("x", "a", "n1", None, &[], &[]))
        .await?;
    let nps: Api<NetworkPolicy> = Api::namespaced(client.clone(), "x");
    nps.create(
        &PostParams::default(),
        &network_policy(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\n\
             spec: {podSelector: {}, policyTypes: [Ingress]}\n",
        )?,
    )
    .await?;
    // Deleting the namespace deletes what it holds.
    nss.delete("x", &DeleteParams::default()).await?;
    assert!(sim.get::<Pod>(Some("x"), "a").is_none());
    assert!(sim.get::<NetworkPolicy>(Some("x"), "deny").is_none());
    assert!(sim.get::<Namespace>(None, "x").is_none());
    assert!(sim.take_unexpected().is_empty());
    Ok(())
}

#[tokio::test]
async fn pods_list_by_namespace_labels_and_fields() -> anyhow::Result<()> {
    let sim = ApiSim::new();
    model(&sim).await?;
    let client = sim.client();
    let all: Api<Pod> = Api::all(client.clone());
    let x: Api<Pod> = Api::namespaced(client.clone(), "x");
    let list = |api: &Api<Pod>, lp: ListParams| {
        let api = api.clone();
        async move { Ok::<_, kube::Error>(names(api.list(&lp).await?.items)) }
    };
    assert_eq!(
        list(&all, ListParams::default()).await?,
        ["x/a", "x/b", "y/a", "y/b"]
    );
    assert_eq!(list(&x, ListParams::default()).await?, ["x/a", "x/b"]);
    // Equality and set-based label selectors.
    assert_eq!(
        list(&all, ListParams::default().labels("pod=a")).await?,
        ["x/a", "y/a"]
    );
    assert_eq!(
        list(&all, ListParams::default().labels("pod in (a,b),pod!=b")).await?,
        ["x/a", "y/a"]
    );
    assert_eq!(
        list(&all, ListParams::default().labels("pod notin (a)")).await?,
        ["x/b", "y/b"]
    );
    assert_eq!(
        list(&all, ListParams::default().labels("!pod")).await?,
        Vec::<String>::new()
    );
    // Field selectors the API server supports for pods.
    assert_eq!(
        list(&all, ListParams::default().fields("spec.nodeName=n1")).await?,
        ["x/a", "y/a"]
    );
    assert_eq!(
        list(
            &all,
            ListParams::default().fields("spec.nodeName=n2,metadata.namespace=y")
        )
        .await?,
        ["y/b"]
    );
    assert_eq!(
        list(&x, ListParams::default().fields("metadata.name!=a")).await?,
        ["x/b"]
    );
    assert_eq!(
        list(&all, ListParams::default().fields("status.phase=Pending")).await?,
        ["x/a", "x/b", "y/a", "y/b"]
    );
    // An unsupported field label is a 400, as on the real API server.
    let err = all
        .list(&ListParams::default().fields("spec.restartPolicyX=Always"))
        .await
        .unwrap_err();
    assert!(is_status(&err, 400), "{err}");
    // Creating through the all-namespaces path is not served.
    assert!(
        all.create(&PostParams::default(), &pod("x", "c", "n1", None, &[], &[]))
            .await
            .is_err()
    );
    assert_eq!(sim.take_unexpected().len(), 1);
    Ok(())
}

#[tokio::test]
async fn pod_status_is_a_subresource_and_stale_writes_conflict() -> anyhow::Result<()> {
    let sim = ApiSim::new();
    model(&sim).await?;
    let x: Api<Pod> = Api::namespaced(sim.client(), "x");
    let a = x.get("a").await?;
    // Status sent on create was reset to Pending without an address.
    let status = a.status.clone().unwrap_or_default();
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    assert_eq!(status.pod_ip, None);
    // A main-resource patch cannot set the address; the status subresource can, and leaves labels alone.
    let p = x
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "role": "web" } }, "status": { "podIP": "100.64.0.9" } })),
        )
        .await?;
    assert_eq!(p.status.unwrap_or_default().pod_ip, None);
    let p = x
        .patch_status(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "role": "db" } }, "status": { "phase": "Running", "podIP": "100.64.0.9" } })),
        )
        .await?;
    assert_eq!(
        p.status.clone().unwrap_or_default().pod_ip.as_deref(),
        Some("100.64.0.9")
    );
    assert_eq!(p.metadata.labels.unwrap_or_default()["role"], "web");
    let all: Api<Pod> = Api::all(sim.client());
    assert_eq!(
        names(
            all.list(&ListParams::default().fields("status.podIP=100.64.0.9"))
                .await?
                .items
        ),
        ["x/a"]
    );
    // A replace from a stale copy is a 409.
    let mut stale = a;
    stale.metadata.labels = Some([("pod".to_string(), "z".to_string())].into());
    let err = x
        .replace("a", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(is_status(&err, 409), "{err}");
    // And an injected conflict hits the next write.
    sim.inject_conflict(Kind::Pod);
    let err = x
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "k": "v" } } })),
        )
        .await
        .unwrap_err();
    assert!(is_status(&err, 409), "{err}");
    Ok(())
}

async fn next_event<S, K>(stream: &mut S) -> anyhow::Result<Event<K>>
where
    S: futures::Stream<Item = Result<Event<K>, watcher::Error>> + Unpin,
{
    Ok(tokio::time::timeout(STEP, stream.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("watch ended"))??)
}

#[tokio::test]
async fn watches_filter_by_field_and_label_and_follow_objects_across_the_filter()
-> anyhow::Result<()> {
    let sim = ApiSim::new();
    model(&sim).await?;
    let all: Api<Pod> = Api::all(sim.client());
    // An agent's watch: the pods of its node.
    let mut on_n1 = watcher::watcher(
        all.clone(),
        watcher::Config::default().fields("spec.nodeName=n1"),
    )
    .boxed();
    let mut seen = vec![];
    loop {
        match next_event(&mut on_n1).await? {
            Event::InitApply(p) => seen.push(p),
            Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(names(seen), ["x/a", "y/a"]);
    // A peer watch: pods labelled pod in (b) in namespace y.
    let y: Api<Pod> = Api::namespaced(sim.client(), "y");
    let mut peers = watcher::watcher(y, watcher::Config::default().labels("pod in (b)"))
        .applied_objects()
        .boxed();
    let first = tokio::time::timeout(STEP, peers.try_next())
        .await??
        .unwrap();
    assert_eq!(names([first]), ["y/b"]);

    // y/a is relabelled into the peer selection: the peer watch sees it as added; the node watch as modified.
    sim.label::<Pod>(Some("y"), "a", &[("pod", Some("b"))]);
    let entered = tokio::time::timeout(STEP, peers.try_next())
        .await??
        .unwrap();
    assert_eq!(names([entered]), ["y/a"]);
    match next_event(&mut on_n1).await? {
        Event::Apply(p) => assert_eq!(p.metadata.labels.unwrap_or_default()["pod"], "b"),
        other => panic!("expected an apply, got {other:?}"),
    }
    // A pod on another node never reaches the n1 watch; a deleted n1 pod does.
    sim.label::<Pod>(Some("x"), "b", &[("extra", Some("1"))]);
    sim.remove::<Pod>(Some("x"), "a");
    match next_event(&mut on_n1).await? {
        Event::Delete(p) => assert_eq!(names([p]), ["x/a"]),
        other => panic!("expected the delete of x/a, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn network_policies_watch_in_all_namespaces() -> anyhow::Result<()> {
    let sim = ApiSim::new();
    model(&sim).await?;
    let all: Api<NetworkPolicy> = Api::all(sim.client());
    let mut stream = watcher::watcher(all, watcher::Config::default())
        .applied_objects()
        .boxed();
    let y: Api<NetworkPolicy> = Api::namespaced(sim.client(), "y");
    y.create(
        &PostParams::default(),
        &network_policy(
            r#"{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy",
                "metadata":{"name":"allow-x","namespace":"y"},
                "spec":{"podSelector":{"matchLabels":{"pod":"a"}},
                        "ingress":[{"from":[{"namespaceSelector":{"matchExpressions":[
                            {"key":"kubernetes.io/metadata.name","operator":"In","values":["x"]}]}}],
                          "ports":[{"port":"serve-80-tcp"},{"port":81,"endPort":90,"protocol":"UDP"}]}]}}"#,
        )?,
    )
    .await?;
    let got = tokio::time::timeout(STEP, stream.try_next())
        .await??
        .unwrap();
    assert_eq!(got.metadata.namespace.as_deref(), Some("y"));
    assert_eq!(got.metadata.generation, Some(1));
    let ports = got.spec.unwrap().ingress.unwrap()[0].ports.clone().unwrap();
    assert_eq!(ports[1].end_port, Some(90));
    Ok(())
}

#[tokio::test]
async fn a_watch_older_than_the_kept_history_gets_410_and_the_watcher_relists() -> anyhow::Result<()>
{
    let sim = ApiSim::new();
    model(&sim).await?;
    let x: Api<Pod> = Api::namespaced(sim.client(), "x");
    let old_rv = x
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap();
    sim.label::<Pod>(Some("x"), "a", &[("v", Some("1"))]);
    sim.compact();
    // A raw watch from before the compaction: one ERROR event with 410 Expired.
    let mut raw = x.watch(&WatchParams::default(), &old_rv).await?.boxed();
    match tokio::time::timeout(STEP, raw.try_next()).await??.unwrap() {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410, got {other:?}"),
    }
    // A running watch that falls behind a bounded history is ended the same way.
    let mut behind = x
        .watch(&WatchParams::default(), &sim.resource_version().to_string())
        .await?
        .boxed();
    sim.set_history_limit(Some(2));
    for i in 0..5 {
        sim.label::<Pod>(Some("x"), "b", &[("n", Some(&i.to_string()))]);
    }
    let mut saw_gone = false;
    while let Some(ev) = tokio::time::timeout(STEP, behind.try_next()).await?? {
        if let WatchEvent::Error(e) = ev {
            assert_eq!(e.code, 410);
            saw_gone = true;
        }
    }
    assert!(
        saw_gone,
        "a watch behind the kept history must end with 410"
    );
    // kube-runtime's watcher recovers by re-listing.
    sim.set_history_limit(None);
    let mut w = watcher::watcher(x.clone(), watcher::Config::default()).boxed();
    loop {
        if let Event::InitDone = next_event(&mut w).await? {
            break;
        }
    }
    // The watch is cut while the object changes and the history is compacted: resuming from its last
    // resourceVersion gets 410, so the watcher must re-list to see the change.
    sim.set_unreachable(true);
    loop {
        if tokio::time::timeout(STEP, w.next())
            .await?
            .unwrap()
            .is_err()
        {
            break;
        }
    }
    sim.label::<Pod>(Some("x"), "a", &[("after", Some("gone"))]);
    sim.compact();
    sim.set_unreachable(false);
    let mut relisted_with_change = false;
    loop {
        match tokio::time::timeout(STEP, w.next()).await?.unwrap() {
            Ok(Event::InitApply(p))
                if p.metadata
                    .labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key("after")) =>
            {
                relisted_with_change = true;
            }
            Ok(Event::InitDone) => break,
            Ok(Event::Apply(p)) => panic!("resumed across a compaction without a re-list: {p:?}"),
            _ => {}
        }
    }
    assert!(
        relisted_with_change,
        "the watcher re-listed after 410 and saw the change"
    );
    Ok(())
}
