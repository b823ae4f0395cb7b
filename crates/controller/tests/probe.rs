//! The HTTP health probe and the probing task against a real TCP listener on 127.0.0.1 (real time, short
//! intervals, bounded waits; only outcomes are asserted, never durations).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use underlay_controller::probe::probe_http;
use underlay_controller::{HealthProber, HttpProber, ProbeTarget, Prober};
use underlay_core::health::{HealthConfig, HealthState, HealthTracker, Probe};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Status(u16),
    /// Accept and never answer.
    Silent,
}

/// A tiny HTTP server; dropping the returned handle (abort) closes the listener.
async fn serve(mode: Mode) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            match mode {
                Mode::Status(code) => {
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf).await;
                        let body = format!(
                            "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                        let _ = s.write_all(body.as_bytes()).await;
                    });
                }
                Mode::Silent => held.push(s),
            }
        }
    });
    (addr, task)
}

const TIMEOUT: Duration = Duration::from_millis(300);

#[tokio::test]
async fn probe_outcomes() {
    let (ok, t1) = serve(Mode::Status(200)).await;
    let (err, t2) = serve(Mode::Status(503)).await;
    let (silent, t3) = serve(Mode::Silent).await;
    // Success may need a retry on a loaded machine; a miss must never turn into a success.
    let mut successes = 0;
    for _ in 0..5 {
        if probe_http(ok, "/healthz", Duration::from_secs(2)).await == Probe::Success {
            successes += 1;
        }
    }
    assert!(successes >= 1, "a 200 endpoint never probed healthy");
    assert_eq!(probe_http(err, "/healthz", TIMEOUT).await, Probe::Miss);
    assert_eq!(probe_http(silent, "/healthz", TIMEOUT).await, Probe::Miss);
    t1.abort();
    let _ = t1.await;
    assert_eq!(
        probe_http(ok, "/healthz", TIMEOUT).await,
        Probe::Miss,
        "closed port"
    );
    t2.abort();
    t3.abort();
}

async fn fails_after_n_rounds(stop_by: Mode) {
    let (addr, server) = serve(Mode::Status(200)).await;
    let misses = 3;
    let tracker = Arc::new(Mutex::new(HealthTracker::new(HealthConfig {
        misses_to_fail: misses,
        hold_down: Duration::from_secs(30),
        ..HealthConfig::default()
    })));
    tracker.lock().unwrap().insert_pending("n");
    let prober: Arc<dyn Prober> = Arc::new(HttpProber {
        path: "/healthz".into(),
        timeout: Duration::from_millis(150),
    });
    let hp = HealthProber::new(Duration::from_millis(200), prober, tracker.clone());
    let rounds = hp.rounds();
    let (_targets_tx, targets_rx) = watch::channel(vec![ProbeTarget {
        node: "n".into(),
        addr,
    }]);
    let (tx, mut rx) = mpsc::channel(16);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(hp.run(targets_rx, tx, shutdown_rx));

    let up = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("node never came up")
        .unwrap();
    assert_eq!(
        (up.from, up.to),
        (HealthState::Pending, HealthState::Healthy)
    );

    // Stop answering: close the port, or swap in a server that accepts and never answers on the same port.
    let before = rounds.load(Ordering::SeqCst);
    server.abort();
    let _ = server.await;
    let _silent = if stop_by == Mode::Silent {
        let l = TcpListener::bind(addr).await.unwrap();
        Some(tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        }))
    } else {
        None
    };
    let down = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("node never failed")
        .unwrap();
    let after = rounds.load(Ordering::SeqCst);
    assert!(down.is_failure(), "{down:?}");
    assert!(
        after - before >= u64::from(misses),
        "failed after {} rounds, fewer than {misses} misses",
        after - before
    );
    assert_eq!(
        tracker.lock().unwrap().state("n"),
        Some(HealthState::Failed)
    );
    shutdown_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("prober did not stop")
        .unwrap();
}

#[tokio::test]
async fn prober_fails_a_node_whose_port_closes_after_n_rounds() {
    fails_after_n_rounds(Mode::Status(0)).await;
}

#[tokio::test]
async fn prober_fails_a_node_that_stops_answering_after_n_rounds() {
    fails_after_n_rounds(Mode::Silent).await;
}

/// A UDP responder: answers probe requests with `healthy`, or stays silent, or answers junk / an old round.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Echo {
    Healthy,
    Unhealthy,
    Silent,
    Junk,
    OldRound,
}

async fn echo(mode: Echo) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use underlay_core::health::wire;
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let reply = match mode {
                Echo::Healthy => wire::reply(&buf[..n], true),
                Echo::Unhealthy => wire::reply(&buf[..n], false),
                Echo::Silent => None,
                Echo::Junk => Some(*b"HTTP/1.1 200\r"),
                Echo::OldRound => {
                    let seq = u64::from_be_bytes(buf[4..12].try_into().unwrap());
                    wire::reply(&wire::request(seq.wrapping_sub(1)), true)
                }
            };
            if let Some(r) = reply {
                let _ = s.send_to(&r, from).await;
            }
        }
    });
    (addr, task)
}

#[tokio::test]
async fn udp_prober_round_outcomes() {
    use underlay_controller::UdpProber;
    let mut servers = Vec::new();
    let mut targets = Vec::new();
    for (i, mode) in [
        Echo::Healthy,
        Echo::Unhealthy,
        Echo::Silent,
        Echo::Junk,
        Echo::OldRound,
    ]
    .into_iter()
    .enumerate()
    {
        let (addr, task) = echo(mode).await;
        servers.push(task);
        targets.push(ProbeTarget {
            node: format!("n{i}"),
            addr,
        });
    }
    // A closed port: nothing listens (an ICMP port unreachable comes back on the same socket).
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    targets.push(ProbeTarget {
        node: "closed".into(),
        addr: closed.local_addr().unwrap(),
    });
    drop(closed);
    let prober = UdpProber::new(Duration::from_millis(300));
    // Loopback may drop a datagram on a loaded machine: the healthy target must answer in some round; the others
    // must miss in every round, whatever is lost.
    let mut healthy_seen = false;
    for _ in 0..5 {
        let round = prober.probe_round(&targets).await;
        assert_eq!(round.len(), targets.len());
        healthy_seen |= round[0] == Probe::Success;
        assert!(
            round[1..].iter().all(|p| *p == Probe::Miss),
            "only the healthy echo may count: {round:?}"
        );
    }
    assert!(healthy_seen, "the healthy echo never answered");
    // One target through `probe`.
    let mut one = false;
    for _ in 0..5 {
        one |= prober.probe(&targets[0]).await == Probe::Success;
    }
    assert!(one);
    for s in servers {
        s.abort();
    }
}
