//! The lab: mesh pods as network namespaces on a bridge, each in its own cgroup, each with a
//! sidecar (`redirect-lab proxy`, uid 1337) and an application. Used by `cargo xtask demo`,
//! the integration tests and the benchmark.
//!
//! Every object is owned by a guard that removes it on drop, even when a test fails: network
//! namespaces, cgroups, processes, the daemon and its pins, the lab's temp directory. Names are
//! unique per lab (`rlab-<pid>-<n>`), so labs can run side by side, and nothing touches the
//! host's own interfaces: the bridge lives in a "node" namespace of the lab's own.

pub mod echo;
pub mod perf;
pub mod wire;

use std::{
    fs::File,
    io::Write as _,
    net::IpAddr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// Prefix of every lab object's name; `cargo xtask test` sweeps leftovers with it.
pub const PREFIX: &str = "rlab-";
/// The sidecar's uid and gid, as Istio's.
pub const PROXY_UID: u32 = 1337;
/// The lab pods' IPv4 subnet (/24) and IPv6 subnet (/64) prefixes.
pub const V4_PREFIX: &str = "10.201.0.";
pub const V6_PREFIX: &str = "fd00:201::";
/// Prefix of the point-to-point pods' addresses ([`Lab::add_routed_pod`], /32 each).
pub const ROUTED_V4_PREFIX: &str = "10.204.0.";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a command to completion; an error carries its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is it installed? `cargo xtask setup`)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Path of a workspace binary: `$<NAME>_BIN` if set (xtask sets it), else next to the
/// running test or xtask executable's target directory.
pub fn bin(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("binary {name} not found: set {var} or build it first (`cargo xtask build`)");
}

/// Finds `program` on PATH (or /usr/sbin, /usr/bin).
pub fn which(program: &str) -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file());
    found.with_context(|| format!("{program} not found (run `cargo xtask setup`)"))
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_root() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup v2 mount in /proc/self/mountinfo (the lab needs cgroup v2)")
}

/// A network namespace made with `ip netns add`, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Result<Self> {
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A cgroup v2 directory, removed on drop (its processes are killed first).
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(path: PathBuf) -> Result<Self> {
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
                    // SAFETY: kill(2).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("lab: could not remove cgroup {}", self.path.display());
    }
}

/// A child process, killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process now (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the process with SIGTERM, waiting up to 5 s.
    pub fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where and as whom to start a process.
#[derive(Default, Clone, Copy)]
pub struct Placement<'a> {
    pub netns: Option<&'a Netns>,
    pub cgroup: Option<&'a Cgroup>,
    /// Run as this uid and gid (after entering the namespace).
    pub uid: Option<u32>,
}

/// Starts `program args` at `placement`, stdout and stderr to `log`. The process joins the
/// cgroup first, then the network namespace (in that order: entering a netns must not
/// depend on /sys), then drops to `uid`.
pub fn spawn(placement: Placement<'_>, log: &Path, program: &Path, args: &[&str]) -> Result<Proc> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    let ns_file = match placement.netns {
        Some(ns) => Some(
            File::open(ns.path()).with_context(|| format!("opening {}", ns.path().display()))?,
        ),
        None => None,
    };
    let procs_file = match placement.cgroup {
        Some(cg) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(cg.path.join("cgroup.procs"))
                .with_context(|| format!("opening {}/cgroup.procs", cg.path.display()))?,
        ),
        None => None,
    };
    let uid = placement.uid;
    // SAFETY: only async-signal-safe calls (write, setns, setgroups, setgid, setuid) between
    // fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(f) = &procs_file {
                if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(f) = &ns_file {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(uid) = uid {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(Proc {
        child,
        log: log.to_path_buf(),
    })
}

/// A veth pair from `node` into `other`: `veth` on the node side, `eth0` in `other`.
fn veth_pair(node: &Netns, veth: &str, other: &Netns) -> Result<()> {
    node.exec(&[
        "ip",
        "link",
        "add",
        veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &other.name,
    ])?;
    Ok(())
}

/// Connects a pod namespace to `node`'s bridge `br0`: a veth pair, `veth` on the node side,
/// `eth0` in the pod.
fn plug(node: &Netns, veth: &str, pod: &Netns) -> Result<()> {
    veth_pair(node, veth, pod)?;
    node.exec(&["ip", "link", "set", veth, "master", "br0", "up"])?;
    Ok(())
}

/// A pod of the lab: a network namespace with an address on the bridge, and a cgroup.
pub struct Pod {
    pub name: String,
    pub v4: IpAddr,
    pub v6: IpAddr,
    // Field order is drop order: processes live in the cgroup and the netns.
    pub cgroup: Cgroup,
    pub netns: Netns,
}

impl Pod {
    pub fn placement(&self) -> Placement<'_> {
        Placement {
            netns: Some(&self.netns),
            cgroup: Some(&self.cgroup),
            uid: None,
        }
    }

    /// The pods-file entry for this pod, with `annotations` (YAML mapping lines, already
    /// indented by 6 spaces, or empty).
    pub fn yaml_entry(&self, annotations: &[(&str, &str)]) -> String {
        let ips = if self.v6.is_unspecified() {
            format!("\"{}\"", self.v4)
        } else {
            format!("\"{}\", \"{}\"", self.v4, self.v6)
        };
        let mut s = format!(
            "  - name: {}\n    namespace: lab\n    netns: {}\n    ips: [{ips}]\n",
            self.name,
            self.netns.path().display(),
        );
        if !annotations.is_empty() {
            s.push_str("    annotations:\n");
            for (k, v) in annotations {
                s.push_str(&format!("      {k}: {v:?}\n"));
            }
        }
        s
    }
}

/// A lab: a node namespace with a bridge, pods on it, a cgroup subtree, a temp directory.
pub struct Lab {
    pub id: String,
    pub dir: PathBuf,
    // Drop order: processes, daemon, pods, node, cgroup root, then the directory (in Drop).
    pub procs: Vec<Proc>,
    pub daemon: Option<Daemon>,
    pub pods: Vec<Pod>,
    /// "Another node" (see [`Lab::add_remote_node`]).
    pub remote: Option<Netns>,
    /// The remote node's pods' cgroup, dropped after them.
    remote_cgroup: Option<Cgroup>,
    pub node: Netns,
    pub cgroup: Cgroup,
    next_host: u8,
}

impl Lab {
    /// Creates an empty lab. Needs root, iproute2 and cgroup v2.
    pub fn new() -> Result<Self> {
        // SAFETY: geteuid(2).
        if unsafe { libc::geteuid() } != 0 {
            bail!("the lab needs root (network namespaces, cgroups, BPF): run as root / via `cargo xtask test`");
        }
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{PREFIX}{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir)?;
        let cgroup = Cgroup::new(cgroup2_root()?.join(&id))?;
        let node = Netns::new(format!("{id}-node"))?;
        node.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        node.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{V4_PREFIX}1/24"),
            "dev",
            "br0",
        ])?;
        node.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{V6_PREFIX}1/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        node.exec(&["ip", "link", "set", "br0", "up"])?;
        // The node routes between its pods and other nodes, like a Kubernetes node.
        node.exec(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ])?;
        Ok(Self {
            id,
            dir,
            procs: Vec::new(),
            daemon: None,
            pods: Vec::new(),
            remote: None,
            remote_cgroup: None,
            node,
            cgroup,
            next_host: 2,
        })
    }

    /// Adds "another node": a namespace linked to this node through a second bridge, routed
    /// (10.202.0.0/24, fd00:202::/64), from which pods are reached across a router as from a
    /// different host.
    pub fn add_remote_node(&mut self) -> Result<&Netns> {
        let remote = Netns::new(format!("{}-node2", self.id))?;
        self.node
            .exec(&["ip", "link", "add", "br1", "type", "bridge"])?;
        self.node
            .exec(&["ip", "addr", "add", "10.202.0.1/24", "dev", "br1"])?;
        self.node.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fd00:202::1/64",
            "dev",
            "br1",
            "nodad",
        ])?;
        self.node.exec(&["ip", "link", "set", "br1", "up"])?;
        veth_pair(&self.node, "vn2", &remote)?;
        self.node
            .exec(&["ip", "link", "set", "vn2", "master", "br1", "up"])?;
        remote.exec(&["ip", "addr", "add", "10.202.0.2/24", "dev", "eth0"])?;
        remote.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fd00:202::2/64",
            "dev",
            "eth0",
            "nodad",
        ])?;
        remote.exec(&["ip", "link", "set", "eth0", "up"])?;
        remote.exec(&["ip", "route", "add", "default", "via", "10.202.0.1"])?;
        remote.exec(&["ip", "-6", "route", "add", "default", "via", "fd00:202::1"])?;
        self.remote = Some(remote);
        Ok(self.remote.as_ref().expect("just set"))
    }

    /// Adds a pod on "another node" ([`Lab::add_remote_node`] first): a namespace behind the
    /// remote node (10.202.1.0/24, routed through both nodes), in a cgroup under
    /// `<lab cgroup>/node2/`, which a second daemon can own. Returns its index in `self.pods`.
    pub fn add_remote_pod(&mut self, name: &str) -> Result<usize> {
        let remote = self.remote.as_ref().context("add_remote_node first")?;
        let host = self.next_host;
        self.next_host += 1;
        if self.remote_cgroup.is_none() {
            self.remote_cgroup = Some(Cgroup::new(self.cgroup.path.join("node2"))?);
            remote.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
            remote.exec(&["ip", "addr", "add", "10.202.1.1/24", "dev", "br0"])?;
            remote.exec(&["ip", "link", "set", "br0", "up"])?;
            remote.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            self.node
                .exec(&["ip", "route", "add", "10.202.1.0/24", "via", "10.202.0.2"])?;
        }
        let cgroup_root = self.remote_cgroup.as_ref().expect("just made").path.clone();
        let netns = Netns::new(format!("{}-{name}", self.id))?;
        let cgroup = Cgroup::new(cgroup_root.join(name))?;
        plug(remote, &format!("r{host}"), &netns)?;
        let v4 = format!("10.202.1.{host}");
        netns.exec(&["ip", "addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        netns.exec(&["ip", "link", "set", "eth0", "up"])?;
        netns.exec(&["ip", "route", "add", "default", "via", "10.202.1.1"])?;
        self.pods.push(Pod {
            name: name.into(),
            v4: v4.parse()?,
            v6: "::".parse()?,
            cgroup,
            netns,
        });
        Ok(self.pods.len() - 1)
    }

    /// The cgroup of the pods on the remote node ([`Lab::add_remote_pod`]).
    pub fn remote_cgroup(&self) -> Option<&Path> {
        self.remote_cgroup.as_ref().map(|c| c.path.as_path())
    }

    /// Adds a pod (network namespace on the bridge with an IPv4 and an IPv6 address, and a
    /// cgroup under the lab's). Returns its index in `self.pods`.
    pub fn add_pod(&mut self, name: &str) -> Result<usize> {
        let host = self.next_host;
        self.next_host += 1;
        let netns = Netns::new(format!("{}-{name}", self.id))?;
        let cgroup = Cgroup::new(self.cgroup.path.join(name))?;
        plug(&self.node, &format!("v{host}"), &netns)?;
        let v4 = format!("{V4_PREFIX}{host}");
        let v6 = format!("{V6_PREFIX}{host:x}");
        netns.exec(&["ip", "addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        netns.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        netns.exec(&["ip", "link", "set", "eth0", "up"])?;
        netns.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &format!("{V4_PREFIX}1"),
        ])?;
        netns.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("{V6_PREFIX}1"),
        ])?;
        // Istio's inbound passthrough source for IPv6 (127.0.0.6 is on lo already).
        netns.exec(&["ip", "-6", "addr", "add", "::6/128", "dev", "lo", "nodad"])?;
        self.pods.push(Pod {
            name: name.into(),
            v4: v4.parse()?,
            v6: v6.parse()?,
            cgroup,
            netns,
        });
        Ok(self.pods.len() - 1)
    }

    /// Adds a pod wired the way point-to-point CNIs (Calico, Cilium, kindnet) wire one: its
    /// own veth to the node (`p<N>`), no bridge, a /32 host route on the node naming that veth,
    /// and in the pod a default route through a link-local gateway whose neighbour entry is the
    /// node's end of the veth. Address `10.204.0.<N>`, IPv4 only. Returns its index in `self.pods`.
    pub fn add_routed_pod(&mut self, name: &str) -> Result<usize> {
        let host = self.next_host;
        self.next_host += 1;
        let netns = Netns::new(format!("{}-{name}", self.id))?;
        let cgroup = Cgroup::new(self.cgroup.path.join(name))?;
        let veth = format!("p{host}");
        let v4 = format!("{ROUTED_V4_PREFIX}{host}");
        veth_pair(&self.node, &veth, &netns)?;
        self.node.exec(&["ip", "link", "set", &veth, "up"])?;
        let node_mac = self
            .node
            .exec(&["cat", &format!("/sys/class/net/{veth}/address")])?;
        self.node
            .exec(&["ip", "route", "add", &format!("{v4}/32"), "dev", &veth])?;
        netns.exec(&["ip", "addr", "add", &format!("{v4}/32"), "dev", "eth0"])?;
        netns.exec(&["ip", "link", "set", "eth0", "up"])?;
        netns.exec(&["ip", "route", "add", "169.254.1.1", "dev", "eth0"])?;
        netns.exec(&[
            "ip",
            "neigh",
            "add",
            "169.254.1.1",
            "lladdr",
            node_mac.trim(),
            "dev",
            "eth0",
        ])?;
        netns.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])?;
        self.pods.push(Pod {
            name: name.into(),
            v4: v4.parse()?,
            v6: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            cgroup,
            netns,
        });
        Ok(self.pods.len() - 1)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the lab"))
    }

    /// Adds an IPv4 address to a pod (for many-destination tests).
    pub fn add_address(&self, pod: &str, addr: &str) -> Result<()> {
        self.pod(pod)
            .netns
            .exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        Ok(())
    }

    /// Starts a lab binary subcommand in a pod (as `uid`, if given). Returns its index in
    /// `self.procs`.
    pub fn spawn_in(
        &mut self,
        pod: &str,
        uid: Option<u32>,
        tag: &str,
        args: &[&str],
    ) -> Result<usize> {
        let log = self.dir.join(format!("{pod}-{tag}.log"));
        let program = bin("redirect-lab");
        let mut placement = self.pod(pod).placement();
        placement.uid = uid;
        let p = spawn(placement, &log, &program, args)?;
        self.procs.push(p);
        Ok(self.procs.len() - 1)
    }

    /// Starts the sidecar proxy in a pod, as uid 1337, and waits until it listens.
    pub fn start_sidecar(&mut self, pod: &str) -> Result<usize> {
        self.start_sidecar_with(pod, &[])
    }

    /// Starts the lab sidecar with extra `proxy` arguments (e.g. `--answer-delay-ms`).
    pub fn start_sidecar_with(&mut self, pod: &str, extra: &[&str]) -> Result<usize> {
        let mut args = vec!["proxy"];
        args.extend_from_slice(extra);
        let i = self.spawn_in(pod, Some(PROXY_UID), "sidecar", &args)?;
        self.wait_listening(pod, 15001)?;
        Ok(i)
    }

    /// Starts the test server in a pod on `ports` and waits until it listens.
    pub fn start_server(&mut self, pod: &str, ports: &[u16]) -> Result<usize> {
        let mut args = vec!["server".to_string()];
        for p in ports {
            args.push("--port".into());
            args.push(p.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let i = self.spawn_in(pod, None, "server", &args)?;
        for p in ports {
            self.wait_listening(pod, *p)?;
        }
        Ok(i)
    }

    /// Starts the echo server in a pod and waits until it listens.
    pub fn start_echo_server(
        &mut self,
        pod: &str,
        port: u16,
        reset_after: Option<u64>,
    ) -> Result<usize> {
        let port_s = port.to_string();
        let mut args = vec!["echo-server", "--port", &port_s];
        let reset;
        if let Some(r) = reset_after {
            reset = r.to_string();
            args.extend(["--reset-after", &reset]);
        }
        let i = self.spawn_in(pod, None, &format!("echo{port}"), &args)?;
        self.wait_listening(pod, port)?;
        Ok(i)
    }

    /// Runs the echo client in a pod; one result per stream.
    pub fn echo(&self, pod: &str, args: &[&str]) -> Result<Vec<echo::EchoResult>> {
        self.tool(self.pod(pod).placement(), "echo-client", args)
    }

    /// Runs one benchmark workload (`perf-client`) in a pod.
    pub fn perf(&self, pod: &str, args: &[&str]) -> Result<perf::Measured> {
        let mut results = self.tool(self.pod(pod).placement(), "perf-client", args)?;
        results.pop().context("perf-client printed no result")
    }

    /// Runs `redirect-lab <subcommand> <args>` at `placement` to completion and parses the
    /// JSON object it prints on each line.
    fn tool<T: serde::de::DeserializeOwned>(
        &self,
        placement: Placement<'_>,
        subcommand: &str,
        args: &[&str],
    ) -> Result<Vec<T>> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let log = self.dir.join(format!("{subcommand}-{n}.log"));
        let mut all = vec![subcommand];
        all.extend_from_slice(args);
        let mut p = spawn(placement, &log, &bin("redirect-lab"), &all)?;
        let status = p.child.wait()?;
        let text = p.log_text();
        if !status.success() {
            bail!("{subcommand} {args:?} failed ({status}): {text}");
        }
        text.lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).with_context(|| format!("{subcommand} output {l:?}")))
            .collect()
    }

    /// Packets sent and received so far on `dev` in a namespace (`ip -s -j link`).
    pub fn link_packets(ns: &Netns, dev: &str) -> Result<u64> {
        let out = run(
            "ip",
            &["-n", &ns.name, "-s", "-j", "link", "show", "dev", dev],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let stats = &v[0]["stats64"];
        let n = stats["rx"]["packets"].as_u64().context("no rx packets")?
            + stats["tx"]["packets"].as_u64().context("no tx packets")?;
        Ok(n)
    }

    /// Waits until something in the pod listens on TCP `port`.
    pub fn wait_listening(&self, pod: &str, port: u16) -> Result<()> {
        let ns = &self.pod(pod).netns;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = ns.exec(&["ss", "-Htln", &format!("sport = :{port}")])?;
            if !out.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nothing listens on port {port} in pod {pod} after 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the lab client in a pod (or, with `pod` None, on the host in the lab's cgroup)
    /// to completion and returns one result per connection.
    pub fn client(
        &self,
        pod: Option<&str>,
        uid: Option<u32>,
        args: &[&str],
    ) -> Result<Vec<wire::ClientResult>> {
        let mut placement = match pod {
            Some(p) => self.pod(p).placement(),
            None => Placement {
                netns: None,
                cgroup: Some(&self.cgroup),
                uid: None,
            },
        };
        placement.uid = uid;
        self.client_at(placement, args)
    }

    /// Runs the lab client at any placement (e.g. the node or the remote node namespace).
    pub fn client_at(
        &self,
        placement: Placement<'_>,
        args: &[&str],
    ) -> Result<Vec<wire::ClientResult>> {
        self.tool(placement, "client", args)
    }

    /// Runs any program in a pod's cgroup and netns (as `uid`, if given) to completion and
    /// returns its stdout and stderr. `ip netns exec` would not do: it leaves the caller's
    /// cgroup, where the programs are not attached.
    pub fn run_in(
        &self,
        pod: &str,
        uid: Option<u32>,
        program: &str,
        args: &[&str],
    ) -> Result<String> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let log = self.dir.join(format!("run-{n}.log"));
        let mut placement = self.pod(pod).placement();
        placement.uid = uid;
        let path = which(program)?;
        let mut p = spawn(placement, &log, &path, args)?;
        let status = p.child.wait()?;
        let text = p.log_text();
        if !status.success() {
            bail!("{program} {args:?} in pod {pod} failed ({status}): {text}");
        }
        Ok(text)
    }

    /// The JSON records a sidecar logged.
    pub fn sidecar_log(&self, proc_index: usize) -> Vec<wire::ProxyRecord> {
        self.procs[proc_index]
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Starts `redirectd run` for this lab: attached to the lab's cgroup, pinned under a pin
    /// dir of its own, following a pods file in the lab directory.
    pub fn start_daemon(&mut self, pods_yaml: &str, extra: &[&str]) -> Result<()> {
        let d = Daemon::start(&self.id, &self.dir, &self.cgroup.path, pods_yaml, extra)?;
        self.daemon = Some(d);
        Ok(())
    }

    pub fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("daemon not started")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.kill();
        }
        self.procs.clear();
        self.daemon = None;
        self.pods.clear();
        self.remote_cgroup = None;
        self.remote = None;
        // REDIRECT_LAB_KEEP_LOGS=1 keeps the lab's logs (sidecar, server, daemon) to debug.
        if std::env::var_os("REDIRECT_LAB_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("lab: logs kept in {}", self.dir.display());
        }
    }
}

/// A running `redirectd`; on drop it is stopped and `redirectd uninstall` removes its pins.
pub struct Daemon {
    pub proc: Option<Proc>,
    pub pin_dir: PathBuf,
    pub pods_file: PathBuf,
    pub status_file: PathBuf,
    pub cgroup: PathBuf,
    log: PathBuf,
    extra: Vec<String>,
    /// The executable started by [`Daemon::restart`] (the build's `redirectd` unless
    /// [`Daemon::upgrade_to`] changed it) and its `--log-level`.
    binary: PathBuf,
    log_level: String,
}

impl Daemon {
    /// Starts a daemon named `id` (its pin dir `/sys/fs/bpf/<id>`, its files `<dir>/<id>.*`)
    /// attached to `cgroup`. A lab normally has one ([`Lab::start_daemon`]); a second one, on
    /// another cgroup, plays another node's daemon.
    pub fn start(
        id: &str,
        dir: &Path,
        cgroup: &Path,
        pods_yaml: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let mut d = Self {
            proc: None,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{id}")),
            pods_file: dir.join(format!("{id}.pods.yaml")),
            status_file: dir.join(format!("{id}.status.json")),
            cgroup: cgroup.to_path_buf(),
            log: dir.join(format!("{id}.redirectd.log")),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            binary: bin("redirectd"),
            log_level: "info".into(),
        };
        d.write_pods(pods_yaml)?;
        d.restart()?;
        Ok(d)
    }

    /// (Re)starts the daemon process and waits until its first pass is written.
    pub fn restart(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(&self.status_file);
        let mut args: Vec<String> =
            vec!["--log-level".into(), self.log_level.clone(), "run".into()];
        // `--kubernetes` in the extra arguments replaces the pods file as the source.
        if !self.extra.iter().any(|a| a == "--kubernetes") {
            args.extend(["--pods".into(), self.pods_file.display().to_string()]);
        }
        args.extend([
            "--cgroup".into(),
            self.cgroup.display().to_string(),
            "--pin-dir".into(),
            self.pin_dir.display().to_string(),
            "--status-file".into(),
            self.status_file.display().to_string(),
            "--poll-ms".into(),
            "20".into(),
        ]);
        args.extend(self.extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = spawn(Placement::default(), &self.log, &self.binary, &args)?;
        self.proc = Some(p);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.status_file.exists() {
            if let Some(p) = &mut self.proc {
                if let Ok(Some(status)) = p.child.try_wait() {
                    bail!("redirectd exited ({status}): {}", p.log_text());
                }
            }
            if Instant::now() > deadline {
                bail!("redirectd not ready after 20 s: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replaces the pods file atomically (write + rename), as a careful operator would.
    pub fn write_pods(&self, yaml: &str) -> Result<()> {
        let tmp = self.pods_file.with_extension("tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(yaml.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.pods_file)?;
        Ok(())
    }

    /// `redirectd status --json`.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = run(
            bin("redirectd").to_str().context("non-UTF-8 path")?,
            &[
                "status",
                "--json",
                "--pin-dir",
                self.pin_dir.to_str().context("non-UTF-8 path")?,
                "--status-file",
                self.status_file.to_str().context("non-UTF-8 path")?,
            ],
        )?;
        serde_json::from_str(&out).context("parsing redirectd status --json")
    }

    /// Waits (up to 10 s) until `pred` holds for `redirectd status --json`.
    pub fn wait_status(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = self.status() {
                if pred(&s) {
                    return Ok(s);
                }
                if Instant::now() > deadline {
                    bail!(
                        "timed out waiting for {what}; status: {s:#}\nlog:\n{}",
                        self.log_text()
                    );
                }
            } else if Instant::now() > deadline {
                bail!(
                    "timed out waiting for {what}; no status\nlog:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until exactly the pods `names` (in namespace `lab`) are applied.
    pub fn wait_pods(&self, names: &[&str]) -> Result<serde_json::Value> {
        let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        want.sort();
        self.wait_status(&format!("pods {want:?} applied"), |s| {
            let mut got: Vec<String> = s["pods"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p["name"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            got.sort();
            got == want
        })
    }

    /// The status entry of one pod.
    pub fn pod_status(&self, name: &str) -> Result<serde_json::Value> {
        let s = self.status()?;
        s["pods"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == name).cloned())
            .with_context(|| format!("pod {name} not in status: {s:#}"))
    }

    /// Stops the daemon (SIGTERM). Its programs stay pinned and attached.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate();
        }
    }

    /// Makes the next [`Daemon::restart`] run `binary` with `--log-level log_level` (an
    /// upgrade: another executable, whose kernel programs differ when the level does).
    pub fn upgrade_to(&mut self, binary: PathBuf, log_level: &str) {
        self.binary = binary;
        self.log_level = log_level.into();
    }

    /// `redirectd uninstall` for this daemon's pin dir, with its default drain.
    pub fn uninstall(&self) -> Result<String> {
        self.uninstall_draining(None)
    }

    /// `redirectd uninstall`, with `--drain-ms` when given.
    pub fn uninstall_draining(&self, drain_ms: Option<u64>) -> Result<String> {
        let drain = drain_ms.map(|ms| ms.to_string());
        let mut args = vec![
            "uninstall",
            "--pin-dir",
            self.pin_dir.to_str().context("non-UTF-8 path")?,
        ];
        if let Some(ms) = &drain {
            args.extend(["--drain-ms", ms]);
        }
        run(bin("redirectd").to_str().context("non-UTF-8 path")?, &args)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        // Teardown: the lab's traffic is over, nothing to drain.
        if let Err(e) = self.uninstall_draining(Some(0)) {
            eprintln!("lab: redirectd uninstall failed: {e:#}");
        }
    }
}
