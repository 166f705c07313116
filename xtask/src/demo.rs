//! `cargo xtask demo`: a small lab, the redirector, real traffic, and what everyone saw.

use anyhow::{bail, Context as _, Result};
use redirect_lab::{bin, run, wire::ServerReply, Lab};

fn step(text: &str) {
    println!("\n==> {text}");
}

/// Prints what the Envoy sidecar logged since record `from`; returns the records seen.
fn show_sidecar(lab: &Lab, sidecar: usize, from: usize) -> usize {
    let records = lab.envoy_log_settled(sidecar);
    for r in &records[from.min(records.len())..] {
        println!(
            "    envoy: {:<8} from {:<22} -> original destination {:<22} (upstream from {})",
            r.listener,
            r.downstream_remote,
            r.downstream_local,
            r.upstream_local.as_deref().unwrap_or("-")
        );
    }
    records.len()
}

pub fn demo() -> Result<()> {
    step("building a lab: pods `client` and `web` (in the mesh, each with Envoy as its sidecar, uid 1337, Istio's listeners), pod `ext` (outside the mesh)");
    let mut lab = Lab::new()?;
    lab.add_pod("client")?;
    lab.add_pod("ext")?;
    lab.add_pod("web")?;
    lab.start_server("ext", &[8080, 5432])?;
    lab.start_server("web", &[8080])?;
    let sidecar = lab.start_envoy("client")?;
    let web_sidecar = lab.start_envoy("web")?;
    let web4 = lab.pod("web").v4;
    let (client, ext) = (lab.pod("client"), lab.pod("ext"));
    println!(
        "    client {} / {}   ext {} / {}   (no iptables rule anywhere)",
        client.v4, client.v6, ext.v4, ext.v6
    );
    let (ext4, ext6) = (ext.v4, ext.v6);
    let yaml = format!(
        "pods:\n{}{}",
        client.yaml_entry(&[("traffic.sidecar.istio.io/excludeOutboundPorts", "5432")]),
        lab.pod("web").yaml_entry(&[])
    );
    println!(
        "    pods file:\n{}",
        yaml.lines()
            .map(|l| format!("      {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    step("starting redirectd (attached to the lab's cgroup, pinned under /sys/fs/bpf)");
    lab.start_daemon(&yaml, &[])?;
    lab.daemon().wait_pods(&["client", "web"])?;
    for line in lab
        .daemon()
        .log_text()
        .lines()
        .filter(|l| l.contains("attached") || l.contains("in the mesh"))
    {
        println!("    {}", line.split_once("] ").map_or(line, |(_, m)| m));
    }

    step("curl from `client` to ext over IPv4 and IPv6: captured to Envoy's virtualOutbound, which finds the original destination with SO_ORIGINAL_DST");
    let mut seen = 0;
    for url in [
        format!("http://{ext4}:8080/"),
        format!("http://[{ext6}]:8080/"),
    ] {
        let body = lab.run_in(
            "client",
            None,
            "curl",
            &["-sS", "--max-time", "5", "-g", &url],
        )?;
        let reply: ServerReply =
            serde_json::from_str(&body).with_context(|| format!("curl said {body:?}"))?;
        println!(
            "    curl {url:<28} -> server saw the connection from {} at {}",
            reply.peer, reply.local
        );
        seen = show_sidecar(&lab, sidecar, seen);
    }

    step("20 concurrent connections: each keeps its own destination; the app's getpeername() shows it");
    let results = lab.client(
        Some("client"),
        None,
        &[
            "--target",
            &format!("{ext4}:8080"),
            "--target",
            &format!("[{ext6}]:8080"),
            "--count",
            "20",
            "--concurrency",
            "20",
        ],
    )?;
    let ok = results
        .iter()
        .filter(|r| {
            r.reply.as_ref().is_some_and(|x| x.local == r.target)
                && r.peername.as_deref() == Some(r.target.as_str())
        })
        .count();
    println!("    {ok}/20 reached their own destination with getpeername() == destination");
    seen = lab.envoy_log_settled(sidecar).len().max(seen);

    step("not captured: an excluded port (5432), the proxy's own uid, loopback");
    let r = lab.client(Some("client"), None, &["--target", &format!("{ext4}:5432")])?;
    println!(
        "    app -> {ext4}:5432: server saw {} (straight from the app)",
        r[0].reply.as_ref().map_or("error", |x| x.peer.as_str())
    );
    let r = lab.client(
        Some("client"),
        Some(redirect_lab::PROXY_UID),
        &["--target", &format!("{ext4}:8080")],
    )?;
    println!(
        "    uid 1337 -> {ext4}:8080: server saw {} (no loop)",
        r[0].reply.as_ref().map_or("error", |x| x.peer.as_str())
    );
    println!(
        "    Envoy saw {} new connections",
        lab.envoy_log_settled(sidecar).len() - seen
    );

    step("inbound: `ext` (outside the mesh) calls `web`: sk_lookup hands the connection to web's Envoy (virtualInbound, 15006), which reaches the app from 127.0.0.6");
    let r = lab.client(Some("ext"), None, &["--target", &format!("{web4}:8080")])?;
    let reply = r[0].reply.as_ref().context("no reply from web")?;
    println!(
        "    ext {} -> {web4}:8080: the app saw the connection from {}",
        r[0].local.as_deref().unwrap_or("?"),
        reply.peer
    );
    show_sidecar(&lab, web_sidecar, 0);

    step("mesh to mesh: `client` calls `web`: client's Envoy (outbound), then web's Envoy (inbound), then the app");
    let before = lab.envoy_log_settled(web_sidecar).len();
    let r = lab.client(Some("client"), None, &["--target", &format!("{web4}:8080")])?;
    let reply = r[0].reply.as_ref().context("no reply from web")?;
    show_sidecar(&lab, sidecar, seen);
    show_sidecar(&lab, web_sidecar, before);
    println!("    the app saw the connection from {}", reply.peer);

    step("Envoy stopped: fail closed (the default, as under Istio) refuses connections and counts them");
    lab.procs[sidecar].kill();
    let r = lab.client(Some("client"), None, &["--target", &format!("{ext4}:8080")])?;
    let outcome = r[0].reply.as_ref().map_or_else(
        || format!("refused: {}", r[0].error.as_deref().unwrap_or("?")),
        |x| format!("answered, server saw {}", x.peer),
    );
    println!("    app -> {ext4}:8080 with no proxy: {outcome}");
    if r[0].reply.is_some() {
        bail!("a mesh pod's connection escaped capture while its proxy was down");
    }

    step("redirectd status");
    let d = lab.daemon();
    let out = run(
        bin("redirectd").to_str().context("path")?,
        &[
            "status",
            "--pin-dir",
            &d.pin_dir.to_string_lossy(),
            "--status-file",
            &d.status_file.to_string_lossy(),
        ],
    )?;
    for line in out.lines() {
        println!("    {line}");
    }

    step("tearing down: redirectd uninstall, namespaces, cgroups");
    let pin_dir = lab.daemon().pin_dir.clone();
    drop(lab);
    println!(
        "    pin dir {} exists after teardown: {}",
        pin_dir.display(),
        pin_dir.exists()
    );
    Ok(())
}
