//! The iptables renderer: the neutral [`NodeModel`] (see [`super::model`])
//! in, the desired [`Ruleset`] of one family out (IPv4: iptables + ipset
//! `family inet`; IPv6: ip6tables + ipset `family inet6`). Pure, no I/O.
//!
//! Layout (Calico's, with canal's names; marks: ingress 0x10000, egress 0x20000):
//!
//! ```text
//! raw PREROUTING -> CANAL-PREROUTING  anti-spoofing (see antispoof.rs), also when
//!                            policy is disabled
//! FORWARD -> CANAL-FORWARD   (cali+ only) ESTABLISHED,RELATED accept, INVALID drop,
//!                            clear the verdict marks, -i cali+ -> CANAL-FROM-WL,
//!                            -o cali+ -> CANAL-TO-WL, drop what lacks a verdict
//!                            mark, then accept from/to pods
//! INPUT   -> CANAL-INPUT     -i cali+: ESTABLISHED accept, (IPv6: ICMPv6 types
//!                            130-136 accept), INVALID drop, CANAL-FROM-WL (the
//!                            pod's egress policy), drop without the egress mark,
//!                            then defaultEndpointToHostAction
//! CANAL-TO-WL / CANAL-FROM-WL  -o/-i <iface> -g CANAL-TW/FW-<iface>; DROP (unknown pod)
//! CANAL-TW-<iface>           not isolated: set the ingress mark. Isolated: clear it,
//!                            per policy `-j CANAL-PI-<hash>` then RETURN if marked,
//!                            DROP at the end (CANAL-FW-<iface>: egress, the same)
//! CANAL-PI/PO-<hash>         one rule per (port group x peer) setting the mark
//! security FORWARD/INPUT -> CANAL-GUARD-*  new pod traffic without its verdict
//!                            marks is dropped (frame.rs): fails closed when the
//!                            filter table is flushed or a hook is gone
//! ```
//!
//! The model already left out what cannot be enforced (with warnings); a
//! peer or port of the other family renders nothing in this family.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use canal_crds::Protocol;
use ipnet::IpNet;

use super::antispoof;
use super::frame;
use super::model::{
    self, AddressSet, Block, Direction, Family, Isolation, ModelCache, NodeModel, PeerModel,
    PortModel, PortSet, RuleModel,
};
use super::names::{self, FROM_WL_CHAIN, TO_WL_CHAIN};
use super::ruleset::{Chain, IpSet, Ruleset, SetType};

pub use super::model::{
    EnforcementConfig, PolicyInputs, WARNING_CATEGORIES, Warning, referenced_peer_sets,
};

/// The renderer's result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rendered {
    /// What the kernel should hold (IPv4: iptables, ipset `family inet`).
    pub ruleset: Ruleset,
    /// IPv6 (ip6tables, ipset `family inet6`); empty unless the node guards IPv6.
    pub ruleset6: Ruleset,
    /// Parts of the input that were skipped (sorted, deduplicated).
    pub warnings: Vec<Warning>,
}

/// Renders the desired rulesets. Pure and deterministic: the same inputs
/// give byte-identical output.
pub fn render(inputs: &PolicyInputs) -> Rendered {
    render_with(inputs, &mut RenderCache::default())
}

/// What [`render_with`] keeps between calls: the model's cache and, per
/// family, the sets and policy chains built from unchanged model parts
/// (found by pointer). Output is identical to [`render`]'s.
#[derive(Debug, Default)]
pub struct RenderCache {
    /// The model builder's cache.
    pub model: ModelCache,
    /// Per family.
    families: [FamilyCache; 2],
}

/// The iptables parts built from model parts, by pointer identity.
#[derive(Debug, Default)]
pub struct FamilyCache {
    /// PeerSet name -> (the model's set, the ipset built from it).
    sets: HashMap<String, (Arc<AddressSet>, IpSet)>,
    port_sets: HashMap<String, (Arc<PortSet>, IpSet)>,
    /// Policy chain name -> (the model's rules, the chain).
    chains: HashMap<String, (Arc<Vec<RuleModel>>, Chain)>,
}

/// [`render`] with a cache kept between calls.
pub fn render_with(inputs: &PolicyInputs, cache: &mut RenderCache) -> Rendered {
    let model = model::build_with(inputs, &mut cache.model);
    let [c4, c6] = &mut cache.families;
    let ruleset = render_model(&model, Family::V4, c4);
    let ruleset6 = if model.families.v6 {
        render_model(&model, Family::V6, c6)
    } else {
        *c6 = FamilyCache::default();
        Ruleset::default()
    };
    Rendered {
        ruleset,
        ruleset6,
        warnings: model.warnings,
    }
}

/// The iptables ruleset of one family of `model`.
pub fn render_model(model: &NodeModel, family: Family, cache: &mut FamilyCache) -> Ruleset {
    let mut ruleset = Ruleset::for_family(family);
    if model.enabled {
        let mut r = Renderer {
            model,
            family,
            sets: BTreeMap::new(),
            cache,
        };
        ruleset = r.ruleset();
    } else {
        *cache = FamilyCache::default();
    }
    let raw = antispoof::render_raw(&model.sources, family);
    ruleset
        .chains
        .insert(names::PREROUTING_CHAIN.to_string(), raw.chain);
    ruleset.hooks.extend(raw.hook);
    ruleset.sets.extend(raw.sets);
    ruleset.spoof_rules = raw.drops;
    ruleset
}

/// The peer is the packet's source for ingress, its destination for egress.
fn peer_dir(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => "src",
        Direction::Egress => "dst",
    }
}

fn peer_flag(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => "-s",
        Direction::Egress => "-d",
    }
}

fn set_mark(dir: Direction) -> String {
    frame::set_mark(dir.mark())
}

fn clear_mark(dir: Direction) -> String {
    frame::clear_mark(dir.mark())
}

fn if_marked_return(dir: Direction) -> String {
    let m = dir.mark();
    format!("-m mark --mark {m:#x}/{m:#x} -j RETURN")
}

/// The set-name identity of a family: IPv4 keeps the names it always had.
fn family_id(family: Family, id: &str) -> String {
    match family {
        Family::V4 => id.to_string(),
        Family::V6 => format!("ipv6:{id}"),
    }
}

struct Renderer<'a> {
    model: &'a NodeModel,
    family: Family,
    sets: BTreeMap<String, IpSet>,
    cache: &'a mut FamilyCache,
}

impl Renderer<'_> {
    fn ruleset(&mut self) -> Ruleset {
        let model = self.model;
        let mut chains = BTreeMap::new();
        let mut to_wl = Chain::default();
        let mut from_wl = Chain::default();
        let mut needed: BTreeSet<(&str, Direction)> = BTreeSet::new();
        for (iface, ep) in &model.endpoints {
            let tw = names::to_endpoint_chain(iface);
            let fw = names::from_endpoint_chain(iface);
            to_wl.push(TO_WL_CHAIN, format!("-o {iface} -g {tw}"), &ep.pod);
            from_wl.push(FROM_WL_CHAIN, format!("-i {iface} -g {fw}"), &ep.pod);
            for (name, dir) in [(tw, Direction::Ingress), (fw, Direction::Egress)] {
                let log = model.log_denied.then_some(iface.as_str());
                let chain = endpoint_chain(&name, ep.isolation(dir), dir, log);
                if let Isolation::By(list) = ep.isolation(dir) {
                    needed.extend(list.iter().map(|p| (p.as_str(), dir)));
                }
                chains.insert(name, chain);
            }
        }
        to_wl.push(TO_WL_CHAIN, "-j DROP", "unknown pod interface");
        from_wl.push(FROM_WL_CHAIN, "-j DROP", "unknown pod interface");
        chains.insert(TO_WL_CHAIN.to_string(), to_wl);
        chains.insert(FROM_WL_CHAIN.to_string(), from_wl);

        let mut fresh: HashMap<String, (Arc<Vec<RuleModel>>, Chain)> = HashMap::new();
        for (policy, dir) in needed {
            let Some(rules) = model.policies.get(policy).and_then(|p| p.rules(dir)) else {
                continue;
            };
            let name = match dir {
                Direction::Ingress => names::policy_ingress_chain(policy),
                Direction::Egress => names::policy_egress_chain(policy),
            };
            let chain = match self.cache.chains.remove(&name) {
                Some((was, chain)) if Arc::ptr_eq(&was, rules) => chain,
                _ => self.policy_chain(&name, policy, rules, dir),
            };
            // Sets referenced by the chain, cached or not.
            self.chain_sets(rules);
            fresh.insert(name.clone(), (rules.clone(), chain.clone()));
            chains.insert(name, chain);
        }
        self.cache.chains = fresh;

        let mut hooks = Vec::new();
        for (name, chain, hook) in frame::policy_frame(model.endpoint_to_host, self.family) {
            chains.insert(name, chain);
            hooks.extend(hook);
        }
        Ruleset {
            family: self.family,
            hooks,
            chains,
            sets: std::mem::take(&mut self.sets),
            endpoints: model.endpoints.keys().cloned().collect(),
            spoof_rules: BTreeMap::new(),
        }
    }

    fn policy_chain(
        &mut self,
        chain_name: &str,
        policy: &str,
        rules: &[RuleModel],
        dir: Direction,
    ) -> Chain {
        let mut chain = Chain::default();
        let mut seen = BTreeSet::new();
        for (i, rule) in rules.iter().enumerate() {
            let peers: Vec<String> = match &rule.peers {
                None => vec![String::new()],
                Some(list) => list
                    .iter()
                    .filter_map(|p| self.peer_matcher(p, dir))
                    .collect(),
            };
            let ports = self.port_matchers(rule.ports.as_deref());
            let note = format!("{policy} {} rule {i}", dir.as_str());
            for port in &ports {
                for peer in &peers {
                    let spec = [port.as_str(), peer.as_str(), &set_mark(dir)]
                        .iter()
                        .filter(|s| !s.is_empty())
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(" ");
                    if seen.insert(spec.clone()) {
                        chain.push(chain_name, spec, &note);
                    }
                }
            }
        }
        chain
    }

    /// Renders the sets `rules` reference (from the cache when their model
    /// parts are unchanged).
    fn chain_sets(&mut self, rules: &[RuleModel]) {
        for rule in rules {
            for peer in rule.peers.iter().flatten() {
                match peer {
                    PeerModel::Set(ps) => {
                        self.peer_set(ps);
                    }
                    PeerModel::Block(b) => {
                        if let Some((name, set)) = block_set(b, self.family) {
                            self.sets.insert(name, set);
                        }
                    }
                }
            }
            for port in rule.ports.iter().flatten() {
                match port {
                    PortModel::LocalNamed(proto, name) => {
                        self.local_port_set(*proto, name);
                    }
                    PortModel::PeerNamed(_, ps) => {
                        self.peer_port_set(ps);
                    }
                    _ => {}
                }
            }
        }
    }

    /// The match for one peer, or None when it matches nothing in this family.
    fn peer_matcher(&mut self, peer: &PeerModel, dir: Direction) -> Option<String> {
        match peer {
            PeerModel::Set(ps) => {
                let set = peer_set_name(ps, self.family);
                Some(format!("-m set --match-set {set} {}", peer_dir(dir)))
            }
            PeerModel::Block(block) => {
                if block.family() != self.family {
                    return None;
                }
                if block.except.is_empty() {
                    if block.cidr.prefix_len() == 0 {
                        return Some(String::new());
                    }
                    return Some(format!("{} {}", peer_flag(dir), net_member(block.cidr)));
                }
                let (name, _) = block_set(block, self.family)?;
                Some(format!("-m set --match-set {name} {}", peer_dir(dir)))
            }
        }
    }

    /// The port matches of one rule; empty when every entry was invalid
    /// (the rule then matches nothing).
    fn port_matchers(&mut self, ports: Option<&[PortModel]>) -> Vec<String> {
        let Some(ports) = ports else {
            return vec![String::new()];
        };
        let mut out = Vec::new();
        let mut named = BTreeSet::new();
        for p in ports {
            match p {
                PortModel::Protocol(proto) => out.push(format!("-p {}", proto.as_lower())),
                PortModel::Ranges(proto, ranges) => {
                    for chunk in multiport_chunks(ranges.clone()) {
                        out.push(dport_match(*proto, &chunk));
                    }
                }
                PortModel::LocalNamed(proto, name) => {
                    let set = local_port_set_name(*proto, name, self.family);
                    named.insert(format!(
                        "-p {} -m set --match-set {set} dst,dst",
                        proto.as_lower()
                    ));
                }
                PortModel::PeerNamed(proto, ps) => {
                    let set = peer_port_set_name(ps, self.family);
                    named.insert(format!(
                        "-p {} -m set --match-set {set} dst,dst",
                        proto.as_lower()
                    ));
                }
            }
        }
        out.extend(named);
        out
    }

    fn peer_set(&mut self, ps: &str) {
        let name = peer_set_name(ps, self.family);
        if self.sets.contains_key(&name) {
            return;
        }
        let Some(source) = self.model.peer_sets.get(ps) else {
            return;
        };
        let set = match self.cache.sets.get(ps) {
            Some((was, set)) if Arc::ptr_eq(was, source) => set.clone(),
            _ => {
                let mut set = IpSet::new(SetType::HashNet, self.family);
                let members = Arc::make_mut(&mut set.members);
                match self.family {
                    Family::V4 => {
                        members.extend(source.v4.iter().map(|n| net_member(IpNet::V4(*n))))
                    }
                    Family::V6 => {
                        members.extend(source.v6.iter().map(|n| net_member(IpNet::V6(*n))))
                    }
                }
                self.cache
                    .sets
                    .insert(ps.to_string(), (source.clone(), set.clone()));
                set
            }
        };
        self.sets.insert(name, set);
    }

    fn peer_port_set(&mut self, ps: &str) {
        let name = peer_port_set_name(ps, self.family);
        if self.sets.contains_key(&name) {
            return;
        }
        let Some(source) = self.model.port_sets.get(ps) else {
            return;
        };
        let set = match self.cache.port_sets.get(ps) {
            Some((was, set)) if Arc::ptr_eq(was, source) => set.clone(),
            _ => {
                let set = port_ipset(source, self.family);
                self.cache
                    .port_sets
                    .insert(ps.to_string(), (source.clone(), set.clone()));
                set
            }
        };
        self.sets.insert(name, set);
    }

    fn local_port_set(&mut self, proto: Protocol, port: &str) {
        let name = local_port_set_name(proto, port, self.family);
        if self.sets.contains_key(&name) {
            return;
        }
        if let Some(source) = self.model.local_ports.get(&(proto, port.to_string())) {
            self.sets.insert(name, port_ipset(source, self.family));
        }
    }
}

/// `CANAL-TW-<iface>` / `CANAL-FW-<iface>`; its last rule, when isolated,
/// is the drop whose counter `denied.rs` reads.
pub(crate) fn endpoint_chain(
    chain_name: &str,
    isolation: &Isolation,
    dir: Direction,
    log: Option<&str>,
) -> Chain {
    let mut chain = Chain::default();
    let Isolation::By(policies) = isolation else {
        // The verdict mark is what lets the packet through CANAL-FORWARD
        // (and the guard): a flushed endpoint chain sets none and fails closed.
        chain.push(
            chain_name,
            set_mark(dir),
            &format!("not isolated for {}", dir.as_str()),
        );
        return chain;
    };
    chain.push(
        chain_name,
        clear_mark(dir),
        &format!("clear {} mark", dir.as_str()),
    );
    for policy in policies {
        let target = match dir {
            Direction::Ingress => names::policy_ingress_chain(policy),
            Direction::Egress => names::policy_egress_chain(policy),
        };
        chain.push(chain_name, format!("-j {target}"), policy);
        chain.push(
            chain_name,
            if_marked_return(dir),
            &format!("allowed by {policy}"),
        );
    }
    if let Some(iface) = log {
        // Rate-limited in the kernel: a flood of denied packets costs
        // nothing past the limit; the drop below counts every one.
        let (rate, burst) = names::DENIED_LOG_RATE;
        let prefix = names::denied_log_prefix(iface, dir == Direction::Ingress);
        chain.push(
            chain_name,
            format!(
                "-m limit --limit {rate}/sec --limit-burst {burst} -j NFLOG --nflog-group {} --nflog-prefix {prefix} --nflog-range 128",
                names::DENIED_LOG_GROUP
            ),
            &format!("log denied {}", dir.as_str()),
        );
    }
    chain.push(
        chain_name,
        "-j DROP",
        &format!("no policy allowed {}", dir.as_str()),
    );
    chain
}

/// The ipset of a PeerSet's addresses.
pub fn peer_set_name(peer_set: &str, family: Family) -> String {
    names::set_name(
        "peer",
        SetType::HashNet.as_str(),
        &family_id(family, peer_set),
    )
}

/// The ipset of an egress named-port PeerSet.
pub fn peer_port_set_name(peer_set: &str, family: Family) -> String {
    names::set_name(
        "peer-port",
        SetType::HashIpPort.as_str(),
        &family_id(family, peer_set),
    )
}

/// The node-local `hash:ip,port` set of an ingress named port: every local
/// endpoint that declares (protocol, name), so `dst,dst` resolves the name
/// per destination pod.
pub fn local_port_set_name(proto: Protocol, port: &str, family: Family) -> String {
    let id = format!("{}/{port}", proto.as_lower());
    names::set_name(
        "local-named-port",
        SetType::HashIpPort.as_str(),
        &family_id(family, &id),
    )
}

fn port_ipset(source: &PortSet, family: Family) -> IpSet {
    let mut set = IpSet::new(SetType::HashIpPort, family);
    let members = Arc::make_mut(&mut set.members);
    for (ip, proto, port) in &source.members {
        if Family::of(ip) == family {
            members.insert(port_member(*ip, *proto, *port));
        }
    }
    set
}

/// The `hash:net` set of an ipBlock with except (`nomatch` entries; hash:net
/// cannot hold a /0: two halves cover it), or None when the block matches
/// nothing. Its name hashes the block.
fn block_set(block: &Block, family: Family) -> Option<(String, IpSet)> {
    if block.family() != family || block.except.is_empty() {
        return None;
    }
    let cidr = block.cidr;
    let mut excepts: BTreeSet<IpNet> = block.except.iter().copied().collect();
    let mut positives: Vec<IpNet> = if cidr.prefix_len() == 0 {
        halves(cidr)
    } else {
        vec![cidr]
    };
    positives.retain(|p| !excepts.contains(p));
    excepts.retain(|e| !positives.is_empty() && !positives.contains(e) && *e != cidr);
    if positives.is_empty() {
        return None;
    }
    let id = format!(
        "{cidr} except {}",
        excepts
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let name = names::set_name("ipblock", SetType::HashNet.as_str(), &id);
    let mut set = IpSet::new(SetType::HashNet, family);
    for p in positives {
        set.insert(net_member(p));
    }
    for e in excepts {
        set.insert(format!("{} nomatch", net_member(e)));
    }
    Some((name, set))
}

/// The two halves of a /0.
fn halves(net: IpNet) -> Vec<IpNet> {
    match net {
        IpNet::V4(n) => n
            .subnets(1)
            .map(|s| s.map(IpNet::V4).collect())
            .unwrap_or_default(),
        IpNet::V6(n) => n
            .subnets(1)
            .map(|s| s.map(IpNet::V6).collect())
            .unwrap_or_default(),
    }
}

/// A hash:net member as `ipset save` prints it: host routes without `/32` (`/128`).
pub fn net_member(n: IpNet) -> String {
    match n.trunc() {
        IpNet::V4(n) if n.prefix_len() == 32 => n.addr().to_string(),
        IpNet::V6(n) if n.prefix_len() == 128 => n.addr().to_string(),
        n => n.to_string(),
    }
}

/// A `hash:ip,port` member as `ipset save` prints it.
fn port_member(ip: IpAddr, protocol: Protocol, port: u16) -> String {
    format!("{ip},{}:{port}", protocol.as_lower())
}

/// `-m multiport` takes 15 slots; a range takes two.
fn multiport_chunks(ranges: Vec<(u16, u16)>) -> Vec<Vec<(u16, u16)>> {
    let mut chunks = Vec::new();
    let mut cur = Vec::new();
    let mut slots = 0;
    for r in ranges {
        let need = if r.0 == r.1 { 1 } else { 2 };
        if slots + need > 15 {
            chunks.push(std::mem::take(&mut cur));
            slots = 0;
        }
        cur.push(r);
        slots += need;
    }
    if !cur.is_empty() {
        chunks.push(cur);
    }
    chunks
}

fn dport_match(proto: Protocol, chunk: &[(u16, u16)]) -> String {
    let fmt_range = |&(s, e): &(u16, u16)| {
        if s == e {
            s.to_string()
        } else {
            format!("{s}:{e}")
        }
    };
    let p = proto.as_lower();
    if chunk.len() == 1 {
        format!("-p {p} --dport {}", fmt_range(&chunk[0]))
    } else {
        let list: Vec<String> = chunk.iter().map(fmt_range).collect();
        format!("-p {p} -m multiport --dports {}", list.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::merge_ranges;

    #[test]
    fn ranges_merge_and_chunk() {
        assert_eq!(
            merge_ranges(vec![(90, 100), (80, 80), (81, 85), (95, 120), (200, 200)]),
            vec![(80, 85), (90, 120), (200, 200)]
        );
        let many: Vec<(u16, u16)> = (1..=20).map(|i| (i * 10, i * 10)).collect();
        let chunks = multiport_chunks(many);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].len(), 15);
        let with_ranges: Vec<(u16, u16)> = (1..=8).map(|i| (i * 10, i * 10 + 1)).collect();
        let chunks = multiport_chunks(with_ranges);
        assert_eq!(
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            vec![7, 1]
        );
    }

    #[test]
    fn net_members_are_spelled_like_ipset_save() {
        assert_eq!(net_member("10.0.0.1/32".parse().unwrap()), "10.0.0.1");
        assert_eq!(net_member("10.1.2.3/16".parse().unwrap()), "10.1.0.0/16");
        assert_eq!(net_member("fd00::1/128".parse().unwrap()), "fd00::1");
        assert_eq!(net_member("fd00::1/64".parse().unwrap()), "fd00::/64");
    }

    #[test]
    fn every_warning_category_is_listed_for_the_metric() {
        let s = String::new;
        let all = [
            Warning::InvalidInterface {
                pod: s(),
                interface: s(),
            },
            Warning::DuplicateInterface {
                pod: s(),
                interface: s(),
            },
            Warning::UnknownPolicy {
                pod: s(),
                policy: s(),
            },
            Warning::MissingPeerSet { peer_set: s() },
            Warning::InvalidAddress {
                context: s(),
                value: s(),
            },
            Warning::InvalidPeer { policy: s() },
            Warning::InvalidPort { policy: s() },
            Warning::MissingNamedPortSet {
                policy: s(),
                port: s(),
            },
        ];
        let categories: Vec<&str> = all.iter().map(Warning::category).collect();
        assert_eq!(categories, WARNING_CATEGORIES);
    }
}
