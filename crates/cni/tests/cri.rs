//! containerd's CRI, the API the kubelet drives, as the plugin's real client: the runtime EKS nodes use.
//!
//! The test's node namespace holds the agent (it installs underlay-cni, portmap and bandwidth into the test's CNI
//! bin dir and writes its conflist into the test's conf dir, as on a node) and containerd from Debian's packages,
//! started with a configuration, root, state, runc root and socket of the test's own, its CRI plugin pointed at
//! those CNI dirs. The sandbox ("pause") image is busybox-static, imported into containerd's store by the test
//! (podman import, then `ctr images import`): nothing is pulled. A tonic client of the CRI protobufs then runs
//! what the kubelet runs for each pod: RunPodSandbox (metadata, hostname, log dir, cgroup parent, namespace
//! options, port mappings, annotations), PodSandboxStatus, StopPodSandbox, RemovePodSandbox.
//!
//! Checks: every sandbox gets its address from the agent, which recorded K8S_POD_NAMESPACE and K8S_POD_NAME from
//! CNI_ARGS; pods reach each other; a hostPort on the node reaches its pod through the chained portmap, from
//! another pod and from the node; the bandwidth annotation shapes through the chained bandwidth plugin; stopping
//! returns the address, and after removal no veth, route, policy rule, DNAT rule or allocation is left.
//!
//! Every exit path cleans up (the `Containerd` guard): sandboxes stopped and removed through the CRI, containerd
//! stopped, shims it started killed by pid, mounts under the test's directory detached, the pods' cgroups
//! removed; the namespaces go with their `TestNs`.
#![cfg(feature = "root-tests")]

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{NODE_IP, Node, PLUGIN, REFERENCE_PLUGINS};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListPodSandboxRequest, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest, PortMapping,
    Protocol, RemovePodSandboxRequest, RunPodSandboxRequest, StatusRequest, StopPodSandboxRequest,
    VersionRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};
use underlay_cni::naming::host_veth_name;
use underlay_dataplane::Netns;

const PREFIX: &str = "ulcri";
const POOL: &str = "100.64.25.0/28";
const PAUSE_IMAGE: &str = "localhost/ulcri-pause:test";
/// The Kubernetes namespace of the test's pods.
const POD_NAMESPACE: &str = "ulcri-ns";
const PODS: u16 = 3;
/// Pod i maps host port HOST_PORT_BASE + i to CONTAINER_PORT.
const HOST_PORT_BASE: u16 = 18090;
const CONTAINER_PORT: u16 = 8080;
/// containerd is killed after this long whatever happens (the test takes well under a minute).
const CONTAINERD_LIFETIME: &str = "600";
/// Every CRI call is bounded.
const CRI_TIMEOUT: Duration = Duration::from_secs(60);

/// containerd inside the node namespace, with everything it writes under `dir`; and the CRI client to it.
struct Containerd {
    dir: PathBuf,
    child: Option<Child>,
    rt: tokio::runtime::Runtime,
    cri: Option<RuntimeServiceClient<Channel>>,
    /// The cgroup parent of every sandbox (`/ulcri-<pid>`), removed on drop.
    cgroup_parent: String,
}

impl Containerd {
    fn start(node: &Node, dir: &Path) -> Containerd {
        let d = dir.display();
        let cni_bin = node.dir.path().join("bin");
        let cni_conf = node.dir.path().join("net.d");
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  # The sandbox's oom_score_adj (-998) no lower than containerd's own: a test host may not lower it (no
  # CAP_SYS_RESOURCE when it is itself a container).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
"#,
            bin = cni_bin.display(),
            conf = cni_conf.display(),
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let config_path = dir.join("config.toml");
        // Spawned from a thread inside the node namespace: containerd and what it runs (the shims, runc, the CNI
        // plugins) live there. `timeout` bounds it even if this process dies without its destructor.
        let child = node
            .ns
            .netns()
            .run(|| {
                Ok(Command::new("timeout")
                    .args(["--kill-after=10", CONTAINERD_LIFETIME, "containerd"])
                    .arg("--config")
                    .arg(&config_path)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .expect("spawn containerd (scripts/setup.sh installs it)"))
            })
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut c = Containerd {
            dir: dir.to_path_buf(),
            child: Some(child),
            rt,
            cri: None,
            cgroup_parent: format!("/{PREFIX}-{}", std::process::id()),
        };
        c.connect();
        c
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// The last lines of containerd's log, for failure messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Connects the CRI client and waits (bounded: 30 s) until the runtime answers Version.
    fn connect(&mut self) {
        let socket = self.socket();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let path = socket.clone();
            let attempt = self.rt.block_on(async {
                let channel = Endpoint::try_from("http://[::]:50051")
                    .unwrap()
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(CRI_TIMEOUT)
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
                    .map_err(|e| e.to_string())?;
                let mut client = RuntimeServiceClient::new(channel);
                client
                    .version(VersionRequest {
                        version: "v1".into(),
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(client)
            });
            match attempt {
                Ok(client) => {
                    self.cri = Some(client);
                    return;
                }
                Err(e) if Instant::now() > deadline => {
                    panic!("containerd's CRI did not answer: {e}\n{}", self.log_tail())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn cri(&self) -> RuntimeServiceClient<Channel> {
        self.cri.clone().expect("connected")
    }

    /// `ctr` against this containerd, in the CRI's namespace.
    fn ctr(&self, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .args(["60", "ctr", "--address"])
            .arg(self.socket())
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .expect("ctr");
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (bounded: 30 s) until the runtime reports NetworkReady: its CNI plugin found the agent's conflist.
    fn wait_network_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self
                .rt
                .block_on(self.cri().status(StatusRequest { verbose: false }))
                .unwrap()
                .into_inner();
            let ready = status.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.r#type == "NetworkReady" && c.status)
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "runtime network not ready: {status:?}\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// RunPodSandbox as the kubelet sends it for pod `name` with one hostPort mapping; returns the sandbox id.
    fn run_pod(&self, name: &str, host_port: u16, annotations: HashMap<String, String>) -> String {
        let logs = self.dir.join("pods").join(name);
        std::fs::create_dir_all(&logs).unwrap();
        let uid = format!("{PREFIX}-uid-{name}");
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: uid.clone(),
                namespace: POD_NAMESPACE.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: logs.display().to_string(),
            dns_config: None,
            port_mappings: vec![PortMapping {
                protocol: Protocol::Tcp as i32,
                container_port: CONTAINER_PORT.into(),
                host_port: host_port.into(),
                host_ip: String::new(),
            }],
            labels: HashMap::from([
                ("io.kubernetes.pod.name".into(), name.into()),
                ("io.kubernetes.pod.namespace".into(), POD_NAMESPACE.into()),
                ("io.kubernetes.pod.uid".into(), uid.clone()),
            ]),
            annotations,
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: format!("{}/pod{uid}", self.cgroup_parent),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Pod as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let reply = self
            .rt
            .block_on(self.cri().run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            }));
        match reply {
            Ok(r) => r.into_inner().pod_sandbox_id,
            Err(e) => panic!("RunPodSandbox {name}: {e}\n{}", self.log_tail()),
        }
    }

    /// PodSandboxStatus (verbose): the pod's IP and the sandbox process's pid.
    fn pod_status(&self, id: &str) -> (Ipv4Addr, u32) {
        let reply = self
            .rt
            .block_on(self.cri().pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            }))
            .unwrap()
            .into_inner();
        let ip = reply
            .status
            .as_ref()
            .and_then(|s| s.network.as_ref())
            .map(|n| n.ip.clone())
            .unwrap_or_default();
        let ip: Ipv4Addr = ip
            .parse()
            .unwrap_or_else(|_| panic!("sandbox {id} has no IPv4 address: {reply:?}"));
        let info: serde_json::Value =
            serde_json::from_str(reply.info.get("info").expect("verbose info")).unwrap();
        let pid = info["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("no pid in {info}")) as u32;
        (ip, pid)
    }

    fn stop_pod(&self, id: &str) {
        if let Err(e) = self
            .rt
            .block_on(self.cri().stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
        {
            panic!("StopPodSandbox {id}: {e}\n{}", self.log_tail());
        }
    }

    fn remove_pod(&self, id: &str) {
        if let Err(e) = self
            .rt
            .block_on(self.cri().remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
        {
            panic!("RemovePodSandbox {id}: {e}\n{}", self.log_tail());
        }
    }

    fn list_pods(&self) -> Vec<String> {
        self.rt
            .block_on(
                self.cri()
                    .list_pod_sandbox(ListPodSandboxRequest { filter: None }),
            )
            .map(|r| r.into_inner().items.into_iter().map(|p| p.id).collect())
            .unwrap_or_default()
    }

    /// Pids of the shims this containerd started (their command line names its socket).
    fn shim_pids(&self) -> Vec<u32> {
        let socket = self.socket().display().to_string();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return vec![];
        };
        procs
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.starts_with("/usr/bin/containerd-shim") && c.contains(&socket)
                })
            })
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // What the kubelet would do for every pod left (a failed assertion): stop (CNI DEL) and remove.
        if self.cri.is_some() {
            for id in self.list_pods() {
                let mut cri = self.cri();
                let _ = self.rt.block_on(async {
                    let _ = cri
                        .stop_pod_sandbox(StopPodSandboxRequest {
                            pod_sandbox_id: id.clone(),
                        })
                        .await;
                    cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
                        .await
                });
            }
        }
        self.cri = None;
        let shims = self.shim_pids();
        if let Some(mut child) = self.child.take() {
            // SIGTERM to `timeout` is passed on to containerd; SIGKILL if it has not exited in 10 s.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims outlive containerd by design; after the removals above none should be left.
        for pid in shims.into_iter().chain(self.shim_pids()) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        // Mounts under the test's directory (pod netns files, rootfs): detached, deepest first.
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
        remove_cgroups(&self.cgroup_parent);
        // The shims' socket directory (`/run/containerd/s`, fixed in containerd 1.6), if they left it empty; a
        // directory in use by another containerd is not empty and stays.
        let _ = std::fs::remove_dir("/run/containerd/s");
        let _ = std::fs::remove_dir("/run/containerd");
    }
}

/// Removes the cgroup `parent` (and the empty cgroups under it) in every hierarchy, deepest first; a cgroup that
/// still holds a process stays (rmdir refuses).
fn remove_cgroups(parent: &str) {
    fn remove_tree(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.filter_map(Result::ok) {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for h in hierarchies.filter_map(Result::ok) {
        let dir = h.path().join(parent.trim_start_matches('/'));
        if dir.is_dir() {
            remove_tree(&dir);
        }
    }
}

/// The sandbox image: busybox-static whose entrypoint sleeps, imported from a root file system the test makes
/// (podman import into a private store, saved as a docker archive, which `ctr images import` names by its tag).
fn import_pause_image(containerd: &Containerd, dir: &Path) {
    let d = dir.join("image");
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
    std::fs::write(
        d.join("containers.conf"),
        "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"none\"\nruntime = \"runc\"\n",
    )
    .unwrap();
    let podman = |args: &[&str]| {
        let out = Command::new("timeout")
            .args(["120", "podman", "--root"])
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
            .expect("podman");
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    podman(&[
        "import",
        "-q",
        "--change",
        r#"ENTRYPOINT ["/bin/busybox", "sleep", "600"]"#,
        d.join("rootfs.tar").to_str().unwrap(),
        PAUSE_IMAGE,
    ]);
    let archive = d.join("pause.tar");
    podman(&[
        "save",
        "-q",
        "--format",
        "docker-archive",
        "-o",
        archive.to_str().unwrap(),
        PAUSE_IMAGE,
    ]);
    containerd.ctr(&[
        "images",
        "import",
        "--snapshotter",
        "native",
        archive.to_str().unwrap(),
    ]);
    let images = containerd.ctr(&["images", "ls", "-q"]);
    assert!(images.lines().any(|l| l == PAUSE_IMAGE), "{images}");
}

/// `busybox ping` from inside the network namespace of process `pid` (bounded: 2 packets, 2 s each).
fn ping_from(pid: u32, ip: Ipv4Addr) -> bool {
    Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args([
            "busybox",
            "ping",
            "-c",
            "2",
            "-W",
            "2",
            "-q",
            &ip.to_string(),
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A TCP listener on CONTAINER_PORT inside pod `pid`'s namespace that answers each of `connections`
/// connections with `reply` (bounded: 20 s in all).
fn serve_in_pod(
    pid: u32,
    reply: &'static str,
    connections: usize,
) -> std::thread::JoinHandle<usize> {
    let ns = Netns::open(format!("/proc/{pid}/ns/net")).unwrap();
    let listener = ns
        .run(|| {
            Ok(
                TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, CONTAINER_PORT)))
                    .expect("bind in the pod"),
            )
        })
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut served = 0;
        while served < connections && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.write_all(reply.as_bytes());
                    served += 1;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        served
    })
}

/// Connects to `to` from inside network namespace `ns` and reads the reply (bounded: 5 s).
fn fetch_from(ns: &Netns, to: SocketAddr) -> Result<String, String> {
    ns.run(|| {
        Ok((|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })())
    })
    .unwrap()
    .map_err(|e| format!("{to}: {e}"))
}

/// `iptables-save -t nat` in the node namespace (portmap's rules).
fn node_nat(node: &Node) -> String {
    let out = node
        .ns
        .command("iptables-save")
        .args(["-t", "nat"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn containerd_cri_runs_pods_with_host_ports_on_the_agents_addresses() {
    let dir = tempfile::Builder::new().prefix(PREFIX).tempdir().unwrap();
    // The agent installs the plugin and the chained plugins from these sources into the node's CNI bin dir, and
    // writes its conflist into the node's conf dir: what containerd reads.
    let node = Node::with_agent_config(
        PREFIX,
        POOL,
        &format!("plugin_source: {PLUGIN}\nchained_plugins_dir: {REFERENCE_PLUGINS}\n"),
    );
    let cni_bin = node.dir.path().join("bin");
    for p in ["underlay-cni", "portmap", "bandwidth"] {
        assert!(cni_bin.join(p).is_file(), "the agent did not install {p}");
    }
    // The runtime's own loopback setup needs the reference `loopback` in its bin dir, as on any node.
    std::fs::copy(
        Path::new(REFERENCE_PLUGINS).join("loopback"),
        cni_bin.join("loopback"),
    )
    .unwrap();
    let rules_before = node.nl().rules(false).unwrap();

    let containerd = Containerd::start(&node, dir.path());
    import_pause_image(&containerd, dir.path());
    containerd.wait_network_ready();

    // Pod 0 also asks for ingress shaping, as a pod annotation the kubelet passes on.
    let mut pods = Vec::new();
    for i in 0..PODS {
        let name = format!("web-{i}");
        let annotations = if i == 0 {
            HashMap::from([("kubernetes.io/ingress-bandwidth".into(), "10M".into())])
        } else {
            HashMap::new()
        };
        let id = containerd.run_pod(&name, HOST_PORT_BASE + i, annotations);
        let (ip, pid) = containerd.pod_status(&id);
        pods.push((name, id, ip, pid));
    }

    // Each address is the agent's, recorded with the pod's namespace and name from CNI_ARGS.
    let pool: ipnet::Ipv4Net = POOL.parse().unwrap();
    let allocations = node.allocations();
    assert_eq!(allocations.len(), pods.len(), "{allocations:?}");
    for (name, id, ip, _) in &pods {
        assert!(pool.contains(ip), "{name}: {ip} not in {pool}");
        let a = allocations
            .iter()
            .find(|a| a.key.as_ref().is_some_and(|k| &k.container_id == id))
            .unwrap_or_else(|| panic!("no allocation for {name} ({id}): {allocations:?}"));
        assert_eq!(a.address_v4().unwrap().addr(), *ip, "{name}");
        assert_eq!(a.pod_namespace, POD_NAMESPACE, "{name}");
        assert_eq!(&a.pod_name, name);
        assert_eq!(a.key.as_ref().unwrap().ifname, "eth0", "{name}");
    }

    // Pods reach each other and their node.
    let node_ip: Ipv4Addr = NODE_IP.parse().unwrap();
    for (name, _, _, pid) in &pods {
        assert!(ping_from(*pid, node_ip), "{name} cannot reach its node");
        for (other, _, ip, _) in &pods {
            if other != name {
                assert!(ping_from(*pid, *ip), "{name} cannot reach {other} at {ip}");
            }
        }
    }

    // hostPort: the node's port HOST_PORT_BASE + 1 is pod 1's CONTAINER_PORT, through the chained portmap,
    // from pod 0 (PREROUTING) and from the node itself (OUTPUT).
    let (_, _, ip1, pid1) = &pods[1];
    let nat = node_nat(&node);
    assert!(
        nat.lines()
            .any(|l| l.contains(&format!("--dport {}", HOST_PORT_BASE + 1))
                && l.contains(&format!("--to-destination {ip1}:{CONTAINER_PORT}"))),
        "no DNAT of host port {} to {ip1}:{CONTAINER_PORT}:\n{nat}",
        HOST_PORT_BASE + 1
    );
    let server = serve_in_pod(*pid1, "web-1\n", 2);
    let host_port = SocketAddr::from((node_ip, HOST_PORT_BASE + 1));
    let pod0 = Netns::open(format!("/proc/{}/ns/net", pods[0].3)).unwrap();
    assert_eq!(fetch_from(&pod0, host_port), Ok("web-1\n".to_string()));
    assert_eq!(
        fetch_from(node.ns.netns(), host_port),
        Ok("web-1\n".to_string())
    );
    assert_eq!(server.join().unwrap(), 2);

    // bandwidth: pod 0's ingress is shaped on its host veth (tbf).
    let veth0 = host_veth_name(&pods[0].1, "eth0");
    let qdisc = node
        .ns
        .command("tc")
        .args(["qdisc", "show", "dev", &veth0])
        .output()
        .unwrap();
    let qdisc = String::from_utf8_lossy(&qdisc.stdout);
    assert!(qdisc.contains("tbf"), "no tbf qdisc on {veth0}: {qdisc}");

    // Stop (CNI DEL through the chain) returns the address at once; remove deletes the sandbox.
    let (_, id0, ip0, _) = &pods[0];
    containerd.stop_pod(id0);
    assert!(
        !node
            .allocations()
            .iter()
            .any(|a| a.address_v4().unwrap().addr() == *ip0),
        "{ip0} still allocated after StopPodSandbox"
    );
    assert!(!node_nat(&node).contains(&format!("--dport {HOST_PORT_BASE} ")));
    containerd.remove_pod(id0);
    for (_, id, _, _) in &pods[1..] {
        containerd.stop_pod(id);
        containerd.remove_pod(id);
    }
    assert!(containerd.list_pods().is_empty());

    // Nothing of theirs is left on the node.
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(node.pod_routes().is_empty(), "{:?}", node.pod_routes());
    assert!(node.wait_host_veths_gone().is_empty());
    assert_eq!(node.nl().rules(false).unwrap(), rules_before);
    let nat = node_nat(&node);
    for (name, _, ip, _) in &pods {
        assert!(
            !nat.contains(&ip.to_string()),
            "{name}'s {ip} left in nat:\n{nat}"
        );
    }
    assert!(
        !nat.contains(&format!("--dport {}", HOST_PORT_BASE + 1)),
        "{nat}"
    );
    drop(containerd);
}
