//! Deterministic host veth names and MACs of an attachment; the definitions live in `underlay-core`, shared
//! with the agent, which reaps the veths DEL hands it and sweeps orphans.

pub use underlay_core::veth_names::{HOST_VETH_PREFIX, host_veth_name, is_host_veth_name, macs};
