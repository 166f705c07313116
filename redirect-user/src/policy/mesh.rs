//! A mesh profile: everything that belongs to one service mesh rather than to the redirector.
//! How its pods are recognised (membership), the annotations and proxy environment a pod
//! carries its capture settings in, and its defaults: the proxy's uid and gid, its outbound and
//! inbound listener ports, its own ports (never captured inbound), its status port, the
//! passthrough source it connects to the application from, its DNS agent's port, its tunnel
//! port, its TPROXY mark.
//!
//! Istio is the one profile today ([`ISTIO`]); the rest of the daemon takes these names and
//! numbers from here, so another mesh is another value of [`Profile`]. The kernel's copies of
//! the profile's constants (the DNS agent port, the tunnel port, the TPROXY mark, the
//! passthrough addresses) live in `redirect-common`, shared with the kernel programs; the
//! profile names them from there. (They become per pod when a second mesh needs other
//! values: the mesh issue.)

use std::net::{Ipv4Addr, Ipv6Addr};

/// The annotation keys a pod of the mesh carries its capture settings in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnotationKeys {
    pub exclude_outbound_ports: &'static str,
    pub include_outbound_ports: &'static str,
    pub exclude_outbound_ranges: &'static str,
    /// Default `*`.
    pub include_outbound_ranges: &'static str,
    pub exclude_inbound_ports: &'static str,
    /// Default `*`.
    pub include_inbound_ports: &'static str,
    /// The proxy agent's status port, excluded from inbound capture in the default's place.
    pub status_port: &'static str,
    /// `REDIRECT` or `TPROXY`.
    pub interception_mode: &'static str,
    /// Interfaces through which a VM's traffic enters the pod (KubeVirt).
    pub kubevirt_interfaces: &'static str,
    /// An older name of `kubevirt_interfaces` (read too; the lists are joined).
    pub reroute_virtual_interfaces: &'static str,
    /// Interfaces whose traffic is never captured.
    pub exclude_interfaces: &'static str,
}

/// The proxy container's environment variables the mesh reads capture settings from (also
/// found in the proxy config annotation's `proxyMetadata`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvNames {
    pub interception_mode: &'static str,
    pub owner_groups: &'static str,
    pub owner_groups_exclude: &'static str,
    pub dns_capture: &'static str,
}

/// One mesh's vocabulary and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    pub name: &'static str,
    /// The annotation the mesh's injector puts on a pod it injected.
    pub injected_annotation: &'static str,
    /// The injected proxy container's name (a regular container or a native sidecar).
    pub proxy_container: &'static str,
    /// The annotation holding the pod's proxy configuration (YAML or JSON).
    pub proxy_config_annotation: &'static str,
    pub annotations: AnnotationKeys,
    pub env: EnvNames,
    /// The proxy's uid and gid (its own connections are never captured outbound).
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    /// The proxy's outbound listener (on loopback) and inbound listener.
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// The proxy's own ports, never captured inbound.
    pub proxy_ports: &'static [u16],
    /// The agent's status port, excluded from inbound capture unless the pod moves it.
    pub status_port: u16,
    /// The source the proxy connects to the application from (inbound, REDIRECT mode).
    pub passthrough4: Ipv4Addr,
    pub passthrough6: Ipv6Addr,
    /// The agent's DNS proxy (on loopback), where captured DNS goes.
    pub dns_agent_port: u16,
    /// The mesh's tunnel port (Istio's HBONE), never captured by the proxy's own loopback rule.
    pub tunnel_port: u16,
    /// The mark on the proxy's original-source sockets in TPROXY mode.
    pub tproxy_mark: u32,
}

/// Istio's sidecar mode, as `istio-iptables` and the injector define it.
pub const ISTIO: Profile = Profile {
    name: "istio",
    injected_annotation: "sidecar.istio.io/status",
    proxy_container: "istio-proxy",
    proxy_config_annotation: "proxy.istio.io/config",
    annotations: AnnotationKeys {
        exclude_outbound_ports: "traffic.sidecar.istio.io/excludeOutboundPorts",
        include_outbound_ports: "traffic.sidecar.istio.io/includeOutboundPorts",
        exclude_outbound_ranges: "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        include_outbound_ranges: "traffic.sidecar.istio.io/includeOutboundIPRanges",
        exclude_inbound_ports: "traffic.sidecar.istio.io/excludeInboundPorts",
        include_inbound_ports: "traffic.sidecar.istio.io/includeInboundPorts",
        status_port: "status.sidecar.istio.io/port",
        interception_mode: "sidecar.istio.io/interceptionMode",
        kubevirt_interfaces: "traffic.sidecar.istio.io/kubevirtInterfaces",
        reroute_virtual_interfaces: "istio.io/reroute-virtual-interfaces",
        exclude_interfaces: "traffic.sidecar.istio.io/excludeInterfaces",
    },
    env: EnvNames {
        interception_mode: "ISTIO_META_INTERCEPTION_MODE",
        owner_groups: "ISTIO_OUTBOUND_OWNER_GROUPS",
        owner_groups_exclude: "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        dns_capture: "ISTIO_META_DNS_CAPTURE",
    },
    proxy_uid: 1337,
    proxy_gid: 1337,
    outbound_port: 15001,
    inbound_port: 15006,
    proxy_ports: &[15001, 15006, 15008, 15020, 15021, 15090],
    status_port: 15020,
    passthrough4: v4(redirect_common::PASSTHROUGH4),
    passthrough6: v6(redirect_common::PASSTHROUGH6),
    dns_agent_port: redirect_common::AGENT_DNS_PORT,
    tunnel_port: redirect_common::HBONE_PORT,
    tproxy_mark: redirect_common::TPROXY_MARK,
};

/// Linkerd's sidecar, as `linkerd2-proxy-init` and its injector's chart define it: outbound
/// to 4140, inbound to 4143, the proxy as uid 2102 (no gid rule), its control and admin ports
/// 4190 and 4191 never captured inbound, `4567,4568` ignored both ways unless the pod's
/// `skip-*-ports` replace them, nothing over lo captured, and `skip-subnets` as inbound
/// sources that are never captured.
pub mod linkerd {
    pub const OUTBOUND_PORT: u16 = 4140;
    pub const INBOUND_PORT: u16 = 4143;
    pub const PROXY_UID: u32 = 2102;
    /// Linkerd has no gid rule: no process has this gid (`(gid_t) -1`), so no caller counts as
    /// the proxy by its group.
    pub const NO_GID: u32 = u32::MAX;
    pub const CONTROL_PORT: u16 = 4190;
    pub const ADMIN_PORT: u16 = 4191;
    /// The proxy's own ports, never captured inbound.
    pub const PROXY_PORTS: &[u16] = &[OUTBOUND_PORT, INBOUND_PORT, CONTROL_PORT, ADMIN_PORT];
    /// `proxyInit.ignoreInboundPorts` and `ignoreOutboundPorts` by default.
    pub const DEFAULT_IGNORED_PORTS: &[u16] = &[4567, 4568];
    /// The injector's annotations a pod carries its capture settings in.
    pub const SKIP_INBOUND_PORTS: &str = "config.linkerd.io/skip-inbound-ports";
    pub const SKIP_OUTBOUND_PORTS: &str = "config.linkerd.io/skip-outbound-ports";
    pub const SKIP_SUBNETS: &str = "config.linkerd.io/skip-subnets";
    pub const PROXY_UID_ANNOTATION: &str = "config.linkerd.io/proxy-uid";
    /// The injected proxy container's name.
    pub const PROXY_CONTAINER: &str = "linkerd-proxy";
}

/// Which mesh a pod belongs to: whose rules capture it, whose proxy ports and uid it has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mesh {
    /// Istio's sidecar ([`ISTIO`]; the node's `--proxy-uid`, `--outbound-port`, ... apply).
    #[default]
    Istio,
    /// Linkerd's sidecar ([`linkerd`]).
    Linkerd,
}

impl Mesh {
    /// The names a pods-file entry's `mesh` field takes.
    pub const NAMES: &[&str] = &["istio", "linkerd"];

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "istio" => Some(Mesh::Istio),
            "linkerd" => Some(Mesh::Linkerd),
            _ => None,
        }
    }

    /// The policy of a pod of this mesh with no settings of its own (a locked pod keeps its
    /// proxy's ports and uid through it).
    pub fn base_policy(self) -> crate::policy::annotations::CapturePolicy {
        match self {
            Mesh::Istio => Default::default(),
            Mesh::Linkerd => crate::policy::linkerd::parse(&Default::default())
                .map(|p| p.policy)
                .unwrap_or_default(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mesh::Istio => ISTIO.name,
            Mesh::Linkerd => "linkerd",
        }
    }
}

const fn v4(o: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::new(o[0], o[1], o[2], o[3])
}

const fn v6(o: [u8; 16]) -> Ipv6Addr {
    const fn s(o: &[u8; 16], i: usize) -> u16 {
        u16::from_be_bytes([o[2 * i], o[2 * i + 1]])
    }
    Ipv6Addr::new(
        s(&o, 0),
        s(&o, 1),
        s(&o, 2),
        s(&o, 3),
        s(&o, 4),
        s(&o, 5),
        s(&o, 6),
        s(&o, 7),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The profile's numbers as Istio's own sources give them (istio-iptables' constants and
    /// the injector's template), and the kernel's copies equal to them.
    #[test]
    fn istio_is_istio() {
        assert_eq!((ISTIO.proxy_uid, ISTIO.proxy_gid), (1337, 1337));
        assert_eq!((ISTIO.outbound_port, ISTIO.inbound_port), (15001, 15006));
        assert_eq!(ISTIO.status_port, 15020);
        assert_eq!(ISTIO.dns_agent_port, 15053);
        assert_eq!(ISTIO.tunnel_port, 15008);
        assert_eq!(ISTIO.tproxy_mark, 1337);
        for p in [ISTIO.outbound_port, ISTIO.inbound_port, ISTIO.status_port] {
            assert!(ISTIO.proxy_ports.contains(&p), "{p}");
        }
        assert!(ISTIO.proxy_ports.contains(&ISTIO.tunnel_port));
        assert_eq!(ISTIO.passthrough4.to_string(), "127.0.0.6");
        assert_eq!(ISTIO.passthrough6.to_string(), "::6");
    }
}
