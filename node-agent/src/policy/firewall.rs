//! When the policy task looks at the kernel between syncs: the schedule of
//! its cheap checks, fed by the firewall watch ([`super::watch`]). Pure
//! decisions ([`concerns_policy`]) are separate from the timers.
//!
//! - A foreign nf_tables change to a table, chain or hook canal's policy
//!   uses asks for a drift check after a short settle time (a reload is a
//!   burst: `iptables -F; iptables -X; ipset destroy` takes milliseconds),
//!   so one check repairs the whole burst.
//! - Every `set_check_interval` the ipset headers are compared with what
//!   was applied (ipset sends no notification).
//! - On iptables-legacy hosts (no notifications at all) the legacy tables'
//!   sizes are compared every `legacy_poll_interval`.
//! - Every `counter_interval` the anti-spoofing counters are read for the
//!   metric.
//!
//! Nothing here re-reads the rules: a full read happens only when one of
//! these says something changed (and on the periodic drift check).

use std::time::Duration;

use tokio::sync::broadcast::{self, error::RecvError};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::names;
use super::nfnl::FAMILY_IPV4;
use super::ruleset::Table;
use super::watch::{Backend, Change, FirewallWatch, ObjectKind};

/// Tuning of the checks between syncs.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// Wait after the first foreign change before the check.
    pub settle: Duration,
    /// Period of the ipset header comparison.
    pub set_check_interval: Duration,
    /// Period of the legacy table comparison (iptables-legacy only).
    pub legacy_poll_interval: Duration,
    /// Period of the anti-spoofing counter read.
    pub counter_interval: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            settle: Duration::from_millis(20),
            set_check_interval: Duration::from_millis(500),
            legacy_poll_interval: Duration::from_millis(250),
            counter_interval: Duration::from_secs(2),
        }
    }
}

/// What the policy task should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Something changed: run a drift check (`source` for the metric).
    Check {
        /// How it was noticed (a `CHANGE_SOURCES` value).
        source: &'static str,
    },
    /// Compare the ipset headers.
    CheckSets,
    /// Compare the legacy table sizes.
    PollLegacy,
    /// Read the anti-spoofing counters.
    ReadCounters,
}

/// Whether a foreign change touches what policy enforcement programs: an
/// IPv4 table it uses, and there one of its chains, a built-in chain it
/// hooks, or the table itself. Lost notifications always do.
pub fn concerns_policy(change: &Change) -> bool {
    match change {
        Change::Lost => true,
        Change::Nft {
            family,
            table,
            object,
            chain,
        } => {
            let Some(table) = Table::parse(table) else {
                return false;
            };
            if *family != FAMILY_IPV4 || *object == ObjectKind::Set {
                return false;
            }
            match chain {
                None => true,
                Some(c) => {
                    names::is_owned_chain_in(table, c) || table.builtins().contains(&c.as_str())
                }
            }
        }
    }
}

/// The timers and the change stream of the policy task.
#[derive(Debug)]
pub struct Monitor {
    changes: Option<broadcast::Receiver<Change>>,
    schedule: Schedule,
    due: Option<(Instant, &'static str)>,
    sets: Interval,
    counters: Interval,
    legacy: Option<Interval>,
}

fn interval(period: Duration) -> Interval {
    let mut i = tokio::time::interval(period);
    i.set_missed_tick_behavior(MissedTickBehavior::Delay);
    i.reset();
    i
}

impl Monitor {
    /// The schedule for a node whose iptables is `backend`, with the
    /// notifications of `watch` (None: none could be subscribed to).
    pub fn new(backend: Backend, watch: Option<&FirewallWatch>, schedule: Schedule) -> Monitor {
        let changes = match backend {
            Backend::Nft => watch.map(FirewallWatch::subscribe),
            Backend::Legacy => None,
        };
        Monitor {
            changes,
            schedule,
            due: None,
            sets: interval(schedule.set_check_interval),
            counters: interval(schedule.counter_interval),
            legacy: (backend == Backend::Legacy).then(|| interval(schedule.legacy_poll_interval)),
        }
    }

    /// Whether nf_tables notifications are being received.
    pub fn notified(&self) -> bool {
        self.changes.is_some()
    }

    /// Asks for a drift check now.
    pub fn check_now(&mut self, source: &'static str) {
        self.due = Some((Instant::now(), source));
    }

    /// Waits for the next thing to do. Cancel-safe: every state lives in
    /// `self`.
    pub async fn next(&mut self) -> Wake {
        loop {
            let due = self.due.map(|(at, _)| at);
            tokio::select! {
                change = recv(&mut self.changes) => match change {
                    Ok(c) if concerns_policy(&c) => {
                        let source = if c == Change::Lost { "nftables_lost" } else { "nftables" };
                        let at = Instant::now() + self.schedule.settle;
                        self.due.get_or_insert((at, source));
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => {
                        let at = Instant::now() + self.schedule.settle;
                        self.due.get_or_insert((at, "nftables_lost"));
                    }
                    Err(RecvError::Closed) => {
                        tracing::warn!("the nf_tables notification watch stopped; relying on the periodic drift check");
                        self.changes = None;
                    }
                },
                () = sleep_until(due) => {
                    if let Some((_, source)) = self.due.take() {
                        return Wake::Check { source };
                    }
                }
                _ = self.sets.tick() => return Wake::CheckSets,
                _ = self.counters.tick() => return Wake::ReadCounters,
                _ = tick(self.legacy.as_mut()) => return Wake::PollLegacy,
            }
        }
    }
}

async fn recv(rx: &mut Option<broadcast::Receiver<Change>>) -> Result<Change, RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn tick(i: Option<&mut Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nft(table: &str, object: ObjectKind, chain: Option<&str>) -> Change {
        Change::Nft {
            family: FAMILY_IPV4,
            table: table.into(),
            object,
            chain: chain.map(String::from),
        }
    }

    #[test]
    fn only_changes_to_what_policy_programs_concern_it() {
        use ObjectKind::{Chain, Rule, Set, Table as T};
        for (c, want) in [
            (nft("filter", Rule, Some("FORWARD")), true),
            (nft("filter", Rule, Some("CANAL-TW-cali0123456789a")), true),
            (nft("filter", Chain, Some("CANAL-FORWARD")), true),
            (nft("filter", T, None), true),
            (nft("raw", Rule, Some("PREROUTING")), true),
            (nft("raw", Rule, Some("CANAL-PREROUTING")), true),
            (nft("security", Rule, Some("CANAL-GUARD-FORWARD")), true),
            (nft("filter", Rule, Some("KUBE-FORWARD")), false),
            (nft("filter", Rule, Some("CANAL-FWD-ALLOW")), false),
            (nft("nat", Rule, Some("POSTROUTING")), false),
            (nft("mangle", T, None), false),
            (nft("filter", Set, None), false),
            (Change::Lost, true),
        ] {
            assert_eq!(concerns_policy(&c), want, "{c:?}");
        }
        let v6 = Change::Nft {
            family: 10,
            table: "filter".into(),
            object: Rule,
            chain: Some("FORWARD".into()),
        };
        assert!(!concerns_policy(&v6), "no IPv6 rules yet");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_one_check_after_the_settle_time() {
        let (tx, rx) = broadcast::channel(16);
        let mut m = Monitor {
            changes: Some(rx),
            schedule: Schedule::default(),
            due: None,
            sets: interval(Duration::from_secs(3600)),
            counters: interval(Duration::from_secs(7200)),
            legacy: None,
        };
        let start = Instant::now();
        for _ in 0..5 {
            tx.send(nft("filter", ObjectKind::Rule, Some("FORWARD")))
                .unwrap();
        }
        tx.send(nft("nat", ObjectKind::Rule, Some("POSTROUTING")))
            .unwrap();
        assert_eq!(m.next().await, Wake::Check { source: "nftables" });
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(20) && waited < Duration::from_millis(30));
        // Nothing else pending: the next wake is a timer, an hour later.
        assert_eq!(m.next().await, Wake::CheckSets);
        assert!(start.elapsed() >= Duration::from_secs(3600));
    }
}
