//! "Enforced on N of M nodes": the CanalNetwork `default` status summary of
//! what the agents report in their NodePolicySet statuses.

use std::collections::HashMap;

use canal_crds::condition::{ENFORCED, is_true};
use canal_crds::{CanalNetworkStatus, NodePolicySet};
use serde_json::json;

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

/// The three status fields the policy controller owns on CanalNetwork.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySummary {
    /// e.g. "3/3 nodes", or "disabled".
    pub policy_enforcement: String,
    /// Nodes whose agent has programmed the latest NodePolicySet.
    pub policy_enforced_nodes: u32,
    /// Nodes (each has a NodePolicySet).
    pub policy_nodes: u32,
}

impl PolicySummary {
    /// The fields as they are in a CanalNetwork status, if all are set.
    pub fn from_status(status: &CanalNetworkStatus) -> Option<PolicySummary> {
        Some(PolicySummary {
            policy_enforcement: status.policy_enforcement.clone()?,
            policy_enforced_nodes: status.policy_enforced_nodes?,
            policy_nodes: status.policy_nodes?,
        })
    }

    /// The server-side apply body for the status subresource: a JSON object
    /// with only these fields (CONTRACTS.md).
    pub fn apply_body(&self, name: &str) -> serde_json::Value {
        json!({
            "apiVersion": format!("{}/{}", canal_crds::GROUP, canal_crds::VERSION),
            "kind": "CanalNetwork",
            "metadata": { "name": name },
            "status": {
                "policyEnforcement": self.policy_enforcement,
                "policyEnforcedNodes": self.policy_enforced_nodes,
                "policyNodes": self.policy_nodes,
            }
        })
    }
}

/// Summarizes the statuses of the NodePolicySets of the existing `nodes`.
/// A node whose NodePolicySet is missing or not yet programmed counts as
/// not enforced.
pub fn summarize<'a>(
    nodes: impl Iterator<Item = &'a str>,
    statuses: &HashMap<String, NodeStatus>,
    enabled: bool,
) -> PolicySummary {
    let (mut total, mut enforced) = (0u32, 0u32);
    for node in nodes {
        total += 1;
        if statuses.get(node).is_some_and(NodeStatus::is_enforced) {
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
        let s = summarize(["a", "b", "c", "d"].into_iter(), &statuses, true);
        assert_eq!(
            s,
            PolicySummary {
                policy_enforcement: "1/4 nodes".into(),
                policy_enforced_nodes: 1,
                policy_nodes: 4
            }
        );
        let off = summarize(["a"].into_iter(), &statuses, false);
        assert_eq!(off.policy_enforcement, "disabled");
    }

    #[test]
    fn apply_body_holds_only_the_policy_fields() {
        let body = PolicySummary {
            policy_enforcement: "2/3 nodes".into(),
            policy_enforced_nodes: 2,
            policy_nodes: 3,
        }
        .apply_body("default");
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
