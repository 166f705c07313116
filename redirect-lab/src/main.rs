//! `redirect-lab`: the lab's programs.
//!
//! - `proxy`: a transparent sidecar that behaves like Envoy under Istio: outbound listener on
//!   127.0.0.1/[::1]:15001, inbound listener on 15006, runs as uid 1337 (the lab starts it so),
//!   learns the original destination only from `getsockopt(SO_ORIGINAL_DST)` (outbound) or
//!   `getsockname()` (inbound), connects upstream and relays bytes. One JSON line per
//!   connection on stdout.
//! - `server`: answers each connection with the addresses it saw (JSON line, or HTTP for curl).
//! - `client`: opens connections to targets and prints one JSON line per connection.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use redirect_lab::wire::{ClientResult, ProxyRecord, ServerReply};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{Barrier, Semaphore},
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The sidecar proxy.
    Proxy {
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        #[arg(long, default_value_t = 15006)]
        inbound_port: u16,
        /// Wait this long after accepting an outbound connection before asking
        /// SO_ORIGINAL_DST (a slow or busy proxy).
        #[arg(long, default_value_t = 0)]
        answer_delay_ms: u64,
    },
    /// A server that reports the addresses it saw.
    Server {
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
    },
    /// Echoes every byte back; half-closes after the client's FIN.
    EchoServer {
        #[arg(long)]
        port: u16,
        /// Read this many bytes, then abort the connection with a reset.
        #[arg(long)]
        reset_after: Option<u64>,
    },
    /// Streams pseudo-random bytes through an echo and checks they come back intact.
    EchoClient {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        size: u64,
        #[arg(long, default_value_t = 1)]
        streams: usize,
        #[arg(long, value_enum, default_value = "write")]
        mode: redirect_lab::echo::SendMode,
        /// Sleep this long after every 16 KiB read (a slow reader).
        #[arg(long)]
        slow_read_us: Option<u64>,
    },
    /// Benchmark server: 1 KiB request/response on one port, a sink on another.
    PerfServer {
        #[arg(long, default_value_t = 9001)]
        rr_port: u16,
        #[arg(long, default_value_t = 9002)]
        sink_port: u16,
    },
    /// Benchmark client: one workload, one JSON line.
    PerfClient {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, value_enum)]
        workload: redirect_lab::perf::Workload,
        #[arg(long, default_value_t = 2000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 32)]
        conns: usize,
    },
    /// A client: `count` connections spread over the targets, `concurrency` at a time.
    Client {
        #[arg(long = "target", required = true)]
        targets: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Keep every connection open until all have their reply (needs count == concurrency).
        #[arg(long)]
        hold: bool,
        /// With --hold: how long to keep them all open once they are, before asking
        /// getpeername() again and closing.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
}

fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Normalises `::ffff:a.b.c.d` to `a.b.c.d`.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn listen(addr: SocketAddr, v6only: bool) -> Result<TcpListener> {
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
fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddr> {
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

async fn proxy(outbound_port: u16, inbound_port: u16, answer_delay: Duration) -> Result<()> {
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
        (
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), inbound_port),
            false,
            false,
        ),
        (
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), inbound_port),
            true,
            false,
        ),
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

async fn server(ports: Vec<u16>) -> Result<()> {
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

async fn one_connection(
    i: usize,
    target: SocketAddr,
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
        let mut s = TcpStream::connect(target).await.context("connect")?;
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

async fn client(
    targets: Vec<SocketAddr>,
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
            let r = one_connection(i, target, b, Duration::from_millis(timeout_ms)).await;
            drop(permit);
            r
        }));
    }
    for t in tasks {
        println!("{}", serde_json::to_string(&t.await?)?);
    }
    Ok(())
}

fn main() -> Result<()> {
    raise_nofile();
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    };
    match Cli::parse().cmd {
        Cmd::Proxy {
            outbound_port,
            inbound_port,
            answer_delay_ms,
        } => rt()?.block_on(proxy(
            outbound_port,
            inbound_port,
            Duration::from_millis(answer_delay_ms),
        )),
        Cmd::Server { ports } => rt()?.block_on(server(ports)),
        Cmd::Client {
            targets,
            count,
            concurrency,
            hold,
            hold_ms,
            timeout_ms,
        } => rt()?.block_on(client(
            targets,
            count,
            concurrency,
            hold,
            hold_ms,
            timeout_ms,
        )),
        Cmd::PerfServer { rr_port, sink_port } => redirect_lab::perf::server(rr_port, sink_port),
        Cmd::PerfClient {
            target,
            workload,
            duration_ms,
            conns,
        } => {
            redirect_lab::perf::client(target, workload, Duration::from_millis(duration_ms), conns)
        }
        Cmd::EchoServer { port, reset_after } => redirect_lab::echo::server(port, reset_after),
        Cmd::EchoClient {
            target,
            size,
            streams,
            mode,
            slow_read_us,
        } => {
            let slow = slow_read_us.map(Duration::from_micros);
            redirect_lab::echo::client(target, size, streams, mode, slow)
        }
    }
}
