//! An `eni`-mode world in vpcsim: a VPC with one node subnet per zone (and a pod subnet per zone for custom
//! networking), m5.large nodes spread over the zones, and the checks every eni test ends with.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use underlay_api::UnderlayNodeStatus;
use underlay_cloud::{
    AddressRequest, AttachmentId, Cloud, CreateEniRequest, EniFilter, EniId, EniStatus, Instance,
    InstanceFilter, InstanceId, InstanceState, InstanceTypeInfo, NetworkInterface, RateLimits,
    Result as CloudResult, RouteTable, RouteTableId, RouteTarget, Subnet, SubnetId, Tags, Vpc,
    VpcId,
};
use underlay_controller::eni::{EniNode, EniPassReport, EniReconciler};
use underlay_core::eni_pool::Used;
use underlay_core::names::TAG_CLUSTER;
use underlay_vpcsim::{RunInstance, VpcSim};

pub const CLUSTER: &str = "eni-test";
pub const ZONES: [&str; 3] = ["us-east-1a", "us-east-1b", "us-east-1c"];

pub fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

#[derive(Debug)]
pub struct EniWorld {
    pub sim: Arc<VpcSim>,
    pub vpc: VpcId,
    /// Node subnet of each zone.
    pub node_subnets: BTreeMap<String, SubnetId>,
    /// Pod subnet of each zone (custom networking).
    pub pod_subnets: BTreeMap<String, SubnetId>,
    pub nodes: Vec<EniNode>,
}

pub fn mk_world(seed: u64, rate_limits: Option<RateLimits>) -> EniWorld {
    let sim = Arc::new(VpcSim::builder(seed).rate_limits(rate_limits).build());
    let vpc = sim.create_vpc(net("198.18.0.0/16"), Tags::new()).unwrap();
    let mut node_subnets = BTreeMap::new();
    let mut pod_subnets = BTreeMap::new();
    for (z, zone) in ZONES.iter().enumerate() {
        let z = z as u8;
        let s = sim
            .create_subnet(
                &vpc,
                zone,
                Ipv4Net::new(Ipv4Addr::new(198, 18, z * 32, 0), 19).unwrap(),
            )
            .unwrap();
        node_subnets.insert((*zone).to_owned(), s);
        let p = sim
            .create_subnet(
                &vpc,
                zone,
                Ipv4Net::new(Ipv4Addr::new(198, 18, 128 + z * 32, 0), 19).unwrap(),
            )
            .unwrap();
        pod_subnets.insert((*zone).to_owned(), p);
    }
    EniWorld {
        sim,
        vpc,
        node_subnets,
        pod_subnets,
        nodes: Vec::new(),
    }
}

impl EniWorld {
    /// Launch one node of `instance_type`, in the zones round-robin.
    pub fn add_node(&mut self, instance_type: &str) -> InstanceId {
        let zone = ZONES[self.nodes.len() % ZONES.len()];
        let subnet = &self.node_subnets[zone];
        let i = self
            .sim
            .run_instance(RunInstance::new(instance_type, subnet))
            .unwrap();
        self.nodes.push(EniNode::new(
            format!("node-{}", self.nodes.len()),
            i.id.clone(),
            Used::Count(0),
        ));
        i.id
    }

    pub fn add_nodes(&mut self, n: usize, instance_type: &str) {
        for _ in 0..n {
            self.add_node(instance_type);
        }
    }

    /// Terminate a node's instance and drop it from the node set.
    pub fn terminate(&mut self, index: usize) {
        let node = self.nodes.remove(index);
        self.sim.terminate_instance(&node.instance).unwrap();
    }
}

/// The node's agent reports `k` addresses of its pool as used (the first ones, ENIs by device index), or every
/// address when the pool holds fewer.
pub fn use_addresses(w: &mut EniWorld, node: usize, k: usize) {
    let snap = w.sim.snapshot();
    let mut enis: Vec<_> = snap
        .enis
        .iter()
        .filter(|e| {
            e.attachment
                .as_ref()
                .is_some_and(|a| a.instance == w.nodes[node].instance)
        })
        .collect();
    enis.sort_by_key(|e| e.attachment.as_ref().map(|a| a.device_index));
    let pool = enis.iter().flat_map(|e| e.secondary_addresses());
    w.nodes[node].used = Used::Known(pool.take(k).collect());
}

/// Carry each node's withdrawals from a pass into the next, as its UnderlayNode status would, acknowledged by
/// an agent whose `used` is current.
pub fn carry(nodes: &mut [EniNode], report: &EniPassReport) {
    for n in &report.nodes {
        if let Some(node) = nodes.iter_mut().find(|x| x.name == n.name) {
            let status = UnderlayNodeStatus {
                pool: Some(n.pool.clone()),
                observed_release_generation: Some(n.pool.release_generation),
                ..UnderlayNodeStatus::default()
            };
            let from =
                EniNode::from_status(node.name.clone(), node.instance.clone(), Some(&status));
            node.releasing = from.releasing;
            node.release_generation = from.release_generation;
        }
    }
}

/// Pass until a pass finds every node within its targets with nothing to do and nothing to collect (carrying
/// withdrawals from pass to pass).
pub async fn converge(
    r: &EniReconciler,
    nodes: &mut [EniNode],
    max_passes: usize,
) -> EniPassReport {
    let mut last = None;
    for _ in 0..max_passes {
        let report = r.pass(nodes).await;
        carry(nodes, &report);
        if report.quiet() {
            return report;
        }
        last = Some(report);
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    }
    panic!("no quiet pass in {max_passes} passes; last: {last:#?}");
}

/// The end state every test asserts: no leaked ENI, every attached one of ours going with its instance, no
/// address held twice.
pub fn assert_no_leaks_and_no_duplicates(sim: &VpcSim) {
    let snap = sim.snapshot();
    let terminated: BTreeSet<&InstanceId> = snap
        .instances
        .iter()
        .filter(|i| i.state == InstanceState::Terminated)
        .map(|i| &i.id)
        .collect();
    let mut seen: BTreeSet<u32> = BTreeSet::new();
    for eni in &snap.enis {
        let ours = eni.tags.get(TAG_CLUSTER).map(String::as_str) == Some(CLUSTER);
        assert!(
            !(ours && eni.status == EniStatus::Available),
            "leaked ENI {} ({:?})",
            eni.id,
            eni.tags
        );
        if let Some(a) = &eni.attachment {
            assert!(
                !terminated.contains(&a.instance),
                "ENI {} attached to terminated {}",
                eni.id,
                a.instance
            );
            assert!(
                !ours || a.delete_on_termination,
                "ENI {} attached to {} would outlive it (no DeleteOnTermination)",
                eni.id,
                a.instance
            );
        }
        let addresses = std::iter::once(eni.primary_ip).chain(eni.secondary_addresses());
        for a in addresses.map(u32::from) {
            assert!(
                seen.insert(a),
                "address {} held twice (again by {})",
                Ipv4Addr::from(a),
                eni.id
            );
        }
    }
}

/// vpcsim under other instance-type names: instances are described with `aliases[real]` as their type, and
/// DescribeInstanceTypes answers for the aliases. The built-in table knows none of the aliases, so the
/// reconciler must learn them (Nitro or not) from DescribeInstanceTypes, as it does for a new AWS family.
#[derive(Debug)]
pub struct AliasedTypes {
    pub sim: Arc<VpcSim>,
    /// Real type → alias.
    pub aliases: BTreeMap<String, String>,
}

impl AliasedTypes {
    pub fn new(sim: Arc<VpcSim>, aliases: &[(&str, &str)]) -> Self {
        Self {
            sim,
            aliases: aliases
                .iter()
                .map(|(r, a)| ((*r).to_owned(), (*a).to_owned()))
                .collect(),
        }
    }
}

#[async_trait::async_trait]
impl Cloud for AliasedTypes {
    async fn describe_vpc(&self, vpc: &VpcId) -> CloudResult<Vpc> {
        self.sim.describe_vpc(vpc).await
    }
    async fn describe_subnets(&self, vpc: &VpcId) -> CloudResult<Vec<Subnet>> {
        self.sim.describe_subnets(vpc).await
    }
    async fn describe_route_tables(&self, vpc: &VpcId) -> CloudResult<Vec<RouteTable>> {
        self.sim.describe_route_tables(vpc).await
    }
    async fn describe_instances(&self, filter: &InstanceFilter) -> CloudResult<Vec<Instance>> {
        let mut found = self.sim.describe_instances(filter).await?;
        for i in &mut found {
            if let Some(alias) = self.aliases.get(&i.instance_type) {
                i.instance_type = alias.clone();
            }
        }
        Ok(found)
    }
    async fn describe_instance_types(
        &self,
        types: &[String],
    ) -> CloudResult<Vec<InstanceTypeInfo>> {
        let real: Vec<String> = types
            .iter()
            .map(|t| {
                self.aliases
                    .iter()
                    .find(|(_, a)| *a == t)
                    .map_or_else(|| t.clone(), |(r, _)| r.clone())
            })
            .collect();
        let mut infos = self.sim.describe_instance_types(&real).await?;
        for t in &mut infos {
            if let Some(alias) = self.aliases.get(&t.instance_type) {
                t.instance_type = alias.clone();
            }
        }
        Ok(infos)
    }
    async fn describe_network_interfaces(
        &self,
        filter: &EniFilter,
    ) -> CloudResult<Vec<NetworkInterface>> {
        self.sim.describe_network_interfaces(filter).await
    }
    async fn create_route(
        &self,
        table: &RouteTableId,
        destination: Ipv4Net,
        target: &RouteTarget,
    ) -> CloudResult<()> {
        self.sim.create_route(table, destination, target).await
    }
    async fn replace_route(
        &self,
        table: &RouteTableId,
        destination: Ipv4Net,
        target: &RouteTarget,
    ) -> CloudResult<()> {
        self.sim.replace_route(table, destination, target).await
    }
    async fn delete_route(&self, table: &RouteTableId, destination: Ipv4Net) -> CloudResult<()> {
        self.sim.delete_route(table, destination).await
    }
    async fn create_network_interface(
        &self,
        request: &CreateEniRequest,
    ) -> CloudResult<NetworkInterface> {
        self.sim.create_network_interface(request).await
    }
    async fn attach_network_interface(
        &self,
        eni: &EniId,
        instance: &InstanceId,
        device_index: u32,
        delete_on_termination: bool,
    ) -> CloudResult<AttachmentId> {
        self.sim
            .attach_network_interface(eni, instance, device_index, delete_on_termination)
            .await
    }
    async fn set_delete_on_termination(
        &self,
        eni: &EniId,
        attachment: &AttachmentId,
        enabled: bool,
    ) -> CloudResult<()> {
        self.sim
            .set_delete_on_termination(eni, attachment, enabled)
            .await
    }
    async fn detach_network_interface(
        &self,
        attachment: &AttachmentId,
        force: bool,
    ) -> CloudResult<()> {
        self.sim.detach_network_interface(attachment, force).await
    }
    async fn delete_network_interface(&self, eni: &EniId) -> CloudResult<()> {
        self.sim.delete_network_interface(eni).await
    }
    async fn assign_private_ips(
        &self,
        eni: &EniId,
        request: &AddressRequest<Ipv4Addr>,
    ) -> CloudResult<Vec<Ipv4Addr>> {
        self.sim.assign_private_ips(eni, request).await
    }
    async fn unassign_private_ips(&self, eni: &EniId, addresses: &[Ipv4Addr]) -> CloudResult<()> {
        self.sim.unassign_private_ips(eni, addresses).await
    }
    async fn assign_prefixes(
        &self,
        eni: &EniId,
        request: &AddressRequest<Ipv4Net>,
    ) -> CloudResult<Vec<Ipv4Net>> {
        self.sim.assign_prefixes(eni, request).await
    }
    async fn unassign_prefixes(&self, eni: &EniId, prefixes: &[Ipv4Net]) -> CloudResult<()> {
        self.sim.unassign_prefixes(eni, prefixes).await
    }
    async fn set_source_dest_check(&self, eni: &EniId, enabled: bool) -> CloudResult<()> {
        self.sim.set_source_dest_check(eni, enabled).await
    }
    async fn create_tags(&self, resources: &[String], tags: &Tags) -> CloudResult<()> {
        self.sim.create_tags(resources, tags).await
    }
}
