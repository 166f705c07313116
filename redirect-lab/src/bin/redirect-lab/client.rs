//! `redirect-lab client`: opens connections to targets, one JSON line per connection.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use redirect_lab::wire::{ClientResult, ServerReply};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpSocket, TcpStream},
    sync::{Barrier, Semaphore},
};

use crate::sockets::{canonical, mptcp_socket, original_dst};

/// How the client's sockets are made.
#[derive(Clone, Copy, Debug)]
pub struct Opts {
    /// Bind each socket to this address (port 0) first.
    pub bind: Option<std::net::IpAddr>,
    /// Open MPTCP sockets (`IPPROTO_MPTCP`) instead of TCP ones.
    pub mptcp: bool,
}

/// Connects to `target` as `opts` say.
async fn connect(target: SocketAddr, opts: Opts) -> Result<TcpStream> {
    if opts.bind.is_none() && !opts.mptcp {
        return TcpStream::connect(target).await.context("connect");
    }
    let s = if opts.mptcp {
        mptcp_socket(target)?
    } else if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = opts.bind {
        s.bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("bind {ip}"))?;
    }
    s.connect(target).await.context("connect")
}

async fn one_connection(
    i: usize,
    target: SocketAddr,
    opts: Opts,
    hold: Option<(Arc<Barrier>, Duration)>,
    timeout: Duration,
) -> ClientResult {
    let mut res = ClientResult {
        target: target.to_string(),
        local: None,
        peername: None,
        own_orig_dst: None,
        reply: None,
        error: None,
        peername_held: None,
    };
    let attempt = async {
        let mut s = connect(target, opts).await?;
        res.local = s.local_addr().ok().map(|a| canonical(a).to_string());
        res.peername = s.peer_addr().ok().map(|a| canonical(a).to_string());
        res.own_orig_dst = Some(match original_dst(&s) {
            Ok(a) => canonical(a).to_string(),
            Err(e) => format!("error: {e}"),
        });
        s.write_all(format!("hello {i}\n").as_bytes())
            .await
            .context("write")?;
        let mut buf = Vec::new();
        let mut r = BufReader::new(&mut s);
        r.read_until(b'\n', &mut buf).await.context("read")?;
        let reply: ServerReply = serde_json::from_slice(&buf)
            .with_context(|| format!("reply {:?}", String::from_utf8_lossy(&buf)))?;
        anyhow::Ok((s, reply))
    };
    let out = tokio::time::timeout(timeout, attempt).await;
    let stream = match out {
        Ok(Ok((s, reply))) => {
            res.reply = Some(reply);
            Some(s)
        }
        Ok(Err(e)) => {
            res.error = Some(format!("{e:#}"));
            None
        }
        Err(_) => {
            res.error = Some("timeout".into());
            None
        }
    };
    if let Some((b, linger)) = hold {
        b.wait().await;
        tokio::time::sleep(linger).await;
        if let Some(s) = &stream {
            res.peername_held = s.peer_addr().ok().map(|a| canonical(a).to_string());
        }
        // Everyone has read theirs before anyone closes.
        b.wait().await;
    }
    drop(stream);
    res
}

pub async fn run(
    targets: Vec<SocketAddr>,
    opts: Opts,
    count: usize,
    concurrency: usize,
    hold: bool,
    hold_ms: u64,
    timeout_ms: u64,
) -> Result<()> {
    if hold && count != concurrency {
        anyhow::bail!("--hold needs --count equal to --concurrency");
    }
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let barrier = hold.then(|| Arc::new(Barrier::new(count)));
    let mut tasks = Vec::new();
    for i in 0..count {
        let target = targets[i % targets.len()];
        let permit = sem.clone().acquire_owned().await?;
        let b = barrier.clone().map(|b| (b, Duration::from_millis(hold_ms)));
        tasks.push(tokio::spawn(async move {
            let r = one_connection(i, target, opts, b, Duration::from_millis(timeout_ms)).await;
            drop(permit);
            r
        }));
    }
    for t in tasks {
        println!("{}", serde_json::to_string(&t.await?)?);
    }
    Ok(())
}
