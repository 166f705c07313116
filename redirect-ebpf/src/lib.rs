//! Shared parts of the kernel programs: maps, address helpers, counters, Istio's rules.
//! The maps and counters are built for the BPF target only; the address helpers and the rules
//! (over the [`policy::RuleTable`] trait) are built on the host too, where redirect-user's
//! unit tests run the rules on its compiled rule tables.
#![no_std]

pub mod addr;
#[cfg(target_arch = "bpf")]
pub mod counters;
#[cfg(target_arch = "bpf")]
pub mod global;
#[cfg(target_arch = "bpf")]
pub mod maps;
pub mod policy;
