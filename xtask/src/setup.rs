//! `cargo xtask setup`: installs what is missing, and only that (idempotent).

use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// bpf-linker version known to work with the image's nightly (it uses the LLVM inside
/// rustc; later versions need a system LLVM).
const BPF_LINKER_VERSION: &str = "0.10.0";

/// Debian packages the demo and tests need, each with a binary that shows it is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ss"),
    ("iproute2", "ip"),
    ("iptables", "iptables"),
    ("nftables", "nft"),
    ("curl", "curl"),
    ("bpftool", "bpftool"),
    ("procps", "ps"),
];

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    eprintln!("setup: {cmd} {}", args.join(" "));
    let status = Command::new(cmd)
        .args(args)
        .status()
        .with_context(|| format!("running {cmd}"))?;
    if !status.success() {
        bail!("{cmd} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn on_path(bin: &str) -> bool {
    redirect_lab::which(bin).is_ok()
}

pub fn setup() -> Result<()> {
    // Nightly with rust-src: the eBPF crate is built with -Z build-std=core.
    let toolchains = output("rustup", &["toolchain", "list"]).context("rustup not found")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    let linker = output("bpf-linker", &["--version"]).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        run(
            "cargo",
            &[
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
            ],
        )?;
    }
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, bin)| !on_path(bin))
        .map(|(pkg, _)| *pkg)
        .collect();
    missing.dedup();
    if !missing.is_empty() {
        // SAFETY: geteuid(2).
        if unsafe { libc::geteuid() } != 0 {
            bail!("packages {missing:?} are missing and installing them needs root");
        }
        run("apt-get", &["update", "-q"])?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(&missing);
        let status = Command::new("apt-get")
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get install {missing:?} failed ({status})");
        }
    }
    Ok(())
}
