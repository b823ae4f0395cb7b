//! underlay's Kubernetes object types.
//!
//! One custom resource, cluster-scoped, in API group [`underlay_core::names::API_GROUP`]:
//!
//! ```text
//!   Node "ip-198-18-0-10"  ◄── owner ──  UnderlayNode "ip-198-18-0-10"
//!                                          spec   (controller writes): instance, subnet, zone, mode, node IP, ENI
//!                                          status (controller: pool, routes, forwarder role;
//!                                                  agent: used, conditions CniConfigured/Converged/Ready)
//! ```
//!
//! The CRD (`UnderlayNode::crd()`) is what `underlay crd` prints and what `deploy/crds/underlaynode.yaml` holds.

pub mod policy;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition types on [`UnderlayNodeStatus::conditions`].
pub mod conditions {
    /// The node can run pods: pool ready, CNI configured, kernel state converged.
    pub const READY: &str = "Ready";
    /// The controller has allocated the node's pool (routed: pod block; eni: ENIs and addresses).
    pub const POOL_READY: &str = "PoolReady";
    /// The agent has written the CNI configuration list and installed the plugin.
    pub const CNI_CONFIGURED: &str = "CniConfigured";
    /// The agent's last reconcile brought the node's routes, sysctls and nftables to the desired state.
    pub const CONVERGED: &str = "Converged";
}

/// How a node's pods get VPC-routable addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A pod block per node, reached through VPC routes (aggregated through forwarders where the table is full).
    Routed,
    /// Pod addresses are secondary addresses or prefixes of ENIs attached to the node.
    Eni,
}

/// What the controller knows about a node's place in the VPC. Written by the controller only.
// clippy reads kube's repeated `printcolumn(type_ = …)` items as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "underlay.dev",
    version = "v1alpha1",
    kind = "UnderlayNode",
    plural = "underlaynodes",
    singular = "underlaynode",
    shortname = "un",
    category = "underlay",
    status = "UnderlayNodeStatus",
    doc = "underlay's record of one Kubernetes node: where it sits in the VPC, its address pool, the routes its \
           agent installs and the VPC routes that point at it.",
    printcolumn(name = "Zone", type_ = "string", json_path = ".spec.zone"),
    printcolumn(name = "Subnet", type_ = "string", json_path = ".spec.subnetId"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Pool", type_ = "integer", json_path = ".status.poolSize"),
    printcolumn(name = "Used", type_ = "integer", json_path = ".status.poolUsed"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Forwarder",
        type_ = "string",
        json_path = ".status.forwarder.summary"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Instance",
        type_ = "string",
        json_path = ".spec.instanceId",
        priority = "1"
    ),
    printcolumn(
        name = "Node-IP",
        type_ = "string",
        json_path = ".spec.nodeIP",
        priority = "1"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct UnderlayNodeSpec {
    /// EC2 instance id (from the Node's `spec.providerID`), e.g. `i-0123456789abcdef0`.
    pub instance_id: String,
    /// Subnet of the node's primary ENI, e.g. `subnet-0abc`.
    pub subnet_id: String,
    /// Availability zone, e.g. `eu-west-1a`.
    pub zone: String,
    /// Address mode of this node's pods.
    pub mode: Mode,
    /// The node's primary private IPv4 address.
    #[serde(rename = "nodeIP")]
    pub node_ip: String,
    /// Id of the node's primary ENI (device index 0).
    pub primary_eni_id: String,
}

/// What the controller allocated and the agent reports. Written through the status subresource.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnderlayNodeStatus {
    /// The node's address pool; absent until the controller has allocated it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<Pool>,
    /// Addresses in the pool.
    #[serde(default)]
    pub pool_size: u32,
    /// Addresses in the pool assigned to pods (reported by the agent).
    #[serde(default)]
    pub pool_used: u32,
    /// `eni` mode: every address the agent holds (assigned to a pod, or cooling down after one), sorted. The
    /// controller withdraws only addresses absent from it and unassigns withdrawn ones once it acknowledges them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_held: Option<Vec<String>>,
    /// `eni` mode: the part of `poolHeld` no pod has, cooling down after one (sorted). The controller may
    /// withdraw these, and unassigns them only once they have left `poolHeld`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_cooling: Option<Vec<String>>,
    /// `eni` mode: the `pool.releaseGeneration` the agent's allocator served when it reported `poolHeld`: it
    /// hands out no address the pool lists as releasing at that generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_release_generation: Option<u64>,
    /// Routes the agent installs on the node: peers' pod blocks reached directly through the peer's node IP
    /// (same subnet, routed mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<PeerRoute>,
    /// VPC routes that target this node's primary ENI; absent when it forwards for no one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarder: Option<ForwarderRole>,
    /// Ready, PoolReady, CniConfigured, Converged (see [`conditions`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A node's address pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Pool {
    /// Routed mode: the node's pod block (CIDR), e.g. `100.64.3.0/26`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<String>,
    /// ENI mode: the ENIs attached for pods, with the addresses and prefixes each owns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enis: Vec<PoolEni>,
    /// ENI mode: bumped by the controller every time it withdraws more addresses or prefixes (moves them to an
    /// ENI's `releasing*` lists).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub release_generation: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One ENI of an `eni`-mode pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolEni {
    /// ENI id, e.g. `eni-0abc`.
    pub id: String,
    /// Attachment device index (0 is the primary ENI).
    pub device_index: u32,
    /// MAC address, as the kernel shows it on the node's interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// CIDR of the ENI's subnet, e.g. `198.18.4.0/24`: the agent routes the ENI's table through its gateway
    /// (the subnet's first host address), as the VPC router answers there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_cidr: Option<String>,
    /// The ENI's own primary private IPv4 address (never a pod's): the agent puts it on a secondary ENI's
    /// device, with the subnet's prefix length, so ARP and locally-originated traffic there use an address
    /// that ENI owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_ip: Option<String>,
    /// Secondary private IPv4 addresses available to pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Delegated IPv4 prefixes (/28) available to pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
    /// Secondary addresses still assigned to the ENI but withdrawn from pods: the agent hands none out; the
    /// controller unassigns each once the agent acknowledges the withdrawal and no longer holds it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub releasing_addresses: Vec<String>,
    /// Prefixes withdrawn the same way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub releasing_prefixes: Vec<String>,
}

/// A route the agent installs: a peer's pod block through the peer's node IP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerRoute {
    /// Destination CIDR (a peer node's pod block).
    pub destination: String,
    /// Next hop: the peer's node IP.
    pub via: String,
}

/// The VPC routes that send traffic to this node, which forwards it on to the owning node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForwarderRole {
    /// One line for `kubectl get`: `<routes> route(s) in <tables> table(s)`.
    pub summary: String,
    /// Each VPC route table route targeting this node's primary ENI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<ForwarderRoute>,
}

/// One VPC route that targets a forwarder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForwarderRoute {
    /// VPC route table id, e.g. `rtb-0abc`.
    pub route_table_id: String,
    /// Destination CIDR (an aggregate of pod blocks).
    pub destination: String,
}

impl ForwarderRole {
    /// A role over `routes`, with its summary filled in.
    pub fn new(routes: Vec<ForwarderRoute>) -> Self {
        let mut tables: Vec<&str> = routes.iter().map(|r| r.route_table_id.as_str()).collect();
        tables.sort_unstable();
        tables.dedup();
        let summary = format!(
            "{} route{} in {} table{}",
            routes.len(),
            if routes.len() == 1 { "" } else { "s" },
            tables.len(),
            if tables.len() == 1 { "" } else { "s" }
        );
        Self { summary, routes }
    }
}

/// `metav1.Condition` as Kubernetes documents it (k8s-openapi's schema has no `required` or `x-kubernetes-*`
/// list markers): type, status, reason, message, lastTransitionTime, observedGeneration; a map list keyed by type.
fn conditions_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    serde_json::from_value(serde_json::json!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status", "lastTransitionTime", "reason", "message"],
            "properties": {
                "type": { "type": "string", "maxLength": 316 },
                "status": { "type": "string", "enum": ["True", "False", "Unknown"] },
                "observedGeneration": { "type": "integer", "format": "int64", "minimum": 0 },
                "lastTransitionTime": { "type": "string", "format": "date-time" },
                "reason": { "type": "string", "maxLength": 1024 },
                "message": { "type": "string", "maxLength": 32768 }
            }
        }
    }))
    .expect("static schema is valid JSON Schema")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::{CustomResourceExt, Resource};
    use underlay_core::names;

    #[test]
    fn identity_matches_owned_names() {
        assert_eq!(UnderlayNode::group(&()), names::API_GROUP);
        assert_eq!(UnderlayNode::version(&()), names::API_VERSION);
        let crd = UnderlayNode::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.group, names::API_GROUP);
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
    }

    #[test]
    fn printer_columns_cover_what_an_operator_reads() {
        let crd = UnderlayNode::crd();
        let columns: Vec<&str> = crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        for want in [
            "Zone",
            "Subnet",
            "Mode",
            "Pool",
            "Used",
            "Ready",
            "Forwarder",
        ] {
            assert!(columns.contains(&want), "{want} missing from {columns:?}");
        }
    }

    #[test]
    fn spec_and_status_round_trip_in_camel_case() {
        let mut node = UnderlayNode::new(
            "ip-198-18-0-10",
            UnderlayNodeSpec {
                instance_id: "i-0a".into(),
                subnet_id: "subnet-0a".into(),
                zone: "lab-1a".into(),
                mode: Mode::Routed,
                node_ip: "198.18.0.10".into(),
                primary_eni_id: "eni-0a".into(),
            },
        );
        node.status = Some(UnderlayNodeStatus {
            pool: Some(Pool {
                block: Some("100.64.0.0/26".into()),
                ..Pool::default()
            }),
            pool_size: 64,
            forwarder: Some(ForwarderRole::new(vec![ForwarderRoute {
                route_table_id: "rtb-1".into(),
                destination: "100.64.0.0/22".into(),
            }])),
            ..Default::default()
        });
        let json = serde_json::to_value(&node).unwrap();
        assert_eq!(json["spec"]["nodeIP"], "198.18.0.10");
        assert_eq!(json["spec"]["mode"], "routed");
        assert_eq!(json["status"]["poolSize"], 64);
        assert_eq!(json["status"]["forwarder"]["summary"], "1 route in 1 table");
        let back: UnderlayNode = serde_json::from_value(json).unwrap();
        assert_eq!(back.spec, node.spec);
        assert_eq!(back.status, node.status);
    }
}
