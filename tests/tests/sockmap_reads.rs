//! Why only the proxies' sockets are spliced, checked on each kernel of the matrix: a socket
//! in a sockhash reads through the kernel's `tcp_bpf_recvmsg`, and when a blocking `read()`
//! on it wakes without sockmap data (a signal whose handler returns, a spurious wakeup) it
//! returns `EAGAIN`, where plain TCP restarts the read and delivers the data that comes next.
//! Applications may block and take signals (timers, profilers, runtimes); Envoy and the lab
//! sidecar use non-blocking sockets, for which `EAGAIN` is the normal answer. So the splice
//! takes the proxies' sockets only, and this test records where that reason still holds.
//!
//! The test splices a loopback TCP pair with the smallest splice there is
//! (`redirect_user::kernel::splice_check`: each end's sends go to the other's ingress queue, as redirectd
//! splices proxies); the same pair without it is the control.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::thread::JoinHandleExt;
use std::time::Duration;

use redirect_lab::scaled;
use redirect_user::kernel::splice_check::{splice_pair, SpliceMap};

extern "C" fn ignore(_: libc::c_int) {}

/// A blocking read on the accepted side of a loopback pair; a SIGUSR1 (handler installed with
/// `SA_RESTART`) while it waits; then the peer sends "late". What did the read return?
fn read_through_a_signal(splice: Option<&SpliceMap>) -> std::io::Result<Vec<u8>> {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut writer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut reader, _) = l.accept().unwrap();
    if let Some(s) = splice {
        splice_pair(s, &reader, &writer).expect("splicing the pair");
    }
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        // The reader stays open until "late" is sent (closing it would take it out of the
        // splice, and the writer's send would be dropped).
        (reader.read(&mut buf).map(|n| buf[..n].to_vec()), reader)
    });
    std::thread::sleep(scaled(Duration::from_millis(300)));
    // SAFETY: the thread is alive (it blocks in read until "late" is sent below).
    unsafe { libc::pthread_kill(t.as_pthread_t(), libc::SIGUSR1) };
    std::thread::sleep(scaled(Duration::from_millis(300)));
    writer.write_all(b"late").unwrap();
    t.join().unwrap().0
}

#[test]
fn a_signal_during_a_blocking_read_gives_eagain_only_on_a_spliced_socket() {
    // SAFETY: installs a handler that does nothing, for SIGUSR1, in this test binary only.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ignore as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    let release = redirect_lab::run("uname", &["-r"]).unwrap();
    let plain = read_through_a_signal(None);
    assert_eq!(
        plain.as_ref().ok().map(Vec::as_slice),
        Some(&b"late"[..]),
        "plain TCP: {plain:?}"
    );
    let splice = SpliceMap::new().expect("a sockhash and an sk_msg program");
    let spliced = read_through_a_signal(Some(&splice));
    println!(
        "kernel {}: through a signal, a plain blocking read got {:?}, a spliced one {:?}",
        release.trim(),
        plain
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
        spliced
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    );
    let e = spliced.expect_err("a blocking read on a spliced socket carried on through a signal: this kernel may have fixed tcp_bpf_recvmsg; re-check the README's reason for splicing proxy sockets only");
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::WouldBlock,
        "a blocking read on a spliced socket failed with {e}, not EAGAIN"
    );
}
