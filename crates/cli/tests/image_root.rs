//! The container image scripts/build-image.sh builds: loaded into a podman store of the test's own (runc, vfs
//! storage, private CONTAINERS_CONF), it runs `underlay --version` and the agent's `--help`, and every program the
//! agent and its init container execute (nft, nsenter, /bin/sh) and the chained CNI plugins run from it; it is at
//! most 80 MB, carries its OCI labels and a non-root default user, and ships stripped binaries whose debug info
//! sits beside the archive. Needs root, podman and runc (scripts/setup.sh) and the image.
//!
//! Which image: `make test` builds and tests `make test-image`'s (target/oci-image-test: the same script, files
//! and binaries from the cheaper cargo profile `image-test`); `UNDERLAY_TEST_IMAGE_DIR=target/oci` tests the
//! shipping image `make image` built (profile `image`). The label dev.underlay.build-profile must name the
//! profile that directory is for.
#![cfg(feature = "root-tests")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_underlay");
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The bar: the image, unpacked, is at most 80 MB.
const MAX_IMAGE_BYTES: u64 = 80 * 1000 * 1000;

/// The directory scripts/build-image.sh wrote the image to, and the cargo profile it was built with:
/// `UNDERLAY_TEST_IMAGE_DIR` if set (`<target>/oci`: profile `image`, `<target>/oci-<profile>` otherwise), else
/// `<target>/oci-image-test` (`make test-image`), in the target dir this test binary was built in.
fn oci_dir() -> (PathBuf, String) {
    let dir = match std::env::var_os("UNDERLAY_TEST_IMAGE_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(BIN)
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/underlay")
            .join("oci-image-test"),
    };
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let profile = match name.strip_prefix("oci-") {
        Some(p) => p.to_string(),
        None if name == "oci" => "image".to_string(),
        None => panic!("{}: not an oci or oci-<profile> directory", dir.display()),
    };
    (dir, profile)
}

/// podman bound to a store of the test's own; removes its containers and unmounts leftovers on drop.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Podman {
        let dir = tempfile::Builder::new()
            .prefix("ulimage-")
            .tempdir()
            .unwrap();
        std::fs::write(
            dir.path().join("containers.conf"),
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"none\"\nruntime = \"runc\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                dir.path().join("runroot").display(),
                dir.path().join("root").display()
            ),
        )
        .unwrap();
        Podman { dir }
    }

    fn cmd(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        Command::new("timeout")
            .args(["120", "podman"])
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .output()
            .expect("run podman")
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `podman run --rm` of `image` with no network and the pod's limits; `entrypoint` overrides the image's.
    #[track_caller]
    fn run(&self, image: &str, entrypoint: Option<&str>, env: &[&str], args: &[&str]) -> String {
        let mut a: Vec<&str> = vec![
            "run",
            "--rm",
            "--network=none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ];
        if let Some(e) = entrypoint {
            a.extend(["--entrypoint", e]);
        }
        for e in env {
            a.extend(["--env", e]);
        }
        a.push(image);
        a.extend(args);
        self.ok(&a)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd(&["rm", "-a", "-f", "-t", "0"]);
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let mut under: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| Path::new(m).starts_with(self.dir.path()))
                .collect();
            under.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in under {
                let _ = Command::new("umount").args(["-l", m]).status();
            }
        }
    }
}

/// `readelf <args> <file>`'s output.
fn readelf(args: &[&str], file: &Path) -> String {
    let out = Command::new("readelf")
        .args(args)
        .arg(file)
        .output()
        .expect("readelf (binutils)");
    assert!(out.status.success(), "readelf {args:?} {}", file.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn build_id(file: &Path) -> String {
    let notes = readelf(&["-n"], file);
    notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no build id in {}", file.display()))
        .to_string()
}

#[test]
fn the_image_runs_the_agent_and_everything_it_executes() {
    let (oci, profile) = oci_dir();
    let archive = oci.join(format!("underlay-{VERSION}.oci.tar"));
    assert!(
        archive.is_file(),
        "{} not found: run `make test-image` (make test does), or `make image` with \
         UNDERLAY_TEST_IMAGE_DIR=target/oci",
        archive.display()
    );
    let reference = std::fs::read_to_string(oci.join(format!("underlay-{VERSION}.ref")))
        .unwrap()
        .trim()
        .to_string();
    assert!(
        reference.ends_with(&format!("/underlay:{VERSION}")),
        "{reference}"
    );

    let podman = Podman::new();
    podman.ok(&["load", "-q", "-i", archive.to_str().unwrap()]);

    // Size, labels, default user, entrypoint.
    let inspect: Value =
        serde_json::from_str(&podman.ok(&["image", "inspect", &reference])).unwrap();
    let image = &inspect[0];
    let size = image["Size"].as_u64().unwrap();
    assert!(
        size <= MAX_IMAGE_BYTES,
        "image is {size} bytes, more than {MAX_IMAGE_BYTES}"
    );
    let labels = &image["Config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], VERSION);
    assert_eq!(labels["org.opencontainers.image.title"], "underlay");
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    assert_eq!(labels["dev.underlay.build-profile"], profile.as_str());
    for key in [
        "org.opencontainers.image.revision",
        "org.opencontainers.image.created",
        "org.opencontainers.image.description",
    ] {
        assert!(
            labels[key].as_str().is_some_and(|v| !v.is_empty()),
            "label {key} missing: {labels}"
        );
    }
    assert_eq!(image["Config"]["User"], "65532:65532");
    assert_eq!(
        image["Config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/underlay"])
    );
    // Built from scratch: one layer, the root file system this repository's script made.
    assert_eq!(image["RootFS"]["Layers"].as_array().unwrap().len(), 1);

    // The binaries, as the chart runs them.
    let version = podman.run(&reference, None, &[], &["--version"]);
    assert_eq!(version, format!("underlay {VERSION}"));
    let help = podman.run(&reference, None, &[], &["agent", "--help"]);
    assert!(
        help.contains("--cni-bin-dir") && help.contains("--kube"),
        "{help}"
    );
    let help = podman.run(&reference, None, &[], &["controller", "--help"]);
    assert!(help.contains("--mode"), "{help}");
    // The default user is not root; the agent's DaemonSet runs it as root explicitly.
    let uid = podman.run(&reference, Some("/usr/bin/busybox"), &[], &["id", "-u"]);
    assert_eq!(uid, "65532");

    // What the agent executes, with every library it loads: `nft`, and `nsenter --net=… nft` for a namespace other
    // than its own.
    let nft = podman.run(&reference, Some("/usr/sbin/nft"), &[], &["--version"]);
    assert!(nft.starts_with("nftables v"), "{nft}");
    let nsenter = podman.run(&reference, Some("/usr/bin/nsenter"), &[], &["--version"]);
    assert!(nsenter.contains("util-linux"), "{nsenter}");
    // The agent's `nft_in` path on a node: it runs in the namespace it converges (hostNetwork), so `nft` runs
    // directly, as root with the DaemonSet's only capability, NET_ADMIN (no SYS_ADMIN: no setns), here in the
    // container's own network namespace (podman's, for --network=none; `--check` commits nothing even there).
    let check = podman.ok(&[
        "run",
        "--rm",
        "--network=none",
        "--ulimit=nofile=1024:1024",
        "--ulimit=nproc=1024:1024",
        "--user=0",
        "--cap-drop=ALL",
        "--cap-add=NET_ADMIN",
        "--entrypoint=/usr/sbin/nft",
        &reference,
        "--check",
        "add table inet underlay_image_test",
    ]);
    assert_eq!(check, "");

    // The CNI plugin and the chained reference plugins answer VERSION.
    for plugin in [
        "/usr/local/bin/underlay-cni",
        "/usr/local/lib/underlay/cni/portmap",
        "/usr/local/lib/underlay/cni/bandwidth",
    ] {
        let script = format!("echo '{{\"cniVersion\":\"1.0.0\"}}' | {plugin}");
        let out = podman.run(
            &reference,
            Some("/bin/sh"),
            &["CNI_COMMAND=VERSION"],
            &["-c", &script],
        );
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{plugin}: {e}: {out}"));
        assert!(
            v["supportedVersions"]
                .as_array()
                .is_some_and(|a| a.contains(&"1.0.0".into())),
            "{plugin}: {out}"
        );
    }

    // Stripped binaries in the image; their debug info beside the archive, matched by build id.
    let cid = podman.ok(&["create", &reference]);
    let extracted = tempfile::tempdir().unwrap();
    for b in ["underlay", "underlay-cni"] {
        let to = extracted.path().join(b);
        podman.ok(&[
            "cp",
            &format!("{cid}:/usr/local/bin/{b}"),
            to.to_str().unwrap(),
        ]);
        let sections = readelf(&["-S", "-W"], &to);
        assert!(
            !sections.contains(".debug_info") && !sections.contains(".debug_line"),
            "{b} in the image is not stripped"
        );
        assert!(
            sections.contains(".gnu_debuglink"),
            "{b} names no debug file"
        );
        let debug = oci.join("debug").join(format!("{b}.debug"));
        assert!(debug.is_file(), "{} missing", debug.display());
        assert!(
            readelf(&["-S", "-W"], &debug).contains(".debug_line"),
            "{} holds no line tables",
            debug.display()
        );
        assert_eq!(build_id(&to), build_id(&debug), "{b}");
    }
    podman.ok(&["rm", &cid]);
}
