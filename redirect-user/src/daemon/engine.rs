//! The engine: owns the maps, the reconciler's record and the netns resolver, and does one
//! pass (resolve every desired pod's namespace, reconcile, read back what is applied).

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use redirect_common::PodCounters;

use crate::{
    kernel::datapath::Datapath,
    podns::interfaces::NamespaceView,
    podns::netns::Resolver,
    pods::{Desired, PodKey, PodSpec},
    reconcile::{Reconciler, Report, Resolved},
};

/// What one pass did, for the loop to publish.
pub(super) struct Pass {
    pub(super) report: Report,
    /// Desired pods whose namespace was not found yet, each with the reason (retried).
    pub(super) pending: BTreeMap<PodKey, String>,
    /// Those pods, and those whose entry is unusable: what is applied for them stays.
    pub(super) unresolved: Vec<PodKey>,
    /// How each applied pod's namespace was found, for status.
    pub(super) netns: BTreeMap<PodKey, String>,
    /// Every applied pod.
    pub(super) applied: Vec<AppliedPod>,
    /// `(map, entries, capacity)` of the connection maps.
    pub(super) fill: Vec<(&'static str, usize, u32)>,
    /// `(map, entries, capacity)` of the shared rule maps.
    pub(super) rule_maps: Vec<(&'static str, usize, u32)>,
    /// Verifier instruction count of the per-pod program, when one was loaded.
    pub(super) inbound_insns: Option<u32>,
}

/// A pod the maps serve after a pass.
pub(super) struct AppliedPod {
    pub(super) key: PodKey,
    pub(super) pod_id: u32,
    pub(super) netns_cookie: u64,
    /// Its counters (zero unless the metrics are served).
    pub(super) counters: PodCounters,
}

/// Every desired pod, resolved or not.
#[derive(Default)]
pub(super) struct Resolution {
    pub(super) resolved: Vec<Resolved>,
    /// Desired pods whose namespace is not found for now.
    pub(super) unresolved: Vec<PodKey>,
    /// Why, for each of those.
    pub(super) pending: BTreeMap<PodKey, String>,
    /// How each resolved pod's namespace was found.
    pub(super) netns: BTreeMap<PodKey, String>,
}

/// Owns the maps, the reconciler's record and the netns resolver. Only its methods touch
/// the kernel; each may block.
pub(super) struct Engine {
    pub(super) datapath: Datapath,
    pub(super) reconciler: Reconciler,
    pub(super) resolver: Resolver,
    /// Whether what a previous run left and no pod owns was swept (once, after start, when
    /// every desired pod was found).
    pub(super) swept: bool,
    pub(super) started: std::time::Instant,
    /// Whether each pass reads the pods' counters (only the metrics show them).
    pub(super) read_counters: bool,
    /// The node's proxy uid and gid, for pods that do not say (translated for a
    /// user-namespaced pod).
    pub(super) proxy_ids: (u32, u32),
    /// The kernel's `net` sysctls, for TPROXY pods' accept mark.
    pub(super) proc_sys_net: PathBuf,
    /// The proxy's outbound port, whose listeners VM pods need transparent.
    pub(super) outbound_port: u16,
}

/// How long after start a previous run's entries wait for pods whose namespace is not found
/// before they are swept all the same.
pub(super) const SWEEP_GRACE: Duration = Duration::from_secs(60);

impl Engine {
    /// Resolves, reconciles and reads back what the loop publishes.
    pub(super) fn pass(&mut self, desired: &Desired) -> Pass {
        let Resolution {
            resolved,
            mut unresolved,
            pending,
            netns,
        } = self.resolve(desired);
        // Pods whose entry is unusable keep what is applied for them, as unresolved ones do.
        for (key, _) in &desired.held {
            if !unresolved.contains(key) {
                unresolved.push(key.clone());
            }
        }
        let mut report = self
            .reconciler
            .reconcile(&resolved, &unresolved, &mut self.datapath);
        for (key, e) in &desired.held {
            if self.reconciler.applied().contains_key(key) {
                report
                    .kept
                    .push((key.clone(), format!("{}: {}", e.field, e.reason)));
            }
        }
        // What a previous run left is swept once every desired pod was found (a pod whose
        // namespace is not found yet may own some of those entries), or, at the latest,
        // SWEEP_GRACE after start (a pod listed but gone must not hold slots for ever).
        if !self.swept && (unresolved.is_empty() || self.started.elapsed() >= SWEEP_GRACE) {
            self.sweep_previous_run();
            self.swept = true;
        }
        let applied = self
            .reconciler
            .applied()
            .iter()
            .map(|(k, a)| {
                let c = if self.read_counters {
                    self.datapath.counters(a.pod_id).unwrap_or_default()
                } else {
                    PodCounters::default()
                };
                AppliedPod {
                    key: k.clone(),
                    pod_id: a.pod_id,
                    netns_cookie: a.netns_cookie,
                    counters: c,
                }
            })
            .collect();
        Pass {
            report,
            pending,
            unresolved,
            netns,
            applied,
            fill: self.datapath.fill(),
            rule_maps: self.reconciler.rule_maps(),
            inbound_insns: self.datapath.inbound_insns.take(),
        }
    }

    /// Finds every desired pod's network namespace, valid or not (a pod whose configuration
    /// was rejected is still known, and is kept captured or locked).
    pub(super) fn resolve(&mut self, desired: &Desired) -> Resolution {
        let mut out = Resolution::default();
        let valid = desired.pods.iter().map(|p| (p, None));
        let invalid = desired.invalid.iter().map(|p| {
            let spec = PodSpec {
                key: p.key.clone(),
                netns: p.netns.clone(),
                ips: p.ips.clone(),
                policy: p.mesh.base_policy(),
            };
            (spec, Some(p.error.to_string()))
        });
        let all: Vec<(PodSpec, Option<String>)> =
            valid.map(|(p, r)| (p.clone(), r)).chain(invalid).collect();
        for (spec, rejected) in all {
            let found = self.resolver.resolve(&spec.netns).and_then(|found| {
                let (spec, view) = self.host_view(spec.clone(), &found.path)?;
                Ok((found, spec, view))
            });
            match found {
                Ok((found, spec, view)) => {
                    out.netns.insert(spec.key.clone(), found.description);
                    out.resolved.push(Resolved {
                        spec,
                        view,
                        netns_cookie: found.cookie,
                        netns_path: found.path,
                        rejected,
                    });
                }
                Err(e) => {
                    out.pending.insert(
                        spec.key.clone(),
                        format!(
                            "netns {}: {e:#} (retrying; what is applied for it stays)",
                            spec.netns
                        ),
                    );
                    out.unresolved.push(spec.key);
                }
            }
        }
        out
    }

    /// `spec` as the kernel sees it: what its namespace says or needs ([`Self::namespace_view`]);
    /// for a pod in a user namespace of its own (`hostUsers: false`), its proxy's ids and owner
    /// groups translated to host ids through the pod's id maps. A pod whose namespace or maps
    /// cannot be read yet, or lack the proxy's id, is retried (what is applied for it stays; a
    /// new one is not served, never served with the wrong uid).
    pub(super) fn host_view(
        &self,
        mut spec: PodSpec,
        netns: &std::path::Path,
    ) -> Result<(PodSpec, NamespaceView)> {
        let view = self.namespace_view(&spec, netns)?;
        if let Some(ids) = crate::podns::userns::of_netns(netns).context("its user namespace")? {
            let (uid, gid) = self.proxy_ids;
            spec.policy = crate::podns::userns::translate(&spec.policy, &ids, uid, gid)
                .with_context(|| format!("its user namespace (ids read from pid {})", ids.pid))?;
        }
        Ok((spec, view))
    }

    /// What the pod's namespace says or needs, through one rtnetlink socket bound there: its
    /// excluded interfaces' routes and addresses, its VM interfaces' indexes (their TCP routed
    /// to the proxy), TPROXY's routing (each made sure of, idempotently).
    pub(super) fn namespace_view(
        &self,
        spec: &PodSpec,
        netns: &std::path::Path,
    ) -> Result<NamespaceView> {
        let p = &spec.policy;
        let mut view = NamespaceView::default();
        let by_name = !p.exclude_interfaces.is_empty() || !p.vm_interfaces.is_empty();
        if !by_name && !p.tproxy {
            return Ok(view);
        }
        let ns =
            std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let mut rtnl = crate::podns::rtnl::Rtnl::open_in(&ns)?;
        let links = if by_name { rtnl.links()? } else { Vec::new() };
        if !p.exclude_interfaces.is_empty() {
            let excluded = crate::podns::interfaces::read(&mut rtnl, &links, &p.exclude_interfaces)
                .context("reading its excluded interfaces")?;
            view.interfaces = Some(excluded);
        }
        if !p.vm_interfaces.is_empty() {
            let (names, port) = (&p.vm_interfaces, self.outbound_port);
            let vm = crate::podns::vm_ifaces::prepare(&ns, &mut rtnl, &links, names, port)
                .context("routing its VM interfaces to the proxy")?;
            if !vm.added.is_empty() {
                let added = vm.added.join(", ");
                log::info!("pod {}: VM interfaces set up: {added}", spec.key);
            }
            view.vm_ifindexes = vm.ifindexes;
        }
        if p.tproxy {
            let added = crate::podns::tproxy::prepare(&ns, &mut rtnl, &self.proc_sys_net)
                .context("setting up TPROXY's policy routing in its namespace")?;
            if !added.is_empty() {
                log::info!("pod {}: TPROXY set up: {}", spec.key, added.join(", "));
            }
        }
        Ok(view)
    }

    /// Removes map entries and inbound links that no applied pod owns, then lets slots the
    /// previous run used and nobody adopted be reused.
    pub(super) fn sweep_previous_run(&mut self) {
        let applied = self.reconciler.applied();
        let cookies = applied.values().map(|a| a.netns_cookie).collect();
        let ids = applied.values().map(|a| a.pod_id).collect();
        match self.datapath.sweep(&cookies, &ids) {
            Ok(0) => {}
            Ok(n) => log::info!("removed {n} map entries a previous run left"),
            Err(e) => log::error!("sweeping entries of a previous run: {e:#}"),
        }
        self.reconciler.release_reserved();
    }
}
