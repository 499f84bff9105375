//! Node addresses against a real kube-apiserver and the real binary
//! (issues 10.2 and 10.6): a Node address inside clusterCIDR is a Conflict
//! naming the Node and nothing is allocated into it; an overlay address
//! never moves silently (Event naming who wrote it, previous address and
//! time on the Node), and never to an address another Node publishes.

mod support;

use std::time::Duration;

use canal_crds::annotations;
use canal_crds::condition::DEGRADED;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use support::*;

const PREVIOUS: &str = "canal.dev/previous-public-ip";
const CHANGED_AT: &str = "canal.dev/public-ip-changed-at";

/// Sets the InternalIP of `name` as `manager` (a kubelet, or an attacker).
async fn set_internal_ip(client: &kube::Client, name: &str, ip: &str, manager: &str) {
    let api: Api<Node> = Api::all(client.clone());
    api.patch_status(
        name,
        &PatchParams {
            field_manager: Some(manager.into()),
            ..Default::default()
        },
        &Patch::Strategic(
            json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}}),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("setting the InternalIP of {name}: {e}"));
}

async fn public_ip(client: &kube::Client, name: &str) -> Option<String> {
    nodes(client)
        .await
        .get(name)
        .and_then(|n| annotation(n, annotations::PUBLIC_IP).map(str::to_string))
}

async fn wait_degraded(client: &kube::Client, needle: &str) -> String {
    wait_for(
        &format!("Degraded=True Conflict containing {needle:?}"),
        Duration::from_secs(20),
        || async {
            match condition(client, "default", DEGRADED).await {
                Some((s, r, m)) if s == "True" && r == "Conflict" && m.contains(needle) => Ok(m),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

#[tokio::test]
async fn node_addresses_inside_the_cluster_cidr_conflict_and_are_never_allocated() {
    let _serial = SERIAL.lock().await;
    let cp = cluster().await;
    let client = cp.client();
    // Four /24 subnets; two of them hold a Node's own address.
    apply_network(&cp, "10.244.0.0/22", 24).await;
    let mut controller = Controller::start(&cp, "addresses");
    create_node(&client, "inside", "10.244.0.5", None).await;
    let ext = create_node(&client, "ext", "192.168.40.2", None).await;
    let api: Api<Node> = Api::all(client.clone());
    api.patch_status(
        "ext",
        &PatchParams::default(),
        &Patch::Strategic(
            json!({"status": {"addresses": [{"type": "ExternalIP", "address": "10.244.2.9"}]}}),
        ),
    )
    .await
    .unwrap();
    drop(ext);
    for (i, n) in ["c", "d"].iter().enumerate() {
        create_node(&client, n, &format!("192.168.40.{}", 10 + i), None).await;
    }

    let msg = wait_degraded(&client, "Node inside").await;
    assert!(
        msg.contains("Node inside: InternalIP 10.244.0.5 lies inside clusterCIDR 10.244.0.0/22"),
        "{msg}"
    );
    let msg = wait_degraded(&client, "Node ext").await;
    assert!(
        msg.contains("Node ext: ExternalIP 10.244.2.9 lies inside clusterCIDR 10.244.0.0/22: subnet 10.244.2.0/24 is held back from allocation"),
        "{msg}"
    );
    let note = wait_for_event(&client, "Node", "inside", "NodeAddressConflict").await;
    assert!(note.contains("10.244.0.5"), "{note}");
    // Two Nodes got the two usable subnets; nothing holds a Node's address.
    let all = wait_for("two subnets allocated", Duration::from_secs(20), || async {
        let all = nodes(&client).await;
        let held = all.values().filter(|n| pod_cidr(n).is_some()).count();
        if held == 2 {
            Ok(all)
        } else {
            Err(format!("{held} allocated"))
        }
    })
    .await;
    for (name, n) in &all {
        if let Some(c) = pod_cidr(n) {
            assert!(
                c == "10.244.1.0/24" || c == "10.244.3.0/24",
                "{name} got {c}, which holds a Node address"
            );
        }
    }
    assert_eq!(
        public_ip(&client, "inside").await,
        None,
        "an overlay address inside the pod range is never published"
    );
    // The address leaves the range: the held-back subnet goes to a waiting Node.
    set_internal_ip(&client, "inside", "192.168.40.1", "kubelet").await;
    wait_for(
        "10.244.0.0/24 allocated",
        Duration::from_secs(20),
        || async {
            let all = nodes(&client).await;
            all.values()
                .any(|n| pod_cidr(n).as_deref() == Some("10.244.0.0/24"))
                .then_some(())
                .ok_or_else(|| "not yet".to_string())
        },
    )
    .await;
    controller.check_running();
}

#[tokio::test]
async fn overlay_addresses_never_move_silently_nor_onto_another_node() {
    let _serial = SERIAL.lock().await;
    let cp = cluster().await;
    let client = cp.client();
    apply_network(&cp, "10.244.0.0/16", 24).await;
    let mut controller = Controller::start(&cp, "moves");
    create_node(&client, "node-1", "192.168.41.1", None).await;
    create_node(&client, "node-2", "192.168.41.2", None).await;
    create_node(&client, "node-3", "192.168.41.3", None).await;
    wait_published(
        &client,
        &["node-1".into(), "node-2".into(), "node-3".into()],
        Duration::from_secs(30),
    )
    .await;

    // The attack: node-3's InternalIP set to node-1's, so every peer would
    // send node-3's pod traffic to node-1. Refused and reported.
    set_internal_ip(&client, "node-3", "192.168.41.1", "attacker").await;
    let msg = wait_degraded(&client, "Node node-3").await;
    assert!(
        msg.contains("InternalIP 192.168.41.1 is an address of Node node-1, so the overlay keeps sending its pod traffic to 192.168.41.3"),
        "{msg}"
    );
    wait_for_event(&client, "Node", "node-3", "NodeAddressConflict").await;
    assert_eq!(
        public_ip(&client, "node-3").await.as_deref(),
        Some("192.168.41.3")
    );
    assert_eq!(
        public_ip(&client, "node-1").await.as_deref(),
        Some("192.168.41.1")
    );

    // A real move (node-2 got a new address): published at once, with a
    // Warning Event naming who wrote it and the history on the Node.
    set_internal_ip(&client, "node-2", "192.168.41.22", "kubelet").await;
    let note = wait_for_event(&client, "Node", "node-2", "NodeAddressChanged").await;
    assert!(
        note.contains("moved from 192.168.41.2 to 192.168.41.22 (InternalIP, written by kubelet)"),
        "{note}"
    );
    let n2 = &nodes(&client).await["node-2"];
    assert_eq!(
        annotation(n2, annotations::PUBLIC_IP),
        Some("192.168.41.22")
    );
    assert_eq!(annotation(n2, PREVIOUS), Some("192.168.41.2"));
    assert!(annotation(n2, CHANGED_AT).is_some_and(|t| t.starts_with("20")));

    // public-ip-overwrite: whoever may annotate Nodes can re-point traffic;
    // it is checked like an address and the Event names the writer.
    let api: Api<Node> = Api::all(client.clone());
    let overwrite =
        |v: &str| json!({"metadata": {"annotations": {annotations::PUBLIC_IP_OVERWRITE: v}}});
    api.patch(
        "node-1",
        &PatchParams {
            field_manager: Some("kubectl-annotate".into()),
            ..Default::default()
        },
        &Patch::Merge(overwrite("127.0.0.1")),
    )
    .await
    .unwrap();
    wait_degraded(
        &client,
        "Node node-1: public-ip-overwrite annotation 127.0.0.1 is a loopback address",
    )
    .await;
    assert_eq!(
        public_ip(&client, "node-1").await.as_deref(),
        Some("192.168.41.1")
    );
    api.patch(
        "node-1",
        &PatchParams {
            field_manager: Some("kubectl-annotate".into()),
            ..Default::default()
        },
        &Patch::Merge(overwrite("203.0.113.7")),
    )
    .await
    .unwrap();
    let note = wait_for_event(&client, "Node", "node-1", "NodeAddressChanged").await;
    assert!(
        note.contains(
            "to 203.0.113.7 (public-ip-overwrite annotation, written by kubectl-annotate)"
        ),
        "{note}"
    );
    // node-1's overlay moved away, but 192.168.41.1 is still node-1's
    // InternalIP: node-3 still may not take it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        public_ip(&client, "node-3").await.as_deref(),
        Some("192.168.41.3")
    );
    wait_degraded(
        &client,
        "Node node-3: InternalIP 192.168.41.1 is an address of Node node-1",
    )
    .await;
    // node-1 goes (the machine was really handed over): node-3 moves, and
    // the Event names who wrote its address.
    delete_node(&client, "node-1").await;
    wait_for(
        "node-3 to publish 192.168.41.1",
        Duration::from_secs(20),
        || async {
            match public_ip(&client, "node-3").await {
                Some(ip) if ip == "192.168.41.1" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let note = wait_for_event(&client, "Node", "node-3", "NodeAddressChanged").await;
    assert!(note.contains("(InternalIP, written by attacker)"), "{note}");

    // A restart changes nothing (the history is carried, not re-derived).
    let before = resource_versions(&client).await;
    controller.stop();
    let mut again = Controller::start(&cp, "moves-again");
    tokio::time::sleep(Duration::from_secs(3)).await;
    again.check_running();
    assert_eq!(
        resource_versions(&client).await,
        before,
        "a restart rewrote Nodes"
    );
}
