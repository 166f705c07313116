//! Differential conformance against Istio's own rules: every row of the capture rules, in
//! both families, is run twice with Envoy as the sidecar, once under Istio's `istio-iptables`
//! REDIRECT rule set (the reference, run in the pods' namespaces) and once under redirectd,
//! and what every party saw is compared: the outcome, where the connection was captured
//! (which Envoy listener), `SO_ORIGINAL_DST` (Envoy's restored downstream local address), the
//! application's `getsockname()` and `getpeername()`, Envoy's downstream peer and upstream
//! source, and the server's view. Ephemeral ports are left out. The only difference allowed
//! is the documented one (inbound: the accepted socket's own local address is the original
//! destination, TPROXY-style, where REDIRECT shows the pod's address and port 15006).
//!
//! The table of every row is written to `target/conformance.md` (its committed copy is
//! `docs/conformance.md`).

use std::fmt::Write as _;

use redirect_lab::{
    istio_iptables::{self, Options},
    wire::{ClientResult, EnvoyRecord},
    Lab, PROXY_UID,
};
use redirect_tests::{host_of, lab, pods_yaml};

/// A connection to make: who, as whom, to where.
struct Row {
    id: &'static str,
    what: &'static str,
    from: &'static str,
    as_proxy: bool,
    /// The caller's uid and gid when not root or the proxy (owner-group rows).
    uid: Option<u32>,
    /// `pod:port`, a pod's address in the family being tested; `lo:port` for 127.0.0.1 (`::1`);
    /// `lo2:port` for 127.1.2.3 (IPv6: `::1`, the only loopback address there); `any:port`
    /// for 0.0.0.0 (`::`). A `@lo6` suffix binds the socket to 127.0.0.6 (IPv6: `::1`) first;
    /// `@mptcp` makes it an MPTCP socket.
    to: &'static str,
}

/// A capture configuration (the same options on both mesh pods) and the rows run under it.
struct Case {
    options: fn(&Lab) -> Options,
    rows: Vec<Row>,
}

fn row(
    id: &'static str,
    what: &'static str,
    from: &'static str,
    as_proxy: bool,
    to: &'static str,
) -> Row {
    Row {
        id,
        what,
        from,
        as_proxy,
        uid: None,
        to,
    }
}

/// A row whose application runs as uid and gid `uid`.
fn row_as(id: &'static str, what: &'static str, uid: u32, to: &'static str) -> Row {
    Row {
        uid: Some(uid),
        ..row(id, what, "client", false, to)
    }
}

/// A loopback address other than 127.0.0.1, for Istio's HasLoopBackIP case.
const LO2: &str = "127.1.2.3";

/// `ext`'s addresses as CIDRs of both families.
fn ext_cidrs(lab: &Lab) -> Vec<String> {
    let ext = lab.pod("ext");
    vec![format!("{}/32", ext.v4), format!("{}/128", ext.v6)]
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            options: |_| Options::default(),
            rows: vec![
                row(
                    "out-3",
                    "proxy calls its own pod",
                    "client",
                    true,
                    "client:8080",
                ),
                row(
                    "out-4",
                    "app calls its own pod",
                    "client",
                    false,
                    "client:8080",
                ),
                row(
                    "out-5",
                    "proxy calls another pod",
                    "client",
                    true,
                    "ext:8080",
                ),
                row("out-7", "app calls loopback", "client", false, "lo:8080"),
                row(
                    "out-any",
                    "app calls 0.0.0.0 (::), which the kernel takes to loopback",
                    "client",
                    false,
                    "any:8080",
                ),
                row(
                    "out-anyp",
                    "proxy calls 0.0.0.0 (::)",
                    "client",
                    true,
                    "any:8080",
                ),
                row(
                    "out-lob",
                    "app bound to 127.0.0.6 (::1) calls another pod",
                    "client",
                    false,
                    "ext:8080@lo6",
                ),
                row(
                    "out-mp",
                    "app calls another pod over MPTCP",
                    "client",
                    false,
                    "ext:8080@mptcp",
                ),
                row(
                    "out-9",
                    "app calls another pod (ranges *)",
                    "client",
                    false,
                    "ext:8080",
                ),
                row("mesh", "mesh pod to mesh pod", "client", false, "srv:8080"),
                row("in-1", "to 15008 (HBONE)", "plain", false, "srv:15008"),
                row(
                    "in-2",
                    "to 15021 (health, the proxy's port)",
                    "plain",
                    false,
                    "srv:15021",
                ),
                row(
                    "in-3",
                    "to an app port (ports *)",
                    "plain",
                    false,
                    "srv:8080",
                ),
                row(
                    "in-2p",
                    "passthrough from 127.0.0.6 (rule 2) seen by the app",
                    "plain",
                    false,
                    "srv:8081",
                ),
            ],
        },
        Case {
            options: |_| Options {
                exclude_outbound_ports: vec![8081],
                exclude_inbound_ports: vec![8081],
                ..Default::default()
            },
            rows: vec![
                row(
                    "out-1",
                    "excludeOutboundPorts 8081",
                    "client",
                    false,
                    "ext:8081",
                ),
                row(
                    "out-1b",
                    "excludeOutboundPorts, other port",
                    "client",
                    false,
                    "ext:8080",
                ),
                row(
                    "in-2x",
                    "excludeInboundPorts 8081",
                    "plain",
                    false,
                    "srv:8081",
                ),
            ],
        },
        Case {
            options: |lab| Options {
                exclude_outbound_ranges: ext_cidrs(lab),
                ..Default::default()
            },
            rows: vec![
                row(
                    "out-8",
                    "excludeOutboundIPRanges ext",
                    "client",
                    false,
                    "ext:8080",
                ),
                row(
                    "out-8b",
                    "excludeOutboundIPRanges, other pod",
                    "client",
                    false,
                    "plain:8080",
                ),
            ],
        },
        Case {
            options: |lab| Options {
                include_outbound_ranges: Some(ext_cidrs(lab)),
                ..Default::default()
            },
            rows: vec![
                row(
                    "out-9r",
                    "includeOutboundIPRanges ext",
                    "client",
                    false,
                    "ext:8080",
                ),
                row(
                    "out-10",
                    "includeOutboundIPRanges, other pod",
                    "client",
                    false,
                    "plain:8080",
                ),
            ],
        },
        Case {
            options: |_| Options {
                include_outbound_ranges: Some(vec![]),
                include_outbound_ports: vec![8081],
                ..Default::default()
            },
            rows: vec![
                row(
                    "out-9p",
                    "includeOutboundPorts 8081, ranges \"\"",
                    "client",
                    false,
                    "ext:8081",
                ),
                row(
                    "out-10p",
                    "ranges \"\", other port",
                    "client",
                    false,
                    "ext:8080",
                ),
            ],
        },
        Case {
            options: |_| Options {
                include_inbound_ports: Some(vec![8080]),
                ..Default::default()
            },
            rows: vec![
                row(
                    "in-3l",
                    "includeInboundPorts 8080",
                    "plain",
                    false,
                    "srv:8080",
                ),
                row(
                    "in-4",
                    "includeInboundPorts 8080, port 8081",
                    "plain",
                    false,
                    "srv:8081",
                ),
            ],
        },
        Case {
            options: |lab| {
                let client = lab.pod("client");
                Options {
                    include_outbound_ranges: Some(vec![
                        format!("{LO2}/32"),
                        format!("{}/32", client.v4),
                        format!("{}/128", client.v6),
                        "::1/128".into(),
                    ]),
                    ..Default::default()
                }
            },
            rows: vec![
                row(
                    "out-lo9",
                    "includeOutboundIPRanges names 127.1.2.3 (a loopback range): app calls it",
                    "client",
                    false,
                    "lo2:8080",
                ),
                row(
                    "out-lo4",
                    "loopback range included: app calls its own pod, in the ranges",
                    "client",
                    false,
                    "client:8080",
                ),
                row(
                    "out-lo7",
                    "loopback range included: app calls 127.0.0.1",
                    "client",
                    false,
                    "lo:8080",
                ),
                row(
                    "out-lo10",
                    "loopback range included: app calls another pod, not in the ranges",
                    "client",
                    false,
                    "ext:8080",
                ),
            ],
        },
        Case {
            options: |_| Options {
                owner_groups: Some(vec![3000]),
                ..Default::default()
            },
            rows: vec![
                row_as(
                    "out-g",
                    "owner groups 3000: app in group 3000",
                    3000,
                    "ext:8080",
                ),
                row_as(
                    "out-g2",
                    "owner groups 3000: app in group 3001",
                    3001,
                    "ext:8080",
                ),
            ],
        },
        Case {
            options: |_| Options {
                owner_groups_exclude: vec![3001],
                ..Default::default()
            },
            rows: vec![
                row_as(
                    "out-gx",
                    "owner groups excluded 3001: app in group 3001",
                    3001,
                    "ext:8080",
                ),
                row_as(
                    "out-gx2",
                    "owner groups excluded 3001: app in group 3000",
                    3000,
                    "ext:8080",
                ),
            ],
        },
        Case {
            options: |_| Options {
                include_inbound_ports: Some(vec![8080]),
                exclude_inbound_ports: vec![8080],
                ..Default::default()
            },
            rows: vec![row(
                "in-3lx",
                "includeInboundPorts 8080 and excludeInboundPorts 8080: the list wins",
                "plain",
                false,
                "srv:8080",
            )],
        },
        Case {
            options: |_| Options {
                status_port: Some(15030),
                ..Default::default()
            },
            rows: vec![
                row(
                    "in-st",
                    "status.sidecar.istio.io/port 15030: to 15030",
                    "plain",
                    false,
                    "srv:15030",
                ),
                row(
                    "in-st20",
                    "status port moved: to 15020",
                    "plain",
                    false,
                    "srv:15020",
                ),
            ],
        },
        Case {
            options: |_| Options {
                include_inbound_ports: Some(vec![]),
                ..Default::default()
            },
            rows: vec![row(
                "in-4e",
                "includeInboundPorts \"\"",
                "plain",
                false,
                "srv:8080",
            )],
        },
    ]
}

/// What one Envoy logged for the connection, ephemeral ports left out.
fn envoy_view(r: &EnvoyRecord) -> String {
    format!(
        "{} orig-dst {} from {} to {}{}",
        r.listener,
        r.downstream_local,
        host_of(&r.downstream_remote),
        r.upstream_host.as_deref().unwrap_or("-"),
        r.upstream_local
            .as_deref()
            .map_or(String::new(), |l| format!(" via {}", host_of(l))),
    )
}

/// What every party saw of one connection. Envoy's accepted socket's own local address is
/// kept apart: on the inbound listener it is the one field allowed to differ (by design).
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    parties: String,
    /// `(pod, listener, address)`.
    direct_local: Vec<(String, String, String)>,
}

impl Seen {
    /// Equal but for the accepted socket's own local address on inbound listeners.
    fn same_but_inbound_local(&self, other: &Seen) -> bool {
        let not_inbound = |s: &Seen| -> Vec<(String, String, String)> {
            s.direct_local
                .iter()
                .filter(|(_, l, _)| l != "inbound")
                .cloned()
                .collect()
        };
        self.parties == other.parties && not_inbound(self) == not_inbound(other)
    }

    fn inbound_local(&self) -> String {
        self.direct_local
            .iter()
            .filter(|(_, l, _)| l == "inbound")
            .map(|(pod, _, a)| format!("{pod}'s envoy accepted at {a}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn outcome(r: &ClientResult) -> String {
    match &r.error {
        None => "ok".into(),
        Some(e) if e.contains("refused") => "refused".into(),
        Some(e) if e.contains("reset") => "reset".into(),
        Some(e) if e.contains("timed out") || e.contains("timeout") => "timeout".into(),
        // Envoy's HTTP listener answered the lab client's line with an HTTP error.
        Some(e) if e.contains("HTTP/1.1 400") => "answered by Envoy's HTTP listener".into(),
        Some(e) => e.clone(),
    }
}

fn seen(r: &ClientResult, envoys: &[(&str, Vec<EnvoyRecord>)]) -> Seen {
    let mut s = format!(
        "{}; app {} -> {}",
        outcome(r),
        r.local.as_deref().map_or("-", host_of),
        r.peername.as_deref().unwrap_or("-"),
    );
    if let Some(reply) = &r.reply {
        let _ = write!(
            s,
            "; server at {} from {}",
            reply.local,
            host_of(&reply.peer)
        );
    }
    // Envoy logs a connection when it closes: the order of two listeners' records is
    // not the order of capture, so they are compared sorted.
    let mut views = Vec::new();
    let mut direct_local = Vec::new();
    for (pod, records) in envoys {
        for rec in records {
            views.push(format!("; {pod}'s envoy {}", envoy_view(rec)));
            direct_local.push((
                pod.to_string(),
                rec.listener.clone(),
                rec.downstream_direct_local.clone(),
            ));
        }
    }
    views.sort();
    direct_local.sort();
    s.push_str(&views.concat());
    Seen {
        parties: s,
        direct_local,
    }
}

struct Mesh {
    lab: Lab,
    /// Envoy's process index per mesh pod.
    envoys: Vec<(&'static str, usize)>,
}

const MESH: [&str; 2] = ["client", "srv"];

fn build() -> Mesh {
    let mut lab = lab();
    for p in ["client", "srv", "plain", "ext"] {
        lab.add_pod(p).unwrap();
    }
    for (p, ports) in [
        ("client", &[8080][..]),
        // 15020 and 15030: the status port rows (captured or not, someone answers).
        ("srv", &[8080, 8081, 15020, 15030]),
        ("plain", &[8080]),
        ("ext", &[8080, 8081]),
    ] {
        lab.start_server(p, ports).unwrap();
    }
    let envoys = MESH
        .iter()
        .map(|p| (*p, lab.start_envoy(p).unwrap()))
        .collect();
    lab.start_daemon("pods: []\n", &[]).unwrap();
    Mesh { lab, envoys }
}

impl Mesh {
    /// `row.to` as an address of the family.
    fn target(&self, to: &str, v6: bool) -> String {
        let to = to.split_once('@').map_or(to, |(t, _)| t);
        let (who, port) = to.split_once(':').unwrap();
        if who == "any" {
            return if v6 {
                format!("[::]:{port}")
            } else {
                format!("0.0.0.0:{port}")
            };
        }
        if who == "lo" || who == "lo2" {
            return if v6 {
                format!("[::1]:{port}")
            } else if who == "lo" {
                format!("127.0.0.1:{port}")
            } else {
                format!("{LO2}:{port}")
            };
        }
        let p = self.lab.pod(who);
        if v6 {
            format!("[{}]:{port}", p.v6)
        } else {
            format!("{}:{port}", p.v4)
        }
    }

    /// Makes the row's connection and gathers what every party saw.
    fn run(&self, row: &Row, v6: bool) -> Seen {
        let before: Vec<usize> = self
            .envoys
            .iter()
            .map(|(_, e)| self.lab.envoy_log(*e).len())
            .collect();
        let target = self.target(row.to, v6);
        let uid = row.uid.or(row.as_proxy.then_some(PROXY_UID));
        let mut args = vec!["--target", target.as_str(), "--timeout-ms", "3000"];
        if row.to.ends_with("@lo6") {
            args.extend(["--bind", if v6 { "::1" } else { "127.0.0.6" }]);
        }
        if row.to.ends_with("@mptcp") {
            args.push("--mptcp");
        }
        let r = self.lab.client(Some(row.from), uid, &args).unwrap();
        let envoys: Vec<(&str, Vec<EnvoyRecord>)> = self
            .envoys
            .iter()
            .zip(before)
            .map(|((pod, e), n)| (*pod, self.lab.envoy_log_since(*e, n)))
            .collect();
        seen(&r[0], &envoys)
    }

    fn set_iptables(&self, options: Option<&Options>) {
        for p in MESH {
            let ns = &self.lab.pod(p).netns;
            match options {
                Some(o) => istio_iptables::install(ns, o).unwrap(),
                None => istio_iptables::remove(ns).unwrap(),
            }
        }
    }

    fn set_redirectd(&mut self, options: Option<&Options>) {
        let entries: Vec<String> = match options {
            Some(o) => {
                let ann = o.annotations();
                let ann: Vec<(&str, &str)> = ann.iter().map(|(k, v)| (*k, v.as_str())).collect();
                MESH.iter()
                    .map(|p| self.lab.pod(p).yaml_entry(&ann))
                    .collect()
            }
            None => Vec::new(),
        };
        let yaml = if entries.is_empty() {
            "pods: []\n".to_string()
        } else {
            pods_yaml(&entries)
        };
        let d = self.lab.daemon();
        d.write_pods(&yaml).unwrap();
        if options.is_some() {
            d.wait_pods(&MESH).unwrap();
        } else {
            d.wait_pods(&[]).unwrap();
        }
    }
}

#[test]
fn same_as_istio_iptables_for_every_row_and_family() {
    let mut mesh = build();
    let mut table = String::from(
        "| row | connection | family | under `istio-iptables` | under redirectd | equal |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    let mut unexplained = Vec::new();
    for case in cases() {
        let options = (case.options)(&mesh.lab);
        mesh.set_iptables(Some(&options));
        let reference: Vec<[Seen; 2]> = case
            .rows
            .iter()
            .map(|r| [mesh.run(r, false), mesh.run(r, true)])
            .collect();
        mesh.set_iptables(None);
        mesh.set_redirectd(Some(&options));
        let ours: Vec<[Seen; 2]> = case
            .rows
            .iter()
            .map(|r| [mesh.run(r, false), mesh.run(r, true)])
            .collect();
        mesh.set_redirectd(None);
        for ((row, refs), got) in case.rows.iter().zip(reference).zip(ours) {
            for (i, (a, b)) in refs.into_iter().zip(got).enumerate() {
                let family = if i == 0 { "IPv4" } else { "IPv6" };
                let verdict = if a == b {
                    "yes".to_string()
                } else if a.same_but_inbound_local(&b) {
                    format!(
                        "yes, but {} under istio-iptables, {} under redirectd (sk_lookup hands the connection over unchanged, as TPROXY would)",
                        a.inbound_local(),
                        b.inbound_local()
                    )
                } else {
                    unexplained.push(format!(
                        "{} {family}:\n  iptables:  {a:?}\n  redirectd: {b:?}",
                        row.id
                    ));
                    "**no**".to_string()
                };
                let _ = writeln!(
                    table,
                    "| {} | {} ({} {} -> {}) | {family} | {} | {} | {verdict} |",
                    row.id,
                    row.what,
                    row.from,
                    match (row.as_proxy, row.uid) {
                        (true, _) => "as the proxy".to_string(),
                        (false, Some(uid)) => format!("app as uid/gid {uid}"),
                        (false, None) => "app".to_string(),
                    },
                    row.to,
                    a.parties,
                    b.parties
                );
            }
        }
    }
    // Under `cargo xtask test --kernel` the repository is read-only: the table then goes to
    // the temporary directory.
    let mut out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/conformance.md");
    if std::fs::write(&out, &table).is_err() {
        out = std::env::temp_dir().join("conformance.md");
        std::fs::write(&out, &table).unwrap();
    }
    assert!(
        unexplained.is_empty(),
        "differences from istio-iptables (table in {}):\n{}",
        out.display(),
        unexplained.join("\n")
    );
    // The committed table lists every row.
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/conformance.md"),
    )
    .unwrap_or_default();
    for case in cases() {
        for row in case.rows {
            assert!(
                doc.contains(&format!("| {} |", row.id)),
                "docs/conformance.md misses row {} (copy target/conformance.md)",
                row.id
            );
        }
    }
}
