//! `--metrics-addr`: Prometheus text on `/metrics`, `/healthz` (the daemon runs) and `/readyz`
//! (the first full reconcile is done). The daemon's loop publishes a snapshot after every
//! pass; this server only formats it. Nothing sensitive is exposed: pod names, counters and
//! map fill, no addresses or file paths.

use std::{fmt::Write as _, net::SocketAddr, sync::Arc};

use anyhow::{Context as _, Result};
use redirect_common::PodCounters;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::watch,
};

/// What the metrics show, published by the daemon's loop.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub ready: bool,
    /// `(namespace, name, counters)`.
    pub pods: Vec<(String, String, PodCounters)>,
    pub rejected_pods: usize,
    pub reconcile_errors: u64,
    /// Times the Kubernetes pod watch broke and was restarted.
    pub watch_restarts: u64,
    /// `(map, entries, capacity)`.
    pub maps: Vec<(&'static str, usize, u32)>,
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition of a snapshot.
pub fn render(s: &Snapshot) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP redirect_connections_total Connections decided per pod, direction and result."
    );
    let _ = writeln!(o, "# TYPE redirect_connections_total counter");
    for (ns, name, c) in &s.pods {
        let rows = [
            ("outbound", "captured", c.outbound_captured),
            ("outbound", "direct", c.outbound_direct),
            ("outbound", "fail_open", c.outbound_fail_open),
            ("outbound", "fail_closed", c.outbound_fail_closed),
            ("inbound", "captured", c.inbound_captured),
            ("inbound", "direct", c.inbound_direct),
            ("inbound", "fail_open", c.inbound_fail_open),
            ("inbound", "fail_closed", c.inbound_fail_closed),
        ];
        for (dir, result, v) in rows {
            let _ = writeln!(
                o,
                "redirect_connections_total{{namespace=\"{}\",pod=\"{}\",direction=\"{dir}\",result=\"{result}\"}} {v}",
                label(ns),
                label(name)
            );
        }
    }
    let per_pod = [
        (
            "redirect_original_dst_answered_total",
            "SO_ORIGINAL_DST answers given to the proxy.",
            0,
        ),
        (
            "redirect_accelerated_messages_total",
            "Messages moved socket to socket (sockmap).",
            1,
        ),
        (
            "redirect_accelerated_bytes_total",
            "Bytes moved socket to socket (sockmap).",
            2,
        ),
        (
            "redirect_original_dst_evicted_total",
            "Open captured connections whose original destination the full LRU map evicted (raise --orig-dst-map-size).",
            3,
        ),
        (
            "redirect_original_dst_missed_total",
            "SO_ORIGINAL_DST asked on the proxy's outbound port with no destination held.",
            4,
        ),
    ];
    for (metric, help, which) in per_pod {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} counter");
        for (ns, name, c) in &s.pods {
            let v = [
                c.orig_dst_answered,
                c.accel_msgs,
                c.accel_bytes,
                c.orig_dst_evicted,
                c.orig_dst_missed,
            ][which];
            let _ = writeln!(
                o,
                "{metric}{{namespace=\"{}\",pod=\"{}\"}} {v}",
                label(ns),
                label(name)
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP redirect_map_entries Entries in a kernel map.\n# TYPE redirect_map_entries gauge"
    );
    let _ = writeln!(o, "# HELP redirect_map_capacity Capacity of a kernel map.\n# TYPE redirect_map_capacity gauge");
    for (map, n, cap) in &s.maps {
        let _ = writeln!(o, "redirect_map_entries{{map=\"{map}\"}} {n}");
        let _ = writeln!(o, "redirect_map_capacity{{map=\"{map}\"}} {cap}");
    }
    let _ = writeln!(
        o,
        "# HELP redirect_pods Pods by state.\n# TYPE redirect_pods gauge"
    );
    let _ = writeln!(o, "redirect_pods{{state=\"applied\"}} {}", s.pods.len());
    let _ = writeln!(o, "redirect_pods{{state=\"rejected\"}} {}", s.rejected_pods);
    let _ = writeln!(o, "# HELP redirect_reconcile_errors_total Pods that could not be applied, summed over passes.\n# TYPE redirect_reconcile_errors_total counter");
    let _ = writeln!(o, "redirect_reconcile_errors_total {}", s.reconcile_errors);
    let _ = writeln!(o, "# HELP redirect_watch_restarts_total Times the Kubernetes pod watch broke and was restarted.\n# TYPE redirect_watch_restarts_total counter");
    let _ = writeln!(o, "redirect_watch_restarts_total {}", s.watch_restarts);
    let _ = writeln!(o, "# HELP redirect_ready 1 once the first full reconcile is done.\n# TYPE redirect_ready gauge");
    let _ = writeln!(o, "redirect_ready {}", u8::from(s.ready));
    o
}

async fn answer(mut stream: tokio::net::TcpStream, snapshot: Snapshot) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await?;
    let req = String::from_utf8_lossy(&buf[..n]);
    let path = req.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/metrics" => ("200 OK", render(&snapshot)),
        "/healthz" => ("200 OK", "ok\n".to_string()),
        "/readyz" if snapshot.ready => ("200 OK", "ready\n".to_string()),
        "/readyz" => ("503 Service Unavailable", "not synced yet\n".to_string()),
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

/// Serves the endpoints on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, rx: watch::Receiver<Arc<Snapshot>>) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    log::info!("metrics on http://{addr}/metrics, /healthz, /readyz");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("metrics endpoint: accept: {e}");
                continue;
            }
        };
        let snapshot = (**rx.borrow()).clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, snapshot).await {
                log::debug!("metrics endpoint: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_escapes_labels() {
        let c = PodCounters {
            outbound_captured: 3,
            accel_bytes: 7,
            ..Default::default()
        };
        let s = Snapshot {
            ready: true,
            pods: vec![("ns".into(), "we\"ird".into(), c)],
            rejected_pods: 1,
            reconcile_errors: 2,
            watch_restarts: 0,
            maps: vec![("SOCK_PAIRS", 4, 65536)],
        };
        let text = render(&s);
        assert!(text.contains(r#"redirect_connections_total{namespace="ns",pod="we\"ird",direction="outbound",result="captured"} 3"#), "{text}");
        assert!(
            text.contains(r#"redirect_accelerated_bytes_total{namespace="ns",pod="we\"ird"} 7"#)
        );
        assert!(text.contains(r#"redirect_map_entries{map="SOCK_PAIRS"} 4"#));
        assert!(text.contains("redirect_ready 1"));
    }
}
