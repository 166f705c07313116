//! `cargo xtask bench`: the same workloads through four modes, side by side in one run,
//! interleaved in rounds (direct, iptables, ebpf, ebpf+sockmap; then iptables, ebpf, ...,
//! direct; ...), so that a machine that slows down slows every mode and no mode always runs
//! right after the same one. Istio's nat table is removed, not only flushed, after its mode. Reports medians across rounds with their spread, every
//! mode's ratio to iptables, the kernel programs' average run time per call and the daemon's
//! peak RSS. Writes a table, `bench.json` and an SVG chart.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use redirect_lab::{istio_iptables, perf::Measured, run, Daemon, Lab};
use serde_json::{json, Value};

const MODES: [&str; 4] = ["direct", "iptables", "ebpf", "ebpf+sockmap"];

/// In `docs/benchmarks.md`, what follows this line is written by hand and kept by a new run.
const KEPT_MARKER: &str = "<!-- written by hand below; kept by cargo xtask bench -->";
const WORKLOADS: [&str; 4] = ["rr", "crr", "stream", "concurrent"];

/// Istio's `istio-iptables` REDIRECT rules with the default options (uid/gid 1337,
/// 127.0.0.6 passthrough, 15001/15006, the proxy's ports excluded inbound), both families, in
/// `pod`; or their removal: the nat tables go, not only their rules (a flush would leave the
/// NAT hooks and connection tracking on for every later mode).
fn iptables(lab: &Lab, pod: &str, install: bool) -> Result<()> {
    let ns = &lab.pod(pod).netns;
    if install {
        istio_iptables::install(ns, &istio_iptables::Options::default())
            .context("installing Istio's iptables rules")
    } else {
        istio_iptables::remove(ns)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The figures reported per workload: (name, unit, higher is better).
fn metrics(workload: &str) -> Vec<(&'static str, &'static str, bool)> {
    match workload {
        "rr" => vec![
            ("p50_us", "µs", false),
            ("p90_us", "µs", false),
            ("p99_us", "µs", false),
            ("mean_us", "µs", false),
        ],
        "crr" => vec![("requests_per_s", "conn/s", true)],
        "stream" => vec![("mb_per_s", "MB/s", true)],
        _ => vec![("requests_per_s", "req/s", true), ("p99_us", "µs", false)],
    }
}

fn field(m: &Measured, name: &str) -> f64 {
    match name {
        "p50_us" => m.p50_us,
        "p90_us" => m.p90_us,
        "p99_us" => m.p99_us,
        "mean_us" => m.mean_us,
        "requests_per_s" => m.requests_per_s,
        "mb_per_s" => m.mb_per_s,
        _ => 0.0,
    }
}

/// Cross-node: one daemon a node, each with its own pod, cgroup and maps.
fn node_daemons(lab: &Lab, extra: &[&str]) -> Result<Vec<Daemon>> {
    let mut out = Vec::new();
    for (pod, cgroup) in [
        ("client", lab.pod("client").cgroup.path.clone()),
        (
            "server",
            lab.remote_cgroup().context("no remote node")?.to_path_buf(),
        ),
    ] {
        let yaml = format!("pods:\n{}", lab.pod(pod).yaml_entry(&[]));
        let d = Daemon::start(
            &format!("{}-{pod}", lab.id),
            &lab.dir,
            &cgroup,
            &yaml,
            extra,
        )?;
        d.wait_pods(&[pod])?;
        out.push(d);
    }
    Ok(out)
}

/// Average run time per call of our programs (kernel BPF stats), by program name.
fn bpf_stats() -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    if let Ok(text) = run("bpftool", &["-j", "prog", "show"]) {
        if let Ok(Value::Array(progs)) = serde_json::from_str::<Value>(&text) {
            for p in progs {
                let name = p["name"].as_str().unwrap_or_default().to_string();
                if name.starts_with("rd_") {
                    let e = out.entry(name).or_insert((0, 0));
                    e.0 += p["run_time_ns"].as_u64().unwrap_or(0);
                    e.1 += p["run_cnt"].as_u64().unwrap_or(0);
                }
            }
        }
    }
    out
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn bench(quick: bool, cross_node: bool, envoy: bool, root: &Path) -> Result<()> {
    let rounds = if quick { 2 } else { 5 };
    let secs = if quick { 1 } else { 3 };
    let dur = (secs * 1000).to_string();
    let _ = run("sysctl", &["-qw", "kernel.bpf_stats_enabled=1"]);
    let mut lab = Lab::new()?;
    lab.add_pod("client")?;
    if cross_node {
        // The server pod on "another node": behind a second namespace, routed, with its own
        // daemon on its own cgroup (its own maps: nothing is spliced across nodes).
        lab.add_remote_node()?;
        lab.add_remote_pod("server")?;
    } else {
        lab.add_pod("server")?;
    }
    // The connection-rate workload leaves tens of thousands of TIME_WAIT sockets; without
    // reuse, later modes would pay for earlier ones in connect()'s port search.
    for pod in ["client", "server"] {
        lab.pod(pod).netns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
        ])?;
    }
    for pod in ["client", "server"] {
        if envoy {
            lab.start_envoy(pod)?;
        } else {
            lab.start_lab_sidecar(pod)?;
        }
    }
    lab.spawn_in("server", None, "perf-server", &["perf-server"])?;
    lab.wait_listening("server", 9001)?;
    lab.wait_listening("server", 9002)?;
    let server = lab.pod("server").v4;
    let yaml = format!(
        "pods:\n{}{}",
        lab.pod("client").yaml_entry(&[]),
        lab.pod("server").yaml_entry(&[])
    );

    // results[mode][workload] = one Measured per round
    let mut results: BTreeMap<&str, BTreeMap<&str, Vec<Measured>>> = BTreeMap::new();
    let mut prog_stats: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut rss_kib = 0u64;
    for round in 0..rounds {
        // Each round starts with the next mode (A B C D, B C D A, ...): no mode always follows
        // the same one.
        for i in 0..MODES.len() {
            let mode = MODES[(round + i) % MODES.len()];
            let mut daemons: Vec<Daemon> = Vec::new();
            let extra: &[&str] = if mode == "ebpf" {
                &["--accel", "off"]
            } else {
                &["--accel", "on"]
            };
            match mode {
                "iptables" => {
                    iptables(&lab, "client", true)?;
                    iptables(&lab, "server", true)?;
                }
                "ebpf" | "ebpf+sockmap" if cross_node => daemons = node_daemons(&lab, extra)?,
                "ebpf" | "ebpf+sockmap" => lab.start_daemon(&yaml, extra)?,
                _ => {}
            }
            if lab.daemon.is_some() {
                lab.daemon().wait_pods(&["client", "server"])?;
            }
            for w in WORKLOADS {
                let port = if w == "stream" { 9002 } else { 9001 };
                let target = format!("{server}:{port}");
                let m = lab.perf(
                    "client",
                    &[
                        "--target",
                        &target,
                        "--workload",
                        w,
                        "--duration-ms",
                        &dur,
                        "--conns",
                        "32",
                    ],
                )?;
                anyhow::ensure!(m.errors == 0, "{mode}/{w}: {} errors", m.errors);
                eprintln!("round {round} {mode:<13} {w:<10} {}", summary(w, &m));
                results
                    .entry(mode)
                    .or_default()
                    .entry(w)
                    .or_default()
                    .push(m);
            }
            if mode.starts_with("ebpf") {
                for (name, (ns, cnt)) in bpf_stats() {
                    let e = prog_stats.entry(name).or_insert((0, 0));
                    e.0 += ns;
                    e.1 += cnt;
                }
                for d in daemons.iter().chain(lab.daemon.iter()) {
                    if let Some(p) = d.proc.as_ref() {
                        rss_kib = rss_kib.max(vm_hwm_kib(p.pid()).unwrap_or(0));
                    }
                }
                daemons.clear();
                lab.daemon = None;
            }
            if mode == "iptables" {
                iptables(&lab, "client", false)?;
                iptables(&lab, "server", false)?;
            }
        }
    }
    drop(lab);
    let _ = run("sysctl", &["-qw", "kernel.bpf_stats_enabled=0"]);
    let shape = Shape {
        rounds,
        secs,
        quick,
        cross_node,
        envoy,
    };
    report(&results, &prog_stats, rss_kib, &shape, root)
}

fn summary(w: &str, m: &Measured) -> String {
    match w {
        "rr" => format!("p50 {:.1} µs p99 {:.1} µs", m.p50_us, m.p99_us),
        "crr" => format!("{:.0} conn/s", m.requests_per_s),
        "stream" => format!("{:.0} MB/s", m.mb_per_s),
        _ => format!("{:.0} req/s p99 {:.1} µs", m.requests_per_s, m.p99_us),
    }
}

/// How a run was made.
#[derive(Clone, Copy)]
struct Shape {
    rounds: usize,
    secs: u64,
    quick: bool,
    cross_node: bool,
    /// Envoy in both pods (else the lab's small proxy).
    envoy: bool,
}

fn report(
    results: &BTreeMap<&str, BTreeMap<&str, Vec<Measured>>>,
    prog_stats: &BTreeMap<String, (u64, u64)>,
    rss_kib: u64,
    shape: &Shape,
    root: &Path,
) -> Result<()> {
    let Shape {
        rounds,
        secs,
        quick,
        cross_node,
        envoy,
    } = *shape;
    let sidecar = if envoy { "envoy" } else { "lab" };
    let mut table = String::new();
    let mut figures = json!({});
    writeln!(
        table,
        "| workload | figure | {} |",
        MODES.map(|m| m.to_string()).join(" | ")
    )?;
    writeln!(table, "| --- | --- |{}", " ---: |".repeat(MODES.len()))?;
    for w in WORKLOADS {
        for (metric, unit, higher) in metrics(w) {
            let med = |mode: &str| -> (f64, f64, f64) {
                let v: Vec<f64> = results[mode][w].iter().map(|m| field(m, metric)).collect();
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                (median(v), lo, hi)
            };
            let base = med("iptables").0;
            let mut cells = Vec::new();
            for mode in MODES {
                let (m, lo, hi) = med(mode);
                let ratio = if base > 0.0 { m / base } else { 0.0 };
                cells.push(format!("{m:.1} {unit} ({lo:.1}–{hi:.1}) ×{ratio:.2}"));
                figures[w][metric][mode] = json!({"median": m, "min": lo, "max": hi, "ratio_to_iptables": ratio, "higher_is_better": higher});
            }
            writeln!(table, "| {w} | {metric} | {} |", cells.join(" | "))?;
        }
    }
    let mut progs = String::new();
    let mut prog_json = json!({});
    for (name, (ns, cnt)) in prog_stats {
        let avg = if *cnt > 0 {
            *ns as f64 / *cnt as f64
        } else {
            0.0
        };
        writeln!(progs, "| `{name}` | {cnt} | {avg:.0} ns |")?;
        prog_json[name] = json!({"calls": cnt, "avg_ns": avg});
    }
    println!("\n{table}");
    println!("| program | calls | average run time |\n| --- | ---: | ---: |\n{progs}");
    println!("redirectd peak RSS: {:.1} MiB", rss_kib as f64 / 1024.0);

    let kernel = run("uname", &["-r"]).unwrap_or_default().trim().to_string();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let commit = run(
        "git",
        &[
            "-C",
            &root.to_string_lossy(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    )
    .unwrap_or_default()
    .trim()
    .to_string();
    let doc = json!({
        "machine": {"kernel": kernel, "cpu": cpu, "cpus": cpus},
        "commit": commit,
        "rounds": rounds,
        "seconds_per_workload": secs,
        "quick": quick,
        "cross_node": cross_node,
        "sidecar": sidecar,
        "figures": figures,
        "raw": results.iter().map(|(m, ws)| (m.to_string(), ws.iter().map(|(w, v)| (w.to_string(), serde_json::to_value(v).unwrap_or_default())).collect::<BTreeMap<_, _>>())).collect::<BTreeMap<_, _>>(),
        "programs": prog_json,
        "redirectd_peak_rss_kib": rss_kib,
    });
    let out = root.join("target").join("bench");
    std::fs::create_dir_all(&out)?;
    let stem = match (cross_node, envoy) {
        (true, true) => "bench-cross-node",
        (false, true) => "bench",
        (true, false) => "bench-cross-node-lab-sidecar",
        (false, false) => "bench-lab-sidecar",
    };
    std::fs::write(
        out.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&doc)?,
    )?;
    let svg = chart(&figures);
    std::fs::write(out.join(format!("{stem}.svg")), &svg)?;
    println!("wrote {}/{stem}.json and {stem}.svg", out.display());
    if !quick && !cross_node && envoy {
        let docs = root.join("docs");
        std::fs::create_dir_all(&docs)?;
        std::fs::write(docs.join("bench.json"), serde_json::to_string_pretty(&doc)?)?;
        std::fs::write(docs.join("bench.svg"), &svg)?;
        let md = format!(
            "# Benchmark: eBPF redirect vs Istio's iptables\n\n\
             Latest full run of `cargo xtask bench` (commit `{commit}`, kernel {kernel}, {cpus} × {cpu}).\n\
             {rounds} rounds, modes interleaved in each round, each round starting one mode later \
             (direct, iptables, ebpf, ebpf+sockmap; iptables, ebpf, ebpf+sockmap, direct; ...), \
             Istio's nat table removed after its mode (not only flushed: that would leave NAT and \
             connection tracking on for the modes after it), \
             {secs} s per workload; each cell is the median across rounds, (min–max) across rounds, \
             and ×ratio to `iptables` from the same run. Lab: two mesh pods on one node (network \
             namespaces on a bridge), Envoy 1.40 as the sidecar in both (Istio's listener shapes, \
             two workers, uid 1337), a blocking 1 KiB request/response server and a sink. `rr`: one connection, 1 KiB each \
             way; `crr`: a new connection per request; `stream`: bulk to the sink; `concurrent`: 32 \
             connections of `rr`.\n\n![chart](bench.svg)\n\n{table}\n\
             Kernel programs, average run time per call (kernel BPF stats, all ebpf rounds):\n\n\
             | program | calls | average run time |\n| --- | ---: | ---: |\n{progs}\n\
             redirectd peak RSS: {:.1} MiB.\n\nReproduce: `cargo xtask bench` (full, about 5 minutes) or \
             `cargo xtask bench --quick` (under 2 minutes); results in `target/bench/`. The raw figures \
             of this run are in [bench.json](bench.json).\n",
            rss_kib as f64 / 1024.0
        );
        // The analysis written by hand under the marker survives a new run.
        let path = docs.join("benchmarks.md");
        let mut md = md;
        if let Ok(old) = std::fs::read_to_string(&path) {
            if let Some(at) = old.find(KEPT_MARKER) {
                md.push('\n');
                md.push_str(&old[at..]);
            }
        }
        std::fs::write(&path, md)?;
        println!("updated docs/benchmarks.md (the part under {KEPT_MARKER} kept)");
    }
    Ok(())
}

/// Two panels: request/response latency percentiles per mode, and throughput per mode.
fn chart(figures: &Value) -> String {
    let colors = ["#888888", "#d9534f", "#5bc0de", "#5cb85c"];
    let mut s = String::from(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="900" height="360" font-family="sans-serif" font-size="12">"#,
    );
    s.push_str(r#"<rect width="900" height="360" fill="white"/>"#);
    // Panel 1: latency.
    let pcts = ["p50_us", "p90_us", "p99_us"];
    let max_lat = pcts
        .iter()
        .flat_map(|p| MODES.map(|m| figures["rr"][p][m]["median"].as_f64().unwrap_or(0.0)))
        .fold(1.0, f64::max);
    let _ = write!(
        s,
        r#"<text x="20" y="20" font-size="14">Request/response latency, 1 KiB (µs, lower is better)</text>"#
    );
    for (pi, p) in pcts.iter().enumerate() {
        let gx = 40.0 + pi as f64 * 140.0;
        for (mi, m) in MODES.iter().enumerate() {
            let v = figures["rr"][p][m]["median"].as_f64().unwrap_or(0.0);
            let h = v / max_lat * 260.0;
            let x = gx + mi as f64 * 30.0;
            let _ = write!(
                s,
                r#"<rect x="{x}" y="{:.1}" width="26" height="{h:.1}" fill="{}"/><text x="{x}" y="{:.1}" font-size="9">{v:.0}</text>"#,
                320.0 - h,
                colors[mi],
                316.0 - h
            );
        }
        let _ = write!(
            s,
            r#"<text x="{:.0}" y="338">{}</text>"#,
            gx + 40.0,
            &p[..3]
        );
    }
    // Panel 2: throughput.
    let max_tp = MODES
        .map(|m| {
            figures["stream"]["mb_per_s"][m]["median"]
                .as_f64()
                .unwrap_or(0.0)
        })
        .into_iter()
        .fold(1.0, f64::max);
    let _ = write!(
        s,
        r#"<text x="480" y="20" font-size="14">Bulk throughput (MB/s, higher is better)</text>"#
    );
    for (mi, m) in MODES.iter().enumerate() {
        let v = figures["stream"]["mb_per_s"][m]["median"]
            .as_f64()
            .unwrap_or(0.0);
        let h = v / max_tp * 260.0;
        let x = 500.0 + mi as f64 * 60.0;
        let _ = write!(
            s,
            r#"<rect x="{x}" y="{:.1}" width="50" height="{h:.1}" fill="{}"/><text x="{x}" y="{:.1}" font-size="10">{v:.0}</text>"#,
            320.0 - h,
            colors[mi],
            316.0 - h
        );
    }
    for (mi, m) in MODES.iter().enumerate() {
        let _ = write!(
            s,
            r#"<rect x="{}" y="346" width="10" height="10" fill="{}"/><text x="{}" y="355">{m}</text>"#,
            40 + mi * 150,
            colors[mi],
            54 + mi * 150
        );
    }
    s.push_str("</svg>\n");
    s
}
