//! Builds the eBPF object (`redirect-ebpf`, for bpfel-unknown-none) with aya-build and leaves
//! it in OUT_DIR, where `src/loader.rs` embeds it. `AYA_BUILD_SKIP=1` skips it (for
//! `cargo check`, clippy and rust-analyzer without bpf-linker).
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

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
    aya_build::build_ebpf([package], Toolchain::default())
}
