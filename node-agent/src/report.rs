//! What a sync did, step by step, and what the agent tells the user about
//! it: its readiness (`/readyz`), the Node condition
//! `CanalNetworkProgrammed` (which canal-controller sums up on the
//! CanalNetwork), and an Event on the Node when that verdict changes. Pure:
//! the sync loop feeds it one [`SyncReport`] per full sync and acts on what
//! [`Tracker::record`] returns.
//!
//! The rule (so readiness tells the truth without flapping on one transient
//! error): a sync that applies everything makes the node programmed at
//! once; a failing sync is retried after [`FIRST_RETRY`], then with doubling
//! delays up to the resync period, and the node is reported not programmed
//! (readiness off, condition False, a Warning Event) only when
//! [`FAILURES_TO_REPORT`] full syncs in a row have failed. So a single
//! failure that the retry a second later does not see again changes
//! nothing, and a persistent one (a refused MTU, a missing interface) shows
//! within about a second. Events are published when the verdict changes,
//! never again for the same failure on every resync.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::time::Duration;

use canal_crds::condition::PROGRAMMED;

/// Full syncs in a row that must fail before the node is reported not programmed.
pub const FAILURES_TO_REPORT: u32 = 2;
/// Delay of the first retry after a failed sync.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Errors of one step quoted in a message; the rest are counted.
const ERRORS_SHOWN: usize = 1;
/// Notes (skipped peers) quoted in a message.
const NOTES_SHOWN: usize = 5;
/// A condition message is cut to this many bytes.
const MESSAGE_MAX: usize = 1024;

/// The steps of a sync, in the order a person should fix them (the first
/// failing one gives the condition its reason). Label values of
/// `canal_agent_sync_errors_total{step}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    /// Dumping the kernel's links, addresses, routes, neighbours and FDB.
    Dump,
    /// Choosing the underlay interface (CanalNetwork `interface`).
    Underlay,
    /// This node's own subnet (podCIDR inside clusterCIDR).
    LocalNode,
    /// Creating, recreating or changing the VXLAN device.
    Device,
    /// The VXLAN device's MTU (CanalNetwork `backend.mtu`).
    Mtu,
    /// The VXLAN device's address.
    Address,
    /// FDB entries (VTEP MAC -> peer address).
    Fdb,
    /// Neighbour entries (peer gateway -> VTEP MAC).
    Neighbour,
    /// Routes to peers' pod subnets.
    Route,
    /// IP forwarding (IPv4, and IPv6 in a cluster with IPv6).
    Forwarding,
    /// Turning IPv6 off on pods' host veths where it is not allowed (see
    /// `agent::ipv6_gate`).
    PodIpv6,
    /// The masquerade and forward-accept iptables rules.
    Masquerade,
    /// The network file canal-cni reads.
    NetworkFile,
}

impl Step {
    /// Every step.
    pub const ALL: [Step; 13] = [
        Step::Dump,
        Step::Underlay,
        Step::LocalNode,
        Step::Device,
        Step::Mtu,
        Step::Address,
        Step::Fdb,
        Step::Neighbour,
        Step::Route,
        Step::Forwarding,
        Step::PodIpv6,
        Step::Masquerade,
        Step::NetworkFile,
    ];

    /// Bounded metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Dump => "dump",
            Step::Underlay => "underlay",
            Step::LocalNode => "local_node",
            Step::Device => "device",
            Step::Mtu => "mtu",
            Step::Address => "address",
            Step::Fdb => "fdb",
            Step::Neighbour => "neighbour",
            Step::Route => "route",
            Step::Forwarding => "forwarding",
            Step::PodIpv6 => "pod_ipv6",
            Step::Masquerade => "masquerade",
            Step::NetworkFile => "network_file",
        }
    }

    /// Condition and Event reason when this is the first failing step.
    pub fn reason(self) -> &'static str {
        match self {
            Step::Dump => "KernelDumpFailed",
            Step::Underlay => "UnderlayUnavailable",
            Step::LocalNode => "NodeSubnetUnusable",
            Step::Device => "VXLANDeviceFailed",
            Step::Mtu => "MTURejected",
            Step::Address => "DeviceAddressFailed",
            Step::Fdb => "FDBEntriesFailed",
            Step::Neighbour => "NeighboursFailed",
            Step::Route => "RoutesFailed",
            Step::Forwarding => "IPForwardingFailed",
            Step::PodIpv6 => "PodIPv6GateFailed",
            Step::Masquerade => "MasqueradeFailed",
            Step::NetworkFile => "NetworkFileFailed",
        }
    }

    /// How a message names the step.
    pub fn title(self) -> &'static str {
        match self {
            Step::Dump => "kernel dump",
            Step::Underlay => "underlay",
            Step::LocalNode => "node subnet",
            Step::Device => "VXLAN device",
            Step::Mtu => "MTU",
            Step::Address => "device address",
            Step::Fdb => "FDB",
            Step::Neighbour => "neighbours",
            Step::Route => "routes",
            Step::Forwarding => "IP forwarding",
            Step::PodIpv6 => "pod IPv6 gate",
            Step::Masquerade => "masquerade",
            Step::NetworkFile => "network file",
        }
    }
}

/// What one full sync found: the errors of each failed step (every other
/// step was applied) and notes that do not make it fail (peers left out).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    failures: BTreeMap<Step, Vec<String>>,
    notes: Vec<String>,
}

impl SyncReport {
    /// An empty report.
    pub fn new() -> SyncReport {
        SyncReport::default()
    }

    /// Records a failure of `step`.
    pub fn fail(&mut self, step: Step, error: impl Display) {
        self.failures
            .entry(step)
            .or_default()
            .push(error.to_string());
    }

    /// Adds a note (shown in the condition's message, not a failure).
    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// Every step was applied.
    pub fn is_clean(&self) -> bool {
        self.failures.is_empty()
    }

    /// Whether `step` failed.
    pub fn failed(&self, step: Step) -> bool {
        self.failures.contains_key(&step)
    }

    /// The failed steps, in [`Step`] order.
    pub fn failed_steps(&self) -> impl Iterator<Item = Step> + '_ {
        self.failures.keys().copied()
    }

    /// "MTU: <first error>; masquerade: <first error> (and 2 more)". The
    /// errors of a step are sorted first: objects are applied concurrently,
    /// and the same failure must always read the same (a changed message is
    /// a new Event).
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .failures
            .iter()
            .map(|(step, errors)| {
                let mut errors = errors.clone();
                errors.sort();
                errors.dedup();
                let shown = errors
                    .iter()
                    .take(ERRORS_SHOWN)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                let more = errors.len().saturating_sub(ERRORS_SHOWN);
                if more > 0 {
                    format!("{}: {shown} (and {more} more)", step.title())
                } else {
                    format!("{}: {shown}", step.title())
                }
            })
            .collect();
        parts.join("; ")
    }

    fn notes_text(&self) -> Option<String> {
        if self.notes.is_empty() {
            return None;
        }
        let mut notes = self.notes.clone();
        notes.sort();
        let mut text = notes
            .iter()
            .take(NOTES_SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        if notes.len() > NOTES_SHOWN {
            text.push_str(&format!(" (and {} more)", notes.len() - NOTES_SHOWN));
        }
        Some(text)
    }
}

/// What the agent says about its node: the `CanalNetworkProgrammed`
/// condition's status, reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Status True.
    pub programmed: bool,
    /// Reason (CamelCase, see [`Step::reason`]).
    pub reason: &'static str,
    /// Message.
    pub message: String,
}

impl Verdict {
    fn of(report: &SyncReport) -> Verdict {
        let message = match report.failures.keys().next() {
            None => {
                let base = "the overlay (VXLAN device, routes, neighbours, FDB), masquerade and the CNI network file are programmed";
                match report.notes_text() {
                    Some(notes) => format!("{base}; {notes}"),
                    None => base.to_string(),
                }
            }
            Some(_) => {
                let mut text = format!(
                    "{}; the other steps were applied and failed steps are retried",
                    report.summary()
                );
                if let Some(notes) = report.notes_text() {
                    text.push_str("; ");
                    text.push_str(&notes);
                }
                text
            }
        };
        Verdict {
            programmed: report.is_clean(),
            reason: report
                .failures
                .keys()
                .next()
                .map_or(PROGRAMMED, |s| s.reason()),
            message: cut(message, MESSAGE_MAX),
        }
    }
}

/// An Event to publish about the node: the verdict changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// Warning (a failure) or Normal (programmed again).
    pub warning: bool,
    /// Event reason.
    pub reason: &'static str,
    /// Event note.
    pub note: String,
}

/// Reason of the Event published when a node is programmed again.
pub const RECOVERED: &str = "NetworkProgrammed";

/// What to do after a sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// An Event to publish (the verdict changed).
    pub announce: Option<Announcement>,
    /// Sync again this soon (a failure is retried before the next resync).
    pub retry_after: Option<Duration>,
}

/// Turns sync reports into readiness, the verdict and Events (see the
/// module documentation for the rule).
#[derive(Clone, Debug)]
pub struct Tracker {
    resync: Duration,
    /// Full syncs in a row that failed.
    streak: u32,
    /// What the node is reported as (None until a first verdict).
    verdict: Option<Verdict>,
    /// The last failing sync's summary (for readiness before a verdict).
    last_failure: Option<String>,
    /// Why no sync could run (inputs missing), while there is no verdict.
    waiting: Option<String>,
}

impl Tracker {
    /// A tracker for a sync loop that resyncs every `resync`.
    pub fn new(resync: Duration) -> Tracker {
        Tracker {
            resync,
            streak: 0,
            verdict: None,
            last_failure: None,
            waiting: None,
        }
    }

    /// The verdict in force, if any.
    pub fn verdict(&self) -> Option<&Verdict> {
        self.verdict.as_ref()
    }

    /// Full syncs in a row that failed.
    pub fn streak(&self) -> u32 {
        self.streak
    }

    /// No sync could run: what it waits for. Only readiness shows it (a
    /// node waiting for its podCIDR is canal-controller's to report).
    pub fn waiting(&mut self, reason: impl Into<String>) {
        self.waiting = Some(reason.into());
    }

    /// Readiness: Ok when the node is programmed, else why not (the
    /// `/readyz` body).
    pub fn readiness(&self) -> Result<(), String> {
        match &self.verdict {
            Some(v) if v.programmed => Ok(()),
            Some(v) => Err(format!(
                "the pod network is not fully programmed on this node ({} full syncs in a row failed): {}",
                self.streak, v.message
            )),
            None => Err(match (&self.last_failure, &self.waiting) {
                (Some(f), _) => format!(
                    "waiting for the first full sync; the last attempt failed and is retried: {f}"
                ),
                (None, Some(w)) => format!("waiting for the first full sync: {w}"),
                (None, None) => "waiting for the first full sync".to_string(),
            }),
        }
    }

    /// Records one full sync.
    pub fn record(&mut self, report: &SyncReport) -> Update {
        self.waiting = None;
        if report.is_clean() {
            self.streak = 0;
            self.last_failure = None;
        } else {
            self.streak = self.streak.saturating_add(1);
            self.last_failure = Some(report.summary());
        }
        let retry_after = (!report.is_clean()).then(|| self.backoff());
        let confirmed = report.is_clean() || self.streak >= FAILURES_TO_REPORT;
        if !confirmed {
            return Update {
                announce: None,
                retry_after,
            };
        }
        let next = Verdict::of(report);
        let previous = self.verdict.replace(next.clone());
        let announce = match (&previous, next.programmed) {
            // A failure, new or different from the one reported.
            (p, false) if p.as_ref() != Some(&next) => Some(Announcement {
                warning: true,
                reason: next.reason,
                note: next.message.clone(),
            }),
            (Some(p), true) if !p.programmed => Some(Announcement {
                warning: false,
                reason: RECOVERED,
                note: format!("programmed again: {}", next.message),
            }),
            _ => None,
        };
        Update {
            announce,
            retry_after,
        }
    }

    /// 1 s, 2 s, 4 s ... capped at the resync period.
    fn backoff(&self) -> Duration {
        let doublings = self.streak.saturating_sub(1).min(16);
        FIRST_RETRY
            .saturating_mul(1u32 << doublings)
            .min(self.resync)
    }
}

/// `text` cut to at most `max` bytes on a character boundary, marked "...".
fn cut(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str("...");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTU_ERR: &str = "setting the VXLAN device's MTU to 65535: Invalid argument (os error 22)";

    fn clean() -> SyncReport {
        SyncReport::new()
    }

    fn mtu() -> SyncReport {
        let mut r = SyncReport::new();
        r.fail(Step::Mtu, MTU_ERR);
        r
    }

    #[test]
    fn a_clean_first_sync_is_programmed_at_once_without_an_event() {
        let mut t = Tracker::new(Duration::from_secs(10));
        assert!(t.readiness().unwrap_err().contains("first full sync"));
        t.waiting("waiting for Node n1: no podCIDR");
        assert!(t.readiness().unwrap_err().contains("no podCIDR"));
        let u = t.record(&clean());
        assert_eq!(u, Update::default());
        assert_eq!(t.readiness(), Ok(()));
        let v = t.verdict().unwrap();
        assert!(v.programmed);
        assert_eq!(v.reason, PROGRAMMED);
    }

    #[test]
    fn one_transient_failure_changes_nothing_and_is_retried_soon() {
        let mut t = Tracker::new(Duration::from_secs(10));
        t.record(&clean());
        let u = t.record(&mtu());
        assert_eq!(u.announce, None);
        assert_eq!(u.retry_after, Some(FIRST_RETRY));
        assert_eq!(t.readiness(), Ok(()), "one failure does not flip readiness");
        assert!(t.verdict().unwrap().programmed);
        let u = t.record(&clean());
        assert_eq!(u, Update::default());
        assert_eq!(t.readiness(), Ok(()));
    }

    #[test]
    fn a_persistent_failure_is_reported_once_and_recovery_once() {
        let mut t = Tracker::new(Duration::from_secs(10));
        t.record(&clean());
        t.record(&mtu());
        let u = t.record(&mtu());
        let a = u.announce.expect("a Warning Event when confirmed");
        assert!(a.warning);
        assert_eq!(a.reason, "MTURejected");
        assert!(a.note.contains(MTU_ERR), "{}", a.note);
        let why = t.readiness().unwrap_err();
        assert!(
            why.contains(MTU_ERR) && why.contains("2 full syncs"),
            "{why}"
        );
        let v = t.verdict().unwrap().clone();
        assert!(!v.programmed);
        assert_eq!(v.reason, "MTURejected");
        assert!(
            v.message.starts_with(&format!("MTU: {MTU_ERR}")),
            "{}",
            v.message
        );
        // Every later resync with the same failure: no Event, same verdict.
        for _ in 0..20 {
            let u = t.record(&mtu());
            assert_eq!(u.announce, None);
            assert_eq!(t.verdict(), Some(&v));
        }
        // Programmed again: one Normal Event.
        let u = t.record(&clean());
        let a = u.announce.expect("a Normal Event on recovery");
        assert!(!a.warning);
        assert_eq!(a.reason, RECOVERED);
        assert_eq!(t.readiness(), Ok(()));
        assert_eq!(t.record(&clean()).announce, None);
    }

    #[test]
    fn retries_back_off_up_to_the_resync_period() {
        let mut t = Tracker::new(Duration::from_secs(10));
        let delays: Vec<u64> = (0..6)
            .map(|_| t.record(&mtu()).retry_after.unwrap().as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
        assert_eq!(t.record(&clean()).retry_after, None);
        assert_eq!(t.record(&mtu()).retry_after, Some(FIRST_RETRY));
    }

    #[test]
    fn a_failure_at_startup_is_reported_after_the_retry() {
        let mut t = Tracker::new(Duration::from_secs(10));
        assert_eq!(t.record(&mtu()).announce, None);
        let why = t.readiness().unwrap_err();
        assert!(
            why.contains("last attempt failed") && why.contains(MTU_ERR),
            "{why}"
        );
        assert!(t.verdict().is_none(), "no condition for a single failure");
        assert!(t.record(&mtu()).announce.unwrap().warning);
        assert!(!t.verdict().unwrap().programmed);
    }

    #[test]
    fn a_different_failure_is_a_new_event() {
        let mut t = Tracker::new(Duration::from_secs(10));
        t.record(&mtu());
        assert!(t.record(&mtu()).announce.is_some());
        let mut both = mtu();
        both.fail(
            Step::Masquerade,
            "iptables --version: No such file or directory (os error 2)",
        );
        let a = t.record(&both).announce.expect("another failure joined");
        assert_eq!(
            a.reason, "MTURejected",
            "the first step in order gives the reason"
        );
        assert!(
            a.note.contains("masquerade: iptables --version"),
            "{}",
            a.note
        );
        let mut masq = SyncReport::new();
        masq.fail(
            Step::Masquerade,
            "iptables --version: No such file or directory (os error 2)",
        );
        let a = t.record(&masq).announce.unwrap();
        assert_eq!(a.reason, "MasqueradeFailed");
    }

    #[test]
    fn messages_do_not_depend_on_the_order_objects_failed_in() {
        let mut a = SyncReport::new();
        let mut b = SyncReport::new();
        for e in [
            "route 10.244.3.0/24: x",
            "route 10.244.2.0/24: x",
            "route 10.244.4.0/24: x",
        ] {
            a.fail(Step::Route, e);
        }
        for e in [
            "route 10.244.4.0/24: x",
            "route 10.244.2.0/24: x",
            "route 10.244.3.0/24: x",
        ] {
            b.fail(Step::Route, e);
        }
        assert_eq!(a.summary(), b.summary());
        assert_eq!(a.summary(), "routes: route 10.244.2.0/24: x (and 2 more)");
        assert_eq!(Verdict::of(&a), Verdict::of(&b));
        assert_eq!(Verdict::of(&a).reason, "RoutesFailed");
    }

    #[test]
    fn skipped_peers_are_named_in_a_programmed_verdict() {
        let mut r = SyncReport::new();
        for i in 0..7 {
            r.note(format!("no route to Node n{i}: overlaps_peer_subnet"));
        }
        assert!(r.is_clean());
        let v = Verdict::of(&r);
        assert!(v.programmed);
        assert_eq!(v.reason, PROGRAMMED);
        assert!(
            v.message
                .contains("no route to Node n0: overlaps_peer_subnet"),
            "{}",
            v.message
        );
        assert!(v.message.ends_with("(and 2 more)"), "{}", v.message);
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let mut r = SyncReport::new();
        r.fail(Step::Underlay, "ü".repeat(2000));
        let v = Verdict::of(&r);
        assert!(v.message.len() <= MESSAGE_MAX);
        assert!(v.message.ends_with("..."));
    }

    #[test]
    fn steps_have_distinct_labels_and_reasons() {
        let mut labels: Vec<_> = Step::ALL.iter().map(|s| s.as_str()).collect();
        let mut reasons: Vec<_> = Step::ALL.iter().map(|s| s.reason()).collect();
        labels.sort();
        labels.dedup();
        reasons.sort();
        reasons.dedup();
        assert_eq!(labels.len(), Step::ALL.len());
        assert_eq!(reasons.len(), Step::ALL.len());
        let mut sorted = Step::ALL;
        sorted.sort();
        assert_eq!(sorted, Step::ALL, "ALL is in fixing order");
    }
}
