//! Table tests: the NetworkPolicy semantics on the upstream e2e model
//! (namespaces x, y, z; pods a, b, c in each), and the write behaviour of
//! the index event by event.

use canal_crds::Protocol;

use super::*;

/// Namespaces x, y, z labelled ns=<name>; pods a, b, c in each labelled
/// pod=<name>, serving the upstream port names; a and b of every namespace
/// on node n1, c on n2. IPs: x/a 10.0.0.1 ... z/c 10.0.0.9.
fn upstream() -> World {
    let mut w = World {
        nodes: vec![node("n1"), node("n2")],
        ..World::default()
    };
    let mut ip = 0;
    for n in ["x", "y", "z"] {
        w.namespaces.push(ns(n, &[("ns", n)]));
        for p in ["a", "b", "c"] {
            ip += 1;
            let host = if p == "c" { "n2" } else { "n1" };
            let mut info = pod(n, p, host, &format!("10.0.0.{ip}"), &[("pod", p)]);
            info.named_ports = vec![
                named("serve-80-tcp", Protocol::TCP, 80),
                named("serve-80-udp", Protocol::UDP, 80),
                named("serve-81-tcp", Protocol::TCP, 81),
                named("serve-81-udp", Protocol::UDP, 81),
            ];
            w.pods.push(info);
        }
    }
    w
}

fn key(p: &PodInfo) -> String {
    format!("{}/{}", p.namespace, p.name)
}

/// Builds the 9x9 truth table the store enforces for one port.
fn truth_table(
    w: &World,
    store: &Store,
    port: u16,
    proto: Protocol,
) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for s in &w.pods {
        for d in &w.pods {
            let v = enforced(store, s, d, port, proto).expect("every upstream pod is an endpoint");
            out.push((key(s), key(d), v));
        }
    }
    out
}

fn check_table(
    name: &str,
    w: &World,
    store: &Store,
    port: u16,
    proto: Protocol,
    expect: impl Fn(&str, &str) -> bool,
) {
    let mut wrong = Vec::new();
    for (s, d, got) in truth_table(w, store, port, proto) {
        let want = expect(&s, &d);
        if got != want {
            wrong.push(format!("  {s} -> {d}: expected {want}, enforced {got}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{name} {port}/{proto:?}: {} of 81 cells wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

fn scenario(policies: &[&str]) -> (World, Harness) {
    let mut w = upstream();
    w.policies = policies.iter().map(|y| np(y)).collect();
    let h = Harness::new(&w);
    let m = mismatches(&w, &h.store);
    assert!(m.is_empty(), "compiled vs reference:\n{}", m.join("\n"));
    (w, h)
}

fn ns_of(p: &str) -> &str {
    &p[..1]
}
fn pod_of(p: &str) -> &str {
    &p[2..]
}

#[test]
fn no_policy_allows_everything_and_lists_every_local_pod() {
    let (w, h) = scenario(&[]);
    check_table("no policy", &w, &h.store, 80, Protocol::TCP, |_, _| true);
    let n1 = h.nps("n1");
    let names: Vec<String> = n1
        .endpoints
        .iter()
        .map(|e| format!("{}/{}", e.namespace, e.pod))
        .collect();
    assert_eq!(names, ["x/a", "x/b", "y/a", "y/b", "z/a", "z/b"]);
    assert!(n1.policies.is_empty());
    let xa = &n1.endpoints[0];
    assert_eq!(xa.interface, canal_crds::names::veth_name("x", "a"));
    assert_eq!(xa.ips, ["10.0.0.1"]);
    assert_eq!(xa.named_ports.len(), 4);
    assert!(xa.ingress_policies.is_empty() && xa.egress_policies.is_empty());
    assert!(h.store.ps.is_empty(), "no policy references a PeerSet");
}

#[test]
fn upstream_truth_tables() {
    // (name, policies, port, protocol, expected verdict for "ns/pod" pairs)
    type Expect = fn(&str, &str) -> bool;
    let table: Vec<(&str, Vec<&str>, u16, Protocol, Expect)> = vec![
        (
            "deny all ingress in x",
            vec!["metadata: {namespace: x, name: deny}\nspec: {podSelector: {}}"],
            80,
            Protocol::TCP,
            |_, d| ns_of(d) != "x",
        ),
        (
            "deny all egress in x",
            vec![
                "metadata: {namespace: x, name: deny}\nspec: {podSelector: {}, policyTypes: [Egress]}",
            ],
            80,
            Protocol::TCP,
            |s, _| ns_of(s) != "x",
        ),
        (
            "allow x/a from the same namespace only (podSelector {})",
            vec![
                "metadata: {namespace: x, name: p}\nspec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {}}]}]}",
            ],
            80,
            Protocol::TCP,
            |s, d| d != "x/a" || ns_of(s) == "x",
        ),
        (
            "allow x/a from namespace y (namespaceSelector only)",
            vec![
                "metadata: {namespace: x, name: p}\nspec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]}",
            ],
            80,
            Protocol::TCP,
            |s, d| d != "x/a" || ns_of(s) == "y",
        ),
        (
            "allow x/a from pod b in namespace y (both = AND)",
            vec![
                "metadata: {namespace: x, name: p}\nspec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]}",
            ],
            80,
            Protocol::TCP,
            |s, d| d != "x/a" || s == "y/b",
        ),
        (
            "allow x/a from namespace y OR pod b of x (two peers = OR)",
            vec![
                "metadata: {namespace: x, name: p}\nspec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}, {podSelector: {matchLabels: {pod: b}}}]}]}",
            ],
            80,
            Protocol::TCP,
            |s, d| d != "x/a" || ns_of(s) == "y" || s == "x/b",
        ),
        (
            "allow x/a from every namespace (namespaceSelector {})",
            vec![
                "metadata: {namespace: x, name: p}\nspec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {}}]}]}",
            ],
            80,
            Protocol::TCP,
            |_, _| true,
        ),
        (
            "allow x/a only on port 81: port 80 blocked",
            vec![
                "metadata: {namespace: x, name: p}\nspec: {podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: 81}]}]}",
            ],
            80,
            Protocol::TCP,
            |_, d| d != "x/a",
        ),
        (
            "allow x/a on named port serve-80-tcp",
            vec![
                "metadata: {namespace: x, name: p}\nspec: {podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: serve-80-tcp}]}]}",
            ],
            80,
            Protocol::TCP,
            |_, _| true,
        ),
        (
            "allow x/a on named port serve-80-tcp: UDP 80 blocked",
            vec![
                "metadata: {namespace: x, name: p}\nspec: {podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: serve-80-tcp}]}]}",
            ],
            80,
            Protocol::UDP,
            |_, d| d != "x/a",
        ),
        (
            "egress of x/a to named port serve-81-tcp: 80 blocked",
            vec![
                "metadata: {namespace: x, name: p}\nspec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{ports: [{port: serve-81-tcp}]}]}",
            ],
            80,
            Protocol::TCP,
            |s, _| s != "x/a",
        ),
        (
            "egress of x/a to named port serve-81-tcp: 81 allowed everywhere",
            vec![
                "metadata: {namespace: x, name: p}\nspec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{ports: [{port: serve-81-tcp}]}]}",
            ],
            81,
            Protocol::TCP,
            |_, _| true,
        ),
        (
            "endPort range 79-80",
            vec![
                "metadata: {namespace: x, name: p}\nspec: {podSelector: {}, ingress: [{ports: [{port: 79, endPort: 80}]}]}",
            ],
            80,
            Protocol::TCP,
            |_, _| true,
        ),
        (
            "ipBlock with except: 10.0.0.0/28 except 10.0.0.4/30 (y/a .4 y/b .5 y/c .6 z/a .7)",
            vec![
                "metadata: {namespace: x, name: p}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/28, except: [10.0.0.4/30]}}]}]}",
            ],
            80,
            Protocol::TCP,
            |s, d| ns_of(d) != "x" || !matches!(s, "y/a" | "y/b" | "y/c" | "z/a"),
        ),
        (
            "union of two policies",
            vec![
                "metadata: {namespace: x, name: p1}\nspec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}",
                "metadata: {namespace: x, name: p2}\nspec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]}",
            ],
            80,
            Protocol::TCP,
            |s, d| d != "x/a" || s == "x/b" || s == "x/c",
        ),
        (
            "ingress-only policy does not isolate egress",
            vec![
                "metadata: {namespace: x, name: p}\nspec: {podSelector: {}, policyTypes: [Ingress], egress: [{ports: [{port: 1}]}]}",
            ],
            80,
            Protocol::TCP,
            |_, d| ns_of(d) != "x",
        ),
        (
            "matchExpressions NotIn and DoesNotExist",
            vec![
                "metadata: {namespace: x, name: p}\nspec: {podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [a]}]}, ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: [y, z]}]}, podSelector: {matchExpressions: [{key: missing, operator: DoesNotExist}]}}]}]}",
            ],
            80,
            Protocol::TCP,
            |s, d| ns_of(d) != "x" || pod_of(d) == "a" || ns_of(s) != "x",
        ),
        (
            "egress to y only, deny the rest",
            vec![
                "metadata: {namespace: x, name: p}\nspec: {podSelector: {}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]}",
            ],
            80,
            Protocol::TCP,
            |s, d| ns_of(s) != "x" || ns_of(d) == "y",
        ),
    ];
    for (name, policies, port, proto, expect) in table {
        let (w, h) = scenario(&policies);
        check_table(name, &w, &h.store, port, proto, expect);
    }
}

#[test]
fn pending_host_network_and_finished_pods() {
    let mut w = upstream();
    let mut pending = pod("x", "pending", "n1", "", &[("pod", "a")]);
    pending.ips.clear();
    let mut host = pod("x", "host", "n1", "192.168.0.1", &[("pod", "a")]);
    host.host_network = true;
    let mut done = pod("x", "done", "n1", "10.0.1.9", &[("pod", "a")]);
    done.finished = true;
    let elsewhere = pod("x", "lost", "n9", "10.0.1.10", &[("pod", "a")]);
    w.pods.extend([pending, host, done, elsewhere]);
    w.policies = vec![np(
        "metadata: {namespace: x, name: p}\nspec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}]}]}",
    )];
    let h = Harness::new(&w);
    let n1 = h.nps("n1");
    let eps: Vec<&str> = n1.endpoints.iter().map(|e| e.pod.as_str()).collect();
    assert!(
        eps.contains(&"pending"),
        "a pod is isolated before it has an IP"
    );
    assert!(!eps.contains(&"host") && !eps.contains(&"done"));
    let pending = n1.endpoints.iter().find(|e| e.pod == "pending").unwrap();
    assert_eq!(pending.ingress_policies, ["x/p"]);
    assert!(
        !h.store.nps.contains_key("n9"),
        "no Node object, no NodePolicySet"
    );
    let set = h.store.peer_sets().into_values().next().unwrap();
    assert_eq!(
        set.ips,
        ["10.0.0.1", "10.0.1.10"],
        "members: running pods with IPs, never hostNetwork or finished ones"
    );
    assert_eq!(set.member_count, 2);
}

#[test]
fn one_pod_event_rewrites_only_its_sets_and_its_node() {
    let mut w = upstream();
    w.nodes.push(node("n3"));
    w.pods
        .push(pod("z", "far", "n3", "10.0.3.1", &[("pod", "far")]));
    w.policies = vec![
        np(
            "metadata: {namespace: x, name: p}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}]}]}",
        ),
        np(
            "metadata: {namespace: y, name: q}\nspec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: b}}}]}]}",
        ),
    ];
    let mut h = Harness::new(&w);
    assert!(h.sync().is_empty(), "a second flush writes nothing");

    // IP change of x/a: its one PeerSet and node n1's endpoint list.
    let mut xa = w.pods[0].clone();
    xa.ips = vec!["10.0.9.1".parse().unwrap()];
    h.index.apply_pod(xa.clone());
    let writes = h.sync();
    assert_eq!(writes.len(), 2, "{writes:?}");
    assert!(
        writes.iter().any(|w| w == "apply NodePolicySet n1"),
        "{writes:?}"
    );
    assert_eq!(writes.iter().filter(|w| w.contains("PeerSet")).count(), 1);

    // The same pod again (a status update NetworkPolicy does not see): nothing.
    h.index.apply_pod(xa.clone());
    assert!(h.sync().is_empty());

    // Label change of x/a from pod=a to pod=b: out of one set, into none
    // (the pod=b set is y's namespaceSelector set, x matches {}).
    let mut relabeled = xa.clone();
    relabeled.labels = labels(&[("pod", "b")]);
    h.index.apply_pod(relabeled);
    let writes = h.sync();
    let sets = writes.iter().filter(|w| w.contains("PeerSet")).count();
    assert_eq!(sets, 2, "left one set, joined one: {writes:?}");
    assert!(
        !writes.iter().any(|w| w.contains("NodePolicySet")),
        "{writes:?}"
    );

    // A new pod on n3 that no policy selects and no set matches: only n3.
    h.index
        .apply_pod(pod("z", "new", "n3", "10.0.3.2", &[("pod", "zzz")]));
    assert_eq!(h.sync(), ["apply NodePolicySet n3"]);
}

#[test]
fn rules_on_a_node_depend_only_on_policies_selecting_its_pods() {
    let mut w = upstream();
    w.nodes.push(node("n3"));
    w.namespaces.push(ns("far", &[]));
    w.pods
        .push(pod("far", "f", "n3", "10.0.3.1", &[("app", "f")]));
    let baseline = Harness::new(&w);
    let n1_before = baseline.nps("n1").clone();
    // 200 policies that select only the pod on n3.
    for i in 0..200 {
        w.policies.push(np(&format!(
            "metadata: {{namespace: far, name: p{i}}}\nspec: {{podSelector: {{matchLabels: {{app: f}}}}, ingress: [{{from: [{{podSelector: {{matchLabels: {{n: \"{i}\"}}}}}}]}}]}}"
        )));
    }
    let mut h = Harness::new(&w);
    assert_eq!(h.nps("n1"), n1_before);
    assert_eq!(h.nps("n3").policies.len(), 200);
    assert_eq!(h.store.pg.len(), 1, "one selector, one shared PolicyGroup");
    // Adding one more policy elsewhere writes its PeerSet, the group and n3.
    h.index.apply_policy(&np(
        "metadata: {namespace: far, name: extra}\nspec: {podSelector: {matchLabels: {app: f}}, ingress: [{from: [{podSelector: {matchLabels: {n: extra}}}]}]}",
    ));
    let writes = h.sync();
    assert_eq!(writes.len(), 3, "{writes:?}");
    assert!(writes[0].starts_with("apply PeerSet "), "{writes:?}");
    assert!(writes[1].starts_with("apply PolicyGroup "), "{writes:?}");
    assert_eq!(writes[2], "apply NodePolicySet n3");
}

#[test]
fn policy_delete_garbage_collects_its_peer_sets_after_the_nodes_stop_using_them() {
    let (_, mut h) = scenario(&[
        "metadata: {namespace: x, name: p}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}], policyTypes: [Ingress, Egress], egress: [{ports: [{port: serve-80-tcp}]}]}",
        "metadata: {namespace: y, name: q}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}",
    ]);
    assert_eq!(
        h.store.ps.len(),
        3,
        "x pod=b, y pod=b, named port serve-80-tcp"
    );
    let named = h
        .store
        .ps
        .values()
        .find(|(s, _)| s.selector.named_port.is_some())
        .unwrap();
    assert_eq!(
        named.0.member_count, 9,
        "every pod that declares the name, cluster-wide"
    );
    assert!(
        named
            .0
            .ports
            .iter()
            .all(|m| m.port == 80 && m.protocol == Protocol::TCP)
    );
    let x_sets: Vec<String> = h
        .store
        .ps
        .iter()
        .filter(|(_, (s, _))| s.selector.namespace.as_deref() != Some("y"))
        .map(|(n, _)| n.clone())
        .collect();
    let x_group = h
        .store
        .pg
        .iter()
        .find(|(_, (g, _))| g.namespace == "x")
        .map(|(n, _)| n.clone())
        .unwrap();
    h.index.delete_policy("x", "p");
    let writes = h.sync();
    let mut expected = vec![
        "apply NodePolicySet n1".to_string(),
        "apply NodePolicySet n2".to_string(),
        format!("delete PolicyGroup {x_group}"),
    ];
    expected.extend(x_sets.iter().map(|n| format!("delete PeerSet {n}")));
    assert_eq!(
        writes, expected,
        "nodes first, then the group and the sets they used"
    );
    assert_eq!(h.store.ps.len(), 1);
}

#[test]
fn invalid_policies_are_reported_skipped_and_never_tear_down_the_previous_version() {
    let good =
        "metadata: {namespace: x, name: p, uid: u1}\nspec: {podSelector: {matchLabels: {pod: a}}}";
    let bad = "metadata: {namespace: x, name: p, uid: u1}\nspec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{ipBlock: {cidr: nonsense}}]}]}";
    let other_bad = "metadata: {namespace: x, name: q}\nspec: {podSelector: {matchExpressions: [{key: a, operator: Foo, values: [x]}]}}";
    let (_, mut h) = scenario(&[good]);
    let xa = |h: &Harness| {
        h.nps("n1")
            .endpoints
            .iter()
            .find(|e| e.namespace == "x" && e.pod == "a")
            .unwrap()
            .ingress_policies
            .clone()
    };
    assert_eq!(xa(&h), ["x/p"]);

    h.index.apply_policy(&np(bad));
    h.index.apply_policy(&np(other_bad));
    let writes = h.sync();
    assert!(writes.is_empty(), "{writes:?}");
    assert_eq!(xa(&h), ["x/p"], "the last valid version stays in force");
    assert_eq!(h.reports.len(), 2);
    let r = &h.reports[0];
    assert_eq!((r.namespace.as_str(), r.name.as_str()), ("x", "p"));
    assert_eq!(r.uid.as_deref(), Some("u1"));
    assert!(r.kept_previous);
    assert!(
        r.problem.as_deref().unwrap().contains("\"nonsense\""),
        "{r:?}"
    );
    assert!(
        !h.reports[1].kept_previous,
        "a policy never valid is just skipped"
    );
    assert_eq!(h.index.stats().invalid_policies, 2);

    // The same invalid version again: no second report.
    h.index.apply_policy(&np(bad));
    h.sync();
    assert_eq!(h.reports.len(), 2);

    // Fixed: reported valid, and the fix is compiled.
    h.index.apply_policy(&np(
        "metadata: {namespace: x, name: p, uid: u1}\nspec: {podSelector: {matchLabels: {pod: b}}}",
    ));
    h.sync();
    assert_eq!(h.reports.len(), 3);
    assert_eq!(h.reports[2].problem, None);
    assert!(xa(&h).is_empty());
}

#[test]
fn restart_writes_nothing_and_tampering_is_repaired() {
    let policies = [
        "metadata: {namespace: x, name: p}\nspec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}], egress: [{ports: [{port: serve-80-udp, protocol: UDP}]}]}",
    ];
    let (w, h) = scenario(&policies);
    // A new controller: the world, plus what the watches of NodePolicySets
    // and PeerSets report.
    let mut restarted = w.index();
    h.store.observe_all(&mut restarted);
    let changes = restarted.flush();
    assert_eq!(changes.writes(), 0, "{changes:?}");

    // Someone edits n1's spec: the content no longer matches the annotation.
    let mut store = h.store.clone();
    store.nps.get_mut("n1").unwrap().0.policy_groups.clear();
    restarted.reset_observed(Kind::NodePolicySet, store.observed(Kind::NodePolicySet));
    let changes = restarted.flush();
    assert_eq!(changes.node_policy_sets, [Change::Apply("n1".into())]);
    store.apply(&mut restarted, &changes);
    assert_eq!(store.nps["n1"], h.store.nps["n1"]);

    // A stray object nobody wants is deleted; a deleted one is recreated.
    restarted.observe(Kind::PeerSet, "ps-stray", None);
    store.ps.remove(&first_set(&h));
    restarted.observe_deleted(Kind::PeerSet, &first_set(&h));
    let changes = restarted.flush();
    assert_eq!(
        changes.peer_sets,
        [
            Change::Apply(first_set(&h).into()),
            Change::Delete("ps-stray".into())
        ]
    );
}

fn first_set(h: &Harness) -> String {
    h.store.ps.keys().next().unwrap().clone()
}

#[test]
fn node_lifecycle() {
    let (w, mut h) = scenario(&[]);
    h.index.delete_node("n2");
    assert_eq!(h.sync(), ["delete NodePolicySet n2"]);
    h.index.apply_node(node("n2"));
    assert_eq!(h.sync(), ["apply NodePolicySet n2"]);
    // The same Node seen again (or recreated under its name) writes nothing:
    // the NodePolicySet is owned by the CanalNetwork, not by the Node.
    h.index.apply_node(node("n2"));
    assert!(h.sync().is_empty());
    // A Node with no pods still gets an (empty) NodePolicySet.
    h.index.apply_node(node("empty"));
    assert_eq!(h.sync(), ["apply NodePolicySet empty"]);
    assert!(h.nps("empty").endpoints.is_empty());
    let mut names: Vec<&str> = h.index.node_names().collect();
    names.sort();
    assert_eq!(names, ["empty", "n1", "n2"]);
    // Deleting every pod of a node leaves its (now empty) NodePolicySet.
    for p in w.pods.iter().filter(|p| p.node.as_deref() == Some("n2")) {
        h.index.delete_pod(&p.namespace, &p.name);
    }
    assert_eq!(h.sync(), ["apply NodePolicySet n2"]);
    assert!(h.nps("n2").endpoints.is_empty());
}

#[test]
fn namespace_labels_move_pods_in_and_out_of_namespace_selector_sets() {
    let (mut w, mut h) = scenario(&[
        "metadata: {namespace: x, name: p}\nspec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]}",
    ]);
    let set = first_set(&h);
    assert!(h.store.ps[&set].0.ips.is_empty());
    w.namespaces[1] = ns("y", &[("ns", "y"), ("team", "blue")]);
    h.index.apply_namespace(w.namespaces[1].clone());
    assert_eq!(h.sync(), [format!("apply PeerSet {set}")]);
    assert_eq!(
        h.store.peer_set(&set).unwrap().ips,
        ["10.0.0.4", "10.0.0.5", "10.0.0.6"]
    );
    let m = mismatches(&w, &h.store);
    assert!(m.is_empty(), "{}", m.join("\n"));
    h.index.delete_namespace("y");
    assert_eq!(h.sync(), [format!("apply PeerSet {set}")]);
    assert!(h.store.ps[&set].0.ips.is_empty());
}

#[test]
fn objects_may_arrive_in_any_order() {
    let mut w = upstream();
    w.policies = vec![np(
        "metadata: {namespace: x, name: p}\nspec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]}",
    )];
    // Pods and policies before their Namespaces and Nodes exist.
    let mut index = PolicyIndex::new();
    index.reset_pods(w.pods.clone());
    index.reset_policies(w.policies.clone());
    index.reset_namespaces(w.namespaces.clone());
    index.reset_nodes(w.nodes.clone());
    let mut store = Store::default();
    let changes = index.flush();
    store.apply(&mut index, &changes);
    let m = mismatches(&w, &store);
    assert!(m.is_empty(), "{}", m.join("\n"));
    assert_eq!(store.nps.len(), 2);
    assert_eq!(store.ps.values().next().unwrap().0.ips.len(), 3, "y's pods");
}
