//! Node addresses and the overlay: which address a Node publishes as
//! flannel's `public-ip` (where every other node sends its pod traffic),
//! and which Node addresses collide with the pod range. Pure.
//!
//! Rules, and why:
//! - The overlay address follows the Node (its InternalIP, or the
//!   `public-ip-overwrite` annotation), because a real node can change its
//!   address (DHCP, a VM moved) and holding the change back would cut its
//!   pods off. But it never moves silently: the move is an Event on the
//!   Node naming the field manager that wrote the new address, and the
//!   previous address and the time stay on the Node as annotations
//!   ([`PREVIOUS_PUBLIC_IP`], [`PUBLIC_IP_CHANGED_AT`]).
//! - An address that can never be right is refused, and the Node keeps the
//!   address it had (a conflict on the CanalNetwork names it): an address
//!   of another Node (its InternalIP, ExternalIP or overlay address: that
//!   is how one node's traffic is pulled to another), one inside
//!   clusterCIDR (routed into the overlay itself), loopback, link-local,
//!   multicast and the like, and text that is no IPv4 address. Of two
//!   Nodes that have one address, the one publishing it keeps it, else the
//!   older. Two Nodes that swap addresses both move (a Node that no longer
//!   has an address claims nothing).
//! - Any Node address (InternalIP or ExternalIP) inside clusterCIDR is a
//!   conflict, and the subnet holding it is never allocated (a pod there
//!   could be given the node's own address).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use canal_crds::annotations;
use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::jiff::Timestamp;

use crate::ipam::Allocator;
use crate::node_view::NodeView;

/// The overlay address a Node published before its last move.
pub const PREVIOUS_PUBLIC_IP: &str = "canal.dev/previous-public-ip";
/// When the overlay address last moved (RFC 3339).
pub const PUBLIC_IP_CHANGED_AT: &str = "canal.dev/public-ip-changed-at";

type AgeKey = (Option<Timestamp>, String);

/// Where a Node's wanted overlay address comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// status.addresses InternalIP (the kubelet's).
    InternalIp,
    /// The `public-ip-overwrite` annotation (anyone who may annotate Nodes).
    Overwrite,
}

impl Source {
    fn describe(self) -> &'static str {
        match self {
            Source::InternalIp => "InternalIP",
            Source::Overwrite => "public-ip-overwrite annotation",
        }
    }
}

/// The overlay address a Node asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    /// No InternalIP and no overwrite.
    Nothing,
    /// An IPv4 address.
    Address(Ipv4Addr, Source),
    /// An overwrite that is no IPv4 address.
    Unparsable(String),
}

/// What the Node asks for: the overwrite when non-empty, else the InternalIP
/// (flannel's rule).
pub fn wanted(node: &NodeView) -> Wanted {
    let overwrite = node
        .annotations
        .get(annotations::PUBLIC_IP_OVERWRITE)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty());
    match overwrite {
        Some(text) => match text.parse::<Ipv4Addr>() {
            Ok(ip) => Wanted::Address(ip, Source::Overwrite),
            Err(_) => Wanted::Unparsable(text.to_string()),
        },
        None => match node.internal_ip {
            Some(ip) => Wanted::Address(ip, Source::InternalIp),
            None => Wanted::Nothing,
        },
    }
}

/// Why `ip` can never carry the overlay of a cluster using `cluster`.
pub fn unusable(ip: Ipv4Addr, cluster: Ipv4Net) -> Option<String> {
    if cluster.contains(&ip) {
        return Some(format!(
            "lies inside clusterCIDR {cluster}, which is routed into the overlay itself"
        ));
    }
    canal_crds::validate::reserved_overlap(ipnet::IpNet::from(std::net::IpAddr::V4(ip))).map(|r| {
        format!(
            "is a {} address ({}), which no other node can reach",
            r.what, r.cidr
        )
    })
}

/// Every address of every Node, both families (InternalIP, ExternalIP and
/// the overlay address it asks for), to settle claims between Nodes and
/// hold back subnets.
#[derive(Debug, Default)]
pub struct AddressIndex {
    /// Address -> the Nodes that have it, oldest first.
    addresses: BTreeMap<IpAddr, BTreeSet<AgeKey>>,
    of_node: HashMap<String, (AgeKey, Vec<IpAddr>)>,
}

/// What [`AddressIndex::update`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// Other Nodes sharing an address with the Node: their claim may be
    /// settled differently now.
    pub others: Vec<AgeKey>,
    /// The set of Node addresses changed (held-back subnets need a look).
    pub addresses_changed: bool,
}

impl AddressIndex {
    /// Records the Node `name` as `node` now shows it (None: deleted).
    /// `before` is how it was (None: new).
    pub fn update(
        &mut self,
        name: &str,
        before: Option<&NodeView>,
        node: Option<&NodeView>,
    ) -> Update {
        let mut out = Update::default();
        let mut new_addrs: Vec<IpAddr> = node
            .map(|n| {
                n.ipv4_addresses()
                    .into_iter()
                    .map(|(_, ip)| IpAddr::V4(ip))
                    .chain(n.addresses_v6.iter().map(|ip| IpAddr::V6(*ip)))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(Wanted::Address(ip, _)) = node.map(wanted)
            && !new_addrs.contains(&IpAddr::V4(ip))
        {
            new_addrs.push(IpAddr::V4(ip));
        }
        if let Some(ip) = node.and_then(super::addresses6::wanted_v6)
            && !new_addrs.contains(&IpAddr::V6(ip))
        {
            new_addrs.push(IpAddr::V6(ip));
        }
        new_addrs.sort();
        let new_key = node.map(NodeView::age_key);
        let old = self.of_node.remove(name);
        let published = |n: Option<&NodeView>| {
            n.map(|n| {
                (
                    n.annotations.get(annotations::PUBLIC_IP).cloned(),
                    n.annotations.get(annotations::PUBLIC_IPV6).cloned(),
                )
            })
        };
        let addrs_changed = old.as_ref().map(|(_, a)| a) != Some(&new_addrs);
        if addrs_changed || published(before) != published(node) {
            let touched = old
                .iter()
                .flat_map(|(_, a)| a.iter())
                .chain(new_addrs.iter());
            for ip in touched {
                if let Some(set) = self.addresses.get(ip) {
                    out.others
                        .extend(set.iter().filter(|(_, n)| n != name).cloned());
                }
            }
        }
        if let Some((key, addrs)) = &old {
            for ip in addrs {
                if let Some(set) = self.addresses.get_mut(ip) {
                    set.remove(key);
                    if set.is_empty() {
                        self.addresses.remove(ip);
                    }
                }
            }
        }
        if let Some(key) = new_key {
            for ip in &new_addrs {
                self.addresses.entry(*ip).or_default().insert(key.clone());
            }
            if !new_addrs.is_empty() {
                self.of_node.insert(name.to_string(), (key, new_addrs));
            }
        }
        out.addresses_changed = addrs_changed && (old.is_some() || node.is_some());
        out
    }

    /// The Node that may publish `ip` as its overlay address: of the Nodes
    /// that have this address, the oldest that publishes it already, else
    /// the oldest.
    pub fn holder<'a>(&'a self, ip: IpAddr, nodes: &BTreeMap<String, NodeView>) -> Option<&'a str> {
        let claimants = self.addresses.get(&ip)?;
        let text = ip.to_string();
        let key = match ip {
            IpAddr::V4(_) => annotations::PUBLIC_IP,
            IpAddr::V6(_) => annotations::PUBLIC_IPV6,
        };
        claimants
            .iter()
            .find(|(_, n)| nodes.get(n).and_then(|v| v.annotations.get(key)) == Some(&text))
            .or_else(|| claimants.first())
            .map(|(_, n)| n.as_str())
    }

    /// Node addresses inside `cluster` (either family).
    pub fn inside(&self, cluster: IpNet) -> impl Iterator<Item = IpAddr> + '_ {
        self.addresses
            .range(cluster.network()..=cluster.broadcast())
            .map(|(ip, _)| *ip)
    }
}

/// A move of a Node's overlay address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// The address published before.
    pub from: String,
    /// The new one.
    pub to: String,
    /// Where the new one came from, and who wrote it.
    pub source: String,
}

/// What the controller publishes for one Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overlay {
    /// flannel's `public-ip` (None: left out; agents skip such a peer).
    pub public_ip: Option<String>,
    /// canal's move annotations to carry (previous address, time).
    pub history: Option<(String, String)>,
    /// The address moves with this write.
    pub moved: Option<Move>,
    /// flannel's `public-ipv6` (None: left out).
    pub public_ipv6: Option<String>,
    /// The IPv6 address moves with this write.
    pub moved_v6: Option<Move>,
    /// What is wrong with the Node's addresses, for the Conflict condition.
    pub problems: Vec<String>,
}

/// Decides the overlay address of `node` and what is wrong with its
/// addresses. `holder` is who may publish the wanted address
/// ([`AddressIndex::holder`]); `alloc` the plan in force.
pub fn decide(node: &NodeView, holder: Option<&str>, alloc: &Allocator, now: Timestamp) -> Overlay {
    let IpNet::V4(cluster) = alloc.cluster() else {
        // Only the IPv4 allocator decides `public-ip`.
        return Overlay::default();
    };
    let published = node.annotations.get(annotations::PUBLIC_IP).cloned();
    let history = match (
        node.annotations.get(PREVIOUS_PUBLIC_IP),
        node.annotations.get(PUBLIC_IP_CHANGED_AT),
    ) {
        (Some(p), Some(t)) => Some((p.clone(), t.clone())),
        _ => None,
    };
    let mut out = Overlay {
        public_ip: published.clone(),
        history,
        ..Overlay::default()
    };
    let keeps = || match &published {
        Some(p) => format!("the overlay keeps sending its pod traffic to {p}"),
        None => "it stays out of the overlay".to_string(),
    };
    let consequence = |ip: Ipv4Addr| {
        let subnet = alloc.subnet_containing(IpAddr::V4(ip));
        let owner = subnet.and_then(|s| alloc.owner_overlapping(s));
        match (subnet, owner) {
            (Some(s), Some((o, _))) if o == node.name => {
                format!("its own pod subnet {s} contains it, so a pod can be given this address")
            }
            (Some(s), Some((o, _))) => format!(
                "subnet {s} of Node {o} contains it, so a pod there can be given this address"
            ),
            (Some(s), None) => format!("subnet {s} is held back from allocation"),
            (None, _) => String::new(),
        }
    };
    let mut reported: Option<Ipv4Addr> = None;
    match wanted(node) {
        // No address at all (a kubelet that has not reported yet): keep what
        // is published rather than drop the Node from every peer.
        Wanted::Nothing => {}
        Wanted::Unparsable(text) => out.problems.push(format!(
            "its public-ip-overwrite annotation {text:?} is not an IPv4 address, so {}",
            keeps()
        )),
        Wanted::Address(ip, source) => {
            let what = format!("{} {ip}", source.describe());
            if cluster.contains(&ip) {
                reported = Some(ip);
                out.problems.push(format!(
                    "{what} lies inside clusterCIDR {cluster}, which is routed into the overlay itself, so {}; {}",
                    keeps(),
                    consequence(ip)
                ));
            } else if let Some(why) = unusable(ip, cluster) {
                out.problems.push(format!("{what} {why}, so {}", keeps()));
            } else if let Some(other) = holder.filter(|h| *h != node.name) {
                out.problems.push(format!(
                    "{what} is an address of Node {other}, so {}",
                    keeps()
                ));
            } else {
                let to = ip.to_string();
                if let Some(from) = published.as_ref().filter(|p| **p != to) {
                    let writer = match source {
                        Source::InternalIp => node.addresses_writer.as_deref(),
                        Source::Overwrite => node.overwrite_writer.as_deref(),
                    };
                    out.moved = Some(Move {
                        from: from.clone(),
                        to: to.clone(),
                        source: match writer {
                            Some(w) => format!("{}, written by {w}", source.describe()),
                            None => source.describe().to_string(),
                        },
                    });
                    out.history = Some((from.clone(), now.to_string()));
                }
                out.public_ip = Some(to);
            }
        }
    }
    for (kind, ip) in node.ipv4_addresses() {
        if !cluster.contains(&ip) || reported == Some(ip) {
            continue;
        }
        out.problems.push(format!(
            "{} {ip} lies inside clusterCIDR {cluster}: {}",
            kind.as_str(),
            consequence(ip)
        ));
    }
    out
}

/// The Event note for a move.
pub fn move_note(m: &Move) -> String {
    format!(
        "the overlay address of this Node moved from {} to {} ({}): every node now sends this Node's pod traffic to {}. The previous address and the time are kept in the annotations {PREVIOUS_PUBLIC_IP} and {PUBLIC_IP_CHANGED_AT}",
        m.from, m.to, m.source, m.to
    )
}

/// A Node's address problems as one line.
pub fn problem_line(problems: &[String]) -> Option<String> {
    (!problems.is_empty()).then(|| problems.join("; "))
}
