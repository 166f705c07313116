//! The deploy/ manifests parse into their Kubernetes types, strictly (a field the type does
//! not have, a typo such as `mountPropogation`, fails: the types alone would drop it), and
//! satisfy what the DaemonSet needs: privileges, host namespaces, mounts, the node name,
//! probes, requests, and RBAC that can only read pods.

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, Namespace, ResourceQuota, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize;

fn docs(file: &str) -> Vec<serde_yaml_ng::Value> {
    let path = format!("{}/../deploy/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde_yaml_ng::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// The paths of `original` that `typed` (the same document after a round trip through its
/// Kubernetes type) lacks: fields the type does not know.
fn unknown_fields(
    original: &serde_yaml_ng::Value,
    typed: &serde_yaml_ng::Value,
    at: &str,
) -> Vec<String> {
    use serde_yaml_ng::Value;
    match (original, typed) {
        (Value::Mapping(o), Value::Mapping(t)) => o
            .iter()
            .filter(|(_, v)| !v.is_null())
            .flat_map(|(k, v)| {
                let key = k.as_str().unwrap_or("?");
                let path = format!("{at}.{key}");
                match t.get(k) {
                    Some(tv) => unknown_fields(v, tv, &path),
                    None => vec![path],
                }
            })
            .collect(),
        (Value::Sequence(o), Value::Sequence(t)) => o
            .iter()
            .zip(t)
            .enumerate()
            .flat_map(|(i, (v, tv))| unknown_fields(v, tv, &format!("{at}[{i}]")))
            .collect(),
        _ => Vec::new(),
    }
}

/// Parses `doc` as `T`, failing on any field `T` does not have.
fn strict<T: serde::de::DeserializeOwned + serde::Serialize>(
    doc: &serde_yaml_ng::Value,
) -> Result<T, String> {
    let typed: T = serde_yaml_ng::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_yaml_ng::to_value(&typed).map_err(|e| e.to_string())?;
    let unknown = unknown_fields(doc, &back, "");
    if unknown.is_empty() {
        Ok(typed)
    } else {
        Err(format!("unknown fields: {}", unknown.join(", ")))
    }
}

fn of_kind<T: serde::de::DeserializeOwned + serde::Serialize>(
    docs: &[serde_yaml_ng::Value],
    kind: &str,
) -> Vec<T> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .map(|d| strict(d).unwrap_or_else(|e| panic!("{kind}: {e}")))
        .collect()
}

/// The metadata of the DaemonSet's pod template.
fn pod_meta(ds: &DaemonSet) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    ds.spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
}

/// The container named `name` of the DaemonSet's pod.
fn container<'a>(ds: &'a DaemonSet, name: &str) -> &'a Container {
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    pod.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The host path behind the volume mounted at `mount_path` in container `c`.
fn host_path_of(ds: &DaemonSet, c: &Container, mount_path: &str) -> String {
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == mount_path)
        .unwrap_or_else(|| panic!("{} mounts {mount_path}", c.name));
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == m.name)
        .and_then(|v| v.host_path.as_ref())
        .map(|h| h.path.clone())
        .unwrap_or_else(|| panic!("{mount_path} is a hostPath"))
}

fn arg<'a>(c: &'a Container, flag: &str) -> &'a str {
    c.args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix(&format!("{flag}=")))
        .unwrap_or_else(|| panic!("{flag} in {}'s args", c.name))
}

fn check_node_agent<'a>(ds: &'a DaemonSet, name: &str) -> &'a Container {
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true), "hostNetwork");
    assert_eq!(
        pod.host_pid,
        Some(true),
        "hostPID (netns resolution through /proc)"
    );
    let c = container(ds, name);
    let mounts = c.volume_mounts.as_ref().unwrap();
    let bpffs = mounts
        .iter()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("/sys/fs/bpf mounted");
    // The daemon's pins are on the host's bpffs: it sees the host's mounts (HostToContainer,
    // which needs the host's mount shared: mount-bpffs makes it so). No container propagates
    // mounts back to the host (uninstall only removes pins: a plain bind of the host's bpffs).
    let privileged = c.security_context.as_ref().and_then(|s| s.privileged) == Some(true);
    let propagation = bpffs.mount_propagation.as_deref();
    assert!(
        matches!(
            (privileged, propagation),
            (true, None) | (false, Some("HostToContainer"))
        ),
        "{name}: privileged {privileged}, /sys/fs/bpf propagation {propagation:?}"
    );
    let volumes = pod.volumes.as_ref().unwrap();
    let host = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    assert_eq!(host(&bpffs.name).as_deref(), Some("/sys/fs/bpf"));
    assert!(
        c.resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .is_some(),
        "resource requests"
    );
    c
}

#[test]
fn daemonset_and_rbac() {
    let d = docs("base/redirectd.yaml");
    assert_eq!(of_kind::<Namespace>(&d, "Namespace").len(), 1);
    let sa: Vec<ServiceAccount> = of_kind(&d, "ServiceAccount");
    let sets: Vec<DaemonSet> = of_kind(&d, "DaemonSet");
    assert_eq!(sets.len(), 1);
    let ds = &sets[0];
    let c = check_node_agent(ds, "redirectd");
    // A list of capabilities, not privileged (the reasons are in the manifest).
    let sc = c.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added = caps.add.clone().unwrap();
    for cap in ["SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"] {
        assert!(added.iter().any(|a| a == cap), "{cap} in {added:?}");
    }
    // Not needed on any kernel the daemon runs on, and not grantable on every host.
    assert!(!added.iter().any(|a| a == "SYS_RESOURCE"), "{added:?}");
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let init = pod
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "mount-bpffs")
        .expect("mount-bpffs");
    assert_eq!(
        init.security_context.as_ref().unwrap().privileged,
        Some(true)
    );
    // It prepares the host in the host's mount namespace (pid 1's), with redirectd's own
    // system calls: it mounts nothing of the pod's.
    assert_eq!(
        init.args
            .as_deref()
            .and_then(|a| a.first())
            .map(String::as_str),
        Some("prepare-host")
    );
    assert!(init.volume_mounts.as_deref().unwrap_or_default().is_empty());
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("Unconfined")
    );
    let annotations = pod_meta(ds).annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations
            .get("container.apparmor.security.beta.kubernetes.io/redirectd")
            .map(String::as_str),
        Some("unconfined")
    );
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(
        pod.service_account_name.as_deref(),
        sa[0].metadata.name.as_deref()
    );

    // The host's cgroup v2 mount, and the daemon pointed at it.
    let mounts = c.volume_mounts.as_ref().unwrap();
    let cg = mounts
        .iter()
        .find(|m| m.mount_path == "/host/sys/fs/cgroup")
        .expect("cgroup mount");
    let volumes = pod.volumes.as_ref().unwrap();
    let cg_vol = volumes.iter().find(|v| v.name == cg.name).unwrap();
    assert_eq!(cg_vol.host_path.as_ref().unwrap().path, "/sys/fs/cgroup");
    let args = c.args.as_ref().unwrap();
    for want in ["run", "--kubernetes", "--cgroup=/host/sys/fs/cgroup"] {
        assert!(args.iter().any(|a| a == want), "{want} in {args:?}");
    }
    // The metrics address comes from the ConfigMap the container reads as environment.
    let config: Vec<ConfigMap> = of_kind(&d, "ConfigMap");
    let from_config = c
        .env_from
        .iter()
        .flatten()
        .filter_map(|e| e.config_map_ref.as_ref())
        .any(|r| r.name == "redirectd-config");
    assert!(
        from_config,
        "redirectd reads the redirectd-config ConfigMap"
    );
    let metrics = config[0].data.as_ref().unwrap()["REDIRECTD_METRICS_ADDR"].clone();
    let port: i32 = metrics.rsplit(':').next().unwrap().parse().unwrap();

    // Node name from the downward API.
    let env = c.env.as_ref().unwrap();
    let node = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");

    // Probes on the daemon's own endpoints and port.
    for (probe, path) in [
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port)
        );
    }

    // The CNI plugin: the installer writes into the host's CNI dirs and tells the plugin the
    // daemon's socket, which the daemon serves in a host directory (the plugin runs on the
    // host, where the runtime calls it).
    let installer = container(ds, "install-cni");
    assert_eq!(
        installer.args.as_ref().unwrap()[..3],
        ["cni", "install", "--watch"]
    );
    assert_eq!(
        host_path_of(ds, installer, arg(installer, "--bin-dir")),
        "/opt/cni/bin"
    );
    assert_eq!(
        host_path_of(ds, installer, arg(installer, "--conf-dir")),
        "/etc/cni/net.d"
    );
    let socket = arg(c, "--cni-socket");
    assert_eq!(
        arg(installer, "--socket"),
        socket,
        "the plugin finds the daemon's socket"
    );
    let socket_dir = std::path::Path::new(socket)
        .parent()
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(
        host_path_of(ds, c, socket_dir),
        socket_dir,
        "the socket is on the host"
    );
    assert!(arg(installer, "--exclude-namespaces")
        .split(',')
        .any(|n| n == "kube-system"));
    // The daemon's own namespace is excluded through the downward API.
    let own = installer
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_NAMESPACE")
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(own.as_deref(), Some("metadata.namespace"));

    // RBAC: read pods, record events, nothing else.
    let roles: Vec<ClusterRole> = of_kind(&d, "ClusterRole");
    assert_eq!(roles.len(), 1);
    let mut rules: Vec<(String, Vec<String>)> = roles[0]
        .rules
        .as_ref()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r.api_groups.as_deref(), Some(&[String::new()][..]));
            let mut verbs = r.verbs.clone();
            verbs.sort();
            (r.resources.as_ref().unwrap().join(","), verbs)
        })
        .collect();
    rules.sort();
    assert_eq!(
        rules,
        [
            ("events".to_string(), vec!["create".to_string()]),
            (
                "pods".to_string(),
                vec!["get".into(), "list".into(), "watch".into()]
            ),
        ]
    );
    let bindings: Vec<ClusterRoleBinding> = of_kind(&d, "ClusterRoleBinding");
    assert_eq!(
        bindings[0].role_ref.name,
        roles[0].metadata.name.clone().unwrap()
    );
    let subject = &bindings[0].subjects.as_ref().unwrap()[0];
    assert_eq!(Some(&subject.name), sa[0].metadata.name.as_ref());
}

#[test]
fn uninstall_daemonset_runs_redirectd_uninstall() {
    let d = docs("uninstall.yaml");
    let sets: Vec<DaemonSet> = of_kind(&d, "DaemonSet");
    let c = check_node_agent(&sets[0], "uninstall");
    let command = c.command.as_ref().unwrap().join(" ");
    assert!(
        command.contains("redirectd uninstall --pin-dir=/sys/fs/bpf/redirect"),
        "{command}"
    );
    assert!(
        command.contains(
            "redirectd cni uninstall --bin-dir=/host/opt/cni/bin --conf-dir=/host/etc/cni/net.d"
        ),
        "{command}"
    );
    assert_eq!(
        host_path_of(&sets[0], c, "/host/opt/cni/bin"),
        "/opt/cni/bin"
    );
    assert_eq!(
        host_path_of(&sets[0], c, "/host/etc/cni/net.d"),
        "/etc/cni/net.d"
    );
    let main: Vec<DaemonSet> = of_kind(&docs("base/redirectd.yaml"), "DaemonSet");
    let args = main[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .find(|c| c.name == "redirectd")
        .unwrap()
        .args
        .clone()
        .unwrap();
    assert!(
        args.iter().any(|a| a == "--pin-dir=/sys/fs/bpf/redirect"),
        "the same pin dir"
    );
}

/// The Istio installation that goes with redirect-cni: the injector's CNI mode (so it emits
/// istio-validation, never istio-init), without Istio's own CNI node agent.
#[test]
fn istio_cni_mode_settings() {
    let d = docs("istio/istio-cni-mode.yaml");
    assert_eq!(d.len(), 1);
    let op = &d[0];
    assert_eq!(op["kind"], "IstioOperator");
    assert_eq!(op["spec"]["values"]["pilot"]["cni"]["enabled"], true);
    assert_eq!(op["spec"]["components"]["cni"]["enabled"], false);
}

/// The strict parse of one object of a kind with a Kubernetes type.
fn strict_any(d: &serde_yaml_ng::Value) -> Result<(), String> {
    match d["kind"].as_str().unwrap_or_default() {
        "Namespace" => strict::<Namespace>(d).map(|_| ()),
        "ServiceAccount" => strict::<ServiceAccount>(d).map(|_| ()),
        "ClusterRole" => strict::<ClusterRole>(d).map(|_| ()),
        "ClusterRoleBinding" => strict::<ClusterRoleBinding>(d).map(|_| ()),
        "DaemonSet" => strict::<DaemonSet>(d).map(|_| ()),
        "ConfigMap" => strict::<ConfigMap>(d).map(|_| ()),
        "ResourceQuota" => strict::<ResourceQuota>(d).map(|_| ()),
        "Service" => strict::<Service>(d).map(|_| ()),
        other => Err(format!("no strict check for kind {other:?}")),
    }
}

/// `kubectl kustomize deploy/<dir>` (offline), as documents.
fn kustomize(dir: &str) -> Vec<serde_yaml_ng::Value> {
    let path = format!("{}/../deploy/{dir}", env!("CARGO_MANIFEST_DIR"));
    let text = redirect_lab::run("kubectl", &["kustomize", &path]).unwrap_or_else(|e| {
        panic!("kubectl kustomize {dir} (kubectl with kustomize is needed): {e:#}")
    });
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde_yaml_ng::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [serde_yaml_ng::Value], kind: &str, name: &str) -> &'a serde_yaml_ng::Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The metric names redirectd exports (every `redirect_*` name its metrics module defines).
fn exported_metrics() -> std::collections::BTreeSet<String> {
    let src = std::fs::read_to_string(format!(
        "{}/../redirect-user/src/observe/metrics.rs",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    src.split('"')
        .filter(|s| {
            s.starts_with("redirect_") && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        })
        .map(String::from)
        .collect()
}

/// The `redirect_*` names an expression uses, each of which must be exported.
fn unknown_metrics(expr: &str, known: &std::collections::BTreeSet<String>) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("redirect_"))
        .filter(|w| !known.contains(*w))
        .map(String::from)
        .collect()
}

/// The base and every overlay render with `kubectl kustomize`, every object with a Kubernetes
/// type passes the strict parse, the base keeps the metrics on loopback, and the monitoring
/// overlay opens them with a Service, a PodMonitor, alert rules and a dashboard that name
/// only metrics redirectd exports.
#[test]
fn every_kustomization_renders_strictly() {
    let base = kustomize("base");
    let monitoring = kustomize("overlays/monitoring");
    for (dir, docs) in [("base", &base), ("overlays/monitoring", &monitoring)] {
        for d in docs.iter() {
            let kind = d["kind"].as_str().unwrap_or_default();
            if matches!(kind, "PodMonitor" | "PrometheusRule") {
                continue;
            }
            strict_any(d).unwrap_or_else(|e| panic!("{dir} {kind}: {e}"));
        }
    }
    let addr = |docs: &[serde_yaml_ng::Value]| {
        find(docs, "ConfigMap", "redirectd-config")["data"]["REDIRECTD_METRICS_ADDR"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        addr(&base),
        "127.0.0.1:15080",
        "not open on the node's network by default"
    );
    assert_eq!(addr(&monitoring), "0.0.0.0:15080");
    // Every setting of the ConfigMap is one redirectd reads (a typo would be ignored).
    let help = redirect_lab::run(
        &redirect_lab::bin("redirectd").to_string_lossy(),
        &["run", "--help"],
    )
    .unwrap();
    for key in find(&base, "ConfigMap", "redirectd-config")["data"]
        .as_mapping()
        .unwrap()
        .keys()
    {
        let key = key.as_str().unwrap();
        assert!(
            help.contains(&format!("[env: {key}")),
            "redirectd reads no {key}: {help}"
        );
    }
    let ds: DaemonSet = strict(find(&base, "DaemonSet", "redirectd")).unwrap();
    let c = container(&ds, "redirectd");
    assert!(
        !c.args
            .iter()
            .flatten()
            .any(|a| a.starts_with("--metrics-addr")),
        "a flag would override the ConfigMap"
    );
    for probe in [&c.liveness_probe, &c.readiness_probe] {
        let h = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(h.host.as_deref(), Some("127.0.0.1"));
    }
    let pod_labels = pod_meta(&ds).labels.clone().unwrap();
    let port_names: Vec<String> = c
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.clone())
        .collect();
    // The Service and the PodMonitor find the daemon's pods and port.
    let svc: Service = strict(find(&monitoring, "Service", "redirectd-metrics")).unwrap();
    let spec = svc.spec.unwrap();
    for (k, v) in spec.selector.unwrap() {
        assert_eq!(pod_labels.get(&k), Some(&v), "Service selector {k}");
    }
    let pm = find(&monitoring, "PodMonitor", "redirectd");
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(
            pod_labels.get(k.as_str().unwrap()).map(String::as_str),
            v.as_str()
        );
    }
    let pm_port = pm["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    assert!(
        port_names.iter().any(|p| p == pm_port),
        "PodMonitor port {pm_port}"
    );
    // Alerts and dashboard use exported metrics only, with our label names.
    let known = exported_metrics();
    assert!(known.contains("redirect_connections_total") && known.contains("redirect_build_info"));
    let rules = find(&monitoring, "PrometheusRule", "redirectd");
    let alerts: Vec<&serde_yaml_ng::Value> = rules["spec"]["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .collect();
    let names: Vec<&str> = alerts.iter().filter_map(|r| r["alert"].as_str()).collect();
    for want in [
        "RedirectdFailOpen",
        "RedirectdOriginalDstEvicted",
        "RedirectdReconcileErrors",
    ] {
        assert!(names.contains(&want), "alert {want}: {names:?}");
    }
    for r in &alerts {
        let expr = r["expr"].as_str().unwrap();
        assert!(unknown_metrics(expr, &known).is_empty(), "{expr}");
        assert!(
            !expr.contains("namespace=") && !expr.contains("pod="),
            "{expr}"
        );
    }
    let dash = find(&monitoring, "ConfigMap", "redirectd-dashboard");
    assert_eq!(
        dash["metadata"]["labels"]["grafana_dashboard"].as_str(),
        Some("1")
    );
    let json: serde_json::Value =
        serde_json::from_str(dash["data"]["redirectd.json"].as_str().unwrap()).unwrap();
    let panels = json["panels"].as_array().unwrap();
    assert!(panels.len() >= 6);
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            assert!(unknown_metrics(expr, &known).is_empty(), "{expr}");
        }
    }
    // Admission: Pod Security lets it in, the quota admits its priority class, Linux nodes.
    let ns = find(&base, "Namespace", "redirect-system");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str(),
        Some("privileged")
    );
    let quota: ResourceQuota =
        strict(find(&base, "ResourceQuota", "redirectd-critical-pods")).unwrap();
    let scope = quota
        .spec
        .unwrap()
        .scope_selector
        .unwrap()
        .match_expressions
        .unwrap();
    assert_eq!(
        scope[0].values.as_deref(),
        Some(&["system-node-critical".to_string()][..])
    );
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(
        pod.node_selector
            .as_ref()
            .unwrap()
            .get("kubernetes.io/os")
            .map(String::as_str),
        Some("linux")
    );
    assert!(pod
        .tolerations
        .iter()
        .flatten()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
}

/// Every Kubernetes object of deploy/ passes the strict parse, and the strict parse catches a
/// misspelt field the types alone would have dropped.
#[test]
fn manifests_have_no_unknown_fields() {
    for file in ["base/redirectd.yaml", "uninstall.yaml"] {
        for d in docs(file) {
            let kind = d["kind"].as_str().unwrap_or_default().to_string();
            strict_any(&d).unwrap_or_else(|e| panic!("{file} {kind}: {e}"));
        }
    }
    let mut ds = docs("base/redirectd.yaml")
        .into_iter()
        .find(|d| d["kind"].as_str() == Some("DaemonSet"))
        .unwrap();
    let mounts = &mut ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0];
    mounts["mountPropogation"] = "Bidirectional".into();
    let e = strict::<DaemonSet>(&ds).unwrap_err();
    assert!(e.contains("volumeMounts[0].mountPropogation"), "{e}");
}
