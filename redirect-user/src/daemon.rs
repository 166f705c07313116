//! `redirectd run`: load and attach, then keep the maps in step with the pod source.
//!
//! The loop reads as the design: **select** (the source published, the resync tick, a
//! signal) → **resolve** each desired pod's network namespace → **reconcile** the maps →
//! **publish** status and metrics. Resolving and reconciling block (they read `/proc`, enter
//! namespaces and make `bpf(2)` calls), so they run on a blocking thread with the `Engine`
//! that owns the maps; this task only waits and publishes. The log pump and the metrics
//! server run beside it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya_log::EbpfLogger;
use redirect_common::{
    cni::{CniCommand, CniReply},
    map_names, PodCounters,
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};

use crate::{
    annotations::CapturePolicy,
    cni::{self, CniCall, CniOptions, Registry},
    datapath::Datapath,
    loader::{self, LoadOptions, ProgramReport},
    metrics::{self, Snapshot},
    mounts,
    netns::Resolver,
    pods::{Desired, PodKey, PodSpec},
    probe,
    reconcile::{NodeSettings, Reconciler, Report, Resolved},
    sources::{self, PodSource, Published, SourceStats},
    status::{PodStatus, StatusFile, CONFIG_CURRENT},
};

/// Everything `run` needs.
pub struct RunOptions {
    pub source: PodSource,
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub status_file: PathBuf,
    pub node: NodeSettings,
    /// How often the pods file is checked for changes.
    pub poll: Duration,
    /// Same-node acceleration (sockmap), and why ("on: ..." or "off: ..."), for the log and
    /// the status.
    pub accel: crate::splice_check::Decision,
    /// Where to serve /metrics, /healthz and /readyz.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How often every pod's netns is resolved again (pods whose netns was missing are retried).
    pub resync: Duration,
    /// Capacity of each original-destination map (live captured connections it can hold).
    pub orig_dst_map_size: u32,
    /// The namespace whose routes lead to the pods (Kubernetes); `None`: the daemon's own.
    pub node_netns: Option<PathBuf>,
    /// The kernel's `net` sysctls (`/proc/sys/net` or a host mount of it), for TPROXY pods.
    pub proc_sys_net: PathBuf,
    /// Serve the chained CNI plugin (pods registered at sandbox creation).
    pub cni: Option<CniOptions>,
    /// The system-call filter, installed once the programs are loaded and pinned.
    pub seccomp: crate::seccomp::Mode,
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
    // SAFETY: the logger owns its ring buffer fd and the AsyncFd owns the logger, so the fd
    // stays open for as long as it is registered.
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
    let magic = mounts::fs_type(path)
        .with_context(|| format!("--cgroup {}: cannot read it", path.display()))?;
    if magic != mounts::CGROUP2_SUPER_MAGIC {
        anyhow::bail!(
            "--cgroup {}: not a cgroup v2 directory (its filesystem is {}); cgroup v1 cannot hold the socket programs: pass a directory of the cgroup v2 mount ({})",
            path.display(),
            if magic == mounts::CGROUP_SUPER_MAGIC { "cgroup v1".to_string() } else { format!("type {magic:#x}") },
            crate::mounts::cgroup2_root().map_or_else(|e| format!("none found: {e:#}"), |p| p.display().to_string())
        );
    }
    if !path.join("cgroup.procs").exists() {
        anyhow::bail!(
            "{} is not a cgroup v2 directory (no cgroup.procs); pass --cgroup a directory of the cgroup v2 mount",
            path.display()
        );
    }
    Ok(())
}

/// What one pass did, for the loop to publish.
struct Pass {
    report: Report,
    /// Desired pods whose namespace was not found yet, with the reason (retried).
    pending: Vec<String>,
    /// Those pods.
    unresolved: Vec<PodKey>,
    /// How each applied pod's namespace was found, for status.
    netns: BTreeMap<PodKey, String>,
    /// Every applied pod with its slot, cookie and counters (zero unless metrics are served).
    applied: Vec<(PodKey, u32, u64, PodCounters)>,
    /// `(map, entries, capacity)` of the connection maps.
    fill: Vec<(&'static str, usize, u32)>,
    /// `(map, entries, capacity)` of the shared rule maps.
    rule_maps: Vec<(&'static str, usize, u32)>,
    /// Verifier instruction count of the per-pod program, when one was loaded.
    inbound_insns: Option<u32>,
}

/// Every desired pod, resolved or not.
#[derive(Default)]
struct Resolution {
    resolved: Vec<Resolved>,
    /// Desired pods whose namespace is not found for now.
    unresolved: Vec<PodKey>,
    /// Why, for each of those.
    pending: Vec<String>,
    /// How each resolved pod's namespace was found.
    netns: BTreeMap<PodKey, String>,
}

/// Owns the maps, the reconciler's record and the netns resolver. Only its methods touch
/// the kernel; each may block.
struct Engine {
    datapath: Datapath,
    reconciler: Reconciler,
    resolver: Resolver,
    /// Whether what a previous run left and no pod owns was swept (once, after start, when
    /// every desired pod was found).
    swept: bool,
    started: std::time::Instant,
    /// Whether each pass reads the pods' counters (only the metrics show them).
    read_counters: bool,
    /// The node's proxy uid and gid, for pods that do not say (translated for a
    /// user-namespaced pod).
    proxy_ids: (u32, u32),
    /// The kernel's `net` sysctls, for TPROXY pods' accept mark.
    proc_sys_net: PathBuf,
    /// The proxy's outbound port, whose listeners VM pods need transparent.
    outbound_port: u16,
}

/// How long after start a previous run's entries wait for pods whose namespace is not found
/// before they are swept all the same.
const SWEEP_GRACE: Duration = Duration::from_secs(60);

impl Engine {
    /// Resolves, reconciles and reads back what the loop publishes.
    fn pass(&mut self, desired: &Desired) -> Pass {
        let Resolution {
            resolved,
            mut unresolved,
            pending,
            netns,
        } = self.resolve(desired);
        // Pods whose entry is unusable keep what is applied for them, as unresolved ones do.
        for (key, _) in &desired.held {
            if !unresolved.contains(key) {
                unresolved.push(key.clone());
            }
        }
        let mut report = self
            .reconciler
            .reconcile(&resolved, &unresolved, &mut self.datapath);
        for (key, e) in &desired.held {
            if self.reconciler.applied().contains_key(key) {
                report
                    .kept
                    .push((key.clone(), format!("{}: {}", e.field, e.reason)));
            }
        }
        // What a previous run left is swept once every desired pod was found (a pod whose
        // namespace is not found yet may own some of those entries), or, at the latest,
        // SWEEP_GRACE after start (a pod listed but gone must not hold slots for ever).
        if !self.swept && (unresolved.is_empty() || self.started.elapsed() >= SWEEP_GRACE) {
            self.sweep_previous_run();
            self.swept = true;
        }
        let applied = self
            .reconciler
            .applied()
            .iter()
            .map(|(k, a)| {
                let c = if self.read_counters {
                    self.datapath.counters(a.pod_id).unwrap_or_default()
                } else {
                    PodCounters::default()
                };
                (k.clone(), a.pod_id, a.netns_cookie, c)
            })
            .collect();
        Pass {
            report,
            pending,
            unresolved,
            netns,
            applied,
            fill: self.datapath.fill(),
            rule_maps: self.reconciler.rule_maps(),
            inbound_insns: self.datapath.inbound_insns.take(),
        }
    }

    /// Finds every desired pod's network namespace, valid or not (a pod whose configuration
    /// was rejected is still known, and is kept captured or locked).
    fn resolve(&mut self, desired: &Desired) -> Resolution {
        let mut out = Resolution::default();
        let valid = desired.pods.iter().map(|p| (p, None));
        let invalid = desired.invalid.iter().map(|p| {
            let spec = PodSpec {
                key: p.key.clone(),
                netns: p.netns.clone(),
                ips: p.ips.clone(),
                policy: CapturePolicy::default(),
            };
            (spec, Some(p.error.to_string()))
        });
        let all: Vec<(PodSpec, Option<String>)> =
            valid.map(|(p, r)| (p.clone(), r)).chain(invalid).collect();
        for (spec, rejected) in all {
            let found = self.resolver.resolve(&spec.netns).and_then(|found| {
                let spec = self.host_view(spec.clone(), &found.path)?;
                Ok((found, spec))
            });
            match found {
                Ok((found, spec)) => {
                    out.netns.insert(spec.key.clone(), found.description);
                    out.resolved.push(Resolved {
                        spec,
                        netns_cookie: found.cookie,
                        netns_path: found.path,
                        rejected,
                    });
                }
                Err(e) => {
                    out.pending.push(format!(
                        "pod {}: netns {}: {e:#} (retrying; what is applied for it stays)",
                        spec.key, spec.netns
                    ));
                    out.unresolved.push(spec.key);
                }
            }
        }
        out
    }

    /// `spec` as the kernel sees it: what its namespace says or needs ([`Self::namespace_view`]);
    /// for a pod in a user namespace of its own (`hostUsers: false`), its proxy's ids and owner
    /// groups translated to host ids through the pod's id maps. A pod whose namespace or maps
    /// cannot be read yet, or lack the proxy's id, is retried (what is applied for it stays; a
    /// new one is not served, never served with the wrong uid).
    fn host_view(&self, mut spec: PodSpec, netns: &std::path::Path) -> Result<PodSpec> {
        self.namespace_view(&mut spec, netns)?;
        if let Some(ids) = crate::userns::of_netns(netns).context("its user namespace")? {
            let (uid, gid) = self.proxy_ids;
            spec.policy = crate::userns::translate(&spec.policy, &ids, uid, gid)
                .with_context(|| format!("its user namespace (ids read from pid {})", ids.pid))?;
        }
        Ok(spec)
    }

    /// What the pod's namespace says or needs, through one rtnetlink socket bound there: its
    /// excluded interfaces' routes and addresses, its VM interfaces' indexes (their TCP routed
    /// to the proxy), TPROXY's routing (each made sure of, idempotently).
    fn namespace_view(&self, spec: &mut PodSpec, netns: &std::path::Path) -> Result<()> {
        let p = &mut spec.policy;
        let by_name = !p.exclude_interfaces.is_empty() || !p.vm_interfaces.is_empty();
        if !by_name && !p.tproxy {
            return Ok(());
        }
        let ns =
            std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let mut rtnl = crate::rtnl::Rtnl::open_in(&ns)?;
        let links = if by_name { rtnl.links()? } else { Vec::new() };
        if !p.exclude_interfaces.is_empty() {
            let view = crate::interfaces::read(&mut rtnl, &links, &p.exclude_interfaces)
                .context("reading its excluded interfaces")?;
            p.interfaces = Some(view);
        }
        if !p.vm_interfaces.is_empty() {
            let (names, port) = (&p.vm_interfaces, self.outbound_port);
            let vm = crate::vm_ifaces::prepare(&ns, &mut rtnl, &links, names, port)
                .context("routing its VM interfaces to the proxy")?;
            if !vm.added.is_empty() {
                let added = vm.added.join(", ");
                log::info!("pod {}: VM interfaces set up: {added}", spec.key);
            }
            p.vm_ifindexes = vm.ifindexes;
        }
        if p.tproxy {
            let added = crate::tproxy::prepare(&ns, &mut rtnl, &self.proc_sys_net)
                .context("setting up TPROXY's policy routing in its namespace")?;
            if !added.is_empty() {
                log::info!("pod {}: TPROXY set up: {}", spec.key, added.join(", "));
            }
        }
        Ok(())
    }

    /// Removes map entries and inbound links that no applied pod owns, then lets slots the
    /// previous run used and nobody adopted be reused.
    fn sweep_previous_run(&mut self) {
        let applied = self.reconciler.applied();
        let cookies = applied.values().map(|a| a.netns_cookie).collect();
        let ids = applied.values().map(|a| a.pod_id).collect();
        match self.datapath.sweep(&cookies, &ids) {
            Ok(0) => {}
            Ok(n) => log::info!("removed {n} map entries a previous run left"),
            Err(e) => log::error!("sweeping entries of a previous run: {e:#}"),
        }
        self.reconciler.release_reserved();
    }
}

/// Loads and attaches the programs, and takes over the maps and pods a previous run left.
fn start(opts: &RunOptions, cgroup: &Path) -> Result<(Engine, Vec<ProgramReport>)> {
    log::info!("same-node acceleration {}", opts.accel.reason);
    let mut loaded = loader::load_and_attach(&LoadOptions {
        pin_dir: &opts.pin_dir,
        cgroup,
        kernel_log_level: kernel_log_level(),
        inbound_port: opts.node.inbound_port,
        outbound_port: opts.node.outbound_port,
        accel: opts.accel.on,
        ulp_ops_offset: opts.accel.ulp_ops_offset,
        orig_dst_map_size: opts.orig_dst_map_size,
    })?;
    match EbpfLogger::init(&mut loaded.ebpf) {
        Ok(logger) => {
            tokio::spawn(pump_logs(logger));
        }
        Err(e) => log::warn!("kernel log records will not be shown: {e}"),
    }
    let datapath = Datapath::from_ebpf(
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
    if !previous.is_empty() {
        log::info!(
            "found {} pods of a previous run in the maps; taking over",
            previous.len()
        );
    }
    reconciler.take_over(previous);
    let engine = Engine {
        datapath,
        reconciler,
        resolver: Resolver::new(opts.node_netns.clone())?,
        swept: false,
        started: std::time::Instant::now(),
        read_counters: opts.metrics_addr.is_some(),
        proxy_ids: (opts.node.proxy_uid, opts.node.proxy_gid),
        proc_sys_net: opts.proc_sys_net.clone(),
        outbound_port: opts.node.outbound_port,
    };
    Ok((engine, loaded.programs))
}

/// Tells the operator and the metrics what each pass did.
struct Publisher {
    status: StatusFile,
    status_file: PathBuf,
    metrics: Option<watch::Sender<Arc<Snapshot>>>,
    stats: Arc<SourceStats>,
    /// Problems already logged (each is logged when it appears).
    last_problems: BTreeSet<String>,
    /// Maps already warned about as filling up.
    map_warned: BTreeSet<&'static str>,
    reconcile_errors: u64,
    /// How long the loop may go without turning before /healthz fails.
    stall_after: Duration,
}

impl Publisher {
    fn new(
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
    fn liveness(&self) -> Snapshot {
        Snapshot {
            heartbeat: Some(std::time::Instant::now()),
            stall_after: self.stall_after,
            source_stopped: self.stats.stopped.lock().ok().and_then(|s| s.clone()),
            ..Snapshot::default()
        }
    }

    /// The loop went round (with or without a pass): /healthz sees it.
    fn heartbeat(&self) {
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
    fn source_unusable(&mut self, published: &Published) {
        self.status.file_error = published.source_error.clone();
        if let Err(e) = self.status.write(&self.status_file) {
            log::error!("{e:#}");
        }
    }

    fn publish(&mut self, published: &Published, pass: Pass) {
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
            .map(|&(map, entries, capacity)| crate::status::MapFill {
                map: map.into(),
                entries,
                capacity,
            })
            .collect();
        status.pods = pass
            .applied
            .iter()
            .map(|(k, pod_id, netns_cookie, _)| PodStatus {
                namespace: k.namespace.clone(),
                name: k.name.clone(),
                netns: pass.netns.get(k).cloned().unwrap_or_default(),
                pod_id: *pod_id,
                netns_cookie: *netns_cookie,
                config: config
                    .get(k)
                    .cloned()
                    .unwrap_or_else(|| CONFIG_CURRENT.into()),
            })
            .collect();
        if let Some(insns) = pass.inbound_insns {
            status.programs.retain(|p| p.name != "rd_sk_lookup");
            status.programs.push(ProgramReport {
                name: "rd_sk_lookup".into(),
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
                    .map(|(k, _, _, c)| (k.namespace, k.name, c))
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
fn log_changes(report: &Report) {
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
fn config_in_force(report: &Report) -> BTreeMap<&PodKey, String> {
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
fn problems(desired: &Desired, report: &Report, pending: &[String]) -> Vec<String> {
    let mut problems: Vec<String> = desired.rejected.iter().map(ToString::to_string).collect();
    problems.extend(report.kept.iter().map(|(k, _)| {
        format!("pod {k}: its new configuration is rejected; its last good configuration stays in force until the entry is fixed")
    }));
    problems.extend(report.locked.iter().map(|(k, _)| {
        format!("pod {k}: its configuration is rejected and it was never served: its connections are refused until the entry is fixed")
    }));
    problems.extend(pending.iter().cloned());
    problems.extend(report.failed.iter().map(|(k, e)| format!("pod {k}: {e}")));
    problems
}

/// Warns (once per crossing) when a connection map passes 80 % of its capacity: near full,
/// the LRU maps start evicting entries of live connections.
fn warn_if_filling(fill: &[(&'static str, usize, u32)], warned: &mut BTreeSet<&'static str>) {
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
fn serve_metrics(addr: Option<std::net::SocketAddr>) -> Option<watch::Sender<Arc<Snapshot>>> {
    let addr = addr?;
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    tokio::spawn(async move {
        if let Err(e) = metrics::serve(addr, rx).await {
            log::error!("{e:#}; metrics, /healthz and /readyz are not served");
        }
    });
    Some(tx)
}

/// Resolves when the source publishes; never once it has ended (it said why), so the loop
/// keeps serving what it has.
async fn published(rx: &mut watch::Receiver<Option<Published>>, open: &mut bool) {
    if *open && rx.changed().await.is_ok() {
        return;
    }
    *open = false;
    std::future::pending().await
}

/// The loop's end of the CNI plugin's socket.
struct CniLink {
    registry: Registry,
    calls: mpsc::Receiver<CniCall>,
}

impl CniLink {
    /// Reads the registrations a previous run left and starts serving the plugin.
    fn start(opts: &CniOptions, source: watch::Receiver<Option<Published>>) -> Result<Self> {
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
    fn drain(&mut self, calls: &mut Vec<CniCall>) {
        while let Ok(call) = self.calls.try_recv() {
            calls.push(call);
        }
    }

    /// Takes the calls into the registry (answering at once those that are unusable, and
    /// keeping the rest in `calls` for after the pass); returns the desired set to serve.
    fn desired(&mut self, calls: &mut Vec<CniCall>, current: &Published) -> Desired {
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
async fn next_call(link: &mut Option<CniLink>) -> Option<CniCall> {
    match link {
        Some(l) => l.calls.recv().await,
        None => std::future::pending().await,
    }
}

/// Answers CNI calls after a pass, from what the pass left in the maps.
fn answer_calls(calls: Vec<CniCall>, pass: &Pass) {
    for call in calls {
        let key = &call.key;
        let applied = pass
            .applied
            .iter()
            .find(|(k, ..)| k == key)
            .map(|(_, id, ..)| *id);
        let problem = if pass.unresolved.contains(key) {
            pass.pending
                .iter()
                .find(|p| p.starts_with(&format!("pod {key}:")))
                .cloned()
        } else if let Some((_, e)) = pass.report.failed.iter().find(|(k, _)| k == key) {
            Some(format!("pod {key}: {e}"))
        } else if let Some((_, e)) = pass.report.locked.iter().find(|(k, _)| k == key) {
            // Locked (its connections refused): the sandbox does not start.
            Some(format!("pod {key}: its configuration is rejected: {e}"))
        } else {
            None
        };
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

fn answer_all(calls: Vec<CniCall>, reason: &str) {
    for call in calls {
        let _ = call.reply.send(CniReply::Unavailable {
            reason: reason.to_string(),
        });
    }
}

/// Refuses a kernel without what the data path needs; warns of what only some pods need.
fn check_kernel() -> Result<()> {
    if let Some(msg) = probe::missing(&probe::run()) {
        anyhow::bail!(msg);
    }
    for (check, without) in probe::optional() {
        if check.present != Some(true) {
            log::warn!(
                "this kernel lacks {} (Linux {}): {without}",
                check.what,
                check.since
            );
        }
    }
    crate::annotations::set_ingress_seen(probe::sk_lookup_sees_ingress() == Some(true));
    Ok(())
}

/// Runs until SIGTERM or SIGINT. Programs and maps stay pinned after exit so traffic keeps
/// flowing; the next `run` takes over, `uninstall` removes them.
pub async fn run(opts: RunOptions) -> Result<()> {
    let cgroup = match &opts.cgroup {
        Some(c) => mounts::hybrid_unified(c).unwrap_or_else(|| c.clone()),
        None => mounts::cgroup2_root()?,
    };
    check_cgroup(&cgroup)?;
    check_kernel()?;
    let (mut engine, programs) = start(&opts, &cgroup)?;
    // Before any input is read: the pods file, the API server, the CNI and metrics sockets.
    crate::seccomp::install(opts.seccomp)?;
    let stats = Arc::new(SourceStats::default());
    let mut publisher = Publisher::new(&opts, &cgroup, programs, stats.clone());
    log::info!(
        "serving pods from {} (cgroup {}, pins {})",
        publisher.status.pods_file,
        cgroup.display(),
        opts.pin_dir.display()
    );
    // No pass (and no sweep of a previous run's entries) before the source has given its
    // first full desired set: a file at its first read, Kubernetes after its first list.
    let mut source = sources::spawn(opts.source, opts.poll, stats);
    let mut cni = match &opts.cni {
        Some(c) => Some(CniLink::start(c, source.clone())?),
        None => None,
    };
    let mut source_open = true;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut resync = tokio::time::interval(opts.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut calls = Vec::new();
        tokio::select! {
            _ = resync.tick() => {}
            _ = published(&mut source, &mut source_open) => {}
            Some(call) = next_call(&mut cni) => calls.push(call),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        publisher.heartbeat();
        if let Some(link) = cni.as_mut() {
            link.drain(&mut calls);
        }
        let Some(current) = source.borrow_and_update().clone() else {
            answer_all(calls, "redirectd has not read its pod source yet");
            continue;
        };
        if !current.complete {
            // Never a full set yet (a pods file unusable since start): apply nothing, remove
            // nothing; say why.
            publisher.source_unusable(&current);
            answer_all(calls, "redirectd's pod source is unusable (see its status)");
            continue;
        }
        let desired = match cni.as_mut() {
            Some(link) => link.desired(&mut calls, &current),
            None => current.desired.clone(),
        };
        let (returned, pass) = tokio::task::spawn_blocking(move || {
            let pass = engine.pass(&desired);
            (engine, pass)
        })
        .await
        .context("the reconcile pass panicked")?;
        engine = returned;
        answer_calls(calls, &pass);
        publisher.publish(&current, pass);
    }
    log::info!(
        "exiting; programs stay attached and pinned under {} (the next `redirectd run` takes over; `redirectd uninstall` removes them)",
        opts.pin_dir.display()
    );
    Ok(())
}
