//! Parses the `hearth.*` parameters of the kernel command line (see docs/contracts.md).
//!
//! Owns only parsing; it never touches the system.

use std::net::Ipv4Addr;

/// Guest boot parameters handed over by the host agent on the kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootParams {
    /// Guest address and prefix length on eth0 (`hearth.ip=169.254.0.21/30`).
    pub ip: Option<(Ipv4Addr, u8)>,
    /// Default gateway (`hearth.gw=169.254.0.22`).
    pub gateway: Option<Ipv4Addr>,
    /// Hostname (`hearth.hostname=sb-...`).
    pub hostname: Option<String>,
    /// `hearth.probe=1`: print the probe marker and power off.
    pub probe: bool,
}

/// Parses a kernel command line. Unknown or malformed `hearth.*` values are ignored.
pub fn parse(cmdline: &str) -> BootParams {
    let mut p = BootParams::default();
    for word in cmdline.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "hearth.ip" => {
                let (addr, prefix) = value.split_once('/').unwrap_or((value, "32"));
                if let (Ok(a), Ok(pl)) = (addr.parse::<Ipv4Addr>(), prefix.parse::<u8>()) {
                    if pl <= 32 {
                        p.ip = Some((a, pl));
                    }
                }
            }
            "hearth.gw" => p.gateway = value.parse().ok(),
            "hearth.hostname" if !value.is_empty() => p.hostname = Some(value.to_owned()),
            "hearth.probe" => p.probe = value == "1",
            _ => {}
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_contract_example() {
        let p = parse(
            "console=ttyS0 reboot=t hearth.ip=169.254.0.21/30 hearth.gw=169.254.0.22 \
             hearth.hostname=sb-1 quiet",
        );
        assert_eq!(p.ip, Some((Ipv4Addr::new(169, 254, 0, 21), 30)));
        assert_eq!(p.gateway, Some(Ipv4Addr::new(169, 254, 0, 22)));
        assert_eq!(p.hostname.as_deref(), Some("sb-1"));
        assert!(!p.probe);
    }

    #[test]
    fn ignores_malformed_values() {
        let p = parse("hearth.ip=300.1.1.1/30 hearth.gw=x hearth.probe=1");
        assert_eq!(p.ip, None);
        assert_eq!(p.gateway, None);
        assert!(p.probe);
    }
}
