//! CanalNetwork status derivation: from what the controller found (spec
//! validity, the address plan in force, allocation counts, Nodes it could
//! not serve) to the status fields it owns. Pure.

use canal_crds::CanalNetworkStatus;
use canal_crds::condition::{self, DEGRADED, READY};
use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Ready reason when everything is applied.
pub const APPLIED: &str = "Applied";
/// Degraded reason when nothing is wrong.
pub const AS_EXPECTED: &str = "AsExpected";
/// The spec cannot be used.
pub const INVALID_SPEC: &str = "InvalidSpec";
/// clusterCIDR/nodeSubnetLength changed while subnets are allocated.
pub const LIVE_CHANGE_REFUSED: &str = "LiveChangeRefused";
/// Some Nodes hold a podCIDR the controller cannot use.
pub const CONFLICT: &str = "Conflict";
/// Some Nodes wait because every subnet is allocated.
pub const SUBNET_EXHAUSTED: &str = "SubnetExhausted";
/// The object is not the one named `default`.
pub const IGNORED: &str = "Ignored";
/// Some agents report their node not programmed.
pub const NODES_NOT_PROGRAMMED: &str = crate::network::programmed::NODES_NOT_PROGRAMMED;

/// How many Node names a message lists before "and N more".
const NAMES_SHOWN: usize = 5;

/// The address plan in force and its usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivePlan {
    /// The range in force (clusterCIDR or a clusterCIDRs entry).
    pub cluster_cidr: IpNet,
    /// nodeSubnetLength in force.
    pub node_subnet_length: u8,
    /// Subnets in total.
    pub total: u64,
    /// Subnets held by Nodes.
    pub allocated: u64,
    /// Subnets free.
    pub free: u64,
}

/// A clusterCIDR/nodeSubnetLength edit that was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedChange {
    /// The plan in force.
    pub active: (IpNet, u8),
    /// The plan the spec asks for in that family (None: the family is
    /// removed from the spec).
    pub wanted: Option<(IpNet, u8)>,
    /// Subnets allocated from the plan in force.
    pub allocated: u64,
}

/// Everything the status of `default` is derived from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assessment {
    /// metadata.generation acted on.
    pub generation: Option<i64>,
    /// Why the spec cannot be used.
    pub invalid_spec: Option<String>,
    /// A refused address plan change.
    pub refused: Option<RefusedChange>,
    /// The plan in force of the primary family.
    pub active: Option<ActivePlan>,
    /// The plans in force, primary first (one per family).
    pub families: Vec<ActivePlan>,
    /// Nodes waiting for a subnet, oldest first.
    pub waiting: Vec<String>,
    /// Nodes whose podCIDR cannot be used: (name, why), by name.
    pub conflicts: Vec<(String, String)>,
    /// What the agents report about their nodes.
    pub programmed: Option<crate::network::programmed::Summary>,
    /// Nodes whose addresses conflict with the network: (name, why), by name.
    pub address_conflicts: Vec<(String, String)>,
}

/// The status fields the network controller owns, for `default`.
pub fn derive(a: &Assessment, existing: &CanalNetworkStatus, now: Time) -> CanalNetworkStatus {
    let mut problems: Vec<(&str, String)> = Vec::new();
    if let Some(why) = &a.invalid_spec {
        problems.push((
            INVALID_SPEC,
            format!("the spec cannot be used: {why}; the last valid settings stay in force"),
        ));
    }
    if let Some(r) = &a.refused {
        problems.push((LIVE_CHANGE_REFUSED, refused_message(r)));
    }
    if !a.conflicts.is_empty() {
        problems.push((CONFLICT, conflict_message(&a.conflicts)));
    }
    if !a.address_conflicts.is_empty() {
        problems.push((CONFLICT, address_conflict_message(&a.address_conflicts)));
    }
    if !a.waiting.is_empty() {
        problems.push((
            SUBNET_EXHAUSTED,
            exhausted_message(&a.waiting, a.active.as_ref()),
        ));
    }
    if let Some(msg) = a.programmed.as_ref().and_then(|p| p.problem()) {
        problems.push((NODES_NOT_PROGRAMMED, msg));
    }

    let mut conditions = own_conditions(existing);
    let generation = a.generation;
    match problems.first() {
        None => {
            let msg = match &a.active {
                Some(p) => format!(
                    "clusterCIDR {} is in force: {} of {} /{} subnets allocated to Nodes",
                    p.cluster_cidr, p.allocated, p.total, p.node_subnet_length
                ),
                None => "applied".to_string(),
            };
            condition::set_condition(
                &mut conditions,
                condition::condition(READY, true, APPLIED, msg, generation, now.clone()),
            );
            condition::set_condition(
                &mut conditions,
                condition::condition(
                    DEGRADED,
                    false,
                    AS_EXPECTED,
                    "nothing stops the network from being applied",
                    generation,
                    now,
                ),
            );
        }
        Some((reason, _)) => {
            let msg = problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            condition::set_condition(
                &mut conditions,
                condition::condition(READY, false, reason, msg.clone(), generation, now.clone()),
            );
            condition::set_condition(
                &mut conditions,
                condition::condition(DEGRADED, true, reason, msg, generation, now),
            );
        }
    }

    CanalNetworkStatus {
        observed_generation: generation,
        conditions,
        active_cluster_cidr: a.active.as_ref().map(|p| p.cluster_cidr.to_string()),
        active_node_subnet_length: plan_of(a, false).map(|p| p.node_subnet_length),
        active_cluster_cidrs: a
            .families
            .iter()
            .map(|p| p.cluster_cidr.to_string())
            .collect(),
        active_node_subnet_length_v6: plan_of(a, true).map(|p| p.node_subnet_length),
        family_subnets: a
            .families
            .iter()
            .map(|p| canal_crds::canal_network::FamilySubnets {
                family: canal_crds::validate::family_name(&p.cluster_cidr).to_string(),
                cluster_cidr: p.cluster_cidr.to_string(),
                total: p.total,
                allocated: p.allocated,
                free: p.free,
            })
            .collect(),
        total_subnets: a.active.as_ref().map(|p| p.total),
        allocated_subnets: a.active.as_ref().map(|p| p.allocated),
        free_subnets: a.active.as_ref().map(|p| p.free),
        pending_nodes: a.active.as_ref().map(|_| a.waiting.len() as u64),
        programmed: a.programmed.as_ref().map(|p| p.short()),
        programmed_nodes: a.programmed.as_ref().map(|p| p.programmed),
        total_nodes: a.programmed.as_ref().map(|p| p.total),
        ..Default::default()
    }
}

/// The status of a CanalNetwork that is not named `default`.
pub fn ignored(
    generation: Option<i64>,
    existing: &CanalNetworkStatus,
    now: Time,
) -> CanalNetworkStatus {
    let msg = format!(
        "only the CanalNetwork named \"{}\" is used; this object is ignored. Put its settings into \"{}\" (kubectl edit canalnetwork {}) and delete this one",
        canal_crds::DEFAULT_NETWORK_NAME,
        canal_crds::DEFAULT_NETWORK_NAME,
        canal_crds::DEFAULT_NETWORK_NAME
    );
    let mut conditions = own_conditions(existing);
    condition::set_condition(
        &mut conditions,
        condition::condition(READY, false, IGNORED, msg.clone(), generation, now.clone()),
    );
    condition::set_condition(
        &mut conditions,
        condition::condition(DEGRADED, true, IGNORED, msg, generation, now),
    );
    CanalNetworkStatus {
        observed_generation: generation,
        conditions,
        ..Default::default()
    }
}

/// The conditions the network controller owns (the conditions map also
/// holds the policy controller's, which it must not write back).
fn own_conditions(
    status: &CanalNetworkStatus,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status
        .conditions
        .iter()
        .filter(|c| c.type_ == READY || c.type_ == DEGRADED)
        .cloned()
        .collect()
}

/// The part of `status` the network controller owns (the policy
/// controller's fields cleared), for comparing with a derived status.
pub fn owned_part(status: &CanalNetworkStatus) -> CanalNetworkStatus {
    CanalNetworkStatus {
        policy_enforcement: None,
        policy_enforced_nodes: None,
        policy_nodes: None,
        conditions: own_conditions(status),
        ..status.clone()
    }
}

/// The Ready/Degraded reason of a derived status (for Events on change).
pub fn reason(status: &CanalNetworkStatus) -> Option<&str> {
    condition::find(&status.conditions, DEGRADED)
        .filter(|c| c.status == "True")
        .map(|c| c.reason.as_str())
}

/// The plan in force of one family (IPv6 or IPv4).
fn plan_of(a: &Assessment, v6: bool) -> Option<&ActivePlan> {
    let found = a
        .families
        .iter()
        .find(|p| matches!(p.cluster_cidr, IpNet::V6(_)) == v6);
    // Assessments built before families existed carry only `active`.
    match (found, &a.active) {
        (Some(p), _) => Some(p),
        (None, Some(p))
            if a.families.is_empty() && matches!(p.cluster_cidr, IpNet::V6(_)) == v6 =>
        {
            Some(p)
        }
        _ => None,
    }
}

fn refused_message(r: &RefusedChange) -> String {
    let (from_cidr, from_len) = r.active;
    let len_field = match from_cidr {
        IpNet::V4(_) => "nodeSubnetLength",
        IpNet::V6(_) => "nodeSubnetLengthV6",
    };
    let mut what = Vec::new();
    match r.wanted {
        Some((to_cidr, to_len)) => {
            if from_cidr != to_cidr {
                what.push(format!("clusterCIDR {from_cidr} -> {to_cidr}"));
            }
            if from_len != to_len {
                what.push(format!("{len_field} {from_len} -> {to_len}"));
            }
        }
        None => what.push(format!("removing the range {from_cidr}")),
    }
    format!(
        "the change of {} is refused: {} Node subnet(s) are allocated from {from_cidr} and a Node's podCIDR cannot change once set, so nothing allocated was touched and clusterCIDR {from_cidr} with {len_field} {from_len} stays in force. To apply it, drain and delete every Node (their subnets are freed and the new plan applies by itself) or create a new cluster; to cancel, set spec.clusterCIDR (or its clusterCIDRs entry) back to {from_cidr} and spec.{len_field} to {from_len}",
        what.join(" and "),
        r.allocated
    )
}

fn conflict_message(conflicts: &[(String, String)]) -> String {
    let shown: Vec<String> = conflicts
        .iter()
        .take(NAMES_SHOWN)
        .map(|(n, why)| format!("{n} ({why})"))
        .collect();
    format!(
        "{} Node(s) hold a podCIDR canal cannot use and are left unchanged without overlay annotations: {}{}; fix their podCIDR (recreate the Node) or the clusterCIDR",
        conflicts.len(),
        shown.join(", "),
        more(conflicts.len())
    )
}

fn address_conflict_message(conflicts: &[(String, String)]) -> String {
    let shown: Vec<String> = conflicts
        .iter()
        .take(NAMES_SHOWN)
        .map(|(n, why)| format!("Node {n}: {why}"))
        .collect();
    format!(
        "{} Node(s) have addresses that conflict with the pod network: {}{}; fix the Node's addresses (or its public-ip-overwrite annotation), or choose a clusterCIDR none of them lies in",
        conflicts.len(),
        shown.join("; "),
        more(conflicts.len())
    )
}

fn exhausted_message(waiting: &[String], active: Option<&ActivePlan>) -> String {
    let shown: Vec<&str> = waiting
        .iter()
        .take(NAMES_SHOWN)
        .map(String::as_str)
        .collect();
    let range = active
        .map(|p| {
            format!(
                "all {} /{} subnets of {} are allocated",
                p.total, p.node_subnet_length, p.cluster_cidr
            )
        })
        .unwrap_or_else(|| "no subnet is free".into());
    format!(
        "{} Node(s) wait for a subnet because {range}: {}{}; deleting Nodes frees their subnets (waiting Nodes get them oldest first), a larger range needs a new cluster",
        waiting.len(),
        shown.join(", "),
        more(waiting.len())
    )
}

fn more(n: usize) -> String {
    if n > NAMES_SHOWN {
        format!(" and {} more", n - NAMES_SHOWN)
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canal_crds::condition::find;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn plan() -> ActivePlan {
        ActivePlan {
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            node_subnet_length: 24,
            total: 256,
            allocated: 3,
            free: 253,
        }
    }

    fn healthy() -> Assessment {
        Assessment {
            generation: Some(2),
            active: Some(plan()),
            ..Default::default()
        }
    }

    #[test]
    fn healthy_network_is_ready_with_counts() {
        let s = derive(&healthy(), &CanalNetworkStatus::default(), at(1));
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(s.active_cluster_cidr.as_deref(), Some("10.244.0.0/16"));
        assert_eq!(s.active_node_subnet_length, Some(24));
        assert_eq!(
            (s.total_subnets, s.allocated_subnets, s.free_subnets),
            (Some(256), Some(3), Some(253))
        );
        assert_eq!(s.pending_nodes, Some(0));
        let ready = find(&s.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", APPLIED)
        );
        assert_eq!(ready.observed_generation, Some(2));
        assert_eq!(find(&s.conditions, DEGRADED).unwrap().status, "False");
        assert_eq!(reason(&s), None);
    }

    #[test]
    fn rederiving_an_unchanged_world_changes_nothing() {
        let first = derive(&healthy(), &CanalNetworkStatus::default(), at(1));
        let again = derive(&healthy(), &first, at(100));
        assert_eq!(first, again, "no churn, transition times kept");
    }

    #[test]
    fn problems_in_priority_order() {
        let mut a = healthy();
        a.waiting = vec!["n9".into()];
        a.conflicts = vec![("n7".into(), "10.0.0.0/24 is outside 10.244.0.0/16".into())];
        let s = derive(&a, &CanalNetworkStatus::default(), at(1));
        assert_eq!(reason(&s), Some(CONFLICT));
        let msg = &find(&s.conditions, DEGRADED).unwrap().message;
        assert!(msg.contains("n7 (10.0.0.0/24 is outside"), "{msg}");
        assert!(
            msg.contains("1 Node(s) wait for a subnet because all 256 /24"),
            "{msg}"
        );
        assert_eq!(s.pending_nodes, Some(1));

        a.refused = Some(RefusedChange {
            active: ("10.244.0.0/16".parse().unwrap(), 24),
            wanted: Some(("10.245.0.0/16".parse().unwrap(), 24)),
            allocated: 3,
        });
        let s = derive(&a, &s, at(2));
        assert_eq!(reason(&s), Some(LIVE_CHANGE_REFUSED));
        let ready = find(&s.conditions, READY).unwrap();
        assert_eq!(ready.status, "False");
        assert!(
            ready
                .message
                .contains("clusterCIDR 10.244.0.0/16 -> 10.245.0.0/16")
        );
        assert!(ready.message.contains("drain and delete every Node"));
        assert!(!ready.message.contains("nodeSubnetLength 24 ->"));
        assert_eq!(s.active_cluster_cidr.as_deref(), Some("10.244.0.0/16"));

        a.invalid_spec = Some("backend.vni 0 must be within 1..16777215".into());
        let s = derive(&a, &s, at(3));
        assert_eq!(reason(&s), Some(INVALID_SPEC));
    }

    #[test]
    fn address_conflicts_are_a_conflict_naming_the_node() {
        let mut a = healthy();
        a.address_conflicts = vec![(
            "n3".into(),
            "InternalIP 10.244.3.7 lies inside clusterCIDR 10.244.0.0/16".into(),
        )];
        let s = derive(&a, &CanalNetworkStatus::default(), at(1));
        assert_eq!(reason(&s), Some(CONFLICT));
        let msg = &find(&s.conditions, DEGRADED).unwrap().message;
        assert!(
            msg.contains("Node n3: InternalIP 10.244.3.7 lies inside clusterCIDR"),
            "{msg}"
        );
        assert_eq!(find(&s.conditions, READY).unwrap().status, "False");
    }

    #[test]
    fn long_lists_are_cut() {
        let mut a = healthy();
        a.waiting = (0..12).map(|i| format!("n{i}")).collect();
        let s = derive(&a, &CanalNetworkStatus::default(), at(1));
        let msg = &find(&s.conditions, READY).unwrap().message;
        assert!(msg.contains("n0, n1, n2, n3, n4 and 7 more"), "{msg}");
        assert_eq!(reason(&s), Some(SUBNET_EXHAUSTED));
    }

    #[test]
    fn other_networks_are_ignored() {
        let s = ignored(Some(4), &CanalNetworkStatus::default(), at(1));
        let ready = find(&s.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", IGNORED)
        );
        assert_eq!(reason(&s), Some(IGNORED));
        assert_eq!(s.total_subnets, None);
        assert_eq!(ignored(Some(4), &s, at(50)), s);
    }

    #[test]
    fn agents_reporting_failures_degrade_the_network() {
        use crate::network::programmed::{Failing, Summary};
        let mut a = healthy();
        a.programmed = Some(Summary {
            total: 3,
            programmed: 3,
            ..Default::default()
        });
        let s = derive(&a, &CanalNetworkStatus::default(), at(1));
        assert_eq!(reason(&s), None);
        assert_eq!(s.programmed.as_deref(), Some("3/3 nodes"));
        assert_eq!((s.programmed_nodes, s.total_nodes), (Some(3), Some(3)));

        a.programmed = Some(Summary {
            total: 3,
            programmed: 0,
            failing: ["n1", "n2", "n3"]
                .map(|n| Failing {
                    node: n.into(),
                    reason: "MTURejected".into(),
                    message: "MTU: refused".into(),
                })
                .to_vec(),
            unreported: 0,
        });
        let s = derive(&a, &s, at(2));
        assert_eq!(reason(&s), Some(NODES_NOT_PROGRAMMED));
        let degraded = find(&s.conditions, DEGRADED).unwrap();
        assert!(
            degraded.message.starts_with("0 of 3 nodes programmed"),
            "{}",
            degraded.message
        );
        assert!(degraded.message.contains("n1 (MTURejected: MTU: refused)"));
        assert_eq!(find(&s.conditions, READY).unwrap().status, "False");
        assert_eq!(s.programmed.as_deref(), Some("0/3 nodes"));

        // A root cause the controller knows comes first.
        a.conflicts = vec![("n7".into(), "overlaps".into())];
        let s = derive(&a, &s, at(3));
        assert_eq!(reason(&s), Some(CONFLICT));
        assert!(
            find(&s.conditions, DEGRADED)
                .unwrap()
                .message
                .contains("0 of 3 nodes programmed")
        );
    }

    #[test]
    fn owned_part_drops_policy_fields() {
        let mut s = derive(&healthy(), &CanalNetworkStatus::default(), at(1));
        let clean = s.clone();
        s.policy_enforcement = Some("3/3 nodes".into());
        s.policy_nodes = Some(3);
        assert_eq!(owned_part(&s), clean);
    }
}
