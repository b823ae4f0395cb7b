//! The policy engine with a recording nft: admission waits for inputs and for the pod, the first transaction
//! replaces what a previous agent left, later ones are diffs, DEL removes the pod's state.

use std::sync::{Arc, Mutex};

use underlay_agent::policy::{PolicyEngine, PolicyError, PolicyNft, SyncOutcome};
use underlay_core::policy::diff::PolicyObjects;
use underlay_core::policy::{Cluster, LabelSelector, LocalPod, Namespace, NetworkPolicy, Pod};

#[derive(Debug, Default, Clone)]
struct Recorder {
    batches: Arc<Mutex<Vec<String>>>,
    fail: Arc<Mutex<bool>>,
}

impl PolicyNft for Recorder {
    fn existing(&self) -> Result<PolicyObjects, PolicyError> {
        let mut o = PolicyObjects::default();
        o.chains.insert("pol_stale_in".into());
        Ok(o)
    }
    fn apply(&self, batch: &str) -> Result<(), PolicyError> {
        if *self.fail.lock().unwrap() {
            return Err(PolicyError::Nft("refused".into()));
        }
        self.batches.lock().unwrap().push(batch.to_string());
        Ok(())
    }
}

fn pod(name: &str, ip: &str) -> Pod {
    Pod {
        namespace: "x".into(),
        name: name.into(),
        labels: [("pod".to_string(), name.to_string())].into(),
        ip: Some(ip.parse().unwrap()),
        node: "n1".into(),
        host_network: false,
        named_ports: vec![],
    }
}

fn inputs(pods: Vec<Pod>) -> Cluster {
    Cluster {
        namespaces: vec![Namespace {
            name: "x".into(),
            labels: Default::default(),
        }],
        pods,
        policies: vec![NetworkPolicy {
            namespace: "x".into(),
            name: "deny-a".into(),
            pod_selector: LabelSelector::labels([("pod", "a")]),
            policy_types: vec![],
            ingress: vec![],
            egress: vec![],
        }],
        nodes: vec![],
    }
}

fn local(name: &str, ip: &str, veth: &str) -> LocalPod {
    LocalPod {
        namespace: "x".into(),
        name: name.into(),
        ifname: veth.into(),
        ip: ip.parse().unwrap(),
    }
}

fn key(c: &str) -> (String, String) {
    (c.to_string(), "eth0".to_string())
}

#[test]
fn admission_waits_for_inputs_and_for_the_pod_then_commits_before_returning() {
    let rec = Recorder::default();
    let engine = PolicyEngine::new(Box::new(rec.clone()));
    let e = engine
        .admit(key("c1"), local("a", "100.64.0.1", "ul00000000001"))
        .unwrap_err();
    assert!(
        matches!(&e, PolicyError::NotReady(m) if m.contains("not synced")),
        "{e}"
    );
    assert!(
        rec.batches.lock().unwrap().is_empty(),
        "nothing guessed, nothing applied"
    );

    assert!(matches!(
        engine
            .set_inputs(inputs(vec![pod("b", "100.64.0.2")]))
            .unwrap(),
        SyncOutcome::Applied { full: true, .. }
    ));
    let first = rec.batches.lock().unwrap()[0].clone();
    assert!(
        first.contains("delete chain inet underlay pol_stale_in"),
        "replaces what a previous agent left:\n{first}"
    );

    let e = engine
        .admit(key("c1"), local("a", "100.64.0.1", "ul00000000001"))
        .unwrap_err();
    assert!(
        matches!(&e, PolicyError::NotReady(m) if m.contains("x/a")),
        "names the missing pod: {e}"
    );

    engine
        .set_inputs(inputs(vec![pod("a", "100.64.0.1"), pod("b", "100.64.0.2")]))
        .unwrap();
    let before = rec.batches.lock().unwrap().len();
    engine
        .admit(key("c1"), local("a", "100.64.0.1", "ul00000000001"))
        .unwrap();
    let batches = rec.batches.lock().unwrap().clone();
    assert_eq!(batches.len(), before + 1, "one transaction per admission");
    let last = batches.last().unwrap();
    assert!(
        last.contains("add element inet underlay pol_ingress_if { \"ul00000000001\" : jump pol_c"),
        "{last}"
    );
    assert!(!last.contains("delete table"), "{last}");

    // A retried ADD of the same attachment changes nothing.
    engine
        .admit(key("c1"), local("a", "100.64.0.1", "ul00000000001"))
        .unwrap();
    assert_eq!(rec.batches.lock().unwrap().len(), before + 1);

    // An unselected pod is admitted too (no map entry: reachable from its first packet).
    engine
        .admit(key("c2"), local("b", "100.64.0.2", "ul00000000002"))
        .unwrap();
    assert!(
        !engine
            .installed()
            .unwrap()
            .ingress_if
            .contains_key("ul00000000002")
    );

    engine.forget(&key("c1"));
    let last = rec.batches.lock().unwrap().last().unwrap().clone();
    assert!(
        last.contains("delete element inet underlay pol_ingress_if { \"ul00000000001\" }"),
        "{last}"
    );
}

#[test]
fn a_refused_transaction_fails_admission_and_keeps_nothing() {
    let rec = Recorder::default();
    let engine = PolicyEngine::new(Box::new(rec.clone()));
    engine
        .set_inputs(inputs(vec![pod("a", "100.64.0.1")]))
        .unwrap();
    *rec.fail.lock().unwrap() = true;
    assert!(matches!(
        engine.admit(key("c1"), local("a", "100.64.0.1", "ul00000000001")),
        Err(PolicyError::Nft(_))
    ));
    *rec.fail.lock().unwrap() = false;
    engine.resync().unwrap();
    assert!(
        engine.installed().unwrap().ingress_if.is_empty(),
        "the refused pod is not kept"
    );
}

/// An IPAM service on a /28 with a checkpoint in `dir` (no policy attached yet).
fn ipam_service(dir: &std::path::Path) -> underlay_agent::IpamService {
    underlay_agent::IpamService::open(
        underlay_core::ipam::PoolSpec::Block("100.64.0.0/28".parse().unwrap()),
        std::time::Duration::from_secs(60),
        underlay_agent::checkpoint::Checkpoint::new(dir.join("ipam.json")),
        1500,
        underlay_agent::Fault::None,
    )
    .unwrap()
}

#[test]
fn allocate_answers_not_ready_and_keeps_no_address_until_the_pod_is_known() {
    use underlay_ipam_api::{ErrorCode, pb};

    let dir = tempfile::tempdir().unwrap();
    let svc = ipam_service(dir.path());
    let rec = Recorder::default();
    let engine = Arc::new(
        PolicyEngine::new(Box::new(rec.clone())).with_admission_wait(std::time::Duration::ZERO),
    );
    svc.set_policy(engine.clone());
    let req = || pb::AllocateRequest {
        key: Some(underlay_ipam_api::AttachmentKey::new("c1", "eth0")),
        netns: "/var/run/netns/c1".into(),
        pod_namespace: "x".into(),
        pod_name: "a".into(),
    };
    let not_ready = |r: pb::AllocateReply| match r.result {
        Some(pb::allocate_reply::Result::Error(e)) => {
            e.code == ErrorCode::NotReady as i32 && e.retryable
        }
        _ => false,
    };
    assert!(not_ready(svc.allocate(req())));
    engine
        .set_inputs(inputs(vec![pod("b", "100.64.0.9")]))
        .unwrap();
    assert!(not_ready(svc.allocate(req())));
    assert_eq!(svc.allocated(), 0, "nothing allocated while not ready");
    engine
        .set_inputs(inputs(vec![pod("a", "100.64.0.9")]))
        .unwrap();
    let a = match svc.allocate(req()).result {
        Some(pb::allocate_reply::Result::Allocation(a)) => a,
        other => panic!("{other:?}"),
    };
    // The committed state uses the address IPAM gave (the API does not know it yet) and the veth ADD creates.
    let m = engine.installed().unwrap();
    let veth = underlay_core::veth_names::host_veth_name("c1", "eth0");
    assert!(m.ingress_if.contains_key(&veth), "{m:?}");
    assert_eq!(a.address, "100.64.0.0/32");
    // DEL removes it.
    svc.release(pb::ReleaseRequest {
        key: Some(underlay_ipam_api::AttachmentKey::new("c1", "eth0")),
        host_ifindex: 0,
        host_ifname: String::new(),
    });
    assert!(engine.installed().unwrap().ingress_if.is_empty());
}

/// An agent's start: its policy inputs may arrive before the IPAM service has read its checkpoint. The first
/// transaction replaces what the previous agent left, so made before the restore it would drop the verdicts of
/// the pods that agent served, and their traffic would pass unpoliced until the restore (`lab soak` caught it:
/// denied datagrams delivered to a policy-selected pod the second its agent came back).
#[test]
fn an_engine_awaiting_restore_commits_nothing_until_the_pods_are_restored() {
    let rec = Recorder::default();
    let engine = PolicyEngine::awaiting_restore(Box::new(rec.clone()));
    assert_eq!(
        engine
            .set_inputs(inputs(vec![pod("a", "100.64.0.1")]))
            .unwrap(),
        SyncOutcome::Waiting
    );
    assert!(
        rec.batches.lock().unwrap().is_empty(),
        "the previous agent's state stays until the pods are known"
    );
    // An admission meanwhile commits nothing, so it is not admitted either.
    assert!(matches!(
        engine.admit(key("c2"), local("a", "100.64.0.1", "ul00000000002")),
        Err(PolicyError::NotReady(_))
    ));
    assert!(rec.batches.lock().unwrap().is_empty());
    engine.restore([(key("c1"), local("a", "100.64.0.1", "ul00000000001"))]);
    assert!(matches!(
        engine.resync().unwrap(),
        SyncOutcome::Applied { full: true, .. }
    ));
    let first = rec.batches.lock().unwrap()[0].clone();
    assert!(
        first.contains("add element inet underlay pol_ingress_if { \"ul00000000001\" : jump pol_c"),
        "the restored pod keeps its verdict in the first transaction:\n{first}"
    );
}

/// An ADD that races its pod's watch event waits for it (bounded by the admission wait) instead of failing and
/// waiting for the runtime's retry.
#[test]
fn allocate_waits_for_the_pod_to_reach_the_inputs() {
    use underlay_ipam_api::pb;

    let dir = tempfile::tempdir().unwrap();
    let svc = ipam_service(dir.path());
    let engine = Arc::new(
        PolicyEngine::new(Box::new(Recorder::default()))
            .with_admission_wait(std::time::Duration::from_secs(30)),
    );
    engine
        .set_inputs(inputs(vec![pod("b", "100.64.0.9")]))
        .unwrap();
    svc.set_policy(engine.clone());
    let svc = Arc::new(svc);
    let add = {
        let svc = svc.clone();
        std::thread::spawn(move || {
            svc.allocate(pb::AllocateRequest {
                key: Some(underlay_ipam_api::AttachmentKey::new("c1", "eth0")),
                netns: "/var/run/netns/c1".into(),
                pod_namespace: "x".into(),
                pod_name: "a".into(),
            })
        })
    };
    // The ADD is waiting: nothing allocated, no answer.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        !add.is_finished(),
        "an ADD for an unknown pod answered at once"
    );
    assert_eq!(svc.allocated(), 0);
    engine
        .set_inputs(inputs(vec![pod("a", "100.64.0.1"), pod("b", "100.64.0.9")]))
        .unwrap();
    match add.join().unwrap().result {
        Some(pb::allocate_reply::Result::Allocation(a)) => assert_eq!(a.pod_name, "a"),
        other => panic!("{other:?}"),
    }
}
