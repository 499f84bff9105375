//! Two real canal-agents, each inside its own node network namespace,
//! against a real kube-apiserver; pods wired by the real canal-cni. The node
//! namespaces share an underlay bridge that lives in a third namespace.
//!
//! Proves: pods on different nodes ping and talk TCP across VXLAN without
//! SNAT; a route/neighbour/FDB entry deleted by hand comes back within one
//! resync (10 s); an agent restart changes nothing in the kernel and an
//! established TCP connection survives it; a Node deleted while the agents
//! run, and one deleted while an agent is down, leave no route, neighbour or
//! FDB entry behind. In the first test the Node objects, podCIDRs and
//! flannel annotations are written by the test (exactly what canal-controller
//! writes); the second runs the real canal-controller next to the agent.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::Duration;

use canal_crds::CanalNetworkSpec;
use canal_crds::annotations;
use canal_e2e::{ControlPlane, install};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use support::cluster::{NodeNs, create_node, delete_node, kubeconfig_via, node_ns};
use support::{Child, Netns, in_netns, wait_until, wait_until_async};

/// The overlay state as iproute2 shows it.
fn overlay(node: &NodeNs) -> String {
    let show = |program: &str, args: &[&str]| {
        let out = node.ns.output(program, args);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    format!(
        "routes:\n{}neigh:\n{}fdb:\n{}",
        show("ip", &["route", "show", "dev", "flannel.1"]),
        show("ip", &["neigh", "show", "dev", "flannel.1"]),
        show("bridge", &["fdb", "show", "dev", "flannel.1"])
    )
}

/// What a node should hold for a peer (cidr, MAC, public IP).
fn peer_lines(cidr: &str, mac: &str, ip: &str) -> [String; 3] {
    let gw = cidr.trim_end_matches("/24");
    [
        format!("{cidr} via {gw} proto 202 onlink"),
        format!("{gw} lladdr {mac} PERMANENT"),
        format!("{mac} dst {ip} self permanent"),
    ]
}

fn has_peer(node: &NodeNs, peer: (&str, &str, &str)) -> Result<(), String> {
    let state = overlay(node);
    let missing: Vec<_> = peer_lines(peer.0, peer.1, peer.2)
        .into_iter()
        .filter(|l| !state.contains(l.as_str()))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("{} lacks {missing:?}; has:\n{state}", node.name))
    }
}

fn lacks_peer(node: &NodeNs, cidr: &str, mac: &str) -> Result<(), String> {
    let state = overlay(node);
    let gw = cidr.trim_end_matches("/24");
    if state.contains(cidr) || state.contains(&format!("{gw} ")) || state.contains(mac) {
        Err(format!("{} still has {cidr}/{mac}:\n{state}", node.name))
    } else {
        Ok(())
    }
}

/// A TCP server in a pod: answers each connection with the client's
/// address, then echoes lines.
fn serve_echo(pod: &Netns, port: u16) {
    let listener = in_netns(&pod.path(), move || {
        TcpListener::bind(("0.0.0.0", port)).expect("bind in pod")
    });
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let peer = conn
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let _ = writeln!(conn, "from {peer}");
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    let _ = conn.write_all(line.as_bytes());
                    line.clear();
                }
            });
        }
    });
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn open(from: &Netns, to: Ipv4Addr, port: u16) -> (Conn, String) {
        let stream = in_netns(&from.path(), move || {
            TcpStream::connect_timeout(&(to, port).into(), Duration::from_secs(5))
                .expect("TCP connect across the overlay")
        });
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut conn = Conn {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let mut hello = String::new();
        conn.reader.read_line(&mut hello).unwrap();
        (conn, hello.trim().to_string())
    }

    fn echo(&mut self, text: &str) -> String {
        writeln!(self.writer, "{text}").unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line.trim().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_connect_pods_repair_drift_survive_restarts_and_forget_deleted_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client();
    install::install_crds(&client).await.unwrap();
    // The overlay alone: policy enforcement (and its readiness, which
    // needs a NodePolicySet from canal-controller) is policy_agent.rs's.
    let mut spec = CanalNetworkSpec::with_cluster_cidr("10.244.0.0/16");
    spec.policy.enabled = false;
    install::apply_default_network(&client, spec).await.unwrap();

    // Underlay: a bridge in its own namespace, one veth per node.
    let underlay = Netns::new("cau");
    underlay.ip(&["link", "add", "br0", "type", "bridge"]);
    underlay.ip(&["addr", "add", "192.168.90.1/24", "dev", "br0"]);
    underlay.ip(&["link", "set", "br0", "up"]);
    let mut nodes = Vec::new();
    for (i, name) in ["node-a", "node-b"].iter().enumerate() {
        let ip = format!("192.168.90.{}", 11 + i);
        let cidr = format!("10.244.{}.0/24", i + 1);
        create_node(&client, name, &cidr, &ip).await;
        nodes.push(node_ns(&cp, dir.path(), name, &ip, &cidr, Some(&underlay)));
    }
    // Two nodes that exist only as API objects.
    create_node(&client, "node-c", "10.244.3.0/24", "192.168.90.13").await;
    create_node(&client, "node-d", "10.244.4.0/24", "192.168.90.14").await;
    let ghost = |name: &str, cidr: &str, ip: &str| {
        (
            cidr.to_string(),
            annotations::format_mac(annotations::vtep_mac(name)),
            ip.to_string(),
        )
    };
    let node_c = ghost("node-c", "10.244.3.0/24", "192.168.90.13");
    let node_d = ghost("node-d", "10.244.4.0/24", "192.168.90.14");

    let mut agents: Vec<Child> = nodes
        .iter()
        .map(|n| n.start_agent(dir.path(), "1"))
        .collect();
    let logs = |agents: &[Child]| {
        agents
            .iter()
            .map(|a| format!("--- {}\n{}", a.log.display(), a.log_tail(30)))
            .collect::<Vec<_>>()
            .join("\n")
    };

    // Programmed: every node has every other node.
    let (a, b) = (&nodes[0], &nodes[1]);
    for (node, other) in [(a, b), (b, a)] {
        wait_until(
            &format!("{} to program {}", node.name, other.name),
            Duration::from_secs(60),
            || {
                has_peer(node, (&other.cidr, &other.mac(), &other.ip))
                    .and_then(|_| has_peer(node, (&node_c.0, &node_c.1, &node_c.2)))
                    .and_then(|_| has_peer(node, (&node_d.0, &node_d.1, &node_d.2)))
                    .map_err(|e| format!("{e}\n{}", logs(&agents)))
            },
        );
        wait_until(
            &format!("{} ready", node.name),
            Duration::from_secs(20),
            || node.ready(),
        );
        let network: serde_json::Value =
            serde_json::from_slice(&std::fs::read(node.run_dir.join("network.json")).unwrap())
                .unwrap();
        assert_eq!(network["nodeSubnet"], node.cidr.as_str());
        assert_eq!(network["clusterCIDR"], "10.244.0.0/16");
        assert_eq!(network["mtu"], 1450);
        // Masquerade is where the dataplane is (Auto: nftables here).
        let iptables = node.ns.sh("iptables-save", &["-t", "nat"]);
        let nft = node.ns.sh("nft", &["list", "tables"]);
        assert!(
            iptables.contains("-j CANAL-MASQ") || nft.contains("table inet canal-masq"),
            "no masquerade rules in iptables or nftables:\n{iptables}\n{nft}"
        );
    }
    let api: Api<Node> = Api::all(client.clone());
    for node in [a, b] {
        let n = api.get(&node.name).await.unwrap();
        let cond = n
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "NetworkUnavailable")
            .expect("NetworkUnavailable condition set");
        assert_eq!(
            (cond.status.as_str(), cond.reason.as_deref()),
            ("False", Some("CanalIsUp"))
        );
    }

    // Pods, wired by canal-cni on each node.
    let pods: Vec<(Netns, Ipv4Addr)> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let pod = Netns::new("cap");
            let conf = json!({
                "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "canal-cni",
                "runDir": node.run_dir, "dataDir": node.data_dir,
            });
            let (code, result, stderr) = support::cni(
                &node.ns,
                "ADD",
                &format!("ctr-{i}"),
                &pod.path(),
                ("default", &format!("pod-{i}")),
                &conf,
            );
            assert_eq!(code, 0, "{result} {stderr}");
            let ip: Ipv4Addr = result["ips"][0]["address"]
                .as_str()
                .unwrap()
                .trim_end_matches("/32")
                .parse()
                .unwrap();
            assert!(node.cidr.starts_with(&ip.to_string()[..9]));
            (pod, ip)
        })
        .collect();
    let ((p1, ip1), (p2, ip2)) = (&pods[0], &pods[1]);
    p1.sh("ping", &["-c2", "-W2", &ip2.to_string()]);
    p2.sh("ping", &["-c2", "-W2", &ip1.to_string()]);
    serve_echo(p2, 7000);
    let (mut conn, hello) = Conn::open(p1, *ip2, 7000);
    assert_eq!(
        hello,
        format!("from {ip1}"),
        "pod-to-pod traffic keeps its source"
    );
    assert_eq!(conn.echo("one"), "one");

    // Drift: entries deleted by hand are back within one resync (10 s).
    a.ns.ip(&["route", "del", &b.cidr]);
    a.ns.ip(&[
        "neigh",
        "del",
        b.cidr.trim_end_matches("/24"),
        "dev",
        "flannel.1",
    ]);
    a.ns.sh(
        "bridge",
        &["fdb", "del", &b.mac(), "dev", "flannel.1", "dst", &b.ip],
    );
    wait_until("drift repaired", Duration::from_secs(12), || {
        has_peer(a, (&b.cidr, &b.mac(), &b.ip))
    });
    assert_eq!(
        a.metric("canal_drift_repairs_total{kind=\"route\"}"),
        Some(1.0)
    );
    assert_eq!(
        a.metric("canal_drift_repairs_total{kind=\"fdb\"}"),
        Some(1.0)
    );
    p1.sh("ping", &["-c1", "-W2", &ip2.to_string()]);
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "default");
    let mut found = None;
    for _ in 0..50 {
        let list = events.list(&Default::default()).await.unwrap();
        found = list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("DriftRepaired")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("node-a")
        });
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let event = found.expect("a DriftRepaired Event about node-a");
    assert!(event.note.unwrap_or_default().contains("route=1"));

    // Restart: the new agent finds everything right and changes nothing;
    // the established connection carries on.
    let before = overlay(a);
    agents[0].kill();
    agents[0] = a.start_agent(dir.path(), "2");
    wait_until("restarted agent ready", Duration::from_secs(30), || {
        a.ready().map_err(|e| format!("{e}\n{}", logs(&agents)))
    });
    for kind in ["link", "address", "route", "neighbour", "fdb", "iptables"] {
        assert_eq!(
            a.metric(&format!("canal_kernel_changes_total{{kind=\"{kind}\"}}")),
            Some(0.0),
            "restart changed {kind}:\n{}",
            logs(&agents)
        );
    }
    assert_eq!(overlay(a), before);
    assert_eq!(conn.echo("after restart"), "after restart");
    assert!(a.metric("canal_agent_remote_nodes{family=\"ipv4\",route=\"vxlan\"}") == Some(3.0));

    // A Node deleted while the agents run disappears everywhere.
    delete_node(&client, "node-c").await;
    for node in [a, b] {
        wait_until(
            &format!("node-c gone from {}", node.name),
            Duration::from_secs(20),
            || lacks_peer(node, &node_c.0, &node_c.1),
        );
    }

    // A Node deleted while an agent is down is gone after it starts.
    agents[0].kill();
    delete_node(&client, "node-d").await;
    agents[0] = a.start_agent(dir.path(), "3");
    wait_until(
        "agent ready after node-d deletion",
        Duration::from_secs(30),
        || a.ready(),
    );
    lacks_peer(a, &node_d.0, &node_d.1).unwrap();
    has_peer(a, (&b.cidr, &b.mac(), &b.ip)).unwrap();
    wait_until("node-d gone from node-b", Duration::from_secs(20), || {
        lacks_peer(b, &node_d.0, &node_d.1)
    });
    assert_eq!(conn.echo("still here"), "still here");
    if std::env::var_os("CANAL_TEST_SHOW_LOGS").is_some() {
        eprintln!("{}", logs(&agents));
    }
    drop(agents);
}

/// The real canal-controller assigns subnets and writes the annotations of
/// bare Nodes (as kubelets register them) and their NodePolicySets; the
/// agent programs from that and reports its NodePolicySet enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_programs_what_the_real_controller_assigns() {
    use clap::Parser;
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client();
    install::install_crds(&client).await.unwrap();
    install::apply_default_network(
        &client,
        CanalNetworkSpec::with_cluster_cidr("10.244.0.0/16"),
    )
    .await
    .unwrap();
    let controller = tokio::spawn(canal_controller::run(
        canal_controller::cli::Args::parse_from([
            "canal-controller",
            "--kubeconfig",
            cp.kubeconfig().to_str().unwrap(),
            "--metrics-addr=127.0.0.1:0",
            "--leader-elect=false",
        ]),
    ));

    let ns = Netns::new("cak");
    ns.ip(&["link", "add", "ul0", "type", "veth", "peer", "name", "ul0p"]);
    ns.ip(&["addr", "add", "192.168.92.11/24", "dev", "ul0"]);
    ns.ip(&["link", "set", "ul0", "up"]);
    ns.ip(&["link", "set", "ul0p", "up"]);
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "192.168.92.1",
        "dev",
        "ul0",
    ]);
    let api: Api<Node> = Api::all(client.clone());
    for (name, ip) in [("real-a", "192.168.92.11"), ("real-b", "192.168.92.12")] {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        api.create(&PostParams::default(), &node).await.unwrap();
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}}),
            ),
        )
        .await
        .unwrap();
    }
    let node = NodeNs {
        name: "real-a".into(),
        ip: "192.168.92.11".into(),
        cidr: String::new(),
        kubeconfig: kubeconfig_via(&cp, &ns, dir.path()),
        run_dir: dir.path().join("run"),
        data_dir: dir.path().join("data"),
        ns,
    };
    let agent = node.start_agent(dir.path(), "1");

    // The controller's allocation for real-b, as the agent must program it.
    let mut peer = None;
    for _ in 0..300 {
        let b = api.get("real-b").await.unwrap();
        let cidr = b.spec.and_then(|s| s.pod_cidr);
        let has_annotations = b
            .metadata
            .annotations
            .is_some_and(|a| a.contains_key(annotations::BACKEND_DATA));
        if let (Some(cidr), true) = (cidr, has_annotations) {
            peer = Some(cidr);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b_cidr = peer.expect("canal-controller assigned real-b a podCIDR and annotations");
    let b_mac = annotations::format_mac(annotations::vtep_mac("real-b"));
    wait_until("real-a programs real-b", Duration::from_secs(60), || {
        has_peer(&node, (&b_cidr, &b_mac, "192.168.92.12"))
            .map_err(|e| format!("{e}\n{}", agent.log_tail(30)))
    });
    let a = api.get("real-a").await.unwrap();
    let a_cidr = a.spec.and_then(|s| s.pod_cidr).unwrap();
    // Written at the end of the sync that programmed the routes.
    let network = wait_until("network.json", Duration::from_secs(10), || {
        std::fs::read(node.run_dir.join("network.json")).map_err(|e| e.to_string())
    });
    let network: serde_json::Value = serde_json::from_slice(&network).unwrap();
    assert_eq!(network["nodeSubnet"], a_cidr.as_str());
    let link = node.ns.ip(&["-d", "link", "show", "flannel.1"]);
    assert!(
        link.contains(&format!(
            "link/ether {}",
            annotations::format_mac(annotations::vtep_mac("real-a"))
        )),
        "the device carries the MAC the controller published:\n{link}"
    );
    // Ready needs the first policy sync, of the NodePolicySet the real
    // controller writes for real-a; the agent reports it enforced.
    wait_until("agent ready", Duration::from_secs(20), || node.ready());
    let nps = Api::<canal_crds::NodePolicySet>::all(client.clone())
        .get("real-a")
        .await
        .unwrap();
    let status = nps.status.unwrap_or_default();
    assert_eq!(status.observed_generation, nps.metadata.generation);
    assert!(canal_crds::condition::is_true(
        &status.conditions,
        canal_crds::condition::ENFORCED
    ));
    controller.abort();
}

/// The Node's `CanalNetworkProgrammed` condition: (status, reason, message).
async fn programmed_condition(
    client: &kube::Client,
    node: &str,
) -> Option<(String, String, String)> {
    let n = Api::<Node>::all(client.clone()).get(node).await.ok()?;
    n.status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == canal_crds::condition::NODE_PROGRAMMED)
        .map(|c| {
            (
                c.status,
                c.reason.unwrap_or_default(),
                c.message.unwrap_or_default(),
            )
        })
}

/// Waits until the Node's condition has this status and reason; returns its message.
async fn wait_condition(client: &kube::Client, node: &str, status: &str, reason: &str) -> String {
    wait_until_async(
        &format!("{node}: CanalNetworkProgrammed={status} ({reason})"),
        Duration::from_secs(30),
        || async {
            match programmed_condition(client, node).await {
                Some((s, r, m)) if s == status && r == reason => Ok(m),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

/// Events about `node` with `reason`.
async fn node_events(
    client: &kube::Client,
    node: &str,
    reason: &str,
) -> Vec<k8s_openapi::api::events::v1::Event> {
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "default");
    events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(node)
        })
        .collect()
}

/// Exactly one Event about `node` with `reason`, published once (no series:
/// the recorder would count a republished Event there).
async fn one_event(client: &kube::Client, node: &str, reason: &str) -> String {
    let events = wait_until_async(
        &format!("an Event {reason} about {node}"),
        Duration::from_secs(10),
        || async {
            let e = node_events(client, node, reason).await;
            if e.is_empty() {
                Err("none".to_string())
            } else {
                Ok(e)
            }
        },
    )
    .await;
    assert_eq!(events.len(), 1, "{reason} about {node}: {events:#?}");
    assert!(
        events[0].series.is_none(),
        "{reason} about {node} was published again: {:?}",
        events[0].series
    );
    events[0].note.clone().unwrap_or_default()
}

/// The CanalNetwork `default` status.
async fn network_status(client: &kube::Client) -> canal_crds::CanalNetworkStatus {
    Api::<canal_crds::CanalNetwork>::all(client.clone())
        .get(canal_crds::DEFAULT_NETWORK_NAME)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

/// Waits until the CanalNetwork's Degraded condition has this status and
/// reason and `programmed` says `summary`; returns the Degraded message.
async fn wait_network(
    client: &kube::Client,
    degraded: bool,
    reason: &str,
    summary: &str,
) -> String {
    wait_until_async(
        &format!("CanalNetwork Degraded={degraded} ({reason}), programmed {summary}"),
        Duration::from_secs(30),
        || async {
            let s = network_status(client).await;
            let d = canal_crds::condition::find(&s.conditions, canal_crds::condition::DEGRADED);
            let ready = canal_crds::condition::is_true(&s.conditions, canal_crds::condition::READY);
            match d {
                Some(d)
                    if (d.status == "True") == degraded
                        && d.reason == reason
                        && ready != degraded
                        && s.programmed.as_deref() == Some(summary) =>
                {
                    Ok(d.message.clone())
                }
                _ => Err(format!(
                    "programmed {:?}, conditions {:#?}",
                    s.programmed, s.conditions
                )),
            }
        },
    )
    .await
}

async fn patch_network(client: &kube::Client, patch: serde_json::Value) {
    Api::<canal_crds::CanalNetwork>::all(client.clone())
        .patch(
            canal_crds::DEFAULT_NETWORK_NAME,
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .unwrap();
}

/// A bare Node (as a kubelet registers it); canal-controller assigns it a
/// podCIDR and annotations, which are returned (cidr, VTEP MAC).
async fn register_node(client: &kube::Client, name: &str, ip: &str) -> (String, String) {
    let api: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    api.create(&PostParams::default(), &node).await.unwrap();
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}})),
    )
    .await
    .unwrap();
    let cidr = wait_until_async(
        &format!("canal-controller to assign {name}"),
        Duration::from_secs(30),
        || async {
            let n = api.get(name).await.map_err(|e| e.to_string())?;
            let annotated = n
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(annotations::BACKEND_DATA));
            match n.spec.and_then(|s| s.pod_cidr) {
                Some(c) if annotated => Ok(c),
                other => Err(format!("podCIDR {other:?}, annotated {annotated}")),
            }
        },
    )
    .await;
    (cidr, annotations::format_mac(annotations::vtep_mac(name)))
}

/// A failing step reaches the user where they look, and does not stop the
/// rest. With the real canal-controller and two real agents (resync 1 s):
/// a `backend.mtu` the kernel refuses, an `interface` that exists on no
/// node, and iptables missing on one node each make the agents' /readyz
/// say why, set CanalNetworkProgrammed=False on their Nodes with one Event
/// (not one per resync), and turn the CanalNetwork Degraded
/// (NodesNotProgrammed, "N of 2 nodes programmed"); meanwhile a Node added
/// still gets its routes everywhere. Undoing each fault makes everything
/// programmed again, with a Normal Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_steps_reach_readiness_node_conditions_events_and_the_network_status() {
    use clap::Parser;
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client();
    install::install_crds(&client).await.unwrap();
    let mut spec = CanalNetworkSpec::with_cluster_cidr("10.244.0.0/16");
    spec.policy.enabled = false;
    install::apply_default_network(&client, spec).await.unwrap();
    let controller = tokio::spawn(canal_controller::run(
        canal_controller::cli::Args::parse_from([
            "canal-controller",
            "--kubeconfig",
            cp.kubeconfig().to_str().unwrap(),
            "--metrics-addr=127.0.0.1:0",
            "--leader-elect=false",
        ]),
    ));

    let underlay = Netns::new("cau");
    underlay.ip(&["link", "add", "br0", "type", "bridge"]);
    underlay.ip(&["addr", "add", "192.168.93.1/24", "dev", "br0"]);
    underlay.ip(&["link", "set", "br0", "up"]);
    let mut nodes = Vec::new();
    for (i, name) in ["fail-a", "fail-b"].iter().enumerate() {
        let ip = format!("192.168.93.{}", 11 + i);
        let (cidr, _) = register_node(&client, name, &ip).await;
        nodes.push(node_ns(&cp, dir.path(), name, &ip, &cidr, Some(&underlay)));
    }
    let fast = ["--resync-interval=1s"];
    let mut agents: Vec<Child> = nodes
        .iter()
        .map(|n| n.start_agent_with(dir.path(), "1", &fast))
        .collect();
    let logs = |agents: &[Child]| {
        agents
            .iter()
            .map(|a| format!("--- {}\n{}", a.log.display(), a.log_tail(20)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (a, b) = (&nodes[0], &nodes[1]);
    for node in [a, b] {
        wait_until(
            &format!("{} ready", node.name),
            Duration::from_secs(60),
            || node.ready().map_err(|e| format!("{e}\n{}", logs(&agents))),
        );
        wait_condition(&client, &node.name, "True", "Programmed").await;
    }
    wait_network(&client, false, "AsExpected", "2/2 nodes").await;

    // 1. An MTU the kernel refuses (valid for the API: 576..65535).
    patch_network(&client, json!({"spec": {"backend": {"mtu": 65535}}})).await;
    for node in [a, b] {
        let body = wait_until(
            &format!("{}'s /readyz to fail with the reason", node.name),
            Duration::from_secs(30),
            || match node.ready() {
                Ok(()) => Err("still ready".to_string()),
                Err(body) if body.contains("MTU") && body.contains("65535") => Ok(body),
                Err(body) => Err(body),
            },
        );
        assert!(body.starts_with("HTTP/1.1 503"), "{body}");
        let msg = wait_condition(&client, &node.name, "False", "MTURejected").await;
        assert!(
            msg.contains("65535") && msg.contains("at most 1450 fits underlay ul0 with MTU 1500"),
            "{msg}"
        );
        let note = one_event(&client, &node.name, "MTURejected").await;
        assert!(note.contains("65535"), "{note}");
    }
    let msg = wait_network(&client, true, "NodesNotProgrammed", "0/2 nodes").await;
    assert!(
        msg.starts_with("0 of 2 nodes programmed; 2 report a failure: fail-a (MTURejected: MTU:"),
        "{msg}"
    );
    // A Node added meanwhile gets its route, neighbour and FDB entry on
    // both nodes: the refused MTU stops nothing else.
    let (c_cidr, c_mac) = register_node(&client, "fail-c", "192.168.93.13").await;
    for node in [a, b] {
        wait_until(
            &format!("{} to program fail-c", node.name),
            Duration::from_secs(20),
            || has_peer(node, (&c_cidr, &c_mac, "192.168.93.13")),
        );
    }
    // Pods keep the MTU the device really has.
    let network: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.run_dir.join("network.json")).unwrap()).unwrap();
    assert_eq!(network["mtu"], 1450);
    assert!(
        a.metric("canal_agent_sync_errors_total{step=\"mtu\"}")
            .unwrap_or(0.0)
            >= 2.0
    );
    assert_eq!(a.metric("canal_agent_programmed"), Some(0.0));
    // Several resyncs later: still one Event per node, not one per resync.
    let resyncs = |n: &NodeNs| {
        n.metric("canal_syncs_total{result=\"error\",trigger=\"resync\"}")
            .unwrap_or(0.0)
    };
    let before = resyncs(a);
    wait_until(
        "three more failing resyncs",
        Duration::from_secs(20),
        || {
            (resyncs(a) >= before + 3.0)
                .then_some(())
                .ok_or(format!("{}", resyncs(a)))
        },
    );
    for node in [a, b] {
        one_event(&client, &node.name, "MTURejected").await;
    }
    delete_node(&client, "fail-c").await;

    // Undone: programmed again everywhere, one Normal Event each.
    patch_network(&client, json!({"spec": {"backend": {"mtu": 0}}})).await;
    for node in [a, b] {
        wait_until(
            &format!("{} ready again", node.name),
            Duration::from_secs(30),
            || node.ready(),
        );
        wait_condition(&client, &node.name, "True", "Programmed").await;
        one_event(&client, &node.name, "NetworkProgrammed").await;
        wait_until("fail-c gone", Duration::from_secs(20), || {
            lacks_peer(node, &c_cidr, &c_mac)
        });
    }
    wait_network(&client, false, "AsExpected", "2/2 nodes").await;

    // 2. An underlay interface that exists on no node: the one in use is
    // kept, so the overlay keeps working and new Nodes are programmed.
    patch_network(&client, json!({"spec": {"interface": "nosuch0"}})).await;
    for node in [a, b] {
        let msg = wait_condition(&client, &node.name, "False", "UnderlayUnavailable").await;
        assert!(
            msg.contains("\"nosuch0\"") && msg.contains("keeping the underlay in use, ul0"),
            "{msg}"
        );
        let body = node.ready().unwrap_err();
        assert!(body.contains("nosuch0"), "{body}");
        one_event(&client, &node.name, "UnderlayUnavailable").await;
    }
    wait_network(&client, true, "NodesNotProgrammed", "0/2 nodes").await;
    let (d_cidr, d_mac) = register_node(&client, "fail-d", "192.168.93.14").await;
    for node in [a, b] {
        wait_until(
            &format!("{} to program fail-d", node.name),
            Duration::from_secs(20),
            || has_peer(node, (&d_cidr, &d_mac, "192.168.93.14")),
        );
    }
    delete_node(&client, "fail-d").await;
    patch_network(&client, json!({"spec": {"interface": null}})).await;
    for node in [a, b] {
        wait_condition(&client, &node.name, "True", "Programmed").await;
        wait_until(
            &format!("{} ready again", node.name),
            Duration::from_secs(30),
            || node.ready(),
        );
    }
    wait_network(&client, false, "AsExpected", "2/2 nodes").await;

    // 3. No iptables on fail-a: masquerade fails there, the overlay does not.
    let empty = dir.path().join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    agents[0].kill();
    agents[0] = a.start_agent_in(dir.path(), "no-iptables", &fast, Some(&empty));
    let msg = wait_condition(&client, "fail-a", "False", "MasqueradeFailed").await;
    assert!(msg.contains("masquerade: iptables"), "{msg}");
    let body = a.ready().unwrap_err();
    assert!(body.contains("masquerade"), "{body}");
    let msg = wait_network(&client, true, "NodesNotProgrammed", "1/2 nodes").await;
    assert!(msg.contains("fail-a (MasqueradeFailed"), "{msg}");
    assert!(!msg.contains("fail-b ("), "{msg}");
    let (e_cidr, e_mac) = register_node(&client, "fail-e", "192.168.93.15").await;
    wait_until(
        "fail-a to program fail-e without iptables",
        Duration::from_secs(20),
        || has_peer(a, (&e_cidr, &e_mac, "192.168.93.15")),
    );
    delete_node(&client, "fail-e").await;
    agents[0].kill();
    agents[0] = a.start_agent_with(dir.path(), "2", &fast);
    wait_condition(&client, "fail-a", "True", "Programmed").await;
    wait_network(&client, false, "AsExpected", "2/2 nodes").await;
    if std::env::var_os("CANAL_TEST_SHOW_LOGS").is_some() {
        eprintln!("{}", logs(&agents));
    }
    drop(agents);
    controller.abort();
}
