//! Per-node status from the snapshot (pure): what each agent reports on its
//! NodePolicySet and Node, as the CanalNetwork summary counts it.

use canal_crds::annotations::{BACKEND_DATA, BACKEND_V6_DATA, PUBLIC_IP, PUBLIC_IPV6};
use canal_crds::condition::{ENFORCED, NODE_PROGRAMMED, find};
use k8s_openapi::api::core::v1::Node;

use crate::snapshot::Snapshot;

/// One row of `kubectl canal status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node.
    pub node: String,
    /// NodePolicySet `metadata.generation` (None: no NodePolicySet).
    pub generation: Option<i64>,
    /// `status.observedGeneration`: programmed by the agent.
    pub programmed: Option<i64>,
    /// Enforced condition: True, False, or `-`.
    pub enforced: String,
    /// `status.dataplane`.
    pub dataplane: Option<String>,
    /// Endpoints, rules, set members as the agent counts them.
    pub endpoints: Option<u32>,
    /// Rules.
    pub rules: Option<u32>,
    /// Set members.
    pub sets: Option<u32>,
    /// Other nodes the overlay reaches (with a pod subnet, public IP and VTEP).
    pub overlay_peers: usize,
    /// The Node condition CanalNetworkProgrammed: True, False or `-`.
    pub network: String,
    /// The newest failure reported (Enforced or CanalNetworkProgrammed False).
    pub last_error: Option<String>,
}

/// The rows, by node name.
pub fn node_statuses(snap: &Snapshot) -> Vec<NodeStatus> {
    snap.nodes
        .iter()
        .filter(|(_, n)| n.metadata.deletion_timestamp.is_none())
        .map(|(name, node)| {
            let nps = snap.node_policy_sets.get(name);
            let status = nps.and_then(|n| n.status.clone()).unwrap_or_default();
            let enforced = find(&status.conditions, ENFORCED);
            let net = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == NODE_PROGRAMMED));
            let mut errors = Vec::new();
            if let Some(c) = enforced.filter(|c| c.status != "True") {
                errors.push(format!("policy {}: {}", c.reason, c.message));
            }
            if let Some(c) = net.filter(|c| c.status != "True") {
                errors.push(format!(
                    "network {}: {}",
                    c.reason.as_deref().unwrap_or_default(),
                    c.message.as_deref().unwrap_or_default()
                ));
            }
            NodeStatus {
                node: name.clone(),
                generation: nps.and_then(|n| n.metadata.generation),
                programmed: status.observed_generation,
                enforced: enforced.map_or("-".into(), |c| c.status.clone()),
                dataplane: status.dataplane.clone(),
                endpoints: status.endpoints,
                rules: status.rules,
                sets: status.sets,
                overlay_peers: snap
                    .nodes
                    .iter()
                    .filter(|(other, n)| *other != name && is_overlay_peer(n))
                    .count(),
                network: net.map_or("-".into(), |c| c.status.clone()),
                last_error: (!errors.is_empty()).then(|| errors.join("; ")),
            }
        })
        .collect()
}

/// A node the overlay programs towards: a pod subnet, a public address and
/// a VTEP (what canal-controller annotates, as flannel does).
fn is_overlay_peer(n: &Node) -> bool {
    let a = n.metadata.annotations.clone().unwrap_or_default();
    let has_cidr = n.spec.as_ref().is_some_and(|s| {
        s.pod_cidr.is_some() || s.pod_cidrs.as_ref().is_some_and(|c| !c.is_empty())
    });
    n.metadata.deletion_timestamp.is_none()
        && has_cidr
        && ((a.contains_key(PUBLIC_IP) && a.contains_key(BACKEND_DATA))
            || (a.contains_key(PUBLIC_IPV6) && a.contains_key(BACKEND_V6_DATA)))
}

/// The CanalNetwork's own summary lines (what the controller counts).
pub fn network_summary(snap: &Snapshot) -> Vec<String> {
    let Some(status) = snap.network.as_ref().and_then(|n| n.status.as_ref()) else {
        return vec!["CanalNetwork default: no status yet".into()];
    };
    vec![format!(
        "CanalNetwork default: network programmed on {}, policy enforced on {}",
        status.programmed.as_deref().unwrap_or("?"),
        status.policy_enforcement.as_deref().unwrap_or("?")
    )]
}
