//! The kernel programs' own capture rules (`redirect_ebpf::policy`, the code `connect4/6`,
//! `sendmsg4/6` and `sk_lookup` run) evaluated on the host over the rule tables
//! [`PodRules::compile`] makes, so a change to either side is checked in milliseconds,
//! without a kernel: Istio's rows (docs/interception.md) as decisions, not only as entries.
//! The conformance suite still runs both against Istio's own iptables rules on the kernel.

use std::net::IpAddr;

use redirect_common::{PodConfig, ADDR_POD_IP, ADDR_RULE_FIXED_BITS, PORT_EXCLUDE_INBOUND};
use redirect_ebpf::{
    addr::Endpoint,
    policy::{self, Inbound, Outbound, RuleTable},
};

use super::{annotations, rules::PodRules};
use crate::{net::Cidr, podns::interfaces::NamespaceView};

/// A pod's compiled rules as the kernel would hold them for slot [`POD_ID`].
#[derive(Clone, Copy)]
struct Compiled<'a>(&'a PodRules);

const POD_ID: u32 = 3;

/// `cidr` contains `addr16` (IPv4 as IPv4-mapped), and the LPM prefix length it would match
/// with, as `ADDR_RULES` stores it.
fn lpm_match(cidr: &Cidr, addr16: [u8; 16]) -> Option<u32> {
    let (net, bits) = match cidr.addr {
        IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), 96 + u32::from(cidr.prefix_len)),
        IpAddr::V6(a) => (a.octets(), u32::from(cidr.prefix_len)),
    };
    let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
    (u128::from_be_bytes(net) & mask == u128::from_be_bytes(addr16) & mask)
        .then_some(ADDR_RULE_FIXED_BITS + bits)
}

impl RuleTable for Compiled<'_> {
    fn port_rule(&self, pod_id: u32, port: u16, kind: u8) -> bool {
        pod_id == POD_ID && self.0.ports.contains(&(kind, port))
    }

    fn longest(&self, pod_id: u32, kind: u32, addr16: [u8; 16]) -> u32 {
        if pod_id != POD_ID {
            return 0;
        }
        self.0
            .addrs
            .iter()
            .filter(|(k, _)| *k == kind)
            .filter_map(|(_, c)| lpm_match(c, addr16))
            .max()
            .unwrap_or(0)
    }

    fn is_addr_of(&self, pod_id: u32, addr16: [u8; 16]) -> bool {
        pod_id == POD_ID
            && self
                .0
                .addrs
                .iter()
                .any(|(k, c)| *k == ADDR_POD_IP && lpm_match(c, addr16).is_some())
    }

    fn group_rule(&self, pod_id: u32, gid: u32) -> bool {
        pod_id == POD_ID && self.0.groups.contains(&gid)
    }
}

/// The proxy's own ports as the daemon passes them (Istio's).
const PROXY_PORTS: [u16; 6] = [15001, 15006, 15008, 15020, 15021, 15090];

/// A mesh pod with addresses 10.0.0.5 and fd00::5 and these annotations.
fn pod(annotations: &[(&str, &str)]) -> PodRules {
    pod_seeing(annotations, &NamespaceView::default())
}

/// [`pod`], its namespace showing `view`.
fn pod_seeing(annotations: &[(&str, &str)], view: &NamespaceView) -> PodRules {
    let ann = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let policy = annotations::parse(&ann).expect("valid annotations").policy;
    let ips: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
    PodRules::compile(&policy, view, &ips, &PROXY_PORTS)
}

fn config(rules: &PodRules) -> PodConfig {
    PodConfig {
        pod_id: POD_ID,
        proxy_uid: 1337,
        proxy_gid: 1337,
        outbound_port: 15001,
        inbound_port: 15006,
        flags: rules.flags,
        _pad: 0,
    }
}

fn endpoint(addr: &str) -> Endpoint {
    let sa: std::net::SocketAddr = addr.parse().unwrap();
    let port_be = sa.port().to_be();
    match sa.ip() {
        IpAddr::V4(a) => Endpoint::v4(u32::from_ne_bytes(a.octets()), port_be),
        IpAddr::V6(a) => {
            let o = a.octets();
            let w =
                |i: usize| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
            Endpoint::v6([w(0), w(1), w(2), w(3)], port_be)
        }
    }
}

/// Who connects: an application (gid 1000), the proxy, the proxy from its passthrough
/// source, or a socket bound to an IPv4 loopback address.
#[derive(Clone, Copy, Debug)]
enum Caller {
    App,
    AppGid(u32),
    Proxy,
    ProxyPassthrough,
    BoundToLoopback,
}

fn outbound(rules: &PodRules, caller: Caller, dst: &str) -> Outbound {
    let (is_proxy, gid, passthrough, loopback) = match caller {
        Caller::App => (false, 1000, false, false),
        Caller::AppGid(g) => (false, g, false, false),
        Caller::Proxy => (true, 1337, false, false),
        Caller::ProxyPassthrough => (true, 1337, true, false),
        Caller::BoundToLoopback => (false, 1000, false, true),
    };
    policy::outbound(
        Compiled(rules),
        &config(rules),
        &endpoint(dst),
        is_proxy,
        gid,
        passthrough,
        loopback,
    )
}

fn inbound(rules: &PodRules, port: u16) -> Inbound {
    inbound_to(rules, "10.0.0.5", port)
}

fn inbound_to(rules: &PodRules, local: &str, port: u16) -> Inbound {
    inbound_from(rules, "10.0.0.9", local, port)
}

fn inbound_from(rules: &PodRules, remote: &str, local: &str, port: u16) -> Inbound {
    let addr16 = |a: &str| {
        let ip: IpAddr = a.parse().unwrap();
        endpoint(&std::net::SocketAddr::new(ip, 1).to_string()).addr16()
    };
    policy::inbound(
        Compiled(rules),
        &config(rules),
        port,
        addr16(local),
        addr16(remote),
    )
}

use Caller::*;
use Outbound::{Capture, CaptureDns, CaptureInbound, Direct};

/// Istio's outbound rows with no annotations: everything an application opens is captured
/// but its calls over lo; the proxy goes direct, except to its own pod (row 3) from an address
/// other than the passthrough source.
#[test]
fn outbound_defaults() {
    let r = pod(&[]);
    for (caller, dst, want) in [
        (App, "10.96.0.1:80", Capture),
        (App, "[fd00::1]:80", Capture),
        (App, "[2001:db8::1]:443", Capture),
        (Proxy, "10.96.0.1:80", Direct),
        (App, "127.0.0.1:8080", Direct),
        (App, "10.0.0.5:8080", Direct),
        (App, "[fd00::5]:8080", Direct),
        (Proxy, "10.0.0.5:8080", CaptureInbound),
        (Proxy, "[fd00::5]:8080", CaptureInbound),
        (Proxy, "127.0.0.1:8080", Direct),
        (Proxy, "10.0.0.5:15008", Direct),
        (ProxyPassthrough, "10.0.0.5:8080", Direct),
        (BoundToLoopback, "10.96.0.1:80", Direct),
        (BoundToLoopback, "127.0.0.1:80", Direct),
        // Without DNS capture, DNS is like any other destination.
        (App, "10.96.0.10:53", Capture),
    ] {
        assert_eq!(outbound(&r, caller, dst), want, "{caller:?} -> {dst}");
    }
}

/// Ports and ranges, excluded and included, each family.
#[test]
fn outbound_ports_and_ranges() {
    let r = pod(&[(annotations::EXCLUDE_OUTBOUND_PORTS, "5432, 6379")]);
    assert_eq!(outbound(&r, App, "10.96.0.1:5432"), Direct);
    assert_eq!(outbound(&r, App, "[fd00::1]:6379"), Direct);
    assert_eq!(outbound(&r, App, "10.96.0.1:5433"), Capture);

    let r = pod(&[(
        annotations::EXCLUDE_OUTBOUND_RANGES,
        "10.96.0.0/12,fd00:96::/64",
    )]);
    assert_eq!(outbound(&r, App, "10.96.0.1:80"), Direct);
    assert_eq!(outbound(&r, App, "10.111.255.255:80"), Direct);
    assert_eq!(outbound(&r, App, "10.112.0.1:80"), Capture);
    assert_eq!(outbound(&r, App, "[fd00:96::7]:80"), Direct);
    assert_eq!(outbound(&r, App, "[fd00:97::7]:80"), Capture);

    let r = pod(&[(annotations::INCLUDE_OUTBOUND_RANGES, "10.0.0.0/8")]);
    assert_eq!(outbound(&r, App, "10.1.2.3:80"), Capture);
    assert_eq!(outbound(&r, App, "192.168.1.1:80"), Direct);
    assert_eq!(outbound(&r, App, "[fd00::1]:80"), Direct);

    // Nothing included but one port: only that port is captured.
    let r = pod(&[
        (annotations::INCLUDE_OUTBOUND_RANGES, ""),
        (annotations::INCLUDE_OUTBOUND_PORTS, "8080"),
    ]);
    assert_eq!(outbound(&r, App, "1.2.3.4:8080"), Capture);
    assert_eq!(outbound(&r, App, "1.2.3.4:80"), Direct);

    // An excluded range wins over an included one that contains it.
    let r = pod(&[
        (annotations::INCLUDE_OUTBOUND_RANGES, "10.0.0.0/8"),
        (annotations::EXCLUDE_OUTBOUND_RANGES, "10.96.0.0/12"),
    ]);
    assert_eq!(outbound(&r, App, "10.96.0.1:80"), Direct);
    assert_eq!(outbound(&r, App, "10.1.0.1:80"), Capture);
}

/// Owner groups (Istio's `ISTIO_OUTBOUND_OWNER_GROUPS` and `_EXCLUDE`).
#[test]
fn outbound_owner_groups() {
    let r = pod(&[(annotations::OWNER_GROUPS, "1000")]);
    assert_eq!(outbound(&r, AppGid(1000), "10.96.0.1:80"), Capture);
    assert_eq!(outbound(&r, AppGid(2000), "10.96.0.1:80"), Direct);
    let r = pod(&[(annotations::OWNER_GROUPS_EXCLUDE, "2000")]);
    assert_eq!(outbound(&r, AppGid(1000), "10.96.0.1:80"), Capture);
    assert_eq!(outbound(&r, AppGid(2000), "10.96.0.1:80"), Direct);
}

/// DNS capture: TCP to port 53 goes to the agent, whatever the address (over lo too), not the
/// proxy's; UDP likewise, unless port 53 is excluded.
#[test]
fn dns_capture() {
    let r = pod(&[(annotations::DNS_CAPTURE, "true")]);
    assert_eq!(outbound(&r, App, "10.96.0.10:53"), CaptureDns);
    assert_eq!(outbound(&r, App, "127.0.0.53:53"), CaptureDns);
    assert_eq!(outbound(&r, Proxy, "10.96.0.10:53"), Direct);
    let cfg = config(&r);
    let dns = endpoint("10.96.0.10:53");
    assert!(policy::dns_udp(Compiled(&r), &cfg, &dns, false, 1000));
    assert!(!policy::dns_udp(Compiled(&r), &cfg, &dns, true, 1337));
    assert!(!policy::dns_udp(
        Compiled(&r),
        &cfg,
        &endpoint("10.96.0.10:5353"),
        false,
        1000
    ));
    let r = pod(&[
        (annotations::DNS_CAPTURE, "true"),
        (annotations::EXCLUDE_OUTBOUND_PORTS, "53"),
    ]);
    assert!(!policy::dns_udp(
        Compiled(&r),
        &config(&r),
        &dns,
        false,
        1000
    ));
    assert!(!policy::dns_udp(
        Compiled(&pod(&[])),
        &config(&pod(&[])),
        &dns,
        false,
        1000
    ));
}

/// Istio's inbound rows: every port but the proxy's own and the status port, or only the
/// listed ones; excluded ports go direct.
#[test]
fn inbound_ports() {
    let r = pod(&[]);
    assert_eq!(inbound(&r, 8080), Inbound::Capture);
    for p in PROXY_PORTS {
        assert_eq!(inbound(&r, p), Inbound::Direct, "{p}");
        assert!(r.ports.contains(&(PORT_EXCLUDE_INBOUND, p)));
    }
    let r = pod(&[(annotations::EXCLUDE_INBOUND_PORTS, "9090")]);
    assert_eq!(inbound(&r, 9090), Inbound::Direct);
    assert_eq!(inbound(&r, 9091), Inbound::Capture);
    let r = pod(&[(annotations::INCLUDE_INBOUND_PORTS, "8080")]);
    assert_eq!(inbound(&r, 8080), Inbound::Capture);
    assert_eq!(inbound(&r, 9090), Inbound::Direct);
    let r = pod(&[(annotations::INCLUDE_INBOUND_PORTS, "")]);
    assert_eq!(inbound(&r, 8080), Inbound::Direct);
    // The status port moved: the old one is captured, the new one is not.
    let r = pod(&[(annotations::STATUS_PORT, "15099")]);
    assert_eq!(inbound(&r, 15099), Inbound::Direct);
    assert_eq!(inbound(&r, 8080), Inbound::Capture);
}

/// A connection from the pod's own addresses, loopback or the passthrough source is local
/// to the pod (never captured inbound by `sk_lookup`); another pod's address is not.
#[test]
fn local_to_pod() {
    let r = pod(&[]);
    let cfg = config(&r);
    for (addr, local) in [
        ("10.0.0.5:1", true),
        ("[fd00::5]:1", true),
        ("127.0.0.1:1", true),
        ("127.0.0.6:1", true),
        ("[::6]:1", true),
        ("[::1]:1", true),
        ("10.0.0.6:1", false),
        ("[fd00::6]:1", false),
    ] {
        assert_eq!(
            policy::local_to_pod(Compiled(&r), &cfg, &endpoint(addr)),
            local,
            "{addr}"
        );
    }
}

/// `excludeInterfaces` as the daemon reads the pod's namespace: a destination the pod's main
/// table routes through an excluded interface (the longest route decides) goes direct, others
/// are captured; a connection arriving at an excluded interface's own address is not captured
/// inbound. Without the view read yet, nothing is excluded by route.
#[test]
fn excluded_interfaces_by_the_namespace_view() {
    let ann = [(annotations::EXCLUDE_INTERFACES, "net1")];
    let cidr = |c: &str| c.parse::<Cidr>().unwrap();
    let view = NamespaceView {
        interfaces: Some(crate::podns::interfaces::InterfaceView {
            routes: [
                (cidr("0.0.0.0/0"), false),
                (cidr("10.0.0.0/24"), false),
                (cidr("192.168.5.0/24"), true),
                (cidr("192.168.5.128/25"), false),
            ]
            .into(),
            local: ["192.168.5.2".parse().unwrap()].into(),
        }),
        vm_ifindexes: Default::default(),
    };
    let r = pod_seeing(&ann, &view);
    assert_eq!(outbound(&r, App, "192.168.5.7:80"), Direct);
    assert_eq!(
        outbound(&r, App, "192.168.5.200:80"),
        Capture,
        "a longer route elsewhere"
    );
    assert_eq!(outbound(&r, App, "10.0.0.9:80"), Capture);
    assert_eq!(outbound(&r, App, "8.8.8.8:80"), Capture);
    assert_eq!(inbound_to(&r, "192.168.5.2", 8080), Inbound::Direct);
    assert_eq!(inbound_to(&r, "10.0.0.5", 8080), Inbound::Capture);
    let unread = pod_seeing(&ann, &NamespaceView::default());
    assert_eq!(outbound(&unread, App, "192.168.5.7:80"), Capture);
}

/// A VM interface's index in the view becomes the port rule `sk_lookup` checks.
#[test]
fn vm_interfaces_by_the_namespace_view() {
    let view = NamespaceView {
        interfaces: None,
        vm_ifindexes: [7, 70_000].into(),
    };
    let r = pod_seeing(&[(annotations::KUBEVIRT_INTERFACES, "tap0")], &view);
    let t = Compiled(&r);
    assert!(policy::has_port_rule(
        t,
        POD_ID,
        7,
        redirect_common::PORT_VM_IFACE
    ));
    // An index past u16 cannot be keyed (the daemon refuses such a pod before this).
    assert!(r.ports.iter().all(|(_, p)| *p != (70_000u32 as u16)));
    assert!(!policy::has_port_rule(
        t,
        POD_ID,
        8,
        redirect_common::PORT_VM_IFACE
    ));
}

/// A Linkerd pod (`linkerd2-proxy-init`'s rules): nothing over lo is captured, the proxy's
/// calls to its own pod included (no Istio row 3); its ignored ports (4567, 4568 by default)
/// go direct both ways; `skip-subnets` keeps those callers' connections off the proxy.
#[test]
fn linkerd_rows() {
    let linkerd = |annotations: &[(&str, &str)]| {
        let ann = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let policy = crate::policy::linkerd::parse(&ann).unwrap().policy;
        let ips: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let proxy_ports = crate::policy::mesh::linkerd::PROXY_PORTS;
        PodRules::compile(&policy, &NamespaceView::default(), &ips, proxy_ports)
    };
    let r = linkerd(&[]);
    for (caller, dst, want) in [
        (App, "10.96.0.1:80", Capture),
        (App, "[2001:db8::1]:443", Capture),
        (App, "10.96.0.1:4567", Direct),
        (App, "10.0.0.5:8080", Direct),
        (App, "127.0.0.1:8080", Direct),
        (Proxy, "10.0.0.5:8080", Direct),
        (Proxy, "[fd00::5]:8080", Direct),
        (Proxy, "10.96.0.1:80", Direct),
    ] {
        assert_eq!(outbound(&r, caller, dst), want, "{caller:?} -> {dst}");
    }
    for (port, want) in [
        (8080, Inbound::Capture),
        (4567, Inbound::Direct),
        (4190, Inbound::Direct),
        (4191, Inbound::Direct),
        (4143, Inbound::Direct),
    ] {
        assert_eq!(inbound(&r, port), want, "{port}");
    }
    let r = linkerd(&[
        (
            crate::policy::mesh::linkerd::SKIP_SUBNETS,
            "10.9.0.0/16,fd00:9::/64",
        ),
        (
            crate::policy::mesh::linkerd::SKIP_INBOUND_PORTS,
            "9000-9002",
        ),
    ]);
    assert_eq!(
        inbound_from(&r, "10.9.1.1", "10.0.0.5", 8080),
        Inbound::Direct
    );
    assert_eq!(
        inbound_from(&r, "fd00:9::7", "fd00::5", 8080),
        Inbound::Direct
    );
    assert_eq!(
        inbound_from(&r, "10.8.1.1", "10.0.0.5", 8080),
        Inbound::Capture
    );
    assert_eq!(inbound(&r, 9001), Inbound::Direct);
    // The defaults are replaced, not added to.
    assert_eq!(inbound(&r, 4567), Inbound::Capture);
}
