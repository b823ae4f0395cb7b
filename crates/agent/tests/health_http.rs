//! The health endpoint over real TCP on 127.0.0.1 (an ephemeral port): status codes follow the agent's
//! state, garbage and oversized requests get 400, and `/healthz` checks that the IPAM socket answers.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use underlay_agent::health_http::{HealthServer, MAX_REQUEST_HEAD, Ready};

async fn send(addr: std::net::SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("server answers")
        .unwrap();
    out
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let out = send(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    let code = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap().trim_end().to_string();
    (code, body)
}

#[tokio::test]
async fn status_follows_state_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ipam.sock");
    let ready = Ready::default();
    let server = HealthServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        ready.clone(),
        Some(sock.clone()),
    )
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    let task = tokio::spawn(server.serve());

    assert_eq!(
        get(addr, "/healthz").await,
        (503, "IPAM socket not serving".into())
    );
    assert_eq!(get(addr, "/readyz").await, (503, "no IPAM pool".into()));

    // The agent says the socket serves, but nothing listens there: /healthz finds out.
    ready.update(|s| {
        s.ipam_serving = true;
        s.pool_present = true;
        s.conflist_written = true;
    });
    ready.converge_result::<(), &str>(&Ok(()));
    assert_eq!(
        get(addr, "/healthz").await,
        (503, "IPAM socket not serving".into())
    );
    let _listener = tokio::net::UnixListener::bind(&sock).unwrap();
    assert_eq!(get(addr, "/healthz").await, (200, "ok".into()));
    assert_eq!(get(addr, "/readyz").await, (200, "ok".into()));

    ready.converge_result::<(), _>(&Err("route replace: ENETUNREACH"));
    assert_eq!(
        get(addr, "/healthz").await,
        (
            503,
            "last converge failed: route replace: ENETUNREACH".into()
        )
    );
    assert_eq!(get(addr, "/readyz").await.0, 503);

    assert_eq!(get(addr, "/nope").await.0, 404);
    assert!(
        send(addr, b"DELETE /healthz HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 405")
    );
    assert!(
        send(addr, b"\x00\x01garbage\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 400")
    );
    let huge = vec![b'a'; MAX_REQUEST_HEAD * 2];
    assert!(send(addr, &huge).await.starts_with("HTTP/1.1 400"));
    // A client that closes before finishing its head gets nothing, and the server keeps serving.
    drop(TcpStream::connect(addr).await.unwrap());
    assert_eq!(get(addr, "/nope").await.0, 404);
    task.abort();
}

/// The forwarder probe's UDP echo: a request is answered with the agent's health (no IPAM connect), anything
/// else is not answered.
#[tokio::test]
async fn probe_echo_answers_with_the_agent_health() {
    use underlay_core::health::wire;
    let ready = Ready::default();
    let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let server = HealthServer::bind("127.0.0.1:0".parse().unwrap(), ready.clone(), None)
        .await
        .unwrap()
        .with_probe_echo(echo)
        .unwrap();
    let addr = server.echo_addr().unwrap();
    let http = server.local_addr().unwrap();
    let task = tokio::spawn(server.serve());
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Datagrams can be lost even on loopback: retry a few times, and never take a wrong answer.
    let ask = |seq: u64| {
        let client = &client;
        async move {
            for _ in 0..5 {
                client.send_to(&wire::request(seq), addr).await.unwrap();
                let mut buf = [0u8; 64];
                if let Ok(Ok((n, from))) =
                    tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf)).await
                {
                    assert_eq!(from, addr);
                    let (got, healthy) = wire::parse_reply(&buf[..n]).expect("a probe reply");
                    if got == seq {
                        return healthy;
                    }
                }
            }
            panic!("no answer to probe {seq}");
        }
    };
    assert!(!ask(1).await, "not serving IPAM yet: not healthy");
    ready.update(|s| s.ipam_serving = true);
    ready.converge_result::<(), &str>(&Err("nft failed"));
    assert!(!ask(2).await, "last converge failed: not healthy");
    ready.converge_result::<(), &str>(&Ok(()));
    assert!(ask(3).await);
    // Junk gets no answer; the echo keeps serving after it.
    client.send_to(b"GET / HTTP/1.1\r\n", addr).await.unwrap();
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(200), client.recv_from(&mut buf))
            .await
            .is_err(),
        "junk was answered"
    );
    assert!(ask(4).await);
    // HTTP still serves beside it.
    assert_eq!(get(http, "/healthz").await.0, 200);
    task.abort();
}
