//! Answers `kubectl canal explain --verify`: on request (the NodePolicySet
//! annotation [`VERIFY_REQUEST_ANNOTATION`]) the agent compares the kernel
//! with what it programmed (the drift check: read, diff, repair what
//! differs) and writes what it found into its NodePolicySet's
//! `status.kernel`, with its latest drift repairs.
//!
//! Why an object and not an HTTP endpoint: the answer is written with the
//! node's own credentials into the one object the agent admission policy
//! lets only this node's agent write, and read by the user with their own
//! credentials through the API server. Nothing listens on the node, no
//! user token ever reaches a node (a compromised node could replay a
//! bearer token sent to it), and a pod can neither ask nor answer. Asking
//! needs `patch` on NodePolicySets (admins); an answer costs one kernel
//! read, at most one a second per node.
//!
//! The agent repairs drift within milliseconds of a firewall change
//! notification, so "missing now" is rare; hence the answer reports both
//! what the requested check found (`held`, `missing`) and when recent
//! repairs happened (`repairs`).

use std::collections::VecDeque;
use std::time::Duration;

use canal_crds::{DriftRepair, KernelCheck, NodePolicySet, VERIFY_REQUEST_ANNOTATION};
use futures::StreamExt;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use tokio::sync::mpsc;
use tracing::debug;

use super::enforcer::{Error, SyncStats};
use super::plan::PlanStats;

/// Repairs kept for the answer.
pub const REPAIRS_KEPT: usize = 5;
/// Chains named per repair.
pub const CHAINS_KEPT: usize = 10;
/// Requests answered per second, at most.
pub const MIN_REQUEST_INTERVAL: Duration = Duration::from_secs(1);

/// The verify state of one agent (pure: fed by the agent's loop).
#[derive(Debug, Default)]
pub struct Verifier {
    pending: Option<String>,
    answer: Option<KernelCheck>,
    repairs: VecDeque<DriftRepair>,
}

impl Verifier {
    /// A request arrived: the next kernel check answers it.
    pub fn request(&mut self, id: String) {
        self.pending = Some(id);
    }

    /// Whether a request waits for a check.
    pub fn pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Records a drift check's outcome. `found_by` names the trigger for
    /// repairs nobody asked for; `generation` is the programmed one;
    /// `now` RFC 3339.
    pub fn checked(
        &mut self,
        found_by: &str,
        generation: Option<i64>,
        result: Result<&SyncStats, &Error>,
        now: &str,
    ) {
        let requested = self.pending.take();
        let found_by = if requested.is_some() {
            "request"
        } else {
            found_by
        };
        if let Ok(stats) = result
            && stats.applied
        {
            self.repairs.push_front(DriftRepair {
                repaired_at: now.to_string(),
                found_by: found_by.to_string(),
                changes: changes_text(&stats.plan, stats.removed_other),
                chains: stats
                    .written_chains
                    .iter()
                    .take(CHAINS_KEPT)
                    .cloned()
                    .collect(),
            });
            self.repairs.truncate(REPAIRS_KEPT);
        }
        let Some(id) = requested else {
            return;
        };
        let (held, missing, dataplane) = match result {
            Ok(s) if !s.applied => (true, None, s.dataplane),
            Ok(s) => {
                let mut text = format!(
                    "{} (repaired at once)",
                    changes_text(&s.plan, s.removed_other)
                );
                if !s.written_chains.is_empty() {
                    let shown: Vec<&str> = s
                        .written_chains
                        .iter()
                        .take(CHAINS_KEPT)
                        .map(String::as_str)
                        .collect();
                    text.push_str(&format!("; chains: {}", shown.join(", ")));
                }
                (false, Some(text), s.dataplane)
            }
            Err(e) => (
                false,
                Some(format!("the kernel could not be read or repaired: {e}")),
                None,
            ),
        };
        self.answer = Some(KernelCheck {
            request: Some(id),
            checked_at: Some(now.to_string()),
            generation,
            dataplane: dataplane.map(|d| d.as_str().to_string()),
            held,
            missing,
            repairs: self.repairs.iter().cloned().collect(),
        });
    }

    /// What `status.kernel` says (None until the first request is answered:
    /// repairs alone cause no status write).
    pub fn report(&self) -> Option<KernelCheck> {
        self.answer.clone()
    }
}

/// A plan's counts in words (only the non-zero ones).
pub fn changes_text(p: &PlanStats, removed_other: bool) -> String {
    let parts: Vec<String> = [
        (p.chains_written, "chains rewritten"),
        (p.chains_deleted, "chains deleted"),
        (p.rules_written, "rules written"),
        (p.hooks_fixed, "hooks fixed"),
        (p.sets_created, "sets created"),
        (p.sets_swapped, "sets replaced"),
        (p.sets_destroyed, "sets destroyed"),
        (p.members_added, "set members added"),
        (p.members_removed, "set members removed"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .chain(removed_other.then(|| "state removed from the other dataplane".to_string()))
    .collect();
    if parts.is_empty() {
        "changes written".to_string()
    } else {
        parts.join(", ")
    }
}

/// Watches this node's NodePolicySet metadata and sends each new request id
/// (at most one per [`MIN_REQUEST_INTERVAL`]). Ends when `tx` closes.
pub async fn watch_requests(client: kube::Client, node: String, tx: mpsc::Sender<String>) {
    // Metadata only: the annotation is all this needs.
    let api: Api<PartialObjectMeta<NodePolicySet>> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let stream = watcher::watcher(api, config)
        .default_backoff()
        .applied_objects();
    let mut stream = std::pin::pin!(stream);
    let mut last: Option<String> = None;
    let mut next_at = tokio::time::Instant::now();
    while let Some(item) = stream.next().await {
        let meta = match item {
            Ok(m) => m,
            Err(e) => {
                debug!("watching NodePolicySet {node} for verify requests: {e}");
                continue;
            }
        };
        let id = meta
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(VERIFY_REQUEST_ANNOTATION))
            .cloned();
        let Some(id) = id.filter(|id| Some(id) != last.as_ref()) else {
            continue;
        };
        last = Some(id.clone());
        tokio::time::sleep_until(next_at).await;
        next_at = tokio::time::Instant::now() + MIN_REQUEST_INTERVAL;
        debug!(request = %id, "kernel verify requested");
        if tx.send(id).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Plane;

    fn stats(applied: bool) -> SyncStats {
        SyncStats {
            dataplane: Some(Plane::NfTables),
            applied,
            plan: PlanStats {
                chains_written: 1,
                rules_written: 3,
                ..PlanStats::default()
            },
            written_chains: vec!["ep-in-cali1".into()],
            ..SyncStats::default()
        }
    }

    #[test]
    fn answers_only_requests_and_keeps_the_latest_repairs() {
        let mut v = Verifier::default();
        // A repair nobody asked about is kept but causes no status.
        v.checked("firewall_change", Some(3), Ok(&stats(true)), "t1");
        assert_eq!(v.report(), None);
        v.request("r1".into());
        assert!(v.pending());
        v.checked("drift_check", Some(3), Ok(&stats(false)), "t2");
        let a = v.report().unwrap();
        assert_eq!(a.request.as_deref(), Some("r1"));
        assert!(a.held && a.missing.is_none());
        assert_eq!(a.dataplane.as_deref(), Some("nftables"));
        assert_eq!(a.repairs.len(), 1);
        assert_eq!(a.repairs[0].found_by, "firewall_change");
        assert_eq!(a.repairs[0].changes, "1 chains rewritten, 3 rules written");
        // Missing when asked: not held, says what, and is the newest repair.
        v.request("r2".into());
        v.checked("drift_check", Some(4), Ok(&stats(true)), "t3");
        let a = v.report().unwrap();
        assert!(!a.held);
        assert_eq!(
            a.missing.as_deref(),
            Some("1 chains rewritten, 3 rules written (repaired at once); chains: ep-in-cali1")
        );
        assert_eq!(
            (
                a.repairs[0].found_by.as_str(),
                a.repairs[0].repaired_at.as_str()
            ),
            ("request", "t3")
        );
        for i in 0..10 {
            v.checked("drift_check", None, Ok(&stats(true)), &format!("x{i}"));
        }
        v.request("r3".into());
        v.checked("drift_check", None, Ok(&stats(false)), "t4");
        assert_eq!(v.report().unwrap().repairs.len(), REPAIRS_KEPT);
        assert!(!v.pending());
    }

    #[test]
    fn changes_in_words() {
        assert_eq!(
            changes_text(&PlanStats::default(), false),
            "changes written"
        );
        assert_eq!(
            changes_text(
                &PlanStats {
                    members_added: 2,
                    hooks_fixed: 1,
                    ..PlanStats::default()
                },
                true
            ),
            "1 hooks fixed, 2 set members added, state removed from the other dataplane"
        );
    }
}
