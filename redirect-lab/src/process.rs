//! Processes started in a pod's cgroup and network namespace, as a given uid, killed with
//! their guard.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{Cgroup, Netns};

/// A child process, killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process now (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the process with SIGTERM, waiting up to 5 s.
    pub fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where and as whom to start a process.
#[derive(Default, Clone, Copy)]
pub struct Placement<'a> {
    pub netns: Option<&'a Netns>,
    pub cgroup: Option<&'a Cgroup>,
    /// Run as this uid and gid (after entering the namespace).
    pub uid: Option<u32>,
}

/// Starts `program args` at `placement`, stdout and stderr to `log`. The process joins the
/// cgroup first, then the network namespace (in that order: entering a netns must not
/// depend on /sys), then drops to `uid`.
pub fn spawn(placement: Placement<'_>, log: &Path, program: &Path, args: &[&str]) -> Result<Proc> {
    spawn_bounded(placement, None, log, program, args)
}

/// As [`spawn`], with the capability bounding set cut to `bounding` (a mask) before exec, as
/// a container runtime does for a container given those capabilities (drop ALL, add them): a
/// root process then starts with no other capability, and without `CAP_SETPCAP`.
pub fn spawn_bounded(
    placement: Placement<'_>,
    bounding: Option<u64>,
    log: &Path,
    program: &Path,
    args: &[&str],
) -> Result<Proc> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    let ns_file = match placement.netns {
        Some(ns) => Some(
            File::open(ns.path()).with_context(|| format!("opening {}", ns.path().display()))?,
        ),
        None => None,
    };
    let procs_file = match placement.cgroup {
        Some(cg) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(cg.path.join("cgroup.procs"))
                .with_context(|| format!("opening {}/cgroup.procs", cg.path.display()))?,
        ),
        None => None,
    };
    let uid = placement.uid;
    // SAFETY: only async-signal-safe calls (write, setns, setgroups, setgid, setuid, prctl)
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(keep) = bounding {
                // CAP_SETPCAP (8) last: it is what lets us drop the others.
                for cap in (0..64).filter(|c| *c != 8).chain([8]) {
                    if keep & (1u64 << cap) == 0
                        && libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                        && *libc::__errno_location() != libc::EINVAL
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            if let Some(f) = &procs_file {
                if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(f) = &ns_file {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(uid) = uid {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    // ETXTBSY: an executable just written (a test's copy of redirectd) is still open for
    // writing in a child another thread forked between the copy's open and close, until that
    // child execs; it goes within milliseconds, so try again.
    let mut tries = 0;
    let child = loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other,
        }
    }
    .with_context(|| format!("starting {}", program.display()))?;
    Ok(Proc {
        child,
        log: log.to_path_buf(),
    })
}
