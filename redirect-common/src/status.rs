//! What `redirectd status --json` prints, as types: the daemon serialises them, and the lab,
//! the tests and any other tool deserialise them (no JSON read by string key).

use alloc::{collections::BTreeMap, string::String, vec::Vec};

use serde::{Deserialize, Serialize};

/// One applied pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    /// The pod's network namespace and, for a pod found by its IP, how it was found.
    pub netns: String,
    /// The pod's slot in the maps.
    pub pod_id: u32,
    pub netns_cookie: u64,
    /// Which configuration is in force: `current`, or, when the pod's configuration was
    /// rejected, `last good kept: <reason>` or `locked, connections refused: <reason>`.
    #[serde(default)]
    pub config: String,
}

impl PodStatus {
    /// Whether the pod's current configuration was rejected (the last good one, or a lock,
    /// is in force).
    pub fn config_rejected(&self) -> bool {
        !self.config.is_empty() && self.config != CONFIG_CURRENT
    }
}

/// [`PodStatus::config`] of a pod whose current configuration is applied.
pub const CONFIG_CURRENT: &str = "current";

/// A program the daemon loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramReport {
    pub name: String,
    pub hook: String,
    /// Instructions the verifier processed (kernel 5.16+), a measure of program cost.
    pub verified_insns: Option<u32>,
    pub id: u32,
}

/// A pod's line in `redirectd status`: its status and its counters by name (the names of
/// [`crate::PodCounters::NAMES`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodReport {
    #[serde(flatten)]
    pub pod: PodStatus,
    #[serde(flatten)]
    pub counters: BTreeMap<String, u64>,
}

impl PodReport {
    /// A counter by name (0 if unknown).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

/// The whole `redirectd status` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub pods: Vec<PodReport>,
    /// Pods rejected by validation, or whose netns cannot be found yet (retried), each with
    /// the reason.
    pub rejected: Vec<String>,
    pub warnings: Vec<String>,
    /// Set while the pod source as a whole is unusable (its last good version is served).
    pub file_error: Option<String>,
    pub programs: Vec<ProgramReport>,
    /// Entries in `SOCK_PAIRS` (accelerated sockets) and `ORIG_BY_TUPLE`. (`ORIG_BY_SOCK` is
    /// in the sockets' own storage: it goes with them and cannot be listed.)
    pub sock_pairs: usize,
    pub orig_by_tuple: usize,
    /// The node's shared rule maps: entries the applied pods' rules take, and capacity.
    #[serde(default)]
    pub rule_maps: Vec<MapFill>,
    /// Same-node acceleration, and why ("on: ..." or "off: ...": decided at start).
    #[serde(default)]
    pub acceleration: String,
}

/// How full one map is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapFill {
    pub map: String,
    pub entries: usize,
    pub capacity: u32,
}

impl Report {
    /// The line of pod `name`, if it is applied.
    pub fn pod(&self, name: &str) -> Option<&PodReport> {
        self.pods.iter().find(|p| p.pod.name == name)
    }

    /// The names of the applied pods, sorted.
    pub fn pod_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.pods.iter().map(|p| p.pod.name.as_str()).collect();
        names.sort_unstable();
        names
    }
}
