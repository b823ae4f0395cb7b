//! The IPAM service over its real socket, driven by the plugin's blocking client. No root needed: every test
//! uses its own temp dir for the socket, checkpoint and CNI dirs.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use underlay_agent::{AgentConfig, AgentError, Fault, config::PoolConfig};
use underlay_ipam_api::{AllocateRequest, AttachmentKey, Client, ClientError};

struct Agent {
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<std::sync::mpsc::Receiver<Result<(), AgentError>>>,
    socket: PathBuf,
}

impl Agent {
    fn stop(mut self) -> Result<(), AgentError> {
        self.stop.take().unwrap().send(()).unwrap();
        let r = self
            .done
            .take()
            .unwrap()
            .recv_timeout(Duration::from_secs(10))
            .unwrap();
        self.runtime
            .take()
            .unwrap()
            .shutdown_timeout(Duration::from_secs(5));
        r
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

fn mk_config(dir: &Path, block: &str) -> AgentConfig {
    AgentConfig {
        pool: PoolConfig {
            block: Some(block.parse().unwrap()),
            addresses: vec![],
        },
        socket: dir.join("run/agent.sock"),
        checkpoint: dir.join("state/ipam.json"),
        cni_conf_dir: dir.join("net.d"),
        cni_bin_dir: dir.join("bin"),
        // These agents run in the test process's namespace (the host's): its veths are not theirs to sweep.
        reap_links: false,
        ..AgentConfig::default()
    }
}

/// Starts the agent on its own runtime and waits (bounded) until the socket answers.
fn start(config: &AgentConfig) -> Result<Agent, AgentError> {
    std::fs::create_dir_all(config.checkpoint.parent().unwrap()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let cfg = config.clone();
    runtime.spawn(async move {
        let r = underlay_agent::run(cfg, Fault::None, async {
            let _ = stop_rx.await;
        })
        .await;
        let _ = done_tx.send(r);
    });
    for _ in 0..500 {
        if let Ok(r) = done_rx.try_recv() {
            // run() ended before the socket answered: a start-up error.
            runtime.shutdown_timeout(Duration::from_secs(5));
            return Err(r.expect_err("run() cannot succeed before it was stopped"));
        }
        if Client::connect(&config.socket).is_ok() {
            return Ok(Agent {
                runtime: Some(runtime),
                stop: Some(stop_tx),
                done: Some(done_rx),
                socket: config.socket.clone(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "agent did not answer on {} within 5 s",
        config.socket.display()
    );
}

fn req(id: &str) -> AllocateRequest {
    AllocateRequest {
        key: Some(AttachmentKey::new(id, "eth0")),
        netns: format!("/var/run/netns/{id}"),
        pod_namespace: "default".into(),
        pod_name: format!("pod-{id}"),
    }
}

#[test]
fn socket_is_0600_and_conflist_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let config = mk_config(dir.path(), "100.64.1.0/28");
    let agent = start(&config).unwrap();
    let meta = std::fs::metadata(&config.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // The conflist follows the socket (written once the socket listens): wait for it, bounded.
    let conflist = config.cni_conf_dir.join("10-underlay.conflist");
    for _ in 0..500 {
        if conflist.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
    assert_eq!(v["plugins"][0]["socket"], config.socket.to_str().unwrap());
    // No temporary socket names left next to the socket.
    let names: Vec<_> = std::fs::read_dir(config.socket.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["agent.sock"]);

    // A second agent on the same socket is refused while the first one answers.
    let mut second = config.clone();
    second.checkpoint = dir.path().join("state/other.json");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                underlay_agent::run(second, Fault::None, std::future::pending()),
            )
            .await
        })
        .expect("the second agent must stop on its own")
        .expect_err("second agent must not start");
    assert!(matches!(err, AgentError::AlreadyRunning(_)), "{err}");

    agent.stop().unwrap();
    assert!(!config.socket.exists(), "socket removed on clean shutdown");
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let config = mk_config(dir.path(), "100.64.1.0/28");
    std::fs::create_dir_all(config.socket.parent().unwrap()).unwrap();
    // A socket file nobody listens on, as a killed agent leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&config.socket).unwrap());
    assert!(Client::connect(&config.socket).is_err());
    let agent = start(&config).unwrap();
    let c = Client::connect(&agent.socket).unwrap();
    c.allocate(&req("a")).unwrap();
    agent.stop().unwrap();
}

#[test]
fn allocate_is_idempotent_release_list_gc() {
    let dir = tempfile::tempdir().unwrap();
    let config = mk_config(dir.path(), "100.64.1.0/28");
    let agent = start(&config).unwrap();
    let c = Client::connect(&agent.socket).unwrap();
    let a = c.allocate(&req("a")).unwrap();
    assert_eq!(a.address, "100.64.1.0/32");
    assert_eq!(a.gateway, "169.254.1.1");
    assert_eq!(a.mtu, 9001);
    assert_eq!(a.pod_name, "pod-a");
    assert_eq!(c.allocate(&req("a")).unwrap(), a, "same key, same reply");
    let b = c.allocate(&req("b")).unwrap();
    let d = c.allocate(&req("d")).unwrap();
    assert_ne!(a.address, b.address);
    let listed: BTreeSet<_> = c.list().unwrap().into_iter().map(|x| x.address).collect();
    assert_eq!(listed.len(), 3);

    assert_eq!(
        c.release(&AttachmentKey::new("a", "eth0"))
            .unwrap()
            .unwrap()
            .address,
        a.address
    );
    assert_eq!(c.release(&AttachmentKey::new("a", "eth0")).unwrap(), None);
    assert_eq!(
        c.release(&AttachmentKey::new("never", "eth0")).unwrap(),
        None
    );

    let released = c.gc(&[AttachmentKey::new("b", "eth0")]).unwrap();
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].address, d.address);
    let left: Vec<_> = c.list().unwrap().into_iter().map(|x| x.address).collect();
    assert_eq!(left, vec![b.address]);

    let err = c
        .allocate(&AllocateRequest {
            key: Some(AttachmentKey::new("", "eth0")),
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(err, ClientError::InvalidRequest(_)), "{err}");
    assert!(!err.is_retryable());
    agent.stop().unwrap();
}

#[test]
fn exhaustion_is_a_clear_retryable_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = mk_config(dir.path(), "100.64.1.0/30");
    let agent = start(&config).unwrap();
    let c = Client::connect(&agent.socket).unwrap();
    for i in 0..4 {
        c.allocate(&req(&format!("c{i}"))).unwrap();
    }
    c.release(&AttachmentKey::new("c0", "eth0")).unwrap();
    let err = c.allocate(&req("late")).unwrap_err();
    assert!(err.is_retryable());
    let ClientError::PoolExhausted(msg) = &err else {
        panic!("expected PoolExhausted, got {err:?}");
    };
    assert!(
        msg.starts_with(
            "pool 100.64.1.0/30 exhausted: 3 allocated, 1 cooling down (the first frees in"
        ),
        "{msg}"
    );
    agent.stop().unwrap();
}

#[test]
fn restart_loses_nothing_and_concurrent_adds_never_share_an_address() {
    let dir = tempfile::tempdir().unwrap();
    let config = mk_config(dir.path(), "100.64.2.0/24");
    let agent = start(&config).unwrap();
    let socket = agent.socket.clone();
    // 8 clients × 25 ADDs at once.
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let c = Client::connect(&socket).unwrap();
                (0..25)
                    .map(|i| {
                        let id = format!("t{t}-{i}");
                        (id.clone(), c.allocate(&req(&id)).unwrap().address)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let got: Vec<(String, String)> = threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let distinct: BTreeSet<_> = got.iter().map(|(_, a)| a.clone()).collect();
    assert_eq!(distinct.len(), 200, "an address was handed out twice");
    let c = Client::connect(&socket).unwrap();
    c.release(&AttachmentKey::new("t0-0", "eth0")).unwrap();
    agent.stop().unwrap();

    let agent = start(&config).unwrap();
    let c = Client::connect(&agent.socket).unwrap();
    let listed = c.list().unwrap();
    assert_eq!(listed.len(), 199);
    for (id, addr) in got.iter().skip(1) {
        let again = c.allocate(&req(id)).unwrap();
        assert_eq!(
            &again.address, addr,
            "{id} changed address across a restart"
        );
    }
    // The released address is still cooling after the restart: 56 free addresses remain, not 57.
    for i in 0..56 {
        c.allocate(&req(&format!("new{i}"))).unwrap();
    }
    let err = c.allocate(&req("one-too-many")).unwrap_err();
    assert!(matches!(err, ClientError::PoolExhausted(_)), "{err}");
    agent.stop().unwrap();
}

#[test]
fn corrupt_checkpoint_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = mk_config(dir.path(), "100.64.1.0/28");
    std::fs::create_dir_all(config.checkpoint.parent().unwrap()).unwrap();
    std::fs::write(&config.checkpoint, "{\"version\":1,\"allocations\":[").unwrap();
    let err = start(&config)
        .err()
        .expect("must refuse a corrupt checkpoint");
    assert!(matches!(err, AgentError::CorruptCheckpoint { .. }), "{err}");
    assert!(err.to_string().contains("refusing to start"), "{err}");
    assert!(
        !config.socket.exists(),
        "no socket served on a refused start"
    );

    // Two keys holding one address is corruption too.
    let dup = r#"{"version":1,"allocations":[
        {"key":{"container_id":"a","ifname":"eth0"},"address":"100.64.1.1"},
        {"key":{"container_id":"b","ifname":"eth0"},"address":"100.64.1.1"}],"cooling":[],"cursor":0}"#;
    std::fs::write(&config.checkpoint, dup).unwrap();
    let err = start(&config).err().expect("must refuse a duplicate");
    assert!(matches!(err, AgentError::CorruptCheckpoint { .. }), "{err}");
}

#[test]
fn failed_checkpoint_write_is_not_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let config = mk_config(dir.path(), "100.64.1.0/28");
    let agent = start(&config).unwrap();
    let c = Client::connect(&agent.socket).unwrap();
    let a = c.allocate(&req("a")).unwrap();
    // Make the checkpoint directory unwritable by replacing it with a file-shaped obstacle: put a
    // directory where the temp file must go.
    let tmp = config.checkpoint.with_extension("json.tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let err = c.allocate(&req("b")).unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Internal {
                retryable: true,
                ..
            }
        ),
        "{err:?}"
    );
    std::fs::remove_dir(&tmp).unwrap();
    // The failed change was undone: b now gets the address it would have had, and a is untouched.
    let b = c.allocate(&req("b")).unwrap();
    assert_eq!(b.address, "100.64.1.1/32");
    assert_eq!(c.list().unwrap().len(), 2);
    assert_eq!(c.allocate(&req("a")).unwrap(), a);
    agent.stop().unwrap();
}
