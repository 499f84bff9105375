//! The pure renderer: a node's NodePolicySet, the PeerSets it references and
//! the network's policy settings in, the desired [`Ruleset`] out. No I/O.
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
//! INPUT   -> CANAL-INPUT     -i cali+: ESTABLISHED accept, INVALID drop,
//!                            CANAL-FROM-WL (the pod's egress policy), drop without
//!                            the egress mark, then defaultEndpointToHostAction
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
//! Anything the renderer cannot express safely (a malformed CIDR, a PeerSet
//! that has not arrived yet, a policy an endpoint names but the spec lacks)
//! matches nothing: enforcement fails closed and a [`Warning`] says why.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use canal_crds::{
    CompiledPolicy, Endpoint, EndpointToHostAction, IpBlock, NodePolicySetSpec, Peer, PeerSetSpec,
    PortMatch, PortMember, Protocol,
};
use ipnet::{IpNet, Ipv4Net};

use super::antispoof::{self, SourceMap};
use super::frame;
use super::names::{self, EGRESS_MARK, FROM_WL_CHAIN, INGRESS_MARK, TO_WL_CHAIN};
use super::ruleset::{Chain, IpSet, Ruleset, SetType};

/// The network-wide settings enforcement depends on (from CanalNetwork `default`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnforcementConfig {
    /// `policy.enabled`: false removes every policy chain, hook and set.
    pub enabled: bool,
    /// `defaultEndpointToHostAction`: pod -> own node after the pod's egress policy.
    pub endpoint_to_host: EndpointToHostAction,
}

impl Default for EnforcementConfig {
    fn default() -> Self {
        EnforcementConfig {
            enabled: true,
            endpoint_to_host: EndpointToHostAction::Accept,
        }
    }
}

impl From<&canal_crds::NetworkConfig> for EnforcementConfig {
    fn from(c: &canal_crds::NetworkConfig) -> Self {
        EnforcementConfig {
            enabled: c.policy_enabled,
            endpoint_to_host: c.endpoint_to_host,
        }
    }
}

/// Everything one sync renders from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyInputs {
    /// Network settings.
    pub config: EnforcementConfig,
    /// `metadata.generation` of the NodePolicySet (written into the handshake files).
    pub generation: Option<i64>,
    /// The node's NodePolicySet spec (empty when the controller has not written one).
    pub spec: NodePolicySetSpec,
    /// PeerSets by name; must hold every set the spec references (a missing
    /// one renders as an empty set: nobody matches until it arrives).
    pub peer_sets: BTreeMap<String, PeerSetSpec>,
    /// The NodePolicySet does not exist (only possible while policy is
    /// disabled: enabled, the agent holds): `spec.endpoints` says nothing,
    /// so anti-spoofing keeps only its reverse-path check.
    pub endpoints_unknown: bool,
}

/// Something in the input that was skipped (and therefore matches nothing).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Warning {
    /// An endpoint interface that is not `cali` + up to 11 safe characters.
    InvalidInterface { pod: String, interface: String },
    /// Two endpoints with the same interface; the first one is programmed.
    DuplicateInterface { pod: String, interface: String },
    /// An endpoint names a policy the spec does not contain.
    UnknownPolicy { pod: String, policy: String },
    /// A referenced PeerSet is not (yet) known.
    MissingPeerSet { peer_set: String },
    /// A CIDR or IP that does not parse.
    InvalidAddress { context: String, value: String },
    /// A peer that is neither exactly a PeerSet nor exactly an ipBlock.
    InvalidPeer { policy: String },
    /// A port entry that makes no sense (port 0, endPort < port, endPort alone).
    InvalidPort { policy: String },
    /// An egress named port without the PeerSet that resolves it.
    MissingNamedPortSet { policy: String, port: String },
}

impl Warning {
    /// A bounded label value for metrics.
    pub fn category(&self) -> &'static str {
        // Keep WARNING_CATEGORIES in step with this match.
        match self {
            Warning::InvalidInterface { .. } => "invalid_interface",
            Warning::DuplicateInterface { .. } => "duplicate_interface",
            Warning::UnknownPolicy { .. } => "unknown_policy",
            Warning::MissingPeerSet { .. } => "missing_peer_set",
            Warning::InvalidAddress { .. } => "invalid_address",
            Warning::InvalidPeer { .. } => "invalid_peer",
            Warning::InvalidPort { .. } => "invalid_port",
            Warning::MissingNamedPortSet { .. } => "missing_named_port_set",
        }
    }
}

/// Every [`Warning::category`] (label values of `canal_policy_render_warnings`).
pub const WARNING_CATEGORIES: [&str; 8] = [
    "invalid_interface",
    "duplicate_interface",
    "unknown_policy",
    "missing_peer_set",
    "invalid_address",
    "invalid_peer",
    "invalid_port",
    "missing_named_port_set",
];

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::InvalidInterface { pod, interface } => write!(
                f,
                "endpoint {pod}: interface {interface:?} is not a pod interface (cali + up to 11 characters); its traffic is dropped"
            ),
            Warning::DuplicateInterface { pod, interface } => write!(
                f,
                "endpoint {pod}: interface {interface} is already used by another endpoint; ignored"
            ),
            Warning::UnknownPolicy { pod, policy } => write!(
                f,
                "endpoint {pod} is isolated by policy {policy}, which the NodePolicySet does not contain; it allows nothing"
            ),
            Warning::MissingPeerSet { peer_set } => write!(
                f,
                "PeerSet {peer_set} is not known yet; it matches nobody until it arrives"
            ),
            Warning::InvalidAddress { context, value } => {
                write!(
                    f,
                    "{context}: {value:?} is not a valid IPv4 address or CIDR; skipped"
                )
            }
            Warning::InvalidPeer { policy } => write!(
                f,
                "policy {policy}: a peer must name exactly one of peerSet or ipBlock; skipped"
            ),
            Warning::InvalidPort { policy } => write!(
                f,
                "policy {policy}: a port entry has port 0, endPort without port or endPort < port; skipped"
            ),
            Warning::MissingNamedPortSet { policy, port } => write!(
                f,
                "policy {policy}: egress named port {port} has no namedPortSet; it matches nothing"
            ),
        }
    }
}

/// The renderer's result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rendered {
    /// What the kernel should hold.
    pub ruleset: Ruleset,
    /// Parts of the input that were skipped (sorted, deduplicated).
    pub warnings: Vec<Warning>,
}

/// Names of every PeerSet `spec` references (peers and egress named-port
/// sets): what the agent must put into [`PolicyInputs::peer_sets`].
pub fn referenced_peer_sets(spec: &NodePolicySetSpec) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for p in &spec.policies {
        for rule in p.ingress.iter().chain(&p.egress) {
            for peer in rule.peers.iter().flatten() {
                out.extend(peer.peer_set.iter().cloned());
            }
            for port in &rule.ports {
                out.extend(port.named_port_set.iter().cloned());
            }
        }
    }
    out
}

/// Renders the desired ruleset. Pure and deterministic: the same inputs
/// give byte-identical output.
pub fn render(inputs: &PolicyInputs) -> Rendered {
    render_with(inputs, &mut RenderCache::default())
}

/// Sets built from PeerSets by the previous render, reused when the PeerSet
/// is unchanged: converting 100,000 members costs more than the rest of a
/// render, and most syncs change one PeerSet or none. Output is identical to
/// [`render`]'s.
#[derive(Debug, Default)]
pub struct RenderCache {
    ip_sets: HashMap<String, CachedSet<Vec<String>>>,
    port_sets: HashMap<String, CachedSet<Vec<PortMember>>>,
    /// Policy chains by chain name; reused while the compiled policy is equal.
    chains: HashMap<String, CachedChain>,
}

#[derive(Debug)]
struct CachedChain {
    policy: CompiledPolicy,
    chain: Chain,
    /// The sets the chain references, replayed on a hit so they are rendered too.
    deps: Vec<SetDep>,
    warnings: Vec<Warning>,
    used: bool,
}

#[derive(Clone, Debug)]
enum SetDep {
    /// (PeerSet, set name)
    PeerIp(String, String),
    PeerPort(String, String),
    LocalNamedPort(Protocol, String, String),
    Block(String, IpSet),
}

#[derive(Debug)]
struct CachedSet<S> {
    /// The PeerSet content it was built from (None: the PeerSet was missing).
    source: Option<S>,
    members: Arc<BTreeSet<String>>,
    warnings: Vec<Warning>,
    used: bool,
}

/// [`render`] with a cache kept between calls.
pub fn render_with(inputs: &PolicyInputs, cache: &mut RenderCache) -> Rendered {
    if !inputs.config.enabled {
        // Anti-spoofing is not NetworkPolicy: it stays.
        *cache = RenderCache::default();
        let mut warnings = BTreeSet::new();
        let endpoints = valid_endpoints(&inputs.spec, &mut warnings);
        let mut ruleset = Ruleset::default();
        add_antispoof(&mut ruleset, inputs, &endpoints, &mut warnings);
        return Rendered {
            ruleset,
            warnings: warnings.into_iter().collect(),
        };
    }
    let mut r = Renderer {
        inputs,
        sets: BTreeMap::new(),
        warnings: BTreeSet::new(),
        cache,
        recording: None,
    };
    let ruleset = r.ruleset();
    let warnings = r.warnings.into_iter().collect();
    // Keep only what this render used, so the cache never outgrows the inputs.
    cache.ip_sets.retain(|_, c| std::mem::take(&mut c.used));
    cache.port_sets.retain(|_, c| std::mem::take(&mut c.used));
    cache.chains.retain(|_, c| std::mem::take(&mut c.used));
    Rendered { ruleset, warnings }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
    /// The peer is the packet's source for ingress, its destination for egress.
    fn peer_dir(self) -> &'static str {
        match self {
            Direction::Ingress => "src",
            Direction::Egress => "dst",
        }
    }
    fn peer_flag(self) -> &'static str {
        match self {
            Direction::Ingress => "-s",
            Direction::Egress => "-d",
        }
    }
}

impl Direction {
    /// The verdict mark of the direction: set when the pod's policy allows.
    fn mark(self) -> u32 {
        match self {
            Direction::Ingress => INGRESS_MARK,
            Direction::Egress => EGRESS_MARK,
        }
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

struct Renderer<'a> {
    inputs: &'a PolicyInputs,
    sets: BTreeMap<String, IpSet>,
    warnings: BTreeSet<Warning>,
    cache: &'a mut RenderCache,
    /// While rendering a policy chain: the sets and warnings it produces.
    recording: Option<(Vec<SetDep>, Vec<Warning>)>,
}

impl Renderer<'_> {
    fn ruleset(&mut self) -> Ruleset {
        let spec = &self.inputs.spec;
        let endpoints = valid_endpoints(spec, &mut self.warnings);
        let mut policies: BTreeMap<&str, &CompiledPolicy> = BTreeMap::new();
        for p in &spec.policies {
            policies.entry(p.name.as_str()).or_insert(p);
        }

        let mut chains = BTreeMap::new();
        let mut to_wl = Chain::default();
        let mut from_wl = Chain::default();
        let mut needed: BTreeSet<(&str, bool)> = BTreeSet::new(); // (policy, is_ingress)
        for (iface, ep) in &endpoints {
            let tw = names::to_endpoint_chain(iface);
            let fw = names::from_endpoint_chain(iface);
            let pod = format!("{}/{}", ep.namespace, ep.pod);
            to_wl.push(TO_WL_CHAIN, format!("-o {iface} -g {tw}"), &pod);
            from_wl.push(FROM_WL_CHAIN, format!("-i {iface} -g {fw}"), &pod);
            let tw_chain = self.endpoint_chain(
                &tw,
                ep,
                &ep.ingress_policies,
                Direction::Ingress,
                &policies,
                &mut needed,
            );
            let fw_chain = self.endpoint_chain(
                &fw,
                ep,
                &ep.egress_policies,
                Direction::Egress,
                &policies,
                &mut needed,
            );
            chains.insert(tw, tw_chain);
            chains.insert(fw, fw_chain);
        }
        to_wl.push(TO_WL_CHAIN, "-j DROP", "unknown pod interface");
        from_wl.push(FROM_WL_CHAIN, "-j DROP", "unknown pod interface");
        chains.insert(TO_WL_CHAIN.to_string(), to_wl);
        chains.insert(FROM_WL_CHAIN.to_string(), from_wl);

        for (policy, ingress) in needed {
            let Some(p) = policies.get(policy) else {
                continue;
            };
            let (name, chain) = if ingress {
                let name = names::policy_ingress_chain(policy);
                let chain = self.policy_chain(&name, p, Direction::Ingress, &endpoints);
                (name, chain)
            } else {
                let name = names::policy_egress_chain(policy);
                let chain = self.policy_chain(&name, p, Direction::Egress, &endpoints);
                (name, chain)
            };
            chains.insert(name, chain);
        }

        let mut hooks = Vec::new();
        for (name, chain, hook) in frame::policy_frame(self.inputs.config.endpoint_to_host) {
            chains.insert(name, chain);
            hooks.extend(hook);
        }
        let mut ruleset = Ruleset {
            hooks,
            chains,
            sets: std::mem::take(&mut self.sets),
            endpoints: endpoints.keys().map(|s| s.to_string()).collect(),
            spoof_rules: BTreeMap::new(),
        };
        add_antispoof(&mut ruleset, self.inputs, &endpoints, &mut self.warnings);
        ruleset
    }

    fn endpoint_chain<'p>(
        &mut self,
        chain_name: &str,
        ep: &Endpoint,
        isolating: &'p [String],
        dir: Direction,
        policies: &BTreeMap<&str, &CompiledPolicy>,
        needed: &mut BTreeSet<(&'p str, bool)>,
    ) -> Chain {
        let mut chain = Chain::default();
        if isolating.is_empty() {
            // The verdict mark is what lets the packet through CANAL-FORWARD
            // (and the guard): a flushed endpoint chain sets none and fails closed.
            chain.push(
                chain_name,
                set_mark(dir),
                &format!("not isolated for {}", dir.as_str()),
            );
            return chain;
        }
        chain.push(
            chain_name,
            clear_mark(dir),
            &format!("clear {} mark", dir.as_str()),
        );
        let mut seen = BTreeSet::new();
        for policy in isolating {
            if !seen.insert(policy.as_str()) {
                continue;
            }
            if !policies.contains_key(policy.as_str()) {
                self.warnings.insert(Warning::UnknownPolicy {
                    pod: format!("{}/{}", ep.namespace, ep.pod),
                    policy: policy.clone(),
                });
                continue;
            }
            let target = match dir {
                Direction::Ingress => names::policy_ingress_chain(policy),
                Direction::Egress => names::policy_egress_chain(policy),
            };
            needed.insert((policy.as_str(), dir == Direction::Ingress));
            chain.push(chain_name, format!("-j {target}"), policy);
            chain.push(
                chain_name,
                if_marked_return(dir),
                &format!("allowed by {policy}"),
            );
        }
        chain.push(
            chain_name,
            "-j DROP",
            &format!("no policy allowed {}", dir.as_str()),
        );
        chain
    }

    /// A policy chain, from the cache when the compiled policy is unchanged.
    fn policy_chain(
        &mut self,
        chain_name: &str,
        policy: &CompiledPolicy,
        dir: Direction,
        endpoints: &BTreeMap<&str, &Endpoint>,
    ) -> Chain {
        if let Some(c) = self.cache.chains.get_mut(chain_name)
            && c.policy == *policy
        {
            c.used = true;
            let chain = c.chain.clone();
            let deps = c.deps.clone();
            self.warnings.extend(c.warnings.iter().cloned());
            for dep in deps {
                match dep {
                    SetDep::PeerIp(ps, set) => {
                        self.peer_ip_set_named(&ps, set);
                    }
                    SetDep::PeerPort(ps, set) => {
                        self.peer_port_set_named(&ps, set);
                    }
                    SetDep::LocalNamedPort(proto, port, set) => {
                        self.local_named_port_set_named(proto, &port, set, endpoints);
                    }
                    SetDep::Block(name, set) => {
                        self.sets.insert(name, set);
                    }
                }
            }
            return chain;
        }
        self.recording = Some((Vec::new(), Vec::new()));
        let chain = self.render_policy_chain(chain_name, policy, dir, endpoints);
        let (deps, warnings) = self.recording.take().unwrap_or_default();
        self.cache.chains.insert(
            chain_name.to_string(),
            CachedChain {
                policy: policy.clone(),
                chain: chain.clone(),
                deps,
                warnings,
                used: true,
            },
        );
        chain
    }

    fn warn(&mut self, w: Warning) {
        if let Some((_, ws)) = &mut self.recording {
            ws.push(w.clone());
        }
        self.warnings.insert(w);
    }

    fn record(&mut self, dep: SetDep) {
        if let Some((deps, _)) = &mut self.recording {
            deps.push(dep);
        }
    }

    fn render_policy_chain(
        &mut self,
        chain_name: &str,
        policy: &CompiledPolicy,
        dir: Direction,
        endpoints: &BTreeMap<&str, &Endpoint>,
    ) -> Chain {
        let rules = match dir {
            Direction::Ingress => &policy.ingress,
            Direction::Egress => &policy.egress,
        };
        let mut chain = Chain::default();
        let mut seen = BTreeSet::new();
        for (i, rule) in rules.iter().enumerate() {
            let peers: Vec<String> = match &rule.peers {
                None => vec![String::new()],
                Some(list) => list
                    .iter()
                    .filter_map(|p| self.peer_matcher(p, dir, &policy.name))
                    .collect(),
            };
            let ports = self.port_matchers(&rule.ports, dir, &policy.name, endpoints);
            let note = format!("{} {} rule {i}", policy.name, dir.as_str());
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

    /// The match for one peer, or None when it matches nobody.
    fn peer_matcher(&mut self, peer: &Peer, dir: Direction, policy: &str) -> Option<String> {
        match (&peer.peer_set, &peer.ip_block) {
            (Some(ps), None) => {
                let set = self.peer_ip_set(ps);
                self.record(SetDep::PeerIp(ps.clone(), set.clone()));
                Some(format!("-m set --match-set {set} {}", dir.peer_dir()))
            }
            (None, Some(block)) => self.ip_block_matcher(block, dir, policy),
            _ => {
                self.warn(Warning::InvalidPeer {
                    policy: policy.to_string(),
                });
                None
            }
        }
    }

    fn peer_ip_set(&mut self, peer_set: &str) -> String {
        let name = names::set_name("peer", SetType::HashNet.as_str(), peer_set);
        self.peer_ip_set_named(peer_set, name)
    }

    fn peer_ip_set_named(&mut self, peer_set: &str, name: String) -> String {
        if self.sets.contains_key(&name) {
            return name;
        }
        let source = self.inputs.peer_sets.get(peer_set).map(|ps| &ps.ips);
        let (set, warnings) = cached_set(
            &mut self.cache.ip_sets,
            peer_set,
            source,
            SetType::HashNet,
            |ips, set, warnings| {
                for ip in ips {
                    // Fast path: a plain dotted quad is already spelled as ipset prints it
                    // (std's parser refuses leading zeros and whitespace).
                    if ip.parse::<Ipv4Addr>().is_ok() {
                        set.insert(ip.clone());
                        continue;
                    }
                    match parse_net(ip) {
                        Some(IpNet::V4(n)) => set.insert(net_member(n)),
                        Some(IpNet::V6(_)) => {} // this table filters IPv4 only
                        None => warnings.push(Warning::InvalidAddress {
                            context: format!("PeerSet {peer_set}"),
                            value: ip.clone(),
                        }),
                    }
                }
            },
        );
        self.warnings.extend(warnings);
        self.sets.insert(name.clone(), set);
        name
    }

    fn ip_block_matcher(
        &mut self,
        block: &IpBlock,
        dir: Direction,
        policy: &str,
    ) -> Option<String> {
        let cidr = match parse_net(&block.cidr) {
            Some(IpNet::V4(n)) => n.trunc(),
            Some(IpNet::V6(_)) => return None, // cannot match IPv4 traffic
            None => {
                self.warn(Warning::InvalidAddress {
                    context: format!("policy {policy} ipBlock"),
                    value: block.cidr.clone(),
                });
                return None;
            }
        };
        let mut excepts = BTreeSet::new();
        for e in &block.except {
            match parse_net(e) {
                Some(IpNet::V4(n)) => {
                    let n = n.trunc();
                    // An except outside the block excludes nothing.
                    if cidr.contains(&n) {
                        excepts.insert(n);
                    }
                }
                Some(IpNet::V6(_)) => {}
                None => {
                    // Unparseable except: fail closed, the whole block matches nothing.
                    self.warn(Warning::InvalidAddress {
                        context: format!("policy {policy} ipBlock.except"),
                        value: e.clone(),
                    });
                    return None;
                }
            }
        }
        if excepts.is_empty() {
            if cidr.prefix_len() == 0 {
                return Some(String::new());
            }
            return Some(format!("{} {}", dir.peer_flag(), net_member(cidr)));
        }
        // hash:net cannot hold a /0: cover it with two /1s.
        let mut positives: Vec<Ipv4Net> = if cidr.prefix_len() == 0 {
            cidr.subnets(1).map(|s| s.collect()).unwrap_or_default()
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
        let mut set = IpSet::new(SetType::HashNet);
        for p in positives {
            set.insert(net_member(p));
        }
        for e in excepts {
            set.insert(format!("{} nomatch", net_member(e)));
        }
        self.record(SetDep::Block(name.clone(), set.clone()));
        self.sets.insert(name.clone(), set);
        Some(format!("-m set --match-set {name} {}", dir.peer_dir()))
    }

    /// The port matches of one rule; empty when every entry was invalid
    /// (the rule then matches nothing).
    fn port_matchers(
        &mut self,
        ports: &[PortMatch],
        dir: Direction,
        policy: &str,
        endpoints: &BTreeMap<&str, &Endpoint>,
    ) -> Vec<String> {
        if ports.is_empty() {
            return vec![String::new()];
        }
        let mut whole: BTreeSet<Protocol> = BTreeSet::new();
        let mut ranges: BTreeMap<Protocol, Vec<(u16, u16)>> = BTreeMap::new();
        let mut named: BTreeSet<String> = BTreeSet::new();
        for pm in ports {
            let proto = pm.protocol.as_lower();
            if let Some(port_name) = &pm.named_port {
                match dir {
                    Direction::Ingress => {
                        let set = self.local_named_port_set(pm.protocol, port_name, endpoints);
                        self.record(SetDep::LocalNamedPort(
                            pm.protocol,
                            port_name.clone(),
                            set.clone(),
                        ));
                        named.insert(format!("-p {proto} -m set --match-set {set} dst,dst"));
                    }
                    Direction::Egress => match &pm.named_port_set {
                        Some(ps) => {
                            let set = self.peer_port_set(ps);
                            self.record(SetDep::PeerPort(ps.clone(), set.clone()));
                            named.insert(format!("-p {proto} -m set --match-set {set} dst,dst"));
                        }
                        None => {
                            self.warn(Warning::MissingNamedPortSet {
                                policy: policy.to_string(),
                                port: port_name.clone(),
                            });
                        }
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
                _ => {
                    self.warn(Warning::InvalidPort {
                        policy: policy.to_string(),
                    });
                }
            }
        }
        let mut out = Vec::new();
        for proto in &whole {
            out.push(format!("-p {}", proto.as_lower()));
        }
        for (proto, list) in ranges {
            if whole.contains(&proto) {
                continue;
            }
            for chunk in multiport_chunks(merge_ranges(list)) {
                out.push(dport_match(proto, &chunk));
            }
        }
        out.extend(named);
        out
    }

    /// Node-local `hash:ip,port` set: every local endpoint that declares
    /// (protocol, name), so `dst,dst` resolves the name per destination pod.
    fn local_named_port_set(
        &mut self,
        protocol: Protocol,
        port_name: &str,
        endpoints: &BTreeMap<&str, &Endpoint>,
    ) -> String {
        let id = format!("{}/{port_name}", protocol.as_lower());
        let name = names::set_name("local-named-port", SetType::HashIpPort.as_str(), &id);
        self.local_named_port_set_named(protocol, port_name, name, endpoints)
    }

    fn local_named_port_set_named(
        &mut self,
        protocol: Protocol,
        port_name: &str,
        name: String,
        endpoints: &BTreeMap<&str, &Endpoint>,
    ) -> String {
        if !self.sets.contains_key(&name) {
            let mut set = IpSet::new(SetType::HashIpPort);
            for ep in endpoints.values() {
                for np in ep
                    .named_ports
                    .iter()
                    .filter(|np| np.name == port_name && np.protocol == protocol && np.port > 0)
                {
                    for ip in &ep.ips {
                        match ip.parse::<IpAddr>() {
                            Ok(IpAddr::V4(a)) => {
                                set.insert(port_member(a, protocol, np.port));
                            }
                            Ok(IpAddr::V6(_)) => {}
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
            self.sets.insert(name.clone(), set);
        }
        name
    }

    /// `hash:ip,port` set of an egress named-port PeerSet.
    fn peer_port_set(&mut self, peer_set: &str) -> String {
        let name = names::set_name("peer-port", SetType::HashIpPort.as_str(), peer_set);
        self.peer_port_set_named(peer_set, name)
    }

    fn peer_port_set_named(&mut self, peer_set: &str, name: String) -> String {
        if self.sets.contains_key(&name) {
            return name;
        }
        let source = self.inputs.peer_sets.get(peer_set).map(|ps| &ps.ports);
        let (set, warnings) = cached_set(
            &mut self.cache.port_sets,
            peer_set,
            source,
            SetType::HashIpPort,
            |ports, set, warnings| {
                for m in ports {
                    match m.ip.parse::<IpAddr>() {
                        Ok(IpAddr::V4(a)) if m.port > 0 => {
                            set.insert(port_member(a, m.protocol, m.port));
                        }
                        Ok(_) => {}
                        Err(_) => warnings.push(Warning::InvalidAddress {
                            context: format!("PeerSet {peer_set}"),
                            value: m.ip.clone(),
                        }),
                    }
                }
            },
        );
        self.warnings.extend(warnings);
        self.sets.insert(name.clone(), set);
        name
    }
}

/// The endpoints the renderer programs, by interface: those with a valid
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

/// Adds the anti-spoofing layer (raw table) for `endpoints` to `ruleset`.
fn add_antispoof(
    ruleset: &mut Ruleset,
    inputs: &PolicyInputs,
    endpoints: &BTreeMap<&str, &Endpoint>,
    warnings: &mut BTreeSet<Warning>,
) {
    let map = if inputs.endpoints_unknown {
        SourceMap::unknown()
    } else {
        SourceMap::from_endpoints(endpoints.iter().map(|(i, e)| (*i, *e)), warnings)
    };
    let raw = antispoof::render_raw(&map);
    ruleset
        .chains
        .insert(names::PREROUTING_CHAIN.to_string(), raw.chain);
    ruleset.hooks.extend(raw.hook);
    ruleset.sets.extend(raw.sets);
    ruleset.spoof_rules = raw.drops;
}

/// The set built from a PeerSet's content (`source`; None: the PeerSet is
/// missing) and the warnings building it gave: from `cache` while the
/// content is unchanged (most syncs change one PeerSet or none), else built
/// by `build` and cached.
fn cached_set<S: Clone + PartialEq>(
    cache: &mut HashMap<String, CachedSet<S>>,
    peer_set: &str,
    source: Option<&S>,
    set_type: SetType,
    build: impl FnOnce(&S, &mut IpSet, &mut Vec<Warning>),
) -> (IpSet, Vec<Warning>) {
    if let Some(c) = cache.get_mut(peer_set)
        && c.source.as_ref() == source
    {
        c.used = true;
        let set = IpSet {
            set_type,
            members: c.members.clone(),
        };
        return (set, c.warnings.clone());
    }
    let mut set = IpSet::new(set_type);
    let mut warnings = Vec::new();
    match source {
        Some(s) => build(s, &mut set, &mut warnings),
        None => warnings.push(Warning::MissingPeerSet {
            peer_set: peer_set.to_string(),
        }),
    }
    cache.insert(
        peer_set.to_string(),
        CachedSet {
            source: source.cloned(),
            members: set.members.clone(),
            warnings: warnings.clone(),
            used: true,
        },
    );
    (set, warnings)
}

/// Parses `a.b.c.d` or `a.b.c.d/len` (v4 or v6).
fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// A hash:net member as `ipset save` prints it: host routes without `/32`.
fn net_member(n: Ipv4Net) -> String {
    let n = n.trunc();
    if n.prefix_len() == 32 {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

fn port_member(ip: Ipv4Addr, protocol: Protocol, port: u16) -> String {
    format!("{ip},{}:{port}", protocol.as_lower())
}

/// Sorts and merges overlapping or adjacent ranges.
fn merge_ranges(mut list: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
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
