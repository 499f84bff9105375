//! Desired vs observed overlay state -> the minimal list of kernel changes.
//! Pure: what is already right is never touched, so a restarted agent finds
//! nothing to do and established connections are not disturbed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::desired::Desired;
use super::family::Family;
use super::model::{
    Dev, FdbEntry, Mac, Neighbour, Observed, ObservedFdb, ObservedLink, ObservedRoute, Route,
    VxlanDevice,
};

/// A change to the VXLAN device or its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkOp {
    /// Delete a link (an incompatible device, or a stale `flannel.<N>`).
    Delete {
        /// ifindex.
        index: u32,
        /// Name, for logs.
        name: String,
        /// Why.
        reason: DeleteReason,
    },
    /// Create the VXLAN device (with its MAC, MTU, and up).
    Create(VxlanDevice),
    /// Set the device's MAC.
    SetMac(Mac),
    /// Set the device's MTU.
    SetMtu(u32),
    /// Bring the device up.
    SetUp,
    /// Add an address to the device.
    AddAddress(IpNet),
    /// Remove an address from the device.
    DeleteAddress(IpNet),
}

/// Why a link is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteReason {
    /// Same name, but wrong type, VNI, port, local IP, underlay or learning.
    Incompatible,
    /// A VXLAN device of another VNI (or the backend is host-gw now).
    Stale,
}

/// The kinds of kernel objects the overlay programs (bounded metric labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// The VXLAN device.
    Link,
    /// Its address.
    Address,
    /// Routes.
    Route,
    /// Neighbour entries.
    Neighbour,
    /// FDB entries.
    Fdb,
}

impl Kind {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Link => "link",
            Kind::Address => "address",
            Kind::Route => "route",
            Kind::Neighbour => "neighbour",
            Kind::Fdb => "fdb",
        }
    }

    /// Every kind.
    pub const ALL: [Kind; 5] = [
        Kind::Link,
        Kind::Address,
        Kind::Route,
        Kind::Neighbour,
        Kind::Fdb,
    ];
}

/// The changes, grouped in the order they must be applied: the device first;
/// then routes are removed before the neighbour/FDB entries they use; and new
/// neighbour/FDB entries go in before the routes that use them, so the kernel
/// never ARPs for a remote gateway (flannel's order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Device changes, applied one after the other.
    pub links: Vec<LinkOp>,
    /// Routes to delete.
    pub route_deletes: Vec<ObservedRoute>,
    /// Neighbour entries to delete (by destination).
    pub neighbour_deletes: Vec<IpAddr>,
    /// FDB entries to delete.
    pub fdb_deletes: Vec<ObservedFdb>,
    /// Neighbour entries to create or replace.
    pub neighbour_sets: Vec<Neighbour>,
    /// FDB entries to create or replace.
    pub fdb_sets: Vec<FdbEntry>,
    /// Routes to create or replace.
    pub route_sets: Vec<Route>,
}

impl Plan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.links.len()
            + self.route_deletes.len()
            + self.neighbour_deletes.len()
            + self.fdb_deletes.len()
            + self.neighbour_sets.len()
            + self.fdb_sets.len()
            + self.route_sets.len()
    }

    /// Number of changes of each kind.
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        let mut out = BTreeMap::new();
        for op in &self.links {
            let kind = match op {
                LinkOp::AddAddress(_) | LinkOp::DeleteAddress(_) => Kind::Address,
                _ => Kind::Link,
            };
            *out.entry(kind).or_default() += 1;
        }
        let mut add = |kind, n: usize| {
            if n > 0 {
                *out.entry(kind).or_default() += n;
            }
        };
        add(
            Kind::Route,
            self.route_deletes.len() + self.route_sets.len(),
        );
        add(
            Kind::Neighbour,
            self.neighbour_deletes.len() + self.neighbour_sets.len(),
        );
        add(Kind::Fdb, self.fdb_deletes.len() + self.fdb_sets.len());
        out
    }
}

/// Whether an existing link can be kept as the desired VXLAN device (only
/// its MAC, MTU, state and addresses may then differ).
pub fn compatible(want: &VxlanDevice, have: &ObservedLink) -> bool {
    have.vxlan.is_some_and(|v| {
        v.vni == want.vni
            && v.port == want.port
            && v.local == Some(want.local)
            && v.underlay_index == Some(want.underlay_index)
            && !v.learning
    })
}

/// Computes the minimal plan that turns `observed` into `desired`.
pub fn plan(desired: &Desired, observed: &Observed) -> Plan {
    let mut plan = Plan::default();

    for (index, name) in &observed.stale_devices {
        plan.links.push(LinkOp::Delete {
            index: *index,
            name: name.clone(),
            reason: DeleteReason::Stale,
        });
    }

    // Whether the device (and with it every route, neighbour and FDB entry
    // on it) is about to be created from scratch.
    let mut fresh_device = false;
    match (&desired.device, &observed.device) {
        (None, Some(have)) => {
            plan.links.push(LinkOp::Delete {
                index: have.index,
                name: have.name.clone(),
                reason: DeleteReason::Stale,
            });
            fresh_device = true;
        }
        (None, None) => {}
        (Some(want), have) => {
            let keep = have.as_ref().filter(|h| compatible(want, h));
            match keep {
                Some(have) => {
                    if have.mac != Some(want.mac) {
                        plan.links.push(LinkOp::SetMac(want.mac));
                    }
                    if have.mtu != want.mtu {
                        plan.links.push(LinkOp::SetMtu(want.mtu));
                    }
                    if !have.up {
                        plan.links.push(LinkOp::SetUp);
                    }
                    let address = host_net(want.address);
                    for a in &observed.addresses {
                        if *a != address {
                            plan.links.push(LinkOp::DeleteAddress(*a));
                        }
                    }
                    if !observed.addresses.contains(&address) {
                        plan.links.push(LinkOp::AddAddress(address));
                    }
                }
                None => {
                    if let Some(have) = have {
                        plan.links.push(LinkOp::Delete {
                            index: have.index,
                            name: have.name.clone(),
                            reason: DeleteReason::Incompatible,
                        });
                    }
                    plan.links.push(LinkOp::Create(want.clone()));
                    plan.links.push(LinkOp::AddAddress(host_net(want.address)));
                    fresh_device = true;
                }
            }
        }
    }

    // Routes: keyed by (destination, metric); the desired ones use the
    // family's default metric (0 for IPv4, 1024 for IPv6).
    let mut routes_ok = BTreeSet::new();
    for have in &observed.routes {
        if fresh_device && have.route.dev == Dev::Overlay {
            continue;
        }
        let ours = have.priority == Family::of_net(&have.route.dst).default_route_metric();
        match desired.routes.get(&have.route.dst) {
            Some(want) if ours && have.route == *want => {
                routes_ok.insert(want.dst);
            }
            // Same key, other content: the replace below rewrites it.
            Some(_) if ours => {}
            _ => plan.route_deletes.push(*have),
        }
    }
    plan.route_sets = desired
        .routes
        .values()
        .filter(|r| !routes_ok.contains(&r.dst))
        .copied()
        .collect();

    let mut neighbours_ok = BTreeSet::new();
    if !fresh_device {
        for have in &observed.neighbours {
            match desired.neighbours.get(&have.ip) {
                Some(mac) if have.mac == Some(*mac) && have.permanent => {
                    neighbours_ok.insert(have.ip);
                }
                Some(_) => {}
                None => plan.neighbour_deletes.push(have.ip),
            }
        }
    }
    plan.neighbour_sets = desired
        .neighbours
        .iter()
        .filter(|(ip, _)| !neighbours_ok.contains(*ip))
        .map(|(ip, mac)| Neighbour { ip: *ip, mac: *mac })
        .collect();

    let mut fdb_ok = BTreeSet::new();
    if !fresh_device {
        for have in &observed.fdb {
            match desired.fdb.get(&have.mac) {
                Some(dst) if have.dst == Some(*dst) => {
                    if have.permanent {
                        fdb_ok.insert(have.mac);
                    }
                    // A learned entry for the right address: the replace
                    // below makes it permanent.
                }
                _ => plan.fdb_deletes.push(*have),
            }
        }
    }
    plan.fdb_sets = desired
        .fdb
        .iter()
        .filter(|(mac, _)| !fdb_ok.contains(*mac))
        .map(|(mac, dst)| FdbEntry {
            mac: *mac,
            dst: *dst,
        })
        .collect();

    plan
}

/// `ip/32` or `ip/128`.
pub fn host_net(ip: IpAddr) -> IpNet {
    super::family::host_net(ip)
}

#[cfg(test)]
pub(crate) mod sim {
    //! A model of the kernel's behaviour for the objects the overlay owns,
    //! to check that applying a plan really produces the desired state.

    use super::*;
    use crate::overlay::model::{ObservedNeighbour, VxlanAttrs};

    /// FDB remotes of one MAC: (dst, permanent).
    type Remotes = Vec<(Option<IpAddr>, bool)>;

    /// The overlay's objects in a simulated kernel.
    #[derive(Clone, Debug, Default)]
    pub struct Kernel {
        pub links: BTreeMap<u32, ObservedLink>,
        pub next_index: u32,
        pub addresses: BTreeMap<u32, BTreeSet<IpNet>>,
        /// (dst, priority) -> (route, oif)
        pub routes: BTreeMap<(IpNet, u32), (Route, u32)>,
        pub neighbours: BTreeMap<(u32, IpAddr), (Option<Mac>, bool)>,
        pub fdb: BTreeMap<(u32, Mac), Remotes>,
        pub underlay_index: u32,
    }

    impl Kernel {
        pub fn new(underlay_index: u32) -> Kernel {
            Kernel {
                next_index: 100,
                underlay_index,
                ..Kernel::default()
            }
        }

        fn device(&self, name: &str) -> Option<&ObservedLink> {
            self.links.values().find(|l| l.name == name)
        }

        /// What the netlink shell would observe, for a device named `name`.
        pub fn observe(&self, name: &str) -> Observed {
            let device = self.device(name).cloned();
            let dev_index = device.as_ref().map(|d| d.index);
            let stale_devices = self
                .links
                .values()
                .filter(|l| {
                    l.name != name
                        && crate::overlay::family::Family::ALL
                            .iter()
                            .any(|f| f.is_device_name(&l.name) && f.is_device_name(name))
                        && l.vxlan.is_some()
                })
                .map(|l| (l.index, l.name.clone()))
                .collect();
            let on_dev = |i: u32| Some(i) == dev_index;
            Observed {
                stale_devices,
                addresses: dev_index
                    .and_then(|i| self.addresses.get(&i))
                    .map(|s| s.iter().copied().collect())
                    .unwrap_or_default(),
                routes: self
                    .routes
                    .iter()
                    .filter_map(|((_, prio), (route, oif))| {
                        let dev = if on_dev(*oif) {
                            Dev::Overlay
                        } else if *oif == self.underlay_index {
                            Dev::Underlay
                        } else {
                            return None;
                        };
                        Some(ObservedRoute {
                            route: Route { dev, ..*route },
                            priority: *prio,
                        })
                    })
                    .collect(),
                neighbours: self
                    .neighbours
                    .iter()
                    .filter(|((i, _), _)| on_dev(*i))
                    .map(|((_, ip), (mac, permanent))| ObservedNeighbour {
                        ip: *ip,
                        mac: *mac,
                        permanent: *permanent,
                    })
                    .collect(),
                fdb: self
                    .fdb
                    .iter()
                    .filter(|((i, _), _)| on_dev(*i))
                    .flat_map(|((_, mac), remotes)| {
                        remotes.iter().map(|(dst, permanent)| ObservedFdb {
                            mac: *mac,
                            dst: *dst,
                            permanent: *permanent,
                        })
                    })
                    .collect(),
                device,
            }
        }

        fn delete_link(&mut self, index: u32) {
            self.links.remove(&index);
            self.addresses.remove(&index);
            self.routes.retain(|_, (_, oif)| *oif != index);
            self.neighbours.retain(|(i, _), _| *i != index);
            self.fdb.retain(|(i, _), _| *i != index);
        }

        /// Applies a plan with the kernel's semantics (replace = create or
        /// overwrite the entry with the same key). `name` is the device name.
        pub fn apply(&mut self, plan: &Plan, name: &str) {
            for op in &plan.links {
                let dev = self.device(name).map(|d| d.index);
                match op {
                    LinkOp::Delete { index, .. } => self.delete_link(*index),
                    LinkOp::Create(d) => {
                        let index = self.next_index;
                        self.next_index += 1;
                        self.links.insert(
                            index,
                            ObservedLink {
                                index,
                                name: d.name.clone(),
                                vxlan: Some(VxlanAttrs {
                                    vni: d.vni,
                                    port: d.port,
                                    local: Some(d.local),
                                    underlay_index: Some(d.underlay_index),
                                    learning: false,
                                }),
                                mac: Some(d.mac),
                                mtu: d.mtu,
                                up: true,
                            },
                        );
                    }
                    LinkOp::SetMac(m) => {
                        let l = self.links.get_mut(&dev.unwrap()).unwrap();
                        l.mac = Some(*m);
                    }
                    LinkOp::SetMtu(m) => self.links.get_mut(&dev.unwrap()).unwrap().mtu = *m,
                    LinkOp::SetUp => self.links.get_mut(&dev.unwrap()).unwrap().up = true,
                    LinkOp::AddAddress(a) => {
                        self.addresses.entry(dev.unwrap()).or_default().insert(*a);
                    }
                    LinkOp::DeleteAddress(a) => {
                        self.addresses.entry(dev.unwrap()).or_default().remove(a);
                    }
                }
            }
            let dev = self.device(name).map(|d| d.index);
            let oif = |d: Dev| match d {
                Dev::Overlay => dev.unwrap(),
                Dev::Underlay => self.underlay_index,
            };
            for r in &plan.route_deletes {
                let removed = self.routes.remove(&(r.route.dst, r.priority));
                assert!(removed.is_some(), "deleting a missing route {r:?}");
            }
            for ip in &plan.neighbour_deletes {
                self.neighbours.remove(&(dev.unwrap(), *ip));
            }
            for f in &plan.fdb_deletes {
                let key = (dev.unwrap(), f.mac);
                if let Some(remotes) = self.fdb.get_mut(&key) {
                    remotes.retain(|(dst, _)| *dst != f.dst);
                    if remotes.is_empty() {
                        self.fdb.remove(&key);
                    }
                }
            }
            for n in &plan.neighbour_sets {
                self.neighbours
                    .insert((dev.unwrap(), n.ip), (Some(n.mac), true));
            }
            for f in &plan.fdb_sets {
                let remotes = self.fdb.entry((dev.unwrap(), f.mac)).or_default();
                // NLM_F_REPLACE rewrites the first remote.
                match remotes.first_mut() {
                    Some(first) => *first = (Some(f.dst), true),
                    None => remotes.push((Some(f.dst), true)),
                }
            }
            for r in &plan.route_sets {
                let o = oif(r.dev);
                let metric = Family::of_net(&r.dst).default_route_metric();
                self.routes.insert((r.dst, metric), (*r, o));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sim::Kernel;
    use super::*;
    use crate::overlay::desired::{LocalNode, OverlayConfig, Peer, compute};
    use crate::overlay::family::Family;
    use crate::overlay::model::{ObservedNeighbour, Underlay, VxlanAttrs};
    use canal_crds::{BackendType, CanalNetworkSpec};
    use ipnet::Ipv4Net;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    type NetworkConfig = OverlayConfig;

    fn config() -> NetworkConfig {
        let c = CanalNetworkSpec::with_cluster_cidr("10.244.0.0/16")
            .validate()
            .unwrap();
        OverlayConfig::new(&c, "10.244.0.0/16".parse().unwrap())
    }

    fn underlay() -> Underlay {
        Underlay {
            index: 2,
            name: "eth0".into(),
            ip: "192.168.0.1".parse().unwrap(),
            mtu: 1500,
            connected: vec!["192.168.0.0/24".parse().unwrap()],
        }
    }

    fn local() -> LocalNode {
        LocalNode {
            name: "n0".into(),
            subnet: "10.244.0.0/24".parse().unwrap(),
            vtep_mac: Mac([2, 0, 0, 0, 0, 0]),
        }
    }

    /// Peer i: subnet 10.244.i.0/24, address 192.168.0.(i+1) or, for odd
    /// `far`, 172.16.x.y (off the segment).
    fn peer(i: u16, far: bool) -> Peer {
        let i8 = i as u8;
        Peer {
            name: format!("n{i:04}"),
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 244, i8, 0), 24)
                .unwrap()
                .into(),
            public_ip: if far {
                Ipv4Addr::new(172, 16, (i >> 8) as u8, i8).into()
            } else {
                Ipv4Addr::new(192, 168, 0, i8.wrapping_add(1)).into()
            },
            vtep_mac: Mac([2, 0, 0, 1, (i >> 8) as u8, i8]),
        }
    }

    fn desired(peers: &[Peer], cfg: &NetworkConfig) -> Desired {
        compute(&local(), peers, cfg, &underlay()).unwrap()
    }

    fn converge(kernel: &mut Kernel, d: &Desired, name: &str) -> Plan {
        let p = plan(d, &kernel.observe(name));
        kernel.apply(&p, name);
        p
    }

    #[test]
    fn empty_kernel_gets_everything_in_order() {
        let peers: Vec<_> = (1..=3).map(|i| peer(i, true)).collect();
        let d = desired(&peers, &config());
        let p = plan(&d, &Observed::default());
        assert!(matches!(p.links[0], LinkOp::Create(_)));
        assert_eq!(
            p.links[1],
            LinkOp::AddAddress("10.244.0.0/32".parse().unwrap())
        );
        assert_eq!(p.route_sets.len(), 3);
        assert_eq!(p.neighbour_sets.len(), 3);
        assert_eq!(p.fdb_sets.len(), 3);
        assert!(p.route_deletes.is_empty() && p.fdb_deletes.is_empty());
    }

    #[test]
    fn converged_kernel_needs_nothing() {
        let peers: Vec<_> = (1..=20).map(|i| peer(i, i % 2 == 0)).collect();
        let mut cfg = config();
        cfg.direct_routing = true;
        let d = desired(&peers, &cfg);
        let mut k = Kernel::new(2);
        converge(&mut k, &d, "flannel.1");
        assert!(plan(&d, &k.observe("flannel.1")).is_empty());
    }

    #[test]
    fn compatible_device_is_kept_with_mac_mtu_and_addresses_fixed() {
        let d = desired(&[], &config());
        let want = d.device.clone().unwrap();
        let observed = Observed {
            device: Some(ObservedLink {
                index: 9,
                name: "flannel.1".into(),
                vxlan: Some(VxlanAttrs {
                    vni: 1,
                    port: 8472,
                    local: Some(want.local),
                    underlay_index: Some(2),
                    learning: false,
                }),
                mac: Some(Mac([2, 9, 9, 9, 9, 9])),
                mtu: 1500,
                up: false,
            }),
            addresses: vec!["10.244.0.1/24".parse().unwrap()],
            ..Observed::default()
        };
        let p = plan(&d, &observed);
        assert_eq!(
            p.links,
            vec![
                LinkOp::SetMac(want.mac),
                LinkOp::SetMtu(1450),
                LinkOp::SetUp,
                LinkOp::DeleteAddress("10.244.0.1/24".parse().unwrap()),
                LinkOp::AddAddress("10.244.0.0/32".parse().unwrap()),
            ]
        );
    }

    #[test]
    fn incompatible_device_is_recreated_and_repopulated() {
        let peers = [peer(1, true)];
        let d = desired(&peers, &config());
        for bad in [
            |v: &mut VxlanAttrs| v.vni = 2,
            |v: &mut VxlanAttrs| v.port = 4789,
            |v: &mut VxlanAttrs| v.local = Some(Ipv4Addr::new(1, 2, 3, 4).into()),
            |v: &mut VxlanAttrs| v.underlay_index = Some(77),
            |v: &mut VxlanAttrs| v.learning = true,
        ] {
            let mut k = Kernel::new(2);
            converge(&mut k, &d, "flannel.1");
            let index = k.observe("flannel.1").device.unwrap().index;
            bad(k.links.get_mut(&index).unwrap().vxlan.as_mut().unwrap());
            let p = converge(&mut k, &d, "flannel.1");
            assert!(matches!(
                p.links[0],
                LinkOp::Delete {
                    reason: DeleteReason::Incompatible,
                    ..
                }
            ));
            assert!(matches!(p.links[1], LinkOp::Create(_)));
            assert_eq!(
                (p.route_sets.len(), p.neighbour_sets.len(), p.fdb_sets.len()),
                (1, 1, 1),
                "routes/neigh/fdb go with the old device and are added again"
            );
            assert!(p.route_deletes.is_empty() && p.neighbour_deletes.is_empty());
            assert!(plan(&d, &k.observe("flannel.1")).is_empty());
        }
    }

    #[test]
    fn a_non_vxlan_link_with_the_name_is_replaced() {
        let d = desired(&[], &config());
        let observed = Observed {
            device: Some(ObservedLink {
                index: 5,
                name: "flannel.1".into(),
                vxlan: None,
                mac: None,
                mtu: 1500,
                up: true,
            }),
            ..Observed::default()
        };
        let p = plan(&d, &observed);
        assert!(matches!(
            p.links[0],
            LinkOp::Delete {
                index: 5,
                reason: DeleteReason::Incompatible,
                ..
            }
        ));
    }

    #[test]
    fn removed_peer_loses_exactly_its_route_neighbour_and_fdb() {
        let peers: Vec<_> = (1..=5).map(|i| peer(i, true)).collect();
        let mut k = Kernel::new(2);
        converge(&mut k, &desired(&peers, &config()), "flannel.1");
        let d = desired(&peers[..4], &config());
        let p = plan(&d, &k.observe("flannel.1"));
        assert_eq!(p.route_deletes.len(), 1);
        assert_eq!(p.route_deletes[0].route.dst, peers[4].subnet);
        assert_eq!(p.neighbour_deletes, vec![peers[4].subnet.network()]);
        assert_eq!(p.fdb_deletes.len(), 1);
        assert_eq!(p.fdb_deletes[0].mac, peers[4].vtep_mac);
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn changed_peer_address_rewrites_only_its_fdb_entry() {
        let mut peers: Vec<_> = (1..=3).map(|i| peer(i, true)).collect();
        let mut k = Kernel::new(2);
        converge(&mut k, &desired(&peers, &config()), "flannel.1");
        peers[1].public_ip = Ipv4Addr::new(172, 17, 0, 9).into();
        let d = desired(&peers, &config());
        let p = plan(&d, &k.observe("flannel.1"));
        assert_eq!(p.fdb_deletes.len(), 1, "old remote removed");
        assert_eq!(
            p.fdb_sets,
            vec![FdbEntry {
                mac: peers[1].vtep_mac,
                dst: peers[1].public_ip
            }]
        );
        assert_eq!(p.len(), 2);
        k.apply(&p, "flannel.1");
        assert!(plan(&d, &k.observe("flannel.1")).is_empty());
    }

    #[test]
    fn non_permanent_neighbour_for_a_gateway_is_made_permanent() {
        let peers = [peer(1, true)];
        let d = desired(&peers, &config());
        let mut k = Kernel::new(2);
        converge(&mut k, &d, "flannel.1");
        let mut o = k.observe("flannel.1");
        o.neighbours[0].permanent = false;
        o.neighbours.push(ObservedNeighbour {
            ip: Ipv4Addr::new(10, 244, 99, 0).into(),
            mac: None,
            permanent: false,
        });
        let p = plan(&d, &o);
        assert_eq!(p.neighbour_sets.len(), 1);
        assert_eq!(
            p.neighbour_deletes,
            vec![IpAddr::from(Ipv4Addr::new(10, 244, 99, 0))]
        );
    }

    #[test]
    fn host_gw_switch_deletes_the_device_and_routes_directly() {
        let peers: Vec<_> = (1..=3).map(|i| peer(i, false)).collect();
        let mut k = Kernel::new(2);
        converge(&mut k, &desired(&peers, &config()), "flannel.1");
        let mut cfg = config();
        cfg.backend = BackendType::HostGw;
        let d = desired(&peers, &cfg);
        // In host-gw every flannel.N device is stale.
        let mut o = k.observe("flannel.1");
        let dev = o.device.take().unwrap();
        o.stale_devices.push((dev.index, dev.name));
        o.routes.retain(|r| r.route.dev != Dev::Overlay);
        o.neighbours.clear();
        o.fdb.clear();
        let p = plan(&d, &o);
        assert!(matches!(
            p.links[..],
            [LinkOp::Delete {
                reason: DeleteReason::Stale,
                ..
            }]
        ));
        assert_eq!(p.route_sets.len(), 3);
        assert!(p.route_sets.iter().all(|r| r.dev == Dev::Underlay));
    }

    #[test]
    fn vni_change_deletes_the_old_device() {
        let peers = [peer(1, true)];
        let mut k = Kernel::new(2);
        converge(&mut k, &desired(&peers, &config()), "flannel.1");
        let mut cfg = config();
        cfg.vni = 7;
        let d = desired(&peers, &cfg);
        converge(&mut k, &d, "flannel.7");
        assert!(k.observe("flannel.7").stale_devices.is_empty());
        assert_eq!(k.links.len(), 1);
        assert!(plan(&d, &k.observe("flannel.7")).is_empty());
    }

    #[test]
    fn foreign_metric_route_to_a_peer_subnet_is_removed() {
        let peers = [peer(1, true)];
        let d = desired(&peers, &config());
        let mut k = Kernel::new(2);
        converge(&mut k, &d, "flannel.1");
        let mut o = k.observe("flannel.1");
        let mut extra = o.routes[0];
        extra.priority = 100;
        o.routes.push(extra);
        let p = plan(&d, &o);
        assert_eq!(p.route_deletes, vec![extra]);
        assert!(p.route_sets.is_empty());
    }

    #[test]
    fn ipv6_converges_with_the_kernels_metric_and_a_foreign_metric_goes() {
        let cfg = OverlayConfig {
            family: Family::V6,
            cluster_cidr: "fd00:10:244::/56".parse().unwrap(),
            ..config()
        };
        let local = LocalNode {
            name: "n0".into(),
            subnet: "fd00:10:244::/64".parse().unwrap(),
            vtep_mac: Mac([2, 0, 0, 0, 6, 0]),
        };
        let peers: Vec<Peer> = (1..=4u16)
            .map(|i| Peer {
                name: format!("n{i}"),
                subnet: format!("fd00:10:244:{i:x}::/64").parse().unwrap(),
                public_ip: format!("fd00:30::{i:x}").parse().unwrap(),
                vtep_mac: Mac([2, 0, 0, 1, 6, i as u8]),
            })
            .collect();
        let underlay = Underlay {
            index: 2,
            name: "eth0".into(),
            ip: "fd00:30::99".parse().unwrap(),
            mtu: 1500,
            connected: vec!["fd00:31::/64".parse().unwrap()],
        };
        let d = compute(&local, &peers, &cfg, &underlay).unwrap();
        let mut k = Kernel::new(2);
        converge(&mut k, &d, "flannel-v6.1");
        let mut o = k.observe("flannel-v6.1");
        assert!(o.routes.iter().all(|r| r.priority == 1024));
        assert!(plan(&d, &o).is_empty());
        let mut foreign = o.routes[0];
        foreign.priority = 0;
        o.routes.push(foreign);
        assert_eq!(plan(&d, &o).route_deletes, vec![foreign]);
    }

    fn arb_peers() -> impl Strategy<Value = Vec<Peer>> {
        proptest::collection::btree_set(1u16..250, 0..40).prop_flat_map(|ids| {
            let ids: Vec<u16> = ids.into_iter().collect();
            let n = ids.len();
            proptest::collection::vec(any::<bool>(), n).prop_map(move |far| {
                ids.iter()
                    .zip(far)
                    .map(|(i, far)| peer(*i, far))
                    .collect::<Vec<_>>()
            })
        })
    }

    fn arb_config() -> impl Strategy<Value = NetworkConfig> {
        (any::<bool>(), any::<bool>(), 1u32..4).prop_map(|(direct, hostgw, vni)| {
            let mut c = config();
            c.direct_routing = direct;
            c.vni = vni;
            if hostgw {
                c.backend = BackendType::HostGw;
            }
            c
        })
    }

    fn name(cfg: &NetworkConfig) -> String {
        cfg.device_name()
    }

    proptest! {
        /// From any previous state (another config, other peers), one plan
        /// converges the kernel, and a second plan is empty.
        #[test]
        fn one_plan_converges_from_any_state(
            before in arb_peers(), before_cfg in arb_config(),
            after in arb_peers(), after_cfg in arb_config(),
        ) {
            let mut k = Kernel::new(2);
            let d0 = desired(&before, &before_cfg);
            converge(&mut k, &d0, &name(&before_cfg));
            let d1 = desired(&after, &after_cfg);
            let n1 = name(&after_cfg);
            // In host-gw no device name is wanted; every flannel.N is stale.
            let observe = |k: &Kernel| {
                let mut o = k.observe(&n1);
                if after_cfg.backend == BackendType::HostGw
                    && let Some(dev) = o.device.take()
                {
                    o.stale_devices.push((dev.index, dev.name));
                    o.routes.retain(|r| r.route.dev != Dev::Overlay);
                    o.neighbours.clear();
                    o.fdb.clear();
                }
                o
            };
            let p = plan(&d1, &observe(&k));
            k.apply(&p, &n1);
            let o = observe(&k);
            prop_assert!(plan(&d1, &o).is_empty(), "not converged: {:?}", plan(&d1, &o));
            let routes: BTreeMap<_, _> = o.routes.iter().map(|r| (r.route.dst, r.route)).collect();
            prop_assert_eq!(routes, d1.routes.clone());
            let neighbours: BTreeMap<_, _> =
                o.neighbours.iter().map(|n| (n.ip, n.mac.unwrap())).collect();
            prop_assert_eq!(neighbours, d1.neighbours.clone());
            let fdb: BTreeMap<_, _> = o.fdb.iter().map(|f| (f.mac, f.dst.unwrap())).collect();
            prop_assert_eq!(fdb, d1.fdb.clone());
        }

        /// Removing some objects by hand yields a plan that restores exactly
        /// those and touches nothing else.
        #[test]
        fn drift_plan_touches_only_what_is_missing(
            peers in arb_peers(),
            drop_mask in proptest::collection::vec(any::<(bool, bool, bool)>(), 40),
        ) {
            let cfg = config();
            let d = desired(&peers, &cfg);
            let mut k = Kernel::new(2);
            converge(&mut k, &d, "flannel.1");
            let mut o = k.observe("flannel.1");
            let mut expect = 0;
            for (p, (r, n, f)) in peers.iter().zip(&drop_mask) {
                if *r && o.routes.iter().any(|x| x.route.dst == p.subnet) {
                    o.routes.retain(|x| x.route.dst != p.subnet);
                    expect += 1;
                }
                if *n && o.neighbours.iter().any(|x| x.ip == p.subnet.network()) {
                    o.neighbours.retain(|x| x.ip != p.subnet.network());
                    expect += 1;
                }
                if *f && o.fdb.iter().any(|x| x.mac == p.vtep_mac) {
                    o.fdb.retain(|x| x.mac != p.vtep_mac);
                    expect += 1;
                }
            }
            let p = plan(&d, &o);
            prop_assert_eq!(p.len(), expect);
            prop_assert!(p.route_deletes.is_empty() && p.neighbour_deletes.is_empty() && p.fdb_deletes.is_empty() && p.links.is_empty());
        }
    }
}
