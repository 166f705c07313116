//! Desired mesh pods, and the pods file source (YAML, for dev boxes and tests).
//!
//! Each entry is validated on its own: an invalid one is rejected with the pod and field
//! named, and the others are served.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    path::PathBuf,
};

use serde::Deserialize;

use crate::policy::annotations::{self, CapturePolicy};
use crate::policy::mesh::Mesh;

/// `namespace/name` of a pod.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, Deserialize)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl PodKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where a pod's network namespace is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum NetnsRef {
    /// A netns file (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
    Path(PathBuf),
    /// A process in the pod.
    Pid(u32),
    /// Whatever namespace holds this address (the Kubernetes source): found by scanning the
    /// network namespaces of `/proc/*/ns/net` (needs hostPID in a DaemonSet).
    PodIp(IpAddr),
}

impl fmt::Display for NetnsRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(p) => write!(f, "{}", p.display()),
            Self::Pid(pid) => write!(f, "pid {pid}"),
            Self::PodIp(ip) => write!(f, "the namespace holding {ip}"),
        }
    }
}

/// A valid mesh pod, as every source produces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub key: PodKey,
    pub netns: NetnsRef,
    pub ips: Vec<IpAddr>,
    pub policy: CapturePolicy,
}

/// A rejected pod entry: which pod, which field, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodError {
    /// `namespace/name`, or `pods[i]` when the entry has no usable name.
    pub pod: String,
    pub field: String,
    pub reason: String,
}

impl fmt::Display for PodError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pod {}: {}: {}", self.pod, self.field, self.reason)
    }
}

/// A mesh pod whose capture configuration is invalid (an annotation), but which is known:
/// it is never left uncaptured because of it. Served before: its last good configuration
/// stays in force; new: its connections are refused until the configuration is fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidPod {
    pub key: PodKey,
    pub netns: NetnsRef,
    pub ips: Vec<IpAddr>,
    pub error: PodError,
    /// Its mesh (locked, it keeps its proxy's ports and uid).
    pub mesh: Mesh,
}

/// The desired set from one read of a source.
#[derive(Debug, Default, Clone)]
pub struct Desired {
    pub pods: Vec<PodSpec>,
    /// Mesh pods with an invalid configuration (also listed in `rejected`).
    pub invalid: Vec<InvalidPod>,
    /// Pods named by an entry that cannot be used, each with its first error (a structural error: a misspelt or
    /// mistyped field, a bad address, a relative netns; or a name listed twice): whatever is
    /// applied for them stays in force, by name, until the entry is fixed or removed (also
    /// listed in `rejected`).
    pub held: Vec<(PodKey, PodError)>,
    /// Every entry rejected, with the reason.
    pub rejected: Vec<PodError>,
    pub warnings: Vec<String>,
}

/// Why an entry (a pods-file entry, or a pod from the API server) is not a valid pod: unusable
/// (cannot even tell which pod), a named pod whose entry is broken (cannot tell where it is,
/// or its addresses: held as it is; the pods file only), or a known pod whose configuration
/// is invalid (never left uncaptured because of it).
#[derive(Debug)]
pub enum EntryError {
    Unusable(PodError),
    Held(PodKey, PodError),
    Invalid(Box<InvalidPod>),
}

impl From<PodError> for EntryError {
    fn from(e: PodError) -> Self {
        EntryError::Unusable(e)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPod {
    // Read by `key_of` before the entry is deserialized; here so they are known fields.
    #[serde(rename = "name")]
    _name: String,
    #[serde(default = "default_namespace", rename = "namespace")]
    _namespace: String,
    netns: Option<PathBuf>,
    pid: Option<u32>,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    /// Whose sidecar the pod runs: `istio` (the default) or `linkerd`.
    mesh: Option<String>,
}

fn default_namespace() -> String {
    "default".into()
}

/// Longest pod name or namespace accepted (Kubernetes: 253 for names, 63 for namespaces).
const MAX_NAME_LEN: usize = 253;

/// Most addresses one pod may list (Kubernetes gives a pod at most one per family).
pub const MAX_POD_IPS: usize = 16;

/// What an empty pods file is taken for: nothing, never "no pods" (a file being rewritten
/// reads empty for a moment).
const NO_POD_LIST: &str =
    "no `pods` list (an empty file is taken for one being rewritten); write `pods: []` to serve no pod";

/// Parses a whole pods file. `Err` only when the file as a whole is unusable (not UTF-8,
/// not YAML, no `pods` list, empty): the caller then keeps serving the previous desired set.
/// Removing every pod takes an explicit `pods: []`.
pub fn parse_file(bytes: &[u8]) -> Result<Desired, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("not UTF-8 (byte {}): {e}", e.valid_up_to()))?;
    crate::policy::limits::check_yaml(text).map_err(|e| e.to_string())?;
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    let entries = match &doc {
        serde_yaml_ng::Value::Null => return Err(NO_POD_LIST.into()),
        serde_yaml_ng::Value::Mapping(m) => match m.get("pods") {
            None | Some(serde_yaml_ng::Value::Null) => return Err(NO_POD_LIST.into()),
            Some(serde_yaml_ng::Value::Sequence(s)) => s,
            Some(_) => return Err("`pods` must be a list".into()),
        },
        _ => return Err("top level must be a mapping with a `pods` list".into()),
    };
    let parsed: Vec<_> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| parse_entry(i, e))
        .collect();
    // A name listed twice: neither entry is applied, and whatever is applied for the pod
    // stays (never the other entry's namespace).
    let mut count: BTreeMap<&PodKey, usize> = BTreeMap::new();
    for key in parsed.iter().filter_map(|r| match r {
        Ok((spec, _)) => Some(&spec.key),
        Err(EntryError::Held(key, _)) => Some(key),
        Err(EntryError::Invalid(pod)) => Some(&pod.key),
        Err(EntryError::Unusable(_)) => None,
    }) {
        *count.entry(key).or_default() += 1;
    }
    let duplicates: BTreeSet<PodKey> = count
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(k, _)| k.clone())
        .collect();
    let mut desired = Desired::default();
    for key in &duplicates {
        let e = PodError {
            pod: key.to_string(),
            field: "name".into(),
            reason: "duplicate pod (same namespace and name): no entry of it is applied; what is applied for it stays".into(),
        };
        desired.rejected.push(e.clone());
        desired.held.push((key.clone(), e));
    }
    let mut seen_keys = duplicates;
    let mut seen_netns = BTreeMap::new();
    let mut seen_ips: BTreeMap<IpAddr, PodKey> = BTreeMap::new();
    for entry in parsed {
        match entry {
            Ok((spec, warnings)) => {
                let reject = |field: &str, reason: String| PodError {
                    pod: spec.key.to_string(),
                    field: field.into(),
                    reason,
                };
                if !seen_keys.insert(spec.key.clone()) {
                    continue;
                }
                if let Some((ip, other)) = spec
                    .ips
                    .iter()
                    .find_map(|ip| seen_ips.get(ip).map(|o: &PodKey| (ip, o.clone())))
                {
                    desired.rejected.push(reject(
                        "ips",
                        format!("{ip} is already pod {other}'s address"),
                    ));
                    continue;
                }
                if let Some(other) = seen_netns.insert(spec.netns.clone(), spec.key.clone()) {
                    desired.rejected.push(reject(
                        "netns",
                        format!("{} is already pod {other}'s", spec.netns),
                    ));
                    continue;
                }
                for ip in &spec.ips {
                    seen_ips.insert(*ip, spec.key.clone());
                }
                desired.warnings.extend(
                    warnings
                        .into_iter()
                        .map(|w| format!("pod {}: {w}", spec.key)),
                );
                desired.pods.push(spec);
            }
            Err(EntryError::Unusable(e)) => desired.rejected.push(e),
            Err(EntryError::Held(key, e)) => {
                desired.rejected.push(e.clone());
                if seen_keys.insert(key.clone()) {
                    desired.held.push((key, e));
                }
            }
            Err(EntryError::Invalid(pod)) => {
                let pod = *pod;
                desired.rejected.push(pod.error.clone());
                if seen_keys.insert(pod.key.clone())
                    && !seen_netns.contains_key(&pod.netns)
                    && !pod.ips.iter().any(|ip| seen_ips.contains_key(ip))
                {
                    seen_netns.insert(pod.netns.clone(), pod.key.clone());
                    for ip in &pod.ips {
                        seen_ips.insert(*ip, pod.key.clone());
                    }
                    desired.invalid.push(pod);
                }
            }
        }
    }
    Ok(desired)
}

/// A field of a pods-file entry that is wrong, and why (the entry's name is added by the
/// caller, which makes a [`PodError`] of it).
struct FieldError {
    field: String,
    reason: String,
}

fn field_error(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Where the entry says its network namespace is, or why it does not say it usably.
fn netns_ref(netns: Option<PathBuf>, pid: Option<u32>) -> Result<NetnsRef, FieldError> {
    match (netns, pid) {
        (Some(p), None) if !p.is_absolute() => Err(field_error(
            "netns",
            format!("{} is not an absolute path", p.display()),
        )),
        (Some(p), None) => Ok(NetnsRef::Path(p)),
        (None, Some(0)) => Err(field_error("pid", "0 is not a process")),
        (None, Some(pid)) => Ok(NetnsRef::Pid(pid)),
        (Some(_), Some(_)) => Err(field_error("netns", "give either netns or pid, not both")),
        (None, None) => Err(field_error("netns", "missing: give netns (a path) or pid")),
    }
}

/// The entry's addresses, each once, or the first bad one and why.
fn addresses(ips: &[String]) -> Result<Vec<IpAddr>, FieldError> {
    if ips.len() > MAX_POD_IPS {
        return Err(field_error(
            "ips",
            format!(
                "{} addresses; a pod may list at most {MAX_POD_IPS}",
                ips.len()
            ),
        ));
    }
    let mut out = Vec::new();
    for (j, ip) in ips.iter().enumerate() {
        let addr: IpAddr = ip.trim().parse().map_err(|_| {
            field_error(format!("ips[{j}]"), format!("{ip:?} is not an IP address"))
        })?;
        if out.contains(&addr) {
            return Err(field_error(
                format!("ips[{j}]"),
                format!("{addr} is listed twice"),
            ));
        }
        out.push(addr);
    }
    Ok(out)
}

/// The pod an entry names, if its `name` (and `namespace`, when given) are usable names.
fn key_of(entry: &serde_yaml_ng::Value) -> Result<PodKey, FieldError> {
    let text = |field: &'static str| match entry.get(field) {
        None if field == "namespace" => Ok(default_namespace()),
        None => Err(field_error(field, "missing")),
        Some(serde_yaml_ng::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(field_error(field, "must be a string")),
    };
    let (name, namespace) = (text("name")?, text("namespace")?);
    for (field, value) in [("name", &name), ("namespace", &namespace)] {
        if value.is_empty() || value.len() > MAX_NAME_LEN {
            return Err(field_error(
                field,
                format!("must be 1-{MAX_NAME_LEN} characters"),
            ));
        }
        if value
            .chars()
            .any(|c| c.is_control() || c == '/' || c.is_whitespace())
        {
            return Err(field_error(
                field,
                format!("{value:?} has a character not allowed in a name"),
            ));
        }
    }
    Ok(PodKey { namespace, name })
}

fn parse_entry(
    i: usize,
    entry: &serde_yaml_ng::Value,
) -> Result<(PodSpec, Vec<String>), EntryError> {
    // Name the pod in errors as soon as we can read its name.
    let label = match (entry.get("namespace"), entry.get("name")) {
        (Some(serde_yaml_ng::Value::String(ns)), Some(serde_yaml_ng::Value::String(n))) => {
            format!("{ns}/{n}")
        }
        (_, Some(serde_yaml_ng::Value::String(n))) => format!("default/{n}"),
        _ => format!("pods[{i}]"),
    };
    let err = |field: &str, reason: String| PodError {
        pod: label.clone(),
        field: field.into(),
        reason,
    };
    let key = key_of(entry).map_err(|e| err(&e.field, e.reason))?;
    // From here on the pod is known: a broken entry holds what is applied for it.
    let held = |e: PodError| EntryError::Held(key.clone(), e);
    let raw: RawPod = serde_yaml_ng::from_value(entry.clone()).map_err(|e| {
        let msg = e.to_string();
        // serde names the field in its message ("unknown field `x`", "invalid type ... for `y`").
        let field = msg
            .split('`')
            .nth(1)
            .filter(|f| !f.is_empty())
            .unwrap_or("entry");
        held(err(field, msg.clone()))
    })?;
    let netns = netns_ref(raw.netns, raw.pid).map_err(|e| held(err(&e.field, e.reason)))?;
    let ips = addresses(&raw.ips).map_err(|e| held(err(&e.field, e.reason)))?;
    let invalid = |key, netns, ips, error, mesh| {
        EntryError::Invalid(Box::new(InvalidPod {
            key,
            netns,
            ips,
            error,
            mesh,
        }))
    };
    let mesh = match raw.mesh.as_deref().map(Mesh::parse) {
        None => Mesh::Istio,
        Some(Some(mesh)) => mesh,
        Some(None) => {
            let reason = format!(
                "{:?} is not a mesh this daemon knows ({})",
                raw.mesh.unwrap_or_default(),
                Mesh::NAMES.join(", ")
            );
            return Err(invalid(key, netns, ips, err("mesh", reason), Mesh::Istio));
        }
    };
    let parsed = match mesh {
        Mesh::Istio => annotations::parse(&raw.annotations),
        Mesh::Linkerd => crate::policy::linkerd::parse(&raw.annotations),
    };
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => {
            let error = err(&format!("annotations[{:?}]", e.annotation), e.to_string());
            return Err(invalid(key, netns, ips, error, mesh));
        }
    };
    let spec = PodSpec {
        key,
        netns,
        ips,
        policy: parsed.policy,
    };
    Ok((spec, parsed.warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_file() {
        let d = parse_file(
            br#"
pods:
  - name: client
    namespace: default
    netns: /var/run/netns/client
    ips: ["10.201.0.2", "fd00:201::2"]
    annotations:
      traffic.sidecar.istio.io/excludeOutboundPorts: "5432,6379"
      traffic.sidecar.istio.io/excludeOutboundIPRanges: "10.96.0.0/12"
      traffic.sidecar.istio.io/includeOutboundIPRanges: "*"
  - name: other
    pid: 1234
"#,
        )
        .unwrap();
        assert!(d.rejected.is_empty(), "{:?}", d.rejected);
        assert_eq!(d.pods.len(), 2);
        assert_eq!(d.pods[1].key.to_string(), "default/other");
        assert_eq!(d.pods[1].netns, NetnsRef::Pid(1234));
        assert_eq!(d.pods[0].policy.exclude_outbound_ports, [5432, 6379].into());
    }

    #[test]
    fn bad_entries_are_rejected_one_by_one() {
        let d = parse_file(
            br#"
pods:
  - name: ok
    netns: /var/run/netns/ok
  - name: badport
    netns: /var/run/netns/a
    annotations:
      traffic.sidecar.istio.io/excludeOutboundPorts: "99999"
  - name: badip
    netns: /var/run/netns/b
    ips: ["10.0.0.300"]
  - name: typo
    netsn: /var/run/netns/c
  - name: nonetns
  - name: wrongtype
    pid: "abc"
  - name: both
    netns: /x
    pid: 3
  - netns: /var/run/netns/noname
  - name: ok
    netns: /var/run/netns/dup
  - name: samens
    netns: /var/run/netns/ok
  - name: rel
    netns: relative/path
  - name: "bad/name"
    netns: /var/run/netns/e
  - name: sameip
    netns: /var/run/netns/f
    ips: ["10.0.0.9"]
  - name: sameip2
    netns: /var/run/netns/g
    ips: ["10.0.0.9"]
"#,
        )
        .unwrap();
        assert_eq!(d.pods.len(), 2);
        let got: Vec<(String, String)> = d
            .rejected
            .iter()
            .map(|e| (e.pod.clone(), e.field.clone()))
            .collect();
        let want = [
            ("default/ok", "name"),
            (
                "default/badport",
                "annotations[\"traffic.sidecar.istio.io/excludeOutboundPorts\"]",
            ),
            ("default/badip", "ips[0]"),
            ("default/typo", "netsn"),
            ("default/nonetns", "netns"),
            ("default/wrongtype", "entry"),
            ("default/both", "netns"),
            ("pods[7]", "name"),
            ("default/rel", "netns"),
            ("default/bad/name", "name"),
            ("default/sameip2", "ips"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(got, want, "{:#?}", d.rejected);
    }

    /// `mesh: linkerd` reads Linkerd's annotations (and ignores Istio's); an unknown mesh, or
    /// a typo in a Linkerd annotation, is an invalid pod (locked, never left uncaptured) that
    /// keeps its mesh.
    #[test]
    fn pods_of_another_mesh() {
        let d = parse_file(
            br#"
pods:
  - name: l5d
    netns: /var/run/netns/a
    ips: ["10.0.0.1"]
    mesh: linkerd
    annotations:
      config.linkerd.io/skip-outbound-ports: "5432"
      traffic.sidecar.istio.io/excludeOutboundPorts: "80"
  - name: typo
    netns: /var/run/netns/b
    ips: ["10.0.0.2"]
    mesh: linkerd
    annotations:
      config.linkerd.io/skip-inbound-ports: "80,eighty"
  - name: unknown
    netns: /var/run/netns/c
    ips: ["10.0.0.3"]
    mesh: likerd
"#,
        )
        .unwrap();
        assert_eq!(d.pods.len(), 1);
        let p = &d.pods[0].policy;
        assert_eq!(p.mesh, Mesh::Linkerd);
        assert_eq!(p.exclude_outbound_ports, [5432].into());
        let invalid: Vec<(&str, Mesh, &str)> = d
            .invalid
            .iter()
            .map(|i| (i.key.name.as_str(), i.mesh, i.error.field.as_str()))
            .collect();
        assert_eq!(
            invalid,
            vec![
                (
                    "typo",
                    Mesh::Linkerd,
                    "annotations[\"config.linkerd.io/skip-inbound-ports\"]"
                ),
                ("unknown", Mesh::Istio, "mesh"),
            ]
        );
        assert!(
            d.rejected[1].reason.contains("istio, linkerd"),
            "{:?}",
            d.rejected
        );
    }

    #[test]
    fn unusable_files() {
        assert!(parse_file(b"\xff\xfe").unwrap_err().contains("UTF-8"));
        assert!(parse_file(b"pods: [").unwrap_err().contains("YAML"));
        assert!(parse_file(b"pods: 3").is_err());
        assert!(parse_file(b"- a").is_err());
        // Never "no pods": a file being rewritten reads empty.
        assert!(parse_file(b"").unwrap_err().contains("pods: []"));
        assert!(parse_file(b"pods:").unwrap_err().contains("pods: []"));
        assert!(parse_file(b"pods: []").unwrap().pods.is_empty());
        let deep = format!("pods: {}{}", "[".repeat(100), "]".repeat(100));
        assert!(parse_file(deep.as_bytes())
            .unwrap_err()
            .contains("nested deeper"));
    }

    /// A structural error in a named pod's entry holds what is applied for it (by name); a
    /// name listed twice holds it too, and neither entry's namespace is used.
    #[test]
    fn broken_entries_of_named_pods_are_held() {
        let d = parse_file(
            br#"
pods:
  - name: typo
    netns: /run/netns/a
    ip: ["10.0.0.1"]
  - name: asstring
    netns: /run/netns/b
    ips: "10.0.0.2"
  - name: badip
    netns: /run/netns/c
    ips: ["10.0.0.300"]
  - name: rel
    netns: run/netns/d
  - name: twice
    netns: /run/netns/e
  - name: twice
    netns: /run/netns/f
  - name: fine
    netns: /run/netns/e
  - name: 7
    netns: /run/netns/g
"#,
        )
        .unwrap();
        let held: Vec<String> = d.held.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(
            held,
            [
                "default/twice",
                "default/typo",
                "default/asstring",
                "default/badip",
                "default/rel"
            ]
        );
        assert_eq!(d.pods.len(), 1);
        assert_eq!(d.pods[0].key.name, "fine");
        // A name that is not a name cannot hold anything: rejected only.
        assert!(
            d.rejected.iter().any(|e| e.pod == "pods[7]"),
            "{:?}",
            d.rejected
        );
        let many: Vec<String> = (0..=MAX_POD_IPS)
            .map(|i| format!("\"10.0.1.{i}\""))
            .collect();
        let yaml = format!(
            "pods:\n  - name: m\n    pid: 5\n    ips: [{}]\n",
            many.join(",")
        );
        let d = parse_file(yaml.as_bytes()).unwrap();
        assert_eq!(d.held.len(), 1);
        assert!(
            d.rejected[0].reason.contains("at most 16"),
            "{:?}",
            d.rejected
        );
    }
}
