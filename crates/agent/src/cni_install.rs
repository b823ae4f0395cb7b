//! What the agent puts on the node for the container runtime: the CNI configuration list and the
//! `underlay-cni` binary. Both are replaced atomically (temp file in the same directory + rename), so a
//! runtime never reads a half-written file or executes a half-copied plugin.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::json;
use underlay_core::names;

use crate::AgentError;
use crate::checkpoint::sync_dir;

/// CNI spec version of the configuration list the agent writes: 1.0.0, the newest the reference `portmap`
/// and `bandwidth` of containernetworking-plugins 1.1.x (Debian 12) accept — given "1.1.0" they refuse ADD
/// with `incompatible CNI versions` (code 1), and one refusal fails the whole list. underlay-cni speaks
/// 1.1.0 but answers a 1.0.0 list in 1.0.0 terms; STATUS and GC, which only 1.1.0 defines, are then not
/// called by runtimes (see docs/agent.md, "The conflist").
pub const CNI_VERSION: &str = "1.0.0";

/// The configuration list: `underlay-cni` first, then the reference `portmap` and `bandwidth` plugins.
/// The plugin reads `socket` (the agent's IPAM socket) and `mtu` from its entry.
pub fn conflist(socket: &Path, mtu: u32) -> serde_json::Value {
    json!({
        "cniVersion": CNI_VERSION,
        "name": names::CNI_NETWORK,
        "plugins": [
            {
                "type": names::CNI_PLUGIN,
                "socket": socket,
                "mtu": mtu,
            },
            {
                "type": "portmap",
                "capabilities": { "portMappings": true },
                "snat": true,
            },
            {
                "type": "bandwidth",
                "capabilities": { "bandwidth": true },
            },
        ],
    })
}

/// Writes `<conf_dir>/10-underlay.conflist`. Returns its path.
pub fn write_conflist(conf_dir: &Path, socket: &Path, mtu: u32) -> Result<PathBuf, AgentError> {
    let path = conf_dir.join(names::CNI_CONFLIST);
    let mut text = serde_json::to_vec_pretty(&conflist(socket, mtu)).expect("plain JSON");
    text.push(b'\n');
    write_atomic(&path, &text, 0o644)?;
    Ok(path)
}

/// Copies the plugin binary to `<bin_dir>/underlay-cni` (mode 0755). Returns its path.
pub fn install_plugin(source: &Path, bin_dir: &Path) -> Result<PathBuf, AgentError> {
    let bytes = fs::read(source).map_err(|e| AgentError::Io {
        what: "read the CNI plugin binary",
        path: source.to_owned(),
        source: e,
    })?;
    let path = bin_dir.join(names::CNI_PLUGIN);
    write_atomic(&path, &bytes, 0o755)?;
    Ok(path)
}

/// The reference plugins the conflist chains after `underlay-cni`, by binary name, in chain order.
pub const CHAINED_PLUGINS: [&str; 2] = ["portmap", "bandwidth"];

/// Copies each of [`CHAINED_PLUGINS`] from `source_dir` (the image's copies, the versions the conflist is tested
/// with) to `bin_dir`, atomically like the plugin itself, replacing any other version there. Returns the paths.
/// A plugin missing from `source_dir` is an error: the conflist names it, so every pod ADD would fail.
pub fn install_chained_plugins(
    source_dir: &Path,
    bin_dir: &Path,
) -> Result<Vec<PathBuf>, AgentError> {
    CHAINED_PLUGINS
        .iter()
        .map(|name| {
            let source = source_dir.join(name);
            let bytes = fs::read(&source).map_err(|e| AgentError::Io {
                what: "read a chained CNI plugin",
                path: source.clone(),
                source: e,
            })?;
            let path = bin_dir.join(name);
            write_atomic(&path, &bytes, 0o755)?;
            Ok(path)
        })
        .collect()
}

/// Suffix given to the other CNI configurations `cni.exclusive` moves aside (as Cilium's `.cilium_bak`).
pub const MOVED_ASIDE_SUFFIX: &str = ".underlay_bak";

/// Exclusive mode: renames every other CNI configuration in `conf_dir` (`*.conf`, `*.conflist`, `*.json`) to
/// `<name>.underlay_bak`, so the runtime, which uses the first file in lexical order, can only pick underlay's
/// (aws-node's `10-aws.conflist` sorts before `10-underlay.conflist`). Renamed, never deleted: moving a file back
/// undoes it. Returns the new paths.
pub fn move_aside_other_configs(conf_dir: &Path) -> Result<Vec<PathBuf>, AgentError> {
    let io = |what: &'static str, p: &Path| {
        let p = p.to_owned();
        move |source| AgentError::Io {
            what,
            path: p,
            source,
        }
    };
    let entries = match fs::read_dir(conf_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("list the CNI configuration directory", conf_dir)(e)),
    };
    let mut names: Vec<std::ffi::OsString> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
        .map(|e| e.file_name())
        .collect();
    names.sort();
    let mut moved = Vec::new();
    for name in names {
        let Some(text) = name.to_str() else { continue };
        let is_config = [".conf", ".conflist", ".json"]
            .iter()
            .any(|ext| text.ends_with(ext));
        if !is_config || text == names::CNI_CONFLIST {
            continue;
        }
        let from = conf_dir.join(&name);
        let to = conf_dir.join(format!("{text}{MOVED_ASIDE_SUFFIX}"));
        fs::rename(&from, &to).map_err(io("move aside a CNI configuration", &from))?;
        moved.push(to);
    }
    if !moved.is_empty() {
        sync_dir(&conf_dir.join(names::CNI_CONFLIST))
            .map_err(io("sync the CNI configuration directory", conf_dir))?;
    }
    Ok(moved)
}

/// Writes `bytes` to a temp file next to `path`, fsyncs, sets `mode`, renames over `path`, fsyncs the dir.
/// Renaming over a running executable is safe: the old inode lives on until its last user exits.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AgentError> {
    let io = |what: &'static str, p: &Path| {
        let p = p.to_owned();
        move |source| AgentError::Io {
            what,
            path: p,
            source,
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io("create directory", dir))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io("write", path)(e));
    }
    sync_dir(path).map_err(io("sync directory of", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_content() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let path = write_conflist(&dir.path().join("net.d"), &sock, 1500).unwrap();
        assert_eq!(path.file_name().unwrap(), names::CNI_CONFLIST);
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["name"], "underlay");
        let plugins = v["plugins"].as_array().unwrap();
        let types: Vec<_> = plugins
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["underlay-cni", "portmap", "bandwidth"]);
        assert_eq!(plugins[0]["socket"], sock.to_str().unwrap());
        assert_eq!(plugins[0]["mtu"], 1500);
        assert_eq!(plugins[1]["capabilities"]["portMappings"], true);
        assert_eq!(plugins[2]["capabilities"]["bandwidth"], true);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        // No temp file left behind.
        assert_eq!(fs::read_dir(dir.path().join("net.d")).unwrap().count(), 1);
    }

    #[test]
    fn plugin_install_replaces_atomically_with_exec_mode() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src-plugin");
        fs::write(&src, b"#!/bin/sh\necho v1\n").unwrap();
        let bin = dir.path().join("bin");
        let path = install_plugin(&src, &bin).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"#!/bin/sh\necho v1\n");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let before = fs::metadata(&path).unwrap();
        fs::write(&src, b"#!/bin/sh\necho v2\n").unwrap();
        install_plugin(&src, &bin).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"#!/bin/sh\necho v2\n");
        use std::os::unix::fs::MetadataExt;
        assert_ne!(
            before.ino(),
            fs::metadata(&path).unwrap().ino(),
            "replaced by rename, not rewritten in place"
        );
        assert!(install_plugin(&dir.path().join("missing"), &bin).is_err());
    }

    #[test]
    fn chained_plugins_are_the_conflists_and_replace_other_versions() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let list = conflist(&socket, 1500);
        let chained: Vec<_> = list["plugins"].as_array().unwrap()[1..]
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(chained, CHAINED_PLUGINS);

        let src = dir.path().join("image-cni");
        fs::create_dir_all(&src).unwrap();
        for p in CHAINED_PLUGINS {
            fs::write(src.join(p), format!("image {p}")).unwrap();
        }
        let bin = dir.path().join("bin");
        fs::create_dir_all(&bin).unwrap();
        // A node's own older portmap is replaced (by rename: a new inode).
        fs::write(bin.join("portmap"), b"host portmap").unwrap();
        let before = fs::metadata(bin.join("portmap")).unwrap();
        let installed = install_chained_plugins(&src, &bin).unwrap();
        assert_eq!(installed, vec![bin.join("portmap"), bin.join("bandwidth")]);
        use std::os::unix::fs::MetadataExt;
        for p in CHAINED_PLUGINS {
            let path = bin.join(p);
            assert_eq!(fs::read_to_string(&path).unwrap(), format!("image {p}"));
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o755
            );
        }
        assert_ne!(
            before.ino(),
            fs::metadata(bin.join("portmap")).unwrap().ino()
        );
        // Nothing but the two plugins (no temp file left behind).
        assert_eq!(fs::read_dir(&bin).unwrap().count(), 2);

        // One missing from the image: an error naming it, and the other already installed stays.
        fs::remove_file(src.join("bandwidth")).unwrap();
        let err = install_chained_plugins(&src, &bin).unwrap_err().to_string();
        assert!(err.contains("bandwidth"), "{err}");
    }

    #[test]
    fn exclusive_moves_other_configurations_aside_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("net.d");
        assert!(
            move_aside_other_configs(&conf).unwrap().is_empty(),
            "no directory yet"
        );
        fs::create_dir_all(&conf).unwrap();
        for f in [
            "10-aws.conflist",
            "05-cilium.conf",
            "99-loopback.json",
            "README",
            "old.conflist.cilium_bak",
        ] {
            fs::write(conf.join(f), f).unwrap();
        }
        fs::create_dir(conf.join("multus.d")).unwrap();
        write_conflist(&conf, &dir.path().join("agent.sock"), 1500).unwrap();
        let moved = move_aside_other_configs(&conf).unwrap();
        assert_eq!(
            moved,
            vec![
                conf.join("05-cilium.conf.underlay_bak"),
                conf.join("10-aws.conflist.underlay_bak"),
                conf.join("99-loopback.json.underlay_bak"),
            ]
        );
        let mut left: Vec<String> = fs::read_dir(&conf)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "05-cilium.conf.underlay_bak",
                "10-aws.conflist.underlay_bak",
                "10-underlay.conflist",
                "99-loopback.json.underlay_bak",
                "README",
                "multus.d",
                "old.conflist.cilium_bak",
            ]
        );
        // The content moved intact; a second pass moves nothing.
        assert_eq!(
            fs::read_to_string(conf.join("10-aws.conflist.underlay_bak")).unwrap(),
            "10-aws.conflist"
        );
        assert!(move_aside_other_configs(&conf).unwrap().is_empty());
    }
}
