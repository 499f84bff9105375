//! Table tests of the hardening layers over rendered rulesets (walked by
//! `sim.rs`): anti-spoofing before any policy, and failing closed when
//! someone else empties or bypasses canal's filter chains. The kernel and
//! lab tests (tests/policy_drift.rs, e2e hardening_*) check the same with
//! real packets.

use canal_crds::Protocol::{TCP, UDP};

use super::names::{self, FORWARD_CHAIN, GUARD_FORWARD_CHAIN, INPUT_CHAIN};
use super::render::render;
use super::ruleset::{Chain, Ruleset, Table};
use super::semantics_tests::{
    A, B, C, REMOTE, a, b, block, c, check, ep, fwd, inputs, peer_set, policy, ps, remote, rule,
    to_host,
};
use super::sim::{Ct, Packet, Verdict::*};

/// x/b (interface B) admits only x/a (10.244.1.2) and the ipBlock
/// 192.0.2.0/24; c is denied.
fn b_admits_a_and_a_block() -> Ruleset {
    let mut inp = inputs(
        vec![
            ep(A, "10.244.1.2", &[], &[]),
            ep(B, "10.244.1.3", &["x/b"], &[]),
            ep(C, "10.244.1.4", &[], &[]),
        ],
        vec![policy(
            "x/b",
            vec![rule(
                Some(vec![peer_set("ps-a"), block("192.0.2.0/24", &[])]),
                vec![],
            )],
            vec![],
        )],
    );
    inp.peer_sets
        .insert("ps-a".into(), ps(&["10.244.1.2", "10.244.2.7"]));
    render(&inp).ruleset
}

/// `p` with another source address; `routed`: whether that source routes
/// back out of the interface it came from (the reverse-path check).
fn forged(mut p: Packet, src: &str, routed: bool) -> Packet {
    p.src = src.parse().unwrap();
    p.rpf_ok = routed;
    p
}

#[test]
fn forged_sources_are_dropped_before_policy() {
    let r = b_admits_a_and_a_block();
    check(
        &r,
        &[
            ("a -> b (allowed)", fwd(a(), b(), TCP, 80), Accept),
            ("c -> b (denied)", fwd(c(), b(), TCP, 80), Drop),
            (
                "c as a (same node)",
                forged(fwd(c(), b(), TCP, 80), "10.244.1.2", false),
                Drop,
            ),
            (
                "c as a remote allowed pod",
                forged(fwd(c(), b(), UDP, 80), "10.244.2.7", false),
                Drop,
            ),
            (
                "c as an ipBlock address",
                forged(fwd(c(), b(), TCP, 80), "192.0.2.9", false),
                Drop,
            ),
            // A route to c's interface that canal did not make (stale, by
            // hand): the reverse-path check passes, the source match does not.
            (
                "c as a, mis-routed",
                forged(fwd(c(), b(), TCP, 80), "10.244.1.2", true),
                Drop,
            ),
            (
                "c to the host as a",
                forged(to_host(C, "10.244.1.4", 22), "10.244.1.2", true),
                Drop,
            ),
        ],
    );
}

#[test]
fn unknown_interfaces_and_pods_without_ips() {
    let mut inp = inputs(vec![ep(A, "10.244.1.2", &[], &[])], vec![]);
    // A pod the CNI has just wired: its IP is not in the NodePolicySet yet.
    inp.spec.endpoints.push(ep(B, "10.244.1.3", &[], &[]));
    inp.spec.endpoints[1].ips.clear();
    let r = render(&inp).ruleset;
    let mut stranger = fwd(a(), remote(REMOTE), TCP, 80);
    stranger.iif = Some("cali0000000dead".into());
    let stranger_reply = established(stranger.clone());
    let forged_stranger = forged(stranger.clone(), "10.244.1.3", false);
    check(
        &r,
        &[
            ("a -> remote", fwd(a(), remote(REMOTE), TCP, 80), Accept),
            ("unknown interface, new (policy drops it)", stranger, Drop),
            ("unknown interface, a reply", stranger_reply, Accept),
            ("unknown interface, forged", forged_stranger, Drop),
            (
                "b, no IP known yet, routed source",
                fwd(b(), remote(REMOTE), TCP, 80),
                Accept,
            ),
            (
                "b, no IP known yet, forged source",
                forged(fwd(b(), remote(REMOTE), TCP, 80), "10.244.1.2", false),
                Drop,
            ),
        ],
    );
}

#[test]
fn an_unknown_endpoint_list_keeps_the_reverse_path_check() {
    let mut inp = inputs(vec![], vec![]);
    inp.config.enabled = false;
    inp.endpoints_unknown = true;
    let r = render(&inp).ruleset;
    assert!(r.endpoints.is_empty());
    check(
        &r,
        &[
            ("routed source", fwd(a(), remote(REMOTE), TCP, 80), Continue),
            (
                "forged source",
                forged(fwd(a(), remote(REMOTE), TCP, 80), "10.244.1.3", false),
                Drop,
            ),
        ],
    );
}

/// `r` with chain `name` emptied (`iptables -F <name>`).
fn flushed(r: &Ruleset, name: &str) -> Ruleset {
    let mut r = r.clone();
    r.chains.insert(name.to_string(), Chain::default());
    r
}

/// `r` after `iptables -F` (every rule of the filter table gone).
fn filter_flushed(r: &Ruleset) -> Ruleset {
    let mut r = r.clone();
    for (name, chain) in r.chains.iter_mut() {
        if names::chain_table(name) == Some(Table::Filter) {
            *chain = Chain::default();
        }
    }
    r.hooks.retain(|h| h.table != Table::Filter);
    r
}

fn established(mut p: Packet) -> Packet {
    p.ct = Ct::Established;
    p
}

#[test]
fn a_flushed_endpoint_chain_fails_closed() {
    let r = b_admits_a_and_a_block();
    for chain in [
        names::to_endpoint_chain(B),
        names::from_endpoint_chain(C),
        names::policy_ingress_chain("x/b"),
    ] {
        let r = flushed(&r, &chain);
        check(
            &r,
            &[
                ("c -> b (denied)", fwd(c(), b(), TCP, 80), Drop),
                (
                    "remote -> b (denied)",
                    fwd(remote(REMOTE), b(), UDP, 80),
                    Drop,
                ),
                ("c -> b reply", established(fwd(c(), b(), TCP, 80)), Accept),
            ],
        );
    }
}

#[test]
fn a_flushed_filter_table_or_a_deleted_hook_fails_closed() {
    let r = b_admits_a_and_a_block();
    let mut unhooked = r.clone();
    unhooked
        .hooks
        .retain(|h| !(h.table == Table::Filter && h.builtin == "FORWARD"));
    // Someone inserts an ACCEPT above canal's hook.
    let mut bypassed = r.clone();
    let accept = super::frame::hook(Table::Filter, "FORWARD", "ACCEPT", "");
    bypassed.hooks.insert(0, accept);
    for (what, r) in [
        ("iptables -F", filter_flushed(&r)),
        ("FORWARD hook deleted", unhooked),
        ("ACCEPT above the hook", bypassed),
    ] {
        let new_denied = [
            ("c -> b", fwd(c(), b(), TCP, 80)),
            ("remote -> b", fwd(remote(REMOTE), b(), UDP, 80)),
            (
                "a -> b (allowed, new: dropped until repaired)",
                fwd(a(), b(), TCP, 80),
            ),
        ];
        for (label, p) in new_denied {
            assert_eq!(super::sim::walk(&r, &p), Drop, "{what}: {label}");
        }
        // Established connections carry on; traffic that is not a pod's is untouched.
        assert_ne!(
            super::sim::walk(&r, &established(fwd(a(), b(), TCP, 80))),
            Drop,
            "{what}: an established connection"
        );
        assert_ne!(
            super::sim::walk(&r, &fwd(remote(REMOTE), remote("10.0.0.1"), TCP, 80)),
            Drop,
            "{what}: host traffic"
        );
    }
    // Pod to host without CANAL-INPUT: the guard's INPUT chain drops it.
    let mut no_input = r.clone();
    no_input.chains.insert(INPUT_CHAIN.into(), Chain::default());
    assert_eq!(
        super::sim::walk(&no_input, &to_host(A, "10.244.1.2", 22)),
        Drop
    );
    assert_eq!(super::sim::walk(&r, &to_host(A, "10.244.1.2", 22)), Accept);
}

#[test]
fn without_the_guard_the_filter_verdicts_still_hold() {
    // The guard is defence in depth: with it gone, the filter table alone
    // enforces, flushed endpoint chains included.
    let mut r = b_admits_a_and_a_block();
    r.chains.remove(GUARD_FORWARD_CHAIN);
    r.hooks.retain(|h| h.table != Table::Security);
    let r = flushed(&r, &names::to_endpoint_chain(B));
    check(
        &r,
        &[
            ("c -> b", fwd(c(), b(), TCP, 80), Drop),
            ("a -> remote", fwd(a(), remote(REMOTE), TCP, 80), Accept),
        ],
    );
    assert!(r.chains.contains_key(FORWARD_CHAIN));
}
