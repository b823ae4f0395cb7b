//! The cases. Each is a plain async fn over a [`Fixture`]; [`cases`] lists them with the capabilities they need.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::{
    Capability, Case, CaseError, CaseFuture, CaseResult, Fixture, World, WorldSpec, expect_error,
};
use crate::{
    AddressRequest, AttachmentId, CreateEniRequest, EniFilter, EniId, EniStatus, ErrorKind,
    InstanceFilter, InstanceId, InstanceState, NetworkInterface, RouteState, RouteTarget, SubnetId,
    Tags,
};

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(CaseError(format!($($fmt)+)));
        }
    };
}

macro_rules! case {
    ($f:ident, [$($cap:ident),*]) => {
        Case {
            name: stringify!($f),
            needs: &[$(Capability::$cap),*],
            run: |fx| -> CaseFuture<'_> { Box::pin($f(fx)) },
        }
    };
}

/// Every case, in the order the runner runs them.
pub fn cases() -> Vec<Case> {
    vec![
        case!(describe_vpc_subnets_and_route_tables, []),
        case!(subnet_counts_free_addresses, [AddressValidation]),
        case!(describe_instances_by_id_and_vpc, []),
        case!(describe_instance_types_reports_network_limits, []),
        case!(instance_types_report_prefix_support, [PrefixDelegation]),
        case!(create_replace_delete_route, []),
        case!(create_route_twice_is_already_exists, [DuplicateRouteCheck]),
        case!(missing_routes_and_tables_are_errors, []),
        case!(route_limit_is_enforced, [RouteLimit]),
        case!(
            route_by_instance_fails_on_multi_eni_instance,
            [InstanceRouteRule]
        ),
        case!(eni_create_attach_detach_delete, []),
        case!(eni_client_token_is_idempotent, [ClientToken]),
        case!(
            delete_on_termination_is_set_on_the_attachment,
            [DeleteOnTermination]
        ),
        case!(eni_wrong_state_is_refused, [StateChecks]),
        case!(attachment_limit_per_instance_type, [InstanceLimits]),
        case!(secondary_ips_by_count, []),
        case!(secondary_ips_explicit, []),
        case!(explicit_addresses_are_validated, [AddressValidation]),
        case!(private_ip_limit_per_eni, [InstanceLimits]),
        case!(prefixes_are_aligned_28s, [PrefixDelegation]),
        case!(
            prefix_placement_respects_fragmentation,
            [PrefixDelegation, AddressValidation]
        ),
        case!(
            prefixes_refused_on_non_nitro,
            [PrefixDelegation, InstanceLimits]
        ),
        case!(full_subnet_is_insufficient_addresses, [SubnetExhaustion]),
        case!(source_dest_check_per_eni, []),
        case!(tags_and_describe_by_tag, []),
        case!(tagging_unknown_ids_fails, [StateChecks]),
        case!(describe_enis_by_instance_and_status, []),
        case!(unknown_ids_are_not_found, []),
        case!(
            terminate_deletes_dot_enis_and_leaks_the_rest,
            [TerminateSemantics]
        ),
        case!(
            routes_to_terminated_instances_blackhole,
            [BlackholeOnTerminate]
        ),
        case!(bursts_are_throttled, [Throttling]),
        case!(a_600_route_table_is_described_whole, []),
        case!(describes_follow_every_page, []),
    ]
}

// ---- helpers ------------------------------------------------------------------------------------------------

const POD_CIDR: &str = "100.64.0.0/24";

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("valid literal")
}

fn eni_request(subnet: &SubnetId, token: &str, secondaries: u32) -> CreateEniRequest {
    CreateEniRequest {
        subnet: subnet.clone(),
        security_groups: Vec::new(),
        description: "underlay contract".to_owned(),
        tags: Tags::new(),
        client_token: token.to_owned(),
        secondary_ip_count: secondaries,
        prefix_count: 0,
    }
}

async fn world(f: &dyn Fixture) -> Result<World, CaseError> {
    Ok(f.create_world(&WorldSpec::standard()).await?)
}

async fn eni(f: &dyn Fixture, id: &EniId) -> Result<NetworkInterface, CaseError> {
    let mut found = f
        .cloud()
        .describe_network_interfaces(&EniFilter {
            ids: vec![id.clone()],
            ..Default::default()
        })
        .await?;
    ensure!(
        found.len() == 1,
        "describing {id} returned {} interfaces",
        found.len()
    );
    Ok(found.remove(0))
}

async fn primary_eni(
    f: &dyn Fixture,
    instance: &InstanceId,
) -> Result<NetworkInterface, CaseError> {
    let found = f
        .cloud()
        .describe_instances(&InstanceFilter {
            ids: vec![instance.clone()],
            vpc: None,
        })
        .await?;
    let i = found
        .first()
        .ok_or_else(|| CaseError(format!("instance {instance} not described")))?;
    i.primary_eni()
        .cloned()
        .ok_or_else(|| CaseError(format!("instance {instance} has no ENI at device index 0")))
}

/// Addresses of `subnet` no ENI of the VPC holds, from the top of the subnet down (moto picks at random).
async fn free_addresses(
    f: &dyn Fixture,
    w: &World,
    subnet: usize,
    n: usize,
) -> Result<Vec<Ipv4Addr>, CaseError> {
    let cidr = WorldSpec::standard().subnets[subnet].cidr;
    let used: BTreeSet<Ipv4Addr> = f
        .cloud()
        .describe_network_interfaces(&EniFilter {
            vpc: Some(w.vpc.clone()),
            ..Default::default()
        })
        .await?
        .into_iter()
        .flat_map(|e| std::iter::once(e.primary_ip).chain(e.secondary_ips))
        .collect();
    let last = u32::from(cidr.broadcast()) - 1;
    let out: Vec<Ipv4Addr> = (u32::from(cidr.network()) + 4..=last)
        .rev()
        .map(Ipv4Addr::from)
        .filter(|a| !used.contains(a))
        .take(n)
        .collect();
    ensure!(out.len() == n, "{cidr} has fewer than {n} free addresses");
    Ok(out)
}

// ---- describes ----------------------------------------------------------------------------------------------

async fn describe_vpc_subnets_and_route_tables(f: &dyn Fixture) -> CaseResult {
    let spec = WorldSpec::standard();
    let w = f.create_world(&spec).await?;
    let c = f.cloud();
    let vpc = c.describe_vpc(&w.vpc).await?;
    ensure!(
        vpc.cidrs.first() == Some(&spec.vpc_cidr),
        "VPC CIDRs {:?}",
        vpc.cidrs
    );

    let subnets = c.describe_subnets(&w.vpc).await?;
    ensure!(
        subnets.len() == spec.subnets.len(),
        "{} subnets described",
        subnets.len()
    );
    for (id, s) in w.subnets.iter().zip(&spec.subnets) {
        let d = subnets
            .iter()
            .find(|d| &d.id == id)
            .ok_or_else(|| CaseError(format!("subnet {id} not described")))?;
        ensure!(
            d.cidr == s.cidr && d.zone == s.zone,
            "subnet {id}: {} in {}",
            d.cidr,
            d.zone
        );
        ensure!(d.vpc == w.vpc, "subnet {id} in {}", d.vpc);
    }

    let tables = c.describe_route_tables(&w.vpc).await?;
    ensure!(
        tables.iter().filter(|t| t.main).count() == 1,
        "not exactly one main table"
    );
    let t = tables
        .iter()
        .find(|t| t.id == w.route_table)
        .ok_or_else(|| CaseError(format!("route table {} not described", w.route_table)))?;
    ensure!(!t.main, "the world's table is the main table");
    for s in &w.subnets {
        ensure!(t.subnets.contains(s), "{s} not associated with {}", t.id);
    }
    ensure!(
        t.routes
            .iter()
            .any(|r| r.destination == spec.vpc_cidr && r.target == RouteTarget::Local),
        "no local route in {:?}",
        t.routes
    );
    ensure!(
        t.routes.iter().any(|r| r.destination == net("0.0.0.0/0")
            && r.target == RouteTarget::Gateway(w.gateway.clone())
            && r.state == RouteState::Active),
        "no active default route to {} in {:?}",
        w.gateway,
        t.routes
    );
    Ok(())
}

async fn subnet_counts_free_addresses(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let c = f.cloud();
    let avail = |subnets: &[crate::Subnet], id: &SubnetId| {
        subnets
            .iter()
            .find(|s| &s.id == id)
            .map(|s| s.available_ips)
    };
    let before = c.describe_subnets(&w.vpc).await?;
    // A /24 has 256 addresses, 5 of which AWS reserves; a /28 has 11 usable.
    ensure!(
        avail(&before, &w.subnets[0]) == Some(251),
        "/24 free: {:?}",
        avail(&before, &w.subnets[0])
    );
    ensure!(
        avail(&before, &w.subnets[3]) == Some(11),
        "/28 free: {:?}",
        avail(&before, &w.subnets[3])
    );
    let e = c
        .create_network_interface(&eni_request(&w.subnets[0], "", 3))
        .await?;
    let after = c.describe_subnets(&w.vpc).await?;
    ensure!(
        avail(&after, &w.subnets[0]) == Some(247),
        "after 4 addresses: {:?}",
        avail(&after, &w.subnets[0])
    );
    c.delete_network_interface(&e.id).await?;
    let freed = c.describe_subnets(&w.vpc).await?;
    ensure!(
        avail(&freed, &w.subnets[0]) == Some(251),
        "after delete: {:?}",
        avail(&freed, &w.subnets[0])
    );
    Ok(())
}

async fn describe_instances_by_id_and_vpc(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let id = f.run_instance(&w.subnets[1], "m5.large").await?;
    let c = f.cloud();
    let by_id = c
        .describe_instances(&InstanceFilter {
            ids: vec![id.clone()],
            vpc: None,
        })
        .await?;
    ensure!(by_id.len() == 1, "{} instances for {id}", by_id.len());
    let i = &by_id[0];
    ensure!(i.instance_type == "m5.large", "type {}", i.instance_type);
    ensure!(i.state == InstanceState::Running, "state {:?}", i.state);
    ensure!(
        i.subnet == w.subnets[1] && i.vpc == w.vpc,
        "placed in {} / {}",
        i.subnet,
        i.vpc
    );
    let p = i
        .primary_eni()
        .ok_or_else(|| CaseError("no primary ENI".to_owned()))?;
    ensure!(
        p.primary_ip == i.private_ip,
        "primary ENI {} vs instance {}",
        p.primary_ip,
        i.private_ip
    );
    ensure!(
        net("198.18.1.0/24").contains(&i.private_ip),
        "address {}",
        i.private_ip
    );
    ensure!(p.status == EniStatus::InUse, "primary ENI {:?}", p.status);
    let by_vpc = c
        .describe_instances(&InstanceFilter {
            ids: vec![],
            vpc: Some(w.vpc.clone()),
        })
        .await?;
    ensure!(
        by_vpc.iter().any(|x| x.id == id),
        "{id} not in its VPC's instances"
    );
    Ok(())
}

async fn describe_instance_types_reports_network_limits(f: &dyn Fixture) -> CaseResult {
    let want = [
        ("t3.medium", 3, 6),
        ("m5.large", 3, 10),
        ("m5.xlarge", 4, 15),
        ("c5.4xlarge", 8, 30),
        ("m5.24xlarge", 15, 50),
    ];
    let names: Vec<String> = want.iter().map(|w| w.0.to_owned()).collect();
    let got = f.cloud().describe_instance_types(&names).await?;
    for (name, enis, ips) in want {
        let t = got
            .iter()
            .find(|t| t.instance_type == name)
            .ok_or_else(|| CaseError(format!("{name} not described")))?;
        ensure!(
            t.max_enis == enis && t.ipv4_per_eni == ips,
            "{name}: {} ENIs × {} IPv4, want {enis} × {ips}",
            t.max_enis,
            t.ipv4_per_eni
        );
    }
    Ok(())
}

async fn instance_types_report_prefix_support(f: &dyn Fixture) -> CaseResult {
    let got = f
        .cloud()
        .describe_instance_types(&["m5.large".to_owned(), "t2.medium".to_owned()])
        .await?;
    let pd = |n: &str| {
        got.iter()
            .find(|t| t.instance_type == n)
            .map(|t| t.prefix_delegation)
    };
    ensure!(
        pd("m5.large") == Some(true),
        "m5.large (Nitro) prefix delegation {:?}",
        pd("m5.large")
    );
    ensure!(
        pd("t2.medium") == Some(false),
        "t2.medium (Xen) prefix delegation {:?}",
        pd("t2.medium")
    );
    Ok(())
}

// ---- routes -------------------------------------------------------------------------------------------------

async fn route_target(
    f: &dyn Fixture,
    w: &World,
    destination: Ipv4Net,
) -> Result<Option<(RouteTarget, RouteState)>, CaseError> {
    let tables = f.cloud().describe_route_tables(&w.vpc).await?;
    let t = tables
        .iter()
        .find(|t| t.id == w.route_table)
        .ok_or_else(|| CaseError(format!("route table {} not described", w.route_table)))?;
    Ok(t.routes
        .iter()
        .find(|r| r.destination == destination)
        .map(|r| (r.target.clone(), r.state)))
}

async fn create_replace_delete_route(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let a = primary_eni(f, &f.run_instance(&w.subnets[0], "m5.large").await?).await?;
    let b = primary_eni(f, &f.run_instance(&w.subnets[1], "m5.large").await?).await?;
    let c = f.cloud();
    let dst = net(POD_CIDR);
    let to_a = RouteTarget::NetworkInterface(a.id.clone());
    let to_b = RouteTarget::NetworkInterface(b.id.clone());
    c.create_route(&w.route_table, dst, &to_a).await?;
    let got = route_target(f, &w, dst).await?;
    ensure!(
        got == Some((to_a.clone(), RouteState::Active)),
        "after create: {got:?}"
    );
    c.replace_route(&w.route_table, dst, &to_b).await?;
    let got = route_target(f, &w, dst).await?;
    ensure!(
        got == Some((to_b, RouteState::Active)),
        "after replace: {got:?}"
    );
    c.delete_route(&w.route_table, dst).await?;
    let got = route_target(f, &w, dst).await?;
    ensure!(got.is_none(), "after delete: {got:?}");
    Ok(())
}

async fn create_route_twice_is_already_exists(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let a = primary_eni(f, &f.run_instance(&w.subnets[0], "m5.large").await?).await?;
    let to_a = RouteTarget::NetworkInterface(a.id.clone());
    let c = f.cloud();
    c.create_route(&w.route_table, net(POD_CIDR), &to_a).await?;
    expect_error(
        c.create_route(&w.route_table, net(POD_CIDR), &to_a).await,
        ErrorKind::AlreadyExists,
        Some("RouteAlreadyExists"),
        "second CreateRoute",
    )
}

async fn missing_routes_and_tables_are_errors(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let a = primary_eni(f, &f.run_instance(&w.subnets[0], "m5.large").await?).await?;
    let to_a = RouteTarget::NetworkInterface(a.id.clone());
    let c = f.cloud();
    expect_error(
        c.delete_route(&w.route_table, net(POD_CIDR)).await,
        ErrorKind::NotFound,
        Some("InvalidRoute.NotFound"),
        "DeleteRoute of a missing route",
    )?;
    // AWS answers ReplaceRoute on a missing route with InvalidParameterValue, not InvalidRoute.NotFound.
    expect_error(
        c.replace_route(&w.route_table, net(POD_CIDR), &to_a).await,
        ErrorKind::InvalidRequest,
        Some("InvalidParameterValue"),
        "ReplaceRoute of a missing route",
    )?;
    expect_error(
        c.create_route(&"rtb-0123456789abcdef0".into(), net(POD_CIDR), &to_a)
            .await,
        ErrorKind::NotFound,
        Some("InvalidRouteTableID.NotFound"),
        "CreateRoute in an unknown table",
    )
}

async fn route_limit_is_enforced(f: &dyn Fixture) -> CaseResult {
    let limit = 5;
    let spec = WorldSpec {
        route_limit: Some(limit),
        ..WorldSpec::standard()
    };
    let w = f.create_world(&spec).await?;
    let a = primary_eni(f, &f.run_instance(&w.subnets[0], "m5.large").await?).await?;
    let to_a = RouteTarget::NetworkInterface(a.id.clone());
    let c = f.cloud();
    // The default route to the gateway already takes one entry; `local` does not count.
    let mut created = 0;
    for i in 0..(limit - 1) {
        let dst = Ipv4Net::new(Ipv4Addr::new(100, 64, i as u8, 0), 24).expect("valid");
        c.create_route(&w.route_table, dst, &to_a).await?;
        created += 1;
    }
    expect_error(
        c.create_route(&w.route_table, net("100.64.200.0/24"), &to_a)
            .await,
        ErrorKind::LimitExceeded,
        Some("RouteLimitExceeded"),
        &format!("CreateRoute after {created} routes and the default route at limit {limit}"),
    )?;
    // Deleting one frees a slot.
    c.delete_route(&w.route_table, net("100.64.0.0/24")).await?;
    c.create_route(&w.route_table, net("100.64.200.0/24"), &to_a)
        .await?;
    Ok(())
}

async fn route_by_instance_fails_on_multi_eni_instance(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let c = f.cloud();
    let single = f.run_instance(&w.subnets[0], "m5.large").await?;
    c.create_route(
        &w.route_table,
        net("100.64.1.0/24"),
        &RouteTarget::Instance(single),
    )
    .await?;
    let multi = f.run_instance(&w.subnets[0], "m5.large").await?;
    let e = c
        .create_network_interface(&eni_request(&w.subnets[0], "", 0))
        .await?;
    c.attach_network_interface(&e.id, &multi, 1, true).await?;
    expect_error(
        c.create_route(&w.route_table, net(POD_CIDR), &RouteTarget::Instance(multi))
            .await,
        ErrorKind::InvalidRequest,
        Some("InvalidInstanceID"),
        "CreateRoute by id of an instance with two ENIs",
    )
}

// ---- ENIs ---------------------------------------------------------------------------------------------------

async fn eni_create_attach_detach_delete(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let instance = f.run_instance(&w.subnets[0], "m5.large").await?;
    let c = f.cloud();
    let mut req = eni_request(&w.subnets[0], "", 0);
    req.security_groups = vec![w.security_group.clone()];
    req.tags = Tags::from([("underlay.dev/cluster".to_owned(), "contract".to_owned())]);
    let created = c.create_network_interface(&req).await?;
    ensure!(
        created.status == EniStatus::Available,
        "new ENI {:?}",
        created.status
    );
    ensure!(
        created.subnet == w.subnets[0] && created.vpc == w.vpc,
        "new ENI in {}",
        created.subnet
    );
    ensure!(
        net("198.18.0.0/24").contains(&created.primary_ip),
        "address {}",
        created.primary_ip
    );
    ensure!(
        created.security_groups == vec![w.security_group.clone()],
        "groups {:?}",
        created.security_groups
    );
    ensure!(created.mac.len() == 17, "MAC {:?}", created.mac);
    let described = eni(f, &created.id).await?;
    ensure!(
        described.tags == req.tags,
        "tags at creation {:?}",
        described.tags
    );
    ensure!(
        described.description == req.description,
        "description {:?}",
        described.description
    );

    let att = c
        .attach_network_interface(&created.id, &instance, 1, true)
        .await?;
    let attached = eni(f, &created.id).await?;
    ensure!(
        attached.status == EniStatus::InUse,
        "attached ENI {:?}",
        attached.status
    );
    let a = attached
        .attachment
        .as_ref()
        .ok_or_else(|| CaseError("no attachment described".to_owned()))?;
    ensure!(
        a.id == att && a.instance == instance && a.device_index == 1,
        "attachment {a:?}"
    );
    let i = c
        .describe_instances(&InstanceFilter {
            ids: vec![instance.clone()],
            vpc: None,
        })
        .await?;
    let devices: Vec<u32> = i[0]
        .enis
        .iter()
        .filter_map(|e| e.attachment.as_ref().map(|a| a.device_index))
        .collect();
    ensure!(
        devices == vec![0, 1],
        "instance's ENIs by device index {devices:?}"
    );

    c.detach_network_interface(&att, false).await?;
    let detached = eni(f, &created.id).await?;
    ensure!(
        detached.status == EniStatus::Available && detached.attachment.is_none(),
        "after detach {:?} {:?}",
        detached.status,
        detached.attachment
    );
    c.delete_network_interface(&created.id).await?;
    expect_error(
        c.describe_network_interfaces(&EniFilter {
            ids: vec![created.id.clone()],
            ..Default::default()
        })
        .await,
        ErrorKind::NotFound,
        Some("InvalidNetworkInterfaceID.NotFound"),
        "describing a deleted ENI",
    )
}

async fn delete_on_termination_is_set_on_the_attachment(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let instance = f.run_instance(&w.subnets[0], "m5.large").await?;
    let c = f.cloud();
    let created = c
        .create_network_interface(&eni_request(&w.subnets[0], "", 0))
        .await?;
    let att = c
        .attach_network_interface(&created.id, &instance, 1, false)
        .await?;
    let dot = |e: &NetworkInterface| e.attachment.as_ref().map(|a| a.delete_on_termination);
    ensure!(
        dot(&eni(f, &created.id).await?) == Some(false),
        "attached without DeleteOnTermination, described {:?}",
        eni(f, &created.id).await?.attachment
    );
    c.set_delete_on_termination(&created.id, &att, true).await?;
    let set = eni(f, &created.id).await?;
    ensure!(
        dot(&set) == Some(true),
        "after setting it {:?}",
        set.attachment
    );
    let i = c
        .describe_instances(&InstanceFilter {
            ids: vec![instance.clone()],
            vpc: None,
        })
        .await?;
    let seen = i[0].enis.iter().find(|e| e.id == created.id).and_then(dot);
    ensure!(
        seen == Some(true),
        "the instance describes its ENI's DeleteOnTermination as {seen:?}"
    );
    c.set_delete_on_termination(&created.id, &att, false)
        .await?;
    ensure!(
        dot(&eni(f, &created.id).await?) == Some(false),
        "still set after clearing it"
    );
    expect_error(
        c.set_delete_on_termination(
            &created.id,
            &AttachmentId::new("eni-attach-0123456789abcdef0"),
            true,
        )
        .await,
        ErrorKind::NotFound,
        Some("InvalidAttachmentID.NotFound"),
        "DeleteOnTermination of an attachment the ENI does not have",
    )
}

async fn eni_client_token_is_idempotent(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let c = f.cloud();
    let req = eni_request(&w.subnets[0], "underlay-contract-token-1", 2);
    let first = c.create_network_interface(&req).await?;
    let again = c.create_network_interface(&req).await?;
    ensure!(
        first.id == again.id,
        "same token made {} and {}",
        first.id,
        again.id
    );
    let enis = c
        .describe_network_interfaces(&EniFilter {
            vpc: Some(w.vpc.clone()),
            ..Default::default()
        })
        .await?;
    ensure!(
        enis.len() == 1,
        "{} ENIs after two calls with one token",
        enis.len()
    );
    let other = CreateEniRequest {
        secondary_ip_count: 5,
        ..req
    };
    expect_error(
        c.create_network_interface(&other).await,
        ErrorKind::AlreadyExists,
        Some("IdempotentParameterMismatch"),
        "same token, other parameters",
    )
}

async fn eni_wrong_state_is_refused(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let a = f.run_instance(&w.subnets[0], "m5.large").await?;
    let b = f.run_instance(&w.subnets[0], "m5.large").await?;
    let c = f.cloud();
    let e = c
        .create_network_interface(&eni_request(&w.subnets[0], "", 0))
        .await?;
    c.attach_network_interface(&e.id, &a, 1, false).await?;
    let r = c.delete_network_interface(&e.id).await;
    ensure!(r.is_err(), "deleting an attached ENI succeeded");
    eni(f, &e.id).await?;
    let r = c.attach_network_interface(&e.id, &b, 1, false).await;
    ensure!(
        r.is_err(),
        "attaching an attached ENI to another instance succeeded: {r:?}"
    );
    let e2 = c
        .create_network_interface(&eni_request(&w.subnets[0], "", 0))
        .await?;
    let r = c.attach_network_interface(&e2.id, &a, 1, false).await;
    ensure!(
        r.is_err(),
        "attaching at a used device index succeeded: {r:?}"
    );
    let primary = primary_eni(f, &a).await?;
    let att = primary.attachment.expect("primary is attached").id;
    let r = c.detach_network_interface(&att, false).await;
    ensure!(r.is_err(), "detaching the primary ENI succeeded");
    // An ENI of another zone cannot be attached.
    let far = c
        .create_network_interface(&eni_request(&w.subnets[1], "", 0))
        .await?;
    let r = c.attach_network_interface(&far.id, &a, 2, false).await;
    ensure!(
        r.is_err(),
        "attaching an ENI of another zone succeeded: {r:?}"
    );
    Ok(())
}

async fn attachment_limit_per_instance_type(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let i = f.run_instance(&w.subnets[0], "t3.medium").await?; // 3 ENIs
    let c = f.cloud();
    for d in 1..3 {
        let e = c
            .create_network_interface(&eni_request(&w.subnets[0], "", 0))
            .await?;
        c.attach_network_interface(&e.id, &i, d, true).await?;
    }
    let e = c
        .create_network_interface(&eni_request(&w.subnets[0], "", 0))
        .await?;
    expect_error(
        c.attach_network_interface(&e.id, &i, 3, true).await,
        ErrorKind::LimitExceeded,
        Some("AttachmentLimitExceeded"),
        "a fourth ENI on t3.medium",
    )
}

async fn secondary_ips_by_count(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let p = primary_eni(f, &f.run_instance(&w.subnets[0], "m5.large").await?).await?;
    let c = f.cloud();
    c.assign_private_ips(&p.id, &AddressRequest::Count(3))
        .await?;
    // Describe again rather than trust the answer (moto returns every address of the ENI).
    let after = eni(f, &p.id).await?;
    ensure!(
        after.secondary_ips.len() == 3,
        "secondaries {:?}",
        after.secondary_ips
    );
    let distinct: BTreeSet<_> = after.secondary_ips.iter().collect();
    ensure!(
        distinct.len() == 3,
        "duplicate secondaries {:?}",
        after.secondary_ips
    );
    ensure!(
        !after.secondary_ips.contains(&after.primary_ip),
        "primary among secondaries"
    );
    ensure!(
        after
            .secondary_ips
            .iter()
            .all(|a| net("198.18.0.0/24").contains(a)),
        "secondaries outside the subnet: {:?}",
        after.secondary_ips
    );
    let gone = after.secondary_ips[0];
    c.unassign_private_ips(&p.id, &[gone]).await?;
    let after = eni(f, &p.id).await?;
    ensure!(
        after.secondary_ips.len() == 2 && !after.secondary_ips.contains(&gone),
        "after unassigning {gone}: {:?}",
        after.secondary_ips
    );
    Ok(())
}

async fn secondary_ips_explicit(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let p = primary_eni(f, &f.run_instance(&w.subnets[0], "m5.large").await?).await?;
    let c = f.cloud();
    let want = free_addresses(f, &w, 0, 2).await?;
    c.assign_private_ips(&p.id, &AddressRequest::Explicit(want.clone()))
        .await?;
    let after = eni(f, &p.id).await?;
    let have: BTreeSet<_> = after.secondary_ips.iter().copied().collect();
    ensure!(
        want.iter().all(|a| have.contains(a)) && have.len() == 2,
        "asked {want:?}, have {have:?}"
    );
    c.unassign_private_ips(&p.id, &want).await?;
    let after = eni(f, &p.id).await?;
    ensure!(
        after.secondary_ips.is_empty(),
        "after unassign {:?}",
        after.secondary_ips
    );
    Ok(())
}

async fn explicit_addresses_are_validated(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let p = primary_eni(f, &f.run_instance(&w.subnets[0], "m5.large").await?).await?;
    let other = c_create(f, &w.subnets[0]).await?;
    let c = f.cloud();
    let outside = Ipv4Addr::new(198, 18, 1, 10);
    let r = c
        .assign_private_ips(&p.id, &AddressRequest::Explicit(vec![outside]))
        .await;
    expect_error(
        r,
        ErrorKind::InvalidRequest,
        None,
        "an address of another subnet",
    )?;
    let router = Ipv4Addr::new(198, 18, 0, 1);
    let r = c
        .assign_private_ips(&p.id, &AddressRequest::Explicit(vec![router]))
        .await;
    expect_error(
        r,
        ErrorKind::InvalidRequest,
        None,
        "the subnet's reserved router address",
    )?;
    let r = c
        .assign_private_ips(&p.id, &AddressRequest::Explicit(vec![other.primary_ip]))
        .await;
    ensure!(
        r.is_err(),
        "another ENI's primary address was assigned: {r:?}"
    );
    let after = eni(f, &p.id).await?;
    ensure!(
        after.secondary_ips.is_empty(),
        "failed assigns left {:?}",
        after.secondary_ips
    );
    Ok(())
}

async fn c_create(f: &dyn Fixture, subnet: &SubnetId) -> Result<NetworkInterface, CaseError> {
    Ok(f.cloud()
        .create_network_interface(&eni_request(subnet, "", 0))
        .await?)
}

async fn private_ip_limit_per_eni(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let p = primary_eni(f, &f.run_instance(&w.subnets[0], "t3.medium").await?).await?; // 6 per ENI
    let c = f.cloud();
    c.assign_private_ips(&p.id, &AddressRequest::Count(5))
        .await?;
    expect_error(
        c.assign_private_ips(&p.id, &AddressRequest::Count(1)).await,
        ErrorKind::LimitExceeded,
        Some("PrivateIpAddressLimitExceeded"),
        "a seventh address on a t3.medium ENI",
    )?;
    // An unattached ENI holding more than the type allows cannot be attached.
    let i = f.run_instance(&w.subnets[0], "t3.medium").await?;
    let big = c
        .create_network_interface(&eni_request(&w.subnets[0], "", 6))
        .await?;
    let r = c.attach_network_interface(&big.id, &i, 1, true).await;
    ensure!(
        r.is_err(),
        "an ENI with 7 addresses attached to t3.medium: {r:?}"
    );
    Ok(())
}

async fn prefixes_are_aligned_28s(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let p = primary_eni(f, &f.run_instance(&w.subnets[0], "m5.large").await?).await?;
    let c = f.cloud();
    c.assign_prefixes(&p.id, &AddressRequest::Count(2)).await?;
    let after = eni(f, &p.id).await?;
    ensure!(after.prefixes.len() == 2, "prefixes {:?}", after.prefixes);
    for q in &after.prefixes {
        ensure!(
            q.prefix_len() == 28 && q.trunc() == *q,
            "{q} is not an aligned /28"
        );
        ensure!(net("198.18.0.0/24").contains(q), "{q} outside the subnet");
        ensure!(
            !q.contains(&after.primary_ip),
            "{q} holds the primary address"
        );
    }
    let subnets = c.describe_subnets(&w.vpc).await?;
    let free = subnets
        .iter()
        .find(|s| s.id == w.subnets[0])
        .map(|s| s.available_ips);
    ensure!(
        free == Some(251 - 1 - 32),
        "free after a primary and two /28s: {free:?}"
    );
    let gone = after.prefixes[0];
    c.unassign_prefixes(&p.id, &[gone]).await?;
    let after = eni(f, &p.id).await?;
    ensure!(
        after.prefixes.len() == 1 && !after.prefixes.contains(&gone),
        "after unassign {:?}",
        after.prefixes
    );
    Ok(())
}

async fn prefix_placement_respects_fragmentation(f: &dyn Fixture) -> CaseResult {
    // 198.18.2.0/26: aligned /28 blocks at .0 (holds reserved .0-.3), .16, .32, .48 (holds broadcast .63).
    // One address in each of .16/28 and .32/28 leaves ~55 free addresses and no free aligned block.
    let w = world(f).await?;
    let c = f.cloud();
    let holder = c
        .create_network_interface(&eni_request(&w.subnets[2], "", 0))
        .await?;
    let mut pin = vec![Ipv4Addr::new(198, 18, 2, 20), Ipv4Addr::new(198, 18, 2, 40)];
    pin.retain(|a| *a != holder.primary_ip);
    c.assign_private_ips(&holder.id, &AddressRequest::Explicit(pin))
        .await?;
    let p = primary_eni(f, &f.run_instance(&w.subnets[2], "m5.large").await?).await?;
    let free = c
        .describe_subnets(&w.vpc)
        .await?
        .into_iter()
        .find(|s| s.id == w.subnets[2])
        .map(|s| s.available_ips)
        .unwrap_or(0);
    ensure!(
        free >= 16,
        "only {free} free addresses: the case needs enough for a /28 in total"
    );
    expect_error(
        c.assign_prefixes(&p.id, &AddressRequest::Count(1)).await,
        ErrorKind::InsufficientAddresses,
        Some("InsufficientCidrBlocks"),
        &format!("a /28 in a fragmented /26 with {free} free addresses"),
    )
}

async fn prefixes_refused_on_non_nitro(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let p = primary_eni(f, &f.run_instance(&w.subnets[0], "t2.medium").await?).await?;
    let r = f
        .cloud()
        .assign_prefixes(&p.id, &AddressRequest::Count(1))
        .await;
    expect_error(
        r,
        ErrorKind::InvalidRequest,
        None,
        "a /28 on a t2.medium (Xen) ENI",
    )
}

async fn full_subnet_is_insufficient_addresses(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let c = f.cloud();
    // The /28 has 11 usable addresses: one ENI with 10 secondaries takes them all.
    let full = c
        .create_network_interface(&eni_request(&w.subnets[3], "", 10))
        .await?;
    expect_error(
        c.create_network_interface(&eni_request(&w.subnets[3], "", 0))
            .await,
        ErrorKind::InsufficientAddresses,
        Some("InsufficientFreeAddressesInSubnet"),
        "an ENI in a full subnet",
    )?;
    expect_error(
        c.assign_private_ips(&full.id, &AddressRequest::Count(1))
            .await,
        ErrorKind::InsufficientAddresses,
        Some("InsufficientFreeAddressesInSubnet"),
        "a secondary address in a full subnet",
    )
}

async fn source_dest_check_per_eni(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let p = primary_eni(f, &f.run_instance(&w.subnets[0], "m5.large").await?).await?;
    ensure!(p.source_dest_check, "source/dest check starts off");
    let c = f.cloud();
    c.set_source_dest_check(&p.id, false).await?;
    ensure!(
        !eni(f, &p.id).await?.source_dest_check,
        "still on after disabling"
    );
    c.set_source_dest_check(&p.id, true).await?;
    ensure!(
        eni(f, &p.id).await?.source_dest_check,
        "still off after enabling"
    );
    Ok(())
}

async fn tags_and_describe_by_tag(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let c = f.cloud();
    let mut req = eni_request(&w.subnets[0], "", 0);
    req.tags = Tags::from([("underlay.dev/cluster".to_owned(), "blue".to_owned())]);
    let tagged = c.create_network_interface(&req).await?;
    let plain = c_create(f, &w.subnets[0]).await?;
    c.create_tags(
        &[tagged.id.to_string()],
        &Tags::from([("underlay.dev/node".to_owned(), "node-1".to_owned())]),
    )
    .await?;
    let by = |k: &str, v: &str| EniFilter {
        vpc: Some(w.vpc.clone()),
        tags: Tags::from([(k.to_owned(), v.to_owned())]),
        ..Default::default()
    };
    let ids = |v: Vec<NetworkInterface>| v.into_iter().map(|e| e.id).collect::<Vec<_>>();
    let blue = ids(c
        .describe_network_interfaces(&by("underlay.dev/cluster", "blue"))
        .await?);
    ensure!(
        blue == vec![tagged.id.clone()],
        "cluster=blue matched {blue:?}"
    );
    let keyed = ids(c
        .describe_network_interfaces(&by("underlay.dev/node", ""))
        .await?);
    ensure!(
        keyed == vec![tagged.id.clone()],
        "tag-key node matched {keyed:?}"
    );
    let red = ids(c
        .describe_network_interfaces(&by("underlay.dev/cluster", "red"))
        .await?);
    ensure!(red.is_empty(), "cluster=red matched {red:?}");
    let d = eni(f, &tagged.id).await?;
    ensure!(d.tags.len() == 2, "tags {:?}", d.tags);
    ensure!(
        eni(f, &plain.id).await?.tags.is_empty(),
        "the untagged ENI got tags"
    );
    Ok(())
}

async fn tagging_unknown_ids_fails(f: &dyn Fixture) -> CaseResult {
    world(f).await?;
    let r = f
        .cloud()
        .create_tags(
            &["eni-0123456789abcdef0".to_owned()],
            &Tags::from([("k".to_owned(), "v".to_owned())]),
        )
        .await;
    expect_error(r, ErrorKind::NotFound, None, "tagging an unknown ENI")
}

async fn describe_enis_by_instance_and_status(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let i = f.run_instance(&w.subnets[0], "m5.large").await?;
    let c = f.cloud();
    let attached = c_create(f, &w.subnets[0]).await?;
    let loose = c_create(f, &w.subnets[0]).await?;
    c.attach_network_interface(&attached.id, &i, 1, true)
        .await?;
    let of_i = c
        .describe_network_interfaces(&EniFilter {
            instance: Some(i.clone()),
            ..Default::default()
        })
        .await?;
    ensure!(of_i.len() == 2, "{i} has {} ENIs described", of_i.len());
    ensure!(
        of_i.iter().any(|e| e.id == attached.id),
        "{} not among {i}'s ENIs",
        attached.id
    );
    let available = c
        .describe_network_interfaces(&EniFilter {
            vpc: Some(w.vpc.clone()),
            status: Some(EniStatus::Available),
            ..Default::default()
        })
        .await?;
    let ids: Vec<_> = available.iter().map(|e| e.id.clone()).collect();
    ensure!(ids == vec![loose.id.clone()], "available ENIs {ids:?}");
    Ok(())
}

async fn unknown_ids_are_not_found(f: &dyn Fixture) -> CaseResult {
    world(f).await?;
    let c = f.cloud();
    expect_error(
        c.describe_vpc(&"vpc-0123456789abcdef0".into()).await,
        ErrorKind::NotFound,
        Some("InvalidVpcID.NotFound"),
        "DescribeVpcs of an unknown VPC",
    )?;
    expect_error(
        c.delete_network_interface(&"eni-0123456789abcdef0".into())
            .await,
        ErrorKind::NotFound,
        Some("InvalidNetworkInterfaceID.NotFound"),
        "deleting an unknown ENI",
    )?;
    expect_error(
        c.describe_network_interfaces(&EniFilter {
            ids: vec!["eni-0123456789abcdef0".into()],
            ..Default::default()
        })
        .await,
        ErrorKind::NotFound,
        Some("InvalidNetworkInterfaceID.NotFound"),
        "describing an unknown ENI",
    )
}

async fn terminate_deletes_dot_enis_and_leaks_the_rest(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let i = f.run_instance(&w.subnets[0], "m5.large").await?;
    let primary = primary_eni(f, &i).await?;
    let c = f.cloud();
    let dot = c_create(f, &w.subnets[0]).await?;
    let keep = c_create(f, &w.subnets[0]).await?;
    c.attach_network_interface(&dot.id, &i, 1, true).await?;
    c.attach_network_interface(&keep.id, &i, 2, false).await?;
    f.terminate_instance(&i).await?;
    let left = c
        .describe_network_interfaces(&EniFilter {
            vpc: Some(w.vpc.clone()),
            ..Default::default()
        })
        .await?;
    let ids: Vec<_> = left.iter().map(|e| e.id.clone()).collect();
    ensure!(
        ids == vec![keep.id.clone()],
        "ENIs left after terminate: {ids:?} (primary {}, dot {})",
        primary.id,
        dot.id
    );
    ensure!(
        left[0].status == EniStatus::Available && left[0].attachment.is_none(),
        "leaked ENI is {:?} {:?}",
        left[0].status,
        left[0].attachment
    );
    let running = c
        .describe_instances(&InstanceFilter {
            ids: vec![],
            vpc: Some(w.vpc.clone()),
        })
        .await?;
    ensure!(
        running.iter().all(|x| x.id != i),
        "terminated {i} still described"
    );
    c.delete_network_interface(&keep.id).await?;
    Ok(())
}

async fn routes_to_terminated_instances_blackhole(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let i = f.run_instance(&w.subnets[0], "m5.large").await?;
    let p = primary_eni(f, &i).await?;
    let c = f.cloud();
    let dst = net(POD_CIDR);
    c.create_route(
        &w.route_table,
        dst,
        &RouteTarget::NetworkInterface(p.id.clone()),
    )
    .await?;
    f.terminate_instance(&i).await?;
    let got = route_target(f, &w, dst).await?;
    ensure!(
        matches!(got, Some((_, RouteState::Blackhole))),
        "route to a terminated instance's ENI: {got:?}"
    );
    Ok(())
}

async fn bursts_are_throttled(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let c = f.cloud();
    // The describe bucket holds 100 tokens by default; stop at the first throttle, bounded.
    for n in 0..1_000 {
        match c.describe_subnets(&w.vpc).await {
            Ok(_) => {}
            Err(e) if e.is_throttled() => {
                ensure!(e.is_retryable(), "throttling is not retryable");
                ensure!(n >= 1, "throttled on the first call");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(CaseError(
        "1,000 back-to-back DescribeSubnets were never throttled".to_owned(),
    ))
}

// ---- pagination -------------------------------------------------------------------------------------------

/// A table of 600 routes (above AWS's 125-route pagination advice, above the 500 default quota) comes back
/// whole, every route once, the foreign default route included.
async fn a_600_route_table_is_described_whole(f: &dyn Fixture) -> CaseResult {
    let spec = WorldSpec {
        route_limit: Some(1_000),
        ..WorldSpec::standard()
    };
    let w = f.create_world(&spec).await?;
    let a = primary_eni(f, &f.run_instance(&w.subnets[0], "m5.large").await?).await?;
    let to_a = RouteTarget::NetworkInterface(a.id.clone());
    let routes: Vec<Ipv4Net> = (0..600u32)
        .map(|i| Ipv4Net::new(Ipv4Addr::from(0x6440_0000 + (i << 6)), 26).expect("valid"))
        .collect();
    f.add_routes(&w.route_table, &routes, &to_a).await?;
    let tables = f.cloud().describe_route_tables(&w.vpc).await?;
    let t = tables
        .iter()
        .find(|t| t.id == w.route_table)
        .ok_or_else(|| CaseError(format!("route table {} not described", w.route_table)))?;
    let ours: BTreeSet<Ipv4Net> = t
        .routes
        .iter()
        .filter(|r| r.target == to_a)
        .map(|r| r.destination)
        .collect();
    ensure!(
        ours.len() == 600 && routes.iter().all(|r| ours.contains(r)),
        "{} of 600 routes described",
        ours.len()
    );
    let dests: Vec<Ipv4Net> = t.routes.iter().map(|r| r.destination).collect();
    let unique: BTreeSet<&Ipv4Net> = dests.iter().collect();
    ensure!(unique.len() == dests.len(), "a route described twice");
    ensure!(
        t.routes.iter().any(|r| r.destination == net("0.0.0.0/0")
            && r.target == RouteTarget::Gateway(w.gateway.clone())),
        "the default route is missing"
    );
    Ok(())
}

/// Seven instances and their ENIs, read by VPC: whole answers whatever the backend's page size (a backend run
/// with small pages makes the reader follow several).
async fn describes_follow_every_page(f: &dyn Fixture) -> CaseResult {
    let w = world(f).await?;
    let mut launched = BTreeSet::new();
    for i in 0..7 {
        launched.insert(f.run_instance(&w.subnets[i % 2], "t3.medium").await?);
    }
    let c = f.cloud();
    let by_vpc = c
        .describe_instances(&InstanceFilter {
            ids: Vec::new(),
            vpc: Some(w.vpc.clone()),
        })
        .await?;
    let got: BTreeSet<InstanceId> = by_vpc.iter().map(|i| i.id.clone()).collect();
    ensure!(got == launched, "described {got:?}, launched {launched:?}");
    ensure!(by_vpc.len() == 7, "{} instances described", by_vpc.len());
    let enis = c
        .describe_network_interfaces(&EniFilter {
            vpc: Some(w.vpc.clone()),
            ..EniFilter::default()
        })
        .await?;
    let ids: BTreeSet<&EniId> = enis.iter().map(|e| &e.id).collect();
    ensure!(ids.len() == enis.len(), "an ENI described twice");
    for i in &by_vpc {
        for e in &i.enis {
            ensure!(
                ids.contains(&e.id),
                "ENI {} of {} not described",
                e.id,
                i.id
            );
        }
    }
    let subnets = c.describe_subnets(&w.vpc).await?;
    ensure!(
        subnets.len() == WorldSpec::standard().subnets.len(),
        "{} subnets",
        subnets.len()
    );
    Ok(())
}
