//! `PeerSet`: the members one distinct NetworkPolicy peer selector matches,
//! shared by every node that needs it. A pod event rewrites the few PeerSets
//! whose selectors match the pod (for a large set: the one slice that holds
//! the pod, and the head), never every NodePolicySet.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::node_policy_set::Protocol;
use crate::sharding::VersionRef;

/// The spec of a PeerSet object. A set is one object with its members
/// inline, or, when large, a head (selector, memberCount, the slices with
/// their hashes) plus slice objects (`<head>-s<bits>`, `sliceOf` = the head)
/// holding the members. [`crate::assemble::assemble_peer_set`] turns either
/// form into the set's [`PeerSetSpec`].
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "canal.dev",
    version = "v1alpha1",
    kind = "PeerSet",
    root = "PeerSetSchema",
    shortname = "ps",
    category = "canal",
    doc = "The pod addresses matched by one distinct NetworkPolicy peer selector, maintained by canal-controller and shared by every node whose policies reference it. A large set is a head listing its slices (PeerSets whose sliceOf names the head).",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(
        name = "Namespace",
        type_ = "string",
        json_path = ".spec.selector.namespace"
    ),
    printcolumn(
        name = "NamedPort",
        type_ = "string",
        json_path = ".spec.selector.namedPort.name"
    ),
    printcolumn(name = "Members", type_ = "integer", json_path = ".spec.memberCount"),
    printcolumn(name = "SliceOf", type_ = "string", json_path = ".spec.sliceOf"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PeerSetObjectSpec {
    /// What the set matches (heads; for people, agents use only the members).
    #[serde(default, skip_serializing_if = "PeerSelector::is_empty")]
    pub selector: PeerSelector,
    /// Number of members (ips or ports) of the whole set, or of this slice.
    #[serde(default)]
    pub member_count: u32,
    /// The version of this object; the head lists each slice's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
    /// Pod IPs matched (sorted), inline or in this slice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// For a named-port set: (IP, protocol, port) of every matched pod that
    /// declares the port name (sorted), inline or in this slice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMember>,
    /// On a head of a large set: the slices holding the members, each at
    /// the hash this head was written with. A reader uses the set only when
    /// it holds every slice at that hash.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slices: Vec<VersionRef>,
    /// On a slice: the name of its head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice_of: Option<String>,
}

crate::root::custom_resource_root!(
    /// A PeerSet object (head, slice, or a set with its members inline).
    PeerSet,
    twin = PeerSetSchema,
    spec = PeerSetObjectSpec,
    status = ()
);

/// A set's members, as a node uses them: the assembled view of a PeerSet
/// (and of its slices).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerSetSpec {
    /// What the set matches (for people; agents use only the members).
    pub selector: PeerSelector,
    /// Number of members (ips or ports), for `kubectl get`.
    #[serde(default)]
    pub member_count: u32,
    /// Pod IPs matched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// For a named-port set: (IP, protocol, port) of every matched pod that
    /// declares the port name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMember>,
}

/// Everything inline: the form people write by hand.
impl From<PeerSetSpec> for PeerSetObjectSpec {
    fn from(s: PeerSetSpec) -> PeerSetObjectSpec {
        PeerSetObjectSpec {
            selector: s.selector,
            member_count: s.member_count,
            hash: String::new(),
            ips: s.ips,
            ports: s.ports,
            slices: Vec::new(),
            slice_of: None,
        }
    }
}

/// A NetworkPolicy peer selector in canonical form.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerSelector {
    /// Pods only of this namespace (a peer with a podSelector and no
    /// namespaceSelector). Absent: namespaces chosen by namespaceSelector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Namespaces whose pods may match. Absent with no namespace: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods that match. Absent: every pod of the chosen namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Set only for named-port sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_port: Option<NamedPortRef>,
}

impl PeerSelector {
    /// Nothing set (a slice carries no selector).
    pub fn is_empty(&self) -> bool {
        *self == PeerSelector::default()
    }
}

/// A container port name and protocol.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "camelCase")]
pub struct NamedPortRef {
    /// Port name.
    pub name: String,
    /// Port protocol.
    pub protocol: Protocol,
}

/// One (IP, protocol, port) member of a named-port set.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "camelCase")]
pub struct PortMember {
    /// Pod IP.
    pub ip: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Port number.
    pub port: u16,
}
