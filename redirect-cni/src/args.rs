//! The call's environment: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, and the pod's
//! identity in `CNI_ARGS` (`K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;K8S_POD_UID=..`).

use crate::error::{CniError, Code};

/// What the runtime asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// The pod, as kubelet names it in `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

/// The environment of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    /// `None` when `CNI_ARGS` names no Kubernetes pod (not a pod sandbox: passed through).
    pub pod: Option<PodIdentity>,
}

/// Reads the environment through `get` (the process environment, or a test's map).
pub fn read(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
    let command = match get("CNI_COMMAND").as_deref() {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("VERSION") => Command::Version,
        Some(other) => {
            return Err(CniError::new(
                Code::InvalidEnv,
                format!("CNI_COMMAND {other:?} is not one this plugin implements"),
                "expected ADD, DEL, CHECK or VERSION",
            ))
        }
        None => {
            return Err(CniError::new(
                Code::InvalidEnv,
                "CNI_COMMAND is not set",
                "",
            ))
        }
    };
    if command == Command::Version {
        return Ok(Env {
            command,
            container_id: String::new(),
            netns: String::new(),
            pod: None,
        });
    }
    let container_id = get("CNI_CONTAINERID")
        .filter(|c| !c.is_empty())
        .ok_or_else(|| CniError::new(Code::InvalidEnv, "CNI_CONTAINERID is not set", ""))?;
    let netns = get("CNI_NETNS").unwrap_or_default();
    // DEL may come after the namespace is gone; ADD and CHECK need it.
    if netns.is_empty() && command != Command::Del {
        return Err(CniError::new(Code::InvalidEnv, "CNI_NETNS is not set", ""));
    }
    Ok(Env {
        command,
        container_id,
        netns,
        pod: pod_identity(&get("CNI_ARGS").unwrap_or_default()),
    })
}

/// The pod named in `CNI_ARGS`, if both its namespace and its name are there.
pub fn pod_identity(cni_args: &str) -> Option<PodIdentity> {
    let mut namespace = None;
    let mut name = None;
    let mut uid = None;
    for pair in cni_args.split(';') {
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        let v = v.trim();
        match k.trim() {
            "K8S_POD_NAMESPACE" if !v.is_empty() => namespace = Some(v.to_string()),
            "K8S_POD_NAME" if !v.is_empty() => name = Some(v.to_string()),
            "K8S_POD_UID" if !v.is_empty() => uid = Some(v.to_string()),
            _ => {}
        }
    }
    Some(PodIdentity {
        namespace: namespace?,
        name: name?,
        uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let map: std::collections::BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        read(|k| map.get(k).cloned())
    }

    #[test]
    fn kubelet_args() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1",
            ),
        ])
        .unwrap();
        let pod = e.pod.unwrap();
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("shop", "web-0")
        );
        assert_eq!(pod.uid.as_deref(), Some("u-1"));
    }

    #[test]
    fn missing_or_bad_env_is_named() {
        assert!(env(&[]).unwrap_err().msg.contains("CNI_COMMAND"));
        assert!(env(&[("CNI_COMMAND", "GC")])
            .unwrap_err()
            .msg
            .contains("GC"));
        let e = env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "x")]).unwrap_err();
        assert!(e.msg.contains("CNI_NETNS"));
        // DEL after the namespace is gone is fine.
        assert!(env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "x")]).is_ok());
        // Not a pod: no identity.
        assert!(pod_identity("IgnoreUnknown=1").is_none());
    }
}
