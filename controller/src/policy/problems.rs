//! Objects that cannot be written, and what users see about them: the
//! `Published` condition on the NodePolicySets of the nodes that depend on
//! them and the `PolicyPublished` condition on CanalNetwork `default`.
//! Pure: the shell records outcomes and writes the conditions derived here.

use std::collections::{BTreeMap, BTreeSet};

use canal_crds::condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::index::Kind;

/// Condition type on a NodePolicySet, written by canal-controller.
pub const PUBLISHED: &str = "Published";
/// Condition type on CanalNetwork `default`, written by the policy controller.
pub const POLICY_PUBLISHED: &str = "PolicyPublished";
/// Reason: an object is over the size bound.
pub const TOO_LARGE: &str = "ObjectTooLarge";
/// Reason: the API server refused an object (not a transient failure).
pub const REJECTED: &str = "Rejected";
/// Reason of a True condition.
pub const ALL_WRITTEN: &str = "AllWritten";

/// How many names a message lists before "and N more".
const NAMES_SHOWN: usize = 5;

/// An object that cannot be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Its kind.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// [`TOO_LARGE`] or [`REJECTED`].
    pub reason: &'static str,
    /// What happened, for people.
    pub message: String,
}

/// The objects that cannot be written now, by (kind, name).
#[derive(Clone, Debug, Default)]
pub struct Problems {
    by_object: BTreeMap<(Kind, String), Problem>,
}

impl Problems {
    /// Records (or updates) a problem.
    pub fn record(&mut self, p: Problem) {
        self.by_object.insert((p.kind, p.name.clone()), p);
    }

    /// The object was written, deleted or is no longer wanted. Returns
    /// whether a problem was cleared.
    pub fn clear(&mut self, kind: Kind, name: &str) -> bool {
        self.by_object.remove(&(kind, name.to_string())).is_some()
    }

    /// No problems.
    pub fn is_empty(&self) -> bool {
        self.by_object.is_empty()
    }

    /// Number of objects that cannot be written.
    pub fn len(&self) -> usize {
        self.by_object.len()
    }

    /// Every problem, by kind and name.
    pub fn iter(&self) -> impl Iterator<Item = &Problem> {
        self.by_object.values()
    }
}

/// A condition's content (what a change is judged by; transition times
/// aside).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionView {
    /// True / False.
    pub status: bool,
    /// Reason.
    pub reason: String,
    /// Message.
    pub message: String,
}

impl ConditionView {
    /// Reads a condition of `type_` from a list.
    pub fn find(conditions: &[Condition], type_: &str) -> Option<ConditionView> {
        condition::find(conditions, type_).map(|c| ConditionView {
            status: c.status == "True",
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
    }

    /// As a Kubernetes condition stamped `now` (or keeping `previous`'s
    /// transition time when the status is the same).
    pub fn to_condition(&self, type_: &str, previous: Option<&Condition>, now: Time) -> Condition {
        let mut c = condition::condition(
            type_,
            self.status,
            &self.reason,
            self.message.clone(),
            None,
            now,
        );
        if let Some(p) = previous
            && p.status == c.status
        {
            c.last_transition_time = p.last_transition_time.clone();
        }
        c
    }
}

fn listed(names: &[&str]) -> String {
    let mut out = names
        .iter()
        .take(NAMES_SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > NAMES_SHOWN {
        out.push_str(&format!(" and {} more", names.len() - NAMES_SHOWN));
    }
    out
}

/// The `Published` condition of a node's NodePolicySet given the problems
/// its policy depends on (None: nothing to say, and nothing was said before).
pub fn node_condition(problems: &[&Problem], said_before: bool) -> Option<ConditionView> {
    match problems.first() {
        None if said_before => Some(ConditionView {
            status: true,
            reason: ALL_WRITTEN.into(),
            message: "every object this node's policy needs is written".into(),
        }),
        None => None,
        Some(first) => {
            let what: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
            Some(ConditionView {
                status: false,
                reason: first.reason.into(),
                message: format!(
                    "canal-controller cannot write {} object(s) this node's policy needs, so the node keeps the rules it has: {}",
                    problems.len(),
                    listed(&what)
                ),
            })
        }
    }
}

/// The `PolicyPublished` condition of CanalNetwork `default`.
pub fn network_condition(
    problems: &Problems,
    nodes: &BTreeSet<String>,
    said_before: bool,
) -> Option<ConditionView> {
    let Some(first) = problems.iter().next() else {
        return said_before.then(|| ConditionView {
            status: true,
            reason: ALL_WRITTEN.into(),
            message: "every NodePolicySet and the PolicyGroups and PeerSets they need are written"
                .into(),
        });
    };
    let what: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
    let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
    Some(ConditionView {
        status: false,
        reason: first.reason.into(),
        message: format!(
            "{} object(s) cannot be written ({}); {} node(s) keep the policy they have{}",
            problems.len(),
            listed(&what),
            nodes.len(),
            if names.is_empty() {
                String::new()
            } else {
                format!(": {}", listed(&names))
            }
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> Problem {
        Problem {
            kind: Kind::PolicyGroup,
            name: name.into(),
            reason: TOO_LARGE,
            message: format!("PolicyGroup {name} would be 600000 bytes"),
        }
    }

    #[test]
    fn conditions_say_what_cannot_be_written_and_clear_once_said() {
        assert_eq!(
            node_condition(&[], false),
            None,
            "never said: nothing to say"
        );
        let a = p("pg-a");
        let c = node_condition(&[&a], false).unwrap();
        assert!(!c.status);
        assert_eq!(c.reason, TOO_LARGE);
        assert!(c.message.contains("pg-a would be 600000 bytes"), "{c:?}");
        let cleared = node_condition(&[], true).unwrap();
        assert!(cleared.status);

        let mut all = Problems::default();
        assert_eq!(network_condition(&all, &BTreeSet::new(), false), None);
        all.record(a.clone());
        all.record(a.clone());
        assert_eq!(all.len(), 1);
        let nodes: BTreeSet<String> = (0..8).map(|i| format!("n{i}")).collect();
        let c = network_condition(&all, &nodes, false).unwrap();
        assert!(!c.status);
        assert!(c.message.contains("8 node(s)"), "{}", c.message);
        assert!(c.message.contains("and 3 more"), "{}", c.message);
        assert!(all.clear(Kind::PolicyGroup, "pg-a"));
        assert!(!all.clear(Kind::PolicyGroup, "pg-a"));
        assert!(network_condition(&all, &nodes, true).unwrap().status);
    }

    #[test]
    fn transition_time_moves_only_with_the_status() {
        let t = |s| Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap());
        let v = node_condition(&[&p("x")], false).unwrap();
        let first = v.to_condition(PUBLISHED, None, t(10));
        let again = v.to_condition(PUBLISHED, Some(&first), t(20));
        assert_eq!(again.last_transition_time, t(10));
        let cleared =
            node_condition(&[], true)
                .unwrap()
                .to_condition(PUBLISHED, Some(&again), t(30));
        assert_eq!(cleared.last_transition_time, t(30));
    }
}
