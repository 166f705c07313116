//! The filesystems the daemon needs: cgroup v2 (where the socket hooks attach) and bpffs
//! (where programs, links and maps are pinned). Found from `/proc/self/mountinfo`, never
//! assumed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use rustix::mount::{mount, MountFlags};

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

#[cfg(test)]
mod tests {
    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(super::unescape(r"/a\040b"), "/a b");
        assert_eq!(super::unescape("/plain"), "/plain");
    }
}
