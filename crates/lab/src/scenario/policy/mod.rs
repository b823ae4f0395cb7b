//! `underlay lab policy`: NetworkPolicy on the lab, checked as the Kubernetes e2e suite checks it.
//!
//! ```text
//!   cases (built-in sequence or --cases FILE)
//!     │ per case: labels + NetworkPolicies ──► ApiSim ──► controller / agents ──► nftables in each node netns
//!     │           expected tables ◄── the case's own tables, else the evaluator (World → TruthTable)
//!     ▼
//!   9 pods (x,y,z × a,b,c) over 3 zones, each serving TCP/UDP/SCTP on 80 and 81 (threads bound in its netns)
//!     ▼ every pair × every protocol/port, probes in parallel with a short timeout
//!   observed tables ──compare──► mismatches: expected | observed | evaluator, side by side
//! ```
//!
//! The lab is the ordinary one (`Lab::up`: vpcsim, fabric, the real controller and agents, `underlay-cni`), built
//! without pods; the model's pods are then created as a kubelet would: the Pod object first (scheduled, pending),
//! the sandbox wired by `underlay-cni` ADD with the pod's identity in `CNI_ARGS`, then the Pod's status written.

pub mod bench;
pub mod cases;
pub mod model;
pub mod oracle;
pub mod probe;
pub mod sctp;
pub mod table;
pub mod timing;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Serialize;
use underlay_dataplane::Netns;

use super::{Lab, LabConfig, LabPod, progress};
use cases::Case;
use model::{NAMESPACES, POD_NAMES, World, WorldPod};
use oracle::Evaluator;
use probe::{PodServers, ProbeJob, Protocol};
use table::TruthTable;

/// How the matrix is probed.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// A probe that gets no answer within this is blocked (a blocked probe costs exactly this).
    pub timeout: Duration,
    /// Probes in flight at once.
    pub workers: usize,
    /// After a change at the API, the wait before the matrix is probed (the bar for event → kernel is 500 ms).
    pub settle: Duration,
    /// A cell expected reachable but observed blocked is probed again up to this many times (a lost datagram, a
    /// neighbour still resolving). A cell observed reachable where it is expected blocked is never retried: after
    /// the settle time that is a leak.
    pub retries: usize,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(400),
            workers: 64,
            settle: Duration::from_millis(1000),
            retries: 2,
        }
    }
}

/// The lab shape `lab policy` uses: 3 zones, one subnet each, 4 nodes (two share a subnet), no ordinary pods.
pub fn policy_lab_config(mut base: LabConfig) -> LabConfig {
    base.zones = 3;
    base.subnets_per_zone = 1;
    base.nodes = 4;
    base.pods_per_node = 0;
    base
}

/// A lab holding the x/y/z model with its servers running.
#[allow(missing_debug_implementations)]
pub struct PolicyLab {
    // Dropped first: the servers' threads end before the namespaces go.
    servers: PodServers,
    sources: Vec<Arc<Netns>>,
    pub lab: Lab,
    /// The model as the API holds it now.
    pub world: World,
    pub options: ProbeOptions,
}

/// Whether the API stand-in stores objects of kind `K`.
fn api_stores<K: kube::Resource<DynamicType = ()>>() -> bool {
    underlay_apisim::Kind::of::<K>().is_some()
}

impl PolicyLab {
    /// Builds the lab (see [`policy_lab_config`]) and the model on it.
    pub fn up(config: LabConfig, options: ProbeOptions) -> anyhow::Result<PolicyLab> {
        let mut lab = Lab::up(policy_lab_config(config))?;
        let t = Instant::now();
        let world = add_model(&mut lab)?;
        lab.step("model pods", t);
        let endpoints: Vec<probe::Endpoint> = lab
            .pods
            .iter()
            .map(|p| probe::Endpoint {
                netns: p.netns.clone(),
                ip: p.ip,
            })
            .collect();
        let servers = PodServers::start(&endpoints)?;
        let sources = lab
            .pods
            .iter()
            .map(|p| {
                Netns::named(&p.netns)
                    .map(Arc::new)
                    .with_context(|| format!("opening {}", p.netns))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        progress(format!(
            "model up: namespaces {} with pods {} ({} pods over {} nodes), serving tcp/udp/sctp on {:?}",
            NAMESPACES.join(", "),
            POD_NAMES.join(", "),
            world.pods.len(),
            lab.nodes.len(),
            probe::PORTS
        ));
        Ok(PolicyLab {
            servers,
            sources,
            lab,
            world,
            options,
        })
    }

    /// Reads a cases file (or [`cases::UPSTREAM`]) for this model: placeholders become its pods' addresses.
    pub fn load_cases(&self, text: &str) -> anyhow::Result<Vec<Case>> {
        let ips = self.world.pods.iter().map(|p| (p.key(), p.ip)).collect();
        cases::parse(&cases::expand(text, &ips)?, &model_names())
    }

    pub fn received(&self) -> &probe::Received {
        &self.servers.received
    }

    /// Makes the API hold `next`: namespace and pod labels, and exactly `next`'s policies. Returns whether
    /// anything changed.
    fn publish(&mut self, next: &World) -> anyhow::Result<bool> {
        let api = self.lab.api();
        let mut changed = false;
        for (ns, labels) in &next.namespaces {
            if self.world.namespaces.get(ns) != Some(labels) {
                if !api_stores::<Namespace>() {
                    bail!("the API stand-in does not serve Namespaces: cannot relabel {ns}");
                }
                api.insert(&model::kube_namespace(ns, labels));
                changed = true;
            }
        }
        for (old, new) in self.world.pods.iter().zip(&next.pods) {
            if old.labels != new.labels {
                if !api_stores::<Pod>() {
                    bail!(
                        "the API stand-in does not serve Pods: cannot relabel {}",
                        new.key()
                    );
                }
                let labels = new.labels.clone();
                api.modify::<Pod>(Some(&new.namespace), &new.name, |p| {
                    p.metadata.labels = Some(labels);
                });
                changed = true;
            }
        }
        let key = |p: &NetworkPolicy| {
            (
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            )
        };
        let want: BTreeMap<_, _> = next.policies.iter().map(|p| (key(p), p)).collect();
        let have: BTreeMap<_, _> = self.world.policies.iter().map(|p| (key(p), p)).collect();
        if (!want.is_empty() || !have.is_empty()) && !api_stores::<NetworkPolicy>() {
            bail!("the API stand-in does not serve NetworkPolicies");
        }
        for (k, _) in have.iter().filter(|(k, _)| !want.contains_key(*k)) {
            api.remove::<NetworkPolicy>(Some(&k.0), &k.1);
            changed = true;
        }
        for (k, p) in &want {
            let same = have.get(k).is_some_and(|h| {
                serde_json::to_value(&h.spec).ok() == serde_json::to_value(&p.spec).ok()
            });
            if !same {
                api.insert(*p);
                changed = true;
            }
        }
        self.world = next.clone();
        Ok(changed)
    }

    /// Applies `case` and checks the whole matrix; see the module doc.
    pub fn run_case(&mut self, case: &Case, evaluator: &dyn Evaluator) -> CaseReport {
        let started = Instant::now();
        let next = self
            .world
            .with_case(&case.namespace_labels, &case.pod_labels, &case.policies);
        let mut report = CaseReport {
            name: case.name.clone(),
            passed: false,
            policies: case.policies.len(),
            services: Vec::new(),
            probes: 0,
            retried: 0,
            error: None,
            diff: String::new(),
            duration_ms: 0.0,
        };
        match self.publish(&next) {
            Ok(true) => std::thread::sleep(self.options.settle),
            Ok(false) => {}
            Err(e) => {
                report.error = Some(format!("{e:#}"));
                report.duration_ms = ms(started.elapsed());
                return report;
            }
        }
        let keys = self.world.keys();
        // Expected per service: the case's table where it gives one, else the evaluator's.
        let mut expected = BTreeMap::new();
        let mut evaluated = BTreeMap::new();
        for (proto, port) in probe::services() {
            let ev = evaluator
                .table(&self.world, proto, port)
                .map(|mut t| {
                    oracle::allow_loopback(&mut t);
                    t
                })
                .map_err(|e| format!("{e:#}"));
            let (from, table) = match (case.expect.get(&(proto, port)), &ev) {
                (Some(t), _) => ("table", Ok(t.clone())),
                (None, Ok(t)) => (evaluator.name(), Ok(t.clone())),
                (None, Err(e)) => ("none", Err(e.clone())),
            };
            expected.insert((proto, port), (from, table));
            evaluated.insert((proto, port), ev);
        }
        let want: BTreeMap<(Protocol, u16), TruthTable> = expected
            .iter()
            .filter_map(|(k, (_, t))| t.as_ref().ok().map(|t| (*k, t.clone())))
            .collect();
        let (observed, probes, retried) = self.matrix(&keys, &want);
        report.probes = probes;
        report.retried = retried;
        let mut passed = true;
        for (proto, port) in probe::services() {
            let service = format!("{}/{port}", proto.as_str());
            let obs = &observed[&(proto, port)];
            let (reachable, blocked) = obs.counts();
            let (from, exp) = &expected[&(proto, port)];
            let mut s = ServiceReport {
                service: service.clone(),
                expected_from: from.to_string(),
                reachable,
                blocked,
                mismatches: Vec::new(),
                error: None,
            };
            match exp {
                Err(e) => {
                    s.error = Some(e.clone());
                    passed = false;
                }
                Ok(exp) => {
                    s.mismatches = exp
                        .mismatches(obs)
                        .into_iter()
                        .map(|(f, t, v)| {
                            format!("{f} -> {t}: expected {}, observed {}", mark(v), mark(!v))
                        })
                        .collect();
                    if !s.mismatches.is_empty() {
                        passed = false;
                        let mut tables: Vec<(String, &TruthTable)> = vec![
                            (format!("expected ({from})"), exp),
                            ("observed".into(), obs),
                        ];
                        if *from == "table"
                            && let Ok(ev) = &evaluated[&(proto, port)]
                        {
                            tables.push((format!("evaluator ({})", evaluator.name()), ev));
                        }
                        let cmp = exp.compare(obs);
                        tables.push(("comparison".into(), &cmp));
                        let refs: Vec<(&str, &TruthTable)> =
                            tables.iter().map(|(n, t)| (n.as_str(), *t)).collect();
                        report.diff.push_str(&format!(
                            "{service}: {} mismatch(es)\n{}",
                            s.mismatches.len(),
                            table::side_by_side(&refs)
                        ));
                    }
                }
            }
            report.services.push(s);
        }
        report.passed = passed;
        report.duration_ms = ms(started.elapsed());
        report
    }

    /// Probes every pair for every service; cells expected reachable but observed blocked are retried. Returns
    /// the observed tables, the number of probes and of retries.
    pub fn matrix(
        &self,
        keys: &[String],
        expected: &BTreeMap<(Protocol, u16), TruthTable>,
    ) -> (BTreeMap<(Protocol, u16), TruthTable>, usize, usize) {
        let mut cells = Vec::new();
        for (proto, port) in probe::services() {
            for (f, _) in keys.iter().enumerate() {
                for (t, _) in keys.iter().enumerate() {
                    cells.push((proto, port, f, t));
                }
            }
        }
        let jobs = |cells: &[(Protocol, u16, usize, usize)]| -> Vec<ProbeJob> {
            cells
                .iter()
                .map(|&(proto, port, f, t)| ProbeJob {
                    source: self.sources[f].clone(),
                    dst: self.world.pods[t].ip,
                    proto,
                    port,
                })
                .collect()
        };
        let o = &self.options;
        let results = probe::run_probes(&jobs(&cells), o.workers, o.timeout);
        let mut probes = cells.len();
        let mut tables: BTreeMap<(Protocol, u16), TruthTable> = probe::services()
            .into_iter()
            .map(|s| (s, TruthTable::new(keys.to_vec(), keys.to_vec())))
            .collect();
        for (c, ok) in cells.iter().zip(&results) {
            tables
                .get_mut(&(c.0, c.1))
                .expect("every service")
                .set(&keys[c.2], &keys[c.3], *ok);
        }
        let mut retried = 0;
        for _ in 0..o.retries {
            let again: Vec<_> = cells
                .iter()
                .copied()
                .filter(|c| {
                    let (f, t) = (&keys[c.2], &keys[c.3]);
                    tables[&(c.0, c.1)].get(f, t) == Some(false)
                        && expected
                            .get(&(c.0, c.1))
                            .and_then(|e| e.get(f, t))
                            .unwrap_or(false)
                })
                .collect();
            if again.is_empty() {
                break;
            }
            retried += again.len();
            probes += again.len();
            let results = probe::run_probes(&jobs(&again), o.workers, o.timeout);
            for (c, ok) in again.iter().zip(results) {
                if ok {
                    tables
                        .get_mut(&(c.0, c.1))
                        .expect("every service")
                        .set(&keys[c.2], &keys[c.3], true);
                }
            }
        }
        (tables, probes, retried)
    }

    /// Runs `cases` in order, then (with `timing`) the first-packet and change-under-load cases; the report of
    /// the whole run.
    pub fn run(&mut self, cases: &[Case], evaluator: &dyn Evaluator, timing: bool) -> PolicyReport {
        let started = Instant::now();
        let mut reports = Vec::new();
        for c in cases {
            progress(format!(
                "case {:?}: {} polic{}",
                c.name,
                c.policies.len(),
                if c.policies.len() == 1 { "y" } else { "ies" }
            ));
            let r = self.run_case(c, evaluator);
            progress(r.summary());
            if !r.diff.is_empty() {
                for line in r.diff.lines() {
                    progress(format!("  {line}"));
                }
            }
            reports.push(r);
        }
        let mut timing_failures = Vec::new();
        let (first_packet, under_load) = if timing {
            let fp = self.first_packet();
            let ul = self.under_load();
            match &fp {
                Ok(r) => progress(format!(
                    "first packet: control {} of {} datagrams at the peer; denied {} of {} (first sent {:?} ms from ADD's return)",
                    r.control.received_at_peer,
                    r.control.sent,
                    r.denied.received_at_peer,
                    r.denied.sent,
                    r.denied.first_sent_ms
                )),
                Err(e) => timing_failures.push(format!("first packet: {e:#}")),
            }
            match &ul {
                Ok(r) => progress(format!(
                    "under load: allowed flow lost {} of {} after the change (longest gap {:.1} ms); denied flow last reply {:?} ms after it",
                    r.allowed_lost_after,
                    r.allowed_sent_after,
                    r.allowed_longest_gap_ms,
                    r.denied_last_reply_ms
                )),
                Err(e) => timing_failures.push(format!("change under load: {e:#}")),
            }
            (fp.ok(), ul.ok())
        } else {
            (None, None)
        };
        let mut report = PolicyReport::new(self, reports, started.elapsed());
        if let Some(fp) = &first_packet
            && !fp.passed
        {
            timing_failures.push(format!(
                "first packet: {} datagram(s) of the denied pod reached its peer (control: {})",
                fp.denied.received_at_peer, fp.control.received_at_peer
            ));
        }
        if let Some(ul) = &under_load
            && !ul.passed
        {
            timing_failures.push(format!(
                "change under load: {} denied replies after {} ms, allowed flow lost {} of {}",
                ul.denied_replies_after_bound,
                ul.bound_ms,
                ul.allowed_lost_after,
                ul.allowed_sent_after
            ));
        }
        report.passed = report.passed && timing_failures.is_empty();
        report.failures.extend(timing_failures);
        report.first_packet = first_packet;
        report.under_load = under_load;
        report
    }

    pub fn down(self) -> anyhow::Result<()> {
        let PolicyLab {
            servers,
            sources,
            lab,
            ..
        } = self;
        drop(servers);
        drop(sources);
        lab.down()
    }
}

/// The names a cases file may use.
pub fn model_names() -> cases::ModelNames {
    cases::ModelNames {
        namespaces: NAMESPACES.iter().map(|s| s.to_string()).collect(),
        pods: NAMESPACES
            .iter()
            .flat_map(|n| POD_NAMES.map(|p| format!("{n}/{p}")))
            .collect(),
    }
}

/// Checks a cases file before any lab is built (placeholders stand for an address each).
pub fn check_cases(text: &str) -> anyhow::Result<Vec<Case>> {
    let names = model_names();
    let ips = names
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), std::net::Ipv4Addr::new(100, 64, 0, 10 + i as u8)))
        .collect();
    cases::parse(&cases::expand(text, &ips)?, &names)
}

/// Namespaces x, y, z and pods a, b, c in each, pod `i` on node `i mod nodes` (so same-node, same-subnet and
/// cross-zone pairs all occur), each created as kubelet creates it.
fn add_model(lab: &mut Lab) -> anyhow::Result<World> {
    let api = lab.api().clone();
    let mut world = World::default();
    for ns in NAMESPACES {
        let labels = World::base_namespace_labels(ns);
        if api_stores::<Namespace>() {
            api.insert(&model::kube_namespace(ns, &labels));
        }
        world.namespaces.insert(ns.to_string(), labels);
    }
    let prefix = lab.id().netns_prefix();
    let mut i = 0;
    for ns in NAMESPACES {
        for pod in POD_NAMES {
            let n = i % lab.nodes.len();
            let node = lab.nodes[n].name.clone();
            let host_ip = lab.nodes[n].instance.private_ip;
            let labels = World::base_pod_labels(pod);
            if api_stores::<Pod>() {
                api.insert(&model::kube_pod(ns, pod, &labels, &node, None));
            }
            let netns = format!("{prefix}q{ns}{pod}");
            let container_id = format!("{:0>12x}{:0>8x}", lab.config.seed, 0xA000 + i);
            let key = format!("{ns}/{pod}");
            let ip = lab.wire_pod(n, &key, &netns, &container_id, Some((ns, pod)))?;
            if api_stores::<Pod>() {
                api.insert(&model::kube_pod(
                    ns,
                    pod,
                    &labels,
                    &node,
                    Some((ip, host_ip)),
                ));
            }
            lab.pods.push(LabPod {
                name: format!("{ns}-{pod}"),
                netns,
                node: n,
                ip,
                container_id,
            });
            world.pods.push(WorldPod {
                namespace: ns.to_string(),
                name: pod.to_string(),
                labels,
                ip,
                node,
                host_ip,
            });
            i += 1;
        }
    }
    Ok(world)
}

fn mark(v: bool) -> &'static str {
    if v { "." } else { "X" }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// One protocol/port of one case.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceReport {
    /// `tcp/80`, …
    pub service: String,
    /// `table` (the case's own), the evaluator's name, or `none`.
    pub expected_from: String,
    pub reachable: usize,
    pub blocked: usize,
    /// `from -> to: expected X, observed .`
    pub mismatches: Vec<String>,
    /// No expected table could be had.
    pub error: Option<String>,
}

/// One case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    pub name: String,
    pub passed: bool,
    pub policies: usize,
    pub services: Vec<ServiceReport>,
    pub probes: usize,
    /// Probes repeated because a cell expected reachable was not (lost datagrams, neighbour resolution).
    pub retried: usize,
    /// The case could not be applied.
    pub error: Option<String>,
    /// Expected, observed (and the evaluator's) tables side by side, for every service that mismatched.
    pub diff: String,
    pub duration_ms: f64,
}

impl CaseReport {
    pub fn summary(&self) -> String {
        let mismatches: usize = self.services.iter().map(|s| s.mismatches.len()).sum();
        let (r, b) = self
            .services
            .iter()
            .fold((0, 0), |(r, b), s| (r + s.reachable, b + s.blocked));
        let from: std::collections::BTreeSet<&str> = self
            .services
            .iter()
            .map(|s| s.expected_from.as_str())
            .collect();
        let verdict = if self.passed { "ok  " } else { "FAIL" };
        let mut s = format!(
            "{verdict} {}: {} probes, {r} reachable, {b} blocked, {mismatches} mismatch(es), expected from {}, {:.1} s",
            self.name,
            self.probes,
            from.into_iter().collect::<Vec<_>>().join("+"),
            self.duration_ms / 1e3
        );
        if let Some(e) = &self.error {
            s.push_str(&format!(" — {e}"));
        }
        for svc in &self.services {
            if let Some(e) = &svc.error {
                s.push_str(&format!(" — {}: {e}", svc.service));
            }
        }
        s
    }
}

/// A pod of the model, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct PodReport {
    pub pod: String,
    pub ip: String,
    pub node: String,
    pub zone: String,
}

/// `lab policy` in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyReport {
    pub lab: String,
    pub mode: String,
    pub nodes: usize,
    pub pods: Vec<PodReport>,
    pub probe_timeout_ms: f64,
    pub cases: Vec<CaseReport>,
    pub first_packet: Option<timing::FirstPacketReport>,
    pub under_load: Option<timing::UnderLoadReport>,
    pub passed: bool,
    pub failures: Vec<String>,
    pub duration_s: f64,
}

impl PolicyReport {
    fn new(pl: &PolicyLab, cases: Vec<CaseReport>, took: Duration) -> Self {
        let failures: Vec<String> = cases
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.summary())
            .collect();
        PolicyReport {
            lab: pl.lab.config.name.clone(),
            mode: match pl.lab.config.mode {
                underlay_api::Mode::Routed => "routed".into(),
                underlay_api::Mode::Eni => "eni".into(),
            },
            nodes: pl.lab.nodes.len(),
            pods: pl
                .world
                .pods
                .iter()
                .zip(&pl.lab.pods)
                .map(|(w, l)| PodReport {
                    pod: w.key(),
                    ip: w.ip.to_string(),
                    node: w.node.clone(),
                    zone: pl.lab.nodes[l.node].instance.zone.clone(),
                })
                .collect(),
            probe_timeout_ms: ms(pl.options.timeout),
            passed: !cases.is_empty() && failures.is_empty(),
            failures,
            cases,
            first_packet: None,
            under_load: None,
            duration_s: took.as_secs_f64(),
        }
    }

    pub fn human(&self) -> String {
        let mut s = format!(
            "lab policy ({} mode): {} nodes, pods {}\n",
            self.mode,
            self.nodes,
            self.pods
                .iter()
                .map(|p| format!("{}@{}", p.pod, p.zone))
                .collect::<Vec<_>>()
                .join(" ")
        );
        for c in &self.cases {
            s.push_str(&c.summary());
            s.push('\n');
            for line in c.diff.lines() {
                s.push_str("    ");
                s.push_str(line);
                s.push('\n');
            }
        }
        if let Some(fp) = &self.first_packet {
            s.push_str(&format!(
                "{} first packet: control pod {} of {} datagrams at the peer; denied pod {} of {} (must be 0)\n",
                if fp.passed { "ok  " } else { "FAIL" },
                fp.control.received_at_peer,
                fp.control.sent,
                fp.denied.received_at_peer,
                fp.denied.sent
            ));
        }
        if let Some(ul) = &self.under_load {
            s.push_str(&format!(
                "{} change under load: allowed flow lost {} of {} (longest gap {:.1} ms); denied flow's last reply {} after the change (bound {} ms)\n",
                if ul.passed { "ok  " } else { "FAIL" },
                ul.allowed_lost_after,
                ul.allowed_sent_after,
                ul.allowed_longest_gap_ms,
                ul.denied_last_reply_ms.map_or("none".to_string(), |m| format!("{m:.0} ms")),
                ul.bound_ms
            ));
        }
        s.push_str(&format!(
            "{}: {} of {} cases passed in {:.1} s\n",
            if self.passed { "PASSED" } else { "FAILED" },
            self.cases.iter().filter(|c| c.passed).count(),
            self.cases.len(),
            self.duration_s
        ));
        s
    }
}
