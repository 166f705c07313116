//! Least privilege: at start the daemon keeps only the capabilities it uses and drops every
//! other one from its effective, permitted, inheritable and bounding sets.

use anyhow::{Context as _, Result};
use rustix::{
    io::Errno,
    thread::{
        capabilities, capability_is_in_bounding_set, remove_capability_from_bounding_set,
        set_capabilities, CapabilitySet,
    },
};

/// The capabilities `redirectd run` needs, and why.
pub const KEPT: &[(u32, &str)] = &[
    (
        2,
        "CAP_DAC_READ_SEARCH: read other processes' /proc entries when resolving netns",
    ),
    (
        12,
        "CAP_NET_ADMIN: attach programs to cgroups and network namespaces",
    ),
    (
        19,
        "CAP_SYS_PTRACE: pidfd_getfd of an already-running proxy's listening socket",
    ),
    (
        21,
        "CAP_SYS_ADMIN: setns into pod network namespaces, mount bpffs, pin objects",
    ),
    (
        38,
        "CAP_PERFMON: pointer-carrying programs and maps (with CAP_BPF)",
    ),
    (39, "CAP_BPF: load programs, create maps"),
];

/// Raises the soft limit on open descriptors to the hard limit (the daemon holds a namespace,
/// link and socket per pod, and serves clients): a default soft limit of 1,024 is easy to
/// reach. Logged, not fatal, if it cannot.
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    // An unlimited hard limit is not a valid soft one for descriptors.
    let max = limit.maximum.unwrap_or(1 << 20);
    let raised = Rlimit {
        current: Some(max),
        maximum: limit.maximum,
    };
    if let Err(e) = setrlimit(Resource::Nofile, raised) {
        log::warn!(
            "could not raise the open-file limit from {:?}: {e}",
            limit.current
        );
    }
}

/// Bit mask of [`KEPT`].
pub fn kept_mask() -> u64 {
    KEPT.iter().fold(0, |m, (c, _)| m | (1u64 << c))
}

/// Drops every capability but [`KEPT`] (bounding set first, then the process's sets), and
/// sets `no_new_privs`.
///
/// Dropping from the bounding set needs `CAP_SETPCAP`, which a container started with the
/// DaemonSet's capabilities (drop ALL, add those it uses) does not have: there the bounding
/// set already holds no more than the container was given, and what is left in it cannot be
/// gained back (the permitted set is cleared below, `no_new_privs` is set and the daemon
/// execs nothing), so a capability that cannot be dropped from it is logged, not fatal.
pub fn drop_all_but_kept() -> Result<()> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    let keep = kept_mask();
    let mut left = Vec::new();
    for cap in (0..=last.min(63)).filter(|c| keep & (1u64 << c) == 0) {
        let set = CapabilitySet::from_bits_retain(1u64 << cap);
        match capability_is_in_bounding_set(set) {
            Ok(true) => {}
            // Not in the set, or unknown to this kernel: nothing to drop.
            Ok(false) | Err(Errno::INVAL) => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading capability {cap} in the bounding set"))
            }
        }
        match remove_capability_from_bounding_set(set) {
            Ok(()) | Err(Errno::INVAL) => {}
            Err(Errno::PERM) => left.push(cap),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("dropping capability {cap} from the bounding set"))
            }
        }
    }
    if !left.is_empty() {
        log::info!(
            "capabilities {left:?} stay in the bounding set (no CAP_SETPCAP to drop them, as in a container): they are cleared from the permitted set and no_new_privs is set, so they cannot be regained"
        );
    }
    let kept = CapabilitySet::from_bits_retain(keep);
    let mut sets = capabilities(None).context("capget")?;
    sets.effective &= kept;
    sets.permitted &= kept;
    sets.inheritable = CapabilitySet::empty();
    set_capabilities(None, sets).context("capset")?;
    // Nothing the daemon runs (it execs nothing) may ever gain privileges again.
    rustix::thread::set_no_new_privs(true).context("setting no_new_privs")
}
