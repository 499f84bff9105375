//! The lab's IP families (`canal-lab up --ip-family ipv4|ipv6|dual`) and
//! the family a probe uses (`--family 4|6`). Pure.
//!
//! - `ipv4`: as the lab always was.
//! - `ipv6`: an IPv6-only underlay (no IPv4 address on any node), the
//!   CanalNetwork's only range IPv6, pods with one IPv6 address.
//! - `dual`: a dual-stack underlay (every node has an address of each
//!   family on `eth0` and a default route of each) and both ranges, IPv4
//!   first. flannel's VXLAN backend carries each family over an underlay
//!   address of the same family, so a dual-stack cluster needs a
//!   dual-stack underlay; it is also what real dual-stack nodes have.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The CanalNetwork's IPv4 range in the lab.
pub const CLUSTER_CIDR_V4: &str = "10.244.0.0/16";
/// The CanalNetwork's IPv6 range in the lab (a ULA prefix).
pub const CLUSTER_CIDR_V6: &str = "fd00:10:244::/56";
/// The IPv6 node subnet length in the lab (a /64 per node, flannel's default).
pub const NODE_SUBNET_LENGTH_V6: u8 = 64;

/// The families a lab runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    /// IPv4 only.
    #[default]
    Ipv4,
    /// IPv6 only.
    Ipv6,
    /// Both, IPv4 first.
    Dual,
}

impl IpFamily {
    /// Whether the lab has IPv4.
    pub fn has_v4(self) -> bool {
        matches!(self, IpFamily::Ipv4 | IpFamily::Dual)
    }

    /// Whether the lab has IPv6.
    pub fn has_v6(self) -> bool {
        matches!(self, IpFamily::Ipv6 | IpFamily::Dual)
    }

    /// Its families, primary first.
    pub fn families(self) -> Vec<Family> {
        match self {
            IpFamily::Ipv4 => vec![Family::V4],
            IpFamily::Ipv6 => vec![Family::V6],
            IpFamily::Dual => vec![Family::V4, Family::V6],
        }
    }

    /// The primary family (probes use it unless told otherwise).
    pub fn primary(self) -> Family {
        self.families()[0]
    }

    /// The CanalNetwork's clusterCIDRs, primary first.
    pub fn cluster_cidrs(self) -> Vec<&'static str> {
        self.families()
            .into_iter()
            .map(|f| match f {
                Family::V4 => CLUSTER_CIDR_V4,
                Family::V6 => CLUSTER_CIDR_V6,
            })
            .collect()
    }

    /// `ipv4`, `ipv6`, `dual`.
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::Ipv4 => "ipv4",
            IpFamily::Ipv6 => "ipv6",
            IpFamily::Dual => "dual",
        }
    }
}

impl FromStr for IpFamily {
    type Err = String;
    fn from_str(s: &str) -> Result<IpFamily, String> {
        match s.to_ascii_lowercase().as_str() {
            "ipv4" | "4" => Ok(IpFamily::Ipv4),
            "ipv6" | "6" => Ok(IpFamily::Ipv6),
            "dual" | "dualstack" | "dual-stack" => Ok(IpFamily::Dual),
            _ => Err(format!("{s:?}: expected ipv4, ipv6 or dual")),
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// `4` / `6`.
    pub fn number(self) -> u8 {
        match self {
            Family::V4 => 4,
            Family::V6 => 6,
        }
    }
}

impl FromStr for Family {
    type Err = String;
    fn from_str(s: &str) -> Result<Family, String> {
        match s.to_ascii_lowercase().as_str() {
            "4" | "ipv4" | "v4" => Ok(Family::V4),
            "6" | "ipv6" | "v6" => Ok(Family::V6),
            _ => Err(format!("{s:?}: expected 4 or 6")),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IPv{}", self.number())
    }
}

/// The first address of `family` among `ips`.
pub fn pick(ips: &[IpAddr], family: Family) -> Option<IpAddr> {
    ips.iter().copied().find(|ip| Family::of(ip) == family)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_families_parse_and_order() {
        assert_eq!("dual".parse::<IpFamily>().unwrap(), IpFamily::Dual);
        assert_eq!("IPv6".parse::<IpFamily>().unwrap(), IpFamily::Ipv6);
        assert!("both".parse::<IpFamily>().is_err());
        assert_eq!(
            IpFamily::Dual.cluster_cidrs(),
            vec![CLUSTER_CIDR_V4, CLUSTER_CIDR_V6]
        );
        assert_eq!(IpFamily::Ipv6.primary(), Family::V6);
        assert_eq!("6".parse::<Family>().unwrap(), Family::V6);
        assert!("5".parse::<Family>().is_err());
        let ips: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        assert_eq!(pick(&ips, Family::V6), Some(ips[1]));
        // Records from before families existed read as IPv4.
        #[derive(Deserialize)]
        struct R {
            #[serde(default)]
            f: IpFamily,
        }
        let r: R = serde_json::from_str("{}").unwrap();
        assert_eq!(r.f, IpFamily::Ipv4);
    }
}
