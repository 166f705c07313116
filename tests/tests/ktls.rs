//! kTLS given to a proxy's socket *after* it was spliced (the kernel lets a ULP onto a socket
//! already in a sockmap, but not into one). Its sends reach `sk_msg` before encryption;
//! redirected, the peer would read plaintext where TCP carries TLS records. `sk_msg` reads the
//! sender's `icsk_ulp_ops` and keeps such a socket on the plain path: what the peer reads is
//! the same TLS records with acceleration as without.
//!
//! Needs a kernel with kTLS (`CONFIG_TLS`): the dev box's 6.18 has none, so this binary is
//! built for the kernel matrix's guests only (feature `guest-kernels`), where Debian's
//! kernels load `tls.ko`; CI runs it on 6.1.

use redirect_lab::Lab;
use redirect_tests::mesh_with_echo_and;

/// Pod a's sidecar gives each upstream socket kTLS for its sends; b's is plain. The client
/// in a sends `size` bytes to b's echo server: b's sidecar reads a's TLS records and the echo
/// returns them as they are, so the client gets records back, not its bytes. Returns what
/// came back and the bytes each pod's sockets sent through the splice.
fn ktls_echo(annotations: &[(&str, &str)], size: u64) -> (u64, bool, u64, u64) {
    let mut lab = mesh_with_echo_and(annotations, |lab: &mut Lab, pod| {
        let args: &[&str] = if pod == "a" {
            &["--upstream-ktls-tx"]
        } else {
            &[]
        };
        lab.start_sidecar_with(pod, args).unwrap();
    });
    let t = format!("{}:7000", lab.pod("b").v4);
    let s = size.to_string();
    let r = lab.echo("a", &["--target", &t, "--size", &s]).unwrap();
    assert_eq!(r.len(), 1);
    let d = lab.daemon();
    let a = d.pod_status("a").unwrap().counter("accel_bytes");
    let b = d.pod_status("b").unwrap().counter("accel_bytes");
    (r[0].received, r[0].intact, a, b)
}

/// Whether `received` bytes can be `sent` bytes in TLS 1.2 AES-GCM-128 records: each adds
/// 29 (a 5-byte header, an 8-byte explicit nonce, a 16-byte tag). How many records depends on
/// how the sidecar's reads split the stream, so only the shape is compared.
fn records(received: u64, sent: u64) -> bool {
    received > sent && (received - sent).is_multiple_of(29)
}

#[test]
fn ktls_sends_stay_tls_records_when_accelerated() {
    let size = 100_000;
    let plain = ktls_echo(&[("redirectd.dev/accel", "false")], size);
    let accel = ktls_echo(&[], size);
    eprintln!("plain path: {plain:?}; accelerated: {accel:?}");
    // On the plain path the bytes came back as TLS records: more than were sent (each record
    // adds its header, nonce and tag) and not the bytes sent.
    assert!(records(plain.0, size) && !plain.1, "plain path: {plain:?}");
    assert_eq!((plain.2, plain.3), (0, 0), "plain path spliced: {plain:?}");
    // Accelerated: records too, never the plaintext; a's kTLS socket sent nothing
    // through the splice, while b's sidecar (plain) did: the pair was spliced.
    assert!(records(accel.0, size) && !accel.1, "accelerated: {accel:?}");
    assert_eq!(
        accel.2, 0,
        "a's kTLS socket sent through the splice: {accel:?}"
    );
    assert!(accel.3 > 0, "b's sidecar did not use the splice: {accel:?}");
}
