//! Room in the node's shared rule maps (`PORT_RULES`, `ADDR_RULES`, `OWNER_GROUPS`,
//! `NODE_ADDRS`): every pod's rules live in the same maps, so each pod gets at most a fixed
//! number of entries in each (`--max-rules-per-pod`), and the node keeps a reserve in each map
//! that only locked pods may use, so a pod that does not fit can always be locked (its
//! connections refused) rather than left uncaptured. Pure accounting over [`PodRules`].

use redirect_common::{map_names, ADDR_POD_IP, MAX_ADDR_RULES, MAX_GROUP_RULES, MAX_PORT_RULES};

use crate::policy::rules::PodRules;

/// Default per-pod limit on entries in each rule map.
pub const DEFAULT_PER_POD: usize = 256;

/// The rule maps: name, capacity, and what fills them (for messages).
const MAPS: [(&str, u32, &str); 4] = [
    (
        map_names::PORT_RULES,
        MAX_PORT_RULES,
        "ports of its port lists and the proxy's ports",
    ),
    (
        map_names::ADDR_RULES,
        MAX_ADDR_RULES,
        "networks of its IP ranges and routes",
    ),
    (
        map_names::OWNER_GROUPS,
        MAX_GROUP_RULES,
        "groups of its owner-group list",
    ),
    (map_names::NODE_ADDRS, MAX_ADDR_RULES, "its own addresses"),
];

/// The share of each map held back for locking pods: a sixteenth.
const RESERVE_SHARE: u32 = 16;

/// Entries a pod's rules take in each rule map, in the order of [`MAPS`].
pub fn entries(rules: &PodRules) -> [usize; 4] {
    let own = rules
        .addrs
        .iter()
        .filter(|(k, _)| *k == ADDR_POD_IP)
        .count();
    [
        rules.ports.len(),
        rules.addrs.len() - own,
        rules.groups.len(),
        own,
    ]
}

/// Why `rules` break the per-pod `limit`, naming the map, the count and the limit.
pub fn over_pod_limit(rules: &PodRules, limit: usize) -> Option<String> {
    let n = entries(rules);
    MAPS.iter().zip(n).find(|(_, n)| *n > limit).map(|((map, _, what), n)| {
        format!("its rules need {n} entries in {map} ({what}), over the per-pod limit of {limit} (--max-rules-per-pod)")
    })
}

/// Entries in use in each rule map, as the reconciler wrote them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage([usize; 4]);

impl Usage {
    pub fn add(&mut self, rules: &PodRules) {
        for (u, n) in self.0.iter_mut().zip(entries(rules)) {
            *u += n;
        }
    }

    /// Whether `rules` fit in what is left of the maps beside the reserve (`locked`: they
    /// may use the reserve too). `Err` names the map and the room left.
    pub fn fits(&self, rules: &PodRules, locked: bool) -> Result<(), String> {
        for ((map, cap, _), (used, need)) in MAPS.iter().zip(self.0.iter().zip(entries(rules))) {
            let usable = if locked {
                *cap as usize
            } else {
                (*cap - *cap / RESERVE_SHARE) as usize
            };
            if used + need > usable {
                return Err(format!(
                    "the node's {map} map is full: {used} of {usable} entries for served pods in use, this pod needs {need}"
                ));
            }
        }
        Ok(())
    }

    /// `(map, entries, capacity)` for status and metrics.
    pub fn report(&self) -> Vec<(&'static str, usize, u32)> {
        MAPS.iter()
            .zip(self.0)
            .map(|((map, cap, _), used)| (*map, used, *cap))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use redirect_common::{ADDR_EXCLUDE_OUTBOUND, PORT_EXCLUDE_OUTBOUND};

    use super::*;
    use crate::policy::annotations::Cidr;

    fn rules(ports: u16, ranges: u32) -> PodRules {
        PodRules {
            ports: (1..=ports).map(|p| (PORT_EXCLUDE_OUTBOUND, p)).collect(),
            addrs: (0..ranges)
                .map(|i| {
                    let ip = std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8));
                    (ADDR_EXCLUDE_OUTBOUND, Cidr::host(ip.into()))
                })
                .chain([(ADDR_POD_IP, Cidr::host("10.1.0.1".parse().unwrap()))])
                .collect(),
            groups: BTreeSet::new(),
            ..Default::default()
        }
    }

    #[test]
    fn the_per_pod_limit_names_the_map_and_the_limit() {
        assert_eq!(over_pod_limit(&rules(256, 256), 256), None);
        let why = over_pod_limit(&rules(10, 257), 256).unwrap();
        assert!(why.contains("257 entries in ADDR_RULES"), "{why}");
        assert!(why.contains("limit of 256"), "{why}");
    }

    #[test]
    fn the_reserve_is_left_for_locked_pods() {
        let mut u = Usage::default();
        let big = rules(0, 4096);
        for _ in 0..3 {
            assert_eq!(u.fits(&big, false), Ok(()));
            u.add(&big);
        }
        // 12,288 of 16,384 used; the reserve is 1,024: 4,096 more do not fit.
        let why = u.fits(&big, false).unwrap_err();
        assert!(why.contains("ADDR_RULES"), "{why}");
        assert_eq!(u.fits(&rules(0, 3000), false), Ok(()));
        // A locked pod's few entries always fit.
        u.add(&rules(0, 3072));
        assert!(u.fits(&rules(6, 1), false).is_err());
        assert_eq!(u.fits(&rules(6, 1), true), Ok(()));
        assert_eq!(u.report()[1], ("ADDR_RULES", 15_360, 16_384));
    }
}
