//! One node of a cluster, as the tests, `cargo xtask demo --node` and `cargo xtask bench
//! --node` use it: the lab's node namespace with a destination outside the mesh, the fake
//! API server (the pod source), containerd ([`Node`]), and the DaemonSet's pod run from
//! `kubectl kustomize deploy/base` ([`Node::run_daemonset`]) until it is ready and
//! install-cni has chained the plugin; mesh pods made as kubelet makes them.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use redirect_lab::{
    envoy, eventually,
    wire::{ClientResult, EnvoyRecord, ProxyRecord},
    Lab, Report, PROXY_UID,
};
use serde_json::Value;

use crate::{
    cri::{stdout_lines, Cri, Exec},
    fake_apiserver::{pending_pod, FakeApiServer},
    kubelet::{kustomize, ManifestPod, StandIns},
    Node, Pod, PodSpec, LAB_MOUNT,
};

/// The node's name in the pod source.
pub const NODE: &str = "node-a";

/// The repository (the manifests under `deploy/`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A lab tool as the pods' containers run it (the host's build output, mounted).
pub fn lab_tool(name: &str) -> String {
    format!("{LAB_MOUNT}/{name}")
}

/// `kubectl kustomize deploy/base`, then `patch` (a caller's own change, said where it is
/// made).
pub fn rendering(patch: impl FnOnce(&mut [Value])) -> Result<Vec<Value>> {
    let mut docs = kustomize(&repo().join("deploy/base"))?;
    patch(&mut docs);
    Ok(docs)
}

/// What stands in for the cluster: the node's name, and the fake API server's URL given to
/// the daemon in place of the service account kubelet would mount.
pub fn stand_ins(api: &FakeApiServer) -> StandIns {
    StandIns {
        node_name: NODE.into(),
        extra_args: vec![("redirectd".into(), format!("--kube-api-url={}", api.url))],
    }
}

/// The node, with the DaemonSet's pod running and ready.
pub struct MeshNode {
    // Drop order: the DaemonSet's supervisor, the node (pods, containerd), then the lab.
    pub ds: Option<ManifestPod>,
    pub node: Node,
    pub api: FakeApiServer,
    /// A server outside the mesh (`ip:8080`), on the lab's own bridge.
    pub dst: String,
    pub lab: Lab,
}

impl MeshNode {
    /// The lab, the fake API server, containerd with the primary CNI only; then the
    /// DaemonSet's pod from `docs`, ready, its plugin chained.
    pub fn start(docs: &[Value]) -> Result<Self> {
        let mut lab = Lab::new().context(
            "a real node needs root, iproute2, cgroup v2 and BPF (`cargo xtask setup` installs the rest)",
        )?;
        lab.add_pod("dst")?;
        lab.start_server("dst", &[8080])?;
        let dst = format!("{}:8080", lab.pod("dst").v4);
        let api = FakeApiServer::start_in(&lab.node.path());
        let node = Node::start(&lab, &lab.primary_cni()?)?;
        let mut n = Self {
            ds: None,
            node,
            api,
            dst,
            lab,
        };
        n.start_daemonset(docs)?;
        Ok(n)
    }

    /// Runs the DaemonSet's pod from `docs` and waits until it is ready and install-cni has
    /// put redirect-cni at the end of the primary CNI's conflist.
    pub fn start_daemonset(&mut self, docs: &[Value]) -> Result<()> {
        let ds = self
            .node
            .run_daemonset(docs, "redirectd", &stand_ins(&self.api))?;
        ds.wait_ready(Duration::from_secs(60))?;
        self.ds = Some(ds);
        eventually(
            Duration::from_secs(10),
            "redirect-cni in the conflist",
            || self.chained().then_some(()),
        )
        .with_context(|| format!("{:?}", self.node.cni_conf()))
    }

    /// Is redirect-cni the last plugin of the node's CNI configuration?
    pub fn chained(&self) -> bool {
        let conf = self.node.cni_conf().unwrap_or_default();
        conf.first()
            .and_then(|(_, c)| c["plugins"].as_array()?.last().cloned())
            .is_some_and(|p| p["type"] == "redirect-cni")
    }

    pub fn ds(&self) -> &ManifestPod {
        self.ds.as_ref().expect("the DaemonSet's pod is running")
    }

    /// A command in the redirectd container.
    pub fn in_daemon(&mut self, cmd: &[&str]) -> Result<Exec> {
        let id = self.ds().container_id("redirectd")?;
        self.node.cri.exec(&id, cmd, Duration::from_secs(20))
    }

    /// `redirectd status --json`, in its container.
    pub fn status(&mut self) -> Result<Report> {
        let out = self.in_daemon(&["redirectd", "status", "--json"])?;
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("redirectd status: {}{}", out.stdout, out.stderr))
    }

    /// Announces mesh pod `shop/name` to the API server as kubelet's scheduler would
    /// (bound, Pending), then runs its sandbox: the runtime runs the CNI chain.
    pub fn mesh_sandbox(&mut self, name: &str) -> Result<Pod> {
        let uid = format!("uid-{name}");
        self.api
            .apply(&pending_pod("shop", name, &uid, NODE, &[]), true);
        self.node.run_pod(&PodSpec {
            namespace: "shop",
            name,
            uid: &uid,
        })
    }

    /// A mesh pod `shop/name` as Istio's CNI mode makes it: its sandbox, Istio's validation
    /// init container (uid 1337, both families; it must pass for the pod to start), then its
    /// sidecar container: Envoy with Istio's listener shapes for the pod's addresses, uid
    /// 1337. Returns the pod and what the validation printed.
    pub fn mesh_pod(&mut self, name: &str) -> Result<(Pod, Vec<String>)> {
        let pod = self.mesh_sandbox(name)?;
        let validate = lab_tool("redirect-lab");
        let script = format!("{validate} validate && {validate} validate --ipv6");
        let init = self.node.container(
            "istio-validation",
            PROXY_UID as i64,
            &["sh", "-c", &script],
            &[],
        );
        let id = self.node.cri.start_container(&pod.id, init, &pod.config)?;
        let code = self.node.cri.wait_exited(&id, Duration::from_secs(30))?;
        let validation = stdout_lines(&self.node.log_path(&pod, "istio-validation"));
        if code != 0 {
            bail!("istio-validation of {name} exited {code}: {validation:?}");
        }
        let ips = self.node.cri.pod_ips(&pod.id)?;
        let v4 = ips.iter().find(|ip| ip.contains('.')).context("no IPv4")?;
        let v6 = ips.iter().find(|ip| ip.contains(':')).context("no IPv6")?;
        let config_dir = self.lab.dir.join(format!("{name}-envoy"));
        std::fs::create_dir_all(&config_dir)?;
        let bootstrap = envoy::bootstrap(v4, v6, envoy::Mode::Redirect);
        std::fs::write(
            config_dir.join("envoy.json"),
            serde_json::to_vec(&bootstrap)?,
        )?;
        let binary = envoy::binary();
        let envoy_dir = binary.parent().context("Envoy's directory")?;
        let mut command = vec!["/rlab-envoy/envoy".to_string()];
        command.extend(envoy::args(Path::new("/etc/rlab-envoy/envoy.json")));
        let command: Vec<&str> = command.iter().map(String::as_str).collect();
        let sidecar = self.node.container(
            "istio-proxy",
            PROXY_UID as i64,
            &command,
            &[(envoy_dir, "/rlab-envoy"), (&config_dir, "/etc/rlab-envoy")],
        );
        self.node
            .cri
            .start_container(&pod.id, sidecar, &pod.config)?;
        Ok((pod, validation))
    }

    /// A long-lived application container of `pod` (connections are made in it with
    /// ExecSync).
    pub fn shell(&mut self, pod: &Pod) -> Result<String> {
        let shell = self.node.container("shell", 1000, &["sleep", "3600"], &[]);
        self.node.cri.start_container(&pod.id, shell, &pod.config)
    }

    /// What the pod's Envoy logged (its access log, on the container's stdout).
    pub fn sidecar_log(&self, pod: &Pod) -> Vec<ProxyRecord> {
        stdout_lines(&self.node.log_path(pod, "istio-proxy"))
            .iter()
            .filter_map(|l| serde_json::from_str::<EnvoyRecord>(l).ok())
            .filter_map(|r| r.as_proxy_record())
            .collect()
    }

    /// Connections made from an application container until all `count` of one run
    /// succeed (Envoy may still be starting), at most 20 s.
    pub fn connections(
        &mut self,
        shell: &str,
        target: &str,
        count: usize,
    ) -> Result<Vec<ClientResult>> {
        let mut results = Vec::new();
        eventually(Duration::from_secs(20), "connections from the pod", || {
            results = client(&mut self.node.cri, shell, target, count);
            (results.len() == count && results.iter().all(|r| r.error.is_none())).then_some(())
        })
        .with_context(|| format!("{results:?}"))?;
        Ok(results)
    }
}

/// `count` connections to `target` made with ExecSync in container `id` (none when the exec
/// fails).
pub fn client(cri: &mut Cri, id: &str, target: &str, count: usize) -> Vec<ClientResult> {
    let tool = lab_tool("redirect-lab");
    let n = count.to_string();
    cri.exec(
        id,
        &[&tool, "client", "--target", target, "--count", &n],
        Duration::from_secs(20),
    )
    .map(|out| {
        out.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<ClientResult>(l).ok())
            .collect()
    })
    .unwrap_or_default()
}
