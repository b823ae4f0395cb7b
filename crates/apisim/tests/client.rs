//! The stand-in through a real `kube::Client`: the request paths kube-rs builds, answered with the semantics the
//! reconcilers rely on.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeSpec, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use underlay_api::{Mode, UnderlayNode, UnderlayNodeSpec, UnderlayNodeStatus};
use underlay_apisim::{ApiSim, Kind};
use underlay_core::names;

/// Bound on every wait for a watch event.
const STEP: Duration = Duration::from_secs(10);

fn spec(zone: &str) -> UnderlayNodeSpec {
    UnderlayNodeSpec {
        instance_id: "i-0a".into(),
        subnet_id: "subnet-0a".into(),
        zone: zone.into(),
        mode: Mode::Routed,
        node_ip: "198.18.0.10".into(),
        primary_eni_id: "eni-0a".into(),
    }
}

fn node(name: &str) -> Node {
    let mut n = Node::default();
    n.metadata.name = Some(name.into());
    n.metadata.labels = Some(
        [(
            "topology.kubernetes.io/zone".to_string(),
            "lab-1a".to_string(),
        )]
        .into(),
    );
    n
}

fn is_status(err: &kube::Error, code: u16) -> bool {
    matches!(err, kube::Error::Api(s) if s.code == code)
}

#[tokio::test]
async fn underlaynode_create_get_list_patch() -> anyhow::Result<()> {
    let sim = ApiSim::new();
    let api: Api<UnderlayNode> = Api::all(sim.client());
    let mut un = UnderlayNode::new("n1", spec("lab-1a"));
    un.metadata.labels = Some([(names::LABEL_NODE.to_string(), "n1".to_string())].into());
    // Status sent on create is dropped: it belongs to the status subresource.
    un.status = Some(UnderlayNodeStatus {
        pool_size: 9,
        ..Default::default()
    });
    let created = api.create(&PostParams::default(), &un).await?;
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some());
    assert!(created.status.is_none());
    let dup = api.create(&PostParams::default(), &un).await.unwrap_err();
    assert!(
        matches!(&dup, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{dup}"
    );
    api.create(
        &PostParams::default(),
        &UnderlayNode::new("n2", spec("lab-1b")),
    )
    .await?;

    let got = api.get("n1").await?;
    assert_eq!(got.spec, spec("lab-1a"));
    assert!(is_status(&api.get("missing").await.unwrap_err(), 404));

    let all = api.list(&ListParams::default()).await?;
    assert_eq!(all.items.len(), 2);
    let by_label = api
        .list(&ListParams::default().labels(&format!("{}=n1", names::LABEL_NODE)))
        .await?;
    assert_eq!(by_label.items.len(), 1);
    let by_field = api
        .list(&ListParams::default().fields("metadata.name=n2"))
        .await?;
    assert_eq!(by_field.items[0].metadata.name.as_deref(), Some("n2"));

    // A spec change bumps generation and resourceVersion; a status field in a main-resource patch is ignored.
    let patched = api
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "zone": "lab-1c" }, "status": { "poolSize": 5 } })),
        )
        .await?;
    assert_eq!(patched.spec.zone, "lab-1c");
    assert_eq!(patched.metadata.generation, Some(2));
    assert_ne!(
        patched.metadata.resource_version,
        got.metadata.resource_version
    );
    assert!(patched.status.is_none());

    // Server-side apply: merged, field manager recorded.
    let applied = api
        .patch(
            "n1",
            &PatchParams::apply(names::FIELD_MANAGER_CONTROLLER),
            &Patch::Apply(json!({
                "apiVersion": "underlay.dev/v1alpha1", "kind": "UnderlayNode",
                "metadata": { "name": "n1", "labels": { (names::LABEL_MODE): "routed" } }
            })),
        )
        .await?;
    assert_eq!(
        applied.metadata.labels.as_ref().unwrap()[names::LABEL_MODE],
        "routed"
    );
    assert_eq!(applied.spec.zone, "lab-1c");
    let managers: Vec<_> = applied
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.contains(&names::FIELD_MANAGER_CONTROLLER.to_string()),
        "{managers:?}"
    );

    // JSON patch, including a failing test op.
    let jp: json_patch::Patch = serde_json::from_value(
        json!([{ "op": "replace", "path": "/spec/zone", "value": "lab-1a" }]),
    )?;
    assert_eq!(
        api.patch("n1", &PatchParams::default(), &Patch::Json::<()>(jp))
            .await?
            .spec
            .zone,
        "lab-1a"
    );
    let bad: json_patch::Patch =
        serde_json::from_value(json!([{ "op": "test", "path": "/spec/zone", "value": "nope" }]))?;
    assert!(is_status(
        &api.patch("n1", &PatchParams::default(), &Patch::Json::<()>(bad))
            .await
            .unwrap_err(),
        422
    ));
    assert!(sim.take_unexpected().is_empty());
    Ok(())
}

#[tokio::test]
async fn status_subresource_writes_only_status() -> anyhow::Result<()> {
    let sim = ApiSim::new();
    let api: Api<UnderlayNode> = Api::all(sim.client());
    api.create(
        &PostParams::default(),
        &UnderlayNode::new("n1", spec("lab-1a")),
    )
    .await?;
    let after = api
        .patch_status(
            "n1",
            &PatchParams::apply(names::FIELD_MANAGER_AGENT),
            &Patch::Merge(json!({ "spec": { "zone": "elsewhere" }, "status": { "poolSize": 64, "poolUsed": 3 } })),
        )
        .await?;
    let status = after.status.expect("status written");
    assert_eq!((status.pool_size, status.pool_used), (64, 3));
    assert_eq!(
        after.spec.zone, "lab-1a",
        "a status write must not change spec"
    );
    assert_eq!(
        after.metadata.generation,
        Some(1),
        "a status write does not bump generation"
    );

    // replace_status with a stale resourceVersion is refused.
    let mut stale = api.get_status("n1").await?;
    sim.modify::<UnderlayNode>(None, "n1", |u| u.status.as_mut().unwrap().pool_used = 4);
    stale.status.as_mut().unwrap().pool_used = 10;
    let err = api
        .replace_status("n1", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(is_status(&err, 409), "{err}");
    assert_eq!(
        sim.get::<UnderlayNode>(None, "n1")
            .unwrap()
            .status
            .unwrap()
            .pool_used,
        4
    );
    Ok(())
}

#[tokio::test]
async fn stale_replace_conflicts_and_a_retry_on_fresh_state_succeeds() -> anyhow::Result<()> {
    let sim = ApiSim::new();
    let api: Api<UnderlayNode> = Api::all(sim.client());
    api.create(
        &PostParams::default(),
        &UnderlayNode::new("n1", spec("lab-1a")),
    )
    .await?;
    let mut mine = api.get("n1").await?;
    // Someone else writes in between.
    sim.modify::<UnderlayNode>(None, "n1", |u| u.spec.primary_eni_id = "eni-0b".into());
    mine.spec.zone = "lab-1b".into();
    let err = api
        .replace("n1", &PostParams::default(), &mine)
        .await
        .unwrap_err();
    assert!(is_status(&err, 409), "{err}");

    // The retry loop a reconciler runs: re-read, re-apply the change, replace.
    let mut attempts = 0;
    let done = loop {
        attempts += 1;
        assert!(attempts <= 3, "retry did not converge");
        let mut fresh = api.get("n1").await?;
        fresh.spec.zone = "lab-1b".into();
        match api.replace("n1", &PostParams::default(), &fresh).await {
            Ok(done) => break done,
            Err(e) if is_status(&e, 409) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    assert_eq!(attempts, 1);
    assert_eq!(
        (done.spec.zone.as_str(), done.spec.primary_eni_id.as_str()),
        ("lab-1b", "eni-0b")
    );

    // Injected conflicts fail exactly the next write of that kind.
    sim.inject_conflict(Kind::UnderlayNode);
    let p = Patch::Merge(json!({ "spec": { "zone": "lab-1c" } }));
    assert!(is_status(
        &api.patch("n1", &PatchParams::default(), &p)
            .await
            .unwrap_err(),
        409
    ));
    assert_eq!(
        api.patch("n1", &PatchParams::default(), &p)
            .await?
            .spec
            .zone,
        "lab-1c"
    );
    Ok(())
}

#[tokio::test]
async fn finalizer_holds_delete_until_removed() -> anyhow::Result<()> {
    let sim = ApiSim::new();
    let api: Api<UnderlayNode> = Api::all(sim.client());
    let mut un = UnderlayNode::new("n1", spec("lab-1a"));
    un.metadata.finalizers = Some(vec![names::FINALIZER_CLEANUP.into()]);
    api.create(&PostParams::default(), &un).await?;

    let first = api.delete("n1", &DeleteParams::default()).await?;
    let marked = first
        .left()
        .expect("object returned while finalizers remain");
    assert!(marked.metadata.deletion_timestamp.is_some());
    let still = api.get("n1").await?;
    assert_eq!(
        still.metadata.deletion_timestamp,
        marked.metadata.deletion_timestamp
    );

    // A second delete changes nothing.
    let again = api
        .delete("n1", &DeleteParams::default())
        .await?
        .left()
        .unwrap();
    assert_eq!(
        again.metadata.resource_version,
        still.metadata.resource_version
    );

    // The cleanup finished: remove the finalizer, the object goes.
    api.patch(
        "n1",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "finalizers": null } })),
    )
    .await?;
    assert!(is_status(&api.get("n1").await.unwrap_err(), 404));
    assert!(sim.get::<UnderlayNode>(None, "n1").is_none());

    // Without finalizers, delete is immediate.
    api.create(
        &PostParams::default(),
        &UnderlayNode::new("n2", spec("lab-1a")),
    )
    .await?;
    api.delete("n2", &DeleteParams::default()).await?;
    assert!(is_status(&api.get("n2").await.unwrap_err(), 404));
    assert!(is_status(
        &api.delete("n2", &DeleteParams::default())
            .await
            .unwrap_err(),
        404
    ));
    Ok(())
}

async fn next(
    stream: &mut (impl futures::Stream<Item = Result<Event<Node>, watcher::Error>> + Unpin),
) -> Event<Node> {
    tokio::time::timeout(STEP, stream.next())
        .await
        .expect("watch event within bound")
        .expect("stream open")
        .expect("no watch error")
}

#[tokio::test]
async fn watcher_sees_nodes_added_modified_and_deleted() -> anyhow::Result<()> {
    let sim = ApiSim::new();
    sim.insert(&node("a"));
    sim.insert(&node("b"));
    let nodes: Api<Node> = Api::all(sim.client());
    let mut stream = watcher::watcher(nodes.clone(), watcher::Config::default()).boxed();

    assert!(matches!(next(&mut stream).await, Event::Init));
    let mut init = vec![];
    loop {
        match next(&mut stream).await {
            Event::InitApply(n) => init.push(n.metadata.name.unwrap()),
            Event::InitDone => break,
            other => panic!("unexpected {other:?} during the initial list"),
        }
    }
    init.sort();
    assert_eq!(init, ["a", "b"]);

    // Another client adds a node and taints one; the controller-side patch goes through the API.
    nodes.create(&PostParams::default(), &node("c")).await?;
    let taint = Taint {
        key: names::TAINT_NOT_READY.into(),
        effect: "NoSchedule".into(),
        ..Default::default()
    };
    sim.modify::<Node>(None, "a", |n| {
        n.spec = Some(NodeSpec {
            taints: Some(vec![taint.clone()]),
            ..Default::default()
        })
    });
    nodes.delete("b", &DeleteParams::default()).await?;

    match next(&mut stream).await {
        Event::Apply(n) => assert_eq!(n.metadata.name.as_deref(), Some("c")),
        other => panic!("want Apply(c), got {other:?}"),
    }
    match next(&mut stream).await {
        Event::Apply(n) => {
            assert_eq!(n.metadata.name.as_deref(), Some("a"));
            assert_eq!(
                n.spec.unwrap().taints.unwrap()[0].key,
                names::TAINT_NOT_READY
            );
        }
        other => panic!("want Apply(a), got {other:?}"),
    }
    match next(&mut stream).await {
        Event::Delete(n) => assert_eq!(n.metadata.name.as_deref(), Some("b")),
        other => panic!("want Delete(b), got {other:?}"),
    }

    // A watch limited by field selector sees only its object (the agent watches its own UnderlayNode this way).
    let uns: Api<UnderlayNode> = Api::all(sim.client());
    let cfg = watcher::Config::default().fields("metadata.name=mine");
    let mut own = watcher::watcher(uns.clone(), cfg).applied_objects().boxed();
    uns.create(
        &PostParams::default(),
        &UnderlayNode::new("other", spec("lab-1a")),
    )
    .await?;
    uns.create(
        &PostParams::default(),
        &UnderlayNode::new("mine", spec("lab-1a")),
    )
    .await?;
    let seen = tokio::time::timeout(STEP, own.try_next())
        .await??
        .expect("stream open");
    assert_eq!(seen.metadata.name.as_deref(), Some("mine"));
    assert!(sim.take_unexpected().is_empty());
    Ok(())
}

#[tokio::test]
async fn node_patches_merge_json_and_status() -> anyhow::Result<()> {
    let sim = ApiSim::new();
    sim.insert(&node("a"));
    let nodes: Api<Node> = Api::all(sim.client());
    let p = Patch::Merge(json!({ "spec": { "podCIDR": "100.64.0.0/26" } }));
    assert_eq!(
        nodes
            .patch("a", &PatchParams::default(), &p)
            .await?
            .spec
            .unwrap()
            .pod_cidr
            .as_deref(),
        Some("100.64.0.0/26")
    );
    let status = Patch::Merge(
        json!({ "status": { "conditions": [{ "type": "NetworkUnavailable", "status": "False" }] } }),
    );
    let after = nodes
        .patch_status("a", &PatchParams::default(), &status)
        .await?;
    assert_eq!(
        after.status.unwrap().conditions.unwrap()[0].type_,
        "NetworkUnavailable"
    );
    assert_eq!(
        after.spec.unwrap().pod_cidr.as_deref(),
        Some("100.64.0.0/26")
    );
    let listed = nodes
        .list(&ListParams::default().fields("metadata.name=a"))
        .await?;
    assert_eq!(listed.items.len(), 1);
    // Set-based label selectors, as the API server takes them.
    sim.insert(&Node {
        metadata: ObjectMeta {
            name: Some("labelled".into()),
            labels: Some([("x".to_string(), "b".to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    });
    let names = |l: kube::core::ObjectList<Node>| -> Vec<String> {
        l.items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect()
    };
    let listed = nodes
        .list(&ListParams::default().labels("x in (a,b)"))
        .await?;
    assert_eq!(names(listed), vec!["labelled"]);
    let listed = nodes
        .list(&ListParams::default().labels("x notin (b),x"))
        .await?;
    assert!(names(listed).is_empty());
    assert!(
        nodes
            .list(&ListParams::default().labels("x in (a,b"))
            .await
            .is_err()
    );
    Ok(())
}

fn lease(holder: &str) -> Lease {
    let mut l = Lease::default();
    l.metadata.name = Some(names::LEADER_LEASE.into());
    l.spec = Some(LeaseSpec {
        holder_identity: Some(holder.into()),
        lease_duration_seconds: Some(15),
        ..Default::default()
    });
    l
}

#[tokio::test]
async fn lease_create_and_replace_conflict() -> anyhow::Result<()> {
    let sim = ApiSim::new();
    let leases: Api<Lease> = Api::namespaced(sim.client(), "underlay-system");
    let created = leases
        .create(&PostParams::default(), &lease("replica-a"))
        .await?;
    assert_eq!(
        created.metadata.namespace.as_deref(),
        Some("underlay-system")
    );
    assert!(
        leases
            .create(&PostParams::default(), &lease("replica-b"))
            .await
            .is_err()
    );

    // Both replicas read the same version; the first replace wins, the second gets 409.
    let seen = leases.get(names::LEADER_LEASE).await?;
    let mut a = seen.clone();
    a.spec.as_mut().unwrap().lease_transitions = Some(1); // replica-a renews
    let mut b = seen;
    b.spec.as_mut().unwrap().holder_identity = Some("replica-b".into());
    leases
        .replace(names::LEADER_LEASE, &PostParams::default(), &a)
        .await?;
    let err = leases
        .replace(names::LEADER_LEASE, &PostParams::default(), &b)
        .await
        .unwrap_err();
    assert!(is_status(&err, 409), "{err}");
    let holder = sim
        .get::<Lease>(Some("underlay-system"), names::LEADER_LEASE)
        .unwrap();
    assert_eq!(
        holder.spec.unwrap().holder_identity.as_deref(),
        Some("replica-a")
    );

    // Leases live in a namespace: the same name elsewhere is a different object.
    let other: Api<Lease> = Api::namespaced(sim.client(), "other");
    assert!(is_status(
        &other.get(names::LEADER_LEASE).await.unwrap_err(),
        404
    ));
    assert!(sim.take_unexpected().is_empty());
    Ok(())
}

#[tokio::test]
async fn events_are_stored_and_unexpected_calls_recorded() -> anyhow::Result<()> {
    let sim = ApiSim::new();
    let client = sim.client();
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: names::FIELD_MANAGER_CONTROLLER.into(),
            instance: None,
        },
    );
    let node_ref = k8s_openapi::api::core::v1::ObjectReference {
        kind: Some("Node".into()),
        name: Some("a".into()),
        api_version: Some("v1".into()),
        namespace: Some("default".into()),
        ..Default::default()
    };
    let ev = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Normal,
        reason: "RouteMoved".into(),
        note: Some("100.64.0.0/22 moved to eni-0b".into()),
        action: "ReplaceRoute".into(),
        secondary: None,
    };
    recorder.publish(&ev, &node_ref).await?;
    let stored = sim.list::<k8s_openapi::api::events::v1::Event>();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].reason.as_deref(), Some("RouteMoved"));

    // Secrets, deleting a lease, watching events: none is served, each is recorded.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), "default");
    assert!(is_status(&secrets.get("x").await.unwrap_err(), 404));
    let leases: Api<Lease> = Api::namespaced(client, "default");
    assert!(is_status(
        &leases
            .delete("x", &DeleteParams::default())
            .await
            .unwrap_err(),
        404
    ));
    let unexpected = sim.take_unexpected();
    assert_eq!(unexpected.len(), 2, "{unexpected:?}");
    assert_eq!(unexpected[0].path, "/api/v1/namespaces/default/secrets/x");
    assert_eq!(unexpected[1].method, "DELETE");
    assert!(sim.take_unexpected().is_empty(), "take drains");
    let all = sim.take_requests();
    assert!(
        all.iter()
            .any(|r| r.method == "POST" && r.path.ends_with("/events") && r.status == 201),
        "{all:?}"
    );
    Ok(())
}

#[tokio::test]
async fn unreachable_mode_fails_every_request_and_recovers() -> anyhow::Result<()> {
    let sim = ApiSim::new();
    sim.insert(&node("a"));
    let nodes: Api<Node> = Api::all(sim.client());
    let mut watch = nodes
        .watch(&kube::api::WatchParams::default(), "0")
        .await?
        .boxed();
    assert!(
        tokio::time::timeout(STEP, watch.try_next())
            .await??
            .is_some(),
        "synthetic ADDED for a"
    );

    sim.set_unreachable(true);
    let err = nodes.get("a").await.unwrap_err();
    assert!(
        !matches!(err, kube::Error::Api(_)),
        "a transport error, not an API answer: {err}"
    );
    assert!(nodes.list(&ListParams::default()).await.is_err());
    // The open watch ends.
    assert!(
        tokio::time::timeout(STEP, watch.try_next())
            .await?
            .ok()
            .flatten()
            .is_none()
    );

    sim.set_unreachable(false);
    assert_eq!(nodes.get("a").await?.metadata.name.as_deref(), Some("a"));
    Ok(())
}

#[tokio::test]
async fn watch_from_a_resource_version_replays_only_later_changes() -> anyhow::Result<()> {
    let sim = ApiSim::new();
    sim.insert(&node("a"));
    let nodes: Api<Node> = Api::all(sim.client());
    let listed = nodes.list(&ListParams::default()).await?;
    let rv = listed
        .metadata
        .resource_version
        .expect("list carries a resourceVersion");
    sim.insert(&node("b"));
    nodes
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "x": "y" } } })),
        )
        .await?;
    let mut watch = nodes
        .watch(&kube::api::WatchParams::default().labels("x=y"), &rv)
        .await?
        .boxed();
    match tokio::time::timeout(STEP, watch.try_next())
        .await??
        .expect("event")
    {
        // `a` entered the selection: the API server reports that as ADDED.
        kube::api::WatchEvent::Added(n) => assert_eq!(n.metadata.name.as_deref(), Some("a")),
        other => panic!("want Added(a) only (b does not match the selector), got {other:?}"),
    }
    // Leaving the selection is reported as DELETED.
    nodes
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "x": "z" } } })),
        )
        .await?;
    match tokio::time::timeout(STEP, watch.try_next())
        .await??
        .expect("event")
    {
        kube::api::WatchEvent::Deleted(n) => assert_eq!(n.metadata.name.as_deref(), Some("a")),
        other => panic!("want Deleted(a), got {other:?}"),
    }
    // A watch with a timeout ends by itself; kube's watcher then re-watches from its last version.
    let short = kube::api::WatchParams::default().timeout(1);
    let rv_now = sim.resource_version().to_string();
    let mut ending = nodes.watch(&short, &rv_now).await?.boxed();
    assert!(
        tokio::time::timeout(STEP, ending.try_next())
            .await??
            .is_none()
    );
    Ok(())
}
