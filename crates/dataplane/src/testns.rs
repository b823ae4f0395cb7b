//! Named network namespaces for tests and benchmarks, deleted on every exit path.
//!
//! Each [`TestNs`] gets a unique name `<prefix>-<pid>-<n>`, so parallel tests and a crashed earlier run never
//! collide, and its `Drop` deletes it (which also deletes every veth end inside it). Namespaces are created with
//! `ip netns add` so that they look exactly like the ones runtimes and operators use.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{Error, Netns, Result};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named namespace that exists for the lifetime of this value.
#[derive(Debug)]
pub struct TestNs {
    name: String,
    ns: Netns,
}

impl TestNs {
    /// Creates `<prefix>-<pid>-<n>` with `lo` up.
    pub fn new(prefix: &str) -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        run_ip(&["netns", "add", &name])?;
        // From here on, Drop owns the cleanup.
        let guard = Removal(name.clone());
        let ns = Netns::named(&name)?;
        let mut nl = ns.netlink()?;
        if let Some(lo) = nl.link_by_name("lo")? {
            nl.link_set_up(lo.index, true)?;
        }
        std::mem::forget(guard);
        Ok(TestNs { name, ns })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`, what CNI_NETNS would carry.
    pub fn path(&self) -> String {
        format!("{}/{}", crate::netns::NETNS_RUN_DIR, self.name)
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// A command that runs inside this namespace (`nsenter --net=<path> <program>`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path())).arg(program);
        c
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Removal(self.name.clone());
    }
}

struct Removal(String);

impl Drop for Removal {
    fn drop(&mut self) {
        let _ = run_ip(&["netns", "del", &self.0]);
    }
}

/// Deletes namespaces whose name starts with `prefix-` (leftovers of runs that were killed).
pub fn sweep(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(crate::netns::NETNS_RUN_DIR) else {
        return;
    };
    let want = format!("{prefix}-");
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(&want) {
            let _ = run_ip(&["netns", "del", &name]);
        }
    }
}

fn run_ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| Error::kernel(format!("ip {}", args.join(" ")), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Protocol {
            op: format!("ip {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
