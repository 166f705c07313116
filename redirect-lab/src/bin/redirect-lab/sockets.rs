//! Socket helpers shared by the lab's programs.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
};

use anyhow::{Context as _, Result};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Normalises `::ffff:a.b.c.d` to `a.b.c.d`.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

pub fn listen(addr: SocketAddr, v6only: bool) -> Result<TcpListener> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    if addr.is_ipv6() {
        let v: libc::c_int = v6only.into();
        // SAFETY: setsockopt with an int we own.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("IPV6_V6ONLY");
        }
    }
    s.bind(addr).with_context(|| format!("binding {addr}"))?;
    s.listen(4096)
        .with_context(|| format!("listening on {addr}"))
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (IPv6: `SOL_IPV6`, `IP6T_SO_ORIGINAL_DST`), exactly
/// as Envoy asks it.
pub fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let fd = s.as_raw_fd();
    // SAFETY: getsockopt into a sockaddr_storage we own, with its true length.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let v6 = s.local_addr()?.is_ipv6()
            && !matches!(s.local_addr()?.ip(), IpAddr::V6(a) if a.to_ipv4_mapped().is_some());
        let (level, mut len) = if v6 {
            (
                libc::SOL_IPV6,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        } else {
            (
                libc::SOL_IP,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if libc::getsockopt(
            fd,
            level,
            SO_ORIGINAL_DST,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        match ss.ss_family as libc::c_int {
            libc::AF_INET => {
                let sin = &*(&ss as *const _ as *const libc::sockaddr_in);
                Ok(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
                    u16::from_be(sin.sin_port),
                ))
            }
            libc::AF_INET6 => {
                let sin6 = &*(&ss as *const _ as *const libc::sockaddr_in6);
                Ok(SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)),
                    u16::from_be(sin6.sin6_port),
                ))
            }
            f => Err(std::io::Error::other(format!(
                "SO_ORIGINAL_DST returned family {f}"
            ))),
        }
    }
}

const IPPROTO_MPTCP: libc::c_int = 262;

/// An MPTCP stream socket of `target`'s family, for tokio.
pub fn mptcp_socket(target: SocketAddr) -> Result<TcpSocket> {
    let family = if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned by the TcpSocket at once.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            IPPROTO_MPTCP,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(IPPROTO_MPTCP)");
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { <TcpSocket as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}
