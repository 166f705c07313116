//! The loop's end of the CNI plugin's socket: calls taken into the registry before a pass,
//! answered from what the pass left in the maps after it.

use anyhow::Result;
use redirect_common::cni::{CniCommand, CniReply};
use tokio::sync::{mpsc, watch};

use super::engine::Pass;
use crate::{
    cni::{self, CniCall, CniOptions, Registry},
    pods::{Desired, PodKey},
    sources::Published,
};

/// The loop's end of the CNI plugin's socket.
pub(super) struct CniLink {
    pub(super) registry: Registry,
    pub(super) calls: mpsc::Receiver<CniCall>,
}

impl CniLink {
    /// Reads the registrations a previous run left and starts serving the plugin.
    pub(super) fn start(
        opts: &CniOptions,
        source: watch::Receiver<Option<Published>>,
    ) -> Result<Self> {
        let registry = Registry::load(&opts.state_file)?;
        let (tx, calls) = mpsc::channel(256);
        let socket = opts.socket.clone();
        tokio::spawn(async move {
            if let Err(e) = cni::serve(&socket, source, tx).await {
                log::error!("{e:#}; the CNI plugin's ADD fails for mesh pods (they do not start) until redirectd is restarted");
            }
        });
        Ok(Self { registry, calls })
    }

    /// Every call waiting besides `calls`.
    pub(super) fn drain(&mut self, calls: &mut Vec<CniCall>) {
        while let Ok(call) = self.calls.try_recv() {
            calls.push(call);
        }
    }

    /// Takes the calls into the registry (answering at once those that are unusable, and
    /// keeping the rest in `calls` for after the pass); returns the desired set to serve.
    pub(super) fn desired(&mut self, calls: &mut Vec<CniCall>, current: &Published) -> Desired {
        for call in std::mem::take(calls) {
            match cni::take(&mut self.registry, &call) {
                None => calls.push(call),
                Some(reply) => {
                    let _ = call.reply.send(reply);
                }
            }
        }
        self.registry.overlay(current)
    }
}

/// The next CNI call, never if there is no CNI link.
pub(super) async fn next_call(link: &mut Option<CniLink>) -> Option<CniCall> {
    match link {
        Some(l) => l.calls.recv().await,
        None => std::future::pending().await,
    }
}

/// Where `key` stands after `pass`: its slot if the maps serve it, and what keeps it from
/// being captured, if anything (its namespace not found yet, a failure, a rejected
/// configuration that locks it).
pub(super) fn standing(key: &PodKey, pass: &Pass) -> (Option<u32>, Option<String>) {
    let applied = pass
        .applied
        .iter()
        .find(|a| &a.key == key)
        .map(|a| a.pod_id);
    let problem = if pass.unresolved.contains(key) {
        pass.pending.get(key).map(|why| format!("pod {key}: {why}"))
    } else if let Some((_, e)) = pass.report.failed.iter().find(|(k, _)| k == key) {
        Some(format!("pod {key}: {e}"))
    } else if let Some((_, e)) = pass.report.locked.iter().find(|(k, _)| k == key) {
        // Locked (its connections refused): the sandbox does not start.
        Some(format!("pod {key}: its configuration is rejected: {e}"))
    } else {
        None
    };
    (applied, problem)
}

/// Answers CNI calls after a pass, from what the pass left in the maps.
pub(super) fn answer_calls(calls: Vec<CniCall>, pass: &Pass) {
    for call in calls {
        let key = &call.key;
        let (applied, problem) = standing(key, pass);
        let reply = cni::outcome(&call, applied, problem);
        if call.request.command == CniCommand::Add {
            match &reply {
                CniReply::Captured { .. } => log::info!(
                    "pod {key}: captured at CNI ADD (sandbox {}); maps written {} µs after the plugin's request",
                    call.request.container_id,
                    call.received.elapsed().as_micros()
                ),
                other => log::warn!("pod {key}: CNI ADD not captured: {other:?}"),
            }
        }
        let _ = call.reply.send(reply);
    }
}

pub(super) fn answer_all(calls: Vec<CniCall>, reason: &str) {
    for call in calls {
        let _ = call.reply.send(CniReply::Unavailable {
            reason: reason.to_string(),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{daemon::engine::AppliedPod, reconcile::Report};

    fn key(name: &str) -> PodKey {
        PodKey::new("ns", name)
    }

    fn pass() -> Pass {
        let mut report = Report::default();
        report
            .failed
            .push((key("failed"), "writing its rules: E2BIG".into()));
        report.locked.push((key("locked"), "bad port \"x\"".into()));
        Pass {
            report,
            pending: BTreeMap::from([(key("waiting"), "netns /x: not found".into())]),
            unresolved: vec![key("waiting"), key("held")],
            netns: BTreeMap::new(),
            applied: vec![AppliedPod {
                key: key("served"),
                pod_id: 7,
                netns_cookie: 4096,
                counters: Default::default(),
            }],
            fill: Vec::new(),
            rule_maps: Vec::new(),
            inbound_insns: None,
        }
    }

    /// Each way a pod can stand after a pass gives the CNI plugin its answer: served (its
    /// slot), waiting for its namespace, failed, locked, held (unresolved without a reason of
    /// its own: its entry is unusable), unknown.
    #[test]
    fn where_a_pod_stands() {
        let p = pass();
        assert_eq!(standing(&key("served"), &p), (Some(7), None));
        assert_eq!(
            standing(&key("waiting"), &p),
            (None, Some("pod ns/waiting: netns /x: not found".into()))
        );
        assert_eq!(
            standing(&key("failed"), &p),
            (None, Some("pod ns/failed: writing its rules: E2BIG".into()))
        );
        assert_eq!(
            standing(&key("locked"), &p),
            (
                None,
                Some("pod ns/locked: its configuration is rejected: bad port \"x\"".into())
            )
        );
        assert_eq!(standing(&key("held"), &p), (None, None));
        assert_eq!(standing(&key("other"), &p), (None, None));
    }
}
