//! From a [`RoutedPlan`] and the route tables as observed, the operations that make the tables match the plan.
//!
//! ```text
//!   observed tables ─┐
//!                    ├─► diff ─► [Replace…, Create… (while the limit allows), Delete…, remaining Create…]
//!   RoutedPlan ──────┘
//! ```
//!
//! Only routes [`Ownership`] proves underlay's (inside the pod CIDR **and** to an ENI of this cluster) are changed;
//! every other route (the `local` route, gateways, peering, a route that contains the pod CIDR, and inside it
//! another cluster's route, a transit gateway's, a secondary CIDR's `local`) is foreign: never touched, and no
//! operation is emitted on its destination or inside it. A planned route without a forwarder (its subnet has no
//! healthy node) is left as it is.
//!
//! Ordering is make-before-break where the table's limit allows: target changes first, then new routes (less
//! specific first, so a grown prefix exists before the route it replaces is deleted), then deletions, taking first
//! those whose blocks are already covered by another route in its final state; if the limit leaves no room, a
//! deletion makes room before the next creation. A headroom of one route (the default) keeps every single join or
//! leave make-before-break.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::owned::{Ownership, RouteOwner};
use crate::planner::RoutedPlan;

/// One change to one route table. Routes target ENIs (never instance ids: multi-ENI instances reject them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RouteOp {
    Create {
        route_table: String,
        destination: Ipv4Net,
        eni: String,
    },
    Replace {
        route_table: String,
        destination: Ipv4Net,
        eni: String,
        previous: String,
    },
    Delete {
        route_table: String,
        destination: Ipv4Net,
        previous: String,
    },
}

impl RouteOp {
    pub fn route_table(&self) -> &str {
        match self {
            RouteOp::Create { route_table, .. }
            | RouteOp::Replace { route_table, .. }
            | RouteOp::Delete { route_table, .. } => route_table,
        }
    }
    pub fn destination(&self) -> Ipv4Net {
        match self {
            RouteOp::Create { destination, .. }
            | RouteOp::Replace { destination, .. }
            | RouteOp::Delete { destination, .. } => *destination,
        }
    }
}

impl std::fmt::Display for RouteOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteOp::Create {
                route_table,
                destination,
                eni,
            } => write!(f, "{route_table}: create {destination} → {eni}"),
            RouteOp::Replace {
                route_table,
                destination,
                eni,
                previous,
            } => {
                write!(
                    f,
                    "{route_table}: replace {destination} → {eni} (was {previous})"
                )
            }
            RouteOp::Delete {
                route_table,
                destination,
                previous,
            } => {
                write!(f, "{route_table}: delete {destination} (was → {previous})")
            }
        }
    }
}

/// A route table as read from the cloud.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedTable {
    pub id: String,
    pub route_limit: u32,
    pub routes: Vec<ObservedRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedRoute {
    pub destination: Ipv4Net,
    /// ENI id, gateway id, … as the cloud reports it.
    pub target: String,
}

/// What the plan itself proves underlay's: its pod CIDR and every ENI it names (blocks and routes).
pub fn plan_ownership(plan: &RoutedPlan) -> Ownership {
    Ownership::new(
        plan.pod_cidr,
        plan.blocks
            .iter()
            .map(|b| b.eni.clone())
            .chain(plan.routes.iter().filter_map(|r| r.eni.clone())),
    )
}

/// The operations that turn every observed table into the plan's routes, owning what the plan names
/// ([`plan_ownership`]).
pub fn diff(plan: &RoutedPlan, observed: &[ObservedTable]) -> Vec<RouteOp> {
    diff_owned(plan, observed, &plan_ownership(plan))
}

/// The operations that turn every observed table into the plan's routes, changing only the routes `ownership`
/// proves underlay's. A planned destination that equals or lies inside a foreign route's is skipped: creating
/// it would take over (or steal part of) that route's traffic.
pub fn diff_owned(
    plan: &RoutedPlan,
    observed: &[ObservedTable],
    ownership: &Ownership,
) -> Vec<RouteOp> {
    let mut ops = Vec::new();
    // Desired routes; `None` target: leave whatever is there.
    let desired: BTreeMap<Ipv4Net, Option<&str>> = plan
        .routes
        .iter()
        .map(|r| (r.destination, r.eni.as_deref()))
        .collect();
    for table in observed {
        let mut current: BTreeMap<Ipv4Net, String> = BTreeMap::new();
        let mut foreign = 0u32;
        let mut taken: Vec<Ipv4Net> = Vec::new();
        for r in &table.routes {
            match ownership.classify(r.destination, &r.target) {
                RouteOwner::Ours => {
                    current.insert(r.destination, r.target.clone());
                }
                RouteOwner::Foreign => {
                    foreign += 1;
                    taken.push(r.destination);
                }
                RouteOwner::Outside => foreign += 1,
            }
        }
        let mut creates: Vec<(Ipv4Net, &str)> = Vec::new();
        for (&dest, &eni) in &desired {
            let Some(eni) = eni else { continue };
            if taken.iter().any(|t| t.contains(&dest)) {
                continue;
            }
            match current.get(&dest) {
                Some(t) if t == eni => {}
                Some(t) => {
                    ops.push(RouteOp::Replace {
                        route_table: table.id.clone(),
                        destination: dest,
                        eni: eni.to_string(),
                        previous: t.clone(),
                    });
                    current.insert(dest, eni.to_string());
                }
                None => creates.push((dest, eni)),
            }
        }
        creates.sort_by_key(|(d, _)| (d.prefix_len(), d.network()));
        let mut deletes: Vec<Ipv4Net> = current
            .keys()
            .filter(|d| !desired.contains_key(d))
            .copied()
            .collect();
        let mut creates = creates.into_iter().peekable();
        loop {
            while creates.peek().is_some() && foreign + (current.len() as u32) < table.route_limit {
                let (dest, eni) = creates.next().expect("peeked");
                ops.push(RouteOp::Create {
                    route_table: table.id.clone(),
                    destination: dest,
                    eni: eni.to_string(),
                });
                current.insert(dest, eni.to_string());
            }
            if deletes.is_empty() {
                break;
            }
            // Prefer a deletion whose blocks already reach their final route.
            let pick = deletes
                .iter()
                .position(|&d| safe_to_delete(plan, &current, d))
                .unwrap_or(0);
            let dest = deletes.remove(pick);
            let previous = current.remove(&dest).expect("observed");
            ops.push(RouteOp::Delete {
                route_table: table.id.clone(),
                destination: dest,
                previous,
            });
        }
        // Anything left exceeds the table's limit; emit it anyway so that the adapter reports the real error.
        for (dest, eni) in creates {
            ops.push(RouteOp::Create {
                route_table: table.id.clone(),
                destination: dest,
                eni: eni.to_string(),
            });
        }
    }
    ops
}

fn safe_to_delete(plan: &RoutedPlan, current: &BTreeMap<Ipv4Net, String>, dest: Ipv4Net) -> bool {
    plan.blocks
        .iter()
        .filter(|b| dest.contains(&b.block.network()))
        .all(|b| match b.route {
            Some(r) if r != dest => {
                let want = plan
                    .routes
                    .iter()
                    .find(|x| x.destination == r)
                    .and_then(|x| x.eni.as_deref());
                r.prefix_len() > dest.prefix_len() || current.get(&r).map(String::as_str) == want
            }
            _ => false,
        })
}

/// The plan as one route table would hold it (for diffing one plan against another).
pub fn observed_from_plan(plan: &RoutedPlan, table: &str) -> ObservedTable {
    ObservedTable {
        id: table.to_string(),
        route_limit: plan.route_limit.saturating_sub(plan.foreign_routes),
        routes: plan
            .routes
            .iter()
            .filter_map(|r| {
                r.eni.as_ref().map(|e| ObservedRoute {
                    destination: r.destination,
                    target: e.clone(),
                })
            })
            .collect(),
    }
}

/// VPC route changes per table between two plans.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Churn {
    pub created: u32,
    pub replaced: u32,
    pub deleted: u32,
}

impl Churn {
    pub fn total(&self) -> u32 {
        self.created + self.replaced + self.deleted
    }
}

/// The operations one route table needs to go from `prev` to `next` (the ENIs of both plans are the cluster's).
pub fn diff_plans(prev: &RoutedPlan, next: &RoutedPlan) -> Vec<RouteOp> {
    let mut table = observed_from_plan(prev, "table");
    table.route_limit = table
        .route_limit
        .max(next.route_limit.saturating_sub(next.foreign_routes));
    let mut ownership = plan_ownership(next);
    ownership
        .cluster_enis
        .extend(plan_ownership(prev).cluster_enis);
    diff_owned(next, &[table], &ownership)
}

pub fn churn(ops: &[RouteOp]) -> Churn {
    let mut c = Churn::default();
    for op in ops {
        match op {
            RouteOp::Create { .. } => c.created += 1,
            RouteOp::Replace { .. } => c.replaced += 1,
            RouteOp::Delete { .. } => c.deleted += 1,
        }
    }
    c
}
