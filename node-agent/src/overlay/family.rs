//! IP families. The overlay runs once per family of the cluster, like
//! flannel: an IPv4 pod range rides `flannel.<VNI>` over the underlay's
//! IPv4 address, an IPv6 pod range rides `flannel-v6.<VNI>` over the
//! underlay's IPv6 address (flannel's VXLAN backend has no IPv6-over-IPv4
//! or IPv4-over-IPv6 mode: its IPv6 device's local address and FDB
//! destinations are IPv6, `pkg/backend/vxlan`). Each family has its own
//! device, VTEP MAC, routes, neighbours and FDB; they share nothing but the
//! underlay interface.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// An IP family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// VXLAN over an IPv4 underlay adds 50 bytes (outer IPv4 20 + UDP 8 +
/// VXLAN 8 + inner Ethernet 14).
pub const VXLAN_OVERHEAD_V4: u32 = 50;
/// VXLAN over an IPv6 underlay adds 70 bytes (the outer IPv6 header is 40).
/// The kernel refuses a larger MTU on such a device (`vxlan_change_mtu`).
pub const VXLAN_OVERHEAD_V6: u32 = 70;

impl Family {
    /// Both, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The family of a network.
    pub fn of_net(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    /// The family of an address.
    pub fn of_addr(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The VXLAN device of this family for `vni` (flannel's names).
    pub fn device_name(self, vni: u32) -> String {
        match self {
            Family::V4 => canal_crds::names::vxlan_device(vni),
            Family::V6 => canal_crds::names::vxlan_device_v6(vni),
        }
    }

    /// The name prefix of this family's VXLAN devices.
    pub fn device_prefix(self) -> &'static str {
        match self {
            Family::V4 => "flannel.",
            Family::V6 => "flannel-v6.",
        }
    }

    /// Whether `name` is one of this family's VXLAN device names
    /// (`flannel.<digits>` or `flannel-v6.<digits>`).
    pub fn is_device_name(self, name: &str) -> bool {
        name.strip_prefix(self.device_prefix())
            .is_some_and(|vni| !vni.is_empty() && vni.bytes().all(|b| b.is_ascii_digit()))
    }

    /// The encapsulation overhead of this family's VXLAN device (its
    /// underlay has the same family).
    pub fn vxlan_overhead(self) -> u32 {
        match self {
            Family::V4 => VXLAN_OVERHEAD_V4,
            Family::V6 => VXLAN_OVERHEAD_V6,
        }
    }

    /// The metric of a route added without one: IPv4 keeps 0, IPv6 makes
    /// it 1024 (`IP6_RT_PRIO_USER`; it has no metric 0). The overlay's
    /// routes carry it, so a route with any other metric is someone else's.
    pub fn default_route_metric(self) -> u32 {
        match self {
            Family::V4 => 0,
            Family::V6 => 1024,
        }
    }

    /// Length of a host prefix (/32, /128).
    pub fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// The unspecified address.
    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    /// `ipv4` / `ipv6` (the spelling of `policy-families` and metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// `IPv4` / `IPv6`, for people.
    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// `ip/32` or `ip/128`.
pub fn host_net(ip: IpAddr) -> IpNet {
    match ip {
        IpAddr::V4(v4) => IpNet::V4(Ipv4Net::from(v4)),
        IpAddr::V6(v6) => IpNet::V6(Ipv6Net::from(v6)),
    }
}

/// An address as an integer (IPv4 in the low 32 bits), for interval
/// arithmetic within one family.
pub fn addr_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// First and last address of a network as integers.
pub fn net_bounds(net: IpNet) -> (u128, u128) {
    (addr_bits(net.network()), addr_bits(net.broadcast()))
}

/// Whether `ip` is an IPv6 link-local address (fe80::/10): never an
/// underlay address, a pod address or something the overlay owns.
pub fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        IpAddr::V4(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_overheads_follow_flannel_and_the_kernel() {
        assert_eq!(Family::V4.device_name(1), "flannel.1");
        assert_eq!(Family::V6.device_name(7), "flannel-v6.7");
        assert!(Family::V4.is_device_name("flannel.12"));
        assert!(!Family::V4.is_device_name("flannel-v6.12"));
        assert!(Family::V6.is_device_name("flannel-v6.12"));
        assert!(!Family::V6.is_device_name("flannel-v6."));
        assert!(!Family::V6.is_device_name("flannel-v6.x"));
        assert_eq!(Family::V4.vxlan_overhead(), 50);
        assert_eq!(Family::V6.vxlan_overhead(), 70);
    }

    #[test]
    fn address_helpers() {
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(host_net(v6).to_string(), "fd00::1/128");
        assert_eq!(
            host_net("10.0.0.1".parse().unwrap()).to_string(),
            "10.0.0.1/32"
        );
        assert!(is_link_local("fe80::1".parse().unwrap()));
        assert!(is_link_local("febf::1".parse().unwrap()));
        assert!(!is_link_local("fec0::1".parse().unwrap()));
        assert!(!is_link_local("169.254.1.1".parse().unwrap()));
        let (a, b) = net_bounds("10.0.1.0/24".parse().unwrap());
        assert_eq!(b - a, 255);
        assert_eq!(Family::of_addr(&v6), Family::V6);
    }
}
