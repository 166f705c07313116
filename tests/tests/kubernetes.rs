//! The Kubernetes pod source against a fake API server speaking the real list/watch wire
//! format: pods added, changed, relabelled, deleted and recreated with a new IP reach the maps
//! within 100 ms of the event; a 410 Gone forces a re-list; a dropped stream is re-watched.
//! Lab network namespaces stand in for the pods' (found by their IPs).

use std::time::{Duration, Instant};

use redirect_tests::{
    fake_apiserver::{mesh_pod, FakeApiServer},
    lab,
};

const NODE: &str = "node-a";

/// Waits until `pred` holds for the pods in `redirectd status`, and returns how long it took.
fn until(
    lab: &mut redirect_lab::Lab,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    let start = Instant::now();
    lab.daemon()
        .wait_status(what, |s| pred(&s["pods"]))
        .unwrap();
    start.elapsed()
}

fn has(pods: &serde_json::Value, name: &str) -> bool {
    pods.as_array().unwrap().iter().any(|p| p["name"] == name)
}

fn cookie(pods: &serde_json::Value, name: &str) -> Option<u64> {
    pods.as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["netns_cookie"].as_u64())
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
    lab.start_daemon(
        "pods: []\n",
        &[
            "--kubernetes",
            "--node-name",
            NODE,
            "--kube-api-url",
            &api.url,
        ],
    )
    .unwrap();
    until(&mut lab, "initial list applied", |p| has(p, "a"));
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
    let t = until(&mut lab, "b added", |p| has(p, "b"));
    assert!(
        t < Duration::from_millis(100) + STATUS_POLL,
        "b applied after {t:?}"
    );

    // Annotated: a gets an excluded port; its slot is rewritten.
    let slot =
        |lab: &mut redirect_lab::Lab| lab.daemon().pod_status("a").unwrap()["pod_id"].as_u64();
    let before = slot(&mut lab);
    let annotated = mesh_pod(
        "a",
        NODE,
        &[&ip(&lab, "a")],
        &[("traffic.sidecar.istio.io/excludeOutboundPorts", "5432")],
    );
    api.apply(&annotated, false);
    let start = Instant::now();
    while slot(&mut lab) == before {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "annotation change never applied"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        start.elapsed() < Duration::from_millis(100) + STATUS_POLL,
        "annotation applied after {:?}",
        start.elapsed()
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
            s["rejected"].to_string().contains("shop/a")
        })
        .unwrap();
    assert!(
        st["rejected"].to_string().contains("excludeOutboundPorts"),
        "{st:#}"
    );
    assert!(has(&st["pods"], "b"));

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
    let t = until(&mut lab, "a removed", |p| !has(p, "a"));
    assert!(
        t < Duration::from_millis(100) + STATUS_POLL,
        "a removed after {t:?}"
    );

    // Deleted, then recreated with a new IP (in another namespace).
    api.delete(&pod_b);
    until(&mut lab, "b deleted", |p| !has(p, "b"));
    let first = {
        api.apply(&pod_b, true);
        let s = lab
            .daemon()
            .wait_status("b back", |s| has(&s["pods"], "b"))
            .unwrap();
        cookie(&s["pods"], "b").unwrap()
    };
    api.delete(&pod_b);
    let moved = mesh_pod("b", NODE, &[&ip(&lab, "c")], &[]);
    api.apply(&moved, true);
    let s = lab
        .daemon()
        .wait_status("b recreated in c's namespace", |s| {
            cookie(&s["pods"], "b").is_some_and(|c| c != first)
        })
        .unwrap();
    assert!(has(&s["pods"], "b"));

    // 410 Gone: the watcher re-lists and sees what changed meanwhile.
    let (lists, _) = api.requests();
    let pod_c = mesh_pod("c2", NODE, &[&ip(&lab, "a")], &[]);
    api.apply_silently(&pod_c);
    api.gone();
    until(&mut lab, "c2 seen after re-list", |p| has(p, "c2"));
    assert!(api.requests().0 > lists, "no re-list after 410");

    // A dropped stream: watched again, later events still arrive.
    let (_, watches) = api.requests();
    api.drop_streams();
    let start = Instant::now();
    while api.requests().1 == watches {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never re-watched"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    api.delete(&pod_c);
    until(&mut lab, "c2 deleted after re-watch", |p| !has(p, "c2"));
}

/// Allowance for observing the change through `redirectd status` (a process per poll).
const STATUS_POLL: Duration = Duration::from_millis(60);
