//! From the stored objects to what a node enforces: pure functions that
//! assemble a NodePolicySet, the PolicyGroups it names and the PeerSets
//! they reference into the complete [`NodePolicySetSpec`] and
//! [`PeerSetSpec`]s, or say precisely what is missing or out of step.
//!
//! A view is *consistent* when every reference holds: each PolicyGroup a
//! NodePolicySet names is there at the hash named, and each slice a head
//! lists is there at the hash listed. Only consistent views are returned,
//! so a reader never combines half of a new version with half of an old
//! one. canal-agent uses these to decide what to program; tools (`kubectl
//! canal explain`) use them to show what a node enforces.

use std::collections::{BTreeMap, BTreeSet};

use crate::node_policy_set::{
    CompiledPolicy, Endpoint, NodePolicySetObjectSpec, NodePolicySetSpec,
};
use crate::peer_set::{PeerSetObjectSpec, PeerSetSpec};
use crate::policy_group::{GroupPolicy, PolicyGroupSpec};
use crate::sharding::VersionRef;

/// Why a view is not (yet) consistent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Gap {
    /// A referenced object is not there.
    #[error("{kind} {name} is missing")]
    Missing {
        /// Kind of the object.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A referenced object is there at another version.
    #[error("{kind} {name} has hash {have:?}, the reference needs {want:?}")]
    Stale {
        /// Kind of the object.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The hash referenced.
        want: String,
        /// The hash the object has.
        have: String,
    },
    /// The objects contradict each other.
    #[error("{kind} {name}: {why}")]
    Invalid {
        /// Kind of the object.
        kind: &'static str,
        /// Its name.
        name: String,
        /// What is wrong.
        why: String,
    },
}

impl Gap {
    /// The object the gap is about.
    pub fn object(&self) -> (&'static str, &str) {
        match self {
            Gap::Missing { kind, name }
            | Gap::Stale { kind, name, .. }
            | Gap::Invalid { kind, name, .. } => (kind, name),
        }
    }
}

const PEER_SET: &str = "PeerSet";
const POLICY_GROUP: &str = "PolicyGroup";
const NODE_POLICY_SET: &str = "NodePolicySet";

/// Looks up slices and checks them against a head's list; returns them in
/// list order, or every gap.
fn resolve<'a, T>(
    kind: &'static str,
    head: &str,
    refs: &[VersionRef],
    lookup: &impl Fn(&str) -> Option<&'a T>,
    hash_of: impl Fn(&T) -> (&str, Option<&str>),
) -> Result<Vec<&'a T>, Vec<Gap>> {
    let mut found = Vec::with_capacity(refs.len());
    let mut gaps = Vec::new();
    for r in refs {
        match lookup(&r.name) {
            None => gaps.push(Gap::Missing {
                kind,
                name: r.name.clone(),
            }),
            Some(obj) => {
                let (hash, slice_of) = hash_of(obj);
                if hash != r.hash {
                    gaps.push(Gap::Stale {
                        kind,
                        name: r.name.clone(),
                        want: r.hash.clone(),
                        have: hash.to_string(),
                    });
                } else if slice_of.is_some_and(|h| h != head) {
                    gaps.push(Gap::Invalid {
                        kind,
                        name: r.name.clone(),
                        why: format!("is a slice of {:?}, listed by {head}", slice_of),
                    });
                } else {
                    found.push(obj);
                }
            }
        }
    }
    if gaps.is_empty() {
        Ok(found)
    } else {
        Err(gaps)
    }
}

/// The members of the PeerSet `name` (head `head`), with its slices looked
/// up by name.
pub fn assemble_peer_set<'a>(
    name: &str,
    head: &PeerSetObjectSpec,
    slice: impl Fn(&str) -> Option<&'a PeerSetObjectSpec>,
) -> Result<PeerSetSpec, Vec<Gap>> {
    let mut spec = PeerSetSpec {
        selector: head.selector.clone(),
        member_count: head.member_count,
        ips: head.ips.clone(),
        ports: head.ports.clone(),
    };
    if head.slices.is_empty() {
        return Ok(spec);
    }
    let slices = resolve(
        PEER_SET,
        name,
        &head.slices,
        &slice,
        |s: &PeerSetObjectSpec| (s.hash.as_str(), s.slice_of.as_deref()),
    )?;
    let total: usize = slices.iter().map(|s| s.ips.len() + s.ports.len()).sum();
    spec.ips.reserve(total);
    for s in slices {
        spec.ips.extend(s.ips.iter().cloned());
        spec.ports.extend(s.ports.iter().cloned());
    }
    let held = spec.ips.len() + spec.ports.len();
    if held != head.member_count as usize {
        return Err(vec![Gap::Invalid {
            kind: PEER_SET,
            name: name.to_string(),
            why: format!(
                "the head counts {} members, its slices hold {held}",
                head.member_count
            ),
        }]);
    }
    Ok(spec)
}

/// The slices a head lists (empty: members inline).
pub fn peer_set_slices(head: &PeerSetObjectSpec) -> impl Iterator<Item = &str> {
    head.slices.iter().map(|r| r.name.as_str())
}

/// The policies of PolicyGroup `name` (head `head`), with its slices looked
/// up by name, in head-then-slice order.
pub fn assemble_group<'a>(
    name: &str,
    head: &'a PolicyGroupSpec,
    slice: impl Fn(&str) -> Option<&'a PolicyGroupSpec>,
) -> Result<Vec<&'a GroupPolicy>, Vec<Gap>> {
    let mut out: Vec<&GroupPolicy> = head.policies.iter().collect();
    if head.slices.is_empty() {
        return Ok(out);
    }
    let slices = resolve(
        POLICY_GROUP,
        name,
        &head.slices,
        &slice,
        |s: &PolicyGroupSpec| (s.hash.as_str(), s.slice_of.as_deref()),
    )?;
    for s in slices {
        out.extend(s.policies.iter());
    }
    Ok(out)
}

/// The PolicyGroup heads a NodePolicySet names.
pub fn node_groups(nps: &NodePolicySetObjectSpec) -> impl Iterator<Item = &VersionRef> {
    nps.policy_groups.iter()
}

/// What a node enforces: the NodePolicySet `name` with the PolicyGroups it
/// names (heads and slices, looked up by name), checked to be consistent.
pub fn assemble_node<'a>(
    name: &str,
    nps: &NodePolicySetObjectSpec,
    group: impl Fn(&str) -> Option<&'a PolicyGroupSpec>,
) -> Result<NodePolicySetSpec, Vec<Gap>> {
    let mut gaps = Vec::new();
    // Group name -> its policies; then merge parts by policy name.
    let mut by_group: BTreeMap<&str, Vec<&GroupPolicy>> = BTreeMap::new();
    for r in &nps.policy_groups {
        let Some(head) = group(&r.name) else {
            gaps.push(Gap::Missing {
                kind: POLICY_GROUP,
                name: r.name.clone(),
            });
            continue;
        };
        if head.hash != r.hash {
            gaps.push(Gap::Stale {
                kind: POLICY_GROUP,
                name: r.name.clone(),
                want: r.hash.clone(),
                have: head.hash.clone(),
            });
            continue;
        }
        if head.slice_of.is_some() {
            gaps.push(Gap::Invalid {
                kind: POLICY_GROUP,
                name: r.name.clone(),
                why: "is a slice, named by a NodePolicySet as a group".into(),
            });
            continue;
        }
        match assemble_group(&r.name, head, &group) {
            Ok(policies) => {
                by_group.insert(&r.name, policies);
            }
            Err(g) => gaps.extend(g),
        }
    }
    if !gaps.is_empty() {
        return Err(gaps);
    }
    let mut parts: BTreeMap<&str, Vec<&GroupPolicy>> = BTreeMap::new();
    for policies in by_group.values() {
        for p in policies {
            parts.entry(&p.name).or_default().push(p);
        }
    }
    let mut policies: Vec<CompiledPolicy> = Vec::with_capacity(parts.len() + nps.policies.len());
    for (policy, mut list) in parts {
        list.sort_by_key(|p| p.part);
        let types = &list[0].policy_types;
        if list.iter().any(|p| p.policy_types != *types) {
            gaps.push(Gap::Invalid {
                kind: POLICY_GROUP,
                name: policy.to_string(),
                why: "its parts disagree on policyTypes".into(),
            });
            continue;
        }
        policies.push(CompiledPolicy {
            name: policy.to_string(),
            ingress: list
                .iter()
                .flat_map(|p| p.ingress.iter().cloned())
                .collect(),
            egress: list.iter().flat_map(|p| p.egress.iter().cloned()).collect(),
        });
    }
    policies.extend(nps.policies.iter().cloned());
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = policies.windows(2).find(|w| w[0].name == w[1].name) {
        gaps.push(Gap::Invalid {
            kind: NODE_POLICY_SET,
            name: name.to_string(),
            why: format!("policy {} is both inline and in a PolicyGroup", w[0].name),
        });
    }
    let listed: BTreeSet<&str> = nps.policy_groups.iter().map(|r| r.name.as_str()).collect();
    // Isolation lists are the same for every endpoint in the same groups.
    let mut lists: BTreeMap<&[String], (Vec<String>, Vec<String>)> = BTreeMap::new();
    let mut endpoints = Vec::with_capacity(nps.endpoints.len());
    for e in &nps.endpoints {
        if let Some(g) = e
            .policy_groups
            .iter()
            .find(|g| !listed.contains(g.as_str()))
        {
            gaps.push(Gap::Invalid {
                kind: NODE_POLICY_SET,
                name: name.to_string(),
                why: format!(
                    "endpoint {}/{} names PolicyGroup {g}, which spec.policyGroups does not list",
                    e.namespace, e.pod
                ),
            });
            continue;
        }
        let (group_ingress, group_egress) = lists
            .entry(&e.policy_groups)
            .or_insert_with(|| {
                let (mut ingress, mut egress) = (Vec::new(), Vec::new());
                for g in &e.policy_groups {
                    for p in by_group.get(g.as_str()).into_iter().flatten() {
                        if p.part != 0 {
                            continue;
                        }
                        if p.isolates_ingress() {
                            ingress.push(p.name.clone());
                        }
                        if p.isolates_egress() {
                            egress.push(p.name.clone());
                        }
                    }
                }
                (ingress, egress)
            })
            .clone();
        let mut ingress_policies = group_ingress;
        ingress_policies.extend(e.ingress_policies.iter().cloned());
        ingress_policies.sort();
        ingress_policies.dedup();
        let mut egress_policies = group_egress;
        egress_policies.extend(e.egress_policies.iter().cloned());
        egress_policies.sort();
        egress_policies.dedup();
        endpoints.push(Endpoint {
            namespace: e.namespace.clone(),
            pod: e.pod.clone(),
            interface: e.interface.clone(),
            ips: e.ips.clone(),
            named_ports: e.named_ports.clone(),
            ingress_policies,
            egress_policies,
        });
    }
    if !gaps.is_empty() {
        return Err(gaps);
    }
    Ok(NodePolicySetSpec {
        endpoints,
        policies,
    })
}

/// Every PeerSet a node's policies reference (peers and egress named ports).
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

/// A node's complete view: its policy and every PeerSet it references.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    /// The assembled NodePolicySet.
    pub node: NodePolicySetSpec,
    /// The referenced PeerSets, assembled, by name.
    pub peer_sets: BTreeMap<String, PeerSetSpec>,
}

/// Assembles a node's view from maps of the objects (all PolicyGroups and
/// PeerSets, heads and slices, by name). Every gap is returned, a missing
/// PeerSet included; readers that treat a missing set as empty (the agent)
/// use [`assemble_node`] and [`assemble_peer_set`] directly.
pub fn assemble_view(
    name: &str,
    nps: &NodePolicySetObjectSpec,
    groups: &BTreeMap<String, PolicyGroupSpec>,
    peer_sets: &BTreeMap<String, PeerSetObjectSpec>,
) -> Result<View, Vec<Gap>> {
    let node = assemble_node(name, nps, |n| groups.get(n))?;
    let mut gaps = Vec::new();
    let mut sets = BTreeMap::new();
    for set in referenced_peer_sets(&node) {
        let Some(head) = peer_sets.get(&set) else {
            gaps.push(Gap::Missing {
                kind: PEER_SET,
                name: set,
            });
            continue;
        };
        match assemble_peer_set(&set, head, |n| peer_sets.get(n)) {
            Ok(spec) => {
                sets.insert(set, spec);
            }
            Err(g) => gaps.extend(g),
        }
    }
    if gaps.is_empty() {
        Ok(View {
            node,
            peer_sets: sets,
        })
    } else {
        Err(gaps)
    }
}

#[cfg(test)]
mod tests;
