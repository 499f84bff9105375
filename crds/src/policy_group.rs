//! `PolicyGroup`: the compiled NetworkPolicies of one namespace that share
//! one pod selector, written once and shared by every node whose pods the
//! selector matches (a NodePolicySet names it with the hash it needs). A
//! group too large for one object is a head listing its slices, like a
//! large PeerSet.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::node_policy_set::Rule;
use crate::sharding::VersionRef;

/// Compiled policies with one pod selector in one namespace (name = a hash
/// of namespace and selector).
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "canal.dev",
    version = "v1alpha1",
    kind = "PolicyGroup",
    shortname = "pg",
    category = "canal",
    doc = "The NetworkPolicies of one namespace that share one pod selector, compiled by canal-controller and shared by every node whose pods they select. A large group is a head listing its slices (PolicyGroups whose sliceOf names the head).",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(name = "Namespace", type_ = "string", json_path = ".spec.namespace"),
    printcolumn(name = "Policies", type_ = "integer", json_path = ".spec.policyCount"),
    printcolumn(name = "SliceOf", type_ = "string", json_path = ".spec.sliceOf"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PolicyGroupSpec {
    /// The namespace of the policies (heads).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// The pod selector the policies share, in canonical form (heads; for
    /// people).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// The version of this object: NodePolicySets name a head with it, a
    /// head names each slice with it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
    /// Number of NetworkPolicies in the group (heads).
    #[serde(default)]
    pub policy_count: u32,
    /// The compiled policies, inline or in this slice. A policy too large
    /// for one slice is split into parts (each a subset of its rules, which
    /// allow traffic independently).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<GroupPolicy>,
    /// On a head of a large group: the slices, each at the hash this head
    /// was written with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slices: Vec<VersionRef>,
    /// On a slice: the name of its head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice_of: Option<String>,
}

/// One compiled NetworkPolicy (or one part of a large one).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct GroupPolicy {
    /// `namespace/name` of the NetworkPolicy.
    pub name: String,
    /// The directions it isolates the pods it selects for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_types: Vec<PolicyType>,
    /// Which part of a split policy this is (0 and absent: the first).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub part: u32,
    /// Ingress allow rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Rule>,
    /// Egress allow rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Rule>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl GroupPolicy {
    /// Isolates for ingress.
    pub fn isolates_ingress(&self) -> bool {
        self.policy_types.contains(&PolicyType::Ingress)
    }

    /// Isolates for egress.
    pub fn isolates_egress(&self) -> bool {
        self.policy_types.contains(&PolicyType::Egress)
    }
}

/// A direction a NetworkPolicy isolates.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum PolicyType {
    /// Ingress.
    Ingress,
    /// Egress.
    Egress,
}

/// Name of the PolicyGroup for a namespace and a canonical pod selector text.
pub fn policy_group_name(namespace: &str, canonical_selector: &str) -> String {
    format!(
        "pg-{}",
        crate::names::short_hash(&format!("{namespace}\n{canonical_selector}"))
    )
}
