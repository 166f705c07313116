//! Raw IP sockets cannot go around capture. A process with `CAP_NET_RAW` (in the default
//! capability set of containerd's and Docker's containers) could write its own TCP segments:
//! no `connect()` happens, so no hook would send them to the proxy. In a mesh pod, for every
//! process but the proxy:
//!
//! - `cgroup/sock_create` refuses a raw socket that can write TCP: protocol `IPPROTO_TCP`, or
//!   `IPPROTO_RAW` (which writes its own IP header), IPv4 and IPv6 (`EPERM`);
//! - `cgroup/setsockopt` refuses `IP_HDRINCL` / `IPV6_HDRINCL`, which would let any other raw
//!   socket (ICMP, say) write a header naming TCP.
//!
//! Ping and other raw sockets of other protocols keep working. Each refusal is counted
//! (`raw_denied`). Packet sockets (`AF_PACKET`) never reach these hooks: see
//! docs/interception.md.

use aya_ebpf::{
    helpers::generated::{bpf_get_current_uid_gid, bpf_get_netns_cookie},
    macros::{cgroup_sock, cgroup_sockopt},
    programs::{SockContext, SockoptContext},
    EbpfContext,
};
use redirect_common::{SOL_IP, SOL_IPV6};

use redirect_ebpf::{counters::count, maps::MESH_PODS};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const SOCK_RAW: u32 = 3;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_RAW: u32 = 255;
const IP_HDRINCL: i32 = 3;
const IPV6_HDRINCL: i32 = 36;
/// Options longer than a page reach the program cut; `optlen` 0 tells the kernel to use the
/// caller's own buffer as it is.
const PAGE_SIZE: i32 = 4096;

/// The verdict on a raw-socket call in the netns of `netns_cookie`: refused (and counted)
/// for any caller but the proxy in a mesh pod, allowed elsewhere.
#[inline(always)]
fn verdict(netns_cookie: u64) -> i32 {
    // SAFETY: plain-data value, copied out at once.
    let Some(pod) = (unsafe { MESH_PODS.get(&netns_cookie) }).copied() else {
        return ALLOW;
    };
    // SAFETY: helper valid in both program types (a process context).
    let uid_gid = unsafe { bpf_get_current_uid_gid() };
    if uid_gid as u32 == pod.proxy_uid || (uid_gid >> 32) as u32 == pod.proxy_gid {
        return ALLOW;
    }
    count(pod.pod_id, |c| c.raw_denied += 1);
    DENY
}

/// Refuses raw sockets that could write TCP in mesh pods. Minimum kernel: 5.7 (netns cookie
/// in `cgroup/sock_create`).
#[cgroup_sock(sock_create)]
pub fn rd_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: fields a sock_create program may read.
    let (ty, protocol) = unsafe { ((*ctx.sock).type_, (*ctx.sock).protocol) };
    if ty != SOCK_RAW || (protocol != IPPROTO_TCP && protocol != IPPROTO_RAW) {
        return ALLOW;
    }
    // SAFETY: helper valid for sock_create programs.
    verdict(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) })
}

/// Refuses `IP_HDRINCL` / `IPV6_HDRINCL` in mesh pods. Minimum kernel: 5.15 (netns cookie in
/// sockopt programs).
#[cgroup_sockopt(setsockopt)]
pub fn rd_setsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: fields a setsockopt program may read.
    let (level, optname, optlen) = unsafe { ((*so).level, (*so).optname, (*so).optlen) };
    let hdrincl = (level == SOL_IP && optname == IP_HDRINCL)
        || (level == SOL_IPV6 && optname == IPV6_HDRINCL);
    if !hdrincl {
        if optlen > PAGE_SIZE {
            // SAFETY: optlen is writable in setsockopt programs.
            unsafe { (*so).optlen = 0 };
        }
        return ALLOW;
    }
    // SAFETY: helper valid for sockopt programs.
    verdict(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) })
}
