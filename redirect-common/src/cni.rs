//! What the chained CNI plugin (`redirect-cni`) and the daemon say to each other: one JSON
//! line each way over the daemon's unix socket (`redirectd run --cni-socket`). The plugin
//! sends a [`CniRequest`] and waits for the [`CniReply`]; the daemon answers an ADD only once
//! the pod's maps are written (or it decided the pod is not in the mesh).

use alloc::{string::String, vec::Vec};

use serde::{Deserialize, Serialize};

/// The CNI command the plugin was called with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CniCommand {
    /// The pod's sandbox was created: capture it before any container starts.
    Add,
    /// The sandbox is being torn down: remove the pod's entries.
    Del,
    /// Is the pod still captured as ADD left it?
    Check,
}

/// One call of the plugin, as the container runtime made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniRequest {
    pub command: CniCommand,
    /// `CNI_CONTAINERID`: the sandbox.
    pub container_id: String,
    /// `CNI_NETNS`: the path of the pod's network namespace (empty on a DEL after the
    /// namespace is gone).
    pub netns: String,
    /// `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID` from `CNI_ARGS`.
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: Option<String>,
    /// The pod's addresses, from the previous plugins' result.
    #[serde(default)]
    pub ips: Vec<String>,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum CniReply {
    /// ADD: the pod's maps are written; its connections are captured from now on.
    /// CHECK: it is still captured.
    Captured { pod_id: u32 },
    /// ADD / CHECK: the pod is not in the mesh (the reason says why); nothing was written.
    NotInMesh { reason: String },
    /// DEL: the pod's entries are gone (or there were none).
    Removed,
    /// ADD / CHECK: the pod is in the mesh but cannot be captured as asked (an invalid
    /// annotation, its namespace not found, the maps full): the plugin fails the call, so
    /// the pod does not start uncaptured. The reason names the pod and the problem.
    Refused { reason: String },
    /// ADD / CHECK: the daemon cannot decide or capture now (its pod source not read yet,
    /// the API server unreachable, the pod's namespace not found yet): the plugin fails the
    /// call with "try again later", and kubelet retries.
    Unavailable { reason: String },
}
