//! The tc-BPF fast path: loads `bpf/fastpath.bpf.c` (compiled by the system clang in build.rs) with aya,
//! attaches its two programs to tc ingress in a node's namespace, and keeps its three maps.
//!
//! ```text
//!   uplink (eth0 / ENI devices) ── ingress: ul_fp_uplink ──► redirect_peer ──► pod's eth0 (ingress)
//!   pod's host veth (ul…)       ── ingress: ul_fp_pod ─┬──► redirect_peer ──► another local pod
//!                                                      └──► fib lookup ─► redirect_neigh ─► uplink (egress)
//!                               ── egress:  ul_fp_to_pod: records flows the kernel delivers (ul_fp_kflows)
//!   maps: ul_fp_pods (pod → host veth) · ul_fp_inside (VPC + pod CIDR, LPM) · ul_fp_uplinks (allowed egress)
//!         · ul_fp_kflows (pod ends of flows the kernel carries: they stay with it)
//! ```
//!
//! Everything is attached with [`names::FASTPATH_TC_PRIORITY`] and found again by program name, so attach and
//! detach are idempotent and touch no one else's filters. A packet the programs do not recognise as safe to
//! skip (see the C file's header) takes the kernel's path, so an empty `ul_fp_pods` is the kernel path exactly.
//!
//! [`FastPath::load`] is the kernel probe: it fails cleanly (verifier rejection, no BPF, an unknown helper)
//! and the caller then runs without the fast path.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use aya::Ebpf;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::tc::{self, NlOptions, SchedClassifier, TcAttachOptions, TcError, TcHandle};
use aya::programs::{ProgramError, TcAttachType};
use ipnet::Ipv4Net;
use underlay_core::names;

use crate::Netns;

/// The compiled object, aligned as aya wants it.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fastpath.bpf.o"));

/// Why the fast path could not be loaded or changed.
#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    /// The kernel refused the object or a program (no BPF, no tc, an unknown helper, the verifier).
    #[error("loading the fast path: {0}")]
    Load(String),
    /// Attaching or detaching on a device failed.
    #[error("{op}: {detail}")]
    Attach { op: String, detail: String },
    /// A map update failed.
    #[error("fast path map {map}: {detail}")]
    Map { map: &'static str, detail: String },
    #[error(transparent)]
    Netns(#[from] crate::Error),
}

impl FastPathError {
    /// Worth retrying on the next pass (a device that went away, a busy kernel).
    pub fn is_retryable(&self) -> bool {
        matches!(self, FastPathError::Attach { .. } | FastPathError::Netns(_))
    }
}

type Result<T> = std::result::Result<T, FastPathError>;

/// Which program a device gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An uplink: packets from the VPC to local pods.
    Uplink,
    /// A pod's host-side veth: packets the pod sends.
    Pod,
}

impl Role {
    /// The programs this role attaches, with their hooks.
    pub fn programs(self) -> &'static [(&'static str, TcAttachType)] {
        match self {
            Role::Uplink => &[(names::FASTPATH_PROG_UPLINK, TcAttachType::Ingress)],
            Role::Pod => &[
                (names::FASTPATH_PROG_POD, TcAttachType::Ingress),
                (names::FASTPATH_PROG_TO_POD, TcAttachType::Egress),
            ],
        }
    }
}

/// Every program of the object, with its hook.
const ALL_PROGRAMS: [(&str, TcAttachType); 3] = [
    (names::FASTPATH_PROG_UPLINK, TcAttachType::Ingress),
    (names::FASTPATH_PROG_POD, TcAttachType::Ingress),
    (names::FASTPATH_PROG_TO_POD, TcAttachType::Egress),
];

/// The loaded programs and their maps. Programs stay attached when this is dropped (the filters hold them);
/// [`FastPath::detach`] removes them.
pub struct FastPath {
    ebpf: Ebpf,
    pods: BpfHashMap<MapData, u32, u32>,
    inside: LpmTrie<MapData, u32, u8>,
    uplinks: BpfHashMap<MapData, u32, u8>,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath").finish_non_exhaustive()
    }
}

fn load_err(e: impl std::fmt::Display) -> FastPathError {
    FastPathError::Load(e.to_string())
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> FastPathError {
    move |e| FastPathError::Map {
        map,
        detail: e.to_string(),
    }
}

fn key(addr: Ipv4Addr) -> u32 {
    // The programs read addresses straight from the header: network byte order in memory.
    u32::from_ne_bytes(addr.octets())
}

impl FastPath {
    /// Loads the object and both programs into the kernel (maps created, programs verified, nothing attached).
    pub fn load() -> Result<FastPath> {
        let mut ebpf = Ebpf::load(OBJECT).map_err(load_err)?;
        for (name, _) in ALL_PROGRAMS {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| load_err(format!("program {name} missing from the object")))?
                .try_into()
                .map_err(|e: ProgramError| load_err(format!("{name}: {e}")))?;
            prog.load().map_err(|e| load_err(format!("{name}: {e}")))?;
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .ok_or_else(|| load_err(format!("map {name} missing from the object")))
        };
        let pods = BpfHashMap::try_from(take(&mut ebpf, names::FASTPATH_MAP_PODS)?)
            .map_err(map_err(names::FASTPATH_MAP_PODS))?;
        let inside = LpmTrie::try_from(take(&mut ebpf, names::FASTPATH_MAP_INSIDE)?)
            .map_err(map_err(names::FASTPATH_MAP_INSIDE))?;
        let uplinks = BpfHashMap::try_from(take(&mut ebpf, names::FASTPATH_MAP_UPLINKS)?)
            .map_err(map_err(names::FASTPATH_MAP_UPLINKS))?;
        Ok(FastPath {
            ebpf,
            pods,
            inside,
            uplinks,
        })
    }

    /// Attaches `role`'s programs to `dev` in `ns` (adding the clsact qdisc if needed), replacing fast-path
    /// filters already there (this process's or a previous one's).
    pub fn attach(&mut self, ns: &Netns, dev: &str, role: Role) -> Result<()> {
        for &(name, hook) in role.programs() {
            self.attach_one(ns, dev, name, hook)?;
        }
        Ok(())
    }

    fn attach_one(
        &mut self,
        ns: &Netns,
        dev: &str,
        name: &'static str,
        hook: TcAttachType,
    ) -> Result<()> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| load_err(format!("program {name} missing")))?
            .try_into()
            .map_err(|e: ProgramError| load_err(e))?;
        let dev_owned = dev.to_string();
        ns.run(move || {
            Ok((|| -> Result<()> {
                let op = |what: &str| format!("{what} {} on {dev_owned}", name);
                match tc::qdisc_add_clsact(&dev_owned) {
                    Ok(()) => {}
                    Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => {
                        return Err(FastPathError::Attach {
                            op: op("clsact for"),
                            detail: e.to_string(),
                        });
                    }
                }
                detach_named(&dev_owned, name, hook).map_err(|detail| FastPathError::Attach {
                    op: op("replace"),
                    detail,
                })?;
                let id = prog
                    .attach_with_options(
                        &dev_owned,
                        hook,
                        TcAttachOptions::Netlink(NlOptions {
                            priority: names::FASTPATH_TC_PRIORITY,
                            handle: TcHandle::new(0, 1),
                            classid: None,
                        }),
                    )
                    .map_err(|e| FastPathError::Attach {
                        op: op("attach"),
                        detail: e.to_string(),
                    })?;
                // The filter lives in the kernel until `detach` (or the device) removes it; aya's link would
                // detach it on drop, from whatever namespace the dropping thread is in.
                let link = prog.take_link(id).map_err(|e| FastPathError::Attach {
                    op: op("take link of"),
                    detail: e.to_string(),
                })?;
                std::mem::forget(link);
                Ok(())
            })())
        })?
    }

    /// Removes the fast path's filters (both programs) from `dev` in `ns`, and the clsact qdisc when it holds
    /// no other filter. A missing device or filter is success.
    pub fn detach(ns: &Netns, dev: &str) -> Result<()> {
        let dev_owned = dev.to_string();
        ns.run(move || {
            let mut nl = crate::Netlink::open_here()?;
            let Some(link) = nl.link_by_name(&dev_owned)? else {
                return Ok(Ok(()));
            };
            for (name, hook) in ALL_PROGRAMS {
                if let Err(detail) = detach_named(&dev_owned, name, hook) {
                    return Ok(Err(FastPathError::Attach {
                        op: format!("detach {name} from {dev_owned}"),
                        detail,
                    }));
                }
            }
            if nl.has_clsact(link.index)?
                && nl.tc_bpf_filters(link.index, true)?.is_empty()
                && nl.tc_bpf_filters(link.index, false)?.is_empty()
            {
                nl.clsact_del(link.index)?;
            }
            Ok(Ok(()))
        })?
    }

    /// Replaces the prefixes the fast path serves (the VPC's CIDRs and the pod CIDR).
    pub fn set_inside(&mut self, cidrs: &[Ipv4Net]) -> Result<()> {
        let want: Vec<(u32, u32)> = cidrs
            .iter()
            .map(|c| (u32::from(c.prefix_len()), key(c.network())))
            .collect();
        let have: Vec<Key<u32>> = self
            .inside
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(names::FASTPATH_MAP_INSIDE))?;
        for k in have {
            if !want.contains(&(k.prefix_len(), k.data())) {
                self.inside
                    .remove(&k)
                    .map_err(map_err(names::FASTPATH_MAP_INSIDE))?;
            }
        }
        for (len, data) in want {
            self.inside
                .insert(&Key::new(len, data), 1, 0)
                .map_err(map_err(names::FASTPATH_MAP_INSIDE))?;
        }
        Ok(())
    }

    /// Replaces the devices pods' packets may leave by.
    pub fn set_uplinks(&mut self, ifindexes: &[u32]) -> Result<()> {
        let have: Vec<u32> = self
            .uplinks
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(names::FASTPATH_MAP_UPLINKS))?;
        for k in have.iter().filter(|k| !ifindexes.contains(k)) {
            self.uplinks
                .remove(k)
                .map_err(map_err(names::FASTPATH_MAP_UPLINKS))?;
        }
        for i in ifindexes {
            self.uplinks
                .insert(i, 1, 0)
                .map_err(map_err(names::FASTPATH_MAP_UPLINKS))?;
        }
        Ok(())
    }

    /// The pods in the map now (address → host veth ifindex).
    pub fn pods(&self) -> Result<BTreeMap<Ipv4Addr, u32>> {
        self.pods
            .iter()
            .map(|r| r.map(|(k, v)| (Ipv4Addr::from(k.to_ne_bytes()), v)))
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(names::FASTPATH_MAP_PODS))
    }

    /// How many flows the kernel carries by the fast path's record (entries of `ul_fp_kflows`).
    pub fn kernel_flows(&self) -> Result<usize> {
        let map = self
            .ebpf
            .map(names::FASTPATH_MAP_KFLOWS)
            .ok_or_else(|| load_err("map ul_fp_kflows missing"))?;
        let kflows: BpfHashMap<&MapData, [u8; 8], u64> =
            BpfHashMap::try_from(map).map_err(map_err(names::FASTPATH_MAP_KFLOWS))?;
        Ok(kflows.keys().count())
    }

    /// Adds or updates one pod.
    pub fn insert_pod(&mut self, addr: Ipv4Addr, veth_ifindex: u32) -> Result<()> {
        self.pods
            .insert(key(addr), veth_ifindex, 0)
            .map_err(map_err(names::FASTPATH_MAP_PODS))
    }

    /// Removes one pod; absent is success. After this returns, no packet to or from it takes the fast path.
    pub fn remove_pod(&mut self, addr: Ipv4Addr) -> Result<()> {
        match self.pods.remove(&key(addr)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(map_err(names::FASTPATH_MAP_PODS)(e)),
        }
    }
}

/// Deletes the filters called `name` on `dev`'s `hook` (in the calling thread's namespace); none is success.
fn detach_named(dev: &str, name: &str, hook: TcAttachType) -> std::result::Result<(), String> {
    match tc::qdisc_detach_program(dev, hook, name) {
        Ok(()) => Ok(()),
        Err(TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(TcError::NetlinkError(e))
            if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINVAL)) =>
        {
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}
