//! `redirect-cni`, a chained CNI plugin (CNI spec 1.0.0; 0.3.0, 0.3.1 and 0.4.0 configs are
//! accepted too). It goes after the node's primary plugin in the conflist; the container
//! runtime calls it when a pod's sandbox is created, before any of its containers exists.
//!
//! - ADD hands the daemon the pod (name, namespace, uid from `CNI_ARGS`), its netns and the
//!   addresses the primary plugin gave it, and returns only once the daemon has written the
//!   pod's maps or answered that the pod is not in the mesh. The previous result is passed on
//!   unchanged. If the daemon cannot be reached, ADD fails (code 11, try again later) for pods
//!   outside `excludeNamespaces`, so no mesh pod starts uncaptured; kubelet retries.
//! - DEL asks the daemon to remove the pod's entries; it never fails (the daemon also drops a
//!   pod whose sandbox is gone).
//! - CHECK asks whether the pod is still captured.
//! - VERSION lists the spec versions above.

pub mod args;
pub mod error;
pub mod netconf;
pub mod talk;

/// Spec versions whose configurations and results this plugin reads and writes.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// The daemon's socket when the configuration names none.
pub const DEFAULT_SOCKET: &str = "/var/run/redirectd/cni.sock";

/// Namespaces never asked about when the configuration names none: the daemon cannot be in
/// the mesh it serves, and the system's pods must start even while it is down.
pub const DEFAULT_EXCLUDED_NAMESPACES: &[&str] = &["kube-system"];

/// How long ADD and CHECK wait for the daemon when the configuration says nothing.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 30;
