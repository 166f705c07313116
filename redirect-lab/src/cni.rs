//! The lab as a container runtime: a CNI network (Debian's `containernetworking-plugins`:
//! `loopback`, then `bridge` with `host-local` addresses, then `redirect-cni`, as one conflist)
//! executed per the CNI spec, as containerd does it: each plugin found by its `type` in
//! `CNI_PATH`, called with `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`,
//! `CNI_ARGS` and `CNI_PATH` in its environment and its configuration (with `name`,
//! `cniVersion` and the previous plugin's result as `prevResult`) on stdin; DEL in reverse
//! order with the cached ADD result. The plugins run in the lab's node namespace, so the
//! bridge and its routes are the lab's, never the host's.

use std::{
    fs::File,
    io::Write as _,
    net::IpAddr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::Ordering,
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::{bin, Cgroup, Lab, Netns, Placement, NEXT};

/// The CNI pods' subnets (the bridge `rdcni0` in the node namespace is their gateway).
pub const CNI_V4_SUBNET: &str = "10.206.0.0/24";
pub const CNI_V6_SUBNET: &str = "fd00:206::/64";
/// Where Debian's `containernetworking-plugins` puts the plugins.
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

/// A plugin's error, in the spec's format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniFailure {
    pub plugin: String,
    pub code: u64,
    pub msg: String,
    pub details: String,
}

impl std::fmt::Display for CniFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed (code {}): {}: {}",
            self.plugin, self.code, self.msg, self.details
        )
    }
}

/// One network (a conflist) and how to run its plugins.
pub struct CniNetwork {
    /// The network configuration list, as a runtime reads it from its conf dir.
    pub conflist: Value,
    /// `CNI_PATH`: the lab's directory (with `redirect-cni`), then Debian's.
    cni_path: String,
    node_netns: PathBuf,
}

/// A pod's sandbox: its network namespace and cgroup, the pod it is for, and the result of
/// its ADD (what DEL and CHECK get as `prevResult`).
pub struct Sandbox {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub container_id: String,
    pub result: Option<Value>,
    // Field order is drop order: processes live in the cgroup and the netns.
    pub cgroup: Cgroup,
    pub netns: Netns,
}

impl Sandbox {
    /// Where the pod's containers run (as `uid`, if given).
    pub fn placement(&self, uid: Option<u32>) -> Placement<'_> {
        Placement {
            netns: Some(&self.netns),
            cgroup: Some(&self.cgroup),
            uid,
        }
    }

    /// The pod's addresses from the ADD result.
    pub fn ips(&self) -> Vec<IpAddr> {
        let Some(r) = &self.result else {
            return Vec::new();
        };
        r["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
            .collect()
    }

    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.namespace, self.name, self.container_id, self.uid
        )
    }
}

impl Lab {
    /// A CNI network for this lab's node whose last plugin is `redirect-cni` with `plugin`
    /// (its `socket`, `excludeNamespaces`, ... fields) merged into its configuration.
    pub fn cni_network(&self, plugin: Value) -> Result<CniNetwork> {
        let bin_dir = self.dir.join("cni-bin");
        std::fs::create_dir_all(&bin_dir)?;
        let link = bin_dir.join("redirect-cni");
        if !link.exists() {
            std::os::unix::fs::symlink(bin("redirect-cni"), &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
        let mut redirect = json!({"type": "redirect-cni"});
        if let (Some(r), Some(p)) = (redirect.as_object_mut(), plugin.as_object()) {
            r.extend(p.clone());
        }
        let mut conflist = self.primary_cni()?;
        if let Some(plugins) = conflist["plugins"].as_array_mut() {
            plugins.push(redirect);
        }
        Ok(CniNetwork {
            conflist,
            cni_path: format!("{}:{DEBIAN_CNI_DIR}", bin_dir.display()),
            node_netns: self.node.path(),
        })
    }

    /// The node's primary CNI network, as a conflist: `bridge` with `host-local` addresses
    /// (both families), Debian's plugins.
    pub fn primary_cni(&self) -> Result<Value> {
        if !Path::new(DEBIAN_CNI_DIR).join("bridge").exists() {
            bail!("the CNI plugins are not installed in {DEBIAN_CNI_DIR}: run `cargo xtask setup` (Debian's containernetworking-plugins)");
        }
        let data_dir = self.dir.join("cni-ipam");
        Ok(json!({
            "cniVersion": "1.0.0",
            "name": format!("{}-net", self.id),
            "plugins": [
                {"type": "bridge", "bridge": "rdcni0", "isGateway": true, "ipMasq": false,
                 "hairpinMode": true,
                 "ipam": {"type": "host-local", "dataDir": data_dir,
                          "ranges": [[{"subnet": CNI_V4_SUBNET}], [{"subnet": CNI_V6_SUBNET}]],
                          "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}},
            ],
        }))
    }

    /// A new sandbox for pod `namespace/name`: an empty network namespace (lo down, as a
    /// runtime makes it; IPv6 duplicate address detection off so addresses work at once) and
    /// a cgroup under the lab's. Nothing is configured until [`CniNetwork::add`].
    pub fn sandbox(&self, namespace: &str, name: &str) -> Result<Sandbox> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let netns = Netns::bare(format!("{}-sb{n}", self.id))?;
        netns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ])?;
        Ok(Sandbox {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!("uid-{name}-{n}"),
            container_id: format!("{:064x}", (std::process::id() as u128) << 32 | n as u128),
            result: None,
            cgroup: Cgroup::new(self.cgroup.path.join(format!("sb{n}")))?,
            netns,
        })
    }
}

impl CniNetwork {
    /// ADD: loopback, then every plugin of the list in order, each given the previous one's
    /// result. `Ok(Err(_))`: a plugin failed, in the spec's way (the runtime then tears the
    /// sandbox down with DEL and retries).
    pub fn add(&self, sb: &mut Sandbox) -> Result<Result<Value, CniFailure>> {
        let lo = json!({"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"});
        if let Err(f) = self.exec(&lo, "ADD", sb, None)? {
            return Ok(Err(f));
        }
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            match self.exec(&plugin, "ADD", sb, prev.as_ref())? {
                Ok(result) => prev = Some(result),
                Err(f) => return Ok(Err(f)),
            }
        }
        sb.result = prev.clone();
        Ok(Ok(prev.unwrap_or(Value::Null)))
    }

    /// DEL: every plugin in reverse order, with the cached ADD result.
    pub fn del(&self, sb: &mut Sandbox) -> Result<Result<(), CniFailure>> {
        let prev = sb.result.take();
        let mut first_failure = None;
        for plugin in self.plugins().iter().rev() {
            if let Err(f) = self.exec(plugin, "DEL", sb, prev.as_ref())? {
                first_failure.get_or_insert(f);
            }
        }
        Ok(first_failure.map_or(Ok(()), Err))
    }

    /// CHECK: every plugin in order, with the cached ADD result.
    pub fn check(&self, sb: &Sandbox) -> Result<Result<(), CniFailure>> {
        for plugin in self.plugins() {
            if let Err(f) = self.exec(&plugin, "CHECK", sb, sb.result.as_ref())? {
                return Ok(Err(f));
            }
        }
        Ok(Ok(()))
    }

    /// The list's plugins, each with the list's `name` and `cniVersion`.
    fn plugins(&self) -> Vec<Value> {
        let list = &self.conflist;
        list["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let mut p = p.clone();
                p["name"] = list["name"].clone();
                p["cniVersion"] = list["cniVersion"].clone();
                p
            })
            .collect()
    }

    /// Runs one plugin in the node namespace. `Ok(Ok(result))` (an empty object when it
    /// printed nothing), or its error.
    fn exec(
        &self,
        plugin: &Value,
        command: &str,
        sb: &Sandbox,
        prev: Option<&Value>,
    ) -> Result<Result<Value, CniFailure>> {
        let ty = plugin["type"].as_str().context("plugin without a type")?;
        let path = self
            .cni_path
            .split(':')
            .map(|d| Path::new(d).join(ty))
            .find(|p| p.exists())
            .with_context(|| format!("plugin {ty} not found in {}", self.cni_path))?;
        let mut conf = plugin.clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let node = File::open(&self.node_netns)
            .with_context(|| format!("opening {}", self.node_netns.display()))?;
        let mut cmd = Command::new(&path);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sb.container_id)
            .env("CNI_NETNS", sb.netns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", sb.cni_args())
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: only setns(2) between fork and exec (async-signal-safe).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(node.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        child
            .stdin
            .take()
            .context("plugin stdin")?
            .write_all(conf.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            if stdout.trim().is_empty() {
                return Ok(Ok(json!({})));
            }
            let v: Value = serde_json::from_str(&stdout)
                .with_context(|| format!("{ty} {command} printed {stdout:?}"))?;
            return Ok(Ok(v));
        }
        let err: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        Ok(Err(CniFailure {
            plugin: ty.to_string(),
            code: err["code"].as_u64().unwrap_or(0),
            msg: err["msg"].as_str().unwrap_or(&stdout).to_string(),
            details: format!(
                "{} (stderr: {})",
                err["details"].as_str().unwrap_or_default(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }))
    }
}
