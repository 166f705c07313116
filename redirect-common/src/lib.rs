//! Types shared by the redirector's kernel programs (`redirect-ebpf`) and its daemon
//! (`redirect-user`).
//!
//! Every type here is `#[repr(C)]`, holds only fixed-width integers with explicit padding
//! fields, and has its size const-asserted, so the two sides cannot drift apart. Byte order is
//! part of each field's name: `_be` is network byte order, anything else is host order.
#![no_std]

#[cfg(any(feature = "status", feature = "cni"))]
extern crate alloc;

#[cfg(feature = "status")]
pub mod status;

#[cfg(feature = "cni")]
pub mod cni;

use core::mem::size_of;

/// Maximum number of mesh pods one node can hold (size of `MESH_PODS` and `POD_COUNTERS`).
pub const MAX_PODS: u32 = 4096;
/// Maximum number of port rules (all pods together) in `PORT_RULES`.
pub const MAX_PORT_RULES: u32 = 65_536;
/// Maximum number of owner-group rules (all pods together) in `OWNER_GROUPS`.
pub const MAX_GROUP_RULES: u32 = 16_384;
/// Maximum number of address rules (all pods together) in `ADDR_RULES`.
pub const MAX_ADDR_RULES: u32 = 16_384;
/// Capacity of `DNS_ASKED`: open UDP sockets whose DNS went to the agent (an entry is
/// deleted when its socket closes).
pub const MAX_DNS_SOCKETS: u32 = 16_384;
/// How many `DNS_ASKED` entries one pod may hold (open UDP sockets whose DNS went to the
/// agent): a sixteenth of the map, so no pod can take another's room. Past it, the pod's
/// further DNS queries are refused (`EPERM`), never sent around the agent.
pub const MAX_DNS_SOCKETS_PER_POD: u32 = MAX_DNS_SOCKETS / 16;
/// Capacity of the original-destination map by 4-tuple (`ORIG_BY_TUPLE`). An LRU map, so a
/// connection whose close we never saw cannot fill it. (`ORIG_BY_SOCK`, by socket, is the
/// sockets' own storage and has no capacity.)
pub const MAX_ORIG_DST: u32 = 65_536;

/// The names of the maps (`redirect-ebpf/src/maps.rs` defines each under this name, and it is
/// pinned as `<pin-dir>/maps/<NAME>`). The daemon opens maps by these names only.
pub mod map_names {
    pub const MESH_PODS: &str = "MESH_PODS";
    pub const PORT_RULES: &str = "PORT_RULES";
    pub const ADDR_RULES: &str = "ADDR_RULES";
    pub const ORIG_BY_SOCK: &str = "ORIG_BY_SOCK";
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    pub const POD_COUNTERS: &str = "POD_COUNTERS";
    pub const LISTENERS: &str = "LISTENERS";
    pub const SOCK_PAIRS: &str = "SOCK_PAIRS";
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    pub const ACCEL_FALLBACK: &str = "ACCEL_FALLBACK";
    pub const PROXY_SOCKS: &str = "PROXY_SOCKS";
    pub const STEERED: &str = "STEERED";
    pub const POD_SOURCES: &str = "POD_SOURCES";
    pub const OWNER_GROUPS: &str = "OWNER_GROUPS";
    pub const DNS_ASKED: &str = "DNS_ASKED";
    pub const DNS_SOCKETS: &str = "DNS_SOCKETS";
    pub const TPROXY_ORIGINS: &str = "TPROXY_ORIGINS";
}

/// The kernel programs' names (their functions' names in redirect-ebpf), by which the daemon
/// loads, attaches, pins and reports them. Each must equal its function's name: a mismatch
/// fails every start (the program is not found), which every integration test would show.
pub mod program_names {
    pub const GETSOCKOPT: &str = "rd_getsockopt";
    pub const SOCK_RELEASE: &str = "rd_sock_release";
    pub const SOCK_CREATE: &str = "rd_sock_create";
    pub const SETSOCKOPT: &str = "rd_setsockopt";
    pub const SOCKOPS: &str = "rd_sockops";
    pub const PEERNAME4: &str = "rd_peername4";
    pub const PEERNAME6: &str = "rd_peername6";
    pub const RECVMSG4: &str = "rd_recvmsg4";
    pub const RECVMSG6: &str = "rd_recvmsg6";
    pub const SENDMSG4: &str = "rd_sendmsg4";
    pub const SENDMSG6: &str = "rd_sendmsg6";
    pub const CONNECT4: &str = "rd_connect4";
    pub const CONNECT6: &str = "rd_connect6";
    pub const SK_MSG: &str = "rd_sk_msg";
    pub const SK_LOOKUP: &str = "rd_sk_lookup";
}

/// The kernel programs' load-time globals (`#[no_mangle]` statics in redirect-ebpf, of the same
/// names), which the daemon sets when it loads them.
pub mod global_names {
    /// `sockops`: the node's proxy inbound port (u32).
    pub const INBOUND_PORT: &str = "INBOUND_PORT";
    /// `sockops`: the node's proxy outbound port (u32).
    pub const OUTBOUND_PORT: &str = "OUTBOUND_PORT";
    /// `sockops`: same-node acceleration on (u32, 1) or off (0).
    pub const ACCEL_ENABLED: &str = "ACCEL_ENABLED";
    /// `sk_msg`: `icsk_ulp_ops`'s offset in a TCP socket (u32; 0 unknown).
    pub const ULP_OPS_OFFSET: &str = "ULP_OPS_OFFSET";
    /// `sk_lookup` (per pod): the pod's netns cookie (u64).
    pub const POD_NETNS_COOKIE: &str = "POD_NETNS_COOKIE";
    /// `sk_lookup` (per pod): whether the verifier lets it read `ingress_ifindex` (u8).
    pub const SEES_INGRESS_IFINDEX: &str = "SEES_INGRESS_IFINDEX";
}

/// `AF_INET`, as stored in the `family` fields below.
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as stored in the `family` fields below.
pub const AF_INET6: u16 = 10;

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST`: both are 80.
pub const SO_ORIGINAL_DST: i32 = 80;
/// `SOL_IP`.
pub const SOL_IP: i32 = 0;
/// `SOL_IPV6`.
pub const SOL_IPV6: i32 = 41;

/// [`PodConfig::flags`]: refuse (`EPERM`) a captured connection when the pod's proxy is not
/// listening, instead of letting it go direct.
pub const POD_FLAG_FAIL_CLOSED: u32 = 1 << 0;
/// [`PodConfig::flags`]: `includeOutboundIPRanges` is `*` (capture every destination not
/// excluded before).
pub const POD_FLAG_INCLUDE_ALL_OUTBOUND: u32 = 1 << 1;
/// [`PodConfig::flags`]: `includeInboundPorts` is `*` (capture every inbound port not excluded).
pub const POD_FLAG_INCLUDE_ALL_INBOUND: u32 = 1 << 2;

/// [`PodConfig::flags`]: no same-node acceleration for this pod's sockets
/// (annotation `redirectd.dev/accel: "false"`).
pub const POD_FLAG_NO_ACCEL: u32 = 1 << 3;

/// [`PodConfig::flags`]: the pod has `excludeOutboundIPRanges` (skip the trie otherwise).
pub const POD_FLAG_HAS_EXCLUDE_RANGES: u32 = 1 << 4;
/// [`PodConfig::flags`]: the pod has an `includeOutboundIPRanges` list.
pub const POD_FLAG_HAS_INCLUDE_RANGES: u32 = 1 << 5;
/// [`PodConfig::flags`]: the pod has `includeOutboundPorts`.
pub const POD_FLAG_HAS_INCLUDE_PORTS: u32 = 1 << 6;
/// [`PodConfig::flags`]: the pod's configuration was rejected before it was ever served:
/// every connection that would be captured is refused instead (with `POD_FLAG_FAIL_CLOSED`),
/// so a typo never leaves a mesh pod uncaptured.
pub const POD_FLAG_REJECTED: u32 = 1 << 7;
/// [`PodConfig::flags`]: `includeOutboundIPRanges` names a loopback range (Istio's
/// `HasLoopBackIP`): the application's connections over lo are not returned early, and go on
/// to the range rules (so a loopback destination in the list is captured).
pub const POD_FLAG_LOOPBACK_INCLUDE: u32 = 1 << 8;
/// [`PodConfig::flags`]: Istio's `ISTIO_OUTBOUND_OWNER_GROUPS`: only a caller whose group is
/// in the pod's `OWNER_GROUPS` entries has its outbound connections captured.
pub const POD_FLAG_OWNER_GROUPS_INCLUDE: u32 = 1 << 9;
/// [`PodConfig::flags`]: `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`: a caller whose group is in the
/// pod's `OWNER_GROUPS` entries goes direct.
pub const POD_FLAG_OWNER_GROUPS_EXCLUDE: u32 = 1 << 10;
/// [`PodConfig::flags`]: Istio's DNS capture (`ISTIO_META_DNS_CAPTURE`): the application's DNS
/// (UDP and TCP to port 53) goes to the agent's DNS proxy on [`AGENT_DNS_PORT`].
pub const POD_FLAG_DNS_CAPTURE: u32 = 1 << 11;
/// [`PodConfig::flags`]: the pod has `excludeInterfaces` (its `ADDR_ROUTE_*` and
/// `ADDR_EXCLUDED_IFACE_LOCAL` entries are consulted).
pub const POD_FLAG_EXCLUDED_IFACES: u32 = 1 << 12;
/// `sidecar.istio.io/interceptionMode: TPROXY`: the proxy connects to the application from
/// the client's address (Envoy's `original_src`, sockets marked [`TPROXY_MARK`]); such
/// connections are never captured, and the pod's policy routing sends the replies back to the
/// proxy (set up by the daemon in the pod's namespace).
pub const POD_FLAG_TPROXY: u32 = 1 << 13;
/// `traffic.sidecar.istio.io/kubevirtInterfaces` (or `istio.io/reroute-virtual-interfaces`):
/// every TCP connection that arrives through one of the pod's VM interfaces (`PORT_RULES`
/// kind [`PORT_VM_IFACE`]) goes to the proxy's outbound listener, as Istio's `PREROUTING -i
/// IFACE -j ISTIO_REDIRECT`. The daemon routes the interfaces' TCP to the pod itself.
pub const POD_FLAG_VM_IFACES: u32 = 1 << 14;
/// Linkerd's `PROXY_INIT_OUTPUT -o lo -j RETURN`: nothing that goes over lo (loopback, the
/// pod's own addresses) is captured, the proxy's calls to its own pod included (Istio's rows
/// 2 to 4 do not apply).
pub const POD_FLAG_LOOPBACK_DIRECT: u32 = 1 << 15;
/// The pod has inbound sources that are never captured ([`ADDR_EXCLUDE_INBOUND_SOURCE`]:
/// Linkerd's `skip-subnets`, `PROXY_INIT_REDIRECT -s NET -j RETURN`).
pub const POD_FLAG_HAS_INBOUND_SOURCE_EXCLUDE: u32 = 1 << 16;
/// The mark of the proxy's original-source sockets in TPROXY mode (Istio's
/// `--inbound-tproxy-mark`, and the mark Istio gives Envoy's `original_src` filter).
pub const TPROXY_MARK: u32 = 1337;
/// The routing table TPROXY's replies are looked up in (Istio's
/// `--inbound-tproxy-route-table`): one `local` default route through `lo`.
pub const TPROXY_ROUTE_TABLE: u32 = 133;
/// The DNS port captured with [`POD_FLAG_DNS_CAPTURE`].
pub const DNS_PORT: u16 = 53;
/// Where Istio's agent serves DNS in the pod (127.0.0.1 and ::1): `IstioAgentDNSListenerPort`.
pub const AGENT_DNS_PORT: u16 = 15053;

/// Key of `OWNER_GROUPS`: "pod `pod_id`'s owner-group list names group `gid`" (which list:
/// the pod's `POD_FLAG_OWNER_GROUPS_*` flag). The value is unused (1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GroupRuleKey {
    /// [`PodConfig::pod_id`].
    pub pod_id: u32,
    /// The group id, as the pod's processes have it.
    pub gid: u32,
}
const _: () = assert!(size_of::<GroupRuleKey>() == 8);

/// Istio's HBONE tunnel port: never captured by the proxy's own over-lo rule.
pub const HBONE_PORT: u16 = 15008;

/// Istio's inbound passthrough source, `127.0.0.6`: the proxy connects to the application
/// from it (REDIRECT mode).
pub const PASSTHROUGH4: [u8; 4] = [127, 0, 0, 6];
/// Istio's inbound passthrough source for IPv6, `::6`.
pub const PASSTHROUGH6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6];

/// Key of `LISTENERS`: a proxy listener (inbound or outbound port) of one network namespace
/// and family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// Network namespace cookie, host order.
    pub netns_cookie: u64,
    /// `AF_INET` or `AF_INET6`, widened.
    pub family: u32,
    /// The listening port, host order, widened.
    pub port: u32,
}
const _: () = assert!(size_of::<ListenerKey>() == 16);

/// Capacity of `LISTENERS`: one IPv4 and one IPv6 listener per pod, plus room for
/// namespaces that are not (yet) in the mesh.
pub const MAX_LISTENERS: u32 = 4 * MAX_PODS;

/// Configuration of one mesh pod; value of `MESH_PODS`, whose key is the pod's network
/// namespace cookie (`u64`, host order, as `bpf_get_netns_cookie` returns it).
///
/// Written only by the daemon's map layer; read by every program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodConfig {
    /// Slot of this pod: index into `POD_COUNTERS` and first field of every rule key.
    pub pod_id: u32,
    /// The proxy's uid (Istio: 1337); its own connections are never captured outbound.
    pub proxy_uid: u32,
    /// The proxy's gid (Istio: 1337); Istio matches uid *or* gid.
    pub proxy_gid: u32,
    /// Proxy outbound listener port (15001), host order.
    pub outbound_port: u16,
    /// Proxy inbound listener port (15006), host order.
    pub inbound_port: u16,
    /// `POD_FLAG_*` bits.
    pub flags: u32,
    /// Explicit padding; always 0.
    pub _pad: u32,
}
const _: () = assert!(size_of::<PodConfig>() == 24);

/// [`PortRuleKey::kind`]: `excludeOutboundPorts`.
pub const PORT_EXCLUDE_OUTBOUND: u8 = 1;
/// [`PortRuleKey::kind`]: `includeOutboundPorts`.
pub const PORT_INCLUDE_OUTBOUND: u8 = 2;
/// [`PortRuleKey::kind`]: `excludeInboundPorts` (and the proxy's own ports).
pub const PORT_EXCLUDE_INBOUND: u8 = 3;
/// [`PortRuleKey::kind`]: `includeInboundPorts` when it is a list.
pub const PORT_INCLUDE_INBOUND: u8 = 4;
/// [`PortRuleKey::kind`]: the interface index (in `port`) of one of the pod's
/// `kubevirtInterfaces`, read from its namespace by the daemon.
pub const PORT_VM_IFACE: u8 = 5;

/// Key of `PORT_RULES`: "pod `pod_id` has port `port` in list `kind`". The value is unused
/// (a `u32` 1); presence is the rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRuleKey {
    /// [`PodConfig::pod_id`].
    pub pod_id: u32,
    /// The port, host order.
    pub port: u16,
    /// One of `PORT_*`.
    pub kind: u8,
    /// Explicit padding; always 0.
    pub _pad: u8,
}
const _: () = assert!(size_of::<PortRuleKey>() == 8);

/// [`AddrRuleData::kind`]: `excludeOutboundIPRanges`.
pub const ADDR_EXCLUDE_OUTBOUND: u32 = 1;
/// [`AddrRuleData::kind`]: `includeOutboundIPRanges` when it is a list.
pub const ADDR_INCLUDE_OUTBOUND: u32 = 2;
/// A pod's own address (a /32 or /128) in [`PodRules`-style rule lists]; the daemon writes
/// these to `NODE_ADDRS` (exact match), not to the trie.
pub const ADDR_POD_IP: u32 = 3;
/// [`AddrRuleData::kind`]: a route of the pod's main table through one of its
/// `excludeInterfaces` (outbound to it goes direct, unless a longer route of
/// [`ADDR_ROUTE_OTHER`] wins). The value of every `ADDR_RULES` entry is its key's prefix
/// length, so two kinds' longest matches can be compared.
pub const ADDR_ROUTE_EXCLUDED: u32 = 4;
/// [`AddrRuleData::kind`]: a route of the pod's main table through any other interface.
pub const ADDR_ROUTE_OTHER: u32 = 5;
/// [`AddrRuleData::kind`]: an address configured on one of the pod's `excludeInterfaces`
/// (inbound to it goes direct: what arrives through that interface is addressed to it).
pub const ADDR_EXCLUDED_IFACE_LOCAL: u32 = 6;
/// [`AddrRuleData::kind`]: a network whose connections into the pod go direct (Linkerd's
/// `config.linkerd.io/skip-subnets`), matched against the connection's remote address.
pub const ADDR_EXCLUDE_INBOUND_SOURCE: u32 = 7;

/// Number of leading bits of [`AddrRuleData`] that every rule matches exactly
/// (`pod_id` and `kind`); the address prefix length is added to it.
pub const ADDR_RULE_FIXED_BITS: u32 = 64;

/// Data part of an `ADDR_RULES` LPM-trie key; the trie's prefix length is
/// `ADDR_RULE_FIXED_BITS + 96 + len` for an IPv4 /len (stored IPv4-mapped) and
/// `ADDR_RULE_FIXED_BITS + len` for an IPv6 /len.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrRuleData {
    /// [`PodConfig::pod_id`], host order (matched exactly, so its order is irrelevant).
    pub pod_id: u32,
    /// One of `ADDR_*`.
    pub kind: u32,
    /// The address in network byte order; IPv4 as `::ffff:a.b.c.d`.
    pub addr_be: [u8; 16],
}
const _: () = assert!(size_of::<AddrRuleData>() == 24);

/// An original destination: where a captured connection was going before we rewrote it.
/// Value of `ORIG_BY_SOCK` and `ORIG_BY_TUPLE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Address in network byte order: IPv4 in `addr_be[0]`, the rest 0.
    pub addr_be: [u32; 4],
    /// Port, network byte order.
    pub port_be: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// [`PodConfig::pod_id`] of the pod that made the connection.
    pub pod_id: u32,
    /// Network namespace cookie of the connecting socket.
    pub netns_cookie: u64,
}
const _: () = assert!(size_of::<OrigDst>() == 32);

/// Key of `ORIG_BY_TUPLE`: one TCP connection seen from its client (the application), in the
/// client's network namespace. The proxy's accepted socket builds the same key with its peer
/// as `client` and its local address as `server`. The netns cookie keeps pods apart: each pod
/// has its own 127.0.0.1.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TupleKey {
    /// Network namespace cookie.
    pub netns_cookie: u64,
    /// Client address, network byte order; IPv4 in `[0]`, the rest 0.
    pub client_addr_be: [u32; 4],
    /// Server (proxy listener) address, network byte order; IPv4 in `[0]`.
    pub server_addr_be: [u32; 4],
    /// Client port, network byte order.
    pub client_port_be: u16,
    /// Server port, network byte order.
    pub server_port_be: u16,
    /// `AF_INET` or `AF_INET6`, widened; upper half is padding and always 0.
    pub family: u32,
}
const _: () = assert!(size_of::<TupleKey>() == 48);

/// Defines [`PodCounters`] from one list of counters: its fields, their names (the keys
/// `redirectd status --json` shows and the metrics table refers to), the getters and the sum
/// over CPUs all come from this list, so they cannot drift apart.
macro_rules! pod_counters {
    ($($(#[doc = $doc:literal])+ $field:ident,)+) => {
        /// Per-pod counters; value of the per-CPU array `POD_COUNTERS`, indexed by
        /// [`PodConfig::pod_id`]. Written by the kernel programs, summed over CPUs by the
        /// daemon. The daemon zeroes a slot when it gives it to a new pod.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct PodCounters {
            $($(#[doc = $doc])+ pub $field: u64,)+
            /// Reserved for later counters; keeps the value size stable.
            pub _reserved: [u64; PodCounters::RESERVED],
        }

        impl PodCounters {
            /// How many counters are in use.
            pub const COUNT: usize = [$(stringify!($field)),+].len();
            /// Room kept for later counters.
            const RESERVED: usize = 16 - Self::COUNT;
            /// The counters' names, in the order of [`PodCounters::values`].
            pub const NAMES: [&'static str; Self::COUNT] = [$(stringify!($field)),+];

            /// The counters in use, in the order of [`PodCounters::NAMES`].
            pub fn values(&self) -> [u64; Self::COUNT] {
                [$(self.$field),+]
            }

            /// Adds another CPU's counters to these.
            pub fn add(&mut self, o: &Self) {
                $(self.$field += o.$field;)+
            }
        }
    };
}

pod_counters! {
    /// Outbound connections sent to the proxy.
    outbound_captured,
    /// Outbound connections that a rule sent direct (excluded port or range, loopback, proxy).
    outbound_direct,
    /// Outbound connections that should have been captured but went direct because the proxy
    /// was not listening (fail open).
    outbound_fail_open,
    /// Outbound connections refused because the proxy was not listening (fail closed).
    outbound_fail_closed,
    /// `SO_ORIGINAL_DST` answered from our maps.
    orig_dst_answered,
    /// Inbound connections steered to the proxy's inbound listener.
    inbound_captured,
    /// Inbound connections that a rule let through to the application.
    inbound_direct,
    /// Inbound connections let through because no inbound listener was registered.
    inbound_fail_open,
    /// Inbound connections refused because no inbound listener was registered.
    inbound_fail_closed,
    /// Messages moved socket to socket by the acceleration path.
    accel_msgs,
    /// Bytes moved socket to socket by the acceleration path.
    accel_bytes,
    /// Captured connections that, when they closed, had lost their original-destination
    /// entry while still open: the LRU map evicted it because it was full. Until it closed,
    /// such a connection's `getpeername()` and `SO_ORIGINAL_DST` could not be answered.
    orig_dst_evicted,
    /// `SO_ORIGINAL_DST` asked on the proxy's outbound port for a connection we have no entry
    /// for (evicted, or a client that connected to the proxy port itself).
    orig_dst_missed,
    /// Raw sockets that could write TCP around capture, refused in the pod (a raw TCP or
    /// `IPPROTO_RAW` socket, or `IP_HDRINCL`), for any process but the proxy.
    raw_denied,
}
const _: () = assert!(size_of::<PodCounters>() == 128);

/// Key of `SOCK_PAIRS` (and `ACCEL_FALLBACK`): one local TCP socket seen from itself. Its peer
/// has the same key with local and remote swapped. The netns cookie is set only when either
/// address is loopback or the passthrough source (each pod has its own 127.0.0.1); between pod
/// addresses, unique on the node, it is 0 so that sockets in two pods pair up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns_cookie: u64,
    /// Local address, network byte order; IPv4 in `[0]`, the rest 0.
    pub local_addr_be: [u32; 4],
    /// Remote address, network byte order; IPv4 in `[0]`.
    pub remote_addr_be: [u32; 4],
    pub local_port_be: u16,
    pub remote_port_be: u16,
    /// `AF_INET` or `AF_INET6`, widened.
    pub family: u32,
}
const _: () = assert!(size_of::<SockKey>() == 48);

/// Capacity of `SOCK_PAIRS`: local sockets that can be accelerated at once.
pub const MAX_SOCK_PAIRS: u32 = 65_536;

/// Key of `NODE_ADDRS`: an address of a mesh pod on this node (network order, IPv4 mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeAddrKey {
    pub addr_be: [u8; 16],
}
const _: () = assert!(size_of::<NodeAddrKey>() == 16);

/// [`PodSource::flags`]: `v4_be` holds the pod's IPv4 address.
pub const POD_SOURCE_HAS_V4: u32 = 1 << 0;
/// [`PodSource::flags`]: `v6_be` holds the pod's IPv6 address.
pub const POD_SOURCE_HAS_V6: u32 = 1 << 1;

/// Value of `POD_SOURCES`, indexed by [`PodConfig::pod_id`]: the address of each family a
/// pod's connections leave from (its first IP of that family). A captured connection whose
/// socket has no local address yet is bound to it, so the application's `getsockname()` and
/// the proxy's view of its peer show the pod's address, as under iptables REDIRECT (where
/// NAT happens below a socket that chose its source for the original destination).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodSource {
    /// IPv4 address, network byte order.
    pub v4_be: u32,
    /// `POD_SOURCE_HAS_*` bits.
    pub flags: u32,
    /// IPv6 address, network byte order words.
    pub v6_be: [u32; 4],
}
const _: () = assert!(size_of::<PodSource>() == 24);

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: PodConfig is #[repr(C)], made only of integers and integer arrays with explicit
    // padding fields (no implicit padding, its size is const-asserted), so every bit pattern
    // is a valid value and it can be copied to and from the kernel as bytes.
    unsafe impl aya::Pod for PodConfig {}
    // SAFETY: PortRuleKey is #[repr(C)], made only of integers and integer arrays with explicit
    // padding fields (no implicit padding, its size is const-asserted), so every bit pattern
    // is a valid value and it can be copied to and from the kernel as bytes.
    unsafe impl aya::Pod for PortRuleKey {}
    // SAFETY: GroupRuleKey is #[repr(C)], two u32s, no padding.
    unsafe impl aya::Pod for GroupRuleKey {}
    // SAFETY: AddrRuleData is #[repr(C)], made only of integers and integer arrays with explicit
    // padding fields (no implicit padding, its size is const-asserted), so every bit pattern
    // is a valid value and it can be copied to and from the kernel as bytes.
    unsafe impl aya::Pod for AddrRuleData {}
    // SAFETY: OrigDst is #[repr(C)], made only of integers and integer arrays with explicit
    // padding fields (no implicit padding, its size is const-asserted), so every bit pattern
    // is a valid value and it can be copied to and from the kernel as bytes.
    unsafe impl aya::Pod for OrigDst {}
    // SAFETY: TupleKey is #[repr(C)], made only of integers and integer arrays with explicit
    // padding fields (no implicit padding, its size is const-asserted), so every bit pattern
    // is a valid value and it can be copied to and from the kernel as bytes.
    unsafe impl aya::Pod for TupleKey {}
    // SAFETY: PodCounters is #[repr(C)], made only of integers and integer arrays with explicit
    // padding fields (no implicit padding, its size is const-asserted), so every bit pattern
    // is a valid value and it can be copied to and from the kernel as bytes.
    unsafe impl aya::Pod for PodCounters {}
    // SAFETY: ListenerKey is #[repr(C)], made only of integers and integer arrays with explicit
    // padding fields (no implicit padding, its size is const-asserted), so every bit pattern
    // is a valid value and it can be copied to and from the kernel as bytes.
    unsafe impl aya::Pod for ListenerKey {}
    // SAFETY: SockKey is #[repr(C)], made only of integers and integer arrays with explicit
    // padding fields (no implicit padding, its size is const-asserted), so every bit pattern
    // is a valid value and it can be copied to and from the kernel as bytes.
    unsafe impl aya::Pod for SockKey {}
    // SAFETY: NodeAddrKey is #[repr(C)], made only of integers and integer arrays with explicit
    // padding fields (no implicit padding, its size is const-asserted), so every bit pattern
    // is a valid value and it can be copied to and from the kernel as bytes.
    unsafe impl aya::Pod for NodeAddrKey {}
    // SAFETY: PodSource is #[repr(C)], made only of integers and integer arrays with explicit
    // padding fields (no implicit padding, its size is const-asserted), so every bit pattern
    // is a valid value and it can be copied to and from the kernel as bytes.
    unsafe impl aya::Pod for PodSource {}
}
