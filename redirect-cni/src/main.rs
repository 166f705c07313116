//! `redirect-cni`: see the library's documentation for what each command does.

use std::{
    io::{Read, Write},
    process::ExitCode,
    time::Duration,
};

use redirect_cni::{
    args::{self, Command, Env},
    error::{CniError, Code},
    netconf::{self, NetConf},
    talk, SUPPORTED_VERSIONS,
};
use redirect_common::cni::{CniCommand, CniReply, CniRequest};
use serde_json::{json, Value};

/// How long DEL waits for the daemon: DEL never fails, so it does not hold the runtime long.
const DEL_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let env = args::read(|k| std::env::var(k).ok());
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let (version, result) = match (env, read) {
        (Err(e), _) => ("1.0.0".to_string(), Err(e)),
        (_, Err(e)) => (
            "1.0.0".to_string(),
            Err(CniError::new(Code::Io, "reading stdin", e.to_string())),
        ),
        (Ok(env), Ok(_)) => run(&env, &stdin),
    };
    let mut out = std::io::stdout().lock();
    match result {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&version));
            eprintln!("redirect-cni: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command; returns the spec version to answer in and what to print.
fn run(env: &Env, stdin: &[u8]) -> (String, Result<Option<Value>, CniError>) {
    if env.command == Command::Version {
        let v = json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS});
        return ("1.0.0".into(), Ok(Some(v)));
    }
    let conf = match netconf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return ("1.0.0".into(), Err(e)),
    };
    let version = conf.cni_version.clone();
    let result = match env.command {
        Command::Add => add(env, &conf).map(Some),
        Command::Check => check(env, &conf).map(|()| None),
        Command::Del => {
            del(env, &conf);
            Ok(None)
        }
        Command::Version => unreachable!("answered above"),
    };
    (version, result)
}

/// The request for the daemon, or `None` when the call is not about a mesh candidate (not a
/// Kubernetes pod, or an excluded namespace).
fn request(env: &Env, conf: &NetConf, command: CniCommand) -> Option<CniRequest> {
    let pod = env.pod.as_ref()?;
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return None;
    }
    Some(CniRequest {
        command,
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        ips: conf
            .prev_result
            .as_ref()
            .map(netconf::pod_ips)
            .unwrap_or_default(),
    })
}

fn prev_result(conf: &NetConf) -> Result<Value, CniError> {
    let mut prev = conf.prev_result.clone().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "redirect-cni is a chained plugin and got no prevResult",
            "put it after the primary network plugin in the conflist",
        )
    })?;
    if let Some(obj) = prev.as_object_mut() {
        obj.entry("cniVersion")
            .or_insert_with(|| Value::String(conf.cni_version.clone()));
    }
    Ok(prev)
}

/// Asks the daemon; a transport failure or an answer that makes no sense for `what` (ADD or
/// CHECK) is a "try again later" error naming the pod.
fn ask(conf: &NetConf, req: &CniRequest, what: &str) -> Result<CniReply, CniError> {
    let pod = format!("{}/{}", req.namespace, req.name);
    match talk::ask(&conf.socket, req, Duration::from_secs(conf.timeout_seconds)) {
        Ok(CniReply::Removed) => Err(CniError::new(
            Code::TryAgainLater,
            format!("redirectd gave an unexpected answer for pod {pod}"),
            format!("{:?}", CniReply::Removed),
        )),
        Ok(reply) => Ok(reply),
        Err(e) if what == "ADD" => Err(CniError::new(
            Code::TryAgainLater,
            format!("pod {pod} cannot be captured: redirectd is not answering, so it must not start yet"),
            e,
        )),
        Err(e) => Err(CniError::new(
            Code::TryAgainLater,
            format!("cannot check pod {pod}"),
            e,
        )),
    }
}

fn add(env: &Env, conf: &NetConf) -> Result<Value, CniError> {
    let prev = prev_result(conf)?;
    let Some(req) = request(env, conf, CniCommand::Add) else {
        return Ok(prev);
    };
    let pod = format!("{}/{}", req.namespace, req.name);
    match ask(conf, &req, "ADD")? {
        CniReply::Refused { reason } => Err(CniError::new(
            Code::PodRefused,
            format!("redirectd refused pod {pod}"),
            reason,
        )),
        CniReply::Unavailable { reason } => Err(CniError::new(
            Code::TryAgainLater,
            format!("pod {pod} cannot be captured yet, so it must not start yet"),
            reason,
        )),
        // `ask` turns Removed into an error.
        CniReply::Captured { .. } | CniReply::NotInMesh { .. } | CniReply::Removed => Ok(prev),
    }
}

fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    prev_result(conf)?;
    let Some(req) = request(env, conf, CniCommand::Check) else {
        return Ok(());
    };
    match ask(conf, &req, "CHECK")? {
        CniReply::Refused { reason } | CniReply::Unavailable { reason } => Err(CniError::new(
            Code::PodRefused,
            format!("pod {}/{} is not captured", req.namespace, req.name),
            reason,
        )),
        CniReply::Captured { .. } | CniReply::NotInMesh { .. } | CniReply::Removed => Ok(()),
    }
}

/// Best effort: the daemon also drops a pod whose sandbox is gone, and a failing DEL would
/// only keep the runtime from cleaning up.
fn del(env: &Env, conf: &NetConf) {
    let Some(req) = request(env, conf, CniCommand::Del) else {
        return;
    };
    if let Err(e) = talk::ask(
        &conf.socket,
        &req,
        DEL_TIMEOUT.min(Duration::from_secs(conf.timeout_seconds)),
    ) {
        eprintln!(
            "redirect-cni: DEL of pod {}/{}: {e}; redirectd removes its entries when it sees the sandbox gone",
            req.namespace, req.name
        );
    }
}
