//! The chained CNI plugin on the real kernel, with the lab playing the container runtime:
//! Debian's `loopback` and `bridge` + `host-local` plugins and `redirect-cni` executed per the
//! CNI spec, and a fake API server playing Kubernetes. The application starts the instant ADD
//! returns and connects at once: its first connection must reach the sidecar, or be refused
//! while the sidecar is not up, never escape.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use redirect_lab::{
    cni::{CniFailure, CniNetwork, Sandbox},
    eventually,
    wire::ClientResult,
    Lab, PROXY_UID,
};
use redirect_tests::{
    cni_lab,
    fake_apiserver::{pending_pod, with_ips, FakeApiServer},
};

const NODE: &str = "node-a";
/// CNI code for "try again later": the daemon is not reachable.
const TRY_AGAIN_LATER: u64 = 11;
/// redirect-cni's code for a pod the daemon refused (invalid configuration).
const POD_REFUSED: u64 = 100;

/// A node: the lab, its daemon serving the plugin, the API server, the CNI network, and a
/// destination outside the mesh (`dst`, a server on 8080).
struct Node {
    lab: Lab,
    api: FakeApiServer,
    net: CniNetwork,
    dst: String,
    state: PathBuf,
}

fn node() -> Node {
    let c = cni_lab(NODE);
    Node {
        lab: c.lab,
        api: c.api,
        net: c.net,
        dst: c.dst,
        state: c.state,
    }
}

impl Node {
    /// A sandbox for a new mesh pod `shop/name`, announced to the API server as Pending.
    fn mesh_sandbox(&self, name: &str, annotations: &[(&str, &str)]) -> Sandbox {
        let sb = self.lab.sandbox("shop", name).unwrap();
        let pod = pending_pod("shop", name, &sb.uid, NODE, annotations);
        self.api.apply(&pod, true);
        sb
    }

    /// The application's first connection, made from the sandbox at once.
    fn first_connection(&self, sb: &Sandbox) -> ClientResult {
        let r: Vec<ClientResult> = self
            .lab
            .tool(
                sb.placement(None),
                "client",
                &["--target", &self.dst, "--timeout-ms", "3000"],
            )
            .unwrap();
        r.into_iter().next().unwrap()
    }

    /// Tears the sandbox down: DEL (must succeed), then the pod leaves the API server.
    fn remove(&self, mut sb: Sandbox) {
        self.net.del(&mut sb).unwrap().unwrap();
        let pod = pending_pod("shop", &sb.name, &sb.uid, NODE, &[]);
        self.api.delete(&pod);
    }

    fn in_status(&self, name: &str) -> bool {
        self.lab
            .daemon
            .as_ref()
            .unwrap()
            .status()
            .is_ok_and(|s| s.pod(name).is_some())
    }
}

/// ADD, retried as kubelet retries a failed sandbox (DEL, then ADD again) until `within`;
/// returns how long the successful ADD took.
fn add_retrying(
    net: &CniNetwork,
    sb: &mut Sandbox,
    within: Duration,
) -> Result<Duration, CniFailure> {
    let start = Instant::now();
    loop {
        let t = Instant::now();
        match net.add(sb).unwrap() {
            Ok(_) => return Ok(t.elapsed()),
            Err(f) if start.elapsed() < within => {
                eprintln!("ADD of {} failed, retrying: {f}", sb.name);
                net.del(sb).unwrap().unwrap();
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(f) => return Err(f),
        }
    }
}

/// Refused by the redirector (EPERM at connect), not answered by anyone.
fn refused(r: &ClientResult) -> bool {
    r.reply.is_none()
        && r.error
            .as_deref()
            .is_some_and(|e| e.contains("Operation not permitted"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Starts the lab sidecar in a sandbox (as the proxy's uid) and waits for its listeners.
fn start_sidecar(lab: &mut Lab, sb: &Sandbox) -> usize {
    let i = lab
        .spawn_at(sb.placement(Some(PROXY_UID)), "sidecar", &["proxy"])
        .unwrap();
    Lab::wait_listening_in(&sb.netns, 15001).unwrap();
    i
}

#[test]
fn first_connections_never_escape_over_200_pod_creations_and_a_restart() {
    let mut n = node();
    let mut add_times = Vec::new();
    let (mut refused_n, mut via_sidecar) = (0, 0);
    let mut survivor = None;
    for i in 0..200 {
        if i == 100 {
            survivor = Some(restart_in_the_middle(&mut n));
        }
        let mut sb = n.mesh_sandbox(&format!("app-{i}"), &[]);
        let t = add_retrying(&n.net, &mut sb, Duration::ZERO)
            .unwrap_or_else(|f| panic!("ADD of mesh pod {i}: {f}"));
        add_times.push(t);
        if i % 20 == 0 {
            // The sidecar is up before the application's first connection: it gets it.
            let proxy = start_sidecar(&mut n.lab, &sb);
            let r = n.first_connection(&sb);
            assert!(r.error.is_none(), "pod {i} via its sidecar: {r:?}");
            let log = n.lab.sidecar_log(proxy);
            assert!(
                log.iter()
                    .any(|p| p.event == "outbound" && p.orig_dst.as_deref() == Some(n.dst.as_str())),
                "pod {i}: the first connection did not go through the sidecar: {log:?}"
            );
            n.lab.procs[proxy].kill();
            via_sidecar += 1;
        } else {
            let r = n.first_connection(&sb);
            assert!(
                refused(&r),
                "pod {i}: its first connection escaped capture: {r:?}"
            );
            refused_n += 1;
        }
        // kubelet reports the sandbox's addresses; the pod then goes away.
        let pod = pending_pod("shop", &sb.name, &sb.uid, NODE, &[]);
        n.api.apply(&with_ips(pod, &sb.ips(), "Running"), false);
        n.remove(sb);
    }
    add_times.sort();
    // The daemon's side: from the plugin's request to the maps written (its log).
    let mut written: Vec<Duration> = n
        .lab
        .daemon()
        .log_text()
        .lines()
        .filter_map(|l| {
            let us = l.split("maps written ").nth(1)?.split(" µs").next()?;
            Some(Duration::from_micros(us.parse().ok()?))
        })
        .collect();
    written.sort();
    assert!(written.len() >= 100, "the daemon logs each capture at ADD");
    eprintln!(
        "redirectd, CNI request to maps written ({} ADDs since its restart): p50 {:?}, p90 {:?}, max {:?}",
        written.len(),
        percentile(&written, 0.5),
        percentile(&written, 0.9),
        written.last().unwrap()
    );
    eprintln!(
        "200 pod creations: {refused_n} first connections refused (no sidecar yet), {via_sidecar} through the sidecar, none escaped; ADD (loopback + bridge + host-local + redirect-cni, maps written) p50 {:?}, p90 {:?}, max {:?}",
        percentile(&add_times, 0.5),
        percentile(&add_times, 0.9),
        add_times.last().unwrap()
    );
    // Every DEL removed its pod: nothing left applied or registered.
    let d = n.lab.daemon.as_ref().unwrap();
    let st = d
        .wait_status("every pod removed after its DEL", |s| {
            s.pods.iter().all(|p| p.pod.name == "survivor")
        })
        .unwrap();
    assert_eq!(st.pods.len(), 1, "{st:?}");
    let state = std::fs::read_to_string(&n.state).unwrap();
    assert!(!state.contains("app-"), "{state}");
    n.remove(survivor.unwrap());
    n.lab
        .daemon()
        .wait_status("the survivor removed after its DEL", |s| s.pods.is_empty())
        .unwrap();
}

/// The daemon stops: a pod already added stays captured; a mesh pod's ADD fails with a clear
/// message (kubelet retries it, and it gets through once the daemon is back), an excluded
/// namespace's pod starts; the restarted daemon still serves the pod added before.
fn restart_in_the_middle(n: &mut Node) -> Sandbox {
    let mut survivor = n.mesh_sandbox("survivor", &[]);
    add_retrying(&n.net, &mut survivor, Duration::ZERO).unwrap();
    n.lab.daemon().stop();
    assert!(
        refused(&n.first_connection(&survivor)),
        "daemon down: still captured"
    );

    let mut early = n.mesh_sandbox("early", &[]);
    let f = n.net.add(&mut early).unwrap().unwrap_err();
    assert_eq!(f.code, TRY_AGAIN_LATER, "{f}");
    assert!(
        f.msg.contains("shop/early") && f.msg.contains("redirectd"),
        "the failure names the pod and the daemon: {f}"
    );
    n.net.del(&mut early).unwrap().unwrap();

    let mut system = n.lab.sandbox("kube-system", "coredns").unwrap();
    n.net.add(&mut system).unwrap().unwrap_or_else(|f| {
        panic!("an excluded namespace's pod must start with the daemon down: {f}")
    });
    n.net.del(&mut system).unwrap().unwrap();

    // kubelet keeps retrying the mesh pod while the daemon comes back; its application
    // starts only once ADD succeeded, and is captured.
    let Node { lab, net, .. } = n;
    let early = std::thread::scope(|s| {
        let retry = s.spawn(|| {
            add_retrying(
                net,
                &mut early,
                redirect_lab::scaled(Duration::from_secs(30)),
            )
            .unwrap_or_else(|f| panic!("ADD once the daemon is back: {f}"));
            early
        });
        std::thread::sleep(Duration::from_millis(500));
        lab.daemon().restart().unwrap();
        retry.join().unwrap()
    });
    assert!(refused(&n.first_connection(&early)));
    n.remove(early);
    assert!(
        n.in_status("survivor"),
        "the restarted daemon still serves the pod added before it stopped"
    );
    assert!(refused(&n.first_connection(&survivor)));
    survivor
}

/// DEL removes the pod's entries even while the API server still lists it Running with its
/// address (the sandbox is going away).
#[test]
fn del_removes_the_entries() {
    let n = node();
    let mut sb = n.mesh_sandbox("web", &[]);
    add_retrying(&n.net, &mut sb, Duration::ZERO).unwrap();
    let d = n.lab.daemon.as_ref().unwrap();
    assert!(n.in_status("web"), "in the maps when ADD returns");
    n.net.check(&sb).unwrap().expect("CHECK of a captured pod");
    let pod = pending_pod("shop", "web", &sb.uid, NODE, &[]);
    n.api.apply(&with_ips(pod, &sb.ips(), "Running"), false);
    n.net.del(&mut sb).unwrap().unwrap();
    d.wait_status("web removed at DEL", |s| s.pod("web").is_none())
        .unwrap();
    // The watch's copy is not served again while the sandbox goes away.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!n.in_status("web"));
}

/// A mesh pod whose annotation is invalid: its ADD fails naming the pod, the annotation and
/// the reason, so it never starts uncaptured (as under Istio); fixed, it starts.
#[test]
fn a_bad_annotation_fails_add() {
    let n = node();
    let bad = [("traffic.sidecar.istio.io/excludeOutboundPorts", "70000,abc")];
    let mut sb = n.mesh_sandbox("typo", &bad);
    let f = n.net.add(&mut sb).unwrap().unwrap_err();
    assert_eq!(f.code, POD_REFUSED, "{f}");
    assert!(f.msg.contains("shop/typo"), "{f}");
    assert!(
        f.details.contains("excludeOutboundPorts") && f.details.contains("70000"),
        "{f}"
    );
    n.net.del(&mut sb).unwrap().unwrap();
    assert!(!n.in_status("typo"));
    let pod = pending_pod("shop", "typo", &sb.uid, NODE, &[]);
    n.api.apply(&pod, false);
    eventually(
        Duration::from_secs(5),
        "ADD once the annotation is fixed",
        || n.net.add(&mut sb).unwrap().ok(),
    )
    .unwrap();
    assert!(refused(&n.first_connection(&sb)));
    n.remove(sb);
}

/// The watch has not seen the pod yet: the daemon asks the API server for it.
#[test]
fn a_pod_the_watch_has_not_seen_is_fetched() {
    let n = node();
    let sb = n.lab.sandbox("shop", "fresh").unwrap();
    n.api
        .apply_unlisted(&pending_pod("shop", "fresh", &sb.uid, NODE, &[]));
    let mut sb = sb;
    add_retrying(&n.net, &mut sb, Duration::ZERO).unwrap();
    assert!(
        refused(&n.first_connection(&sb)),
        "captured from its first connection"
    );
    assert!(
        n.api
            .paths()
            .iter()
            .any(|p| p.starts_with("/api/v1/namespaces/shop/pods/fresh")),
        "{:?}",
        n.api.paths()
    );
    n.remove(sb);
}

/// A pod outside the mesh (not injected) starts and is left alone; so is one the API server
/// does not know.
#[test]
fn pods_outside_the_mesh_pass_through() {
    let n = node();
    let mut sb = n.lab.sandbox("shop", "plain").unwrap();
    let mut pod = pending_pod("shop", "plain", &sb.uid, NODE, &[]);
    pod.metadata.annotations = None;
    pod.spec
        .as_mut()
        .unwrap()
        .containers
        .retain(|c| c.name != "istio-proxy");
    n.api.apply(&pod, true);
    n.net.add(&mut sb).unwrap().unwrap();
    let r = n.first_connection(&sb);
    assert!(r.error.is_none(), "not in the mesh: direct: {r:?}");
    assert!(!n.in_status("plain"));
    n.net
        .check(&sb)
        .unwrap()
        .expect("CHECK of a pod outside the mesh");
    n.net.del(&mut sb).unwrap().unwrap();
}

/// Istio's CNI mode: the istio-validation init container (uid 1337) runs before any proxy,
/// in a pod registered at ADD, and must pass for the pod to start: IPv4 and IPv6. In a pod
/// outside the mesh the same check fails (nothing redirects), so the check can fail.
#[test]
fn istio_validation_passes_in_a_pod_registered_at_add() {
    let n = node();
    let mut sb = n.mesh_sandbox("validated", &[]);
    add_retrying(&n.net, &mut sb, Duration::ZERO).unwrap();
    for family in [&[][..], &["--ipv6"][..]] {
        let mut args = vec!["--timeout-ms", "5000"];
        args.extend_from_slice(family);
        let out: Vec<serde_json::Value> = n
            .lab
            .tool(sb.placement(Some(PROXY_UID)), "validate", &args)
            .unwrap_or_else(|e| panic!("istio-validation {family:?}: {e:#}"));
        eprintln!("istio-validation {family:?}: {}", out[0]);
        assert_eq!(out[0]["passed"], true);
        let port = if family.is_empty() {
            "127.0.0.1:15006"
        } else {
            "[::1]:15006"
        };
        assert_eq!(
            out[0]["accepted_on"], port,
            "REDIRECT's destination: loopback"
        );
    }
    n.remove(sb);

    let mut plain = n.lab.sandbox("kube-system", "unmeshed").unwrap();
    n.net.add(&mut plain).unwrap().unwrap();
    let failed = n.lab.tool::<serde_json::Value>(
        plain.placement(Some(PROXY_UID)),
        "validate",
        &["--timeout-ms", "1500"],
    );
    assert!(
        failed.is_err(),
        "validation must fail where nothing redirects"
    );
    n.net.del(&mut plain).unwrap().unwrap();
}
