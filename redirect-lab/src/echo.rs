//! Byte-exact echo through the mesh: `echo-server` sends back every byte it reads and
//! half-closes after the client's FIN; `echo-client` streams pseudo-random bytes (write,
//! sendfile or splice), half-closes, reads everything back and compares length and hash.
//! Plain threads and blocking sockets, so the send paths are the ones a program would use.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// FNV-1a, 64 bit: any lost, duplicated or reordered byte changes it.
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so the client need not keep what it sent.
pub struct Bytes(u64);

impl Bytes {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// How the client sends.
#[derive(Clone, Copy, Debug, clap::ValueEnum, Serialize, Deserialize, PartialEq, Eq)]
pub enum SendMode {
    Write,
    Sendfile,
    Splice,
}

/// One stream's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EchoResult {
    pub stream: usize,
    pub sent: u64,
    pub received: u64,
    /// Length and hash of what came back equal what was sent.
    pub intact: bool,
    /// `ok`, `reset` (ECONNRESET/EPIPE seen), `eof-early`, or an error text.
    pub outcome: String,
    pub micros: u64,
}

/// `echo-server`: one thread per connection. With `reset_after`, it reads that many bytes
/// and then aborts the connection (SO_LINGER 0: a reset).
pub fn server(port: u16, reset_after: Option<u64>) -> Result<()> {
    let l = TcpListener::bind(SocketAddr::from(([0u16; 8], port)))
        .with_context(|| format!("binding [::]:{port}"))?;
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                let n = match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                total += n as u64;
                if reset_after.is_some_and(|r| total >= r) {
                    abort(&s);
                    return;
                }
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            let _ = s.shutdown(Shutdown::Write);
            // Wait for the client to close, so our close is not a reset.
            let _ = s.read(&mut buf);
        });
    }
    Ok(())
}

/// Closes with a reset.
pub fn abort(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a struct we own; the socket is closed right after.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn send_all(s: &TcpStream, size: u64, seed: u64, mode: SendMode) -> Result<Fnv> {
    let mut gen = Bytes::new(seed);
    let mut hash = Fnv::default();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = size;
    let mut w = s;
    match mode {
        SendMode::Write => {
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                gen.fill(&mut buf[..n]);
                hash.update(&buf[..n]);
                w.write_all(&buf[..n]).context("write")?;
                left -= n as u64;
            }
        }
        SendMode::Sendfile => {
            // The data goes to a file first; sendfile(2) sends it from the page cache.
            let mut file = tempfile()?;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                gen.fill(&mut buf[..n]);
                hash.update(&buf[..n]);
                file.write_all(&buf[..n])?;
                left -= n as u64;
            }
            let mut off: libc::off_t = 0;
            while (off as u64) < size {
                // SAFETY: sendfile between fds we own, with an offset we own.
                let r = unsafe {
                    libc::sendfile(
                        s.as_raw_fd(),
                        file.as_raw_fd(),
                        &mut off,
                        (size - off as u64) as usize,
                    )
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error()).context("sendfile");
                }
            }
        }
        SendMode::Splice => {
            let mut fds = [0; 2];
            // SAFETY: pipe2 into an array we own.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                return Err(std::io::Error::last_os_error()).context("pipe2");
            }
            // SAFETY: the pipe fds are ours from here on.
            let (r, mut wp) = unsafe {
                use std::os::fd::FromRawFd;
                (
                    std::fs::File::from_raw_fd(fds[0]),
                    std::fs::File::from_raw_fd(fds[1]),
                )
            };
            while left > 0 {
                let n = left.min(64 * 1024) as usize;
                gen.fill(&mut buf[..n]);
                hash.update(&buf[..n]);
                wp.write_all(&buf[..n])?;
                let mut moved = 0;
                while moved < n {
                    // SAFETY: splice from our pipe into our socket.
                    let m = unsafe {
                        libc::splice(
                            r.as_raw_fd(),
                            std::ptr::null_mut(),
                            s.as_raw_fd(),
                            std::ptr::null_mut(),
                            n - moved,
                            libc::SPLICE_F_MOVE,
                        )
                    };
                    if m <= 0 {
                        return Err(std::io::Error::last_os_error()).context("splice");
                    }
                    moved += m as usize;
                }
                left -= n as u64;
            }
        }
    }
    Ok(hash)
}

fn tempfile() -> Result<std::fs::File> {
    let path = std::env::temp_dir().join(format!(
        "redirect-lab-sendfile-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(f)
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionAborted
    )
}

/// One stream: send `size` bytes (then half-close), read the echo, compare. With `idle`, a
/// read or write that waits longer ends the stream ("read: ... timed out"), so a stalled
/// path shows as a failure instead of a hang.
pub fn stream(
    i: usize,
    target: SocketAddr,
    size: u64,
    mode: SendMode,
    slow_read: Option<Duration>,
    idle: Option<Duration>,
) -> EchoResult {
    let start = Instant::now();
    let mut res = EchoResult {
        stream: i,
        sent: 0,
        received: 0,
        intact: false,
        outcome: String::new(),
        micros: 0,
    };
    let s = match TcpStream::connect(target) {
        Ok(s) => s,
        Err(e) => {
            res.outcome = format!("connect: {e}");
            return res;
        }
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(idle);
    let _ = s.set_write_timeout(idle);
    let writer = {
        let s = match s.try_clone() {
            Ok(s) => s,
            Err(e) => {
                res.outcome = format!("clone: {e}");
                return res;
            }
        };
        std::thread::spawn(move || {
            let r = send_all(&s, size, i as u64 + 1, mode);
            let _ = s.shutdown(Shutdown::Write);
            r
        })
    };
    let mut hash = Fnv::default();
    let mut buf = vec![
        0u8;
        if slow_read.is_some() {
            16 * 1024
        } else {
            256 * 1024
        }
    ];
    let mut r = &s;
    let read_err = loop {
        match r.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => {
                hash.update(&buf[..n]);
                res.received += n as u64;
                if let Some(d) = slow_read {
                    std::thread::sleep(d);
                }
            }
            Err(e) => break Some(e),
        }
    };
    let sent = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))
        .and_then(|r| r);
    res.micros = start.elapsed().as_micros() as u64;
    match (sent, read_err) {
        (Ok(h), None) => {
            res.sent = size;
            res.intact = res.received == size && h.0 == hash.0;
            res.outcome = if res.received == size {
                "ok".into()
            } else {
                "eof-early".into()
            };
        }
        (_, Some(e)) if is_reset(&e) => res.outcome = "reset".into(),
        (Err(e), _) if e.downcast_ref::<std::io::Error>().is_some_and(is_reset) => {
            res.outcome = "reset".into()
        }
        (Err(e), None) => res.outcome = format!("send: {e:#}"),
        (_, Some(e)) => res.outcome = format!("read: {e}"),
    }
    res
}

/// `echo-client`: `streams` streams at once, each `size` bytes.
pub fn client(
    target: SocketAddr,
    size: u64,
    streams: usize,
    mode: SendMode,
    slow_read: Option<Duration>,
    idle: Option<Duration>,
) -> Result<()> {
    let handles: Vec<_> = (0..streams)
        .map(|i| std::thread::spawn(move || stream(i, target, size, mode, slow_read, idle)))
        .collect();
    for h in handles {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("stream thread panicked"))?;
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}
