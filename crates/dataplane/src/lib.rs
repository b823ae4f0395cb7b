//! underlay-dataplane: the only place in underlay that enters a network namespace or talks netlink.
//!
//! ```text
//!   Netns (fd of /run/netns/<name>, a path, or the caller's own)
//!     │ run(f): a dedicated OS thread setns()es into it, runs f, exits
//!     ├─► Netlink  (NETLINK_ROUTE socket opened on that thread; stays bound to the namespace)
//!     │     links (veth) · addresses · routes · rules · neighbours   — typed, synchronous
//!     ├─► sysctl   (/proc/sys opened on that thread, so it is the namespace's view)
//!     └─► fastpath (feature `fastpath`): the tc-BPF programs of bpf/ (system clang, build.rs), loaded by
//!                  aya, attached to tc hooks on that thread; their maps (docs/datapath.md)
//! ```
//!
//! Namespaces are never switched on a caller's thread, so this is safe to use from a tokio worker: the worker
//! only ever holds a socket that was opened elsewhere. The netlink path is synchronous (one request, one
//! acknowledgement) because its main user, the short-lived CNI plugin, pays for every thread and allocation;
//! async callers can hand [`Netns::open_socket`]'s socket to rtnetlink's `from_socket`.
//!
//! "Already exists" and "not found" are turned into success in exactly one place: [`ResultExt`].

mod error;
#[cfg(feature = "fastpath")]
pub mod fastpath;
mod netlink;
mod netns;
#[cfg(feature = "test-util")]
pub mod testns;

pub use error::{Error, ResultExt};
pub use netlink::{Link, Neighbour, Netlink, Route, RouteScope, Rule, VethSpec};
pub use netns::Netns;

/// Result of every dataplane operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A MAC address.
pub type Mac = [u8; 6];

/// Formats a MAC address the way `ip link` prints it.
pub fn format_mac(mac: &Mac) -> String {
    let mut out = String::with_capacity(17);
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        out.push_str(&format!("{b:02x}"));
    }
    out
}
