//! `cgroup/connect4` and `cgroup/connect6`: outbound capture.
//!
//! For a TCP `connect()` from a mesh pod that Istio's rules would capture, rewrite the
//! destination to the proxy's outbound listener on loopback (or the agent's DNS port, for DNS
//! with DNS capture on) and remember the original destination by socket cookie
//! (`ORIG_BY_SOCK`, the socket's own storage). A UDP `connect()` is DNS capture's ([`crate::dns`]). Sockets outside
//! mesh pods are untouched.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as Tuple4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as Tuple6, BPF_F_CURRENT_NETNS,
    },
    helpers::{
        bpf_get_current_uid_gid,
        generated::{
            bpf_bind, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_map_lookup_elem,
            bpf_sk_lookup_tcp, bpf_sk_release,
        },
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use aya_log_ebpf::debug;
use redirect_common::{
    ListenerKey, NodeAddrKey, PodConfig, AF_INET, AF_INET6, AGENT_DNS_PORT, POD_FLAG_FAIL_CLOSED,
    POD_FLAG_NO_ACCEL, POD_FLAG_REJECTED, POD_FLAG_TPROXY, POD_SOURCE_HAS_V4, POD_SOURCE_HAS_V6,
    TPROXY_MARK,
};

use redirect_ebpf::{
    addr::{
        ctx_addr6, ctx_write_addr6, is_v4_mapped, Endpoint, LOCALHOST4_BE, LOOPBACK6_LAST_BE,
        V4_MAPPED_WORD_BE,
    },
    counters::count,
    maps::{
        set_orig_dst, ContextSock, Maps, LISTENERS, MESH_PODS, NODE_ADDRS, POD_SOURCES, PROXY_SOCKS,
    },
    policy::{outbound, Outbound},
};

/// Verdict of a `cgroup/connect*` program: let the call proceed.
const ALLOW: i32 = 1;
/// Verdict of a `cgroup/connect*` program: fail the call with `EPERM`.
const REFUSE: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// Outbound capture for IPv4 sockets. Minimum kernel: 5.15 (netns cookie in sock_addr 5.7,
/// `bpf_sk_lookup_tcp` in sock_addr 5.2, multi-attach links 5.7).
#[cgroup_sock_addr(connect4)]
pub fn rd_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: ctx fields the verifier allows a connect4 program to read.
    let (protocol, ip_be, port) = unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    let dst = Endpoint::v4(ip_be, port as u16);
    if protocol == IPPROTO_UDP {
        match crate::dns::udp(&ctx, &dst) {
            crate::dns::Udp::Leave => {}
            crate::dns::Udp::ToAgent => crate::dns::to_agent4(&ctx),
            crate::dns::Udp::Refuse => return REFUSE,
        }
    }
    if protocol != IPPROTO_TCP {
        return ALLOW;
    }
    // SAFETY: the socket of a connect4 program is a full socket the verifier lets us read.
    let (src, mark) = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        (Endpoint::v4((*sk).src_ip4, 0), (*sk).mark)
    };
    match decide(&ctx, &dst, &src, mark) {
        Decision::Direct => ALLOW,
        Decision::Refuse => REFUSE,
        Decision::Redirect { port_be, bind } => {
            if let Some(from) = bind {
                bind4(&ctx, from.addr_be[0]);
            }
            // SAFETY: connect4 may write the destination.
            unsafe {
                (*sa).user_ip4 = LOCALHOST4_BE;
                (*sa).user_port = port_be as u32;
            }
            ALLOW
        }
    }
}

/// Outbound capture for IPv6 sockets, including IPv4-mapped destinations on dual-stack
/// sockets. Minimum kernel: 5.15.
#[cgroup_sock_addr(connect6)]
pub fn rd_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: ctx fields the verifier allows a connect6 program to read, one word at a time.
    let (protocol, port, addr) = unsafe {
        (
            (*sa).protocol,
            (*sa).user_port,
            ctx_addr6(&raw const (*sa).user_ip6),
        )
    };
    let mapped = is_v4_mapped(&addr);
    if protocol == IPPROTO_UDP {
        let dst = if mapped {
            Endpoint::v4(addr[3], port as u16)
        } else {
            Endpoint::v6(addr, port as u16)
        };
        match crate::dns::udp(&ctx, &dst) {
            crate::dns::Udp::Leave => {}
            crate::dns::Udp::ToAgent => crate::dns::to_agent6(&ctx, mapped),
            crate::dns::Udp::Refuse => return REFUSE,
        }
    }
    if protocol != IPPROTO_TCP {
        return ALLOW;
    }
    // SAFETY: the socket of a connect6 program is a full socket the verifier lets us read.
    let (src_addr, mark) = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        (ctx_addr6(&raw const (*sk).src_ip6), (*sk).mark)
    };
    let (dst, src) = if mapped {
        (
            Endpoint::v4(addr[3], port as u16),
            Endpoint::v4(src_addr[3], 0),
        )
    } else {
        (Endpoint::v6(addr, port as u16), Endpoint::v6(src_addr, 0))
    };
    match decide(&ctx, &dst, &src, mark) {
        Decision::Direct => ALLOW,
        Decision::Refuse => REFUSE,
        Decision::Redirect { port_be, bind } => {
            if let Some(from) = bind {
                let addr = if mapped {
                    [0, 0, V4_MAPPED_WORD_BE, from.addr_be[0]]
                } else {
                    from.addr_be
                };
                bind6(&ctx, addr);
            }
            let loopback = if mapped {
                [0, 0, V4_MAPPED_WORD_BE, LOCALHOST4_BE]
            } else {
                [0, 0, 0, LOOPBACK6_LAST_BE]
            };
            // SAFETY: connect6 may write the destination, one word at a time.
            unsafe {
                ctx_write_addr6(&raw mut (*sa).user_ip6, loopback);
                (*sa).user_port = port_be as u32;
            }
            ALLOW
        }
    }
}

/// `struct sockaddr_in`, for `bpf_bind`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr_be: u32,
    zero: [u8; 8],
}

/// `struct sockaddr_in6`, for `bpf_bind`.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port_be: u16,
    flowinfo: u32,
    addr_be: [u32; 4],
    scope_id: u32,
}

/// Binds the connecting socket's local address (port 0: the port is still chosen at
/// connect). Best effort: a socket the kernel will not bind keeps the source it would get.
#[inline(always)]
fn bind4(ctx: &SockAddrContext, addr_be: u32) {
    let mut sa = SockaddrIn {
        family: AF_INET,
        port_be: 0,
        addr_be,
        zero: [0; 8],
    };
    // SAFETY: bpf_bind is valid in connect4 programs; it reads `size_of::<SockaddrIn>()`
    // bytes of `sa`, which lives on this stack frame for the call.
    let rc = unsafe {
        bpf_bind(
            ctx.sock_addr,
            (&raw mut sa).cast(),
            size_of::<SockaddrIn>() as i32,
        )
    };
    if rc != 0 {
        debug!(ctx, "bpf_bind of a captured socket failed: {}", rc);
    }
}

/// [`bind4`] for IPv6 sockets (IPv4-mapped addresses for IPv4 destinations).
#[inline(always)]
fn bind6(ctx: &SockAddrContext, addr_be: [u32; 4]) {
    let mut sa = SockaddrIn6 {
        family: AF_INET6,
        port_be: 0,
        flowinfo: 0,
        addr_be,
        scope_id: 0,
    };
    // SAFETY: bpf_bind is valid in connect6 programs; it reads `size_of::<SockaddrIn6>()`
    // bytes of `sa`, which lives on this stack frame for the call.
    let rc = unsafe {
        bpf_bind(
            ctx.sock_addr,
            (&raw mut sa).cast(),
            size_of::<SockaddrIn6>() as i32,
        )
    };
    if rc != 0 {
        debug!(ctx, "bpf_bind of a captured socket failed: {}", rc);
    }
}

enum Decision {
    Direct,
    Refuse,
    /// Rewrite the destination to loopback (127.0.0.1 / ::1, where REDIRECT sends a locally
    /// made connection) and this port (network byte order); first bind the socket's source
    /// to `bind` when it has none, so it leaves from the address it would have used for the
    /// original destination.
    Redirect {
        port_be: u16,
        bind: Option<Endpoint>,
    },
}

/// `mark`: the socket's `SO_MARK`.
#[inline(always)]
fn decide(ctx: &SockAddrContext, dst: &Endpoint, src: &Endpoint, mark: u32) -> Decision {
    // The kernel takes a connection to 0.0.0.0 (`::`) to the socket's own address, or to
    // loopback when it has none; the rules decide on that address, as Istio's see it.
    let local = dst.or_local(src);
    let dst = &local;
    // SAFETY: helper valid for sock_addr programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: plain-data value, copied out at once.
    let pod: PodConfig = match unsafe { MESH_PODS.get(&netns_cookie) } {
        Some(pod) => *pod,
        None => return Decision::Direct,
    };
    let uid_gid = bpf_get_current_uid_gid();
    let is_proxy = uid_gid as u32 == pod.proxy_uid || (uid_gid >> 32) as u32 == pod.proxy_gid;
    if is_proxy && pod.flags & POD_FLAG_NO_ACCEL == 0 && is_node_pod_addr(dst) {
        // Remember the proxy's own sockets to other pods of this node: only they are
        // accelerated (sockops).
        // SAFETY: helper valid for sock_addr programs.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = PROXY_SOCKS.insert(&cookie, &1, 0);
    }
    // An unbound socket to `::6` leaves from `::6` (the kernel picks the destination's own
    // address on lo), and Istio's rule 2 returns it; to 127.0.0.6 it leaves from 127.0.0.1.
    // In a TPROXY pod the proxy hands an inbound connection to its application from the
    // client's address instead (Envoy's `original_src`), its socket marked 1337.
    let from_passthrough = src.is_passthrough_source()
        || (src.is_unspecified() && dst.family == AF_INET6 && dst.is_passthrough_source())
        || (pod.flags & POD_FLAG_TPROXY != 0 && mark == TPROXY_MARK && is_proxy);
    let verdict = outbound(
        Maps,
        &pod,
        dst,
        is_proxy,
        (uid_gid >> 32) as u32,
        from_passthrough,
        // IPv4 only: an IPv6 socket bound to ::1 does reach other hosts' addresses (the
        // conformance suite runs both under Istio's rules).
        src.family == AF_INET && src.is_loopback(),
    );
    let (to_outbound, port) = match verdict {
        Outbound::Direct => {
            count(pod.pod_id, |c| c.outbound_direct += 1);
            return Decision::Direct;
        }
        Outbound::Capture => (true, pod.outbound_port),
        Outbound::CaptureDns => (true, AGENT_DNS_PORT),
        Outbound::CaptureInbound => (false, pod.inbound_port),
    };
    if pod.flags & POD_FLAG_REJECTED != 0 {
        // Its configuration was rejected before it was served: refused, never uncaptured.
        return fail(ctx, &pod, to_outbound);
    }
    // Fast path: the listener registered in LISTENERS (at its listen(), or adopted by the
    // daemon); else a socket lookup, so an unregistered proxy is still seen.
    let listening = listener_registered(netns_cookie, dst.family, port)
        || proxy_listening(ctx, dst.family, port);
    if !listening {
        return fail(ctx, &pod, to_outbound);
    }
    if !set_orig_dst(
        ContextSock::of_sock_addr(ctx),
        &dst.orig_dst(pod.pod_id, netns_cookie),
    ) {
        // The proxy could not learn where to go: do not capture.
        return fail(ctx, &pod, to_outbound);
    }
    if to_outbound {
        count(pod.pod_id, |c| c.outbound_captured += 1);
    } else {
        count(pod.pod_id, |c| c.inbound_captured += 1);
    }
    debug!(
        ctx,
        "pod {} captured connection to port {}",
        pod.pod_id,
        dst.port()
    );
    // The source the kernel would have chosen for the original destination, for a socket
    // that has none yet: the pod's own address (outbound), or the local address called (the
    // proxy reaching its own pod); for a loopback destination (captured when the pod's
    // include ranges name one) the kernel's choice is loopback, as it is for the proxy's port.
    let bind = if !src.is_unspecified() || dst.is_loopback() {
        None
    } else if to_outbound {
        pod_source(pod.pod_id, dst.family)
    } else {
        Some(Endpoint { port_be: 0, ..*dst })
    };
    Decision::Redirect {
        port_be: port.to_be(),
        bind,
    }
}

/// The pod's own address of `family` ([`POD_SOURCES`]), if the daemon knows one.
#[inline(always)]
fn pod_source(pod_id: u32, family: u16) -> Option<Endpoint> {
    let s = POD_SOURCES.get(pod_id)?;
    if family == AF_INET {
        (s.flags & POD_SOURCE_HAS_V4 != 0).then(|| Endpoint::v4(s.v4_be, 0))
    } else {
        (s.flags & POD_SOURCE_HAS_V6 != 0).then(|| Endpoint::v6(s.v6_be, 0))
    }
}

/// The pod's proxy is not listening (or we could not record the destination): fail open or
/// closed as the pod is configured, and count it (as outbound, or as the proxy reaching its
/// own pod through inbound).
#[inline(always)]
fn fail(ctx: &SockAddrContext, pod: &PodConfig, outbound: bool) -> Decision {
    let closed = pod.flags & POD_FLAG_FAIL_CLOSED != 0;
    count(pod.pod_id, |c| match (outbound, closed) {
        (true, true) => c.outbound_fail_closed += 1,
        (true, false) => c.outbound_fail_open += 1,
        (false, true) => c.inbound_fail_closed += 1,
        (false, false) => c.inbound_fail_open += 1,
    });
    if closed {
        debug!(
            ctx,
            "pod {} proxy not listening: refused (fail closed)", pod.pod_id
        );
        Decision::Refuse
    } else {
        debug!(
            ctx,
            "pod {} proxy not listening: direct (fail open)", pod.pod_id
        );
        Decision::Direct
    }
}

/// Is `addr` a mesh pod of this node (a candidate peer for acceleration)?
#[inline(always)]
fn is_node_pod_addr(addr: &Endpoint) -> bool {
    NODE_ADDRS
        .get_ptr(&NodeAddrKey {
            addr_be: addr.addr16(),
        })
        .is_some()
}

/// Is a proxy listener for `port` registered in `LISTENERS` for this netns and family?
#[inline(always)]
fn listener_registered(netns_cookie: u64, family: u16, port: u16) -> bool {
    let key = ListenerKey {
        netns_cookie,
        family: family.into(),
        port: port.into(),
    };
    // SAFETY: `LISTENERS` is a repr(transparent) map definition, so its address is the map
    // the verifier relocates; a socket found is a reference released right away.
    unsafe {
        let sk = bpf_map_lookup_elem(
            (&raw const LISTENERS).cast_mut().cast(),
            (&raw const key).cast(),
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk);
    }
    true
}

/// Is something listening on loopback:`port` (host order) in the caller's netns? Checked
/// per connection, never cached: the proxy may start after the application.
#[inline(always)]
fn proxy_listening(ctx: &SockAddrContext, family: u16, port: u16) -> bool {
    // SAFETY: an all-zero tuple is valid.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if family == AF_INET {
        tuple.__bindgen_anon_1.ipv4 = Tuple4 {
            saddr: LOCALHOST4_BE,
            daddr: LOCALHOST4_BE,
            sport: 0,
            dport: port.to_be(),
        };
        size_of::<Tuple4>()
    } else {
        tuple.__bindgen_anon_1.ipv6 = Tuple6 {
            saddr: [0, 0, 0, LOOPBACK6_LAST_BE],
            daddr: [0, 0, 0, LOOPBACK6_LAST_BE],
            sport: 0,
            dport: port.to_be(),
        };
        size_of::<Tuple6>()
    };
    // SAFETY: helper valid for sock_addr programs; the returned reference is released below.
    unsafe {
        let sk = bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}
