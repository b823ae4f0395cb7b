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
use std::path::{Path, PathBuf};
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
        Self::start_with(&moto_binary())
    }

    /// [`start`](Self::start) with another moto_server executable.
    pub fn start_with(binary: &Path) -> Result<Self, String> {
        if !binary.exists() {
            return Err(format!(
                "moto server not found at {}: run scripts/setup.sh (it builds the .venv with moto[server])",
                binary.display()
            ));
        }
        // Several attempts: another process may take the port between our probe and moto's bind.
        let mut last = String::new();
        for _ in 0..3 {
            match Self::start_once(binary) {
                Ok(server) => return Ok(server),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn start_once(binary: &Path) -> Result<Self, String> {
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

    /// Process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.id()
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

/// A VPC built with raw EC2 calls for tests: 198.18.0.0/16, subnets 198.18.0.0/24 (us-east-1a) and
/// 198.18.1.0/24 (us-east-1b), an internet gateway with a default route in the main table, one m5.large in
/// subnet a.
#[derive(Debug, Clone)]
pub struct TestVpc {
    pub vpc: underlay_cloud::VpcId,
    pub subnet_a: underlay_cloud::SubnetId,
    pub subnet_b: underlay_cloud::SubnetId,
    pub main_table: underlay_cloud::RouteTableId,
    pub igw: String,
    pub instance: underlay_cloud::InstanceId,
}

type Fallible<T> = Result<T, underlay_cloud::CloudError>;

fn missing(what: &str) -> underlay_cloud::CloudError {
    underlay_cloud::CloudError::new(
        underlay_cloud::ErrorKind::Service,
        "MalformedReply",
        format!("moto reply without {what}"),
    )
}

impl TestVpc {
    pub async fn create(cloud: &Ec2Cloud) -> Fallible<Self> {
        use crate::classify_sdk_error as err;
        use aws_sdk_ec2::types as ec2;
        let c = cloud.client();
        let vpc = c
            .create_vpc()
            .cidr_block("198.18.0.0/16")
            .send()
            .await
            .map_err(err)?
            .vpc
            .and_then(|v| v.vpc_id)
            .ok_or_else(|| missing("VpcId"))?;
        let mut subnets = Vec::new();
        for (cidr, zone) in [
            ("198.18.0.0/24", "us-east-1a"),
            ("198.18.1.0/24", "us-east-1b"),
        ] {
            subnets.push(
                c.create_subnet()
                    .vpc_id(&vpc)
                    .cidr_block(cidr)
                    .availability_zone(zone)
                    .send()
                    .await
                    .map_err(err)?
                    .subnet
                    .and_then(|s| s.subnet_id)
                    .ok_or_else(|| missing("SubnetId"))?,
            );
        }
        let igw = c
            .create_internet_gateway()
            .send()
            .await
            .map_err(err)?
            .internet_gateway
            .and_then(|g| g.internet_gateway_id)
            .ok_or_else(|| missing("InternetGatewayId"))?;
        c.attach_internet_gateway()
            .internet_gateway_id(&igw)
            .vpc_id(&vpc)
            .send()
            .await
            .map_err(err)?;
        let main_table = c
            .describe_route_tables()
            .filters(ec2::Filter::builder().name("vpc-id").values(&vpc).build())
            .send()
            .await
            .map_err(err)?
            .route_tables
            .unwrap_or_default()
            .into_iter()
            .next()
            .and_then(|t| t.route_table_id)
            .ok_or_else(|| missing("RouteTableId"))?;
        c.create_route()
            .route_table_id(&main_table)
            .destination_cidr_block("0.0.0.0/0")
            .gateway_id(&igw)
            .send()
            .await
            .map_err(err)?;
        let subnet_a = underlay_cloud::SubnetId::new(&subnets[0]);
        let instance = run_instance(cloud, &subnet_a).await?;
        Ok(Self {
            vpc: underlay_cloud::VpcId::new(vpc),
            subnet_a,
            subnet_b: underlay_cloud::SubnetId::new(&subnets[1]),
            main_table: underlay_cloud::RouteTableId::new(main_table),
            igw,
            instance,
        })
    }

    /// A route table of this VPC, associated with `subnet`.
    pub async fn create_route_table(
        &self,
        cloud: &Ec2Cloud,
        subnet: &underlay_cloud::SubnetId,
    ) -> Fallible<underlay_cloud::RouteTableId> {
        use crate::classify_sdk_error as err;
        let c = cloud.client();
        let table = c
            .create_route_table()
            .vpc_id(self.vpc.as_str())
            .send()
            .await
            .map_err(err)?
            .route_table
            .and_then(|t| t.route_table_id)
            .ok_or_else(|| missing("RouteTableId"))?;
        c.associate_route_table()
            .route_table_id(&table)
            .subnet_id(subnet.as_str())
            .send()
            .await
            .map_err(err)?;
        Ok(underlay_cloud::RouteTableId::new(table))
    }
}

/// Run one m5.large in `subnet`.
pub async fn run_instance(
    cloud: &Ec2Cloud,
    subnet: &underlay_cloud::SubnetId,
) -> Fallible<underlay_cloud::InstanceId> {
    use aws_sdk_ec2::types as ec2;
    let id = cloud
        .client()
        .run_instances()
        .image_id(AMI)
        .instance_type(ec2::InstanceType::M5Large)
        .min_count(1)
        .max_count(1)
        .subnet_id(subnet.as_str())
        .send()
        .await
        .map_err(crate::classify_sdk_error)?
        .instances
        .unwrap_or_default()
        .into_iter()
        .next()
        .and_then(|i| i.instance_id)
        .ok_or_else(|| missing("InstanceId"))?;
    Ok(underlay_cloud::InstanceId::new(id))
}
