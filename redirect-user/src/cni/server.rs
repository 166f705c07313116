//! The unix socket the CNI plugin calls. Each connection carries one request line and gets
//! one reply line. What needs only the source's knowledge (is this pod in the mesh?) is
//! answered here, asking the API server when the pod watch has not seen the pod yet; what
//! changes the maps goes to the daemon's loop as a [`CniCall`], answered after its pass.

use std::{os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use redirect_common::cni::{CniCommand, CniReply, CniRequest};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch},
};

use crate::{
    pods::PodKey,
    policy::annotations::CapturePolicy,
    sources::{Member, Membership, Published},
};

/// A request for the loop: ADD (with the configuration the pod is captured with), DEL or
/// CHECK, and where to send the answer.
pub struct CniCall {
    pub request: CniRequest,
    pub key: PodKey,
    /// ADD and CHECK: the pod's configuration, as the source (or the API server) gave it.
    pub policy: Option<CapturePolicy>,
    pub reply: oneshot::Sender<CniReply>,
    /// When the plugin's request arrived.
    pub received: std::time::Instant,
}

/// How long a connection may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long asking the API server about a pod may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call waits for the loop (the plugin's own bound is longer by default).
const LOOP_TIMEOUT: Duration = Duration::from_secs(25);

/// Binds `socket` (replacing a stale one; owner-only) and serves until the process ends.
pub async fn serve(
    socket: &Path,
    source: watch::Receiver<Option<Published>>,
    calls: mpsc::Sender<CniCall>,
) -> Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing the stale {}", socket.display()))
        }
    }
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("listening for the CNI plugin on {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} owner-only", socket.display()))?;
    log::info!("CNI plugin socket: {}", socket.display());
    loop {
        let (stream, _) = listener.accept().await.context("accepting a CNI call")?;
        let source = source.clone();
        let calls = calls.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, source, calls).await {
                log::warn!("CNI call: {e:#}");
            }
        });
    }
}

/// A plugin's request line, bounded in size and nesting before it is parsed; `Err` says why
/// it is refused.
pub fn parse_request(line: &str) -> Result<CniRequest, String> {
    crate::policy::limits::check_pod_document(line).map_err(|e| format!("request refused: {e}"))?;
    serde_json::from_str::<CniRequest>(line).map_err(|e| {
        format!("request not understood ({e}); is redirect-cni the same version as redirectd?")
    })
}

async fn handle(
    stream: UnixStream,
    source: watch::Receiver<Option<Published>>,
    calls: mpsc::Sender<CniCall>,
) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let limit = crate::policy::limits::MAX_POD_DOCUMENT_BYTES as u64 + 1;
    tokio::time::timeout(
        READ_TIMEOUT,
        BufReader::new(read.take(limit)).read_line(&mut line),
    )
    .await
    .context("the plugin sent no request in time")?
    .context("reading the plugin's request")?;
    let reply = match parse_request(&line) {
        Ok(request) => answer(request, &source, &calls).await,
        Err(reason) => CniReply::Refused { reason },
    };
    let mut out = serde_json::to_string(&reply)?;
    out.push('\n');
    write
        .write_all(out.as_bytes())
        .await
        .context("answering the plugin")?;
    Ok(())
}

async fn answer(
    request: CniRequest,
    source: &watch::Receiver<Option<Published>>,
    calls: &mpsc::Sender<CniCall>,
) -> CniReply {
    let key = PodKey {
        namespace: request.namespace.clone(),
        name: request.name.clone(),
    };
    let started = std::time::Instant::now();
    // ADD and CHECK first ask whether the pod is in the mesh at all; DEL never does (it
    // removes whatever is there).
    let policy = if request.command == CniCommand::Del {
        None
    } else {
        let what = if request.command == CniCommand::Add {
            "ADD"
        } else {
            "CHECK"
        };
        match decide(&key, &request.uid, source).await {
            Ok(Membership::Mesh(policy)) => Some(*policy),
            Ok(Membership::Outside(reason)) => {
                log::debug!("CNI {what} pod {key}: not in the mesh ({reason})");
                return CniReply::NotInMesh { reason };
            }
            Ok(Membership::Invalid(e)) => {
                log::warn!("CNI {what} pod {key}: refused, it must not start uncaptured: {e}");
                return CniReply::Refused {
                    reason: format!("{e}; fix it and the pod starts (kubelet retries)"),
                };
            }
            Err(reason) => {
                log::warn!("CNI {what} pod {key}: {reason} (kubelet retries)");
                return CniReply::Unavailable { reason };
            }
        }
    };
    let (tx, rx) = oneshot::channel();
    let call = CniCall {
        request,
        key: key.clone(),
        policy,
        reply: tx,
        received: started,
    };
    if calls.send(call).await.is_err() {
        return CniReply::Unavailable {
            reason: "redirectd is shutting down".into(),
        };
    }
    let reply = match tokio::time::timeout(LOOP_TIMEOUT, rx).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(_)) => CniReply::Unavailable {
            reason: "redirectd dropped the call".into(),
        },
        Err(_) => CniReply::Unavailable {
            reason: format!("redirectd did not apply pod {key} within {LOOP_TIMEOUT:?}"),
        },
    };
    log::debug!(
        "CNI call for pod {key} answered in {:?}: {reply:?}",
        started.elapsed()
    );
    reply
}

/// Whether the pod is in the mesh: from the source, or from the API server when the pod
/// watch has not seen this pod (this uid) yet. `Err`: cannot tell now.
async fn decide(
    key: &PodKey,
    uid: &Option<String>,
    source: &watch::Receiver<Option<Published>>,
) -> Result<Membership, String> {
    let (known, fetcher) = {
        let current = source.borrow();
        let Some(published) = current.as_ref().filter(|p| p.complete) else {
            return Err("redirectd has not read its pod source yet".into());
        };
        let known = published
            .members
            .get(key)
            .filter(|m| uid.is_none() || m.uid.is_none() || m.uid == *uid)
            .cloned();
        (known, published.fetcher.clone())
    };
    if let Some(Member { membership, .. }) = known {
        return Ok(membership);
    }
    let Some(fetcher) = fetcher else {
        return Ok(Membership::Outside("not in the pods file".into()));
    };
    let fetched = tokio::time::timeout(FETCH_TIMEOUT, fetcher.member(key))
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "the API server did not answer about pod {key} within {FETCH_TIMEOUT:?}"
            ))
        });
    match fetched {
        Ok(None) => Ok(Membership::Outside("the API server has no such pod".into())),
        Ok(Some(m)) if uid.is_some() && m.uid.is_some() && m.uid != *uid => {
            Ok(Membership::Outside(format!(
                "the API server's pod {key} has uid {}, not this sandbox's {}: its pod was deleted",
                m.uid.unwrap_or_default(),
                uid.clone().unwrap_or_default()
            )))
        }
        Ok(Some(m)) => Ok(m.membership),
        Err(e) => Err(format!("{e:#}")),
    }
}
