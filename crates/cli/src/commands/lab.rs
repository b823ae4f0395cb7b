//! `underlay lab …`: a routed- or eni-mode cluster on a VPC made of network namespaces.
//!
//! `demo` runs everything in one process (up, check, failover, down). `up` starts a lab in a background process
//! (`lab serve`, detached with `setsid`) that holds the VPC, the controller and the agents; `status`, `check`,
//! `fail`, `recover` and `failover` talk to it over `<state dir>/control.sock`; `down` stops it, or removes what
//! a crashed lab left behind.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use underlay_lab::scenario::{DemoReport, Lab, LabConfig, default_state_dir, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Human,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub(super) struct Shape {
    /// Lab id (1–6 lowercase letters or digits); namespaces are `ul-<name>-…`.
    #[arg(long, default_value = "demo")]
    pub(super) name: String,
    #[arg(long, default_value_t = 3)]
    pub(super) zones: usize,
    #[arg(long, default_value_t = 2)]
    pub(super) subnets_per_zone: usize,
    #[arg(long, default_value_t = 12)]
    pub(super) nodes: usize,
    #[arg(long, default_value_t = 4)]
    pub(super) pods_per_node: usize,
    /// Routes per VPC route table (AWS's default is 500; the lab keeps it small). Low enough that blocks are aggregated behind forwarders.
    #[arg(long, default_value_t = 8)]
    pub(super) route_limit: usize,
    #[arg(long, default_value_t = 1)]
    pub(super) seed: u64,
    /// Pod block size per node (prefix length).
    #[arg(long, default_value_t = 26)]
    pub(super) block: u8,
    /// Forwarder health probe interval (ms); the controller's default.
    #[arg(long, default_value_t = underlay_controller::config::DEFAULT_PROBE_INTERVAL.as_millis() as u64)]
    pub(super) probe_interval_ms: u64,
    /// How long a recovered forwarder must stay healthy before its routes return (s).
    #[arg(long, default_value_t = 10)]
    pub(super) hold_down_s: u64,
    /// The underlay-cni binary (default: next to this executable).
    #[arg(long)]
    pub(super) cni_plugin: Option<PathBuf>,
    /// Address mode: `routed` (pod blocks behind aggregated VPC routes) or `eni` (ENI secondary addresses and
    /// prefixes, source/dest check on everywhere).
    #[arg(long, value_enum, default_value = "routed")]
    pub(super) mode: LabMode,
    /// EC2 instance type of every node (its ENI and address limits apply).
    #[arg(long, default_value = underlay_lab::scenario::NODE_TYPE)]
    pub(super) instance_type: String,
    /// Turn off vpcsim's AWS-like route timing (route calls 100–300 ms, a route change reaching the fabric
    /// 200–500 ms after the call): every call answers at once and the fabric follows at once.
    #[arg(long)]
    pub(super) no_aws_latency: bool,
    /// Run every agent with the tc-BPF fast path forced off (the kernel path only).
    #[arg(long)]
    pub(super) no_fast_path: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum LabMode {
    Routed,
    Eni,
}

impl LabMode {
    fn api(self) -> underlay_api::Mode {
        match self {
            LabMode::Routed => underlay_api::Mode::Routed,
            LabMode::Eni => underlay_api::Mode::Eni,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            LabMode::Routed => "routed",
            LabMode::Eni => "eni",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
struct Target {
    #[arg(long, default_value = "demo")]
    name: String,
    #[arg(long, value_enum, default_value = "human")]
    format: Format,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Build a lab and leave it running in the background.
    Up {
        #[command(flatten)]
        shape: Shape,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
    },
    /// Nodes, pods, routes per table, readiness times, EC2 calls.
    Status(Target),
    /// Connectivity matrix across every path class, with latency, and the no-encapsulation check.
    Check(Target),
    /// Kill a node (agent stopped, uplink down).
    Fail {
        node: String,
        #[command(flatten)]
        target: Target,
    },
    /// Bring a failed node back.
    Recover {
        node: String,
        #[command(flatten)]
        target: Target,
    },
    /// Kill a forwarder under a steady probe: blackhole, routes moved, time to fail back.
    Failover(Target),
    /// Eni mode: a burst of pods on every node grows the pools, then leaves; the excess is released and the
    /// pods that stayed keep their addresses.
    Churn {
        /// Pods added to each node (default: one more than an ENI's addresses, so every node needs another
        /// ENI's worth).
        #[arg(long)]
        burst: Option<usize>,
        #[command(flatten)]
        target: Target,
    },
    /// Stop the lab and remove every namespace, link and file it created.
    Down {
        #[arg(long, default_value = "demo")]
        name: String,
    },
    /// up, status, check, failover (routed) or churn (eni), down; exits non-zero if anything fails.
    Demo {
        #[command(flatten)]
        shape: Shape,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
        /// Skip the failover (routed) or churn (eni) scenario.
        #[arg(long, alias = "no-churn")]
        no_failover: bool,
    },
    /// NetworkPolicy as the Kubernetes e2e suite tests it: namespaces x, y, z with pods a, b, c serving TCP, UDP
    /// and SCTP on 80 and 81; the e2e cases (or `--cases FILE`), every pair, port and protocol checked after each.
    Policy(super::lab_policy::PolicyArgs),
    /// Pods churning, policies changing and faults drawn from a seed (agent and leader kills, API outages, EC2
    /// errors, throttling and latency, forwarder deaths, namespaces deleted without DEL), overlapping; invariants
    /// checked every second; a report with recovery times. Exits non-zero with the seed on any violation.
    Soak(super::lab_soak::SoakArgs),
    /// The background process behind `up` (not for direct use).
    #[command(hide = true)]
    Serve {
        #[command(flatten)]
        shape: Shape,
    },
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    init_tracing();
    match args.cmd {
        Cmd::Demo {
            shape,
            format,
            no_failover,
        } => demo(shape, format, no_failover),
        Cmd::Up { shape, format } => up(shape, format),
        Cmd::Serve { shape } => serve(shape),
        Cmd::Status(t) => request(&t, json!({"cmd": "status"})),
        Cmd::Check(t) => request(&t, json!({"cmd": "check"})),
        Cmd::Failover(t) => request(&t, json!({"cmd": "failover"})),
        Cmd::Churn { burst, target } => request(&target, json!({"cmd": "churn", "burst": burst})),
        Cmd::Fail { node, target } => request(&target, json!({"cmd": "fail", "node": node})),
        Cmd::Recover { node, target } => request(&target, json!({"cmd": "recover", "node": node})),
        Cmd::Down { name } => down(&name),
        Cmd::Policy(a) => super::lab_policy::exec(a),
        Cmd::Soak(a) => super::lab_soak::exec(a),
    }
}

fn init_tracing() {
    super::init_tracing("warn");
}

pub(super) fn config(shape: &Shape) -> anyhow::Result<LabConfig> {
    let mut c = LabConfig::demo(super::plugin_path(shape.cni_plugin.clone())?);
    c.name = shape.name.clone();
    c.state_dir = default_state_dir(&shape.name);
    c.zones = shape.zones;
    c.subnets_per_zone = shape.subnets_per_zone;
    c.nodes = shape.nodes;
    c.pods_per_node = shape.pods_per_node;
    c.route_limit = shape.route_limit;
    c.seed = shape.seed;
    c.block_prefix_len = shape.block;
    c.probe_interval = Duration::from_millis(shape.probe_interval_ms);
    c.hold_down = Duration::from_secs(shape.hold_down_s);
    c.mode = shape.mode.api();
    c.instance_type = shape.instance_type.clone();
    c.aws_route_latency = !shape.no_aws_latency;
    c.fast_path = !shape.no_fast_path;
    c.validate()?;
    Ok(c)
}

fn print(format: Format, value: &Value, human: impl FnOnce() -> String) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Human => print!("{}", human()),
    }
    Ok(())
}

fn demo(shape: Shape, format: Format, no_failover: bool) -> anyhow::Result<()> {
    let config = config(&shape)?;
    eprintln!(
        "underlay lab demo: {} zones × {} subnets, {} nodes, {} pods each, route limit {}",
        config.zones,
        config.subnets_per_zone,
        config.nodes,
        config.pods_per_node,
        config.route_limit
    );
    let mut lab = Lab::up(config)?;
    let mut run = || -> anyhow::Result<DemoReport> {
        let check = lab.check()?;
        // Failover moves routed mode's VPC routes between forwarders; eni mode has none to move, its pools
        // grow and shrink instead.
        let eni = lab.config.mode == underlay_api::Mode::Eni;
        let failover = if no_failover || eni {
            None
        } else {
            Some(lab.failover()?)
        };
        let churn = if no_failover || !eni {
            None
        } else {
            let burst = underlay_lab::scenario::default_burst(&lab.config.instance_type);
            Some(lab.churn(burst)?)
        };
        // After the fail-back (or the churn) the lab must be whole again.
        let status = lab.status();
        Ok(DemoReport::new(status, check, failover, churn))
    };
    let report = run();
    let down = lab.down();
    let report = report?;
    down?;
    print(format, &serde_json::to_value(&report)?, || report.human())?;
    if !report.passed {
        bail!("lab demo failed: {}", report.failures.join("; "));
    }
    Ok(())
}

fn control_socket(name: &str) -> PathBuf {
    default_state_dir(name).join("control.sock")
}

fn log_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("underlay-lab-{name}.log"))
}

/// Starts `lab serve` detached, waits for its control socket, prints the status.
fn up(shape: Shape, format: Format) -> anyhow::Result<()> {
    config(&shape)?;
    let sock = control_socket(&shape.name);
    if UnixStream::connect(&sock).is_ok() {
        bail!(
            "lab {} is running already; `underlay lab down --name {}` first",
            shape.name,
            shape.name
        );
    }
    let log = log_file(&shape.name);
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new("setsid");
    cmd.arg(&exe)
        .args(["lab", "serve"])
        .args(shape_args(&shape));
    cmd.stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let mut child = cmd.spawn().context("starting the lab process (setsid)")?;
    eprintln!("building lab {} (log: {})", shape.name, log.display());
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut shown = 0usize;
    loop {
        // Relay the background process's progress.
        if let Ok(text) = std::fs::read_to_string(&log) {
            for line in text.lines().skip(shown) {
                eprintln!("{line}");
                shown += 1;
            }
        }
        if UnixStream::connect(&sock).is_ok() {
            break;
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the lab process exited ({status}) before it was up; see {}",
                log.display()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "the lab was not up within 15 minutes; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    request(
        &Target {
            name: shape.name,
            format,
        },
        json!({"cmd": "status"}),
    )
}

fn shape_args(s: &Shape) -> Vec<String> {
    let mut v = vec![
        format!("--name={}", s.name),
        format!("--zones={}", s.zones),
        format!("--subnets-per-zone={}", s.subnets_per_zone),
        format!("--nodes={}", s.nodes),
        format!("--pods-per-node={}", s.pods_per_node),
        format!("--route-limit={}", s.route_limit),
        format!("--seed={}", s.seed),
        format!("--block={}", s.block),
        format!("--probe-interval-ms={}", s.probe_interval_ms),
        format!("--hold-down-s={}", s.hold_down_s),
        format!("--mode={}", s.mode.as_str()),
        format!("--instance-type={}", s.instance_type),
    ];
    if let Some(p) = &s.cni_plugin {
        v.push(format!("--cni-plugin={}", p.display()));
    }
    if s.no_aws_latency {
        v.push("--no-aws-latency".to_string());
    }
    if s.no_fast_path {
        v.push("--no-fast-path".into());
    }
    v
}

/// The background process: builds the lab, then answers one request per connection until `down`.
fn serve(shape: Shape) -> anyhow::Result<()> {
    let config = config(&shape)?;
    let sock = control_socket(&shape.name);
    let mut lab = Lab::up(config)?;
    let _ = std::fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    progress(format!(
        "lab {} up; control socket {}",
        shape.name,
        sock.display()
    ));
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let mut line = String::new();
        if BufReader::new(&conn).read_line(&mut line).is_err() {
            continue;
        }
        let req: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        let cmd = req["cmd"].as_str().unwrap_or("");
        let reply = match handle(&mut lab, cmd, &req) {
            Ok((v, human)) => json!({"ok": true, "result": v, "human": human}),
            Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
        };
        let _ = writeln!(conn, "{reply}");
        if cmd == "down" {
            break;
        }
    }
    // The socket goes last: `lab down` waits for it to vanish before it sweeps.
    let r = lab.down();
    let _ = std::fs::remove_file(&sock);
    r
}

/// One request: its JSON result and the same for a person.
fn handle(lab: &mut Lab, cmd: &str, req: &Value) -> anyhow::Result<(Value, String)> {
    let node = || req["node"].as_str().context("no node given");
    Ok(match cmd {
        "status" => {
            let r = lab.status();
            (serde_json::to_value(&r)?, r.human())
        }
        "check" => {
            let r = lab.check()?;
            (serde_json::to_value(&r)?, r.human())
        }
        "failover" => {
            let r = lab.failover()?;
            (serde_json::to_value(&r)?, r.human())
        }
        "churn" => {
            let burst = match req["burst"].as_u64() {
                Some(n) => usize::try_from(n)?,
                None => underlay_lab::scenario::default_burst(&lab.config.instance_type),
            };
            let r = lab.churn(burst)?;
            (serde_json::to_value(&r)?, r.human())
        }
        "fail" => {
            lab.fail_node(node()?)?;
            (json!({"failed": node()?}), format!("{} failed\n", node()?))
        }
        "recover" => {
            lab.recover_node(node()?)?;
            (
                json!({"recovered": node()?}),
                format!("{} recovering\n", node()?),
            )
        }
        "down" => (json!({"down": lab.config.name}), String::new()),
        other => bail!("unknown request {other:?}"),
    })
}

fn request(t: &Target, req: Value) -> anyhow::Result<()> {
    let sock = control_socket(&t.name);
    let mut conn = UnixStream::connect(&sock).with_context(|| {
        format!(
            "lab {} is not running (no {}); start it with `underlay lab up --name {}`",
            t.name,
            sock.display(),
            t.name
        )
    })?;
    writeln!(conn, "{req}")?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let reply: Value = serde_json::from_str(&line).context("the lab process gave no answer")?;
    if reply["ok"] != Value::Bool(true) {
        bail!(
            "{}",
            reply["error"].as_str().unwrap_or("lab request failed")
        );
    }
    let result = &reply["result"];
    let human = reply["human"].as_str().unwrap_or_default().to_owned();
    print(t.format, result, || human)?;
    if req["cmd"] == "check"
        && (result["pairs_ok"] != result["pairs_checked"]
            || result["encap_devices"]
                .as_array()
                .is_some_and(|a| !a.is_empty()))
    {
        bail!("check failed");
    }
    Ok(())
}

/// Stops a running lab; removes whatever a crashed one left behind either way.
fn down(name: &str) -> anyhow::Result<()> {
    let sock = control_socket(name);
    if let Ok(mut conn) = UnixStream::connect(&sock) {
        writeln!(conn, "{}", json!({"cmd": "down"}))?;
        let mut line = String::new();
        let _ = BufReader::new(&conn).read_line(&mut line);
        // The serve process tears down after answering; wait for its socket to go.
        let deadline = Instant::now() + Duration::from_secs(60);
        while sock.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    sweep(name, &default_state_dir(name))
}

fn sweep(name: &str, state: &Path) -> anyhow::Result<()> {
    underlay_lab::sweep(name)?;
    let _ = std::fs::remove_dir_all(state);
    let _ = std::fs::remove_file(log_file(name));
    eprintln!("lab {name} removed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct ShapeOnly {
        #[command(flatten)]
        shape: Shape,
    }

    /// `lab up` hands its shape to the background `lab serve` as arguments: every field must survive the trip
    /// (the fast path's switch once did not, so `lab up --no-fast-path` ran with it on).
    #[test]
    fn the_serve_process_gets_the_whole_shape() {
        for extra in [&[][..], &["--no-fast-path"][..], &["--mode", "eni"][..]] {
            let mut argv = vec!["x"];
            argv.extend_from_slice(extra);
            let given = ShapeOnly::parse_from(&argv).shape;
            let mut again = vec!["x".to_string()];
            again.extend(shape_args(&given));
            let back = ShapeOnly::parse_from(&again).shape;
            assert_eq!(format!("{given:?}"), format!("{back:?}"));
        }
    }
}
