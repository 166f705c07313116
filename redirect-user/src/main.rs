//! `redirectd`: run the redirector, show its status, or uninstall it.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use redirect_user::{
    cni::CniOptions,
    daemon::{self, RunOptions},
    kernel::loader,
    kernel::splice_check::{AccelMode, Decision},
    observe::status,
    policy::mesh::ISTIO,
    reconcile::NodeSettings,
    sources::{KubeOptions, SourceConfig},
};

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/redirect";
const DEFAULT_STATUS_FILE: &str = "/run/redirectd/status.json";
const DEFAULT_CNI_STATE: &str = "/run/redirectd/cni-pods.json";

#[derive(Parser)]
#[command(
    name = "redirectd",
    version,
    about = "eBPF transparent traffic redirector for service-mesh sidecars (no iptables)"
)]
struct Cli {
    /// Log level: error, warn, info, debug, trace (RUST_LOG overrides).
    #[arg(
        long,
        global = true,
        env = "REDIRECTD_LOG_LEVEL",
        default_value = "info",
        value_parser = clap::builder::PossibleValuesParser::new(["off", "error", "warn", "info", "debug", "trace"])
    )]
    log_level: String,
    /// Log lines as text, or as one JSON object each (`ts`, `level`, `target`, `msg`), for
    /// log pipelines.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "REDIRECTD_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `redirectd run`'s flags.
#[derive(Args)]
struct RunArgs {
    /// YAML file of mesh pods (see README); followed while running.
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pods: Option<PathBuf>,
    /// Take the mesh pods of this node from the Kubernetes API server.
    #[arg(long)]
    kubernetes: bool,
    /// This node's name (Kubernetes source).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The API server's URL, unauthenticated (tests, `kubectl proxy`); default: in-cluster
    /// service account or kubeconfig.
    #[arg(long)]
    kube_api_url: Option<String>,
    /// Cgroup v2 directory to attach to (default: the cgroup v2 root, from /proc/self/mountinfo).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Directory on a bpffs where maps and links are pinned.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Where the daemon writes its status (read by `redirectd status`).
    #[arg(long, default_value = DEFAULT_STATUS_FILE)]
    status_file: PathBuf,
    /// uid of the sidecar proxy; its own connections are never captured.
    #[arg(long, env = "REDIRECTD_PROXY_UID", default_value_t = ISTIO.proxy_uid)]
    proxy_uid: u32,
    /// gid of the sidecar proxy (Istio matches uid or gid).
    #[arg(long, env = "REDIRECTD_PROXY_GID", default_value_t = ISTIO.proxy_gid)]
    proxy_gid: u32,
    /// The proxy's outbound listener port (on loopback).
    #[arg(long, default_value_t = ISTIO.outbound_port, value_parser = clap::value_parser!(u16).range(1..))]
    outbound_port: u16,
    /// The proxy's inbound listener port.
    #[arg(long, default_value_t = ISTIO.inbound_port, value_parser = clap::value_parser!(u16).range(1..))]
    inbound_port: u16,
    /// The proxy's own ports, never captured inbound (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = ISTIO.proxy_ports.to_vec(), value_parser = clap::value_parser!(u16).range(1..))]
    proxy_ports: Vec<u16>,
    /// Serve Prometheus metrics on /metrics, and /healthz and /readyz, at this address
    /// (e.g. 127.0.0.1:15080).
    #[arg(long, env = "REDIRECTD_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Same-node acceleration (sockmap): `auto` turns it on only if, tried at start, a
    /// spliced socket behaves as TCP in everything a proxy can see (docs/acceleration.md);
    /// `on` accelerates anyway (proxies known not to meet the differences); `off` never.
    #[arg(long, env = "REDIRECTD_ACCEL", value_enum, default_value = "auto")]
    accel: AccelMode,
    /// The same as `--accel off` (kept for older configurations).
    #[arg(long, env = "REDIRECTD_NO_ACCEL")]
    no_accel: bool,
    /// Capacity of the original-destination map by 4-tuple (ORIG_BY_TUPLE): how many captured
    /// connections can be open on the node at once before the oldest lose their destination
    /// (LRU eviction, counted as orig_dst_evicted). About 100 bytes each.
    #[arg(long, env = "REDIRECTD_ORIG_DST_MAP_SIZE", default_value_t = redirect_common::MAX_ORIG_DST, value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    orig_dst_map_size: u32,
    /// The network namespace whose routes lead to the pods, for finding a Kubernetes pod's
    /// namespace from its IP (default: the daemon's own, the node's with hostNetwork).
    #[arg(long)]
    node_netns: Option<PathBuf>,
    /// Where the kernel's `net` sysctls are (TPROXY pods need
    /// `net.ipv4.tcp_fwmark_accept` set in their namespace): a container's own /proc/sys is
    /// read-only, so the DaemonSet mounts the host's /proc/sys/net and names it here.
    #[arg(long, env = "REDIRECTD_PROC_SYS_NET", default_value = "/proc/sys/net")]
    proc_sys_net: PathBuf,
    /// Serve the chained CNI plugin (`redirect-cni`) on this unix socket: pods are captured
    /// when their sandbox is created, before any container starts.
    #[arg(long)]
    cni_socket: Option<PathBuf>,
    /// Where the pods registered by the CNI plugin are kept across restarts.
    #[arg(long, default_value = DEFAULT_CNI_STATE)]
    cni_state: PathBuf,
    /// Most entries one pod's rules may take in each of the node's shared rule maps
    /// (PORT_RULES, ADDR_RULES, OWNER_GROUPS, NODE_ADDRS): a pod over it is a rejected
    /// configuration (locked, or its CNI ADD fails), so no pod can use up another's room.
    #[arg(long, env = "REDIRECTD_MAX_RULES_PER_POD", default_value_t = redirect_user::policy::room::DEFAULT_PER_POD, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(16..=65_536))]
    max_rules_per_pod: usize,
    /// How often to check the pods file, in milliseconds.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    poll_ms: u64,
    /// The daemon's system-call filter, installed once its programs are loaded: `enforce`
    /// refuses (EPERM) and logs any call off its allow-list, `log` only logs it (to find a
    /// call the list misses, in the kernel log as audit type 1326), `off` installs none.
    #[arg(long, env = "REDIRECTD_SECCOMP", value_enum, default_value = "enforce")]
    seccomp: redirect_user::seccomp::Mode,
}

/// Refuses a flag whose directory `dir` is not there.
fn check_dir_flag(flag: &str, dir: &std::path::Path) -> Result<()> {
    if !dir.is_dir() {
        bail!(
            "{flag}: {} is not a directory (give where the kernel's net sysctls are, e.g. /proc/sys/net)",
            dir.display()
        );
    }
    Ok(())
}

impl RunArgs {
    /// Checks the flags together and turns them into the daemon's options.
    fn into_options(self) -> Result<(RunOptions, AccelMode)> {
        let accel = if self.no_accel {
            AccelMode::Off
        } else {
            self.accel
        };
        let mut proxy_ports = self.proxy_ports;
        // The proxy's listeners are never captured inbound, whatever --proxy-ports says.
        proxy_ports.extend([self.outbound_port, self.inbound_port]);
        proxy_ports.sort_unstable();
        proxy_ports.dedup();
        check_dir_flag("--proc-sys-net", &self.proc_sys_net.join("ipv4"))?;
        if self.cni_socket.is_some() {
            redirect_user::private_file::check(&self.cni_state).context("--cni-state")?;
        }
        redirect_user::private_file::check(&self.status_file).context("--status-file")?;
        if self.outbound_port == self.inbound_port {
            bail!(
                "--outbound-port and --inbound-port are both {}; they must differ",
                self.outbound_port
            );
        }
        let source = match (self.pods, self.kubernetes) {
            (Some(path), false) => SourceConfig::File(path),
            (None, true) => SourceConfig::Kubernetes(KubeOptions {
                node_name: self.node_name.ok_or_else(|| {
                    anyhow::anyhow!(
                        "--kubernetes needs --node-name (or NODE_NAME from the downward API)"
                    )
                })?,
                api_url: self.kube_api_url,
            }),
            _ => bail!("give exactly one of --pods FILE and --kubernetes"),
        };
        let opts = RunOptions {
            source,
            cgroup: self.cgroup,
            pin_dir: self.pin_dir,
            status_file: self.status_file,
            node: NodeSettings {
                proxy_uid: self.proxy_uid,
                proxy_gid: self.proxy_gid,
                outbound_port: self.outbound_port,
                inbound_port: self.inbound_port,
                proxy_ports,
                rules_per_pod: self.max_rules_per_pod,
                // Probed when the daemon starts.
                sees_ingress_ifindex: false,
            },
            // Decided in `run`, from the mode returned beside (auto tries a splice).
            accel: Decision::off(String::new()),
            metrics_addr: self.metrics_addr,
            poll: Duration::from_millis(self.poll_ms),
            resync: Duration::from_secs(1),
            orig_dst_map_size: self.orig_dst_map_size,
            node_netns: self.node_netns,
            proc_sys_net: self.proc_sys_net,
            cni: self.cni_socket.map(|socket| CniOptions {
                socket,
                state_file: self.cni_state,
            }),
            seccomp: self.seccomp,
        };
        Ok((opts, accel))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the programs, then keep the maps in step with the pod source.
    Run(Box<RunArgs>),
    /// Show the applied pods, their capture counters and the loaded programs.
    Status {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, default_value = DEFAULT_STATUS_FILE)]
        status_file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check this kernel for every program type, map type and helper the data path needs.
    Probe,
    /// Prepare the host for the DaemonSet (its first init container; needs hostPID and
    /// privilege): bpffs mounted on the host's /sys/fs/bpf, the pods' network namespaces'
    /// directory a mount of its own, both shared, so the daemon's container sees the host's
    /// pins and pods' namespaces as they come (mount propagation).
    PrepareHost {
        /// Where the host's bpffs is (or is to be mounted).
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// Where the container runtime mounts pods' network namespaces.
        #[arg(long, default_value = "/run/netns")]
        netns_dir: PathBuf,
        /// The host's mount namespace (pid 1's, seen through hostPID).
        #[arg(long, default_value = "/proc/1/ns/mnt")]
        host_mnt_ns: PathBuf,
    },
    /// Put the chained CNI plugin on this node, or take it off (the DaemonSet's installer).
    Cni {
        #[command(subcommand)]
        action: CniAction,
    },
    /// Detach every program and remove every link, map and pin redirectd made.
    Uninstall {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Milliseconds between detaching capture (connect, sk_lookup) and detaching the
        /// programs that answer for connections already captured (SO_ORIGINAL_DST, peer name).
        #[arg(long, default_value_t = 1000)]
        drain_ms: u64,
    },
}

#[derive(Subcommand)]
enum CniAction {
    /// Copy `redirect-cni` into the CNI bin dir and add it to the primary CNI configuration
    /// (the first file of the conf dir by name; a lone .conf becomes a .conflist).
    Install {
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The plugin binary to copy (default: `redirect-cni` next to this executable).
        #[arg(long)]
        plugin_binary: Option<PathBuf>,
        /// The daemon's socket, as the plugin will find it on the node.
        #[arg(long, default_value = "/var/run/redirectd/cni.sock")]
        socket: PathBuf,
        /// Namespaces whose pods start without asking the daemon (comma-separated): the
        /// system's, which must start while it is down. The daemon's own namespace
        /// (`--own-namespace`) is always added.
        #[arg(long, value_delimiter = ',', default_value = "kube-system")]
        exclude_namespaces: Vec<String>,
        /// The daemon's own namespace (the downward API's `metadata.namespace`): its pods
        /// must start while no daemon runs.
        #[arg(long, env = "POD_NAMESPACE")]
        own_namespace: Option<String>,
        /// Bound on the plugin's wait for the daemon, in seconds.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
        timeout_seconds: u64,
        /// Keep running: put the plugin back whenever the primary CNI rewrites its file.
        #[arg(long)]
        watch: bool,
        /// How often `--watch` checks, in milliseconds.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
        poll_ms: u64,
    },
    /// Take the plugin out of the primary CNI configuration and remove its binary.
    Uninstall {
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
    },
}

fn cni_command(action: CniAction) -> Result<()> {
    use redirect_user::cni::install::{self, Change, InstallOptions};
    match action {
        CniAction::Install {
            bin_dir,
            conf_dir,
            plugin_binary,
            socket,
            mut exclude_namespaces,
            own_namespace,
            timeout_seconds,
            watch,
            poll_ms,
        } => {
            exclude_namespaces.extend(own_namespace);
            exclude_namespaces.retain(|n| !n.trim().is_empty());
            exclude_namespaces.sort();
            exclude_namespaces.dedup();
            let binary = match plugin_binary {
                Some(b) => b,
                None => std::env::current_exe()
                    .context("finding this executable")?
                    .with_file_name(install::PLUGIN_TYPE),
            };
            let plugin = serde_json::json!({
                "type": install::PLUGIN_TYPE,
                "socket": socket,
                "excludeNamespaces": exclude_namespaces,
                "timeoutSeconds": timeout_seconds,
            });
            let opts = InstallOptions {
                binary,
                bin_dir,
                conf_dir,
                plugin,
            };
            install::install(&opts, watch.then(|| Duration::from_millis(poll_ms)))
        }
        CniAction::Uninstall { bin_dir, conf_dir } => {
            match install::remove(&conf_dir)? {
                Change::Written(p) => {
                    println!("removed {} from {}", install::PLUGIN_TYPE, p.display())
                }
                Change::Unchanged | Change::NoPrimary => {
                    println!("{} was not in the CNI configuration", install::PLUGIN_TYPE)
                }
            }
            if install::remove_binary(&bin_dir)? {
                println!(
                    "removed {} from {}",
                    install::PLUGIN_TYPE,
                    bin_dir.display()
                );
            }
            Ok(())
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// At most two glibc malloc arenas. By default each thread that allocates gets an arena of
/// its own (up to 8 a core) and keeps what it freed: CNI ADDs served at once (each loads a
/// program on a blocking thread) took the daemon from 36 to over 256 MiB with 25 pods, and
/// the kernel's OOM killer stopped it in its DaemonSet container; with two arenas it peaks
/// at 72 MiB (`tests/tests/node.rs`, 50 pods at once under the manifest's limit).
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt(3) before any thread exists; it only sets an allocator parameter.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) } != 1 {
        log::warn!("could not limit malloc arenas (mallopt M_ARENA_MAX)");
    }
}

/// `redirectd probe`'s last part: what a proxy would see differently on a spliced socket on
/// this kernel, tried now (a loopback pair spliced as redirectd splices proxies, next to the
/// same pair unspliced). Informational: acceleration is optional, so nothing here fails the
/// probe.
fn print_acceleration_check() {
    use redirect_user::kernel::splice_check::{differences, QUICK};
    println!("\nsame-node acceleration: a spliced proxy socket next to plain TCP, tried now");
    match differences(QUICK) {
        Err(e) => println!("UNKNOWN  could not build a splice to try ({e})"),
        Ok(diffs) => {
            for (behaviour, _) in QUICK {
                match diffs.iter().find(|d| d.behaviour == *behaviour) {
                    None => println!("same     {behaviour}"),
                    Some(d) => println!(
                        "DIFFERS  {behaviour}: TCP gives {:?}, spliced {:?}",
                        d.plain, d.spliced
                    ),
                }
            }
            if diffs.is_empty() {
                println!("         nothing a proxy can see differs here");
            } else {
                println!(
                    "         {} of {} differ: a proxy that uses one of them sees the difference when its pod is accelerated (Envoy: the TCP_INFO counters and a close with unread data; a proxy that forwards with splice() loses data). Turn acceleration off for such pods (redirectd.dev/accel: \"false\") or the node (--no-accel); see docs/acceleration.md",
                    diffs.len(),
                    QUICK.len()
                );
            }
        }
    }
    match redirect_user::kernel::kernel_layout::ulp_ops_offset() {
        Ok(off) => println!(
            "ok       kTLS check: a socket's ULP pointer is at byte {off} (the kernel's BTF); a socket given kTLS after its splice is kept off it"
        ),
        Err(e) => println!(
            "UNKNOWN  kTLS check: {e:#}; acceleration cannot be turned on here"
        ),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) {
        // A command whose output is piped (`redirectd status | head`) ends quietly when the
        // reader goes, as command-line tools do; the daemon keeps SIGPIPE ignored.
        // SAFETY: restores the default disposition of one signal, before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let mut logger = env_logger::Builder::new();
    logger
        .parse_filters(&format!("{},aya::bpf=error", cli.log_level))
        .parse_env("RUST_LOG")
        .format_timestamp_millis();
    if let LogFormat::Json = cli.log_format {
        logger.format(|buf, record| {
            use std::io::Write as _;
            let line = serde_json::json!({
                "ts": buf.timestamp_millis().to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    logger.init();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => {
            let (mut opts, accel) = args.into_options()?;
            // Before any thread exists: capabilities are per thread, and inherited.
            redirect_user::privileges::raise_fd_limit();
            limit_malloc_arenas();
            redirect_user::privileges::drop_all_but_kept().context("dropping capabilities")?;
            opts.accel = accel.decide();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(daemon::run(opts))
        }
        Command::Status {
            pin_dir,
            status_file,
            json,
        } => {
            let r = status::report(&status_file, &pin_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                status::print(&r);
            }
            Ok(())
        }
        Command::Probe => {
            let checks = redirect_user::kernel::probe::run();
            for c in &checks {
                let state = match c.present {
                    Some(true) => "ok",
                    Some(false) => "MISSING",
                    None => "UNKNOWN",
                };
                println!("{state:<8} {:<55} (Linux {})", c.what, c.since);
            }
            for (c, without) in redirect_user::kernel::probe::optional() {
                let state = match c.present {
                    Some(true) => "ok",
                    Some(false) => "missing",
                    None => "unknown",
                };
                let what = format!("{} (optional)", c.what);
                println!(
                    "{state:<8} {what:<55} (Linux {}); without it {without}",
                    c.since
                );
            }
            print_acceleration_check();
            match redirect_user::kernel::probe::missing(&checks) {
                Some(msg) => bail!(msg),
                None => Ok(()),
            }
        }
        Command::PrepareHost {
            bpffs,
            netns_dir,
            host_mnt_ns,
        } => {
            for line in
                redirect_user::kernel::mounts::prepare_host(&host_mnt_ns, &bpffs, &netns_dir)?
            {
                println!("{line}");
            }
            Ok(())
        }
        Command::Cni { action } => cni_command(action),
        Command::Uninstall { pin_dir, drain_ms } => {
            let removed = loader::uninstall(&pin_dir, Duration::from_millis(drain_ms))?;
            println!(
                "uninstalled: detached {} links, removed {} map pins and {}",
                removed.links,
                removed.maps,
                pin_dir.display()
            );
            println!(
                "mesh pods keep running, uncaptured: their connections now go direct, past their sidecars, until they are restarted under a capture mechanism (redirectd again, or Istio's istio-cni or istio-init)"
            );
            Ok(())
        }
    }
}
