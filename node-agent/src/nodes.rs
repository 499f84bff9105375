//! What the agent keeps of each Node: a small projection (subnet, VTEP MAC,
//! addresses) instead of the whole object, and a pure index fed by watch
//! events (`apply` / `delete` / relist) that tells which nodes changed in a
//! way that matters to the overlay. No kube client in here.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use canal_crds::annotations;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::overlay::desired::{LocalNode, Peer};
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

/// The parts of a Node the overlay needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// Node name.
    pub name: String,
    /// Node UID (to address Events to it).
    pub uid: Option<String>,
    /// First IPv4 entry of `spec.podCIDRs`, else `spec.podCIDR`.
    pub pod_cidr: Option<Ipv4Net>,
    /// First `InternalIP` in `status.addresses`.
    pub internal_ip: Option<Ipv4Addr>,
    /// `kube-subnet-manager: "true"`.
    pub subnet_manager: bool,
    /// VtepMAC of the `backend-data` annotation.
    pub vtep_mac: Option<Mac>,
    /// The `public-ip` annotation.
    pub public_ip: Option<Ipv4Addr>,
    /// The NetworkUnavailable condition is False with reason CanalIsUp.
    pub canal_is_up: bool,
    /// Annotations or fields that could not be read (for logs).
    pub problems: Vec<String>,
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
                match text.parse::<Ipv4Net>() {
                    Ok(net) => {
                        facts.pod_cidr = Some(net.trunc());
                        break;
                    }
                    // IPv6 entries are skipped; garbage is reported.
                    Err(_) if text.contains(':') => {}
                    Err(_) => facts
                        .problems
                        .push(format!("podCIDR {text:?} is not an IPv4 CIDR")),
                }
            }
        }
        if let Some(status) = &node.status {
            facts.internal_ip = status
                .addresses
                .iter()
                .flatten()
                .filter(|a| a.type_ == "InternalIP")
                .find_map(|a| a.address.parse().ok());
            facts.canal_is_up = status.conditions.iter().flatten().any(|c| {
                c.type_ == NETWORK_UNAVAILABLE
                    && c.status == "False"
                    && c.reason.as_deref() == Some(CANAL_IS_UP)
            });
        }
        let annotations = node.metadata.annotations.as_ref();
        let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
        facts.subnet_manager = get(annotations::KUBE_SUBNET_MANAGER) == Some("true");
        if let Some(data) = get(annotations::BACKEND_DATA) {
            match serde_json::from_str::<annotations::BackendData>(data) {
                Ok(d) => match Mac::parse(&d.vtep_mac) {
                    Some(mac) => facts.vtep_mac = Some(mac),
                    None => facts.problems.push(format!(
                        "backend-data VtepMAC {:?} is not a MAC",
                        d.vtep_mac
                    )),
                },
                Err(e) => facts
                    .problems
                    .push(format!("backend-data {data:?} does not parse: {e}")),
            }
        }
        if let Some(ip) = get(annotations::PUBLIC_IP) {
            match ip.parse() {
                Ok(ip) => facts.public_ip = Some(ip),
                Err(_) => facts
                    .problems
                    .push(format!("public-ip {ip:?} is not an IPv4 address")),
            }
        }
        facts
    }

    /// The node as an overlay peer, when it has everything a peer needs.
    pub fn peer(&self) -> Option<Peer> {
        if !self.subnet_manager {
            return None;
        }
        Some(Peer {
            name: self.name.clone(),
            subnet: self.pod_cidr?,
            public_ip: self.public_ip?,
            vtep_mac: self.vtep_mac?,
        })
    }

    /// The node as the local node: it needs its subnet and VTEP MAC.
    pub fn local(&self) -> Result<LocalNode, NotProgrammable> {
        let subnet = self.pod_cidr.ok_or(NotProgrammable::NoPodCidr)?;
        let vtep_mac = self.vtep_mac.ok_or(NotProgrammable::NoVtepMac)?;
        Ok(LocalNode {
            name: self.name.clone(),
            subnet,
            vtep_mac,
        })
    }
}

/// Why the local node cannot be programmed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotProgrammable {
    /// No podCIDR (canal-controller assigns it).
    #[error("the Node has no spec.podCIDR yet (canal-controller assigns it)")]
    NoPodCidr,
    /// No backend-data annotation (canal-controller writes it).
    #[error(
        "the Node has no readable flannel.alpha.coreos.com/backend-data annotation yet (canal-controller writes it)"
    )]
    NoVtepMac,
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
            peer: old.and_then(NodeFacts::peer) != facts.peer(),
        };
        self.nodes.insert(facts.name.clone(), facts);
        changed
    }

    /// A node was deleted.
    pub fn delete(&mut self, name: &str) -> Changed {
        match self.nodes.remove(name) {
            Some(old) => Changed {
                any: true,
                peer: old.peer().is_some(),
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
            if self.nodes.get(name).and_then(NodeFacts::peer) != facts.peer() {
                peers_changed.push(name.clone());
            }
        }
        for (name, facts) in &self.nodes {
            if !new.contains_key(name) && facts.peer().is_some() {
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

    /// Every node except `local` that qualifies as a peer, in name order.
    pub fn peers(&self, local: &str) -> Vec<Peer> {
        self.nodes
            .values()
            .filter(|f| f.name != local)
            .filter_map(NodeFacts::peer)
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

    #[test]
    fn reads_what_the_controller_writes() {
        let f = NodeFacts::from_node(&mk_node("n1", "10.244.3.0/24", "192.168.1.3"));
        assert_eq!(f.pod_cidr, Some("10.244.3.0/24".parse().unwrap()));
        assert_eq!(f.internal_ip, Some("192.168.1.3".parse().unwrap()));
        assert_eq!(f.public_ip, f.internal_ip);
        assert_eq!(f.vtep_mac, Some(Mac(annotations::vtep_mac("n1"))));
        assert!(f.subnet_manager && f.problems.is_empty() && !f.canal_is_up);
        let p = f.peer().unwrap();
        assert_eq!(p.subnet, f.pod_cidr.unwrap());
        assert_eq!(f.local().unwrap().subnet, p.subnet);
    }

    #[test]
    fn dual_stack_takes_the_ipv4_cidr_and_garbage_is_reported() {
        let mut n = mk_node("n1", "10.244.3.0/24", "192.168.1.3");
        n.spec.as_mut().unwrap().pod_cidrs =
            Some(vec!["fd00:10::/64".into(), "10.244.9.0/24".into()]);
        assert_eq!(
            NodeFacts::from_node(&n).pod_cidr,
            Some("10.244.9.0/24".parse().unwrap())
        );
        let anns = n.metadata.annotations.as_mut().unwrap();
        anns.insert(annotations::BACKEND_DATA.into(), "{not json".into());
        anns.insert(annotations::PUBLIC_IP.into(), "nope".into());
        let f = NodeFacts::from_node(&n);
        assert_eq!(f.problems.len(), 2, "{:?}", f.problems);
        assert_eq!(f.peer(), None);
        assert_eq!(f.local(), Err(NotProgrammable::NoVtepMac));
    }

    #[test]
    fn nodes_without_the_subnet_manager_annotation_are_not_peers() {
        let mut n = mk_node("n1", "10.244.3.0/24", "192.168.1.3");
        n.metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(annotations::KUBE_SUBNET_MANAGER);
        assert_eq!(NodeFacts::from_node(&n).peer(), None);
        n.spec = None;
        assert_eq!(
            NodeFacts::from_node(&n).local(),
            Err(NotProgrammable::NoPodCidr)
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
        moved.public_ip = Some("192.168.1.99".parse().unwrap());
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
        assert_eq!(idx.peers("a").len(), 1);

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
            idx.peers("a")
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            vec!["c"]
        );
        assert_eq!(idx.len(), 2);
    }
}
