//! Helpers shared by the integration tests in `tests/`.

pub mod fake_apiserver;

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use redirect_lab::{wire::ClientResult, Lab, Report};

/// A lab, or a loud failure naming what the test needs.
pub fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| {
        panic!("this test needs root, iproute2, cgroup v2 and BPF (run `cargo xtask test`): {e:#}")
    })
}

/// The one result of a client run of one connection, which succeeded.
pub fn ok(r: &[ClientResult]) -> &ClientResult {
    assert_eq!(r.len(), 1);
    assert!(r[0].error.is_none(), "{:?}", r[0]);
    &r[0]
}

/// The host part of an address (`10.0.0.1:80` -> `10.0.0.1`, `[::1]:80` -> `[::1]`).
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// The pods file for `entries` (from `Pod::yaml_entry`).
pub fn pods_yaml(entries: &[String]) -> String {
    format!("pods:\n{}", entries.concat())
}

/// Runs curl in a pod and returns the body.
pub fn curl(lab: &Lab, pod: &str, url: &str) -> anyhow::Result<String> {
    lab.run_in(pod, None, "curl", &["-sS", "--max-time", "5", "-g", url])
}

/// A lab with mesh pods `a` (client app + sidecar) and `b` (echo server app on 7000 +
/// sidecar), `annotations` on both, and the daemon serving them.
pub fn mesh_with_echo(annotations: &[(&str, &str)]) -> Lab {
    let mut lab = lab();
    lab.add_pod("a").unwrap();
    lab.add_pod("b").unwrap();
    lab.start_sidecar("a").unwrap();
    lab.start_sidecar("b").unwrap();
    lab.start_echo_server("b", 7000, None).unwrap();
    let yaml = pods_yaml(&[
        lab.pod("a").yaml_entry(annotations),
        lab.pod("b").yaml_entry(annotations),
    ]);
    lab.start_daemon(&yaml, &[]).unwrap();
    lab.daemon().wait_pods(&["a", "b"]).unwrap();
    lab
}

/// How full the connection maps are: `(SOCK_PAIRS, ORIG_BY_COOKIE, ORIG_BY_TUPLE)`.
pub type Fill = (usize, usize, usize);

fn fill_of(status: &Report) -> Fill {
    (
        status.sock_pairs,
        status.orig_by_cookie,
        status.orig_by_tuple,
    )
}

/// The connection maps' fill now.
pub fn map_fill(lab: &mut Lab) -> Fill {
    fill_of(&lab.daemon().status().unwrap())
}

/// Waits until the connection maps are back to `start`; returns the status then.
pub fn wait_maps_back(lab: &mut Lab, start: Fill) -> Report {
    lab.daemon()
        .wait_status("maps back to their starting size", |s| fill_of(s) == start)
        .unwrap()
}

/// Runs the lab client in `pod` with `client_args` again and again around `disrupt`: 300 ms
/// of traffic, `disrupt`, 300 ms more. The traffic stops whatever `disrupt` does (its panic is
/// raised again once the traffic has stopped). Returns every connection's result and what
/// `disrupt` returned.
pub fn traffic_during<T>(
    lab: &Lab,
    pod: &str,
    client_args: &[&str],
    disrupt: impl FnOnce() -> T,
) -> (Vec<ClientResult>, T) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let traffic = s.spawn(|| {
            let mut all = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                all.extend(lab.client(Some(pod), None, client_args).unwrap());
            }
            all
        });
        std::thread::sleep(Duration::from_millis(300));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let value = disrupt();
            std::thread::sleep(Duration::from_millis(300));
            value
        }));
        stop.store(true, Ordering::SeqCst);
        let all = traffic.join().unwrap();
        match outcome {
            Ok(value) => (all, value),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
