//! Benchmark workloads for `cargo xtask bench`: a request/response and sink server, and a
//! client that measures latency, connection rate and throughput. Blocking sockets and plain
//! threads: the cost measured is the path's, not an async runtime's.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// Request and response size of the request/response workloads.
pub const MSG: usize = 1024;

/// `perf-server`: on `rr_port`, answers every 1 KiB request with 1 KiB; on `sink_port`,
/// reads and discards until EOF.
pub fn server(rr_port: u16, sink_port: u16) -> Result<()> {
    let rr = TcpListener::bind(SocketAddr::from(([0u8; 4], rr_port))).context("binding rr port")?;
    let sink =
        TcpListener::bind(SocketAddr::from(([0u8; 4], sink_port))).context("binding sink port")?;
    std::thread::spawn(move || {
        for s in sink.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    for s in rr.incoming().flatten() {
        std::thread::spawn(move || {
            let mut s = s;
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; MSG];
            while s.read_exact(&mut buf).is_ok() {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// A workload.
#[derive(Clone, Copy, Debug, clap::ValueEnum, Serialize, Deserialize, PartialEq, Eq)]
pub enum Workload {
    /// Request/response on one connection.
    Rr,
    /// A new connection per request.
    Crr,
    /// Bulk throughput to the sink.
    Stream,
    /// Request/response on `conns` connections at once.
    Concurrent,
}

/// What one workload run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Measured {
    pub requests: u64,
    pub seconds: f64,
    pub requests_per_s: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub mb_per_s: f64,
    pub errors: u64,
}

fn rr_loop(target: SocketAddr, until: Instant, lat: &mut Vec<u32>) -> Result<()> {
    let mut s = TcpStream::connect(target).context("connect")?;
    s.set_nodelay(true)?;
    let req = [7u8; MSG];
    let mut resp = [0u8; MSG];
    while Instant::now() < until {
        let t = Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut resp)?;
        lat.push(t.elapsed().as_nanos() as u32);
    }
    Ok(())
}

fn crr_loop(target: SocketAddr, until: Instant, lat: &mut Vec<u32>) -> Result<()> {
    let req = [7u8; MSG];
    let mut resp = [0u8; MSG];
    while Instant::now() < until {
        let t = Instant::now();
        let mut s = TcpStream::connect(target).context("connect")?;
        s.set_nodelay(true)?;
        s.write_all(&req)?;
        s.read_exact(&mut resp)?;
        drop(s);
        lat.push(t.elapsed().as_nanos() as u32);
    }
    Ok(())
}

fn summarize(mut lat: Vec<u32>, seconds: f64, errors: u64) -> Measured {
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        f64::from(lat[i]) / 1000.0
    };
    let n = lat.len() as u64;
    Measured {
        requests: n,
        seconds,
        requests_per_s: n as f64 / seconds,
        p50_us: pct(0.50),
        p90_us: pct(0.90),
        p99_us: pct(0.99),
        mean_us: if n == 0 {
            0.0
        } else {
            lat.iter().map(|v| f64::from(*v)).sum::<f64>() / n as f64 / 1000.0
        },
        mb_per_s: 0.0,
        errors,
    }
}

/// `perf-client`: runs one workload for `duration` and prints one JSON line.
pub fn client(
    target: SocketAddr,
    workload: Workload,
    duration: Duration,
    conns: usize,
) -> Result<()> {
    let start = Instant::now();
    let until = start + duration;
    let m = match workload {
        Workload::Rr | Workload::Crr => {
            let mut lat = Vec::with_capacity(1 << 20);
            let r = if workload == Workload::Rr {
                rr_loop(target, until, &mut lat)
            } else {
                crr_loop(target, until, &mut lat)
            };
            summarize(lat, start.elapsed().as_secs_f64(), u64::from(r.is_err()))
        }
        Workload::Concurrent => {
            let handles: Vec<_> = (0..conns)
                .map(|_| {
                    std::thread::spawn(move || {
                        let mut lat = Vec::with_capacity(1 << 18);
                        let r = rr_loop(target, until, &mut lat);
                        (lat, r.is_err())
                    })
                })
                .collect();
            let mut all = Vec::new();
            let mut errors = 0;
            for h in handles {
                let (lat, err) = h.join().map_err(|_| anyhow::anyhow!("worker panicked"))?;
                all.extend(lat);
                errors += u64::from(err);
            }
            summarize(all, start.elapsed().as_secs_f64(), errors)
        }
        Workload::Stream => {
            let mut s = TcpStream::connect(target).context("connect")?;
            let buf = vec![7u8; 64 * 1024];
            let mut bytes = 0u64;
            let mut errors = 0;
            while Instant::now() < until {
                if s.write_all(&buf).is_err() {
                    errors += 1;
                    break;
                }
                bytes += buf.len() as u64;
            }
            let _ = s.shutdown(Shutdown::Write);
            let secs = start.elapsed().as_secs_f64();
            Measured {
                seconds: secs,
                mb_per_s: bytes as f64 / secs / 1e6,
                errors,
                ..Default::default()
            }
        }
    };
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}
