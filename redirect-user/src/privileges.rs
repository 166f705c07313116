//! Least privilege: at start the daemon keeps only the capabilities it uses and drops every
//! other one from its effective, permitted, inheritable and bounding sets.

use anyhow::{Context as _, Result};

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
        24,
        "CAP_SYS_RESOURCE: locked-memory limit for maps on kernels that charge it",
    ),
    (
        38,
        "CAP_PERFMON: pointer-carrying programs and maps (with CAP_BPF)",
    ),
    (39, "CAP_BPF: load programs, create maps"),
];

/// Bit mask of [`KEPT`].
pub fn kept_mask() -> u64 {
    KEPT.iter().fold(0, |m, (c, _)| m | (1u64 << c))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`.
const CAP_V3: u32 = 0x2008_0522;

/// Drops every capability but [`KEPT`] (bounding set first, then the process's sets).
pub fn drop_all_but_kept() -> Result<()> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    let keep = kept_mask();
    for cap in 0..=last {
        if keep & (1u64 << cap) == 0 {
            // Safety: prctl(PR_CAPBSET_DROP) with a capability number.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("dropping capability {cap} from the bounding set"));
            }
        }
    }
    let mut hdr = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // Safety: capget/capset with a v3 header and two data words we own.
    unsafe {
        if libc::syscall(
            libc::SYS_capget,
            &mut hdr as *mut CapHeader,
            data.as_mut_ptr(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("capget");
        }
        for (i, d) in data.iter_mut().enumerate() {
            let mask = (keep >> (32 * i)) as u32;
            d.effective &= mask;
            d.permitted &= mask;
            d.inheritable = 0;
        }
        if libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error()).context("capset");
        }
    }
    Ok(())
}
