//! Builds the eBPF object (`redirect-ebpf`, for bpfel-unknown-none) with aya-build and leaves
//! it in OUT_DIR, where `src/loader.rs` embeds it. `AYA_BUILD_SKIP=1` skips it (for
//! `cargo check`, clippy and rust-analyzer without bpf-linker). The toolchain is the one pinned
//! in `redirect-ebpf/rust-toolchain.toml`.
//!
//! aya-build relays every line the nested cargo prints as a `cargo:warning`, so a good build
//! showed about 60 "warning: redirect-user@0.1.0: Compiling ..." lines, which read as a broken
//! one. Its output goes to a file instead, and those lines are passed on only if it fails;
//! the rest of its instructions to cargo (rerun-if-changed, ...) always are.
//!
//! Each object's BTF then gets names the kernel accepts (`build/btf_names.rs`).
use std::{
    fs::File,
    io::{Read as _, Seek as _, Write as _},
    os::fd::AsRawFd as _,
};

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

#[path = "build/btf_names.rs"]
mod btf_names;

fn main() -> anyhow::Result<()> {
    let root = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = std::path::Path::new(&root)
        .parent()
        .ok_or_else(|| anyhow!("redirect-user has no parent directory"))?
        .join("redirect-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    let package = Package {
        name: "redirect-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    let toolchain_file = std::path::Path::new(ebpf_dir).join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let channel = ebpf_channel(&toolchain_file)?;
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR not set")?;
    let mut captured = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(std::path::Path::new(&out_dir).join("ebpf-build.log"))
        .context("creating the eBPF build's log")?;
    let result = with_stdout_to(&captured, || {
        aya_build::build_ebpf([package], Toolchain::Custom(&channel))
    })?;
    let mut text = String::new();
    captured.rewind()?;
    captured.read_to_string(&mut text)?;
    let mut stdout = std::io::stdout().lock();
    for line in text.lines() {
        if result.is_ok()
            && (line.starts_with("cargo:warning=") || line.starts_with("cargo::warning="))
        {
            continue;
        }
        writeln!(stdout, "{line}")?;
    }
    result?;
    if std::env::var_os("AYA_BUILD_SKIP").is_none() {
        for object in ["redirect", "redirect-inbound"] {
            let path = std::path::Path::new(&out_dir).join(object);
            btf_names::sanitize_object(&path)
                .with_context(|| format!("fixing the BTF names of {}", path.display()))?;
        }
    }
    Ok(())
}

/// The `channel` of the eBPF crate's pinned toolchain (`redirect-ebpf/rust-toolchain.toml`).
fn ebpf_channel(file: &std::path::Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .next()
        .ok_or_else(|| anyhow!("no channel in {}", file.display()))
}

/// Runs `f` with file descriptor 1 (what cargo reads a build script's instructions from)
/// pointing at `file`, and puts it back.
fn with_stdout_to<T>(file: &File, f: impl FnOnce() -> T) -> anyhow::Result<T> {
    std::io::stdout().flush()?;
    // SAFETY: dup of a descriptor this process owns.
    let saved = unsafe { libc::dup(1) };
    // SAFETY: dup2 onto fd 1, which is restored from `saved` before returning.
    if saved < 0 || unsafe { libc::dup2(file.as_raw_fd(), 1) } < 0 {
        return Err(std::io::Error::last_os_error()).context("redirecting the eBPF build's output");
    }
    let out = f();
    std::io::stdout().flush()?;
    // SAFETY: as above; `saved` is closed once restored.
    unsafe {
        libc::dup2(saved, 1);
        libc::close(saved);
    }
    Ok(out)
}
