//! `underlay inspect`: what underlay owns in a VPC, read through the same EC2 adapter (and rate-aware queue) as
//! the controller. For a person debugging a cluster: route tables against their limit with the routes underlay
//! owns, the foreign routes inside the pod CIDR (findings: underlay never changes them and plans around them), the
//! cluster's ENIs with the leaked ones (`available`, attached to nothing) marked, free addresses per subnet.
//! Read-only: only scoped Describe calls.
//!
//! Ownership as the controller decides it ([`underlay_core::owned`]): inside the pod CIDR and to an ENI of this
//! cluster. From EC2 alone, an ENI tagged `underlay.dev/cluster=<cluster>` is this cluster's, one tagged with
//! another value is another cluster's; an untagged ENI (a routed-mode node's primary ENI) is listed as owned but
//! marked `unproven`: only the controller, which knows the node set, can prove it.

use std::fmt::Write as _;

use anyhow::Context;
use ipnet::Ipv4Net;
use serde::Serialize;
use underlay_cloud::queue::QueueConfig;
use underlay_cloud::{
    Cloud, EniFilter, EniStatus, NetworkInterface, RouteState, RouteTable, RouteTarget, Subnet,
    Tags, VpcId,
};
use underlay_cloud_aws::AwsOptions;
use underlay_core::names;
use underlay_core::owned::{DEFAULT_POD_CIDR, DEFAULT_ROUTE_LIMIT, in_pod_cidr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Human,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// EC2 endpoint URL (a VPC interface endpoint, or an emulator); default: the region's public endpoint.
    #[arg(long)]
    endpoint: Option<String>,
    /// AWS region; default: the standard chain (AWS_REGION, profile, instance metadata).
    #[arg(long)]
    region: Option<String>,
    /// The cluster's VPC.
    #[arg(long)]
    vpc: String,
    /// Cluster name, as in the ENI tag underlay.dev/cluster.
    #[arg(long)]
    cluster: String,
    /// The cluster pod CIDR: routes inside it are underlay's.
    #[arg(long, default_value_t = DEFAULT_POD_CIDR)]
    pod_cidr: Ipv4Net,
    /// Routes per route table allowed in this account (EC2 does not report it).
    #[arg(long, default_value_t = DEFAULT_ROUTE_LIMIT)]
    route_limit: usize,
    /// Output: text for people, or JSON with the same data.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
}

/// Everything `inspect` prints, in both formats.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub vpc: String,
    pub cluster: String,
    pub pod_cidr: Ipv4Net,
    pub route_tables: Vec<TableReport>,
    pub enis: Vec<EniReport>,
    pub subnets: Vec<SubnetReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableReport {
    pub id: String,
    pub main: bool,
    pub subnets: Vec<String>,
    /// Routes counted against the limit (every route but the VPC's `local` ones).
    pub routes: usize,
    pub route_limit: usize,
    pub owned: Vec<OwnedRoute>,
    /// Routes inside the pod CIDR that are not this cluster's: never changed, their destinations never handed out.
    pub foreign_in_pod_cidr: Vec<ForeignRoute>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OwnedRoute {
    pub destination: Ipv4Net,
    pub target: String,
    pub blackhole: bool,
    /// The target ENI carries no cluster tag (a routed-mode node's primary ENI): only the controller can prove it.
    pub unproven: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ForeignRoute {
    pub destination: Ipv4Net,
    pub target: String,
    /// Whose it is, as far as EC2 tells: `cluster <name>`, `transit gateway`, `VPC local (secondary CIDR)`, ….
    pub owner: String,
}

/// Whose a route inside the pod CIDR is, from its target and the cluster tags of the VPC's ENIs: `Ok(unproven)`
/// when it may be this cluster's, `Err(owner)` when it is not.
fn pod_cidr_route_owner(
    target: &RouteTarget,
    cluster: &str,
    tagged: &std::collections::BTreeMap<String, String>,
) -> Result<bool, String> {
    match target {
        RouteTarget::NetworkInterface(id) => match tagged.get(id.as_str()) {
            Some(c) if c == cluster => Ok(false),
            Some(c) => Err(format!("cluster {c}")),
            None => Ok(true),
        },
        RouteTarget::Local => Err("VPC local (secondary CIDR)".to_owned()),
        RouteTarget::Instance(_) => Err("instance (underlay never targets instances)".to_owned()),
        RouteTarget::Gateway(g) => Err(match g.split('-').next() {
            Some("tgw") => "transit gateway".to_owned(),
            Some("pcx") => "peering connection".to_owned(),
            Some("igw") | Some("eigw") => "internet gateway".to_owned(),
            Some("nat") => "NAT gateway".to_owned(),
            Some("vgw") => "virtual private gateway".to_owned(),
            _ => "gateway".to_owned(),
        }),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EniReport {
    pub id: String,
    pub status: EniStatus,
    /// The underlay.dev/node tag.
    pub node: Option<String>,
    pub instance: Option<String>,
    pub device_index: Option<u32>,
    pub subnet: String,
    pub primary_ip: std::net::Ipv4Addr,
    pub secondary_ips: usize,
    pub prefixes: usize,
    /// Tagged for this cluster but attached to nothing: nobody will use or delete it but the controller's GC.
    pub leaked: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubnetReport {
    pub id: String,
    pub zone: String,
    pub cidr: Ipv4Net,
    pub free: u32,
}

fn target_name(t: &RouteTarget) -> String {
    match t {
        RouteTarget::Local => "local".to_owned(),
        RouteTarget::NetworkInterface(id) => id.to_string(),
        RouteTarget::Instance(id) => id.to_string(),
        RouteTarget::Gateway(id) => id.clone(),
    }
}

/// Build the report from what EC2 returned. Pure.
pub fn build_report(
    vpc: &str,
    cluster: &str,
    pod_cidr: Ipv4Net,
    route_limit: usize,
    tables: &[RouteTable],
    enis: &[NetworkInterface],
    subnets: &[Subnet],
) -> Report {
    // The cluster tag of every ENI `enis` holds (this cluster's and others').
    let tagged: std::collections::BTreeMap<String, String> = enis
        .iter()
        .filter_map(|e| Some((e.id.to_string(), e.tags.get(names::TAG_CLUSTER)?.clone())))
        .collect();
    let mut route_tables: Vec<TableReport> = tables
        .iter()
        .map(|t| {
            let mut owned: Vec<OwnedRoute> = Vec::new();
            let mut foreign_in_pod_cidr: Vec<ForeignRoute> = Vec::new();
            for r in t
                .routes
                .iter()
                .filter(|r| in_pod_cidr(r.destination, pod_cidr))
            {
                match pod_cidr_route_owner(&r.target, cluster, &tagged) {
                    Ok(unproven) => owned.push(OwnedRoute {
                        destination: r.destination,
                        target: target_name(&r.target),
                        blackhole: r.state == RouteState::Blackhole,
                        unproven,
                    }),
                    Err(owner) => foreign_in_pod_cidr.push(ForeignRoute {
                        destination: r.destination,
                        target: target_name(&r.target),
                        owner,
                    }),
                }
            }
            owned.sort_by_key(|r| r.destination);
            foreign_in_pod_cidr.sort_by_key(|r| r.destination);
            TableReport {
                id: t.id.to_string(),
                main: t.main,
                subnets: t.subnets.iter().map(ToString::to_string).collect(),
                routes: t
                    .routes
                    .iter()
                    .filter(|r| r.target != RouteTarget::Local)
                    .count(),
                route_limit,
                owned,
                foreign_in_pod_cidr,
            }
        })
        .collect();
    route_tables.sort_by(|a, b| b.main.cmp(&a.main).then_with(|| a.id.cmp(&b.id)));

    let mut enis: Vec<EniReport> = enis
        .iter()
        .filter(|e| e.tags.get(names::TAG_CLUSTER).map(String::as_str) == Some(cluster))
        .map(|e| EniReport {
            id: e.id.to_string(),
            status: e.status,
            node: e.tags.get(names::TAG_NODE).cloned(),
            instance: e.attachment.as_ref().map(|a| a.instance.to_string()),
            device_index: e.attachment.as_ref().map(|a| a.device_index),
            subnet: e.subnet.to_string(),
            primary_ip: e.primary_ip,
            secondary_ips: e.secondary_ips.len(),
            prefixes: e.prefixes.len(),
            leaked: e.status == EniStatus::Available,
        })
        .collect();
    enis.sort_by(|a, b| (&a.node, &a.id).cmp(&(&b.node, &b.id)));

    let mut subnets: Vec<SubnetReport> = subnets
        .iter()
        .map(|s| SubnetReport {
            id: s.id.to_string(),
            zone: s.zone.clone(),
            cidr: s.cidr,
            free: s.available_ips,
        })
        .collect();
    subnets.sort_by(|a, b| (&a.zone, a.cidr).cmp(&(&b.zone, b.cidr)));

    Report {
        vpc: vpc.to_owned(),
        cluster: cluster.to_owned(),
        pod_cidr,
        route_tables,
        enis,
        subnets,
    }
}

fn status_name(s: EniStatus) -> &'static str {
    match s {
        EniStatus::Available => "available",
        EniStatus::Attaching => "attaching",
        EniStatus::InUse => "in-use",
        EniStatus::Detaching => "detaching",
    }
}

/// The human format.
pub fn render_human(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "VPC {}  cluster {}  pod CIDR {}",
        r.vpc, r.cluster, r.pod_cidr
    );
    let _ = writeln!(out, "\nRoute tables");
    if r.route_tables.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for t in &r.route_tables {
        let mut notes = Vec::new();
        if t.main {
            notes.push("main".to_owned());
        }
        if !t.subnets.is_empty() {
            notes.push(format!("subnets {}", t.subnets.join(",")));
        }
        if t.routes >= t.route_limit {
            notes.push("FULL".to_owned());
        }
        let _ = writeln!(
            out,
            "  {} {}/{} routes ({} owned){}",
            t.id,
            t.routes,
            t.route_limit,
            t.owned.len(),
            if notes.is_empty() {
                String::new()
            } else {
                format!("  [{}]", notes.join("; "))
            }
        );
        for o in &t.owned {
            let _ = writeln!(
                out,
                "    {:<18} -> {}{}{}",
                o.destination.to_string(),
                o.target,
                if o.blackhole { "  BLACKHOLE" } else { "" },
                if o.unproven {
                    "  (untagged ENI: a node's?)"
                } else {
                    ""
                }
            );
        }
        for f in &t.foreign_in_pod_cidr {
            let _ = writeln!(
                out,
                "    {:<18} -> {}  FOREIGN ({}): inside the pod CIDR, never changed, its destination never handed out",
                f.destination.to_string(),
                f.target,
                f.owner
            );
        }
    }
    let _ = writeln!(out, "\nENIs tagged {}={}", names::TAG_CLUSTER, r.cluster);
    if r.enis.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for e in &r.enis {
        let _ = writeln!(
            out,
            "  {} {:<9} node={} {} {} {} +{} ips +{} prefixes{}",
            e.id,
            status_name(e.status),
            e.node.as_deref().unwrap_or("-"),
            match (&e.instance, e.device_index) {
                (Some(i), Some(d)) => format!("{i}#{d}"),
                _ => "-".to_owned(),
            },
            e.subnet,
            e.primary_ip,
            e.secondary_ips,
            e.prefixes,
            if e.leaked { "  LEAKED" } else { "" }
        );
    }
    let leaked = r.enis.iter().filter(|e| e.leaked).count();
    if leaked > 0 {
        let _ = writeln!(
            out,
            "  {leaked} leaked ENI(s): available and tagged for this cluster"
        );
    }
    let _ = writeln!(out, "\nSubnets");
    for s in &r.subnets {
        let _ = writeln!(
            out,
            "  {} {} {:<18} {} free",
            s.id,
            s.zone,
            s.cidr.to_string(),
            s.free
        );
    }
    out
}

/// Read the VPC through the adapter and its queue.
pub async fn inspect(cloud: &dyn Cloud, args: &Args) -> anyhow::Result<Report> {
    let vpc = VpcId::new(&args.vpc);
    // Fail early and clearly on a wrong VPC id.
    cloud
        .describe_vpc(&vpc)
        .await
        .with_context(|| format!("describing {vpc}"))?;
    let tables = cloud
        .describe_route_tables(&vpc)
        .await
        .context("describing route tables")?;
    // Every ENI of the VPC with a cluster tag (any value): this cluster's, and others' to name their routes.
    let enis = cloud
        .describe_network_interfaces(&EniFilter {
            vpc: Some(vpc.clone()),
            tags: Tags::from([(names::TAG_CLUSTER.to_owned(), String::new())]),
            ..EniFilter::default()
        })
        .await
        .context("describing the network interfaces tagged with a cluster")?;
    let subnets = cloud
        .describe_subnets(&vpc)
        .await
        .context("describing subnets")?;
    Ok(build_report(
        &args.vpc,
        &args.cluster,
        args.pod_cidr,
        args.route_limit,
        &tables,
        &enis,
        &subnets,
    ))
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(async {
        let options = AwsOptions {
            region: args.region.clone(),
            endpoint: args.endpoint.clone(),
            ..AwsOptions::default()
        };
        let cloud = underlay_cloud_aws::connect(&options, QueueConfig::default()).await?;
        inspect(&cloud, &args).await
    })?;
    match args.format {
        Format::Human => print!("{}", render_human(&report)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use underlay_cloud::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn mk_eni(id: &str, cluster: &str, node: &str, status: EniStatus) -> NetworkInterface {
        NetworkInterface {
            id: EniId::new(id),
            vpc: VpcId::new("vpc-1"),
            subnet: SubnetId::new("subnet-a"),
            zone: "us-east-1a".into(),
            mac: "02:00:00:00:00:01".into(),
            primary_ip: "198.18.0.10".parse().unwrap(),
            secondary_ips: vec!["198.18.0.11".parse().unwrap()],
            prefixes: vec![],
            status,
            attachment: (status == EniStatus::InUse).then(|| Attachment {
                id: AttachmentId::new("eni-attach-1"),
                instance: InstanceId::new("i-1"),
                device_index: 1,
                delete_on_termination: true,
            }),
            source_dest_check: false,
            security_groups: vec![],
            description: String::new(),
            tags: Tags::from([
                (names::TAG_CLUSTER.to_owned(), cluster.to_owned()),
                (names::TAG_NODE.to_owned(), node.to_owned()),
            ]),
        }
    }

    fn route(dest: &str, target: RouteTarget) -> Route {
        Route {
            destination: net(dest),
            target,
            state: RouteState::Active,
        }
    }

    #[test]
    fn report_counts_owned_routes_and_marks_leaked_enis() {
        let eni = RouteTarget::NetworkInterface(EniId::new("eni-a"));
        let table = RouteTable {
            id: RouteTableId::new("rtb-1"),
            vpc: VpcId::new("vpc-1"),
            main: true,
            subnets: vec![],
            routes: vec![
                route("198.18.0.0/16", RouteTarget::Local),
                route("0.0.0.0/0", RouteTarget::Gateway("igw-1".into())),
                route("100.64.1.0/24", eni.clone()),
                route("100.64.0.0/24", eni.clone()),
                route("10.0.0.0/8", eni.clone()),
                // Foreign inside the pod CIDR: another cluster's ENI, a transit gateway, a secondary CIDR.
                route(
                    "100.65.0.0/24",
                    RouteTarget::NetworkInterface(EniId::new("eni-c")),
                ),
                route("100.66.0.0/16", RouteTarget::Gateway("tgw-0abc".into())),
                route("100.100.0.0/16", RouteTarget::Local),
                // An untagged ENI (a routed-mode node's): owned, unproven.
                route(
                    "100.64.2.0/24",
                    RouteTarget::NetworkInterface(EniId::new("eni-node")),
                ),
            ],
            tags: Tags::new(),
        };
        let enis = [
            mk_eni("eni-a", "c1", "n1", EniStatus::InUse),
            mk_eni("eni-b", "c1", "n2", EniStatus::Available),
            mk_eni("eni-c", "other", "n3", EniStatus::Available),
        ];
        let r = build_report("vpc-1", "c1", DEFAULT_POD_CIDR, 50, &[table], &enis, &[]);
        let t = &r.route_tables[0];
        assert_eq!((t.routes, t.route_limit, t.owned.len()), (7, 50, 3));
        assert_eq!(t.owned[0].destination, net("100.64.0.0/24"));
        assert_eq!(t.owned[0].target, "eni-a");
        assert!(!t.owned[0].unproven && t.owned[2].unproven);
        let foreign: Vec<(String, &str)> = t
            .foreign_in_pod_cidr
            .iter()
            .map(|f| (f.destination.to_string(), f.owner.as_str()))
            .collect();
        assert_eq!(
            foreign,
            [
                ("100.65.0.0/24".to_string(), "cluster other"),
                ("100.66.0.0/16".to_string(), "transit gateway"),
                ("100.100.0.0/16".to_string(), "VPC local (secondary CIDR)"),
            ]
        );
        assert_eq!(r.enis.len(), 2, "another cluster's ENI is not shown");
        assert!(!r.enis[0].leaked && r.enis[1].leaked);

        let human = render_human(&r);
        assert!(
            human.contains("rtb-1 7/50 routes (3 owned)  [main]"),
            "{human}"
        );
        assert!(human.contains("100.64.0.0/24      -> eni-a\n"), "{human}");
        assert!(!human.contains("10.0.0.0/8"));
        assert!(
            human.contains("100.66.0.0/16      -> tgw-0abc  FOREIGN (transit gateway)"),
            "{human}"
        );
        assert!(human.contains("eni-b available node=n2"), "{human}");
        assert_eq!(human.matches("LEAKED").count(), 1);
    }

    #[tokio::test]
    async fn a_600_route_table_is_read_whole_across_pages() {
        use underlay_vpcsim::VpcSim;
        let sim = VpcSim::builder(1).rate_limits(None).page_size(5).build();
        let vpc = sim.create_vpc(net("198.18.0.0/16"), Tags::new()).unwrap();
        let big = sim.create_route_table(&vpc, Tags::new()).unwrap();
        sim.set_route_limit(&big, 1_000).unwrap();
        for _ in 0..12 {
            sim.create_route_table(&vpc, Tags::new()).unwrap();
        }
        let igw = sim.create_internet_gateway(&vpc).unwrap();
        let subnet = sim
            .create_subnet(&vpc, "us-east-1a", net("198.18.0.0/20"))
            .unwrap();
        let node = sim
            .run_instance(underlay_vpcsim::RunInstance::new("m5.large", &subnet))
            .unwrap();
        let eni = RouteTarget::NetworkInterface(node.primary_eni().unwrap().id.clone());
        // 550 foreign routes and 50 of the pod CIDR.
        for i in 0..600u32 {
            let (base, target) = if i < 550 {
                (0xAC10_0000u32, RouteTarget::Gateway(igw.clone()))
            } else {
                (0x6440_0000u32, eni.clone())
            };
            let dst = Ipv4Net::new(std::net::Ipv4Addr::from(base + (i << 6)), 26).unwrap();
            sim.add_route(&big, dst, &target).unwrap();
        }
        let args = Args {
            endpoint: None,
            region: None,
            vpc: vpc.to_string(),
            cluster: "c1".into(),
            pod_cidr: DEFAULT_POD_CIDR,
            route_limit: DEFAULT_ROUTE_LIMIT,
            format: Format::Human,
        };
        let r = inspect(&sim, &args).await.unwrap();
        assert_eq!(r.route_tables.len(), 14, "every table, over several pages");
        let t = r
            .route_tables
            .iter()
            .find(|t| t.id == big.to_string())
            .unwrap();
        assert_eq!((t.routes, t.owned.len()), (600, 50));
        assert!(render_human(&r).contains("600/500 routes"));
    }
}
