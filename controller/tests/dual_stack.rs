//! Dual-stack allocation (issue 14) against a real kube-apiserver and the
//! real canal-controller: one subnet per family per Node in the cluster's
//! order, flannel's IPv6 annotations, adoption of a Node that has only
//! IPv4 (reported, never changed: the API server would refuse it anyway),
//! status per family, and the live-change rule per family.

mod support;

use std::time::Duration;

use canal_crds::annotations;
use canal_crds::{CanalNetworkSpec, CanalNetworkStatus};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use support::*;

const V4: &str = "10.244.0.0/16";
const V6: &str = "fd00:10:244::/56";

async fn apply_dual(cp: &canal_e2e::ControlPlane, cidrs: &[&str]) {
    canal_e2e::install::apply_default_network(
        &cp.client(),
        CanalNetworkSpec::with_cluster_cidrs(cidrs),
    )
    .await
    .expect("CanalNetwork default applies");
}

/// A Node with an IPv4 and an IPv6 InternalIP.
async fn create_dual_node(client: &kube::Client, name: &str, i: u8, pod_cidrs: &[&str]) {
    create_node(client, name, &format!("192.168.60.{i}"), None).await;
    let api: Api<Node> = Api::all(client.clone());
    if !pod_cidrs.is_empty() {
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"podCIDR": pod_cidrs[0], "podCIDRs": pod_cidrs}})),
        )
        .await
        .unwrap();
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"addresses": [
            {"type": "InternalIP", "address": format!("192.168.60.{i}")},
            {"type": "InternalIP", "address": format!("fd00:60::{i}")},
            {"type": "Hostname", "address": name},
        ]}})),
    )
    .await
    .unwrap();
}

fn pod_cidrs(node: &Node) -> Vec<String> {
    node.spec
        .as_ref()
        .and_then(|s| s.pod_cidrs.clone())
        .unwrap_or_default()
}

async fn status_where(
    client: &kube::Client,
    what: &str,
    ok: impl Fn(&CanalNetworkStatus) -> bool,
) -> CanalNetworkStatus {
    wait_for(what, Duration::from_secs(30), || async {
        let s = network(client, "default").await.status.unwrap_or_default();
        if ok(&s) { Ok(s) } else { Err(format!("{s:?}")) }
    })
    .await
}

#[tokio::test]
async fn dual_stack_nodes_get_both_families_and_ipv4_only_nodes_keep_theirs() {
    let _serial = SERIAL.lock().await;
    let cp = cluster().await;
    let client = cp.client();
    apply_dual(&cp, &[V4, V6]).await;
    // Set before the controller runs, IPv4 only (as a cluster that gains
    // IPv6 has them).
    create_dual_node(&client, "old", 9, &["10.244.9.0/24"]).await;
    let _controller = Controller::start(&cp, "dual");
    let names: Vec<String> = (1..=3).map(|i| format!("w{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        create_dual_node(&client, n, i as u8 + 1, &[]).await;
    }
    let all = wait_for(
        "three dual-stack Nodes",
        Duration::from_secs(30),
        || async {
            let all = nodes(&client).await;
            let done = names.iter().all(|n| {
                all.get(n).is_some_and(|node| {
                    pod_cidrs(node).len() == 2
                        && annotation(node, annotations::PUBLIC_IPV6).is_some()
                })
            });
            if done {
                Ok(all)
            } else {
                Err(format!(
                    "{:?}",
                    all.values().map(pod_cidrs).collect::<Vec<_>>()
                ))
            }
        },
    )
    .await;
    let mut seen = std::collections::BTreeSet::new();
    for (i, n) in names.iter().enumerate() {
        let node = &all[n];
        let cidrs = pod_cidrs(node);
        let v4: IpNet = cidrs[0].parse().unwrap();
        let v6: IpNet = cidrs[1].parse().unwrap();
        assert!(V4.parse::<IpNet>().unwrap().contains(&v4), "{cidrs:?}");
        assert!(V6.parse::<IpNet>().unwrap().contains(&v6), "{cidrs:?}");
        assert_eq!(v6.prefix_len(), 64);
        assert!(
            seen.insert(v4) && seen.insert(v6),
            "{cidrs:?} handed out twice"
        );
        assert_eq!(
            node.spec.as_ref().unwrap().pod_cidr.as_deref(),
            Some(cidrs[0].as_str())
        );
        let mac6 = annotations::format_mac(annotations::vtep_mac_v6(n));
        assert_eq!(
            annotation(node, annotations::BACKEND_V6_DATA),
            Some(format!(r#"{{"VNI":1,"VtepMAC":"{mac6}"}}"#).as_str())
        );
        assert_eq!(
            annotation(node, annotations::PUBLIC_IPV6),
            Some(format!("fd00:60::{}", i + 1).as_str())
        );
        assert_eq!(
            annotation(node, annotations::PUBLIC_IP),
            Some(format!("192.168.60.{}", i + 1).as_str())
        );
    }
    // The IPv4-only Node: adopted in IPv4, unchanged, no IPv6 annotations,
    // and reported.
    let note = wait_for_event(&client, "Node", "old", "PodCIDRFamilyMissing").await;
    assert!(note.contains(V6), "{note}");
    let old = &nodes(&client).await["old"];
    assert_eq!(pod_cidrs(old), ["10.244.9.0/24"]);
    assert_eq!(annotation(old, annotations::BACKEND_V6_DATA), None);
    assert!(annotation(old, annotations::BACKEND_DATA).is_some());
    let s = status_where(&client, "status per family", |s| {
        s.family_subnets.len() == 2 && s.family_subnets[1].allocated == 3
    })
    .await;
    assert_eq!(s.active_cluster_cidrs, [V4, V6]);
    assert_eq!(s.active_node_subnet_length_v6, Some(64));
    assert_eq!(s.family_subnets[0].allocated, 4, "{s:?}");
    assert_eq!(s.family_subnets[1].family, "IPv6");

    // A change of the IPv6 range with /64s allocated: refused, the range
    // in force stays.
    apply_dual(&cp, &[V4, "fd00:99::/56"]).await;
    let s = status_where(&client, "LiveChangeRefused", |s| {
        canal_crds::condition::find(&s.conditions, canal_crds::condition::DEGRADED)
            .is_some_and(|c| c.reason == "LiveChangeRefused")
    })
    .await;
    assert_eq!(s.active_cluster_cidrs, [V4, V6]);
}

#[tokio::test]
async fn ipv6_only_clusters_get_no_ipv4_annotations() {
    let _serial = SERIAL.lock().await;
    let cp = cluster().await;
    let client = cp.client();
    apply_dual(&cp, &[V6]).await;
    let _controller = Controller::start(&cp, "v6");
    create_dual_node(&client, "six", 6, &[]).await;
    let node = wait_for("an IPv6 podCIDR", Duration::from_secs(30), || async {
        let n = nodes(&client).await.remove("six").unwrap();
        if annotation(&n, annotations::PUBLIC_IPV6).is_some() {
            Ok(n)
        } else {
            Err(format!("{:?}", n.metadata.annotations))
        }
    })
    .await;
    let cidrs = pod_cidrs(&node);
    assert_eq!(cidrs.len(), 1);
    assert!(cidrs[0].starts_with("fd00:10:244:"), "{cidrs:?}");
    assert_eq!(annotation(&node, annotations::BACKEND_DATA), None);
    assert_eq!(annotation(&node, annotations::PUBLIC_IP), None);
    let s = status_where(&client, "IPv6 status", |s| s.allocated_subnets == Some(1)).await;
    assert_eq!(s.active_cluster_cidr.as_deref(), Some(V6));
    assert_eq!(s.active_node_subnet_length, None);
}
