//! Istio's capture rules (docs/interception.md), evaluated in order: outbound at
//! `connect()`, inbound in `sk_lookup` for connections from outside the pod; a pod of another
//! mesh sets the flags that turn them into its own (Linkerd: [`POD_FLAG_LOOPBACK_DIRECT`],
//! excluded inbound sources).
//!
//! The rules read a pod's rule table through [`RuleTable`]: in the programs, the kernel's maps
//! (`maps::Maps`); on the host, the daemon's compiled rules, so that the daemon's unit tests
//! run the very decisions the programs make (redirect-user's `policy::rules` tests).

use redirect_common::{
    PodConfig, ADDR_EXCLUDED_IFACE_LOCAL, ADDR_EXCLUDE_INBOUND_SOURCE, ADDR_EXCLUDE_OUTBOUND,
    ADDR_INCLUDE_OUTBOUND, ADDR_ROUTE_EXCLUDED, ADDR_ROUTE_OTHER, DNS_PORT, HBONE_PORT,
    POD_FLAG_DNS_CAPTURE, POD_FLAG_EXCLUDED_IFACES, POD_FLAG_HAS_EXCLUDE_RANGES,
    POD_FLAG_HAS_INBOUND_SOURCE_EXCLUDE, POD_FLAG_HAS_INCLUDE_PORTS, POD_FLAG_HAS_INCLUDE_RANGES,
    POD_FLAG_INCLUDE_ALL_INBOUND, POD_FLAG_INCLUDE_ALL_OUTBOUND, POD_FLAG_LOOPBACK_DIRECT,
    POD_FLAG_LOOPBACK_INCLUDE, POD_FLAG_OWNER_GROUPS_EXCLUDE, POD_FLAG_OWNER_GROUPS_INCLUDE,
    PORT_EXCLUDE_INBOUND, PORT_EXCLUDE_OUTBOUND, PORT_INCLUDE_INBOUND, PORT_INCLUDE_OUTBOUND,
};

use crate::addr::Endpoint;

/// The lookups the rules make in a pod's rule table. Passed by value: the programs' table is a
/// zero-sized handle ([`crate::maps`]' `Maps`), so no pointer to it reaches the verifier.
pub trait RuleTable: Copy {
    /// Pod `pod_id` has `port` (host order) in its list `kind` (`PORT_*`).
    fn port_rule(&self, pod_id: u32, port: u16, kind: u8) -> bool;
    /// The prefix length, fixed bits included (`ADDR_RULE_FIXED_BITS`), of the pod's longest
    /// `kind` (`ADDR_*`) network that contains `addr16` (IPv4 as IPv4-mapped); 0 if none.
    fn longest(&self, pod_id: u32, kind: u32, addr16: [u8; 16]) -> u32;
    /// `addr16` is an address of the mesh pod in slot `pod_id` (a bool, not the slot: an
    /// `Option<u32>` leaves a register unset on its `None` path, which the verifier refuses).
    fn is_addr_of(&self, pod_id: u32, addr16: [u8; 16]) -> bool;
    /// Pod `pod_id`'s owner-group list names group `gid`.
    fn group_rule(&self, pod_id: u32, gid: u32) -> bool;
}

/// What to do with an outbound `connect()`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outbound {
    /// Leave the connection alone.
    Direct,
    /// Send it to the proxy's outbound listener.
    Capture,
    /// Row 3: the proxy reaching its own pod's address goes to the proxy's inbound listener.
    CaptureInbound,
    /// Row 6: DNS, with DNS capture on, goes to the agent's DNS proxy.
    CaptureDns,
}

/// What to do with a connection arriving at a mesh pod from outside it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Inbound {
    Direct,
    Capture,
}

#[inline(always)]
pub fn has_port_rule(t: impl RuleTable, pod_id: u32, port: u16, kind: u8) -> bool {
    t.port_rule(pod_id, port, kind)
}

#[inline(always)]
pub fn has_addr_rule(t: impl RuleTable, pod_id: u32, kind: u32, addr16: [u8; 16]) -> bool {
    t.longest(pod_id, kind, addr16) != 0
}

/// Does the pod's main table route `addr16` through one of its `excludeInterfaces` (its
/// longest route through one is longer than its longest through any other)?
#[inline(always)]
pub fn via_excluded_iface(t: impl RuleTable, pod: &PodConfig, addr16: [u8; 16]) -> bool {
    if pod.flags & POD_FLAG_EXCLUDED_IFACES == 0 {
        return false;
    }
    let excluded = t.longest(pod.pod_id, ADDR_ROUTE_EXCLUDED, addr16);
    excluded != 0 && excluded > t.longest(pod.pod_id, ADDR_ROUTE_OTHER, addr16)
}

/// One of the pod's own addresses (`NODE_ADDRS` maps each mesh pod address to its pod).
#[inline(always)]
pub fn is_pod_addr(t: impl RuleTable, pod: &PodConfig, addr16: [u8; 16]) -> bool {
    t.is_addr_of(pod.pod_id, addr16)
}

/// Is `addr` local to the pod: loopback, the proxy's passthrough source (`::6` is not in
/// `::1`'s loopback range) or one of the pod's own addresses ("over lo")?
#[inline(always)]
pub fn local_to_pod(t: impl RuleTable, pod: &PodConfig, addr: &Endpoint) -> bool {
    addr.is_loopback() || addr.is_passthrough_source() || is_pod_addr(t, pod, addr.addr16())
}

/// Istio's owner-group filter: does a caller of group `gid` go direct? With an include list,
/// unless `gid` is listed; with an exclude list, when it is.
#[inline(always)]
fn group_filtered(t: impl RuleTable, pod: &PodConfig, gid: u32) -> bool {
    let exclude = pod.flags & POD_FLAG_OWNER_GROUPS_EXCLUDE != 0;
    if !exclude && pod.flags & POD_FLAG_OWNER_GROUPS_INCLUDE == 0 {
        return false;
    }
    t.group_rule(pod.pod_id, gid) == exclude
}

/// The outbound rules of docs/interception.md, first match wins. `is_proxy`: the caller runs
/// as the proxy's uid or gid; `gid`: the caller's group; `from_passthrough`: the socket is
/// bound to 127.0.0.6 / ::6 (or, in a TPROXY pod, is a proxy's socket marked 1337);
/// `from_loopback`: the socket is bound to an IPv4 loopback address (127.0.0.0/8).
#[inline(always)]
pub fn outbound(
    t: impl RuleTable,
    pod: &PodConfig,
    dst: &Endpoint,
    is_proxy: bool,
    gid: u32,
    from_passthrough: bool,
    from_loopback: bool,
) -> Outbound {
    let port = dst.port();
    let addr16 = dst.addr16();
    // `::6` is on lo in an Istio pod (istio-iptables adds it for the inbound passthrough),
    // as 127.0.0.6 is in 127.0.0.0/8: both go over lo.
    let over_lo = dst.is_loopback() || dst.is_passthrough_source() || is_pod_addr(t, pod, addr16);
    // An IPv4 socket bound to a loopback address reaches nothing but its own host: the
    // kernel refuses its connect() elsewhere (EINVAL; under Istio too, the route lookup comes
    // before iptables). Capturing it would make that call succeed.
    if from_loopback && !over_lo {
        return Outbound::Direct;
    }
    // 0: leaving through one of `excludeInterfaces` (Istio's `OUTPUT -o IFACE -j RETURN`,
    // before its own chain).
    if via_excluded_iface(t, pod, addr16) {
        return Outbound::Direct;
    }
    // 1: excluded destination port.
    if has_port_rule(t, pod.pod_id, port, PORT_EXCLUDE_OUTBOUND) {
        return Outbound::Direct;
    }
    // With DNS capture on, TCP to port 53 is kept out of rows 3 and 4 (Istio's rules exclude
    // it there), whatever the destination: it reaches row 6.
    let dns = pod.flags & POD_FLAG_DNS_CAPTURE != 0 && port == DNS_PORT;
    if over_lo {
        // Linkerd: `-o lo -j RETURN`, for everyone.
        if pod.flags & POD_FLAG_LOOPBACK_DIRECT != 0 {
            return Outbound::Direct;
        }
        // 2: the proxy's inbound passthrough. 3: the proxy reaching its own pod (a service
        // resolving to itself) goes through inbound. 4: an app calling itself.
        if !from_passthrough && is_proxy && !dst.is_localhost() && port != HBONE_PORT && !dns {
            return Outbound::CaptureInbound;
        }
        if from_passthrough || is_proxy {
            return Outbound::Direct;
        }
        // 4 is left out when includeOutboundIPRanges names a loopback range (Istio's
        // HasLoopBackIP): the application's call over lo goes on to rows 5b-10.
        if pod.flags & POD_FLAG_LOOPBACK_INCLUDE == 0 && !dns {
            return Outbound::Direct;
        }
    }
    // 5: the proxy itself, anything else.
    if is_proxy {
        return Outbound::Direct;
    }
    // 5b: owner groups (ISTIO_OUTBOUND_OWNER_GROUPS or its _EXCLUDE).
    if group_filtered(t, pod, gid) {
        return Outbound::Direct;
    }
    // 6: DNS to the agent.
    if dns {
        return Outbound::CaptureDns;
    }
    // 7: 127.0.0.1 (::1), reached here only when a loopback range is included.
    if dst.is_localhost() {
        return Outbound::Direct;
    }
    // 8: excluded ranges.
    if pod.flags & POD_FLAG_HAS_EXCLUDE_RANGES != 0
        && has_addr_rule(t, pod.pod_id, ADDR_EXCLUDE_OUTBOUND, addr16)
    {
        return Outbound::Direct;
    }
    // 9: included ports or ranges.
    if pod.flags & POD_FLAG_INCLUDE_ALL_OUTBOUND != 0
        || (pod.flags & POD_FLAG_HAS_INCLUDE_PORTS != 0
            && has_port_rule(t, pod.pod_id, port, PORT_INCLUDE_OUTBOUND))
        || (pod.flags & POD_FLAG_HAS_INCLUDE_RANGES != 0
            && has_addr_rule(t, pod.pod_id, ADDR_INCLUDE_OUTBOUND, addr16))
    {
        return Outbound::Capture;
    }
    // 10.
    Outbound::Direct
}

/// Does a UDP datagram (or a UDP `connect()`) from a mesh pod go to the agent's DNS proxy?
/// Istio's rules for UDP: an excluded port returns, the proxy's uid or gid returns, the owner
/// groups apply, then, with DNS capture on, port 53 to any address is redirected.
#[inline(always)]
pub fn dns_udp(
    t: impl RuleTable,
    pod: &PodConfig,
    dst: &Endpoint,
    is_proxy: bool,
    gid: u32,
) -> bool {
    pod.flags & POD_FLAG_DNS_CAPTURE != 0
        && dst.port() == DNS_PORT
        && !via_excluded_iface(t, pod, dst.addr16())
        && !is_proxy
        && !has_port_rule(t, pod.pod_id, DNS_PORT, PORT_EXCLUDE_OUTBOUND)
        && !group_filtered(t, pod, gid)
}

/// The inbound rules of docs/interception.md for a connection from outside the pod to local
/// `port` (host order): the proxy's own ports (15008, 15020, 15021, 15090, 15001, 15006, as
/// configured) and `excludeInboundPorts` are in `PORT_EXCLUDE_INBOUND`; `includeInboundPorts`
/// is `*` (flag) or a list. `local16`: the address the connection is to; one of the pod's
/// `excludeInterfaces`' own addresses goes direct (Istio: `PREROUTING -i IFACE -j RETURN`).
/// `remote16`: the address it comes from; a network of the pod's excluded sources goes direct
/// (Linkerd: `PROXY_INIT_REDIRECT -s NET -j RETURN`).
#[inline(always)]
pub fn inbound(
    t: impl RuleTable,
    pod: &PodConfig,
    port: u16,
    local16: [u8; 16],
    remote16: [u8; 16],
) -> Inbound {
    if pod.flags & POD_FLAG_EXCLUDED_IFACES != 0
        && has_addr_rule(t, pod.pod_id, ADDR_EXCLUDED_IFACE_LOCAL, local16)
    {
        return Inbound::Direct;
    }
    if pod.flags & POD_FLAG_HAS_INBOUND_SOURCE_EXCLUDE != 0
        && has_addr_rule(t, pod.pod_id, ADDR_EXCLUDE_INBOUND_SOURCE, remote16)
    {
        return Inbound::Direct;
    }
    if has_port_rule(t, pod.pod_id, port, PORT_EXCLUDE_INBOUND) {
        return Inbound::Direct;
    }
    if pod.flags & POD_FLAG_INCLUDE_ALL_INBOUND != 0
        || has_port_rule(t, pod.pod_id, port, PORT_INCLUDE_INBOUND)
    {
        return Inbound::Capture;
    }
    Inbound::Direct
}
