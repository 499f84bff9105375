//! The state machine with more than one family: one subnet per family per
//! Node in the cluster's order, adoption and conflicts per family, the
//! live-change rule per family, and flannel's IPv6 annotations.

use super::*;
use canal_crds::annotations;
use canal_crds::condition::{READY, find};
use k8s_openapi::jiff::Timestamp;

fn now() -> Time {
    Time(Timestamp::from_second(1_000).unwrap())
}

fn node(name: &str, age: i64, i: u8) -> NodeView {
    NodeView {
        name: name.into(),
        uid: Some(format!("uid-{name}")),
        created: Some(Timestamp::from_second(age).unwrap()),
        internal_ip: Some(std::net::Ipv4Addr::new(192, 168, 0, i)),
        internal_ipv6: Some(format!("fd00:1::{i}").parse().unwrap()),
        addresses_v6: vec![format!("fd00:1::{i}").parse().unwrap()],
        ..Default::default()
    }
}

fn network(cidrs: &[&str]) -> NetworkObject {
    NetworkObject {
        name: "default".into(),
        uid: Some("uid-default".into()),
        generation: Some(1),
        spec: Ok(CanalNetworkSpec::with_cluster_cidrs(cidrs)),
        status: Some(CanalNetworkStatus::default()),
    }
}

fn converge(s: &mut State) -> Vec<Plan> {
    let mut plans = Vec::new();
    for _ in 0..10 {
        let p = s.plan(now(), 1_000, &HashSet::new());
        let done = p.node_writes.is_empty() && p.status_writes.is_empty();
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
        plans.push(p);
        if done {
            return plans;
        }
    }
    panic!("did not converge");
}

fn status(s: &State) -> CanalNetworkStatus {
    s.networks["default"].written.clone().unwrap()
}

fn reasons(plans: &[Plan]) -> Vec<&'static str> {
    plans
        .iter()
        .flat_map(|p| p.notices.iter().map(|n| n.reason))
        .collect()
}

#[test]
fn every_node_gets_one_subnet_per_family_in_the_clusters_order() {
    for cidrs in [
        &["10.244.0.0/16", "fd00:10:244::/56"][..],
        &["fd00:10:244::/56", "10.244.0.0/16"][..],
        &["fd00:10:244::/56"][..],
    ] {
        let mut s = State::new();
        s.reset_nodes(
            (1..=4)
                .map(|i| node(&format!("n{i}"), i.into(), i))
                .collect(),
        );
        s.reset_networks(vec![network(cidrs)]);
        converge(&mut s);
        let mut seen = BTreeSet::new();
        for i in 1..=4 {
            let v = s.node(&format!("n{i}")).unwrap();
            assert_eq!(v.pod_cidrs.len(), cidrs.len(), "{cidrs:?}");
            assert_eq!(v.pod_cidr.as_deref(), Some(v.pod_cidrs[0].as_str()));
            for (subnet, cluster) in v.pod_cidrs.iter().zip(cidrs) {
                let subnet: IpNet = subnet.parse().unwrap();
                let cluster: IpNet = cluster.parse().unwrap();
                assert!(cluster.contains(&subnet), "{subnet} in {cluster}");
                assert!(seen.insert(subnet), "{subnet} handed out twice");
            }
            let v6 = cidrs.iter().any(|c| c.contains(':'));
            let v4 = cidrs.iter().any(|c| !c.contains(':'));
            assert_eq!(v.annotations.contains_key(annotations::BACKEND_V6_DATA), v6);
            assert_eq!(
                v.annotations.get(annotations::PUBLIC_IPV6).cloned(),
                v6.then(|| format!("fd00:1::{i}"))
            );
            assert_eq!(v.annotations.contains_key(annotations::BACKEND_DATA), v4);
            assert_eq!(v.annotations.contains_key(annotations::PUBLIC_IP), v4);
        }
        let st = status(&s);
        assert_eq!(st.active_cluster_cidrs, cidrs);
        assert_eq!(st.family_subnets.len(), cidrs.len());
        assert!(st.family_subnets.iter().all(|f| f.allocated == 4));
        assert_eq!(
            st.active_node_subnet_length_v6,
            cidrs.iter().any(|c| c.contains(':')).then_some(64)
        );
        assert_eq!(
            find(&st.conditions, READY).unwrap().status,
            "True",
            "{cidrs:?}"
        );
        // Nothing more to do on a resync.
        s.mark_all_dirty();
        let p = s.plan(now(), 1_000, &HashSet::new());
        assert!(p.node_writes.is_empty(), "{cidrs:?}");
    }
}

#[test]
fn adopts_per_family_and_reports_a_missing_family_without_touching_the_node() {
    let mut s = State::new();
    let mut both = node("both", 1, 1);
    both.pod_cidr = Some("10.244.7.0/24".into());
    both.pod_cidrs = vec!["10.244.7.0/24".into(), "fd00:10:244:7::/64".into()];
    let mut old = node("old", 2, 2);
    old.pod_cidr = Some("10.244.8.0/24".into());
    old.pod_cidrs = vec!["10.244.8.0/24".into()];
    // Its IPv6 /64 is taken by `both`: a conflict, the Node is left alone.
    let mut clash = node("clash", 3, 3);
    clash.pod_cidr = Some("10.244.9.0/24".into());
    clash.pod_cidrs = vec!["10.244.9.0/24".into(), "fd00:10:244:7::/64".into()];
    s.reset_nodes(vec![both, old, clash, node("new", 4, 4)]);
    s.reset_networks(vec![network(&["10.244.0.0/16", "fd00:10:244::/56"])]);
    let plans = converge(&mut s);
    let v = s.node("both").unwrap();
    assert_eq!(v.pod_cidrs, ["10.244.7.0/24", "fd00:10:244:7::/64"]);
    assert!(v.annotations.contains_key(annotations::BACKEND_V6_DATA));
    // IPv4 only, kept verbatim: published in IPv4 only.
    let v = s.node("old").unwrap();
    assert_eq!(v.pod_cidrs, ["10.244.8.0/24"]);
    assert!(v.annotations.contains_key(annotations::BACKEND_DATA));
    assert!(!v.annotations.contains_key(annotations::BACKEND_V6_DATA));
    assert!(!v.annotations.contains_key(annotations::PUBLIC_IPV6));
    // The clash gets nothing at all.
    let v = s.node("clash").unwrap();
    assert!(!v.annotations.contains_key(annotations::KUBE_SUBNET_MANAGER));
    // The new Node never gets the adopted /64s.
    let v = s.node("new").unwrap();
    assert_eq!(v.pod_cidrs.len(), 2);
    assert_ne!(v.pod_cidrs[1], "fd00:10:244:7::/64");
    let r = reasons(&plans);
    assert!(
        r.contains(&"PodCIDRConflict") && r.contains(&"PodCIDRFamilyMissing"),
        "{r:?}"
    );
    let st = status(&s);
    let degraded = find(&st.conditions, canal_crds::condition::DEGRADED).unwrap();
    assert!(degraded.message.contains("old"), "{}", degraded.message);
    assert!(degraded.message.contains("clash"), "{}", degraded.message);
    assert_eq!(s.gap_count(), 1);
}

#[test]
fn ipv6_is_added_live_and_each_family_changes_only_while_unallocated() {
    let mut s = State::new();
    s.reset_nodes(vec![node("a", 1, 1)]);
    s.reset_networks(vec![network(&["10.244.0.0/16"])]);
    converge(&mut s);
    assert_eq!(s.node("a").unwrap().pod_cidrs.len(), 1);
    // Add IPv6 live: `a` keeps its IPv4-only podCIDRs (reported), a new
    // Node gets both.
    s.apply_network(network(&["10.244.0.0/16", "fd00:10:244::/56"]));
    s.apply_node(node("b", 2, 2));
    let plans = converge(&mut s);
    assert!(reasons(&plans).contains(&"AddressPlanApplied"));
    assert_eq!(s.node("a").unwrap().pod_cidrs.len(), 1);
    assert_eq!(s.node("b").unwrap().pod_cidrs.len(), 2);
    assert_eq!(s.allocators().len(), 2);
    // Changing the IPv6 range now that `b` holds a /64: refused, IPv6 in
    // force unchanged; IPv4 too.
    s.apply_network(network(&["10.244.0.0/16", "fd00:99::/56"]));
    converge(&mut s);
    let st = status(&s);
    assert_eq!(
        st.active_cluster_cidrs,
        ["10.244.0.0/16", "fd00:10:244::/56"]
    );
    assert_eq!(
        status::reason(&st),
        Some(status::LIVE_CHANGE_REFUSED),
        "{:?}",
        st.conditions
    );
    let msg = &find(&st.conditions, READY).unwrap().message;
    assert!(
        msg.contains("fd00:99::/56") && msg.contains("nodeSubnetLengthV6"),
        "{msg}"
    );
    // Delete `b`: no /64 allocated any more, the change applies by itself.
    s.delete_node("b");
    converge(&mut s);
    assert_eq!(
        status(&s).active_cluster_cidrs,
        ["10.244.0.0/16", "fd00:99::/56"]
    );
}

#[test]
fn exhaustion_of_one_family_allocates_no_family() {
    let mut s = State::new();
    s.reset_nodes(vec![node("a", 1, 1), node("b", 2, 2)]);
    let mut net = network(&["10.244.0.0/16", "fd00:10:244::/63"]);
    if let Ok(spec) = &mut net.spec {
        spec.node_subnet_length_v6 = 64;
    }
    s.reset_networks(vec![net]);
    // Two /64s: both Nodes fit; a third waits with no IPv4 subnet either.
    converge(&mut s);
    s.apply_node(node("c", 3, 3));
    let plans = converge(&mut s);
    assert!(reasons(&plans).contains(&"SubnetExhausted"));
    assert_eq!(s.node("c").unwrap().pod_cidr, None);
    assert_eq!(
        s.allocators()[0].allocated(),
        2,
        "no IPv4 subnet held for c"
    );
    // A Node goes: c gets both.
    s.delete_node("a");
    converge(&mut s);
    assert_eq!(s.node("c").unwrap().pod_cidrs.len(), 2);
}

#[test]
fn an_ipv6_overlay_address_inside_the_range_or_of_another_node_is_refused() {
    let mut s = State::new();
    let a = node("a", 1, 1);
    let mut b = node("b", 2, 2);
    // b reports a's IPv6 address.
    b.internal_ipv6 = a.internal_ipv6;
    b.addresses_v6 = a.addresses_v6.clone();
    let mut c = node("c", 3, 3);
    c.internal_ipv6 = Some("fd00:10:244:5::1".parse().unwrap());
    c.addresses_v6 = vec![c.internal_ipv6.unwrap()];
    s.reset_nodes(vec![a, b, c]);
    s.reset_networks(vec![network(&["10.244.0.0/16", "fd00:10:244::/56"])]);
    converge(&mut s);
    let ann = |n: &str| {
        s.node(n)
            .unwrap()
            .annotations
            .get(annotations::PUBLIC_IPV6)
            .cloned()
    };
    assert_eq!(ann("a").as_deref(), Some("fd00:1::1"));
    assert_eq!(ann("b"), None, "never onto another Node's address");
    assert_eq!(ann("c"), None, "never into the cluster range");
    // c's /64 holding its address is never handed out.
    for n in ["a", "b", "c"] {
        let v6 = &s.node(n).unwrap().pod_cidrs[1];
        assert_ne!(v6, "fd00:10:244:5::/64", "{n}");
    }
    let msg = find(&status(&s).conditions, READY).unwrap().message.clone();
    assert!(
        msg.contains("Node a") && msg.contains("inside clusterCIDR fd00:10:244::/56"),
        "{msg}"
    );
}
