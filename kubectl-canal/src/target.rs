//! Parsing `NS/NAME` and `TO[:PORT[/PROTO]]` (pure).

use std::net::IpAddr;

use canal_crds::Protocol;

use crate::Error;

/// Where a connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    /// A pod, `namespace/name`.
    Pod(String),
    /// An address (a pod's, a node's or anything outside).
    Ip(IpAddr),
}

/// A port: a number, or a name the destination pod declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    /// A port number.
    Number(u16),
    /// A container port name (resolved on the destination pod).
    Name(String),
}

/// `TO[:PORT[/PROTO]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The destination.
    pub dest: Dest,
    /// The port (None: not given).
    pub port: Option<PortSpec>,
    /// The protocol (TCP when not given).
    pub protocol: Protocol,
}

/// Checks `NS/NAME`.
pub fn parse_pod(s: &str) -> Result<String, Error> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(s.to_string())
        }
        _ => Err(Error::Usage(format!(
            "{s:?}: a pod is NAMESPACE/NAME, e.g. x/a"
        ))),
    }
}

/// Parses `NS/NAME`, `IP` or `[IPv6]`, each optionally followed by
/// `:PORT` (a number or a named port) and `/PROTO` (TCP, UDP, SCTP; any case).
pub fn parse_target(s: &str) -> Result<Target, Error> {
    let usage = || {
        Error::Usage(format!(
            "{s:?}: expected NS/NAME[:PORT[/PROTO]] or IP[:PORT[/PROTO]] ([IPv6]:PORT), e.g. y/b:80/TCP"
        ))
    };
    // A bare IPv6 address has colons of its own.
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Target {
            dest: Dest::Ip(ip),
            port: None,
            protocol: Protocol::TCP,
        });
    }
    let (host, rest) = if let Some(inner) = s.strip_prefix('[') {
        let (ip, after) = inner.split_once(']').ok_or_else(usage)?;
        match after {
            "" => (ip, None),
            a => (ip, Some(a.strip_prefix(':').ok_or_else(usage)?)),
        }
    } else {
        match s.split_once(':') {
            Some((h, r)) => (h, Some(r)),
            None => (s, None),
        }
    };
    let dest = match host.parse::<IpAddr>() {
        Ok(ip) => Dest::Ip(ip),
        Err(_) if s.starts_with('[') => return Err(usage()),
        Err(_) => Dest::Pod(parse_pod(host).map_err(|_| usage())?),
    };
    let (port, protocol) = match rest {
        None => (None, Protocol::TCP),
        Some(r) => {
            let (p, proto) = match r.split_once('/') {
                Some((p, proto)) => (p, Some(proto)),
                None => (r, None),
            };
            let port = match p.parse::<u16>() {
                Ok(0) => return Err(usage()),
                Ok(n) => PortSpec::Number(n),
                Err(_) if is_port_name(p) => PortSpec::Name(p.to_string()),
                Err(_) => return Err(usage()),
            };
            let protocol = match proto {
                None => Protocol::TCP,
                Some(x) => Protocol::parse(&x.to_ascii_uppercase()).ok_or_else(usage)?,
            };
            (Some(port), protocol)
        }
    };
    Ok(Target {
        dest,
        port,
        protocol,
    })
}

/// An IANA_SVC_NAME: 1-15 lowercase alphanumerics and '-', with a letter.
fn is_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Target {
        parse_target(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn pods_ips_ports_and_protocols() {
        assert_eq!(
            t("y/b:80/TCP"),
            Target {
                dest: Dest::Pod("y/b".into()),
                port: Some(PortSpec::Number(80)),
                protocol: Protocol::TCP
            }
        );
        assert_eq!(t("y/b:81/udp").protocol, Protocol::UDP);
        assert_eq!(t("y/b").port, None);
        assert_eq!(t("y/b:http").port, Some(PortSpec::Name("http".into())));
        assert_eq!(
            t("10.244.1.5:53/UDP").dest,
            Dest::Ip("10.244.1.5".parse().unwrap())
        );
        assert_eq!(t("fd00::5").dest, Dest::Ip("fd00::5".parse().unwrap()));
        let v6 = t("[fd00::5]:443/SCTP");
        assert_eq!(v6.dest, Dest::Ip("fd00::5".parse().unwrap()));
        assert_eq!(v6.port, Some(PortSpec::Number(443)));
        assert_eq!(v6.protocol, Protocol::SCTP);
        assert_eq!(t("[fd00::5]").port, None);
    }

    #[test]
    fn malformed_targets_are_refused() {
        for bad in [
            "b",
            "y/",
            "/b",
            "y/b/c",
            "y/b:0",
            "y/b:70000",
            "y/b:80/ICMP",
            "y/b:HTTP",
            "[fd00::5",
            "[nope]:80",
            "[fd00::5]80",
            "y/b:",
        ] {
            assert!(parse_target(bad).is_err(), "{bad} parsed");
        }
        assert!(parse_pod("x/a").is_ok());
        assert!(parse_pod("x").is_err());
    }
}
