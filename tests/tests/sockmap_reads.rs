//! Why only the proxies' sockets are spliced, checked on each kernel of the matrix: a socket
//! in a sockhash reads through the kernel's `tcp_bpf_recvmsg`, and when a blocking `read()`
//! on it wakes without sockmap data (a signal whose handler returns, a spurious wakeup) it
//! returns `EAGAIN`, where plain TCP restarts the read and delivers the data that comes next.
//! Applications may block and take signals (timers, profilers, runtimes); Envoy and the lab
//! sidecar use non-blocking sockets, for which `EAGAIN` is the normal answer. So the splice
//! takes the proxies' sockets only, and this test records where that reason still holds.
//!
//! The test builds the smallest splice there is with raw `bpf(2)` calls (no pinning, so
//! nothing outlives the test): a sockhash, an `sk_msg` program that redirects every send to
//! key 1 (`bpf_msg_redirect_hash(.., BPF_F_INGRESS)`), a loopback TCP pair with the reader at
//! key 1 and the writer at key 2; and the same pair without the sockhash as the control.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::time::Duration;

use redirect_lab::scaled;

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_ATTACH: i64 = 8;
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
const BPF_PROG_TYPE_SK_MSG: u32 = 16;
const BPF_SK_MSG_VERDICT: u32 = 7;
const BPF_FUNC_MSG_REDIRECT_HASH: i32 = 71;

/// `bpf(cmd, attr)` with `attr` as the kernel's 128-byte union, filled from 32-bit words.
fn bpf(cmd: i64, words: &[u32]) -> std::io::Result<i64> {
    let mut attr = [0u32; 32];
    attr[..words.len()].copy_from_slice(words);
    // SAFETY: attr is a valid, initialised 128-byte buffer; the kernel reads at most `size`.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), 128usize) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// A `bpf()` command that returns a new descriptor (map create, program load).
fn bpf_fd(cmd: i64, words: &[u32]) -> std::io::Result<OwnedFd> {
    // SAFETY: on success these commands return a new descriptor that nothing else owns.
    bpf(cmd, words).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn lo(p: u64) -> u32 {
    p as u32
}
fn hi(p: u64) -> u32 {
    (p >> 32) as u32
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | u64::from((src << 4) | dst) << 8
        | u64::from(off as u16) << 16
        | u64::from(imm as u32) << 32
}

/// The splice: a sockhash and an `sk_msg` program attached to it that sends every message
/// into the ingress queue of the socket at key 1.
struct Splice {
    map: OwnedFd,
    _prog: OwnedFd,
}

impl Splice {
    fn new() -> Self {
        let map = bpf_fd(BPF_MAP_CREATE, &[BPF_MAP_TYPE_SOCKHASH, 4, 4, 16]).expect("sockhash");
        let fd = map.as_raw_fd();
        let code = [
            insn(0xbf, 6, 1, 0, 0),                          // r6 = ctx
            insn(0x62, 10, 0, -4, 1),                        // *(u32 *)(r10 - 4) = 1
            insn(0xbf, 1, 6, 0, 0),                          // r1 = ctx
            insn(0x18, 2, 1, 0, fd),                         // r2 = map (pseudo map fd)
            0,                                               //   (second half of ld_imm64)
            insn(0xbf, 3, 10, 0, 0),                         // r3 = r10
            insn(0x07, 3, 0, 0, -4),                         // r3 += -4 (&key)
            insn(0xb7, 4, 0, 0, 1),                          // r4 = BPF_F_INGRESS
            insn(0x85, 0, 0, 0, BPF_FUNC_MSG_REDIRECT_HASH), // call
            insn(0x95, 0, 0, 0, 0),                          // exit
        ];
        let license = c"GPL";
        let mut log = vec![0u8; 65536];
        let (c, l, g) = (
            code.as_ptr() as u64,
            license.as_ptr() as u64,
            log.as_mut_ptr() as u64,
        );
        let prog = bpf_fd(
            BPF_PROG_LOAD,
            &[
                BPF_PROG_TYPE_SK_MSG,
                code.len() as u32,
                lo(c),
                hi(c),
                lo(l),
                hi(l),
                1,
                log.len() as u32,
                lo(g),
                hi(g),
            ],
        )
        .unwrap_or_else(|e| {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            panic!(
                "loading the sk_msg program: {e}: {}",
                String::from_utf8_lossy(&log[..end])
            )
        });
        bpf(
            BPF_PROG_ATTACH,
            &[fd as u32, prog.as_raw_fd() as u32, BPF_SK_MSG_VERDICT, 0],
        )
        .expect("attaching sk_msg to the sockhash");
        Splice { map, _prog: prog }
    }

    fn put(&self, key: u32, s: &TcpStream) {
        let value = s.as_raw_fd() as u32;
        let (k, v) = (&key as *const u32 as u64, &value as *const u32 as u64);
        bpf(
            BPF_MAP_UPDATE_ELEM,
            &[self.map.as_raw_fd() as u32, 0, lo(k), hi(k), lo(v), hi(v)],
        )
        .expect("putting a socket in the sockhash");
    }
}

extern "C" fn ignore(_: libc::c_int) {}

/// A blocking read on the accepted side of a loopback pair; a SIGUSR1 (handler installed with
/// `SA_RESTART`) while it waits; then the peer sends "late". What did the read return?
fn read_through_a_signal(splice: Option<&Splice>) -> std::io::Result<Vec<u8>> {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut writer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut reader, _) = l.accept().unwrap();
    if let Some(s) = splice {
        s.put(1, &reader);
        s.put(2, &writer);
    }
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        // The reader stays open until "late" is sent (closing it would leave the splice's
        // key 1 empty, and the writer's send would be dropped).
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
    let splice = Splice::new();
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
