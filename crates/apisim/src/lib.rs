//! An in-process Kubernetes API server stand-in that a real [`kube::Client`] talks to.
//!
//! ```text
//!   controller / agent / tests ── kube::Client ── ApiService (tower::Service) ── Store (resourceVersions, history)
//!                                                                                  ▲
//!                                                   ApiSim hooks: insert, modify, inject 409, unreachable, recorded
//! ```
//!
//! It serves the endpoints underlay uses and nothing else, with the semantics the reconcilers depend on:
//! resourceVersion preconditions (409 Conflict on a stale write), generation bumps on spec changes, the status
//! subresource (spec and status written through separate endpoints), finalizers (delete marks
//! `deletionTimestamp`; the object goes when its last finalizer is removed), and watches that replay history
//! after a resourceVersion and then follow changes — enough for kube-runtime's `watcher`.
//!
//! | resource | verbs |
//! |---|---|
//! | core/v1 Node (cluster) | get, list, watch, create, replace, patch, delete; status: get, replace, patch |
//! | underlay.dev/v1alpha1 UnderlayNode (cluster) | get, list, watch, create, replace, patch, delete; status: get, replace, patch |
//! | coordination.k8s.io/v1 Lease (namespaced) | get, list, create, replace, patch |
//! | core/v1 Event, events.k8s.io/v1 Event (namespaced) | create, patch, list |
//! | core/v1 Namespace (cluster) | get, list, watch, create, replace, patch, delete; status: get, replace, patch |
//! | core/v1 Pod (namespaced) | get, list, watch, create, replace, patch, delete; status: get, replace, patch |
//! | networking.k8s.io/v1 NetworkPolicy (namespaced) | get, list, watch, create, replace, patch, delete |
//!
//! Namespaced kinds are also listed and watched across all namespaces (`/api/v1/pods`). As on the API server:
//! every Namespace carries `kubernetes.io/metadata.name=<name>` ([`NAMESPACE_NAME_LABEL`]), whatever a write
//! says; Pods and NetworkPolicies can only be created in an existing Namespace (404 otherwise); status sent
//! when creating a Pod is reset to `phase: Pending` (the address arrives through `/status`); deleting a
//! Namespace deletes what it holds (at once: no `Terminating` phase). [`objects`] builds these objects.
//!
//! Any other request gets a 404 `Status` and is recorded in [`ApiSim::take_unexpected`], so a test can fail on a
//! call that should not happen.
//!
//! Not modelled: strategic merge patch is applied as a JSON merge patch (lists are replaced, not merged by key);
//! server-side apply is a merge patch that records the field manager, with no field ownership or conflicts;
//! label selectors support `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)` and `k notin (a,b)`; field selectors
//! `metadata.name` and `metadata.namespace` on every kind, plus `spec.nodeName`, `spec.hostNetwork`,
//! `status.phase` and `status.podIP` on Pods and `status.phase` on Namespaces (`=`, `==`, `!=`; any other
//! label is a 400); list pagination (`limit`/`continue`) is ignored (one page); watches send no bookmarks.
//! The watch history is kept whole unless a test bounds it ([`ApiSim::set_history_limit`]) or compacts it
//! ([`ApiSim::compact`]): a watch from an older resourceVersion then gets one `ERROR` event with a 410
//! `Expired` Status, as from the API server's watch cache. Admission (beyond the namespace check), defaulting
//! and schema validation do not happen.

pub mod objects;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// The label the API server puts on every Namespace: its own name (what `namespaceSelector`s commonly match).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Response body type of [`ApiService`]: whole documents, or a stream of watch events.
pub type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;

/// The kinds the stand-in stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Node,
    UnderlayNode,
    Lease,
    /// core/v1 Event.
    Event,
    /// events.k8s.io/v1 Event (what kube-runtime's event `Recorder` writes).
    EventV1,
    /// core/v1 Namespace (cluster-scoped).
    Namespace,
    /// core/v1 Pod (namespaced, status subresource).
    Pod,
    /// networking.k8s.io/v1 NetworkPolicy (namespaced).
    NetworkPolicy,
}

impl Kind {
    const ALL: [Kind; 8] = [
        Kind::Node,
        Kind::UnderlayNode,
        Kind::Lease,
        Kind::Event,
        Kind::EventV1,
        Kind::Namespace,
        Kind::Pod,
        Kind::NetworkPolicy,
    ];

    /// API path prefix (group and version).
    fn prefix(self) -> &'static str {
        match self {
            Kind::Node | Kind::Event | Kind::Namespace | Kind::Pod => "/api/v1",
            Kind::UnderlayNode => "/apis/underlay.dev/v1alpha1",
            Kind::Lease => "/apis/coordination.k8s.io/v1",
            Kind::EventV1 => "/apis/events.k8s.io/v1",
            Kind::NetworkPolicy => "/apis/networking.k8s.io/v1",
        }
    }
    fn plural(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::UnderlayNode => "underlaynodes",
            Kind::Lease => "leases",
            Kind::Event | Kind::EventV1 => "events",
            Kind::Namespace => "namespaces",
            Kind::Pod => "pods",
            Kind::NetworkPolicy => "networkpolicies",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Kind::Node | Kind::Event | Kind::Namespace | Kind::Pod => "v1",
            Kind::UnderlayNode => "underlay.dev/v1alpha1",
            Kind::Lease => "coordination.k8s.io/v1",
            Kind::EventV1 => "events.k8s.io/v1",
            Kind::NetworkPolicy => "networking.k8s.io/v1",
        }
    }
    fn kind_name(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::UnderlayNode => "UnderlayNode",
            Kind::Lease => "Lease",
            Kind::Event | Kind::EventV1 => "Event",
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }
    fn namespaced(self) -> bool {
        matches!(
            self,
            Kind::Lease | Kind::Event | Kind::EventV1 | Kind::Pod | Kind::NetworkPolicy
        )
    }
    /// Whether `status` is a subresource (written only through `/status`).
    fn has_status(self) -> bool {
        matches!(
            self,
            Kind::Node | Kind::UnderlayNode | Kind::Namespace | Kind::Pod
        )
    }
    /// Whether objects of this kind can only be created inside an existing Namespace (the API server's
    /// `NamespaceLifecycle` admission). Leases and Events are exempt here so that components may record into
    /// namespaces the tests never create.
    fn needs_namespace(self) -> bool {
        matches!(self, Kind::Pod | Kind::NetworkPolicy)
    }
    /// Whether list and watch may be served.
    fn watchable(self) -> bool {
        matches!(
            self,
            Kind::Node | Kind::UnderlayNode | Kind::Namespace | Kind::Pod | Kind::NetworkPolicy
        )
    }
    /// Field-selector labels the API server supports for this kind (beyond `metadata.name`/`metadata.namespace`).
    fn field_labels(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => &[
                "spec.nodeName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
            ],
            Kind::Namespace => &["status.phase"],
            _ => &[],
        }
    }
    fn allows(self, verb: Verb) -> bool {
        use Verb::*;
        match self {
            Kind::Node | Kind::UnderlayNode | Kind::Namespace | Kind::Pod | Kind::NetworkPolicy => {
                true
            }
            Kind::Lease => matches!(verb, Get | List | Create | Replace | Patch),
            Kind::Event | Kind::EventV1 => matches!(verb, Create | Patch | List),
        }
    }
    /// The Kind whose objects `K` is.
    pub fn of<K: kube::Resource<DynamicType = ()>>() -> Option<Kind> {
        let (av, kind) = (K::api_version(&()), K::kind(&()));
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == av && k.kind_name() == kind)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verb {
    Get,
    List,
    Watch,
    Create,
    Replace,
    Patch,
    Delete,
}

/// One request the stand-in answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    /// Status code answered (200 for a watch that was started).
    pub status: u16,
}

/// Error of [`ApiService`] when the stand-in is made unreachable.
#[derive(Debug, thiserror::Error)]
#[error("api server unreachable (stand-in set offline)")]
pub struct Unreachable;

type Key = (String, String); // (namespace or "", name)

#[derive(Debug)]
struct WatchEvent {
    rv: u64,
    kind: Kind,
    ty: &'static str,
    object: Value,
    /// The object before a MODIFIED event: a filtered watch turns an object leaving (entering) its selection
    /// into DELETED (ADDED), as the API server does.
    previous: Option<Value>,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    uid: u64,
    objects: HashMap<Kind, BTreeMap<Key, Value>>,
    history: Vec<WatchEvent>,
    /// Every event with a resourceVersion up to this one has been dropped from `history` (etcd's compaction):
    /// a watch from an older resourceVersion is answered 410 Gone.
    compacted: u64,
    /// Keep at most this many events in `history` (`None`: keep all).
    history_limit: Option<usize>,
    /// Watch events sent to clients, per kind (synthetic ADDED of a watch's start included).
    delivered: HashMap<Kind, u64>,
    conflicts: HashMap<Kind, u32>,
    unreachable: bool,
    requests: Vec<RecordedRequest>,
    unexpected: Vec<RecordedRequest>,
}

/// The stand-in: a shared store plus test hooks. Cheap to clone; clones share state.
#[derive(Clone, Debug)]
pub struct ApiSim {
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for ApiSim {
    fn default() -> Self {
        Self::new()
    }
}

fn now() -> Value {
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).expect("Time serialises")
}

impl ApiSim {
    pub fn new() -> Self {
        let (tx, _) = tokio::sync::watch::channel(0);
        Self {
            state: Arc::new(Mutex::new(State::default())),
            changed: Arc::new(tx),
        }
    }

    /// A `tower::Service` serving this stand-in.
    pub fn service(&self) -> ApiService {
        ApiService { sim: self.clone() }
    }

    /// A real `kube::Client` talking to this stand-in (default namespace `default`). Needs a tokio runtime.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.service(), "default")
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self, rv: u64) {
        self.changed.send_replace(rv);
    }

    /// Store `obj` as if a client had created it (or replace it if it exists), bypassing verbs, injected
    /// conflicts and the status subresource. Returns the new resourceVersion.
    pub fn insert<K>(&self, obj: &K) -> u64
    where
        K: kube::Resource<DynamicType = ()> + Serialize,
    {
        let kind = Kind::of::<K>().expect("a kind the stand-in stores");
        let mut value = serde_json::to_value(obj).expect("object serialises");
        let ns = obj.meta().namespace.clone().unwrap_or_default();
        let name = obj.meta().name.clone().expect("object has a name");
        let mut st = self.lock();
        let key = (ns, name);
        let existing = st.objects.get(&kind).and_then(|m| m.get(&key)).cloned();
        let rv = match existing {
            Some(old) => {
                preserve_identity(&old, &mut value);
                st.commit(kind, key, value, "MODIFIED")
            }
            None => {
                st.init_metadata(kind, &key, &mut value);
                st.commit(kind, key, value, "ADDED")
            }
        };
        drop(st);
        self.notify(rv);
        rv
    }

    /// The stored object, if any.
    pub fn get<K>(&self, namespace: Option<&str>, name: &str) -> Option<K>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        let kind = Kind::of::<K>()?;
        let st = self.lock();
        let key = (namespace.unwrap_or_default().to_string(), name.to_string());
        st.objects
            .get(&kind)?
            .get(&key)
            .map(|v| serde_json::from_value(v.clone()).expect("stored object deserialises"))
    }

    /// Every stored object of type `K`.
    pub fn list<K>(&self) -> Vec<K>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        let Some(kind) = Kind::of::<K>() else {
            return vec![];
        };
        let st = self.lock();
        st.objects
            .get(&kind)
            .into_iter()
            .flat_map(|m| m.values())
            .map(|v| serde_json::from_value(v.clone()).expect("stored object deserialises"))
            .collect()
    }

    /// Change a stored object in place (as another client would), bumping its resourceVersion and notifying
    /// watchers. Returns false when there is no such object.
    pub fn modify<K>(&self, namespace: Option<&str>, name: &str, f: impl FnOnce(&mut K)) -> bool
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned + Serialize,
    {
        let Some(mut obj) = self.get::<K>(namespace, name) else {
            return false;
        };
        f(&mut obj);
        self.insert(&obj);
        true
    }

    /// Remove an object at once (ignoring finalizers), as if it had been force-deleted. Returns whether it existed.
    pub fn remove<K>(&self, namespace: Option<&str>, name: &str) -> bool
    where
        K: kube::Resource<DynamicType = ()>,
    {
        let Some(kind) = Kind::of::<K>() else {
            return false;
        };
        let key = (namespace.unwrap_or_default().to_string(), name.to_string());
        let mut st = self.lock();
        let Some(old) = st.objects.get(&kind).and_then(|m| m.get(&key)).cloned() else {
            return false;
        };
        if kind == Kind::Namespace {
            st.delete_namespace_contents(&key.1);
        }
        let rv = st.delete_now(kind, key, old);
        drop(st);
        self.notify(rv);
        true
    }

    /// The next write (create, replace, patch, delete) to `kind` answers 409 Conflict without changing anything.
    /// Calls accumulate: `n` calls fail the next `n` writes.
    pub fn inject_conflict(&self, kind: Kind) {
        *self.lock().conflicts.entry(kind).or_default() += 1;
    }

    /// While `true`, every request fails at the transport (as when the API server cannot be reached), and
    /// running watches end.
    pub fn set_unreachable(&self, unreachable: bool) {
        let rv = {
            let mut st = self.lock();
            st.unreachable = unreachable;
            st.rv
        };
        self.notify(rv);
    }

    /// Every request answered since the last call, oldest first.
    pub fn take_requests(&self) -> Vec<RecordedRequest> {
        std::mem::take(&mut self.lock().requests)
    }

    /// Requests for endpoints or verbs the stand-in does not serve, since the last call.
    pub fn take_unexpected(&self) -> Vec<RecordedRequest> {
        std::mem::take(&mut self.lock().unexpected)
    }

    /// Current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Drop the whole watch history, as etcd compaction does: a watch from any resourceVersion before now is
    /// answered 410 Gone (running watches behind it end with a 410 `ERROR` event), so clients must re-list.
    pub fn compact(&self) {
        let rv = {
            let mut st = self.lock();
            st.history.clear();
            st.compacted = st.rv;
            st.rv
        };
        self.notify(rv);
    }

    /// Keep at most `limit` events of watch history from now on (`None`: keep all, the default). A watch that
    /// falls further behind gets 410 Gone.
    pub fn set_history_limit(&self, limit: Option<usize>) {
        let rv = {
            let mut st = self.lock();
            st.history_limit = limit;
            st.trim_history();
            st.rv
        };
        self.notify(rv);
    }

    /// Watch events stored since `rv` (each once, whatever the number of watchers): a measure of how many
    /// changes the API server has to fan out.
    pub fn events_since(&self, rv: u64, kind: Kind) -> usize {
        let st = self.lock();
        let start = st.history.partition_point(|e| e.rv <= rv);
        st.history[start..]
            .iter()
            .filter(|e| e.kind == kind)
            .count()
    }

    /// Watch events sent to all watchers of `kind` so far: what the API server fans out.
    pub fn watch_events_delivered(&self, kind: Kind) -> u64 {
        self.lock().delivered.get(&kind).copied().unwrap_or(0)
    }

    /// Set (`Some`) or remove (`None`) labels of a stored object, as a `kubectl label` would. Returns whether the
    /// object exists.
    pub fn label<K>(
        &self,
        namespace: Option<&str>,
        name: &str,
        labels: &[(&str, Option<&str>)],
    ) -> bool
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned + Serialize,
    {
        self.modify::<K>(namespace, name, |obj| {
            let map = obj.meta_mut().labels.get_or_insert_with(Default::default);
            for (k, v) in labels {
                match v {
                    Some(v) => {
                        map.insert(k.to_string(), v.to_string());
                    }
                    None => {
                        map.remove(*k);
                    }
                }
            }
        })
    }
}

/// Keep what a client cannot change: uid, creation time, deletion mark.
fn preserve_identity(old: &Value, new: &mut Value) {
    for field in ["uid", "creationTimestamp", "deletionTimestamp"] {
        match old["metadata"].get(field) {
            Some(v) => new["metadata"][field] = v.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(field);
                }
            }
        }
    }
    new["metadata"]["generation"] = old["metadata"]["generation"].clone();
    if old.get("spec") != new.get("spec") {
        let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
        new["metadata"]["generation"] = json!(g + 1);
    }
}

fn finalizers_empty(v: &Value) -> bool {
    v["metadata"]["finalizers"]
        .as_array()
        .is_none_or(|a| a.is_empty())
}

impl State {
    fn init_metadata(&mut self, kind: Kind, key: &Key, value: &mut Value) {
        self.uid += 1;
        let meta = &mut value["metadata"];
        meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.uid));
        meta["creationTimestamp"] = now();
        meta["generation"] = json!(1);
        if kind.namespaced() {
            meta["namespace"] = json!(key.0);
        }
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
        }
        value["apiVersion"] = json!(kind.api_version());
        value["kind"] = json!(kind.kind_name());
    }

    /// Store `value` under a fresh resourceVersion and record the watch event. A deleted object whose last
    /// finalizer is gone is removed instead.
    fn commit(&mut self, kind: Kind, key: Key, mut value: Value, ty: &'static str) -> u64 {
        if value["metadata"].get("deletionTimestamp").is_some() && finalizers_empty(&value) {
            return self.delete_now(kind, key, value);
        }
        self.rv += 1;
        value["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        value["apiVersion"] = json!(kind.api_version());
        value["kind"] = json!(kind.kind_name());
        if kind == Kind::Namespace {
            // The API server labels every namespace with its own name and keeps the label (1.21 and later).
            let name = key.1.clone();
            let labels = &mut value["metadata"]["labels"];
            if !labels.is_object() {
                *labels = json!({});
            }
            labels[NAMESPACE_NAME_LABEL] = json!(name);
        }
        let previous = self
            .objects
            .entry(kind)
            .or_default()
            .insert(key, value.clone())
            .filter(|_| ty == "MODIFIED");
        self.history.push(WatchEvent {
            rv: self.rv,
            kind,
            ty,
            object: value,
            previous,
        });
        self.trim_history();
        self.rv
    }

    /// Drop the oldest events beyond the history limit.
    fn trim_history(&mut self) {
        if let Some(limit) = self.history_limit
            && self.history.len() > limit
        {
            let drop = self.history.len() - limit;
            self.compacted = self.history[drop - 1].rv;
            self.history.drain(..drop);
        }
    }

    /// Delete every object of `namespace` (what the namespace controller does before a Namespace goes).
    fn delete_namespace_contents(&mut self, namespace: &str) {
        for kind in Kind::ALL.into_iter().filter(|k| k.namespaced()) {
            let keys: Vec<Key> = self
                .objects
                .get(&kind)
                .into_iter()
                .flat_map(|m| m.keys())
                .filter(|k| k.0 == namespace)
                .cloned()
                .collect();
            for key in keys {
                let old = self.objects[&kind][&key].clone();
                self.delete_now(kind, key, old);
            }
        }
    }

    fn delete_now(&mut self, kind: Kind, key: Key, mut last: Value) -> u64 {
        self.rv += 1;
        last["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if let Some(m) = self.objects.get_mut(&kind) {
            m.remove(&key);
        }
        self.history.push(WatchEvent {
            rv: self.rv,
            kind,
            ty: "DELETED",
            object: last,
            previous: None,
        });
        self.trim_history();
        self.rv
    }

    fn take_conflict(&mut self, kind: Kind) -> bool {
        match self.conflicts.get_mut(&kind) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

/// The `tower::Service` a `kube::Client` is built on. See [`ApiSim::client`].
#[derive(Clone, Debug)]
pub struct ApiService {
    sim: ApiSim,
}

impl tower::Service<Request<kube::client::Body>> for ApiService {
    type Response = Response<ResponseBody>;
    type Error = Unreachable;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        let sim = self.sim.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            sim.handle(parts, body)
        })
    }
}

/// A request after routing.
#[derive(Debug)]
struct Route {
    kind: Kind,
    namespace: String,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Route> {
    for kind in Kind::ALL {
        let Some(rest) = path.strip_prefix(kind.prefix()) else {
            continue;
        };
        let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let (namespace, segs) = match (kind.namespaced(), segs.as_slice()) {
            (true, ["namespaces", ns, rest @ ..]) => (ns.to_string(), rest),
            // The all-namespaces collection (`/api/v1/pods`): list and watch only.
            (true, rest @ [_]) => (String::new(), rest),
            (false, rest) => (String::new(), rest),
            _ => continue,
        };
        let route = |name: Option<&str>, status| Route {
            kind,
            namespace: namespace.clone(),
            name: name.map(str::to_string),
            status,
        };
        match segs {
            [plural] if *plural == kind.plural() => return Some(route(None, false)),
            [plural, name] if *plural == kind.plural() => return Some(route(Some(name), false)),
            [plural, name, "status"] if *plural == kind.plural() && kind.has_status() => {
                return Some(route(Some(name), true));
            }
            _ => continue,
        }
    }
    None
}

fn query_map(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An error answer: the status code and a `Status` object.
#[derive(Debug)]
struct Failure {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

fn fail(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Failure {
    Failure {
        code,
        reason,
        message: message.into(),
    }
}

fn full(code: StatusCode, body: &Value) -> Response<ResponseBody> {
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
        .expect("static response parts")
}

fn status_object(f: &Failure) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f.message,
        "reason": f.reason,
        "code": f.code.as_u16(),
    })
}

/// A parsed label or field selector requirement.
#[derive(Debug, Clone)]
enum Requirement {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// Commas separate terms except inside `( … )` (set-based label requirements).
fn selector_terms(s: &str) -> Vec<String> {
    let (mut terms, mut cur, mut depth) = (vec![], String::new(), 0i32);
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    terms.push(cur);
    terms
        .into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_selector(s: &str) -> Result<Vec<Requirement>, Failure> {
    let mut out = vec![];
    for term in selector_terms(s) {
        let term = term.as_str();
        if let Some(open) = term.find('(') {
            let (head, rest) = term.split_at(open);
            let mut words = head.split_whitespace();
            let values = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .map(|r| r.split(',').map(|v| v.trim().to_string()).collect());
            let req = match (words.next(), words.next(), words.next(), values) {
                (Some(k), Some("in"), None, Some(vs)) => Requirement::In(k.into(), vs),
                (Some(k), Some("notin"), None, Some(vs)) => Requirement::NotIn(k.into(), vs),
                _ => {
                    return Err(fail(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("unable to parse requirement {term:?}"),
                    ));
                }
            };
            out.push(req);
            continue;
        }
        let req = if let Some((k, v)) = term.split_once("!=") {
            Requirement::Ne(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once("==") {
            Requirement::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once('=') {
            Requirement::Eq(k.trim().into(), v.trim().into())
        } else if let Some(k) = term.strip_prefix('!') {
            Requirement::NotExists(k.trim().into())
        } else {
            Requirement::Exists(term.into())
        };
        out.push(req);
    }
    Ok(out)
}

#[derive(Debug, Clone)]
struct Filter {
    kind: Kind,
    namespace: String,
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

impl Filter {
    fn from_query(route: &Route, q: &HashMap<String, String>) -> Result<Self, Failure> {
        let labels = parse_selector(q.get("labelSelector").map_or("", String::as_str))?;
        let fields = parse_selector(q.get("fieldSelector").map_or("", String::as_str))?;
        for f in &fields {
            let key = match f {
                Requirement::Eq(k, _) | Requirement::Ne(k, _) => k,
                Requirement::Exists(k) | Requirement::NotExists(k) => k,
                Requirement::In(k, _) | Requirement::NotIn(k, _) => k,
            };
            if !matches!(f, Requirement::Eq(..) | Requirement::Ne(..)) {
                return Err(fail(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("invalid field selector: {key:?}: only =, == and != are supported"),
                ));
            }
            if !matches!(key.as_str(), "metadata.name" | "metadata.namespace")
                && !route.kind.field_labels().contains(&key.as_str())
            {
                return Err(fail(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("field label not supported: {key}"),
                ));
            }
        }
        Ok(Self {
            kind: route.kind,
            namespace: route.namespace.clone(),
            labels,
            fields,
        })
    }

    fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        if !self.namespace.is_empty() && meta["namespace"].as_str() != Some(self.namespace.as_str())
        {
            return false;
        }
        let label = |k: &str| meta["labels"].get(k).and_then(Value::as_str);
        // A field the object lacks compares as the empty string (`spec.nodeName=` selects unscheduled pods).
        let field = |k: &str| -> Option<String> {
            let v = match k {
                "metadata.name" => &meta["name"],
                "metadata.namespace" => &meta["namespace"],
                "spec.nodeName" => &obj["spec"]["nodeName"],
                "spec.hostNetwork" => {
                    let host = obj["spec"]["hostNetwork"].as_bool().unwrap_or(false);
                    return Some(host.to_string());
                }
                "status.phase" => &obj["status"]["phase"],
                "status.podIP" => &obj["status"]["podIP"],
                _ => return None,
            };
            Some(v.as_str().unwrap_or_default().to_string())
        };
        debug_assert!(self.kind.watchable() || self.fields.is_empty());
        self.labels.iter().all(|r| match r {
            Requirement::Eq(k, v) => label(k) == Some(v),
            Requirement::Ne(k, v) => label(k) != Some(v),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
        }) && self.fields.iter().all(|r| match r {
            Requirement::Eq(k, v) => field(k).as_ref() == Some(v),
            Requirement::Ne(k, v) => field(k).as_ref() != Some(v),
            _ => true,
        })
    }
}

impl ApiSim {
    fn handle(
        &self,
        parts: http::request::Parts,
        body: Bytes,
    ) -> Result<Response<ResponseBody>, Unreachable> {
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().unwrap_or_default().to_string();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut record = RecordedRequest {
            method: parts.method.to_string(),
            path: path.clone(),
            query: query.clone(),
            content_type: content_type.clone(),
            status: 0,
        };
        if self.lock().unreachable {
            return Err(Unreachable);
        }
        let q = query_map(&query);
        let route = parse_path(&path);
        let verb = route.as_ref().and_then(|r| {
            let watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
            Some(match (&parts.method, r.name.is_some()) {
                (&Method::GET, false) if watch => Verb::Watch,
                (&Method::GET, false) => Verb::List,
                (&Method::GET, true) => Verb::Get,
                (&Method::POST, false) => Verb::Create,
                (&Method::PUT, true) => Verb::Replace,
                (&Method::PATCH, true) => Verb::Patch,
                (&Method::DELETE, true) => Verb::Delete,
                _ => return None,
            })
        });
        let (route, verb) = match (route, verb) {
            (Some(r), Some(v))
                if r.kind.allows(v) || (v == Verb::Watch && r.kind.allows(Verb::List)) =>
            {
                let all_namespaces = r.kind.namespaced() && r.namespace.is_empty();
                if (v == Verb::Watch && !r.kind.watchable())
                    || (all_namespaces && !matches!(v, Verb::List | Verb::Watch))
                {
                    (None, None)
                } else {
                    (Some(r), Some(v))
                }
            }
            _ => (None, None),
        };
        let (Some(route), Some(verb)) = (route, verb) else {
            let f = fail(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("the stand-in does not serve {} {path}", parts.method),
            );
            record.status = f.code.as_u16();
            let mut st = self.lock();
            st.unexpected.push(record.clone());
            st.requests.push(record);
            return Ok(full(f.code, &status_object(&f)));
        };
        if verb == Verb::Watch {
            let result = Filter::from_query(&route, &q).map(|filter| {
                let since = q
                    .get("resourceVersion")
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|rv| *rv > 0);
                let timeout = q
                    .get("timeoutSeconds")
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(300);
                let compacted = self.lock().compacted;
                match since {
                    Some(rv) if rv < compacted => gone(rv, compacted),
                    _ => self.watch(route.kind, filter, since, Duration::from_secs(timeout)),
                }
            });
            record.status = match &result {
                Ok(_) => 200,
                Err(f) => f.code.as_u16(),
            };
            self.lock().requests.push(record);
            return Ok(result.unwrap_or_else(|f| full(f.code, &status_object(&f))));
        }
        let result = self.serve(&route, verb, &q, content_type.as_deref(), &body);
        // Wake watches (a spurious wake-up after a failed or no-op write is harmless).
        self.notify(self.resource_version());
        let (code, value) = match result {
            Ok((code, value)) => (code, value),
            Err(f) => (f.code, status_object(&f)),
        };
        record.status = code.as_u16();
        self.lock().requests.push(record);
        Ok(full(code, &value))
    }

    fn serve(
        &self,
        route: &Route,
        verb: Verb,
        q: &HashMap<String, String>,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<(StatusCode, Value), Failure> {
        let kind = route.kind;
        let mut st = self.lock();
        let key = (
            route.namespace.clone(),
            route.name.clone().unwrap_or_default(),
        );
        let existing = st.objects.get(&kind).and_then(|m| m.get(&key)).cloned();
        let not_found = || {
            fail(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!(
                    "{}.{} {:?} not found",
                    kind.plural(),
                    kind.api_version(),
                    key.1
                ),
            )
        };
        let is_write = matches!(
            verb,
            Verb::Create | Verb::Replace | Verb::Patch | Verb::Delete
        );
        if is_write && st.take_conflict(kind) {
            return Err(fail(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} {:?}: injected conflict",
                    kind.plural(),
                    key.1
                ),
            ));
        }
        let parse_body = || -> Result<Value, Failure> {
            serde_json::from_slice(body)
                .or_else(|_| serde_yaml::from_slice(body))
                .map_err(|e| fail(StatusCode::BAD_REQUEST, "BadRequest", format!("body: {e}")))
        };
        let dry_run = q.contains_key("dryRun");
        let result = match verb {
            Verb::Get => existing.map(|v| (StatusCode::OK, v)).ok_or_else(not_found),
            Verb::List => {
                let filter = Filter::from_query(route, q)?;
                let items: Vec<Value> = st
                    .objects
                    .get(&kind)
                    .into_iter()
                    .flat_map(|m| m.values())
                    .filter(|v| filter.matches(v))
                    .cloned()
                    .collect();
                Ok((
                    StatusCode::OK,
                    json!({
                        "kind": format!("{}List", kind.kind_name()),
                        "apiVersion": kind.api_version(),
                        "metadata": { "resourceVersion": st.rv.to_string() },
                        "items": items,
                    }),
                ))
            }
            Verb::Create => {
                let mut value = parse_body()?;
                let name = value["metadata"]["name"].as_str().map(str::to_string);
                let name = match (name, value["metadata"]["generateName"].as_str()) {
                    (Some(n), _) => n,
                    (None, Some(prefix)) => format!("{prefix}{:05x}", st.uid + 1),
                    (None, None) => {
                        return Err(fail(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid",
                            "metadata.name: Required",
                        ));
                    }
                };
                value["metadata"]["name"] = json!(name);
                let key = (route.namespace.clone(), name.clone());
                if st.objects.get(&kind).is_some_and(|m| m.contains_key(&key)) {
                    return Err(fail(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        format!("{} {name:?} already exists", kind.plural()),
                    ));
                }
                if kind.needs_namespace()
                    && !st
                        .objects
                        .get(&Kind::Namespace)
                        .is_some_and(|m| m.contains_key(&(String::new(), key.0.clone())))
                {
                    return Err(fail(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        format!("namespaces {:?} not found", key.0),
                    ));
                }
                match kind {
                    Kind::UnderlayNode => {
                        if let Some(m) = value.as_object_mut() {
                            m.remove("status");
                        }
                    }
                    // Status sent on create is reset, as the API server's create strategies do.
                    Kind::Pod => value["status"] = json!({ "phase": "Pending" }),
                    Kind::Namespace => {
                        value["status"] = json!({ "phase": "Active" });
                        if value["spec"]["finalizers"].is_null() {
                            value["spec"]["finalizers"] = json!(["kubernetes"]);
                        }
                    }
                    _ => {}
                }
                if let Some(m) = value["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                st.init_metadata(kind, &key, &mut value);
                record_manager(&mut value, q, "Update");
                if dry_run {
                    return Ok((StatusCode::CREATED, value));
                }
                st.commit(kind, key.clone(), value, "ADDED");
                Ok((StatusCode::CREATED, st.objects[&kind][&key].clone()))
            }
            Verb::Replace | Verb::Patch => {
                let apply = content_type == Some("application/apply-patch+yaml");
                let old = match (existing, apply) {
                    (Some(old), _) => old,
                    (None, true) => Value::Null,
                    (None, false) => return Err(not_found()),
                };
                if apply && !q.contains_key("fieldManager") {
                    return Err(fail(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        "fieldManager is required for apply requests",
                    ));
                }
                let incoming = if verb == Verb::Replace {
                    parse_body()?
                } else {
                    let mut patched = old.clone();
                    if patched.is_null() {
                        patched = json!({ "metadata": { "name": key.1 } });
                    }
                    match content_type.unwrap_or_default() {
                        "application/json-patch+json" => {
                            let p: json_patch::Patch =
                                serde_json::from_slice(body).map_err(|e| {
                                    fail(StatusCode::BAD_REQUEST, "BadRequest", e.to_string())
                                })?;
                            json_patch::patch(&mut patched, &p).map_err(|e| {
                                fail(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e.to_string())
                            })?;
                        }
                        "application/merge-patch+json"
                        | "application/strategic-merge-patch+json"
                        | "application/apply-patch+yaml" => {
                            let p = parse_body()?;
                            if let Some(rv) = p["metadata"]["resourceVersion"].as_str()
                                && !old.is_null()
                                && old["metadata"]["resourceVersion"].as_str() != Some(rv)
                            {
                                return Err(conflict(kind, &key.1));
                            }
                            json_patch::merge(&mut patched, &p);
                        }
                        other => {
                            return Err(fail(
                                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                                "UnsupportedMediaType",
                                format!(
                                    "the body of the request was in an unknown format: {other}"
                                ),
                            ));
                        }
                    }
                    patched
                };
                let mut new = incoming;
                if verb == Verb::Replace {
                    let want = new["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default();
                    if !want.is_empty() && old["metadata"]["resourceVersion"].as_str() != Some(want)
                    {
                        return Err(conflict(kind, &key.1));
                    }
                }
                if new["metadata"]["name"].as_str() != Some(key.1.as_str()) {
                    return Err(fail(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "the name of the object does not match the name on the URL",
                    ));
                }
                // The status subresource: the main endpoint keeps the old status, `/status` keeps the rest.
                if kind.has_status() && !old.is_null() {
                    if route.status {
                        let status = new.get("status").cloned();
                        new = old.clone();
                        match status {
                            Some(s) => new["status"] = s,
                            None => {
                                if let Some(m) = new.as_object_mut() {
                                    m.remove("status");
                                }
                            }
                        }
                    } else {
                        match old.get("status") {
                            Some(s) => new["status"] = s.clone(),
                            None => {
                                if let Some(m) = new.as_object_mut() {
                                    m.remove("status");
                                }
                            }
                        }
                    }
                }
                record_manager(&mut new, q, if apply { "Apply" } else { "Update" });
                if old.is_null() {
                    st.init_metadata(kind, &key, &mut new);
                    if dry_run {
                        return Ok((StatusCode::CREATED, new));
                    }
                    st.commit(kind, key.clone(), new, "ADDED");
                    return Ok((StatusCode::CREATED, st.objects[&kind][&key].clone()));
                }
                preserve_identity(&old, &mut new);
                if new == old {
                    return Ok((StatusCode::OK, old));
                }
                if dry_run {
                    return Ok((StatusCode::OK, new));
                }
                st.commit(kind, key.clone(), new.clone(), "MODIFIED");
                let stored = st.objects.get(&kind).and_then(|m| m.get(&key)).cloned();
                // The last finalizer went on a deleted object: it is gone; answer with its final state.
                Ok((StatusCode::OK, stored.unwrap_or(new)))
            }
            Verb::Delete => {
                let mut old = existing.ok_or_else(not_found)?;
                if dry_run {
                    return Ok((StatusCode::OK, old));
                }
                if finalizers_empty(&old) {
                    if kind == Kind::Namespace {
                        st.delete_namespace_contents(&key.1);
                    }
                    st.delete_now(kind, key, old.clone());
                    Ok((StatusCode::OK, old))
                } else {
                    if old["metadata"].get("deletionTimestamp").is_none() {
                        old["metadata"]["deletionTimestamp"] = now();
                        old["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                        st.commit(kind, key.clone(), old, "MODIFIED");
                    }
                    Ok((StatusCode::OK, st.objects[&kind][&key].clone()))
                }
            }
            Verb::Watch => unreachable!("watches are served by ApiSim::watch"),
        };
        drop(st);
        result
    }

    fn watch(
        &self,
        kind: Kind,
        filter: Filter,
        since: Option<u64>,
        timeout: Duration,
    ) -> Response<ResponseBody> {
        // Without a resourceVersion a watch starts with a synthetic ADDED for every current object.
        let (mut pending, cursor): (Vec<Value>, u64) = {
            let st = self.lock();
            match since {
                Some(rv) => (vec![], rv),
                None => (
                    st.objects
                        .get(&kind)
                        .into_iter()
                        .flat_map(|m| m.values())
                        .filter(|v| filter.matches(v))
                        .map(|v| json!({ "type": "ADDED", "object": v }))
                        .collect(),
                    st.rv,
                ),
            }
        };
        pending.reverse();
        let deadline = tokio::time::Instant::now() + timeout;
        let rx = self.changed.subscribe();
        let sim = self.clone();
        struct S {
            sim: ApiSim,
            rx: tokio::sync::watch::Receiver<u64>,
            cursor: u64,
            pending: Vec<Value>,
        }
        let stream = futures::stream::unfold(
            S {
                sim,
                rx,
                cursor,
                pending,
            },
            move |mut s| {
                let filter = filter.clone();
                async move {
                    loop {
                        if let Some(ev) = s.pending.pop() {
                            *s.sim.lock().delivered.entry(kind).or_default() += 1;
                            let mut line = ev.to_string();
                            line.push('\n');
                            return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), s));
                        }
                        {
                            let st = s.sim.lock();
                            if st.unreachable {
                                return None;
                            }
                            if s.cursor < st.compacted {
                                // The watch fell behind the kept history: end it as the API server does.
                                let ev = expired_event(s.cursor, st.compacted);
                                drop(st);
                                s.pending.clear();
                                s.pending.push(ev);
                                s.cursor = u64::MAX;
                                continue;
                            }
                            if s.cursor == u64::MAX {
                                return None;
                            }
                            let start = st.history.partition_point(|e| e.rv <= s.cursor);
                            for e in &st.history[start..] {
                                if e.kind != kind {
                                    continue;
                                }
                                let now = filter.matches(&e.object);
                                let before = e.previous.as_ref().map(|p| filter.matches(p));
                                let ty = match (before, now) {
                                    (Some(false), true) => "ADDED",
                                    (Some(true), false) => "DELETED",
                                    (_, true) => e.ty,
                                    (_, false) => continue,
                                };
                                s.pending.push(json!({ "type": ty, "object": e.object }));
                            }
                            s.cursor = st.rv;
                            s.rx.borrow_and_update();
                        }
                        if !s.pending.is_empty() {
                            s.pending.reverse();
                            continue;
                        }
                        match tokio::time::timeout_at(deadline, s.rx.changed()).await {
                            Ok(Ok(())) => continue,
                            _ => return None,
                        }
                    }
                }
            },
        );
        Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(StreamBody::new(stream.boxed()).boxed_unsync())
            .expect("static response parts")
    }
}

fn conflict(kind: Kind, name: &str) -> Failure {
    fail(
        StatusCode::CONFLICT,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your \
             changes to the latest version and try again",
            kind.plural()
        ),
    )
}

/// The watch event that ends a watch whose resourceVersion is older than the kept history.
fn expired_event(rv: u64, compacted: u64) -> Value {
    let f = fail(
        StatusCode::GONE,
        "Expired",
        format!("too old resource version: {rv} ({compacted})"),
    );
    json!({ "type": "ERROR", "object": status_object(&f) })
}

/// The answer to a watch from a compacted resourceVersion: 200 and one ERROR event carrying a 410 `Status`,
/// as the API server's watch cache answers (clients such as kube-runtime's watcher then re-list).
fn gone(rv: u64, compacted: u64) -> Response<ResponseBody> {
    let mut line = expired_event(rv, compacted).to_string();
    line.push('\n');
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(line)).boxed_unsync())
        .expect("static response parts")
}

/// Record `fieldManager` of the request in `metadata.managedFields` (manager and operation only).
fn record_manager(obj: &mut Value, q: &HashMap<String, String>, operation: &str) {
    let Some(manager) = q.get("fieldManager") else {
        return;
    };
    let api_version = obj["apiVersion"].clone();
    let entry = json!({ "manager": manager, "operation": operation, "apiVersion": api_version, "time": now() });
    let fields = &mut obj["metadata"]["managedFields"];
    if !fields.is_array() {
        *fields = json!([]);
    }
    let list = fields.as_array_mut().expect("just made an array");
    list.retain(|e| !(e["manager"] == json!(manager) && e["operation"] == json!(operation)));
    list.push(entry);
}
