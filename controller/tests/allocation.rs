//! Pod-CIDR allocation against a real kube-apiserver and the real binary:
//! distinct subnets with flannel annotations, idempotency across a restart,
//! adoption, conflicts, exhaustion and recovery.

mod support;

use std::time::Duration;

use canal_crds::annotations;
use canal_crds::condition::{DEGRADED, READY};
use support::*;

#[tokio::test]
async fn allocates_distinct_subnets_and_a_second_reconcile_writes_nothing() {
    let _serial = SERIAL.lock().await;
    let cp = cluster().await;
    let client = cp.client();
    apply_network(&cp, "10.244.0.0/16", 24).await;
    let mut controller = Controller::start(&cp, "first");

    let names: Vec<String> = (0..5).map(|i| format!("worker-{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        create_node(&client, n, &format!("192.168.50.{}", 10 + i), None).await;
    }
    let all = wait_published(&client, &names, Duration::from_secs(30)).await;
    assert_distinct_inside(&all, "10.244.0.0/16");
    for (i, n) in names.iter().enumerate() {
        let node = &all[n];
        let mac = annotations::format_mac(annotations::vtep_mac(n));
        assert_eq!(annotation(node, annotations::BACKEND_TYPE), Some("vxlan"));
        assert_eq!(
            annotation(node, annotations::BACKEND_DATA),
            Some(format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#).as_str())
        );
        assert_eq!(
            annotation(node, annotations::PUBLIC_IP),
            Some(format!("192.168.50.{}", 10 + i).as_str())
        );
        assert_eq!(
            annotation(node, annotations::KUBE_SUBNET_MANAGER),
            Some("true")
        );
        let spec = node.spec.as_ref().unwrap();
        assert_eq!(
            spec.pod_cidrs.as_ref().unwrap(),
            &vec![spec.pod_cidr.clone().unwrap()]
        );
    }
    let note = wait_for_event(&client, "Node", "worker-0", "SubnetAllocated").await;
    assert!(
        note.contains("allocated from clusterCIDR 10.244.0.0/16"),
        "{note}"
    );

    // Status, as `kubectl get canalnetwork` shows it.
    wait_for(
        "CanalNetwork default Ready with 5 subnets",
        Duration::from_secs(20),
        || async {
            let n = network(&client, "default").await;
            let s = n.status.unwrap_or_default();
            let ready = canal_crds::condition::is_true(&s.conditions, READY);
            if ready
                && s.allocated_subnets == Some(5)
                && s.free_subnets == Some(251)
                && s.observed_generation == n.metadata.generation
            {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
    let out = cp
        .kubectl()
        .unwrap()
        .args(["get", "canalnetwork"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    println!("{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("default"))
        .expect("a row for default");
    for want in [
        "10.244.0.0/16",
        "24",
        "vxlan",
        "True",
        "Applied",
        "5",
        "251",
    ] {
        assert!(
            row.split_whitespace().any(|c| c == want),
            "{want} missing in {row}"
        );
    }
    assert_eq!(
        controller
            .metric("canal_controller_subnets_allocated{family=\"IPv4\"}")
            .await,
        Some(5.0)
    );
    assert_eq!(
        controller.metric("canal_controller_leader").await,
        Some(1.0)
    );
    assert_eq!(
        http_get(&controller.metrics_addr, "/readyz")
            .await
            .as_deref(),
        Some("ok")
    );

    // A restarted controller reconciles the unchanged world and writes
    // nothing. A sixth Node created after the restart is handled after every
    // older Node (oldest first), so once it is published the first pass is
    // over: exactly one Node write and one status write may have happened.
    let before = resource_versions(&client).await;
    let network_rv = network(&client, "default").await.metadata.resource_version;
    controller.stop();
    let restarted = Controller::start(&cp, "second");
    wait_for(
        "the restarted controller to list 5 Nodes",
        Duration::from_secs(20),
        || async {
            match restarted.metric("canal_controller_nodes").await {
                Some(5.0) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    create_node(&client, "late", "192.168.50.99", None).await;
    wait_published(&client, &["late".to_string()], Duration::from_secs(20)).await;
    let after = resource_versions(&client).await;
    for n in &names {
        assert_eq!(before[n], after[n], "Node {n} was written again");
    }
    wait_for(
        "the status write for the sixth Node",
        Duration::from_secs(20),
        || async {
            let writes = restarted
                .metric("canal_controller_api_writes_total{resource=\"canalnetwork_status\"}")
                .await;
            match writes {
                Some(1.0) => Ok(()),
                other => Err(format!("status writes {other:?}")),
            }
        },
    )
    .await;
    assert_eq!(
        restarted
            .metric("canal_controller_api_writes_total{resource=\"node\"}")
            .await,
        Some(1.0),
        "only the new Node is written"
    );
    assert_ne!(
        network(&client, "default").await.metadata.resource_version,
        network_rv
    );
}

#[tokio::test]
async fn adopts_existing_pod_cidrs_and_reports_conflicts_without_touching_them() {
    let _serial = SERIAL.lock().await;
    let cp = cluster().await;
    let client = cp.client();
    apply_network(&cp, "10.244.0.0/16", 24).await;
    // Nodes registered before canal runs, with podCIDRs from elsewhere.
    create_node(&client, "adopted", "192.168.60.1", Some("10.244.77.0/24")).await;
    create_node(&client, "outside", "192.168.60.2", Some("10.99.0.0/24")).await;
    create_node(
        &client,
        "overlapping",
        "192.168.60.3",
        Some("10.244.77.0/24"),
    )
    .await;
    // The API server refuses unparsable CIDRs; an IPv6-only one is what a
    // Node can carry that canal (IPv4) cannot use.
    create_node(&client, "garbage", "192.168.60.4", Some("fd00:5::/64")).await;
    let before = nodes(&client).await;
    let _controller = Controller::start(&cp, "c");
    create_node(&client, "fresh", "192.168.60.5", None).await;

    let all = wait_published(
        &client,
        &["adopted".into(), "fresh".into()],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(pod_cidr(&all["adopted"]).as_deref(), Some("10.244.77.0/24"));
    assert_ne!(pod_cidr(&all["fresh"]).as_deref(), Some("10.244.77.0/24"));
    let note = wait_for_event(&client, "Node", "adopted", "SubnetAdopted").await;
    assert!(note.contains("10.244.77.0/24"), "{note}");

    for (name, why) in [
        ("outside", "outside clusterCIDR 10.244.0.0/16"),
        ("overlapping", "overlaps 10.244.77.0/24 of Node adopted"),
        ("garbage", "no IPv4 entry"),
    ] {
        let note = wait_for_event(&client, "Node", name, "PodCIDRConflict").await;
        assert!(note.contains(why), "{name}: {note}");
    }
    let (status, reason, message) =
        wait_for("Degraded=Conflict", Duration::from_secs(20), || async {
            match condition(&client, "default", DEGRADED).await {
                Some(c) if c.1 == "Conflict" => Ok(c),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    assert_eq!(status, "True");
    for name in ["outside", "overlapping", "garbage"] {
        assert!(message.contains(name), "{reason}: {message}");
    }
    let note = wait_for_event(&client, "CanalNetwork", "default", "Conflict").await;
    assert!(note.contains("3 Node(s)"), "{note}");

    // Conflicting Nodes are left exactly as they were.
    let after = nodes(&client).await;
    for name in ["outside", "overlapping", "garbage"] {
        assert_eq!(
            before[name].metadata.resource_version, after[name].metadata.resource_version,
            "{name} was written"
        );
        assert!(!is_published(&after[name]));
    }

    // When the Node holding 10.244.77.0/24 goes, the overlapping one is adopted.
    delete_node(&client, "adopted").await;
    let all = wait_published(&client, &["overlapping".into()], Duration::from_secs(20)).await;
    assert_eq!(
        pod_cidr(&all["overlapping"]).as_deref(),
        Some("10.244.77.0/24")
    );
}

#[tokio::test]
async fn exhaustion_is_reported_and_a_deleted_node_frees_a_subnet() {
    let _serial = SERIAL.lock().await;
    let cp = cluster().await;
    let client = cp.client();
    // A /28 holds four /30 subnets.
    apply_network(&cp, "10.30.0.0/28", 30).await;
    let controller = Controller::start(&cp, "c");
    let names: Vec<String> = (0..4).map(|i| format!("n{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        create_node(&client, n, &format!("192.168.70.{}", i + 1), None).await;
    }
    let all = wait_published(&client, &names, Duration::from_secs(30)).await;
    assert_distinct_inside(&all, "10.30.0.0/28");

    create_node(&client, "waiting", "192.168.70.9", None).await;
    let note = wait_for_event(&client, "Node", "waiting", "SubnetExhausted").await;
    assert!(
        note.contains("all 4 /30 subnets of 10.30.0.0/28 are allocated"),
        "{note}"
    );
    let (_, _, message) = wait_for(
        "SubnetExhausted condition",
        Duration::from_secs(20),
        || async {
            match condition(&client, "default", READY).await {
                Some(c) if c.0 == "False" && c.1 == "SubnetExhausted" => Ok(c),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(message.contains("waiting"), "{message}");
    let status = network(&client, "default").await.status.unwrap();
    assert_eq!(
        (
            status.allocated_subnets,
            status.free_subnets,
            status.pending_nodes
        ),
        (Some(4), Some(0), Some(1))
    );
    assert_eq!(
        controller.metric("canal_controller_pending_nodes").await,
        Some(1.0)
    );
    wait_for_event(&client, "CanalNetwork", "default", "SubnetExhausted").await;

    let freed = pod_cidr(&all["n2"]).unwrap();
    delete_node(&client, "n2").await;
    let all = wait_published(&client, &["waiting".into()], Duration::from_secs(20)).await;
    assert_eq!(pod_cidr(&all["waiting"]), Some(freed));
    assert_distinct_inside(&all, "10.30.0.0/28");
    wait_for("Ready again", Duration::from_secs(20), || async {
        match condition(&client, "default", READY).await {
            Some(c) if c.0 == "True" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}
