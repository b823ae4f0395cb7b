//! A real container runtime: podman (CNI backend, runc, vfs storage) runs two containers on an underlay
//! network inside a node namespace of the test's own, with the agent serving that node. Container 1 pings
//! its node's address and container 2's address; removing the containers leaves no allocation and no veth.
//!
//! Podman gets a private containers.conf (network_backend = "cni", the test's network_config_dir, plugin
//! dirs = the built underlay-cni's dir + /usr/lib/cni), private --root/--runroot/--tmpdir under the test's
//! temp dir, and is started with `nsenter --net=` (not `ip netns exec`, which remounts /sys and hides the
//! cgroups runc needs). Every podman call is bounded by `timeout`.
#![cfg(feature = "root-tests")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{NODE_IP, Node, PLUGIN};

/// Every podman call is killed after this many seconds.
const PODMAN_TIMEOUT_SECS: &str = "120";
const PREFIX: &str = "ulcni-podman";

/// podman bound to the test's own config, storage and node namespace; removes its containers and
/// unmounts anything left under its directories on drop.
struct Podman {
    dir: PathBuf,
    netns: String,
    containers: Vec<String>,
}

impl Podman {
    fn cmd(&self, args: &[&str]) -> Output {
        let d = &self.dir;
        Command::new("timeout")
            .args([PODMAN_TIMEOUT_SECS, "nsenter"])
            .arg(format!("--net={}", self.netns))
            .arg("podman")
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env_remove("CONTAINERS_STORAGE_CONF")
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
}

impl Drop for Podman {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = self.cmd(&["rm", "-f", "-t", "0", c]);
        }
        // Anything podman left mounted under our directories (a failed rm) would make the temp dir
        // undeletable: detach it.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let mut under: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| Path::new(m).starts_with(&self.dir))
                .collect();
            under.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in under {
                let _ = Command::new("umount").args(["-l", m]).status();
            }
        }
    }
}

#[test]
fn podman_containers_reach_their_node_and_each_other() {
    let node = Node::new(PREFIX, "100.64.22.0/28");
    let dir = tempfile::Builder::new().prefix(PREFIX).tempdir().unwrap();
    let d = dir.path();
    let network = format!("{PREFIX}-net");

    // The CNI network, in the test's own config dir.
    std::fs::create_dir_all(d.join("net.d")).unwrap();
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0", "name": network,
        "plugins": [{ "type": "underlay-cni", "socket": node.socket(), "mtu": 1500 }]
    });
    std::fs::write(
        d.join("net.d").join(format!("{network}.conflist")),
        conflist.to_string(),
    )
    .unwrap();
    let plugin_dir = Path::new(PLUGIN).parent().unwrap();
    std::fs::write(
        d.join("containers.conf"),
        format!(
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"none\"\nruntime = \"runc\"\n\
             [network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{}\"\n\
             cni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\n",
            d.join("net.d").display(),
            plugin_dir.display()
        ),
    )
    .unwrap();

    // A busybox-static root filesystem, imported as an image.
    std::fs::create_dir_all(d.join("rootfs/bin")).unwrap();
    std::fs::copy("/bin/busybox", d.join("rootfs/bin/busybox")).unwrap();
    let tar = Command::new("tar")
        .arg("-C")
        .arg(d.join("rootfs"))
        .arg("-cf")
        .arg(d.join("rootfs.tar"))
        .arg(".")
        .status()
        .unwrap();
    assert!(tar.success());

    let mut podman = Podman {
        dir: d.to_path_buf(),
        netns: node.ns.path(),
        containers: vec![],
    };
    let image = format!("localhost/{PREFIX}-busybox:test");
    podman.ok(&["import", &d.join("rootfs.tar").to_string_lossy(), &image]);

    let limits = [
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
    ];
    let c2 = format!("{PREFIX}-c2");
    let c1 = format!("{PREFIX}-c1");
    podman.containers = vec![c1.clone(), c2.clone()];
    let mut run2 = vec!["run", "-d", "--name", &c2, "--network", &network];
    run2.extend(limits);
    run2.extend([image.as_str(), "/bin/busybox", "sleep", "120"]);
    podman.ok(&run2);
    let c2_ip = podman.ok(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
        &c2,
    ]);
    let pool: ipnet::IpNet = node.pool.parse().unwrap();
    let c2_addr: std::net::IpAddr = c2_ip.parse().expect("container 2 has an address");
    assert!(pool.contains(&c2_addr), "{c2_ip} not in {pool}");
    assert_eq!(node.allocations().len(), 1);

    // Container 1: the node's address, then container 2's (bounded counts and timeouts).
    let script =
        format!("/bin/busybox ping -c 2 -W 2 {NODE_IP} && /bin/busybox ping -c 2 -W 2 {c2_ip}");
    let mut run1 = vec![
        "run",
        "--name",
        &c1,
        "--network",
        &network,
        "--cap-add",
        "NET_RAW",
    ];
    run1.extend(limits);
    run1.extend([image.as_str(), "/bin/busybox", "sh", "-c", &script]);
    let out = podman.ok(&run1);
    assert!(
        out.contains(&format!("64 bytes from {NODE_IP}"))
            && out.contains(&format!("64 bytes from {c2_ip}")),
        "{out}"
    );

    // Removing both containers runs DEL: nothing of theirs is left on the node.
    podman.ok(&["rm", "-f", "-t", "0", &c1, &c2]);
    assert!(node.allocations().is_empty());
    assert!(node.pod_routes().is_empty());
    assert!(node.wait_host_veths_gone().is_empty());
    drop(podman);
}
