//! User-namespaced pods (`hostUsers: false`): the pod's processes run in a user namespace of
//! their own, so its proxy's uid 1337 is another uid on the host (here 101337: ids 0-65535
//! inside are 100000-165535 outside), and the kernel programs see host ids. redirectd reads the
//! pod's id maps through its network namespace's owning user namespace and recognises the
//! proxy by its host uid; a host process that merely has uid 1337 is not the proxy there.
//!
//! The pod: a process made by `unshare` in a new user namespace with that map and a new
//! network namespace it owns (as a container runtime makes a `hostUsers: false` sandbox), in
//! the lab's cgroup; processes join it with `nsenter`. No sidecar listens, so a connection the
//! rules capture is refused (`EPERM`, fail closed) and one they leave alone fails on its own
//! (no route: `ENETUNREACH`), which tells the two apart without any traffic leaving.

use redirect_lab::{bin, spawn, wire::ClientResult, Lab};
use redirect_tests::{lab, pods_yaml};

/// Joins the sandbox `pid`'s namespaces (its user namespace too when `in_userns`) as `uid`
/// (inside the user namespace, or on the host) and connects to an unroutable address.
fn connect(lab: &Lab, pid: u32, in_userns: bool, uid: u32) -> ClientResult {
    let (pid, uid) = (pid.to_string(), uid.to_string());
    let lab_bin = bin("redirect-lab");
    let lab_bin = lab_bin.to_string_lossy();
    let mut args = vec!["--target", &pid, "--net"];
    if in_userns {
        args.push("--user");
    }
    args.extend([
        "--setuid",
        &uid,
        "--setgid",
        &uid,
        "--",
        &lab_bin,
        "client",
        "--target",
        "10.255.255.1:80",
        "--timeout-ms",
        "3000",
    ]);
    let out = lab
        .run_at(lab.cgroup_placement(), "nsenter", &args)
        .unwrap();
    out.lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no client result in {out}"))
}

#[test]
fn the_proxy_is_recognised_through_the_pods_uid_map() {
    let mut lab = lab();
    let log = lab.dir.join("sandbox.log");
    let sandbox = spawn(
        lab.cgroup_placement(),
        &log,
        &redirect_lab::which("unshare").unwrap(),
        &["--user", "--net", "sleep", "3600"],
    )
    .unwrap();
    let pid = sandbox.child.id();
    lab.procs.push(sandbox);
    // Once it has unshared, its parent's root writes its maps, as a runtime does.
    redirect_lab::eventually(
        std::time::Duration::from_secs(5),
        "the sandbox's own user namespace",
        || {
            let own = std::fs::read_link(format!("/proc/{pid}/ns/user")).ok()?;
            (own != std::fs::read_link("/proc/self/ns/user").ok()?).then_some(())
        },
    )
    .unwrap();
    for map in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{pid}/{map}"), "0 100000 65536\n").unwrap();
    }
    let yaml = pods_yaml(&[format!(
        "  - name: userns\n    namespace: lab\n    pid: {pid}\n"
    )]);
    lab.start_daemon(&yaml, &[]).unwrap();
    lab.daemon().wait_pods(&["userns"]).unwrap();
    let refused = |r: &ClientResult| {
        r.error
            .as_deref()
            .is_some_and(|e| e.contains("not permitted"))
    };
    let unreachable = |r: &ClientResult| {
        r.error
            .as_deref()
            .is_some_and(|e| e.contains("unreachable"))
    };
    // The proxy, uid 1337 inside the pod's user namespace: its own connections go direct.
    let proxy = connect(&lab, pid, true, 1337);
    assert!(
        unreachable(&proxy),
        "the pod's proxy was captured: {proxy:?}"
    );
    // The application, root inside: captured (and refused, no sidecar listens).
    let app = connect(&lab, pid, true, 0);
    assert!(
        refused(&app),
        "the pod's application was not captured: {app:?}"
    );
    // A host process with uid 1337 in the pod's network namespace is not its proxy.
    let host_1337 = connect(&lab, pid, false, 1337);
    assert!(
        refused(&host_1337),
        "host uid 1337 was taken for the pod's proxy: {host_1337:?}"
    );
}
