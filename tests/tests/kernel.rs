//! The kernel floor, measured: `redirectd probe` on the running kernel. At or above the
//! floor it finds everything the data path needs; below it, it names exactly what is missing,
//! and `redirectd run` refuses to start with that list and attaches nothing. This test runs
//! on every kernel of the matrix (`cargo xtask test --kernel ...`), the only one on kernels
//! below the floor.

use redirect_lab::{bin, run};

/// What the data path needs that came last: the netns cookie helper in sock_ops, cgroup
/// sockopt and sk_msg programs (5.15), and `SO_NETNS_COOKIE` (5.14).
const AFTER_5_13: [&str; 1] = ["socket option SO_NETNS_COOKIE"];
const AFTER_5_14: [&str; 3] = [
    "helper bpf_get_netns_cookie in sock_ops programs",
    "helper bpf_get_netns_cookie in cgroup_sockopt programs",
    "helper bpf_get_netns_cookie in sk_msg programs",
];

fn release() -> (u32, u32) {
    let r = run("uname", &["-r"]).unwrap();
    let mut it = r
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// What the probe should find missing on a `major.minor` kernel (for kernels from 5.10 on,
/// the oldest the matrix runs).
fn expected_missing(v: (u32, u32)) -> Vec<&'static str> {
    let mut m = Vec::new();
    if v < (5, 14) {
        m.extend(AFTER_5_13);
    }
    if v < (5, 15) {
        m.extend(AFTER_5_14);
    }
    m
}

#[test]
fn the_probe_names_exactly_what_this_kernel_lacks_and_nothing_attaches_below_the_floor() {
    let v = release();
    let redirectd = bin("redirectd");
    let redirectd = redirectd.to_str().unwrap();
    let out = std::process::Command::new(redirectd)
        .arg("probe")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut missing: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("MISSING"))
        .map(|l| l.trim().split(" (Linux").next().unwrap_or("").trim())
        .collect();
    missing.sort();
    let mut want = expected_missing(v);
    want.sort();
    eprintln!("kernel {}.{}: missing {missing:?}", v.0, v.1);
    assert_eq!(missing, want, "probe on {}.{}:\n{text}", v.0, v.1);
    assert_eq!(out.status.success(), want.is_empty(), "{text}");
    // The optional feature (VM interfaces need it): sk_lookup's ingress_ifindex, Linux 5.17.
    let optional = text
        .lines()
        .find(|l| l.contains("ingress_ifindex (optional)"))
        .unwrap_or_else(|| panic!("no ingress_ifindex line:\n{text}"));
    let state = if v >= (5, 17) { "ok " } else { "missing " };
    assert!(optional.starts_with(state), "{optional}");
    if want.is_empty() {
        return;
    }
    // Below the floor: `run` names the same list and leaves no pin, link or program.
    let dir = std::env::temp_dir().join(format!("rlab-floor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pods = dir.join("pods.yaml");
    std::fs::write(&pods, "pods: []\n").unwrap();
    let pin_dir = format!("/sys/fs/bpf/rlab-floor-{}", std::process::id());
    let run = std::process::Command::new(redirectd)
        .args([
            "run",
            "--pods",
            pods.to_str().unwrap(),
            "--pin-dir",
            &pin_dir,
        ])
        .args(["--status-file", dir.join("status.json").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(err.contains("nothing was attached"), "{err}");
    for m in &want {
        assert!(err.contains(m), "{m} not named: {err}");
    }
    assert!(
        !std::path::Path::new(&pin_dir).exists(),
        "a pin dir was made"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
