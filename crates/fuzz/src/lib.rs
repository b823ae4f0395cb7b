//! underlay-fuzz: one fuzz target per parser fed from outside, each a `fn(&[u8])` that must return for every
//! input — an error is fine, a panic, a hang or an unbounded allocation is a bug in the owning crate.
//!
//! ```text
//!   fuzz/corpus/<target>/*  ──┐
//!   proptest: bytes, mutated  ├──► TARGETS[i].run(&[u8]) ──► the crate's own parser and what it feeds
//!   seeds, structured inputs ─┘        (tests/fuzz.rs: `make test`, bounded; `make fuzz` fallback)
//!   libFuzzer (cargo-fuzz, nightly) ───► fuzz/fuzz_targets/<target>.rs calls the same function (`make fuzz`)
//! ```
//!
//! | target | input | owner |
//! |---|---|---|
//! | `cni_invocation` | `KEY=VALUE` env lines, a blank line, then the plugin's stdin | crates/cni |
//! | `cni_conflist` | a conflist, each entry given to the plugin as the runtime would | crates/cni |
//! | `ipam_frames` | a pool selector byte, then length-prefixed `Request` frames to the agent's IPAM service | crates/agent, crates/ipam-api |
//! | `checkpoint` | an IPAM checkpoint file, restored over a block and an address pool | crates/agent, crates/core |
//! | `agent_config` | the agent's YAML config, or a routed node record file | crates/agent |
//! | `node_record` | an `UnderlayNode` (JSON) as the agent reads it, turned into both modes' specs and plans | crates/agent, crates/core |
//! | `plan_topology` | `underlay plan --topology` YAML, planned from scratch and incrementally | crates/core |
//! | `network_policy` | a NetworkPolicy (YAML or JSON), converted, validated, compiled for a node, diffed, evaluated | crates/api, crates/core |
//!
//! How to run them, where the corpus lives and how a crash becomes a regression test: docs/fuzzing.md.

pub mod generate;
pub mod mutate;
pub mod targets;

/// One fuzz target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Also the directory under `fuzz/corpus/` and the cargo-fuzz target name.
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, in the order `make fuzz` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "cni_invocation",
        run: targets::cni_invocation,
    },
    Target {
        name: "cni_conflist",
        run: targets::cni_conflist,
    },
    Target {
        name: "ipam_frames",
        run: targets::ipam_frames,
    },
    Target {
        name: "checkpoint",
        run: targets::checkpoint,
    },
    Target {
        name: "agent_config",
        run: targets::agent_config,
    },
    Target {
        name: "node_record",
        run: targets::node_record,
    },
    Target {
        name: "plan_topology",
        run: targets::plan_topology,
    },
    Target {
        name: "network_policy",
        run: targets::network_policy,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The checked-in corpus directory (`fuzz/corpus` at the repository root).
pub fn corpus_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

/// Every file of `fuzz/corpus/<name>/`, sorted by file name: `(file name, bytes)`.
pub fn corpus(name: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_root().join(name);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .filter_map(|e| {
                    let bytes = std::fs::read(e.path()).ok()?;
                    Some((e.file_name().to_string_lossy().into_owned(), bytes))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}
