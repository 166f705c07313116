//! The daemon's side of the chained CNI plugin (`redirect-cni`): a unix socket the plugin
//! calls when a pod's sandbox is created or torn down ([`server`]), and the pods registered
//! that way ([`registry`]), which the loop lays over what the pod source publishes, so a pod
//! is captured from its first packet, before the pod watch shows it with an address.

pub mod install;
pub mod registry;
pub mod server;

pub use registry::{Registration, Registry};
pub use server::{serve, CniCall};

/// Where the plugin finds the daemon, and where registrations survive a restart.
#[derive(Debug, Clone)]
pub struct CniOptions {
    pub socket: std::path::PathBuf,
    pub state_file: std::path::PathBuf,
}

use redirect_common::cni::{CniCommand, CniReply};

/// Takes a call into the registry before the loop's pass. `Some(reply)`: answered at once
/// (the request itself is unusable).
pub fn take(registry: &mut Registry, call: &CniCall) -> Option<CniReply> {
    let r = &call.request;
    match r.command {
        CniCommand::Add => {
            let netns = std::path::PathBuf::from(&r.netns);
            if !netns.is_absolute() {
                return Some(CniReply::Refused {
                    reason: format!("CNI_NETNS {:?} is not an absolute path", r.netns),
                });
            }
            let mut ips = Vec::new();
            for ip in &r.ips {
                match ip.parse() {
                    Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                    Ok(_) => {}
                    Err(_) => {
                        return Some(CniReply::Refused {
                            reason: format!(
                                "the previous plugin's address {ip:?} is not an IP address"
                            ),
                        })
                    }
                }
            }
            registry.register(Registration {
                key: call.key.clone(),
                uid: r.uid.clone(),
                container_id: r.container_id.clone(),
                netns,
                ips,
                policy: call.policy.clone().unwrap_or_default(),
            });
            None
        }
        CniCommand::Del => {
            registry.remove(&call.key, &r.container_id, &r.uid);
            None
        }
        CniCommand::Check => None,
    }
}

/// What a call gets after the pass: `applied` is the pod's slot if it is in the maps now,
/// `problem` why it is not (its namespace not found, a map write failed).
pub fn outcome(call: &CniCall, applied: Option<u32>, problem: Option<String>) -> CniReply {
    let key = &call.key;
    match (call.request.command, applied) {
        (CniCommand::Del, _) => CniReply::Removed,
        (_, Some(pod_id)) if problem.is_none() => CniReply::Captured { pod_id },
        (CniCommand::Add, _) => CniReply::Unavailable {
            reason: problem.unwrap_or_else(|| format!("pod {key} was not applied")),
        },
        (CniCommand::Check, _) => CniReply::Refused {
            reason: problem.unwrap_or_else(|| format!("pod {key} is not in the maps")),
        },
    }
}

#[cfg(test)]
mod tests {
    use redirect_common::cni::CniRequest;
    use tokio::sync::oneshot;

    use super::*;
    use crate::{pods::PodKey, sources::Published};

    fn call(command: CniCommand, netns: &str, ips: &[&str]) -> CniCall {
        let (reply, _) = oneshot::channel();
        CniCall {
            request: CniRequest {
                command,
                container_id: "sandbox-1".into(),
                netns: netns.into(),
                namespace: "shop".into(),
                name: "web".into(),
                uid: Some("u1".into()),
                ips: ips.iter().map(ToString::to_string).collect(),
            },
            key: PodKey {
                namespace: "shop".into(),
                name: "web".into(),
            },
            policy: None,
            reply,
            received: std::time::Instant::now(),
        }
    }

    fn registry(test: &str) -> (Registry, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("redirectd-cni-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (Registry::load(&dir.join("state.json")).unwrap(), dir)
    }

    /// An ADD is refused at once for a relative netns or an address that is not one; a good
    /// one is registered (its addresses once each) and served by the next pass; DEL takes it
    /// back out.
    #[test]
    fn take_registers_good_adds_and_refuses_bad_ones() {
        let (mut r, dir) = registry("take");
        let refused = |reply: Option<CniReply>, what: &str| match reply {
            Some(CniReply::Refused { reason }) => assert!(reason.contains(what), "{reason}"),
            other => panic!("{what}: {other:?}"),
        };
        refused(
            take(&mut r, &call(CniCommand::Add, "netns/x", &[])),
            "absolute",
        );
        refused(
            take(
                &mut r,
                &call(CniCommand::Add, "/run/netns/x", &["10.0.0.300"]),
            ),
            "10.0.0.300",
        );
        assert!(r.overlay(&Published::default()).pods.is_empty());
        // A registration lives as long as its namespace file.
        let netns = dir.join("ns-web");
        std::fs::write(&netns, b"").unwrap();
        let add = call(
            CniCommand::Add,
            netns.to_str().unwrap(),
            &["10.0.0.9", "10.0.0.9"],
        );
        assert_eq!(take(&mut r, &add), None);
        let desired = r.overlay(&Published::default());
        assert_eq!(desired.pods.len(), 1);
        assert_eq!(
            desired.pods[0].ips,
            vec!["10.0.0.9".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(take(&mut r, &call(CniCommand::Del, "", &[])), None);
        assert!(r.overlay(&Published::default()).pods.is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The answer after a pass: DEL is always done; served without a problem is captured;
    /// otherwise an ADD is "try again" and a CHECK a refusal, with the reason.
    #[test]
    fn outcome_after_a_pass() {
        let add = call(CniCommand::Add, "/run/netns/x", &[]);
        let check = call(CniCommand::Check, "/run/netns/x", &[]);
        let del = call(CniCommand::Del, "", &[]);
        assert_eq!(outcome(&del, None, Some("x".into())), CniReply::Removed);
        assert_eq!(
            outcome(&add, Some(3), None),
            CniReply::Captured { pod_id: 3 }
        );
        assert_eq!(
            outcome(&check, Some(3), None),
            CniReply::Captured { pod_id: 3 }
        );
        assert_eq!(
            outcome(&add, Some(3), Some("failed".into())),
            CniReply::Unavailable {
                reason: "failed".into()
            }
        );
        assert_eq!(
            outcome(&add, None, None),
            CniReply::Unavailable {
                reason: "pod shop/web was not applied".into()
            }
        );
        assert_eq!(
            outcome(&check, None, None),
            CniReply::Refused {
                reason: "pod shop/web is not in the maps".into()
            }
        );
    }
}
