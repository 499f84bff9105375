//! Tests of the policy compiler as a whole: a simulated API server that
//! holds what the index writes, an evaluator of the written objects (what
//! an agent enforces), an independent reference evaluator of the
//! NetworkPolicy semantics, table tests and property tests.

mod pod_ips;
mod properties;
mod reference;
mod scenarios;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use canal_crds::{NamedPort, NodePolicySetSpec, PeerSetSpec, Protocol};
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::fingerprint::{self, Fingerprint};
use super::index::{Change, Changes, PodIpReport, PolicyIndex, PolicyReport};
use super::input::{NamespaceInfo, NodeInfo, PodInfo};

/// The objects of the simulated API server, with the annotation the
/// controller writes.
#[derive(Clone, Debug, Default)]
pub struct Store {
    pub nps: BTreeMap<String, (NodePolicySetSpec, String)>,
    pub ps: BTreeMap<String, (PeerSetSpec, String)>,
    pub writes: Vec<String>,
}

impl Store {
    /// Carries out a flush's changes the way the controller does.
    pub fn apply(&mut self, index: &mut PolicyIndex, changes: &Changes) {
        for c in &changes.peer_sets {
            if let Change::Apply(name) = c {
                let r = index
                    .render_peer_set(name)
                    .expect("flush asked to apply a known set");
                let ann =
                    fingerprint::annotation_value(r.fingerprint, fingerprint::content(&r.spec));
                self.ps.insert(name.to_string(), (r.spec, ann));
                index.mark_peer_set_written(name, Some(r.fingerprint));
                self.writes.push(format!("apply PeerSet {name}"));
            }
        }
        for c in &changes.node_policy_sets {
            match c {
                Change::Apply(name) => {
                    let r = index
                        .render_node_policy_set(name)
                        .expect("flush asked to apply a known node");
                    let ann =
                        fingerprint::annotation_value(r.fingerprint, fingerprint::content(&r.spec));
                    self.nps.insert(name.to_string(), (r.spec, ann));
                    index.mark_node_policy_set_written(name, Some(r.fingerprint));
                    self.writes.push(format!("apply NodePolicySet {name}"));
                }
                Change::Delete(name) => {
                    self.nps.remove(&**name);
                    index.mark_node_policy_set_written(name, None);
                    self.writes.push(format!("delete NodePolicySet {name}"));
                }
            }
        }
        for c in &changes.peer_sets {
            if let Change::Delete(name) = c {
                self.ps.remove(&**name);
                index.mark_peer_set_written(name, None);
                self.writes.push(format!("delete PeerSet {name}"));
            }
        }
    }

    /// What a watch of the store reports to a (restarted) controller.
    pub fn observed_nps(&self) -> Vec<(String, Option<Fingerprint>)> {
        self.nps
            .iter()
            .map(|(n, (spec, ann))| {
                (
                    n.clone(),
                    fingerprint::observed(Some(ann), fingerprint::content(spec)),
                )
            })
            .collect()
    }

    pub fn observed_ps(&self) -> Vec<(String, Option<Fingerprint>)> {
        self.ps
            .iter()
            .map(|(n, (spec, ann))| {
                (
                    n.clone(),
                    fingerprint::observed(Some(ann), fingerprint::content(spec)),
                )
            })
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
        let mut index = PolicyIndex::new();
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
        let mut h = Harness {
            index: world.index(),
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

    pub fn nps(&self, node: &str) -> &NodePolicySetSpec {
        &self
            .store
            .nps
            .get(node)
            .unwrap_or_else(|| panic!("no NodePolicySet {node}; have {:?}", self.store.nps.keys()))
            .0
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

fn endpoint<'a>(
    store: &'a Store,
    pod: &PodInfo,
) -> Option<(&'a NodePolicySetSpec, &'a canal_crds::Endpoint)> {
    let nps = &store.nps.get(pod.node.as_deref()?)?.0;
    let ep = nps
        .endpoints
        .iter()
        .find(|e| e.namespace == pod.namespace && e.pod == pod.name)?;
    Some((nps, ep))
}

fn peer_set<'a>(store: &'a Store, name: &str) -> &'a PeerSetSpec {
    &store
        .ps
        .get(name)
        .unwrap_or_else(|| panic!("a rule references PeerSet {name}, which was never written"))
        .0
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
