//! The IPAM socket's checks and bounds: a peer that is not the allowed uid is refused, an oversized request and
//! an idle connection are closed, and no more than the connection limit are served at once. No root needed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use underlay_agent::checkpoint::Checkpoint;
use underlay_agent::server::{IpamListener, Limits};
use underlay_agent::{Fault, IpamService};
use underlay_core::ipam::PoolSpec;
use underlay_ipam_api::{Client, ClientError};

/// Serves a fresh service on `<dir>/agent.sock` with `limits` until the runtime is dropped.
fn serve(dir: &Path, limits: Limits) -> tokio::runtime::Runtime {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let service = Arc::new(
        IpamService::open(
            PoolSpec::Block("100.64.1.0/28".parse().unwrap()),
            Duration::from_secs(1),
            Checkpoint::new(dir.join("ipam.json")),
            1500,
            Fault::None,
        )
        .unwrap(),
    );
    let sock = dir.join("agent.sock");
    let listener = rt.block_on(async { IpamListener::bind(&sock).unwrap().with_limits(limits) });
    rt.spawn(async move { listener.serve(service).await });
    rt
}

/// The uid this test runs as (owner of its /proc entry).
fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

fn list(dir: &Path, timeout: Duration) -> Result<usize, ClientError> {
    let c = Client::connect(&dir.join("agent.sock"))?;
    c.set_timeout(timeout)?;
    c.list().map(|l| l.len())
}

/// True when the agent closes `s` (end of stream) within 5 s.
fn closed_by_agent(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(0))
}

#[test]
fn only_the_allowed_uid_is_served() {
    let dir = tempfile::tempdir().unwrap();
    // This test runs as some uid; allowing another one makes it the refused peer.
    let me = my_uid();
    let other = me.wrapping_add(4242);
    let _rt = serve(
        dir.path(),
        Limits {
            peer_uid: other,
            ..Limits::default()
        },
    );
    let err = list(dir.path(), Duration::from_secs(5)).unwrap_err();
    assert!(matches!(err, ClientError::Transport(_)), "{err}");

    let dir2 = tempfile::tempdir().unwrap();
    let _rt2 = serve(
        dir2.path(),
        Limits {
            peer_uid: me,
            ..Limits::default()
        },
    );
    assert_eq!(list(dir2.path(), Duration::from_secs(5)).unwrap(), 0);
    assert!(Limits::default().peer_uid == 0, "root only by default");
}

#[test]
fn oversized_requests_and_idle_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let me = my_uid();
    let _rt = serve(
        dir.path(),
        Limits {
            peer_uid: me,
            idle: Duration::from_millis(300),
            ..Limits::default()
        },
    );
    let sock = dir.path().join("agent.sock");
    // A header announcing one byte over the request limit: closed without reading the body.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&(underlay_ipam_api::wire::MAX_REQUEST_LEN + 1).to_be_bytes())
        .unwrap();
    assert!(closed_by_agent(&mut s), "oversized request kept open");
    // Silent after connecting.
    let mut s = UnixStream::connect(&sock).unwrap();
    assert!(closed_by_agent(&mut s), "idle connection kept open");
    // Stalled mid-frame.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&100u32.to_be_bytes()).unwrap();
    s.write_all(&[0u8; 10]).unwrap();
    assert!(closed_by_agent(&mut s), "stalled frame kept open");
    // A client that talks is served.
    assert_eq!(list(dir.path(), Duration::from_secs(5)).unwrap(), 0);
}

#[test]
fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let dir = tempfile::tempdir().unwrap();
    let me = my_uid();
    let _rt = serve(
        dir.path(),
        Limits {
            peer_uid: me,
            max_connections: 2,
            idle: Duration::from_secs(30),
            ..Limits::default()
        },
    );
    let sock = dir.path().join("agent.sock");
    let a = UnixStream::connect(&sock).unwrap();
    let b = UnixStream::connect(&sock).unwrap();
    // Both slots held by silent clients: a third is not served (its call times out).
    let err = list(dir.path(), Duration::from_millis(500)).unwrap_err();
    assert!(matches!(err, ClientError::Transport(_)), "{err}");
    drop(a);
    drop(b);
    assert_eq!(list(dir.path(), Duration::from_secs(5)).unwrap(), 0);
}
