//! Istio's capture rules (docs/interception.md), evaluated in order: outbound at
//! `connect()`, inbound in `sk_lookup` for connections from outside the pod.

use aya_ebpf::maps::lpm_trie::Key;
use redirect_common::{
    AddrRuleData, NodeAddrKey, PodConfig, PortRuleKey, ADDR_EXCLUDE_OUTBOUND,
    ADDR_INCLUDE_OUTBOUND, ADDR_RULE_FIXED_BITS, HBONE_PORT, POD_FLAG_HAS_EXCLUDE_RANGES,
    POD_FLAG_HAS_INCLUDE_PORTS, POD_FLAG_HAS_INCLUDE_RANGES, POD_FLAG_INCLUDE_ALL_INBOUND,
    POD_FLAG_INCLUDE_ALL_OUTBOUND, PORT_EXCLUDE_INBOUND, PORT_EXCLUDE_OUTBOUND,
    PORT_INCLUDE_INBOUND, PORT_INCLUDE_OUTBOUND,
};

use crate::{
    addr::Endpoint,
    maps::{ADDR_RULES, NODE_ADDRS, PORT_RULES},
};

/// What to do with an outbound `connect()`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    /// Leave the connection alone.
    Direct,
    /// Send it to the proxy's outbound listener.
    Capture,
    /// Row 3: the proxy reaching its own pod's address goes to the proxy's inbound listener.
    CaptureInbound,
}

/// What to do with a connection arriving at a mesh pod from outside it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    Direct,
    Capture,
}

#[inline(always)]
pub fn has_port_rule(pod_id: u32, port: u16, kind: u8) -> bool {
    let key = PortRuleKey {
        pod_id,
        port,
        kind,
        _pad: 0,
    };
    PORT_RULES.get_ptr(key).is_some()
}

#[inline(always)]
pub fn has_addr_rule(pod_id: u32, kind: u32, addr16: [u8; 16]) -> bool {
    let key = Key::new(
        ADDR_RULE_FIXED_BITS + 128,
        AddrRuleData {
            pod_id,
            kind,
            addr_be: addr16,
        },
    );
    ADDR_RULES.get(&key).is_some()
}

/// One of the pod's own addresses (`NODE_ADDRS` maps each mesh pod address to its pod).
#[inline(always)]
pub fn is_pod_addr(pod: &PodConfig, addr16: [u8; 16]) -> bool {
    // SAFETY: plain-data value, read at once.
    unsafe { NODE_ADDRS.get(NodeAddrKey { addr_be: addr16 }) }.is_some_and(|id| *id == pod.pod_id)
}

/// Is `addr` local to the pod: loopback, the proxy's passthrough source (`::6` is not in
/// `::1`'s loopback range) or one of the pod's own addresses ("over lo")?
#[inline(always)]
pub fn local_to_pod(pod: &PodConfig, addr: &Endpoint) -> bool {
    addr.is_loopback() || addr.is_passthrough_source() || is_pod_addr(pod, addr.addr16())
}

/// The outbound rules of docs/interception.md, first match wins. `is_proxy`: the caller runs
/// as the proxy's uid or gid; `from_passthrough`: the socket is bound to 127.0.0.6 / ::6.
#[inline(always)]
pub fn outbound(
    pod: &PodConfig,
    dst: &Endpoint,
    is_proxy: bool,
    from_passthrough: bool,
) -> Outbound {
    let port = dst.port();
    // 1: excluded destination port.
    if has_port_rule(pod.pod_id, port, PORT_EXCLUDE_OUTBOUND) {
        return Outbound::Direct;
    }
    let addr16 = dst.addr16();
    // `::6` is on lo in an Istio pod (istio-iptables adds it for the inbound passthrough),
    // as 127.0.0.6 is in 127.0.0.0/8: both go over lo.
    let over_lo = dst.is_loopback() || dst.is_passthrough_source() || is_pod_addr(pod, addr16);
    if over_lo {
        // 2: the proxy's inbound passthrough. 3: the proxy reaching its own pod (a service
        // resolving to itself) goes through inbound. 4: an app calling itself.
        if !from_passthrough && is_proxy && !dst.is_localhost() && port != HBONE_PORT {
            return Outbound::CaptureInbound;
        }
        return Outbound::Direct;
    }
    // 5: the proxy itself, anything else.
    if is_proxy {
        return Outbound::Direct;
    }
    // 7: 127.0.0.1 is covered by over_lo above.
    // 8: excluded ranges.
    if pod.flags & POD_FLAG_HAS_EXCLUDE_RANGES != 0
        && has_addr_rule(pod.pod_id, ADDR_EXCLUDE_OUTBOUND, addr16)
    {
        return Outbound::Direct;
    }
    // 9: included ports or ranges.
    if pod.flags & POD_FLAG_INCLUDE_ALL_OUTBOUND != 0
        || (pod.flags & POD_FLAG_HAS_INCLUDE_PORTS != 0
            && has_port_rule(pod.pod_id, port, PORT_INCLUDE_OUTBOUND))
        || (pod.flags & POD_FLAG_HAS_INCLUDE_RANGES != 0
            && has_addr_rule(pod.pod_id, ADDR_INCLUDE_OUTBOUND, addr16))
    {
        return Outbound::Capture;
    }
    // 10.
    Outbound::Direct
}

/// The inbound rules of docs/interception.md for a connection from outside the pod to local
/// `port` (host order): the proxy's own ports (15008, 15020, 15021, 15090, 15001, 15006, as
/// configured) and `excludeInboundPorts` are in `PORT_EXCLUDE_INBOUND`; `includeInboundPorts`
/// is `*` (flag) or a list.
#[inline(always)]
pub fn inbound(pod: &PodConfig, port: u16) -> Inbound {
    if has_port_rule(pod.pod_id, port, PORT_EXCLUDE_INBOUND) {
        return Inbound::Direct;
    }
    if pod.flags & POD_FLAG_INCLUDE_ALL_INBOUND != 0
        || has_port_rule(pod.pod_id, port, PORT_INCLUDE_INBOUND)
    {
        return Inbound::Capture;
    }
    Inbound::Direct
}
