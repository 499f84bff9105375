//! Prometheus metrics of the policy controller (prefix `canal_policy_`).
//! Label values are bounded enums; never an object name or an error text.

use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use super::index::Stats;

/// Failure categories (label values of `canal_policy_errors_total`).
pub const ERROR_CATEGORIES: [&str; 7] = [
    "watch",
    "apply",
    "delete",
    "status",
    "event",
    "invalid_policy",
    "object_too_large",
];

/// Resources the policy controller watches (label values of
/// `canal_policy_watch_events_total`).
pub const WATCHED_RESOURCES: [&str; 8] = [
    "namespaces",
    "pods",
    "nodes",
    "networkpolicies",
    "nodepolicysets",
    "policygroups",
    "peersets",
    "canalnetwork",
];

/// Stages of one pass from watch events to written objects (label values
/// of `canal_policy_publish_stage_duration_seconds`), in the order they run.
pub const PUBLISH_STAGES: [&str; 7] = [
    "queue",
    "compile",
    "write_peersets",
    "write_policygroups",
    "write_nodepolicysets",
    "write_deletions",
    "status",
];

/// Every metric of the policy controller (cheap to clone handles).
#[derive(Clone)]
pub struct Metrics {
    /// Applying a batch of watch events to the index plus the flush.
    pub compile_seconds: Histogram,
    /// Writing one batch of changes (all API requests).
    pub sync_seconds: Histogram,
    /// Each stage of a pass that wrote something, by stage ([`PUBLISH_STAGES`]).
    pub stage_seconds: HistogramVec,
    /// From the oldest watch event of a pass arriving to every object of
    /// the pass written (what the agents then see).
    pub publish_seconds: Histogram,
    /// Objects written, by kind (PeerSet, PolicyGroup, NodePolicySet,
    /// NodePolicySetStatus, CanalNetworkStatus, Event) and operation
    /// (apply, delete, create).
    pub objects_written: IntCounterVec,
    /// Failures by category (see `Error::category` and the shell).
    pub errors: IntCounterVec,
    /// Watch events received, by resource.
    pub watch_events: IntCounterVec,
    /// Completed passes of flush + writes (each after all watches listed).
    pub syncs: IntCounter,
    /// Serialized size of every object written (request bodies).
    pub object_bytes: Histogram,
    /// Objects that cannot be written now (over the size bound, refused).
    pub unwritable_objects: IntGauge,
    /// Nodes whose policy needs one of those objects (they keep the
    /// policy they have).
    pub unpublished_nodes: IntGauge,
    sizes: IndexSizes,
}

/// Keeps the metrics registered; unregisters them when dropped, so the
/// controller can run again in the same process (a new leadership term).
pub struct Registration {
    registry: Registry,
    collectors: Vec<Box<dyn Collector>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        for c in self.collectors.drain(..) {
            let _ = self.registry.unregister(c);
        }
    }
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> Result<(Metrics, Registration), prometheus::Error> {
        let buckets = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ];
        let m = Metrics {
            compile_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "canal_policy_compile_duration_seconds",
                    "Time to apply one batch of watch events to the policy index and compute the objects to write.",
                )
                .buckets(buckets.clone()),
            )?,
            sync_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "canal_policy_sync_duration_seconds",
                    "Time to write one batch of changed PeerSets, PolicyGroups and NodePolicySets to the API server.",
                )
                .buckets(buckets.clone()),
            )?,
            stage_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "canal_policy_publish_stage_duration_seconds",
                    "Each stage of a pass that wrote objects: queue (oldest watch event waiting for the pass), compile, write_peersets, write_policygroups, write_nodepolicysets, write_deletions, status (conditions, summary, Events).",
                )
                .buckets(buckets.clone()),
                &["stage"],
            )?,
            publish_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "canal_policy_publish_duration_seconds",
                    "From the oldest watch event of a pass arriving at the controller to every object of that pass written.",
                )
                .buckets(buckets),
            )?,
            objects_written: IntCounterVec::new(
                Opts::new(
                    "canal_policy_objects_written_total",
                    "Objects written by the policy controller, by kind and operation.",
                ),
                &["kind", "operation"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "canal_policy_errors_total",
                    "Failures of the policy controller by category (watch, apply, delete, status, event, invalid_policy, object_too_large).",
                ),
                &["category"],
            )?,
            watch_events: IntCounterVec::new(
                Opts::new(
                    "canal_policy_watch_events_total",
                    "Watch events received by the policy controller, by resource.",
                ),
                &["resource"],
            )?,
            syncs: IntCounter::new(
                "canal_policy_syncs_total",
                "Completed passes of compiling and writing the objects that changed.",
            )?,
            object_bytes: Histogram::with_opts(
                HistogramOpts::new(
                    "canal_policy_object_bytes",
                    "Serialized size of each NodePolicySet, PolicyGroup and PeerSet (head or slice) written.",
                )
                .buckets(vec![
                    1024.0, 4096.0, 16384.0, 65536.0, 131072.0, 262144.0, 524288.0,
                ]),
            )?,
            unwritable_objects: IntGauge::new(
                "canal_policy_unwritable_objects",
                "Objects the policy controller cannot write (over the size bound or refused by the API server).",
            )?,
            unpublished_nodes: IntGauge::new(
                "canal_policy_unpublished_nodes",
                "Nodes whose policy needs an object that cannot be written; they keep the policy they have.",
            )?,
            sizes: IndexSizes::new()?,
        };
        // Every label value exists from the start, so `rate()` and alerts
        // see zeros instead of absent series.
        for (kind, op) in [
            ("NodePolicySet", "apply"),
            ("NodePolicySet", "delete"),
            ("NodePolicySetStatus", "apply"),
            ("PolicyGroup", "apply"),
            ("PolicyGroup", "delete"),
            ("PeerSet", "apply"),
            ("PeerSet", "delete"),
            ("CanalNetworkStatus", "apply"),
            ("Event", "create"),
        ] {
            m.objects_written.with_label_values(&[kind, op]);
        }
        for c in ERROR_CATEGORIES {
            m.errors.with_label_values(&[c]);
        }
        for r in WATCHED_RESOURCES {
            m.watch_events.with_label_values(&[r]);
        }
        for s in PUBLISH_STAGES {
            m.stage_seconds.with_label_values(&[s]);
        }
        let mut registered = Registration {
            registry: registry.clone(),
            collectors: Vec::new(),
        };
        // A second set of handles to the same metrics, kept for unregistering.
        let mut keep = m.collectors().into_iter();
        for c in m.collectors() {
            // On error `registered` drops and unregisters what this call
            // registered, and nothing else.
            registry.register(c)?;
            registered.collectors.extend(keep.next());
        }
        Ok((m, registered))
    }

    /// Publishes the index sizes the size gauges report at scrape time.
    pub fn set_sizes(&self, stats: Stats) {
        if let Ok(mut s) = self.sizes.stats.lock() {
            *s = stats;
        }
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.compile_seconds.clone()),
            Box::new(self.sync_seconds.clone()),
            Box::new(self.stage_seconds.clone()),
            Box::new(self.publish_seconds.clone()),
            Box::new(self.objects_written.clone()),
            Box::new(self.errors.clone()),
            Box::new(self.watch_events.clone()),
            Box::new(self.syncs.clone()),
            Box::new(self.object_bytes.clone()),
            Box::new(self.unwritable_objects.clone()),
            Box::new(self.unpublished_nodes.clone()),
            Box::new(self.sizes.clone()),
        ]
    }
}

/// Reads one size out of the index statistics.
type StatFn = fn(&Stats) -> usize;

/// Gauges of the index sizes, filled from the latest published [`Stats`]
/// when scraped (nothing on the hot path but one copy per batch).
#[derive(Clone)]
struct IndexSizes {
    stats: Arc<Mutex<Stats>>,
    gauges: Vec<(IntGauge, StatFn)>,
    descs: Vec<Desc>,
}

impl IndexSizes {
    fn new() -> Result<IndexSizes, prometheus::Error> {
        let defs: [(&str, &str, StatFn); 10] = [
            (
                "canal_policy_peer_sets",
                "PeerSets referenced by NetworkPolicies.",
                |s| s.peer_sets,
            ),
            (
                "canal_policy_node_policy_sets",
                "NodePolicySets (one per Node).",
                |s| s.nodes,
            ),
            (
                "canal_policy_endpoints",
                "Pods that are NetworkPolicy endpoints on a node.",
                |s| s.endpoints,
            ),
            (
                "canal_policy_pods",
                "Pods known to the policy index.",
                |s| s.pods,
            ),
            (
                "canal_policy_namespaces",
                "Namespaces known to the policy index.",
                |s| s.namespaces,
            ),
            (
                "canal_policy_network_policies",
                "NetworkPolicies known to the policy index.",
                |s| s.policies,
            ),
            (
                "canal_policy_invalid_network_policies",
                "NetworkPolicies whose latest version is invalid (skipped).",
                |s| s.invalid_policies,
            ),
            (
                "canal_policy_selector_groups",
                "Distinct NetworkPolicy pod selectors (one PolicyGroup each while they select a pod).",
                |s| s.groups,
            ),
            (
                "canal_policy_sharded_peer_sets",
                "PeerSets too large for one object, written as a head and slices.",
                |s| s.sharded_peer_sets,
            ),
            (
                "canal_policy_sharded_policy_groups",
                "PolicyGroups too large for one object, written as a head and slices.",
                |s| s.sharded_policy_groups,
            ),
        ];
        let mut gauges = Vec::new();
        let mut descs = Vec::new();
        for (name, help, f) in defs {
            let g = IntGauge::new(name, help)?;
            descs.extend(g.desc().into_iter().cloned());
            gauges.push((g, f));
        }
        Ok(IndexSizes {
            stats: Arc::new(Mutex::new(Stats::default())),
            gauges,
            descs,
        })
    }
}

impl Collector for IndexSizes {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stats = self.stats.lock().map(|s| *s).unwrap_or_default();
        self.gauges
            .iter()
            .flat_map(|(g, f)| {
                g.set(i64::try_from(f(&stats)).unwrap_or(i64::MAX));
                g.collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    #[test]
    fn registers_scrapes_and_unregisters() {
        let registry = Registry::new();
        {
            let (m, _registration) = Metrics::register(&registry).unwrap();
            m.objects_written
                .with_label_values(&["PeerSet", "apply"])
                .inc();
            m.set_sizes(Stats {
                peer_sets: 7,
                ..Stats::default()
            });
            let mut out = Vec::new();
            TextEncoder::new()
                .encode(&registry.gather(), &mut out)
                .unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("canal_policy_peer_sets 7"), "{text}");
            assert!(text.contains(
                "canal_policy_objects_written_total{kind=\"PeerSet\",operation=\"apply\"} 1"
            ));
            assert!(Metrics::register(&registry).is_err(), "names are taken");
            // The failed attempt did not unregister the live metrics.
            assert!(
                registry
                    .gather()
                    .iter()
                    .any(|f| f.name() == "canal_policy_peer_sets")
            );
        }
        // Dropped: a new term of leadership can register again.
        Metrics::register(&registry).unwrap();
    }
}
