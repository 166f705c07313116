//! Load: 64 concurrent clients through the full mesh path (app, sidecar, sidecar, app) with
//! acceleration on, for 30 s (5 minutes with `cargo xtask test --long`, which sets
//! `REDIRECT_LOAD_SECS=300`): zero failed requests, zero corrupted bytes, maps back to their
//! starting size, the daemon's memory stable.

use std::time::{Duration, Instant};

use redirect_tests::{map_fill, mesh_with_echo, wait_maps_back};

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn sixty_four_clients_through_the_accelerated_mesh() {
    let secs: u64 = std::env::var("REDIRECT_LOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let mut lab = mesh_with_echo(&[]);
    let start_fill = map_fill(&mut lab);
    let pid = lab.daemon().proc.as_ref().unwrap().pid();
    let t = format!("{}:7000", lab.pod("b").v4);

    // Warm up, then measure the daemon's memory across the run.
    lab.echo("a", &["--target", &t, "--size", "65536", "--streams", "64"])
        .unwrap();
    let rss_start = rss_kib(pid);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut streams, mut bytes, mut failed) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        let r = lab
            .echo(
                "a",
                &["--target", &t, "--size", "262144", "--streams", "64"],
            )
            .unwrap();
        for s in &r {
            streams += 1;
            bytes += s.received;
            if !s.intact || s.outcome != "ok" {
                failed += 1;
                eprintln!("failed stream: {s:?}");
            }
        }
    }
    let rss_end = rss_kib(pid);
    println!(
        "load: {secs} s, {streams} streams of 256 KiB through 2 sidecars, {} MiB echoed, {failed} failed; daemon RSS {rss_start} -> {rss_end} KiB",
        bytes >> 20
    );
    assert_eq!(
        failed, 0,
        "{failed} of {streams} streams failed or came back corrupted"
    );
    assert!(streams >= 64 * 10, "only {streams} streams in {secs} s");
    wait_maps_back(&mut lab, start_fill);
    assert!(
        rss_end < rss_start + 8 * 1024,
        "daemon RSS grew from {rss_start} to {rss_end} KiB"
    );
    let accel: u64 = ["a", "b"]
        .iter()
        .map(|p| lab.daemon().pod_status(p).unwrap().counter("accel_bytes"))
        .sum();
    assert!(
        accel >= 2 * bytes,
        "only {accel} of {} bytes accelerated",
        2 * bytes
    );
}
