//! The network controller's brain: a pure state machine fed with what the
//! watches report (`apply_node`, `delete_node`, `reset_nodes`, and the same
//! for CanalNetworks) that answers `plan()` with the writes and Events that
//! bring the cluster to the desired state. No I/O; the shell in `mod.rs`
//! executes the plan and feeds the results back.
//!
//! Safety rules it keeps:
//! - a Node's existing podCIDR is claimed the moment the Node is seen, and
//!   the allocator is built only from a complete Node list, so a subnet is
//!   never handed out while some Node may already hold it;
//! - a subnet handed out but not yet seen on the Node (a write in flight)
//!   stays held, also across a relist;
//! - nothing set on a Node is ever changed: podCIDRs are repeated verbatim,
//!   Nodes in conflict get no write at all;
//! - the address plan (clusterCIDR, nodeSubnetLength) changes only while no
//!   subnet is allocated;
//! - a subnet holding a Node's own address is never allocated, and a Node's
//!   overlay address never moves to one that cannot be right, nor silently
//!   (see `addresses.rs`).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use canal_crds::{CanalNetworkSpec, CanalNetworkStatus, NetworkConfig};
use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::addresses::{self, AddressIndex, Move};
use super::addresses6;
use super::families::{self, InForce};
use crate::ipam::{Allocator, IpamError};
use crate::node_view::{NodeView, PodCidrs, same_family};
use crate::status::{self, ActivePlan, Assessment, RefusedChange};
use crate::vtep::{self, NodeApply};

mod report;

use report::{changed_fields, recorded_plans};

type AgeKey = (Option<Timestamp>, String);

/// A CanalNetwork as the watch delivered it.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkObject {
    /// metadata.name.
    pub name: String,
    /// metadata.uid.
    pub uid: Option<String>,
    /// metadata.generation.
    pub generation: Option<i64>,
    /// The spec, or why it could not be read (an object stored before a
    /// schema change).
    pub spec: Result<CanalNetworkSpec, String>,
    /// The status, when the object could be read.
    pub status: Option<CanalNetworkStatus>,
}

/// What a Node write does, for the Event that follows its success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteKind {
    /// Sets newly allocated podCIDRs (one per family, in order).
    Allocate(Vec<IpNet>),
    /// Publishes the podCIDRs the Node already had.
    Adopt(Vec<IpNet>),
    /// Refreshes annotations (config change, new InternalIP).
    Update,
}

/// One server-side apply to a Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeWrite {
    /// Everything the controller owns on the Node.
    pub apply: NodeApply,
    /// Why.
    pub kind: WriteKind,
    /// resourceVersion of the Node as it was planned against.
    pub based_on: Option<String>,
    /// The overlay address moves with this write (an Event follows).
    pub moved: Option<Move>,
    /// The IPv6 overlay address moves with this write (an Event follows).
    pub moved_v6: Option<Move>,
}

/// One status apply to a CanalNetwork.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusWrite {
    /// The CanalNetwork.
    pub name: String,
    /// The status fields the controller owns.
    pub status: CanalNetworkStatus,
}

/// The object an Event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A Node.
    Node { name: String, uid: Option<String> },
    /// A CanalNetwork.
    Network { name: String, uid: Option<String> },
}

/// An Event a person would want to see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// What it is about.
    pub subject: Subject,
    /// Warning (true) or Normal.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: &'static str,
    /// PascalCase action.
    pub action: &'static str,
    /// The human-readable note.
    pub note: String,
}

/// What to do next.
#[derive(Debug, Default)]
pub struct Plan {
    /// Node applies.
    pub node_writes: Vec<NodeWrite>,
    /// Status applies.
    pub status_writes: Vec<StatusWrite>,
    /// Events.
    pub notices: Vec<Notice>,
    /// Nodes looked at.
    pub nodes_reconciled: usize,
}

#[derive(Debug, Clone)]
struct NetworkEntry {
    object: NetworkObject,
    /// The last status this controller wrote (used when the object's own
    /// status cannot be read).
    written: Option<CanalNetworkStatus>,
    /// The Degraded reason last announced with an Event.
    announced: Option<String>,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct State {
    nodes: BTreeMap<String, NodeView>,
    networks: BTreeMap<String, NetworkEntry>,
    /// One allocator per range in force, primary first.
    allocs: Vec<Allocator>,
    live: Option<NetworkConfig>,
    dirty: BTreeSet<AgeKey>,
    waiting: BTreeSet<AgeKey>,
    conflicts: BTreeMap<String, String>,
    /// Nodes whose podCIDRs lack a family of the cluster (set before it
    /// had the family; Kubernetes never lets them change): name -> why.
    /// They keep working in the families they have.
    gaps: BTreeMap<String, String>,
    /// Nodes whose addresses conflict (inside clusterCIDR, another Node's
    /// overlay address, unusable): name -> why.
    address_conflicts: BTreeMap<String, String>,
    addresses: AddressIndex,
    refused: Vec<RefusedChange>,
    invalid_spec: Option<String>,
    notices: Vec<Notice>,
}

impl State {
    /// An empty state: no Nodes, no networks, no plan.
    pub fn new() -> State {
        State::default()
    }

    /// The config in force (also when the spec has become invalid since).
    pub fn live_config(&self) -> Option<&NetworkConfig> {
        self.live.as_ref()
    }

    /// The allocator of the primary range, once an address plan is in force.
    pub fn allocator(&self) -> Option<&Allocator> {
        self.allocs.first()
    }

    /// Every allocator, primary first (one per family).
    pub fn allocators(&self) -> &[Allocator] {
        &self.allocs
    }

    /// Nodes whose podCIDRs lack a family of the cluster.
    pub fn gap_count(&self) -> usize {
        self.gaps.len()
    }

    /// Nodes known.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Nodes waiting for a subnet.
    pub fn waiting_count(&self) -> usize {
        self.waiting.len()
    }

    /// Nodes whose podCIDR or addresses conflict.
    pub fn conflict_count(&self) -> usize {
        self.conflicts.len()
            + self
                .address_conflicts
                .keys()
                .filter(|n| !self.conflicts.contains_key(*n))
                .count()
    }

    /// Nodes that still need a look.
    pub fn dirty_count(&self) -> usize {
        self.dirty.len()
    }

    /// The Node as last seen.
    pub fn node(&self, name: &str) -> Option<&NodeView> {
        self.nodes.get(name)
    }

    /// A Node was added or changed.
    pub fn apply_node(&mut self, view: NodeView) {
        let name = view.name.clone();
        let key = view.age_key();
        let before = self.nodes.insert(name.clone(), view);
        let update = self
            .addresses
            .update(&name, before.as_ref(), self.nodes.get(&name));
        self.dirty.extend(update.others);
        if update.addresses_changed {
            self.sync_reserved();
        }
        if !self.allocs.is_empty() {
            self.sync_claim(&name);
        }
        self.dirty.insert(key);
    }

    /// Holds back the subnets that contain a Node address.
    fn sync_reserved(&mut self) {
        let mut grew = false;
        for alloc in &mut self.allocs {
            let before = alloc.free();
            let inside: Vec<_> = self.addresses.inside(alloc.cluster()).collect();
            alloc.set_reserved(inside);
            grew |= alloc.free() > before;
        }
        if grew {
            self.wake_waiting();
        }
    }

    /// A Node was deleted: its subnet is freed and waiting Nodes get a look.
    pub fn delete_node(&mut self, name: &str) {
        let Some(view) = self.nodes.remove(name) else {
            return;
        };
        let key = view.age_key();
        self.dirty.remove(&key);
        self.waiting.remove(&key);
        self.conflicts.remove(name);
        self.gaps.remove(name);
        self.address_conflicts.remove(name);
        let update = self.addresses.update(name, Some(&view), None);
        self.dirty.extend(update.others);
        if update.addresses_changed {
            self.sync_reserved();
        }
        // Messages about Node addresses name the Node owning their subnet.
        let named: Vec<AgeKey> = self
            .address_conflicts
            .keys()
            .filter_map(|n| self.nodes.get(n).map(NodeView::age_key))
            .collect();
        self.dirty.extend(named);
        let mut freed = false;
        for a in &mut self.allocs {
            freed |= a.release(name).is_some();
        }
        if freed {
            self.wake_waiting();
        }
    }

    /// The complete Node list after a (re)list: Nodes missing from it are
    /// deleted, the others applied oldest first. Subnets handed out but not
    /// yet visible on their Node stay held.
    pub fn reset_nodes(&mut self, mut views: Vec<NodeView>) {
        let keep: HashSet<&str> = views.iter().map(|v| v.name.as_str()).collect();
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|n| !keep.contains(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            self.delete_node(&name);
        }
        views.sort_by_key(NodeView::age_key);
        for v in views {
            self.apply_node(v);
        }
    }

    /// A CanalNetwork was added or changed.
    pub fn apply_network(&mut self, object: NetworkObject) {
        match self.networks.get_mut(&object.name) {
            Some(entry) => entry.object = object,
            None => {
                self.networks.insert(
                    object.name.clone(),
                    NetworkEntry {
                        object,
                        written: None,
                        announced: None,
                    },
                );
            }
        }
    }

    /// A CanalNetwork was deleted. The allocator and the config in force
    /// stay: nothing on the Nodes is touched.
    pub fn delete_network(&mut self, name: &str) {
        self.networks.remove(name);
    }

    /// The complete CanalNetwork list after a (re)list.
    pub fn reset_networks(&mut self, objects: Vec<NetworkObject>) {
        let keep: HashSet<String> = objects.iter().map(|o| o.name.clone()).collect();
        self.networks.retain(|n, _| keep.contains(n));
        for o in objects {
            self.apply_network(o);
        }
    }

    /// A status write succeeded.
    pub fn status_written(&mut self, name: &str, status: CanalNetworkStatus) {
        if let Some(entry) = self.networks.get_mut(name) {
            if entry.object.status.is_some() {
                entry.object.status = Some(status.clone());
            }
            entry.written = Some(status);
        }
    }

    /// A Node write succeeded and the API server answered with `view`. It
    /// replaces what the watch reported only when the watch has reported
    /// nothing since the write was planned: a response can overtake the
    /// watch event of a later change, and must not hide it.
    pub fn node_written(&mut self, based_on: Option<&str>, view: NodeView) {
        let unchanged = self
            .nodes
            .get(&view.name)
            .is_some_and(|v| v.resource_version.as_deref() == based_on);
        if unchanged {
            self.apply_node(view);
        }
    }

    /// Look at one Node again (after a failed write).
    pub fn mark_dirty(&mut self, name: &str) {
        if let Some(v) = self.nodes.get(name) {
            self.dirty.insert(v.age_key());
        }
    }

    /// Look at every Node again (periodic resync, config change).
    pub fn mark_all_dirty(&mut self) {
        self.dirty = self.nodes.values().map(NodeView::age_key).collect();
    }

    /// Decides what to write. At most `budget` Node writes are planned;
    /// Nodes in `busy` (a write in flight) are left for a later pass.
    pub fn plan(&mut self, now: Time, budget: usize, busy: &HashSet<String>) -> Plan {
        let mut plan = Plan::default();
        self.evaluate_default_network();
        if !self.allocs.is_empty() && self.live.is_some() && self.has_default() {
            let mut skipped = Vec::new();
            while plan.node_writes.len() < budget {
                let Some(key) = self.dirty.pop_first() else {
                    break;
                };
                if busy.contains(&key.1) {
                    skipped.push(key);
                    continue;
                }
                plan.nodes_reconciled += 1;
                if let Some(w) = self.process_node(&key.1, now.0) {
                    plan.node_writes.push(w);
                }
            }
            self.dirty.extend(skipped);
        }
        plan.status_writes = self.status_writes(now);
        plan.notices = std::mem::take(&mut self.notices);
        plan
    }

    fn has_default(&self) -> bool {
        self.networks.contains_key(canal_crds::DEFAULT_NETWORK_NAME)
    }

    fn network_subject(&self, name: &str) -> Subject {
        Subject::Network {
            name: name.to_string(),
            uid: self.networks.get(name).and_then(|e| e.object.uid.clone()),
        }
    }

    fn node_subject(&self, name: &str) -> Subject {
        Subject::Node {
            name: name.to_string(),
            uid: self.nodes.get(name).and_then(|v| v.uid.clone()),
        }
    }

    /// Decides the address plan and the live config from `default`.
    fn evaluate_default_network(&mut self) {
        let Some(entry) = self.networks.get(canal_crds::DEFAULT_NETWORK_NAME) else {
            self.refused.clear();
            self.invalid_spec = None;
            return;
        };
        let config = match &entry.object.spec {
            Err(e) => Err(format!(
                "the object does not match the CanalNetwork schema: {e}"
            )),
            Ok(spec) => spec.validate().map_err(|e| e.to_string()),
        };
        let config = match config {
            Err(why) => {
                self.invalid_spec = Some(why);
                return;
            }
            Ok(c) => c,
        };
        self.invalid_spec = None;
        let wanted: Vec<(IpNet, u8)> = config
            .ranges
            .iter()
            .map(|r| (r.cidr, r.subnet_len))
            .collect();

        if self.allocs.is_empty() {
            // Resume the plan recorded in status if there is one: the spec
            // may have been edited while no controller ran.
            let recorded = entry
                .object
                .status
                .as_ref()
                .map(recorded_plans)
                .filter(|plans| {
                    !plans.is_empty() && plans.iter().all(|(c, l)| Allocator::new(*c, *l).is_ok())
                });
            self.build_allocators(recorded.unwrap_or_else(|| wanted.clone()));
        }
        if self.allocs.is_empty() {
            return;
        }
        let active: Vec<InForce> = self
            .allocs
            .iter()
            .map(|a| InForce {
                cidr: a.cluster(),
                len: a.subnet_len(),
                allocated: a.allocated(),
            })
            .collect();
        let next = families::next_plans(&active, &wanted);
        let current: Vec<(IpNet, u8)> = active.iter().map(|a| (a.cidr, a.len)).collect();
        if next.plans != current {
            self.build_allocators(next.plans.clone());
        }
        for (from, to) in &next.applied {
            self.notices.push(Notice {
                subject: self.network_subject(canal_crds::DEFAULT_NETWORK_NAME),
                warning: false,
                reason: "AddressPlanApplied",
                action: "ApplyAddressPlan",
                note: families::applied_note(*from, *to),
            });
        }
        self.refused = next.refused;

        if self.live.as_ref() != Some(&config) {
            if let Some(old) = &self.live {
                let changed = changed_fields(old, &config);
                if !changed.is_empty() {
                    self.notices.push(Notice {
                        subject: self.network_subject(canal_crds::DEFAULT_NETWORK_NAME),
                        warning: false,
                        reason: "ConfigApplied",
                        action: "ApplyConfig",
                        note: format!("now in force: {}", changed.join(", ")),
                    });
                }
            }
            self.live = Some(config);
            self.mark_all_dirty();
        }
    }

    /// The allocators for `plans` (primary first): those whose plan is
    /// unchanged are kept as they are (subnets handed out but not yet seen
    /// on their Node stay held), the others are built fresh, holding every
    /// podCIDR Nodes already have.
    fn build_allocators(&mut self, plans: Vec<(IpNet, u8)>) {
        let mut old = std::mem::take(&mut self.allocs);
        for (cidr, len) in plans {
            let kept = old
                .iter()
                .position(|a| (a.cluster(), a.subnet_len()) == (cidr, len))
                .map(|i| old.swap_remove(i));
            match kept.map_or_else(|| Allocator::new(cidr, len), Ok) {
                Ok(a) => self.allocs.push(a),
                // validate() and the recorded-plan filter keep plans usable.
                Err(e) => tracing::error!(%cidr, len, error = %e, "unusable address plan"),
            }
        }
        self.sync_reserved();
        self.conflicts.clear();
        self.gaps.clear();
        self.waiting.clear();
        let mut names: Vec<AgeKey> = self.nodes.values().map(NodeView::age_key).collect();
        names.sort();
        for (_, name) in &names {
            self.sync_claim(name);
        }
        self.dirty = names.into_iter().collect();
    }

    /// Brings every allocator in line with the podCIDRs `name` shows.
    fn sync_claim(&mut self, name: &str) {
        let Some(view) = self.nodes.get(name) else {
            return;
        };
        if self.allocs.is_empty() {
            return;
        }
        let pods = view.pod_subnets();
        let key = view.age_key();
        let mut problems = Vec::new();
        let mut missing = Vec::new();
        // What was held before this look: only freeing that wakes others
        // (a claim made and undone here frees nothing anyone waited for).
        let held_before: Vec<bool> = self
            .allocs
            .iter()
            .map(|a| a.subnet_of(name).is_some())
            .collect();
        match &pods {
            PodCidrs::Unset => {}
            PodCidrs::Invalid { value, reason } => {
                problems.push(format!("podCIDR {value:?} cannot be used: {reason}"));
            }
            PodCidrs::Set(_) => {
                for alloc in &mut self.allocs {
                    let cluster = alloc.cluster();
                    let Some(subnet) = pods.of_family(&cluster) else {
                        missing.push(cluster);
                        continue;
                    };
                    match alloc.claim(name, subnet) {
                        Ok(()) => {}
                        Err(IpamError::Outside { subnet, cluster }) => problems
                            .push(format!("podCIDR {subnet} is outside clusterCIDR {cluster}")),
                        Err(IpamError::Taken {
                            subnet,
                            other,
                            other_subnet,
                        }) => problems.push(format!(
                            "podCIDR {subnet} overlaps {other_subnet} of Node {other}"
                        )),
                        Err(e) => problems.push(e.to_string()),
                    }
                }
                if missing.len() == self.allocs.len() {
                    // No family of the cluster at all: nothing to publish.
                    problems.push(format!(
                        "podCIDRs {} have no {} entry",
                        view.pod_cidrs.join(","),
                        missing
                            .iter()
                            .map(canal_crds::validate::family_name)
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ));
                    missing.clear();
                }
            }
        }
        let problem = (!problems.is_empty()).then(|| problems.join("; "));
        // A subnet handed out earlier is not what the Node has: free it.
        let mut released = false;
        if problem.is_some() {
            for (alloc, before) in self.allocs.iter_mut().zip(held_before) {
                released |= alloc.release(name).is_some() && before;
            }
        }
        let gap = (!missing.is_empty()).then(|| {
            format!(
                "its podCIDRs {} have no subnet of {} and Kubernetes never lets podCIDRs change, so its pods get no address of that family (recreate the Node to give it one)",
                view.pod_cidrs.join(","),
                missing.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            )
        });
        match gap {
            Some(why) => {
                if self.gaps.get(name) != Some(&why) {
                    self.notices.push(Notice {
                        subject: self.node_subject(name),
                        warning: true,
                        reason: "PodCIDRFamilyMissing",
                        action: "AdoptPodCIDR",
                        note: why.clone(),
                    });
                    self.gaps.insert(name.to_string(), why);
                }
            }
            None => {
                self.gaps.remove(name);
            }
        }
        match problem {
            None => {
                if pods != PodCidrs::Unset {
                    self.waiting.remove(&key);
                }
                self.conflicts.remove(name);
            }
            Some(why) => {
                self.waiting.remove(&key);
                if self.conflicts.get(name) != Some(&why) {
                    self.notices.push(Notice {
                        subject: self.node_subject(name),
                        warning: true,
                        reason: "PodCIDRConflict",
                        action: "AdoptPodCIDR",
                        note: format!(
                            "{why}; the Node is left unchanged and gets no overlay annotations"
                        ),
                    });
                    self.conflicts.insert(name.to_string(), why);
                }
            }
        }
        if released {
            self.wake_waiting();
        }
    }

    /// Freed capacity: waiting and conflicting Nodes get another look.
    fn wake_waiting(&mut self) {
        let again: Vec<AgeKey> = self
            .waiting
            .iter()
            .cloned()
            .chain(
                self.conflicts
                    .keys()
                    .filter_map(|n| self.nodes.get(n).map(NodeView::age_key)),
            )
            .collect();
        self.dirty.extend(again);
    }

    /// Decides the overlay address of `name` and records what is wrong
    /// with its addresses (an Event when that changes).
    fn assess_addresses(&mut self, name: &str, now: Timestamp) -> Option<addresses::Overlay> {
        let view = self.nodes.get(name)?;
        let mut overlay = match self
            .allocs
            .iter()
            .find(|a| matches!(a.cluster(), IpNet::V4(_)))
        {
            Some(alloc) => {
                let holder = match addresses::wanted(view) {
                    addresses::Wanted::Address(ip, _) => {
                        self.addresses.holder(std::net::IpAddr::V4(ip), &self.nodes)
                    }
                    _ => None,
                };
                addresses::decide(view, holder, alloc, now)
            }
            None => addresses::Overlay::default(),
        };
        if let Some(alloc) = self
            .allocs
            .iter()
            .find(|a| matches!(a.cluster(), IpNet::V6(_)))
        {
            let holder = addresses6::wanted_v6(view)
                .and_then(|ip| self.addresses.holder(std::net::IpAddr::V6(ip), &self.nodes));
            let o6 = addresses6::decide_v6(view, holder, alloc.cluster());
            overlay.public_ipv6 = o6.public_ipv6;
            overlay.moved_v6 = o6.moved;
            overlay.problems.extend(o6.problems);
        }
        let line = addresses::problem_line(&overlay.problems);
        if self.address_conflicts.get(name) != line.as_ref() {
            match line {
                Some(why) => {
                    self.notices.push(Notice {
                        subject: self.node_subject(name),
                        warning: true,
                        reason: "NodeAddressConflict",
                        action: "PublishNodeAddress",
                        note: why.clone(),
                    });
                    self.address_conflicts.insert(name.to_string(), why);
                }
                None => {
                    self.address_conflicts.remove(name);
                }
            }
        }
        Some(overlay)
    }

    fn process_node(&mut self, name: &str, now: Timestamp) -> Option<NodeWrite> {
        self.sync_claim(name);
        let overlay = self.assess_addresses(name, now)?;
        let view = self.nodes.get(name)?;
        let live = self.live.as_ref()?;
        if view.deleting {
            return None;
        }
        let key = view.age_key();
        match view.pod_subnets() {
            PodCidrs::Set(_) if self.conflicts.contains_key(name) => None,
            PodCidrs::Set(nets) => {
                // Every family the Node has must be the one its allocator holds.
                let mut subnets = Vec::new();
                for alloc in &self.allocs {
                    let Some(subnet) = nets.iter().find(|n| same_family(n, &alloc.cluster()))
                    else {
                        continue;
                    };
                    if alloc.subnet_of(name) != Some(*subnet) {
                        return None;
                    }
                    subnets.push(*subnet);
                }
                let apply = vtep::desired(view, &subnets, live, &overlay);
                if vtep::is_current(view, &apply) {
                    return None;
                }
                let kind = if vtep::is_unpublished(view) {
                    WriteKind::Adopt(subnets)
                } else {
                    WriteKind::Update
                };
                Some(NodeWrite {
                    apply,
                    kind,
                    based_on: view.resource_version.clone(),
                    moved: overlay.moved.clone(),
                    moved_v6: overlay.moved_v6.clone(),
                })
            }
            PodCidrs::Invalid { .. } => None,
            PodCidrs::Unset => {
                // One subnet of every family, or none: podCIDRs are set once,
                // so a Node given only some families would keep that forever.
                let mut subnets = Vec::new();
                let mut failed = None;
                for alloc in &mut self.allocs {
                    match alloc.allocate(name) {
                        Ok(s) => subnets.push(s),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                match failed {
                    None => {
                        self.waiting.remove(&key);
                        Some(NodeWrite {
                            apply: vtep::desired(view, &subnets, live, &overlay),
                            kind: WriteKind::Allocate(subnets),
                            based_on: view.resource_version.clone(),
                            moved: overlay.moved,
                            moved_v6: overlay.moved_v6,
                        })
                    }
                    Some(e) => {
                        for alloc in &mut self.allocs {
                            alloc.release(name);
                        }
                        if self.waiting.insert(key) {
                            let note = format!(
                                "no pod subnet for this Node: {e}; it gets one as soon as a Node is deleted"
                            );
                            self.notices.push(Notice {
                                subject: self.node_subject(name),
                                warning: true,
                                reason: "SubnetExhausted",
                                action: "AllocatePodCIDR",
                                note,
                            });
                        }
                        None
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod dual_tests;
