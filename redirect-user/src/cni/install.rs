//! Puts `redirect-cni` on the node the way istio-cni's installer does: the binary into the
//! host's CNI bin dir, and the plugin at the end of the primary CNI configuration (the first
//! file of the host's CNI conf dir by name, as kubelet and containerd pick it; a lone `.conf`
//! becomes a `.conflist`). With `--watch` it puts the plugin back whenever the primary CNI
//! rewrites its file; `uninstall` takes it out. Every write is a rename of a complete file,
//! and writing what is already there is skipped (idempotent).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

/// The plugin's `type` (its binary's name).
pub const PLUGIN_TYPE: &str = "redirect-cni";

/// What an install or uninstall did to a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing to do: the file already said it.
    Unchanged,
    /// This file was written (and, for a converted `.conf`, the old one removed).
    Written(PathBuf),
    /// No primary CNI configuration exists yet.
    NoPrimary,
}

/// The primary CNI configuration: the first `.conflist`, `.conf` or `.json` file by name.
pub fn primary_config(conf_dir: &Path) -> Result<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .with_context(|| format!("reading the CNI conf dir {}", conf_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", path.display()))
}

/// Writes `value` to `path` through a temporary file in the same directory whose name no
/// runtime reads, then a rename: a runtime never sees half a configuration.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().context("a file without a directory")?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.redirect-tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))
}

/// The primary configuration as a list (a single-plugin `.conf` wrapped in one).
fn as_list(conf: Value) -> Result<Value> {
    if conf.get("plugins").is_some() {
        if !conf["plugins"].is_array() {
            bail!("`plugins` is not a list");
        }
        return Ok(conf);
    }
    if conf.get("type").is_none() {
        bail!("neither a plugin (`type`) nor a list (`plugins`)");
    }
    Ok(json!({
        "cniVersion": conf.get("cniVersion").cloned().unwrap_or(json!("0.3.1")),
        "name": conf.get("name").cloned().unwrap_or(json!("k8s-pod-network")),
        "plugins": [conf],
    }))
}

/// Makes `plugin` (our configuration, `type` included) the last plugin of the primary
/// configuration, replacing an earlier copy of ours.
pub fn insert(conf_dir: &Path, plugin: &Value) -> Result<Change> {
    let Some(path) = primary_config(conf_dir)? else {
        return Ok(Change::NoPrimary);
    };
    let original = read_json(&path)?;
    let mut list = as_list(original.clone())
        .with_context(|| format!("{} is not a CNI configuration", path.display()))?;
    let plugins = list["plugins"].as_array_mut().context("plugins")?;
    plugins.retain(|p| p["type"] != PLUGIN_TYPE);
    plugins.push(plugin.clone());
    let target = if path.extension().and_then(|e| e.to_str()) == Some("conflist") {
        path.clone()
    } else {
        path.with_extension("conflist")
    };
    if target == path && list == original {
        return Ok(Change::Unchanged);
    }
    let bytes = serde_json::to_vec_pretty(&list)?;
    write_atomically(&target, &bytes, 0o644)?;
    if target != path {
        std::fs::remove_file(&path)
            .with_context(|| format!("removing {} (now {})", path.display(), target.display()))?;
    }
    Ok(Change::Written(target))
}

/// Takes our plugin out of the primary configuration (it stays a list).
pub fn remove(conf_dir: &Path) -> Result<Change> {
    let Some(path) = primary_config(conf_dir)? else {
        return Ok(Change::NoPrimary);
    };
    let mut list = read_json(&path)?;
    let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
        return Ok(Change::Unchanged);
    };
    let before = plugins.len();
    plugins.retain(|p| p["type"] != PLUGIN_TYPE);
    if plugins.len() == before {
        return Ok(Change::Unchanged);
    }
    write_atomically(&path, &serde_json::to_vec_pretty(&list)?, 0o644)?;
    Ok(Change::Written(path))
}

/// Copies the plugin binary into the bin dir unless the same bytes are there.
pub fn install_binary(source: &Path, bin_dir: &Path) -> Result<bool> {
    let bytes = std::fs::read(source)
        .with_context(|| format!("reading the plugin binary {}", source.display()))?;
    let target = bin_dir.join(PLUGIN_TYPE);
    if std::fs::read(&target).is_ok_and(|b| b == bytes) {
        return Ok(false);
    }
    std::fs::create_dir_all(bin_dir)?;
    write_atomically(&target, &bytes, 0o755)?;
    Ok(true)
}

/// Removes the plugin binary from the bin dir (if it is there).
pub fn remove_binary(bin_dir: &Path) -> Result<bool> {
    match std::fs::remove_file(bin_dir.join(PLUGIN_TYPE)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => {
            Err(e).with_context(|| format!("removing {PLUGIN_TYPE} from {}", bin_dir.display()))
        }
    }
}

/// What `redirectd cni install` needs.
pub struct InstallOptions {
    pub binary: PathBuf,
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// Our plugin's configuration entry.
    pub plugin: Value,
}

/// Installs once; with `watch`, then keeps the plugin in the primary configuration (checked
/// every `poll`) until the process is stopped.
pub fn install(opts: &InstallOptions, watch: Option<Duration>) -> Result<()> {
    if install_binary(&opts.binary, &opts.bin_dir)? {
        log::info!("installed {} into {}", PLUGIN_TYPE, opts.bin_dir.display());
    }
    let mut said_no_primary = false;
    loop {
        match insert(&opts.conf_dir, &opts.plugin) {
            Ok(Change::Written(p)) => {
                log::info!("{PLUGIN_TYPE} added to the primary CNI configuration {}", p.display());
                said_no_primary = false;
            }
            Ok(Change::Unchanged) => {}
            Ok(Change::NoPrimary) if watch.is_none() => bail!(
                "no CNI configuration in {} yet: install the node's network plugin first, or use --watch",
                opts.conf_dir.display()
            ),
            Ok(Change::NoPrimary) => {
                if !said_no_primary {
                    log::warn!(
                        "no CNI configuration in {} yet; waiting for the node's network plugin",
                        opts.conf_dir.display()
                    );
                    said_no_primary = true;
                }
            }
            Err(e) if watch.is_none() => return Err(e),
            Err(e) => log::error!("{e:#}; retrying"),
        }
        let Some(poll) = watch else {
            return Ok(());
        };
        std::thread::sleep(poll);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(test: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("redirectd-install-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn ours() -> Value {
        json!({"type": PLUGIN_TYPE, "socket": "/var/run/redirectd/cni.sock"})
    }

    const CALICO: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"calico"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn insert_is_idempotent_and_remove_restores_the_list() {
        let d = dir("insert");
        std::fs::write(d.join("10-calico.conflist"), CALICO).unwrap();
        std::fs::write(d.join("99-other.conflist"), CALICO).unwrap();
        assert_eq!(
            insert(&d, &ours()).unwrap(),
            Change::Written(d.join("10-calico.conflist"))
        );
        let once = std::fs::read(d.join("10-calico.conflist")).unwrap();
        assert_eq!(insert(&d, &ours()).unwrap(), Change::Unchanged);
        assert_eq!(std::fs::read(d.join("10-calico.conflist")).unwrap(), once);
        let list = read_json(&d.join("10-calico.conflist")).unwrap();
        let types: Vec<&str> = list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            ["calico", "portmap", PLUGIN_TYPE],
            "ours last, the rest untouched"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("99-other.conflist")).unwrap(),
            CALICO,
            "only the primary"
        );
        // A changed configuration of ours replaces the old entry, never adds a second.
        let mut changed = ours();
        changed["timeoutSeconds"] = json!(5);
        insert(&d, &changed).unwrap();
        let list = read_json(&d.join("10-calico.conflist")).unwrap();
        assert_eq!(list["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(list["plugins"][2]["timeoutSeconds"], 5);
        assert!(matches!(remove(&d).unwrap(), Change::Written(_)));
        assert_eq!(
            read_json(&d.join("10-calico.conflist")).unwrap(),
            serde_json::from_str::<Value>(CALICO).unwrap()
        );
        assert_eq!(remove(&d).unwrap(), Change::Unchanged);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_lone_conf_becomes_a_conflist() {
        let d = dir("conf");
        std::fs::write(
            d.join("10-bridge.conf"),
            r#"{"cniVersion":"0.4.0","name":"bridge","type":"bridge","bridge":"cni0"}"#,
        )
        .unwrap();
        assert_eq!(
            insert(&d, &ours()).unwrap(),
            Change::Written(d.join("10-bridge.conflist"))
        );
        assert!(!d.join("10-bridge.conf").exists());
        let list = read_json(&d.join("10-bridge.conflist")).unwrap();
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["name"], "bridge");
        assert_eq!(list["plugins"][0]["bridge"], "cni0");
        assert_eq!(list["plugins"][1]["type"], PLUGIN_TYPE);
        assert_eq!(insert(&d, &ours()).unwrap(), Change::Unchanged);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn no_primary_and_bad_primary_are_said() {
        let d = dir("none");
        assert_eq!(insert(&d, &ours()).unwrap(), Change::NoPrimary);
        std::fs::write(d.join("10-x.conflist"), "{").unwrap();
        let e = insert(&d, &ours()).unwrap_err();
        assert!(format!("{e:#}").contains("10-x.conflist"), "{e:#}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
