//! Every map of the data path, defined once. Each is pinned by name under the daemon's pin
//! directory (`<pin-dir>/maps/<NAME>`) so a daemon restart keeps connections and state.
//!
//! LRU maps use the common LRU list: with per-CPU lists (`BPF_F_NO_COMMON_LRU`) one CPU could
//! evict a live connection's entry while the map as a whole still had room, and the
//! benchmark showed no gain from them.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    btf_maps::SkStorage,
    helpers::generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
    macros::{btf_map, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
    programs::{SockAddrContext, SockOpsContext},
};
use redirect_common::{
    AddrRuleData, GroupRuleKey, ListenerKey, NodeAddrKey, OrigDst, PodConfig, PodCounters,
    PodSource, PortRuleKey, SockKey, TupleKey, ADDR_RULE_FIXED_BITS, MAX_ADDR_RULES,
    MAX_DNS_SOCKETS, MAX_GROUP_RULES, MAX_LISTENERS, MAX_ORIG_DST, MAX_PODS, MAX_PORT_RULES,
    MAX_SOCK_PAIRS,
};

use crate::policy::RuleTable;

/// The pods' rule tables as the programs read them: `PORT_RULES`, `ADDR_RULES`, `NODE_ADDRS`
/// and `OWNER_GROUPS`.
#[derive(Clone, Copy)]
pub struct Maps;

impl RuleTable for Maps {
    #[inline(always)]
    fn port_rule(&self, pod_id: u32, port: u16, kind: u8) -> bool {
        let key = PortRuleKey {
            pod_id,
            port,
            kind,
            _pad: 0,
        };
        PORT_RULES.get_ptr(&key).is_some()
    }

    #[inline(always)]
    fn longest(&self, pod_id: u32, kind: u32, addr16: [u8; 16]) -> u32 {
        let key = Key::new(
            ADDR_RULE_FIXED_BITS + 128,
            AddrRuleData {
                pod_id,
                kind,
                addr_be: addr16,
            },
        );
        ADDR_RULES.get(&key).copied().unwrap_or(0)
    }

    #[inline(always)]
    fn is_addr_of(&self, pod_id: u32, addr16: [u8; 16]) -> bool {
        // SAFETY: plain-data value, read at once.
        unsafe { NODE_ADDRS.get(&NodeAddrKey { addr_be: addr16 }) }.is_some_and(|id| *id == pod_id)
    }

    #[inline(always)]
    fn group_rule(&self, pod_id: u32, gid: u32) -> bool {
        OWNER_GROUPS
            .get_ptr(&GroupRuleKey { pod_id, gid })
            .is_some()
    }
}

/// Mesh pods. Key: network namespace cookie (`u64`, host order). Value: the pod's
/// [`PodConfig`]. Written by the daemon (reconciler) only, after the pod's rules are in place;
/// read by every program to decide whether a socket belongs to a mesh pod at all. A hash map
/// sized for the most pods one node can run.
#[map]
pub static MESH_PODS: HashMap<u64, PodConfig> = HashMap::pinned(MAX_PODS, 0);

/// Per-pod port lists (`excludeOutboundPorts`, `includeOutboundPorts`, inbound lists). Key:
/// [`PortRuleKey`]; value unused (1). Written by the daemon; read by `connect4/6`.
#[map]
pub static PORT_RULES: HashMap<PortRuleKey, u32> = HashMap::pinned(MAX_PORT_RULES, 0);

/// Per-pod outbound owner groups (Istio's `ISTIO_OUTBOUND_OWNER_GROUPS` or its `_EXCLUDE`).
/// Key: [`GroupRuleKey`]; value unused (1). Written by the daemon; read by `connect4/6`.
#[map]
pub static OWNER_GROUPS: HashMap<GroupRuleKey, u32> = HashMap::pinned(MAX_GROUP_RULES, 0);

/// The DNS server a UDP socket of a mesh pod last addressed, when its query went to the
/// agent instead (DNS capture). Key: socket cookie. Value: [`OrigDst`] (its `pod_id` says
/// whose it is). Written by `connect4/6` (connected sockets) and `sendmsg4/6` (each addressed
/// send); read by `recvmsg4/6`, which show the agent's reply as coming from that server, and
/// `getpeername`; deleted by `sock_release` when the socket closes. A plain hash, not an LRU:
/// no pod's queries can evict another pod's entry (each pod may hold at most
/// [`redirect_common::MAX_DNS_SOCKETS_PER_POD`] entries, counted in `DNS_SOCKETS`).
#[map]
pub static DNS_ASKED: HashMap<u64, OrigDst> = HashMap::pinned(MAX_DNS_SOCKETS, 0);

/// How many `DNS_ASKED` entries each pod holds, indexed by pod id (`u64`: the BPF target's
/// atomic width). Added to by the programs
/// that write an entry, taken from by `sock_release` when it deletes one (by the entry's own
/// pod id, so the count stays exact across slot reuse and restarts).
#[map]
pub static DNS_SOCKETS: Array<u64> = Array::pinned(MAX_PODS, 0);

/// Per-pod address rules (`excludeOutboundIPRanges`, `includeOutboundIPRanges`, the pod's own
/// IPs). Key: LPM key over [`AddrRuleData`] (pod id and kind matched exactly, then the
/// address prefix). Value: the key's prefix length, which the programs compare between two
/// kinds' longest matches (routes through excluded interfaces or not). Written by the daemon;
/// read by `connect4/6`, `sendmsg4/6` and `sk_lookup`.
#[map]
pub static ADDR_RULES: LpmTrie<AddrRuleData, u32> = LpmTrie::pinned(MAX_ADDR_RULES, 0);

/// Original destination of each captured connection, in the client socket's own local
/// storage (`BPF_MAP_TYPE_SK_STORAGE`): no shared capacity a pod could fill, no LRU work, freed
/// with the socket. Written by `connect4/6` when they capture ([`set_orig_dst`]); read by
/// `sockops` (to re-key by 4-tuple) and `getpeername4/6` ([`orig_dst_of`]); deleted by
/// `sockops` when the socket closes ([`forget_orig_dst`]; it would go with the socket anyway).
/// Pinned, so the sockets of a daemon's previous run keep theirs.
#[btf_map(pin_by_name)]
pub static ORIG_BY_SOCK: SkStorage<OrigDst> = SkStorage::new();

/// The map pointer the `sk_storage` helpers take (aya-ebpf's wrapper reaches it only from a
/// `sock_addr` context; `sockops` needs it too).
#[inline(always)]
fn orig_by_sock() -> *mut c_void {
    core::ptr::addr_of!(ORIG_BY_SOCK).cast_mut().cast()
}

/// A context's socket, as the `sk_storage` helpers take it: never null.
#[derive(Clone, Copy)]
pub struct ContextSock(*mut c_void);

impl ContextSock {
    /// The socket a `sock_addr` program (connect, getpeername) runs for: never null there.
    #[inline(always)]
    pub fn of_sock_addr(ctx: &SockAddrContext) -> Self {
        // SAFETY: a field every sock_addr program may read.
        Self(unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }.cast())
    }

    /// The socket a `sockops` callback runs for; the verifier makes us check it for null.
    #[inline(always)]
    pub fn of_sock_ops(ctx: &SockOpsContext) -> Option<Self> {
        // SAFETY: a field every sock_ops program may read.
        let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
        (!sk.is_null()).then_some(Self(sk.cast()))
    }
}

/// Records `orig` as the original destination of `sk`, replacing what an earlier `connect()`
/// of the same socket left. False if the kernel could not allocate the storage.
#[inline(always)]
pub fn set_orig_dst(sk: ContextSock, orig: &OrigDst) -> bool {
    let mut value = *orig;
    // SAFETY: `sk` is the context's socket; the helper copies `value` in on creation.
    let slot = unsafe {
        bpf_sk_storage_get(
            orig_by_sock(),
            sk.0,
            core::ptr::from_mut(&mut value).cast(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast::<OrigDst>();
    if slot.is_null() {
        return false;
    }
    // SAFETY: a non-null pointer from the helper is this socket's value, of this type.
    unsafe { *slot = *orig };
    true
}

/// The original destination recorded for `sk`, if it was captured.
#[inline(always)]
pub fn orig_dst_of(sk: ContextSock) -> Option<OrigDst> {
    // SAFETY: `sk` is the context's socket; no creation, so no value is passed.
    let slot = unsafe { bpf_sk_storage_get(orig_by_sock(), sk.0, core::ptr::null_mut(), 0) }
        .cast::<OrigDst>();
    // SAFETY: a non-null pointer from the helper is this socket's value, of this type.
    (!slot.is_null()).then(|| unsafe { *slot })
}

/// Forgets the original destination of `sk`; true if it had one.
#[inline(always)]
pub fn forget_orig_dst(sk: ContextSock) -> bool {
    // SAFETY: `sk` is the context's socket.
    unsafe { bpf_sk_storage_delete(orig_by_sock(), sk.0) == 0 }
}

/// Original destination of each captured connection, by its 4-tuple in its netns
/// ([`TupleKey`]). Written by `sockops` when the client's connection is established; read by
/// `getsockopt` on the proxy's accepted socket; deleted by `sockops` when the client socket
/// closes. LRU so a close we never see cannot fill it.
#[map]
pub static ORIG_BY_TUPLE: LruHashMap<TupleKey, OrigDst> = LruHashMap::pinned(MAX_ORIG_DST, 0);

/// Per-pod counters ([`PodCounters`]), per CPU, indexed by pod id. Written by the programs;
/// summed and zeroed (on slot reuse) by the daemon.
#[map]
pub static POD_COUNTERS: PerCpuArray<PodCounters> = PerCpuArray::pinned(MAX_PODS, 0);

/// The proxy's listeners, inbound and outbound port, of each network namespace and family
/// ([`ListenerKey`]). Written by `sockops` when a socket starts listening on either port (so a
/// restarted proxy is registered again at its `listen()`), and by the daemon for a proxy that
/// was listening before it; the kernel removes an entry when its socket closes, so an entry
/// means "listening now". Read by `sk_lookup` (steer inbound connections with
/// `bpf_sk_assign`) and by `connect4/6` (is the proxy listening?).
#[map]
pub static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(MAX_LISTENERS, 0);

/// Established local sockets of mesh pods whose peer is on this node ([`SockKey`]). Written by
/// `sockops` at established; the kernel removes a socket when it closes. `sk_msg` (attached to
/// this map) moves each send straight to the peer's receive queue.
#[map]
pub static SOCK_PAIRS: SockHash<SockKey> = SockHash::pinned(MAX_SOCK_PAIRS, 0);

/// Addresses of the mesh pods on this node. Key: [`NodeAddrKey`]; value: pod id. Written by
/// the daemon; read by `sockops` to tell whether a connection's peer is local (acceleration).
#[map]
pub static NODE_ADDRS: HashMap<NodeAddrKey, u32> = HashMap::pinned(MAX_ADDR_RULES, 0);

/// Sockets whose first send could not be accelerated (the peer was not in `SOCK_PAIRS` yet):
/// they stay on the normal path for good, or later sends could overtake earlier ones in the
/// peer's queues. Key: the sender's [`SockKey`]; value unused. Written by `sk_msg`, deleted by
/// `sockops` at close; LRU so a missed close cannot fill it.
#[map]
pub static ACCEL_FALLBACK: LruHashMap<SockKey, u32> = LruHashMap::pinned(MAX_SOCK_PAIRS, 0);

/// Sockets the proxy itself opened with `connect()` (its uid or gid), by socket cookie. Written
/// by `connect4/6`; read and removed by `sockops` when the socket is established, to decide
/// acceleration: only the proxy's sockets are accelerated (see `sk_msg.rs`). LRU: a connect
/// that never completes leaves an entry that ages out.
#[map]
pub static PROXY_SOCKS: LruHashMap<u64, u32> = LruHashMap::pinned(MAX_SOCK_PAIRS, 0);

/// Connections `sk_lookup` handed to a proxy's inbound listener, by the accepted socket's
/// [`SockKey`]. Written by `sk_lookup`; read and removed by `sockops` when the accepted socket
/// is established (it is the proxy's, so it may be accelerated). LRU for handshakes that never
/// complete.
#[map]
pub static STEERED: LruHashMap<SockKey, u32> = LruHashMap::pinned(MAX_SOCK_PAIRS, 0);

/// TPROXY pods' original-source connections (the proxy connecting to its application from the
/// client's address, socket marked 1337), by the [`SockKey`] the application's accepted socket
/// will have, with the pod's netns cookie. Written by `sockops` when the proxy's SYN leaves
/// (`TCP_CONNECT_CB`) and removed at its close; read by `sk_lookup`, which leaves these
/// connections to the application instead of capturing them again. LRU: a missed close ages
/// out.
#[map]
pub static TPROXY_ORIGINS: LruHashMap<SockKey, u32> = LruHashMap::pinned(MAX_SOCK_PAIRS, 0);

/// The address of each family a pod's connections leave from ([`PodSource`]), indexed by pod
/// id. Written by the daemon with the pod's rules (before its `MESH_PODS` entry); read by
/// `connect4/6`, which bind a captured connection's still-unbound socket to it. An array: a
/// slot is overwritten whenever it is given to a pod.
#[map]
pub static POD_SOURCES: Array<PodSource> = Array::pinned(MAX_PODS, 0);
