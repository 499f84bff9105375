//! Dual-stack and IPv6-only pod networking end to end (issue 14): labs
//! with a dual-stack or IPv6-only underlay, the real canal-controller,
//! canal-agent and canal-cni. Every pod pair talks TCP and UDP in every
//! family of the lab with its own address seen by the server; a node added
//! later gets a route in every family on every node, and a deleted one
//! leaves nothing of either family behind; full-size packets cross in each
//! family and one byte more is refused, never lost or fragmented; and a
//! pod that has IPv6 cannot use it to get past a NetworkPolicy enabled
//! live. Traffic leaving the cluster is masqueraded in each family; an
//! IPv6 stream survives agent restarts and a deleted IPv6 route comes
//! back. The labs run with NetworkPolicy on (both dataplanes guard IPv6),
//! and the CanalNetwork lists its ranges in clusterCIDRs. NetworkPolicy's
//! IPv6 guarantees (neighbour discovery, anti-spoofing, drift, zero leak)
//! are in `ipv6_policy.rs`.

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use canal_crds::annotations::{format_mac, vtep_mac, vtep_mac_v6};
use canal_e2e::Lab;
use canal_e2e::lab::family::{CLUSTER_CIDR_V4, CLUSTER_CIDR_V6};
use canal_e2e::lab::{
    DfOutcome, Family, IpFamily, Matrix, PodOptions, Protocol, UpOptions, kernel, netns,
};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use support::{eventually, serial};

async fn lab(name: &str, nodes: u32, ip_family: IpFamily) -> Lab {
    lab_with(name, nodes, ip_family, true).await
}

async fn lab_with(name: &str, nodes: u32, ip_family: IpFamily, policy: bool) -> Lab {
    let started = Instant::now();
    let lab = Lab::up(
        Lab::test_state_dir(name),
        UpOptions {
            nodes,
            ip_family,
            policy,
            ..UpOptions::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{ip_family} lab {name} with {nodes} nodes comes up: {e}"));
    eprintln!(
        "lab {name} ({ip_family}): up --nodes {nodes} took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    lab
}

async fn pod_cidrs(lab: &Lab, node: &str) -> Vec<IpNet> {
    let api: Api<Node> = Api::all(lab.client());
    kernel::pod_cidrs(&api.get(node).await.unwrap())
}

fn of(cidrs: &[IpNet], family: Family) -> IpNet {
    *cidrs
        .iter()
        .find(|c| match family {
            Family::V4 => matches!(c, IpNet::V4(_)),
            Family::V6 => matches!(c, IpNet::V6(_)),
        })
        .unwrap_or_else(|| panic!("no {family} podCIDR in {cidrs:?}"))
}

/// Every pod reaches every pod in `family` on TCP and UDP 80 and 81, and
/// the server sees the client pod's own address of that family.
async fn assert_full_mesh(lab: &Lab, family: Family) {
    let pods: Vec<String> = lab.pods().unwrap().iter().map(|p| p.key()).collect();
    let expected = Matrix::filled(pods, true);
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        for port in [80, 81] {
            let run = lab.matrix_family(port, protocol, family).await.unwrap();
            let mut report = String::new();
            for ((from, to), outcome) in &run.outcomes {
                if !outcome.connected {
                    report.push_str(&format!("  {from} -> {to}: {}\n", outcome.detail));
                }
            }
            assert!(
                run.matrix.mismatches(&expected).is_empty(),
                "{port}/{protocol} over {family}:\n{}{report}",
                Matrix::report(&expected, &run.matrix)
            );
            for ((from, to), outcome) in &run.outcomes {
                let source = lab.pod(from).unwrap().ip(family).unwrap();
                assert_eq!(
                    outcome.seen_source.map(|s| s.ip()),
                    Some(source),
                    "{from} -> {to} {port}/{protocol} over {family}: the pod's own address"
                );
            }
        }
    }
}

/// Every pod reaches the internet host in `family` on TCP and UDP, and the
/// host sees the pod's node's underlay address of that family: traffic
/// leaving the cluster is masqueraded per family (iptables MASQUERADE /
/// ip6tables MASQUERADE or the `inet` nat table), pod-to-pod traffic is not
/// ([`assert_full_mesh`] checks that side).
async fn assert_masqueraded_internet(lab: &Lab, family: Family) {
    for pod in lab.pods().unwrap() {
        let node = lab.node(&pod.node).unwrap();
        let want = node.address_of(family).unwrap();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let o = lab
                .probe_family(&pod.key(), "internet", family, 80, protocol)
                .await
                .unwrap();
            assert!(
                o.connected,
                "{} -> internet {protocol} over {family}: {o:?}",
                pod.key()
            );
            assert_eq!(
                o.seen_source.map(|s| s.ip()),
                Some(want),
                "{} -> internet {protocol} over {family}: the internet host must see {}'s address",
                pod.key(),
                pod.node
            );
        }
    }
}

/// The cluster order of a Node's podCIDRs and its flannel annotations of
/// both families, as the real controller wrote them.
async fn assert_dual_stack_node(lab: &Lab, name: &str) {
    let api: Api<Node> = Api::all(lab.client());
    let node = api.get(name).await.unwrap();
    let spec = node.spec.clone().unwrap();
    let cidrs = spec.pod_cidrs.clone().unwrap_or_default();
    assert_eq!(cidrs.len(), 2, "{name}: {cidrs:?}");
    let v4: IpNet = cidrs[0].parse().unwrap();
    let v6: IpNet = cidrs[1].parse().unwrap();
    assert!(
        CLUSTER_CIDR_V4.parse::<IpNet>().unwrap().contains(&v4)
            && CLUSTER_CIDR_V6.parse::<IpNet>().unwrap().contains(&v6),
        "{name}: podCIDRs {cidrs:?} in the clusterCIDRs' order"
    );
    assert_eq!(v6.prefix_len(), 64);
    assert_eq!(spec.pod_cidr.as_deref(), Some(cidrs[0].as_str()));
    let anns = node.metadata.annotations.unwrap_or_default();
    let record = lab.node(name).unwrap();
    assert_eq!(
        anns.get(canal_crds::annotations::PUBLIC_IPV6),
        Some(&record.address6.unwrap().to_string())
    );
    assert_eq!(
        anns.get(canal_crds::annotations::PUBLIC_IP),
        Some(&record.address.to_string())
    );
    let v6_data: canal_crds::annotations::BackendData =
        serde_json::from_str(&anns[canal_crds::annotations::BACKEND_V6_DATA]).unwrap();
    assert_eq!(v6_data.vtep_mac, format_mac(vtep_mac_v6(name)));
    assert_eq!(v6_data.vni, 1);
}

#[tokio::test]
async fn dual_stack_full_mesh_in_both_families_and_nodes_joining_and_leaving() {
    let _serial = serial().await;
    let lab = lab("dual-mesh", 3, IpFamily::Dual).await;
    for node in ["node-1", "node-2", "node-3"] {
        assert_dual_stack_node(&lab, node).await;
    }
    let pods = lab.add_conformance_pods().await.unwrap();
    for pod in &pods {
        let cidrs = pod_cidrs(&lab, &pod.node).await;
        assert_eq!(pod.ips.len(), 2, "{}: {:?}", pod.key(), pod.ips);
        for family in [Family::V4, Family::V6] {
            let ip = pod.ip(family).unwrap();
            assert!(
                of(&cidrs, family).contains(&ip),
                "{}'s {ip} is outside {}'s {family} subnet",
                pod.key(),
                pod.node
            );
        }
        assert!(pod.ips[0].is_ipv4(), "the cluster's order: IPv4 first");
    }
    for family in [Family::V4, Family::V6] {
        assert_full_mesh(&lab, family).await;
        assert_masqueraded_internet(&lab, family).await;
    }

    // A node joins: every node gets its subnet of each family (add_node
    // waits for both), and a pod on it talks both families.
    let added = lab.add_node("node-4").await.unwrap();
    eprintln!(
        "node-4: annotated after {} ms, routes of both families on every node after {} ms",
        added.annotated_after.unwrap().as_millis(),
        added.routes_everywhere_after.unwrap().as_millis()
    );
    assert_dual_stack_node(&lab, "node-4").await;
    lab.add_pod(PodOptions::new("x", "d", "node-4"))
        .await
        .unwrap();
    for family in [Family::V4, Family::V6] {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            for (from, to) in [("x/a", "x/d"), ("x/d", "y/b")] {
                let o = lab
                    .probe_family(from, to, family, 80, protocol)
                    .await
                    .unwrap();
                assert!(
                    o.connected,
                    "{from} -> {to} {protocol} over {family}: {o:?}"
                );
            }
        }
    }

    // It leaves: nothing of either family remains on the other nodes.
    let gone = lab.node("node-4").unwrap();
    let cidrs = pod_cidrs(&lab, "node-4").await;
    let v4 = (
        of(&cidrs, Family::V4),
        format_mac(vtep_mac("node-4")),
        IpAddr::V4(gone.address),
    );
    let v6 = (
        of(&cidrs, Family::V6),
        format_mac(vtep_mac_v6("node-4")),
        IpAddr::V6(gone.address6.unwrap()),
    );
    for other in ["node-1", "node-2", "node-3"] {
        let snap = lab.kernel(other).unwrap();
        for (cidr, mac, address) in [&v4, &v6] {
            assert_eq!(
                snap.mentions(*cidr, mac, *address).len(),
                3,
                "{other} has node-4's route, neighbour and FDB entry for {cidr}: {snap:?}"
            );
        }
    }
    lab.del_node("node-4").await.unwrap();
    for other in ["node-1", "node-2", "node-3"] {
        eventually(
            &format!("{other} forgetting node-4 in both families"),
            Duration::from_secs(10),
            || async {
                let snap = lab.kernel(other).map_err(|e| e.to_string())?;
                let left: Vec<String> = [&v4, &v6]
                    .iter()
                    .flat_map(|(cidr, mac, address)| snap.mentions(*cidr, mac, *address))
                    .collect();
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

fn pod_mtu(netns_name: &str) -> u32 {
    let out = netns::ip(&["-n", netns_name, "-j", "link", "show", "eth0"]).unwrap();
    let links: serde_json::Value = serde_json::from_str(&out).unwrap();
    links[0]["mtu"].as_u64().unwrap() as u32
}

/// UDP payload that fills a packet of `mtu` bytes exactly.
fn full_payload(mtu: u32, family: Family) -> usize {
    let headers = match family {
        Family::V4 => 20 + 8,
        Family::V6 => 40 + 8,
    };
    (mtu - headers) as usize
}

#[tokio::test]
async fn dual_stack_full_size_packets_cross_in_each_family_and_bigger_ones_are_refused() {
    let _serial = serial().await;
    let lab = lab("dual-mtu", 2, IpFamily::Dual).await;
    lab.add_pods(vec![
        PodOptions::new("x", "a", "node-1"),
        PodOptions::new("x", "b", "node-2"),
    ])
    .await
    .unwrap();
    let a = lab.pod("x/a").unwrap();
    let mtu = pod_mtu(&a.netns);
    assert_eq!(
        mtu, 1430,
        "pod MTU: what fits both families, the IPv6 underlay's 1500 minus 70"
    );
    for family in [Family::V4, Family::V6] {
        let full = full_payload(mtu, family);
        assert_eq!(
            lab.udp_df_family("x/a", "x/b", Some(family), 80, full)
                .await
                .unwrap(),
            DfOutcome::Echoed,
            "a full-size {family} datagram crosses nodes unfragmented"
        );
        assert!(
            matches!(
                lab.udp_df_family("x/a", "x/b", Some(family), 80, full + 1)
                    .await
                    .unwrap(),
                DfOutcome::TooBig { .. }
            ),
            "one byte more over {family} is refused at the pod"
        );
    }
    // With the pod's MTU raised by hand, IPv6 gets a Packet Too Big from
    // the node with the overlay's MTU, never a silent loss or a fragment.
    netns::ip(&["-n", &a.netns, "link", "set", "eth0", "mtu", "1500"]).unwrap();
    let full = full_payload(mtu, Family::V6);
    assert_eq!(
        lab.udp_df_family("x/a", "x/b", Some(Family::V6), 80, full + 1)
            .await
            .unwrap(),
        DfOutcome::TooBig {
            path_mtu: Some(1430)
        },
        "the node reports flannel-v6.1's MTU back"
    );
}

#[tokio::test]
async fn ipv6_only_full_mesh_mtu_and_nodes_with_no_ipv4_at_all() {
    let _serial = serial().await;
    let lab = lab("v6-mesh", 3, IpFamily::Ipv6).await;
    let api: Api<Node> = Api::all(lab.client());
    for node in ["node-1", "node-2", "node-3"] {
        let n = api.get(node).await.unwrap();
        let cidrs = n.spec.unwrap().pod_cidrs.unwrap_or_default();
        assert_eq!(cidrs.len(), 1, "{node}: {cidrs:?}");
        assert!(cidrs[0].contains(':'), "{node}: {cidrs:?}");
        let anns = n.metadata.annotations.unwrap_or_default();
        assert!(
            !anns.contains_key(canal_crds::annotations::BACKEND_DATA),
            "no IPv4 VTEP"
        );
        assert!(anns.contains_key(canal_crds::annotations::BACKEND_V6_DATA));
        let record = lab.node(node).unwrap();
        let v4 = netns::ip(&["-n", &record.netns, "-4", "addr", "show", "dev", "eth0"]).unwrap();
        assert!(!v4.contains("inet "), "{node} has no IPv4 underlay: {v4}");
        let links = netns::ip(&["-n", &record.netns, "link"]).unwrap();
        assert!(
            links.contains("flannel-v6.1") && !links.contains("flannel.1"),
            "{links}"
        );
    }
    let pods = lab.add_conformance_pods().await.unwrap();
    for pod in &pods {
        assert_eq!(pod.ips.len(), 1, "{}: {:?}", pod.key(), pod.ips);
        assert!(pod.ips[0].is_ipv6());
    }
    assert_full_mesh(&lab, Family::V6).await;
    assert_masqueraded_internet(&lab, Family::V6).await;
    let a = lab.pod("x/a").unwrap();
    let mtu = pod_mtu(&a.netns);
    assert_eq!(mtu, 1430);
    let full = full_payload(mtu, Family::V6);
    assert_eq!(
        lab.udp_df_family("x/a", "x/b", None, 80, full)
            .await
            .unwrap(),
        DfOutcome::Echoed
    );
    assert!(matches!(
        lab.udp_df_family("x/a", "x/b", None, 80, full + 1)
            .await
            .unwrap(),
        DfOutcome::TooBig { .. }
    ));
    // With the pod's MTU raised by hand the node answers Packet Too Big
    // with flannel-v6.1's MTU (an IPv6-only node has no IPv4 to fall back on).
    netns::ip(&["-n", &a.netns, "link", "set", "eth0", "mtu", "1500"]).unwrap();
    assert_eq!(
        lab.udp_df_family("x/a", "x/b", None, 80, full + 1)
            .await
            .unwrap(),
        DfOutcome::TooBig {
            path_mtu: Some(1430)
        }
    );
    netns::ip(&["-n", &a.netns, "link", "set", "eth0", "mtu", "1430"]).unwrap();

    // An IPv6 stream carries on across agent restarts on both of its
    // nodes (x/a on node-1, x/b on node-2), and an IPv6 route deleted by
    // hand comes back.
    let stream = lab.open_stream("x/a", "x/b", 80).await.unwrap();
    assert!(stream.seen_source.is_ipv6(), "{:?}", stream.seen_source);
    let mut conn = stream.stream;
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    for node in ["node-1", "node-2"] {
        assert!(lab.stop_agent(node), "{node}'s agent was running");
        lab.start_agent(node).unwrap();
        lab.wait_programmed(Duration::from_secs(60)).await.unwrap();
        use std::io::{BufRead, BufReader, Write};
        conn.write_all(b"still here\n").unwrap();
        let mut line = String::new();
        BufReader::new(conn.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "still here\n", "after {node}'s agent restarted");
    }
    let cidr2 = of(&pod_cidrs(&lab, "node-2").await, Family::V6);
    let node1 = lab.node("node-1").unwrap();
    netns::ip(&["-n", &node1.netns, "-6", "route", "del", &cidr2.to_string()]).unwrap();
    assert!(lab.kernel("node-1").unwrap().route_to(cidr2).is_none());
    eventually(
        "node-1's IPv6 route to node-2 coming back",
        Duration::from_secs(10),
        || async {
            match lab
                .kernel("node-1")
                .map_err(|e| e.to_string())?
                .route_to(cidr2)
            {
                Some(_) => Ok(()),
                None => Err("no route yet".to_string()),
            }
        },
    )
    .await;

    // A node joins an IPv6-only cluster: a /64, an IPv6 VTEP, routes on
    // every node; its pod talks to the others; it leaves nothing behind.
    let added = lab.add_node("node-4").await.unwrap();
    eprintln!(
        "IPv6-only node-4: annotated after {} ms, routes on every node after {} ms",
        added.annotated_after.unwrap().as_millis(),
        added.routes_everywhere_after.unwrap().as_millis()
    );
    lab.add_pod(PodOptions::new("x", "d", "node-4"))
        .await
        .unwrap();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        for (from, to) in [("x/a", "x/d"), ("x/d", "y/b"), ("x/d", "internet")] {
            let o = lab
                .probe_family(from, to, Family::V6, 80, protocol)
                .await
                .unwrap();
            assert!(o.connected, "{from} -> {to} {protocol}: {o:?}");
        }
    }
    let gone = lab.node("node-4").unwrap();
    let cidr = of(&pod_cidrs(&lab, "node-4").await, Family::V6);
    let mac = format_mac(vtep_mac_v6("node-4"));
    let address = IpAddr::V6(gone.address6.unwrap());
    for other in ["node-1", "node-2", "node-3"] {
        let snap = lab.kernel(other).unwrap();
        assert_eq!(
            snap.mentions(cidr, &mac, address).len(),
            3,
            "{other} has node-4's route, neighbour and FDB entry: {snap:?}"
        );
    }
    lab.del_node("node-4").await.unwrap();
    for other in ["node-1", "node-2", "node-3"] {
        eventually(
            &format!("{other} forgetting IPv6-only node-4"),
            Duration::from_secs(10),
            || async {
                let left = lab
                    .kernel(other)
                    .map_err(|e| e.to_string())?
                    .mentions(cidr, &mac, address);
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

/// Reads `net.ipv6.conf.<dev>.disable_ipv6` inside `netns_name`.
fn ipv6_disabled(netns_name: &str, dev: &str) -> bool {
    let mut cmd = netns::exec(netns_name, "cat");
    cmd.arg(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"));
    netns::run(&mut cmd).is_ok_and(|v| v.trim() == "1")
}

#[tokio::test]
async fn ipv6_cannot_bypass_a_network_policy_enabled_live() {
    let _serial = serial().await;
    let lab = lab_with("dual-gate", 2, IpFamily::Dual, false).await;
    lab.add_pods(vec![
        PodOptions::new("x", "a", "node-1"),
        PodOptions::new("x", "b", "node-2").label("pod", "b"),
    ])
    .await
    .unwrap();
    for family in [Family::V4, Family::V6] {
        assert!(
            lab.probe_family("x/a", "x/b", family, 80, Protocol::Tcp)
                .await
                .unwrap()
                .connected
        );
    }
    // Policy comes on, with a deny-all ingress policy for x/b. Both
    // families are guarded (policy-families ipv4,ipv6): IPv6 must be closed
    // by the time IPv4 is, and stay closed; no pod loses its IPv6 address.
    support::policy::apply_policies(
        &lab.client(),
        "metadata: {name: deny-b, namespace: x}\nspec: {podSelector: {matchLabels: {pod: b}}, policyTypes: [Ingress]}\n",
    )
    .await;
    let networks: Api<canal_crds::CanalNetwork> = Api::all(lab.client());
    networks
        .patch(
            canal_crds::DEFAULT_NETWORK_NAME,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&serde_json::json!({"spec": {"policy": {"enabled": true}}})),
        )
        .await
        .unwrap();
    let patched = Instant::now();
    let b = lab.pod("x/b").unwrap();
    let mut v4_blocked = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while v4_blocked.is_none() && Instant::now() < deadline {
        let v4 = lab
            .probe_family("x/a", "x/b", Family::V4, 80, Protocol::Tcp)
            .await
            .unwrap();
        if !v4.connected {
            v4_blocked = Some(patched.elapsed());
        }
    }
    let v4_blocked = v4_blocked.expect("the IPv4 policy is enforced within 30 s");
    eprintln!(
        "policy on: IPv4 policy enforced after {} ms",
        v4_blocked.as_millis()
    );
    // The first IPv6 probe after IPv4 closed, and every one after it.
    for _ in 0..5 {
        let v6 = lab
            .probe_family("x/a", "x/b", Family::V6, 80, Protocol::Tcp)
            .await
            .unwrap();
        assert!(
            !v6.connected,
            "x/a reached x/b ({:?}) over IPv6 past the deny: {v6:?}",
            b.ip(Family::V6)
        );
    }
    // The deny is for x/b only: x/a stays reachable in both families, and
    // IPv6 was guarded by policy, not switched off.
    let b_host = canal_crds::names::veth_name("x", "b");
    assert!(!ipv6_disabled(&lab.node("node-2").unwrap().netns, &b_host));
    for family in [Family::V4, Family::V6] {
        assert!(
            lab.probe_family("x/b", "x/a", family, 80, Protocol::Tcp)
                .await
                .unwrap()
                .connected,
            "x/b -> x/a over {family} with only x/b's ingress denied"
        );
    }
    // New pods still get both families: both are guarded.
    let c = lab
        .add_pod(PodOptions::new("x", "c", "node-1"))
        .await
        .unwrap();
    assert!(c.ip(Family::V6).is_some(), "{:?}", c.ips);
    assert!(c.ip(Family::V4).is_some());
}

/// The real-kubelet lab is IPv4 only: asked for another family it refuses
/// at once, saying so, and builds nothing (rather than an IPv4 cluster the
/// user did not ask for).
#[test]
fn the_real_kubelet_lab_refuses_other_families() {
    let state =
        std::env::temp_dir().join(format!("canal-e2e-kubelet-family-{}", std::process::id()));
    for family in ["ipv6", "dual"] {
        let out = support::canal_lab(&state, &["up", "--kubelet", "--ip-family", family]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{family}: {stderr}");
        assert!(
            stderr.contains("--kubelet runs IPv4 only"),
            "{family}: {stderr}"
        );
        assert!(
            !state.exists(),
            "{family}: nothing built in {}",
            state.display()
        );
    }
}
