//! What the agent knows of its NodePolicySet and the PeerSets it references:
//! the [`PolicyInputs`] of the next sync, kept up to date from watch events
//! and GET results in arrival order. Pure (no kube, no I/O): the shell
//! ([`super::component`]) feeds it and asks [`PolicyStore::next_step`] what
//! to do.
//!
//! Only PeerSets the NodePolicySet references are kept, as plain specs, so
//! an agent's memory follows its own node's policies rather than the
//! cluster's. A PeerSet that becomes referenced after its watch event went
//! by (the controller writes PeerSets before the NodePolicySets that name
//! them) is fetched with a GET; the sync waits for that GET, so a new rule
//! is never programmed with an empty peer set by mistake. Watch events always
//! win over GET results that were in flight when they arrived: the watch
//! delivers every later version, so the store converges on the newest.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use canal_crds::{NodePolicySetSpec, NodePolicySetStatus, PeerSetSpec};

use super::render::{EnforcementConfig, PolicyInputs, referenced_peer_sets};

/// The node's NodePolicySet as the store needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodePolicySetView {
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `metadata.generation` (moves only when the spec changes).
    pub generation: Option<i64>,
    /// The compiled policy.
    pub spec: NodePolicySetSpec,
    /// The status currently stored (the agent's last write, as the API has it).
    pub status: Option<NodePolicySetStatus>,
}

/// An input change the kernel has not caught up with yet (the `object`
/// label of the realization metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    /// The NodePolicySet's spec changed (or appeared).
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
    /// The inputs are incomplete (a list has not finished, a GET is in
    /// flight): do not sync yet.
    Wait(String),
    /// Enforcement is on but the NodePolicySet does not exist: leave the
    /// kernel as it is (nothing is torn down because an object vanished).
    Hold(String),
    /// [`PolicyStore::inputs`] are complete: sync when they changed.
    Sync,
}

/// A referenced PeerSet the store does not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Missing {
    /// A GET is needed.
    NeedFetch,
    /// A GET is in flight.
    Fetching,
    /// It does not exist (the list or a GET said so); it renders as an
    /// empty set until a watch event brings it.
    Absent,
}

/// The watched state, ready to render.
#[derive(Debug, Default)]
pub struct PolicyStore {
    /// Spec, generation, referenced PeerSets and config of the next sync.
    inputs: PolicyInputs,
    config_known: bool,
    /// None: the NodePolicySet has not been listed yet.
    nps: Option<NpsPresence>,
    nps_relist: Option<Option<NodePolicySetView>>,
    peer_sets_listed: bool,
    peer_relist: Option<BTreeMap<String, PeerSetSpec>>,
    /// PeerSets the spec references (valid once the NodePolicySet is listed).
    referenced: BTreeSet<String>,
    missing: BTreeMap<String, Missing>,
    /// Changes observed and not yet programmed, with the earliest time each.
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

    /// Number of PeerSets held.
    pub fn peer_sets_held(&self) -> usize {
        self.inputs.peer_sets.len()
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
        if !self.peer_sets_listed {
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
        let in_flight: Vec<&str> = self
            .missing
            .iter()
            .filter(|(_, m)| **m != Missing::Absent)
            .map(|(n, _)| n.as_str())
            .collect();
        if !in_flight.is_empty() {
            return Step::Wait(format!(
                "fetching {} newly referenced PeerSet(s): {}",
                in_flight.len(),
                in_flight.join(", ")
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
        let same_spec = matches!(&self.nps, Some(NpsPresence::Present { uid, .. })
            if *uid == view.uid)
            && self.inputs.generation == view.generation
            && (view.generation.is_some() || self.inputs.spec == view.spec);
        self.nps = Some(NpsPresence::Present {
            uid: view.uid,
            status: view.status,
        });
        let was_unknown = std::mem::replace(&mut self.inputs.endpoints_unknown, false);
        if same_spec {
            // A status write (ours) or a metadata change: nothing to program
            // (unless it had been deleted meanwhile).
            return was_unknown;
        }
        self.inputs.generation = view.generation;
        self.inputs.spec = view.spec;
        self.update_references();
        self.changed(Cause::NodePolicySet, at);
        true
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
                self.delete_node_policy_set() || first
            }
        }
    }

    /// Recomputes the referenced PeerSets after a spec change: drops sets no
    /// longer referenced, asks for the ones not held.
    fn update_references(&mut self) {
        self.referenced = referenced_peer_sets(&self.inputs.spec);
        let referenced = &self.referenced;
        self.inputs.peer_sets.retain(|n, _| referenced.contains(n));
        self.missing.retain(|n, _| referenced.contains(n));
        if !self.peer_sets_listed || self.peer_relist.is_some() {
            // The running list brings them.
            return;
        }
        for name in &self.referenced {
            if !self.inputs.peer_sets.contains_key(name) {
                self.missing
                    .entry(name.clone())
                    .or_insert(Missing::NeedFetch);
            }
        }
    }

    fn wants(&self, name: &str) -> bool {
        // Before the NodePolicySet is listed every set might be needed.
        self.nps.is_none() || self.referenced.contains(name)
    }

    // ----- PeerSets --------------------------------------------------------

    /// A PeerSet was created or changed. Returns whether the inputs changed.
    pub fn apply_peer_set(&mut self, name: &str, spec: PeerSetSpec, at: Instant) -> bool {
        if !self.wants(name) {
            return false;
        }
        let was_missing = self.missing.remove(name).is_some();
        if self.inputs.peer_sets.get(name) == Some(&spec) {
            return was_missing;
        }
        self.inputs.peer_sets.insert(name.to_string(), spec);
        self.changed(Cause::PeerSet, at);
        true
    }

    /// A PeerSet was deleted. Returns whether the inputs changed.
    pub fn delete_peer_set(&mut self, name: &str, at: Instant) -> bool {
        if !self.wants(name) {
            return false;
        }
        let held = self.inputs.peer_sets.remove(name).is_some();
        if self.nps.is_some() && self.peer_sets_listed {
            self.missing.insert(name.to_string(), Missing::Absent);
        }
        if held {
            self.changed(Cause::PeerSet, at);
        }
        held
    }

    /// A (re)list of PeerSets starts.
    pub fn peer_set_relist_start(&mut self) {
        self.peer_relist = Some(BTreeMap::new());
    }

    /// One PeerSet of the running list. Every set is kept until the list is
    /// done: the NodePolicySet may start referencing it meanwhile.
    pub fn peer_set_relist_apply(&mut self, name: &str, spec: PeerSetSpec) {
        self.peer_relist
            .get_or_insert_with(BTreeMap::new)
            .insert(name.to_string(), spec);
    }

    /// The list is complete: it replaces what the store held. Returns
    /// whether the inputs changed.
    pub fn peer_set_relist_done(&mut self, at: Instant) -> bool {
        let mut listed = self.peer_relist.take().unwrap_or_default();
        if self.nps.is_some() {
            let referenced = &self.referenced;
            listed.retain(|n, _| referenced.contains(n));
            // The list is authoritative: whatever it lacks does not exist,
            // and GETs still in flight are superseded.
            self.missing = self
                .referenced
                .iter()
                .filter(|n| !listed.contains_key(*n))
                .map(|n| (n.clone(), Missing::Absent))
                .collect();
        }
        let first = !self.peer_sets_listed;
        self.peer_sets_listed = true;
        if listed == self.inputs.peer_sets {
            return first;
        }
        self.inputs.peer_sets = listed;
        self.changed(Cause::PeerSet, at);
        true
    }

    /// Referenced PeerSets to GET now; they count as in flight until
    /// [`fetched`](Self::fetched) reports them.
    pub fn take_fetches(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, state) in &mut self.missing {
            if *state == Missing::NeedFetch {
                *state = Missing::Fetching;
                out.push(name.clone());
            }
        }
        out
    }

    /// The result of a GET started by [`take_fetches`](Self::take_fetches):
    /// the spec, None when it does not exist, Err when the GET failed (it
    /// is asked for again). Ignored when a watch event or list settled the
    /// set meanwhile. Returns whether the inputs changed.
    pub fn fetched(&mut self, name: &str, result: Result<Option<PeerSetSpec>, ()>) -> bool {
        if self.missing.get(name) != Some(&Missing::Fetching) {
            return false;
        }
        match result {
            Ok(Some(spec)) => {
                self.missing.remove(name);
                self.inputs.peer_sets.insert(name.to_string(), spec);
                // Realization time counts from the NodePolicySet change that
                // referenced it, already pending.
                true
            }
            Ok(None) => {
                self.missing.insert(name.to_string(), Missing::Absent);
                true
            }
            Err(()) => {
                self.missing.insert(name.to_string(), Missing::NeedFetch);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canal_crds::{CompiledPolicy, Endpoint, Peer, PeerSelector, Rule};

    fn spec_referencing(sets: &[&str]) -> NodePolicySetSpec {
        NodePolicySetSpec {
            endpoints: vec![Endpoint {
                namespace: "x".into(),
                pod: "a".into(),
                interface: "cali0123456789a".into(),
                ips: vec!["10.244.1.2".into()],
                ingress_policies: vec!["x/p".into()],
                ..Endpoint::default()
            }],
            policies: vec![CompiledPolicy {
                name: "x/p".into(),
                ingress: vec![Rule {
                    peers: Some(
                        sets.iter()
                            .map(|s| Peer {
                                peer_set: Some(s.to_string()),
                                ip_block: None,
                            })
                            .collect(),
                    ),
                    ports: vec![],
                }],
                egress: vec![],
            }],
        }
    }

    fn nps(generation: i64, sets: &[&str]) -> NodePolicySetView {
        NodePolicySetView {
            uid: Some("u1".into()),
            generation: Some(generation),
            spec: spec_referencing(sets),
            status: None,
        }
    }

    fn ps(ips: &[&str]) -> PeerSetSpec {
        PeerSetSpec {
            selector: PeerSelector::default(),
            member_count: ips.len() as u32,
            ips: ips.iter().map(|s| s.to_string()).collect(),
            ports: vec![],
        }
    }

    /// A store with config known, both lists done, the NodePolicySet
    /// referencing `sets` and every set held.
    fn listed(sets: &[&str]) -> PolicyStore {
        let now = Instant::now();
        let mut s = PolicyStore::new();
        s.set_config(Some(EnforcementConfig::default()), now);
        s.node_policy_set_relist_start();
        s.node_policy_set_relist_apply(nps(1, sets));
        s.peer_set_relist_start();
        for name in sets {
            s.peer_set_relist_apply(name, ps(&["10.0.0.1"]));
        }
        s.peer_set_relist_apply("unrelated", ps(&["10.9.9.9"]));
        s.node_policy_set_relist_done(now);
        s.peer_set_relist_done(now);
        s
    }

    #[test]
    fn waits_for_config_and_both_lists_then_syncs() {
        let now = Instant::now();
        let mut s = PolicyStore::new();
        assert!(matches!(s.next_step(), Step::Wait(w) if w.contains("overlay")));
        s.set_config(Some(EnforcementConfig::default()), now);
        assert!(matches!(s.next_step(), Step::Wait(w) if w.contains("NodePolicySet list")));
        s.peer_set_relist_start();
        s.peer_set_relist_apply("ps-a", ps(&["10.0.0.1"]));
        s.peer_set_relist_apply("unrelated", ps(&["10.0.0.2"]));
        assert!(s.peer_set_relist_done(now));
        assert_eq!(
            s.peer_sets_held(),
            2,
            "kept until the NodePolicySet is known"
        );
        assert!(matches!(s.next_step(), Step::Wait(_)));
        s.node_policy_set_relist_start();
        s.node_policy_set_relist_apply(nps(3, &["ps-a"]));
        assert!(s.node_policy_set_relist_done(now));
        assert_eq!(s.next_step(), Step::Sync);
        assert_eq!(
            s.inputs().peer_sets.keys().collect::<Vec<_>>(),
            ["ps-a"],
            "unreferenced sets are dropped"
        );
        assert_eq!(s.inputs().generation, Some(3));
        assert_eq!(
            s.take_pending().keys().copied().collect::<Vec<_>>(),
            [Cause::NodePolicySet, Cause::PeerSet, Cause::Network]
        );
        assert!(s.pending().is_empty());
    }

    #[test]
    fn status_only_updates_change_nothing() {
        let mut s = listed(&["ps-a"]);
        s.take_pending();
        let mut v = nps(1, &["ps-a"]);
        v.status = Some(NodePolicySetStatus {
            observed_generation: Some(1),
            ..NodePolicySetStatus::default()
        });
        assert!(!s.apply_node_policy_set(v, Instant::now()));
        assert!(s.pending().is_empty());
        assert_eq!(
            s.node_policy_set().unwrap().1.unwrap().observed_generation,
            Some(1),
            "the stored status is kept for the next status write"
        );
    }

    #[test]
    fn a_newly_referenced_set_is_fetched_before_the_next_sync() {
        let mut s = listed(&["ps-a"]);
        // The controller wrote ps-b before the NodePolicySet naming it; the
        // store dropped it then.
        assert!(!s.apply_peer_set("ps-b", ps(&["10.0.0.7"]), Instant::now()));
        assert!(s.apply_node_policy_set(nps(2, &["ps-a", "ps-b"]), Instant::now()));
        assert!(matches!(s.next_step(), Step::Wait(w) if w.contains("ps-b")));
        assert_eq!(s.take_fetches(), ["ps-b"]);
        assert!(s.take_fetches().is_empty(), "one GET at a time");
        assert!(matches!(s.next_step(), Step::Wait(_)));
        assert!(s.fetched("ps-b", Ok(Some(ps(&["10.0.0.7"])))));
        assert_eq!(s.next_step(), Step::Sync);
        assert_eq!(s.inputs().peer_sets["ps-b"].ips, ["10.0.0.7"]);
    }

    #[test]
    fn failed_fetches_are_asked_for_again_and_absent_sets_render_empty() {
        let mut s = listed(&["ps-a"]);
        s.apply_node_policy_set(nps(2, &["ps-a", "ps-b"]), Instant::now());
        assert_eq!(s.take_fetches(), ["ps-b"]);
        assert!(!s.fetched("ps-b", Err(())));
        assert_eq!(s.take_fetches(), ["ps-b"]);
        assert!(s.fetched("ps-b", Ok(None)));
        assert_eq!(s.next_step(), Step::Sync, "an absent set does not block");
        assert!(!s.inputs().peer_sets.contains_key("ps-b"));
        // It appears later through the watch.
        assert!(s.apply_peer_set("ps-b", ps(&["10.0.0.8"]), Instant::now()));
        assert_eq!(s.inputs().peer_sets["ps-b"].ips, ["10.0.0.8"]);
    }

    #[test]
    fn a_watch_event_wins_over_a_get_in_flight() {
        let mut s = listed(&["ps-a"]);
        s.apply_node_policy_set(nps(2, &["ps-a", "ps-b"]), Instant::now());
        assert_eq!(s.take_fetches(), ["ps-b"]);
        assert!(s.apply_peer_set("ps-b", ps(&["10.0.0.9"]), Instant::now()));
        assert!(!s.fetched("ps-b", Ok(Some(ps(&["10.0.0.1"])))));
        assert_eq!(s.inputs().peer_sets["ps-b"].ips, ["10.0.0.9"]);
        // A delete seen while a GET is in flight also wins.
        s.apply_node_policy_set(nps(3, &["ps-a", "ps-c"]), Instant::now());
        assert_eq!(s.take_fetches(), ["ps-c"]);
        assert!(!s.delete_peer_set("ps-c", Instant::now()));
        assert!(!s.fetched("ps-c", Ok(Some(ps(&["10.0.0.1"])))));
        assert!(!s.inputs().peer_sets.contains_key("ps-c"));
        assert_eq!(s.next_step(), Step::Sync);
    }

    #[test]
    fn member_changes_of_referenced_sets_only() {
        let mut s = listed(&["ps-a"]);
        s.take_pending();
        assert!(!s.apply_peer_set("unrelated", ps(&["10.1.1.1"]), Instant::now()));
        assert!(!s.delete_peer_set("unrelated", Instant::now()));
        assert!(s.pending().is_empty());
        assert!(
            !s.apply_peer_set("ps-a", ps(&["10.0.0.1"]), Instant::now()),
            "same members"
        );
        assert!(s.apply_peer_set("ps-a", ps(&["10.0.0.1", "10.0.0.2"]), Instant::now()));
        assert_eq!(
            s.pending().keys().copied().collect::<Vec<_>>(),
            [Cause::PeerSet]
        );
        assert!(s.delete_peer_set("ps-a", Instant::now()));
        assert_eq!(s.next_step(), Step::Sync);
        assert!(s.inputs().peer_sets.is_empty());
    }

    #[test]
    fn a_deleted_node_policy_set_holds_the_kernel_unless_policy_is_disabled() {
        let mut s = listed(&["ps-a"]);
        assert!(s.delete_node_policy_set());
        assert!(matches!(s.next_step(), Step::Hold(_)));
        assert!(s.node_policy_set().is_none());
        let off = EnforcementConfig {
            enabled: false,
            ..EnforcementConfig::default()
        };
        assert!(s.set_config(Some(off), Instant::now()));
        assert_eq!(s.next_step(), Step::Sync, "disabling removes the policy");
        assert!(
            s.inputs().endpoints_unknown,
            "anti-spoofing does not trust a deleted endpoint list"
        );
        assert!(!s.set_config(Some(off), Instant::now()));
        assert!(!s.set_config(None, Instant::now()));
        assert!(s.apply_node_policy_set(nps(1, &["ps-a"]), Instant::now()));
        assert!(!s.inputs().endpoints_unknown, "back again");
    }

    #[test]
    fn a_relist_is_authoritative_and_keeps_sets_referenced_meanwhile() {
        let mut s = listed(&["ps-a"]);
        s.take_pending();
        s.peer_set_relist_start();
        s.peer_set_relist_apply("ps-a", ps(&["10.0.0.1"]));
        s.peer_set_relist_apply("ps-b", ps(&["10.0.0.5"]));
        // The NodePolicySet starts referencing ps-b while the list runs.
        s.apply_node_policy_set(nps(2, &["ps-a", "ps-b", "ps-gone"]), Instant::now());
        assert!(s.take_fetches().is_empty(), "the running list brings them");
        assert!(s.peer_set_relist_done(Instant::now()));
        assert_eq!(s.inputs().peer_sets["ps-b"].ips, ["10.0.0.5"]);
        assert!(!s.inputs().peer_sets.contains_key("ps-gone"));
        assert_eq!(s.next_step(), Step::Sync);
        assert!(s.take_fetches().is_empty());
    }

    #[test]
    fn pending_keeps_the_earliest_observation() {
        let t0 = Instant::now();
        let t1 = t0 + std::time::Duration::from_millis(5);
        let mut s = listed(&["ps-a"]);
        s.take_pending();
        s.apply_peer_set("ps-a", ps(&["10.0.0.2"]), t0);
        s.apply_peer_set("ps-a", ps(&["10.0.0.3"]), t1);
        assert_eq!(s.pending()[&Cause::PeerSet], t0);
    }
}
