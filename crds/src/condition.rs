//! Kubernetes-style status conditions, with transition times that move only
//! when a condition's status changes, so repeated reconciles cause no churn.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition type: the resource is fully applied.
pub const READY: &str = "Ready";
/// Condition type: something stops the resource from being fully applied.
pub const DEGRADED: &str = "Degraded";
/// Condition type on a NodePolicySet: the agent has programmed it.
pub const ENFORCED: &str = "Enforced";
/// Node condition type written by canal-agent about its own Node: the pod
/// network (overlay, masquerade, CNI network file) is fully programmed
/// there. canal-controller sums it up as "N of M nodes programmed".
pub const NODE_PROGRAMMED: &str = "CanalNetworkProgrammed";
/// Reason of [`NODE_PROGRAMMED`] when it is True.
pub const PROGRAMMED: &str = "Programmed";

/// Inserts or updates `new` in `conditions`. The transition time of an
/// existing condition is kept when its status is unchanged. Returns whether
/// anything other than the transition time changed.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            let changed = old.status != new.status
                || old.reason != new.reason
                || old.message != new.message
                || old.observed_generation != new.observed_generation;
            if old.status == new.status {
                let kept = old.last_transition_time.clone();
                *old = Condition {
                    last_transition_time: kept,
                    ..new
                };
            } else {
                *old = new;
            }
            changed
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// Builds a condition stamped with `now`.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time: now,
    }
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True when the condition of that type exists and has status "True".
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn unchanged_status_keeps_transition_time() {
        let mut cs = vec![];
        assert!(set_condition(
            &mut cs,
            condition(READY, true, "Ok", "fine", Some(1), at(10))
        ));
        assert!(!set_condition(
            &mut cs,
            condition(READY, true, "Ok", "fine", Some(1), at(20))
        ));
        assert_eq!(cs[0].last_transition_time, at(10));
        assert!(set_condition(
            &mut cs,
            condition(READY, true, "Ok", "finer", Some(1), at(30))
        ));
        assert_eq!(cs[0].last_transition_time, at(10));
        assert!(set_condition(
            &mut cs,
            condition(READY, false, "Bad", "broken", Some(2), at(40))
        ));
        assert_eq!(cs[0].last_transition_time, at(40));
        assert_eq!(cs.len(), 1);
        assert!(!is_true(&cs, READY));
    }
}
