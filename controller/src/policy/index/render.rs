//! Rendering the objects a flush asked for, one at a time as they are
//! written (memory does not grow with the output): NodePolicySets that name
//! their PolicyGroups, and PeerSets and PolicyGroups as a head with their
//! members inline or as a head and slices.

use std::collections::BTreeSet;
use std::net::IpAddr;

use canal_crds::sharding::{hash_text, head_of_slice, slice_name, slice_prefix};
use canal_crds::{
    GroupPolicy, NamedPort, NodeEndpoint, NodePolicySetObjectSpec, PeerSetObjectSpec,
    PolicyGroupSpec, PortMember, VersionRef,
};

use super::super::fingerprint::{self, Fingerprint};
use super::super::objects;
use super::super::shard::{Leaf, Shards};
use super::flush::{Kind, slice_fp};
use super::{GroupId, NodeId, PodId, PolicyIndex, SetId};
use crate::policy::compile::PeerKey;

/// A NodePolicySet ready to write.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderedNodePolicySet {
    /// The spec.
    pub spec: NodePolicySetObjectSpec,
    /// Desired-state fingerprint (for the annotation and `mark_written`).
    pub fingerprint: Fingerprint,
}

/// A PeerSet head or slice ready to write.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderedPeerSet {
    /// The spec.
    pub spec: PeerSetObjectSpec,
    /// Desired-state fingerprint.
    pub fingerprint: Fingerprint,
}

/// A PolicyGroup head or slice ready to write.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderedPolicyGroup {
    /// The spec.
    pub spec: PolicyGroupSpec,
    /// Desired-state fingerprint.
    pub fingerprint: Fingerprint,
}

/// The 64-bit version text of a fingerprint (what `spec.hash` and
/// references carry).
fn version(fp: Fingerprint) -> String {
    hash_text(fp as u64)
}

/// The current slice a name stands for, if the head is sharded and the
/// name is one of its slices now.
fn current_leaf(shards: &Shards, name: &str) -> Option<Leaf> {
    let (depth, prefix) = slice_prefix(name)?;
    if !shards.is_sharded() {
        return None;
    }
    let leaf = Leaf { depth, prefix };
    shards.is_current(leaf).then_some(leaf)
}

impl PolicyIndex {
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

    /// Builds the NodePolicySet of a node, or None when it should not exist.
    pub fn render_node_policy_set(&self, name: &str) -> Option<RenderedNodePolicySet> {
        let &id = self.node_by_name.get(name)?;
        let node = &self.nodes[id];
        if !node.exists {
            return None;
        }
        let eps = self.sorted_endpoints(id);
        let mut groups: BTreeSet<(&str, GroupId)> = BTreeSet::new();
        let mut endpoints = Vec::with_capacity(eps.len());
        for &pid in &eps {
            let p = &self.pods[pid];
            let ns = &self.namespaces[p.ns].name;
            endpoints.push(NodeEndpoint {
                namespace: ns.to_string(),
                pod: p.name.to_string(),
                interface: canal_crds::names::veth_name(ns, &p.name),
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
                policy_groups: p
                    .groups
                    .iter()
                    .map(|&g| self.groups[g].name.to_string())
                    .collect(),
                ingress_policies: Vec::new(),
                egress_policies: Vec::new(),
            });
            groups.extend(p.groups.iter().map(|&g| (&*self.groups[g].name, g)));
        }
        let policy_groups = groups
            .into_iter()
            .map(|(name, g)| VersionRef {
                name: name.to_string(),
                hash: version(self.group_head_fp(g)),
            })
            .collect();
        Some(RenderedNodePolicySet {
            spec: NodePolicySetObjectSpec {
                endpoints,
                policy_groups,
                policies: Vec::new(),
            },
            fingerprint: self.node_fp(id),
        })
    }

    /// Builds a PeerSet head or slice, or None when it should not exist.
    pub fn render_peer_set(&self, name: &str) -> Option<RenderedPeerSet> {
        if let Some(&id) = self.set_by_name.get(name) {
            return Some(self.render_set_head(id));
        }
        let head = head_of_slice(name)?;
        let &id = self.set_by_name.get(head)?;
        let leaf = current_leaf(self.set_shards(id)?, name)?;
        Some(self.render_set_slice(id, leaf))
    }

    /// Members of a set in one slice (ROOT: all), sorted.
    fn set_members(&self, id: SetId, leaf: Leaf) -> (Vec<String>, Vec<PortMember>) {
        let set = &self.sets[id];
        match &set.key {
            PeerKey::Pods { .. } => {
                let ips = set
                    .ips
                    .keys()
                    .filter(|&&ip| leaf.contains(fingerprint::ip_member(ip)))
                    .map(IpAddr::to_string)
                    .collect();
                (ips, Vec::new())
            }
            PeerKey::NamedPort { name, protocol } => {
                let ports = self
                    .named_ports
                    .get(&(name.clone(), *protocol))
                    .map(|e| {
                        e.members
                            .keys()
                            .filter(|&&(ip, port)| {
                                leaf.contains(fingerprint::port_member(ip, *protocol, port))
                            })
                            .map(|&(ip, port)| PortMember {
                                ip: ip.to_string(),
                                protocol: *protocol,
                                port,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                (Vec::new(), ports)
            }
        }
    }

    fn render_set_head(&self, id: SetId) -> RenderedPeerSet {
        let set = &self.sets[id];
        let fp = self.set_fp(id);
        let mut spec = PeerSetObjectSpec {
            selector: set.key.peer_selector(),
            member_count: 0,
            hash: version(fp),
            ..PeerSetObjectSpec::default()
        };
        match self.set_shards(id) {
            Some(shards) if shards.is_sharded() => {
                spec.member_count = shards.total().count;
                spec.slices = shards
                    .leaves()
                    .into_iter()
                    .map(|(leaf, st)| VersionRef {
                        name: slice_name(&set.name, leaf.depth, leaf.prefix),
                        hash: version(slice_fp("peerset-slice", &set.name, leaf, st)),
                    })
                    .collect();
            }
            _ => {
                let (ips, ports) = self.set_members(id, Leaf::ROOT);
                spec.member_count = u32::try_from(ips.len() + ports.len()).unwrap_or(u32::MAX);
                spec.ips = ips;
                spec.ports = ports;
            }
        }
        RenderedPeerSet {
            spec,
            fingerprint: fp,
        }
    }

    fn render_set_slice(&self, id: SetId, leaf: Leaf) -> RenderedPeerSet {
        let set = &self.sets[id];
        let st = self
            .set_shards(id)
            .map(|s| s.leaf_stats(leaf))
            .unwrap_or_default();
        let fp = slice_fp("peerset-slice", &set.name, leaf, st);
        let (ips, ports) = self.set_members(id, leaf);
        RenderedPeerSet {
            spec: PeerSetObjectSpec {
                member_count: u32::try_from(ips.len() + ports.len()).unwrap_or(u32::MAX),
                hash: version(fp),
                ips,
                ports,
                slice_of: Some(set.name.to_string()),
                ..PeerSetObjectSpec::default()
            },
            fingerprint: fp,
        }
    }

    /// Builds a PolicyGroup head or slice, or None when it should not exist.
    pub fn render_policy_group(&self, name: &str) -> Option<RenderedPolicyGroup> {
        if let Some(&id) = self.group_by_name.get(name) {
            return self
                .group_is_written(id)
                .then(|| self.render_group_head(id));
        }
        let head = head_of_slice(name)?;
        let &id = self.group_by_name.get(head)?;
        if !self.group_is_written(id) {
            return None;
        }
        let leaf = current_leaf(&self.groups[id].shards, name)?;
        Some(self.render_group_slice(id, leaf))
    }

    fn group_is_written(&self, id: GroupId) -> bool {
        let g = &self.groups[id];
        !g.span.is_empty() && !g.policies.is_empty()
    }

    /// The parts of a group's policies in one slice (ROOT: all), sorted by
    /// policy name and part.
    fn group_parts_in(&self, id: GroupId, leaf: Leaf) -> Vec<GroupPolicy> {
        let g = &self.groups[id];
        let part_bytes = self.limits.policy_part_bytes();
        let mut out = Vec::new();
        for &p in &g.policies {
            let Some(a) = &self.policies[p].active else {
                continue;
            };
            if !a.parts.iter().any(|k| leaf.contains(k.position)) {
                continue;
            }
            let parts = objects::group_parts(&a.compiled, a.ingress, a.egress, part_bytes);
            out.extend(
                parts
                    .into_iter()
                    .zip(a.parts.iter())
                    .filter(|(_, k)| leaf.contains(k.position))
                    .map(|(part, _)| part),
            );
        }
        out
    }

    fn render_group_head(&self, id: GroupId) -> RenderedPolicyGroup {
        let g = &self.groups[id];
        let fp = self.group_head_fp(id);
        let mut spec = PolicyGroupSpec {
            namespace: self.namespaces[g.ns].name.to_string(),
            pod_selector: Some(g.selector.to_label_selector()),
            hash: version(fp),
            policy_count: u32::try_from(g.policies.len()).unwrap_or(u32::MAX),
            ..PolicyGroupSpec::default()
        };
        if g.shards.is_sharded() {
            spec.slices = g
                .shards
                .leaves()
                .into_iter()
                .map(|(leaf, st)| VersionRef {
                    name: slice_name(&g.name, leaf.depth, leaf.prefix),
                    hash: version(slice_fp("policygroup-slice", &g.name, leaf, st)),
                })
                .collect();
        } else {
            spec.policies = self.group_parts_in(id, Leaf::ROOT);
        }
        RenderedPolicyGroup {
            spec,
            fingerprint: fp,
        }
    }

    fn render_group_slice(&self, id: GroupId, leaf: Leaf) -> RenderedPolicyGroup {
        let g = &self.groups[id];
        let fp = slice_fp(
            "policygroup-slice",
            &g.name,
            leaf,
            g.shards.leaf_stats(leaf),
        );
        RenderedPolicyGroup {
            spec: PolicyGroupSpec {
                hash: version(fp),
                policies: self.group_parts_in(id, leaf),
                slice_of: Some(g.name.to_string()),
                ..PolicyGroupSpec::default()
            },
            fingerprint: fp,
        }
    }

    /// The nodes whose policy depends on an object (for saying which nodes
    /// a write that failed affects): a NodePolicySet's node, the nodes a
    /// PolicyGroup's policies select pods on, the nodes whose policies
    /// reference a PeerSet. Sorted.
    pub fn nodes_depending_on(&self, kind: Kind, name: &str) -> Vec<String> {
        let head = kind.head_of(name);
        let mut nodes: BTreeSet<NodeId> = BTreeSet::new();
        match kind {
            Kind::NodePolicySet => return vec![name.to_string()],
            Kind::PolicyGroup => {
                if let Some(&g) = self.group_by_name.get(head) {
                    nodes.extend(self.groups[g].span.keys().copied());
                }
            }
            Kind::PeerSet => {
                if let Some(&s) = self.set_by_name.get(head) {
                    for (_, p) in self.policies.iter() {
                        if let Some(a) = &p.active
                            && a.sets.contains(&s)
                        {
                            nodes.extend(self.groups[a.group].span.keys().copied());
                        }
                    }
                }
            }
        }
        let mut out: Vec<String> = nodes
            .into_iter()
            .filter(|&n| self.nodes[n].exists)
            .map(|n| self.nodes[n].name.to_string())
            .collect();
        out.sort();
        out
    }

    /// The PolicyGroup heads a node's NodePolicySet names (what it waits on).
    pub fn groups_of_node(&self, name: &str) -> Vec<String> {
        let Some(&id) = self.node_by_name.get(name) else {
            return Vec::new();
        };
        let mut out: BTreeSet<&str> = BTreeSet::new();
        for &p in &self.nodes[id].pods {
            out.extend(self.pods[p].groups.iter().map(|&g| &*self.groups[g].name));
        }
        out.into_iter().map(String::from).collect()
    }
}
