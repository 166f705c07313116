//! The redirector's node-wide kernel programs, one module per hook, built into one object
//! (`redirect`) that `redirect-user` embeds, loads once and attaches at the cgroup. The
//! per-pod `sk_lookup` program is a second object (`inbound.rs`).
//!
//! Program names start with `rd_` and fit the kernel's 16-byte name limit.
#![no_std]
#![no_main]
// DNS capture's per-pod socket counts need an atomic add (see `dns::atomic_add`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod connect;
mod dns;
mod peername;
mod raw;
mod sk_msg;
mod sockops;
mod sockopt;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The kernel refuses some helpers (`bpf_sk_lookup_tcp` among them) to non-GPL programs.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
