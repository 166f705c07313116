//! The daemon's status file (what it applied, rejected and loaded) and `redirectd status`,
//! which joins it with the live counters in the pinned maps.

use std::path::Path;

use anyhow::{Context as _, Result};
pub use redirect_common::status::{
    MapFill, PodReport, PodStatus, ProgramReport, Report, CONFIG_CURRENT,
};
use redirect_common::{map_names, PodCounters};
use serde::{Deserialize, Serialize};

use crate::kernel::datapath::Datapath;

/// Written by `redirectd run` after every reconcile pass (atomically: temp file + rename).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusFile {
    pub pid: u32,
    pub pods_file: String,
    pub cgroup: String,
    pub pin_dir: String,
    pub programs: Vec<ProgramReport>,
    pub pods: Vec<PodStatus>,
    /// Entries rejected by validation, or whose netns cannot be found yet (retried).
    pub rejected: Vec<String>,
    pub warnings: Vec<String>,
    /// Set while the pods file as a whole is unusable (the last good version is served).
    pub file_error: Option<String>,
    /// The shared rule maps' fill, as the reconciler accounts for it.
    #[serde(default)]
    pub rule_maps: Vec<MapFill>,
    /// Same-node acceleration, and why ("on: ..." or "off: ...").
    #[serde(default)]
    pub acceleration: String,
}

impl StatusFile {
    /// Writes the file whole, readable by root only (see [`crate::private_file`]).
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).context("encoding status")?;
        crate::private_file::write(path, &json)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "reading {} (is `redirectd run` running with this --status-file?)",
                path.display()
            )
        })?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }
}

/// A pod's report line from its status and its counters.
fn pod_report(pod: PodStatus, c: PodCounters) -> PodReport {
    PodReport {
        pod,
        counters: PodCounters::NAMES
            .into_iter()
            .map(String::from)
            .zip(c.values())
            .collect(),
    }
}

pub fn report(status_file: &Path, pin_dir: &Path) -> Result<Report> {
    let status = StatusFile::read(status_file)?;
    let dp = Datapath::from_pins(pin_dir)?;
    let mut pods = Vec::new();
    for p in status.pods {
        let c = dp.counters(p.pod_id)?;
        pods.push(pod_report(p, c));
    }
    let fill = dp.fill();
    let entries = |name: &str| {
        fill.iter()
            .find(|(n, _, _)| *n == name)
            .map_or(0, |&(_, len, _)| len)
    };
    let (sock_pairs, orig_by_tuple) = (
        entries(map_names::SOCK_PAIRS),
        entries(map_names::ORIG_BY_TUPLE),
    );
    Ok(Report {
        sock_pairs,
        orig_by_tuple,
        pods,
        rejected: status.rejected,
        warnings: status.warnings,
        file_error: status.file_error,
        programs: status.programs,
        rule_maps: status.rule_maps,
        acceleration: status.acceleration,
    })
}

/// Prints `redirectd status` as tables.
pub fn print(r: &Report) {
    print_counters(r);
    print_problems(r);
    print_programs(&r.programs);
}

/// The per-pod capture and acceleration counters, and the connection maps' fill.
fn print_counters(r: &Report) {
    println!(
        "{:<28} {:>5} | {:>9} {:>7} {:>6} {:>6} {:>8} | {:>9} {:>7} {:>6} {:>6}",
        "", "", "OUTBOUND", "", "FAIL", "FAIL", "ORIG-DST", "INBOUND", "", "FAIL", "FAIL"
    );
    println!(
        "{:<28} {:>5} | {:>9} {:>7} {:>6} {:>6} {:>8} | {:>9} {:>7} {:>6} {:>6}",
        "POD",
        "SLOT",
        "CAPTURED",
        "DIRECT",
        "OPEN",
        "CLOSED",
        "ANSWERED",
        "CAPTURED",
        "DIRECT",
        "OPEN",
        "CLOSED"
    );
    for p in &r.pods {
        println!(
            "{:<28} {:>5} | {:>9} {:>7} {:>6} {:>6} {:>8} | {:>9} {:>7} {:>6} {:>6}",
            format!("{}/{}", p.pod.namespace, p.pod.name),
            p.pod.pod_id,
            p.counter("outbound_captured"),
            p.counter("outbound_direct"),
            p.counter("outbound_fail_open"),
            p.counter("outbound_fail_closed"),
            p.counter("orig_dst_answered"),
            p.counter("inbound_captured"),
            p.counter("inbound_direct"),
            p.counter("inbound_fail_open"),
            p.counter("inbound_fail_closed")
        );
    }
    println!();
    for p in &r.pods {
        println!(
            "accelerated {:<28} {:>10} messages {:>14} bytes",
            format!("{}/{}", p.pod.namespace, p.pod.name),
            p.counter("accel_msgs"),
            p.counter("accel_bytes")
        );
    }
    for p in &r.pods {
        let (evicted, missed) = (p.counter("orig_dst_evicted"), p.counter("orig_dst_missed"));
        if evicted + missed > 0 {
            println!(
                "map full {:<28} {evicted} open connections lost their original destination, {missed} SO_ORIGINAL_DST unanswered (raise --orig-dst-map-size)",
                format!("{}/{}", p.pod.namespace, p.pod.name),
            );
        }
    }
    if !r.acceleration.is_empty() {
        println!("same-node acceleration {}", r.acceleration);
    }
    println!(
        "maps: {} accelerated sockets (SOCK_PAIRS), {} original destinations by 4-tuple (ORIG_BY_TUPLE)",
        r.sock_pairs, r.orig_by_tuple
    );
    if !r.rule_maps.is_empty() {
        let fill: Vec<String> = r
            .rule_maps
            .iter()
            .map(|m| format!("{} {}/{}", m.map, m.entries, m.capacity))
            .collect();
        println!("rule maps (entries/capacity): {}", fill.join(", "));
    }
}

/// What is rejected, retried or wrong with the pod source.
fn print_problems(r: &Report) {
    if let Some(e) = &r.file_error {
        println!("\npods file unusable (serving its last good version): {e}");
    }
    for e in &r.rejected {
        println!("rejected: {e}");
    }
    for w in &r.warnings {
        println!("warning: {w}");
    }
}

/// The loaded programs and their verifier cost.
fn print_programs(programs: &[ProgramReport]) {
    if !programs.is_empty() {
        println!(
            "\n{:<16} {:<22} {:>8} {:>16}",
            "PROGRAM", "HOOK", "ID", "VERIFIED INSNS"
        );
        for p in programs {
            println!(
                "{:<16} {:<22} {:>8} {:>16}",
                p.name,
                p.hook,
                p.id,
                p.verified_insns.map_or("?".into(), |n| n.to_string())
            );
        }
    }
}
