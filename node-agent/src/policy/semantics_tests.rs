//! Table tests of NetworkPolicy semantics over rendered rulesets, walked by
//! the packet simulator in `sim.rs`.

use std::collections::BTreeMap;

use canal_crds::{
    CompiledPolicy, Endpoint, EndpointToHostAction, IpBlock, NamedPort, NodePolicySetSpec, Peer,
    PeerSelector, PeerSetSpec, PortMatch, PortMember, Protocol, Rule,
};

use super::render::{EnforcementConfig, PolicyInputs, Warning, render};
use super::ruleset::Ruleset;
use super::sim::{Ct, Packet, Verdict, walk};

pub(super) const A: &str = "cali00000000aaa"; // 10.244.1.2
pub(super) const B: &str = "cali00000000bbb"; // 10.244.1.3
pub(super) const C: &str = "cali00000000ccc"; // 10.244.1.4
pub(super) const REMOTE: &str = "10.244.2.9";

pub(super) fn ep(iface: &str, ip: &str, ingress: &[&str], egress: &[&str]) -> Endpoint {
    Endpoint {
        namespace: "x".into(),
        pod: iface[4..].to_string(),
        interface: iface.into(),
        ips: vec![ip.into()],
        named_ports: vec![],
        ingress_policies: ingress.iter().map(|s| s.to_string()).collect(),
        egress_policies: egress.iter().map(|s| s.to_string()).collect(),
    }
}

pub(super) fn policy(name: &str, ingress: Vec<Rule>, egress: Vec<Rule>) -> CompiledPolicy {
    CompiledPolicy {
        name: name.into(),
        ingress,
        egress,
    }
}

pub(super) fn rule(peers: Option<Vec<Peer>>, ports: Vec<PortMatch>) -> Rule {
    Rule { peers, ports }
}

pub(super) fn peer_set(name: &str) -> Peer {
    Peer {
        peer_set: Some(name.into()),
        ip_block: None,
    }
}

pub(super) fn block(cidr: &str, except: &[&str]) -> Peer {
    Peer {
        peer_set: None,
        ip_block: Some(IpBlock {
            cidr: cidr.into(),
            except: except.iter().map(|s| s.to_string()).collect(),
        }),
    }
}

pub(super) fn port(protocol: Protocol, port: u16) -> PortMatch {
    PortMatch {
        protocol,
        port: Some(port),
        end_port: None,
        named_port: None,
        named_port_set: None,
    }
}

fn range(protocol: Protocol, port: u16, end: u16) -> PortMatch {
    PortMatch {
        end_port: Some(end),
        ..self::port(protocol, port)
    }
}

fn named(protocol: Protocol, name: &str, set: Option<&str>) -> PortMatch {
    PortMatch {
        protocol,
        port: None,
        end_port: None,
        named_port: Some(name.into()),
        named_port_set: set.map(String::from),
    }
}

pub(super) fn ps(ips: &[&str]) -> PeerSetSpec {
    PeerSetSpec {
        selector: PeerSelector::default(),
        member_count: ips.len() as u32,
        ips: ips.iter().map(|s| s.to_string()).collect(),
        ports: vec![],
    }
}

pub(super) fn inputs(endpoints: Vec<Endpoint>, policies: Vec<CompiledPolicy>) -> PolicyInputs {
    PolicyInputs {
        config: EnforcementConfig::default(),
        generation: Some(1),
        spec: NodePolicySetSpec {
            endpoints,
            policies,
        },
        peer_sets: BTreeMap::new(),
        endpoints_unknown: false,
    }
}

/// A new connection from `src` to `dst` (either may be a local iface or a remote IP).
pub(super) fn fwd(
    src: (&str, Option<&str>),
    dst: (&str, Option<&str>),
    proto: Protocol,
    dport: u16,
) -> Packet {
    Packet {
        hook: "FORWARD",
        iif: Some(src.1.unwrap_or("flannel.1").to_string()),
        oif: Some(dst.1.unwrap_or("flannel.1").to_string()),
        src: src.0.parse().unwrap(),
        dst: dst.0.parse().unwrap(),
        proto,
        dport,
        ct: Ct::New,
        rpf_ok: true,
    }
}

pub(super) fn a() -> (&'static str, Option<&'static str>) {
    ("10.244.1.2", Some(A))
}
pub(super) fn b() -> (&'static str, Option<&'static str>) {
    ("10.244.1.3", Some(B))
}
pub(super) fn c() -> (&'static str, Option<&'static str>) {
    ("10.244.1.4", Some(C))
}
pub(super) fn remote(ip: &'static str) -> (&'static str, Option<&'static str>) {
    (ip, None)
}

use Protocol::{SCTP, TCP, UDP};
use Verdict::{Accept, Continue, Drop};

pub(super) fn check(r: &Ruleset, cases: &[(&str, Packet, Verdict)]) {
    let mut failures = Vec::new();
    for (what, p, want) in cases {
        let got = walk(r, p);
        if got != *want {
            failures.push(format!(
                "{what}: expected {want:?}, observed {got:?} ({p:?})"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn pods_not_isolated_accept_everything() {
    let r = render(&inputs(
        vec![ep(A, "10.244.1.2", &[], &[]), ep(B, "10.244.1.3", &[], &[])],
        vec![],
    ))
    .ruleset;
    check(
        &r,
        &[
            ("remote -> a", fwd(remote(REMOTE), a(), TCP, 80), Accept),
            ("a -> b udp", fwd(a(), b(), UDP, 53), Accept),
            ("a -> remote", fwd(a(), remote(REMOTE), SCTP, 9), Accept),
            (
                "not pod traffic",
                fwd(remote(REMOTE), remote("10.0.0.1"), TCP, 80),
                Continue,
            ),
        ],
    );
}

#[test]
fn deny_all_ingress_blocks_new_but_not_replies() {
    let r = render(&inputs(
        vec![
            ep(A, "10.244.1.2", &["x/deny"], &[]),
            ep(B, "10.244.1.3", &[], &[]),
        ],
        vec![policy("x/deny", vec![], vec![])],
    ))
    .ruleset;
    let mut reply = fwd(remote(REMOTE), a(), TCP, 80);
    reply.ct = Ct::Established;
    let mut invalid = fwd(b(), a(), TCP, 80);
    invalid.ct = Ct::Invalid;
    // Flows cut by `policy.established: Cut` stop in both directions, also
    // where nothing isolates the pod (the mark alone decides).
    let mut cut_in = fwd(remote(REMOTE), a(), TCP, 80);
    cut_in.ct = Ct::Cut;
    let mut cut_out = fwd(a(), remote(REMOTE), TCP, 40000);
    cut_out.ct = Ct::Cut;
    let mut cut_b = fwd(b(), remote(REMOTE), UDP, 53);
    cut_b.ct = Ct::Cut;
    check(
        &r,
        &[
            ("cut -> a", cut_in, Drop),
            ("cut a ->", cut_out, Drop),
            ("cut b ->", cut_b, Drop),
            ("remote -> a tcp", fwd(remote(REMOTE), a(), TCP, 80), Drop),
            ("remote -> a udp", fwd(remote(REMOTE), a(), UDP, 80), Drop),
            ("b -> a same node", fwd(b(), a(), TCP, 80), Drop),
            ("established -> a", reply, Accept),
            ("invalid -> a", invalid, Drop),
            (
                "a -> b (a egress not isolated)",
                fwd(a(), b(), TCP, 80),
                Accept,
            ),
            ("remote -> b", fwd(remote(REMOTE), b(), TCP, 80), Accept),
        ],
    );
}

#[test]
fn allow_from_peer_set_on_ports() {
    let mut inp = inputs(
        vec![
            ep(A, "10.244.1.2", &["x/web"], &[]),
            ep(B, "10.244.1.3", &[], &[]),
        ],
        vec![policy(
            "x/web",
            vec![rule(
                Some(vec![peer_set("ps-client")]),
                vec![port(TCP, 80), range(UDP, 1000, 2000)],
            )],
            vec![],
        )],
    );
    inp.peer_sets
        .insert("ps-client".into(), ps(&["10.244.1.3", "10.244.2.9/32"]));
    let r = render(&inp).ruleset;
    check(
        &r,
        &[
            ("b -> a tcp/80", fwd(b(), a(), TCP, 80), Accept),
            (
                "remote member -> a tcp/80",
                fwd(remote(REMOTE), a(), TCP, 80),
                Accept,
            ),
            ("b -> a tcp/81", fwd(b(), a(), TCP, 81), Drop),
            ("b -> a udp/80", fwd(b(), a(), UDP, 80), Drop),
            ("b -> a udp/1500", fwd(b(), a(), UDP, 1500), Accept),
            ("b -> a udp/2001", fwd(b(), a(), UDP, 2001), Drop),
            (
                "non-member -> a tcp/80",
                fwd(remote("10.244.3.3"), a(), TCP, 80),
                Drop,
            ),
        ],
    );
}

#[test]
fn missing_peer_set_fails_closed() {
    let out = render(&inputs(
        vec![ep(A, "10.244.1.2", &["x/web"], &[])],
        vec![policy(
            "x/web",
            vec![rule(Some(vec![peer_set("ps-late")]), vec![])],
            vec![],
        )],
    ));
    assert_eq!(
        out.warnings,
        vec![Warning::MissingPeerSet {
            peer_set: "ps-late".into()
        }]
    );
    check(
        &out.ruleset,
        &[("anyone -> a", fwd(remote(REMOTE), a(), TCP, 80), Drop)],
    );
}

#[test]
fn ip_block_with_except() {
    let r = render(&inputs(
        vec![ep(A, "10.244.1.2", &["x/blk"], &["x/blk"])],
        vec![policy(
            "x/blk",
            vec![rule(
                Some(vec![block(
                    "10.0.0.0/8",
                    &["10.1.0.0/16", "10.1.2.0/24", "192.168.0.0/16"],
                )]),
                vec![],
            )],
            vec![rule(
                Some(vec![
                    block("0.0.0.0/0", &["10.0.0.0/8"]),
                    block("10.9.9.9/32", &[]),
                ]),
                vec![port(TCP, 443)],
            )],
        )],
    ))
    .ruleset;
    check(
        &r,
        &[
            ("in 10.2.3.4", fwd(remote("10.2.3.4"), a(), TCP, 80), Accept),
            (
                "in 10.1.5.5 (except)",
                fwd(remote("10.1.5.5"), a(), TCP, 80),
                Drop,
            ),
            (
                "in 10.1.2.3 (nested except)",
                fwd(remote("10.1.2.3"), a(), TCP, 80),
                Drop,
            ),
            (
                "in 11.0.0.1 (outside)",
                fwd(remote("11.0.0.1"), a(), TCP, 80),
                Drop,
            ),
            (
                "out 8.8.8.8:443",
                fwd(a(), remote("8.8.8.8"), TCP, 443),
                Accept,
            ),
            (
                "out 200.1.1.1:443",
                fwd(a(), remote("200.1.1.1"), TCP, 443),
                Accept,
            ),
            (
                "out 10.2.2.2:443 (except)",
                fwd(a(), remote("10.2.2.2"), TCP, 443),
                Drop,
            ),
            (
                "out 10.9.9.9:443 (second block)",
                fwd(a(), remote("10.9.9.9"), TCP, 443),
                Accept,
            ),
            ("out 8.8.8.8:80", fwd(a(), remote("8.8.8.8"), TCP, 80), Drop),
        ],
    );
}

#[test]
fn ingress_named_port_resolves_per_destination_pod() {
    let mut pa = ep(A, "10.244.1.2", &["x/np"], &[]);
    pa.named_ports = vec![NamedPort {
        name: "http".into(),
        protocol: TCP,
        port: 8080,
    }];
    let mut pb = ep(B, "10.244.1.3", &["x/np"], &[]);
    pb.named_ports = vec![
        NamedPort {
            name: "http".into(),
            protocol: TCP,
            port: 9090,
        },
        NamedPort {
            name: "dns".into(),
            protocol: UDP,
            port: 53,
        },
    ];
    let r = render(&inputs(
        vec![pa, pb],
        vec![policy(
            "x/np",
            vec![rule(
                None,
                vec![
                    named(TCP, "http", None),
                    named(UDP, "dns", None),
                    port(TCP, 22),
                ],
            )],
            vec![],
        )],
    ))
    .ruleset;
    check(
        &r,
        &[
            ("-> a:8080", fwd(remote(REMOTE), a(), TCP, 8080), Accept),
            ("-> a:9090", fwd(remote(REMOTE), a(), TCP, 9090), Drop),
            ("-> b:9090", fwd(remote(REMOTE), b(), TCP, 9090), Accept),
            ("-> b:8080", fwd(remote(REMOTE), b(), TCP, 8080), Drop),
            ("-> b udp/53", fwd(remote(REMOTE), b(), UDP, 53), Accept),
            (
                "-> a udp/53 (a has no dns)",
                fwd(remote(REMOTE), a(), UDP, 53),
                Drop,
            ),
            ("-> a tcp/22", fwd(remote(REMOTE), a(), TCP, 22), Accept),
            (
                "-> a udp/8080 (wrong protocol)",
                fwd(remote(REMOTE), a(), UDP, 8080),
                Drop,
            ),
        ],
    );
}

#[test]
fn egress_named_port_uses_peer_port_set() {
    let mut inp = inputs(
        vec![ep(A, "10.244.1.2", &[], &["x/out"])],
        vec![policy(
            "x/out",
            vec![],
            vec![
                rule(
                    Some(vec![peer_set("ps-db")]),
                    vec![named(TCP, "db", Some("ps-db-port"))],
                ),
                rule(None, vec![named(TCP, "metrics", None)]),
            ],
        )],
    );
    inp.peer_sets
        .insert("ps-db".into(), ps(&["10.244.2.5", "10.244.2.6"]));
    let mut ports = ps(&[]);
    ports.ports = vec![
        PortMember {
            ip: "10.244.2.5".into(),
            protocol: TCP,
            port: 5432,
        },
        PortMember {
            ip: "10.244.2.6".into(),
            protocol: TCP,
            port: 3306,
        },
    ];
    inp.peer_sets.insert("ps-db-port".into(), ports);
    let out = render(&inp);
    assert_eq!(
        out.warnings,
        vec![Warning::MissingNamedPortSet {
            policy: "x/out".into(),
            port: "metrics".into()
        }]
    );
    check(
        &out.ruleset,
        &[
            (
                "-> .5:5432",
                fwd(a(), remote("10.244.2.5"), TCP, 5432),
                Accept,
            ),
            (
                "-> .6:3306",
                fwd(a(), remote("10.244.2.6"), TCP, 3306),
                Accept,
            ),
            (
                "-> .5:3306",
                fwd(a(), remote("10.244.2.5"), TCP, 3306),
                Drop,
            ),
            (
                "-> .7:5432",
                fwd(a(), remote("10.244.2.7"), TCP, 5432),
                Drop,
            ),
        ],
    );
}

#[test]
fn policies_union_and_same_node_passes_both_directions() {
    let mut inp = inputs(
        vec![
            ep(A, "10.244.1.2", &["x/p80", "x/p81"], &[]),
            ep(B, "10.244.1.3", &[], &["x/egress-a"]),
            ep(C, "10.244.1.4", &[], &["x/deny"]),
        ],
        vec![
            policy("x/p80", vec![rule(None, vec![port(TCP, 80)])], vec![]),
            policy("x/p81", vec![rule(None, vec![port(TCP, 81)])], vec![]),
            policy(
                "x/egress-a",
                vec![],
                vec![rule(Some(vec![peer_set("ps-a")]), vec![])],
            ),
            policy("x/deny", vec![], vec![]),
        ],
    );
    inp.peer_sets.insert("ps-a".into(), ps(&["10.244.1.2"]));
    let r = render(&inp).ruleset;
    check(
        &r,
        &[
            (
                "b -> a:80 (egress ok, ingress p80)",
                fwd(b(), a(), TCP, 80),
                Accept,
            ),
            ("b -> a:81 (ingress p81)", fwd(b(), a(), TCP, 81), Accept),
            (
                "b -> a:82 (no ingress policy allows)",
                fwd(b(), a(), TCP, 82),
                Drop,
            ),
            ("b -> c (egress only to a)", fwd(b(), c(), TCP, 80), Drop),
            ("c -> a:80 (c egress deny)", fwd(c(), a(), TCP, 80), Drop),
            ("remote -> a:81", fwd(remote(REMOTE), a(), TCP, 81), Accept),
        ],
    );
}

#[test]
fn unknown_interfaces_are_dropped_other_traffic_untouched() {
    let r = render(&inputs(vec![ep(A, "10.244.1.2", &[], &[])], vec![])).ruleset;
    let unknown = ("10.244.1.77", Some("cali9999999999z"));
    check(
        &r,
        &[
            (
                "remote -> unknown pod",
                fwd(remote(REMOTE), unknown, TCP, 80),
                Drop,
            ),
            (
                "unknown pod -> remote",
                fwd(unknown, remote(REMOTE), UDP, 53),
                Drop,
            ),
            ("unknown pod -> a", fwd(unknown, a(), TCP, 80), Drop),
            (
                "host traffic",
                fwd(remote("192.168.0.1"), remote("10.0.0.1"), TCP, 80),
                Continue,
            ),
        ],
    );
    // Empty NodePolicySet (enabled): every pod interface is unknown.
    let r = render(&inputs(vec![], vec![])).ruleset;
    check(
        &r,
        &[("remote -> a", fwd(remote(REMOTE), a(), TCP, 80), Drop)],
    );
}

pub(super) fn to_host(iface: &str, src: &str, dport: u16) -> Packet {
    Packet {
        hook: "INPUT",
        iif: Some(iface.into()),
        oif: None,
        src: src.parse().unwrap(),
        dst: "10.244.1.0".parse().unwrap(),
        proto: TCP,
        dport,
        ct: Ct::New,
        rpf_ok: true,
    }
}

#[test]
fn pod_to_host_applies_egress_then_default_action() {
    for (action, open) in [
        (EndpointToHostAction::Accept, Accept),
        (EndpointToHostAction::Drop, Drop),
        (EndpointToHostAction::Return, Continue),
    ] {
        let mut inp = inputs(
            vec![
                ep(A, "10.244.1.2", &[], &[]),
                ep(B, "10.244.1.3", &[], &["x/deny"]),
            ],
            vec![policy("x/deny", vec![], vec![])],
        );
        inp.config.endpoint_to_host = action;
        let r = render(&inp).ruleset;
        let mut reply = to_host(B, "10.244.1.3", 10250);
        reply.ct = Ct::Established;
        check(
            &r,
            &[
                ("a -> host", to_host(A, "10.244.1.2", 10250), open),
                (
                    "b (egress deny) -> host",
                    to_host(B, "10.244.1.3", 10250),
                    Drop,
                ),
                ("reply b -> host (kubelet probe)", reply, Accept),
                (
                    "unknown -> host",
                    to_host("cali5555555555x", "10.244.1.9", 22),
                    Drop,
                ),
                ("not a pod", to_host("eth0", "192.168.0.5", 22), Continue),
            ],
        );
    }
}

#[test]
fn disabled_keeps_only_antispoofing() {
    let mut inp = inputs(
        vec![ep(A, "10.244.1.2", &["x/deny"], &[])],
        vec![policy("x/deny", vec![], vec![])],
    );
    inp.config.enabled = false;
    let out = render(&inp);
    assert!(
        out.ruleset
            .hooks
            .iter()
            .all(|h| h.table == super::ruleset::Table::Raw),
        "{:?}",
        out.ruleset.hooks
    );
    assert_eq!(
        out.ruleset.chains.keys().collect::<Vec<_>>(),
        vec![super::names::PREROUTING_CHAIN]
    );
    let mut spoofed = fwd(a(), remote(REMOTE), TCP, 80);
    spoofed.src = "10.244.1.3".parse().unwrap();
    spoofed.rpf_ok = false;
    check(
        &out.ruleset,
        &[
            ("remote -> a", fwd(remote(REMOTE), a(), TCP, 80), Continue),
            ("a -> remote", fwd(a(), remote(REMOTE), TCP, 80), Continue),
            ("a spoofing b", spoofed, Drop),
        ],
    );
}

#[test]
fn malformed_inputs_match_nothing() {
    let out = render(&inputs(
        vec![
            ep(A, "10.244.1.2", &["x/missing", "x/odd"], &[]),
            ep("eth0", "10.244.1.5", &[], &[]),
            ep(A, "10.244.1.6", &[], &[]),
        ],
        vec![policy(
            "x/odd",
            vec![
                rule(Some(vec![]), vec![]),
                rule(Some(vec![block("not-a-cidr", &[])]), vec![]),
                rule(None, vec![range(TCP, 90, 80)]),
                rule(
                    Some(vec![Peer {
                        peer_set: None,
                        ip_block: None,
                    }]),
                    vec![],
                ),
                rule(Some(vec![block("fd00::/8", &[])]), vec![]),
                rule(Some(vec![block("10.0.0.0/8", &["10.0.0.0/8"])]), vec![]),
            ],
            vec![],
        )],
    ));
    let cats: Vec<&str> = out.warnings.iter().map(|w| w.category()).collect();
    assert_eq!(
        cats,
        vec![
            "invalid_interface",
            "duplicate_interface",
            "unknown_policy",
            "invalid_address",
            "invalid_peer",
            "invalid_port"
        ]
    );
    check(
        &out.ruleset,
        &[
            ("-> a", fwd(remote("10.1.1.1"), a(), TCP, 85), Drop),
            ("-> a", fwd(remote(REMOTE), a(), UDP, 85), Drop),
        ],
    );
}

#[test]
fn sctp_and_many_ports_render_as_multiport_chunks() {
    let ports: Vec<PortMatch> = (1..=20).map(|i| port(SCTP, 1000 + i * 2)).collect();
    let r = render(&inputs(
        vec![ep(A, "10.244.1.2", &["x/sctp"], &[])],
        vec![policy("x/sctp", vec![rule(None, ports)], vec![])],
    ))
    .ruleset;
    let chain = &r.chains[&super::names::policy_ingress_chain("x/sctp")];
    assert_eq!(chain.rules.len(), 2, "20 ports need two multiport rules");
    assert!(
        chain
            .rules
            .iter()
            .all(|r| r.spec.starts_with("-p sctp -m multiport --dports "))
    );
    check(
        &r,
        &[
            ("sctp 1040", fwd(remote(REMOTE), a(), SCTP, 1040), Accept),
            ("sctp 1002", fwd(remote(REMOTE), a(), SCTP, 1002), Accept),
            ("sctp 1003", fwd(remote(REMOTE), a(), SCTP, 1003), Drop),
            ("tcp 1040", fwd(remote(REMOTE), a(), TCP, 1040), Drop),
        ],
    );
}

#[test]
fn rendering_is_deterministic_and_names_fit() {
    let mut inp = inputs(
        vec![
            ep(A, "10.244.1.2", &["x/web"], &["x/web"]),
            ep(B, "10.244.1.3", &[], &[]),
        ],
        vec![policy(
            "x/web",
            vec![rule(
                Some(vec![
                    peer_set("ps-1"),
                    block("10.0.0.0/8", &["10.1.0.0/16"]),
                ]),
                vec![port(TCP, 80)],
            )],
            vec![rule(None, vec![named(TCP, "db", Some("ps-2"))])],
        )],
    );
    inp.peer_sets.insert("ps-1".into(), ps(&["10.244.1.3"]));
    inp.peer_sets.insert("ps-2".into(), ps(&[]));
    assert_eq!(
        super::render::referenced_peer_sets(&inp.spec)
            .into_iter()
            .collect::<Vec<_>>(),
        vec!["ps-1", "ps-2"]
    );
    let one = render(&inp);
    let two = render(&inp.clone());
    assert_eq!(one, two);
    // A cache kept between renders changes nothing in the output, also after a PeerSet changes.
    let mut cache = super::render::RenderCache::default();
    assert_eq!(super::render::render_with(&inp, &mut cache), one);
    assert_eq!(super::render::render_with(&inp, &mut cache), one);
    let mut changed = inp.clone();
    changed
        .peer_sets
        .insert("ps-1".into(), ps(&["10.244.1.3", "10.244.9.9", "bogus"]));
    let fresh = render(&changed);
    assert_eq!(super::render::render_with(&changed, &mut cache), fresh);
    assert_eq!(
        super::render::render_with(&changed, &mut cache),
        fresh,
        "cached warnings re-emitted"
    );
    assert_eq!(fresh.warnings.len(), 1);
    changed.peer_sets.remove("ps-1");
    assert_eq!(
        super::render::render_with(&changed, &mut cache),
        render(&changed)
    );
    for name in one.ruleset.chains.keys() {
        assert!(name.len() <= super::names::MAX_CHAIN_LEN, "{name}");
    }
    for name in one.ruleset.sets.keys() {
        assert!(name.len() <= super::names::MAX_SET_LEN, "{name}");
    }
}
