//! Every Prometheus metric of policy enforcement, registered on the agent's
//! one registry. Label values are bounded enums, never object names or error text.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::plan::PlanStats;
use super::render::Warning;

/// Buckets from 1 ms to ~16 s: a no-op sync takes microseconds, a partial
/// one milliseconds, a cold one at 20k rules about a second.
fn duration_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 15).unwrap_or_default()
}

/// Bounded error categories, also used as label values.
pub const ERROR_CATEGORIES: [&str; 5] = [
    "read_state",
    "ipset_restore",
    "iptables_restore",
    "handshake_files",
    "tool_missing",
];

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
                    "Failed iptables-restore / ipset restore runs (each is retried after re-reading the kernel).",
                ),
                &["tool"],
            )?,
            restores: IntCounterVec::new(
                Opts::new(
                    "canal_policy_restores_total",
                    "iptables-restore / ipset restore runs executed.",
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
                "iptables rules programmed for NetworkPolicy (hooks included).",
            )?,
            set_members: IntGauge::new(
                "canal_policy_set_members",
                "Members across every canal ipset.",
            )?,
            sets: IntGauge::new("canal_policy_sets", "canal ipsets programmed.")?,
            endpoints: IntGauge::new(
                "canal_policy_endpoints",
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
        };
        for tool in ["iptables", "ipset"] {
            m.restore_failures.with_label_values(&[tool]);
            m.restores.with_label_values(&[tool]);
        }
        for c in ERROR_CATEGORIES {
            m.sync_errors.with_label_values(&[c]);
        }
        for o in ["chain", "hook", "set"] {
            m.drift_repairs.with_label_values(&[o]);
        }
        Ok(m)
    }

    pub(crate) fn record_warnings(&self, warnings: &[Warning]) {
        self.render_warnings.reset();
        for w in warnings {
            self.render_warnings
                .with_label_values(&[w.category()])
                .inc();
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
