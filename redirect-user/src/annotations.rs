//! Istio's per-pod interception annotations (`traffic.sidecar.istio.io/*`) and ours
//! (`redirectd.dev/*`), parsed into a typed [`CapturePolicy`]. One parser for every pod
//! source; nothing past it sees strings.
//!
//! Syntax (docs/interception.md): comma-separated lists, spaces around items ignored, `*` means
//! all (in include lists), an empty string means none.

use std::{collections::BTreeMap, collections::BTreeSet, fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

/// `traffic.sidecar.istio.io/excludeOutboundPorts`
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
/// `traffic.sidecar.istio.io/includeOutboundPorts`
pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
/// `traffic.sidecar.istio.io/excludeOutboundIPRanges`
pub const EXCLUDE_OUTBOUND_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
/// `traffic.sidecar.istio.io/includeOutboundIPRanges` (default `*`)
pub const INCLUDE_OUTBOUND_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
/// `traffic.sidecar.istio.io/excludeInboundPorts`
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
/// `traffic.sidecar.istio.io/includeInboundPorts` (default `*`)
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
/// Ours: `closed` (default, as under Istio) or `open`: what happens to a connection that
/// should be captured while the pod's proxy is not listening (refused, or sent direct).
pub const FAIL_MODE: &str = "redirectd.dev/failMode";
/// Ours: `"true"` (default) or `"false"`: same-node acceleration (sockmap) for this pod.
pub const ACCEL: &str = "redirectd.dev/accel";

/// Istio interception annotations we know but do not implement; a pod carrying one gets a
/// warning (its traffic would be intercepted differently than under istio-iptables).
const UNSUPPORTED: &[&str] = &[
    "traffic.sidecar.istio.io/kubevirtInterfaces",
    "traffic.sidecar.istio.io/excludeInterfaces",
];

/// A parse failure, naming the annotation and the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationError {
    pub annotation: String,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "annotation {} = {:?}: {}",
            self.annotation, self.value, self.reason
        )
    }
}

impl std::error::Error for AnnotationError {}

/// An IP network: address (host bits cleared) and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// A single address: /32 or /128.
    pub fn host(addr: IpAddr) -> Self {
        let prefix_len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, prefix_len }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `a.b.c.d/n` or `x::y/n`; host bits are cleared, as Go's `net.ParseCIDR` (Istio) does.
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (expected address/prefix-length)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("prefix length {len:?} is not a number in 0..={max}"))?;
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Ok(Self { addr, prefix_len })
    }
}

/// A port list that may be `*`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PortSelection {
    /// `*`: every port.
    #[default]
    All,
    /// The listed ports (possibly none).
    Ports(BTreeSet<u16>),
}

/// A range list that may be `*`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RangeSelection {
    /// `*`: every destination.
    #[default]
    All,
    /// The listed ranges (possibly none).
    Ranges(Vec<Cidr>),
}

/// What the pod's annotations say about capture, in typed form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapturePolicy {
    pub exclude_outbound_ports: BTreeSet<u16>,
    pub include_outbound_ports: BTreeSet<u16>,
    pub exclude_outbound_ranges: Vec<Cidr>,
    pub include_outbound_ranges: RangeSelection,
    pub exclude_inbound_ports: BTreeSet<u16>,
    pub include_inbound_ports: PortSelection,
    /// Refuse (default) or send direct a connection to capture while the proxy is down.
    pub fail_closed: bool,
    /// Same-node acceleration for this pod's sockets.
    pub accel: bool,
    /// The pod's proxy's uid and gid, when the pod says (the istio-proxy container's
    /// security context); `None`: the node's `--proxy-uid` / `--proxy-gid`.
    #[serde(default)]
    pub proxy_uid: Option<u32>,
    #[serde(default)]
    pub proxy_gid: Option<u32>,
}

impl Default for CapturePolicy {
    /// Istio's defaults: capture every outbound destination and every inbound port, and refuse
    /// a connection to capture while the proxy is not listening.
    fn default() -> Self {
        Self {
            exclude_outbound_ports: BTreeSet::new(),
            include_outbound_ports: BTreeSet::new(),
            exclude_outbound_ranges: Vec::new(),
            include_outbound_ranges: RangeSelection::All,
            exclude_inbound_ports: BTreeSet::new(),
            include_inbound_ports: PortSelection::All,
            fail_closed: true,
            accel: true,
            proxy_uid: None,
            proxy_gid: None,
        }
    }
}

fn items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn port(item: &str) -> Result<u16, String> {
    item.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{item:?} is not a port (1-65535)"))
}

fn port_list(value: &str) -> Result<BTreeSet<u16>, String> {
    items(value)
        .map(|item| {
            if item == "*" {
                Err("'*' is only accepted in include lists".to_string())
            } else {
                port(item)
            }
        })
        .collect()
}

fn port_selection(value: &str) -> Result<PortSelection, String> {
    if value.trim() == "*" {
        return Ok(PortSelection::All);
    }
    port_list(value).map(PortSelection::Ports)
}

fn range_list(value: &str) -> Result<Vec<Cidr>, String> {
    items(value)
        .map(|item| {
            if item == "*" {
                Err("'*' is only accepted in include lists".to_string())
            } else {
                item.parse()
            }
        })
        .collect()
}

fn range_selection(value: &str) -> Result<RangeSelection, String> {
    if value.trim() == "*" {
        return Ok(RangeSelection::All);
    }
    range_list(value).map(RangeSelection::Ranges)
}

/// The result of parsing a pod's annotations: the policy and any warnings worth logging.
#[derive(Debug)]
pub struct Parsed {
    pub policy: CapturePolicy,
    pub warnings: Vec<String>,
}

/// Parses the annotations we read; all others are ignored. The first invalid value rejects
/// the whole policy (the pod is not half-configured).
pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Parsed, AnnotationError> {
    let mut policy = CapturePolicy::default();
    let mut warnings = Vec::new();
    for (key, value) in annotations {
        let err = |reason: String| AnnotationError {
            annotation: key.clone(),
            value: value.clone(),
            reason,
        };
        match key.as_str() {
            EXCLUDE_OUTBOUND_PORTS => {
                policy.exclude_outbound_ports = port_list(value).map_err(err)?
            }
            INCLUDE_OUTBOUND_PORTS => {
                policy.include_outbound_ports = port_list(value).map_err(err)?
            }
            EXCLUDE_OUTBOUND_RANGES => {
                policy.exclude_outbound_ranges = range_list(value).map_err(err)?
            }
            INCLUDE_OUTBOUND_RANGES => {
                policy.include_outbound_ranges = range_selection(value).map_err(err)?
            }
            EXCLUDE_INBOUND_PORTS => {
                policy.exclude_inbound_ports = port_list(value).map_err(err)?
            }
            INCLUDE_INBOUND_PORTS => {
                policy.include_inbound_ports = port_selection(value).map_err(err)?
            }
            FAIL_MODE => {
                policy.fail_closed = match value.trim() {
                    "open" => false,
                    "closed" => true,
                    _ => return Err(err("expected \"open\" or \"closed\"".into())),
                }
            }
            ACCEL => {
                policy.accel = match value.trim() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(err("expected \"true\" or \"false\"".into())),
                }
            }
            k if UNSUPPORTED.contains(&k) => {
                warnings.push(format!("annotation {k} is not supported and is ignored"))
            }
            _ => {}
        }
    }
    Ok(Parsed { policy, warnings })
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
    fn defaults_are_istios() {
        let p = parse(&BTreeMap::new()).unwrap().policy;
        assert_eq!(p.include_outbound_ranges, RangeSelection::All);
        assert_eq!(p.include_inbound_ports, PortSelection::All);
        assert!(p.exclude_outbound_ports.is_empty());
        assert!(
            p.fail_closed,
            "Istio refuses while the proxy is not listening"
        );
    }

    #[test]
    fn lists_with_spaces_and_empty_items() {
        let p = parse(&ann(&[
            (EXCLUDE_OUTBOUND_PORTS, " 5432 , 6379,,"),
            (EXCLUDE_OUTBOUND_RANGES, "10.96.0.0/12, fd00::/8"),
            (INCLUDE_OUTBOUND_RANGES, ""),
            (INCLUDE_INBOUND_PORTS, "80,8080"),
            (FAIL_MODE, "open"),
        ]))
        .unwrap()
        .policy;
        assert_eq!(p.exclude_outbound_ports, [5432, 6379].into());
        assert_eq!(
            p.exclude_outbound_ranges,
            vec!["10.96.0.0/12".parse().unwrap(), "fd00::/8".parse().unwrap()]
        );
        assert_eq!(p.include_outbound_ranges, RangeSelection::Ranges(vec![]));
        assert_eq!(
            p.include_inbound_ports,
            PortSelection::Ports([80, 8080].into())
        );
        assert!(!p.fail_closed, "failMode: open is the opt-in");
    }

    #[test]
    fn wildcard_only_in_include_lists() {
        assert_eq!(
            parse(&ann(&[(INCLUDE_OUTBOUND_RANGES, " * ")]))
                .unwrap()
                .policy
                .include_outbound_ranges,
            RangeSelection::All
        );
        let e = parse(&ann(&[(EXCLUDE_OUTBOUND_PORTS, "*")])).unwrap_err();
        assert_eq!(e.annotation, EXCLUDE_OUTBOUND_PORTS);
    }

    #[test]
    fn bad_values_name_annotation_and_value() {
        for (k, v) in [
            (EXCLUDE_OUTBOUND_PORTS, "70000"),
            (EXCLUDE_OUTBOUND_PORTS, "0"),
            (EXCLUDE_OUTBOUND_PORTS, "-1"),
            (EXCLUDE_OUTBOUND_PORTS, "http"),
            (EXCLUDE_OUTBOUND_RANGES, "10.0.0.0/33"),
            (EXCLUDE_OUTBOUND_RANGES, "10.0.0.1"),
            (EXCLUDE_OUTBOUND_RANGES, "300.0.0.0/8"),
            (INCLUDE_OUTBOUND_RANGES, "fd00::/129"),
            (FAIL_MODE, "sometimes"),
            (ACCEL, "yes"),
        ] {
            let e = parse(&ann(&[(k, v)])).unwrap_err();
            assert_eq!((e.annotation.as_str(), e.value.as_str()), (k, v));
            let msg = e.to_string();
            assert!(msg.contains(k) && msg.contains(v), "{msg}");
        }
    }

    #[test]
    fn cidr_clears_host_bits() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        let c: Cidr = "fd00:1:2::5/32".parse().unwrap();
        assert_eq!(c.to_string(), "fd00:1::/32");
        let c: Cidr = "0.0.0.0/0".parse().unwrap();
        assert_eq!(c.prefix_len, 0);
    }
}
