//! `redirect-lab validate`: the check Istio's `istio-validation` init container makes in CNI
//! mode before a mesh pod may start (read from its validator; our own code). Run as the
//! proxy's uid, before any proxy exists: listen on loopback at the outbound and inbound
//! capture ports, connect from loopback to the inbound passthrough address (127.0.0.6 or
//! `::6`) at the probe port, and pass when a connection accepted on either listener has the
//! probe port as its `SO_ORIGINAL_DST`. Under iptables REDIRECT sends that connection to the
//! inbound port on 127.0.0.1 / `::1`; the redirector must do the same.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde_json::json;
use tokio::{net::TcpSocket, sync::mpsc};

use crate::sockets::{canonical, listen, original_dst};

/// What the validation saw, printed as one JSON line.
struct Outcome {
    passed: bool,
    accepted_on: Option<String>,
    orig_dst: Option<String>,
    attempts: u32,
    errors: Vec<String>,
}

pub async fn run(ipv6: bool, ports: (u16, u16), probe_port: u16, timeout: Duration) -> Result<()> {
    let (listen_ip, server_ip, client_ip): (IpAddr, IpAddr, IpAddr) = if ipv6 {
        (
            Ipv6Addr::LOCALHOST.into(),
            "::6".parse::<Ipv6Addr>()?.into(),
            Ipv6Addr::LOCALHOST.into(),
        )
    } else {
        (
            Ipv4Addr::LOCALHOST.into(),
            Ipv4Addr::new(127, 0, 0, 6).into(),
            Ipv4Addr::LOCALHOST.into(),
        )
    };
    let (tx, mut rx) = mpsc::channel::<(String, Result<SocketAddr, String>)>(16);
    for port in [ports.0, ports.1] {
        let addr = SocketAddr::new(listen_ip, port);
        let l = listen(addr, true).with_context(|| format!("validator listening on {addr}"))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let local = s
                    .local_addr()
                    .map(|a| canonical(a).to_string())
                    .unwrap_or_default();
                let orig = original_dst(&s).map(canonical).map_err(|e| e.to_string());
                if tx.send((local, orig)).await.is_err() {
                    return;
                }
            }
        });
    }
    let target = SocketAddr::new(server_ip, probe_port);
    let mut out = Outcome {
        passed: false,
        accepted_on: None,
        orig_dst: None,
        attempts: 0,
        errors: Vec::new(),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline && !out.passed {
        out.attempts += 1;
        let socket = if ipv6 {
            TcpSocket::new_v6()?
        } else {
            TcpSocket::new_v4()?
        };
        socket.bind(SocketAddr::new(client_ip, 0))?;
        if let Err(e) = tokio::time::timeout(Duration::from_secs(1), socket.connect(target))
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("connect timed out")))
        {
            out.errors.push(format!("connecting to {target}: {e}"));
        }
        // Whatever was accepted by now answers this attempt.
        let wait = tokio::time::sleep(Duration::from_millis(200));
        tokio::pin!(wait);
        loop {
            tokio::select! {
                Some((local, orig)) = rx.recv() => match orig {
                    Ok(o) => {
                        out.accepted_on = Some(local);
                        out.orig_dst = Some(o.to_string());
                        if o.port() == probe_port {
                            out.passed = true;
                            break;
                        }
                    }
                    Err(e) => out.errors.push(format!("SO_ORIGINAL_DST on {local}: {e}")),
                },
                _ = &mut wait => break,
            }
        }
    }
    println!(
        "{}",
        json!({"passed": out.passed, "accepted_on": out.accepted_on, "orig_dst": out.orig_dst,
               "attempts": out.attempts, "errors": out.errors})
    );
    if !out.passed {
        anyhow::bail!("validation failed: no connection to {target} reached a listener with its original port");
    }
    Ok(())
}
