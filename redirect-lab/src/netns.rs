//! Network namespaces and veth pairs, each removed with its guard.

use std::path::PathBuf;

use anyhow::Result;

use crate::run;

/// A network namespace made with `ip netns add`, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Result<Self> {
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace as a container runtime makes one: nothing configured, lo down.
    pub fn bare(name: String) -> Result<Self> {
        run("ip", &["netns", "add", &name])?;
        Ok(Self { name })
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A veth pair from `node` into `other`: `veth` on the node side, `eth0` in `other`.
pub(crate) fn veth_pair(node: &Netns, veth: &str, other: &Netns) -> Result<()> {
    node.exec(&[
        "ip",
        "link",
        "add",
        veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &other.name,
    ])?;
    Ok(())
}

/// Connects a pod namespace to `node`'s bridge `br0`: a veth pair, `veth` on the node side,
/// `eth0` in the pod.
pub(crate) fn plug(node: &Netns, veth: &str, pod: &Netns) -> Result<()> {
    veth_pair(node, veth, pod)?;
    node.exec(&["ip", "link", "set", veth, "master", "br0", "up"])?;
    Ok(())
}
