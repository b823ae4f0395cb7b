//! The agent's health endpoint: a minimal HTTP/1.1 server (one request per connection) on
//! `0.0.0.0:9650` by default, the port the controller probes.
//!
//! ```text
//!   GET /healthz  200 "ok"  when the IPAM socket answers and the last converge succeeded; else 503 "<reason>"
//!   GET /readyz   200 "ok"  when the pool is present, the CNI configuration is written and the node converged
//!   GET /metrics  200 Prometheus metrics (OpenMetrics text) when the server has an AgentMetrics, else 404
//!   other paths 404, other methods 405, malformed or oversized requests 400, slow clients are dropped
//!
//!   UDP (same port, when given a socket): the controller's forwarder probe (`underlay_core::health::wire`),
//!   answered "healthy" when `/healthz` would say 200 from the agent's state (without the IPAM socket connect, so
//!   an answer costs a mutex and a send: the controller probes forwarders 20 times a second)
//! ```
//!
//! [`ReadyState`] is the agent's own view of itself; the Kubernetes status writer (the taint the controller
//! lifts) reads the same struct. Hand-rolled on purpose: three fixed paths do not justify an HTTP stack.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::AgentError;
use crate::metrics::AgentMetrics;

/// Longest request head accepted (request line and headers).
pub const MAX_REQUEST_HEAD: usize = 4096;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Time the IPAM socket has to accept a connection when `/healthz` checks it.
pub const IPAM_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Connections served at once; more wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 64;
/// Content type of `/metrics` (`prometheus-client` writes OpenMetrics text, which Prometheus reads).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// What the agent reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReadyState {
    /// The IPAM service has a pool (the node's block in routed mode).
    pub pool_present: bool,
    /// The CNI configuration list is on disk.
    pub conflist_written: bool,
    /// The IPAM socket is bound and served.
    pub ipam_serving: bool,
    /// The last converge of the node's kernel succeeded.
    pub converged: bool,
    /// The last error, cleared by the next success of the same step.
    pub last_error: Option<String>,
}

impl ReadyState {
    /// `Ok` when alive and working; the reason otherwise.
    pub fn health(&self) -> Result<(), String> {
        if !self.ipam_serving {
            return Err("IPAM socket not serving".into());
        }
        if !self.converged {
            return Err(match &self.last_error {
                Some(e) => format!("last converge failed: {e}"),
                None => "not converged yet".into(),
            });
        }
        Ok(())
    }

    /// `Ok` when pods may be scheduled here.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.pool_present {
            return Err("no IPAM pool".into());
        }
        if !self.conflist_written {
            return Err("CNI configuration not written".into());
        }
        if !self.converged {
            return Err(match &self.last_error {
                Some(e) => format!("not converged: {e}"),
                None => "not converged yet".into(),
            });
        }
        Ok(())
    }
}

/// Answers every probe request on `socket` with the agent's health, until the future is dropped.
async fn serve_echo(socket: tokio::net::UdpSocket, ready: Ready) {
    let mut buf = [0u8; 64];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // An ICMP error for an earlier reply surfaces here; anything else is worth a pause.
                tracing::debug!(error = %e, "probe echo: receive failed");
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let healthy = ready.snapshot().health().is_ok();
        if let Some(reply) = underlay_core::health::wire::reply(&buf[..n], healthy) {
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

/// The shared, updatable [`ReadyState`].
#[derive(Debug, Clone, Default)]
pub struct Ready(Arc<Mutex<ReadyState>>);

impl Ready {
    pub fn snapshot(&self) -> ReadyState {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut ReadyState)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Records a converge outcome.
    pub fn converge_result<T, E: std::fmt::Display>(&self, r: &Result<T, E>) {
        self.update(|s| match r {
            Ok(_) => {
                s.converged = true;
                s.last_error = None;
            }
            Err(e) => {
                s.converged = false;
                s.last_error = Some(e.to_string());
            }
        });
    }
}

/// The health listener.
#[derive(Debug)]
pub struct HealthServer {
    listener: TcpListener,
    ready: Ready,
    /// When set, `/healthz` also connects to this socket (so a wedged IPAM server shows).
    ipam_socket: Option<PathBuf>,
    /// When set, served on `/metrics`.
    metrics: Option<AgentMetrics>,
    /// When set, the forwarder probe's echo.
    echo: Option<tokio::net::UdpSocket>,
}

impl HealthServer {
    pub async fn bind(
        addr: SocketAddr,
        ready: Ready,
        ipam_socket: Option<PathBuf>,
    ) -> Result<Self, AgentError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Io {
                what: "bind health endpoint",
                path: PathBuf::from(addr.to_string()),
                source,
            })?;
        Ok(HealthServer {
            listener,
            ready,
            ipam_socket,
            metrics: None,
            echo: None,
        })
    }

    /// Serves `metrics` on `/metrics` too.
    pub fn with_metrics(mut self, metrics: AgentMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Wraps a listener created elsewhere (e.g. inside another network namespace); it must be non-blocking.
    pub fn from_std(
        listener: std::net::TcpListener,
        ready: Ready,
        ipam_socket: Option<PathBuf>,
    ) -> Result<Self, AgentError> {
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let listener = TcpListener::from_std(listener).map_err(|source| AgentError::Io {
            what: "register health endpoint",
            path: PathBuf::from(addr),
            source,
        })?;
        Ok(HealthServer {
            listener,
            ready,
            ipam_socket,
            metrics: None,
            echo: None,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Answers the controller's forwarder probe on `socket` too (a UDP socket created elsewhere, e.g. inside
    /// the node's namespace; made non-blocking here).
    pub fn with_probe_echo(mut self, socket: std::net::UdpSocket) -> Result<Self, AgentError> {
        let addr = socket
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let io = |source| AgentError::Io {
            what: "register the probe echo",
            path: PathBuf::from(addr.clone()),
            source,
        };
        socket.set_nonblocking(true).map_err(io)?;
        self.echo = Some(tokio::net::UdpSocket::from_std(socket).map_err(io)?);
        Ok(self)
    }

    /// The probe echo's address, when there is one.
    pub fn echo_addr(&self) -> Option<SocketAddr> {
        self.echo.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// Serves until the future is dropped.
    pub async fn serve(mut self) {
        match self.echo.take() {
            Some(echo) => {
                let ready = self.ready.clone();
                tokio::join!(self.serve_http(), serve_echo(echo, ready));
            }
            None => self.serve_http().await,
        }
    }

    async fn serve_http(self) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let ctx = Arc::new((self.ready, self.ipam_socket, self.metrics));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, _) = match self.listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "health endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _ = handle(stream, &ctx.0, ctx.1.as_deref(), ctx.2.as_ref()).await;
            });
        }
    }
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a> {
    Get(&'a str),
    OtherMethod,
    Malformed,
}

/// Parses the request line of a complete request head (`METHOD SP PATH SP HTTP/1.x`).
pub fn parse_request(head: &[u8]) -> Request<'_> {
    let Ok(text) = std::str::from_utf8(head) else {
        return Request::Malformed;
    };
    let line = text.split("\r\n").next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Malformed;
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Request::Malformed;
    }
    if method != "GET" {
        return if method.bytes().all(|b| b.is_ascii_uppercase()) && !method.is_empty() {
            Request::OtherMethod
        } else {
            Request::Malformed
        };
    }
    // Ignore a query string.
    Request::Get(target.split('?').next().unwrap_or(target))
}

/// Decides the response for a request against the current state.
pub fn respond(req: &Request<'_>, state: &ReadyState) -> (u16, String) {
    let verdict = match req {
        Request::Malformed => return (400, "bad request".into()),
        Request::OtherMethod => return (405, "method not allowed".into()),
        Request::Get("/healthz") => state.health(),
        Request::Get("/readyz") => state.readiness(),
        Request::Get(_) => return (404, "not found".into()),
    };
    match verdict {
        Ok(()) => (200, "ok".into()),
        Err(reason) => (503, reason),
    }
}

async fn handle(
    mut stream: TcpStream,
    ready: &Ready,
    ipam_socket: Option<&std::path::Path>,
    metrics: Option<&AgentMetrics>,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => {
            return write_response(
                &mut stream,
                400,
                TEXT_CONTENT_TYPE,
                "request head too large or truncated\n",
            )
            .await;
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()), // too slow: drop
    };
    let req = parse_request(&head);
    if req == Request::Get("/metrics")
        && let Some(m) = metrics
    {
        return write_response(&mut stream, 200, METRICS_CONTENT_TYPE, &m.encode()).await;
    }
    let mut state = ready.snapshot();
    if req == Request::Get("/healthz")
        && state.ipam_serving
        && let Some(path) = ipam_socket
    {
        state.ipam_serving = matches!(
            tokio::time::timeout(IPAM_CONNECT_TIMEOUT, tokio::net::UnixStream::connect(path)).await,
            Ok(Ok(_))
        );
    }
    let (code, body) = respond(&req, &state);
    write_response(&mut stream, code, TEXT_CONTENT_TYPE, &format!("{body}\n")).await
}

/// Reads until the blank line ending the head; `None` if it does not come within [`MAX_REQUEST_HEAD`] bytes.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Some(buf));
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return Ok(None);
        }
    }
}

async fn write_response(
    stream: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let msg = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\nCache-Control: no-store\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(msg.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_lines() {
        assert_eq!(
            parse_request(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Get("/healthz")
        );
        assert_eq!(
            parse_request(b"GET /readyz?verbose=1 HTTP/1.0\r\n\r\n"),
            Request::Get("/readyz")
        );
        assert_eq!(
            parse_request(b"POST /healthz HTTP/1.1\r\n\r\n"),
            Request::OtherMethod
        );
        assert_eq!(
            parse_request(b"HEAD /healthz HTTP/1.1\r\n\r\n"),
            Request::OtherMethod
        );
        assert_eq!(parse_request(b"GET /healthz\r\n\r\n"), Request::Malformed);
        assert_eq!(
            parse_request(b"\xff\xfe garbage\r\n\r\n"),
            Request::Malformed
        );
        assert_eq!(
            parse_request(b"GET healthz HTTP/1.1\r\n\r\n"),
            Request::Malformed
        );
        assert_eq!(parse_request(b"get /x SPDY/3\r\n\r\n"), Request::Malformed);
    }

    #[test]
    fn health_and_readiness_need_their_own_conditions() {
        let mut s = ReadyState::default();
        assert_eq!(respond(&Request::Get("/healthz"), &s).0, 503);
        s.ipam_serving = true;
        assert_eq!(
            respond(&Request::Get("/healthz"), &s),
            (503, "not converged yet".into())
        );
        s.converged = true;
        assert_eq!(respond(&Request::Get("/healthz"), &s).0, 200);
        assert_eq!(
            respond(&Request::Get("/readyz"), &s),
            (503, "no IPAM pool".into())
        );
        s.pool_present = true;
        s.conflist_written = true;
        assert_eq!(respond(&Request::Get("/readyz"), &s).0, 200);
        assert_eq!(respond(&Request::Get("/metrics"), &s).0, 404);
    }

    #[test]
    fn a_failed_converge_turns_health_red_with_its_reason() {
        let ready = Ready::default();
        ready.update(|s| s.ipam_serving = true);
        ready.converge_result::<(), _>(&Err("nft: permission denied"));
        let (code, body) = respond(&Request::Get("/healthz"), &ready.snapshot());
        assert_eq!(code, 503);
        assert_eq!(body, "last converge failed: nft: permission denied");
        ready.converge_result::<(), &str>(&Ok(()));
        assert_eq!(respond(&Request::Get("/healthz"), &ready.snapshot()).0, 200);
    }
}
