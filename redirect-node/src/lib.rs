//! A real node for the tests, the demo and the benchmark: Debian's containerd 1.6 and runc in
//! the lab's node network namespace, with a mount and a pid namespace of their own (the
//! node's /run, /etc/cni/net.d, /opt/cni/bin, bpffs and cgroup v2; never this machine's),
//! driven through the CRI as kubelet drives them ([`cri`]; a manifest's pod through
//! [`kubelet`]). Images come from docker-archives (`cargo xtask image`, and a pause image made
//! here from busybox-static): no registry.
//!
//! Everything is removed when the [`Node`] is dropped, even after a failed test: the pods
//! (stopped and removed through the CRI, so the CNI chain's DEL runs), then the node's pid 1,
//! whose death takes every process of its pid namespace (containerd, shims, containers) and
//! then its mount namespace (root filesystems, pods' namespaces, its bpffs and pins, the shim
//! sockets containerd 1.6 keeps under `/run/containerd/s`, libcni's cache in the overlays),
//! and the pods' cgroups in every hierarchy.

pub mod cluster;
pub mod cri;
pub mod fake_apiserver;
pub mod kubelet;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ImageSpec, Int64Value, KeyValue, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, Mount, PodSandboxConfig,
    PodSandboxMetadata,
};
use redirect_lab::{eventually, output as run, spawn, which, Lab, Placement, Proc};
use serde_json::{json, Value};

pub use cri::Cri;

/// The pause image's name (its config's `sandbox_image`).
pub const PAUSE_IMAGE: &str = "localhost/rlab-pause:1";
/// Where `cargo xtask image` writes the redirectd image.
pub const IMAGE_ENV: &str = "REDIRECTD_IMAGE";
/// Where the host's build output is mounted in the lab's containers (read-only): the lab's
/// tools and Envoy run from there on the image's own Debian userland.
pub const LAB_MOUNT: &str = "/rlab";

/// containerd, its CRI client, and what the run made.
pub struct Node {
    pub dir: PathBuf,
    pub cri: Cri,
    socket: PathBuf,
    /// The pods' cgroup parent, relative to each hierarchy's root (cgroup v2's is the lab's
    /// cgroup: the daemon attached there sees them).
    pub cgroup_parent: String,
    /// The DaemonSets' pods' cgroup parent.
    pub system_cgroup_parent: String,
    /// The lab's cgroup: runc makes it in every v1 hierarchy too (as the pods' parent).
    lab_cgroup: PathBuf,
    /// The redirectd image's name, as the manifests run it.
    pub image: String,
    /// The node's pid 1, as this machine sees it.
    init_pid: u32,
    /// The node's network namespace (hostNetwork pods', and where probes are made).
    pub node_netns: PathBuf,
    /// `unshare`, the node's pid 1's parent: killing it kills the node.
    containerd: Option<Proc>,
}

/// A pod as kubelet asks for it.
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

/// A running pod: its sandbox id and the config its containers are created with.
pub struct Pod {
    pub id: String,
    pub config: PodSandboxConfig,
}

/// The redirectd image archive `cargo xtask image` built, or a clear failure.
pub fn image_archive() -> Result<PathBuf> {
    let path = std::env::var(IMAGE_ENV).map_err(|_| {
        anyhow::anyhow!("{IMAGE_ENV} is not set: run the tests with `cargo xtask test`, which builds the image (or run `cargo xtask image` and set it to target/image/redirectd.tar)")
    })?;
    let path = PathBuf::from(path);
    if !path.is_file() {
        bail!("{IMAGE_ENV}: {} is missing", path.display());
    }
    Ok(path)
}

/// The image name a docker-archive carries.
fn archive_tag(archive: &Path) -> Result<String> {
    let manifest = run(Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg("manifest.json"))?;
    let m: Value = serde_json::from_str(&manifest)?;
    m[0]["RepoTags"][0]
        .as_str()
        .map(String::from)
        .context("the image archive has no tag")
}

/// A pause image: busybox-static sleeping until killed (containerd stops a sandbox with
/// SIGKILL), as a docker-archive.
fn pause_archive(dir: &Path) -> Result<PathBuf> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .context("busybox is missing: `cargo xtask setup` installs busybox-static")?;
    let work = dir.join("pause");
    std::fs::create_dir_all(work.join("rootfs/bin"))?;
    std::fs::copy(busybox, work.join("rootfs/bin/busybox"))?;
    run(Command::new("tar")
        .arg("-C")
        .arg(work.join("rootfs"))
        .arg("-cf")
        .arg(work.join("layer.tar"))
        .arg("."))?;
    let sum = run(Command::new("sha256sum").arg(work.join("layer.tar")))?;
    let sum = sum.split_whitespace().next().context("sha256sum")?;
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/bin/busybox", "sleep", "2147483647"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{sum}")]},
    });
    std::fs::write(work.join("config.json"), serde_json::to_vec(&config)?)?;
    let manifest =
        json!([{"Config": "config.json", "RepoTags": [PAUSE_IMAGE], "Layers": ["layer.tar"]}]);
    std::fs::write(work.join("manifest.json"), serde_json::to_vec(&manifest)?)?;
    let archive = dir.join("pause.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&work)
        .arg("-cf")
        .arg(&archive)
        .args(["manifest.json", "config.json", "layer.tar"]))?;
    Ok(archive)
}

impl Node {
    /// Starts a node in `lab`'s node network namespace: a mount and a pid namespace of its
    /// own (so the manifests' host paths are the node's, not this machine's), the CNI network
    /// `primary` (the node's primary CNI, e.g. [`Lab::primary_cni`]) as its only
    /// configuration in /etc/cni/net.d, and containerd; imports the pause and redirectd
    /// images.
    ///
    /// The node's namespaces: pid 1 is a shell that sets up the mounts and waits for
    /// containerd (`nsenter -t 1 -m` from a hostPID container lands in the node's mount
    /// namespace, as on a real node); /run is a tmpfs of its own (/run/netns a shared mount,
    /// as `ip netns` makes it, where containerd puts pods' namespaces); /etc, /opt and
    /// /var/lib are overlays whose changes stay in the node's directory (/etc/cni/net.d,
    /// /opt/cni/bin, libcni's cache); /sys/fs/bpf a bpffs of its own, private as on a host
    /// without systemd; cgroup v2 (/sys/fs/cgroup/unified, this machine's hybrid layout) the
    /// lab's cgroup. The machine's own mounts there are taken off in the node first (not
    /// stacked: containerd and runc look a path's mount up by the first match). When pid 1
    /// dies, the kernel kills every process of the node and its mounts go: nothing of it
    /// outlives the [`Node`].
    pub fn start(lab: &Lab, primary: &Value) -> Result<Self> {
        let archive = image_archive()?;
        let dir = lab.dir.join("node");
        for d in ["/etc", "/opt", "/var/lib"] {
            if dir.starts_with(d) {
                bail!(
                    "the lab's directory {} is under {d}, which the node overlays: set TMPDIR elsewhere",
                    dir.display()
                );
            }
        }
        for d in ["etc", "opt", "var-lib"] {
            std::fs::create_dir_all(dir.join("host").join(d).join("upper"))?;
            std::fs::create_dir_all(dir.join("host").join(d).join("work"))?;
        }
        // What the node's /opt/cni/bin and /etc/cni/net.d start with: Debian's plugins (the
        // DaemonSet's install-cni adds redirect-cni) and the primary CNI's configuration.
        let bin_dir = dir.join("host/opt/upper/cni/bin");
        let conf_dir = dir.join("host/etc/upper/cni/net.d");
        std::fs::create_dir_all(&bin_dir)?;
        std::fs::create_dir_all(&conf_dir)?;
        for e in std::fs::read_dir(redirect_lab::cni::DEBIAN_CNI_DIR)? {
            let e = e?;
            std::os::unix::fs::symlink(e.path(), bin_dir.join(e.file_name()))?;
        }
        std::fs::write(
            conf_dir.join("10-rlab.conflist"),
            serde_json::to_vec_pretty(primary)?,
        )?;
        let socket = dir.join("containerd.sock");
        let lab_name = lab
            .cgroup
            .path
            .file_name()
            .context("the lab's cgroup has no name")?
            .to_string_lossy()
            .into_owned();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  disable_apparmor = true
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
            opt = dir.join("opt").display(),
        );
        let config_path = dir.join("containerd.toml");
        std::fs::write(&config_path, config)?;
        let containerd = which("containerd")
            .context("containerd is missing: `cargo xtask setup` installs it")?;
        let host = dir.join("host");
        let init = format!(
            r#"set -e
mount -t tmpfs -o mode=0755 rlab-node-run /run
mkdir -p /run/netns
mount --bind /run/netns /run/netns
mount --make-shared /run/netns
mount -t overlay -o lowerdir=/etc,upperdir={host}/etc/upper,workdir={host}/etc/work rlab-node-etc /etc
mount -t overlay -o lowerdir=/opt,upperdir={host}/opt/upper,workdir={host}/opt/work rlab-node-opt /opt
mount -t overlay -o lowerdir=/var/lib,upperdir={host}/var-lib/upper,workdir={host}/var-lib/work rlab-node-var-lib /var/lib
while mountpoint -q /sys/fs/bpf; do umount -l /sys/fs/bpf; done
mount -t bpf rlab-node-bpffs /sys/fs/bpf
mount --make-private /sys/fs/bpf
mkdir /run/rlab-cgroup
mount --bind {cgroup} /run/rlab-cgroup
while mountpoint -q /sys/fs/cgroup/unified; do umount -l /sys/fs/cgroup/unified; done
mount --move /run/rlab-cgroup /sys/fs/cgroup/unified
rmdir /run/rlab-cgroup
{containerd} --config {config} &
wait $!
"#,
            host = host.display(),
            cgroup = lab.cgroup.path.display(),
            containerd = containerd.display(),
            config = config_path.display(),
        );
        let unified = Path::new("/sys/fs/cgroup/unified");
        if !unified.is_dir() {
            bail!(
                "the node expects this machine's hybrid cgroup layout (cgroup v2 at {}): not found",
                unified.display()
            );
        }
        let proc = spawn(
            Placement {
                netns: Some(&lab.node),
                cgroup: None,
                uid: None,
            },
            &dir.join("containerd.log"),
            Path::new("/usr/bin/unshare"),
            &[
                "--mount",
                "--pid",
                "--fork",
                "--mount-proc",
                "--propagation",
                "slave",
                "--kill-child=SIGKILL",
                "--",
                "/bin/sh",
                "-c",
                &init,
            ],
        )?;
        let log = || std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
        let init_pid = eventually(Duration::from_secs(10), "the node's pid 1", || {
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", proc.pid())).ok()?;
            children.split_whitespace().next()?.parse::<u32>().ok()
        })
        .with_context(log)?;
        let cri = eventually(Duration::from_secs(10), "containerd's CRI socket", || {
            socket
                .exists()
                .then(|| Cri::connect(&socket).ok())
                .flatten()
        })
        .with_context(log)?;
        let mut node = Self {
            dir: dir.clone(),
            cri,
            socket,
            cgroup_parent: format!("/{lab_name}/pods"),
            system_cgroup_parent: format!("/{lab_name}/system"),
            lab_cgroup: lab.cgroup.path.clone(),
            image: archive_tag(&archive)?,
            init_pid,
            node_netns: lab.node.path(),
            containerd: Some(proc),
        };
        node.import(&pause_archive(&dir)?)?;
        node.import(&archive)?;
        Ok(node)
    }

    /// Runs a command in the node's mount namespace (the node's files, through its own
    /// symlinks), with this machine's binaries.
    pub fn in_node(&self, cmd: &[&str]) -> Result<String> {
        run(Command::new("nsenter")
            .arg(format!("--mount=/proc/{}/ns/mnt", self.init_pid))
            .arg("--")
            .args(cmd))
    }

    /// A path of the node's filesystem (its mount namespace), as this process reaches it.
    /// Only for paths with no absolute symlink on the way (one would resolve in this
    /// machine's root): /var/run is not one of them, see [`Node::in_node`].
    pub fn path(&self, node_path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.init_pid))
            .join(node_path.trim_start_matches('/'))
    }

    /// Sends `signal` to the node's process `pid` (a pid of the node's pid namespace, as the
    /// runtime reports it).
    pub fn kill(&self, pid: u32, signal: i32) -> Result<()> {
        let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
        let node_ns = ns(&self.init_pid.to_string()).context("the node is not running")?;
        for e in std::fs::read_dir("/proc")?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(host_pid) = name.parse::<i32>() else {
                continue;
            };
            if ns(&name).as_ref() != Some(&node_ns) {
                continue;
            }
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let inner = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(String::from));
            if inner.as_deref() == Some(&pid.to_string()) {
                // SAFETY: kill(2) of a process of the node this harness started.
                if unsafe { libc::kill(host_pid, signal) } != 0 {
                    bail!("kill {host_pid}: {}", std::io::Error::last_os_error());
                }
                return Ok(());
            }
        }
        bail!("no process {pid} in the node")
    }

    /// The node's mount table (its pid 1's `mountinfo`).
    pub fn mountinfo(&self) -> Result<String> {
        Ok(std::fs::read_to_string(format!(
            "/proc/{}/mountinfo",
            self.init_pid
        ))?)
    }

    /// The node's CNI configuration files (its /etc/cni/net.d), by name.
    pub fn cni_conf(&self) -> Result<Vec<(String, Value)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.path("/etc/cni/net.d"))? {
            let e = e?;
            let text = std::fs::read_to_string(e.path())?;
            if let Ok(v) = serde_json::from_str(&text) {
                out.push((e.file_name().to_string_lossy().into_owned(), v));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Imports a docker-archive into the namespace the CRI uses.
    pub fn import(&mut self, archive: &Path) -> Result<()> {
        run(Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(archive))
        .with_context(|| format!("importing {}", archive.display()))?;
        Ok(())
    }

    /// Runs a sandbox for `pod` as kubelet does (metadata, log directory, cgroup parent);
    /// the runtime runs the CNI chain.
    pub fn run_pod(&mut self, pod: &PodSpec<'_>) -> Result<Pod> {
        let config = self.pod_config(pod)?;
        let id = self.cri.run_pod_sandbox(config.clone())?;
        Ok(Pod { id, config })
    }

    /// The sandbox config kubelet gives `pod` (its log directory made).
    pub fn pod_config(&self, pod: &PodSpec<'_>) -> Result<PodSandboxConfig> {
        let logs = self
            .dir
            .join("logs")
            .join(format!("{}_{}_{}", pod.namespace, pod.name, pod.uid));
        std::fs::create_dir_all(&logs)?;
        Ok(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: pod.name.into(),
                uid: pod.uid.into(),
                namespace: pod.namespace.into(),
                attempt: 0,
            }),
            hostname: pod.name.into(),
            log_directory: logs.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// Another CRI connection (one per thread, for kubelet's concurrent calls).
    pub fn connect(&self) -> Result<Cri> {
        Cri::connect(&self.socket)
    }

    /// A container of the redirectd image running `command` as `uid`, with the host's build
    /// output read-only at [`LAB_MOUNT`], and each `(host path, container path)` of `mounts`
    /// read-only too.
    pub fn container(
        &self,
        name: &str,
        uid: i64,
        command: &[&str],
        mounts: &[(&Path, &str)],
    ) -> ContainerConfig {
        let target = redirect_lab::bin("redirect-lab");
        let build_dir = target.parent().map(Path::to_path_buf).unwrap_or_default();
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            // The image's entrypoint is redirectd: the lab's containers replace it.
            command: command.iter().map(|s| s.to_string()).collect(),
            envs: vec![KeyValue {
                key: "RUST_BACKTRACE".into(),
                value: "1".into(),
            }],
            mounts: std::iter::once((build_dir.as_path(), LAB_MOUNT))
                .chain(mounts.iter().copied())
                .map(|(host, container)| Mount {
                    container_path: container.into(),
                    host_path: host.display().to_string(),
                    readonly: true,
                    ..Default::default()
                })
                .collect(),
            log_path: format!("{name}.log"),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    run_as_user: Some(Int64Value { value: uid }),
                    run_as_group: Some(Int64Value { value: uid }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The host path of a container's log.
    pub fn log_path(&self, pod: &Pod, name: &str) -> PathBuf {
        PathBuf::from(&pod.config.log_directory).join(format!("{name}.log"))
    }

    fn cleanup(&mut self) {
        // Pods first, through the CRI: the CNI chain's DEL runs as kubelet would have it.
        if let Ok(pods) = self.cri.pods() {
            for p in pods {
                if let Err(e) = self.cri.remove_pod(&p) {
                    eprintln!("node: removing pod {p}: {e:#}");
                }
            }
        }
        // Then the node: its pid 1 dies with `unshare` (--kill-child), and with it every
        // process of its pid namespace (containerd, shims, containers) and, once they are
        // gone, its mount namespace (container root filesystems, pods' namespaces, the
        // node's bpffs and every pin in it, shim sockets under its /run).
        if let Some(mut p) = self.containerd.take() {
            p.kill();
        }
        let init = PathBuf::from(format!("/proc/{}", self.init_pid));
        if eventually(Duration::from_secs(10), "the node's pid 1 exits", || {
            (!init.exists()).then_some(())
        })
        .is_err()
        {
            eprintln!(
                "node: pid {} (the node's pid 1) did not exit",
                self.init_pid
            );
        }
        // The pods' cgroups in every hierarchy (runc with the cgroupfs driver makes them, and
        // their parents, in the v1 controllers too; kubelet would remove them).
        let rel = self.cgroup_parent.trim_start_matches('/');
        let top = rel.split('/').next().unwrap_or_default();
        if !top.is_empty() {
            remove_cgroup_tree(&self.lab_cgroup.join(top));
            for e in std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
            {
                let t = e.path().join(top);
                if t != self.lab_cgroup && !self.lab_cgroup.starts_with(&t) {
                    remove_cgroup_tree(&t);
                }
            }
        }
        let _ = std::fs::remove_dir_all(self.dir.join("root"));
        let _ = std::fs::remove_dir_all(self.dir.join("state"));
    }
}

/// Removes a cgroup directory and every one below it, deepest first (processes left in them
/// are killed first, where cgroup.kill exists).
fn remove_cgroup_tree(path: &Path) {
    if !path.is_dir() {
        return;
    }
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path());
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("node: could not remove cgroup {}", path.display());
}

impl Drop for Node {
    fn drop(&mut self) {
        self.cleanup();
    }
}
