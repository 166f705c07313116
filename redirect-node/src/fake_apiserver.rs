//! A fake Kubernetes API server (none exists on these machines) for the tests, the demo and
//! the benchmark: it speaks the real list/watch wire
//! format for `/api/v1/pods` (a `PodList` with a resourceVersion; a chunked stream of
//! `WatchEvent`s), and can send `410 Gone`, drop its watch streams, or change pods without
//! telling (so only a re-list sees it).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    sync::{mpsc, Arc, Mutex},
};

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

#[derive(Default)]
struct State {
    pods: BTreeMap<String, Value>,
    rv: u64,
    watchers: Vec<mpsc::Sender<Option<String>>>,
    lists: u64,
    watches: u64,
    paths: Vec<String>,
    /// Bodies of the Events posted.
    events: Vec<Value>,
    /// Pods only a direct GET finds (see `apply_unlisted`).
    unlisted: BTreeMap<String, Value>,
}

/// The server; dropped, it stops accepting (its threads end with their connections).
pub struct FakeApiServer {
    pub url: String,
    state: Arc<Mutex<State>>,
}

fn respond_list(mut s: TcpStream, state: &Arc<Mutex<State>>) {
    let body = {
        let mut st = state.lock().unwrap();
        st.lists += 1;
        json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": st.pods.values().cloned().collect::<Vec<_>>(),
        })
        .to_string()
    };
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn respond_watch(mut s: TcpStream, state: &Arc<Mutex<State>>) {
    let (tx, rx) = mpsc::channel();
    {
        let mut st = state.lock().unwrap();
        st.watches += 1;
        st.watchers.push(tx);
    }
    if s.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .is_err()
    {
        return;
    }
    // `None` closes the stream abruptly (a dropped connection).
    while let Ok(Some(line)) = rx.recv() {
        let chunk = format!("{line}\n");
        if write!(s, "{:x}\r\n{chunk}\r\n", chunk.len()).is_err() || s.flush().is_err() {
            return;
        }
    }
}

fn respond(mut s: &TcpStream, code: &str, body: &str) {
    let _ = write!(
        s,
        "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// `GET /api/v1/namespaces/NS/pods/NAME`: the pod, or a 404 Status.
fn respond_get(s: &TcpStream, state: &Arc<Mutex<State>>, ns: &str, name: &str) {
    let pod = {
        let st = state.lock().unwrap();
        let key = format!("{ns}/{name}");
        st.pods.get(&key).or_else(|| st.unlisted.get(&key)).cloned()
    };
    match pod {
        Some(p) => respond(s, "200 OK", &p.to_string()),
        None => respond(
            s,
            "404 Not Found",
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("pods \"{name}\" not found"), "reason": "NotFound", "code": 404})
            .to_string(),
        ),
    }
}

fn handle(s: TcpStream, state: Arc<Mutex<State>>) {
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; content_length];
    if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
        return;
    }
    let method = request.split_whitespace().next().unwrap_or("").to_string();
    let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
    state.lock().unwrap().paths.push(path.clone());
    let parts: Vec<&str> = path.split('?').next().unwrap_or("").split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("POST", ["", "api", "v1", "namespaces", _, "events"]) => {
            let mut event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            event["metadata"]["name"] = json!("ev");
            state.lock().unwrap().events.push(event.clone());
            respond(&s, "201 Created", &event.to_string());
        }
        ("GET", ["", "api", "v1", "namespaces", ns, "pods", name]) => {
            respond_get(&s, &state, ns, name)
        }
        ("GET", ["", "api", "v1", "pods"])
            if path.contains("watch=true") || path.contains("watch=1") =>
        {
            respond_watch(s, &state)
        }
        ("GET", ["", "api", "v1", "pods"]) => respond_list(s, &state),
        _ => respond(&s, "404 Not Found", "{}"),
    }
}

impl FakeApiServer {
    pub fn start() -> Self {
        Self::serve(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    /// A server on the loopback of network namespace `netns` (a node's, whose host-network
    /// pods reach it at its `url`).
    pub fn start_in(netns: &std::path::Path) -> Self {
        let netns = netns.to_path_buf();
        let l = std::thread::spawn(move || {
            use std::os::fd::AsRawFd as _;
            let ns = std::fs::File::open(&netns).unwrap();
            // SAFETY: setns(2) of this short-lived thread only; the socket keeps its namespace.
            let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0);
            TcpListener::bind("127.0.0.1:0").unwrap()
        })
        .join()
        .unwrap();
        Self::serve(l)
    }

    fn serve(l: TcpListener) -> Self {
        let url = format!("http://{}", l.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            rv: 1,
            ..Default::default()
        }));
        let st = state.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || handle(s, st));
            }
        });
        Self { url, state }
    }

    fn event(&self, kind: &str, pod: &Pod, notify: bool) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let mut v = serde_json::to_value(pod).unwrap();
        v["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let name = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or("default"),
            pod.metadata.name.as_deref().unwrap_or("")
        );
        if kind == "DELETED" {
            st.pods.remove(&name);
        } else {
            st.pods.insert(name, v.clone());
        }
        if notify {
            let line = json!({"type": kind, "object": v}).to_string();
            st.watchers.retain(|w| w.send(Some(line.clone())).is_ok());
        }
    }

    /// A pod added or changed, announced on the watch streams.
    pub fn apply(&self, pod: &Pod, added: bool) {
        self.event(if added { "ADDED" } else { "MODIFIED" }, pod, true);
    }

    pub fn delete(&self, pod: &Pod) {
        self.event("DELETED", pod, true);
    }

    /// A change only a re-list will see.
    pub fn apply_silently(&self, pod: &Pod) {
        self.event("ADDED", pod, false);
    }

    /// `410 Gone` on every watch stream, then closes them: the client must re-list.
    pub fn gone(&self) {
        let mut st = self.state.lock().unwrap();
        let line = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410}})
        .to_string();
        for w in st.watchers.drain(..) {
            let _ = w.send(Some(line.clone()));
            let _ = w.send(None);
        }
    }

    /// Drops every watch stream without a word.
    pub fn drop_streams(&self) {
        let mut st = self.state.lock().unwrap();
        for w in st.watchers.drain(..) {
            let _ = w.send(None);
        }
    }

    /// Every request path (with its query) received so far.
    pub fn paths(&self) -> Vec<String> {
        self.state.lock().unwrap().paths.clone()
    }

    /// The Events posted so far (their JSON bodies).
    pub fn events(&self) -> Vec<Value> {
        self.state.lock().unwrap().events.clone()
    }

    /// A change that the watch streams do not announce and lists do not show: the pod only
    /// exists for a direct GET (a watch lagging behind the API server).
    pub fn apply_unlisted(&self, pod: &Pod) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let v = serde_json::to_value(pod).unwrap();
        let name = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or("default"),
            pod.metadata.name.as_deref().unwrap_or("")
        );
        st.unlisted.insert(name, v);
    }

    /// `(lists, watches)` served so far.
    pub fn requests(&self) -> (u64, u64) {
        let st = self.state.lock().unwrap();
        (st.lists, st.watches)
    }
}

/// An Istio-injected, Running pod on `node` with these addresses and annotations.
pub fn mesh_pod(name: &str, node: &str, ips: &[&str], annotations: &[(&str, &str)]) -> Pod {
    let mut ann: BTreeMap<String, String> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ann.insert(
        "sidecar.istio.io/status".into(),
        "{\"containers\":[\"istio-proxy\"]}".into(),
    );
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "annotations": ann},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}, {"name": "istio-proxy", "image": "proxyv2"}]},
        "status": {"phase": "Running", "podIP": ips[0], "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()},
    }))
    .unwrap()
}

/// A Linkerd-injected, Running pod on `node` (its `linkerd-proxy` container as uid 2102, as
/// Linkerd's injector writes it) with these addresses and annotations.
pub fn linkerd_pod(name: &str, node: &str, ips: &[&str], annotations: &[(&str, &str)]) -> Pod {
    let mut pod = mesh_pod(name, node, ips, annotations);
    if let Some(ann) = pod.metadata.annotations.as_mut() {
        ann.remove("sidecar.istio.io/status");
        ann.insert("linkerd.io/proxy-version".into(), "edge-lab".into());
    }
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers = serde_json::from_value(json!([
            {"name": "app", "image": "app"},
            {"name": "linkerd-proxy", "image": "proxy", "securityContext": {"runAsUser": 2102}},
        ]))
        .unwrap_or_default();
    }
    pod
}

/// An Istio-injected pod of `namespace` on `node`, just bound: Pending, no address yet (its
/// sandbox is being created), with this uid and these annotations.
pub fn pending_pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    annotations: &[(&str, &str)],
) -> Pod {
    let mut pod = mesh_pod(name, node, &["0.0.0.0"], annotations);
    pod.metadata.namespace = Some(namespace.into());
    pod.metadata.uid = Some(uid.into());
    pod.status = serde_json::from_value(json!({"phase": "Pending"})).unwrap();
    pod
}

/// `pod` with its sandbox's addresses, as kubelet reports them once the sandbox is up.
pub fn with_ips(mut pod: Pod, ips: &[std::net::IpAddr], phase: &str) -> Pod {
    pod.status = serde_json::from_value(json!({
        "phase": phase,
        "podIP": ips[0].to_string(),
        "podIPs": ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
    }))
    .unwrap();
    pod
}
