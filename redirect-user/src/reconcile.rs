//! The reconciler: diffs the desired mesh pods against what is in the kernel maps and applies
//! the difference through [`PodMaps`]. Plain code, no I/O of its own.
//!
//! Ordering keeps the data path consistent at every instant: a pod's rules are written before
//! its `MESH_PODS` entry makes it visible, a changed pod gets a new slot whose entry replaces
//! the old one in a single map update, and only then are the old rules removed.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use redirect_common::{PodConfig, MAX_PODS, POD_FLAG_REJECTED};
use serde::Serialize;

use crate::{
    kernel::datapath::PodMaps,
    podns::interfaces::NamespaceView,
    pods::{PodKey, PodSpec},
    policy::annotations::CapturePolicy,
    policy::mesh::Mesh,
    policy::room::{self, Usage},
    policy::rules::PodRules,
};

/// Settings common to every pod on the node (the daemon's flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// The proxy's own ports, never captured inbound (Istio: 15001, 15006, 15008, 15020,
    /// 15021, 15090).
    pub proxy_ports: Vec<u16>,
    /// Most entries one pod's rules may take in each shared rule map (see [`crate::policy::room`]).
    pub rules_per_pod: usize,
    /// Whether `sk_lookup` can see a connection's ingress interface on this kernel (Linux
    /// 5.17), which capturing a VM's traffic needs (probed at start).
    pub sees_ingress_ifindex: bool,
}

impl NodeSettings {
    /// The proxy's own ports in a pod of `policy`'s mesh (never captured inbound): the node's
    /// for Istio's pods, the mesh's own for another's.
    pub fn proxy_ports_of(&self, policy: &CapturePolicy) -> &[u16] {
        match policy.mesh {
            Mesh::Istio => &self.proxy_ports,
            Mesh::Linkerd => crate::policy::mesh::linkerd::PROXY_PORTS,
        }
    }

    /// `(outbound, inbound)` listener ports of the proxy in a pod of `policy`'s mesh.
    pub fn ports_of(&self, policy: &CapturePolicy) -> (u16, u16) {
        match policy.mesh {
            Mesh::Istio => (self.outbound_port, self.inbound_port),
            Mesh::Linkerd => (
                crate::policy::mesh::linkerd::OUTBOUND_PORT,
                crate::policy::mesh::linkerd::INBOUND_PORT,
            ),
        }
    }
}

/// Why this kernel cannot serve `policy`, if it cannot: a pod whose VMs' traffic
/// (`kubevirtInterfaces`) needs `sk_lookup`'s ingress interface, on a kernel older than 5.17,
/// is refused (locked, and its CNI ADD fails) so that its VM does not run uncaptured.
fn kernel_refusal(policy: &CapturePolicy, node: &NodeSettings) -> Option<String> {
    (!policy.vm_interfaces.is_empty() && !node.sees_ingress_ifindex).then(|| {
        "capturing a VM's traffic needs sk_lookup's ingress_ifindex (Linux 5.17), which this kernel lacks: the pod is refused (locked, and its CNI ADD fails) so that its VM does not run uncaptured; use redirectd.dev/skip: \"true\" to leave the pod to istio-cni or istio-init".to_string()
    })
}

/// A desired pod whose network namespace was found.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub spec: PodSpec,
    /// What its namespace showed on this pass (its rules depend on it).
    pub view: NamespaceView,
    pub netns_cookie: u64,
    /// A file of the pod's network namespace.
    pub netns_path: PathBuf,
    /// Set when the pod's configuration was rejected (the reason): the pod keeps what is
    /// applied (its last good configuration, or, across a restart, what the previous run
    /// left), or, never served, is locked: its connections are refused (`spec.policy` is
    /// then not used).
    pub rejected: Option<String>,
}

/// A pod as it is in the maps.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub pod_id: u32,
    pub netns_cookie: u64,
    #[serde(skip)]
    config: PodConfig,
    #[serde(skip)]
    rules: PodRules,
}

impl Applied {
    /// Locked: its configuration was rejected before it was ever served, and its
    /// connections are refused.
    pub fn locked(&self) -> bool {
        self.config.flags & POD_FLAG_REJECTED != 0
    }
}

/// What one pass changed or could not do.
#[derive(Debug, Default)]
pub struct Report {
    pub added: Vec<PodKey>,
    /// Pods a previous run had applied exactly so, taken over without a write.
    pub adopted: Vec<PodKey>,
    pub updated: Vec<PodKey>,
    pub removed: Vec<PodKey>,
    /// Pods that could not be applied, with the reason.
    pub failed: Vec<(PodKey, String)>,
    /// Pods whose new configuration was rejected (or whose namespace is not found for now):
    /// what is applied stays in force. With the reason.
    pub kept: Vec<(PodKey, String)>,
    /// Pods never served whose configuration was rejected: locked, connections refused.
    pub locked: Vec<(PodKey, String)>,
    /// Entries of retired pods or slots that could not be removed, with the reason (the
    /// pod is gone from the mesh all the same; the daemon logs these).
    pub cleanup_errors: Vec<String>,
}

impl Report {
    pub fn changed(&self) -> bool {
        !(self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty())
    }
}

/// Owns the record of what is applied.
pub struct Reconciler {
    node: NodeSettings,
    applied: BTreeMap<PodKey, Applied>,
    /// Slots that must not be handed out (used by a previous run's entries until swept).
    reserved: BTreeSet<u32>,
    /// `MESH_PODS` as a previous run left it, by netns cookie: a desired pod found there with
    /// the same configuration and rules is adopted as it is, nothing rewritten.
    previous: BTreeMap<u64, PodConfig>,
}

impl Reconciler {
    pub fn new(node: NodeSettings) -> Self {
        Self {
            node,
            applied: BTreeMap::new(),
            reserved: BTreeSet::new(),
            previous: BTreeMap::new(),
        }
    }

    /// Takes over what a previous run left in `MESH_PODS`: its slots are kept out of
    /// allocation until [`Self::release_reserved`], and its pods may be adopted.
    pub fn take_over(&mut self, previous: impl IntoIterator<Item = (u64, PodConfig)>) {
        for (cookie, config) in previous {
            self.reserved.insert(config.pod_id);
            self.previous.insert(cookie, config);
        }
    }

    /// Ends the take-over: slots not adopted may be reused (their entries are swept).
    pub fn release_reserved(&mut self) {
        self.reserved.clear();
        self.previous.clear();
    }

    /// A previous run's entry for this pod, if its configuration and rules are what we would
    /// write: then the pod is adopted with its slot and counters, and not one map entry
    /// changes (a daemon restart or upgrade is invisible to the data path).
    ///
    /// A pod whose configuration was rejected adopts whatever the previous run left for it:
    /// its last good configuration, kept across the restart.
    fn adoptable(&self, want: &Wanted, maps: &impl PodMaps) -> Option<(PodConfig, PodRules)> {
        let prev = *self.previous.get(&want.resolved.netns_cookie)?;
        if self.applied.values().any(|a| a.pod_id == prev.pod_id) {
            return None;
        }
        let existing = maps.existing_rules(prev.pod_id, prev.flags).ok()?;
        if want.rejected.is_some() {
            return Some((prev, existing));
        }
        let same_config = PodConfig {
            pod_id: prev.pod_id,
            ..want.config
        } == prev;
        (same_config && existing == want.rules).then_some((prev, existing))
    }

    pub fn applied(&self) -> &BTreeMap<PodKey, Applied> {
        &self.applied
    }

    fn allocate(&self, also_taken: &BTreeSet<u32>) -> Option<u32> {
        let used: BTreeSet<u32> = self.applied.values().map(|a| a.pod_id).collect();
        (0..MAX_PODS).find(|id| {
            !used.contains(id) && !self.reserved.contains(id) && !also_taken.contains(id)
        })
    }

    /// Brings the maps to `desired`. A pod that cannot be applied keeps its previous state
    /// (if any) and is reported; the others proceed. Three steps: plan what each desired pod
    /// should look like, apply installs and updates, then retire what is no longer wanted.
    ///
    /// `keep`: desired pods that could not be resolved this time (their namespace is not
    /// found for now): whatever is applied for them stays. A pod leaves the maps only when it
    /// is no longer desired, never because of an error.
    pub fn reconcile(
        &mut self,
        desired: &[Resolved],
        keep: &[PodKey],
        maps: &mut impl PodMaps,
    ) -> Report {
        let mut report = Report::default();
        let plan = self.plan(desired, keep, &mut report);
        let retired = self.apply(&plan, maps, &mut report);
        self.retire(&plan, retired, maps, &mut report);
        report
    }

    /// What each desired pod's entries should be. A pod whose network namespace is already
    /// another desired pod's is reported and left out. `keep`: pods to leave as they are
    /// (their namespace is not found for now).
    fn plan<'a>(&self, desired: &'a [Resolved], keep: &[PodKey], report: &mut Report) -> Plan<'a> {
        let mut plan = Plan {
            keep: keep
                .iter()
                .filter(|k| self.applied.contains_key(*k))
                .cloned()
                .collect(),
            ..Default::default()
        };
        // A kept pod's namespace stays its own: no other pod is installed there.
        let mut cookie_owner: BTreeMap<u64, &PodKey> = self
            .applied
            .iter()
            .filter(|(k, _)| plan.keep.contains(*k))
            .map(|(k, a)| (a.netns_cookie, k))
            .collect();
        for r in desired {
            if let Some(other) = cookie_owner.get(&r.netns_cookie) {
                report.failed.push((
                    r.spec.key.clone(),
                    format!("its network namespace is already pod {other}'s"),
                ));
                continue;
            }
            cookie_owner.insert(r.netns_cookie, &r.spec.key);
            let compiled = r.rejected.is_none().then(|| {
                let proxy_ports = self.node.proxy_ports_of(&r.spec.policy);
                PodRules::compile(&r.spec.policy, &r.view, &r.spec.ips, proxy_ports)
            });
            // Rules over the per-pod limit, or a setting this kernel cannot serve, are a
            // rejected configuration like a typo.
            let rejected = r.rejected.clone().or_else(|| {
                compiled.as_ref().and_then(|c| {
                    room::over_pod_limit(c, self.node.rules_per_pod)
                        .or_else(|| kernel_refusal(&r.spec.policy, &self.node))
                })
            });
            if let Some(reason) = &rejected {
                // Kept only in the namespace it was applied in: a pod recreated in a new one
                // with a rejected configuration is locked there.
                let same_netns = |a: &&Applied| a.netns_cookie == r.netns_cookie;
                if let Some(a) = self.applied.get(&r.spec.key).filter(same_netns) {
                    // What is in force stays: the last good configuration (or the lock).
                    let state = if a.locked() {
                        &mut report.locked
                    } else {
                        &mut report.kept
                    };
                    state.push((r.spec.key.clone(), reason.clone()));
                    plan.keep.insert(r.spec.key.clone());
                    continue;
                }
            }
            let rules = match compiled {
                Some(c) if rejected.is_none() => c,
                _ => PodRules::locked(&r.spec.ips, self.node.proxy_ports_of(&r.spec.policy)),
            };
            let config = self.config_for(&r.spec, &rules);
            plan.pods.insert(
                r.spec.key.clone(),
                Wanted {
                    resolved: r,
                    config,
                    rules,
                    rejected,
                },
            );
        }
        plan
    }

    /// Installs new pods and updates changed ones (each in a fresh slot); returns the entries
    /// the updates replaced, to be retired.
    fn apply(&mut self, plan: &Plan, maps: &mut impl PodMaps, report: &mut Report) -> Vec<Applied> {
        let mut replaced = Vec::new();
        let mut fresh = BTreeSet::new();
        let mut usage = self.usage();
        for (key, want) in &plan.pods {
            match self.applied.get(key) {
                Some(a) if a.is(want) => continue,
                Some(_) => {}
                None => {
                    if let Some((prev, rules)) = self.adoptable(want, maps) {
                        usage.add(&rules);
                        match self.adopt(key, want, prev, rules, maps) {
                            Ok(()) => report.adopted.push(key.clone()),
                            Err(e) => report.failed.push((key.clone(), format!("{e:#}"))),
                        }
                        if let Some(reason) = &want.rejected {
                            report.kept.push((key.clone(), reason.clone()));
                        }
                        continue;
                    }
                }
            }
            let Some(pod_id) = self.allocate(&fresh) else {
                report.failed.push((
                    key.clone(),
                    format!("no free pod slot (limit {MAX_PODS} pods)"),
                ));
                continue;
            };
            let Some((installed, locked_why)) =
                self.install_or_lock(key, want, pod_id, &usage, maps, report)
            else {
                continue;
            };
            usage.add(&installed.rules);
            if let Some(reason) = locked_why {
                report.locked.push((key.clone(), reason));
            }
            fresh.insert(pod_id);
            let new = Applied {
                pod_id,
                netns_cookie: want.resolved.netns_cookie,
                config: PodConfig {
                    pod_id,
                    ..installed.config
                },
                rules: installed.rules,
            };
            match self.applied.insert(key.clone(), new) {
                Some(old) => {
                    report.updated.push(key.clone());
                    // Its rules are removed at retire: no other pod may take the slot
                    // before then, or that pod's identical entries would go with them.
                    fresh.insert(old.pod_id);
                    replaced.push(old);
                }
                None => report.added.push(key.clone()),
            }
        }
        replaced
    }

    /// Installs `want` in slot `pod_id`, if its rules fit the room the node's rule maps have
    /// left (and the kernel takes them). A pod that does not fit is never left uncaptured:
    /// served before, what is in force stays (reported); never served, it is installed
    /// locked, which only needs room the maps hold in reserve. Returns what was installed
    /// and, if locked, why; `None` when nothing was (reported).
    fn install_or_lock(
        &self,
        key: &PodKey,
        want: &Wanted,
        pod_id: u32,
        usage: &Usage,
        maps: &mut impl PodMaps,
        report: &mut Report,
    ) -> Option<(Installed, Option<String>)> {
        let locked = want.rejected.is_some();
        let attempt = usage
            .fits(&want.rules, locked)
            .map_err(anyhow::Error::msg)
            .and_then(|()| self.install(key, want, pod_id, maps));
        let why = match attempt {
            Ok(()) => return Some((Installed::of(want), want.rejected.clone())),
            Err(e) => format!("{e:#}"),
        };
        if let Some(a) = self.applied.get(key) {
            let state = if a.locked() {
                &mut report.locked
            } else {
                &mut report.kept
            };
            state.push((key.clone(), why));
            return None;
        }
        if locked {
            report.failed.push((key.clone(), why));
            return None;
        }
        let spec = &want.resolved.spec;
        let rules = PodRules::locked(&spec.ips, self.node.proxy_ports_of(&spec.policy));
        let lock = Wanted {
            resolved: want.resolved,
            config: self.config_for(&want.resolved.spec, &rules),
            rules,
            rejected: Some(why.clone()),
        };
        match self.install(key, &lock, pod_id, maps) {
            Ok(()) => Some((Installed::of(&lock), Some(why))),
            Err(e) => {
                report
                    .failed
                    .push((key.clone(), format!("{why}; locking it failed too: {e:#}")));
                None
            }
        }
    }

    /// The `MESH_PODS` entry of `spec` with `rules` (slot 0 until one is given).
    fn config_for(&self, spec: &PodSpec, rules: &PodRules) -> PodConfig {
        PodConfig {
            pod_id: 0,
            proxy_uid: spec.policy.proxy_uid.unwrap_or(self.node.proxy_uid),
            proxy_gid: spec.policy.proxy_gid.unwrap_or(self.node.proxy_gid),
            outbound_port: self.node.ports_of(&spec.policy).0,
            inbound_port: self.node.ports_of(&spec.policy).1,
            flags: rules.flags,
            _pad: 0,
        }
    }

    /// Entries the applied pods' rules take in the shared rule maps.
    fn usage(&self) -> Usage {
        let mut u = Usage::default();
        for a in self.applied.values() {
            u.add(&a.rules);
        }
        u
    }

    /// `(map, entries, capacity)` of the shared rule maps, for status and metrics.
    pub fn rule_maps(&self) -> Vec<(&'static str, usize, u32)> {
        self.usage().report()
    }

    /// Takes over a previous run's entries for a pod as they are; only inbound capture is
    /// re-armed (it adopts the pinned link and registers listeners).
    fn adopt(
        &mut self,
        key: &PodKey,
        want: &Wanted,
        prev: PodConfig,
        rules: PodRules,
        maps: &mut impl PodMaps,
    ) -> anyhow::Result<()> {
        let r = want.resolved;
        let ports = [prev.inbound_port, prev.outbound_port];
        maps.attach_inbound(r.netns_cookie, &r.netns_path, ports)?;
        self.applied.insert(
            key.clone(),
            Applied {
                pod_id: prev.pod_id,
                netns_cookie: r.netns_cookie,
                config: prev,
                rules,
            },
        );
        Ok(())
    }

    /// Writes a pod's entries in slot `pod_id`: counters, rules, inbound capture (for a new
    /// namespace), and last its `MESH_PODS` entry, which makes it visible. On failure, what
    /// was written is rolled back and the pod's previous state (if any) stays in force.
    fn install(
        &self,
        key: &PodKey,
        want: &Wanted,
        pod_id: u32,
        maps: &mut impl PodMaps,
    ) -> anyhow::Result<()> {
        let r = want.resolved;
        let config = PodConfig {
            pod_id,
            ..want.config
        };
        let new_netns = self.applied.get(key).map(|a| a.netns_cookie) != Some(r.netns_cookie);
        let step = (|| -> anyhow::Result<()> {
            maps.reset_counters(pod_id)?;
            maps.install_rules(pod_id, &want.rules)?;
            if new_netns {
                let ports = [config.inbound_port, config.outbound_port];
                maps.attach_inbound(r.netns_cookie, &r.netns_path, ports)?;
            }
            maps.set_pod(r.netns_cookie, &config)
        })();
        if step.is_err() {
            // Best effort: the error that made us roll back is the one reported.
            let _ = maps.remove_rules(pod_id, &want.rules);
            let netns_in_use = self
                .applied
                .values()
                .any(|a| a.netns_cookie == r.netns_cookie);
            if new_netns && !netns_in_use {
                let _ = maps.detach_inbound(r.netns_cookie);
            }
        }
        step
    }

    /// Removes pods no longer desired and the old slots of updated pods. A namespace still
    /// used by a desired pod keeps its `MESH_PODS` entry and inbound link. Errors are reported
    /// in `report.cleanup_errors`.
    fn retire(
        &mut self,
        plan: &Plan,
        mut retired: Vec<Applied>,
        maps: &mut impl PodMaps,
        report: &mut Report,
    ) {
        let gone: Vec<PodKey> = self
            .applied
            .keys()
            .filter(|k| !plan.pods.contains_key(*k) && !plan.keep.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(old) = self.applied.remove(&key) {
                retired.push(old);
                report.removed.push(key);
            }
        }
        for old in retired {
            // What is still applied is exactly what is desired or kept.
            let netns_in_use = self
                .applied
                .values()
                .any(|a| a.netns_cookie == old.netns_cookie);
            let mut results = Vec::new();
            if !netns_in_use {
                results.push(maps.remove_pod(old.netns_cookie));
                results.push(maps.detach_inbound(old.netns_cookie));
            }
            results.push(maps.remove_rules(old.pod_id, &old.rules));
            report.cleanup_errors.extend(
                results
                    .into_iter()
                    .filter_map(|r| r.err())
                    .map(|e| format!("cleaning up pod slot {}: {e:#}", old.pod_id)),
            );
        }
    }
}

/// A desired pod, with the entries it should have.
#[derive(Debug)]
struct Wanted<'a> {
    resolved: &'a Resolved,
    /// `pod_id` is set when a slot is given.
    config: PodConfig,
    rules: PodRules,
    /// Why its configuration is rejected (then `rules` lock it, if it was never served).
    rejected: Option<String>,
}

/// What [`Reconciler::install_or_lock`] wrote.
struct Installed {
    config: PodConfig,
    rules: PodRules,
}

impl Installed {
    fn of(want: &Wanted) -> Self {
        Self {
            config: want.config,
            rules: want.rules.clone(),
        }
    }
}

/// What one pass wants in the maps.
#[derive(Debug, Default)]
struct Plan<'a> {
    pods: BTreeMap<PodKey, Wanted<'a>>,
    /// Applied pods left exactly as they are this pass.
    keep: BTreeSet<PodKey>,
}

impl Applied {
    /// Is this pod already applied exactly as wanted?
    fn is(&self, want: &Wanted) -> bool {
        let same_config = PodConfig {
            pod_id: self.pod_id,
            ..want.config
        } == self.config;
        self.netns_cookie == want.resolved.netns_cookie && same_config && self.rules == want.rules
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use redirect_common::PORT_EXCLUDE_INBOUND;

    use super::*;
    use crate::pods::NetnsRef;

    #[derive(Default)]
    struct FakeMaps {
        pods: BTreeMap<u64, PodConfig>,
        ports: BTreeSet<(u32, u8, u16)>,
        fail_set_pod: bool,
        fail_remove: bool,
        inbound: BTreeSet<u64>,
        log: Vec<String>,
    }

    impl PodMaps for FakeMaps {
        fn install_rules(&mut self, pod_id: u32, rules: &PodRules) -> anyhow::Result<()> {
            self.log.push(format!("rules+ {pod_id}"));
            self.ports
                .extend(rules.ports.iter().map(|(k, p)| (pod_id, *k, *p)));
            Ok(())
        }
        fn remove_rules(&mut self, pod_id: u32, rules: &PodRules) -> anyhow::Result<()> {
            self.log.push(format!("rules- {pod_id}"));
            for (k, p) in &rules.ports {
                self.ports.remove(&(pod_id, *k, *p));
            }
            Ok(())
        }
        fn set_pod(&mut self, c: u64, cfg: &PodConfig) -> anyhow::Result<()> {
            if self.fail_set_pod {
                anyhow::bail!("map full");
            }
            self.log.push(format!("pod+ {c}->{}", cfg.pod_id));
            self.pods.insert(c, *cfg);
            Ok(())
        }
        fn remove_pod(&mut self, c: u64) -> anyhow::Result<()> {
            if self.fail_remove {
                anyhow::bail!("EBUSY");
            }
            self.log.push(format!("pod- {c}"));
            self.pods.remove(&c);
            Ok(())
        }
        fn reset_counters(&mut self, _: u32) -> anyhow::Result<()> {
            Ok(())
        }
        fn existing_rules(&self, pod_id: u32, flags: u32) -> anyhow::Result<PodRules> {
            Ok(PodRules {
                ports: self
                    .ports
                    .iter()
                    .filter(|(id, _, _)| *id == pod_id)
                    .map(|(_, k, p)| (*k, *p))
                    .collect(),
                addrs: Default::default(),
                groups: Default::default(),
                flags,
                sources: Default::default(),
            })
        }
        fn attach_inbound(
            &mut self,
            c: u64,
            _: &std::path::Path,
            _: [u16; 2],
        ) -> anyhow::Result<()> {
            self.log.push(format!("in+ {c}"));
            self.inbound.insert(c);
            Ok(())
        }
        fn detach_inbound(&mut self, c: u64) -> anyhow::Result<()> {
            self.log.push(format!("in- {c}"));
            self.inbound.remove(&c);
            Ok(())
        }
    }

    fn node() -> NodeSettings {
        NodeSettings {
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            proxy_ports: vec![15001, 15006],
            rules_per_pod: 256,
            sees_ingress_ifindex: true,
        }
    }

    fn pod(name: &str, cookie: u64, excluded: &[u16]) -> Resolved {
        Resolved {
            spec: PodSpec {
                key: PodKey {
                    namespace: "default".into(),
                    name: name.into(),
                },
                netns: NetnsRef::Path(PathBuf::from(format!("/run/netns/{name}"))),
                ips: vec![],
                policy: CapturePolicy {
                    exclude_outbound_ports: excluded.iter().copied().collect(),
                    ..Default::default()
                },
            },
            view: Default::default(),
            netns_cookie: cookie,
            netns_path: PathBuf::from(format!("/run/netns/{name}")),
            rejected: None,
        }
    }

    #[test]
    fn add_update_remove() {
        let mut r = Reconciler::new(node());
        let mut m = FakeMaps::default();
        let rep = r.reconcile(&[pod("a", 10, &[5432]), pod("b", 20, &[])], &[], &mut m);
        assert_eq!(rep.added.len(), 2);
        assert_eq!(m.pods.len(), 2);
        assert!(m.ports.contains(&(m.pods[&10].pod_id, 1, 5432)));

        // Unchanged: nothing written.
        m.log.clear();
        let rep = r.reconcile(&[pod("a", 10, &[5432]), pod("b", 20, &[])], &[], &mut m);
        assert!(!rep.changed());
        assert!(m.log.is_empty(), "{:?}", m.log);

        // Update: new slot, entry replaced, old rules removed, cookie kept.
        let old_id = m.pods[&10].pod_id;
        let rep = r.reconcile(&[pod("a", 10, &[6379]), pod("b", 20, &[])], &[], &mut m);
        assert_eq!(rep.updated.len(), 1);
        let new_id = m.pods[&10].pod_id;
        assert_ne!(old_id, new_id);
        assert!(m.ports.contains(&(new_id, 1, 6379)));
        assert!(!m.ports.contains(&(old_id, 1, 5432)));
        assert!(!m.log.contains(&"pod- 10".to_string()), "{:?}", m.log);
        let plus = m.log.iter().position(|l| l.starts_with("pod+ 10")).unwrap();
        let minus = m
            .log
            .iter()
            .position(|l| l == &format!("rules- {old_id}"))
            .unwrap();
        assert!(
            plus < minus,
            "old rules removed before the new entry: {:?}",
            m.log
        );

        assert_eq!(
            m.inbound,
            [10, 20].into(),
            "an update keeps the inbound link"
        );

        // Remove b.
        let rep = r.reconcile(&[pod("a", 10, &[6379])], &[], &mut m);
        assert_eq!(rep.removed.len(), 1);
        assert_eq!(m.pods.keys().copied().collect::<Vec<_>>(), vec![10]);
        assert_eq!(m.inbound, [10].into(), "a removed pod's inbound link goes");
    }

    #[test]
    fn same_netns_twice_is_rejected_and_failures_are_isolated() {
        let mut r = Reconciler::new(node());
        let mut m = FakeMaps::default();
        let rep = r.reconcile(&[pod("a", 10, &[]), pod("b", 10, &[])], &[], &mut m);
        assert_eq!(rep.added.len(), 1);
        assert_eq!(rep.failed.len(), 1);
        assert!(rep.failed[0].1.contains("default/a"));

        m.fail_set_pod = true;
        let rep = r.reconcile(&[pod("a", 10, &[]), pod("c", 30, &[1])], &[], &mut m);
        assert_eq!(rep.failed.len(), 1);
        let a_id = m.pods[&10].pod_id;
        assert!(
            m.ports.iter().all(|(id, _, _)| *id == a_id),
            "rules of a failed pod are rolled back: {:?}",
            m.ports
        );
        assert!(!m.inbound.contains(&30), "and its inbound link");
        assert!(m.pods.contains_key(&10));
    }

    #[test]
    fn an_updated_pods_old_slot_is_not_reused_in_the_same_pass() {
        let mut r = Reconciler::new(node());
        let mut m = FakeMaps::default();
        r.reconcile(&[pod("a", 10, &[1])], &[], &mut m);
        let old = m.pods[&10].pod_id;
        // a changes (new slot) and b arrives in the same pass: b must not get a's old slot,
        // whose rules (the proxy ports, shared by every pod) are removed after.
        r.reconcile(&[pod("a", 10, &[2]), pod("b", 20, &[])], &[], &mut m);
        assert_ne!(m.pods[&20].pod_id, old);
        let b = m.pods[&20].pod_id;
        assert!(
            m.ports.contains(&(b, PORT_EXCLUDE_INBOUND, 15001)),
            "b lost its rules: {:?}",
            m.ports
        );
    }

    fn rejected(mut p: Resolved) -> Resolved {
        p.rejected = Some("bad annotation".into());
        p
    }

    #[test]
    fn a_served_pod_keeps_its_last_good_rules_when_its_new_ones_are_rejected() {
        let mut r = Reconciler::new(node());
        let mut m = FakeMaps::default();
        r.reconcile(&[pod("a", 10, &[5432])], &[], &mut m);
        let (pods, ports) = (m.pods.clone(), m.ports.clone());
        m.log.clear();
        let rep = r.reconcile(&[rejected(pod("a", 10, &[]))], &[], &mut m);
        assert!(rep.removed.is_empty() && !rep.changed(), "{rep:?}");
        assert_eq!(rep.kept.len(), 1);
        assert!(m.log.is_empty(), "nothing written: {:?}", m.log);
        assert_eq!((m.pods.clone(), m.ports.clone()), (pods, ports));
        // Fixed: the new configuration is applied.
        let rep = r.reconcile(&[pod("a", 10, &[6379])], &[], &mut m);
        assert_eq!(rep.updated.len(), 1);
        assert!(m.ports.iter().any(|(_, _, p)| *p == 6379));
    }

    /// Ports 1..=n excluded: n PORT_RULES entries, plus the two proxy ports.
    fn ports(n: u16) -> Vec<u16> {
        (1..=n).collect()
    }

    #[test]
    fn rules_over_the_per_pod_limit_lock_a_new_pod_and_keep_a_served_one() {
        let mut r = Reconciler::new(node());
        let mut m = FakeMaps::default();
        let rep = r.reconcile(&[pod("big", 10, &ports(300))], &[], &mut m);
        assert_eq!(rep.locked.len(), 1, "{rep:?}");
        assert!(rep.locked[0].1.contains("per-pod limit of 256"), "{rep:?}");
        assert_ne!(m.pods[&10].flags & POD_FLAG_REJECTED, 0);
        // Served first, then grown past the limit: its last good rules stay.
        r.reconcile(&[pod("a", 11, &ports(10))], &[], &mut m);
        let rep = r.reconcile(&[pod("a", 11, &ports(300))], &[], &mut m);
        assert_eq!(rep.kept.len(), 1, "{rep:?}");
        assert_eq!(m.pods[&11].flags & POD_FLAG_REJECTED, 0);
        assert!(m.ports.iter().any(|(_, _, p)| *p == 10));
        assert!(!m.ports.iter().any(|(_, _, p)| *p == 11));
    }

    #[test]
    fn a_pod_that_does_not_fit_the_node_is_locked_never_left_uncaptured() {
        let mut r = Reconciler::new(NodeSettings {
            rules_per_pod: 20_000,
            ..node()
        });
        let mut m = FakeMaps::default();
        // 65,536 PORT_RULES less a sixteenth in reserve: 61,440 for served pods.
        let pods: Vec<Resolved> = (0..3)
            .map(|i| pod(&format!("p{i}"), 10 + i, &ports(19_990)))
            .collect();
        let rep = r.reconcile(&pods, &[], &mut m);
        assert_eq!(rep.added.len(), 3, "{rep:?}");
        let mut more = pods.clone();
        more.push(pod("late", 20, &ports(2_000)));
        let rep = r.reconcile(&more, &[], &mut m);
        assert_eq!(rep.locked.len(), 1, "{rep:?}");
        assert!(
            rep.locked[0].1.contains("PORT_RULES map is full"),
            "{rep:?}"
        );
        assert_ne!(m.pods[&20].flags & POD_FLAG_REJECTED, 0);
        assert_eq!(r.rule_maps()[0].0, "PORT_RULES");
        // Room made (a pod removed; its entries go at the end of that pass): served as
        // configured at the next pass.
        let rep = r.reconcile(&more[1..], &[], &mut m);
        assert_eq!(rep.removed.len(), 1, "{rep:?}");
        let rep = r.reconcile(&more[1..], &[], &mut m);
        assert_eq!(rep.updated.len(), 1, "{rep:?}");
        assert_eq!(m.pods[&20].flags & POD_FLAG_REJECTED, 0);
    }

    #[test]
    fn no_pod_is_installed_in_a_kept_pods_namespace() {
        let mut r = Reconciler::new(node());
        let mut m = FakeMaps::default();
        r.reconcile(&[pod("a", 10, &[])], &[], &mut m);
        let a = PodKey {
            namespace: "default".into(),
            name: "a".into(),
        };
        // `a` held (its entry broken); another entry claims its namespace.
        let rep = r.reconcile(&[pod("b", 10, &[1])], &[a], &mut m);
        assert_eq!(rep.failed.len(), 1, "{rep:?}");
        assert!(
            rep.failed[0].1.contains("already pod default/a's"),
            "{rep:?}"
        );
        assert_eq!(m.pods.len(), 1);
        assert!(m.ports.iter().all(|(_, _, p)| *p != 1));
    }

    #[test]
    fn a_new_pod_with_a_rejected_configuration_is_locked_then_fixed() {
        let mut r = Reconciler::new(node());
        let mut m = FakeMaps::default();
        let rep = r.reconcile(&[rejected(pod("a", 10, &[]))], &[], &mut m);
        assert_eq!(rep.locked.len(), 1, "{rep:?}");
        assert_ne!(m.pods[&10].flags & POD_FLAG_REJECTED, 0);
        assert_ne!(m.pods[&10].flags & redirect_common::POD_FLAG_FAIL_CLOSED, 0);
        // Still rejected: stays locked, nothing rewritten.
        m.log.clear();
        let rep = r.reconcile(&[rejected(pod("a", 10, &[]))], &[], &mut m);
        assert_eq!(rep.locked.len(), 1);
        assert!(m.log.is_empty(), "{:?}", m.log);
        let rep = r.reconcile(&[pod("a", 10, &[])], &[], &mut m);
        assert_eq!(rep.updated.len(), 1);
        assert_eq!(m.pods[&10].flags & POD_FLAG_REJECTED, 0);
    }

    /// VM interfaces on a kernel whose `sk_lookup` cannot see the ingress interface: the pod
    /// is locked (its VM would otherwise run uncaptured), and served where the kernel can.
    #[test]
    fn a_vm_pod_on_a_kernel_without_ingress_ifindex_is_locked() {
        let vm = |cookie| {
            let mut p = pod("vm", cookie, &[]);
            p.spec.policy.vm_interfaces = ["tap0".to_string()].into();
            p
        };
        let old_kernel = NodeSettings {
            sees_ingress_ifindex: false,
            ..node()
        };
        let mut m = FakeMaps::default();
        let rep = Reconciler::new(old_kernel).reconcile(&[vm(10)], &[], &mut m);
        assert_eq!(rep.locked.len(), 1, "{rep:?}");
        assert!(rep.locked[0].1.contains("ingress_ifindex"), "{rep:?}");
        assert_ne!(m.pods[&10].flags & POD_FLAG_REJECTED, 0);
        let mut m = FakeMaps::default();
        let rep = Reconciler::new(node()).reconcile(&[vm(10)], &[], &mut m);
        assert!(rep.locked.is_empty(), "{rep:?}");
        assert_eq!(m.pods[&10].flags & POD_FLAG_REJECTED, 0);
    }

    #[test]
    fn a_pod_recreated_in_a_new_namespace_with_a_rejected_configuration_is_locked() {
        let mut r = Reconciler::new(node());
        let mut m = FakeMaps::default();
        r.reconcile(&[pod("a", 10, &[])], &[], &mut m);
        let rep = r.reconcile(&[rejected(pod("a", 11, &[]))], &[], &mut m);
        assert_eq!(rep.locked.len(), 1, "{rep:?}");
        assert_eq!(m.pods.keys().copied().collect::<Vec<_>>(), vec![11]);
        assert_ne!(m.pods[&11].flags & POD_FLAG_REJECTED, 0);
    }

    #[test]
    fn a_pod_whose_namespace_is_not_found_for_now_stays_applied() {
        let mut r = Reconciler::new(node());
        let mut m = FakeMaps::default();
        r.reconcile(&[pod("a", 10, &[]), pod("b", 20, &[])], &[], &mut m);
        let b = PodKey {
            namespace: "default".into(),
            name: "b".into(),
        };
        let rep = r.reconcile(&[pod("a", 10, &[])], std::slice::from_ref(&b), &mut m);
        assert!(rep.removed.is_empty(), "{rep:?}");
        assert!(m.pods.contains_key(&20) && m.inbound.contains(&20));
        // Gone from the desired set: removed.
        let rep = r.reconcile(&[pod("a", 10, &[])], &[], &mut m);
        assert_eq!(rep.removed, vec![b]);
    }

    #[test]
    fn across_a_restart_a_rejected_pod_keeps_what_the_previous_run_left() {
        let mut m = FakeMaps::default();
        Reconciler::new(node()).reconcile(&[pod("a", 10, &[5432])], &[], &mut m);
        let before = m.pods.clone();
        let mut r = Reconciler::new(node());
        r.take_over(m.pods.clone());
        let rep = r.reconcile(&[rejected(pod("a", 10, &[]))], &[], &mut m);
        assert_eq!(rep.adopted.len(), 1, "{rep:?}");
        assert_eq!(rep.kept.len(), 1);
        assert_eq!(m.pods, before);
        assert!(m.ports.iter().any(|(_, _, p)| *p == 5432));
    }

    #[test]
    fn cleanup_errors_are_reported_not_swallowed() {
        let mut r = Reconciler::new(node());
        let mut m = FakeMaps::default();
        r.reconcile(&[pod("a", 10, &[]), pod("b", 20, &[])], &[], &mut m);
        m.fail_remove = true;
        let rep = r.reconcile(&[pod("a", 10, &[])], &[], &mut m);
        assert_eq!(rep.removed.len(), 1);
        assert_eq!(rep.cleanup_errors.len(), 1, "{:?}", rep.cleanup_errors);
        assert!(rep.cleanup_errors[0].contains("EBUSY"));
        assert!(rep.failed.is_empty());
    }

    #[test]
    fn pod_moving_to_a_new_netns() {
        let mut r = Reconciler::new(node());
        let mut m = FakeMaps::default();
        r.reconcile(&[pod("a", 10, &[])], &[], &mut m);
        r.reconcile(&[pod("a", 11, &[])], &[], &mut m);
        assert_eq!(m.pods.keys().copied().collect::<Vec<_>>(), vec![11]);
        assert_eq!(m.inbound, [11].into());
    }

    #[test]
    fn a_restart_adopts_what_is_unchanged_and_rewrites_the_rest() {
        let mut m = FakeMaps::default();
        let mut first = Reconciler::new(node());
        first.reconcile(&[pod("a", 10, &[5432]), pod("b", 20, &[1])], &[], &mut m);
        let before = m.pods.clone();

        // A new daemon: a is unchanged, b's annotations changed while it was down, c is new.
        let mut r = Reconciler::new(node());
        r.take_over(m.pods.clone());
        m.log.clear();
        let rep = r.reconcile(
            &[pod("a", 10, &[5432]), pod("b", 20, &[2]), pod("c", 30, &[])],
            &[],
            &mut m,
        );
        assert_eq!(rep.adopted.len(), 1);
        assert_eq!(m.pods[&10], before[&10], "a adopted with its slot");
        assert!(
            !m.log.iter().any(|l| l.starts_with("pod+ 10")
                || l.starts_with("rules+ ") && l.ends_with(&format!(" {}", before[&10].pod_id))),
            "{:?}",
            m.log
        );
        assert_ne!(
            m.pods[&20].pod_id, before[&20].pod_id,
            "b rewritten in a fresh slot"
        );
        assert!(
            ![before[&10].pod_id, before[&20].pod_id].contains(&m.pods[&30].pod_id),
            "reserved slots are not reused"
        );
    }
}
