//! The fixed chains around the per-pod ones: the dispatch chains hooked from
//! filter FORWARD and INPUT, and the fail-closed guard in the `security`
//! table (pure).
//!
//! Verdict marks make every layer fail closed. A pod's egress chain sets
//! [`EGRESS_MARK`] when its policy allows the packet (a pod that no policy
//! isolates: always), its ingress chain [`INGRESS_MARK`]. `CANAL-FORWARD`
//! clears both on entry and accepts pod traffic only with the marks its
//! direction needs, so a flushed or half-written endpoint chain drops
//! instead of passing. The guard runs after the whole filter table (the
//! `security` table's hooks have a later priority) and drops every new
//! connection from or to a pod that lacks its marks: when `iptables -F`
//! empties the filter table, or someone deletes canal's hook in FORWARD or
//! INPUT, or inserts an ACCEPT above it, denied traffic stays denied until
//! the agent has repaired the table (established connections, which policy
//! admitted before, carry on). Host-to-pod traffic (OUTPUT) is never
//! policed, so the guard has no OUTPUT hook.

use canal_crds::EndpointToHostAction;

use super::antispoof::ICMPV6_LINK_TYPES;
use super::model::Family;
use super::names::{
    EGRESS_MARK, FORWARD_CHAIN, FROM_WL_CHAIN, GUARD_FORWARD_CHAIN, GUARD_INPUT_CHAIN,
    IFACE_WILDCARD, INGRESS_MARK, INPUT_CHAIN, TO_WL_CHAIN, VERDICT_MARKS,
};
use super::ruleset::{Chain, Hook, Table};

const SET_MARK: &str = "-j MARK --set-xmark";

/// The rule target that sets `mark`.
pub fn set_mark(mark: u32) -> String {
    format!("{SET_MARK} {mark:#x}/{mark:#x}")
}

/// The rule target that clears `mark`.
pub fn clear_mark(mark: u32) -> String {
    format!("{SET_MARK} 0x0/{mark:#x}")
}

/// Matches packets without `mark`.
fn without(mark: u32) -> String {
    format!("-m mark ! --mark {mark:#x}/{mark:#x}")
}

/// The fixed chains of enforcement with their hooks: (name, chain, hook
/// into it). Filter first, then the guard. IPv6 adds neighbour discovery
/// from pods to the node (ICMPv6 130-136), which no policy may break.
pub fn policy_frame(
    action: EndpointToHostAction,
    family: Family,
) -> Vec<(String, Chain, Option<Hook>)> {
    vec![
        (
            FORWARD_CHAIN.to_string(),
            forward_chain(),
            Some(hook(
                Table::Filter,
                "FORWARD",
                FORWARD_CHAIN,
                "canal policy",
            )),
        ),
        (
            INPUT_CHAIN.to_string(),
            input_chain(action, family),
            Some(hook(Table::Filter, "INPUT", INPUT_CHAIN, "canal policy")),
        ),
        (
            GUARD_FORWARD_CHAIN.to_string(),
            guard_forward_chain(),
            Some(hook(
                Table::Security,
                "FORWARD",
                GUARD_FORWARD_CHAIN,
                "canal fail-closed guard",
            )),
        ),
        (
            GUARD_INPUT_CHAIN.to_string(),
            guard_input_chain(family),
            Some(hook(
                Table::Security,
                "INPUT",
                GUARD_INPUT_CHAIN,
                "canal fail-closed guard",
            )),
        ),
    ]
}

/// A hook rule `-j <target>` for `builtin` of `table`.
pub fn hook(table: Table, builtin: &'static str, target: &str, note: &str) -> Hook {
    let mut c = Chain::default();
    c.push(builtin, format!("-j {target}"), note);
    Hook {
        table,
        builtin,
        rule: c.rules[0].clone(),
    }
}

/// Established flows policy now denies, cut by conntrack.rs (their
/// entries carry [`super::names::CUT_MARK`]): dropped before the
/// RELATED,ESTABLISHED accept, in both directions.
fn cut_drops(c: &mut Chain, n: &str, dirs: &[&str]) {
    let m = super::names::CUT_MARK;
    for d in dirs {
        c.push(
            n,
            format!("{d} {IFACE_WILDCARD} -m connmark --mark {m:#x}/{m:#x} -j DROP"),
            "established flow cut by policy",
        );
    }
}

fn forward_chain() -> Chain {
    let n = FORWARD_CHAIN;
    let w = IFACE_WILDCARD;
    let mut c = Chain::default();
    cut_drops(&mut c, n, &["-i", "-o"]);
    c.push(
        n,
        format!("-i {w} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
        "reply or related, from pod",
    );
    c.push(
        n,
        format!("-o {w} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
        "reply or related, to pod",
    );
    c.push(
        n,
        format!("-i {w} -m conntrack --ctstate INVALID -j DROP"),
        "invalid, from pod",
    );
    c.push(
        n,
        format!("-o {w} -m conntrack --ctstate INVALID -j DROP"),
        "invalid, to pod",
    );
    c.push(n, clear_mark(VERDICT_MARKS), "clear the verdict marks");
    c.push(
        n,
        format!("-i {w} -j {FROM_WL_CHAIN}"),
        "egress policy of the source pod",
    );
    c.push(
        n,
        format!("-o {w} -j {TO_WL_CHAIN}"),
        "ingress policy of the destination pod",
    );
    c.push(
        n,
        format!("-i {w} {} -j DROP", without(EGRESS_MARK)),
        "no egress verdict (fail closed)",
    );
    c.push(
        n,
        format!("-o {w} {} -j DROP", without(INGRESS_MARK)),
        "no ingress verdict (fail closed)",
    );
    c.push(n, format!("-i {w} -j ACCEPT"), "passed policy, from pod");
    c.push(n, format!("-o {w} -j ACCEPT"), "passed policy, to pod");
    c
}

/// One rule per link-local ICMPv6 type from pods, with `target`.
fn icmpv6_link(c: &mut Chain, n: &str, target: &str) {
    for t in ICMPV6_LINK_TYPES {
        c.push(
            n,
            format!("-i {IFACE_WILDCARD} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j {target}"),
            "neighbour discovery",
        );
    }
}

fn input_chain(action: EndpointToHostAction, family: Family) -> Chain {
    let n = INPUT_CHAIN;
    let w = IFACE_WILDCARD;
    let mut c = Chain::default();
    cut_drops(&mut c, n, &["-i"]);
    c.push(
        n,
        format!("-i {w} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
        "reply or related, from pod",
    );
    if family == Family::V6 {
        // Untracked, so before the INVALID drop and any policy.
        icmpv6_link(&mut c, n, "ACCEPT");
    }
    c.push(
        n,
        format!("-i {w} -m conntrack --ctstate INVALID -j DROP"),
        "invalid, from pod",
    );
    c.push(
        n,
        format!("-i {w} {}", clear_mark(VERDICT_MARKS)),
        "clear the verdict marks",
    );
    c.push(
        n,
        format!("-i {w} -j {FROM_WL_CHAIN}"),
        "egress policy of the pod",
    );
    c.push(
        n,
        format!("-i {w} {} -j DROP", without(EGRESS_MARK)),
        "no egress verdict (fail closed)",
    );
    match action {
        EndpointToHostAction::Accept => c.push(
            n,
            format!("-i {w} -j ACCEPT"),
            "defaultEndpointToHostAction Accept",
        ),
        EndpointToHostAction::Drop => c.push(
            n,
            format!("-i {w} -j DROP"),
            "defaultEndpointToHostAction Drop",
        ),
        // Return: fall off the end of CANAL-INPUT back into INPUT.
        EndpointToHostAction::Return => {}
    }
    c
}

/// New traffic from or to a pod that the filter table's policy did not
/// mark. RELATED/ESTABLISHED packets pass: policy admitted their connection.
fn guard_forward_chain() -> Chain {
    let n = GUARD_FORWARD_CHAIN;
    let w = IFACE_WILDCARD;
    let new = "-m conntrack ! --ctstate RELATED,ESTABLISHED";
    let mut c = Chain::default();
    c.push(
        n,
        format!("-i {w} {new} {} -j DROP", without(EGRESS_MARK)),
        "egress policy did not run (fail closed)",
    );
    c.push(
        n,
        format!("-o {w} {new} {} -j DROP", without(INGRESS_MARK)),
        "ingress policy did not run (fail closed)",
    );
    c
}

fn guard_input_chain(family: Family) -> Chain {
    let n = GUARD_INPUT_CHAIN;
    let w = IFACE_WILDCARD;
    let mut c = Chain::default();
    if family == Family::V6 {
        icmpv6_link(&mut c, n, "RETURN");
    }
    c.push(
        n,
        format!(
            "-i {w} -m conntrack ! --ctstate RELATED,ESTABLISHED {} -j DROP",
            without(EGRESS_MARK)
        ),
        "egress policy did not run (fail closed)",
    );
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_go_to_the_right_tables() {
        let frame = policy_frame(EndpointToHostAction::Accept, Family::V4);
        let hooks: Vec<(Table, &str)> = frame
            .iter()
            .filter_map(|(_, _, h)| h.as_ref().map(|h| (h.table, h.builtin)))
            .collect();
        assert_eq!(
            hooks,
            vec![
                (Table::Filter, "FORWARD"),
                (Table::Filter, "INPUT"),
                (Table::Security, "FORWARD"),
                (Table::Security, "INPUT"),
            ]
        );
        for (name, _, h) in &frame {
            assert_eq!(
                super::super::names::chain_table(name),
                h.as_ref().map(|h| h.table)
            );
        }
    }

    #[test]
    fn marks_are_spelled_as_iptables_save_prints_them() {
        assert_eq!(
            set_mark(INGRESS_MARK),
            "-j MARK --set-xmark 0x10000/0x10000"
        );
        assert_eq!(clear_mark(VERDICT_MARKS), "-j MARK --set-xmark 0x0/0x30000");
        assert_eq!(without(EGRESS_MARK), "-m mark ! --mark 0x20000/0x20000");
    }
}
