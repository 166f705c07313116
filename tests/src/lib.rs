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
