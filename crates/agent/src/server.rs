//! The IPAM socket server: length-prefixed prost frames (see `underlay_ipam_api::wire`) over a unix socket.
//!
//! The socket is bound under a temporary name, chmod 0600, then renamed into place, so no one can connect
//! before the mode is right and a stale socket file from a crashed agent is replaced atomically. A socket
//! file that still answers belongs to a running agent: starting a second one is refused.
//!
//! Every connection is checked and bounded ([`Limits`]): the peer's credentials (SO_PEERCRED) must be root's,
//! the container runtime's (the mode already keeps others out; this holds if the file's mode or directory is
//! ever loosened); at most [`Limits::max_connections`] are served at once (more wait in the listen backlog); a
//! request may announce at most [`wire::MAX_REQUEST_LEN`] bytes; a connection idle for
//! [`Limits::idle`] between requests, or that stalls mid-frame as long, is closed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use underlay_ipam_api::{pb, wire};

use crate::AgentError;
use crate::service::IpamService;

/// Mode of the IPAM socket: only root (the container runtime that runs the plugin) may connect.
pub const SOCKET_MODE: u32 = 0o600;

/// Bounds on the socket's clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Largest request body.
    pub max_request_len: u32,
    /// Longest wait for the next request, or for the rest of a frame.
    pub idle: std::time::Duration,
    /// The only peer uid served.
    pub peer_uid: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            // Each underlay-cni call holds one connection for well under a millisecond; kubelet starts a few
            // pods at a time per node.
            max_connections: 64,
            max_request_len: wire::MAX_REQUEST_LEN,
            // Under the plugin's own 10 s timeout: a live plugin never waits that long between frames.
            idle: std::time::Duration::from_secs(30),
            peer_uid: 0,
        }
    }
}

/// True when a peer with credentials `uid` (None: unknown) may use the socket.
pub fn peer_allowed(uid: Option<u32>, limits: &Limits) -> bool {
    uid == Some(limits.peer_uid)
}

/// A bound IPAM socket; removing the socket file on drop.
#[derive(Debug)]
pub struct IpamListener {
    listener: UnixListener,
    path: PathBuf,
    limits: Limits,
}

impl Drop for IpamListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl IpamListener {
    /// Binds `path` with mode 0600 (must be called inside a tokio runtime).
    pub fn bind(path: &Path) -> Result<IpamListener, AgentError> {
        let io = |what: &'static str| {
            let path = path.to_owned();
            move |source| AgentError::Io { what, path, source }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io("create the socket directory"))?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(AgentError::AlreadyRunning(path.to_owned()));
            }
            tracing::info!(socket = %path.display(), "replacing a stale socket file");
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let std_listener =
            std::os::unix::net::UnixListener::bind(&tmp).map_err(io("bind the IPAM socket"))?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(SOCKET_MODE))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("place the IPAM socket")(e));
        }
        std_listener
            .set_nonblocking(true)
            .map_err(io("configure the IPAM socket"))?;
        let listener =
            UnixListener::from_std(std_listener).map_err(io("register the IPAM socket"))?;
        Ok(IpamListener {
            listener,
            path: path.to_owned(),
            limits: Limits::default(),
        })
    }

    /// Serves with `limits` instead of the defaults.
    pub fn with_limits(mut self, limits: Limits) -> IpamListener {
        self.limits = limits;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections forever, one task per connection, at most [`Limits::max_connections`] at once.
    pub async fn serve(&self, service: Arc<IpamService>) {
        let limits = self.limits;
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
        loop {
            // Wait for a free slot before accepting: extra clients wait in the kernel's backlog.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let uid = stream.peer_cred().ok().map(|c| c.uid());
                    if !peer_allowed(uid, &limits) {
                        tracing::warn!(peer_uid = ?uid, "IPAM socket: refusing a peer that is not root");
                        continue;
                    }
                    let service = service.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_connection(stream, service, limits).await {
                            tracing::debug!(error = %e, "IPAM connection ended with an error");
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept on the IPAM socket failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn serve_connection(
    mut stream: UnixStream,
    service: Arc<IpamService>,
    limits: Limits,
) -> std::io::Result<()> {
    let idle = |e: tokio::time::error::Elapsed| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("idle connection: {e}"),
        )
    };
    loop {
        let mut header = [0u8; wire::HEADER_LEN];
        match tokio::time::timeout(limits.idle, stream.read_exact(&mut header))
            .await
            .map_err(idle)?
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut body = vec![0u8; wire::body_len_at_most(header, limits.max_request_len)?];
        tokio::time::timeout(limits.idle, stream.read_exact(&mut body))
            .await
            .map_err(idle)??;
        let req = <pb::Request as prost::Message>::decode(body.as_slice())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        // The handler takes a lock and fsyncs. On a multi-thread runtime it runs in place (block_in_place
        // hands this worker's other tasks to another worker): no hop to a blocking-pool thread, which costs a
        // wake-up on a busy node on every ADD and DEL. A current-thread runtime cannot do that.
        let reply = if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(|| service.handle(req))
        } else {
            let service = service.clone();
            tokio::task::spawn_blocking(move || service.handle(req))
                .await
                .map_err(std::io::Error::other)?
        };
        stream.write_all(&wire::encode_frame(&reply)).await?;
    }
}
