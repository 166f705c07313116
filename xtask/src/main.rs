//! `cargo xtask`: the dev-box tasks. Every task installs what is missing first.

mod bench;
mod demo;
mod image;
mod kernels;
mod setup;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Dev-box tasks for the eBPF sidecar redirector")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: the pinned toolchains (host, and the eBPF crate's nightly),
    /// bpf-linker, Debian packages, Envoy.
    Setup,
    /// Check formatting and lint every crate (clippy -D warnings; the eBPF crate for its target,
    /// with its toolchain), as CI does.
    Lint,
    /// Build the eBPF object and the binaries (redirectd, redirect-lab).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run redirectd with the given arguments (e.g. `-- run --pods pods.yaml`).
    Run {
        #[arg(long)]
        release: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The main job on a dev box: a small lab, the redirector, real traffic, what the sidecar
    /// saw and the capture counters; then everything is torn down.
    Demo {
        /// On a real node instead: containerd and runc run the image (built first), the
        /// DaemonSet's pod from deploy/base, and mesh pods with Envoy sidecar containers.
        #[arg(long)]
        node: bool,
    },
    /// Benchmark direct / iptables (Istio's rules) / ebpf / ebpf+sockmap, side by side.
    Bench {
        /// A short run (under 2 minutes); does not update docs/benchmarks.md.
        #[arg(long)]
        quick: bool,
        /// The server pod on a second (emulated) node, with its own daemon.
        #[arg(long)]
        cross_node: bool,
        /// The sidecar in both pods: `envoy` (the headline profile) or `lab` (the lab's small
        /// proxy).
        #[arg(long, default_value = "envoy", value_parser = ["envoy", "lab"])]
        sidecar: String,
        /// On a real node instead: RunPodSandbox with and without redirect-cni in the chain
        /// (one at a time and 50 at once) and the time to a pod's first captured connection;
        /// figures in target/bench/node.json.
        #[arg(long, conflicts_with = "cross_node")]
        node: bool,
    },
    /// Build the redirectd image with buildah, from the release binaries and a Debian base
    /// made with debootstrap (no registry needed): `target/image/redirectd.tar`, a
    /// docker-archive tagged as the manifests name it.
    Image,
    /// Fuzz the pods-file and annotation parsers (cargo-fuzz, libFuzzer), each for a while.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Unit tests and integration tests on the real kernel (needs root).
    Test {
        /// Run the load test for 5 minutes instead of 30 s.
        #[arg(long)]
        long: bool,
        /// Run the integration tests on another kernel instead, under qemu (virtme-ng,
        /// software emulation): 6.1, 6.12, 5.10 (Debian's packages), or `all`.
        #[arg(long)]
        kernel: Option<String>,
        /// With --kernel: only these test binaries (comma-separated, e.g. `outbound,cni`);
        /// the `kernel` test always runs.
        #[arg(long, value_delimiter = ',', requires = "kernel")]
        only: Vec<String>,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo(args: &[&str]) -> Result<()> {
    let status = toolchain::cargo(&root())
        .args(args)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds the workspace binaries and points the lab at them.
fn build(release: bool) -> Result<PathBuf> {
    setup::setup(&root())?;
    let mut args = vec!["build", "--bins"];
    if release {
        args.push("--release");
    }
    cargo(&args)?;
    let dir = root()
        .join("target")
        .join(if release { "release" } else { "debug" });
    // SAFETY: set_var is sound while no other thread reads the environment; xtask runs no
    // other thread here.
    unsafe {
        std::env::set_var("REDIRECTD_BIN", dir.join("redirectd"));
        std::env::set_var("REDIRECT_LAB_BIN", dir.join("redirect-lab"));
        std::env::set_var("ENVOY_BIN", setup::envoy_bin(&root()));
    }
    Ok(dir)
}

/// Builds the release binaries the image carries, then the image; points the tests at it.
fn build_image() -> Result<image::Built> {
    setup::setup(&root())?;
    cargo(&[
        "build",
        "--release",
        "--package",
        "redirect-user",
        "--bin",
        "redirectd",
        "--package",
        "redirect-cni",
        "--bin",
        "redirect-cni",
    ])?;
    let built = image::build(&root(), &root().join("target/release"))?;
    // SAFETY: set_var is sound while no other thread reads the environment; xtask runs no
    // other thread here.
    unsafe { std::env::set_var("REDIRECTD_IMAGE", &built.archive) };
    Ok(built)
}

/// Runs `redirect-node` (the real node's demo and benchmark; built with the workspace's
/// binaries, not linked into xtask: its CRI client needs protoc to build).
fn node_tool(dir: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new(dir.join("redirect-node"))
        .args(args)
        .status()
        .context("running redirect-node")?;
    if !status.success() {
        bail!("redirect-node {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid(2).
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (BPF, network namespaces, cgroups): run it as root");
    }
    Ok(())
}

/// Is `name` a lab object an ended process left? Lab names are `rlab-<pid>-...`: the lab of
/// a process still running (another test run beside this one) is not a leftover.
fn is_leftover(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(redirect_lab::PREFIX) else {
        return false;
    };
    let pid = rest.split('-').next().unwrap_or_default();
    pid.parse::<u32>().is_err() || !Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes what an interrupted test or demo left (names start with the lab prefix and the
/// process that made them is gone).
fn sweep_leftovers() -> Result<()> {
    if let Ok(list) = redirect_lab::run("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if is_leftover(name) {
                let _ = redirect_lab::run("ip", &["netns", "del", name]);
            }
        }
    }
    let bin = std::env::var("REDIRECTD_BIN").unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            if is_leftover(&e.file_name().to_string_lossy()) {
                let p = e.path();
                let _ = redirect_lab::run(&bin, &["uninstall", "--pin-dir", &p.to_string_lossy()]);
            }
        }
    }
    let cg = redirect_lab::cgroup2_root()?;
    if let Ok(entries) = std::fs::read_dir(&cg) {
        for e in entries.flatten() {
            if is_leftover(&e.file_name().to_string_lossy()) {
                drop(redirect_lab::Cgroup { path: e.path() });
            }
        }
    }
    Ok(())
}

/// Runs every fuzz target for `seconds`; installs cargo-fuzz first if missing.
fn fuzz(seconds: u64) -> Result<()> {
    setup::setup(&root())?;
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        cargo(&["install", "cargo-fuzz", "--locked"])?;
    }
    let dir = root().join("fuzz");
    let nightly = format!("+{}", toolchain::ebpf_channel(&root())?);
    for target in ["pods_file", "annotations", "proxy_config", "cni_request"] {
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let status = Command::new("cargo")
            // The kernel programs' pinned nightly: cargo-fuzz needs a nightly, and the daemon's
            // crates need rustc 1.98 or newer (aya 0.16), which a machine's floating nightly
            // may predate.
            .args([nightly.as_str(), "fuzz", "run", target])
            .arg(&corpus)
            .arg(dir.join("seeds").join(target))
            .args(["--", &format!("-max_total_time={seconds}")])
            .current_dir(&dir)
            .status()
            .context("running cargo fuzz")?;
        if !status.success() {
            bail!("fuzz target {target} found a failure (see fuzz/artifacts/{target})");
        }
    }
    Ok(())
}

/// `cargo fmt --check` and clippy with `-D warnings`: the host crates (with the guest-only
/// tests), then the eBPF crate for its target with its pinned nightly.
fn lint() -> Result<()> {
    cargo(&["fmt", "--all", "--", "--check"]).with_context(|| {
        format!(
            "formatting differs; `cargo +{} fmt --all` fixes it",
            toolchain::HOST
        )
    })?;
    cargo(&[
        "clippy",
        "--all-targets",
        "--features",
        "redirect-tests/guest-kernels",
        "--",
        "-D",
        "warnings",
    ])?;
    let status = toolchain::ebpf_cargo(&root())?
        .args([
            "clippy",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
            "-C",
            "panic=abort",
        ])
        .status()
        .context("running cargo clippy for the eBPF crate")?;
    if !status.success() {
        bail!("clippy found problems in redirect-ebpf ({status})");
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    toolchain::ensure(&root())?;
    match cli.task {
        Task::Setup => setup::setup(&root()),
        Task::Lint => {
            setup::setup(&root())?;
            lint()
        }
        Task::Build { release } => {
            build(release).map(|dir| eprintln!("built into {}", dir.display()))
        }
        Task::Run { release, args } => {
            let dir = build(release)?;
            let status = Command::new(dir.join("redirectd")).args(&args).status()?;
            if !status.success() {
                bail!("redirectd exited with {status}");
            }
            Ok(())
        }
        Task::Demo { node: false } => {
            require_root("the demo")?;
            build(false)?;
            sweep_leftovers()?;
            demo::demo()
        }
        Task::Demo { node: true } => {
            require_root("the demo")?;
            build_image()?;
            let dir = build(false)?;
            sweep_leftovers()?;
            node_tool(&dir, &["demo"])
        }
        Task::Bench {
            quick, node: true, ..
        } => {
            require_root("the benchmark")?;
            build_image()?;
            let dir = build(true)?;
            sweep_leftovers()?;
            let out = root().join("target/bench/node.json");
            std::fs::create_dir_all(out.parent().context("target/bench")?)?;
            let out_s = out.to_str().context("non-UTF-8 path")?;
            let mut args = vec!["bench", "--out", out_s];
            if quick {
                args.push("--quick");
            }
            node_tool(&dir, &args)
        }
        Task::Bench {
            quick,
            cross_node,
            sidecar,
            node: false,
        } => {
            require_root("the benchmark")?;
            build(true)?;
            sweep_leftovers()?;
            bench::bench(quick, cross_node, sidecar == "envoy", &root())
        }
        Task::Fuzz { seconds } => fuzz(seconds),
        Task::Image => {
            require_root("building the image")?;
            let built = build_image()?;
            eprintln!(
                "image {} in {} ({:.1} MiB)",
                built.tag,
                built.archive.display(),
                built.bytes as f64 / (1024.0 * 1024.0)
            );
            Ok(())
        }
        Task::Test {
            kernel: Some(kernel),
            only,
            ..
        } => {
            require_root("the tests")?;
            build(false)?;
            kernels::test(&root(), &kernel, &only)
        }
        Task::Test { long, args, .. } => {
            require_root("the tests")?;
            if long {
                // SAFETY: set_var is sound while no other thread reads the environment; xtask
                // runs no other thread here.
                unsafe { std::env::set_var("REDIRECT_LOAD_SECS", "300") };
            }
            build_image()?;
            build(false)?;
            sweep_leftovers()?;
            let mut all = vec!["test", "--no-fail-fast"];
            all.extend(args.iter().map(String::as_str));
            cargo(&all)
        }
    }
}
