//! What the agent keeps of each Node: a small projection (subnet, VTEP MAC,
//! addresses) instead of the whole object, and a pure index fed by watch
//! events (`apply` / `delete` / relist) that tells which nodes changed in a
//! way that matters to the overlay. No kube client in here.

use std::collections::BTreeMap;
use std::net::IpAddr;

use canal_crds::annotations;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::overlay::desired::{LocalNode, Peer};
use crate::overlay::family::Family;
use crate::overlay::model::Mac;

/// Node condition the agent sets once the overlay is programmed.
pub const NETWORK_UNAVAILABLE: &str = "NetworkUnavailable";
/// Its reason when canal is up.
pub const CANAL_IS_UP: &str = "CanalIsUp";

/// This node's `CanalNetworkProgrammed` condition as the API server has it
/// (compared with what the agent wants to report, so it writes only changes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgrammedCondition {
    /// "True", "False" or "Unknown".
    pub status: String,
    /// Reason.
    pub reason: String,
    /// Message.
    pub message: String,
    /// When the status last changed (kept while it does not).
    pub last_transition_time: Option<Time>,
}

impl ProgrammedCondition {
    /// Whether it already says `programmed` with this reason and message.
    pub fn says(&self, programmed: bool, reason: &str, message: &str) -> bool {
        self.status == if programmed { "True" } else { "False" }
            && self.reason == reason
            && self.message == message
    }
}

/// The Node's `CanalNetworkProgrammed` condition, if it has one.
pub fn programmed_condition(node: &Node) -> Option<ProgrammedCondition> {
    node.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == canal_crds::condition::NODE_PROGRAMMED)
        .map(|c| ProgrammedCondition {
            status: c.status.clone(),
            reason: c.reason.clone().unwrap_or_default(),
            message: c.message.clone().unwrap_or_default(),
            last_transition_time: c.last_transition_time.clone(),
        })
}

/// What a Node says about one IP family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FamilyFacts {
    /// The first entry of the family in `spec.podCIDRs`, else
    /// `spec.podCIDR` when it is of the family (flannel's rule).
    pub pod_cidr: Option<IpNet>,
    /// The first `InternalIP` of the family in `status.addresses`.
    pub internal_ip: Option<IpAddr>,
    /// VtepMAC of `backend-data` (IPv4) or `backend-v6-data` (IPv6).
    pub vtep_mac: Option<Mac>,
    /// The `public-ip` (IPv4) or `public-ipv6` (IPv6) annotation.
    pub public_ip: Option<IpAddr>,
}

/// The parts of a Node the overlay needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// Node name.
    pub name: String,
    /// Node UID (to address Events to it).
    pub uid: Option<String>,
    /// The IPv4 facts.
    pub v4: FamilyFacts,
    /// The IPv6 facts.
    pub v6: FamilyFacts,
    /// `kube-subnet-manager: "true"`.
    pub subnet_manager: bool,
    /// The NetworkUnavailable condition is False with reason CanalIsUp.
    pub canal_is_up: bool,
    /// Annotations or fields that could not be read (for logs).
    pub problems: Vec<String>,
}

/// The VtepMAC of a `backend-data`-shaped annotation, or why not.
fn vtep_mac_of(key: &str, data: &str) -> Result<Mac, String> {
    let short = key.strip_prefix(annotations::PREFIX).unwrap_or(key);
    match serde_json::from_str::<annotations::BackendData>(data) {
        Ok(d) => Mac::parse(&d.vtep_mac)
            .ok_or_else(|| format!("{short} VtepMAC {:?} is not a MAC", d.vtep_mac)),
        Err(e) => Err(format!("{short} {data:?} does not parse: {e}")),
    }
}

impl NodeFacts {
    /// Reads a Node.
    pub fn from_node(node: &Node) -> NodeFacts {
        let mut facts = NodeFacts {
            name: node.metadata.name.clone().unwrap_or_default(),
            uid: node.metadata.uid.clone(),
            ..NodeFacts::default()
        };
        if let Some(spec) = &node.spec {
            let candidates = spec.pod_cidrs.iter().flatten().chain(spec.pod_cidr.iter());
            for text in candidates {
                match text.parse::<IpNet>() {
                    Ok(net) => {
                        let slot = &mut facts.family_mut(Family::of_net(&net)).pod_cidr;
                        if slot.is_none() {
                            *slot = Some(net.trunc());
                        }
                    }
                    Err(_) => facts
                        .problems
                        .push(format!("podCIDR {text:?} is not a CIDR")),
                }
            }
        }
        if let Some(status) = &node.status {
            for address in status.addresses.iter().flatten() {
                if address.type_ != "InternalIP" {
                    continue;
                }
                if let Ok(ip) = address.address.parse::<IpAddr>() {
                    let slot = &mut facts.family_mut(Family::of_addr(&ip)).internal_ip;
                    if slot.is_none() {
                        *slot = Some(ip);
                    }
                }
            }
            facts.canal_is_up = status.conditions.iter().flatten().any(|c| {
                c.type_ == NETWORK_UNAVAILABLE
                    && c.status == "False"
                    && c.reason.as_deref() == Some(CANAL_IS_UP)
            });
        }
        let annotations = node.metadata.annotations.as_ref();
        let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
        facts.subnet_manager = get(annotations::KUBE_SUBNET_MANAGER) == Some("true");
        for (family, data_key, ip_key) in [
            (
                Family::V4,
                annotations::BACKEND_DATA,
                annotations::PUBLIC_IP,
            ),
            (
                Family::V6,
                annotations::BACKEND_V6_DATA,
                annotations::PUBLIC_IPV6,
            ),
        ] {
            if let Some(data) = get(data_key) {
                match vtep_mac_of(data_key, data) {
                    Ok(mac) => facts.family_mut(family).vtep_mac = Some(mac),
                    Err(e) => facts.problems.push(e),
                }
            }
            if let Some(text) = get(ip_key) {
                let short = ip_key.strip_prefix(annotations::PREFIX).unwrap_or(ip_key);
                match text.parse::<IpAddr>() {
                    Ok(ip) if Family::of_addr(&ip) == family => {
                        facts.family_mut(family).public_ip = Some(ip);
                    }
                    _ => facts
                        .problems
                        .push(format!("{short} {text:?} is not an {family} address")),
                }
            }
        }
        facts
    }

    /// The facts of one family.
    pub fn family(&self, family: Family) -> &FamilyFacts {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    fn family_mut(&mut self, family: Family) -> &mut FamilyFacts {
        match family {
            Family::V4 => &mut self.v4,
            Family::V6 => &mut self.v6,
        }
    }

    /// The node as an overlay peer of `family`, when it has everything a
    /// peer of that family needs.
    pub fn peer(&self, family: Family) -> Option<Peer> {
        if !self.subnet_manager {
            return None;
        }
        let f = self.family(family);
        Some(Peer {
            name: self.name.clone(),
            subnet: f.pod_cidr?,
            public_ip: f.public_ip?,
            vtep_mac: f.vtep_mac?,
        })
    }

    /// The node as the local node of `family`: it needs its subnet and VTEP
    /// MAC of the family.
    pub fn local(&self, family: Family) -> Result<LocalNode, NotProgrammable> {
        let f = self.family(family);
        let subnet = f.pod_cidr.ok_or(NotProgrammable::NoPodCidr { family })?;
        let vtep_mac = f.vtep_mac.ok_or(NotProgrammable::NoVtepMac { family })?;
        Ok(LocalNode {
            name: self.name.clone(),
            subnet,
            vtep_mac,
        })
    }

    /// Both families' peer projections (for change detection).
    fn peers(&self) -> [Option<Peer>; 2] {
        [self.peer(Family::V4), self.peer(Family::V6)]
    }

    fn is_peer(&self) -> bool {
        self.peers().iter().any(Option::is_some)
    }
}

/// Why the local node cannot be programmed (in one family) yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotProgrammable {
    /// No podCIDR of the family (canal-controller assigns it).
    #[error("the Node has no {family} spec.podCIDRs entry yet (canal-controller assigns it)")]
    NoPodCidr { family: Family },
    /// No backend-data annotation of the family (canal-controller writes it).
    #[error(
        "the Node has no readable flannel.alpha.coreos.com/{} annotation yet (canal-controller writes it)",
        if *family == Family::V4 { "backend-data" } else { "backend-v6-data" }
    )]
    NoVtepMac { family: Family },
}

/// What an index update changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Anything the agent uses changed.
    pub any: bool,
    /// The node's peer projection changed (appeared, went, or moved).
    pub peer: bool,
}

/// All Nodes' facts, fed by watch events.
#[derive(Debug, Default)]
pub struct NodeIndex {
    nodes: BTreeMap<String, NodeFacts>,
    relist: Option<BTreeMap<String, NodeFacts>>,
    listed: bool,
}

impl NodeIndex {
    /// An empty index, not yet listed.
    pub fn new() -> NodeIndex {
        NodeIndex::default()
    }

    /// Whether a complete list has been seen (before that, a missing Node
    /// may simply not have arrived yet, so nothing may be removed).
    pub fn listed(&self) -> bool {
        self.listed
    }

    /// A node was added or changed.
    pub fn apply(&mut self, facts: NodeFacts) -> Changed {
        let old = self.nodes.get(&facts.name);
        let changed = Changed {
            any: old != Some(&facts),
            peer: old.map(NodeFacts::peers) != Some(facts.peers()),
        };
        self.nodes.insert(facts.name.clone(), facts);
        changed
    }

    /// A node was deleted.
    pub fn delete(&mut self, name: &str) -> Changed {
        match self.nodes.remove(name) {
            Some(old) => Changed {
                any: true,
                peer: old.is_peer(),
            },
            None => Changed::default(),
        }
    }

    /// A relist starts.
    pub fn relist_start(&mut self) {
        self.relist = Some(BTreeMap::new());
    }

    /// A node of the relist.
    pub fn relist_apply(&mut self, facts: NodeFacts) {
        self.relist
            .get_or_insert_with(BTreeMap::new)
            .insert(facts.name.clone(), facts);
    }

    /// The relist is complete: it replaces the index (so nodes deleted while
    /// the watch was down disappear). Returns the names whose peer
    /// projection changed, and whether anything changed.
    pub fn relist_done(&mut self) -> (Vec<String>, bool) {
        let new = self.relist.take().unwrap_or_default();
        let mut peers_changed = Vec::new();
        for (name, facts) in &new {
            if self.nodes.get(name).map(NodeFacts::peers) != Some(facts.peers()) {
                peers_changed.push(name.clone());
            }
        }
        for (name, facts) in &self.nodes {
            if !new.contains_key(name) && facts.is_peer() {
                peers_changed.push(name.clone());
            }
        }
        let any = new != self.nodes || !self.listed;
        self.nodes = new;
        self.listed = true;
        (peers_changed, any)
    }

    /// A node's facts.
    pub fn get(&self, name: &str) -> Option<&NodeFacts> {
        self.nodes.get(name)
    }

    /// Every node except `local` that qualifies as a peer of `family`, in
    /// name order.
    pub fn peers(&self, local: &str, family: Family) -> Vec<Peer> {
        self.nodes
            .values()
            .filter(|f| f.name != local)
            .filter_map(|f| f.peer(family))
            .collect()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// No nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeCondition, NodeSpec, NodeStatus};
    use kube::api::ObjectMeta;

    /// A Node as canal-controller leaves it.
    pub fn mk_node(name: &str, cidr: &str, ip: &str) -> Node {
        let mac = annotations::format_mac(annotations::vtep_mac(name));
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(
                    [
                        (annotations::KUBE_SUBNET_MANAGER, "true".to_string()),
                        (annotations::BACKEND_TYPE, "vxlan".to_string()),
                        (
                            annotations::BACKEND_DATA,
                            format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
                        ),
                        (annotations::PUBLIC_IP, ip.to_string()),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some(cidr.into()),
                pod_cidrs: Some(vec![cidr.into()]),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.into(),
                }]),
                ..NodeStatus::default()
            }),
        }
    }

    /// A dual-stack Node as canal-controller leaves it.
    pub fn mk_dual_node(name: &str, cidrs: [&str; 2], ips: [&str; 2]) -> Node {
        let mut n = mk_node(name, cidrs[0], ips[0]);
        let mac6 = annotations::format_mac(annotations::vtep_mac_v6(name));
        let anns = n.metadata.annotations.as_mut().unwrap();
        anns.insert(
            annotations::BACKEND_V6_DATA.into(),
            format!(r#"{{"VNI":1,"VtepMAC":"{mac6}"}}"#),
        );
        anns.insert(annotations::PUBLIC_IPV6.into(), ips[1].into());
        n.spec.as_mut().unwrap().pod_cidrs = Some(cidrs.iter().map(|c| c.to_string()).collect());
        n.status.as_mut().unwrap().addresses = Some(
            ips.iter()
                .map(|ip| NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.to_string(),
                })
                .collect(),
        );
        n
    }

    #[test]
    fn reads_what_the_controller_writes() {
        let f = NodeFacts::from_node(&mk_node("n1", "10.244.3.0/24", "192.168.1.3"));
        assert_eq!(f.v4.pod_cidr, Some("10.244.3.0/24".parse().unwrap()));
        assert_eq!(f.v4.internal_ip, Some("192.168.1.3".parse().unwrap()));
        assert_eq!(f.v4.public_ip, f.v4.internal_ip);
        assert_eq!(f.v4.vtep_mac, Some(Mac(annotations::vtep_mac("n1"))));
        assert!(f.subnet_manager && f.problems.is_empty() && !f.canal_is_up);
        let p = f.peer(Family::V4).unwrap();
        assert_eq!(p.subnet, f.v4.pod_cidr.unwrap());
        assert_eq!(f.local(Family::V4).unwrap().subnet, p.subnet);
        assert_eq!(f.peer(Family::V6), None);
        assert_eq!(
            f.local(Family::V6),
            Err(NotProgrammable::NoPodCidr { family: Family::V6 })
        );
    }

    #[test]
    fn dual_stack_nodes_are_peers_in_both_families() {
        let n = mk_dual_node(
            "n1",
            ["10.244.3.0/24", "fd00:10:244:3::/64"],
            ["192.168.1.3", "fd00:30::3"],
        );
        let f = NodeFacts::from_node(&n);
        assert!(f.problems.is_empty(), "{:?}", f.problems);
        let p6 = f.peer(Family::V6).unwrap();
        assert_eq!(p6.subnet, "fd00:10:244:3::/64".parse::<IpNet>().unwrap());
        assert_eq!(p6.public_ip, "fd00:30::3".parse::<IpAddr>().unwrap());
        assert_eq!(p6.vtep_mac, Mac(annotations::vtep_mac_v6("n1")));
        assert_ne!(p6.vtep_mac, f.peer(Family::V4).unwrap().vtep_mac);
        assert_eq!(f.v6.internal_ip, Some(p6.public_ip));
        // IPv6 first (an IPv6-primary cluster): the order changes nothing.
        let mut swapped = n.clone();
        swapped.spec.as_mut().unwrap().pod_cidrs =
            Some(vec!["fd00:10:244:3::/64".into(), "10.244.3.0/24".into()]);
        assert_eq!(NodeFacts::from_node(&swapped), f);
        // An IPv6-only node.
        let mut v6only = n.clone();
        v6only.spec.as_mut().unwrap().pod_cidrs = Some(vec!["fd00:10:244:3::/64".into()]);
        v6only.spec.as_mut().unwrap().pod_cidr = Some("fd00:10:244:3::/64".into());
        let f = NodeFacts::from_node(&v6only);
        assert_eq!(f.v4.pod_cidr, None);
        assert!(f.peer(Family::V6).is_some() && f.peer(Family::V4).is_none());
    }

    #[test]
    fn garbage_is_reported_per_family() {
        let mut n = mk_dual_node(
            "n1",
            ["10.244.3.0/24", "fd00:10:244:3::/64"],
            ["192.168.1.3", "fd00:30::3"],
        );
        let anns = n.metadata.annotations.as_mut().unwrap();
        anns.insert(annotations::BACKEND_DATA.into(), "{not json".into());
        anns.insert(annotations::PUBLIC_IP.into(), "nope".into());
        // An IPv4 address where the IPv6 one belongs.
        anns.insert(annotations::PUBLIC_IPV6.into(), "192.168.1.3".into());
        n.spec.as_mut().unwrap().pod_cidrs = Some(vec!["junk".into(), "10.244.9.0/24".into()]);
        let f = NodeFacts::from_node(&n);
        assert_eq!(f.problems.len(), 4, "{:?}", f.problems);
        assert!(
            f.problems.iter().any(|p| p.contains("public-ipv6")),
            "{:?}",
            f.problems
        );
        assert_eq!(f.v4.pod_cidr, Some("10.244.9.0/24".parse().unwrap()));
        assert_eq!(f.peer(Family::V4), None);
        assert_eq!(f.peer(Family::V6), None);
        assert_eq!(
            f.local(Family::V4),
            Err(NotProgrammable::NoVtepMac { family: Family::V4 })
        );
    }

    #[test]
    fn nodes_without_the_subnet_manager_annotation_are_not_peers() {
        let mut n = mk_node("n1", "10.244.3.0/24", "192.168.1.3");
        n.metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(annotations::KUBE_SUBNET_MANAGER);
        assert_eq!(NodeFacts::from_node(&n).peer(Family::V4), None);
        n.spec = None;
        assert_eq!(
            NodeFacts::from_node(&n).local(Family::V4),
            Err(NotProgrammable::NoPodCidr { family: Family::V4 })
        );
    }

    #[test]
    fn condition_is_recognised() {
        let mut n = mk_node("n1", "10.244.3.0/24", "192.168.1.3");
        n.status.as_mut().unwrap().conditions = Some(vec![NodeCondition {
            type_: NETWORK_UNAVAILABLE.into(),
            status: "False".into(),
            reason: Some(CANAL_IS_UP.into()),
            ..NodeCondition::default()
        }]);
        assert!(NodeFacts::from_node(&n).canal_is_up);
    }

    #[test]
    fn own_programmed_condition_is_read_next_to_the_kubelet_ones() {
        let mut n = mk_node("n1", "10.244.3.0/24", "192.168.1.3");
        assert_eq!(programmed_condition(&n), None);
        n.status.as_mut().unwrap().conditions = Some(vec![
            NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: Some("KubeletReady".into()),
                ..NodeCondition::default()
            },
            NodeCondition {
                type_: canal_crds::condition::NODE_PROGRAMMED.into(),
                status: "False".into(),
                reason: Some("MTURejected".into()),
                message: Some("MTU: refused".into()),
                ..NodeCondition::default()
            },
        ]);
        let c = programmed_condition(&n).unwrap();
        assert!(c.says(false, "MTURejected", "MTU: refused"));
        assert!(!c.says(true, "MTURejected", "MTU: refused"));
        assert!(!c.says(false, "MTURejected", "MTU: other"));
    }

    #[test]
    fn index_reports_peer_changes_only_when_the_projection_moves() {
        let mut idx = NodeIndex::new();
        let n1 = NodeFacts::from_node(&mk_node("n1", "10.244.1.0/24", "192.168.1.1"));
        assert_eq!(
            idx.apply(n1.clone()),
            Changed {
                any: true,
                peer: true
            }
        );
        assert_eq!(idx.apply(n1.clone()), Changed::default());
        let mut up = n1.clone();
        up.canal_is_up = true;
        assert_eq!(
            idx.apply(up),
            Changed {
                any: true,
                peer: false
            }
        );
        let mut moved = n1.clone();
        moved.v4.public_ip = Some("192.168.1.99".parse().unwrap());
        assert_eq!(
            idx.apply(moved),
            Changed {
                any: true,
                peer: true
            }
        );
        assert_eq!(
            idx.delete("n1"),
            Changed {
                any: true,
                peer: true
            }
        );
        assert_eq!(idx.delete("n1"), Changed::default());
    }

    #[test]
    fn relist_replaces_the_index_and_drops_nodes_deleted_meanwhile() {
        let mut idx = NodeIndex::new();
        assert!(!idx.listed());
        idx.relist_start();
        for (n, c, ip) in [
            ("a", "10.244.1.0/24", "192.168.1.1"),
            ("b", "10.244.2.0/24", "192.168.1.2"),
        ] {
            idx.relist_apply(NodeFacts::from_node(&mk_node(n, c, ip)));
        }
        let (changed, any) = idx.relist_done();
        assert_eq!(changed, vec!["a", "b"]);
        assert!(any && idx.listed());
        assert_eq!(idx.peers("a", Family::V4).len(), 1);
        assert_eq!(idx.peers("a", Family::V6).len(), 0);

        // b was deleted while the watch was down; c appeared.
        idx.relist_start();
        idx.relist_apply(NodeFacts::from_node(&mk_node(
            "a",
            "10.244.1.0/24",
            "192.168.1.1",
        )));
        idx.relist_apply(NodeFacts::from_node(&mk_node(
            "c",
            "10.244.3.0/24",
            "192.168.1.3",
        )));
        let (mut changed, any) = idx.relist_done();
        changed.sort();
        assert_eq!(changed, vec!["b", "c"]);
        assert!(any);
        assert_eq!(
            idx.peers("a", Family::V4)
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            vec!["c"]
        );
        assert_eq!(idx.len(), 2);
    }

    #[test]
    fn an_ipv6_change_alone_is_a_peer_change() {
        let mut idx = NodeIndex::new();
        let n = mk_dual_node(
            "n1",
            ["10.244.1.0/24", "fd00:10:244:1::/64"],
            ["192.168.1.1", "fd00:30::1"],
        );
        let f = NodeFacts::from_node(&n);
        idx.apply(f.clone());
        let mut moved = f.clone();
        moved.v6.public_ip = Some("fd00:30::99".parse().unwrap());
        assert_eq!(
            idx.apply(moved),
            Changed {
                any: true,
                peer: true
            }
        );
    }
}
