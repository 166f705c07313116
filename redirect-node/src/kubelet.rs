//! Plays kubelet for one pod of a rendered manifest (a DaemonSet's template), on a [`Node`]:
//! the pod spec is read from what `kubectl kustomize` (or the file) gives, never written a
//! second time by hand, and turned into the CRI calls kubelet makes: the sandbox (host
//! network and pid namespaces, privileged when a container is), hostPath volumes checked or
//! created by their type and mounted with their propagation, init containers run in order to
//! completion, then the containers with their command and args, env (values, the ConfigMaps
//! of the rendering, the downward API), resources and securityContext (capabilities,
//! privilege, seccomp, kubelet's masked and read-only /proc paths). A supervisor thread
//! then does what kubelet does while the pod runs: restarts a container that exits
//! (restartPolicy Always) or whose liveness probe fails `failureThreshold` times, and keeps
//! each container's readiness from its readiness probe.
//!
//! What kubelet does that this does not: image pulls (the images are imported), the service
//! account token (no API server exists here: the one stand-in, [`StandIns::extra_args`],
//! points the daemon at the fake one), exponential crash back-off beyond 10 s, and probes
//! other than HTTP GET (the manifests use none).

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use k8s_cri::v1::{
    security_profile::ProfileType, Capability, ContainerConfig, ContainerMetadata, ContainerState,
    ImageSpec, KeyValue, LinuxContainerConfig, LinuxContainerResources,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount,
    MountPropagation, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    SecurityProfile,
};
use serde_json::Value;

use crate::{cri::Cri, Node, Pod};

/// What stands in for the parts of a cluster this machine does not have.
pub struct StandIns {
    /// The node's name (`spec.nodeName`).
    pub node_name: String,
    /// Arguments added to a container's (by container name): the fake API server's URL in
    /// place of the service account kubelet would mount.
    pub extra_args: Vec<(String, String)>,
}

/// `kubectl kustomize <dir>`, as JSON documents.
pub fn kustomize(dir: &Path) -> Result<Vec<Value>> {
    let text = redirect_lab::output(
        std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(dir),
    )
    .with_context(|| {
        format!(
            "kubectl kustomize {} (kubectl with kustomize is needed: `cargo xtask setup`)",
            dir.display()
        )
    })?;
    yaml_documents(&text)
}

/// The documents of a YAML stream, as JSON.
pub fn yaml_documents(text: &str) -> Result<Vec<Value>> {
    use serde::Deserialize as _;
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v = Value::deserialize(doc).context("parsing YAML")?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// A probe kubelet makes (HTTP GET; the manifests use no other kind).
#[derive(Clone, Debug)]
struct Probe {
    host: Option<String>,
    port: u16,
    path: String,
    initial_delay: Duration,
    period: Duration,
    failure_threshold: u32,
}

impl Probe {
    /// Is this probe due, for a container started at `started` and last probed at `last`?
    fn due(&self, started: Instant, last: Option<Instant>, now: Instant) -> bool {
        now >= started + self.initial_delay && last.is_none_or(|t| now >= t + self.period)
    }

    fn parse(c: &Value, which: &str) -> Result<Option<Self>> {
        let p = &c[which];
        if p.is_null() {
            return Ok(None);
        }
        let get = &p["httpGet"];
        if get.is_null() {
            bail!("{which}: only httpGet probes are supported here");
        }
        let port = match &get["port"] {
            Value::Number(n) => n.as_u64().context("probe port")? as u16,
            Value::String(name) => c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == name.as_str())
                .and_then(|p| p["containerPort"].as_u64())
                .with_context(|| format!("{which}: no port named {name}"))?
                as u16,
            other => bail!("{which}: port {other}"),
        };
        let secs = |k: &str, default: u64| Duration::from_secs(p[k].as_u64().unwrap_or(default));
        Ok(Some(Self {
            host: get["host"].as_str().map(String::from),
            port,
            path: get["path"].as_str().unwrap_or("/").to_string(),
            initial_delay: secs("initialDelaySeconds", 0),
            period: secs("periodSeconds", 10),
            failure_threshold: p["failureThreshold"].as_u64().unwrap_or(3) as u32,
        }))
    }
}

/// One of the pod's long-running containers, as the supervisor keeps it.
struct Managed {
    name: String,
    /// The config it is created from (its attempt set at each creation).
    config: ContainerConfig,
    id: String,
    attempt: u32,
    started: Instant,
    liveness: Option<Probe>,
    readiness: Option<Probe>,
    live_failures: u32,
    last_liveness: Option<Instant>,
    last_readiness: Option<Instant>,
    ready: bool,
    /// Why it was restarted, each time.
    restarts: Vec<String>,
    /// Crash back-off: not restarted before this.
    not_before: Option<Instant>,
}

/// The pod's state the supervisor shares with the test.
struct Shared {
    containers: Vec<Managed>,
    /// The supervisor's last error, if a restart failed.
    error: Option<String>,
}

/// A running pod of a manifest; its supervisor stops when it is dropped (the pod itself is
/// removed with the node, or by [`ManifestPod::delete`]).
pub struct ManifestPod {
    pub pod: Pod,
    /// Each init container's name and exit code, in the order they ran.
    pub init_exits: Vec<(String, i32)>,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    supervisor: Option<JoinHandle<()>>,
}

/// The template of DaemonSet `name` in the rendering, and its namespace.
fn daemonset<'a>(docs: &'a [Value], name: &str) -> Result<(&'a Value, String)> {
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == name)
        .with_context(|| format!("no DaemonSet {name} in the rendering"))?;
    let ns = ds["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    Ok((&ds["spec"]["template"], ns))
}

/// The environment kubelet gives a container: `envFrom` ConfigMaps first, then `env`
/// (values, ConfigMap keys, the downward API's fields).
fn environment(
    c: &Value,
    docs: &[Value],
    namespace: &str,
    fields: &BTreeMap<&str, String>,
) -> Result<Vec<KeyValue>> {
    let config_map = |name: &str| {
        docs.iter()
            .find(|d| {
                d["kind"] == "ConfigMap"
                    && d["metadata"]["name"] == name
                    && d["metadata"]["namespace"].as_str().unwrap_or("default") == namespace
            })
            .with_context(|| format!("ConfigMap {namespace}/{name} is not in the rendering"))
    };
    let mut env: Vec<KeyValue> = Vec::new();
    let mut set = |key: &str, value: String| {
        env.retain(|kv| kv.key != key);
        env.push(KeyValue {
            key: key.into(),
            value,
        });
    };
    for from in c["envFrom"].as_array().into_iter().flatten() {
        let name = from["configMapRef"]["name"]
            .as_str()
            .context("envFrom: only configMapRef is supported here")?;
        let prefix = from["prefix"].as_str().unwrap_or("");
        for (k, v) in config_map(name)?["data"].as_object().into_iter().flatten() {
            set(
                &format!("{prefix}{k}"),
                v.as_str().unwrap_or_default().into(),
            );
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let key = e["name"].as_str().context("env without a name")?;
        let from = &e["valueFrom"];
        let value = if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
            fields
                .get(path)
                .cloned()
                .with_context(|| format!("env {key}: fieldRef {path} is not supported here"))?
        } else if let Some(r) = from.get("configMapKeyRef") {
            let name = r["name"].as_str().context("configMapKeyRef name")?;
            let k = r["key"].as_str().context("configMapKeyRef key")?;
            config_map(name)?["data"][k]
                .as_str()
                .with_context(|| format!("env {key}: ConfigMap {name} has no key {k}"))?
                .to_string()
        } else if from.is_null() {
            e["value"].as_str().unwrap_or_default().to_string()
        } else {
            bail!("env {key}: {from} is not supported here");
        };
        set(key, value);
    }
    Ok(env)
}

/// A Kubernetes quantity of bytes (`256Mi`, `1G`, `1000`).
fn bytes(q: &str) -> Result<i64> {
    let units = [
        ("Ki", 1i64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    for (suffix, mult) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return Ok(n.parse::<i64>().with_context(|| format!("quantity {q}"))? * mult);
        }
    }
    q.parse().with_context(|| format!("quantity {q}"))
}

/// A Kubernetes CPU quantity in millicores (`50m`, `1`).
fn millicores(q: &str) -> Result<i64> {
    match q.strip_suffix('m') {
        Some(m) => m.parse().with_context(|| format!("quantity {q}")),
        None => Ok((q.parse::<f64>().with_context(|| format!("quantity {q}"))? * 1000.0) as i64),
    }
}

/// The resources kubelet gives a container: CPU shares from the request, a CFS quota from
/// the CPU limit, the memory limit.
fn resources(c: &Value) -> Result<LinuxContainerResources> {
    let r = &c["resources"];
    let mut out = LinuxContainerResources::default();
    // kubelet's MilliCPUToShares: 2 shares at least, 1024 a core.
    let request = r["requests"]["cpu"].as_str().map(millicores).transpose()?;
    out.cpu_shares = request.map_or(2, |m| (m * 1024 / 1000).max(2));
    if let Some(limit) = r["limits"]["cpu"].as_str() {
        out.cpu_period = 100_000;
        out.cpu_quota = millicores(limit)? * 100;
    }
    if let Some(mem) = r["limits"]["memory"].as_str() {
        out.memory_limit_in_bytes = bytes(mem)?;
    }
    Ok(out)
}

/// kubelet's defaults for a container that is not privileged (`/proc` entries hidden or
/// read-only: why the daemon is given the host's /proc/sys/net separately).
const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

fn namespaces(spec: &Value) -> NamespaceOption {
    let mode = |host: &str| {
        if spec[host] == true {
            NamespaceMode::Node as i32
        } else {
            NamespaceMode::Pod as i32
        }
    };
    NamespaceOption {
        network: mode("hostNetwork"),
        pid: mode("hostPID"),
        ipc: mode("hostIPC"),
        ..Default::default()
    }
}

/// The strings of a JSON list (none when it is not one).
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(String::from))
        .collect()
}

fn security_context(c: &Value, spec: &Value) -> Result<LinuxContainerSecurityContext> {
    let sc = &c["securityContext"];
    let privileged = sc["privileged"] == true;
    let seccomp = match sc["seccompProfile"]["type"]
        .as_str()
        .or(spec["securityContext"]["seccompProfile"]["type"].as_str())
    {
        // kubelet's default without the SeccompDefault feature: unconfined.
        None | Some("Unconfined") => ProfileType::Unconfined,
        Some("RuntimeDefault") => ProfileType::RuntimeDefault,
        Some(other) => bail!("seccompProfile {other} is not supported here"),
    };
    let int = |k: &str| {
        sc[k]
            .as_i64()
            .or(spec["securityContext"][k].as_i64())
            .map(|value| k8s_cri::v1::Int64Value { value })
    };
    Ok(LinuxContainerSecurityContext {
        capabilities: Some(Capability {
            add_capabilities: strings(&sc["capabilities"]["add"]),
            drop_capabilities: strings(&sc["capabilities"]["drop"]),
            ..Default::default()
        }),
        privileged,
        namespace_options: Some(namespaces(spec)),
        run_as_user: int("runAsUser"),
        run_as_group: int("runAsGroup"),
        readonly_rootfs: sc["readOnlyRootFilesystem"] == true,
        no_new_privs: sc["allowPrivilegeEscalation"] == false,
        masked_paths: if privileged {
            Vec::new()
        } else {
            MASKED_PATHS.iter().map(|s| s.to_string()).collect()
        },
        readonly_paths: if privileged {
            Vec::new()
        } else {
            READONLY_PATHS.iter().map(|s| s.to_string()).collect()
        },
        seccomp: Some(SecurityProfile {
            profile_type: seccomp as i32,
            ..Default::default()
        }),
        ..Default::default()
    })
}

impl Node {
    /// Checks or creates a hostPath volume's path on the node by its `type`, as kubelet does.
    fn host_path(&self, volume: &Value) -> Result<String> {
        let hp = &volume["hostPath"];
        let path = hp["path"].as_str().context("hostPath without a path")?;
        // In the node's mount namespace: its symlinks (/var/run) resolve to its own /run.
        let (cmd, fail) = match hp["type"].as_str().unwrap_or("") {
            "DirectoryOrCreate" => (vec!["mkdir", "-p", path], "could not be created"),
            "Directory" => (vec!["test", "-d", path], "is not a directory"),
            "" => (vec!["true"], ""),
            other => bail!("hostPath {path}: type {other} is not supported here"),
        };
        if self.in_node(&cmd).is_err() {
            bail!("hostPath type check failed: {path} {fail}");
        }
        Ok(path.to_string())
    }

    /// The CRI container config for container `c` of pod spec `spec`.
    fn container_config(
        &self,
        c: &Value,
        spec: &Value,
        volumes: &BTreeMap<String, String>,
        env: Vec<KeyValue>,
        stand_ins: &StandIns,
        attempt: u32,
    ) -> Result<ContainerConfig> {
        let name = c["name"].as_str().context("a container without a name")?;
        let image = c["image"]
            .as_str()
            .context("a container without an image")?;
        if image != self.image {
            bail!("container {name}: image {image} is not on the node (imported: {}; imagePullPolicy IfNotPresent and no registry)", self.image);
        }
        let mut args = strings(&c["args"]);
        args.extend(
            stand_ins
                .extra_args
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, a)| a.clone()),
        );
        let mut mounts = Vec::new();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let vol = m["name"].as_str().context("volumeMount without a name")?;
            let host = volumes.get(vol).with_context(|| {
                format!("container {name}: volume {vol} is not a hostPath volume of the pod")
            })?;
            let propagation = match m["mountPropagation"].as_str() {
                None | Some("None") => MountPropagation::PropagationPrivate,
                Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
                Some("Bidirectional") => MountPropagation::PropagationBidirectional,
                Some(other) => bail!("container {name}: mountPropagation {other}"),
            };
            mounts.push(Mount {
                container_path: m["mountPath"].as_str().context("mountPath")?.into(),
                host_path: host.clone(),
                readonly: m["readOnly"] == true,
                propagation: propagation as i32,
                ..Default::default()
            });
        }
        Ok(ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt,
            }),
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            command: strings(&c["command"]),
            args,
            working_dir: c["workingDir"].as_str().unwrap_or_default().into(),
            envs: env,
            mounts,
            log_path: format!("{name}_{attempt}.log"),
            linux: Some(LinuxContainerConfig {
                resources: Some(resources(c)?),
                security_context: Some(security_context(c, spec)?),
            }),
            ..Default::default()
        })
    }

    /// Runs the pod of DaemonSet `name` from `docs` (a rendering) as kubelet would on this
    /// node: returns once its init containers have all exited 0 and its containers are
    /// started; its supervisor then keeps them running.
    pub fn run_daemonset(
        &mut self,
        docs: &[Value],
        name: &str,
        stand_ins: &StandIns,
    ) -> Result<ManifestPod> {
        let (template, namespace) = daemonset(docs, name)?;
        let spec = &template["spec"];
        let pod_name = format!("{name}-{}", stand_ins.node_name);
        let uid = format!("uid-{pod_name}");
        let mut volumes = BTreeMap::new();
        for v in spec["volumes"].as_array().into_iter().flatten() {
            let vname = v["name"].as_str().context("a volume without a name")?;
            if !v["hostPath"].is_null() {
                volumes.insert(vname.to_string(), self.host_path(v)?);
            }
        }
        let containers: Vec<&Value> = spec["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();
        let inits: Vec<&Value> = spec["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();
        let privileged = containers
            .iter()
            .chain(&inits)
            .any(|c| c["securityContext"]["privileged"] == true);
        let logs = self
            .dir
            .join("logs")
            .join(format!("{namespace}_{pod_name}_{uid}"));
        std::fs::create_dir_all(&logs)?;
        let string_map = |v: &Value| {
            v.as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        };
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: pod_name.clone(),
                uid,
                namespace: namespace.clone(),
                attempt: 0,
            }),
            hostname: if spec["hostNetwork"] == true {
                String::new()
            } else {
                pod_name.clone()
            },
            log_directory: logs.display().to_string(),
            labels: string_map(&template["metadata"]["labels"]),
            annotations: string_map(&template["metadata"]["annotations"]),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.system_cgroup_parent.clone(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces(spec)),
                    privileged,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = self.cri.run_pod_sandbox(config.clone())?;
        let pod = Pod { id, config };
        let pod_ip = self
            .cri
            .pod_ips(&pod.id)
            .ok()
            .and_then(|ips| ips.into_iter().next());
        let fields: BTreeMap<&str, String> = [
            ("metadata.name", pod_name.clone()),
            ("metadata.namespace", namespace.clone()),
            ("spec.nodeName", stand_ins.node_name.clone()),
            (
                "spec.serviceAccountName",
                spec["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default")
                    .into(),
            ),
            ("status.podIP", pod_ip.clone().unwrap_or_default()),
        ]
        .into_iter()
        .collect();

        let mut init_exits = Vec::new();
        for c in &inits {
            let env = environment(c, docs, &namespace, &fields)?;
            let cfg = self.container_config(c, spec, &volumes, env, stand_ins, 0)?;
            let cname = c["name"].as_str().unwrap_or_default().to_string();
            let id = self.cri.start_container(&pod.id, cfg, &pod.config)?;
            let code = self.cri.wait_exited(&id, Duration::from_secs(60))?;
            init_exits.push((cname.clone(), code));
            if code != 0 {
                let log = std::fs::read_to_string(logs.join(format!("{cname}_0.log")))
                    .unwrap_or_default();
                bail!("init container {cname} exited {code}:\n{log}");
            }
        }
        let mut managed = Vec::new();
        for c in &containers {
            let env = environment(c, docs, &namespace, &fields)?;
            let config = self.container_config(c, spec, &volumes, env, stand_ins, 0)?;
            let id = self
                .cri
                .start_container(&pod.id, config.clone(), &pod.config)
                .with_context(|| {
                    let logs: String = init_exits
                        .iter()
                        .map(|(n, _)| {
                            let log = std::fs::read_to_string(logs.join(format!("{n}_0.log")));
                            format!("\n--- init container {n}:\n{}", log.unwrap_or_default())
                        })
                        .collect();
                    format!(
                        "starting container {} of pod {pod_name}{logs}",
                        c["name"].as_str().unwrap_or_default()
                    )
                })?;
            managed.push(Managed {
                name: c["name"].as_str().unwrap_or_default().to_string(),
                config,
                id,
                attempt: 0,
                started: Instant::now(),
                liveness: Probe::parse(c, "livenessProbe")?,
                readiness: Probe::parse(c, "readinessProbe")?,
                live_failures: 0,
                last_liveness: None,
                last_readiness: None,
                ready: false,
                restarts: Vec::new(),
                not_before: None,
            });
        }
        let shared = Arc::new(Mutex::new(Shared {
            containers: managed,
            error: None,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let supervisor = {
            let (shared, stop) = (shared.clone(), stop.clone());
            let socket = self.socket.clone();
            let netns = self.node_netns.clone();
            let (pod_id, sandbox) = (pod.id.clone(), pod.config.clone());
            let probe_host = if spec["hostNetwork"] == true {
                "127.0.0.1".to_string()
            } else {
                pod_ip.unwrap_or_default()
            };
            std::thread::spawn(move || {
                let Ok(mut cri) = Cri::connect(&socket) else {
                    return;
                };
                while !stop.load(Ordering::Relaxed) {
                    {
                        let mut guard = shared.lock().unwrap_or_else(|p| p.into_inner());
                        let sh = &mut *guard;
                        for m in &mut sh.containers {
                            if let Err(e) =
                                supervise(&mut cri, m, &pod_id, &sandbox, &netns, &probe_host)
                            {
                                sh.error = Some(format!("{}: {e:#}", m.name));
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Ok(ManifestPod {
            pod,
            init_exits,
            shared,
            stop,
            supervisor: Some(supervisor),
        })
    }
}

/// One round of kubelet's work for one container.
fn supervise(
    cri: &mut Cri,
    m: &mut Managed,
    pod: &str,
    sandbox: &PodSandboxConfig,
    netns: &Path,
    probe_host: &str,
) -> Result<()> {
    let now = Instant::now();
    // A status the runtime cannot give now is asked again next round, not taken for an exit.
    let Ok((state, code, _)) = cri.container_state(&m.id) else {
        return Ok(());
    };
    let mut restart = None;
    if state == ContainerState::ContainerExited || state == ContainerState::ContainerUnknown {
        restart = Some(format!("exited with {code}"));
    } else if let Some(p) = &m.liveness {
        if p.due(m.started, m.last_liveness, now) {
            m.last_liveness = Some(now);
            match http_get(
                netns,
                p.host.as_deref().unwrap_or(probe_host),
                p.port,
                &p.path,
            ) {
                Ok(status) if (200..400).contains(&status) => m.live_failures = 0,
                _ => m.live_failures += 1,
            }
            if m.live_failures >= p.failure_threshold {
                restart = Some(format!("liveness probe failed {} times", m.live_failures));
            }
        }
    }
    if let Some(p) = &m.readiness {
        if restart.is_none() && p.due(m.started, m.last_readiness, now) {
            m.last_readiness = Some(now);
            m.ready = matches!(
                http_get(netns, p.host.as_deref().unwrap_or(probe_host), p.port, &p.path),
                Ok(s) if (200..400).contains(&s)
            );
        }
    }
    let Some(why) = restart else {
        return Ok(());
    };
    if m.not_before.is_some_and(|t| now < t) {
        return Ok(());
    }
    // As kubelet: the old container stopped (its grace period) and removed, a new one with
    // the next attempt number; back-off doubling from 1 s up to 10 s between crashes.
    let _ = cri.remove_container(&m.id);
    m.attempt += 1;
    m.config.metadata = Some(ContainerMetadata {
        name: m.name.clone(),
        attempt: m.attempt,
    });
    m.config.log_path = format!("{}_{}.log", m.name, m.attempt);
    m.id = cri.start_container(pod, m.config.clone(), sandbox)?;
    m.started = Instant::now();
    m.live_failures = 0;
    m.last_liveness = None;
    m.last_readiness = None;
    m.ready = false;
    m.restarts.push(why);
    let backoff = Duration::from_secs(1 << m.restarts.len().min(4)).min(Duration::from_secs(10));
    m.not_before = Some(m.started + backoff);
    Ok(())
}

/// An HTTP GET made from the node's network namespace, as kubelet probes: the status code.
pub fn http_get(netns: &Path, host: &str, port: u16, path: &str) -> Result<u16> {
    let netns = netns.to_path_buf();
    let (host, path) = (host.to_string(), path.to_string());
    std::thread::spawn(move || -> Result<u16> {
        let ns = std::fs::File::open(&netns)?;
        // SAFETY: setns(2) of this thread only, which ends with the probe.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let addr: std::net::IpAddr = host.trim_matches(['[', ']']).parse()?;
        let timeout = Duration::from_secs(1);
        let mut s = std::net::TcpStream::connect_timeout(&(addr, port).into(), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut head = [0u8; 64];
        let n = s.read(&mut head)?;
        let line = String::from_utf8_lossy(&head[..n]);
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("not an HTTP answer: {line:?}"))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
}

impl ManifestPod {
    fn with<T>(&self, name: &str, f: impl FnOnce(&Managed) -> T) -> Result<T> {
        let sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = &sh.error {
            bail!("kubelet: {e}");
        }
        sh.containers
            .iter()
            .find(|m| m.name == name)
            .map(f)
            .with_context(|| format!("no container {name} in the pod"))
    }

    /// The container's current id (it changes at each restart).
    pub fn container_id(&self, name: &str) -> Result<String> {
        self.with(name, |m| m.id.clone())
    }

    /// Is the container ready (its readiness probe's last answer)?
    pub fn ready(&self, name: &str) -> Result<bool> {
        self.with(name, |m| m.ready)
    }

    /// Why the container was restarted, each time.
    pub fn restarts(&self, name: &str) -> Result<Vec<String>> {
        self.with(name, |m| m.restarts.clone())
    }

    /// The log of the container's current attempt.
    pub fn log_path(&self, name: &str) -> Result<PathBuf> {
        let attempt = self.with(name, |m| m.attempt)?;
        Ok(PathBuf::from(&self.pod.config.log_directory).join(format!("{name}_{attempt}.log")))
    }

    /// The log of container `name` (an init container's too), every attempt.
    pub fn log_text(&self, name: &str) -> String {
        let dir = PathBuf::from(&self.pod.config.log_directory);
        let mut out = String::new();
        for attempt in 0.. {
            match std::fs::read_to_string(dir.join(format!("{name}_{attempt}.log"))) {
                Ok(t) => out += &t,
                Err(_) => break,
            }
        }
        out
    }

    /// Waits until every container is ready, at most `within`.
    pub fn wait_ready(&self, within: Duration) -> Result<()> {
        let names: Vec<String> = {
            let sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            sh.containers
                .iter()
                .filter(|m| m.readiness.is_some())
                .map(|m| m.name.clone())
                .collect()
        };
        redirect_lab::eventually(within, "the pod's containers ready", || {
            names
                .iter()
                .all(|n| self.ready(n).unwrap_or(false))
                .then_some(())
        })
        .with_context(|| {
            names
                .iter()
                .map(|n| format!("--- {n}:\n{}", self.log_text(n)))
                .collect::<String>()
        })
    }

    /// Stops the supervisor, then removes the pod as kubelet deletes one.
    pub fn delete(mut self, cri: &mut Cri) -> Result<()> {
        self.stop_supervisor();
        cri.remove_pod(&self.pod.id)
    }

    fn stop_supervisor(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.supervisor.take() {
            let _ = h.join();
        }
    }
}

impl Drop for ManifestPod {
    fn drop(&mut self) {
        self.stop_supervisor();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(bytes("256Mi").unwrap(), 256 << 20);
        assert_eq!(bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(millicores("50m").unwrap(), 50);
        assert_eq!(millicores("1.5").unwrap(), 1500);
        let r = resources(&serde_json::json!({"resources": {"requests": {"cpu": "5m"}, "limits": {"memory": "64Mi"}}})).unwrap();
        assert_eq!((r.cpu_shares, r.memory_limit_in_bytes), (5, 64 << 20));
    }

    #[test]
    fn env_from_config_maps_and_the_downward_api() {
        let docs = yaml_documents(
            "kind: ConfigMap\nmetadata: {name: c, namespace: ns}\ndata: {A: '1', B: '2'}\n",
        )
        .unwrap();
        let c = serde_json::json!({
            "envFrom": [{"configMapRef": {"name": "c"}}],
            "env": [{"name": "B", "value": "3"},
                    {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        });
        let fields = [("spec.nodeName", "node-a".to_string())]
            .into_iter()
            .collect();
        let env = environment(&c, &docs, "ns", &fields).unwrap();
        let got: Vec<(&str, &str)> = env
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_str()))
            .collect();
        assert_eq!(got, [("A", "1"), ("B", "3"), ("N", "node-a")]);
        assert!(environment(&c, &docs, "other", &fields).is_err());
    }
}
