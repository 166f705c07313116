//! redirectd: the user-space half of the eBPF sidecar traffic redirector.
//!
//! Flow (one way; see `docs/design.md`): [`sources`] (and the CNI plugin's calls, [`cni`])
//! publish the desired pods → the [`daemon`] loop resolves their namespaces
//! ([`podns`]) → [`reconcile`] diffs, with each pod's policy compiled by [`policy`] → the
//! [`kernel`] layer writes the maps and links → [`observe`] shows what is served.
//!
//! The layers are folders; a module is `pub` only where `main.rs`, `fuzz/` or `tests/` use
//! it, `pub(crate)` otherwise.

pub mod cni;
pub mod daemon;
pub mod kernel;
pub(crate) mod net;
pub mod observe;
pub mod podns;
pub mod pods;
pub mod policy;
pub mod private_file;
pub mod privileges;
pub mod reconcile;
pub mod seccomp;
pub mod sources;
