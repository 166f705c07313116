//! DNS capture over UDP (Istio's `ISTIO_META_DNS_CAPTURE`): a mesh pod's DNS queries to port
//! 53, from any process but the proxy, go to the agent's DNS proxy on 127.0.0.1:15053
//! (`[::1]:15053`), and its replies look as if they came from the server the application
//! asked. TCP DNS is decided with the other TCP rules at `connect()` (`connect.rs`).
//!
//! - a connected socket is sent to the agent at `connect()` (`connect4/6` call [`udp`]);
//! - an unconnected socket is sent there per datagram, at `sendto()`/`sendmsg()`/`sendmmsg()`
//!   (`sendmsg4/6`, which the kernel runs for every datagram that names its destination);
//! - both remember the server the application named, per socket, in `DNS_ORIG`; `recvmsg4/6`
//!   rewrite the source of a datagram from the agent back to it, so resolvers that check the
//!   reply's source (glibc, musl, dig) accept it; `getpeername` shows it too.

use aya_ebpf::{
    helpers::{
        bpf_get_current_uid_gid,
        generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use redirect_common::{OrigDst, PodConfig, AF_INET, AGENT_DNS_PORT, POD_FLAG_DNS_CAPTURE};

use redirect_ebpf::{
    addr::{
        ctx_addr6, ctx_write_addr6, is_loopback6, is_v4_mapped, Endpoint, LOCALHOST4_BE,
        LOOPBACK6_LAST_BE, V4_MAPPED_WORD_BE,
    },
    counters::count,
    maps::{DNS_ORIG, MESH_PODS},
    policy::dns_udp,
};

/// Verdict of sendmsg/recvmsg programs: let the call proceed.
const ALLOW: i32 = 1;

/// For a UDP `connect()` or addressed send to `dst`: should it go to the agent instead? If
/// so, `dst` is recorded for the socket first (if it cannot be, the query goes where it was
/// sent: DNS keeps working, uncaptured).
#[inline(always)]
pub fn udp(ctx: &SockAddrContext, dst: &Endpoint) -> bool {
    // SAFETY: helper valid for sock_addr programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: plain-data value, copied out at once.
    let pod: PodConfig = match unsafe { MESH_PODS.get(netns_cookie) } {
        Some(pod) if pod.flags & POD_FLAG_DNS_CAPTURE != 0 => *pod,
        _ => return false,
    };
    let uid_gid = bpf_get_current_uid_gid();
    let gid = (uid_gid >> 32) as u32;
    let is_proxy = uid_gid as u32 == pod.proxy_uid || gid == pod.proxy_gid;
    if !dns_udp(&pod, dst, is_proxy, gid) {
        return false;
    }
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if DNS_ORIG
        .insert(cookie, dst.orig_dst(pod.pod_id, netns_cookie), 0)
        .is_err()
    {
        return false;
    }
    count(pod.pod_id, |c| c.outbound_captured += 1);
    true
}

/// The server the application asked, if this socket's DNS went to the agent.
#[inline(always)]
pub fn asked(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain-data value, copied out at once.
    unsafe { DNS_ORIG.get(cookie) }.copied()
}

/// Writes the agent's IPv4 address and port as the destination.
#[inline(always)]
pub fn to_agent4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: connect4 and sendmsg4 may write the destination.
    unsafe {
        (*sa).user_ip4 = LOCALHOST4_BE;
        (*sa).user_port = u32::from(AGENT_DNS_PORT.to_be());
    }
}

/// Writes the agent's address (`::1`, or `::ffff:127.0.0.1` for an IPv4 destination on a
/// dual-stack socket) and port as the destination.
#[inline(always)]
pub fn to_agent6(ctx: &SockAddrContext, mapped: bool) {
    let agent = if mapped {
        [0, 0, V4_MAPPED_WORD_BE, LOCALHOST4_BE]
    } else {
        [0, 0, 0, LOOPBACK6_LAST_BE]
    };
    let sa = ctx.sock_addr;
    // SAFETY: connect6 and sendmsg6 may write the destination, one word at a time.
    unsafe {
        ctx_write_addr6(&raw mut (*sa).user_ip6, agent);
        (*sa).user_port = u32::from(AGENT_DNS_PORT.to_be());
    }
}

/// DNS capture for IPv4 datagrams that name their destination. Minimum kernel: 5.7.
#[cgroup_sock_addr(sendmsg4)]
pub fn rd_sendmsg4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: ctx fields the verifier allows a sendmsg4 program to read.
    let (ip_be, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    if udp(&ctx, &Endpoint::v4(ip_be, port as u16)) {
        to_agent4(&ctx);
    }
    ALLOW
}

/// DNS capture for IPv6 datagrams (IPv4-mapped destinations too). Minimum kernel: 5.7.
#[cgroup_sock_addr(sendmsg6)]
pub fn rd_sendmsg6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: ctx fields the verifier allows a sendmsg6 program to read, a word at a time.
    let (port, addr) = unsafe { ((*sa).user_port, ctx_addr6(&raw const (*sa).user_ip6)) };
    let mapped = is_v4_mapped(&addr);
    let dst = if mapped {
        Endpoint::v4(addr[3], port as u16)
    } else {
        Endpoint::v6(addr, port as u16)
    };
    if udp(&ctx, &dst) {
        to_agent6(&ctx, mapped);
    }
    ALLOW
}

/// A datagram from the agent to a socket whose DNS went there shows the server the
/// application asked as its source (IPv4). Minimum kernel: 5.2.
#[cgroup_sock_addr(recvmsg4)]
pub fn rd_recvmsg4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: ctx fields the verifier allows a recvmsg4 program to read.
    let (ip_be, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    if ip_be != LOCALHOST4_BE || port as u16 != AGENT_DNS_PORT.to_be() {
        return ALLOW;
    }
    if let Some(orig) = asked(&ctx).filter(|o| o.family == AF_INET) {
        // SAFETY: recvmsg4 may write the source address.
        unsafe {
            (*sa).user_ip4 = orig.addr_be[0];
            (*sa).user_port = u32::from(orig.port_be);
        }
    }
    ALLOW
}

/// [`rd_recvmsg4`] for IPv6 sockets (the agent as `::1`, or `::ffff:127.0.0.1` on a
/// dual-stack socket). Minimum kernel: 5.2.
#[cgroup_sock_addr(recvmsg6)]
pub fn rd_recvmsg6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: ctx fields the verifier allows a recvmsg6 program to read, a word at a time.
    let (port, addr) = unsafe { ((*sa).user_port, ctx_addr6(&raw const (*sa).user_ip6)) };
    let from_agent = port as u16 == AGENT_DNS_PORT.to_be()
        && (is_loopback6(&addr) || (is_v4_mapped(&addr) && addr[3] == LOCALHOST4_BE));
    if !from_agent {
        return ALLOW;
    }
    if let Some(orig) = asked(&ctx) {
        let a = if orig.family == AF_INET {
            [0, 0, V4_MAPPED_WORD_BE, orig.addr_be[0]]
        } else {
            orig.addr_be
        };
        // SAFETY: recvmsg6 may write the source address, one word at a time.
        unsafe {
            ctx_write_addr6(&raw mut (*sa).user_ip6, a);
            (*sa).user_port = u32::from(orig.port_be);
        }
    }
    ALLOW
}
