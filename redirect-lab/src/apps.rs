//! What runs in the lab's pods: the sidecar, servers, clients, the lab's measuring tools,
//! and the daemon.

use std::{sync::atomic::Ordering, time::Duration};

use anyhow::{bail, Context as _, Result};

use crate::{
    bin, echo, envoy, eventually, perf, run, spawn, which, wire, Daemon, Lab, Netns, Placement,
    Proc, NEXT, PROXY_UID,
};

impl Lab {
    /// Starts a lab binary subcommand in a pod (as `uid`, if given). Returns its index in
    /// `self.procs`.
    pub fn spawn_in(
        &mut self,
        pod: &str,
        uid: Option<u32>,
        tag: &str,
        args: &[&str],
    ) -> Result<usize> {
        self.spawn_path(pod, uid, tag, &bin("redirect-lab"), args)
    }

    fn spawn_path(
        &mut self,
        pod: &str,
        uid: Option<u32>,
        tag: &str,
        program: &std::path::Path,
        args: &[&str],
    ) -> Result<usize> {
        let log = self.dir.join(format!("{pod}-{tag}.log"));
        let mut placement = self.pod(pod).placement();
        placement.uid = uid;
        let p = spawn(placement, &log, program, args)?;
        self.procs.push(p);
        Ok(self.procs.len() - 1)
    }

    /// Starts any program in a pod (as `uid`, if given): a DNS server, say. Returns its index
    /// in `self.procs`; it is killed with the lab.
    pub fn spawn_program(
        &mut self,
        pod: &str,
        uid: Option<u32>,
        tag: &str,
        program: &str,
        args: &[&str],
    ) -> Result<usize> {
        self.spawn_path(pod, uid, tag, &which(program)?, args)
    }

    /// One DNS query for `name`'s A record from a pod (as `uid`), to `server` (`addr:port`),
    /// over `transport` (`connected`, `sendto`, `sendmmsg` or `tcp`): what the application saw.
    pub fn dns_query(
        &self,
        pod: &str,
        uid: Option<u32>,
        server: &str,
        name: &str,
        transport: &str,
    ) -> Result<wire::DnsResult> {
        let mut placement = self.pod(pod).placement();
        placement.uid = uid;
        let args = ["--server", server, "--name", name, "--transport", transport];
        let mut r: Vec<wire::DnsResult> = self.tool(placement, "dns-query", &args)?;
        r.pop().context("dns-query printed nothing")
    }

    /// Starts the sidecar in a pod: Envoy (see [`Lab::start_envoy`]), as uid 1337, and waits
    /// until it listens.
    pub fn start_sidecar(&mut self, pod: &str) -> Result<usize> {
        self.start_envoy(pod)
    }

    /// Starts the lab's small proxy as the sidecar (the benchmark's `--sidecar lab`).
    pub fn start_lab_sidecar(&mut self, pod: &str) -> Result<usize> {
        self.start_sidecar_with(pod, &[])
    }

    /// Starts the lab's small proxy as the sidecar with extra `proxy` arguments, for faults
    /// Envoy cannot make (e.g. `--answer-delay-ms`, a late `SO_ORIGINAL_DST`).
    pub fn start_sidecar_with(&mut self, pod: &str, extra: &[&str]) -> Result<usize> {
        let mut args = vec!["proxy"];
        args.extend_from_slice(extra);
        let i = self.spawn_in(pod, Some(PROXY_UID), "sidecar", &args)?;
        self.wait_listening(pod, 15001)?;
        Ok(i)
    }

    /// Starts HAProxy (Debian's) as the pod's sidecar, as uid 1337: TCP listeners on 15001
    /// (outbound) and 15006 (inbound) that forward to the connection's original destination
    /// (`server 0.0.0.0:0`, which HAProxy finds with `SO_ORIGINAL_DST`), inbound from
    /// 127.0.0.6 as Istio's sidecar does. With `splice`, HAProxy forwards with `splice(2)`
    /// both ways (`option splice-request` and `splice-response`), as proxies tuned for
    /// throughput do.
    pub fn start_haproxy(&mut self, pod: &str, splice: bool) -> Result<usize> {
        let haproxy = which("haproxy").context(
            "HAProxy is missing: `cargo xtask setup` installs Debian's haproxy (its service is not started)",
        )?;
        let options = if splice {
            "    option splice-request\n    option splice-response\n"
        } else {
            ""
        };
        // maxconn 256: HAProxy, not root, must fit its connections in the descriptors it is
        // given (1,024 on the kernel matrix's guests: a larger maxconn refuses to start).
        let config = format!(
            "global\n    maxconn 256\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n{options}\
             frontend outbound\n    bind 0.0.0.0:15001\n    default_backend original\n\
             frontend inbound\n    bind 0.0.0.0:15006\n    default_backend inbound_original\n\
             backend original\n    server original 0.0.0.0:0\n\
             backend inbound_original\n    source 127.0.0.6\n    server original 0.0.0.0:0\n"
        );
        let path = self.dir.join(format!("{pod}-haproxy.cfg"));
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        let path = path.to_str().context("non-UTF-8 path")?.to_string();
        let i = self.spawn_path(
            pod,
            Some(PROXY_UID),
            "haproxy",
            &haproxy,
            &["-db", "-f", &path],
        )?;
        self.wait_listening(pod, 15001)?;
        self.wait_listening(pod, 15006)?;
        Ok(i)
    }

    /// Starts Envoy as the pod's sidecar (Istio's listener shapes, see [`crate::envoy`]), as
    /// uid 1337, and waits until its outbound, inbound and health listeners listen.
    pub fn start_envoy(&mut self, pod: &str) -> Result<usize> {
        self.start_envoy_in(pod, envoy::Mode::Redirect)
    }

    /// [`Lab::start_envoy`] in either interception mode: in TPROXY mode as Istio runs it
    /// there, uid 0 and gid 1337 (through `setpriv`), with a transparent inbound listener.
    pub fn start_envoy_in(&mut self, pod: &str, mode: envoy::Mode) -> Result<usize> {
        self.start_envoy_shaped(pod, mode, &envoy::ISTIO)
    }

    /// Envoy as another mesh's sidecar: its listener ports and uid ([`envoy::Shape`]).
    pub fn start_envoy_shaped(
        &mut self,
        pod: &str,
        mode: envoy::Mode,
        shape: &envoy::Shape,
    ) -> Result<usize> {
        let p = self.pod(pod);
        let config = self.dir.join(format!("{pod}-envoy.json"));
        let bootstrap = envoy::bootstrap_shaped(&p.v4.to_string(), &p.v6.to_string(), mode, shape);
        std::fs::write(&config, serde_json::to_vec_pretty(&bootstrap)?)
            .with_context(|| format!("writing {}", config.display()))?;
        let log = self.dir.join(format!("{pod}-envoy.log"));
        let mut placement = p.placement();
        let binary = envoy::binary();
        let mut args = envoy::args(&config);
        let program = match mode {
            envoy::Mode::Redirect => {
                placement.uid = Some(shape.uid);
                binary
            }
            envoy::Mode::Tproxy => {
                let gid = PROXY_UID.to_string();
                let mut wrapped = ["--regid", &gid, "--clear-groups", "--"]
                    .map(String::from)
                    .to_vec();
                wrapped.push(binary.display().to_string());
                wrapped.append(&mut args);
                args = wrapped;
                which("setpriv")?
            }
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = spawn(placement, &log, &program, &args)?;
        self.procs.push(proc);
        for port in [shape.outbound, shape.inbound, shape.health] {
            self.wait_listening(pod, port)
                .with_context(|| self.procs.last().map(Proc::log_text).unwrap_or_default())?;
        }
        Ok(self.procs.len() - 1)
    }

    /// Envoy's access-log records once its log stops growing: Envoy logs a connection when it
    /// closes and flushes every 10 ms, so a connection that just ended is logged a little
    /// later (read until two reads 40 ms apart agree, at most 2 s).
    pub fn envoy_log_settled(&self, proc_index: usize) -> Vec<wire::EnvoyRecord> {
        let proc = &self.procs[proc_index];
        let mut last = usize::MAX;
        for _ in 0..50 {
            let n = proc.log_text().len();
            if n == last {
                break;
            }
            last = n;
            std::thread::sleep(Duration::from_millis(40));
        }
        self.envoy_log(proc_index)
    }

    /// The lab's cgroup, in no pod's namespace, as root.
    pub fn cgroup_placement(&self) -> Placement<'_> {
        Placement {
            netns: None,
            cgroup: Some(&self.cgroup),
            uid: None,
        }
    }

    /// Runs any program at `placement` to completion; returns its stdout and stderr.
    pub fn run_at(&self, placement: Placement<'_>, program: &str, args: &[&str]) -> Result<String> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let log = self.dir.join(format!("run-{n}.log"));
        let mut p = spawn(placement, &log, &which(program)?, args)?;
        let status = p.child.wait()?;
        let text = p.log_text();
        if !status.success() {
            bail!("{program} {args:?} failed ({status}): {text}");
        }
        Ok(text)
    }

    /// What a process started by the lab has printed so far (stdout and stderr).
    pub fn proc_log(&self, proc_index: usize) -> String {
        self.procs[proc_index].log_text()
    }

    /// Envoy's settled access-log records after the first `n`: what it logged since a count
    /// taken with [`Lab::envoy_log`].
    pub fn envoy_log_since(&self, proc_index: usize, n: usize) -> Vec<wire::EnvoyRecord> {
        self.envoy_log_settled(proc_index).split_off(n)
    }

    /// Envoy's access-log records so far (the process at `proc_index`).
    pub fn envoy_log(&self, proc_index: usize) -> Vec<wire::EnvoyRecord> {
        self.procs[proc_index]
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Starts the test server in a pod on `ports` and waits until it listens.
    pub fn start_server(&mut self, pod: &str, ports: &[u16]) -> Result<usize> {
        let mut args = vec!["server".to_string()];
        for p in ports {
            args.push("--port".into());
            args.push(p.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let i = self.spawn_in(pod, None, "server", &args)?;
        for p in ports {
            self.wait_listening(pod, *p)?;
        }
        Ok(i)
    }

    /// Starts the echo server in a pod and waits until it listens.
    pub fn start_echo_server(
        &mut self,
        pod: &str,
        port: u16,
        reset_after: Option<u64>,
    ) -> Result<usize> {
        let port_s = port.to_string();
        let mut args = vec!["echo-server", "--port", &port_s];
        let reset;
        if let Some(r) = reset_after {
            reset = r.to_string();
            args.extend(["--reset-after", &reset]);
        }
        let i = self.spawn_in(pod, None, &format!("echo{port}"), &args)?;
        self.wait_listening(pod, port)?;
        Ok(i)
    }

    /// Runs the echo client in a pod; one result per stream.
    pub fn echo(&self, pod: &str, args: &[&str]) -> Result<Vec<echo::EchoResult>> {
        self.tool(self.pod(pod).placement(), "echo-client", args)
    }

    /// Runs one benchmark workload (`perf-client`) in a pod.
    pub fn perf(&self, pod: &str, args: &[&str]) -> Result<perf::Measured> {
        let mut results = self.tool(self.pod(pod).placement(), "perf-client", args)?;
        results.pop().context("perf-client printed no result")
    }

    /// Runs `redirect-lab <subcommand> <args>` at `placement` to completion and parses the
    /// JSON object it prints on each line.
    /// Runs a lab binary subcommand at `placement` to completion; returns its JSON lines.
    pub fn tool<T: serde::de::DeserializeOwned>(
        &self,
        placement: Placement<'_>,
        subcommand: &str,
        args: &[&str],
    ) -> Result<Vec<T>> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let log = self.dir.join(format!("{subcommand}-{n}.log"));
        let mut all = vec![subcommand];
        all.extend_from_slice(args);
        let mut p = spawn(placement, &log, &bin("redirect-lab"), &all)?;
        let status = p.child.wait()?;
        let text = p.log_text();
        if !status.success() {
            bail!("{subcommand} {args:?} failed ({status}): {text}");
        }
        text.lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).with_context(|| format!("{subcommand} output {l:?}")))
            .collect()
    }

    /// Packets sent and received so far on `dev` in a namespace (`ip -s -j link`).
    pub fn link_packets(ns: &Netns, dev: &str) -> Result<u64> {
        let out = run(
            "ip",
            &["-n", &ns.name, "-s", "-j", "link", "show", "dev", dev],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let stats = &v[0]["stats64"];
        let n = stats["rx"]["packets"].as_u64().context("no rx packets")?
            + stats["tx"]["packets"].as_u64().context("no tx packets")?;
        Ok(n)
    }

    /// Waits until something in the pod listens on TCP `port`.
    pub fn wait_listening(&self, pod: &str, port: u16) -> Result<()> {
        Self::wait_listening_in(&self.pod(pod).netns, port)
    }

    /// Waits until something in the namespace listens on TCP `port`.
    pub fn wait_listening_in(ns: &Netns, port: u16) -> Result<()> {
        let filter = format!("sport = :{port}");
        eventually(
            Duration::from_secs(10),
            &format!("a listener on port {port} in {}", ns.name),
            || {
                let out = ns.exec(&["ss", "-Htln", &filter]).ok()?;
                (!out.trim().is_empty()).then_some(())
            },
        )
    }

    /// Starts a lab binary subcommand at any placement (a CNI sandbox). Returns its index in
    /// `self.procs`.
    pub fn spawn_at(
        &mut self,
        placement: Placement<'_>,
        tag: &str,
        args: &[&str],
    ) -> Result<usize> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let log = self.dir.join(format!("{tag}-{n}.log"));
        let p = spawn(placement, &log, &bin("redirect-lab"), args)?;
        self.procs.push(p);
        Ok(self.procs.len() - 1)
    }

    /// Runs the lab client in a pod (or, with `pod` None, on the host in the lab's cgroup)
    /// to completion and returns one result per connection.
    pub fn client(
        &self,
        pod: Option<&str>,
        uid: Option<u32>,
        args: &[&str],
    ) -> Result<Vec<wire::ClientResult>> {
        let mut placement = match pod {
            Some(p) => self.pod(p).placement(),
            None => self.cgroup_placement(),
        };
        placement.uid = uid;
        self.client_at(placement, args)
    }

    /// Runs the lab client at any placement (e.g. the node or the remote node namespace).
    pub fn client_at(
        &self,
        placement: Placement<'_>,
        args: &[&str],
    ) -> Result<Vec<wire::ClientResult>> {
        self.tool(placement, "client", args)
    }

    /// Runs any program in a pod's cgroup and netns (as `uid`, if given) to completion and
    /// returns its stdout and stderr. `ip netns exec` would not do: it leaves the caller's
    /// cgroup, where the programs are not attached.
    pub fn run_in(
        &self,
        pod: &str,
        uid: Option<u32>,
        program: &str,
        args: &[&str],
    ) -> Result<String> {
        let mut placement = self.pod(pod).placement();
        placement.uid = uid;
        self.run_at(placement, program, args)
            .with_context(|| format!("in pod {pod}"))
    }

    /// What a sidecar logged, one record per connection its outbound or inbound listener
    /// took (Envoy's access log mapped to the lab sidecar's records).
    pub fn sidecar_log(&self, proc_index: usize) -> Vec<wire::ProxyRecord> {
        let proc = &self.procs[proc_index];
        if !proc.log.to_string_lossy().ends_with("-envoy.log") {
            return proc
                .log_text()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
        }
        self.envoy_log_settled(proc_index)
            .iter()
            .filter_map(wire::EnvoyRecord::as_proxy_record)
            .collect()
    }
    /// Starts `redirectd run` for this lab: attached to the lab's cgroup, pinned under a pin
    /// dir of its own, following a pods file in the lab directory.
    pub fn start_daemon(&mut self, pods_yaml: &str, extra: &[&str]) -> Result<()> {
        let d = Daemon::start(&self.id, &self.dir, &self.cgroup.path, pods_yaml, extra)?;
        self.daemon = Some(d);
        Ok(())
    }

    pub fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("daemon not started")
    }
}
