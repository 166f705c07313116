//! The Kubernetes pod source against a fake API server speaking the real list/watch wire
//! format: pods added, changed, relabelled, deleted and recreated with a new IP reach the maps
//! on the event, not the resync (asserted under 700 ms, seen in status; each time is printed); a 410 Gone forces a re-list; a dropped stream is re-watched.
//! Lab network namespaces stand in for the pods' (found by their IPs).

use std::time::{Duration, Instant};

use redirect_lab::{eventually, spawn, Netns, Placement, Report};
use redirect_tests::{
    fake_apiserver::{linkerd_pod, mesh_pod, FakeApiServer},
    lab, seen,
};

const NODE: &str = "node-a";

/// Waits until `pred` holds for the pods in `redirectd status`, and returns how long it took.
fn until(lab: &mut redirect_lab::Lab, what: &str, pred: impl Fn(&Report) -> bool) -> Duration {
    let start = Instant::now();
    lab.daemon().wait_status(what, pred).unwrap();
    let t = start.elapsed();
    eprintln!("{what}: seen in status after {t:?}");
    t
}

/// Starts the lab's daemon on the fake API server as node [`NODE`]'s, with `extra` flags.
fn start_daemon(lab: &mut redirect_lab::Lab, api: &FakeApiServer, extra: &[&str]) {
    let mut args = vec![
        "--kubernetes",
        "--node-name",
        NODE,
        "--kube-api-url",
        &api.url,
    ];
    args.extend_from_slice(extra);
    lab.start_daemon("pods: []\n", &args).unwrap();
}

fn has(status: &Report, name: &str) -> bool {
    status.pod(name).is_some()
}

fn cookie(status: &Report, name: &str) -> Option<u64> {
    status.pod(name).map(|p| p.pod.netns_cookie)
}

#[test]
fn watch_drives_the_maps() {
    let mut lab = lab();
    for p in ["a", "b", "c"] {
        lab.add_pod(p).unwrap();
        // A process in each namespace, as a pod's containers would be (found via /proc).
        lab.start_sidecar(p).unwrap();
    }
    let ip = |lab: &redirect_lab::Lab, p: &str| lab.pod(p).v4.to_string();
    let api = FakeApiServer::start();
    let pod_a = mesh_pod("a", NODE, &[&ip(&lab, "a")], &[]);
    api.apply_silently(&pod_a);
    start_daemon(&mut lab, &api, &[]);
    until(&mut lab, "initial list applied", |s| has(s, "a"));
    // Only this node's pods are asked for (the API server filters on spec.nodeName).
    let paths = api.paths();
    assert!(
        paths
            .iter()
            .all(|p| p.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{paths:?}"
    );

    // Added.
    let pod_b = mesh_pod("b", NODE, &[&ip(&lab, "b")], &[]);
    api.apply(&pod_b, true);
    let t = until(&mut lab, "b added", |s| has(s, "b"));
    assert!(
        t < redirect_lab::scaled(EVENT_BOUND),
        "b applied after {t:?}"
    );

    // Annotated: a gets an excluded port; its slot is rewritten.
    let slot = |s: &Report| s.pod("a").map(|p| p.pod.pod_id);
    let before = slot(&lab.daemon().status().unwrap());
    let annotated = mesh_pod(
        "a",
        NODE,
        &[&ip(&lab, "a")],
        &[("traffic.sidecar.istio.io/excludeOutboundPorts", "5432")],
    );
    api.apply(&annotated, false);
    let t = until(&mut lab, "annotation applied", |s| slot(s) != before);
    assert!(
        t < redirect_lab::scaled(EVENT_BOUND),
        "annotation applied after {t:?}"
    );

    // A bad annotation: rejected with pod and field, the others stay.
    let bad = mesh_pod(
        "a",
        NODE,
        &[&ip(&lab, "a")],
        &[("traffic.sidecar.istio.io/excludeOutboundPorts", "70000")],
    );
    api.apply(&bad, false);
    let st = lab
        .daemon()
        .wait_status("bad annotation rejected", |s| {
            s.rejected.iter().any(|r| r.contains("shop/a"))
        })
        .unwrap();
    assert!(
        st.rejected
            .iter()
            .any(|r| r.contains("excludeOutboundPorts")),
        "{st:#?}"
    );
    assert!(has(&st, "b"));

    // Relabelled out of the mesh (no injection any more): removed.
    let mut plain = annotated.clone();
    plain.metadata.annotations = None;
    plain
        .spec
        .as_mut()
        .unwrap()
        .containers
        .retain(|c| c.name != "istio-proxy");
    api.apply(&plain, false);
    let t = until(&mut lab, "a removed", |s| !has(s, "a"));
    assert!(
        t < redirect_lab::scaled(EVENT_BOUND),
        "a removed after {t:?}"
    );

    // Deleted, then recreated with a new IP (in another namespace).
    api.delete(&pod_b);
    until(&mut lab, "b deleted", |s| !has(s, "b"));
    let first = {
        api.apply(&pod_b, true);
        let s = lab.daemon().wait_status("b back", |s| has(s, "b")).unwrap();
        cookie(&s, "b").unwrap()
    };
    api.delete(&pod_b);
    let moved = mesh_pod("b", NODE, &[&ip(&lab, "c")], &[]);
    api.apply(&moved, true);
    let s = lab
        .daemon()
        .wait_status("b recreated in c's namespace", |s| {
            cookie(s, "b").is_some_and(|c| c != first)
        })
        .unwrap();
    assert!(has(&s, "b"));

    // 410 Gone: the watcher re-lists and sees what changed meanwhile.
    let (lists, _) = api.requests();
    let pod_c = mesh_pod("c2", NODE, &[&ip(&lab, "a")], &[]);
    api.apply_silently(&pod_c);
    api.gone();
    until(&mut lab, "c2 seen after re-list", |s| has(s, "c2"));
    assert!(api.requests().0 > lists, "no re-list after 410");

    // A dropped stream: watched again, later events still arrive.
    let (_, watches) = api.requests();
    api.drop_streams();
    eventually(Duration::from_secs(10), "a new watch", || {
        (api.requests().1 > watches).then_some(())
    })
    .unwrap();
    api.delete(&pod_c);
    until(&mut lab, "c2 deleted after re-watch", |s| !has(s, "c2"));
}

/// How soon a watch event must show in `redirectd status` (which runs a process per look):
/// under the 1 s resync, so the event applied it, not the resync; with room for a loaded
/// 2-CPU machine. Each test prints what it measured.
const EVENT_BOUND: Duration = Duration::from_millis(700);

/// Netns resolution through the node's routes (rtnetlink), as on a real node: a pod wired like
/// a point-to-point CNI (its own veth and a /32 host route, as Calico or Cilium do) and a pod
/// on a bridge (found through the node's neighbour entry and the bridge's forwarding table).
/// Neither has a process in it, so a `/proc` scan could not find them. A namespace outside
/// the node holding the routed pod's IP, with a process in it, is not taken for the pod; a
/// pod the node has no route to stays pending, named in the status, and is retried.
#[test]
fn netns_found_through_the_nodes_routes() {
    let mut lab = lab();
    lab.add_routed_pod("ptp").unwrap();
    lab.add_pod("br").unwrap();
    let ptp_ip = lab.pod("ptp").v4.to_string();
    let br_ip = lab.pod("br").v4.to_string();
    let at_node = Placement {
        netns: Some(&lab.node),
        cgroup: None,
        uid: None,
    };
    // Traffic from the node to both (as kubelet's probes would): the routed pod answers
    // through its veth (connection refused: nobody listens, but the pod's kernel replied),
    // and the node learns the bridge pod's MAC.
    for ip in [&ptp_ip, &br_ip] {
        let r = lab
            .client_at(at_node, &["--target", &format!("{ip}:9")])
            .unwrap();
        let err = r[0].error.clone().unwrap_or_default();
        assert!(err.contains("refused"), "{ip}: {r:?}");
    }
    // The twin: the routed pod's IP, a process in it, not wired to the node.
    let twin = Netns::new(format!("{}-twin", lab.id)).unwrap();
    twin.exec(&["ip", "addr", "add", &format!("{ptp_ip}/32"), "dev", "lo"])
        .unwrap();
    let _twin_proc = spawn(
        Placement {
            netns: Some(&twin),
            cgroup: Some(&lab.cgroup),
            uid: None,
        },
        &lab.dir.join("twin.log"),
        &redirect_lab::bin("redirect-lab"),
        &["server", "--port", "8080"],
    )
    .unwrap();

    let api = FakeApiServer::start();
    for (name, ip) in [
        ("ptp", &ptp_ip),
        ("br", &br_ip),
        ("nowhere", &"10.209.0.9".to_string()),
    ] {
        api.apply_silently(&mesh_pod(name, NODE, &[ip], &[]));
    }
    let node_netns = lab.node.path().display().to_string();
    start_daemon(&mut lab, &api, &["--node-netns", &node_netns]);
    let status = lab
        .daemon()
        .wait_status("ptp and br applied, nowhere pending", |s| {
            has(s, "ptp") && has(s, "br") && s.rejected.iter().any(|r| r.contains("10.209.0.9"))
        })
        .unwrap();
    let netns_of = |lab: &mut redirect_lab::Lab, name: &str| -> String {
        lab.daemon().pod_status(name).unwrap().pod.netns
    };
    let ptp = netns_of(&mut lab, "ptp");
    // (`/var/run` is a link to `/run` on most systems.)
    let real = |p: std::path::PathBuf| std::fs::canonicalize(p).unwrap().display().to_string();
    let ptp_path = real(lab.pod("ptp").netns.path());
    assert!(ptp.starts_with(&ptp_path), "{ptp} (want {ptp_path})");
    assert!(ptp.contains("route -> veth p"), "{ptp}");
    let br = netns_of(&mut lab, "br");
    let br_path = real(lab.pod("br").netns.path());
    assert!(br.starts_with(&br_path), "{br} (want {br_path})");
    assert!(br.contains("route -> bridge br0 -> veth v"), "{br}");
    assert!(
        !status.pods.iter().any(|p| p.pod.netns.contains(&twin.name)),
        "the twin was taken for a pod: {status:#?}"
    );
    let pending = status.rejected.join("\n");
    assert!(
        pending.contains("nowhere") && pending.contains("retrying"),
        "{pending}"
    );
}

/// Istio's CNI-mode pods as the injector writes them: a Pending pod with an IP (init
/// containers running) is served at once; the proxy's uid comes from the istio-proxy
/// container's security context; gateways and interception mode NONE (from the proxy's env)
/// are left alone; an annotation warning reaches the status and a Kubernetes Event.
#[test]
fn istio_cni_mode_pods() {
    let mut lab = lab();
    for p in ["pending", "uid2001", "gw", "none", "warned", "ext"] {
        lab.add_pod(p).unwrap();
    }
    lab.start_server("ext", &[8080]).unwrap();
    let ip = |lab: &redirect_lab::Lab, p: &str| lab.pod(p).v4.to_string();
    let api = FakeApiServer::start();
    let mut pending = mesh_pod("pending", NODE, &[&ip(&lab, "pending")], &[]);
    pending.status.as_mut().unwrap().phase = Some("Pending".into());
    let proxy = |pod: &mut k8s_openapi::api::core::v1::Pod, c: serde_json::Value| {
        let spec = pod.spec.as_mut().unwrap();
        spec.containers.retain(|c| c.name != "istio-proxy");
        spec.containers.push(serde_json::from_value(c).unwrap());
    };
    let mut uid2001 = mesh_pod("uid2001", NODE, &[&ip(&lab, "uid2001")], &[]);
    proxy(
        &mut uid2001,
        serde_json::json!({"name": "istio-proxy", "securityContext": {"runAsUser": 2001, "runAsGroup": 2001}}),
    );
    let mut gw = mesh_pod("gw", NODE, &[&ip(&lab, "gw")], &[]);
    proxy(
        &mut gw,
        serde_json::json!({"name": "istio-proxy", "args": ["proxy", "router", "--domain", "x"]}),
    );
    let mut none = mesh_pod("none", NODE, &[&ip(&lab, "none")], &[]);
    proxy(
        &mut none,
        serde_json::json!({"name": "istio-proxy", "env": [{"name": "ISTIO_META_INTERCEPTION_MODE", "value": "NONE"}]}),
    );
    let warned = mesh_pod(
        "warned",
        NODE,
        &[&ip(&lab, "warned")],
        &[
            ("traffic.sidecar.istio.io/kubevirtInterfaces", "net1"),
            ("traffic.sidecar.istio.io/excludeInterfaces", "net1"),
        ],
    );
    for p in [&pending, &uid2001, &gw, &none, &warned] {
        api.apply_silently(p);
    }
    // The node reaches each pod once (kubelet's probes would), so it knows their bridge ports.
    let at_node = Placement {
        netns: Some(&lab.node),
        cgroup: None,
        uid: None,
    };
    for p in ["pending", "uid2001", "warned"] {
        let _ = lab.client_at(at_node, &["--target", &format!("{}:9", ip(&lab, p))]);
    }
    let node_netns = lab.node.path().display().to_string();
    start_daemon(&mut lab, &api, &["--node-netns", &node_netns]);
    until(&mut lab, "pending, uid2001 and warned applied", |s| {
        has(s, "pending") && has(s, "uid2001") && has(s, "warned")
    });
    let status = lab.daemon().status().unwrap();
    assert!(!has(&status, "gw") && !has(&status, "none"), "{status:#?}");
    assert!(
        status
            .warnings
            .iter()
            .any(|w| w.contains("shop/warned") && w.contains("kubevirtInterfaces")),
        "{:?}",
        status.warnings
    );
    eventually(Duration::from_secs(5), "an Event on the warned pod", || {
        api.events().into_iter().find(|e| {
            e["involvedObject"]["name"] == "warned"
                && e["type"] == "Warning"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("kubevirtInterfaces"))
        })
    })
    .unwrap();
    // uid 2001 is that pod's proxy: its connections go direct; uid 1337's are captured
    // (refused: no proxy listens, and mesh pods fail closed).
    let target = format!("{}:8080", lab.pod("ext").v4);
    let as_uid = |lab: &redirect_lab::Lab, uid: u32| {
        lab.client(Some("uid2001"), Some(uid), &["--target", &target])
            .unwrap()
            .remove(0)
    };
    let proxy_own = as_uid(&lab, 2001);
    assert!(
        proxy_own.error.is_none(),
        "the pod's proxy uid is not captured: {proxy_own:?}"
    );
    let other = as_uid(&lab, 1337);
    assert!(
        other
            .error
            .as_deref()
            .is_some_and(|e| e.contains("Operation not permitted")),
        "uid 1337 is not this pod's proxy: captured: {other:?}"
    );
}

/// A Linkerd-injected pod from the API server (its `linkerd-proxy` container, Linkerd's
/// annotations) is served as a Linkerd pod: its application's connections go to 4140, other
/// pods' to 4143, its skipped port goes direct; Envoy on Linkerd's ports and uid stands in for
/// its proxy.
#[test]
fn linkerd_pods_from_the_api_server() {
    let mut lab = lab();
    lab.add_pod("l5d").unwrap();
    lab.add_pod("ext").unwrap();
    let sidecar = lab
        .start_envoy_shaped(
            "l5d",
            redirect_lab::envoy::Mode::Redirect,
            &redirect_lab::envoy::LINKERD,
        )
        .unwrap();
    lab.start_server("l5d", &[8080]).unwrap();
    lab.start_server("ext", &[8080, 5432]).unwrap();
    let api = FakeApiServer::start();
    let ip = lab.pod("l5d").v4.to_string();
    let pod = linkerd_pod(
        "l5d",
        NODE,
        &[&ip],
        &[("config.linkerd.io/skip-outbound-ports", "5432")],
    );
    api.apply_silently(&pod);
    start_daemon(&mut lab, &api, &[]);
    until(&mut lab, "the Linkerd pod applied", |s| has(s, "l5d"));
    let ext = lab.pod("ext").v4;
    let l5d = lab.pod("l5d").v4;
    let from_pod =
        |lab: &redirect_lab::Lab, to: String| seen(lab, sidecar, lab.pod("l5d").placement(), &to);
    let out = from_pod(&lab, format!("{ext}:8080"));
    assert!(out.ends_with("envoy [\"outbound\"]"), "{out}");
    let skipped = from_pod(&lab, format!("{ext}:5432"));
    assert!(
        skipped.starts_with("error None") && skipped.ends_with("envoy []"),
        "{skipped}"
    );
    let inbound = seen(
        &lab,
        sidecar,
        lab.pod("ext").placement(),
        &format!("{l5d}:8080"),
    );
    assert!(inbound.ends_with("envoy [\"inbound\"]"), "{inbound}");
}
