//! The deploy/ manifests parse into their Kubernetes types and satisfy what the DaemonSet
//! needs: privileges, host namespaces, mounts, the node name, probes, requests, and RBAC that
//! can only read pods.

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Container, Namespace, ServiceAccount},
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

fn of_kind<T: serde::de::DeserializeOwned>(docs: &[serde_yaml_ng::Value], kind: &str) -> Vec<T> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .map(|d| serde_yaml_ng::from_value(d.clone()).unwrap_or_else(|e| panic!("{kind}: {e}")))
        .collect()
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
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
    let mounts = c.volume_mounts.as_ref().unwrap();
    let bpffs = mounts
        .iter()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("/sys/fs/bpf mounted");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("Bidirectional"));
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
    let d = docs("redirectd.yaml");
    assert_eq!(of_kind::<Namespace>(&d, "Namespace").len(), 1);
    let sa: Vec<ServiceAccount> = of_kind(&d, "ServiceAccount");
    let sets: Vec<DaemonSet> = of_kind(&d, "DaemonSet");
    assert_eq!(sets.len(), 1);
    let ds = &sets[0];
    let c = check_node_agent(ds, "redirectd");
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
    let metrics = args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-addr="))
        .expect("--metrics-addr");
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
    let main: Vec<DaemonSet> = of_kind(&docs("redirectd.yaml"), "DaemonSet");
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
