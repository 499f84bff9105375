//! The incremental nftables render ([`super::cache`]) against a render from
//! scratch, over random sequences of changes: PeerSet members added and
//! removed (also CIDRs, which turn a set into an interval set under
//! another name, and a PeerSet that disappears), pods replaced, policies'
//! rules and ports changed (ipBlocks with excepts, local and PeerSet named
//! ports), isolation changed, families, logging and the host action
//! toggled. After every change the cached render must equal the fresh one.
//! Also: how port lists render (one shared named set).

use std::collections::{BTreeMap, BTreeSet};

use canal_crds::{
    CompiledPolicy, Endpoint, EndpointToHostAction, IpBlock, NamedPort, NodePolicySetSpec, Peer,
    PeerSetSpec, PortMatch, PortMember, Protocol, Rule,
};
use proptest::prelude::*;

use crate::policy::model::{
    EnforcementConfig, Families, ModelCache, PolicyInputs, build, build_with,
};

use super::render::{NftCache, render, render_with};
use super::ruleset::NftSet;

const SETS: usize = 4;
const POLICIES: usize = 5;
const PODS: usize = 4;

fn policy_name(p: usize) -> String {
    format!("ns/p{p}")
}

fn policy(p: usize, variant: u8) -> CompiledPolicy {
    let mut peers = vec![
        Peer {
            peer_set: Some(format!("ps-{}", p % SETS)),
            ip_block: None,
        },
        Peer {
            peer_set: Some(format!("ps-{}", (p + usize::from(variant)) % SETS)),
            ip_block: None,
        },
    ];
    if variant % 2 == 1 {
        peers.push(Peer {
            peer_set: None,
            ip_block: Some(IpBlock {
                cidr: "192.0.2.0/24".into(),
                except: vec![format!("192.0.2.{}/30", 4 * (variant % 8))],
            }),
        });
    }
    let port = |protocol, port, named_port: Option<&str>, set: Option<String>| PortMatch {
        protocol,
        port,
        end_port: None,
        named_port: named_port.map(str::to_string),
        named_port_set: set,
    };
    let mut ports = vec![port(
        Protocol::TCP,
        Some(80 + u16::from(variant)),
        None,
        None,
    )];
    if variant % 4 == 2 {
        // A port list: a shared named set (two variants share one list).
        ports.push(port(Protocol::TCP, Some(443), None, None));
        ports.push(PortMatch {
            end_port: Some(5100 + u16::from(variant % 8)),
            ..port(Protocol::TCP, Some(5000), None, None)
        });
    }
    if variant.is_multiple_of(3) {
        ports.push(port(Protocol::TCP, None, Some("web"), None));
    }
    if variant % 3 == 1 {
        ports.push(port(
            Protocol::TCP,
            None,
            Some("db"),
            Some(format!("ps-{}", p % SETS)),
        ));
    }
    let rule = Rule {
        peers: Some(peers),
        ports,
    };
    CompiledPolicy {
        name: policy_name(p),
        ingress: vec![rule.clone()],
        egress: if variant.is_multiple_of(2) {
            vec![rule]
        } else {
            vec![]
        },
    }
}

fn endpoint(slot: usize, generation: u32, isolation: u8) -> Endpoint {
    let pick = |k: usize| policy_name((slot + k + usize::from(isolation)) % POLICIES);
    Endpoint {
        namespace: "ns".into(),
        pod: format!("pod-{slot}-{generation}"),
        interface: format!("cali{slot:02}{generation:07x}"),
        ips: vec![
            format!("10.244.1.{}", 2 + slot * 16 + (generation as usize % 16)),
            format!("fd00::{:x}", 2 + slot * 16 + (generation as usize % 16)),
        ],
        named_ports: vec![NamedPort {
            name: "web".into(),
            protocol: Protocol::TCP,
            port: 8000 + (generation % 5) as u16,
        }],
        ingress_policies: (0..usize::from(isolation % 3)).map(pick).collect(),
        egress_policies: if isolation.is_multiple_of(2) {
            vec![pick(3)]
        } else {
            vec![]
        },
    }
}

fn start() -> PolicyInputs {
    PolicyInputs {
        config: EnforcementConfig::default(),
        generation: Some(1),
        spec: NodePolicySetSpec {
            endpoints: (0..PODS).map(|i| endpoint(i, 0, i as u8)).collect(),
            policies: (0..POLICIES).map(|p| policy(p, 0)).collect(),
        },
        peer_sets: (0..SETS)
            .map(|i| {
                let ips = (0..3).map(|j| format!("10.{i}.0.{j}")).collect::<Vec<_>>();
                let spec = PeerSetSpec {
                    member_count: ips.len() as u32,
                    ips,
                    ports: vec![PortMember {
                        ip: format!("10.{i}.0.1"),
                        protocol: Protocol::TCP,
                        port: 5432,
                    }],
                    ..PeerSetSpec::default()
                };
                (format!("ps-{i}"), spec)
            })
            .collect::<BTreeMap<_, _>>(),
        endpoints_unknown: false,
    }
}

#[derive(Clone, Debug)]
enum Change {
    MemberAdded(usize, u8, bool),
    MemberRemoved(usize),
    PeerSetGone(usize),
    PeerSetBack(usize),
    PodReplaced(usize, u8),
    PolicyChanged(usize, u8),
    Families,
    LogDenied,
    HostAction,
    Disabled,
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => (0..SETS, any::<u8>(), any::<bool>()).prop_map(|(s, n, cidr)| Change::MemberAdded(s, n, cidr)),
        3 => (0..SETS).prop_map(Change::MemberRemoved),
        1 => (0..SETS).prop_map(Change::PeerSetGone),
        1 => (0..SETS).prop_map(Change::PeerSetBack),
        3 => (0..PODS, any::<u8>()).prop_map(|(s, i)| Change::PodReplaced(s, i)),
        3 => (0..POLICIES, 0u8..12).prop_map(|(p, v)| Change::PolicyChanged(p, v)),
        1 => Just(Change::Families),
        1 => Just(Change::LogDenied),
        1 => Just(Change::HostAction),
        1 => Just(Change::Disabled),
    ]
}

fn apply(inp: &mut PolicyInputs, c: &Change, step: u32) {
    match *c {
        Change::MemberAdded(s, n, cidr) => {
            if let Some(ps) = inp.peer_sets.get_mut(&format!("ps-{s}")) {
                ps.ips.push(if cidr {
                    format!("10.{s}.{n}.0/24")
                } else {
                    format!("10.{s}.1.{n}")
                });
            }
        }
        Change::MemberRemoved(s) => {
            if let Some(ps) = inp.peer_sets.get_mut(&format!("ps-{s}")) {
                ps.ips.pop();
            }
        }
        Change::PeerSetGone(s) => {
            inp.peer_sets.remove(&format!("ps-{s}"));
        }
        Change::PeerSetBack(s) => {
            inp.peer_sets
                .entry(format!("ps-{s}"))
                .or_insert_with(|| PeerSetSpec {
                    ips: vec![format!("10.{s}.9.9")],
                    ..PeerSetSpec::default()
                });
        }
        Change::PodReplaced(slot, isolation) => {
            inp.spec.endpoints[slot] = endpoint(slot, step, isolation);
        }
        Change::PolicyChanged(p, v) => inp.spec.policies[p] = policy(p, v),
        Change::Families => {
            let f = &mut inp.config.families;
            *f = if *f == Families::DUAL {
                Families::V4
            } else {
                Families::DUAL
            };
        }
        Change::LogDenied => inp.config.log_denied = !inp.config.log_denied,
        Change::HostAction => {
            inp.config.endpoint_to_host = match inp.config.endpoint_to_host {
                EndpointToHostAction::Accept => EndpointToHostAction::Drop,
                _ => EndpointToHostAction::Accept,
            }
        }
        Change::Disabled => inp.config.enabled = !inp.config.enabled,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn incremental_render_equals_full_render(changes in proptest::collection::vec(change(), 1..40)) {
        let mut inp = start();
        let (mut model_cache, mut cache) = (ModelCache::default(), NftCache::default());
        prop_assert_eq!(render_with(&build_with(&inp, &mut model_cache), &mut cache), render(&build(&inp)));
        for (step, c) in changes.iter().enumerate() {
            apply(&mut inp, c, step as u32 + 1);
            let incremental = render_with(&build_with(&inp, &mut model_cache), &mut cache);
            let full = render(&build(&inp));
            prop_assert_eq!(incremental, full, "after change {} {:?}", step, c);
        }
    }
}

#[test]
fn a_port_list_is_one_named_set_every_rule_with_that_list_shares() {
    let port = |port, end_port| PortMatch {
        protocol: Protocol::TCP,
        port: Some(port),
        end_port,
        named_port: None,
        named_port_set: None,
    };
    let policy = |name: &str, ports: Vec<PortMatch>| CompiledPolicy {
        name: name.into(),
        ingress: vec![Rule {
            peers: Some(vec![Peer {
                peer_set: None,
                ip_block: Some(IpBlock {
                    cidr: "10.1.0.0/16".into(),
                    except: vec![],
                }),
            }]),
            ports,
        }],
        egress: vec![],
    };
    let list = || vec![port(80, None), port(443, None), port(5000, Some(5100))];
    let inputs = PolicyInputs {
        generation: Some(1),
        spec: NodePolicySetSpec {
            endpoints: vec![Endpoint {
                namespace: "ns".into(),
                pod: "a".into(),
                interface: "cali0".into(),
                ips: vec!["10.244.1.2".into()],
                named_ports: vec![],
                ingress_policies: vec!["ns/one".into(), "ns/two".into(), "ns/three".into()],
                egress_policies: vec![],
            }],
            policies: vec![
                policy("ns/one", list()),
                policy("ns/two", list()),
                policy("ns/three", vec![port(80, None), port(8080, None)]),
            ],
        },
        ..PolicyInputs::default()
    };
    let r = render(&build(&inputs));
    let port_sets: Vec<(&String, &NftSet)> = r
        .sets
        .iter()
        .filter(|(n, _)| n.starts_with("pt-"))
        .collect();
    assert_eq!(port_sets.len(), 2, "{port_sets:?}");
    let ranged = port_sets
        .iter()
        .find(|(_, s)| s.elements.contains("5000-5100"))
        .expect("the list with a range");
    assert!(ranged.1.interval && ranged.1.key_type == "inet_service");
    let want: BTreeSet<String> = ["80", "443", "5000-5100"].map(String::from).into();
    assert_eq!(*ranged.1.elements, want);
    let plain = port_sets.iter().find(|(n, _)| n != &ranged.0).unwrap();
    assert!(!plain.1.interval);
    let script = r.script();
    assert!(
        !script.contains("dport {"),
        "no anonymous port sets:\n{script}"
    );
    let uses = script
        .lines()
        .filter(|l| l.contains(&format!("tcp dport @{}", ranged.0)))
        .count();
    assert_eq!(uses, 2, "both policies' rules use the one set:\n{script}");
}
