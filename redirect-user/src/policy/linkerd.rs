//! A Linkerd pod's capture settings, from the annotations Linkerd's injector reads
//! (`config.linkerd.io/skip-inbound-ports`, `skip-outbound-ports`, `skip-subnets`,
//! `proxy-uid`) with the defaults its chart gives `linkerd2-proxy-init` ([`super::mesh::linkerd`]),
//! plus our own `redirectd.dev/failMode` and `redirectd.dev/accel`. Istio's annotations mean
//! nothing to a Linkerd pod and are ignored, as Linkerd ignores them.
//!
//! One difference from `proxy-init`, on purpose: an entry of a skip list that is not a port or
//! range is rejected (the pod keeps its last good configuration, or is locked), as a typo in
//! Istio's annotations is; `proxy-init` logs it and leaves that entry out. Either way the
//! typo never turns capture off.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    annotations::{accel, fail_closed, AnnotationError, CapturePolicy, Parsed, ACCEL, FAIL_MODE},
    mesh::{linkerd, Mesh},
};
use crate::net::Cidr;

/// Most ports one skip list may name once its ranges are expanded (each is one rule in the
/// node's shared port-rule map; the per-pod room check applies too).
pub const MAX_SKIPPED_PORTS: usize = 4096;

/// Parses a Linkerd pod's annotations. The first invalid value rejects the whole policy.
pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Parsed, AnnotationError> {
    let defaults: BTreeSet<u16> = linkerd::DEFAULT_IGNORED_PORTS.iter().copied().collect();
    let mut policy = CapturePolicy {
        mesh: Mesh::Linkerd,
        proxy_uid: Some(linkerd::PROXY_UID),
        proxy_gid: Some(linkerd::NO_GID),
        exclude_outbound_ports: defaults.clone(),
        exclude_inbound_ports: defaults,
        ..CapturePolicy::default()
    };
    for (key, value) in annotations {
        let err = |reason: String| AnnotationError {
            annotation: key.clone(),
            value: value.clone(),
            reason,
        };
        match key.as_str() {
            linkerd::SKIP_INBOUND_PORTS => {
                policy.exclude_inbound_ports = port_ranges(value).map_err(err)?
            }
            linkerd::SKIP_OUTBOUND_PORTS => {
                policy.exclude_outbound_ports = port_ranges(value).map_err(err)?
            }
            linkerd::SKIP_SUBNETS => {
                policy.exclude_inbound_sources = subnets(value).map_err(err)?
            }
            linkerd::PROXY_UID_ANNOTATION => {
                policy.proxy_uid = Some(
                    value
                        .trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|u| *u != 0)
                        .ok_or_else(|| err("expected a uid other than 0".into()))?,
                )
            }
            FAIL_MODE => policy.fail_closed = fail_closed(value).map_err(err)?,
            ACCEL => policy.accel = accel(value).map_err(err)?,
            _ => {}
        }
    }
    Ok(Parsed {
        policy,
        warnings: Vec::new(),
    })
}

/// `proxy-init`'s port list: ports and inclusive ranges `lo-hi`, comma-separated.
fn port_ranges(value: &str) -> Result<BTreeSet<u16>, String> {
    let mut ports = BTreeSet::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let port = |s: &str| {
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{item:?} is not a port (1-65535) or a range (lo-hi)"))
        };
        let (lo, hi) = match item.split_once('-') {
            Some((lo, hi)) => (port(lo)?, port(hi)?),
            None => {
                let p = port(item)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(format!(
                "{item:?}: the range's first port is above its last"
            ));
        }
        ports.extend(lo..=hi);
        if ports.len() > MAX_SKIPPED_PORTS {
            return Err(format!(
                "more than {MAX_SKIPPED_PORTS} ports once ranges are expanded (each is a rule of its own)"
            ));
        }
    }
    Ok(ports)
}

/// `proxy-init`'s `--subnets-to-ignore`: CIDRs, comma-separated.
fn subnets(value: &str) -> Result<Vec<Cidr>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_linkerds() {
        let p = parse(&BTreeMap::new()).unwrap().policy;
        assert_eq!(p.mesh, Mesh::Linkerd);
        assert_eq!(p.proxy_uid, Some(2102));
        assert_eq!(p.exclude_inbound_ports, [4567, 4568].into());
        assert_eq!(p.exclude_outbound_ports, [4567, 4568].into());
        assert!(p.exclude_inbound_sources.is_empty());
        assert!(p.fail_closed);
    }

    #[test]
    fn annotations_replace_the_defaults() {
        let p = parse(&ann(&[
            (linkerd::SKIP_INBOUND_PORTS, "9000-9002, 22"),
            (linkerd::SKIP_OUTBOUND_PORTS, "5432"),
            (linkerd::SKIP_SUBNETS, "10.9.0.0/16,fd00:9::/64"),
            (linkerd::PROXY_UID_ANNOTATION, "2103"),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "80"),
        ]))
        .unwrap()
        .policy;
        assert_eq!(p.exclude_inbound_ports, [22, 9000, 9001, 9002].into());
        assert_eq!(p.exclude_outbound_ports, [5432].into());
        assert_eq!(p.exclude_inbound_sources.len(), 2);
        assert_eq!(p.proxy_uid, Some(2103));
    }

    #[test]
    fn a_typo_rejects_the_policy() {
        for (k, v) in [
            (linkerd::SKIP_INBOUND_PORTS, "80,abc"),
            (linkerd::SKIP_INBOUND_PORTS, "90-80"),
            (linkerd::SKIP_OUTBOUND_PORTS, "0"),
            (linkerd::SKIP_OUTBOUND_PORTS, "1-65535"),
            (linkerd::SKIP_SUBNETS, "10.0.0.0/33"),
            (linkerd::PROXY_UID_ANNOTATION, "root"),
        ] {
            let e = parse(&ann(&[(k, v)])).unwrap_err();
            assert_eq!(e.annotation, k, "{e}");
        }
    }
}
