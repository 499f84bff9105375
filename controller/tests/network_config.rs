//! `kubectl edit canalnetwork default` against the real binary: live edits
//! reach the Nodes within seconds, address plan changes are refused while
//! subnets are allocated, other CanalNetworks are ignored, and malformed
//! objects are reported without wedging the controller.

mod support;

use std::time::{Duration, Instant};

use canal_crds::annotations;
use canal_crds::condition::{DEGRADED, READY};
use canal_crds::{CanalNetwork, CanalNetworkSpec};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use support::*;

async fn edit_default(client: &Client, patch: serde_json::Value) {
    let api: Api<CanalNetwork> = Api::all(client.clone());
    api.patch("default", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("editing CanalNetwork default with {patch}: {e}"));
}

async fn wait_condition(
    client: &Client,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> String {
    wait_for(
        &format!("{name} {type_}={status} ({reason})"),
        Duration::from_secs(20),
        || async {
            match condition(client, name, type_).await {
                Some((s, r, m)) if s == status && r == reason => Ok(m),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

#[tokio::test]
async fn live_edits_reach_node_annotations_within_seconds() {
    let _serial = SERIAL.lock().await;
    let cp = cluster().await;
    let client = cp.client();
    apply_network(&cp, "10.244.0.0/16", 24).await;
    let _controller = Controller::start(&cp, "c");
    let names: Vec<String> = (0..3).map(|i| format!("n{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        create_node(&client, n, &format!("192.168.80.{}", i + 1), None).await;
    }
    wait_published(&client, &names, Duration::from_secs(30)).await;

    let edited = Instant::now();
    edit_default(
        &client,
        json!({"spec": {"backend": {"vni": 42, "port": 4789, "mtu": 1400}, "masquerade": false}}),
    )
    .await;
    wait_for(
        "VNI 42 in every Node's backend-data",
        Duration::from_secs(10),
        || async {
            let all = nodes(&client).await;
            let stale: Vec<String> = all
                .iter()
                .filter(|(_, n)| {
                    !annotation(n, annotations::BACKEND_DATA)
                        .is_some_and(|d| d.starts_with(r#"{"VNI":42,"#))
                })
                .map(|(name, n)| format!("{name}: {:?}", annotation(n, annotations::BACKEND_DATA)))
                .collect();
            if stale.is_empty() {
                Ok(())
            } else {
                Err(stale.join(", "))
            }
        },
    )
    .await;
    println!(
        "live VNI edit reached all Node annotations in {:?}",
        edited.elapsed()
    );
    let generation = network(&client, "default").await.metadata.generation;
    wait_for(
        "observedGeneration to catch up",
        Duration::from_secs(10),
        || async {
            let s = network(&client, "default").await.status.unwrap_or_default();
            if s.observed_generation == generation
                && canal_crds::condition::is_true(&s.conditions, READY)
            {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
    let note = wait_for_event(&client, "CanalNetwork", "default", "ConfigApplied").await;
    for want in [
        "backend.vni 1 -> 42",
        "backend.port 8472 -> 4789",
        "backend.mtu 0 -> 1400",
        "masquerade true -> false",
    ] {
        assert!(note.contains(want), "{want} not in {note}");
    }

    edit_default(&client, json!({"spec": {"backend": {"type": "host-gw"}}})).await;
    wait_for(
        "backend-type host-gw on every Node",
        Duration::from_secs(10),
        || async {
            let all = nodes(&client).await;
            if all
                .values()
                .all(|n| annotation(n, annotations::BACKEND_TYPE) == Some("host-gw"))
            {
                Ok(())
            } else {
                Err(format!(
                    "{:?}",
                    all.values()
                        .map(|n| annotation(n, annotations::BACKEND_TYPE))
                        .collect::<Vec<_>>()
                ))
            }
        },
    )
    .await;
}

#[tokio::test]
async fn address_plan_change_is_refused_while_subnets_are_allocated() {
    let _serial = SERIAL.lock().await;
    let cp = cluster().await;
    let client = cp.client();
    apply_network(&cp, "10.244.0.0/16", 24).await;
    let _controller = Controller::start(&cp, "c");
    let names: Vec<String> = vec!["a".into(), "b".into()];
    for (i, n) in names.iter().enumerate() {
        create_node(&client, n, &format!("192.168.81.{}", i + 1), None).await;
    }
    wait_published(&client, &names, Duration::from_secs(30)).await;
    wait_condition(&client, "default", READY, "True", "Applied").await;
    let before = resource_versions(&client).await;

    edit_default(&client, json!({"spec": {"clusterCIDR": "10.245.0.0/16"}})).await;
    let message = wait_condition(&client, "default", DEGRADED, "True", "LiveChangeRefused").await;
    for want in [
        "clusterCIDR 10.244.0.0/16 -> 10.245.0.0/16",
        "2 Node subnet(s)",
        "drain and delete every Node",
        "create a new cluster",
    ] {
        assert!(message.contains(want), "{want} not in {message}");
    }
    let status = network(&client, "default").await.status.unwrap();
    assert_eq!(status.active_cluster_cidr.as_deref(), Some("10.244.0.0/16"));
    wait_for_event(&client, "CanalNetwork", "default", "LiveChangeRefused").await;
    assert_eq!(
        resource_versions(&client).await,
        before,
        "no Node was touched"
    );

    // The plan in force keeps serving new Nodes.
    create_node(&client, "c", "192.168.81.3", None).await;
    let all = wait_published(&client, &["c".into()], Duration::from_secs(20)).await;
    assert!(pod_cidr(&all["c"]).unwrap().starts_with("10.244."));

    // Once every Node is gone, the new plan applies by itself.
    for n in ["a", "b", "c"] {
        delete_node(&client, n).await;
    }
    wait_for(
        "activeClusterCIDR 10.245.0.0/16",
        Duration::from_secs(20),
        || async {
            let s = network(&client, "default").await.status.unwrap_or_default();
            if s.active_cluster_cidr.as_deref() == Some("10.245.0.0/16") {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
    wait_condition(&client, "default", READY, "True", "Applied").await;
    wait_for_event(&client, "CanalNetwork", "default", "AddressPlanApplied").await;
    create_node(&client, "d", "192.168.81.4", None).await;
    let all = wait_published(&client, &["d".into()], Duration::from_secs(20)).await;
    assert!(pod_cidr(&all["d"]).unwrap().starts_with("10.245."));
}

/// Replaces the CanalNetwork schema with one that accepts any spec, as an
/// older or newer version of the CRD might have, so malformed objects can be
/// stored the way they would survive a schema change.
async fn loosen_canalnetwork_schema(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = canal_crds::crd::all()
        .into_iter()
        .find(|c| c.metadata.name.as_deref() == Some("canalnetworks.canal.dev"))
        .unwrap();
    let mut value = serde_json::to_value(&crd).unwrap();
    for version in value["spec"]["versions"].as_array_mut().unwrap() {
        version["schema"]["openAPIV3Schema"]["properties"]["spec"] =
            json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    }
    api.patch(
        "canalnetworks.canal.dev",
        &PatchParams::apply(canal_e2e::install::FIELD_MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await
    .expect("loosening the CanalNetwork schema");
}

#[tokio::test]
async fn other_networks_are_ignored_and_malformed_objects_never_wedge_the_controller() {
    let _serial = SERIAL.lock().await;
    let cp = cluster().await;
    let client = cp.client();
    apply_network(&cp, "10.244.0.0/16", 24).await;
    let _controller = Controller::start(&cp, "c");
    create_node(&client, "n1", "192.168.82.1", None).await;
    wait_published(&client, &["n1".into()], Duration::from_secs(30)).await;

    let api: Api<CanalNetwork> = Api::all(client.clone());
    api.create(
        &PostParams::default(),
        &CanalNetwork::new("other", CanalNetworkSpec::with_cluster_cidr("10.50.0.0/16")),
    )
    .await
    .unwrap();
    let message = wait_condition(&client, "other", READY, "False", "Ignored").await;
    assert!(
        message.contains("only the CanalNetwork named \"default\" is used"),
        "{message}"
    );
    wait_for_event(&client, "CanalNetwork", "other", "Ignored").await;

    // Store malformed objects under a loose schema, then restore the real one.
    loosen_canalnetwork_schema(&client).await;
    let dynamic: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<CanalNetwork>(&()),
    );
    wait_for(
        "the loose schema to accept a malformed spec",
        Duration::from_secs(20),
        || async {
            dynamic
                .patch(
                    "default",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"backend": {"vni": "forty-two"}}})),
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )
    .await;
    let broken: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "canal.dev/v1alpha1", "kind": "CanalNetwork",
        "metadata": {"name": "broken"}, "spec": {"clusterCIDR": 7}
    }))
    .unwrap();
    dynamic
        .create(&PostParams::default(), &broken)
        .await
        .expect("storing a malformed CanalNetwork");
    canal_e2e::install::install_crds(&client)
        .await
        .expect("restoring the CRDs");

    let message = wait_condition(&client, "default", DEGRADED, "True", "InvalidSpec").await;
    assert!(
        message.contains("forty-two") && message.contains("last valid settings stay in force"),
        "{message}"
    );
    wait_condition(&client, "broken", READY, "False", "Ignored").await;

    // Still allocating with the last valid settings.
    create_node(&client, "n2", "192.168.82.2", None).await;
    let all = wait_published(&client, &["n2".into()], Duration::from_secs(20)).await;
    assert!(
        annotation(&all["n2"], annotations::BACKEND_DATA)
            .unwrap()
            .starts_with(r#"{"VNI":1,"#)
    );

    // Repaired: the new settings apply.
    edit_default(&client, json!({"spec": {"backend": {"vni": 5}}})).await;
    wait_condition(&client, "default", READY, "True", "Applied").await;
    wait_for("VNI 5 on every Node", Duration::from_secs(10), || async {
        let all = nodes(&client).await;
        if all.values().all(|n| {
            annotation(n, annotations::BACKEND_DATA).is_some_and(|d| d.starts_with(r#"{"VNI":5,"#))
        }) {
            Ok(())
        } else {
            Err("stale backend-data".into())
        }
    })
    .await;
}
