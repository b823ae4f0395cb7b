//! `underlay bench cni`: N pods ADD then DEL, for underlay-cni + `underlay agent` and, in the same run with the
//! same harness, for the reference `ptp` + `host-local` plugins, each in a node namespace of its own.
//!
//! Both plugins are exec'd as processes from a thread inside their node namespace, exactly as a runtime does;
//! the timed region is spawn → exit of one plugin invocation. Pod namespaces are created before timing
//! starts and shared by both runs (one after the other). Everything this creates is named `ulbench-*` and is
//! deleted on every exit path (drop guards; a killed run's leftovers are swept at the next start).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use underlay_core::names;
use underlay_dataplane::testns::{self, TestNs};

/// Prefix of every namespace the benchmark creates.
const PREFIX: &str = "ulbench";
/// Pod blocks of the two runs (the lab's pod range), sized for up to 4,094 pods each.
const UNDERLAY_POOL: &str = "100.64.0.0/20";
const REFERENCE_SUBNET: &str = "100.64.16.0/20";
/// `--mode eni`: the agent's pool is this many interface addresses from the lab VPC range, alternately tied to
/// two ENIs' tables, so each ADD also installs the pod's two rules (and each DEL removes them).
const ENI_POOL_BASE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 16, 0);
const MAX_PODS: usize = 4000;
/// Where the agent's checkpoint goes: tmpfs, like its default under /run.
const TMPFS: &str = "/dev/shm";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of pods (each gets one ADD and one DEL per plugin).
    #[arg(long, default_value_t = 200)]
    pods: usize,
    /// The underlay-cni binary (default: next to this executable).
    #[arg(long, value_name = "FILE")]
    plugin: Option<PathBuf>,
    /// Directory of the reference plugins (ptp, host-local).
    #[arg(long, value_name = "DIR", default_value = "/usr/lib/cni")]
    reference_dir: PathBuf,
    /// Address mode of underlay's run: `routed` (a block) or `eni` (interface addresses; ADD and DEL also
    /// install and remove the pod's two policy rules).
    #[arg(long, value_enum, default_value_t = BenchMode::Routed)]
    mode: BenchMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchMode {
    Routed,
    Eni,
}

/// The agent configuration of an `eni`-mode run: `pods` addresses, alternating between ENI devices 1 and 2.
fn eni_pool_yaml(pods: usize) -> String {
    let mut y = String::from("pool:\n  addresses:\n");
    for i in 0..pods {
        let a = std::net::Ipv4Addr::from(u32::from(ENI_POOL_BASE) + i as u32);
        let device = 1 + (i % 2) as u32;
        y.push_str(&format!(
            "    - {{ address: {a}, egress_interface: eth{device}, route_table: {} }}\n",
            underlay_core::eni::route_table(device)
        ));
    }
    y
}

/// Kills and reaps the agent on every exit path.
struct AgentGuard(Child);

impl Drop for AgentGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    ensure!(
        (1..=MAX_PODS).contains(&args.pods),
        "--pods must be within 1..={MAX_PODS}"
    );
    let exe = std::env::current_exe().context("locating this executable")?;
    let plugin = super::plugin_path(args.plugin)?;
    ensure!(
        plugin.is_file(),
        "{} not found (build it, or pass --plugin)",
        plugin.display()
    );
    let ptp = args.reference_dir.join("ptp");
    ensure!(
        ptp.is_file(),
        "{} not found (Debian: containernetworking-plugins)",
        ptp.display()
    );

    testns::sweep(PREFIX);
    let dir = tempfile::Builder::new()
        .prefix("ulbench")
        .tempdir()
        .context("temp dir")?;
    let pods: Vec<TestNs> = (0..args.pods)
        .map(|_| TestNs::new(&format!("{PREFIX}-pod")))
        .collect::<Result<_, _>>()?;

    // underlay-cni + agent. The agent's checkpoint lives on tmpfs, as its default (/run) does on a node; the
    // reference keeps host-local's state on disk, as its default (/var/lib/cni) does.
    let state = tempfile::Builder::new()
        .prefix("ulbench-state")
        .tempdir_in(TMPFS)
        .with_context(|| format!("temp dir under {TMPFS}"))?;
    let ul_node = TestNs::new(&format!("{PREFIX}-ul"))?;
    let socket = dir.path().join("agent.sock");
    let agent_log = std::fs::File::create(dir.path().join("agent.log"))?;
    let pool_args: Vec<String> = match args.mode {
        BenchMode::Routed => vec!["--pool".into(), UNDERLAY_POOL.into()],
        BenchMode::Eni => {
            let cfg = dir.path().join("agent-eni.yaml");
            std::fs::write(&cfg, eni_pool_yaml(args.pods))?;
            vec!["--config".into(), cfg.display().to_string()]
        }
    };
    let agent = ul_node.netns().run(|| {
        Command::new(&exe)
            .arg("agent")
            .args(&pool_args)
            .args(["--cooldown-secs", "0"])
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(state.path())
            .arg("--cni-conf-dir")
            .arg(dir.path().join("net.d"))
            .arg("--cni-bin-dir")
            .arg(dir.path().join("bin"))
            .arg("--plugin-source")
            .arg(&plugin)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(agent_log)
            .spawn()
            .map_err(|e| underlay_dataplane::Error::Protocol {
                op: "spawn agent".into(),
                detail: e.to_string(),
            })
    })?;
    let _agent = AgentGuard(agent);
    wait_for_agent(&socket)?;
    let ul_conf = json!({ "cniVersion": "1.0.0", "name": "ulbench", "type": names::CNI_PLUGIN,
                          "socket": socket, "mtu": 1500 });
    let ul = run_plugin(&ul_node, &plugin, &ul_conf, &pods, &args.reference_dir)?;

    // Reference: ptp + host-local, equivalent configuration (/32-style point-to-point veth, same MTU).
    let ref_node = TestNs::new(&format!("{PREFIX}-ref"))?;
    let ref_conf = json!({ "cniVersion": "1.0.0", "name": "ulbench-ref", "type": "ptp", "ipMasq": false,
                           "mtu": 1500,
                           "ipam": { "type": "host-local", "ranges": [[{ "subnet": REFERENCE_SUBNET }]],
                                     "dataDir": dir.path().join("host-local") } });
    let reference = run_plugin(&ref_node, &ptp, &ref_conf, &pods, &args.reference_dir)?;

    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let add_ratio = ratio(ul.add.p50, reference.add.p50);
    let del_ratio = ratio(ul.del.p50, reference.del.p50);
    let report = json!({
        "bench": "cni",
        "mode": match args.mode { BenchMode::Routed => "routed", BenchMode::Eni => "eni" },
        "pods": args.pods,
        "underlay": ul.to_json(),
        "reference_ptp_host_local": reference.to_json(),
        "ratios": {
            "add_p50": add_ratio,
            "del_p50": del_ratio,
            "add_p50_bar": 0.25,
            "del_p50_bar": 0.1,
            "add_p50_met": add_ratio <= 0.25,
            "del_p50_met": del_ratio <= 0.1,
        },
        "plugin": plugin,
        "reference_dir": args.reference_dir,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn wait_for_agent(socket: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if underlay_ipam_api::Client::connect(socket)
            .and_then(|c| c.list())
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("agent did not answer on {} within 20 s", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug, Default)]
struct Phase {
    p50: f64,
    p99: f64,
    mean: f64,
    per_s: f64,
}

impl Phase {
    fn from(mut ms: Vec<f64>, wall: Duration) -> Phase {
        ms.sort_by(f64::total_cmp);
        let pick = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
        Phase {
            p50: pick(0.5),
            p99: pick(0.99),
            mean: ms.iter().sum::<f64>() / ms.len() as f64,
            per_s: ms.len() as f64 / wall.as_secs_f64(),
        }
    }

    fn to_json(&self) -> Value {
        json!({ "p50_ms": round3(self.p50), "p99_ms": round3(self.p99), "mean_ms": round3(self.mean),
                "pods_per_s": round3(self.per_s) })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[derive(Debug)]
struct Run {
    add: Phase,
    del: Phase,
}

impl Run {
    fn to_json(&self) -> Value {
        json!({ "add": self.add.to_json(), "del": self.del.to_json() })
    }
}

/// ADD for every pod, then DEL for every pod, each invocation a process spawned inside `node`.
fn run_plugin(
    node: &TestNs,
    program: &Path,
    conf: &Value,
    pods: &[TestNs],
    cni_path: &Path,
) -> anyhow::Result<Run> {
    let stdin = serde_json::to_vec(conf)?;
    let result = node.netns().run(|| {
        let phase = |command: &str| -> Result<Phase, String> {
            let mut ms = Vec::with_capacity(pods.len());
            let start = Instant::now();
            for (i, pod) in pods.iter().enumerate() {
                let id = format!("bench-{i}");
                let t = Instant::now();
                let out = invoke(program, command, &id, &pod.path(), cni_path, &stdin)
                    .map_err(|e| format!("{command} {id}: {e}"))?;
                ms.push(t.elapsed().as_secs_f64() * 1e3);
                if !out.status.success() {
                    return Err(format!(
                        "{} {command} {id} failed: {}{}",
                        program.display(),
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
            Ok(Phase::from(ms, start.elapsed()))
        };
        Ok(phase("ADD").and_then(|add| {
            Ok(Run {
                add,
                del: phase("DEL")?,
            })
        }))
    })?;
    result.map_err(anyhow::Error::msg)
}

fn invoke(
    program: &Path,
    command: &str,
    id: &str,
    netns: &str,
    cni_path: &Path,
    stdin: &[u8],
) -> std::io::Result<std::process::Output> {
    let mut child = Command::new(program)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("piped").write_all(stdin)?;
    child.wait_with_output()
}
