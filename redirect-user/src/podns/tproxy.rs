//! TPROXY's policy routing inside a pod's network namespace, as Istio sets it up for
//! `interceptionMode: TPROXY`, without iptables.
//!
//! In TPROXY mode Envoy connects to the application from the client's own address (its
//! `original_src` filter: `IP_TRANSPARENT`, mark 1337). The application's replies are addressed
//! to that foreign address and would leave through `eth0`; they must come back to Envoy over
//! `lo` instead. Istio marks them through the connection mark (`CONNMARK --restore-mark`) and
//! routes the mark to a `local` route. Here the kernel marks them itself: with
//! `net.ipv4.tcp_fwmark_accept` (it covers IPv6 too) a socket accepted from a marked SYN
//! carries the SYN's mark, so the application's SYN-ACK and every later packet are marked 1337,
//! and the same two routing entries Istio adds send them to `lo`:
//!
//! - `ip rule add fwmark 1337 lookup 133` (both families);
//! - `ip route add local default dev lo table 133` (`local ::/0` for IPv6).
//!
//! Only SYNs that carry a mark are affected: packets arriving through `eth0` have theirs
//! cleared at the namespace boundary. Everything is idempotent (checked on every pass) and
//! left in place when the pod leaves the mesh; it only ever matches packets marked 1337.

use std::{fs::File, io::Write as _, path::Path};

use anyhow::{Context as _, Result};
use netlink_packet_route::{
    route::{RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleHeader, RuleMessage},
    AddressFamily, RouteNetlinkMessage,
};
use redirect_common::{TPROXY_MARK, TPROXY_ROUTE_TABLE};

use crate::podns::rtnl::Rtnl;

/// A network namespace's loopback interface.
const LOOPBACK_IFINDEX: u32 = 1;
/// The rule's priority: the one `ip rule add` gives the first rule added to a fresh namespace
/// (Istio's), and the kernel only sees a rule as already there at the same priority.
pub(crate) const RULE_PRIORITY: u32 = 32765;

/// Makes sure the pod's namespace `ns` (`rtnl` bound there) has TPROXY's routing and
/// accept-mark setting. `proc_sys_net`: where the kernel's `net` sysctls are (`/proc/sys/net`,
/// or a host mount of it when the daemon's own is read-only). Returns what it had to add
/// (empty: all was there).
pub(crate) fn prepare(ns: &File, rtnl: &mut Rtnl, proc_sys_net: &Path) -> Result<Vec<String>> {
    let mut added = in_both_families(rtnl, |family| {
        let what = format!("rule fwmark {TPROXY_MARK} lookup {TPROXY_ROUTE_TABLE}");
        (
            what,
            rule_to_table(family, vec![RuleAttribute::FwMark(TPROXY_MARK)]),
        )
    })?;
    added.extend(local_table(rtnl)?);
    let knob = proc_sys_net.join("ipv4/tcp_fwmark_accept");
    let set = crate::podns::nsenter::run_in(ns, move || -> Result<bool> {
        let now = std::fs::read_to_string(&knob)
            .with_context(|| format!("reading {}", knob.display()))?;
        if now.trim() == "1" {
            return Ok(false);
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&knob)
            .and_then(|mut f| f.write_all(b"1"))
            .with_context(|| {
                format!(
                    "setting {} to 1 in the pod's namespace (a read-only /proc/sys: mount the host's /proc/sys/net and pass --proc-sys-net)",
                    knob.display()
                )
            })?;
        Ok(true)
    })?;
    if set {
        added.push("net.ipv4.tcp_fwmark_accept = 1".into());
    }
    Ok(added)
}

/// Makes sure table 133 has its `local default dev lo` route in both families; returns what
/// it added.
pub(crate) fn local_table(rtnl: &mut Rtnl) -> Result<Vec<String>> {
    in_both_families(rtnl, |family| {
        let what = format!("route local default dev lo table {TPROXY_ROUTE_TABLE}");
        (what, local_default(family))
    })
}

/// Adds, for IPv4 then IPv6, the object `of(family)` gives (with what it is, as `ip` would
/// say it), unless it is there; returns what it added.
pub(crate) fn in_both_families(
    rtnl: &mut Rtnl,
    of: impl Fn(AddressFamily) -> (String, RouteNetlinkMessage),
) -> Result<Vec<String>> {
    let mut added = Vec::new();
    for (family, v) in [(AddressFamily::Inet, 4), (AddressFamily::Inet6, 6)] {
        let (what, msg) = of(family);
        if rtnl.add(msg).with_context(|| format!("ip -{v} {what}"))? {
            added.push(format!("IPv{v} {what}"));
        }
    }
    Ok(added)
}

/// `ip rule add SELECTORS lookup 133` at [`RULE_PRIORITY`] for `family`.
pub(crate) fn rule_to_table(
    family: AddressFamily,
    selectors: Vec<RuleAttribute>,
) -> RouteNetlinkMessage {
    let mut m = RuleMessage::default();
    m.header = RuleHeader {
        family,
        action: RuleAction::ToTable,
        ..RuleHeader::default()
    };
    m.attributes = vec![RuleAttribute::Priority(RULE_PRIORITY)];
    m.attributes.extend(selectors);
    m.attributes.push(RuleAttribute::Table(TPROXY_ROUTE_TABLE));
    RouteNetlinkMessage::NewRule(m)
}

/// `ip route add local default dev lo table 133` for `family`.
fn local_default(family: AddressFamily) -> RouteNetlinkMessage {
    use netlink_packet_route::route::RouteAttribute;
    let mut m = RouteMessage::default();
    m.header = RouteHeader {
        address_family: family,
        table: RouteHeader::RT_TABLE_UNSPEC,
        protocol: RouteProtocol::Boot,
        scope: RouteScope::Host,
        kind: RouteType::Local,
        ..RouteHeader::default()
    };
    m.attributes = vec![
        RouteAttribute::Table(TPROXY_ROUTE_TABLE),
        RouteAttribute::Oif(LOOPBACK_IFINDEX),
    ];
    RouteNetlinkMessage::NewRoute(m)
}
