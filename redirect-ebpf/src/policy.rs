//! Istio's outbound capture rules (INTERCEPTION_SPEC.md, "Outbound"), evaluated in order.

use aya_ebpf::maps::lpm_trie::Key;
use redirect_common::{
    AddrRuleData, PodConfig, PortRuleKey, ADDR_EXCLUDE_OUTBOUND, ADDR_INCLUDE_OUTBOUND,
    ADDR_POD_IP, ADDR_RULE_FIXED_BITS, POD_FLAG_INCLUDE_ALL_OUTBOUND, PORT_EXCLUDE_OUTBOUND,
    PORT_INCLUDE_OUTBOUND,
};

use crate::{
    addr::Endpoint,
    maps::{ADDR_RULES, PORT_RULES},
};

/// What to do with an outbound `connect()`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    /// Leave the connection alone.
    Direct,
    /// Send it to the proxy's outbound listener.
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

/// The outbound rules of INTERCEPTION_SPEC.md, first match wins. `is_proxy`: the caller runs
/// as the proxy's uid or gid.
#[inline(always)]
pub fn outbound(pod: &PodConfig, dst: &Endpoint, is_proxy: bool) -> Outbound {
    let port = dst.port();
    // 1: excluded destination port.
    if has_port_rule(pod.pod_id, port, PORT_EXCLUDE_OUTBOUND) {
        return Outbound::Direct;
    }
    let addr16 = dst.addr16();
    let over_lo = dst.is_loopback() || has_addr_rule(pod.pod_id, ADDR_POD_IP, addr16);
    // 2-4: over lo. Row 3 (the proxy reaching its own pod's address, captured inbound) is
    // the inbound issue's; until then the proxy's own connections go direct (row 5).
    if over_lo {
        return Outbound::Direct;
    }
    // 5: the proxy itself, anything else.
    if is_proxy {
        return Outbound::Direct;
    }
    // 7: 127.0.0.1 is covered by over_lo above.
    // 8: excluded ranges.
    if has_addr_rule(pod.pod_id, ADDR_EXCLUDE_OUTBOUND, addr16) {
        return Outbound::Direct;
    }
    // 9: included ports or ranges.
    if pod.flags & POD_FLAG_INCLUDE_ALL_OUTBOUND != 0
        || has_port_rule(pod.pod_id, port, PORT_INCLUDE_OUTBOUND)
        || has_addr_rule(pod.pod_id, ADDR_INCLUDE_OUTBOUND, addr16)
    {
        return Outbound::Capture;
    }
    // 10.
    Outbound::Direct
}
