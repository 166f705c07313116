//! `traffic.sidecar.istio.io/excludeInterfaces`: what arrives through, or leaves through, one
//! of a pod's named interfaces is never captured (Istio's `PREROUTING -i IFACE -j RETURN` and
//! `OUTPUT -o IFACE -j RETURN`). The kernel programs cannot see an interface at `connect()`
//! (the socket is not routed yet), so the pod's view is read from its namespace over
//! rtnetlink on every pass: its main table's routes, each marked as through an excluded
//! interface or not (the longest match decides, as routing does), and the addresses of the
//! excluded interfaces (a connection arriving through one is addressed to it).

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::{net::Cidr, podns::rtnl::Rtnl};

/// What a pod's namespace showed on this pass that its rules depend on: read by the daemon,
/// never from the pod's configuration, and passed to the rules' compilation beside the
/// pod's policy (a change in it re-applies the pod as a change of policy would).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceView {
    /// Its `excludeInterfaces`' routes and addresses (`None`: it has none to read).
    pub interfaces: Option<InterfaceView>,
    /// Its VM interfaces' (`kubevirtInterfaces`) indexes.
    pub vm_ifindexes: BTreeSet<u32>,
}

/// A pod's interfaces as the rules need them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceView {
    /// Main-table routes: `(network, through an excluded interface)`.
    pub routes: BTreeSet<(Cidr, bool)>,
    /// Addresses configured on the excluded interfaces.
    pub local: BTreeSet<IpAddr>,
}

/// A route's network with its host bits cleared.
fn network(addr: IpAddr, len: u8) -> Cidr {
    format!("{addr}/{len}").parse().unwrap_or(Cidr::host(addr))
}

/// Reads the view of a pod's namespace, through `rtnl` bound there and its `links`
/// (`(index, name)`), for the interfaces named `excluded` (a name not there yet contributes
/// nothing until it appears).
pub(crate) fn read(
    rtnl: &mut Rtnl,
    links: &[(u32, String)],
    excluded: &BTreeSet<String>,
) -> Result<InterfaceView> {
    let indexes: BTreeSet<u32> = links
        .iter()
        .filter(|(_, name)| excluded.contains(name))
        .map(|(i, _)| *i)
        .collect();
    let routes = rtnl
        .main_routes()?
        .into_iter()
        .map(|(dst, len, oif)| (network(dst, len), indexes.contains(&oif)))
        .collect();
    let local = rtnl
        .addresses_by_link()?
        .into_iter()
        .filter(|(i, _)| indexes.contains(i))
        .map(|(_, ip)| ip)
        .collect();
    Ok(InterfaceView { routes, local })
}
