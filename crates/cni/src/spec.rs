//! The CNI protocol: versions, error codes and JSON shapes (spec 1.1.0, with 0.4.0 and 1.0.0 results).
//! Pure: no I/O.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Spec versions this plugin accepts, oldest first. The last is the newest.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
/// The newest supported version (answers VERSION without input).
pub const LATEST_VERSION: &str = "1.1.0";

/// Well-known error codes of the spec (section "Error"), plus this plugin's own (≥ 100).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODING: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// The agent refused the request for a reason a retry will not fix.
    pub const IPAM_FAILED: u32 = 100;
    /// The kernel refused a change (netlink) or CHECK found the attachment not as ADD left it.
    pub const DATAPLANE: u32 = 101;
}

/// An error as the spec prints it on stdout: `{"cniVersion","code","msg","details"}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl std::fmt::Display) -> Self {
        self.details = details.to_string();
        self
    }

    /// The JSON the runtime reads from stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details })
    }
}

/// The six CNI commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    /// The first spec version that defines the command.
    pub fn since(self) -> &'static str {
        match self {
            Command::Status | Command::Gc => "1.1.0",
            Command::Check => "0.4.0",
            _ => "0.1.0",
        }
    }
}

/// `major.minor.patch` → comparable tuple (garbage → None).
pub fn version_tuple(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let t = (it.next()??, it.next()??, it.next()??);
    if it.next().is_some() { None } else { Some(t) }
}

/// One `cni.dev/valid-attachments` entry of a GC request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The plugin's network configuration (the conflist entry, with `cniVersion` and `name` injected by the
/// runtime). Unknown fields are ignored, as the spec asks.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "type")]
    pub kind: String,
    /// The agent's IPAM socket (default `names::AGENT_SOCKET`).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// MTU of both veth ends; default: what the agent's allocation says.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Log destination; default stderr.
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// `error`, `warn` (default), `info`, `debug`, `trace`.
    #[serde(default)]
    pub log_level: Option<String>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// Present only to be refused: addresses come from the agent.
    #[serde(default)]
    pub ipam: Option<Value>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// What one ADD built: the two interfaces and the pod address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub host_ifname: String,
    pub host_mac: String,
    pub pod_ifname: String,
    pub pod_mac: String,
    pub sandbox: String,
    pub address: Ipv4Net,
    pub gateway: Ipv4Addr,
}

/// The ADD result in `cni_version`'s format. When a previous plugin left a result, ours is appended to it
/// (interfaces, ips with re-based interface indexes, routes); everything else in it is passed through.
pub fn add_result(cni_version: &str, prev: Option<&Value>, a: &Attached) -> Value {
    let mut out = match prev {
        Some(Value::Object(m)) => Value::Object(m.clone()),
        _ => json!({}),
    };
    out["cniVersion"] = json!(cni_version);
    let interfaces = out
        .get_mut("interfaces")
        .and_then(Value::as_array_mut)
        .map(std::mem::take)
        .unwrap_or_default();
    let base = interfaces.len();
    let mut interfaces = interfaces;
    interfaces.push(json!({ "name": a.host_ifname, "mac": a.host_mac }));
    interfaces.push(json!({ "name": a.pod_ifname, "mac": a.pod_mac, "sandbox": a.sandbox }));
    out["interfaces"] = Value::Array(interfaces);

    let mut ip = json!({ "address": a.address.to_string(), "gateway": a.gateway.to_string(), "interface": base + 1 });
    if version_tuple(cni_version) < Some((1, 0, 0)) {
        ip["version"] = json!("4");
    }
    let mut ips = out
        .get_mut("ips")
        .and_then(Value::as_array_mut)
        .map(std::mem::take)
        .unwrap_or_default();
    ips.push(ip);
    out["ips"] = Value::Array(ips);

    let mut routes = out
        .get_mut("routes")
        .and_then(Value::as_array_mut)
        .map(std::mem::take)
        .unwrap_or_default();
    routes.push(json!({ "dst": "0.0.0.0/0", "gw": a.gateway.to_string() }));
    out["routes"] = Value::Array(routes);
    if out.get("dns").is_none() {
        out["dns"] = json!({});
    }
    out
}

/// The VERSION reply.
pub fn version_result(cni_version: &str) -> Value {
    json!({ "cniVersion": cni_version, "supportedVersions": SUPPORTED_VERSIONS })
}

/// The address and gateway of the interface `ifname` in a previous ADD result (what CHECK verifies). When
/// several sandbox interfaces carry that name (a plugin earlier in the chain reported one), the last is ours:
/// [`add_result`] appends.
pub fn find_attachment(result: &Value, ifname: &str) -> Option<(Ipv4Net, Option<Ipv4Addr>)> {
    let interfaces = result.get("interfaces")?.as_array()?;
    let idx = interfaces.iter().rposition(|i| {
        i.get("name").and_then(Value::as_str) == Some(ifname) && i.get("sandbox").is_some()
    })?;
    result.get("ips")?.as_array()?.iter().find_map(|ip| {
        if ip.get("interface").and_then(Value::as_u64) != Some(idx as u64) {
            return None;
        }
        let addr: Ipv4Net = ip.get("address")?.as_str()?.parse().ok()?;
        let gw = ip
            .get("gateway")
            .and_then(Value::as_str)
            .and_then(|g| g.parse().ok());
        Some((addr, gw))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_attached() -> Attached {
        Attached {
            host_ifname: "ul0123456789a".into(),
            host_mac: "02:aa:00:00:00:01".into(),
            pod_ifname: "eth0".into(),
            pod_mac: "02:bb:00:00:00:01".into(),
            sandbox: "/var/run/netns/p1".into(),
            address: "100.64.1.5/32".parse().unwrap(),
            gateway: "169.254.1.1".parse().unwrap(),
        }
    }

    #[test]
    fn result_1x_has_no_ip_version_and_points_at_the_pod_interface() {
        for v in ["1.0.0", "1.1.0"] {
            let r = add_result(v, None, &mk_attached());
            assert_eq!(r["cniVersion"], v);
            assert_eq!(r["interfaces"][1]["sandbox"], "/var/run/netns/p1");
            assert_eq!(r["ips"][0]["interface"], 1);
            assert_eq!(r["ips"][0]["address"], "100.64.1.5/32");
            assert!(r["ips"][0].get("version").is_none());
            assert_eq!(
                r["routes"][0],
                json!({"dst": "0.0.0.0/0", "gw": "169.254.1.1"})
            );
        }
    }

    #[test]
    fn result_040_carries_ip_version() {
        let r = add_result("0.4.0", None, &mk_attached());
        assert_eq!(r["ips"][0]["version"], "4");
    }

    #[test]
    fn prev_result_is_passed_through_and_extended() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "lo", "sandbox": "/x"}],
            "ips": [{"address": "10.0.0.1/8", "interface": 0}],
            "dns": {"nameservers": ["203.0.113.53"]},
            "extra": 1
        });
        let r = add_result("1.0.0", Some(&prev), &mk_attached());
        assert_eq!(r["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(r["ips"][1]["interface"], 2);
        assert_eq!(r["dns"]["nameservers"][0], "203.0.113.53");
        assert_eq!(r["extra"], 1);
        assert_eq!(
            find_attachment(&r, "eth0").unwrap().0,
            "100.64.1.5/32".parse::<Ipv4Net>().unwrap()
        );
    }

    /// Found by the `cni_invocation` fuzz target: a previous result that already names a sandbox interface
    /// `eth0` (without an address for it) hid the attachment our ADD appended, so CHECK could not find it.
    #[test]
    fn find_attachment_after_a_previous_sandbox_interface_of_the_same_name() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/p1"}],
            "ips": [{"address": "10.0.0.1/8", "ijterface": 0}],
        });
        let r = add_result("1.0.0", Some(&prev), &mk_attached());
        assert_eq!(
            find_attachment(&r, "eth0").unwrap().0,
            "100.64.1.5/32".parse::<Ipv4Net>().unwrap()
        );
    }

    #[test]
    fn error_json_has_the_spec_fields() {
        let e = CniError::new(code::TRY_AGAIN_LATER, "agent down").with_details("connect: ENOENT");
        let j = e.to_json("1.0.0");
        assert_eq!(
            j,
            json!({"cniVersion": "1.0.0", "code": 11, "msg": "agent down", "details": "connect: ENOENT"})
        );
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_tuple("0.4.0") < version_tuple("1.0.0"));
        assert!(version_tuple("1.10.0") > version_tuple("1.9.0"));
        assert_eq!(version_tuple("1.0"), None);
        assert_eq!(version_tuple("x.y.z"), None);
        assert_eq!(
            version_result("1.0.0")["supportedVersions"],
            json!(["0.4.0", "1.0.0", "1.1.0"])
        );
    }
}
