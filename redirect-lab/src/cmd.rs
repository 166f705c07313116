//! Running commands and finding programs.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// Runs a command to completion; an error carries its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    output(Command::new(program).args(args))
}

/// Runs a prepared command to completion; returns its stdout; an error names the command and
/// carries its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .with_context(|| format!("running {program} (is it installed? `cargo xtask setup`)"))?;
    if !out.status.success() {
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A program the build or `cargo xtask setup` put in the target directory: `$var` if set
/// (xtask sets it), else `relative` under one of the three directories above the running test
/// or xtask executable.
pub(crate) fn locate(var: &str, relative: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|dir| dir.join(relative))
        .find(|candidate| candidate.is_file())
}

/// Path of a workspace binary: `$<NAME>_BIN` if set (xtask sets it), else next to the
/// running test or xtask executable's target directory.
pub fn bin(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    locate(&var, Path::new(name)).unwrap_or_else(|| {
        panic!("binary {name} not found: set {var} or build it first (`cargo xtask build`)")
    })
}

/// Finds `program` on PATH (or /usr/sbin, /usr/bin).
pub fn which(program: &str) -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file());
    found.with_context(|| format!("{program} not found (run `cargo xtask setup`)"))
}
