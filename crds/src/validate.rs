//! The client-side half of CanalNetwork validation. The API server enforces
//! the same rules through the CRD schema; the controller repeats them so that
//! an object stored before a schema change still gets a clear InvalidSpec
//! condition instead of a crash.
//!
//! The ranges no cluster CIDR may overlap live in one table per family
//! ([`RESERVED_V4`], [`RESERVED_V6`]); the CRD's CEL rules are built from
//! the same entries ([`reserved_rule`]), so the API server and the
//! controller say the same thing. `clusterCIDR` and every entry of
//! `clusterCIDRs` (one per family, primary first) are checked against the
//! table of their family.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use kube::core::{Message, Rule};

use crate::canal_network::{
    BackendType, CanalNetworkSpec, EndpointToHostAction, EstablishedFlows, PolicyDataplane,
};

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
    Rule::new(format!("!isCIDR(self) || {}", reserved_cel(r, "self")))
        .message(Message::Message(reserved_message(r)))
}

/// The family of a reserved range (4 or 6).
fn family_of(r: &ReservedRange) -> u8 {
    if r.cidr.contains(':') { 6 } else { 4 }
}

/// CEL: the CIDR string `x` (known to be a CIDR) does not overlap `r`.
/// Guarded by family: a range of the other family never overlaps.
fn reserved_cel(r: &ReservedRange, x: &str) -> String {
    let c = r.cidr;
    let f = family_of(r);
    format!(
        "(cidr({x}).ip().family() != {f} || !(cidr({x}).containsCIDR(cidr('{c}')) || cidr('{c}').containsCIDR(cidr({x}))))"
    )
}

/// The CEL rule that refuses a `clusterCIDRs` entry overlapping `r`.
pub fn cidrs_reserved_rule(r: &ReservedRange) -> Rule {
    Rule::new(format!(
        "self.all(c, !isCIDR(c) || {})",
        reserved_cel(r, "c")
    ))
    .message(Message::Message(reserved_message(r).replacen(
        "clusterCIDR",
        "clusterCIDRs",
        1,
    )))
}

const CIDRS_SHAPE_MESSAGE: &str = "every clusterCIDRs entry must be a valid network in CIDR notation with no host bits set, e.g. 10.244.0.0/16 or fd00:10:244::/56";
const CIDRS_FAMILIES_MESSAGE: &str =
    "clusterCIDRs holds at most one IPv4 and one IPv6 range (primary first)";
const ONE_RANGE_MESSAGE: &str =
    "set clusterCIDR or clusterCIDRs (one IPv4 range, one IPv6 range, or one of each)";
const PRIMARY_AGREES_MESSAGE: &str =
    "clusterCIDR must equal the first entry of clusterCIDRs when both are set";
const SUBNET_V4_MESSAGE: &str = "nodeSubnetLength must be longer than the prefix of the IPv4 range in clusterCIDRs (a /16 cluster needs nodeSubnetLength 17..30)";
const SUBNET_V6_MESSAGE: &str = "nodeSubnetLengthV6 must be longer than the prefix of the IPv6 cluster range (a /56 range needs 57..88; 64 is the usual)";
const SUBNET_COUNT_V6_MESSAGE: &str = "nodeSubnetLengthV6 may be at most 32 bits longer than the prefix of the IPv6 cluster range (4 billion node subnets)";

/// `clusterCIDRs` entries are CIDRs without host bits.
pub fn cidrs_shape_rule() -> Rule {
    Rule::new("self.all(c, isCIDR(c) && cidr(c).masked() == cidr(c))").message(CIDRS_SHAPE_MESSAGE)
}

/// At most one range per family.
pub fn cidrs_families_rule() -> Rule {
    Rule::new(
        "self.size() < 2 || !isCIDR(self[0]) || !isCIDR(self[1]) || cidr(self[0]).ip().family() != cidr(self[1]).ip().family()",
    )
    .message(CIDRS_FAMILIES_MESSAGE)
}

/// `clusterCIDRs` entries of `family` are `/min` or longer.
pub fn cidrs_min_prefix_rule(family: u8, min: u8) -> Rule {
    Rule::new(format!(
        "self.all(c, !isCIDR(c) || cidr(c).ip().family() != {family} || cidr(c).prefixLength() >= {min})"
    ))
    .message(Message::Message(
        min_prefix_message_family(family, min).replacen("clusterCIDR", "clusterCIDRs", 1),
    ))
}

/// Some range is set.
pub fn one_range_rule() -> Rule {
    Rule::new("has(self.clusterCIDR) || (has(self.clusterCIDRs) && self.clusterCIDRs.size() > 0)")
        .message(ONE_RANGE_MESSAGE)
}

/// clusterCIDR and clusterCIDRs agree on the primary range.
pub fn primary_agrees_rule() -> Rule {
    Rule::new(
        "!has(self.clusterCIDR) || !has(self.clusterCIDRs) || self.clusterCIDRs.size() == 0 || !isCIDR(self.clusterCIDR) || !isCIDR(self.clusterCIDRs[0]) || (cidr(self.clusterCIDR).ip() == cidr(self.clusterCIDRs[0]).ip() && cidr(self.clusterCIDR).prefixLength() == cidr(self.clusterCIDRs[0]).prefixLength())",
    )
    .message(PRIMARY_AGREES_MESSAGE)
    .field_path(".clusterCIDR")
}

/// nodeSubnetLength against the IPv4 entry of clusterCIDRs.
pub fn subnet_length_v4_rule() -> Rule {
    Rule::new(
        "!has(self.clusterCIDRs) || self.clusterCIDRs.all(c, !isCIDR(c) || cidr(c).ip().family() != 4 || self.nodeSubnetLength > cidr(c).prefixLength())",
    )
    .message(SUBNET_V4_MESSAGE)
    .field_path(".nodeSubnetLength")
}

/// nodeSubnetLengthV6 against the IPv6 range (in clusterCIDR or clusterCIDRs).
pub fn subnet_length_v6_rule() -> Rule {
    Rule::new(
        "(!has(self.clusterCIDRs) || self.clusterCIDRs.all(c, !isCIDR(c) || cidr(c).ip().family() != 6 || self.nodeSubnetLengthV6 > cidr(c).prefixLength())) && (!has(self.clusterCIDR) || !isCIDR(self.clusterCIDR) || cidr(self.clusterCIDR).ip().family() != 6 || self.nodeSubnetLengthV6 > cidr(self.clusterCIDR).prefixLength())",
    )
    .message(SUBNET_V6_MESSAGE)
    .field_path(".nodeSubnetLengthV6")
}

/// nodeSubnetLengthV6 at most 32 bits longer than the IPv6 range.
pub fn subnet_count_v6_rule() -> Rule {
    Rule::new(format!(
        "(!has(self.clusterCIDRs) || self.clusterCIDRs.all(c, !isCIDR(c) || cidr(c).ip().family() != 6 || self.nodeSubnetLengthV6 - cidr(c).prefixLength() <= {MAX_SUBNET_BITS_V6})) && (!has(self.clusterCIDR) || !isCIDR(self.clusterCIDR) || cidr(self.clusterCIDR).ip().family() != 6 || self.nodeSubnetLengthV6 - cidr(self.clusterCIDR).prefixLength() <= {MAX_SUBNET_BITS_V6})",
    ))
    .message(SUBNET_COUNT_V6_MESSAGE)
    .field_path(".nodeSubnetLengthV6")
}

/// How many bits longer than the IPv6 range a node subnet may be.
pub const MAX_SUBNET_BITS_V6: u8 = 32;

/// Longest IPv6 node subnet (a /127 or /128 leaves no pod address).
pub const MAX_SUBNET_LEN_V6: u8 = 126;

fn min_prefix_message(min: u8) -> String {
    min_prefix_message_family(4, min)
}

fn min_prefix_message_family(family: u8, min: u8) -> String {
    if family == 6 {
        format!(
            "an IPv6 clusterCIDR must be /{min} or longer, e.g. fd00:10:244::/56: a /{min} is what a registry gives a whole ISP"
        )
    } else {
        format!(
            "clusterCIDR must be /{min} or longer, e.g. 10.0.0.0/8 (the largest private range): a wider range takes in public addresses, which pods could then no longer reach"
        )
    }
}

/// The CEL rule that refuses IPv6 cluster CIDRs wider than `/min`.
pub fn min_prefix_rule_v6(min: u8) -> Rule {
    Rule::new(format!(
        "!isCIDR(self) || cidr(self).ip().family() != 6 || cidr(self).prefixLength() >= {min}"
    ))
    .message(Message::Message(min_prefix_message_family(6, min)))
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
    #[error("clusterCIDR {value:?} is not a valid CIDR such as 10.244.0.0/16 or fd00:10:244::/56")]
    ClusterCidrInvalid { value: String },
    /// Neither clusterCIDR nor clusterCIDRs is set.
    #[error("{ONE_RANGE_MESSAGE}")]
    NoClusterCidr,
    /// clusterCIDRs has more than one range of a family, or more than two.
    #[error("clusterCIDRs {value:?}: {CIDRS_FAMILIES_MESSAGE}")]
    ClusterCidrFamilies { value: Vec<String> },
    /// clusterCIDR and the first clusterCIDRs entry differ.
    #[error(
        "clusterCIDR {cluster_cidr} differs from the first entry of clusterCIDRs {first}; they must be equal when both are set"
    )]
    PrimaryDisagrees { cluster_cidr: String, first: String },
    /// nodeSubnetLengthV6 out of range.
    #[error(
        "nodeSubnetLengthV6 {value} must be longer than the IPv6 cluster range prefix /{cluster_prefix}, at most {MAX_SUBNET_BITS_V6} bits longer and at most {MAX_SUBNET_LEN_V6}"
    )]
    SubnetLengthV6 { value: u8, cluster_prefix: u8 },
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
    #[error("clusterCIDR {value}: {}", min_prefix_message_family(if value.contains(':') { 6 } else { 4 }, *min))]
    ClusterCidrTooWide { value: String, min: u8 },
    /// interface is not a Linux interface name.
    #[error(
        "interface {value:?} is not a Linux interface name: {why} (1 to 15 bytes with no '/', ':' or whitespace, not '.' or '..'; leave it empty for the interface of the default route)"
    )]
    Interface { value: String, why: &'static str },
}

/// One pod range of the cluster and the length of its node subnets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClusterRange {
    /// The range.
    pub cidr: IpNet,
    /// Prefix length of node subnets of it.
    pub subnet_len: u8,
}

impl ClusterRange {
    /// Number of node subnets in the range (saturating at u64::MAX).
    pub fn total_subnets(&self) -> u64 {
        let bits = self.subnet_len.saturating_sub(self.cidr.prefix_len());
        1u64.checked_shl(u32::from(bits)).unwrap_or(u64::MAX)
    }

    /// "IPv4" or "IPv6".
    pub fn family_name(&self) -> &'static str {
        family_name(&self.cidr)
    }
}

/// "IPv4" or "IPv6": the bounded family label of metrics and status.
pub fn family_name(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "IPv4",
        IpNet::V6(_) => "IPv6",
    }
}

/// A validated CanalNetwork spec in typed form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The pod ranges, primary first, at most one per family, never empty.
    pub ranges: Vec<ClusterRange>,
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
    /// `policy.established`.
    pub policy_established: EstablishedFlows,
    /// `policy.logDenied`.
    pub policy_log_denied: bool,
}

impl NetworkConfig {
    /// Number of node subnets in the primary range.
    pub fn total_subnets(&self) -> u64 {
        self.ranges.first().map_or(0, ClusterRange::total_subnets)
    }

    /// The pod ranges, primary first.
    pub fn cluster_cidrs(&self) -> Vec<IpNet> {
        self.ranges.iter().map(|r| r.cidr).collect()
    }

    /// The IPv4 range, if the cluster has one.
    pub fn ipv4(&self) -> Option<(Ipv4Net, u8)> {
        self.ranges.iter().find_map(|r| match r.cidr {
            IpNet::V4(n) => Some((n, r.subnet_len)),
            IpNet::V6(_) => None,
        })
    }

    /// The IPv6 range, if the cluster has one.
    pub fn ipv6(&self) -> Option<(Ipv6Net, u8)> {
        self.ranges.iter().find_map(|r| match r.cidr {
            IpNet::V6(n) => Some((n, r.subnet_len)),
            IpNet::V4(_) => None,
        })
    }
}

impl CanalNetworkSpec {
    /// Checks every rule the CRD schema states and returns the typed config.
    pub fn validate(&self) -> Result<NetworkConfig, SpecError> {
        let ranges = self.ranges()?;
        if let Some(name) = self.interface.as_deref().filter(|i| !i.is_empty())
            && let Some(why) = interface_problem(name)
        {
            return Err(SpecError::Interface {
                value: name.to_string(),
                why,
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
            ranges,
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
            policy_established: self.policy.established,
            policy_log_denied: self.policy.log_denied,
        })
    }
}

impl CanalNetworkSpec {
    /// The pod range texts, primary first: clusterCIDRs, else clusterCIDR.
    pub fn range_texts(&self) -> Vec<&str> {
        if self.cluster_cidrs.is_empty() {
            Some(self.cluster_cidr.as_str())
                .filter(|c| !c.is_empty())
                .into_iter()
                .collect()
        } else {
            self.cluster_cidrs.iter().map(String::as_str).collect()
        }
    }

    /// The pod ranges with their subnet lengths, checked.
    fn ranges(&self) -> Result<Vec<ClusterRange>, SpecError> {
        let texts = self.range_texts();
        if texts.is_empty() {
            return Err(SpecError::NoClusterCidr);
        }
        if !self.cluster_cidrs.is_empty() && !self.cluster_cidr.is_empty() {
            let primary = parse_cidr(&self.cluster_cidr)?;
            if parse_cidr(texts[0])? != primary {
                return Err(SpecError::PrimaryDisagrees {
                    cluster_cidr: self.cluster_cidr.clone(),
                    first: texts[0].to_string(),
                });
            }
        }
        let mut ranges = Vec::new();
        for text in &texts {
            let cidr = parse_cidr(text)?;
            check_range(text, cidr)?;
            let subnet_len = match cidr {
                IpNet::V4(n) => {
                    if self.node_subnet_length <= n.prefix_len() || self.node_subnet_length > 30 {
                        return Err(SpecError::SubnetLength {
                            value: self.node_subnet_length,
                            cluster_prefix: n.prefix_len(),
                        });
                    }
                    self.node_subnet_length
                }
                IpNet::V6(n) => {
                    let len = self.node_subnet_length_v6;
                    if len <= n.prefix_len()
                        || len > MAX_SUBNET_LEN_V6
                        || len - n.prefix_len() > MAX_SUBNET_BITS_V6
                    {
                        return Err(SpecError::SubnetLengthV6 {
                            value: len,
                            cluster_prefix: n.prefix_len(),
                        });
                    }
                    len
                }
            };
            ranges.push(ClusterRange { cidr, subnet_len });
        }
        let families: BTreeSet<&str> = ranges.iter().map(ClusterRange::family_name).collect();
        if ranges.len() > 2 || families.len() != ranges.len() {
            return Err(SpecError::ClusterCidrFamilies {
                value: self.cluster_cidrs.clone(),
            });
        }
        Ok(ranges)
    }
}

/// The reserved-range and width checks of one pod range.
fn check_range(text: &str, cidr: IpNet) -> Result<(), SpecError> {
    if let Some(range) = reserved_overlap(cidr) {
        return Err(SpecError::ClusterCidrReserved {
            value: text.to_string(),
            range,
        });
    }
    let min = match cidr {
        IpNet::V4(_) => MIN_PREFIX_V4,
        IpNet::V6(_) => MIN_PREFIX_V6,
    };
    if cidr.prefix_len() < min {
        return Err(SpecError::ClusterCidrTooWide {
            value: text.to_string(),
            min,
        });
    }
    Ok(())
}

/// Parses a network of either family in CIDR notation, refusing host bits.
pub fn parse_cidr(value: &str) -> Result<IpNet, SpecError> {
    let net: IpNet = value.parse().map_err(|_| SpecError::ClusterCidrInvalid {
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
mod tests;
