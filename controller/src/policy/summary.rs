//! "Enforced on N of M nodes": the CanalNetwork `default` status summary of
//! what the agents report in their NodePolicySet statuses.

use std::collections::{BTreeSet, HashMap};

use canal_crds::condition::{ENFORCED, is_true};
use canal_crds::{CanalNetworkStatus, NodePolicySet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use serde_json::json;

use super::problems::{ConditionView, POLICY_PUBLISHED};

/// What the summary needs of one NodePolicySet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStatus {
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `status.observedGeneration` (written by the agent).
    pub observed_generation: Option<i64>,
    /// The agent's `Enforced` condition is True.
    pub enforced: bool,
}

impl NodeStatus {
    /// Reads a NodePolicySet.
    pub fn from_object(nps: &NodePolicySet) -> NodeStatus {
        let status = nps.status.as_ref();
        NodeStatus {
            generation: nps.metadata.generation,
            observed_generation: status.and_then(|s| s.observed_generation),
            enforced: status.is_some_and(|s| is_true(&s.conditions, ENFORCED)),
        }
    }

    /// The agent has programmed the latest spec.
    pub fn is_enforced(&self) -> bool {
        self.enforced && self.generation.is_some() && self.observed_generation == self.generation
    }
}

/// The status fields the policy controller owns on CanalNetwork: three
/// counters and, once anything could not be written, its own condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySummary {
    /// e.g. "3/3 nodes", or "disabled".
    pub policy_enforcement: String,
    /// Nodes whose agent has programmed the latest NodePolicySet.
    pub policy_enforced_nodes: u32,
    /// Nodes (each has a NodePolicySet).
    pub policy_nodes: u32,
    /// The `PolicyPublished` condition (None: never needed).
    pub published: Option<ConditionView>,
}

impl PolicySummary {
    /// The fields as they are in a CanalNetwork status, if all are set.
    pub fn from_status(status: &CanalNetworkStatus) -> Option<PolicySummary> {
        Some(PolicySummary {
            policy_enforcement: status.policy_enforcement.clone()?,
            policy_enforced_nodes: status.policy_enforced_nodes?,
            policy_nodes: status.policy_nodes?,
            published: ConditionView::find(&status.conditions, POLICY_PUBLISHED),
        })
    }

    /// The server-side apply body for the status subresource: a JSON object
    /// with only these fields (CONTRACTS.md). The condition, when there is
    /// one, is one entry of the conditions map the network controller
    /// shares (keyed by type, so neither touches the other's).
    pub fn apply_body(&self, name: &str, condition: Option<&Condition>) -> serde_json::Value {
        let mut status = json!({
            "policyEnforcement": self.policy_enforcement,
            "policyEnforcedNodes": self.policy_enforced_nodes,
            "policyNodes": self.policy_nodes,
        });
        if let Some(c) = condition {
            status["conditions"] = json!([c]);
        }
        json!({
            "apiVersion": format!("{}/{}", canal_crds::GROUP, canal_crds::VERSION),
            "kind": "CanalNetwork",
            "metadata": { "name": name },
            "status": status,
        })
    }
}

/// Summarizes the statuses of the NodePolicySets of the existing `nodes`.
/// A node whose NodePolicySet is missing or not yet programmed counts as
/// not enforced, and so does one whose policy needs an object that cannot
/// be written (`unpublished`: it enforces an older policy).
pub fn summarize<'a>(
    nodes: impl Iterator<Item = &'a str>,
    statuses: &HashMap<String, NodeStatus>,
    unpublished: &BTreeSet<String>,
    enabled: bool,
    published: Option<ConditionView>,
) -> PolicySummary {
    let (mut total, mut enforced) = (0u32, 0u32);
    for node in nodes {
        total += 1;
        if statuses.get(node).is_some_and(NodeStatus::is_enforced) && !unpublished.contains(node) {
            enforced += 1;
        }
    }
    PolicySummary {
        policy_enforcement: if enabled {
            format!("{enforced}/{total} nodes")
        } else {
            "disabled".to_string()
        },
        policy_enforced_nodes: enforced,
        policy_nodes: total,
        published,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(generation: i64, observed: Option<i64>, enforced: bool) -> NodeStatus {
        NodeStatus {
            generation: Some(generation),
            observed_generation: observed,
            enforced,
        }
    }

    #[test]
    fn counts_only_nodes_that_programmed_the_latest_generation() {
        let statuses: HashMap<String, NodeStatus> = [
            ("a", st(3, Some(3), true)),
            ("b", st(4, Some(3), true)),    // behind
            ("c", st(2, Some(2), false)),   // agent reports a failure
            ("gone", st(1, Some(1), true)), // Node deleted: not counted
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let none = BTreeSet::new();
        let s = summarize(
            ["a", "b", "c", "d"].into_iter(),
            &statuses,
            &none,
            true,
            None,
        );
        assert_eq!(
            s,
            PolicySummary {
                policy_enforcement: "1/4 nodes".into(),
                policy_enforced_nodes: 1,
                policy_nodes: 4,
                published: None,
            }
        );
        let blocked = BTreeSet::from(["a".to_string()]);
        let s = summarize(["a", "b"].into_iter(), &statuses, &blocked, true, None);
        assert_eq!(s.policy_enforced_nodes, 0, "a enforces an older policy");
        let off = summarize(["a"].into_iter(), &statuses, &none, false, None);
        assert_eq!(off.policy_enforcement, "disabled");
    }

    #[test]
    fn apply_body_holds_only_the_policy_fields() {
        let body = PolicySummary {
            policy_enforcement: "2/3 nodes".into(),
            policy_enforced_nodes: 2,
            policy_nodes: 3,
            published: None,
        }
        .apply_body("default", None);
        let status = body["status"].as_object().unwrap();
        let mut keys: Vec<&String> = status.keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["policyEnforcedNodes", "policyEnforcement", "policyNodes"]
        );
        assert_eq!(body["kind"], "CanalNetwork");
    }

    #[test]
    fn reads_the_agent_condition() {
        let nps: NodePolicySet = serde_json::from_value(json!({
            "apiVersion": "canal.dev/v1alpha1", "kind": "NodePolicySet",
            "metadata": {"name": "n1", "generation": 2},
            "spec": {},
            "status": {"observedGeneration": 2, "conditions": [{
                "type": "Enforced", "status": "True", "reason": "Programmed", "message": "",
                "lastTransitionTime": "2025-01-01T00:00:00Z"}]}
        }))
        .unwrap();
        assert!(NodeStatus::from_object(&nps).is_enforced());
    }
}
