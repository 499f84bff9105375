//! What the cluster holds, and the flush that compares it with what it
//! should hold: the writes, per kind, in the order that never lets a reader
//! see a reference to something not written yet.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use canal_crds::sharding::{head_of_slice, slice_name};
use smallvec::SmallVec;

use super::super::fingerprint::{Fingerprint, Fp};
use super::super::shard::{Leaf, Stats as ShardStats};
use super::{GroupId, NodeId, PodId, PodIpReport, PolicyIndex, PolicyReport, SetId};
use crate::policy::compile::PeerKey;

/// A kind of object the policy controller writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// PeerSet heads and slices.
    PeerSet,
    /// PolicyGroup heads and slices.
    PolicyGroup,
    /// NodePolicySets.
    NodePolicySet,
}

impl Kind {
    /// The Kubernetes kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::PeerSet => "PeerSet",
            Kind::PolicyGroup => "PolicyGroup",
            Kind::NodePolicySet => "NodePolicySet",
        }
    }

    /// Kinds whose large objects are heads with slices.
    pub fn is_sharded(self) -> bool {
        self != Kind::NodePolicySet
    }

    /// The head of a name of this kind (itself, unless it is a slice).
    pub fn head_of(self, name: &str) -> &str {
        if self.is_sharded() {
            head_of_slice(name).unwrap_or(name)
        } else {
            name
        }
    }
}

/// A write the cluster needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Server-side apply the rendered object.
    Apply(Arc<str>),
    /// Delete the object.
    Delete(Arc<str>),
}

impl Change {
    /// The object's name.
    pub fn name(&self) -> &Arc<str> {
        match self {
            Change::Apply(n) | Change::Delete(n) => n,
        }
    }
}

/// What a flush found. Each list is in write order: applies of slices,
/// then applies of heads, then deletions (heads, then slices). Across
/// kinds the controller applies PeerSets, then PolicyGroups, then
/// NodePolicySets, and deletes in the reverse order, so a reader never
/// finds a reference to an object (or a version) not written yet. Also
/// the policy and pod reports (for Events).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// PeerSet writes (heads and slices).
    pub peer_sets: Vec<Change>,
    /// PolicyGroup writes (heads and slices).
    pub policy_groups: Vec<Change>,
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
        self.writes() == 0 && self.reports.is_empty() && self.pod_reports.is_empty()
    }

    /// Objects to write or delete.
    pub fn writes(&self) -> usize {
        self.peer_sets.len() + self.policy_groups.len() + self.node_policy_sets.len()
    }

    /// The changes of one kind.
    pub fn of(&self, kind: Kind) -> &[Change] {
        match kind {
            Kind::PeerSet => &self.peer_sets,
            Kind::PolicyGroup => &self.policy_groups,
            Kind::NodePolicySet => &self.node_policy_sets,
        }
    }
}

/// What the cluster holds of one kind: name -> the desired fingerprint it
/// was written with (None: exists, content unknown), and the slices held
/// per head.
#[derive(Default)]
pub(super) struct Written {
    objects: HashMap<Arc<str>, Option<Fingerprint>>,
    slices: HashMap<Arc<str>, BTreeSet<Arc<str>>>,
}

impl Written {
    fn get(&self, name: &str) -> Option<Option<Fingerprint>> {
        self.objects.get(name).copied()
    }

    /// Records a state (Some: exists with that fingerprint; None: gone).
    /// Returns whether it differs from what was recorded.
    fn set(&mut self, kind: Kind, name: &str, state: Option<Option<Fingerprint>>) -> bool {
        if self.get(name) == state {
            return false;
        }
        let name: Arc<str> = Arc::from(name);
        let head = kind
            .is_sharded()
            .then(|| head_of_slice(&name))
            .flatten()
            .map(Arc::<str>::from);
        match state {
            Some(fp) => {
                if let Some(head) = head {
                    self.slices.entry(head).or_default().insert(name.clone());
                }
                self.objects.insert(name, fp);
            }
            None => {
                if let Some(head) = head
                    && let Some(list) = self.slices.get_mut(&head)
                {
                    list.remove(&name);
                    if list.is_empty() {
                        self.slices.remove(&head);
                    }
                }
                self.objects.remove(&name);
            }
        }
        true
    }

    fn slices_of(&self, head: &str) -> impl Iterator<Item = &Arc<str>> {
        self.slices.get(head).into_iter().flatten()
    }

    /// Number of objects held.
    pub(super) fn len(&self) -> usize {
        self.objects.len()
    }
}

/// The objects one head stands for, as they should be.
struct Desired {
    head: Fingerprint,
    /// Slice names with their fingerprints (empty: members inline).
    slices: Vec<(String, Fingerprint)>,
}

/// Compares one head (and its slices) with what is written; appends the
/// writes to the four phases.
fn plan_head(
    written: &Written,
    head: &Arc<str>,
    desired: Option<Desired>,
    phases: &mut [Vec<Change>; 4],
) {
    let [slice_applies, head_applies, head_deletes, slice_deletes] = phases;
    match desired {
        Some(d) => {
            let mut keep: HashSet<&str> = HashSet::with_capacity(d.slices.len());
            for (name, fp) in &d.slices {
                keep.insert(name);
                if written.get(name) != Some(Some(*fp)) {
                    slice_applies.push(Change::Apply(Arc::from(name.as_str())));
                }
            }
            if written.get(head) != Some(Some(d.head)) {
                head_applies.push(Change::Apply(head.clone()));
            }
            for s in written.slices_of(head) {
                if !keep.contains(&**s) {
                    slice_deletes.push(Change::Delete(s.clone()));
                }
            }
        }
        None => {
            if written.get(head).is_some() {
                head_deletes.push(Change::Delete(head.clone()));
            }
            for s in written.slices_of(head) {
                slice_deletes.push(Change::Delete(s.clone()));
            }
        }
    }
}

fn ordered(mut phases: [Vec<Change>; 4]) -> Vec<Change> {
    for p in &mut phases {
        p.sort_by(|a, b| a.name().cmp(b.name()));
    }
    phases.into_iter().flatten().collect()
}

impl PolicyIndex {
    fn written(&self, kind: Kind) -> &Written {
        match kind {
            Kind::PeerSet => &self.written_ps,
            Kind::PolicyGroup => &self.written_pg,
            Kind::NodePolicySet => &self.written_nps,
        }
    }

    fn written_mut(&mut self, kind: Kind) -> (&mut Written, &mut HashSet<Arc<str>>) {
        match kind {
            Kind::PeerSet => (&mut self.written_ps, &mut self.dirty_ps_names),
            Kind::PolicyGroup => (&mut self.written_pg, &mut self.dirty_pg_names),
            Kind::NodePolicySet => (&mut self.written_nps, &mut self.dirty_nps_names),
        }
    }

    // ----- What the cluster holds -------------------------------------

    /// An object as watched: `fingerprint` from
    /// [`fingerprint::observed`](crate::policy::fingerprint::observed)
    /// (None: content unknown, so it is rewritten).
    pub fn observe(&mut self, kind: Kind, name: &str, fingerprint: Option<Fingerprint>) {
        self.observe_state(kind, name, Some(fingerprint));
    }

    /// An object was deleted (watched).
    pub fn observe_deleted(&mut self, kind: Kind, name: &str) {
        self.observe_state(kind, name, None);
    }

    fn observe_state(&mut self, kind: Kind, name: &str, state: Option<Option<Fingerprint>>) {
        let (written, dirty) = self.written_mut(kind);
        if written.set(kind, name, state) {
            dirty.insert(Arc::from(kind.head_of(name)));
        }
    }

    /// The complete list of one kind's objects (after a watch (re)start).
    pub fn reset_observed(&mut self, kind: Kind, all: Vec<(String, Option<Fingerprint>)>) {
        let listed: HashSet<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
        let gone: Vec<Arc<str>> = self
            .written(kind)
            .objects
            .keys()
            .filter(|n| !listed.contains(&***n))
            .cloned()
            .collect();
        drop(listed);
        for name in gone {
            self.observe_deleted(kind, &name);
        }
        for (name, fp) in all {
            self.observe(kind, &name, fp);
        }
    }

    /// A write succeeded (Some: applied with that fingerprint; None: deleted).
    pub fn mark_written(&mut self, kind: Kind, name: &str, fingerprint: Option<Fingerprint>) {
        let (written, _) = self.written_mut(kind);
        written.set(kind, name, fingerprint.map(Some));
    }

    /// A write failed or was held back: look at the object again on the
    /// next flush.
    pub fn retry(&mut self, kind: Kind, name: &str) {
        let (_, dirty) = self.written_mut(kind);
        dirty.insert(Arc::from(kind.head_of(name)));
    }

    /// Objects of a kind the cluster holds (as last observed or written).
    pub fn written_count(&self, kind: Kind) -> usize {
        self.written(kind).len()
    }

    // ----- Flush ------------------------------------------------------

    pub(super) fn dirty_node(&mut self, id: NodeId) {
        let node = &mut self.nodes[id];
        if !node.dirty {
            node.dirty = true;
            self.dirty_nodes.push(id);
        }
    }

    pub(super) fn dirty_set(&mut self, id: SetId) {
        let set = &mut self.sets[id];
        if !set.dirty {
            set.dirty = true;
            self.dirty_sets.push(id);
        }
    }

    pub(super) fn dirty_group(&mut self, id: GroupId) {
        let group = &mut self.groups[id];
        if !group.dirty {
            group.dirty = true;
            self.dirty_groups.push(id);
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
        let mut pg: HashSet<Arc<str>> = std::mem::take(&mut self.dirty_pg_names);
        for id in std::mem::take(&mut self.dirty_groups) {
            if let Some(group) = self.groups.get_mut(id) {
                group.dirty = false;
                pg.insert(group.name.clone());
            }
        }
        let mut changes = Changes {
            reports: std::mem::take(&mut self.reports),
            pod_reports: self.pod_reports(),
            ..Changes::default()
        };
        let mut phases: [Vec<Change>; 4] = Default::default();
        for head in ps {
            let desired = self.set_by_name.get(&head).map(|&id| self.desired_set(id));
            plan_head(&self.written_ps, &head, desired, &mut phases);
        }
        changes.peer_sets = ordered(phases);
        let mut phases: [Vec<Change>; 4] = Default::default();
        for head in pg {
            let desired = self
                .group_by_name
                .get(&head)
                .and_then(|&id| self.desired_group(id));
            plan_head(&self.written_pg, &head, desired, &mut phases);
        }
        changes.policy_groups = ordered(phases);
        let mut phases: [Vec<Change>; 4] = Default::default();
        for name in nps {
            let desired = self.desired_node_fp(&name).map(|head| Desired {
                head,
                slices: Vec::new(),
            });
            plan_head(&self.written_nps, &name, desired, &mut phases);
        }
        changes.node_policy_sets = ordered(phases);
        changes
    }

    fn desired_node_fp(&self, name: &str) -> Option<Fingerprint> {
        let &id = self.node_by_name.get(name)?;
        let node = &self.nodes[id];
        node.exists.then(|| self.node_fp(id))
    }

    fn desired_set(&self, id: SetId) -> Desired {
        let name = &self.sets[id].name;
        let slices = match self.set_shards(id) {
            Some(s) if s.is_sharded() => s
                .leaves()
                .into_iter()
                .map(|(leaf, st)| {
                    (
                        slice_name(name, leaf.depth, leaf.prefix),
                        slice_fp("peerset-slice", name, leaf, st),
                    )
                })
                .collect(),
            _ => Vec::new(),
        };
        Desired {
            head: self.set_fp(id),
            slices,
        }
    }

    /// A PolicyGroup object exists while its policies select a pod.
    fn desired_group(&self, id: GroupId) -> Option<Desired> {
        let g = &self.groups[id];
        if g.span.is_empty() || g.policies.is_empty() {
            return None;
        }
        let slices = if g.shards.is_sharded() {
            g.shards
                .leaves()
                .into_iter()
                .map(|(leaf, st)| {
                    (
                        slice_name(&g.name, leaf.depth, leaf.prefix),
                        slice_fp("policygroup-slice", &g.name, leaf, st),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        Some(Desired {
            head: self.group_head_fp(id),
            slices,
        })
    }

    /// The PolicyGroup head's fingerprint: a function of the group's
    /// policies (its slices are too).
    pub(super) fn group_head_fp(&self, id: GroupId) -> Fingerprint {
        Fp::new("policygroup")
            .str(&self.groups[id].name)
            .fp(self.group_fp(id))
            .finish()
    }

    pub(super) fn group_fp(&self, id: GroupId) -> Fingerprint {
        self.groups[id]
            .fp
            .unwrap_or_else(|| self.compute_group_fp(id))
    }

    pub(super) fn compute_group_fp(&self, id: GroupId) -> Fingerprint {
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

    /// Order-independent (sums over the endpoints and the distinct
    /// groups), so no sorting by name is needed to compare.
    pub(super) fn node_fp(&self, id: NodeId) -> Fingerprint {
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

    /// The PeerSet head's fingerprint: selector and members (the slices
    /// are a function of the members).
    pub(super) fn set_fp(&self, id: SetId) -> Fingerprint {
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
}

/// Fingerprint of one slice: its place and the content sum of its items.
pub(super) fn slice_fp(kind: &str, head: &str, leaf: Leaf, st: ShardStats) -> Fingerprint {
    Fp::new(kind)
        .str(head)
        .u64(u64::from(leaf.depth))
        .u64(leaf.prefix)
        .u64(u64::from(st.count))
        .fp(st.sum)
        .finish()
}

impl PolicyIndex {
    /// The desired fingerprint of an object (None: it should not exist).
    pub fn desired_fingerprint(&self, kind: Kind, name: &str) -> Option<Fingerprint> {
        match kind {
            Kind::NodePolicySet => self.desired_node_fp(name),
            Kind::PeerSet | Kind::PolicyGroup => {
                let head = kind.head_of(name);
                let desired = match kind {
                    Kind::PeerSet => self.set_by_name.get(head).map(|&id| self.desired_set(id)),
                    _ => self
                        .group_by_name
                        .get(head)
                        .and_then(|&id| self.desired_group(id)),
                }?;
                if head == name {
                    Some(desired.head)
                } else {
                    desired
                        .slices
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, fp)| *fp)
                }
            }
        }
    }

    /// The cluster holds the object as it should be.
    pub fn is_current(&self, kind: Kind, name: &str) -> bool {
        match self.desired_fingerprint(kind, name) {
            Some(fp) => self.written(kind).get(name) == Some(Some(fp)),
            None => self.written(kind).get(name).is_none(),
        }
    }

    /// Every slice a head should list is written as it should be (so the
    /// head may be written).
    pub fn slices_current(&self, kind: Kind, head: &str) -> bool {
        let desired = match kind {
            Kind::PeerSet => self.set_by_name.get(head).map(|&id| self.desired_set(id)),
            Kind::PolicyGroup => self
                .group_by_name
                .get(head)
                .and_then(|&id| self.desired_group(id)),
            Kind::NodePolicySet => None,
        };
        let written = self.written(kind);
        desired.is_none_or(|d| {
            d.slices
                .iter()
                .all(|(n, fp)| written.get(n) == Some(Some(*fp)))
        })
    }

    /// Every PolicyGroup a node's NodePolicySet names is written as it
    /// should be (so the NodePolicySet may be written). Returns the ones
    /// that are not.
    pub fn groups_not_current(&self, node: &str) -> Vec<String> {
        self.groups_of_node(node)
            .into_iter()
            .filter(|g| !self.is_current(Kind::PolicyGroup, g))
            .collect()
    }
}

impl PolicyIndex {
    /// Every object of a kind that should exist (heads and slices), sorted.
    pub fn desired_names(&self, kind: Kind) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut push = |head: &str, d: Desired| {
            out.push(head.to_string());
            out.extend(d.slices.into_iter().map(|(n, _)| n));
        };
        match kind {
            Kind::NodePolicySet => {
                for n in self.node_names() {
                    out.push(n.to_string());
                }
            }
            Kind::PeerSet => {
                for (id, set) in self.sets.iter() {
                    push(&set.name, self.desired_set(id));
                }
            }
            Kind::PolicyGroup => {
                for (id, g) in self.groups.iter() {
                    if let Some(d) = self.desired_group(id) {
                        push(&g.name, d);
                    }
                }
            }
        }
        out.sort();
        out
    }
}
