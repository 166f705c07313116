//! Network namespaces: open one from a pod's [`NetnsRef`] and read its cookie, the key the
//! kernel programs use (`bpf_get_netns_cookie`).

use std::{
    fs::File,
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
};

use anyhow::{bail, Context as _, Result};

use crate::pods::NetnsRef;

/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The file of a network namespace reference.
pub fn path_of(netns: &NetnsRef) -> PathBuf {
    match netns {
        NetnsRef::Path(p) => p.clone(),
        NetnsRef::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
    }
}

/// Opens a pod's network namespace.
pub fn open(netns: &NetnsRef) -> Result<File> {
    let path = path_of(netns);
    File::open(&path).with_context(|| format!("opening network namespace {}", path.display()))
}

/// The cookie of the network namespace `ns` (an open netns file). Runs on a short-lived
/// thread that enters the namespace, so no other thread's namespace changes.
pub fn cookie(ns: &File) -> Result<u64> {
    let fd = ns.try_clone().context("duplicating netns fd")?;
    std::thread::spawn(move || cookie_in(fd))
        .join()
        .map_err(|_| anyhow::anyhow!("netns cookie thread panicked"))?
}

fn cookie_in(ns: File) -> Result<u64> {
    // Safety: plain syscalls on fds we own; this thread is ours and ends after this call.
    unsafe {
        if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                bail!("not a network namespace");
            }
            return Err(e).context("setns(CLONE_NEWNET) (needs CAP_SYS_ADMIN)");
        }
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(std::io::Error::last_os_error()).context("socket() in netns");
        }
        let sock = <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(s);
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        if libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        ) != 0
        {
            return Err(std::io::Error::last_os_error())
                .context("getsockopt(SO_NETNS_COOKIE) (needs Linux 5.14)");
        }
        Ok(cookie)
    }
}

/// The cookie of this process's own network namespace.
pub fn own_cookie() -> Result<u64> {
    cookie(&File::open("/proc/self/ns/net").context("opening /proc/self/ns/net")?)
}
