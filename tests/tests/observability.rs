//! The metrics endpoint: Prometheus text with the capture counters, /healthz, /readyz.

use std::time::Duration;

use redirect_lab::eventually;
use redirect_tests::{lab, pods_yaml};

fn get(url: &str) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "5", "-w", "\n%{http_code}", url])
        .output()
        .expect("curl (cargo xtask setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A loopback port no one listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A hexadecimal field of a `/proc/<pid>/status` text (`CapEff:`, ...).
fn status_hex(status: &str, field: &str) -> u64 {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in {status}"))
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// 1,100 connections held open on the metrics port (any pod can reach it with the monitoring
/// overlay) take at most the server's connection limit of the daemon's descriptors: the
/// daemon keeps serving its pods, the log is not flooded, and /healthz answers once they go.
#[test]
fn a_flood_of_connections_cannot_take_the_daemons_descriptors() {
    // The test itself holds the connections.
    // SAFETY: getrlimit/setrlimit on this process with a struct we own.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max.min(1 << 16);
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    lab.add_pod("late").unwrap();
    let first = pods_yaml(&[lab.pod("client").yaml_entry(&[])]);
    lab.start_daemon(&first, &["--metrics-addr", &addr])
        .unwrap();
    lab.daemon().wait_pods(&["client"]).unwrap();
    let pid = lab.daemon().pid().unwrap();
    let before = open_fds(pid);

    let held: Vec<std::net::TcpStream> = (0..1_100)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = open_fds(pid);
    assert!(
        during < before + 64 + 16,
        "{} connections held took the daemon from {before} to {during} descriptors",
        held.len()
    );
    // Still serving: a pod added now is applied.
    let both = pods_yaml(&[
        lab.pod("client").yaml_entry(&[]),
        lab.pod("late").yaml_entry(&[]),
    ]);
    lab.daemon().write_pods(&both).unwrap();
    lab.daemon().wait_pods(&["client", "late"]).unwrap();
    drop(held);
    let healthy = eventually(Duration::from_secs(15), "/healthz after the flood", || {
        (get(&format!("http://{addr}/healthz")).0 == 200).then_some(())
    });
    assert!(healthy.is_ok(), "{}", lab.daemon().log_text());
    let log = lab.daemon().log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("metrics endpoint"))
        .count();
    assert!(
        lines <= 5,
        "{lines} log lines about the metrics endpoint:\n{log}"
    );
}

#[test]
fn metrics_healthz_readyz() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    lab.add_pod("ext").unwrap();
    lab.start_sidecar("client").unwrap();
    lab.start_server("ext", &[8080]).unwrap();
    let addr = format!("127.0.0.1:{port}");
    lab.start_daemon(
        &pods_yaml(&[lab.pod("client").yaml_entry(&[])]),
        &["--metrics-addr", &addr],
    )
    .unwrap();
    lab.daemon().wait_pods(&["client"]).unwrap();
    let target = format!("{}:8080", lab.pod("ext").v4);
    for _ in 0..3 {
        lab.client(Some("client"), None, &["--target", &target])
            .unwrap();
    }
    assert_eq!(get(&format!("{base}/healthz")).0, 200);
    // Counters are published after each pass (at least every second).
    let want = r#"redirect_connections_total{direction="outbound",pod_name="client",pod_namespace="lab",result="captured"} 3"#;
    let mut body = String::new();
    let published = eventually(Duration::from_secs(4), "the counters in /metrics", || {
        let (code, b) = get(&format!("{base}/metrics"));
        assert_eq!(code, 200);
        body = b;
        body.contains(want).then_some(())
    });
    assert!(published.is_ok(), "{body}");
    assert!(body.contains("redirect_ready 1"));
    assert!(body.contains(r#"redirect_pods{state="applied"} 1"#));
    assert!(
        !body.contains("10.201."),
        "addresses leak into metrics: {body}"
    );
    assert_eq!(get(&format!("{base}/readyz")).0, 200);
    assert_eq!(get(&format!("{base}/nope")).0, 404);

    // Least privilege: every thread of the running daemon holds only the capabilities it
    // needs (DAC_READ_SEARCH, NET_ADMIN, SYS_PTRACE, SYS_ADMIN, PERFMON, BPF; a sandbox may
    // have withheld some of them), and the essential ones, and runs under its seccomp filter.
    let pid = lab.daemon().proc.as_ref().unwrap().pid();
    let kept = [2u32, 12, 19, 21, 38, 39]
        .iter()
        .fold(0u64, |m, c| m | 1 << c);
    let essential = [12u32, 21, 39].iter().fold(0u64, |m, c| m | 1 << c);
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .collect();
    assert!(tasks.len() > 1, "expected the runtime's threads");
    for task in tasks {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let caps = |field: &str| status_hex(&status, field);
        assert!(
            status
                .lines()
                .any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"])),
            "no_new_privs is not set: {status}"
        );
        assert!(
            status
                .lines()
                .any(|l| l.split_whitespace().eq(["Seccomp:", "2"])),
            "no seccomp filter: {status}"
        );
        for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
            let c = caps(field);
            assert_eq!(
                c & !kept,
                0,
                "{field} {c:x} has more than {kept:x}: {status}"
            );
            assert_eq!(
                c & essential,
                essential,
                "{field} {c:x} lacks an essential one: {status}"
            );
        }
    }
}

/// The capabilities the DaemonSet gives the redirectd container (`deploy/base`), as numbers.
fn manifest_capabilities() -> u64 {
    use serde::Deserialize as _;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/redirectd.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let ds = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde_yaml_ng::Value::deserialize(d).unwrap())
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    let ds: k8s_openapi::api::apps::v1::DaemonSet = serde_yaml_ng::from_value(ds).unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let c = pod
        .containers
        .iter()
        .find(|c| c.name == "redirectd")
        .unwrap();
    let caps = c
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    caps.add.iter().flatten().fold(0, |m, name| {
        let n = match name.as_str() {
            "DAC_READ_SEARCH" => 2,
            "NET_ADMIN" => 12,
            "SYS_PTRACE" => 19,
            "SYS_ADMIN" => 21,
            "SYS_RESOURCE" => 24,
            "PERFMON" => 38,
            "BPF" => 39,
            other => panic!("the manifest adds {other}, unknown to this test"),
        };
        m | 1 << n
    })
}

/// A lab with a mesh pod `client` (its sidecar up) and a server `ext:8080`, and the daemon
/// serving `client` as the lab starts it; returns the lab and the sidecar's index.
fn client_and_ext() -> (redirect_lab::Lab, usize) {
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    lab.add_pod("ext").unwrap();
    let sidecar = lab.start_sidecar("client").unwrap();
    lab.start_server("ext", &[8080]).unwrap();
    lab.start_daemon(&pods_yaml(&[lab.pod("client").yaml_entry(&[])]), &[])
        .unwrap();
    (lab, sidecar)
}

/// Stops the lab's daemon, changes how it is started (`change`), starts it again on the same
/// pins and waits until it serves `client`.
fn restart_daemon_as(lab: &mut redirect_lab::Lab, change: impl FnOnce(&mut redirect_lab::Daemon)) {
    let d = lab.daemon();
    d.stop();
    change(d);
    d.restart().unwrap();
    d.wait_pods(&["client"]).unwrap();
}

/// `client` calls `ext:8080`, and its sidecar takes the connection.
fn assert_client_captured(lab: &redirect_lab::Lab, sidecar: usize) {
    let target = format!("{}:8080", lab.pod("ext").v4);
    let r = lab
        .client(Some("client"), None, &["--target", &target])
        .unwrap();
    assert!(
        redirect_tests::captured(lab, sidecar, &r[0]),
        "{r:?}\n{}",
        lab.daemon
            .as_ref()
            .map(|d| d.log_text())
            .unwrap_or_default()
    );
}

/// Started as its container starts it (a bounding set of exactly the capabilities the
/// manifest adds, so no CAP_SETPCAP to drop the others with), the daemon starts, drops what
/// it does not use, and captures. Before, it exited at once: "dropping capability 0 from the
/// bounding set: Operation not permitted".
#[test]
fn starts_and_captures_with_only_the_manifests_capabilities() {
    let caps = manifest_capabilities();
    let (mut lab, sidecar) = client_and_ext();
    restart_daemon_as(&mut lab, |d| d.bounding = Some(caps));
    let pid = lab.daemon().pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(status_hex(&status, "CapBnd:") & !caps, 0, "{status}");
    assert_eq!(status_hex(&status, "CapPrm:") & !caps, 0, "{status}");
    assert_client_captured(&lab, sidecar);
}

/// Unmounts what it holds (lazily) when dropped, even after a failed assertion.
struct Mounts(Vec<std::path::PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(m)
                .status();
        }
    }
}

/// A node with hybrid cgroups, as the DaemonSet sees it: its `--cgroup` (the host's
/// /sys/fs/cgroup) is a tmpfs holding the v1 controllers, with cgroup v2 at `unified`. Built
/// here from the lab's own cgroup (bind-mounted as `unified` on a tmpfs of the test's), so the
/// programs attach to the lab's cgroup only. The daemon finds the v2 mount, says so, and
/// captures; before, it refused to start ("not a cgroup v2 directory").
#[test]
fn finds_cgroup_v2_below_a_hybrid_cgroup_mount() {
    let (mut lab, sidecar) = client_and_ext();
    let hybrid = lab.dir.join("sys-fs-cgroup");
    let unified = hybrid.join("unified");
    let mut mounts = Mounts(Vec::new());
    std::fs::create_dir_all(&hybrid).unwrap();
    redirect_lab::run("mount", &["-t", "tmpfs", "tmpfs", hybrid.to_str().unwrap()]).unwrap();
    mounts.0.push(hybrid.clone());
    std::fs::create_dir_all(&unified).unwrap();
    let lab_cgroup = lab.cgroup.path.clone();
    redirect_lab::run(
        "mount",
        &[
            "--bind",
            lab_cgroup.to_str().unwrap(),
            unified.to_str().unwrap(),
        ],
    )
    .unwrap();
    mounts.0.push(unified.clone());

    restart_daemon_as(&mut lab, |d| d.cgroup = hybrid.clone());
    let log = lab.daemon().log_text();
    assert!(
        log.contains("hybrid cgroup layout") && log.contains(&unified.display().to_string()),
        "{log}"
    );
    assert_client_captured(&lab, sidecar);
    // The daemon goes before the mounts its links were made through.
    lab.daemon().stop();
    drop(mounts);
}

/// The start-up probe finds every feature the data path needs on this kernel (and would name
/// what is missing, with the kernel version that brings it), then tries what a spliced proxy
/// socket does differently from TCP here.
#[test]
fn kernel_probe_finds_every_feature() {
    let out = std::process::Command::new(redirect_lab::bin("redirectd"))
        .arg("probe")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (features, accel) = text
        .split_once("\nsame-node acceleration")
        .unwrap_or_else(|| panic!("no acceleration section:\n{text}"));
    assert!(features.lines().count() >= 20, "{text}");
    assert!(features.lines().all(|l| l.starts_with("ok ")), "{text}");
    // The acceleration section: each behaviour tried, same as TCP or not, and a verdict.
    let tried: Vec<&str> = accel
        .lines()
        .filter(|l| l.starts_with("same ") || l.starts_with("DIFFERS "))
        .collect();
    assert_eq!(
        tried.len(),
        redirect_user::kernel::splice_check::QUICK.len(),
        "{accel}"
    );
}

/// `--log-format json`: every line the daemon logs is one JSON object with a timestamp, a
/// level, the module and the message, for log pipelines.
#[test]
fn json_logs_are_one_object_per_line() {
    let mut lab = lab();
    lab.add_pod("a").unwrap();
    let pods = pods_yaml(&[lab.pod("a").yaml_entry(&[])]);
    lab.start_daemon(&pods, &["--log-format", "json"]).unwrap();
    lab.daemon().wait_pods(&["a"]).unwrap();
    let log = lab.daemon().log_text();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 5, "{log}");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        for field in ["ts", "level", "target", "msg"] {
            assert!(v[field].is_string(), "no {field} in {l}");
        }
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"level\":\"INFO\"") && l.contains("attached")),
        "{log}"
    );
}

/// docs/design.md's program table (name, verifier instructions on the kernel its header
/// names) is what `redirectd status` reports: on that kernel every count must equal the
/// table's, so the table cannot drift from the code; on another kernel every program of the
/// table is still loaded and reported with a count, and the counts are printed.
#[test]
fn program_table_is_what_status_reports() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/design.md"))
        .expect("docs/design.md");
    let header = readme
        .lines()
        .find(|l| l.starts_with("| program | hook | role | verifier instructions ("))
        .expect("the program table of docs/design.md");
    let table_kernel = header
        .rsplit_once('(')
        .and_then(|(_, k)| k.split_once(')'))
        .map(|(k, _)| k.to_string())
        .unwrap();
    // Rows: "| `rd_a` / `6` | hook | role | 764 / 1321 |" -> (rd_a4, 764), (rd_a6, 1321).
    let mut expected: Vec<(String, u32)> = Vec::new();
    for line in readme.lines().skip_while(|l| *l != header).skip(2) {
        if !line.starts_with("| `rd_") {
            break;
        }
        let cells: Vec<&str> = line.split(" | ").collect();
        let names: Vec<String> = cells[0]
            .trim_start_matches("| ")
            .split(" / ")
            .map(|n| n.trim_matches('`').to_string())
            .collect();
        let counts: Vec<u32> = cells[cells.len() - 1]
            .trim_end_matches(" |")
            .split(" / ")
            .map(|c| c.trim().parse().expect("a count"))
            .collect();
        assert_eq!(names.len(), counts.len(), "{line}");
        let first = names[0].clone();
        for (i, (name, count)) in names.into_iter().zip(counts).enumerate() {
            // "`rd_peername4` / `6`": the second is the first with its last character changed.
            let name = if i > 0 && name.len() == 1 {
                format!("{}{name}", &first[..first.len() - 1])
            } else {
                name
            };
            expected.push((name, count));
        }
    }
    assert!(expected.len() >= 15, "{expected:?}");

    let mut lab = redirect_tests::mesh_with_echo(&[]);
    let programs = lab.daemon().status().unwrap().programs;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let same_kernel = release.starts_with(&format!("{table_kernel}."));
    let mut differ = Vec::new();
    for (name, count) in &expected {
        let p = programs
            .iter()
            .find(|p| &p.name == name)
            .unwrap_or_else(|| panic!("{name} is in the table but not in status: {programs:?}"));
        let got = p.verified_insns.expect("a verifier count (5.16+)");
        println!(
            "{name}: table {count}, this kernel ({}) {got}",
            release.trim()
        );
        if got != *count {
            differ.push(format!("{name}: table {count}, status {got}"));
        }
    }
    for p in &programs {
        assert!(
            expected.iter().any(|(n, _)| n == &p.name),
            "{} is loaded but not in the table",
            p.name
        );
    }
    if same_kernel {
        assert!(
            differ.is_empty(),
            "the table in docs/design.md has drifted: {differ:?}"
        );
    }
}
