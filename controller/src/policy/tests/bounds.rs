//! The size bound over extreme shapes: every request body the controller
//! would write is at most `MAX_OBJECT_BYTES`, what cannot be split is
//! refused (never written half), and what the agents assemble from the
//! slices is the whole policy.

use std::collections::BTreeSet;

use canal_crds::{MAX_OBJECT_BYTES, Protocol};

use super::*;

fn ip(n: usize) -> String {
    format!("10.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255)
}

/// Benchmark (b): 10,000 pods, 10,000 policies that all select every pod
/// and allow ingress from every pod (before sharding: 8.8 MB NodePolicySets).
#[test]
fn every_policy_selecting_every_pod() {
    let mut w = World {
        nodes: (0..100).map(|i| node(&format!("n{i}"))).collect(),
        namespaces: vec![ns("one", &[])],
        ..World::default()
    };
    for i in 0..10_000 {
        w.pods.push(pod(
            "one",
            &format!("pod-{i:05}"),
            &format!("n{}", i % 100),
            &ip(i + 1),
            &[("app", "x")],
        ));
        w.policies.push(np(&format!(
            "metadata: {{namespace: one, name: np-{i:05}}}\nspec: {{podSelector: {{matchLabels: {{app: x}}}}, policyTypes: [Ingress, Egress], ingress: [{{from: [{{podSelector: {{matchLabels: {{app: x}}}}}}]}}]}}"
        )));
    }
    let h = Harness::new(&w);
    assert!(h.store.refused.is_empty(), "{:?}", h.store.refused);
    assert!(
        h.store.largest <= MAX_OBJECT_BYTES,
        "largest object {} bytes",
        h.store.largest
    );
    assert_eq!(h.store.nps.len(), 100);
    let heads = h
        .store
        .pg
        .values()
        .filter(|(g, _)| g.slice_of.is_none())
        .count();
    assert_eq!(
        heads, 1,
        "one selector: one PolicyGroup, shared by every node"
    );
    assert!(
        h.store.pg.len() > 10,
        "sliced: {} objects",
        h.store.pg.len()
    );
    let n7 = h.nps("n7");
    assert_eq!(n7.policies.len(), 10_000);
    assert_eq!(n7.endpoints.len(), 100);
    assert!(
        n7.endpoints
            .iter()
            .all(|e| e.ingress_policies.len() == 10_000 && e.egress_policies.len() == 10_000)
    );
    let set = h.store.peer_sets().into_values().next().unwrap();
    assert_eq!(set.ips.len(), 10_000);
}

/// 150,000 pods in one cluster-wide PeerSet and one named-port PeerSet
/// (before sharding: about 2 MB each). Slow in a debug build: run with
/// `cargo test --release -p canal-controller --lib -- --ignored bounds`;
/// the 30,000-pod version below runs every time.
#[test]
#[ignore]
fn cluster_wide_and_named_port_sets_of_150k_pods() {
    cluster_wide_and_named_port_sets(150_000);
}

#[test]
fn cluster_wide_and_named_port_sets_of_30k_pods() {
    cluster_wide_and_named_port_sets(30_000);
}

fn cluster_wide_and_named_port_sets(pods: usize) {
    let nodes = pods / 100;
    let mut w = World {
        nodes: (0..nodes).map(|i| node(&format!("n{i}"))).collect(),
        namespaces: (0..50).map(|i| ns(&format!("ns{i}"), &[])).collect(),
        ..World::default()
    };
    for i in 0..pods {
        let mut p = pod(
            &format!("ns{}", i % 50),
            &format!("p{i}"),
            &format!("n{}", i % nodes),
            &ip(i + 1),
            &[("app", "x")],
        );
        p.named_ports = vec![named("metrics", Protocol::TCP, 9100)];
        w.pods.push(p);
    }
    w.policies.push(np(
        "metadata: {namespace: ns0, name: all}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress], ingress: [{from: [{namespaceSelector: {}}]}], egress: [{ports: [{port: metrics}]}]}",
    ));
    let mut h = Harness::new(&w);
    assert!(h.store.refused.is_empty(), "{:?}", h.store.refused);
    assert!(h.store.largest <= MAX_OBJECT_BYTES, "{}", h.store.largest);
    let sets = h.store.peer_sets();
    assert_eq!(sets.len(), 2);
    for (name, set) in &sets {
        assert_eq!(set.ips.len() + set.ports.len(), pods, "{name}");
        let slices = h.store.ps[name].0.slices.len();
        assert!(slices >= pods / 2000, "{name}: {slices} slices");
    }
    // One more pod: each set rewrites the slice that holds it and its head.
    let mut extra = pod("ns3", "extra", "n3", &ip(200_000), &[("app", "x")]);
    extra.named_ports = vec![named("metrics", Protocol::TCP, 9100)];
    h.index.apply_pod(extra);
    let writes = h.sync();
    let ps_writes = writes.iter().filter(|w| w.contains("PeerSet")).count();
    assert!(ps_writes <= 2 * 3, "{writes:?}");
    assert_eq!(
        writes
            .iter()
            .filter(|w| w.contains("NodePolicySet"))
            .count(),
        1,
        "{writes:?}"
    );
    for name in sets.keys() {
        let set = h.store.peer_set(name).unwrap();
        assert_eq!(set.ips.len() + set.ports.len(), pods + 1);
    }
}

/// One NetworkPolicy with 20,000 ipBlocks (about 1 MB compiled) is split
/// into parts across slices; the agents get all of it.
#[test]
fn one_huge_policy_is_split_into_parts() {
    let mut w = World {
        nodes: vec![node("n1")],
        namespaces: vec![ns("x", &[])],
        pods: vec![pod("x", "a", "n1", "10.0.0.1", &[])],
        ..World::default()
    };
    let blocks: Vec<String> = (0..20_000)
        .map(|i| format!("{{ipBlock: {{cidr: \"10.{}.{}.0/24\"}}}}", i / 256, i % 256))
        .collect();
    w.policies.push(np(&format!(
        "metadata: {{namespace: x, name: big}}\nspec: {{podSelector: {{}}, ingress: [{{from: [{}]}}]}}",
        blocks.join(", ")
    )));
    let h = Harness::new(&w);
    assert!(h.store.refused.is_empty(), "{:?}", h.store.refused);
    assert!(h.store.largest <= MAX_OBJECT_BYTES, "{}", h.store.largest);
    let n1 = h.nps("n1");
    assert_eq!(n1.policies.len(), 1);
    let peers: BTreeSet<String> = n1.policies[0]
        .ingress
        .iter()
        .flat_map(|r| r.peers.iter().flatten())
        .filter_map(|p| p.ip_block.as_ref().map(|b| b.cidr.clone()))
        .collect();
    assert_eq!(peers.len(), 20_000, "every block delivered");
    assert_eq!(n1.endpoints[0].ingress_policies, ["x/big"]);
}

/// What cannot be split (one ipBlock whose except list alone is over the
/// bound) is refused, and the node that needs it is not written against
/// it: it keeps the consistent version it has.
#[test]
fn what_cannot_be_split_is_refused_and_the_node_keeps_its_version() {
    let mut w = World {
        nodes: vec![node("n1")],
        namespaces: vec![ns("x", &[])],
        pods: vec![pod("x", "a", "n1", "10.0.0.1", &[])],
        ..World::default()
    };
    w.policies.push(np(
        "metadata: {namespace: x, name: small}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}}]}]}",
    ));
    let mut h = Harness::new(&w);
    let before = h.nps("n1");
    let excepts: Vec<String> = (0..40_000)
        .map(|i| format!("\"10.{}.{}.0/24\"", i / 256 % 256, i % 256))
        .collect();
    h.index.apply_policy(&np(&format!(
        "metadata: {{namespace: x, name: small}}\nspec: {{podSelector: {{}}, ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [{}]}}}}]}}]}}",
        excepts.join(", ")
    )));
    h.sync();
    assert!(
        h.store.refused.iter().any(|r| r.starts_with("PolicyGroup")),
        "{:?}",
        h.store.refused
    );
    assert!(h.store.largest <= MAX_OBJECT_BYTES);
    assert_eq!(h.nps("n1"), before, "n1 keeps the version it can assemble");
    assert_eq!(
        h.index
            .nodes_depending_on(Kind::PolicyGroup, h.store.pg.keys().next().unwrap()),
        ["n1"]
    );
    // Fixed: everything is written again.
    h.store.refused.clear();
    h.index.apply_policy(&np(
        "metadata: {namespace: x, name: small}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]}]}",
    ));
    h.sync();
    assert!(h.store.refused.is_empty());
    assert_eq!(
        h.nps("n1").policies[0].ingress[0].peers.as_ref().unwrap()[0]
            .ip_block
            .as_ref()
            .unwrap()
            .except,
        ["10.1.0.0/16"]
    );
}
