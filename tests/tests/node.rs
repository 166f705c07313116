//! A real node: containerd 1.6 and runc (Debian's), driven through the CRI as kubelet drives
//! them, in a mount and pid namespace of the node's own. The DaemonSet's pod runs from
//! `kubectl kustomize deploy/base` as written (init container, install-cni, redirectd with the
//! manifest's securityContext, host paths and propagation, env from the ConfigMap and the
//! downward API, probes), on the image `cargo xtask image` built; the fake API server plays
//! Kubernetes (the one stand-in: the daemon is given its URL). Mesh pods are sandboxes made
//! by containerd through the conflist install-cni wrote (bridge + host-local, then
//! redirect-cni), each with Istio's validation init container, an Envoy sidecar container
//! (uid 1337, Istio's listener shapes) and application containers.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use redirect_lab::{
    envoy, eventually,
    wire::{ClientResult, EnvoyRecord, ProxyRecord},
    Lab, Report, PROXY_UID,
};
use redirect_node::{
    cri::{stdout_lines, Cri},
    kubelet::{kustomize, yaml_documents, ManifestPod, StandIns},
    Node, Pod, PodSpec, LAB_MOUNT,
};
use redirect_tests::{
    fake_apiserver::{pending_pod, FakeApiServer},
    lab, taken_by,
};
use serde_json::Value;

const NODE: &str = "node-a";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn lab_tool(name: &str) -> String {
    format!("{LAB_MOUNT}/{name}")
}

/// The lab's node with containerd and the DaemonSet's pod running and ready, a destination
/// outside the mesh (`dst:8080`).
struct RealNode {
    // Drop order: the DaemonSet's supervisor, the node (pods, containerd), then the lab.
    ds: Option<ManifestPod>,
    node: Node,
    api: FakeApiServer,
    dst: String,
    lab: Lab,
}

/// The DaemonSet's rendering: `kubectl kustomize deploy/base`, then `patch` (a test's own
/// change, said where it is made).
fn rendering(patch: impl FnOnce(&mut [Value])) -> Vec<Value> {
    let mut docs = kustomize(&repo().join("deploy/base")).unwrap();
    patch(&mut docs);
    docs
}

fn stand_ins(api: &FakeApiServer) -> StandIns {
    StandIns {
        node_name: NODE.into(),
        extra_args: vec![("redirectd".into(), format!("--kube-api-url={}", api.url))],
    }
}

fn real_node(docs: &[Value]) -> RealNode {
    let mut lab = lab();
    lab.add_pod("dst").unwrap();
    lab.start_server("dst", &[8080]).unwrap();
    let dst = format!("{}:8080", lab.pod("dst").v4);
    let api = FakeApiServer::start_in(&lab.node.path());
    let mut node = Node::start(&lab, &lab.primary_cni().unwrap()).unwrap();
    let ds = node
        .run_daemonset(docs, "redirectd", &stand_ins(&api))
        .unwrap();
    ds.wait_ready(Duration::from_secs(60)).unwrap();
    // install-cni put redirect-cni at the end of the primary CNI's conflist.
    let chained = eventually(
        Duration::from_secs(10),
        "redirect-cni in the conflist",
        || {
            let conf = node.cni_conf().ok()?;
            let plugins = conf.first()?.1["plugins"].as_array()?.clone();
            (plugins.last()?["type"] == "redirect-cni").then_some(plugins)
        },
    );
    assert!(chained.is_ok(), "{:?}", node.cni_conf());
    RealNode {
        ds: Some(ds),
        node,
        api,
        dst,
        lab,
    }
}

impl RealNode {
    fn ds(&self) -> &ManifestPod {
        self.ds.as_ref().unwrap()
    }

    /// A command in the redirectd container.
    fn in_daemon(&mut self, cmd: &[&str]) -> redirect_node::cri::Exec {
        let id = self.ds().container_id("redirectd").unwrap();
        self.node
            .cri
            .exec(&id, cmd, Duration::from_secs(20))
            .unwrap()
    }

    /// `redirectd status --json`, in its container.
    fn status(&mut self) -> Option<Report> {
        let out = self.in_daemon(&["redirectd", "status", "--json"]);
        serde_json::from_str(&out.stdout).ok()
    }

    /// A mesh pod `shop/name`: announced to the API server as Pending, then its sandbox run
    /// by containerd (the CNI chain registers it), Istio's validation init container (uid
    /// 1337, both families), then its sidecar container: Envoy with Istio's listener shapes
    /// for the pod's addresses, uid 1337.
    fn mesh_pod(&mut self, name: &str) -> Pod {
        let uid = format!("uid-{name}");
        self.api
            .apply(&pending_pod("shop", name, &uid, NODE, &[]), true);
        let pod = self
            .node
            .run_pod(&PodSpec {
                namespace: "shop",
                name,
                uid: &uid,
            })
            .unwrap();
        let validate = lab_tool("redirect-lab");
        let script = format!("{validate} validate && {validate} validate --ipv6");
        let init = self.node.container(
            "istio-validation",
            PROXY_UID as i64,
            &["sh", "-c", &script],
            &[],
        );
        let id = self
            .node
            .cri
            .start_container(&pod.id, init, &pod.config)
            .unwrap();
        let code = self
            .node
            .cri
            .wait_exited(&id, Duration::from_secs(30))
            .unwrap();
        let log = stdout_lines(&self.node.log_path(&pod, "istio-validation"));
        assert_eq!(code, 0, "istio-validation failed: {log:?}");
        assert!(
            log.iter().filter(|l| l.contains("\"passed\":true")).count() == 2,
            "{log:?}"
        );

        let ips = self.node.cri.pod_ips(&pod.id).unwrap();
        let v4 = ips.iter().find(|ip| ip.contains('.')).unwrap();
        let v6 = ips.iter().find(|ip| ip.contains(':')).unwrap();
        let config_dir = self.lab.dir.join(format!("{name}-envoy"));
        std::fs::create_dir_all(&config_dir).unwrap();
        let bootstrap = envoy::bootstrap(v4, v6, envoy::Mode::Redirect);
        std::fs::write(
            config_dir.join("envoy.json"),
            serde_json::to_vec(&bootstrap).unwrap(),
        )
        .unwrap();
        let binary = envoy::binary();
        let envoy_dir = binary.parent().unwrap();
        let mut command = vec!["/rlab-envoy/envoy".to_string()];
        command.extend(envoy::args(Path::new("/etc/rlab-envoy/envoy.json")));
        let command: Vec<&str> = command.iter().map(String::as_str).collect();
        let sidecar = self.node.container(
            "istio-proxy",
            PROXY_UID as i64,
            &command,
            &[(envoy_dir, "/rlab-envoy"), (&config_dir, "/etc/rlab-envoy")],
        );
        self.node
            .cri
            .start_container(&pod.id, sidecar, &pod.config)
            .unwrap();
        pod
    }

    /// A long-lived application container of `pod` (connections are made in it with
    /// ExecSync).
    fn shell(&mut self, pod: &Pod) -> String {
        let shell = self.node.container("shell", 1000, &["sleep", "3600"], &[]);
        self.node
            .cri
            .start_container(&pod.id, shell, &pod.config)
            .unwrap()
    }

    /// What the pod's Envoy logged (its access log, on the container's stdout).
    fn sidecar_log(&self, pod: &Pod) -> Vec<ProxyRecord> {
        stdout_lines(&self.node.log_path(pod, "istio-proxy"))
            .iter()
            .filter_map(|l| serde_json::from_str::<EnvoyRecord>(l).ok())
            .filter_map(|r| r.as_proxy_record())
            .collect()
    }

    /// Connections made from an application container until all `count` of one run
    /// succeed (Envoy may still be starting), at most 20 s.
    fn connections(&mut self, shell: &str, target: &str, count: usize) -> Vec<ClientResult> {
        let mut results = Vec::new();
        let ok = eventually(Duration::from_secs(20), "connections from the pod", || {
            results = client(&mut self.node.cri, shell, target, count);
            (results.len() == count && results.iter().all(|r| r.error.is_none())).then_some(())
        });
        assert!(ok.is_ok(), "{results:?}");
        results
    }
}

/// `count` connections to `target` made with ExecSync in container `id`.
fn client(cri: &mut Cri, id: &str, target: &str, count: usize) -> Vec<ClientResult> {
    let tool = lab_tool("redirect-lab");
    let n = count.to_string();
    cri.exec(
        id,
        &[&tool, "client", "--target", target, "--count", &n],
        Duration::from_secs(20),
    )
    .map(|out| {
        out.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<ClientResult>(l).ok())
            .collect()
    })
    .unwrap_or_default()
}

/// Envoy logs a connection when it closes, and flushes its log every few milliseconds.
fn eventually_captured(n: &RealNode, pod: &Pod, results: &[ClientResult]) {
    let all = eventually(Duration::from_secs(5), "Envoy's access log", || {
        results
            .iter()
            .all(|r| taken_by(&n.sidecar_log(pod), r))
            .then_some(())
    });
    assert!(
        all.is_ok(),
        "escaped: {results:?}\nEnvoy saw {:?}",
        n.sidecar_log(pod)
    );
}

/// The DaemonSet's pod as written, and what it does for mesh pods: the host prepared by its
/// init container (bpffs shared: without it containerd would refuse the daemon's container),
/// every kernel feature present inside the daemon's container, the plugin chained by
/// install-cni, a mesh pod's first connection captured (or refused while Envoy starts, never
/// escaping), outbound and mesh to mesh through both Envoy containers, and a deleted pod
/// (DEL at stop, again at remove with no netns) gone from the daemon.
#[test]
fn the_daemonset_as_written_captures_mesh_pods_from_their_first_connection() {
    let mut n = real_node(&rendering(|_| {}));
    let ds = n.ds();
    assert_eq!(ds.init_exits, [("mount-bpffs".to_string(), 0)]);
    let prepared = ds.log_text("mount-bpffs");
    assert!(
        prepared.contains("/sys/fs/bpf: made a shared mount")
            && prepared.contains("/run/netns: already a shared mount"),
        "{prepared}"
    );
    let info = n.node.mountinfo().unwrap();
    assert!(
        info.lines()
            .any(|l| l.split_whitespace().nth(4) == Some("/sys/fs/bpf") && l.contains("shared:")),
        "the node's /sys/fs/bpf is not shared:\n{info}"
    );
    let probe = n.in_daemon(&["redirectd", "probe"]);
    assert_eq!(probe.exit_code, 0, "{}{}", probe.stdout, probe.stderr);
    assert!(!probe.stdout.contains("MISSING"), "{}", probe.stdout);
    let daemon_log = n.ds().log_text("redirectd");
    assert!(
        daemon_log.contains("hybrid cgroup layout"),
        "the daemon found cgroup v2 below the host's /sys/fs/cgroup: {daemon_log}"
    );

    let pod = n.mesh_pod("web");
    // The application: its first instruction is the connection.
    let app = n.node.container(
        "app",
        1000,
        &[
            &lab_tool("redirect-lab"),
            "client",
            "--target",
            &n.dst,
            "--timeout-ms",
            "3000",
        ],
        &[],
    );
    let app_id = n
        .node
        .cri
        .start_container(&pod.id, app, &pod.config)
        .unwrap();
    n.node
        .cri
        .wait_exited(&app_id, Duration::from_secs(20))
        .unwrap();
    let lines = stdout_lines(&n.node.log_path(&pod, "app"));
    let first: ClientResult = serde_json::from_str(lines.first().expect("the app printed nothing"))
        .unwrap_or_else(|e| panic!("{e}: {lines:?}"));
    eprintln!("first connection: {first:?}");
    if first.error.is_none() {
        eventually_captured(&n, &pod, std::slice::from_ref(&first));
    }

    let shell_id = n.shell(&pod);
    let dst = n.dst.clone();
    let results = n.connections(&shell_id, &dst, 5);
    eventually_captured(&n, &pod, &results);

    // Mesh to mesh: web's connections go out through web's Envoy and in through api's.
    let api = n.mesh_pod("api");
    let server = n.node.container(
        "server",
        1000,
        &[&lab_tool("redirect-lab"), "server", "--port", "8080"],
        &[],
    );
    n.node
        .cri
        .start_container(&api.id, server, &api.config)
        .unwrap();
    let api_ip = n.node.cri.pod_ips(&api.id).unwrap()[0].clone();
    let results = n.connections(&shell_id, &format!("{api_ip}:8080"), 5);
    eventually_captured(&n, &pod, &results);
    let inbound = eventually(
        Duration::from_secs(5),
        "api's Envoy took them inbound",
        || {
            let log = n.sidecar_log(&api);
            let inbound = log.iter().filter(|r| r.event == "inbound").count();
            (inbound >= results.len()).then_some(inbound)
        },
    );
    assert!(inbound.is_ok(), "{:?}", n.sidecar_log(&api));
    let status = n.status().unwrap();
    assert!(status.pod("web").is_some(), "{status:?}");

    // Deleted as kubelet deletes a pod: DEL at stop, DEL again at remove (no netns).
    n.node.cri.remove_pod(&pod.id).unwrap();
    n.api
        .delete(&pending_pod("shop", "web", "uid-web", NODE, &[]));
    let gone = eventually(Duration::from_secs(10), "the pod leaves the daemon", || {
        n.status().filter(|s| s.pod("web").is_none())
    });
    assert!(gone.is_ok(), "{}", n.ds().log_text("redirectd"));
}

/// kubelet's restarts: the daemon's container killed under traffic is started again (its
/// programs stay attached meanwhile: no connection fails, every one is captured), and a
/// daemon that stops answering its liveness probe is restarted. The probes' timings are the
/// test's (1 s periods, in place of the manifest's 10 s) so that three failures take seconds.
#[test]
fn the_daemon_container_killed_or_hung_is_restarted_with_nothing_failed() {
    let docs = rendering(|docs| {
        for d in docs.iter_mut().filter(|d| d["kind"] == "DaemonSet") {
            for c in d["spec"]["template"]["spec"]["containers"]
                .as_array_mut()
                .unwrap()
            {
                for probe in ["livenessProbe", "readinessProbe"] {
                    if c[probe].is_object() {
                        c[probe]["periodSeconds"] = 1.into();
                        c[probe]["initialDelaySeconds"] = 1.into();
                    }
                }
            }
        }
    });
    let mut n = real_node(&docs);
    let pod = n.mesh_pod("web");
    let shell_id = n.shell(&pod);
    let dst = n.dst.clone();
    n.connections(&shell_id, &dst, 3);

    // Traffic from the pod the whole time, on a CRI connection of its own.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, mut cri, shell, dst) = (
            stop.clone(),
            n.node.connect().unwrap(),
            shell_id.clone(),
            dst.clone(),
        );
        std::thread::spawn(move || {
            let mut all = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client(&mut cri, &shell, &dst, 10);
                assert_eq!(r.len(), 10, "a client run printed {} results", r.len());
                all.extend(r);
            }
            all
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let id = n.ds().container_id("redirectd").unwrap();
    let pid = n.node.cri.container_pid(&id).unwrap();
    n.node.kill(pid, libc::SIGKILL).unwrap();
    let restarted = eventually(Duration::from_secs(30), "the daemon restarted", || {
        let r = n.ds().restarts("redirectd").ok()?;
        (!r.is_empty()).then_some(r)
    })
    .unwrap();
    assert!(restarted[0].contains("exited with 137"), "{restarted:?}");
    n.ds().wait_ready(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = traffic.join().unwrap();
    let failed: Vec<&ClientResult> = results.iter().filter(|r| r.error.is_some()).collect();
    eprintln!(
        "daemon killed under traffic: {} connections, {} failed",
        results.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    eventually_captured(&n, &pod, &results);
    assert!(n.status().unwrap().pod("web").is_some());

    // Hung: stopped, it answers no probe; kubelet restarts it after three failures.
    let id = n.ds().container_id("redirectd").unwrap();
    let pid = n.node.cri.container_pid(&id).unwrap();
    let hung = Instant::now();
    n.node.kill(pid, libc::SIGSTOP).unwrap();
    let restarted = eventually(Duration::from_secs(30), "the hung daemon restarted", || {
        let r = n.ds().restarts("redirectd").ok()?;
        (r.len() == 2).then_some(r)
    })
    .unwrap();
    assert!(
        restarted[1].contains("liveness probe failed 3 times"),
        "{restarted:?}"
    );
    eprintln!("hung daemon restarted after {:?}", hung.elapsed());
    n.ds().wait_ready(Duration::from_secs(30)).unwrap();
    let results = n.connections(&shell_id, &dst, 5);
    eventually_captured(&n, &pod, &results);
}

/// Capture from the first packet, 50 pods at once: 50 sandboxes created concurrently (as
/// kubelet does for a deployment scaled up), each with a sidecar (`redirect-lab proxy`, uid
/// 1337) and an application whose first instruction is a connection. Every first connection
/// is captured by its pod's sidecar or refused (its sidecar not yet listening): none reaches
/// the destination directly.
#[test]
fn fifty_pods_at_once_none_escapes() {
    const PODS: usize = 50;
    let mut n = real_node(&rendering(|_| {}));
    for i in 0..PODS {
        let name = format!("burst-{i}");
        n.api.apply(
            &pending_pod("shop", &name, &format!("uid-{name}"), NODE, &[]),
            true,
        );
    }
    let dst = n.dst.clone();
    let node = &n.node;
    let started = Instant::now();
    let pods: Vec<(String, Pod)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..10)
            .map(|w| {
                let dst = dst.clone();
                s.spawn(move || {
                    let mut cri = node.connect().unwrap();
                    let mut out = Vec::new();
                    for i in (w..PODS).step_by(10) {
                        let name = format!("burst-{i}");
                        let uid = format!("uid-{name}");
                        let config = node
                            .pod_config(&PodSpec {
                                namespace: "shop",
                                name: &name,
                                uid: &uid,
                            })
                            .unwrap();
                        let id = cri.run_pod_sandbox(config.clone()).unwrap();
                        let pod = Pod { id, config };
                        let proxy = node.container(
                            "sidecar",
                            PROXY_UID as i64,
                            &[&lab_tool("redirect-lab"), "proxy"],
                            &[],
                        );
                        cri.start_container(&pod.id, proxy, &pod.config).unwrap();
                        let app = node.container(
                            "app",
                            1000,
                            &[
                                &lab_tool("redirect-lab"),
                                "client",
                                "--target",
                                &dst,
                                "--timeout-ms",
                                "3000",
                            ],
                            &[],
                        );
                        cri.start_container(&pod.id, app, &pod.config).unwrap();
                        out.push((name, pod));
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join())
            .flatten()
            .collect()
    });
    assert_eq!(
        pods.len(),
        PODS,
        "sandboxes failed; the daemon's restarts: {:?}\n{}",
        n.ds().restarts("redirectd"),
        n.ds().log_text("redirectd")
    );
    eprintln!(
        "{PODS} sandboxes with two containers each: {:?}",
        started.elapsed()
    );
    let (mut captured, mut refused) = (0, 0);
    for (name, pod) in &pods {
        let log = n.node.log_path(pod, "app");
        let first = eventually(Duration::from_secs(30), "the app's connection", || {
            let lines = stdout_lines(&log);
            serde_json::from_str::<ClientResult>(lines.first()?).ok()
        })
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        match &first.error {
            None => {
                let sidecar = n.node.log_path(pod, "sidecar");
                let took = eventually(Duration::from_secs(5), "the sidecar's log", || {
                    let log: Vec<ProxyRecord> = stdout_lines(&sidecar)
                        .iter()
                        .filter_map(|l| serde_json::from_str(l).ok())
                        .collect();
                    taken_by(&log, &first).then_some(())
                });
                assert!(took.is_ok(), "{name}: escaped: {first:?}");
                captured += 1;
            }
            Some(e) => {
                // The daemon refuses a connection whose proxy is not listening yet (EPERM),
                // or the kernel does (ECONNREFUSED): either way it did not leave the pod.
                assert!(
                    e.contains("Operation not permitted") || e.contains("refused"),
                    "{name}: {first:?}"
                );
                refused += 1;
            }
        }
    }
    eprintln!("{PODS} pods' first connections: {captured} captured, {refused} refused (sidecar not yet up), 0 escaped");
    // Within the manifest's memory limit all along (the kernel's OOM killer would have
    // stopped it, and kubelet restarted it).
    assert_eq!(n.ds().restarts("redirectd").unwrap(), Vec::<String>::new());
    let status = n.status().unwrap();
    assert_eq!(
        status
            .pods
            .iter()
            .filter(|p| p.pod.name.starts_with("burst-"))
            .count(),
        PODS,
        "{status:?}"
    );
}

/// Uninstall as the README says: `kubectl delete -k deploy/base` (the DaemonSet's pod goes;
/// its programs stay attached), then deploy/uninstall.yaml's pod, run as written, removes
/// the plugin from the conflist and the bin dir and every pin; the node's cgroup has no
/// program left attached.
#[test]
fn uninstall_yaml_leaves_no_pin_program_or_plugin() {
    let mut n = real_node(&rendering(|_| {}));
    let pin_dir = n.node.path("/sys/fs/bpf/redirect");
    assert!(pin_dir.join("links").is_dir());
    let ds = n.ds.take().unwrap();
    ds.delete(&mut n.node.cri).unwrap();
    assert!(
        pin_dir.join("links").is_dir(),
        "pins must outlive the daemon's pod"
    );

    let text = std::fs::read_to_string(repo().join("deploy/uninstall.yaml")).unwrap();
    let docs = yaml_documents(&text).unwrap();
    let un = n
        .node
        .run_daemonset(&docs, "redirectd-uninstall", &stand_ins(&n.api))
        .unwrap();
    let done = eventually(Duration::from_secs(30), "uninstalled", || {
        un.log_text("uninstall")
            .contains("uninstalled")
            .then_some(())
    });
    assert!(done.is_ok(), "{}", un.log_text("uninstall"));
    let left: Vec<_> = walk(&pin_dir);
    assert!(left.is_empty(), "pins left: {left:?}");
    assert!(!n.node.path("/opt/cni/bin/redirect-cni").exists());
    let conf = n.node.cni_conf().unwrap();
    assert!(
        !serde_json::to_string(&conf)
            .unwrap()
            .contains("redirect-cni"),
        "{conf:?}"
    );
    let attached = redirect_lab::output(
        std::process::Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&n.lab.cgroup.path),
    )
    .unwrap();
    assert!(
        attached.lines().skip(1).all(|l| l.trim().is_empty()),
        "programs still attached to the node's cgroup:\n{attached}"
    );
    un.delete(&mut n.node.cri).unwrap();
}

/// Every file below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}
