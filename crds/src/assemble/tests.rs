use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use proptest::prelude::*;

use super::*;
use crate::node_policy_set::{NodeEndpoint, Peer, Rule};
use crate::peer_set::PeerSelector;
use crate::policy_group::PolicyType;
use crate::sharding::{hash_text, slice_name};

fn h64<T: Hash + ?Sized>(v: &T) -> u64 {
    let mut s = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut s);
    s.finish()
}

/// A reference writer: the objects of one version of a set split by the top
/// `depth` bits of each member's hash (depth 0: inline). Slice hashes are
/// content hashes, so equal slices of two versions are interchangeable.
fn write_set(head: &str, members: &[String], depth: u8) -> BTreeMap<String, PeerSetObjectSpec> {
    let mut out = BTreeMap::new();
    let selector = PeerSelector {
        namespace: Some("x".into()),
        ..PeerSelector::default()
    };
    let mut sorted = members.to_vec();
    sorted.sort();
    if depth == 0 {
        out.insert(
            head.to_string(),
            PeerSetObjectSpec {
                selector,
                member_count: sorted.len() as u32,
                hash: hash_text(h64(&sorted)),
                ips: sorted,
                ..PeerSetObjectSpec::default()
            },
        );
        return out;
    }
    let mut slices: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for m in sorted.iter() {
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
            member_count: members.len() as u32,
            hash: hash_text(h64(&refs)),
            slices: refs,
            ..PeerSetObjectSpec::default()
        },
    );
    out
}

fn members(spec: &PeerSetSpec) -> Vec<String> {
    let mut m = spec.ips.clone();
    m.sort();
    m
}

#[test]
fn inline_and_sharded_sets_assemble_to_the_same_members() {
    let all: Vec<String> = (0..50).map(|i| format!("10.0.0.{i}")).collect();
    for depth in [0, 1, 3] {
        let objs = write_set("ps-a", &all, depth);
        let spec = assemble_peer_set("ps-a", &objs["ps-a"], |n| objs.get(n)).unwrap();
        let mut want = all.clone();
        want.sort();
        assert_eq!(members(&spec), want, "depth {depth}");
        assert_eq!(spec.member_count, 50);
        assert_eq!(spec.selector.namespace.as_deref(), Some("x"));
    }
}

#[test]
fn a_missing_or_stale_slice_is_a_gap_not_a_partial_set() {
    let v1: Vec<String> = (0..40).map(|i| format!("10.0.1.{i}")).collect();
    let mut v2 = v1.clone();
    v2.push("10.0.2.1".into());
    let old = write_set("ps-a", &v1, 2);
    let new = write_set("ps-a", &v2, 2);
    // The new head with the old slices: the slice that changed is stale.
    let mut held = old.clone();
    held.insert("ps-a".into(), new["ps-a"].clone());
    let gaps = assemble_peer_set("ps-a", &held["ps-a"], |n| held.get(n)).unwrap_err();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert!(matches!(&gaps[0], Gap::Stale { .. }));
    // A slice gone.
    let mut held = new.clone();
    let victim = new["ps-a"].slices[0].name.clone();
    held.remove(&victim);
    let gaps = assemble_peer_set("ps-a", &held["ps-a"], |n| held.get(n)).unwrap_err();
    assert_eq!(
        gaps,
        vec![Gap::Missing {
            kind: "PeerSet",
            name: victim
        }]
    );
    // A slice that claims another head.
    let mut held = new.clone();
    let name = new["ps-a"].slices[0].name.clone();
    held.get_mut(&name).unwrap().slice_of = Some("ps-b".into());
    assert!(matches!(
        &assemble_peer_set("ps-a", &held["ps-a"], |n| held.get(n)).unwrap_err()[0],
        Gap::Invalid { .. }
    ));
    // A head whose count disagrees with its slices.
    let mut held = new.clone();
    held.get_mut("ps-a").unwrap().member_count += 1;
    assert!(matches!(
        &assemble_peer_set("ps-a", &held["ps-a"], |n| held.get(n)).unwrap_err()[0],
        Gap::Invalid { .. }
    ));
}

proptest! {
    /// Torn views are impossible: whichever version of each object a reader
    /// holds (any head version, any mix of slice versions, some missing),
    /// the assembled set is a gap or exactly the members of the head's
    /// version.
    #[test]
    fn any_mix_of_versions_assembles_to_a_published_version_or_nothing(
        versions in prop::collection::vec(
            (prop::collection::btree_set(0u16..300, 0..120), 0u8..4),
            2..6,
        ),
        head_pick in any::<prop::sample::Index>(),
        picks in prop::collection::vec(any::<prop::sample::Index>(), 64),
        drops in prop::collection::vec(any::<bool>(), 64),
    ) {
        let versions: Vec<(Vec<String>, BTreeMap<String, PeerSetObjectSpec>)> = versions
            .into_iter()
            .map(|(m, depth)| {
                let m: Vec<String> = m.into_iter().map(|i| format!("10.1.{}.{}", i / 250, i % 250)).collect();
                let objs = write_set("ps-t", &m, depth);
                (m, objs)
            })
            .collect();
        let mut names: Vec<&String> = versions.iter().flat_map(|(_, o)| o.keys()).collect();
        names.sort();
        names.dedup();
        let head_version = head_pick.index(versions.len());
        let mut held: BTreeMap<String, PeerSetObjectSpec> = BTreeMap::new();
        for (i, name) in names.iter().enumerate() {
            if name.as_str() == "ps-t" {
                continue;
            }
            if drops[i % drops.len()] {
                continue;
            }
            let having: Vec<&PeerSetObjectSpec> =
                versions.iter().filter_map(|(_, o)| o.get(*name)).collect();
            let pick = picks[i % picks.len()].index(having.len());
            held.insert((*name).clone(), having[pick].clone());
        }
        let head = versions[head_version].1["ps-t"].clone();
        if let Ok(spec) = assemble_peer_set("ps-t", &head, |n| held.get(n)) {
            let mut want = versions[head_version].0.clone();
            want.sort();
            prop_assert_eq!(members(&spec), want);
        }
        // And with every slice of its own version, it always assembles.
        let own = &versions[head_version].1;
        prop_assert!(assemble_peer_set("ps-t", &head, |n| own.get(n)).is_ok());
    }
}

fn rule_from(set: &str) -> Rule {
    Rule {
        peers: Some(vec![Peer {
            peer_set: Some(set.into()),
            ip_block: None,
        }]),
        ports: vec![],
    }
}

fn group(hash: &str, policies: Vec<GroupPolicy>) -> PolicyGroupSpec {
    PolicyGroupSpec {
        namespace: "x".into(),
        hash: hash.into(),
        policy_count: policies.len() as u32,
        policies,
        ..PolicyGroupSpec::default()
    }
}

fn gp(name: &str, types: &[PolicyType], part: u32, ingress: Vec<Rule>) -> GroupPolicy {
    GroupPolicy {
        name: name.into(),
        policy_types: types.to_vec(),
        part,
        ingress,
        egress: vec![],
    }
}

fn endpoint(pod: &str, groups: &[&str]) -> NodeEndpoint {
    NodeEndpoint {
        namespace: "x".into(),
        pod: pod.into(),
        interface: format!("cali{pod}"),
        ips: vec!["10.0.0.1".into()],
        policy_groups: groups.iter().map(|g| g.to_string()).collect(),
        ..NodeEndpoint::default()
    }
}

#[test]
fn a_node_assembles_from_its_groups_with_parts_merged_and_isolation_per_endpoint() {
    use PolicyType::{Egress, Ingress};
    let mut groups = BTreeMap::new();
    // pg-all: a deny-all egress policy and a policy split in two parts over
    // two slices.
    groups.insert(
        "pg-all".to_string(),
        PolicyGroupSpec {
            namespace: "x".into(),
            hash: "h-all".into(),
            policy_count: 2,
            slices: vec![
                VersionRef {
                    name: "pg-all-s0".into(),
                    hash: "s0".into(),
                },
                VersionRef {
                    name: "pg-all-s1".into(),
                    hash: "s1".into(),
                },
            ],
            ..PolicyGroupSpec::default()
        },
    );
    let mut s0 = group(
        "s0",
        vec![
            gp("x/big", &[Ingress], 1, vec![rule_from("ps-2")]),
            gp("x/deny-egress", &[Egress], 0, vec![]),
        ],
    );
    s0.slice_of = Some("pg-all".into());
    let mut s1 = group(
        "s1",
        vec![gp("x/big", &[Ingress], 0, vec![rule_from("ps-1")])],
    );
    s1.slice_of = Some("pg-all".into());
    groups.insert("pg-all-s0".into(), s0);
    groups.insert("pg-all-s1".into(), s1);
    groups.insert(
        "pg-web".into(),
        group("h-web", vec![gp("x/web", &[Ingress], 0, vec![])]),
    );
    let nps = NodePolicySetObjectSpec {
        endpoints: vec![
            endpoint("a", &["pg-all", "pg-web"]),
            endpoint("b", &["pg-all"]),
            endpoint("c", &[]),
        ],
        policy_groups: vec![
            VersionRef {
                name: "pg-all".into(),
                hash: "h-all".into(),
            },
            VersionRef {
                name: "pg-web".into(),
                hash: "h-web".into(),
            },
        ],
        policies: vec![],
    };
    let view = assemble_node("n1", &nps, |n| groups.get(n)).unwrap();
    let names: Vec<&str> = view.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["x/big", "x/deny-egress", "x/web"]);
    assert_eq!(
        view.policies[0].ingress,
        vec![rule_from("ps-1"), rule_from("ps-2")],
        "parts merged in part order"
    );
    let a = &view.endpoints[0];
    assert_eq!(a.ingress_policies, ["x/big", "x/web"]);
    assert_eq!(a.egress_policies, ["x/deny-egress"]);
    assert_eq!(view.endpoints[1].ingress_policies, ["x/big"]);
    assert!(view.endpoints[2].ingress_policies.is_empty());
    assert_eq!(
        referenced_peer_sets(&view).into_iter().collect::<Vec<_>>(),
        ["ps-1", "ps-2"]
    );
    // Stale group head, stale slice, unlisted group: all gaps.
    let mut stale = groups.clone();
    stale.get_mut("pg-web").unwrap().hash = "other".into();
    assert!(matches!(
        assemble_node("n1", &nps, |n| stale.get(n)).unwrap_err()[0],
        Gap::Stale { .. }
    ));
    let mut stale = groups.clone();
    stale.get_mut("pg-all-s1").unwrap().hash = "other".into();
    assert!(matches!(
        assemble_node("n1", &nps, |n| stale.get(n)).unwrap_err()[0],
        Gap::Stale { .. }
    ));
    let mut unlisted = nps.clone();
    unlisted.endpoints.push(endpoint("d", &["pg-other"]));
    assert!(matches!(
        assemble_node("n1", &unlisted, |n| groups.get(n)).unwrap_err()[0],
        Gap::Invalid { .. }
    ));
}

#[test]
fn inline_objects_written_by_hand_assemble_as_written() {
    let logical = NodePolicySetSpec {
        endpoints: vec![Endpoint {
            namespace: "x".into(),
            pod: "a".into(),
            interface: "cali0123456789a".into(),
            ips: vec!["10.0.0.1".into()],
            ingress_policies: vec!["x/p".into()],
            ..Endpoint::default()
        }],
        policies: vec![CompiledPolicy {
            name: "x/p".into(),
            ingress: vec![rule_from("ps-1")],
            egress: vec![],
        }],
    };
    let nps = NodePolicySetObjectSpec::from(logical.clone());
    let none: BTreeMap<String, PolicyGroupSpec> = BTreeMap::new();
    assert_eq!(assemble_node("n1", &nps, |n| none.get(n)).unwrap(), logical);
    let sets: BTreeMap<String, PeerSetObjectSpec> = BTreeMap::from([(
        "ps-1".to_string(),
        PeerSetObjectSpec::from(PeerSetSpec {
            selector: PeerSelector::default(),
            member_count: 1,
            ips: vec!["10.0.0.9".into()],
            ports: vec![],
        }),
    )]);
    let view = assemble_view("n1", &nps, &none, &sets).unwrap();
    assert_eq!(view.peer_sets["ps-1"].ips, ["10.0.0.9"]);
    let gaps = assemble_view("n1", &nps, &none, &BTreeMap::new()).unwrap_err();
    assert_eq!(
        gaps,
        vec![Gap::Missing {
            kind: "PeerSet",
            name: "ps-1".into()
        }]
    );
}

#[test]
fn objects_round_trip_through_json_with_api_version_and_kind() {
    let obj = crate::PeerSet::new(
        "ps-1",
        PeerSetSpec {
            selector: PeerSelector::default(),
            member_count: 1,
            ips: vec!["10.0.0.9".into()],
            ports: vec![],
        },
    );
    let json = serde_json::to_value(&obj).unwrap();
    assert_eq!(json["apiVersion"], "canal.dev/v1alpha1");
    assert_eq!(json["kind"], "PeerSet");
    assert_eq!(json["spec"]["ips"][0], "10.0.0.9");
    assert!(json.get("status").is_none());
    let back: crate::PeerSet = serde_json::from_value(json).unwrap();
    assert_eq!(back, obj);
}
