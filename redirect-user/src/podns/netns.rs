//! The [`Resolver`] the daemon's loop owns, which turns a pod's [`NetnsRef`] into a namespace
//! file and cookie (entering namespaces and their cookies: [`crate::podns::nsenter`]; finding one by
//! the node's route: [`crate::podns::netns_by_route`]), and a namespace's addresses.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    podns::netns_by_route,
    podns::nsenter::{cookie, inode_of, own_cookie},
    podns::rtnl::Rtnl,
    pods::NetnsRef,
};

/// The addresses configured in the network namespace of `path` (an rtnetlink address dump
/// from inside it).
fn addresses_at(path: &Path) -> Result<Vec<IpAddr>> {
    let ns = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Rtnl::open_in(&ns)?.addresses()
}

/// A pod's network namespace, found.
#[derive(Debug, Clone)]
pub struct Found {
    /// A file of the namespace.
    pub path: PathBuf,
    pub cookie: u64,
    /// For status: the file and, for a pod known by its IP, how it was found.
    pub description: String,
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

/// Turns pods' namespace references into namespaces, remembering what its look-ups learned.
/// Owned by the daemon's loop; every call may block (it reads `/proc`, asks rtnetlink and
/// enters namespaces), so the loop calls it off its async workers.
#[derive(Default)]
pub struct Resolver {
    /// The namespace whose routes lead to the pods (`--node-netns`); unset: the daemon's own.
    node_netns: Option<PathBuf>,
    /// Address -> where its namespace was found.
    by_ip: BTreeMap<IpAddr, Located>,
    /// The addresses of each namespace inode already looked into by the `/proc` scan.
    scanned: BTreeMap<u64, Vec<IpAddr>>,
    /// Namespaces no pod may be: the daemon's own, the node's (pid 1's) and `--node-netns`,
    /// by cookie, with what to call each.
    host: Vec<(u64, String)>,
}

impl Resolver {
    /// A resolver that finds pods by IP through the routes of `node_netns` (default: the
    /// daemon's own namespace).
    pub fn new(node_netns: Option<PathBuf>) -> Result<Self> {
        let mut host = vec![(
            own_cookie()?,
            "the daemon's own network namespace".to_string(),
        )];
        if let Some(path) = &node_netns {
            let ns = File::open(path)
                .with_context(|| format!("opening --node-netns {}", path.display()))?;
            host.push((
                cookie(&ns)?,
                format!(
                    "the node's network namespace (--node-netns {})",
                    path.display()
                ),
            ));
        }
        // Without hostPID pid 1 is the container's own init, already covered above.
        if let Ok(init) = File::open("/proc/1/ns/net")
            .map_err(anyhow::Error::from)
            .and_then(|f| cookie(&f))
        {
            host.push((init, "the node's network namespace (pid 1's)".into()));
        }
        Ok(Self {
            node_netns,
            host,
            ..Default::default()
        })
    }

    /// Finds a pod's namespace and reads its cookie.
    pub fn resolve(&mut self, netns: &NetnsRef) -> Result<Found> {
        let (path, description) = match netns {
            NetnsRef::Path(p) => (p.clone(), netns.to_string()),
            NetnsRef::Pid(pid) => (
                PathBuf::from(format!("/proc/{pid}/ns/net")),
                netns.to_string(),
            ),
            NetnsRef::PodIp(ip) => {
                let l = self.by_ip(*ip)?;
                let description = format!("{} ({ip}: {})", l.path.display(), l.via);
                (l.path, description)
            }
        };
        let file = File::open(&path)
            .with_context(|| format!("opening network namespace {}", path.display()))?;
        let cookie = cookie(&file)?;
        let host: Vec<&str> = self
            .host
            .iter()
            .filter(|(c, _)| *c == cookie)
            .map(|(_, what)| what.as_str())
            .collect();
        if !host.is_empty() {
            bail!(
                "{} is {}: refused, capturing it would take the node's own connections (kubelet's, the daemon's) to a proxy",
                path.display(),
                host.join(" and ")
            );
        }
        Ok(Found {
            cookie,
            path,
            description,
        })
    }

    /// The network namespace that holds `ip`: from the cache while the namespace file still
    /// names the same namespace; else the one the node routes `ip` into
    /// ([`crate::podns::netns_by_route`]), checked to hold `ip`; else by scanning the namespaces of
    /// `/proc/*/ns/net` not looked into yet (hostPID).
    fn by_ip(&mut self, ip: IpAddr) -> Result<Located> {
        if let Some(l) = self.by_ip.get(&ip) {
            if inode_of(&l.path) == Some(l.ino) {
                return Ok(l.clone());
            }
            self.by_ip.remove(&ip);
        }
        let found = self.by_route(ip).or_else(|| self.by_proc_scan(ip));
        match found {
            Some(l) => {
                log::info!("netns of {ip}: {} (found by {})", l.path.display(), l.via);
                self.by_ip.insert(ip, l.clone());
                Ok(l)
            }
            None => bail!("no network namespace holds {ip} (yet)"),
        }
    }

    /// The namespace the node's routes lead `ip` into, if it holds `ip`.
    fn by_route(&self, ip: IpAddr) -> Option<Located> {
        let found = match netns_by_route::find(ip, self.node_netns.as_deref()) {
            Ok(found) => found,
            Err(e) => {
                log::debug!("netns of {ip}: not by route ({e:#}); scanning /proc");
                return None;
            }
        };
        let holds = addresses_at(&found.path).is_ok_and(|a| a.contains(&ip));
        match inode_of(&found.path) {
            Some(ino) if holds => Some(Located {
                path: found.path,
                ino,
                via: found.via,
            }),
            _ => {
                log::warn!(
                    "netns of {ip}: {} leads to {}, which does not hold {ip}; scanning /proc instead",
                    found.via,
                    found.path.display()
                );
                None
            }
        }
    }

    /// The first namespace of `/proc/*/ns/net` that holds `ip` (each namespace is looked
    /// into once while it lives).
    fn by_proc_scan(&mut self, ip: IpAddr) -> Option<Located> {
        let mut live = BTreeSet::new();
        for pid in crate::podns::procfs::pids() {
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            let Some(ino) = inode_of(&path) else { continue };
            live.insert(ino);
            let addrs = self
                .scanned
                .entry(ino)
                .or_insert_with(|| addresses_at(&path).unwrap_or_default());
            if addrs.contains(&ip) {
                return Some(Located {
                    path,
                    ino,
                    via: "scan of /proc/*/ns/net".into(),
                });
            }
        }
        // Forget namespaces that are gone (their inodes may be reused).
        self.scanned.retain(|ino, _| live.contains(ino));
        None
    }
}
