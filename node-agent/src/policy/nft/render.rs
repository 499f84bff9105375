//! The nftables renderer: the neutral [`NodeModel`] in, canal's own table
//! `inet canal` out (both families in one table: one set of chains, one
//! transaction per change, one table to own). Pure, no I/O.
//!
//! ```text
//! chain prerouting  (filter hook prerouting priority raw: before conntrack)   anti-spoofing
//!     IPv6: link-local / unspecified ICMPv6 130-136 accept
//!     iifname "cali*" fib saddr . iif oif missing counter drop               (rpf)
//!     iifname . ip saddr @spoof-v4 accept; iifname . ip6 saddr @spoof-v6 accept
//!     iifname @spoof-routed accept                                          (IPs not known yet)
//!     iifname @spoof-ifaces counter drop                                    (source_not_assigned)
//! chain forward     (filter hook forward priority filter)
//!     ct state established,related accept; ct state invalid drop           (cali* only)
//!     clear the verdict marks 0x30000
//!     iifname vmap @from-wl; oifname vmap @to-wl                           O(1) dispatch
//!     drop without the direction's mark; accept
//! chain input       (filter hook input priority filter)                      pod -> node
//!     established accept; IPv6: ICMPv6 130-136 accept; invalid drop; iifname vmap @from-wl;
//!     drop without the egress mark; defaultEndpointToHostAction
//! chain guard-forward / guard-input (priority 150, after them)   fail-closed guard: new pod
//!     traffic without its verdict marks is dropped (a foreign flush of `forward` or an
//!     `accept` put in front of it lets nothing new through)
//! map to-wl / from-wl  { "cali..." : jump tw-/fw-cali... }
//! chain tw-<iface> / fw-<iface>   not isolated: set the mark; isolated: clear it,
//!     jump pi-/po-<hash> per policy, return if marked, drop
//! chain pi-<hash> / po-<hash>     one rule per (port x peer x family) setting the mark
//! sets  ps4-/ps6-<hash> (PeerSet addresses; pn4-/pn6- with the interval flag when a
//!     member is a CIDR), blk4-/blk6-<hash> (ipBlock minus except, interval),
//!     pp4-/pp6- and lp4-/lp6-<hash> (ipv4_addr . inet_proto . inet_service: named ports)
//! ```
//!
//! An `accept` ends only canal's base chain; every other table's chains on
//! the hook still run, and canal's `drop` is final whatever they do (a
//! foreign table that accepts at a higher priority cannot let denied
//! traffic through). defaultEndpointToHostAction `Accept` and `Return` are
//! therefore the same here: the node's own rules still see the packet.
//!
//! The base chains (anti-spoofing, forward, input, the guards) are built in
//! [`super::base_chains`]; this module builds the rest and the sets.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use canal_crds::Protocol;
use canal_crds::names::short_hash;
use ipnet::IpNet;

use crate::policy::antispoof::ICMPV6_LINK_TYPES;
use crate::policy::model::{
    Block, Direction, Family, Isolation, NodeModel, PeerModel, PortModel, PortSet, RuleModel,
};

use super::base_chains::{
    antispoof, forward_chain, guard_forward_chain, guard_input_chain, input_chain,
};
pub use super::cache::NftCache;
use super::cache::{CachedChain, SetRef};
use super::ruleset::{BaseChain, NftChain, NftRuleset, NftSet};

/// canal's policy table (`inet canal`).
pub const TABLE: &str = "canal";
/// The anti-spoofing base chain.
pub const PREROUTING: &str = "prerouting";
/// The forwarding base chain.
pub const FORWARD: &str = "forward";
/// The pod -> node base chain.
pub const INPUT: &str = "input";
/// The fail-closed guard after `forward` (priority 150, as iptables' security table).
pub const GUARD_FORWARD: &str = "guard-forward";
/// The fail-closed guard after `input`.
pub const GUARD_INPUT: &str = "guard-input";
/// Ingress dispatch map.
pub const TO_WL: &str = "to-wl";
/// Egress dispatch map.
pub const FROM_WL: &str = "from-wl";
/// (interface . IPv4 source) a pod may send from.
pub const SPOOF_V4: &str = "spoof-v4";
/// (interface . IPv6 source).
pub const SPOOF_V6: &str = "spoof-v6";
/// Interfaces whose pod has no IP in the NodePolicySet yet: rpf only.
pub const SPOOF_ROUTED: &str = "spoof-routed";
/// Every known pod interface.
pub const SPOOF_IFACES: &str = "spoof-ifaces";
/// nft wildcard for every pod interface.
pub(super) const PODS: &str = "\"cali*\"";

pub(super) const RAW_PRIORITY: i32 = -300;
pub(super) const FILTER_PRIORITY: i32 = 0;
pub(super) const GUARD_PRIORITY: i32 = 150;

/// The whole `inet canal` table for `model`.
pub fn render(model: &NodeModel) -> NftRuleset {
    render_with(model, &mut NftCache::default())
}

/// [`render`] with a cache kept between calls (same output): a sync that
/// changed only PeerSet members, one pod or one policy re-renders only the
/// sets and chains whose inputs changed ([`super::cache`]).
pub fn render_with(model: &NodeModel, cache: &mut NftCache) -> NftRuleset {
    let mut r = NftRuleset {
        table: TABLE.to_string(),
        ..NftRuleset::default()
    };
    cache.antispoof(&mut r, &model.sources, model.families, antispoof);
    if !model.enabled {
        *cache = NftCache::default();
        return r;
    }
    let mut needed: BTreeSet<(&str, Direction)> = BTreeSet::new();
    let log = model.log_denied;
    let mut endpoints = cache.take_endpoints();
    for (iface, ep) in &model.endpoints {
        for dir in [Direction::Ingress, Direction::Egress] {
            let isolation = ep.isolation(dir);
            if let Isolation::By(list) = isolation {
                needed.extend(list.iter().map(|p| (p.as_str(), dir)));
            }
            let (name, chain) = endpoints.get(iface, dir, isolation, log, || {
                let name = endpoint_chain_name(iface, dir);
                let chain = endpoint_chain(&name, isolation, dir, log.then_some(iface.as_str()));
                (name, chain)
            });
            r.chains.insert(name, chain);
        }
        r.endpoints.insert(iface.clone());
    }
    cache.keep_endpoints(endpoints);
    let (to_wl, from_wl) = cache.dispatch(&r.endpoints, || {
        let mut to_wl = NftSet::verdict_map("ifname");
        let mut from_wl = NftSet::verdict_map("ifname");
        for iface in &r.endpoints {
            let tw = endpoint_chain_name(iface, Direction::Ingress);
            let fw = endpoint_chain_name(iface, Direction::Egress);
            to_wl.insert(format!("\"{iface}\" : jump {tw}"));
            from_wl.insert(format!("\"{iface}\" : jump {fw}"));
        }
        (to_wl, from_wl)
    });
    r.sets.insert(TO_WL.into(), to_wl);
    r.sets.insert(FROM_WL.into(), from_wl);

    let mut old = std::mem::take(&mut cache.chains);
    let mut sets = SetRenderer {
        model,
        cache,
        out: BTreeMap::new(),
        refs: None,
        current: Vec::new(),
    };
    for (policy, dir) in needed {
        let Some(rules) = model.policies.get(policy).and_then(|p| p.rules(dir)) else {
            continue;
        };
        let key = (policy.to_string(), dir);
        let prev = old.remove(&key);
        // Same rules, same families, and every set it references still has
        // the name it had (a PeerSet that gained a CIDR is another set).
        let valid = prev.as_ref().is_some_and(|c| {
            Arc::ptr_eq(&c.rules, rules)
                && c.families == model.families
                && c.refs.iter().all(|(id, name)| sets.still_named(*id, name))
        });
        let cached = match prev {
            Some(c) if valid => c,
            prev => {
                let name = prev
                    .map(|c| c.name)
                    .unwrap_or_else(|| policy_chain_name(policy, dir));
                sets.refs = Some(Vec::new());
                let chain = policy_chain(&name, policy, rules, dir, &mut sets);
                let refs = sets.refs.take().unwrap_or_default();
                CachedChain {
                    name,
                    rules: rules.clone(),
                    families: model.families,
                    chain,
                    refs,
                }
            }
        };
        r.chains.insert(cached.name.clone(), cached.chain.clone());
        sets.cache.chains.insert(key, cached);
    }
    let out = std::mem::take(&mut sets.out);
    let used = sets.used_refs();
    r.sets.extend(out);
    cache.bound_refs(used);

    let v6 = model.families.v6;
    let (fwd, input, gf, gi) = cache.base_chains(model.endpoint_to_host, v6, || {
        (
            forward_chain(),
            input_chain(model.endpoint_to_host, v6),
            guard_forward_chain(),
            guard_input_chain(v6),
        )
    });
    r.chains.insert(FORWARD.into(), fwd);
    r.chains.insert(INPUT.into(), input);
    r.chains.insert(GUARD_FORWARD.into(), gf);
    r.chains.insert(GUARD_INPUT.into(), gi);
    r
}

/// `tw-<iface>` / `fw-<iface>`.
pub fn endpoint_chain_name(iface: &str, dir: Direction) -> String {
    match dir {
        Direction::Ingress => format!("tw-{iface}"),
        Direction::Egress => format!("fw-{iface}"),
    }
}

/// `pi-<hash>` / `po-<hash>` of a policy (16 hex characters of its name).
pub fn policy_chain_name(policy: &str, dir: Direction) -> String {
    let h = short_hash(&format!("policy:{policy}"));
    match dir {
        Direction::Ingress => format!("pi-{h}"),
        Direction::Egress => format!("po-{h}"),
    }
}

fn fam(f: Family) -> (&'static str, char) {
    match f {
        Family::V4 => ("ip", '4'),
        Family::V6 => ("ip6", '6'),
    }
}

/// The slot of `f` in per-family caches.
pub(super) fn family_index(f: Family) -> usize {
    match f {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

fn set_name(prefix: &str, family: Family, id: &str) -> String {
    let (_, d) = fam(family);
    format!(
        "{prefix}{d}-{}",
        short_hash(&format!("{prefix}:{family:?}:{id}"))
    )
}

fn addr_type(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

pub(super) fn base(hook: &'static str, priority: i32) -> Option<BaseChain> {
    Some(BaseChain {
        kind: "filter",
        hook,
        priority,
    })
}

fn set_mark(mark: u32) -> String {
    format!("meta mark set meta mark | {mark:#010x}")
}

pub(super) fn clear_mark(mark: u32) -> String {
    format!("meta mark set meta mark & {:#010x}", !mark)
}

pub(super) fn without(mark: u32) -> String {
    format!("meta mark & {mark:#010x} != {mark:#010x}")
}

pub(super) fn icmpv6_types() -> String {
    let t: Vec<String> = ICMPV6_LINK_TYPES.iter().map(u8::to_string).collect();
    format!("icmpv6 type {{ {} }}", t.join(", "))
}

/// `tw-<iface>` / `fw-<iface>`; its last rule, when isolated, is the
/// counted drop whose counter `denied.rs` reads.
pub(crate) fn endpoint_chain(
    name: &str,
    isolation: &Isolation,
    dir: Direction,
    log: Option<&str>,
) -> NftChain {
    let mut c = NftChain::default();
    let Isolation::By(policies) = isolation else {
        // The mark is what lets the packet through `forward`: a flushed
        // endpoint chain sets none and fails closed.
        c.push(
            name,
            set_mark(dir.mark()),
            &format!("not isolated for {}", dir.as_str()),
        );
        return c;
    };
    c.push(
        name,
        clear_mark(dir.mark()),
        &format!("clear {} mark", dir.as_str()),
    );
    let m = dir.mark();
    for policy in policies {
        c.push(
            name,
            format!("jump {}", policy_chain_name(policy, dir)),
            policy,
        );
        c.push(
            name,
            format!("meta mark & {m:#010x} == {m:#010x} return"),
            &format!("allowed by {policy}"),
        );
    }
    if let Some(iface) = log {
        // Rate-limited in the kernel; the counted drop below sees every packet.
        let (rate, burst) = crate::policy::names::DENIED_LOG_RATE;
        let prefix = crate::policy::names::denied_log_prefix(iface, dir == Direction::Ingress);
        c.push(
            name,
            format!(
                "limit rate {rate}/second burst {burst} packets log prefix \"{prefix}\" group {} snaplen 128",
                crate::policy::names::DENIED_LOG_GROUP
            ),
            &format!("log denied {}", dir.as_str()),
        );
    }
    c.push(
        name,
        "counter drop",
        &format!("no policy allowed {}", dir.as_str()),
    );
    c
}

fn policy_chain(
    name: &str,
    policy: &str,
    rules: &[RuleModel],
    dir: Direction,
    sets: &mut SetRenderer<'_>,
) -> NftChain {
    let mut c = NftChain::default();
    let mut seen = BTreeSet::new();
    let families = sets.model.families;
    for (i, rule) in rules.iter().enumerate() {
        let note = format!("{policy} {} rule {i}", dir.as_str());
        for f in families.iter() {
            let peers: Vec<String> = match &rule.peers {
                None => vec![String::new()],
                Some(list) => list.iter().filter_map(|p| sets.peer(p, dir, f)).collect(),
            };
            let ports: Vec<String> = match &rule.ports {
                None => vec![String::new()],
                Some(list) => list.iter().map(|p| sets.port(p, f)).collect(),
            };
            for port in &ports {
                for peer in &peers {
                    let spec = [port.as_str(), peer.as_str(), &set_mark(dir.mark())]
                        .iter()
                        .filter(|s| !s.is_empty())
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(" ");
                    if seen.insert(spec.clone()) {
                        c.push(name, spec, &note);
                    }
                }
            }
        }
    }
    c
}

/// Renders the sets policy chains reference (from the cache when their
/// model parts are unchanged).
struct SetRenderer<'a> {
    model: &'a NodeModel,
    cache: &'a mut NftCache,
    out: BTreeMap<String, NftSet>,
    /// While a policy chain renders: the sets it referenced, by source,
    /// with the name each had (None: the set is absent, the peer skipped).
    refs: Option<Vec<(usize, Option<String>)>>,
    /// This render's name of each set reference (by id), once computed:
    /// a set shared by hundreds of chains is checked once per render.
    current: Vec<Option<Option<String>>>,
}

impl SetRenderer<'_> {
    fn record(&mut self, r: impl FnOnce() -> SetRef, name: &Option<String>) {
        if self.refs.is_none() {
            return;
        }
        let id = self.cache.intern(r());
        if let Some(refs) = &mut self.refs
            && !refs.iter().any(|(have, _)| *have == id)
        {
            refs.push((id, name.clone()));
        }
        self.slot(id).get_or_insert_with(|| name.clone());
    }

    fn slot(&mut self, id: usize) -> &mut Option<Option<String>> {
        if self.current.len() <= id {
            self.current.resize(id + 1, None);
        }
        &mut self.current[id]
    }

    /// Whether the set reference `id` has the name `expected` in this
    /// render (putting the set into the output, once).
    fn still_named(&mut self, id: usize, expected: &Option<String>) -> bool {
        if self.slot(id).is_none() {
            let r = self.cache.set_ref(id).clone();
            let name = self.ensure(&r);
            *self.slot(id) = Some(name);
        }
        self.current[id].as_ref() == Some(expected)
    }

    /// How many distinct set references this render used.
    fn used_refs(&self) -> usize {
        self.current.iter().filter(|c| c.is_some()).count()
    }

    /// Puts the set `r` stands for into the output (a cached chain needs
    /// it too); returns its name as [`Self::peer`] / [`Self::port`] would.
    fn ensure(&mut self, r: &SetRef) -> Option<String> {
        match r {
            SetRef::Address(ps, f) => self.address_set(ps, *f),
            SetRef::Block(b) => self.block_set(b),
            SetRef::LocalPorts(p, name, f) => Some(self.local_port_set(*p, name, *f)),
            SetRef::PeerPorts(ps, f) => Some(self.peer_port_set(ps, *f)),
            SetRef::Services(ranges) => Some(self.service_set(ranges)),
        }
    }

    fn peer(&mut self, peer: &PeerModel, dir: Direction, f: Family) -> Option<String> {
        let (ip, _) = fam(f);
        let side = match dir {
            Direction::Ingress => "saddr",
            Direction::Egress => "daddr",
        };
        match peer {
            PeerModel::Set(ps) => {
                let name = self.address_set(ps, f);
                self.record(|| SetRef::Address(ps.clone(), f), &name);
                Some(format!("{ip} {side} @{}", name?))
            }
            PeerModel::Block(b) if b.family() == f => {
                if b.except.is_empty() {
                    if b.cidr.prefix_len() == 0 {
                        return Some(format!("meta nfproto ipv{}", fam(f).1));
                    }
                    return Some(format!("{ip} {side} {}", element_of(b.cidr)));
                }
                let name = self.block_set(b);
                self.record(|| SetRef::Block(b.clone()), &name);
                Some(format!("{ip} {side} @{}", name?))
            }
            PeerModel::Block(_) => None,
        }
    }

    fn port(&mut self, port: &PortModel, f: Family) -> String {
        let (ip, _) = fam(f);
        match port {
            PortModel::Protocol(p) => format!("meta l4proto {}", p.as_lower()),
            PortModel::Ranges(p, ranges) => match ranges.as_slice() {
                [(s, e)] if s == e => format!("{} dport {s}", p.as_lower()),
                [(s, e)] => format!("{} dport {s}-{e}", p.as_lower()),
                _ => {
                    let set = self.service_set(ranges);
                    self.record(|| SetRef::Services(ranges.clone()), &Some(set.clone()));
                    format!("{} dport @{set}", p.as_lower())
                }
            },
            PortModel::LocalNamed(p, name) => {
                let set = self.local_port_set(*p, name, f);
                self.record(
                    || SetRef::LocalPorts(*p, name.clone(), f),
                    &Some(set.clone()),
                );
                format!("{ip} daddr . meta l4proto . th dport @{set}")
            }
            PortModel::PeerNamed(p, ps) => {
                let set = self.peer_port_set(ps, f);
                self.record(|| SetRef::PeerPorts(ps.clone(), f), &Some(set.clone()));
                format!(
                    "meta l4proto {} {ip} daddr . meta l4proto . th dport @{set}",
                    p.as_lower()
                )
            }
        }
    }

    /// The named set of a port list, content-addressed and shared by every
    /// rule with the same list. Not an anonymous `{ 80, 443 }`: the kernel
    /// names each anonymous set by scanning every set of the table
    /// (`nf_tables_set_alloc_name`), so with one per rule a table of 20,000
    /// rules took 40 s to load and 150 ms of kernel time per chain replace
    /// (README "nftables dataplane").
    fn service_set(&mut self, ranges: &[(u16, u16)]) -> String {
        let list: Vec<String> = ranges
            .iter()
            .map(|&(s, e)| {
                if s == e {
                    s.to_string()
                } else {
                    format!("{s}-{e}")
                }
            })
            .collect();
        let name = format!("pt-{}", short_hash(&format!("pt:{}", list.join(","))));
        if !self.out.contains_key(&name) {
            let mut set = NftSet::new("inet_service");
            if ranges.iter().any(|(s, e)| s != e) {
                set = set.interval();
            }
            Arc::make_mut(&mut set.elements).extend(list);
            self.out.insert(name.clone(), set);
        }
        name
    }

    /// The (local address . proto . port) set of a local named port.
    fn local_port_set(&mut self, p: Protocol, name: &str, f: Family) -> String {
        let set = set_name("lp", f, &format!("{}/{name}", p.as_lower()));
        if !self.out.contains_key(&set)
            && let Some(src) = self.model.local_ports.get(&(p, name.to_string()))
        {
            self.out.insert(set.clone(), port_set(src, f));
        }
        set
    }

    /// The (peer address . proto . port) set of a PeerSet's named ports.
    fn peer_port_set(&mut self, ps: &str, f: Family) -> String {
        let set = set_name("pp", f, ps);
        if !self.out.contains_key(&set)
            && let Some(src) = self.model.port_sets.get(ps)
        {
            let key = (ps.to_string(), f);
            let built = match self.cache.port_sets.get(&key) {
                Some((was, s)) if Arc::ptr_eq(was, src) => s.clone(),
                _ => {
                    let s = port_set(src, f);
                    self.cache.port_sets.insert(key, (src.clone(), s.clone()));
                    s
                }
            };
            self.out.insert(set.clone(), built);
        }
        set
    }

    /// The set of a PeerSet's addresses of family `f`: plain (hash) while
    /// every member is one address, with the interval flag (another name)
    /// once one is a CIDR.
    fn address_set(&mut self, ps: &str, f: Family) -> Option<String> {
        let src = self.model.peer_sets.get(ps)?;
        if let Some((was, name, set)) = self.cache.sets[family_index(f)].get(ps)
            && Arc::ptr_eq(was, src)
        {
            if !self.out.contains_key(name) {
                self.out.insert(name.clone(), set.clone());
            }
            return Some(name.clone());
        }
        let hosts = src.hosts_only(f);
        let name = set_name(if hosts { "ps" } else { "pn" }, f, ps);
        let mut set = NftSet::new(addr_type(f));
        if !hosts {
            set = set.interval();
        }
        let elements = Arc::make_mut(&mut set.elements);
        match f {
            Family::V4 => elements.extend(src.v4.iter().map(|n| element_of(IpNet::V4(*n)))),
            Family::V6 => elements.extend(src.v6.iter().map(|n| element_of(IpNet::V6(*n)))),
        }
        if !hosts {
            // Interval sets refuse overlapping elements: keep the widest.
            let merged = without_covered(
                elements
                    .iter()
                    .filter_map(|e| {
                        e.parse::<IpNet>()
                            .ok()
                            .or_else(|| e.parse::<IpAddr>().ok().map(IpNet::from))
                    })
                    .collect(),
            );
            *elements = merged.into_iter().map(element_of).collect();
        }
        self.cache.sets[family_index(f)]
            .insert(ps.to_string(), (src.clone(), name.clone(), set.clone()));
        self.out.insert(name.clone(), set);
        Some(name)
    }

    /// The interval set of an ipBlock minus its excepts (content-addressed:
    /// a changed block is another set), or None when nothing is left.
    fn block_set(&mut self, b: &Block) -> Option<String> {
        let f = b.family();
        let mut id = b.cidr.to_string();
        for e in &b.except {
            let _ = write!(id, " except {e}");
        }
        let name = set_name("blk", f, &id);
        if self.out.contains_key(&name) {
            return Some(name);
        }
        let rest = subtract(b.cidr, &b.except);
        if rest.is_empty() {
            return None;
        }
        let mut set = NftSet::new(addr_type(f)).interval();
        for n in rest {
            set.insert(element_of(n));
        }
        self.out.insert(name.clone(), set);
        Some(name)
    }
}

/// A set element for a network: host routes without the prefix length, as
/// nft lists them.
pub fn element_of(n: IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.trunc().to_string()
    }
}

fn port_set(src: &PortSet, f: Family) -> NftSet {
    let mut set = NftSet::new(format!("{} . inet_proto . inet_service", addr_type(f)));
    for (ip, proto, port) in &src.members {
        if Family::of(ip) == f {
            set.insert(format!("{ip} . {} . {port}", proto_name(*proto)));
        }
    }
    set
}

fn proto_name(p: Protocol) -> &'static str {
    p.as_lower()
}

/// `cidr` minus every `except`, as disjoint prefixes (sorted).
pub fn subtract(cidr: IpNet, except: &[IpNet]) -> Vec<IpNet> {
    let mut out = vec![cidr];
    for e in except {
        let mut next = Vec::new();
        for p in out {
            split_around(p, *e, &mut next);
        }
        out = next;
    }
    out.sort();
    out
}

/// Pushes the parts of `p` outside `e`.
fn split_around(p: IpNet, e: IpNet, out: &mut Vec<IpNet>) {
    if !p.contains(&e) && !e.contains(&p) {
        out.push(p);
        return;
    }
    if e.contains(&p) {
        return;
    }
    // p strictly contains e: halve p and recurse.
    let Ok(halves) = p.subnets(p.prefix_len() + 1) else {
        return;
    };
    for h in halves {
        split_around(h, e, out);
    }
}

/// The networks not covered by another one of the list (sorted).
fn without_covered(mut nets: Vec<IpNet>) -> Vec<IpNet> {
    nets.sort_by_key(|n| n.prefix_len());
    let mut kept: Vec<IpNet> = Vec::new();
    for n in nets {
        if !kept.iter().any(|k| k.contains(&n)) {
            kept.push(n);
        }
    }
    kept.sort();
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn except_is_cut_out_exactly() {
        let got = subtract(net("10.0.0.0/8"), &[net("10.1.0.0/16"), net("10.0.0.0/9")]);
        let want: Vec<IpNet> = ["10.128.0.0/9"].iter().map(|s| net(s)).collect();
        assert_eq!(got, want);
        let got = subtract(net("10.0.0.0/30"), &[net("10.0.0.1/32")]);
        assert_eq!(got, vec![net("10.0.0.0/32"), net("10.0.0.2/31")]);
        assert!(subtract(net("fd00::/64"), &[net("fd00::/64")]).is_empty());
        let got = subtract(net("0.0.0.0/0"), &[net("10.0.0.0/8")]);
        assert_eq!(got.len(), 8);
        for a in ["9.255.255.255", "11.0.0.0", "255.255.255.255", "0.0.0.0"] {
            let a: IpAddr = a.parse().unwrap();
            assert!(got.iter().any(|n| n.contains(&a)), "{a}");
        }
        let inside: IpAddr = "10.2.3.4".parse().unwrap();
        assert!(!got.iter().any(|n| n.contains(&inside)));
    }

    #[test]
    fn elements_are_spelled_as_nft_lists_them() {
        assert_eq!(element_of(net("10.0.0.1/32")), "10.0.0.1");
        assert_eq!(element_of(net("10.0.0.0/8")), "10.0.0.0/8");
        assert_eq!(element_of(net("fd00::1/128")), "fd00::1");
        assert_eq!(
            without_covered(vec![net("10.0.0.0/24"), net("10.0.0.0/8")]),
            vec![net("10.0.0.0/8")]
        );
    }
}
