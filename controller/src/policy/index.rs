//! The policy index: a pure state machine fed by `apply`/`delete`/`reset`
//! per watched type (Namespaces, Pods, Nodes, NetworkPolicies, and the
//! NodePolicySets and PeerSets the cluster holds), that says which objects
//! must be written ([`PolicyIndex::flush`]) and renders them on demand.
//!
//! Shape of the state, and why:
//!
//! - **Groups.** Policies with the same pod selector in one namespace share
//!   one group; a pod lists the groups it belongs to and a group counts its
//!   endpoints per node (its span). 10,000 policies selecting every pod cost
//!   one selector evaluation per pod, and a policy change dirties only the
//!   nodes in its group's span.
//! - **PeerSets.** Each distinct peer (selector + scope, or named port) is
//!   one set, reference counted by the policies using it. A pod lists the
//!   sets it is a member of (the reverse index), so a pod event touches
//!   only those sets and its own node. Set membership is kept incrementally
//!   (IP refcounts and a sum-of-hashes fingerprint), so a pod event costs
//!   O(1) per set, even for a set with 150,000 members.
//! - **Fingerprints instead of objects.** The desired NodePolicySet of a
//!   node is never kept; [`PolicyIndex::flush`] fingerprints it from the
//!   endpoints and the group fingerprints, and compares with what the
//!   cluster holds (see `fingerprint.rs`). Objects are rendered one at a
//!   time when written, so memory does not scale with the output size.
//!
//! - **Pod IPs are claimed.** A pod is known to NetworkPolicy only by the
//!   IPs it holds: those inside its node's podCIDRs and clusterCIDR (canal
//!   allocates nowhere else) that no pod before it holds (see `claims.rs`).
//!   Any other IP it reports joins no PeerSet and is no endpoint address,
//!   so a forged or duplicated pod status never grants one pod another
//!   pod's access; the pod gets a Warning Event ([`PodIpReport`]).
//!
//! Everything is keyed by small slab ids; strings are interned. No I/O.
//! Submodules: `namespaces`, `pods`, `nodes` and `policies` (the updates
//! per watched type), `pod_ips` (claims), `flush` (what to write),
//! `render` (the objects).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use canal_crds::CompiledPolicy;
use canal_crds::Protocol;
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::jiff::Timestamp;
use smallvec::SmallVec;

use super::claims::IpClaims;

use super::compile::{self, PeerKey, PeerRef, PeerScope, PolicyDef};
use super::fingerprint::{self, Fingerprint, Fp};
use super::input::{NamespaceInfo, NodeInfo, PodInfo};
use super::intern::{Interner, Sym};
use super::objects::{self, Limits, PartKey};
use super::selector::{Labels, Selector};
use super::shard::Shards;
use super::slab::{Id, Slab};

mod flush;
mod namespaces;
mod nodes;
mod pod_ips;
mod pods;
mod policies;
mod render;

pub use flush::{Change, Changes, Kind};
pub use render::{RenderedNodePolicySet, RenderedPeerSet, RenderedPolicyGroup};

type NsId = Id<Namespace>;
type PodId = Id<Pod>;
type NodeId = Id<Node>;
type PolicyId = Id<Policy>;
type GroupId = Id<Group>;
type SetId = Id<PeerSet>;

struct Namespace {
    name: Sym,
    labels: Labels,
    /// A Namespace object is known (pods may arrive before it).
    exists: bool,
    pods: HashMap<Arc<str>, PodId>,
    /// Policy groups of this namespace by selector text.
    groups: HashMap<Box<str>, GroupId>,
    /// Pod PeerSets scoped to this namespace.
    scoped_sets: Vec<SetId>,
    /// Namespace-selector PeerSets whose selector matches these labels.
    nssel_sets: Vec<SetId>,
    /// Policies of this namespace (valid or not).
    policies: usize,
}

struct Pod {
    ns: NsId,
    name: Arc<str>,
    node: Option<NodeId>,
    labels: Labels,
    ips: Box<[IpAddr]>,
    /// Sorted like `NamedPort` (name, protocol, port).
    named_ports: Box<[(Sym, Protocol, u16)]>,
    host_network: bool,
    finished: bool,
    uid: Option<Box<str>>,
    created: Option<Timestamp>,
    terminating: bool,
    /// Bit i: `ips[i]` is claimed (inside the node's podCIDRs and
    /// clusterCIDR). A pod has at most two IPs (one per family); a mask
    /// instead of lists keeps 150,000 pods small.
    claimed: u8,
    /// Bit i: `ips[i]` is claimed and no pod before it holds it: what
    /// NetworkPolicy knows the pod by (set memberships, named ports, its
    /// endpoint).
    held: u8,
    /// The IP problem last reported with an Event.
    reported: Option<String>,
    /// Listed in `ip_review`.
    review_queued: bool,
    /// Fingerprint of what the pod shows in its endpoint (name, held IPs,
    /// named ports), recomputed only when those change.
    own_fp: Fingerprint,
    /// Groups selecting this pod, in canonical (selector text) order.
    groups: SmallVec<[GroupId; 4]>,
    /// Pod PeerSets this pod is a member of.
    sets: SmallVec<[SetId; 4]>,
}

/// The IPs of `ips` whose bit is set in `mask` (at most the first eight).
fn masked(ips: &[IpAddr], mask: u8) -> impl Iterator<Item = IpAddr> + '_ {
    ips.iter()
        .take(8)
        .enumerate()
        .filter(move |(i, _)| mask & (1 << i) != 0)
        .map(|(_, ip)| *ip)
}

impl Pod {
    /// The IPs NetworkPolicy knows the pod by.
    fn held_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        masked(&self.ips, self.held)
    }

    /// A NetworkPolicy subject or peer at all.
    fn member(&self) -> bool {
        !self.host_network && !self.finished
    }

    /// Listed in its node's NodePolicySet.
    fn endpoint(&self) -> Option<NodeId> {
        if self.member() { self.node } else { None }
    }
}

struct Node {
    name: Arc<str>,
    exists: bool,
    /// The Node's pod subnets: its pods hold addresses only from these.
    pod_cidrs: Vec<IpNet>,
    /// Endpoint pods on this node.
    pods: Vec<PodId>,
    /// Pods naming this node (endpoints or not).
    refs: u32,
    dirty: bool,
}

struct Policy {
    ns: NsId,
    namespace: String,
    name: String,
    full_name: Arc<str>,
    uid: Option<String>,
    /// The compiled version in force (kept when an update is invalid).
    active: Option<Active>,
    /// What is wrong with the latest version, if anything.
    problem: Option<String>,
}

struct Active {
    group: GroupId,
    ingress: bool,
    egress: bool,
    compiled: Arc<CompiledPolicy>,
    /// Fingerprint of name, types and rules.
    fp: Fingerprint,
    sets: Vec<SetId>,
    /// Where the parts of the compiled policy sit in its group's slices.
    parts: SmallVec<[PartKey; 1]>,
}

struct Group {
    ns: NsId,
    key: Box<str>,
    /// The PolicyGroup object's name.
    name: Arc<str>,
    selector: Selector,
    /// Active policies with this selector, sorted by full name.
    policies: Vec<PolicyId>,
    /// Endpoints of the group per node.
    span: HashMap<NodeId, u32>,
    /// Cached fingerprint; None while stale.
    fp: Option<Fingerprint>,
    /// Listed in `stale_groups`.
    queued: bool,
    /// The policies' parts, by slice.
    shards: Shards,
    /// Listed in `dirty_groups` (its objects must be compared).
    dirty: bool,
}

struct PeerSet {
    name: Arc<str>,
    key: PeerKey,
    selector_fp: Fingerprint,
    refs: u32,
    /// Pod sets: member IPs with the number of pods holding each. Ordered:
    /// no rehash pauses on big sets, and rendering needs no sort.
    ips: BTreeMap<IpAddr, u32>,
    /// Sum of `fingerprint::ip_member` over the distinct IPs.
    sum: Fingerprint,
    /// The distinct IPs, by slice.
    shards: Shards,
    dirty: bool,
}

/// Members of one (port name, protocol), kept for every named port any pod
/// declares, so a policy naming it finds its set ready.
struct PortMembers {
    members: BTreeMap<(IpAddr, u16), u32>,
    sum: Fingerprint,
    /// The distinct members, by slice.
    shards: Shards,
    set: Option<SetId>,
}

impl PortMembers {
    fn new(budget: u64) -> PortMembers {
        PortMembers {
            members: BTreeMap::new(),
            sum: 0,
            shards: Shards::new(budget),
            set: None,
        }
    }
}

/// A policy whose validity changed, for an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyReport {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID of the object, for the Event's reference.
    pub uid: Option<String>,
    /// Invalid (with every problem), or valid again.
    pub problem: Option<String>,
    /// The previous valid version stays in force.
    pub kept_previous: bool,
}

/// A pod whose IPs NetworkPolicy does not (or again does) use, for an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIpReport {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID, for the Event's reference.
    pub uid: Option<String>,
    /// Which IPs are not used and why; None: every IP is used again.
    pub problem: Option<String>,
}

/// Sizes of the index, for gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Namespaces known (with objects or referenced).
    pub namespaces: usize,
    /// Pods known.
    pub pods: usize,
    /// Nodes with a Node object (one NodePolicySet each).
    pub nodes: usize,
    /// Pods that are endpoints on a node.
    pub endpoints: usize,
    /// NetworkPolicies known.
    pub policies: usize,
    /// NetworkPolicies whose latest version is invalid.
    pub invalid_policies: usize,
    /// Distinct policy pod selectors.
    pub groups: usize,
    /// PeerSets referenced by a policy.
    pub peer_sets: usize,
    /// PeerSets over their slice budget (written as a head and slices).
    pub sharded_peer_sets: usize,
    /// Policy groups over their slice budget.
    pub sharded_policy_groups: usize,
}

/// The compiler's state. See the module documentation.
#[derive(Default)]
pub struct PolicyIndex {
    limits: Limits,
    interner: Interner,
    namespaces: Slab<Namespace>,
    ns_by_name: HashMap<Arc<str>, NsId>,
    pods: Slab<Pod>,
    nodes: Slab<Node>,
    node_by_name: HashMap<Arc<str>, NodeId>,
    policies: Slab<Policy>,
    policy_by_name: HashMap<Arc<str>, PolicyId>,
    groups: Slab<Group>,
    group_by_name: HashMap<Arc<str>, GroupId>,
    stale_groups: Vec<GroupId>,
    dirty_groups: Vec<GroupId>,
    sets: Slab<PeerSet>,
    set_by_name: HashMap<Arc<str>, SetId>,
    nssel_sets: Vec<SetId>,
    named_ports: HashMap<(Sym, Protocol), PortMembers>,
    dirty_nodes: Vec<NodeId>,
    dirty_sets: Vec<SetId>,
    dirty_nps_names: HashSet<Arc<str>>,
    /// Heads (names) of PeerSets / PolicyGroups to compare again.
    dirty_ps_names: HashSet<Arc<str>>,
    dirty_pg_names: HashSet<Arc<str>>,
    /// What the cluster holds (see `flush::Written`).
    written_nps: flush::Written,
    written_ps: flush::Written,
    written_pg: flush::Written,
    reports: Vec<PolicyReport>,
    /// Who holds each pod IP.
    claims: IpClaims<PodId>,
    /// The cluster's pod ranges (None: not known, not checked).
    cluster_cidrs: Option<Vec<IpNet>>,
    /// Pods whose IP problem may have changed since the last flush.
    ip_review: Vec<PodId>,
}

impl PolicyIndex {
    /// An empty index.
    pub fn new() -> PolicyIndex {
        PolicyIndex::default()
    }

    /// An empty index with these object size limits.
    pub fn with_limits(limits: Limits) -> PolicyIndex {
        PolicyIndex {
            limits,
            ..PolicyIndex::default()
        }
    }

    /// The object size limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    // ----- Namespaces -------------------------------------------------

    /// Sizes, for gauges.
    pub fn stats(&self) -> Stats {
        Stats {
            namespaces: self.namespaces.len(),
            pods: self.pods.len(),
            nodes: self.nodes.iter().filter(|(_, n)| n.exists).count(),
            endpoints: self.nodes.iter().map(|(_, n)| n.pods.len()).sum(),
            policies: self.policies.len(),
            invalid_policies: self
                .policies
                .iter()
                .filter(|(_, p)| p.problem.is_some())
                .count(),
            groups: self.groups.len(),
            peer_sets: self.sets.len(),
            sharded_peer_sets: self
                .sets
                .iter()
                .filter(|(id, _)| self.set_shards(*id).is_some_and(Shards::is_sharded))
                .count(),
            sharded_policy_groups: self
                .groups
                .iter()
                .filter(|(_, g)| g.shards.is_sharded())
                .count(),
        }
    }

    /// The slices of a PeerSet's members (None: a named-port set no pod
    /// declares yet).
    fn set_shards(&self, id: SetId) -> Option<&Shards> {
        let set = &self.sets[id];
        match &set.key {
            PeerKey::Pods { .. } => Some(&set.shards),
            PeerKey::NamedPort { name, protocol } => self
                .named_ports
                .get(&(name.clone(), *protocol))
                .map(|e| &e.shards),
        }
    }
}

fn span_remove(span: &mut HashMap<NodeId, u32>, node: NodeId) {
    if let Some(n) = span.get_mut(&node) {
        *n -= 1;
        if *n == 0 {
            span.remove(&node);
        }
    }
}

/// Fingerprint of what a pod shows in its endpoint besides its policies
/// (the interface name is a function of namespace and name).
fn pod_fp(
    namespace: &str,
    name: &str,
    ips: &[IpAddr],
    named_ports: &[(Sym, Protocol, u16)],
) -> Fingerprint {
    let mut h = Fp::new("pod");
    h.str(namespace).str(name).u64(ips.len() as u64);
    for ip in ips {
        h.display(ip);
    }
    h.u64(named_ports.len() as u64);
    for (port_name, protocol, port) in named_ports {
        h.str(port_name).u64(*protocol as u64).u64(u64::from(*port));
    }
    h.finish()
}
