//! What the policy controller tells people: Events about NetworkPolicies
//! that do not compile and about pods whose IPs NetworkPolicy does not use
//! (PodIPRefused / PodIPAccepted), the `Published` condition on the NodePolicySets of
//! nodes whose policy needs an object that cannot be written, and the
//! CanalNetwork summary (with its `PolicyPublished` condition).

use std::collections::{BTreeMap, BTreeSet};

use canal_crds::{CanalNetwork, NodePolicySet};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use serde_json::json;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Controller, FIELD_MANAGER, same_condition, truncate};
use crate::policy::index::{PodIpReport, PolicyReport};
use crate::policy::problems::{
    ConditionView, POLICY_PUBLISHED, PUBLISHED, Problem, network_condition, node_condition,
};
use crate::policy::summary;

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

impl Controller {
    pub(super) async fn publish_event(&mut self, report: PolicyReport) {
        let reference = ObjectReference {
            api_version: Some("networking.k8s.io/v1".into()),
            kind: Some("NetworkPolicy".into()),
            namespace: Some(report.namespace.clone()),
            name: Some(report.name.clone()),
            uid: report.uid.clone(),
            ..Default::default()
        };
        let event = match &report.problem {
            Some(problem) => {
                warn!(
                    namespace = %report.namespace,
                    name = %report.name,
                    kept_previous = report.kept_previous,
                    problem = %problem,
                    "invalid NetworkPolicy skipped"
                );
                self.metrics
                    .errors
                    .with_label_values(&["invalid_policy"])
                    .inc();
                let outcome = if report.kept_previous {
                    "the previous valid version stays in force"
                } else {
                    "it is not enforced"
                };
                KubeEvent {
                    type_: EventType::Warning,
                    reason: "InvalidNetworkPolicy".into(),
                    note: Some(truncate(
                        &format!(
                            "canal cannot compile this NetworkPolicy, so {outcome}: {problem}"
                        ),
                        1000,
                    )),
                    action: "Compile".into(),
                    secondary: None,
                }
            }
            None => KubeEvent {
                type_: EventType::Normal,
                reason: "NetworkPolicyCompiled".into(),
                note: Some("the NetworkPolicy is valid again and enforced".into()),
                action: "Compile".into(),
                secondary: None,
            },
        };
        match self.recorder.publish(&event, &reference).await {
            Ok(()) => self
                .metrics
                .objects_written
                .with_label_values(&["Event", "create"])
                .inc(),
            Err(e) => {
                warn!(namespace = %report.namespace, name = %report.name, error = %e, "publishing Event failed");
                self.metrics.errors.with_label_values(&["event"]).inc();
            }
        }
    }

    /// A pod some of whose IPs NetworkPolicy does not use (or uses again).
    pub(super) async fn publish_pod_event(&mut self, report: PodIpReport) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(report.namespace.clone()),
            name: Some(report.name.clone()),
            uid: report.uid.clone(),
            ..Default::default()
        };
        let event = match &report.problem {
            Some(problem) => {
                warn!(namespace = %report.namespace, name = %report.name, problem = %problem, "pod IPs not used for NetworkPolicy");
                KubeEvent {
                    type_: EventType::Warning,
                    reason: "PodIPRefused".into(),
                    note: Some(truncate(problem, 1000)),
                    action: "Compile".into(),
                    secondary: None,
                }
            }
            None => KubeEvent {
                type_: EventType::Normal,
                reason: "PodIPAccepted".into(),
                note: Some(
                    "every IP of this pod is its own again and used for NetworkPolicy".into(),
                ),
                action: "Compile".into(),
                secondary: None,
            },
        };
        match self.recorder.publish(&event, &reference).await {
            Ok(()) => self
                .metrics
                .objects_written
                .with_label_values(&["Event", "create"])
                .inc(),
            Err(e) => {
                warn!(namespace = %report.namespace, name = %report.name, error = %e, "publishing Event failed");
                self.metrics.errors.with_label_values(&["event"]).inc();
            }
        }
    }

    /// Writes the `Published` condition of every NodePolicySet whose node
    /// depends on an object that cannot be written (and clears it once
    /// that is over). Returns those nodes.
    pub(super) async fn publish_conditions(&mut self) -> BTreeSet<String> {
        let mut by_node: BTreeMap<String, Vec<&Problem>> = BTreeMap::new();
        for p in self.problems.iter() {
            for n in self.index.nodes_depending_on(p.kind, &p.name) {
                by_node.entry(n).or_default().push(p);
            }
        }
        let unpublished: BTreeSet<String> = by_node.keys().cloned().collect();
        let candidates: BTreeSet<&String> = by_node.keys().chain(self.published.keys()).collect();
        let mut writes: Vec<(String, Condition)> = Vec::new();
        for node in candidates {
            // Only an existing NodePolicySet can carry it; the CanalNetwork
            // condition names the others.
            if !self.node_status.contains_key(node) {
                continue;
            }
            let problems = by_node.get(node).map(Vec::as_slice).unwrap_or_default();
            let previous = self.published.get(node);
            let Some(desired) = node_condition(problems, previous.is_some()) else {
                continue;
            };
            if !same_condition(previous, &desired) {
                writes.push((
                    node.clone(),
                    desired.to_condition(PUBLISHED, previous, now()),
                ));
            }
        }
        self.metrics
            .unpublished_nodes
            .set(i64::try_from(unpublished.len()).unwrap_or(i64::MAX));
        if writes.is_empty() {
            return unpublished;
        }
        let api: Api<NodePolicySet> = Api::all(self.client.clone());
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let results: Vec<(String, Condition, Result<(), kube::Error>)> =
            futures::stream::iter(writes)
                .map(|(node, cond)| {
                    let (api, pp) = (api.clone(), pp.clone());
                    async move {
                        let body = json!({
                            "apiVersion": format!("{}/{}", canal_crds::GROUP, canal_crds::VERSION),
                            "kind": "NodePolicySet",
                            "metadata": {"name": node},
                            "status": {"conditions": [cond]},
                        });
                        let r = api
                            .patch_status(&node, &pp, &Patch::Apply(&body))
                            .await
                            .map(drop);
                        (node, cond, r)
                    }
                })
                .buffer_unordered(self.options.write_concurrency.max(1))
                .collect()
                .await;
        for (node, cond, r) in results {
            match r {
                Ok(()) => {
                    info!(node = %node, published = %cond.status, reason = %cond.reason, "NodePolicySet Published condition written");
                    self.metrics
                        .objects_written
                        .with_label_values(&["NodePolicySetStatus", "apply"])
                        .inc();
                    self.published.insert(node, cond);
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    warn!(node = %node, error = %e, "writing the NodePolicySet Published condition failed; will retry");
                    self.metrics.errors.with_label_values(&["status"]).inc();
                    self.schedule_retry();
                }
            }
        }
        unpublished
    }

    /// Patches the CanalNetwork summary when it differs from what it shows.
    pub(super) async fn write_summary(&mut self, unpublished: &BTreeSet<String>) {
        let Some(network) = &self.network else {
            return;
        };
        let condition: Option<ConditionView> =
            network_condition(&self.problems, unpublished, network.published.is_some());
        let desired = summary::summarize(
            self.index.node_names(),
            &self.node_status,
            unpublished,
            network.policy_enabled,
            condition.clone(),
        );
        if network.summary.as_ref() == Some(&desired) {
            return;
        }
        if let Some(at) = self.summary_written_at {
            let next = at + self.options.summary_interval;
            if Instant::now() < next {
                self.retry_at = Some(self.retry_at.map_or(next, |r| r.min(next)));
                return;
            }
        }
        let full =
            condition.map(|c| c.to_condition(POLICY_PUBLISHED, network.published.as_ref(), now()));
        let api: Api<CanalNetwork> = Api::all(self.client.clone());
        let body = desired.apply_body(canal_crds::DEFAULT_NETWORK_NAME, full.as_ref());
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        self.summary_written_at = Some(Instant::now());
        match api
            .patch_status(canal_crds::DEFAULT_NETWORK_NAME, &pp, &Patch::Apply(&body))
            .await
        {
            Ok(_) => {
                self.metrics
                    .objects_written
                    .with_label_values(&["CanalNetworkStatus", "apply"])
                    .inc();
                if let Some(n) = &mut self.network {
                    n.summary = Some(desired);
                    if full.is_some() {
                        n.published = full;
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "writing the CanalNetwork policy summary failed; will retry");
                self.metrics.errors.with_label_values(&["status"]).inc();
                self.schedule_retry();
            }
        }
    }
}
