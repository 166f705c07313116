//! DNS clients for DNS capture's tests: one query for an A record, over a connected UDP
//! socket (glibc's way), an unconnected one with `sendto` or `sendmmsg` and `recvfrom` (musl's
//! way), or TCP; it reports the answer and where the reply came from, as the application saw
//! it. And `with-resolv-conf`: runs a program (a real resolver: glibc's `getent`, a musl
//! binary) with its own `/etc/resolv.conf`, in a private mount namespace.

use std::{
    ffi::CString,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use redirect_lab::wire::DnsResult;

/// How the query is sent.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Transport {
    /// `connect()` then `send()` / `recvfrom()`.
    Connected,
    /// `sendto()` / `recvfrom()` on an unconnected socket.
    Sendto,
    /// `sendmmsg()` of one message / `recvfrom()` on an unconnected socket.
    Sendmmsg,
    /// TCP, with the two-byte length prefix.
    Tcp,
}

const QUERY_ID: u16 = 0x5eed;

/// A standard query with recursion desired for `name`'s A record.
fn query(name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&QUERY_ID.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Skips a (possibly compressed) name at `i`; returns the index after it.
fn skip_name(m: &[u8], mut i: usize) -> Result<usize> {
    loop {
        let len = *m.get(i).context("truncated name")?;
        if len & 0xc0 == 0xc0 {
            return Ok(i + 2);
        }
        if len == 0 {
            return Ok(i + 1);
        }
        i += 1 + len as usize;
    }
}

/// The A records of a reply to [`query`], and its response code.
fn answers(m: &[u8]) -> Result<(Vec<String>, u8)> {
    if m.len() < 12 || u16::from_be_bytes([m[0], m[1]]) != QUERY_ID {
        bail!("not a reply to our query: {m:?}");
    }
    let rcode = m[3] & 0x0f;
    let (qd, an) = (
        u16::from_be_bytes([m[4], m[5]]),
        u16::from_be_bytes([m[6], m[7]]),
    );
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(m, i)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        i = skip_name(m, i)?;
        let rr = m.get(i..i + 10).context("truncated record")?;
        let (rtype, len) = (
            u16::from_be_bytes([rr[0], rr[1]]),
            u16::from_be_bytes([rr[8], rr[9]]) as usize,
        );
        let data = m.get(i + 10..i + 10 + len).context("truncated data")?;
        if rtype == 1 && len == 4 {
            out.push(format!("{}.{}.{}.{}", data[0], data[1], data[2], data[3]));
        }
        i += 10 + len;
    }
    Ok((out, rcode))
}

fn udp_socket(server: SocketAddr, timeout: Duration) -> Result<UdpSocket> {
    let any: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let s = UdpSocket::bind(any)?;
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

/// `sendmmsg(2)` of one datagram to `to`.
fn sendmmsg_one(s: &UdpSocket, to: SocketAddr, data: &[u8]) -> Result<()> {
    let (mut storage, len) = sockaddr(to);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: zeroed mmsghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
    msg.msg_hdr.msg_name = (&raw mut storage).cast();
    msg.msg_hdr.msg_namelen = len;
    msg.msg_hdr.msg_iov = &raw mut iov;
    msg.msg_hdr.msg_iovlen = 1;
    // SAFETY: one valid message for a valid socket.
    let n = unsafe { libc::sendmmsg(s.as_raw_fd(), &raw mut msg, 1, 0) };
    if n != 1 {
        bail!("sendmmsg: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut s).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut s).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (s, len as libc::socklen_t)
}

fn ask(
    server: SocketAddr,
    name: &str,
    how: Transport,
    timeout: Duration,
    read_delay: Duration,
) -> Result<DnsResult> {
    let q = query(name);
    let mut buf = vec![0u8; 4096];
    let (reply, from) = match how {
        Transport::Tcp => {
            let mut s = TcpStream::connect_timeout(&server, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            let mut framed = (q.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&q);
            s.write_all(&framed)?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len)?;
            let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut m)?;
            (m, s.peer_addr()?)
        }
        Transport::Connected => {
            let s = udp_socket(server, timeout)?;
            s.connect(server)?;
            s.send(&q)?;
            std::thread::sleep(read_delay);
            let (n, from) = s.recv_from(&mut buf)?;
            (buf[..n].to_vec(), from)
        }
        Transport::Sendto | Transport::Sendmmsg => {
            let s = udp_socket(server, timeout)?;
            if matches!(how, Transport::Sendto) {
                s.send_to(&q, server)?;
            } else {
                sendmmsg_one(&s, server, &q)?;
            }
            std::thread::sleep(read_delay);
            let (n, from) = s.recv_from(&mut buf)?;
            (buf[..n].to_vec(), from)
        }
    };
    let (answers, rcode) = answers(&reply)?;
    Ok(DnsResult {
        answers,
        rcode,
        from: Some(from.to_string()),
        error: None,
    })
}

/// Asks `server` for `name`'s A record once and prints a [`DnsResult`] line; over UDP, the
/// reply is read `read_delay` after the query was sent (it waits in the socket meanwhile).
pub fn run(
    server: SocketAddr,
    name: &str,
    how: Transport,
    timeout: Duration,
    read_delay: Duration,
) -> Result<()> {
    let r = ask(server, name, how, timeout, read_delay).unwrap_or_else(|e| DnsResult {
        error: Some(format!("{e:#}")),
        ..Default::default()
    });
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// `count` queries to `server`, each from a fresh UDP socket (`sendto`), closed at once or,
/// with `hold`, all kept open until the end; prints `{"sent": n, "refused": n}` (refused:
/// the send failed with EPERM).
pub fn flood(server: SocketAddr, count: usize, hold: bool) -> Result<()> {
    let q = query("flood.test");
    let (mut sent, mut refused, mut held) = (0usize, 0usize, Vec::new());
    for _ in 0..count {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let s = UdpSocket::bind(bind)?;
        match s.send_to(&q, server) {
            Ok(_) => sent += 1,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => refused += 1,
            Err(e) => return Err(e).context("sendto"),
        }
        if hold {
            held.push(s);
        }
    }
    println!(
        "{}",
        serde_json::json!({ "sent": sent, "refused": refused })
    );
    drop(held);
    Ok(())
}

/// Runs `cmd` with an `/etc/resolv.conf` naming `nameservers` only: a private mount
/// namespace, a bind mount over the file, then exec (never returns on success).
pub fn with_resolv_conf(nameservers: &[String], cmd: &[String]) -> Result<()> {
    let file = std::env::temp_dir().join(format!("resolv-{}.conf", std::process::id()));
    let mut text: String = nameservers
        .iter()
        .map(|n| format!("nameserver {n}\n"))
        .collect();
    text.push_str("options timeout:2 attempts:2\n");
    std::fs::write(&file, text).context("writing the resolv.conf")?;
    let c = |s: &str| CString::new(s).context("a NUL in an argument");
    let (src, dst, root) = (c(&file.to_string_lossy())?, c("/etc/resolv.conf")?, c("/")?);
    // SAFETY: plain syscalls with valid C strings; this process is single-threaded here.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0
            || libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            || libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
        {
            bail!(
                "a private /etc/resolv.conf: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    // The mount holds the file: it needs no name any more (nothing is left behind).
    let _ = std::fs::remove_file(&file);
    let program = cmd.first().context("no command")?;
    let err = std::os::unix::process::CommandExt::exec(
        std::process::Command::new(program).args(&cmd[1..]),
    );
    bail!("exec {program}: {err}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_answer_with_a_compressed_name() {
        let mut m = query("a.test");
        m[2] = 0x81;
        m[3] = 0x80;
        m[7] = 1;
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 9, 9, 9]);
        assert_eq!(answers(&m).unwrap(), (vec!["10.9.9.9".to_string()], 0));
    }
}
