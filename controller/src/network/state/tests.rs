//! The network state machine without an API server: builders for Nodes and
//! networks, and a fake "API" that applies planned writes back.

use super::*;
use canal_crds::annotations;
use canal_crds::condition::{DEGRADED, READY, find};
use k8s_openapi::jiff::Timestamp;

fn now() -> Time {
    Time(Timestamp::from_second(1_000).unwrap())
}

/// A Node with an InternalIP of its own (derived from the name: two Nodes
/// with one overlay address are a conflict).
fn node(name: &str, age: i64) -> NodeView {
    let h = name
        .bytes()
        .fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
    NodeView {
        name: name.into(),
        uid: Some(format!("uid-{name}")),
        created: Some(Timestamp::from_second(age).unwrap()),
        internal_ip: Some(std::net::Ipv4Addr::from(0xc0a8_0000 | (h % 0xfffe + 1))),
        ..Default::default()
    }
}

fn with_cidr(mut v: NodeView, cidr: &str) -> NodeView {
    v.pod_cidr = Some(cidr.into());
    v.pod_cidrs = vec![cidr.into()];
    v
}

fn network(name: &str, cidr: &str, len: u8) -> NetworkObject {
    NetworkObject {
        name: name.into(),
        uid: Some(format!("uid-{name}")),
        generation: Some(1),
        spec: Ok(CanalNetworkSpec {
            node_subnet_length: len,
            ..CanalNetworkSpec::with_cluster_cidr(cidr)
        }),
        status: Some(CanalNetworkStatus::default()),
    }
}

/// Plans with no busy Nodes and a large budget.
fn plan(s: &mut State) -> Plan {
    s.plan(now(), 1_000, &HashSet::new())
}

/// Plays the API server: applies every write back into the state, as the
/// watch would, and records status writes.
fn settle(s: &mut State, p: &Plan) {
    for w in &p.node_writes {
        let mut v = s.node(&w.apply.name).unwrap().clone();
        v.pod_cidr = Some(w.apply.pod_cidr.clone());
        v.pod_cidrs = w.apply.pod_cidrs.clone();
        v.annotations.extend(w.apply.annotations.clone());
        s.apply_node(v);
    }
    for w in &p.status_writes {
        s.status_written(&w.name, w.status.clone());
    }
}

/// Plans and settles until nothing is left to write; returns every plan.
fn converge(s: &mut State) -> Vec<Plan> {
    let mut plans = Vec::new();
    for _ in 0..10 {
        let p = plan(s);
        let done = p.node_writes.is_empty() && p.status_writes.is_empty();
        settle(s, &p);
        plans.push(p);
        if done {
            return plans;
        }
    }
    panic!("did not converge");
}

fn default_status(s: &State) -> CanalNetworkStatus {
    s.networks["default"].written.clone().unwrap()
}

fn degraded_reason(s: &State) -> Option<String> {
    status::reason(&default_status(s)).map(str::to_string)
}

fn subnet(s: &State, name: &str) -> Option<String> {
    s.node(name).and_then(|v| v.pod_cidr.clone())
}

fn reasons(plans: &[Plan]) -> Vec<&'static str> {
    plans
        .iter()
        .flat_map(|p| p.notices.iter().map(|n| n.reason))
        .collect()
}

#[test]
fn nothing_is_allocated_before_the_default_network_exists() {
    let mut s = State::new();
    s.reset_nodes(vec![node("a", 1)]);
    s.reset_networks(vec![network("other", "10.9.0.0/16", 24)]);
    let p = plan(&mut s);
    assert!(p.node_writes.is_empty());
    assert_eq!(
        p.status_writes.len(),
        1,
        "the other network is told it is ignored"
    );
    let st = &p.status_writes[0].status;
    assert_eq!(find(&st.conditions, READY).unwrap().reason, status::IGNORED);
}

#[test]
fn allocates_distinct_subnets_and_then_writes_nothing() {
    let mut s = State::new();
    s.reset_nodes((0..5).map(|i| node(&format!("n{i}"), i)).collect());
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    let plans = converge(&mut s);
    let first = &plans[0];
    assert_eq!(first.node_writes.len(), 5);
    assert!(
        first
            .node_writes
            .iter()
            .all(|w| matches!(w.kind, WriteKind::Allocate(_)))
    );
    let subnets: BTreeSet<String> = (0..5)
        .map(|i| subnet(&s, &format!("n{i}")).unwrap())
        .collect();
    assert_eq!(subnets.len(), 5);
    let v = s.node("n0").unwrap();
    assert_eq!(v.annotations[annotations::KUBE_SUBNET_MANAGER], "true");
    assert_eq!(
        v.annotations[annotations::PUBLIC_IP],
        v.internal_ip.unwrap().to_string()
    );
    let st = default_status(&s);
    assert_eq!(st.allocated_subnets, Some(5));
    assert_eq!(st.free_subnets, Some(251));
    assert_eq!(find(&st.conditions, READY).unwrap().status, "True");

    // A resync of an unchanged world plans nothing.
    s.mark_all_dirty();
    let p = plan(&mut s);
    assert!(p.node_writes.is_empty() && p.status_writes.is_empty() && p.notices.is_empty());
}

#[test]
fn adopts_an_existing_pod_cidr_verbatim() {
    let mut s = State::new();
    s.reset_nodes(vec![with_cidr(node("a", 1), "10.244.7.0/24"), node("b", 2)]);
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    let p = plan(&mut s);
    let a = p.node_writes.iter().find(|w| w.apply.name == "a").unwrap();
    assert_eq!(
        a.kind,
        WriteKind::Adopt(vec!["10.244.7.0/24".parse().unwrap()])
    );
    assert_eq!(a.apply.pod_cidr, "10.244.7.0/24");
    let b = p.node_writes.iter().find(|w| w.apply.name == "b").unwrap();
    assert_ne!(b.apply.pod_cidr, "10.244.7.0/24");
}

#[test]
fn conflicts_are_reported_and_never_written() {
    let mut s = State::new();
    s.reset_nodes(vec![
        with_cidr(node("outside", 1), "10.0.0.0/24"),
        with_cidr(node("first", 2), "10.244.1.0/24"),
        with_cidr(node("second", 3), "10.244.1.0/24"),
        with_cidr(node("garbage", 4), "10.244.9.9/24"),
    ]);
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    let plans = converge(&mut s);
    let written: BTreeSet<&str> = plans
        .iter()
        .flat_map(|p| p.node_writes.iter().map(|w| w.apply.name.as_str()))
        .collect();
    assert_eq!(written, BTreeSet::from(["first"]));
    assert_eq!(
        reasons(&plans)
            .iter()
            .filter(|r| **r == "PodCIDRConflict")
            .count(),
        3
    );
    assert_eq!(degraded_reason(&s).as_deref(), Some(status::CONFLICT));
    let msg = find(&default_status(&s).conditions, DEGRADED)
        .unwrap()
        .message
        .clone();
    assert!(
        msg.contains("outside (podCIDR 10.0.0.0/24 is outside clusterCIDR 10.244.0.0/16"),
        "{msg}"
    );
    assert!(
        msg.contains("overlaps 10.244.1.0/24 of Node first"),
        "{msg}"
    );
    assert!(msg.contains("host bits"), "{msg}");

    // The older Node of an overlapping pair goes: the other one is adopted.
    s.delete_node("first");
    let plans = converge(&mut s);
    assert_eq!(plans[0].node_writes.len(), 1);
    assert_eq!(plans[0].node_writes[0].apply.name, "second");
    assert_eq!(s.conflict_count(), 2);
}

#[test]
fn exhaustion_waits_and_a_deleted_node_frees_a_subnet() {
    let mut s = State::new();
    s.reset_nodes((0..6).map(|i| node(&format!("n{i}"), i)).collect());
    s.reset_networks(vec![network("default", "10.1.0.0/28", 30)]);
    let plans = converge(&mut s);
    assert_eq!(s.waiting_count(), 2);
    assert_eq!(subnet(&s, "n4"), None);
    assert_eq!(
        reasons(&plans)
            .iter()
            .filter(|r| **r == "SubnetExhausted")
            .count(),
        3,
        "one per waiting Node plus one on the network: {:?}",
        reasons(&plans)
    );
    let st = default_status(&s);
    assert_eq!(
        degraded_reason(&s).as_deref(),
        Some(status::SUBNET_EXHAUSTED)
    );
    assert_eq!(
        (st.allocated_subnets, st.free_subnets, st.pending_nodes),
        (Some(4), Some(0), Some(2))
    );

    let freed = subnet(&s, "n2").unwrap();
    s.delete_node("n2");
    let plans = converge(&mut s);
    assert_eq!(plans[0].node_writes.len(), 1);
    assert_eq!(
        plans[0].node_writes[0].apply.name, "n4",
        "the oldest waiting Node"
    );
    assert_eq!(subnet(&s, "n4"), Some(freed));
    assert_eq!(s.waiting_count(), 1);
    assert!(
        reasons(&plans).is_empty(),
        "no repeated Events: {:?}",
        reasons(&plans)
    );

    s.delete_node("n5");
    converge(&mut s);
    assert_eq!(degraded_reason(&s), None);
}

#[test]
fn address_plan_change_is_refused_while_allocated_and_applied_when_empty() {
    let mut s = State::new();
    s.reset_nodes(vec![node("a", 1)]);
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    converge(&mut s);
    let before = subnet(&s, "a").unwrap();

    let mut changed = network("default", "10.245.0.0/16", 25);
    changed.generation = Some(2);
    changed.status = Some(default_status(&s));
    s.apply_network(changed.clone());
    let plans = converge(&mut s);
    assert!(
        plans.iter().all(|p| p.node_writes.is_empty()),
        "nothing touched"
    );
    assert_eq!(subnet(&s, "a"), Some(before));
    assert_eq!(
        degraded_reason(&s).as_deref(),
        Some(status::LIVE_CHANGE_REFUSED)
    );
    let st = default_status(&s);
    assert_eq!(st.active_cluster_cidr.as_deref(), Some("10.244.0.0/16"));
    assert_eq!(st.observed_generation, Some(2));
    assert!(reasons(&plans).contains(&status::LIVE_CHANGE_REFUSED));

    // A new Node still gets a subnet from the plan in force.
    s.apply_node(node("b", 2));
    converge(&mut s);
    assert!(subnet(&s, "b").unwrap().starts_with("10.244."));

    // Every Node gone: the new plan applies by itself.
    s.delete_node("a");
    s.delete_node("b");
    let plans = converge(&mut s);
    assert!(reasons(&plans).contains(&"AddressPlanApplied"));
    assert_eq!(
        default_status(&s).active_cluster_cidr.as_deref(),
        Some("10.245.0.0/16")
    );
    s.apply_node(node("c", 3));
    converge(&mut s);
    assert_eq!(subnet(&s, "c").as_deref(), Some("10.245.0.0/25"));
    assert_eq!(degraded_reason(&s), None);
}

#[test]
fn resumes_the_plan_recorded_in_status() {
    // The spec was edited while no controller ran; Nodes hold subnets of the old plan.
    let mut s = State::new();
    s.reset_nodes(vec![with_cidr(node("a", 1), "10.244.3.0/24")]);
    let mut net = network("default", "10.50.0.0/16", 24);
    net.status = Some(CanalNetworkStatus {
        active_cluster_cidr: Some("10.244.0.0/16".into()),
        active_node_subnet_length: Some(24),
        ..Default::default()
    });
    s.reset_networks(vec![net]);
    converge(&mut s);
    assert_eq!(
        s.conflict_count(),
        0,
        "the Node is inside the plan in force"
    );
    assert_eq!(
        degraded_reason(&s).as_deref(),
        Some(status::LIVE_CHANGE_REFUSED)
    );
}

#[test]
fn live_settings_reach_every_node() {
    let mut s = State::new();
    s.reset_nodes((0..3).map(|i| node(&format!("n{i}"), i)).collect());
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    converge(&mut s);

    let mut edited = network("default", "10.244.0.0/16", 24);
    if let Ok(spec) = &mut edited.spec {
        spec.backend.vni = 42;
        spec.backend.port = 4789;
    }
    edited.generation = Some(2);
    s.apply_network(edited);
    let plans = converge(&mut s);
    assert_eq!(plans[0].node_writes.len(), 3);
    assert!(
        plans[0]
            .node_writes
            .iter()
            .all(|w| w.kind == WriteKind::Update)
    );
    let data = &s.node("n1").unwrap().annotations[annotations::BACKEND_DATA];
    assert!(data.starts_with(r#"{"VNI":42,"#), "{data}");
    let note = &plans[0]
        .notices
        .iter()
        .find(|n| n.reason == "ConfigApplied")
        .unwrap()
        .note;
    assert!(
        note.contains("backend.vni 1 -> 42") && note.contains("backend.port 8472 -> 4789"),
        "{note}"
    );
    assert_eq!(default_status(&s).observed_generation, Some(2));

    // A port-only edit changes no annotation.
    let mut port_only = network("default", "10.244.0.0/16", 24);
    if let Ok(spec) = &mut port_only.spec {
        spec.backend.vni = 42;
        spec.backend.port = 4790;
    }
    port_only.generation = Some(3);
    s.apply_network(port_only);
    let plans = converge(&mut s);
    assert!(plans.iter().all(|p| p.node_writes.is_empty()));
    assert_eq!(default_status(&s).observed_generation, Some(3));
}

#[test]
fn an_invalid_spec_keeps_the_last_config_in_force() {
    let mut s = State::new();
    s.reset_nodes(vec![node("a", 1)]);
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    converge(&mut s);

    let mut broken = network("default", "10.244.0.0/16", 24);
    broken.spec = Err("invalid type: string \"x\", expected u32 at backend.vni".into());
    broken.status = None;
    broken.generation = Some(2);
    s.apply_network(broken);
    s.apply_node(node("b", 2));
    let plans = converge(&mut s);
    assert_eq!(degraded_reason(&s).as_deref(), Some(status::INVALID_SPEC));
    assert!(
        subnet(&s, "b").is_some(),
        "the last valid settings stay in force"
    );
    assert_eq!(
        plans.iter().map(|p| p.status_writes.len()).sum::<usize>(),
        1,
        "written once, not on every pass"
    );
    assert_eq!(s.live_config().unwrap().vni, 1);
}

#[test]
fn a_subnet_in_flight_survives_a_relist() {
    let mut s = State::new();
    s.reset_nodes(vec![node("a", 1)]);
    s.reset_networks(vec![network("default", "10.1.0.0/29", 30)]);
    let p = plan(&mut s);
    let handed = p.node_writes[0].apply.pod_cidr.clone();
    // The write is in flight; the watch relists and "a" has no podCIDR yet.
    s.reset_nodes(vec![node("a", 1), node("b", 2)]);
    let busy = HashSet::from(["a".to_string()]);
    let p = s.plan(now(), 10, &busy);
    assert_eq!(p.node_writes.len(), 1);
    assert_ne!(
        p.node_writes[0].apply.pod_cidr, handed,
        "no double allocation"
    );
}

#[test]
fn budget_and_busy_nodes_are_respected() {
    let mut s = State::new();
    s.reset_nodes((0..10).map(|i| node(&format!("n{i}"), i)).collect());
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    let busy = HashSet::from(["n0".to_string()]);
    let p = s.plan(now(), 4, &busy);
    assert_eq!(p.node_writes.len(), 4);
    assert!(p.node_writes.iter().all(|w| w.apply.name != "n0"));
    assert!(s.dirty_count() >= 6);
}

#[test]
fn deleting_and_recreating_default_keeps_allocations() {
    let mut s = State::new();
    s.reset_nodes(vec![node("a", 1)]);
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    converge(&mut s);
    s.delete_network("default");
    s.apply_node(node("b", 2));
    assert!(
        plan(&mut s).node_writes.is_empty(),
        "no network, no new allocation"
    );
    s.apply_network(network("default", "10.244.0.0/16", 24));
    converge(&mut s);
    assert!(subnet(&s, "b").is_some());
    assert_eq!(s.allocator().unwrap().allocated(), 2);
}

#[test]
fn a_write_response_never_hides_a_newer_watch_event() {
    let mut s = State::new();
    let mut a = node("a", 1);
    a.resource_version = Some("1".into());
    s.reset_nodes(vec![a.clone()]);
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    let w = plan(&mut s).node_writes.remove(0);
    assert_eq!(w.based_on.as_deref(), Some("1"));
    let mut response = a.clone();
    response.resource_version = Some("3".into());
    response.pod_cidr = Some(w.apply.pod_cidr.clone());
    response.pod_cidrs = w.apply.pod_cidrs.clone();
    response.annotations = w.apply.annotations.clone();

    // The watch already reported a later change (new InternalIP): keep it.
    let mut newer = response.clone();
    newer.resource_version = Some("4".into());
    newer.internal_ip = Some("192.168.0.99".parse().unwrap());
    s.apply_node(newer);
    s.node_written(w.based_on.as_deref(), response.clone());
    assert_eq!(s.node("a").unwrap().resource_version.as_deref(), Some("4"));
    let p = plan(&mut s);
    assert_eq!(
        p.node_writes[0].apply.annotations[annotations::PUBLIC_IP],
        "192.168.0.99"
    );

    // Nothing reported since the write was planned: the response is the news.
    let mut s2 = State::new();
    s2.reset_nodes(vec![a]);
    s2.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    let w = plan(&mut s2).node_writes.remove(0);
    s2.node_written(w.based_on.as_deref(), response);
    assert_eq!(s2.node("a").unwrap().resource_version.as_deref(), Some("3"));
    assert!(plan(&mut s2).node_writes.is_empty());
}

// ----- Node addresses (issues 10.2 and 10.6) ------------------------------

fn with_ip(mut v: NodeView, ip: &str) -> NodeView {
    v.internal_ip = Some(ip.parse().unwrap());
    v
}

fn published(s: &State, name: &str) -> Option<String> {
    s.node(name)
        .and_then(|v| v.annotations.get(annotations::PUBLIC_IP).cloned())
}

fn notes(plans: &[Plan], reason: &str) -> Vec<String> {
    plans
        .iter()
        .flat_map(|p| p.notices.iter())
        .filter(|n| n.reason == reason)
        .map(|n| n.note.clone())
        .collect()
}

fn degraded_message(s: &State) -> String {
    find(&default_status(s).conditions, DEGRADED)
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

#[test]
fn a_node_address_inside_the_cluster_cidr_is_a_conflict_and_its_subnet_is_never_allocated() {
    // Four /24s; the InternalIP of "inside" lies in the first, the
    // ExternalIP of "ext" in the third.
    let mut s = State::new();
    let mut ext = node("ext", 2);
    ext.addresses = vec![
        (
            crate::node_view::AddressKind::Internal,
            ext.internal_ip.unwrap(),
        ),
        (
            crate::node_view::AddressKind::External,
            "10.244.2.9".parse().unwrap(),
        ),
    ];
    s.reset_nodes(vec![
        with_ip(node("inside", 1), "10.244.0.5"),
        ext,
        node("c", 3),
        node("d", 4),
    ]);
    s.reset_networks(vec![network("default", "10.244.0.0/22", 24)]);
    let plans = converge(&mut s);
    let mut held: Vec<String> = ["inside", "ext", "c", "d"]
        .iter()
        .filter_map(|n| subnet(&s, n))
        .collect();
    held.sort();
    assert_eq!(
        held,
        vec!["10.244.1.0/24", "10.244.3.0/24"],
        "nothing allocated into a Node's address"
    );
    assert_eq!(degraded_reason(&s).as_deref(), Some(status::CONFLICT));
    let msg = degraded_message(&s);
    assert!(
        msg.contains("Node inside: InternalIP 10.244.0.5 lies inside clusterCIDR 10.244.0.0/22"),
        "{msg}"
    );
    assert!(msg.contains("Node ext: ExternalIP 10.244.2.9 lies inside clusterCIDR 10.244.0.0/22: subnet 10.244.2.0/24 is held back from allocation"), "{msg}");
    assert_eq!(
        published(&s, "inside"),
        None,
        "an overlay address inside the pod range is never published"
    );
    assert_eq!(notes(&plans, "NodeAddressConflict").len(), 2);
    assert_eq!(default_status(&s).free_subnets, Some(0));
    assert_eq!(s.conflict_count(), 2);

    // The Node's address leaves the range: its subnet is free again and the
    // Node that waited gets one.
    let fixed = with_ip(s.node("inside").unwrap().clone(), "192.168.200.1");
    s.apply_node(fixed);
    converge(&mut s);
    let got: Vec<Option<String>> = ["inside", "ext", "c", "d"]
        .iter()
        .map(|n| subnet(&s, n))
        .collect();
    assert!(
        got.iter().flatten().any(|c| c == "10.244.0.0/24"),
        "{got:?}"
    );
    assert!(
        !got.iter().flatten().any(|c| c == "10.244.2.0/24"),
        "{got:?}"
    );
    assert_eq!(published(&s, "inside").as_deref(), Some("192.168.200.1"));
    assert!(!degraded_message(&s).contains("Node inside"));
}

#[test]
fn a_node_address_in_an_allocated_subnet_names_its_holder() {
    let mut s = State::new();
    s.reset_nodes(vec![with_cidr(node("a", 1), "10.244.5.0/24")]);
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    converge(&mut s);
    s.apply_node(with_ip(node("b", 2), "10.244.5.77"));
    let plans = converge(&mut s);
    let note = &notes(&plans, "NodeAddressConflict")[0];
    assert!(
        note.contains(
            "subnet 10.244.5.0/24 of Node a contains it, so a pod there can be given this address"
        ),
        "{note}"
    );
}

#[test]
fn an_overlay_address_move_is_published_with_an_event_and_its_history() {
    let mut s = State::new();
    s.reset_nodes(vec![with_ip(node("a", 1), "192.168.1.1")]);
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    converge(&mut s);
    let mut moved = with_ip(s.node("a").unwrap().clone(), "192.168.1.9");
    moved.addresses_writer = Some("kubelet".into());
    s.apply_node(moved);
    let p = plan(&mut s);
    let w = &p.node_writes[0];
    let m = w.moved.as_ref().expect("the move is reported");
    assert_eq!(
        (m.from.as_str(), m.to.as_str()),
        ("192.168.1.1", "192.168.1.9")
    );
    assert_eq!(m.source, "InternalIP, written by kubelet");
    assert_eq!(w.apply.annotations[annotations::PUBLIC_IP], "192.168.1.9");
    assert_eq!(
        w.apply.annotations[addresses::PREVIOUS_PUBLIC_IP],
        "192.168.1.1"
    );
    assert_eq!(
        w.apply.annotations[addresses::PUBLIC_IP_CHANGED_AT],
        now().0.to_string()
    );
    let note = addresses::move_note(m);
    assert!(
        note.contains("moved from 192.168.1.1 to 192.168.1.9 (InternalIP, written by kubelet)"),
        "{note}"
    );
    settle(&mut s, &p);
    // The history stays (carried by every later apply), and nothing churns.
    s.mark_all_dirty();
    let again = plan(&mut s);
    assert!(again.node_writes.is_empty(), "{:?}", again.node_writes);
    assert_eq!(degraded_reason(&s), None);
}

#[test]
fn another_nodes_overlay_address_is_refused_until_that_node_goes() {
    // The attack of issue 10.2: node b's InternalIP is set to node a's, so
    // every peer would send b's pod traffic to a.
    let mut s = State::new();
    s.reset_nodes(vec![
        with_ip(node("a", 1), "192.168.1.1"),
        with_ip(node("b", 2), "192.168.1.2"),
    ]);
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    converge(&mut s);
    let hijack = with_ip(s.node("b").unwrap().clone(), "192.168.1.1");
    s.apply_node(hijack);
    let plans = converge(&mut s);
    assert_eq!(
        published(&s, "b").as_deref(),
        Some("192.168.1.2"),
        "b's traffic is not re-pointed"
    );
    assert_eq!(published(&s, "a").as_deref(), Some("192.168.1.1"));
    let note = &notes(&plans, "NodeAddressConflict")[0];
    assert!(note.contains("InternalIP 192.168.1.1 is an address of Node a, so the overlay keeps sending its pod traffic to 192.168.1.2"), "{note}");
    assert!(
        degraded_message(&s).contains("Node b: InternalIP 192.168.1.1 is an address of Node a")
    );
    // a is gone (replaced by b on the same machine): b may now take it.
    s.delete_node("a");
    let plans = converge(&mut s);
    assert_eq!(published(&s, "b").as_deref(), Some("192.168.1.1"));
    assert!(
        plans
            .iter()
            .flat_map(|p| &p.node_writes)
            .any(|w| w.moved.is_some())
    );
    assert_eq!(degraded_reason(&s), None);
}

#[test]
fn of_two_new_nodes_with_one_address_the_older_keeps_it() {
    let mut s = State::new();
    s.reset_nodes(vec![
        with_ip(node("young", 5), "192.168.1.1"),
        with_ip(node("old", 1), "192.168.1.1"),
    ]);
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    converge(&mut s);
    assert_eq!(published(&s, "old").as_deref(), Some("192.168.1.1"));
    assert_eq!(published(&s, "young"), None);
    assert!(degraded_message(&s).contains("Node young: InternalIP 192.168.1.1 is an address of Node old, so it stays out of the overlay"));
}

#[test]
fn public_ip_overwrites_are_checked_like_addresses_and_their_writer_is_named() {
    let mut s = State::new();
    s.reset_nodes(vec![
        with_ip(node("a", 1), "192.168.1.1"),
        with_ip(node("b", 2), "192.168.1.2"),
    ]);
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    converge(&mut s);
    let set = |s: &mut State, value: &str| {
        let mut b = s.node("b").unwrap().clone();
        b.annotations
            .insert(annotations::PUBLIC_IP_OVERWRITE.into(), value.into());
        b.overwrite_writer = Some("kubectl-annotate".into());
        s.apply_node(b);
        converge(s)
    };
    for (value, why) in [
        (
            "127.0.0.1",
            "is a loopback address (127.0.0.0/8), which no other node can reach",
        ),
        ("224.0.0.5", "is a multicast address"),
        ("10.244.9.9", "lies inside clusterCIDR 10.244.0.0/16"),
        ("192.168.1.1", "is an address of Node a"),
        ("not-an-ip", "is not an IPv4 address"),
    ] {
        let plans = set(&mut s, value);
        assert_eq!(
            published(&s, "b").as_deref(),
            Some("192.168.1.2"),
            "{value}"
        );
        let all = notes(&plans, "NodeAddressConflict");
        assert!(all.iter().any(|n| n.contains(why)), "{value}: {all:?}");
    }
    let plans = set(&mut s, "203.0.113.9");
    assert_eq!(published(&s, "b").as_deref(), Some("203.0.113.9"));
    let m = plans
        .iter()
        .flat_map(|p| &p.node_writes)
        .find_map(|w| w.moved.clone())
        .unwrap();
    assert_eq!(
        m.source,
        "public-ip-overwrite annotation, written by kubectl-annotate"
    );
    assert_eq!(m.from, "192.168.1.2");
    assert_eq!(degraded_reason(&s), None);
}

#[test]
fn a_node_that_stops_reporting_its_address_keeps_its_overlay_address() {
    let mut s = State::new();
    s.reset_nodes(vec![with_ip(node("a", 1), "192.168.1.1")]);
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    converge(&mut s);
    let mut gone = s.node("a").unwrap().clone();
    gone.internal_ip = None;
    s.apply_node(gone);
    converge(&mut s);
    assert_eq!(published(&s, "a").as_deref(), Some("192.168.1.1"));
}

#[test]
fn an_address_another_node_still_has_is_refused_even_once_unpublished() {
    // Two steps: a's overlay moves elsewhere (overwrite), but a still has
    // 192.168.1.1 as its InternalIP, so c cannot take it.
    let mut s = State::new();
    s.reset_nodes(vec![
        with_ip(node("a", 1), "192.168.1.1"),
        with_ip(node("c", 3), "192.168.1.3"),
    ]);
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    converge(&mut s);
    s.apply_node(with_ip(s.node("c").unwrap().clone(), "192.168.1.1"));
    let mut a = s.node("a").unwrap().clone();
    a.annotations.insert(
        annotations::PUBLIC_IP_OVERWRITE.into(),
        "203.0.113.1".into(),
    );
    s.apply_node(a);
    converge(&mut s);
    assert_eq!(published(&s, "a").as_deref(), Some("203.0.113.1"));
    assert_eq!(published(&s, "c").as_deref(), Some("192.168.1.3"));
    assert!(
        degraded_message(&s).contains("Node c: InternalIP 192.168.1.1 is an address of Node a")
    );
}

#[test]
fn two_nodes_that_swap_addresses_both_move() {
    let mut s = State::new();
    s.reset_nodes(vec![
        with_ip(node("a", 1), "192.168.1.1"),
        with_ip(node("b", 2), "192.168.1.2"),
    ]);
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    converge(&mut s);
    s.apply_node(with_ip(s.node("a").unwrap().clone(), "192.168.1.2"));
    s.apply_node(with_ip(s.node("b").unwrap().clone(), "192.168.1.1"));
    converge(&mut s);
    assert_eq!(published(&s, "a").as_deref(), Some("192.168.1.2"));
    assert_eq!(published(&s, "b").as_deref(), Some("192.168.1.1"));
    assert_eq!(degraded_reason(&s), None);
}

#[test]
fn a_dataplane_switch_is_announced() {
    let mut s = State::new();
    s.reset_nodes(vec![node("n0", 0)]);
    s.reset_networks(vec![network("default", "10.244.0.0/16", 24)]);
    converge(&mut s);

    let mut edited = network("default", "10.244.0.0/16", 24);
    if let Ok(spec) = &mut edited.spec {
        spec.policy.dataplane = canal_crds::PolicyDataplane::IPTables;
    }
    edited.generation = Some(2);
    s.apply_network(edited);
    let plans = converge(&mut s);
    let note = &plans[0]
        .notices
        .iter()
        .find(|n| n.reason == "ConfigApplied")
        .expect("a ConfigApplied notice")
        .note;
    assert!(note.contains("policy.dataplane Auto -> IPTables"), "{note}");
}
