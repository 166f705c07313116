//! A bad pod configuration never turns capture off: a served pod keeps its last good rules, a
//! new pod is locked (its connections refused), a pods file unusable from the start removes
//! nothing; fixing the entry applies it within the usual poll.

use std::time::Duration;

use redirect_lab::{eventually, wire::ClientResult, Lab};
use redirect_tests::{captured, lab, pods_yaml};

const EXCLUDE: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";

/// A lab with mesh pod `client` (lab sidecar), server pod `ext` on 8080 and 8081.
fn setup() -> (Lab, usize) {
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    lab.add_pod("ext").unwrap();
    let sidecar = lab.start_sidecar("client").unwrap();
    lab.start_server("ext", &[8080, 8081]).unwrap();
    (lab, sidecar)
}

fn connect(lab: &Lab, port: u16) -> ClientResult {
    let target = format!("{}:{port}", lab.pod("ext").v4);
    lab.client(Some("client"), None, &["--target", &target])
        .unwrap()
        .remove(0)
}

fn entry(lab: &Lab, value: &str) -> String {
    pods_yaml(&[lab.pod("client").yaml_entry(&[(EXCLUDE, value)])])
}

#[test]
fn a_served_pod_keeps_its_last_good_rules_when_edited_to_a_typo() {
    let (mut lab, sidecar) = setup();
    lab.start_daemon(&entry(&lab, "8081"), &[]).unwrap();
    lab.daemon().wait_pods(&["client"]).unwrap();
    assert!(captured(&lab, sidecar, &connect(&lab, 8080)));
    assert!(!captured(&lab, sidecar, &connect(&lab, 8081)));
    let slot = lab.daemon().pod_status("client").unwrap().pod.pod_id;

    // The typo: rejected, reported, and the last good rules stay in force.
    let yaml = entry(&lab, "70000,abc");
    lab.daemon().write_pods(&yaml).unwrap();
    let st = lab
        .daemon()
        .wait_status("the typo reported", |s| {
            s.pod("client")
                .is_some_and(|p| p.pod.config.starts_with("last good kept"))
        })
        .unwrap();
    assert!(
        st.rejected
            .iter()
            .any(|r| r.contains("excludeOutboundPorts") && r.contains("70000")),
        "{st:#?}"
    );
    let p = st.pod("client").unwrap();
    assert_eq!(p.pod.pod_id, slot, "nothing rewritten");
    assert!(p.pod.config.contains("70000"), "{p:?}");
    assert!(captured(&lab, sidecar, &connect(&lab, 8080)));
    assert!(!captured(&lab, sidecar, &connect(&lab, 8081)));
    let log = lab.daemon().log_text();
    assert!(!log.contains("removed from the mesh"), "{log}");
    assert!(
        log.contains("last good configuration stays in force"),
        "{log}"
    );

    // Fixed: the new rules apply within the poll.
    let yaml = entry(&lab, "8080");
    lab.daemon().write_pods(&yaml).unwrap();
    lab.daemon()
        .wait_status("the fix applied", |s| {
            s.pod("client")
                .is_some_and(|p| p.pod.config == "current" && p.pod.pod_id != slot)
        })
        .unwrap();
    assert!(!captured(&lab, sidecar, &connect(&lab, 8080)));
    assert!(captured(&lab, sidecar, &connect(&lab, 8081)));
}

#[test]
fn a_new_pod_with_a_typo_is_locked_until_fixed() {
    let (mut lab, sidecar) = setup();
    lab.add_pod("plain").unwrap();
    lab.start_server("client", &[9090]).unwrap();
    lab.start_daemon(&entry(&lab, "5432,http"), &[]).unwrap();
    let st = lab.daemon().wait_pods(&["client"]).unwrap();
    let p = st.pod("client").unwrap();
    assert!(p.pod.config.starts_with("locked"), "{p:?}");
    assert!(st.rejected.iter().any(|r| r.contains("http")), "{st:#?}");

    // Outbound: refused (EPERM), not sent around the sidecar.
    let r = connect(&lab, 8080);
    let err = r.error.as_deref().unwrap_or_default();
    assert!(err.contains("not permitted"), "{r:?}");
    assert!(lab.sidecar_log(sidecar).is_empty());
    // Inbound: refused too.
    let to_pod = format!("{}:9090", lab.pod("client").v4);
    let r = lab
        .client(
            Some("plain"),
            None,
            &["--target", &to_pod, "--timeout-ms", "2000"],
        )
        .unwrap();
    assert!(r[0].error.is_some(), "reached the app: {r:?}");
    // The proxy's own connections and the pod's loopback still work.
    let r = lab
        .client(
            Some("client"),
            Some(redirect_lab::PROXY_UID),
            &["--target", &format!("{}:8080", lab.pod("ext").v4)],
        )
        .unwrap();
    assert!(r[0].error.is_none(), "{r:?}");
    let st = lab.daemon().pod_status("client").unwrap();
    assert!(st.counter("outbound_fail_closed") >= 1, "{st:?}");
    assert!(st.counter("inbound_fail_closed") >= 1, "{st:?}");

    // Fixed: captured as configured, within the poll.
    let yaml = entry(&lab, "5432");
    lab.daemon().write_pods(&yaml).unwrap();
    lab.daemon()
        .wait_status("the fix applied", |s| {
            s.pod("client").is_some_and(|p| p.pod.config == "current")
        })
        .unwrap();
    assert!(captured(&lab, sidecar, &connect(&lab, 8080)));
}

/// A daemon started on a pods file that is unusable as a whole (here: after a restart)
/// removes nothing: what the previous run applied keeps capturing until the file is fixed.
#[test]
fn a_restart_on_an_unusable_pods_file_removes_nothing() {
    let (mut lab, sidecar) = setup();
    lab.start_daemon(&entry(&lab, "8081"), &[]).unwrap();
    lab.daemon().wait_pods(&["client"]).unwrap();
    let d = lab.daemon();
    d.stop();
    d.write_pods("pods: [ {{{").unwrap();
    d.restart().unwrap();
    let st = d
        .wait_status("the file error reported", |s| s.file_error.is_some())
        .unwrap();
    assert!(
        st.file_error
            .as_deref()
            .unwrap_or_default()
            .contains("YAML"),
        "{st:#?}"
    );
    // Give the daemon a few polls: still captured as before.
    std::thread::sleep(Duration::from_millis(500));
    assert!(captured(&lab, sidecar, &connect(&lab, 8080)));
    assert!(!captured(&lab, sidecar, &connect(&lab, 8081)));
    let good = entry(&lab, "8081");
    let d = lab.daemon();
    d.write_pods(&good).unwrap();
    eventually(Duration::from_secs(5), "the pod served again", || {
        d.status()
            .ok()
            .and_then(|s| s.pod("client").map(|p| p.pod.pod_id))
    })
    .unwrap();
    assert!(captured(&lab, sidecar, &connect(&lab, 8080)));
}
