//! The plugin's network configuration (stdin): the spec's fields, ours, and the previous
//! plugins' result, whose addresses are the pod's.

use serde::Deserialize;
use serde_json::Value;

use crate::{
    error::{CniError, Code},
    DEFAULT_EXCLUDED_NAMESPACES, DEFAULT_SOCKET, DEFAULT_TIMEOUT_SECONDS, SUPPORTED_VERSIONS,
};

/// The configuration the runtime hands this plugin.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    /// The daemon's unix socket.
    pub socket: String,
    /// Pods of these namespaces are passed through without asking the daemon.
    pub exclude_namespaces: Vec<String>,
    /// Bound on every wait for the daemon.
    pub timeout_seconds: u64,
    /// The previous plugins' result, exactly as received.
    pub prev_result: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    cni_version: Option<String>,
    socket: Option<String>,
    exclude_namespaces: Option<Vec<String>>,
    timeout_seconds: Option<u64>,
    prev_result: Option<Value>,
}

/// Parses stdin. VERSION may have no configuration at all.
pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
    let raw: Raw = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            Code::Decode,
            "the network configuration on stdin is not valid JSON",
            e.to_string(),
        )
    })?;
    let cni_version = raw.cni_version.unwrap_or_else(|| "0.3.0".into());
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!("cniVersion {cni_version:?} is not supported"),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let timeout_seconds = raw.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS);
    if timeout_seconds == 0 || timeout_seconds > 600 {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!("timeoutSeconds {timeout_seconds} is out of range"),
            "give 1 to 600",
        ));
    }
    Ok(NetConf {
        cni_version,
        socket: raw.socket.unwrap_or_else(|| DEFAULT_SOCKET.into()),
        exclude_namespaces: raw.exclude_namespaces.unwrap_or_else(|| {
            DEFAULT_EXCLUDED_NAMESPACES
                .iter()
                .map(|s| s.to_string())
                .collect()
        }),
        timeout_seconds,
        prev_result: raw.prev_result.filter(|v| !v.is_null()),
    })
}

/// The pod's addresses in a previous result (0.3.x, 0.4.0 and 1.0.0 share the `ips` shape):
/// each `ips[].address` without its prefix length, keeping only addresses of interfaces in
/// the sandbox when the result says which interface each address is on.
pub fn pod_ips(prev: &Value) -> Vec<String> {
    let interfaces = prev
        .get("interfaces")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let in_sandbox = |i: usize| {
        interfaces
            .get(i)
            .and_then(|iface| iface.get("sandbox"))
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    };
    let mut out: Vec<String> = Vec::new();
    for ip in prev
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(addr) = ip.get("address").and_then(Value::as_str) else {
            continue;
        };
        if let Some(i) = ip.get("interface").and_then(Value::as_u64) {
            if !in_sandbox(i as usize) {
                continue;
            }
        }
        let addr = addr.split('/').next().unwrap_or(addr).to_string();
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_versions() {
        let c = parse(br#"{"cniVersion":"1.0.0","name":"k8s","type":"redirect-cni"}"#).unwrap();
        assert_eq!(c.socket, DEFAULT_SOCKET);
        assert_eq!(c.exclude_namespaces, ["kube-system"]);
        assert!(c.prev_result.is_none());
        for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0"] {
            let conf = format!(r#"{{"cniVersion":"{v}","type":"redirect-cni"}}"#);
            assert!(parse(conf.as_bytes()).is_ok(), "{v}");
        }
        let e = parse(br#"{"cniVersion":"2.0.0"}"#).unwrap_err();
        assert_eq!(e.code, Code::IncompatibleVersion);
        assert_eq!(parse(b"{").unwrap_err().code, Code::Decode);
        let e = parse(br#"{"cniVersion":"1.0.0","timeoutSeconds":0}"#).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
    }

    #[test]
    fn addresses_of_the_sandbox_only() {
        let prev: Value = serde_json::from_str(
            r#"{"cniVersion":"1.0.0",
                "interfaces":[{"name":"cni0"},{"name":"veth1"},{"name":"eth0","sandbox":"/var/run/netns/x"}],
                "ips":[{"address":"10.1.0.5/24","interface":2,"gateway":"10.1.0.1"},
                       {"address":"fd00::5/64","interface":2},
                       {"address":"10.9.9.9/32","interface":0}]}"#,
        )
        .unwrap();
        assert_eq!(pod_ips(&prev), ["10.1.0.5", "fd00::5"]);
        // 0.3.x style, no interface index: every address.
        let old: Value =
            serde_json::from_str(r#"{"ips":[{"version":"4","address":"10.2.0.7/16"}]}"#).unwrap();
        assert_eq!(pod_ips(&old), ["10.2.0.7"]);
    }
}
