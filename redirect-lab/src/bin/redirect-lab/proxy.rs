//! `redirect-lab proxy`: the small transparent sidecar (see the binary's doc).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use redirect_lab::wire::ProxyRecord;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::sockets::{canonical, listen, original_dst};

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

async fn handle_outbound(down: TcpStream, answer_delay: Duration) {
    tokio::time::sleep(answer_delay).await;
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
            relay(down, record, TcpStream::connect(orig).await).await;
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

async fn accept_loop(l: TcpListener, outbound: bool, inbound_port: u16, answer_delay: Duration) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                if outbound {
                    tokio::spawn(handle_outbound(s, answer_delay));
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
    answer_delay: Duration,
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
        tasks.push(tokio::spawn(accept_loop(
            l,
            outbound,
            inbound_port,
            answer_delay,
        )));
    }
    eprintln!("proxy: outbound :{outbound_port}, inbound :{inbound_port}");
    for t in tasks {
        t.await?;
    }
    Ok(())
}
