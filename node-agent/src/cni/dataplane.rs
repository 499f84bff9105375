//! The pod's kernel wiring, with rtnetlink: a veth pair created inside the
//! pod's network namespace with its peer placed in the host namespace; pod
//! side `CNI_IFNAME` with the pod address /32, a link route to 169.254.1.1
//! and the default route via it; host side MAC ee:ee:ee:ee:ee:ee, proxy ARP,
//! forwarding and a /32 route to the pod. Every step is idempotent, so a
//! repeated ADD leaves an existing pair (and its MACs) as it is.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::result::{GATEWAY, HOST_MAC, Wired};
use crate::overlay::model::Mac;

const ENODEV: i32 = 19;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EEXIST: i32 = 17;

/// The pod's wiring failed.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The network namespace does not exist.
    #[error("network namespace {path} does not exist")]
    NoNetns { path: PathBuf },
    /// The network namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
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
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// MTU of both ends.
    pub mtu: u32,
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

/// A handle inside the pod's namespace; a missing namespace is reported as
/// such (CNI code 3 on ADD, success on DEL).
pub fn pod_handle(netns: &Path) -> Result<Handle, DataplaneError> {
    if !netns.exists() {
        return Err(DataplaneError::NoNetns {
            path: netns.to_path_buf(),
        });
    }
    crate::netns::handle_in(netns).map_err(|e| match e {
        crate::netns::NetnsError::Open { path, source }
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            DataplaneError::NoNetns { path }
        }
        other => DataplaneError::Netns(other),
    })
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

async fn delete_link(h: &Handle, name: &str) -> Result<(), DataplaneError> {
    if let Some(l) = link(h, name).await? {
        match h.link().del(l.header.index).execute().await {
            Err(e) if !matches!(errno(&e), Some(ENODEV | ENOENT)) => {
                return Err(nl("deleting link", name)(e));
            }
            _ => {}
        }
    }
    Ok(())
}

async fn ipv4_addresses(h: &Handle, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, DataplaneError> {
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
        .filter(|m| m.header.family == AddressFamily::Inet && m.header.index == index)
        .filter_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some((*ip, m.header.prefix_len)),
                _ => None,
            })
        })
        .collect())
}

async fn routes(h: &Handle) -> Result<Vec<RouteMessage>, DataplaneError> {
    h.route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing routes", ""))
}

fn route_fields(r: &RouteMessage) -> (Option<Ipv4Addr>, u8, Option<Ipv4Addr>, Option<u32>) {
    let mut dst = None;
    let mut gw = None;
    let mut oif = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gw = Some(*ip),
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

/// Creates or completes the pod's wiring and returns what it is.
pub async fn add(host: &Handle, pod: &Handle, spec: &PodSpec) -> Result<Wired, DataplaneError> {
    let host_link = link(host, &spec.host_if).await?;
    let pod_link = link(pod, &spec.ifname).await?;
    let paired = match (&host_link, &pod_link) {
        (Some(h), Some(p)) => peer_of(p) == Some(h.header.index),
        _ => false,
    };
    if !paired {
        // A leftover of an earlier sandbox of the same pod (the name is
        // deterministic) or a half-made pair: start clean.
        delete_link(host, &spec.host_if).await?;
        delete_link(pod, &spec.ifname).await?;
        let host_ns =
            std::fs::File::open("/proc/self/ns/net").map_err(DataplaneError::HostNetns)?;
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
        ))?;
        drop(host_ns);
    }

    // Host side.
    let host_link = link(host, &spec.host_if)
        .await?
        .ok_or_else(|| DataplaneError::Mismatch(vec![format!("{} vanished", spec.host_if)]))?;
    let host_index = host_link.header.index;
    let mut set = LinkUnspec::new_with_index(host_index).up();
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
    let conf = format!("/proc/sys/net/ipv4/conf/{}", spec.host_if);
    write_sysctl(&format!("{conf}/proxy_arp"), "1")?;
    write_sysctl(&format!("{conf}/forwarding"), "1")?;
    write_sysctl(
        &format!("/proc/sys/net/ipv4/neigh/{}/proxy_delay", spec.host_if),
        "0",
    )?;
    let to_pod = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(spec.ip, 32)
        .output_interface(host_index)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::Boot)
        .build();
    host.route()
        .add(to_pod)
        .replace()
        .execute()
        .await
        .map_err(nl("adding host route to", spec.ip.to_string()))?;

    // Pod side.
    let pod_link = link(pod, &spec.ifname)
        .await?
        .ok_or_else(|| DataplaneError::Mismatch(vec![format!("{} vanished", spec.ifname)]))?;
    let pod_index = pod_link.header.index;
    let mut set = LinkUnspec::new_with_index(pod_index).up();
    if mtu_of(&pod_link) != Some(spec.mtu) {
        set = set.mtu(spec.mtu);
    }
    pod.link()
        .set(set.build())
        .execute()
        .await
        .map_err(nl("configuring", spec.ifname.clone()))?;
    let addresses = ipv4_addresses(pod, pod_index).await?;
    for (ip, prefix) in &addresses {
        if (*ip, *prefix) != (spec.ip, 32) {
            let mut msg = AddressMessage::default();
            msg.header.family = AddressFamily::Inet;
            msg.header.prefix_len = *prefix;
            msg.header.index = pod_index;
            msg.attributes
                .push(AddressAttribute::Local(IpAddr::V4(*ip)));
            msg.attributes
                .push(AddressAttribute::Address(IpAddr::V4(*ip)));
            pod.address()
                .del(msg)
                .execute()
                .await
                .map_err(nl("removing stale address", ip.to_string()))?;
        }
    }
    if !addresses.contains(&(spec.ip, 32)) {
        match pod
            .address()
            .add(pod_index, IpAddr::V4(spec.ip), 32)
            .execute()
            .await
        {
            Err(e) if errno(&e) != Some(EEXIST) => {
                return Err(nl("adding address", spec.ip.to_string())(e));
            }
            _ => {}
        }
    }
    let gateway_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(GATEWAY, 32)
        .output_interface(pod_index)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::Boot)
        .build();
    pod.route()
        .add(gateway_route)
        .replace()
        .execute()
        .await
        .map_err(nl("adding route to", GATEWAY.to_string()))?;
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(GATEWAY)
        .output_interface(pod_index)
        .protocol(RouteProtocol::Boot)
        .build();
    pod.route()
        .add(default)
        .replace()
        .execute()
        .await
        .map_err(nl("adding default route via", GATEWAY.to_string()))?;

    let pod_mac = mac_of(&pod_link).unwrap_or_default();
    Ok(Wired {
        host_if: spec.host_if.clone(),
        host_mac: HOST_MAC,
        ifname: spec.ifname.clone(),
        pod_mac,
        sandbox: spec.netns.display().to_string(),
        ip: spec.ip,
        mtu: spec.mtu,
    })
}

/// Removes the pod's interface (and with it the pair). Gone is success.
pub async fn del(
    host: &Handle,
    pod: Option<&Handle>,
    ifname: &str,
    host_if: Option<&str>,
) -> Result<(), DataplaneError> {
    if let Some(pod) = pod {
        delete_link(pod, ifname).await?;
    }
    if let Some(host_if) = host_if {
        match delete_link(host, host_if).await {
            Err(DataplaneError::Netlink { source, .. })
                if matches!(errno(&source), Some(ENODEV | ENOENT | ESRCH)) => {}
            other => other?,
        }
    }
    Ok(())
}

/// Verifies the wiring ADD made; every difference is listed.
pub async fn check(host: &Handle, pod: &Handle, spec: &PodSpec) -> Result<(), DataplaneError> {
    let mut problems = Vec::new();
    let host_link = link(host, &spec.host_if).await?;
    let pod_link = link(pod, &spec.ifname).await?;
    match &host_link {
        None => problems.push(format!("host interface {} is missing", spec.host_if)),
        Some(h) => {
            if mac_of(h) != Some(HOST_MAC) {
                problems.push(format!("{} MAC is not {HOST_MAC}", spec.host_if));
            }
            if !h.header.flags.contains(LinkFlags::Up) {
                problems.push(format!("{} is down", spec.host_if));
            }
            let proxy_arp = std::fs::read_to_string(format!(
                "/proc/sys/net/ipv4/conf/{}/proxy_arp",
                spec.host_if
            ))
            .unwrap_or_default();
            if proxy_arp.trim() != "1" {
                problems.push(format!("proxy_arp is off on {}", spec.host_if));
            }
            let host_routes = routes(host).await?;
            let has = host_routes
                .iter()
                .any(|r| route_fields(r) == (Some(spec.ip), 32, None, Some(h.header.index)));
            if !has {
                problems.push(format!(
                    "host route {}/32 dev {} is missing",
                    spec.ip, spec.host_if
                ));
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
            if !ipv4_addresses(pod, index).await?.contains(&(spec.ip, 32)) {
                problems.push(format!("{} lacks {}/32", spec.ifname, spec.ip));
            }
            let pod_routes = routes(pod).await?;
            let fields: Vec<_> = pod_routes.iter().map(route_fields).collect();
            if !fields.contains(&(Some(GATEWAY), 32, None, Some(index))) {
                problems.push(format!("route {GATEWAY} dev {} is missing", spec.ifname));
            }
            if !fields.contains(&(None, 0, Some(GATEWAY), Some(index))) {
                problems.push(format!("default route via {GATEWAY} is missing"));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(DataplaneError::Mismatch(problems))
    }
}
