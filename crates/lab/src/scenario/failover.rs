//! `lab fail` / `lab recover` / `lab failover`: kill a forwarder under a steady probe, measure the blackhole,
//! check that only its routes moved, recover it and time the fail-back (which must wait for the hold-down).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use underlay_cloud::RouteTarget;

use super::check::PathClass;
use super::echo::{EchoClient, EchoServers};
use super::{Lab, progress};
use crate::kernel;

/// Probe period of the steady stream across the forwarder.
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// A probe without a reply within this is lost. Two probe periods: the probe thread waits this long on a lost
/// probe before sending the next, so it bounds the measurement's resolution while packets are lost (a reply in
/// the lab takes well under a millisecond).
const PROBE_TIMEOUT: Duration = Duration::from_millis(20);

/// What `lab failover` measured.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub forwarder: String,
    pub probe_from: String,
    pub probe_to: String,
    /// Longest run without replies (ms): from the last reply before it to the first after it.
    pub blackhole_ms: f64,
    pub probes_sent: usize,
    pub probes_lost: usize,
    /// VPC routes that changed target when the forwarder died (table, destination).
    pub routes_moved: Vec<String>,
    /// Every moved route had targeted the dead forwarder.
    pub only_its_routes_moved: bool,
    /// From recovery to the forwarder carrying its routes again (ms); `None` if it did not within the wait.
    pub failback_ms: Option<f64>,
    pub hold_down_ms: f64,
    /// The routes came back no sooner than the hold-down.
    pub failback_after_hold_down: bool,
    /// Where the blackhole's time went.
    pub stages: FailoverStages,
    /// The bar the blackhole is held to (issue 15: ≤ 1,000 ms with vpcsim's modelled API latency on).
    pub blackhole_bar_ms: f64,
    /// vpcsim's AWS-like route timing was on (`Faults::aws_route_model`).
    pub aws_route_latency: bool,
}

/// The failover's stages, each in ms from the forwarder's links going down (`None`: not seen).
#[derive(Debug, Clone, Default, Serialize)]
pub struct FailoverStages {
    /// The controller confirmed the failure (its health transition).
    pub confirmed_ms: Option<f64>,
    /// EC2 (vpcsim) answered the ReplaceRoute of the route the probe's traffic takes: after the call's
    /// modelled latency and any queueing.
    pub replaced_ms: Option<f64>,
    /// That route change reached the fabric's data plane (after the modelled propagation).
    pub effective_ms: Option<f64>,
    /// The first probe answered after the blackhole was sent (negative: sent just before the links were down
    /// and answered by the failing forwarder).
    pub first_reply_ms: Option<f64>,
    /// The probe period: the measurement's resolution.
    pub probe_every_ms: f64,
}

/// The bar of issue 15 for the lab demo's failover blackhole.
pub const BLACKHOLE_BAR: Duration = Duration::from_millis(1000);

impl FailoverReport {
    /// The blackhole meets [`BLACKHOLE_BAR`].
    pub fn within_bar(&self) -> bool {
        self.blackhole_ms <= self.blackhole_bar_ms
    }

    pub fn passed(&self) -> bool {
        self.blackhole_ms < 3000.0
            && !self.routes_moved.is_empty()
            && self.only_its_routes_moved
            && self.failback_after_hold_down
    }
}

/// (table, destination) → target ENI, for routes inside the pod CIDR.
fn pod_routes(lab: &Lab) -> BTreeMap<(String, String), String> {
    let snap = lab.sim.snapshot();
    let mut out = BTreeMap::new();
    for t in &snap.route_tables {
        if !lab.subnets.iter().any(|s| s.table == t.id) {
            continue;
        }
        for r in &t.routes {
            if let RouteTarget::NetworkInterface(eni) = &r.target
                && super::POD_CIDR.contains(&r.destination)
            {
                out.insert(
                    (t.id.to_string(), r.destination.to_string()),
                    eni.to_string(),
                );
            }
        }
    }
    out
}

impl Lab {
    fn node_index(&self, name: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name || n.instance.id.as_str() == name)
            .with_context(|| format!("no node {name} in lab {}", self.config.name))
    }

    /// The interfaces of the ENIs attached to node `i`, as named inside the instance (`eth<device index>`).
    pub(super) fn node_ifnames(&self, i: usize) -> Vec<String> {
        let mut devices: Vec<u32> = self
            .sim
            .snapshot()
            .enis
            .iter()
            .filter_map(|e| e.attachment.as_ref())
            .filter(|a| a.instance == self.nodes[i].instance.id)
            .map(|a| a.device_index)
            .collect();
        devices.sort_unstable();
        devices
            .into_iter()
            .map(crate::names::instance_ifname)
            .collect()
    }

    /// Kills a node as a crashed instance would look from the VPC: every ENI it has goes down (in eni mode the
    /// secondary ENIs carry pods too), then its agent stops. Links first: traffic through the node and the
    /// controller's probes of it stop at the same moment, so a failover's detection is not started early.
    /// Returns when the links were down (the failure's start).
    pub fn fail_node(&mut self, name: &str) -> anyhow::Result<Instant> {
        let i = self.node_index(name)?;
        for dev in self.node_ifnames(i) {
            kernel::ip(&self.nodes[i].netns, &["link", "set", &dev, "down"])?;
        }
        let down = Instant::now();
        self.stop_agent(i);
        Ok(down)
    }

    /// Brings a failed node back: its ENIs up, agent restarted (from its checkpoint).
    pub fn recover_node(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.node_index(name)?;
        for dev in self.node_ifnames(i) {
            kernel::ip(&self.nodes[i].netns, &["link", "set", &dev, "up"])?;
        }
        // The default route goes with the link; put the subnet router back as the instance had it.
        let gw = crate::plan::subnet_router(self.subnets[self.nodes[i].subnet].cidr).to_string();
        let _ = kernel::ip(
            &self.nodes[i].netns,
            &["route", "replace", "default", "via", &gw, "dev", "eth0"],
        );
        self.start_agent(i)
    }

    /// A forwarder carrying another node's block, a pod behind that other node, and a client pod in another
    /// subnet whose traffic takes the forwarder.
    fn failover_subjects(&self) -> anyhow::Result<(usize, usize, usize)> {
        let snap = self.sim.snapshot();
        for b in 0..self.pods.len() {
            for a in 0..self.pods.len() {
                if self.pod_class(&snap, a, b) != PathClass::OtherSubnetForwarder {
                    continue;
                }
                let table = &self.subnets[self.nodes[self.pods[a].node].subnet].table;
                let target = super::route_to(&snap, table, self.pods[b].ip.into());
                let Some(RouteTarget::NetworkInterface(eni)) = target else {
                    continue;
                };
                if let Some(f) = self
                    .nodes
                    .iter()
                    .position(|n| n.instance.primary_eni().is_some_and(|e| e.id == eni))
                {
                    return Ok((f, a, b));
                }
            }
        }
        bail!(
            "no pod is reached through a forwarder: the route limit ({}) leaves every block its own route; \
             lower --route-limit to see aggregation",
            self.config.route_limit
        )
    }

    /// Kill a forwarder under a steady UDP probe, then recover it and wait for the fail-back.
    pub fn failover(&mut self) -> anyhow::Result<FailoverReport> {
        self.wait_fabric()?;
        let (f, a, b) = self.failover_subjects()?;
        let forwarder = self.nodes[f].name.clone();
        let f_eni = self.nodes[f]
            .instance
            .primary_eni()
            .map(|e| e.id.to_string())
            .unwrap_or_default();
        let (client_pod, target_pod) = (self.pods[a].clone(), self.pods[b].clone());
        progress(format!(
            "probing {} → {} every {} ms through forwarder {forwarder}",
            client_pod.name,
            target_pod.name,
            PROBE_EVERY.as_millis()
        ));
        let before = pod_routes(self);
        let _echo = EchoServers::start(&[(target_pod.netns.clone(), target_pod.ip)])?;
        let mut client = EchoClient::new(&client_pod.netns, client_pod.ip)?;
        if client
            .reach(target_pod.ip, 5, Duration::from_millis(500))
            .is_none()
        {
            bail!(
                "{} cannot reach {} before the failure",
                client_pod.name,
                target_pod.name
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let dst = target_pod.ip;
        let prober = std::thread::spawn(move || {
            let mut log: Vec<(Instant, bool)> = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                let at = Instant::now();
                let ok = client.round_trip(dst, PROBE_TIMEOUT).is_some();
                log.push((at, ok));
                if let Some(rest) = PROBE_EVERY.checked_sub(at.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            log
        });
        std::thread::sleep(Duration::from_millis(300));
        progress(format!("killing forwarder {forwarder}"));
        let mut route_changes = self.sim.subscribe();
        let mut controller_events = self.subscribe_controller();
        let killed = self.fail_node(&forwarder)?;
        // Wait until its routes have moved and the probe has seen replies again for a while.
        let deadline = Instant::now() + Duration::from_secs(20);
        let moved = loop {
            let now = pod_routes(self);
            if !now.values().any(|t| *t == f_eni) {
                break now;
            }
            if Instant::now() > deadline {
                stop.store(true, Ordering::Relaxed);
                let _ = prober.join();
                bail!("forwarder {forwarder}'s routes did not move within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(1000));
        stop.store(true, Ordering::Relaxed);
        let log = prober
            .join()
            .map_err(|_| anyhow::anyhow!("probe thread panicked"))?;
        let blackhole = blackhole(&log);
        let since_kill = |t: Instant| {
            t.checked_duration_since(killed)
                .map(|d| d.as_secs_f64() * 1e3)
        };
        let mut stages = FailoverStages {
            probe_every_ms: PROBE_EVERY.as_secs_f64() * 1e3,
            ..Default::default()
        };
        while let Ok(ev) = controller_events.try_recv() {
            if let underlay_controller::ControllerEvent::Health(t) = ev
                && t.node == forwarder
                && t.is_failure()
                && stages.confirmed_ms.is_none()
            {
                stages.confirmed_ms = since_kill(t.at);
            }
        }
        let client_table = &self.subnets[self.nodes[self.pods[a].node].subnet].table;
        while let Ok(c) = route_changes.try_recv() {
            if let underlay_vpcsim::Event::RouteChanged {
                table,
                destination,
                old: Some(RouteTarget::NetworkInterface(old)),
                ..
            } = &c.event
                && table == client_table
                && old.as_str() == f_eni
                && destination.contains(&target_pod.ip)
                && stages.replaced_ms.is_none()
            {
                stages.replaced_ms = c.at.and_then(|t| since_kill(t.into_std()));
                stages.effective_ms = c.effective_at.and_then(|t| since_kill(t.into_std()));
            }
        }
        // The first answered probe after the first lost one that could have met the dead links.
        let in_flight = killed - PROBE_EVERY - PROBE_TIMEOUT;
        stages.first_reply_ms = log
            .iter()
            .filter(|(at, _)| *at >= in_flight)
            .skip_while(|(_, ok)| *ok)
            .find(|(_, ok)| *ok)
            .map(|(at, _)| {
                at.checked_duration_since(killed).map_or_else(
                    || -(killed.duration_since(*at).as_secs_f64() * 1e3),
                    |d| d.as_secs_f64() * 1e3,
                )
            });
        let mut routes_moved = Vec::new();
        let mut only_its = true;
        for (key, target) in &before {
            match moved.get(key) {
                Some(t) if t == target => {}
                _ => {
                    routes_moved.push(format!("{} {}", key.0, key.1));
                    if *target != f_eni {
                        only_its = false;
                    }
                }
            }
        }
        for key in moved.keys() {
            if !before.contains_key(key) {
                // A new route (not a move) is a change a forwarder failure must not cause.
                only_its = false;
                routes_moved.push(format!("{} {} (new)", key.0, key.1));
            }
        }
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        progress(format!(
            "blackhole {:.0} ms (bar {} ms: {}); {} route(s) moved off {forwarder}",
            blackhole.as_secs_f64() * 1e3,
            BLACKHOLE_BAR.as_millis(),
            if blackhole <= BLACKHOLE_BAR {
                "met"
            } else {
                "NOT met"
            },
            routes_moved.len()
        ));
        progress(format!(
            "  from the kill: failure confirmed {} ms, ReplaceRoute answered {} ms, in the fabric {} ms, \
             first reply {} ms (AWS-like route latency {})",
            ms(stages.confirmed_ms),
            ms(stages.replaced_ms),
            ms(stages.effective_ms),
            ms(stages.first_reply_ms),
            if self.config.aws_route_latency {
                "on"
            } else {
                "off"
            }
        ));

        progress(format!(
            "recovering {forwarder}; routes may return after the {} s hold-down",
            self.config.hold_down.as_secs()
        ));
        let recovered = Instant::now();
        self.recover_node(&forwarder)?;
        let wait = self.config.hold_down + Duration::from_secs(20);
        let mut failback = None;
        while recovered.elapsed() < wait {
            if pod_routes(self).values().any(|t| *t == f_eni) {
                failback = Some(recovered.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(fb) = failback {
            progress(format!(
                "routes back on {forwarder} after {:.1} s",
                fb.as_secs_f64()
            ));
        }
        let lost = log.iter().filter(|(_, ok)| !ok).count();
        Ok(FailoverReport {
            forwarder,
            probe_from: client_pod.name,
            probe_to: target_pod.name,
            blackhole_ms: blackhole.as_secs_f64() * 1e3,
            probes_sent: log.len(),
            probes_lost: lost,
            routes_moved,
            only_its_routes_moved: only_its,
            failback_ms: failback.map(|d| d.as_secs_f64() * 1e3),
            hold_down_ms: self.config.hold_down.as_secs_f64() * 1e3,
            failback_after_hold_down: failback.is_some_and(|d| d >= self.config.hold_down),
            stages,
            blackhole_bar_ms: BLACKHOLE_BAR.as_secs_f64() * 1e3,
            aws_route_latency: self.config.aws_route_latency,
        })
    }
}

/// The longest gap between two answered probes that has lost probes in it.
fn blackhole(log: &[(Instant, bool)]) -> Duration {
    let mut worst = Duration::ZERO;
    let mut last_ok: Option<Instant> = None;
    let mut lost_since = false;
    for (at, ok) in log {
        if *ok {
            if let Some(prev) = last_ok
                && lost_since
            {
                worst = worst.max(at.duration_since(prev));
            }
            last_ok = Some(*at);
            lost_since = false;
        } else {
            lost_since = true;
        }
    }
    if lost_since && let (Some(prev), Some((end, _))) = (last_ok, log.last()) {
        worst = worst.max(end.duration_since(prev));
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blackhole_is_the_longest_gap_with_losses() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let log = vec![
            (at(0), true),
            (at(10), true),
            (at(20), false),
            (at(30), false),
            (at(40), true),
            (at(50), true),
            (at(60), false),
            (at(70), true),
        ];
        assert_eq!(blackhole(&log), Duration::from_millis(30));
        assert_eq!(blackhole(&log[..2]), Duration::ZERO);
        // Still lost at the end: measured to the last probe.
        assert_eq!(blackhole(&log[..4]), Duration::from_millis(20));
    }
}
