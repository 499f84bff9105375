//! Every Prometheus metric of policy enforcement, registered on the agent's
//! one registry. Label values are bounded enums, never object names or error text.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use super::plan::PlanStats;
use super::render::{WARNING_CATEGORIES, Warning};

/// Buckets from 1 ms to ~16 s: a no-op sync takes microseconds, a partial
/// one milliseconds, a cold one at 20k rules about a second.
fn duration_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 15).unwrap_or_default()
}

/// Buckets of the realization latency (watch event to rules in the kernel).
const PROGRAMMING_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// What a realized change came from (`object` label values).
pub const OBJECTS: [&str; 3] = ["node_policy_set", "peer_set", "canal_network"];
/// Stages of a change on its way into the kernel (`stage` label values of
/// `canal_policy_programming_stage_duration_seconds`), in order.
pub const STAGES: [&str; 5] = ["queue", "render", "plan", "kernel", "status"];
/// Why a sync ran (`trigger` label values).
pub const TRIGGERS: [&str; 4] = ["change", "retry", "drift_check", "firewall_change"];
/// How a foreign firewall change was noticed (`source` label values).
pub const CHANGE_SOURCES: [&str; 4] = ["nftables", "nftables_lost", "ipset", "legacy"];
/// Watched resources (`resource` label values).
pub const RESOURCES: [&str; 2] = ["nodepolicyset", "peerset"];
/// Outcomes of a PeerSet GET (`result` label values).
pub const FETCH_RESULTS: [&str; 3] = ["found", "not_found", "error"];

/// Bounded error categories, also used as label values.
pub const ERROR_CATEGORIES: [&str; 6] = [
    "read_state",
    "ipset_restore",
    "iptables_restore",
    "nft",
    "handshake_files",
    "tool_missing",
];

/// Dataplanes (`dataplane` label values).
pub const DATAPLANES: [&str; 2] = ["iptables", "nftables"];

/// Metrics of the policy enforcer.
#[derive(Clone, Debug)]
pub struct PolicyMetrics {
    /// Syncs that read the kernel state first (start, drift check, after a failure).
    pub sync_full_duration: Histogram,
    /// Syncs that diffed against the state applied last.
    pub sync_partial_duration: Histogram,
    /// Failed restore runs, by tool.
    pub restore_failures: IntCounterVec,
    /// Restore runs executed, by tool.
    pub restores: IntCounterVec,
    /// Syncs that failed after their retries, by category.
    pub sync_errors: IntCounterVec,
    /// Rules programmed.
    pub rules: IntGauge,
    /// Set members programmed.
    pub set_members: IntGauge,
    /// Sets programmed.
    pub sets: IntGauge,
    /// Endpoints programmed.
    pub endpoints: IntGauge,
    /// Kernel objects found changed behind the agent's back and repaired, by object.
    pub drift_repairs: IntCounterVec,
    /// Input parts skipped by the renderer in the last sync, by category.
    pub render_warnings: IntGaugeVec,
    /// From a NodePolicySet / PeerSet / CanalNetwork change being observed
    /// to its rules being in the kernel, by object.
    pub programming_duration: HistogramVec,
    /// The stages of a change sync that changed the kernel, by stage ([`STAGES`]).
    pub programming_stage: HistogramVec,
    /// Syncs run by the agent's loop, by trigger and result.
    pub syncs: IntCounterVec,
    /// NodePolicySet status writes, by result.
    pub status_writes: IntCounterVec,
    /// Watch events received, by resource.
    pub watch_events: IntCounterVec,
    /// Watch failures (retried with backoff), by resource.
    pub watch_errors: IntCounterVec,
    /// GETs of PeerSets that became referenced, by result.
    pub peer_set_fetches: IntCounterVec,
    /// Packets from pods dropped as spoofed, by reason (read from the
    /// anti-spoofing rules' counters).
    pub spoofed_packets: IntCounterVec,
    /// Foreign firewall changes noticed between drift checks, by how.
    pub firewall_changes: IntCounterVec,
    /// 1 for the dataplane the last successful sync programmed.
    pub dataplane: IntGaugeVec,
}

impl PolicyMetrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn register(registry: &Registry) -> Result<PolicyMetrics, prometheus::Error> {
        let m = PolicyMetrics::unregistered()?;
        registry.register(Box::new(m.sync_full_duration.clone()))?;
        registry.register(Box::new(m.sync_partial_duration.clone()))?;
        registry.register(Box::new(m.restore_failures.clone()))?;
        registry.register(Box::new(m.restores.clone()))?;
        registry.register(Box::new(m.sync_errors.clone()))?;
        registry.register(Box::new(m.rules.clone()))?;
        registry.register(Box::new(m.set_members.clone()))?;
        registry.register(Box::new(m.sets.clone()))?;
        registry.register(Box::new(m.endpoints.clone()))?;
        registry.register(Box::new(m.drift_repairs.clone()))?;
        registry.register(Box::new(m.render_warnings.clone()))?;
        registry.register(Box::new(m.programming_duration.clone()))?;
        registry.register(Box::new(m.programming_stage.clone()))?;
        registry.register(Box::new(m.syncs.clone()))?;
        registry.register(Box::new(m.status_writes.clone()))?;
        registry.register(Box::new(m.watch_events.clone()))?;
        registry.register(Box::new(m.watch_errors.clone()))?;
        registry.register(Box::new(m.peer_set_fetches.clone()))?;
        registry.register(Box::new(m.spoofed_packets.clone()))?;
        registry.register(Box::new(m.firewall_changes.clone()))?;
        registry.register(Box::new(m.dataplane.clone()))?;
        super::conntrack::register(registry)?;
        super::denied::register(registry)?;
        Ok(m)
    }

    /// Creates the metrics without registering them (benchmarks, tests).
    pub fn unregistered() -> Result<PolicyMetrics, prometheus::Error> {
        let m = PolicyMetrics {
            sync_full_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "canal_policy_sync_full_duration_seconds",
                    "Duration of policy syncs that read the kernel state first (agent start, drift check, after a failure), including the restores they ran.",
                )
                .buckets(duration_buckets()),
            )?,
            sync_partial_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "canal_policy_sync_partial_duration_seconds",
                    "Duration of policy syncs that diffed against the last applied state and restored only what changed.",
                )
                .buckets(duration_buckets()),
            )?,
            restore_failures: IntCounterVec::new(
                Opts::new(
                    "canal_policy_restore_failures_total",
                    "Failed iptables-restore / ipset restore runs and nftables transactions (each is retried after re-reading the kernel).",
                ),
                &["tool"],
            )?,
            restores: IntCounterVec::new(
                Opts::new(
                    "canal_policy_restores_total",
                    "iptables-restore / ipset restore runs and nftables transactions executed.",
                ),
                &["tool"],
            )?,
            sync_errors: IntCounterVec::new(
                Opts::new(
                    "canal_policy_sync_errors_total",
                    "Policy syncs that failed after all retries, by error category.",
                ),
                &["category"],
            )?,
            rules: IntGauge::new(
                "canal_policy_rules",
                "iptables or nftables rules programmed for NetworkPolicy (hooks included).",
            )?,
            set_members: IntGauge::new(
                "canal_policy_set_members",
                "Members across every canal ipset or nftables set and map.",
            )?,
            sets: IntGauge::new("canal_policy_sets", "canal ipsets or nftables sets and maps programmed.")?,
            endpoints: IntGauge::new(
                "canal_policy_programmed_endpoints",
                "Local pods whose policy chains are programmed.",
            )?,
            drift_repairs: IntCounterVec::new(
                Opts::new(
                    "canal_policy_drift_repairs_total",
                    "Kernel objects found changed by someone else during a drift check and repaired.",
                ),
                &["object"],
            )?,
            render_warnings: IntGaugeVec::new(
                Opts::new(
                    "canal_policy_render_warnings",
                    "Parts of the NodePolicySet skipped in the last sync (they match nothing), by reason.",
                ),
                &["reason"],
            )?,
            programming_duration: HistogramVec::new(
                HistogramOpts::new(
                    "canal_policy_programming_duration_seconds",
                    "From a change of this node's NodePolicySet, a PeerSet it references or the CanalNetwork being observed to the resulting rules being in the kernel, by object.",
                )
                .buckets(PROGRAMMING_BUCKETS.to_vec()),
                &["object"],
            )?,
            programming_stage: HistogramVec::new(
                HistogramOpts::new(
                    "canal_policy_programming_stage_duration_seconds",
                    "The stages of a change sync that changed the kernel: queue (from the oldest change being observed to the sync starting), render (model and rules), plan (diff against the applied state), kernel (restores or the nftables transaction), status (the NodePolicySet status write, after the kernel).",
                )
                .buckets(prometheus::exponential_buckets(0.0001, 2.0, 18).unwrap_or_default()),
                &["stage"],
            )?,
            syncs: IntCounterVec::new(
                Opts::new(
                    "canal_policy_agent_syncs_total",
                    "Policy syncs run by the agent, by trigger (change, retry after a failure, periodic drift check) and result.",
                ),
                &["trigger", "result"],
            )?,
            status_writes: IntCounterVec::new(
                Opts::new(
                    "canal_policy_status_writes_total",
                    "NodePolicySet status writes (only when the status changed), by result.",
                ),
                &["result"],
            )?,
            watch_events: IntCounterVec::new(
                Opts::new(
                    "canal_policy_agent_watch_events_total",
                    "Watch events received by policy enforcement, by resource.",
                ),
                &["resource"],
            )?,
            watch_errors: IntCounterVec::new(
                Opts::new(
                    "canal_policy_agent_watch_errors_total",
                    "Watch failures of policy enforcement (retried with backoff), by resource.",
                ),
                &["resource"],
            )?,
            peer_set_fetches: IntCounterVec::new(
                Opts::new(
                    "canal_policy_peer_set_fetches_total",
                    "GETs of PeerSets that became referenced by this node's NodePolicySet (unreferenced PeerSets are not kept), by result.",
                ),
                &["result"],
            )?,
            spoofed_packets: IntCounterVec::new(
                Opts::new(
                    "canal_policy_spoofed_packets_total",
                    "Packets from pods dropped before any policy because their source is not an address canal gave the pod, by reason (rpf: the source does not route back to the pod's interface; source_not_assigned: not one of the pod's addresses; unknown_interface: no pod of this node has the interface).",
                ),
                &["reason"],
            )?,
            firewall_changes: IntCounterVec::new(
                Opts::new(
                    "canal_policy_firewall_changes_total",
                    "Changes by other programs to canal's firewall tables or sets noticed between drift checks (each triggers an immediate check), by how they were noticed.",
                ),
                &["source"],
            )?,
            dataplane: IntGaugeVec::new(
                Opts::new(
                    "canal_policy_dataplane",
                    "1 for the dataplane (iptables or nftables) that programs policy on this node, 0 for the other.",
                ),
                &["dataplane"],
            )?,
        };
        for d in DATAPLANES {
            m.dataplane.with_label_values(&[d]);
        }
        for r in super::antispoof::SpoofReason::ALL {
            m.spoofed_packets.with_label_values(&[r.as_str()]);
        }
        for c in CHANGE_SOURCES {
            m.firewall_changes.with_label_values(&[c]);
        }
        for o in OBJECTS {
            m.programming_duration.with_label_values(&[o]);
        }
        for st in STAGES {
            m.programming_stage.with_label_values(&[st]);
        }
        for t in TRIGGERS {
            for r in ["success", "error"] {
                m.syncs.with_label_values(&[t, r]);
            }
        }
        for r in ["success", "error"] {
            m.status_writes.with_label_values(&[r]);
        }
        for r in RESOURCES {
            m.watch_events.with_label_values(&[r]);
            m.watch_errors.with_label_values(&[r]);
        }
        for r in FETCH_RESULTS {
            m.peer_set_fetches.with_label_values(&[r]);
        }
        for tool in ["iptables", "ipset", "nft"] {
            m.restore_failures.with_label_values(&[tool]);
            m.restores.with_label_values(&[tool]);
        }
        for c in ERROR_CATEGORIES {
            m.sync_errors.with_label_values(&[c]);
        }
        for o in ["chain", "hook", "set"] {
            m.drift_repairs.with_label_values(&[o]);
        }
        for c in WARNING_CATEGORIES {
            m.render_warnings.with_label_values(&[c]);
        }
        Ok(m)
    }

    /// Sets every category's gauge (zero included: resetting the vector
    /// would make the series vanish between syncs).
    pub(crate) fn record_warnings(&self, warnings: &[Warning]) {
        let mut counts: std::collections::BTreeMap<&str, i64> =
            WARNING_CATEGORIES.iter().map(|c| (*c, 0)).collect();
        for w in warnings {
            *counts.entry(w.category()).or_default() += 1;
        }
        for (category, n) in counts {
            self.render_warnings.with_label_values(&[category]).set(n);
        }
    }

    pub(crate) fn record_dataplane(&self, plane: super::enforcer::Plane) {
        for d in DATAPLANES {
            self.dataplane
                .with_label_values(&[d])
                .set(i64::from(d == plane.as_str()));
        }
    }

    pub(crate) fn record_drift(&self, p: &PlanStats) {
        let chains = p.chains_written + p.chains_deleted;
        let sets = p.sets_created
            + p.sets_swapped
            + p.sets_destroyed
            + p.members_added
            + p.members_removed;
        self.drift_repairs
            .with_label_values(&["chain"])
            .inc_by(chains as u64);
        self.drift_repairs
            .with_label_values(&["hook"])
            .inc_by(p.hooks_fixed as u64);
        self.drift_repairs
            .with_label_values(&["set"])
            .inc_by(sets as u64);
    }
}
