//! Entering a network namespace ([`run_in`], the one place that calls `setns`) and naming one:
//! its cookie (the key the kernel programs use, `bpf_get_netns_cookie`) and its file's inode.

use std::{
    fs::File,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::Path,
};

use anyhow::{Context as _, Result};
use rustix::{
    io::Errno,
    net::{AddressFamily, SocketFlags, SocketType},
    thread::{move_into_link_name_space, LinkNameSpaceType},
};

/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Runs `f` on a short-lived thread that has entered the network namespace `ns`, so no other
/// thread's namespace changes. Sockets `f` creates stay in that namespace after it returns.
pub fn run_in<R: Send + 'static>(
    ns: &File,
    f: impl FnOnce() -> Result<R> + Send + 'static,
) -> Result<R> {
    let ns = ns.try_clone().context("duplicating a netns fd")?;
    std::thread::spawn(move || -> Result<R> {
        move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network)).map_err(|e| {
            if e == Errno::INVAL {
                anyhow::anyhow!("not a network namespace")
            } else {
                anyhow::Error::from(e).context("setns(CLONE_NEWNET) (needs CAP_SYS_ADMIN)")
            }
        })?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("a thread working inside a network namespace panicked"))?
}

/// The cookie of the network namespace `ns` (an open netns file).
pub fn cookie(ns: &File) -> Result<u64> {
    run_in(ns, || {
        let sock = rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .context("socket() in netns")?;
        socket_netns_cookie(&sock)
    })
}

/// `getsockopt(SO_NETNS_COOKIE)`: rustix has no wrapper for it.
fn socket_netns_cookie(sock: &OwnedFd) -> Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a u64 we own, and `sock`
    // is an open socket for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("getsockopt(SO_NETNS_COOKIE) (needs Linux 5.14)");
    }
    Ok(cookie)
}

/// The cookie of this process's own network namespace.
pub fn own_cookie() -> Result<u64> {
    cookie(&File::open("/proc/self/ns/net").context("opening /proc/self/ns/net")?)
}

/// The inode of a namespace file (what identifies the namespace on the host).
pub(crate) fn inode_of(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}
