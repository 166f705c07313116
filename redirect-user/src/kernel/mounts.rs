//! The filesystems the daemon needs: cgroup v2 (where the socket hooks attach) and bpffs
//! (where programs, links and maps are pinned). Found from `/proc/self/mountinfo`, never
//! assumed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use rustix::mount::{mount, mount_change, MountFlags, MountPropagationFlags};

/// Filesystem magic numbers from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
pub const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The magic number of the filesystem `path` is on.
pub fn fs_type(path: &Path) -> rustix::io::Result<i64> {
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between architectures
    rustix::fs::statfs(path).map(|st| st.f_type as i64)
}

/// Mount points of filesystem type `fstype`, from `/proc/self/mountinfo`.
pub fn mount_points(fstype: &str) -> Result<Vec<PathBuf>> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| {
            // "... mount_point options [optional fields] - fstype source super_options"
            let (left, right) = line.split_once(" - ")?;
            let ty = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (ty == fstype).then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v as char);
                i += 4;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// The cgroup v2 mount point (the unified hierarchy's root).
pub fn cgroup2_root() -> Result<PathBuf> {
    mount_points("cgroup2")?
        .into_iter()
        .next()
        .context("no cgroup v2 filesystem is mounted (see /proc/self/mountinfo); mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup`")
}

fn is_bpffs(path: &Path) -> Result<bool> {
    Ok(fs_type(path).with_context(|| format!("statfs {}", path.display()))? == BPF_FS_MAGIC)
}

/// On a node with hybrid cgroups (the v1 controllers on a tmpfs at /sys/fs/cgroup, cgroup v2
/// at /sys/fs/cgroup/unified, as on many older distributions), `--cgroup` names the tmpfs
/// (the manifest mounts the host's /sys/fs/cgroup): the cgroup v2 mount below it, said in the
/// log. `None` when `path` is not such a tmpfs.
pub fn hybrid_unified(path: &Path) -> Option<PathBuf> {
    if fs_type(path).ok()? != TMPFS_MAGIC {
        return None;
    }
    let unified = path.join("unified");
    (fs_type(&unified).ok()? == CGROUP2_SUPER_MAGIC).then(|| {
        log::info!(
            "--cgroup {}: a hybrid cgroup layout (cgroup v1 controllers on a tmpfs); attaching to its cgroup v2 mount {}",
            path.display(),
            unified.display()
        );
        unified
    })
}

/// Makes sure `pin_dir` exists on a bpffs. If its parent is `/sys/fs/bpf` and nothing is
/// mounted there, mounts bpffs there (as systemd would at boot).
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir
        .parent()
        .with_context(|| format!("pin dir {} has no parent", pin_dir.display()))?;
    if !parent.exists() {
        bail!(
            "{} does not exist; the pin dir must be inside a bpffs mount",
            parent.display()
        );
    }
    if !is_bpffs(parent)? {
        if parent == Path::new("/sys/fs/bpf") {
            mount("bpf", "/sys/fs/bpf", "bpf", MountFlags::empty(), None)
                .context("mounting bpffs on /sys/fs/bpf (needs CAP_SYS_ADMIN)")?;
            log::info!("mounted bpffs on /sys/fs/bpf");
        } else {
            bail!(
                "{} is not on a bpffs; choose a --pin-dir under a bpffs mount such as /sys/fs/bpf",
                parent.display()
            );
        }
    }
    for sub in ["", "maps", "links", "pods"] {
        let d = pin_dir.join(sub);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    Ok(())
}

/// What [`prepare_host`] found and did, one line a path, for the init container's log.
pub type Prepared = Vec<String>;

/// The DaemonSet's first init container (`redirectd prepare-host`): in the host's mount
/// namespace (`host_mnt_ns`, pid 1's: the pod has hostPID), mounts bpffs on `bpffs` unless
/// one is there, makes `netns_dir` (where the runtime mounts pods' network namespaces) a
/// mount of its own as `ip netns` does, and makes both mounts shared. A container may mount
/// a host path with propagation (the daemon's HostToContainer) only from a shared or slave
/// mount, and containerd looks the mount up by the path's text (`/var/run/netns` is found
/// on `/`, not through the /var/run symlink): hosts without systemd leave their mounts
/// private, and the daemon's container would not be created ("not a shared or slave
/// mount"). Done with this executable's own system calls, so the host needs no shell or
/// mount tools (Cilium's init containers run the host's). Call it before any thread exists:
/// a process enters another mount namespace only while it has one thread.
pub fn prepare_host(host_mnt_ns: &Path, bpffs: &Path, netns_dir: &Path) -> Result<Prepared> {
    let what_to_do = format!(
        "otherwise prepare the host yourself: `mount -t bpf bpf {0}` if it is not mounted, \
         `mount --make-shared {0}`, and `mount --bind {1} {1}; mount --make-shared {1}`",
        bpffs.display(),
        netns_dir.display()
    );
    let ns = std::fs::File::open(host_mnt_ns).with_context(|| {
        format!(
            "opening the host's mount namespace {} (the pod needs hostPID and a privileged container; {what_to_do})",
            host_mnt_ns.display(),
        )
    })?;
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&ns),
        Some(rustix::thread::LinkNameSpaceType::Mount),
    )
    .with_context(|| {
        format!(
            "entering the host's mount namespace {} (needs CAP_SYS_ADMIN; {what_to_do})",
            host_mnt_ns.display(),
        )
    })?;
    let mut done = Vec::new();
    for (path, bpf) in [(bpffs, true), (netns_dir, false)] {
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        let mut line = format!("{}: ", path.display());
        if bpf && !is_bpffs(path)? {
            mount("bpf", path, "bpf", MountFlags::empty(), None).with_context(|| {
                format!(
                    "mounting bpffs on {} in the host's mount namespace",
                    path.display()
                )
            })?;
            line += "bpffs mounted now; ";
        } else if !bpf && propagation_of(path).is_err() {
            mount(path, path, "", MountFlags::BIND, None)
                .with_context(|| format!("bind-mounting {0} on itself", path.display()))?;
            line += "made a mount of its own; ";
        }
        if propagation_of(path)?.contains("shared:") {
            line += "already a shared mount";
        } else {
            mount_change(path, MountPropagationFlags::SHARED)
                .with_context(|| format!("making {} a shared mount", path.display()))?;
            line += "made a shared mount (it was not)";
        }
        done.push(line);
    }
    Ok(done)
}

/// The optional fields of the mount at `path` in `/proc/self/mountinfo` (`shared:N`,
/// `master:N`, ...; empty for a private mount).
fn propagation_of(path: &Path) -> Result<String> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let want = path.to_string_lossy();
    info.lines()
        .rev() // the last mount on a path is the one seen there
        .filter_map(|line| {
            let (left, _) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split_whitespace().collect();
            (unescape(fields.get(4)?) == want).then(|| fields[6..].join(" "))
        })
        .next()
        .with_context(|| format!("{} is not a mount point", path.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn prepare_host_says_what_to_do_when_it_cannot_enter_the_host() {
        let e = super::prepare_host(
            std::path::Path::new("/nonexistent/ns/mnt"),
            std::path::Path::new("/sys/fs/bpf"),
            std::path::Path::new("/run/netns"),
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("hostPID"), "{msg}");
        assert!(msg.contains("mount --make-shared /sys/fs/bpf"), "{msg}");
        assert!(msg.contains("mount --bind /run/netns /run/netns"), "{msg}");
    }

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(super::unescape(r"/a\040b"), "/a b");
        assert_eq!(super::unescape("/plain"), "/plain");
    }
}
