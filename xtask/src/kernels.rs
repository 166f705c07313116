//! `cargo xtask test --kernel <version|all>`: the integration tests on other kernels than the
//! host's. Each kernel is a Debian package (`linux-image-*-amd64-unsigned`), fetched with a
//! private apt configuration under `target/kernels/apt` (the host's sources and /boot are
//! never touched), unpacked with `dpkg-deb -x`, and booted with virtme-ng under qemu's
//! software emulation, the host's root filesystem shared read-only. The test binaries are
//! built on the host and run inside the guest, one binary after the other; their output comes
//! back through a shared directory, and the results are reported per kernel and per test.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::setup;

/// A kernel the matrix knows: its name on the command line, the Debian suite that has it,
/// and the unsigned image package's name pattern (`{N}` is the ABI number, or the upload's
/// version for backports).
pub struct KernelSpec {
    pub name: &'static str,
    suite: &'static str,
    /// Package name = `prefix` + digits/dots + `suffix`.
    prefix: &'static str,
    suffix: &'static str,
}

/// The kernels clusters run that Debian's registry serves.
pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        name: "6.1",
        suite: "bookworm",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64-unsigned",
    },
    KernelSpec {
        name: "6.12",
        suite: "bookworm-backports",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64-unsigned",
    },
    KernelSpec {
        name: "5.10",
        suite: "bullseye",
        prefix: "linux-image-5.10.0-",
        suffix: "-amd64-unsigned",
    },
];

/// How much slower than the host the guests run under software emulation (see
/// `redirect_lab::time_scale`): waits and speed bounds are stretched by it.
const TIME_SCALE: u32 = 10;

/// The version of virtme-ng known to boot Debian's kernels here.
const VIRTME_NG_VERSION: &str = "1.42";

fn kernels_dir(root: &Path) -> PathBuf {
    root.join("target").join("kernels")
}

/// `apt-get` / `apt-cache` arguments for the private configuration (Debian's archive key,
/// the three suites), so nothing of the host's apt state changes.
fn apt_options(dir: &Path) -> Result<Vec<String>> {
    let sources = dir.join("sources.list");
    let mut list = String::new();
    for suite in ["bookworm", "bookworm-backports", "bullseye"] {
        list.push_str(&format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {suite} main\n"
        ));
    }
    std::fs::create_dir_all(dir.join("lists").join("partial"))?;
    std::fs::create_dir_all(dir.join("cache").join("archives").join("partial"))?;
    std::fs::write(&sources, list)?;
    let d = |p: &str| dir.join(p).display().to_string();
    Ok(vec![
        "-o".into(),
        format!("Dir::Etc::SourceList={}", sources.display()),
        "-o".into(),
        "Dir::Etc::SourceParts=/dev/null".into(),
        "-o".into(),
        format!("Dir::State::Lists={}", d("lists")),
        "-o".into(),
        format!("Dir::Cache={}", d("cache")),
        "-o".into(),
        "APT::Architecture=amd64".into(),
        "-q".into(),
    ])
}

fn run_in(dir: &Path, program: &str, args: &[String]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Orders `6.1.0-50` after `6.1.0-9` (numbers compared as numbers).
fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The kernel's image, fetched and unpacked under `target/kernels/<name>` unless it is there.
fn fetch(root: &Path, spec: &KernelSpec) -> Result<PathBuf> {
    let dir = kernels_dir(root).join(spec.name);
    let boot = dir.join("boot");
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(&boot)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
    };
    if let Some(vmlinuz) = find() {
        return Ok(vmlinuz);
    }
    let apt_dir = kernels_dir(root).join("apt");
    let opts = apt_options(&apt_dir)?;
    let mut update = opts.clone();
    update.push("update".into());
    run_in(&apt_dir, "apt-get", &update)?;
    let mut names = opts.clone();
    names.extend(["pkgnames".into(), spec.prefix.into()]);
    let listed = run_in(&apt_dir, "apt-cache", &names)?;
    let package = listed
        .lines()
        .filter(|n| {
            n.strip_prefix(spec.prefix)
                .and_then(|rest| rest.strip_suffix(spec.suffix))
                .is_some_and(|mid| {
                    !mid.is_empty() && mid.chars().all(|c| c.is_ascii_digit() || c == '.')
                })
        })
        .max_by_key(|n| version_key(n))
        .with_context(|| {
            format!(
                "no {}*{} package in Debian's {}",
                spec.prefix, spec.suffix, spec.suite
            )
        })?
        .to_string();
    eprintln!(
        "kernel {}: fetching {package} from Debian {}",
        spec.name, spec.suite
    );
    let mut download = opts;
    download.extend(["download".into(), package.clone()]);
    run_in(&apt_dir, "apt-get", &download)?;
    let deb = std::fs::read_dir(&apt_dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .context("the downloaded package is not where apt-get put it")?;
    std::fs::create_dir_all(&dir)?;
    run_in(
        &dir,
        "dpkg-deb",
        &[
            "-x".into(),
            deb.display().to_string(),
            dir.display().to_string(),
        ],
    )?;
    let _ = std::fs::remove_file(&deb);
    find().with_context(|| format!("no vmlinuz in {package}"))
}

/// The package's `lib/modules`, indexed by `depmod` once (a package unpacked with
/// `dpkg-deb -x` has no `modules.dep`), or `None` if it ships no modules.
fn modules(root: &Path, spec: &KernelSpec) -> Result<Option<PathBuf>> {
    let base = kernels_dir(root).join(spec.name);
    let dir = base.join("lib").join("modules");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(None);
    };
    for release in entries.flatten() {
        if release.path().join("modules.dep").exists() {
            continue;
        }
        let release = release.file_name().to_string_lossy().into_owned();
        run_in(
            &base,
            "depmod",
            &["-b".into(), base.display().to_string(), release],
        )?;
    }
    Ok(Some(dir))
}

/// virtme-ng in `target/virtme-ng` (pip `--target`), and what it runs on: qemu, udev, depmod,
/// and a static busybox (virtme builds the guest's initramfs with it; the package's dpkg file
/// list shows it is installed, since the dynamic `busybox` has the same path).
fn setup_vm(root: &Path) -> Result<PathBuf> {
    setup::packages(&[
        ("qemu-system-x86", "qemu-system-x86_64"),
        ("udev", "udevadm"),
        ("kmod", "depmod"),
        ("busybox-static", "/var/lib/dpkg/info/busybox-static.list"),
    ])?;
    let dir = root.join("target").join("virtme-ng");
    let vng = dir.join("bin").join("vng");
    let installed = std::fs::read_dir(&dir).is_ok_and(|mut d| {
        d.any(|e| {
            e.is_ok_and(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("virtme_ng-{VIRTME_NG_VERSION}"))
            })
        })
    });
    if !installed || !vng.exists() {
        setup::pip_install(&dir, &format!("virtme-ng=={VIRTME_NG_VERSION}"), false)?;
    }
    Ok(dir)
}

/// The integration test binaries of the `tests` package, built on the host: `(name, path)`,
/// with the guest-only ones (feature `guest-kernels`: kTLS, which the dev box's kernel lacks).
fn test_binaries(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let out = crate::toolchain::cargo(root)
        .args([
            "test",
            "--no-run",
            "--message-format=json",
            "-p",
            "redirect-tests",
            "--features",
            "redirect-tests/guest-kernels",
        ])
        .output()
        .context("building the test binaries")?;
    if !out.status.success() {
        bail!(
            "building the test binaries failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["target"]["kind"][0] != "test" {
            continue;
        }
        if let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str()) {
            bins.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    bins.sort();
    Ok(bins)
}

/// One test binary's outcome in one guest.
#[derive(Debug, Default)]
struct BinaryResult {
    passed: Vec<String>,
    failed: Vec<String>,
    seconds: f64,
    exit: Option<i32>,
}

/// What one kernel gave.
#[derive(Debug, Default)]
struct KernelResult {
    release: String,
    /// `redirectd probe`'s missing lines (empty: everything the data path needs is there).
    missing: Vec<String>,
    binaries: BTreeMap<String, BinaryResult>,
    boot_and_run: Duration,
}

/// Test binaries that need no redirectd and run on every kernel, below the floor too: the
/// probe's own test, and the check of the sockmap read behaviour that keeps application
/// sockets out of the splice.
const EVERY_KERNEL: [&str; 2] = ["kernel", "sockmap_reads"];

/// Test binaries left out of the guests unless named with `--only`: the image's check reads
/// an archive, whatever the kernel; the real node (containerd, runc, the image) has not been
/// brought up inside a virtme guest yet.
const HOST_ONLY: [&str; 2] = ["image", "node"];

/// The script the guest runs: mount bpffs, record the kernel and the probe, then every test
/// binary (only [`EVERY_KERNEL`]'s when the probe says the kernel is below the floor), each
/// with its log, exit code and time in the shared results directory.
fn guest_script(
    root: &Path,
    results: &Path,
    modules: Option<&Path>,
    bins: &[(String, PathBuf)],
) -> String {
    let target = root.join("target").join("debug");
    let envoy = setup::envoy_bin(root);
    let mut s = format!(
        "#!/bin/sh\n\
         R={results}\n\
         mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf\n\
         mkdir -p /run/netns\n\
         export REDIRECTD_BIN={t}/redirectd REDIRECT_LAB_BIN={t}/redirect-lab REDIRECT_CNI_BIN={t}/redirect-cni\n\
         export ENVOY_BIN={envoy} REDIRECT_TIME_SCALE={TIME_SCALE} RUST_BACKTRACE=0\n\
         uname -r > $R/release\n\
         {modules}\
         {t}/redirectd probe > $R/probe 2>&1; echo $? > $R/probe.rc\n\
         cd {tests}\n",
        results = results.display(),
        t = target.display(),
        envoy = envoy.display(),
        tests = root.join("tests").display(),
        // The package's modules where modprobe (and the kernel's own requests) look, then
        // kTLS loaded for the `ktls` tests.
        modules = modules
            .map(|m| format!(
                "mount --bind {} /lib/modules && modprobe tls > $R/modules 2>&1; echo \"tls: $?\" >> $R/modules\n",
                m.display()
            ))
            .unwrap_or_default(),
    );
    for (name, path) in bins {
        let guard = if EVERY_KERNEL.contains(&name.as_str()) {
            String::new()
        } else {
            "[ \"$(cat $R/probe.rc)\" = 0 ] && ".to_string()
        };
        s.push_str(&format!(
            "{guard}{{ start=$(date +%s.%N); {exe} --test-threads=1 > $R/{name}.log 2>&1; echo $? > $R/{name}.rc; awk \"BEGIN {{ print $(date +%s.%N) - $start }}\" > $R/{name}.secs; }}\n",
            exe = path.display()
        ));
    }
    s.push_str("sync\n");
    s
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn collect(results: &Path, bins: &[(String, PathBuf)]) -> KernelResult {
    let mut k = KernelResult {
        release: read(&results.join("release")),
        missing: read(&results.join("probe"))
            .lines()
            .filter(|l| l.starts_with("MISSING"))
            .map(|l| {
                let l = l.trim_start_matches("MISSING");
                l.split_whitespace().collect::<Vec<_>>().join(" ")
            })
            .collect(),
        ..Default::default()
    };
    for (name, _) in bins {
        let log = read(&results.join(format!("{name}.log")));
        if log.is_empty() && !results.join(format!("{name}.rc")).exists() {
            continue;
        }
        let mut r = BinaryResult {
            exit: read(&results.join(format!("{name}.rc"))).parse().ok(),
            seconds: read(&results.join(format!("{name}.secs")))
                .parse()
                .unwrap_or(0.0),
            ..Default::default()
        };
        for line in log.lines() {
            let Some(rest) = line.strip_prefix("test ") else {
                continue;
            };
            if let Some(t) = rest.strip_suffix(" ... ok") {
                r.passed.push(t.to_string());
            } else if let Some(t) = rest.strip_suffix(" ... FAILED") {
                r.failed.push(t.to_string());
            }
        }
        k.binaries.insert(name.clone(), r);
    }
    k
}

/// Boots `spec`'s kernel and runs `bins` in it.
fn run_kernel(
    root: &Path,
    vng: &Path,
    spec: &KernelSpec,
    bins: &[(String, PathBuf)],
) -> Result<KernelResult> {
    let vmlinuz = fetch(root, spec)?;
    let modules = modules(root, spec)?;
    let results = kernels_dir(root).join("results").join(spec.name);
    let _ = std::fs::remove_dir_all(&results);
    std::fs::create_dir_all(&results)?;
    let script = results.join("guest.sh");
    std::fs::write(
        &script,
        guest_script(root, &results, modules.as_deref(), bins),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    eprintln!(
        "kernel {}: booting {} under qemu (software emulation) to run {} test binaries",
        spec.name,
        vmlinuz.display(),
        bins.len()
    );
    let started = Instant::now();
    let path = format!(
        "{}:{}",
        vng.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let status = Command::new("python3")
        .arg(vng.join("bin").join("vng"))
        .arg("--run")
        .arg(&vmlinuz)
        .args(["--disable-kvm", "--cpus", "2", "--memory", "4G", "--rwdir"])
        .arg(&results)
        .arg("--exec")
        .arg(&script)
        .env("PYTHONPATH", vng)
        .env("PATH", path)
        .current_dir(root)
        .stdout(std::fs::File::create(results.join("console.log"))?)
        .stderr(std::fs::File::create(results.join("vng.log"))?)
        .status()
        .context("running virtme-ng")?;
    let mut k = collect(&results, bins);
    k.boot_and_run = started.elapsed();
    if k.release.is_empty() {
        bail!(
            "kernel {}: the guest did not run the tests ({status}); see {}",
            spec.name,
            results.join("vng.log").display()
        );
    }
    Ok(k)
}

/// One kernel's lines of the report table, and whether it is green.
fn report(spec: &KernelSpec, k: &KernelResult) -> (String, bool) {
    let passed: usize = k.binaries.values().map(|b| b.passed.len()).sum();
    let failed: Vec<String> = k
        .binaries
        .iter()
        .flat_map(|(bin, r)| r.failed.iter().map(move |t| format!("{bin}::{t}")))
        .collect();
    let broken: Vec<&String> = k
        .binaries
        .iter()
        .filter(|(_, r)| r.exit != Some(0) && r.failed.is_empty())
        .map(|(b, _)| b)
        .collect();
    let ok = failed.is_empty() && broken.is_empty() && passed > 0;
    let unavailable = if k.missing.is_empty() {
        "nothing".to_string()
    } else {
        format!(
            "below the floor, only `kernel` and `sockmap_reads` ran: {}",
            k.missing.join("; ")
        )
    };
    let mut line = format!(
        "| {} ({}) | {} passed, {} failed{} | {} | {:.0} s |",
        spec.name,
        k.release,
        passed,
        failed.len(),
        if broken.is_empty() {
            String::new()
        } else {
            format!(", binaries that did not finish: {broken:?}")
        },
        unavailable,
        k.boot_and_run.as_secs_f64()
    );
    for f in &failed {
        line.push_str(&format!("\n|   failed: {f} | | | |"));
    }
    (line, ok)
}

/// `cargo xtask test --kernel <which>`: `which` is a version of [`KERNELS`] or `all`;
/// `only` limits the test binaries (by name) run in the guest.
pub fn test(root: &Path, which: &str, only: &[String]) -> Result<()> {
    let specs: Vec<&KernelSpec> = match which {
        "all" => KERNELS.iter().collect(),
        v => vec![KERNELS.iter().find(|k| k.name == v).with_context(|| {
            format!(
                "no kernel {v:?} in the matrix; choose one of {} or all",
                KERNELS
                    .iter()
                    .map(|k| k.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?],
    };
    let vng = setup_vm(root)?;
    let mut bins = test_binaries(root)?;
    if !only.is_empty() {
        for o in only {
            if !bins.iter().any(|(n, _)| n == o) {
                bail!(
                    "no test binary {o:?}; the binaries are {:?}",
                    bins.iter().map(|b| &b.0).collect::<Vec<_>>()
                );
            }
        }
        bins.retain(|(n, _)| only.contains(n) || EVERY_KERNEL.contains(&n.as_str()));
    } else {
        bins.retain(|(n, _)| !HOST_ONLY.contains(&n.as_str()));
    }
    let mut table = vec![
        "| kernel | suite | unavailable there | boot + run |".to_string(),
        "| --- | --- | --- | --- |".to_string(),
    ];
    let mut all_ok = true;
    for spec in specs {
        let k = run_kernel(root, &vng, spec, &bins)?;
        for (bin, r) in &k.binaries {
            eprintln!(
                "kernel {} {bin}: {} passed, {} failed {:?} in {:.0} s",
                spec.name,
                r.passed.len(),
                r.failed.len(),
                r.failed,
                r.seconds
            );
        }
        let (line, ok) = report(spec, &k);
        all_ok &= ok;
        table.push(line);
    }
    let text = table.join("\n");
    println!("{text}");
    std::fs::write(kernels_dir(root).join("report.md"), format!("{text}\n"))?;
    if !all_ok {
        bail!("the suite did not pass on every kernel (logs under target/kernels/results/)");
    }
    Ok(())
}
