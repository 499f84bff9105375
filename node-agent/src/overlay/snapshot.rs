//! A netlink dump of the node's links, addresses, routes, neighbours and FDB
//! in plain data, and the pure functions that read it: which interface is the
//! underlay, and which objects the overlay owns (its observed state).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::model::{
    Dev, Mac, Observed, ObservedFdb, ObservedLink, ObservedNeighbour, ObservedRoute, Route,
    Underlay, VxlanAttrs,
};

/// Route protocol number canal's own routes carry (`proto 202` in `ip route`),
/// so the agent recognises the plain routes it added on the underlay.
pub const ROUTE_PROTOCOL: u8 = 202;
/// The main routing table.
pub const MAIN_TABLE: u32 = 254;
/// Name prefix of VXLAN devices (flannel's).
pub const DEVICE_PREFIX: &str = "flannel.";

/// A link as dumped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// ifindex.
    pub index: u32,
    /// Name.
    pub name: String,
    /// MAC.
    pub mac: Option<Mac>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// VXLAN attributes when the link is a VXLAN device.
    pub vxlan: Option<VxlanAttrs>,
}

/// An IPv4 address as dumped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrInfo {
    /// ifindex.
    pub index: u32,
    /// Address with its prefix length (host bits kept).
    pub net: Ipv4Net,
}

/// An IPv4 route as dumped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    /// Destination.
    pub dst: Ipv4Net,
    /// Gateway.
    pub gateway: Option<Ipv4Addr>,
    /// Output interface.
    pub oif: Option<u32>,
    /// Metric.
    pub priority: u32,
    /// Table.
    pub table: u32,
    /// Protocol.
    pub protocol: u8,
    /// RTNH_F_ONLINK.
    pub onlink: bool,
    /// RTN_UNICAST.
    pub unicast: bool,
}

/// An IPv4 neighbour entry as dumped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeighInfo {
    /// ifindex.
    pub index: u32,
    /// Destination.
    pub ip: Ipv4Addr,
    /// Link-layer address.
    pub mac: Option<Mac>,
    /// NUD_PERMANENT.
    pub permanent: bool,
}

/// A bridge FDB entry as dumped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdbInfo {
    /// ifindex.
    pub index: u32,
    /// MAC.
    pub mac: Mac,
    /// Remote address.
    pub dst: Option<Ipv4Addr>,
    /// NUD_PERMANENT.
    pub permanent: bool,
}

/// Everything dumped in one pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// All links.
    pub links: Vec<LinkInfo>,
    /// All IPv4 addresses.
    pub addresses: Vec<AddrInfo>,
    /// IPv4 routes of the main table.
    pub routes: Vec<RouteInfo>,
    /// IPv4 neighbours of every device.
    pub neighbours: Vec<NeighInfo>,
    /// Bridge FDB entries of every device.
    pub fdb: Vec<FdbInfo>,
}

/// No usable underlay interface.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnderlayError {
    /// The configured interface does not exist.
    #[error(
        "underlay interface {name:?} (CanalNetwork spec.interface) does not exist on this node"
    )]
    NoSuchInterface { name: String },
    /// No default route to pick the interface from.
    #[error(
        "no IPv4 default route to choose the underlay interface from; set CanalNetwork spec.interface"
    )]
    NoDefaultRoute,
    /// The interface has no IPv4 address.
    #[error("underlay interface {name} has no IPv4 address")]
    NoAddress { name: String },
}

impl Snapshot {
    /// The link with this index.
    pub fn link(&self, index: u32) -> Option<&LinkInfo> {
        self.links.iter().find(|l| l.index == index)
    }

    /// The link with this name.
    pub fn link_named(&self, name: &str) -> Option<&LinkInfo> {
        self.links.iter().find(|l| l.name == name)
    }

    /// The underlay: `interface` when given, else the interface of the IPv4
    /// default route with the lowest metric. Its address is its first IPv4
    /// address, as flannel picks it.
    pub fn underlay(&self, interface: Option<&str>) -> Result<Underlay, UnderlayError> {
        let link = match interface {
            Some(name) => self
                .link_named(name)
                .ok_or_else(|| UnderlayError::NoSuchInterface { name: name.into() })?,
            None => self
                .routes
                .iter()
                .filter(|r| r.dst.prefix_len() == 0 && r.unicast && r.table == MAIN_TABLE)
                .filter_map(|r| r.oif.map(|oif| (r.priority, oif)))
                .min()
                .and_then(|(_, oif)| self.link(oif))
                .ok_or(UnderlayError::NoDefaultRoute)?,
        };
        self.underlay_of(link)
    }

    /// The underlay to keep when the configured one cannot be used: the one
    /// the agent used last (`previous`, an ifindex), else the one the
    /// existing VXLAN device `device` sits on (so a restarted agent keeps it
    /// too). None when neither exists or has an address: then nothing can
    /// be programmed.
    pub fn fallback_underlay(
        &self,
        previous: Option<u32>,
        device: Option<&str>,
    ) -> Option<Underlay> {
        let from_device = device
            .and_then(|d| self.link_named(d))
            .and_then(|l| l.vxlan)
            .and_then(|v| v.underlay_index);
        [previous, from_device]
            .into_iter()
            .flatten()
            .filter_map(|index| self.link(index))
            .find_map(|link| self.underlay_of(link).ok())
    }

    fn underlay_of(&self, link: &LinkInfo) -> Result<Underlay, UnderlayError> {
        let nets: Vec<Ipv4Net> = self
            .addresses
            .iter()
            .filter(|a| a.index == link.index)
            .map(|a| a.net)
            .collect();
        let first = nets.first().ok_or_else(|| UnderlayError::NoAddress {
            name: link.name.clone(),
        })?;
        Ok(Underlay {
            index: link.index,
            name: link.name.clone(),
            ip: first.addr(),
            mtu: link.mtu,
            connected: nets.iter().map(|n| n.trunc()).collect(),
        })
    }

    /// What the overlay owns: the VXLAN device named `device` (None: no
    /// device is wanted, e.g. host-gw) and everything on it, other
    /// `flannel.<N>` VXLAN devices (stale), and the routes with canal's
    /// protocol on the underlay.
    pub fn observe(&self, device: Option<&str>, underlay_index: u32) -> Observed {
        let dev = device.and_then(|name| self.link_named(name));
        let dev_index = dev.map(|d| d.index);
        let stale_devices = self
            .links
            .iter()
            .filter(|l| {
                l.vxlan.is_some()
                    && Some(l.index) != dev_index
                    && l.name.strip_prefix(DEVICE_PREFIX).is_some_and(|vni| {
                        !vni.is_empty() && vni.bytes().all(|b| b.is_ascii_digit())
                    })
            })
            .map(|l| (l.index, l.name.clone()))
            .collect();
        let on_dev = |index: u32| Some(index) == dev_index;
        Observed {
            device: dev.map(|l| ObservedLink {
                index: l.index,
                name: l.name.clone(),
                vxlan: l.vxlan,
                mac: l.mac,
                mtu: l.mtu,
                up: l.up,
            }),
            stale_devices,
            addresses: self
                .addresses
                .iter()
                .filter(|a| on_dev(a.index))
                .map(|a| a.net)
                .collect(),
            routes: self
                .routes
                .iter()
                .filter(|r| r.table == MAIN_TABLE && r.unicast)
                .filter_map(|r| {
                    let oif = r.oif?;
                    let dev = if on_dev(oif) {
                        Dev::Overlay
                    } else if oif == underlay_index && r.protocol == ROUTE_PROTOCOL {
                        Dev::Underlay
                    } else {
                        return None;
                    };
                    Some(ObservedRoute {
                        route: Route {
                            dst: r.dst,
                            gateway: r.gateway.unwrap_or(Ipv4Addr::UNSPECIFIED),
                            dev,
                            onlink: r.onlink,
                        },
                        priority: r.priority,
                    })
                })
                .collect(),
            neighbours: self
                .neighbours
                .iter()
                .filter(|n| on_dev(n.index))
                .map(|n| ObservedNeighbour {
                    ip: n.ip,
                    mac: n.mac,
                    permanent: n.permanent,
                })
                .collect(),
            fdb: self
                .fdb
                .iter()
                .filter(|f| on_dev(f.index))
                .map(|f| ObservedFdb {
                    mac: f.mac,
                    dst: f.dst,
                    permanent: f.permanent,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn link(index: u32, name: &str, vxlan: Option<u32>) -> LinkInfo {
        LinkInfo {
            index,
            name: name.into(),
            mac: Some(Mac([2, 0, 0, 0, 0, index as u8])),
            mtu: 1500,
            up: true,
            vxlan: vxlan.map(|vni| VxlanAttrs {
                vni,
                port: 8472,
                local: None,
                underlay_index: Some(2),
                learning: false,
            }),
        }
    }

    fn route(dst: &str, gw: Option<&str>, oif: u32, protocol: u8, priority: u32) -> RouteInfo {
        RouteInfo {
            dst: net(dst),
            gateway: gw.map(|g| g.parse().unwrap()),
            oif: Some(oif),
            priority,
            table: MAIN_TABLE,
            protocol,
            onlink: false,
            unicast: true,
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            links: vec![
                link(1, "lo", None),
                link(2, "eth0", None),
                link(3, "eth1", None),
                link(4, "flannel.1", Some(1)),
                link(5, "flannel.9", Some(9)),
                link(6, "flannel.x", Some(3)),
                link(7, "cali0123456789a", None),
            ],
            addresses: vec![
                AddrInfo {
                    index: 2,
                    net: net("192.168.1.10/24"),
                },
                AddrInfo {
                    index: 2,
                    net: net("10.0.0.5/8"),
                },
                AddrInfo {
                    index: 4,
                    net: net("10.244.1.0/32"),
                },
            ],
            routes: vec![
                route("0.0.0.0/0", Some("192.168.1.1"), 3, 4, 200),
                route("0.0.0.0/0", Some("192.168.1.1"), 2, 4, 100),
                route("10.244.2.0/24", Some("10.244.2.0"), 4, 4, 0),
                route("10.244.3.0/24", Some("192.168.1.3"), 2, ROUTE_PROTOCOL, 0),
                route("10.244.4.0/24", Some("192.168.1.4"), 2, 4, 0),
                route("10.244.1.5/32", None, 7, 4, 0),
            ],
            neighbours: vec![
                NeighInfo {
                    index: 4,
                    ip: "10.244.2.0".parse().unwrap(),
                    mac: Some(Mac([2, 1, 1, 1, 1, 1])),
                    permanent: true,
                },
                NeighInfo {
                    index: 2,
                    ip: "192.168.1.1".parse().unwrap(),
                    mac: Some(Mac([2, 1, 1, 1, 1, 2])),
                    permanent: false,
                },
            ],
            fdb: vec![
                FdbInfo {
                    index: 4,
                    mac: Mac([2, 1, 1, 1, 1, 1]),
                    dst: Some("192.168.1.2".parse().unwrap()),
                    permanent: true,
                },
                FdbInfo {
                    index: 9,
                    mac: Mac([2, 1, 1, 1, 1, 3]),
                    dst: None,
                    permanent: false,
                },
            ],
        }
    }

    #[test]
    fn underlay_is_the_lowest_metric_default_route_interface() {
        let u = snapshot().underlay(None).unwrap();
        assert_eq!(u.index, 2);
        assert_eq!(u.name, "eth0");
        assert_eq!(u.ip, "192.168.1.10".parse::<Ipv4Addr>().unwrap());
        assert_eq!(u.connected, vec![net("192.168.1.0/24"), net("10.0.0.0/8")]);
        assert!(u.on_segment("10.1.2.3".parse().unwrap()));
        assert!(!u.on_segment("172.16.0.1".parse().unwrap()));
    }

    #[test]
    fn underlay_errors_say_what_is_missing() {
        let s = snapshot();
        assert_eq!(
            s.underlay(Some("bond7")),
            Err(UnderlayError::NoSuchInterface {
                name: "bond7".into()
            })
        );
        assert_eq!(
            s.underlay(Some("eth1")),
            Err(UnderlayError::NoAddress {
                name: "eth1".into()
            })
        );
        let mut no_default = s.clone();
        no_default.routes.retain(|r| r.dst.prefix_len() != 0);
        assert_eq!(
            no_default.underlay(None),
            Err(UnderlayError::NoDefaultRoute)
        );
        assert_eq!(no_default.underlay(Some("eth0")).unwrap().index, 2);
    }

    #[test]
    fn observe_takes_only_what_the_overlay_owns() {
        let o = snapshot().observe(Some("flannel.1"), 2);
        assert_eq!(o.device.as_ref().unwrap().index, 4);
        assert_eq!(o.stale_devices, vec![(5, "flannel.9".to_string())]);
        assert_eq!(o.addresses, vec![net("10.244.1.0/32")]);
        let dsts: Vec<_> = o
            .routes
            .iter()
            .map(|r| (r.route.dst, r.route.dev))
            .collect();
        assert_eq!(
            dsts,
            vec![
                (net("10.244.2.0/24"), Dev::Overlay),
                (net("10.244.3.0/24"), Dev::Underlay),
            ],
            "foreign routes on the underlay and pod routes are not the overlay's"
        );
        assert_eq!(o.neighbours.len(), 1);
        assert_eq!(o.fdb.len(), 1);
    }

    #[test]
    fn without_a_wanted_device_every_flannel_device_is_stale() {
        let o = snapshot().observe(None, 2);
        assert!(o.device.is_none());
        assert_eq!(
            o.stale_devices,
            vec![(4, "flannel.1".to_string()), (5, "flannel.9".to_string())]
        );
        assert!(o.neighbours.is_empty() && o.fdb.is_empty());
        assert_eq!(o.routes.len(), 1);
    }

    #[test]
    fn a_missing_interface_falls_back_to_the_underlay_in_use() {
        let mut s = snapshot();
        // flannel.1 sits on eth0 (index 2).
        s.links[3].vxlan.as_mut().unwrap().underlay_index = Some(2);
        assert!(s.underlay(Some("nosuch0")).is_err());
        // The agent's own memory first.
        assert_eq!(
            s.fallback_underlay(Some(2), Some("flannel.1"))
                .unwrap()
                .name,
            "eth0"
        );
        // A restarted agent: the device's underlay.
        assert_eq!(
            s.fallback_underlay(None, Some("flannel.1")).unwrap().name,
            "eth0"
        );
        // A remembered interface that has no address is passed over.
        assert_eq!(
            s.fallback_underlay(Some(3), Some("flannel.1"))
                .unwrap()
                .index,
            2
        );
        // Neither: nothing to fall back to.
        assert_eq!(s.fallback_underlay(None, None), None);
        assert_eq!(s.fallback_underlay(Some(99), Some("flannel.7")), None);
        assert_eq!(
            s.fallback_underlay(Some(3), None),
            None,
            "eth1 has no address"
        );
    }
}
