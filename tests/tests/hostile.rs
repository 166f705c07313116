//! Hostile or careless input never opens a hole in capture and never harms another pod: one
//! pod's rules cannot use up the node's shared rule maps, and mistakes in the pods file (a
//! misspelt field, an empty or half-written file, a name listed twice, the node's own
//! namespace) never turn a served pod's capture off.

use std::{io::Write, os::unix::process::CommandExt, time::Duration};

use redirect_lab::{wire::ClientResult, Lab};
use redirect_tests::{captured, lab, pods_yaml};

const EXCLUDE_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";

/// `n` distinct IPv6 /128 networks, as an annotation value.
fn ranges(n: usize, tag: u16) -> String {
    (0..n)
        .map(|i| format!("fd7e:{tag:x}::{:x}/128", i + 1))
        .collect::<Vec<_>>()
        .join(",")
}

/// One connection from `pod` to `ext`'s 8080.
fn connect(lab: &Lab, pod: &str) -> ClientResult {
    let target = format!("{}:8080", lab.pod("ext").v4);
    lab.client(Some(pod), None, &["--target", &target])
        .unwrap()
        .remove(0)
}

fn refused(r: &ClientResult) -> bool {
    r.error
        .as_deref()
        .unwrap_or_default()
        .contains("not permitted")
}

/// A pod over the per-pod limit is locked, and the pods after it are served; pods that fill
/// the node's map leave the next one locked (never direct) and a small one still served.
#[test]
fn one_pods_rules_never_use_up_another_pods_room() {
    let mut lab = lab();
    for p in ["greedy", "big1", "big2", "big3", "client", "ext"] {
        lab.add_pod(p).unwrap();
    }
    lab.start_server("ext", &[8080]).unwrap();
    let sidecar = lab.start_sidecar("client").unwrap();
    let greedy = lab.start_sidecar("greedy").unwrap();
    // 7,001 ranges: one over the limit asked for here (about 140 KB, inside Kubernetes'
    // 256 KiB annotation limit).
    let over = ranges(7_001, 1);
    let entries = [
        lab.pod("greedy").yaml_entry(&[(EXCLUDE_RANGES, &over)]),
        lab.pod("big1")
            .yaml_entry(&[(EXCLUDE_RANGES, &ranges(7_000, 2))]),
        lab.pod("big2")
            .yaml_entry(&[(EXCLUDE_RANGES, &ranges(7_000, 3))]),
        lab.pod("big3")
            .yaml_entry(&[(EXCLUDE_RANGES, &ranges(7_000, 4))]),
        lab.pod("client").yaml_entry(&[]),
    ];
    lab.start_daemon(&pods_yaml(&entries), &["--max-rules-per-pod", "7000"])
        .unwrap();
    let st = lab
        .daemon()
        .wait_pods(&["big1", "big2", "big3", "client", "greedy"])
        .unwrap();
    let config = |name: &str| st.pod(name).unwrap().pod.config.clone();
    // Over the per-pod limit: locked, naming the limit.
    assert!(config("greedy").starts_with("locked"), "{st:#?}");
    assert!(
        config("greedy").contains("per-pod limit of 7000"),
        "{st:#?}"
    );
    // 16,384 ADDR_RULES less 1,024 in reserve: two pods of 7,000 fit, the third is locked.
    let locked: Vec<&str> = ["big1", "big2", "big3"]
        .into_iter()
        .filter(|p| config(p).starts_with("locked"))
        .collect();
    assert_eq!(locked.len(), 1, "{st:#?}");
    assert!(
        config(locked[0]).contains("ADDR_RULES map is full"),
        "{st:#?}"
    );
    let addr = st
        .rule_maps
        .iter()
        .find(|m| m.map == "ADDR_RULES")
        .expect("rule maps in status");
    assert_eq!((addr.entries, addr.capacity), (14_000, 16_384), "{st:#?}");

    // Locked pods are refused, never sent around their sidecar; the small pod is captured.
    assert!(refused(&connect(&lab, "greedy")));
    assert!(lab.sidecar_log(greedy).is_empty());
    assert!(refused(&connect(&lab, locked[0])));
    assert!(captured(&lab, sidecar, &connect(&lab, "client")));
    let log = lab.daemon().log_text();
    assert!(!log.contains("full?"), "{log}");
}

/// The pods file edited carelessly: nothing turns the served pod's capture off.
#[test]
fn pods_file_mistakes_never_turn_capture_off() {
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    lab.add_pod("other").unwrap();
    lab.add_pod("ext").unwrap();
    lab.start_server("ext", &[8080]).unwrap();
    let sidecar = lab.start_sidecar("client").unwrap();
    let good = pods_yaml(&[
        lab.pod("client").yaml_entry(&[]),
        lab.pod("other").yaml_entry(&[]),
    ]);
    lab.start_daemon(&good, &[]).unwrap();
    let st = lab.daemon().wait_pods(&["client", "other"]).unwrap();
    let slot = st.pod("client").unwrap().pod.pod_id;
    let still_served = |lab: &mut Lab, what: &str| {
        std::thread::sleep(Duration::from_millis(300));
        let st = lab.daemon().status().unwrap();
        assert_eq!(st.pod_names(), ["client", "other"], "{what}: {st:#?}");
        assert_eq!(st.pod("client").unwrap().pod.pod_id, slot, "{what}");
        assert!(captured(lab, sidecar, &connect(lab, "client")), "{what}");
        st
    };

    // A misspelt field (`ip:` for `ips:`) and `ips` given as a string: held by name.
    let typo = good.replace("    ips: [", "    ip: [");
    lab.daemon().write_pods(&typo).unwrap();
    let st = lab
        .daemon()
        .wait_status("the typo reported", |s| {
            s.pod("client")
                .is_some_and(|p| p.pod.config.starts_with("last good kept"))
        })
        .unwrap();
    assert!(st.rejected.iter().any(|r| r.contains("`ip`")), "{st:#?}");
    still_served(&mut lab, "ip: for ips:");
    let v4 = lab.pod("client").v4.to_string();
    let as_string = good.replacen(
        &format!("ips: [\"{v4}\", \"{}\"]", lab.pod("client").v6),
        &format!("ips: \"{v4}\""),
        1,
    );
    assert_ne!(as_string, good);
    lab.daemon().write_pods(&as_string).unwrap();
    still_served(&mut lab, "ips as a string");

    // An empty file and a bare `pods:`: reported, nothing removed.
    for (what, text) in [("empty", ""), ("bare pods:", "pods:\n")] {
        lab.daemon().write_pods(text).unwrap();
        let st = lab
            .daemon()
            .wait_status("the file reported", |s| s.file_error.is_some())
            .unwrap();
        assert!(
            st.file_error
                .as_deref()
                .unwrap_or_default()
                .contains("pods: []"),
            "{st:#?}"
        );
        still_served(&mut lab, what);
    }

    // The same name twice, the second pointing at another pod's namespace: neither is
    // applied and `client` stays where it was.
    let dup = format!(
        "{good}{}",
        lab.pod("ext")
            .yaml_entry(&[])
            .replace("name: ext", "name: client")
    );
    lab.daemon().write_pods(&dup).unwrap();
    let st = lab
        .daemon()
        .wait_status("the duplicate reported", |s| {
            s.rejected.iter().any(|r| r.contains("duplicate pod"))
        })
        .unwrap();
    assert!(st.pod("ext").is_none());
    still_served(&mut lab, "a duplicate name");
    let direct = connect(&lab, "ext");
    assert!(direct.error.is_none(), "ext is not in the mesh: {direct:?}");

    // Rewritten in place as a shell's `>` does (truncate, then write), the file caught
    // half-written (only `client` listed) for a few milliseconds, 20 times: `other` is never
    // removed.
    lab.daemon().write_pods(&good).unwrap();
    lab.daemon()
        .wait_status("the good file back", |s| {
            s.rejected.is_empty() && s.file_error.is_none()
        })
        .unwrap();
    let path = lab.dir.join(format!("{}.pods.yaml", lab.id));
    let half = pods_yaml(&[lab.pod("client").yaml_entry(&[])]);
    for _ in 0..20 {
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(half.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        f.write_all(&good.as_bytes()[half.len()..]).unwrap();
        drop(f);
        std::thread::sleep(Duration::from_millis(30));
    }
    still_served(&mut lab, "rewrites in place");
    let log = lab.daemon().log_text();
    assert!(!log.contains("removed from the mesh"), "{log}");

    // A process of the node's own network namespace (here: a `sleep` as nobody, beside the
    // daemon) named as a pod is refused, naming why.
    let host = KillOnDrop(
        std::process::Command::new("sleep")
            .arg("120")
            .uid(65534)
            .spawn()
            .expect("sleep"),
    );
    let node = format!(
        "{good}  - name: node\n    namespace: lab\n    pid: {}\n",
        host.0.id()
    );
    lab.daemon().write_pods(&node).unwrap();
    let st = lab
        .daemon()
        .wait_status("the node's namespace refused", |s| {
            s.rejected.iter().any(|r| {
                r.contains("pod lab/node")
                    && r.contains("own network namespace")
                    && r.contains(": refused")
            })
        })
        .unwrap();
    assert!(st.pod("node").is_none(), "{st:#?}");
    still_served(&mut lab, "the node's namespace listed");
}

/// A child process killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `raw-sniff` in `ext` in the background, then `raw-syn` from `pod` via `via`; returns
/// (the sender's error, whether `ext` saw the SYN).
fn raw_syn(lab: &Lab, pod: &str, via: &str, from_port: u16) -> (Option<String>, bool) {
    let lab_bin = redirect_lab::bin("redirect-lab");
    let lab_bin = lab_bin.to_str().unwrap();
    let from = from_port.to_string();
    let seen = std::thread::scope(|s| {
        let sniff = s.spawn(|| {
            lab.run_in(
                "ext",
                None,
                lab_bin,
                &[
                    "raw-sniff",
                    "--port",
                    "8080",
                    "--from-port",
                    &from,
                    "--timeout-ms",
                    "2000",
                ],
            )
            .unwrap()
        });
        std::thread::sleep(Duration::from_millis(300));
        let source = format!("{}:{from_port}", lab.pod(pod).v4);
        let target = format!("{}:8080", lab.pod("ext").v4);
        let sent = lab
            .run_in(
                pod,
                None,
                lab_bin,
                &[
                    "raw-syn", "--source", &source, "--target", &target, "--via", via,
                ],
            )
            .unwrap();
        let sent: serde_json::Value = serde_json::from_str(sent.trim()).unwrap();
        let seen: serde_json::Value = serde_json::from_str(sniff.join().unwrap().trim()).unwrap();
        (
            sent["error"].as_str().map(String::from),
            seen["seen"] == true,
        )
    });
    seen
}

/// A mesh pod's process with CAP_NET_RAW cannot write its own TCP SYN around the sidecar:
/// neither through a raw TCP socket nor through IP_HDRINCL; a pod outside the mesh can (the
/// control: the test sees the SYN arrive).
#[test]
fn raw_sockets_cannot_go_around_capture() {
    let mut lab = lab();
    for p in ["client", "plain", "ext"] {
        lab.add_pod(p).unwrap();
    }
    lab.start_server("ext", &[8080]).unwrap();
    lab.start_sidecar("client").unwrap();
    lab.start_daemon(&pods_yaml(&[lab.pod("client").yaml_entry(&[])]), &[])
        .unwrap();
    lab.daemon().wait_pods(&["client"]).unwrap();

    let (err, seen) = raw_syn(&lab, "plain", "tcp-raw", 4242);
    assert!(err.is_none() && seen, "control: {err:?} seen {seen}");
    let (err, seen) = raw_syn(&lab, "plain", "icmp-hdrincl", 4243);
    assert!(err.is_none() && seen, "control: {err:?} seen {seen}");

    let (err, seen) = raw_syn(&lab, "client", "tcp-raw", 4244);
    assert!(!seen, "a raw TCP socket's SYN left the mesh pod");
    let err = err.unwrap_or_default();
    assert!(
        err.starts_with("socket") && err.contains("not permitted"),
        "{err}"
    );
    let (err, seen) = raw_syn(&lab, "client", "icmp-hdrincl", 4245);
    assert!(!seen, "an IP_HDRINCL SYN left the mesh pod");
    let err = err.unwrap_or_default();
    assert!(
        err.starts_with("IP_HDRINCL") && err.contains("not permitted"),
        "{err}"
    );

    // Ping's kind of raw socket still works in the mesh pod.
    let ping = lab.run_in(
        "client",
        None,
        "ping",
        &["-c", "1", "-W", "2", &lab.pod("ext").v4.to_string()],
    );
    assert!(ping.is_ok(), "{ping:?}");
    let st = lab.daemon().pod_status("client").unwrap();
    assert_eq!(st.counter("raw_denied"), 2, "{st:?}");
}
