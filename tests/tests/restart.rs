//! A daemon killed with SIGKILL under traffic and started again: no failed request, no
//! connection that escaped capture, and the maps exactly as they were.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use redirect_lab::wire::ClientResult;
use redirect_tests::{lab, mesh_with_echo, pods_yaml};

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
    let maps = ["MESH_PODS", "PORT_RULES", "ADDR_RULES", "NODE_ADDRS"];
    let before: Vec<String> = maps.iter().map(|m| dump(&daemon.pin_dir, m)).collect();
    let targets = [
        format!("{}:8080", lab.pod("ext").v4),
        format!("{}:8080", lab.pod("srv").v4),
    ];

    let stop = AtomicBool::new(false);
    let results: Vec<ClientResult> = std::thread::scope(|s| {
        let traffic = s.spawn(|| {
            let mut all = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let r = lab
                    .client(
                        Some("client"),
                        None,
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
                    )
                    .unwrap();
                all.extend(r);
            }
            all
        });
        std::thread::sleep(Duration::from_millis(300));
        daemon.proc.as_mut().unwrap().kill();
        // No daemon at all for a while: the pinned programs keep capturing.
        std::thread::sleep(Duration::from_millis(300));
        daemon.restart().unwrap();
        daemon.wait_pods(&["client", "srv"]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        traffic.join().unwrap()
    });
    assert!(results.len() >= 100, "only {} requests", results.len());
    println!(
        "kill -9 + restart under traffic: {} requests",
        results.len()
    );
    let failed: Vec<_> = results
        .iter()
        .filter(|r| r.error.is_some() || r.reply.is_none())
        .collect();
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
        results.len(),
        "sidecar saw {} of {}",
        records.len(),
        results.len()
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
