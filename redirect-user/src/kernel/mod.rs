//! The kernel side: loading and attaching the programs ([`loader`], [`bpf_sys`]), the maps' one
//! writer ([`datapath`]), what this kernel has ([`probe`], [`kernel_layout`], [`splice_check`]) and
//! the mounts they need ([`mounts`]).

pub(crate) mod bpf_sys;
pub(crate) mod datapath;
pub mod kernel_layout;
pub mod loader;
pub(crate) mod map_keys;
pub mod mounts;
pub mod probe;
pub mod splice_check;
