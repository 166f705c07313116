//! `sidecar.istio.io/interceptionMode: TPROXY`, side by side with Istio's rules (the golden
//! `tproxy`: inbound in the mangle table, `TPROXY --on-port 15006`, the connection mark and
//! `ip rule fwmark 1337 lookup 133`), with Envoy as Istio runs it in that mode (uid 0, gid
//! 1337, a transparent inbound listener with `original_src`, mark 1337). The application must
//! see the real client's address on inbound; every other connection must be seen as under
//! REDIRECT. Each connection is made under Istio's rules and under redirectd and must look the
//! same to every party.

use redirect_lab::{
    envoy::{Mode, SELF_CALL_PORT},
    istio_iptables::{self, Options},
    Lab,
};
use redirect_tests::{app_plain_ext, assert_same_rows, seen, serve_with};

/// Every connection of the test, each as [`seen`] shows it.
fn rows(lab: &Lab, envoy: usize) -> Vec<(String, String)> {
    let (app_v4, app_v6) = (lab.pod("app").v4, lab.pod("app").v6);
    let (ext_v4, ext_v6) = (lab.pod("ext").v4, lab.pod("ext").v6);
    [
        ("plain -> app, IPv4", "plain", format!("{app_v4}:8080")),
        ("plain -> app, IPv6", "plain", format!("[{app_v6}]:8080")),
        (
            "plain -> app, excluded port, IPv4",
            "plain",
            format!("{app_v4}:9090"),
        ),
        (
            "plain -> app, excluded port, IPv6",
            "plain",
            format!("[{app_v6}]:9090"),
        ),
        ("app -> ext, IPv4", "app", format!("{ext_v4}:8080")),
        ("app -> ext, IPv6", "app", format!("[{ext_v6}]:8080")),
        ("app -> itself, IPv4", "app", format!("{app_v4}:8080")),
        (
            "app -> Envoy -> its own pod",
            "app",
            format!("127.0.0.1:{SELF_CALL_PORT}"),
        ),
    ]
    .into_iter()
    .map(|(what, from, target)| {
        let placement = lab.pod(from).placement();
        (what.to_string(), seen(lab, envoy, placement, &target))
    })
    .collect()
}

#[test]
fn tproxy_pods_as_istio_captures_them() {
    let (mut lab, envoy) = app_plain_ext(&[8080, 9090], Mode::Tproxy);
    let options = Options {
        exclude_inbound_ports: vec![9090],
        tproxy: true,
        ..Default::default()
    };
    istio_iptables::install(&lab.pod("app").netns, &options).unwrap();
    let reference = rows(&lab, envoy);
    for (what, a) in &reference {
        println!("{what}\n  istio-iptables {a}");
    }
    istio_iptables::remove(&lab.pod("app").netns).unwrap();
    serve_with(&mut lab, "app", &options);
    // A few passes of the daemon (one a second here) before the rows.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let ours = rows(&lab, envoy);
    assert_same_rows(&reference, &ours);
    // Not vacuous: the application saw the client's own address through Envoy.
    let plain_v4 = lab.pod("plain").v4.to_string();
    let by = |w: &str| &ours.iter().find(|(what, _)| what == w).unwrap().1;
    let row = by("plain -> app, IPv4");
    assert!(
        row.contains(&format!("\"{plain_v4}\")")) && row.contains("inbound"),
        "{row}"
    );
    // The daemon set up TPROXY's routing once, and keeps it once over its passes.
    let app = &lab.pod("app").netns;
    for v in ["-4", "-6"] {
        let rules = app
            .exec(&["ip", v, "rule", "show", "fwmark", "1337"])
            .unwrap();
        assert_eq!(rules.lines().count(), 1, "{rules}");
        let routes = app
            .exec(&["ip", v, "route", "show", "table", "133"])
            .unwrap();
        assert!(routes.starts_with("local default dev lo"), "{routes}");
    }
    let knob = app
        .exec(&["cat", "/proc/sys/net/ipv4/tcp_fwmark_accept"])
        .unwrap();
    assert_eq!(knob.trim(), "1");
}
