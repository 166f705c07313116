//! The Kubernetes pod source (`redirectd run --kubernetes`): lists and watches the Pods of
//! this node (`spec.nodeName`), as Istio's control plane lists and watches the API server,
//! and publishes the desired set of mesh pods to the daemon's loop. kube-runtime's watcher
//! re-lists after a broken watch or a 410 Gone, with backoff.
//!
//! A pod is in the mesh when Istio injected a sidecar (the `sidecar.istio.io/status`
//! annotation, or an `istio-proxy` container, also as a native sidecar init container), it is
//! Running with an IP, it is not on the host network, its `sidecar.istio.io/interceptionMode`
//! is REDIRECT or TPROXY (or unset), and `redirectd.dev/skip` is not "true". Its
//! `traffic.sidecar.istio.io/*` annotations go through the same parser as the pods file.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{atomic::Ordering, Arc},
};

use super::{Published, Publisher, SourceStats};
use crate::{
    annotations,
    pods::{Desired, InvalidPod, NetnsRef, PodError, PodKey, PodSpec},
};
use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, Config,
};

/// Ours: `"true"` leaves the pod alone even if Istio injected it.
pub const SKIP: &str = "redirectd.dev/skip";
const ISTIO_STATUS: &str = "sidecar.istio.io/status";
const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
const ISTIO_PROXY: &str = "istio-proxy";

/// Where to find the API server and which node we are.
pub struct KubeOptions {
    pub node_name: String,
    /// An explicit API server URL (no auth; for tests and `kubectl proxy`); in-cluster or
    /// kubeconfig configuration otherwise.
    pub api_url: Option<String>,
}

/// A pod that is in the mesh but cannot be served as it is.
#[derive(Debug)]
pub enum Rejected {
    /// Its addresses cannot be read: which namespace is its is unknown.
    Unusable(PodError),
    /// Its capture configuration is invalid: never left uncaptured because of it.
    Invalid(Box<InvalidPod>),
}

/// One Pod as the daemon sees it: not ours (`None`), a mesh pod, or rejected.
pub fn pod_to_spec(pod: &Pod) -> Result<Option<PodSpec>, Rejected> {
    let meta = &pod.metadata;
    let key = PodKey {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
    };
    let ann: BTreeMap<String, String> = meta.annotations.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let injected = ann.contains_key(ISTIO_STATUS)
        || spec.is_some_and(|s| {
            s.containers.iter().any(|c| c.name == ISTIO_PROXY)
                || s.init_containers
                    .iter()
                    .flatten()
                    .any(|c| c.name == ISTIO_PROXY)
        });
    if !injected
        || ann.get(SKIP).is_some_and(|v| v == "true")
        || spec.and_then(|s| s.host_network).unwrap_or(false)
    {
        return Ok(None);
    }
    if let Some(mode) = ann.get(INTERCEPTION_MODE) {
        if mode != "REDIRECT" && mode != "TPROXY" {
            return Ok(None);
        }
    }
    let status = pod.status.as_ref();
    if status.and_then(|s| s.phase.as_deref()) != Some("Running") {
        return Ok(None);
    }
    let err = |field: &str, reason: String| PodError {
        pod: key.to_string(),
        field: field.into(),
        reason,
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    // Every entry of status.podIPs (dual stack), not only podIP.
    let listed = status
        .and_then(|s| s.pod_ips.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.ip)
        .chain(status.and_then(|s| s.pod_ip.clone()));
    for ip in listed {
        let ip: IpAddr = ip.parse().map_err(|_| {
            Rejected::Unusable(err("status.podIPs", format!("{ip:?} is not an IP address")))
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let Some(first) = ips.first().copied() else {
        return Ok(None);
    };
    let parsed = match annotations::parse(&ann) {
        Ok(p) => p,
        Err(e) => {
            return Err(Rejected::Invalid(Box::new(InvalidPod {
                error: err(
                    &format!("metadata.annotations[{:?}]", e.annotation),
                    e.to_string(),
                ),
                key,
                netns: NetnsRef::PodIp(first),
                ips,
            })))
        }
    };
    Ok(Some(PodSpec {
        key,
        netns: NetnsRef::PodIp(first),
        ips,
        policy: parsed.policy,
    }))
}

fn desired(pods: &BTreeMap<String, Pod>) -> Desired {
    let mut d = Desired::default();
    for pod in pods.values() {
        match pod_to_spec(pod) {
            Ok(Some(spec)) => d.pods.push(spec),
            Ok(None) => {}
            Err(Rejected::Unusable(e)) => d.rejected.push(e),
            Err(Rejected::Invalid(p)) => {
                d.rejected.push(p.error.clone());
                d.invalid.push(*p);
            }
        }
    }
    d
}

fn key_of(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Lists and watches this node's pods until the process ends, publishing the desired set
/// after the first full list and after every change. `restarts` counts watch errors.
pub async fn run(opts: KubeOptions, tx: Publisher, stats: Arc<SourceStats>) -> Result<()> {
    let config = match &opts.api_url {
        Some(url) => Config::new(
            url.parse()
                .with_context(|| format!("--kube-api-url {url:?} is not a URL"))?,
        ),
        None => Config::infer()
            .await
            .context("no Kubernetes configuration (in-cluster service account or kubeconfig)")?,
    };
    let client = Client::try_from(config).context("building the Kubernetes client")?;
    let api: Api<Pod> = Api::all(client);
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node_name));
    let mut stream = watcher(api, wc).default_backoff().boxed();
    let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
    let mut relist: Option<BTreeMap<String, Pod>> = None;
    log::info!("watching the pods of node {}", opts.node_name);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => relist = Some(BTreeMap::new()),
            Ok(watcher::Event::InitApply(p)) => {
                if let Some(r) = relist.as_mut() {
                    r.insert(key_of(&p), p);
                }
            }
            Ok(watcher::Event::InitDone) => {
                pods = relist.take().unwrap_or_default();
                tx.send_replace(Some(Published::new(desired(&pods))));
            }
            Ok(watcher::Event::Apply(p)) => {
                pods.insert(key_of(&p), p);
                tx.send_replace(Some(Published::new(desired(&pods))));
            }
            Ok(watcher::Event::Delete(p)) => {
                pods.remove(&key_of(&p));
                tx.send_replace(Some(Published::new(desired(&pods))));
            }
            Err(e) => {
                stats.watch_restarts.fetch_add(1, Ordering::Relaxed);
                log::warn!("pod watch broke ({e}); re-listing with backoff");
            }
        }
    }
    anyhow::bail!("the pod watch ended")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "annotations": {"sidecar.istio.io/status": "{}"}},
            "spec": {"containers": [{"name": "app"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
        })
    }

    #[test]
    fn injected_running_pod_is_in_the_mesh_with_every_ip() {
        let s = pod_to_spec(&pod(base())).unwrap().unwrap();
        assert_eq!(s.key.to_string(), "shop/web");
        assert_eq!(s.ips.len(), 2);
        assert_eq!(s.netns, NetnsRef::PodIp("10.0.0.5".parse().unwrap()));
    }

    #[test]
    fn native_sidecar_counts_as_injected() {
        let mut p = base();
        p["metadata"]["annotations"] = serde_json::json!({});
        p["spec"]["initContainers"] =
            serde_json::json!([{"name": "istio-proxy", "restartPolicy": "Always"}]);
        assert!(pod_to_spec(&pod(p)).unwrap().is_some());
    }

    #[test]
    fn pods_left_alone() {
        type Change = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<Change> = vec![
            Box::new(|p| p["metadata"]["annotations"] = serde_json::json!({})),
            Box::new(|p| p["metadata"]["annotations"]["redirectd.dev/skip"] = "true".into()),
            Box::new(|p| {
                p["metadata"]["annotations"]["sidecar.istio.io/interceptionMode"] = "NONE".into()
            }),
            Box::new(|p| p["spec"]["hostNetwork"] = true.into()),
            Box::new(|p| p["status"]["phase"] = "Pending".into()),
            Box::new(|p| {
                p["status"]["podIP"] = serde_json::Value::Null;
                p["status"]["podIPs"] = serde_json::json!([]);
            }),
        ];
        for (i, change) in cases.iter().enumerate() {
            let mut p = base();
            change(&mut p);
            assert!(pod_to_spec(&pod(p)).unwrap().is_none(), "case {i}");
        }
    }

    #[test]
    fn bad_annotation_names_pod_and_field_and_keeps_the_pod_known() {
        let mut p = base();
        p["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] =
            "http".into();
        let Err(Rejected::Invalid(invalid)) = pod_to_spec(&pod(p)) else {
            panic!("a bad annotation must leave the pod known (to keep it captured)");
        };
        let e = &invalid.error;
        assert_eq!(e.pod, "shop/web");
        assert!(e.field.contains("excludeOutboundPorts"), "{e}");
        assert_eq!(invalid.netns, NetnsRef::PodIp("10.0.0.5".parse().unwrap()));
    }
}
