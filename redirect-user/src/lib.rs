//! redirectd: the user-space half of the eBPF sidecar traffic redirector.
//!
//! Flow: [`pods`] (sources) → [`reconcile`] → [`datapath`] / [`loader`] (the kernel).

pub mod annotations;
pub mod bpf_sys;
pub mod daemon;
pub mod datapath;
pub mod listeners;
pub mod loader;
pub mod metrics;
pub mod mounts;
pub mod netns;
pub mod netns_by_route;
pub mod pods;
pub mod privileges;
pub mod probe;
pub mod procfs;
pub mod reconcile;
pub mod rules;
pub mod sources;
pub mod status;
