//! User-namespaced pods (`hostUsers: false`): the pod's processes run in a user namespace, so
//! the proxy's uid 1337 inside is another uid on the host, and the kernel programs see host
//! ids (`bpf_get_current_uid_gid`). A pod's network namespace is owned by its user namespace;
//! its id maps are read from a process in it (`/proc/PID/uid_map`, `gid_map`) and the proxy's
//! uid and gid, and the owner groups, are translated to the host's view.

use std::{fs::File, os::fd::AsRawFd, os::unix::fs::MetadataExt, path::Path};

use anyhow::{bail, Context as _, Result};

use crate::policy::annotations::{CapturePolicy, OwnerGroups};

/// `NS_GET_USERNS` (linux/nsfs.h): the user namespace that owns a namespace.
const NS_GET_USERNS: libc::c_ulong = 0xb701;

/// One namespace's id map: `(inside, outside, count)` ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMap(Vec<(u32, u32, u32)>);

impl IdMap {
    /// Parses `/proc/PID/uid_map` (or `gid_map`) text.
    pub fn parse(text: &str) -> Result<Self> {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let n: Vec<u32> = l
                    .split_whitespace()
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("id map line {l:?}"))?;
                match n[..] {
                    [inside, outside, count] => Ok((inside, outside, count)),
                    _ => bail!("id map line {l:?} has not three numbers"),
                }
            })
            .collect::<Result<_>>()
            .map(IdMap)
    }

    /// The host's id for `inside`, if the map has it.
    pub fn to_host(&self, inside: u32) -> Option<u32> {
        self.0.iter().find_map(|&(i, o, c)| {
            (inside >= i && u64::from(inside) < u64::from(i) + u64::from(c))
                .then(|| o + (inside - i))
        })
    }
}

/// The uid and gid maps of a pod whose network namespace a non-initial user namespace owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIds {
    pub uid: IdMap,
    pub gid: IdMap,
    /// The process the maps were read from.
    pub pid: String,
}

fn ns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The id maps of the user namespace that owns the network namespace at `netns`, or `None`
/// when that is the initial one (`/proc/1/ns/user`): no translation.
pub fn of_netns(netns: &Path) -> Result<Option<PodIds>> {
    let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    // SAFETY: NS_GET_USERNS takes no argument and returns a new descriptor or -1.
    let fd = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_USERNS) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("NS_GET_USERNS on {}", netns.display()));
    }
    // SAFETY: a new descriptor the kernel just gave us.
    let owner = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let meta = owner
        .metadata()
        .context("stat of the owning user namespace")?;
    let id = (meta.dev(), meta.ino());
    if Some(id) == ns_id(Path::new("/proc/1/ns/user")) {
        return Ok(None);
    }
    for pid in crate::podns::procfs::pids() {
        let dir = Path::new("/proc").join(&pid);
        if ns_id(&dir.join("ns/user")) != Some(id) {
            continue;
        }
        let read = |f: &str| -> Result<IdMap> {
            IdMap::parse(
                &std::fs::read_to_string(dir.join(f))
                    .with_context(|| format!("reading /proc/{pid}/{f}"))?,
            )
        };
        return Ok(Some(PodIds {
            uid: read("uid_map")?,
            gid: read("gid_map")?,
            pid,
        }));
    }
    bail!("its network namespace belongs to a user namespace with no process in it yet (its id maps cannot be read)")
}

/// `policy` with the proxy's uid and gid (`default_uid`/`gid` when the pod does not say) and
/// the owner groups translated to host ids. An id the pod's map lacks is an error: the proxy
/// would not be recognised.
pub fn translate(
    policy: &CapturePolicy,
    ids: &PodIds,
    default_uid: u32,
    default_gid: u32,
) -> Result<CapturePolicy> {
    let uid = policy.proxy_uid.unwrap_or(default_uid);
    let gid = policy.proxy_gid.unwrap_or(default_gid);
    let host_uid = ids.uid.to_host(uid).with_context(|| {
        format!("the proxy's uid {uid} is not in the pod's user namespace's uid map")
    })?;
    // A mesh with no gid rule (Linkerd) names a gid no process has: nothing to translate.
    let host_gid = if gid == crate::policy::mesh::linkerd::NO_GID {
        gid
    } else {
        ids.gid.to_host(gid).with_context(|| {
            format!("the proxy's gid {gid} is not in the pod's user namespace's gid map")
        })?
    };
    let groups = |g: &std::collections::BTreeSet<u32>| -> Result<_> {
        g.iter()
            .map(|g| {
                ids.gid
                    .to_host(*g)
                    .with_context(|| format!("owner group {g} is not in the pod's gid map"))
            })
            .collect()
    };
    let owner_groups = match &policy.owner_groups {
        OwnerGroups::All => OwnerGroups::All,
        OwnerGroups::Only(g) => OwnerGroups::Only(groups(g)?),
        OwnerGroups::AllExcept(g) => OwnerGroups::AllExcept(groups(g)?),
    };
    Ok(CapturePolicy {
        proxy_uid: Some(host_uid),
        proxy_gid: Some(host_gid),
        owner_groups,
        ..policy.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_ids_through_ranges() {
        let m = IdMap::parse("         0     100000      65536\n").unwrap();
        assert_eq!(m.to_host(0), Some(100_000));
        assert_eq!(m.to_host(1337), Some(101_337));
        assert_eq!(m.to_host(65_536), None);
        let m = IdMap::parse("0 1000 1\n1 200000 2000\n").unwrap();
        assert_eq!(m.to_host(1337), Some(201_336));
        assert!(IdMap::parse("0 1\n").is_err());
    }

    #[test]
    fn translates_the_proxy_and_owner_groups() {
        let ids = PodIds {
            uid: IdMap::parse("0 100000 65536").unwrap(),
            gid: IdMap::parse("0 200000 65536").unwrap(),
            pid: "1".into(),
        };
        let p = CapturePolicy {
            owner_groups: OwnerGroups::Only([3000].into()),
            ..Default::default()
        };
        let t = translate(&p, &ids, 1337, 1337).unwrap();
        assert_eq!((t.proxy_uid, t.proxy_gid), (Some(101_337), Some(201_337)));
        assert_eq!(t.owner_groups, OwnerGroups::Only([203_000].into()));
        let small = PodIds {
            uid: IdMap::parse("0 100000 1000").unwrap(),
            ..ids
        };
        let e = translate(&p, &small, 1337, 1337).unwrap_err();
        assert!(e.to_string().contains("uid 1337 is not"), "{e}");
    }
}
