//! Building the [`NodeModel`] from the [`PolicyInputs`]: validation,
//! deduplication and the cache that keeps unchanged parts (by `Arc`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use canal_crds::{
    CompiledPolicy, Endpoint, IpBlock, NodePolicySetSpec, Peer, PortMatch, PortMember, Protocol,
};
use ipnet::{IpNet, Ipv4Net};

use super::super::antispoof::SourceMap;
use super::super::names;
use super::*;

/// What [`build_with`] keeps between syncs: converting 100,000 PeerSet
/// members, or 20,000 rules, costs more than the rest of a sync, and most
/// syncs change one PeerSet or policy or none. Unchanged inputs give the
/// same `Arc`s, which lets the renderers skip them by pointer.
#[derive(Debug, Default)]
pub struct ModelCache {
    addresses: HashMap<String, Cached<Vec<String>, AddressSet>>,
    ports: HashMap<String, Cached<Vec<PortMember>, PortSet>>,
    rules: HashMap<(String, Direction), Cached<CompiledPolicy, Vec<RuleModel>>>,
}

#[derive(Debug)]
struct Cached<S, T> {
    /// What it was built from (None: the PeerSet was missing).
    source: Option<S>,
    built: Arc<T>,
    warnings: Vec<Warning>,
    used: bool,
}

/// The model of `inputs` (no cache).
pub fn build(inputs: &PolicyInputs) -> NodeModel {
    build_with(inputs, &mut ModelCache::default())
}

/// The model of `inputs`, reusing what `cache` built from equal inputs.
pub fn build_with(inputs: &PolicyInputs, cache: &mut ModelCache) -> NodeModel {
    let mut warnings = BTreeSet::new();
    let valid = valid_endpoints(&inputs.spec, &mut warnings);
    let sources = if inputs.endpoints_unknown {
        SourceMap::unknown()
    } else {
        SourceMap::from_endpoints(valid.iter().map(|(i, e)| (*i, *e)), &mut warnings)
    };
    let mut model = NodeModel {
        enabled: inputs.config.enabled,
        endpoint_to_host: inputs.config.endpoint_to_host,
        families: inputs.config.families,
        log_denied: inputs.config.log_denied,
        sources,
        ..NodeModel::default()
    };
    if !inputs.config.enabled {
        *cache = ModelCache::default();
        model.warnings = warnings.into_iter().collect();
        return model;
    }
    let mut b = Builder {
        inputs,
        cache,
        warnings,
        model: &mut model,
    };
    b.endpoints(&valid);
    let warnings = std::mem::take(&mut b.warnings);
    // Keep only what this build used, so the cache never outgrows the inputs.
    cache.addresses.retain(|_, c| std::mem::take(&mut c.used));
    cache.ports.retain(|_, c| std::mem::take(&mut c.used));
    cache.rules.retain(|_, c| std::mem::take(&mut c.used));
    model.warnings = warnings.into_iter().collect();
    model
}

/// The endpoints the renderers program, by interface: those with a valid
/// pod interface name, the first of each interface.
fn valid_endpoints<'s>(
    spec: &'s NodePolicySetSpec,
    warnings: &mut BTreeSet<Warning>,
) -> BTreeMap<&'s str, &'s Endpoint> {
    let mut out: BTreeMap<&str, &Endpoint> = BTreeMap::new();
    for ep in &spec.endpoints {
        let pod = format!("{}/{}", ep.namespace, ep.pod);
        if !names::is_valid_endpoint_iface(&ep.interface) {
            warnings.insert(Warning::InvalidInterface {
                pod,
                interface: ep.interface.clone(),
            });
            continue;
        }
        if out.contains_key(ep.interface.as_str()) {
            warnings.insert(Warning::DuplicateInterface {
                pod,
                interface: ep.interface.clone(),
            });
            continue;
        }
        out.insert(&ep.interface, ep);
    }
    out
}

struct Builder<'a> {
    inputs: &'a PolicyInputs,
    cache: &'a mut ModelCache,
    warnings: BTreeSet<Warning>,
    model: &'a mut NodeModel,
}

impl Builder<'_> {
    fn endpoints(&mut self, valid: &BTreeMap<&str, &Endpoint>) {
        let spec = &self.inputs.spec;
        let mut policies: BTreeMap<&str, &CompiledPolicy> = BTreeMap::new();
        for p in &spec.policies {
            policies.entry(p.name.as_str()).or_insert(p);
        }
        let mut needed: BTreeSet<(&str, Direction)> = BTreeSet::new();
        for (iface, ep) in valid {
            let pod = format!("{}/{}", ep.namespace, ep.pod);
            let mut isolation = |list: &[String], dir: Direction| -> Isolation {
                if list.is_empty() {
                    return Isolation::Open;
                }
                let mut seen = BTreeSet::new();
                let mut out = Vec::new();
                for (name, p) in list.iter().filter_map(|n| {
                    let known = policies.get_key_value(n.as_str());
                    if known.is_none() {
                        self.warnings.insert(Warning::UnknownPolicy {
                            pod: pod.clone(),
                            policy: n.clone(),
                        });
                    }
                    known
                }) {
                    if seen.insert(*name) {
                        needed.insert((p.name.as_str(), dir));
                        out.push(name.to_string());
                    }
                }
                Isolation::By(out)
            };
            let ingress = isolation(&ep.ingress_policies, Direction::Ingress);
            let egress = isolation(&ep.egress_policies, Direction::Egress);
            self.model.endpoints.insert(
                iface.to_string(),
                EndpointModel {
                    pod,
                    ingress,
                    egress,
                },
            );
        }
        for (name, dir) in needed {
            let Some(p) = policies.get(name) else {
                continue;
            };
            let rules = self.rules(p, dir, valid);
            let entry = self
                .model
                .policies
                .entry(name.to_string())
                .or_insert_with(|| PolicyModel {
                    name: name.to_string(),
                    ingress: None,
                    egress: None,
                });
            match dir {
                Direction::Ingress => entry.ingress = Some(rules),
                Direction::Egress => entry.egress = Some(rules),
            }
        }
    }

    /// The rules of one direction of a policy, from the cache when the
    /// compiled policy is unchanged; registers the sets they reference.
    fn rules(
        &mut self,
        policy: &CompiledPolicy,
        dir: Direction,
        endpoints: &BTreeMap<&str, &Endpoint>,
    ) -> Arc<Vec<RuleModel>> {
        let key = (policy.name.clone(), dir);
        let (rules, warnings) = match self.cache.rules.get_mut(&key) {
            Some(c) if c.source.as_ref() == Some(policy) => {
                c.used = true;
                (c.built.clone(), c.warnings.clone())
            }
            _ => {
                let mut warnings = Vec::new();
                let list = match dir {
                    Direction::Ingress => &policy.ingress,
                    Direction::Egress => &policy.egress,
                };
                let rules: Vec<RuleModel> = list
                    .iter()
                    .map(|r| RuleModel {
                        ports: ports(&r.ports, dir, &policy.name, &mut warnings),
                        peers: r
                            .peers
                            .as_ref()
                            .map(|l| peers(l, &policy.name, &mut warnings)),
                    })
                    .collect();
                let rules = Arc::new(rules);
                self.cache.rules.insert(
                    key,
                    Cached {
                        source: Some(policy.clone()),
                        built: rules.clone(),
                        warnings: warnings.clone(),
                        used: true,
                    },
                );
                (rules, warnings)
            }
        };
        self.warnings.extend(warnings);
        for rule in rules.iter() {
            for peer in rule.peers.iter().flatten() {
                if let PeerModel::Set(ps) = peer {
                    self.address_set(ps);
                }
            }
            for port in rule.ports.iter().flatten() {
                match port {
                    PortModel::LocalNamed(proto, name) => self.local_ports(*proto, name, endpoints),
                    PortModel::PeerNamed(_, ps) => self.port_set(ps),
                    _ => {}
                }
            }
        }
        rules
    }

    fn address_set(&mut self, peer_set: &str) {
        if self.model.peer_sets.contains_key(peer_set) {
            return;
        }
        let source = self.inputs.peer_sets.get(peer_set).map(|ps| &ps.ips);
        let (set, warnings) = cached(&mut self.cache.addresses, peer_set, source, |ips, w| {
            let mut v4 = Vec::with_capacity(ips.len());
            let mut v6 = Vec::new();
            for ip in ips {
                // Fast path: a plain dotted quad.
                if let Ok(a) = ip.parse::<Ipv4Addr>() {
                    v4.push(Ipv4Net::from(a));
                    continue;
                }
                match parse_net(ip) {
                    Some(IpNet::V4(n)) => v4.push(n.trunc()),
                    Some(IpNet::V6(n)) => v6.push(n.trunc()),
                    None => w.push(Warning::InvalidAddress {
                        context: format!("PeerSet {peer_set}"),
                        value: ip.clone(),
                    }),
                }
            }
            v4.sort_unstable();
            v4.dedup();
            v6.sort_unstable();
            v6.dedup();
            AddressSet { v4, v6 }
        });
        self.warnings.extend(warnings);
        self.model.peer_sets.insert(peer_set.to_string(), set);
    }

    fn port_set(&mut self, peer_set: &str) {
        if self.model.port_sets.contains_key(peer_set) {
            return;
        }
        let source = self.inputs.peer_sets.get(peer_set).map(|ps| &ps.ports);
        let (set, warnings) = cached(&mut self.cache.ports, peer_set, source, |ports, w| {
            let mut set = PortSet::default();
            for m in ports {
                match m.ip.trim().parse::<IpAddr>() {
                    Ok(a) if m.port > 0 => {
                        set.members.insert((a, m.protocol, m.port));
                    }
                    Ok(_) => {}
                    Err(_) => w.push(Warning::InvalidAddress {
                        context: format!("PeerSet {peer_set}"),
                        value: m.ip.clone(),
                    }),
                }
            }
            set
        });
        self.warnings.extend(warnings);
        self.model.port_sets.insert(peer_set.to_string(), set);
    }

    /// Every local endpoint that declares (protocol, name), so the name
    /// resolves per destination pod.
    fn local_ports(
        &mut self,
        protocol: Protocol,
        name: &str,
        endpoints: &BTreeMap<&str, &Endpoint>,
    ) {
        let key = (protocol, name.to_string());
        if self.model.local_ports.contains_key(&key) {
            return;
        }
        let mut set = PortSet::default();
        for ep in endpoints.values() {
            for np in ep
                .named_ports
                .iter()
                .filter(|np| np.name == name && np.protocol == protocol && np.port > 0)
            {
                for ip in &ep.ips {
                    match ip.trim().parse::<IpAddr>() {
                        Ok(a) => {
                            set.members.insert((a, protocol, np.port));
                        }
                        Err(_) => {
                            self.warnings.insert(Warning::InvalidAddress {
                                context: format!("endpoint {}/{}", ep.namespace, ep.pod),
                                value: ip.clone(),
                            });
                        }
                    }
                }
            }
        }
        self.model.local_ports.insert(key, Arc::new(set));
    }
}

/// What `build` makes of a PeerSet's content (`source`; None: the PeerSet
/// is missing) and its warnings: from `cache` while the content is unchanged.
fn cached<S: Clone + PartialEq, T>(
    cache: &mut HashMap<String, Cached<S, T>>,
    peer_set: &str,
    source: Option<&S>,
    build: impl FnOnce(&S, &mut Vec<Warning>) -> T,
) -> (Arc<T>, Vec<Warning>)
where
    T: Default,
{
    if let Some(c) = cache.get_mut(peer_set)
        && c.source.as_ref() == source
    {
        c.used = true;
        return (c.built.clone(), c.warnings.clone());
    }
    let mut warnings = Vec::new();
    let built = match source {
        Some(s) => build(s, &mut warnings),
        None => {
            warnings.push(Warning::MissingPeerSet {
                peer_set: peer_set.to_string(),
            });
            T::default()
        }
    };
    let built = Arc::new(built);
    cache.insert(
        peer_set.to_string(),
        Cached {
            source: source.cloned(),
            built: built.clone(),
            warnings: warnings.clone(),
            used: true,
        },
    );
    (built, warnings)
}

/// The peers of a rule that can be enforced.
fn peers(list: &[Peer], policy: &str, warnings: &mut Vec<Warning>) -> Vec<PeerModel> {
    let mut out = Vec::new();
    for peer in list {
        match (&peer.peer_set, &peer.ip_block) {
            (Some(ps), None) => out.push(PeerModel::Set(ps.clone())),
            (None, Some(block)) => {
                out.extend(ip_block(block, policy, warnings).map(PeerModel::Block))
            }
            _ => warnings.push(Warning::InvalidPeer {
                policy: policy.to_string(),
            }),
        }
    }
    out
}

/// An ipBlock, or None when it matches nothing (an unparseable CIDR or
/// except: fail closed, with a warning).
fn ip_block(block: &IpBlock, policy: &str, warnings: &mut Vec<Warning>) -> Option<Block> {
    let Some(cidr) = parse_net(&block.cidr).map(|n| n.trunc()) else {
        warnings.push(Warning::InvalidAddress {
            context: format!("policy {policy} ipBlock"),
            value: block.cidr.clone(),
        });
        return None;
    };
    let mut except = BTreeSet::new();
    for e in &block.except {
        match parse_net(e).map(|n| n.trunc()) {
            // An except outside the block (or of the other family) excludes nothing.
            Some(n) if cidr.contains(&n) => {
                except.insert(n);
            }
            Some(_) => {}
            None => {
                warnings.push(Warning::InvalidAddress {
                    context: format!("policy {policy} ipBlock.except"),
                    value: e.clone(),
                });
                return None;
            }
        }
    }
    Some(Block {
        cidr,
        except: except.into_iter().collect(),
    })
}

/// A rule's ports; None when the rule names none (any port).
fn ports(
    list: &[PortMatch],
    dir: Direction,
    policy: &str,
    warnings: &mut Vec<Warning>,
) -> Option<Vec<PortModel>> {
    if list.is_empty() {
        return None;
    }
    let mut whole: BTreeSet<Protocol> = BTreeSet::new();
    let mut ranges: BTreeMap<Protocol, Vec<(u16, u16)>> = BTreeMap::new();
    let mut named: BTreeSet<PortModel> = BTreeSet::new();
    for pm in list {
        if let Some(port_name) = &pm.named_port {
            match dir {
                Direction::Ingress => {
                    named.insert(PortModel::LocalNamed(pm.protocol, port_name.clone()));
                }
                Direction::Egress => match &pm.named_port_set {
                    Some(ps) => {
                        named.insert(PortModel::PeerNamed(pm.protocol, ps.clone()));
                    }
                    None => warnings.push(Warning::MissingNamedPortSet {
                        policy: policy.to_string(),
                        port: port_name.clone(),
                    }),
                },
            }
            continue;
        }
        match (pm.port, pm.end_port) {
            (None, None) => {
                whole.insert(pm.protocol);
            }
            (Some(p), None) if p > 0 => ranges.entry(pm.protocol).or_default().push((p, p)),
            (Some(p), Some(e)) if p > 0 && e >= p => {
                ranges.entry(pm.protocol).or_default().push((p, e))
            }
            _ => warnings.push(Warning::InvalidPort {
                policy: policy.to_string(),
            }),
        }
    }
    let mut out: Vec<PortModel> = whole.iter().map(|p| PortModel::Protocol(*p)).collect();
    for (proto, list) in ranges {
        if !whole.contains(&proto) {
            out.push(PortModel::Ranges(proto, merge_ranges(list)));
        }
    }
    out.extend(named);
    Some(out)
}

/// Sorts and merges overlapping or adjacent ranges.
pub fn merge_ranges(mut list: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    list.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(list.len());
    for (s, e) in list {
        match out.last_mut() {
            Some(last) if u32::from(s) <= u32::from(last.1) + 1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Parses `a.b.c.d`, `a.b.c.d/len` or either IPv6 form.
pub fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use canal_crds::Rule;

    fn ep(iface: &str, ips: &[&str], ingress: &[&str], egress: &[&str]) -> Endpoint {
        Endpoint {
            namespace: "x".into(),
            pod: iface.into(),
            interface: iface.into(),
            ips: ips.iter().map(|s| s.to_string()).collect(),
            named_ports: vec![],
            ingress_policies: ingress.iter().map(|s| s.to_string()).collect(),
            egress_policies: egress.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn block_peer(cidr: &str, except: &[&str]) -> Peer {
        Peer {
            peer_set: None,
            ip_block: Some(IpBlock {
                cidr: cidr.into(),
                except: except.iter().map(|s| s.to_string()).collect(),
            }),
        }
    }

    fn inputs(endpoints: Vec<Endpoint>, policies: Vec<CompiledPolicy>) -> PolicyInputs {
        PolicyInputs {
            config: EnforcementConfig {
                families: Families::DUAL,
                ..EnforcementConfig::default()
            },
            spec: NodePolicySetSpec {
                endpoints,
                policies,
            },
            ..PolicyInputs::default()
        }
    }

    #[test]
    fn families_are_kept_apart_and_validated_once() {
        let mut inp = inputs(
            vec![ep(
                "calia",
                &["10.0.0.2", "fd00::2"],
                &["x/p", "x/gone", "x/p"],
                &[],
            )],
            vec![CompiledPolicy {
                name: "x/p".into(),
                ingress: vec![Rule {
                    peers: Some(vec![
                        Peer {
                            peer_set: Some("ps".into()),
                            ip_block: None,
                        },
                        block_peer("fd00::/64", &["fd00::/120", "10.0.0.0/8", "fd01::/64"]),
                        block_peer("bogus", &[]),
                        Peer {
                            peer_set: None,
                            ip_block: None,
                        },
                    ]),
                    ports: vec![],
                }],
                egress: vec![],
            }],
        );
        inp.peer_sets.insert(
            "ps".into(),
            PeerSetSpec {
                ips: vec![
                    "10.0.0.9".into(),
                    "fd00::9".into(),
                    "10.0.0.9".into(),
                    "10.1.2.3/16".into(),
                    "nope".into(),
                ],
                ..PeerSetSpec::default()
            },
        );
        let m = build(&inp);
        assert_eq!(
            m.endpoints["calia"].ingress,
            Isolation::By(vec!["x/p".into()]),
            "unknown dropped, duplicates once"
        );
        assert_eq!(m.endpoints["calia"].egress, Isolation::Open);
        let rules = m.policies["x/p"].ingress.as_ref().unwrap();
        assert!(m.policies["x/p"].egress.is_none(), "egress is not needed");
        let peers = rules[0].peers.as_ref().unwrap();
        assert_eq!(peers.len(), 2, "{peers:?}");
        assert_eq!(
            peers[1],
            PeerModel::Block(Block {
                cidr: "fd00::/64".parse().unwrap(),
                except: vec!["fd00::/120".parse().unwrap()],
            })
        );
        let ps = &m.peer_sets["ps"];
        assert_eq!(ps.v4.len(), 2);
        assert_eq!(ps.v4[0].to_string(), "10.0.0.9/32");
        assert_eq!(ps.v4[1].to_string(), "10.1.0.0/16");
        assert_eq!(ps.v6.len(), 1);
        assert!(!ps.hosts_only(Family::V4) && ps.hosts_only(Family::V6));
        let categories: BTreeSet<&str> = m.warnings.iter().map(Warning::category).collect();
        assert_eq!(
            categories,
            ["invalid_address", "invalid_peer", "unknown_policy"]
                .into_iter()
                .collect()
        );
    }

    #[test]
    fn unchanged_inputs_reuse_the_built_parts() {
        let mut inp = inputs(
            vec![ep("calia", &["10.0.0.2"], &["x/p"], &[])],
            vec![CompiledPolicy {
                name: "x/p".into(),
                ingress: vec![Rule {
                    peers: Some(vec![Peer {
                        peer_set: Some("ps".into()),
                        ip_block: None,
                    }]),
                    ports: vec![],
                }],
                egress: vec![],
            }],
        );
        let mut cache = ModelCache::default();
        let one = build_with(&inp, &mut cache);
        assert_eq!(one.warnings.len(), 1, "missing PeerSet");
        let two = build_with(&inp, &mut cache);
        assert_eq!(one, two);
        assert!(Arc::ptr_eq(&one.peer_sets["ps"], &two.peer_sets["ps"]));
        inp.peer_sets.insert(
            "ps".into(),
            PeerSetSpec {
                ips: vec!["10.0.0.3".into()],
                ..PeerSetSpec::default()
            },
        );
        let three = build_with(&inp, &mut cache);
        assert!(three.warnings.is_empty());
        assert_eq!(three, build(&inp));
        assert!(Arc::ptr_eq(
            one.policies["x/p"].ingress.as_ref().unwrap(),
            three.policies["x/p"].ingress.as_ref().unwrap()
        ));
    }

    #[test]
    fn ports_merge_and_whole_protocols_win() {
        let pm = |protocol, port, end_port| PortMatch {
            protocol,
            port,
            end_port,
            named_port: None,
            named_port_set: None,
        };
        let mut w = Vec::new();
        let out = ports(
            &[
                pm(Protocol::TCP, Some(80), None),
                pm(Protocol::TCP, Some(81), Some(90)),
                pm(Protocol::UDP, Some(53), None),
                pm(Protocol::UDP, None, None),
                pm(Protocol::TCP, Some(0), None),
            ],
            Direction::Ingress,
            "x/p",
            &mut w,
        );
        assert_eq!(
            out,
            Some(vec![
                PortModel::Protocol(Protocol::UDP),
                PortModel::Ranges(Protocol::TCP, vec![(80, 90)]),
            ])
        );
        assert_eq!(w.len(), 1);
        assert_eq!(ports(&[], Direction::Ingress, "x/p", &mut w), None);
    }

    #[test]
    fn families_file_text() {
        assert_eq!(Families::V4.file_text(), "ipv4");
        assert_eq!(Families::DUAL.file_text(), "ipv4,ipv6");
    }
}
