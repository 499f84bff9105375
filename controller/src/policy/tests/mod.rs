//! Tests of the policy compiler as a whole: a simulated API server that
//! holds what the index writes, an evaluator of the written objects (what
//! an agent enforces), an independent reference evaluator of the
//! NetworkPolicy semantics, table tests and property tests.

mod bounds;
mod pod_ips;
mod properties;
mod reference;
mod scenarios;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use canal_crds::assemble::{assemble_node, assemble_peer_set};
use canal_crds::{
    NamedPort, NodePolicySet, NodePolicySetObjectSpec, NodePolicySetSpec, PeerSet,
    PeerSetObjectSpec, PeerSetSpec, PolicyGroup, PolicyGroupSpec, Protocol,
};
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;

use super::fingerprint::{self, Fingerprint};
use super::index::{Change, Changes, Kind, PodIpReport, PolicyIndex, PolicyReport};
use super::input::{NamespaceInfo, NodeInfo, PodInfo};
use super::objects::{self, EncodeError, Limits};

/// The objects of the simulated API server (specs as a watch decodes them
/// from the request bodies), with the annotation the controller writes.
#[derive(Clone, Debug, Default)]
pub struct Store {
    pub nps: BTreeMap<String, (NodePolicySetObjectSpec, String)>,
    pub pg: BTreeMap<String, (PolicyGroupSpec, String)>,
    pub ps: BTreeMap<String, (PeerSetObjectSpec, String)>,
    pub writes: Vec<String>,
    /// Size of the largest request body written.
    pub largest: usize,
    /// Objects the size bound refused.
    pub refused: Vec<String>,
}

/// Applies of slices, applies of heads, deletions (as the controller splits them).
fn split(kind: Kind, changes: &[Change]) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut slices, mut heads, mut deletes) = (Vec::new(), Vec::new(), Vec::new());
    for c in changes {
        match c {
            Change::Apply(n) if kind.head_of(n) != &**n => slices.push(n.to_string()),
            Change::Apply(n) => heads.push(n.to_string()),
            Change::Delete(n) => deletes.push(n.to_string()),
        }
    }
    (slices, heads, deletes)
}

impl Store {
    /// Carries out a flush's changes the way the controller does: the same
    /// order, the same holds, the same request bodies (size bound included).
    pub fn apply(&mut self, index: &mut PolicyIndex, changes: &Changes) {
        let mut deletes = Vec::new();
        for kind in [Kind::PeerSet, Kind::PolicyGroup] {
            let (slices, heads, dels) = split(kind, changes.of(kind));
            for n in slices {
                self.put(index, kind, &n);
            }
            for n in heads {
                if index.slices_current(kind, &n) {
                    self.put(index, kind, &n);
                } else {
                    index.retry(kind, &n);
                }
            }
            deletes.push((kind, dels));
        }
        let (_, heads, dels) = split(Kind::NodePolicySet, changes.of(Kind::NodePolicySet));
        for n in heads {
            if index.groups_not_current(&n).is_empty() {
                self.put(index, Kind::NodePolicySet, &n);
            } else {
                index.retry(Kind::NodePolicySet, &n);
            }
        }
        for n in dels {
            self.remove(index, Kind::NodePolicySet, &n);
        }
        for (kind, dels) in deletes.into_iter().rev() {
            for n in dels {
                let head = kind.head_of(&n).to_string();
                if head == n
                    || index.desired_fingerprint(kind, &head).is_none()
                    || index.is_current(kind, &head)
                {
                    self.remove(index, kind, &n);
                } else {
                    index.retry(kind, &n);
                }
            }
        }
    }

    fn put(&mut self, index: &mut PolicyIndex, kind: Kind, name: &str) {
        let owner = objects::owner_reference("test-uid");
        let out = match objects::encode_object(index, kind, name, &owner) {
            None => return,
            Some(Err(EncodeError::TooLarge { .. })) => {
                self.refused.push(format!("{} {name}", kind.as_str()));
                index.retry(kind, name);
                return;
            }
            Some(Err(e)) => panic!("encoding {name}: {e}"),
            Some(Ok(o)) => o,
        };
        let body = out.body.get();
        self.largest = self.largest.max(body.len());
        let ann = |a: &BTreeMap<String, String>| a[fingerprint::ANNOTATION].clone();
        match kind {
            Kind::NodePolicySet => {
                let o: NodePolicySet = serde_json::from_str(body).unwrap();
                self.nps
                    .insert(name.into(), (o.spec.clone(), ann(o.annotations())));
            }
            Kind::PolicyGroup => {
                let o: PolicyGroup = serde_json::from_str(body).unwrap();
                self.pg
                    .insert(name.into(), (o.spec.clone(), ann(o.annotations())));
            }
            Kind::PeerSet => {
                let o: PeerSet = serde_json::from_str(body).unwrap();
                self.ps
                    .insert(name.into(), (o.spec.clone(), ann(o.annotations())));
            }
        }
        index.mark_written(kind, name, Some(out.fingerprint));
        self.writes.push(format!("apply {} {name}", kind.as_str()));
    }

    fn remove(&mut self, index: &mut PolicyIndex, kind: Kind, name: &str) {
        match kind {
            Kind::NodePolicySet => {
                self.nps.remove(name);
            }
            Kind::PolicyGroup => {
                self.pg.remove(name);
            }
            Kind::PeerSet => {
                self.ps.remove(name);
            }
        }
        index.mark_written(kind, name, None);
        self.writes.push(format!("delete {} {name}", kind.as_str()));
    }

    /// What a watch of the store reports to a (restarted) controller.
    pub fn observed(&self, kind: Kind) -> Vec<(String, Option<Fingerprint>)> {
        fn of<T: serde::Serialize>(
            m: &BTreeMap<String, (T, String)>,
        ) -> Vec<(String, Option<Fingerprint>)> {
            m.iter()
                .map(|(n, (spec, ann))| {
                    (
                        n.clone(),
                        fingerprint::observed(Some(ann), fingerprint::content(spec)),
                    )
                })
                .collect()
        }
        match kind {
            Kind::NodePolicySet => of(&self.nps),
            Kind::PolicyGroup => of(&self.pg),
            Kind::PeerSet => of(&self.ps),
        }
    }

    /// Every kind as observed, into a restarted index.
    pub fn observe_all(&self, index: &mut PolicyIndex) {
        for kind in [Kind::NodePolicySet, Kind::PolicyGroup, Kind::PeerSet] {
            index.reset_observed(kind, self.observed(kind));
        }
    }

    /// A node's policy as its agent assembles it from the store.
    pub fn node(&self, node: &str) -> Option<NodePolicySetSpec> {
        let (spec, _) = self.nps.get(node)?;
        Some(
            assemble_node(node, spec, |n| self.pg.get(n).map(|(s, _)| s))
                .unwrap_or_else(|gaps| panic!("NodePolicySet {node} is inconsistent: {gaps:?}")),
        )
    }

    /// A PeerSet's members as an agent assembles them.
    pub fn peer_set(&self, name: &str) -> Option<PeerSetSpec> {
        let (head, _) = self.ps.get(name)?;
        Some(
            assemble_peer_set(name, head, |n| self.ps.get(n).map(|(s, _)| s))
                .unwrap_or_else(|gaps| panic!("PeerSet {name} is inconsistent: {gaps:?}")),
        )
    }

    /// Every PeerSet (heads only), assembled.
    pub fn peer_sets(&self) -> BTreeMap<String, PeerSetSpec> {
        self.ps
            .iter()
            .filter(|(_, (s, _))| s.slice_of.is_none())
            .map(|(n, _)| (n.clone(), self.peer_set(n).unwrap_or_default()))
            .collect()
    }
}

/// The inputs of a cluster, as the watches would deliver them.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub namespaces: Vec<NamespaceInfo>,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
    pub policies: Vec<NetworkPolicy>,
}

impl World {
    /// A fresh index fed with everything.
    pub fn index(&self) -> PolicyIndex {
        self.index_with(Limits::default())
    }

    /// A fresh index with these size limits, fed with everything.
    pub fn index_with(&self, limits: Limits) -> PolicyIndex {
        let mut index = PolicyIndex::with_limits(limits);
        index.reset_nodes(self.nodes.clone());
        index.reset_namespaces(self.namespaces.clone());
        index.reset_pods(self.pods.clone());
        index.reset_policies(self.policies.clone());
        index
    }
}

/// An index plus the store it writes to.
pub struct Harness {
    pub index: PolicyIndex,
    pub store: Store,
    pub reports: Vec<PolicyReport>,
    pub reports_pods: Vec<PodIpReport>,
}

impl Harness {
    pub fn new(world: &World) -> Harness {
        Harness::with_limits(world, Limits::default())
    }

    pub fn with_limits(world: &World, limits: Limits) -> Harness {
        let mut h = Harness {
            index: world.index_with(limits),
            store: Store::default(),
            reports: Vec::new(),
            reports_pods: Vec::new(),
        };
        h.sync();
        h
    }

    /// Flushes and writes; returns the writes done.
    pub fn sync(&mut self) -> Vec<String> {
        let changes = self.index.flush();
        let before = self.store.writes.len();
        self.store.apply(&mut self.index, &changes);
        self.reports.extend(changes.reports);
        self.reports_pods.extend(changes.pod_reports);
        self.store.writes[before..].to_vec()
    }

    /// A node's policy as its agent assembles it.
    pub fn nps(&self, node: &str) -> NodePolicySetSpec {
        self.store
            .node(node)
            .unwrap_or_else(|| panic!("no NodePolicySet {node}; have {:?}", self.store.nps.keys()))
    }
}

// ----- builders ---------------------------------------------------------

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn ns(name: &str, extra: &[(&str, &str)]) -> NamespaceInfo {
    let mut l = labels(extra);
    l.insert("kubernetes.io/metadata.name".into(), name.into());
    NamespaceInfo {
        name: name.into(),
        labels: l,
    }
}

pub fn node(name: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        ..Default::default()
    }
}

pub fn pod(namespace: &str, name: &str, node: &str, ip: &str, l: &[(&str, &str)]) -> PodInfo {
    PodInfo {
        namespace: namespace.into(),
        name: name.into(),
        node: Some(node.into()),
        labels: labels(l),
        ips: if ip.is_empty() {
            vec![]
        } else {
            vec![ip.parse().unwrap()]
        },
        named_ports: vec![],
        host_network: false,
        finished: false,
        ..Default::default()
    }
}

pub fn named(name: &str, protocol: Protocol, port: u16) -> NamedPort {
    NamedPort {
        name: name.into(),
        protocol,
        port,
    }
}

pub fn np(yaml: &str) -> NetworkPolicy {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("bad policy yaml: {e}\n{yaml}"))
}

// ----- what an agent enforces ----------------------------------------------

/// Evaluates the written objects for one connection attempt, as an agent
/// would: the source's egress on its node, then the destination's ingress.
/// None when one side is not an endpoint with an IP.
pub fn enforced(
    store: &Store,
    src: &PodInfo,
    dst: &PodInfo,
    port: u16,
    proto: Protocol,
) -> Option<bool> {
    let src_ip = *src.ips.first()?;
    let dst_ip = *dst.ips.first()?;
    let (src_nps, src_ep) = endpoint(store, src)?;
    let (dst_nps, dst_ep) = endpoint(store, dst)?;
    let (src_nps, dst_nps) = (&src_nps, &dst_nps);
    let egress_ok = src_ep.egress_policies.is_empty()
        || src_ep.egress_policies.iter().any(|name| {
            let p = src_nps
                .policies
                .iter()
                .find(|p| &p.name == name)
                .unwrap_or_else(|| panic!("endpoint names policy {name} that the node lacks"));
            p.egress.iter().any(|r| {
                peers_match(store, r.peers.as_deref(), dst_ip)
                    && (r.ports.is_empty()
                        || r.ports.iter().any(|pm| {
                            pm.protocol == proto
                                && match (&pm.named_port, &pm.named_port_set) {
                                    (Some(_), Some(set)) => {
                                        peer_set(store, set).ports.iter().any(|m| {
                                            m.ip == dst_ip.to_string()
                                                && m.protocol == proto
                                                && m.port == port
                                        })
                                    }
                                    (Some(n), None) => {
                                        panic!("egress named port {n} without a set")
                                    }
                                    (None, _) => numeric(pm.port, pm.end_port, port),
                                }
                        }))
            })
        });
    let ingress_ok = dst_ep.ingress_policies.is_empty()
        || dst_ep.ingress_policies.iter().any(|name| {
            let p = dst_nps
                .policies
                .iter()
                .find(|p| &p.name == name)
                .unwrap_or_else(|| panic!("endpoint names policy {name} that the node lacks"));
            p.ingress.iter().any(|r| {
                peers_match(store, r.peers.as_deref(), src_ip)
                    && (r.ports.is_empty()
                        || r.ports.iter().any(|pm| {
                            pm.protocol == proto
                                && match &pm.named_port {
                                    Some(n) => dst_ep.named_ports.iter().any(|np| {
                                        &np.name == n && np.protocol == proto && np.port == port
                                    }),
                                    None => numeric(pm.port, pm.end_port, port),
                                }
                        }))
            })
        });
    Some(egress_ok && ingress_ok)
}

fn endpoint(store: &Store, pod: &PodInfo) -> Option<(NodePolicySetSpec, canal_crds::Endpoint)> {
    let nps = store.node(pod.node.as_deref()?)?;
    let ep = nps
        .endpoints
        .iter()
        .find(|e| e.namespace == pod.namespace && e.pod == pod.name)?
        .clone();
    Some((nps, ep))
}

fn peer_set(store: &Store, name: &str) -> PeerSetSpec {
    store
        .peer_set(name)
        .unwrap_or_else(|| panic!("a rule references PeerSet {name}, which was never written"))
}

fn peers_match(store: &Store, peers: Option<&[canal_crds::Peer]>, ip: IpAddr) -> bool {
    let Some(peers) = peers else {
        return true;
    };
    peers.iter().any(|p| match (&p.peer_set, &p.ip_block) {
        (Some(set), None) => peer_set(store, set).ips.contains(&ip.to_string()),
        (None, Some(b)) => {
            let cidr: IpNet = b.cidr.parse().unwrap();
            cidr.contains(&ip)
                && !b
                    .except
                    .iter()
                    .any(|e| e.parse::<IpNet>().unwrap().contains(&ip))
        }
        other => panic!("malformed peer {other:?}"),
    })
}

fn numeric(port: Option<u16>, end: Option<u16>, probe: u16) -> bool {
    match (port, end) {
        (None, _) => true,
        (Some(p), None) => p == probe,
        (Some(p), Some(e)) => p <= probe && probe <= e,
    }
}

/// Every (src, dst, port, proto) verdict the store enforces, compared with
/// the reference semantics; returns the mismatches as readable lines.
pub fn mismatches(world: &World, store: &Store) -> Vec<String> {
    let probes = [
        (80, Protocol::TCP),
        (81, Protocol::TCP),
        (8080, Protocol::TCP),
        (53, Protocol::UDP),
        (80, Protocol::UDP),
    ];
    let mut out = Vec::new();
    let node_exists: HashMap<&str, ()> =
        world.nodes.iter().map(|n| (n.name.as_str(), ())).collect();
    for src in &world.pods {
        for dst in &world.pods {
            let eligible = |p: &PodInfo| {
                !p.host_network
                    && !p.finished
                    && !p.ips.is_empty()
                    && p.node
                        .as_deref()
                        .is_some_and(|n| node_exists.contains_key(n))
            };
            if !eligible(src) || !eligible(dst) {
                continue;
            }
            for (port, proto) in probes {
                let want = reference::allowed(world, src, dst, port, proto);
                let got = enforced(store, src, dst, port, proto);
                if got != Some(want) {
                    out.push(format!(
                        "{}/{} -> {}/{} {port}/{proto:?}: reference {want}, enforced {got:?}",
                        src.namespace, src.name, dst.namespace, dst.name
                    ));
                }
            }
        }
    }
    out
}
