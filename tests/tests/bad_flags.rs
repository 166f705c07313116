//! A careless operator's flags get a clear error naming the flag, before anything is attached;
//! the daemon's own files are written safely; `redirectd status | head` ends quietly.

use std::{os::unix::fs::MetadataExt as _, path::PathBuf, process::Command};

use redirect_lab::bin;
use redirect_tests::{lab, pods_yaml};

/// A directory of this test's own, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("rlab-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.join("v1")).output();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `redirectd run` with `args` after a usable pods file, pin dir and status file: must fail;
/// returns its stderr.
fn run_fails(dir: &TempDir, args: &[&str]) -> String {
    let pods = dir.0.join("pods.yaml");
    std::fs::write(&pods, "pods: []\n").unwrap();
    let pin_dir = format!("/sys/fs/bpf/rlab-flags-{}", std::process::id());
    let status = dir.0.join("status.json");
    let mut all = vec![
        "run",
        "--pods",
        pods.to_str().unwrap(),
        "--pin-dir",
        &pin_dir,
        "--status-file",
        status.to_str().unwrap(),
    ];
    all.extend(args);
    let out = Command::new(bin("redirectd"))
        .args(&all)
        .output()
        .expect("this test needs the redirectd binary (run `cargo xtask test`)");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} was accepted: {err}");
    assert!(
        !std::path::Path::new(&pin_dir).exists(),
        "{args:?}: something was pinned"
    );
    err
}

#[test]
fn careless_flags_are_refused_naming_the_flag() {
    let dir = TempDir::new("flags");
    let err = run_fails(&dir, &["--log-level", "warnn"]);
    assert!(
        err.contains("warnn") && err.contains("possible values"),
        "{err}"
    );

    // A cgroup v1 hierarchy of the test's own (a named one, no controller).
    let v1 = dir.0.join("v1");
    std::fs::create_dir_all(&v1).unwrap();
    let name = format!("none,name=rlab{}", std::process::id());
    let mounted = Command::new("mount")
        .args(["-t", "cgroup", "-o", &name, "cgroup", v1.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "this test needs cgroup v1 mountable (root)"
    );
    let err = run_fails(&dir, &["--cgroup", v1.to_str().unwrap()]);
    assert!(
        err.contains("--cgroup") && err.contains("cgroup v1"),
        "{err}"
    );

    let err = run_fails(&dir, &["--proc-sys-net", "/proc/sys/nett"]);
    assert!(err.contains("--proc-sys-net"), "{err}");

    // World-writable directories for the daemon's own files: /tmp.
    let err = run_fails(
        &dir,
        &[
            "--cni-socket",
            "/run/rlab-none.sock",
            "--cni-state",
            "/tmp/cni-pods.json",
        ],
    );
    assert!(
        err.contains("--cni-state") && err.contains("written by others"),
        "{err}"
    );
    let err = run_fails(
        &dir,
        &[
            "--cni-socket",
            "/run/rlab-none.sock",
            "--cni-state",
            "rel.json",
        ],
    );
    assert!(
        err.contains("--cni-state") && err.contains("absolute"),
        "{err}"
    );
}

#[test]
fn the_daemons_files_are_private_and_status_ends_quietly_in_a_pipe() {
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    let yaml = pods_yaml(&[lab.pod("client").yaml_entry(&[])]);
    lab.start_daemon(&yaml, &[]).unwrap();
    lab.daemon().wait_pods(&["client"]).unwrap();
    let status = lab.dir.join(format!("{}.status.json", lab.id));
    let mode = std::fs::metadata(&status).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", status.display());

    let pin_dir = format!("/sys/fs/bpf/{}", lab.id);
    // The reader has gone before the first line is written, as `| head` does after its lines.
    let cmd = format!(
        "{{ sleep 0.3; {} status --pin-dir {pin_dir} --status-file {}; }} | {{ exec 0<&-; sleep 1; }}; echo ${{PIPESTATUS[0]}}",
        bin("redirectd").display(),
        status.display()
    );
    let out = Command::new("bash").args(["-c", &cmd]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    // Ended by SIGPIPE (128 + 13), as `cat` would be; a panic exits 101.
    let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(code, "141", "{err}");
}
