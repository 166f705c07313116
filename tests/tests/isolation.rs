//! Isolation: only mesh pods' own sockets are ever redirected, and uninstalling under traffic
//! leaves new connections going direct, never refused.

use std::time::Duration;

use redirect_lab::{eventually, run, spawn, wire::ClientResult, Netns, Placement};
use redirect_tests::{lab, pods_yaml, traffic_during};

/// A namespace that is not in the mesh but has a mesh pod's IP (a stale copy, a
/// misconfiguration): its connections are not redirected, because membership is the netns
/// cookie, never the address. Its processes even share the lab's cgroup with the mesh pods.
#[test]
fn same_ip_outside_the_mesh_is_not_redirected() {
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    let sidecar = lab.start_sidecar("client").unwrap();
    lab.start_daemon(&pods_yaml(&[lab.pod("client").yaml_entry(&[])]), &[])
        .unwrap();
    lab.daemon().wait_pods(&["client"]).unwrap();
    let ip = lab.pod("client").v4.to_string();

    // twin (10.201.0.2, the mesh pod's address) <-veth-> peer (10.201.0.250, a server)
    let twin = Netns::new(format!("{}-twin", lab.id)).unwrap();
    let peer = Netns::new(format!("{}-peer", lab.id)).unwrap();
    twin.exec(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &peer.name,
    ])
    .unwrap();
    twin.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])
        .unwrap();
    twin.exec(&["ip", "link", "set", "eth0", "up"]).unwrap();
    peer.exec(&["ip", "addr", "add", "10.201.0.250/24", "dev", "eth0"])
        .unwrap();
    peer.exec(&["ip", "link", "set", "eth0", "up"]).unwrap();
    let in_lab = |ns| Placement {
        netns: Some(ns),
        cgroup: Some(&lab.cgroup),
        uid: None,
    };
    let log = lab.dir.join("twin-server.log");
    let server = spawn(
        in_lab(&peer),
        &log,
        &redirect_lab::bin("redirect-lab"),
        &["server", "--port", "8080"],
    )
    .unwrap();
    let r = eventually(
        Duration::from_secs(5),
        "the twin's server to answer",
        || {
            let r: Vec<ClientResult> = lab
                .client_at(in_lab(&twin), &["--target", "10.201.0.250:8080"])
                .unwrap();
            r[0].error.is_none().then_some(r)
        },
    )
    .unwrap();
    let seen = &r[0].reply.as_ref().unwrap().peer;
    assert_eq!(
        Some(seen),
        r[0].local.as_ref(),
        "the twin's connection was redirected"
    );
    assert!(seen.starts_with(&ip));
    assert!(
        lab.sidecar_log(sidecar).is_empty(),
        "{:?}",
        lab.sidecar_log(sidecar)
    );
    drop(server);
}

/// `redirectd uninstall` while a mesh pod keeps opening connections: none fails, and the ones
/// opened afterwards go direct.
#[test]
fn uninstall_under_traffic_never_refuses() {
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    lab.add_pod("ext").unwrap();
    let sidecar = lab.start_sidecar("client").unwrap();
    lab.start_server("ext", &[8080]).unwrap();
    lab.start_daemon(
        &pods_yaml(&[lab
            .pod("client")
            .yaml_entry(&[("redirectd.dev/failMode", "closed")])]),
        &[],
    )
    .unwrap();
    lab.daemon().wait_pods(&["client"]).unwrap();
    let mut daemon = lab.daemon.take().unwrap();
    daemon.stop();
    let target = format!("{}:8080", lab.pod("ext").v4);
    let (results, out) = traffic_during(
        &lab,
        "client",
        &["--target", &target, "--count", "10", "--concurrency", "5"],
        || daemon.uninstall(),
    );
    let out = out.unwrap();
    assert!(out.contains("uninstalled"), "{out}");
    let failed: Vec<_> = results.iter().filter(|r| r.error.is_some()).collect();
    println!(
        "uninstall under traffic: {} requests, {} failed",
        results.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        results.len(),
        failed.first()
    );
    let captured = lab.sidecar_log(sidecar).len();
    assert!(
        captured > 0 && captured < results.len(),
        "captured {captured} of {}",
        results.len()
    );
    // After uninstall: direct.
    let r = lab
        .client(Some("client"), None, &["--target", &target])
        .unwrap();
    assert_eq!(
        r[0].reply.as_ref().unwrap().peer,
        r[0].local.clone().unwrap()
    );
    assert!(!run("ls", &["/sys/fs/bpf"]).unwrap().contains(&lab.id));
}

/// An application cannot learn another connection's original destination: asked on its own
/// sockets, `SO_ORIGINAL_DST` answers that socket's own local address (never a destination
/// recorded for another connection); outside the mesh it fails as without conntrack.
#[test]
fn getsockopt_never_tells_another_connections_destination() {
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    lab.add_pod("plain").unwrap();
    lab.add_pod("ext").unwrap();
    lab.start_sidecar("client").unwrap();
    lab.start_server("ext", &[8080, 8081]).unwrap();
    lab.start_daemon(&pods_yaml(&[lab.pod("client").yaml_entry(&[])]), &[])
        .unwrap();
    lab.daemon().wait_pods(&["client"]).unwrap();
    let ext = lab.pod("ext").v4;
    let targets = [format!("{ext}:8080"), format!("{ext}:8081")];
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
                "20",
                "--hold",
            ],
        )
        .unwrap();
    for c in &r {
        assert!(c.error.is_none(), "{c:?}");
        let own = c.own_orig_dst.as_deref().unwrap();
        assert_eq!(
            Some(own),
            c.local.as_deref(),
            "an app socket was told {own}: {c:?}"
        );
        assert!(!targets.iter().any(|t| t == own), "{c:?}");
    }
    let r = lab
        .client(Some("plain"), None, &["--target", &targets[0]])
        .unwrap();
    assert!(
        r[0].own_orig_dst.as_deref().unwrap().starts_with("error"),
        "{r:?}"
    );
}

/// A connection captured just before `redirectd uninstall`, whose proxy asks
/// `SO_ORIGINAL_DST` only once the uninstall has begun (a busy proxy: 400 ms after accepting),
/// still gets its answer: capture is detached first, the answering programs only after the
/// drain. With no drain (`--drain-ms 0`) the same connection fails, which is what the drain
/// is for.
#[test]
fn uninstall_answers_connections_already_captured() {
    // Every delay below is stretched together under emulation (REDIRECT_TIME_SCALE), so the
    // order of events is the same: the proxy asks 400 ms after accepting; uninstall starts
    // 100 ms after the client; a 1.5 s drain covers the ask, none does not.
    let ms = |n: u64| redirect_lab::scaled(Duration::from_millis(n)).as_millis() as u64;
    for (drain_ms, answered) in [(ms(1500), true), (0, false)] {
        let mut lab = lab();
        lab.add_pod("client").unwrap();
        lab.add_pod("ext").unwrap();
        let sidecar = lab
            .start_sidecar_with("client", &["--answer-delay-ms", &ms(400).to_string()])
            .unwrap();
        lab.start_server("ext", &[8080]).unwrap();
        lab.start_daemon(&pods_yaml(&[lab.pod("client").yaml_entry(&[])]), &[])
            .unwrap();
        lab.daemon().wait_pods(&["client"]).unwrap();
        let mut daemon = lab.daemon.take().unwrap();
        daemon.stop();
        let target = format!("{}:8080", lab.pod("ext").v4);
        let (result, out) = std::thread::scope(|s| {
            let client = s.spawn(|| {
                lab.client(Some("client"), None, &["--target", &target])
                    .unwrap()
            });
            // The connection is captured and accepted at once; its proxy asks at 400 ms.
            std::thread::sleep(Duration::from_millis(ms(100)));
            let out = daemon.uninstall_draining(Some(drain_ms));
            (client.join().unwrap(), out)
        });
        let out = out.unwrap();
        assert!(out.contains("uninstalled"), "{out}");
        let r = &result[0];
        let records = lab.sidecar_log(sidecar);
        assert!(
            records
                .iter()
                .any(|rec| Some(&rec.peer) == r.local.as_ref()),
            "not captured: {r:?} {records:?}"
        );
        if answered {
            assert!(
                r.error.is_none() && r.reply.is_some(),
                "drain {drain_ms} ms: {r:?}"
            );
            assert_eq!(records[0].orig_dst.as_ref(), Some(&target), "{records:?}");
        } else {
            assert!(r.error.is_some(), "no drain, yet answered: {r:?}");
            assert!(
                records[0]
                    .error
                    .as_deref()
                    .unwrap_or_default()
                    .contains("SO_ORIGINAL_DST"),
                "{records:?}"
            );
        }
    }
}
