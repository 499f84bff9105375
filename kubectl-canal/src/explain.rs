//! What canal decides for one connection, and why (pure).
//!
//! Not a second model: each node's view is assembled from its NodePolicySet,
//! the PolicyGroups and PeerSets exactly as the agent assembles it
//! (`canal_crds::assemble`), turned into the agent's neutral `NodeModel` by
//! the agent's builder, and evaluated by the agent's evaluator, which is
//! tested against the iptables rendering and, in the kernel tests, real
//! packets on both dataplanes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use canal_agent::policy::eval::{self, Connection, PeerHit, PortHit, Reason, Side};
use canal_agent::policy::model::{self, Direction, Isolation, PeerModel, PortModel};
use canal_agent::policy::{EnforcementConfig, Families, NodeModel, PolicyInputs};
use canal_crds::assemble::{assemble_node, assemble_peer_set, referenced_peer_sets};
use canal_crds::condition::{ENFORCED, find};
use canal_crds::{NodePolicySetSpec, PeerSetSpec, Protocol};
use k8s_openapi::api::core::v1::{Node, Pod};

use crate::Error;
use crate::snapshot::Snapshot;
use crate::target::{Dest, PortSpec, Target};

/// Whether a node reports a generation of its NodePolicySet enforced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enforcement {
    /// The node.
    pub node: String,
    /// `metadata.generation` of the NodePolicySet (what this answer used).
    pub generation: Option<i64>,
    /// `status.observedGeneration`: what the agent last programmed.
    pub observed: Option<i64>,
    /// The Enforced condition's status (None: no condition yet).
    pub enforced: Option<bool>,
    /// Its reason and message.
    pub message: String,
    /// `status.dataplane`.
    pub dataplane: Option<String>,
}

impl Enforcement {
    /// The agent reports this very generation enforced.
    pub fn current(&self) -> bool {
        self.enforced == Some(true) && self.generation.is_some() && self.observed == self.generation
    }
}

/// A node's view as its agent assembles it.
#[derive(Clone, Debug)]
pub struct NodeView {
    /// The node.
    pub node: String,
    /// The assembled NodePolicySet.
    pub spec: NodePolicySetSpec,
    /// The referenced PeerSets (missing ones are absent: empty to the agent).
    pub peer_sets: BTreeMap<String, PeerSetSpec>,
    /// The agent's model of it.
    pub model: NodeModel,
    /// What the node reports.
    pub enforcement: Enforcement,
}

impl NodeView {
    /// Assembles node `name`'s view from the snapshot.
    pub fn build(
        snap: &Snapshot,
        config: EnforcementConfig,
        name: &str,
    ) -> Result<NodeView, Error> {
        let nps = snap
            .node_policy_sets
            .get(name)
            .ok_or_else(|| Error::NoNodePolicySet(name.to_string()))?;
        let gaps = |g: Vec<canal_crds::assemble::Gap>| Error::Inconsistent {
            node: name.to_string(),
            gaps: g
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        };
        let spec = assemble_node(name, &nps.spec, |n| snap.groups.get(n)).map_err(gaps)?;
        let mut peer_sets = BTreeMap::new();
        for set in referenced_peer_sets(&spec) {
            // A missing head is an empty set to the agent (the model warns).
            if let Some(head) = snap.peer_sets.get(&set) {
                let s = assemble_peer_set(&set, head, |n| snap.peer_sets.get(n)).map_err(gaps)?;
                peer_sets.insert(set, s);
            }
        }
        let mut config = config;
        // As the agent: IPv4 always, IPv6 once the node has an IPv6 subnet.
        config.families = Families {
            v4: true,
            v6: snap
                .nodes
                .get(name)
                .and_then(|n| n.spec.as_ref())
                .and_then(|s| s.pod_cidrs.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.contains(':'))),
        };
        let inputs = PolicyInputs {
            config,
            generation: nps.metadata.generation,
            spec: spec.clone(),
            peer_sets: peer_sets.clone(),
            endpoints_unknown: false,
        };
        let model = model::build(&inputs);
        let status = nps.status.clone().unwrap_or_default();
        let cond = find(&status.conditions, ENFORCED);
        Ok(NodeView {
            node: name.to_string(),
            spec,
            peer_sets,
            model,
            enforcement: Enforcement {
                node: name.to_string(),
                generation: nps.metadata.generation,
                observed: status.observed_generation,
                enforced: cond.map(|c| c.status == "True"),
                message: cond
                    .map(|c| format!("{}: {}", c.reason, c.message))
                    .unwrap_or_default(),
                dataplane: status.dataplane,
            },
        })
    }

    /// The interface of pod `key` on this node (the CNI plugin's name when
    /// the NodePolicySet does not list it: the agent drops such traffic).
    fn interface(&self, key: &str) -> String {
        self.spec
            .endpoints
            .iter()
            .find(|e| format!("{}/{}", e.namespace, e.pod) == key)
            .map(|e| e.interface.clone())
            .unwrap_or_else(|| {
                let (ns, pod) = key.split_once('/').unwrap_or((key, ""));
                canal_crds::names::veth_name(ns, pod)
            })
    }
}

/// One end of the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct End {
    /// `namespace/name` of a pod, or None for an address.
    pub pod: Option<String>,
    /// Its node (pods, node addresses).
    pub node: Option<String>,
    /// The address used.
    pub ip: IpAddr,
}

/// Why a rule did or did not match (one per rule of an isolating policy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Miss {
    /// The policy.
    pub policy: String,
    /// The rule index (None: the policy has no rule in this direction).
    pub rule: Option<usize>,
    /// Some peer of the rule matched.
    pub peer: bool,
    /// Some port of the rule matched.
    pub port: bool,
}

/// The decision of one direction, with its evidence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A pod's connection to itself never leaves the pod.
    SamePod,
    /// The direction is not policed (why).
    NotPoliced(String),
    /// No policy isolates the pod in this direction.
    NotIsolated,
    /// Isolated, and this rule allows.
    Allowed {
        /// Isolating policies.
        isolated_by: Vec<String>,
        /// The policy that allows.
        policy: String,
        /// Its rule (index in the direction's rules).
        rule: usize,
        /// The peer that matched.
        peer: String,
        /// The port that matched (named ports resolved).
        port: String,
    },
    /// Isolated and no rule allows.
    Denied {
        /// Isolating policies.
        isolated_by: Vec<String>,
        /// Each rule and what of it did not match.
        misses: Vec<Miss>,
    },
    /// The pod is not in its node's NodePolicySet (not compiled yet): the
    /// node drops traffic of interfaces it does not know.
    UnknownEndpoint(String),
    /// The source address is not the pod's (anti-spoofing).
    Spoofed,
    /// `defaultEndpointToHostAction: Drop`.
    HostDrop,
}

/// One direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectionReport {
    /// Ingress or egress.
    pub direction: Direction,
    /// The pod whose policy applies (None: no pod end).
    pub pod: Option<String>,
    /// The node that decides.
    pub enforcement: Option<Enforcement>,
    /// Whether it allows.
    pub allowed: bool,
    /// Why.
    pub verdict: Verdict,
    /// Model warnings of that node about what this direction uses.
    pub warnings: Vec<String>,
    /// The pod's interface on that node (what its chains are named after).
    pub interface: Option<String>,
}

impl DirectionReport {
    /// The chains this direction's decision runs through on `dataplane`
    /// (`iptables` or `nftables`): the pod's endpoint chain and the
    /// isolating policies' chains.
    pub fn chains(&self, dataplane: &str) -> Vec<String> {
        use canal_agent::policy::names;
        use canal_agent::policy::nft::render as nft;
        let Some(iface) = &self.interface else {
            return Vec::new();
        };
        let policies: &[String] = match &self.verdict {
            Verdict::Allowed { isolated_by, .. } | Verdict::Denied { isolated_by, .. } => {
                isolated_by
            }
            _ => &[],
        };
        let nft = dataplane == "nftables";
        let mut out = vec![match (nft, self.direction) {
            (true, d) => nft::endpoint_chain_name(iface, d),
            (false, Direction::Ingress) => names::to_endpoint_chain(iface),
            (false, Direction::Egress) => names::from_endpoint_chain(iface),
        }];
        out.extend(policies.iter().map(|p| match (nft, self.direction) {
            (true, d) => nft::policy_chain_name(p, d),
            (false, Direction::Ingress) => names::policy_ingress_chain(p),
            (false, Direction::Egress) => names::policy_egress_chain(p),
        }));
        out
    }
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// Both directions allow.
    pub allowed: bool,
    /// The source.
    pub from: End,
    /// The destination.
    pub to: End,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
    /// The port's name when given by name.
    pub port_name: Option<String>,
    /// The source's egress on its node.
    pub egress: DirectionReport,
    /// The destination's ingress on its node.
    pub ingress: DirectionReport,
}

/// Explains many connections against one snapshot (node views built once).
pub struct Explainer<'a> {
    snap: &'a Snapshot,
    config: EnforcementConfig,
    views: BTreeMap<String, NodeView>,
}

impl<'a> Explainer<'a> {
    /// Reads the network configuration of the snapshot.
    pub fn new(snap: &'a Snapshot) -> Result<Explainer<'a>, Error> {
        let net = snap.network.as_ref().ok_or(Error::NoNetwork)?;
        let config = net
            .spec
            .validate()
            .map_err(|e| Error::InvalidNetwork(e.to_string()))?;
        Ok(Explainer {
            snap,
            config: EnforcementConfig::from(&config),
            views: BTreeMap::new(),
        })
    }

    /// Node `name`'s view (built on first use; errors are not kept).
    pub fn view(&mut self, name: &str) -> Result<&NodeView, Error> {
        if !self.views.contains_key(name) {
            let v = NodeView::build(self.snap, self.config, name)?;
            self.views.insert(name.to_string(), v);
        }
        Ok(&self.views[name])
    }

    /// Explains `from` -> `to`.
    pub fn explain(&mut self, from: &str, to: &Target) -> Result<Explanation, Error> {
        let snap = self.snap;
        let src_pod = pod(snap, from)?;
        let src_node = node_of(from, src_pod)?;
        let src_ips = pod_ips(src_pod);
        // The destination: a pod, a pod's address, a node's address, or outside.
        let (dst_pod_key, dst_ip, dst_node): (Option<String>, IpAddr, Option<String>) =
            match &to.dest {
                Dest::Pod(key) => {
                    let p = pod(snap, key)?;
                    let node = node_of(key, p)?;
                    let ips = pod_ips(p);
                    let ip = ips
                        .iter()
                        .find(|ip| src_ips.iter().any(|s| s.is_ipv4() == ip.is_ipv4()))
                        .or(ips.first())
                        .copied()
                        .ok_or_else(|| no_ip(key, p, true))?;
                    (Some(key.clone()), ip, Some(node))
                }
                Dest::Ip(ip) => match pod_with_ip(snap, ip) {
                    Some((key, p)) => (Some(key.clone()), *ip, Some(node_of(key, p)?)),
                    None => (None, *ip, node_with_ip(snap, ip)),
                },
            };
        let src_ip = src_ips
            .iter()
            .find(|s| s.is_ipv4() == dst_ip.is_ipv4())
            .copied()
            .ok_or_else(|| no_ip(from, src_pod, dst_ip.is_ipv4()))?;
        let (port, port_name) = match &to.port {
            Some(PortSpec::Number(n)) => (*n, None),
            Some(PortSpec::Name(name)) => {
                let p = dst_pod_key
                    .as_deref()
                    .and_then(|k| snap.pods.get(k))
                    .ok_or_else(|| {
                        Error::Usage(format!(
                            "port {name:?} is a name: only a pod destination resolves names"
                        ))
                    })?;
                let n = container_port(p, name, to.protocol).ok_or_else(|| {
                    Error::Usage(format!(
                        "pod {} declares no {} port named {name:?}",
                        dst_pod_key.as_deref().unwrap_or_default(),
                        to.protocol.as_lower()
                    ))
                })?;
                (n, Some(name.clone()))
            }
            None => {
                return Err(Error::Usage(
                    "give the destination port: TO:PORT[/PROTO], e.g. y/b:80/TCP".into(),
                ));
            }
        };
        let from_end = End {
            pod: Some(from.to_string()),
            node: Some(src_node.clone()),
            ip: src_ip,
        };
        let to_end = End {
            pod: dst_pod_key.clone(),
            node: dst_node.clone(),
            ip: dst_ip,
        };
        let same_pod = dst_pod_key.as_deref() == Some(from);
        let protocol = to.protocol;
        let (egress, same_node_ingress) = if same_pod {
            (self.same_pod(Direction::Egress, from), None)
        } else {
            let view = self.view(&src_node)?;
            let src_iface = view.interface(from);
            let local_dst = dst_node.as_deref() == Some(src_node.as_str());
            let to_side = match &dst_pod_key {
                Some(k) if local_dst => Side::Pod(view.interface(k)),
                None if local_dst => Side::Host,
                _ => Side::Remote,
            };
            let c = Connection {
                from: Side::Pod(src_iface.clone()),
                to: to_side.clone(),
                src: src_ip,
                dst: dst_ip,
                protocol,
                port,
            };
            let e = eval::evaluate(&view.model, &c);
            let egress = report(
                view,
                Direction::Egress,
                Some(from),
                &src_iface,
                &c,
                &e.egress,
            );
            let ingress = match (&to_side, &dst_pod_key) {
                (Side::Pod(iface), Some(k)) => Some(report(
                    view,
                    Direction::Ingress,
                    Some(k),
                    iface,
                    &c,
                    &e.ingress,
                )),
                (Side::Host, _) => Some(DirectionReport {
                    direction: Direction::Ingress,
                    pod: None,
                    enforcement: Some(view.enforcement.clone()),
                    allowed: e.ingress == Reason::NotPoliced,
                    verdict: match e.ingress {
                        Reason::HostDrop => Verdict::HostDrop,
                        _ => Verdict::NotPoliced(format!(
                            "{dst_ip} is node {src_node} itself: defaultEndpointToHostAction Accept"
                        )),
                    },
                    warnings: Vec::new(),
                    interface: None,
                }),
                _ => None,
            };
            (egress, ingress)
        };
        let ingress = match (same_node_ingress, &dst_pod_key, &dst_node) {
            _ if same_pod => self.same_pod(Direction::Ingress, from),
            (Some(r), _, _) => r,
            (None, Some(k), Some(node)) => {
                let view = self.view(node)?;
                let iface = view.interface(k);
                let c = Connection {
                    from: Side::Remote,
                    to: Side::Pod(iface.clone()),
                    src: src_ip,
                    dst: dst_ip,
                    protocol,
                    port,
                };
                let e = eval::evaluate(&view.model, &c);
                report(view, Direction::Ingress, Some(k), &iface, &c, &e.ingress)
            }
            _ => DirectionReport {
                direction: Direction::Ingress,
                pod: None,
                enforcement: None,
                allowed: true,
                verdict: Verdict::NotPoliced(match &dst_node {
                    Some(n) => {
                        format!("{dst_ip} is node {n}'s address: no pod policy applies there")
                    }
                    None => format!(
                        "{dst_ip} is no pod of the cluster: only the source's egress applies"
                    ),
                }),
                warnings: Vec::new(),
                interface: None,
            },
        };
        Ok(Explanation {
            allowed: egress.allowed && ingress.allowed,
            from: from_end,
            to: to_end,
            protocol,
            port,
            port_name,
            egress,
            ingress,
        })
    }

    fn same_pod(&self, direction: Direction, pod: &str) -> DirectionReport {
        DirectionReport {
            direction,
            pod: Some(pod.to_string()),
            enforcement: None,
            allowed: true,
            verdict: Verdict::SamePod,
            warnings: Vec::new(),
            interface: None,
        }
    }
}

/// Explains one connection.
pub fn explain(snap: &Snapshot, from: &str, to: &Target) -> Result<Explanation, Error> {
    Explainer::new(snap)?.explain(from, to)
}

/// Turns the evaluator's reason into the evidence of one direction.
fn report(
    view: &NodeView,
    direction: Direction,
    pod: Option<&str>,
    iface: &str,
    c: &Connection,
    reason: &Reason,
) -> DirectionReport {
    let isolated_by = match view
        .model
        .endpoints
        .get(iface)
        .map(|e| e.isolation(direction))
    {
        Some(Isolation::By(list)) => list.clone(),
        _ => Vec::new(),
    };
    let verdict = match reason {
        Reason::NotPoliced => Verdict::NotPoliced(if view.model.enabled {
            "not policed on this path".into()
        } else {
            "policy.enabled is false: only anti-spoofing applies".into()
        }),
        Reason::NotIsolated => Verdict::NotIsolated,
        Reason::AllowedBy { policy, rule } => {
            let m = view
                .model
                .policies
                .get(policy)
                .and_then(|p| p.rules(direction))
                .and_then(|r| r.get(*rule))
                .map(|r| eval::rule_match(&view.model, r, direction, c));
            Verdict::Allowed {
                isolated_by: isolated_by.clone(),
                policy: policy.clone(),
                rule: *rule,
                peer: m
                    .as_ref()
                    .and_then(|m| m.peer.as_ref())
                    .map(|p| describe_peer(view, p))
                    .unwrap_or_default(),
                port: m
                    .as_ref()
                    .and_then(|m| m.port.as_ref())
                    .map(|p| describe_port(view, p, c, pod))
                    .unwrap_or_default(),
            }
        }
        Reason::NoPolicyAllows => {
            let mut misses = Vec::new();
            for name in &isolated_by {
                let rules = view
                    .model
                    .policies
                    .get(name)
                    .and_then(|p| p.rules(direction))
                    .map(|r| r.as_slice())
                    .unwrap_or_default();
                if rules.is_empty() {
                    misses.push(Miss {
                        policy: name.clone(),
                        rule: None,
                        peer: false,
                        port: false,
                    });
                }
                for (i, r) in rules.iter().enumerate() {
                    let m = eval::rule_match(&view.model, r, direction, c);
                    misses.push(Miss {
                        policy: name.clone(),
                        rule: Some(i),
                        peer: m.peer.is_some(),
                        port: m.port.is_some(),
                    });
                }
            }
            Verdict::Denied {
                isolated_by: isolated_by.clone(),
                misses,
            }
        }
        Reason::UnknownInterface => Verdict::UnknownEndpoint(iface.to_string()),
        Reason::Spoofed => Verdict::Spoofed,
        Reason::HostDrop => Verdict::HostDrop,
    };
    let warnings = relevant_warnings(view, &isolated_by, pod);
    DirectionReport {
        direction,
        pod: pod.map(str::to_string),
        enforcement: Some(view.enforcement.clone()),
        allowed: matches!(
            reason,
            Reason::NotPoliced | Reason::NotIsolated | Reason::AllowedBy { .. }
        ),
        verdict,
        warnings,
        interface: Some(iface.to_string()),
    }
}

/// The node's model warnings that concern this pod or its policies, or the
/// PeerSets those reference.
fn relevant_warnings(view: &NodeView, policies: &[String], pod: Option<&str>) -> Vec<String> {
    use canal_agent::policy::Warning as W;
    let sets: Vec<&String> = view
        .model
        .policies
        .iter()
        .filter(|(n, _)| policies.contains(n))
        .flat_map(|(_, p)| p.ingress.iter().chain(p.egress.iter()))
        .flat_map(|rules| rules.iter())
        .flat_map(|r| r.peers.iter().flatten())
        .filter_map(|p| match p {
            PeerModel::Set(s) => Some(s),
            PeerModel::Block(_) => None,
        })
        .collect();
    view.model
        .warnings
        .iter()
        .filter(|w| match w {
            W::InvalidInterface { pod: p, .. }
            | W::DuplicateInterface { pod: p, .. }
            | W::UnknownPolicy { pod: p, .. } => Some(p.as_str()) == pod,
            W::MissingPeerSet { peer_set } => sets.contains(&peer_set),
            W::InvalidPeer { policy } | W::InvalidPort { policy } => policies.contains(policy),
            W::MissingNamedPortSet { policy, .. } => policies.contains(policy),
            W::InvalidAddress { .. } => true,
        })
        .map(ToString::to_string)
        .collect()
}

fn describe_peer(view: &NodeView, hit: &PeerHit) -> String {
    match hit {
        PeerHit::Any => "any peer (the rule names none)".into(),
        PeerHit::Peer(PeerModel::Block(b)) if b.except.is_empty() => format!("ipBlock {}", b.cidr),
        PeerHit::Peer(PeerModel::Block(b)) => format!(
            "ipBlock {} except {}",
            b.cidr,
            b.except
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
        PeerHit::Peer(PeerModel::Set(name)) => {
            let members = view.model.peer_sets.get(name).map_or(0, |s| s.len());
            match view.peer_sets.get(name) {
                Some(s) => format!(
                    "PeerSet {name} ({}; {members} members)",
                    crate::format::selector(&s.selector)
                ),
                None => format!("PeerSet {name} (missing: matches nobody)"),
            }
        }
    }
}

fn describe_port(view: &NodeView, hit: &PortHit, c: &Connection, pod: Option<&str>) -> String {
    let proto = |p: &Protocol| p.as_lower().to_ascii_uppercase();
    match hit {
        PortHit::Any => "any port (the rule names none)".into(),
        PortHit::Port(PortModel::Protocol(p)) => format!("any {} port", proto(p)),
        PortHit::Port(PortModel::Ranges(p, ranges)) => {
            let (s, e) = ranges
                .iter()
                .find(|&&(s, e)| (s..=e).contains(&c.port))
                .copied()
                .unwrap_or((c.port, c.port));
            if s == e {
                format!("{} {s}", proto(p))
            } else {
                format!("{} {s}-{e}", proto(p))
            }
        }
        PortHit::Port(PortModel::LocalNamed(p, name)) => format!(
            "named port {name} = {} {} on {}",
            proto(p),
            c.port,
            pod.unwrap_or("the destination")
        ),
        PortHit::Port(PortModel::PeerNamed(p, set)) => {
            let name = view
                .peer_sets
                .get(set)
                .and_then(|s| s.selector.named_port.as_ref())
                .map_or("?", |n| n.name.as_str());
            format!(
                "named port {name} = {} {} on {} (PeerSet {set})",
                proto(p),
                c.port,
                c.dst
            )
        }
    }
}

fn pod<'s>(snap: &'s Snapshot, key: &str) -> Result<&'s Pod, Error> {
    let p = snap
        .pods
        .get(key)
        .ok_or_else(|| Error::UnknownPod(key.to_string()))?;
    if p.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return Err(Error::HostNetwork(key.to_string()));
    }
    Ok(p)
}

fn node_of(key: &str, p: &Pod) -> Result<String, Error> {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Error::Unscheduled(key.to_string()))
}

/// The pod's addresses (status.podIPs, else status.podIP).
pub fn pod_ips(p: &Pod) -> Vec<IpAddr> {
    let Some(status) = p.status.as_ref() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|i| i.ip.parse().ok())
        .collect();
    if out.is_empty() {
        out.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|i| i.parse::<IpAddr>().ok()),
        );
    }
    out
}

fn no_ip(key: &str, p: &Pod, v4: bool) -> Error {
    Error::NoPodIp {
        pod: key.to_string(),
        family: if v4 { "IPv4" } else { "IPv6" },
        phase: p
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "unknown".into()),
    }
}

fn pod_with_ip<'s>(snap: &'s Snapshot, ip: &IpAddr) -> Option<(&'s String, &'s Pod)> {
    snap.pods.iter().find(|(_, p)| {
        p.spec.as_ref().and_then(|s| s.host_network) != Some(true) && pod_ips(p).contains(ip)
    })
}

fn node_with_ip(snap: &Snapshot, ip: &IpAddr) -> Option<String> {
    let text = ip.to_string();
    let holds = |n: &Node| {
        n.status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .is_some_and(|a| a.iter().any(|a| a.address == text))
    };
    snap.nodes
        .iter()
        .find(|(_, n)| holds(n))
        .map(|(k, _)| k.clone())
}

fn container_port(p: &Pod, name: &str, protocol: Protocol) -> Option<u16> {
    p.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|cp| {
            cp.name.as_deref() == Some(name)
                && cp.protocol.as_deref().unwrap_or("TCP")
                    == protocol.as_lower().to_ascii_uppercase()
        })
        .and_then(|cp| u16::try_from(cp.container_port).ok())
}
