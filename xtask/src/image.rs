//! `cargo xtask image`: the redirectd image, built for real with buildah and no registry.
//!
//! The runtime base is Debian bookworm made by `debootstrap --variant=minbase` and slimmed as
//! Debian's own `bookworm-slim` image is (no documentation, manual pages, locales or apt
//! lists): the same distribution and release `deploy/Dockerfile`'s runtime stage starts
//! `FROM`, with the tools the manifests call in it (`sh` and `sleep` for the
//! uninstall container) and `ca-certificates`, as the Dockerfile installs. The release
//! binaries go where the Dockerfile copies them, with its entrypoint and user (root), so both
//! paths give the same runtime layout (`tests/tests/image.rs` checks that they agree).
//!
//! Everything buildah keeps is private to this build (its storage, run root and network
//! configuration under `target/image/`, removed afterwards); the base rootfs is cached in
//! `target/image/base-<suite>/` and made again only when missing. The result is a
//! docker-archive, `target/image/redirectd.tar`, that `ctr images import` loads.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use redirect_lab::output as run;

/// The Debian release of the runtime base (the Dockerfile's `FROM debian:bookworm-slim`).
pub const SUITE: &str = "bookworm";
/// Extra packages in the base (the Dockerfile's `apt-get install ca-certificates`).
const INCLUDE: &str = "ca-certificates";
/// Where the binaries go (the Dockerfile's `COPY --from=build ... /usr/local/bin/...`).
pub const BINARIES: &[&str] = &["redirectd", "redirect-cni"];
const BIN_DIR: &str = "/usr/local/bin";

/// What was built.
pub struct Built {
    pub archive: PathBuf,
    pub tag: String,
    pub bytes: u64,
}

/// The Debian mirror this machine's apt uses (no other is reachable offline).
fn mirror() -> String {
    let sources = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .or_else(|_| std::fs::read_to_string("/etc/apt/sources.list"))
        .unwrap_or_default();
    sources
        .split_whitespace()
        .find(|w| w.starts_with("http") && w.ends_with("/debian"))
        .unwrap_or("http://deb.debian.org/debian")
        .to_string()
}

/// The slimmed minbase rootfs, made once.
fn base(dir: &Path) -> Result<PathBuf> {
    let base = dir.join(format!("base-{SUITE}"));
    if base.join("usr/bin/mountpoint").exists() {
        return Ok(base);
    }
    let tmp = dir.join(format!("base-{SUITE}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!(
        "image: debootstrap --variant=minbase {SUITE} (once; cached in {})",
        base.display()
    );
    run(Command::new("debootstrap").args([
        "--variant=minbase",
        &format!("--include={INCLUDE}"),
        SUITE,
        tmp.to_str().context("non-UTF-8 path")?,
        &mirror(),
    ]))?;
    // As Debian slims its -slim images: no documentation, manual pages, locales; no apt
    // lists or caches, no logs.
    for d in [
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
        "var/lib/apt/lists",
        "var/cache/apt",
        "var/log",
    ] {
        let p = tmp.join(d);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
    }
    let _ = std::fs::remove_dir_all(&base);
    std::fs::rename(&tmp, &base)?;
    Ok(base)
}

/// Builds the image from the release binaries in `bins`; returns the archive.
pub fn build(root: &Path, bins: &Path) -> Result<Built> {
    crate::setup::packages(&[("buildah", "buildah"), ("debootstrap", "debootstrap")])?;
    let dir = root.join("target/image");
    std::fs::create_dir_all(&dir)?;
    let base = base(&dir)?;
    let tag = redirect_lab::deploy::manifest_image(root)?;
    let storage = dir.join("storage");
    let _ = std::fs::remove_dir_all(&storage);
    let conf = dir.join("containers.conf");
    // buildah's CNI backend would otherwise lock files in the host's /etc/cni/net.d.
    std::fs::write(
        &conf,
        format!(
            "[network]\nnetwork_config_dir = \"{}\"\n",
            dir.join("cni").display()
        ),
    )?;
    let buildah = |args: &[&str]| {
        let mut c = Command::new("buildah");
        c.env("CONTAINERS_CONF", &conf)
            .arg("--root")
            .arg(storage.join("root"))
            .arg("--runroot")
            .arg(storage.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        run(&mut c)
    };
    let result = (|| -> Result<PathBuf> {
        let c = buildah(&["from", "scratch"])?.trim().to_string();
        buildah(&["copy", &c, base.to_str().context("non-UTF-8 path")?, "/"])?;
        for b in BINARIES {
            let src = bins.join(b);
            buildah(&[
                "copy",
                "--chmod",
                "0755",
                &c,
                src.to_str().context("non-UTF-8 path")?,
                &format!("{BIN_DIR}/{b}"),
            ])?;
        }
        buildah(&[
            "config",
            "--entrypoint",
            &format!("[\"{BIN_DIR}/redirectd\"]"),
            "--user",
            "0:0",
            "--workingdir",
            "/",
            &c,
        ])?;
        buildah(&["commit", "--format", "docker", &c, &tag])?;
        let archive = dir.join("redirectd.tar");
        let _ = std::fs::remove_file(&archive);
        buildah(&[
            "push",
            &tag,
            &format!("docker-archive:{}:{tag}", archive.display()),
        ])?;
        Ok(archive)
    })();
    // buildah's storage is only a step on the way to the archive.
    let _ = std::fs::remove_dir_all(&storage);
    let archive = result?;
    let bytes = std::fs::metadata(&archive)?.len();
    Ok(Built {
        archive,
        tag,
        bytes,
    })
}
