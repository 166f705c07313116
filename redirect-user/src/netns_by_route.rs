//! Finds a pod's network namespace from its IP the way the node's own packets find the pod:
//! the node's route to the IP names the interface it leaves through, and that interface leads
//! into the pod.
//!
//! - **Point-to-point CNIs** (Calico, Cilium, kindnet, ptp): a /32 (or /128) route to the pod
//!   through a host-side veth; the veth's peer lives in the pod's namespace.
//! - **Bridge CNIs** (bridge, flannel): the route leaves through a bridge; the node's neighbour
//!   entry for the IP gives the pod's MAC, the bridge's forwarding database the port (a veth)
//!   that MAC is behind. Without a neighbour entry yet (the node never talked to the pod) this
//!   fails and the caller falls back to scanning `/proc`.
//!
//! The kernel names the veth peer's namespace by a namespace id (`IFLA_LINK_NETNSID`), local
//! to the node's namespace; the namespace file with that id is found among the bind mounts
//! under `/run/netns` and `/var/run/netns` (where CNI runtimes keep them) and
//! `/proc/*/ns/net`, by asking the kernel for each one's id (`RTM_GETNSID`): no namespace is
//! entered to search. Everything here is rtnetlink, no external command.

use std::{
    collections::BTreeSet,
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

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

/// Where a pod's namespace was found, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// A file of the namespace (a bind mount or `/proc/PID/ns/net`).
    pub path: PathBuf,
    /// How, for logs and status: e.g. `route -> veth cali1 -> netns id 3`.
    pub via: String,
}

/// Finds the namespace the node (the namespace of `node_netns`, or the daemon's own) routes
/// `ip` into.
pub fn find(ip: IpAddr, node_netns: Option<&Path>) -> Result<Found> {
    let mut rtnl = Rtnl::open(node_netns)?;
    let (oif, gateway) = rtnl.route_to(ip)?;
    if let Some(gw) = gateway {
        bail!("the node routes {ip} through gateway {gw}: not a pod on this node");
    }
    let out = rtnl.link(oif)?;
    let (port, via) = if out.peer_nsid.is_some() {
        let via = format!("route -> {}", describe(&out));
        (out, via)
    } else if out.kind == Some(InfoKind::Bridge) {
        let mac = rtnl.neighbour_mac(ip, oif)?.with_context(|| {
            format!(
                "{ip} is behind bridge {} but the node has no neighbour entry for it yet",
                out.name
            )
        })?;
        let port_index = rtnl.bridge_port(oif, &mac)?.with_context(|| {
            format!(
                "no port of bridge {} has learned {ip}'s MAC {}",
                out.name,
                hex_mac(&mac)
            )
        })?;
        let port = rtnl.link(port_index)?;
        let via = format!("route -> bridge {} -> {}", out.name, describe(&port));
        (port, via)
    } else {
        bail!(
            "the route to {ip} leaves through {} ({}), which leads into no other namespace",
            out.name,
            kind_name(&out.kind)
        );
    };
    let nsid = port.peer_nsid.with_context(|| {
        format!(
            "{} has no peer in another namespace (IFLA_LINK_NETNSID)",
            port.name
        )
    })?;
    let path = rtnl.namespace_with_id(nsid)?.with_context(|| {
        format!("no namespace file found for netns id {nsid} ({via}); is hostPID set?")
    })?;
    Ok(Found { path, via })
}

/// A link's kind as `ip link` names it (`veth`, `bridge`, ...).
fn kind_name(kind: &Option<InfoKind>) -> String {
    kind.as_ref()
        .map_or("link".to_string(), |k| format!("{k:?}").to_lowercase())
}

fn describe(link: &Link) -> String {
    format!(
        "{} {} -> netns id {}",
        kind_name(&link.kind),
        link.name,
        link.peer_nsid.map_or("?".into(), |n| n.to_string())
    )
}

fn hex_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What we read of a link.
struct Link {
    name: String,
    kind: Option<InfoKind>,
    /// The namespace id of the peer (veth) as seen from the node's namespace.
    peer_nsid: Option<i32>,
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
    fn open(netns: Option<&Path>) -> Result<Self> {
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
        let sock = crate::netns::run_in(ns, Self::socket)?;
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
    fn route_to(&mut self, ip: IpAddr) -> Result<(u32, Option<IpAddr>)> {
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

    fn link(&mut self, index: u32) -> Result<Link> {
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
    fn neighbour_mac(&mut self, ip: IpAddr, ifindex: u32) -> Result<Option<Vec<u8>>> {
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
    fn bridge_port(&mut self, bridge: u32, mac: &[u8]) -> Result<Option<u32>> {
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
    fn nsid_of(&mut self, ns: &File) -> Result<Option<i32>> {
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

    /// A file of the namespace the node knows as `nsid`: CNI bind mounts first, then every
    /// process's namespace (each distinct namespace asked once).
    fn namespace_with_id(&mut self, nsid: i32) -> Result<Option<PathBuf>> {
        let mut seen = BTreeSet::new();
        for path in candidates() {
            let Some(ino) = crate::netns::inode_of(&path) else {
                continue;
            };
            if !seen.insert(ino) {
                continue;
            }
            let Ok(file) = File::open(&path) else {
                continue;
            };
            if self.nsid_of(&file).ok().flatten() == Some(nsid) {
                return Ok(Some(path));
            }
        }
        Ok(None)
    }
}

/// Namespace files to look among, bind mounts first.
fn candidates() -> impl Iterator<Item = PathBuf> {
    let mounts = ["/run/netns", "/var/run/netns"]
        .into_iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|d| d.flatten().map(|e| e.path()));
    let procs = crate::procfs::pids().map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")));
    mounts.chain(procs)
}
