//! Every Prometheus metric of canal-controller, registered in the one
//! registry `/metrics` serves. Label values are bounded: never an object
//! name or an error message.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Metric name prefix.
pub const PREFIX: &str = "canal_controller";

/// `kind` label values.
pub mod kind {
    /// A Node reconcile (one Node looked at; a write when needed).
    pub const NODE: &str = "node";
    /// A CanalNetwork status reconcile.
    pub const NETWORK: &str = "canalnetwork";
}

/// Error categories (label values of `reconcile_errors_total`).
pub const ERROR_CATEGORIES: [&str; 7] = [
    "kube_api",
    "conflict",
    "invalid",
    "not_found",
    "timeout",
    "watch",
    "invalid_object",
];

/// The metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Reconciles by controller kind.
    pub reconciles: IntCounterVec,
    /// Reconcile errors by kind and bounded category.
    pub reconcile_errors: IntCounterVec,
    /// Duration of the API writes of a reconcile, by kind.
    pub reconcile_duration: HistogramVec,
    /// Duration of one planning pass over the in-memory state.
    pub plan_duration: Histogram,
    /// Writes to the API server by resource.
    pub api_writes: IntCounterVec,
    /// Events published or dropped.
    pub events: IntCounterVec,
    /// Subnets allocated to Nodes, by family (IPv4, IPv6).
    pub subnets_allocated: IntGaugeVec,
    /// Subnets free, by family.
    pub subnets_free: IntGaugeVec,
    /// Subnets in the cluster range, by family.
    pub subnets_capacity: IntGaugeVec,
    /// Nodes waiting for a subnet.
    pub pending_nodes: IntGauge,
    /// Nodes whose podCIDR cannot be used.
    pub conflicting_nodes: IntGauge,
    /// Nodes known.
    pub nodes: IntGauge,
    /// 1 while this replica holds the Lease (or runs without election).
    pub leader: IntGauge,
    /// Times this replica became leader.
    pub leader_transitions: IntCounter,
}

/// Registering failed (a duplicate name: a programming error).
#[derive(Debug, thiserror::Error)]
#[error("registering metric: {0}")]
pub struct RegisterError(#[from] prometheus::Error);

fn name(n: &str) -> String {
    format!("{PREFIX}_{n}")
}

impl Metrics {
    /// Creates every metric and registers it in `registry`.
    pub fn register(registry: &Registry) -> Result<Metrics, RegisterError> {
        let durations = vec![
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let m = Metrics {
            reconciles: IntCounterVec::new(
                Opts::new(
                    name("reconciles_total"),
                    "Reconciles by controller kind (node: one Node looked at; canalnetwork: one status update planned).",
                ),
                &["kind"],
            )?,
            reconcile_errors: IntCounterVec::new(
                Opts::new(
                    name("reconcile_errors_total"),
                    "Reconcile failures by controller kind and category (kube_api, conflict, invalid, not_found, timeout, watch, invalid_object).",
                ),
                &["kind", "category"],
            )?,
            reconcile_duration: HistogramVec::new(
                HistogramOpts::new(
                    name("reconcile_duration_seconds"),
                    "Duration of a reconcile's API write by controller kind.",
                )
                .buckets(durations.clone()),
                &["kind"],
            )?,
            plan_duration: Histogram::with_opts(
                HistogramOpts::new(
                    name("plan_duration_seconds"),
                    "Duration of one planning pass over the in-memory state (no I/O).",
                )
                .buckets(vec![0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5]),
            )?,
            api_writes: IntCounterVec::new(
                Opts::new(
                    name("api_writes_total"),
                    "Successful writes to the API server by resource (node, canalnetwork_status).",
                ),
                &["resource"],
            )?,
            events: IntCounterVec::new(
                Opts::new(
                    name("events_total"),
                    "Kubernetes Events by result (published, failed, dropped when the queue is full).",
                ),
                &["result"],
            )?,
            subnets_allocated: IntGaugeVec::new(
                Opts::new(
                    name("subnets_allocated"),
                    "Node subnets allocated from the cluster range in force, by family (IPv4, IPv6).",
                ),
                &["family"],
            )?,
            subnets_free: IntGaugeVec::new(
                Opts::new(
                    name("subnets_free"),
                    "Node subnets still free in the cluster range in force, by family.",
                ),
                &["family"],
            )?,
            subnets_capacity: IntGaugeVec::new(
                Opts::new(
                    name("subnets_capacity"),
                    "Node subnets the cluster range in force holds in total, by family.",
                ),
                &["family"],
            )?,
            pending_nodes: IntGauge::new(
                name("pending_nodes"),
                "Nodes waiting for a subnet because the clusterCIDR is exhausted.",
            )?,
            conflicting_nodes: IntGauge::new(
                name("conflicting_nodes"),
                "Nodes whose podCIDR is outside the clusterCIDR, overlaps another Node's or does not parse.",
            )?,
            nodes: IntGauge::new(name("nodes"), "Nodes the controller knows.")?,
            leader: IntGauge::new(
                name("leader"),
                "1 while this replica is the leader (holds the Lease, or runs with --leader-elect=false), else 0.",
            )?,
            leader_transitions: IntCounter::new(
                name("leader_transitions_total"),
                "Times this replica became the leader.",
            )?,
        };
        registry.register(Box::new(m.reconciles.clone()))?;
        registry.register(Box::new(m.reconcile_errors.clone()))?;
        registry.register(Box::new(m.reconcile_duration.clone()))?;
        registry.register(Box::new(m.plan_duration.clone()))?;
        registry.register(Box::new(m.api_writes.clone()))?;
        registry.register(Box::new(m.events.clone()))?;
        registry.register(Box::new(m.subnets_allocated.clone()))?;
        registry.register(Box::new(m.subnets_free.clone()))?;
        registry.register(Box::new(m.subnets_capacity.clone()))?;
        registry.register(Box::new(m.pending_nodes.clone()))?;
        registry.register(Box::new(m.conflicting_nodes.clone()))?;
        registry.register(Box::new(m.nodes.clone()))?;
        registry.register(Box::new(m.leader.clone()))?;
        registry.register(Box::new(m.leader_transitions.clone()))?;

        // Every label value exists from the start, so `rate()` and alerts
        // see zeros instead of absent series.
        for k in [kind::NODE, kind::NETWORK] {
            m.reconciles.with_label_values(&[k]);
            m.reconcile_duration.with_label_values(&[k]);
            for c in ERROR_CATEGORIES {
                m.reconcile_errors.with_label_values(&[k, c]);
            }
        }
        for r in ["node", "canalnetwork_status"] {
            m.api_writes.with_label_values(&[r]);
        }
        for r in ["published", "failed", "dropped"] {
            m.events.with_label_values(&[r]);
        }
        Ok(m)
    }

    /// Counts one error of `kind` in `category`.
    pub fn error(&self, kind: &str, category: &str) {
        self.reconcile_errors
            .with_label_values(&[kind, category])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    #[test]
    fn registers_once_with_help_texts() {
        let r = Registry::new();
        let m = Metrics::register(&r).unwrap();
        m.reconciles.with_label_values(&[kind::NODE]).inc();
        m.error(kind::NODE, "kube_api");
        m.leader.set(1);
        m.subnets_free.with_label_values(&["IPv6"]).set(3);
        let mut out = Vec::new();
        TextEncoder::new().encode(&r.gather(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("canal_controller_reconciles_total{kind=\"node\"} 1"));
        assert!(text.contains("canal_controller_leader 1"));
        assert!(text.contains("# HELP canal_controller_subnets_free"));
        assert!(text.contains("canal_controller_subnets_free{family=\"IPv6\"} 3"));
        assert!(
            Metrics::register(&r).is_err(),
            "a second registration is refused"
        );
    }
}
