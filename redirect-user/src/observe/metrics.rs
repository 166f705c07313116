//! `--metrics-addr`: Prometheus text on `/metrics`, `/healthz` (the daemon's loop is turning
//! and its pod source is alive) and `/readyz` (the first full reconcile is done), served with
//! hyper. The daemon's loop publishes a
//! snapshot after every pass; this server only formats it (with the `prometheus` crate's text
//! encoder). Nothing sensitive is exposed: pod names, counters and map fill, no addresses or
//! file paths.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder as _, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use redirect_common::PodCounters;
use tokio::{
    net::TcpListener,
    sync::{watch, Semaphore},
};

/// What the metrics show, published by the daemon's loop.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub ready: bool,
    /// `(namespace, name, counters)`.
    pub pods: Vec<(String, String, PodCounters)>,
    /// `(namespace, name, rejected)`: whether each applied pod's current configuration was
    /// rejected (its last good one, or a lock, is in force).
    pub config_rejected: Vec<(String, String, bool)>,
    pub rejected_pods: usize,
    pub reconcile_errors: u64,
    /// Times the Kubernetes pod watch broke and was restarted.
    pub watch_restarts: u64,
    /// `(map, entries, capacity)`.
    pub maps: Vec<(&'static str, usize, u32)>,
    /// When the daemon's loop last went round (it does at least once per resync period).
    pub heartbeat: Option<std::time::Instant>,
    /// How old the heartbeat may be before the loop counts as stuck.
    pub stall_after: Duration,
    /// Why the pod source stopped, if it did.
    pub source_stopped: Option<String>,
}

/// `/healthz`: fails when the loop has not gone round for `stall_after` (a pass stuck in
/// the kernel or on a lock) or the pod source stopped for good; the kubelet then restarts
/// the daemon, which keeps capture up across the restart.
fn health(s: &Snapshot) -> Result<(), String> {
    if let Some(e) = &s.source_stopped {
        return Err(format!("the pod source stopped: {e}"));
    }
    match s.heartbeat {
        Some(t) if t.elapsed() > s.stall_after => Err(format!(
            "the reconcile loop has not gone round for {} s",
            t.elapsed().as_secs()
        )),
        _ => Ok(()),
    }
}

/// A per-pod metric family: its name, help, and the extra labels that tell its series apart.
struct Family {
    metric: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
}

const CONNECTIONS: Family = Family {
    metric: "redirect_connections_total",
    help: "Connections decided per pod, direction and result.",
    labels: &["direction", "result"],
};
const ANSWERED: Family = Family {
    metric: "redirect_original_dst_answered_total",
    help: "SO_ORIGINAL_DST answers given to the proxy.",
    labels: &[],
};
const ACCEL_MSGS: Family = Family {
    metric: "redirect_accelerated_messages_total",
    help: "Messages moved socket to socket (sockmap).",
    labels: &[],
};
const ACCEL_BYTES: Family = Family {
    metric: "redirect_accelerated_bytes_total",
    help: "Bytes moved socket to socket (sockmap).",
    labels: &[],
};
const EVICTED: Family = Family {
    metric: "redirect_original_dst_evicted_total",
    help: "Open captured connections whose original destination the full LRU map evicted (raise --orig-dst-map-size).",
    labels: &[],
};
const MISSED: Family = Family {
    metric: "redirect_original_dst_missed_total",
    help: "SO_ORIGINAL_DST asked on the proxy's outbound port with no destination held.",
    labels: &[],
};

const RAW_DENIED: Family = Family {
    metric: "redirect_raw_sockets_denied_total",
    help: "Raw sockets that could write TCP around capture, refused in a mesh pod (socket() or IP_HDRINCL).",
    labels: &[],
};

/// Where each per-pod counter (by its name in [`PodCounters::NAMES`]) is exported: the
/// family and the values of the family's extra labels. The one table of the metric names.
const PER_POD: [(&str, &Family, &[&str]); PodCounters::COUNT] = [
    ("outbound_captured", &CONNECTIONS, &["outbound", "captured"]),
    ("outbound_direct", &CONNECTIONS, &["outbound", "direct"]),
    (
        "outbound_fail_open",
        &CONNECTIONS,
        &["outbound", "fail_open"],
    ),
    (
        "outbound_fail_closed",
        &CONNECTIONS,
        &["outbound", "fail_closed"],
    ),
    ("orig_dst_answered", &ANSWERED, &[]),
    ("inbound_captured", &CONNECTIONS, &["inbound", "captured"]),
    ("inbound_direct", &CONNECTIONS, &["inbound", "direct"]),
    ("inbound_fail_open", &CONNECTIONS, &["inbound", "fail_open"]),
    (
        "inbound_fail_closed",
        &CONNECTIONS,
        &["inbound", "fail_closed"],
    ),
    ("accel_msgs", &ACCEL_MSGS, &[]),
    ("accel_bytes", &ACCEL_BYTES, &[]),
    ("orig_dst_evicted", &EVICTED, &[]),
    ("orig_dst_missed", &MISSED, &[]),
    ("raw_denied", &RAW_DENIED, &[]),
];

fn counter_vec(registry: &Registry, f: &Family) -> Result<IntCounterVec> {
    // Not `namespace` and `pod`: Prometheus puts its own target labels of those names on
    // every series scraped from a pod (redirectd's), and would rename ours.
    let mut labels = vec!["pod_namespace", "pod_name"];
    labels.extend(f.labels);
    let v = IntCounterVec::new(Opts::new(f.metric, f.help), &labels)
        .with_context(|| format!("defining {}", f.metric))?;
    registry
        .register(Box::new(v.clone()))
        .with_context(|| format!("registering {}", f.metric))?;
    Ok(v)
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec> {
    let v = IntGaugeVec::new(Opts::new(name, help), labels)
        .with_context(|| format!("defining {name}"))?;
    registry
        .register(Box::new(v.clone()))
        .with_context(|| format!("registering {name}"))?;
    Ok(v)
}

fn gauge(registry: &Registry, name: &str, help: &str, value: u64) -> Result<()> {
    let g = IntGauge::new(name, help).with_context(|| format!("defining {name}"))?;
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    registry
        .register(Box::new(g))
        .with_context(|| format!("registering {name}"))
}

/// The per-pod counters of a snapshot, in `r`.
fn per_pod_counters(r: &Registry, s: &Snapshot) -> Result<()> {
    let mut families: Vec<(&'static str, IntCounterVec)> = Vec::new();
    for (_, f, _) in &PER_POD {
        if !families.iter().any(|(m, _)| *m == f.metric) {
            families.push((f.metric, counter_vec(r, f)?));
        }
    }
    for (ns, name, c) in &s.pods {
        for (counter, value) in PodCounters::NAMES.iter().zip(c.values()) {
            let Some((_, f, extra)) = PER_POD.iter().find(|(n, _, _)| n == counter) else {
                continue;
            };
            let Some((_, vec)) = families.iter().find(|(m, _)| *m == f.metric) else {
                continue;
            };
            let mut labels = vec![ns.as_str(), name.as_str()];
            labels.extend(extra.iter());
            vec.get_metric_with_label_values(&labels)
                .with_context(|| format!("{} of pod {ns}/{name}", f.metric))?
                .inc_by(value);
        }
    }
    Ok(())
}

/// A registry holding a snapshot's values.
fn registry(s: &Snapshot) -> Result<Registry> {
    let r = Registry::new();
    per_pod_counters(&r, s)?;
    let entries = gauge_vec(
        &r,
        "redirect_map_entries",
        "Entries in a kernel map.",
        &["map"],
    )?;
    let capacity = gauge_vec(
        &r,
        "redirect_map_capacity",
        "Capacity of a kernel map.",
        &["map"],
    )?;
    for (map, n, cap) in &s.maps {
        entries
            .with_label_values(&[*map])
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
        capacity.with_label_values(&[*map]).set(i64::from(*cap));
    }
    let rejected = gauge_vec(
        &r,
        "redirect_pod_config_rejected",
        "1 while a pod's current configuration is rejected: its last good configuration (or, never served, a lock refusing its connections) is in force.",
        &["pod_namespace", "pod_name"],
    )?;
    for (ns, name, is) in &s.config_rejected {
        rejected
            .with_label_values(&[ns.as_str(), name.as_str()])
            .set(i64::from(*is));
    }
    let pods = gauge_vec(&r, "redirect_pods", "Pods by state.", &["state"])?;
    pods.with_label_values(&["applied"])
        .set(i64::try_from(s.pods.len()).unwrap_or(i64::MAX));
    pods.with_label_values(&["rejected"])
        .set(i64::try_from(s.rejected_pods).unwrap_or(i64::MAX));
    let reconcile_errors = IntCounterVec::new(
        Opts::new(
            "redirect_reconcile_errors_total",
            "Pods that could not be applied, summed over passes.",
        ),
        &[],
    )?;
    reconcile_errors
        .with_label_values(&[] as &[&str])
        .inc_by(s.reconcile_errors);
    r.register(Box::new(reconcile_errors))?;
    let watch_restarts = IntCounterVec::new(
        Opts::new(
            "redirect_watch_restarts_total",
            "Times the Kubernetes pod watch broke and was restarted.",
        ),
        &[],
    )?;
    watch_restarts
        .with_label_values(&[] as &[&str])
        .inc_by(s.watch_restarts);
    r.register(Box::new(watch_restarts))?;
    gauge(
        &r,
        "redirect_ready",
        "1 once the first full reconcile is done.",
        u64::from(s.ready),
    )?;
    let build = gauge_vec(
        &r,
        "redirect_build_info",
        "1, labelled with the running redirectd's version.",
        &["version"],
    )?;
    build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    Ok(r)
}

/// Prometheus text exposition of a snapshot.
pub fn render(s: &Snapshot) -> Result<String> {
    let families = registry(s)?.gather();
    let mut out = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&families, &mut out)
        .context("encoding metrics")?;
    String::from_utf8(out).context("metrics text is not UTF-8")
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(prometheus::TEXT_FORMAT),
    );
    resp
}

/// The answer to one request, from the latest snapshot.
fn answer(path: &str, snapshot: &Snapshot) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => match render(snapshot) {
            Ok(body) => text(StatusCode::OK, body),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")),
        },
        "/healthz" => match health(snapshot) {
            Ok(()) => text(StatusCode::OK, "ok\n".into()),
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        },
        "/readyz" if snapshot.ready => text(StatusCode::OK, "ready\n".into()),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not synced yet\n".into()),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the endpoints on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, rx: watch::Receiver<Arc<Snapshot>>) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    log::info!("metrics on http://{addr}/metrics, /healthz, /readyz");
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut errors = AcceptErrors::default();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => {
                errors.ok();
                s
            }
            Err(e) => {
                tokio::time::sleep(errors.failed(&e)).await;
                continue;
            }
        };
        // Over the limit: closed at once, so no client can hold the daemon's descriptors.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let rx = rx.clone();
        let service = service_fn(move |req: Request<hyper::body::Incoming>| {
            let snapshot = rx.borrow().clone();
            async move { Ok::<_, Infallible>(answer(req.uri().path(), &snapshot)) }
        });
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Err(e)) => log::debug!("metrics endpoint: {e}"),
                Err(_) => log::debug!(
                    "metrics endpoint: a connection outlived {CONNECTION_TIMEOUT:?}; closed"
                ),
                Ok(Ok(())) => {}
            }
            drop(permit);
        });
    }
}

/// Connections served at once; more are closed as soon as they are accepted. Scrapers and
/// probes need a few.
pub const MAX_CONNECTIONS: usize = 64;

/// The longest one connection may last, whatever it sends.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Consecutive `accept` errors (out of descriptors, say): each waits longer before the next
/// try, up to a second, and the log says so once every ten seconds, not once per error.
#[derive(Default)]
struct AcceptErrors {
    consecutive: u32,
    suppressed: u64,
    last_logged: Option<std::time::Instant>,
}

impl AcceptErrors {
    fn ok(&mut self) {
        self.consecutive = 0;
    }

    /// Records an error; returns how long to wait before accepting again.
    fn failed(&mut self, e: &std::io::Error) -> Duration {
        self.consecutive = self.consecutive.saturating_add(1);
        let quiet = self
            .last_logged
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
        if quiet {
            self.suppressed += 1;
        } else {
            log::warn!(
                "metrics endpoint: accept: {e} ({} more errors since the last report); backing off",
                self.suppressed
            );
            self.suppressed = 0;
            self.last_logged = Some(std::time::Instant::now());
        }
        Duration::from_millis(10u64 << self.consecutive.min(7)).min(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_back_off_and_log_rarely() {
        let mut a = AcceptErrors::default();
        let e = std::io::Error::from_raw_os_error(24);
        let waits: Vec<Duration> = (0..10).map(|_| a.failed(&e)).collect();
        assert_eq!(waits[0], Duration::from_millis(20));
        assert_eq!(waits[9], Duration::from_secs(1));
        assert_eq!(a.suppressed, 9, "one report for ten errors");
        a.ok();
        assert_eq!(a.failed(&e), Duration::from_millis(20));
    }

    #[test]
    fn every_counter_is_exported_once() {
        for name in PodCounters::NAMES {
            assert_eq!(
                PER_POD.iter().filter(|(n, _, _)| *n == name).count(),
                1,
                "{name}"
            );
        }
        for (_, f, extra) in &PER_POD {
            assert_eq!(f.labels.len(), extra.len(), "{}", f.metric);
        }
    }

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
            config_rejected: vec![("ns".into(), "we\"ird".into(), true)],
            rejected_pods: 1,
            reconcile_errors: 2,
            watch_restarts: 0,
            maps: vec![("SOCK_PAIRS", 4, 65536)],
            ..Snapshot::default()
        };
        let text = render(&s).unwrap();
        assert!(text.contains(r#"redirect_connections_total{direction="outbound",pod_name="we\"ird",pod_namespace="ns",result="captured"} 3"#), "{text}");
        assert!(
            text.contains(
                r#"redirect_accelerated_bytes_total{pod_name="we\"ird",pod_namespace="ns"} 7"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"redirect_map_entries{map="SOCK_PAIRS"} 4"#));
        assert!(text.contains(&format!(
            "redirect_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains("redirect_reconcile_errors_total 2"), "{text}");
        assert!(
            text.contains(
                r#"redirect_pod_config_rejected{pod_name="we\"ird",pod_namespace="ns"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("redirect_ready 1"));
        assert!(text.contains("# HELP redirect_connections_total Connections decided"));
    }

    #[test]
    fn endpoints() {
        let ready = Snapshot {
            ready: true,
            ..Default::default()
        };
        assert_eq!(answer("/healthz", &ready).status(), StatusCode::OK);
        let stuck = Snapshot {
            heartbeat: Some(std::time::Instant::now() - Duration::from_secs(120)),
            stall_after: Duration::from_secs(60),
            ..Snapshot::default()
        };
        assert_eq!(
            answer("/healthz", &stuck).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let turning = Snapshot {
            heartbeat: Some(std::time::Instant::now()),
            ..stuck
        };
        assert_eq!(answer("/healthz", &turning).status(), StatusCode::OK);
        let dead = Snapshot {
            source_stopped: Some("watch forbidden".into()),
            ..turning
        };
        let r = answer("/healthz", &dead);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer("/readyz", &ready).status(), StatusCode::OK);
        assert_eq!(
            answer("/readyz", &Snapshot::default()).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(answer("/nope", &ready).status(), StatusCode::NOT_FOUND);
    }
}
