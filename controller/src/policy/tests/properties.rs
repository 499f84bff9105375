//! Property tests over random small clusters:
//!
//! 1. what the written objects enforce equals the reference semantics for
//!    every pod pair and probe port;
//! 2. moving a cluster from one random state to another event by event
//!    (interleaving flushes) ends with exactly the objects a fresh compile
//!    of the final state writes, and the objects are current after every
//!    flush (no stale content behind an unchanged fingerprint);
//! 3. a restarted index that observes those objects writes nothing.

use std::collections::BTreeMap;

use canal_crds::Protocol;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::prelude::*;

use super::*;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const NODES: [&str; 3] = ["n1", "n2", "n3"]; // n3 has no Node object

fn selector() -> impl Strategy<Value = LabelSelector> {
    let ml = |k: &'static str, v: &'static str| LabelSelector {
        match_labels: Some(BTreeMap::from([(k.to_string(), v.to_string())])),
        match_expressions: None,
    };
    let expr = (
        prop::sample::select(vec!["pod", "app", "team", "ns"]),
        prop::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist"]),
        prop::sample::subsequence(vec!["a", "b", "web", "x", "y"], 1..3),
    )
        .prop_map(|(key, op, values)| LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: match op {
                    "In" | "NotIn" => Some(values.into_iter().map(String::from).collect()),
                    _ => None,
                },
            }]),
        });
    prop_oneof![
        Just(LabelSelector::default()),
        prop::sample::select(vec!["a", "b", "c"]).prop_map(move |v| ml("pod", v)),
        Just(ml("app", "web")),
        prop::sample::select(vec!["x", "y", "z"]).prop_map(move |v| ml("ns", v)),
        Just(ml("team", "a")),
        expr,
    ]
}

fn peer() -> impl Strategy<Value = NetworkPolicyPeer> {
    let block = prop::sample::select(vec![
        ("10.0.0.0/29", vec![]),
        ("10.0.0.0/24", vec!["10.0.0.2/31"]),
        ("10.0.0.0/16", vec!["10.0.1.0/24", "10.0.0.4/30"]),
        ("0.0.0.0/0", vec![]),
        ("fd00::/64", vec![]),
    ])
    .prop_map(|(cidr, except)| NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: cidr.into(),
            except: if except.is_empty() {
                None
            } else {
                Some(except.into_iter().map(String::from).collect())
            },
        }),
        ..Default::default()
    });
    prop_oneof![
        selector().prop_map(|s| NetworkPolicyPeer {
            pod_selector: Some(s),
            ..Default::default()
        }),
        selector().prop_map(|s| NetworkPolicyPeer {
            namespace_selector: Some(s),
            ..Default::default()
        }),
        (selector(), selector()).prop_map(|(n, p)| NetworkPolicyPeer {
            namespace_selector: Some(n),
            pod_selector: Some(p),
            ..Default::default()
        }),
        block,
    ]
}

fn port() -> impl Strategy<Value = NetworkPolicyPort> {
    (
        prop::sample::select(vec![None, Some("TCP"), Some("UDP")]),
        prop_oneof![
            Just((None, None)),
            prop::sample::select(vec![80, 81, 53, 8080])
                .prop_map(|p| (Some(IntOrString::Int(p)), None)),
            Just((Some(IntOrString::Int(79)), Some(81))),
            prop::sample::select(vec!["http", "dns", "nope"])
                .prop_map(|n| (Some(IntOrString::String(n.into())), None)),
        ],
    )
        .prop_map(|(protocol, (port, end_port))| NetworkPolicyPort {
            protocol: protocol.map(String::from),
            port,
            end_port,
        })
}

type RuleParts = (
    Option<Vec<NetworkPolicyPeer>>,
    Option<Vec<NetworkPolicyPort>>,
);

fn rule() -> impl Strategy<Value = RuleParts> {
    (
        prop_oneof![
            Just(None),
            Just(Some(vec![])),
            prop::collection::vec(peer(), 1..3).prop_map(Some),
        ],
        prop_oneof![
            Just(None),
            prop::collection::vec(port(), 0..3).prop_map(Some),
        ],
    )
}

fn policy(i: usize) -> impl Strategy<Value = NetworkPolicy> {
    (
        0..NAMESPACES.len(),
        selector(),
        prop::sample::select(vec![
            None,
            Some(vec!["Ingress"]),
            Some(vec!["Egress"]),
            Some(vec!["Ingress", "Egress"]),
        ]),
        prop::collection::vec(rule(), 0..3),
        prop::collection::vec(rule(), 0..3),
    )
        .prop_map(
            move |(ns, pod_selector, types, ingress, egress)| NetworkPolicy {
                metadata: ObjectMeta {
                    namespace: Some(NAMESPACES[ns].into()),
                    name: Some(format!("np{i}")),
                    ..Default::default()
                },
                spec: Some(NetworkPolicySpec {
                    pod_selector: Some(pod_selector),
                    policy_types: types.map(|t| t.into_iter().map(String::from).collect()),
                    ingress: Some(
                        ingress
                            .into_iter()
                            .map(|(from, ports)| NetworkPolicyIngressRule { from, ports })
                            .collect(),
                    ),
                    egress: Some(
                        egress
                            .into_iter()
                            .map(|(to, ports)| NetworkPolicyEgressRule { to, ports })
                            .collect(),
                    ),
                }),
            },
        )
}

fn pod_at(i: usize) -> impl Strategy<Value = PodInfo> {
    (
        0..NAMESPACES.len(),
        prop::option::of(prop::sample::select(vec!["a", "b", "c"])),
        prop::option::of(Just("web")),
        0..NODES.len(),
        0..4usize,
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.05),
        prop::bool::weighted(0.9),
        0..2u8,
    )
        .prop_map(
            move |(ns, pod_label, app, node, ports, host, finished, has_ip, subnet)| {
                let mut l = vec![];
                if let Some(p) = pod_label {
                    l.push(("pod", p));
                }
                if let Some(a) = app {
                    l.push(("app", a));
                }
                let ip = if has_ip {
                    format!("10.0.{subnet}.{}", i + 1)
                } else {
                    String::new()
                };
                let mut p = pod(NAMESPACES[ns], &format!("p{i}"), NODES[node], &ip, &l);
                p.named_ports = match ports {
                    0 => vec![],
                    1 => vec![named("http", Protocol::TCP, 80)],
                    2 => vec![
                        named("dns", Protocol::UDP, 53),
                        named("http", Protocol::TCP, 8080),
                    ],
                    _ => vec![named("dns", Protocol::UDP, 53)],
                };
                p.host_network = host;
                p.finished = finished;
                p
            },
        )
}

fn world() -> impl Strategy<Value = World> {
    let namespaces =
        prop::collection::vec(prop::option::of(prop::sample::select(vec!["a", "b"])), 3).prop_map(
            |teams| {
                NAMESPACES
                    .iter()
                    .zip(teams)
                    .map(|(n, team)| match team {
                        Some(t) => ns(n, &[("ns", n), ("team", t)]),
                        None => ns(n, &[("ns", n)]),
                    })
                    .collect::<Vec<_>>()
            },
        );
    let pods = (1..9usize).prop_flat_map(|n| (0..n).map(pod_at).collect::<Vec<_>>());
    let policies = (0..5usize).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>());
    let nodes = prop::bool::weighted(0.8).prop_map(|both| {
        if both {
            vec![node("n1"), node("n2")]
        } else {
            vec![node("n1")]
        }
    });
    (namespaces, nodes, pods, policies).prop_map(|(namespaces, nodes, pods, policies)| World {
        namespaces,
        nodes,
        pods,
        policies,
    })
}

/// Every object the index wants is in the store with its current content,
/// and nothing else is.
fn assert_store_current(h: &Harness, when: &str) {
    let owner = objects::owner_reference("test-uid");
    for kind in [Kind::NodePolicySet, Kind::PolicyGroup, Kind::PeerSet] {
        let want = h.index.desired_names(kind);
        let have: Vec<String> = match kind {
            Kind::NodePolicySet => h.store.nps.keys().cloned().collect(),
            Kind::PolicyGroup => h.store.pg.keys().cloned().collect(),
            Kind::PeerSet => h.store.ps.keys().cloned().collect(),
        };
        assert_eq!(have, want, "{when}: {} objects", kind.as_str());
        for name in &want {
            let fp = objects::encode_object(&h.index, kind, name, &owner)
                .unwrap()
                .unwrap()
                .fingerprint;
            let ann = match kind {
                Kind::NodePolicySet => &h.store.nps[name].1,
                Kind::PolicyGroup => &h.store.pg[name].1,
                Kind::PeerSet => &h.store.ps[name].1,
            };
            assert!(
                ann.starts_with(&format!("{fp:032x}")),
                "{when}: {} {name} is stale",
                kind.as_str()
            );
        }
    }
    assert!(
        h.store.refused.is_empty(),
        "{when}: refused {:?}",
        h.store.refused
    );
}

/// Normal limits, or tiny ones that shard every set of more than two
/// members and every group of more than one small policy.
fn limits() -> impl Strategy<Value = Limits> {
    prop_oneof![
        Just(Limits::default()),
        Just(Limits {
            peer_set_slice_bytes: 30,
            policy_group_slice_bytes: 300,
            ..Limits::default()
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn compiled_objects_enforce_the_reference_semantics(w in world(), l in limits()) {
        let h = Harness::with_limits(&w, l);
        let m = mismatches(&w, &h.store);
        prop_assert!(m.is_empty(), "{} mismatches:\n{}\nworld: {:#?}", m.len(), m.join("\n"), w.policies);
        assert_store_current(&h, "initial");
    }

    #[test]
    fn incremental_updates_converge_to_a_fresh_compile(
        a in world(),
        b in world(),
        order in Just([0usize, 1, 2, 3]).prop_shuffle(),
        l in limits(),
    ) {
        let mut h = Harness::with_limits(&a, l.clone());
        for step in order {
            match step {
                0 => h.index.reset_nodes(b.nodes.clone()),
                1 => h.index.reset_namespaces(b.namespaces.clone()),
                2 => h.index.reset_pods(b.pods.clone()),
                _ => h.index.reset_policies(b.policies.clone()),
            }
            h.sync();
            assert_store_current(&h, &format!("after step {step}"));
        }
        let fresh = Harness::with_limits(&b, l.clone());
        prop_assert_eq!(&h.store.nps, &fresh.store.nps);
        prop_assert_eq!(&h.store.pg, &fresh.store.pg);
        prop_assert_eq!(&h.store.ps, &fresh.store.ps);
        let m = mismatches(&b, &h.store);
        prop_assert!(m.is_empty(), "{}", m.join("\n"));

        // A restarted controller that sees these objects writes nothing.
        let mut restarted = b.index_with(l);
        h.store.observe_all(&mut restarted);
        let changes = restarted.flush();
        prop_assert!(changes.writes() == 0, "{:?}", changes);
    }

    #[test]
    fn single_pod_events_keep_every_object_current(
        w in world(),
        victim in 0usize..8,
        event in 0usize..7,
        label in prop::sample::select(vec!["a", "b", "c"]),
        l in limits(),
    ) {
        let mut h = Harness::with_limits(&w, l);
        let mut w2 = w.clone();
        let i = victim % w.pods.len();
        let p = &mut w2.pods[i];
        match event {
            0 => { p.labels.insert("pod".into(), label.into()); }
            1 => { p.labels.remove("pod"); }
            2 => { p.ips = vec![format!("10.0.7.{}", i + 1).parse().unwrap()]; }
            3 => { p.node = Some(if p.node.as_deref() == Some("n1") { "n2" } else { "n1" }.into()); }
            4 => { p.finished = !p.finished; }
            5 => { p.named_ports = vec![named("http", Protocol::TCP, 81)]; }
            _ => {}
        }
        if event == 6 {
            let gone = w2.pods.remove(i);
            h.index.delete_pod(&gone.namespace, &gone.name);
        } else {
            h.index.apply_pod(w2.pods[i].clone());
        }
        h.sync();
        assert_store_current(&h, &format!("after pod event {event}"));
        let m = mismatches(&w2, &h.store);
        prop_assert!(m.is_empty(), "{}", m.join("\n"));
    }
}
