//! Pure tests (no root): the model kept by changes equals the model from a snapshot, and plan/diff produce
//! exactly the kernel changes each EC2 change calls for.

use ipnet::Ipv4Net;
use underlay_cloud::{
    AddressRequest, Cloud, CreateEniRequest, RouteTableId, RouteTarget, SubnetId,
};
use underlay_core::names::{LAB_RULE_PRIORITY_VPC, LAB_TABLE_OWNED};
use underlay_lab::model::Applied;
use underlay_lab::names::vpc_table;
use underlay_lab::plan::RouteAction;
use underlay_lab::{FabricSpec, LabId, Model, Op, diff, plan_fabric};
use underlay_vpcsim::{AddressOrder, RunInstance, VpcSim};

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

struct Region {
    sim: VpcSim,
    main: RouteTableId,
    a: SubnetId,
    b: SubnetId,
}

fn mk_region() -> Region {
    let sim = VpcSim::builder(3)
        .rate_limits(None)
        .address_order(AddressOrder::Lowest)
        .build();
    let vpc = sim
        .create_vpc(net("198.18.0.0/16"), Default::default())
        .unwrap();
    let a = sim
        .create_subnet(&vpc, "us-east-1a", net("198.18.0.0/24"))
        .unwrap();
    let b = sim
        .create_subnet(&vpc, "us-east-1b", net("198.18.1.0/24"))
        .unwrap();
    let main = sim.main_route_table(&vpc).unwrap();
    Region { sim, main, a, b }
}

fn lab() -> LabId {
    LabId::new("t").unwrap()
}

fn plan(m: &Model) -> FabricSpec {
    plan_fabric(&lab(), m, true).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn changes_keep_the_model_equal_to_a_snapshot() {
    let rt = rt();
    let sim = VpcSim::builder(9).rate_limits(None).build();
    let mut rx = sim.subscribe();
    let mut model = Model::from_snapshot(&sim.snapshot());
    let vpc = sim
        .create_vpc(net("198.18.0.0/16"), Default::default())
        .unwrap();
    let a = sim
        .create_subnet(&vpc, "us-east-1a", net("198.18.0.0/20"))
        .unwrap();
    let b = sim
        .create_subnet(&vpc, "us-east-1b", net("198.18.16.0/20"))
        .unwrap();
    let rtb = sim.create_route_table(&vpc, Default::default()).unwrap();
    sim.associate_route_table(&rtb, &b).unwrap();
    let igw = sim.create_internet_gateway(&vpc).unwrap();
    sim.add_route(&rtb, net("0.0.0.0/0"), &RouteTarget::Gateway(igw))
        .unwrap();
    let i1 = sim.run_instance(RunInstance::new("m5.large", &a)).unwrap();
    let i2 = sim.run_instance(RunInstance::new("m5.large", &b)).unwrap();
    let e1 = i1.primary_eni().unwrap().id.clone();
    rt.block_on(async {
        let eni = sim
            .create_network_interface(&CreateEniRequest {
                subnet: a.clone(),
                security_groups: vec![],
                description: "extra".into(),
                tags: Default::default(),
                client_token: "tok".into(),
                secondary_ip_count: 2,
                prefix_count: 1,
            })
            .await
            .unwrap();
        sim.attach_network_interface(&eni.id, &i1.id, 1, true)
            .await
            .unwrap();
        let got = sim
            .assign_private_ips(&e1, &AddressRequest::Count(3))
            .await
            .unwrap();
        sim.unassign_private_ips(&e1, &got[..1]).await.unwrap();
        let p = sim
            .assign_prefixes(&e1, &AddressRequest::Count(2))
            .await
            .unwrap();
        sim.unassign_prefixes(&e1, &p[..1]).await.unwrap();
        sim.set_source_dest_check(&e1, false).await.unwrap();
        let main = sim.main_route_table(&vpc).unwrap();
        let to = RouteTarget::NetworkInterface(e1.clone());
        sim.create_route(&main, net("100.64.0.0/24"), &to)
            .await
            .unwrap();
        sim.create_route(&main, net("100.64.1.0/24"), &to)
            .await
            .unwrap();
        let to2 = RouteTarget::NetworkInterface(i2.primary_eni().unwrap().id.clone());
        sim.replace_route(&main, net("100.64.0.0/24"), &to2)
            .await
            .unwrap();
        sim.delete_route(&main, net("100.64.1.0/24")).await.unwrap();
    });
    sim.terminate_instance(&i2.id).unwrap();

    while let Ok(change) = rx.try_recv() {
        assert_eq!(model.apply(&change), Applied::Yes, "{change:?}");
    }
    assert_eq!(model, Model::from_snapshot(&sim.snapshot()));
    // The plans agree too, and a second plan of the same model changes nothing.
    let spec = plan(&model);
    assert!(diff(&spec, &plan(&Model::from_snapshot(&sim.snapshot()))).is_empty());
}

#[test]
fn stale_and_missed_changes_are_told_apart() {
    let r = mk_region();
    let mut rx = r.sim.subscribe();
    let mut model = Model::from_snapshot(&r.sim.snapshot());
    r.sim
        .run_instance(RunInstance::new("m5.large", &r.a))
        .unwrap();
    let first = rx.try_recv().unwrap();
    let second = rx.try_recv().unwrap();
    let third = rx.try_recv().unwrap();
    assert_eq!(model.apply(&first), Applied::Yes);
    assert_eq!(model.apply(&first), Applied::Stale);
    assert_eq!(model.apply(&third), Applied::Gap);
    assert_eq!(model.apply(&second), Applied::Yes);
}

#[test]
fn a_fresh_fabric_is_built_in_dependency_order() {
    let r = mk_region();
    let i = r
        .sim
        .run_instance(RunInstance::new("m5.large", &r.a))
        .unwrap();
    let spec = plan(&Model::from_snapshot(&r.sim.snapshot()));
    let ops = diff(&FabricSpec::default(), &spec);
    let pos = |f: &dyn Fn(&Op) -> bool| ops.iter().position(f).unwrap();
    let bridge = pos(&|o| matches!(o, Op::AddBridge { .. }));
    let instance = pos(&|o| matches!(o, Op::AddInstance { .. }));
    let port = pos(&|o| matches!(o, Op::AddPort { .. }));
    let neigh = pos(&|o| matches!(o, Op::SetNeighbour { .. }));
    let route = pos(&|o| matches!(o, Op::SetRoute { .. }));
    let rule = pos(&|o| matches!(o, Op::AddRule(_)));
    assert!(bridge < instance && instance < port && port < neigh && neigh < route && route < rule);
    assert!(matches!(ops.last(), Some(Op::SetNft(_))));
    assert!(diff(&spec, &spec).is_empty());

    let port = spec.ports.values().next().unwrap();
    assert_eq!(port.mac, i.primary_eni().unwrap().mac);
    assert_eq!(port.ifname, "eth0");
    assert_eq!(port.address, Some(Ipv4Net::new(i.private_ip, 24).unwrap()));
    assert_eq!(port.gateway, Some("198.18.0.1".parse().unwrap()));
    // Each subnet: owned table first, then its VPC table.
    let table = vpc_table(&r.main);
    assert!(
        spec.rules
            .iter()
            .any(|x| x.priority == LAB_RULE_PRIORITY_VPC && x.table == table)
    );
    assert!(
        spec.rules
            .iter()
            .any(|x| x.table == LAB_TABLE_OWNED && x.iif == "lo")
    );
}

#[test]
fn each_change_maps_to_its_own_kernel_change() {
    let rt = rt();
    let r = mk_region();
    let a = r
        .sim
        .run_instance(RunInstance::new("m5.large", &r.a))
        .unwrap();
    let b = r
        .sim
        .run_instance(RunInstance::new("m5.large", &r.b))
        .unwrap();
    let (ea, eb) = (
        a.primary_eni().unwrap().id.clone(),
        b.primary_eni().unwrap().id.clone(),
    );
    let mut have = plan(&Model::from_snapshot(&r.sim.snapshot()));
    let step = |have: &mut FabricSpec| {
        let want = plan(&Model::from_snapshot(&r.sim.snapshot()));
        let ops = diff(have, &want);
        *have = want;
        ops
    };

    // Source/dest check: nftables only.
    rt.block_on(r.sim.set_source_dest_check(&ea, false))
        .unwrap();
    let ops = step(&mut have);
    let port_a = lab().eni_port(&ea);
    assert!(
        matches!(ops.as_slice(), [Op::SetNft(n)] if !n.checked.contains(&port_a) && n.owned.contains_key(&port_a)),
        "{ops:?}"
    );

    // A route: one route in the subnet's table, via the ENI's primary address.
    let table = vpc_table(&r.main);
    let to_a = RouteTarget::NetworkInterface(ea.clone());
    rt.block_on(r.sim.create_route(&r.main, net("100.64.0.0/26"), &to_a))
        .unwrap();
    let ops = step(&mut have);
    assert_eq!(
        ops,
        vec![Op::SetRoute {
            table,
            dst: net("100.64.0.0/26"),
            action: RouteAction::Via {
                dev: lab().subnet_bridge(&r.a),
                via: a.private_ip
            }
        }]
    );
    // ReplaceRoute: the same route, replaced in place.
    let to_b = RouteTarget::NetworkInterface(eb.clone());
    rt.block_on(r.sim.replace_route(&r.main, net("100.64.0.0/26"), &to_b))
        .unwrap();
    let ops = step(&mut have);
    assert!(
        matches!(ops.as_slice(), [Op::SetRoute { action: RouteAction::Via { via, .. }, .. }] if *via == b.private_ip),
        "{ops:?}"
    );

    // A /28 prefix: one owned route, 16 neighbours (the fabric's ARP answers), and the nft sets.
    let p = rt
        .block_on(r.sim.assign_prefixes(&ea, &AddressRequest::Count(1)))
        .unwrap()[0];
    let ops = step(&mut have);
    let neighbours = ops
        .iter()
        .filter(|o| matches!(o, Op::SetNeighbour { .. }))
        .count();
    assert_eq!(neighbours, 16);
    assert!(ops.contains(&Op::SetRoute {
        table: LAB_TABLE_OWNED,
        dst: p,
        action: RouteAction::Dev {
            dev: lab().subnet_bridge(&r.a)
        }
    }));
    assert!(matches!(ops.last(), Some(Op::SetNft(n)) if n.owned.values().any(|v| v.contains(&p))));

    // The route limit is mirrored: the fabric table holds what vpcsim's table holds, `local` included.
    let sim_table = r
        .sim
        .snapshot()
        .route_tables
        .into_iter()
        .find(|t| t.id == r.main)
        .unwrap();
    assert_eq!(have.table_len(table), sim_table.routes.len());

    // Terminate: the instance's port and namespace go, its addresses' routes and neighbours go, and the route
    // to its ENI turns into a blackhole (EC2 shows it as `blackhole`).
    r.sim.terminate_instance(&b.id).unwrap();
    let ops = step(&mut have);
    assert!(ops.iter().any(|o| matches!(o, Op::DelPort { .. })));
    assert!(
        ops.iter()
            .any(|o| matches!(o, Op::DelInstance { instance, .. } if *instance == b.id))
    );
    assert!(ops.contains(&Op::DelRoute {
        table: LAB_TABLE_OWNED,
        dst: Ipv4Net::new(b.private_ip, 32).unwrap()
    }));
    assert!(ops.contains(&Op::SetRoute {
        table,
        dst: net("100.64.0.0/26"),
        action: RouteAction::Blackhole
    }));
    let del = ops
        .iter()
        .position(|o| matches!(o, Op::DelInstance { .. }))
        .unwrap();
    let port = ops
        .iter()
        .position(|o| matches!(o, Op::DelPort { .. }))
        .unwrap();
    assert!(port < del, "the port goes before its namespace");
}

#[test]
fn a_name_clash_is_refused() {
    let r = mk_region();
    r.sim
        .run_instance(RunInstance::new("m5.large", &r.a))
        .unwrap();
    let mut m = Model::from_snapshot(&r.sim.snapshot());
    // Two ENIs whose ids share the tail that fits in IFNAMSIZ for a 6-character lab id.
    let (id, e) = m
        .enis
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap();
    let twin = underlay_cloud::EniId::new(format!(
        "eni-ffffffffff{}",
        &id.as_str()[id.as_str().len() - 7..]
    ));
    m.enis.insert(twin, e);
    let err = plan_fabric(&LabId::new("abcdef").unwrap(), &m, false).unwrap_err();
    assert!(
        matches!(err, underlay_lab::PlanError::NameClash { .. }),
        "{err}"
    );
    assert!(
        plan_fabric(&LabId::new("a").unwrap(), &m, false).is_ok(),
        "more room, no clash"
    );
}
