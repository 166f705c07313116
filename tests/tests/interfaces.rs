//! `traffic.sidecar.istio.io/excludeInterfaces`, side by side with Istio's rules: a mesh pod
//! with a second interface (`net1`, a veth to a namespace of its own, as a Multus network
//! would give it) excluded. What leaves through `net1` and what arrives through it is never
//! captured; what uses `eth0` is, both ways. Every connection is made under Istio's
//! `istio-iptables` rules (`PREROUTING -i net1 -j RETURN`, `OUTPUT -o net1 -j RETURN`) and
//! under redirectd, with Envoy as the sidecar, and must be seen the same by every party.

use redirect_lab::{
    envoy::Mode,
    istio_iptables::{self, Options},
    spawn, Lab, Netns, Placement,
};
use redirect_tests::{app_plain_ext, assert_same_rows, link_pod_to, seen, serve_with};

fn in_side<'a>(lab: &'a Lab, side: &'a Netns) -> Placement<'a> {
    Placement {
        netns: Some(side),
        cgroup: Some(&lab.cgroup),
        uid: None,
    }
}

/// Every connection of the test, each as [`seen`].
fn rows(lab: &Lab, envoy: usize, side: &Netns) -> Vec<(String, String)> {
    let (app_v4, app_v6) = (lab.pod("app").v4, lab.pod("app").v6);
    let (ext_v4, ext_v6) = (lab.pod("ext").v4, lab.pod("ext").v6);
    let app = || lab.pod("app").placement();
    let plain = || lab.pod("plain").placement();
    let side = || in_side(lab, side);
    [
        (
            "app -> side over net1, IPv4",
            app(),
            "192.168.77.2:8080".to_string(),
        ),
        (
            "app -> side over net1, IPv6",
            app(),
            "[fd77::2]:8080".to_string(),
        ),
        (
            "app -> ext over eth0, IPv4",
            app(),
            format!("{ext_v4}:8080"),
        ),
        (
            "app -> ext over eth0, IPv6",
            app(),
            format!("[{ext_v6}]:8080"),
        ),
        (
            "side -> app over net1, IPv4",
            side(),
            "192.168.77.1:8080".to_string(),
        ),
        (
            "side -> app over net1, IPv6",
            side(),
            "[fd77::1]:8080".to_string(),
        ),
        (
            "plain -> app over eth0, IPv4",
            plain(),
            format!("{app_v4}:8080"),
        ),
        (
            "plain -> app over eth0, IPv6",
            plain(),
            format!("[{app_v6}]:8080"),
        ),
    ]
    .into_iter()
    .map(|(what, placement, target)| (what.to_string(), seen(lab, envoy, placement, &target)))
    .collect()
}

#[test]
fn excluded_interfaces_as_istio_excludes_them() {
    let (mut lab, envoy) = app_plain_ext(&[8080], Mode::Redirect);
    // net1: app 192.168.77.1 / fd77::1 <-> side 192.168.77.2 / fd77::2.
    let side = Netns::new(format!("{}-side", lab.id)).unwrap();
    link_pod_to(
        &lab,
        "app",
        &side,
        [
            ("net1", "192.168.77.1/24", "fd77::1/64"),
            ("side0", "192.168.77.2/24", "fd77::2/64"),
        ],
    );
    let server = spawn(
        in_side(&lab, &side),
        &lab.dir.join("side-server.log"),
        &redirect_lab::bin("redirect-lab"),
        &["server", "--port", "8080"],
    )
    .unwrap();
    lab.procs.push(server);
    Lab::wait_listening_in(&side, 8080).unwrap();
    let options = Options {
        exclude_interfaces: vec!["net1".into()],
        ..Default::default()
    };
    istio_iptables::install(&lab.pod("app").netns, &options).unwrap();
    let reference = rows(&lab, envoy, &side);
    istio_iptables::remove(&lab.pod("app").netns).unwrap();
    serve_with(&mut lab, "app", &options);
    let ours = rows(&lab, envoy, &side);
    assert_same_rows(&reference, &ours);
    // Not vacuous: net1 went direct and eth0 was captured, both ways.
    let by = |w: &str| &ours.iter().find(|(what, _)| what == w).unwrap().1;
    assert!(
        by("app -> side over net1, IPv4").ends_with("envoy []"),
        "{ours:?}"
    );
    assert!(
        by("side -> app over net1, IPv6").ends_with("envoy []"),
        "{ours:?}"
    );
    assert!(
        by("app -> ext over eth0, IPv4").contains("outbound"),
        "{ours:?}"
    );
    assert!(
        by("plain -> app over eth0, IPv4").contains("inbound"),
        "{ours:?}"
    );
    drop(lab);
    drop(side);
}
