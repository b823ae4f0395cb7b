//! Network namespace handles. Entering a namespace happens here and only here, on a short-lived OS thread of
//! our own: namespace membership is per thread, and a thread that has switched must never run anything else
//! (a tokio worker, a pooled thread). The one exception, [`Netns::netlink_in_place`], is for single-threaded
//! synchronous processes and switches back before it returns.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

use crate::netlink::Netlink;
use crate::{Error, Result};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// An open network namespace: a file descriptor of its nsfs inode and the path it was opened from.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens `/var/run/netns/<name>` (what `ip netns add <name>` creates).
    pub fn named(name: &str) -> Result<Self> {
        Self::open(Path::new(NETNS_RUN_DIR).join(name))
    }

    /// Opens a namespace by path (`/var/run/netns/x`, `/proc/<pid>/ns/net`, a CNI_NETNS path).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)
            .map_err(|e| Error::kernel(format!("open netns {}", path.display()), e))?;
        Ok(Netns { file, path })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self> {
        Self::open("/proc/thread-self/ns/net")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn as_fd_raw(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// True when the calling thread is already in this namespace (same nsfs device and inode). Entering a
    /// namespace needs CAP_SYS_ADMIN even when it is one's own; a caller already inside needs no switch, so the
    /// node agent (hostNetwork, converging the namespace it runs in) works without that capability.
    pub fn is_current(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (
            self.file.metadata(),
            std::fs::metadata("/proc/thread-self/ns/net"),
        ) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    /// Runs `f` on a new OS thread that has entered this namespace; the thread ends with `f`. When the calling
    /// thread is already in it ([`Netns::is_current`]) the new thread inherits it and no `setns` happens.
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> Result<T> + Send,
        T: Send,
    {
        let fd: BorrowedFd<'_> = self.file.as_fd();
        let path = &self.path;
        let enter = !self.is_current();
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("netns".into())
                .stack_size(64 * 1024)
                .spawn_scoped(s, move || {
                    if enter {
                        setns(fd, CloneFlags::CLONE_NEWNET).map_err(|e| {
                            Error::kernel(format!("setns {}", path.display()), io::Error::from(e))
                        })?;
                    }
                    f()
                })
                .map_err(|e| Error::kernel("spawn netns thread", e))?
                .join()
                .map_err(|_| Error::Protocol {
                    op: format!("netns {}", path.display()),
                    detail: "thread panicked".into(),
                })?
        })
    }

    /// A NETLINK_ROUTE socket opened inside this namespace. It stays bound to the namespace for its lifetime,
    /// whichever thread uses it afterwards.
    pub fn netlink(&self) -> Result<Netlink> {
        self.run(Netlink::open_here)
    }

    /// Like [`Netns::netlink`] without the helper thread: the calling thread enters this namespace, opens the
    /// socket and returns to the namespace it was in. For single-threaded, synchronous processes only (the CNI
    /// plugin, where a thread spawn and join cost more than the whole switch), never on a tokio worker or
    /// a pooled thread. If the return fails the thread is left in this namespace and the error says so; the
    /// caller must then stop (sockets opened before stay bound to their own namespaces).
    pub fn netlink_in_place(&self) -> Result<Netlink> {
        if self.is_current() {
            return Netlink::open_here();
        }
        let home = Netns::current()?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
            Error::kernel(format!("setns {}", self.path.display()), io::Error::from(e))
        })?;
        let opened = Netlink::open_here();
        setns(home.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
            Error::kernel(
                format!(
                    "setns back from {} (this thread is left in it)",
                    self.path.display()
                ),
                io::Error::from(e),
            )
        })?;
        opened
    }

    /// The raw socket behind [`Netns::netlink`], for async callers (rtnetlink's `from_socket`).
    pub fn open_socket(&self) -> Result<netlink_sys::Socket> {
        self.run(crate::netlink::open_socket_here)
    }

    /// Writes a sysctl of this namespace, e.g. `net.ipv4.conf.eth0.rp_filter`. `/proc/sys/net` shows the
    /// namespace of the thread that opens it, so the file is opened on the namespace thread.
    pub fn write_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key);
        self.run(|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| Error::kernel(format!("open {}", path.display()), e))?;
            f.write_all(value.as_bytes())
                .map_err(|e| Error::kernel(format!("write {} = {value}", path.display()), e))
        })
    }

    /// Reads a sysctl of this namespace (trailing newline removed).
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key);
        self.run(|| {
            let mut s = String::new();
            File::open(&path)
                .and_then(|mut f| f.read_to_string(&mut s))
                .map_err(|e| Error::kernel(format!("read {}", path.display()), e))?;
            Ok(s.trim_end().to_string())
        })
    }

    /// Reads several sysctls of this namespace on one namespace thread: key → value, surrounding whitespace
    /// removed. A key that cannot be read (no such device, no such file) is left out rather than failing the
    /// whole read: an observer comparing against wanted values sees it as "not as wanted", and the write that
    /// follows reports the real error. Only entering the namespace fails the call.
    pub fn read_sysctls<I>(&self, keys: I) -> Result<BTreeMap<String, String>>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let keys: Vec<(String, PathBuf)> = keys
            .into_iter()
            .map(|k| {
                let k = k.into();
                let path = sysctl_path(&k);
                (k, path)
            })
            .collect();
        self.run(move || {
            let mut out = BTreeMap::new();
            for (k, path) in keys {
                let mut s = String::new();
                if File::open(&path)
                    .and_then(|mut f| f.read_to_string(&mut s))
                    .is_ok()
                {
                    out.insert(k, s.trim().to_string());
                }
            }
            Ok(out)
        })
    }

    /// The nsfs inode number: two handles with the same inode (and device) are the same namespace.
    pub fn inode(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let m = self
            .file
            .metadata()
            .map_err(|e| Error::kernel(format!("stat {}", self.path.display()), e))?;
        Ok(m.ino())
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// `net.ipv4.ip_forward` → `/proc/sys/net/ipv4/ip_forward`. Interface names may contain dots, so a key may also
/// be given with slashes (`net/ipv4/conf/eth0.100/rp_filter`).
fn sysctl_path(key: &str) -> PathBuf {
    let rel = if key.contains('/') {
        key.to_string()
    } else {
        key.replace('.', "/")
    };
    Path::new("/proc/sys").join(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_keys_map_to_proc_paths() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward"),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/rp_filter"),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/rp_filter")
        );
    }

    #[test]
    fn opening_a_missing_namespace_is_a_missing_error() {
        let e = Netns::open("/nonexistent/ns/net").unwrap_err();
        assert!(e.is_missing(), "{e}");
    }
}
