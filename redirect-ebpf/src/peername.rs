//! `cgroup/getpeername4` and `getpeername6`: a captured application sees its original
//! destination as its peer, never the proxy's (or the DNS agent's) loopback port.

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
    EbpfContext,
};
use redirect_common::{OrigDst, AF_INET};

use redirect_ebpf::{
    addr::{ctx_write_addr6, V4_MAPPED_WORD_BE},
    maps::{DNS_ASKED, ORIG_BY_COOKIE},
};

/// getpeername hooks cannot refuse; 1 lets the (possibly rewritten) address through.
const PASS: i32 = 1;

#[inline(always)]
fn original(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain-data values, copied out at once. A connected UDP socket whose DNS went
    // to the agent is in DNS_ASKED.
    unsafe { ORIG_BY_COOKIE.get(cookie).or_else(|| DNS_ASKED.get(cookie)) }.copied()
}

/// Peer of a captured IPv4 socket. Minimum kernel: 5.8.
#[cgroup_sock_addr(getpeername4)]
pub fn rd_peername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original(&ctx) {
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
    if let Some(orig) = original(&ctx) {
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
