//! Envoy as the sidecar, in Istio's listener shapes (see `redirect_lab::envoy`): outbound,
//! inbound and mesh to mesh in both families, Envoy calling its own pod (rule 3), the ports
//! Envoy serves itself, its reuseport workers, and an Envoy restart.

use std::time::{Duration, Instant};

use redirect_lab::{
    envoy::{ADMIN_PORT, HEALTH_PORT, SELF_CALL_PORT, STATS_PORT},
    eventually,
    wire::EnvoyRecord,
    Lab,
};
use redirect_tests::{host_of, lab, ok, pods_yaml};

/// A lab with `mesh` pods (each with Envoy) under redirectd and `plain` pods (no sidecar), a
/// server on 8080 in each; returns the lab and each mesh pod's Envoy process index.
fn mesh(mesh: &[&str], plain: &[&str]) -> (Lab, Vec<usize>) {
    let mut lab = lab();
    let mut envoys = Vec::new();
    for p in mesh.iter().chain(plain) {
        lab.add_pod(p).unwrap();
        lab.start_server(p, &[8080]).unwrap();
    }
    for p in mesh {
        envoys.push(lab.start_envoy(p).unwrap());
    }
    let entries: Vec<String> = mesh.iter().map(|p| lab.pod(p).yaml_entry(&[])).collect();
    lab.start_daemon(&pods_yaml(&entries), &[]).unwrap();
    lab.daemon().wait_pods(mesh).unwrap();
    (lab, envoys)
}

/// The IPv4 and IPv6 address of `pod`, each as it appears before `:port` in an address.
fn hosts(lab: &Lab, pod: &str) -> [String; 2] {
    let p = lab.pod(pod);
    [p.v4.to_string(), format!("[{}]", p.v6)]
}

/// Envoy's record of the connection from `peer` on `listener`, once it is logged.
fn record(lab: &Lab, envoy: usize, listener: &str, peer: &str) -> EnvoyRecord {
    eventually(Duration::from_secs(5), "Envoy's access log line", || {
        lab.envoy_log(envoy)
            .into_iter()
            .find(|r| r.listener == listener && r.downstream_remote == peer)
    })
    .unwrap_or_else(|e| panic!("{e}: {:#?}", lab.envoy_log(envoy)))
}

#[test]
fn outbound_through_envoy_keeps_every_address() {
    let (lab, envoys) = mesh(&["client"], &["ext"]);
    let src = hosts(&lab, "client");
    for (i, dst) in hosts(&lab, "ext").iter().enumerate() {
        let target = format!("{dst}:8080");
        let r = ok(&lab
            .client(Some("client"), None, &["--target", &target])
            .unwrap())
        .clone();
        let reply = r.reply.as_ref().unwrap();
        assert_eq!(reply.local, target);
        assert_eq!(r.peername.as_deref(), Some(target.as_str()));
        let local = r.local.clone().unwrap();
        assert_eq!(host_of(&local), src[i], "the app's getsockname: {r:?}");
        let rec = record(&lab, envoys[0], "outbound", &local);
        assert_eq!(rec.downstream_local, target, "{rec:?}");
        let loopback = if i == 0 {
            "127.0.0.1:15001"
        } else {
            "[::1]:15001"
        };
        assert_eq!(rec.downstream_direct_local, loopback, "{rec:?}");
        assert_eq!(rec.upstream_host.as_ref(), Some(&target), "{rec:?}");
        // The server saw Envoy's upstream connection, from the pod's own address.
        assert_eq!(Some(&reply.peer), rec.upstream_local.as_ref(), "{rec:?}");
        assert_eq!(host_of(&reply.peer), src[i]);
    }
}

#[test]
fn inbound_and_mesh_to_mesh_through_envoy() {
    let (mut lab, envoys) = mesh(&["client", "srv"], &["plain"]);
    for from in ["plain", "client"] {
        for (i, dst) in hosts(&lab, "srv").iter().enumerate() {
            let target = format!("{dst}:8080");
            let r = ok(&lab
                .client(Some(from), None, &["--target", &target])
                .unwrap())
            .clone();
            let reply = r.reply.as_ref().unwrap();
            // The application answers through Envoy's inbound passthrough.
            let passthrough = if i == 0 { "127.0.0.6" } else { "[::6]" };
            assert_eq!(host_of(&reply.peer), passthrough, "{from}: {r:?}");
            assert_eq!(reply.local, target);
            let client_side = if from == "client" {
                // Mesh to mesh: the client's Envoy connected upstream from its pod address.
                let rec = record(&lab, envoys[0], "outbound", r.local.as_ref().unwrap());
                assert_eq!(rec.downstream_local, target);
                rec.upstream_local.unwrap()
            } else {
                r.local.clone().unwrap()
            };
            let rec = record(&lab, envoys[1], "inbound", &client_side);
            assert_eq!(rec.downstream_local, target, "{from}: {rec:?}");
            // sk_lookup hands the connection over unchanged, as TPROXY would: the accepted
            // socket's own local address is the original destination (REDIRECT: pod:15006).
            assert_eq!(rec.downstream_direct_local, target, "{from}: {rec:?}");
            assert_eq!(rec.upstream_host.as_ref(), Some(&target));
            assert_eq!(host_of(rec.upstream_local.as_deref().unwrap()), passthrough);
        }
    }
    let st = lab.daemon().pod_status("srv").unwrap();
    assert_eq!(st.counter("inbound_captured"), 4, "{st:#?}");
}

/// Envoy calling a service whose endpoint is its own pod (Istio's rule 3): sent to its own
/// inbound listener on loopback, which restores the address called and passes it on.
#[test]
fn envoy_calling_its_own_pod_goes_through_its_inbound_listener() {
    let (lab, envoys) = mesh(&["srv"], &[]);
    let pod_ip = lab.pod("srv").v4.to_string();
    let r = ok(&lab
        .client(
            Some("srv"),
            None,
            &["--target", &format!("127.0.0.1:{SELF_CALL_PORT}")],
        )
        .unwrap())
    .clone();
    let reply = r.reply.as_ref().unwrap();
    assert_eq!(host_of(&reply.peer), "127.0.0.6", "{r:?}");
    assert_eq!(reply.local, format!("{pod_ip}:8080"));
    let rec = eventually(Duration::from_secs(5), "Envoy's inbound record", || {
        lab.envoy_log(envoys[0])
            .into_iter()
            .find(|r| r.listener == "inbound")
    })
    .unwrap();
    assert_eq!(rec.downstream_local, format!("{pod_ip}:8080"), "{rec:?}");
    assert_eq!(rec.downstream_direct_local, "127.0.0.1:15006", "{rec:?}");
    assert_eq!(host_of(&rec.downstream_remote), pod_ip, "{rec:?}");
}

/// Envoy's own ports are never captured: the node probes 15021 and scrapes 15090 directly,
/// the application reaches the admin port on loopback directly.
#[test]
fn envoys_own_ports_are_never_captured() {
    let (mut lab, envoys) = mesh(&["srv"], &[]);
    for host in hosts(&lab, "srv") {
        for (port, body) in [(HEALTH_PORT, "ready"), (STATS_PORT, "# stats")] {
            let url = format!("http://{host}:{port}/healthz/ready");
            let out = lab
                .node
                .exec(&["curl", "-sS", "--max-time", "5", "-g", &url])
                .unwrap_or_else(|e| panic!("{url}: {e:#}"));
            assert_eq!(out.trim(), body, "{url}");
        }
    }
    let admin =
        redirect_tests::curl(&lab, "srv", &format!("http://127.0.0.1:{ADMIN_PORT}/ready")).unwrap();
    assert_eq!(admin.trim(), "LIVE");
    let log = eventually(Duration::from_secs(5), "Envoy's health records", || {
        let log = lab.envoy_log(envoys[0]);
        (log.iter().filter(|r| r.listener == "health").count() == 2).then_some(log)
    })
    .unwrap_or_else(|e| panic!("{e}: {}", lab.procs[envoys[0]].log_text()));
    assert!(
        log.iter().all(|r| r.listener != "inbound"),
        "a probe went through virtualInbound: {log:#?}"
    );
    // Delivered to the port it was sent to, from the node's address.
    for r in &log {
        assert_eq!(r.downstream_direct_local, r.downstream_local, "{r:?}");
        assert!(
            r.downstream_remote.starts_with("10.201.0.1:")
                || r.downstream_remote.starts_with("[fd00:201::1]:"),
            "{r:?}"
        );
    }
    let st = lab.daemon().pod_status("srv").unwrap();
    assert_eq!(st.counter("inbound_captured"), 0, "{st:#?}");
    assert_eq!(st.counter("outbound_captured"), 0, "{st:#?}");
}

/// Envoy's counter for `listener` (e.g. `0.0.0.0_15001`) on each of its two workers.
fn per_worker(lab: &Lab, pod: &str, listener: &str) -> [u64; 2] {
    let stats = redirect_tests::curl(
        lab,
        pod,
        &format!("http://127.0.0.1:{ADMIN_PORT}/stats?filter=listener.{listener}.worker_"),
    )
    .unwrap();
    let mut out = [0; 2];
    for (w, n) in out.iter_mut().enumerate() {
        let name = format!("listener.{listener}.worker_{w}.downstream_cx_total: ");
        *n = stats
            .lines()
            .find_map(|l| l.strip_prefix(&name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {stats}"));
    }
    out
}

/// Envoy's listeners are reuseport groups (one socket per worker): captured connections,
/// outbound and inbound, are spread over both workers.
#[test]
fn captured_connections_reach_both_envoy_workers() {
    let (lab, _) = mesh(&["srv"], &["plain"]);
    let srv = lab.pod("srv").v4.to_string();
    let plain = lab.pod("plain").v4.to_string();
    let n = "40";
    let out = lab
        .client(
            Some("srv"),
            None,
            &["--target", &format!("{plain}:8080"), "--count", n],
        )
        .unwrap();
    assert!(out.iter().all(|r| r.error.is_none()), "{out:?}");
    let inb = lab
        .client(
            Some("plain"),
            None,
            &["--target", &format!("{srv}:8080"), "--count", n],
        )
        .unwrap();
    assert!(inb.iter().all(|r| r.error.is_none()), "{inb:?}");
    for listener in ["0.0.0.0_15001", "0.0.0.0_15006"] {
        let w = per_worker(&lab, "srv", listener);
        assert!(w[0] > 0 && w[1] > 0, "{listener}: per worker {w:?}");
        assert_eq!(w[0] + w[1], 40, "{listener}: per worker {w:?}");
    }
}

/// Envoy killed: connections are refused (fail closed, the default, as under Istio; counted);
/// Envoy started again: captured again within a second of its new listeners.
#[test]
fn envoy_restart() {
    let (mut lab, envoys) = mesh(&["client"], &["ext"]);
    let target = format!("{}:8080", lab.pod("ext").v4);
    // Through Envoy, the server sees Envoy's upstream socket, not the application's.
    let captured = |lab: &Lab| {
        let r = ok(&lab
            .client(Some("client"), None, &["--target", &target])
            .unwrap())
        .clone();
        Some(&r.reply.as_ref().unwrap().peer) != r.local.as_ref()
    };
    assert!(captured(&lab));
    lab.procs[envoys[0]].kill();
    let r = lab
        .client(Some("client"), None, &["--target", &target])
        .unwrap();
    assert!(
        r[0].reply.is_none()
            && r[0]
                .error
                .as_deref()
                .is_some_and(|e| e.contains("Operation not permitted")),
        "fail closed: refused, not direct: {r:?}"
    );
    lab.start_envoy("client").unwrap();
    let listening = Instant::now();
    eventually(
        Duration::from_secs(1),
        "capture after Envoy's restart",
        || captured(&lab).then_some(()),
    )
    .unwrap();
    eprintln!(
        "captured again {:?} after Envoy listened",
        listening.elapsed()
    );
    let st = lab.daemon().pod_status("client").unwrap();
    assert!(st.counter("outbound_fail_closed") >= 1, "{st:#?}");
}

/// Inbound from the node itself (a kubelet, a node-local agent) and from another node, both
/// families: Envoy's `virtualInbound` first, with the real client address as its peer.
#[test]
fn inbound_from_the_node_and_another_node_through_envoy() {
    let mut lab = lab();
    lab.add_pod("srv").unwrap();
    lab.add_remote_node().unwrap();
    lab.start_server("srv", &[8080]).unwrap();
    let envoy = lab.start_envoy("srv").unwrap();
    lab.start_daemon(&pods_yaml(&[lab.pod("srv").yaml_entry(&[])]), &[])
        .unwrap();
    lab.daemon().wait_pods(&["srv"]).unwrap();
    for dst in hosts(&lab, "srv") {
        let target = format!("{dst}:8080");
        for (who, netns) in [
            ("node", Some(&lab.node)),
            ("other node", lab.remote.as_ref()),
        ] {
            let placement = redirect_lab::Placement {
                netns,
                cgroup: Some(&lab.cgroup),
                uid: None,
            };
            let r = ok(&lab.client_at(placement, &["--target", &target]).unwrap()).clone();
            let reply = r.reply.as_ref().unwrap();
            assert!(
                host_of(&reply.peer) == "127.0.0.6" || host_of(&reply.peer) == "[::6]",
                "{who}: {r:?}"
            );
            let rec = record(&lab, envoy, "inbound", r.local.as_ref().unwrap());
            assert_eq!(rec.downstream_local, target, "{who}: {rec:?}");
        }
    }
}

/// Same-node acceleration between two Envoys: echo of random bytes, 1 MiB and 64 MiB and 50
/// concurrent streams, comes back intact, and the sidecar-to-sidecar hop was spliced (the
/// `sk_msg` byte counters moved by at least twice the largest echo).
#[test]
fn accelerated_between_two_envoys() {
    let mut lab = lab();
    for p in ["a", "b"] {
        lab.add_pod(p).unwrap();
    }
    lab.start_echo_server("b", 7000, None).unwrap();
    for p in ["a", "b"] {
        lab.start_envoy(p).unwrap();
    }
    let entries: Vec<String> = ["a", "b"]
        .iter()
        .map(|p| lab.pod(p).yaml_entry(&[]))
        .collect();
    // Forced on: Envoy meets only differences that do not touch its data (docs/acceleration.md).
    lab.start_daemon(&pods_yaml(&entries), &["--accel", "on"])
        .unwrap();
    lab.daemon().wait_pods(&["a", "b"]).unwrap();
    let t = format!("{}:7000", lab.pod("b").v4);
    for (size, streams) in [("1048576", "1"), ("67108864", "1"), ("262144", "50")] {
        let r = lab
            .echo("a", &["--target", &t, "--size", size, "--streams", streams])
            .unwrap();
        assert_eq!(r.len(), streams.parse::<usize>().unwrap());
        for s in &r {
            assert!(s.intact && s.outcome == "ok", "{size} bytes: {s:?}");
        }
    }
    let d = lab.daemon();
    let moved: u64 = ["a", "b"]
        .iter()
        .map(|p| d.pod_status(p).unwrap().counter("accel_bytes"))
        .sum();
    assert!(moved >= 2 * (64 << 20), "only {moved} bytes accelerated");
}
