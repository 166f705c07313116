//! A daemon killed with SIGKILL under traffic and started again, or upgraded to another
//! binary: no failed request, no connection that escaped capture, and the maps exactly as
//! they were. A pod removed mid-connection keeps its open connections.

use std::time::Duration;

use redirect_common::map_names;
use redirect_tests::{lab, mesh_with_echo, pods_yaml, traffic_during};

fn dump(pin_dir: &std::path::Path, map: &str) -> String {
    let path = pin_dir.join("maps").join(map);
    redirect_lab::run(
        "bpftool",
        &["-j", "map", "dump", "pinned", path.to_str().unwrap()],
    )
    .unwrap()
}

#[test]
fn kill_9_and_restart_under_traffic_loses_nothing() {
    replace_daemon_under_traffic("kill -9 + restart", |daemon| {
        daemon.proc.as_mut().unwrap().kill();
        // No daemon at all for a while: the pinned programs keep capturing.
        std::thread::sleep(Duration::from_millis(300));
        daemon.restart().unwrap();
    });
}

/// An upgrade as a DaemonSet rolls it: the old daemon gets SIGTERM, a different executable
/// starts on the same pins, and its kernel programs differ from the old ones (another log
/// level is compiled into them, as a new version's code would differ): they replace the old
/// programs under traffic, which loses nothing.
#[test]
fn upgrade_to_another_binary_under_traffic_loses_nothing() {
    let old_ids = std::cell::RefCell::new(Vec::new());
    replace_daemon_under_traffic("upgrade (SIGTERM, another binary)", |daemon| {
        *old_ids.borrow_mut() = program_ids(daemon);
        // The new version, in the lab's directory (removed with the lab).
        let next = daemon.pods_file.with_file_name("redirectd-next");
        std::fs::copy(redirect_lab::bin("redirectd"), &next).unwrap();
        daemon.stop();
        daemon.upgrade_to(next, "debug");
        daemon.restart().unwrap();
        let new_ids = program_ids(daemon);
        let old = old_ids.borrow();
        assert_eq!(new_ids.len(), old.len(), "{new_ids:?} vs {old:?}");
        assert!(
            new_ids.iter().all(|id| !old.contains(id)),
            "the upgrade kept old programs: {new_ids:?} vs {old:?}"
        );
    });
    // The old programs are gone from the kernel, not only from the pins.
    let live = redirect_lab::run("bpftool", &["-j", "prog", "show"]).unwrap();
    let live: Vec<serde_json::Value> = serde_json::from_str(&live).unwrap();
    for id in old_ids.borrow().iter() {
        assert!(
            !live
                .iter()
                .any(|p| p["id"].as_u64() == Some(u64::from(*id))),
            "old program {id} still loaded"
        );
    }
}

/// The ids of the node-wide programs the daemon loaded (the per-pod inbound program is
/// listed with id 0: one a pod, adopted across restarts).
fn program_ids(daemon: &redirect_lab::Daemon) -> Vec<u32> {
    daemon
        .status()
        .unwrap()
        .programs
        .iter()
        .map(|p| p.id)
        .filter(|&id| id != 0)
        .collect()
}

/// Traffic from a mesh pod to a plain and a mesh destination while `replace` takes the daemon
/// away and brings it (or its successor) back: no failed request, none that escaped capture,
/// the endpoint maps exactly as before, and the new daemon took the old one's state over.
fn replace_daemon_under_traffic(what: &str, replace: impl FnOnce(&mut redirect_lab::Daemon)) {
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    lab.add_pod("srv").unwrap();
    lab.add_pod("ext").unwrap();
    let sidecar = lab.start_sidecar("client").unwrap();
    lab.start_sidecar("srv").unwrap();
    lab.start_server("ext", &[8080]).unwrap();
    lab.start_server("srv", &[8080]).unwrap();
    let yaml = pods_yaml(&[
        lab.pod("client")
            .yaml_entry(&[("traffic.sidecar.istio.io/excludeOutboundPorts", "5432")]),
        lab.pod("srv").yaml_entry(&[]),
    ]);
    lab.start_daemon(&yaml, &[]).unwrap();
    lab.daemon().wait_pods(&["client", "srv"]).unwrap();
    let mut daemon = lab.daemon.take().unwrap();
    let maps = [
        map_names::MESH_PODS,
        map_names::PORT_RULES,
        map_names::ADDR_RULES,
        map_names::NODE_ADDRS,
    ];
    let before: Vec<String> = maps.iter().map(|m| dump(&daemon.pin_dir, m)).collect();
    let targets = [
        format!("{}:8080", lab.pod("ext").v4),
        format!("{}:8080", lab.pod("srv").v4),
    ];

    // Connections opened before the daemon goes and still open after its successor took
    // over: the application's getpeername() still shows the original destination (kept in
    // the socket's own storage, a map pinned across runs).
    let (held, (results, ())) = std::thread::scope(|s| {
        let held = s.spawn(|| {
            let args = [
                "--target",
                &targets[0],
                "--count",
                "4",
                "--concurrency",
                "4",
            ];
            let hold = ["--hold", "--hold-ms", "6000", "--timeout-ms", "3000"];
            lab.client(Some("client"), None, &[&args[..], &hold[..]].concat())
                .unwrap()
        });
        std::thread::sleep(Duration::from_millis(500));
        let traffic = traffic_during(
            &lab,
            "client",
            &[
                "--target",
                &targets[0],
                "--target",
                &targets[1],
                "--count",
                "20",
                "--concurrency",
                "5",
            ],
            || {
                replace(&mut daemon);
                daemon.wait_pods(&["client", "srv"]).unwrap();
            },
        );
        (held.join().unwrap(), traffic)
    });
    assert_eq!(held.len(), 4);
    for r in &held {
        assert_eq!(r.error, None, "{r:?}");
        assert_eq!(
            r.peername_held.as_deref(),
            Some(targets[0].as_str()),
            "a connection opened before the {what} lost its original destination: {r:?}"
        );
    }
    assert!(results.len() >= 100, "only {} requests", results.len());
    let failed: Vec<_> = results
        .iter()
        .filter(|r| r.error.is_some() || r.reply.is_none())
        .collect();
    println!(
        "{what} under traffic: {} requests, {} failed",
        results.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} failed, e.g. {:?}",
        failed.len(),
        results.len(),
        failed[0]
    );
    // Every one went through the sidecar: none escaped capture while the daemon was away.
    let records = lab.sidecar_log(sidecar);
    assert_eq!(
        records.len(),
        results.len() + held.len(),
        "sidecar saw {} of {}",
        records.len(),
        results.len() + held.len()
    );
    let after: Vec<String> = maps.iter().map(|m| dump(&daemon.pin_dir, m)).collect();
    assert_eq!(before, after, "maps changed across the restart");
    assert!(
        daemon
            .log_text()
            .contains("taken over from the previous run unchanged"),
        "{}",
        daemon.log_text()
    );
    // One generation of links left: the new daemon's.
    let generations = std::fs::read_dir(daemon.pin_dir.join("links"))
        .unwrap()
        .count();
    assert_eq!(generations, 1, "link generations left: {generations}");
    lab.daemon = Some(daemon);
}

/// A pod removed from the mesh while its connections are open: they carry on, byte-exact
/// (through both sidecars, accelerated); only new connections are no longer captured.
#[test]
fn pod_removed_mid_connection_keeps_its_open_connections() {
    let mut lab = mesh_with_echo(&[]);
    let b_only = pods_yaml(&[lab.pod("b").yaml_entry(&[])]);
    let daemon = lab.daemon.take().unwrap();
    let t = format!("{}:7000", lab.pod("b").v4);
    let results = std::thread::scope(|s| {
        let stream = s.spawn(|| {
            lab.echo(
                "a",
                &[
                    "--target",
                    &t,
                    "--size",
                    "16777216",
                    "--streams",
                    "4",
                    "--slow-read-us",
                    "200",
                ],
            )
            .unwrap()
        });
        std::thread::sleep(Duration::from_millis(300));
        daemon.write_pods(&b_only).unwrap();
        daemon.wait_pods(&["b"]).unwrap();
        stream.join().unwrap()
    });
    for r in &results {
        assert!(r.intact && r.outcome == "ok", "{r:?}");
    }
    assert!(
        results.iter().all(|r| r.micros > 300_000),
        "streams ended before the pod was removed: {results:?}"
    );
}
