//! Explanations of a hand-made snapshot: two nodes, policies with an
//! ipBlock, a PeerSet and a named port.

use canal_crds::condition::{ENFORCED, condition};
use canal_crds::names::veth_name;
use canal_crds::{
    CanalNetwork, CanalNetworkSpec, CompiledPolicy, Endpoint, IpBlock, NamedPort, NodePolicySet,
    NodePolicySetSpec, NodePolicySetStatus, Peer, PeerSelector, PeerSetSpec, PortMatch, Protocol,
    Rule,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;

use crate::Error;
use crate::explain::{Explainer, Verdict};
use crate::format;
use crate::snapshot::Snapshot;
use crate::target::parse_target;

fn pod(key: &str, node: &str, ip: Option<&str>, ports: serde_json::Value) -> (String, Pod) {
    let (ns, name) = key.split_once('/').unwrap();
    let mut status = serde_json::json!({"phase": "Pending"});
    if let Some(ip) = ip {
        status = serde_json::json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]});
    }
    let p: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": ns, "name": name},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports}]},
        "status": status,
    }))
    .unwrap();
    (key.to_string(), p)
}

fn endpoint(key: &str, ip: &str, ingress: &[&str], egress: &[&str]) -> Endpoint {
    let (ns, name) = key.split_once('/').unwrap();
    Endpoint {
        namespace: ns.into(),
        pod: name.into(),
        interface: veth_name(ns, name),
        ips: vec![ip.into()],
        named_ports: vec![],
        ingress_policies: ingress.iter().map(|s| s.to_string()).collect(),
        egress_policies: egress.iter().map(|s| s.to_string()).collect(),
    }
}

fn nps(node: &str, spec: NodePolicySetSpec, generation: i64, observed: i64) -> NodePolicySet {
    let mut n = NodePolicySet::new(node, spec);
    n.metadata.generation = Some(generation);
    n.status = Some(NodePolicySetStatus {
        observed_generation: Some(observed),
        conditions: vec![condition(
            ENFORCED,
            true,
            "Enforced",
            "programmed",
            Some(observed),
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH),
        )],
        dataplane: Some("nftables".into()),
        ..NodePolicySetStatus::default()
    });
    n
}

/// node-1: x/a (egress to 10.244.2.0/24 TCP 8080 only), x/c (open);
/// node-2: y/b (ingress from PeerSet ps-a on named port http = 8080),
/// at generation 3 with generation 2 programmed; node-3 without NodePolicySet.
fn snapshot() -> Snapshot {
    let mut snap = Snapshot {
        network: Some(CanalNetwork::new(
            "default",
            CanalNetworkSpec::with_cluster_cidr("10.244.0.0/16"),
        )),
        ..Snapshot::default()
    };
    for n in ["node-1", "node-2", "node-3"] {
        let node: Node =
            serde_json::from_value(serde_json::json!({"metadata": {"name": n}})).unwrap();
        snap.nodes.insert(n.into(), node);
    }
    let http = serde_json::json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"}]);
    for (k, n, ip, ports) in [
        ("x/a", "node-1", Some("10.244.1.2"), serde_json::json!([])),
        ("x/c", "node-1", Some("10.244.1.3"), serde_json::json!([])),
        ("y/b", "node-2", Some("10.244.2.2"), http),
        ("y/new", "node-2", None, serde_json::json!([])),
        ("z/d", "node-3", Some("10.244.3.2"), serde_json::json!([])),
    ] {
        let (key, p) = pod(k, n, ip, ports);
        snap.pods.insert(key, p);
    }
    let egress = CompiledPolicy {
        name: "x/egress".into(),
        ingress: vec![],
        egress: vec![Rule {
            peers: Some(vec![Peer {
                peer_set: None,
                ip_block: Some(IpBlock {
                    cidr: "10.244.2.0/24".into(),
                    except: vec![],
                }),
            }]),
            ports: vec![PortMatch {
                protocol: Protocol::TCP,
                port: Some(8080),
                end_port: None,
                named_port: None,
                named_port_set: None,
            }],
        }],
    };
    snap.node_policy_sets.insert(
        "node-1".into(),
        nps(
            "node-1",
            NodePolicySetSpec {
                endpoints: vec![
                    endpoint("x/a", "10.244.1.2", &[], &["x/egress"]),
                    endpoint("x/c", "10.244.1.3", &[], &[]),
                ],
                policies: vec![egress],
            },
            1,
            1,
        ),
    );
    let mut b = endpoint("y/b", "10.244.2.2", &["y/allow-http", "y/deny"], &[]);
    b.named_ports = vec![NamedPort {
        name: "http".into(),
        protocol: Protocol::TCP,
        port: 8080,
    }];
    let allow = CompiledPolicy {
        name: "y/allow-http".into(),
        ingress: vec![Rule {
            peers: Some(vec![Peer {
                peer_set: Some("ps-a".into()),
                ip_block: None,
            }]),
            ports: vec![PortMatch {
                protocol: Protocol::TCP,
                port: None,
                end_port: None,
                named_port: Some("http".into()),
                named_port_set: None,
            }],
        }],
        egress: vec![],
    };
    let deny = CompiledPolicy {
        name: "y/deny".into(),
        ..CompiledPolicy::default()
    };
    snap.node_policy_sets.insert(
        "node-2".into(),
        nps(
            "node-2",
            NodePolicySetSpec {
                endpoints: vec![b],
                policies: vec![allow, deny],
            },
            3,
            2,
        ),
    );
    snap.peer_sets.insert(
        "ps-a".into(),
        PeerSetSpec {
            selector: PeerSelector {
                namespace: Some("x".into()),
                pod_selector: Some(
                    serde_json::from_value(serde_json::json!({"matchLabels": {"pod": "a"}}))
                        .unwrap(),
                ),
                ..PeerSelector::default()
            },
            member_count: 1,
            ips: vec!["10.244.1.2".into()],
            ports: vec![],
        }
        .into(),
    );
    snap
}

fn explain(from: &str, to: &str) -> Result<crate::Explanation, Error> {
    let snap = snapshot();
    let mut x = Explainer::new(&snap)?;
    x.explain(from, &parse_target(to)?)
}

#[test]
fn allowed_names_the_rule_peer_and_resolved_named_port_on_both_nodes() {
    let e = explain("x/a", "y/b:8080/TCP").unwrap();
    assert!(e.allowed);
    assert_eq!(
        e.egress.verdict,
        Verdict::Allowed {
            isolated_by: vec!["x/egress".into()],
            policy: "x/egress".into(),
            rule: 0,
            peer: "ipBlock 10.244.2.0/24".into(),
            port: "TCP 8080".into(),
        }
    );
    assert_eq!(
        e.ingress.verdict,
        Verdict::Allowed {
            isolated_by: vec!["y/allow-http".into(), "y/deny".into()],
            policy: "y/allow-http".into(),
            rule: 0,
            peer: "PeerSet ps-a (namespace x, pods pod=a; 1 members)".into(),
            port: "named port http = TCP 8080 on y/b".into(),
        }
    );
    let text = format::explanation(&e);
    assert_eq!(text.lines().next(), Some("allowed"), "{text}");
    assert!(
        text.contains("node-1: NodePolicySet generation 1 enforced, nftables"),
        "{text}"
    );
    assert!(
        text.contains("node-2: NOT enforced yet: this answer uses generation 3, the agent reports generation 2 programmed"),
        "{text}"
    );
    // The port given by its name resolves on the destination pod.
    let named = explain("x/a", "y/b:http").unwrap();
    assert_eq!((named.port, named.allowed), (8080, true));
    assert!(format::explanation(&named).contains("TCP 8080 (port http)"));
}

#[test]
fn denied_says_which_part_of_each_rule_failed() {
    let e = explain("x/a", "y/b:80/TCP").unwrap();
    assert!(!e.allowed);
    let Verdict::Denied { misses, .. } = &e.egress.verdict else {
        panic!("{:?}", e.egress.verdict);
    };
    assert_eq!((misses[0].peer, misses[0].port), (true, false));
    let text = format::explanation(&e);
    assert_eq!(text.lines().next(), Some("denied"), "{text}");
    assert!(
        text.contains("x/egress egress rule 0: peer matches, port does not match"),
        "{text}"
    );
    // x/c is not isolated for egress; y/b's ingress refuses it: wrong peer.
    let e = explain("x/c", "y/b:8080/TCP").unwrap();
    assert!(!e.allowed && e.egress.allowed && !e.ingress.allowed);
    assert_eq!(e.egress.verdict, Verdict::NotIsolated);
    let text = format::explanation(&e);
    assert!(
        text.contains("y/allow-http ingress rule 0: peer does not match, port matches"),
        "{text}"
    );
    assert!(
        text.contains("y/deny: no ingress rules (allows nothing)"),
        "{text}"
    );
    // UDP to the TCP named port: nothing matches.
    assert!(!explain("x/a", "y/b:8080/UDP").unwrap().allowed);
}

#[test]
fn addresses_same_pod_and_same_node() {
    // An outside address: only the egress decides.
    let e = explain("x/a", "192.0.2.1:8080").unwrap();
    assert!(!e.allowed && !e.egress.allowed && e.ingress.allowed);
    assert!(matches!(e.ingress.verdict, Verdict::NotPoliced(_)));
    // A pod's address is that pod.
    let e = explain("x/c", "10.244.2.2:8080/TCP").unwrap();
    assert_eq!(e.to.pod.as_deref(), Some("y/b"));
    assert!(!e.allowed);
    // Itself.
    let e = explain("x/a", "x/a:1").unwrap();
    assert!(e.allowed && e.egress.verdict == Verdict::SamePod);
    // Same node: x/c -> x/a, egress open, ingress open.
    let e = explain("x/c", "x/a:1/UDP").unwrap();
    assert!(e.allowed);
    assert_eq!(e.ingress.verdict, Verdict::NotIsolated);
    assert_eq!(e.ingress.enforcement.as_ref().unwrap().node, "node-1");
}

#[test]
fn clear_errors() {
    let err = |from: &str, to: &str| explain(from, to).unwrap_err().to_string();
    assert_eq!(err("x/nope", "y/b:80"), "pod x/nope not found");
    assert_eq!(err("x/a", "y/nope:80"), "pod y/nope not found");
    assert_eq!(
        err("x/a", "y/new:80"),
        "pod y/new has no IPv4 address yet (phase Pending)"
    );
    assert!(err("x/a", "z/d:80").starts_with("node node-3 has no NodePolicySet"));
    assert!(err("x/a", "y/b").starts_with("give the destination port"));
    assert!(err("x/a", "y/b:grpc").contains("declares no tcp port named \"grpc\""));
    let mut snap = snapshot();
    snap.network = None;
    assert!(matches!(Explainer::new(&snap), Err(Error::NoNetwork)));
}

#[test]
fn status_rows_and_table() {
    let snap = snapshot();
    let rows = crate::status::node_statuses(&snap);
    assert_eq!(rows.len(), 3);
    assert_eq!((rows[1].generation, rows[1].programmed), (Some(3), Some(2)));
    assert_eq!(rows[2].generation, None);
    let t = format::status_table(&rows, &[]);
    let lines: Vec<&str> = t.lines().collect();
    assert!(lines[0].starts_with("NODE   "), "{t}");
    assert!(
        lines[2].starts_with("node-2 ")
            && lines[2].contains(" 3 ")
            && lines[2].contains("nftables"),
        "{t}"
    );
    // Columns line up: every row has its second column where the header has it.
    let col = lines[0].find("GENERATION").unwrap();
    assert!(lines.iter().skip(1).all(|l| l[..col].ends_with(' ')), "{t}");
}
