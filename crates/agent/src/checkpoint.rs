//! The IPAM checkpoint: versioned JSON, replaced atomically on every change.
//!
//! ```json
//! { "version": 1,
//!   "allocations": [ { "key": {"container_id": "…", "ifname": "eth0"}, "address": "100.64.1.5",
//!                      "netns": "/var/run/netns/cni-…", "pod_namespace": "default", "pod_name": "web-0" } ],
//!   "cooling": [ { "address": "100.64.1.4", "until_unix_ms": 1800000060000 } ],
//!   "cursor": 6 }
//! ```
//!
//! Write: serialize → `<file>.tmp` → fsync(file) → rename over `<file>` → fsync(directory). A crash at any
//! point leaves either the old or the new checkpoint, never a torn one. Load: a missing file is a first
//! start (empty state); anything unreadable or unparsable is an error (corrupt).
//!
//! Compatibility across a rollout or a rollback of the DaemonSet: this build writes exactly version 1 as the
//! first release did (no new field, so that release reads it back), and reads version 1 and any later version
//! whose fields it knows, ignoring fields it does not know (at the top and in each allocation): a newer agent that
//! adds fields must keep the meaning of these. A later version missing one of them is corrupt to this build.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use underlay_core::ipam::{Allocation, Cooling, IpamState};

use crate::AgentError;

/// The format version this build writes and reads.
pub const CHECKPOINT_VERSION: u32 = 1;

/// Version 1, the format since the first release. Unknown fields are ignored (a later version's additions).
#[derive(Debug, Serialize, Deserialize)]
struct FileV1 {
    version: u32,
    allocations: Vec<Allocation>,
    cooling: Vec<Cooling>,
    cursor: usize,
}

#[derive(Debug, Deserialize)]
struct VersionOnly {
    version: u32,
}

/// A checkpoint file on disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    path: PathBuf,
    tmp: PathBuf,
}

impl Checkpoint {
    pub fn new(path: impl Into<PathBuf>) -> Checkpoint {
        let path = path.into();
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        Checkpoint {
            path,
            tmp: tmp.into(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the checkpoint. `Ok(None)` when there is none yet.
    pub fn load(&self) -> Result<Option<IpamState>, AgentError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(AgentError::Io {
                    what: "read the IPAM checkpoint",
                    path: self.path.clone(),
                    source: e,
                });
            }
        };
        parse(&bytes)
            .map(Some)
            .map_err(|reason| AgentError::CorruptCheckpoint {
                path: self.path.clone(),
                reason,
            })
    }

    /// Replaces the checkpoint with `state`, durably, before returning.
    pub fn save(&self, state: &IpamState) -> Result<(), AgentError> {
        let file = FileV1 {
            version: CHECKPOINT_VERSION,
            allocations: state.allocations.clone(),
            cooling: state.cooling.clone(),
            cursor: state.cursor,
        };
        let bytes = serde_json::to_vec(&file).expect("the checkpoint is plain data");
        let io = |what: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| AgentError::Io { what, path, source }
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.tmp)
            .map_err(io("create the checkpoint temp file", &self.tmp))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io("write the checkpoint temp file", &self.tmp))?;
        drop(f);
        fs::rename(&self.tmp, &self.path).map_err(io("rename the checkpoint", &self.path))?;
        sync_dir(&self.path).map_err(io("sync the checkpoint directory", &self.path))
    }
}

/// Parses a checkpoint file's bytes (what [`Checkpoint::load`] does after reading them). `Err` says why the
/// bytes are corrupt. Pure, for the fuzz targets as much as for `load`.
pub fn parse(bytes: &[u8]) -> Result<IpamState, String> {
    let v: VersionOnly = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if v.version < CHECKPOINT_VERSION {
        return Err(format!(
            "version {} is not a version any release wrote",
            v.version
        ));
    }
    if v.version > CHECKPOINT_VERSION {
        tracing::warn!(
            version = v.version,
            reads = CHECKPOINT_VERSION,
            "IPAM checkpoint written by a newer agent: reading the fields this one knows"
        );
    }
    let f: FileV1 = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    Ok(IpamState {
        allocations: f.allocations,
        cooling: f.cooling,
        cursor: f.cursor,
    })
}

/// fsyncs the directory holding `path`, so a rename into it survives a power loss.
pub(crate) fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};
    use underlay_core::ipam::{AttachmentKey, Ipam, PodInfo, PoolSpec};

    fn mk_state() -> IpamState {
        let mut ipam = Ipam::new(
            PoolSpec::Block("100.64.1.0/29".parse().unwrap()),
            Duration::from_secs(60),
        )
        .unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for i in 0..4 {
            ipam.allocate(
                &AttachmentKey::new(format!("c{i}"), "eth0"),
                PodInfo {
                    netns: format!("/var/run/netns/p{i}"),
                    pod_namespace: "default".into(),
                    pod_name: format!("web-{i}"),
                },
                now,
            )
            .unwrap();
        }
        ipam.release(&AttachmentKey::new("c1", "eth0"), now);
        ipam.snapshot()
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::new(dir.path().join("ipam.json"));
        assert_eq!(cp.load().unwrap(), None);
        let state = mk_state();
        cp.save(&state).unwrap();
        assert_eq!(cp.load().unwrap(), Some(state.clone()));
        assert!(!dir.path().join("ipam.json.tmp").exists());
        let text = fs::read_to_string(cp.path()).unwrap();
        assert!(text.starts_with("{\"version\":1,"), "{text}");
        assert!(text.contains("\"until_unix_ms\":1800000060000"), "{text}");
    }

    /// A checkpoint byte for byte as the first release (commit 1c5a4e2) wrote it, and as an `eni`-mode agent of
    /// that format wrote it (with `egress`): read back whole, and written again in the same format.
    #[test]
    fn the_previous_release_checkpoint_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::new(dir.path().join("ipam.json"));
        let previous = r#"{"version":1,"allocations":[{"key":{"container_id":"c0","ifname":"eth0"},"address":"100.64.1.0","netns":"/var/run/netns/p0","pod_namespace":"default","pod_name":"web-0"},{"key":{"container_id":"c2","ifname":"eth0"},"address":"198.18.0.21","egress":{"interface":"eth1","route_table":30209}}],"cooling":[{"address":"100.64.1.1","until_unix_ms":1800000060000}],"cursor":4}"#;
        fs::write(cp.path(), previous).unwrap();
        let state = cp.load().unwrap().unwrap();
        assert_eq!(state.allocations.len(), 2);
        assert_eq!(state.allocations[0].pod.pod_name, "web-0");
        assert_eq!(
            state.allocations[1].egress.as_ref().unwrap().interface,
            "eth1"
        );
        assert_eq!(state.cooling[0].until_unix_ms, 1_800_000_060_000);
        assert_eq!(state.cursor, 4);
        cp.save(&state).unwrap();
        assert_eq!(fs::read_to_string(cp.path()).unwrap(), previous);
    }

    /// A later version's checkpoint with fields this build does not know, at the top and in an allocation.
    #[test]
    fn a_newer_checkpoint_is_read_ignoring_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::new(dir.path().join("ipam.json"));
        fs::write(
            cp.path(),
            r#"{"version":2,"generation":7,"allocations":[{"key":{"container_id":"c0","ifname":"eth0"},"address":"100.64.1.0","pod_uid":"u-1","netns":"/var/run/netns/p0"}],"cooling":[],"cursor":1,"sandboxes":{"c0":"gone"}}"#,
        )
        .unwrap();
        let state = cp.load().unwrap().unwrap();
        assert_eq!(state.allocations.len(), 1);
        assert_eq!(state.allocations[0].address.to_string(), "100.64.1.0");
        assert_eq!(state.cursor, 1);
    }

    #[test]
    fn corrupt_or_unknown_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::new(dir.path().join("ipam.json"));
        for bad in [
            "",
            "{",
            "{\"version\":1}",
            "{\"version\":0,\"allocations\":[],\"cooling\":[],\"cursor\":0}",
            "{\"version\":2,\"cooling\":[],\"cursor\":0}",
            "[]",
        ] {
            fs::write(cp.path(), bad).unwrap();
            let err = cp.load().unwrap_err();
            assert!(
                matches!(err, AgentError::CorruptCheckpoint { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn leftover_temp_file_does_not_matter() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::new(dir.path().join("ipam.json"));
        let state = mk_state();
        cp.save(&state).unwrap();
        // A crash after writing the temp file but before the rename leaves this behind.
        fs::write(dir.path().join("ipam.json.tmp"), "{ torn").unwrap();
        assert_eq!(cp.load().unwrap(), Some(state.clone()));
        cp.save(&state).unwrap();
        assert_eq!(cp.load().unwrap(), Some(state));
    }
}
