//! redirectd: the user-space half of the eBPF sidecar traffic redirector.
//!
//! Flow (one way; see `docs/design.md`): [`sources`] publish the desired pods → the
//! [`daemon`] loop resolves their namespaces ([`netns`]) → [`reconcile`] diffs → [`rules`],
//! [`datapath`] and [`loader`] write the kernel's maps and links.

pub mod annotations;
pub mod bpf_sys;
pub mod cni;
pub mod daemon;
pub mod datapath;
pub mod interfaces;
pub mod kernel_layout;
pub mod limits;
pub mod listeners;
pub mod loader;
pub mod mesh;
pub mod metrics;
pub mod mounts;
pub mod net;
pub mod netns;
pub mod netns_by_route;
pub mod nsenter;
pub mod pods;
pub mod private_file;
pub mod privileges;
pub mod probe;
pub mod procfs;
pub mod reconcile;
pub mod room;
pub mod rtnl;
pub mod rules;
pub mod seccomp;
pub mod sources;
pub mod splice_check;
pub mod status;
pub mod tproxy;
pub mod userns;
pub mod vm_ifaces;
