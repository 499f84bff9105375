//! What the agent writes about its own Node: Events, the NetworkUnavailable
//! condition (flannel's) and the `CanalNetworkProgrammed` condition. Both
//! conditions go through a strategic merge patch of `status.conditions`,
//! which merges by `type`: the kubelet's conditions (and anyone else's) are
//! never touched. The agent's RBAC allows `nodes/status patch`; the chart's
//! admission policy holds each agent to its own Node.

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};

use super::FIELD_MANAGER;
use crate::nodes::{self, ProgrammedCondition};
use crate::report::Verdict;

/// Writes about one Node.
pub(super) struct NodeStatus {
    client: kube::Client,
    recorder: Recorder,
    node_name: String,
}

impl NodeStatus {
    pub(super) fn new(client: kube::Client, node_name: String) -> NodeStatus {
        NodeStatus {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: FIELD_MANAGER.into(),
                    instance: Some(node_name.clone()),
                },
            ),
            client,
            node_name,
        }
    }

    /// Publishes an Event about the Node (best effort: a failure is logged).
    pub(super) async fn event(
        &self,
        uid: Option<String>,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.node_name.clone()),
            uid,
            ..ObjectReference::default()
        };
        let event = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(
                "publishing Event {reason} about Node {}: {e}",
                self.node_name
            );
        }
    }

    /// Sets NetworkUnavailable=False (reason CanalIsUp).
    pub(super) async fn set_network_available(&self) -> Result<(), kube::Error> {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let patch = serde_json::json!({
            "status": {"conditions": [{
                "type": nodes::NETWORK_UNAVAILABLE,
                "status": "False",
                "reason": nodes::CANAL_IS_UP,
                "message": "canal-agent has programmed the pod network on this node",
                "lastTransitionTime": now,
                "lastHeartbeatTime": now,
            }]}
        });
        self.patch(&patch).await
    }

    /// Writes `verdict` as the `CanalNetworkProgrammed` condition; the
    /// transition time moves only when the status changes from what the
    /// Node shows (`observed`).
    pub(super) async fn set_programmed(
        &self,
        verdict: &Verdict,
        observed: Option<&ProgrammedCondition>,
    ) -> Result<(), kube::Error> {
        let patch = programmed_patch(verdict, observed, Time(k8s_openapi::jiff::Timestamp::now()));
        self.patch(&patch).await
    }

    async fn patch(&self, patch: &serde_json::Value) -> Result<(), kube::Error> {
        let api: Api<Node> = Api::all(self.client.clone());
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        api.patch_status(&self.node_name, &pp, &Patch::Strategic(patch))
            .await
            .map(drop)
    }
}

/// The strategic merge patch that sets the `CanalNetworkProgrammed` condition.
fn programmed_patch(
    verdict: &Verdict,
    observed: Option<&ProgrammedCondition>,
    now: Time,
) -> serde_json::Value {
    let status = if verdict.programmed { "True" } else { "False" };
    let transition = observed
        .filter(|o| o.status == status)
        .and_then(|o| o.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    serde_json::json!({
        "status": {"conditions": [{
            "type": canal_crds::condition::NODE_PROGRAMMED,
            "status": status,
            "reason": verdict.reason,
            "message": verdict.message,
            "lastTransitionTime": transition,
            "lastHeartbeatTime": now,
        }]}
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn the_patch_holds_only_this_condition_and_keeps_the_transition_time() {
        let failed = Verdict {
            programmed: false,
            reason: "MTURejected",
            message: "MTU: refused".into(),
        };
        let observed = ProgrammedCondition {
            status: "False".into(),
            reason: "RoutesFailed".into(),
            message: "routes: x".into(),
            last_transition_time: Some(at(100)),
        };
        let p = programmed_patch(&failed, Some(&observed), at(200));
        let conditions = p["status"]["conditions"].as_array().unwrap();
        assert_eq!(
            conditions.len(),
            1,
            "never a list that replaces the kubelet's"
        );
        let c = &conditions[0];
        assert_eq!(c["type"], "CanalNetworkProgrammed");
        assert_eq!(c["status"], "False");
        assert_eq!(c["reason"], "MTURejected");
        assert_eq!(c["message"], "MTU: refused");
        assert_eq!(
            c["lastTransitionTime"],
            serde_json::to_value(at(100)).unwrap()
        );
        assert_eq!(
            c["lastHeartbeatTime"],
            serde_json::to_value(at(200)).unwrap()
        );
        assert_eq!(p.as_object().unwrap().len(), 1);

        let ok = Verdict {
            programmed: true,
            reason: "Programmed",
            message: "fine".into(),
        };
        let p = programmed_patch(&ok, Some(&observed), at(300));
        assert_eq!(
            p["status"]["conditions"][0]["lastTransitionTime"],
            serde_json::to_value(at(300)).unwrap(),
            "the status changed"
        );
        let p = programmed_patch(&ok, None, at(400));
        assert_eq!(
            p["status"]["conditions"][0]["lastTransitionTime"],
            serde_json::to_value(at(400)).unwrap()
        );
    }
}
