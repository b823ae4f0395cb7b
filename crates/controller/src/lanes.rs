//! The seam between the controller and the rate-aware queue: every EC2 call names its [`Priority`], and a
//! [`CloudLanes`] hands back the [`Cloud`] to issue it on.
//!
//! ```text
//!   reconciler ── Priority::Failover ──► lanes.lane(Failover) ──┐
//!              ── Priority::Normal ────► lanes.lane(Normal) ────┴─► rate-aware queue ──► EC2 / vpcsim
//! ```
//!
//! [`OneLane`] (also `Arc<dyn Cloud>` directly) sends both priorities to the same `Cloud`: what tests and vpcsim
//! use. A queue with a failover lane implements [`CloudLanes`] by returning its high-priority handle for
//! [`Priority::Failover`]; nothing else in the controller changes.

use std::sync::Arc;

use underlay_cloud::Cloud;
use underlay_cloud::queue::{Priority as QueuePriority, RateLimitedCloud};

/// How urgent an EC2 call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Convergence, joins, leaves, fail-back, source/dest check.
    #[default]
    Normal,
    /// Moving a route away from a target that is not a healthy node (a failed forwarder, a vanished node), and
    /// the describe of a pass triggered by a failure: pods are blackholed until it lands.
    Failover,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Normal => "normal",
            Priority::Failover => "failover",
        }
    }
}

/// Which [`Cloud`] carries a call of a given priority.
pub trait CloudLanes: Send + Sync + std::fmt::Debug {
    fn lane(&self, priority: Priority) -> &dyn Cloud;
}

/// Every priority on one `Cloud` (no queue, or a queue without lanes).
#[derive(Debug, Clone)]
pub struct OneLane(pub Arc<dyn Cloud>);

impl CloudLanes for OneLane {
    fn lane(&self, _: Priority) -> &dyn Cloud {
        self.0.as_ref()
    }
}

impl CloudLanes for Arc<dyn Cloud> {
    fn lane(&self, _: Priority) -> &dyn Cloud {
        self.as_ref()
    }
}

/// A normal lane and a failover lane (e.g. two handles of one rate-aware queue).
#[derive(Debug, Clone)]
pub struct TwoLanes {
    pub normal: Arc<dyn Cloud>,
    pub failover: Arc<dyn Cloud>,
}

impl TwoLanes {
    /// Both lanes of one rate-aware queue: failover calls wait in the queue's failover lane, ahead of every
    /// normal call, and all calls share the queue's token buckets.
    pub fn over_queue<C: Cloud + 'static>(queue: RateLimitedCloud<C>) -> Self {
        Self {
            failover: Arc::new(queue.with_priority(Priority::Failover.into())),
            normal: Arc::new(queue.with_priority(Priority::Normal.into())),
        }
    }
}

impl From<Priority> for QueuePriority {
    fn from(p: Priority) -> Self {
        match p {
            Priority::Normal => QueuePriority::Normal,
            Priority::Failover => QueuePriority::Failover,
        }
    }
}

impl CloudLanes for TwoLanes {
    fn lane(&self, priority: Priority) -> &dyn Cloud {
        match priority {
            Priority::Normal => self.normal.as_ref(),
            Priority::Failover => self.failover.as_ref(),
        }
    }
}
