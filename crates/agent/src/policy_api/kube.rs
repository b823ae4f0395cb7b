//! The follower's I/O: the watches, one task folding their events into the [`PolicyIndex`], and the
//! published [`PolicyState`].
//!
//! ```text
//!   watcher(Namespace, all) ───────────────┐
//!   watcher(NetworkPolicy, all) ───────────┤ Update ──► index task ──► watch::Sender<PolicyState>
//!   watcher(Pod, spec.nodeName=<node>) ────┤   (mpsc)    │ after each event: needed peer watches
//!   watcher(Pod, ns, labelSelector) × k ───┘             └─► start / abort peer watch tasks
//! ```
//!
//! Every watcher retries with kube-runtime's default backoff: while the API server is away the index keeps
//! its last good state, and a re-list (after 410 Gone) replaces a kind's objects only once it completes.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use ::kube::api::Api;
use ::kube::runtime::WatchStreamExt;
use ::kube::runtime::watcher::{self, Event};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use underlay_core::policy::Cluster;

use super::index::{NotReady, PeerWatch, PolicyIndex};

/// What the follower publishes after every change.
#[derive(Debug, Clone)]
pub struct PolicyState {
    /// Increases with every published change.
    pub revision: u64,
    /// The compiler's inputs (namespaces, policies, this node's pods and their policies' peers).
    pub cluster: Arc<Cluster>,
    /// `Ok` once everything the node's policies need has been listed at least once.
    pub synced: Result<(), NotReady>,
    /// This node's pods (namespace, name) in the snapshot.
    pub local_pods: Arc<BTreeSet<(String, String)>>,
    /// Peer watches running.
    pub peer_watches: usize,
}

impl PolicyState {
    fn empty() -> Self {
        PolicyState {
            revision: 0,
            cluster: Arc::new(Cluster::default()),
            synced: PolicyIndex::default().synced(),
            local_pods: Arc::default(),
            peer_watches: 0,
        }
    }

    /// Whether CNI ADD of `namespace/name` on this node can be decided with this snapshot: it is synced and holds
    /// the pod. (The datapath only ever receives synced snapshots; [`PolicyIndex::ready_for`] answers per pod
    /// before the whole node is synced.)
    pub fn ready_for(&self, namespace: &str, name: &str) -> Result<(), NotReady> {
        self.synced.clone()?;
        if !self
            .local_pods
            .contains(&(namespace.to_string(), name.to_string()))
        {
            return Err(NotReady::UnknownPod(namespace.into(), name.into()));
        }
        Ok(())
    }
}

enum Update {
    Namespace(Event<Namespace>),
    Policy(Event<NetworkPolicy>),
    LocalPod(Event<Pod>),
    Peer(PeerWatch, Event<Pod>),
    WatchError(&'static str, String),
}

/// A running follower. Dropping it stops every watch.
#[derive(Debug)]
pub struct PolicyFollower {
    state: watch::Receiver<PolicyState>,
    task: JoinHandle<()>,
}

impl Drop for PolicyFollower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PolicyFollower {
    /// Follow the policy inputs of node `node_name` through `client`. Needs a tokio runtime.
    pub fn start(client: ::kube::Client, node_name: &str) -> Self {
        let (tx, rx) = watch::channel(PolicyState::empty());
        let task = tokio::spawn(run(client, node_name.to_string(), tx));
        PolicyFollower { state: rx, task }
    }

    /// The latest state.
    pub fn state(&self) -> PolicyState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every published state (the datapath's input).
    pub fn subscribe(&self) -> watch::Receiver<PolicyState> {
        self.state.clone()
    }
}

/// Hand every synced state's inputs to `publish` (the datapath's entry point), once per change. A state that
/// is not synced is held back: the datapath never sees a snapshot missing a policy or the peers a local
/// pod's policies name, so a pod whose peers are still being listed is not admitted (it is absent from the
/// last published snapshot, or its peers are) and ADD says "try again later". Ends when the follower stops.
pub async fn forward_synced(
    mut states: watch::Receiver<PolicyState>,
    publish: impl Fn(Arc<Cluster>),
) {
    let mut last = None;
    loop {
        // Take the snapshot and let go of the channel before publishing: the datapath's compile and
        // transaction must not hold the follower's next `send` back.
        let next = {
            let s = states.borrow_and_update();
            (s.synced.is_ok() && last != Some(s.revision)).then(|| (s.revision, s.cluster.clone()))
        };
        if let Some((revision, cluster)) = next {
            last = Some(revision);
            publish(cluster);
        }
        if states.changed().await.is_err() {
            return;
        }
    }
}

fn spawn_watch<K, F>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    tx: mpsc::Sender<Update>,
    wrap: F,
) -> JoinHandle<()>
where
    K: ::kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
    F: Fn(Event<K>) -> Update + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = watcher::watcher(api, config).default_backoff().boxed();
        while let Some(item) = stream.next().await {
            let update = match item {
                Ok(ev) => wrap(ev),
                Err(e) => Update::WatchError(what, e.to_string()),
            };
            if tx.send(update).await.is_err() {
                return;
            }
        }
    })
}

async fn run(client: ::kube::Client, node: String, out: watch::Sender<PolicyState>) {
    let (tx, mut rx) = mpsc::channel::<Update>(1024);
    let mut tasks = vec![
        spawn_watch(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            "namespaces",
            tx.clone(),
            Update::Namespace,
        ),
        spawn_watch(
            Api::<NetworkPolicy>::all(client.clone()),
            watcher::Config::default(),
            "networkpolicies",
            tx.clone(),
            Update::Policy,
        ),
        spawn_watch(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            "local pods",
            tx.clone(),
            Update::LocalPod,
        ),
    ];
    let mut peers: HashMap<PeerWatch, JoinHandle<()>> = HashMap::new();
    let mut index = PolicyIndex::default();
    let mut revision = 0u64;
    while let Some(update) = rx.recv().await {
        // Which peers are needed depends on namespaces, policies and this node's pods, never on the peers
        // themselves: a peer event (10,000 of them when a cluster's worth of peers is listed) skips the
        // recomputation, which walks every policy selecting a local pod.
        let watches_may_change = !matches!(update, Update::Peer(..));
        match update {
            Update::Namespace(ev) => index.apply_namespace(ev),
            Update::Policy(ev) => index.apply_policy(ev),
            Update::LocalPod(ev) => index.apply_local_pod(ev),
            Update::Peer(w, ev) => index.apply_peer_pod(&w, ev),
            Update::WatchError(what, error) => {
                tracing::warn!(watch = what, %error, "policy watch failed; keeping the last state and retrying");
                continue;
            }
        }
        if !watches_may_change {
            if rx.is_empty() {
                revision += 1;
                publish(&out, &index, revision, peers.len());
            }
            continue;
        }
        let needed = index.needed_peer_watches();
        let (started, stopped) = index.set_peer_watches(&needed);
        for w in stopped {
            if let Some(t) = peers.remove(&w) {
                t.abort();
            }
        }
        for w in started {
            tracing::debug!(namespace = %w.namespace, selector = %w.selector, "peer watch started");
            let config = watcher::Config::default().labels(&w.selector);
            let key = w.clone();
            let t = spawn_watch(
                Api::<Pod>::namespaced(client.clone(), &w.namespace),
                config,
                "peer pods",
                tx.clone(),
                move |ev| Update::Peer(key.clone(), ev),
            );
            peers.insert(w, t);
        }
        // Publish once the queue is drained: a burst of events makes one state.
        if !rx.is_empty() {
            continue;
        }
        revision += 1;
        publish(&out, &index, revision, peers.len());
    }
    tasks.extend(peers.into_values());
    for t in tasks {
        t.abort();
    }
}

/// Publishes the index as one state.
fn publish(
    out: &watch::Sender<PolicyState>,
    index: &PolicyIndex,
    revision: u64,
    peer_watches: usize,
) {
    let started = std::time::Instant::now();
    let cluster = Arc::new(index.cluster());
    let synced = index.synced();
    tracing::debug!(
        revision,
        pods = cluster.pods.len(),
        policies = cluster.policies.len(),
        synced = ?synced,
        took_ms = started.elapsed().as_secs_f64() * 1e3,
        "policy inputs published"
    );
    out.send_replace(PolicyState {
        revision,
        cluster,
        synced,
        // Not the index itself: cloning a cluster's worth of peers for every event was the follower's largest
        // cost after the compile.
        local_pods: Arc::new(
            index
                .local_pods
                .values()
                .map(|p| (p.namespace.clone(), p.name.clone()))
                .collect(),
        ),
        peer_watches,
    });
}
