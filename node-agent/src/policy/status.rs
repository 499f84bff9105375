//! Builds the NodePolicySet status the agent writes after a sync
//! (field manager `canal-agent`, via `patch_status`).

use canal_crds::NodePolicySetStatus;
use canal_crds::condition::{ENFORCED, condition, set_condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::enforcer::{Error, SyncStats};

/// The status after syncing `generation` with `outcome`. `previous` is the
/// status currently stored, so transition times move only on change and a
/// failed sync keeps the generation that *is* programmed. Returns the new
/// status and whether it differs from `previous` (write only when it does).
pub fn enforced_status(
    previous: Option<&NodePolicySetStatus>,
    generation: Option<i64>,
    outcome: Result<&SyncStats, &Error>,
    now: Time,
) -> (NodePolicySetStatus, bool) {
    let mut status = previous.cloned().unwrap_or_default();
    let cond = match outcome {
        Ok(stats) => {
            status.observed_generation = generation;
            status.endpoints = Some(stats.endpoints as u32);
            status.rules = Some(stats.rules as u32);
            status.sets = Some(stats.sets as u32);
            status.dataplane = stats.dataplane.map(|d| d.as_str().to_string());
            let mut message = format!(
                "{} endpoints, {} rules, {} sets ({} members) programmed with {}",
                stats.endpoints,
                stats.rules,
                stats.sets,
                stats.set_members,
                stats.dataplane.map_or("?", |d| d.as_str())
            );
            if let Some(first) = stats.warnings.first() {
                message.push_str(&format!(
                    "; {} input parts skipped and match nothing, first: {first}",
                    stats.warnings.len()
                ));
            }
            let reason = if stats.warnings.is_empty() {
                "Programmed"
            } else {
                "ProgrammedWithWarnings"
            };
            condition(ENFORCED, true, reason, message, generation, now)
        }
        Err(e) => {
            let reason = match e.category() {
                "read_state" => "KernelReadFailed",
                "ipset_restore" => "IpsetRestoreFailed",
                "iptables_restore" => "IptablesRestoreFailed",
                "nft" => "NftablesFailed",
                "tool_missing" => "ToolMissing",
                _ => "RunDirFailed",
            };
            condition(ENFORCED, false, reason, e.to_string(), generation, now)
        }
    };
    let mut changed = set_condition(&mut status.conditions, cond);
    if let Some(prev) = previous {
        changed |= prev.observed_generation != status.observed_generation
            || prev.endpoints != status.endpoints
            || prev.rules != status.rules
            || prev.sets != status.sets
            || prev.dataplane != status.dataplane;
    } else {
        changed = true;
    }
    (status, changed)
}

/// The status while `policy.enabled` is false: the agent has removed every
/// policy chain and set, so the NodePolicySet (of `generation`) is observed
/// but not enforced. Returns the status and whether it differs from `previous`.
pub fn disabled_status(
    previous: Option<&NodePolicySetStatus>,
    generation: Option<i64>,
    now: Time,
) -> (NodePolicySetStatus, bool) {
    let mut status = previous.cloned().unwrap_or_default();
    status.observed_generation = generation;
    status.endpoints = Some(0);
    status.rules = Some(0);
    status.sets = Some(0);
    let cond = condition(
        ENFORCED,
        false,
        "PolicyDisabled",
        "CanalNetwork policy.enabled is false: no NetworkPolicy is enforced on this node",
        generation,
        now,
    );
    let mut changed = set_condition(&mut status.conditions, cond);
    changed |= previous.is_none_or(|p| {
        p.observed_generation != status.observed_generation
            || p.endpoints != status.endpoints
            || p.rules != status.rules
            || p.sets != status.sets
    });
    (status, changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::exec::ExecError;
    use k8s_openapi::jiff::Timestamp;

    fn at(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    #[test]
    fn success_then_failure_keeps_programmed_generation() {
        let stats = SyncStats {
            endpoints: 2,
            rules: 30,
            sets: 1,
            ..SyncStats::default()
        };
        let (s1, changed) = enforced_status(None, Some(4), Ok(&stats), at(10));
        assert!(changed);
        assert_eq!(s1.observed_generation, Some(4));
        assert_eq!(s1.conditions[0].status, "True");
        let (s2, changed) = enforced_status(Some(&s1), Some(4), Ok(&stats), at(20));
        assert!(!changed, "same outcome must not cause a write");
        assert_eq!(s2.conditions[0].last_transition_time, at(10));
        let err = Error::IptablesRestore(ExecError::Failed {
            program: "iptables-restore".into(),
            code: Some(1),
            stderr: "line 3 failed".into(),
        });
        let (s3, changed) = enforced_status(Some(&s2), Some(5), Err(&err), at(30));
        assert!(changed);
        assert_eq!(s3.observed_generation, Some(4));
        assert_eq!(s3.conditions[0].status, "False");
        assert_eq!(s3.conditions[0].reason, "IptablesRestoreFailed");
        assert_eq!(s3.conditions[0].last_transition_time, at(30));
    }

    #[test]
    fn disabled_is_observed_but_not_enforced() {
        let stats = SyncStats {
            endpoints: 2,
            rules: 30,
            ..SyncStats::default()
        };
        let (s1, _) = enforced_status(None, Some(4), Ok(&stats), at(10));
        let (s2, changed) = disabled_status(Some(&s1), Some(4), at(20));
        assert!(changed);
        assert_eq!(s2.observed_generation, Some(4));
        assert_eq!(s2.rules, Some(0));
        assert_eq!(s2.conditions[0].status, "False");
        assert_eq!(s2.conditions[0].reason, "PolicyDisabled");
        let (_, changed) = disabled_status(Some(&s2), Some(4), at(30));
        assert!(!changed, "same outcome must not cause a write");
    }
}
