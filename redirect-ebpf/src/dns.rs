//! DNS capture over UDP (Istio's `ISTIO_META_DNS_CAPTURE`): a mesh pod's DNS queries to port
//! 53, from any process but the proxy, go to the agent's DNS proxy on 127.0.0.1:15053
//! (`[::1]:15053`), and its replies look as if they came from the server the application
//! asked. TCP DNS is decided with the other TCP rules at `connect()` (`connect.rs`).
//!
//! - a connected socket is sent to the agent at `connect()` (`connect4/6` call [`udp`]);
//! - an unconnected socket is sent there per datagram, at `sendto()`/`sendmsg()`/`sendmmsg()`
//!   (`sendmsg4/6`, which the kernel runs for every datagram that names its destination);
//! - both remember the server the application named, per socket, in `DNS_ASKED`;
//!   `recvmsg4/6` rewrite the source of a datagram from the agent back to it, so resolvers
//!   that check the reply's source (glibc, musl, dig) accept it; `getpeername` shows it too;
//! - `sock_release` deletes a socket's entry when it closes. Each pod holds at most
//!   `MAX_DNS_SOCKETS_PER_POD` entries (open sockets): past it, or with the map full, its
//!   query is refused (`EPERM`), never sent around the agent, and no other pod's entry is
//!   ever evicted (the map is no LRU).

use core::intrinsics::AtomicOrdering;

use aya_ebpf::{
    helpers::{
        bpf_get_current_uid_gid,
        generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    },
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use redirect_common::{
    OrigDst, PodConfig, AF_INET, AGENT_DNS_PORT, MAX_DNS_SOCKETS_PER_POD, POD_FLAG_DNS_CAPTURE,
};

use redirect_ebpf::{
    addr::{
        ctx_addr6, ctx_write_addr6, is_loopback6, is_v4_mapped, Endpoint, LOCALHOST4_BE,
        LOOPBACK6_LAST_BE, V4_MAPPED_WORD_BE,
    },
    counters::count,
    maps::{Maps, DNS_ASKED, DNS_SOCKETS, MESH_PODS},
    policy::dns_udp,
};

/// Verdict of sendmsg/recvmsg programs: let the call proceed.
const ALLOW: i32 = 1;
/// Verdict: the call fails with `EPERM`.
const REFUSE: i32 = 0;

/// What becomes of a UDP `connect()` or addressed send.
pub enum Udp {
    /// Not DNS to capture: as the application asked.
    Leave,
    /// Sent to the agent (the server asked is recorded).
    ToAgent,
    /// DNS to capture, but the pod holds its limit of open DNS sockets (or the map is full):
    /// refused (`EPERM`) rather than sent around the agent.
    Refuse,
}

/// For a UDP `connect()` or addressed send to `dst`: should it go to the agent instead? If
/// so, `dst` is recorded for the socket first.
#[inline(always)]
pub fn udp(ctx: &SockAddrContext, dst: &Endpoint) -> Udp {
    // SAFETY: helper valid for sock_addr programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: plain-data value, copied out at once.
    let pod: PodConfig = match unsafe { MESH_PODS.get(&netns_cookie) } {
        Some(pod) if pod.flags & POD_FLAG_DNS_CAPTURE != 0 => *pod,
        _ => return Udp::Leave,
    };
    let uid_gid = bpf_get_current_uid_gid();
    let gid = (uid_gid >> 32) as u32;
    let is_proxy = uid_gid as u32 == pod.proxy_uid || gid == pod.proxy_gid;
    if !dns_udp(Maps, &pod, dst, is_proxy, gid) {
        return Udp::Leave;
    }
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = dst.orig_dst(pod.pod_id, netns_cookie);
    // SAFETY: plain-data value, only tested for presence.
    let known = unsafe { DNS_ASKED.get(&cookie) }.is_some();
    let recorded = if known {
        DNS_ASKED.insert(&cookie, &orig, BPF_EXIST).is_ok()
    } else {
        record_new(cookie, &orig)
    };
    if !recorded {
        count(pod.pod_id, |c| c.outbound_fail_closed += 1);
        return Udp::Refuse;
    }
    count(pod.pod_id, |c| c.outbound_captured += 1);
    Udp::ToAgent
}

const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// Records a socket's first DNS server, within its pod's share of the map.
#[inline(always)]
fn record_new(cookie: u64, orig: &OrigDst) -> bool {
    let Some(n) = DNS_SOCKETS.get_ptr_mut(orig.pod_id) else {
        return false;
    };
    // SAFETY: a slot of an array map; a racing update only makes the bound approximate.
    if unsafe { *n } >= u64::from(MAX_DNS_SOCKETS_PER_POD) {
        return false;
    }
    if DNS_ASKED.insert(&cookie, orig, BPF_NOEXIST).is_err() {
        return false;
    }
    // SAFETY: the slot pointer from above.
    unsafe { atomic_add(n, 1) };
    true
}

/// Forgets a closing UDP socket's DNS server and gives its pod the room back. Runs for every
/// IPv4/IPv6 socket released under the cgroup; anything but UDP returns at once. Minimum
/// kernel: 5.9 (`cgroup/sock_release`).
#[cgroup_sock(sock_release)]
pub fn rd_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: a field a sock_release program may read.
    if unsafe { (*ctx.sock).protocol } != IPPROTO_UDP {
        return ALLOW;
    }
    // SAFETY: helper valid for cgroup_sock programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain-data value, copied out at once.
    let Some(orig) = (unsafe { DNS_ASKED.get(&cookie) }).copied() else {
        return ALLOW;
    };
    if DNS_ASKED.remove(&cookie).is_ok() {
        if let Some(n) = DNS_SOCKETS.get_ptr_mut(orig.pod_id) {
            // SAFETY: a slot of an array map.
            unsafe { atomic_add(n, u64::MAX) };
        }
    }
    ALLOW
}

const IPPROTO_UDP: u32 = 17;

/// Adds `v` (wrapping: `u64::MAX` takes one) to `*n` atomically, the result unused, so it is
/// the BPF `lock add` every kernel has. The BPF target's `core` offers no atomic
/// read-modify-write methods, only the intrinsic.
///
/// # Safety
/// `n` must point to a live map value.
#[inline(always)]
unsafe fn atomic_add(n: *mut u64, v: u64) {
    // SAFETY: as the caller promises.
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, v) };
}

/// The server the application asked, if this socket's DNS went to the agent.
#[inline(always)]
pub fn asked(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain-data value, copied out at once.
    unsafe { DNS_ASKED.get(&cookie) }.copied()
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
    match udp(&ctx, &Endpoint::v4(ip_be, port as u16)) {
        Udp::Leave => ALLOW,
        Udp::ToAgent => {
            to_agent4(&ctx);
            ALLOW
        }
        Udp::Refuse => REFUSE,
    }
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
    match udp(&ctx, &dst) {
        Udp::Leave => ALLOW,
        Udp::ToAgent => {
            to_agent6(&ctx, mapped);
            ALLOW
        }
        Udp::Refuse => REFUSE,
    }
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
