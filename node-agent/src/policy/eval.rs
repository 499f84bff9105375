//! A pure evaluator of the neutral [`NodeModel`]: what a node decides
//! for one new connection, and why (`kubectl canal explain` builds on it).
//! It states the semantics both renderers implement; the tests below walk
//! the iptables rendering of the same inputs (`sim.rs`) for every flow of a
//! grid and require the same verdicts, and the kernel tests check both
//! dataplanes with real packets.

use std::net::IpAddr;

use canal_crds::{EndpointToHostAction, Protocol};

use super::antispoof::Sources;
use super::model::{Direction, Isolation, NodeModel, PeerModel, PortModel, RuleModel};

/// One end of a connection as the node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Side {
    /// A pod of this node, by its interface.
    Pod(String),
    /// This node itself.
    Host,
    /// Anything reached through another interface (remote pods, the world).
    Remote,
}

/// A new connection (its first packet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// Where it comes from.
    pub from: Side,
    /// Where it goes.
    pub to: Side,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
}

/// Why one direction allowed or denied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The direction is not policed here (host traffic, remote ends).
    NotPoliced,
    /// No policy isolates the pod in this direction.
    NotIsolated,
    /// Rule `rule` of `policy` allows it.
    AllowedBy { policy: String, rule: usize },
    /// Isolated and no policy allows it.
    NoPolicyAllows,
    /// The interface is no endpoint of this node (unknown pods are dropped).
    UnknownInterface,
    /// The source is not an address of the sending pod (anti-spoofing).
    Spoofed,
    /// `defaultEndpointToHostAction: Drop`.
    HostDrop,
}

impl Reason {
    fn allows(&self) -> bool {
        matches!(
            self,
            Reason::NotPoliced | Reason::NotIsolated | Reason::AllowedBy { .. }
        )
    }
}

/// The decision and its reasons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// Whether the connection is allowed.
    pub allowed: bool,
    /// The source pod's egress side.
    pub egress: Reason,
    /// The destination pod's ingress side.
    pub ingress: Reason,
}

/// What the node decides for `c`. While policy is disabled only
/// anti-spoofing applies.
pub fn evaluate(model: &NodeModel, c: &Connection) -> Explanation {
    let egress = match &c.from {
        Side::Pod(iface) => match spoofed(model, iface, &c.src) {
            true => Reason::Spoofed,
            false if !model.enabled => Reason::NotPoliced,
            false => direction(model, iface, Direction::Egress, c),
        },
        _ => Reason::NotPoliced,
    };
    let ingress = match (&c.to, model.enabled) {
        (Side::Pod(iface), true) if matches!(c.from, Side::Host) => {
            // Host -> pod (kubelet probes) is never policed.
            let _ = iface;
            Reason::NotPoliced
        }
        (Side::Pod(iface), true) => direction(model, iface, Direction::Ingress, c),
        (Side::Host, true)
            if matches!(c.from, Side::Pod(_))
                && model.endpoint_to_host == EndpointToHostAction::Drop =>
        {
            Reason::HostDrop
        }
        _ => Reason::NotPoliced,
    };
    Explanation {
        allowed: egress.allows() && ingress.allows(),
        egress,
        ingress,
    }
}

fn spoofed(model: &NodeModel, iface: &str, src: &IpAddr) -> bool {
    match model.sources.endpoints.as_ref().and_then(|e| e.get(iface)) {
        Some(Sources::Addresses(addrs)) => !addrs.contains(src),
        // Not known yet, or only routed: the reverse-path check decides,
        // which a connection from the pod's own address passes.
        _ => false,
    }
}

fn direction(model: &NodeModel, iface: &str, dir: Direction, c: &Connection) -> Reason {
    let Some(ep) = model.endpoints.get(iface) else {
        return Reason::UnknownInterface;
    };
    let Isolation::By(policies) = ep.isolation(dir) else {
        return Reason::NotIsolated;
    };
    for name in policies {
        let Some(rules) = model.policies.get(name).and_then(|p| p.rules(dir)) else {
            continue;
        };
        if let Some(i) = rules.iter().position(|r| rule_matches(model, r, dir, c)) {
            return Reason::AllowedBy {
                policy: name.clone(),
                rule: i,
            };
        }
    }
    Reason::NoPolicyAllows
}

fn rule_matches(model: &NodeModel, r: &RuleModel, dir: Direction, c: &Connection) -> bool {
    let m = rule_match(model, r, dir, c);
    m.peer.is_some() && m.port.is_some()
}

/// Which peer of a rule matched (for explanations).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerHit {
    /// The rule names no peers: any peer.
    Any,
    /// This peer of the rule's list.
    Peer(PeerModel),
}

/// Which port entry of a rule matched (for explanations).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortHit {
    /// The rule names no ports: any port and protocol.
    Any,
    /// This entry of the rule's list; named ports are resolved to the
    /// connection's port through the node's sets.
    Port(PortModel),
}

/// How one rule relates to a connection: the peer and the port that
/// matched (None: none did). The rule allows when both are Some.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleMatch {
    /// The peer that matched.
    pub peer: Option<PeerHit>,
    /// The port entry that matched.
    pub port: Option<PortHit>,
}

/// The peer and port of rule `r` that match `c` in direction `dir`
/// (the first of each, in the rule's order).
pub fn rule_match(model: &NodeModel, r: &RuleModel, dir: Direction, c: &Connection) -> RuleMatch {
    let peer_addr = match dir {
        Direction::Ingress => c.src,
        Direction::Egress => c.dst,
    };
    let peer = match &r.peers {
        None => Some(PeerHit::Any),
        Some(list) => list
            .iter()
            .find(|p| match p {
                PeerModel::Set(ps) => model
                    .peer_sets
                    .get(ps)
                    .is_some_and(|s| s.contains(&peer_addr)),
                PeerModel::Block(b) => b.contains(&peer_addr),
            })
            .map(|p| PeerHit::Peer(p.clone())),
    };
    let port = match &r.ports {
        None => Some(PortHit::Any),
        Some(list) => list
            .iter()
            .find(|p| match p {
                PortModel::Protocol(proto) => *proto == c.protocol,
                PortModel::Ranges(proto, ranges) => {
                    *proto == c.protocol && ranges.iter().any(|&(s, e)| (s..=e).contains(&c.port))
                }
                PortModel::LocalNamed(proto, name) => {
                    *proto == c.protocol
                        && model
                            .local_ports
                            .get(&(*proto, name.clone()))
                            .is_some_and(|s| s.members.contains(&(c.dst, c.protocol, c.port)))
                }
                PortModel::PeerNamed(proto, ps) => {
                    *proto == c.protocol
                        && model
                            .port_sets
                            .get(ps)
                            .is_some_and(|s| s.members.contains(&(c.dst, c.protocol, c.port)))
                }
            })
            .map(|p| PortHit::Port(p.clone())),
    };
    RuleMatch { peer, port }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;
    use crate::policy::model::build;
    use crate::policy::render::{PolicyInputs, render};
    use crate::policy::sim::{Ct, Packet, Verdict, walk};

    /// The golden test's richest input (every rule shape).
    fn web_mixed() -> PolicyInputs {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Case {
            generation: Option<i64>,
            spec: canal_crds::NodePolicySetSpec,
            #[serde(default)]
            peer_sets: BTreeMap<String, canal_crds::PeerSetSpec>,
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/web-mixed.yaml");
        let c: Case = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        PolicyInputs {
            generation: c.generation,
            spec: c.spec,
            peer_sets: c.peer_sets,
            ..PolicyInputs::default()
        }
    }

    #[test]
    fn the_model_and_the_iptables_rendering_agree_on_every_flow() {
        let inputs = web_mixed();
        let model = build(&inputs);
        let ruleset = render(&inputs).ruleset;
        // Every local pod (by its own address), a remote pod address, some
        // outside addresses, on a grid of protocols and ports.
        let mut ends: Vec<(Side, IpAddr)> = inputs
            .spec
            .endpoints
            .iter()
            .filter_map(|e| Some((Side::Pod(e.interface.clone()), e.ips.first()?.parse().ok()?)))
            .collect();
        for ip in [
            "10.244.2.9",
            "10.244.3.3",
            "192.0.2.10",
            "10.0.0.1",
            "172.16.5.5",
        ] {
            ends.push((Side::Remote, ip.parse().unwrap()));
        }
        for (_, ip) in inputs
            .peer_sets
            .values()
            .flat_map(|p| p.ips.iter().map(|i| ((), i)))
        {
            if let Ok(ip) = ip.parse() {
                ends.push((Side::Remote, ip));
            }
        }
        let mut checked = 0;
        let mut failures = Vec::new();
        for (from, src) in &ends {
            for (to, dst) in &ends {
                if from == to || (from == &Side::Remote && to == &Side::Remote) {
                    continue;
                }
                for protocol in [Protocol::TCP, Protocol::UDP, Protocol::SCTP] {
                    for port in [53, 80, 443, 5432, 6000, 8080, 9090] {
                        let c = Connection {
                            from: from.clone(),
                            to: to.clone(),
                            src: *src,
                            dst: *dst,
                            protocol,
                            port,
                        };
                        let want = evaluate(&model, &c);
                        let iface = |s: &Side| match s {
                            Side::Pod(i) => i.clone(),
                            _ => "flannel.1".to_string(),
                        };
                        let (IpAddr::V4(s4), IpAddr::V4(d4)) = (src, dst) else {
                            continue;
                        };
                        let p = Packet {
                            hook: "FORWARD",
                            iif: Some(iface(from)),
                            oif: Some(iface(to)),
                            src: *s4,
                            dst: *d4,
                            proto: protocol,
                            dport: port,
                            ct: Ct::New,
                            rpf_ok: true,
                        };
                        let got = walk(&ruleset, &p);
                        let walked = got != Verdict::Drop;
                        checked += 1;
                        if walked != want.allowed {
                            failures.push(format!("{c:?}: model {want:?}, iptables {got:?}"));
                        }
                    }
                }
            }
        }
        assert!(checked > 1000, "{checked}");
        assert!(
            failures.is_empty(),
            "{} of {checked} differ:\n{}",
            failures.len(),
            failures[..failures.len().min(10)].join("\n")
        );
    }

    #[test]
    fn explanations_name_the_rule_or_the_gap() {
        let inputs = web_mixed();
        let model = build(&inputs);
        let isolated = model
            .endpoints
            .iter()
            .find(|(_, e)| matches!(e.ingress, Isolation::By(_)))
            .map(|(i, _)| i.clone())
            .unwrap();
        let c = Connection {
            from: Side::Remote,
            to: Side::Pod(isolated.clone()),
            src: "203.0.113.77".parse().unwrap(),
            dst: "10.244.1.250".parse().unwrap(),
            protocol: Protocol::TCP,
            port: 1,
        };
        let e = evaluate(&model, &c);
        assert!(!e.allowed);
        assert_eq!(e.ingress, Reason::NoPolicyAllows);
        let unknown = Connection {
            to: Side::Pod("calinothere0000".into()),
            ..c.clone()
        };
        assert_eq!(evaluate(&model, &unknown).ingress, Reason::UnknownInterface);
        let host = Connection {
            from: Side::Host,
            ..c
        };
        assert!(
            evaluate(&model, &host).allowed,
            "host traffic is never policed"
        );
    }

    #[test]
    fn rule_match_names_the_peer_and_port_that_matched() {
        use crate::policy::model::{Block, PeerModel, PortModel, RuleModel};
        let model = NodeModel::default();
        let block = |c: &str| {
            PeerModel::Block(Block {
                cidr: c.parse().unwrap(),
                except: vec![],
            })
        };
        let rule = RuleModel {
            ports: Some(vec![
                PortModel::Ranges(Protocol::TCP, vec![(80, 81)]),
                PortModel::Protocol(Protocol::UDP),
            ]),
            peers: Some(vec![block("192.0.2.0/25"), block("192.0.2.0/24")]),
        };
        let c = Connection {
            from: Side::Remote,
            to: Side::Pod("calia".into()),
            src: "192.0.2.200".parse().unwrap(),
            dst: "10.244.1.2".parse().unwrap(),
            protocol: Protocol::TCP,
            port: 81,
        };
        let m = rule_match(&model, &rule, Direction::Ingress, &c);
        assert_eq!(
            m.peer,
            Some(PeerHit::Peer(block("192.0.2.0/24"))),
            "the second peer"
        );
        assert_eq!(
            m.port,
            Some(PortHit::Port(PortModel::Ranges(
                Protocol::TCP,
                vec![(80, 81)]
            )))
        );
        // Egress matches the destination, not the source.
        let m = rule_match(&model, &rule, Direction::Egress, &c);
        assert_eq!(m.peer, None);
        let udp = Connection {
            protocol: Protocol::UDP,
            port: 9,
            ..c.clone()
        };
        let m = rule_match(&model, &rule, Direction::Ingress, &udp);
        assert_eq!(
            m.port,
            Some(PortHit::Port(PortModel::Protocol(Protocol::UDP)))
        );
        let any = RuleModel {
            ports: None,
            peers: None,
        };
        let m = rule_match(&model, &any, Direction::Ingress, &udp);
        assert_eq!((m.peer, m.port), (Some(PeerHit::Any), Some(PortHit::Any)));
        let none = RuleModel {
            ports: Some(vec![]),
            peers: Some(vec![]),
        };
        let m = rule_match(&model, &none, Direction::Ingress, &udp);
        assert_eq!((m.peer, m.port), (None, None), "empty lists match nothing");
    }
}
