//! Start-up probe of the kernel features the data path needs. Each missing program type, map
//! type or helper is named with the kernel version that brings it, and the daemon refuses to
//! attach anything rather than run half a data path. `redirectd probe` prints the table.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};

/// One requirement and whether this kernel meets it.
#[derive(Debug, Clone)]
pub struct Check {
    pub what: String,
    /// The upstream kernel version that brought it.
    pub since: &'static str,
    /// `Some(true)` present, `Some(false)` missing, `None` could not be probed.
    pub present: Option<bool>,
}

fn program(name: &str, t: ProgramType, since: &'static str) -> Check {
    Check {
        what: format!("program type {name}"),
        since,
        present: is_program_supported(t).ok(),
    }
}

fn map(name: &str, t: MapType, since: &'static str) -> Check {
    Check {
        what: format!("map type {name}"),
        since,
        present: is_map_supported(t).ok(),
    }
}

/// The helpers the programs call: `(program type name, type, helper name, helper, since)`.
const HELPERS: [(&str, ProgramType, &str, BpfHelper, &str); 12] = {
    use BpfHelper as H;
    use ProgramType as P;
    let cookie = "bpf_get_netns_cookie";
    [
        (
            "cgroup_sock_addr",
            P::CgroupSockAddr,
            cookie,
            H::BPF_FUNC_get_netns_cookie,
            "5.7",
        ),
        (
            "cgroup_sock",
            P::CgroupSock,
            cookie,
            H::BPF_FUNC_get_netns_cookie,
            "5.7",
        ),
        (
            "cgroup_sock_addr",
            P::CgroupSockAddr,
            "bpf_sk_lookup_tcp",
            H::BPF_FUNC_sk_lookup_tcp,
            "5.2",
        ),
        (
            "cgroup_sock_addr",
            P::CgroupSockAddr,
            "bpf_get_socket_cookie",
            H::BPF_FUNC_get_socket_cookie,
            "5.0",
        ),
        (
            "sock_ops",
            P::SockOps,
            cookie,
            H::BPF_FUNC_get_netns_cookie,
            "5.15",
        ),
        (
            "cgroup_sock_addr",
            P::CgroupSockAddr,
            "bpf_sk_storage_get",
            H::BPF_FUNC_sk_storage_get,
            "5.3",
        ),
        (
            "sock_ops",
            P::SockOps,
            "bpf_sk_storage_get",
            H::BPF_FUNC_sk_storage_get,
            "5.3",
        ),
        (
            "sock_ops",
            P::SockOps,
            "bpf_sock_hash_update",
            H::BPF_FUNC_sock_hash_update,
            "4.18",
        ),
        (
            "cgroup_sockopt",
            P::CgroupSockopt,
            cookie,
            H::BPF_FUNC_get_netns_cookie,
            "5.15",
        ),
        (
            "sk_lookup",
            P::SkLookup,
            "bpf_sk_assign",
            H::BPF_FUNC_sk_assign,
            "5.9",
        ),
        (
            "sk_msg",
            P::SkMsg,
            "bpf_msg_redirect_hash",
            H::BPF_FUNC_msg_redirect_hash,
            "4.18",
        ),
        (
            "sk_msg",
            P::SkMsg,
            cookie,
            H::BPF_FUNC_get_netns_cookie,
            "5.15",
        ),
    ]
};

/// Every feature the programs use.
pub fn run() -> Vec<Check> {
    let mut checks = vec![
        program("cgroup_sock_addr", ProgramType::CgroupSockAddr, "4.17"),
        program("sock_ops", ProgramType::SockOps, "4.13"),
        program("cgroup_sock", ProgramType::CgroupSock, "4.10"),
        program("cgroup_sockopt", ProgramType::CgroupSockopt, "5.3"),
        program("sk_lookup", ProgramType::SkLookup, "5.9"),
        program("sk_msg", ProgramType::SkMsg, "4.17"),
        map("hash", MapType::Hash, "3.19"),
        map("lru_hash", MapType::LruHash, "4.10"),
        map("lpm_trie", MapType::LpmTrie, "4.11"),
        map("percpu_array", MapType::PerCpuArray, "4.6"),
        map("sockhash", MapType::SockHash, "4.18"),
        map("ringbuf", MapType::RingBuf, "5.8"),
        map("sk_storage", MapType::SkStorage, "5.2"),
    ];
    checks.extend(HELPERS.iter().map(|&(prog, t, name, h, since)| Check {
        what: format!("helper {name} in {prog} programs"),
        since,
        present: is_helper_supported(t, h).ok(),
    }));
    checks.push(Check {
        what: "socket option SO_NETNS_COOKIE".into(),
        since: "5.14",
        present: Some(crate::podns::nsenter::own_cookie().is_ok()),
    });
    checks
}

/// What only some pods need: `(check, what is refused without it)`.
pub fn optional() -> Vec<(Check, &'static str)> {
    vec![(
        Check {
            what: "sk_lookup context field ingress_ifindex".into(),
            since: "5.17",
            present: sk_lookup_sees_ingress(),
        },
        "pods with kubevirtInterfaces are refused",
    )]
}

/// Whether `sk_lookup` programs can read the ingress interface (probed once).
pub fn sk_lookup_sees_ingress() -> Option<bool> {
    static SEEN: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *SEEN.get_or_init(|| crate::kernel::bpf_sys::sk_lookup_reads_ingress_ifindex().ok())
}

/// The checks that failed, as one line an operator can act on, or `None` if all passed.
pub fn missing(checks: &[Check]) -> Option<String> {
    let bad: Vec<String> = checks
        .iter()
        .filter(|c| c.present != Some(true))
        .map(|c| {
            let how = if c.present.is_none() {
                "could not be probed"
            } else {
                "missing"
            };
            format!("{} ({how}; Linux {})", c.what, c.since)
        })
        .collect();
    (!bad.is_empty()).then(|| {
        format!(
            "this kernel lacks what the data path needs, so nothing was attached: {}",
            bad.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_missing_and_since_when() {
        let checks = vec![
            Check {
                what: "program type sk_lookup".into(),
                since: "5.9",
                present: Some(false),
            },
            Check {
                what: "map type hash".into(),
                since: "3.19",
                present: Some(true),
            },
            Check {
                what: "helper x".into(),
                since: "5.15",
                present: None,
            },
        ];
        let msg = missing(&checks).unwrap();
        assert!(
            msg.contains("program type sk_lookup (missing; Linux 5.9)"),
            "{msg}"
        );
        assert!(
            msg.contains("helper x (could not be probed; Linux 5.15)"),
            "{msg}"
        );
        assert!(!msg.contains("hash"));
        assert!(missing(&checks[1..2]).is_none());
    }
}
