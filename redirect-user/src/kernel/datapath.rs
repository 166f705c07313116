//! The daemon's side of the kernel maps: the only code that writes `MESH_PODS`,
//! `PORT_RULES`, `ADDR_RULES`, `OWNER_GROUPS` and zeroes `POD_COUNTERS`. The reconciler
//! decides; this layer writes.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    maps::{
        lpm_trie::Key, Array, HashMap, IterableMap, LpmTrie, Map, MapData, PerCpuArray,
        PerCpuValues, SockHash,
    },
    util::nr_cpus,
    Ebpf, Pod,
};
use redirect_common::{
    map_names as names, AddrRuleData, GroupRuleKey, ListenerKey, NodeAddrKey, OrigDst, PodConfig,
    PodCounters, PodSource, PortRuleKey, SockKey, TupleKey, ADDR_POD_IP,
};

use crate::{
    kernel::loader,
    kernel::map_keys::{addr_key, addr_of_node_key, node_addr_key, port_key, rule_of_key},
    net::Cidr,
    podns::listeners,
    policy::rules::PodRules,
};

/// Writes to the kernel's pod maps; implemented by [`Datapath`] and by a fake in tests.
pub trait PodMaps {
    fn install_rules(&mut self, pod_id: u32, rules: &PodRules) -> Result<()>;
    fn remove_rules(&mut self, pod_id: u32, rules: &PodRules) -> Result<()>;
    fn set_pod(&mut self, netns_cookie: u64, config: &PodConfig) -> Result<()>;
    fn remove_pod(&mut self, netns_cookie: u64) -> Result<()>;
    fn reset_counters(&mut self, pod_id: u32) -> Result<()>;
    /// Attaches (or adopts) the pod's inbound `sk_lookup` program in its network namespace,
    /// and registers the proxy's sockets already listening there on `listener_ports` (its
    /// inbound and outbound ports).
    fn attach_inbound(
        &mut self,
        netns_cookie: u64,
        netns: &Path,
        listener_ports: [u16; 2],
    ) -> Result<()>;
    fn detach_inbound(&mut self, netns_cookie: u64) -> Result<()>;
    /// The rules the maps hold for slot `pod_id` (with `flags` from its `MESH_PODS` entry).
    fn existing_rules(&self, pod_id: u32, flags: u32) -> Result<PodRules>;
}

/// Where the daemon's map handles come from: a freshly loaded object, or the pins.
enum MapSource<'a> {
    Object(&'a mut Ebpf),
    Pins(&'a Path),
}

impl MapSource<'_> {
    /// Map `name`, as the type the daemon uses it as.
    fn get<T: TryFrom<Map, Error = aya::maps::MapError>>(&mut self, name: &str) -> Result<T> {
        let map = match self {
            MapSource::Object(ebpf) => ebpf
                .take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))?,
            MapSource::Pins(pin_dir) => {
                let path = pin_dir.join("maps").join(name);
                let data = MapData::from_pin(&path).with_context(|| {
                    format!(
                        "opening pinned map {} (is redirectd installed with this --pin-dir?)",
                        path.display()
                    )
                })?;
                Map::from_map_data(data).with_context(|| format!("reading map {name}"))?
            }
        };
        T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
    }
}

/// A map's `max_entries` as the kernel reports it (0 if it cannot be read).
fn capacity(map: &MapData) -> u32 {
    map.info().map(|i| i.max_entries()).unwrap_or(0)
}

/// Removes the entries of a hash map that `keep` does not keep; returns how many went.
fn sweep_map<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &str,
    keep: impl Fn(&K, &V) -> bool,
) -> Result<usize> {
    let stale: Vec<K> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| !keep(k, v))
        .map(|(k, _)| k)
        .collect();
    for k in &stale {
        map.remove(k).with_context(|| format!("sweeping {name}"))?;
    }
    Ok(stale.len())
}

/// The daemon's handles on the pod maps.
pub struct Datapath {
    mesh_pods: HashMap<MapData, u64, PodConfig>,
    port_rules: HashMap<MapData, PortRuleKey, u32>,
    owner_groups: HashMap<MapData, GroupRuleKey, u32>,
    addr_rules: LpmTrie<MapData, AddrRuleData, u32>,
    counters: PerCpuArray<MapData, PodCounters>,
    sources: Array<MapData, PodSource>,
    listeners: SockHash<MapData, ListenerKey>,
    node_addrs: HashMap<MapData, NodeAddrKey, u32>,
    sock_pairs: SockHash<MapData, SockKey>,
    orig_by_tuple: HashMap<MapData, TupleKey, OrigDst>,
    pin_dir: PathBuf,
    inbound_port: u16,
    outbound_port: u16,
    /// Verifier instruction count of the last per-pod `sk_lookup` program loaded.
    pub inbound_insns: Option<u32>,
}

impl Datapath {
    /// Takes the maps out of a freshly loaded object.
    pub fn from_ebpf(
        ebpf: &mut Ebpf,
        pin_dir: &Path,
        inbound_port: u16,
        outbound_port: u16,
    ) -> Result<Self> {
        let mut dp = Self::open(MapSource::Object(ebpf), pin_dir)?;
        dp.inbound_port = inbound_port;
        dp.outbound_port = outbound_port;
        Ok(dp)
    }

    /// Opens the pinned maps (for `status` and tests).
    pub fn from_pins(pin_dir: &Path) -> Result<Self> {
        Self::open(MapSource::Pins(pin_dir), pin_dir)
    }

    fn open(mut maps: MapSource, pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            inbound_port: 0,
            outbound_port: 0,
            inbound_insns: None,
            listeners: maps.get(names::LISTENERS)?,
            node_addrs: maps.get(names::NODE_ADDRS)?,
            sock_pairs: maps.get(names::SOCK_PAIRS)?,
            orig_by_tuple: maps.get(names::ORIG_BY_TUPLE)?,
            mesh_pods: maps.get(names::MESH_PODS)?,
            port_rules: maps.get(names::PORT_RULES)?,
            owner_groups: maps.get(names::OWNER_GROUPS)?,
            addr_rules: maps.get(names::ADDR_RULES)?,
            counters: maps.get(names::POD_COUNTERS)?,
            sources: maps.get(names::POD_SOURCES)?,
        })
    }

    /// A pod's counters summed over CPUs.
    pub fn counters(&self, pod_id: u32) -> Result<PodCounters> {
        let per_cpu = self
            .counters
            .get(&pod_id, 0)
            .with_context(|| format!("reading counters of pod slot {pod_id}"))?;
        let mut sum = PodCounters::default();
        for c in per_cpu.iter() {
            sum.add(c);
        }
        Ok(sum)
    }

    /// Registers in `LISTENERS` the proxy sockets already listening on the pod's inbound or
    /// outbound port (`ports`, the pod's own: its `MESH_PODS` entry is written after this) in
    /// its namespace (a proxy that started before us never ran our `listen()` hook).
    fn adopt_listeners(
        &mut self,
        netns_cookie: u64,
        netns: &std::fs::File,
        netns_path: &Path,
        ports: [u16; 2],
    ) -> Result<()> {
        for (port, family, sock) in listeners::find(netns, &ports)? {
            let key = ListenerKey {
                netns_cookie,
                family: family.into(),
                port: port.into(),
            };
            if self.listeners.get(&key, 0).is_err() {
                self.listeners.insert(&key, sock, 0).with_context(|| {
                    format!(
                        "registering the proxy listener on port {port} of {}",
                        netns_path.display()
                    )
                })?;
                log::info!(
                    "registered the already-running proxy's listener on port {port} in {} (family {family})",
                    netns_path.display()
                );
            }
        }
        Ok(())
    }

    /// The capacity of `ORIG_BY_TUPLE` as the kernel has it (a map pinned by an earlier run
    /// keeps the size it was made with).
    pub fn orig_dst_capacity(&self) -> (&'static str, u32) {
        (names::ORIG_BY_TUPLE, capacity(self.orig_by_tuple.map()))
    }

    /// How full the connection-tracking maps are: `(map, entries, capacity)` for
    /// `SOCK_PAIRS` and `ORIG_BY_TUPLE`.
    pub fn fill(&self) -> Vec<(&'static str, usize, u32)> {
        let (tuple_name, tuple_cap) = self.orig_dst_capacity();
        vec![
            (
                names::SOCK_PAIRS,
                self.sock_pairs.keys().filter(Result::is_ok).count(),
                capacity(self.sock_pairs.map()),
            ),
            (
                tuple_name,
                self.orig_by_tuple.keys().filter(Result::is_ok).count(),
                tuple_cap,
            ),
        ]
    }

    /// Cookies of the pods in `MESH_PODS` and the pod ids they use.
    pub fn mesh_pods(&self) -> Result<Vec<(u64, PodConfig)>> {
        self.mesh_pods
            .iter()
            .map(|r| r.context("iterating MESH_PODS"))
            .collect()
    }

    /// Removes every entry that no current pod owns: what a previous run left behind. Returns
    /// how many entries went.
    pub fn sweep(&mut self, cookies: &BTreeSet<u64>, pod_ids: &BTreeSet<u32>) -> Result<usize> {
        let mut n = 0;
        for cookie in loader::inbound_pins(&self.pin_dir)? {
            if !cookies.contains(&cookie) {
                self.detach_inbound(cookie)?;
                n += 1;
            }
        }
        n += sweep_map(&mut self.mesh_pods, names::MESH_PODS, |c, _| {
            cookies.contains(c)
        })?;
        n += sweep_map(&mut self.port_rules, names::PORT_RULES, |k, _| {
            pod_ids.contains(&k.pod_id)
        })?;
        n += sweep_map(&mut self.owner_groups, names::OWNER_GROUPS, |k, _| {
            pod_ids.contains(&k.pod_id)
        })?;
        n += sweep_map(&mut self.node_addrs, names::NODE_ADDRS, |_, id| {
            pod_ids.contains(id)
        })?;
        let stale: Vec<Key<AddrRuleData>> = self
            .addr_rules
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !pod_ids.contains(&k.data().pod_id))
            .collect();
        for k in &stale {
            self.addr_rules
                .remove(k)
                .with_context(|| format!("sweeping {}", names::ADDR_RULES))?;
        }
        n += stale.len();
        Ok(n)
    }
}

impl PodMaps for Datapath {
    fn install_rules(&mut self, pod_id: u32, rules: &PodRules) -> Result<()> {
        self.sources
            .set(pod_id, &rules.sources, 0)
            .with_context(|| format!("writing POD_SOURCES entry of pod slot {pod_id}"))?;
        for (kind, port) in &rules.ports {
            let key = port_key(pod_id, *kind, *port);
            self.port_rules.insert(&key, &1, 0).with_context(|| {
                format!(
                    "writing port rule {port} (kind {kind}) of pod slot {pod_id}; PORT_RULES full?"
                )
            })?;
        }
        for gid in &rules.groups {
            let key = GroupRuleKey { pod_id, gid: *gid };
            self.owner_groups.insert(&key, &1, 0).with_context(|| {
                format!("writing owner group {gid} of pod slot {pod_id}; OWNER_GROUPS full?")
            })?;
        }
        for (kind, cidr) in &rules.addrs {
            if *kind == ADDR_POD_IP {
                // The pod's own addresses: an exact-match map, shared by the node.
                self.node_addrs
                    .insert(&node_addr_key(cidr), &pod_id, 0)
                    .with_context(|| format!("writing NODE_ADDRS entry {cidr}"))?;
                continue;
            }
            // The value is the key's prefix length: the programs compare two kinds' longest
            // matches by it (routes through excluded interfaces or not).
            let key = addr_key(pod_id, *kind, cidr);
            self.addr_rules
                .insert(&key, &key.prefix_len(), 0)
                .with_context(|| format!("writing address rule {cidr} (kind {kind}) of pod slot {pod_id}; ADDR_RULES full?"))?;
        }
        Ok(())
    }

    fn remove_rules(&mut self, pod_id: u32, rules: &PodRules) -> Result<()> {
        let _ = self.sources.set(pod_id, &PodSource::default(), 0);
        for (kind, port) in &rules.ports {
            let key = port_key(pod_id, *kind, *port);
            let _ = self.port_rules.remove(&key);
        }
        for gid in &rules.groups {
            let _ = self
                .owner_groups
                .remove(&GroupRuleKey { pod_id, gid: *gid });
        }
        for (kind, cidr) in &rules.addrs {
            if *kind != ADDR_POD_IP {
                let _ = self.addr_rules.remove(&addr_key(pod_id, *kind, cidr));
                continue;
            }
            // Only if still ours: an updated pod has already written its new slot here.
            let key = node_addr_key(cidr);
            if self.node_addrs.get(&key, 0).ok() == Some(pod_id) {
                let _ = self.node_addrs.remove(&key);
            }
        }
        Ok(())
    }

    fn set_pod(&mut self, netns_cookie: u64, config: &PodConfig) -> Result<()> {
        self.mesh_pods
            .insert(&netns_cookie, config, 0)
            .with_context(|| format!("writing MESH_PODS entry for netns cookie {netns_cookie}"))
    }

    fn remove_pod(&mut self, netns_cookie: u64) -> Result<()> {
        match self.mesh_pods.remove(&netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing MESH_PODS entry {netns_cookie}")),
        }
    }

    fn attach_inbound(
        &mut self,
        netns_cookie: u64,
        netns: &Path,
        listener_ports: [u16; 2],
    ) -> Result<()> {
        let file = std::fs::File::open(netns)
            .with_context(|| format!("opening network namespace {}", netns.display()))?;
        // The namespace may have been replaced since it was resolved.
        if crate::podns::nsenter::cookie(&file)? != netns_cookie {
            anyhow::bail!(
                "network namespace {} changed while being attached; retrying",
                netns.display()
            );
        }
        let started = std::time::Instant::now();
        if let Some(insns) = loader::attach_inbound(&self.pin_dir, netns_cookie, &file)
            .with_context(|| format!("attaching inbound capture to {}", netns.display()))?
        {
            log::debug!(
                "attached rd_sk_lookup to {} in {} µs; verifier processed {insns} instructions",
                netns.display(),
                started.elapsed().as_micros()
            );
            self.inbound_insns = Some(insns);
        }
        // A proxy already listening before we were attached never ran our listen() hook.
        self.adopt_listeners(netns_cookie, &file, netns, listener_ports)
    }

    fn detach_inbound(&mut self, netns_cookie: u64) -> Result<()> {
        loader::detach_inbound(&self.pin_dir, netns_cookie)
    }

    fn existing_rules(&self, pod_id: u32, flags: u32) -> Result<PodRules> {
        let mut rules = PodRules {
            flags,
            sources: self
                .sources
                .get(&pod_id, 0)
                .with_context(|| format!("reading POD_SOURCES entry of pod slot {pod_id}"))?,
            ..Default::default()
        };
        for k in self.port_rules.keys() {
            let k = k.context("reading PORT_RULES")?;
            if k.pod_id == pod_id {
                rules.ports.insert((k.kind, k.port));
            }
        }
        for k in self.owner_groups.keys() {
            let k = k.context("reading OWNER_GROUPS")?;
            if k.pod_id == pod_id {
                rules.groups.insert(k.gid);
            }
        }
        for k in self.addr_rules.keys() {
            let k = k.context("reading ADDR_RULES")?;
            if k.data().pod_id == pod_id {
                rules.addrs.insert(rule_of_key(&k));
            }
        }
        for entry in self.node_addrs.iter() {
            let (k, id) = entry.context("reading NODE_ADDRS")?;
            if id == pod_id {
                rules
                    .addrs
                    .insert((ADDR_POD_IP, Cidr::host(addr_of_node_key(&k))));
            }
        }
        Ok(rules)
    }

    fn reset_counters(&mut self, pod_id: u32) -> Result<()> {
        let cpus = nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting possible CPUs")?;
        let zero = PerCpuValues::try_from(vec![PodCounters::default(); cpus.get() as usize])
            .context("building zeroed counters")?;
        self.counters
            .set(pod_id, zero, 0)
            .with_context(|| format!("zeroing counters of pod slot {pod_id}"))
    }
}
