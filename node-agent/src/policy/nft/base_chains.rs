//! The base chains of canal's table (the hooks' entry points): the
//! anti-spoofing `prerouting` chain and its sets, `forward` and `input`
//! with their O(1) dispatch, and the fail-closed guards after them. The
//! layout is drawn in [`super::render`]. Pure, no I/O.

use std::net::IpAddr;

use canal_crds::EndpointToHostAction;

use crate::policy::antispoof::{SourceMap, Sources, SpoofReason};
use crate::policy::model::Families;
use crate::policy::names::{CUT_MARK, EGRESS_MARK, INGRESS_MARK, VERDICT_MARKS};

use super::render::{
    FILTER_PRIORITY, FORWARD, FROM_WL, GUARD_FORWARD, GUARD_INPUT, GUARD_PRIORITY, INPUT, PODS,
    PREROUTING, RAW_PRIORITY, SPOOF_IFACES, SPOOF_ROUTED, SPOOF_V4, SPOOF_V6, TO_WL, base,
    clear_mark, icmpv6_types, without,
};
use super::ruleset::{NftChain, NftRuleset, NftSet};

/// New pod traffic that `forward` did not mark is dropped: a foreign
/// rewrite of `forward` (a flush, an `accept` in front) fails closed.
pub(super) fn guard_forward_chain() -> NftChain {
    let n = GUARD_FORWARD;
    let mut c = NftChain {
        base: base("forward", GUARD_PRIORITY),
        ..NftChain::default()
    };
    let new = "ct state != { established, related }";
    c.push(
        n,
        format!("iifname {PODS} {new} {} drop", without(EGRESS_MARK)),
        "egress policy did not run (fail closed)",
    );
    c.push(
        n,
        format!("oifname {PODS} {new} {} drop", without(INGRESS_MARK)),
        "ingress policy did not run (fail closed)",
    );
    c
}

pub(super) fn guard_input_chain(v6: bool) -> NftChain {
    let n = GUARD_INPUT;
    let mut c = NftChain {
        base: base("input", GUARD_PRIORITY),
        ..NftChain::default()
    };
    if v6 {
        c.push(
            n,
            format!("iifname {PODS} {} accept", icmpv6_types()),
            "neighbour discovery",
        );
    }
    c.push(
        n,
        format!(
            "iifname {PODS} ct state != {{ established, related }} {} drop",
            without(EGRESS_MARK)
        ),
        "egress policy did not run (fail closed)",
    );
    c
}

pub(super) fn antispoof(r: &mut NftRuleset, map: &SourceMap, families: Families) {
    let n = PREROUTING;
    let mut c = NftChain {
        base: base("prerouting", RAW_PRIORITY),
        ..NftChain::default()
    };
    let mut drop = |c: &mut NftChain, spec: String, note: &str, reason: SpoofReason| {
        c.push(n, spec, note);
        if let Some(rule) = c.rules.last() {
            r.spoof_rules.insert(rule.hash.clone(), reason);
        }
    };
    if families.v6 {
        // Neighbour discovery from link-local (DAD: unspecified) sources,
        // which are no pod's assigned address and may not pass a fib check.
        c.push(
            n,
            format!(
                "iifname {PODS} ip6 saddr {{ fe80::/10, ::/128 }} {} accept",
                icmpv6_types()
            ),
            "link-local ICMPv6",
        );
    }
    drop(
        &mut c,
        format!("iifname {PODS} fib saddr . iif oif missing counter drop"),
        "spoofed source: does not route back to the pod interface",
        SpoofReason::Rpf,
    );
    if let Some(endpoints) = &map.endpoints {
        let mut v4 = NftSet::new("ifname . ipv4_addr");
        let mut v6 = NftSet::new("ifname . ipv6_addr");
        let mut routed = NftSet::new("ifname");
        let mut ifaces = NftSet::new("ifname");
        for (iface, sources) in endpoints {
            ifaces.insert(format!("\"{iface}\""));
            match sources {
                Sources::Routed => routed.insert(format!("\"{iface}\"")),
                Sources::Addresses(addrs) => {
                    for a in addrs {
                        match a {
                            IpAddr::V4(_) => v4.insert(format!("\"{iface}\" . {a}")),
                            IpAddr::V6(_) if families.v6 => v6.insert(format!("\"{iface}\" . {a}")),
                            IpAddr::V6(_) => {}
                        }
                    }
                }
            }
        }
        c.push(
            n,
            format!("iifname . ip saddr @{SPOOF_V4} accept"),
            "source assigned to the pod interface",
        );
        r.sets.insert(SPOOF_V4.into(), v4);
        if families.v6 {
            c.push(
                n,
                format!("iifname . ip6 saddr @{SPOOF_V6} accept"),
                "source assigned to the pod interface",
            );
            r.sets.insert(SPOOF_V6.into(), v6);
        }
        c.push(
            n,
            format!("iifname @{SPOOF_ROUTED} accept"),
            "pod IPs not known yet: reverse path only",
        );
        drop(
            &mut c,
            format!("iifname @{SPOOF_IFACES} counter drop"),
            "spoofed source: not an address of the pod",
            SpoofReason::SourceNotAssigned,
        );
        r.sets.insert(SPOOF_ROUTED.into(), routed);
        r.sets.insert(SPOOF_IFACES.into(), ifaces);
    }
    r.chains.insert(n.into(), c);
}

/// Established flows policy now denies, cut by conntrack.rs (their
/// entries carry [`CUT_MARK`]): dropped before the established accept, in
/// both directions.
fn cut_drops(c: &mut NftChain, n: &str, dirs: &[&str]) {
    for d in dirs {
        c.push(
            n,
            format!("{d} {PODS} ct mark & {CUT_MARK:#010x} == {CUT_MARK:#010x} drop"),
            "established flow cut by policy",
        );
    }
}

pub(super) fn forward_chain() -> NftChain {
    let n = FORWARD;
    let mut c = NftChain {
        base: base("forward", FILTER_PRIORITY),
        ..NftChain::default()
    };
    cut_drops(&mut c, n, &["iifname", "oifname"]);
    for (dir, note) in [("iifname", "from pod"), ("oifname", "to pod")] {
        c.push(
            n,
            format!("{dir} {PODS} ct state established,related accept"),
            &format!("reply or related, {note}"),
        );
    }
    for (dir, note) in [("iifname", "from pod"), ("oifname", "to pod")] {
        c.push(
            n,
            format!("{dir} {PODS} ct state invalid drop"),
            &format!("invalid, {note}"),
        );
    }
    c.push(n, clear_mark(VERDICT_MARKS), "clear the verdict marks");
    c.push(
        n,
        format!("iifname {PODS} iifname vmap @{FROM_WL}"),
        "egress policy of the source pod",
    );
    c.push(
        n,
        format!("oifname {PODS} oifname vmap @{TO_WL}"),
        "ingress policy of the destination pod",
    );
    c.push(
        n,
        format!("iifname {PODS} {} drop", without(EGRESS_MARK)),
        "no egress verdict (fail closed)",
    );
    c.push(
        n,
        format!("oifname {PODS} {} drop", without(INGRESS_MARK)),
        "no ingress verdict (fail closed)",
    );
    c.push(
        n,
        format!("iifname {PODS} accept"),
        "passed policy, from pod",
    );
    c.push(n, format!("oifname {PODS} accept"), "passed policy, to pod");
    c
}

pub(super) fn input_chain(action: EndpointToHostAction, v6: bool) -> NftChain {
    let n = INPUT;
    let mut c = NftChain {
        base: base("input", FILTER_PRIORITY),
        ..NftChain::default()
    };
    cut_drops(&mut c, n, &["iifname"]);
    c.push(
        n,
        format!("iifname {PODS} ct state established,related accept"),
        "reply or related, from pod",
    );
    if v6 {
        // Untracked, so before the invalid drop and any policy.
        c.push(
            n,
            format!("iifname {PODS} {} accept", icmpv6_types()),
            "neighbour discovery",
        );
    }
    c.push(
        n,
        format!("iifname {PODS} ct state invalid drop"),
        "invalid, from pod",
    );
    c.push(
        n,
        format!("iifname {PODS} {}", clear_mark(VERDICT_MARKS)),
        "clear the verdict marks",
    );
    c.push(
        n,
        format!("iifname {PODS} iifname vmap @{FROM_WL}"),
        "egress policy of the pod",
    );
    c.push(
        n,
        format!("iifname {PODS} {} drop", without(EGRESS_MARK)),
        "no egress verdict (fail closed)",
    );
    match action {
        EndpointToHostAction::Accept => c.push(
            n,
            format!("iifname {PODS} accept"),
            "defaultEndpointToHostAction Accept",
        ),
        EndpointToHostAction::Drop => c.push(
            n,
            format!("iifname {PODS} drop"),
            "defaultEndpointToHostAction Drop",
        ),
        // Return: the node's own rules decide.
        EndpointToHostAction::Return => {}
    }
    c
}
