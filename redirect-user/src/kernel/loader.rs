//! Loads the embedded eBPF object, attaches its programs to the cgroup and pins everything
//! under the pin directory:
//!
//! ```text
//! <pin-dir>/maps/<MAP>              every map (reused by name on restart: state survives)
//! <pin-dir>/links/<generation>/<p>  one link per program (a new generation per start)
//! <pin-dir>/pods/<netns-cookie>     the pod's sk_lookup link (adopted across restarts)
//! ```
//!
//! A start attaches a new generation of links before removing older ones, so capture never
//! stops; `uninstall` detaches and removes everything.

use std::{
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{MapInfo, SockHash},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSock, CgroupSockAddr, CgroupSockopt, SkLookup, SkMsg, SockOps,
    },
    Btf, Ebpf, EbpfLoader,
};
use redirect_common::{
    global_names as globals, map_names, program_names as programs, MAX_ORIG_DST,
};

use crate::kernel::{bpf_sys, mounts};

/// The node-wide kernel object built by build.rs from `redirect-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect"));
/// The per-pod inbound object (`sk_lookup`), loaded once per mesh pod.
static INBOUND_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect-inbound"));
/// The kinds of cgroup program we attach (each is its own aya program type).
#[derive(Clone, Copy)]
enum CgroupKind {
    SockOps,
    /// `cgroup/getsockopt` or `cgroup/setsockopt`: the `bpf_sys` attach type.
    Sockopt(u32),
    SockAddr,
    /// `cgroup/sock_create`.
    Sock,
}

/// A program of the object and the hook it attaches to.
struct ProgramDef {
    name: &'static str,
    hook: &'static str,
    kind: CgroupKind,
    /// The kernel that brings everything this program needs.
    min_kernel: &'static str,
}

/// Programs attached at the cgroup, in attach order: the getsockopt, sockops, getpeername and
/// recvmsg halves first, the sendmsg and connect programs that capture last, so no connection
/// or DNS query is captured before its destination (or its reply's source) can be answered.
const CGROUP_PROGRAMS: &[ProgramDef] = &[
    ProgramDef {
        name: programs::GETSOCKOPT,
        hook: "cgroup/getsockopt",
        kind: CgroupKind::Sockopt(bpf_sys::ATTACH_CGROUP_GETSOCKOPT),
        min_kernel: "5.15",
    },
    ProgramDef {
        name: programs::SOCK_RELEASE,
        hook: "cgroup/sock_release",
        kind: CgroupKind::Sock,
        min_kernel: "5.9",
    },
    ProgramDef {
        name: programs::SOCK_CREATE,
        hook: "cgroup/sock_create",
        kind: CgroupKind::Sock,
        min_kernel: "5.7",
    },
    ProgramDef {
        name: programs::SETSOCKOPT,
        hook: "cgroup/setsockopt",
        kind: CgroupKind::Sockopt(bpf_sys::ATTACH_CGROUP_SETSOCKOPT),
        min_kernel: "5.15",
    },
    ProgramDef {
        name: programs::SOCKOPS,
        hook: "sockops",
        kind: CgroupKind::SockOps,
        min_kernel: "5.15",
    },
    ProgramDef {
        name: programs::PEERNAME4,
        hook: "cgroup/getpeername4",
        kind: CgroupKind::SockAddr,
        min_kernel: "5.8",
    },
    ProgramDef {
        name: programs::PEERNAME6,
        hook: "cgroup/getpeername6",
        kind: CgroupKind::SockAddr,
        min_kernel: "5.8",
    },
    ProgramDef {
        name: programs::RECVMSG4,
        hook: "cgroup/recvmsg4",
        kind: CgroupKind::SockAddr,
        min_kernel: "5.7",
    },
    ProgramDef {
        name: programs::RECVMSG6,
        hook: "cgroup/recvmsg6",
        kind: CgroupKind::SockAddr,
        min_kernel: "5.7",
    },
    ProgramDef {
        name: programs::SENDMSG4,
        hook: "cgroup/sendmsg4",
        kind: CgroupKind::SockAddr,
        min_kernel: "5.7",
    },
    ProgramDef {
        name: programs::SENDMSG6,
        hook: "cgroup/sendmsg6",
        kind: CgroupKind::SockAddr,
        min_kernel: "5.7",
    },
    ProgramDef {
        name: programs::CONNECT4,
        hook: "cgroup/connect4",
        kind: CgroupKind::SockAddr,
        min_kernel: "5.7",
    },
    ProgramDef {
        name: programs::CONNECT6,
        hook: "cgroup/connect6",
        kind: CgroupKind::SockAddr,
        min_kernel: "5.7",
    },
];

/// The cgroup programs that send connections to a proxy; detached first on uninstall.
const CAPTURE_PROGRAMS: &[&str] = &[
    programs::CONNECT4,
    programs::CONNECT6,
    programs::SENDMSG4,
    programs::SENDMSG6,
];

pub use redirect_common::status::ProgramReport;

/// Where and how to load.
pub struct LoadOptions<'a> {
    pub pin_dir: &'a Path,
    pub cgroup: &'a Path,
    /// aya-log level for kernel records (1 error .. 5 trace).
    pub kernel_log_level: u8,
    /// The proxy's inbound listener port, registered by `sockops` at `listen()`.
    pub inbound_port: u16,
    /// The proxy's outbound listener port, registered likewise (fast listening check).
    pub outbound_port: u16,
    /// Same-node acceleration (sockmap) on.
    pub accel: bool,
    /// `icsk_ulp_ops`'s offset in a TCP socket, for `sk_msg`'s kTLS check (0: unknown, and
    /// nothing is redirected).
    pub ulp_ops_offset: u32,
    /// Capacity of `ORIG_BY_TUPLE` when it is created (a pinned
    /// map keeps its size).
    pub orig_dst_map_size: u32,
}

/// The loaded object and what the daemon keeps of it.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub programs: Vec<ProgramReport>,
    pub generation: PathBuf,
}

/// The kernel's BTF (for CO-RE relocations), parsed once for the daemon's life. A loader
/// parses `/sys/kernel/btf/vmlinux` itself unless given it: tens of MiB each time, and a burst
/// of pods (one inbound load per CNI ADD, several at once) took the daemon past its
/// container's 256 MiB memory limit on a real node (killed by the kernel's OOM killer).
fn kernel_btf() -> Option<&'static Btf> {
    static BTF: std::sync::OnceLock<Option<Btf>> = std::sync::OnceLock::new();
    BTF.get_or_init(|| match Btf::from_sys_fs() {
        Ok(btf) => Some(btf),
        Err(e) => {
            log::warn!("the kernel's BTF is not readable ({e}); loading without it");
            None
        }
    })
    .as_ref()
}

/// The size to give map `name`: that of the map pinned by an earlier run or by the main
/// object, when there is one (aya refuses to reuse a pinned map whose size differs from the
/// definition, and reusing it is what keeps every open connection's entry), else `wanted`.
fn pinned_size(pin_dir: &Path, name: &str, wanted: u32) -> u32 {
    MapInfo::from_pin(pin_dir.join("maps").join(name)).map_or(wanted, |info| info.max_entries())
}

/// A loader given the kernel's BTF where it is readable (else aya reads it only if the
/// object needs it, and says why not).
fn new_loader<'a>() -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    if let Some(btf) = kernel_btf() {
        loader.btf(btf);
    }
    loader
}

/// Loads and attaches everything, pins it, and retires older link generations.
pub fn load_and_attach(opts: &LoadOptions<'_>) -> Result<Loaded> {
    mounts::ensure_pin_dir(opts.pin_dir)?;
    let cgroup = File::open(opts.cgroup)
        .with_context(|| format!("opening cgroup {}", opts.cgroup.display()))?;
    let mut ebpf = new_loader()
        .default_map_pin_directory(opts.pin_dir.join("maps"))
        .override_global("AYA_LOG_LEVEL", &opts.kernel_log_level, false)
        .override_global(globals::INBOUND_PORT, &u32::from(opts.inbound_port), true)
        .override_global(globals::OUTBOUND_PORT, &u32::from(opts.outbound_port), true)
        .override_global(globals::ACCEL_ENABLED, &u32::from(opts.accel), true)
        .override_global(globals::ULP_OPS_OFFSET, &opts.ulp_ops_offset, true)
        .map_max_entries(
            map_names::ORIG_BY_TUPLE,
            pinned_size(
                opts.pin_dir,
                map_names::ORIG_BY_TUPLE,
                opts.orig_dst_map_size,
            ),
        )
        .load(OBJECT)
        .context(
            "loading the eBPF object (maps); is this kernel 5.15 or newer, with BPF enabled?",
        )?;

    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let generation = opts
        .pin_dir
        .join("links")
        .join(format!("{stamp}-{}", std::process::id()));
    std::fs::create_dir_all(&generation)
        .with_context(|| format!("creating {}", generation.display()))?;

    let mut programs = Vec::new();
    let result = (|| -> Result<()> {
        // Acceleration first: sk_msg on the socket-pair map, so that no socket enters
        // the map before its verdict program is there.
        programs.push(attach_sk_msg(&mut ebpf)?);
        for def in CGROUP_PROGRAMS {
            let report = load_one(&mut ebpf, def)?;
            let pin = generation.join(def.name);
            attach_cgroup(&mut ebpf, def, &cgroup, &pin).with_context(|| {
                format!(
                    "attaching {} ({}) to cgroup {} (needs Linux {} and CAP_BPF/CAP_NET_ADMIN)",
                    def.name,
                    def.hook,
                    opts.cgroup.display(),
                    def.min_kernel
                )
            })?;
            log::info!(
                "attached {} ({}) to {}; verifier processed {} instructions",
                def.name,
                def.hook,
                opts.cgroup.display(),
                report.verified_insns.map_or("?".into(), |n| n.to_string())
            );
            programs.push(report);
        }
        Ok(())
    })();
    if let Err(e) = result {
        // Never leave half a data path: detach what this attempt attached.
        if let Err(cleanup) = remove_link_dir(&generation) {
            log::error!("cleaning up after a failed attach: {cleanup:#}");
        }
        return Err(e);
    }
    retire_older_generations(opts.pin_dir, &generation)?;
    Ok(Loaded {
        ebpf,
        programs,
        generation,
    })
}

/// Loads `rd_sk_msg` and attaches it to the pinned `SOCK_PAIRS` sockhash.
fn attach_sk_msg(ebpf: &mut Ebpf) -> Result<ProgramReport> {
    let map_fd = {
        let map = ebpf
            .map(map_names::SOCK_PAIRS)
            .ok_or_else(|| anyhow!("map SOCK_PAIRS missing from the object"))?;
        let pairs: SockHash<_, redirect_common::SockKey> =
            SockHash::try_from(map).context("map SOCK_PAIRS is not a sockhash")?;
        pairs
            .fd()
            .try_clone()
            .context("duplicating the SOCK_PAIRS fd")?
    };
    let prog: &mut SkMsg = ebpf
        .program_mut(programs::SK_MSG)
        .ok_or_else(|| anyhow!("program rd_sk_msg missing from the object"))?
        .try_into()?;
    prog.load()
        .context("loading rd_sk_msg (sk_msg; needs Linux 5.15)")?;
    // BPF_PROG_ATTACH to the map: replaces the program already attached, with no gap.
    let id = prog
        .attach(&map_fd)
        .context("attaching rd_sk_msg to SOCK_PAIRS")?;
    // The attachment belongs to the pinned map and must outlive this process (a dropped
    // link would detach it): keep the link's handle open until exit instead.
    std::mem::forget(prog.take_link(id)?);
    let info = prog.info().context("reading info of rd_sk_msg")?;
    log::info!(
        "attached rd_sk_msg (sk_msg) to SOCK_PAIRS; verifier processed {} instructions",
        info.verified_instruction_count()
            .map_or("?".into(), |n| n.to_string())
    );
    Ok(ProgramReport {
        name: programs::SK_MSG.into(),
        hook: "sk_msg (SOCK_PAIRS)".into(),
        verified_insns: info.verified_instruction_count(),
        id: info.id(),
    })
}

fn load_one(ebpf: &mut Ebpf, def: &ProgramDef) -> Result<ProgramReport> {
    let prog = ebpf
        .program_mut(def.name)
        .ok_or_else(|| anyhow!("program {} missing from the object", def.name))?;
    let ctx = || {
        format!(
            "loading {} ({}; needs Linux {})",
            def.name, def.hook, def.min_kernel
        )
    };
    match def.kind {
        CgroupKind::SockOps => {
            let p: &mut SockOps = prog.try_into().with_context(ctx)?;
            p.load().with_context(ctx)?;
        }
        CgroupKind::Sockopt(_) => {
            let p: &mut CgroupSockopt = prog.try_into().with_context(ctx)?;
            p.load().with_context(ctx)?;
        }
        CgroupKind::Sock => {
            let p: &mut CgroupSock = prog.try_into().with_context(ctx)?;
            p.load().with_context(ctx)?;
        }
        CgroupKind::SockAddr => {
            let p: &mut CgroupSockAddr = prog.try_into().with_context(ctx)?;
            p.load().with_context(ctx)?;
        }
    }
    let info = ebpf
        .program(def.name)
        .ok_or_else(|| anyhow!("program {} vanished", def.name))?
        .info()
        .with_context(|| format!("reading info of {}", def.name))?;
    Ok(ProgramReport {
        name: def.name.into(),
        hook: def.hook.into(),
        verified_insns: info.verified_instruction_count(),
        id: info.id(),
    })
}

/// Attaches a loaded cgroup program as a link and pins it at `pin`. Cgroup links always run
/// beside the other programs on the hook (multi-attach), so `Single` (no flags) is what the
/// kernel asks for.
fn attach_cgroup(ebpf: &mut Ebpf, def: &ProgramDef, cgroup: &File, pin: &Path) -> Result<()> {
    let prog = ebpf
        .program_mut(def.name)
        .ok_or_else(|| anyhow!("program {} missing from the object", def.name))?;
    let mode = CgroupAttachMode::Single;
    let link = match def.kind {
        CgroupKind::SockOps => {
            let p: &mut SockOps = prog.try_into()?;
            let id = p.attach(cgroup, mode)?;
            FdLink::try_from(p.take_link(id)?)?
        }
        CgroupKind::SockAddr => {
            let p: &mut CgroupSockAddr = prog.try_into()?;
            let id = p.attach(cgroup, mode)?;
            FdLink::try_from(p.take_link(id)?)?
        }
        CgroupKind::Sock => {
            let p: &mut CgroupSock = prog.try_into()?;
            let id = p.attach(cgroup, mode)?;
            FdLink::try_from(p.take_link(id)?)?
        }
        CgroupKind::Sockopt(attach_type) => {
            // aya cannot pin this link type (see bpf_sys): create and pin it by hand.
            let p: &mut CgroupSockopt = prog.try_into()?;
            let link = bpf_sys::link_create(p.fd()?.as_fd(), cgroup.as_fd(), attach_type)?;
            return bpf_sys::obj_pin(link.as_fd(), pin);
        }
    };
    link.pin(pin)
        .with_context(|| format!("pinning at {}", pin.display()))?;
    Ok(())
}

/// Detaches and unpins every link in `dir`, capture links first (see [`uninstall`]), then
/// removes `dir`.
fn remove_link_dir(dir: &Path) -> Result<usize> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        paths.push(entry?.path());
    }
    paths.sort_by_key(|p| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        !CAPTURE_PROGRAMS.contains(&name)
    });
    for path in &paths {
        detach_and_unpin(path)?;
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(paths.len())
}

/// Force-detaches the link pinned at `path` (it stops running at once, whoever else holds
/// it) and removes the pin.
fn detach_and_unpin(path: &Path) -> Result<()> {
    match bpf_sys::obj_get(path) {
        Ok(fd) => {
            if let Err(e) = bpf_sys::link_detach(fd.as_fd()) {
                log::warn!("detaching link {}: {e}", path.display());
            }
        }
        Err(e) => log::warn!("{e:#}"),
    }
    std::fs::remove_file(path).with_context(|| format!("unpinning {}", path.display()))
}

fn retire_older_generations(pin_dir: &Path, keep: &Path) -> Result<()> {
    let links = pin_dir.join("links");
    for entry in
        std::fs::read_dir(&links).with_context(|| format!("listing {}", links.display()))?
    {
        let path = entry?.path();
        if path != keep {
            let n = remove_link_dir(&path)?;
            log::info!("replaced {n} links of a previous run ({})", path.display());
        }
    }
    Ok(())
}

fn inbound_pin(pin_dir: &Path, netns_cookie: u64) -> PathBuf {
    pin_dir.join("pods").join(netns_cookie.to_string())
}

/// Attaches the inbound program to a pod's network namespace, or adopts the link a previous
/// run pinned for it. Returns the verifier's instruction count when it loaded a program.
pub fn attach_inbound(pin_dir: &Path, netns_cookie: u64, netns: &File) -> Result<Option<u32>> {
    let pin = inbound_pin(pin_dir, netns_cookie);
    if pin.exists() && PinnedLink::from_pin(&pin).is_ok() {
        return Ok(None);
    }
    let _ = std::fs::remove_file(&pin);
    // 1: the program may read the ingress interface (Linux 5.17); 2: it may not.
    let sees_ingress: u8 = if crate::kernel::probe::sk_lookup_sees_ingress() == Some(true) {
        1
    } else {
        2
    };
    let mut ebpf = new_loader()
        .default_map_pin_directory(pin_dir.join("maps"))
        .override_global(globals::POD_NETNS_COOKIE, &netns_cookie, true)
        .override_global(globals::SEES_INGRESS_IFINDEX, &sees_ingress, true)
        .map_max_entries(
            map_names::ORIG_BY_TUPLE,
            pinned_size(pin_dir, map_names::ORIG_BY_TUPLE, MAX_ORIG_DST),
        )
        .load(INBOUND_OBJECT)
        .context("loading the inbound (sk_lookup) object")?;
    let prog: &mut SkLookup = ebpf
        .program_mut(programs::SK_LOOKUP)
        .ok_or_else(|| anyhow!("program rd_sk_lookup missing from the inbound object"))?
        .try_into()?;
    prog.load()
        .context("loading rd_sk_lookup (sk_lookup; needs Linux 5.9)")?;
    let insns = prog
        .info()
        .ok()
        .and_then(|i| i.verified_instruction_count());
    let id = prog
        .attach(netns)
        .context("attaching rd_sk_lookup to the pod's network namespace (needs Linux 5.9)")?;
    FdLink::from(prog.take_link(id)?)
        .pin(&pin)
        .with_context(|| format!("pinning at {}", pin.display()))?;
    Ok(insns)
}

/// Detaches and unpins a pod's inbound program.
pub fn detach_inbound(pin_dir: &Path, netns_cookie: u64) -> Result<()> {
    let pin = inbound_pin(pin_dir, netns_cookie);
    if let Ok(fd) = bpf_sys::obj_get(&pin) {
        if let Err(e) = bpf_sys::link_detach(fd.as_fd()) {
            log::warn!("detaching {}: {e}", pin.display());
        }
    }
    match std::fs::remove_file(&pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("unpinning {}", pin.display())),
    }
}

/// Netns cookies of the pods that have an inbound link pinned.
pub fn inbound_pins(pin_dir: &Path) -> Result<Vec<u64>> {
    let dir = pin_dir.join("pods");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        if let Ok(cookie) = entry?.file_name().to_string_lossy().parse() {
            out.push(cookie);
        }
    }
    Ok(out)
}

/// What `uninstall` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub links: usize,
    pub maps: usize,
}

/// Detaches every link and removes every pin under `pin_dir`, and the directory itself.
///
/// In two steps, so that no connection in flight is cut: first the links that *capture*
/// (connect4/6 and every pod's sk_lookup), so no new connection goes to a proxy; then, after
/// `drain`, the links that *answer* for connections already captured (sockops, getsockopt,
/// getpeername, sk_msg). A proxy that accepted a captured connection just before uninstall
/// still gets its `SO_ORIGINAL_DST` during the drain.
pub fn uninstall(pin_dir: &Path, drain: Duration) -> Result<Removed> {
    let mut removed = Removed::default();
    if !pin_dir.exists() {
        return Ok(removed);
    }
    let links = pin_dir.join("links");
    let pods = pin_dir.join("pods");
    let mut generations = Vec::new();
    if links.exists() {
        for entry in
            std::fs::read_dir(&links).with_context(|| format!("listing {}", links.display()))?
        {
            generations.push(entry?.path());
        }
    }
    let mut capture = Vec::new();
    for dir in &generations {
        capture.extend(
            CAPTURE_PROGRAMS
                .iter()
                .map(|name| dir.join(name))
                .filter(|p| p.exists()),
        );
    }
    if pods.exists() {
        for entry in
            std::fs::read_dir(&pods).with_context(|| format!("listing {}", pods.display()))?
        {
            capture.push(entry?.path());
        }
    }
    for path in &capture {
        detach_and_unpin(path)?;
        removed.links += 1;
    }
    // (A directory that cannot be read is reported by `remove_link_dir` below.)
    let answering_left = generations
        .iter()
        .any(|dir| std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()));
    if answering_left && !drain.is_zero() {
        log::info!(
            "capture detached; answering in-flight connections for {} ms before detaching the rest",
            drain.as_millis()
        );
        std::thread::sleep(drain);
    }
    for dir in &generations {
        removed.links += remove_link_dir(dir)?;
    }
    if links.exists() {
        std::fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    if pods.exists() {
        removed.links += remove_link_dir(&pods)?;
    }
    let maps = pin_dir.join("maps");
    if maps.exists() {
        for entry in
            std::fs::read_dir(&maps).with_context(|| format!("listing {}", maps.display()))?
        {
            let path = entry?.path();
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
            removed.maps += 1;
        }
        std::fs::remove_dir(&maps).with_context(|| format!("removing {}", maps.display()))?;
    }
    std::fs::remove_dir(pin_dir).with_context(|| {
        format!(
            "removing {} (something else is pinned there?)",
            pin_dir.display()
        )
    })?;
    Ok(removed)
}
