//! How the rules of a pod ([`PodRules`](crate::policy::rules::PodRules): address networks,
//! ports, groups) are keyed in the kernel's maps, both ways: the daemon writes a pod's keys
//! from its rules and reads them back (adopting what a previous run applied) through these
//! functions only. The layouts are `redirect-common`'s; the LPM key puts the pod id and the
//! rule's kind before the address ([`ADDR_RULE_FIXED_BITS`]), IPv4 IPv4-mapped.

use std::net::IpAddr;

use aya::maps::lpm_trie::Key;
use redirect_common::{AddrRuleData, NodeAddrKey, PortRuleKey, ADDR_RULE_FIXED_BITS};

use crate::net::Cidr;

/// The rule an `ADDR_RULES` key stands for: `(kind, network)`.
pub fn rule_of_key(key: &Key<AddrRuleData>) -> (u32, Cidr) {
    let data = key.data();
    let bits = key.prefix_len().saturating_sub(ADDR_RULE_FIXED_BITS);
    let v6 = std::net::Ipv6Addr::from(data.addr_be);
    let cidr = match v6.to_ipv4_mapped() {
        Some(v4) if bits >= 96 => Cidr {
            addr: IpAddr::V4(v4),
            prefix_len: (bits - 96) as u8,
        },
        _ => Cidr {
            addr: IpAddr::V6(v6),
            prefix_len: bits as u8,
        },
    };
    (data.kind, cidr)
}

/// The LPM key of an address rule.
pub fn addr_key(pod_id: u32, kind: u32, cidr: &Cidr) -> Key<AddrRuleData> {
    let (addr_be, bits) = match cidr.addr {
        IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), 96 + u32::from(cidr.prefix_len)),
        IpAddr::V6(a) => (a.octets(), u32::from(cidr.prefix_len)),
    };
    Key::new(
        ADDR_RULE_FIXED_BITS + bits,
        AddrRuleData {
            pod_id,
            kind,
            addr_be,
        },
    )
}

/// The `NODE_ADDRS` key of a pod address.
pub fn node_addr_key(cidr: &Cidr) -> NodeAddrKey {
    NodeAddrKey {
        addr_be: match cidr.addr {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        },
    }
}

/// The `PORT_RULES` key of a port rule.
pub fn port_key(pod_id: u32, kind: u8, port: u16) -> PortRuleKey {
    PortRuleKey {
        pod_id,
        port,
        kind,
        _pad: 0,
    }
}

/// The pod address a `NODE_ADDRS` key stands for (the inverse of [`node_addr_key`]).
pub fn addr_of_node_key(key: &NodeAddrKey) -> IpAddr {
    let ip = std::net::Ipv6Addr::from(key.addr_be);
    ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use redirect_common::{ADDR_EXCLUDE_OUTBOUND, ADDR_INCLUDE_OUTBOUND};

    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn lpm_keys_round_trip() {
        for (kind, c) in [
            (ADDR_EXCLUDE_OUTBOUND, "10.96.0.0/12"),
            (ADDR_EXCLUDE_OUTBOUND, "0.0.0.0/0"),
            (ADDR_INCLUDE_OUTBOUND, "192.168.1.7/32"),
            (ADDR_INCLUDE_OUTBOUND, "fd00:96::/64"),
            (ADDR_EXCLUDE_OUTBOUND, "::/0"),
            (ADDR_INCLUDE_OUTBOUND, "2001:db8::1/128"),
        ] {
            let c = cidr(c);
            let key = addr_key(7, kind, &c);
            assert_eq!(key.data().pod_id, 7);
            assert_eq!(rule_of_key(&key), (kind, c), "{c}");
        }
    }

    #[test]
    fn lpm_key_layout() {
        // IPv4 is stored IPv4-mapped: 96 bits of ::ffff:0:0/96 before the IPv4 prefix, after
        // the fixed pod id and kind.
        let key = addr_key(1, ADDR_EXCLUDE_OUTBOUND, &cidr("10.96.0.0/12"));
        assert_eq!(key.prefix_len(), ADDR_RULE_FIXED_BITS + 96 + 12);
        assert_eq!(
            key.data().addr_be,
            "::ffff:10.96.0.0"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        let key = addr_key(1, ADDR_EXCLUDE_OUTBOUND, &cidr("fd00::/8"));
        assert_eq!(key.prefix_len(), ADDR_RULE_FIXED_BITS + 8);
    }

    #[test]
    fn node_addr_keys_round_trip() {
        for ip in ["10.0.0.5", "fd00::5", "::1", "127.0.0.6"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(addr_of_node_key(&node_addr_key(&Cidr::host(ip))), ip);
        }
    }
}
