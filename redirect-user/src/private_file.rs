//! The daemon's own files (the status file, the CNI registrations): written whole (a
//! temporary file, then a rename), readable by root only (0600), and only in a directory that
//! no one but root can write, so a planted symlink or file cannot redirect what root writes.

use std::{
    fs::{DirBuilder, OpenOptions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::Path,
};

use anyhow::{bail, Context as _, Result};

/// Makes sure `path` can be written safely: its directory exists (created 0700 if not) and is
/// a real directory owned by root that no one else can write, and `path` itself, if it exists,
/// is a regular file (not a link, a device or a directory).
pub fn check(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => bail!(
            "{}: give an absolute path in a directory only root can write",
            path.display()
        ),
    };
    if !dir.is_absolute() {
        bail!("{}: give an absolute path", path.display());
    }
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let meta =
        std::fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !meta.is_dir() {
        bail!(
            "refusing to write {}: {} is not a directory (a symbolic link?)",
            path.display(),
            dir.display()
        );
    }
    let uid = rustix::process::geteuid().as_raw();
    if meta.uid() != uid || meta.mode() & 0o022 != 0 {
        bail!(
            "refusing to write {}: {} (owner uid {}, mode {:o}) can be written by others; give a path in a directory only uid {uid} can write",
            path.display(),
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => bail!(
            "refusing to write {}: it exists and is not a regular file",
            path.display()
        ),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `bytes` to `path` whole, mode 0600, after [`check`]: a new temporary file (never one
/// that exists, never through a link), then a rename over `path`.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    check(path)?;
    let tmp = path.with_extension("tmp");
    let open = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
    };
    let mut f = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // A leftover of a write that died (or something planted): unlink removes the
            // entry itself, never what a link points to.
            std::fs::remove_file(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
            open()
        }
        other => other,
    }
    .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn dir(mode: u32) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "redirectd-private-{}-{mode:o}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
        d
    }

    #[test]
    fn writes_0600_and_replaces_a_planted_link_not_its_target() {
        let d = dir(0o700);
        let target = d.join("target");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, d.join("status.tmp")).unwrap();
        let path = d.join("status.json");
        write(&path, b"{}").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_a_world_writable_directory_and_a_non_file() {
        let d = dir(0o1777);
        let err = write(&d.join("status.json"), b"{}").unwrap_err();
        assert!(
            format!("{err:#}").contains("can be written by others"),
            "{err:#}"
        );
        std::fs::remove_dir_all(&d).unwrap();
        let d = dir(0o700);
        std::fs::create_dir(d.join("status.json")).unwrap();
        let err = write(&d.join("status.json"), b"{}").unwrap_err();
        assert!(format!("{err:#}").contains("not a regular file"), "{err:#}");
        std::fs::remove_dir_all(&d).unwrap();
        assert!(check(Path::new("status.json")).is_err());
    }
}
