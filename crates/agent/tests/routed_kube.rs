//! Routed mode driven by an `UnderlayNode`: the record → spec conversion (no root), and the whole agent
//! against the in-process API stand-in, converging a network namespace (root, behind `root-tests`).

use underlay_agent::routed::kube::{KubeAgentOptions, RecordError, spec_from_record};
use underlay_api::{Mode, PeerRoute, Pool, UnderlayNode, UnderlayNodeSpec, UnderlayNodeStatus};
use underlay_core::planner;

fn opts(name: &str) -> KubeAgentOptions {
    let mut o = KubeAgentOptions::new(
        name,
        "100.64.0.0/10".parse().unwrap(),
        vec!["198.18.0.0/15".parse().unwrap()],
    );
    o.mtu = 1500;
    // These tests follow the UnderlayNode alone and create no Pod objects: no IMDS opt-ins, and no policy
    // (ADD would wait for each pod's Pod object; `lab policy` runs both runners with policy on).
    o.imds_opt_ins = false;
    o.network_policy = false;
    o
}

fn record(name: &str, block: Option<&str>, routes: &[(&str, &str)]) -> UnderlayNode {
    let mut n = UnderlayNode::new(
        name,
        UnderlayNodeSpec {
            instance_id: "i-0a".into(),
            subnet_id: "subnet-1".into(),
            zone: "lab-1a".into(),
            mode: Mode::Routed,
            node_ip: "198.18.0.10".into(),
            primary_eni_id: "eni-0a".into(),
        },
    );
    n.status = Some(UnderlayNodeStatus {
        pool: block.map(|b| Pool {
            block: Some(b.into()),
            ..Pool::default()
        }),
        pool_size: 64,
        routes: routes
            .iter()
            .map(|(d, v)| PeerRoute {
                destination: (*d).into(),
                via: (*v).into(),
            })
            .collect(),
        ..Default::default()
    });
    n
}

#[test]
fn a_record_with_a_pool_becomes_the_converge_spec() {
    let r = record(
        "node-a",
        Some("100.64.0.0/26"),
        &[("100.64.0.64/26", "198.18.0.11")],
    );
    let spec = spec_from_record(&r, &opts("node-a")).unwrap().unwrap();
    assert_eq!(spec.node, "node-a");
    assert_eq!(spec.subnet, "subnet-1");
    assert_eq!(
        spec.node_ip,
        "198.18.0.10".parse::<std::net::Ipv4Addr>().unwrap()
    );
    assert_eq!(spec.uplink, None);
    assert_eq!(spec.pod_block, "100.64.0.0/26".parse().unwrap());
    assert_eq!(spec.pod_cidr, "100.64.0.0/10".parse().unwrap());
    assert_eq!(spec.vpc_cidrs, vec!["198.18.0.0/15".parse().unwrap()]);
    assert_eq!(spec.mtu, 1500);
    assert_eq!(
        spec.peer_routes,
        vec![planner::PeerRoute {
            destination: "100.64.0.64/26".parse().unwrap(),
            via: "198.18.0.11".parse().unwrap(),
            peer: "198.18.0.11".into(),
        }]
    );
}

#[test]
fn a_record_without_a_pool_has_no_spec_yet() {
    let r = record("node-a", None, &[("100.64.0.64/26", "198.18.0.11")]);
    assert_eq!(spec_from_record(&r, &opts("node-a")), Ok(None));
    let mut r = record("node-a", None, &[]);
    r.status = None;
    assert_eq!(spec_from_record(&r, &opts("node-a")), Ok(None));
}

#[test]
fn malformed_records_are_errors_naming_the_field() {
    let o = opts("node-a");
    let e = spec_from_record(&record("n", Some("100.64.0.0/33"), &[]), &o).unwrap_err();
    assert!(matches!(e, RecordError::Block(_)), "{e}");
    let e = spec_from_record(
        &record("n", Some("100.64.0.0/26"), &[("100.64.0.64/26", "nope")]),
        &o,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("via") && e.to_string().contains("nope"),
        "{e}"
    );
    let e = spec_from_record(
        &record("n", Some("100.64.0.0/26"), &[("x", "198.18.0.11")]),
        &o,
    )
    .unwrap_err();
    assert!(e.to_string().contains("destination"), "{e}");
    let mut r = record("n", Some("100.64.0.0/26"), &[]);
    r.spec.node_ip = "198.18.0.300".into();
    assert_eq!(
        spec_from_record(&r, &o),
        Err(RecordError::NodeIp("198.18.0.300".into()))
    );
    // A block outside the pod CIDR fails the spec's own validation.
    let e = spec_from_record(&record("n", Some("10.0.0.0/26"), &[]), &o).unwrap_err();
    assert!(matches!(e, RecordError::Spec(_)), "{e}");
}

#[cfg(feature = "root-tests")]
mod root {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, SocketAddr};
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use underlay_agent::config::PoolConfig;
    use underlay_agent::routed::kube::run_routed_on_kube;
    use underlay_agent::{AgentConfig, AgentError, Fault};
    use underlay_api::{PeerRoute, Pool, UnderlayNode, conditions};
    use underlay_apisim::{ApiSim, Kind};
    use underlay_core::names;
    use underlay_dataplane::testns::TestNs;
    use underlay_dataplane::{Netns, VethSpec};
    use underlay_ipam_api::{AllocateRequest, AttachmentKey, Client};

    use super::{opts, record};

    const PREFIX: &str = "agk";
    const WAIT: Duration = Duration::from_secs(20);

    /// Polls `f` every 50 ms until it returns `Some`, for at most [`WAIT`].
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

    /// A node namespace whose uplink `up0` holds 198.18.0.10/24 (its veth peer in a second namespace).
    fn node() -> (TestNs, TestNs) {
        let node = TestNs::new(PREFIX).unwrap();
        let wire = TestNs::new(PREFIX).unwrap();
        let mut nl = node.netns().netlink().unwrap();
        nl.veth_add(&VethSpec {
            name: "up0",
            peer_name: "wire0",
            peer_netns: Some(wire.netns()),
            mtu: None,
            mac: None,
            peer_mac: None,
            up: true,
        })
        .unwrap();
        let up = nl.link_by_name("up0").unwrap().unwrap();
        nl.addr_add(up.index, "198.18.0.10/24".parse().unwrap())
            .unwrap();
        let mut wl = wire.netns().netlink().unwrap();
        let w = wl.link_by_name("wire0").unwrap().unwrap();
        wl.link_set_up(w.index, true).unwrap();
        (node, wire)
    }

    fn config(dir: &Path) -> AgentConfig {
        AgentConfig {
            pool: PoolConfig::default(),
            socket: dir.join("run/agent.sock"),
            checkpoint: dir.join("state/ipam.json"),
            cni_conf_dir: dir.join("net.d"),
            cni_bin_dir: dir.join("bin"),
            // The IPAM side runs in the test process's namespace: its veths are not the agent's to sweep.
            reap_links: false,
            ..AgentConfig::default()
        }
    }

    /// The agent on its own runtime; stopped (bounded) on drop.
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
        let mut o = opts(name);
        o.netns = Some(netns);
        o.health_addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), names::AGENT_HEALTH_PORT);
        o.converge_interval = Duration::from_secs(2);
        o.status_interval = Duration::from_millis(100);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let sim = sim.clone();
        runtime.spawn(async move {
            let client = sim.client();
            let r = run_routed_on_kube(config, client, o, Fault::None, async {
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

    /// `GET path` on the health endpoint inside the node namespace: (status code, body).
    fn health(ns: &Netns, path: &'static str) -> Option<(u16, String)> {
        ns.run(move || {
            let r = (|| -> std::io::Result<String> {
                let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), names::AGENT_HEALTH_PORT);
                let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                write!(
                    s,
                    "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            })();
            Ok(r.ok())
        })
        .unwrap()
        .and_then(|text| {
            let code = text.split_whitespace().nth(1)?.parse().ok()?;
            let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
            Some((code, body))
        })
    }

    fn condition(sim: &ApiSim, name: &str, ty: &str) -> Option<(String, String)> {
        let n: UnderlayNode = sim.get(None, name)?;
        n.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == ty)
            .map(|c| (c.status, c.reason))
    }

    fn set_block(sim: &ApiSim, name: &str, block: ipnet::Ipv4Net) {
        assert!(sim.modify::<UnderlayNode>(None, name, |n| {
            n.status.as_mut().unwrap().pool = Some(Pool {
                block: Some(block.to_string()),
                ..Pool::default()
            });
        }));
    }

    fn pool_message(sim: &ApiSim, name: &str) -> Option<String> {
        let n: UnderlayNode = sim.get(None, name)?;
        n.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == conditions::POOL_READY && c.status == "True")
            .map(|c| c.message)
    }

    fn allocate(socket: &Path, id: &str) -> ipnet::Ipv4Net {
        let c = Client::connect(socket).unwrap();
        c.set_timeout(Duration::from_secs(5)).unwrap();
        c.allocate(&AllocateRequest {
            key: Some(AttachmentKey::new(id, "eth0")),
            netns: format!("/var/run/netns/{id}"),
            pod_namespace: "default".into(),
            pod_name: format!("pod-{id}"),
        })
        .unwrap()
        .address_v4()
        .unwrap()
    }

    fn has_route(ns: &Netns, dst: &str, via: &str) -> bool {
        ns.netlink()
            .unwrap()
            .routes(names::AGENT_ROUTE_TABLE)
            .unwrap()
            .iter()
            .any(|r| {
                r.dst.to_string() == dst && r.via.map(|v| v.to_string()).as_deref() == Some(via)
            })
    }

    #[test]
    fn the_agent_follows_its_record_from_no_pool_to_ready_and_serves_pods_while_the_api_is_gone() {
        let (node, _wire) = node();
        let dir = tempfile::tempdir().unwrap();
        let name = format!("{PREFIX}-{}-node-a", std::process::id());
        let sim = ApiSim::new();
        // Another node's record: the agent must watch only its own.
        sim.insert(&record(
            &format!("{name}-other"),
            Some("100.64.9.0/26"),
            &[],
        ));
        sim.insert(&record(&name, None, &[]));
        let config = config(dir.path());
        let config_again = config.clone();
        let socket = config.socket.clone();
        let conflist = config.cni_conf_dir.join(names::CNI_CONFLIST);
        let agent = start(&sim, config, node.path().into(), &name);

        // No pool: not ready, PoolReady=False in status, no IPAM socket, no CNI configuration.
        let pool = wait_for("PoolReady=False", || {
            condition(&sim, &name, conditions::POOL_READY).filter(|c| c.0 == "False")
        });
        assert_eq!(pool.1, "Pending");
        assert_eq!(
            condition(&sim, &name, conditions::READY).unwrap(),
            ("False".to_string(), "PoolNotReady".to_string())
        );
        let (code, body) = wait_for("the health endpoint", || health(node.netns(), "/readyz"));
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("no IPAM pool"), "{body}");
        assert!(!socket.exists());
        assert!(!conflist.exists());
        let other: UnderlayNode = sim.get(None, &format!("{name}-other")).unwrap();
        assert!(
            other.status.unwrap().conditions.is_empty(),
            "the agent wrote another node's status"
        );

        // The controller allocates the block and a peer route; the first status write conflicts once.
        sim.inject_conflict(Kind::UnderlayNode);
        sim.take_requests();
        assert!(sim.modify::<UnderlayNode>(None, &name, |n| {
            let s = n.status.get_or_insert_with(Default::default);
            s.pool = Some(Pool {
                block: Some("100.64.0.0/26".into()),
                ..Pool::default()
            });
            s.routes = vec![PeerRoute {
                destination: "100.64.0.64/26".into(),
                via: "198.18.0.11".into(),
            }];
        }));
        wait_for("the peer route in the kernel", || {
            has_route(node.netns(), "100.64.0.64/26", "198.18.0.11").then_some(())
        });
        wait_for("Ready=True", || {
            condition(&sim, &name, conditions::READY).filter(|c| c.0 == "True")
        });
        for ty in [
            conditions::POOL_READY,
            conditions::CNI_CONFIGURED,
            conditions::CONVERGED,
        ] {
            assert_eq!(condition(&sim, &name, ty).unwrap().0, "True", "{ty}");
        }
        let requests = sim.take_requests();
        assert!(
            requests
                .iter()
                .any(|r| r.method == "PATCH" && r.path.ends_with("/status") && r.status == 409),
            "no conflicted status write: {requests:?}"
        );
        assert!(conflist.is_file());
        let (code, body) = health(node.netns(), "/readyz").unwrap();
        assert_eq!(code, 200, "{body}");

        // While no pod holds an address, a new block is taken at once.
        let block: ipnet::Ipv4Net = "100.64.0.192/26".parse().unwrap();
        set_block(&sim, &name, block);
        wait_for("PoolReady on the new block", || {
            pool_message(&sim, &name).filter(|m| m.contains("100.64.0.192/26"))
        });
        let first = allocate(&socket, "agk-pod-1");
        assert!(block.contains(&first.addr()), "{first}");
        wait_for("poolUsed=1", || {
            let n: UnderlayNode = sim.get(None, &name)?;
            (n.status?.pool_used == 1).then_some(())
        });
        // The same endpoint serves the agent's metrics: converges ran and were timed, the ADD was counted.
        let (code, metrics) = health(node.netns(), "/metrics").unwrap();
        assert_eq!(code, 200, "{metrics}");
        let sample = |series: &str| {
            metrics.lines().find_map(|l| {
                let (n, v) = l.rsplit_once(' ')?;
                (n == series).then(|| v.parse::<f64>().ok())?
            })
        };
        let converges = sample(r#"underlay_agent_converges_total{result="ok"}"#).unwrap_or(0.0);
        assert!(converges >= 1.0, "{metrics}");
        assert!(
            sample("underlay_agent_converge_duration_seconds_count").unwrap_or(0.0) >= converges
        );
        assert!(sample("underlay_agent_converge_operations_total").unwrap_or(0.0) >= 1.0);
        assert_eq!(sample("underlay_agent_pool_used_addresses"), Some(1.0));
        // A /26 block: 64 addresses, less the few the pool reserves.
        assert!(
            sample("underlay_agent_pool_size_addresses")
                .is_some_and(|n| (60.0..=64.0).contains(&n)),
            "{metrics}"
        );
        assert_eq!(
            sample(r#"underlay_agent_ipam_requests_total{method="allocate",result="ok"}"#),
            Some(1.0)
        );
        // With a pod on it, a block change is reported and not applied.
        set_block(&sim, &name, "100.64.1.0/26".parse().unwrap());
        let changed = wait_for("PoolReady=False on a block change", || {
            condition(&sim, &name, conditions::POOL_READY).filter(|c| c.0 == "False")
        });
        assert_eq!(changed.1, "BlockChanged");
        assert_eq!(
            condition(&sim, &name, conditions::READY).unwrap().0,
            "False"
        );
        let c = Client::connect(&socket).unwrap();
        assert_eq!(c.list().unwrap().len(), 1);
        set_block(&sim, &name, block);
        wait_for("Ready=True on the served block again", || {
            condition(&sim, &name, conditions::READY).filter(|c| c.0 == "True")
        });
        let written: UnderlayNode = sim.get(None, &name).unwrap();
        assert_eq!(
            written.status.as_ref().unwrap().observed_generation,
            written.metadata.generation
        );

        // The API goes away: pods are still served from the pool (and its checkpoint), the node stays
        // converged, and the agent keeps running.
        sim.set_unreachable(true);
        let second = allocate(&socket, "agk-pod-2");
        assert!(
            block.contains(&second.addr()) && second != first,
            "{second}"
        );
        assert!(has_route(node.netns(), "100.64.0.64/26", "198.18.0.11"));
        assert_eq!(health(node.netns(), "/readyz").unwrap().0, 200);

        // Back again: the status catches up.
        sim.set_unreachable(false);
        wait_for("poolUsed=2 after the API returns", || {
            let n: UnderlayNode = sim.get(None, &name)?;
            (n.status?.pool_used == 2).then_some(())
        });
        agent.stop().unwrap();

        // A restart while the API is unreachable resumes from the cached record: the same block, the
        // checkpoint's allocations kept, new pods served.
        sim.set_unreachable(true);
        let agent = start(&sim, config_again, node.path().into(), &name);
        let third = wait_for("the restarted agent's IPAM socket", || {
            Client::connect(&socket).ok()?;
            Some(allocate(&socket, "agk-pod-3"))
        });
        assert!(
            block.contains(&third.addr()) && third != first && third != second,
            "{third}"
        );
        let c = Client::connect(&socket).unwrap();
        assert_eq!(c.list().unwrap().len(), 3);
        sim.set_unreachable(false);
        wait_for("poolUsed=3 after the restart", || {
            let n: UnderlayNode = sim.get(None, &name)?;
            (n.status?.pool_used == 3).then_some(())
        });
        agent.stop().unwrap();
        assert!(sim.take_unexpected().is_empty());
    }
}
