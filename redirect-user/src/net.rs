//! Small network types every layer uses: an IP network ([`Cidr`]) and an interface name's
//! check ([`valid_name`]). Depends on nothing else of the crate.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

/// An IP network: address (host bits cleared) and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// A single address: /32 or /128.
    pub fn host(addr: IpAddr) -> Self {
        let prefix_len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, prefix_len }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `a.b.c.d/n` or `x::y/n`; host bits are cleared, as Go's `net.ParseCIDR` (Istio) does.
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (expected address/prefix-length)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("prefix length {len:?} is not a number in 0..={max}"))?;
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Ok(Self { addr, prefix_len })
    }
}

/// An interface name as Linux accepts it (Istio's `ValidateInterfaceNames`): 1 to 15 bytes,
/// no `/`, no whitespace.
pub fn valid_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.contains(char::is_whitespace)
    {
        return Err(format!(
            "{name:?} is not an interface name (1 to 15 bytes, no '/' or spaces)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_clears_host_bits() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        let c: Cidr = "fd00:1:2::5/32".parse().unwrap();
        assert_eq!(c.to_string(), "fd00:1::/32");
        let c: Cidr = "0.0.0.0/0".parse().unwrap();
        assert_eq!(c.prefix_len, 0);
    }

    #[test]
    fn interface_names() {
        assert!(valid_name("eth0").is_ok());
        assert!(valid_name("").is_err());
        assert!(valid_name("a-name-too-long-x").is_err());
        assert!(valid_name("a/b").is_err());
    }
}
