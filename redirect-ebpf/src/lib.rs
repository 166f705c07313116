//! Shared parts of the kernel programs: maps, address helpers, counters, Istio's rules.
//! Built for the BPF target only; on the host (where this crate is a build dependency of
//! redirect-user) the library is empty.
#![no_std]

#[cfg(target_arch = "bpf")]
pub mod addr;
#[cfg(target_arch = "bpf")]
pub mod counters;
#[cfg(target_arch = "bpf")]
pub mod maps;
#[cfg(target_arch = "bpf")]
pub mod policy;
