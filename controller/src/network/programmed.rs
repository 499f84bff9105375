//! "N of M nodes programmed": the CanalNetwork `default` summary of what the
//! agents report on their own Nodes (condition `CanalNetworkProgrammed`,
//! written by canal-agent only when it changes). Pure.
//!
//! A Node whose agent reports a failure (status False) makes the network
//! Degraded with reason [`NODES_NOT_PROGRAMMED`], naming the first such
//! Nodes and their agents' reasons. A Node without the condition (its agent
//! has not finished a first sync, or no agent runs there) only counts as not
//! programmed: an agent that never started is not a failure the controller
//! can describe, and a fresh cluster is not Degraded while agents start.

use k8s_openapi::api::core::v1::Node;

use crate::node_view::NodeView;

/// Degraded/Ready reason: some agents report their node not programmed.
pub const NODES_NOT_PROGRAMMED: &str = "NodesNotProgrammed";

/// Failing Nodes a message names before "and N more".
const NAMES_SHOWN: usize = 3;
/// An agent's message is quoted up to this many bytes.
const QUOTE_MAX: usize = 300;

/// A Node's `CanalNetworkProgrammed` condition, as the controller keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reported {
    /// Status True.
    pub programmed: bool,
    /// The agent's reason.
    pub reason: String,
    /// The agent's message.
    pub message: String,
}

impl Reported {
    /// The condition of `node`; None when absent or Unknown.
    pub fn from_node(node: &Node) -> Option<Reported> {
        let c = node
            .status
            .as_ref()?
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == canal_crds::condition::NODE_PROGRAMMED)?;
        let programmed = match c.status.as_str() {
            "True" => true,
            "False" => false,
            _ => return None,
        };
        Some(Reported {
            programmed,
            reason: c.reason.clone().unwrap_or_default(),
            message: c.message.clone().unwrap_or_default(),
        })
    }
}

/// A Node whose agent reports a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failing {
    /// Node name.
    pub node: String,
    /// The agent's reason.
    pub reason: String,
    /// The agent's message.
    pub message: String,
}

/// The summary over every Node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Summary {
    /// Nodes counted (not being deleted).
    pub total: u32,
    /// Nodes whose agent reports programmed.
    pub programmed: u32,
    /// Nodes whose agent reports a failure, by name.
    pub failing: Vec<Failing>,
    /// Nodes without a report yet.
    pub unreported: u32,
}

impl Summary {
    /// "2/3 nodes" (the printer column).
    pub fn short(&self) -> String {
        format!("{}/{} nodes", self.programmed, self.total)
    }

    /// The Degraded message when some agent reports a failure.
    pub fn problem(&self) -> Option<String> {
        if self.failing.is_empty() {
            return None;
        }
        let shown: Vec<String> = self
            .failing
            .iter()
            .take(NAMES_SHOWN)
            .map(|f| format!("{} ({}: {})", f.node, f.reason, quote(&f.message)))
            .collect();
        let more = self.failing.len().saturating_sub(NAMES_SHOWN);
        let mut text = format!(
            "{} of {} nodes programmed; {} report a failure: {}",
            self.programmed,
            self.total,
            self.failing.len(),
            shown.join(", ")
        );
        if more > 0 {
            text.push_str(&format!(" and {more} more"));
        }
        if self.unreported > 0 {
            text.push_str(&format!("; {} not reported yet", self.unreported));
        }
        text.push_str(
            "; see `kubectl describe node` (condition CanalNetworkProgrammed and Events) and the agent's /readyz",
        );
        Some(text)
    }
}

/// Sums up the Nodes' reports. Nodes being deleted are left out.
pub fn summarize<'a>(nodes: impl IntoIterator<Item = &'a NodeView>) -> Summary {
    let mut s = Summary::default();
    for node in nodes.into_iter().filter(|n| !n.deleting) {
        s.total += 1;
        match &node.programmed {
            Some(r) if r.programmed => s.programmed += 1,
            Some(r) => s.failing.push(Failing {
                node: node.name.clone(),
                reason: r.reason.clone(),
                message: r.message.clone(),
            }),
            None => s.unreported += 1,
        }
    }
    s.failing.sort_by(|a, b| a.node.cmp(&b.node));
    s
}

fn quote(message: &str) -> String {
    if message.len() <= QUOTE_MAX {
        return message.to_string();
    }
    let mut end = QUOTE_MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view(name: &str, condition: Option<(&str, &str, &str)>) -> NodeView {
        let conditions: Vec<serde_json::Value> = condition
            .into_iter()
            .map(|(status, reason, message)| {
                json!({"type": "CanalNetworkProgrammed", "status": status,
                       "reason": reason, "message": message})
            })
            .chain([json!({"type": "Ready", "status": "True", "reason": "KubeletReady"})])
            .collect();
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"conditions": conditions}
        }))
        .unwrap();
        NodeView::from_node(&node)
    }

    const MTU: &str =
        "MTU: setting the VXLAN device's MTU to 65535: Invalid argument (os error 22)";

    #[test]
    fn every_node_failing_is_degraded_naming_them() {
        let nodes = [
            view("node-2", Some(("False", "MTURejected", MTU))),
            view("node-1", Some(("False", "MTURejected", MTU))),
            view(
                "node-3",
                Some(("False", "UnderlayUnavailable", "underlay: gone")),
            ),
        ];
        let s = summarize(&nodes);
        assert_eq!((s.total, s.programmed, s.unreported), (3, 0, 0));
        assert_eq!(s.short(), "0/3 nodes");
        let msg = s.problem().unwrap();
        assert!(
            msg.starts_with(
                "0 of 3 nodes programmed; 3 report a failure: node-1 (MTURejected: MTU: setting"
            ),
            "{msg}"
        );
        assert!(
            msg.contains("node-3 (UnderlayUnavailable: underlay: gone)"),
            "{msg}"
        );
    }

    #[test]
    fn programmed_and_unreported_nodes_are_not_a_problem() {
        let nodes = [
            view("a", Some(("True", "Programmed", "fine"))),
            view("b", None),
            view("c", Some(("Unknown", "", ""))),
        ];
        let s = summarize(&nodes);
        assert_eq!((s.total, s.programmed, s.unreported), (3, 1, 2));
        assert_eq!(s.short(), "1/3 nodes");
        assert_eq!(s.problem(), None, "agents still starting are not Degraded");
        assert_eq!(summarize(&[]).short(), "0/0 nodes");
    }

    #[test]
    fn long_lists_and_messages_are_cut_and_deleting_nodes_left_out() {
        let mut nodes: Vec<NodeView> = (0..6)
            .map(|i| {
                view(
                    &format!("n{i}"),
                    Some(("False", "RoutesFailed", &"x".repeat(1000))),
                )
            })
            .collect();
        nodes.push(view("ok", Some(("True", "Programmed", ""))));
        nodes.push(view("new", None));
        let mut going = view("going", Some(("False", "RoutesFailed", "gone")));
        going.deleting = true;
        nodes.push(going);
        let s = summarize(&nodes);
        assert_eq!(s.total, 8);
        let msg = s.problem().unwrap();
        assert!(
            msg.starts_with("1 of 8 nodes programmed; 6 report a failure"),
            "{msg}"
        );
        assert!(msg.contains(" and 3 more; 1 not reported yet"), "{msg}");
        assert!(!msg.contains("going"));
        assert!(msg.len() < 1500, "{}", msg.len());
    }
}
