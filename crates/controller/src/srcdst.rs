//! Source/destination check off on every node's primary ENI (routed mode: a node sends and receives pod
//! addresses its ENI does not own). Idempotent and cheap: ENIs already seen off are remembered, so a steady
//! cluster makes no call at all; new ENIs are described in one call, and only those still checking get
//! ModifyNetworkInterfaceAttribute.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Serialize;
use underlay_cloud::{CloudError, EniFilter, EniId, ErrorKind, NetworkInterface};

use crate::config::ClusterNode;
use crate::lanes::{CloudLanes, Priority};

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SrcDstReport {
    /// ENIs described this pass (not yet known to be off).
    pub checked: Vec<EniId>,
    /// ENIs whose check this pass turned off.
    pub turned_off: Vec<EniId>,
    /// ENIs found already off.
    pub already_off: Vec<EniId>,
    /// ENIs that no longer exist (a node that is going away).
    pub missing: Vec<EniId>,
    pub errors: Vec<(EniId, CloudError)>,
    /// A retryable error stopped the pass: requeue.
    pub retryable: bool,
}

/// Remembers which primary ENIs are known to have the check off.
#[derive(Debug)]
pub struct SrcDstReconciler {
    lanes: Arc<dyn CloudLanes>,
    off: BTreeSet<EniId>,
}

impl SrcDstReconciler {
    pub fn new(lanes: Arc<dyn CloudLanes>) -> Self {
        Self {
            lanes,
            off: BTreeSet::new(),
        }
    }

    /// ENIs known to have the check off.
    pub fn known_off(&self) -> &BTreeSet<EniId> {
        &self.off
    }

    /// Forget every ENI: the next pass describes them all again (e.g. on a periodic resync, to catch a check
    /// someone turned back on).
    pub fn forget(&mut self) {
        self.off.clear();
    }

    pub async fn reconcile(&mut self, nodes: &[ClusterNode]) -> SrcDstReport {
        let mut report = SrcDstReport::default();
        let current: BTreeSet<&EniId> = nodes.iter().map(|n| &n.eni).collect();
        self.off.retain(|e| current.contains(e));
        let pending: Vec<EniId> = current
            .into_iter()
            .filter(|e| !self.off.contains(*e))
            .cloned()
            .collect();
        if pending.is_empty() {
            return report;
        }
        let cloud = self.lanes.lane(Priority::Normal);
        report.checked = pending.clone();
        let enis = match describe(cloud, &pending).await {
            Ok(e) => e,
            // One vanished ENI fails the whole filtered call: describe one by one.
            Err(e) if e.kind == ErrorKind::NotFound => {
                let mut found = Vec::new();
                for id in &pending {
                    match describe(cloud, std::slice::from_ref(id)).await {
                        Ok(mut e) => found.append(&mut e),
                        Err(e) if e.kind == ErrorKind::NotFound => report.missing.push(id.clone()),
                        Err(e) => {
                            report.retryable |= e.is_retryable();
                            report.errors.push((id.clone(), e));
                            if report.retryable {
                                return report;
                            }
                        }
                    }
                }
                found
            }
            Err(e) => {
                report.retryable = e.is_retryable();
                for id in pending {
                    report.errors.push((id, e.clone()));
                }
                return report;
            }
        };
        for eni in enis {
            if !eni.source_dest_check {
                self.off.insert(eni.id.clone());
                report.already_off.push(eni.id);
                continue;
            }
            match cloud.set_source_dest_check(&eni.id, false).await {
                Ok(()) => {
                    tracing::info!(eni = %eni.id, "source/dest check turned off");
                    self.off.insert(eni.id.clone());
                    report.turned_off.push(eni.id);
                }
                Err(e) => {
                    let retryable = e.is_retryable();
                    tracing::warn!(eni = %eni.id, error = %e, "turning source/dest check off failed");
                    report.errors.push((eni.id, e));
                    if retryable {
                        report.retryable = true;
                        return report;
                    }
                }
            }
        }
        report
    }
}

async fn describe(
    cloud: &dyn underlay_cloud::Cloud,
    ids: &[EniId],
) -> Result<Vec<NetworkInterface>, CloudError> {
    cloud
        .describe_network_interfaces(&EniFilter {
            ids: ids.to_vec(),
            ..Default::default()
        })
        .await
}
