//! The shared Cloud contract suite, run against the aws-sdk-ec2 adapter over HTTP to moto server. One server for
//! the whole suite (the runner resets it with `POST /moto-api/reset` before each case); the guard kills it at
//! the end, panics included. Cases needing a behaviour moto lacks are skipped with the reason and run on
//! vpcsim only (crates/vpcsim/tests/contract.rs).

use aws_sdk_ec2::types as ec2;
use ipnet::Ipv4Net;
use underlay_cloud::contract::{
    self, Capabilities, Fixture, FixtureResult, Outcome, World, WorldSpec,
};
use underlay_cloud::queue::{QueueConfig, RateLimitedCloud};
use underlay_cloud::{
    Cloud, InstanceId, RouteTableId, RouteTarget, SecurityGroupId, SubnetId, VpcId,
};
use underlay_cloud_aws::moto::{AMI, MotoServer};
use underlay_cloud_aws::{AwsOptions, Ec2Cloud, classify_sdk_error};

#[derive(Debug)]
struct MotoFixture {
    server: MotoServer,
    /// Raw SDK access for the world set-up the port does not have.
    sdk: Ec2Cloud,
    /// The port under test: the adapter alone, or behind the rate-aware queue.
    cloud: Box<dyn Cloud>,
    name: &'static str,
}

fn missing(what: &str) -> Box<dyn std::error::Error + Send + Sync> {
    format!("moto reply without {what}").into()
}

#[async_trait::async_trait]
impl Fixture for MotoFixture {
    fn name(&self) -> String {
        self.name.to_owned()
    }

    fn cloud(&self) -> &dyn Cloud {
        &*self.cloud
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::moto_5_2()
    }

    async fn reset(&self) -> FixtureResult<()> {
        Ok(self.server.reset()?)
    }

    async fn create_world(&self, spec: &WorldSpec) -> FixtureResult<World> {
        let c = self.sdk.client();
        let vpc = c
            .create_vpc()
            .cidr_block(spec.vpc_cidr.to_string())
            .send()
            .await
            .map_err(classify_sdk_error)?
            .vpc
            .and_then(|v| v.vpc_id)
            .ok_or_else(|| missing("VpcId"))?;
        let mut subnets = Vec::new();
        for s in &spec.subnets {
            let id = c
                .create_subnet()
                .vpc_id(&vpc)
                .cidr_block(s.cidr.to_string())
                .availability_zone(&s.zone)
                .send()
                .await
                .map_err(classify_sdk_error)?
                .subnet
                .and_then(|s| s.subnet_id)
                .ok_or_else(|| missing("SubnetId"))?;
            subnets.push(SubnetId::new(id));
        }
        let security_group = c
            .create_security_group()
            .group_name("underlay-contract")
            .description("underlay contract suite")
            .vpc_id(&vpc)
            .send()
            .await
            .map_err(classify_sdk_error)?
            .group_id
            .ok_or_else(|| missing("GroupId"))?;
        let gateway = c
            .create_internet_gateway()
            .send()
            .await
            .map_err(classify_sdk_error)?
            .internet_gateway
            .and_then(|g| g.internet_gateway_id)
            .ok_or_else(|| missing("InternetGatewayId"))?;
        c.attach_internet_gateway()
            .internet_gateway_id(&gateway)
            .vpc_id(&vpc)
            .send()
            .await
            .map_err(classify_sdk_error)?;
        let table = c
            .create_route_table()
            .vpc_id(&vpc)
            .send()
            .await
            .map_err(classify_sdk_error)?
            .route_table
            .and_then(|t| t.route_table_id)
            .ok_or_else(|| missing("RouteTableId"))?;
        for s in &subnets {
            c.associate_route_table()
                .route_table_id(&table)
                .subnet_id(s.as_str())
                .send()
                .await
                .map_err(classify_sdk_error)?;
        }
        c.create_route()
            .route_table_id(&table)
            .destination_cidr_block("0.0.0.0/0")
            .gateway_id(&gateway)
            .send()
            .await
            .map_err(classify_sdk_error)?;
        Ok(World {
            vpc: VpcId::new(vpc),
            subnets,
            route_table: RouteTableId::new(table),
            gateway,
            security_group: SecurityGroupId::new(security_group),
        })
    }

    async fn run_instance(
        &self,
        subnet: &SubnetId,
        instance_type: &str,
    ) -> FixtureResult<InstanceId> {
        let id = self
            .sdk
            .client()
            .run_instances()
            .image_id(AMI)
            .instance_type(ec2::InstanceType::from(instance_type))
            .min_count(1)
            .max_count(1)
            .subnet_id(subnet.as_str())
            .send()
            .await
            .map_err(classify_sdk_error)?
            .instances
            .unwrap_or_default()
            .into_iter()
            .next()
            .and_then(|i| i.instance_id)
            .ok_or_else(|| missing("InstanceId"))?;
        Ok(InstanceId::new(id))
    }

    async fn add_routes(
        &self,
        table: &RouteTableId,
        destinations: &[Ipv4Net],
        target: &RouteTarget,
    ) -> FixtureResult<()> {
        // Past the queue (another tool's routes): the bare adapter, which moto never throttles.
        for d in destinations {
            self.sdk.create_route(table, *d, target).await?;
        }
        Ok(())
    }

    async fn terminate_instance(&self, instance: &InstanceId) -> FixtureResult<()> {
        let c = self.sdk.client();
        c.terminate_instances()
            .instance_ids(instance.as_str())
            .send()
            .await
            .map_err(classify_sdk_error)?;
        // moto terminates at once; still wait (bounded) for the state, as on EC2.
        for _ in 0..100 {
            let state = c
                .describe_instances()
                .instance_ids(instance.as_str())
                .send()
                .await
                .map_err(classify_sdk_error)?
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .find_map(|i| i.state().and_then(|s| s.name()).cloned());
            if state == Some(ec2::InstanceStateName::Terminated) {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Err(format!("{instance} not terminated after 10 s").into())
    }
}

async fn run_suite(fx: &MotoFixture) {
    let report = contract::run_all(fx).await;
    println!("{report}");
    report.ensure_passed().unwrap();
    // Every skip names what moto lacks; the rest ran.
    for c in &report.cases {
        if let Outcome::Skipped(why) = &c.outcome {
            assert!(why.contains("does not reproduce"), "{}: {why}", c.name);
        }
    }
    assert!(report.passed() >= 10, "{report}");
    assert_eq!(
        report.passed() + report.skipped(),
        contract::cases().len(),
        "{report}"
    );
}

#[tokio::test]
async fn the_adapter_passes_the_contract_suite_on_moto() {
    let server = MotoServer::start().unwrap_or_else(|e| panic!("{e}"));
    let sdk = server.cloud().await;
    // Pages of 5 (EC2's smallest MaxResults): where moto pages (DescribeInstances), the adapter follows them.
    let paged = Ec2Cloud::new(&AwsOptions {
        page_size: 5,
        ..server.options()
    })
    .await
    .expect("options carry a region");
    let fx = MotoFixture {
        cloud: Box::new(paged),
        sdk,
        server,
        name: "aws-sdk-ec2 → moto 5.2",
    };
    run_suite(&fx).await;
}

#[tokio::test]
async fn the_queued_adapter_passes_the_contract_suite_on_moto() {
    // The queue changes pacing and retries, never results.
    let server = MotoServer::start().unwrap_or_else(|e| panic!("{e}"));
    let sdk = server.cloud().await;
    let queued = RateLimitedCloud::new(sdk.clone(), QueueConfig::default());
    let fx = MotoFixture {
        cloud: Box::new(queued.clone()),
        sdk,
        server,
        name: "queue → aws-sdk-ec2 → moto 5.2",
    };
    run_suite(&fx).await;
    assert!(queued.stats().granted > 50);
    assert!(queued.stats().retries.is_empty(), "{:?}", queued.stats());
}
