//! The reports `lab status` and `lab demo` print (human text, or JSON with `--format json`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::Lab;
use super::check::CheckReport;
use super::churn::ChurnReport;
use super::failover::FailoverReport;

/// `lab status`: the lab's shape and the VPC's route tables.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub lab: String,
    /// `routed` or `eni`.
    pub mode: String,
    pub instance_type: String,
    /// ENIs attached to the lab's nodes, and those of them whose source/dest check is off (eni mode keeps it on
    /// everywhere; routed mode turns it off on every node's primary ENI).
    pub enis: usize,
    pub source_dest_check_off: Vec<String>,
    pub nodes: usize,
    pub pods: usize,
    /// Node names, in launch order.
    pub node_names: Vec<String>,
    pub subnets: usize,
    pub route_limit: usize,
    pub routes_per_table: BTreeMap<String, usize>,
    /// Nodes that forward for at least one other node's block.
    pub forwarders: usize,
    /// Milliseconds from each node's Node object to its taint's removal: p50 and max.
    pub ready_ms_p50: f64,
    pub ready_ms_max: f64,
    /// Seconds each build step took.
    pub build_s: BTreeMap<String, f64>,
    pub api_calls: BTreeMap<String, u64>,
    pub throttled: u64,
}

impl Lab {
    pub fn status(&self) -> StatusReport {
        let mut ready: Vec<f64> = self
            .nodes
            .iter()
            .filter_map(|n| n.ready_after.map(|d| d.as_secs_f64() * 1e3))
            .collect();
        ready.sort_by(f64::total_cmp);
        let snap = self.sim.snapshot();
        let targets: std::collections::BTreeSet<String> = snap
            .route_tables
            .iter()
            .flat_map(|t| t.routes.iter())
            .filter(|r| super::POD_CIDR.contains(&r.destination))
            .filter_map(|r| match &r.target {
                underlay_cloud::RouteTarget::NetworkInterface(e) => Some(e.to_string()),
                _ => None,
            })
            .collect();
        let forwarders = self
            .nodes
            .iter()
            .filter(|n| {
                n.instance
                    .primary_eni()
                    .is_some_and(|e| targets.contains(e.id.as_str()))
            })
            .count();
        let node_instances: std::collections::BTreeSet<&str> =
            self.nodes.iter().map(|n| n.instance.id.as_str()).collect();
        let node_enis: Vec<_> = snap
            .enis
            .iter()
            .filter(|e| {
                e.attachment
                    .as_ref()
                    .is_some_and(|a| node_instances.contains(a.instance.as_str()))
            })
            .collect();
        StatusReport {
            lab: self.config.name.clone(),
            mode: match self.config.mode {
                underlay_api::Mode::Routed => "routed".into(),
                underlay_api::Mode::Eni => "eni".into(),
            },
            instance_type: self.config.instance_type.clone(),
            enis: node_enis.len(),
            source_dest_check_off: node_enis
                .iter()
                .filter(|e| !e.source_dest_check)
                .map(|e| e.id.to_string())
                .collect(),
            nodes: self.nodes.len(),
            pods: self.pods.len(),
            node_names: self.nodes.iter().map(|n| n.name.clone()).collect(),
            subnets: self.subnets.len(),
            route_limit: self.config.route_limit,
            routes_per_table: self.routes_per_table(),
            forwarders,
            ready_ms_p50: ready.get(ready.len() / 2).copied().unwrap_or(0.0),
            ready_ms_max: ready.last().copied().unwrap_or(0.0),
            build_s: self
                .build_steps
                .iter()
                .map(|(k, d)| (k.clone(), d.as_secs_f64()))
                .collect(),
            api_calls: self.api_calls(),
            throttled: self.sim.counters().total_throttled(),
        }
    }
}

/// `lab demo`: everything, with the fields a reader compares against kubenet and amazon-vpc-cni.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub passed: bool,
    pub nodes: usize,
    pub pods: usize,
    pub route_limit: usize,
    pub routes_per_table: BTreeMap<String, usize>,
    pub routes_within_limit: bool,
    pub pairs_checked: usize,
    pub pairs_ok: usize,
    pub latency_us: BTreeMap<&'static str, f64>,
    pub failover_blackhole_ms: Option<f64>,
    pub api_calls: BTreeMap<String, u64>,
    pub status: StatusReport,
    pub check: CheckReport,
    pub failover: Option<FailoverReport>,
    /// Eni mode: a burst of pods grows the pools, then leaves and the pools shrink back.
    pub churn: Option<ChurnReport>,
    /// Why it failed, when it did.
    pub failures: Vec<String>,
}

impl DemoReport {
    pub fn new(
        status: StatusReport,
        check: CheckReport,
        failover: Option<FailoverReport>,
        churn: Option<ChurnReport>,
    ) -> Self {
        let within = status
            .routes_per_table
            .values()
            .all(|n| *n <= status.route_limit);
        let mut failures = Vec::new();
        if !within {
            failures.push("a route table exceeds its limit".to_string());
        }
        if status.mode == "eni" && !status.source_dest_check_off.is_empty() {
            failures.push(format!(
                "eni mode: source/dest check off on {}",
                status.source_dest_check_off.join(", ")
            ));
        }
        if check.pairs_ok != check.pairs_checked || check.pairs_checked == 0 {
            failures.push(format!(
                "{} of {} pairs unreachable",
                check.pairs_checked - check.pairs_ok,
                check.pairs_checked
            ));
        }
        if !check.encap_devices.is_empty() {
            failures.push(format!(
                "encapsulation devices: {}",
                check.encap_devices.join(", ")
            ));
        }
        match &failover {
            Some(f) if !f.passed() => failures.push(format!(
                "failover: blackhole {:.0} ms, {} route(s) moved, only its routes {}, fail-back {:?} ms after a {:.0} ms hold-down",
                f.blackhole_ms,
                f.routes_moved.len(),
                f.only_its_routes_moved,
                f.failback_ms,
                f.hold_down_ms
            )),
            _ => {}
        }
        match &churn {
            Some(c) if !c.passed() => failures.push(format!(
                "churn: pools {} → {} → {} addresses (EC2 {} after), settled {:?} ms, {} staying pod(s) unassigned, {}/{} pairs",
                c.pool_before,
                c.pool_peak,
                c.pool_after,
                c.assigned_after,
                c.settle_ms,
                c.kept_pods_unassigned.len(),
                c.check.pairs_ok,
                c.check.pairs_checked
            )),
            _ => {}
        }
        DemoReport {
            passed: failures.is_empty(),
            nodes: status.nodes,
            pods: status.pods,
            route_limit: status.route_limit,
            routes_per_table: status.routes_per_table.clone(),
            routes_within_limit: within,
            pairs_checked: check.pairs_checked,
            pairs_ok: check.pairs_ok,
            latency_us: check.latency_us.clone(),
            failover_blackhole_ms: failover.as_ref().map(|f| f.blackhole_ms),
            api_calls: status.api_calls.clone(),
            status,
            check,
            failover,
            churn,
            failures,
        }
    }

    /// The human report: the status, the check and the failover, then the verdict.
    pub fn human(&self) -> String {
        let mut s = self.status.human();
        s.push_str(&self.check.human());
        if let Some(f) = &self.failover {
            s.push_str(&f.human());
        }
        if let Some(c) = &self.churn {
            s.push_str(&c.human());
        }
        let _ = writeln!(s, "{}", if self.passed { "PASS" } else { "FAIL" });
        for f in &self.failures {
            let _ = writeln!(s, "  {f}");
        }
        s
    }
}

impl StatusReport {
    /// `lab status` for a person.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "underlay lab {} ({} mode, {}): {} nodes, {} pods, {} subnets in {} tables",
            self.lab,
            self.mode,
            self.instance_type,
            self.nodes,
            self.pods,
            self.subnets,
            self.routes_per_table.len()
        );
        let _ = writeln!(
            s,
            "  {} node ENIs, source/dest check off on {}",
            self.enis,
            if self.source_dest_check_off.is_empty() {
                "none".to_string()
            } else {
                self.source_dest_check_off.len().to_string()
            }
        );
        let counts: Vec<String> = self
            .routes_per_table
            .values()
            .map(|n| n.to_string())
            .collect();
        let _ = writeln!(
            s,
            "  routes per table: {} (limit {}, {} forwarders)",
            counts.join(" "),
            self.route_limit,
            self.forwarders
        );
        let _ = writeln!(
            s,
            "  nodes ready (taint removed): p50 {:.0} ms, max {:.0} ms after their Node appeared",
            self.ready_ms_p50, self.ready_ms_max
        );
        let calls: Vec<String> = self
            .api_calls
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            s,
            "  EC2 calls: {} (throttled {})",
            calls.join(", "),
            self.throttled
        );
        s
    }
}

impl CheckReport {
    /// `lab check` for a person: reachability and latency per path class, and the encapsulation check.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "  connectivity: {}/{} pairs{}",
            self.pairs_ok,
            self.pairs_checked,
            if self.sampled { " (sampled)" } else { "" }
        );
        for (class, r) in &self.classes {
            let _ = writeln!(
                s,
                "    {:<24} {:>6}/{:<6} p50 {:>7.1} µs  p99 {:>7.1} µs",
                class, r.ok, r.pairs, r.p50_us, r.p99_us
            );
            for f in &r.failed {
                let _ = writeln!(s, "      unreachable: {f}");
            }
        }
        if let Some(r) = self.direct_vs_node_ratio {
            let _ = writeln!(
                s,
                "  pod↔pod same-subnet / node↔node same-subnet latency: {r:.2}×"
            );
        }
        let _ = writeln!(
            s,
            "  encapsulation devices in {} namespaces: {}",
            self.namespaces_inspected,
            if self.encap_devices.is_empty() {
                "none".to_string()
            } else {
                self.encap_devices.join(", ")
            }
        );
        s
    }
}

impl FailoverReport {
    /// `lab failover` for a person.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "  failover of {} ({} → {}): blackhole {:.0} ms ({} of {} probes lost), {} route(s) moved, only its own: {}",
            self.forwarder,
            self.probe_from,
            self.probe_to,
            self.blackhole_ms,
            self.probes_lost,
            self.probes_sent,
            self.routes_moved.len(),
            self.only_its_routes_moved
        );
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} ms"));
        let _ = writeln!(
            s,
            "  blackhole bar ≤ {:.0} ms: {}; from the kill: failure confirmed {}, ReplaceRoute answered {}, \
             in the fabric {}, first reply {} (probe every {:.0} ms; AWS-like route latency {})",
            self.blackhole_bar_ms,
            if self.within_bar() { "met" } else { "NOT met" },
            ms(self.stages.confirmed_ms),
            ms(self.stages.replaced_ms),
            ms(self.stages.effective_ms),
            ms(self.stages.first_reply_ms),
            self.stages.probe_every_ms,
            if self.aws_route_latency { "on" } else { "off" }
        );
        let _ = writeln!(
            s,
            "  fail-back: {} (hold-down {:.0} s)",
            self.failback_ms
                .map(|m| format!("{:.1} s after recovery", m / 1e3))
                .unwrap_or_else(|| "did not happen".into()),
            self.hold_down_ms / 1e3
        );
        s
    }
}
