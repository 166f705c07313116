//! A real node: containerd 1.6 and runc (Debian's), driven through the CRI as kubelet drives
//! them, run the CNI chain (bridge + host-local, then redirect-cni) for each sandbox and the
//! pods' containers from the image `cargo xtask image` built; the fake API server plays
//! Kubernetes. A mesh pod's application connects at its first instruction: its connection
//! must reach the sidecar (a container of its own, uid 1337), or be refused while the sidecar
//! is not up, never escape; later connections are all captured; deleting the pod (DEL at
//! StopPodSandbox, again at RemovePodSandbox with no netns) removes it from the daemon.

use std::time::Duration;

use redirect_lab::{eventually, wire::ClientResult, wire::ProxyRecord, Lab, PROXY_UID};
use redirect_node::{cri::stdout_lines, Node, Pod, PodSpec, LAB_MOUNT};
use redirect_tests::{
    cni_lab,
    fake_apiserver::{pending_pod, FakeApiServer},
};

const NODE: &str = "node-a";

/// The lab with its daemon serving the CNI plugin from the fake API server, a destination
/// outside the mesh (`dst:8080`), and containerd.
struct RealNode {
    // Drop order: the node (pods, containerd) before the lab (daemon, namespaces).
    node: Node,
    api: FakeApiServer,
    dst: String,
    lab: Lab,
}

fn real_node() -> RealNode {
    let c = cni_lab(NODE);
    let node = Node::start(&c.lab, &c.net.conflist).unwrap();
    RealNode {
        node,
        api: c.api,
        dst: c.dst,
        lab: c.lab,
    }
}

fn lab_tool(name: &str) -> String {
    format!("{LAB_MOUNT}/{name}")
}

impl RealNode {
    /// A mesh pod `shop/name`: announced to the API server as Pending, then its sandbox run
    /// by containerd (the CNI chain registers it), then its sidecar container (the lab's
    /// proxy, uid 1337).
    fn mesh_pod(&mut self, name: &str) -> Pod {
        let uid = format!("uid-{name}");
        self.api
            .apply(&pending_pod("shop", name, &uid, NODE, &[]), true);
        let pod = self
            .node
            .run_pod(&PodSpec {
                namespace: "shop",
                name,
                uid: &uid,
            })
            .unwrap();
        let sidecar = self.node.container(
            "istio-proxy",
            PROXY_UID as i64,
            &[&lab_tool("redirect-lab"), "proxy"],
        );
        self.node
            .cri
            .start_container(&pod.id, sidecar, &pod.config)
            .unwrap();
        pod
    }

    fn sidecar_log(&self, pod: &Pod) -> Vec<ProxyRecord> {
        stdout_lines(&self.node.log_path(pod, "istio-proxy"))
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn captured(&self, pod: &Pod, r: &ClientResult) -> bool {
        self.sidecar_log(pod)
            .iter()
            .any(|rec| Some(&rec.peer) == r.local.as_ref())
    }
}

#[test]
fn a_pod_run_by_containerd_is_captured_from_its_first_connection() {
    let mut n = real_node();
    let pod = n.mesh_pod("web");
    // The application: its first instruction is the connection.
    let app = n.node.container(
        "app",
        1000,
        &[
            &lab_tool("redirect-lab"),
            "client",
            "--target",
            &n.dst,
            "--timeout-ms",
            "3000",
        ],
    );
    let app_id = n
        .node
        .cri
        .start_container(&pod.id, app, &pod.config)
        .unwrap();
    n.node
        .cri
        .wait_exited(&app_id, Duration::from_secs(20))
        .unwrap();
    let lines = stdout_lines(&n.node.log_path(&pod, "app"));
    let first: ClientResult = serde_json::from_str(lines.first().expect("the app printed nothing"))
        .unwrap_or_else(|e| panic!("{e}: {lines:?}"));
    eprintln!("first connection: {first:?}");
    if first.error.is_none() {
        assert!(
            n.captured(&pod, &first),
            "the first connection escaped: {first:?}\n{:?}",
            n.sidecar_log(&pod)
        );
    }

    // Once the sidecar is up, every connection is captured: a long-lived application
    // container, connections made in it with ExecSync.
    let shell = n.node.container("shell", 1000, &["sleep", "3600"]);
    let shell_id = n
        .node
        .cri
        .start_container(&pod.id, shell, &pod.config)
        .unwrap();
    let tool = lab_tool("redirect-lab");
    let dst = n.dst.clone();
    let mut results = Vec::new();
    let captured = eventually(Duration::from_secs(10), "a captured connection", || {
        let out = n
            .node
            .cri
            .exec(
                &shell_id,
                &[&tool, "client", "--target", &dst, "--count", "5"],
                Duration::from_secs(10),
            )
            .ok()?;
        results = out
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<ClientResult>(l).ok())
            .collect();
        (results.len() == 5 && results.iter().all(|r| r.error.is_none())).then_some(())
    });
    assert!(captured.is_ok(), "{results:?}");
    for r in &results {
        assert!(n.captured(&pod, r), "escaped: {r:?}");
    }
    eprintln!(
        "{} connections captured by the sidecar container",
        n.sidecar_log(&pod).len()
    );
    let status = n.lab.daemon().status().unwrap();
    assert!(status.pod("web").is_some(), "{status:?}");

    // Deleted as kubelet deletes a pod: DEL at stop, DEL again at remove (no netns).
    n.node.cri.remove_pod(&pod.id).unwrap();
    n.api
        .delete(&pending_pod("shop", "web", "uid-web", NODE, &[]));
    let gone = eventually(Duration::from_secs(10), "the pod leaves the daemon", || {
        n.lab
            .daemon()
            .status()
            .ok()
            .filter(|s| s.pod("web").is_none())
    });
    assert!(gone.is_ok(), "{}", n.lab.daemon().log_text());
}
