//! `redirect-lab`: the lab's programs.
//!
//! - `proxy`: a transparent sidecar that behaves like Envoy under Istio: outbound listener on
//!   127.0.0.1/[::1]:15001, inbound listener on 15006, runs as uid 1337 (the lab starts it so),
//!   learns the original destination only from `getsockopt(SO_ORIGINAL_DST)` (outbound) or
//!   `getsockname()` (inbound), connects upstream and relays bytes. One JSON line per
//!   connection on stdout.
//! - `server`: answers each connection with the addresses it saw (JSON line, or HTTP for curl).
//! - `client`: opens connections to targets and prints one JSON line per connection.
//! - `validate`: Istio's istio-validation check (CNI mode), as its validator makes it.
//! - `raw-syn`, `raw-sniff`: a TCP SYN written through a raw socket, and its detection.

mod client;
mod dns;
mod proxy;
mod raw;
mod server;
mod sockets;
mod validate;

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};

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
        /// Bind the inbound listeners to 127.0.0.1 and ::1 only.
        #[arg(long)]
        inbound_loopback: bool,
        /// Connect upstream (outbound) with MPTCP sockets.
        #[arg(long)]
        upstream_mptcp: bool,
        /// Give each outbound upstream socket kTLS for its sends (fixed key): its bytes
        /// leave as TLS records.
        #[arg(long)]
        upstream_ktls_tx: bool,
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
        /// End a stream whose read or write waits longer than this (a stalled path fails
        /// instead of hanging).
        #[arg(long)]
        idle_timeout_ms: Option<u64>,
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
    /// Istio's istio-validation check: run as the proxy's uid before any proxy exists.
    Validate {
        /// Check IPv6 (::1 listeners, ::6 probe) instead of IPv4.
        #[arg(long)]
        ipv6: bool,
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        #[arg(long, default_value_t = 15006)]
        inbound_port: u16,
        /// Istio's iptables probe port.
        #[arg(long, default_value_t = 15002)]
        probe_port: u16,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// One DNS query for an A record; prints the answer and where the reply came from.
    DnsQuery {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        name: String,
        #[arg(long, value_enum, default_value = "connected")]
        transport: dns::Transport,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Over UDP: read the reply this long after sending the query.
        #[arg(long, default_value_t = 0)]
        read_delay_ms: u64,
    },
    /// Many DNS queries, each from a fresh UDP socket; prints how many were sent and refused.
    DnsFlood {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        count: usize,
        /// Keep every socket open until all are sent.
        #[arg(long)]
        hold: bool,
    },
    /// Runs a command with an /etc/resolv.conf of its own (a private mount namespace).
    WithResolvConf {
        #[arg(long = "nameserver", required = true)]
        nameservers: Vec<String>,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Writes one TCP SYN through a raw socket; prints `{"error": ...}`.
    RawSyn {
        #[arg(long)]
        source: std::net::SocketAddrV4,
        #[arg(long)]
        target: std::net::SocketAddrV4,
        #[arg(long, value_enum)]
        via: raw::Via,
    },
    /// Waits for a TCP SYN to `port` from `from_port`; prints `{"seen": bool}`.
    RawSniff {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        from_port: u16,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// A client: `count` connections spread over the targets, `concurrency` at a time.
    Client {
        #[arg(long = "target", required = true)]
        targets: Vec<SocketAddr>,
        /// Bind each connection's socket to this address first.
        #[arg(long)]
        bind: Option<std::net::IpAddr>,
        /// Open MPTCP sockets (IPPROTO_MPTCP) instead of TCP ones.
        #[arg(long)]
        mptcp: bool,
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
            inbound_loopback,
            upstream_mptcp,
            upstream_ktls_tx,
        } => rt()?.block_on(proxy::run(
            outbound_port,
            inbound_port,
            proxy::Upstream {
                answer_delay: Duration::from_millis(answer_delay_ms),
                mptcp: upstream_mptcp,
                ktls_tx: upstream_ktls_tx,
            },
            inbound_loopback,
        )),
        Cmd::Server { ports } => rt()?.block_on(server::run(ports)),
        Cmd::Validate {
            ipv6,
            outbound_port,
            inbound_port,
            probe_port,
            timeout_ms,
        } => rt()?.block_on(validate::run(
            ipv6,
            (outbound_port, inbound_port),
            probe_port,
            Duration::from_millis(timeout_ms),
        )),
        Cmd::Client {
            targets,
            bind,
            mptcp,
            count,
            concurrency,
            hold,
            hold_ms,
            timeout_ms,
        } => rt()?.block_on(client::run(
            targets,
            client::Opts { bind, mptcp },
            count,
            concurrency,
            hold,
            hold_ms,
            timeout_ms,
        )),
        Cmd::DnsQuery {
            server,
            name,
            transport,
            timeout_ms,
            read_delay_ms,
        } => dns::run(
            server,
            &name,
            transport,
            Duration::from_millis(timeout_ms),
            Duration::from_millis(read_delay_ms),
        ),
        Cmd::DnsFlood {
            server,
            count,
            hold,
        } => dns::flood(server, count, hold),
        Cmd::WithResolvConf { nameservers, cmd } => dns::with_resolv_conf(&nameservers, &cmd),
        Cmd::RawSyn {
            source,
            target,
            via,
        } => raw::syn_run(source, target, via),
        Cmd::RawSniff {
            port,
            from_port,
            timeout_ms,
        } => raw::sniff_run(port, from_port, Duration::from_millis(timeout_ms)),
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
            idle_timeout_ms,
        } => {
            let slow = slow_read_us.map(Duration::from_micros);
            let idle = idle_timeout_ms.map(Duration::from_millis);
            redirect_lab::echo::client(target, size, streams, mode, slow, idle)
        }
    }
}
