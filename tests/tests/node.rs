//! A real node: containerd 1.6 and runc (Debian's), driven through the CRI as kubelet drives
//! them, run the CNI chain (bridge + host-local, then redirect-cni) for each sandbox and the
//! pods' containers from the image `cargo xtask image` built; the fake API server plays
//! Kubernetes. Each mesh pod's sidecar is Envoy (the pinned build, Istio's listener shapes)
//! in a container of its own as uid 1337. A mesh pod's application connects at its first
//! instruction: its connection must reach Envoy, or be refused while Envoy is not up, never
//! escape; later connections are all captured, outbound to a pod outside the mesh and from
//! one mesh pod to another (through both Envoys, the second by inbound capture); deleting
//! the pod (DEL at StopPodSandbox, again at RemovePodSandbox with no netns) removes it from
//! the daemon.

use std::time::Duration;

use redirect_lab::{
    envoy, eventually,
    wire::{ClientResult, EnvoyRecord, ProxyRecord},
    Lab, PROXY_UID,
};
use redirect_node::{cri::stdout_lines, Node, Pod, PodSpec, LAB_MOUNT};
use redirect_tests::{
    cni_lab,
    fake_apiserver::{pending_pod, FakeApiServer},
    taken_by,
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
    /// by containerd (the CNI chain registers it), then its sidecar container: Envoy with
    /// Istio's listener shapes for the pod's addresses, uid 1337.
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
        let ips = self.node.cri.pod_ips(&pod.id).unwrap();
        let v4 = ips.iter().find(|ip| ip.contains('.')).unwrap();
        let v6 = ips.iter().find(|ip| ip.contains(':')).unwrap();
        let config_dir = self.lab.dir.join(format!("{name}-envoy"));
        std::fs::create_dir_all(&config_dir).unwrap();
        let bootstrap = envoy::bootstrap(v4, v6, envoy::Mode::Redirect);
        std::fs::write(
            config_dir.join("envoy.json"),
            serde_json::to_vec(&bootstrap).unwrap(),
        )
        .unwrap();
        let binary = envoy::binary();
        let envoy_dir = binary.parent().unwrap();
        let mut command = vec!["/rlab-envoy/envoy".to_string()];
        command.extend(envoy::args(std::path::Path::new(
            "/etc/rlab-envoy/envoy.json",
        )));
        let command: Vec<&str> = command.iter().map(String::as_str).collect();
        let sidecar = self.node.container(
            "istio-proxy",
            PROXY_UID as i64,
            &command,
            &[(envoy_dir, "/rlab-envoy"), (&config_dir, "/etc/rlab-envoy")],
        );
        self.node
            .cri
            .start_container(&pod.id, sidecar, &pod.config)
            .unwrap();
        pod
    }

    /// What the pod's Envoy logged (its access log, on the container's stdout).
    fn sidecar_log(&self, pod: &Pod) -> Vec<ProxyRecord> {
        stdout_lines(&self.node.log_path(pod, "istio-proxy"))
            .iter()
            .filter_map(|l| serde_json::from_str::<EnvoyRecord>(l).ok())
            .filter_map(|r| r.as_proxy_record())
            .collect()
    }

    /// Connections made from the pod's long-lived application container until all `count`
    /// of one run succeed (Envoy may still be starting), at most 20 s.
    fn connections(&mut self, shell: &str, target: &str, count: usize) -> Vec<ClientResult> {
        let tool = lab_tool("redirect-lab");
        let n = count.to_string();
        let mut results = Vec::new();
        let ok = eventually(Duration::from_secs(20), "connections from the pod", || {
            let out = self
                .node
                .cri
                .exec(
                    shell,
                    &[&tool, "client", "--target", target, "--count", &n],
                    Duration::from_secs(10),
                )
                .ok()?;
            results = out
                .stdout
                .lines()
                .filter_map(|l| serde_json::from_str::<ClientResult>(l).ok())
                .collect();
            (results.len() == count && results.iter().all(|r| r.error.is_none())).then_some(())
        });
        assert!(ok.is_ok(), "{results:?}");
        results
    }

    fn captured(&self, pod: &Pod, r: &ClientResult) -> bool {
        taken_by(&self.sidecar_log(pod), r)
    }
}

/// Envoy logs a connection when it closes, and flushes its log every few milliseconds.
fn eventually_captured(n: &RealNode, pod: &Pod, results: &[ClientResult]) {
    let all = eventually(Duration::from_secs(5), "Envoy's access log", || {
        results.iter().all(|r| n.captured(pod, r)).then_some(())
    });
    assert!(
        all.is_ok(),
        "escaped: {results:?}\nEnvoy saw {:?}",
        n.sidecar_log(pod)
    );
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
        &[],
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
        eventually_captured(&n, &pod, std::slice::from_ref(&first));
    }

    // Once Envoy is up, every connection is captured: a long-lived application container,
    // connections made in it with ExecSync.
    let shell = n.node.container("shell", 1000, &["sleep", "3600"], &[]);
    let shell_id = n
        .node
        .cri
        .start_container(&pod.id, shell, &pod.config)
        .unwrap();
    let dst = n.dst.clone();
    let results = n.connections(&shell_id, &dst, 5);
    eventually_captured(&n, &pod, &results);

    // Mesh to mesh: a second mesh pod with its own Envoy and a server container; web's
    // connections go out through web's Envoy and in through api's (inbound capture).
    let api = n.mesh_pod("api");
    let server = n.node.container(
        "server",
        1000,
        &[&lab_tool("redirect-lab"), "server", "--port", "8080"],
        &[],
    );
    n.node
        .cri
        .start_container(&api.id, server, &api.config)
        .unwrap();
    let api_ip = n.node.cri.pod_ips(&api.id).unwrap()[0].clone();
    let results = n.connections(&shell_id, &format!("{api_ip}:8080"), 5);
    eventually_captured(&n, &pod, &results);
    let inbound = eventually(
        Duration::from_secs(5),
        "api's Envoy took them inbound",
        || {
            let log = n.sidecar_log(&api);
            let inbound = log.iter().filter(|r| r.event == "inbound").count();
            (inbound >= results.len()).then_some(inbound)
        },
    );
    assert!(inbound.is_ok(), "{:?}", n.sidecar_log(&api));
    eprintln!(
        "Envoy containers: web took {} connections, api {} inbound",
        n.sidecar_log(&pod).len(),
        n.sidecar_log(&api)
            .iter()
            .filter(|r| r.event == "inbound")
            .count()
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
