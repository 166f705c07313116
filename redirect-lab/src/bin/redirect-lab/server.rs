//! `redirect-lab server`: answers each connection with the addresses it saw.

use std::net::{Ipv6Addr, SocketAddr};

use anyhow::Result;
use redirect_lab::wire::ServerReply;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use crate::sockets::{canonical, listen};

async fn serve_conn(s: TcpStream) -> Result<()> {
    let local = canonical(s.local_addr()?);
    let peer = canonical(s.peer_addr()?);
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r.take(64 * 1024));
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let echo = line.trim_end().to_string();
    let reply = ServerReply {
        local: local.to_string(),
        peer: peer.to_string(),
        echo: echo.clone(),
    };
    let body = serde_json::to_string(&reply)?;
    if echo.starts_with("GET ") {
        // Read the rest of the request head, then answer as HTTP/1.1.
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
        }
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        w.write_all(resp.as_bytes()).await?;
    } else {
        w.write_all(format!("{body}\n").as_bytes()).await?;
    }
    w.shutdown().await?;
    Ok(())
}

pub async fn run(ports: Vec<u16>) -> Result<()> {
    let mut tasks = Vec::new();
    for p in ports {
        let l = listen(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), p), false)?;
        tasks.push(tokio::spawn(async move {
            loop {
                if let Ok((s, _)) = l.accept().await {
                    tokio::spawn(async move {
                        if let Err(e) = serve_conn(s).await {
                            eprintln!("server: {e:#}");
                        }
                    });
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}
