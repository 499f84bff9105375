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
use crate::explain::Explanation;

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
    /// The chains the explanation's directions decided on this node run
    /// through, per dataplane: (iptables, nftables) names.
    pub relies_on: (Vec<String>, Vec<String>),
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
    e: &Explanation,
    timeout: Duration,
) -> Result<Vec<NodeVerify>, Error> {
    let nodes = nodes_of(e);
    let api: Api<NodePolicySet> = Api::all(client.clone());
    let id = request_id();
    for v in &nodes {
        let node = &v.node;
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
    let mut out = nodes;
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

/// The nodes an explanation used, each with the chains its directions
/// there rely on (nothing answered yet).
pub fn nodes_of(e: &Explanation) -> Vec<NodeVerify> {
    let mut out: Vec<NodeVerify> = Vec::new();
    for d in [&e.egress, &e.ingress] {
        let Some(en) = &d.enforcement else {
            continue;
        };
        let i = match out.iter().position(|v| v.node == en.node) {
            Some(i) => i,
            None => {
                out.push(NodeVerify {
                    node: en.node.clone(),
                    used_generation: en.generation,
                    answer: None,
                    relies_on: (Vec::new(), Vec::new()),
                });
                out.len() - 1
            }
        };
        out[i].relies_on.0.extend(d.chains("iptables"));
        out[i].relies_on.1.extend(d.chains("nftables"));
    }
    out
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
        let relied = if a.dataplane.as_deref() == Some("nftables") {
            &v.relies_on.1
        } else {
            &v.relies_on.0
        };
        if !relied.is_empty() {
            out.push_str(&format!(
                "  this answer relies on chains {}\n",
                relied.join(", ")
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
            let ours = if r.chains.iter().any(|c| relied.contains(c)) {
                " (a chain this answer relies on)"
            } else {
                ""
            };
            out.push_str(&format!(
                "  was changed outside canal-agent, repaired at {} (found by {}): {}{chains}{ours}\n",
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

    fn node(name: &str, used: i64, answer: Option<KernelCheck>) -> NodeVerify {
        NodeVerify {
            node: name.into(),
            used_generation: Some(used),
            answer,
            relies_on: (
                vec!["CANAL-TW-cali1".into(), "CANAL-PI-x".into()],
                vec!["tw-cali1".into()],
            ),
        }
    }

    fn t0(list: &[NodeVerify]) -> String {
        text(list, Duration::from_secs(10))
    }

    #[test]
    fn held_missing_stale_and_silent_nodes() {
        let answer = |held: bool, generation: i64| KernelCheck {
            request: Some("r".into()),
            checked_at: Some("2026-12-01T17:00:00Z".into()),
            generation: Some(generation),
            dataplane: Some("iptables".into()),
            held,
            missing: (!held)
                .then(|| "1 chains rewritten (repaired at once); chains: CANAL-PI-x".into()),
            repairs: vec![DriftRepair {
                repaired_at: "2026-12-01T16:59:00Z".into(),
                found_by: "firewall_change".into(),
                changes: "1 chains rewritten".into(),
                chains: vec!["CANAL-PI-x".into()],
            }],
        };
        let list = vec![
            node("n1", 4, Some(answer(true, 4))),
            node("n2", 4, Some(answer(false, 4))),
            node("n3", 5, Some(answer(true, 4))),
            node("n4", 1, None),
        ];
        assert!(t0(&list).contains("this answer relies on chains CANAL-TW-cali1, CANAL-PI-x"));
        let oks: Vec<bool> = list.iter().map(NodeVerify::ok).collect();
        assert_eq!(oks, [true, false, false, false]);
        let t = t0(&list);
        assert!(t.contains("verify n1: the kernel holds every chain, rule and set member of generation 4 (iptables, read at 2026-12-01T17:00:00Z)"), "{t}");
        assert!(t.contains("verify n2: the kernel did NOT hold generation 4 when read at 2026-12-01T17:00:00Z (iptables): 1 chains rewritten (repaired at once); chains: CANAL-PI-x"), "{t}");
        assert!(
            t.contains("the agent has generation 4 programmed; this answer used generation 5"),
            "{t}"
        );
        assert!(t.contains("repaired at 2026-12-01T16:59:00Z (found by firewall_change): 1 chains rewritten; chains: CANAL-PI-x (a chain this answer relies on)"), "{t}");
        assert!(t.contains("verify n4: no answer within 10 s"), "{t}");
    }
}
