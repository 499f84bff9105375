//! The overlay's I/O shell: dumps the kernel's links, addresses, routes,
//! neighbours and FDB into a [`Snapshot`], and applies a [`Plan`] with
//! rtnetlink. Requests of one phase are pipelined on the one netlink socket
//! (many in flight), never one process exec per object.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::{StreamExt, TryStreamExt, stream};
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use super::diff::{Kind, LinkOp, Plan};
use super::model::{
    Dev, FdbEntry, Mac, Neighbour, ObservedFdb, ObservedRoute, Route, VxlanAttrs, VxlanDevice,
};
use super::snapshot::{
    AddrInfo, FdbInfo, LinkInfo, MAIN_TABLE, NeighInfo, ROUTE_PROTOCOL, RouteInfo, Snapshot,
};

/// How many requests of one phase are in flight at once.
const PIPELINE: usize = 128;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EADDRNOTAVAIL: i32 = 99;

/// A netlink request failed.
#[derive(Debug, thiserror::Error)]
#[error("{step} {object}: {source}")]
pub struct NetlinkError {
    /// What was being done ("dumping routes", "replacing route", ...).
    pub step: &'static str,
    /// The object it concerned.
    pub object: String,
    /// What kind of object (bounded metric label).
    pub category: Category,
    /// The kernel's answer.
    #[source]
    pub source: rtnetlink::Error,
}

/// Bounded error categories for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    /// A dump failed.
    Dump,
    /// The VXLAN device's MTU was refused.
    Mtu,
    /// A change of this kind failed.
    Change(Kind),
}

impl Category {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Dump => "dump",
            Category::Mtu => "mtu",
            Category::Change(kind) => kind.as_str(),
        }
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// Deleting something already gone is success.
fn gone_is_ok(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH | EADDRNOTAVAIL)) => Ok(()),
        other => other,
    }
}

/// What applying a plan did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Changes that failed (the rest were applied).
    pub errors: Vec<NetlinkError>,
}

/// The overlay's netlink client.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Wraps a connection (see [`crate::netns`]).
    pub fn new(handle: Handle) -> Netlink {
        Netlink { handle }
    }

    /// The underlying handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Dumps what the overlay needs to decide: all links, addresses,
    /// main-table routes and neighbours of both families, and bridge FDB
    /// entries.
    pub async fn snapshot(&self) -> Result<Snapshot, NetlinkError> {
        let dump_err = |step: &'static str| {
            move |source| NetlinkError {
                step,
                object: String::new(),
                category: Category::Dump,
                source,
            }
        };
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(dump_err("dumping links"))?;
        let addresses: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(dump_err("dumping addresses"))?;
        let mut routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(dump_err("dumping routes"))?;
        let routes6: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(dump_err("dumping IPv6 routes"))?;
        routes.extend(routes6);
        let mut neighbours: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(dump_err("dumping neighbours"))?;
        let neighbours6: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet6)
            .execute()
            .try_collect()
            .await
            .map_err(dump_err("dumping IPv6 neighbours"))?;
        neighbours.extend(neighbours6);
        let fdb: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(dump_err("dumping the bridge FDB"))?;
        Ok(Snapshot {
            links: links.iter().map(parse_link).collect(),
            addresses: addresses.iter().filter_map(parse_address).collect(),
            routes: routes.iter().filter_map(parse_route).collect(),
            neighbours: neighbours.iter().filter_map(parse_neighbour).collect(),
            fdb: fdb.iter().filter_map(parse_fdb).collect(),
        })
    }

    /// ifindex of the link named `name`, if it exists.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link.map(|l| l.header.index)),
            Err(e) if matches!(errno(&e), Some(19)) => Ok(None), // ENODEV
            Err(source) => Err(NetlinkError {
                step: "looking up link",
                object: name.to_string(),
                category: Category::Dump,
                source,
            }),
        }
    }

    /// Applies `plan` object by object: the device changes in order, then
    /// the route/neighbour/FDB phases, each pipelined. Nothing stops at the
    /// first failure: a refused MTU, a device change or a failed entry is
    /// recorded and the rest is still applied (a new peer's route does not
    /// wait for an MTU the kernel refuses); what depends on a device that
    /// could not be created fails with its own error. The next sync retries
    /// whatever is still missing.
    pub async fn apply(&self, plan: &Plan, device: Option<&str>, underlay_index: u32) -> Applied {
        let mut applied = Applied::default();
        let mut device_index = self.device_index(device, &mut applied.errors).await;
        for op in &plan.links {
            let result = match op {
                LinkOp::Create(d) => self.create_device(d).await,
                other => self
                    .apply_link_op(other, device_index)
                    .await
                    .map_err(|e| vec![e]),
            };
            if let Err(errors) = result {
                applied.errors.extend(errors);
            }
            if matches!(op, LinkOp::Create(_) | LinkOp::Delete { .. }) {
                device_index = self.device_index(device, &mut applied.errors).await;
            }
        }
        let oif = |dev: Dev| match dev {
            Dev::Overlay => device_index,
            Dev::Underlay => Some(underlay_index),
        };
        let missing_device = |object: String, kind: Kind| NetlinkError {
            step: "programming",
            object: format!("{object} (the VXLAN device does not exist)"),
            category: Category::Change(kind),
            source: rtnetlink::Error::RequestFailed,
        };

        // Phase 1: routes out.
        let results = self
            .run_all(plan.route_deletes.iter().map(|r| {
                let this = self.clone();
                let r = *r;
                let index = oif(r.route.dev);
                async move {
                    let Some(index) = index else {
                        return Ok(()); // the device and its routes are gone
                    };
                    this.delete_route(r, index).await
                }
            }))
            .await;
        applied.errors.extend(results);

        // Phase 2: neighbours and FDB out.
        if let Some(index) = device_index {
            let neighs = plan.neighbour_deletes.iter().map(|ip| {
                let this = self.clone();
                let ip = *ip;
                async move { this.delete_neighbour(index, ip).await }
            });
            applied.errors.extend(self.run_all(neighs).await);
            let fdbs = plan.fdb_deletes.iter().map(|f| {
                let this = self.clone();
                let f = *f;
                async move { this.delete_fdb(index, f).await }
            });
            applied.errors.extend(self.run_all(fdbs).await);
        }

        // Phase 3: neighbours and FDB in (before the routes that use them).
        match device_index {
            Some(index) => {
                let neighs = plan.neighbour_sets.iter().map(|n| {
                    let this = self.clone();
                    let n = *n;
                    async move { this.set_neighbour(index, n).await }
                });
                applied.errors.extend(self.run_all(neighs).await);
                let fdbs = plan.fdb_sets.iter().map(|f| {
                    let this = self.clone();
                    let f = *f;
                    async move { this.set_fdb(index, f).await }
                });
                applied.errors.extend(self.run_all(fdbs).await);
            }
            None => {
                for n in &plan.neighbour_sets {
                    applied.errors.push(missing_device(
                        format!("neighbour {}", n.ip),
                        Kind::Neighbour,
                    ));
                }
                for f in &plan.fdb_sets {
                    applied
                        .errors
                        .push(missing_device(format!("fdb {}", f.mac), Kind::Fdb));
                }
            }
        }

        // Phase 4: routes in.
        let routes = plan.route_sets.iter().map(|r| {
            let this = self.clone();
            let r = *r;
            let index = oif(r.dev);
            async move {
                match index {
                    Some(index) => this.set_route(r, index).await,
                    None => Err(missing_device(format!("route {}", r.dst), Kind::Route)),
                }
            }
        });
        applied.errors.extend(self.run_all(routes).await);
        applied
    }

    /// ifindex of the VXLAN device, if there is one; a failed lookup is
    /// recorded (what needs the device then fails on its own).
    async fn device_index(
        &self,
        device: Option<&str>,
        errors: &mut Vec<NetlinkError>,
    ) -> Option<u32> {
        match self.link_index(device?).await {
            Ok(index) => index,
            Err(e) => {
                errors.push(e);
                None
            }
        }
    }

    /// MTU of the link named `name`, if it exists (read after an MTU the
    /// kernel refused, so pods get the MTU the device really has).
    pub async fn link_mtu(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link.map(|l| parse_link(&l).mtu)),
            Err(e) if matches!(errno(&e), Some(19)) => Ok(None), // ENODEV
            Err(source) => Err(NetlinkError {
                step: "looking up link",
                object: name.to_string(),
                category: Category::Dump,
                source,
            }),
        }
    }

    /// Creates the VXLAN device. Kernels differ on an MTU above what the
    /// underlay allows: some refuse the device, newer ones create it with
    /// their own MTU (the underlay's minus the VXLAN overhead) and say
    /// nothing. Either way the device is created, so routes can still be
    /// programmed, and the MTU is then set explicitly, so the refusal is the
    /// kernel's own answer, reported like any refused MTU change.
    async fn create_device(&self, d: &VxlanDevice) -> Result<(), Vec<NetlinkError>> {
        let build = |mtu: Option<u32>| {
            let mut b = LinkVxlan::new(&d.name, d.vni)
                .dev(d.underlay_index)
                .port(d.port)
                .learning(false);
            b = match d.local {
                IpAddr::V4(local) => b.local(local),
                IpAddr::V6(local) => b.local6(local),
            };
            if let Some(mtu) = mtu {
                b = b.mtu(mtu);
            }
            b.address(d.mac.0.to_vec()).up().build()
        };
        let created = match self.handle.link().add(build(Some(d.mtu))).execute().await {
            Ok(()) => Ok(()),
            // Retried without the MTU: if that works, the MTU was the
            // problem and the explicit set below reports it.
            Err(refused) => match self.handle.link().add(build(None)).execute().await {
                Ok(()) => Ok(()),
                Err(_) => Err(NetlinkError {
                    step: "creating VXLAN device",
                    object: d.name.clone(),
                    category: Category::Change(Kind::Link),
                    source: refused,
                }),
            },
        };
        created.map_err(|e| vec![e])?;
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(d.name.clone())
            .execute();
        let link = match links.try_next().await {
            Ok(Some(link)) => parse_link(&link),
            Ok(None) => return Ok(()),
            Err(source) => {
                return Err(vec![NetlinkError {
                    step: "looking up link",
                    object: d.name.clone(),
                    category: Category::Dump,
                    source,
                }]);
            }
        };
        if link.mtu == d.mtu {
            return Ok(());
        }
        self.set_mtu(link.index, d.mtu).await.map_err(|e| vec![e])
    }

    async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|source| NetlinkError {
                step: "setting the VXLAN device's MTU to",
                object: mtu.to_string(),
                category: Category::Mtu,
                source,
            })
    }

    async fn run_all<F>(&self, futures: impl Iterator<Item = F>) -> Vec<NetlinkError>
    where
        F: Future<Output = Result<(), NetlinkError>>,
    {
        stream::iter(futures)
            .buffer_unordered(PIPELINE)
            .filter_map(|r| async move { r.err() })
            .collect()
            .await
    }

    async fn apply_link_op(&self, op: &LinkOp, device: Option<u32>) -> Result<(), NetlinkError> {
        let link_err = |step: &'static str, object: String, kind: Kind| {
            move |source| NetlinkError {
                step,
                object,
                category: Category::Change(kind),
                source,
            }
        };
        let need = |what: &str| {
            device.ok_or_else(|| NetlinkError {
                step: "changing the VXLAN device",
                object: format!("{what}: the device does not exist"),
                category: Category::Change(Kind::Link),
                source: rtnetlink::Error::RequestFailed,
            })
        };
        match op {
            LinkOp::Delete { index, name, .. } => gone_is_ok(
                self.handle.link().del(*index).execute().await,
            )
            .map_err(link_err("deleting link", name.clone(), Kind::Link)),
            // Handled by `create_device` (it needs a fallback).
            LinkOp::Create(d) => self.create_device(d).await.map_err(|mut errors| {
                // create_device always returns at least one error on Err.
                errors.swap_remove(0)
            }),
            LinkOp::SetMac(mac) => {
                let index = need("set MAC")?;
                let msg = LinkUnspec::new_with_index(index)
                    .address(mac.0.to_vec())
                    .build();
                self.handle
                    .link()
                    .set(msg)
                    .execute()
                    .await
                    .map_err(link_err("setting MAC", mac.to_string(), Kind::Link))
            }
            LinkOp::SetMtu(mtu) => self.set_mtu(need("set MTU")?, *mtu).await,
            LinkOp::SetUp => {
                let index = need("set up")?;
                let msg = LinkUnspec::new_with_index(index).up().build();
                self.handle
                    .link()
                    .set(msg)
                    .execute()
                    .await
                    .map_err(link_err("bringing up", index.to_string(), Kind::Link))
            }
            LinkOp::AddAddress(net) => {
                let index = need("add address")?;
                let mut req = self
                    .handle
                    .address()
                    .add(index, net.addr(), net.prefix_len());
                if net.addr().is_ipv6() {
                    // No duplicate address detection: nothing answers it
                    // over the VXLAN device (no flood entry), and a
                    // tentative address could not source host-to-pod
                    // traffic for its first second.
                    req.message_mut()
                        .attributes
                        .push(AddressAttribute::Flags(AddressFlags::Nodad));
                }
                let r = req.execute().await;
                // EEXIST: a concurrent writer already added it.
                match r {
                    Err(e) if errno(&e) == Some(17) => Ok(()),
                    other => other,
                }
                .map_err(link_err(
                    "adding address",
                    net.to_string(),
                    Kind::Address,
                ))
            }
            LinkOp::DeleteAddress(net) => {
                let index = need("delete address")?;
                let msg = address_message(index, *net);
                gone_is_ok(self.handle.address().del(msg).execute().await).map_err(link_err(
                    "deleting address",
                    net.to_string(),
                    Kind::Address,
                ))
            }
        }
    }

    async fn set_route(&self, r: Route, oif: u32) -> Result<(), NetlinkError> {
        let mut msg = route_message(r.dst, Some(r.gateway), oif);
        msg.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
        if r.onlink {
            msg.header.flags |= RouteFlags::Onlink;
        }
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|source| NetlinkError {
                step: "replacing route",
                object: format!("{} via {}", r.dst, r.gateway),
                category: Category::Change(Kind::Route),
                source,
            })
    }

    async fn delete_route(&self, r: ObservedRoute, oif: u32) -> Result<(), NetlinkError> {
        let gateway = Some(r.route.gateway).filter(|g| !g.is_unspecified());
        let mut msg = route_message(r.route.dst, gateway, oif);
        msg.attributes.push(RouteAttribute::Priority(r.priority));
        // Match any protocol/scope/type, like `ip route del`.
        msg.header.protocol = RouteProtocol::Unspec;
        msg.header.scope = RouteScope::NoWhere;
        msg.header.kind = RouteType::Unspec;
        gone_is_ok(self.handle.route().del(msg).execute().await).map_err(|source| NetlinkError {
            step: "deleting route",
            object: format!("{} via {}", r.route.dst, r.route.gateway),
            category: Category::Change(Kind::Route),
            source,
        })
    }

    async fn set_neighbour(&self, index: u32, n: Neighbour) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add(index, n.ip)
            .link_layer_address(&n.mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|source| NetlinkError {
                step: "replacing neighbour",
                object: format!("{} lladdr {}", n.ip, n.mac),
                category: Category::Change(Kind::Neighbour),
                source,
            })
    }

    async fn delete_neighbour(&self, index: u32, ip: IpAddr) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.ifindex = index;
        msg.attributes
            .push(NeighbourAttribute::Destination(neighbour_address(ip)));
        gone_is_ok(self.handle.neighbours().del(msg).execute().await).map_err(|source| {
            NetlinkError {
                step: "deleting neighbour",
                object: ip.to_string(),
                category: Category::Change(Kind::Neighbour),
                source,
            }
        })
    }

    async fn set_fdb(&self, index: u32, f: FdbEntry) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add_bridge(index, &f.mac.0)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .destination(f.dst)
            .replace()
            .execute()
            .await
            .map_err(|source| NetlinkError {
                step: "replacing FDB entry",
                object: format!("{} dst {}", f.mac, f.dst),
                category: Category::Change(Kind::Fdb),
                source,
            })
    }

    async fn delete_fdb(&self, index: u32, f: ObservedFdb) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(f.mac.0.to_vec()));
        if let Some(dst) = f.dst {
            msg.attributes
                .push(NeighbourAttribute::Destination(neighbour_address(dst)));
        }
        gone_is_ok(self.handle.neighbours().del(msg).execute().await).map_err(|source| {
            NetlinkError {
                step: "deleting FDB entry",
                object: format!(
                    "{} dst {}",
                    f.mac,
                    f.dst.map(|d| d.to_string()).unwrap_or_else(|| "-".into())
                ),
                category: Category::Change(Kind::Fdb),
                source,
            }
        })
    }
}

fn address_message(index: u32, net: IpNet) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = match net {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    };
    msg.header.prefix_len = net.prefix_len();
    msg.header.index = index;
    // IPv6 addresses carry only IFA_ADDRESS (IFA_LOCAL is IPv4's).
    if net.addr().is_ipv4() {
        msg.attributes.push(AddressAttribute::Local(net.addr()));
    }
    msg.attributes.push(AddressAttribute::Address(net.addr()));
    msg
}

fn neighbour_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

/// A main-table route message to `dst` out of `oif` (via `gateway`), of
/// `dst`'s family; the caller sets protocol, flags and metric.
fn route_message(dst: IpNet, gateway: Option<IpAddr>, oif: u32) -> RouteMessage {
    match dst {
        IpNet::V4(d) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .output_interface(oif);
            if let Some(IpAddr::V4(g)) = gateway {
                b = b.gateway(g);
            }
            b.build()
        }
        IpNet::V6(d) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .output_interface(oif);
            if let Some(IpAddr::V6(g)) = gateway {
                b = b.gateway(g);
            }
            b.build()
        }
    }
}

/// A link message in plain data.
pub fn parse_link(msg: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        vxlan: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => info.name = n.clone(),
            LinkAttribute::Address(a) => info.mac = Mac::from_slice(a),
            LinkAttribute::Mtu(m) => info.mtu = *m,
            LinkAttribute::LinkInfo(infos) => {
                let is_vxlan = infos
                    .iter()
                    .any(|i| matches!(i, NlLinkInfo::Kind(InfoKind::Vxlan)));
                if is_vxlan {
                    let mut v = VxlanAttrs {
                        vni: 0,
                        port: 0,
                        local: None,
                        underlay_index: None,
                        learning: false,
                    };
                    for i in infos {
                        if let NlLinkInfo::Data(InfoData::Vxlan(attrs)) = i {
                            for a in attrs {
                                match a {
                                    InfoVxlan::Id(id) => v.vni = *id,
                                    InfoVxlan::Port(p) => v.port = *p,
                                    InfoVxlan::Local(ip) => v.local = Some(IpAddr::V4(*ip)),
                                    InfoVxlan::Local6(ip) => v.local = Some(IpAddr::V6(*ip)),
                                    InfoVxlan::Link(l) => v.underlay_index = Some(*l),
                                    InfoVxlan::Learning(l) => v.learning = *l,
                                    _ => {}
                                }
                            }
                        }
                    }
                    info.vxlan = Some(v);
                }
            }
            _ => {}
        }
    }
    info
}

/// An address message in plain data (IPv4 or IPv6).
pub fn parse_address(msg: &AddressMessage) -> Option<AddrInfo> {
    if !matches!(
        msg.header.family,
        AddressFamily::Inet | AddressFamily::Inet6
    ) {
        return None;
    }
    // IFA_LOCAL is the interface's own IPv4 address (IFA_ADDRESS is the
    // peer on point-to-point links); IPv6 has only IFA_ADDRESS.
    let ip = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        })
        .or_else(|| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        })?;
    Some(AddrInfo {
        index: msg.header.index,
        net: IpNet::new(ip, msg.header.prefix_len).ok()?,
    })
}

/// A route message in plain data (IPv4 or IPv6; other families: None).
pub fn parse_route(msg: &RouteMessage) -> Option<RouteInfo> {
    let family = msg.header.address_family;
    if !matches!(family, AddressFamily::Inet | AddressFamily::Inet6)
        || msg.header.flags.contains(RouteFlags::Cloned)
    {
        return None;
    }
    let mut dst = if family == AddressFamily::Inet {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    };
    let mut gateway = None;
    let mut oif = None;
    let mut priority = 0;
    let mut table = u32::from(msg.header.table);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = IpAddr::V4(*ip),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = IpAddr::V6(*ip),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(IpAddr::V4(*ip)),
            RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => gateway = Some(IpAddr::V6(*ip)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => priority = *p,
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    Some(RouteInfo {
        dst: IpNet::new(dst, msg.header.destination_prefix_length).ok()?,
        gateway,
        oif,
        priority,
        table,
        protocol: u8::from(msg.header.protocol),
        onlink: msg.header.flags.contains(RouteFlags::Onlink),
        unicast: msg.header.kind == RouteType::Unicast,
    })
    .filter(|r| r.table == MAIN_TABLE)
}

/// A neighbour message in plain data (IPv4 or IPv6).
pub fn parse_neighbour(msg: &NeighbourMessage) -> Option<NeighInfo> {
    if !matches!(
        msg.header.family,
        AddressFamily::Inet | AddressFamily::Inet6
    ) {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(IpAddr::V4(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                ip = Some(IpAddr::V6(*a))
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = Mac::from_slice(l),
            _ => {}
        }
    }
    Some(NeighInfo {
        index: msg.header.ifindex,
        ip: ip?,
        mac,
        permanent: msg.header.state == NeighbourState::Permanent,
    })
}

/// A bridge FDB message in plain data.
pub fn parse_fdb(msg: &NeighbourMessage) -> Option<FdbInfo> {
    if msg.header.family != AddressFamily::Bridge {
        return None;
    }
    let mut mac = None;
    let mut dst = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                dst = Some(IpAddr::V4(*a))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                dst = Some(IpAddr::V6(*a))
            }
            // In AF_BRIDGE messages the remote address is not typed by
            // family: its length says which it is.
            NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
                dst = match bytes.len() {
                    4 => <[u8; 4]>::try_from(bytes.as_slice())
                        .ok()
                        .map(|b| IpAddr::V4(Ipv4Addr::from(b))),
                    16 => <[u8; 16]>::try_from(bytes.as_slice())
                        .ok()
                        .map(|b| IpAddr::V6(Ipv6Addr::from(b))),
                    _ => None,
                }
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = Mac::from_slice(l),
            _ => {}
        }
    }
    Some(FdbInfo {
        index: msg.header.ifindex,
        mac: mac?,
        dst,
        permanent: msg.header.state == NeighbourState::Permanent,
    })
}
