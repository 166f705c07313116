//! What a proxy would see differently on a spliced socket on this kernel, measured: the
//! behaviours of `tcp_bpf` (the read path of a socket in a sockmap) that differ from TCP's and
//! that a start-up check can try in milliseconds, each done on a loopback pair spliced as
//! redirectd splices two proxies' sockets ([`SpliceMap`]) and on the same pair unspliced.
//! `redirectd probe` prints them; `tests/tests/spliced.rs` runs them beside more cases, on
//! every kernel of the matrix. docs/acceleration.md explains each.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    time::Duration,
};

pub use crate::kernel::bpf_sys::SpliceMap;

/// A loopback connection: `a` connected, `b` accepted.
pub struct Pair {
    pub a: TcpStream,
    pub b: TcpStream,
}

/// A loopback pair (2 s read and write timeouts, so no case can hang; no Nagle), spliced
/// when `splice` is given: each end's sends land in the other's receive queue without
/// crossing TCP.
pub fn pair(splice: Option<&SpliceMap>) -> std::io::Result<Pair> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(l.local_addr()?)?;
    let (b, _) = l.accept()?;
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.set_write_timeout(Some(Duration::from_secs(2)))?;
        s.set_nodelay(true)?;
    }
    if let Some(sp) = splice {
        splice_pair(sp, &a, &b)?;
    }
    Ok(Pair { a, b })
}

/// Splices `a` and `b`, the two ends of one loopback connection: each is stored under its
/// peer's local port, which the program looks the sender's up by.
pub fn splice_pair(sp: &SpliceMap, a: &TcpStream, b: &TcpStream) -> std::io::Result<()> {
    sp.put(u32::from(b.local_addr()?.port()), a.as_fd())?;
    sp.put(u32::from(a.local_addr()?.port()), b.as_fd())
}

/// One behaviour: what the calls returned, as text (compared between the two paths).
pub type Case = fn(&mut Pair) -> String;

/// A behaviour that differs on this kernel.
#[derive(Debug, Clone)]
pub struct Difference {
    pub behaviour: &'static str,
    pub plain: String,
    pub spliced: String,
}

/// Runs `cases` on a plain pair and on a spliced one; the ones whose answers differ.
pub fn differences(cases: &[(&'static str, Case)]) -> std::io::Result<Vec<Difference>> {
    let splice = SpliceMap::new()?;
    let mut out = Vec::new();
    for (behaviour, case) in cases {
        let plain = case(&mut pair(None)?);
        let spliced = case(&mut pair(Some(&splice))?);
        if plain != spliced {
            out.push(Difference {
                behaviour,
                plain,
                spliced,
            });
        }
    }
    Ok(out)
}

/// Time for data just written on loopback to arrive.
pub fn settle() {
    std::thread::sleep(Duration::from_millis(20));
}

/// A system call's result as text: the value, or the errno's name when it is negative.
pub fn errno_text(r: isize) -> String {
    if r < 0 {
        let e = std::io::Error::last_os_error();
        format!("error {}", e.raw_os_error().map_or("?".into(), errno_name))
    } else {
        format!("{r}")
    }
}

/// The name of the errnos these cases meet.
pub fn errno_name(e: i32) -> String {
    match e {
        libc::EAGAIN => "EAGAIN".into(),
        libc::ECONNRESET => "ECONNRESET".into(),
        libc::EPIPE => "EPIPE".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EFAULT => "EFAULT".into(),
        libc::ENOTCONN => "ENOTCONN".into(),
        libc::EOPNOTSUPP => "EOPNOTSUPP".into(),
        other => format!("errno {other}"),
    }
}

/// An `io::Result` as text: the value, or the errno's name.
pub fn io_text<T: std::fmt::Debug>(r: std::io::Result<T>) -> String {
    match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => format!(
            "error {}",
            e.raw_os_error().map_or(e.kind().to_string(), errno_name)
        ),
    }
}

/// `recv(2)` of up to `len` bytes: the result and the bytes.
pub fn recv(fd: RawFd, len: usize, flags: i32) -> (isize, Vec<u8>) {
    let mut buf = vec![0u8; len];
    // SAFETY: recv(2) into a buffer of `len` bytes we own.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), len, flags) };
    buf.truncate(n.max(0) as usize);
    (n, buf)
}

/// [`recv`] as text: the count and the bytes, or the errno's name.
pub fn recv_text(fd: RawFd, len: usize, flags: i32) -> String {
    let (n, buf) = recv(fd, len, flags);
    if n < 0 {
        errno_text(n)
    } else {
        format!("{n} {:?}", String::from_utf8_lossy(&buf))
    }
}

/// Is `fd` ready for `events` within `ms`? The revents, as text.
pub fn poll(fd: RawFd, events: i16, ms: i32) -> String {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd we own.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n <= 0 {
        return "not ready".into();
    }
    let mut out = Vec::new();
    for (bit, name) in [
        (libc::POLLIN, "IN"),
        (libc::POLLOUT, "OUT"),
        (libc::POLLRDHUP, "RDHUP"),
        (libc::POLLHUP, "HUP"),
        (libc::POLLERR, "ERR"),
    ] {
        if p.revents & bit != 0 {
            out.push(name);
        }
    }
    out.join("+")
}

/// Makes `fd` non-blocking.
pub fn nonblocking(fd: RawFd) {
    // SAFETY: fcntl(2) on a descriptor we own.
    unsafe {
        let f = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, f | libc::O_NONBLOCK);
    }
}

/// A non-blocking pipe: (read end, write end).
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) writes two descriptors that we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just created for us.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `len` bytes the reader must get byte-exact.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// `splice()` from the socket into a pipe (what a proxy that forwards with splice does).
pub fn case_splice_read(p: &mut Pair) -> String {
    let _ = p.a.write_all(b"hello");
    settle();
    nonblocking(p.b.as_raw_fd());
    let Ok((r, w)) = pipe() else {
        return "pipe2 failed".into();
    };
    // SAFETY: splice(2) between a socket and a pipe we own.
    let n = unsafe {
        libc::splice(
            p.b.as_raw_fd(),
            std::ptr::null_mut(),
            w.as_raw_fd(),
            std::ptr::null_mut(),
            64,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    let mut out = [0u8; 64];
    // SAFETY: read(2) from the pipe's read end.
    let m = unsafe { libc::read(r.as_raw_fd(), out.as_mut_ptr().cast(), 64) };
    let after = recv_text(p.b.as_raw_fd(), 64, libc::MSG_DONTWAIT);
    format!(
        "splice {}, pipe holds {:?}, then recv {after}",
        errno_text(n),
        String::from_utf8_lossy(&out[..m.max(0) as usize])
    )
}

/// `recv(MSG_WAITALL)` of 8 bytes, 3 queued and 8 more sent 100 ms later.
pub fn case_waitall(p: &mut Pair) -> String {
    let _ = p.a.write_all(b"hel");
    let Ok(mut a) = p.a.try_clone() else {
        return "try_clone failed".into();
    };
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let _ = a.write_all(b"lo world");
    });
    let r = recv_text(p.b.as_raw_fd(), 8, libc::MSG_WAITALL);
    let _ = t.join();
    r
}

/// `SO_RCVLOWAT` 10: readable with 5 bytes queued? With 10?
pub fn case_rcvlowat(p: &mut Pair) -> String {
    let lowat: libc::c_int = 10;
    // SAFETY: setsockopt(2) with an int we own.
    unsafe {
        libc::setsockopt(
            p.b.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&lowat as *const libc::c_int).cast(),
            4,
        )
    };
    let _ = p.a.write_all(b"hello");
    let five = poll(p.b.as_raw_fd(), libc::POLLIN, 100);
    let _ = p.a.write_all(b"world");
    let ten = poll(p.b.as_raw_fd(), libc::POLLIN, 100);
    format!("5 of 10 bytes: {five}; 10: {ten}")
}

/// The reader closes with 6 bytes unread: what does the writer see (TCP: an RST)?
pub fn case_close_unread(p: &mut Pair) -> String {
    let _ = p.a.write_all(b"unread");
    settle();
    let Ok(a) = p.a.try_clone() else {
        return "try_clone failed".into();
    };
    let b = std::mem::replace(&mut p.b, a);
    drop(b);
    settle();
    let ready = poll(p.a.as_raw_fd(), libc::POLLIN, 200);
    let mut buf = [0u8; 8];
    let r = p.a.read(&mut buf);
    format!("a's poll {ready}; a's read {}", io_text(r))
}

/// `tcpi_bytes_received` and `tcpi_bytes_acked` of `TCP_INFO` (Envoy reads it for its
/// connection statistics) after 100 bytes each way.
pub fn case_tcp_info(p: &mut Pair) -> String {
    let _ = p.a.write_all(&[7u8; 100]);
    let mut buf = [0u8; 100];
    let _ = p.b.read_exact(&mut buf);
    let _ = p.b.write_all(&[7u8; 100]);
    let _ = p.a.read_exact(&mut buf);
    settle();
    let mut info = [0u8; 232];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt(2) into a buffer of `len` bytes we own.
    let r = unsafe {
        libc::getsockopt(
            p.b.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r < 0 {
        return errno_text(-1);
    }
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&info[o..o + 8]);
        u64::from_ne_bytes(b)
    };
    // struct tcp_info: tcpi_bytes_acked at 120, tcpi_bytes_received at 128 (Linux 4.1).
    format!(
        "bytes_received {}, bytes_acked {}",
        u64_at(128),
        u64_at(120)
    )
}

/// `FIONREAD` (`SIOCINQ`): the bytes a read would return.
pub fn fionread(fd: RawFd) -> String {
    let mut n: libc::c_int = -1;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if r < 0 {
        errno_text(-1)
    } else {
        n.to_string()
    }
}

/// `FIONREAD` with 5 bytes queued.
pub fn case_fionread(p: &mut Pair) -> String {
    let _ = p.a.write_all(b"hello");
    settle();
    fionread(p.b.as_raw_fd())
}

/// The behaviours a start-up check can try, each in milliseconds.
pub const QUICK: &[(&str, Case)] = &[
    ("MSG_WAITALL", case_waitall),
    ("splice() into a pipe", case_splice_read),
    ("FIONREAD", case_fionread),
    ("SO_RCVLOWAT", case_rcvlowat),
    ("close with unread data", case_close_unread),
    ("TCP_INFO byte counters", case_tcp_info),
];

/// `--accel`: how the node's same-node acceleration is decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelMode {
    /// On only where nothing in [`QUICK`] differs from TCP, tried at start.
    Auto,
    /// On, whatever a spliced socket does differently here.
    On,
    /// Never.
    Off,
}

impl AccelMode {
    /// The decision, trying a splice for `Auto` (needs the kernel: call it at start). On
    /// only if the kernel's BTF says where a socket's upper-layer protocol is kept, which
    /// `sk_msg` reads to keep kTLS sockets off the splice.
    pub fn decide(self) -> Decision {
        let decision = match self {
            Self::Off => Decision::off("off: --accel off".into()),
            Self::On => Decision {
                on: true,
                reason: "on: --accel on (whatever a spliced socket does differently here)".into(),
                ulp_ops_offset: 0,
            },
            Self::Auto => decide_auto(),
        };
        if !decision.on {
            return decision;
        }
        match crate::kernel::kernel_layout::ulp_ops_offset() {
            Ok(ulp_ops_offset) => Decision {
                ulp_ops_offset,
                ..decision
            },
            Err(e) => Decision::off(format!(
                "off: a socket's upper-layer protocol cannot be found on this kernel ({e:#}), so a socket given kTLS after its splice could not be kept off it"
            )),
        }
    }
}

/// How acceleration was decided at start, for the log and `redirectd status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub on: bool,
    pub reason: String,
    /// Where `icsk_ulp_ops` is in a TCP socket on this kernel (0 when off), for `sk_msg`.
    pub ulp_ops_offset: u32,
}

impl Decision {
    pub fn off(reason: String) -> Self {
        Self {
            on: false,
            reason,
            ulp_ops_offset: 0,
        }
    }
}

/// `--accel auto`: on only where nothing in [`QUICK`] differs from TCP on this kernel, tried
/// now; otherwise off, naming what differs.
pub fn decide_auto() -> Decision {
    match differences(QUICK) {
        Ok(d) if d.is_empty() => Decision {
            on: true,
            reason: "on: a spliced socket behaved as TCP in every behaviour tried at start".into(),
            ulp_ops_offset: 0,
        },
        Ok(d) => Decision::off(format!(
            "off: on this kernel a spliced socket differs from TCP in {} (tried at start; docs/acceleration.md); --accel on accelerates anyway",
            d.iter().map(|d| d.behaviour).collect::<Vec<_>>().join(", ")
        )),
        Err(e) => Decision::off(format!("off: could not try a splice at start ({e})")),
    }
}
