//! The redirector's kernel programs, one module per hook. All programs are built into one
//! object (`redirect`) that `redirect-user` embeds and loads.
//!
//! Program names start with `rd_` and fit the kernel's 16-byte name limit.
#![no_std]
#![no_main]

mod addr;
mod connect;
mod counters;
mod maps;
mod peername;
mod policy;
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
