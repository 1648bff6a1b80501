//! A small synchronous rtnetlink client for what the old ioctls cannot do: interface addresses,
//! bridge port flags, static FDB and permanent neighbour entries, route/link dumps and link
//! deletion.
//!
//! A netlink socket belongs to the network namespace it was opened in, whatever thread uses it
//! later; owners that must act on "their" namespace (a `Tap` deleting itself) keep their socket.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoBridgePort, InfoKind, InfoPortData, InfoPortKind, LinkAttribute, LinkInfo, LinkLayerType,
    LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAttribute, RouteHeader, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::config::Ipv4Cidr;
use crate::types::MacAddr;

/// What a link dump tells us about one interface.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<InfoKind>,
    pub ether: bool,
    pub controller: Option<u32>,
}

impl Link {
    /// A tap (not a tun): the tun driver's Ethernet-framed flavour.
    pub fn is_tap(&self) -> bool {
        self.kind == Some(InfoKind::Tun) && self.ether
    }
}

pub(crate) struct Netlink {
    socket: Socket,
    seq: u32,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").finish_non_exhaustive()
    }
}

impl Netlink {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { socket, seq: 0 })
    }

    /// Sends one request and collects the replies until the ACK (or the end of a dump).
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut replies = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(replies),
                        Some(_) => return Err(e.to_io()),
                    },
                    NetlinkPayload::InnerMessage(m) => {
                        replies.push(m);
                        if !dump && flags & NLM_F_ACK == 0 {
                            return Ok(replies);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn ack(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.request(message, NLM_F_ACK | flags).map(drop)
    }

    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let replies = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(l)),
                _ => None,
            })
            .collect())
    }

    pub fn link_by_name(&mut self, name: &str) -> io::Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.request(RouteNetlinkMessage::GetLink(msg), NLM_F_ACK) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(l)),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn link_by_index(&mut self, index: u32) -> io::Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        match self.request(RouteNetlinkMessage::GetLink(msg), NLM_F_ACK) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(l)),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.ack(RouteNetlinkMessage::DelLink(msg), 0)
    }

    /// Puts a bridge port into isolated mode: isolated ports only talk to non-isolated ones (the
    /// bridge itself), never to each other. No ioctl exists for this flag.
    pub fn set_port_isolated(&mut self, index: u32) -> io::Result<()> {
        self.set_port_flags(index, vec![InfoBridgePort::Isolated(true)])
    }

    /// Locks a VM port to its static FDB entry: no address learning (a guest flooding random
    /// source MACs cannot grow the FDB) and no flooding of unknown unicast into it (a VM never
    /// sees frames meant for an address that is not its own).
    pub fn set_port_locked(&mut self, index: u32) -> io::Result<()> {
        self.set_port_flags(
            index,
            vec![
                InfoBridgePort::Learning(false),
                InfoBridgePort::UnicastFlood(false),
            ],
        )
    }

    fn set_port_flags(&mut self, index: u32, flags: Vec<InfoBridgePort>) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(flags)),
        ]));
        self.ack(RouteNetlinkMessage::NewLink(msg), 0)
    }

    /// Adds (or re-adds) an IPv4 address with its prefix; idempotent.
    pub fn add_address(&mut self, index: u32, cidr: Ipv4Cidr) -> io::Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = cidr.prefix_len;
        msg.header.index = index;
        let addr = IpAddr::V4(cidr.address);
        msg.attributes.push(AddressAttribute::Local(addr));
        msg.attributes.push(AddressAttribute::Address(addr));
        msg.attributes
            .push(AddressAttribute::Broadcast(cidr.broadcast()));
        self.ack(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// IPv4 addresses (with prefix) on an interface.
    pub fn addresses(&mut self, index: u32) -> io::Result<Vec<Ipv4Cidr>> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        let replies = self.request(RouteNetlinkMessage::GetAddress(msg), NLM_F_DUMP)?;
        let mut out = Vec::new();
        for reply in replies {
            let RouteNetlinkMessage::NewAddress(a) = reply else {
                continue;
            };
            if a.header.index != index {
                continue;
            }
            for attr in &a.attributes {
                if let AddressAttribute::Local(IpAddr::V4(v4)) = attr {
                    out.push(Ipv4Cidr {
                        address: *v4,
                        prefix_len: a.header.prefix_len,
                    });
                }
            }
        }
        Ok(out)
    }

    /// The output interface index of the main table's IPv4 default route, if any.
    pub fn default_route_interface(&mut self) -> io::Result<Option<u32>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let replies = self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_DUMP)?;
        let mut best: Option<(u32, u32)> = None; // (metric, oif)
        for reply in replies {
            let RouteNetlinkMessage::NewRoute(r) = reply else {
                continue;
            };
            if r.header.destination_prefix_length != 0
                || r.header.table != RouteHeader::RT_TABLE_MAIN
                || r.header.kind != RouteType::Unicast
            {
                continue;
            }
            let mut oif = None;
            let mut metric = 0;
            for attr in &r.attributes {
                match attr {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Priority(p) => metric = *p,
                    _ => {}
                }
            }
            if let Some(oif) = oif {
                if best.map_or(true, |(m, _)| metric < m) {
                    best = Some((metric, oif));
                }
            }
        }
        Ok(best.map(|(_, oif)| oif))
    }

    /// Sets a static FDB entry: frames to `mac` go out through the port `index` (`bridge fdb add
    /// MAC dev TAP master static`). With learning off on the port, this is the only way the
    /// bridge knows where the VM is; the kernel removes it with the port.
    pub fn add_static_fdb(&mut self, index: u32, mac: MacAddr) -> io::Result<()> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        // NUD_NOARP is "static" for the bridge; NUD_PERMANENT would mean "local to the bridge".
        msg.header.state = NeighbourState::Noarp;
        msg.header.flags = NeighbourFlags::Controller;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        self.ack(
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Pins `address` to `mac` in the neighbour table of interface `index` (NUD_PERMANENT): the
    /// kernel never replaces a permanent entry from received ARP, so no guest can redirect
    /// another VM's traffic by announcing its address.
    pub fn set_permanent_neighbour(
        &mut self,
        index: u32,
        address: Ipv4Addr,
        mac: MacAddr,
    ) -> io::Result<()> {
        let mut msg = neighbour_v4(index, address);
        msg.header.state = NeighbourState::Permanent;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        self.ack(
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// IPv4 addresses with a permanent neighbour entry on interface `index`.
    pub fn permanent_neighbours(&mut self, index: u32) -> io::Result<Vec<Ipv4Addr>> {
        Ok(self
            .neighbours(index)?
            .into_iter()
            .filter(|(_, state, _)| *state == NeighbourState::Permanent)
            .map(|(a, _, _)| a)
            .collect())
    }

    /// Removes the entry for `address` on interface `index` only while it still maps to `mac`
    /// (a later VM with the same address pins its own MAC; that entry must stay).
    pub fn delete_neighbour_of(
        &mut self,
        index: u32,
        address: Ipv4Addr,
        mac: MacAddr,
    ) -> io::Result<()> {
        let ours = self
            .neighbours(index)?
            .into_iter()
            .any(|(a, _, m)| a == address && m == Some(mac));
        if ours {
            self.delete_neighbour(index, address)?;
        }
        Ok(())
    }

    /// IPv4 neighbour entries on interface `index`: address, state, MAC.
    fn neighbours(
        &mut self,
        index: u32,
    ) -> io::Result<Vec<(Ipv4Addr, NeighbourState, Option<MacAddr>)>> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        let replies = self.request(RouteNetlinkMessage::GetNeighbour(msg), NLM_F_DUMP)?;
        let mut out = Vec::new();
        for reply in replies {
            let RouteNetlinkMessage::NewNeighbour(n) = reply else {
                continue;
            };
            if n.header.ifindex != index {
                continue;
            }
            let mut addr = None;
            let mut mac = None;
            for attr in &n.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => addr = Some(*a),
                    NeighbourAttribute::LinkLayerAddress(l) => {
                        mac = <[u8; 6]>::try_from(l.as_slice()).ok().map(MacAddr);
                    }
                    _ => {}
                }
            }
            if let Some(a) = addr {
                out.push((a, n.header.state, mac));
            }
        }
        Ok(out)
    }

    /// Removes the neighbour entry for `address` on interface `index` (absent: not an error).
    pub fn delete_neighbour(&mut self, index: u32, address: Ipv4Addr) -> io::Result<()> {
        match self.ack(
            RouteNetlinkMessage::DelNeighbour(neighbour_v4(index, address)),
            0,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }
}

fn neighbour_v4(index: u32, address: Ipv4Addr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.ifindex = index;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            address,
        )));
    msg
}

fn link_from(msg: LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        ether: msg.header.link_layer_type == LinkLayerType::Ether,
        controller: None,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Controller(c) => link.controller = Some(c),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(k) = info {
                        link.kind = Some(k);
                    }
                }
            }
            _ => {}
        }
    }
    link
}
