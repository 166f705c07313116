//! A blocking CRI v1 client over containerd's unix socket: the calls kubelet makes to run a
//! pod (the API definition and its generated client are the `k8s-cri` crate's).

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, ContainerConfig, ContainerState,
    ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest, ListPodSandboxRequest,
    PodSandboxConfig, PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
    VersionRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// The client and the runtime it runs on (the lab is synchronous).
pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
}

/// What an `ExecSync` gave.
#[derive(Debug)]
pub struct Exec {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

impl Cri {
    /// Connects to the CRI at `socket`; checks it answers `Version`.
    pub fn connect(socket: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let path = socket.to_path_buf();
        let client = rt.block_on(async move {
            // The URI is required and unused: every connection is the unix socket.
            let channel = Endpoint::try_from("http://[::1]:0")?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .context("connecting to the CRI socket")?;
            anyhow::Ok(RuntimeServiceClient::new(channel))
        })?;
        let mut cri = Self { rt, client };
        cri.version()?;
        Ok(cri)
    }

    /// The runtime's name and version.
    pub fn version(&mut self) -> Result<String> {
        let c = &mut self.client;
        let v = self
            .rt
            .block_on(c.version(VersionRequest {
                version: "v1".into(),
            }))
            .context("CRI Version")?
            .into_inner();
        Ok(format!("{} {}", v.runtime_name, v.runtime_version))
    }

    /// `RunPodSandbox`: the runtime makes the pod's namespaces and runs the CNI chain (ADD).
    pub fn run_pod_sandbox(&mut self, config: PodSandboxConfig) -> Result<String> {
        let c = &mut self.client;
        let r = self
            .rt
            .block_on(c.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            }))
            .context("CRI RunPodSandbox")?;
        Ok(r.into_inner().pod_sandbox_id)
    }

    /// The pod's addresses (the first, then the others), as the runtime reports them from
    /// the CNI result.
    pub fn pod_ips(&mut self, pod: &str) -> Result<Vec<String>> {
        let c = &mut self.client;
        let r = self
            .rt
            .block_on(c.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.into(),
                verbose: false,
            }))
            .context("CRI PodSandboxStatus")?
            .into_inner();
        let network = r
            .status
            .and_then(|s| s.network)
            .filter(|n| !n.ip.is_empty())
            .context("the sandbox has no address")?;
        Ok(std::iter::once(network.ip)
            .chain(network.additional_ips.into_iter().map(|a| a.ip))
            .collect())
    }

    /// `CreateContainer` then `StartContainer`; returns the container's id.
    pub fn start_container(
        &mut self,
        pod: &str,
        config: ContainerConfig,
        sandbox: &PodSandboxConfig,
    ) -> Result<String> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let c = &mut self.client;
        let id = self
            .rt
            .block_on(c.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(sandbox.clone()),
            }))
            .with_context(|| format!("CRI CreateContainer {name}"))?
            .into_inner()
            .container_id;
        self.rt
            .block_on(c.start_container(StartContainerRequest {
                container_id: id.clone(),
            }))
            .with_context(|| format!("CRI StartContainer {name}"))?;
        Ok(id)
    }

    /// The container's state and exit code.
    pub fn container_state(&mut self, id: &str) -> Result<(ContainerState, i32, String)> {
        let c = &mut self.client;
        let s = self
            .rt
            .block_on(c.container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            }))
            .context("CRI ContainerStatus")?
            .into_inner()
            .status
            .context("no container status")?;
        Ok((s.state(), s.exit_code, s.log_path))
    }

    /// The container's main process, as the runtime's verbose status gives it (containerd:
    /// `info.pid`), in the node's pid namespace.
    pub fn container_pid(&mut self, id: &str) -> Result<u32> {
        let c = &mut self.client;
        let r = self
            .rt
            .block_on(c.container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: true,
            }))
            .context("CRI ContainerStatus")?
            .into_inner();
        let info: serde_json::Value =
            serde_json::from_str(r.info.get("info").context("no verbose info")?)?;
        info["pid"]
            .as_u64()
            .map(|p| p as u32)
            .context("no pid in the container's verbose status")
    }

    /// Waits until the container has exited; returns its exit code.
    pub fn wait_exited(&mut self, id: &str, within: Duration) -> Result<i32> {
        let until = std::time::Instant::now() + within;
        loop {
            let (state, code, _) = self.container_state(id)?;
            if state == ContainerState::ContainerExited {
                return Ok(code);
            }
            if std::time::Instant::now() > until {
                anyhow::bail!("container {id} still {state:?} after {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ExecSync`: runs `cmd` in the container, as the container's user.
    pub fn exec(&mut self, id: &str, cmd: &[&str], timeout: Duration) -> Result<Exec> {
        let c = &mut self.client;
        let r = self
            .rt
            .block_on(c.exec_sync(ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout.as_secs().max(1) as i64,
            }))
            .with_context(|| format!("CRI ExecSync {cmd:?}"))?
            .into_inner();
        Ok(Exec {
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
            exit_code: r.exit_code,
        })
    }

    /// `StopContainer` then `RemoveContainer`.
    pub fn remove_container(&mut self, id: &str) -> Result<()> {
        let c = &mut self.client;
        self.rt
            .block_on(c.stop_container(StopContainerRequest {
                container_id: id.into(),
                timeout: 1,
            }))
            .context("CRI StopContainer")?;
        self.rt
            .block_on(c.remove_container(RemoveContainerRequest {
                container_id: id.into(),
            }))
            .context("CRI RemoveContainer")?;
        Ok(())
    }

    /// `StopPodSandbox` (CNI DEL) then `RemovePodSandbox` (DEL again, with no netns), as
    /// kubelet deletes a pod.
    pub fn remove_pod(&mut self, pod: &str) -> Result<()> {
        let c = &mut self.client;
        self.rt
            .block_on(c.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            }))
            .context("CRI StopPodSandbox")?;
        self.rt
            .block_on(c.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            }))
            .context("CRI RemovePodSandbox")?;
        Ok(())
    }

    /// Every sandbox the runtime has.
    pub fn pods(&mut self) -> Result<Vec<String>> {
        let c = &mut self.client;
        let r = self
            .rt
            .block_on(c.list_pod_sandbox(ListPodSandboxRequest { filter: None }))
            .context("CRI ListPodSandbox")?
            .into_inner();
        Ok(r.items.into_iter().map(|s| s.id).collect())
    }
}

/// The lines a container wrote to stdout, from its CRI log file (`<time> <stream> <tag>
/// <line>`; partial lines, tag `P`, joined).
pub fn stdout_lines(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut lines = Vec::new();
    let mut partial = String::new();
    for l in text.lines() {
        let mut parts = l.splitn(4, ' ');
        let (_, stream, tag, rest) = (parts.next(), parts.next(), parts.next(), parts.next());
        if stream != Some("stdout") {
            continue;
        }
        partial.push_str(rest.unwrap_or(""));
        if tag == Some("F") {
            lines.push(std::mem::take(&mut partial));
        }
    }
    lines
}
