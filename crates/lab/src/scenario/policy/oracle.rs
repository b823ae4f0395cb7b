//! The expected matrix: what the API's semantics say for a [`World`], per protocol and port.
//!
//! Loopback is always reachable (a pod talking to itself never leaves its namespace, so no node-side policy sees
//! it), as the e2e suite's `AllowLoopback` has it.

use super::model::World;
use super::probe::Protocol;
use super::table::TruthTable;

/// Computes the expected truth table of a world for one protocol and port.
pub trait Evaluator {
    /// A short name for reports.
    fn name(&self) -> &'static str;
    fn table(&self, world: &World, proto: Protocol, port: u16) -> anyhow::Result<TruthTable>;
}

/// Sets every `p → p` cell reachable.
pub fn allow_loopback(t: &mut TruthTable) {
    for k in t.froms.clone() {
        t.set(&k, &k, true);
    }
}

/// The evaluator that knows only the world without policies: everything reachable. Any policy is an error, not a
/// guess.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPolicies;

impl Evaluator for NoPolicies {
    fn name(&self) -> &'static str {
        "no-policies"
    }

    fn table(&self, world: &World, _: Protocol, _: u16) -> anyhow::Result<TruthTable> {
        if !world.policies.is_empty() {
            anyhow::bail!(
                "no evaluator of NetworkPolicy semantics is available: give this case's tables in `expect`"
            );
        }
        Ok(TruthTable::filled(world.keys(), world.keys(), true))
    }
}
