//! The lab: mesh pods as network namespaces on a bridge, each in its own cgroup, each with a
//! sidecar (`redirect-lab proxy`, uid 1337) and an application. Used by `cargo xtask demo`,
//! the integration tests and the benchmark.
//!
//! Every object is owned by a guard that removes it on drop, even when a test fails: network
//! namespaces, cgroups, processes, the daemon and its pins, the lab's temp directory. Names are
//! unique per lab (`rlab-<pid>-<n>`), so labs can run side by side, and nothing touches the
//! host's own interfaces: the bridge lives in a "node" namespace of the lab's own.

mod apps;
mod cgroup;
mod cmd;
pub mod cni;
pub mod consul_iptables;
mod daemon;
pub mod deploy;
pub mod echo;
pub mod envoy;
pub mod istio_iptables;
pub mod linkerd_iptables;
mod netns;
pub mod perf;
mod process;
mod topology;
mod wait;
pub mod wire;

use std::sync::atomic::AtomicU32;

pub use cgroup::{cgroup2_root, Cgroup};
pub use cmd::{bin, output, run, which};
pub use daemon::Daemon;
pub use netns::Netns;
pub use process::{spawn, spawn_bounded, Placement, Proc};
pub use redirect_common::status::{PodReport, Report};
pub use topology::{Lab, Pod};
pub use wait::{eventually, scaled, time_scale};

/// Prefix of every lab object's name; `cargo xtask test` sweeps leftovers with it.
pub const PREFIX: &str = "rlab-";
/// The sidecar's uid and gid, as Istio's.
pub const PROXY_UID: u32 = 1337;
/// The lab pods' IPv4 subnet (/24) and IPv6 subnet (/64) prefixes.
pub const V4_PREFIX: &str = "10.201.0.";
pub const V6_PREFIX: &str = "fd00:201::";
/// Prefix of the point-to-point pods' addresses ([`Lab::add_routed_pod`], /32 each).
pub const ROUTED_V4_PREFIX: &str = "10.204.0.";

static NEXT: AtomicU32 = AtomicU32::new(0);
