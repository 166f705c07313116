//! Outbound capture on the real kernel: every test builds its own lab (namespaces, cgroups,
//! pins) and removes it, even on failure.

use redirect_lab::wire::ServerReply;
use redirect_tests::{curl, lab, pods_yaml};

/// curl in a mesh pod to a server outside the mesh, IPv4 and IPv6: the response arrives, the
/// sidecar logged the connection with the right original destination, the server saw the
/// pod's address (the proxy connected upstream), and the app's getpeername is untouched.
#[test]
fn curl_through_sidecar_ipv4_and_ipv6() {
    let mut lab = lab();
    lab.add_pod("client").unwrap();
    lab.add_pod("ext").unwrap();
    let sidecar = lab.start_sidecar("client").unwrap();
    lab.start_server("ext", &[8080]).unwrap();
    let yaml = pods_yaml(&[lab.pod("client").yaml_entry(&[])]);
    lab.start_daemon(&yaml, &[]).unwrap();
    lab.daemon().wait_pods(&["client"]).unwrap();

    let client = lab.pod("client");
    let ext = lab.pod("ext");
    for (url, dst) in [
        (format!("http://{}:8080/", ext.v4), format!("{}:8080", ext.v4)),
        (format!("http://[{}]:8080/", ext.v6), format!("[{}]:8080", ext.v6)),
    ] {
        let body = curl(&lab, "client", &url).unwrap();
        let reply: ServerReply = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body:?}: {e}"));
        let records = lab.sidecar_log(sidecar);
        let rec = records
            .iter()
            .rev()
            .find(|r| r.orig_dst.as_deref() == Some(dst.as_str()))
            .unwrap_or_else(|| panic!("sidecar did not see {dst}: {records:#?}"));
        assert_eq!(rec.event, "outbound");
        // The server saw the proxy's upstream connection, from the pod's own address.
        assert_eq!(Some(&reply.peer), rec.upstream_local.as_ref());
        let client_ip = if dst.starts_with('[') { client.v6 } else { client.v4 };
        assert!(reply.peer.contains(&client_ip.to_string()), "server saw {}", reply.peer);
        assert_eq!(reply.local, dst);
    }
    let st = lab.daemon().pod_status("client").unwrap();
    assert!(st["outbound_captured"].as_u64().unwrap() >= 2, "{st:#}");
    assert!(st["orig_dst_answered"].as_u64().unwrap() >= 2, "{st:#}");
}
