//! Network namespaces: open one from a pod's [`NetnsRef`] and read its cookie, the key the
//! kernel programs use (`bpf_get_netns_cookie`).

use std::{
    fs::File,
    net::IpAddr,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

use crate::pods::NetnsRef;

/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The file of a network namespace reference.
pub fn path_of(netns: &NetnsRef) -> Result<PathBuf> {
    Ok(match netns {
        NetnsRef::Path(p) => p.clone(),
        NetnsRef::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        NetnsRef::PodIp(ip) => by_ip(*ip)?,
    })
}

/// Opens a pod's network namespace.
pub fn open(netns: &NetnsRef) -> Result<File> {
    let path = path_of(netns)?;
    File::open(&path).with_context(|| format!("opening network namespace {}", path.display()))
}

/// What the last look-ups learned: address -> where its namespace was found, and the
/// addresses of each namespace inode already looked into by the `/proc` scan.
#[derive(Default)]
struct IpIndex {
    by_ip: std::collections::BTreeMap<IpAddr, Located>,
    scanned: std::collections::BTreeMap<u64, Vec<IpAddr>>,
}

/// A namespace found for an address.
#[derive(Clone)]
struct Located {
    path: PathBuf,
    /// The namespace's inode when found: the entry is good while the path still has it.
    ino: u64,
    /// How it was found (route, bridge, /proc scan), for status and logs.
    via: String,
}

static INDEX: std::sync::Mutex<Option<IpIndex>> = std::sync::Mutex::new(None);

/// The namespace whose routes lead to the pods (`--node-netns`); unset: the daemon's own.
static NODE_NETNS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Sets the node's namespace for [`by_ip`] (once, at start).
pub fn set_node_netns(path: PathBuf) -> Result<()> {
    File::open(&path).with_context(|| format!("opening --node-netns {}", path.display()))?;
    NODE_NETNS
        .set(path)
        .map_err(|_| anyhow::anyhow!("the node netns is set once"))
}

/// The inode of a namespace file (what identifies the namespace on the host).
pub(crate) fn inode_of(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// How a pod's namespace reference resolves, for status: for a pod known by its IP, where and
/// how its namespace was found.
pub fn describe(netns: &NetnsRef) -> String {
    if let NetnsRef::PodIp(ip) = netns {
        if let Ok(guard) = INDEX.lock() {
            if let Some(l) = guard.as_ref().and_then(|i| i.by_ip.get(ip)) {
                return format!("{} ({ip}: {})", l.path.display(), l.via);
            }
        }
    }
    netns.to_string()
}

/// The network namespace that holds `ip`: from the cache while the namespace file still
/// names the same namespace; else the one the node routes `ip` into
/// ([`crate::netns_by_route`]), checked to hold `ip`; else by scanning the namespaces of
/// `/proc/*/ns/net` not looked into yet (hostPID).
pub fn by_ip(ip: IpAddr) -> Result<PathBuf> {
    let mut guard = INDEX
        .lock()
        .map_err(|_| anyhow::anyhow!("netns index poisoned"))?;
    let index = guard.get_or_insert_with(IpIndex::default);
    if let Some(l) = index.by_ip.get(&ip) {
        if inode_of(&l.path) == Some(l.ino) {
            return Ok(l.path.clone());
        }
        index.by_ip.remove(&ip);
    }
    match crate::netns_by_route::find(ip, NODE_NETNS.get().map(PathBuf::as_path)) {
        Ok(found) => {
            let holds = File::open(&found.path)
                .ok()
                .and_then(|f| addresses_in(f).ok())
                .is_some_and(|a| a.contains(&ip));
            match inode_of(&found.path) {
                Some(ino) if holds => {
                    log::info!(
                        "netns of {ip}: {} (found by {})",
                        found.path.display(),
                        found.via
                    );
                    index.by_ip.insert(
                        ip,
                        Located {
                            path: found.path.clone(),
                            ino,
                            via: found.via,
                        },
                    );
                    return Ok(found.path);
                }
                _ => log::warn!(
                    "netns of {ip}: {} leads to {}, which does not hold {ip}; scanning /proc instead",
                    found.via,
                    found.path.display()
                ),
            }
        }
        Err(e) => log::debug!("netns of {ip}: not by route ({e:#}); scanning /proc"),
    }
    let mut live = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir("/proc")
        .context("listing /proc")?
        .flatten()
    {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let Some(ino) = inode_of(&path) else { continue };
        live.insert(ino);
        let addrs = index.scanned.entry(ino).or_insert_with(|| {
            File::open(&path)
                .ok()
                .and_then(|f| addresses_in(f).ok())
                .unwrap_or_default()
        });
        if addrs.contains(&ip) {
            log::info!(
                "netns of {ip}: {} (found by scanning /proc)",
                path.display()
            );
            index.by_ip.insert(
                ip,
                Located {
                    path: path.clone(),
                    ino,
                    via: "scan of /proc/*/ns/net".into(),
                },
            );
            return Ok(path);
        }
    }
    // Forget namespaces that are gone (their inodes may be reused).
    index.scanned.retain(|ino, _| live.contains(ino));
    bail!("no network namespace holds {ip} (yet)")
}

/// The addresses configured in network namespace `ns` (a short-lived thread enters it).
fn addresses_in(ns: File) -> Result<Vec<IpAddr>> {
    std::thread::spawn(move || -> Result<Vec<IpAddr>> {
        // Safety: setns on this thread only; getifaddrs into a list we free.
        unsafe {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error()).context("setns");
            }
            let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
            if libc::getifaddrs(&mut list) != 0 {
                return Err(std::io::Error::last_os_error()).context("getifaddrs");
            }
            let mut out = Vec::new();
            let mut cur = list;
            while !cur.is_null() {
                let sa = (*cur).ifa_addr;
                if !sa.is_null() {
                    match i32::from((*sa).sa_family) {
                        libc::AF_INET => {
                            let sin = &*(sa as *const libc::sockaddr_in);
                            out.push(IpAddr::from(
                                u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                            ));
                        }
                        libc::AF_INET6 => {
                            let sin6 = &*(sa as *const libc::sockaddr_in6);
                            out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                        }
                        _ => {}
                    }
                }
                cur = (*cur).ifa_next;
            }
            libc::freeifaddrs(list);
            Ok(out)
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("address scan thread panicked"))?
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
