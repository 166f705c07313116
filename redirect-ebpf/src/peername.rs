//! `cgroup/getpeername4` and `getpeername6`: a captured application sees its original
//! destination as its peer, never the proxy's (or the DNS agent's) loopback port.
//!
//! An MPTCP socket is captured on its first subflow (a TCP socket of its own, whose cookie
//! `connect4/6` saw), while the application asks its MPTCP socket, whose cookie differs: for
//! it the original destination is found by the connection's 4-tuple (`ORIG_BY_TUPLE`, written
//! by `sockops` on the subflow once established), which the MPTCP socket shares with its
//! first subflow. A 4-tuple is unique in its network namespace, so no other socket's entry
//! can be found this way.

use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use redirect_common::{OrigDst, TupleKey, AF_INET, AF_INET6};

use redirect_ebpf::{
    addr::{ctx_addr6, ctx_write_addr6, is_v4_mapped, V4_MAPPED_WORD_BE},
    maps::{orig_dst_of, ContextSock, DNS_ASKED, ORIG_BY_TUPLE},
};

/// getpeername hooks cannot refuse; 1 lets the (possibly rewritten) address through.
const PASS: i32 = 1;
const IPPROTO_MPTCP: u32 = 262;

/// The original destination of the socket, if it was captured. `v6`: called from
/// `getpeername6` (each hook may read only its own family's address fields).
#[inline(always)]
fn original(ctx: &SockAddrContext, v6: bool) -> Option<OrigDst> {
    // A connected UDP socket whose DNS went to the agent is in DNS_ASKED, by its cookie.
    let found = orig_dst_of(ContextSock::of_sock_addr(ctx)).or_else(|| {
        // SAFETY: helper valid for sock_addr programs.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: plain-data value, copied out at once.
        unsafe { DNS_ASKED.get(&cookie) }.copied()
    });
    // SAFETY: a field every sock_addr program may read.
    if found.is_some() || unsafe { (*ctx.sock_addr).protocol } != IPPROTO_MPTCP {
        return found;
    }
    let key = if v6 { mptcp_key6(ctx) } else { mptcp_key4(ctx) };
    // SAFETY: plain-data value, copied out at once.
    unsafe { ORIG_BY_TUPLE.get(&key) }.copied()
}

/// The [`TupleKey`] of an IPv4 MPTCP socket's connection: its own address and port as the
/// client, the peer the kernel is about to return (the proxy's listener) as the server, keyed
/// the way `sockops` keys the first subflow.
#[inline(always)]
fn mptcp_key4(ctx: &SockAddrContext) -> TupleKey {
    let sa = ctx.sock_addr;
    // SAFETY: helper valid for sock_addr programs; fields a getpeername4 program may read.
    unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        TupleKey {
            netns_cookie: bpf_get_netns_cookie(ctx.as_ptr()),
            client_addr_be: [(*sk).src_ip4, 0, 0, 0],
            server_addr_be: [(*sa).user_ip4, 0, 0, 0],
            client_port_be: ((*sk).src_port as u16).to_be(),
            server_port_be: (*sa).user_port as u16,
            family: AF_INET as u32,
        }
    }
}

/// As [`mptcp_key4`] for an IPv6 socket (an IPv4-mapped peer keyed as IPv4, as `sockops`
/// keys it).
#[inline(always)]
fn mptcp_key6(ctx: &SockAddrContext) -> TupleKey {
    let sa = ctx.sock_addr;
    // SAFETY: helper valid for sock_addr programs; fields a getpeername6 program may read,
    // one word at a time.
    unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        let server = ctx_addr6(&raw const (*sa).user_ip6);
        let client = ctx_addr6(&raw const (*sk).src_ip6);
        let mut key = TupleKey {
            netns_cookie: bpf_get_netns_cookie(ctx.as_ptr()),
            client_addr_be: client,
            server_addr_be: server,
            client_port_be: ((*sk).src_port as u16).to_be(),
            server_port_be: (*sa).user_port as u16,
            family: AF_INET6 as u32,
        };
        if is_v4_mapped(&server) {
            key.server_addr_be = [server[3], 0, 0, 0];
            key.client_addr_be = [client[3], 0, 0, 0];
            key.family = AF_INET as u32;
        }
        key
    }
}

/// Peer of a captured IPv4 socket. Minimum kernel: 5.8.
#[cgroup_sock_addr(getpeername4)]
pub fn rd_peername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original(&ctx, false) {
        if orig.family == AF_INET {
            let sa = ctx.sock_addr;
            // SAFETY: getpeername4 may write the address.
            unsafe {
                (*sa).user_ip4 = orig.addr_be[0];
                (*sa).user_port = orig.port_be as u32;
            }
        }
    }
    PASS
}

/// Peer of a captured IPv6 socket (IPv4 destinations shown v4-mapped). Minimum kernel: 5.8.
#[cgroup_sock_addr(getpeername6)]
pub fn rd_peername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original(&ctx, true) {
        let a = if orig.family == AF_INET {
            [0, 0, V4_MAPPED_WORD_BE, orig.addr_be[0]]
        } else {
            orig.addr_be
        };
        let sa = ctx.sock_addr;
        // SAFETY: getpeername6 may write the address, one word at a time.
        unsafe {
            ctx_write_addr6(&raw mut (*sa).user_ip6, a);
            (*sa).user_port = orig.port_be as u32;
        }
    }
    PASS
}
