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
    eventually,
    wire::{ClientResult, ProxyRecord},
    PROXY_UID,
};
use redirect_node::{
    cluster::{client, lab_tool, rendering, repo, stand_ins, MeshNode, NODE},
    cri::stdout_lines,
    fake_apiserver::pending_pod,
    kubelet::yaml_documents,
    Pod, PodSpec,
};
use redirect_tests::taken_by;
use serde_json::Value;

type RealNode = MeshNode;

fn real_node(docs: &[Value]) -> MeshNode {
    MeshNode::start(docs).unwrap_or_else(|e| panic!("starting the node: {e:#}"))
}

fn base() -> Vec<Value> {
    rendering(|_| {}).unwrap()
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
    let mut n = real_node(&base());
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
    let probe = n.in_daemon(&["redirectd", "probe"]).unwrap();
    assert_eq!(probe.exit_code, 0, "{}{}", probe.stdout, probe.stderr);
    assert!(!probe.stdout.contains("MISSING"), "{}", probe.stdout);
    let daemon_log = n.ds().log_text("redirectd");
    assert!(
        daemon_log.contains("hybrid cgroup layout"),
        "the daemon found cgroup v2 below the host's /sys/fs/cgroup: {daemon_log}"
    );

    let (pod, validation) = n.mesh_pod("web").unwrap();
    // Istio's validation init container passed in both families, its probe redirected to the
    // inbound port on loopback, as Istio's rules do.
    let passed: Vec<Value> = validation
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(passed.len(), 2, "{validation:?}");
    assert!(passed.iter().all(|v| v["passed"] == true), "{validation:?}");
    assert_eq!(passed[0]["accepted_on"], "127.0.0.1:15006");
    assert_eq!(passed[1]["accepted_on"], "[::1]:15006");
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

    let shell_id = n.shell(&pod).unwrap();
    let dst = n.dst.clone();
    let results = n.connections(&shell_id, &dst, 5).unwrap();
    eventually_captured(&n, &pod, &results);

    // Mesh to mesh: web's connections go out through web's Envoy and in through api's.
    let (api, _) = n.mesh_pod("api").unwrap();
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
    let results = n
        .connections(&shell_id, &format!("{api_ip}:8080"), 5)
        .unwrap();
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

    // Deleted as kubelet deletes a pod: DEL at stop, DEL again at remove (no netns); its
    // inbound link's pin goes with it.
    let pod_pins = n.node.path("/sys/fs/bpf/redirect/pods");
    let pins = || std::fs::read_dir(&pod_pins).map_or(0, |d| d.count());
    assert_eq!(pins(), 2, "web's and api's inbound links");
    n.node.cri.remove_pod(&pod.id).unwrap();
    n.api
        .delete(&pending_pod("shop", "web", "uid-web", NODE, &[]));
    let gone = eventually(Duration::from_secs(10), "the pod leaves the daemon", || {
        n.status().ok().filter(|s| s.pod("web").is_none())
    });
    assert!(gone.is_ok(), "{}", n.ds().log_text("redirectd"));
    assert_eq!(pins(), 1, "web's inbound link is still pinned");
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
    })
    .unwrap();
    let mut n = real_node(&docs);
    let (pod, _) = n.mesh_pod("web").unwrap();
    let shell_id = n.shell(&pod).unwrap();
    let dst = n.dst.clone();
    n.connections(&shell_id, &dst, 3).unwrap();

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
    let results = n.connections(&shell_id, &dst, 5).unwrap();
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
    let mut n = real_node(&base());
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
    let mut n = real_node(&base());
    let pin_dir = n.node.path("/sys/fs/bpf/redirect");
    assert!(pin_dir.join("links").is_dir());
    let attached = || {
        redirect_lab::output(
            std::process::Command::new("bpftool")
                .args(["cgroup", "show"])
                .arg(&n.lab.cgroup.path),
        )
        .unwrap()
    };
    let before = attached();
    assert!(
        before.contains("connect4") && before.contains("sock_ops"),
        "the daemon's programs on the node's cgroup:\n{before}"
    );
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
    let after = attached();
    assert!(
        after.lines().skip(1).all(|l| l.trim().is_empty()),
        "programs still attached to the node's cgroup:\n{after}"
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
