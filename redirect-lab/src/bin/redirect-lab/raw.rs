//! Raw IPv4 sockets, as a process with `CAP_NET_RAW` in a pod could use them to go around
//! capture: `raw-syn` writes a TCP SYN of its own (through a raw TCP socket, or through an
//! ICMP raw socket with `IP_HDRINCL`), `raw-sniff` reports whether such a SYN arrived.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::Result;

/// How the SYN is written.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Via {
    /// `socket(AF_INET, SOCK_RAW, IPPROTO_TCP)`: the kernel writes the IP header.
    TcpRaw,
    /// `socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)` with `IP_HDRINCL`: we write it all.
    IcmpHdrincl,
}

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP SYN header from `src` to `dst`, its checksum over the pseudo header.
fn syn(src: SocketAddrV4, dst: SocketAddrV4) -> [u8; 20] {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend(src.ip().octets());
    pseudo.extend(dst.ip().octets());
    pseudo.extend([0, 6, 0, 20]);
    pseudo.extend(tcp);
    let sum = checksum(&pseudo, 0);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    tcp
}

/// An IPv4 header for 20 bytes of TCP.
fn ip_header(src: Ipv4Addr, dst: Ipv4Addr) -> [u8; 20] {
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip
}

fn last_error(step: &str) -> String {
    format!("{step}: {}", std::io::Error::last_os_error())
}

/// Writes one SYN; prints `{"error": null}` or the step that failed.
pub fn syn_run(source: SocketAddrV4, target: SocketAddrV4, via: Via) -> Result<()> {
    let result = send(source, target, via);
    let line = serde_json::json!({ "error": result.err() });
    println!("{line}");
    Ok(())
}

fn send(source: SocketAddrV4, target: SocketAddrV4, via: Via) -> Result<(), String> {
    let protocol = match via {
        Via::TcpRaw => libc::IPPROTO_TCP,
        Via::IcmpHdrincl => libc::IPPROTO_ICMP,
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, protocol) };
    if fd < 0 {
        return Err(last_error("socket"));
    }
    let mut packet = Vec::new();
    if let Via::IcmpHdrincl = via {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with an int we own on our socket.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_HDRINCL,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let e = last_error("IP_HDRINCL");
            // SAFETY: our own descriptor.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        packet.extend(ip_header(*source.ip(), *target.ip()));
    }
    packet.extend(syn(source, target));
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(*target.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sendto with a buffer and an address we own.
    let rc = unsafe {
        libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let result = if rc < 0 {
        Err(last_error("sendto"))
    } else {
        Ok(())
    };
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    result
}

/// Waits up to `timeout` for a TCP SYN to `port` from source port `from_port`; prints
/// `{"seen": bool}`.
pub fn sniff_run(port: u16, from_port: u16, timeout: Duration) -> Result<()> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    anyhow::ensure!(fd >= 0, last_error("socket"));
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: setsockopt with a timeval we own.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let start = Instant::now();
    let mut seen = false;
    let mut buf = [0u8; 2048];
    while !seen && start.elapsed() < timeout {
        // SAFETY: recv into a buffer we own.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 40 {
            continue;
        }
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        let tcp = &buf[ihl..n as usize];
        if tcp.len() < 14 {
            continue;
        }
        let src = u16::from_be_bytes([tcp[0], tcp[1]]);
        let dst = u16::from_be_bytes([tcp[2], tcp[3]]);
        seen = src == from_port && dst == port && tcp[13] & 0x02 != 0;
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    println!("{}", serde_json::json!({ "seen": seen }));
    Ok(())
}
