//! Istio's own capture installed by mistake beside redirectd (istio-cni, or istio-init, writing
//! its iptables rules into pods redirectd also serves): every connection still reaches its
//! destination through the sidecar exactly once, in both directions, with Envoy as the
//! sidecar. Outbound, redirectd's `connect()` rewrite to 127.0.0.1:15001 comes first and
//! Istio's rules return it; inbound, Istio's REDIRECT to 15006 comes first and redirectd
//! leaves the proxy's port alone.

use redirect_lab::istio_iptables::{self, Options};
use redirect_tests::{lab, pods_yaml};

#[test]
fn istio_iptables_and_redirectd_together_capture_once() {
    let mut lab = lab();
    for p in ["client", "srv", "ext", "plain"] {
        lab.add_pod(p).unwrap();
    }
    lab.start_server("srv", &[8080]).unwrap();
    lab.start_server("ext", &[8080]).unwrap();
    let client_envoy = lab.start_envoy("client").unwrap();
    let srv_envoy = lab.start_envoy("srv").unwrap();
    for p in ["client", "srv"] {
        istio_iptables::install(&lab.pod(p).netns, &Options::default()).unwrap();
    }
    let pods = pods_yaml(&[
        lab.pod("client").yaml_entry(&[]),
        lab.pod("srv").yaml_entry(&[]),
    ]);
    lab.start_daemon(&pods, &[]).unwrap();
    lab.daemon().wait_pods(&["client", "srv"]).unwrap();

    for v6 in [false, true] {
        let (ext, srv) = (lab.pod("ext"), lab.pod("srv"));
        let (ext_t, srv_t) = if v6 {
            (format!("[{}]:8080", ext.v6), format!("[{}]:8080", srv.v6))
        } else {
            (format!("{}:8080", ext.v4), format!("{}:8080", srv.v4))
        };
        let before = lab.envoy_log(client_envoy).len();
        let r = lab
            .client(Some("client"), None, &["--target", &ext_t])
            .unwrap();
        assert!(r[0].error.is_none(), "{r:?}");
        let out: Vec<String> = lab
            .envoy_log_since(client_envoy, before)
            .into_iter()
            .map(|e| e.listener)
            .collect();
        assert_eq!(out, ["outbound"], "client -> ext ({ext_t}): {r:?}");

        let before = lab.envoy_log(srv_envoy).len();
        let r = lab
            .client(Some("plain"), None, &["--target", &srv_t])
            .unwrap();
        assert!(r[0].error.is_none(), "{r:?}");
        let reply = r[0].reply.as_ref().unwrap();
        assert!(
            reply.peer.starts_with("127.0.0.6") || reply.peer.starts_with("[::6]"),
            "the app saw {reply:?}"
        );
        let inb: Vec<String> = lab
            .envoy_log_since(srv_envoy, before)
            .into_iter()
            .map(|e| e.listener)
            .collect();
        assert_eq!(inb, ["inbound"], "plain -> srv ({srv_t})");
    }
    for p in ["client", "srv"] {
        istio_iptables::remove(&lab.pod(p).netns).unwrap();
    }
}
