//! `PeerSet`: the members one distinct NetworkPolicy peer selector matches,
//! shared by every node that needs it. A pod event rewrites the few PeerSets
//! whose selectors match the pod, never every NodePolicySet.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::node_policy_set::Protocol;

/// The pod addresses one NetworkPolicy peer matches (name = a hash of the selector).
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "canal.dev",
    version = "v1alpha1",
    kind = "PeerSet",
    shortname = "ps",
    category = "canal",
    doc = "The pod addresses matched by one distinct NetworkPolicy peer selector, maintained by canal-controller and shared by every node whose policies reference it.",
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
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PeerSetSpec {
    /// What the set matches (for people; agents use only the members).
    pub selector: PeerSelector,
    /// Number of members (ips or ports), for `kubectl get`.
    #[serde(default)]
    pub member_count: u32,
    /// Pod IPs matched (sorted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// For a named-port set: (IP, protocol, port) of every matched pod that
    /// declares the port name (sorted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMember>,
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
