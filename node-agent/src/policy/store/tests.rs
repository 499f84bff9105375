use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::time::Instant;

use canal_crds::sharding::{hash_text, slice_name};
use canal_crds::{
    CompiledPolicy, Endpoint, GroupPolicy, NodeEndpoint, NodePolicySetSpec, Peer, PeerSelector,
    PeerSetSpec, PolicyType, Rule,
};
use proptest::prelude::*;

use super::*;

fn spec_referencing(sets: &[&str]) -> NodePolicySetSpec {
    NodePolicySetSpec {
        endpoints: vec![Endpoint {
            namespace: "x".into(),
            pod: "a".into(),
            interface: "cali0123456789a".into(),
            ips: vec!["10.244.1.2".into()],
            ingress_policies: vec!["x/p".into()],
            ..Endpoint::default()
        }],
        policies: vec![CompiledPolicy {
            name: "x/p".into(),
            ingress: vec![rule_from(sets)],
            egress: vec![],
        }],
    }
}

fn rule_from(sets: &[&str]) -> Rule {
    Rule {
        peers: Some(
            sets.iter()
                .map(|s| Peer {
                    peer_set: Some(s.to_string()),
                    ip_block: None,
                })
                .collect(),
        ),
        ports: vec![],
    }
}

fn nps(generation: i64, sets: &[&str]) -> NodePolicySetView {
    NodePolicySetView {
        uid: Some("u1".into()),
        generation: Some(generation),
        spec: spec_referencing(sets).into(),
        status: None,
    }
}

fn ps(ips: &[&str]) -> PeerSetObjectSpec {
    PeerSetSpec {
        selector: PeerSelector::default(),
        member_count: ips.len() as u32,
        ips: ips.iter().map(|s| s.to_string()).collect(),
        ports: vec![],
    }
    .into()
}

/// A store with config known, every list done, the NodePolicySet
/// referencing `sets` and every set held.
fn listed(sets: &[&str]) -> PolicyStore {
    let now = Instant::now();
    let mut s = PolicyStore::new();
    s.set_config(Some(EnforcementConfig::default()), now);
    s.node_policy_set_relist_start();
    s.node_policy_set_relist_apply(nps(1, sets));
    s.relist_start(Shared::PolicyGroup);
    s.peer_set_relist_start();
    for name in sets {
        s.peer_set_relist_apply(name, ps(&["10.0.0.1"]));
    }
    s.peer_set_relist_apply("unrelated", ps(&["10.9.9.9"]));
    s.node_policy_set_relist_done(now);
    s.relist_done(Shared::PolicyGroup, now);
    s.peer_set_relist_done(now);
    s
}

#[test]
fn waits_for_config_and_every_list_then_syncs() {
    let now = Instant::now();
    let mut s = PolicyStore::new();
    assert!(matches!(s.next_step(), Step::Wait(w) if w.contains("overlay")));
    s.set_config(Some(EnforcementConfig::default()), now);
    assert!(matches!(s.next_step(), Step::Wait(w) if w.contains("NodePolicySet list")));
    s.peer_set_relist_start();
    s.peer_set_relist_apply("ps-a", ps(&["10.0.0.1"]));
    s.peer_set_relist_apply("unrelated", ps(&["10.0.0.2"]));
    assert!(s.peer_set_relist_done(now));
    assert_eq!(
        s.objects_held(Shared::PeerSet),
        2,
        "kept until the NodePolicySet is known"
    );
    assert!(matches!(s.next_step(), Step::Wait(_)));
    s.node_policy_set_relist_start();
    s.node_policy_set_relist_apply(nps(3, &["ps-a"]));
    s.node_policy_set_relist_done(now);
    assert!(matches!(s.next_step(), Step::Wait(w) if w.contains("PolicyGroup list")));
    s.relist_start(Shared::PolicyGroup);
    assert!(s.relist_done(Shared::PolicyGroup, now));
    assert_eq!(s.next_step(), Step::Sync);
    assert_eq!(
        s.inputs().peer_sets.keys().collect::<Vec<_>>(),
        ["ps-a"],
        "unreferenced sets are dropped"
    );
    assert_eq!(s.objects_held(Shared::PeerSet), 1);
    assert_eq!(s.inputs().generation, Some(3));
    assert_eq!(
        s.take_pending().keys().copied().collect::<Vec<_>>(),
        [Cause::NodePolicySet, Cause::PeerSet, Cause::Network]
    );
    assert!(s.pending().is_empty());
}

#[test]
fn status_only_updates_change_nothing() {
    let mut s = listed(&["ps-a"]);
    s.take_pending();
    let mut v = nps(1, &["ps-a"]);
    v.status = Some(NodePolicySetStatus {
        observed_generation: Some(1),
        ..NodePolicySetStatus::default()
    });
    assert!(!s.apply_node_policy_set(v, Instant::now()));
    assert!(s.pending().is_empty());
    assert_eq!(
        s.node_policy_set().unwrap().1.unwrap().observed_generation,
        Some(1),
        "the stored status is kept for the next status write"
    );
}

#[test]
fn a_newly_referenced_set_is_fetched_before_the_new_version_is_programmed() {
    let mut s = listed(&["ps-a"]);
    // The controller wrote ps-b before the NodePolicySet naming it; the
    // store dropped it then.
    assert!(!s.apply_peer_set("ps-b", ps(&["10.0.0.7"]), Instant::now()));
    assert!(!s.apply_node_policy_set(nps(2, &["ps-a", "ps-b"]), Instant::now()));
    assert_eq!(s.next_step(), Step::Sync, "generation 1 stays programmed");
    assert_eq!(s.inputs().generation, Some(1));
    assert!(
        s.waiting_on().unwrap().contains("ps-b"),
        "{:?}",
        s.waiting_on()
    );
    assert_eq!(s.take_fetches(), [(Shared::PeerSet, "ps-b".to_string())]);
    assert!(s.take_fetches().is_empty(), "one GET at a time");
    assert!(s.fetched(
        Fetched::PeerSet("ps-b".into(), Ok(Some(ps(&["10.0.0.7"])))),
        Instant::now()
    ));
    assert_eq!(s.inputs().generation, Some(2));
    assert_eq!(s.inputs().peer_sets["ps-b"].ips, ["10.0.0.7"]);
    assert_eq!(s.waiting_on(), None);
}

#[test]
fn failed_fetches_are_asked_for_again_and_absent_sets_render_empty() {
    let mut s = listed(&["ps-a"]);
    s.apply_node_policy_set(nps(2, &["ps-a", "ps-b"]), Instant::now());
    assert_eq!(s.take_fetches(), [(Shared::PeerSet, "ps-b".to_string())]);
    assert!(!s.fetched(Fetched::PeerSet("ps-b".into(), Err(())), Instant::now()));
    assert_eq!(s.take_fetches(), [(Shared::PeerSet, "ps-b".to_string())]);
    assert!(s.fetched(Fetched::PeerSet("ps-b".into(), Ok(None)), Instant::now()));
    assert_eq!(
        s.inputs().generation,
        Some(2),
        "an absent set does not block"
    );
    assert!(!s.inputs().peer_sets.contains_key("ps-b"));
    // It appears later through the watch.
    assert!(s.apply_peer_set("ps-b", ps(&["10.0.0.8"]), Instant::now()));
    assert_eq!(s.inputs().peer_sets["ps-b"].ips, ["10.0.0.8"]);
}

#[test]
fn a_watch_event_wins_over_a_get_in_flight() {
    let mut s = listed(&["ps-a"]);
    s.apply_node_policy_set(nps(2, &["ps-a", "ps-b"]), Instant::now());
    assert_eq!(s.take_fetches().len(), 1);
    assert!(s.apply_peer_set("ps-b", ps(&["10.0.0.9"]), Instant::now()));
    assert!(!s.fetched(
        Fetched::PeerSet("ps-b".into(), Ok(Some(ps(&["10.0.0.1"])))),
        Instant::now()
    ));
    assert_eq!(s.inputs().peer_sets["ps-b"].ips, ["10.0.0.9"]);
    // A delete seen while a GET is in flight also wins.
    s.apply_node_policy_set(nps(3, &["ps-a", "ps-c"]), Instant::now());
    assert_eq!(s.take_fetches(), [(Shared::PeerSet, "ps-c".to_string())]);
    assert!(s.delete_peer_set("ps-c", Instant::now()));
    assert!(!s.fetched(
        Fetched::PeerSet("ps-c".into(), Ok(Some(ps(&["10.0.0.1"])))),
        Instant::now()
    ));
    assert!(!s.inputs().peer_sets.contains_key("ps-c"));
    assert_eq!(s.inputs().generation, Some(3));
}

#[test]
fn member_changes_of_referenced_sets_only() {
    let mut s = listed(&["ps-a"]);
    s.take_pending();
    assert!(!s.apply_peer_set("unrelated", ps(&["10.1.1.1"]), Instant::now()));
    assert!(!s.delete_peer_set("unrelated", Instant::now()));
    assert!(s.pending().is_empty());
    assert!(
        !s.apply_peer_set("ps-a", ps(&["10.0.0.1"]), Instant::now()),
        "same members"
    );
    assert!(s.apply_peer_set("ps-a", ps(&["10.0.0.1", "10.0.0.2"]), Instant::now()));
    assert_eq!(
        s.pending().keys().copied().collect::<Vec<_>>(),
        [Cause::PeerSet]
    );
    assert!(s.delete_peer_set("ps-a", Instant::now()));
    assert_eq!(s.next_step(), Step::Sync);
    assert!(s.inputs().peer_sets.is_empty());
}

#[test]
fn a_deleted_node_policy_set_holds_the_kernel_unless_policy_is_disabled() {
    let mut s = listed(&["ps-a"]);
    assert!(s.delete_node_policy_set());
    assert!(matches!(s.next_step(), Step::Hold(_)));
    assert!(s.node_policy_set().is_none());
    let off = EnforcementConfig {
        enabled: false,
        ..EnforcementConfig::default()
    };
    assert!(s.set_config(Some(off), Instant::now()));
    assert_eq!(s.next_step(), Step::Sync, "disabling removes everything");
    assert!(
        s.inputs().endpoints_unknown,
        "anti-spoofing does not trust a deleted endpoint list"
    );
    assert!(!s.set_config(Some(off), Instant::now()));
    assert!(!s.set_config(None, Instant::now()));
    assert!(s.apply_node_policy_set(nps(1, &["ps-a"]), Instant::now()));
    assert!(!s.inputs().endpoints_unknown, "back again");
}

#[test]
fn a_relist_is_authoritative_and_keeps_sets_referenced_meanwhile() {
    let mut s = listed(&["ps-a"]);
    s.take_pending();
    s.peer_set_relist_start();
    s.peer_set_relist_apply("ps-a", ps(&["10.0.0.1"]));
    s.peer_set_relist_apply("ps-b", ps(&["10.0.0.5"]));
    // The NodePolicySet starts referencing ps-b while the list runs.
    s.apply_node_policy_set(nps(2, &["ps-a", "ps-b", "ps-gone"]), Instant::now());
    s.take_fetches();
    assert!(s.peer_set_relist_done(Instant::now()));
    assert_eq!(s.inputs().generation, Some(2));
    assert_eq!(s.inputs().peer_sets["ps-b"].ips, ["10.0.0.5"]);
    assert!(!s.inputs().peer_sets.contains_key("ps-gone"));
    assert_eq!(s.next_step(), Step::Sync);
    assert!(
        s.take_fetches().is_empty(),
        "the list said ps-gone does not exist"
    );
}

#[test]
fn pending_keeps_the_earliest_observation() {
    let t0 = Instant::now();
    let t1 = t0 + std::time::Duration::from_millis(5);
    let mut s = listed(&["ps-a"]);
    s.take_pending();
    s.apply_peer_set("ps-a", ps(&["10.0.0.2"]), t0);
    s.apply_peer_set("ps-a", ps(&["10.0.0.3"]), t1);
    assert_eq!(s.pending()[&Cause::PeerSet], t0);
}

// ----- sharded objects ---------------------------------------------------

fn h64<T: Hash + ?Sized>(v: &T) -> u64 {
    let mut s = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut s);
    s.finish()
}

/// A reference writer: one version of a set as its objects (members split
/// by the top `depth` bits of their hash; 0: inline).
fn write_set(
    head: &str,
    members: &BTreeSet<String>,
    depth: u8,
) -> BTreeMap<String, PeerSetObjectSpec> {
    let mut out = BTreeMap::new();
    let selector = PeerSelector {
        namespace: Some("x".into()),
        ..PeerSelector::default()
    };
    let all: Vec<String> = members.iter().cloned().collect();
    if depth == 0 {
        out.insert(
            head.to_string(),
            PeerSetObjectSpec {
                selector,
                member_count: all.len() as u32,
                hash: hash_text(h64(&all)),
                ips: all,
                ..PeerSetObjectSpec::default()
            },
        );
        return out;
    }
    let mut slices: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for m in &all {
        slices
            .entry(h64(m) >> (64 - depth))
            .or_default()
            .push(m.clone());
    }
    let mut refs = Vec::new();
    for (prefix, ips) in slices {
        let name = slice_name(head, depth, prefix);
        let hash = hash_text(h64(&ips));
        refs.push(VersionRef {
            name: name.clone(),
            hash: hash.clone(),
        });
        out.insert(
            name,
            PeerSetObjectSpec {
                member_count: ips.len() as u32,
                hash,
                ips,
                slice_of: Some(head.to_string()),
                ..PeerSetObjectSpec::default()
            },
        );
    }
    out.insert(
        head.to_string(),
        PeerSetObjectSpec {
            selector,
            member_count: all.len() as u32,
            hash: hash_text(h64(&refs)),
            slices: refs,
            ..PeerSetObjectSpec::default()
        },
    );
    out
}

/// One version of a group: `policies` (names) each allowing from `ps-s`,
/// split in two slices when `split`.
fn write_group(
    head: &str,
    policies: &BTreeSet<String>,
    split: bool,
) -> BTreeMap<String, PolicyGroupSpec> {
    let gp = |name: &String| GroupPolicy {
        name: name.clone(),
        policy_types: vec![PolicyType::Ingress],
        part: 0,
        ingress: vec![rule_from(&["ps-s"])],
        egress: vec![],
    };
    let all: Vec<GroupPolicy> = policies.iter().map(gp).collect();
    let mut out = BTreeMap::new();
    if !split {
        out.insert(
            head.to_string(),
            PolicyGroupSpec {
                namespace: "x".into(),
                hash: hash_text(h64(&all)),
                policy_count: all.len() as u32,
                policies: all,
                ..PolicyGroupSpec::default()
            },
        );
        return out;
    }
    let mut refs = Vec::new();
    for (i, chunk) in [&all[..all.len() / 2], &all[all.len() / 2..]]
        .iter()
        .enumerate()
    {
        let name = slice_name(head, 1, i as u64);
        let hash = hash_text(h64(chunk));
        refs.push(VersionRef {
            name: name.clone(),
            hash: hash.clone(),
        });
        out.insert(
            name,
            PolicyGroupSpec {
                hash,
                policies: chunk.to_vec(),
                slice_of: Some(head.to_string()),
                ..PolicyGroupSpec::default()
            },
        );
    }
    out.insert(
        head.to_string(),
        PolicyGroupSpec {
            namespace: "x".into(),
            hash: hash_text(h64(&refs)),
            policy_count: all.len() as u32,
            slices: refs,
            ..PolicyGroupSpec::default()
        },
    );
    out
}

fn node_object(group: &BTreeMap<String, PolicyGroupSpec>) -> NodePolicySetObjectSpec {
    NodePolicySetObjectSpec {
        endpoints: vec![NodeEndpoint {
            namespace: "x".into(),
            pod: "a".into(),
            interface: "cali0123456789a".into(),
            ips: vec!["10.244.1.2".into()],
            policy_groups: vec!["pg-g".into()],
            ..NodeEndpoint::default()
        }],
        policy_groups: vec![VersionRef {
            name: "pg-g".into(),
            hash: group["pg-g"].hash.clone(),
        }],
        policies: vec![],
    }
}

/// One watch event.
#[derive(Clone, Debug)]
enum Ev {
    Nps(i64, NodePolicySetObjectSpec),
    Pg(String, Option<PolicyGroupSpec>),
    Ps(String, Option<PeerSetObjectSpec>),
}

/// The writes of one version in the controller's order, per watch stream:
/// changed slices, then the head, then slices no head lists any more.
fn stream<T: Clone + PartialEq>(
    before: &BTreeMap<String, T>,
    after: &BTreeMap<String, T>,
    head: &str,
    wrap: impl Fn(String, Option<T>) -> Ev,
) -> Vec<Ev> {
    let mut out = Vec::new();
    for (n, o) in after {
        if n != head && before.get(n) != Some(o) {
            out.push(wrap(n.clone(), Some(o.clone())));
        }
    }
    if before.get(head) != after.get(head) {
        out.push(wrap(head.to_string(), after.get(head).cloned()));
    }
    for n in before.keys() {
        if !after.contains_key(n) {
            out.push(wrap(n.clone(), None));
        }
    }
    out
}

fn feed(s: &mut PolicyStore, ev: Ev) -> bool {
    let now = Instant::now();
    match ev {
        Ev::Nps(generation, spec) => s.apply_node_policy_set(
            NodePolicySetView {
                uid: Some("u1".into()),
                generation: Some(generation),
                spec,
                status: None,
            },
            now,
        ),
        Ev::Pg(n, Some(o)) => s.apply_policy_group(&n, o, now),
        Ev::Pg(n, None) => s.delete_policy_group(&n, now),
        Ev::Ps(n, Some(o)) => s.apply_peer_set(&n, o, now),
        Ev::Ps(n, None) => s.delete_peer_set(&n, now),
    }
}

fn members(spec: &PeerSetSpec) -> BTreeSet<String> {
    spec.ips.iter().cloned().collect()
}

type Version = (BTreeSet<String>, u8, BTreeSet<String>, bool);

fn version() -> impl Strategy<Value = Version> {
    (
        prop::collection::btree_set(0u16..64, 0..40).prop_map(|m| {
            m.into_iter()
                .map(|i| format!("10.1.0.{i}"))
                .collect::<BTreeSet<String>>()
        }),
        0u8..3,
        prop::collection::btree_set(0u8..12, 1..8).prop_map(|p| {
            p.into_iter()
                .map(|i| format!("x/p{i}"))
                .collect::<BTreeSet<String>>()
        }),
        any::<bool>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// The adversarial test of consistency: versions of a sharded PeerSet
    /// and of a sharded PolicyGroup are published the way the controller
    /// writes them, and the three watch streams (NodePolicySet, PolicyGroups,
    /// PeerSets) are delivered in every interleaving. After every event the
    /// programmed inputs are exactly one published version: the node's
    /// policies are those of a NodePolicySet version with its group at the
    /// hash it names, the set's members those of one head version. Never a
    /// mix. After the last event they are the last version.
    #[test]
    fn no_interleaving_of_slice_and_head_updates_yields_a_torn_view(
        versions in prop::collection::vec(version(), 2..6),
        order in prop::collection::vec(0u8..3, 200),
    ) {
        let set_objects: Vec<BTreeMap<String, PeerSetObjectSpec>> =
            versions.iter().map(|(m, d, _, _)| write_set("ps-s", m, *d)).collect();
        let group_objects: Vec<BTreeMap<String, PolicyGroupSpec>> =
            versions.iter().map(|(_, _, p, split)| write_group("pg-g", p, *split)).collect();
        // Initial state: version 0 listed.
        let now = Instant::now();
        let mut s = PolicyStore::new();
        s.set_config(Some(EnforcementConfig::default()), now);
        s.node_policy_set_relist_start();
        s.node_policy_set_relist_apply(NodePolicySetView {
            uid: Some("u1".into()),
            generation: Some(1),
            spec: node_object(&group_objects[0]),
            status: None,
        });
        s.node_policy_set_relist_done(now);
        s.relist_start(Shared::PolicyGroup);
        for (n, o) in &group_objects[0] {
            s.policy_group_relist_apply(n, o.clone());
        }
        s.relist_done(Shared::PolicyGroup, now);
        s.relist_start(Shared::PeerSet);
        for (n, o) in &set_objects[0] {
            s.peer_set_relist_apply(n, o.clone());
        }
        s.relist_done(Shared::PeerSet, now);
        prop_assert_eq!(s.next_step(), Step::Sync);

        // Streams of the later versions.
        let (mut nps_ev, mut pg_ev, mut ps_ev) = (Vec::new(), Vec::new(), Vec::new());
        for v in 1..versions.len() {
            ps_ev.extend(stream(&set_objects[v - 1], &set_objects[v], "ps-s", Ev::Ps));
            pg_ev.extend(stream(&group_objects[v - 1], &group_objects[v], "pg-g", Ev::Pg));
            nps_ev.push(Ev::Nps(v as i64 + 1, node_object(&group_objects[v])));
        }
        let policy_versions: Vec<BTreeSet<String>> =
            versions.iter().map(|(_, _, p, _)| p.clone()).collect();
        let member_versions: Vec<BTreeSet<String>> =
            versions.iter().map(|(m, _, _, _)| m.clone()).collect();
        let mut streams = [nps_ev.into_iter(), pg_ev.into_iter(), ps_ev.into_iter()];
        let mut picks = order.into_iter();
        loop {
            let live: Vec<usize> = (0..3).filter(|&i| streams[i].len() > 0).collect();
            if live.is_empty() {
                break;
            }
            let which = live[picks.next().map_or(0, |p| p as usize) % live.len()];
            let ev = streams[which].next().unwrap();
            feed(&mut s, ev);
            // GETs never needed here (every object arrives by its watch),
            // but answering them must not break anything either.
            s.take_fetches();
            let inputs = s.inputs();
            let generation = inputs.generation.unwrap_or(0) as usize;
            let names: BTreeSet<String> = inputs.spec.policies.iter().map(|p| p.name.clone()).collect();
            prop_assert_eq!(&names, &policy_versions[generation - 1],
                "policies of generation {} are those of its own group version", generation);
            let ep = &inputs.spec.endpoints[0];
            let isolating: BTreeSet<String> = ep.ingress_policies.iter().cloned().collect();
            prop_assert_eq!(&isolating, &names);
            if let Some(set) = inputs.peer_sets.get("ps-s") {
                let m = members(set);
                prop_assert!(member_versions.contains(&m), "torn PeerSet: {:?}", m);
                prop_assert_eq!(set.member_count as usize, m.len());
            } else {
                prop_assert!(false, "the set disappeared");
            }
        }
        // Everything delivered: the last version is programmed.
        let last = versions.len() - 1;
        prop_assert_eq!(s.inputs().generation, Some(last as i64 + 1));
        prop_assert_eq!(members(&s.inputs().peer_sets["ps-s"]), member_versions[last].clone());
        prop_assert_eq!(s.waiting_on(), None);
        // Only what the node needs is held: the group's and the set's
        // objects of the last version.
        prop_assert_eq!(s.objects_held(Shared::PolicyGroup), group_objects[last].len());
        prop_assert_eq!(s.objects_held(Shared::PeerSet), set_objects[last].len());
    }
}

#[test]
fn a_new_node_version_waits_for_its_group_version_and_slices() {
    let now = Instant::now();
    let v1 = write_group("pg-g", &["x/p1".to_string()].into(), false);
    let v2 = write_group(
        "pg-g",
        &["x/p1".to_string(), "x/p2".to_string(), "x/p3".to_string()].into(),
        true,
    );
    let set = write_set("ps-s", &["10.0.0.1".to_string()].into(), 0);
    let mut s = PolicyStore::new();
    s.set_config(Some(EnforcementConfig::default()), now);
    s.node_policy_set_relist_start();
    s.node_policy_set_relist_apply(NodePolicySetView {
        uid: Some("u1".into()),
        generation: Some(1),
        spec: node_object(&v1),
        status: None,
    });
    s.node_policy_set_relist_done(now);
    s.relist_start(Shared::PolicyGroup);
    s.relist_done(Shared::PolicyGroup, now);
    s.relist_start(Shared::PeerSet);
    s.peer_set_relist_apply("ps-s", set["ps-s"].clone());
    s.relist_done(Shared::PeerSet, now);
    // Listed, but the group is missing: nothing consistent to program.
    assert!(
        matches!(s.next_step(), Step::Wait(w) if w.contains("pg-g")),
        "{:?}",
        s.next_step()
    );
    // The group arrives; the set its rules reference was dropped when the
    // PeerSet list came (nothing needed it then): it is fetched first.
    assert!(!s.apply_policy_group("pg-g", v1["pg-g"].clone(), now));
    assert_eq!(s.take_fetches(), [(Shared::PeerSet, "ps-s".to_string())]);
    assert!(s.fetched(
        Fetched::PeerSet("ps-s".into(), Ok(Some(set["ps-s"].clone()))),
        now
    ));
    assert_eq!(s.next_step(), Step::Sync);
    assert_eq!(s.inputs().spec.policies.len(), 1);
    // Generation 2 names the sliced group version: the head first, then
    // one slice, then the other; only the last completes it.
    assert!(!feed(&mut s, Ev::Nps(2, node_object(&v2))));
    assert!(!s.apply_policy_group("pg-g", v2["pg-g"].clone(), now));
    assert!(!s.apply_policy_group("pg-g-s0", v2["pg-g-s0"].clone(), now));
    assert_eq!(s.inputs().generation, Some(1));
    assert!(
        s.waiting_on().unwrap().contains("pg-g-s1"),
        "{:?}",
        s.waiting_on()
    );
    assert!(s.apply_policy_group("pg-g-s1", v2["pg-g-s1"].clone(), now));
    assert_eq!(s.inputs().generation, Some(2));
    assert_eq!(s.inputs().spec.policies.len(), 3);
}
