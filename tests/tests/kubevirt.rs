//! `traffic.sidecar.istio.io/kubevirtInterfaces`, side by side with Istio's rules (the golden
//! `kube-virt-interfaces`: `PREROUTING -i IFACE -j ISTIO_REDIRECT`): a KubeVirt-style VM (a
//! namespace of its own behind a veth, `vm1` in the pod, its default route through the pod)
//! whose TCP connections the pod forwards. Every TCP connection from the VM goes to Envoy's
//! outbound listener (REDIRECT mode, as Istio runs it) whatever its destination, and Envoy
//! connects on from the pod; the pod's own inbound is unchanged. Each connection is made under
//! Istio's rules and under redirectd and must look the same to every party. Without capture
//! none of the VM's connections could be made: nothing routes back to the VM's network.

use redirect_lab::{
    envoy::Mode,
    istio_iptables::{self, Options},
    Lab, Netns, Placement,
};
use redirect_tests::{app_plain_ext, assert_same_rows, link_pod_to, seen, serve_with};

/// Every connection of the test, each as [`seen`] shows it.
fn rows(lab: &Lab, envoy: usize, vm: &Netns) -> Vec<(String, String)> {
    let app_v4 = lab.pod("app").v4;
    let (ext_v4, ext_v6) = (lab.pod("ext").v4, lab.pod("ext").v6);
    let from_vm = || Placement {
        netns: Some(vm),
        cgroup: Some(&lab.cgroup),
        uid: None,
    };
    [
        ("VM -> ext, IPv4", from_vm(), format!("{ext_v4}:8080")),
        ("VM -> ext, IPv6", from_vm(), format!("[{ext_v6}]:8080")),
        (
            "VM -> its pod's address",
            from_vm(),
            format!("{app_v4}:8080"),
        ),
        (
            "plain -> app",
            lab.pod("plain").placement(),
            format!("{app_v4}:8080"),
        ),
    ]
    .into_iter()
    .map(|(what, placement, target)| (what.to_string(), seen(lab, envoy, placement, &target)))
    .collect()
}

#[test]
fn vm_traffic_captured_as_istio_captures_it() {
    let (mut lab, envoy) = app_plain_ext(&[8080], Mode::Redirect);
    // vm1: app 192.168.88.1 / fd88::1 <-> VM 192.168.88.2 / fd88::2, the VM's default route.
    let vm = Netns::new(format!("{}-vm", lab.id)).unwrap();
    link_pod_to(
        &lab,
        "app",
        &vm,
        [
            ("vm1", "192.168.88.1/24", "fd88::1/64"),
            ("vm0", "192.168.88.2/24", "fd88::2/64"),
        ],
    );
    let app = &lab.pod("app").netns;
    vm.exec(&["ip", "route", "add", "default", "via", "192.168.88.1"])
        .unwrap();
    vm.exec(&["ip", "-6", "route", "add", "default", "via", "fd88::1"])
        .unwrap();
    // The pod forwards its VM's traffic, as a KubeVirt launcher pod does.
    for knob in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        app.exec(&["sysctl", "-qw", knob]).unwrap();
    }
    let options = Options {
        virt_interfaces: vec!["vm1".into()],
        ..Default::default()
    };
    istio_iptables::install(&lab.pod("app").netns, &options).unwrap();
    let reference = rows(&lab, envoy, &vm);
    istio_iptables::remove(&lab.pod("app").netns).unwrap();
    serve_with(&mut lab, "app", &options);
    let ours = rows(&lab, envoy, &vm);
    assert_same_rows(&reference, &ours);
    // Not vacuous: the VM reached ext through Envoy, which called it from the pod.
    let by = |w: &str| &ours.iter().find(|(what, _)| what == w).unwrap().1;
    let row = by("VM -> ext, IPv4");
    assert!(
        row.contains(&format!("\"{app_v4}\")", app_v4 = lab.pod("app").v4))
            && row.contains("outbound"),
        "{row}"
    );
    drop(lab);
    drop(vm);
}
