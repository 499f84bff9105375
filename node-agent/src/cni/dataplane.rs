//! The pod's kernel wiring, with rtnetlink: a veth pair created inside the
//! pod's network namespace with its peer placed in the host namespace; pod
//! side `CNI_IFNAME` with the pod address /32, a link route to 169.254.1.1
//! and the default route via it; host side MAC ee:ee:ee:ee:ee:ee, the
//! attachment's mark as its alias, proxy ARP, forwarding, strict
//! reverse-path filtering and a /32 route to the pod. With an IPv6 address
//! too: pod side the address /128 (no duplicate address detection, so it
//! is usable at once) and `default via fe80::ecee:eeff:feee:eeee`; host
//! side IPv6 on with DAD and router advertisements off and that link-local
//! address configured explicitly (answered by plain neighbour discovery,
//! whatever the node's `addr_gen_mode`), and a /128 route to the pod.
//! Without one, IPv6 stays off on the host veth (the pod could otherwise
//! reach the node over link-local IPv6 past every IPv4 rule).
//! [`inspect`] reads what is there, [`super::ownership::plan_add`] decides,
//! [`add`] applies.
//! Routes are only ever added (never replaced): a route canal did not
//! make is a conflict, not something to overwrite. Every step is
//! idempotent, so a repeated ADD leaves an existing pair (and its MACs) as
//! it is.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::ownership::{AddPlan, Attachment, LinkFacts, RouteFacts};
use super::result::{GATEWAY, GATEWAY_V6, HOST_MAC, Wired};
use super::sandbox::{Sandbox, SandboxError};
use crate::overlay::family::{self, Family};
use crate::overlay::model::Mac;

const ENODEV: i32 = 19;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EEXIST: i32 = 17;

/// The pod's wiring failed.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// A netlink request failed.
    #[error("{step} {object}: {source}")]
    Netlink {
        step: &'static str,
        object: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// A sysctl could not be written.
    #[error("writing {path}: {source}")]
    Sysctl {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The host namespace could not be opened.
    #[error("opening the host network namespace: {0}")]
    HostNetns(#[source] std::io::Error),
    /// The host's netlink connection could not be set up.
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    /// A sysctl inside the container's namespace could not be written.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// Something canal did not make is in the way (CNI code 104).
    #[error("{0}")]
    Conflict(String),
    /// CHECK: the wiring differs from what ADD set up.
    #[error("{}", .0.join("; "))]
    Mismatch(Vec<String>),
}

/// What the pod's wiring is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// CNI_NETNS.
    pub netns: PathBuf,
    /// CNI_IFNAME.
    pub ifname: String,
    /// Host-side veth name.
    pub host_if: String,
    /// The pod's addresses, at most one per family, in the cluster's order.
    pub ips: Vec<IpAddr>,
    /// MTU of both ends.
    pub mtu: u32,
    /// The attachment's mark (the host veth's alias).
    pub mark: String,
}

impl PodSpec {
    /// The pod's IPv6 address, if it gets one.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        })
    }

    /// The pod's IPv4 address, if it gets one.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    }
}

/// What is there before ADD or DEL changes anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The host veth named for the pod.
    pub host: Option<LinkFacts>,
    /// CNI_IFNAME in the container's namespace.
    pub pod: Option<LinkFacts>,
    /// The container namespace's main-table routes.
    pub pod_routes: Vec<RouteFacts>,
}

/// Reads the host veth, the container's interface and its routes.
pub async fn inspect(
    host: &Handle,
    pod: Option<&Handle>,
    host_if: &str,
    ifname: &str,
) -> Result<Facts, DataplaneError> {
    let mut facts = Facts {
        host: link(host, host_if).await?.as_ref().map(link_facts),
        ..Facts::default()
    };
    if let Some(pod) = pod {
        facts.pod = link(pod, ifname).await?.as_ref().map(link_facts);
        facts.pod_routes = routes(pod).await?.iter().map(route_facts).collect();
    }
    Ok(facts)
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

fn nl(
    step: &'static str,
    object: impl Into<String>,
) -> impl FnOnce(rtnetlink::Error) -> DataplaneError {
    let object = object.into();
    move |source| DataplaneError::Netlink {
        step,
        object,
        source,
    }
}

async fn link(h: &Handle, name: &str) -> Result<Option<LinkMessage>, DataplaneError> {
    match h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(l) => Ok(l),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(nl("looking up link", name)(e)),
    }
}

fn mac_of(l: &LinkMessage) -> Option<Mac> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Mac::from_slice(m),
        _ => None,
    })
}

fn mtu_of(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

fn peer_of(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

/// Deletes the link with `index` (the one that was inspected: a link of
/// the same name made since has another index and stays). Gone is success.
pub async fn delete_index(h: &Handle, index: u32, name: &str) -> Result<(), DataplaneError> {
    match h.link().del(index).execute().await {
        Err(e) if !matches!(errno(&e), Some(ENODEV | ENOENT | ESRCH)) => {
            Err(nl("deleting link", name)(e))
        }
        _ => Ok(()),
    }
}

/// The link's addresses of both families, IPv6 link-local excluded (the
/// kernel's, and the host veth's gateway address).
async fn addresses(h: &Handle, index: u32) -> Result<Vec<(IpAddr, u8)>, DataplaneError> {
    let msgs: Vec<AddressMessage> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing addresses of", index.to_string()))?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.index == index)
        .filter_map(|m| {
            let ip = match m.header.family {
                AddressFamily::Inet => m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip @ IpAddr::V4(_)) => Some(*ip),
                    _ => None,
                }),
                AddressFamily::Inet6 => m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip @ IpAddr::V6(_)) => Some(*ip),
                    _ => None,
                }),
                _ => None,
            }?;
            (!family::is_link_local(ip)).then_some((ip, m.header.prefix_len))
        })
        .collect())
}

/// Whether the link has `ip` (any prefix, link-local included).
async fn has_address(h: &Handle, index: u32, ip: IpAddr) -> Result<bool, DataplaneError> {
    let msgs: Vec<AddressMessage> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing addresses of", index.to_string()))?;
    Ok(msgs.iter().any(|m| {
        m.header.index == index
            && m.attributes.iter().any(|a| {
                matches!(a, AddressAttribute::Address(a) | AddressAttribute::Local(a) if *a == ip)
            })
    }))
}

/// The routes of both families in the main table (not the kernel's local
/// table).
async fn routes(h: &Handle) -> Result<Vec<RouteMessage>, DataplaneError> {
    let mut all: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing routes", ""))?;
    let v6: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing IPv6 routes", ""))?;
    all.extend(v6);
    Ok(all
        .into_iter()
        .filter(|r| {
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(r.header.table));
            table == u32::from(RouteHeader::RT_TABLE_MAIN)
        })
        .collect())
}

fn route_facts(r: &RouteMessage) -> RouteFacts {
    let (dst, prefix, gateway, oif) = route_fields(r);
    RouteFacts {
        family: if r.header.address_family == AddressFamily::Inet6 {
            Family::V6
        } else {
            Family::V4
        },
        dst,
        prefix,
        gateway,
        oif,
    }
}

fn link_facts(l: &LinkMessage) -> LinkFacts {
    let mut facts = LinkFacts {
        index: l.header.index,
        peer: peer_of(l),
        ..LinkFacts::default()
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfAlias(alias) => facts.alias = Some(alias.clone()),
            LinkAttribute::LinkInfo(infos) => {
                facts.is_veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            _ => {}
        }
    }
    facts
}

fn route_fields(r: &RouteMessage) -> (Option<IpAddr>, u8, Option<IpAddr>, Option<u32>) {
    let mut dst = None;
    let mut gw = None;
    let mut oif = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = Some(IpAddr::V6(*ip)),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gw = Some(IpAddr::V4(*ip)),
            RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => gw = Some(IpAddr::V6(*ip)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    (dst, r.header.destination_prefix_length, gw, oif)
}

fn write_sysctl(path: &str, value: &str) -> Result<(), DataplaneError> {
    std::fs::write(path, value).map_err(|source| DataplaneError::Sysctl {
        path: PathBuf::from(path),
        source,
    })
}

/// For GC: the link named `host_if` (or, without a name, the one the
/// node's route to `ip` leaves through) with its name, and the node's
/// routes.
pub async fn gc_candidate(
    host: &Handle,
    host_if: Option<&str>,
    ip: IpAddr,
) -> Result<(Option<(String, LinkFacts)>, Vec<RouteFacts>), DataplaneError> {
    let routes: Vec<RouteFacts> = routes(host).await?.iter().map(route_facts).collect();
    let link = match host_if {
        Some(name) => link(host, name).await?,
        None => match routes
            .iter()
            .find(|r| r.dst == Some(ip) && r.is_host_route())
            .and_then(|r| r.oif)
        {
            Some(index) => match host
                .link()
                .get()
                .match_index(index)
                .execute()
                .try_next()
                .await
            {
                Ok(l) => l,
                Err(e) if errno(&e) == Some(ENODEV) => None,
                Err(e) => return Err(nl("looking up link", index.to_string())(e)),
            },
            None => None,
        },
    };
    let named = link.map(|l| {
        let name = l
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
            .unwrap_or_default();
        (name, link_facts(&l))
    });
    Ok((named, routes))
}

fn ipv6_sysctl(host_if: &str) -> String {
    format!("/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6")
}

fn ipv6_conf(host_if: &str, key: &str) -> String {
    format!("/proc/sys/net/ipv6/conf/{host_if}/{key}")
}

fn read_sysctl(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Adds `route` unless the same destination is routed already: on `oif`
/// that is done; elsewhere it is a conflict, never replaced.
async fn ensure_route(
    h: &Handle,
    dst: IpAddr,
    prefix: u8,
    oif: u32,
    route: RouteMessage,
    what: &str,
) -> Result<(), DataplaneError> {
    let family = Family::of_addr(&dst);
    let existing = |rs: &[RouteMessage]| {
        rs.iter()
            .map(route_facts)
            .filter(|r| {
                r.family == family && r.prefix == prefix && (prefix == 0 || r.dst == Some(dst))
            })
            .collect::<Vec<_>>()
    };
    let conflict = |found: &[RouteFacts]| {
        found.iter().find(|r| r.oif != Some(oif)).map(|r| {
            DataplaneError::Conflict(format!(
                "{what} exists already via {} (interface #{})",
                r.gateway
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "a link".into()),
                r.oif.unwrap_or_default()
            ))
        })
    };
    let found = existing(&routes(h).await?);
    if let Some(e) = conflict(&found) {
        return Err(e);
    }
    if !found.is_empty() {
        return Ok(());
    }
    match h.route().add(route).execute().await {
        Err(e) if errno(&e) == Some(EEXIST) => {
            // Made meanwhile by someone else, or the kernel's view differs.
            let found = existing(&routes(h).await?);
            conflict(&found).map_or(Ok(()), Err)
        }
        Err(e) => Err(nl("adding route", what)(e)),
        Ok(()) => Ok(()),
    }
}

/// A host route message `ip/32` (`/128`) out of `oif`.
fn host_route(ip: IpAddr, oif: u32) -> RouteMessage {
    match ip {
        IpAddr::V4(v4) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(v4, 32)
            .output_interface(oif)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Boot)
            .build(),
        IpAddr::V6(v6) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(v6, 128)
            .output_interface(oif)
            .protocol(RouteProtocol::Boot)
            .build(),
    }
}

fn address_message(index: u32, ip: IpAddr, prefix: u8) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.prefix_len = prefix;
    msg.header.index = index;
    match ip {
        IpAddr::V4(_) => {
            msg.header.family = AddressFamily::Inet;
            msg.attributes.push(AddressAttribute::Local(ip));
        }
        IpAddr::V6(_) => msg.header.family = AddressFamily::Inet6,
    }
    msg.attributes.push(AddressAttribute::Address(ip));
    msg
}

/// Adds `ip/prefix` to the link (IPv6 without duplicate address detection:
/// a tentative address would hold the pod's first packets back); already
/// there is success.
async fn ensure_address(
    h: &Handle,
    index: u32,
    ip: IpAddr,
    prefix: u8,
    what: &str,
) -> Result<(), DataplaneError> {
    let mut req = h.address().add(index, ip, prefix);
    if ip.is_ipv6() {
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    match req.execute().await {
        Err(e) if errno(&e) != Some(EEXIST) => Err(nl("adding address", what)(e)),
        _ => Ok(()),
    }
}

/// Creates or completes the pod's wiring as `plan` says and returns what
/// it is. The caller took the attachment's locks and inspected first.
pub async fn add(
    host: &Handle,
    pod: &Sandbox,
    spec: &PodSpec,
    plan: &AddPlan,
) -> Result<Wired, DataplaneError> {
    match plan {
        AddPlan::Refuse(r) => return Err(DataplaneError::Conflict(r.describe().1)),
        AddPlan::Keep { .. } => {}
        AddPlan::Replace { stale } => {
            eprintln!(
                "canal-cni: replacing {} (#{stale}), left by another sandbox of this pod",
                spec.host_if
            );
            delete_index(host, *stale, &spec.host_if).await?;
            create_pair(&pod.handle, spec).await?;
        }
        AddPlan::Create => create_pair(&pod.handle, spec).await?,
    }
    let v6 = spec.ipv6();

    // Host side. Sysctls first, so the veth is never up without them.
    let conf = format!("/proc/sys/net/ipv4/conf/{}", spec.host_if);
    // rp_filter=1: the host accepts from the pod only sources routed back
    // into this veth, i.e. the pod's own /32.
    for (key, value) in [("proxy_arp", "1"), ("forwarding", "1"), ("rp_filter", "1")] {
        write_sysctl(&format!("{conf}/{key}"), value)?;
    }
    write_sysctl(
        &format!("/proc/sys/net/ipv4/neigh/{}/proxy_delay", spec.host_if),
        "0",
    )?;
    let ipv6 = ipv6_sysctl(&spec.host_if);
    if v6.is_some() {
        // DAD and RA off before IPv6 comes on, so the gateway address is
        // never tentative and the node never configures itself from the
        // pod; forwarding=1 makes the node answer as the pod's router.
        for (key, value) in [("accept_dad", "0"), ("accept_ra", "0"), ("forwarding", "1")] {
            write_sysctl(&ipv6_conf(&spec.host_if, key), value)?;
        }
        write_sysctl(&ipv6, "0")?;
    } else if Path::new(&ipv6).exists() {
        // No IPv6 for this pod: without this the veth has an IPv6
        // link-local address, and the pod reaches the node (and, with IPv6
        // forwarding on, beyond) from addresses canal never gave it, past
        // every IPv4 rule. A kernel without IPv6 has no such file.
        write_sysctl(&ipv6, "1")?;
    }
    let host_link = link(host, &spec.host_if)
        .await?
        .ok_or_else(|| DataplaneError::Mismatch(vec![format!("{} vanished", spec.host_if)]))?;
    let host_index = host_link.header.index;
    let mut set = LinkUnspec::new_with_index(host_index).up();
    if link_facts(&host_link).alias.as_deref() != Some(spec.mark.as_str()) {
        set = set.alias(spec.mark.clone());
    }
    if mac_of(&host_link) != Some(HOST_MAC) {
        set = set.address(HOST_MAC.0.to_vec());
    }
    if mtu_of(&host_link) != Some(spec.mtu) {
        set = set.mtu(spec.mtu);
    }
    host.link()
        .set(set.build())
        .execute()
        .await
        .map_err(nl("configuring", spec.host_if.clone()))?;
    if read_sysctl("/proc/sys/net/ipv4/conf/all/rp_filter") == "2" {
        // The kernel uses max(all, interface): loose mode wins.
        eprintln!(
            "canal-cni: net.ipv4.conf.all.rp_filter is 2 (loose) on this node, which weakens the strict check on {}; canal's own source checks still apply",
            spec.host_if
        );
    }
    if v6.is_some() {
        ensure_address(
            host,
            host_index,
            IpAddr::V6(GATEWAY_V6),
            64,
            &format!("{GATEWAY_V6} on {}", spec.host_if),
        )
        .await?;
    }
    for ip in &spec.ips {
        let prefix = Family::of_addr(ip).host_prefix();
        ensure_route(
            host,
            *ip,
            prefix,
            host_index,
            host_route(*ip, host_index),
            &format!("the node's route to {ip}"),
        )
        .await?;
    }
    // Routes into this veth for other addresses are this attachment's own
    // leftovers (an address it had before, or IPv6 it no longer gets): they go.
    for r in routes(host).await? {
        let f = route_facts(&r);
        let stale = f.oif == Some(host_index)
            && f.is_host_route()
            && f.dst
                .is_some_and(|d| !spec.ips.contains(&d) && !family::is_link_local(d));
        if stale {
            match host.route().del(r).execute().await {
                Err(e) if !matches!(errno(&e), Some(ESRCH | ENOENT)) => {
                    return Err(nl("removing stale route", format!("{:?}", f.dst))(e));
                }
                _ => {}
            }
        }
    }

    // Pod side.
    let h = &pod.handle;
    let pod_link = link(h, &spec.ifname)
        .await?
        .ok_or_else(|| DataplaneError::Mismatch(vec![format!("{} vanished", spec.ifname)]))?;
    let pod_index = pod_link.header.index;
    if v6.is_some() {
        // Before the link is up: no DAD for its link-local address either,
        // and IPv6 on even where the runtime's namespace has it off.
        let conf = format!("net/ipv6/conf/{}", spec.ifname);
        pod.sysctl(&format!("{conf}/accept_dad"), "0")?;
        pod.sysctl(&format!("{conf}/disable_ipv6"), "0")?;
    }
    let mut set = LinkUnspec::new_with_index(pod_index).up();
    if mtu_of(&pod_link) != Some(spec.mtu) {
        set = set.mtu(spec.mtu);
    }
    h.link()
        .set(set.build())
        .execute()
        .await
        .map_err(nl("configuring", spec.ifname.clone()))?;
    // The interface is canal's (plan_add checked): other addresses on it
    // are its own stale ones.
    let wanted: Vec<(IpAddr, u8)> = spec
        .ips
        .iter()
        .map(|ip| (*ip, Family::of_addr(ip).host_prefix()))
        .collect();
    let present = addresses(h, pod_index).await?;
    for (ip, prefix) in &present {
        if !wanted.contains(&(*ip, *prefix)) {
            h.address()
                .del(address_message(pod_index, *ip, *prefix))
                .execute()
                .await
                .map_err(nl("removing stale address", ip.to_string()))?;
        }
    }
    for (ip, prefix) in &wanted {
        if !present.contains(&(*ip, *prefix)) {
            ensure_address(h, pod_index, *ip, *prefix, &ip.to_string()).await?;
        }
    }
    if spec.ipv4().is_some() {
        let gateway_route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(GATEWAY, 32)
            .output_interface(pod_index)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Boot)
            .build();
        ensure_route(
            h,
            IpAddr::V4(GATEWAY),
            32,
            pod_index,
            gateway_route,
            &format!("the container's route to {GATEWAY}"),
        )
        .await?;
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(GATEWAY)
            .output_interface(pod_index)
            .protocol(RouteProtocol::Boot)
            .build();
        ensure_route(
            h,
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            0,
            pod_index,
            default,
            "the container's default route",
        )
        .await?;
    }
    if v6.is_some() {
        let default = RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(GATEWAY_V6)
            .output_interface(pod_index)
            .protocol(RouteProtocol::Boot)
            .build();
        ensure_route(
            h,
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            0,
            pod_index,
            default,
            "the container's IPv6 default route",
        )
        .await?;
    } else {
        // A pod that had IPv6 and no longer gets it: its IPv6 default route
        // (canal's, on canal's interface) goes with the address.
        for r in routes(h).await? {
            let f = route_facts(&r);
            if f.family == Family::V6 && f.prefix == 0 && f.oif == Some(pod_index) {
                match h.route().del(r).execute().await {
                    Err(e) if !matches!(errno(&e), Some(ESRCH | ENOENT)) => {
                        return Err(nl("removing the IPv6 default route", "")(e));
                    }
                    _ => {}
                }
            }
        }
    }

    let pod_mac = mac_of(&pod_link).unwrap_or_default();
    Ok(Wired {
        host_if: spec.host_if.clone(),
        host_mac: HOST_MAC,
        ifname: spec.ifname.clone(),
        pod_mac,
        sandbox: spec.netns.display().to_string(),
        ips: spec.ips.clone(),
        mtu: spec.mtu,
    })
}

async fn create_pair(pod: &Handle, spec: &PodSpec) -> Result<(), DataplaneError> {
    let host_ns = std::fs::File::open("/proc/self/ns/net").map_err(DataplaneError::HostNetns)?;
    let peer = LinkUnspec::new_with_name(&spec.host_if)
        .mtu(spec.mtu)
        .address(HOST_MAC.0.to_vec())
        .setns_by_fd(std::os::fd::AsRawFd::as_raw_fd(&host_ns))
        .build();
    let msg = LinkVeth::new(&spec.ifname, &spec.host_if)
        .mtu(spec.mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    pod.link().add(msg).execute().await.map_err(nl(
        "creating veth",
        format!("{}/{}", spec.ifname, spec.host_if),
    ))
}

/// Verifies the wiring ADD made; every difference is listed.
pub async fn check(
    host: &Handle,
    pod: &Sandbox,
    spec: &PodSpec,
    me: &Attachment<'_>,
) -> Result<(), DataplaneError> {
    let mut problems = Vec::new();
    let host_link = link(host, &spec.host_if).await?;
    let pod_link = link(&pod.handle, &spec.ifname).await?;
    let v6 = spec.ipv6();
    match &host_link {
        None => problems.push(format!("host interface {} is missing", spec.host_if)),
        Some(h) => {
            let facts = link_facts(h);
            let pod_facts = pod_link.as_ref().map(link_facts);
            if !super::ownership::owns(me, &facts, pod_facts.as_ref()) {
                problems.push(format!(
                    "host interface {} is not this container's (alias {:?})",
                    spec.host_if,
                    facts.alias.unwrap_or_default()
                ));
            }
            if mac_of(h) != Some(HOST_MAC) {
                problems.push(format!("{} MAC is not {HOST_MAC}", spec.host_if));
            }
            if !h.header.flags.contains(LinkFlags::Up) {
                problems.push(format!("{} is down", spec.host_if));
            }
            let conf = format!("/proc/sys/net/ipv4/conf/{}", spec.host_if);
            for key in ["proxy_arp", "rp_filter"] {
                if read_sysctl(&format!("{conf}/{key}")) != "1" {
                    problems.push(format!("{key} is not 1 on {}", spec.host_if));
                }
            }
            let ipv6 = ipv6_sysctl(&spec.host_if);
            match v6 {
                None if Path::new(&ipv6).exists() && read_sysctl(&ipv6) != "1" => {
                    problems.push(format!("IPv6 is not disabled on {}", spec.host_if));
                }
                Some(_) if read_sysctl(&ipv6) != "0" => {
                    problems.push(format!("IPv6 is not enabled on {}", spec.host_if));
                }
                Some(_) if !has_address(host, h.header.index, IpAddr::V6(GATEWAY_V6)).await? => {
                    problems.push(format!("{} lacks the gateway {GATEWAY_V6}", spec.host_if));
                }
                _ => {}
            }
            let host_routes = routes(host).await?;
            for ip in &spec.ips {
                let prefix = Family::of_addr(ip).host_prefix();
                let has = host_routes
                    .iter()
                    .any(|r| route_fields(r) == (Some(*ip), prefix, None, Some(h.header.index)));
                if !has {
                    problems.push(format!(
                        "host route {ip}/{prefix} dev {} is missing",
                        spec.host_if
                    ));
                }
            }
        }
    }
    match &pod_link {
        None => problems.push(format!("pod interface {} is missing", spec.ifname)),
        Some(p) => {
            let index = p.header.index;
            if let Some(h) = &host_link
                && peer_of(p) != Some(h.header.index)
            {
                problems.push(format!(
                    "{} is not paired with {}",
                    spec.ifname, spec.host_if
                ));
            }
            if !p.header.flags.contains(LinkFlags::Up) {
                problems.push(format!("{} is down", spec.ifname));
            }
            if mtu_of(p) != Some(spec.mtu) {
                problems.push(format!("{} MTU is not {}", spec.ifname, spec.mtu));
            }
            let present = addresses(&pod.handle, index).await?;
            for ip in &spec.ips {
                let prefix = Family::of_addr(ip).host_prefix();
                if !present.contains(&(*ip, prefix)) {
                    problems.push(format!("{} lacks {ip}/{prefix}", spec.ifname));
                }
            }
            let pod_routes = routes(&pod.handle).await?;
            let fields: Vec<_> = pod_routes.iter().map(route_fields).collect();
            if spec.ipv4().is_some() {
                let gw = IpAddr::V4(GATEWAY);
                if !fields.contains(&(Some(gw), 32, None, Some(index))) {
                    problems.push(format!("route {GATEWAY} dev {} is missing", spec.ifname));
                }
                if !fields.contains(&(None, 0, Some(gw), Some(index))) {
                    problems.push(format!("default route via {GATEWAY} is missing"));
                }
            }
            if v6.is_some()
                && !fields.contains(&(None, 0, Some(IpAddr::V6(GATEWAY_V6)), Some(index)))
            {
                problems.push(format!("IPv6 default route via {GATEWAY_V6} is missing"));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(DataplaneError::Mismatch(problems))
    }
}
