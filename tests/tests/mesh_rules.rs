//! Other meshes' own capture rules, run in the lab as the reference, and redirectd's profiles
//! for them side by side with it: Linkerd's `proxy-init` rules
//! ([`redirect_lab::linkerd_iptables`]) in a pod whose sidecar is Envoy on Linkerd's ports and
//! uid (Linkerd's own proxy is not available here), both families, each decision of the rules
//! tried for real; then the same rows with redirectd serving the pod as a Linkerd pod
//! (`mesh: linkerd` and the same `config.linkerd.io/` annotations), every row equal.

use redirect_lab::{
    consul_iptables, envoy,
    linkerd_iptables::{self, Options},
    Lab,
};
use redirect_tests::{assert_same_rows_as, lab, pods_yaml, seen};

/// The listeners of the pod's Envoy that took a connection, as `seen` prints them.
fn listeners(row: &str) -> &str {
    row.rsplit_once("envoy ").map_or("", |(_, l)| l)
}

fn target(addr: std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

/// `(what, from, to, port, expected listeners)`: a connection from pod `from` to pod `to`'s
/// address (v4 or v6) and `port`.
type Row<'a> = (&'a str, &'a str, &'a str, u16, &'a str);

fn check(lab: &Lab, envoy_proc: usize, rows: &[Row<'_>]) {
    let mut wrong = Vec::new();
    for v6 in [false, true] {
        for &(what, from, to, port, want) in rows {
            let to_pod = lab.pod(to);
            let addr = if v6 { to_pod.v6 } else { to_pod.v4 };
            let row = seen(
                lab,
                envoy_proc,
                lab.pod(from).placement(),
                &target(addr, port),
            );
            let family = if v6 { "IPv6" } else { "IPv4" };
            println!("{what} ({family}): {row}");
            assert!(
                row.starts_with("error None"),
                "{what} ({family}) failed: {row}"
            );
            if listeners(&row) != want {
                wrong.push(format!("{what} ({family}): want envoy {want}, saw {row}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A mesh pod `client` with Envoy on Linkerd's ports and uid as its sidecar, and a pod
/// `ext`; servers on 8080 and 4567 in both, and 9005 in `client`.
fn linkerd_lab() -> (Lab, usize) {
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    lab.add_pod("ext").unwrap();
    let sidecar = lab
        .start_envoy_shaped("client", envoy::Mode::Redirect, &envoy::LINKERD)
        .unwrap();
    lab.start_server("client", &[8080, 4567, 9005]).unwrap();
    lab.start_server("ext", &[8080, 4567]).unwrap();
    (lab, sidecar)
}

/// Linkerd's rules as its injector writes them: every outbound TCP connection to 4140 but the
/// proxy's, loopback's and the ignored ports' (4567, 4568 by default); every inbound one to
/// 4143 but the proxy's own ports' (4190, 4191) and the ignored ones'; then a pod's
/// `skip-inbound-ports` (a range) and `skip-subnets` (the caller's network) replacing them.
#[test]
fn linkerds_own_rules_in_the_lab() {
    let (lab, sidecar) = linkerd_lab();
    let ns = &lab.pod("client").netns;
    linkerd_iptables::install(ns, &Options::default()).unwrap();
    check(
        &lab,
        sidecar,
        &[
            ("outbound", "client", "ext", 8080, "[\"outbound\"]"),
            ("outbound, an ignored port", "client", "ext", 4567, "[]"),
            (
                "the pod's own address, over lo",
                "client",
                "client",
                8080,
                "[]",
            ),
            ("inbound", "ext", "client", 8080, "[\"inbound\"]"),
            ("inbound, an ignored port", "ext", "client", 4567, "[]"),
            (
                "inbound, a port not ignored",
                "ext",
                "client",
                9005,
                "[\"inbound\"]",
            ),
        ],
    );

    // A pod's annotations replace the defaults: 4567 is captured again, 9000-9010 is not,
    // and nothing from the caller's networks is.
    linkerd_iptables::remove(ns).unwrap();
    let ext = lab.pod("ext");
    let subnets = format!("{}/32,{}/128", ext.v4, ext.v6);
    let options = Options::for_pod(Some("9000-9010"), Some("5432"), None);
    linkerd_iptables::install(ns, &options).unwrap();
    check(
        &lab,
        sidecar,
        &[
            (
                "outbound, 4567 no longer ignored",
                "client",
                "ext",
                4567,
                "[\"outbound\"]",
            ),
            (
                "inbound, 4567 no longer ignored",
                "ext",
                "client",
                4567,
                "[\"inbound\"]",
            ),
            ("inbound, in the ignored range", "ext", "client", 9005, "[]"),
        ],
    );
    linkerd_iptables::remove(ns).unwrap();
    let options = Options::for_pod(None, None, Some(&subnets));
    linkerd_iptables::install(ns, &options).unwrap();
    check(
        &lab,
        sidecar,
        &[
            ("inbound from a skipped subnet", "ext", "client", 8080, "[]"),
            (
                "outbound to a skipped subnet (inbound-only)",
                "client",
                "ext",
                8080,
                "[\"outbound\"]",
            ),
        ],
    );
    linkerd_iptables::remove(ns).unwrap();
}

/// The rows of [`linkerds_own_rules_in_the_lab`] under each of its three option sets, under
/// Linkerd's rules and under redirectd, side by side: every row (connection, addresses each
/// end saw, which of the sidecar's listeners took it) equal.
#[test]
fn linkerd_pods_are_captured_as_linkerds_rules_capture_them() {
    let (mut lab, sidecar) = linkerd_lab();
    lab.start_daemon("pods: []\n", &[]).unwrap();
    let ext = lab.pod("ext");
    let subnets = format!("{}/32,{}/128", ext.v4, ext.v6);
    let option_sets = [
        Options::default(),
        Options::for_pod(Some("9000-9010"), Some("5432"), None),
        Options::for_pod(None, None, Some(&subnets)),
    ];
    let rows: [(&str, &str, &str, u16); 7] = [
        ("outbound", "client", "ext", 8080),
        ("outbound to 4567", "client", "ext", 4567),
        ("the pod's own address, over lo", "client", "client", 8080),
        ("inbound", "ext", "client", 8080),
        ("inbound to 4567", "ext", "client", 4567),
        ("inbound to 9005", "ext", "client", 9005),
        ("inbound to the proxy's admin port", "ext", "client", 4191),
    ];
    let run = |lab: &Lab| -> Vec<(String, String)> {
        let mut out = Vec::new();
        for v6 in [false, true] {
            for &(what, from, to, port) in &rows {
                let to_pod = lab.pod(to);
                let addr = if v6 { to_pod.v6 } else { to_pod.v4 };
                let family = if v6 { "IPv6" } else { "IPv4" };
                let row = seen(lab, sidecar, lab.pod(from).placement(), &target(addr, port));
                out.push((format!("{what} ({family})"), row));
            }
        }
        out
    };
    for options in &option_sets {
        let ns = &lab.pod("client").netns;
        linkerd_iptables::install(ns, options).unwrap();
        let reference = run(&lab);
        linkerd_iptables::remove(ns).unwrap();
        let ann = options.annotations();
        let ann: Vec<(&str, &str)> = ann.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let entry = lab.pod("client").yaml_entry_in("linkerd", &ann);
        lab.daemon().write_pods(&pods_yaml(&[entry])).unwrap();
        lab.daemon().wait_pods(&["client"]).unwrap();
        let ours = run(&lab);
        lab.daemon().write_pods("pods: []\n").unwrap();
        lab.daemon().wait_pods(&[]).unwrap();
        println!("options {:?}", options.annotations());
        assert_same_rows_as("proxy-init", &reference, &ours);
    }
}

/// A node with an Istio pod and a Linkerd pod calling each other, each through its own
/// sidecar (Envoy in Istio's shape as uid 1337 on 15001/15006, Envoy in Linkerd's as uid 2102
/// on 4140/4143): every connection leaves through the caller's outbound listener and arrives
/// through the callee's inbound one, both families, and each proxy's own connections are
/// never captured by the other mesh's rules.
#[test]
fn an_istio_pod_and_a_linkerd_pod_on_one_node() {
    let mut lab = lab();
    lab.add_pod("ist").unwrap();
    lab.add_pod("l5d").unwrap();
    let ist = lab.start_sidecar("ist").unwrap();
    let l5d = lab
        .start_envoy_shaped("l5d", envoy::Mode::Redirect, &envoy::LINKERD)
        .unwrap();
    lab.start_server("ist", &[8080]).unwrap();
    lab.start_server("l5d", &[8080]).unwrap();
    let entries = [
        lab.pod("ist").yaml_entry(&[]),
        lab.pod("l5d").yaml_entry_in("linkerd", &[]),
    ];
    lab.start_daemon(&pods_yaml(&entries), &[]).unwrap();
    lab.daemon().wait_pods(&["ist", "l5d"]).unwrap();
    for v6 in [false, true] {
        for (from, from_envoy, to, to_envoy) in [("ist", ist, "l5d", l5d), ("l5d", l5d, "ist", ist)]
        {
            let to_pod = lab.pod(to);
            let addr = if v6 { to_pod.v6 } else { to_pod.v4 };
            let before = lab.envoy_log(to_envoy).len();
            let row = seen(
                &lab,
                from_envoy,
                lab.pod(from).placement(),
                &target(addr, 8080),
            );
            assert!(row.starts_with("error None"), "{from} -> {to}: {row}");
            assert!(
                row.ends_with("envoy [\"outbound\"]"),
                "{from} -> {to}: {row}"
            );
            let arrived = redirect_lab::eventually(
                std::time::Duration::from_secs(5),
                "the callee's Envoy record",
                || {
                    let log = lab.envoy_log_since(to_envoy, before);
                    (!log.is_empty()).then_some(log)
                },
            )
            .unwrap();
            let listeners: Vec<&str> = arrived.iter().map(|r| r.listener.as_str()).collect();
            assert_eq!(
                listeners,
                ["inbound"],
                "{from} -> {to} (v6 {v6}): {arrived:#?}"
            );
        }
    }
}

/// Consul's rules as consul-k8s configures them (`consul/sdk/iptables`), with Envoy on
/// Consul's ports and uid (5995): IPv4 only; every outbound TCP connection to 15001 but the
/// proxy's, the init uid's, 127.0.0.1's and the excluded ports' and networks' (the pod's own
/// address and 127.0.0.2, over lo, are captured); every inbound one to 20000 but the excluded
/// ports'. The reference for a Consul profile (not served by redirectd yet).
#[test]
fn consuls_own_rules_in_the_lab() {
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    lab.add_pod("ext").unwrap();
    let sidecar = lab
        .start_envoy_shaped("client", envoy::Mode::Redirect, &envoy::CONSUL)
        .unwrap();
    lab.start_server("client", &[8080, 9005]).unwrap();
    lab.start_server("ext", &[8080, 5432]).unwrap();
    let ext = lab.pod("ext").v4;
    let ns = &lab.pod("client").netns;
    let config = consul_iptables::Config::for_pod(&[
        (
            "consul.hashicorp.com/transparent-proxy-exclude-inbound-ports",
            "9005",
        ),
        (
            "consul.hashicorp.com/transparent-proxy-exclude-outbound-ports",
            "5432",
        ),
    ]);
    consul_iptables::install(ns, &config).unwrap();
    let rows = |lab: &Lab| -> Vec<String> {
        let mut wrong = Vec::new();
        for (what, from, to, want) in [
            (
                "outbound, IPv4",
                "client",
                format!("{ext}:8080"),
                "[\"outbound\"]",
            ),
            (
                "outbound, IPv6 (not captured)",
                "client",
                target(lab.pod("ext").v6, 8080),
                "[]",
            ),
            (
                "outbound, an excluded port",
                "client",
                format!("{ext}:5432"),
                "[]",
            ),
            (
                "the pod's own address, over lo (captured)",
                "client",
                target(lab.pod("client").v4, 8080),
                "[\"outbound\"]",
            ),
            (
                "127.0.0.1 (not captured)",
                "client",
                "127.0.0.1:8080".into(),
                "[]",
            ),
            (
                "inbound, IPv4",
                "ext",
                target(lab.pod("client").v4, 8080),
                "[\"inbound\"]",
            ),
            (
                "inbound, IPv6 (not captured)",
                "ext",
                target(lab.pod("client").v6, 8080),
                "[]",
            ),
            (
                "inbound, an excluded port",
                "ext",
                target(lab.pod("client").v4, 9005),
                "[]",
            ),
        ] {
            let row = seen(lab, sidecar, lab.pod(from).placement(), &to);
            println!("{what}: {row}");
            if !row.starts_with("error None") || listeners(&row) != want {
                wrong.push(format!("{what}: want envoy {want}, saw {row}"));
            }
        }
        wrong
    };
    let wrong = rows(&lab);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    consul_iptables::remove(&lab.pod("client").netns).unwrap();
}
