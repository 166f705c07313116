//! Istio's `istio-iptables` REDIRECT rule set for a pod's capture options, in the order and
//! shape of Istio's own golden test outputs (`tools/istio-iptables/pkg/capture/testdata`:
//! `ip-range`, `outbound-ports-include`, `outbound-ports-exclude`, `inbound-ports-include`,
//! `inbound-wildcard-exclude`, `ipv6-uid-gid`, `loopback-outbound-iprange`), proxy uid and gid
//! 1337, with the inbound exclusions Istio's injector passes (`-d`: 15090, 15021 and the
//! status port, 15020 unless `status.sidecar.istio.io/port` moves it). The conformance suite
//! runs these rules in a pod as the reference, beside redirectd; the benchmark's `iptables`
//! mode runs the default set.

use crate::Netns;
use anyhow::{bail, Context as _, Result};

/// A pod's capture options, as Istio's annotations give them.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub exclude_outbound_ports: Vec<u16>,
    pub include_outbound_ports: Vec<u16>,
    pub exclude_outbound_ranges: Vec<String>,
    /// `None`: `*`.
    pub include_outbound_ranges: Option<Vec<String>>,
    pub exclude_inbound_ports: Vec<u16>,
    /// `None`: `*`.
    pub include_inbound_ports: Option<Vec<u16>>,
    /// `status.sidecar.istio.io/port` (`None`: 15020; `Some(0)`: none).
    pub status_port: Option<u16>,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS` (`None`: `*`).
    pub owner_groups: Option<Vec<u32>>,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`.
    pub owner_groups_exclude: Vec<u32>,
    /// `ISTIO_META_DNS_CAPTURE`, as istio-cni sets it up (`CaptureAllDNS`: every server).
    pub dns_capture: bool,
    /// `traffic.sidecar.istio.io/excludeInterfaces`.
    pub exclude_interfaces: Vec<String>,
}

fn join<T: ToString>(v: &[T]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl Options {
    /// The same options as `traffic.sidecar.istio.io/*` annotations (for redirectd).
    pub fn annotations(&self) -> Vec<(&'static str, String)> {
        let mut a = Vec::new();
        let key = |k: &str| -> &'static str {
            match k {
                "eop" => "traffic.sidecar.istio.io/excludeOutboundPorts",
                "iop" => "traffic.sidecar.istio.io/includeOutboundPorts",
                "eor" => "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "ior" => "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "eip" => "traffic.sidecar.istio.io/excludeInboundPorts",
                _ => "traffic.sidecar.istio.io/includeInboundPorts",
            }
        };
        if !self.exclude_outbound_ports.is_empty() {
            a.push((key("eop"), join(&self.exclude_outbound_ports)));
        }
        if !self.include_outbound_ports.is_empty() {
            a.push((key("iop"), join(&self.include_outbound_ports)));
        }
        if !self.exclude_outbound_ranges.is_empty() {
            a.push((key("eor"), self.exclude_outbound_ranges.join(",")));
        }
        if let Some(r) = &self.include_outbound_ranges {
            a.push((key("ior"), r.join(",")));
        }
        if !self.exclude_inbound_ports.is_empty() {
            a.push((key("eip"), join(&self.exclude_inbound_ports)));
        }
        if let Some(p) = &self.include_inbound_ports {
            a.push((key("iip"), join(p)));
        }
        if let Some(p) = self.status_port {
            a.push(("status.sidecar.istio.io/port", p.to_string()));
        }
        if let Some(g) = &self.owner_groups {
            a.push(("redirectd.dev/outboundOwnerGroups", join(g)));
        }
        if !self.owner_groups_exclude.is_empty() {
            a.push((
                "redirectd.dev/outboundOwnerGroupsExclude",
                join(&self.owner_groups_exclude),
            ));
        }
        if self.dns_capture {
            a.push(("redirectd.dev/dnsCapture", "true".into()));
        }
        if !self.exclude_interfaces.is_empty() {
            a.push((
                "traffic.sidecar.istio.io/excludeInterfaces",
                self.exclude_interfaces.join(","),
            ));
        }
        a
    }

    /// The `-t nat` rules for one family (`v6`: ip6tables), each as its arguments.
    pub fn rules(&self, v6: bool) -> Vec<String> {
        let (passthrough, localhost) = if v6 {
            ("::6/128", "::1/128")
        } else {
            ("127.0.0.6/32", "127.0.0.1/32")
        };
        let of_family = |cidrs: &[String]| -> Vec<String> {
            cidrs
                .iter()
                .filter(|c| c.contains(':') == v6)
                .cloned()
                .collect()
        };
        let mut r: Vec<String> = [
            "-N ISTIO_INBOUND",
            "-N ISTIO_REDIRECT",
            "-N ISTIO_IN_REDIRECT",
            "-N ISTIO_OUTPUT",
            "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        ]
        .map(String::from)
        .to_vec();
        // `shortCircuitExcludeInterfaces`: before any jump to Istio's chains.
        for i in &self.exclude_interfaces {
            r.push(format!("-A PREROUTING -i {i} -j RETURN"));
            r.push(format!("-A OUTPUT -o {i} -j RETURN"));
        }
        match &self.include_inbound_ports {
            None => {
                r.push("-A PREROUTING -p tcp -j ISTIO_INBOUND".into());
                let mut excluded = vec![15090, 15021];
                excluded.extend(Some(self.status_port.unwrap_or(15020)).filter(|p| *p != 0));
                excluded.extend(&self.exclude_inbound_ports);
                for p in excluded {
                    r.push(format!("-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN"));
                }
                r.push("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".into());
            }
            Some(ports) if !ports.is_empty() => {
                r.push("-A PREROUTING -p tcp -j ISTIO_INBOUND".into());
                for p in ports {
                    r.push(format!(
                        "-A ISTIO_INBOUND -p tcp --dport {p} -j ISTIO_IN_REDIRECT"
                    ));
                }
            }
            Some(_) => {}
        }
        let dns = self.dns_capture;
        if dns {
            // UDP goes through ISTIO_OUTPUT too (the golden `dns-uid-gid`).
            r.insert(4, "-N ISTIO_OUTPUT_DNS".into());
            r.push("-A OUTPUT -j ISTIO_OUTPUT".into());
        } else {
            r.push("-A OUTPUT -p tcp -j ISTIO_OUTPUT".into());
        }
        for p in &self.exclude_outbound_ports {
            r.push(format!("-A ISTIO_OUTPUT -p tcp --dport {p} -j RETURN"));
            if dns {
                r.push(format!("-A ISTIO_OUTPUT -p udp --dport {p} -j RETURN"));
            }
        }
        r.push(format!("-A ISTIO_OUTPUT -o lo -s {passthrough} -j RETURN"));
        // Istio's HasLoopBackIP (either family): the application's calls over lo are not
        // returned here.
        let loopback_included = self.include_outbound_ranges.iter().flatten().any(|c| {
            c.split('/')
                .next()
                .and_then(|a| a.parse::<std::net::IpAddr>().ok())
                .is_some_and(|a| a.is_loopback())
        });
        for owner in ["--uid-owner", "--gid-owner"] {
            // With DNS capture the uid's rule (only the uid's) leaves port 53 alone.
            let ports = if dns && owner == "--uid-owner" {
                "-m multiport ! --dports 53,15008"
            } else {
                "! --dport 15008"
            };
            r.push(format!("-A ISTIO_OUTPUT -o lo ! -d {localhost} -p tcp {ports} -m owner {owner} 1337 -j ISTIO_IN_REDIRECT"));
            if !loopback_included {
                let which = if dns { "-p tcp ! --dport 53 " } else { "" };
                r.push(format!(
                    "-A ISTIO_OUTPUT -o lo {which}-m owner ! {owner} 1337 -j RETURN"
                ));
            }
            r.push(format!("-A ISTIO_OUTPUT -m owner {owner} 1337 -j RETURN"));
        }
        // Owner groups (`handleCaptureByOwnerGroup`): an include list returns a caller in none
        // of its groups; else each excluded group returns.
        match &self.owner_groups {
            Some(groups) => {
                let none_of: String = groups
                    .iter()
                    .map(|g| format!(" -m owner ! --gid-owner {g}"))
                    .collect();
                r.push(format!("-A ISTIO_OUTPUT{none_of} -j RETURN"));
            }
            None => {
                for g in &self.owner_groups_exclude {
                    r.push(format!(
                        "-A ISTIO_OUTPUT -m owner --gid-owner {g} -j RETURN"
                    ));
                }
            }
        }
        if dns {
            // SetupDNSRedir with CaptureAllDNS, as istio-cni runs it (its conntrack zones, in
            // the raw table, only keep UDP conntrack entries apart and are left out).
            r.push("-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS".into());
            r.push("-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053".into());
            r.push("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053".into());
        }
        r.push(format!("-A ISTIO_OUTPUT -d {localhost} -j RETURN"));
        for c in of_family(&self.exclude_outbound_ranges) {
            r.push(format!("-A ISTIO_OUTPUT -d {c} -j RETURN"));
        }
        for p in &self.include_outbound_ports {
            r.push(format!(
                "-A ISTIO_OUTPUT -p tcp --dport {p} -j ISTIO_REDIRECT"
            ));
        }
        match &self.include_outbound_ranges {
            None => r.push("-A ISTIO_OUTPUT -j ISTIO_REDIRECT".into()),
            Some(ranges) => {
                for c in of_family(ranges) {
                    r.push(format!("-A ISTIO_OUTPUT -d {c} -j ISTIO_REDIRECT"));
                }
                if !ranges.is_empty() {
                    r.push("-A ISTIO_OUTPUT -j RETURN".into());
                }
            }
        }
        r
    }
}

/// Installs the rules of both families in `ns`.
pub fn install(ns: &Netns, options: &Options) -> Result<()> {
    for (cmd, v6) in [("iptables", false), ("ip6tables", true)] {
        for rule in options.rules(v6) {
            let mut args = vec![cmd, "-t", "nat"];
            args.extend(rule.split_whitespace());
            ns.exec(&args)
                .with_context(|| format!("{cmd} -t nat {rule}"))?;
        }
    }
    Ok(())
}

/// Removes both nat tables from `ns` (flushing would leave the NAT hooks and conntrack on).
pub fn remove(ns: &Netns) -> Result<()> {
    let version = ns.exec(&["iptables", "-V"])?;
    if !version.contains("nf_tables") {
        bail!("{version}: a legacy iptables nat table cannot be removed; use iptables-nft");
    }
    for family in ["ip", "ip6"] {
        let _ = ns.exec(&["nft", "delete", "table", family, "nat"]);
    }
    let left = ns.exec(&["nft", "list", "tables"])?;
    if left.contains("nat") {
        bail!("nat tables left in {}: {left}", ns.name);
    }
    Ok(())
}
