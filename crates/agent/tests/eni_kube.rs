//! `eni` mode driven by an `UnderlayNode` in the in-process API stand-in: the agent finds the ENI devices of
//! `status.pool.enis` by MAC, starts IPAM on their addresses (egress = device, ENI table), follows pool
//! changes without dropping an allocated address, and reports `poolUsed` and its conditions. Needs root.
#![cfg(feature = "root-tests")]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use underlay_agent::config::PoolConfig;
use underlay_agent::eni::kube::{EniKubeOptions, run_eni_on_kube};
use underlay_agent::{AgentConfig, AgentError, Fault};
use underlay_api::{
    Mode, Pool, PoolEni, UnderlayNode, UnderlayNodeSpec, UnderlayNodeStatus, conditions,
};
use underlay_apisim::ApiSim;
use underlay_core::eni::route_table;
use underlay_core::names;
use underlay_dataplane::testns::TestNs;
use underlay_dataplane::{Mac, VethSpec, format_mac};
use underlay_ipam_api::{AllocateRequest, Allocation, AttachmentKey, Client};

const PREFIX: &str = "agek";
const WAIT: Duration = Duration::from_secs(20);
const MAC0: Mac = [0x02, 0xe1, 0, 0, 0, 0x01];
const MAC1: Mac = [0x02, 0xe1, 0, 0, 0, 0x02];

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A node namespace with the primary ENI `eth0` (node IP) and a second ENI `eth1` (down, no address).
fn node() -> (TestNs, TestNs) {
    let node = TestNs::new(PREFIX).unwrap();
    let wire = TestNs::new(PREFIX).unwrap();
    let mut nl = node.netns().netlink().unwrap();
    for (name, peer, mac) in [("eth0", "w0", MAC0), ("eth1", "w1", MAC1)] {
        nl.veth_add(&VethSpec {
            name,
            peer_name: peer,
            peer_netns: Some(wire.netns()),
            mtu: None,
            mac: Some(mac),
            peer_mac: None,
            up: name == "eth0",
        })
        .unwrap();
    }
    let e0 = nl.link_by_name("eth0").unwrap().unwrap();
    nl.addr_add(e0.index, "198.18.0.10/24".parse().unwrap())
        .unwrap();
    (node, wire)
}

fn pool_eni(id: &str, index: u32, mac: Mac, addrs: &[&str]) -> PoolEni {
    PoolEni {
        id: id.into(),
        device_index: index,
        mac: Some(format_mac(&mac)),
        subnet_cidr: Some("198.18.0.0/24".into()),
        primary_ip: None,
        addresses: addrs.iter().map(|s| s.to_string()).collect(),
        prefixes: vec![],
        ..PoolEni::default()
    }
}

fn record(name: &str, enis: Vec<PoolEni>) -> UnderlayNode {
    let mut n = UnderlayNode::new(
        name,
        UnderlayNodeSpec {
            instance_id: "i-0a".into(),
            subnet_id: "subnet-1".into(),
            zone: "lab-1a".into(),
            mode: Mode::Eni,
            node_ip: "198.18.0.10".into(),
            primary_eni_id: "eni-0".into(),
        },
    );
    let size = enis.iter().map(|e| e.addresses.len() as u32).sum();
    n.status = Some(UnderlayNodeStatus {
        pool: Some(Pool {
            enis,
            ..Pool::default()
        }),
        pool_size: size,
        ..Default::default()
    });
    n
}

fn config(dir: &Path) -> AgentConfig {
    AgentConfig {
        pool: PoolConfig::default(),
        socket: dir.join("run/agent.sock"),
        checkpoint: dir.join("state/ipam.json"),
        cni_conf_dir: dir.join("net.d"),
        cni_bin_dir: dir.join("bin"),
        cooldown_secs: 0,
        reap_links: false,
        ..AgentConfig::default()
    }
}

struct Running {
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: std::sync::mpsc::Receiver<Result<(), AgentError>>,
}

impl Running {
    fn stop(mut self) -> Result<(), AgentError> {
        let _ = self.stop.take().unwrap().send(());
        self.done.recv_timeout(Duration::from_secs(10)).unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

fn start(sim: &ApiSim, config: AgentConfig, netns: PathBuf, name: &str) -> Running {
    std::fs::create_dir_all(config.checkpoint.parent().unwrap()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut o = EniKubeOptions::new(name, vec!["198.18.0.0/15".parse().unwrap()]);
    // These tests follow the UnderlayNode alone and create no Pod objects: no IMDS opt-ins, and no policy
    // (ADD would wait for each pod's Pod object; `lab policy` runs both runners with policy on).
    o.imds_opt_ins = false;
    o.network_policy = false;
    o.netns = Some(netns);
    o.health_addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), names::AGENT_HEALTH_PORT);
    o.converge_interval = Duration::from_millis(300);
    o.status_interval = Duration::from_millis(100);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let sim = sim.clone();
    runtime.spawn(async move {
        let r = run_eni_on_kube(config, sim.client(), o, Fault::None, async {
            let _ = stop_rx.await;
        })
        .await;
        let _ = done_tx.send(r);
    });
    Running {
        runtime: Some(runtime),
        stop: Some(stop_tx),
        done: done_rx,
    }
}

fn allocate(socket: &Path, id: &str) -> Result<Allocation, String> {
    let c = Client::connect(socket).map_err(|e| e.to_string())?;
    c.set_timeout(Duration::from_secs(5)).unwrap();
    c.allocate(&AllocateRequest {
        key: Some(AttachmentKey::new(id, "eth0")),
        netns: format!("/var/run/netns/{id}"),
        pod_namespace: "default".into(),
        pod_name: format!("pod-{id}"),
    })
    .map_err(|e| e.to_string())
}

fn status(sim: &ApiSim, name: &str) -> UnderlayNodeStatus {
    sim.get::<UnderlayNode>(None, name)
        .unwrap()
        .status
        .unwrap_or_default()
}

fn condition(sim: &ApiSim, name: &str, ty: &str) -> Option<String> {
    status(sim, name)
        .conditions
        .into_iter()
        .find(|c| c.type_ == ty)
        .map(|c| c.status)
}

#[test]
fn the_agent_serves_the_addresses_of_its_enis_and_follows_pool_changes() {
    let (node, _wire) = node();
    let dir = tempfile::tempdir().unwrap();
    let name = format!("{PREFIX}-{}-node", std::process::id());
    let sim = ApiSim::new();
    // The controller has attached nothing yet.
    sim.insert(&record(&name, vec![]));
    let cfg = config(dir.path());
    let socket = cfg.socket.clone();
    let running = start(&sim, cfg, PathBuf::from(node.path()), &name);
    wait_for("PoolReady=False while no ENI is listed", || {
        (condition(&sim, &name, conditions::POOL_READY).as_deref() == Some("False")).then_some(())
    });
    assert!(
        Client::connect(&socket).is_err(),
        "IPAM served with no pool"
    );

    // The second ENI is attached with one secondary; the primary carries one too.
    assert!(sim.modify::<UnderlayNode>(None, &name, |n| {
        *n = record(
            &name,
            vec![
                pool_eni("eni-0", 0, MAC0, &["198.18.0.11"]),
                pool_eni("eni-1", 1, MAC1, &["198.18.0.20"]),
            ],
        );
    }));
    wait_for("Ready=True", || {
        (condition(&sim, &name, conditions::READY).as_deref() == Some("True")).then_some(())
    });
    let eth1 = node
        .netns()
        .netlink()
        .unwrap()
        .link_by_name("eth1")
        .unwrap()
        .unwrap();
    assert!(eth1.up, "the second ENI was brought up");
    assert_eq!(eth1.mtu, 9001);

    let a = allocate(&socket, "c1").unwrap();
    let b = allocate(&socket, "c2").unwrap();
    let mut got = vec![
        (a.address.clone(), a.egress_interface.clone(), a.route_table),
        (b.address.clone(), b.egress_interface.clone(), b.route_table),
    ];
    got.sort();
    assert_eq!(
        got,
        vec![
            ("198.18.0.11/32".into(), "eth0".into(), route_table(0)),
            ("198.18.0.20/32".into(), "eth1".into(), route_table(1)),
        ]
    );
    wait_for("poolUsed = 2", || {
        (status(&sim, &name).pool_used == 2).then_some(())
    });
    assert!(
        allocate(&socket, "c3").is_err(),
        "the pool has two addresses"
    );

    // The controller assigns one more address to ENI 1 and unassigns nothing: the pool grows.
    assert!(sim.modify::<UnderlayNode>(None, &name, |n| {
        n.status.as_mut().unwrap().pool.as_mut().unwrap().enis[1]
            .addresses
            .push("198.18.0.21".into());
    }));
    let c = wait_for("the new address", || allocate(&socket, "c3").ok());
    assert_eq!(c.address, "198.18.0.21/32");
    assert_eq!(c.egress_interface, "eth1");

    // The record loses an allocated address (never done by the controller, but the agent must not drop a live
    // pod's address): the allocation stays.
    assert!(sim.modify::<UnderlayNode>(None, &name, |n| {
        n.status.as_mut().unwrap().pool.as_mut().unwrap().enis[1]
            .addresses
            .retain(|a| a != "198.18.0.20");
    }));
    std::thread::sleep(Duration::from_millis(1000));
    let held: Vec<String> = Client::connect(&socket)
        .unwrap()
        .list()
        .unwrap()
        .into_iter()
        .map(|a| a.address)
        .collect();
    assert!(held.contains(&"198.18.0.20/32".to_string()), "{held:?}");
    wait_for("poolUsed = 3", || {
        (status(&sim, &name).pool_used == 3).then_some(())
    });
    running.stop().unwrap();
}

/// The agent's half of the two-phase release: it reports what it holds and, once the pool it serves leaves the
/// withdrawn addresses out, the record's release generation; a withdrawn address is never handed out.
#[test]
fn withdrawn_addresses_are_never_handed_out_and_the_generation_is_acknowledged() {
    let (node, _wire) = node();
    let dir = tempfile::tempdir().unwrap();
    let name = format!("{PREFIX}-{}-rel", std::process::id());
    let sim = ApiSim::new();
    let all = ["198.18.0.20", "198.18.0.21", "198.18.0.22"];
    sim.insert(&record(&name, vec![pool_eni("eni-1", 1, MAC1, &all)]));
    let cfg = config(dir.path());
    let socket = cfg.socket.clone();
    let running = start(&sim, cfg, PathBuf::from(node.path()), &name);
    wait_for("Ready=True", || {
        (condition(&sim, &name, conditions::READY).as_deref() == Some("True")).then_some(())
    });
    let a = allocate(&socket, "c1").unwrap();
    let held = a.address.trim_end_matches("/32").to_string();
    let s = wait_for("poolHeld with the allocation, generation 0", || {
        let s = status(&sim, &name);
        (s.pool_held.as_ref() == Some(&vec![held.clone()])).then_some(s)
    });
    assert_eq!(s.observed_release_generation, Some(0));

    // The controller withdraws the two free addresses.
    let free: Vec<String> = all
        .iter()
        .map(ToString::to_string)
        .filter(|x| *x != held)
        .collect();
    assert!(sim.modify::<UnderlayNode>(None, &name, |n| {
        let pool = n.status.as_mut().unwrap().pool.as_mut().unwrap();
        pool.enis[0].addresses = vec![held.clone()];
        pool.enis[0].releasing_addresses = free.clone();
        pool.release_generation = 1;
    }));
    wait_for("generation 1 acknowledged", || {
        (status(&sim, &name).observed_release_generation == Some(1)).then_some(())
    });
    // Acknowledged means served: no withdrawn address comes out, the pool is exhausted.
    assert!(
        allocate(&socket, "c2").is_err(),
        "a withdrawn address was handed out"
    );
    // The pod leaves (no cooldown here): nothing is held any more.
    Client::connect(&socket)
        .unwrap()
        .release(&AttachmentKey::new("c1", "eth0"))
        .unwrap();
    wait_for("poolHeld empty", || {
        (status(&sim, &name).pool_held == Some(vec![])).then_some(())
    });
    assert_eq!(
        status(&sim, &name).pool_cooling,
        Some(vec![]),
        "no cooldown here"
    );
    running.stop().unwrap();
}
