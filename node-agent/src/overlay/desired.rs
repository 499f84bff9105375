//! The overlay's desired kernel state for one IP family, computed from this
//! node, its peers, the family's network configuration and the underlay: a
//! pure function, so the same inputs always give the same device, routes,
//! neighbours and FDB entries.

use std::collections::BTreeMap;
use std::net::IpAddr;

use canal_crds::{BackendType, NetworkConfig};
use ipnet::IpNet;

use super::family::{self, Family};
use super::model::{Dev, Mac, Route, Underlay, VxlanDevice};

/// VXLAN over IPv4 adds 50 bytes (outer IPv4 20 + UDP 8 + VXLAN 8 + inner
/// Ethernet 14); over IPv6 70 ([`Family::vxlan_overhead`]).
pub const VXLAN_OVERHEAD: u32 = family::VXLAN_OVERHEAD_V4;

/// The network configuration as one family's overlay needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayConfig {
    /// The family.
    pub family: Family,
    /// The family's pod range.
    pub cluster_cidr: IpNet,
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
}

impl OverlayConfig {
    /// The overlay of `cluster_cidr`'s family with `config`'s backend.
    pub fn new(config: &NetworkConfig, cluster_cidr: IpNet) -> OverlayConfig {
        OverlayConfig {
            family: Family::of_net(&cluster_cidr),
            cluster_cidr,
            backend: config.backend,
            vni: config.vni,
            port: config.port,
            direct_routing: config.direct_routing,
            mtu: config.mtu,
        }
    }

    /// The VXLAN device this family's overlay uses.
    pub fn device_name(&self) -> String {
        self.family.device_name(self.vni)
    }
}

/// This node, as one family's overlay needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalNode {
    /// Node name.
    pub name: String,
    /// Its pod subnet of the family (from `spec.podCIDRs`).
    pub subnet: IpNet,
    /// Its VTEP MAC of the family (`backend-data` / `backend-v6-data`).
    pub vtep_mac: Mac,
}

/// Another node taking part in one family's overlay.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Peer {
    /// Node name.
    pub name: String,
    /// Its pod subnet of the family.
    pub subnet: IpNet,
    /// Its underlay address of the family (`public-ip` / `public-ipv6`).
    pub public_ip: IpAddr,
    /// Its VTEP MAC of the family.
    pub vtep_mac: Mac,
}

/// Why a peer gets no route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    /// Its subnet is not inside clusterCIDR (flannel refuses such leases too).
    OutsideClusterCidr,
    /// Its subnet overlaps this node's subnet.
    OverlapsLocalSubnet,
    /// Its subnet overlaps the subnet of a peer that sorts before it by name.
    OverlapsPeerSubnet,
    /// Its VTEP MAC is this node's or an earlier peer's.
    DuplicateVtepMac,
    /// Its address is this node's underlay address.
    SameAddressAsLocal,
    /// host-gw: the peer is not on this node's L2 segment.
    NotOnSegment,
}

impl SkipReason {
    /// Bounded label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::OutsideClusterCidr => "outside_cluster_cidr",
            SkipReason::OverlapsLocalSubnet => "overlaps_local_subnet",
            SkipReason::OverlapsPeerSubnet => "overlaps_peer_subnet",
            SkipReason::DuplicateVtepMac => "duplicate_vtep_mac",
            SkipReason::SameAddressAsLocal => "same_address_as_local",
            SkipReason::NotOnSegment => "not_on_segment",
        }
    }

    /// Every reason, for pre-registering metric label values.
    pub const ALL: [SkipReason; 6] = [
        SkipReason::OutsideClusterCidr,
        SkipReason::OverlapsLocalSubnet,
        SkipReason::OverlapsPeerSubnet,
        SkipReason::DuplicateVtepMac,
        SkipReason::SameAddressAsLocal,
        SkipReason::NotOnSegment,
    ];
}

/// A peer left out, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// Node name.
    pub peer: String,
    /// Reason.
    pub reason: SkipReason,
}

/// One family's overlay as it should be in the kernel.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Desired {
    /// The VXLAN device (None with host-gw, or for a family the cluster
    /// or this node does not have).
    pub device: Option<VxlanDevice>,
    /// One route per programmed peer, by destination.
    pub routes: BTreeMap<IpNet, Route>,
    /// Permanent neighbours on the VXLAN device: `S0 -> VtepMAC`.
    pub neighbours: BTreeMap<IpAddr, Mac>,
    /// FDB entries on the VXLAN device: `VtepMAC -> public IP`.
    pub fdb: BTreeMap<Mac, IpAddr>,
    /// MTU for pod interfaces (and the VXLAN device).
    pub pod_mtu: u32,
    /// Peers reached through VXLAN.
    pub vxlan_peers: usize,
    /// Peers reached by a plain route via their node address.
    pub direct_peers: usize,
    /// Peers left out.
    pub skipped: Vec<Skipped>,
}

/// The local node cannot be programmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DesiredError {
    /// The node's podCIDR lies outside clusterCIDR.
    #[error("node {node}: podCIDR {subnet} is outside clusterCIDR {cluster_cidr}")]
    LocalSubnetOutsideCluster {
        node: String,
        subnet: IpNet,
        cluster_cidr: IpNet,
    },
}

/// The MTU this family's VXLAN device (and pods, as far as this family
/// goes) gets: the configured MTU, or the underlay's minus the family's
/// VXLAN overhead (host-gw: the underlay's).
pub fn pod_mtu(config: &OverlayConfig, underlay_mtu: u32) -> u32 {
    config.mtu.unwrap_or(match config.backend {
        BackendType::Vxlan => underlay_mtu.saturating_sub(config.family.vxlan_overhead()),
        BackendType::HostGw => underlay_mtu,
    })
}

/// Computes one family's desired overlay. Peers are taken in name order, so
/// a conflict (overlap, duplicate MAC) always keeps the same peer; a peer
/// of another family than the configuration's is skipped as outside the
/// cluster range.
pub fn compute(
    local: &LocalNode,
    peers: &[Peer],
    config: &OverlayConfig,
    underlay: &Underlay,
) -> Result<Desired, DesiredError> {
    let cluster = config.cluster_cidr;
    if !cluster.contains(&local.subnet) {
        return Err(DesiredError::LocalSubnetOutsideCluster {
            node: local.name.clone(),
            subnet: local.subnet,
            cluster_cidr: cluster,
        });
    }
    let mtu = pod_mtu(config, underlay.mtu);
    let vxlan = config.backend == BackendType::Vxlan;
    let mut out = Desired {
        device: vxlan.then(|| VxlanDevice {
            name: config.device_name(),
            vni: config.vni,
            port: config.port,
            local: underlay.ip,
            underlay_index: underlay.index,
            mac: local.vtep_mac,
            mtu,
            address: local.subnet.network(),
        }),
        pod_mtu: mtu,
        ..Desired::default()
    };

    let mut ordered: Vec<&Peer> = peers.iter().collect();
    ordered.sort_by(|a, b| a.name.cmp(&b.name));
    let mut taken = Intervals::default();
    taken.insert(local.subnet);

    for peer in ordered {
        let skip = |reason| Skipped {
            peer: peer.name.clone(),
            reason,
        };
        if !cluster.contains(&peer.subnet) || Family::of_addr(&peer.public_ip) != config.family {
            out.skipped.push(skip(SkipReason::OutsideClusterCidr));
            continue;
        }
        if overlaps(peer.subnet, local.subnet) {
            out.skipped.push(skip(SkipReason::OverlapsLocalSubnet));
            continue;
        }
        if taken.overlaps(peer.subnet) {
            out.skipped.push(skip(SkipReason::OverlapsPeerSubnet));
            continue;
        }
        if peer.public_ip == underlay.ip {
            out.skipped.push(skip(SkipReason::SameAddressAsLocal));
            continue;
        }
        let direct = underlay.on_segment(peer.public_ip) && (!vxlan || config.direct_routing);
        if direct {
            out.routes.insert(
                peer.subnet,
                Route {
                    dst: peer.subnet,
                    gateway: peer.public_ip,
                    dev: Dev::Underlay,
                    onlink: false,
                },
            );
            out.direct_peers += 1;
        } else if vxlan {
            if peer.vtep_mac == local.vtep_mac || out.fdb.contains_key(&peer.vtep_mac) {
                out.skipped.push(skip(SkipReason::DuplicateVtepMac));
                continue;
            }
            let gateway = peer.subnet.network();
            out.routes.insert(
                peer.subnet,
                Route {
                    dst: peer.subnet,
                    gateway,
                    dev: Dev::Overlay,
                    onlink: true,
                },
            );
            out.neighbours.insert(gateway, peer.vtep_mac);
            out.fdb.insert(peer.vtep_mac, peer.public_ip);
            out.vxlan_peers += 1;
        } else {
            out.skipped.push(skip(SkipReason::NotOnSegment));
            continue;
        }
        taken.insert(peer.subnet);
    }
    Ok(out)
}

fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Disjoint address intervals of one family, for O(log n) overlap checks.
#[derive(Default)]
struct Intervals {
    /// start -> end (inclusive).
    by_start: BTreeMap<u128, u128>,
}

impl Intervals {
    fn bounds(net: IpNet) -> (u128, u128) {
        family::net_bounds(net)
    }

    fn insert(&mut self, net: IpNet) {
        let (start, end) = Self::bounds(net);
        self.by_start.insert(start, end);
    }

    fn overlaps(&self, net: IpNet) -> bool {
        let (start, end) = Self::bounds(net);
        // The interval starting at or before `start` may cover it; any
        // interval starting inside [start, end] overlaps it.
        let before = self
            .by_start
            .range(..=start)
            .next_back()
            .is_some_and(|(_, e)| *e >= start);
        before || self.by_start.range(start..=end).next().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canal_crds::CanalNetworkSpec;

    pub(crate) fn config() -> OverlayConfig {
        let c = CanalNetworkSpec::with_cluster_cidr("10.244.0.0/16")
            .validate()
            .unwrap();
        OverlayConfig::new(&c, "10.244.0.0/16".parse().unwrap())
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn local() -> LocalNode {
        LocalNode {
            name: "node-a".into(),
            subnet: net("10.244.1.0/24"),
            vtep_mac: Mac([0x02, 0, 0, 0, 0, 1]),
        }
    }

    fn underlay() -> Underlay {
        Underlay {
            index: 7,
            name: "eth0".into(),
            ip: ip("192.168.50.1"),
            mtu: 1500,
            connected: vec![net("192.168.50.0/24")],
        }
    }

    fn peer(name: &str, subnet: &str, public: &str, last: u8) -> Peer {
        Peer {
            name: name.into(),
            subnet: net(subnet),
            public_ip: ip(public),
            vtep_mac: Mac([0x02, 0, 0, 0, 1, last]),
        }
    }

    #[test]
    fn vxlan_peer_gets_route_neighbour_and_fdb() {
        let peers = [peer("node-b", "10.244.2.0/24", "192.168.50.2", 2)];
        let d = compute(&local(), &peers, &config(), &underlay()).unwrap();
        let dev = d.device.clone().unwrap();
        assert_eq!(dev.name, "flannel.1");
        assert_eq!(dev.vni, 1);
        assert_eq!(dev.port, 8472);
        assert_eq!(dev.local, ip("192.168.50.1"));
        assert_eq!(dev.underlay_index, 7);
        assert_eq!(dev.mtu, 1450);
        assert_eq!(dev.address, ip("10.244.1.0"));
        assert_eq!(dev.mac, local().vtep_mac);
        assert_eq!(
            d.routes[&net("10.244.2.0/24")],
            Route {
                dst: net("10.244.2.0/24"),
                gateway: ip("10.244.2.0"),
                dev: Dev::Overlay,
                onlink: true
            }
        );
        assert_eq!(d.neighbours[&ip("10.244.2.0")], peers[0].vtep_mac);
        assert_eq!(d.fdb[&peers[0].vtep_mac], ip("192.168.50.2"));
        assert_eq!((d.vxlan_peers, d.direct_peers), (1, 0));
        assert!(d.skipped.is_empty());
    }

    #[test]
    fn mtu_comes_from_config_or_underlay() {
        let mut cfg = config();
        assert_eq!(pod_mtu(&cfg, 9000), 8950);
        cfg.mtu = Some(1400);
        assert_eq!(pod_mtu(&cfg, 9000), 1400);
        cfg.mtu = None;
        cfg.backend = BackendType::HostGw;
        assert_eq!(pod_mtu(&cfg, 1500), 1500);
    }

    #[test]
    fn direct_routing_routes_same_segment_peers_via_their_address() {
        let mut cfg = config();
        cfg.direct_routing = true;
        let peers = [
            peer("node-b", "10.244.2.0/24", "192.168.50.2", 2),
            peer("node-c", "10.244.3.0/24", "172.16.0.3", 3),
        ];
        let d = compute(&local(), &peers, &cfg, &underlay()).unwrap();
        assert_eq!(
            d.routes[&net("10.244.2.0/24")],
            Route {
                dst: net("10.244.2.0/24"),
                gateway: ip("192.168.50.2"),
                dev: Dev::Underlay,
                onlink: false
            }
        );
        assert_eq!(d.routes[&net("10.244.3.0/24")].dev, Dev::Overlay);
        assert_eq!(d.neighbours.len(), 1, "only the VXLAN peer has a neighbour");
        assert_eq!(d.fdb.len(), 1);
        assert_eq!((d.vxlan_peers, d.direct_peers), (1, 1));
    }

    #[test]
    fn host_gw_has_no_device_and_skips_peers_off_segment() {
        let mut cfg = config();
        cfg.backend = BackendType::HostGw;
        let peers = [
            peer("node-b", "10.244.2.0/24", "192.168.50.2", 2),
            peer("node-c", "10.244.3.0/24", "172.16.0.3", 3),
        ];
        let d = compute(&local(), &peers, &cfg, &underlay()).unwrap();
        assert_eq!(d.device, None);
        assert_eq!(d.routes.len(), 1);
        assert_eq!(d.routes[&net("10.244.2.0/24")].dev, Dev::Underlay);
        assert!(d.neighbours.is_empty() && d.fdb.is_empty());
        assert_eq!(
            d.skipped,
            vec![Skipped {
                peer: "node-c".into(),
                reason: SkipReason::NotOnSegment
            }]
        );
        assert_eq!(d.pod_mtu, 1500);
    }

    #[test]
    fn conflicting_peers_are_skipped_deterministically() {
        let peers = [
            // Sorted by name: node-b wins the subnet, node-c loses it.
            peer("node-c", "10.244.2.0/23", "192.168.50.3", 3),
            peer("node-b", "10.244.2.0/24", "192.168.50.2", 2),
            peer("node-d", "10.245.0.0/24", "192.168.50.4", 4),
            peer("node-e", "10.244.1.128/25", "192.168.50.5", 5),
            peer("node-f", "10.244.6.0/24", "192.168.50.6", 2),
            peer("node-g", "10.244.7.0/24", "192.168.50.1", 7),
        ];
        let d = compute(&local(), &peers, &config(), &underlay()).unwrap();
        let reasons: Vec<_> = d
            .skipped
            .iter()
            .map(|s| (s.peer.as_str(), s.reason))
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("node-c", SkipReason::OverlapsPeerSubnet),
                ("node-d", SkipReason::OutsideClusterCidr),
                ("node-e", SkipReason::OverlapsLocalSubnet),
                ("node-f", SkipReason::DuplicateVtepMac),
                ("node-g", SkipReason::SameAddressAsLocal),
            ]
        );
        assert_eq!(d.routes.len(), 1);
    }

    #[test]
    fn local_subnet_outside_cluster_is_an_error() {
        let mut l = local();
        l.subnet = net("10.99.0.0/24");
        assert!(matches!(
            compute(&l, &[], &config(), &underlay()),
            Err(DesiredError::LocalSubnetOutsideCluster { .. })
        ));
    }

    #[test]
    fn interval_overlap_checks() {
        let mut iv = Intervals::default();
        iv.insert(net("10.0.1.0/24"));
        iv.insert(net("10.0.4.0/22"));
        assert!(iv.overlaps(net("10.0.1.128/25")));
        assert!(iv.overlaps(net("10.0.0.0/16")));
        assert!(iv.overlaps(net("10.0.6.0/24")));
        assert!(!iv.overlaps(net("10.0.2.0/24")));
        assert!(!iv.overlaps(net("10.0.8.0/24")));
    }

    fn config_v6() -> OverlayConfig {
        OverlayConfig {
            family: Family::V6,
            cluster_cidr: net("fd00:10:244::/56"),
            ..config()
        }
    }

    fn underlay_v6() -> Underlay {
        Underlay {
            index: 7,
            name: "eth0".into(),
            ip: ip("fd00:30::1"),
            mtu: 1500,
            connected: vec![net("fd00:30::/64")],
        }
    }

    #[test]
    fn ipv6_peer_gets_flannel_v6_device_route_neighbour_and_fdb() {
        let local = LocalNode {
            name: "node-a".into(),
            subnet: net("fd00:10:244:1::/64"),
            vtep_mac: Mac([0x02, 0, 0, 0, 6, 1]),
        };
        let peers = [
            Peer {
                name: "node-b".into(),
                subnet: net("fd00:10:244:2::/64"),
                public_ip: ip("fd00:30::2"),
                vtep_mac: Mac([0x02, 0, 0, 0, 6, 2]),
            },
            // An IPv4 peer in the IPv6 overlay: never mixed in.
            peer("node-c", "10.244.3.0/24", "192.168.50.3", 3),
            // An IPv6 subnet whose node has only an IPv4 underlay address.
            Peer {
                subnet: net("fd00:10:244:4::/64"),
                ..peer("node-d", "10.244.4.0/24", "192.168.50.4", 4)
            },
        ];
        let d = compute(&local, &peers, &config_v6(), &underlay_v6()).unwrap();
        let dev = d.device.clone().unwrap();
        assert_eq!(dev.name, "flannel-v6.1");
        assert_eq!(dev.local, ip("fd00:30::1"));
        assert_eq!(dev.address, ip("fd00:10:244:1::"));
        assert_eq!(dev.mtu, 1430, "an IPv6 underlay costs 70 bytes");
        assert_eq!(
            d.routes[&net("fd00:10:244:2::/64")],
            Route {
                dst: net("fd00:10:244:2::/64"),
                gateway: ip("fd00:10:244:2::"),
                dev: Dev::Overlay,
                onlink: true
            }
        );
        assert_eq!(d.neighbours[&ip("fd00:10:244:2::")], peers[0].vtep_mac);
        assert_eq!(d.fdb[&peers[0].vtep_mac], ip("fd00:30::2"));
        let skipped: Vec<_> = d
            .skipped
            .iter()
            .map(|s| (s.peer.as_str(), s.reason))
            .collect();
        assert_eq!(
            skipped,
            vec![
                ("node-c", SkipReason::OutsideClusterCidr),
                ("node-d", SkipReason::OutsideClusterCidr)
            ]
        );
    }

    #[test]
    fn ipv6_direct_routing_and_host_gw_use_the_ipv6_segment() {
        let local = LocalNode {
            name: "node-a".into(),
            subnet: net("fd00:10:244:1::/64"),
            vtep_mac: Mac([0x02, 0, 0, 0, 6, 1]),
        };
        let near = Peer {
            name: "node-b".into(),
            subnet: net("fd00:10:244:2::/64"),
            public_ip: ip("fd00:30::2"),
            vtep_mac: Mac([0x02, 0, 0, 0, 6, 2]),
        };
        let far = Peer {
            name: "node-c".into(),
            subnet: net("fd00:10:244:3::/64"),
            public_ip: ip("fd00:99::3"),
            vtep_mac: Mac([0x02, 0, 0, 0, 6, 3]),
        };
        let mut cfg = config_v6();
        cfg.direct_routing = true;
        let d = compute(&local, &[near.clone(), far.clone()], &cfg, &underlay_v6()).unwrap();
        assert_eq!(
            d.routes[&near.subnet],
            Route {
                dst: near.subnet,
                gateway: near.public_ip,
                dev: Dev::Underlay,
                onlink: false
            }
        );
        assert_eq!(d.routes[&far.subnet].dev, Dev::Overlay);
        cfg.backend = BackendType::HostGw;
        let d = compute(&local, &[near, far], &cfg, &underlay_v6()).unwrap();
        assert_eq!(
            (d.device.is_none(), d.routes.len(), d.pod_mtu),
            (true, 1, 1500)
        );
        assert_eq!(d.skipped[0].reason, SkipReason::NotOnSegment);
    }
}
