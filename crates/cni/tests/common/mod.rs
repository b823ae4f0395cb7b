//! Root-test harness: a node namespace with its own agent process, pod namespaces, and the plugin run as a
//! process from inside the node namespace, the way a runtime runs it. Everything is deleted on drop.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use underlay_dataplane::testns::TestNs;
use underlay_dataplane::{Link, Netlink};
use underlay_ipam_api::{Allocation, Client};

pub const PLUGIN: &str = env!("CARGO_BIN_EXE_underlay-cni");
pub const TEST_AGENT: &str = env!("CARGO_BIN_EXE_underlay-cni-test-agent");
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
/// Address of the node itself inside its namespace (on `lo`), in the lab's VPC range.
pub const NODE_IP: &str = "198.18.0.10";

/// A node: namespace, agent process, temp dir with socket, checkpoint and CNI config dir.
pub struct Node {
    pub ns: TestNs,
    pub dir: tempfile::TempDir,
    pub pool: String,
    agent: Option<Child>,
}

impl Node {
    pub fn new(prefix: &str, pool: &str) -> Node {
        Node::with_pool(prefix, &format!("pool:\n  block: {pool}\n"), pool)
    }

    /// A node whose agent serves an `eni`-mode pool: `(address, egress interface, route table)` each. `pool` (what
    /// [`Node::pod_routes`] filters by) is a CIDR covering the addresses.
    pub fn new_eni(prefix: &str, addresses: &[(&str, &str, u32)], pool: &str) -> Node {
        let mut yaml = String::from("pool:\n  addresses:\n");
        for (a, dev, table) in addresses {
            yaml.push_str(&format!(
                "    - {{ address: {a}, egress_interface: {dev}, route_table: {table} }}\n"
            ));
        }
        Node::with_pool(prefix, &yaml, pool)
    }

    /// A node whose agent configuration also holds `extra_yaml` (lines of `AgentConfig`, e.g. `plugin_source`).
    pub fn with_agent_config(prefix: &str, pool: &str, extra_yaml: &str) -> Node {
        Node::with_pool(
            prefix,
            &format!("pool:\n  block: {pool}\n{extra_yaml}"),
            pool,
        )
    }

    fn with_pool(prefix: &str, pool_yaml: &str, pool: &str) -> Node {
        let ns = TestNs::new(prefix).expect("node namespace");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nl = ns.netns().netlink().unwrap();
        let lo = nl.link_by_name("lo").unwrap().unwrap();
        nl.addr_add(lo.index, format!("{NODE_IP}/32").parse().unwrap())
            .unwrap();
        ns.netns().write_sysctl("net.ipv4.ip_forward", "1").unwrap();
        let yaml = format!(
            "{pool_yaml}cooldown_secs: 0\nsocket: {d}/agent.sock\ncheckpoint: {d}/state/ipam.json\n\
             cni_conf_dir: {d}/net.d\ncni_bin_dir: {d}/bin\nmtu: 1500\n",
            d = dir.path().display()
        );
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::write(dir.path().join("agent.yaml"), yaml).unwrap();
        let mut node = Node {
            ns,
            dir,
            pool: pool.to_string(),
            agent: None,
        };
        node.start_agent();
        node
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// Starts the agent (inside the node namespace) and waits until its socket answers (bounded: 20 s).
    pub fn start_agent(&mut self) {
        let cfg = self.dir.path().join("agent.yaml");
        let log = std::fs::File::create(self.dir.path().join("agent.log")).unwrap();
        let child = self
            .ns
            .netns()
            .run(|| {
                Ok(Command::new(TEST_AGENT)
                    .arg(&cfg)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("spawn agent"))
            })
            .unwrap();
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Client::connect(&self.socket())
            .and_then(|c| c.list())
            .is_err()
        {
            assert!(Instant::now() < deadline, "agent did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9 and reap.
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn conf(&self, version: &str) -> Value {
        json!({ "cniVersion": version, "name": "underlay-test", "type": "underlay-cni",
                "socket": self.socket(), "mtu": 1400, "logLevel": "debug",
                "logFile": self.dir.path().join("cni.log") })
    }

    /// Runs the plugin inside the node namespace.
    pub fn cni(
        &self,
        command: &str,
        container: &str,
        netns: &str,
        ifname: &str,
        conf: &Value,
    ) -> Reply {
        let stdin = serde_json::to_vec(conf).unwrap();
        self.cni_raw(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", container),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", ifname),
                ("CNI_PATH", REFERENCE_PLUGINS),
            ],
            &stdin,
        )
    }

    pub fn cni_raw(&self, env: &[(&str, &str)], stdin: &[u8]) -> Reply {
        exec_in(&self.ns, Path::new(PLUGIN), env, stdin)
    }

    pub fn allocations(&self) -> Vec<Allocation> {
        Client::connect(&self.socket()).unwrap().list().unwrap()
    }

    pub fn nl(&self) -> Netlink {
        self.ns.netns().netlink().unwrap()
    }

    /// Host veths of this plugin in the node namespace.
    pub fn host_veths(&self) -> Vec<Link> {
        self.nl()
            .links()
            .unwrap()
            .into_iter()
            .filter(|l| underlay_cni::naming::is_host_veth_name(&l.name))
            .collect()
    }

    /// Waits (bounded: 60 s; the kernel deletes a few hundred veths a second) until no host veth of this plugin is left: DEL hands veth deletion to the agent's
    /// link reaper, and a deleted namespace takes its veths with it asynchronously. Returns what is left.
    pub fn wait_host_veths_gone(&self) -> Vec<Link> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = self.host_veths();
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Routes to pod addresses (inside the pool) in the node's main table.
    pub fn pod_routes(&self) -> Vec<underlay_dataplane::Route> {
        let pool: ipnet::IpNet = self.pool.parse().unwrap();
        self.nl()
            .routes(underlay_dataplane::Route::MAIN)
            .unwrap()
            .into_iter()
            .filter(|r| pool.contains(&r.dst))
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_agent();
    }
}

/// A plugin run: exit status and stdout parsed as JSON (Null when empty).
#[derive(Debug)]
pub struct Reply {
    pub ok: bool,
    pub json: Value,
    pub stderr: String,
}

impl Reply {
    pub fn code(&self) -> u64 {
        self.json["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("not an error reply: {self:?}"))
    }
    #[track_caller]
    pub fn expect_ok(&self) -> &Value {
        assert!(self.ok, "plugin failed: {self:?}");
        &self.json
    }
    #[track_caller]
    pub fn expect_err(&self, code: u32) {
        assert!(!self.ok, "plugin unexpectedly succeeded: {self:?}");
        assert_eq!(self.json["code"], code, "{self:?}");
        assert!(
            self.json["msg"].is_string() && self.json["cniVersion"].is_string(),
            "{self:?}"
        );
    }
}

/// Execs `program` with a clean CNI environment from inside `ns` (the child inherits the spawning thread's
/// namespace).
pub fn exec_in(ns: &TestNs, program: &Path, env: &[(&str, &str)], stdin: &[u8]) -> Reply {
    let out = ns
        .netns()
        .run(|| {
            let mut child = Command::new(program)
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .envs(env.iter().copied())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn plugin");
            child.stdin.take().unwrap().write_all(stdin).unwrap();
            Ok(child.wait_with_output().unwrap())
        })
        .unwrap();
    let json = if out.stdout.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    };
    Reply {
        ok: out.status.success(),
        json,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `busybox ping -c1 -W1 <ip>` from inside a namespace (bounded: one packet, one second; busybox-static is
/// installed by scripts/setup.sh).
pub fn ping(ns: &TestNs, ip: &str) -> bool {
    ns.command("busybox")
        .args(["ping", "-c", "1", "-W", "1", "-q", ip])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
