//! Helpers shared by the integration tests in `tests/`.

pub use redirect_node::fake_apiserver;

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use redirect_lab::{istio_iptables::Options, wire::ClientResult, Lab, Netns, Placement, Report};

/// A lab, or a loud failure naming what the test needs.
pub fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| {
        panic!("this test needs root, iproute2, cgroup v2 and BPF (run `cargo xtask test`): {e:#}")
    })
}

/// A lab set up as a node serving the CNI plugin: its daemon takes pods from a fake API
/// server (node `node`) and serves `redirect-cni` on `socket`; `dst` (`dst:8080`) is a
/// destination outside the mesh.
pub struct CniLab {
    pub lab: Lab,
    pub api: fake_apiserver::FakeApiServer,
    pub net: redirect_lab::cni::CniNetwork,
    pub dst: String,
    pub state: std::path::PathBuf,
}

pub fn cni_lab(node: &str) -> CniLab {
    let mut lab = lab();
    lab.add_pod("dst").unwrap();
    lab.start_server("dst", &[8080]).unwrap();
    let dst = format!("{}:8080", lab.pod("dst").v4);
    let api = fake_apiserver::FakeApiServer::start();
    let socket = lab.dir.join("cni.sock");
    let state = lab.dir.join("cni-state.json");
    let (socket_s, state_s) = (socket.display().to_string(), state.display().to_string());
    lab.start_daemon(
        "pods: []\n",
        &[
            "--kubernetes",
            "--node-name",
            node,
            "--kube-api-url",
            &api.url,
            "--cni-socket",
            &socket_s,
            "--cni-state",
            &state_s,
        ],
    )
    .unwrap();
    let net = lab
        .cni_network(serde_json::json!({"socket": socket, "timeoutSeconds": 10}))
        .unwrap();
    CniLab {
        lab,
        api,
        net,
        dst,
        state,
    }
}

/// The one result of a client run of one connection, which succeeded.
pub fn ok(r: &[ClientResult]) -> &ClientResult {
    assert_eq!(r.len(), 1);
    assert!(r[0].error.is_none(), "{:?}", r[0]);
    &r[0]
}

/// Did the sidecar (process `sidecar`) take this connection: does its log have the
/// application's address as a peer?
pub fn captured(lab: &Lab, sidecar: usize, r: &ClientResult) -> bool {
    assert!(r.error.is_none(), "{r:?}");
    taken_by(&lab.sidecar_log(sidecar), r)
}

/// Is the connection `r` in a sidecar's log `log` (the application's address as a peer)?
pub fn taken_by(log: &[redirect_lab::wire::ProxyRecord], r: &ClientResult) -> bool {
    log.iter().any(|rec| Some(&rec.peer) == r.local.as_ref())
}

/// The host part of an address (`10.0.0.1:80` -> `10.0.0.1`, `[::1]:80` -> `[::1]`).
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// The pods file for `entries` (from `Pod::yaml_entry`).
pub fn pods_yaml(entries: &[String]) -> String {
    format!("pods:\n{}", entries.concat())
}

/// Runs curl in a pod and returns the body.
pub fn curl(lab: &Lab, pod: &str, url: &str) -> anyhow::Result<String> {
    lab.run_in(pod, None, "curl", &["-sS", "--max-time", "5", "-g", url])
}

/// A lab with mesh pods `a` (client app + sidecar) and `b` (echo server app on 7000 +
/// sidecar), `annotations` on both, and the daemon serving them with acceleration on.
pub fn mesh_with_echo(annotations: &[(&str, &str)]) -> Lab {
    mesh_with_echo_and(annotations, |lab, pod| {
        lab.start_sidecar(pod).unwrap();
    })
}

/// [`mesh_with_echo`] with each pod's sidecar started by `sidecar`.
pub fn mesh_with_echo_and(annotations: &[(&str, &str)], sidecar: impl Fn(&mut Lab, &str)) -> Lab {
    let mut lab = lab();
    lab.add_pod("a").unwrap();
    lab.add_pod("b").unwrap();
    sidecar(&mut lab, "a");
    sidecar(&mut lab, "b");
    lab.start_echo_server("b", 7000, None).unwrap();
    let yaml = pods_yaml(&[
        lab.pod("a").yaml_entry(annotations),
        lab.pod("b").yaml_entry(annotations),
    ]);
    // Forced on (the default turns it off where a spliced socket differs from TCP).
    lab.start_daemon(&yaml, &["--accel", "on"]).unwrap();
    lab.daemon().wait_pods(&["a", "b"]).unwrap();
    lab
}

/// How full the connection maps are: `(SOCK_PAIRS, ORIG_BY_TUPLE)`. (`ORIG_BY_SOCK` is the
/// sockets' own storage, freed with them.)
pub type Fill = (usize, usize);

fn fill_of(status: &Report) -> Fill {
    (status.sock_pairs, status.orig_by_tuple)
}

/// The connection maps' fill now.
pub fn map_fill(lab: &mut Lab) -> Fill {
    fill_of(&lab.daemon().status().unwrap())
}

/// Waits until the connection maps are back to `start`; returns the status then.
pub fn wait_maps_back(lab: &mut Lab, start: Fill) -> Report {
    lab.daemon()
        .wait_status("maps back to their starting size", |s| fill_of(s) == start)
        .unwrap()
}

/// Runs the lab client in `pod` with `client_args` again and again around `disrupt`: 300 ms
/// of traffic, `disrupt`, 300 ms more. The traffic stops whatever `disrupt` does (its panic is
/// raised again once the traffic has stopped). Returns every connection's result and what
/// `disrupt` returned.
pub fn traffic_during<T>(
    lab: &Lab,
    pod: &str,
    client_args: &[&str],
    disrupt: impl FnOnce() -> T,
) -> (Vec<ClientResult>, T) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let traffic = s.spawn(|| {
            let mut all = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                all.extend(lab.client(Some(pod), None, client_args).unwrap());
            }
            all
        });
        std::thread::sleep(Duration::from_millis(300));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let value = disrupt();
            std::thread::sleep(Duration::from_millis(300));
            value
        }));
        stop.store(true, Ordering::SeqCst);
        let all = traffic.join().unwrap();
        match outcome {
            Ok(value) => (all, value),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// How one connection looked, for the side-by-side tests: its outcome, the addresses the
/// client and the server saw, and which of the pod's Envoy listeners took it (none: direct;
/// sorted, since Envoy logs a connection when it closes and the order of two is not the
/// test's).
pub fn seen(lab: &Lab, envoy: usize, placement: Placement<'_>, target: &str) -> String {
    let before = lab.envoy_log(envoy).len();
    let r = lab
        .client_at(placement, &["--target", target, "--timeout-ms", "3000"])
        .unwrap();
    let r = &r[0];
    let mut listeners: Vec<String> = lab
        .envoy_log_since(envoy, before)
        .into_iter()
        .map(|e| e.listener)
        .collect();
    listeners.sort();
    format!(
        "error {:?}; client {:?} -> {:?}; server {:?}; envoy {listeners:?}",
        r.error,
        r.local.as_deref().map(host_of),
        r.peername,
        r.reply.as_ref().map(|s| (&s.local, host_of(&s.peer))),
    )
}

/// Prints each `(what, how it looked)` row under Istio's rules and under redirectd, and fails
/// naming every row that differs.
pub fn assert_same_rows(reference: &[(String, String)], ours: &[(String, String)]) {
    assert_same_rows_as("istio-iptables", reference, ours);
}

/// [`assert_same_rows`] with another mesh's rules (`name`) as the reference.
pub fn assert_same_rows_as(name: &str, reference: &[(String, String)], ours: &[(String, String)]) {
    assert_eq!(reference.len(), ours.len(), "not the same rows");
    let mut differences = Vec::new();
    for ((what, a), (_, b)) in reference.iter().zip(ours) {
        println!("{what}\n  {name:<14} {a}\n  redirectd      {b}");
        if a != b {
            differences.push(format!("{what}:\n  {name:<14} {a}\n  redirectd      {b}"));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

/// Starts the daemon serving `pod` with `options` as its annotations (the pods file), and
/// waits until it is applied.
pub fn serve_with(lab: &mut Lab, pod: &str, options: &Options) {
    let ann = options.annotations();
    let ann: Vec<(&str, &str)> = ann.iter().map(|(k, v)| (*k, v.as_str())).collect();
    lab.start_daemon(&pods_yaml(&[lab.pod(pod).yaml_entry(&ann)]), &[])
        .unwrap();
    lab.daemon().wait_pods(&[pod]).unwrap();
}

/// A second link of `pod`: a veth from its namespace (`ends[0]`) to `side` (`ends[1]`), each
/// end `(device, IPv4/len, IPv6/len)`, up.
pub fn link_pod_to(lab: &Lab, pod: &str, side: &Netns, ends: [(&str, &str, &str); 2]) {
    let [(pod_dev, ..), (side_dev, ..)] = ends;
    let pod_ns = &lab.pod(pod).netns;
    redirect_lab::run(
        "ip",
        &[
            "link",
            "add",
            pod_dev,
            "netns",
            &pod_ns.name,
            "type",
            "veth",
            "peer",
            "name",
            side_dev,
            "netns",
            &side.name,
        ],
    )
    .unwrap();
    for (ns, (dev, v4, v6)) in [(pod_ns, ends[0]), (side, ends[1])] {
        ns.exec(&["ip", "addr", "add", v4, "dev", dev]).unwrap();
        ns.exec(&["ip", "-6", "addr", "add", v6, "dev", dev, "nodad"])
            .unwrap();
        ns.exec(&["ip", "link", "set", dev, "up"]).unwrap();
    }
}

/// The side-by-side tests' lab: pods `app`, `plain` and `ext`, a server on `app_ports` in
/// `app` and on 8080 in `ext`, and Envoy in `app` in `mode`. Returns it and Envoy's index.
pub fn app_plain_ext(app_ports: &[u16], mode: redirect_lab::envoy::Mode) -> (Lab, usize) {
    let mut lab = lab();
    for p in ["app", "plain", "ext"] {
        lab.add_pod(p).unwrap();
    }
    lab.start_server("app", app_ports).unwrap();
    lab.start_server("ext", &[8080]).unwrap();
    let envoy = lab.start_envoy_in("app", mode).unwrap();
    (lab, envoy)
}
