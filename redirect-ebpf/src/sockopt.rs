//! `cgroup/getsockopt`: answers `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` on the proxy's
//! accepted sockets from `ORIG_BY_TUPLE`, as conntrack would under iptables.
//!
//! This program runs for every `getsockopt` of every process under the cgroup: anything that
//! is not `SOL_IP`/`SOL_IPV6` + optname 80 returns at once, with `optlen` untouched.

use aya_ebpf::{
    helpers::generated::bpf_get_netns_cookie, macros::cgroup_sockopt, programs::SockoptContext,
    EbpfContext,
};
use redirect_common::{OrigDst, TupleKey, AF_INET, AF_INET6, SOL_IP, SOL_IPV6, SO_ORIGINAL_DST};

use redirect_ebpf::{
    addr::{ctx_addr6, is_v4_mapped},
    counters::count,
    maps::{MESH_PODS, ORIG_BY_TUPLE},
};

/// Verdict: let the (possibly rewritten) result through.
const PASS: i32 = 1;
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

/// Original destination for the proxy. Minimum kernel: 5.15 (netns cookie in sockopt).
#[cgroup_sockopt(getsockopt)]
pub fn rd_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: fields a getsockopt program may read.
    let (level, optname) = unsafe { ((*so).level, (*so).optname) };
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return PASS;
    }
    // SAFETY: helper valid for sockopt programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(key) = server_key(&ctx, netns_cookie) else {
        return PASS;
    };
    // SAFETY: plain-data value, copied out at once.
    let orig = match unsafe { ORIG_BY_TUPLE.get(&key) } {
        Some(o) => *o,
        // Not one of ours, and conntrack answered: a NAT (Istio's own REDIRECT, installed
        // beside us by mistake) knows the destination better than the socket's address.
        // SAFETY: retval is readable in getsockopt programs.
        None if unsafe { (*so).retval } == 0 => return PASS,
        None => match untranslated(&key) {
            Some(o) => o,
            None => return PASS,
        },
    };
    // SAFETY: optval/optval_end are the kernel's buffer bounds; every write is checked against
    // them first, as the verifier requires.
    unsafe {
        let start = (*so).__bindgen_anon_2.optval as *mut u8;
        let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        if orig.family == AF_INET {
            if start.add(SOCKADDR_IN_LEN) > end {
                return PASS;
            }
            (start as *mut u16).write(AF_INET);
            (start.add(2) as *mut u16).write(orig.port_be);
            (start.add(4) as *mut u32).write(orig.addr_be[0]);
            (start.add(8) as *mut u64).write(0);
            (*so).optlen = SOCKADDR_IN_LEN as i32;
        } else {
            if start.add(SOCKADDR_IN6_LEN) > end {
                return PASS;
            }
            (start as *mut u16).write(AF_INET6);
            (start.add(2) as *mut u16).write(orig.port_be);
            (start.add(4) as *mut u32).write(0);
            (start.add(8) as *mut u32).write(orig.addr_be[0]);
            (start.add(12) as *mut u32).write(orig.addr_be[1]);
            (start.add(16) as *mut u32).write(orig.addr_be[2]);
            (start.add(20) as *mut u32).write(orig.addr_be[3]);
            (start.add(24) as *mut u32).write(0);
            (*so).optlen = SOCKADDR_IN6_LEN as i32;
        }
        (*so).retval = 0;
    }
    count(orig.pod_id, |c| c.orig_dst_answered += 1);
    PASS
}

/// A mesh pod's connection we did not redirect at `connect()` (e.g. one that `sk_lookup`
/// steered inbound, whose local address is already the original destination): conntrack
/// would answer with its own destination, so do we. Never for the proxy's outbound listener,
/// whose real destination we must know or the proxy would connect to itself.
#[inline(always)]
fn untranslated(key: &TupleKey) -> Option<OrigDst> {
    // SAFETY: plain-data value, copied out at once.
    let pod = unsafe { MESH_PODS.get(&key.netns_cookie) }.copied()?;
    if u16::from_be(key.server_port_be) == pod.outbound_port {
        // A connection to the proxy's outbound port we hold no destination for.
        count(pod.pod_id, |c| c.orig_dst_missed += 1);
        return None;
    }
    Some(OrigDst {
        addr_be: key.server_addr_be,
        port_be: key.server_port_be,
        family: key.family as u16,
        pod_id: pod.pod_id,
        netns_cookie: key.netns_cookie,
    })
}

/// The [`TupleKey`] of an accepted socket: its peer is the client, its local end the server.
#[inline(always)]
fn server_key(ctx: &SockoptContext, netns_cookie: u64) -> Option<TupleKey> {
    // SAFETY: the socket of a sockopt program is a full socket the verifier lets us read.
    unsafe {
        let sk = (*ctx.sockopt).__bindgen_anon_1.sk;
        if sk.is_null() {
            return None;
        }
        let mut key = TupleKey {
            netns_cookie,
            client_addr_be: [(*sk).dst_ip4, 0, 0, 0],
            server_addr_be: [(*sk).src_ip4, 0, 0, 0],
            client_port_be: (*sk).dst_port,
            server_port_be: ((*sk).src_port as u16).to_be(),
            family: AF_INET as u32,
        };
        if (*sk).family == AF_INET6 as u32 {
            let client = ctx_addr6(&raw const (*sk).dst_ip6);
            if !is_v4_mapped(&client) {
                key.client_addr_be = client;
                key.server_addr_be = ctx_addr6(&raw const (*sk).src_ip6);
                key.family = AF_INET6 as u32;
            }
        }
        Some(key)
    }
}
