//! DNS capture (Istio's `ISTIO_META_DNS_CAPTURE`), on the real kernel, with real DNS servers
//! from Debian: dnsmasq as the agent's DNS proxy in the mesh pod (uid 1337, 127.0.0.1:15053
//! and [::1]:15053, knowing one name of its own and forwarding the rest) and dnsmasq as the
//! upstream server in another pod (port 53, and port 5353 for "another port"). The names
//! resolve differently at the agent (10.9.9.9) and upstream (10.7.7.7), so every answer says
//! who answered.
//!
//! Run twice, side by side: under Istio's own DNS rules (`istio-iptables` with DNS capture,
//! as istio-cni installs them) and under redirectd; every query must see the same answer
//! from the same source. Then what only redirectd is asked for: the per-pod switch, glibc's
//! resolver (`getent`, through `getaddrinfo`), `dig` over UDP and TCP.

use redirect_lab::{
    istio_iptables::{self, Options},
    wire::DnsResult,
    Lab, PROXY_UID,
};
use redirect_tests::{lab, pods_yaml};

/// Only the agent knows this name (upstream it is another address).
const AGENT_NAME: &str = "agent-only.test";
const AT_AGENT: &str = "10.9.9.9";
const UPSTREAM_ANSWER: &str = "10.7.7.7";
/// Known upstream only: the agent forwards it, its own query going direct.
const UPSTREAM_NAME: &str = "upstream.test";
const AT_UPSTREAM: &str = "10.8.8.8";
/// What the upstream's second server, on port 5353, answers (not DNS's port: never captured).
const AT_5353: &str = "10.6.6.6";

fn dnsmasq_args(pid: &str, port: &str, listen: &[String], extra: &[String]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--log-queries",
        "--log-facility=-",
        "--user=root",
        "--group=root",
    ]
    .map(String::from)
    .to_vec();
    a.push(format!("--pid-file={pid}"));
    a.push(format!("--port={port}"));
    a.extend(listen.iter().map(|l| format!("--listen-address={l}")));
    a.extend_from_slice(extra);
    a
}

/// The lab: `app` (mesh, DNS capture), `mesh` (mesh, no DNS capture), `ext` (upstream
/// servers, no sidecar). Returns the lab and the agent's process index.
fn build() -> (Lab, usize) {
    let mut lab = lab();
    for p in ["app", "mesh", "ext"] {
        lab.add_pod(p).unwrap();
    }
    let (ext_v4, ext_v6) = (lab.pod("ext").v4, lab.pod("ext").v6);
    let listen = vec![ext_v4.to_string(), ext_v6.to_string()];
    for (tag, port, answers) in [
        (
            "upstream",
            "53",
            vec![
                format!("--address=/{AGENT_NAME}/{UPSTREAM_ANSWER}"),
                format!("--address=/{UPSTREAM_NAME}/{AT_UPSTREAM}"),
            ],
        ),
        (
            "upstream5353",
            "5353",
            vec![format!("--address=/{AGENT_NAME}/{AT_5353}")],
        ),
    ] {
        let pid = lab.dir.join(format!("{tag}.pid"));
        let args = dnsmasq_args(&pid.to_string_lossy(), port, &listen, &answers);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.spawn_program("ext", None, tag, "dnsmasq", &args)
            .unwrap();
        lab.wait_listening("ext", port.parse().unwrap()).unwrap();
    }
    // The agent: as the proxy's uid, so its own upstream queries are never captured.
    let pid = lab.dir.join("agent.pid");
    let args = dnsmasq_args(
        &pid.to_string_lossy(),
        "15053",
        &["127.0.0.1".into(), "::1".into()],
        &[
            format!("--address=/{AGENT_NAME}/{AT_AGENT}"),
            format!("--server={ext_v4}"),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = lab
        .spawn_program("app", Some(PROXY_UID), "agent", "dnsmasq", &args)
        .unwrap();
    lab.wait_listening("app", 15053).unwrap();
    (lab, agent)
}

/// One query of the side-by-side set.
struct Query {
    what: &'static str,
    uid: Option<u32>,
    v6: bool,
    port: u16,
    name: &'static str,
    transport: &'static str,
}

fn queries() -> Vec<Query> {
    let q = |what, uid, v6, port, name, transport| Query {
        what,
        uid,
        v6,
        port,
        name,
        transport,
    };
    vec![
        q("connected UDP", None, false, 53, AGENT_NAME, "connected"),
        q("sendto", None, false, 53, AGENT_NAME, "sendto"),
        q("sendmmsg", None, false, 53, AGENT_NAME, "sendmmsg"),
        q("TCP", None, false, 53, AGENT_NAME, "tcp"),
        q(
            "IPv6, connected UDP",
            None,
            true,
            53,
            AGENT_NAME,
            "connected",
        ),
        q("IPv6, sendto", None, true, 53, AGENT_NAME, "sendto"),
        q("IPv6, TCP", None, true, 53, AGENT_NAME, "tcp"),
        q(
            "forwarded by the agent",
            None,
            false,
            53,
            UPSTREAM_NAME,
            "sendto",
        ),
        q(
            "the proxy's own query",
            Some(PROXY_UID),
            false,
            53,
            AGENT_NAME,
            "connected",
        ),
        q(
            "the proxy's own, TCP",
            Some(PROXY_UID),
            false,
            53,
            AGENT_NAME,
            "tcp",
        ),
        q("port 5353", None, false, 5353, AGENT_NAME, "sendto"),
    ]
}

fn ask(lab: &Lab, pod: &str, q: &Query) -> DnsResult {
    let ext = lab.pod("ext");
    let server = if q.v6 {
        format!("[{}]:{}", ext.v6, q.port)
    } else {
        format!("{}:{}", ext.v4, q.port)
    };
    lab.dns_query(pod, q.uid, &server, q.name, q.transport)
        .unwrap()
}

/// What a query should see: from the server asked, answered by the agent unless the caller
/// is the proxy or the port is not 53.
fn expected(lab: &Lab, q: &Query, captured: bool) -> DnsResult {
    let ext = lab.pod("ext");
    let from = if q.v6 {
        format!("[{}]:{}", ext.v6, q.port)
    } else {
        format!("{}:{}", ext.v4, q.port)
    };
    let answer = match (q.name, q.port, captured && q.uid.is_none()) {
        (UPSTREAM_NAME, _, _) => AT_UPSTREAM,
        (_, 5353, _) => AT_5353,
        (_, _, true) => AT_AGENT,
        _ => UPSTREAM_ANSWER,
    };
    DnsResult {
        answers: vec![answer.to_string()],
        rcode: 0,
        from: Some(from),
        error: None,
    }
}

fn dns_pods(lab: &Lab) -> String {
    pods_yaml(&[
        lab.pod("app")
            .yaml_entry(&[("redirectd.dev/dnsCapture", "true")]),
        lab.pod("mesh").yaml_entry(&[]),
    ])
}

#[test]
fn same_answers_as_istio_dns_capture_and_as_expected() {
    let (mut lab, agent) = build();
    let options = Options {
        dns_capture: true,
        ..Default::default()
    };
    // The reference: Istio's rules in the app pod.
    istio_iptables::install(&lab.pod("app").netns, &options).unwrap();
    let reference: Vec<DnsResult> = queries().iter().map(|q| ask(&lab, "app", q)).collect();
    istio_iptables::remove(&lab.pod("app").netns).unwrap();
    // redirectd.
    lab.start_daemon(&dns_pods(&lab), &[]).unwrap();
    lab.daemon().wait_pods(&["app", "mesh"]).unwrap();
    let ours: Vec<DnsResult> = queries().iter().map(|q| ask(&lab, "app", q)).collect();
    let mut differences = Vec::new();
    for ((q, a), b) in queries().iter().zip(&reference).zip(&ours) {
        let want = expected(&lab, q, true);
        println!(
            "{:28} istio-iptables {a:?}\n{:28} redirectd      {b:?}",
            q.what, ""
        );
        if a != b || *b != want {
            differences.push(format!(
                "{}: istio-iptables {a:?}, redirectd {b:?}, expected {want:?}",
                q.what
            ));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    // The agent saw the application's queries, never its own forwarded ones as a client.
    let log = lab.proc_log(agent);
    assert!(log.contains(&format!("query[A] {AGENT_NAME}")), "{log}");
    // The per-pod switch: a mesh pod without DNS capture asks upstream directly over UDP (its
    // TCP to port 53 is ordinary outbound capture, to the sidecar, which this lab leaves out).
    for q in queries()
        .iter()
        .filter(|q| q.uid.is_none() && q.transport != "tcp")
    {
        let got = ask(&lab, "mesh", q);
        assert_eq!(
            got,
            expected(&lab, q, false),
            "{} from the pod without",
            q.what
        );
    }
}

#[test]
fn real_resolvers_get_the_agents_answer() {
    let (mut lab, _agent) = build();
    lab.start_daemon(&dns_pods(&lab), &[]).unwrap();
    lab.daemon().wait_pods(&["app", "mesh"]).unwrap();
    let (ext_v4, ext_v6) = (lab.pod("ext").v4, lab.pod("ext").v6);
    let lab_bin = redirect_lab::bin("redirect-lab");
    let lab_bin = lab_bin.to_string_lossy();
    // glibc's getaddrinfo (and, below, musl's), with the pod's resolv.conf naming the
    // upstream server (each family's server in turn for glibc).
    let resolve = |pod: &str, ns: &str, program: &str, args: &[&str]| -> String {
        let mut all = vec!["with-resolv-conf", "--nameserver", ns, "--", program];
        all.extend_from_slice(args);
        lab.run_in(pod, None, &lab_bin, &all).unwrap()
    };
    for ns in [ext_v4.to_string(), ext_v6.to_string()] {
        for (pod, want) in [("app", AT_AGENT), ("mesh", UPSTREAM_ANSWER)] {
            let out = resolve(pod, &ns, "getent", &["ahostsv4", AGENT_NAME]);
            assert!(
                out.contains(want),
                "glibc in {pod} via {ns} resolved {AGENT_NAME} to: {out}"
            );
        }
    }
    // musl's getaddrinfo (unconnected sendto/recvfrom, the reply's source checked against the
    // nameserver), from a static binary built here with musl-gcc.
    let musl = lab.dir.join("resolve-musl");
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("c/resolve.c");
    redirect_lab::run(
        "musl-gcc",
        &[
            "-static",
            "-O2",
            "-o",
            &musl.to_string_lossy(),
            &source.to_string_lossy(),
        ],
    )
    .unwrap();
    for (pod, want) in [("app", AT_AGENT), ("mesh", UPSTREAM_ANSWER)] {
        let out = resolve(
            pod,
            &ext_v4.to_string(),
            &musl.to_string_lossy(),
            &[AGENT_NAME],
        );
        assert_eq!(out.trim(), want, "musl in {pod}");
    }
    // dig, over UDP and TCP, IPv4 and IPv6.
    for server in [ext_v4.to_string(), ext_v6.to_string()] {
        for tcp in [false, true] {
            let at = format!("@{server}");
            let mut args = vec![at.as_str(), AGENT_NAME, "+short", "+tries=2", "+time=2"];
            if tcp {
                args.push("+tcp");
            }
            let out = lab.run_in("app", None, "dig", &args).unwrap();
            assert_eq!(out.trim(), AT_AGENT, "dig {args:?}");
        }
    }
}

/// One pod with DNS capture sending queries from 20,000 fresh UDP sockets while another pod's
/// query waits in its socket: the other pod's reply still shows the server it asked (entries
/// go when their socket closes; no pod evicts another's). Past its share of open DNS sockets
/// (1,024), a pod's further queries are refused, and the other pod is still served.
#[test]
fn one_pods_dns_flood_never_breaks_another_pods_lookups() {
    let (mut lab, _agent) = build();
    lab.add_pod("flood").unwrap();
    let capture = [("redirectd.dev/dnsCapture", "true")];
    let yaml = pods_yaml(&[
        lab.pod("app").yaml_entry(&capture),
        lab.pod("flood").yaml_entry(&capture),
    ]);
    lab.start_daemon(&yaml, &[]).unwrap();
    lab.daemon().wait_pods(&["app", "flood"]).unwrap();
    let server = format!("{}:53", lab.pod("ext").v4);
    let lab_bin = redirect_lab::bin("redirect-lab");
    let lab_bin = lab_bin.to_string_lossy();
    let query = |delay: &str| {
        let out = lab
            .run_in(
                "app",
                None,
                &lab_bin,
                &[
                    "dns-query",
                    "--server",
                    &server,
                    "--name",
                    AGENT_NAME,
                    "--transport",
                    "sendto",
                    "--read-delay-ms",
                    delay,
                ],
            )
            .unwrap();
        serde_json::from_str::<DnsResult>(out.trim()).unwrap()
    };
    let flood = |count: &str, hold: bool| {
        let mut args = vec!["dns-flood", "--server", &server, "--count", count];
        if hold {
            args.push("--hold");
        }
        let out = lab.run_in("flood", None, &lab_bin, &args).unwrap();
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()
    };
    let want = DnsResult {
        answers: vec![AT_AGENT.to_string()],
        rcode: 0,
        from: Some(server.clone()),
        error: None,
    };
    let (victim, flooded) = std::thread::scope(|s| {
        let victim = s.spawn(|| query("3000"));
        std::thread::sleep(std::time::Duration::from_millis(300));
        let flooded = flood("20000", false);
        (victim.join().unwrap(), flooded)
    });
    assert_eq!(flooded["sent"], 20_000, "{flooded}");
    assert_eq!(victim, want, "the app's reply after the flood");

    let held = flood("1100", true);
    assert_eq!(held["sent"], 1_024, "{held}");
    assert_eq!(held["refused"], 76, "{held}");
    assert_eq!(query("0"), want, "the app's query after the held flood");
    let st = lab.daemon().pod_status("flood").unwrap();
    assert!(st.counter("outbound_fail_closed") >= 76, "{st:?}");
}
