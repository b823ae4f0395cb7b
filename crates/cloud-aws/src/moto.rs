//! Test harness: a moto server (a third-party EC2 emulator from PyPI, installed by `scripts/setup.sh` into the
//! workspace's `.venv`) on a free 127.0.0.1 port, killed when the guard drops, panics included.
//!
//! Only built with the `test-harness` feature; used by this crate's tests and by the CLI's end-to-end tests.
//!
//! moto 5.2 differs from EC2 in ways tests must know: it enforces no rate or route limits, prefix assignment
//! succeeds but assigns nothing, AssignPrivateIpAddresses lists every address of the ENI, unimplemented filters
//! (`route.instance-id`, `attachment.status`) answer HTTP 500, exhausting a subnet hangs the server, and a route
//! to a terminated instance stays `active`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{AwsOptions, Ec2Cloud};

/// Region every moto-backed test uses.
pub const REGION: &str = "us-east-1";
/// Any AMI id: moto does not validate them unless told to.
pub const AMI: &str = "ami-03cf127a";

/// A running moto server; dropping it kills the process.
#[derive(Debug)]
pub struct MotoServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

/// Where `scripts/setup.sh` puts moto: `<workspace>/.venv/bin/moto_server`.
pub fn moto_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/moto_server")
}

impl MotoServer {
    /// Start moto on a free port and wait (bounded) until it answers. Fails, with what to do, when the venv
    /// is missing.
    pub fn start() -> Result<Self, String> {
        let binary = moto_binary();
        if !binary.exists() {
            return Err(format!(
                "moto server not found at {}: run scripts/setup.sh (it builds the .venv with moto[server])",
                binary.display()
            ));
        }
        // Several attempts: another process may take the port between our probe and moto's bind.
        let mut last = String::new();
        for _ in 0..3 {
            match Self::start_once(&binary) {
                Ok(server) => return Ok(server),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn start_once(binary: &PathBuf) -> Result<Self, String> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let log =
            std::env::temp_dir().join(format!("underlay-moto-{}-{port}.log", std::process::id()));
        let stderr = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", binary.display()))?;
        let mut server = Self { child, port, log };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        // Up to 60 s (600 × 100 ms) for the Python server to import and bind.
        for _ in 0..600 {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "moto server exited with {status} before answering: {}",
                    server.log_tail()
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "moto server did not answer on {addr} within 60 s: {}",
            server.log_tail()
        ))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Adapter options for this server: endpoint override, fixed region and static test credentials.
    pub fn options(&self) -> AwsOptions {
        AwsOptions {
            region: Some(REGION.to_owned()),
            endpoint: Some(self.endpoint()),
            static_credentials: Some(("testing".to_owned(), "testing".to_owned())),
            attempt_timeout: Duration::from_secs(20),
            ..AwsOptions::default()
        }
    }

    /// An adapter talking to this server.
    pub async fn cloud(&self) -> Ec2Cloud {
        Ec2Cloud::new(&self.options())
            .await
            .expect("options carry a region")
    }

    /// `POST /moto-api/reset`: forget every resource (between cases).
    pub fn reset(&self) -> Result<(), String> {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        write!(
            stream,
            "POST /moto-api/reset HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .map_err(|e| format!("write: {e}"))?;
        let mut reply = String::new();
        stream
            .read_to_string(&mut reply)
            .map_err(|e| format!("read: {e}"))?;
        if reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200") {
            Ok(())
        } else {
            Err(format!(
                "reset answered {:?}",
                reply.lines().next().unwrap_or("")
            ))
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}
