//! NetworkPolicies the compiler cannot fully express (an unsupported protocol, an ipBlock that is not a CIDR, an
//! invalid selector, …): one Warning Event on the policy and a metric, from the leader only. The agents enforce
//! such a policy as the API says for what is valid, and make the invalid entries match nothing (core's
//! `policy::validate`); they record no Events themselves, so a bad policy yields one Event, not one per node.
//!
//! ```text
//!   watch NetworkPolicy (all) ──► PolicyCheck::observe (pure: warnings changed since last reported?)
//!                                      │ yes, and leading                  │ always
//!                                      ▼                                   ▼
//!                     Event (events.k8s.io) Warning PolicyNotExpressible   policy_warnings gauges
//! ```

use std::collections::BTreeMap;

use ::kube::api::Api;
use ::kube::runtime::WatchStreamExt;
use ::kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use ::kube::runtime::watcher::{self, Event};
use ::kube::{Client, Resource};
use futures::StreamExt;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use underlay_api::policy::{self as convert, ObjectKey};
use underlay_core::names;
use underlay_core::policy::{PolicyWarning, validate};

/// Reason of the Warning Event on a policy with entries the compiler cannot express.
pub const REASON_POLICY_NOT_EXPRESSIBLE: &str = "PolicyNotExpressible";
/// The Event's action.
pub const ACTION_ENFORCE_VALID_PART: &str = "EnforceValidPart";
/// events.k8s.io limits `note` to 1 KiB.
const NOTE_MAX: usize = 1024;

/// Which policies have warnings, and what was last reported for each. Pure.
#[derive(Debug, Default, Clone)]
pub struct PolicyCheck {
    reported: BTreeMap<ObjectKey, Vec<PolicyWarning>>,
    staged: Option<BTreeMap<ObjectKey, Vec<PolicyWarning>>>,
}

impl PolicyCheck {
    /// The policy's warnings, if they differ from what was last reported for it (a first sighting with no
    /// warning reports nothing; a policy fixed after a warning reports nothing either, and is forgotten).
    pub fn observe(&mut self, np: &NetworkPolicy) -> Option<Vec<PolicyWarning>> {
        let key = convert::key_of(&np.metadata);
        let warnings = validate(&convert::network_policy(np));
        let before = self.reported_for(&key).cloned();
        let map = self.staged.as_mut().unwrap_or(&mut self.reported);
        if warnings.is_empty() {
            map.remove(&key);
            return None;
        }
        map.insert(key, warnings.clone());
        (before.as_ref() != Some(&warnings)).then_some(warnings)
    }

    fn reported_for(&self, key: &ObjectKey) -> Option<&Vec<PolicyWarning>> {
        self.staged
            .as_ref()
            .and_then(|s| s.get(key))
            .or_else(|| self.reported.get(key))
    }

    pub fn forget(&mut self, np: &NetworkPolicy) {
        let key = convert::key_of(&np.metadata);
        self.reported.remove(&key);
        if let Some(s) = &mut self.staged {
            s.remove(&key);
        }
    }

    /// Apply one watch event; returns the warnings to report now (see [`PolicyCheck::observe`]).
    pub fn apply(
        &mut self,
        event: Event<NetworkPolicy>,
    ) -> Option<(NetworkPolicy, Vec<PolicyWarning>)> {
        match event {
            Event::Init => {
                self.staged = Some(BTreeMap::new());
                None
            }
            Event::InitDone => {
                if let Some(s) = self.staged.take() {
                    self.reported = s;
                }
                None
            }
            Event::InitApply(np) | Event::Apply(np) => self.observe(&np).map(|w| (np, w)),
            Event::Delete(np) => {
                self.forget(&np);
                None
            }
        }
    }

    /// Policies with at least one warning.
    pub fn policies_with_warnings(&self) -> usize {
        self.reported.len()
    }

    /// Warnings over all policies.
    pub fn warnings(&self) -> usize {
        self.reported.values().map(Vec::len).sum()
    }
}

/// The Event's note: every warning, cut to the API's limit.
pub fn note(warnings: &[PolicyWarning]) -> String {
    let mut s = format!(
        "{} entr{} cannot be enforced and match nothing; the rest of the policy is enforced: ",
        warnings.len(),
        if warnings.len() == 1 { "y" } else { "ies" }
    );
    let parts: Vec<String> = warnings
        .iter()
        .map(|w| format!("{}: {}", w.field, w.problem))
        .collect();
    s.push_str(&parts.join("; "));
    if s.len() > NOTE_MAX {
        let mut cut = NOTE_MAX - 3;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// The check's metrics.
#[derive(Debug, Clone, Default)]
pub struct PolicyCheckMetrics {
    /// NetworkPolicies with at least one entry the compiler cannot express.
    pub policies_with_warnings: Gauge,
    /// Such entries, over all policies.
    pub policy_warnings: Gauge,
    /// Warning Events recorded on policies.
    pub policy_warning_events: Counter,
}

impl PolicyCheckMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "underlay_controller_policies_with_warnings",
            "NetworkPolicies with at least one entry the compiler cannot express",
            m.policies_with_warnings.clone(),
        );
        registry.register(
            "underlay_controller_policy_warnings",
            "Entries of NetworkPolicies the compiler cannot express (they match nothing)",
            m.policy_warnings.clone(),
        );
        registry.register(
            "underlay_controller_policy_warning_events",
            "Warning Events recorded on NetworkPolicies",
            m.policy_warning_events.clone(),
        );
        m
    }
}

/// Watch every NetworkPolicy; record a Warning Event on each whose warnings changed, while `leading` is true
/// (`None`: always). Runs until the client's watch ends for good (never, with the backoff).
pub async fn run_policy_check(
    client: Client,
    metrics: PolicyCheckMetrics,
    leading: Option<watch::Receiver<bool>>,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: names::FIELD_MANAGER_CONTROLLER.to_string(),
            instance: None,
        },
    );
    let api: Api<NetworkPolicy> = Api::all(client);
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut check = PolicyCheck::default();
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "NetworkPolicy watch failed; retrying");
                continue;
            }
        };
        let report = check.apply(event);
        metrics
            .policies_with_warnings
            .set(check.policies_with_warnings() as i64);
        metrics.policy_warnings.set(check.warnings() as i64);
        let Some((np, warnings)) = report else {
            continue;
        };
        for w in &warnings {
            tracing::warn!(policy = %w.policy, field = %w.field, problem = %w.problem, "NetworkPolicy entry cannot be enforced");
        }
        if leading.as_ref().is_some_and(|l| !*l.borrow()) {
            continue;
        }
        let ev = KubeEvent {
            type_: EventType::Warning,
            reason: REASON_POLICY_NOT_EXPRESSIBLE.to_string(),
            note: Some(note(&warnings)),
            action: ACTION_ENFORCE_VALID_PART.to_string(),
            secondary: None,
        };
        match recorder.publish(&ev, &np.object_ref(&())).await {
            Ok(()) => {
                metrics.policy_warning_events.inc();
            }
            Err(e) => tracing::debug!(error = %e, "recording event"),
        };
    }
}
