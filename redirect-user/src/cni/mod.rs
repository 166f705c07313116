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
