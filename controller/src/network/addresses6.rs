//! flannel's `public-ipv6`: the IPv6 underlay address a Node publishes for
//! its `flannel-v6.<VNI>` VTEP. Pure. The rules are those of
//! [`super::addresses`] for `public-ip`, per family: the address follows
//! the Node (its first IPv6 InternalIP, or `public-ipv6-overwrite`) but
//! never silently (a move is an Event naming the field manager), and it is
//! refused, the Node keeping what it had, when it is another Node's
//! address, lies inside an IPv6 cluster range, or can never be reached
//! (loopback, link-local, multicast, unspecified).

use std::net::{IpAddr, Ipv6Addr};

use canal_crds::annotations;
use ipnet::IpNet;

use super::addresses::Move;
use crate::node_view::NodeView;

/// The IPv6 address `node` asks to publish: the overwrite when it parses,
/// else the first IPv6 InternalIP.
pub fn wanted_v6(node: &NodeView) -> Option<Ipv6Addr> {
    match overwrite(node) {
        Some(text) => text.parse().ok(),
        None => node.internal_ipv6,
    }
}

fn overwrite(node: &NodeView) -> Option<&str> {
    node.annotations
        .get(annotations::PUBLIC_IPV6_OVERWRITE)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
}

/// What the controller publishes as `public-ipv6`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overlay6 {
    /// The address (None: left out; IPv6 peers skip the Node).
    pub public_ipv6: Option<String>,
    /// The address moves with this write.
    pub moved: Option<Move>,
    /// What is wrong, for the Conflict condition.
    pub problems: Vec<String>,
}

/// Decides `public-ipv6` for `node` in a cluster with the IPv6 range
/// `cluster`. `holder` is the Node that may publish the wanted address
/// (see [`super::addresses::AddressIndex::holder`]).
pub fn decide_v6(node: &NodeView, holder: Option<&str>, cluster: IpNet) -> Overlay6 {
    let published = node.annotations.get(annotations::PUBLIC_IPV6).cloned();
    let mut out = Overlay6 {
        public_ipv6: published.clone(),
        ..Overlay6::default()
    };
    let keeps = match &published {
        Some(p) => format!("the IPv6 overlay keeps sending its pod traffic to {p}"),
        None => "it stays out of the IPv6 overlay".to_string(),
    };
    let (ip, what, writer) = match overwrite(node) {
        Some(text) => match text.parse::<Ipv6Addr>() {
            Ok(ip) => (
                ip,
                "public-ipv6-overwrite annotation",
                node.overwrite_writer.as_deref(),
            ),
            Err(_) => {
                out.problems.push(format!(
                    "its public-ipv6-overwrite annotation {text:?} is not an IPv6 address, so {keeps}"
                ));
                return out;
            }
        },
        None => match node.internal_ipv6 {
            Some(ip) => (ip, "IPv6 InternalIP", node.addresses_writer.as_deref()),
            // No IPv6 address reported (yet): keep what is published.
            None => return out,
        },
    };
    let addr = IpAddr::V6(ip);
    if cluster.contains(&addr) {
        out.problems.push(format!(
            "{what} {ip} lies inside clusterCIDR {cluster}, which is routed into the overlay itself, so {keeps}"
        ));
    } else if canal_crds::validate::is_unusable_node_address(addr) {
        out.problems.push(format!(
            "{what} {ip} is an address no other node can reach, so {keeps}"
        ));
    } else if let Some(other) = holder.filter(|h| *h != node.name) {
        out.problems.push(format!(
            "{what} {ip} is an address of Node {other}, so {keeps}"
        ));
    } else {
        let to = ip.to_string();
        if let Some(from) = published.as_ref().filter(|p| **p != to) {
            out.moved = Some(Move {
                from: from.clone(),
                to: to.clone(),
                source: match writer {
                    Some(w) => format!("{what}, written by {w}"),
                    None => what.to_string(),
                },
            });
        }
        out.public_ipv6 = Some(to);
    }
    // Any IPv6 Node address inside the range is a conflict (its /64 is
    // held back from allocation).
    for a in &node.addresses_v6 {
        if *a != ip && cluster.contains(&IpAddr::V6(*a)) {
            out.problems.push(format!(
                "IPv6 address {a} lies inside clusterCIDR {cluster}: a pod could be given it"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(ip: Option<&str>) -> NodeView {
        NodeView {
            name: "n1".into(),
            internal_ipv6: ip.map(|i| i.parse().unwrap()),
            addresses_v6: ip.iter().map(|i| i.parse().unwrap()).collect(),
            ..NodeView::default()
        }
    }

    fn cluster() -> IpNet {
        "fd00:10:244::/56".parse().unwrap()
    }

    #[test]
    fn publishes_the_first_ipv6_internal_ip() {
        let o = decide_v6(&node(Some("fd00:1::11")), Some("n1"), cluster());
        assert_eq!(o.public_ipv6.as_deref(), Some("fd00:1::11"));
        assert!(o.problems.is_empty() && o.moved.is_none());
        // No IPv6 address: nothing published, no problem.
        assert_eq!(decide_v6(&node(None), None, cluster()), Overlay6::default());
    }

    #[test]
    fn never_onto_another_nodes_address_a_cluster_address_or_an_unreachable_one() {
        for (ip, holder, needle) in [
            ("fd00:1::11", Some("n2"), "Node n2"),
            ("fd00:10:244:3::1", Some("n1"), "inside clusterCIDR"),
            ("fe80::1", Some("n1"), "no other node can reach"),
            ("::1", Some("n1"), "no other node can reach"),
            ("ff02::1", Some("n1"), "no other node can reach"),
        ] {
            let mut n = node(Some(ip));
            n.annotations
                .insert(annotations::PUBLIC_IPV6.into(), "fd00:1::99".into());
            let o = decide_v6(&n, holder, cluster());
            assert_eq!(o.public_ipv6.as_deref(), Some("fd00:1::99"), "{ip} kept");
            assert!(o.moved.is_none(), "{ip}");
            assert!(
                o.problems.iter().any(|p| p.contains(needle)),
                "{ip}: {:?}",
                o.problems
            );
        }
        // An overwrite that is no IPv6 address is refused (an IPv4 one too).
        let mut n = node(Some("fd00:1::11"));
        n.annotations
            .insert(annotations::PUBLIC_IPV6_OVERWRITE.into(), "10.0.0.1".into());
        let o = decide_v6(&n, Some("n1"), cluster());
        assert_eq!(o.public_ipv6, None);
        assert!(o.problems[0].contains("not an IPv6 address"));
    }

    #[test]
    fn a_move_is_announced_with_its_writer() {
        let mut n = node(Some("fd00:1::12"));
        n.addresses_writer = Some("kubelet".into());
        n.annotations
            .insert(annotations::PUBLIC_IPV6.into(), "fd00:1::11".into());
        let o = decide_v6(&n, Some("n1"), cluster());
        assert_eq!(o.public_ipv6.as_deref(), Some("fd00:1::12"));
        let m = o.moved.unwrap();
        assert_eq!(
            (m.from.as_str(), m.to.as_str()),
            ("fd00:1::11", "fd00:1::12")
        );
        assert!(m.source.contains("kubelet"), "{}", m.source);
        // The overwrite wins over the InternalIP.
        n.annotations.insert(
            annotations::PUBLIC_IPV6_OVERWRITE.into(),
            "2001:db8::5".into(),
        );
        assert_eq!(wanted_v6(&n), Some("2001:db8::5".parse().unwrap()));
    }
}
