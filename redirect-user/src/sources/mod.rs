//! Pod sources. Each one produces the desired set of mesh pods on this node and publishes it
//! on the same kind of channel; the daemon's loop reads whichever source it was given and
//! never knows more of it than what it publishes.

pub mod file;
pub mod kube;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use tokio::sync::watch;

pub use self::kube::{Fetcher, KubeOptions};
use crate::{
    pods::{Desired, PodError, PodKey},
    policy::annotations::CapturePolicy,
};

/// Where the desired pods come from.
pub enum SourceConfig {
    /// A YAML pods file, followed while running.
    File(PathBuf),
    /// The Kubernetes API server (this node's pods).
    Kubernetes(KubeOptions),
}

impl SourceConfig {
    /// What to call the source in status and logs.
    pub fn describe(&self) -> String {
        match self {
            SourceConfig::File(p) => p.display().to_string(),
            SourceConfig::Kubernetes(k) => format!("kubernetes (node {})", k.node_name),
        }
    }
}

/// Whether a pod the source knows is in the mesh, whether or not it can be served yet (the
/// CNI plugin asks about pods before they have an address the source has seen).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// In the mesh, with this configuration.
    Mesh(Box<CapturePolicy>),
    /// In the mesh, but its capture configuration is invalid.
    Invalid(PodError),
    /// Not in the mesh, and why (not injected, `redirectd.dev/skip`, interception mode NONE,
    /// a gateway, host network, not in the pods file).
    Outside(String),
}

/// What a source knows of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The pod's `metadata.uid`, when the source has one (Kubernetes).
    pub uid: Option<String>,
    pub membership: Membership,
}

/// What a source publishes: a full desired set, and what is wrong with the source as a whole
/// while it keeps serving an earlier set (e.g. a pods file being rewritten).
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub desired: Desired,
    pub source_error: Option<String>,
    /// Whether `desired` is a full set the source really read. A pods file unusable since
    /// the daemon started has none: then nothing is applied and nothing removed (what a
    /// previous run left keeps serving) until it is fixed.
    pub complete: bool,
    /// Every pod the source knows on this node, served or not yet.
    pub members: BTreeMap<PodKey, Member>,
    /// How to ask the API server about a pod the source has not seen yet (Kubernetes only).
    pub fetcher: Option<Fetcher>,
}

impl Published {
    /// A desired set that is all the source knows (the pods file): its pods are the members.
    pub fn new(desired: Desired) -> Self {
        let mut members = BTreeMap::new();
        for p in &desired.pods {
            let m = Membership::Mesh(Box::new(p.policy.clone()));
            members.insert(
                p.key.clone(),
                Member {
                    uid: None,
                    membership: m,
                },
            );
        }
        // Held pods (a broken entry) and pods with an invalid configuration alike.
        let held = desired.held.iter().map(|(k, e)| (k, e));
        let invalid = held.chain(desired.invalid.iter().map(|p| (&p.key, &p.error)));
        for (key, error) in invalid {
            let m = Membership::Invalid(error.clone());
            members.insert(
                key.clone(),
                Member {
                    uid: None,
                    membership: m,
                },
            );
        }
        Self {
            desired,
            source_error: None,
            complete: true,
            members,
            fetcher: None,
        }
    }
}

/// The sending side of a source's channel. `None` until the source has a first full set:
/// before that the loop applies nothing and sweeps nothing.
pub type PublishedTx = watch::Sender<Option<Published>>;

/// What the sources count for the metrics.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Times the Kubernetes pod watch broke and was restarted.
    pub watch_restarts: AtomicU64,
    /// Why the pod source stopped for good, if it did (liveness fails: the daemon would serve
    /// a pod set that no longer follows the cluster).
    pub stopped: std::sync::Mutex<Option<String>>,
}

/// Starts the source on the runtime; returns the channel it publishes on.
pub fn spawn(
    source: SourceConfig,
    poll: Duration,
    stats: Arc<SourceStats>,
) -> watch::Receiver<Option<Published>> {
    let (tx, rx) = watch::channel(None);
    match source {
        SourceConfig::File(path) => {
            tokio::spawn(file::run(path, poll, tx));
        }
        SourceConfig::Kubernetes(k) => {
            tokio::spawn(async move {
                if let Err(e) = kube::run(k, tx, stats.clone()).await {
                    log::error!("Kubernetes pod source stopped: {e:#}; still serving the last pods it listed, and /healthz fails so the daemon is restarted");
                    if let Ok(mut s) = stats.stopped.lock() {
                        *s = Some(format!("{e:#}"));
                    }
                }
            });
        }
    }
    rx
}
