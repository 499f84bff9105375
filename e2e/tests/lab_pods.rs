//! The kubelet stand-in, the CNI runtime, the echo servers, `probe` and
//! `matrix`, tested with the standard ptp + host-local plugins (so they do
//! not depend on canal-cni): pods on two nodes joined by hand-made routes.

mod support;

use std::time::Duration;

use canal_e2e::Lab;
use canal_e2e::lab::{Matrix, PodOptions, PodPort, Protocol, UpOptions, netns};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::Api;
use support::ptp_conflist;

async fn ptp_lab(name: &str, nodes: u32) -> Lab {
    let lab = Lab::up(
        Lab::test_state_dir(name),
        UpOptions {
            nodes,
            agents: false,
            controller: false,
            ..UpOptions::default()
        },
    )
    .await
    .expect("lab comes up");
    let records = lab.nodes().unwrap();
    for node in &records {
        let paths = lab.state().node(&node.name);
        std::fs::create_dir_all(paths.cni_conf()).unwrap();
        std::fs::write(
            paths.cni_conf().join("10-ptp.conflist"),
            ptp_conflist(&format!("10.244.{}.0/24", node.slot), &paths.cni_data()),
        )
        .unwrap();
        // host-gw style routes to the other nodes' pod subnets.
        for other in records.iter().filter(|o| o.name != node.name) {
            netns::ip(&[
                "-n",
                &node.netns,
                "route",
                "add",
                &format!("10.244.{}.0/24", other.slot),
                "via",
                &other.address.to_string(),
            ])
            .unwrap();
        }
    }
    lab
}

#[tokio::test]
async fn pods_get_objects_addresses_servers_and_full_connectivity() {
    let lab = ptp_lab("pods", 2).await;
    let specs = vec![
        PodOptions::new("x", "a", "node-1").label("pod", "a"),
        PodOptions::new("x", "b", "node-2").label("pod", "b"),
        PodOptions::new("y", "a", "node-1").label("pod", "a"),
        PodOptions::new("y", "b", "node-2").label("pod", "b"),
    ];
    let added = lab.add_pods(specs).await.expect("pods come up");
    assert_eq!(added.len(), 4);

    // The Pod objects look like the kubelet ran them.
    let client = lab.client();
    for record in &added {
        let api: Api<Pod> = Api::namespaced(client.clone(), &record.namespace);
        let pod = api.get(&record.name).await.unwrap();
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some(record.node.as_str()));
        let ports: Vec<String> = spec.containers[0]
            .ports
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|p| {
                format!(
                    "{}/{}:{}",
                    p.container_port,
                    p.protocol.clone().unwrap_or_default(),
                    p.name.clone().unwrap_or_default()
                )
            })
            .collect();
        assert_eq!(
            ports,
            [
                "80/TCP:serve-80-tcp",
                "81/TCP:serve-81-tcp",
                "80/UDP:serve-80-udp",
                "81/UDP:serve-81-udp"
            ]
        );
        let status = pod.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(
            status.pod_ip.as_deref(),
            Some(record.ipv4().unwrap().to_string().as_str())
        );
        let node = lab.node(&record.node).unwrap();
        assert_eq!(
            status.host_ip.as_deref(),
            Some(node.address.to_string().as_str())
        );
        assert!(
            status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        );
        assert!(netns::exists(&record.netns));
    }
    let ns = Api::<Namespace>::all(client.clone())
        .get("x")
        .await
        .unwrap();
    assert_eq!(
        ns.metadata
            .labels
            .unwrap_or_default()
            .get("kubernetes.io/metadata.name")
            .map(String::as_str),
        Some("x")
    );

    // Every pod reaches every pod on both ports over TCP and UDP.
    let pods: Vec<String> = added.iter().map(|p| p.key()).collect();
    let expected = Matrix::filled(pods.clone(), true);
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        for port in [80, 81] {
            let run = lab.matrix(port, protocol).await.unwrap();
            assert!(
                run.matrix.mismatches(&expected).is_empty(),
                "{port}/{protocol}:\n{}",
                Matrix::report(&expected, &run.matrix)
            );
            // Pod-to-pod traffic keeps the pod's own source address.
            for ((from, _), outcome) in &run.outcomes {
                let source = lab.pod(from).unwrap().ipv4().unwrap();
                assert_eq!(
                    outcome.seen_source.map(|s| s.ip()),
                    Some(source.into()),
                    "{from}"
                );
            }
        }
    }

    // A port nobody serves is refused, and the CLI says "blocked" with exit 1.
    let refused = lab.probe("x/a", "x/b", 8080, Protocol::Tcp).await.unwrap();
    assert!(
        !refused.connected && refused.detail.contains("refused"),
        "{refused:?}"
    );
    let cli = support::canal_lab(
        &lab.state().dir,
        &["probe", "x/a", "y/b", "--port", "82", "--protocol", "UDP"],
    );
    assert_eq!(cli.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&cli.stdout), "blocked\n");
    let cli = support::canal_lab_ok(&lab.state().dir, &["probe", "x/a", "y/b", "--port", "81"]);
    assert_eq!(cli, "connected\n");
    let json = support::canal_lab_ok(
        &lab.state().dir,
        &["matrix", "--json", "--port", "80", "--protocol", "UDP"],
    );
    let table = Matrix::from_json(&serde_json::from_str(&json).unwrap()).unwrap();
    assert!(table.mismatches(&expected).is_empty(), "{json}");

    // pod del: CNI DEL removes the host side, then the namespace and object go.
    let gone = lab.pod("x/b").unwrap();
    let host_links_before =
        netns::ip(&["-n", &lab.node("node-2").unwrap().netns, "-o", "link"]).unwrap();
    lab.del_pod("x/b").await.unwrap();
    let host_links_after =
        netns::ip(&["-n", &lab.node("node-2").unwrap().netns, "-o", "link"]).unwrap();
    assert_eq!(
        host_links_after.lines().count() + 1,
        host_links_before.lines().count(),
        "CNI DEL removes the pod's host-side veth:\nbefore:\n{host_links_before}\nafter:\n{host_links_after}"
    );
    assert!(!netns::exists(&gone.netns));
    let api: Api<Pod> = Api::namespaced(client.clone(), "x");
    assert!(api.get_opt("b").await.unwrap().is_none());
    let run = lab.matrix(80, Protocol::Tcp).await.unwrap();
    assert_eq!(run.matrix.pods(), ["x/a", "y/a", "y/b"]);
}

#[tokio::test]
async fn custom_ports_and_failures_leave_nothing_half_made() {
    let lab = ptp_lab("pod-failures", 1).await;
    let pod = lab
        .add_pod(PodOptions::new("z", "web", "node-1").ports(vec![
            PodPort::parse("8080/TCP:http").unwrap(),
            PodPort::parse("5353/UDP").unwrap(),
            PodPort::parse("9000/SCTP:sctp").unwrap(),
        ]))
        .await
        .unwrap();
    assert!(
        lab.probe("z/web", "z/web", 8080, Protocol::Tcp)
            .await
            .unwrap()
            .connected
    );
    assert!(
        lab.probe("z/web", "z/web", 5353, Protocol::Udp)
            .await
            .unwrap()
            .connected
    );
    assert!(
        !lab.probe("z/web", "z/web", 80, Protocol::Tcp)
            .await
            .unwrap()
            .connected
    );
    assert!(
        lab.probe("z/web", "z/web", 9000, Protocol::Sctp)
            .await
            .is_err()
    );

    // Duplicate pods, unknown nodes and bad names are refused up front.
    let dup = lab
        .add_pod(PodOptions::new("z", "web", "node-1"))
        .await
        .unwrap_err();
    assert!(dup.to_string().contains("already exists"), "{dup}");
    let nowhere = lab
        .add_pod(PodOptions::new("z", "p", "node-9"))
        .await
        .unwrap_err();
    assert!(nowhere.to_string().contains("no node node-9"), "{nowhere}");
    assert!(
        lab.add_pod(PodOptions::new("Z", "p", "node-1"))
            .await
            .is_err()
    );

    // A CNI failure (no configuration) undoes the Pod object and namespace.
    let conf = lab.state().node("node-1").cni_conf();
    std::fs::rename(conf.join("10-ptp.conflist"), conf.join("10-ptp.off")).unwrap();
    let failed = lab
        .add_pod(PodOptions::new("z", "broken", "node-1"))
        .await
        .unwrap_err();
    assert!(
        failed.to_string().contains("no CNI configuration"),
        "{failed}"
    );
    // A plugin failure too (host-local refuses an invalid subnet).
    std::fs::write(
        conf.join("10-bad.conflist"),
        support::ptp_conflist("10.244.300.0/24", &lab.state().node("node-1").cni_data()),
    )
    .unwrap();
    let failed = lab
        .add_pod(PodOptions::new("z", "broken", "node-1"))
        .await
        .unwrap_err();
    assert!(
        failed.to_string().contains("CNI ADD of z/broken"),
        "{failed}"
    );
    let api: Api<Pod> = Api::namespaced(lab.client(), "z");
    assert!(api.get_opt("broken").await.unwrap().is_none());
    assert!(!netns::exists(&lab.names().pod_netns("z", "broken")));
    assert!(lab.pod("z/broken").is_err());
    assert_eq!(lab.pods().unwrap().len(), 1);
    assert_eq!(pod.key(), "z/web");
}

#[tokio::test]
async fn nodes_join_and_leave_a_running_lab() {
    let lab = ptp_lab("nodes", 1).await;
    lab.add_pod(PodOptions::new("x", "a", "node-1"))
        .await
        .unwrap();
    let added = lab.add_node("extra").await.unwrap();
    assert_eq!(added.node.slot, 2);
    assert!(netns::exists(&lab.names().node_netns("extra")));
    // The forwarder serves the new node too.
    canal_e2e::lab::forward::wait_listening(
        &added.node.netns,
        canal_e2e::lab::names::NODE_API_PORT,
        Duration::from_secs(5),
    )
    .unwrap();
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(lab.client());
    assert!(nodes.get_opt("extra").await.unwrap().is_some());

    // Removing a node removes its pods first.
    lab.del_node("node-1").await.unwrap();
    assert!(nodes.get_opt("node-1").await.unwrap().is_none());
    assert!(lab.pods().unwrap().is_empty());
    assert!(!netns::exists(&lab.names().node_netns("node-1")));
    assert!(!netns::exists(&lab.names().pod_netns("x", "a")));
    let pods: Api<Pod> = Api::namespaced(lab.client(), "x");
    assert!(pods.get_opt("a").await.unwrap().is_none());
    // Its slot is reused.
    let again = lab.add_node("again").await.unwrap();
    assert_eq!(again.node.slot, 1);
    assert!(lab.add_node("again").await.is_err(), "names are unique");
    assert!(lab.add_node("underlay").await.is_err(), "reserved name");
}
