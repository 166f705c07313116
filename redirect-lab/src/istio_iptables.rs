//! Istio's `istio-iptables` rule sets (REDIRECT and TPROXY mode) for a pod's capture options, in the order and
//! shape of Istio's own golden test outputs (`tools/istio-iptables/pkg/capture/testdata`:
//! `ip-range`, `outbound-ports-include`, `outbound-ports-exclude`, `inbound-ports-include`,
//! `inbound-wildcard-exclude`, `ipv6-uid-gid`, `loopback-outbound-iprange`, `tproxy`,
//! `inbound-ports-tproxy`, `kube-virt-interfaces`), proxy uid and gid
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
    /// `traffic.sidecar.istio.io/kubevirtInterfaces` (the golden `kube-virt-interfaces`).
    pub virt_interfaces: Vec<String>,
    /// `sidecar.istio.io/interceptionMode: TPROXY` (the golden `tproxy` and
    /// `inbound-ports-*tproxy`): inbound in the mangle table, with Istio's policy routing.
    pub tproxy: bool,
}

/// The family's passthrough source and localhost, as Istio's rules name them.
fn own_addresses(v6: bool) -> (&'static str, &'static str) {
    if v6 {
        ("::6/128", "::1/128")
    } else {
        ("127.0.0.6/32", "127.0.0.1/32")
    }
}

/// Istio's `--inbound-tproxy-mark` and `--inbound-tproxy-route-table`.
const TPROXY_MARK: u32 = 1337;
const TPROXY_TABLE: u32 = 133;
/// The mark Istio's rules give the proxy's own connections to its pod's address in TPROXY
/// mode (`outboundMark`, the TPROXY mark + 1).
const PROXY_TO_POD_MARK: u32 = 1338;

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
        if self.tproxy {
            a.push(("sidecar.istio.io/interceptionMode", "TPROXY".into()));
        }
        if !self.virt_interfaces.is_empty() {
            a.push((
                "traffic.sidecar.istio.io/kubevirtInterfaces",
                self.virt_interfaces.join(","),
            ));
        }
        a
    }

    /// The inbound ports that return before capture when every port is captured: Istio's
    /// injector's `-d` (15090, 15021, the status port) and `excludeInboundPorts`.
    fn excluded_inbound(&self) -> Vec<u16> {
        let mut excluded = vec![15090, 15021];
        excluded.extend(Some(self.status_port.unwrap_or(15020)).filter(|p| *p != 0));
        excluded.extend(&self.exclude_inbound_ports);
        excluded
    }

    /// The `-t mangle` rules of TPROXY mode for one family (none in REDIRECT mode), in the
    /// golden `tproxy`'s order: inbound TCP is handed to 15006 unchanged and marked, the
    /// proxy's original-source connections (mark 1337) are left alone and their replies
    /// marked back to it through the connection mark.
    pub fn mangle_rules(&self, v6: bool) -> Vec<String> {
        if !self.tproxy {
            return Vec::new();
        }
        let (passthrough, localhost) = own_addresses(v6);
        let (mark, to_pod) = (TPROXY_MARK, PROXY_TO_POD_MARK);
        let mut r: Vec<String> = ["-N ISTIO_DIVERT", "-N ISTIO_TPROXY", "-N ISTIO_INBOUND"]
            .map(String::from)
            .to_vec();
        for i in &self.exclude_interfaces {
            r.push(format!("-A PREROUTING -i {i} -j RETURN"));
            r.push(format!("-A OUTPUT -o {i} -j RETURN"));
        }
        r.push(format!("-A ISTIO_DIVERT -j MARK --set-mark {mark}"));
        r.push("-A ISTIO_DIVERT -j ACCEPT".into());
        r.push(format!("-A ISTIO_TPROXY ! -d {localhost} -p tcp -j TPROXY --tproxy-mark {mark}/0xffffffff --on-port 15006"));
        let established = "-m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT";
        match &self.include_inbound_ports {
            None => {
                r.push("-A PREROUTING -p tcp -j ISTIO_INBOUND".into());
                for p in self.excluded_inbound() {
                    r.push(format!("-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN"));
                }
                r.push(format!("-A ISTIO_INBOUND -p tcp {established}"));
                r.push("-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY".into());
            }
            Some(ports) if !ports.is_empty() => {
                r.push("-A PREROUTING -p tcp -j ISTIO_INBOUND".into());
                for p in ports {
                    r.push(format!("-A ISTIO_INBOUND -p tcp --dport {p} {established}"));
                    r.push(format!(
                        "-A ISTIO_INBOUND -p tcp --dport {p} -j ISTIO_TPROXY"
                    ));
                }
            }
            Some(_) => {}
        }
        r.push(format!(
            "-A PREROUTING -p tcp -m mark --mark {mark} -j CONNMARK --save-mark"
        ));
        r.push(format!(
            "-A OUTPUT -p tcp -o lo -m mark --mark {mark} -j RETURN"
        ));
        for owner in ["--uid-owner", "--gid-owner"] {
            r.push(format!("-A OUTPUT ! -d {localhost} -p tcp -o lo -m owner {owner} 1337 -j MARK --set-mark {to_pod}"));
        }
        r.push(format!(
            "-A OUTPUT -p tcp -m connmark --mark {mark} -j CONNMARK --restore-mark"
        ));
        r.push(format!(
            "-I ISTIO_INBOUND 1 -p tcp -m mark --mark {mark} -j RETURN"
        ));
        r.push(format!(
            "-I ISTIO_INBOUND 2 -p tcp -s {passthrough} -i lo -j RETURN"
        ));
        r.push(format!(
            "-I ISTIO_INBOUND 3 -p tcp -i lo -m mark ! --mark {to_pod} -j RETURN"
        ));
        r
    }

    /// The `-t nat` rules for one family (`v6`: ip6tables), each as its arguments.
    pub fn rules(&self, v6: bool) -> Vec<String> {
        let (passthrough, localhost) = own_addresses(v6);
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
        // A VM interface's other traffic is not inbound capture's.
        for i in &self.virt_interfaces {
            r.push(format!("-I PREROUTING 1 -i {i} -j RETURN"));
        }
        match &self.include_inbound_ports {
            // TPROXY: inbound is captured in the mangle table.
            _ if self.tproxy => {}
            None => {
                r.push("-A PREROUTING -p tcp -j ISTIO_INBOUND".into());
                for p in self.excluded_inbound() {
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
        // Last, inserted first: a VM interface's TCP goes to the outbound listener.
        for i in &self.virt_interfaces {
            r.push(format!("-I PREROUTING 1 -i {i} -j ISTIO_REDIRECT"));
        }
        r
    }
}

/// Installs the rules of both families in `ns` (and, in TPROXY mode, Istio's policy routing:
/// `ip rule add fwmark 1337 lookup 133` and `ip route add local default dev lo table 133`).
pub fn install(ns: &Netns, options: &Options) -> Result<()> {
    for (cmd, v6) in [("iptables", false), ("ip6tables", true)] {
        for (table, rules) in [
            ("nat", options.rules(v6)),
            ("mangle", options.mangle_rules(v6)),
        ] {
            for rule in rules {
                let mut args = vec![cmd, "-t", table];
                args.extend(rule.split_whitespace());
                ns.exec(&args)
                    .with_context(|| format!("{cmd} -t {table} {rule}"))?;
            }
        }
    }
    if options.tproxy {
        let (mark, table) = (TPROXY_MARK.to_string(), TPROXY_TABLE.to_string());
        for (family, default) in [("inet", "default"), ("inet6", "::/0")] {
            ns.exec(&[
                "ip", "-f", family, "rule", "add", "fwmark", &mark, "lookup", &table,
            ])?;
            ns.exec(&[
                "ip", "-f", family, "route", "add", "local", default, "dev", "lo", "table", &table,
            ])?;
        }
    }
    Ok(())
}

/// Removes both families' nat and mangle tables from `ns` (flushing would leave the hooks and
/// conntrack on), and TPROXY's policy routing.
pub fn remove(ns: &Netns) -> Result<()> {
    let version = ns.exec(&["iptables", "-V"])?;
    if !version.contains("nf_tables") {
        bail!("{version}: a legacy iptables nat table cannot be removed; use iptables-nft");
    }
    for family in ["ip", "ip6"] {
        for table in ["nat", "mangle"] {
            let _ = ns.exec(&["nft", "delete", "table", family, table]);
        }
    }
    let left = ns.exec(&["nft", "list", "tables"])?;
    if left.contains("nat") || left.contains("mangle") {
        bail!("nat or mangle tables left in {}: {left}", ns.name);
    }
    let (mark, table) = (TPROXY_MARK.to_string(), TPROXY_TABLE.to_string());
    for family in ["inet", "inet6"] {
        while ns
            .exec(&[
                "ip", "-f", family, "rule", "del", "fwmark", &mark, "lookup", &table,
            ])
            .is_ok()
        {}
        let _ = ns.exec(&["ip", "-f", family, "route", "flush", "table", &table]);
    }
    Ok(())
}
