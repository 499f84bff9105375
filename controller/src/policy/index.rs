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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use canal_crds::Protocol;
use canal_crds::{CompiledPolicy, Endpoint, NamedPort, NodePolicySetSpec, PeerSetSpec, PortMember};
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::jiff::Timestamp;
use smallvec::SmallVec;

use super::claims::IpClaims;

use super::compile::{self, PeerKey, PeerRef, PeerScope, PolicyDef};
use super::fingerprint::{self, Fingerprint, Fp};
use super::input::{NamespaceInfo, NodeInfo, PodInfo};
use super::intern::{Interner, Sym};
use super::selector::{Labels, Selector};
use super::slab::{Id, Slab};

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
}

struct Group {
    ns: NsId,
    key: Box<str>,
    selector: Selector,
    /// Active policies with this selector, sorted by full name.
    policies: Vec<PolicyId>,
    /// Endpoints of the group per node.
    span: HashMap<NodeId, u32>,
    /// Cached fingerprint; None while stale.
    fp: Option<Fingerprint>,
    /// Listed in `stale_groups`.
    queued: bool,
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
    dirty: bool,
}

/// Members of one (port name, protocol), kept for every named port any pod
/// declares, so a policy naming it finds its set ready.
#[derive(Default)]
struct PortMembers {
    members: BTreeMap<(IpAddr, u16), u32>,
    sum: Fingerprint,
    set: Option<SetId>,
}

/// A write the cluster needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Server-side apply the rendered object.
    Apply(Arc<str>),
    /// Delete the object.
    Delete(Arc<str>),
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

/// What a flush found: the writes, in no particular order within a kind
/// (the caller applies PeerSets before NodePolicySets and deletes
/// NodePolicySets before PeerSets), and the policy and pod reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// PeerSet writes.
    pub peer_sets: Vec<Change>,
    /// NodePolicySet writes.
    pub node_policy_sets: Vec<Change>,
    /// Policies that became invalid or valid again.
    pub reports: Vec<PolicyReport>,
    /// Pods whose IP problem changed.
    pub pod_reports: Vec<PodIpReport>,
}

impl Changes {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.peer_sets.is_empty()
            && self.node_policy_sets.is_empty()
            && self.reports.is_empty()
            && self.pod_reports.is_empty()
    }
}

/// A NodePolicySet ready to write.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderedNodePolicySet {
    /// The spec.
    pub spec: NodePolicySetSpec,
    /// Desired-state fingerprint (for the annotation and `mark_written`).
    pub fingerprint: Fingerprint,
}

/// A PeerSet ready to write.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderedPeerSet {
    /// The spec.
    pub spec: PeerSetSpec,
    /// Desired-state fingerprint.
    pub fingerprint: Fingerprint,
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
}

/// The compiler's state. See the module documentation.
#[derive(Default)]
pub struct PolicyIndex {
    interner: Interner,
    namespaces: Slab<Namespace>,
    ns_by_name: HashMap<Arc<str>, NsId>,
    pods: Slab<Pod>,
    nodes: Slab<Node>,
    node_by_name: HashMap<Arc<str>, NodeId>,
    policies: Slab<Policy>,
    policy_by_name: HashMap<Arc<str>, PolicyId>,
    groups: Slab<Group>,
    stale_groups: Vec<GroupId>,
    sets: Slab<PeerSet>,
    set_by_name: HashMap<Arc<str>, SetId>,
    nssel_sets: Vec<SetId>,
    named_ports: HashMap<(Sym, Protocol), PortMembers>,
    dirty_nodes: Vec<NodeId>,
    dirty_sets: Vec<SetId>,
    dirty_nps_names: HashSet<Arc<str>>,
    dirty_ps_names: HashSet<Arc<str>>,
    /// What the cluster holds: name -> desired fingerprint it was written
    /// with (None: exists, content unknown).
    written_nps: HashMap<Arc<str>, Option<Fingerprint>>,
    written_ps: HashMap<Arc<str>, Option<Fingerprint>>,
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

    // ----- Namespaces -------------------------------------------------

    /// A Namespace was added or changed.
    pub fn apply_namespace(&mut self, info: NamespaceInfo) {
        let id = self.ns_id(&info.name);
        let labels = Labels::new(&mut self.interner, &info.labels);
        let ns = &mut self.namespaces[id];
        ns.exists = true;
        if ns.labels != labels {
            ns.labels = labels;
            self.refresh_namespace_sets(id);
        }
    }

    /// A Namespace was deleted.
    pub fn delete_namespace(&mut self, name: &str) {
        let Some(&id) = self.ns_by_name.get(name) else {
            return;
        };
        let ns = &mut self.namespaces[id];
        ns.exists = false;
        if ns.labels != Labels::default() {
            ns.labels = Labels::default();
            self.refresh_namespace_sets(id);
        }
        self.maybe_forget_namespace(id);
    }

    /// The complete list of Namespaces (after a watch (re)start).
    pub fn reset_namespaces(&mut self, all: Vec<NamespaceInfo>) {
        let keep: HashSet<&str> = all.iter().map(|n| n.name.as_str()).collect();
        let gone: Vec<String> = self
            .namespaces
            .iter()
            .filter(|(_, ns)| ns.exists && !keep.contains(ns.name.as_str()))
            .map(|(_, ns)| ns.name.to_string())
            .collect();
        drop(keep);
        for name in gone {
            self.delete_namespace(&name);
        }
        for ns in all {
            self.apply_namespace(ns);
        }
    }

    fn ns_id(&mut self, name: &str) -> NsId {
        if let Some(&id) = self.ns_by_name.get(name) {
            return id;
        }
        let sym = self.interner.intern(name);
        let labels = Labels::default();
        let nssel_sets = self
            .nssel_sets
            .iter()
            .copied()
            .filter(|&s| {
                self.namespace_selector(s)
                    .is_some_and(|sel| sel.matches(&labels))
            })
            .collect();
        let id = self.namespaces.insert(Namespace {
            name: sym.clone(),
            labels,
            exists: false,
            pods: HashMap::new(),
            groups: HashMap::new(),
            scoped_sets: Vec::new(),
            nssel_sets,
            policies: 0,
        });
        self.ns_by_name.insert(sym.as_arc().clone(), id);
        id
    }

    fn maybe_forget_namespace(&mut self, id: NsId) {
        let ns = &self.namespaces[id];
        if !ns.exists
            && ns.pods.is_empty()
            && ns.groups.is_empty()
            && ns.scoped_sets.is_empty()
            && ns.policies == 0
        {
            let name = ns.name.as_arc().clone();
            self.ns_by_name.remove(&name);
            self.namespaces.remove(id);
        }
    }

    fn namespace_selector(&self, set: SetId) -> Option<&Selector> {
        match &self.sets[set].key {
            PeerKey::Pods {
                scope: PeerScope::Namespaces(sel),
                ..
            } => Some(sel),
            _ => None,
        }
    }

    /// Re-evaluates the namespace-selector sets against a namespace's labels.
    fn refresh_namespace_sets(&mut self, id: NsId) {
        let labels = self.namespaces[id].labels.clone();
        let new: Vec<SetId> = self
            .nssel_sets
            .iter()
            .copied()
            .filter(|&s| {
                self.namespace_selector(s)
                    .is_some_and(|sel| sel.matches(&labels))
            })
            .collect();
        let old = std::mem::take(&mut self.namespaces[id].nssel_sets);
        let pods: Vec<PodId> = self.namespaces[id].pods.values().copied().collect();
        for &s in old.iter().filter(|s| !new.contains(s)) {
            for &p in &pods {
                if self.pods[p].sets.contains(&s) {
                    self.leave_set(p, s);
                }
            }
        }
        for &s in new.iter().filter(|s| !old.contains(s)) {
            for &p in &pods {
                if self.pods[p].member() && self.set_selects_labels(s, &self.pods[p].labels) {
                    self.join_set(p, s);
                }
            }
        }
        self.namespaces[id].nssel_sets = new;
    }

    // ----- Pods -------------------------------------------------------

    /// A Pod was added or changed.
    pub fn apply_pod(&mut self, info: PodInfo) {
        let ns = self.ns_id(&info.namespace);
        let labels = Labels::new(&mut self.interner, &info.labels);
        let named_ports: Box<[(Sym, Protocol, u16)]> = info
            .named_ports
            .iter()
            .map(|p| (self.interner.intern(&p.name), p.protocol, p.port))
            .collect();
        let node = info.node.as_deref().map(|n| self.node_id(n));
        let ips: Box<[IpAddr]> = info.ips.into_boxed_slice();
        let existing = self.namespaces[ns].pods.get(info.name.as_str()).copied();
        let id = match existing {
            Some(id) => {
                let p = &self.pods[id];
                if p.labels == labels
                    && p.ips == ips
                    && p.named_ports == named_ports
                    && p.node == node
                    && p.host_network == info.host_network
                    && p.finished == info.finished
                    && p.created == info.created
                    && p.terminating == info.terminating
                {
                    // Status churn NetworkPolicy does not see (readiness, ...).
                    self.pods[id].uid = info.uid.map(String::into_boxed_str);
                    return;
                }
                let old_node = p.node;
                if old_node != node {
                    if let Some(n) = old_node {
                        self.nodes[n].refs -= 1;
                    }
                    if let Some(n) = node {
                        self.nodes[n].refs += 1;
                    }
                }
                self.unlink_pod(id);
                let p = &mut self.pods[id];
                p.labels = labels;
                p.ips = ips;
                p.named_ports = named_ports;
                p.node = node;
                p.host_network = info.host_network;
                p.finished = info.finished;
                p.uid = info.uid.map(String::into_boxed_str);
                p.created = info.created;
                p.terminating = info.terminating;
                self.settle_and_link(id);
                if let Some(n) = old_node {
                    self.maybe_forget_node(n);
                }
                id
            }
            None => {
                let name: Arc<str> = Arc::from(info.name);
                let id = self.pods.insert(Pod {
                    ns,
                    name: name.clone(),
                    node,
                    labels,
                    ips,
                    named_ports,
                    host_network: info.host_network,
                    finished: info.finished,
                    uid: info.uid.map(String::into_boxed_str),
                    created: info.created,
                    terminating: info.terminating,
                    claimed: 0,
                    held: 0,
                    reported: None,
                    review_queued: false,
                    own_fp: 0,
                    groups: SmallVec::new(),
                    sets: SmallVec::new(),
                });
                self.namespaces[ns].pods.insert(name, id);
                if let Some(n) = node {
                    self.nodes[n].refs += 1;
                }
                self.settle_and_link(id);
                id
            }
        };
        self.review(id);
        if let Some(n) = node {
            self.maybe_forget_node(n);
        }
    }

    /// A Pod was deleted.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        let Some(&ns) = self.ns_by_name.get(namespace) else {
            return;
        };
        let Some(id) = self.namespaces[ns].pods.remove(name) else {
            return;
        };
        self.unlink_pod(id);
        let handed_over = self.release_claims(id);
        let node = self.pods[id].node;
        self.pods.remove(id);
        for q in handed_over {
            self.relink(q);
        }
        if let Some(n) = node {
            self.nodes[n].refs -= 1;
            self.maybe_forget_node(n);
        }
        self.maybe_forget_namespace(ns);
    }

    // ----- Pod IPs ------------------------------------------------------

    /// The cluster's pod ranges (None: unknown, so not checked). Pods
    /// holding IPs outside them lose those IPs.
    pub fn set_cluster_cidrs(&mut self, cidrs: Option<Vec<IpNet>>) {
        if self.cluster_cidrs == cidrs {
            return;
        }
        self.cluster_cidrs = cidrs;
        let all: Vec<PodId> = self.pods.iter().map(|(id, _)| id).collect();
        for id in all {
            self.reclaim(id);
        }
    }

    /// True when `a` holds a contested IP before `b`: a running pod before a
    /// terminating one, then the older, then by namespace/name, so every
    /// controller (and every restart) decides the same.
    fn claims_before(&self, a: PodId, b: PodId) -> bool {
        let key = |id: PodId| {
            let p = &self.pods[id];
            (
                p.terminating,
                p.created,
                self.namespaces[p.ns].name.as_str(),
                &*p.name,
            )
        };
        key(a) < key(b)
    }

    /// Why `ip` of pod `id` can never be its address, if so.
    fn ip_out_of_range(&self, id: PodId, ip: IpAddr) -> Option<String> {
        let p = &self.pods[id];
        if let Some(cluster) = &self.cluster_cidrs
            && !cluster.iter().any(|c| c.contains(&ip))
        {
            let shown: Vec<String> = cluster.iter().map(ToString::to_string).collect();
            return Some(format!(
                "{ip} lies outside clusterCIDR {}",
                shown.join(", ")
            ));
        }
        let strict = self.cluster_cidrs.is_some();
        let Some(node) = p.node.map(|n| &self.nodes[n]) else {
            return strict.then(|| format!("{ip}: the pod is on no node"));
        };
        if node.pod_cidrs.is_empty() {
            return strict.then(|| format!("{ip}: its node {} has no podCIDR", node.name));
        }
        if node.pod_cidrs.iter().any(|c| c.contains(&ip)) {
            return None;
        }
        let shown: Vec<String> = node.pod_cidrs.iter().map(ToString::to_string).collect();
        Some(format!(
            "{ip} lies outside the podCIDR {} of its node {}",
            shown.join(", "),
            node.name
        ))
    }

    /// Gives up every claim of `id`; returns the pods that hold an IP now.
    fn release_claims(&mut self, id: PodId) -> SmallVec<[PodId; 2]> {
        let p = &mut self.pods[id];
        let mask = std::mem::take(&mut p.claimed);
        let ips: SmallVec<[IpAddr; 2]> = masked(&p.ips, mask).collect();
        ips.into_iter()
            .filter_map(|ip| self.claims.release(ip, id))
            .collect()
    }

    /// Bit mask of the IPs of `id` it may claim.
    fn valid_mask(&self, id: PodId) -> u8 {
        let p = &self.pods[id];
        if !p.member() {
            return 0;
        }
        p.ips
            .iter()
            .take(8)
            .enumerate()
            .filter(|(_, ip)| self.ip_out_of_range(id, **ip).is_none())
            .fold(0, |m, (i, _)| m | (1 << i))
    }

    /// Re-decides the claims of the unlinked pod `id`, links it, and relinks
    /// the pods whose holdings changed with it.
    fn settle_and_link(&mut self, id: PodId) {
        let mut affected = self.release_claims(id);
        let valid = self.valid_mask(id);
        let ips: SmallVec<[IpAddr; 2]> = masked(&self.pods[id].ips, valid).collect();
        // Split borrow: the order reads the pods, the claims change.
        let mut claims = std::mem::take(&mut self.claims);
        for ip in ips {
            if let Some(displaced) = claims.claim(ip, id, |a, b| self.claims_before(a, b)) {
                affected.push(displaced);
            }
        }
        self.claims = claims;
        self.pods[id].claimed = valid;
        self.refresh_held(id);
        self.link_pod(id);
        affected.sort();
        affected.dedup();
        for q in affected {
            if q != id {
                self.relink(q);
            }
        }
    }

    /// The pod's holdings changed because of another pod.
    fn relink(&mut self, id: PodId) {
        self.unlink_pod(id);
        self.refresh_held(id);
        self.link_pod(id);
        self.review(id);
    }

    /// Validity may have changed (a node's podCIDRs, the cluster's range):
    /// the claims are decided again when they differ.
    fn reclaim(&mut self, id: PodId) {
        self.review(id);
        if self.valid_mask(id) == self.pods[id].claimed {
            return;
        }
        self.unlink_pod(id);
        self.settle_and_link(id);
    }

    fn refresh_held(&mut self, id: PodId) {
        let p = &self.pods[id];
        let held = p
            .ips
            .iter()
            .take(8)
            .enumerate()
            .filter(|(i, ip)| p.claimed & (1 << i) != 0 && self.claims.holder(**ip) == Some(id))
            .fold(0u8, |m, (i, _)| m | (1 << i));
        let held_ips: SmallVec<[IpAddr; 2]> = masked(&p.ips, held).collect();
        let own_fp = pod_fp(
            self.namespaces[p.ns].name.as_str(),
            &p.name,
            &held_ips,
            &p.named_ports,
        );
        let p = &mut self.pods[id];
        p.held = held;
        p.own_fp = own_fp;
    }

    fn review(&mut self, id: PodId) {
        let p = &mut self.pods[id];
        if !p.review_queued {
            p.review_queued = true;
            self.ip_review.push(id);
        }
    }

    /// Which IPs of pod `id` NetworkPolicy does not use, and why.
    fn ip_problem(&self, id: PodId) -> Option<String> {
        let p = &self.pods[id];
        if !p.member() {
            return None;
        }
        let mut why: Vec<String> = Vec::new();
        for &ip in p.ips.iter() {
            if p.held_ips().any(|h| h == ip) {
                continue;
            }
            if let Some(reason) = self.ip_out_of_range(id, ip) {
                why.push(reason);
            } else if let Some(h) = self.claims.holder(ip) {
                let holder = &self.pods[h];
                why.push(format!(
                    "{ip} is already held by pod {}/{}, so it counts as that pod's until it lets go",
                    self.namespaces[holder.ns].name, holder.name
                ));
            }
        }
        (!why.is_empty()).then(|| {
            format!(
                "canal does not use {} of this pod's IPs for NetworkPolicy (it joins no peer set and the pod may not send from it): {}",
                why.len(),
                why.join("; ")
            )
        })
    }

    fn pod_reports(&mut self) -> Vec<PodIpReport> {
        let mut out = Vec::new();
        for id in std::mem::take(&mut self.ip_review) {
            let Some(p) = self.pods.get_mut(id) else {
                continue;
            };
            p.review_queued = false;
            let problem = self.ip_problem(id);
            let p = &mut self.pods[id];
            if p.reported != problem {
                p.reported = problem.clone();
                out.push(PodIpReport {
                    namespace: self.namespaces[p.ns].name.to_string(),
                    name: p.name.to_string(),
                    uid: p.uid.as_deref().map(str::to_string),
                    problem,
                });
            }
        }
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    /// IPs that more than one pod reports.
    pub fn contested_ips(&self) -> usize {
        self.claims.contested()
    }

    /// The complete list of Pods (after a watch (re)start).
    pub fn reset_pods(&mut self, all: Vec<PodInfo>) {
        let keep: HashSet<(&str, &str)> = all
            .iter()
            .map(|p| (p.namespace.as_str(), p.name.as_str()))
            .collect();
        let gone: Vec<(String, String)> = self
            .pods
            .iter()
            .filter_map(|(_, p)| {
                let ns = self.namespaces[p.ns].name.as_str();
                (!keep.contains(&(ns, &*p.name))).then(|| (ns.to_string(), p.name.to_string()))
            })
            .collect();
        drop(keep);
        for (ns, name) in gone {
            self.delete_pod(&ns, &name);
        }
        self.pods.reserve(all.len());
        for p in all {
            self.apply_pod(p);
        }
    }

    /// Adds a pod's contributions: groups, span, set memberships, named ports.
    fn link_pod(&mut self, id: PodId) {
        let p = &self.pods[id];
        if !p.member() {
            return;
        }
        let ns = &self.namespaces[p.ns];
        let mut groups: SmallVec<[GroupId; 4]> = ns
            .groups
            .values()
            .copied()
            .filter(|&g| self.groups[g].selector.matches(&p.labels))
            .collect();
        groups.sort_by(|&a, &b| self.groups[a].key.cmp(&self.groups[b].key));
        let sets: SmallVec<[SetId; 4]> = ns
            .scoped_sets
            .iter()
            .chain(ns.nssel_sets.iter())
            .copied()
            .filter(|&s| self.set_selects_labels(s, &p.labels))
            .collect();
        let endpoint = p.endpoint();
        for &s in &sets {
            self.join_set(id, s);
        }
        self.add_named_ports(id, 1);
        if let Some(node) = endpoint {
            self.nodes[node].pods.push(id);
            for &g in &groups {
                *self.groups[g].span.entry(node).or_insert(0) += 1;
            }
            self.dirty_node(node);
        }
        self.pods[id].groups = groups;
    }

    /// Removes everything `link_pod` added.
    fn unlink_pod(&mut self, id: PodId) {
        let p = &mut self.pods[id];
        if !p.member() {
            return;
        }
        let groups = std::mem::take(&mut p.groups);
        let sets = p.sets.clone();
        let endpoint = p.endpoint();
        for s in sets {
            self.leave_set(id, s);
        }
        self.add_named_ports(id, -1);
        if let Some(node) = endpoint {
            self.nodes[node].pods.retain(|&x| x != id);
            for g in groups {
                span_remove(&mut self.groups[g].span, node);
            }
            self.dirty_node(node);
        }
    }

    fn set_selects_labels(&self, s: SetId, labels: &Labels) -> bool {
        match &self.sets[s].key {
            PeerKey::Pods { pods: None, .. } => true,
            PeerKey::Pods {
                pods: Some(sel), ..
            } => sel.matches(labels),
            PeerKey::NamedPort { .. } => false,
        }
    }

    fn join_set(&mut self, pod: PodId, s: SetId) {
        let p = &mut self.pods[pod];
        p.sets.push(s);
        let set = &mut self.sets[s];
        for ip in p.held_ips() {
            let n = set.ips.entry(ip).or_insert(0);
            *n += 1;
            if *n == 1 {
                set.sum = set.sum.wrapping_add(fingerprint::ip_member(ip));
            }
        }
        if p.held != 0 {
            self.dirty_set(s);
        }
    }

    fn leave_set(&mut self, pod: PodId, s: SetId) {
        let p = &mut self.pods[pod];
        p.sets.retain(|x| *x != s);
        let set = &mut self.sets[s];
        for ip in p.held_ips() {
            if let Some(n) = set.ips.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    set.ips.remove(&ip);
                    set.sum = set.sum.wrapping_sub(fingerprint::ip_member(ip));
                }
            }
        }
        if p.held != 0 {
            self.dirty_set(s);
        }
    }

    /// Adds (+1) or removes (-1) a pod's (IP, named port) members.
    fn add_named_ports(&mut self, pod: PodId, delta: i32) {
        let p = &self.pods[pod];
        if p.named_ports.is_empty() || p.held == 0 {
            return;
        }
        let mut touched: SmallVec<[SetId; 4]> = SmallVec::new();
        for (name, protocol, port) in p.named_ports.iter() {
            let key = (name.clone(), *protocol);
            let entry = self.named_ports.entry(key.clone()).or_default();
            for ip in p.held_ips() {
                let h = fingerprint::port_member(ip, *protocol, *port);
                if delta > 0 {
                    let n = entry.members.entry((ip, *port)).or_insert(0);
                    *n += 1;
                    if *n == 1 {
                        entry.sum = entry.sum.wrapping_add(h);
                    }
                } else if let Some(n) = entry.members.get_mut(&(ip, *port)) {
                    *n -= 1;
                    if *n == 0 {
                        entry.members.remove(&(ip, *port));
                        entry.sum = entry.sum.wrapping_sub(h);
                    }
                }
            }
            match entry.set {
                Some(s) => touched.push(s),
                None if entry.members.is_empty() => {
                    self.named_ports.remove(&key);
                }
                None => {}
            }
        }
        for s in touched {
            self.dirty_set(s);
        }
    }

    // ----- Nodes ------------------------------------------------------

    /// A Node was added or changed.
    pub fn apply_node(&mut self, info: NodeInfo) {
        let id = self.node_id(&info.name);
        let node = &mut self.nodes[id];
        if !node.exists {
            node.exists = true;
            self.dirty_node(id);
        }
        self.set_node_pod_cidrs(id, info.pod_cidrs);
    }

    /// A Node's pod subnets changed: its pods' claims are decided again.
    fn set_node_pod_cidrs(&mut self, id: NodeId, cidrs: Vec<IpNet>) {
        if self.nodes[id].pod_cidrs == cidrs {
            return;
        }
        self.nodes[id].pod_cidrs = cidrs;
        let pods = self.nodes[id].pods.clone();
        for p in pods {
            self.reclaim(p);
        }
    }

    /// A Node was deleted: its NodePolicySet goes too.
    pub fn delete_node(&mut self, name: &str) {
        let Some(&id) = self.node_by_name.get(name) else {
            return;
        };
        let node = &mut self.nodes[id];
        if node.exists {
            node.exists = false;
            self.dirty_node(id);
        }
        // Its subnets are free for other Nodes: its pods hold nothing.
        self.set_node_pod_cidrs(id, Vec::new());
        self.maybe_forget_node(id);
    }

    /// The complete list of Nodes (after a watch (re)start).
    pub fn reset_nodes(&mut self, all: Vec<NodeInfo>) {
        let keep: HashSet<&str> = all.iter().map(|n| n.name.as_str()).collect();
        let gone: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.exists && !keep.contains(&*n.name))
            .map(|(_, n)| n.name.to_string())
            .collect();
        drop(keep);
        for name in gone {
            self.delete_node(&name);
        }
        for n in all {
            self.apply_node(n);
        }
    }

    /// Names of the Nodes that exist.
    pub fn node_names(&self) -> impl Iterator<Item = &str> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.exists)
            .map(|(_, n)| &*n.name)
    }

    /// Names of the PeerSets some policy references.
    pub fn peer_set_names(&self) -> impl Iterator<Item = &str> {
        self.sets.iter().map(|(_, s)| &*s.name)
    }

    fn node_id(&mut self, name: &str) -> NodeId {
        if let Some(&id) = self.node_by_name.get(name) {
            return id;
        }
        let name: Arc<str> = Arc::from(name);
        let id = self.nodes.insert(Node {
            name: name.clone(),
            exists: false,
            pod_cidrs: Vec::new(),
            pods: Vec::new(),
            refs: 0,
            dirty: false,
        });
        self.node_by_name.insert(name, id);
        id
    }

    fn maybe_forget_node(&mut self, id: NodeId) {
        let node = &self.nodes[id];
        if !node.exists && node.refs == 0 {
            let name = node.name.clone();
            self.dirty_nps_names.insert(name.clone());
            self.node_by_name.remove(&name);
            self.nodes.remove(id);
        }
    }

    // ----- NetworkPolicies --------------------------------------------

    /// A NetworkPolicy was added or changed.
    pub fn apply_policy(&mut self, np: &NetworkPolicy) {
        let namespace = np.metadata.namespace.as_deref().unwrap_or_default();
        let name = np.metadata.name.as_deref().unwrap_or_default();
        let result = compile::compile(&mut self.interner, np);
        let id = self.policy_id(namespace, name);
        self.policies[id].uid = np.metadata.uid.clone();
        match result {
            Ok(def) => {
                if self.policies[id].problem.take().is_some() {
                    let p = &self.policies[id];
                    self.reports.push(PolicyReport {
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        uid: p.uid.clone(),
                        problem: None,
                        kept_previous: false,
                    });
                }
                if self.is_active_version(id, &def) {
                    return;
                }
                let new = self.activate(id, def);
                self.replace_active(id, Some(new));
            }
            Err(invalid) => self.record_problem(id, invalid.to_string()),
        }
    }

    fn policy_id(&mut self, namespace: &str, name: &str) -> PolicyId {
        let full_name: Arc<str> = Arc::from(format!("{namespace}/{name}"));
        if let Some(&id) = self.policy_by_name.get(&full_name) {
            return id;
        }
        let ns = self.ns_id(namespace);
        self.namespaces[ns].policies += 1;
        let id = self.policies.insert(Policy {
            ns,
            namespace: namespace.to_string(),
            name: name.to_string(),
            full_name: full_name.clone(),
            uid: None,
            active: None,
            problem: None,
        });
        self.policy_by_name.insert(full_name, id);
        id
    }

    /// Reports a problem once (until it changes); the active version, if
    /// any, stays in force.
    fn record_problem(&mut self, id: PolicyId, message: String) {
        let p = &mut self.policies[id];
        if p.problem.as_deref() != Some(message.as_str()) {
            p.problem = Some(message.clone());
            self.reports.push(PolicyReport {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                uid: p.uid.clone(),
                problem: Some(message),
                kept_previous: p.active.is_some(),
            });
        }
    }

    /// A NetworkPolicy was deleted.
    pub fn delete_policy(&mut self, namespace: &str, name: &str) {
        let full_name = format!("{namespace}/{name}");
        let Some(id) = self.policy_by_name.remove(full_name.as_str()) else {
            return;
        };
        self.replace_active(id, None);
        let ns = self.policies[id].ns;
        self.policies.remove(id);
        self.namespaces[ns].policies -= 1;
        self.maybe_forget_namespace(ns);
    }

    /// A NetworkPolicy that cannot even be read (it does not decode): it is
    /// reported like an invalid one, and a previous version stays in force.
    pub fn apply_invalid_policy(
        &mut self,
        namespace: &str,
        name: &str,
        uid: Option<String>,
        problem: String,
    ) {
        let id = self.policy_id(namespace, name);
        let p = &mut self.policies[id];
        p.uid = uid;
        self.record_problem(id, problem);
    }

    /// The complete list of NetworkPolicies (after a watch (re)start).
    pub fn reset_policies(&mut self, all: Vec<NetworkPolicy>) {
        self.reset_policies_keeping(all, Vec::new());
    }

    /// Like [`PolicyIndex::reset_policies`], also keeping the policies named
    /// in `undecodable` (listed, but not readable; the caller re-applies them
    /// with [`PolicyIndex::apply_invalid_policy`]).
    pub fn reset_policies_keeping(
        &mut self,
        all: Vec<NetworkPolicy>,
        undecodable: Vec<(String, String)>,
    ) {
        let mut keep: HashSet<(&str, &str)> = all
            .iter()
            .map(|p| {
                (
                    p.metadata.namespace.as_deref().unwrap_or_default(),
                    p.metadata.name.as_deref().unwrap_or_default(),
                )
            })
            .collect();
        keep.extend(undecodable.iter().map(|(n, m)| (n.as_str(), m.as_str())));
        let gone: Vec<(String, String)> = self
            .policies
            .iter()
            .filter(|(_, p)| !keep.contains(&(p.namespace.as_str(), p.name.as_str())))
            .map(|(_, p)| (p.namespace.clone(), p.name.clone()))
            .collect();
        drop(keep);
        for (ns, name) in gone {
            self.delete_policy(&ns, &name);
        }
        self.policies.reserve(all.len());
        self.policy_by_name.reserve(all.len());
        for p in &all {
            self.apply_policy(p);
        }
    }

    fn is_active_version(&self, id: PolicyId, def: &PolicyDef) -> bool {
        match &self.policies[id].active {
            Some(a) => {
                a.ingress == def.ingress
                    && a.egress == def.egress
                    && *a.compiled == def.compiled
                    && self.groups[a.group].selector == def.pod_selector
            }
            None => false,
        }
    }

    /// Takes references on the new version's group and PeerSets.
    fn activate(&mut self, id: PolicyId, def: PolicyDef) -> Active {
        let ns = self.policies[id].ns;
        let key = def.pod_selector.canonical_text();
        let group = match self.namespaces[ns].groups.get(key.as_str()) {
            Some(&g) => g,
            None => self.create_group(ns, key.into_boxed_str(), def.pod_selector),
        };
        if !self.groups[group].policies.contains(&id) {
            let name = self.policies[id].full_name.clone();
            let pos = self.groups[group]
                .policies
                .partition_point(|&p| *self.policies[p].full_name < *name);
            self.groups[group].policies.insert(pos, id);
        }
        let mut sets = Vec::with_capacity(def.peer_sets.len());
        for r in def.peer_sets {
            let s = match self.set_by_name.get(r.name.as_str()) {
                Some(&s) => s,
                None => self.create_set(r),
            };
            self.sets[s].refs += 1;
            sets.push(s);
        }
        let compiled = Arc::new(def.compiled);
        let fp = fingerprint::hashed("policy", &(def.ingress, def.egress, &*compiled));
        self.group_changed(group);
        Active {
            group,
            ingress: def.ingress,
            egress: def.egress,
            compiled,
            fp,
            sets,
        }
    }

    /// Puts `new` in force and releases what the old version held.
    fn replace_active(&mut self, id: PolicyId, new: Option<Active>) {
        let new_group = new.as_ref().map(|a| a.group);
        let old = std::mem::replace(&mut self.policies[id].active, new);
        let Some(old) = old else {
            return;
        };
        if new_group != Some(old.group) {
            self.groups[old.group].policies.retain(|&p| p != id);
            self.group_changed(old.group);
            if self.groups[old.group].policies.is_empty() {
                self.remove_group(old.group);
            }
        }
        for s in old.sets {
            self.release_set(s);
        }
    }

    fn create_group(&mut self, ns: NsId, key: Box<str>, selector: Selector) -> GroupId {
        let id = self.groups.insert(Group {
            ns,
            key: key.clone(),
            selector,
            policies: Vec::new(),
            span: HashMap::new(),
            fp: None,
            queued: false,
        });
        self.namespaces[ns].groups.insert(key, id);
        let pods: Vec<PodId> = self.namespaces[ns].pods.values().copied().collect();
        for p in pods {
            let pod = &self.pods[p];
            if !pod.member() || !self.groups[id].selector.matches(&pod.labels) {
                continue;
            }
            let key = &self.groups[id].key;
            let pos = pod
                .groups
                .partition_point(|&g| self.groups[g].key.as_ref() < key.as_ref());
            let endpoint = pod.endpoint();
            self.pods[p].groups.insert(pos, id);
            if let Some(node) = endpoint {
                *self.groups[id].span.entry(node).or_insert(0) += 1;
            }
        }
        id
    }

    fn remove_group(&mut self, id: GroupId) {
        let group = &self.groups[id];
        let ns = group.ns;
        let key = group.key.clone();
        let span: Vec<NodeId> = group.span.keys().copied().collect();
        let pods: Vec<PodId> = self.namespaces[ns].pods.values().copied().collect();
        for p in pods {
            self.pods[p].groups.retain(|g| *g != id);
        }
        for n in span {
            self.dirty_node(n);
        }
        self.namespaces[ns].groups.remove(&key);
        self.groups.remove(id);
    }

    /// A group's policy list changed: its fingerprint and every node in
    /// its span must be recomputed.
    fn group_changed(&mut self, id: GroupId) {
        let group = &mut self.groups[id];
        group.fp = None;
        if !group.queued {
            group.queued = true;
            self.stale_groups.push(id);
        }
        let span: SmallVec<[NodeId; 16]> = self.groups[id].span.keys().copied().collect();
        for n in span {
            self.dirty_node(n);
        }
    }

    // ----- PeerSets ---------------------------------------------------

    fn create_set(&mut self, r: PeerRef) -> SetId {
        let PeerRef { name, key, key_fp } = r;
        let name: Arc<str> = Arc::from(name);
        // The rendered selector is a function of the key.
        let selector_fp = key_fp;
        let id = self.sets.insert(PeerSet {
            name: name.clone(),
            key: key.clone(),
            selector_fp,
            refs: 0,
            ips: BTreeMap::new(),
            sum: 0,
            dirty: false,
        });
        self.set_by_name.insert(name, id);
        self.dirty_set(id);
        match &key {
            PeerKey::Pods {
                scope: PeerScope::Namespace(ns),
                ..
            } => {
                let ns = self.ns_id(ns);
                self.namespaces[ns].scoped_sets.push(id);
                self.join_matching_pods(ns, id);
            }
            PeerKey::Pods {
                scope: PeerScope::Namespaces(sel),
                ..
            } => {
                self.nssel_sets.push(id);
                let matching: Vec<NsId> = self
                    .namespaces
                    .iter()
                    .filter(|(_, ns)| sel.matches(&ns.labels))
                    .map(|(id, _)| id)
                    .collect();
                for ns in matching {
                    self.namespaces[ns].nssel_sets.push(id);
                    self.join_matching_pods(ns, id);
                }
            }
            PeerKey::NamedPort { name, protocol } => {
                self.named_ports
                    .entry((name.clone(), *protocol))
                    .or_default()
                    .set = Some(id);
            }
        }
        id
    }

    fn join_matching_pods(&mut self, ns: NsId, set: SetId) {
        let pods: Vec<PodId> = self.namespaces[ns]
            .pods
            .values()
            .copied()
            .filter(|&p| {
                self.pods[p].member() && self.set_selects_labels(set, &self.pods[p].labels)
            })
            .collect();
        for p in pods {
            self.join_set(p, set);
        }
    }

    fn release_set(&mut self, id: SetId) {
        let set = &mut self.sets[id];
        set.refs -= 1;
        if set.refs > 0 {
            return;
        }
        let key = set.key.clone();
        let name = set.name.clone();
        match &key {
            PeerKey::Pods {
                scope: PeerScope::Namespace(ns),
                ..
            } => {
                if let Some(&ns) = self.ns_by_name.get(ns.as_str()) {
                    self.namespaces[ns].scoped_sets.retain(|s| *s != id);
                    self.drop_members(ns, id);
                    self.maybe_forget_namespace(ns);
                }
            }
            PeerKey::Pods { .. } => {
                self.nssel_sets.retain(|s| *s != id);
                let matching: Vec<NsId> = self
                    .namespaces
                    .iter()
                    .filter(|(_, ns)| ns.nssel_sets.contains(&id))
                    .map(|(id, _)| id)
                    .collect();
                for ns in matching {
                    self.namespaces[ns].nssel_sets.retain(|s| *s != id);
                    self.drop_members(ns, id);
                }
            }
            PeerKey::NamedPort { name, protocol } => {
                let k = (name.clone(), *protocol);
                if let Some(entry) = self.named_ports.get_mut(&k) {
                    entry.set = None;
                    if entry.members.is_empty() {
                        self.named_ports.remove(&k);
                    }
                }
            }
        }
        self.set_by_name.remove(&name);
        self.sets.remove(id);
        self.dirty_ps_names.insert(name);
    }

    fn drop_members(&mut self, ns: NsId, set: SetId) {
        let pods: Vec<PodId> = self.namespaces[ns].pods.values().copied().collect();
        for p in pods {
            self.pods[p].sets.retain(|s| *s != set);
        }
    }

    // ----- What the cluster holds -------------------------------------

    /// A NodePolicySet as watched: `fingerprint` from
    /// [`fingerprint::observed`] (None: content unknown).
    pub fn observe_node_policy_set(&mut self, name: &str, fingerprint: Option<Fingerprint>) {
        observe(
            &mut self.written_nps,
            &mut self.dirty_nps_names,
            name,
            Some(fingerprint),
        );
    }

    /// A NodePolicySet was deleted (watched).
    pub fn observe_node_policy_set_deleted(&mut self, name: &str) {
        observe(&mut self.written_nps, &mut self.dirty_nps_names, name, None);
    }

    /// The complete list of NodePolicySets (after a watch (re)start).
    pub fn reset_observed_node_policy_sets(&mut self, all: Vec<(String, Option<Fingerprint>)>) {
        reset_observed(&mut self.written_nps, &mut self.dirty_nps_names, all);
    }

    /// A PeerSet as watched.
    pub fn observe_peer_set(&mut self, name: &str, fingerprint: Option<Fingerprint>) {
        observe(
            &mut self.written_ps,
            &mut self.dirty_ps_names,
            name,
            Some(fingerprint),
        );
    }

    /// A PeerSet was deleted (watched).
    pub fn observe_peer_set_deleted(&mut self, name: &str) {
        observe(&mut self.written_ps, &mut self.dirty_ps_names, name, None);
    }

    /// The complete list of PeerSets (after a watch (re)start).
    pub fn reset_observed_peer_sets(&mut self, all: Vec<(String, Option<Fingerprint>)>) {
        reset_observed(&mut self.written_ps, &mut self.dirty_ps_names, all);
    }

    /// The write of a NodePolicySet succeeded (Some: applied with that
    /// fingerprint; None: deleted).
    pub fn mark_node_policy_set_written(&mut self, name: &str, fingerprint: Option<Fingerprint>) {
        mark_written(&mut self.written_nps, name, fingerprint);
    }

    /// The write of a PeerSet succeeded.
    pub fn mark_peer_set_written(&mut self, name: &str, fingerprint: Option<Fingerprint>) {
        mark_written(&mut self.written_ps, name, fingerprint);
    }

    /// A write failed: look at the object again on the next flush.
    pub fn retry_node_policy_set(&mut self, name: &str) {
        self.dirty_nps_names.insert(Arc::from(name));
    }

    /// A write failed: look at the object again on the next flush.
    pub fn retry_peer_set(&mut self, name: &str) {
        self.dirty_ps_names.insert(Arc::from(name));
    }

    // ----- Flush and render -------------------------------------------

    fn dirty_node(&mut self, id: NodeId) {
        let node = &mut self.nodes[id];
        if !node.dirty {
            node.dirty = true;
            self.dirty_nodes.push(id);
        }
    }

    fn dirty_set(&mut self, id: SetId) {
        let set = &mut self.sets[id];
        if !set.dirty {
            set.dirty = true;
            self.dirty_sets.push(id);
        }
    }

    /// Compares the desired state of everything touched since the last
    /// flush with what the cluster holds, and returns the writes needed.
    pub fn flush(&mut self) -> Changes {
        for g in std::mem::take(&mut self.stale_groups) {
            if let Some(fp) = self.groups.get(g).map(|_| self.compute_group_fp(g)) {
                let group = &mut self.groups[g];
                group.fp = Some(fp);
                group.queued = false;
            }
        }
        let mut nps: HashSet<Arc<str>> = std::mem::take(&mut self.dirty_nps_names);
        for id in std::mem::take(&mut self.dirty_nodes) {
            if let Some(node) = self.nodes.get_mut(id) {
                node.dirty = false;
                nps.insert(node.name.clone());
            }
        }
        let mut ps: HashSet<Arc<str>> = std::mem::take(&mut self.dirty_ps_names);
        for id in std::mem::take(&mut self.dirty_sets) {
            if let Some(set) = self.sets.get_mut(id) {
                set.dirty = false;
                ps.insert(set.name.clone());
            }
        }
        let mut changes = Changes {
            reports: std::mem::take(&mut self.reports),
            pod_reports: self.pod_reports(),
            ..Changes::default()
        };
        for name in nps {
            let desired = self.desired_node_fp(&name);
            if let Some(c) = decide(&self.written_nps, name, desired) {
                changes.node_policy_sets.push(c);
            }
        }
        for name in ps {
            let desired = self.desired_set_fp(&name);
            if let Some(c) = decide(&self.written_ps, name, desired) {
                changes.peer_sets.push(c);
            }
        }
        changes
            .node_policy_sets
            .sort_by(|a, b| change_name(a).cmp(change_name(b)));
        changes
            .peer_sets
            .sort_by(|a, b| change_name(a).cmp(change_name(b)));
        changes
    }

    fn desired_node_fp(&self, name: &str) -> Option<Fingerprint> {
        let &id = self.node_by_name.get(name)?;
        let node = &self.nodes[id];
        node.exists.then(|| self.node_fp(id))
    }

    fn desired_set_fp(&self, name: &str) -> Option<Fingerprint> {
        let &id = self.set_by_name.get(name)?;
        Some(self.set_fp(id))
    }

    fn group_fp(&self, id: GroupId) -> Fingerprint {
        self.groups[id]
            .fp
            .unwrap_or_else(|| self.compute_group_fp(id))
    }

    fn compute_group_fp(&self, id: GroupId) -> Fingerprint {
        let g = &self.groups[id];
        let mut h = Fp::new("group");
        h.str(&self.namespaces[g.ns].name)
            .str(&g.key)
            .u64(g.policies.len() as u64);
        for &p in &g.policies {
            if let Some(a) = &self.policies[p].active {
                h.str(&self.policies[p].full_name).fp(a.fp);
            }
        }
        h.finish()
    }

    /// Endpoints of a node in output order (namespace, pod name).
    fn sorted_endpoints(&self, id: NodeId) -> Vec<PodId> {
        let mut eps = self.nodes[id].pods.clone();
        eps.sort_by(|&a, &b| {
            let (pa, pb) = (&self.pods[a], &self.pods[b]);
            (self.namespaces[pa.ns].name.as_str(), &*pa.name)
                .cmp(&(self.namespaces[pb.ns].name.as_str(), &*pb.name))
        });
        eps
    }

    /// Distinct groups of a node's endpoints, in output order.
    fn node_groups(&self, eps: &[PodId]) -> Vec<GroupId> {
        let mut groups: Vec<GroupId> = eps
            .iter()
            .flat_map(|&p| self.pods[p].groups.iter().copied())
            .collect();
        groups.sort();
        groups.dedup();
        groups.sort_by(|&a, &b| {
            let (ga, gb) = (&self.groups[a], &self.groups[b]);
            (self.namespaces[ga.ns].name.as_str(), &*ga.key)
                .cmp(&(self.namespaces[gb.ns].name.as_str(), &*gb.key))
        });
        groups
    }

    /// Order-independent (sums over the endpoints and the distinct
    /// groups), so no sorting by name is needed to compare.
    fn node_fp(&self, id: NodeId) -> Fingerprint {
        let node = &self.nodes[id];
        let mut endpoints: Fingerprint = 0;
        let mut groups: SmallVec<[GroupId; 16]> = SmallVec::new();
        for &p in &node.pods {
            endpoints = endpoints.wrapping_add(self.endpoint_fp(p));
            groups.extend(self.pods[p].groups.iter().copied());
        }
        groups.sort_unstable();
        groups.dedup();
        let group_sum = groups.iter().fold(0 as Fingerprint, |acc, &g| {
            acc.wrapping_add(self.group_fp(g))
        });
        Fp::new("node")
            .u64(node.pods.len() as u64)
            .fp(endpoints)
            .u64(groups.len() as u64)
            .fp(group_sum)
            .finish()
    }

    fn endpoint_fp(&self, id: PodId) -> Fingerprint {
        let p = &self.pods[id];
        let mut h = Fp::new("endpoint");
        h.fp(p.own_fp).u64(p.groups.len() as u64);
        for &g in &p.groups {
            h.fp(self.group_fp(g));
        }
        h.finish()
    }

    fn set_fp(&self, id: SetId) -> Fingerprint {
        let set = &self.sets[id];
        let (count, sum) = match &set.key {
            PeerKey::Pods { .. } => (set.ips.len(), set.sum),
            PeerKey::NamedPort { name, protocol } => self
                .named_ports
                .get(&(name.clone(), *protocol))
                .map(|e| (e.members.len(), e.sum))
                .unwrap_or((0, 0)),
        };
        Fp::new("peerset")
            .str(&set.name)
            .fp(set.selector_fp)
            .u64(count as u64)
            .fp(sum)
            .finish()
    }

    /// Builds the NodePolicySet of a node, or None when it should not exist.
    pub fn render_node_policy_set(&self, name: &str) -> Option<RenderedNodePolicySet> {
        let &id = self.node_by_name.get(name)?;
        let node = &self.nodes[id];
        if !node.exists {
            return None;
        }
        let eps = self.sorted_endpoints(id);
        let mut lists: HashMap<&[GroupId], (Vec<String>, Vec<String>)> = HashMap::new();
        let mut endpoints = Vec::with_capacity(eps.len());
        for &pid in &eps {
            let p = &self.pods[pid];
            let (ingress, egress) = lists
                .entry(&p.groups[..])
                .or_insert_with(|| self.policy_names(&p.groups))
                .clone();
            endpoints.push(Endpoint {
                namespace: self.namespaces[p.ns].name.to_string(),
                pod: p.name.to_string(),
                interface: canal_crds::names::veth_name(&self.namespaces[p.ns].name, &p.name),
                ips: p.held_ips().map(|ip| ip.to_string()).collect(),
                named_ports: p
                    .named_ports
                    .iter()
                    .map(|(name, protocol, port)| NamedPort {
                        name: name.to_string(),
                        protocol: *protocol,
                        port: *port,
                    })
                    .collect(),
                ingress_policies: ingress,
                egress_policies: egress,
            });
        }
        let mut policies: Vec<&Policy> = self
            .node_groups(&eps)
            .into_iter()
            .flat_map(|g| self.groups[g].policies.iter().map(|&p| &self.policies[p]))
            .collect();
        policies.sort_by(|a, b| a.full_name.cmp(&b.full_name));
        let policies = policies
            .into_iter()
            .filter_map(|p| p.active.as_ref().map(|a| (*a.compiled).clone()))
            .collect();
        Some(RenderedNodePolicySet {
            spec: NodePolicySetSpec {
                endpoints,
                policies,
            },
            fingerprint: self.node_fp(id),
        })
    }

    /// Sorted names of the policies of `groups` that isolate for ingress
    /// and for egress.
    fn policy_names(&self, groups: &[GroupId]) -> (Vec<String>, Vec<String>) {
        let mut ingress: Vec<&str> = Vec::new();
        let mut egress: Vec<&str> = Vec::new();
        for &g in groups {
            for &p in &self.groups[g].policies {
                let policy = &self.policies[p];
                if let Some(a) = &policy.active {
                    if a.ingress {
                        ingress.push(&policy.full_name);
                    }
                    if a.egress {
                        egress.push(&policy.full_name);
                    }
                }
            }
        }
        if groups.len() > 1 {
            ingress.sort_unstable();
            egress.sort_unstable();
        }
        (
            ingress.into_iter().map(String::from).collect(),
            egress.into_iter().map(String::from).collect(),
        )
    }

    /// Builds a PeerSet, or None when no policy references it.
    pub fn render_peer_set(&self, name: &str) -> Option<RenderedPeerSet> {
        let &id = self.set_by_name.get(name)?;
        let set = &self.sets[id];
        let mut spec = PeerSetSpec {
            selector: set.key.peer_selector(),
            member_count: 0,
            ips: Vec::new(),
            ports: Vec::new(),
        };
        match &set.key {
            PeerKey::Pods { .. } => {
                let ips: Vec<IpAddr> = set.ips.keys().copied().collect();
                spec.member_count = u32::try_from(ips.len()).unwrap_or(u32::MAX);
                spec.ips = ips.into_iter().map(|ip| ip.to_string()).collect();
            }
            PeerKey::NamedPort { name, protocol } => {
                let ports: Vec<(IpAddr, u16)> = self
                    .named_ports
                    .get(&(name.clone(), *protocol))
                    .map(|e| e.members.keys().copied().collect())
                    .unwrap_or_default();
                spec.member_count = u32::try_from(ports.len()).unwrap_or(u32::MAX);
                spec.ports = ports
                    .into_iter()
                    .map(|(ip, port)| PortMember {
                        ip: ip.to_string(),
                        protocol: *protocol,
                        port,
                    })
                    .collect();
            }
        }
        Some(RenderedPeerSet {
            spec,
            fingerprint: self.set_fp(id),
        })
    }

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

fn change_name(c: &Change) -> &str {
    match c {
        Change::Apply(n) | Change::Delete(n) => n,
    }
}

fn decide(
    written: &HashMap<Arc<str>, Option<Fingerprint>>,
    name: Arc<str>,
    desired: Option<Fingerprint>,
) -> Option<Change> {
    match (desired, written.get(&name)) {
        (Some(d), Some(Some(w))) if d == *w => None,
        (Some(_), _) => Some(Change::Apply(name)),
        (None, Some(_)) => Some(Change::Delete(name)),
        (None, None) => None,
    }
}

/// `state`: Some(fp) = the object exists (fp None: unknown content);
/// None = deleted.
fn observe(
    written: &mut HashMap<Arc<str>, Option<Fingerprint>>,
    dirty: &mut HashSet<Arc<str>>,
    name: &str,
    state: Option<Option<Fingerprint>>,
) {
    let before = written.get(name).copied();
    if before == state {
        return;
    }
    let name: Arc<str> = Arc::from(name);
    match state {
        Some(fp) => {
            written.insert(name.clone(), fp);
        }
        None => {
            written.remove(&name);
        }
    }
    dirty.insert(name);
}

fn reset_observed(
    written: &mut HashMap<Arc<str>, Option<Fingerprint>>,
    dirty: &mut HashSet<Arc<str>>,
    all: Vec<(String, Option<Fingerprint>)>,
) {
    let new: HashMap<Arc<str>, Option<Fingerprint>> = all
        .into_iter()
        .map(|(name, fp)| (Arc::from(name), fp))
        .collect();
    for (name, fp) in written.iter() {
        if new.get(name) != Some(fp) {
            dirty.insert(name.clone());
        }
    }
    for (name, fp) in &new {
        if written.get(name) != Some(fp) {
            dirty.insert(name.clone());
        }
    }
    *written = new;
}

fn mark_written(
    written: &mut HashMap<Arc<str>, Option<Fingerprint>>,
    name: &str,
    fingerprint: Option<Fingerprint>,
) {
    match fingerprint {
        Some(fp) => {
            written.insert(Arc::from(name), Some(fp));
        }
        None => {
            written.remove(name);
        }
    }
}
