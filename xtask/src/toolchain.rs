//! The two toolchains, pinned, installed when missing, and the cargo every task runs.
//!
//! - The host crates (aya 0.16 needs rustc 1.98 or newer) build with [`HOST`]. xtask itself
//!   builds with whatever toolchain `cargo xtask` found (a fresh machine's stable may be
//!   older; xtask needs nothing new), installs [`HOST`] and runs every cargo with
//!   `RUSTUP_TOOLCHAIN` set to it. The pin is here, not in a root `rust-toolchain.toml`:
//!   with rustup's auto-install off (`RUSTUP_AUTO_INSTALL=0`, as on the dev boxes and CI),
//!   such a file makes `cargo xtask` itself fail on a fresh machine before xtask can install
//!   anything.
//! - The kernel programs build with the nightly pinned in `redirect-ebpf/rust-toolchain.toml`
//!   (rust-src for `-Z build-std=core`, clippy for the lint); redirect-user/build.rs reads the
//!   same file.

use std::{path::Path, process::Command};

use anyhow::{anyhow, bail, Context as _, Result};

/// The host toolchain: the daemon, the CNI plugin, the lab, the tests, fmt and clippy.
pub const HOST: &str = "1.99.1";

/// The environment variable rustup's proxies take the toolchain from, before any file.
const RUSTUP_TOOLCHAIN: &str = "RUSTUP_TOOLCHAIN";

/// Installs both pinned toolchains if missing (with their components), then makes every
/// cargo this process starts use [`HOST`]. Call before any thread is started.
pub fn ensure(root: &Path) -> Result<()> {
    let installed = rustup(&["toolchain", "list"])?;
    let have = |name: &str| {
        installed.lines().any(|l| {
            l.split_whitespace().next() == Some(name) || l.starts_with(&format!("{name}-"))
        })
    };
    let ebpf = ebpf_channel(root)?;
    for (name, components) in [
        (HOST, ["clippy", "rustfmt"]),
        (&ebpf, ["rust-src", "clippy"]),
    ] {
        if !have(name) {
            install(name, &components)?;
        } else {
            // Nothing to fetch when they are there already.
            let mut args = vec!["component", "add", "--toolchain", name];
            args.extend(components);
            rustup(&args)?;
        }
    }
    // SAFETY: set_var is sound while no other thread reads the environment; this runs first
    // in main, before any thread exists.
    unsafe { std::env::set_var(RUSTUP_TOOLCHAIN, HOST) };
    Ok(())
}

/// `cargo` (rustup's proxy, so [`HOST`] applies) in the workspace root.
pub fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.env(RUSTUP_TOOLCHAIN, HOST).current_dir(root);
    cmd
}

/// `cargo` with the kernel programs' pinned nightly, in `redirect-ebpf/`.
pub fn ebpf_cargo(root: &Path) -> Result<Command> {
    let mut cmd = Command::new("cargo");
    cmd.env(RUSTUP_TOOLCHAIN, ebpf_channel(root)?)
        .current_dir(root.join("redirect-ebpf"));
    Ok(cmd)
}

/// The `channel` of `redirect-ebpf/rust-toolchain.toml`.
pub fn ebpf_channel(root: &Path) -> Result<String> {
    let file = root.join("redirect-ebpf").join("rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .next()
        .ok_or_else(|| anyhow!("no channel in {}", file.display()))
}

fn install(name: &str, components: &[&str]) -> Result<()> {
    let mut args = vec!["toolchain", "install", name, "--profile", "minimal"];
    for c in components {
        args.extend(["--component", c]);
    }
    eprintln!("setup: rustup {}", args.join(" "));
    let status = Command::new("rustup")
        .args(&args)
        .env_remove(RUSTUP_TOOLCHAIN)
        .status()
        .context("running rustup (is rustup installed?)")?;
    if !status.success() {
        bail!("rustup {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn rustup(args: &[&str]) -> Result<String> {
    let out = Command::new("rustup")
        .args(args)
        .env_remove(RUSTUP_TOOLCHAIN)
        .output()
        .context("running rustup (is rustup installed?)")?;
    if !out.status.success() {
        bail!(
            "rustup {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
