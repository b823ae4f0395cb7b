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
/// A probe without a reply within this is lost.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);

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
}

impl FailoverReport {
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

    /// Kills a node as a crashed instance would look from the VPC: its agent stops and every ENI it has goes
    /// down (in eni mode the secondary ENIs carry pods too).
    pub fn fail_node(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.node_index(name)?;
        self.stop_agent(i);
        for dev in self.node_ifnames(i) {
            kernel::ip(&self.nodes[i].netns, &["link", "set", &dev, "down"])?;
        }
        Ok(())
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
        self.fail_node(&forwarder)?;
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
        progress(format!(
            "blackhole {:.0} ms; {} route(s) moved off {forwarder}",
            blackhole.as_secs_f64() * 1e3,
            routes_moved.len()
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
