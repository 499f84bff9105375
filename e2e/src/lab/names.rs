//! The lab's names and addresses, derived from its state directory so that
//! two labs (or two tests) on one machine never share a network namespace,
//! and so that `down` finds a crashed lab's leftovers from the directory
//! alone. Pure: no I/O.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::{Ipv4Net, Ipv6Net};
use sha2::{Digest, Sha256};

/// Linux's limit on interface names (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// Names in the lab's node network namespaces that do not depend on the lab:
/// every node's underlay interface is `eth0`, like on a real machine.
pub const NODE_UNDERLAY_IF: &str = "eth0";
/// The bridge in the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";
/// The underlay's port towards the internet namespace.
pub const INTERNET_PORT: &str = "veth-inet";
/// The host outside clusterCIDR that the internet namespace plays (RFC 2544
/// benchmarking range, never routed on real networks).
pub const INTERNET_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The internet host's IPv6 address (the documentation range, never routed).
pub const INTERNET_HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// Port the API server forwarder listens on inside every node namespace
/// (`https://127.0.0.1:6443`, an address the API server certificate covers).
pub const NODE_API_PORT: u16 = 6443;
/// Port of each agent's /metrics, /healthz and /readyz inside its namespace.
pub const AGENT_METRICS_PORT: u16 = 9091;
/// First node slot; slot `k` gets host address `.10 + k` on the underlay.
pub const FIRST_SLOT: u8 = 1;
/// Last node slot (host address .254).
pub const LAST_SLOT: u8 = 244;

/// Every name of one lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabNames {
    /// `cl` + 6 hex characters of a hash of the state directory.
    pub prefix: String,
}

impl LabNames {
    /// The names of the lab whose state lives in `state_dir` (an absolute
    /// path; the same directory always gives the same names).
    pub fn for_state_dir(state_dir: &Path) -> LabNames {
        let digest = Sha256::digest(state_dir.as_os_str().as_encoded_bytes());
        LabNames {
            prefix: format!("cl{}", &hex::encode(digest)[..6]),
        }
    }

    /// The namespace holding the underlay bridge (never the root namespace:
    /// with br_netfilter loaded, bridged frames traverse the iptables of the
    /// bridge's namespace).
    pub fn underlay_netns(&self) -> String {
        format!("{}-underlay", self.prefix)
    }

    /// The namespace playing a host outside the cluster.
    pub fn internet_netns(&self) -> String {
        format!("{}-internet", self.prefix)
    }

    /// A node's namespace (node names never collide with the fixed names:
    /// [`check_node_name`] refuses `underlay`, `internet` and `pod-*`).
    pub fn node_netns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// A pod's namespace. Kubernetes namespaces hold no `.`, so
    /// `<namespace>.<pod>` is unambiguous; very long names are hashed to stay
    /// inside a file name's length.
    pub fn pod_netns(&self, namespace: &str, pod: &str) -> String {
        let readable = format!("{}-pod-{namespace}.{pod}", self.prefix);
        if readable.len() <= 200 {
            readable
        } else {
            let digest = Sha256::digest(format!("{namespace}.{pod}").as_bytes());
            format!("{}-pod-{}", self.prefix, &hex::encode(digest)[..16])
        }
    }

    /// Whether a namespace name belongs to this lab.
    pub fn owns_netns(&self, name: &str) -> bool {
        name.strip_prefix(&self.prefix)
            .is_some_and(|rest| rest.starts_with('-'))
    }

    /// Sort key for removal: pods first, then nodes, the internet, and the
    /// underlay last (its bridge holds the other namespaces' peers).
    pub fn removal_rank(&self, name: &str) -> u8 {
        let rest = name.strip_prefix(&self.prefix).unwrap_or(name);
        match rest {
            "-underlay" => 3,
            "-internet" => 2,
            _ if rest.starts_with("-pod-") => 0,
            _ => 1,
        }
    }

    /// The lab's underlay network: a /24 of 172.30.0.0/16 chosen by the
    /// prefix, so concurrent labs use different addresses (they are isolated
    /// by namespaces anyway; distinct ranges keep captures and logs apart).
    pub fn underlay(&self) -> Ipv4Net {
        let third = u8::from_str_radix(&self.prefix[2..4], 16).unwrap_or(0);
        // 172.30.<third>.0/24 is a valid network for every byte value.
        Ipv4Net::new(Ipv4Addr::new(172, 30, third, 0), 24).unwrap_or_default()
    }

    /// The underlay's gateway: the internet namespace's underlay address,
    /// every node's default route.
    pub fn gateway(&self) -> Ipv4Addr {
        host(self.underlay(), 1)
    }

    /// The underlay address of the node in `slot`.
    pub fn node_address(&self, slot: u8) -> Ipv4Addr {
        host(self.underlay(), 10 + u32::from(slot))
    }

    /// The lab's IPv6 underlay (labs with IPv6): a /64 of the ULA
    /// fd00:30::/32 chosen like [`LabNames::underlay`].
    pub fn underlay6(&self) -> Ipv6Net {
        let third = u16::from_str_radix(&self.prefix[2..4], 16).unwrap_or(0);
        // A /64 is a valid prefix length for every address.
        Ipv6Net::new(Ipv6Addr::new(0xfd00, 0x30, third, 0, 0, 0, 0, 0), 64).unwrap_or_default()
    }

    /// The IPv6 underlay's gateway (`::1`, in the internet namespace).
    pub fn gateway6(&self) -> Ipv6Addr {
        host6(self.underlay6(), 1)
    }

    /// The IPv6 underlay address of the node in `slot` (`::11` for slot 1,
    /// like IPv4's `.11`).
    pub fn node_address6(&self, slot: u8) -> Ipv6Addr {
        host6(self.underlay6(), 0x10 + u128::from(slot))
    }
}

fn host6(net: Ipv6Net, n: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(net.network()) + n)
}

fn host(net: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

/// The underlay bridge's port towards the node in `slot` (in the underlay
/// namespace, so only its length matters).
pub fn underlay_port(slot: u8) -> String {
    format!("veth-n{slot}")
}

/// The lowest slot not in `used`, if any is left.
pub fn free_slot(used: &[u8]) -> Option<u8> {
    (FIRST_SLOT..=LAST_SLOT).find(|s| !used.contains(s))
}

/// The default node names: `node-1` ... `node-N`.
pub fn default_node_name(index: u32) -> String {
    format!("node-{index}")
}

/// Checks a node name: a DNS label (it becomes a Node name and part of a
/// namespace name).
pub fn check_node_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        return Err(format!(
            "node name {name:?} must be a DNS label: lowercase letters, digits and '-', at most 63 characters"
        ));
    }
    if name == "underlay" || name == "internet" || name.starts_with("pod-") {
        return Err(format!(
            "node name {name:?} is reserved for the lab's own namespaces"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_state_dir() {
        let a = LabNames::for_state_dir(Path::new("/tmp/canal-lab"));
        let b = LabNames::for_state_dir(Path::new("/tmp/canal-lab2"));
        assert_eq!(a, LabNames::for_state_dir(Path::new("/tmp/canal-lab")));
        assert_ne!(a.prefix, b.prefix);
        assert_eq!(a.prefix.len(), 8);
        assert!(a.prefix.starts_with("cl"));
        assert_ne!(a.underlay_netns(), b.underlay_netns());
    }

    #[test]
    fn ownership_is_by_prefix_and_dash() {
        let lab = LabNames {
            prefix: "cl123456".into(),
        };
        assert!(lab.owns_netns("cl123456-underlay"));
        assert!(lab.owns_netns(&lab.node_netns("node-1")));
        assert!(lab.owns_netns(&lab.pod_netns("x", "a")));
        assert!(!lab.owns_netns("cl1234567-underlay"));
        assert!(!lab.owns_netns("cl123456"));
        assert!(!lab.owns_netns("other"));
    }

    #[test]
    fn removal_order_is_pods_nodes_internet_underlay() {
        let lab = LabNames {
            prefix: "cl123456".into(),
        };
        let mut names = vec![
            lab.underlay_netns(),
            lab.internet_netns(),
            lab.node_netns("node-1"),
            lab.pod_netns("x", "a"),
        ];
        names.sort_by_key(|n| lab.removal_rank(n));
        assert_eq!(
            names,
            vec![
                lab.pod_netns("x", "a"),
                lab.node_netns("node-1"),
                lab.internet_netns(),
                lab.underlay_netns(),
            ]
        );
    }

    #[test]
    fn long_pod_names_are_hashed() {
        let lab = LabNames {
            prefix: "cl123456".into(),
        };
        assert_eq!(lab.pod_netns("x", "a"), "cl123456-pod-x.a");
        let long = "p".repeat(253);
        let name = lab.pod_netns("x", &long);
        assert!(name.len() < 40, "{name}");
        assert_ne!(name, lab.pod_netns("y", &long));
    }

    #[test]
    fn addresses_stay_inside_the_underlay() {
        for prefix in ["cl000000", "clffffff", "cl7f0000"] {
            let lab = LabNames {
                prefix: prefix.into(),
            };
            let net = lab.underlay();
            assert!(net.contains(&lab.gateway()));
            assert!(net.contains(&lab.node_address(FIRST_SLOT)));
            assert!(net.contains(&lab.node_address(LAST_SLOT)));
            assert_ne!(lab.node_address(LAST_SLOT), net.broadcast());
            assert_ne!(lab.gateway(), lab.node_address(FIRST_SLOT));
            let net6 = lab.underlay6();
            assert!(net6.contains(&lab.gateway6()));
            assert!(net6.contains(&lab.node_address6(LAST_SLOT)));
            assert_ne!(lab.gateway6(), lab.node_address6(FIRST_SLOT));
        }
        let lab = LabNames {
            prefix: "cl7f0000".into(),
        };
        assert_eq!(lab.underlay6().to_string(), "fd00:30:7f::/64");
        assert_eq!(lab.node_address6(1).to_string(), "fd00:30:7f::11");
    }

    #[test]
    fn interface_names_fit() {
        assert!(underlay_port(LAST_SLOT).len() <= MAX_IFNAME);
        assert!(INTERNET_PORT.len() <= MAX_IFNAME);
    }

    #[test]
    fn slots_are_reused_lowest_first() {
        assert_eq!(free_slot(&[]), Some(1));
        assert_eq!(free_slot(&[1, 2, 4]), Some(3));
        let all: Vec<u8> = (FIRST_SLOT..=LAST_SLOT).collect();
        assert_eq!(free_slot(&all), None);
    }

    #[test]
    fn node_names_are_dns_labels() {
        assert!(check_node_name("node-4").is_ok());
        assert!(check_node_name("Node").is_err());
        assert!(check_node_name("-a").is_err());
        assert!(check_node_name("").is_err());
        assert!(check_node_name(&"a".repeat(64)).is_err());
        assert!(check_node_name("underlay").is_err());
        assert!(check_node_name("pod-1").is_err());
    }
}
