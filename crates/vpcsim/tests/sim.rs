//! vpcsim's own behaviour: AWS token-bucket timing on tokio's paused clock, determinism, reserved addresses,
//! change events, fault injection and counters.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::time::Instant;
use underlay_cloud::{
    AddressRequest, Cloud, CreateEniRequest, EniFilter, EniId, ErrorKind, InstanceFilter,
    InstanceId, Operation, RateLimits, RouteState, RouteTableId, RouteTarget, SubnetId, Tags,
    VpcId,
};
use underlay_vpcsim::{ErrorRate, Event, Faults, Latency, RunInstance, VpcSim};

struct Mk {
    sim: VpcSim,
    vpc: VpcId,
    subnet: SubnetId,
    small: SubnetId,
    rtb: RouteTableId,
}

fn mk_world(sim: VpcSim) -> Mk {
    let vpc = sim.create_vpc(net("198.18.0.0/16"), Tags::new()).unwrap();
    let subnet = sim
        .create_subnet(&vpc, "us-east-1a", net("198.18.0.0/20"))
        .unwrap();
    let small = sim
        .create_subnet(&vpc, "us-east-1a", net("198.18.16.0/28"))
        .unwrap();
    let rtb = sim.create_route_table(&vpc, Tags::new()).unwrap();
    sim.associate_route_table(&rtb, &subnet).unwrap();
    Mk {
        sim,
        vpc,
        subnet,
        small,
        rtb,
    }
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn eni_req(subnet: &SubnetId, secondaries: u32) -> CreateEniRequest {
    CreateEniRequest {
        subnet: subnet.clone(),
        security_groups: vec![],
        description: String::new(),
        tags: Tags::new(),
        client_token: String::new(),
        secondary_ip_count: secondaries,
        prefix_count: 0,
    }
}

fn launch(m: &Mk, t: &str) -> (InstanceId, EniId) {
    let i = m.sim.run_instance(RunInstance::new(t, &m.subnet)).unwrap();
    let eni = i.primary_eni().unwrap().id.clone();
    (i.id, eni)
}

fn dst(k: u32) -> Ipv4Net {
    Ipv4Net::new(
        Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + (k << 8)),
        24,
    )
    .unwrap()
}

/// The bar: a burst of 300 mutating calls gets the first 50 at once, then exactly 5 per second.
#[tokio::test(start_paused = true)]
async fn burst_of_300_mutating_calls_follows_aws_token_bucket_timing() {
    let m = mk_world(VpcSim::builder(11).build());
    m.sim.set_route_limit(&m.rtb, 1_000).unwrap();
    let (_, eni) = launch(&m, "m5.large");
    let target = RouteTarget::NetworkInterface(eni);
    let t0 = Instant::now();
    let poll = Duration::from_millis(10);
    let mut done_at = Vec::new();
    for k in 0..300 {
        let mut tries = 0;
        loop {
            match m.sim.create_route(&m.rtb, dst(k), &target).await {
                Ok(()) => break,
                Err(e) => {
                    assert!(e.is_throttled(), "call {k}: {e}");
                    assert_eq!(e.code, "RequestLimitExceeded");
                    tries += 1;
                    assert!(tries < 100, "call {k} starved");
                    tokio::time::sleep(poll).await;
                }
            }
        }
        done_at.push(t0.elapsed());
    }
    for (k, t) in done_at.iter().enumerate() {
        if k < 50 {
            assert_eq!(*t, Duration::ZERO, "call {k} of the burst waited {t:?}");
        } else {
            // Token n (n = k − 49) arrives at n × 200 ms; a poller sees it within one poll period.
            let due = Duration::from_millis(200 * (k as u64 - 49));
            assert!(
                *t >= due && *t <= due + poll,
                "call {k} completed at {t:?}, due {due:?}"
            );
        }
    }
    assert_eq!(done_at[299], Duration::from_millis(200 * 250));
    let c = m.sim.counters();
    assert_eq!(
        c.calls_of(Operation::CreateRoute) - c.throttled_of(Operation::CreateRoute),
        300
    );
    assert!(c.throttled_of(Operation::CreateRoute) >= 250);
    assert_eq!(
        c.errors_of(Operation::CreateRoute, ErrorKind::Throttled),
        c.throttled_of(Operation::CreateRoute)
    );
}

#[tokio::test(start_paused = true)]
async fn concurrent_burst_admits_exactly_the_bucket_and_buckets_are_separate() {
    let m = mk_world(VpcSim::builder(12).build());
    m.sim.set_route_limit(&m.rtb, 1_000).unwrap();
    let (_, eni) = launch(&m, "m5.large");
    let mut tasks = Vec::new();
    for k in 0..300 {
        let sim = m.sim.clone();
        let (rtb, target) = (m.rtb.clone(), RouteTarget::NetworkInterface(eni.clone()));
        tasks.push(tokio::spawn(async move {
            sim.create_route(&rtb, dst(k), &target).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap().is_ok() as usize;
    }
    assert_eq!(ok, 50);
    // The mutating bucket is empty; CreateNetworkInterface has its own 100-token bucket, describes theirs.
    for i in 0..100 {
        m.sim
            .create_network_interface(&eni_req(&m.subnet, 0))
            .await
            .unwrap_or_else(|e| panic!("ENI {i}: {e}"));
    }
    let e = m
        .sim
        .create_network_interface(&eni_req(&m.subnet, 0))
        .await
        .unwrap_err();
    assert!(e.is_throttled());
    for _ in 0..100 {
        m.sim.describe_subnets(&m.vpc).await.unwrap();
    }
    assert!(
        m.sim
            .describe_subnets(&m.vpc)
            .await
            .unwrap_err()
            .is_throttled()
    );
    // One second refills 20 describe tokens, 5 ENI tokens.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let describes = {
        let mut n = 0;
        while m.sim.describe_subnets(&m.vpc).await.is_ok() {
            n += 1;
        }
        n
    };
    assert_eq!(describes, 20);
    let mut enis = 0;
    while m
        .sim
        .create_network_interface(&eni_req(&m.subnet, 0))
        .await
        .is_ok()
    {
        enis += 1;
    }
    assert_eq!(enis, 5);
    // Unfiltered, unpaginated describes draw from a 50-token bucket of their own.
    for _ in 0..50 {
        m.sim
            .describe_network_interfaces_page(&EniFilter::default(), None, None)
            .await
            .unwrap();
    }
    assert!(
        m.sim
            .describe_network_interfaces_page(&EniFilter::default(), None, None)
            .await
            .unwrap_err()
            .is_throttled()
    );
    // The same describe with MaxResults is paginated: the larger bucket, which still has tokens.
    m.sim
        .describe_network_interfaces_page(&EniFilter::default(), Some(5), None)
        .await
        .unwrap();
}

#[tokio::test]
async fn describes_page_like_ec2_and_the_port_reads_every_page() {
    let sim = VpcSim::builder(2).rate_limits(None).page_size(5).build();
    let m = mk_world(sim);
    // 12 more route tables: 13 tables with the main one... plus the world's own.
    for _ in 0..12 {
        m.sim.create_route_table(&m.vpc, Tags::new()).unwrap();
    }
    let all = m.sim.describe_route_tables(&m.vpc).await.unwrap();
    assert!(all.len() >= 13, "{}", all.len());
    let pages = m.sim.counters().calls_of(Operation::DescribeRouteTables);
    assert_eq!(pages as usize, all.len().div_ceil(5), "one call per page");
    // Page by page by hand: 5 at most, a token until the last.
    let p1 = m
        .sim
        .describe_route_tables_page(&m.vpc, Some(5), None)
        .await
        .unwrap();
    assert_eq!(p1.items.len(), 5);
    let token = p1.next_token.clone().unwrap();
    let p2 = m
        .sim
        .describe_route_tables_page(&m.vpc, Some(5), Some(&token))
        .await
        .unwrap();
    assert!(
        p2.items
            .iter()
            .all(|t| !p1.items.iter().any(|u| u.id == t.id))
    );
    // EC2's bounds: 5..=100 for route tables; ids and MaxResults together are refused.
    for bad in [4, 101] {
        let e = m
            .sim
            .describe_route_tables_page(&m.vpc, Some(bad), None)
            .await
            .unwrap_err();
        assert_eq!(e.code, "InvalidParameterValue");
    }
    let e = m
        .sim
        .describe_instances_page(
            &InstanceFilter {
                ids: vec![InstanceId::new("i-0123456789abcdef0")],
                vpc: None,
            },
            Some(5),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "InvalidParameterCombination");
}

#[tokio::test]
async fn rate_limits_are_configurable_and_can_be_off() {
    let m = mk_world(VpcSim::builder(1).rate_limits(None).build());
    for _ in 0..500 {
        m.sim.describe_subnets(&m.vpc).await.unwrap();
    }
    m.sim
        .set_rate_limits(Some(RateLimits::aws_default().scaled(0.1)));
    for _ in 0..10 {
        m.sim.describe_subnets(&m.vpc).await.unwrap();
    }
    assert!(
        m.sim
            .describe_subnets(&m.vpc)
            .await
            .unwrap_err()
            .is_throttled()
    );
}

async fn scripted(seed: u64) -> underlay_vpcsim::Snapshot {
    let m = mk_world(VpcSim::builder(seed).build());
    let (i, _) = launch(&m, "m5.xlarge");
    let e = m
        .sim
        .create_network_interface(&eni_req(&m.subnet, 3))
        .await
        .unwrap();
    m.sim
        .attach_network_interface(&e.id, &i, 1, true)
        .await
        .unwrap();
    m.sim
        .assign_prefixes(&e.id, &AddressRequest::Count(2))
        .await
        .unwrap();
    m.sim
        .create_route(
            &m.rtb,
            net("100.64.0.0/24"),
            &RouteTarget::NetworkInterface(e.id),
        )
        .await
        .unwrap();
    m.sim.snapshot()
}

#[tokio::test]
async fn same_seed_same_region() {
    let a = scripted(42).await;
    let b = scripted(42).await;
    assert_eq!(a, b);
    let c = scripted(43).await;
    assert_ne!(a.enis, c.enis);
    let id = a.enis[0].id.as_str();
    assert!(id.starts_with("eni-") && id.len() == 21, "{id}");
    assert!(
        id[4..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    let mac = &a.enis[0].mac;
    assert_eq!(mac.len(), 17);
    assert_eq!(
        u8::from_str_radix(&mac[..2], 16).unwrap() & 0x03,
        0x02,
        "locally administered unicast {mac}"
    );
}

#[tokio::test]
async fn subnets_keep_five_reserved_addresses() {
    let m = mk_world(VpcSim::builder(5).build());
    let subnets = m.sim.describe_subnets(&m.vpc).await.unwrap();
    let small = subnets.iter().find(|s| s.id == m.small).unwrap();
    assert_eq!(small.available_ips, 11);
    let e = m
        .sim
        .create_network_interface(&eni_req(&m.small, 10))
        .await
        .unwrap();
    let mut all: Vec<u8> = std::iter::once(e.primary_ip)
        .chain(e.secondary_ips.iter().copied())
        .map(|a| a.octets()[3])
        .collect();
    all.sort();
    assert_eq!(all, (4..=14).collect::<Vec<u8>>());
    let err = m
        .sim
        .create_network_interface(&eni_req(&m.small, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code, "InsufficientFreeAddressesInSubnet");
    assert!(err.is_insufficient_addresses());
    // Explicit reserved addresses are refused.
    m.sim
        .unassign_private_ips(&e.id, &[e.secondary_ips[0]])
        .await
        .unwrap();
    for reserved in [0, 1, 2, 3, 15] {
        let r = m
            .sim
            .assign_private_ips(
                &e.id,
                &AddressRequest::Explicit(vec![Ipv4Addr::new(198, 18, 16, reserved)]),
            )
            .await;
        assert_eq!(r.unwrap_err().code, "InvalidParameterValue", ".{reserved}");
    }
}

#[tokio::test]
async fn explicit_addresses_in_use_or_repeated_are_refused() {
    let m = mk_world(VpcSim::builder(5).build());
    let a = m
        .sim
        .create_network_interface(&eni_req(&m.subnet, 0))
        .await
        .unwrap();
    let b = m
        .sim
        .create_network_interface(&eni_req(&m.subnet, 0))
        .await
        .unwrap();
    let taken = m
        .sim
        .assign_private_ips(&b.id, &AddressRequest::Explicit(vec![a.primary_ip]))
        .await
        .unwrap_err();
    assert_eq!(
        (taken.code.as_str(), taken.kind),
        ("InvalidIPAddress.InUse", ErrorKind::AlreadyExists)
    );
    let free = Ipv4Addr::new(198, 18, 15, 200);
    let twice = m
        .sim
        .assign_private_ips(&b.id, &AddressRequest::Explicit(vec![free, free]))
        .await
        .unwrap_err();
    assert_eq!(twice.code, "InvalidParameterValue");
    // Nothing was taken by the failed calls.
    m.sim
        .assign_private_ips(&b.id, &AddressRequest::Explicit(vec![free]))
        .await
        .unwrap();
    let outside = m
        .sim
        .assign_private_ips(
            &b.id,
            &AddressRequest::Explicit(vec![Ipv4Addr::new(198, 18, 16, 5)]),
        )
        .await
        .unwrap_err();
    assert_eq!(outside.code, "InvalidParameterValue");
}

#[tokio::test]
async fn events_describe_every_change_in_order() {
    let m = mk_world(VpcSim::builder(9).build());
    let mut rx = m.sim.subscribe();
    let (i, primary) = launch(&m, "m5.large");
    let e = m
        .sim
        .create_network_interface(&eni_req(&m.subnet, 0))
        .await
        .unwrap();
    m.sim
        .attach_network_interface(&e.id, &i, 1, false)
        .await
        .unwrap();
    let added = m
        .sim
        .assign_private_ips(&e.id, &AddressRequest::Count(2))
        .await
        .unwrap();
    m.sim.set_source_dest_check(&primary, false).await.unwrap();
    let target = RouteTarget::NetworkInterface(primary.clone());
    m.sim
        .create_route(&m.rtb, net("100.64.0.0/24"), &target)
        .await
        .unwrap();
    m.sim.terminate_instance(&i).unwrap();

    let mut got = Vec::new();
    while let Ok(c) = rx.try_recv() {
        got.push(c);
    }
    for w in got.windows(2) {
        assert_eq!(w[1].seq, w[0].seq + 1);
    }
    assert_eq!(m.sim.snapshot().seq, got.last().unwrap().seq);
    let events: Vec<Event> = got.into_iter().map(|c| c.event).collect();
    let mac = m
        .sim
        .snapshot()
        .enis
        .iter()
        .find(|x| x.id == e.id)
        .unwrap()
        .mac
        .clone();
    let expected_attach = Event::EniAttached {
        eni: e.id.clone(),
        attachment: match &events[4] {
            Event::EniAttached { attachment, .. } => attachment.clone(),
            other => panic!("event 4 is {other:?}"),
        },
        instance: i.clone(),
        device_index: 1,
        mac,
        subnet: m.subnet.clone(),
    };
    assert!(matches!(events[0], Event::EniCreated { .. }));
    assert!(
        matches!(&events[1], Event::EniAttached { device_index: 0, eni, .. } if *eni == primary)
    );
    assert!(matches!(&events[2], Event::InstanceLaunched { instance, .. } if *instance == i));
    assert!(matches!(&events[3], Event::EniCreated { eni, .. } if *eni == e.id));
    assert_eq!(events[4], expected_attach);
    assert_eq!(
        events[5],
        Event::AddressesAssigned {
            eni: e.id.clone(),
            addresses: added
        }
    );
    assert_eq!(
        events[6],
        Event::SourceDestCheckChanged {
            eni: primary.clone(),
            enabled: false
        }
    );
    assert_eq!(
        events[7],
        Event::RouteChanged {
            table: m.rtb.clone(),
            destination: net("100.64.0.0/24"),
            old: None,
            new: Some(target)
        }
    );
    // Terminate: primary detached and deleted (DeleteOnTermination), the other detached and kept.
    let tail: Vec<&Event> = events[8..].iter().collect();
    assert!(matches!(tail[0], Event::EniDetached { eni, device_index: 0, .. } if *eni == primary));
    assert!(matches!(tail[1], Event::EniDeleted { eni } if *eni == primary));
    assert!(matches!(tail[2], Event::EniDetached { eni, device_index: 1, .. } if *eni == e.id));
    assert!(matches!(tail[3], Event::InstanceTerminated { instance } if *instance == i));
    assert_eq!(tail.len(), 4);
    // Events serialise for the lab's logs.
    serde_json::to_string(&events).unwrap();
}

#[tokio::test]
async fn routes_blackhole_when_their_target_goes() {
    let m = mk_world(VpcSim::builder(2).build());
    let (i, primary) = launch(&m, "m5.large");
    let loose = m
        .sim
        .create_network_interface(&eni_req(&m.subnet, 0))
        .await
        .unwrap();
    m.sim
        .create_route(
            &m.rtb,
            net("100.64.0.0/24"),
            &RouteTarget::NetworkInterface(primary),
        )
        .await
        .unwrap();
    m.sim
        .create_route(
            &m.rtb,
            net("100.64.1.0/24"),
            &RouteTarget::NetworkInterface(loose.id),
        )
        .await
        .unwrap();
    let state = |tables: Vec<underlay_cloud::RouteTable>, d: &str| {
        tables
            .into_iter()
            .find(|t| t.id == m.rtb)
            .unwrap()
            .routes
            .into_iter()
            .find(|r| r.destination == net(d))
            .unwrap()
            .state
    };
    let t = m.sim.describe_route_tables(&m.vpc).await.unwrap();
    assert_eq!(state(t.clone(), "100.64.0.0/24"), RouteState::Active);
    assert_eq!(
        state(t, "100.64.1.0/24"),
        RouteState::Blackhole,
        "an unattached ENI is no next hop"
    );
    m.sim.terminate_instance(&i).unwrap();
    let t = m.sim.describe_route_tables(&m.vpc).await.unwrap();
    assert_eq!(state(t, "100.64.0.0/24"), RouteState::Blackhole);
}

#[tokio::test(start_paused = true)]
async fn injected_errors_latency_and_throttling() {
    let m = mk_world(VpcSim::builder(4).rate_limits(None).build());
    let (_, eni) = launch(&m, "m5.large");
    // Every call of one operation fails with the given code.
    m.sim.update_faults(|f| {
        f.error_rates.insert(
            Operation::AssignPrivateIpAddresses,
            ErrorRate {
                probability: 1.0,
                code: "InternalError".into(),
            },
        );
    });
    let e = m
        .sim
        .assign_private_ips(&eni, &AddressRequest::Count(1))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code.as_str(), e.kind),
        ("InternalError", ErrorKind::Service)
    );
    // A rate of 0.3 fails some calls and not others, deterministically for a seed.
    m.sim.update_faults(|f| {
        f.error_rates
            .get_mut(&Operation::AssignPrivateIpAddresses)
            .unwrap()
            .probability = 0.3;
    });
    let mut failed = 0;
    for _ in 0..8 {
        failed += m
            .sim
            .assign_private_ips(&eni, &AddressRequest::Count(1))
            .await
            .is_err() as u32;
    }
    assert!(failed > 0 && failed < 8, "{failed} of 8 failed at rate 0.3");
    m.sim.set_faults(Faults::default());

    // Fixed latency is slept on tokio's clock.
    m.sim
        .update_faults(|f| f.latency = Latency::Fixed(Duration::from_millis(250)));
    let t = Instant::now();
    m.sim.describe_vpc(&m.vpc).await.unwrap();
    assert_eq!(t.elapsed(), Duration::from_millis(250));
    m.sim.update_faults(|f| {
        f.latency = Latency::None;
        f.op_latency.insert(
            Operation::DescribeSubnets,
            Latency::Uniform {
                min: Duration::from_millis(10),
                max: Duration::from_millis(20),
            },
        );
    });
    let t = Instant::now();
    m.sim.describe_subnets(&m.vpc).await.unwrap();
    assert!((Duration::from_millis(10)..=Duration::from_millis(20)).contains(&t.elapsed()));
    let t = Instant::now();
    m.sim.describe_vpc(&m.vpc).await.unwrap();
    assert_eq!(t.elapsed(), Duration::ZERO);

    // Forced throttling, and scripted failures of the next calls.
    m.sim.update_faults(|f| {
        f.op_latency.clear();
        f.throttled.insert(Operation::DescribeVpcs);
    });
    assert!(m.sim.describe_vpc(&m.vpc).await.unwrap_err().is_throttled());
    assert!(m.sim.describe_subnets(&m.vpc).await.is_ok());
    m.sim.update_faults(|f| f.throttle_all = true);
    assert!(
        m.sim
            .describe_subnets(&m.vpc)
            .await
            .unwrap_err()
            .is_throttled()
    );
    m.sim.set_faults(Faults::default());
    m.sim
        .fail_next(Operation::DescribeSubnets, "UnauthorizedOperation");
    assert_eq!(
        m.sim.describe_subnets(&m.vpc).await.unwrap_err().kind,
        ErrorKind::Unauthorized
    );
    assert!(m.sim.describe_subnets(&m.vpc).await.is_ok());

    let c = m.sim.counters();
    assert_eq!(
        c.errors_of(Operation::DescribeSubnets, ErrorKind::Unauthorized),
        1
    );
    assert_eq!(c.throttled_of(Operation::DescribeVpcs), 1);
    assert_eq!(
        c.errors_of(Operation::AssignPrivateIpAddresses, ErrorKind::Service),
        1 + failed as u64
    );
    let json = serde_json::to_value(&c).unwrap();
    assert!(json["calls"]["DescribeSubnets"].as_u64().unwrap() >= 4);
}

#[tokio::test(start_paused = true)]
async fn describes_are_eventually_consistent_under_delay() {
    let m = mk_world(VpcSim::builder(6).rate_limits(None).build());
    m.sim
        .update_faults(|f| f.describe_delay = Duration::from_secs(2));
    let e = m
        .sim
        .create_network_interface(&eni_req(&m.subnet, 0))
        .await
        .unwrap();
    let by_id = EniFilter {
        ids: vec![e.id.clone()],
        ..Default::default()
    };
    assert!(
        m.sim
            .describe_network_interfaces(&by_id)
            .await
            .unwrap_err()
            .is_not_found()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    m.sim.set_source_dest_check(&e.id, false).await.unwrap();
    assert!(
        m.sim
            .describe_network_interfaces(&by_id)
            .await
            .unwrap_err()
            .is_not_found()
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let seen = m.sim.describe_network_interfaces(&by_id).await.unwrap();
    assert!(
        seen[0].source_dest_check,
        "the later change is not visible yet"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = m.sim.describe_network_interfaces(&by_id).await.unwrap();
    assert!(!seen[0].source_dest_check);
    // Mutations see the live state at once: the ENI could be deleted right after creation.
    assert!(m.sim.snapshot().enis.iter().any(|x| x.id == e.id));
}

#[tokio::test]
async fn attach_with_delete_on_termination_is_two_calls() {
    let m = mk_world(VpcSim::builder(8).build());
    let (i, _) = launch(&m, "m5.large");
    let sim = &m.sim;
    let a = sim
        .create_network_interface(&eni_req(&m.subnet, 0))
        .await
        .unwrap();
    let b = sim
        .create_network_interface(&eni_req(&m.subnet, 0))
        .await
        .unwrap();
    // Now allow exactly one ModifyNetworkInterfaceAttribute.
    sim.set_rate_limits(Some(RateLimits {
        resource: underlay_cloud::BucketLimits {
            capacity: 1.0,
            refill_per_sec: 0.0,
        },
        ..RateLimits::aws_default()
    }));
    sim.attach_network_interface(&a.id, &i, 1, true)
        .await
        .unwrap();
    // The attach of `b` succeeds, its DeleteOnTermination call is throttled: as in EC2, the ENI stays attached
    // without the flag, and the caller sees the error.
    let err = sim
        .attach_network_interface(&b.id, &i, 2, true)
        .await
        .unwrap_err();
    assert!(err.is_throttled());
    let snap = sim.snapshot();
    let att = |id: &EniId| {
        snap.enis
            .iter()
            .find(|e| &e.id == id)
            .unwrap()
            .attachment
            .clone()
            .unwrap()
    };
    assert!(att(&a.id).delete_on_termination);
    assert!(!att(&b.id).delete_on_termination);
    let c = sim.counters();
    assert_eq!(c.calls_of(Operation::AttachNetworkInterface), 2);
    assert_eq!(c.calls_of(Operation::ModifyNetworkInterfaceAttribute), 2);
}

#[tokio::test]
async fn limits_of_real_instance_types() {
    let m = mk_world(VpcSim::builder(10).rate_limits(None).build());
    let infos = m.sim.describe_instance_types(&[]).await.unwrap();
    assert!(infos.len() >= 25);
    let (big, _) = launch(&m, "m5.24xlarge");
    for d in 1..15 {
        let e = m
            .sim
            .create_network_interface(&eni_req(&m.subnet, 49))
            .await
            .unwrap();
        m.sim
            .attach_network_interface(&e.id, &big, d, true)
            .await
            .unwrap();
    }
    let e = m
        .sim
        .create_network_interface(&eni_req(&m.subnet, 0))
        .await
        .unwrap();
    let err = m
        .sim
        .attach_network_interface(&e.id, &big, 15, true)
        .await
        .unwrap_err();
    assert_eq!(err.code, "AttachmentLimitExceeded");
    // Device indexes beyond the type's count are refused even with free slots.
    let (small, _) = launch(&m, "c6g.medium");
    let err = m
        .sim
        .attach_network_interface(&e.id, &small, 5, true)
        .await
        .unwrap_err();
    assert_eq!(err.code, "AttachmentLimitExceeded");
    assert_eq!(
        m.sim
            .run_instance(RunInstance::new("x1.nope", &m.subnet))
            .unwrap_err()
            .code,
        "InvalidInstanceType"
    );
    // Prefixes take IPv4 slots: c6g.medium has 4 per ENI, the primary takes one.
    let p = m
        .sim
        .describe_instances(&underlay_cloud::InstanceFilter {
            ids: vec![small],
            vpc: None,
        })
        .await
        .unwrap()[0]
        .primary_eni()
        .unwrap()
        .id
        .clone();
    m.sim
        .assign_prefixes(&p, &AddressRequest::Count(2))
        .await
        .unwrap();
    m.sim
        .assign_private_ips(&p, &AddressRequest::Count(1))
        .await
        .unwrap();
    assert_eq!(
        m.sim
            .assign_prefixes(&p, &AddressRequest::Count(1))
            .await
            .unwrap_err()
            .code,
        "PrivateIpAddressLimitExceeded"
    );
}

/// The AWS-like route model: route calls take 100–300 ms of tokio time, and the change event of a route is
/// effective 200–500 ms after it was made; other events are effective at once, and without the model so is a
/// route's.
#[tokio::test(start_paused = true)]
async fn aws_route_model_delays_route_calls_and_their_propagation() {
    let m = mk_world(VpcSim::builder(8).rate_limits(None).build());
    let (_, a) = launch(&m, "m5.large");
    let (_, b) = launch(&m, "m5.large");
    let mut rx = m.sim.subscribe();
    // Off (the default): a route change is effective when made.
    m.sim
        .create_route(&m.rtb, dst(0), &RouteTarget::NetworkInterface(a.clone()))
        .await
        .unwrap();
    let c = rx.try_recv().unwrap();
    assert!(matches!(c.event, Event::RouteChanged { .. }));
    assert!(c.at.is_some());
    assert_eq!(c.effective_at, c.at);

    m.sim
        .update_faults(|f| *f = std::mem::take(f).aws_route_model());
    let calls = Duration::from_millis(100)..=Duration::from_millis(300);
    let propagation = Duration::from_millis(200)..=Duration::from_millis(500);
    let mut spread = std::collections::BTreeSet::new();
    for k in 0..20u32 {
        let target = RouteTarget::NetworkInterface(if k % 2 == 0 { b.clone() } else { a.clone() });
        let t = Instant::now();
        m.sim.replace_route(&m.rtb, dst(0), &target).await.unwrap();
        let took = t.elapsed();
        assert!(calls.contains(&took), "ReplaceRoute took {took:?}");
        let c = rx.try_recv().unwrap();
        assert!(matches!(c.event, Event::RouteChanged { .. }));
        let delay = c.effective_at.unwrap() - c.at.unwrap();
        assert!(propagation.contains(&delay), "propagation {delay:?}");
        spread.insert(delay);
    }
    assert!(spread.len() > 10, "propagation is drawn per change");
    let t = Instant::now();
    m.sim.describe_route_tables(&m.vpc).await.unwrap();
    assert!(calls.contains(&t.elapsed()));
    // Other operations and other events keep their timing.
    let t = Instant::now();
    m.sim.describe_vpc(&m.vpc).await.unwrap();
    assert_eq!(t.elapsed(), Duration::ZERO);
    m.sim
        .run_instance(RunInstance::new("m5.large", &m.subnet))
        .unwrap();
    while let Ok(c) = rx.try_recv() {
        assert!(!matches!(c.event, Event::RouteChanged { .. }));
        assert_eq!(c.effective_at, c.at);
    }
    // The knob round-trips through serde, and an old document without it still reads.
    let f = m.sim.faults();
    let json = serde_json::to_value(&f).unwrap();
    let back: Faults = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back, f);
    let mut old = json;
    old.as_object_mut().unwrap().remove("route_propagation");
    let back: Faults = serde_json::from_value(old).unwrap();
    assert_eq!(back.route_propagation, Latency::None);
}
