//! A netlink dump of the node's links, addresses, routes, neighbours and FDB
//! (both IP families) in plain data, and the pure functions that read it:
//! which interface is a family's underlay, and which objects that family's
//! overlay owns (its observed state).

use std::net::IpAddr;

use ipnet::IpNet;

use super::family::{self, Family};
use super::model::{
    Dev, Mac, Observed, ObservedFdb, ObservedLink, ObservedNeighbour, ObservedRoute, Route,
    Underlay, VxlanAttrs,
};

/// Route protocol number canal's own routes carry (`proto 202` in `ip route`),
/// so the agent recognises the plain routes it added on the underlay.
pub const ROUTE_PROTOCOL: u8 = 202;
/// The main routing table.
pub const MAIN_TABLE: u32 = 254;
/// Name prefix of IPv4 VXLAN devices (flannel's).
pub const DEVICE_PREFIX: &str = "flannel.";
/// `RTPROT_KERNEL`: routes the kernel makes for an address (an IPv6 /128
/// on the VXLAN device gets one); they follow the addresses canal owns.
pub const KERNEL_PROTOCOL: u8 = 2;

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

/// An address as dumped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrInfo {
    /// ifindex.
    pub index: u32,
    /// Address with its prefix length (host bits kept).
    pub net: IpNet,
}

/// A route as dumped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    /// Destination.
    pub dst: IpNet,
    /// Gateway.
    pub gateway: Option<IpAddr>,
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

/// A neighbour entry as dumped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeighInfo {
    /// ifindex.
    pub index: u32,
    /// Destination.
    pub ip: IpAddr,
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
    pub dst: Option<IpAddr>,
    /// NUD_PERMANENT.
    pub permanent: bool,
}

/// Everything dumped in one pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// All links.
    pub links: Vec<LinkInfo>,
    /// All addresses, both families.
    pub addresses: Vec<AddrInfo>,
    /// Routes of the main table, both families.
    pub routes: Vec<RouteInfo>,
    /// Neighbours of every device, both families.
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
        "no default route to choose the {family} underlay interface from; set CanalNetwork spec.interface"
    )]
    NoDefaultRoute { family: Family },
    /// The interface has no address of the family.
    #[error(
        "underlay interface {name} has no {family} address{}",
        if *family == Family::V6 { " (link-local ones do not count)" } else { "" }
    )]
    NoAddress { name: String, family: Family },
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

    /// The interface of the lowest-metric default route of `family`.
    fn default_route_link(&self, family: Family) -> Option<&LinkInfo> {
        self.routes
            .iter()
            .filter(|r| {
                r.dst.prefix_len() == 0
                    && r.unicast
                    && r.table == MAIN_TABLE
                    && Family::of_net(&r.dst) == family
            })
            .filter_map(|r| r.oif.map(|oif| (r.priority, oif)))
            .min()
            .and_then(|(_, oif)| self.link(oif))
    }

    /// `family`'s underlay: `interface` when given, else the interface of
    /// the family's default route with the lowest metric, else (a node
    /// without an IPv6 default route, common on ULA underlays) the other
    /// family's default-route interface. Its address is its first address of the family (IPv6: not
    /// link-local), as flannel picks it.
    pub fn underlay(
        &self,
        interface: Option<&str>,
        family: Family,
    ) -> Result<Underlay, UnderlayError> {
        let link = match interface {
            Some(name) => self
                .link_named(name)
                .ok_or_else(|| UnderlayError::NoSuchInterface { name: name.into() })?,
            None => {
                let other = Family::ALL.into_iter().find(|f| *f != family);
                self.default_route_link(family)
                    .or_else(|| other.and_then(|o| self.default_route_link(o)))
                    .ok_or(UnderlayError::NoDefaultRoute { family })?
            }
        };
        self.underlay_of(link, family)
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
        family: Family,
    ) -> Option<Underlay> {
        let from_device = device
            .and_then(|d| self.link_named(d))
            .and_then(|l| l.vxlan)
            .and_then(|v| v.underlay_index);
        [previous, from_device]
            .into_iter()
            .flatten()
            .filter_map(|index| self.link(index))
            .find_map(|link| self.underlay_of(link, family).ok())
    }

    /// The addresses of `family` on link `index`, IPv6 link-local excluded.
    fn family_addresses(&self, index: u32, family: Family) -> impl Iterator<Item = IpNet> + '_ {
        self.addresses
            .iter()
            .filter(move |a| {
                a.index == index
                    && Family::of_net(&a.net) == family
                    && !family::is_link_local(a.net.addr())
            })
            .map(|a| a.net)
    }

    fn underlay_of(&self, link: &LinkInfo, family: Family) -> Result<Underlay, UnderlayError> {
        let nets: Vec<IpNet> = self.family_addresses(link.index, family).collect();
        let first = nets.first().ok_or_else(|| UnderlayError::NoAddress {
            name: link.name.clone(),
            family,
        })?;
        Ok(Underlay {
            index: link.index,
            name: link.name.clone(),
            ip: first.addr(),
            mtu: link.mtu,
            connected: nets.iter().map(|n| n.trunc()).collect(),
        })
    }

    /// What `family`'s overlay owns: the VXLAN device named `device` (None:
    /// no device is wanted, e.g. host-gw or a family the cluster does not
    /// have) and everything of the family on it, the family's other VXLAN
    /// devices (`flannel.<N>` / `flannel-v6.<N>`: stale), and the routes of
    /// the family with canal's protocol on the underlay. The kernel's own
    /// routes and IPv6 link-local addresses are never the overlay's.
    pub fn observe(&self, device: Option<&str>, underlay_index: u32, family: Family) -> Observed {
        let dev = device.and_then(|name| self.link_named(name));
        let dev_index = dev.map(|d| d.index);
        let stale_devices = self
            .links
            .iter()
            .filter(|l| {
                l.vxlan.is_some() && Some(l.index) != dev_index && family.is_device_name(&l.name)
            })
            .map(|l| (l.index, l.name.clone()))
            .collect();
        let on_dev = |index: u32| Some(index) == dev_index;
        let of_family = |ip: &IpAddr| Family::of_addr(ip) == family;
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
            addresses: dev_index
                .map(|i| self.family_addresses(i, family).collect())
                .unwrap_or_default(),
            routes: self
                .routes
                .iter()
                .filter(|r| {
                    r.table == MAIN_TABLE
                        && r.unicast
                        && r.protocol != KERNEL_PROTOCOL
                        && Family::of_net(&r.dst) == family
                })
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
                            gateway: r.gateway.unwrap_or(family.unspecified()),
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
                // Link-local and multicast entries are the kernel's own
                // (neighbour discovery, NOARP multicast mappings).
                .filter(|n| {
                    on_dev(n.index)
                        && of_family(&n.ip)
                        && !family::is_link_local(n.ip)
                        && !n.ip.is_multicast()
                })
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

    impl Snapshot {
        fn underlay4(&self, interface: Option<&str>) -> Result<Underlay, UnderlayError> {
            self.underlay(interface, Family::V4)
        }
    }

    fn net(s: &str) -> IpNet {
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
        let u = snapshot().underlay4(None).unwrap();
        assert_eq!(u.index, 2);
        assert_eq!(u.name, "eth0");
        assert_eq!(u.ip, "192.168.1.10".parse::<IpAddr>().unwrap());
        assert_eq!(u.connected, vec![net("192.168.1.0/24"), net("10.0.0.0/8")]);
        assert!(u.on_segment("10.1.2.3".parse().unwrap()));
        assert!(!u.on_segment("172.16.0.1".parse().unwrap()));
    }

    #[test]
    fn underlay_errors_say_what_is_missing() {
        let s = snapshot();
        assert_eq!(
            s.underlay4(Some("bond7")),
            Err(UnderlayError::NoSuchInterface {
                name: "bond7".into()
            })
        );
        assert_eq!(
            s.underlay4(Some("eth1")),
            Err(UnderlayError::NoAddress {
                name: "eth1".into(),
                family: Family::V4
            })
        );
        let mut no_default = s.clone();
        no_default.routes.retain(|r| r.dst.prefix_len() != 0);
        assert_eq!(
            no_default.underlay4(None),
            Err(UnderlayError::NoDefaultRoute { family: Family::V4 })
        );
        assert_eq!(no_default.underlay4(Some("eth0")).unwrap().index, 2);
    }

    #[test]
    fn observe_takes_only_what_the_overlay_owns() {
        let o = snapshot().observe(Some("flannel.1"), 2, Family::V4);
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
        let o = snapshot().observe(None, 2, Family::V4);
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
        assert!(s.underlay4(Some("nosuch0")).is_err());
        // The agent's own memory first.
        assert_eq!(
            s.fallback_underlay(Some(2), Some("flannel.1"), Family::V4)
                .unwrap()
                .name,
            "eth0"
        );
        // A restarted agent: the device's underlay.
        assert_eq!(
            s.fallback_underlay(None, Some("flannel.1"), Family::V4)
                .unwrap()
                .name,
            "eth0"
        );
        // A remembered interface that has no address is passed over.
        assert_eq!(
            s.fallback_underlay(Some(3), Some("flannel.1"), Family::V4)
                .unwrap()
                .index,
            2
        );
        // Neither: nothing to fall back to.
        assert_eq!(s.fallback_underlay(None, None, Family::V4), None);
        assert_eq!(
            s.fallback_underlay(Some(99), Some("flannel.7"), Family::V4),
            None
        );
        assert_eq!(
            s.fallback_underlay(Some(3), None, Family::V4),
            None,
            "eth1 has no address"
        );
    }

    /// node-1 of a dual-stack lab: eth0 with both families, flannel.1 and
    /// flannel-v6.1 with what the kernel adds on its own.
    fn dual() -> Snapshot {
        let mut s = snapshot();
        s.links.push(link(8, "flannel-v6.1", Some(1)));
        s.links.push(link(9, "flannel-v6.4", Some(4)));
        s.addresses.extend([
            AddrInfo {
                index: 2,
                net: net("fe80::1/64"),
            },
            AddrInfo {
                index: 2,
                net: net("fd00:30::10/64"),
            },
            AddrInfo {
                index: 8,
                net: net("fd00:10:244:1::/128"),
            },
            AddrInfo {
                index: 8,
                net: net("fe80::ff:fe00:8/64"),
            },
        ]);
        let mut r6 = |dst: &str, gw: Option<&str>, oif, protocol| {
            s.routes.push(route(dst, gw, oif, protocol, 0));
        };
        r6("::/0", Some("fd00:30::1"), 2, 4);
        r6("fd00:10:244:2::/64", Some("fd00:10:244:2::"), 8, 4);
        r6("fd00:10:244:3::/64", Some("fd00:30::13"), 2, ROUTE_PROTOCOL);
        r6("fd00:10:244:1::/128", None, 8, KERNEL_PROTOCOL);
        r6("fe80::/64", None, 8, KERNEL_PROTOCOL);
        for (ip, permanent) in [
            ("fd00:10:244:2::", true),
            ("fe80::1", false),
            ("ff02::16", false),
        ] {
            s.neighbours.push(NeighInfo {
                index: 8,
                ip: ip.parse().unwrap(),
                mac: Some(Mac([2, 6, 6, 6, 6, 6])),
                permanent,
            });
        }
        s.fdb.push(FdbInfo {
            index: 8,
            mac: Mac([2, 6, 6, 6, 6, 6]),
            dst: Some("fd00:30::12".parse().unwrap()),
            permanent: true,
        });
        s
    }

    #[test]
    fn each_family_sees_only_its_own_device_routes_and_neighbours() {
        let s = dual();
        let v4 = s.observe(Some("flannel.1"), 2, Family::V4);
        assert_eq!(v4.stale_devices, vec![(5, "flannel.9".to_string())]);
        assert_eq!(v4.routes.len(), 2, "{:?}", v4.routes);
        let v6 = s.observe(Some("flannel-v6.1"), 2, Family::V6);
        assert_eq!(v6.device.as_ref().unwrap().index, 8);
        assert_eq!(v6.stale_devices, vec![(9, "flannel-v6.4".to_string())]);
        assert_eq!(
            v6.addresses,
            vec![net("fd00:10:244:1::/128")],
            "link-local is the kernel's"
        );
        let dsts: Vec<_> = v6
            .routes
            .iter()
            .map(|r| (r.route.dst, r.route.dev))
            .collect();
        assert_eq!(
            dsts,
            vec![
                (net("fd00:10:244:2::/64"), Dev::Overlay),
                (net("fd00:10:244:3::/64"), Dev::Underlay),
            ],
            "the kernel's /128 and fe80::/64 routes are not the overlay's"
        );
        assert_eq!(v6.neighbours.len(), 1);
        assert_eq!(
            v6.neighbours[0].ip,
            "fd00:10:244:2::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(v6.fdb.len(), 1);
        // A family the cluster does not have: its devices are all stale.
        let none = s.observe(None, 2, Family::V6);
        assert_eq!(none.stale_devices.len(), 2);
        assert_eq!(none.routes.len(), 1, "only canal's route on the underlay");
    }

    #[test]
    fn ipv6_underlay_skips_link_local_and_falls_back_to_the_ipv4_default_interface() {
        let s = dual();
        let u = s.underlay(None, Family::V6).unwrap();
        assert_eq!(
            (u.index, u.ip),
            (2, "fd00:30::10".parse::<IpAddr>().unwrap())
        );
        assert_eq!(u.connected, vec![net("fd00:30::/64")]);
        assert!(u.on_segment("fd00:30::99".parse().unwrap()));
        assert!(!u.on_segment("fe80::99".parse().unwrap()));
        let mut no_v6_default = s.clone();
        no_v6_default.routes.retain(|r| r.dst != net("::/0"));
        assert_eq!(no_v6_default.underlay(None, Family::V6).unwrap().index, 2);
        let mut only_link_local = no_v6_default.clone();
        only_link_local
            .addresses
            .retain(|a| a.net != net("fd00:30::10/64"));
        assert_eq!(
            only_link_local.underlay(None, Family::V6),
            Err(UnderlayError::NoAddress {
                name: "eth0".into(),
                family: Family::V6
            })
        );
        let mut no_default = only_link_local.clone();
        no_default.routes.retain(|r| r.dst.prefix_len() != 0);
        assert_eq!(
            no_default.underlay(None, Family::V6),
            Err(UnderlayError::NoDefaultRoute { family: Family::V6 })
        );
        let e = only_link_local
            .underlay(Some("eth0"), Family::V6)
            .unwrap_err();
        assert!(e.to_string().contains("no IPv6 address"), "{e}");
        assert!(e.to_string().contains("link-local"), "{e}");
        assert_eq!(
            s.underlay(None, Family::V4).unwrap().ip,
            "192.168.1.10".parse::<IpAddr>().unwrap()
        );
    }
}
