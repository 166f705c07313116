//! A real node for the tests: Debian's containerd 1.6 and runc, started with a configuration
//! of their own (root, state, CNI directories private to the run; never the host's
//! `/etc/cni/net.d` or `/opt/cni/bin`) inside the lab's node network namespace, and driven
//! through the CRI as kubelet drives them ([`cri`]). Images come from docker-archives
//! (`cargo xtask image`, and a pause image made here from busybox-static): no registry.
//!
//! Everything is removed when the [`Node`] is dropped, even after a failed test: the pods
//! (stopped and removed through the CRI, so the CNI chain's DEL runs), containerd and its
//! shims (killed by pid), what they mounted, the shims' sockets containerd 1.6 keeps under
//! `/run/containerd/s` whatever its configuration says, libcni's cached results, and the
//! pods' cgroups in every hierarchy.

pub mod cri;

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
    /// The pods' cgroup parent, relative to each hierarchy's root (under the lab's cgroup, so
    /// the lab's daemon sees them).
    pub cgroup_parent: String,
    /// The lab's cgroup: runc makes it in every v1 hierarchy too (as the pods' parent).
    lab_cgroup: PathBuf,
    /// The redirectd image's name, as the manifests run it.
    pub image: String,
    /// The CNI network's name (libcni caches results under it).
    net_name: String,
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
    /// Starts containerd in `lab`'s node namespace with the CNI network `conflist` (from
    /// [`Lab::cni_network`]) as its only network, and imports the pause and redirectd images.
    pub fn start(lab: &Lab, conflist: &Value) -> Result<Self> {
        let archive = image_archive()?;
        let dir = lab.dir.join("node");
        let bin_dir = dir.join("cni-bin");
        let conf_dir = dir.join("cni-conf");
        std::fs::create_dir_all(&bin_dir)?;
        std::fs::create_dir_all(&conf_dir)?;
        // One bin dir, as containerd takes: Debian's plugins and redirect-cni.
        for e in std::fs::read_dir(redirect_lab::cni::DEBIAN_CNI_DIR)? {
            let e = e?;
            std::os::unix::fs::symlink(e.path(), bin_dir.join(e.file_name()))?;
        }
        std::os::unix::fs::symlink(
            redirect_lab::bin("redirect-cni"),
            bin_dir.join("redirect-cni"),
        )?;
        let net_name = conflist["name"]
            .as_str()
            .context("conflist name")?
            .to_string();
        std::fs::write(
            conf_dir.join("10-rlab.conflist"),
            serde_json::to_vec_pretty(conflist)?,
        )?;
        let socket = dir.join("containerd.sock");
        let lab_cgroup = lab
            .cgroup
            .path
            .strip_prefix(redirect_lab::cgroup2_root()?)
            .context("the lab's cgroup is not under the cgroup2 root")?;
        let cgroup_parent = format!("/{}/pods", lab_cgroup.display());
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
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
            opt = dir.join("opt").display(),
            bin = bin_dir.display(),
            conf = conf_dir.display(),
        );
        let config_path = dir.join("containerd.toml");
        std::fs::write(&config_path, config)?;
        let containerd = which("containerd")
            .context("containerd is missing: `cargo xtask setup` installs it")?;
        let proc = spawn(
            Placement {
                netns: Some(&lab.node),
                cgroup: None,
                uid: None,
            },
            &dir.join("containerd.log"),
            &containerd,
            &["--config", config_path.to_str().context("non-UTF-8 path")?],
        )?;
        let cri = eventually(Duration::from_secs(10), "containerd's CRI socket", || {
            socket
                .exists()
                .then(|| Cri::connect(&socket).ok())
                .flatten()
        })
        .with_context(|| std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default())?;
        let mut node = Self {
            dir: dir.clone(),
            cri,
            socket,
            cgroup_parent,
            lab_cgroup: lab.cgroup.path.clone(),
            image: archive_tag(&archive)?,
            net_name,
            containerd: Some(proc),
        };
        node.import(&pause_archive(&dir)?)?;
        node.import(&archive)?;
        Ok(node)
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
        let logs = self
            .dir
            .join("logs")
            .join(format!("{}_{}_{}", pod.namespace, pod.name, pod.uid));
        std::fs::create_dir_all(&logs)?;
        let config = PodSandboxConfig {
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
        };
        let id = self.cri.run_pod_sandbox(config.clone())?;
        Ok(Pod { id, config })
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
        // The shims' sockets, named in their bundles' `address` files.
        let mut shim_sockets = Vec::new();
        let tasks = self.dir.join("state/io.containerd.runtime.v2.task/k8s.io");
        for e in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
            if let Ok(a) = std::fs::read_to_string(e.path().join("address")) {
                shim_sockets.push(a.trim().trim_start_matches("unix://").to_string());
            }
        }
        if let Some(mut p) = self.containerd.take() {
            p.kill();
        }
        // Shims outlive containerd: each names our socket on its command line.
        let ours = self.socket.display().to_string();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("containerd-shim") && cmdline.contains(&ours) {
                // SAFETY: kill(2) of a shim this node started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for s in shim_sockets {
            let _ = std::fs::remove_file(s);
        }
        // Whatever is still mounted under the node's directory, deepest first.
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = self.dir.display().to_string();
        let mut mounts: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            if let Ok(c) = std::ffi::CString::new(m) {
                // SAFETY: umount2(2) of a path under our own directory.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        // libcni's cache of our network's results.
        for d in ["/var/lib/cni/results", "/var/lib/cni/cache/results"] {
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with(&self.net_name) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        // The pods' cgroups in every hierarchy (runc with the cgroupfs driver makes them, and
        // their parents, in the v1 controllers too; kubelet would remove them). In the lab's
        // own cgroup2 hierarchy only the pods' (the lab removes its own cgroup).
        remove_cgroup_tree(&self.lab_cgroup.join("pods"));
        let rel = self.cgroup_parent.trim_start_matches('/');
        let lab_top = rel.split('/').next().unwrap_or_default();
        if !lab_top.is_empty() {
            for e in std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
            {
                let top = e.path().join(lab_top);
                if top != self.lab_cgroup && !self.lab_cgroup.starts_with(&top) {
                    remove_cgroup_tree(&top);
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
