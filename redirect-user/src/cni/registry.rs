//! Pods registered by the CNI plugin. Owned by the daemon's loop, which lays them over the
//! source's desired set before each pass ([`Registry::overlay`]), and kept in a state file
//! so that a restarted daemon serves them before its source has caught up.
//!
//! Rules, in the spirit of "a typo, an error or a restart never opens a hole":
//! - a registration is served from its ADD until its DEL, until its sandbox's namespace file
//!   is gone, or until the source says the same pod (same uid) is not in the mesh;
//! - where the source lists the pod too, the registration's namespace path is used (exact and
//!   cheap to resolve) and the source's configuration (annotations may change);
//! - after a DEL, what the source still lists for that pod (same uid) is not served: the
//!   sandbox is going away. The marker ends with a new ADD, when the source drops the pod, or
//!   after [`DELETED_FOR`].

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::{
    pods::{Desired, InvalidPod, NetnsRef, PodKey, PodSpec},
    policy::annotations::CapturePolicy,
    sources::{Membership, Published},
};

/// How long after a DEL the source's copy of the pod is not served (if the source still lists it).
pub const DELETED_FOR: Duration = Duration::from_secs(120);

/// One pod, as its sandbox's ADD gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub key: PodKey,
    pub uid: Option<String>,
    pub container_id: String,
    /// The sandbox's network namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    /// The pod's configuration when it was registered, used until the source lists it.
    pub policy: CapturePolicy,
}

/// The state file's contents.
#[derive(Default, Serialize, Deserialize)]
struct State {
    pods: Vec<Registration>,
}

/// Registered pods, and pods whose sandbox got DEL.
pub struct Registry {
    pods: BTreeMap<PodKey, Registration>,
    deleted: BTreeMap<PodKey, (Option<String>, Instant)>,
    state_file: PathBuf,
}

/// Same pod, as far as two uids tell (an unknown uid matches any).
fn same_uid(a: &Option<String>, b: &Option<String>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

impl Registry {
    /// The registrations a previous run left in `state_file` (none if it does not exist).
    pub fn load(state_file: &Path) -> Result<Self> {
        let mut r = Self {
            pods: BTreeMap::new(),
            deleted: BTreeMap::new(),
            state_file: state_file.to_path_buf(),
        };
        match std::fs::read(state_file) {
            Ok(bytes) => {
                let state: State = match serde_json::from_slice(&bytes) {
                    Ok(s) => s,
                    Err(e) => {
                        // Not a reason to stop serving: the pod source lists those pods too.
                        let aside = state_file.with_extension("unreadable");
                        let _ = std::fs::rename(state_file, &aside);
                        log::error!(
                            "{} is not a CNI state file ({e}); moved to {}; the pods it held are served once the pod source lists them",
                            state_file.display(),
                            aside.display()
                        );
                        State::default()
                    }
                };
                for p in state.pods {
                    r.pods.insert(p.key.clone(), p);
                }
                if !r.pods.is_empty() {
                    log::info!(
                        "{} pods registered by the CNI plugin before this start, read from {}",
                        r.pods.len(),
                        state_file.display()
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", state_file.display())),
        }
        Ok(r)
    }

    /// A sandbox's ADD: the pod is served from the next pass on.
    pub fn register(&mut self, r: Registration) {
        self.deleted.remove(&r.key);
        self.pods.insert(r.key.clone(), r);
        self.save();
    }

    /// A sandbox's DEL. A DEL for another sandbox of the pod than the registered one (an old
    /// one, torn down after the new one's ADD) leaves the registration alone.
    pub fn remove(&mut self, key: &PodKey, container_id: &str, uid: &Option<String>) {
        match self.pods.get(key) {
            Some(r) if r.container_id != container_id => return,
            Some(r) => {
                self.deleted
                    .insert(key.clone(), (r.uid.clone(), Instant::now()));
                self.pods.remove(key);
            }
            None => {
                self.deleted
                    .insert(key.clone(), (uid.clone(), Instant::now()));
            }
        }
        self.save();
    }

    /// Drops registrations that no longer stand: sandbox gone, or the same pod now outside
    /// the mesh by the source's word. Ends DEL markers that are done.
    fn prune(&mut self, published: &Published) {
        let before = self.pods.len();
        self.pods.retain(|key, r| {
            if !r.netns.exists() {
                log::info!(
                    "pod {key}: its sandbox's namespace {} is gone; no longer registered",
                    r.netns.display()
                );
                return false;
            }
            match published.members.get(key) {
                Some(m) if same_uid(&m.uid, &r.uid) => match &m.membership {
                    Membership::Outside(why) => {
                        log::info!("pod {key}: out of the mesh ({why}); no longer registered");
                        false
                    }
                    _ => true,
                },
                _ => true,
            }
        });
        self.deleted.retain(|key, (uid, at)| {
            at.elapsed() < DELETED_FOR
                && published
                    .members
                    .get(key)
                    .is_some_and(|m| same_uid(&m.uid, uid))
        });
        if self.pods.len() != before {
            self.save();
        }
    }

    /// The desired set the loop serves: the source's, without pods whose sandbox got DEL,
    /// with every registration laid over it.
    pub fn overlay(&mut self, published: &Published) -> Desired {
        self.prune(published);
        let mut d = published.desired.clone();
        let deleted = |key: &PodKey| self.deleted.contains_key(key);
        d.pods.retain(|p| !deleted(&p.key));
        d.invalid.retain(|p| !deleted(&p.key));
        for r in self.pods.values() {
            let netns = NetnsRef::Path(r.netns.clone());
            let member_uid = published.members.get(&r.key).map(|m| &m.uid);
            let same = member_uid.is_none_or(|u| same_uid(u, &r.uid));
            if let Some(p) = d.pods.iter_mut().find(|p| p.key == r.key) {
                p.netns = netns;
                if !same {
                    // The source still has an older pod of that name: this sandbox is newer.
                    p.ips = r.ips.clone();
                    p.policy = r.policy.clone();
                }
                continue;
            }
            if let Some(i) = d.invalid.iter().position(|p| p.key == r.key) {
                if same {
                    d.invalid[i].netns = netns;
                    continue;
                }
                d.invalid.remove(i);
            }
            // Known to the source without an address yet, or not at all (watch lag).
            match published.members.get(&r.key).map(|m| &m.membership) {
                Some(Membership::Invalid(error)) if same => d.invalid.push(InvalidPod {
                    key: r.key.clone(),
                    netns,
                    ips: r.ips.clone(),
                    error: error.clone(),
                    mesh: crate::policy::mesh::Mesh::Istio,
                }),
                Some(Membership::Mesh(policy)) if same => d.pods.push(PodSpec {
                    key: r.key.clone(),
                    netns,
                    ips: r.ips.clone(),
                    policy: (**policy).clone(),
                }),
                _ => d.pods.push(PodSpec {
                    key: r.key.clone(),
                    netns,
                    ips: r.ips.clone(),
                    policy: r.policy.clone(),
                }),
            }
        }
        d
    }

    /// Writes the registrations (write and rename: never half a file). A failure is logged:
    /// what is registered keeps being served, only a restart would not know it.
    fn save(&self) {
        let state = State {
            pods: self.pods.values().cloned().collect(),
        };
        let write = || -> Result<()> {
            crate::private_file::write(&self.state_file, &serde_json::to_vec(&state)?)
        };
        if let Err(e) = write() {
            log::error!(
                "writing the CNI state file {}: {e:#}; a restart would not know the pods registered since",
                self.state_file.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::Member;

    fn key(name: &str) -> PodKey {
        PodKey {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    fn reg(dir: &Path, name: &str, uid: &str) -> Registration {
        let netns = dir.join(format!("ns-{name}"));
        std::fs::write(&netns, b"").unwrap();
        Registration {
            key: key(name),
            uid: Some(uid.into()),
            container_id: format!("c-{name}"),
            netns,
            ips: vec!["10.0.0.9".parse().unwrap()],
            policy: CapturePolicy::default(),
        }
    }

    fn tmpdir(test: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("redirectd-registry-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn member(uid: &str, m: Membership) -> Member {
        Member {
            uid: Some(uid.into()),
            membership: m,
        }
    }

    #[test]
    fn registered_before_the_source_knows_it_then_laid_over_it() {
        let dir = tmpdir("overlay");
        let mut r = Registry::load(&dir.join("state.json")).unwrap();
        r.register(reg(&dir, "web", "u1"));
        let none = Published::default();
        let d = r.overlay(&none);
        assert_eq!(d.pods.len(), 1, "served before the source lists it");
        assert_eq!(d.pods[0].netns, NetnsRef::Path(dir.join("ns-web")));

        // The source lists it (by IP) with an annotation: its configuration, our netns.
        let mut policy = CapturePolicy::default();
        policy.exclude_outbound_ports.insert(5432);
        let mut published = Published::new(Desired {
            pods: vec![PodSpec {
                key: key("web"),
                netns: NetnsRef::PodIp("10.0.0.9".parse().unwrap()),
                ips: vec!["10.0.0.9".parse().unwrap()],
                policy: policy.clone(),
            }],
            ..Default::default()
        });
        published.members.insert(
            key("web"),
            member("u1", Membership::Mesh(Box::new(policy.clone()))),
        );
        let d = r.overlay(&published);
        assert_eq!(d.pods.len(), 1);
        assert_eq!(d.pods[0].netns, NetnsRef::Path(dir.join("ns-web")));
        assert_eq!(d.pods[0].policy, policy);

        // A restart reads it back.
        let mut again = Registry::load(&dir.join("state.json")).unwrap();
        // An unreadable state file is moved aside, not fatal.
        std::fs::write(dir.join("bad.json"), b"{").unwrap();
        let empty = Registry::load(&dir.join("bad.json")).unwrap();
        assert!(empty.pods.is_empty());
        assert!(dir.join("bad.unreadable").exists());
        assert_eq!(again.overlay(&none).pods.len(), 1);

        // Opted out (same pod): dropped. Sandbox gone: dropped.
        let mut out = Published::default();
        out.members
            .insert(key("web"), member("u1", Membership::Outside("skip".into())));
        assert!(r.overlay(&out).pods.is_empty());
        std::fs::remove_file(dir.join("ns-web")).unwrap();
        assert!(again.overlay(&none).pods.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn after_del_the_sources_copy_is_not_served_until_a_new_add() {
        let dir = tmpdir("del");
        let mut r = Registry::load(&dir.join("state.json")).unwrap();
        r.register(reg(&dir, "web", "u1"));
        let mut published = Published::new(Desired {
            pods: vec![PodSpec {
                key: key("web"),
                netns: NetnsRef::PodIp("10.0.0.9".parse().unwrap()),
                ips: vec!["10.0.0.9".parse().unwrap()],
                policy: CapturePolicy::default(),
            }],
            ..Default::default()
        });
        published
            .members
            .insert(key("web"), member("u1", Membership::Mesh(Box::default())));
        // The DEL of an older sandbox changes nothing.
        r.remove(&key("web"), "c-old", &Some("u1".into()));
        assert_eq!(r.overlay(&published).pods.len(), 1);
        r.remove(&key("web"), "c-web", &Some("u1".into()));
        assert!(r.overlay(&published).pods.is_empty(), "sandbox going away");
        // A new pod of the same name (new uid) in the source is served.
        published
            .members
            .insert(key("web"), member("u2", Membership::Mesh(Box::default())));
        assert_eq!(r.overlay(&published).pods.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_invalid_configuration_seen_later_locks_or_keeps_not_drops() {
        let dir = tmpdir("invalid");
        let mut r = Registry::load(&dir.join("state.json")).unwrap();
        r.register(reg(&dir, "web", "u1"));
        let mut published = Published::default();
        let error = crate::pods::PodError {
            pod: "shop/web".into(),
            field: "metadata.annotations".into(),
            reason: "bad".into(),
        };
        published
            .members
            .insert(key("web"), member("u1", Membership::Invalid(error)));
        let d = r.overlay(&published);
        assert!(d.pods.is_empty());
        assert_eq!(
            d.invalid.len(),
            1,
            "kept known, so the reconciler keeps or locks it"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
