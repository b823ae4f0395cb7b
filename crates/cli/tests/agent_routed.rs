//! `underlay agent --routed-spec`: the binary converges a node namespace to its record and its health
//! endpoint, bound inside that namespace, turns ready. Needs root (creates network namespaces).
#![cfg(feature = "root-tests")]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use underlay_dataplane::testns::TestNs;
use underlay_dataplane::{Netns, VethSpec};

const BIN: &str = env!("CARGO_BIN_EXE_underlay");
const TABLE: u32 = 0x756c;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` on 127.0.0.1:9650 inside `ns`; the status code, or None if nothing answers.
fn get(ns: &Netns, path: &str) -> Option<(u16, String)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    ns.run(move || {
        let out = (|| {
            let mut s = TcpStream::connect_timeout(
                &"127.0.0.1:9650".parse().unwrap(),
                Duration::from_secs(1),
            )
            .ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(req.as_bytes()).ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            let code = text.get(9..12)?.parse().ok()?;
            Some((code, text.split("\r\n\r\n").nth(1)?.trim().to_string()))
        })();
        Ok(out)
    })
    .unwrap()
}

#[test]
fn routed_agent_converges_its_namespace_and_turns_ready() {
    let node = TestNs::new("clr").unwrap();
    let wire = TestNs::new("clr").unwrap();
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
    let up = nl.link_by_name("up0").unwrap().unwrap().index;
    nl.addr_add(up, "198.18.0.10/24".parse().unwrap()).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("node.yaml");
    std::fs::write(
        &spec,
        "node: i-a\nsubnet: subnet-1\nnode_ip: 198.18.0.10\npod_block: 100.64.0.0/26\n\
         pod_cidr: 100.64.0.0/10\nvpc_cidrs: [198.18.0.0/15]\nmtu: 1500\n\
         peer_routes:\n  - { destination: 100.64.0.64/26, via: 198.18.0.11, peer: i-b }\n",
    )
    .unwrap();
    let child = Command::new(BIN)
        .arg("agent")
        .arg("--routed-spec")
        .arg(&spec)
        .arg("--netns")
        .arg(node.path())
        .args(["--health-addr", "127.0.0.1:9650"])
        .arg("--socket")
        .arg(dir.path().join("agent.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--cni-conf-dir")
        .arg(dir.path().join("net.d"))
        .arg("--cni-bin-dir")
        .arg(dir.path().join("bin"))
        .env("RUST_LOG", "warn")
        .env_remove("UNDERLAY_AGENT_FAULT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _guard = Kill(child);

    // Bounded: 200 × 100 ms.
    let mut last = None;
    for _ in 0..200 {
        last = get(node.netns(), "/readyz");
        if matches!(last, Some((200, _))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(last, Some((200, "ok".to_string())), "never ready");
    assert_eq!(get(node.netns(), "/healthz"), Some((200, "ok".to_string())));

    // The converge happened in the node namespace: peer route, forwarding, the nft table.
    let routes = node.netns().netlink().unwrap().routes(TABLE).unwrap();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0].dst.to_string(), "100.64.0.64/26");
    assert_eq!(
        node.netns().read_sysctl("net.ipv4.ip_forward").unwrap(),
        "1"
    );
    let out = node
        .command("nft")
        .args(["list", "table", "inet", "underlay"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("snat ip to 198.18.0.10"));
    // The record's block is the pool and its MTU the pod MTU.
    let conflist = std::fs::read_to_string(dir.path().join("net.d/10-underlay.conflist")).unwrap();
    assert!(conflist.contains("1500"), "{conflist}");
}
