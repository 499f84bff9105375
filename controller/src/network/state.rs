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
use ipnet::Ipv4Net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::addresses::{self, AddressIndex, Move};
use crate::ipam::{Allocator, IpamError};
use crate::node_view::{NodeView, PodCidr};
use crate::status::{self, ActivePlan, Assessment, RefusedChange};
use crate::vtep::{self, NodeApply};

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
    /// Sets a newly allocated podCIDR.
    Allocate(Ipv4Net),
    /// Publishes a podCIDR the Node already had.
    Adopt(Ipv4Net),
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
    alloc: Option<Allocator>,
    live: Option<NetworkConfig>,
    dirty: BTreeSet<AgeKey>,
    waiting: BTreeSet<AgeKey>,
    conflicts: BTreeMap<String, String>,
    /// Nodes whose addresses conflict (inside clusterCIDR, another Node's
    /// overlay address, unusable): name -> why.
    address_conflicts: BTreeMap<String, String>,
    addresses: AddressIndex,
    refused: Option<RefusedChange>,
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

    /// The allocator, once an address plan is in force.
    pub fn allocator(&self) -> Option<&Allocator> {
        self.alloc.as_ref()
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
        if self.alloc.is_some() {
            self.sync_claim(&name);
        }
        self.dirty.insert(key);
    }

    /// Holds back the subnets that contain a Node address.
    fn sync_reserved(&mut self) {
        let Some(alloc) = self.alloc.as_mut() else {
            return;
        };
        let before = alloc.free();
        let inside: Vec<_> = self.addresses.inside(alloc.cluster()).collect();
        alloc.set_reserved(inside);
        if alloc.free() > before {
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
        let freed = self.alloc.as_mut().and_then(|a| a.release(name));
        if freed.is_some() {
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
        if self.alloc.is_some() && self.live.is_some() && self.has_default() {
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
            self.refused = None;
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
        let wanted = (config.cluster_cidr, config.node_subnet_length);

        if self.alloc.is_none() {
            // Resume the plan recorded in status if there is one: the spec
            // may have been edited while no controller ran.
            let recorded = entry
                .object
                .status
                .as_ref()
                .and_then(|s| {
                    Some((
                        s.active_cluster_cidr.as_ref()?,
                        s.active_node_subnet_length?,
                    ))
                })
                .and_then(|(cidr, len)| Some((cidr.parse::<Ipv4Net>().ok()?, len)))
                .filter(|(cidr, len)| Allocator::new(*cidr, *len).is_ok());
            self.build_allocator(recorded.unwrap_or(wanted));
        }
        let Some(alloc) = &self.alloc else {
            return;
        };
        let active = (alloc.cluster(), alloc.subnet_len());
        if active != wanted {
            if alloc.allocated() == 0 {
                self.build_allocator(wanted);
                self.refused = None;
                self.notices.push(Notice {
                    subject: self.network_subject(canal_crds::DEFAULT_NETWORK_NAME),
                    warning: false,
                    reason: "AddressPlanApplied",
                    action: "ApplyAddressPlan",
                    note: format!(
                        "clusterCIDR {} with nodeSubnetLength {} is now in force (was {} with {}); no subnet was allocated",
                        wanted.0, wanted.1, active.0, active.1
                    ),
                });
            } else {
                self.refused = Some(RefusedChange {
                    active,
                    wanted,
                    allocated: alloc.allocated(),
                });
            }
        } else {
            self.refused = None;
        }

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

    /// A fresh allocator for `plan`, holding every podCIDR Nodes already have.
    fn build_allocator(&mut self, (cidr, len): (Ipv4Net, u8)) {
        let Ok(alloc) = Allocator::new(cidr, len) else {
            return;
        };
        self.alloc = Some(alloc);
        self.sync_reserved();
        self.conflicts.clear();
        self.waiting.clear();
        let mut names: Vec<AgeKey> = self.nodes.values().map(NodeView::age_key).collect();
        names.sort();
        for (_, name) in &names {
            self.sync_claim(name);
        }
        self.dirty = names.into_iter().collect();
    }

    /// Brings the allocator in line with the podCIDR `name` shows.
    fn sync_claim(&mut self, name: &str) {
        let Some(view) = self.nodes.get(name) else {
            return;
        };
        let Some(alloc) = self.alloc.as_mut() else {
            return;
        };
        let pod = view.pod_subnet();
        let key = view.age_key();
        let problem = match &pod {
            PodCidr::Unset => None,
            PodCidr::V4(subnet) => match alloc.claim(name, *subnet) {
                Ok(()) => None,
                Err(IpamError::Outside { subnet, cluster }) => {
                    Some(format!("podCIDR {subnet} is outside clusterCIDR {cluster}"))
                }
                Err(IpamError::Taken {
                    subnet,
                    other,
                    other_subnet,
                }) => Some(format!(
                    "podCIDR {subnet} overlaps {other_subnet} of Node {other}"
                )),
                Err(e) => Some(e.to_string()),
            },
            PodCidr::Invalid { value, reason } => {
                Some(format!("podCIDR {value:?} cannot be used: {reason}"))
            }
        };
        // A subnet handed out earlier is not what the Node has: free it.
        let released = problem.is_some() && alloc.release(name).is_some();
        match problem {
            None => {
                if pod != PodCidr::Unset {
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
        let alloc = self.alloc.as_ref()?;
        let holder = match addresses::wanted(view) {
            addresses::Wanted::Address(ip, _) => self.addresses.holder(ip, &self.nodes),
            _ => None,
        };
        let overlay = addresses::decide(view, holder, alloc, now);
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
        let alloc = self.alloc.as_mut()?;
        if view.deleting {
            return None;
        }
        let key = view.age_key();
        match view.pod_subnet() {
            PodCidr::V4(subnet) => {
                if self.conflicts.contains_key(name) || alloc.subnet_of(name) != Some(subnet) {
                    return None;
                }
                let apply = vtep::desired(view, subnet, live, &overlay);
                if vtep::is_current(view, &apply) {
                    return None;
                }
                let kind = if vtep::is_unpublished(view) {
                    WriteKind::Adopt(subnet)
                } else {
                    WriteKind::Update
                };
                Some(NodeWrite {
                    apply,
                    kind,
                    based_on: view.resource_version.clone(),
                    moved: overlay.moved,
                })
            }
            PodCidr::Invalid { .. } => None,
            PodCidr::Unset => match alloc.allocate(name) {
                Ok(subnet) => {
                    self.waiting.remove(&key);
                    Some(NodeWrite {
                        apply: vtep::desired(view, subnet, live, &overlay),
                        kind: WriteKind::Allocate(subnet),
                        based_on: view.resource_version.clone(),
                        moved: overlay.moved,
                    })
                }
                Err(e) => {
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
            },
        }
    }

    fn assessment(&self, generation: Option<i64>) -> Assessment {
        let active = self.alloc.as_ref().map(|a| ActivePlan {
            cluster_cidr: a.cluster(),
            node_subnet_length: a.subnet_len(),
            total: a.total(),
            allocated: a.allocated(),
            free: a.free(),
        });
        Assessment {
            generation,
            invalid_spec: self.invalid_spec.clone(),
            refused: self.refused.clone(),
            active,
            waiting: self.waiting.iter().map(|(_, n)| n.clone()).collect(),
            conflicts: self
                .conflicts
                .iter()
                .map(|(n, why)| (n.clone(), why.clone()))
                .collect(),
            programmed: Some(super::programmed::summarize(self.nodes.values())),
            address_conflicts: self
                .address_conflicts
                .iter()
                .map(|(n, why)| (n.clone(), why.clone()))
                .collect(),
        }
    }

    fn status_writes(&mut self, now: Time) -> Vec<StatusWrite> {
        let mut writes = Vec::new();
        let names: Vec<String> = self.networks.keys().cloned().collect();
        for name in names {
            let entry = &self.networks[&name];
            let existing = entry
                .object
                .status
                .clone()
                .or_else(|| entry.written.clone())
                .unwrap_or_default();
            let generation = entry.object.generation;
            let derived = if name == canal_crds::DEFAULT_NETWORK_NAME {
                status::derive(&self.assessment(generation), &existing, now.clone())
            } else {
                status::ignored(generation, &existing, now.clone())
            };
            let reason = status::reason(&derived).map(str::to_string);
            let announce = reason != entry.announced;
            if derived != status::owned_part(&existing) {
                writes.push(StatusWrite {
                    name: name.clone(),
                    status: derived.clone(),
                });
            }
            if announce {
                if let Some(r) = &reason {
                    let message = canal_crds::condition::find(
                        &derived.conditions,
                        canal_crds::condition::DEGRADED,
                    )
                    .map(|c| c.message.clone())
                    .unwrap_or_default();
                    self.notices.push(Notice {
                        subject: self.network_subject(&name),
                        warning: true,
                        reason: degraded_reason(r),
                        action: "ReconcileNetwork",
                        note: message,
                    });
                }
                if let Some(entry) = self.networks.get_mut(&name) {
                    entry.announced = reason;
                }
            }
        }
        writes
    }
}

/// Maps a Degraded reason to the static string Events need.
fn degraded_reason(reason: &str) -> &'static str {
    match reason {
        status::INVALID_SPEC => status::INVALID_SPEC,
        status::LIVE_CHANGE_REFUSED => status::LIVE_CHANGE_REFUSED,
        status::CONFLICT => status::CONFLICT,
        status::SUBNET_EXHAUSTED => status::SUBNET_EXHAUSTED,
        status::IGNORED => status::IGNORED,
        status::NODES_NOT_PROGRAMMED => status::NODES_NOT_PROGRAMMED,
        _ => "Degraded",
    }
}

/// Human-readable list of live settings that differ.
fn changed_fields(old: &NetworkConfig, new: &NetworkConfig) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{name} {a} -> {b}"));
        }
    };
    field(
        "backend.type",
        old.backend.as_str().into(),
        new.backend.as_str().into(),
    );
    field("backend.vni", old.vni.to_string(), new.vni.to_string());
    field("backend.port", old.port.to_string(), new.port.to_string());
    field(
        "backend.directRouting",
        old.direct_routing.to_string(),
        new.direct_routing.to_string(),
    );
    field(
        "backend.mtu",
        old.mtu.unwrap_or(0).to_string(),
        new.mtu.unwrap_or(0).to_string(),
    );
    field(
        "masquerade",
        old.masquerade.to_string(),
        new.masquerade.to_string(),
    );
    field(
        "interface",
        old.interface.clone().unwrap_or_default(),
        new.interface.clone().unwrap_or_default(),
    );
    field(
        "defaultEndpointToHostAction",
        format!("{:?}", old.endpoint_to_host),
        format!("{:?}", new.endpoint_to_host),
    );
    field(
        "policy.enabled",
        old.policy_enabled.to_string(),
        new.policy_enabled.to_string(),
    );
    out
}

#[cfg(test)]
mod tests;
