//! What a proxy sees on a spliced socket, behaviour by behaviour, next to plain TCP: a
//! loopback pair spliced as redirectd splices two local proxies' sockets (each end's sends go
//! straight to the other's receive queue, `redirect_user::kernel::splice_check`, the same cases
//! `redirectd probe` tries), and the same pair
//! without the splice. Each case does the same system calls on both and describes what they
//! returned; the table of both columns is printed, and the behaviours that differ must be
//! exactly the ones written down for this kernel ([`known_different`]): a kernel that breaks
//! one more, or fixes one, fails the test until the list (and docs/acceleration.md, and the
//! acceleration default that follows from it) is brought up to date.

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use redirect_user::kernel::splice_check::{
    case_close_unread, case_fionread, case_rcvlowat, case_splice_read, case_tcp_info, case_waitall,
    errno_text, io_text, pair, pattern, poll, recv, recv_text, settle, Pair, SpliceMap,
};

fn epoll(fd: RawFd, edge: bool) -> OwnedFd {
    // SAFETY: epoll_create1 returns a new descriptor we own.
    let ep = unsafe { OwnedFd::from_raw_fd(libc::epoll_create1(0)) };
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | if edge { libc::EPOLLET } else { 0 }) as u32,
        u64: 1,
    };
    // SAFETY: registers `fd` with an event we own.
    let added = unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
    assert_eq!(added, 0);
    ep
}

fn epoll_wait(ep: &OwnedFd, ms: i32) -> i32 {
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
    // SAFETY: epoll_wait(2) into an array we own.
    unsafe { libc::epoll_wait(ep.as_raw_fd(), evs.as_mut_ptr(), 4, ms) }
}

/// The cases: a name and what the proxy's calls returned.
type Case = fn(&mut Pair) -> String;

fn case_read(p: &mut Pair) -> String {
    p.a.write_all(b"hello").unwrap();
    settle();
    let mut buf = [0u8; 64];
    io_text(
        p.b.read(&mut buf)
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned()),
    )
}

fn case_readv(p: &mut Pair) -> String {
    p.a.write_all(b"hello").unwrap();
    settle();
    let (mut x, mut y) = ([0u8; 3], [0u8; 64]);
    let iov = [
        libc::iovec {
            iov_base: x.as_mut_ptr().cast(),
            iov_len: x.len(),
        },
        libc::iovec {
            iov_base: y.as_mut_ptr().cast(),
            iov_len: y.len(),
        },
    ];
    // SAFETY: readv(2) into two buffers we own.
    let n = unsafe { libc::readv(p.b.as_raw_fd(), iov.as_ptr(), 2) };
    format!(
        "{} [{}][{}]",
        errno_text(n),
        String::from_utf8_lossy(&x),
        String::from_utf8_lossy(&y[..(n.max(3) as usize - 3).min(64)])
    )
}

fn case_recvmsg(p: &mut Pair) -> String {
    p.a.write_all(b"hello").unwrap();
    settle();
    let mut buf = [0u8; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr with one iovec we own.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: recvmsg(2) into the msghdr above.
    let n = unsafe { libc::recvmsg(p.b.as_raw_fd(), &mut msg, 0) };
    format!("{} flags {:#x}", errno_text(n), msg.msg_flags)
}

fn case_peek(p: &mut Pair) -> String {
    p.a.write_all(b"hello").unwrap();
    settle();
    let peek = recv_text(p.b.as_raw_fd(), 64, libc::MSG_PEEK);
    let read = recv_text(p.b.as_raw_fd(), 64, 0);
    format!("peek {peek}, then read {read}")
}

fn case_trunc(p: &mut Pair) -> String {
    p.a.write_all(b"hello world").unwrap();
    settle();
    let (n, _) = recv(p.b.as_raw_fd(), 5, libc::MSG_TRUNC);
    let rest = recv_text(p.b.as_raw_fd(), 64, 0);
    format!("MSG_TRUNC {}, then read {rest}", errno_text(n))
}

fn case_epoll_level(p: &mut Pair) -> String {
    let ep = epoll(p.b.as_raw_fd(), false);
    let before = epoll_wait(&ep, 0);
    p.a.write_all(b"hello").unwrap();
    let first = epoll_wait(&ep, 500);
    let again = epoll_wait(&ep, 0);
    format!("before {before}, after a write {first}, again unread {again}")
}

fn case_epoll_edge(p: &mut Pair) -> String {
    let ep = epoll(p.b.as_raw_fd(), true);
    p.a.write_all(b"hello").unwrap();
    let first = epoll_wait(&ep, 500);
    let again = epoll_wait(&ep, 50);
    p.a.write_all(b"world").unwrap();
    let more = epoll_wait(&ep, 500);
    format!("after a write {first}, again unread {again}, after a second write {more}")
}

fn case_poll(p: &mut Pair) -> String {
    let before = poll(p.b.as_raw_fd(), libc::POLLIN, 0);
    p.a.write_all(b"hello").unwrap();
    let after = poll(p.b.as_raw_fd(), libc::POLLIN, 500);
    format!("before: {before}; after a write: {after}")
}

fn case_select(p: &mut Pair) -> String {
    let fd = p.b.as_raw_fd();
    let ready = |ms: i64| {
        // SAFETY: an fd_set and timeval we own, for one descriptor below FD_SETSIZE.
        unsafe {
            let mut set: libc::fd_set = std::mem::zeroed();
            libc::FD_SET(fd, &mut set);
            let mut tv = libc::timeval {
                tv_sec: 0,
                tv_usec: ms * 1000,
            };
            libc::select(
                fd + 1,
                &mut set,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &mut tv,
            )
        }
    };
    let before = ready(0);
    p.a.write_all(b"hello").unwrap();
    let after = ready(500);
    format!("before {before}, after a write {after}")
}

fn case_shutdown_a(p: &mut Pair) -> String {
    p.a.write_all(b"bye").unwrap();
    p.a.shutdown(std::net::Shutdown::Write).unwrap();
    settle();
    let mut got = Vec::new();
    let eof = p.b.read_to_end(&mut got);
    let rdhup = poll(p.b.as_raw_fd(), libc::POLLIN | libc::POLLRDHUP, 0);
    p.b.write_all(b"still").unwrap();
    let mut back = [0u8; 16];
    let n = p.a.read(&mut back);
    format!(
        "b read {:?} then {}; b's poll {rdhup}; b -> a after: {}",
        String::from_utf8_lossy(&got),
        io_text(eof),
        io_text(n.map(|n| String::from_utf8_lossy(&back[..n]).into_owned()))
    )
}

fn case_shutdown_b(p: &mut Pair) -> String {
    std::mem::swap(&mut p.a, &mut p.b);
    case_shutdown_a(p)
}

fn case_rst(p: &mut Pair) -> String {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) with a linger we own.
    unsafe {
        libc::setsockopt(
            p.a.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    let a = std::mem::replace(&mut p.a, p.b.try_clone().unwrap());
    drop(a);
    settle();
    let ready = poll(p.b.as_raw_fd(), libc::POLLIN, 200);
    let mut buf = [0u8; 8];
    let r = p.b.read(&mut buf);
    format!("b's poll {ready}; b's read {}", io_text(r))
}

fn case_zero_send(p: &mut Pair) -> String {
    // SAFETY: send(2) of zero bytes.
    let n = unsafe { libc::send(p.a.as_raw_fd(), b"".as_ptr().cast(), 0, 0) };
    let ready = poll(p.b.as_raw_fd(), libc::POLLIN, 100);
    p.a.write_all(b"after").unwrap();
    settle();
    let r = recv_text(p.b.as_raw_fd(), 64, libc::MSG_DONTWAIT);
    format!("send {}; b's poll {ready}; then read {r}", errno_text(n))
}

/// Reads `len` bytes and says whether they are [`pattern`]'s; then shuts the connection, so a
/// writer still blocked (the read failed) is released and its thread can be joined.
fn read_all(b: &mut TcpStream, len: usize) -> String {
    let mut got = vec![0u8; len];
    let r = match b.read_exact(&mut got) {
        Ok(()) if got == pattern(len) => format!("{len} bytes, intact"),
        Ok(()) => format!("{len} bytes, CORRUPTED"),
        Err(e) => format!("read failed: {e}"),
    };
    let _ = b.shutdown(std::net::Shutdown::Both);
    r
}

fn case_sendfile(p: &mut Pair) -> String {
    let len = 1 << 20;
    let path = std::env::temp_dir().join(format!("rlab-sendfile-{}", std::process::id()));
    std::fs::write(&path, pattern(len)).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let a = p.a.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        let mut sent = 0usize;
        while sent < len {
            // SAFETY: sendfile(2) from a file to a socket, both ours; the kernel keeps the offset.
            let n = unsafe {
                libc::sendfile(
                    a.as_raw_fd(),
                    f.as_raw_fd(),
                    std::ptr::null_mut(),
                    len - sent,
                )
            };
            if n <= 0 {
                return format!("sendfile {} after {sent}", errno_text(n));
            }
            sent += n as usize;
        }
        format!("sendfile {sent}")
    });
    let got = read_all(&mut p.b, len);
    format!("{}; {got}", t.join().unwrap())
}

fn case_splice_send(p: &mut Pair) -> String {
    let len = 1 << 20;
    let a = p.a.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        let data = pattern(len);
        let mut fds = [0; 2];
        // SAFETY: pipe(2); both ends are ours and closed below.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: just created.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut w = std::fs::File::from(w);
        let mut sent = 0usize;
        while sent < len {
            let chunk = (len - sent).min(32 << 10);
            w.write_all(&data[sent..sent + chunk]).unwrap();
            let mut left = chunk;
            while left > 0 {
                // SAFETY: splice(2) from our pipe to our socket.
                let n = unsafe {
                    libc::splice(
                        r.as_raw_fd(),
                        std::ptr::null_mut(),
                        a.as_raw_fd(),
                        std::ptr::null_mut(),
                        left,
                        0,
                    )
                };
                if n <= 0 {
                    return format!("splice {} after {sent}", errno_text(n));
                }
                left -= n as usize;
                sent += n as usize;
            }
        }
        format!("spliced {sent}")
    });
    let got = read_all(&mut p.b, len);
    format!("{}; {got}", t.join().unwrap())
}

fn case_large_write(p: &mut Pair) -> String {
    let len = 8 << 20;
    let mut a = p.a.try_clone().unwrap();
    let t = std::thread::spawn(move || io_text(a.write_all(&pattern(len))));
    let got = read_all(&mut p.b, len);
    format!("write_all {}; {got}", t.join().unwrap())
}

const CASES: &[(&str, Case)] = &[
    ("read", case_read),
    ("readv", case_readv),
    ("recvmsg", case_recvmsg),
    ("MSG_PEEK", case_peek),
    ("MSG_WAITALL", case_waitall),
    ("MSG_TRUNC", case_trunc),
    ("splice() into a pipe", case_splice_read),
    ("FIONREAD", case_fionread),
    ("SO_RCVLOWAT", case_rcvlowat),
    ("epoll, level-triggered", case_epoll_level),
    ("epoll, edge-triggered", case_epoll_edge),
    ("poll", case_poll),
    ("select", case_select),
    ("half-close by the connecting side", case_shutdown_a),
    ("half-close by the accepting side", case_shutdown_b),
    ("RST (SO_LINGER 0)", case_rst),
    ("zero-length send", case_zero_send),
    ("sendfile() sender", case_sendfile),
    ("splice() sender", case_splice_send),
    ("large writes (8 MiB)", case_large_write),
    ("close with unread data", case_close_unread),
    ("TCP_INFO byte counters", case_tcp_info),
];

/// The behaviours that differ from plain TCP on kernel `major_minor`, as this suite found
/// them (docs/acceleration.md has each table); `None` for a kernel not yet recorded.
fn known_different(major_minor: &str) -> Option<&'static [&'static str]> {
    match major_minor {
        // 6.1: as 6.18, and FIONREAD counts only TCP's queue (0 with data queued).
        "6.1" => Some(&[
            "MSG_WAITALL",
            "splice() into a pipe",
            "FIONREAD",
            "SO_RCVLOWAT",
            "close with unread data",
            "TCP_INFO byte counters",
        ]),
        // 6.18: a MSG_WAITALL read returns what is queued; splice() from the socket finds
        // nothing (tcp_bpf has no splice_read); SO_RCVLOWAT is not consulted; closing with
        // unread data sends a FIN, not an RST (the data sat in the psock's queue, not TCP's);
        // TCP_INFO's byte counters stay at 0 (the bytes never crossed TCP).
        // 6.12 (Debian's 6.12.95 backport): as 6.18 (FIONREAD's fix reached it).
        "6.12" | "6.18" => Some(&[
            "MSG_WAITALL",
            "splice() into a pipe",
            "SO_RCVLOWAT",
            "close with unread data",
            "TCP_INFO byte counters",
        ]),
        _ => None,
    }
}

#[test]
fn a_spliced_socket_behaves_as_tcp_except_where_written_down() {
    let release = redirect_lab::run("uname", &["-r"]).unwrap();
    let release = release.trim();
    let splice = SpliceMap::new().expect("a sockhash and an sk_msg program");
    let mut rows = Vec::new();
    let mut different = Vec::new();
    for (name, case) in CASES {
        let plain = case(&mut pair(None).unwrap());
        let spliced = case(&mut pair(Some(&splice)).unwrap());
        let same = plain == spliced;
        if !same {
            different.push(*name);
        }
        rows.push(format!(
            "| {name} | {plain} | {spliced} | {} |",
            if same { "same" } else { "**differs**" }
        ));
    }
    println!(
        "kernel {release}\n\n| behaviour | plain TCP | spliced | |\n| --- | --- | --- | --- |"
    );
    for r in &rows {
        println!("{r}");
    }
    let major_minor: String = release.split('.').take(2).collect::<Vec<_>>().join(".");
    let known = known_different(&major_minor).unwrap_or_else(|| {
        panic!("kernel {release}: no record of how a spliced socket behaves here; found {different:?} (table above): write it down in known_different() and docs/acceleration.md")
    });
    assert_eq!(
        different, known,
        "kernel {release}: the behaviours that differ on a spliced socket changed (table above)"
    );
}
