//! Linkerd's capture rules, as its `proxy-init` (linkerd/linkerd2-proxy-init,
//! `pkg/iptables/iptables.go`) writes them, command by command, in the order and shape of its
//! own tests (`iptables_test.go`), with the arguments Linkerd's injector passes
//! (`charts/partials/templates/_proxy-init.tpl`): inbound to 4143, outbound to 4140, proxy
//! uid 2102 (no gid), inbound ports ignored `4190,4191` (the proxy's control and admin ports)
//! then `proxyInit.ignoreInboundPorts` (`4567,4568` by default, replaced by
//! `config.linkerd.io/skip-inbound-ports`), outbound ports ignored
//! `proxyInit.ignoreOutboundPorts` (the same default, replaced by
//! `config.linkerd.io/skip-outbound-ports`), and `config.linkerd.io/skip-subnets`. Both
//! families are written, as `proxy-init` does by default (`--ipv6`).
//!
//! What the rules decide, in short: outbound, the proxy's uid returns, anything leaving
//! through `lo` returns (loopback and the pod's own addresses), ignored ports return, every
//! other TCP connection goes to 4140; inbound, ignored ports and ignored source subnets
//! return, every other TCP connection goes to 4143. The conformance suite runs them in a pod
//! as the reference, beside redirectd.

use anyhow::{Context as _, Result};

use crate::Netns;

/// Linkerd's chains.
const OUTPUT_CHAIN: &str = "PROXY_INIT_OUTPUT";
const REDIRECT_CHAIN: &str = "PROXY_INIT_REDIRECT";
/// `IptablesMultiportLimit`: ports in one `multiport` match (a range counts two).
const MULTIPORT_LIMIT: usize = 15;

/// The proxy's ports and uid as Linkerd's chart sets them.
pub const INBOUND_PORT: u16 = 4143;
pub const OUTBOUND_PORT: u16 = 4140;
pub const PROXY_UID: u32 = 2102;
/// The proxy's control (4190) and admin (4191) ports, never captured inbound.
pub const CONTROL_PORT: u16 = 4190;
pub const ADMIN_PORT: u16 = 4191;
/// `proxyInit.ignoreInboundPorts` and `ignoreOutboundPorts` by default.
pub const DEFAULT_IGNORED_PORTS: &str = "4567,4568";

/// `proxy-init`'s configuration (`FirewallConfiguration`), in its own terms.
#[derive(Debug, Clone)]
pub struct Options {
    pub inbound_port: u16,
    pub outbound_port: u16,
    /// `--proxy-uid` (none: no uid rule).
    pub proxy_uid: Option<u32>,
    /// `--proxy-gid` (Linkerd's injector passes none).
    pub proxy_gid: Option<u32>,
    /// `--inbound-ports-to-ignore`: ports and inclusive ranges (`a-b`).
    pub inbound_ports_to_ignore: Vec<String>,
    /// `--outbound-ports-to-ignore`.
    pub outbound_ports_to_ignore: Vec<String>,
    /// `--subnets-to-ignore`: sources whose inbound connections are not captured.
    pub subnets_to_ignore: Vec<String>,
    /// `--ports-to-redirect` (empty: every inbound port, `redirect-all` mode).
    pub ports_to_redirect: Vec<u16>,
}

impl Default for Options {
    /// What Linkerd's injector passes for a pod without `config.linkerd.io/skip-*`.
    fn default() -> Self {
        Self::for_pod(None, None, None)
    }
}

impl Options {
    /// What Linkerd's injector passes for a pod with these `config.linkerd.io/` annotations
    /// (`skip-inbound-ports`, `skip-outbound-ports`, `skip-subnets`; each comma-separated,
    /// each replacing the chart's default).
    pub fn for_pod(
        skip_inbound: Option<&str>,
        skip_outbound: Option<&str>,
        skip_subnets: Option<&str>,
    ) -> Self {
        let list = |s: &str| -> Vec<String> {
            s.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect()
        };
        let mut inbound = vec![CONTROL_PORT.to_string(), ADMIN_PORT.to_string()];
        inbound.extend(list(skip_inbound.unwrap_or(DEFAULT_IGNORED_PORTS)));
        Self {
            inbound_port: INBOUND_PORT,
            outbound_port: OUTBOUND_PORT,
            proxy_uid: Some(PROXY_UID),
            proxy_gid: None,
            inbound_ports_to_ignore: inbound,
            outbound_ports_to_ignore: list(skip_outbound.unwrap_or(DEFAULT_IGNORED_PORTS)),
            subnets_to_ignore: skip_subnets.map(list).unwrap_or_default(),
            ports_to_redirect: Vec::new(),
        }
    }

    /// The `config.linkerd.io/` annotations that ask for these options (for redirectd), the
    /// chart's defaults left out.
    pub fn annotations(&self) -> Vec<(&'static str, String)> {
        let mut a = Vec::new();
        let inbound = &self.inbound_ports_to_ignore[2.min(self.inbound_ports_to_ignore.len())..];
        if inbound.join(",") != DEFAULT_IGNORED_PORTS {
            a.push(("config.linkerd.io/skip-inbound-ports", inbound.join(",")));
        }
        if self.outbound_ports_to_ignore.join(",") != DEFAULT_IGNORED_PORTS {
            a.push((
                "config.linkerd.io/skip-outbound-ports",
                self.outbound_ports_to_ignore.join(","),
            ));
        }
        if !self.subnets_to_ignore.is_empty() {
            a.push((
                "config.linkerd.io/skip-subnets",
                self.subnets_to_ignore.join(","),
            ));
        }
        a
    }

    /// The commands `proxy-init` runs on a namespace with no rules of its own yet (without
    /// the binary, `iptables` or `ip6tables`): inbound first, then outbound. A subnet of the
    /// other family is left out of each family's commands (`proxy-init` would pass it on and
    /// fail).
    pub fn commands(&self, v6: bool) -> Vec<Vec<String>> {
        let mut c = Vec::new();
        // addIncomingTrafficRules
        c.push(nat(&["-N", REDIRECT_CHAIN]));
        self.ignored_ports(&mut c, &self.inbound_ports_to_ignore, REDIRECT_CHAIN);
        for subnet in self
            .subnets_to_ignore
            .iter()
            .filter(|s| s.contains(':') == v6)
        {
            c.push(nat(&[
                "-A",
                REDIRECT_CHAIN,
                "-p",
                "all",
                "-j",
                "RETURN",
                "-s",
                subnet,
                "-m",
                "comment",
                "--comment",
                &format!("proxy-init/ignore-subnet-{subnet}"),
            ]));
        }
        if self.ports_to_redirect.is_empty() {
            c.push(redirect(
                REDIRECT_CHAIN,
                self.inbound_port,
                "redirect-all-incoming-to-proxy-port",
            ));
        } else {
            for port in &self.ports_to_redirect {
                c.push(nat(&[
                    "-A",
                    REDIRECT_CHAIN,
                    "-p",
                    "tcp",
                    "--destination-port",
                    &port.to_string(),
                    "-j",
                    "REDIRECT",
                    "--to-port",
                    &self.inbound_port.to_string(),
                    "-m",
                    "comment",
                    "--comment",
                    &format!("proxy-init/redirect-port-{port}-to-proxy-port"),
                ]));
            }
        }
        c.push(jump(
            "PREROUTING",
            REDIRECT_CHAIN,
            "install-proxy-init-prerouting",
        ));
        // addOutgoingTrafficRules
        c.push(nat(&["-N", OUTPUT_CHAIN]));
        if let Some(uid) = self.proxy_uid.filter(|&u| u > 0) {
            c.push(owner(
                OUTPUT_CHAIN,
                "--uid-owner",
                uid,
                "ignore-proxy-user-id",
            ));
        }
        if let Some(gid) = self.proxy_gid.filter(|&g| g > 0) {
            c.push(owner(
                OUTPUT_CHAIN,
                "--gid-owner",
                gid,
                "ignore-proxy-group-id",
            ));
        }
        c.push(nat(&[
            "-A",
            OUTPUT_CHAIN,
            "-o",
            "lo",
            "-j",
            "RETURN",
            "-m",
            "comment",
            "--comment",
            "proxy-init/ignore-loopback",
        ]));
        self.ignored_ports(&mut c, &self.outbound_ports_to_ignore, OUTPUT_CHAIN);
        c.push(redirect(
            OUTPUT_CHAIN,
            self.outbound_port,
            "redirect-all-outgoing-to-proxy-port",
        ));
        c.push(jump("OUTPUT", OUTPUT_CHAIN, "install-proxy-init-output"));
        c
    }

    /// `addRulesForIgnoredPorts`: one `multiport` RETURN per group of at most 15 ports.
    fn ignored_ports(&self, c: &mut Vec<Vec<String>>, ports: &[String], chain: &str) {
        for group in multiport_destinations(ports) {
            let dports = group.join(",");
            c.push(nat(&[
                "-A",
                chain,
                "-p",
                "tcp",
                "--match",
                "multiport",
                "--dports",
                &dports,
                "-j",
                "RETURN",
                "-m",
                "comment",
                "--comment",
                &format!("proxy-init/ignore-port-{dports}"),
            ]));
        }
    }
}

/// `makeMultiportDestinations`: ports and ranges (`a-b` becomes `a:b`, `a-a` becomes `a`) in
/// groups that fit a `multiport` match; an entry that is not a port or range is left out (as
/// `proxy-init` does, logging it).
pub fn multiport_destinations(ports: &[String]) -> Vec<Vec<String>> {
    let mut groups = Vec::new();
    if ports.is_empty() {
        return groups;
    }
    let (mut group, mut count) = (Vec::new(), 0);
    for item in ports {
        let Some((lo, hi)) = port_range(item) else {
            continue;
        };
        let n = if lo == hi { 1 } else { 2 };
        if count + n > MULTIPORT_LIMIT {
            groups.push(std::mem::take(&mut group));
            count = 0;
        }
        group.push(if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}:{hi}")
        });
        count += n;
    }
    groups.push(group);
    groups
}

/// `util.ParsePortRange`: `p` or `lo-hi`, ports 0..=65535, `lo <= hi`.
fn port_range(item: &str) -> Option<(u16, u16)> {
    let (lo, hi) = match item.split_once('-') {
        Some((lo, hi)) => (lo.parse().ok()?, hi.parse().ok()?),
        None => {
            let p: u16 = item.parse().ok()?;
            (p, p)
        }
    };
    (lo <= hi).then_some((lo, hi))
}

fn nat(args: &[&str]) -> Vec<String> {
    ["-t", "nat"]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect()
}

fn redirect(chain: &str, port: u16, comment: &str) -> Vec<String> {
    nat(&[
        "-A",
        chain,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-port",
        &port.to_string(),
        "-m",
        "comment",
        "--comment",
        &format!("proxy-init/{comment}"),
    ])
}

fn owner(chain: &str, flag: &str, id: u32, comment: &str) -> Vec<String> {
    nat(&[
        "-A",
        chain,
        "-m",
        "owner",
        flag,
        &id.to_string(),
        "-j",
        "RETURN",
        "-m",
        "comment",
        "--comment",
        &format!("proxy-init/{comment}"),
    ])
}

fn jump(from: &str, to: &str, comment: &str) -> Vec<String> {
    nat(&[
        "-A",
        from,
        "-j",
        to,
        "-m",
        "comment",
        "--comment",
        &format!("proxy-init/{comment}"),
    ])
}

/// Runs `proxy-init`'s commands for both families in `ns`.
pub fn install(ns: &Netns, options: &Options) -> Result<()> {
    for (cmd, v6) in [("iptables", false), ("ip6tables", true)] {
        for args in options.commands(v6) {
            let mut argv = vec![cmd];
            argv.extend(args.iter().map(String::as_str));
            ns.exec(&argv)
                .with_context(|| format!("{cmd} {}", args.join(" ")))?;
        }
    }
    Ok(())
}

/// Removes both families' nat tables from `ns` (as [`crate::istio_iptables::remove`]).
pub fn remove(ns: &Netns) -> Result<()> {
    crate::istio_iptables::remove(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// `TestMakeMultiportDestinations` and `TestMakeMultiportDestinations_Split`.
    #[test]
    fn multiport_groups_as_proxy_init_makes_them() {
        assert!(multiport_destinations(&[]).is_empty());
        assert_eq!(
            multiport_destinations(&strings(&["22", "25-27", "33"])),
            vec![strings(&["22", "25:27", "33"])]
        );
        assert_eq!(
            multiport_destinations(&strings(&["22-22", "25-27", "33"])),
            vec![strings(&["22", "25:27", "33"])]
        );
        assert_eq!(
            multiport_destinations(&strings(&["22", "25-27", "not-a-number", "33"])),
            vec![strings(&["22", "25:27", "33"])]
        );
        assert_eq!(
            multiport_destinations(&strings(&[
                "22-23", "25-27", "33-34", "35-35", "37-38", "50-54", "56-57", "60-63"
            ])),
            vec![strings(&[
                "22:23", "25:27", "33:34", "35", "37:38", "50:54", "56:57", "60:63"
            ])]
        );
        assert_eq!(
            multiport_destinations(&strings(&[
                "22-23", "25-27", "33-34", "35-35", "37-38", "50-54", "56", "58", "60", "63",
                "70-72"
            ])),
            vec![
                strings(&[
                    "22:23", "25:27", "33:34", "35", "37:38", "50:54", "56", "58", "60", "63"
                ]),
                strings(&["70:72"]),
            ]
        );
    }

    /// `TestAddIncomingTrafficRules` and `TestAddOutgoingTrafficRules` ("no existing rules"),
    /// with their configurations (`InboundPortsToIgnore: ["1234"]`, `ProxyOutgoingPort:
    /// 1234`, nothing else), the commands in the same order and words.
    #[test]
    fn commands_as_proxy_init_tests_expect_them() {
        let incoming = Options {
            inbound_port: 0,
            outbound_port: 0,
            proxy_uid: None,
            proxy_gid: None,
            inbound_ports_to_ignore: strings(&["1234"]),
            outbound_ports_to_ignore: Vec::new(),
            subnets_to_ignore: Vec::new(),
            ports_to_redirect: Vec::new(),
        };
        let c = incoming.commands(false);
        assert_eq!(c[0], strings(&["-t", "nat", "-N", "PROXY_INIT_REDIRECT"]));
        assert_eq!(
            c[1],
            strings(&[
                "-t",
                "nat",
                "-A",
                "PROXY_INIT_REDIRECT",
                "-p",
                "tcp",
                "--match",
                "multiport",
                "--dports",
                "1234",
                "-j",
                "RETURN",
                "-m",
                "comment",
                "--comment",
                "proxy-init/ignore-port-1234"
            ])
        );
        // (The test's configuration has mode "" and so no redirect rule; ours is redirect-all.)
        assert_eq!(
            c[3],
            strings(&[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-j",
                "PROXY_INIT_REDIRECT",
                "-m",
                "comment",
                "--comment",
                "proxy-init/install-proxy-init-prerouting"
            ])
        );
        let outgoing = Options {
            outbound_port: 1234,
            inbound_ports_to_ignore: Vec::new(),
            ..incoming
        };
        let c = outgoing.commands(false);
        let out: Vec<_> = c
            .iter()
            .skip_while(|a| !a.contains(&"PROXY_INIT_OUTPUT".to_string()))
            .cloned()
            .collect();
        assert_eq!(
            out,
            vec![
                strings(&["-t", "nat", "-N", "PROXY_INIT_OUTPUT"]),
                strings(&[
                    "-t",
                    "nat",
                    "-A",
                    "PROXY_INIT_OUTPUT",
                    "-o",
                    "lo",
                    "-j",
                    "RETURN",
                    "-m",
                    "comment",
                    "--comment",
                    "proxy-init/ignore-loopback"
                ]),
                strings(&[
                    "-t",
                    "nat",
                    "-A",
                    "PROXY_INIT_OUTPUT",
                    "-p",
                    "tcp",
                    "-j",
                    "REDIRECT",
                    "--to-port",
                    "1234",
                    "-m",
                    "comment",
                    "--comment",
                    "proxy-init/redirect-all-outgoing-to-proxy-port"
                ]),
                strings(&[
                    "-t",
                    "nat",
                    "-A",
                    "OUTPUT",
                    "-j",
                    "PROXY_INIT_OUTPUT",
                    "-m",
                    "comment",
                    "--comment",
                    "proxy-init/install-proxy-init-output"
                ]),
            ]
        );
    }

    /// The injector's defaults, and annotations replacing them.
    #[test]
    fn a_pods_options_as_the_injector_passes_them() {
        let d = Options::default();
        assert_eq!(
            d.inbound_ports_to_ignore,
            strings(&["4190", "4191", "4567", "4568"])
        );
        assert_eq!(d.outbound_ports_to_ignore, strings(&["4567", "4568"]));
        assert!(d.annotations().is_empty());
        let p = Options::for_pod(Some("9000-9010,22"), Some("5432"), Some("10.9.0.0/16"));
        assert_eq!(
            p.inbound_ports_to_ignore,
            strings(&["4190", "4191", "9000-9010", "22"])
        );
        assert_eq!(
            p.annotations(),
            vec![
                (
                    "config.linkerd.io/skip-inbound-ports",
                    "9000-9010,22".into()
                ),
                ("config.linkerd.io/skip-outbound-ports", "5432".into()),
                ("config.linkerd.io/skip-subnets", "10.9.0.0/16".into()),
            ]
        );
        // The uid rule comes first in PROXY_INIT_OUTPUT; the v4 subnet only in v4's rules.
        let c = p.commands(false);
        assert!(c.iter().any(|a| a.contains(&"--uid-owner".to_string())));
        assert!(c.iter().any(|a| a.contains(&"10.9.0.0/16".to_string())));
        assert!(!p
            .commands(true)
            .iter()
            .any(|a| a.contains(&"10.9.0.0/16".to_string())));
    }
}
