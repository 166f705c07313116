//! `sk_msg`: same-node acceleration. Attached to `SOCK_PAIRS`, it runs for every send on a
//! socket in that map and moves the data straight into the peer socket's receive queue
//! (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`), skipping the TCP/IP stack and loopback.
//!
//! Order is everything: if a socket's first send finds no peer (the peer was not in the map
//! yet) that data travels the normal path, and a later redirected send could be read before
//! it. Such a socket is marked in `ACCEL_FALLBACK` and stays on the normal path for good.

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS},
    helpers::generated::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
    EbpfContext,
};
use redirect_common::SockKey;
use redirect_ebpf::{
    addr::{ctx_addr6, peer_key, sock_key, RawEnds},
    counters::count,
    maps::{ACCEL_FALLBACK, MESH_PODS, SOCK_PAIRS},
};

/// Redirects each message to the peer socket's ingress. Minimum kernel: 5.15 (netns cookie in
/// sk_msg programs).
#[sk_msg]
pub fn rd_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: helper valid for sk_msg programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = own_key(&ctx, netns_cookie);
    if ACCEL_FALLBACK.get_ptr(key).is_some() {
        return SK_PASS;
    }
    let size = ctx.size();
    if SOCK_PAIRS.redirect_msg(&ctx, peer_key(&key), BPF_F_INGRESS as u64) != SK_PASS as i64 {
        // No peer: this and every later send of the socket take the normal path.
        let _ = ACCEL_FALLBACK.insert(key, 1, 0);
        return SK_PASS;
    }
    // SAFETY: plain-data value, copied out at once.
    if let Some(pod) = unsafe { MESH_PODS.get(netns_cookie) } {
        count(pod.pod_id, |c| {
            c.accel_msgs += 1;
            c.accel_bytes += u64::from(size);
        });
    }
    SK_PASS
}

#[inline(always)]
fn own_key(ctx: &SkMsgContext, netns_cookie: u64) -> SockKey {
    let m = ctx.msg;
    // SAFETY: sk_msg context fields, read one word at a time.
    unsafe {
        sock_key(
            netns_cookie,
            &RawEnds {
                family: (*m).family,
                local: ctx_addr6(&raw const (*m).local_ip6),
                remote: ctx_addr6(&raw const (*m).remote_ip6),
                local_ip4: (*m).local_ip4,
                remote_ip4: (*m).remote_ip4,
                local_port_be: ((*m).local_port as u16).to_be(),
                remote_port_be: ((*m).remote_port >> 16) as u16,
            },
        )
    }
}
