//! parse(env, stdin) → [`Invocation`]: everything the plugin needs, validated before anything is touched.
//! Pure: the environment is passed in as a lookup function.

use crate::spec::{self, CniError, Command, NetConf, code};

/// Longest Linux interface name.
pub const IFNAMSIZ_MAX: usize = 15;

/// A validated invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    /// Empty when the runtime gave none (allowed for DEL, GC, STATUS).
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs (`K8S_POD_NAMESPACE=…;K8S_POD_NAME=…`).
    pub args: Vec<(String, String)>,
    pub conf: NetConf,
}

impl Invocation {
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The version to answer in when the configuration could not be read (errors before parsing).
pub fn reply_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|s| s.as_str())
                .map(str::to_string)
        })
        .filter(|v| spec::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| spec::LATEST_VERSION.to_string())
}

/// Reads and validates one invocation. VERSION needs nothing but `CNI_COMMAND`.
pub fn parse(env: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Invocation, CniError> {
    let cmd = env("CNI_COMMAND")
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set"))?;
    let command = Command::parse(&cmd)
        .ok_or_else(|| CniError::new(code::INVALID_ENV, format!("unknown CNI_COMMAND {cmd:?}")))?;

    if command == Command::Version {
        // The spec passes {"cniVersion": …}; answer in that version when we know it, else in the latest.
        let conf = NetConf {
            cni_version: reply_version(stdin),
            ..NetConf::default()
        };
        return Ok(Invocation {
            command,
            container_id: String::new(),
            netns: String::new(),
            ifname: String::new(),
            args: Vec::new(),
            conf,
        });
    }

    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(code::DECODING, "cannot decode the network configuration").with_details(e)
    })?;
    if conf.cni_version.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "network configuration has no cniVersion",
        ));
    }
    if !spec::SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {} is not supported", conf.cni_version),
        )
        .with_details(format!(
            "supported: {}",
            spec::SUPPORTED_VERSIONS.join(", ")
        )));
    }
    if spec::version_tuple(&conf.cni_version) < spec::version_tuple(command.since()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{cmd} needs cniVersion {} or later, the configuration says {}",
                command.since(),
                conf.cni_version
            ),
        ));
    }
    if conf.name.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "network configuration has no name",
        ));
    }
    if conf.ipam.is_some() {
        return Err(
            CniError::new(code::UNSUPPORTED_FIELD, "the ipam field is not supported").with_details(
                "underlay-cni takes pod addresses from the underlay agent; remove the ipam section",
            ),
        );
    }
    if let Some(mtu) = conf.mtu
        && !(68..=65535).contains(&mtu)
    {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("mtu {mtu} is outside 68..=65535"),
        ));
    }
    if let Some(level) = &conf.log_level
        && !["error", "warn", "info", "debug", "trace"].contains(&level.as_str())
    {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("unknown logLevel {level:?}"),
        ));
    }

    let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
    let get = |k: &str| env(k).unwrap_or_default();
    let container_id = get("CNI_CONTAINERID");
    let netns = get("CNI_NETNS");
    let ifname = get("CNI_IFNAME");
    if needs_container {
        if container_id.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                "CNI_CONTAINERID is not set",
            ));
        }
        validate_container_id(&container_id)?;
        if ifname.is_empty() {
            return Err(CniError::new(code::INVALID_ENV, "CNI_IFNAME is not set"));
        }
        validate_ifname(&ifname)?;
        if command != Command::Del && netns.is_empty() {
            return Err(CniError::new(code::INVALID_ENV, "CNI_NETNS is not set"));
        }
    }
    if command == Command::Check && conf.prev_result.is_none() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult",
        ));
    }
    if command == Command::Gc && conf.valid_attachments.is_none() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "GC needs cni.dev/valid-attachments",
        ));
    }
    let args = get("CNI_ARGS")
        .split(';')
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    Ok(Invocation {
        command,
        container_id,
        netns,
        ifname,
        args,
        conf,
    })
}

/// The reference plugins' rule: starts with an alphanumeric, then alphanumerics, `_`, `.`, `-`.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENV,
            format!("invalid CNI_CONTAINERID {id:?}"),
        ))
    }
}

fn validate_ifname(name: &str) -> Result<(), CniError> {
    let ok = name.len() <= IFNAMSIZ_MAX
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENV,
            format!("invalid CNI_IFNAME {name:?}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn mk_env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    const CONF: &str =
        r#"{"cniVersion":"1.1.0","name":"underlay","type":"underlay-cni","mtu":1400}"#;
    const ADD_ENV: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
        ),
    ];

    #[test]
    fn add_parses() {
        let inv = parse(&mk_env(ADD_ENV), CONF.as_bytes()).unwrap();
        assert_eq!(inv.command, Command::Add);
        assert_eq!(inv.conf.mtu, Some(1400));
        assert_eq!(inv.arg("K8S_POD_NAME"), Some("web-0"));
    }

    fn code_of(env: &[(&str, &str)], stdin: &str) -> u32 {
        parse(&mk_env(env), stdin.as_bytes()).unwrap_err().code
    }

    #[test]
    fn failures_map_to_spec_codes() {
        assert_eq!(code_of(&[], CONF), code::INVALID_ENV);
        assert_eq!(code_of(&[("CNI_COMMAND", "FROB")], CONF), code::INVALID_ENV);
        assert_eq!(code_of(ADD_ENV, "{not json"), code::DECODING);
        assert_eq!(
            code_of(ADD_ENV, r#"{"cniVersion":"9.9.9","name":"u"}"#),
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            code_of(ADD_ENV, r#"{"cniVersion":"0.3.1","name":"u"}"#),
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(code_of(ADD_ENV, r#"{"name":"u"}"#), code::INVALID_CONFIG);
        assert_eq!(
            code_of(ADD_ENV, r#"{"cniVersion":"1.0.0"}"#),
            code::INVALID_CONFIG
        );
        assert_eq!(
            code_of(ADD_ENV, r#"{"cniVersion":"1.0.0","name":"u","mtu":10}"#),
            code::INVALID_CONFIG
        );
        assert_eq!(
            code_of(
                ADD_ENV,
                r#"{"cniVersion":"1.0.0","name":"u","ipam":{"type":"host-local"}}"#
            ),
            code::UNSUPPORTED_FIELD
        );
        let no_netns: Vec<_> = ADD_ENV
            .iter()
            .copied()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .collect();
        assert_eq!(code_of(&no_netns, CONF), code::INVALID_ENV);
        let bad_if: Vec<_> = ADD_ENV
            .iter()
            .map(|&(k, v)| {
                if k == "CNI_IFNAME" {
                    (k, "a-very-long-ifname0")
                } else {
                    (k, v)
                }
            })
            .collect();
        assert_eq!(code_of(&bad_if, CONF), code::INVALID_ENV);
        let bad_id: Vec<_> = ADD_ENV
            .iter()
            .map(|&(k, v)| {
                if k == "CNI_CONTAINERID" {
                    (k, "../etc")
                } else {
                    (k, v)
                }
            })
            .collect();
        assert_eq!(code_of(&bad_id, CONF), code::INVALID_ENV);
    }

    #[test]
    fn del_does_not_need_a_netns() {
        let env = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ];
        assert_eq!(parse(&mk_env(&env), CONF.as_bytes()).unwrap().netns, "");
    }

    #[test]
    fn status_and_gc_need_1_1_0() {
        let env = [("CNI_COMMAND", "STATUS")];
        assert!(parse(&mk_env(&env), CONF.as_bytes()).is_ok());
        assert_eq!(
            code_of(&env, r#"{"cniVersion":"1.0.0","name":"u"}"#),
            code::INCOMPATIBLE_VERSION
        );
        let gc = [("CNI_COMMAND", "GC")];
        assert_eq!(code_of(&gc, CONF), code::INVALID_CONFIG);
        let conf = r#"{"cniVersion":"1.1.0","name":"u","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#;
        let inv = parse(&mk_env(&gc), conf.as_bytes()).unwrap();
        assert_eq!(inv.conf.valid_attachments.unwrap()[0].container_id, "a");
    }

    #[test]
    fn check_needs_prev_result() {
        let env: Vec<_> = ADD_ENV
            .iter()
            .map(|&(k, v)| {
                if k == "CNI_COMMAND" {
                    (k, "CHECK")
                } else {
                    (k, v)
                }
            })
            .collect();
        assert_eq!(code_of(&env, CONF), code::INVALID_CONFIG);
    }

    #[test]
    fn version_answers_without_a_valid_config() {
        let env = [("CNI_COMMAND", "VERSION")];
        assert_eq!(parse(&mk_env(&env), b"").unwrap().conf.cni_version, "1.1.0");
        assert_eq!(
            parse(&mk_env(&env), br#"{"cniVersion":"0.4.0"}"#)
                .unwrap()
                .conf
                .cni_version,
            "0.4.0"
        );
    }
}
