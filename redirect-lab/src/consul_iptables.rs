//! Consul's capture rules, as `consul/sdk/iptables` (`Setup`) writes them, rule by rule and in
//! its order, for the configuration consul-k8s's injector computes for a pod
//! (`control-plane/connect-inject/webhook/redirect_traffic.go`): the proxy (consul-dataplane)
//! as uid 5995, the init container's uid 5996 excluded, inbound to 20000, outbound to 15001,
//! and the pod's `consul.hashicorp.com/transparent-proxy-exclude-*` annotations. Consul DNS is
//! left out (the pod does not enable it here).
//!
//! What the rules decide, in short: IPv4 only (`Setup` runs `iptables`, never `ip6tables`);
//! outbound, excluded uids, excluded CIDRs and excluded ports return (each inserted at the
//! chain's head, so the last given is tried first), the proxy's uid returns, 127.0.0.1/32
//! returns, and every other TCP connection goes to 15001, over lo or not (a pod calling its own
//! address, or 127.0.0.2, is captured); inbound, excluded ports return, every other TCP
//! connection goes to 20000.

use anyhow::{Context as _, Result};

use crate::Netns;

/// consul-k8s's `sidecarUserAndGroupID` and `initContainersUserAndGroupID`.
pub const PROXY_UID: u32 = 5995;
pub const INIT_UID: u32 = 5996;
/// `constants.ProxyDefaultInboundPort` and `iptables.DefaultTProxyOutboundPort`.
pub const INBOUND_PORT: u16 = 20000;
pub const OUTBOUND_PORT: u16 = 15001;

const INBOUND: &str = "CONSUL_PROXY_INBOUND";
const IN_REDIRECT: &str = "CONSUL_PROXY_IN_REDIRECT";
const OUTPUT: &str = "CONSUL_PROXY_OUTPUT";
const REDIRECT: &str = "CONSUL_PROXY_REDIRECT";
const DNS: &str = "CONSUL_DNS_REDIRECT";

/// `iptables.Config`, in its own terms.
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy_user_id: u32,
    pub proxy_inbound_port: u16,
    pub proxy_outbound_port: u16,
    pub exclude_inbound_ports: Vec<String>,
    pub exclude_outbound_ports: Vec<String>,
    pub exclude_outbound_cidrs: Vec<String>,
    pub exclude_uids: Vec<String>,
}

impl Default for Config {
    /// What consul-k8s computes for a pod without exclusions (metrics and proxy health checks
    /// off, probes not overwritten).
    fn default() -> Self {
        Self::for_pod(&[])
    }
}

impl Config {
    /// consul-k8s's configuration for a pod with these annotations
    /// (`consul.hashicorp.com/transparent-proxy-exclude-inbound-ports`, `-outbound-ports`,
    /// `-outbound-cidrs`, `-uids`; each comma-separated, added to the injector's own).
    pub fn for_pod(annotations: &[(&str, &str)]) -> Self {
        let list = |key: &str| -> Vec<String> {
            annotations
                .iter()
                .filter(|(k, _)| {
                    *k == format!("consul.hashicorp.com/transparent-proxy-exclude-{key}")
                })
                .flat_map(|(_, v)| v.split(','))
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        };
        let mut uids = vec![INIT_UID.to_string()];
        uids.extend(list("uids"));
        Self {
            proxy_user_id: PROXY_UID,
            proxy_inbound_port: INBOUND_PORT,
            proxy_outbound_port: OUTBOUND_PORT,
            exclude_inbound_ports: list("inbound-ports"),
            exclude_outbound_ports: list("outbound-ports"),
            exclude_outbound_cidrs: list("outbound-cidrs"),
            exclude_uids: uids,
        }
    }

    /// The `iptables` arguments `Setup` adds, in order.
    pub fn rules(&self) -> Vec<Vec<String>> {
        let mut r: Vec<Vec<String>> = Vec::new();
        let mut add = |args: &[&str]| {
            let mut v = vec!["-t".to_string(), "nat".to_string()];
            v.extend(args.iter().map(|s| s.to_string()));
            r.push(v);
        };
        for chain in [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT, DNS] {
            add(&["-N", chain]);
        }
        let out_port = self.proxy_outbound_port.to_string();
        add(&[
            "-A",
            REDIRECT,
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-port",
            &out_port,
        ]);
        add(&["-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT]);
        let uid = self.proxy_user_id.to_string();
        add(&[
            "-A",
            OUTPUT,
            "-m",
            "owner",
            "--uid-owner",
            &uid,
            "-j",
            "RETURN",
        ]);
        add(&["-A", OUTPUT, "-d", "127.0.0.1/32", "-j", "RETURN"]);
        add(&["-A", OUTPUT, "-j", REDIRECT]);
        for port in &self.exclude_outbound_ports {
            add(&["-I", OUTPUT, "-p", "tcp", "--dport", port, "-j", "RETURN"]);
        }
        for cidr in &self.exclude_outbound_cidrs {
            add(&["-I", OUTPUT, "-d", cidr, "-j", "RETURN"]);
        }
        for uid in &self.exclude_uids {
            add(&[
                "-I",
                OUTPUT,
                "-m",
                "owner",
                "--uid-owner",
                uid,
                "-j",
                "RETURN",
            ]);
        }
        let in_port = self.proxy_inbound_port.to_string();
        add(&[
            "-A",
            IN_REDIRECT,
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-port",
            &in_port,
        ]);
        add(&["-A", "PREROUTING", "-p", "tcp", "-j", INBOUND]);
        add(&["-A", INBOUND, "-p", "tcp", "-j", IN_REDIRECT]);
        for port in &self.exclude_inbound_ports {
            add(&["-I", INBOUND, "-p", "tcp", "--dport", port, "-j", "RETURN"]);
        }
        r
    }
}

/// Runs `Setup`'s rules in `ns` (IPv4 only, as `Setup` does).
pub fn install(ns: &Netns, config: &Config) -> Result<()> {
    for args in config.rules() {
        let mut argv = vec!["iptables"];
        argv.extend(args.iter().map(String::as_str));
        ns.exec(&argv)
            .with_context(|| format!("iptables {}", args.join(" ")))?;
    }
    Ok(())
}

/// Removes the nat tables from `ns` (as [`crate::istio_iptables::remove`]).
pub fn remove(ns: &Netns) -> Result<()> {
    crate::istio_iptables::remove(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(args: &[String]) -> String {
        format!("iptables {}", args.join(" "))
    }

    /// sdk/iptables's own `TestSetup` cases ("exclude inbound ports is set", "... outbound
    /// ports ...", "... outbound CIDRs ...", "exclude UIDs is set") in one configuration: each
    /// case's rules, word for word and in `Setup`'s order, with the `CONSUL_DNS_REDIRECT`
    /// chain that the current `Setup` creates (older versions of the test predate it).
    #[test]
    fn rules_as_consuls_own_test_expects_them() {
        let cfg = Config {
            proxy_user_id: 123,
            proxy_inbound_port: 20000,
            proxy_outbound_port: 21000,
            exclude_inbound_ports: vec!["22000".into(), "22500".into()],
            exclude_outbound_ports: vec!["22000".into(), "22500".into()],
            exclude_outbound_cidrs: vec!["1.1.1.1".into(), "2.2.2.2/24".into()],
            exclude_uids: vec!["456".into(), "789".into()],
        };
        let got: Vec<String> = cfg.rules().iter().map(|r| line(r)).collect();
        let want = [
            "iptables -t nat -N CONSUL_PROXY_INBOUND",
            "iptables -t nat -N CONSUL_PROXY_IN_REDIRECT",
            "iptables -t nat -N CONSUL_PROXY_OUTPUT",
            "iptables -t nat -N CONSUL_PROXY_REDIRECT",
            "iptables -t nat -N CONSUL_DNS_REDIRECT",
            "iptables -t nat -A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-port 21000",
            "iptables -t nat -A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT",
            "iptables -t nat -A CONSUL_PROXY_OUTPUT -m owner --uid-owner 123 -j RETURN",
            "iptables -t nat -A CONSUL_PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "iptables -t nat -A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT",
            "iptables -t nat -I CONSUL_PROXY_OUTPUT -p tcp --dport 22000 -j RETURN",
            "iptables -t nat -I CONSUL_PROXY_OUTPUT -p tcp --dport 22500 -j RETURN",
            "iptables -t nat -I CONSUL_PROXY_OUTPUT -d 1.1.1.1 -j RETURN",
            "iptables -t nat -I CONSUL_PROXY_OUTPUT -d 2.2.2.2/24 -j RETURN",
            "iptables -t nat -I CONSUL_PROXY_OUTPUT -m owner --uid-owner 456 -j RETURN",
            "iptables -t nat -I CONSUL_PROXY_OUTPUT -m owner --uid-owner 789 -j RETURN",
            "iptables -t nat -A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port 20000",
            "iptables -t nat -A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND",
            "iptables -t nat -A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT",
            "iptables -t nat -I CONSUL_PROXY_INBOUND -p tcp --dport 22000 -j RETURN",
            "iptables -t nat -I CONSUL_PROXY_INBOUND -p tcp --dport 22500 -j RETURN",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn a_pods_config_as_consul_k8s_computes_it() {
        let d = Config::default();
        assert_eq!(
            (d.proxy_user_id, d.exclude_uids.clone()),
            (5995, vec!["5996".into()])
        );
        assert_eq!(
            (d.proxy_inbound_port, d.proxy_outbound_port),
            (20000, 15001)
        );
        let p = Config::for_pod(&[
            (
                "consul.hashicorp.com/transparent-proxy-exclude-inbound-ports",
                "9000, 9001",
            ),
            (
                "consul.hashicorp.com/transparent-proxy-exclude-outbound-cidrs",
                "10.9.0.0/16",
            ),
            (
                "consul.hashicorp.com/transparent-proxy-exclude-uids",
                "1234",
            ),
        ]);
        assert_eq!(p.exclude_inbound_ports, ["9000", "9001"]);
        assert_eq!(p.exclude_outbound_cidrs, ["10.9.0.0/16"]);
        assert_eq!(p.exclude_uids, ["5996", "1234"]);
    }
}
