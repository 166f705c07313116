//! `redirect-lab proxy`: the small transparent sidecar (see the binary's doc).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use redirect_lab::wire::ProxyRecord;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::sockets::{canonical, listen, mptcp_socket, original_dst};

fn emit(r: &ProxyRecord) {
    if let Ok(line) = serde_json::to_string(r) {
        println!("{line}");
    }
}

async fn relay(mut down: TcpStream, record: ProxyRecord, upstream: std::io::Result<TcpStream>) {
    match upstream {
        Ok(mut up) => {
            let record = ProxyRecord {
                upstream_local: up.local_addr().ok().map(|a| canonical(a).to_string()),
                ..record
            };
            emit(&record);
            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
        }
        Err(e) => emit(&ProxyRecord {
            event: "error".into(),
            error: Some(format!("upstream: {e}")),
            ..record
        }),
    }
}

/// How the proxy makes its outbound upstream connections.
#[derive(Clone, Copy, Debug, Default)]
pub struct Upstream {
    /// Wait this long after accepting before asking SO_ORIGINAL_DST.
    pub answer_delay: Duration,
    /// Connect with an MPTCP socket (`IPPROTO_MPTCP`).
    pub mptcp: bool,
    /// Give the connected socket kTLS for its sends (`TCP_ULP` "tls", then `TLS_TX` with a
    /// fixed AES-GCM-128 key): what it sends leaves as TLS records, as from a proxy that
    /// hands its TLS to the kernel.
    pub ktls_tx: bool,
}

/// `TCP_ULP`, `SOL_TLS`, `TLS_TX`, `TLS_1_2_VERSION`, `TLS_CIPHER_AES_GCM_128` (linux/tls.h).
const TCP_ULP: i32 = 31;
const SOL_TLS: i32 = 282;
const TLS_TX: i32 = 1;
const TLS_1_2_VERSION: u16 = 0x0303;
const TLS_CIPHER_AES_GCM_128: u16 = 51;

/// `struct tls12_crypto_info_aes_gcm_128`.
#[repr(C)]
struct Tls12AesGcm128 {
    version: u16,
    cipher_type: u16,
    iv: [u8; 8],
    key: [u8; 16],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}

fn setsockopt(fd: i32, level: i32, name: i32, value: &[u8]) -> std::io::Result<()> {
    // SAFETY: `value` is a live buffer of the given length.
    let r = unsafe { libc::setsockopt(fd, level, name, value.as_ptr().cast(), value.len() as u32) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Turns kTLS on for `s`'s sends, with a fixed key (the lab checks records, not secrecy).
fn ktls_tx(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let fd = s.as_raw_fd();
    setsockopt(fd, libc::IPPROTO_TCP, TCP_ULP, b"tls")?;
    let info = Tls12AesGcm128 {
        version: TLS_1_2_VERSION,
        cipher_type: TLS_CIPHER_AES_GCM_128,
        iv: [1; 8],
        key: [2; 16],
        salt: [3; 4],
        rec_seq: [0; 8],
    };
    // SAFETY: a plain repr(C) struct viewed as its bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&raw const info).cast::<u8>(),
            std::mem::size_of::<Tls12AesGcm128>(),
        )
    };
    setsockopt(fd, SOL_TLS, TLS_TX, bytes)
}

/// Connects to `to` as `how` says.
async fn connect_upstream(to: SocketAddr, how: Upstream) -> std::io::Result<TcpStream> {
    let s = if how.mptcp {
        mptcp_socket(to)
            .map_err(std::io::Error::other)?
            .connect(to)
            .await?
    } else {
        TcpStream::connect(to).await?
    };
    let _ = s.set_nodelay(true);
    if how.ktls_tx {
        ktls_tx(&s)?;
    }
    Ok(s)
}

async fn handle_outbound(down: TcpStream, how: Upstream) {
    tokio::time::sleep(how.answer_delay).await;
    let peer = down
        .peer_addr()
        .map(|a| canonical(a).to_string())
        .unwrap_or_default();
    let local = down
        .local_addr()
        .map(|a| canonical(a).to_string())
        .unwrap_or_default();
    let base = ProxyRecord {
        event: "outbound".into(),
        peer,
        local,
        orig_dst: None,
        upstream_local: None,
        error: None,
    };
    match original_dst(&down) {
        Ok(orig) => {
            let orig = canonical(orig);
            let record = ProxyRecord {
                orig_dst: Some(orig.to_string()),
                ..base
            };
            relay(down, record, connect_upstream(orig, how).await).await;
        }
        Err(e) => emit(&ProxyRecord {
            event: "error".into(),
            error: Some(format!("SO_ORIGINAL_DST: {e}")),
            ..base
        }),
    }
}

/// Inbound: the accepted socket's local address is the original destination (sk_lookup, as
/// with TPROXY); a connection the redirector rewrote at `connect()` to the inbound port (the
/// proxy calling its own pod) carries it in SO_ORIGINAL_DST instead. Connect to it from
/// Istio's passthrough source (127.0.0.6 / ::6), as Envoy does.
async fn handle_inbound(down: TcpStream, inbound_port: u16) {
    let peer = down
        .peer_addr()
        .map(|a| canonical(a).to_string())
        .unwrap_or_default();
    let local = down.local_addr().map(canonical);
    let base = ProxyRecord {
        event: "inbound".into(),
        peer,
        local: local.as_ref().map(ToString::to_string).unwrap_or_default(),
        orig_dst: None,
        upstream_local: None,
        error: None,
    };
    let orig = match local {
        Ok(o) if o.port() != inbound_port => o,
        Ok(_) => match original_dst(&down) {
            Ok(o) => canonical(o),
            Err(e) => {
                return emit(&ProxyRecord {
                    event: "error".into(),
                    error: Some(format!("SO_ORIGINAL_DST: {e}")),
                    ..base
                });
            }
        },
        Err(e) => {
            return emit(&ProxyRecord {
                event: "error".into(),
                error: Some(format!("getsockname: {e}")),
                ..base
            });
        }
    };
    let upstream = async {
        let s = if orig.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        let passthrough = if orig.is_ipv4() {
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))
        } else {
            IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6))
        };
        s.bind(SocketAddr::new(passthrough, 0))?;
        s.connect(orig).await
    }
    .await;
    let record = ProxyRecord {
        orig_dst: Some(orig.to_string()),
        ..base
    };
    relay(down, record, upstream).await;
}

async fn accept_loop(l: TcpListener, outbound: bool, inbound_port: u16, how: Upstream) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                if outbound {
                    tokio::spawn(handle_outbound(s, how));
                } else {
                    tokio::spawn(handle_inbound(s, inbound_port));
                }
            }
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Runs the sidecar. `inbound_loopback`: the inbound listeners bind 127.0.0.1 and ::1 only
/// (a listener only a connection REDIRECT sends to loopback can reach).
pub async fn run(
    outbound_port: u16,
    inbound_port: u16,
    how: Upstream,
    inbound_loopback: bool,
) -> Result<()> {
    let (in4, in6): (IpAddr, IpAddr) = if inbound_loopback {
        (Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into())
    } else {
        (Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into())
    };
    let mut tasks = Vec::new();
    for (addr, v6only, outbound) in [
        (
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), outbound_port),
            false,
            true,
        ),
        (
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), outbound_port),
            true,
            true,
        ),
        (SocketAddr::new(in4, inbound_port), false, false),
        (SocketAddr::new(in6, inbound_port), true, false),
    ] {
        let l = listen(addr, v6only)?;
        tasks.push(tokio::spawn(accept_loop(l, outbound, inbound_port, how)));
    }
    eprintln!("proxy: outbound :{outbound_port}, inbound :{inbound_port}");
    for t in tasks {
        t.await?;
    }
    Ok(())
}
