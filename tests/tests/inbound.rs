//! Inbound capture with sk_lookup on the real kernel: every connection into a mesh pod from
//! outside it reaches the pod's sidecar first, whoever and wherever the sender is.

use std::time::{Duration, Instant};

use redirect_lab::{
    eventually,
    wire::{ClientResult, ProxyRecord},
    Lab, Placement,
};
use redirect_tests::{lab, ok, pods_yaml};

/// The app saw the connection come from the sidecar's passthrough address.
fn via_passthrough(r: &ClientResult) -> bool {
    let peer = &r.reply.as_ref().unwrap().peer;
    peer.starts_with("127.0.0.6:") || peer.starts_with("[::6]:")
}

fn inbound_records(lab: &Lab, sidecar: usize) -> Vec<ProxyRecord> {
    let all = lab.sidecar_log(sidecar);
    assert!(
        all.iter().all(|r| r.event != "error"),
        "sidecar errors: {all:#?}"
    );
    all.into_iter().filter(|r| r.event == "inbound").collect()
}

/// Inbound to an app port from another mesh pod, a non-mesh pod, the node ("host") and a
/// namespace playing another node (routed through a second bridge), IPv4 and IPv6: each
/// reaches the sidecar first, which sees the original destination and the real client; the
/// app answers through it. The sidecar's own connection to the app (from 127.0.0.6 / ::6)
/// reaches the app, not the sidecar again.
#[test]
fn inbound_from_everywhere_reaches_the_sidecar_first() {
    let mut lab = lab();
    lab.add_pod("srv").unwrap();
    lab.add_pod("meshc").unwrap();
    lab.add_pod("plain").unwrap();
    lab.add_remote_node().unwrap();
    let srv_sidecar = lab.start_sidecar("srv").unwrap();
    let meshc_sidecar = lab.start_sidecar("meshc").unwrap();
    lab.start_server("srv", &[8080]).unwrap();
    let yaml = pods_yaml(&[
        lab.pod("srv").yaml_entry(&[]),
        lab.pod("meshc").yaml_entry(&[]),
    ]);
    lab.start_daemon(&yaml, &[]).unwrap();
    lab.daemon().wait_pods(&["meshc", "srv"]).unwrap();

    let srv = lab.pod("srv");
    let targets = [format!("{}:8080", srv.v4), format!("[{}]:8080", srv.v6)];
    let mut expected_inbound = 0;
    for target in &targets {
        // Direct senders: the real client address is the client socket's own.
        let senders: Vec<(&str, Placement)> = vec![
            ("non-mesh pod", lab.pod("plain").placement()),
            (
                "node",
                Placement {
                    netns: Some(&lab.node),
                    cgroup: Some(&lab.cgroup),
                    uid: None,
                },
            ),
            (
                "other node",
                Placement {
                    netns: lab.remote.as_ref(),
                    cgroup: Some(&lab.cgroup),
                    uid: None,
                },
            ),
        ];
        for (who, placement) in senders {
            let r = lab.client_at(placement, &["--target", target]).unwrap();
            let r = ok(&r);
            assert!(via_passthrough(r), "{who}: app was reached directly: {r:?}");
            assert_eq!(r.reply.as_ref().unwrap().local, *target, "{who}");
            let recs = inbound_records(&lab, srv_sidecar);
            expected_inbound += 1;
            assert_eq!(recs.len(), expected_inbound, "{who}: {recs:#?}");
            let rec = recs.last().unwrap();
            assert_eq!(rec.orig_dst.as_deref(), Some(target.as_str()), "{who}");
            assert_eq!(
                rec.local, *target,
                "{who}: the accepted socket's local address is the destination"
            );
            assert_eq!(
                Some(&rec.peer),
                r.local.as_ref(),
                "{who}: the sidecar sees the real client"
            );
            assert_eq!(
                rec.upstream_local.as_ref(),
                Some(&r.reply.as_ref().unwrap().peer),
                "{who}"
            );
        }
        // Another mesh pod: its sidecar (outbound), then srv's sidecar (inbound), then the app.
        let r = lab
            .client(Some("meshc"), None, &["--target", target])
            .unwrap();
        let r = ok(&r);
        assert!(via_passthrough(r), "{r:?}");
        let out = lab.sidecar_log(meshc_sidecar);
        let out = out.last().unwrap();
        assert_eq!(out.event, "outbound");
        assert_eq!(out.orig_dst.as_deref(), Some(target.as_str()));
        let recs = inbound_records(&lab, srv_sidecar);
        expected_inbound += 1;
        assert_eq!(recs.len(), expected_inbound, "{recs:#?}");
        let rec = recs.last().unwrap();
        assert_eq!(rec.orig_dst.as_deref(), Some(target.as_str()));
        assert_eq!(
            Some(&rec.peer),
            out.upstream_local.as_ref(),
            "srv's sidecar sees meshc's sidecar"
        );
    }
    let st = lab.daemon().pod_status("srv").unwrap();
    assert_eq!(
        st.counter("inbound_captured"),
        expected_inbound as u64,
        "{st:#?}"
    );
}

/// Istio's row 3: the proxy calling its own pod's address (a service resolving to itself)
/// goes through the inbound listener, with SO_ORIGINAL_DST the address it called; the app
/// calling its own pod goes direct.
#[test]
fn proxy_calling_its_own_pod_goes_through_inbound() {
    let mut lab = lab();
    lab.add_pod("srv").unwrap();
    // Inbound listeners on loopback only: REDIRECT sends a locally made connection to
    // 127.0.0.1 (::1), so under Istio's rules such a listener is reached; so must it be here.
    let sidecar = lab
        .start_sidecar_with("srv", &["--inbound-loopback"])
        .unwrap();
    lab.start_server("srv", &[8080]).unwrap();
    lab.start_daemon(&pods_yaml(&[lab.pod("srv").yaml_entry(&[])]), &[])
        .unwrap();
    lab.daemon().wait_pods(&["srv"]).unwrap();
    let srv = lab.pod("srv");
    let target = format!("{}:8080", srv.v4);
    let target6 = format!("[{}]:8080", srv.v6);

    for (target, ip, loopback) in [
        (&target, srv.v4.to_string(), "127.0.0.1:15006"),
        (&target6, format!("[{}]", srv.v6), "[::1]:15006"),
    ] {
        let r = lab
            .client(
                Some("srv"),
                Some(redirect_lab::PROXY_UID),
                &["--target", target],
            )
            .unwrap();
        assert!(via_passthrough(ok(&r)), "{r:?}");
        let recs = inbound_records(&lab, sidecar);
        let rec = recs.last().unwrap();
        assert_eq!(rec.orig_dst.as_deref(), Some(target.as_str()));
        // As under REDIRECT: sent to the inbound port on loopback, from the address called
        // (the source the kernel picks for it), which the caller's getsockname() shows.
        assert_eq!(rec.local, loopback, "{recs:#?}");
        assert!(rec.peer.starts_with(&format!("{ip}:")), "{recs:#?}");
        assert_eq!(r[0].local.as_ref(), Some(&rec.peer), "{r:?}");
        assert_eq!(r[0].peername.as_ref(), Some(target), "{r:?}");
    }
    assert_eq!(inbound_records(&lab, sidecar).len(), 2);

    let r = lab
        .client(Some("srv"), None, &["--target", &target])
        .unwrap();
    assert!(
        !via_passthrough(ok(&r)),
        "the app calling itself must go direct: {r:?}"
    );
    assert_eq!(inbound_records(&lab, sidecar).len(), 2);
}

/// excludeInboundPorts reach the app directly; includeInboundPorts limits capture to its
/// ports; the proxy's own ports are never captured.
#[test]
fn excluded_and_included_inbound_ports() {
    let mut lab = lab();
    lab.add_pod("excl").unwrap();
    lab.add_pod("incl").unwrap();
    lab.add_pod("plain").unwrap();
    let se = lab.start_sidecar("excl").unwrap();
    let si = lab.start_sidecar("incl").unwrap();
    lab.start_server("excl", &[8080, 9090, 15020]).unwrap();
    lab.start_server("incl", &[8080, 7070]).unwrap();
    let yaml = pods_yaml(&[
        lab.pod("excl")
            .yaml_entry(&[("traffic.sidecar.istio.io/excludeInboundPorts", "9090")]),
        lab.pod("incl")
            .yaml_entry(&[("traffic.sidecar.istio.io/includeInboundPorts", "8080")]),
    ]);
    lab.start_daemon(&yaml, &[]).unwrap();
    lab.daemon().wait_pods(&["excl", "incl"]).unwrap();
    let (excl, incl) = (lab.pod("excl").v4, lab.pod("incl").v4);
    let cases = [
        (format!("{excl}:8080"), true),
        (format!("{excl}:9090"), false),
        (format!("{excl}:15020"), false),
        (format!("{incl}:8080"), true),
        (format!("{incl}:7070"), false),
    ];
    for (target, captured) in &cases {
        let r = lab
            .client(Some("plain"), None, &["--target", target])
            .unwrap();
        let r = ok(&r);
        assert_eq!(via_passthrough(r), *captured, "{target}: {r:?}");
        if !captured {
            assert_eq!(
                Some(&r.reply.as_ref().unwrap().peer),
                r.local.as_ref(),
                "{target} direct"
            );
        }
    }
    assert_eq!(inbound_records(&lab, se).len(), 1);
    assert_eq!(inbound_records(&lab, si).len(), 1);
    let st = lab.daemon().pod_status("excl").unwrap();
    assert_eq!(st.counter("inbound_direct"), 2, "{st:#?}");
}

/// Proxy down: fail open lets connections reach the app (counted), fail closed refuses them
/// (counted); a restarted proxy is captured again within 1 s of its new listen().
#[test]
fn proxy_restart_and_fail_modes() {
    let mut lab = lab();
    lab.add_pod("open").unwrap();
    lab.add_pod("closed").unwrap();
    lab.add_pod("plain").unwrap();
    let mut sidecar = lab.start_sidecar("open").unwrap();
    lab.start_server("open", &[8080]).unwrap();
    lab.start_server("closed", &[8080]).unwrap();
    let yaml = pods_yaml(&[
        lab.pod("open")
            .yaml_entry(&[("redirectd.dev/failMode", "open")]),
        // Fail closed is the default, as under Istio.
        lab.pod("closed").yaml_entry(&[]),
    ]);
    lab.start_daemon(&yaml, &[]).unwrap();
    lab.daemon().wait_pods(&["closed", "open"]).unwrap();
    let open = format!("{}:8080", lab.pod("open").v4);
    let closed = format!("{}:8080", lab.pod("closed").v4);

    assert!(via_passthrough(ok(&lab
        .client(Some("plain"), None, &["--target", &open])
        .unwrap())));
    // Fail closed with no proxy: refused at once (a reset), not a timeout.
    let r = lab
        .client(
            Some("plain"),
            None,
            &["--target", &closed, "--timeout-ms", "2000"],
        )
        .unwrap();
    let err = r[0].error.as_deref().unwrap_or_default();
    assert!(err.contains("refused"), "{r:?}");

    for round in 0..3 {
        lab.procs[sidecar].kill();
        // The listener's socket is gone with the process: fail open, to the app directly.
        let r = lab
            .client(Some("plain"), None, &["--target", &open])
            .unwrap();
        assert!(!via_passthrough(ok(&r)), "round {round}: {r:?}");
        sidecar = lab.start_sidecar("open").unwrap();
        let listening = Instant::now();
        eventually(
            Duration::from_secs(1),
            &format!("round {round}: capture after the new listen()"),
            || {
                let r = lab
                    .client(Some("plain"), None, &["--target", &open])
                    .unwrap();
                via_passthrough(ok(&r)).then_some(())
            },
        )
        .unwrap();
        println!(
            "round {round}: captured again {:?} after listen()",
            listening.elapsed()
        );
    }
    let d = lab.daemon();
    assert_eq!(
        d.pod_status("open").unwrap().counter("inbound_fail_open"),
        3
    );
    assert_eq!(
        d.pod_status("closed")
            .unwrap()
            .counter("inbound_fail_closed"),
        1
    );
}

/// A pod removed from the pods file: its sk_lookup link is detached and unpinned, and its
/// traffic reaches the app directly.
#[test]
fn removed_pod_leaves_no_sk_lookup_link() {
    let mut lab = lab();
    lab.add_pod("srv").unwrap();
    lab.add_pod("plain").unwrap();
    let sidecar = lab.start_sidecar("srv").unwrap();
    lab.start_server("srv", &[8080]).unwrap();
    lab.start_daemon(&pods_yaml(&[lab.pod("srv").yaml_entry(&[])]), &[])
        .unwrap();
    let st = lab.daemon().wait_pods(&["srv"]).unwrap();
    let cookie = st.pods[0].pod.netns_cookie;
    let pin = lab.daemon().pin_dir.join("pods").join(cookie.to_string());
    assert!(pin.exists());
    let shown = redirect_lab::run(
        "bpftool",
        &["-j", "link", "show", "pinned", pin.to_str().unwrap()],
    )
    .unwrap();
    let link: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(link["type"], "netns", "{link}");
    let id = link["id"].as_u64().unwrap().to_string();
    let target = format!("{}:8080", lab.pod("srv").v4);
    assert!(via_passthrough(ok(&lab
        .client(Some("plain"), None, &["--target", &target])
        .unwrap())));

    lab.daemon().write_pods("pods: []\n").unwrap();
    lab.daemon().wait_pods(&[]).unwrap();
    assert!(!pin.exists(), "{} still pinned", pin.display());
    eventually(Duration::from_secs(2), &format!("link {id} gone"), || {
        redirect_lab::run("bpftool", &["link", "show", "id", &id])
            .is_err()
            .then_some(())
    })
    .unwrap();
    let r = lab
        .client(Some("plain"), None, &["--target", &target])
        .unwrap();
    assert!(!via_passthrough(ok(&r)), "{r:?}");
    assert_eq!(inbound_records(&lab, sidecar).len(), 1);
}
