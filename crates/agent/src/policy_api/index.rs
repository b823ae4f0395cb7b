//! What the follower knows, pure: the objects its watches delivered, which peer watches the node's policies
//! need, and whether everything needed has been listed once. Fed with `watcher::Event`s, read as a
//! [`Cluster`]; tested by applying objects (no API server).
//!
//! ```text
//!   Namespaces (all) ─────┐
//!   NetworkPolicies (all) ├─► PolicyIndex ──► needed_peer_watches(): for each policy selecting a local pod,
//!   Pods of this node ────┘        ▲           each peer → (namespace, podSelector) to watch
//!   Pods per PeerWatch ────────────┘      ──► cluster(): namespaces + policies + local pods ∪ peer pods
//! ```
//!
//! A re-list (after a 410 or a reconnect) is staged and replaces the kind's objects only when it completes, so
//! the last good state holds while the API server is away.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Pod as K8sPod};
use k8s_openapi::api::networking::v1::NetworkPolicy as K8sNetworkPolicy;
use kube::runtime::watcher::Event;
use underlay_core::policy::{Cluster, LabelSelector, Namespace, NetworkPolicy, Pod, PortRef};

use underlay_api::policy::{self as convert, ObjectKey};

/// One peer watch: pods of `namespace` that match `selector` (the API's `labelSelector` text; empty: all pods
/// of the namespace).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerWatch {
    pub namespace: String,
    pub selector: String,
}

/// Objects of one watch, with a staged re-list.
#[derive(Debug, Clone)]
pub struct Store<T> {
    objects: BTreeMap<ObjectKey, T>,
    staged: Option<BTreeMap<ObjectKey, T>>,
    synced: bool,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            staged: None,
            synced: false,
        }
    }
}

impl<T: Clone> Store<T> {
    /// Apply one watch event, with `convert` turning the object into its key and value (`None` value: the
    /// object is to be treated as absent).
    pub fn apply<K>(&mut self, event: Event<K>, convert: impl Fn(&K) -> (ObjectKey, Option<T>)) {
        match event {
            Event::Init => self.staged = Some(BTreeMap::new()),
            Event::InitApply(obj) => {
                let (key, value) = convert(&obj);
                let staged = self.staged.get_or_insert_with(BTreeMap::new);
                match value {
                    Some(v) => {
                        staged.insert(key, v);
                    }
                    None => {
                        staged.remove(&key);
                    }
                }
            }
            Event::InitDone => {
                if let Some(staged) = self.staged.take() {
                    self.objects = staged;
                }
                self.synced = true;
            }
            Event::Apply(obj) => {
                let (key, value) = convert(&obj);
                match value {
                    Some(v) => {
                        self.objects.insert(key, v);
                    }
                    None => {
                        self.objects.remove(&key);
                    }
                }
            }
            Event::Delete(obj) => {
                let (key, _) = convert(&obj);
                self.objects.remove(&key);
            }
        }
    }

    /// Whether a first list has completed.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&T> {
        self.objects.get(key)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.objects.values()
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

fn pod_entry(p: &K8sPod) -> (ObjectKey, Option<Pod>) {
    let key = convert::key_of(&p.metadata);
    (key, (!convert::is_finished(p)).then(|| convert::pod(p)))
}

/// Why the follower cannot yet say what a pod's policy is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("the first list of {0} has not completed")]
    NotListed(&'static str),
    #[error("pod {0}/{1} is not among this node's pods at the API server yet")]
    UnknownPod(String, String),
    #[error("the peers {0} of a policy selecting pods of this node have not been listed yet")]
    PeersNotListed(String),
}

/// The follower's knowledge (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct PolicyIndex {
    pub namespaces: Store<Namespace>,
    pub policies: Store<NetworkPolicy>,
    pub local_pods: Store<Pod>,
    pub peers: BTreeMap<PeerWatch, Store<Pod>>,
}

impl PolicyIndex {
    pub fn apply_namespace(&mut self, event: Event<K8sNamespace>) {
        self.namespaces.apply(event, |ns| {
            (convert::key_of(&ns.metadata), Some(convert::namespace(ns)))
        });
    }

    pub fn apply_policy(&mut self, event: Event<K8sNetworkPolicy>) {
        self.policies.apply(event, |np| {
            (
                convert::key_of(&np.metadata),
                Some(convert::network_policy(np)),
            )
        });
    }

    pub fn apply_local_pod(&mut self, event: Event<K8sPod>) {
        self.local_pods.apply(event, pod_entry);
    }

    /// Events of a peer watch no longer needed are ignored (its task is being stopped).
    pub fn apply_peer_pod(&mut self, watch: &PeerWatch, event: Event<K8sPod>) {
        if let Some(store) = self.peers.get_mut(watch) {
            store.apply(event, pod_entry);
        }
    }

    /// Start tracking the peer watches in `needed` and forget those no longer in it. Returns (started,
    /// stopped).
    pub fn set_peer_watches(
        &mut self,
        needed: &BTreeSet<PeerWatch>,
    ) -> (Vec<PeerWatch>, Vec<PeerWatch>) {
        let stopped: Vec<PeerWatch> = self
            .peers
            .keys()
            .filter(|w| !needed.contains(*w))
            .cloned()
            .collect();
        for w in &stopped {
            self.peers.remove(w);
        }
        let started: Vec<PeerWatch> = needed
            .iter()
            .filter(|w| !self.peers.contains_key(*w))
            .cloned()
            .collect();
        for w in &started {
            self.peers.insert(w.clone(), Store::default());
        }
        (started, stopped)
    }

    fn namespace_labels(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(&(String::new(), name.to_string()))
    }

    /// The policies that select `pod` (a pod of this node): same namespace, pod selector matching. An invalid
    /// pod selector selects every pod of its namespace (the compiler's reading: it can only close traffic).
    /// Host-network pods are selected by nothing.
    pub fn policies_selecting<'a>(
        &'a self,
        pod: &'a Pod,
    ) -> impl Iterator<Item = &'a NetworkPolicy> {
        self.policies.values().filter(move |p| {
            !pod.host_network
                && p.namespace == pod.namespace
                && (p.pod_selector.validate().is_err() || p.pod_selector.matches(&pod.labels))
        })
    }

    /// The peer watches `policy` needs: one per (namespace, pod selector) its peers name; and every pod of
    /// every namespace for an egress rule to every destination on a named port (the name resolves per
    /// destination pod, so each pod's container ports must be known: the one case in which a node follows all
    /// Pods; docs/policy.md, "Fan-out").
    fn peer_watches_of(&self, policy: &NetworkPolicy, out: &mut BTreeSet<PeerWatch>) {
        let named_to_anyone = policy.egress.iter().any(|r| {
            r.peers.is_empty()
                && r.ports
                    .iter()
                    .any(|p| matches!(p.port, Some(PortRef::Name(_))))
        });
        if named_to_anyone {
            for ns in self.namespaces.values() {
                out.insert(PeerWatch {
                    namespace: ns.name.clone(),
                    selector: String::new(),
                });
            }
        }
        let rules = policy.ingress.iter().chain(&policy.egress);
        for peer in rules.flat_map(|r| &r.peers) {
            if peer.ip_block.is_some() {
                continue;
            }
            let pods = peer
                .pod_selector
                .clone()
                .unwrap_or_else(LabelSelector::everything);
            let Some(selector) = convert::selector_query(&pods) else {
                continue;
            };
            match &peer.namespace_selector {
                None if peer.pod_selector.is_some() => {
                    out.insert(PeerWatch {
                        namespace: policy.namespace.clone(),
                        selector,
                    });
                }
                None => {}
                Some(ns_sel) => {
                    if ns_sel.validate().is_err() {
                        continue;
                    }
                    for ns in self
                        .namespaces
                        .values()
                        .filter(|n| ns_sel.matches(&n.labels))
                    {
                        out.insert(PeerWatch {
                            namespace: ns.name.clone(),
                            selector: selector.clone(),
                        });
                    }
                }
            }
        }
    }

    /// Every peer watch the policies selecting this node's pods need.
    pub fn needed_peer_watches(&self) -> BTreeSet<PeerWatch> {
        let mut out = BTreeSet::new();
        let mut seen = BTreeSet::new();
        for pod in self.local_pods.values() {
            for policy in self.policies_selecting(pod) {
                if seen.insert((&policy.namespace, &policy.name)) {
                    self.peer_watches_of(policy, &mut out);
                }
            }
        }
        out
    }

    /// Whether the namespaces, policies and this node's pods have been listed, and every needed peer watch too.
    pub fn synced(&self) -> Result<(), NotReady> {
        for (what, synced) in [
            ("namespaces", self.namespaces.synced()),
            ("networkpolicies", self.policies.synced()),
            ("this node's pods", self.local_pods.synced()),
        ] {
            if !synced {
                return Err(NotReady::NotListed(what));
            }
        }
        let needed = self.needed_peer_watches();
        self.peers_synced(needed.iter())
    }

    fn peers_synced<'a>(
        &self,
        watches: impl Iterator<Item = &'a PeerWatch>,
    ) -> Result<(), NotReady> {
        for w in watches {
            if !self.peers.get(w).is_some_and(Store::synced) {
                return Err(NotReady::PeersNotListed(format!(
                    "{}/[{}]",
                    w.namespace, w.selector
                )));
            }
        }
        Ok(())
    }

    /// Whether the policy of the local pod `namespace/name` can be decided now: the base lists are done, the
    /// pod is known (with its labels), and the peers of every policy selecting it are listed. This is what CNI
    /// ADD asks; an `Err` says what is missing ("try again later").
    pub fn ready_for(&self, namespace: &str, name: &str) -> Result<(), NotReady> {
        for (what, synced) in [
            ("namespaces", self.namespaces.synced()),
            ("networkpolicies", self.policies.synced()),
            ("this node's pods", self.local_pods.synced()),
        ] {
            if !synced {
                return Err(NotReady::NotListed(what));
            }
        }
        let key = (namespace.to_string(), name.to_string());
        let Some(pod) = self.local_pods.get(&key) else {
            return Err(NotReady::UnknownPod(key.0, key.1));
        };
        let mut needed = BTreeSet::new();
        for policy in self.policies_selecting(pod) {
            self.peer_watches_of(policy, &mut needed);
        }
        self.peers_synced(needed.iter())
    }

    /// The inputs of the compiler: every namespace and policy, this node's pods and the peers they need (one
    /// entry per pod; a pod seen by several watches appears once). `nodes` is left empty: the caller adds its
    /// own node's addresses.
    pub fn cluster(&self) -> Cluster {
        let mut pods: BTreeMap<(&str, &str), &Pod> = BTreeMap::new();
        for p in self
            .peers
            .values()
            .flat_map(Store::values)
            .chain(self.local_pods.values())
        {
            pods.insert((&p.namespace, &p.name), p);
        }
        Cluster {
            namespaces: self.namespaces.values().cloned().collect(),
            pods: pods.into_values().cloned().collect(),
            policies: self.policies.values().cloned().collect(),
            nodes: vec![],
        }
    }

    /// Whether namespace `name` is known (a namespaceSelector peer can only be resolved over known ones).
    pub fn has_namespace(&self, name: &str) -> bool {
        self.namespace_labels(name).is_some()
    }
}
