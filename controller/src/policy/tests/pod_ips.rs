//! Pod IPs that are contested or out of range (issue 10.6): one pod never
//! gets another pod's identity through an IP, whoever reports it, and the
//! IP is handed over when its holder goes.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use proptest::prelude::*;

use super::*;

fn at(secs: i64) -> Option<Timestamp> {
    Some(Timestamp::from_second(secs).unwrap())
}

fn aged(mut p: PodInfo, secs: i64) -> PodInfo {
    p.created = at(secs);
    p
}

/// Everything an agent would see (the objects as it assembles them from
/// heads, groups and slices): (endpoint pod -> IPs) per node, and the IPs
/// of every PeerSet selecting `pod=<label>`.
fn endpoint_ips(h: &Harness) -> BTreeMap<String, Vec<String>> {
    h.store
        .nps
        .keys()
        .filter_map(|node| h.store.node(node))
        .flat_map(|spec| spec.endpoints.into_iter())
        .map(|e| (format!("{}/{}", e.namespace, e.pod), e.ips))
        .collect()
}

fn set_ips(h: &Harness, label: &str) -> Vec<String> {
    let all = h.store.peer_sets();
    let sets: Vec<&PeerSetSpec> = all
        .values()
        .filter(|s| {
            serde_json::to_string(&s.selector)
                .unwrap()
                .contains(&format!("\"{label}\""))
        })
        .collect();
    assert_eq!(sets.len(), 1, "one PeerSet selects pod={label}");
    sets[0].ips.clone()
}

/// x/db admits only pods labelled pod=client.
fn world() -> World {
    World {
        nodes: vec![node("n1"), node("n2")],
        namespaces: vec![ns("x", &[("ns", "x")])],
        pods: vec![
            aged(pod("x", "db", "n1", "10.0.0.9", &[("pod", "db")]), 1),
            aged(
                pod("x", "client", "n1", "10.0.0.5", &[("pod", "client")]),
                2,
            ),
        ],
        policies: vec![np(r#"
metadata: {namespace: x, name: db}
spec:
  podSelector: {matchLabels: {pod: db}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: client}}}]}]
"#)],
    }
}

#[test]
fn a_pod_reporting_another_pods_ip_gets_neither_its_access_nor_lends_its_own() {
    // Case 1: an unlabelled pod reports the allowed client's IP: its endpoint
    // must not carry it (or the dataplane would let it send as the client).
    let mut h = Harness::new(&world());
    h.index.apply_pod(aged(
        pod("x", "thief", "n2", "10.0.0.5", &[("pod", "nobody")]),
        3,
    ));
    h.sync();
    let eps = endpoint_ips(&h);
    assert_eq!(eps["x/client"], vec!["10.0.0.5"]);
    assert_eq!(
        eps["x/thief"],
        Vec::<String>::new(),
        "no endpoint address for a contested IP"
    );
    assert_eq!(set_ips(&h, "client"), vec!["10.0.0.5"]);
    let r = h.reports_pods.last().unwrap();
    assert_eq!((r.namespace.as_str(), r.name.as_str()), ("x", "thief"));
    let problem = r.problem.as_deref().unwrap();
    assert!(
        problem.contains("10.0.0.5 is already held by pod x/client"),
        "{problem}"
    );
    assert_eq!(h.index.contested_ips(), 1);

    // Case 2: a newer pod labelled client reports the IP of an older pod that
    // is not a client: the IP must not join the client PeerSet (or the older
    // pod would be admitted to db as a client).
    let mut w = world();
    w.pods.push(aged(
        pod("x", "victim", "n2", "10.0.0.7", &[("pod", "other")]),
        1,
    ));
    let mut h = Harness::new(&w);
    h.index.apply_pod(aged(
        pod("x", "fake", "n2", "10.0.0.7", &[("pod", "client")]),
        5,
    ));
    h.sync();
    assert_eq!(
        set_ips(&h, "client"),
        vec!["10.0.0.5"],
        "10.0.0.7 is victim's, not a client's"
    );
    assert_eq!(endpoint_ips(&h)["x/fake"], Vec::<String>::new());
}

#[test]
fn the_ip_is_handed_over_when_its_holder_goes() {
    let mut w = world();
    w.pods.push(aged(
        pod("x", "second", "n1", "10.0.0.5", &[("pod", "client2")]),
        9,
    ));
    let mut h = Harness::new(&w);
    assert_eq!(endpoint_ips(&h)["x/second"], Vec::<String>::new());
    let before = h.reports_pods.len();
    h.index.delete_pod("x", "client");
    let writes = h.sync();
    assert_eq!(endpoint_ips(&h)["x/second"], vec!["10.0.0.5"]);
    assert!(
        set_ips(&h, "client").is_empty(),
        "the IP left the client set"
    );
    assert!(
        writes.iter().any(|w| w.starts_with("apply PeerSet")),
        "{writes:?}"
    );
    let r = &h.reports_pods[before..];
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(
        (r[0].name.as_str(), r[0].problem.as_deref()),
        ("second", None)
    );

    // And back: the holder returns, older than "second" (a pod recreated
    // with an earlier timestamp cannot happen, but an older pod reporting
    // late can): the IP moves to it.
    h.index.apply_pod(aged(
        pod("x", "client", "n1", "10.0.0.5", &[("pod", "client")]),
        2,
    ));
    h.sync();
    assert_eq!(endpoint_ips(&h)["x/second"], Vec::<String>::new());
    assert_eq!(set_ips(&h, "client"), vec!["10.0.0.5"]);
}

#[test]
fn a_terminating_holder_yields_to_a_running_pod() {
    let mut h = Harness::new(&world());
    h.index.apply_pod(aged(
        pod("x", "new", "n1", "10.0.0.5", &[("pod", "new")]),
        50,
    ));
    h.sync();
    assert_eq!(endpoint_ips(&h)["x/new"], Vec::<String>::new());
    let mut leaving = aged(
        pod("x", "client", "n1", "10.0.0.5", &[("pod", "client")]),
        2,
    );
    leaving.terminating = true;
    h.index.apply_pod(leaving);
    h.sync();
    assert_eq!(endpoint_ips(&h)["x/new"], vec!["10.0.0.5"]);
    assert_eq!(endpoint_ips(&h)["x/client"], Vec::<String>::new());
    assert!(set_ips(&h, "client").is_empty());
}

#[test]
fn ips_outside_the_nodes_pod_cidr_or_the_cluster_are_no_identity() {
    let mut w = world();
    w.nodes = vec![
        NodeInfo {
            name: "n1".into(),
            pod_cidrs: vec!["10.0.0.0/24".parse().unwrap()],
        },
        NodeInfo {
            name: "n2".into(),
            pod_cidrs: vec!["10.0.1.0/24".parse().unwrap()],
        },
    ];
    let mut h = Harness::new(&w);
    h.index
        .set_cluster_cidrs(Some(vec!["10.0.0.0/16".parse().unwrap()]));
    // A pod on n2 claiming an address of n1's range (a forged status), one
    // outside the cluster, and one on a node without a Node object.
    h.index
        .apply_pod(pod("x", "forged", "n2", "10.0.0.5", &[("pod", "client")]));
    h.index.apply_pod(pod(
        "x",
        "outside",
        "n1",
        "192.168.1.1",
        &[("pod", "client")],
    ));
    h.index
        .apply_pod(pod("x", "ghost", "n9", "10.0.9.1", &[("pod", "client")]));
    h.sync();
    assert_eq!(
        set_ips(&h, "client"),
        vec!["10.0.0.5"],
        "only the real client"
    );
    let problems: BTreeMap<String, String> = h
        .reports_pods
        .iter()
        .map(|r| (r.name.clone(), r.problem.clone().unwrap_or_default()))
        .collect();
    assert!(
        problems["forged"].contains("10.0.0.5 lies outside the podCIDR 10.0.1.0/24 of its node n2"),
        "{problems:?}"
    );
    assert!(
        problems["outside"].contains("192.168.1.1 lies outside clusterCIDR 10.0.0.0/16"),
        "{problems:?}"
    );
    assert!(
        problems["ghost"].contains("its node n9 has no podCIDR"),
        "{problems:?}"
    );
    // The Node's podCIDR arrives: its pod's IP becomes its identity.
    h.index.apply_node(NodeInfo {
        name: "n9".into(),
        pod_cidrs: vec!["10.0.9.0/24".parse().unwrap()],
    });
    h.sync();
    assert_eq!(set_ips(&h, "client"), vec!["10.0.0.5", "10.0.9.1"]);
    assert_eq!(h.reports_pods.last().unwrap().name, "ghost");
    assert_eq!(h.reports_pods.last().unwrap().problem, None);
    // A reported problem is not reported again by a resync-like re-apply.
    let n = h.reports_pods.len();
    h.index
        .apply_pod(pod("x", "forged", "n2", "10.0.0.5", &[("pod", "client")]));
    h.sync();
    assert_eq!(h.reports_pods.len(), n);
}

/// Tiny slices: every PeerSet of more than two members is a head and slices.
fn sharding() -> Limits {
    Limits {
        peer_set_slice_bytes: 30,
        ..Limits::default()
    }
}

#[test]
fn a_sharded_peer_set_holds_only_held_ips_in_its_slices() {
    // Many clients, so the pod=client set is sliced; x/fake (a client)
    // reports x/victim's IP and x/thief (no client) reports a client's.
    let mut w = world();
    for i in 10..40 {
        w.pods.push(aged(
            pod(
                "x",
                &format!("c{i}"),
                "n2",
                &format!("10.0.1.{i}"),
                &[("pod", "client")],
            ),
            2,
        ));
    }
    w.pods.push(aged(
        pod("x", "victim", "n2", "10.0.0.7", &[("pod", "other")]),
        1,
    ));
    let mut h = Harness::with_limits(&w, sharding());
    h.index.apply_pod(aged(
        pod("x", "fake", "n2", "10.0.0.7", &[("pod", "client")]),
        5,
    ));
    h.index.apply_pod(aged(
        pod("x", "thief", "n1", "10.0.1.20", &[("pod", "nobody")]),
        5,
    ));
    h.sync();
    let slices = h
        .store
        .ps
        .values()
        .filter(|(s, _)| s.slice_of.is_some())
        .count();
    assert!(slices > 1, "the client set is sliced ({slices} slices)");
    let ips = set_ips(&h, "client");
    assert_eq!(ips.len(), 31, "{ips:?}");
    assert!(
        !ips.contains(&"10.0.0.7".to_string()),
        "victim's IP: {ips:?}"
    );
    for (spec, _) in h.store.ps.values() {
        assert!(
            !spec.ips.contains(&"10.0.0.7".to_string()),
            "no head or slice holds a contested IP: {spec:?}"
        );
    }
    assert_eq!(endpoint_ips(&h)["x/fake"], Vec::<String>::new());
    assert_eq!(endpoint_ips(&h)["x/thief"], Vec::<String>::new());
    assert_eq!(endpoint_ips(&h)["x/c20"], vec!["10.0.1.20"]);

    // The victim goes: its IP is x/fake's now, in one slice of the set
    // (the head and that slice rewritten consistently).
    h.index.delete_pod("x", "victim");
    let writes = h.sync();
    assert!(
        writes.iter().any(|w| w.starts_with("apply PeerSet")),
        "{writes:?}"
    );
    let ips = set_ips(&h, "client");
    assert_eq!(ips.len(), 32, "{ips:?}");
    assert!(ips.contains(&"10.0.0.7".to_string()), "{ips:?}");
    let holding = h
        .store
        .ps
        .values()
        .filter(|(s, _)| s.ips.contains(&"10.0.0.7".to_string()))
        .count();
    assert_eq!(holding, 1, "in exactly one slice");
    assert_eq!(endpoint_ips(&h)["x/fake"], vec!["10.0.0.7"]);
}

#[test]
fn ipv6_pod_ips_are_identities_inside_the_nodes_ipv6_podcidr_and_cluster_range() {
    let mut w = world();
    w.nodes = vec![
        NodeInfo {
            name: "n1".into(),
            pod_cidrs: vec![
                "10.0.0.0/24".parse().unwrap(),
                "fd00:10::/64".parse().unwrap(),
            ],
        },
        NodeInfo {
            name: "n2".into(),
            pod_cidrs: vec![
                "10.0.1.0/24".parse().unwrap(),
                "fd00:10:0:1::/64".parse().unwrap(),
            ],
        },
    ];
    let mut h = Harness::new(&w);
    h.index.set_cluster_cidrs(Some(vec![
        "10.0.0.0/16".parse().unwrap(),
        "fd00:10::/56".parse().unwrap(),
    ]));
    let mut dual = pod("x", "dual", "n1", "10.0.0.5", &[("pod", "client")]);
    dual.ips.push("fd00:10::5".parse().unwrap());
    h.index.apply_pod(dual);
    // IPv6 only: a forged address of n1's /64 on n2, and one outside the
    // cluster's IPv6 range.
    h.index.apply_pod(pod(
        "x",
        "forged6",
        "n2",
        "fd00:10::9",
        &[("pod", "client")],
    ));
    h.index
        .apply_pod(pod("x", "outside6", "n2", "fd99::1", &[("pod", "client")]));
    h.sync();
    assert_eq!(set_ips(&h, "client"), vec!["10.0.0.5", "fd00:10::5"]);
    let problems: BTreeMap<String, String> = h
        .reports_pods
        .iter()
        .map(|r| (r.name.clone(), r.problem.clone().unwrap_or_default()))
        .collect();
    assert!(
        problems["forged6"].contains("fd00:10::9 lies outside the podCIDR"),
        "{problems:?}"
    );
    assert!(
        problems["outside6"].contains("fd99::1 lies outside clusterCIDR 10.0.0.0/16, fd00:10::/56"),
        "{problems:?}"
    );
    // An IPv4-only cluster range list: the IPv6 address is no identity.
    h.index
        .set_cluster_cidrs(Some(vec!["10.0.0.0/16".parse().unwrap()]));
    h.sync();
    assert_eq!(set_ips(&h, "client"), vec!["10.0.0.5"]);
}

// ----- properties -----------------------------------------------------------

fn contested_pod(i: usize) -> impl Strategy<Value = PodInfo> {
    (
        prop::sample::select(vec!["x", "y"]),
        prop::sample::select(vec!["a", "b"]),
        prop::sample::select(vec!["n1", "n2", "n3"]),
        1u8..5,
        0i64..4,
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.1),
    )
        .prop_map(move |(n, label, node, last, age, terminating, finished)| {
            let mut p = pod(
                n,
                &format!("p{i}"),
                node,
                &format!("10.0.0.{last}"),
                &[("pod", label)],
            );
            p.created = at(age);
            p.terminating = terminating;
            p.finished = finished;
            p
        })
}

fn contested_world() -> impl Strategy<Value = World> {
    (1..8usize)
        .prop_flat_map(|n| (0..n).map(contested_pod).collect::<Vec<_>>())
        .prop_map(|pods| World {
            nodes: vec![node("n1"), node("n2")],
            namespaces: vec![ns("x", &[("ns", "x")]), ns("y", &[("ns", "y")])],
            pods,
            policies: vec![np(r#"
metadata: {namespace: x, name: from-a}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: a}}}]}]
"#)],
        })
}

/// The pod that must hold `ip`: of the members reporting it, the first by
/// (terminating, created, namespace, name).
fn expected_holder(w: &World, ip: &str) -> Option<String> {
    w.pods
        .iter()
        .filter(|p| !p.host_network && !p.finished)
        .filter(|p| p.ips.iter().any(|i| i.to_string() == ip))
        .min_by_key(|p| {
            (
                p.terminating,
                p.created,
                p.namespace.clone(),
                p.name.clone(),
            )
        })
        .map(|p| format!("{}/{}", p.namespace, p.name))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Whatever pods report, an IP is at most one pod's: exactly the
    /// expected holder's endpoint shows it, and a PeerSet holds it only when
    /// it selects the holder. Applying the pods in any order, or as one
    /// relist, gives the same objects.
    #[test]
    fn a_contested_ip_is_exactly_one_pods(w in contested_world(), sharded in any::<bool>(), order in Just(()).prop_perturb(|_, mut rng| {
        let mut v: Vec<usize> = (0..8).collect();
        for i in (1..v.len()).rev() { v.swap(i, (rng.next_u32() as usize) % (i + 1)); }
        v
    })) {
        // Inline sets, or sets sliced as finely as they go.
        let l = if sharded { sharding() } else { Limits::default() };
        let h = Harness::with_limits(&w, l.clone());
        let mut holders: BTreeMap<String, String> = BTreeMap::new();
        for (pod, ips) in endpoint_ips(&h) {
            for ip in ips {
                prop_assert!(holders.insert(ip.clone(), pod.clone()).is_none(), "{ip} on two endpoints");
            }
        }
        for (ip, pod) in &holders {
            prop_assert_eq!(Some(pod.clone()), expected_holder(&w, ip), "holder of {}", ip);
        }
        for spec in h.store.peer_sets().values() {
            for ip in &spec.ips {
                let holder = expected_holder(&w, ip).unwrap();
                let p = w.pods.iter().find(|p| format!("{}/{}", p.namespace, p.name) == holder).unwrap();
                prop_assert_eq!(p.labels.get("pod").map(String::as_str), Some("a"), "{} of {} in the pod=a set", ip, holder);
            }
        }
        // Another order, one event at a time, ends in the same objects.
        let mut w2 = w.clone();
        w2.pods.clear();
        let mut h2 = Harness::with_limits(&w2, l);
        for &i in order.iter().filter(|&&i| i < w.pods.len()) {
            h2.index.apply_pod(w.pods[i].clone());
            h2.sync();
        }
        for i in 0..w.pods.len() {
            h2.index.apply_pod(w.pods[i].clone());
        }
        h2.sync();
        prop_assert_eq!(endpoint_ips(&h2), endpoint_ips(&h));
        let sets = |h: &Harness| h.store.peer_sets().into_iter().map(|(k, s)| (k, s.ips)).collect::<BTreeMap<_, _>>();
        prop_assert_eq!(sets(&h2), sets(&h));
    }
}
