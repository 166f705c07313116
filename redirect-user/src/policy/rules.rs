//! A pod's capture policy compiled into the entries the kernel maps hold (`PORT_RULES`, which
//! also keys the pod's VM interfaces by index,
//! `ADDR_RULES`, `NODE_ADDRS`, `OWNER_GROUPS` and the `POD_FLAG_*` bits of its `MESH_PODS`
//! entry), and the
//! encoding of those map keys. Pure code: [`crate::kernel::datapath`] writes what this returns, and
//! reads it back when a restarted daemon compares what a previous run left.
//!
//! The rules these entries feed are in `docs/interception.md`.

use std::{collections::BTreeSet, net::IpAddr};

use redirect_common::{
    PodSource, ADDR_EXCLUDED_IFACE_LOCAL, ADDR_EXCLUDE_INBOUND_SOURCE, ADDR_EXCLUDE_OUTBOUND,
    ADDR_INCLUDE_OUTBOUND, ADDR_POD_IP, ADDR_ROUTE_EXCLUDED, ADDR_ROUTE_OTHER,
    POD_FLAG_DNS_CAPTURE, POD_FLAG_EXCLUDED_IFACES, POD_FLAG_FAIL_CLOSED,
    POD_FLAG_HAS_EXCLUDE_RANGES, POD_FLAG_HAS_INBOUND_SOURCE_EXCLUDE, POD_FLAG_HAS_INCLUDE_PORTS,
    POD_FLAG_HAS_INCLUDE_RANGES, POD_FLAG_INCLUDE_ALL_INBOUND, POD_FLAG_INCLUDE_ALL_OUTBOUND,
    POD_FLAG_LOOPBACK_DIRECT, POD_FLAG_LOOPBACK_INCLUDE, POD_FLAG_NO_ACCEL,
    POD_FLAG_OWNER_GROUPS_EXCLUDE, POD_FLAG_OWNER_GROUPS_INCLUDE, POD_FLAG_REJECTED,
    POD_FLAG_TPROXY, POD_FLAG_VM_IFACES, POD_SOURCE_HAS_V4, POD_SOURCE_HAS_V6,
    PORT_EXCLUDE_INBOUND, PORT_EXCLUDE_OUTBOUND, PORT_INCLUDE_INBOUND, PORT_INCLUDE_OUTBOUND,
    PORT_VM_IFACE,
};

use crate::podns::interfaces::NamespaceView;
use crate::policy::annotations::{
    CapturePolicy, Cidr, OwnerGroups, PortSelection, RangeSelection, DEFAULT_STATUS_PORT,
};
use crate::policy::mesh::Mesh;

/// A pod's rules in the form the maps hold them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRules {
    /// `(PORT_* kind, port)`.
    pub ports: BTreeSet<(u8, u16)>,
    /// `(ADDR_* kind, network)`.
    pub addrs: BTreeSet<(u32, Cidr)>,
    /// `OWNER_GROUPS` entries: the groups of the pod's owner-group list (which list: flags).
    pub groups: BTreeSet<u32>,
    /// `POD_FLAG_*`.
    pub flags: u32,
    /// The `POD_SOURCES` entry: the pod's first address of each family.
    pub sources: PodSource,
}

impl PodRules {
    /// Compiles a pod's policy and addresses. `proxy_ports` are never captured inbound.
    pub fn compile(
        policy: &CapturePolicy,
        view: &NamespaceView,
        ips: &[IpAddr],
        proxy_ports: &[u16],
    ) -> Self {
        let mut r = PodRules::default();
        let ports = |r: &mut PodRules, kind, set: &BTreeSet<u16>| {
            r.ports.extend(set.iter().map(|p| (kind, *p)));
        };
        ports(
            &mut r,
            PORT_EXCLUDE_OUTBOUND,
            &policy.exclude_outbound_ports,
        );
        ports(
            &mut r,
            PORT_INCLUDE_OUTBOUND,
            &policy.include_outbound_ports,
        );
        r.inbound_ports(policy, proxy_ports);
        r.addrs.extend(
            policy
                .exclude_outbound_ranges
                .iter()
                .map(|c| (ADDR_EXCLUDE_OUTBOUND, *c)),
        );
        match &policy.include_outbound_ranges {
            RangeSelection::All => r.flags |= POD_FLAG_INCLUDE_ALL_OUTBOUND,
            RangeSelection::Ranges(v) => {
                r.addrs
                    .extend(v.iter().map(|c| (ADDR_INCLUDE_OUTBOUND, *c)));
                // Istio's HasLoopBackIP: the network's own address is a loopback one.
                if v.iter().any(|c| c.addr.is_loopback()) {
                    r.flags |= POD_FLAG_LOOPBACK_INCLUDE;
                }
            }
        }
        r.addrs
            .extend(ips.iter().map(|ip| (ADDR_POD_IP, Cidr::host(*ip))));
        r.sources = sources(ips);
        if policy.fail_closed {
            r.flags |= POD_FLAG_FAIL_CLOSED;
        }
        if !policy.accel {
            r.flags |= POD_FLAG_NO_ACCEL;
        }
        if policy.dns_capture {
            r.flags |= POD_FLAG_DNS_CAPTURE;
        }
        if policy.tproxy {
            r.flags |= POD_FLAG_TPROXY;
        }
        if !policy.vm_interfaces.is_empty() {
            // Indexes past u16 cannot be keyed; the daemon refuses such a pod before this.
            r.flags |= POD_FLAG_VM_IFACES;
            r.ports.extend(
                view.vm_ifindexes
                    .iter()
                    .filter_map(|i| u16::try_from(*i).ok())
                    .map(|i| (PORT_VM_IFACE, i)),
            );
        }
        r.interfaces(policy, view);
        r.owner_groups(&policy.owner_groups);
        if policy.mesh == Mesh::Linkerd {
            r.flags |= POD_FLAG_LOOPBACK_DIRECT;
        }
        if !policy.exclude_inbound_sources.is_empty() {
            r.flags |= POD_FLAG_HAS_INBOUND_SOURCE_EXCLUDE;
            r.addrs.extend(
                policy
                    .exclude_inbound_sources
                    .iter()
                    .map(|c| (ADDR_EXCLUDE_INBOUND_SOURCE, *c)),
            );
        }
        // Let the programs skip lookups a pod has no rules for.
        let has = |kind| r.addrs.iter().any(|(k, _)| *k == kind);
        if has(ADDR_EXCLUDE_OUTBOUND) {
            r.flags |= POD_FLAG_HAS_EXCLUDE_RANGES;
        }
        if has(ADDR_INCLUDE_OUTBOUND) {
            r.flags |= POD_FLAG_HAS_INCLUDE_RANGES;
        }
        if !policy.include_outbound_ports.is_empty() {
            r.flags |= POD_FLAG_HAS_INCLUDE_PORTS;
        }
        r
    }
}

impl PodRules {
    /// `excludeInterfaces`: the flag, and the pod's routes and excluded interfaces' addresses
    /// as the daemon read them.
    fn interfaces(&mut self, policy: &CapturePolicy, view: &NamespaceView) {
        if policy.exclude_interfaces.is_empty() {
            return;
        }
        self.flags |= POD_FLAG_EXCLUDED_IFACES;
        let Some(view) = &view.interfaces else {
            return;
        };
        self.addrs.extend(view.routes.iter().map(|(c, excluded)| {
            let kind = if *excluded {
                ADDR_ROUTE_EXCLUDED
            } else {
                ADDR_ROUTE_OTHER
            };
            (kind, *c)
        }));
        self.addrs.extend(
            view.local
                .iter()
                .map(|ip| (ADDR_EXCLUDED_IFACE_LOCAL, Cidr::host(*ip))),
        );
    }

    fn owner_groups(&mut self, groups: &OwnerGroups) {
        let (flag, g) = match groups {
            OwnerGroups::All => return,
            OwnerGroups::Only(g) => (POD_FLAG_OWNER_GROUPS_INCLUDE, g),
            OwnerGroups::AllExcept(g) => (POD_FLAG_OWNER_GROUPS_EXCLUDE, g),
        };
        self.flags |= flag;
        self.groups.clone_from(g);
    }

    /// Inbound, as istio-iptables decides it: with `includeInboundPorts` `*`, every port but
    /// the excluded ones (`excludeInboundPorts` and the status port, 15020 unless
    /// `status.sidecar.istio.io/port` moves it); with a list, the listed ports, and the
    /// exclusions are ignored (Istio's rules then have no exclusion either). The proxy's
    /// other ports are never captured, list or not.
    fn inbound_ports(&mut self, policy: &CapturePolicy, proxy_ports: &[u16]) {
        let moved = policy.status_port.is_some();
        self.ports.extend(
            proxy_ports
                .iter()
                .filter(|p| !(moved && **p == DEFAULT_STATUS_PORT))
                .map(|p| (PORT_EXCLUDE_INBOUND, *p)),
        );
        match &policy.include_inbound_ports {
            PortSelection::All => {
                self.flags |= POD_FLAG_INCLUDE_ALL_INBOUND;
                let excluded = policy.exclude_inbound_ports.iter().copied();
                let status = policy.status_port.filter(|p| *p != 0);
                self.ports
                    .extend(excluded.chain(status).map(|p| (PORT_EXCLUDE_INBOUND, p)));
            }
            PortSelection::Ports(set) => self
                .ports
                .extend(set.iter().map(|p| (PORT_INCLUDE_INBOUND, *p))),
        }
    }

    /// The rules of a pod whose configuration was rejected before it was ever served: what
    /// Istio's defaults would capture is refused instead (fail closed), outbound and inbound;
    /// the proxy's own connections and ports, and connections inside the pod, are untouched.
    pub fn locked(ips: &[IpAddr], proxy_ports: &[u16]) -> Self {
        let policy = CapturePolicy {
            fail_closed: true,
            ..CapturePolicy::default()
        };
        let mut r = Self::compile(&policy, &NamespaceView::default(), ips, proxy_ports);
        r.flags |= POD_FLAG_REJECTED;
        r
    }
}

/// The `POD_SOURCES` entry of a pod with addresses `ips`: the first of each family.
pub fn sources(ips: &[IpAddr]) -> PodSource {
    let mut s = PodSource::default();
    for ip in ips {
        match ip {
            IpAddr::V4(a) if s.flags & POD_SOURCE_HAS_V4 == 0 => {
                s.v4_be = u32::from_ne_bytes(a.octets());
                s.flags |= POD_SOURCE_HAS_V4;
            }
            IpAddr::V6(a) if s.flags & POD_SOURCE_HAS_V6 == 0 => {
                let o = a.octets();
                for (i, w) in s.v6_be.iter_mut().enumerate() {
                    *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
                }
                s.flags |= POD_SOURCE_HAS_V6;
            }
            _ => {}
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::policy::annotations;

    const PROXY_PORTS: [u16; 2] = [15001, 15006];

    /// Compiles a pod's annotations as the daemon does.
    fn compile(annotations: &[(&str, &str)], ips: &[&str]) -> PodRules {
        let map: BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (format!("traffic.sidecar.istio.io/{k}"), v.to_string()))
            .collect();
        let policy = annotations::parse(&map).expect("valid annotations").policy;
        let ips: Vec<IpAddr> = ips.iter().map(|s| s.parse().unwrap()).collect();
        PodRules::compile(&policy, &NamespaceView::default(), &ips, &PROXY_PORTS)
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    /// One golden case: a pod's annotations and addresses, and exactly the entries expected.
    struct Golden {
        name: &'static str,
        annotations: &'static [(&'static str, &'static str)],
        ips: &'static [&'static str],
        ports: &'static [(u8, u16)],
        addrs: &'static [(u32, &'static str)],
        flags: u32,
    }

    const PROXY_EXCLUDED: [(u8, u16); 2] =
        [(PORT_EXCLUDE_INBOUND, 15001), (PORT_EXCLUDE_INBOUND, 15006)];

    fn goldens() -> Vec<Golden> {
        vec![
            Golden {
                name: "defaults: everything captured both ways",
                annotations: &[],
                ips: &["10.0.0.5", "fd00::5"],
                ports: &[],
                addrs: &[(ADDR_POD_IP, "10.0.0.5/32"), (ADDR_POD_IP, "fd00::5/128")],
                flags: POD_FLAG_INCLUDE_ALL_INBOUND | POD_FLAG_INCLUDE_ALL_OUTBOUND,
            },
            Golden {
                name: "excluded outbound ports and ranges",
                annotations: &[
                    ("excludeOutboundPorts", "5432, 6379"),
                    ("excludeOutboundIPRanges", "10.96.0.0/12,fd00:96::/64"),
                ],
                ips: &[],
                ports: &[(PORT_EXCLUDE_OUTBOUND, 5432), (PORT_EXCLUDE_OUTBOUND, 6379)],
                addrs: &[
                    (ADDR_EXCLUDE_OUTBOUND, "10.96.0.0/12"),
                    (ADDR_EXCLUDE_OUTBOUND, "fd00:96::/64"),
                ],
                flags: POD_FLAG_INCLUDE_ALL_INBOUND
                    | POD_FLAG_INCLUDE_ALL_OUTBOUND
                    | POD_FLAG_HAS_EXCLUDE_RANGES,
            },
            Golden {
                name: "include list of ranges and ports instead of *",
                annotations: &[
                    ("includeOutboundIPRanges", "192.168.0.0/16"),
                    ("includeOutboundPorts", "443"),
                ],
                ips: &[],
                ports: &[(PORT_INCLUDE_OUTBOUND, 443)],
                addrs: &[(ADDR_INCLUDE_OUTBOUND, "192.168.0.0/16")],
                flags: POD_FLAG_INCLUDE_ALL_INBOUND
                    | POD_FLAG_HAS_INCLUDE_RANGES
                    | POD_FLAG_HAS_INCLUDE_PORTS,
            },
            Golden {
                name: "inbound: ports * with excluded ports",
                annotations: &[("excludeInboundPorts", "9090")],
                ips: &[],
                ports: &[(PORT_EXCLUDE_INBOUND, 9090)],
                addrs: &[],
                flags: POD_FLAG_INCLUDE_ALL_INBOUND | POD_FLAG_INCLUDE_ALL_OUTBOUND,
            },
            Golden {
                name: "a loopback range in the include ranges (Istio's HasLoopBackIP)",
                annotations: &[("includeOutboundIPRanges", "127.1.2.3/32,10.0.0.0/8")],
                ips: &[],
                ports: &[],
                addrs: &[
                    (ADDR_INCLUDE_OUTBOUND, "127.1.2.3/32"),
                    (ADDR_INCLUDE_OUTBOUND, "10.0.0.0/8"),
                ],
                flags: POD_FLAG_INCLUDE_ALL_INBOUND
                    | POD_FLAG_HAS_INCLUDE_RANGES
                    | POD_FLAG_LOOPBACK_INCLUDE,
            },
            Golden {
                name: "::1 in the include ranges is a loopback range too",
                annotations: &[("includeOutboundIPRanges", "::1/128")],
                ips: &[],
                ports: &[],
                addrs: &[(ADDR_INCLUDE_OUTBOUND, "::1/128")],
                flags: POD_FLAG_INCLUDE_ALL_INBOUND
                    | POD_FLAG_HAS_INCLUDE_RANGES
                    | POD_FLAG_LOOPBACK_INCLUDE,
            },
            Golden {
                name: "empty include ranges: no outbound capture",
                annotations: &[("includeOutboundIPRanges", "")],
                ips: &[],
                ports: &[],
                addrs: &[],
                flags: POD_FLAG_INCLUDE_ALL_INBOUND,
            },
            Golden {
                name: "inbound: a list of ports ignores excluded ports, as Istio's rules do",
                annotations: &[
                    ("includeInboundPorts", "8080,9090"),
                    ("excludeInboundPorts", "9090"),
                ],
                ips: &[],
                ports: &[(PORT_INCLUDE_INBOUND, 8080), (PORT_INCLUDE_INBOUND, 9090)],
                addrs: &[],
                flags: POD_FLAG_INCLUDE_ALL_OUTBOUND,
            },
            Golden {
                name: "empty include inbound ports: no inbound capture",
                annotations: &[("includeInboundPorts", "")],
                ips: &[],
                ports: &[],
                addrs: &[],
                flags: POD_FLAG_INCLUDE_ALL_OUTBOUND,
            },
        ]
    }

    #[test]
    fn golden_cases() {
        for g in goldens() {
            let got = compile(g.annotations, g.ips);
            let mut ports: BTreeSet<(u8, u16)> = g.ports.iter().copied().collect();
            ports.extend(PROXY_EXCLUDED);
            let addrs: BTreeSet<(u32, Cidr)> = g.addrs.iter().map(|(k, c)| (*k, cidr(c))).collect();
            assert_eq!(got.ports, ports, "{}: ports", g.name);
            assert_eq!(got.addrs, addrs, "{}: addresses", g.name);
            // Istio's rules; every pod also fails closed unless it opts out.
            assert_eq!(
                got.flags & !POD_FLAG_FAIL_CLOSED,
                g.flags,
                "{}: flags {:#b}",
                g.name,
                got.flags
            );
            assert_ne!(
                got.flags & POD_FLAG_FAIL_CLOSED,
                0,
                "{}: fails closed by default",
                g.name
            );
        }
    }

    #[test]
    fn the_status_port_annotation_moves_the_excluded_status_port() {
        let node = [15001, 15006, 15008, 15020, 15021, 15090];
        let excluded = |pairs: &[(&str, &str)]| -> Vec<u16> {
            let map = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let policy = annotations::parse(&map).unwrap().policy;
            let r = PodRules::compile(&policy, &NamespaceView::default(), &[], &node);
            r.ports
                .iter()
                .filter(|(k, _)| *k == PORT_EXCLUDE_INBOUND)
                .map(|(_, p)| *p)
                .collect()
        };
        let status = "status.sidecar.istio.io/port";
        assert_eq!(excluded(&[]), node);
        assert_eq!(
            excluded(&[(status, "15099")]),
            [15001, 15006, 15008, 15021, 15090, 15099]
        );
        assert_eq!(
            excluded(&[(status, "0")]),
            [15001, 15006, 15008, 15021, 15090]
        );
        // With a list of inbound ports Istio's exclusions (the status port's among them) do
        // not apply; the proxy's other ports stay out.
        assert_eq!(
            excluded(&[
                (status, "15099"),
                ("traffic.sidecar.istio.io/includeInboundPorts", "8080")
            ]),
            [15001, 15006, 15008, 15021, 15090]
        );
    }

    #[test]
    fn owner_groups_compile_to_a_flag_and_entries() {
        let compile = |pairs: &[(&str, &str)]| {
            let map = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            PodRules::compile(
                &annotations::parse(&map).unwrap().policy,
                &NamespaceView::default(),
                &[],
                &[],
            )
        };
        let all = compile(&[]);
        assert_eq!(
            all.flags & (POD_FLAG_OWNER_GROUPS_INCLUDE | POD_FLAG_OWNER_GROUPS_EXCLUDE),
            0
        );
        assert!(all.groups.is_empty());
        let only = compile(&[("redirectd.dev/outboundOwnerGroups", "3000,3001")]);
        assert_ne!(only.flags & POD_FLAG_OWNER_GROUPS_INCLUDE, 0);
        assert_eq!(only.groups, [3000, 3001].into());
        let except = compile(&[("redirectd.dev/outboundOwnerGroupsExclude", "4000")]);
        assert_ne!(except.flags & POD_FLAG_OWNER_GROUPS_EXCLUDE, 0);
        assert_eq!(except.groups, [4000].into());
    }

    #[test]
    fn our_annotations_set_flags() {
        let map: BTreeMap<String, String> = [
            ("redirectd.dev/failMode", "closed"),
            ("redirectd.dev/accel", "false"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let policy = annotations::parse(&map).unwrap().policy;
        let r = PodRules::compile(&policy, &NamespaceView::default(), &[], &[]);
        assert_ne!(r.flags & POD_FLAG_FAIL_CLOSED, 0);
        assert_ne!(r.flags & POD_FLAG_NO_ACCEL, 0);
        assert_eq!(
            r.flags & POD_FLAG_DNS_CAPTURE,
            0,
            "DNS capture is off by default"
        );
        let dns: BTreeMap<String, String> =
            [("redirectd.dev/dnsCapture".into(), "true".into())].into();
        let r = PodRules::compile(
            &annotations::parse(&dns).unwrap().policy,
            &NamespaceView::default(),
            &[],
            &[],
        );
        assert_ne!(r.flags & POD_FLAG_DNS_CAPTURE, 0);
    }

    #[test]
    fn sources_are_the_first_address_of_each_family() {
        let ips: Vec<IpAddr> = ["fd00::5", "10.0.0.5", "10.0.0.6", "fd00::6"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let s = sources(&ips);
        assert_eq!(s.flags, POD_SOURCE_HAS_V4 | POD_SOURCE_HAS_V6);
        // Network byte order in memory: the bytes of the address, in order.
        assert_eq!(s.v4_be.to_ne_bytes(), [10, 0, 0, 5]);
        assert_eq!(s.v6_be[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(s.v6_be[3].to_ne_bytes(), [0, 0, 0, 5]);
        let only4 = sources(&ips[1..2]);
        assert_eq!(only4.flags, POD_SOURCE_HAS_V4);
        assert_eq!(sources(&[]), PodSource::default());
    }
}
