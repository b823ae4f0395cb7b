//! Every kernel and API name underlay owns, in one place. Adapters and tests refer to these constants,
//! never to string literals.

/// Kubernetes API group of underlay's objects, labels, taints and annotations.
pub const API_GROUP: &str = "underlay.dev";

/// Taint kept on a node until its agent has a pool and the CNI configuration is written.
pub const TAINT_NOT_READY: &str = "underlay.dev/not-ready";
/// Taint kept on a node while its pool has no free address.
pub const TAINT_NO_FREE_IPS: &str = "underlay.dev/no-free-ips";

/// EC2 tag on every ENI underlay creates: the cluster that owns it.
pub const TAG_CLUSTER: &str = "underlay.dev/cluster";
/// EC2 tag on every ENI underlay creates: the node it was created for.
pub const TAG_NODE: &str = "underlay.dev/node";

/// nftables family and table that hold all of underlay's rules on a node.
pub const NFT_FAMILY: &str = "inet";
pub const NFT_TABLE: &str = "underlay";

/// Default path of the agent's IPAM socket.
pub const AGENT_SOCKET: &str = "/run/underlay/agent.sock";
/// File name of the CNI configuration list the agent writes.
pub const CNI_CONFLIST: &str = "10-underlay.conflist";
/// Name of the CNI network and of the plugin binary.
pub const CNI_NETWORK: &str = "underlay";
pub const CNI_PLUGIN: &str = "underlay-cni";

/// Default path of the agent's IPAM checkpoint (versioned JSON, rewritten atomically on every change). On
/// tmpfs, as amazon-vpc-cni keeps its own: it must survive agent restarts, not reboots (no pod survives one).
pub const AGENT_CHECKPOINT: &str = "/run/underlay/ipam.json";
/// File name, next to the IPAM checkpoint, of the last UnderlayNode the agent saw: a restart while the API
/// server is unreachable resumes from it (serving the same block) instead of waiting for the API.
pub const AGENT_RECORD_CACHE: &str = "node-record.json";

/// Prefix of every host-side veth underlay-cni creates (`ul` + 11 hex digits; see `veth_names`).
pub const HOST_VETH_PREFIX: &str = "ul";
/// Default directories the agent writes the CNI configuration list to and installs the plugin into.
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
/// Log format of `underlay agent` and `underlay controller`: `text` (default) or `json`, one object per line.
pub const LOG_FORMAT_ENV: &str = "UNDERLAY_LOG_FORMAT";
/// Fault-injection knob of `underlay agent`, for crash tests only (see docs/agent.md).
pub const AGENT_FAULT_ENV: &str = "UNDERLAY_AGENT_FAULT";

/// Priority of the per-pod `from <pod>/32 lookup <table>` rule underlay-cni adds in `eni` mode, so a pod's
/// traffic leaves by the interface that owns its address (amazon-vpc-cni uses the same value).
pub const RULE_PRIORITY_FROM_POD: u32 = 1536;
/// Priority of the per-pod `to <pod>/32 lookup main` rule underlay-cni adds in `eni` mode: before every
/// `from <pod>` rule, so traffic *to* a pod (from another pod of the node too) is delivered by the main table's
/// host route instead of leaving by an ENI (amazon-vpc-cni uses the same value).
pub const RULE_PRIORITY_TO_POD: u32 = 512;
/// `eni` mode: the agent's routing table for the ENI with device index `i` is `ENI_ROUTE_TABLE_BASE + i`. Every
/// route in tables `ENI_ROUTE_TABLE_BASE ..= ENI_ROUTE_TABLE_BASE + ENI_MAX_DEVICE_INDEX` is underlay's.
pub const ENI_ROUTE_TABLE_BASE: u32 = 0x7600;
/// Highest ENI device index the agent gives a routing table (EC2's largest instances attach fewer ENIs).
pub const ENI_MAX_DEVICE_INDEX: u32 = 255;

/// The lab (`crates/lab`): every namespace it creates is called `<LAB_NETNS_PREFIX>-<lab id>-…`
/// (`ul-<id>-fab`, `ul-<id>-inet`, `ul-<id>-i-…`), so one lab's objects can be found and removed by prefix.
pub const LAB_NETNS_PREFIX: &str = "ul";
/// nftables table (families `bridge` and `inet`) the lab fabric owns in its namespace: source/dest check
/// and the internet gateway's filter.
pub const LAB_NFT_TABLE: &str = "underlay_lab";
/// Fabric routing table holding a route for every address an attached ENI owns (the VPC's `local` delivery).
pub const LAB_TABLE_OWNED: u32 = 1000;
/// Fabric routing tables mirroring VPC route tables are numbered from here (plus bits of the table id).
pub const LAB_TABLE_VPC_BASE: u32 = 0x1000_0000;
/// Priorities of the fabric's policy rules: ENI-owned addresses first, then the subnet's VPC route table.
pub const LAB_RULE_PRIORITY_OWNED: u32 = 100;
pub const LAB_RULE_PRIORITY_VPC: u32 = 200;

/// Routed mode, on every node: the routing table holding the routes to same-subnet peers' blocks. Every route
/// in it is underlay's (the agent deletes what its record does not list); no other table is touched.
pub const AGENT_ROUTE_TABLE: u32 = 0x756c; // "ul"
/// Priority of the `to <pod cidr> lookup AGENT_ROUTE_TABLE` rule: before `main` (32766), so a peer block's
/// route wins over a default route; a lookup that finds nothing there falls through to `main`.
pub const AGENT_RULE_PRIORITY_PEERS: u32 = 30000;
/// Default TCP port of the agent's health endpoint (`/healthz`, `/readyz`); the controller probes it.
pub const AGENT_HEALTH_PORT: u16 = 9650;
/// UDP port of the agent's forwarder-health echo (the same number as the TCP health port); the controller's
/// prober sends one datagram per forwarder per interval (`underlay_core::health::wire`).
pub const AGENT_PROBE_UDP_PORT: u16 = 9650;
/// Default TCP port of the controller's `/healthz`, `/readyz` and `/metrics` endpoint.
pub const CONTROLLER_HEALTH_PORT: u16 = 9651;
/// Node annotation the controller sets to the most pods the node's pool can hold (instance type and mode).
pub const MAX_PODS_ANNOTATION: &str = "underlay.dev/max-pods";
/// nftables chains of the `inet underlay` table in routed mode.
pub const NFT_CHAIN_RAW_PREROUTING: &str = "raw_prerouting";
pub const NFT_CHAIN_FORWARD: &str = "forward";
pub const NFT_CHAIN_NAT_POSTROUTING: &str = "nat_postrouting";
/// Chain and set of the IMDS guard, in both modes: forwarded packets to the instance metadata service are dropped
/// unless their source is in the set (the addresses of pods that opted in with [`LABEL_IMDS_ACCESS`]).
pub const NFT_CHAIN_IMDS_GUARD: &str = "imds_guard";
pub const NFT_SET_IMDS_ALLOWED: &str = "imds_allowed";
/// Its hook priority: before every filter-priority forward chain (ours and anyone's), so a drop is decided first.
pub const NFT_PRIORITY_IMDS_GUARD: i32 = -10;
/// Pod label that lets the pod reach the instance metadata service (`underlay.dev/imds-access: allow`); every
/// other pod's packets to it are dropped on its node. A label, not an annotation, so that the pods holding it can be
/// listed (`kubectl get pods -A -l underlay.dev/imds-access=allow`) and admission policy can restrict who sets it.
pub const LABEL_IMDS_ACCESS: &str = "underlay.dev/imds-access";
/// The value of [`LABEL_IMDS_ACCESS`] that opts in; any other value is no opt-in.
pub const IMDS_ACCESS_ALLOW: &str = "allow";
/// Every base-ruleset chain name any release has used: `Ruleset::render` replaces each of them (so a chain a
/// new release drops does not linger), and nothing else in the table. Add names here; never remove one.
pub const NFT_BASE_CHAINS: &[&str] = &[
    NFT_CHAIN_RAW_PREROUTING,
    NFT_CHAIN_FORWARD,
    NFT_CHAIN_NAT_POSTROUTING,
    NFT_CHAIN_IMDS_GUARD,
];
/// Their hook priorities (the kernel's NF_IP_PRI_RAW, NF_IP_PRI_FILTER, NF_IP_PRI_NAT_SRC).
pub const NFT_PRIORITY_RAW: i32 = -300;
pub const NFT_PRIORITY_FILTER: i32 = 0;
pub const NFT_PRIORITY_SRCNAT: i32 = 100;
/// Version of underlay's Kubernetes objects in [`API_GROUP`].
pub const API_VERSION: &str = "v1alpha1";
/// Finalizer the controller puts on every UnderlayNode: the node's cloud resources (ENIs, routes) are released
/// before the object goes away.
pub const FINALIZER_CLEANUP: &str = "underlay.dev/cleanup";
/// Field managers of underlay's writes to the Kubernetes API (server-side apply and patches).
pub const FIELD_MANAGER_CONTROLLER: &str = "underlay-controller";
pub const FIELD_MANAGER_AGENT: &str = "underlay-agent";
/// Label on every UnderlayNode: the name of the Node it belongs to.
pub const LABEL_NODE: &str = "underlay.dev/node";
/// Label on every UnderlayNode: its address mode (`routed` or `eni`).
pub const LABEL_MODE: &str = "underlay.dev/mode";
/// Name of the `coordination.k8s.io` Lease the controller replicas elect a leader with.
pub const LEADER_LEASE: &str = "underlay-controller";
/// Annotation on every routed-mode UnderlayNode: the pod-CIDR region of its subnet in the current plan. With the
/// blocks and forwarder routes in the status, it lets a new leader rebuild the previous plan (blocks never move).
pub const ANNOTATION_SUBNET_REGION: &str = "underlay.dev/subnet-region";
/// Network policy: every nftables object the policy datapath owns in the `inet underlay` table starts with
/// this prefix. The base ruleset's replacement never touches them, and its read-back ignores them.
pub const NFT_POLICY_PREFIX: &str = "pol_";
/// Policy base chains: the source pod's egress on forwarded packets, the destination pod's ingress on
/// forwarded packets, and the source pod's egress on packets to the node itself.
pub const NFT_CHAIN_POLICY_FORWARD_EGRESS: &str = "pol_forward_egress";
pub const NFT_CHAIN_POLICY_FORWARD_INGRESS: &str = "pol_forward_ingress";
pub const NFT_CHAIN_POLICY_INPUT_EGRESS: &str = "pol_input_egress";
/// Policy chains of the connection-tracking shortcut: `pol_established` accepts a packet of an established
/// connection that the current policy generation already let through (its conntrack mark carries the generation);
/// `pol_verified` stamps the generation on a connection whose packet passed both directions' policy.
pub const NFT_CHAIN_POLICY_ESTABLISHED: &str = "pol_established";
pub const NFT_CHAIN_POLICY_VERIFIED: &str = "pol_verified";
/// The conntrack mark bits the policy datapath owns (the upper 16): the generation that verified the
/// connection. The lower 16 bits are left to others.
pub const CT_MARK_POLICY_MASK: u32 = 0xffff_0000;
/// Policy verdict maps, keyed by a pod's host veth name: `iifname` (egress) and `oifname` (ingress) to the
/// chain of the policies selecting that pod.
pub const NFT_MAP_POLICY_EGRESS_IF: &str = "pol_egress_if";
pub const NFT_MAP_POLICY_INGRESS_IF: &str = "pol_ingress_if";
/// Priorities of the policy base chains: after the base ruleset's filter chains, egress before ingress (each
/// direction is its own base chain, so an `accept` in one still leaves the packet to the other).
pub const NFT_PRIORITY_POLICY_EGRESS: i32 = 10;
pub const NFT_PRIORITY_POLICY_INGRESS: i32 = 20;
