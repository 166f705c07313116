//! A real proxy that forwards with `splice(2)`: HAProxy (Debian's) as both pods' sidecar,
//! `option splice-request` and `splice-response`, mesh to mesh on one node, echo through both
//! sidecars. Kept on the plain path (the pods' `redirectd.dev/accel: "false"`), every stream
//! comes back byte-exact; accelerated, HAProxy's `splice()` from a spliced socket finds
//! nothing (docs/acceleration.md) and every stream ends with none of its bytes echoed (on
//! 6.18: early EOF, 0 bytes): the evidence for keeping such proxies
//! off the accelerated path, re-checked on every run (a kernel that fixes `splice_read` for
//! sockmap sockets fails this test, and the acceleration default can follow).

use redirect_lab::{echo::EchoResult, Lab};
use redirect_tests::mesh_with_echo_and;

fn haproxy_mesh(annotations: &[(&str, &str)]) -> Lab {
    // Acceleration forced on, so that only the pods' annotation keeps them on the plain path.
    mesh_with_echo_and(annotations, |lab, pod| {
        lab.start_haproxy(pod, true).unwrap();
    })
}

fn echo(lab: &Lab, size: &str) -> Vec<EchoResult> {
    let t = format!("{}:7000", lab.pod("b").v4);
    lab.echo(
        "a",
        &[
            "--target",
            &t,
            "--size",
            size,
            "--streams",
            "4",
            "--idle-timeout-ms",
            "3000",
        ],
    )
    .unwrap()
}

fn accel_msgs(lab: &mut Lab) -> u64 {
    let s = lab.daemon().status().unwrap();
    s.pods.iter().map(|p| p.counter("accel_msgs")).sum()
}

fn captured(lab: &mut Lab) -> u64 {
    let s = lab.daemon().status().unwrap();
    s.pods.iter().map(|p| p.counter("outbound_captured")).sum()
}

#[test]
fn a_proxy_that_splices_is_byte_exact_on_the_plain_path_and_loses_data_when_accelerated() {
    let mut plain = haproxy_mesh(&[("redirectd.dev/accel", "false")]);
    for size in ["1024", "1048576"] {
        let r = echo(&plain, size);
        eprintln!(
            "plain path, {size} B: {:?}",
            r.iter().map(|e| &e.outcome).collect::<Vec<_>>()
        );
        assert!(r.iter().all(|e| e.intact), "{r:?}");
    }
    assert!(
        captured(&mut plain) >= 8,
        "HAProxy did not get the connections"
    );
    assert_eq!(accel_msgs(&mut plain), 0);
    drop(plain);

    let mut spliced = haproxy_mesh(&[]);
    let r = echo(&spliced, "1048576");
    let moved = accel_msgs(&mut spliced);
    eprintln!(
        "accelerated, 1 MiB: {:?} ({moved} messages through the splice)",
        r.iter()
            .map(|e| (&e.outcome, e.received))
            .collect::<Vec<_>>()
    );
    assert!(moved > 0, "the sidecars' hop was not spliced");
    assert!(
        r.iter().all(|e| !e.intact),
        "HAProxy's splice() read a spliced socket: this kernel may have fixed splice_read for sockmap sockets; re-check docs/acceleration.md: {r:?}"
    );
}
