//! Root test: the policy matrix's servers and probes across a router namespace that filters as a node does
//! (nftables with conntrack): TCP, UDP and SCTP (raw IP, INIT → INIT-ACK) to port 80 pass, to port 81 are
//! dropped, and conntrack never finds one of the SCTP packets invalid (their CRC32c is right).
#![cfg(feature = "root-tests")]

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use underlay_dataplane::testns::TestNs;
use underlay_lab::scenario::policy::probe::{
    Endpoint, PodServers, ProbeJob, Protocol, probe, run_probes,
};

fn sh(ns: &TestNs, program: &str, args: &[&str]) -> String {
    let out = ns.command(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn veth(a: &TestNs, a_if: &str, b: &TestNs, b_if: &str) {
    let st = Command::new("ip")
        .args([
            "link",
            "add",
            a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
}

const RULES: &str = "table inet plprobe {
  counter badct {}
  chain through {
    type filter hook forward priority 0; policy accept;
    ct state invalid counter name badct drop
    ip daddr 100.64.250.6 tcp dport 81 drop
    ip daddr 100.64.250.6 udp dport 81 drop
    ip daddr 100.64.250.6 sctp dport 81 drop
  }
}";

#[test]
fn tcp_udp_and_sctp_probes_see_what_a_filtering_router_lets_through() {
    let client = TestNs::new("plp-c").unwrap();
    let router = TestNs::new("plp-r").unwrap();
    let server = TestNs::new("plp-s").unwrap();
    veth(&client, "eth0", &router, "rc");
    veth(&server, "eth0", &router, "rs");
    sh(
        &client,
        "ip",
        &["addr", "add", "100.64.250.2/30", "dev", "eth0"],
    );
    sh(&client, "ip", &["link", "set", "eth0", "up"]);
    sh(
        &client,
        "ip",
        &["route", "add", "default", "via", "100.64.250.1"],
    );
    sh(
        &server,
        "ip",
        &["addr", "add", "100.64.250.6/30", "dev", "eth0"],
    );
    sh(&server, "ip", &["link", "set", "eth0", "up"]);
    sh(
        &server,
        "ip",
        &["route", "add", "default", "via", "100.64.250.5"],
    );
    sh(
        &router,
        "ip",
        &["addr", "add", "100.64.250.1/30", "dev", "rc"],
    );
    sh(
        &router,
        "ip",
        &["addr", "add", "100.64.250.5/30", "dev", "rs"],
    );
    sh(&router, "ip", &["link", "set", "rc", "up"]);
    sh(&router, "ip", &["link", "set", "rs", "up"]);
    router
        .netns()
        .write_sysctl("net/ipv4/ip_forward", "1")
        .unwrap();
    let mut nft = router
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    nft.stdin
        .take()
        .unwrap()
        .write_all(RULES.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success());

    let servers = PodServers::start(&[
        Endpoint {
            netns: server.name().to_string(),
            ip: "100.64.250.6".parse().unwrap(),
        },
        Endpoint {
            netns: client.name().to_string(),
            ip: "100.64.250.2".parse().unwrap(),
        },
    ])
    .unwrap();
    let source = Arc::new(underlay_dataplane::Netns::named(client.name()).unwrap());
    let mut jobs = Vec::new();
    for proto in Protocol::ALL {
        for port in [80, 81] {
            jobs.push(ProbeJob {
                source: source.clone(),
                dst: "100.64.250.6".parse().unwrap(),
                proto,
                port,
            });
        }
    }
    let timeout = Duration::from_millis(400);
    // The first exchange may wait for neighbour resolution: warm up once, then measure.
    let _ = run_probes(&jobs, 8, timeout);
    let got = run_probes(&jobs, 8, timeout);
    let seen: Vec<(Protocol, u16, bool)> = jobs
        .iter()
        .zip(&got)
        .map(|(j, ok)| (j.proto, j.port, *ok))
        .collect();
    for (proto, port, ok) in &seen {
        assert_eq!(*ok, *port == 80, "{proto:?}/{port}: reachable={ok}");
    }
    // The server saw the port-80 probes and nothing on 81.
    for proto in Protocol::ALL {
        assert!(servers.received.get(0, proto, 80) >= 1, "{proto:?}/80");
        assert_eq!(servers.received.get(0, proto, 81), 0, "{proto:?}/81");
    }
    // Loopback: a pod reaching its own address.
    for proto in Protocol::ALL {
        let j = ProbeJob {
            source: source.clone(),
            dst: "100.64.250.2".parse().unwrap(),
            proto,
            port: 81,
        };
        assert_eq!(probe(&j, timeout), Ok(true), "{proto:?} loopback");
    }
    // conntrack parsed every SCTP packet as valid: the checksum is right.
    let counter = sh(
        &router,
        "nft",
        &["list", "counter", "inet", "plprobe", "badct"],
    );
    assert!(
        counter.contains("packets 0 "),
        "conntrack found invalid packets: {counter}"
    );
    drop(servers);
}
