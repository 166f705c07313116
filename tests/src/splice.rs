//! The smallest splice there is, made with raw `bpf(2)` calls (no pinning, so nothing
//! outlives a test): a sockhash and an `sk_msg` program, for the tests of how a spliced
//! socket behaves next to plain TCP (`sockmap_reads.rs`, `spliced.rs`).

use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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

/// The splice: a sockhash and an `sk_msg` program attached to it that sends every message a
/// socket sends into the ingress queue of its peer, as redirectd splices two local proxies'
/// sockets (`bpf_msg_redirect_hash(.., BPF_F_INGRESS)`). Each socket is put under its peer's
/// local port ([`Splice::pair`]), and the program looks the sender's local port up.
pub struct Splice {
    map: OwnedFd,
    _prog: OwnedFd,
}

impl Splice {
    pub fn new() -> Self {
        let map = bpf_fd(BPF_MAP_CREATE, &[BPF_MAP_TYPE_SOCKHASH, 4, 4, 16]).expect("sockhash");
        let fd = map.as_raw_fd();
        let code = [
            insn(0xbf, 6, 1, 0, 0),                          // r6 = ctx
            insn(0x61, 2, 1, 64, 0),                         // r2 = ctx->local_port
            insn(0x63, 10, 2, -4, 0),                        // *(u32 *)(r10 - 4) = r2
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

    /// Splices `a` and `b` (two ends of one loopback connection): what either sends lands in
    /// the other's receive queue without crossing TCP.
    pub fn pair(&self, a: &TcpStream, b: &TcpStream) {
        let port = |s: &TcpStream| u32::from(s.local_addr().expect("local address").port());
        self.put(port(b), a);
        self.put(port(a), b);
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

impl Default for Splice {
    fn default() -> Self {
        Self::new()
    }
}
