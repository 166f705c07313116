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
//! entered to search. Everything here is rtnetlink ([`crate::podns::rtnl`]), no external command.

use std::{
    collections::BTreeSet,
    fs::File,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use netlink_packet_route::link::InfoKind;

use crate::{
    podns::nsenter::inode_of,
    podns::rtnl::{Link, Rtnl},
};

/// Where a pod's namespace was found, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByRoute {
    /// A file of the namespace (a bind mount or `/proc/PID/ns/net`).
    pub path: PathBuf,
    /// How, for logs and status: e.g. `route -> veth cali1 -> netns id 3`.
    pub via: String,
}

/// Finds the namespace the node (the namespace of `node_netns`, or the daemon's own) routes
/// `ip` into.
pub fn find(ip: IpAddr, node_netns: Option<&Path>) -> Result<ByRoute> {
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
    let path = namespace_with_id(&mut rtnl, nsid)?.with_context(|| {
        format!("no namespace file found for netns id {nsid} ({via}); is hostPID set?")
    })?;
    Ok(ByRoute { path, via })
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

/// Namespace files to look among, bind mounts first.
fn candidates() -> impl Iterator<Item = PathBuf> {
    let mounts = ["/run/netns", "/var/run/netns"]
        .into_iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|d| d.flatten().map(|e| e.path()));
    let procs =
        crate::podns::procfs::pids().map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")));
    mounts.chain(procs)
}

/// A file of the namespace the node knows as `nsid`: CNI bind mounts first, then every
/// process's namespace (each distinct namespace asked once).
fn namespace_with_id(rtnl: &mut Rtnl, nsid: i32) -> Result<Option<PathBuf>> {
    let mut seen = BTreeSet::new();
    for path in candidates() {
        let Some(ino) = inode_of(&path) else {
            continue;
        };
        if !seen.insert(ino) {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        if rtnl.nsid_of(&file).ok().flatten() == Some(nsid) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}
