//! Finds a pod proxy's inbound listening sockets that were already listening before our
//! `sockops` program could see their `listen()` (the proxy started before the daemon was
//! installed), and hands the daemon its own reference to each, so they can be registered in
//! `LISTENERS`. Later restarts of the proxy register themselves at `listen()`.
//!
//! How: the processes in the pod's network namespace (`/proc/*/ns/net`), their listening TCP
//! sockets on the port (`/proc/PID/net/tcp{,6}`), the fd that holds each (`/proc/PID/fd`),
//! and `pidfd_getfd(2)` (Linux 5.6, CAP_SYS_PTRACE) to duplicate it.

use std::{
    collections::BTreeMap,
    fs::File,
    os::{fd::OwnedFd, unix::fs::MetadataExt},
    path::Path,
};

use anyhow::{Context as _, Result};
use redirect_common::{AF_INET, AF_INET6};
use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};

/// `st` of a listening socket in /proc/net/tcp.
const TCP_LISTEN: &str = "0A";

/// Listening sockets on any of `ports` by inode, with their `(port, family)`, from
/// /proc/PID/net/tcp{,6}.
fn listening_inodes(pid: &str, ports: &[u16]) -> BTreeMap<u64, (u16, u16)> {
    let mut out = BTreeMap::new();
    for (file, family) in [("tcp", AF_INET), ("tcp6", AF_INET6)] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != TCP_LISTEN {
                continue;
            }
            let local_port = f[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if let Some(port) = local_port.filter(|p| ports.contains(p)) {
                if let Ok(inode) = f[9].parse() {
                    out.insert(inode, (port, family));
                }
            }
        }
    }
    out
}

/// Duplicates process `pid`'s file descriptor `fd` into ours (`pidfd_getfd(2)`).
fn take_fd(pid: i32, fd: i32) -> rustix::io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid).ok_or(rustix::io::Errno::SRCH)?;
    let pidfd = pidfd_open(pid, PidfdFlags::empty())?;
    pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty())
}

/// The listening sockets on any of `ports` in the network namespace `netns`, in one scan of
/// /proc: `(port, family, socket)`.
pub fn find(netns: &File, ports: &[u16]) -> Result<Vec<(u16, u16, OwnedFd)>> {
    let ino = netns.metadata().context("stat of the netns file")?.ino();
    let pids: Vec<String> = crate::podns::procfs::pids()
        .filter(|p| {
            crate::podns::nsenter::inode_of(Path::new(&format!("/proc/{p}/ns/net"))) == Some(ino)
        })
        .collect();
    let Some(first) = pids.first() else {
        return Ok(Vec::new());
    };
    let mut wanted = listening_inodes(first, ports);
    let mut found = Vec::new();
    for pid in &pids {
        if wanted.is_empty() {
            break;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for entry in fds.filter_map(|e| e.ok()) {
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            let Some((port, family)) = inode.and_then(|i| wanted.remove(&i)) else {
                continue;
            };
            let (Ok(pid_n), Ok(fd_n)) = (
                pid.parse::<i32>(),
                entry.file_name().to_string_lossy().parse::<i32>(),
            ) else {
                continue;
            };
            match take_fd(pid_n, fd_n) {
                Ok(fd) => found.push((port, family, fd)),
                Err(e) => log::warn!(
                    "cannot take the proxy's listener (pid {pid}, fd {fd_n}) to register it: {e} (needs CAP_SYS_PTRACE and Linux 5.6)"
                ),
            }
        }
    }
    Ok(found)
}
