//! Every metric of canal-agent's connectivity half, registered in the one
//! registry the binary serves. Label values are bounded enums, never object
//! names or error text.

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::overlay::desired::SkipReason;
use crate::overlay::diff::Kind;
use crate::overlay::family::Family;
use crate::report::Step;

/// The agent's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// Remote nodes programmed, by family and how they are reached.
    pub remote_nodes: IntGaugeVec,
    /// Remote nodes left out, by family and reason.
    pub remote_nodes_skipped: IntGaugeVec,
    /// Duration of one full sync.
    pub sync_full_duration: Histogram,
    /// Duration of each phase of a sync.
    pub sync_phase_duration: HistogramVec,
    /// Syncs by trigger and result.
    pub syncs: IntCounterVec,
    /// Kernel objects changed, by kind.
    pub kernel_changes: IntCounterVec,
    /// Changes that repaired drift (state changed under the agent), by kind.
    pub drift_repairs: IntCounterVec,
    /// netlink failures, by category.
    pub netlink_errors: IntCounterVec,
    /// iptables failures, by step.
    pub iptables_errors: IntCounterVec,
    /// From a peer Node change being observed to its routes programmed.
    pub programming_duration: Histogram,
    /// Watch events received, by resource.
    pub watch_events: IntCounterVec,
    /// Watch failures, by resource.
    pub watch_errors: IntCounterVec,
    /// 1 when the underlay address differs from the Node's InternalIP.
    pub underlay_mismatch: IntGauge,
    /// Unix time of the last successful sync.
    pub last_success: Gauge,
    /// Failed steps of syncs, by step.
    pub sync_errors: IntCounterVec,
    /// 1 while the node is reported programmed (condition
    /// CanalNetworkProgrammed True), 0 otherwise.
    pub programmed: IntGauge,
}

/// Metric families could not be registered (a name clash: a programming error).
#[derive(Debug, thiserror::Error)]
#[error("registering canal-agent metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

const SYNC_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const PROGRAMMING_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Triggers of a sync (label values).
pub const TRIGGERS: [&str; 3] = ["watch", "resync", "retry"];
/// Sync phases (label values).
pub const PHASES: [&str; 4] = ["dump", "compute", "apply", "iptables"];
/// netlink error categories (label values).
pub const NETLINK_CATEGORIES: [&str; 8] = [
    "connection",
    "dump",
    "mtu",
    "link",
    "address",
    "route",
    "neighbour",
    "fdb",
];
/// iptables steps (label values).
pub const IPTABLES_STEPS: [&str; 3] = ["save", "restore", "version"];

impl Metrics {
    /// Creates and registers every metric in `registry`.
    pub fn register(registry: &Registry) -> Result<Metrics, MetricsError> {
        let m = Metrics {
            remote_nodes: IntGaugeVec::new(
                Opts::new(
                    "canal_agent_remote_nodes",
                    "Remote nodes whose pod subnet is programmed on this node, by IP family and route type (vxlan: via the VXLAN device; direct: a plain route via the node address).",
                ),
                &["family", "route"],
            )?,
            remote_nodes_skipped: IntGaugeVec::new(
                Opts::new(
                    "canal_agent_remote_nodes_skipped",
                    "Remote nodes that qualify as peers but get no route, by IP family and reason.",
                ),
                &["family", "reason"],
            )?,
            sync_full_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "canal_sync_full_duration_seconds",
                    "Duration of one full sync: kernel dump, desired state, diff, netlink changes, iptables check and run-dir files.",
                )
                .buckets(SYNC_BUCKETS.to_vec()),
            )?,
            sync_phase_duration: HistogramVec::new(
                HistogramOpts::new(
                    "canal_sync_phase_duration_seconds",
                    "Duration of each phase of a sync (dump, compute, apply, iptables).",
                )
                .buckets(SYNC_BUCKETS.to_vec()),
                &["phase"],
            )?,
            syncs: IntCounterVec::new(
                Opts::new(
                    "canal_syncs_total",
                    "Syncs run, by trigger (watch event or periodic resync) and result.",
                ),
                &["trigger", "result"],
            )?,
            kernel_changes: IntCounterVec::new(
                Opts::new(
                    "canal_kernel_changes_total",
                    "Kernel objects created, changed or deleted by the overlay, by kind.",
                ),
                &["kind"],
            )?,
            drift_repairs: IntCounterVec::new(
                Opts::new(
                    "canal_drift_repairs_total",
                    "Changes that restored state someone else altered while the wanted state stayed the same, by kind.",
                ),
                &["kind"],
            )?,
            netlink_errors: IntCounterVec::new(
                Opts::new(
                    "canal_netlink_errors_total",
                    "Failed netlink requests, by category.",
                ),
                &["category"],
            )?,
            iptables_errors: IntCounterVec::new(
                Opts::new(
                    "canal_iptables_errors_total",
                    "Failed iptables commands, by step.",
                ),
                &["step"],
            )?,
            programming_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "canal_network_programming_duration_seconds",
                    "Time from a change of a peer Node being observed to its routes, neighbour and FDB entry being programmed.",
                )
                .buckets(PROGRAMMING_BUCKETS.to_vec()),
            )?,
            watch_events: IntCounterVec::new(
                Opts::new(
                    "canal_watch_events_total",
                    "Watch events received, by resource.",
                ),
                &["resource"],
            )?,
            watch_errors: IntCounterVec::new(
                Opts::new(
                    "canal_watch_errors_total",
                    "Watch failures (retried with backoff), by resource.",
                ),
                &["resource"],
            )?,
            underlay_mismatch: IntGauge::new(
                "canal_agent_underlay_address_mismatch",
                "1 when the underlay interface's address differs from the Node's InternalIP.",
            )?,
            last_success: Gauge::new(
                "canal_sync_last_success_timestamp_seconds",
                "Unix time of the last sync that applied everything without error.",
            )?,
            sync_errors: IntCounterVec::new(
                Opts::new(
                    "canal_agent_sync_errors_total",
                    "Steps of a sync that failed (the other steps were still applied), by step.",
                ),
                &["step"],
            )?,
            programmed: IntGauge::new(
                "canal_agent_programmed",
                "1 while this node is reported programmed (Node condition CanalNetworkProgrammed True, /readyz ok for the overlay), else 0.",
            )?,
        };
        registry.register(Box::new(m.remote_nodes.clone()))?;
        registry.register(Box::new(m.remote_nodes_skipped.clone()))?;
        registry.register(Box::new(m.sync_full_duration.clone()))?;
        registry.register(Box::new(m.sync_phase_duration.clone()))?;
        registry.register(Box::new(m.syncs.clone()))?;
        registry.register(Box::new(m.kernel_changes.clone()))?;
        registry.register(Box::new(m.drift_repairs.clone()))?;
        registry.register(Box::new(m.netlink_errors.clone()))?;
        registry.register(Box::new(m.iptables_errors.clone()))?;
        registry.register(Box::new(m.programming_duration.clone()))?;
        registry.register(Box::new(m.watch_events.clone()))?;
        registry.register(Box::new(m.watch_errors.clone()))?;
        registry.register(Box::new(m.underlay_mismatch.clone()))?;
        registry.register(Box::new(m.last_success.clone()))?;
        registry.register(Box::new(m.sync_errors.clone()))?;
        registry.register(Box::new(m.programmed.clone()))?;

        // Pre-create every label value so dashboards see zeros, not gaps.
        for family in Family::ALL {
            for route in ["vxlan", "direct"] {
                m.remote_nodes.with_label_values(&[family.as_str(), route]);
            }
            for reason in SkipReason::ALL {
                m.remote_nodes_skipped
                    .with_label_values(&[family.as_str(), reason.as_str()]);
            }
        }
        for phase in PHASES {
            m.sync_phase_duration.with_label_values(&[phase]);
        }
        for trigger in TRIGGERS {
            for result in ["success", "error"] {
                m.syncs.with_label_values(&[trigger, result]);
            }
        }
        for kind in Kind::ALL.iter().map(|k| k.as_str()).chain(["iptables"]) {
            m.kernel_changes.with_label_values(&[kind]);
            m.drift_repairs.with_label_values(&[kind]);
        }
        for c in NETLINK_CATEGORIES {
            m.netlink_errors.with_label_values(&[c]);
        }
        for s in IPTABLES_STEPS {
            m.iptables_errors.with_label_values(&[s]);
        }
        for step in Step::ALL {
            m.sync_errors.with_label_values(&[step.as_str()]);
        }
        for r in ["node", "canalnetwork"] {
            m.watch_events.with_label_values(&[r]);
            m.watch_errors.with_label_values(&[r]);
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_registers_with_help_and_canal_prefix() {
        let registry = Registry::new();
        Metrics::register(&registry).unwrap();
        let families = registry.gather();
        assert!(families.len() >= 16);
        for f in &families {
            assert!(f.name().starts_with("canal_"), "{}", f.name());
            assert!(!f.help().is_empty(), "{} has no help", f.name());
        }
        assert!(
            Metrics::register(&registry).is_err(),
            "double registration is refused"
        );
    }
}
