//! A `redirectd` run by the lab, stopped and uninstalled with its guard.

use std::{
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{bin, eventually, process::spawn_bounded, run, Placement, PodReport, Proc, Report};

/// A running `redirectd`; on drop it is stopped and `redirectd uninstall` removes its pins.
pub struct Daemon {
    pub proc: Option<Proc>,
    pub pin_dir: PathBuf,
    pub pods_file: PathBuf,
    pub status_file: PathBuf,
    pub cgroup: PathBuf,
    log: PathBuf,
    extra: Vec<String>,
    /// The executable started by [`Daemon::restart`] (the build's `redirectd` unless
    /// [`Daemon::upgrade_to`] changed it) and its `--log-level`.
    binary: PathBuf,
    log_level: String,
    /// The capability bounding set [`Daemon::restart`] starts it with (a mask; `None`: the
    /// lab's own), as a container given exactly those capabilities would.
    pub bounding: Option<u64>,
}

impl Daemon {
    /// Starts a daemon named `id` (its pin dir `/sys/fs/bpf/<id>`, its files `<dir>/<id>.*`)
    /// attached to `cgroup`. A lab normally has one ([`Lab::start_daemon`]); a second one, on
    /// another cgroup, plays another node's daemon.
    pub fn start(
        id: &str,
        dir: &Path,
        cgroup: &Path,
        pods_yaml: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let mut d = Self {
            proc: None,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{id}")),
            pods_file: dir.join(format!("{id}.pods.yaml")),
            status_file: dir.join(format!("{id}.status.json")),
            cgroup: cgroup.to_path_buf(),
            log: dir.join(format!("{id}.redirectd.log")),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            binary: bin("redirectd"),
            log_level: "info".into(),
            bounding: None,
        };
        d.write_pods(pods_yaml)?;
        d.restart()?;
        Ok(d)
    }

    /// (Re)starts the daemon process and waits until its first pass is written.
    pub fn restart(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(&self.status_file);
        let mut args: Vec<String> =
            vec!["--log-level".into(), self.log_level.clone(), "run".into()];
        // `--kubernetes` in the extra arguments replaces the pods file as the source.
        if !self.extra.iter().any(|a| a == "--kubernetes") {
            args.extend(["--pods".into(), self.pods_file.display().to_string()]);
        }
        args.extend([
            "--cgroup".into(),
            self.cgroup.display().to_string(),
            "--pin-dir".into(),
            self.pin_dir.display().to_string(),
            "--status-file".into(),
            self.status_file.display().to_string(),
            "--poll-ms".into(),
            "20".into(),
        ]);
        args.extend(self.extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = spawn_bounded(
            Placement::default(),
            self.bounding,
            &self.log,
            &self.binary,
            &args,
        )?;
        self.proc = Some(p);
        let proc = &mut self.proc;
        let started = eventually(Duration::from_secs(20), "redirectd's first pass", || {
            if let Some(p) = proc.as_mut() {
                if let Ok(Some(status)) = p.child.try_wait() {
                    return Some(Err(anyhow::anyhow!(
                        "redirectd exited ({status}): {}",
                        p.log_text()
                    )));
                }
            }
            self.status_file.exists().then_some(Ok(()))
        });
        started.with_context(|| std::fs::read_to_string(&self.log).unwrap_or_default())??;
        Ok(())
    }

    /// The running daemon's pid.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replaces the pods file atomically (write + rename), as a careful operator would.
    pub fn write_pods(&self, yaml: &str) -> Result<()> {
        let tmp = self.pods_file.with_extension("tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(yaml.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.pods_file)?;
        Ok(())
    }

    /// `redirectd status --json`.
    pub fn status(&self) -> Result<Report> {
        let out = run(
            bin("redirectd").to_str().context("non-UTF-8 path")?,
            &[
                "status",
                "--json",
                "--pin-dir",
                self.pin_dir.to_str().context("non-UTF-8 path")?,
                "--status-file",
                self.status_file.to_str().context("non-UTF-8 path")?,
            ],
        )?;
        serde_json::from_str(&out).context("parsing redirectd status --json")
    }

    /// Waits (up to 10 s) until `pred` holds for `redirectd status --json`.
    pub fn wait_status(&self, what: &str, pred: impl Fn(&Report) -> bool) -> Result<Report> {
        let mut last = None;
        let found = eventually(Duration::from_secs(10), what, || {
            let s = self.status().ok()?;
            let done = pred(&s);
            last = Some(s.clone());
            done.then_some(s)
        });
        found.with_context(|| format!("last status: {last:#?}\nlog:\n{}", self.log_text()))
    }

    /// Waits until exactly the pods `names` (in namespace `lab`) are applied.
    pub fn wait_pods(&self, names: &[&str]) -> Result<Report> {
        let mut want: Vec<&str> = names.to_vec();
        want.sort_unstable();
        self.wait_status(&format!("pods {want:?} applied"), |s| s.pod_names() == want)
    }

    /// The status entry of one pod.
    pub fn pod_status(&self, name: &str) -> Result<PodReport> {
        let s = self.status()?;
        s.pod(name)
            .cloned()
            .with_context(|| format!("pod {name} not in status: {s:#?}"))
    }

    /// Stops the daemon (SIGTERM). Its programs stay pinned and attached.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate();
        }
    }

    /// Makes the next [`Daemon::restart`] run `binary` with `--log-level log_level` (an
    /// upgrade: another executable, whose kernel programs differ when the level does).
    pub fn upgrade_to(&mut self, binary: PathBuf, log_level: &str) {
        self.binary = binary;
        self.log_level = log_level.into();
    }

    /// `redirectd uninstall` for this daemon's pin dir, with its default drain.
    pub fn uninstall(&self) -> Result<String> {
        self.uninstall_draining(None)
    }

    /// `redirectd uninstall`, with `--drain-ms` when given.
    pub fn uninstall_draining(&self, drain_ms: Option<u64>) -> Result<String> {
        let drain = drain_ms.map(|ms| ms.to_string());
        let mut args = vec![
            "uninstall",
            "--pin-dir",
            self.pin_dir.to_str().context("non-UTF-8 path")?,
        ];
        if let Some(ms) = &drain {
            args.extend(["--drain-ms", ms]);
        }
        run(bin("redirectd").to_str().context("non-UTF-8 path")?, &args)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        // Teardown: the lab's traffic is over, nothing to drain.
        if let Err(e) = self.uninstall_draining(Some(0)) {
            eprintln!("lab: redirectd uninstall failed: {e:#}");
        }
    }
}
