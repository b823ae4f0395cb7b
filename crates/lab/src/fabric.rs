//! [`Fabric`]: the VPC fabric namespace (and optional internet namespace) kept in step with a [`VpcSim`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::broadcast::{self, error::TryRecvError};
use underlay_cloud::InstanceId;
use underlay_vpcsim::{Change, VpcSim};

use crate::error::{Error, Result};
use crate::kernel;
use crate::model::{Applied, Model};
use crate::names::LabId;
use crate::plan::{
    FabricSpec, IGW_FABRIC_ADDR, IGW_INTERNET_ADDR, INTERNET_HOST, diff, plan_fabric, record,
};

/// How to build a fabric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FabricOptions {
    /// Build the internet namespace behind an IGW (routes `→ igw-…` lead there).
    pub internet: bool,
}

impl Default for FabricOptions {
    fn default() -> Self {
        Self { internet: true }
    }
}

/// What one [`Fabric::catch_up`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CatchUp {
    /// Changes applied one by one.
    pub applied: usize,
    /// Whether the model was rebuilt from a snapshot (the receiver lagged, or a change was missed).
    pub resynced: bool,
    /// Kernel operations run.
    pub ops: usize,
    /// Changes received but not yet effective (a route change waits for its modelled propagation, and every
    /// later change waits behind it).
    pub held: usize,
}

/// The fabric of one lab. Removes everything it created on [`Fabric::down`] or drop.
#[derive(Debug)]
pub struct Fabric {
    lab: LabId,
    sim: VpcSim,
    rx: broadcast::Receiver<Change>,
    /// Received changes not yet counted in order, each with whether its event was applied early.
    pending: VecDeque<Pending>,
    model: Model,
    applied: FabricSpec,
    internet: bool,
    torn_down: bool,
}

impl Fabric {
    /// Creates the fabric namespace `ul-<lab>-fab` (and `ul-<lab>-inet`), then everything in the sim's current
    /// state. Fails, leaving nothing behind, if any namespace of this lab exists already.
    pub fn build(lab: &str, sim: &VpcSim, options: FabricOptions) -> Result<Fabric> {
        let lab = LabId::new(lab)?;
        if let Some(ns) = kernel::netns_with_prefix(&lab.netns_prefix())
            .into_iter()
            .next()
        {
            return Err(Error::LabExists(lab.as_str().to_owned(), ns));
        }
        // Subscribe before the snapshot: every change after it is in the channel, and older ones are skipped.
        let rx = sim.subscribe();
        let model = Model::from_snapshot(&sim.snapshot());
        let mut fabric = Fabric {
            lab,
            sim: sim.clone(),
            rx,
            pending: VecDeque::new(),
            model,
            applied: FabricSpec::default(),
            internet: options.internet,
            torn_down: false,
        };
        let built = fabric
            .create_namespaces()
            .and_then(|()| fabric.reconcile().map(|_| ()));
        match built {
            Ok(()) => Ok(fabric),
            Err(cause) => match fabric.teardown() {
                Ok(()) => Err(cause),
                Err(t) => Err(Error::WithTeardown {
                    cause: Box::new(cause),
                    teardown: Box::new(t),
                }),
            },
        }
    }

    fn create_namespaces(&mut self) -> Result<()> {
        let fab = self.lab.fabric_netns();
        kernel::netns_add(&fab)?;
        // A router: forwards, sends no redirects (the VPC sends none), and has no reverse-path filter (the VPC
        // routes by table, and routed mode makes paths asymmetric).
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
        ] {
            kernel::sysctl(&fab, k, v)?;
        }
        if self.internet {
            let inet = self.lab.internet_netns();
            let igw = self.lab.igw_link();
            kernel::netns_add(&inet)?;
            kernel::ip(
                &fab,
                &[
                    "link", "add", &igw, "type", "veth", "peer", "name", "eth0", "netns", &inet,
                ],
            )?;
            kernel::ip(
                &fab,
                &["addr", "add", &IGW_FABRIC_ADDR.to_string(), "dev", &igw],
            )?;
            kernel::ip(&fab, &["link", "set", &igw, "up"])?;
            kernel::ip(
                &inet,
                &["addr", "add", &IGW_INTERNET_ADDR.to_string(), "dev", "eth0"],
            )?;
            kernel::ip(
                &inet,
                &["addr", "add", &format!("{INTERNET_HOST}/32"), "dev", "lo"],
            )?;
            kernel::ip(&inet, &["link", "set", "eth0", "up"])?;
            kernel::ip(
                &inet,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &IGW_FABRIC_ADDR.addr().to_string(),
                    "dev",
                    "eth0",
                ],
            )?;
        }
        Ok(())
    }

    pub fn lab(&self) -> &LabId {
        &self.lab
    }

    /// `ul-<lab>-fab`
    pub fn fabric_netns(&self) -> String {
        self.lab.fabric_netns()
    }

    /// `ul-<lab>-inet`, when the internet is emulated.
    pub fn internet_netns(&self) -> Option<String> {
        self.internet.then(|| self.lab.internet_netns())
    }

    /// The namespace of a running instance (`/var/run/netns/<name>`), once the fabric has created it.
    pub fn instance_netns(&self, instance: &InstanceId) -> Option<&str> {
        self.applied.instances.get(instance).map(String::as_str)
    }

    /// What the fabric holds now (every op recorded here has succeeded).
    pub fn spec(&self) -> &FabricSpec {
        &self.applied
    }

    /// The fabric's view of the region.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Applies every change waiting in the channel that is effective by now (a route change only once its
    /// modelled propagation has passed, see vpcsim's `Faults::route_propagation`; later changes wait behind it,
    /// in order), then converges the kernel. A lagged receiver or a gap in the numbering resynchronises from a
    /// snapshot instead of dropping changes.
    pub fn catch_up(&mut self) -> Result<CatchUp> {
        let mut out = CatchUp::default();
        loop {
            match self.rx.try_recv() {
                Ok(change) => self.pending.push_back(Pending {
                    change,
                    early: false,
                }),
                Err(TryRecvError::Lagged(_)) => {
                    // The snapshot holds every change, propagated or not.
                    self.pending.clear();
                    self.resync_model();
                    out.resynced = true;
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Closed) => break,
            }
        }
        for step in take_effective(&mut self.pending, tokio::time::Instant::now()) {
            let applied = match step {
                Step::Early(change) => {
                    self.model.apply_route_early(&change);
                    continue;
                }
                Step::InOrder(change, true) => self.model.advance(&change),
                Step::InOrder(change, false) => self.model.apply(&change),
            };
            match applied {
                Applied::Yes => out.applied += 1,
                Applied::Stale => {}
                Applied::Gap => {
                    self.pending.clear();
                    self.resync_model();
                    out.resynced = true;
                    break;
                }
            }
        }
        out.held = self.pending.len();
        out.ops = self.reconcile()?;
        Ok(out)
    }

    /// Rebuilds the model from a snapshot and converges the kernel to it (changes already in the channel and
    /// included in the snapshot are skipped later).
    pub fn resync(&mut self) -> Result<usize> {
        self.resync_model();
        self.reconcile()
    }

    fn resync_model(&mut self) {
        self.model = Model::from_snapshot(&self.sim.snapshot());
    }

    /// Plan → diff → apply; returns the number of ops run. Stops at the first failing op (what ran is
    /// recorded, so the next call carries on from there).
    fn reconcile(&mut self) -> Result<usize> {
        let want = plan_fabric(&self.lab, &self.model, self.internet)?;
        let ops = diff(&self.applied, &want);
        let fab = self.lab.fabric_netns();
        for op in &ops {
            tracing::debug!(lab = self.lab.as_str(), ?op, "fabric op");
            kernel::apply(&fab, op)?;
            record(&mut self.applied, op);
        }
        Ok(ops.len())
    }

    /// Applies changes as they come until `stop` returns true, checking it at least every `poll`.
    /// For a background thread: `std::thread::spawn(move || fabric.follow(...))`.
    pub fn follow(
        &mut self,
        applied_seq: &Arc<AtomicU64>,
        poll: Duration,
        stop: &dyn Fn() -> bool,
    ) -> Result<()> {
        while !stop() {
            let c = self.catch_up()?;
            applied_seq.store(self.model.seq, Ordering::Release);
            if c.applied == 0 && !c.resynced {
                std::thread::sleep(poll);
            }
        }
        Ok(())
    }

    /// Catches up until the fabric includes change `seq`, or `timeout` passes (then an error-free `false`).
    pub fn wait_for(&mut self, seq: u64, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            self.catch_up()?;
            if self.model.seq >= seq {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Removes every namespace of this lab (instances, internet, fabric: their links go with them). Every
    /// error is collected; removal carries on past each.
    pub fn down(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        self.torn_down = true;
        let r = teardown_lab(&self.lab);
        self.applied = FabricSpec::default();
        r
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        if !self.torn_down
            && let Err(e) = self.teardown()
        {
            tracing::warn!(lab = self.lab.as_str(), error = %e, "lab teardown on drop");
        }
    }
}

/// A change received by the fabric and not yet counted in order.
#[derive(Debug, Clone)]
pub struct Pending {
    pub change: Change,
    /// Its route change was applied ahead of earlier changes.
    pub early: bool,
}

/// What [`take_effective`] lets the fabric do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Count the change in order; `true` when its event was applied early already.
    InOrder(Change, bool),
    /// Apply a route change now, ahead of earlier changes still propagating in other tables.
    Early(Change),
}

fn effective(c: &Change, now: tokio::time::Instant) -> bool {
    c.effective_at.is_none_or(|at| at <= now)
}

/// The data plane's view at `now`: the changes at the front of `pending` that are effective are taken in order
/// (no `effective_at` counts as effective); behind the first that is not, a route change that is effective and
/// has no earlier pending change in its own table (nor any earlier non-route change) is applied early, as the
/// VPC's route tables propagate independently. Within a table, and for every other event, order is kept.
pub fn take_effective(pending: &mut VecDeque<Pending>, now: tokio::time::Instant) -> Vec<Step> {
    let mut out = Vec::new();
    while pending
        .front()
        .is_some_and(|p| p.early || effective(&p.change, now))
    {
        if let Some(p) = pending.pop_front() {
            out.push(Step::InOrder(p.change, p.early));
        }
    }
    let mut blocked: std::collections::BTreeSet<underlay_cloud::RouteTableId> = Default::default();
    for p in pending.iter_mut() {
        if p.early {
            continue;
        }
        let underlay_vpcsim::Event::RouteChanged { table, .. } = &p.change.event else {
            // Nothing overtakes another kind of change.
            break;
        };
        if !blocked.contains(table) && effective(&p.change, now) {
            p.early = true;
            out.push(Step::Early(p.change.clone()));
        } else {
            blocked.insert(table.clone());
        }
    }
    out
}

/// Removes every namespace whose name carries the lab's prefix: instances first, then the internet and the
/// fabric. Usable on its own to clean up after a killed run.
pub fn teardown_lab(lab: &LabId) -> Result<()> {
    let (fab, inet) = (lab.fabric_netns(), lab.internet_netns());
    let mut names = kernel::netns_with_prefix(&lab.netns_prefix());
    // Instances first, the fabric last.
    names.sort_by_key(|n| (*n == fab, *n == inet));
    let errors: Vec<Error> = names
        .iter()
        .filter_map(|n| kernel::netns_del(n).err())
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::Teardown(errors))
    }
}

/// Removes a lab by id (e.g. `underlay lab down` after a crash).
pub fn sweep(lab: &str) -> Result<()> {
    teardown_lab(&LabId::new(lab)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use underlay_vpcsim::Event;

    fn mk_change(seq: u64, at: tokio::time::Instant, effective_ms: u64) -> Pending {
        Pending {
            change: Change {
                seq,
                event: Event::InstanceTerminated {
                    instance: InstanceId::new(format!("i-{seq:017x}")),
                },
                at: Some(at),
                effective_at: Some(at + Duration::from_millis(effective_ms)),
            },
            early: false,
        }
    }

    fn mk_route(seq: u64, table: &str, at: tokio::time::Instant, effective_ms: u64) -> Pending {
        let mut p = mk_change(seq, at, effective_ms);
        p.change.event = Event::RouteChanged {
            table: underlay_cloud::RouteTableId::new(table),
            destination: "100.64.0.0/26".parse().unwrap(),
            old: None,
            new: None,
        };
        p
    }

    fn steps(v: Vec<Step>) -> Vec<(u64, &'static str)> {
        v.into_iter()
            .map(|s| match s {
                Step::InOrder(c, false) => (c.seq, "in order"),
                Step::InOrder(c, true) => (c.seq, "counted"),
                Step::Early(c) => (c.seq, "early"),
            })
            .collect()
    }

    #[test]
    fn changes_wait_for_their_propagation_in_order() {
        let t0 = tokio::time::Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut pending: VecDeque<Pending> = [
            mk_change(1, t0, 0),
            mk_route(2, "rtb-a", t0, 300), // still propagating
            mk_change(3, ms(10), 0),       // another kind of change: waits behind it
        ]
        .into_iter()
        .collect();
        assert_eq!(
            steps(take_effective(&mut pending, ms(20))),
            vec![(1, "in order")]
        );
        assert!(steps(take_effective(&mut pending, ms(299))).is_empty());
        assert_eq!(pending.len(), 2);
        assert_eq!(
            steps(take_effective(&mut pending, ms(300))),
            vec![(2, "in order"), (3, "in order")]
        );
        assert!(pending.is_empty());
        // A change without a time is effective at once.
        let mut p = mk_change(4, t0, 0);
        p.change.effective_at = None;
        pending.push_back(p);
        assert_eq!(
            steps(take_effective(&mut pending, t0)),
            vec![(4, "in order")]
        );
    }

    #[test]
    fn route_tables_propagate_independently_each_in_order() {
        let t0 = tokio::time::Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut pending: VecDeque<Pending> = [
            mk_route(1, "rtb-a", t0, 500),
            mk_route(2, "rtb-b", ms(10), 200), // another table: not held behind rtb-a
            mk_route(3, "rtb-a", ms(20), 100), // rtb-a again: waits for seq 1
            mk_route(4, "rtb-c", ms(30), 600),
            mk_change(5, ms(40), 0), // not a route change: waits for everything before it
        ]
        .into_iter()
        .collect();
        assert_eq!(
            steps(take_effective(&mut pending, ms(250))),
            vec![(2, "early")]
        );
        // Applied early once only.
        assert!(steps(take_effective(&mut pending, ms(260))).is_empty());
        assert_eq!(
            steps(take_effective(&mut pending, ms(500))),
            vec![(1, "in order"), (2, "counted"), (3, "in order")]
        );
        assert_eq!(
            steps(take_effective(&mut pending, ms(630))),
            vec![(4, "in order"), (5, "in order")]
        );
        assert!(pending.is_empty());
    }
}
