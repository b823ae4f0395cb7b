//! The shared Cloud contract suite on vpcsim, and the fixture that plugs vpcsim into it.

use ipnet::Ipv4Net;
use underlay_cloud::contract::{
    self, Capabilities, Fixture, FixtureResult, Outcome, World, WorldSpec,
};
use underlay_cloud::{Cloud, InstanceId, RouteTableId, RouteTarget, SubnetId, Tags};
use underlay_vpcsim::{RunInstance, VpcSim};

/// vpcsim as a contract backend: the world side is VpcSim's inherent set-up methods.
#[derive(Debug)]
struct SimFixture {
    sim: VpcSim,
}

#[async_trait::async_trait]
impl Fixture for SimFixture {
    fn name(&self) -> String {
        "vpcsim".to_owned()
    }
    fn cloud(&self) -> &dyn Cloud {
        &self.sim
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
    }
    async fn reset(&self) -> FixtureResult<()> {
        self.sim.reset();
        Ok(())
    }
    async fn create_world(&self, spec: &WorldSpec) -> FixtureResult<World> {
        let sim = &self.sim;
        let vpc = sim.create_vpc(spec.vpc_cidr, Tags::new())?;
        let subnets = spec
            .subnets
            .iter()
            .map(|s| sim.create_subnet(&vpc, &s.zone, s.cidr))
            .collect::<Result<Vec<SubnetId>, _>>()?;
        let security_group = sim.create_security_group(&vpc, Tags::new())?;
        let gateway = sim.create_internet_gateway(&vpc)?;
        let route_table = sim.create_route_table(&vpc, Tags::new())?;
        if let Some(limit) = spec.route_limit {
            sim.set_route_limit(&route_table, limit as usize)?;
        }
        for s in &subnets {
            sim.associate_route_table(&route_table, s)?;
        }
        sim.add_route(
            &route_table,
            "0.0.0.0/0".parse()?,
            &RouteTarget::Gateway(gateway.clone()),
        )?;
        Ok(World {
            vpc,
            subnets,
            route_table,
            gateway,
            security_group,
        })
    }
    async fn run_instance(
        &self,
        subnet: &SubnetId,
        instance_type: &str,
    ) -> FixtureResult<InstanceId> {
        Ok(self
            .sim
            .run_instance(RunInstance::new(instance_type, subnet))?
            .id)
    }
    async fn terminate_instance(&self, instance: &InstanceId) -> FixtureResult<()> {
        Ok(self.sim.terminate_instance(instance)?)
    }
    async fn add_routes(
        &self,
        table: &RouteTableId,
        destinations: &[Ipv4Net],
        target: &RouteTarget,
    ) -> FixtureResult<()> {
        for d in destinations {
            self.sim.add_route(table, *d, target)?;
        }
        Ok(())
    }
}

#[tokio::test]
async fn vpcsim_passes_the_whole_contract_suite() {
    // Pages of 5: every describe of more than five items is read page by page.
    let fx = SimFixture {
        sim: VpcSim::builder(7).page_size(5).build(),
    };
    let report = contract::run_all(&fx).await;
    println!("{report}");
    report.ensure_passed().unwrap();
    // vpcsim has every capability: nothing may be skipped.
    assert_eq!(report.skipped(), 0, "{report}");
    assert_eq!(report.passed(), contract::cases().len());
}

#[tokio::test]
async fn the_suite_passes_with_lowest_first_addresses_too() {
    let fx = SimFixture {
        sim: VpcSim::builder(1)
            .address_order(underlay_vpcsim::AddressOrder::Lowest)
            .build(),
    };
    contract::run_all(&fx).await.ensure_passed().unwrap();
}

#[tokio::test]
async fn moto_capabilities_skip_with_reasons() {
    // The runner skips what a backend lacks and says why; vpcsim stands in for a limited backend here.
    struct Limited(SimFixture);
    #[async_trait::async_trait]
    impl Fixture for Limited {
        fn name(&self) -> String {
            "limited".to_owned()
        }
        fn cloud(&self) -> &dyn Cloud {
            self.0.cloud()
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::moto_5_2()
        }
        async fn reset(&self) -> FixtureResult<()> {
            self.0.reset().await
        }
        async fn create_world(&self, spec: &WorldSpec) -> FixtureResult<World> {
            self.0.create_world(spec).await
        }
        async fn run_instance(&self, s: &SubnetId, t: &str) -> FixtureResult<InstanceId> {
            self.0.run_instance(s, t).await
        }
        async fn terminate_instance(&self, i: &InstanceId) -> FixtureResult<()> {
            self.0.terminate_instance(i).await
        }
        async fn add_routes(
            &self,
            t: &RouteTableId,
            d: &[Ipv4Net],
            target: &RouteTarget,
        ) -> FixtureResult<()> {
            self.0.add_routes(t, d, target).await
        }
    }
    let fx = Limited(SimFixture {
        sim: VpcSim::builder(3).build(),
    });
    let report = contract::run_all(&fx).await;
    report.ensure_passed().unwrap();
    let skipped: Vec<_> = report
        .cases
        .iter()
        .filter_map(|c| match &c.outcome {
            Outcome::Skipped(why) => Some((c.name.as_str(), why.as_str())),
            _ => None,
        })
        .collect();
    assert!(
        skipped
            .iter()
            .any(|(n, why)| *n == "route_limit_is_enforced" && why.contains("RouteLimit"))
    );
    assert!(
        skipped
            .iter()
            .any(|(n, _)| *n == "prefixes_are_aligned_28s")
    );
    assert!(report.passed() >= 12, "{report}");
}

/// The suite catches a backend that misbehaves: with stale describes (an eventual-consistency delay the
/// cases do not wait out) and a route table that accepts everything, the affected cases fail with messages.
#[tokio::test(start_paused = true)]
async fn the_suite_fails_a_misbehaving_backend() {
    let faults = underlay_vpcsim::Faults {
        describe_delay: std::time::Duration::from_secs(5),
        ..Default::default()
    };
    let fx = SimFixture {
        sim: VpcSim::builder(7).faults(faults).build(),
    };
    let report = contract::run_all(&fx).await;
    let failed = |name: &str| {
        report
            .cases
            .iter()
            .any(|c| c.name == name && matches!(c.outcome, Outcome::Failed(_)))
    };
    assert!(failed("create_replace_delete_route"), "{report}");
    assert!(failed("secondary_ips_by_count"), "{report}");
    assert!(report.ensure_passed().is_err());

    let fx = SimFixture {
        sim: VpcSim::builder(7).route_limit(10_000).build(),
    };
    // A limit the world spec cannot lower is a backend that does not enforce it.
    struct NoLimit(SimFixture);
    #[async_trait::async_trait]
    impl Fixture for NoLimit {
        fn name(&self) -> String {
            "no-limit".to_owned()
        }
        fn cloud(&self) -> &dyn Cloud {
            self.0.cloud()
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::all()
        }
        async fn reset(&self) -> FixtureResult<()> {
            self.0.reset().await
        }
        async fn create_world(&self, spec: &WorldSpec) -> FixtureResult<World> {
            let spec = WorldSpec {
                route_limit: None,
                ..spec.clone()
            };
            self.0.create_world(&spec).await
        }
        async fn run_instance(&self, s: &SubnetId, t: &str) -> FixtureResult<InstanceId> {
            self.0.run_instance(s, t).await
        }
        async fn terminate_instance(&self, i: &InstanceId) -> FixtureResult<()> {
            self.0.terminate_instance(i).await
        }
    }
    let report = contract::run_matching(&NoLimit(fx), "route_limit").await;
    assert_eq!(report.failed(), 1, "{report}");
}
