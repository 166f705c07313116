//! `sockops`: follows captured client sockets through their life.
//!
//! - at `connect()` time (`TCP_CONNECT_CB`), a captured socket asks for state callbacks, so
//!   that its entries are removed however it ends (even if the handshake fails);
//! - when established (`ACTIVE_ESTABLISHED_CB`), the original destination in the socket's
//!   storage (`ORIG_BY_SOCK`) is re-keyed by the connection's 4-tuple (`ORIG_BY_TUPLE`),
//!   where `getsockopt` on the proxy's accepted socket finds it;
//! - when it closes (`STATE_CB` to `TCP_CLOSE`), both entries go (a 4-tuple entry already
//!   gone was evicted from the full LRU map while the connection lived, and is counted).
//!
//! In a TPROXY pod, the proxy's original-source sockets (marked 1337) are recorded at
//! `TCP_CONNECT_CB` in `TPROXY_ORIGINS` until they close, so `sk_lookup` lets their SYN reach
//! the application.
//!
//! For acceleration, an established socket of a mesh pod whose peer is on this node (loopback,
//! the passthrough source, or another mesh pod's address) goes into `SOCK_PAIRS`, where
//! `sk_msg` finds it as the peer of the other end.
//!
//! It also registers the proxy's listeners: a socket that starts listening (`TCP_LISTEN_CB`)
//! on its pod's inbound or outbound port (`MESH_PODS`; the node's ports, `--inbound-port` and
//! `--outbound-port`, for a namespace not known yet) goes into `LISTENERS` under its netns
//! cookie, where `sk_lookup` finds it. A restarted proxy is registered again by its own
//! `listen()`.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext,
};
use redirect_common::{
    ListenerKey, NodeAddrKey, OrigDst, SockKey, TupleKey, AF_INET, AF_INET6, POD_FLAG_NO_ACCEL,
    POD_FLAG_TPROXY, TPROXY_MARK,
};

use redirect_ebpf::{
    addr::{ctx_addr6, is_v4_mapped, peer_key, sock_key, Endpoint, RawEnds},
    counters::count,
    global::Global,
    maps::{
        forget_orig_dst, orig_dst_of, ContextSock, ACCEL_FALLBACK, LISTENERS, MESH_PODS,
        NODE_ADDRS, ORIG_BY_TUPLE, PROXY_SOCKS, SOCK_PAIRS, STEERED, TPROXY_ORIGINS,
    },
};

/// Same-node acceleration on (1) or off (0, `--no-accel`), set by the daemon at load.
#[unsafe(no_mangle)]
static ACCEL_ENABLED: Global<u32> = Global::new(1);

/// The node's proxy inbound listener port (host order), set by the daemon at load
/// (`--inbound-port`): used for a namespace whose pod is not in `MESH_PODS` yet.
#[unsafe(no_mangle)]
static INBOUND_PORT: Global<u32> = Global::new(15006);

/// The node's proxy outbound listener port (host order), set by the daemon at load
/// (`--outbound-port`): likewise.
#[unsafe(no_mangle)]
static OUTBOUND_PORT: Global<u32> = Global::new(15001);

/// Socket lifecycle hook, attached at the cgroup. Minimum kernel: 5.15.
#[sock_ops]
pub fn rd_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            on_active_established(&ctx);
            accelerate(&ctx, true);
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => accelerate(&ctx, false),
        BPF_SOCK_OPS_STATE_CB => on_state_change(&ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx),
        _ => {}
    }
    0
}

#[inline(always)]
fn captured(ctx: &SockOpsContext) -> Option<OrigDst> {
    orig_dst_of(ContextSock::of_sock_ops(ctx)?)
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    if captured(ctx).is_some() || tproxy_origin(ctx) {
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

/// In a TPROXY pod, records a socket marked 1337 (the proxy's original-source connection to
/// its application) in `TPROXY_ORIGINS`, under the key its peer will have, as its SYN leaves.
#[inline(always)]
fn tproxy_origin(ctx: &SockOpsContext) -> bool {
    // SAFETY: the context's socket pointer, which the verifier makes us check for null.
    let mark = unsafe {
        let sk = (*ctx.ops).__bindgen_anon_2.sk;
        if sk.is_null() {
            return false;
        }
        (*sk).mark
    };
    if mark != TPROXY_MARK {
        return false;
    }
    // SAFETY: helper valid for sock_ops programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: plain-data value, read at once.
    let tproxy =
        unsafe { MESH_PODS.get(&netns_cookie) }.is_some_and(|pod| pod.flags & POD_FLAG_TPROXY != 0);
    tproxy
        && TPROXY_ORIGINS
            .insert(&origin_key(ctx, netns_cookie), &1, 0)
            .is_ok()
}

/// The [`TPROXY_ORIGINS`] key of an original-source socket: its peer's [`SockKey`], with the
/// pod's netns cookie whatever the addresses.
#[inline(always)]
fn origin_key(ctx: &SockOpsContext, netns_cookie: u64) -> SockKey {
    SockKey {
        netns_cookie,
        ..peer_key(&own_key(ctx, netns_cookie))
    }
}

#[inline(always)]
fn on_active_established(ctx: &SockOpsContext) {
    if let Some(orig) = captured(ctx) {
        let key = client_key(ctx, orig.netns_cookie);
        if ORIG_BY_TUPLE.insert(&key, &orig, 0).is_ok() {
            // A lookup marks the new entry referenced: when the map is full, the kernel's
            // LRU evicts unreferenced entries first, which would otherwise be the newest
            // ones, before their proxy asked for them.
            // SAFETY: the value is not used.
            let _ = unsafe { ORIG_BY_TUPLE.get(&key) };
        }
    }
}

/// At close, forgets the socket's entries. A captured application socket (one connected to
/// its pod's outbound port: only captured sockets and proxy sockets ask for this callback,
/// and a proxy never connects to that port) whose `ORIG_BY_TUPLE` entry is already gone lost
/// it to LRU eviction while it was open: counted as `orig_dst_evicted` (its own storage,
/// `ORIG_BY_SOCK`, cannot be evicted).
#[inline(always)]
fn on_state_change(ctx: &SockOpsContext) {
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return;
    }
    // SAFETY: helper valid for sock_ops programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let _ = ACCEL_FALLBACK.remove(&own_key(ctx, netns_cookie));
    let _ = TPROXY_ORIGINS.remove(&origin_key(ctx, netns_cookie));
    // SAFETY: plain-data value, copied out at once.
    let Some(pod) = (unsafe { MESH_PODS.get(&netns_cookie) }).copied() else {
        return;
    };
    let remote_port = u16::from_be((ctx.remote_port() >> 16) as u16);
    if remote_port != pod.outbound_port {
        return;
    }
    let had_orig = ContextSock::of_sock_ops(ctx).is_some_and(forget_orig_dst);
    let had_tuple = ORIG_BY_TUPLE.remove(&client_key(ctx, netns_cookie)).is_ok();
    // The tuple entry exists from the handshake on; one closed from SYN_SENT never had it.
    let established = ctx.arg(0) != BPF_TCP_SYN_SENT;
    if !had_orig || (established && !had_tuple) {
        count(pod.pod_id, |c| c.orig_dst_evicted += 1);
    }
}

/// Puts an established socket into `SOCK_PAIRS` when it is a proxy's socket (one the proxy
/// connected, or one `sk_lookup` steered to its inbound listener), its peer is another mesh
/// pod on this node, and acceleration is on for the node and the pod. Application sockets are
/// never put in the map: a socket in a sockmap reads through `tcp_bpf_recvmsg`, which returns
/// `EAGAIN` to a *blocking* reader on a spurious wakeup or at a FIN (seen on 6.18), and
/// applications may block; proxies (Envoy) use non-blocking sockets.
#[inline(always)]
fn accelerate(ctx: &SockOpsContext, active: bool) {
    if ACCEL_ENABLED.load() == 0 {
        return;
    }
    // SAFETY: helper valid for sock_ops programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = own_key(ctx, netns_cookie);
    let proxy_owned = if active {
        // SAFETY: helper valid for sock_ops programs.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let owned = PROXY_SOCKS.get_ptr(&cookie).is_some();
        let _ = PROXY_SOCKS.remove(&cookie);
        owned
    } else {
        let owned = STEERED.get_ptr(&key).is_some();
        let _ = STEERED.remove(&key);
        owned
    };
    if !proxy_owned || key.netns_cookie != 0 {
        // Not the proxy's, or a connection inside the pod (to or from an application).
        return;
    }
    // SAFETY: plain-data value, copied out at once.
    let Some(pod) = (unsafe { MESH_PODS.get(&netns_cookie) }).copied() else {
        return;
    };
    if pod.flags & POD_FLAG_NO_ACCEL != 0 {
        return;
    }
    let mut key = own_key(ctx, netns_cookie);
    let remote = Endpoint {
        addr_be: key.remote_addr_be,
        port_be: 0,
        family: key.family as u16,
    };
    let peer_local = key.netns_cookie != 0
        || NODE_ADDRS
            .get_ptr(&NodeAddrKey {
                addr_be: remote.addr16(),
            })
            .is_some();
    if !peer_local {
        return;
    }
    // SAFETY: the context is this socket's sock_ops, as the helper requires.
    let ops = unsafe { &mut *ctx.ops };
    if SOCK_PAIRS.update(&mut key, ops, 0).is_ok() {
        // Ask for the close callback, which forgets the socket's fallback mark.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

/// This socket's [`SockKey`].
#[inline(always)]
fn own_key(ctx: &SockOpsContext, netns_cookie: u64) -> SockKey {
    let ops = ctx.ops;
    // SAFETY: sock_ops context fields, read one word at a time.
    unsafe {
        sock_key(
            netns_cookie,
            &RawEnds {
                family: (*ops).family,
                local: ctx_addr6(&raw const (*ops).local_ip6),
                remote: ctx_addr6(&raw const (*ops).remote_ip6),
                local_ip4: (*ops).local_ip4,
                remote_ip4: (*ops).remote_ip4,
                local_port_be: ((*ops).local_port as u16).to_be(),
                remote_port_be: ((*ops).remote_port >> 16) as u16,
            },
        )
    }
}

#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let port = ctx.local_port();
    // SAFETY: helper valid for sock_ops programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // The pod's own proxy ports; the node's until the pod is known.
    // SAFETY: plain-data value, copied out at once.
    let (inbound, outbound) = match unsafe { MESH_PODS.get(&netns_cookie) } {
        Some(pod) => (u32::from(pod.inbound_port), u32::from(pod.outbound_port)),
        None => (INBOUND_PORT.load(), OUTBOUND_PORT.load()),
    };
    if port != inbound && port != outbound {
        return;
    }
    let mut key = ListenerKey {
        netns_cookie,
        family: ctx.family(),
        port,
    };
    // SAFETY: the context is the listening socket's sock_ops, as the helper requires.
    let _ = LISTENERS.update(&mut key, unsafe { &mut *ctx.ops }, 0);
}

/// The [`TupleKey`] of a client socket: local end is the client, remote end the server.
#[inline(always)]
fn client_key(ctx: &SockOpsContext, netns_cookie: u64) -> TupleKey {
    let ops = ctx.ops;
    // SAFETY: sock_ops context fields, read one word at a time.
    unsafe {
        let client_port_be = ((*ops).local_port as u16).to_be();
        // remote_port holds the network-order port in its upper 16 bits on little endian.
        let server_port_be = ((*ops).remote_port >> 16) as u16;
        let mut key = TupleKey {
            netns_cookie,
            client_addr_be: [(*ops).local_ip4, 0, 0, 0],
            server_addr_be: [(*ops).remote_ip4, 0, 0, 0],
            client_port_be,
            server_port_be,
            family: AF_INET as u32,
        };
        if (*ops).family == AF_INET6 as u32 {
            let remote = ctx_addr6(&raw const (*ops).remote_ip6);
            if !is_v4_mapped(&remote) {
                key.server_addr_be = remote;
                key.client_addr_be = ctx_addr6(&raw const (*ops).local_ip6);
                key.family = AF_INET6 as u32;
            }
        }
        key
    }
}
