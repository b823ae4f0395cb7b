//! The agent's configuration file (YAML). Every field has a default except the pool.
//!
//! ```yaml
//! pool:
//!   block: 100.64.1.0/26            # routed mode; or:
//!   # addresses:                    # eni mode
//!   #   - { address: 198.18.1.10, egress_interface: eni1, route_table: 101 }
//! cooldown_secs: 60
//! socket: /run/underlay/agent.sock
//! checkpoint: /run/underlay/ipam.json
//! cni_conf_dir: /etc/cni/net.d
//! cni_bin_dir: /opt/cni/bin
//! mtu: 9001
//! plugin_source: /usr/local/lib/underlay/underlay-cni   # optional: no install when absent
//! chained_plugins_dir: /usr/local/lib/underlay/cni       # optional: portmap and bandwidth installed from it
//! cni_exclusive: false            # true: move every other CNI configuration in cni_conf_dir aside
//! reap_links: true
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use underlay_core::ipam::{DEFAULT_COOLDOWN, PoolAddress, PoolSpec};
use underlay_core::names;

use crate::AgentError;

/// Default pod MTU: the VPC's jumbo frames.
pub const DEFAULT_MTU: u32 = 9001;

/// The pool as written in the file: exactly one of `block` and `addresses`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<ipnet::Ipv4Net>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<PoolAddress>,
}

impl PoolConfig {
    pub fn to_spec(&self) -> Result<PoolSpec, AgentError> {
        match (&self.block, self.addresses.is_empty()) {
            (Some(b), true) => Ok(PoolSpec::Block(*b)),
            (None, false) => Ok(PoolSpec::Addresses(self.addresses.clone())),
            (Some(_), false) => Err(AgentError::Config(
                "pool: give either `block` or `addresses`, not both".into(),
            )),
            (None, true) => Err(AgentError::Config(
                "pool: no `block` or `addresses` configured".into(),
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(default)]
    pub pool: PoolConfig,
    /// Seconds a released address waits before reuse.
    #[serde(default = "default_cooldown_secs")]
    pub cooldown_secs: u64,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_checkpoint")]
    pub checkpoint: PathBuf,
    #[serde(default = "default_cni_conf_dir")]
    pub cni_conf_dir: PathBuf,
    #[serde(default = "default_cni_bin_dir")]
    pub cni_bin_dir: PathBuf,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// The `underlay-cni` binary to install into `cni_bin_dir`; nothing is installed when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_source: Option<PathBuf>,
    /// Directory holding the reference plugins the conflist chains (`portmap`, `bandwidth`), installed into
    /// `cni_bin_dir` next to `underlay-cni`; nothing is installed when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chained_plugins_dir: Option<PathBuf>,
    /// Move every other CNI configuration in `cni_conf_dir` aside (`<name>.underlay_bak`) when writing ours, so
    /// the runtime cannot pick another network (Cilium's `cni.exclusive`).
    #[serde(default)]
    pub cni_exclusive: bool,
    /// Run the link reaper: delete the veths DEL hands over and sweep orphaned pod veths (`ul` + 11 hex
    /// digits that no allocation owns) in the agent's network namespace. Off only for an agent that does
    /// not own its namespace's pod veths (tests running it outside a node namespace).
    #[serde(default = "default_true")]
    pub reap_links: bool,
    /// With `reap_links`: how often the agent looks for allocations whose sandbox is gone (netns file and host
    /// veth both absent), and how long one must stay gone before its address is reclaimed.
    #[serde(default = "default_reclaim_interval_secs")]
    pub reclaim_interval_secs: u64,
    #[serde(default = "default_reclaim_grace_secs")]
    pub reclaim_grace_secs: u64,
}

fn default_reclaim_interval_secs() -> u64 {
    30
}
fn default_reclaim_grace_secs() -> u64 {
    120
}

fn default_cooldown_secs() -> u64 {
    DEFAULT_COOLDOWN.as_secs()
}
fn default_socket() -> PathBuf {
    names::AGENT_SOCKET.into()
}
fn default_checkpoint() -> PathBuf {
    names::AGENT_CHECKPOINT.into()
}
fn default_cni_conf_dir() -> PathBuf {
    names::CNI_CONF_DIR.into()
}
fn default_cni_bin_dir() -> PathBuf {
    names::CNI_BIN_DIR.into()
}
fn default_mtu() -> u32 {
    DEFAULT_MTU
}
fn default_true() -> bool {
    true
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            pool: PoolConfig::default(),
            cooldown_secs: default_cooldown_secs(),
            socket: default_socket(),
            checkpoint: default_checkpoint(),
            cni_conf_dir: default_cni_conf_dir(),
            cni_bin_dir: default_cni_bin_dir(),
            mtu: default_mtu(),
            plugin_source: None,
            chained_plugins_dir: None,
            cni_exclusive: false,
            reap_links: true,
            reclaim_interval_secs: default_reclaim_interval_secs(),
            reclaim_grace_secs: default_reclaim_grace_secs(),
        }
    }
}

impl AgentConfig {
    pub fn from_yaml(text: &str) -> Result<AgentConfig, AgentError> {
        serde_yaml::from_str(text).map_err(|e| AgentError::Config(e.to_string()))
    }

    pub fn load(path: &Path) -> Result<AgentConfig, AgentError> {
        let text = std::fs::read_to_string(path).map_err(|e| AgentError::Io {
            what: "read the configuration file",
            path: path.to_owned(),
            source: e,
        })?;
        AgentConfig::from_yaml(&text)
            .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))
    }

    pub fn reclaim_interval(&self) -> Duration {
        Duration::from_secs(self.reclaim_interval_secs.max(1))
    }

    pub fn reclaim_grace(&self) -> Duration {
        Duration::from_secs(self.reclaim_grace_secs)
    }

    pub fn cooldown(&self) -> Duration {
        Duration::from_secs(self.cooldown_secs)
    }

    /// Checks the fields that have no safe default.
    pub fn validate(&self) -> Result<PoolSpec, AgentError> {
        if !(576..=65535).contains(&self.mtu) {
            return Err(AgentError::Config(format!(
                "mtu {} is outside 576..=65535",
                self.mtu
            )));
        }
        self.pool.to_spec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_file_gets_defaults() {
        let c = AgentConfig::from_yaml("pool:\n  block: 100.64.1.0/26\n").unwrap();
        assert_eq!(c.socket, Path::new(names::AGENT_SOCKET));
        assert_eq!(c.cooldown(), DEFAULT_COOLDOWN);
        assert_eq!(c.mtu, DEFAULT_MTU);
        assert!(c.reap_links);
        assert_eq!(
            c.validate().unwrap(),
            PoolSpec::Block("100.64.1.0/26".parse().unwrap())
        );
    }

    #[test]
    fn eni_pool_and_errors() {
        let c = AgentConfig::from_yaml(
            "pool:\n  addresses:\n    - { address: 198.18.1.10, egress_interface: eni1, route_table: 101 }\n",
        )
        .unwrap();
        assert!(matches!(c.validate().unwrap(), PoolSpec::Addresses(a) if a.len() == 1));
        assert!(
            AgentConfig::from_yaml("pool: {}\n")
                .unwrap()
                .validate()
                .is_err()
        );
        assert!(AgentConfig::from_yaml("pool:\n  block: 100.64.1.0/26\nsokcet: /x\n").is_err());
        let both = "pool:\n  block: 100.64.1.0/26\n  addresses:\n    - { address: 198.18.1.10, egress_interface: eni1, route_table: 101 }\n";
        assert!(AgentConfig::from_yaml(both).unwrap().validate().is_err());
    }
}
