//! A synchronous NETLINK_ROUTE client with typed operations. One request, one acknowledgement: no runtime,
//! no background task, a handful of system calls per operation. Messages are built with rtnetlink's typed
//! builders where it has them, and netlink-packet-route's types otherwise.

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol,
    RouteScope as NlScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::{Error, Mac, Netns, Result};

/// Receive buffer: large enough for one datagram of a dump (the kernel caps those at 32 KiB).
const RECV_BUF: usize = 64 * 1024;

pub(crate) fn open_socket_here() -> Result<Socket> {
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(|e| Error::kernel("netlink socket", e))?;
    sock.bind_auto()
        .map_err(|e| Error::kernel("netlink bind", e))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(|e| Error::kernel("netlink connect", e))?;
    // Extended acks give better messages; strict checking makes the kernel filter dumps for us.
    let _ = sock.set_ext_ack(true);
    let _ = sock.set_netlink_get_strict_chk(true);
    Ok(sock)
}

/// A network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<Mac>,
    pub mtu: u32,
    pub up: bool,
    /// `veth`, `bridge`, … (None for devices without a kind, such as `lo`).
    pub kind: Option<String>,
    /// IFLA_LINK when it differs from `index`: for a veth, the peer's ifindex *in the peer's namespace*, so the
    /// creator of a pair learns the far end's index without a lookup there.
    pub peer_index: Option<u32>,
}

/// A veth pair to create. The peer can be created directly inside another namespace, so it never appears in
/// (and never has to be moved out of) the namespace of the socket.
#[derive(Debug, Clone)]
pub struct VethSpec<'a> {
    pub name: &'a str,
    pub peer_name: &'a str,
    pub peer_netns: Option<&'a Netns>,
    pub mtu: Option<u32>,
    pub mac: Option<Mac>,
    pub peer_mac: Option<Mac>,
    /// Bring the local end up as part of the creation. The peer cannot be: the kernel opens it before the
    /// pair is joined (ENOTCONN), so the peer's owner sets it up with [`Netlink::link_set_up`].
    pub up: bool,
}

/// Route scope, as `ip route … scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteScope {
    Universe,
    Link,
    Host,
}

impl From<RouteScope> for NlScope {
    fn from(s: RouteScope) -> Self {
        match s {
            RouteScope::Universe => NlScope::Universe,
            RouteScope::Link => NlScope::Link,
            RouteScope::Host => NlScope::Host,
        }
    }
}

/// A unicast route. `table` 254 is `main`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub via: Option<IpAddr>,
    pub oif: Option<u32>,
    pub table: u32,
    pub scope: RouteScope,
    pub onlink: bool,
}

impl Route {
    /// The main table.
    pub const MAIN: u32 = 254;

    /// `dst dev <oif> scope link` in the main table.
    pub fn link(dst: IpNet, oif: u32) -> Self {
        Route {
            dst,
            via: None,
            oif: Some(oif),
            table: Self::MAIN,
            scope: RouteScope::Link,
            onlink: false,
        }
    }

    /// `dst via <gw> dev <oif> onlink` in the main table.
    pub fn via_onlink(dst: IpNet, gw: IpAddr, oif: u32) -> Self {
        Route {
            dst,
            via: Some(gw),
            oif: Some(oif),
            table: Self::MAIN,
            scope: RouteScope::Universe,
            onlink: true,
        }
    }

    fn message(&self) -> RouteMessage {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(self.dst.addr(), self.dst.prefix_len())
            .expect("address family matches by construction")
            .table_id(self.table)
            .scope(self.scope.into())
            .protocol(RouteProtocol::Static)
            .kind(RouteType::Unicast);
        if let Some(gw) = self.via {
            b = b.gateway(gw).expect("gateway family is checked by callers");
        }
        if let Some(oif) = self.oif {
            b = b.output_interface(oif);
        }
        if self.onlink {
            b = b.onlink();
        }
        b.build()
    }

    fn from_message(m: &RouteMessage) -> Option<Self> {
        let mut dst = None;
        let mut via = None;
        let mut oif = None;
        let mut table = u32::from(m.header.table);
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(addr) => dst = route_addr(addr),
                RouteAttribute::Gateway(addr) => via = route_addr(addr),
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Table(t) => table = *t,
                _ => {}
            }
        }
        let dst = match (dst, m.header.address_family) {
            (Some(a), _) => IpNet::new(a, m.header.destination_prefix_length).ok()?,
            (None, AddressFamily::Inet) => "0.0.0.0/0".parse().ok()?,
            (None, AddressFamily::Inet6) => "::/0".parse().ok()?,
            _ => return None,
        };
        let scope = match m.header.scope {
            NlScope::Link => RouteScope::Link,
            NlScope::Host => RouteScope::Host,
            _ => RouteScope::Universe,
        };
        Some(Route {
            dst,
            via,
            oif,
            table,
            scope,
            onlink: m.header.flags.contains(RouteFlags::Onlink),
        })
    }
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A policy routing rule: `ip rule add priority P [from F] [to T] lookup TABLE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub priority: u32,
    pub from: Option<IpNet>,
    pub to: Option<IpNet>,
    pub table: u32,
    pub v6: bool,
}

impl Rule {
    fn message(&self) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = if self.v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        m.header.action = RuleAction::ToTable;
        m.header.table = if self.table < 256 {
            self.table as u8
        } else {
            0
        };
        m.attributes.push(RuleAttribute::Table(self.table));
        m.attributes.push(RuleAttribute::Priority(self.priority));
        if let Some(f) = self.from {
            m.header.src_len = f.prefix_len();
            m.attributes.push(RuleAttribute::Source(f.addr()));
        }
        if let Some(t) = self.to {
            m.header.dst_len = t.prefix_len();
            m.attributes.push(RuleAttribute::Destination(t.addr()));
        }
        m
    }

    fn from_message(m: &RuleMessage) -> Self {
        let mut r = Rule {
            priority: 0,
            from: None,
            to: None,
            table: u32::from(m.header.table),
            v6: m.header.family == AddressFamily::Inet6,
        };
        for a in &m.attributes {
            match a {
                RuleAttribute::Priority(p) => r.priority = *p,
                RuleAttribute::Table(t) => r.table = *t,
                RuleAttribute::Source(s) => r.from = IpNet::new(*s, m.header.src_len).ok(),
                RuleAttribute::Destination(d) => r.to = IpNet::new(*d, m.header.dst_len).ok(),
                _ => {}
            }
        }
        r
    }
}

/// A neighbour (ARP/NDP) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub ip: IpAddr,
    pub mac: Option<Mac>,
    pub permanent: bool,
}

/// A NETLINK_ROUTE socket bound to the namespace it was opened in. Not `Sync`: one user at a time.
#[derive(Debug)]
pub struct Netlink {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// A socket in the calling thread's namespace.
    pub fn open_here() -> Result<Self> {
        Ok(Netlink {
            sock: open_socket_here()?,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    fn send(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: &dyn Fn() -> String,
    ) -> Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut out = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut out);
        self.sock
            .send(&out, 0)
            .map_err(|e| Error::kernel(op(), e))?;
        Ok(self.seq)
    }

    /// Reads datagrams until the reply to `seq` is complete; `on_msg` gets every inner message.
    fn receive(
        &mut self,
        seq: u32,
        dump: bool,
        op: &dyn Fn() -> String,
        on_msg: &mut dyn FnMut(RouteNetlinkMessage),
    ) -> Result<()> {
        loop {
            let n = loop {
                let mut slice = &mut self.buf[..];
                match self.sock.recv(&mut slice, 0) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::kernel(op(), e)),
                }
            };
            let mut off = 0;
            while off < n.min(self.buf.len()) {
                let bytes = &self.buf[off..n.min(self.buf.len())];
                let len = NetlinkBuffer::new_checked(bytes)
                    .map_err(|e| Error::Protocol {
                        op: op(),
                        detail: e.to_string(),
                    })?
                    .length() as usize;
                if len == 0 {
                    break;
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(
                    &bytes[..len.min(bytes.len())],
                )
                .map_err(|e| Error::Protocol {
                    op: op(),
                    detail: e.to_string(),
                })?;
                off += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue; // a stale reply to an earlier request
                }
                match msg.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(Error::errno(op(), -code.get())),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::InnerMessage(m) => {
                        on_msg(m);
                        if !dump && msg.header.flags & netlink_packet_core::NLM_F_MULTIPART == 0 {
                            return Ok(());
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends a change and waits for the kernel's acknowledgement.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: &dyn Fn() -> String,
    ) -> Result<()> {
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_ACK | flags, op)?;
        self.receive(seq, false, op, &mut |_| {})
    }

    fn dump(
        &mut self,
        msg: RouteNetlinkMessage,
        op: &dyn Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_DUMP, op)?;
        let mut out = Vec::new();
        self.receive(seq, true, op, &mut |m| out.push(m))?;
        Ok(out)
    }

    // ---- tc (the fast path's qdisc and filters) ----

    /// Names of the BPF filters on the ingress hook of link `index` (`tc filter show dev … ingress`); a
    /// missing link or qdisc is an empty list.
    pub fn tc_ingress_bpf_filters(&mut self, index: u32) -> Result<Vec<String>> {
        self.tc_bpf_filters(index, true)
    }

    /// Names of the BPF filters on the ingress (or egress) hook of link `index`.
    pub fn tc_bpf_filters(&mut self, index: u32, ingress: bool) -> Result<Vec<String>> {
        use netlink_packet_route::tc::{
            TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption,
        };
        let hook = if ingress { "ingress" } else { "egress" };
        let mut msg = TcMessage::with_index(index as i32);
        msg.header.parent = TcHandle {
            major: TcHandle::CLSACT.major,
            minor: if ingress {
                TcHandle::MIN_INGRESS
            } else {
                TcHandle::MIN_EGRESS
            },
        };
        let op = || format!("tc filter show ifindex {index} {hook}");
        let replies = match self.dump(RouteNetlinkMessage::GetTrafficFilter(msg), &op) {
            Ok(r) => r,
            Err(e) if e.is_missing() || e.raw_errno() == Some(libc::EINVAL) => return Ok(vec![]),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewTrafficFilter(f) = m else {
                continue;
            };
            for a in &f.attributes {
                if let TcAttribute::Options(opts) = a {
                    for o in opts {
                        if let TcOption::Bpf(TcFilterBpfOption::ProgName(n)) = o {
                            names.push(n.clone());
                        }
                    }
                }
            }
        }
        Ok(names)
    }

    /// Whether link `index` has a `clsact` qdisc.
    pub fn has_clsact(&mut self, index: u32) -> Result<bool> {
        use netlink_packet_route::tc::{TcAttribute, TcMessage};
        let msg = TcMessage::with_index(index as i32);
        let op = || format!("tc qdisc show ifindex {index}");
        let replies = self.dump(RouteNetlinkMessage::GetQueueDiscipline(msg), &op)?;
        Ok(replies.iter().any(|m| {
            matches!(m, RouteNetlinkMessage::NewQueueDiscipline(q)
                if q.header.index == index as i32
                    && q.attributes.iter().any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact")))
        }))
    }

    /// Deletes the `clsact` qdisc of link `index` (and with it every filter on it); already gone is success.
    pub fn clsact_del(&mut self, index: u32) -> Result<()> {
        use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage};
        let mut msg = TcMessage::with_index(index as i32);
        msg.header.parent = TcHandle::CLSACT;
        msg.header.handle = TcHandle {
            major: TcHandle::CLSACT.major,
            minor: 0,
        };
        msg.attributes.push(TcAttribute::Kind("clsact".into()));
        match self.request(RouteNetlinkMessage::DelQueueDiscipline(msg), 0, &|| {
            format!("tc qdisc del ifindex {index} clsact")
        }) {
            Err(e) if e.is_missing() || e.raw_errno() == Some(libc::EINVAL) => Ok(()),
            r => r,
        }
    }

    // ---- links ----

    /// The link called `name`; a missing link is `Ok(None)`.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        let msg = LinkUnspec::new_with_name(name).build();
        let seq = self.send(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST, &|| {
            format!("link get {name}")
        })?;
        let mut found = None;
        let res = self.receive(seq, false, &|| format!("link get {name}"), &mut |m| {
            if let RouteNetlinkMessage::NewLink(l) = m {
                found = Some(link_from(&l));
            }
        });
        match res {
            Ok(()) => Ok(found),
            Err(e) if e.is_missing() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let msg = LinkMessage::default();
        Ok(self
            .dump(RouteNetlinkMessage::GetLink(msg), &|| "link dump".into())?
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(l)),
                _ => None,
            })
            .collect())
    }

    /// Creates a veth pair (EEXIST if `name` exists: see [`crate::ResultExt::ignore_exists`]).
    pub fn veth_add(&mut self, spec: &VethSpec<'_>) -> Result<()> {
        let mut peer = LinkMessageBuilder::<LinkUnspec>::new().name(spec.peer_name.to_string());
        if let Some(mtu) = spec.mtu {
            peer = peer.mtu(mtu);
        }
        if let Some(mac) = spec.peer_mac {
            peer = peer.address(mac.to_vec());
        }
        if let Some(ns) = spec.peer_netns {
            peer = peer.setns_by_fd(ns.raw_fd());
        }
        let mut b = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(spec.name.to_string())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())));
        if let Some(mtu) = spec.mtu {
            b = b.mtu(mtu);
        }
        if let Some(mac) = spec.mac {
            b = b.address(mac.to_vec());
        }
        if spec.up {
            b = b.up();
        }
        let op = || format!("veth add {} peer {}", spec.name, spec.peer_name);
        self.request(
            RouteNetlinkMessage::NewLink(b.build()),
            NLM_F_CREATE | NLM_F_EXCL,
            &op,
        )
    }

    fn link_set(&mut self, msg: LinkMessage, op: &dyn Fn() -> String) -> Result<()> {
        self.request(RouteNetlinkMessage::SetLink(msg), 0, op)
    }

    pub fn link_set_up(&mut self, index: u32, up: bool) -> Result<()> {
        let b = LinkUnspec::new_with_index(index);
        let msg = if up { b.up() } else { b.down() }.build();
        self.link_set(msg, &|| {
            format!("link set {index} {}", if up { "up" } else { "down" })
        })
    }

    pub fn link_set_mtu(&mut self, index: u32, mtu: u32) -> Result<()> {
        self.link_set(LinkUnspec::new_with_index(index).mtu(mtu).build(), &|| {
            format!("link set {index} mtu {mtu}")
        })
    }

    pub fn link_set_name(&mut self, index: u32, name: &str) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index)
            .name(name.to_string())
            .build();
        self.link_set(msg, &|| format!("link set {index} name {name}"))
    }

    /// Moves a link into another namespace.
    pub fn link_set_netns(&mut self, index: u32, ns: &Netns) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index)
            .setns_by_fd(ns.as_raw_fd_for_netlink())
            .build();
        self.link_set(msg, &|| {
            format!("link set {index} netns {}", ns.path().display())
        })
    }

    pub fn link_del(&mut self, index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).build();
        self.request(RouteNetlinkMessage::DelLink(msg), 0, &|| {
            format!("link del {index}")
        })
    }

    /// Deletes a link by name (ENODEV if missing: see [`crate::ResultExt::ignore_missing`]).
    pub fn link_del_by_name(&mut self, name: &str) -> Result<()> {
        let msg = LinkUnspec::new_with_name(name).build();
        self.request(RouteNetlinkMessage::DelLink(msg), 0, &|| {
            format!("link del {name}")
        })
    }

    // ---- addresses ----

    fn addr_message(index: u32, net: IpNet) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.family = family(net.addr());
        m.header.prefix_len = net.prefix_len();
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(net.addr()));
        m.attributes.push(AddressAttribute::Address(net.addr()));
        m
    }

    pub fn addr_add(&mut self, index: u32, net: IpNet) -> Result<()> {
        let msg = Self::addr_message(index, net);
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| format!("addr add {net} dev {index}"),
        )
    }

    /// Adds the address without the prefix route the kernel would otherwise put in `main`
    /// (`ip addr add … noprefixroute`).
    pub fn addr_add_no_prefix_route(&mut self, index: u32, net: IpNet) -> Result<()> {
        let mut msg = Self::addr_message(index, net);
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Noprefixroute));
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| format!("addr add {net} dev {index} noprefixroute"),
        )
    }

    pub fn addr_del(&mut self, index: u32, net: IpNet) -> Result<()> {
        let msg = Self::addr_message(index, net);
        self.request(RouteNetlinkMessage::DelAddress(msg), 0, &|| {
            format!("addr del {net} dev {index}")
        })
    }

    /// Addresses on one link.
    pub fn addrs(&mut self, index: u32) -> Result<Vec<IpNet>> {
        Ok(self
            .addrs_all()?
            .into_iter()
            .filter(|(i, _)| *i == index)
            .map(|(_, net)| net)
            .collect())
    }

    /// Every address of every link, as (link index, address) — one dump.
    pub fn addrs_all(&mut self) -> Result<Vec<(u32, IpNet)>> {
        let q = AddressMessage::default();
        let msgs = self.dump(RouteNetlinkMessage::GetAddress(q), &|| {
            "addr dump".to_string()
        })?;
        let mut out = Vec::new();
        for m in msgs {
            if let RouteNetlinkMessage::NewAddress(a) = m {
                let index = a.header.index;
                let ip = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let ip = ip.or_else(|| {
                    a.attributes.iter().find_map(|x| match x {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                });
                if let Some(net) = ip.and_then(|ip| IpNet::new(ip, a.header.prefix_len).ok()) {
                    out.push((index, net));
                }
            }
        }
        Ok(out)
    }

    // ---- routes ----

    pub fn route_add(&mut self, route: &Route) -> Result<()> {
        self.request(
            RouteNetlinkMessage::NewRoute(route.message()),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| format!("route add {route:?}"),
        )
    }

    /// Adds or replaces the route to `route.dst` in its table.
    pub fn route_replace(&mut self, route: &Route) -> Result<()> {
        self.request(
            RouteNetlinkMessage::NewRoute(route.message()),
            NLM_F_CREATE | NLM_F_REPLACE,
            &|| format!("route replace {route:?}"),
        )
    }

    pub fn route_del(&mut self, route: &Route) -> Result<()> {
        let mut m = route.message();
        // Match any scope and protocol, like `ip route del`.
        m.header.scope = NlScope::NoWhere;
        m.header.protocol = RouteProtocol::Unspec;
        self.request(RouteNetlinkMessage::DelRoute(m), 0, &|| {
            format!("route del {route:?}")
        })
    }

    /// Unicast routes of one table, both families.
    pub fn routes(&mut self, table: u32) -> Result<Vec<Route>> {
        let mut out = Vec::new();
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut q = RouteMessage::default();
            q.header.address_family = fam;
            q.header.table = if table < 256 {
                table as u8
            } else {
                RouteHeader::RT_TABLE_UNSPEC
            };
            q.attributes.push(RouteAttribute::Table(table));
            for m in self.dump(RouteNetlinkMessage::GetRoute(q), &|| {
                format!("route dump table {table}")
            })? {
                if let RouteNetlinkMessage::NewRoute(r) = m {
                    if r.header.kind != RouteType::Unicast {
                        continue;
                    }
                    if let Some(route) = Route::from_message(&r)
                        && route.table == table
                    {
                        out.push(route);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Unicast IPv4 routes of every table (one dump), for owners of a range of tables.
    pub fn routes_v4_all_tables(&mut self) -> Result<Vec<Route>> {
        let mut q = RouteMessage::default();
        q.header.address_family = AddressFamily::Inet;
        q.header.table = RouteHeader::RT_TABLE_UNSPEC;
        let mut out = Vec::new();
        for m in self.dump(RouteNetlinkMessage::GetRoute(q), &|| {
            "route dump (all tables)".into()
        })? {
            if let RouteNetlinkMessage::NewRoute(r) = m
                && r.header.kind == RouteType::Unicast
                && let Some(route) = Route::from_message(&r)
            {
                out.push(route);
            }
        }
        Ok(out)
    }

    // ---- rules ----

    pub fn rule_add(&mut self, rule: &Rule) -> Result<()> {
        self.request(
            RouteNetlinkMessage::NewRule(rule.message()),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| format!("rule add {rule:?}"),
        )
    }

    pub fn rule_del(&mut self, rule: &Rule) -> Result<()> {
        self.request(RouteNetlinkMessage::DelRule(rule.message()), 0, &|| {
            format!("rule del {rule:?}")
        })
    }

    pub fn rules(&mut self, v6: bool) -> Result<Vec<Rule>> {
        let mut q = RuleMessage::default();
        q.header.family = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        Ok(self
            .dump(RouteNetlinkMessage::GetRule(q), &|| "rule dump".into())?
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => Some(Rule::from_message(r)),
                _ => None,
            })
            .collect())
    }

    // ---- neighbours ----

    /// Adds (or replaces) a permanent neighbour entry `ip lladdr mac dev index nud permanent`.
    pub fn neigh_add_permanent(&mut self, index: u32, ip: IpAddr, mac: Mac) -> Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = family(ip);
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.header.kind = RouteType::Unspec;
        m.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.request(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
            &|| format!("neigh replace {ip} dev {index}"),
        )
    }

    pub fn neigh_del(&mut self, index: u32, ip: IpAddr) -> Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = family(ip);
        m.header.ifindex = index;
        m.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
        self.request(RouteNetlinkMessage::DelNeighbour(m), 0, &|| {
            format!("neigh del {ip} dev {index}")
        })
    }

    /// Neighbour entries on one link.
    pub fn neighbours(&mut self, index: u32) -> Result<Vec<Neighbour>> {
        let mut out = Vec::new();
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut q = NeighbourMessage::default();
            q.header.family = fam;
            for m in self.dump(RouteNetlinkMessage::GetNeighbour(q), &|| {
                format!("neigh dump dev {index}")
            })? {
                let RouteNetlinkMessage::NewNeighbour(n) = m else {
                    continue;
                };
                if n.header.ifindex != index {
                    continue;
                }
                let mut ip = None;
                let mut mac = None;
                for a in &n.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                            ip = Some(IpAddr::V4(*v4))
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                            ip = Some(IpAddr::V6(*v6))
                        }
                        NeighbourAttribute::LinkLayerAddress(l) => {
                            mac = l.as_slice().try_into().ok()
                        }
                        _ => {}
                    }
                }
                if let Some(ip) = ip {
                    out.push(Neighbour {
                        ifindex: index,
                        ip,
                        mac,
                        permanent: n.header.state == NeighbourState::Permanent,
                    });
                }
            }
        }
        Ok(out)
    }
}

impl Netns {
    fn as_raw_fd_for_netlink(&self) -> std::os::fd::RawFd {
        self.as_fd_raw()
    }
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn link_from(l: &LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: l.header.flags.contains(LinkFlags::Up),
        kind: None,
        peer_index: None,
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::Link(i) => link.peer_index = Some(*i),
            LinkAttribute::Address(mac) => link.mac = mac.as_slice().try_into().ok(),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        link.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_round_trips_through_its_message() {
        let r = Route::via_onlink(
            "0.0.0.0/0".parse().unwrap(),
            "169.254.1.1".parse().unwrap(),
            7,
        );
        let back = Route::from_message(&r.message()).unwrap();
        assert_eq!(back, r);
        let r = Route {
            table: 1000,
            ..Route::link("100.64.0.5/32".parse().unwrap(), 3)
        };
        assert_eq!(Route::from_message(&r.message()).unwrap(), r);
    }

    #[test]
    fn rule_round_trips_through_its_message() {
        let r = Rule {
            priority: 1536,
            from: Some("100.64.0.0/24".parse().unwrap()),
            to: None,
            table: 1001,
            v6: false,
        };
        assert_eq!(Rule::from_message(&r.message()), r);
    }
}
