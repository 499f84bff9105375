//! The dataplane-neutral policy model: what a node must enforce, as plain
//! data, built once per sync from the [`PolicyInputs`] and rendered by each
//! dataplane (iptables + ipset in [`super::render`], nftables in
//! [`super::nft::render`]). Pure: no I/O, no kernel vocabulary.
//!
//! Every address carries its family ([`IpNet`] / [`IpAddr`]); which families
//! the node guards is [`Families`]. Validation happens here, once: anything
//! that cannot be enforced safely (a malformed CIDR, a PeerSet that has not
//! arrived, a policy an endpoint names but the spec lacks) is left out and
//! matches nothing (fail closed), with a [`Warning`].
//!
//! Shape (also what `kubectl canal explain` evaluates, see [`super::eval`]):
//!
//! ```text
//! PolicyModel
//!   sources: SourceMap                 interface -> addresses it may send from (anti-spoofing)
//!   endpoints: iface -> EndpointModel  pod, ingress/egress Isolation (Open | By[policy...])
//!   policies: name -> PolicyModel      ingress/egress: Option<Arc<[RuleModel]>> (only referenced directions)
//!     RuleModel { ports: Option<[PortModel]>, peers: Option<[PeerModel]> }   None = any
//!       PortModel: Protocol(p) | Ranges(p, [(from, to)]) | LocalNamed(p, name) | PeerNamed(p, PeerSet)
//!       PeerModel: Set(PeerSet) | Block { cidr, except }
//!   peer_sets: PeerSet -> AddressSet { v4, v6 }          referenced address sets
//!   port_sets: PeerSet -> PortSet {(ip, proto, port)}     referenced egress named-port sets
//!   local_ports: (proto, name) -> PortSet                 ingress named ports of local pods
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use canal_crds::{EndpointToHostAction, NodePolicySetSpec, PeerSetSpec, Protocol};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::antispoof::SourceMap;
use super::names;

/// An IP family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4.
    #[default]
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The family of an address.
    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The family of a network.
    pub fn of_net(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    /// `ipv4` / `ipv6`: the spelling of `<run-dir>/policy-families` and of labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

/// The families a node guards (anti-spoofing, and NetworkPolicy while enabled).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Families {
    /// IPv4.
    pub v4: bool,
    /// IPv6.
    pub v6: bool,
}

impl Default for Families {
    /// IPv4 only (a node with no IPv6 subnet).
    fn default() -> Self {
        Families::V4
    }
}

impl Families {
    /// IPv4 only.
    pub const V4: Families = Families {
        v4: true,
        v6: false,
    };
    /// Both.
    pub const DUAL: Families = Families { v4: true, v6: true };

    /// Whether `f` is guarded.
    pub fn has(self, f: Family) -> bool {
        match f {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }

    /// The guarded families, IPv4 first.
    pub fn iter(self) -> impl Iterator<Item = Family> {
        Family::ALL.into_iter().filter(move |f| self.has(*f))
    }

    /// `ipv4` or `ipv4,ipv6`: the content of `<run-dir>/policy-families`.
    pub fn file_text(self) -> String {
        self.iter()
            .map(Family::as_str)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Which dataplane programs policy and masquerade (`spec.policy.dataplane`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DataplaneChoice {
    /// nftables where the kernel and tools support it and the node is not
    /// already committed to iptables-legacy; iptables otherwise.
    #[default]
    Auto,
    /// canal's own nftables table.
    NfTables,
    /// iptables + ipset (the node's backend, legacy or nf_tables).
    IpTables,
}

/// The network-wide settings enforcement depends on (from CanalNetwork `default`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnforcementConfig {
    /// `policy.enabled`: false removes every policy chain, hook and set.
    pub enabled: bool,
    /// `defaultEndpointToHostAction`: pod -> own node after the pod's egress policy.
    pub endpoint_to_host: EndpointToHostAction,
    /// The families this node has pods of.
    pub families: Families,
    /// `spec.policy.dataplane`.
    pub dataplane: DataplaneChoice,
    /// `spec.policy.established`: cut the conntrack entries a change denies.
    pub established: canal_crds::EstablishedFlows,
    /// `spec.policy.logDenied`: NFLOG rules before each isolated pod's drop.
    pub log_denied: bool,
}

impl Default for EnforcementConfig {
    fn default() -> Self {
        EnforcementConfig {
            enabled: true,
            endpoint_to_host: EndpointToHostAction::Accept,
            families: Families::V4,
            dataplane: DataplaneChoice::Auto,
            established: canal_crds::EstablishedFlows::Cut,
            log_denied: false,
        }
    }
}

impl From<&canal_crds::NetworkConfig> for EnforcementConfig {
    fn from(c: &canal_crds::NetworkConfig) -> Self {
        EnforcementConfig {
            enabled: c.policy_enabled,
            endpoint_to_host: c.endpoint_to_host,
            dataplane: c.policy_dataplane.into(),
            established: c.policy_established,
            log_denied: c.policy_log_denied,
            ..EnforcementConfig::default()
        }
    }
}

impl From<canal_crds::PolicyDataplane> for DataplaneChoice {
    fn from(d: canal_crds::PolicyDataplane) -> Self {
        match d {
            canal_crds::PolicyDataplane::Auto => DataplaneChoice::Auto,
            canal_crds::PolicyDataplane::NFTables => DataplaneChoice::NfTables,
            canal_crds::PolicyDataplane::IPTables => DataplaneChoice::IpTables,
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
                    "{context}: {value:?} is not a valid IP address or CIDR; skipped"
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

/// A traffic direction of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Traffic to the pod (the peer is the source).
    Ingress,
    /// Traffic from the pod (the peer is the destination).
    Egress,
}

impl Direction {
    /// Both directions.
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// `ingress` / `egress`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    /// The verdict mark of the direction: set when the pod's policy allows.
    pub fn mark(self) -> u32 {
        match self {
            Direction::Ingress => names::INGRESS_MARK,
            Direction::Egress => names::EGRESS_MARK,
        }
    }
}

/// Whether policies isolate a pod in one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// No policy selects it: everything is allowed.
    Open,
    /// Isolated: allowed is what one of these policies allows (known
    /// policies only, each once, in the endpoint's order; empty: nothing).
    By(Vec<String>),
}

/// A local pod as enforcement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointModel {
    /// `namespace/pod`.
    pub pod: String,
    /// Traffic to it.
    pub ingress: Isolation,
    /// Traffic from it.
    pub egress: Isolation,
}

impl EndpointModel {
    /// The isolation of `dir`.
    pub fn isolation(&self, dir: Direction) -> &Isolation {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// What a rule's port list allows.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortModel {
    /// Every port of a protocol.
    Protocol(Protocol),
    /// Port ranges (inclusive, merged, sorted) of a protocol not also allowed whole.
    Ranges(Protocol, Vec<(u16, u16)>),
    /// Ingress named port: resolved per destination pod through
    /// [`PolicyModel::local_ports`] `(protocol, name)`.
    LocalNamed(Protocol, String),
    /// Egress named port: resolved per destination through
    /// [`PolicyModel::port_sets`] of the PeerSet.
    PeerNamed(Protocol, String),
}

/// An ipBlock: `cidr` minus every `except` (each inside `cidr`, same family).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Block {
    /// The block (host bits cleared).
    pub cidr: IpNet,
    /// What is cut out of it (sorted, deduplicated, host bits cleared).
    pub except: Vec<IpNet>,
}

impl Block {
    /// The block's family.
    pub fn family(&self) -> Family {
        Family::of_net(&self.cidr)
    }

    /// Whether `addr` is in the block.
    pub fn contains(&self, addr: &IpAddr) -> bool {
        self.cidr.contains(addr) && !self.except.iter().any(|e| e.contains(addr))
    }
}

/// One peer of a rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerModel {
    /// The addresses of a PeerSet ([`PolicyModel::peer_sets`]).
    Set(String),
    /// An ipBlock.
    Block(Block),
}

/// One rule of a policy: ports x peers; None means any.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RuleModel {
    /// None: any port and protocol. Some(empty): matches nothing.
    pub ports: Option<Vec<PortModel>>,
    /// None: any peer. Some(empty): matches nothing.
    pub peers: Option<Vec<PeerModel>>,
}

/// A policy's rules in the directions some local endpoint needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyModel {
    /// `namespace/name`.
    pub name: String,
    /// Ingress rules (None: no endpoint is isolated by it for ingress).
    pub ingress: Option<Arc<Vec<RuleModel>>>,
    /// Egress rules.
    pub egress: Option<Arc<Vec<RuleModel>>>,
}

impl PolicyModel {
    /// The rules of `dir`.
    pub fn rules(&self, dir: Direction) -> Option<&Arc<Vec<RuleModel>>> {
        match dir {
            Direction::Ingress => self.ingress.as_ref(),
            Direction::Egress => self.egress.as_ref(),
        }
    }
}

/// The addresses of a PeerSet, per family (sorted, deduplicated, host bits cleared).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressSet {
    /// IPv4 members.
    pub v4: Vec<Ipv4Net>,
    /// IPv6 members.
    pub v6: Vec<Ipv6Net>,
}

impl AddressSet {
    /// Whether `addr` is a member.
    pub fn contains(&self, addr: &IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.v4.iter().any(|n| n.contains(a)),
            IpAddr::V6(a) => self.v6.iter().any(|n| n.contains(a)),
        }
    }

    /// Whether every member of `family` is a single address.
    pub fn hosts_only(&self, family: Family) -> bool {
        match family {
            Family::V4 => self.v4.iter().all(|n| n.prefix_len() == 32),
            Family::V6 => self.v6.iter().all(|n| n.prefix_len() == 128),
        }
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Whether it has no member.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// (address, protocol, port) triples: named ports resolved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet {
    /// The members.
    pub members: BTreeSet<(IpAddr, Protocol, u16)>,
}

/// The whole model of one sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeModel {
    /// `policy.enabled`; false: only anti-spoofing ([`Self::sources`]).
    pub enabled: bool,
    /// `defaultEndpointToHostAction`.
    pub endpoint_to_host: EndpointToHostAction,
    /// The families guarded.
    pub families: Families,
    /// Anti-spoofing: which interface may send from which addresses.
    pub sources: SourceMap,
    /// Local pods by interface (empty while policy is disabled).
    pub endpoints: BTreeMap<String, EndpointModel>,
    /// Policies some endpoint is isolated by, by name.
    pub policies: BTreeMap<String, PolicyModel>,
    /// Address PeerSets the rules reference.
    pub peer_sets: BTreeMap<String, Arc<AddressSet>>,
    /// Egress named-port PeerSets the rules reference.
    pub port_sets: BTreeMap<String, Arc<PortSet>>,
    /// Ingress named ports the rules reference, resolved on local pods.
    pub local_ports: BTreeMap<(Protocol, String), Arc<PortSet>>,
    /// Parts of the input left out (sorted, deduplicated).
    pub warnings: Vec<Warning>,
    /// `spec.policy.logDenied`: log (NFLOG, rate-limited) before each drop
    /// of an isolated pod's chain.
    pub log_denied: bool,
}

impl NodeModel {
    /// Number of set members of every kind (for status and metrics).
    pub fn member_count(&self) -> usize {
        self.peer_sets.values().map(|s| s.len()).sum::<usize>()
            + self
                .port_sets
                .values()
                .chain(self.local_ports.values())
                .map(|s| s.members.len())
                .sum::<usize>()
    }
}

mod build;
pub use build::{ModelCache, build, build_with, merge_ranges, parse_net};
