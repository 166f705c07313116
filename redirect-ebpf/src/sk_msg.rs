//! `sk_msg`: same-node acceleration. Attached to `SOCK_PAIRS`, it runs for every send on a
//! socket in that map and moves the data straight into the peer socket's receive queue
//! (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`), skipping the TCP/IP stack and loopback.
//!
//! Order is everything: if a socket's first send finds no peer (the peer was not in the map
//! yet) that data travels the normal path, and a later redirected send could be read before
//! it. Such a socket is marked in `ACCEL_FALLBACK` and stays on the normal path for good.
//!
//! A socket with an upper-layer protocol is never spliced. The kernel refuses to put one in a
//! sockmap (MPTCP's subflows, kTLS set before), but kTLS set on a socket *already* spliced is
//! allowed, and its sends reach this program before encryption: redirected, the peer would
//! read the plaintext. So every send first looks at the sender's `icsk_ulp_ops` (its offset
//! given by the daemon from the kernel's BTF); a socket with one falls back for good.

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS},
    helpers::generated::{bpf_get_netns_cookie, bpf_probe_read_kernel, bpf_skc_to_tcp_sock},
    macros::sk_msg,
    programs::SkMsgContext,
    EbpfContext,
};
use redirect_common::SockKey;
use redirect_ebpf::{
    addr::{ctx_addr6, peer_key, sock_key, RawEnds},
    counters::count,
    global::Global,
    maps::{ACCEL_FALLBACK, MESH_PODS, SOCK_PAIRS},
};

/// The byte offset of `icsk_ulp_ops` in the kernel's `struct inet_connection_sock` (the
/// start of a TCP socket), set by the daemon at load from the kernel's BTF. 0: unknown, and
/// then nothing is redirected (the daemon does not turn acceleration on without it).
#[unsafe(no_mangle)]
static ULP_OPS_OFFSET: Global<u32> = Global::new(0);

/// Redirects each message to the peer socket's ingress. Minimum kernel: 5.15 (netns cookie in
/// sk_msg programs).
#[sk_msg]
pub fn rd_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: helper valid for sk_msg programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = own_key(&ctx, netns_cookie);
    if ACCEL_FALLBACK.get_ptr(&key).is_some() {
        return SK_PASS;
    }
    if !ulp_free(&ctx) {
        // kTLS set after the splice (or a layout we cannot read): the normal path, for good.
        let _ = ACCEL_FALLBACK.insert(&key, &1, 0);
        return SK_PASS;
    }
    let size = ctx.size();
    if SOCK_PAIRS.redirect_msg(&ctx, &mut peer_key(&key), BPF_F_INGRESS as u64) != SK_PASS as i64 {
        // No peer: this and every later send of the socket take the normal path.
        let _ = ACCEL_FALLBACK.insert(&key, &1, 0);
        return SK_PASS;
    }
    // SAFETY: plain-data value, copied out at once.
    if let Some(pod) = unsafe { MESH_PODS.get(&netns_cookie) } {
        count(pod.pod_id, |c| {
            c.accel_msgs += 1;
            c.accel_bytes += u64::from(size);
        });
    }
    SK_PASS
}

/// Whether the sending socket is known to have no upper-layer protocol (kTLS).
#[inline(always)]
fn ulp_free(ctx: &SkMsgContext) -> bool {
    let offset = ULP_OPS_OFFSET.load();
    if offset == 0 {
        return false;
    }
    // SAFETY: sk_msg context field; the helper checks the socket's type (NULL if not TCP).
    let tcp = unsafe { bpf_skc_to_tcp_sock((*ctx.msg).__bindgen_anon_3.sk.cast()) };
    if tcp.is_null() {
        return false;
    }
    let mut ulp_ops: u64 = 0;
    // SAFETY: a probed read of one pointer inside the socket the helper returned.
    let read = unsafe {
        bpf_probe_read_kernel(
            (&raw mut ulp_ops).cast(),
            8,
            tcp.cast::<u8>().add(offset as usize).cast(),
        )
    };
    read == 0 && ulp_ops == 0
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
