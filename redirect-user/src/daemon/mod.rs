//! `redirectd run`: load and attach, then keep the maps in step with the pod source.
//!
//! The loop reads as the design: **select** (the source published, the resync tick, a
//! signal) → **resolve** each desired pod's network namespace → **reconcile** the maps →
//! **publish** status and metrics. Resolving and reconciling block (they read `/proc`, enter
//! namespaces and make `bpf(2)` calls), so they run on a blocking thread with the `Engine`
//! that owns the maps; this task only waits and publishes. The log pump and the metrics
//! server run beside it.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya_log::EbpfLogger;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::watch,
};

use crate::{
    cni::CniOptions,
    kernel::datapath::Datapath,
    kernel::loader::{self, LoadOptions, ProgramReport},
    kernel::mounts,
    kernel::probe,
    podns::netns::Resolver,
    reconcile::{NodeSettings, Reconciler},
    sources::{self, Published, SourceConfig, SourceStats},
};

mod cni_link;
mod engine;
mod publish;

use cni_link::{answer_all, answer_calls, next_call, CniLink};
use engine::Engine;
use publish::Publisher;

/// Everything `run` needs.
pub struct RunOptions {
    pub source: SourceConfig,
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub status_file: PathBuf,
    pub node: NodeSettings,
    /// How often the pods file is checked for changes.
    pub poll: Duration,
    /// Same-node acceleration (sockmap), and why ("on: ..." or "off: ..."), for the log and
    /// the status.
    pub accel: crate::kernel::splice_check::Decision,
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
            crate::kernel::mounts::cgroup2_root().map_or_else(|e| format!("none found: {e:#}"), |p| p.display().to_string())
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
    let (name, cap) = datapath.orig_dst_capacity();
    if cap != opts.orig_dst_map_size {
        log::warn!(
            "map {name} holds {cap} entries, not the {} of --orig-dst-map-size: it was pinned by an earlier run and is kept (resizing it would forget every open connection's destination); `redirectd uninstall` and start again to resize",
            opts.orig_dst_map_size
        );
    }
    let mut reconciler = Reconciler::new(NodeSettings {
        sees_ingress_ifindex: probe::sk_lookup_sees_ingress() == Some(true),
        ..opts.node.clone()
    });
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

/// Resolves when the source publishes; never once it has ended (it said why), so the loop
/// keeps serving what it has.
async fn published(rx: &mut watch::Receiver<Option<Published>>, open: &mut bool) {
    if *open && rx.changed().await.is_ok() {
        return;
    }
    *open = false;
    std::future::pending().await
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
