//! The lab's shape: a node namespace with a bridge, pods on it (or routed point to point),
//! a second node, a cgroup subtree and a temp directory; the [`Lab`] owns them all.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    cgroup2_root,
    netns::{plug, veth_pair},
    Cgroup, Daemon, Netns, Placement, Proc, NEXT, PREFIX, ROUTED_V4_PREFIX, V4_PREFIX, V6_PREFIX,
};

/// A pod of the lab: a network namespace with an address on the bridge, and a cgroup.
pub struct Pod {
    pub name: String,
    pub v4: IpAddr,
    pub v6: IpAddr,
    // Field order is drop order: processes live in the cgroup and the netns.
    pub cgroup: Cgroup,
    pub netns: Netns,
}

impl Pod {
    pub fn placement(&self) -> Placement<'_> {
        Placement {
            netns: Some(&self.netns),
            cgroup: Some(&self.cgroup),
            uid: None,
        }
    }

    /// The pods-file entry for this pod, with `annotations` (YAML mapping lines, already
    /// indented by 6 spaces, or empty).
    pub fn yaml_entry(&self, annotations: &[(&str, &str)]) -> String {
        let ips = if self.v6.is_unspecified() {
            format!("\"{}\"", self.v4)
        } else {
            format!("\"{}\", \"{}\"", self.v4, self.v6)
        };
        let mut s = format!(
            "  - name: {}\n    namespace: lab\n    netns: {}\n    ips: [{ips}]\n",
            self.name,
            self.netns.path().display(),
        );
        self.annotations_yaml(&mut s, annotations);
        s
    }

    /// [`Pod::yaml_entry`] for a pod of `mesh` (the entry's `mesh` field).
    pub fn yaml_entry_in(&self, mesh: &str, annotations: &[(&str, &str)]) -> String {
        let mut s = self.yaml_entry(&[]);
        s.push_str(&format!("    mesh: {mesh}\n"));
        self.annotations_yaml(&mut s, annotations);
        s
    }

    fn annotations_yaml(&self, s: &mut String, annotations: &[(&str, &str)]) {
        if !annotations.is_empty() {
            s.push_str("    annotations:\n");
            for (k, v) in annotations {
                s.push_str(&format!("      {k}: {v:?}\n"));
            }
        }
    }
}

/// A lab: a node namespace with a bridge, pods on it, a cgroup subtree, a temp directory.
pub struct Lab {
    pub id: String,
    pub dir: PathBuf,
    // Drop order: processes, daemon, pods, node, cgroup root, then the directory (in Drop).
    pub procs: Vec<Proc>,
    pub daemon: Option<Daemon>,
    pub pods: Vec<Pod>,
    /// "Another node" (see [`Lab::add_remote_node`]).
    pub remote: Option<Netns>,
    /// The remote node's pods' cgroup, dropped after them.
    remote_cgroup: Option<Cgroup>,
    pub node: Netns,
    pub cgroup: Cgroup,
    next_host: u8,
}

impl Lab {
    /// Creates an empty lab. Needs root, iproute2 and cgroup v2.
    pub fn new() -> Result<Self> {
        // SAFETY: geteuid(2).
        if unsafe { libc::geteuid() } != 0 {
            bail!("the lab needs root (network namespaces, cgroups, BPF): run as root / via `cargo xtask test`");
        }
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{PREFIX}{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir)?;
        let cgroup = Cgroup::new(cgroup2_root()?.join(&id))?;
        let node = Netns::new(format!("{id}-node"))?;
        node.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        node.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{V4_PREFIX}1/24"),
            "dev",
            "br0",
        ])?;
        node.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{V6_PREFIX}1/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        node.exec(&["ip", "link", "set", "br0", "up"])?;
        // The node routes between its pods and other nodes, like a Kubernetes node.
        node.exec(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ])?;
        Ok(Self {
            id,
            dir,
            procs: Vec::new(),
            daemon: None,
            pods: Vec::new(),
            remote: None,
            remote_cgroup: None,
            node,
            cgroup,
            next_host: 2,
        })
    }

    /// Adds "another node": a namespace linked to this node through a second bridge, routed
    /// (10.202.0.0/24, fd00:202::/64), from which pods are reached across a router as from a
    /// different host.
    pub fn add_remote_node(&mut self) -> Result<&Netns> {
        let remote = Netns::new(format!("{}-node2", self.id))?;
        self.node
            .exec(&["ip", "link", "add", "br1", "type", "bridge"])?;
        self.node
            .exec(&["ip", "addr", "add", "10.202.0.1/24", "dev", "br1"])?;
        self.node.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fd00:202::1/64",
            "dev",
            "br1",
            "nodad",
        ])?;
        self.node.exec(&["ip", "link", "set", "br1", "up"])?;
        veth_pair(&self.node, "vn2", &remote)?;
        self.node
            .exec(&["ip", "link", "set", "vn2", "master", "br1", "up"])?;
        remote.exec(&["ip", "addr", "add", "10.202.0.2/24", "dev", "eth0"])?;
        remote.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fd00:202::2/64",
            "dev",
            "eth0",
            "nodad",
        ])?;
        remote.exec(&["ip", "link", "set", "eth0", "up"])?;
        remote.exec(&["ip", "route", "add", "default", "via", "10.202.0.1"])?;
        remote.exec(&["ip", "-6", "route", "add", "default", "via", "fd00:202::1"])?;
        self.remote = Some(remote);
        Ok(self.remote.as_ref().expect("just set"))
    }

    /// Adds a pod on "another node" ([`Lab::add_remote_node`] first): a namespace behind the
    /// remote node (10.202.1.0/24, routed through both nodes), in a cgroup under
    /// `<lab cgroup>/node2/`, which a second daemon can own. Returns its index in `self.pods`.
    pub fn add_remote_pod(&mut self, name: &str) -> Result<usize> {
        let remote = self.remote.as_ref().context("add_remote_node first")?;
        let host = self.next_host;
        self.next_host += 1;
        if self.remote_cgroup.is_none() {
            self.remote_cgroup = Some(Cgroup::new(self.cgroup.path.join("node2"))?);
            remote.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
            remote.exec(&["ip", "addr", "add", "10.202.1.1/24", "dev", "br0"])?;
            remote.exec(&["ip", "link", "set", "br0", "up"])?;
            remote.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            self.node
                .exec(&["ip", "route", "add", "10.202.1.0/24", "via", "10.202.0.2"])?;
        }
        let cgroup_root = self.remote_cgroup.as_ref().expect("just made").path.clone();
        let netns = Netns::new(format!("{}-{name}", self.id))?;
        let cgroup = Cgroup::new(cgroup_root.join(name))?;
        plug(remote, &format!("r{host}"), &netns)?;
        let v4 = format!("10.202.1.{host}");
        netns.exec(&["ip", "addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        netns.exec(&["ip", "link", "set", "eth0", "up"])?;
        netns.exec(&["ip", "route", "add", "default", "via", "10.202.1.1"])?;
        self.pods.push(Pod {
            name: name.into(),
            v4: v4.parse()?,
            v6: "::".parse()?,
            cgroup,
            netns,
        });
        Ok(self.pods.len() - 1)
    }

    /// The cgroup of the pods on the remote node ([`Lab::add_remote_pod`]).
    pub fn remote_cgroup(&self) -> Option<&Path> {
        self.remote_cgroup.as_ref().map(|c| c.path.as_path())
    }

    /// Adds a pod (network namespace on the bridge with an IPv4 and an IPv6 address, and a
    /// cgroup under the lab's). Returns its index in `self.pods`.
    pub fn add_pod(&mut self, name: &str) -> Result<usize> {
        let host = self.next_host;
        self.next_host += 1;
        let netns = Netns::new(format!("{}-{name}", self.id))?;
        let cgroup = Cgroup::new(self.cgroup.path.join(name))?;
        plug(&self.node, &format!("v{host}"), &netns)?;
        let v4 = format!("{V4_PREFIX}{host}");
        let v6 = format!("{V6_PREFIX}{host:x}");
        netns.exec(&["ip", "addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        netns.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        netns.exec(&["ip", "link", "set", "eth0", "up"])?;
        netns.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &format!("{V4_PREFIX}1"),
        ])?;
        netns.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("{V6_PREFIX}1"),
        ])?;
        // Istio's inbound passthrough source for IPv6 (127.0.0.6 is on lo already).
        netns.exec(&["ip", "-6", "addr", "add", "::6/128", "dev", "lo", "nodad"])?;
        self.pods.push(Pod {
            name: name.into(),
            v4: v4.parse()?,
            v6: v6.parse()?,
            cgroup,
            netns,
        });
        Ok(self.pods.len() - 1)
    }

    /// Adds a pod wired the way point-to-point CNIs (Calico, Cilium, kindnet) wire one: its
    /// own veth to the node (`p<N>`), no bridge, a /32 host route on the node naming that veth,
    /// and in the pod a default route through a link-local gateway whose neighbour entry is the
    /// node's end of the veth. Address `10.204.0.<N>`, IPv4 only. Returns its index in `self.pods`.
    pub fn add_routed_pod(&mut self, name: &str) -> Result<usize> {
        let host = self.next_host;
        self.next_host += 1;
        let netns = Netns::new(format!("{}-{name}", self.id))?;
        let cgroup = Cgroup::new(self.cgroup.path.join(name))?;
        let veth = format!("p{host}");
        let v4 = format!("{ROUTED_V4_PREFIX}{host}");
        veth_pair(&self.node, &veth, &netns)?;
        self.node.exec(&["ip", "link", "set", &veth, "up"])?;
        let node_mac = self
            .node
            .exec(&["cat", &format!("/sys/class/net/{veth}/address")])?;
        self.node
            .exec(&["ip", "route", "add", &format!("{v4}/32"), "dev", &veth])?;
        netns.exec(&["ip", "addr", "add", &format!("{v4}/32"), "dev", "eth0"])?;
        netns.exec(&["ip", "link", "set", "eth0", "up"])?;
        netns.exec(&["ip", "route", "add", "169.254.1.1", "dev", "eth0"])?;
        netns.exec(&[
            "ip",
            "neigh",
            "add",
            "169.254.1.1",
            "lladdr",
            node_mac.trim(),
            "dev",
            "eth0",
        ])?;
        netns.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])?;
        self.pods.push(Pod {
            name: name.into(),
            v4: v4.parse()?,
            v6: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            cgroup,
            netns,
        });
        Ok(self.pods.len() - 1)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the lab"))
    }

    /// Adds an IPv4 address to a pod (for many-destination tests).
    pub fn add_address(&self, pod: &str, addr: &str) -> Result<()> {
        self.pod(pod)
            .netns
            .exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.kill();
        }
        self.procs.clear();
        self.daemon = None;
        self.pods.clear();
        self.remote_cgroup = None;
        self.remote = None;
        // REDIRECT_LAB_KEEP_LOGS=1 keeps the lab's logs (sidecar, server, daemon) to debug.
        if std::env::var_os("REDIRECT_LAB_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("lab: logs kept in {}", self.dir.display());
        }
    }
}
