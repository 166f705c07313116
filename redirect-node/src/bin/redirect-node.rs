//! `redirect-node`: the real node (containerd and runc through the CRI, the DaemonSet's pod
//! from `deploy/base`) for `cargo xtask demo --node` and `cargo xtask bench --node`.

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use redirect_lab::{eventually, wire::ProxyRecord, PROXY_UID};
use redirect_node::{
    cluster::{lab_tool, rendering, MeshNode, NODE},
    cri::stdout_lines,
    fake_apiserver::pending_pod,
    Node, Pod, PodSpec,
};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The DaemonSet's pod as written, two mesh pods with Envoy sidecars, real traffic.
    Demo,
    /// RunPodSandbox with and without redirect-cni in the chain, one at a time and 50 at
    /// once, and the time from RunPodSandbox to a pod's first captured connection.
    Bench {
        /// Fewer pods one at a time (5 instead of 20), 20 at once instead of 50.
        #[arg(long)]
        quick: bool,
        /// Where to write the figures (JSON).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Demo => demo(),
        Cmd::Bench { quick, out } => bench(quick, out),
    }
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn demo() -> Result<()> {
    step("a node: containerd 1.6 and runc (Debian's) in a mount and pid namespace of its own, the primary CNI (bridge + host-local), the fake API server as Kubernetes");
    let docs = rendering(|_| {})?;
    let t = Instant::now();
    let mut n = MeshNode::start(&docs)?;
    let ds = n.ds();
    println!(
        "    DaemonSet redirect-system/redirectd from `kubectl kustomize deploy/base`, ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    for (name, code) in &ds.init_exits {
        println!("    init container {name}: exited {code}");
        for l in
            stdout_lines(&PathBuf::from(&ds.pod.config.log_directory).join(format!("{name}_0.log")))
        {
            println!("      | {l}");
        }
    }
    let conf = n.node.cni_conf()?;
    if let Some((file, list)) = conf.first() {
        let types: Vec<&str> = list["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["type"].as_str())
            .collect();
        println!(
            "    install-cni chained the plugin: /etc/cni/net.d/{file}: {}",
            types.join(" -> ")
        );
    }
    let probe = n.in_daemon(&["redirectd", "probe"])?;
    let ok = probe.stdout.lines().filter(|l| l.starts_with("ok")).count();
    println!(
        "    `redirectd probe` in the daemon's container: {ok} checks ok, exit {}",
        probe.exit_code
    );

    step("mesh pods `web` and `api`: sandboxes made by containerd through the CNI chain, Istio's validation init container, Envoy as the sidecar container (uid 1337)");
    let (web, validation) = n.mesh_pod("web")?;
    for l in &validation {
        println!("    istio-validation: {l}");
    }
    let (api, _) = n.mesh_pod("api")?;
    let server = n.node.container(
        "server",
        1000,
        &[&lab_tool("redirect-lab"), "server", "--port", "8080"],
        &[],
    );
    n.node.cri.start_container(&api.id, server, &api.config)?;
    let shell = n.shell(&web)?;
    let api_ip = n.node.cri.pod_ips(&api.id)?[0].clone();
    let dst = n.dst.clone();

    step(&format!("web -> {dst} (outside the mesh) and web -> api {api_ip}:8080, from web's application container"));
    let mut results = n.connections(&shell, &dst, 3)?;
    results.extend(n.connections(&shell, &format!("{api_ip}:8080"), 3)?);
    std::thread::sleep(Duration::from_millis(300));
    let web_log = n.sidecar_log(&web);
    let api_log = n.sidecar_log(&api);
    for r in &results {
        let taken = web_log
            .iter()
            .any(|rec| Some(&rec.peer) == r.local.as_ref());
        println!(
            "    {} -> {}: the server saw it from {}; web's Envoy took it: {taken}",
            r.local.as_deref().unwrap_or("?"),
            r.target,
            r.reply.as_ref().map_or("-", |s| s.peer.as_str())
        );
    }
    let inbound = api_log.iter().filter(|r| r.event == "inbound").count();
    println!("    api's Envoy took {inbound} connections inbound");

    step("the daemon's status, from its container");
    let status = n.status()?;
    for p in &status.pods {
        println!("    pod {}: {:?}", p.pod.name, p.counters);
    }

    step("the daemon's container killed (SIGKILL); kubelet's restart, its programs attached meanwhile");
    let id = n.ds().container_id("redirectd")?;
    let pid = n.node.cri.container_pid(&id)?;
    n.node.kill(pid, libc::SIGKILL)?;
    let during = n.connections(&shell, &dst, 3)?;
    println!(
        "    while it was down: {} connections, {} failed",
        during.len(),
        during.iter().filter(|r| r.error.is_some()).count()
    );
    eventually(Duration::from_secs(30), "the restart", || {
        (!n.ds().restarts("redirectd").ok()?.is_empty()).then_some(())
    })?;
    n.ds().wait_ready(Duration::from_secs(30))?;
    println!(
        "    restarted ({:?}) and ready",
        n.ds().restarts("redirectd")?
    );

    step("removing the pods, containerd and the node (nothing of it is left)");
    n.node.cri.remove_pod(&web.id)?;
    n.node.cri.remove_pod(&api.id)?;
    drop(n);
    println!("    done");
    Ok(())
}

/// p50 and p99 of `v` (sorted here).
fn percentiles(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99))
}

/// Seconds since the epoch of a CRI log line's RFC 3339 timestamp (UTC).
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min, s) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One pod of the benchmark: its sandbox's RunPodSandbox time, and when that call began (the
/// start of the time to its sidecar's first captured connection).
struct Made {
    pod: Pod,
    started: f64,
    run_ms: f64,
}

/// Runs the sandboxes `names` (all at once: a thread each), each with a sidecar
/// (`redirect-lab proxy`, uid 1337) and an application that connects to `dst` until it
/// succeeds: the same work with and without redirect-cni in the chain.
fn make(node: &Node, names: &[String], dst: &str) -> Result<Vec<Made>> {
    std::thread::scope(|s| {
        let workers: Vec<_> = names
            .iter()
            .map(|name| {
                s.spawn(move || -> Result<Made> {
                    let mut cri = node.connect()?;
                    let uid = format!("uid-{name}");
                    let config = node.pod_config(&PodSpec {
                        namespace: "shop",
                        name,
                        uid: &uid,
                    })?;
                    let started = now();
                    let t = Instant::now();
                    let id = cri.run_pod_sandbox(config.clone())?;
                    let run_ms = t.elapsed().as_secs_f64() * 1e3;
                    let pod = Pod { id, config };
                    let tool = lab_tool("redirect-lab");
                    let proxy =
                        node.container("sidecar", PROXY_UID as i64, &[&tool, "proxy"], &[]);
                    cri.start_container(&pod.id, proxy, &pod.config)?;
                    let script = format!(
                        "while :; do {tool} client --target {dst} --timeout-ms 1000 | grep -q '\"error\":null' && exec sleep 3600; sleep 0.01; done"
                    );
                    let app = node.container("app", 1000, &["sh", "-c", &script], &[]);
                    cri.start_container(&pod.id, app, &pod.config)?;
                    Ok(Made {
                        pod,
                        started,
                        run_ms,
                    })
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?)
            .collect()
    })
}

/// Seconds from each pod's RunPodSandbox call to its sidecar's first captured connection.
fn first_captured(node: &Node, made: &[Made]) -> Result<Vec<f64>> {
    made.iter()
        .map(|m| {
            let log = node.log_path(&m.pod, "sidecar");
            eventually(Duration::from_secs(60), "a captured connection", || {
                stdout_lines_timed(&log)
                    .into_iter()
                    .find(|(_, l)| serde_json::from_str::<ProxyRecord>(l).is_ok())
                    .map(|(t, _)| t - m.started)
            })
        })
        .collect()
}

/// A CRI log's stdout lines with their timestamps.
fn stdout_lines_timed(log: &std::path::Path) -> Vec<(f64, String)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("stdout"))
        .filter_map(|l| Some((log_time(l)?, l.splitn(4, ' ').nth(3)?.to_string())))
        .collect()
}

fn remove(cri: &mut redirect_node::Cri, made: &[Made]) -> Result<()> {
    for m in made {
        cri.remove_pod(&m.pod.id)?;
    }
    Ok(())
}

fn bench(quick: bool, out: Option<PathBuf>) -> Result<()> {
    let (one_by_one, at_once) = if quick { (5, 20) } else { (20, 50) };
    let docs = rendering(|_| {})?;
    // The node without the DaemonSet first: the primary CNI alone.
    let mut lab = redirect_lab::Lab::new().context("the benchmark needs root")?;
    lab.add_pod("dst")?;
    lab.start_server("dst", &[8080])?;
    let dst = format!("{}:8080", lab.pod("dst").v4);
    let api = redirect_node::fake_apiserver::FakeApiServer::start_in(&lab.node.path());
    let node = Node::start(&lab, &lab.primary_cni()?)?;
    let mut n = MeshNode {
        ds: None,
        node,
        api,
        dst: dst.clone(),
        lab,
    };
    let names = |prefix: &str, count: usize| -> Vec<String> {
        (0..count).map(|i| format!("{prefix}-{i}")).collect()
    };
    for name in names("seq", one_by_one)
        .into_iter()
        .chain(names("burst", at_once))
    {
        n.api.apply(
            &pending_pod("shop", &name, &format!("uid-{name}"), NODE, &[]),
            true,
        );
    }
    let mut figures = serde_json::Map::new();
    let mut rows = Vec::new();
    for chained in [false, true] {
        let label = if chained { "with" } else { "without" };
        if chained {
            let t = Instant::now();
            n.start_daemonset(&docs)?;
            figures.insert("daemonset_ready_s".into(), json!(t.elapsed().as_secs_f64()));
        }
        let mut seq = Vec::new();
        for name in names("seq", one_by_one) {
            seq.extend(make(&n.node, &[name], &dst)?);
        }
        let mut seq_first = if chained {
            first_captured(&n.node, &seq)?
        } else {
            Vec::new()
        };
        remove(&mut n.node.cri, &seq)?;
        let t = Instant::now();
        let burst = make(&n.node, &names("burst", at_once), &dst)?;
        let burst_wall = t.elapsed().as_secs_f64();
        let mut burst_first = if chained {
            first_captured(&n.node, &burst)?
        } else {
            Vec::new()
        };
        remove(&mut n.node.cri, &burst)?;
        let (s50, s99) = percentiles(&mut seq.iter().map(|m| m.run_ms).collect::<Vec<_>>());
        let (b50, b99) = percentiles(&mut burst.iter().map(|m| m.run_ms).collect::<Vec<_>>());
        figures.insert(
            label.into(),
            json!({
                "one_at_a_time_ms": {"p50": s50, "p99": s99, "n": one_by_one},
                "at_once_ms": {"p50": b50, "p99": b99, "n": at_once, "all_s": burst_wall},
            }),
        );
        rows.push((label, s50, s99, b50, b99, burst_wall));
        if chained {
            let (f50, f99) = percentiles(&mut seq_first);
            let (g50, g99) = percentiles(&mut burst_first);
            figures.insert(
                "first_captured_s".into(),
                json!({"one_at_a_time": {"p50": f50, "p99": f99}, "at_once": {"p50": g50, "p99": g99}}),
            );
        }
    }
    println!("\n| RunPodSandbox | one at a time p50 | p99 | {at_once} at once p50 | p99 | all {at_once} done |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (label, s50, s99, b50, b99, wall) in &rows {
        println!("| {label} redirect-cni | {s50:.0} ms | {s99:.0} ms | {b50:.0} ms | {b99:.0} ms | {wall:.2} s |");
    }
    let f = &figures["first_captured_s"];
    println!(
        "\nRunPodSandbox -> first captured connection: one at a time p50 {:.2} s, p99 {:.2} s; {at_once} at once p50 {:.2} s, p99 {:.2} s",
        f["one_at_a_time"]["p50"].as_f64().unwrap_or_default(),
        f["one_at_a_time"]["p99"].as_f64().unwrap_or_default(),
        f["at_once"]["p50"].as_f64().unwrap_or_default(),
        f["at_once"]["p99"].as_f64().unwrap_or_default(),
    );
    println!(
        "DaemonSet's pod ready in {:.1} s",
        figures["daemonset_ready_s"].as_f64().unwrap_or_default()
    );
    if let Some(out) = out {
        std::fs::write(&out, serde_json::to_vec_pretty(&figures)?)?;
        println!("figures in {}", out.display());
    }
    Ok(())
}
