//! The client-side half of CanalNetwork validation. The API server enforces
//! the same rules through the CRD schema; the controller repeats them so that
//! an object stored before a schema change still gets a clear InvalidSpec
//! condition instead of a crash.
//!
//! The ranges no cluster CIDR may overlap live in one table per family
//! ([`RESERVED_V4`], [`RESERVED_V6`]); the CRD's CEL rules are built from
//! the same entries ([`reserved_rule`]), so the API server and the
//! controller say the same thing. IPv6 entries are ready for `clusterCIDRs`
//! (one per family, issue 14); today's `clusterCIDR` is IPv4 only.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use kube::core::{Message, Rule};

use crate::canal_network::{BackendType, CanalNetworkSpec, EndpointToHostAction, PolicyDataplane};

/// An address range a cluster CIDR must not overlap, and why: shown to the
/// person who asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservedRange {
    /// The range in CIDR notation.
    pub cidr: &'static str,
    /// What it is.
    pub what: &'static str,
    /// Why pods cannot live there.
    pub why: &'static str,
}

/// IPv4 ranges that can never hold pod addresses.
pub const RESERVED_V4: [ReservedRange; 5] = [
    ReservedRange {
        cidr: "0.0.0.0/8",
        what: "\"this network\"",
        why: "no host can hold an address there",
    },
    ReservedRange {
        cidr: "127.0.0.0/8",
        what: "loopback",
        why: "those addresses never leave a host, so pods there are unreachable",
    },
    ReservedRange {
        cidr: "169.254.0.0/16",
        what: "link-local",
        why: "every pod's gateway is 169.254.1.1 and link-local addresses are never routed",
    },
    ReservedRange {
        cidr: "224.0.0.0/4",
        what: "multicast",
        why: "a pod cannot hold a multicast address",
    },
    ReservedRange {
        cidr: "240.0.0.0/4",
        what: "reserved, with the broadcast address 255.255.255.255",
        why: "Linux does not route it",
    },
];

/// IPv6 ranges that can never hold pod addresses (for `clusterCIDRs`).
pub const RESERVED_V6: [ReservedRange; 4] = [
    ReservedRange {
        cidr: "::/128",
        what: "unspecified",
        why: "no host can hold it",
    },
    ReservedRange {
        cidr: "::1/128",
        what: "loopback",
        why: "it never leaves a host",
    },
    ReservedRange {
        cidr: "fe80::/10",
        what: "link-local",
        why: "link-local addresses are never routed",
    },
    ReservedRange {
        cidr: "ff00::/8",
        what: "multicast",
        why: "a pod cannot hold a multicast address",
    },
];

/// The widest IPv4 cluster CIDR: 10.0.0.0/8 is the largest private range
/// (RFC 1918). Any wider range takes in public addresses, which pods could
/// then no longer reach (they are routed into the overlay and never
/// masqueraded), and /8 of /30 node subnets is still 4 million nodes.
pub const MIN_PREFIX_V4: u8 = 8;

/// The widest IPv6 cluster CIDR (for `clusterCIDRs`): a /32 is what a
/// regional registry gives a whole ISP.
pub const MIN_PREFIX_V6: u8 = 32;

/// The message for a cluster CIDR overlapping `r`.
pub fn reserved_message(r: &ReservedRange) -> String {
    format!(
        "clusterCIDR must not overlap {} ({}): {}",
        r.cidr, r.what, r.why
    )
}

/// The CEL rule that refuses a cluster CIDR overlapping `r` (two prefixes
/// overlap exactly when one contains the other).
pub fn reserved_rule(r: &ReservedRange) -> Rule {
    let c = r.cidr;
    Rule::new(format!(
        "!isCIDR(self) || !(cidr(self).containsCIDR(cidr('{c}')) || cidr('{c}').containsCIDR(cidr(self)))"
    ))
    .message(Message::Message(reserved_message(r)))
}

fn min_prefix_message(min: u8) -> String {
    format!(
        "clusterCIDR must be /{min} or longer, e.g. 10.0.0.0/8 (the largest private range): a wider range takes in public addresses, which pods could then no longer reach"
    )
}

/// The CEL rule that refuses IPv4 cluster CIDRs wider than `/min`.
pub fn min_prefix_rule(min: u8) -> Rule {
    Rule::new(format!(
        "!isCIDR(self) || cidr(self).ip().family() != 4 || cidr(self).prefixLength() >= {min}"
    ))
    .message(Message::Message(min_prefix_message(min)))
}

/// Longest Linux interface name in bytes (IFNAMSIZ 16 with the NUL).
pub const MAX_INTERFACE_NAME: usize = 15;

const INTERFACE_MESSAGE: &str = "interface must be a Linux interface name: 1 to 15 bytes with no '/', ':' or whitespace, and not '.' or '..' (e.g. eth0, ens5, bond0.100); leave it empty for the interface of the default route";

/// The CEL rule for `interface`: the kernel's `dev_valid_name()`.
pub fn interface_rule() -> Rule {
    Rule::new(
        "self == '' || (bytes(self).size() <= 15 && self != '.' && self != '..' && !self.matches(r'[/:\\s\\v]'))",
    )
    .message(INTERFACE_MESSAGE)
}

/// Why `name` is not a Linux interface name (the kernel's
/// `dev_valid_name()`), or None when it is one.
pub fn interface_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name.len() > MAX_INTERFACE_NAME {
        return Some("it is longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Some("'.' and '..' are not allowed");
    }
    // The kernel's isspace(): space, \t, \n, \v, \f, \r.
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'))
    {
        return Some("it contains '/', ':' or whitespace");
    }
    None
}

/// The reserved range `net` overlaps, if any (either family).
pub fn reserved_overlap(net: IpNet) -> Option<&'static ReservedRange> {
    let table: &'static [ReservedRange] = match net {
        IpNet::V4(_) => &RESERVED_V4,
        IpNet::V6(_) => &RESERVED_V6,
    };
    table.iter().find(|r| {
        r.cidr
            .parse::<IpNet>()
            .is_ok_and(|reserved| reserved.contains(&net) || net.contains(&reserved))
    })
}

/// True when `ip` is an address no Node can be reached at over an
/// underlay: unspecified, loopback, link-local, multicast, broadcast or
/// reserved.
pub fn is_unusable_node_address(ip: IpAddr) -> bool {
    let net = IpNet::from(ip);
    reserved_overlap(net).is_some()
}

/// A CanalNetwork spec that cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// clusterCIDR does not parse.
    #[error("clusterCIDR {value:?} is not a valid IPv4 CIDR such as 10.244.0.0/16")]
    ClusterCidrInvalid { value: String },
    /// clusterCIDR has host bits set.
    #[error("clusterCIDR {value:?} has host bits set; did you mean {network}?")]
    ClusterCidrHostBits { value: String, network: String },
    /// nodeSubnetLength out of range.
    #[error(
        "nodeSubnetLength {value} must be longer than the clusterCIDR prefix /{cluster_prefix} and at most 30"
    )]
    SubnetLength { value: u8, cluster_prefix: u8 },
    /// VNI out of range.
    #[error("backend.vni {value} must be within 1..16777215")]
    Vni { value: u32 },
    /// Port out of range.
    #[error("backend.port {value} must be within 1..65535")]
    Port { value: u32 },
    /// MTU out of range.
    #[error("backend.mtu {value} must be 0 (derive from the underlay) or within 576..65535")]
    Mtu { value: u32 },
    /// clusterCIDR overlaps a range that can never hold pods.
    #[error("clusterCIDR {value}: {}", reserved_message(range))]
    ClusterCidrReserved {
        value: String,
        range: &'static ReservedRange,
    },
    /// clusterCIDR is wider than any sane pod range.
    #[error("clusterCIDR {value}: {}", min_prefix_message(*min))]
    ClusterCidrTooWide { value: String, min: u8 },
    /// interface is not a Linux interface name.
    #[error(
        "interface {value:?} is not a Linux interface name: {why} (1 to 15 bytes with no '/', ':' or whitespace, not '.' or '..'; leave it empty for the interface of the default route)"
    )]
    Interface { value: String, why: &'static str },
}

/// A validated CanalNetwork spec in typed form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The pod address range.
    pub cluster_cidr: Ipv4Net,
    /// Prefix length of node subnets.
    pub node_subnet_length: u8,
    /// Overlay type.
    pub backend: BackendType,
    /// VXLAN network identifier.
    pub vni: u32,
    /// VXLAN UDP port.
    pub port: u16,
    /// Route directly to same-segment nodes.
    pub direct_routing: bool,
    /// Explicit MTU, or None to derive it from the underlay.
    pub mtu: Option<u32>,
    /// SNAT traffic leaving the cluster.
    pub masquerade: bool,
    /// Underlay interface, or None for the default-route interface.
    pub interface: Option<String>,
    /// Pod-to-own-node action.
    pub endpoint_to_host: EndpointToHostAction,
    /// NetworkPolicy enforcement on.
    pub policy_enabled: bool,
    /// `policy.dataplane`.
    pub policy_dataplane: PolicyDataplane,
}

impl NetworkConfig {
    /// Number of node subnets in the cluster range.
    pub fn total_subnets(&self) -> u64 {
        1u64 << (self.node_subnet_length - self.cluster_cidr.prefix_len())
    }
}

impl CanalNetworkSpec {
    /// Checks every rule the CRD schema states and returns the typed config.
    pub fn validate(&self) -> Result<NetworkConfig, SpecError> {
        let cluster_cidr = parse_ipv4_cidr(&self.cluster_cidr)?;
        if let Some(range) = reserved_overlap(IpNet::V4(cluster_cidr)) {
            return Err(SpecError::ClusterCidrReserved {
                value: self.cluster_cidr.clone(),
                range,
            });
        }
        if cluster_cidr.prefix_len() < MIN_PREFIX_V4 {
            return Err(SpecError::ClusterCidrTooWide {
                value: self.cluster_cidr.clone(),
                min: MIN_PREFIX_V4,
            });
        }
        if let Some(name) = self.interface.as_deref().filter(|i| !i.is_empty())
            && let Some(why) = interface_problem(name)
        {
            return Err(SpecError::Interface {
                value: name.to_string(),
                why,
            });
        }
        let prefix = cluster_cidr.prefix_len();
        if self.node_subnet_length <= prefix || self.node_subnet_length > 30 {
            return Err(SpecError::SubnetLength {
                value: self.node_subnet_length,
                cluster_prefix: prefix,
            });
        }
        let b = &self.backend;
        if !(1..=16_777_215).contains(&b.vni) {
            return Err(SpecError::Vni { value: b.vni });
        }
        let port = u16::try_from(b.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(SpecError::Port { value: b.port })?;
        if b.mtu != 0 && !(576..=65535).contains(&b.mtu) {
            return Err(SpecError::Mtu { value: b.mtu });
        }
        Ok(NetworkConfig {
            cluster_cidr,
            node_subnet_length: self.node_subnet_length,
            backend: b.type_,
            vni: b.vni,
            port,
            direct_routing: b.direct_routing,
            mtu: (b.mtu != 0).then_some(b.mtu),
            masquerade: self.masquerade,
            interface: self.interface.clone().filter(|i| !i.is_empty()),
            endpoint_to_host: self.default_endpoint_to_host_action,
            policy_enabled: self.policy.enabled,
            policy_dataplane: self.policy.dataplane,
        })
    }
}

/// Parses an IPv4 network in CIDR notation, refusing host bits.
pub fn parse_ipv4_cidr(value: &str) -> Result<Ipv4Net, SpecError> {
    let net: Ipv4Net = value.parse().map_err(|_| SpecError::ClusterCidrInvalid {
        value: value.to_string(),
    })?;
    if net.network() != net.addr() {
        return Err(SpecError::ClusterCidrHostBits {
            value: value.to_string(),
            network: net.trunc().to_string(),
        });
    }
    Ok(net)
}

/// The first address of a subnet after its network address, used as a gateway hint.
pub fn first_host(net: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()).saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cidr: &str, len: u8) -> CanalNetworkSpec {
        CanalNetworkSpec {
            node_subnet_length: len,
            ..CanalNetworkSpec::with_cluster_cidr(cidr)
        }
    }

    #[test]
    fn accepts_defaults() {
        let cfg = spec("10.244.0.0/16", 24).validate().unwrap();
        assert_eq!(cfg.total_subnets(), 256);
        assert_eq!(cfg.port, 8472);
        assert_eq!(cfg.vni, 1);
        assert_eq!(cfg.mtu, None);
    }

    #[test]
    fn rejects_bad_cidrs_and_lengths() {
        assert!(matches!(
            spec("10.244.0.0", 24).validate(),
            Err(SpecError::ClusterCidrInvalid { .. })
        ));
        assert!(matches!(
            spec("fd00::/64", 80).validate(),
            Err(SpecError::ClusterCidrInvalid { .. })
        ));
        assert_eq!(
            spec("10.244.1.0/16", 24).validate(),
            Err(SpecError::ClusterCidrHostBits {
                value: "10.244.1.0/16".into(),
                network: "10.244.0.0/16".into()
            })
        );
        assert!(matches!(
            spec("10.244.0.0/16", 16).validate(),
            Err(SpecError::SubnetLength { .. })
        ));
        assert!(matches!(
            spec("10.244.0.0/16", 31).validate(),
            Err(SpecError::SubnetLength { .. })
        ));
        assert!(spec("10.244.0.0/16", 30).validate().is_ok());
    }

    #[test]
    fn refuses_ranges_that_can_never_hold_pods() {
        for (cidr, range) in [
            ("127.0.0.0/8", "127.0.0.0/8"),
            ("127.1.0.0/16", "127.0.0.0/8"),
            ("0.0.0.0/8", "0.0.0.0/8"),
            ("169.254.0.0/16", "169.254.0.0/16"),
            ("169.254.1.0/24", "169.254.0.0/16"),
            ("169.0.0.0/8", "169.254.0.0/16"),
            ("224.0.0.0/4", "224.0.0.0/4"),
            ("239.1.0.0/16", "224.0.0.0/4"),
            ("240.0.0.0/4", "240.0.0.0/4"),
            ("255.255.255.0/24", "240.0.0.0/4"),
        ] {
            match spec(cidr, 30).validate() {
                Err(SpecError::ClusterCidrReserved { range: r, value }) => {
                    assert_eq!((r.cidr, value.as_str()), (range, cidr));
                }
                other => panic!("{cidr}: expected overlap with {range}, got {other:?}"),
            }
        }
        let msg = spec("169.254.0.0/16", 24)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("169.254.1.1"), "{msg}");
        // Neighbours of the reserved ranges are fine.
        for ok in [
            "126.0.0.0/8",
            "128.0.0.0/8",
            "169.253.0.0/16",
            "223.0.0.0/8",
            "1.0.0.0/8",
        ] {
            assert!(spec(ok, 24).validate().is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_absurdly_wide_ranges() {
        for wide in ["10.0.0.0/7", "64.0.0.0/3", "32.0.0.0/3"] {
            let e = spec(wide, 24).validate().unwrap_err();
            assert!(
                matches!(e, SpecError::ClusterCidrTooWide { min: 8, .. }),
                "{wide}: {e:?}"
            );
            assert!(e.to_string().contains("/8 or longer"), "{e}");
        }
        assert!(spec("10.0.0.0/8", 24).validate().is_ok());
        // Wide and reserved: the reserved range is the better reason.
        for both in ["0.0.0.0/1", "0.0.0.0/0", "128.0.0.0/1"] {
            assert!(
                matches!(
                    spec(both, 24).validate(),
                    Err(SpecError::ClusterCidrReserved { .. })
                ),
                "{both}"
            );
        }
    }

    #[test]
    fn interface_names_follow_the_kernel() {
        for bad in [
            "a b/c",
            "a b",
            "a/b",
            "eth0:1",
            ".",
            "..",
            "tab\there",
            "nl\n",
            "vt\u{b}x",
            "sixteen-bytes-xx",
            "ä123456789abcde",
        ] {
            let mut s = spec("10.244.0.0/16", 24);
            s.interface = Some(bad.into());
            assert!(
                matches!(s.validate(), Err(SpecError::Interface { .. })),
                "{bad:?} accepted"
            );
        }
        for good in [
            "eth0",
            "ens5",
            "bond0.100",
            "fifteen-bytes-x",
            "wg-ä",
            "...",
        ] {
            let mut s = spec("10.244.0.0/16", 24);
            s.interface = Some(good.into());
            assert!(s.validate().is_ok(), "{good:?} refused");
        }
        let mut s = spec("10.244.0.0/16", 24);
        s.interface = Some(String::new());
        assert_eq!(
            s.validate().unwrap().interface,
            None,
            "empty = default route"
        );
        s.interface = Some("a b/c".into());
        let msg = s.validate().unwrap_err().to_string();
        assert!(
            msg.contains("\"a b/c\"") && msg.contains("whitespace"),
            "{msg}"
        );
    }

    #[test]
    fn ipv6_table_is_ready_for_cluster_cidrs() {
        for (net, range) in [
            ("::1/128", "::1/128"),
            ("fe80::/64", "fe80::/10"),
            ("ff02::/16", "ff00::/8"),
            ("::/0", "::/128"),
        ] {
            let r = reserved_overlap(net.parse().unwrap()).map(|r| r.cidr);
            assert_eq!(r, Some(range), "{net}");
        }
        assert_eq!(reserved_overlap("fd00:10::/56".parse().unwrap()), None);
        assert!(is_unusable_node_address("127.0.0.1".parse().unwrap()));
        assert!(is_unusable_node_address("255.255.255.255".parse().unwrap()));
        assert!(is_unusable_node_address("fe80::1".parse().unwrap()));
        assert!(!is_unusable_node_address("192.168.1.10".parse().unwrap()));
    }

    fn json(s: &str) -> String {
        serde_json::to_string(s).unwrap()
    }

    #[test]
    fn every_reserved_range_has_its_cel_rule() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_string(&crate::CanalNetwork::crd()).unwrap();
        for r in &RESERVED_V4 {
            let rule = reserved_rule(r).rule;
            assert!(
                crd.contains(&serde_json::to_string(&rule).unwrap()),
                "no CEL rule for {}",
                r.cidr
            );
            assert!(crd.contains(&json(&reserved_message(r))), "{}", r.cidr);
        }
        assert!(crd.contains(&json(&min_prefix_message(MIN_PREFIX_V4))));
        assert!(crd.contains(&json(INTERFACE_MESSAGE)));
    }

    #[test]
    fn rejects_bad_backend_numbers() {
        let mut s = spec("10.244.0.0/16", 24);
        s.backend.vni = 0;
        assert_eq!(s.validate(), Err(SpecError::Vni { value: 0 }));
        s.backend.vni = 16_777_216;
        assert!(s.validate().is_err());
        s.backend.vni = 16_777_215;
        s.backend.port = 70000;
        assert_eq!(s.validate(), Err(SpecError::Port { value: 70000 }));
        s.backend.port = 4789;
        s.backend.mtu = 100;
        assert_eq!(s.validate(), Err(SpecError::Mtu { value: 100 }));
        s.backend.mtu = 1400;
        assert_eq!(s.validate().unwrap().mtu, Some(1400));
    }
}
