//! The per-pod inbound program, a second object (`redirect-inbound`): one instance is loaded
//! per mesh pod, with that pod's netns cookie in `POD_NETNS_COOKIE`, and attached to the pod's
//! network namespace (`sk_lookup` programs cannot read their namespace's cookie themselves).
//! It shares the node-wide maps, which are pinned by name.
#![no_std]
#![no_main]

mod sk_lookup;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// `bpf_sk_assign` is available to GPL-compatible programs only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
