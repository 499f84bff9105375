//! Plain data describing the overlay's kernel objects, shared by the desired
//! state, the observed state and the diff between them. No I/O here.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// An Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Parses `aa:bb:cc:dd:ee:ff` (either case).
    pub fn parse(text: &str) -> Option<Mac> {
        canal_crds::annotations::parse_mac(text).map(Mac)
    }

    /// From a netlink link-layer address attribute (exactly 6 bytes).
    pub fn from_slice(bytes: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(bytes).ok().map(Mac)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&canal_crds::annotations::format_mac(self.0))
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A device the overlay's routes point at, named by its role rather than its
/// ifindex: the VXLAN device's index is only known once it exists, and the
/// diff is computed before it is (re)created. Every address in one overlay
/// (desired or observed) is of that overlay's family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dev {
    /// The VXLAN device `flannel.<VNI>`.
    Overlay,
    /// The underlay interface (direct routing and host-gw).
    Underlay,
}

/// A route the overlay owns, in the main table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    /// A remote node's pod subnet.
    pub dst: IpNet,
    /// `S0` (the remote subnet's network address) over VXLAN, or the remote
    /// node's address when routed directly.
    pub gateway: IpAddr,
    /// Output device.
    pub dev: Dev,
    /// `onlink`: the gateway is not inside any connected subnet (VXLAN).
    pub onlink: bool,
}

/// A permanent neighbour entry on the VXLAN device: `S0 lladdr VtepMAC`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neighbour {
    /// The remote subnet's network address.
    pub ip: IpAddr,
    /// The remote node's VTEP MAC.
    pub mac: Mac,
}

/// A permanent bridge FDB entry on the VXLAN device: `VtepMAC dst <node ip>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    /// The remote node's VTEP MAC.
    pub mac: Mac,
    /// The remote node's underlay address.
    pub dst: IpAddr,
}

/// The VXLAN device as it should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanDevice {
    /// `flannel.<VNI>` or `flannel-v6.<VNI>`.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
    /// Underlay source address (of the device's family).
    pub local: IpAddr,
    /// ifindex of the underlay interface.
    pub underlay_index: u32,
    /// The node's VTEP MAC.
    pub mac: Mac,
    /// Device MTU.
    pub mtu: u32,
    /// The node subnet's network address, configured as /32 (/128).
    pub address: IpAddr,
}

/// The underlay interface the overlay rides on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Underlay {
    /// ifindex.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Its first address of the overlay's family (IPv6: the first that is
    /// not link-local): the VTEP source and the node's address.
    pub ip: IpAddr,
    /// Its MTU.
    pub mtu: u32,
    /// Subnets of that family directly connected through it (same L2
    /// segment; IPv6 link-local excluded).
    pub connected: Vec<IpNet>,
}

impl Underlay {
    /// Whether `ip` is on the same L2 segment (inside a connected subnet).
    pub fn on_segment(&self, ip: IpAddr) -> bool {
        self.connected.iter().any(|net| net.contains(&ip))
    }
}

/// What the kernel currently has for the VXLAN device name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedLink {
    /// ifindex.
    pub index: u32,
    /// Name.
    pub name: String,
    /// VXLAN attributes, or None if the link is not a VXLAN device.
    pub vxlan: Option<VxlanAttrs>,
    /// Its MAC.
    pub mac: Option<Mac>,
    /// Its MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
}

/// The attributes that make a VXLAN device compatible or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanAttrs {
    /// VNI.
    pub vni: u32,
    /// Destination port (0 = kernel default 8472 on dumps of old kernels).
    pub port: u16,
    /// Source address (`IFLA_VXLAN_LOCAL` or `IFLA_VXLAN_LOCAL6`).
    pub local: Option<IpAddr>,
    /// Underlay ifindex.
    pub underlay_index: Option<u32>,
    /// Learning enabled.
    pub learning: bool,
}

/// An owned route as dumped, with what distinguishes it from another route
/// to the same destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObservedRoute {
    /// The route's forwarding fields.
    pub route: Route,
    /// Metric (`RTA_PRIORITY`); the overlay's routes use 0.
    pub priority: u32,
}

/// A neighbour entry on the VXLAN device as dumped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObservedNeighbour {
    /// Destination.
    pub ip: IpAddr,
    /// Link-layer address, if resolved.
    pub mac: Option<Mac>,
    /// NUD_PERMANENT.
    pub permanent: bool,
}

/// A bridge FDB entry on the VXLAN device as dumped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObservedFdb {
    /// MAC.
    pub mac: Mac,
    /// Remote address (`NDA_DST`).
    pub dst: Option<IpAddr>,
    /// NUD_PERMANENT (not learned).
    pub permanent: bool,
}

/// Everything the overlay owns in the kernel, as dumped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The link named like the wanted VXLAN device, if any.
    pub device: Option<ObservedLink>,
    /// Other VXLAN devices of the family (`flannel.<N>` or
    /// `flannel-v6.<N>`: a previous VNI): index and name.
    pub stale_devices: Vec<(u32, String)>,
    /// Addresses of the family on the device (IPv6 link-local excluded).
    pub addresses: Vec<IpNet>,
    /// Routes of the family on the device, and canal's on the underlay.
    pub routes: Vec<ObservedRoute>,
    /// Neighbour entries of the family on the device.
    pub neighbours: Vec<ObservedNeighbour>,
    /// Bridge FDB entries on the device.
    pub fdb: Vec<ObservedFdb>,
}
