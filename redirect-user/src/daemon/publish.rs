//! Publishing a pass: the status file, the metrics snapshot, and the log lines an operator
//! acts on (what changed, what is wrong, which map is filling).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use redirect_common::{map_names, program_names};
use tokio::sync::watch;

use super::{engine::Pass, RunOptions};
use crate::{
    kernel::loader::ProgramReport,
    observe::metrics::{self, Snapshot},
    observe::status::{PodStatus, StatusFile, CONFIG_CURRENT},
    pods::{Desired, PodKey},
    reconcile::Report,
    sources::{Published, SourceStats},
};

/// Tells the operator and the metrics what each pass did.
pub(super) struct Publisher {
    pub(super) status: StatusFile,
    pub(super) status_file: PathBuf,
    pub(super) metrics: Option<watch::Sender<Arc<Snapshot>>>,
    pub(super) stats: Arc<SourceStats>,
    /// Problems already logged (each is logged when it appears).
    pub(super) last_problems: BTreeSet<String>,
    /// Maps already warned about as filling up.
    pub(super) map_warned: BTreeSet<&'static str>,
    pub(super) reconcile_errors: u64,
    /// How long the loop may go without turning before /healthz fails.
    pub(super) stall_after: Duration,
}

impl Publisher {
    pub(super) fn new(
        opts: &RunOptions,
        cgroup: &Path,
        programs: Vec<ProgramReport>,
        stats: Arc<SourceStats>,
    ) -> Self {
        Self {
            status: StatusFile {
                pid: std::process::id(),
                pods_file: opts.source.describe(),
                cgroup: cgroup.display().to_string(),
                pin_dir: opts.pin_dir.display().to_string(),
                programs,
                acceleration: opts.accel.reason.clone(),
                ..Default::default()
            },
            status_file: opts.status_file.clone(),
            metrics: serve_metrics(opts.metrics_addr),
            stats,
            last_problems: BTreeSet::new(),
            map_warned: BTreeSet::new(),
            reconcile_errors: 0,
            // The loop turns at least once per resync period; a pass may take a while.
            stall_after: (opts.resync * 3).max(Duration::from_secs(60)),
        }
    }

    /// The liveness part of a snapshot, as of now.
    pub(super) fn liveness(&self) -> Snapshot {
        Snapshot {
            heartbeat: Some(std::time::Instant::now()),
            stall_after: self.stall_after,
            source_stopped: self.stats.stopped.lock().ok().and_then(|s| s.clone()),
            ..Snapshot::default()
        }
    }

    /// The loop went round (with or without a pass): /healthz sees it.
    pub(super) fn heartbeat(&self) {
        let Some(tx) = &self.metrics else {
            return;
        };
        let live = self.liveness();
        tx.send_modify(|s| {
            *s = Arc::new(Snapshot {
                heartbeat: live.heartbeat,
                stall_after: live.stall_after,
                source_stopped: live.source_stopped,
                ..(**s).clone()
            })
        });
    }

    /// The source has no usable desired set yet: only the status says so.
    pub(super) fn source_unusable(&mut self, published: &Published) {
        self.status.file_error = published.source_error.clone();
        if let Err(e) = self.status.write(&self.status_file) {
            log::error!("{e:#}");
        }
    }

    pub(super) fn publish(&mut self, published: &Published, pass: Pass) {
        let desired = &published.desired;
        let report = &pass.report;
        log_changes(report);
        let config = config_in_force(report);
        let problems = problems(desired, report, &pass.pending);
        let problem_set: BTreeSet<String> = problems.iter().cloned().collect();
        for p in problem_set.difference(&self.last_problems) {
            log::warn!("{p}");
        }
        self.last_problems = problem_set;
        for w in &desired.warnings {
            if !self.status.warnings.contains(w) {
                log::warn!("{w}");
            }
        }
        self.reconcile_errors += report.failed.len() as u64;
        warn_if_filling(&pass.fill, &mut self.map_warned);

        let live = self.liveness();
        let status = &mut self.status;
        status.rejected = problems;
        status.warnings = desired.warnings.clone();
        status.file_error = published.source_error.clone();
        status.rule_maps = pass
            .rule_maps
            .iter()
            .map(
                |&(map, entries, capacity)| crate::observe::status::MapFill {
                    map: map.into(),
                    entries,
                    capacity,
                },
            )
            .collect();
        status.pods = pass
            .applied
            .iter()
            .map(|a| PodStatus {
                namespace: a.key.namespace.clone(),
                name: a.key.name.clone(),
                netns: pass.netns.get(&a.key).cloned().unwrap_or_default(),
                pod_id: a.pod_id,
                netns_cookie: a.netns_cookie,
                config: config
                    .get(&a.key)
                    .cloned()
                    .unwrap_or_else(|| CONFIG_CURRENT.into()),
            })
            .collect();
        if let Some(insns) = pass.inbound_insns {
            status
                .programs
                .retain(|p| p.name != program_names::SK_LOOKUP);
            status.programs.push(ProgramReport {
                name: program_names::SK_LOOKUP.into(),
                hook: "sk_lookup (per pod)".into(),
                verified_insns: Some(insns),
                id: 0,
            });
        }
        if let Some(tx) = &self.metrics {
            tx.send_replace(Arc::new(Snapshot {
                ready: true,
                config_rejected: status
                    .pods
                    .iter()
                    .map(|p| (p.namespace.clone(), p.name.clone(), p.config_rejected()))
                    .collect(),
                pods: pass
                    .applied
                    .into_iter()
                    .map(|a| (a.key.namespace, a.key.name, a.counters))
                    .collect(),
                rejected_pods: status.rejected.len(),
                reconcile_errors: self.reconcile_errors,
                watch_restarts: self.stats.watch_restarts.load(Ordering::Relaxed),
                maps: pass.fill.into_iter().chain(pass.rule_maps).collect(),
                ..live
            }));
        }
        if let Err(e) = status.write(&self.status_file) {
            log::error!("{e:#}");
        }
    }
}

/// Logs what a pass changed in the maps.
pub(super) fn log_changes(report: &Report) {
    for k in &report.added {
        log::info!("pod {k}: in the mesh (outbound and inbound capture on)");
    }
    for k in &report.adopted {
        log::info!("pod {k}: taken over from the previous run unchanged");
    }
    for k in &report.updated {
        log::info!("pod {k}: configuration updated");
    }
    for k in &report.removed {
        log::info!("pod {k}: removed from the mesh");
    }
    for e in &report.cleanup_errors {
        log::error!("{e}");
    }
}

/// For each pod whose current configuration was rejected, which one is in force and why.
pub(super) fn config_in_force(report: &Report) -> BTreeMap<&PodKey, String> {
    let mut config = BTreeMap::new();
    for (k, why) in &report.kept {
        config.insert(k, format!("last good kept: {why}"));
    }
    for (k, why) in &report.locked {
        config.insert(k, format!("locked, connections refused: {why}"));
    }
    config
}

/// Everything an operator should act on after a pass, one line each.
pub(super) fn problems(
    desired: &Desired,
    report: &Report,
    pending: &BTreeMap<PodKey, String>,
) -> Vec<String> {
    let mut problems: Vec<String> = desired.rejected.iter().map(ToString::to_string).collect();
    problems.extend(report.kept.iter().map(|(k, _)| {
        format!("pod {k}: its new configuration is rejected; its last good configuration stays in force until the entry is fixed")
    }));
    problems.extend(report.locked.iter().map(|(k, _)| {
        format!("pod {k}: its configuration is rejected and it was never served: its connections are refused until the entry is fixed")
    }));
    problems.extend(pending.iter().map(|(k, why)| format!("pod {k}: {why}")));
    problems.extend(report.failed.iter().map(|(k, e)| format!("pod {k}: {e}")));
    problems
}

/// Warns (once per crossing) when a connection map passes 80 % of its capacity: near full,
/// the LRU maps start evicting entries of live connections.
pub(super) fn warn_if_filling(
    fill: &[(&'static str, usize, u32)],
    warned: &mut BTreeSet<&'static str>,
) {
    for &(name, n, cap) in fill {
        if cap == 0 || (n as u64) * 100 < u64::from(cap) * 80 {
            warned.remove(name);
            continue;
        }
        if warned.insert(name) {
            let consequence = if name == map_names::SOCK_PAIRS {
                "when it is full, new proxy connections are not spliced (they take the normal path)"
            } else {
                "when it is full, the oldest entries of open connections are evicted (counted as orig_dst_evicted); raise --orig-dst-map-size"
            };
            log::warn!(
                "map {name} is {}% full ({n} of {cap} entries); {consequence}",
                n as u64 * 100 / u64::from(cap)
            );
        }
    }
}

/// Starts the metrics server, if asked for; returns the channel its snapshots go on.
pub(super) fn serve_metrics(
    addr: Option<std::net::SocketAddr>,
) -> Option<watch::Sender<Arc<Snapshot>>> {
    let addr = addr?;
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    tokio::spawn(async move {
        if let Err(e) = metrics::serve(addr, rx).await {
            log::error!("{e:#}; metrics, /healthz and /readyz are not served");
        }
    });
    Some(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> PodKey {
        PodKey::new("ns", name)
    }

    /// Every kind of problem a pass can leave is one line naming the pod.
    #[test]
    fn problems_name_each_pod() {
        let mut report = Report::default();
        report.kept.push((key("kept"), "bad".into()));
        report.locked.push((key("locked"), "bad".into()));
        report.failed.push((key("failed"), "E2BIG".into()));
        let pending = BTreeMap::from([(key("waiting"), "netns /x: not found".into())]);
        let lines = problems(&Desired::default(), &report, &pending);
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(lines[0].starts_with("pod ns/kept: its new configuration is rejected"));
        assert!(lines[1]
            .starts_with("pod ns/locked: its configuration is rejected and it was never served"));
        assert_eq!(lines[2], "pod ns/waiting: netns /x: not found");
        assert_eq!(lines[3], "pod ns/failed: E2BIG");
    }

    /// A map is warned about once when it passes 80 % of its capacity, again only after it
    /// went below; an unknown capacity (0) is never warned about.
    #[test]
    fn filling_maps_are_warned_about_once_per_crossing() {
        let mut warned = BTreeSet::new();
        warn_if_filling(&[("A", 79, 100), ("B", 80, 100), ("C", 5, 0)], &mut warned);
        assert_eq!(warned, BTreeSet::from(["B"]));
        warn_if_filling(&[("A", 90, 100), ("B", 95, 100)], &mut warned);
        assert_eq!(warned, BTreeSet::from(["A", "B"]));
        warn_if_filling(&[("A", 10, 100), ("B", 95, 100)], &mut warned);
        assert_eq!(warned, BTreeSet::from(["B"]));
    }
}
