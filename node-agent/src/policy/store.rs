//! What the agent knows of its NodePolicySet, the PolicyGroups it names and
//! the PeerSets their rules reference: the [`PolicyInputs`] of the next
//! sync, kept up to date from watch events and GET results in arrival
//! order. Pure (no kube, no I/O): the shell ([`super::component`]) feeds it
//! and asks [`PolicyStore::next_step`] what to do.
//!
//! **Only consistent views are programmed.** Large objects are a head and
//! slices, and a NodePolicySet names each PolicyGroup with the hash of the
//! version it was written against. The raw objects are kept as they arrive;
//! the inputs change only when they assemble ([`canal_crds::assemble`])
//! into a complete version: a NodePolicySet whose every PolicyGroup (and
//! its every slice) is held at the referenced hash, and whose PeerSets are
//! each held whole (or known not to exist); a PeerSet whose every slice is
//! held at the hash its head lists. Until then the last consistent version
//! stays programmed, so the kernel never holds half of a new version
//! against half of an old one, whatever order the watches deliver in.
//!
//! Only objects the node needs are kept, so an agent's memory follows its
//! own node's policies rather than the cluster's. An object that becomes
//! needed after its watch event went by (the controller writes slices and
//! sets before the heads and NodePolicySets that name them) is fetched with
//! a GET. Watch events always win over GET results that were in flight
//! when they arrived: the watch delivers every later version.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use canal_crds::assemble::{assemble_node, assemble_peer_set, referenced_peer_sets};
use canal_crds::{
    NodePolicySetObjectSpec, NodePolicySetStatus, PeerSetObjectSpec, PolicyGroupSpec, VersionRef,
};

use super::render::{EnforcementConfig, PolicyInputs};

/// The node's NodePolicySet as the store needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodePolicySetView {
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `metadata.generation` (moves only when the spec changes).
    pub generation: Option<i64>,
    /// The object's spec (endpoints and the PolicyGroups they use).
    pub spec: NodePolicySetObjectSpec,
    /// The status currently stored (the agent's part of it).
    pub status: Option<NodePolicySetStatus>,
}

/// An input change the kernel has not caught up with yet (the `object`
/// label of the realization metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    /// The NodePolicySet's spec (or a PolicyGroup it names) changed.
    NodePolicySet,
    /// A referenced PeerSet changed.
    PeerSet,
    /// The CanalNetwork's policy settings changed.
    Network,
}

impl Cause {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::NodePolicySet => "node_policy_set",
            Cause::PeerSet => "peer_set",
            Cause::Network => "canal_network",
        }
    }
}

/// What the shell should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The inputs are incomplete (a list has not finished, no consistent
    /// version has been seen yet): do not sync yet.
    Wait(String),
    /// Enforcement is on but the NodePolicySet does not exist: leave the
    /// kernel as it is (nothing is torn down because an object vanished).
    Hold(String),
    /// [`PolicyStore::inputs`] are complete: sync when they changed.
    Sync,
}

/// The kinds of shared objects the store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shared {
    /// PolicyGroup heads and slices.
    PolicyGroup,
    /// PeerSet heads and slices.
    PeerSet,
}

impl Shared {
    /// The Kubernetes kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Shared::PolicyGroup => "PolicyGroup",
            Shared::PeerSet => "PeerSet",
        }
    }
}

/// A needed object the store does not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Missing {
    /// A GET is needed.
    NeedFetch,
    /// A GET is in flight.
    Fetching,
    /// It does not exist (the list or a GET said so), until a watch event
    /// brings it. A missing PeerSet head renders as an empty set; anything
    /// else missing keeps the previous consistent version programmed.
    Absent,
}

/// What heads and slices of both kinds have in common.
trait Piece {
    fn slice_of(&self) -> Option<&str>;
    fn slices(&self) -> &[VersionRef];
}

impl Piece for PolicyGroupSpec {
    fn slice_of(&self) -> Option<&str> {
        self.slice_of.as_deref()
    }
    fn slices(&self) -> &[VersionRef] {
        &self.slices
    }
}

impl Piece for PeerSetObjectSpec {
    fn slice_of(&self) -> Option<&str> {
        self.slice_of.as_deref()
    }
    fn slices(&self) -> &[VersionRef] {
        &self.slices
    }
}

/// The objects of one kind as watched (only the needed ones are kept once
/// the NodePolicySet is known).
#[derive(Debug)]
struct Objects<T> {
    held: BTreeMap<String, T>,
    listed: bool,
    relist: Option<BTreeMap<String, T>>,
}

impl<T> Default for Objects<T> {
    fn default() -> Self {
        Objects {
            held: BTreeMap::new(),
            listed: false,
            relist: None,
        }
    }
}

/// Needed heads and slices: the heads asked for, the slices they list,
/// and slices that name a needed head (written before the head that will
/// list them).
fn needed<T: Piece>(objects: &Objects<T>, heads: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = heads.clone();
    for h in heads {
        if let Some(head) = objects.held.get(h) {
            out.extend(head.slices().iter().map(|r| r.name.clone()));
        }
    }
    for (name, obj) in &objects.held {
        if obj.slice_of().is_some_and(|h| heads.contains(h)) {
            out.insert(name.clone());
        }
    }
    out
}

/// The watched state, ready to render.
#[derive(Debug, Default)]
pub struct PolicyStore {
    /// The last consistent view (spec, generation, PeerSets) and config.
    inputs: PolicyInputs,
    config_known: bool,
    /// A consistent NodePolicySet version has been assembled.
    have_view: bool,
    /// (uid, generation) of the NodePolicySet the inputs hold.
    programmed: Option<(Option<String>, Option<i64>)>,
    /// What [`PolicyStore::prune`] last found needed: heads and slices of
    /// each kind (events for anything else are dropped at once).
    keep_groups: BTreeSet<String>,
    keep_sets: BTreeSet<String>,
    wanted_groups: BTreeSet<String>,
    wanted_sets: BTreeSet<String>,
    /// None: the NodePolicySet has not been listed yet.
    nps: Option<NpsPresence>,
    nps_relist: Option<Option<NodePolicySetView>>,
    /// The newest NodePolicySet spec seen (maybe not consistent yet).
    latest: Option<NodePolicySetView>,
    groups: Objects<PolicyGroupSpec>,
    sets: Objects<PeerSetObjectSpec>,
    missing: BTreeMap<(Shared, String), Missing>,
    /// The NodePolicySet or a PolicyGroup changed since the last assembly.
    node_dirty: bool,
    /// PeerSet heads whose head or slices changed since the last assembly.
    dirty_sets: BTreeSet<String>,
    /// When the newest unprogrammed change of each kind was first seen.
    node_since: Option<Instant>,
    set_since: BTreeMap<String, Instant>,
    /// Why the newest NodePolicySet is not programmed yet.
    waiting_on: Option<String>,
    /// Changes programmed into the inputs and not yet synced, with the
    /// earliest time each was observed.
    pending: BTreeMap<Cause, Instant>,
}

#[derive(Debug, Clone, PartialEq)]
enum NpsPresence {
    Missing,
    Present {
        uid: Option<String>,
        status: Option<NodePolicySetStatus>,
    },
}

impl PolicyStore {
    /// An empty store: nothing listed, no configuration.
    pub fn new() -> PolicyStore {
        PolicyStore::default()
    }

    /// The inputs of the next sync (complete only when [`next_step`](Self::next_step) says [`Step::Sync`]).
    pub fn inputs(&self) -> &PolicyInputs {
        &self.inputs
    }

    /// The NodePolicySet's uid and stored status, when it exists.
    pub fn node_policy_set(&self) -> Option<(Option<&str>, Option<&NodePolicySetStatus>)> {
        match &self.nps {
            Some(NpsPresence::Present { uid, status }) => Some((uid.as_deref(), status.as_ref())),
            _ => None,
        }
    }

    /// Number of PeerSets in the inputs.
    pub fn peer_sets_held(&self) -> usize {
        self.inputs.peer_sets.len()
    }

    /// Objects (heads and slices) held of a kind.
    pub fn objects_held(&self, kind: Shared) -> usize {
        match kind {
            Shared::PolicyGroup => self.groups.held.len(),
            Shared::PeerSet => self.sets.held.len(),
        }
    }

    /// Why the newest NodePolicySet is not programmed yet (None: it is, or
    /// there is none).
    pub fn waiting_on(&self) -> Option<&str> {
        self.waiting_on.as_deref()
    }

    /// What to do next.
    pub fn next_step(&self) -> Step {
        if !self.config_known {
            return Step::Wait(
                "waiting for the overlay's first sync (CanalNetwork settings)".into(),
            );
        }
        let Some(nps) = &self.nps else {
            return Step::Wait("waiting for the NodePolicySet list".into());
        };
        if !self.groups.listed {
            return Step::Wait("waiting for the PolicyGroup list".into());
        }
        if !self.sets.listed {
            return Step::Wait("waiting for the PeerSet list".into());
        }
        if !self.inputs.config.enabled {
            // Disabled: everything is removed whatever the NodePolicySet says.
            return Step::Sync;
        }
        if *nps == NpsPresence::Missing {
            return Step::Hold(
                "this node's NodePolicySet does not exist (canal-controller writes one per Node)"
                    .into(),
            );
        }
        if !self.have_view {
            return Step::Wait(format!(
                "waiting for a consistent NodePolicySet: {}",
                self.waiting_on.as_deref().unwrap_or("assembling")
            ));
        }
        Step::Sync
    }

    /// Changes not yet programmed, with when each kind was first observed.
    pub fn pending(&self) -> &BTreeMap<Cause, Instant> {
        &self.pending
    }

    /// Clears the pending changes (after a successful sync) and returns them.
    pub fn take_pending(&mut self) -> BTreeMap<Cause, Instant> {
        std::mem::take(&mut self.pending)
    }

    fn changed(&mut self, cause: Cause, at: Instant) {
        self.pending
            .entry(cause)
            .and_modify(|t| *t = (*t).min(at))
            .or_insert(at);
    }

    /// The CanalNetwork's settings as the overlay published them (None: not
    /// known yet). Returns whether the inputs changed.
    pub fn set_config(&mut self, config: Option<EnforcementConfig>, at: Instant) -> bool {
        let Some(config) = config else {
            // The overlay never retracts what it published; keep the last.
            return false;
        };
        if self.config_known && self.inputs.config == config {
            return false;
        }
        self.config_known = true;
        self.inputs.config = config;
        self.changed(Cause::Network, at);
        true
    }

    // ----- the NodePolicySet ---------------------------------------------

    /// The NodePolicySet was created or changed. Returns whether the inputs changed.
    pub fn apply_node_policy_set(&mut self, view: NodePolicySetView, at: Instant) -> bool {
        let same_spec = self.latest.as_ref().is_some_and(|l| {
            l.uid == view.uid
                && l.generation == view.generation
                && (view.generation.is_some() || l.spec == view.spec)
        });
        self.nps = Some(NpsPresence::Present {
            uid: view.uid.clone(),
            status: view.status.clone(),
        });
        let was_unknown = std::mem::replace(&mut self.inputs.endpoints_unknown, false);
        if same_spec {
            // A status write (ours) or a metadata change: nothing to program
            // (unless it had been deleted meanwhile).
            return was_unknown;
        }
        self.latest = Some(view);
        self.node_dirty = true;
        self.node_since.get_or_insert(at);
        self.settle()
    }

    /// The NodePolicySet was deleted. The kernel keeps what it has (see
    /// [`Step::Hold`]). Returns whether anything the next step depends on changed.
    pub fn delete_node_policy_set(&mut self) -> bool {
        let was = self.nps.replace(NpsPresence::Missing);
        // Enabled, the next step is Hold; disabled, anti-spoofing falls back
        // to its reverse-path check rather than trusting a vanished list.
        self.inputs.endpoints_unknown = true;
        was != Some(NpsPresence::Missing)
    }

    /// A (re)list of the NodePolicySet starts.
    pub fn node_policy_set_relist_start(&mut self) {
        self.nps_relist = Some(None);
    }

    /// The NodePolicySet as the running list has it.
    pub fn node_policy_set_relist_apply(&mut self, view: NodePolicySetView) {
        self.nps_relist = Some(Some(view));
    }

    /// The list is complete. Returns whether the inputs changed.
    pub fn node_policy_set_relist_done(&mut self, at: Instant) -> bool {
        match self.nps_relist.take().flatten() {
            Some(view) => self.apply_node_policy_set(view, at),
            None => {
                let first = self.nps.is_none();
                let changed = self.delete_node_policy_set() || first;
                self.settle() || changed
            }
        }
    }

    // ----- shared objects ----------------------------------------------------

    fn objects_mut(&mut self, kind: Shared) -> &mut dyn ObjectsMut {
        match kind {
            Shared::PolicyGroup => &mut self.groups,
            Shared::PeerSet => &mut self.sets,
        }
    }

    /// Marks what an object change affects.
    fn touched(&mut self, kind: Shared, name: &str, head: Option<&str>, at: Instant) {
        match kind {
            Shared::PolicyGroup => {
                self.node_dirty = true;
                self.node_since.get_or_insert(at);
            }
            Shared::PeerSet => {
                let head = head.unwrap_or(name).to_string();
                self.set_since.entry(head.clone()).or_insert(at);
                self.dirty_sets.insert(head);
                // A NodePolicySet waiting for this set's version.
                self.node_dirty = true;
            }
        }
    }

    /// A PolicyGroup was created or changed. Returns whether the inputs changed.
    pub fn apply_policy_group(&mut self, name: &str, spec: PolicyGroupSpec, at: Instant) -> bool {
        let head = spec.slice_of.clone();
        if !self.may_need(Shared::PolicyGroup, name, head.as_deref()) {
            self.groups.held.remove(name);
            return false;
        }
        if self.groups.held.get(name) == Some(&spec) {
            return self
                .missing
                .remove(&(Shared::PolicyGroup, name.to_string()))
                .is_some()
                && self.settle();
        }
        self.missing
            .remove(&(Shared::PolicyGroup, name.to_string()));
        self.groups.held.insert(name.to_string(), spec);
        self.touched(Shared::PolicyGroup, name, head.as_deref(), at);
        self.settle()
    }

    /// A PeerSet (head or slice) was created or changed. Returns whether the inputs changed.
    pub fn apply_peer_set(&mut self, name: &str, spec: PeerSetObjectSpec, at: Instant) -> bool {
        let head = spec.slice_of.clone();
        if !self.may_need(Shared::PeerSet, name, head.as_deref()) {
            self.sets.held.remove(name);
            return false;
        }
        if self.sets.held.get(name) == Some(&spec) {
            return self
                .missing
                .remove(&(Shared::PeerSet, name.to_string()))
                .is_some()
                && self.settle();
        }
        self.missing.remove(&(Shared::PeerSet, name.to_string()));
        self.sets.held.insert(name.to_string(), spec);
        self.touched(Shared::PeerSet, name, head.as_deref(), at);
        self.settle()
    }

    /// An object was deleted. Returns whether the inputs changed.
    pub fn delete_object(&mut self, kind: Shared, name: &str, at: Instant) -> bool {
        let removed = self.objects_mut(kind).remove(name);
        let key = (kind, name.to_string());
        let listed = self.nps.is_some() && self.groups.listed && self.sets.listed;
        let was_missing = self.missing.contains_key(&key);
        if !listed || (removed.is_none() && !was_missing) {
            return false;
        }
        self.missing.insert(key, Missing::Absent);
        let head = removed.flatten();
        self.touched(kind, name, head.as_deref(), at);
        self.settle()
    }

    /// A PolicyGroup was deleted. Returns whether the inputs changed.
    pub fn delete_policy_group(&mut self, name: &str, at: Instant) -> bool {
        self.delete_object(Shared::PolicyGroup, name, at)
    }

    /// A PeerSet was deleted. Returns whether the inputs changed.
    pub fn delete_peer_set(&mut self, name: &str, at: Instant) -> bool {
        self.delete_object(Shared::PeerSet, name, at)
    }

    /// A (re)list of a kind starts.
    pub fn relist_start(&mut self, kind: Shared) {
        self.objects_mut(kind).relist_start();
    }

    /// One PolicyGroup of the running list.
    pub fn policy_group_relist_apply(&mut self, name: &str, spec: PolicyGroupSpec) {
        self.groups
            .relist
            .get_or_insert_with(BTreeMap::new)
            .insert(name.to_string(), spec);
    }

    /// One PeerSet of the running list. Every object is kept until the list
    /// is done: the NodePolicySet may start needing it meanwhile.
    pub fn peer_set_relist_apply(&mut self, name: &str, spec: PeerSetObjectSpec) {
        self.sets
            .relist
            .get_or_insert_with(BTreeMap::new)
            .insert(name.to_string(), spec);
    }

    /// The list of a kind is complete: it replaces what the store held (the
    /// list is authoritative: whatever it lacks does not exist, and GETs
    /// still in flight are superseded). Returns whether the inputs changed.
    pub fn relist_done(&mut self, kind: Shared, at: Instant) -> bool {
        let first = self.objects_mut(kind).relist_done();
        self.missing.retain(|(k, _), _| *k != kind);
        self.mark_listed_missing(kind);
        match kind {
            Shared::PolicyGroup => {
                self.node_dirty = true;
                self.node_since.get_or_insert(at);
            }
            Shared::PeerSet => {
                let all: Vec<String> = self.inputs.peer_sets.keys().cloned().collect();
                for name in all {
                    self.set_since.entry(name.clone()).or_insert(at);
                    self.dirty_sets.insert(name);
                }
                self.node_dirty = true;
            }
        }
        self.settle() || first
    }

    /// PeerSet shorthand of [`relist_start`](Self::relist_start).
    pub fn peer_set_relist_start(&mut self) {
        self.relist_start(Shared::PeerSet);
    }

    /// PeerSet shorthand of [`relist_done`](Self::relist_done).
    pub fn peer_set_relist_done(&mut self, at: Instant) -> bool {
        self.relist_done(Shared::PeerSet, at)
    }

    /// After a list: what is needed and was not listed does not exist.
    fn mark_listed_missing(&mut self, kind: Shared) {
        if self.nps.is_none() {
            return;
        }
        let names: Vec<String> = match kind {
            Shared::PolicyGroup => needed(&self.groups, &self.wanted_group_heads())
                .into_iter()
                .filter(|n| !self.groups.held.contains_key(n))
                .collect(),
            Shared::PeerSet => needed(&self.sets, &self.wanted_set_heads())
                .into_iter()
                .filter(|n| !self.sets.held.contains_key(n))
                .collect(),
        };
        for n in names {
            self.missing.insert((kind, n), Missing::Absent);
        }
    }

    /// Objects to GET now; they count as in flight until
    /// [`fetched`](Self::fetched) reports them.
    pub fn take_fetches(&mut self) -> Vec<(Shared, String)> {
        let mut out = Vec::new();
        for ((kind, name), state) in &mut self.missing {
            if *state == Missing::NeedFetch {
                *state = Missing::Fetching;
                out.push((*kind, name.clone()));
            }
        }
        out
    }

    /// The result of a GET started by [`take_fetches`](Self::take_fetches):
    /// the object, None when it does not exist, Err when the GET failed (it
    /// is asked for again). Ignored when a watch event or list settled the
    /// object meanwhile. Returns whether the inputs changed.
    pub fn fetched(&mut self, result: Fetched, at: Instant) -> bool {
        let key = result.key();
        if self.missing.get(&key) != Some(&Missing::Fetching) {
            return false;
        }
        match result {
            Fetched::PolicyGroup(name, Ok(Some(spec))) => self.apply_policy_group(&name, spec, at),
            Fetched::PeerSet(name, Ok(Some(spec))) => self.apply_peer_set(&name, spec, at),
            Fetched::PolicyGroup(_, Ok(None)) | Fetched::PeerSet(_, Ok(None)) => {
                self.missing.insert(key.clone(), Missing::Absent);
                let (kind, name) = key;
                self.touched(kind, &name, None, at);
                self.settle()
            }
            Fetched::PolicyGroup(_, Err(())) | Fetched::PeerSet(_, Err(())) => {
                self.missing.insert(key, Missing::NeedFetch);
                false
            }
        }
    }

    // ----- assembly ----------------------------------------------------------

    /// PolicyGroup heads the newest NodePolicySet names.
    fn wanted_group_heads(&self) -> BTreeSet<String> {
        self.latest
            .iter()
            .flat_map(|l| l.spec.policy_groups.iter().map(|r| r.name.clone()))
            .collect()
    }

    /// PeerSet heads the programmed policy, the newest NodePolicySet's
    /// inline policies and the held PolicyGroups reference.
    fn wanted_set_heads(&self) -> BTreeSet<String> {
        let mut out = referenced_peer_sets(&self.inputs.spec);
        let inline = self.latest.iter().flat_map(|l| l.spec.policies.iter());
        let grouped = self
            .groups
            .held
            .values()
            .flat_map(|g| g.policies.iter().map(|p| (&p.ingress, &p.egress)));
        let rules = inline
            .map(|p| (&p.ingress, &p.egress))
            .chain(grouped)
            .flat_map(|(i, e)| i.iter().chain(e.iter()));
        for rule in rules {
            for peer in rule.peers.iter().flatten() {
                out.extend(peer.peer_set.iter().cloned());
            }
            for port in &rule.ports {
                out.extend(port.named_port_set.iter().cloned());
            }
        }
        out
    }

    /// Asks for what is needed and not held (once the lists are done).
    fn request(&mut self, kind: Shared, names: impl IntoIterator<Item = String>) {
        if self.nps.is_none() || !self.groups.listed || !self.sets.listed {
            // The running lists bring them.
            return;
        }
        for n in names {
            let held = match kind {
                Shared::PolicyGroup => self.groups.held.contains_key(&n),
                Shared::PeerSet => self.sets.held.contains_key(&n),
            };
            if !held {
                self.missing.entry((kind, n)).or_insert(Missing::NeedFetch);
            }
        }
    }

    /// A PeerSet as the inputs should have it: Some(Some) assembled,
    /// Some(None) known not to exist (renders empty), None not known yet.
    fn settled_set(&self, name: &str) -> Option<Option<canal_crds::PeerSetSpec>> {
        match self.sets.held.get(name) {
            Some(head) if head.slice_of.is_none() => {
                assemble_peer_set(name, head, |n| self.sets.held.get(n))
                    .ok()
                    .map(Some)
            }
            _ => (self.missing.get(&(Shared::PeerSet, name.to_string())) == Some(&Missing::Absent))
                .then_some(None),
        }
    }

    /// Moves the inputs to the newest consistent versions, asks for what is
    /// missing, and drops what is not needed. Returns whether the inputs
    /// changed.
    fn settle(&mut self) -> bool {
        let mut changed = false;
        let lists_done = self.nps.is_some() && self.groups.listed && self.sets.listed;
        if self.node_dirty && lists_done {
            self.node_dirty = false;
            changed |= self.settle_node();
        }
        if lists_done {
            changed |= self.settle_sets();
            self.prune();
        }
        changed
    }

    fn settle_node(&mut self) -> bool {
        let Some(latest) = &self.latest else {
            return false;
        };
        if self.have_view
            && latest.generation.is_some()
            && self.programmed == Some((latest.uid.clone(), latest.generation))
        {
            self.waiting_on = None;
            return false;
        }
        let name = "this node";
        let assembled = assemble_node(name, &latest.spec, |n| self.groups.held.get(n));
        let view = match assembled {
            Ok(view) => view,
            Err(gaps) => {
                self.waiting_on = Some(
                    gaps.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                );
                let names: Vec<String> = gaps.iter().map(|g| g.object().1.to_string()).collect();
                self.request(Shared::PolicyGroup, names);
                return false;
            }
        };
        // Its PeerSets must be settled too, or the new rules would start
        // with sets that are not there yet.
        let sets = referenced_peer_sets(&view);
        let mut unsettled = Vec::new();
        let mut resolved = BTreeMap::new();
        for s in &sets {
            match self.settled_set(s) {
                Some(Some(spec)) => {
                    resolved.insert(s.clone(), spec);
                }
                Some(None) => {}
                None => unsettled.push(s.clone()),
            }
        }
        if !unsettled.is_empty() {
            self.waiting_on = Some(format!(
                "PeerSet(s) not complete yet: {}",
                unsettled.join(", ")
            ));
            let mut ask: Vec<String> = Vec::new();
            for s in &unsettled {
                match self.sets.held.get(s) {
                    Some(head) => ask.extend(head.slices.iter().map(|r| r.name.clone())),
                    None => ask.push(s.clone()),
                }
            }
            self.request(Shared::PeerSet, ask);
            self.node_dirty = true;
            return false;
        }
        let (uid, generation) = self
            .latest
            .as_ref()
            .map(|l| (l.uid.clone(), l.generation))
            .unwrap_or_default();
        self.waiting_on = None;
        self.have_view = true;
        self.programmed = Some((uid, generation));
        self.inputs.generation = generation;
        self.inputs.spec = view;
        let sets_changed = self.inputs.peer_sets != resolved;
        self.inputs.peer_sets = resolved;
        let at = self.node_since.take().unwrap_or_else(Instant::now);
        self.changed(Cause::NodePolicySet, at);
        if sets_changed {
            self.changed(Cause::PeerSet, at);
        }
        for s in &sets {
            self.dirty_sets.remove(s);
            self.set_since.remove(s);
        }
        // A new generation: even with the same content it is what the
        // status reports as programmed.
        true
    }

    /// Updates the programmed view's PeerSets that changed and are whole.
    fn settle_sets(&mut self) -> bool {
        let referenced = referenced_peer_sets(&self.inputs.spec);
        let mut changed = false;
        let dirty: Vec<String> = std::mem::take(&mut self.dirty_sets).into_iter().collect();
        for name in dirty {
            if !referenced.contains(&name) {
                self.set_since.remove(&name);
                continue;
            }
            match self.settled_set(&name) {
                Some(Some(spec)) => {
                    if self.inputs.peer_sets.get(&name) != Some(&spec) {
                        self.inputs.peer_sets.insert(name.clone(), spec);
                        let at = self.set_since.remove(&name).unwrap_or_else(Instant::now);
                        self.changed(Cause::PeerSet, at);
                        changed = true;
                    } else {
                        self.set_since.remove(&name);
                    }
                }
                Some(None) => {
                    if self.inputs.peer_sets.remove(&name).is_some() {
                        let at = self.set_since.remove(&name).unwrap_or_else(Instant::now);
                        self.changed(Cause::PeerSet, at);
                        changed = true;
                    }
                }
                None => {
                    // Not whole yet: the previous version stays programmed.
                    let ask: Vec<String> = match self.sets.held.get(&name) {
                        Some(head) => head.slices.iter().map(|r| r.name.clone()).collect(),
                        None => vec![name.clone()],
                    };
                    self.request(Shared::PeerSet, ask);
                }
            }
        }
        changed
    }

    /// Drops objects nobody needs, and requests needed heads not held.
    fn prune(&mut self) {
        let group_heads = self.wanted_group_heads();
        let keep_groups = needed(&self.groups, &group_heads);
        self.groups.held.retain(|n, _| keep_groups.contains(n));
        self.request(Shared::PolicyGroup, group_heads.iter().cloned());
        let set_heads = self.wanted_set_heads();
        let keep_sets = needed(&self.sets, &set_heads);
        self.sets.held.retain(|n, _| keep_sets.contains(n));
        self.request(Shared::PeerSet, set_heads.iter().cloned());
        self.missing.retain(|(kind, n), _| match kind {
            Shared::PolicyGroup => keep_groups.contains(n),
            Shared::PeerSet => keep_sets.contains(n),
        });
        self.keep_groups = keep_groups;
        self.keep_sets = keep_sets;
        self.wanted_groups = group_heads;
        self.wanted_sets = set_heads;
    }

    /// Whether an object event can matter: before the lists are done
    /// anything might; after, only what the last assembly needed, slices of
    /// needed heads, and objects being waited for.
    fn may_need(&self, kind: Shared, name: &str, slice_of: Option<&str>) -> bool {
        if self.nps.is_none() || !self.groups.listed || !self.sets.listed {
            return true;
        }
        let (keep, heads) = match kind {
            Shared::PolicyGroup => (&self.keep_groups, &self.wanted_groups),
            Shared::PeerSet => (&self.keep_sets, &self.wanted_sets),
        };
        keep.contains(name)
            || slice_of.is_some_and(|h| heads.contains(h))
            || self.missing.contains_key(&(kind, name.to_string()))
    }
}

/// The outcome of a GET the shell started.
#[derive(Clone, Debug, PartialEq)]
pub enum Fetched {
    /// A PolicyGroup (None: not found; Err: the GET failed).
    PolicyGroup(String, Result<Option<PolicyGroupSpec>, ()>),
    /// A PeerSet.
    PeerSet(String, Result<Option<PeerSetObjectSpec>, ()>),
}

impl Fetched {
    fn key(&self) -> (Shared, String) {
        match self {
            Fetched::PolicyGroup(n, _) => (Shared::PolicyGroup, n.clone()),
            Fetched::PeerSet(n, _) => (Shared::PeerSet, n.clone()),
        }
    }
}

/// The kind-independent operations on [`Objects`].
trait ObjectsMut {
    /// Removes an object; Some(its head, if a slice) when it was held.
    fn remove(&mut self, name: &str) -> Option<Option<String>>;
    fn relist_start(&mut self);
    /// Returns whether this was the first list.
    fn relist_done(&mut self) -> bool;
}

impl<T: Piece> ObjectsMut for Objects<T> {
    fn remove(&mut self, name: &str) -> Option<Option<String>> {
        self.held
            .remove(name)
            .map(|o| o.slice_of().map(str::to_string))
    }

    fn relist_start(&mut self) {
        self.relist = Some(BTreeMap::new());
    }

    fn relist_done(&mut self) -> bool {
        self.held = self.relist.take().unwrap_or_default();
        let first = !self.listed;
        self.listed = true;
        first
    }
}

#[cfg(test)]
mod tests;
