//! The watched indexes of both modes: Nodes and UnderlayNodes as their watches deliver them, kept complete across
//! restarts of a watch, and the little the controller reads of a Node. Pure: tested by feeding objects.

use std::collections::BTreeMap;

use ::kube::Resource;
use ::kube::runtime::watcher::Event as WatchEvent;
use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use underlay_cloud::InstanceId;
use underlay_core::names;

/// A Node as the indexes keep it: only what the controller reads (name, uid, resourceVersion, deletion,
/// `underlay.dev/` annotations; providerID, taints, podCIDR(s)). A Node's status (images, conditions, addresses)
/// and managed fields are most of its size; at thousands of Nodes they are most of the leader's memory.
pub fn slim_node(node: Node) -> Node {
    let meta = node.metadata;
    let spec = node.spec.unwrap_or_default();
    let annotations: BTreeMap<String, String> = meta
        .annotations
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| {
            k.split_once('/')
                .is_some_and(|(group, _)| group == names::API_GROUP)
        })
        .collect();
    Node {
        metadata: ObjectMeta {
            name: meta.name,
            uid: meta.uid,
            resource_version: meta.resource_version,
            deletion_timestamp: meta.deletion_timestamp,
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            provider_id: spec.provider_id,
            taints: spec.taints,
            pod_cidr: spec.pod_cidr,
            pod_cidrs: spec.pod_cidrs,
            ..NodeSpec::default()
        }),
        status: None,
    }
}

/// The EC2 instance id of an AWS Node's `spec.providerID` (`aws:///<zone>/<instance-id>`); `None` otherwise.
pub fn instance_id_of(provider_id: &str) -> Option<InstanceId> {
    let rest = provider_id.strip_prefix("aws://")?;
    let id = rest.rsplit('/').next()?;
    (id.starts_with("i-")
        && id.len() > 2
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    .then(|| InstanceId(id.to_string()))
}

fn rv_number<K: Resource>(o: &K) -> Option<u64> {
    o.meta().resource_version.as_deref()?.parse().ok()
}

/// Objects of a watch, kept complete across restarts of the watch (buffered between `Init` and `InitDone`).
pub(crate) fn apply_watch_event<K: Resource + Clone>(
    map: &mut BTreeMap<String, K>,
    buffer: &mut Option<BTreeMap<String, K>>,
    synced: &mut bool,
    ev: WatchEvent<K>,
) {
    match ev {
        WatchEvent::Apply(o) => {
            let name = o.meta().name.clone().unwrap_or_default();
            // Writes store their response at once; a watch event older than it would undo that (and cause a
            // redundant write). resourceVersions are opaque, but etcd's are integers: compare only those.
            let older = map
                .get(&name)
                .and_then(|cur| rv_number(cur))
                .zip(rv_number(&o))
                .is_some_and(|(cur, new)| new < cur);
            if !older {
                map.insert(name, o);
            }
        }
        WatchEvent::Delete(o) => {
            map.remove(o.meta().name.as_deref().unwrap_or_default());
        }
        WatchEvent::Init => *buffer = Some(BTreeMap::new()),
        WatchEvent::InitApply(o) => {
            buffer
                .get_or_insert_with(BTreeMap::new)
                .insert(o.meta().name.clone().unwrap_or_default(), o);
        }
        WatchEvent::InitDone => {
            *map = buffer.take().unwrap_or_default();
            *synced = true;
        }
    }
}

/// Objects of one watch, complete once `synced`.
#[derive(Debug)]
pub struct Cache<K> {
    pub objects: BTreeMap<String, K>,
    /// Objects of a (re)list in progress, swapped in when it completes.
    relist: Option<BTreeMap<String, K>>,
    pub synced: bool,
}

impl<K: Resource + Clone> Default for Cache<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Resource + Clone> Cache<K> {
    pub fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }

    /// Apply a watch event; `true` when it changed what a pass reads of an object (`facts`), or completed a list.
    pub fn absorb<F: PartialEq>(&mut self, ev: WatchEvent<K>, facts: impl Fn(&K) -> F) -> bool {
        let name = match &ev {
            WatchEvent::Apply(o) | WatchEvent::Delete(o) => {
                Some(o.meta().name.clone().unwrap_or_default())
            }
            WatchEvent::Init | WatchEvent::InitApply(_) => None,
            WatchEvent::InitDone => {
                apply_watch_event(&mut self.objects, &mut self.relist, &mut self.synced, ev);
                return true;
            }
        };
        let facts_of = |c: &Self| name.as_ref().and_then(|n| c.objects.get(n)).map(&facts);
        let before = facts_of(self);
        apply_watch_event(&mut self.objects, &mut self.relist, &mut self.synced, ev);
        before != facts_of(self)
    }

    /// Store a write's response (unless the cache already holds a newer version).
    pub fn remember(&mut self, o: K) {
        let mut synced = self.synced;
        apply_watch_event(
            &mut self.objects,
            &mut None,
            &mut synced,
            WatchEvent::Apply(o),
        );
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeStatus, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn mk_node(name: &str, rv: &str) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        }
    }

    fn rv(map: &BTreeMap<String, Node>, name: &str) -> Option<String> {
        map.get(name)?.metadata.resource_version.clone()
    }

    #[test]
    fn provider_ids() {
        assert_eq!(
            instance_id_of("aws:///us-east-1a/i-0123abcd"),
            Some(InstanceId("i-0123abcd".into()))
        );
        assert_eq!(
            instance_id_of("aws:///i-0123abcd"),
            Some(InstanceId("i-0123abcd".into()))
        );
        assert_eq!(instance_id_of("gce://proj/zone/vm-1"), None);
        assert_eq!(instance_id_of("aws:///us-east-1a/"), None);
        assert_eq!(instance_id_of("kind://docker/kind/kind-worker"), None);
        assert_eq!(instance_id_of("aws:///us-east-1a/i-"), None);
    }

    #[test]
    fn a_relist_replaces_the_index_only_when_complete() {
        let (mut map, mut buf, mut synced) = (BTreeMap::new(), None, false);
        apply_watch_event(&mut map, &mut buf, &mut synced, WatchEvent::Init);
        apply_watch_event(
            &mut map,
            &mut buf,
            &mut synced,
            WatchEvent::InitApply(mk_node("a", "1")),
        );
        assert!(
            map.is_empty() && !synced,
            "a list in progress is not the index yet"
        );
        apply_watch_event(&mut map, &mut buf, &mut synced, WatchEvent::InitDone);
        assert!(synced);
        assert_eq!(rv(&map, "a").as_deref(), Some("1"));
        // A restarted watch lists again: the index keeps its objects until the new list is complete, then holds
        // exactly that list (a deletion missed while the watch was down is dropped).
        apply_watch_event(&mut map, &mut buf, &mut synced, WatchEvent::Init);
        apply_watch_event(
            &mut map,
            &mut buf,
            &mut synced,
            WatchEvent::InitApply(mk_node("b", "5")),
        );
        assert_eq!(map.len(), 1);
        assert_eq!(rv(&map, "a").as_deref(), Some("1"));
        apply_watch_event(&mut map, &mut buf, &mut synced, WatchEvent::InitDone);
        assert_eq!(map.keys().collect::<Vec<_>>(), vec!["b"]);
    }

    #[test]
    fn an_event_older_than_a_write_does_not_undo_it() {
        let (mut map, mut buf, mut synced) = (BTreeMap::new(), None, true);
        apply_watch_event(
            &mut map,
            &mut buf,
            &mut synced,
            WatchEvent::Apply(mk_node("a", "10")),
        );
        apply_watch_event(
            &mut map,
            &mut buf,
            &mut synced,
            WatchEvent::Apply(mk_node("a", "9")),
        );
        assert_eq!(rv(&map, "a").as_deref(), Some("10"));
        apply_watch_event(
            &mut map,
            &mut buf,
            &mut synced,
            WatchEvent::Apply(mk_node("a", "11")),
        );
        assert_eq!(rv(&map, "a").as_deref(), Some("11"));
        apply_watch_event(
            &mut map,
            &mut buf,
            &mut synced,
            WatchEvent::Delete(mk_node("a", "12")),
        );
        assert!(map.is_empty());
    }

    #[test]
    fn a_cache_reports_only_changes_of_what_a_pass_reads() {
        let mut cache: Cache<Node> = Cache::new();
        let facts = |n: &Node| n.spec.as_ref().and_then(|s| s.provider_id.clone());
        assert!(!cache.absorb(WatchEvent::Init, facts));
        assert!(!cache.absorb(WatchEvent::InitApply(mk_node("a", "1")), facts));
        assert!(
            cache.absorb(WatchEvent::InitDone, facts),
            "a completed list is a change"
        );
        assert!(cache.synced);
        // A new resourceVersion with the same facts (a kubelet heartbeat) is no change.
        assert!(!cache.absorb(WatchEvent::Apply(mk_node("a", "2")), facts));
        let mut with_pid = mk_node("a", "3");
        with_pid.spec = Some(NodeSpec {
            provider_id: Some("aws:///z/i-1".into()),
            ..NodeSpec::default()
        });
        assert!(cache.absorb(WatchEvent::Apply(with_pid), facts));
        // A write's response is kept; an older watch event after it is not applied.
        cache.remember(mk_node("a", "7"));
        assert!(!cache.absorb(WatchEvent::Apply(mk_node("a", "6")), facts));
        assert_eq!(rv(&cache.objects, "a").as_deref(), Some("7"));
    }

    #[test]
    fn a_slim_node_keeps_what_the_controller_reads_and_nothing_else() {
        let mut node = mk_node("a", "3");
        node.metadata.uid = Some("u-1".into());
        node.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        node.metadata.labels = Some(BTreeMap::from([(
            "kubernetes.io/os".into(),
            "linux".into(),
        )]));
        node.metadata.annotations = Some(BTreeMap::from([
            (names::MAX_PODS_ANNOTATION.to_string(), "29".to_string()),
            ("node.alpha.kubernetes.io/ttl".to_string(), "0".to_string()),
            ("underlay.dev.example/other".to_string(), "x".to_string()),
        ]));
        node.metadata.managed_fields = Some(vec![Default::default()]);
        let taint = Taint {
            key: names::TAINT_NOT_READY.into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        };
        node.spec = Some(NodeSpec {
            provider_id: Some("aws:///z/i-1".into()),
            taints: Some(vec![taint.clone()]),
            pod_cidr: Some("100.64.0.0/24".into()),
            pod_cidrs: Some(vec!["100.64.0.0/24".into()]),
            unschedulable: Some(true),
            ..NodeSpec::default()
        });
        node.status = Some(NodeStatus::default());
        let slim = slim_node(node.clone());
        assert_eq!(slim.metadata.name, node.metadata.name);
        assert_eq!(slim.metadata.uid, node.metadata.uid);
        assert_eq!(
            slim.metadata.resource_version,
            node.metadata.resource_version
        );
        assert_eq!(
            slim.metadata.deletion_timestamp,
            node.metadata.deletion_timestamp
        );
        assert_eq!(
            slim.metadata.annotations,
            Some(BTreeMap::from([(
                names::MAX_PODS_ANNOTATION.to_string(),
                "29".to_string()
            )]))
        );
        assert!(slim.metadata.labels.is_none() && slim.metadata.managed_fields.is_none());
        let spec = slim.spec.unwrap();
        assert_eq!(spec.provider_id.as_deref(), Some("aws:///z/i-1"));
        assert_eq!(spec.taints, Some(vec![taint]));
        assert_eq!(spec.pod_cidr.as_deref(), Some("100.64.0.0/24"));
        assert_eq!(spec.pod_cidrs, Some(vec!["100.64.0.0/24".to_string()]));
        assert!(spec.unschedulable.is_none());
        assert!(slim.status.is_none());
    }
}
