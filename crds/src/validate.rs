//! The client-side half of CanalNetwork validation. The API server enforces
//! the same rules through the CRD schema; the controller repeats them so that
//! an object stored before a schema change still gets a clear InvalidSpec
//! condition instead of a crash.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::canal_network::{BackendType, CanalNetworkSpec, EndpointToHostAction};

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
