//! The Kubernetes pod source (`redirectd run --kubernetes`): lists and watches the Pods of
//! this node (`spec.nodeName`), as Istio's control plane lists and watches the API server,
//! and publishes the desired set of mesh pods to the daemon's loop. kube-runtime's watcher
//! re-lists after a broken watch or a 410 Gone, with backoff.
//!
//! A pod is in the mesh when Istio injected a sidecar (the `sidecar.istio.io/status`
//! annotation, or an `istio-proxy` container, also as a native sidecar init container) that is
//! not a gateway (`istio-proxy ... router`), it is not on the host network, its interception
//! mode is not NONE (the `sidecar.istio.io/interceptionMode` annotation, else the
//! istio-proxy container's `ISTIO_META_INTERCEPTION_MODE`, else `proxy.istio.io/config`;
//! default REDIRECT), and `redirectd.dev/skip` is not "true". REDIRECT and TPROXY are served.
//! It is served as soon as it has
//! an address and is not finished: Pending (init containers running) or Running. Its
//! `traffic.sidecar.istio.io/*` annotations go through the same parser as the pods file; its
//! proxy's uid and gid come from the istio-proxy container's security context.
//! A pod with Linkerd's `linkerd-proxy` container (and no Istio sidecar; both at once is a
//! rejected configuration) is a Linkerd pod: its `config.linkerd.io/*` annotations are read
//! ([`crate::policy::linkerd`]), its proxy's uid is the container's `runAsUser`.
//! Annotation warnings and rejections are logged, shown in status and recorded as Kubernetes
//! Events on the pod.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{atomic::Ordering, Arc},
};

use super::{Member, Membership, Published, PublishedTx, SourceStats};
use crate::{
    pods::{Desired, EntryError, InvalidPod, NetnsRef, PodError, PodKey, PodSpec},
    policy::annotations::{self, CapturePolicy},
    policy::mesh::{linkerd, ISTIO},
};
use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Container, Event, ObjectReference, Pod};
use kube::{
    api::PostParams,
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, Config,
};

/// Ours: `"true"` leaves the pod alone even if Istio injected it.
pub const SKIP: &str = "redirectd.dev/skip";
// Istio's names, from its profile.
const ISTIO_STATUS: &str = ISTIO.injected_annotation;
const INTERCEPTION_MODE: &str = ISTIO.annotations.interception_mode;
const PROXY_CONFIG: &str = ISTIO.proxy_config_annotation;
const INTERCEPTION_MODE_ENV: &str = ISTIO.env.interception_mode;
const OWNER_GROUPS_ENV: &str = ISTIO.env.owner_groups;
const OWNER_GROUPS_EXCLUDE_ENV: &str = ISTIO.env.owner_groups_exclude;
const DNS_CAPTURE_ENV: &str = ISTIO.env.dns_capture;
const ISTIO_PROXY: &str = ISTIO.proxy_container;

/// Where to find the API server and which node we are.
pub struct KubeOptions {
    pub node_name: String,
    /// An explicit API server URL (no auth; for tests and `kubectl proxy`); in-cluster or
    /// kubeconfig configuration otherwise.
    pub api_url: Option<String>,
}

fn pod_key(pod: &Pod) -> PodKey {
    PodKey {
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: pod.metadata.name.clone().unwrap_or_default(),
    }
}

/// The injected istio-proxy container (a regular container, or a native sidecar).
fn istio_proxy(pod: &Pod) -> Option<&Container> {
    container(pod, ISTIO_PROXY)
}

/// The container named `name` (a regular container, or a native sidecar).
fn container<'a>(pod: &'a Pod, name: &str) -> Option<&'a Container> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
}

/// A setting of the pod and where it was read (for an error that names it).
#[derive(Debug, Clone, Default)]
struct Setting {
    value: String,
    from: String,
}

/// A setting of the pod that is invalid: where it was read, and why.
#[derive(Debug)]
struct SettingError {
    from: String,
    reason: String,
}

/// The pod's interception mode and where it was read, by Istio's precedence.
fn interception_mode(pod: &Pod, ann: &BTreeMap<String, String>) -> Option<Setting> {
    if let Some(m) = ann.get(INTERCEPTION_MODE) {
        return Some(Setting {
            value: m.trim().to_string(),
            from: format!("annotation {INTERCEPTION_MODE}"),
        });
    }
    let env = istio_proxy(pod)
        .and_then(|c| c.env.as_ref())
        .and_then(|env| env.iter().find(|e| e.name == INTERCEPTION_MODE_ENV))
        .and_then(|e| e.value.clone());
    if let Some(m) = env {
        return Some(Setting {
            value: m.trim().to_string(),
            from: format!("istio-proxy env {INTERCEPTION_MODE_ENV}"),
        });
    }
    let doc = proxy_config(ann.get(PROXY_CONFIG)?).ok()?;
    let m = doc.get("interceptionMode")?.as_str()?;
    Some(Setting {
        value: m.trim().to_string(),
        from: format!("annotation {PROXY_CONFIG} interceptionMode"),
    })
}

/// A proxy setting as Istio passes it to its iptables setup: the istio-proxy container's
/// environment, else `proxyMetadata` in the `proxy.istio.io/config` annotation.
fn proxy_setting(pod: &Pod, ann: &BTreeMap<String, String>, name: &str) -> Option<Setting> {
    let env = istio_proxy(pod)
        .and_then(|c| c.env.as_ref())
        .and_then(|env| env.iter().find(|e| e.name == name))
        .and_then(|e| e.value.clone());
    if let Some(value) = env {
        return Some(Setting {
            value,
            from: format!("istio-proxy env {name}"),
        });
    }
    let doc = proxy_config(ann.get(PROXY_CONFIG)?).ok()?;
    let v = doc.get("proxyMetadata")?.get(name)?.as_str()?;
    Some(Setting {
        value: v.to_string(),
        from: format!("annotation {PROXY_CONFIG} proxyMetadata.{name}"),
    })
}

/// The owner-group filter Istio's `ISTIO_OUTBOUND_OWNER_GROUPS` (`_EXCLUDE`) give the pod, if
/// either is set; an error names the setting and why.
fn owner_groups_of(
    pod: &Pod,
    ann: &BTreeMap<String, String>,
) -> Option<Result<annotations::OwnerGroups, SettingError>> {
    let include = proxy_setting(pod, ann, OWNER_GROUPS_ENV);
    let exclude = proxy_setting(pod, ann, OWNER_GROUPS_EXCLUDE_ENV);
    if include.is_none() && exclude.is_none() {
        return None;
    }
    fn value(s: &Option<Setting>) -> Option<&str> {
        s.as_ref().map(|s| s.value.as_str())
    }
    Some(
        annotations::owner_groups(value(&include), value(&exclude)).map_err(|reason| {
            let failed = match annotations::owner_groups(value(&include), None) {
                Err(_) => include.as_ref(),
                Ok(_) => exclude.as_ref(),
            };
            let Setting { value, from } = failed.cloned().unwrap_or_default();
            SettingError {
                from,
                reason: format!("{value:?}: {reason}"),
            }
        }),
    )
}

/// The proxy's uid and gid from the istio-proxy container's security context, else the
/// pod's, else Istio's 1337.
fn proxy_ids(pod: &Pod) -> Result<(u32, u32), String> {
    let container = istio_proxy(pod).and_then(|c| c.security_context.as_ref());
    let pod_level = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let uid = container
        .and_then(|c| c.run_as_user)
        .or_else(|| pod_level.and_then(|p| p.run_as_user));
    let gid = container
        .and_then(|c| c.run_as_group)
        .or_else(|| pod_level.and_then(|p| p.run_as_group));
    let id = |v: Option<i64>, what: &str| match v {
        None => Ok(ISTIO.proxy_uid),
        Some(v) => u32::try_from(v).map_err(|_| format!("{what} {v} is not a uid/gid")),
    };
    Ok((id(uid, "runAsUser")?, id(gid, "runAsGroup")?))
}

/// `ISTIO_META_DNS_CAPTURE` from the istio-proxy container's environment or `proxyMetadata`
/// (`None`: not set); a bad value is an error naming where it was read.
fn dns_capture_of(pod: &Pod, ann: &BTreeMap<String, String>) -> Result<Option<bool>, SettingError> {
    proxy_setting(pod, ann, DNS_CAPTURE_ENV)
        .map(|Setting { value, from }| {
            annotations::go_bool(&value).map_err(|reason| SettingError { from, reason })
        })
        .transpose()
}

/// The `proxy.istio.io/config` annotation as a YAML document, bounded in size and nesting
/// before it is parsed (a pod's annotation must not stall the daemon).
pub fn proxy_config(text: &str) -> Result<serde_yaml_ng::Value, String> {
    crate::policy::limits::check_pod_document(text).map_err(|e| e.to_string())?;
    serde_yaml_ng::from_str(text).map_err(|e| format!("not valid YAML: {e}"))
}

/// Whether the pod is in the mesh, with which configuration, whatever its phase; and the
/// warnings its annotations give.
pub fn membership(pod: &Pod) -> (Membership, Vec<String>) {
    let key = pod_key(pod);
    let ann: BTreeMap<String, String> = pod.metadata.annotations.clone().unwrap_or_default();
    let outside = |why: &str| (Membership::Outside(why.to_string()), Vec::new());
    let spec = pod.spec.as_ref();
    let proxy = istio_proxy(pod);
    let linkerd_proxy = container(pod, linkerd::PROXY_CONTAINER);
    let istio = ann.contains_key(ISTIO_STATUS) || proxy.is_some();
    if !istio && linkerd_proxy.is_none() {
        return outside("no Istio or Linkerd sidecar injected");
    }
    if ann.get(SKIP).is_some_and(|v| v == "true") {
        return outside("redirectd.dev/skip is \"true\"");
    }
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return outside("on the host network");
    }
    if let Some(l5d) = linkerd_proxy {
        if istio {
            let why = "both an Istio and a Linkerd sidecar: which mesh captures it is unclear";
            return invalid(&key, "spec.containers".into(), why.into());
        }
        return linkerd_membership(&key, &ann, l5d);
    }
    if proxy
        .and_then(|c| c.args.as_ref())
        .is_some_and(|args| args.iter().any(|a| a == "router"))
    {
        return outside("a gateway (istio-proxy runs as router), not a sidecar");
    }
    let invalid = |field: String, reason: String| invalid(&key, field, reason);
    if let Some(Err(e)) = ann
        .get(PROXY_CONFIG)
        .map(|c| crate::policy::limits::check_pod_document(c))
    {
        return invalid(format!("annotations[{PROXY_CONFIG:?}]"), e.to_string());
    }
    let mode = interception_mode(pod, &ann);
    let tproxy = mode.as_ref().is_some_and(|m| m.value == "TPROXY");
    if let Some(Setting { value: mode, from }) = mode {
        match mode.as_str() {
            "REDIRECT" | "TPROXY" => {}
            "NONE" => return outside("interception mode NONE"),
            other => {
                return invalid(
                    from,
                    format!("interception mode {other:?} is not REDIRECT, TPROXY or NONE"),
                )
            }
        }
    }
    let (uid, gid) = match proxy_ids(pod) {
        Ok(ids) => ids,
        Err(e) => return invalid("istio-proxy securityContext".into(), e),
    };
    let groups = match owner_groups_of(pod, &ann).transpose() {
        Ok(g) => g,
        Err(SettingError { from, reason }) => return invalid(from, reason),
    };
    let dns = match dns_capture_of(pod, &ann) {
        Ok(d) => d,
        Err(SettingError { from, reason }) => return invalid(from, reason),
    };
    match annotations::parse(&ann) {
        Ok(parsed) => {
            let policy = CapturePolicy {
                proxy_uid: Some(uid),
                proxy_gid: Some(gid),
                owner_groups: groups.unwrap_or(parsed.policy.owner_groups.clone()),
                dns_capture: dns.unwrap_or(parsed.policy.dns_capture),
                tproxy,
                ..parsed.policy
            };
            let warnings = parsed
                .warnings
                .into_iter()
                .map(|w| format!("pod {key}: {w}"))
                .collect();
            (Membership::Mesh(Box::new(policy)), warnings)
        }
        Err(e) => invalid(
            format!("metadata.annotations[{:?}]", e.annotation),
            e.to_string(),
        ),
    }
}

/// A mesh pod whose `field` is invalid, for `reason` (never left uncaptured because of it).
fn invalid(key: &PodKey, field: String, reason: String) -> (Membership, Vec<String>) {
    let e = PodError {
        pod: key.to_string(),
        field,
        reason,
    };
    (Membership::Invalid(e), Vec::new())
}

/// A pod with Linkerd's proxy injected: Linkerd's annotations ([`crate::policy::linkerd`]),
/// the proxy's uid from its container's `runAsUser` (Linkerd's injector sets it from
/// `proxy.uid` or `config.linkerd.io/proxy-uid`).
fn linkerd_membership(
    key: &PodKey,
    ann: &BTreeMap<String, String>,
    proxy: &Container,
) -> (Membership, Vec<String>) {
    let invalid = |field: String, reason: String| invalid(key, field, reason);
    let mut policy = match crate::policy::linkerd::parse(ann) {
        Ok(parsed) => parsed.policy,
        Err(e) => {
            return invalid(
                format!("metadata.annotations[{:?}]", e.annotation),
                e.to_string(),
            )
        }
    };
    if let Some(uid) = proxy.security_context.as_ref().and_then(|s| s.run_as_user) {
        match u32::try_from(uid) {
            Ok(uid) if uid != 0 => policy.proxy_uid = Some(uid),
            _ => {
                return invalid(
                    "linkerd-proxy securityContext".into(),
                    format!("runAsUser {uid} is not a uid the proxy can be told apart by"),
                )
            }
        }
    }
    (Membership::Mesh(Box::new(policy)), Vec::new())
}

/// The pod's addresses (every entry of `status.podIPs`, dual stack, and `status.podIP`).
fn pod_ips(pod: &Pod, key: &PodKey) -> Result<Vec<IpAddr>, PodError> {
    let status = pod.status.as_ref();
    let listed = status
        .and_then(|s| s.pod_ips.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.ip)
        .chain(status.and_then(|s| s.pod_ip.clone()));
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in listed {
        let ip: IpAddr = ip.parse().map_err(|_| PodError {
            pod: key.to_string(),
            field: "status.podIPs".into(),
            reason: format!("{ip:?} is not an IP address"),
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

/// One Pod as the daemon serves it now: not served (`None`: not in the mesh, no address yet,
/// or finished), a mesh pod, or rejected.
pub fn pod_to_spec(pod: &Pod) -> Result<Option<PodSpec>, EntryError> {
    let (membership, _) = membership(pod);
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(membership, Membership::Outside(_)) || matches!(phase, Some("Succeeded" | "Failed"))
    {
        return Ok(None);
    }
    let key = pod_key(pod);
    let ips = pod_ips(pod, &key).map_err(EntryError::Unusable)?;
    let Some(first) = ips.first().copied() else {
        return Ok(None);
    };
    match membership {
        Membership::Mesh(policy) => Ok(Some(PodSpec {
            key,
            netns: NetnsRef::PodIp(first),
            ips,
            policy: *policy,
        })),
        Membership::Invalid(error) => Err(EntryError::Invalid(Box::new(InvalidPod {
            key,
            netns: NetnsRef::PodIp(first),
            ips,
            error,
            mesh: if container(pod, linkerd::PROXY_CONTAINER).is_some() {
                crate::policy::mesh::Mesh::Linkerd
            } else {
                crate::policy::mesh::Mesh::Istio
            },
        }))),
        Membership::Outside(_) => Ok(None),
    }
}

/// Asks the API server about one pod (for the CNI plugin, when the watch has not seen it).
#[derive(Clone)]
pub struct Fetcher {
    client: Client,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fetcher")
    }
}

impl Fetcher {
    /// The pod's uid and membership; `None` when the API server has no such pod.
    pub async fn member(&self, key: &PodKey) -> Result<Option<Member>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &key.namespace);
        let pod = api
            .get_opt(&key.name)
            .await
            .with_context(|| format!("getting pod {key} from the API server"))?;
        Ok(pod.map(|p| Member {
            uid: p.metadata.uid.clone(),
            membership: membership(&p).0,
        }))
    }
}

/// What the watch has seen, turned into what the loop needs.
fn publish(pods: &BTreeMap<String, Pod>, fetcher: &Fetcher) -> (Published, Vec<(Pod, String)>) {
    let mut d = Desired::default();
    let mut members = BTreeMap::new();
    let mut notes = Vec::new();
    for pod in pods.values() {
        let (membership, warnings) = membership(pod);
        match &membership {
            Membership::Invalid(e) => notes.push((pod.clone(), e.to_string())),
            Membership::Mesh(_) => {
                notes.extend(warnings.iter().map(|w| (pod.clone(), w.clone())));
                d.warnings.extend(warnings);
            }
            Membership::Outside(_) => {}
        }
        members.insert(
            pod_key(pod),
            Member {
                uid: pod.metadata.uid.clone(),
                membership,
            },
        );
        match pod_to_spec(pod) {
            Ok(Some(spec)) => d.pods.push(spec),
            Ok(None) => {}
            // A pod from the API server always has a name: never held.
            Err(EntryError::Unusable(e) | EntryError::Held(_, e)) => d.rejected.push(e),
            Err(EntryError::Invalid(p)) => {
                d.rejected.push(p.error.clone());
                d.invalid.push(*p);
            }
        }
    }
    let mut published = Published::new(d);
    published.members = members;
    published.fetcher = Some(fetcher.clone());
    (published, notes)
}

/// Records each warning or rejection once per pod (by uid) as a Kubernetes Event on the pod.
struct Recorder {
    client: Client,
    node: String,
    recorded: BTreeSet<(String, String)>,
}

impl Recorder {
    fn record(&mut self, pods: &BTreeMap<String, Pod>, notes: Vec<(Pod, String)>) {
        // Forget pods that are gone, so the set stays the size of the node's pods.
        let identity = |p: &Pod| {
            p.metadata
                .uid
                .clone()
                .unwrap_or_else(|| pod_key(p).to_string())
        };
        let live: BTreeSet<String> = pods.values().map(identity).collect();
        self.recorded.retain(|(id, _)| live.contains(id));
        for (pod, message) in notes {
            let uid = identity(&pod);
            if !self.recorded.insert((uid.clone(), message.clone())) {
                continue;
            }
            let key = pod_key(&pod);
            let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            );
            let event = Event {
                metadata: kube::api::ObjectMeta {
                    generate_name: Some(format!("{}.", key.name)),
                    namespace: Some(key.namespace.clone()),
                    ..Default::default()
                },
                involved_object: ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(key.name.clone()),
                    namespace: Some(key.namespace.clone()),
                    uid: pod.metadata.uid.clone(),
                    ..Default::default()
                },
                reason: Some("RedirectdConfig".into()),
                message: Some(message),
                type_: Some("Warning".into()),
                source: Some(k8s_openapi::api::core::v1::EventSource {
                    component: Some("redirectd".into()),
                    host: Some(self.node.clone()),
                }),
                reporting_component: Some("redirectd".into()),
                reporting_instance: Some(self.node.clone()),
                first_timestamp: Some(now.clone()),
                last_timestamp: Some(now),
                count: Some(1),
                ..Default::default()
            };
            let api: Api<Event> = Api::namespaced(self.client.clone(), &key.namespace);
            tokio::spawn(async move {
                if let Err(e) = api.create(&PostParams::default(), &event).await {
                    log::warn!("recording an Event on pod {key}: {e}");
                }
            });
        }
    }
}

/// Lists and watches this node's pods until the process ends, publishing the desired set
/// after the first full list and after every change. `restarts` counts watch errors.
///
/// The store is the twenty lines of the loop below rather than kube-runtime's `reflector`, on
/// purpose: a relist (`Init` .. `InitDone`) is gathered apart and swapped in whole, so a
/// half-listed node is never published (pods missing from it would lose their capture); the
/// set is a map ordered by `namespace/name`, which `publish` walks in that order so that two
/// equal sets publish equal results; and each event says which pod changed, which the work
/// per change (the scale issue) will use, where a store's snapshot would hide it. The
/// reflector's store swaps at `InitDone` too, but the loop would still have to look at each
/// event to know when to publish, and turn the snapshot's `Vec<Arc<Pod>>` back into the
/// ordered map on every event.
pub async fn run(opts: KubeOptions, tx: PublishedTx, stats: Arc<SourceStats>) -> Result<()> {
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
    let fetcher = Fetcher {
        client: client.clone(),
    };
    let mut recorder = Recorder {
        client: client.clone(),
        node: opts.node_name.clone(),
        recorded: BTreeSet::new(),
    };
    let api: Api<Pod> = Api::all(client);
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node_name));
    let mut stream = watcher(api, wc).default_backoff().boxed();
    let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
    let mut relist: Option<BTreeMap<String, Pod>> = None;
    log::info!("watching the pods of node {}", opts.node_name);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => {
                relist = Some(BTreeMap::new());
                continue;
            }
            Ok(watcher::Event::InitApply(p)) => {
                if let Some(r) = relist.as_mut() {
                    r.insert(pod_key(&p).to_string(), p);
                }
                continue;
            }
            Ok(watcher::Event::InitDone) => pods = relist.take().unwrap_or_default(),
            Ok(watcher::Event::Apply(p)) => {
                pods.insert(pod_key(&p).to_string(), p);
            }
            Ok(watcher::Event::Delete(p)) => {
                pods.remove(&pod_key(&p).to_string());
            }
            Err(e) => {
                stats.watch_restarts.fetch_add(1, Ordering::Relaxed);
                log::warn!("pod watch broke ({e}); re-listing with backoff");
                continue;
            }
        }
        // Every pod's annotations are parsed here: off the async workers' queue.
        let (published, notes) = tokio::task::block_in_place(|| publish(&pods, &fetcher));
        tx.send_replace(Some(published));
        recorder.record(&pods, notes);
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

    /// Linkerd's injected pods: the `linkerd-proxy` container, its `runAsUser`, Linkerd's
    /// annotations; a typo in them, or an Istio sidecar beside it, is a rejected pod.
    #[test]
    fn linkerd_pods() {
        let linkerd = |ann: serde_json::Value| {
            let mut p = base();
            p["metadata"]["annotations"] = ann;
            p["spec"]["containers"] = serde_json::json!([{"name": "app"},
                {"name": "linkerd-proxy", "securityContext": {"runAsUser": 2103}}]);
            pod(p)
        };
        let (m, _) = membership(&linkerd(serde_json::json!({
            "config.linkerd.io/skip-outbound-ports": "5432",
        })));
        let Membership::Mesh(policy) = m else {
            panic!("{m:?}")
        };
        assert_eq!(policy.mesh, crate::policy::mesh::Mesh::Linkerd);
        assert_eq!(policy.proxy_uid, Some(2103));
        assert_eq!(policy.exclude_outbound_ports, [5432].into());
        let (m, _) = membership(&linkerd(serde_json::json!({
            "config.linkerd.io/skip-inbound-ports": "80,http",
        })));
        assert!(matches!(m, Membership::Invalid(_)), "{m:?}");
        let (m, _) = membership(&linkerd(
            serde_json::json!({"sidecar.istio.io/status": "{}"}),
        ));
        let Membership::Invalid(e) = m else {
            panic!("{m:?}")
        };
        assert!(
            e.reason.contains("both an Istio and a Linkerd sidecar"),
            "{e}"
        );
        let (m, _) = membership(&linkerd(serde_json::json!({"redirectd.dev/skip": "true"})));
        assert!(matches!(m, Membership::Outside(_)), "{m:?}");
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
            Box::new(|p| p["status"]["phase"] = "Succeeded".into()),
            Box::new(|p| p["status"]["phase"] = "Failed".into()),
            Box::new(|p| {
                p["spec"]["containers"][0]["name"] = "istio-proxy".into();
                p["spec"]["containers"][0]["args"] =
                    serde_json::json!(["proxy", "router", "--domain", "x"]);
            }),
            Box::new(|p| {
                p["spec"]["containers"] = serde_json::json!([{"name": "istio-proxy",
                    "env": [{"name": "ISTIO_META_INTERCEPTION_MODE", "value": "NONE"}]}]);
            }),
            Box::new(|p| {
                p["metadata"]["annotations"]["proxy.istio.io/config"] =
                    "interceptionMode: NONE\nholdApplicationUntilProxyStarts: true\n".into()
            }),
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
        let Err(EntryError::Invalid(invalid)) = pod_to_spec(&pod(p)) else {
            panic!("a bad annotation must leave the pod known (to keep it captured)");
        };
        let e = &invalid.error;
        assert_eq!(e.pod, "shop/web");
        assert!(e.field.contains("excludeOutboundPorts"), "{e}");
        assert_eq!(invalid.netns, NetnsRef::PodIp("10.0.0.5".parse().unwrap()));
    }

    #[test]
    fn pending_pod_with_an_ip_is_served_before_its_containers_run() {
        let mut p = base();
        p["status"]["phase"] = "Pending".into();
        assert!(pod_to_spec(&pod(p)).unwrap().is_some());
    }

    #[test]
    fn interception_mode_precedence_annotation_then_env_then_proxy_config() {
        let with = |ann: Option<&str>, env: Option<&str>, config: Option<&str>| {
            let mut p = base();
            p["spec"]["containers"] = serde_json::json!([{"name": "app"}, {"name": "istio-proxy",
                "env": env.map(|v| vec![serde_json::json!({"name": "ISTIO_META_INTERCEPTION_MODE", "value": v})]).unwrap_or_default()}]);
            if let Some(a) = ann {
                p["metadata"]["annotations"]["sidecar.istio.io/interceptionMode"] = a.into();
            }
            if let Some(c) = config {
                p["metadata"]["annotations"]["proxy.istio.io/config"] =
                    format!("interceptionMode: {c}\n").into();
            }
            membership(&pod(p)).0
        };
        let mesh = |m: &Membership| matches!(m, Membership::Mesh(_));
        assert!(mesh(&with(None, None, None)), "default REDIRECT");
        assert!(mesh(&with(Some("REDIRECT"), Some("NONE"), Some("NONE"))));
        assert!(!mesh(&with(None, Some("NONE"), Some("REDIRECT"))));
        // TPROXY (from the environment here, over the config's NONE) is served as TPROXY.
        let Membership::Mesh(p) = with(None, Some("TPROXY"), Some("NONE")) else {
            panic!("a TPROXY pod is served");
        };
        assert!(p.tproxy);
        let Membership::Mesh(p) = with(Some("REDIRECT"), Some("TPROXY"), None) else {
            panic!("the annotation wins");
        };
        assert!(!p.tproxy);
        assert!(!mesh(&with(None, None, Some("NONE"))));
        let Membership::Invalid(e) = with(None, Some("REDIRCT"), None) else {
            panic!("a misspelt mode is rejected, not ignored");
        };
        assert!(e.field.contains("ISTIO_META_INTERCEPTION_MODE"), "{e}");
        // A proxy config nested past the limit is refused before it is parsed.
        let deep = format!("{}REDIRECT{}", "[".repeat(100), "]".repeat(100));
        let started = std::time::Instant::now();
        let Membership::Invalid(e) = with(None, None, Some(&deep)) else {
            panic!("a config nested 100 deep is rejected");
        };
        assert!(e.field.contains("proxy.istio.io/config"), "{e}");
        assert!(e.reason.contains("nested deeper than 64"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn owner_groups_from_the_proxy_env_or_proxy_metadata() {
        use annotations::OwnerGroups;
        let with = |env: &[(&str, &str)], metadata: Option<&str>| {
            let mut p = base();
            let env: Vec<_> = env
                .iter()
                .map(|(k, v)| serde_json::json!({"name": k, "value": v}))
                .collect();
            p["spec"]["containers"] =
                serde_json::json!([{"name": "app"}, {"name": "istio-proxy", "env": env}]);
            if let Some(m) = metadata {
                p["metadata"]["annotations"]["proxy.istio.io/config"] = m.into();
            }
            membership(&pod(p)).0
        };
        let groups = |m: Membership| match m {
            Membership::Mesh(p) => p.owner_groups,
            other => panic!("mesh pod expected: {other:?}"),
        };
        assert_eq!(groups(with(&[], None)), OwnerGroups::All);
        let dns = |m: Membership| match m {
            Membership::Mesh(p) => p.dns_capture,
            other => panic!("mesh pod expected: {other:?}"),
        };
        assert!(!dns(with(&[], None)));
        assert!(dns(with(&[("ISTIO_META_DNS_CAPTURE", "true")], None)));
        assert!(dns(with(
            &[],
            Some("proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"True\"\n")
        )));
        assert_eq!(
            groups(with(&[("ISTIO_OUTBOUND_OWNER_GROUPS", "3000")], None)),
            OwnerGroups::Only([3000].into())
        );
        assert_eq!(
            groups(with(
                &[],
                Some("proxyMetadata:\n  ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE: \"4000,4001\"\n")
            )),
            OwnerGroups::AllExcept([4000, 4001].into())
        );
        let Membership::Invalid(e) = with(&[("ISTIO_OUTBOUND_OWNER_GROUPS", "wheel")], None) else {
            panic!("a group name is rejected, not ignored");
        };
        assert!(
            e.field.contains("ISTIO_OUTBOUND_OWNER_GROUPS") && e.reason.contains("wheel"),
            "{e}"
        );
    }

    #[test]
    fn proxy_uid_and_gid_from_the_istio_proxy_security_context() {
        let mut p = base();
        p["spec"]["containers"] = serde_json::json!([{"name": "app"}, {"name": "istio-proxy",
            "securityContext": {"runAsUser": 2001, "runAsGroup": 2002}}]);
        let Membership::Mesh(policy) = membership(&pod(p)).0 else {
            panic!("mesh pod expected");
        };
        assert_eq!(
            (policy.proxy_uid, policy.proxy_gid),
            (Some(2001), Some(2002))
        );
        let Membership::Mesh(policy) = membership(&pod(base())).0 else {
            panic!("mesh pod expected");
        };
        assert_eq!(
            (policy.proxy_uid, policy.proxy_gid),
            (Some(1337), Some(1337))
        );
    }

    #[test]
    fn vm_interfaces_from_both_annotations() {
        let mut p = base();
        p["metadata"]["annotations"]["traffic.sidecar.istio.io/kubevirtInterfaces"] =
            "k6t-a".into();
        p["metadata"]["annotations"]["istio.io/reroute-virtual-interfaces"] = "k6t-b, k6t-a".into();
        let Membership::Mesh(policy) = membership(&pod(p)).0 else {
            panic!("mesh pod expected");
        };
        let names: Vec<&str> = policy.vm_interfaces.iter().map(String::as_str).collect();
        assert_eq!(names, ["k6t-a", "k6t-b"]);
    }
}
