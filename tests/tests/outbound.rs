//! Outbound capture on the real kernel: every test builds its own lab (namespaces, cgroups,
//! pins) and removes it, even on failure.

use std::time::Duration;

use redirect_lab::{eventually, wire::ServerReply};
use redirect_tests::{curl, lab, pods_yaml};

/// A lab with mesh pod `client` (lab sidecar) and server pod `ext` on 8080, under redirectd;
/// returns the lab and the sidecar's process index.
fn client_and_ext() -> (redirect_lab::Lab, usize) {
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    lab.add_pod("ext").unwrap();
    let sidecar = lab.start_sidecar("client").unwrap();
    lab.start_server("ext", &[8080]).unwrap();
    lab.start_daemon(&pods_yaml(&[lab.pod("client").yaml_entry(&[])]), &[])
        .unwrap();
    (lab, sidecar)
}

/// The application's socket keeps the address it would have had for the original
/// destination, as under iptables REDIRECT (NAT below the socket): its `getsockname()` shows
/// the pod's address, the sidecar sees the pod's address as its downstream peer, and
/// `getpeername()` shows the original destination. IPv4, IPv6 and an IPv4-mapped destination
/// on a dual-stack socket.
#[test]
fn captured_connection_keeps_the_pods_source_address() {
    let (mut lab, sidecar) = client_and_ext();
    lab.daemon().wait_pods(&["client"]).unwrap();
    let (client, ext) = (lab.pod("client"), lab.pod("ext"));
    for (target, source) in [
        (format!("{}:8080", ext.v4), client.v4.to_string()),
        (format!("[{}]:8080", ext.v6), format!("[{}]", client.v6)),
    ] {
        let r = lab
            .client(Some("client"), None, &["--target", &target])
            .unwrap();
        let r = &r[0];
        assert!(r.error.is_none(), "{r:?}");
        let local = r.local.as_deref().unwrap();
        assert!(local.starts_with(&format!("{source}:")), "{r:?}");
        assert_eq!(r.peername.as_deref(), Some(target.as_str()), "{r:?}");
        let records = lab.sidecar_log(sidecar);
        let rec = records
            .iter()
            .find(|rec| rec.peer == local)
            .unwrap_or_else(|| panic!("the sidecar's peer is not the app's {local}: {records:#?}"));
        assert_eq!(rec.orig_dst.as_deref(), Some(target.as_str()));
        assert!(
            rec.local == "127.0.0.1:15001" || rec.local == "[::1]:15001",
            "{rec:?}"
        );
    }
}

/// curl in a mesh pod to a server outside the mesh, IPv4 and IPv6: the response arrives, the
/// sidecar logged the connection with the right original destination, the server saw the
/// pod's address (the proxy connected upstream), and the app's getpeername is untouched.
#[test]
fn curl_through_sidecar_ipv4_and_ipv6() {
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    lab.add_pod("ext").unwrap();
    let sidecar = lab.start_sidecar("client").unwrap();
    lab.start_server("ext", &[8080]).unwrap();
    let yaml = pods_yaml(&[lab.pod("client").yaml_entry(&[])]);
    lab.start_daemon(&yaml, &[]).unwrap();
    lab.daemon().wait_pods(&["client"]).unwrap();

    let client = lab.pod("client");
    let ext = lab.pod("ext");
    for (url, dst) in [
        (
            format!("http://{}:8080/", ext.v4),
            format!("{}:8080", ext.v4),
        ),
        (
            format!("http://[{}]:8080/", ext.v6),
            format!("[{}]:8080", ext.v6),
        ),
    ] {
        let body = curl(&lab, "client", &url).unwrap();
        let reply: ServerReply =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body:?}: {e}"));
        let records = lab.sidecar_log(sidecar);
        let rec = records
            .iter()
            .rev()
            .find(|r| r.orig_dst.as_deref() == Some(dst.as_str()))
            .unwrap_or_else(|| panic!("sidecar did not see {dst}: {records:#?}"));
        assert_eq!(rec.event, "outbound");
        // The server saw the proxy's upstream connection, from the pod's own address.
        assert_eq!(Some(&reply.peer), rec.upstream_local.as_ref());
        let client_ip = if dst.starts_with('[') {
            client.v6
        } else {
            client.v4
        };
        assert!(
            reply.peer.contains(&client_ip.to_string()),
            "server saw {}",
            reply.peer
        );
        assert_eq!(reply.local, dst);
    }
    let st = lab.daemon().pod_status("client").unwrap();
    assert!(st.counter("outbound_captured") >= 2, "{st:#?}");
    assert!(st.counter("orig_dst_answered") >= 2, "{st:#?}");
}

/// 1,000 concurrent connections (all open at once) to 50 distinct destinations (5 addresses
/// x 10 ports): each reaches the sidecar with its own original destination, the proxy relays
/// it to exactly that destination, and the application's getpeername() shows it too.
#[test]
fn thousand_concurrent_connections_keep_their_own_destination() {
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    lab.add_pod("ext").unwrap();
    let mut addrs = vec![lab.pod("ext").v4.to_string()];
    for i in 0..4 {
        let a = format!("10.201.0.{}", 100 + i);
        lab.add_address("ext", &a).unwrap();
        addrs.push(a);
    }
    let ports: Vec<u16> = (9000..9010).collect();
    let sidecar = lab.start_sidecar("client").unwrap();
    lab.start_server("ext", &ports).unwrap();
    let yaml = pods_yaml(&[lab.pod("client").yaml_entry(&[])]);
    lab.start_daemon(&yaml, &[]).unwrap();
    lab.daemon().wait_pods(&["client"]).unwrap();

    let mut args = vec![
        "--count".to_string(),
        "1000".into(),
        "--concurrency".into(),
        "1000".into(),
        "--hold".into(),
    ];
    for a in &addrs {
        for p in &ports {
            args.push("--target".into());
            args.push(format!("{a}:{p}"));
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let results = lab.client(Some("client"), None, &args).unwrap();
    assert_eq!(results.len(), 1000);
    let records = lab.sidecar_log(sidecar);
    let by_peer: std::collections::HashMap<&str, &redirect_lab::wire::ProxyRecord> =
        records.iter().map(|r| (r.peer.as_str(), r)).collect();
    let mut distinct = std::collections::HashSet::new();
    for r in &results {
        assert!(
            r.error.is_none(),
            "connection to {} failed: {:?}",
            r.target,
            r.error
        );
        let reply = r.reply.as_ref().unwrap();
        // The server was reached at the destination the application asked for.
        assert_eq!(reply.local, r.target);
        // The application sees its original destination as its peer.
        assert_eq!(r.peername.as_deref(), Some(r.target.as_str()));
        // The sidecar accepted this very connection and learned its own destination.
        let local = r.local.as_deref().unwrap();
        let rec = by_peer
            .get(local)
            .unwrap_or_else(|| panic!("sidecar never saw {local}"));
        assert_eq!(rec.orig_dst.as_deref(), Some(r.target.as_str()));
        assert_eq!(rec.upstream_local.as_deref(), Some(reply.peer.as_str()));
        distinct.insert(r.target.clone());
    }
    assert_eq!(distinct.len(), 50);
    let st = lab.daemon().pod_status("client").unwrap();
    assert_eq!(st.counter("outbound_captured"), 1000, "{st:#?}");
}

/// What must not be redirected: the same client on the host and in a non-mesh netns, the
/// proxy's own connections (uid 1337), excluded ports and ranges, loopback destinations.
#[test]
fn not_redirected() {
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    lab.add_pod("plain").unwrap();
    lab.add_pod("ext").unwrap();
    lab.add_address("ext", "10.201.0.200").unwrap();
    let sidecar = lab.start_sidecar("client").unwrap();
    lab.start_server("ext", &[8080, 5432]).unwrap();
    lab.start_server("client", &[7070]).unwrap();
    let yaml = pods_yaml(&[lab.pod("client").yaml_entry(&[
        (
            "traffic.sidecar.istio.io/excludeOutboundPorts",
            "5432, 6379",
        ),
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.201.0.200/32,fd00:dead::/32",
        ),
    ])]);
    lab.start_daemon(&yaml, &[]).unwrap();
    lab.daemon().wait_pods(&["client"]).unwrap();
    let ext = lab.pod("ext").v4;
    let client_ip = lab.pod("client").v4;

    let direct = |r: &redirect_lab::wire::ClientResult, from: &str| {
        assert!(r.error.is_none(), "{r:?}");
        let reply = r.reply.as_ref().unwrap();
        assert_eq!(reply.local, r.target);
        assert!(
            reply.peer.starts_with(from),
            "{} should come straight from {from}: {r:?}",
            reply.peer
        );
    };
    // A non-mesh pod.
    let r = lab
        .client(Some("plain"), None, &["--target", &format!("{ext}:8080")])
        .unwrap();
    direct(&r[0], &lab.pod("plain").v4.to_string());
    // The proxy's own connection (uid 1337) from the mesh pod.
    let r = lab
        .client(
            Some("client"),
            Some(1337),
            &["--target", &format!("{ext}:8080")],
        )
        .unwrap();
    direct(&r[0], &r[0].local.clone().unwrap());
    // Excluded port and excluded range.
    let r = lab
        .client(Some("client"), None, &["--target", &format!("{ext}:5432")])
        .unwrap();
    direct(&r[0], &r[0].local.clone().unwrap());
    let r = lab
        .client(Some("client"), None, &["--target", "10.201.0.200:8080"])
        .unwrap();
    direct(&r[0], &r[0].local.clone().unwrap());
    // Loopback and the pod's own address.
    let r = lab
        .client(
            Some("client"),
            None,
            &[
                "--target",
                "127.0.0.1:7070",
                "--target",
                &format!("{client_ip}:7070"),
                "--target",
                "[::1]:7070",
                "--count",
                "3",
            ],
        )
        .unwrap();
    for x in &r {
        direct(x, "");
        assert_eq!(x.reply.as_ref().unwrap().local, x.target);
    }
    assert!(
        lab.sidecar_log(sidecar).is_empty(),
        "sidecar saw: {:#?}",
        lab.sidecar_log(sidecar)
    );
    // The host: a server on the host's loopback, the client on the host in the lab's cgroup.
    let host_server = {
        let log = lab.dir.join("host-server.log");
        redirect_lab::spawn(
            redirect_lab::Placement {
                netns: None,
                cgroup: Some(&lab.cgroup),
                uid: None,
            },
            &log,
            &redirect_lab::bin("redirect-lab"),
            &["server", "--port", "47071"],
        )
        .unwrap()
    };
    lab.procs.push(host_server);
    let ok = eventually(Duration::from_secs(5), "the host server to answer", || {
        let r = lab
            .client(None, None, &["--target", "127.0.0.1:47071"])
            .unwrap();
        r[0].error.is_none().then_some(r)
    })
    .unwrap();
    direct(&ok[0], "127.0.0.1");
    assert!(lab.sidecar_log(sidecar).is_empty());
    let st = lab.daemon().pod_status("client").unwrap();
    assert_eq!(st.counter("outbound_captured"), 0, "{st:#?}");
    assert!(st.counter("outbound_direct") >= 6, "{st:#?}");
}

/// Proxy not listening: fail open goes direct and is counted; fail closed refuses (and is
/// counted). When the proxy comes back, capture resumes at the next connection.
#[test]
fn proxy_down_fails_open_or_closed() {
    let mut lab = lab();
    lab.add_pod("open").unwrap();
    lab.add_pod("closed").unwrap();
    lab.add_pod("ext").unwrap();
    lab.start_server("ext", &[8080]).unwrap();
    let yaml = pods_yaml(&[
        lab.pod("open")
            .yaml_entry(&[("redirectd.dev/failMode", "open")]),
        // Fail closed is the default, as under Istio.
        lab.pod("closed").yaml_entry(&[]),
    ]);
    lab.start_daemon(&yaml, &[]).unwrap();
    lab.daemon().wait_pods(&["open", "closed"]).unwrap();
    let target = format!("{}:8080", lab.pod("ext").v4);

    let r = lab
        .client(Some("open"), None, &["--target", &target])
        .unwrap();
    assert!(r[0].error.is_none(), "{r:?}");
    assert_eq!(
        r[0].reply.as_ref().unwrap().peer,
        r[0].local.clone().unwrap(),
        "went direct"
    );
    let r = lab
        .client(Some("closed"), None, &["--target", &target])
        .unwrap();
    let err = r[0].error.as_deref().unwrap_or_default();
    assert!(
        err.contains("Operation not permitted"),
        "fail closed should refuse: {r:?}"
    );

    let d = lab.daemon();
    assert_eq!(
        d.pod_status("open").unwrap().counter("outbound_fail_open"),
        1
    );
    assert_eq!(
        d.pod_status("closed")
            .unwrap()
            .counter("outbound_fail_closed"),
        1
    );

    // The proxy starts after the application: the very next connection is captured.
    let sidecar = lab.start_sidecar("closed").unwrap();
    let r = lab
        .client(Some("closed"), None, &["--target", &target])
        .unwrap();
    assert!(r[0].error.is_none(), "{r:?}");
    assert_eq!(lab.sidecar_log(sidecar).len(), 1);

    // The proxy dies: the very next connection sees it (the listener's registration went
    // with its socket) and is refused again, not sent to a dead port.
    lab.procs[sidecar].kill();
    let r = lab
        .client(Some("closed"), None, &["--target", &target])
        .unwrap();
    let err = r[0].error.as_deref().unwrap_or_default();
    assert!(err.contains("Operation not permitted"), "{r:?}");
    assert_eq!(
        lab.daemon()
            .pod_status("closed")
            .unwrap()
            .counter("outbound_fail_closed"),
        2
    );
}

/// The pods file edited while the daemon runs: a pod added starts being captured, a pod
/// removed stops, a bad entry is reported (naming pod and field) and the rest keep working.
#[test]
fn pods_file_followed_while_running() {
    let mut lab = lab();
    lab.add_pod("a").unwrap();
    lab.add_pod("b").unwrap();
    lab.add_pod("ext").unwrap();
    let sa = lab.start_sidecar("a").unwrap();
    let sb = lab.start_sidecar("b").unwrap();
    lab.start_server("ext", &[8080]).unwrap();
    let target = format!("{}:8080", lab.pod("ext").v4);
    let a = lab.pod("a").yaml_entry(&[]);
    let b = lab.pod("b").yaml_entry(&[]);
    lab.start_daemon(&pods_yaml(std::slice::from_ref(&a)), &[])
        .unwrap();
    lab.daemon().wait_pods(&["a"]).unwrap();

    let captured = |lab: &redirect_lab::Lab, pod: &str, sidecar: usize| {
        let before = lab.sidecar_log(sidecar).len();
        let r = lab.client(Some(pod), None, &["--target", &target]).unwrap();
        assert!(r[0].error.is_none(), "{r:?}");
        lab.sidecar_log(sidecar).len() > before
    };
    assert!(captured(&lab, "a", sa));
    assert!(!captured(&lab, "b", sb));

    // Add b, plus a bad entry.
    let bad = "  - name: broken\n    netns: /var/run/netns/x\n    annotations:\n      traffic.sidecar.istio.io/excludeOutboundPorts: \"99999\"\n";
    lab.daemon()
        .write_pods(&pods_yaml(&[a.clone(), b.clone(), bad.into()]))
        .unwrap();
    let st = lab.daemon().wait_pods(&["a", "b"]).unwrap();
    let rejected = st.rejected.join("\n");
    assert!(
        rejected.contains("default/broken")
            && rejected.contains("excludeOutboundPorts")
            && rejected.contains("99999"),
        "{rejected}"
    );
    assert!(captured(&lab, "a", sa));
    assert!(captured(&lab, "b", sb));

    // Remove a.
    lab.daemon()
        .write_pods(&pods_yaml(std::slice::from_ref(&b)))
        .unwrap();
    lab.daemon().wait_pods(&["b"]).unwrap();
    assert!(!captured(&lab, "a", sa));
    assert!(captured(&lab, "b", sb));

    // A file that is not YAML at all: the last good version keeps being served.
    lab.daemon().write_pods("pods: [ {{{").unwrap();
    lab.daemon()
        .wait_status("file error reported", |s| s.file_error.is_some())
        .unwrap();
    assert!(captured(&lab, "b", sb));
    assert!(lab
        .daemon()
        .log_text()
        .contains("still serving its last good version"));
}

/// `redirectd uninstall` leaves nothing of ours: no pins, no links, no programs; traffic
/// goes direct afterwards.
#[test]
fn uninstall_leaves_nothing_behind() {
    let (mut lab, sidecar) = client_and_ext();
    let st = lab.daemon().wait_pods(&["client"]).unwrap();
    // The fourteen node-wide programs (the per-pod sk_lookup one is listed with id 0).
    let ids: Vec<u32> = st
        .programs
        .iter()
        .map(|p| p.id)
        .filter(|id| *id != 0)
        .collect();
    assert_eq!(ids.len(), 14, "{st:#?}");
    let target = format!("{}:8080", lab.pod("ext").v4);
    lab.client(Some("client"), None, &["--target", &target])
        .unwrap();
    assert_eq!(lab.sidecar_log(sidecar).len(), 1);

    let d = lab.daemon();
    d.stop();
    // Stopped, the programs stay attached (pinned): traffic is still captured.
    let pin_dir = d.pin_dir.clone();
    let cgroup = d.cgroup.clone();
    lab.client(Some("client"), None, &["--target", &target])
        .unwrap();
    assert_eq!(lab.sidecar_log(sidecar).len(), 2);

    let out = lab.daemon().uninstall().unwrap();
    // Thirteen cgroup links and the pod's sk_lookup link.
    assert!(out.contains("detached 14 links"), "{out}");
    assert!(out.contains("mesh pods keep running, uncaptured"), "{out}");
    assert!(!pin_dir.exists(), "{} still exists", pin_dir.display());
    // The kernel unloads a program once nothing references it; that is asynchronous (RCU).
    let mut alive = ids.clone();
    eventually(Duration::from_secs(5), "the programs unloaded", || {
        alive.retain(|id| prog_exists(*id));
        alive.is_empty().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {alive:?} still loaded after uninstall"));
    let attached =
        redirect_lab::run("bpftool", &["cgroup", "show", cgroup.to_str().unwrap()]).unwrap();
    assert!(!attached.contains("rd_"), "still attached: {attached}");
    let r = lab
        .client(Some("client"), None, &["--target", &target])
        .unwrap();
    assert!(r[0].error.is_none());
    assert_eq!(
        lab.sidecar_log(sidecar).len(),
        2,
        "not captured after uninstall"
    );
}

/// Whether a BPF program with this id is loaded (BPF_PROG_GET_FD_BY_ID).
fn prog_exists(id: u32) -> bool {
    #[repr(C, align(8))]
    struct Attr([u32; 32]);
    let mut attr = Attr([0; 32]);
    attr.0[0] = id;
    // SAFETY: bpf(BPF_PROG_GET_FD_BY_ID = 13) with a zero-padded attr.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            13,
            &mut attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if fd >= 0 {
        // SAFETY: closing the fd we just got.
        unsafe { libc::close(fd as i32) };
        true
    } else {
        false
    }
}
