//! An rtnetlink client bound in one network namespace: the requests the daemon makes of a
//! namespace's links, addresses, routes, neighbours, bridge ports and namespace ids, and the
//! routes and rules it adds (TPROXY, VM interfaces). No external command.

use std::{fs::File, net::IpAddr, os::fd::AsRawFd, path::Path};

use anyhow::{bail, Context as _, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
    nsid::{NsidAttribute, NsidMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};

/// What we read of a link.
pub(crate) struct Link {
    pub(crate) name: String,
    pub(crate) kind: Option<InfoKind>,
    /// The namespace id of the peer (veth) as seen from the node's namespace.
    pub(crate) peer_nsid: Option<i32>,
}

/// An rtnetlink socket, bound in one network namespace.
pub(crate) struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    fn socket() -> Result<Socket> {
        let mut sock = Socket::new(NETLINK_ROUTE).context("rtnetlink socket")?;
        sock.bind_auto().context("binding rtnetlink")?;
        Ok(sock)
    }

    /// Opens the socket in the node's namespace: `netns` when given, else the daemon's own.
    pub(crate) fn open(netns: Option<&Path>) -> Result<Self> {
        match netns {
            Some(p) => Self::open_in(
                &File::open(p).with_context(|| format!("opening node netns {}", p.display()))?,
            ),
            None => Ok(Self {
                sock: Self::socket()?,
                seq: 0,
            }),
        }
    }

    /// Opens the socket inside the namespace `ns` (it stays bound there).
    pub(crate) fn open_in(ns: &File) -> Result<Self> {
        let sock = crate::podns::nsenter::run_in(ns, Self::socket)?;
        Ok(Self { sock, seq: 0 })
    }

    /// Adds an object (`ip rule add`, `ip route add`): `Ok(false)` if it was there already.
    pub(crate) fn add(&mut self, msg: RouteNetlinkMessage) -> Result<bool> {
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        match self.exchange(msg, flags) {
            Ok(_) => Ok(true),
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .and_then(std::io::Error::raw_os_error)
                    == Some(libc::EEXIST) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends one request and collects the replies (all parts of a dump).
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        dump: bool,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.exchange(msg, NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 })
    }

    /// Sends one message with `flags` and collects the replies (all parts of a dump).
    fn exchange(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        let dump = flags & NLM_F_DUMP != 0;
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0).context("rtnetlink send")?;
        let mut out = Vec::new();
        let mut rx: Vec<u8> = Vec::with_capacity(64 * 1024);
        loop {
            rx.clear();
            let n = self.sock.recv(&mut rx, 0).context("rtnetlink recv")?;
            let n = n.min(rx.len());
            let mut off = 0;
            while off < n {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[off..n])
                    .context("parsing an rtnetlink reply")?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => match e.code {
                        Some(_) => return Err(e.to_io()).context("rtnetlink request refused"),
                        None => return Ok(out),
                    },
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        if !dump {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// `ip addr`: every address configured in the socket's namespace (each address's local
    /// address where it has one, as `getifaddrs` gives it).
    pub(crate) fn addresses(&mut self) -> Result<Vec<IpAddr>> {
        Ok(self
            .addresses_by_link()?
            .into_iter()
            .map(|(_, ip)| ip)
            .collect())
    }

    /// `ip -o addr` with each address's interface index.
    pub(crate) fn addresses_by_link(&mut self) -> Result<Vec<(u32, IpAddr)>> {
        let replies = self
            .request(
                RouteNetlinkMessage::GetAddress(AddressMessage::default()),
                true,
            )
            .context("listing addresses")?;
        let mut out = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewAddress(m) = r else {
                continue;
            };
            let index = m.header.index;
            let (mut local, mut address) = (None, None);
            for a in m.attributes {
                match a {
                    AddressAttribute::Local(ip) => local = Some(ip),
                    AddressAttribute::Address(ip) => address = Some(ip),
                    _ => {}
                }
            }
            out.extend(local.or(address).map(|ip| (index, ip)));
        }
        Ok(out)
    }

    /// `ip link`: every interface's index and name.
    pub(crate) fn links(&mut self) -> Result<Vec<(u32, String)>> {
        let replies = self
            .request(RouteNetlinkMessage::GetLink(LinkMessage::default()), true)
            .context("listing links")?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => {
                    let name = l.attributes.iter().find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })?;
                    Some((l.header.index, name))
                }
                _ => None,
            })
            .collect())
    }

    /// `ip route show table main` of both families, unicast routes only: each route's
    /// destination network and output interface.
    pub(crate) fn main_routes(&mut self) -> Result<Vec<(IpAddr, u8, u32)>> {
        const MAIN_TABLE: u8 = 254;
        let replies = self
            .request(RouteNetlinkMessage::GetRoute(RouteMessage::default()), true)
            .context("listing routes")?;
        let mut out = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewRoute(m) = r else {
                continue;
            };
            if m.header.table != MAIN_TABLE || m.header.kind != RouteType::Unicast {
                continue;
            }
            let len = m.header.destination_prefix_length;
            let mut dst = match m.header.address_family {
                AddressFamily::Inet => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                _ => continue,
            };
            let mut oif = None;
            for a in m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = IpAddr::V4(a),
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = IpAddr::V6(a),
                    RouteAttribute::Oif(i) => oif = Some(i),
                    _ => {}
                }
            }
            out.extend(oif.map(|oif| (dst, len, oif)));
        }
        Ok(out)
    }

    /// `ip route get IP`: the output interface and gateway, if any.
    pub(crate) fn route_to(&mut self, ip: IpAddr) -> Result<(u32, Option<IpAddr>)> {
        let mut m = RouteMessage::default();
        let (family, len, dst) = match ip {
            IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
            IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
        };
        m.header.address_family = family;
        m.header.destination_prefix_length = len;
        m.attributes.push(RouteAttribute::Destination(dst));
        let replies = self
            .request(RouteNetlinkMessage::GetRoute(m), false)
            .with_context(|| format!("asking the node's route to {ip}"))?;
        let Some(RouteNetlinkMessage::NewRoute(r)) = replies.into_iter().next() else {
            bail!("no route to {ip} on the node");
        };
        if r.header.kind != RouteType::Unicast {
            bail!(
                "the node's route to {ip} is {:?}, not a route to a pod",
                r.header.kind
            );
        }
        let mut oif = None;
        let mut gateway = None;
        for a in r.attributes {
            match a {
                RouteAttribute::Oif(i) => oif = Some(i),
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(IpAddr::V4(g)),
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gateway = Some(IpAddr::V6(g)),
                _ => {}
            }
        }
        Ok((
            oif.with_context(|| format!("the route to {ip} names no interface"))?,
            gateway,
        ))
    }

    pub(crate) fn link(&mut self, index: u32) -> Result<Link> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        let replies = self
            .request(RouteNetlinkMessage::GetLink(m), false)
            .with_context(|| format!("reading link {index}"))?;
        let Some(RouteNetlinkMessage::NewLink(l)) = replies.into_iter().next() else {
            bail!("link {index} not found");
        };
        let mut link = Link {
            name: format!("#{index}"),
            kind: None,
            peer_nsid: None,
        };
        for a in l.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::LinkNetNsId(id) => link.peer_nsid = Some(id),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            link.kind = Some(k);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(link)
    }

    /// The MAC of the node's neighbour entry for `ip` on `ifindex`.
    pub(crate) fn neighbour_mac(&mut self, ip: IpAddr, ifindex: u32) -> Result<Option<Vec<u8>>> {
        let mut m = NeighbourMessage::default();
        m.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        let replies = self
            .request(RouteNetlinkMessage::GetNeighbour(m), true)
            .context("listing the node's neighbours")?;
        for r in replies {
            let RouteNetlinkMessage::NewNeighbour(n) = r else {
                continue;
            };
            if n.header.ifindex != ifindex {
                continue;
            }
            let mut dst = None;
            let mut mac = None;
            for a in n.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                        dst = Some(IpAddr::V4(a))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        dst = Some(IpAddr::V6(a))
                    }
                    NeighbourAttribute::LinkLocalAddress(l) => mac = Some(l),
                    _ => {}
                }
            }
            if dst == Some(ip) && mac.as_ref().is_some_and(|m| m.iter().any(|&b| b != 0)) {
                return Ok(mac);
            }
        }
        Ok(None)
    }

    /// The port of bridge `bridge` behind which `mac` was learned (its forwarding database).
    pub(crate) fn bridge_port(&mut self, bridge: u32, mac: &[u8]) -> Result<Option<u32>> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        let replies = self
            .request(RouteNetlinkMessage::GetNeighbour(m), true)
            .context("listing the bridge forwarding database")?;
        for r in replies {
            let RouteNetlinkMessage::NewNeighbour(n) = r else {
                continue;
            };
            let port = n.header.ifindex;
            if port == bridge {
                continue;
            }
            let mut master = None;
            let mut lladdr = None;
            for a in n.attributes {
                match a {
                    NeighbourAttribute::Controller(c) => master = Some(c),
                    NeighbourAttribute::LinkLocalAddress(l) => lladdr = Some(l),
                    _ => {}
                }
            }
            if master == Some(bridge) && lladdr.as_deref() == Some(mac) {
                return Ok(Some(port));
            }
        }
        Ok(None)
    }

    /// The namespace id the node's namespace gives the namespace of `ns`, if any.
    pub(crate) fn nsid_of(&mut self, ns: &File) -> Result<Option<i32>> {
        let mut m = NsidMessage::default();
        m.attributes.push(NsidAttribute::Fd(ns.as_raw_fd() as u32));
        let replies = self.request(RouteNetlinkMessage::GetNsId(m), false)?;
        for r in replies {
            if let RouteNetlinkMessage::NewNsId(m) = r {
                for a in m.attributes {
                    if let NsidAttribute::Id(id) = a {
                        return Ok((id >= 0).then_some(id));
                    }
                }
            }
        }
        Ok(None)
    }
}
