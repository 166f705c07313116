//! The image `cargo xtask image` builds (buildah, a debootstrap base, no registry) and the
//! image `deploy/Dockerfile` describes give the same runtime layout: the same base release,
//! the binaries at the paths the Dockerfile copies them to, its entrypoint and user; and the
//! image holds every tool the manifests call in it, under the name the manifests run.
//!
//! Needs the image: `cargo xtask test` builds it and names it in `REDIRECTD_IMAGE`.

use std::{collections::BTreeMap, path::PathBuf, process::Command};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn archive() -> PathBuf {
    let path = std::env::var("REDIRECTD_IMAGE").expect(
        "REDIRECTD_IMAGE is not set: run the tests with `cargo xtask test`, which builds the image (or `cargo xtask image` and set it to target/image/redirectd.tar)",
    );
    let path = PathBuf::from(path);
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// One member of a tar file, as bytes.
fn tar_member(tar: &std::path::Path, member: &str) -> Vec<u8> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(tar)
        .arg(member)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{member}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// What the image's layers hold: every entry, path (no leading `./` or `/`) -> `tar -tv` mode
/// column, and the content of each of the `wanted` files found (read from the same extracted
/// layer, each layer taken out of the archive once).
struct Layers {
    entries: BTreeMap<String, String>,
    files: BTreeMap<String, Vec<u8>>,
}

fn read_layers(tar: &std::path::Path, layers: &[String], wanted: &[&str]) -> Layers {
    let dir = tempdir();
    let mut found = Layers {
        entries: BTreeMap::new(),
        files: BTreeMap::new(),
    };
    for layer in layers {
        let path = dir.join("layer.tar");
        std::fs::write(&path, tar_member(tar, layer)).unwrap();
        let out = Command::new("tar").arg("-tvf").arg(&path).output().unwrap();
        assert!(out.status.success());
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 6 {
                continue;
            }
            let name = cols[5].trim_start_matches("./").trim_start_matches('/');
            let name = name.trim_end_matches('/');
            let mode = if cols.len() > 7 && cols[6] == "->" {
                format!("{} -> {}", cols[0], cols[7])
            } else {
                cols[0].to_string()
            };
            if wanted.contains(&name) {
                // The member as the archiver named it.
                found
                    .files
                    .insert(name.to_string(), tar_member(&path, cols[5]));
            }
            found.entries.insert(name.to_string(), mode);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    found
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlab-{}-image", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The runtime stage of the Dockerfile: its base, where it copies files, entrypoint, user.
struct Stage {
    from: String,
    copied_to: Vec<String>,
    entrypoint: Vec<String>,
    user: Option<String>,
}

fn dockerfile_runtime_stage() -> Stage {
    let text = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    // Continuation lines joined; the last FROM starts the runtime stage.
    let joined = text.replace("\\\n", " ");
    let lines: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let start = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    let mut stage = Stage {
        from: lines[start]["FROM ".len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_string(),
        copied_to: Vec::new(),
        entrypoint: Vec::new(),
        user: None,
    };
    for l in &lines[start + 1..] {
        if let Some(rest) = l.strip_prefix("COPY ") {
            stage
                .copied_to
                .push(rest.split_whitespace().last().unwrap().to_string());
        } else if let Some(rest) = l.strip_prefix("ENTRYPOINT ") {
            stage.entrypoint = serde_json::from_str(rest).unwrap();
        } else if let Some(rest) = l.strip_prefix("USER ") {
            stage.user = Some(rest.trim().to_string());
        }
    }
    stage
}

/// Is `user` (an image config's `User`, or the Dockerfile's `USER`) root?
fn is_root(user: Option<&str>) -> bool {
    matches!(user.unwrap_or(""), "" | "0" | "0:0" | "root" | "root:root")
}

/// Every program the manifests start in the redirectd image: each container's `command[0]`,
/// and for `sh -c SCRIPT` the first word of each command of the script.
fn programs_called_by_manifests() -> Vec<String> {
    use serde::Deserialize as _;
    let mut text = String::new();
    for f in ["deploy/base/redirectd.yaml", "deploy/uninstall.yaml"] {
        text += &std::fs::read_to_string(repo().join(f)).unwrap();
        text += "\n---\n";
    }
    let mut programs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let doc = serde_yaml_ng::Value::deserialize(doc).unwrap();
        let Some(spec) = doc["spec"]["template"]["spec"].as_mapping() else {
            continue;
        };
        for list in ["initContainers", "containers"] {
            let Some(cs) = spec
                .get(serde_yaml_ng::Value::from(list))
                .and_then(|v| v.as_sequence())
            else {
                continue;
            };
            for c in cs {
                let Some(cmd) = c["command"].as_sequence() else {
                    continue;
                };
                let words: Vec<&str> = cmd.iter().filter_map(|w| w.as_str()).collect();
                programs.push(words[0].to_string());
                if words.len() >= 3 && words[1] == "-c" {
                    for part in words[2].split(['|', '&', ';']) {
                        // `exec PROGRAM`: the shell's builtin runs PROGRAM.
                        let mut ws = part.split_whitespace().skip_while(|w| *w == "exec");
                        if let Some(w) = ws.next() {
                            programs.push(w.to_string());
                        }
                    }
                }
            }
        }
    }
    programs.sort();
    programs.dedup();
    programs
}

#[test]
fn the_built_image_and_the_dockerfile_agree() {
    let tar = archive();
    let manifest: Value = serde_json::from_slice(&tar_member(&tar, "manifest.json")).unwrap();
    let m = &manifest[0];
    let config: Value =
        serde_json::from_slice(&tar_member(&tar, m["Config"].as_str().unwrap())).unwrap();
    let layers: Vec<String> = m["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    const OS_RELEASE: &str = "usr/lib/os-release";
    let Layers { entries, files } = read_layers(&tar, &layers, &[OS_RELEASE]);
    let stage = dockerfile_runtime_stage();

    // Tagged as the manifests run it.
    let wanted = redirect_lab::deploy::manifest_image(&repo()).unwrap();
    let tags: Vec<&str> = m["RepoTags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert!(
        tags.iter().any(|t| t.ends_with(&wanted)),
        "{tags:?} lacks {wanted}"
    );

    // Entrypoint and user as the Dockerfile's.
    let entrypoint: Vec<String> =
        serde_json::from_value(config["config"]["Entrypoint"].clone()).unwrap();
    assert_eq!(entrypoint, stage.entrypoint);
    assert!(is_root(stage.user.as_deref()));
    assert!(
        is_root(config["config"]["User"].as_str()),
        "{}",
        config["config"]["User"]
    );

    // The same base release: debian:<suite>-slim in the Dockerfile, that suite in the image.
    let os_release = String::from_utf8(
        files
            .get(OS_RELEASE)
            .expect("usr/lib/os-release in the image")
            .clone(),
    )
    .unwrap();
    let suite = os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .unwrap();
    assert_eq!(stage.from, format!("debian:{suite}-slim"), "{os_release}");

    // Every file the Dockerfile copies is there, executable.
    assert!(!stage.copied_to.is_empty());
    for dest in &stage.copied_to {
        let key = dest.trim_start_matches('/');
        let mode = entries
            .get(key)
            .unwrap_or_else(|| panic!("{dest} (copied by the Dockerfile) is not in the image"));
        assert!(mode.starts_with("-rwxr-xr-x"), "{dest}: {mode}");
    }
    // The CA bundle the Dockerfile installs.
    assert!(
        entries.contains_key("etc/ssl/certs/ca-certificates.crt"),
        "no CA bundle"
    );

    // Every program the manifests call in this image is in it (bookworm's /bin is /usr/bin).
    let programs = programs_called_by_manifests();
    assert!(programs.iter().any(|p| p == "redirectd"), "{programs:?}");
    for p in &programs {
        let found = if let Some(abs) = p.strip_prefix('/') {
            // /bin and /sbin are links into /usr (a merged /usr).
            let merged = abs
                .strip_prefix("bin/")
                .map(|b| format!("usr/bin/{b}"))
                .or_else(|| abs.strip_prefix("sbin/").map(|b| format!("usr/sbin/{b}")));
            entries.contains_key(abs) || merged.is_some_and(|m| entries.contains_key(&m))
        } else {
            ["usr/bin", "usr/sbin", "usr/local/bin"]
                .iter()
                .any(|d| entries.contains_key(&format!("{d}/{p}")))
        };
        assert!(found, "the manifests call {p}, which is not in the image");
    }
    eprintln!(
        "image: {} MiB, {} entries, base {suite}",
        std::fs::metadata(&tar).unwrap().len() / (1024 * 1024),
        entries.len()
    );
}
