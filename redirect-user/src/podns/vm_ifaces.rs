//! `traffic.sidecar.istio.io/kubevirtInterfaces` (and `istio.io/reroute-virtual-interfaces`):
//! a KubeVirt VM's traffic enters its pod through a VM interface and is forwarded by the pod;
//! Istio REDIRECTs every TCP connection arriving that way to the outbound listener
//! (`PREROUTING -i IFACE -j ISTIO_REDIRECT`). A forwarded packet has no socket for the cgroup
//! hooks, so here, in the pod's namespace:
//!
//! - the VM interfaces' TCP is routed to the pod itself, whatever its destination: `ip rule
//!   add iif IFACE ipproto tcp lookup 133` and the `local default dev lo` route of table 133
//!   (TPROXY's table), both families;
//! - `sk_lookup`, seeing the VM interface as the connection's ingress (`PORT_RULES` kind
//!   `PORT_VM_IFACE`, the indexes read here on each pass), hands it to the outbound listener,
//!   whose accepted socket keeps the original destination as its local address (so
//!   `SO_ORIGINAL_DST` answers it);
//! - the outbound listener accepts a connection to an address that is not the pod's only if
//!   it is transparent (`IP_TRANSPARENT`: the kernel then lets its SYN-ACK leave from that
//!   address), which Istio's Envoy is not in REDIRECT mode, so the daemon sets it on the
//!   listening sockets it finds on the outbound port (the same `pidfd_getfd` it adopts a
//!   running proxy's listener with). It changes nothing else for the listener.

use std::{collections::BTreeSet, fs::File, os::fd::AsFd};

use anyhow::{bail, Context as _, Result};
use netlink_packet_route::{rule::RuleAttribute, IpProtocol};
use redirect_common::{AF_INET6, TPROXY_ROUTE_TABLE};

use crate::podns::rtnl::Rtnl;

/// What a pass found and did for a pod's VM interfaces.
#[derive(Debug, Default)]
pub struct Prepared {
    /// The indexes of the VM interfaces present in the pod's namespace.
    pub ifindexes: BTreeSet<u32>,
    /// What had to be added (empty: everything was in place).
    pub added: Vec<String>,
}

/// Makes sure the pod's namespace `ns` (`rtnl` bound there, `links` its interfaces as
/// `(index, name)`) routes the TCP of its VM interfaces `names` to the pod and that its
/// outbound listeners on `outbound_port` are transparent. A name not there yet contributes
/// nothing until it appears.
pub(crate) fn prepare(
    ns: &File,
    rtnl: &mut Rtnl,
    links: &[(u32, String)],
    names: &BTreeSet<String>,
    outbound_port: u16,
) -> Result<Prepared> {
    let mut out = Prepared::default();
    for (index, name) in links.iter().filter(|(_, n)| names.contains(n)) {
        let index = *index;
        if index > u32::from(u16::MAX) {
            bail!("VM interface {name} has index {index}, above the 65535 redirectd can key");
        }
        out.ifindexes.insert(index);
        let added = crate::podns::tproxy::in_both_families(rtnl, |family| {
            let what = format!("rule iif {name} ipproto tcp lookup {TPROXY_ROUTE_TABLE}");
            let selectors = vec![
                RuleAttribute::Iifname(name.clone()),
                RuleAttribute::IpProtocol(IpProtocol::Tcp),
            ];
            (what, crate::podns::tproxy::rule_to_table(family, selectors))
        })?;
        out.added.extend(added);
    }
    if !out.ifindexes.is_empty() {
        out.added.extend(crate::podns::tproxy::local_table(rtnl)?);
        for (_, family, sock) in crate::podns::listeners::find(ns, &[outbound_port])? {
            if make_transparent(sock.as_fd(), family).with_context(|| {
                format!("making the listener on port {outbound_port} transparent")
            })? {
                out.added.push(format!(
                    "IP_TRANSPARENT on a listener of port {outbound_port}"
                ));
            }
        }
    }
    Ok(out)
}

/// Sets `IP_TRANSPARENT` (`IPV6_TRANSPARENT` on an IPv6 socket) unless set; `Ok(true)` if it
/// had to.
fn make_transparent(sock: std::os::fd::BorrowedFd<'_>, family: u16) -> Result<bool> {
    // IPV6_TRANSPARENT sets the same socket bit as IP_TRANSPARENT.
    let v6 = family == AF_INET6;
    if transparent(sock, v6)? {
        return Ok(false);
    }
    set_transparent(sock, v6)?;
    Ok(true)
}

/// `IP_TRANSPARENT` (`SOL_IP`, 19) or `IPV6_TRANSPARENT` (`SOL_IPV6`, 75).
fn level_name(v6: bool) -> (libc::c_int, libc::c_int) {
    if v6 {
        (libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
    } else {
        (libc::SOL_IP, libc::IP_TRANSPARENT)
    }
}

fn transparent(sock: std::os::fd::BorrowedFd<'_>, v6: bool) -> Result<bool> {
    use std::os::fd::AsRawFd;
    let (level, name) = level_name(v6);
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt");
    }
    Ok(value != 0)
}

fn set_transparent(sock: std::os::fd::BorrowedFd<'_>, v6: bool) -> Result<()> {
    use std::os::fd::AsRawFd;
    let (level, name) = level_name(v6);
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `one`, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setsockopt (needs CAP_NET_ADMIN)");
    }
    Ok(())
}
