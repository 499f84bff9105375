//! Pod connectivity end to end (issue 4): the lab with the real
//! canal-controller, canal-agent and canal-cni, real packets between pods in
//! namespaces on different nodes.

mod support;

use std::io::{Read, Write};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use canal_e2e::Lab;
use canal_e2e::lab::{DfOutcome, Matrix, PodOptions, Protocol, UpOptions, netns};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use support::{eventually, serial};

async fn lab(name: &str, nodes: u32) -> Lab {
    let started = Instant::now();
    let lab = Lab::up(
        Lab::test_state_dir(name),
        UpOptions {
            nodes,
            ..UpOptions::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("lab {name} with {nodes} nodes comes up: {e}"));
    eprintln!(
        "lab {name}: up --nodes {nodes} took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    lab
}

async fn pod_cidr(lab: &Lab, node: &str) -> Ipv4Net {
    let api: Api<Node> = Api::all(lab.client());
    api.get(node)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.pod_cidr)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{node} has a podCIDR"))
}

/// Every pod reaches every pod on TCP and UDP 80 and 81, and the server sees
/// the client pod's own address.
async fn assert_full_mesh(lab: &Lab) {
    let pods: Vec<String> = lab.pods().unwrap().iter().map(|p| p.key()).collect();
    let expected = Matrix::filled(pods, true);
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        for port in [80, 81] {
            let run = lab.matrix(port, protocol).await.unwrap();
            let mut report = String::new();
            for ((from, to), outcome) in &run.outcomes {
                if !outcome.connected {
                    report.push_str(&format!("  {from} -> {to}: {}\n", outcome.detail));
                }
            }
            assert!(
                run.matrix.mismatches(&expected).is_empty(),
                "{port}/{protocol}:\n{}{report}",
                Matrix::report(&expected, &run.matrix)
            );
            for ((from, to), outcome) in &run.outcomes {
                let source = lab.pod(from).unwrap().ipv4().unwrap();
                assert_eq!(
                    outcome.seen_source.map(|s| s.ip()),
                    Some(IpAddr::V4(source)),
                    "{from} -> {to} {port}/{protocol}: pod-to-pod traffic keeps the pod's address"
                );
            }
        }
    }
}

#[tokio::test]
async fn three_nodes_nine_pods_full_mesh_and_masqueraded_internet() {
    let _serial = serial().await;
    let lab = lab("mesh", 3).await;
    let pods = lab.add_conformance_pods().await.unwrap();
    assert_eq!(pods.len(), 9);
    // The pods really are spread over the three nodes and hold addresses
    // from their node's subnet.
    for pod in &pods {
        let cidr = pod_cidr(&lab, &pod.node).await;
        assert!(
            cidr.contains(&pod.ipv4().unwrap()),
            "{} has {:?}, outside {}'s {cidr}",
            pod.key(),
            pod.ips,
            pod.node
        );
    }
    assert_full_mesh(&lab).await;

    // Traffic leaving the cluster is masqueraded to the node's address.
    for pod in &pods {
        let node = lab.node(&pod.node).unwrap();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let outcome = lab
                .probe(&pod.key(), "internet", 80, protocol)
                .await
                .unwrap();
            assert!(
                outcome.connected,
                "{} -> internet {protocol}: {outcome:?}",
                pod.key()
            );
            assert_eq!(
                outcome.seen_source.map(|s| s.ip()),
                Some(IpAddr::V4(node.address)),
                "{} -> internet {protocol}: the internet host must see {}'s address",
                pod.key(),
                pod.node
            );
        }
    }
}

#[tokio::test]
async fn a_node_added_later_is_reachable_from_existing_pods() {
    let _serial = serial().await;
    let lab = lab("node-add", 2).await;
    lab.add_pods(vec![
        PodOptions::new("x", "a", "node-1"),
        PodOptions::new("x", "b", "node-2"),
    ])
    .await
    .unwrap();
    let added = lab.add_node("node-3").await.unwrap();
    eprintln!(
        "node-3, after its Node object was created: annotated in {} ms, routes on every other node in {} ms, lab programmed in {} ms",
        added.annotated_after.unwrap().as_millis(),
        added.routes_everywhere_after.unwrap().as_millis(),
        added.programmed_after.as_millis()
    );
    lab.add_pod(PodOptions::new("x", "c", "node-3"))
        .await
        .unwrap();
    assert_full_mesh(&lab).await;
}

#[tokio::test]
async fn a_deleted_node_disappears_from_every_other_node() {
    let _serial = serial().await;
    let lab = lab("node-del", 3).await;
    let gone = lab.node("node-3").unwrap();
    let cidr = pod_cidr(&lab, "node-3").await;
    let mac = canal_crds::annotations::format_mac(canal_crds::annotations::vtep_mac("node-3"));
    for other in ["node-1", "node-2"] {
        let snap = lab.kernel(other).unwrap();
        assert!(
            !snap.mentions(cidr, &mac, gone.address).is_empty(),
            "{other} should know node-3 before it goes: {snap:?}"
        );
    }
    lab.del_node("node-3").await.unwrap();
    for other in ["node-1", "node-2"] {
        eventually(
            &format!("{other} forgetting node-3"),
            Duration::from_secs(10),
            || async {
                let left = lab.kernel(other).map_err(|e| e.to_string())?.mentions(
                    cidr,
                    &mac,
                    gone.address,
                );
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(left.join("\n"))
                }
            },
        )
        .await;
    }
}

#[tokio::test]
async fn restarting_agents_does_not_break_a_long_running_tcp_stream() {
    let _serial = serial().await;
    let lab = lab("restart", 2).await;
    lab.add_pods(vec![
        PodOptions::new("x", "a", "node-1"),
        PodOptions::new("x", "b", "node-2"),
    ])
    .await
    .unwrap();
    let stream = lab.open_stream("x/a", "x/b", 80).await.unwrap();
    let mut conn = stream.stream;
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let pump = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<(usize, Duration), String> {
            let mut rounds = 0;
            let mut worst = Duration::ZERO;
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                let msg = format!("{rounds:064}");
                let sent = Instant::now();
                conn.write_all(msg.as_bytes())
                    .map_err(|e| format!("write {rounds}: {e}"))?;
                conn.read_exact(&mut buf)
                    .map_err(|e| format!("read {rounds}: {e}"))?;
                if buf != msg.as_bytes() {
                    return Err(format!("round {rounds}: echoed bytes differ"));
                }
                worst = worst.max(sent.elapsed());
                rounds += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok((rounds, worst))
        })
    };
    for node in ["node-1", "node-2"] {
        assert!(lab.stop_agent(node), "{node}'s agent was running");
        lab.start_agent(node).unwrap();
        lab.wait_programmed(Duration::from_secs(60)).await.unwrap();
    }
    // Keep the stream going a little after the last restart settled.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (rounds, worst) = pump.join().unwrap().expect("the stream survives");
    eprintln!("stream: {rounds} round trips across two agent restarts, slowest {worst:?}");
    assert!(rounds > 20, "too few round trips: {rounds}");
    assert!(
        worst < Duration::from_secs(1),
        "a round trip stalled for {worst:?}"
    );
}

#[tokio::test]
async fn a_route_deleted_by_hand_is_repaired() {
    let _serial = serial().await;
    let lab = lab("repair", 2).await;
    let cidr = pod_cidr(&lab, "node-2").await;
    let node1 = lab.node("node-1").unwrap();
    assert!(lab.kernel("node-1").unwrap().route_to(cidr).is_some());
    netns::ip(&["-n", &node1.netns, "route", "del", &cidr.to_string()]).unwrap();
    let deleted = Instant::now();
    assert!(lab.kernel("node-1").unwrap().route_to(cidr).is_none());
    eventually(
        "node-1's route to node-2 coming back",
        Duration::from_secs(10),
        || async {
            match lab
                .kernel("node-1")
                .map_err(|e| e.to_string())?
                .route_to(cidr)
            {
                Some(_) => Ok(()),
                None => Err("no route yet".to_string()),
            }
        },
    )
    .await;
    eprintln!("route repaired after {} ms", deleted.elapsed().as_millis());
}

fn pod_mtu(netns_name: &str) -> u32 {
    let out = netns::ip(&["-n", netns_name, "-j", "link", "show", "eth0"]).unwrap();
    let links: serde_json::Value = serde_json::from_str(&out).unwrap();
    links[0]["mtu"].as_u64().unwrap() as u32
}

#[tokio::test]
async fn full_size_packets_cross_nodes_and_bigger_ones_are_refused_loudly() {
    let _serial = serial().await;
    let lab = lab("mtu", 2).await;
    lab.add_pods(vec![
        PodOptions::new("x", "a", "node-1"),
        PodOptions::new("x", "b", "node-2"),
    ])
    .await
    .unwrap();
    let a = lab.pod("x/a").unwrap();
    let mtu = pod_mtu(&a.netns);
    assert_eq!(mtu, 1450, "pod MTU: the underlay's 1500 minus VXLAN's 50");
    // IPv4 header 20 + UDP header 8.
    let full = (mtu - 28) as usize;
    assert_eq!(
        lab.udp_df("x/a", "x/b", 80, full).await.unwrap(),
        DfOutcome::Echoed,
        "a full-size datagram with DF set crosses nodes"
    );
    assert!(
        matches!(
            lab.udp_df("x/a", "x/b", 80, full + 1).await.unwrap(),
            DfOutcome::TooBig { .. }
        ),
        "one byte more is refused at the pod"
    );
    // Even with the pod's MTU raised by hand, the path does not lose the
    // packet silently: the node answers fragmentation-needed.
    netns::ip(&["-n", &a.netns, "link", "set", "eth0", "mtu", "1500"]).unwrap();
    let outcome = lab.udp_df("x/a", "x/b", 80, full + 1).await.unwrap();
    assert_eq!(
        outcome,
        DfOutcome::TooBig {
            path_mtu: Some(mtu)
        },
        "the node reports the overlay's MTU back"
    );
}
