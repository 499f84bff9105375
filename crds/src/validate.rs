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
            spec("fd00::/64", 24).validate(),
            Err(SpecError::SubnetLengthV6 { .. })
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

    fn dual(cidrs: &[&str]) -> CanalNetworkSpec {
        CanalNetworkSpec::with_cluster_cidrs(cidrs)
    }

    #[test]
    fn cluster_cidrs_one_range_per_family_primary_first() {
        let c = dual(&["10.244.0.0/16", "fd00:10:244::/56"])
            .validate()
            .unwrap();
        assert_eq!(
            c.cluster_cidrs(),
            vec![
                "10.244.0.0/16".parse::<IpNet>().unwrap(),
                "fd00:10:244::/56".parse().unwrap()
            ]
        );
        assert_eq!(c.ranges[1].subnet_len, 64);
        assert_eq!(c.ranges[1].total_subnets(), 256);
        assert_eq!(c.ipv4().map(|r| r.1), Some(24));
        let c = dual(&["fd00:10:244::/56", "10.244.0.0/16"])
            .validate()
            .unwrap();
        assert_eq!(c.ranges[0].family_name(), "IPv6");
        // IPv6-only, through clusterCIDRs or clusterCIDR alone.
        let c = dual(&["fd00:10:244::/56"]).validate().unwrap();
        assert_eq!(c.ipv4(), None);
        let c = spec("fd00:10:244::/56", 24).validate().unwrap();
        assert_eq!(c.ipv6().map(|r| r.1), Some(64));
        // Only clusterCIDRs (clusterCIDR unset).
        let mut only = dual(&["10.244.0.0/16", "fd00::/48"]);
        only.cluster_cidr.clear();
        assert_eq!(only.validate().unwrap().ranges.len(), 2);
        only.cluster_cidrs.clear();
        assert_eq!(only.validate(), Err(SpecError::NoClusterCidr));
    }

    #[test]
    fn cluster_cidrs_refuse_what_cannot_work() {
        for (cidrs, what) in [
            (&["10.244.0.0/16", "10.245.0.0/16"][..], "families"),
            (&["fd00::/48", "fd01::/48"][..], "families"),
            (&["10.0.0.0/16", "fd00::/48", "10.1.0.0/16"][..], "families"),
            (&["fe80::/48"][..], "reserved"),
            (&["10.244.0.0/16", "ff00::/48"][..], "reserved"),
            (&["10.244.0.0/16", "::1/128"][..], "reserved"),
            (&["fd00::/16"][..], "wide"),
            (&["fd00::1/64"][..], "host bits"),
            (&["fd00::/120"][..], "v6 length"),
            (&["fd00::/24"][..], "wide"),
        ] {
            let e = dual(cidrs).validate().unwrap_err();
            let ok = match what {
                "families" => matches!(e, SpecError::ClusterCidrFamilies { .. }),
                "reserved" => matches!(e, SpecError::ClusterCidrReserved { .. }),
                "wide" => matches!(e, SpecError::ClusterCidrTooWide { min: 32, .. }),
                "host bits" => matches!(e, SpecError::ClusterCidrHostBits { .. }),
                _ => matches!(e, SpecError::SubnetLengthV6 { .. }),
            };
            assert!(ok, "{cidrs:?}: expected {what}, got {e:?}");
        }
        // /32 with /64 subnets is 2^32 subnets: the limit.
        let mut s = dual(&["2001:db8::/32"]);
        assert_eq!(s.validate().unwrap().ranges[0].total_subnets(), 1 << 32);
        s.node_subnet_length_v6 = 65;
        assert_eq!(
            s.validate(),
            Err(SpecError::SubnetLengthV6 {
                value: 65,
                cluster_prefix: 32
            })
        );
        s.node_subnet_length_v6 = 127;
        assert!(s.validate().is_err());
        // The IPv4 subnet length is checked against the IPv4 entry.
        let mut s = dual(&["fd00::/48", "10.244.0.0/16"]);
        s.cluster_cidr = "fd00::/48".into();
        s.node_subnet_length = 16;
        assert!(matches!(s.validate(), Err(SpecError::SubnetLength { .. })));
        // clusterCIDR must agree with the first entry (textual forms may differ).
        let mut s = dual(&["10.244.0.0/16", "fd00::/48"]);
        s.cluster_cidr = "10.245.0.0/16".into();
        assert!(matches!(
            s.validate(),
            Err(SpecError::PrimaryDisagrees { .. })
        ));
        let mut s = dual(&["fd00:0::/48", "10.244.0.0/16"]);
        s.cluster_cidr = "fd00::/48".into();
        assert!(s.validate().is_ok());
        s.cluster_cidr = "10.244.0.0/16".into();
        assert!(matches!(
            s.validate(),
            Err(SpecError::PrimaryDisagrees { .. })
        ));
    }

    #[test]
    fn every_cidrs_rule_is_in_the_crd() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_string(&crate::CanalNetwork::crd()).unwrap();
        for r in RESERVED_V4.iter().chain(&RESERVED_V6) {
            for rule in [reserved_rule(r), cidrs_reserved_rule(r)] {
                assert!(
                    crd.contains(&serde_json::to_string(&rule.rule).unwrap()),
                    "no CEL rule for {}",
                    r.cidr
                );
            }
        }
        for m in [
            CIDRS_SHAPE_MESSAGE,
            CIDRS_FAMILIES_MESSAGE,
            ONE_RANGE_MESSAGE,
            PRIMARY_AGREES_MESSAGE,
            SUBNET_V4_MESSAGE,
            SUBNET_V6_MESSAGE,
            SUBNET_COUNT_V6_MESSAGE,
        ] {
            assert!(crd.contains(&json(m)), "{m}");
        }
        assert!(crd.contains(&json(&min_prefix_message_family(6, MIN_PREFIX_V6))));
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
