//! `redirectd cni install --watch` and `redirectd cni uninstall` on real files, as the
//! DaemonSet runs them against the host's CNI directories: the plugin is added to the primary
//! configuration, put back after the primary CNI rewrites its file, and removed on uninstall.

use std::{path::Path, time::Duration};

use redirect_lab::{bin, eventually, run, spawn, Placement};
use serde_json::Value;

const PRIMARY: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"ptp","ipam":{"type":"host-local","subnet":"10.244.1.0/24"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

fn types(path: &Path) -> Vec<String> {
    let v: Value =
        serde_json::from_slice(&std::fs::read(path).unwrap_or_default()).unwrap_or(Value::Null);
    v["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["type"].as_str().map(String::from))
        .collect()
}

#[test]
fn install_watch_reinsert_and_uninstall() {
    let dir = std::env::temp_dir().join(format!("rlab-cni-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (bin_dir, conf_dir) = (dir.join("bin"), dir.join("net.d"));
    std::fs::create_dir_all(&conf_dir).unwrap();
    let primary = conf_dir.join("10-ptp.conflist");
    let redirectd = bin("redirectd");
    let plugin = bin("redirect-cni");
    let args = [
        "cni",
        "install",
        "--watch",
        "--poll-ms",
        "100",
        "--bin-dir",
        bin_dir.to_str().unwrap(),
        "--conf-dir",
        conf_dir.to_str().unwrap(),
        "--plugin-binary",
        plugin.to_str().unwrap(),
        "--exclude-namespaces",
        "kube-system",
        "--own-namespace",
        "redirectd",
    ];
    let mut installer = spawn(
        Placement::default(),
        &dir.join("installer.log"),
        &redirectd,
        &args,
    )
    .unwrap();
    let with_ours = || {
        types(&primary)
            .ends_with(&["redirect-cni".to_string()])
            .then_some(())
    };

    // No primary configuration yet: the installer waits for it.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&primary, PRIMARY).unwrap();
    eventually(
        Duration::from_secs(5),
        "the plugin added to the primary configuration",
        with_ours,
    )
    .unwrap();
    assert_eq!(types(&primary), ["ptp", "portmap", "redirect-cni"]);
    assert_eq!(
        std::fs::read(bin_dir.join("redirect-cni")).unwrap(),
        std::fs::read(&plugin).unwrap()
    );
    let conf: Value = serde_json::from_slice(&std::fs::read(&primary).unwrap()).unwrap();
    assert_eq!(
        conf["plugins"][2]["excludeNamespaces"],
        serde_json::json!(["kube-system", "redirectd"])
    );

    // The primary CNI rewrites its file: the plugin comes back; once in, it is left alone.
    std::fs::write(&primary, PRIMARY).unwrap();
    eventually(
        Duration::from_secs(5),
        "the plugin put back after a rewrite",
        with_ours,
    )
    .unwrap();
    let before = std::fs::metadata(&primary).unwrap().modified().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        std::fs::metadata(&primary).unwrap().modified().unwrap(),
        before,
        "idempotent: no rewrite"
    );
    installer.terminate();

    let out = run(
        redirectd.to_str().unwrap(),
        &[
            "cni",
            "uninstall",
            "--bin-dir",
            bin_dir.to_str().unwrap(),
            "--conf-dir",
            conf_dir.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(out.contains("removed redirect-cni"), "{out}");
    assert_eq!(types(&primary), ["ptp", "portmap"]);
    assert!(!bin_dir.join("redirect-cni").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
