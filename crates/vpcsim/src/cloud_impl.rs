//! The [`Cloud`] port on [`VpcSim`]: AWS's validation order and error codes, operation by operation.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use underlay_cloud::{
    AddressRequest, AttachmentId, Cloud, CreateEniRequest, EniFilter, EniId, EniStatus, Instance,
    InstanceFilter, InstanceId, InstanceState, InstanceTypeInfo, NetworkInterface, Operation,
    Result, RouteTable, RouteTableId, RouteTarget, Subnet, Tags, Vpc, VpcId,
};
use underlay_core::instance_types::INSTANCE_TYPES;

use crate::events::Event;
use crate::paging::all_pages;
use crate::sim::{TAG_LIMIT, VpcSim, World, instance_type, type_info};
use crate::state::err;

fn check_tags(tags: &Tags) -> Result<()> {
    if tags.len() > TAG_LIMIT {
        return Err(err(
            "TagLimitExceeded",
            format!("The maximum number of tags per resource is {TAG_LIMIT}"),
        ));
    }
    Ok(())
}

fn check_destination(destination: Ipv4Net) -> Result<()> {
    if destination.trunc() != destination {
        return Err(err(
            "InvalidParameterValue",
            format!("Value ({destination}) for parameter destinationCidrBlock is invalid."),
        ));
    }
    Ok(())
}

fn no_duplicates<T: Ord + Copy + std::fmt::Display>(items: &[T]) -> Result<()> {
    let mut seen = BTreeSet::new();
    for i in items {
        if !seen.insert(*i) {
            return Err(err(
                "InvalidParameterValue",
                format!("{i} is specified more than once"),
            ));
        }
    }
    Ok(())
}

impl World {
    /// Validate a route target the way CreateRoute/ReplaceRoute do.
    fn check_target(&self, table_vpc: &VpcId, target: &RouteTarget) -> Result<RouteTarget> {
        match target {
            RouteTarget::Local => Err(err(
                "InvalidParameterValue",
                "the local route target is created with the VPC and cannot be set",
            )),
            RouteTarget::NetworkInterface(e) => {
                let eni = self.state.eni(e)?;
                if &eni.vpc != table_vpc {
                    return Err(err(
                        "InvalidParameterValue",
                        format!(
                            "route table and network interface {e} belong to different networks"
                        ),
                    ));
                }
                Ok(target.clone())
            }
            RouteTarget::Instance(i) => {
                let inst = self.state.instance(i)?;
                if inst.enis.len() > 1 {
                    return Err(err(
                        "InvalidInstanceID",
                        format!(
                            "There are multiple interfaces attached to instance '{i}'. Please specify an \
                             interface ID for the operation instead."
                        ),
                    ));
                }
                Ok(target.clone())
            }
            RouteTarget::Gateway(g) => match self.state.gateways.get(g) {
                Some(v) if v == table_vpc => Ok(target.clone()),
                Some(_) => Err(err(
                    "InvalidParameterValue",
                    format!("route table and gateway {g} belong to different networks"),
                )),
                None => Err(err(
                    "InvalidGatewayID.NotFound",
                    format!("The gateway ID '{g}' does not exist"),
                )),
            },
        }
    }

    /// CreateRoute's checks and effect.
    pub(crate) fn put_route(
        &mut self,
        table: &RouteTableId,
        destination: Ipv4Net,
        target: &RouteTarget,
    ) -> Result<()> {
        check_destination(destination)?;
        let t = self.state.route_table(table)?;
        let target = self.check_target(&t.vpc, target)?;
        if t.routes.contains_key(&destination) {
            return Err(err(
                "RouteAlreadyExists",
                format!("The route identified by {destination} already exists."),
            ));
        }
        if t.counted_routes() >= t.limit {
            return Err(err(
                "RouteLimitExceeded",
                format!(
                    "The maximum number of routes has been reached for {table} ({} routes).",
                    t.limit
                ),
            ));
        }
        self.state
            .route_table_mut(table)?
            .routes
            .insert(destination, target.clone());
        self.emit(Event::RouteChanged {
            table: table.clone(),
            destination,
            old: None,
            new: Some(target),
        });
        Ok(())
    }

    /// Limits of the instance an ENI is attached to, if any.
    fn attached_limits(
        &self,
        eni: &NetworkInterface,
    ) -> Option<&'static underlay_core::instance_types::InstanceTypeLimits> {
        let a = eni.attachment.as_ref()?;
        let i = self.state.instances.get(&a.instance)?;
        instance_type(&i.instance_type).ok()
    }

    /// PrivateIpAddressLimitExceeded when `extra` more slots (addresses or prefixes) would exceed the type's
    /// IPv4-per-ENI limit. Unattached ENIs are checked when they are attached.
    fn check_slots(&self, eni: &NetworkInterface, extra: usize) -> Result<()> {
        if let Some(t) = self.attached_limits(eni) {
            let used = 1 + eni.secondary_ips.len() + eni.prefixes.len();
            if used + extra > t.ipv4_per_eni as usize {
                return Err(err(
                    "PrivateIpAddressLimitExceeded",
                    format!(
                        "Number of private addresses will exceed limit: {} allows {} per interface, {eni} would \
                         have {}",
                        t.name,
                        t.ipv4_per_eni,
                        used + extra,
                        eni = eni.id
                    ),
                ));
            }
        }
        Ok(())
    }

    fn create_eni(&mut self, req: &CreateEniRequest) -> Result<NetworkInterface> {
        if !req.client_token.is_empty()
            && let Some((first, made)) = self.tokens.get(&req.client_token)
        {
            if first != req {
                return Err(err(
                    "IdempotentParameterMismatch",
                    "The client token was already used with different parameters",
                ));
            }
            return Ok(self
                .state
                .enis
                .get(&made.id)
                .cloned()
                .unwrap_or_else(|| made.clone()));
        }
        check_tags(&req.tags)?;
        let subnet = self.state.subnet(&req.subnet)?;
        let (vpc, zone) = (subnet.vpc.clone(), subnet.zone.clone());
        let in_zone = self.state.enis.values().filter(|e| e.zone == zone).count();
        if in_zone >= self.config.enis_per_zone {
            return Err(err(
                "NetworkInterfaceLimitExceeded",
                format!(
                    "You have reached the limit of {} network interfaces in {zone}.",
                    self.config.enis_per_zone
                ),
            ));
        }
        let groups = self.resolve_groups(&vpc, &req.security_groups)?;
        // All addresses are taken or none: count first, then take.
        let n = 1 + req.secondary_ip_count;
        let taken = self.with_subnet(&req.subnet, |s, rng, order| {
            let need_prefixes = req.prefix_count;
            if s.available() < n + 16 * need_prefixes {
                return Err(err(
                    "InsufficientFreeAddressesInSubnet",
                    format!(
                        "The specified subnet {} does not have enough free addresses to satisfy the request.",
                        s.id
                    ),
                ));
            }
            let prefixes = s.take_any_prefixes(need_prefixes, rng, order)?;
            match s.take_any(n, rng, order) {
                Ok(ips) => Ok((ips, prefixes)),
                Err(e) => {
                    for p in &prefixes {
                        s.release_prefix(*p);
                    }
                    Err(e)
                }
            }
        })?;
        let (ips, prefixes) = taken;
        let id = self.insert_eni(
            &req.subnet,
            ips[0],
            groups,
            req.description.clone(),
            req.tags.clone(),
        );
        let eni = self.state.enis.get_mut(&id).expect("just inserted");
        eni.secondary_ips = ips[1..].to_vec();
        eni.prefixes = prefixes.clone();
        let eni = eni.clone();
        if !eni.secondary_ips.is_empty() {
            self.emit(Event::AddressesAssigned {
                eni: id.clone(),
                addresses: eni.secondary_ips.clone(),
            });
        }
        if !prefixes.is_empty() {
            self.emit(Event::PrefixesAssigned {
                eni: id.clone(),
                prefixes,
            });
        }
        if !req.client_token.is_empty() {
            self.tokens
                .insert(req.client_token.clone(), (req.clone(), eni.clone()));
        }
        Ok(eni)
    }

    fn attach_eni(
        &mut self,
        eni_id: &EniId,
        instance: &InstanceId,
        device_index: u32,
    ) -> Result<AttachmentId> {
        let eni = self.state.eni(eni_id)?;
        let inst = self.state.instance(instance)?;
        if inst.state != InstanceState::Running {
            return Err(err(
                "IncorrectInstanceState",
                format!("The instance '{instance}' is not in a valid state for this operation."),
            ));
        }
        if eni.attachment.is_some() || eni.status != EniStatus::Available {
            return Err(err(
                "InvalidNetworkInterface.InUse",
                format!("Interface: [{eni_id}] in use."),
            ));
        }
        if eni.vpc != inst.vpc || eni.zone != inst.zone {
            return Err(err(
                "InvalidParameterValue",
                format!(
                    "Network interface {eni_id} ({}) and instance {instance} ({}) are not in the same \
                     VPC and availability zone.",
                    eni.zone, inst.zone
                ),
            ));
        }
        let t = instance_type(&inst.instance_type)?;
        if inst.enis.len() as u32 >= t.max_enis || device_index >= t.max_enis {
            return Err(err(
                "AttachmentLimitExceeded",
                format!(
                    "Interface count {} exceeds the limit for {} (device index {device_index}, {} interfaces \
                     allowed).",
                    inst.enis.len() + 1,
                    t.name,
                    t.max_enis
                ),
            ));
        }
        if inst.enis.contains_key(&device_index) {
            return Err(err(
                "InvalidParameterValue",
                format!(
                    "Instance '{instance}' already has an interface attached at device index '{device_index}'."
                ),
            ));
        }
        let slots = 1 + eni.secondary_ips.len() + eni.prefixes.len();
        if slots > t.ipv4_per_eni as usize {
            return Err(err(
                "PrivateIpAddressLimitExceeded",
                format!(
                    "Network interface {eni_id} has {slots} addresses; {} allows {} per interface.",
                    t.name, t.ipv4_per_eni
                ),
            ));
        }
        if !eni.prefixes.is_empty() && !t.nitro {
            return Err(err(
                "InvalidParameterValue",
                format!(
                    "Instance type {} does not support prefix delegation.",
                    t.name
                ),
            ));
        }
        Ok(self.attach(eni_id, instance, device_index, false))
    }

    fn assign_ips(
        &mut self,
        eni_id: &EniId,
        request: &AddressRequest<Ipv4Addr>,
    ) -> Result<Vec<Ipv4Addr>> {
        let eni = self.state.eni(eni_id)?.clone();
        let n = match request {
            AddressRequest::Count(n) => *n as usize,
            AddressRequest::Explicit(ips) => ips.len(),
        };
        if n == 0 {
            return Err(err(
                "InvalidParameterValue",
                "Specify a secondary address count or addresses",
            ));
        }
        self.check_slots(&eni, n)?;
        let added = match request {
            AddressRequest::Count(n) => {
                self.with_subnet(&eni.subnet, |s, rng, order| s.take_any(*n, rng, order))?
            }
            AddressRequest::Explicit(ips) => {
                no_duplicates(ips)?;
                let s = self.state.subnet(&eni.subnet)?;
                for ip in ips {
                    if *ip == eni.primary_ip || eni.secondary_ips.contains(ip) {
                        return Err(err(
                            "InvalidParameterValue",
                            format!("Address {ip} is already assigned to {eni_id}"),
                        ));
                    }
                    s.check_free(*ip)?;
                }
                let s = self.state.subnet_mut(&eni.subnet)?;
                for ip in ips {
                    s.take(*ip);
                }
                ips.clone()
            }
        };
        self.state
            .eni_mut(eni_id)?
            .secondary_ips
            .extend(added.iter().copied());
        self.emit(Event::AddressesAssigned {
            eni: eni_id.clone(),
            addresses: added.clone(),
        });
        Ok(added)
    }

    fn unassign_ips(&mut self, eni_id: &EniId, addresses: &[Ipv4Addr]) -> Result<()> {
        let eni = self.state.eni(eni_id)?;
        if addresses.is_empty() {
            return Err(err(
                "InvalidParameterValue",
                "Specify addresses to unassign",
            ));
        }
        no_duplicates(addresses)?;
        for ip in addresses {
            if *ip == eni.primary_ip {
                return Err(err(
                    "InvalidParameterValue",
                    format!("The primary address {ip} of {eni_id} cannot be unassigned"),
                ));
            }
            if !eni.secondary_ips.contains(ip) {
                return Err(err(
                    "InvalidParameterValue",
                    format!(
                        "Some of the specified addresses are not assigned to interface {eni_id}"
                    ),
                ));
            }
        }
        let subnet = eni.subnet.clone();
        self.state
            .eni_mut(eni_id)?
            .secondary_ips
            .retain(|ip| !addresses.contains(ip));
        let s = self.state.subnet_mut(&subnet)?;
        for ip in addresses {
            s.release(*ip);
        }
        self.emit(Event::AddressesUnassigned {
            eni: eni_id.clone(),
            addresses: addresses.to_vec(),
        });
        Ok(())
    }

    fn assign_prefixes(
        &mut self,
        eni_id: &EniId,
        request: &AddressRequest<Ipv4Net>,
    ) -> Result<Vec<Ipv4Net>> {
        let eni = self.state.eni(eni_id)?.clone();
        let n = match request {
            AddressRequest::Count(n) => *n as usize,
            AddressRequest::Explicit(p) => p.len(),
        };
        if n == 0 {
            return Err(err(
                "InvalidParameterValue",
                "Specify a prefix count or prefixes",
            ));
        }
        if let Some(t) = self.attached_limits(&eni)
            && !t.nitro
        {
            return Err(err(
                "InvalidParameterValue",
                format!(
                    "Instance type {} does not support prefix delegation.",
                    t.name
                ),
            ));
        }
        self.check_slots(&eni, n)?;
        let added = match request {
            AddressRequest::Count(n) => self.with_subnet(&eni.subnet, |s, rng, order| {
                s.take_any_prefixes(*n, rng, order)
            })?,
            AddressRequest::Explicit(prefixes) => {
                no_duplicates(prefixes)?;
                let s = self.state.subnet(&eni.subnet)?;
                for p in prefixes {
                    s.check_prefix_free(*p)?;
                }
                let s = self.state.subnet_mut(&eni.subnet)?;
                for p in prefixes {
                    s.take_prefix(*p);
                }
                prefixes.clone()
            }
        };
        self.state
            .eni_mut(eni_id)?
            .prefixes
            .extend(added.iter().copied());
        self.emit(Event::PrefixesAssigned {
            eni: eni_id.clone(),
            prefixes: added.clone(),
        });
        Ok(added)
    }

    fn unassign_prefixes(&mut self, eni_id: &EniId, prefixes: &[Ipv4Net]) -> Result<()> {
        let eni = self.state.eni(eni_id)?;
        if prefixes.is_empty() {
            return Err(err("InvalidParameterValue", "Specify prefixes to unassign"));
        }
        no_duplicates(prefixes)?;
        if let Some(p) = prefixes.iter().find(|p| !eni.prefixes.contains(p)) {
            return Err(err(
                "InvalidParameterValue",
                format!("Prefix {p} is not assigned to interface {eni_id}"),
            ));
        }
        let subnet = eni.subnet.clone();
        self.state
            .eni_mut(eni_id)?
            .prefixes
            .retain(|p| !prefixes.contains(p));
        let s = self.state.subnet_mut(&subnet)?;
        for p in prefixes {
            s.release_prefix(*p);
        }
        self.emit(Event::PrefixesUnassigned {
            eni: eni_id.clone(),
            prefixes: prefixes.to_vec(),
        });
        Ok(())
    }
}

#[async_trait::async_trait]
impl Cloud for VpcSim {
    async fn describe_vpc(&self, vpc: &VpcId) -> Result<Vpc> {
        self.call(Operation::DescribeVpcs, false, |w, now| {
            w.read(now, |s| s.describe_vpc(vpc))
        })
        .await
    }

    async fn describe_subnets(&self, vpc: &VpcId) -> Result<Vec<Subnet>> {
        let max = Some(self.page_size_for(Operation::DescribeSubnets));
        all_pages(
            |token| async move { self.describe_subnets_page(vpc, max, token.as_deref()).await },
        )
        .await
    }

    async fn describe_route_tables(&self, vpc: &VpcId) -> Result<Vec<RouteTable>> {
        let max = Some(self.page_size_for(Operation::DescribeRouteTables));
        all_pages(|token| async move {
            self.describe_route_tables_page(vpc, max, token.as_deref())
                .await
        })
        .await
    }

    async fn describe_instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>> {
        // By ids: one answer (EC2 refuses MaxResults with ids); otherwise page by page.
        let max = filter
            .ids
            .is_empty()
            .then(|| self.page_size_for(Operation::DescribeInstances));
        all_pages(|token| async move {
            self.describe_instances_page(filter, max, token.as_deref())
                .await
        })
        .await
    }

    async fn describe_instance_types(&self, types: &[String]) -> Result<Vec<InstanceTypeInfo>> {
        self.call(
            Operation::DescribeInstanceTypes,
            types.is_empty(),
            |_, _| {
                if types.is_empty() {
                    return Ok(INSTANCE_TYPES.iter().map(type_info).collect());
                }
                types
                    .iter()
                    .map(|t| instance_type(t).map(type_info))
                    .collect()
            },
        )
        .await
    }

    async fn describe_network_interfaces(
        &self,
        filter: &EniFilter,
    ) -> Result<Vec<NetworkInterface>> {
        let max = filter
            .ids
            .is_empty()
            .then(|| self.page_size_for(Operation::DescribeNetworkInterfaces));
        all_pages(|token| async move {
            self.describe_network_interfaces_page(filter, max, token.as_deref())
                .await
        })
        .await
    }

    async fn create_route(
        &self,
        table: &RouteTableId,
        destination: Ipv4Net,
        target: &RouteTarget,
    ) -> Result<()> {
        self.call(Operation::CreateRoute, false, |w, _| {
            w.put_route(table, destination, target)
        })
        .await
    }

    async fn replace_route(
        &self,
        table: &RouteTableId,
        destination: Ipv4Net,
        target: &RouteTarget,
    ) -> Result<()> {
        self.call(Operation::ReplaceRoute, false, |w, _| {
            check_destination(destination)?;
            let t = w.state.route_table(table)?;
            let target = w.check_target(&t.vpc, target)?;
            let old = match t.routes.get(&destination) {
                None => {
                    // What AWS answers (not InvalidRoute.NotFound, unlike DeleteRoute).
                    return Err(err(
                        "InvalidParameterValue",
                        format!(
                            "There is no route defined for '{destination}' in the route table. Use CreateRoute \
                             instead."
                        ),
                    ));
                }
                Some(RouteTarget::Local) => {
                    return Err(err(
                        "InvalidParameterValue",
                        format!("The local route {destination} cannot be replaced."),
                    ));
                }
                Some(old) => old.clone(),
            };
            w.state
                .route_table_mut(table)?
                .routes
                .insert(destination, target.clone());
            w.emit(Event::RouteChanged {
                table: table.clone(),
                destination,
                old: Some(old),
                new: Some(target),
            });
            Ok(())
        })
        .await
    }

    async fn delete_route(&self, table: &RouteTableId, destination: Ipv4Net) -> Result<()> {
        self.call(Operation::DeleteRoute, false, |w, _| {
            let t = w.state.route_table(table)?;
            let old = match t.routes.get(&destination) {
                None => {
                    return Err(err(
                        "InvalidRoute.NotFound",
                        format!("no route with destination-cidr-block {destination} in route table {table}"),
                    ));
                }
                Some(RouteTarget::Local) => {
                    return Err(err(
                        "InvalidParameterValue",
                        format!("cannot remove local route {destination} in route table {table}"),
                    ));
                }
                Some(old) => old.clone(),
            };
            w.state.route_table_mut(table)?.routes.remove(&destination);
            w.emit(Event::RouteChanged {
                table: table.clone(),
                destination,
                old: Some(old),
                new: None,
            });
            Ok(())
        })
        .await
    }

    async fn create_network_interface(
        &self,
        request: &CreateEniRequest,
    ) -> Result<NetworkInterface> {
        self.call(Operation::CreateNetworkInterface, false, |w, now| {
            let with_addresses = request.secondary_ip_count > 0 || request.prefix_count > 0;
            if with_addresses && w.creation_draws_assign() {
                w.take_token(Operation::AssignPrivateIpAddresses, now)?;
            }
            w.create_eni(request)
        })
        .await
    }

    async fn attach_network_interface(
        &self,
        eni: &EniId,
        instance: &InstanceId,
        device_index: u32,
        delete_on_termination: bool,
    ) -> Result<AttachmentId> {
        let attachment = self
            .call(Operation::AttachNetworkInterface, false, |w, _| {
                w.attach_eni(eni, instance, device_index)
            })
            .await?;
        if delete_on_termination {
            // A second call, as in EC2: it draws from its own bucket and can fail after the attach succeeded.
            self.set_delete_on_termination(eni, &attachment, true)
                .await?;
        }
        Ok(attachment)
    }

    async fn set_delete_on_termination(
        &self,
        eni: &EniId,
        attachment: &AttachmentId,
        enabled: bool,
    ) -> Result<()> {
        self.call(Operation::ModifyNetworkInterfaceAttribute, false, |w, _| {
            let e = w.state.eni_mut(eni)?;
            match e.attachment.as_mut() {
                Some(a) if &a.id == attachment => {
                    a.delete_on_termination = enabled;
                    Ok(())
                }
                _ => Err(err(
                    "InvalidAttachmentID.NotFound",
                    format!("The attachment ID '{attachment}' does not exist"),
                )),
            }
        })
        .await
    }

    async fn detach_network_interface(
        &self,
        attachment: &AttachmentId,
        _force: bool,
    ) -> Result<()> {
        self.call(Operation::DetachNetworkInterface, false, |w, _| {
            let eni = w
                .state
                .attachments
                .get(attachment)
                .cloned()
                .ok_or_else(|| {
                    err(
                        "InvalidAttachmentID.NotFound",
                        format!("The attachment ID '{attachment}' does not exist"),
                    )
                })?;
            let a = w
                .state
                .eni(&eni)?
                .attachment
                .clone()
                .expect("indexed attachment");
            if a.device_index == 0 {
                return Err(err(
                    "OperationNotPermitted",
                    format!(
                        "The network interface at device index 0 cannot be detached ({eni}, {}).",
                        a.instance
                    ),
                ));
            }
            w.detach(&eni);
            w.emit(Event::EniDetached {
                eni,
                instance: a.instance,
                device_index: a.device_index,
            });
            Ok(())
        })
        .await
    }

    async fn delete_network_interface(&self, eni: &EniId) -> Result<()> {
        self.call(Operation::DeleteNetworkInterface, false, |w, _| {
            let e = w.state.eni(eni)?;
            if e.attachment.is_some() || e.status != EniStatus::Available {
                return Err(err(
                    "InvalidNetworkInterface.InUse",
                    format!("Network interface '{eni}' is currently in use."),
                ));
            }
            w.remove_eni(eni);
            Ok(())
        })
        .await
    }

    async fn assign_private_ips(
        &self,
        eni: &EniId,
        request: &AddressRequest<Ipv4Addr>,
    ) -> Result<Vec<Ipv4Addr>> {
        self.call(Operation::AssignPrivateIpAddresses, false, |w, _| {
            w.assign_ips(eni, request)
        })
        .await
    }

    async fn unassign_private_ips(&self, eni: &EniId, addresses: &[Ipv4Addr]) -> Result<()> {
        self.call(Operation::UnassignPrivateIpAddresses, false, |w, _| {
            w.unassign_ips(eni, addresses)
        })
        .await
    }

    async fn assign_prefixes(
        &self,
        eni: &EniId,
        request: &AddressRequest<Ipv4Net>,
    ) -> Result<Vec<Ipv4Net>> {
        self.call(Operation::AssignPrivateIpAddresses, false, |w, _| {
            w.assign_prefixes(eni, request)
        })
        .await
    }

    async fn unassign_prefixes(&self, eni: &EniId, prefixes: &[Ipv4Net]) -> Result<()> {
        self.call(Operation::UnassignPrivateIpAddresses, false, |w, _| {
            w.unassign_prefixes(eni, prefixes)
        })
        .await
    }

    async fn set_source_dest_check(&self, eni: &EniId, enabled: bool) -> Result<()> {
        self.call(Operation::ModifyNetworkInterfaceAttribute, false, |w, _| {
            w.state.eni_mut(eni)?.source_dest_check = enabled;
            w.emit(Event::SourceDestCheckChanged {
                eni: eni.clone(),
                enabled,
            });
            Ok(())
        })
        .await
    }

    async fn create_tags(&self, resources: &[String], tags: &Tags) -> Result<()> {
        self.call(Operation::CreateTags, false, |w, _| {
            if resources.is_empty() {
                return Err(err(
                    "MissingParameter",
                    "The request must contain the parameter ResourceId",
                ));
            }
            // Validate every resource before tagging any.
            for r in resources {
                let have = w.state.tags_mut(r)?;
                let merged = have
                    .keys()
                    .chain(tags.keys())
                    .collect::<BTreeSet<_>>()
                    .len();
                if merged > TAG_LIMIT {
                    return Err(err(
                        "TagLimitExceeded",
                        format!("The maximum number of tags per resource is {TAG_LIMIT} ({r})"),
                    ));
                }
            }
            for r in resources {
                let have = w.state.tags_mut(r)?;
                have.extend(tags.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            // Instances' ENIs are separate resources: tagging an instance does not tag its ENIs (as in EC2).
            Ok(())
        })
        .await
    }
}
