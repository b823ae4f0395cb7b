//! `underlay plan`: the routed-mode route plan for a topology file or a synthetic cluster, as a table for people,
//! JSON for machines or a Graphviz picture. `--fail NODE…` shows the plan after those nodes fail and what moved.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, bail};
use ipnet::Ipv4Net;
use serde::Serialize;
use underlay_core::planner::{self, PlanMode, RoutedPlan};
use underlay_core::routeops::{self, RouteOp};
use underlay_core::topology::{DEFAULT_ROUTE_LIMIT, SynthSpec, Topology, synthesise};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Dot,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Topology file (YAML; see examples/topology.yaml). Without it, a cluster is synthesised from the flags below.
    #[arg(long, conflicts_with_all = ["nodes", "zones", "subnets_per_zone", "route_limit", "foreign_routes"])]
    pub topology: Option<PathBuf>,
    /// Synthetic cluster: number of nodes, dealt round-robin over the subnets.
    #[arg(long, required_unless_present = "topology")]
    pub nodes: Option<usize>,
    /// Synthetic cluster: availability zones (one route table each).
    #[arg(long)]
    pub zones: Option<usize>,
    /// Synthetic cluster: subnets per zone.
    #[arg(long)]
    pub subnets_per_zone: Option<usize>,
    /// Synthetic cluster: route limit of every route table (AWS default 500, adjustable to 1,000).
    #[arg(long)]
    pub route_limit: Option<u32>,
    /// Synthetic cluster: foreign routes per table (the first is a default route to the zone's NAT gateway).
    #[arg(long)]
    pub foreign_routes: Option<u32>,
    /// Routes kept free in every table for make-before-break changes (overrides the topology file).
    #[arg(long)]
    pub headroom: Option<u32>,
    /// Cluster pod CIDR (overrides the topology file; default for synthetic clusters 100.64.0.0/10).
    #[arg(long)]
    pub pod_cidr: Option<Ipv4Net>,
    /// Node block prefix length (overrides the topology file; default 26).
    #[arg(long)]
    pub block_size: Option<u8>,
    /// A previous plan (`--format json` output) to plan from: blocks stay where they are.
    #[arg(long)]
    pub previous: Option<PathBuf>,
    /// Mark these nodes unhealthy and show the plan after failover next to the routes that moved.
    #[arg(long, num_args = 1.., value_name = "NODE")]
    pub fail: Vec<String>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// A few lines instead of the full table.
    #[arg(long)]
    pub summary: bool,
    /// List every node's block in the table (shown by default up to 100 nodes).
    #[arg(long)]
    pub blocks: bool,
}

/// What `--format json` prints: the plan, plus the failover when `--fail` is given.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    #[serde(flatten)]
    pub plan: &'a RoutedPlan,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<Failover>,
}

#[derive(Debug, Serialize)]
pub struct Failover {
    pub failed: Vec<String>,
    /// Route operations per managed table, from the plan before the failure to the plan after it.
    pub moved: Vec<RouteOp>,
    pub before_max_nodes_per_forwarder: u32,
}

pub fn load_topology(args: &Args) -> anyhow::Result<Topology> {
    let mut topo = match &args.topology {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_yaml::from_str::<Topology>(&text)
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => {
            let nodes = args.nodes.context("--nodes or --topology is required")?;
            let mut spec = SynthSpec::new(
                nodes,
                args.zones.unwrap_or(3),
                args.subnets_per_zone.unwrap_or(2),
                args.route_limit.unwrap_or(DEFAULT_ROUTE_LIMIT),
            );
            if let Some(f) = args.foreign_routes {
                spec.foreign_routes = f;
            }
            if let Some(c) = args.pod_cidr {
                spec.pod_cidr = c;
            }
            synthesise(&spec)?
        }
    };
    if let Some(h) = args.headroom {
        topo.cluster.headroom = h;
    }
    if let Some(c) = args.pod_cidr {
        topo.cluster.pod_cidr = c;
    }
    if let Some(b) = args.block_size {
        topo.cluster.block_prefix_len = b;
    }
    Ok(topo)
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let topo = load_topology(&args)?;
    let previous: Option<RoutedPlan> = match &args.previous {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("parsing plan {}", path.display()))?,
            )
        }
        None => None,
    };
    let before = planner::plan(&topo, previous.as_ref())?;
    let (shown, failover) = if args.fail.is_empty() {
        (before.clone(), None)
    } else {
        let mut failed_topo = topo.clone();
        for id in &args.fail {
            let Some(n) = failed_topo.nodes.iter_mut().find(|n| &n.id == id) else {
                bail!("--fail {id}: no such node in the topology");
            };
            n.healthy = false;
        }
        let after = planner::plan(&failed_topo, Some(&before))?;
        let tables: Vec<_> = topo
            .vpc
            .route_tables
            .iter()
            .map(|t| {
                let mut o = routeops::observed_from_plan(&before, &t.id);
                o.route_limit = t.route_limit.saturating_sub(t.foreign_routes.len() as u32);
                o
            })
            .collect();
        let moved = routeops::diff(&after, &tables);
        let f = Failover {
            failed: args.fail.clone(),
            moved,
            before_max_nodes_per_forwarder: before.max_nodes_per_forwarder,
        };
        (after, Some(f))
    };
    let out = match args.format {
        Format::Json => {
            serde_json::to_string_pretty(&Report {
                plan: &shown,
                failover,
            })? + "\n"
        }
        Format::Dot => dot(&shown),
        Format::Table if args.summary => summary(&topo, &shown, failover.as_ref()),
        Format::Table => table(
            &topo,
            &shown,
            failover.as_ref(),
            args.blocks || shown.nodes <= 100,
        ),
    };
    print!("{out}");
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn zones(plan: &RoutedPlan) -> usize {
    let mut z: Vec<&str> = plan
        .subnets
        .iter()
        .filter(|s| s.nodes > 0)
        .map(|s| s.zone.as_str())
        .collect();
    z.dedup();
    z.len()
}

pub fn summary(_topo: &Topology, plan: &RoutedPlan, failover: Option<&Failover>) -> String {
    let mut s = String::new();
    let active = plan.subnets.iter().filter(|s| s.nodes > 0).count();
    let _ = writeln!(
        s,
        "{} nodes in {} subnets over {} zones, pod CIDR {} in /{} blocks",
        plan.nodes,
        active,
        zones(plan),
        plan.pod_cidr,
        plan.block_prefix_len
    );
    let _ = writeln!(
        s,
        "{} routes per table of a budget of {} (limit {} − {} foreign − headroom {}), {}",
        plan.routes_per_table,
        plan.budget,
        plan.route_limit,
        plan.foreign_routes,
        plan.headroom,
        match plan.mode {
            PlanMode::PerNode => "one route per node",
            PlanMode::Aggregated => "aggregated",
        }
    );
    let _ = writeln!(
        s,
        "{} forwarders, at most {} nodes per forwarder, extra hop for {} of nodes",
        plan.forwarders,
        plan.max_nodes_per_forwarder,
        pct(plan.extra_hop_fraction)
    );
    if let Some(f) = failover {
        let c = routeops::churn(&f.moved);
        let _ = writeln!(
            s,
            "after failing {}: {} route operations ({} replaced, {} created, {} deleted) across all tables",
            f.failed.join(", "),
            c.total(),
            c.replaced,
            c.created,
            c.deleted
        );
    }
    for w in &plan.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    s
}

/// Left-aligned columns with a header row.
fn columns(rows: &[Vec<String>], right: &[usize]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            let pad = widths[i] - c.chars().count();
            if right.contains(&i) {
                line.push_str(&" ".repeat(pad));
                line.push_str(c);
            } else {
                line.push_str(c);
                line.push_str(&" ".repeat(pad));
            }
            line.push_str("  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn table(
    topo: &Topology,
    plan: &RoutedPlan,
    failover: Option<&Failover>,
    show_blocks: bool,
) -> String {
    let mut s = summary(topo, plan, None);
    s.push('\n');
    let mut rows = vec![vec![
        "ROUTE TABLE".into(),
        "LIMIT".into(),
        "FOREIGN".into(),
        "UNDERLAY".into(),
        "FREE".into(),
    ]];
    for t in &plan.route_tables {
        rows.push(vec![
            t.id.clone(),
            t.route_limit.to_string(),
            t.foreign_routes.to_string(),
            t.underlay_routes.to_string(),
            t.free.to_string(),
        ]);
    }
    s.push_str(&columns(&rows, &[1, 2, 3, 4]));
    s.push('\n');
    let mut rows = vec![
        [
            "ZONE",
            "SUBNET",
            "REGION",
            "TABLE",
            "NODES",
            "HEALTHY",
            "ROUTES",
            "FWDS",
            "MAX/FWD",
            "⌈N/R⌉",
            "EXTRA-HOP",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for sp in plan.subnets.iter().filter(|s| s.nodes > 0) {
        rows.push(vec![
            sp.zone.clone(),
            sp.id.clone(),
            sp.region.map_or("-".into(), |r| r.to_string()),
            sp.route_table.clone().unwrap_or_else(|| "-".into()),
            sp.nodes.to_string(),
            sp.healthy_nodes.to_string(),
            sp.routes.to_string(),
            sp.forwarders.to_string(),
            sp.max_nodes_per_forwarder.to_string(),
            sp.balanced_bound.to_string(),
            sp.extra_hop_nodes.to_string(),
        ]);
    }
    s.push_str(&columns(&rows, &[4, 5, 6, 7, 8, 9, 10]));
    s.push('\n');
    let mut rows = vec![
        [
            "DESTINATION",
            "SUBNET",
            "FORWARDER",
            "ENI",
            "NODES",
            "OWN BLOCK INSIDE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in &plan.routes {
        rows.push(vec![
            r.destination.to_string(),
            r.subnet.clone(),
            r.forwarder
                .clone()
                .unwrap_or_else(|| "(none: no healthy node)".into()),
            r.eni.clone().unwrap_or_else(|| "-".into()),
            r.nodes.to_string(),
            if r.forwarder_inside {
                "yes".into()
            } else {
                "no".into()
            },
        ]);
    }
    s.push_str(&columns(&rows, &[4]));
    if show_blocks {
        s.push('\n');
        let mut rows = vec![
            ["NODE", "SUBNET", "IP", "HEALTHY", "BLOCK", "ROUTE", "VIA"]
                .map(String::from)
                .to_vec(),
        ];
        for b in &plan.blocks {
            rows.push(vec![
                b.node.clone(),
                b.subnet.clone(),
                b.node_ip.to_string(),
                if b.healthy { "yes".into() } else { "NO".into() },
                b.block.to_string(),
                b.route.map_or("-".into(), |r| r.to_string()),
                match (&b.via, b.extra_hop) {
                    (Some(v), true) => v.clone(),
                    (Some(_), false) => "(direct)".into(),
                    (None, _) => "-".into(),
                },
            ]);
        }
        s.push_str(&columns(&rows, &[]));
    }
    if let Some(f) = failover {
        s.push('\n');
        let c = routeops::churn(&f.moved);
        let _ = writeln!(
            s,
            "failover after {} turned unhealthy: {} operations ({} replaced, {} created, {} deleted); busiest \
             forwarder {} → {} nodes",
            f.failed.join(", "),
            c.total(),
            c.replaced,
            c.created,
            c.deleted,
            f.before_max_nodes_per_forwarder,
            plan.max_nodes_per_forwarder
        );
        let mut rows = vec![
            ["TABLE", "OPERATION", "DESTINATION", "TARGET", "WAS"]
                .map(String::from)
                .to_vec(),
        ];
        let eni_node: BTreeMap<&str, &str> = topo
            .nodes
            .iter()
            .map(|n| (n.eni.as_str(), n.id.as_str()))
            .collect();
        let who = |eni: &str| {
            eni_node
                .get(eni)
                .map_or(eni.to_string(), |n| format!("{n} ({eni})"))
        };
        for op in &f.moved {
            rows.push(match op {
                RouteOp::Create {
                    route_table,
                    destination,
                    eni,
                } => {
                    vec![
                        route_table.clone(),
                        "create".into(),
                        destination.to_string(),
                        who(eni),
                        "-".into(),
                    ]
                }
                RouteOp::Replace {
                    route_table,
                    destination,
                    eni,
                    previous,
                } => {
                    vec![
                        route_table.clone(),
                        "replace".into(),
                        destination.to_string(),
                        who(eni),
                        who(previous),
                    ]
                }
                RouteOp::Delete {
                    route_table,
                    destination,
                    previous,
                } => {
                    vec![
                        route_table.clone(),
                        "delete".into(),
                        destination.to_string(),
                        "-".into(),
                        who(previous),
                    ]
                }
            });
        }
        s.push_str(&columns(&rows, &[]));
    }
    s
}

fn dot_id(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\\\""))
}

/// Zones hold subnets, subnets hold forwarders (and a count of the other nodes); the route tables point at every
/// route, and every route at its forwarder.
pub fn dot(plan: &RoutedPlan) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "digraph underlay {{");
    let _ = writeln!(s, "  rankdir=LR; compound=true; fontname=\"Helvetica\";");
    let _ = writeln!(
        s,
        "  node [fontname=\"Helvetica\", fontsize=10]; edge [fontname=\"Helvetica\", fontsize=9];"
    );
    let tables: Vec<&str> = plan.route_tables.iter().map(|t| t.id.as_str()).collect();
    let _ = writeln!(
        s,
        "  tables [shape=cylinder, label=\"route tables\\n{}\\n{} of {} routes (limit {})\"];",
        tables.join(", "),
        plan.routes_per_table,
        plan.budget,
        plan.route_limit
    );
    let mut forwarders: BTreeMap<&str, u32> = BTreeMap::new();
    for r in &plan.routes {
        if let Some(f) = &r.forwarder {
            *forwarders.entry(f.as_str()).or_insert(0) += r.nodes;
        }
    }
    let mut by_zone: BTreeMap<&str, Vec<&planner::SubnetPlan>> = BTreeMap::new();
    for sp in plan.subnets.iter().filter(|s| s.nodes > 0) {
        by_zone.entry(sp.zone.as_str()).or_default().push(sp);
    }
    for (zi, (zone, subnets)) in by_zone.iter().enumerate() {
        let _ = writeln!(
            s,
            "  subgraph cluster_z{zi} {{ label={}; style=rounded;",
            dot_id(zone)
        );
        for sp in subnets {
            let _ = writeln!(
                s,
                "    subgraph {} {{ label=\"{}\\nregion {}\\n{} nodes, {} routes, ≤{} per forwarder\"; style=filled; \
                 fillcolor=\"#f2f2f2\";",
                dot_id(&format!("cluster_{}", sp.id)),
                sp.id,
                sp.region.map_or("-".into(), |r| r.to_string()),
                sp.nodes,
                sp.routes,
                sp.max_nodes_per_forwarder
            );
            let in_subnet: Vec<&planner::BlockAssignment> = plan
                .blocks
                .iter()
                .filter(|b| b.subnet == sp.id && forwarders.contains_key(b.node.as_str()))
                .collect();
            for b in &in_subnet {
                let _ = writeln!(
                    s,
                    "      {} [shape=box, label=\"{}\\n{}\\ncarries {}\"];",
                    dot_id(&b.node),
                    b.node,
                    b.node_ip,
                    forwarders[b.node.as_str()]
                );
            }
            let others = sp.nodes as usize - in_subnet.len();
            if others > 0 {
                let _ = writeln!(
                    s,
                    "      {} [shape=note, style=dashed, label=\"{} other nodes\\n({} unhealthy)\"];",
                    dot_id(&format!("{}-others", sp.id)),
                    others,
                    sp.nodes - sp.healthy_nodes
                );
            }
            let _ = writeln!(s, "    }}");
        }
        let _ = writeln!(s, "  }}");
    }
    for r in &plan.routes {
        let rid = dot_id(&format!("route {}", r.destination));
        let _ = writeln!(
            s,
            "  {rid} [shape=ellipse, label=\"{}\\n{} nodes\"];",
            r.destination, r.nodes
        );
        let _ = writeln!(s, "  tables -> {rid};");
        match &r.forwarder {
            Some(f) => {
                let _ = writeln!(
                    s,
                    "  {rid} -> {} [label={}];",
                    dot_id(f),
                    dot_id(r.eni.as_deref().unwrap_or(""))
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "  {rid} -> {} [style=dotted, color=red, label=\"no healthy node\"];",
                    dot_id(&format!("{}-others", r.subnet))
                );
            }
        }
    }
    let _ = writeln!(s, "}}");
    s
}
