//! `redirectd run`: load and attach, then keep the maps in step with the pods file.
//!
//! Flow (one way): the pods file source produces the desired set; netns resolution turns each
//! pod into a netns cookie; the reconciler applies the difference through the datapath layer.
//! This task owns the loaded object and the maps; the log pump runs beside it.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::atomic::AtomicU64,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya_log::EbpfLogger;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use crate::{
    datapath::Datapath,
    kube_source::{self, KubeOptions},
    loader::{self, LoadOptions, ProgramReport},
    metrics::{self, Snapshot},
    mounts, netns,
    pods::{self, Desired},
    probe,
    reconcile::{NodeSettings, Reconciler, Resolved},
    status::{PodStatus, StatusFile},
};

/// Where the desired pods come from.
pub enum PodSource {
    /// A YAML pods file, followed while running.
    File(PathBuf),
    /// The Kubernetes API server (this node's pods).
    Kubernetes(KubeOptions),
}

/// Everything `run` needs.
pub struct RunOptions {
    pub source: PodSource,
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub status_file: PathBuf,
    pub node: NodeSettings,
    /// How often the pods file is checked for changes.
    pub poll: Duration,
    /// Same-node acceleration (sockmap).
    pub accel: bool,
    /// Where to serve /metrics, /healthz and /readyz.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How often every pod's netns is resolved again (pods whose netns was missing are retried).
    pub resync: Duration,
    /// Capacity of each original-destination map (live captured connections it can hold).
    pub orig_dst_map_size: u32,
}

fn kernel_log_level() -> u8 {
    // aya-log levels: 1 error, 2 warn, 3 info, 4 debug, 5 trace.
    match log::max_level() {
        log::LevelFilter::Off => 0,
        log::LevelFilter::Error => 1,
        log::LevelFilter::Warn => 2,
        log::LevelFilter::Info => 3,
        log::LevelFilter::Debug => 4,
        log::LevelFilter::Trace => 5,
    }
}

/// Forwards kernel aya-log records into the daemon's log for as long as the daemon runs.
async fn pump_logs(logger: EbpfLogger<&'static dyn log::Log>) {
    // Safety: the logger owns its ring buffer fd for as long as the AsyncFd lives.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("kernel log records will not be shown: {e}");
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                log::error!("kernel log pump stopped: {e}");
                return;
            }
        }
    }
}

fn check_cgroup(path: &Path) -> Result<()> {
    if !path.join("cgroup.procs").exists() {
        anyhow::bail!(
            "{} is not a cgroup v2 directory (no cgroup.procs); pass --cgroup a directory of the cgroup v2 mount",
            path.display()
        );
    }
    Ok(())
}

/// Resolves every desired pod's netns; pods whose netns is missing are returned as errors.
fn resolve(desired: &Desired) -> (Vec<Resolved>, Vec<String>) {
    let mut resolved = Vec::new();
    let mut pending = Vec::new();
    for spec in &desired.pods {
        let cookie = netns::open(&spec.netns).and_then(|f| netns::cookie(&f));
        match cookie {
            Ok(netns_cookie) => resolved.push(Resolved {
                spec: spec.clone(),
                netns_cookie,
            }),
            Err(e) => pending.push(format!(
                "pod {}: netns {}: {e:#} (retrying)",
                spec.key, spec.netns
            )),
        }
    }
    (resolved, pending)
}

/// Warns (once per crossing) when a connection map passes 80 % of its capacity: near full,
/// the LRU maps start evicting entries of live connections.
fn warn_if_filling(fill: &[(&'static str, usize, u32)], warned: &mut BTreeSet<&'static str>) {
    for &(name, n, cap) in fill {
        if cap > 0 && n as u64 * 100 >= u64::from(cap) * 80 {
            if warned.insert(name) {
                let consequence = if name == redirect_common::map_names::SOCK_PAIRS {
                    "when it is full, new proxy connections are not spliced (they take the normal path)"
                } else {
                    "when it is full, the oldest entries of open connections are evicted (counted as orig_dst_evicted); raise --orig-dst-map-size"
                };
                log::warn!(
                    "map {name} is {}% full ({n} of {cap} entries); {consequence}",
                    n as u64 * 100 / u64::from(cap)
                );
            }
        } else {
            warned.remove(name);
        }
    }
}

/// Resolves when the Kubernetes source published a new desired set; never without one.
async fn source_changed(rx: &mut Option<tokio::sync::watch::Receiver<Option<Desired>>>) {
    match rx {
        Some(r) => {
            if r.changed().await.is_err() {
                // The source task ended (and said why); keep serving what we have.
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// The metrics snapshot after a pass.
fn snapshot(
    datapath: &Datapath,
    fill: Vec<(&'static str, usize, u32)>,
    status: &StatusFile,
    reconcile_errors: u64,
    watch_restarts: u64,
) -> Snapshot {
    let pods = status
        .pods
        .iter()
        .map(|p| {
            let c = datapath.counters(p.pod_id).unwrap_or_default();
            (p.namespace.clone(), p.name.clone(), c)
        })
        .collect();
    Snapshot {
        ready: true,
        pods,
        rejected_pods: status.rejected.len(),
        reconcile_errors,
        watch_restarts,
        maps: fill,
    }
}

/// Runs until SIGTERM or SIGINT. Programs and maps stay pinned after exit so traffic keeps
/// flowing; the next `run` takes over, `uninstall` removes them.
pub async fn run(opts: RunOptions) -> Result<()> {
    let cgroup = match &opts.cgroup {
        Some(c) => c.clone(),
        None => mounts::cgroup2_root()?,
    };
    check_cgroup(&cgroup)?;
    if let Some(msg) = probe::missing(&probe::run()) {
        anyhow::bail!(msg);
    }
    let mut loaded = loader::load_and_attach(&LoadOptions {
        pin_dir: &opts.pin_dir,
        cgroup: &cgroup,
        kernel_log_level: kernel_log_level(),
        inbound_port: opts.node.inbound_port,
        outbound_port: opts.node.outbound_port,
        accel: opts.accel,
        orig_dst_map_size: opts.orig_dst_map_size,
    })?;
    match EbpfLogger::init(&mut loaded.ebpf) {
        Ok(logger) => {
            tokio::spawn(pump_logs(logger));
        }
        Err(e) => log::warn!("kernel log records will not be shown: {e}"),
    }
    let mut datapath = Datapath::from_ebpf(
        &mut loaded.ebpf,
        &opts.pin_dir,
        opts.node.inbound_port,
        opts.node.outbound_port,
    )?;
    for (name, cap) in datapath.orig_dst_capacities() {
        if cap != opts.orig_dst_map_size {
            log::warn!(
                "map {name} holds {cap} entries, not the {} of --orig-dst-map-size: it was pinned by an earlier run and is kept (resizing it would forget every open connection's destination); `redirectd uninstall` and start again to resize",
                opts.orig_dst_map_size
            );
        }
    }
    let mut reconciler = Reconciler::new(opts.node.clone());
    let previous = datapath.mesh_pods()?;
    reconciler.take_over(previous.iter().copied());
    if !previous.is_empty() {
        log::info!(
            "found {} pods of a previous run in the maps; taking over",
            previous.len()
        );
    }

    let mut status = StatusFile {
        pid: std::process::id(),
        pods_file: match &opts.source {
            PodSource::File(p) => p.display().to_string(),
            PodSource::Kubernetes(k) => format!("kubernetes (node {})", k.node_name),
        },
        cgroup: cgroup.display().to_string(),
        pin_dir: opts.pin_dir.display().to_string(),
        programs: loaded.programs.clone(),
        ..Default::default()
    };
    let mut last_bytes: Option<Vec<u8>> = None;
    let mut desired = Desired::default();
    let mut last_resync = Instant::now();
    let mut first_pass = true;
    let mut last_problems: BTreeSet<String> = BTreeSet::new();

    let (metrics_tx, metrics_rx) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
    if let Some(addr) = opts.metrics_addr {
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, metrics_rx).await {
                log::error!("{e:#}; metrics, /healthz and /readyz are not served");
            }
        });
    }
    let mut reconcile_errors = 0u64;
    let mut map_warned = BTreeSet::new();

    let watch_restarts = Arc::new(AtomicU64::new(0));
    let (file, mut kube_rx) = match opts.source {
        PodSource::File(path) => (Some(path), None),
        PodSource::Kubernetes(k) => {
            let (tx, rx) = tokio::sync::watch::channel(None);
            let restarts = watch_restarts.clone();
            tokio::spawn(async move {
                if let Err(e) = kube_source::run(k, tx, restarts).await {
                    log::error!("Kubernetes pod source stopped: {e:#}");
                }
            });
            (None, Some(rx))
        }
    };
    // No first pass (and no sweep of a previous run's entries) before the source has given
    // its first full desired set: a file is read at once, Kubernetes after its first list.
    let mut have_desired = file.is_some();

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut tick = tokio::time::interval(opts.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    log::info!(
        "serving pods from {} (cgroup {}, pins {})",
        status.pods_file,
        cgroup.display(),
        opts.pin_dir.display()
    );
    loop {
        let mut kube_event = false;
        tokio::select! {
            _ = tick.tick() => {}
            _ = source_changed(&mut kube_rx) => kube_event = true,
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        let mut changed = first_pass && have_desired;
        if let Some(rx) = kube_rx.as_mut() {
            if kube_event || rx.has_changed().unwrap_or(false) {
                if let Some(d) = rx.borrow_and_update().clone() {
                    desired = d;
                    have_desired = true;
                    changed = true;
                }
            }
        }
        if !have_desired {
            continue;
        }
        let file_read = match &file {
            Some(path) => std::fs::read(path).map(Some),
            None => Ok(None),
        };
        let pods_file = file.as_deref().unwrap_or(Path::new("-"));
        match file_read {
            Ok(None) => {}
            Ok(Some(bytes)) if last_bytes.as_deref() != Some(bytes.as_slice()) => {
                match pods::parse_file(&bytes) {
                    Ok(d) => {
                        desired = d;
                        status.file_error = None;
                    }
                    Err(e) => {
                        let msg = format!("pods file {}: {e}", pods_file.display());
                        if status.file_error.as_deref() != Some(msg.as_str()) {
                            log::error!("{msg}; still serving its last good version");
                        }
                        status.file_error = Some(msg);
                    }
                }
                last_bytes = Some(bytes);
                changed = true;
            }
            Ok(Some(_)) => {}
            Err(e) => {
                let msg = format!("pods file {}: {e}", pods_file.display());
                if status.file_error.as_deref() != Some(msg.as_str()) {
                    log::error!("{msg}; still serving its last good version");
                    status.file_error = Some(msg);
                }
                last_bytes = None;
            }
        }
        if !changed && last_resync.elapsed() < opts.resync {
            continue;
        }
        last_resync = Instant::now();

        let (resolved, pending) = resolve(&desired);
        let report = reconciler.reconcile(&resolved, &mut datapath);
        if first_pass {
            let cookies = reconciler
                .applied()
                .values()
                .map(|a| a.netns_cookie)
                .collect();
            let ids = reconciler.applied().values().map(|a| a.pod_id).collect();
            match datapath.sweep(&cookies, &ids) {
                Ok(0) => {}
                Ok(n) => log::info!("removed {n} map entries a previous run left"),
                Err(e) => log::error!("sweeping entries of a previous run: {e:#}"),
            }
            reconciler.release_reserved();
            first_pass = false;
        }
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
        let mut problems: Vec<String> = desired.rejected.iter().map(ToString::to_string).collect();
        problems.extend(pending);
        problems.extend(report.failed.iter().map(|(k, e)| format!("pod {k}: {e}")));
        let problem_set: BTreeSet<String> = problems.iter().cloned().collect();
        for p in problem_set.difference(&last_problems) {
            log::warn!("{p}");
        }
        for w in &desired.warnings {
            if !status.warnings.contains(w) {
                log::warn!("{w}");
            }
        }
        last_problems = problem_set;
        status.rejected = problems;
        status.warnings = desired.warnings.clone();
        status.pods = reconciler
            .applied()
            .iter()
            .map(|(k, a)| PodStatus {
                namespace: k.namespace.clone(),
                name: k.name.clone(),
                netns: desired
                    .pods
                    .iter()
                    .find(|p| &p.key == k)
                    .map(|p| netns::describe(&p.netns))
                    .unwrap_or_default(),
                pod_id: a.pod_id,
                netns_cookie: a.netns_cookie,
            })
            .collect();
        if let Some(insns) = datapath.inbound_insns.take() {
            status.programs.retain(|p| p.name != "rd_sk_lookup");
            status.programs.push(ProgramReport {
                name: "rd_sk_lookup".into(),
                hook: "sk_lookup (per pod)".into(),
                verified_insns: Some(insns),
                id: 0,
            });
        }
        reconcile_errors += report.failed.len() as u64;
        let fill = datapath.fill();
        warn_if_filling(&fill, &mut map_warned);
        if opts.metrics_addr.is_some() {
            let snapshot = snapshot(
                &datapath,
                fill,
                &status,
                reconcile_errors,
                watch_restarts.load(std::sync::atomic::Ordering::Relaxed),
            );
            metrics_tx.send_replace(Arc::new(snapshot));
        }
        if let Err(e) = status.write(&opts.status_file) {
            log::error!("{e:#}");
        }
    }
    log::info!(
        "exiting; programs stay attached and pinned under {} (the next `redirectd run` takes over; `redirectd uninstall` removes them)",
        opts.pin_dir.display()
    );
    Ok(())
}
