//! Helpers shared by the integration tests in `tests/`.

pub mod fake_apiserver;

use redirect_lab::Lab;

/// A lab, or a loud failure naming what the test needs.
pub fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| {
        panic!("this test needs root, iproute2, cgroup v2 and BPF (run `cargo xtask test`): {e:#}")
    })
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
pub type Fill = (Option<u64>, Option<u64>, Option<u64>);

fn fill_of(status: &serde_json::Value) -> Fill {
    (
        status["sock_pairs"].as_u64(),
        status["orig_by_cookie"].as_u64(),
        status["orig_by_tuple"].as_u64(),
    )
}

/// The connection maps' fill now.
pub fn map_fill(lab: &mut Lab) -> Fill {
    fill_of(&lab.daemon().status().unwrap())
}

/// Waits until the connection maps are back to `start`; returns the status then.
pub fn wait_maps_back(lab: &mut Lab, start: Fill) -> serde_json::Value {
    lab.daemon()
        .wait_status("maps back to their starting size", |s| fill_of(s) == start)
        .unwrap()
}
