//! `sk_lookup`: inbound capture. For a new TCP connection arriving at a mesh pod from outside
//! it, pick the proxy's inbound listener (`LISTENERS`) with `bpf_sk_assign`, whatever port the
//! connection is for. The accepted socket's local address is the original destination (as
//! with TPROXY). A connection that arrives through one of the pod's VM interfaces
//! (`kubevirtInterfaces`, routed to the pod by the daemon whatever its destination) goes to
//! the outbound listener instead. Connections from inside the pod (loopback, the pod's own addresses, and in a
//! TPROXY pod the proxy's original-source connections) were decided at `connect()` and pass
//! untouched.

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use redirect_common::{
    ListenerKey, PodConfig, SockKey, POD_FLAG_FAIL_CLOSED, POD_FLAG_REJECTED, POD_FLAG_TPROXY,
    POD_FLAG_VM_IFACES, PORT_VM_IFACE,
};
use redirect_ebpf::{
    addr::{ctx_addr6, sock_key, Endpoint, RawEnds},
    counters::count,
    global::Global,
    maps::{Maps, LISTENERS, MESH_PODS, STEERED, TPROXY_ORIGINS},
    policy::{has_port_rule, inbound, local_to_pod, Inbound},
};

/// Let the lookup go on (with the socket we assigned, if any).
const SK_PASS: u32 = 1;
/// Fail the lookup: TCP answers the SYN with a reset (connection refused).
const SK_DROP: u32 = 0;
const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// Netns cookie of the pod this instance is attached to; set by the daemon at load.
#[unsafe(no_mangle)]
static POD_NETNS_COOKIE: Global<u64> = Global::new(0);

/// 1 if the kernel lets this program read the ingress interface (Linux 5.17), 2 if not; set
/// by the daemon at load. Never 0, so the value lives in frozen `.rodata` and the verifier
/// prunes the branch a kernel without the field would refuse.
#[unsafe(no_mangle)]
static SEES_INGRESS_IFINDEX: Global<u8> = Global::new(2);

/// Inbound capture for one pod's network namespace. Minimum kernel: 5.9 (sk_lookup).
#[sk_lookup]
pub fn rd_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: context fields an sk_lookup program may read, one word at a time.
    let (protocol, family, port) = unsafe { ((*l).protocol, (*l).family, (*l).local_port) };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    // Loopback destinations (including the listener probes of connect4's
    // bpf_sk_lookup_tcp) are never ours: return before any map lookup.
    // SAFETY: as above.
    let local = unsafe {
        if family == AF_INET {
            Endpoint::v4((*l).local_ip4, 0)
        } else {
            Endpoint::v6(ctx_addr6(&raw const (*l).local_ip6), 0)
        }
    };
    if local.is_loopback() {
        return SK_PASS;
    }
    let netns_cookie = POD_NETNS_COOKIE.load();
    // SAFETY: plain-data value, copied out at once.
    let Some(pod) = (unsafe { MESH_PODS.get(&netns_cookie) }).copied() else {
        return SK_PASS;
    };
    // Through one of the pod's VM interfaces (`kubevirtInterfaces`): a VM's connection the
    // pod forwards, whatever its destination, goes to the outbound listener.
    if pod.flags & POD_FLAG_VM_IFACES != 0 && SEES_INGRESS_IFINDEX.load() == 1 {
        // SAFETY: a context field this kernel has (the load-time value says so).
        let ifindex = unsafe { (*l).ingress_ifindex };
        if ifindex <= u16::MAX as u32
            && has_port_rule(Maps, pod.pod_id, ifindex as u16, PORT_VM_IFACE)
        {
            return steer(&ctx, &pod, netns_cookie, pod.outbound_port, true);
        }
    }
    // SAFETY: as above.
    let remote = unsafe {
        if family == AF_INET {
            Endpoint::v4((*l).remote_ip4, 0)
        } else {
            Endpoint::v6(ctx_addr6(&raw const (*l).remote_ip6), 0)
        }
    };
    if local_to_pod(Maps, &pod, &remote) {
        return SK_PASS;
    }
    // In a TPROXY pod: the proxy's own original-source connection to the application (from
    // the client's address, over lo), recorded by `sockops` as it sent its SYN.
    if pod.flags & POD_FLAG_TPROXY != 0 {
        let key = SockKey {
            netns_cookie,
            ..steered_key(&ctx, netns_cookie)
        };
        if TPROXY_ORIGINS.get_ptr(&key).is_some() {
            return SK_PASS;
        }
    }
    if inbound(Maps, &pod, port as u16, local.addr16(), remote.addr16()) == Inbound::Direct {
        count(pod.pod_id, |c| c.inbound_direct += 1);
        return SK_PASS;
    }
    steer(&ctx, &pod, netns_cookie, pod.inbound_port, false)
}

/// Hands the connection to the pod's listener on `port` (its inbound listener, or with
/// `vm` its outbound one), or fails as the pod is configured.
#[inline(always)]
fn steer(ctx: &SkLookupContext, pod: &PodConfig, netns_cookie: u64, port: u16, vm: bool) -> u32 {
    if pod.flags & POD_FLAG_REJECTED != 0 {
        // Its configuration was rejected before it was served: refused, never uncaptured.
        return fail(pod, vm);
    }
    // SAFETY: a context field an sk_lookup program may read.
    let family = unsafe { (*ctx.lookup).family };
    let key = ListenerKey {
        netns_cookie,
        family,
        port: port.into(),
    };
    // An IPv4 connection may also go to a dual-stack IPv6 listener (the kernel refuses a
    // v6-only one, and that is a failure like no listener).
    let assigned = LISTENERS.redirect_sk_lookup(ctx, &key, 0).or_else(|_| {
        let v6 = ListenerKey {
            family: AF_INET6,
            ..key
        };
        if family == AF_INET {
            LISTENERS.redirect_sk_lookup(ctx, &v6, 0)
        } else {
            Err(-1)
        }
    });
    match assigned {
        Ok(()) => {
            // The accepted socket will be the proxy's: sockops may accelerate it.
            let _ = STEERED.insert(&steered_key(ctx, netns_cookie), &1, 0);
            if vm {
                count(pod.pod_id, |c| c.outbound_captured += 1);
            } else {
                count(pod.pod_id, |c| c.inbound_captured += 1);
            }
            SK_PASS
        }
        Err(_) => fail(pod, vm),
    }
}

/// The [`SockKey`] the accepted socket will have (its own local and remote ends).
#[inline(always)]
fn steered_key(ctx: &SkLookupContext, netns_cookie: u64) -> SockKey {
    let l = ctx.lookup;
    // SAFETY: sk_lookup context fields, read one word at a time.
    unsafe {
        sock_key(
            netns_cookie,
            &RawEnds {
                family: (*l).family,
                local: ctx_addr6(&raw const (*l).local_ip6),
                remote: ctx_addr6(&raw const (*l).remote_ip6),
                local_ip4: (*l).local_ip4,
                remote_ip4: (*l).remote_ip4,
                local_port_be: ((*l).local_port as u16).to_be(),
                remote_port_be: (*l).remote_port,
            },
        )
    }
}

/// No listener registered for the pod (proxy down or not started yet); counted as inbound,
/// or with `vm` as outbound (a VM's connection).
#[inline(always)]
fn fail(pod: &PodConfig, vm: bool) -> u32 {
    let closed = pod.flags & POD_FLAG_FAIL_CLOSED != 0;
    count(pod.pod_id, |c| match (vm, closed) {
        (false, true) => c.inbound_fail_closed += 1,
        (false, false) => c.inbound_fail_open += 1,
        (true, true) => c.outbound_fail_closed += 1,
        (true, false) => c.outbound_fail_open += 1,
    });
    if closed {
        SK_DROP
    } else {
        SK_PASS
    }
}
