//! Istio's per-pod interception annotations (`traffic.sidecar.istio.io/*`, their keys from
//! the mesh profile, [`crate::policy::mesh::ISTIO`]) and ours (`redirectd.dev/*`), parsed into a typed
//! [`CapturePolicy`]. One parser for every pod source; nothing past it sees strings.
//!
//! Syntax (docs/interception.md): comma-separated lists, spaces around items ignored, `*` means
//! all (in include lists), an empty string means none.

use std::{collections::BTreeMap, collections::BTreeSet, fmt};

use serde::{Deserialize, Serialize};

pub use crate::net::Cidr;
use crate::policy::mesh::{Mesh, ISTIO};

/// `traffic.sidecar.istio.io/excludeOutboundPorts`
pub const EXCLUDE_OUTBOUND_PORTS: &str = ISTIO.annotations.exclude_outbound_ports;
/// `traffic.sidecar.istio.io/includeOutboundPorts`
pub const INCLUDE_OUTBOUND_PORTS: &str = ISTIO.annotations.include_outbound_ports;
/// `traffic.sidecar.istio.io/excludeOutboundIPRanges`
pub const EXCLUDE_OUTBOUND_RANGES: &str = ISTIO.annotations.exclude_outbound_ranges;
/// `traffic.sidecar.istio.io/includeOutboundIPRanges` (default `*`)
pub const INCLUDE_OUTBOUND_RANGES: &str = ISTIO.annotations.include_outbound_ranges;
/// `traffic.sidecar.istio.io/excludeInboundPorts`
pub const EXCLUDE_INBOUND_PORTS: &str = ISTIO.annotations.exclude_inbound_ports;
/// `traffic.sidecar.istio.io/includeInboundPorts` (default `*`)
pub const INCLUDE_INBOUND_PORTS: &str = ISTIO.annotations.include_inbound_ports;
/// `status.sidecar.istio.io/port`: the agent's status port (Istio's default 15020), excluded
/// from inbound capture in its place; `0`: no status port.
pub const STATUS_PORT: &str = ISTIO.annotations.status_port;
/// The status port Istio excludes when a pod does not say ([`STATUS_PORT`]).
pub const DEFAULT_STATUS_PORT: u16 = ISTIO.status_port;
/// `sidecar.istio.io/interceptionMode`: `REDIRECT` (Istio's default) or `TPROXY` (the
/// application sees the client's address).
pub const INTERCEPTION_MODE: &str = ISTIO.annotations.interception_mode;
/// Ours: `closed` (default, as under Istio) or `open`: what happens to a connection that
/// should be captured while the pod's proxy is not listening (refused, or sent direct).
pub const FAIL_MODE: &str = "redirectd.dev/failMode";
/// Ours, for the pods file (a Kubernetes pod says it in the istio-proxy container's
/// `ISTIO_OUTBOUND_OWNER_GROUPS`, as Istio reads it): only processes of these groups have their
/// outbound connections captured (`*`, the default: all).
pub const OWNER_GROUPS: &str = "redirectd.dev/outboundOwnerGroups";
/// Ours, for the pods file (Istio: `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`): processes of these
/// groups are never captured outbound (only when the include list is `*`).
pub const OWNER_GROUPS_EXCLUDE: &str = "redirectd.dev/outboundOwnerGroupsExclude";
/// Ours, for the pods file (a Kubernetes pod says it as Istio reads it: `ISTIO_META_DNS_CAPTURE`
/// in the istio-proxy container's environment or `proxyMetadata`): `"true"` sends the pod's
/// DNS to the agent's DNS proxy on port 15053.
pub const DNS_CAPTURE: &str = "redirectd.dev/dnsCapture";
/// Ours: `"true"` (default) or `"false"`: same-node acceleration (sockmap) for this pod.
pub const ACCEL: &str = "redirectd.dev/accel";

/// `traffic.sidecar.istio.io/kubevirtInterfaces`: interfaces through which a VM's traffic
/// enters the pod (KubeVirt); every TCP connection arriving through one is captured to the
/// outbound listener, whatever its destination.
pub const KUBEVIRT_INTERFACES: &str = ISTIO.annotations.kubevirt_interfaces;
/// `istio.io/reroute-virtual-interfaces`: the older name of [`KUBEVIRT_INTERFACES`] (Istio
/// reads both; the lists are joined).
pub const REROUTE_VIRTUAL_INTERFACES: &str = ISTIO.annotations.reroute_virtual_interfaces;

/// `traffic.sidecar.istio.io/excludeInterfaces`: interface names whose traffic is never
/// captured, either way.
pub const EXCLUDE_INTERFACES: &str = ISTIO.annotations.exclude_interfaces;

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

/// A port list that may be `*`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PortSelection {
    /// `*`: every port.
    #[default]
    All,
    /// The listed ports (possibly none).
    Ports(BTreeSet<u16>),
}

/// Istio's outbound owner-group filter.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OwnerGroups {
    /// Every group (`*`, no exclusions): the default.
    #[default]
    All,
    /// Only these groups are captured (an include list other than `*`; exclusions ignored).
    Only(BTreeSet<u32>),
    /// Every group but these (include `*` with an exclude list).
    AllExcept(BTreeSet<u32>),
}

fn gid_list(value: &str) -> Result<BTreeSet<u32>, String> {
    items(value)
        .map(|g| {
            g.parse::<u32>().map_err(|_| {
                format!(
                    "{g:?} is not a numeric group id (group names are not resolved: give the GID)"
                )
            })
        })
        .collect()
}

/// The filter from Istio's two settings, as istio-iptables reads them: an include list other
/// than `*` wins (and the exclude list is ignored); else the exclude list, if any. An empty
/// include list captures no group.
pub fn owner_groups(include: Option<&str>, exclude: Option<&str>) -> Result<OwnerGroups, String> {
    match include.map(str::trim) {
        Some(i) if i != "*" => Ok(OwnerGroups::Only(gid_list(i)?)),
        _ => {
            let except = gid_list(exclude.unwrap_or(""))?;
            Ok(if except.is_empty() {
                OwnerGroups::All
            } else {
                OwnerGroups::AllExcept(except)
            })
        }
    }
}

/// A boolean as Go's `strconv.ParseBool` reads it (Istio's `ISTIO_META_DNS_CAPTURE`).
pub fn go_bool(value: &str) -> Result<bool, String> {
    match value.trim() {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        other => Err(format!("{other:?} is not a boolean (true or false)")),
    }
}

/// `redirectd.dev/failMode` (every mesh's pods): `closed` refuses a connection to capture
/// while the proxy is down, `open` sends it direct.
pub fn fail_closed(value: &str) -> Result<bool, String> {
    match value.trim() {
        "open" => Ok(false),
        "closed" => Ok(true),
        _ => Err("expected \"open\" or \"closed\"".into()),
    }
}

/// `redirectd.dev/accel` (every mesh's pods).
pub fn accel(value: &str) -> Result<bool, String> {
    match value.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected \"true\" or \"false\"".into()),
    }
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
    /// `status.sidecar.istio.io/port` when the pod says: the port excluded from inbound capture
    /// instead of 15020 (`Some(0)`: none).
    #[serde(default)]
    pub status_port: Option<u16>,
    /// Which callers' outbound connections may be captured, by group.
    #[serde(default)]
    pub owner_groups: OwnerGroups,
    /// DNS (UDP and TCP to port 53) goes to the agent's DNS proxy (Istio's DNS capture).
    #[serde(default)]
    pub dns_capture: bool,
    /// `excludeInterfaces`: names.
    #[serde(default)]
    pub exclude_interfaces: BTreeSet<String>,
    /// `kubevirtInterfaces` (and `reroute-virtual-interfaces`): names.
    #[serde(default)]
    pub vm_interfaces: BTreeSet<String>,
    /// Interception mode TPROXY: the proxy reaches the application from the client's address
    /// (its sockets marked 1337 go direct), and the pod gets TPROXY's policy routing.
    #[serde(default)]
    pub tproxy: bool,
    /// The mesh whose rules, ports and uid the pod has.
    #[serde(default)]
    pub mesh: Mesh,
    /// Networks whose connections into the pod are never captured (Linkerd's `skip-subnets`).
    #[serde(default)]
    pub exclude_inbound_sources: Vec<Cidr>,
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
            status_port: None,
            owner_groups: OwnerGroups::All,
            dns_capture: false,
            tproxy: false,
            vm_interfaces: BTreeSet::new(),
            exclude_interfaces: BTreeSet::new(),
            mesh: Mesh::Istio,
            exclude_inbound_sources: Vec::new(),
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

/// The owner-group filter of our two annotations (the pods file's way to say Istio's
/// `ISTIO_OUTBOUND_OWNER_GROUPS` and `_EXCLUDE`).
fn owner_groups_annotated(
    annotations: &BTreeMap<String, String>,
) -> Result<OwnerGroups, AnnotationError> {
    let groups = |k: &str| annotations.get(k).map(String::as_str);
    let (include, exclude) = (groups(OWNER_GROUPS), groups(OWNER_GROUPS_EXCLUDE));
    owner_groups(include, exclude).map_err(|reason| {
        // Name the list that failed: the include list is read first.
        let key = match owner_groups(include, None) {
            Err(_) => OWNER_GROUPS,
            Ok(_) => OWNER_GROUPS_EXCLUDE,
        };
        AnnotationError {
            annotation: key.into(),
            value: groups(key).unwrap_or_default().into(),
            reason,
        }
    })
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
    let mut policy = CapturePolicy {
        owner_groups: owner_groups_annotated(annotations)?,
        ..CapturePolicy::default()
    };
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
            INTERCEPTION_MODE => {
                match value.trim() {
                    "REDIRECT" => policy.tproxy = false,
                    "TPROXY" => policy.tproxy = true,
                    _ => return Err(err(
                        "expected REDIRECT or TPROXY (NONE: leave the pod out of the mesh instead)"
                            .into(),
                    )),
                }
            }
            STATUS_PORT => {
                policy.status_port = Some(value.trim().parse::<u16>().map_err(|_| {
                    err("expected a port (1-65535), or 0 for no status port".into())
                })?)
            }
            FAIL_MODE => policy.fail_closed = fail_closed(value).map_err(err)?,
            DNS_CAPTURE => policy.dns_capture = go_bool(value).map_err(err)?,
            EXCLUDE_INTERFACES => {
                policy.exclude_interfaces = interface_names(value).map_err(err)?
            }
            KUBEVIRT_INTERFACES | REROUTE_VIRTUAL_INTERFACES => policy
                .vm_interfaces
                .extend(vm_interfaces(value).map_err(err)?),
            ACCEL => policy.accel = accel(value).map_err(err)?,
            _ => {}
        }
    }
    let both = policy
        .vm_interfaces
        .intersection(&policy.exclude_interfaces);
    warnings.extend(both.map(|i| format!("interface {i} is in both {KUBEVIRT_INTERFACES} and {EXCLUDE_INTERFACES}: its VM's TCP is captured (Istio's redirect rule for it comes first)")));
    Ok(Parsed { policy, warnings })
}

/// A list of interface names.
fn interface_names(value: &str) -> Result<BTreeSet<String>, String> {
    items(value)
        .map(|n| crate::net::valid_name(n).map(|()| n.to_string()))
        .collect()
}

/// `kubevirtInterfaces`: interface names (whether this kernel can serve them is the
/// reconciler's question: `sk_lookup` must see the ingress interface).
fn vm_interfaces(value: &str) -> Result<BTreeSet<String>, String> {
    interface_names(value)
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
    fn vm_interfaces_joined_and_an_excluded_one_warned() {
        let p = parse(&ann(&[
            (KUBEVIRT_INTERFACES, "k6t-a,net1"),
            (REROUTE_VIRTUAL_INTERFACES, "k6t-b"),
            (EXCLUDE_INTERFACES, "net1"),
        ]))
        .unwrap();
        let names: Vec<&str> = p.policy.vm_interfaces.iter().map(String::as_str).collect();
        assert_eq!(names, ["k6t-a", "k6t-b", "net1"]);
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(p.warnings[0].contains("net1"), "{:?}", p.warnings);
        let e = parse(&ann(&[(KUBEVIRT_INTERFACES, "tap0,has space")])).unwrap_err();
        assert_eq!(e.annotation, KUBEVIRT_INTERFACES);
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
            (STATUS_PORT, "-1"),
            (DNS_CAPTURE, "yes"),
            (EXCLUDE_INTERFACES, "net1,has space"),
            (EXCLUDE_INTERFACES, "a-name-too-long0"),
            (INTERCEPTION_MODE, "redirect"),
            (STATUS_PORT, "status"),
            (ACCEL, "yes"),
        ] {
            let e = parse(&ann(&[(k, v)])).unwrap_err();
            assert_eq!((e.annotation.as_str(), e.value.as_str()), (k, v));
            let msg = e.to_string();
            assert!(msg.contains(k) && msg.contains(v), "{msg}");
        }
    }

    #[test]
    fn owner_groups_as_istio_reads_them() {
        let set = |v: &[u32]| v.iter().copied().collect::<BTreeSet<u32>>();
        assert_eq!(owner_groups(None, None), Ok(OwnerGroups::All));
        assert_eq!(owner_groups(Some("*"), Some("")), Ok(OwnerGroups::All));
        assert_eq!(
            owner_groups(Some("*"), Some("1000, 2000")),
            Ok(OwnerGroups::AllExcept(set(&[1000, 2000])))
        );
        assert_eq!(
            owner_groups(Some("3000"), Some("1000")),
            Ok(OwnerGroups::Only(set(&[3000]))),
            "an include list wins over the exclude list"
        );
        assert_eq!(
            owner_groups(Some(""), None),
            Ok(OwnerGroups::Only(set(&[])))
        );
        let e = parse(&ann(&[(OWNER_GROUPS_EXCLUDE, "1000,wheel")])).unwrap_err();
        assert_eq!(e.annotation, OWNER_GROUPS_EXCLUDE);
        assert!(
            e.reason.contains("\"wheel\" is not a numeric group id"),
            "{e}"
        );
        let e = parse(&ann(&[(OWNER_GROUPS, "x"), (OWNER_GROUPS_EXCLUDE, "1")])).unwrap_err();
        assert_eq!(e.annotation, OWNER_GROUPS);
    }

    #[test]
    fn status_port() {
        let p = |v: &str| parse(&ann(&[(STATUS_PORT, v)])).unwrap().policy.status_port;
        assert_eq!(p(" 15099 "), Some(15099));
        assert_eq!(p("0"), Some(0), "0: no status port");
        assert_eq!(parse(&BTreeMap::new()).unwrap().policy.status_port, None);
    }
}
