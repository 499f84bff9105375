//! `--verify`: asks the agents of the nodes an answer used whether their
//! kernel holds what they programmed, and reads their answers.
//!
//! Transport and authentication: the request is an annotation on the
//! node's NodePolicySet (needs `patch` on NodePolicySets), the answer the
//! NodePolicySet's `status.kernel`, which only that node's agent may write
//! (the agent admission policy). Both go through the API server with the
//! user's own credentials: no port on the node, no token sent to a node.

use std::time::Duration;

use canal_crds::{KernelCheck, NodePolicySet, VERIFY_REQUEST_ANNOTATION};
use kube::api::{Api, Patch, PatchParams};

use crate::Error;

/// How long to wait for the agents' answers.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// One node's verification.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeVerify {
    /// The node.
    pub node: String,
    /// The generation the explanation used.
    pub used_generation: Option<i64>,
    /// The agent's answer to our request (None: no answer in time).
    pub answer: Option<KernelCheck>,
}

impl NodeVerify {
    /// The kernel held what the agent programmed, and that is the generation
    /// the explanation used.
    pub fn ok(&self) -> bool {
        self.answer
            .as_ref()
            .is_some_and(|a| a.held && a.generation == self.used_generation)
    }
}

/// A request id: unique per call (time and process).
pub fn request_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{}", std::process::id())
}

/// Asks each node's agent, then waits (up to `timeout`) for every answer.
pub async fn verify(
    client: &kube::Client,
    nodes: &[(String, Option<i64>)],
    timeout: Duration,
) -> Result<Vec<NodeVerify>, Error> {
    let api: Api<NodePolicySet> = Api::all(client.clone());
    let id = request_id();
    for (node, _) in nodes {
        let patch =
            serde_json::json!({"metadata": {"annotations": {VERIFY_REQUEST_ANNOTATION: id}}});
        api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| Error::Api {
                what: format!("asking node {node}'s agent (annotating its NodePolicySet)"),
                source,
            })?;
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out: Vec<NodeVerify> = nodes
        .iter()
        .map(|(node, g)| NodeVerify {
            node: node.clone(),
            used_generation: *g,
            answer: None,
        })
        .collect();
    loop {
        for v in out.iter_mut().filter(|v| v.answer.is_none()) {
            let nps = api.get(&v.node).await.map_err(|source| Error::Api {
                what: format!("NodePolicySet {}", v.node),
                source,
            })?;
            v.answer = nps
                .status
                .and_then(|s| s.kernel)
                .map(|k| *k)
                .filter(|k| k.request.as_deref() == Some(id.as_str()));
        }
        if out.iter().all(|v| v.answer.is_some()) || tokio::time::Instant::now() >= deadline {
            return Ok(out);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The verification as printed, one block per node.
pub fn text(list: &[NodeVerify], timeout: Duration) -> String {
    let mut out = String::new();
    for v in list {
        let Some(a) = &v.answer else {
            out.push_str(&format!(
                "verify {}: no answer within {} s (agent not running, not synced yet, or older than this plugin)\n",
                v.node,
                timeout.as_secs()
            ));
            continue;
        };
        let at = a.checked_at.as_deref().unwrap_or("?");
        let dp = a.dataplane.as_deref().unwrap_or("?");
        let gen_ = |g: Option<i64>| g.map_or("?".to_string(), |g| g.to_string());
        if a.held {
            out.push_str(&format!(
                "verify {}: the kernel holds every chain, rule and set member of generation {} ({dp}, read at {at})\n",
                v.node,
                gen_(a.generation)
            ));
        } else {
            out.push_str(&format!(
                "verify {}: the kernel did NOT hold generation {} when read at {at} ({dp}): {}\n",
                v.node,
                gen_(a.generation),
                a.missing.as_deref().unwrap_or("?")
            ));
        }
        if a.generation != v.used_generation {
            out.push_str(&format!(
                "  the agent has generation {} programmed; this answer used generation {}\n",
                gen_(a.generation),
                gen_(v.used_generation)
            ));
        }
        for r in &a.repairs {
            let chains = if r.chains.is_empty() {
                String::new()
            } else {
                format!("; chains: {}", r.chains.join(", "))
            };
            out.push_str(&format!(
                "  was changed outside canal-agent, repaired at {} (found by {}): {}{chains}\n",
                r.repaired_at, r.found_by, r.changes
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use canal_crds::DriftRepair;

    #[test]
    fn held_missing_stale_and_silent_nodes() {
        let answer = |held: bool, generation: i64| KernelCheck {
            request: Some("r".into()),
            checked_at: Some("2026-12-01T17:00:00Z".into()),
            generation: Some(generation),
            dataplane: Some("iptables".into()),
            held,
            missing: (!held)
                .then(|| "1 chains rewritten (repaired at once); chains: CANAL-pi-x".into()),
            repairs: vec![DriftRepair {
                repaired_at: "2026-12-01T16:59:00Z".into(),
                found_by: "firewall_change".into(),
                changes: "1 chains rewritten".into(),
                chains: vec!["CANAL-pi-x".into()],
            }],
        };
        let list = vec![
            NodeVerify {
                node: "n1".into(),
                used_generation: Some(4),
                answer: Some(answer(true, 4)),
            },
            NodeVerify {
                node: "n2".into(),
                used_generation: Some(4),
                answer: Some(answer(false, 4)),
            },
            NodeVerify {
                node: "n3".into(),
                used_generation: Some(5),
                answer: Some(answer(true, 4)),
            },
            NodeVerify {
                node: "n4".into(),
                used_generation: Some(1),
                answer: None,
            },
        ];
        let oks: Vec<bool> = list.iter().map(NodeVerify::ok).collect();
        assert_eq!(oks, [true, false, false, false]);
        let t = text(&list, Duration::from_secs(10));
        assert!(t.contains("verify n1: the kernel holds every chain, rule and set member of generation 4 (iptables, read at 2026-12-01T17:00:00Z)"), "{t}");
        assert!(t.contains("verify n2: the kernel did NOT hold generation 4 when read at 2026-12-01T17:00:00Z (iptables): 1 chains rewritten (repaired at once); chains: CANAL-pi-x"), "{t}");
        assert!(
            t.contains("the agent has generation 4 programmed; this answer used generation 5"),
            "{t}"
        );
        assert!(t.contains("repaired at 2026-12-01T16:59:00Z (found by firewall_change): 1 chains rewritten; chains: CANAL-pi-x"), "{t}");
        assert!(t.contains("verify n4: no answer within 10 s"), "{t}");
    }
}
