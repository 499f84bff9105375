//! Anti-spoofing: a pod may send only from the addresses canal gave it,
//! whether or not a NetworkPolicy selects it and whether or not policy is
//! enabled (it is not NetworkPolicy: without it, any ipBlock or peer rule
//! is a rule on an address the attacker picks).
//!
//! Two independent layers, both before any policy and before conntrack, so
//! a forged packet never creates connection state:
//!
//! 1. Strict reverse-path filtering: the packet's source must route back
//!    out of the interface it came in on. canal-cni routes exactly the
//!    pod's addresses (/32) to its `cali` interface, so this refuses every
//!    other pod's address (same node or remote), node and outside
//!    addresses, whatever `rp_filter` says (Calico: raw PREROUTING
//!    `-m rpfilter --invert` for `cali+`).
//! 2. A per-endpoint source match against the NodePolicySet (the
//!    controller's view of the pod's IPs): it still holds when a route is
//!    wrong (a stale or hand-made route to the wrong interface).
//!
//! An interface no endpoint of the node has (a pod canal-cni has just wired
//! and the NodePolicySet does not list yet) is held to the reverse-path
//! check only: in the raw table there is no connection state yet, and
//! dropping it there would also drop its replies to the host (kubelet
//! probes). New connections from it are dropped by the policy layer (and
//! canal-cni waits for its endpoint to be programmed), as Calico does.
//!
//! [`SourceMap`] is the dataplane-neutral part (which interface may send
//! from which addresses), computed once from the inputs; [`render_raw`]
//! is its iptables form (raw table `CANAL-PREROUTING` and two
//! `hash:net,iface` sets, so the per-packet cost does not grow with the
//! number of pods). An nftables dataplane renders the same map into an
//! `iifname . ip saddr` set.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use canal_crds::Endpoint;

use super::model::{Family, Warning};
use super::names::{self, IFACE_WILDCARD, PREROUTING_CHAIN};
use super::ruleset::{Chain, Hook, IpSet, SetType, Table};

/// Why a packet from a pod was dropped as spoofed (label values of
/// `canal_policy_spoofed_packets_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SpoofReason {
    /// Its source does not route back out of the interface it came from.
    Rpf,
    /// Its interface belongs to a pod, its source is not one of that pod's addresses.
    SourceNotAssigned,
}

impl SpoofReason {
    /// Every reason.
    pub const ALL: [SpoofReason; 2] = [SpoofReason::Rpf, SpoofReason::SourceNotAssigned];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SpoofReason::Rpf => "rpf",
            SpoofReason::SourceNotAssigned => "source_not_assigned",
        }
    }
}

/// The sources one pod interface may send from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sources {
    /// Exactly these (the pod's IPs as the NodePolicySet lists them; empty
    /// when none of them parses: the pod can send nothing).
    Addresses(BTreeSet<IpAddr>),
    /// The pod has no IP in the NodePolicySet yet (canal-cni has just
    /// wired it and the controller has not seen its status): any source
    /// that passes the reverse-path check, i.e. what canal-cni routed to it.
    Routed,
}

/// Which interface may send from which addresses: the input of every
/// dataplane's anti-spoofing rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceMap {
    /// Per pod interface; None when the endpoint list is not known (no
    /// NodePolicySet yet): only the reverse-path check applies then.
    pub endpoints: Option<BTreeMap<String, Sources>>,
}

impl SourceMap {
    /// The map of `endpoints` (interface -> endpoint, already validated and
    /// deduplicated by the caller); addresses that do not parse are
    /// skipped with a warning.
    pub fn from_endpoints<'a>(
        endpoints: impl IntoIterator<Item = (&'a str, &'a Endpoint)>,
        warnings: &mut BTreeSet<Warning>,
    ) -> SourceMap {
        let mut map = BTreeMap::new();
        for (iface, ep) in endpoints {
            let sources = if ep.ips.is_empty() {
                Sources::Routed
            } else {
                let mut addrs = BTreeSet::new();
                for ip in &ep.ips {
                    match ip.trim().parse::<IpAddr>() {
                        Ok(a) => {
                            addrs.insert(a);
                        }
                        Err(_) => {
                            warnings.insert(Warning::InvalidAddress {
                                context: format!("endpoint {}/{}", ep.namespace, ep.pod),
                                value: ip.clone(),
                            });
                        }
                    }
                }
                Sources::Addresses(addrs)
            };
            map.insert(iface.to_string(), sources);
        }
        SourceMap {
            endpoints: Some(map),
        }
    }

    /// Only the reverse-path check (the endpoints are not known).
    pub fn unknown() -> SourceMap {
        SourceMap { endpoints: None }
    }
}

/// What [`render_raw`] produces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawRules {
    /// The raw chain and its hook.
    pub chain: Chain,
    /// Its hook in raw PREROUTING.
    pub hook: Option<Hook>,
    /// The sets the chain references, by name.
    pub sets: BTreeMap<String, IpSet>,
    /// Hash of each dropping rule -> why it drops.
    pub drops: BTreeMap<String, SpoofReason>,
}

/// The set of (source, interface) pairs a pod interface may send from.
pub fn assigned_set_name(family: Family) -> String {
    names::set_name(
        "spoof-assigned",
        SetType::HashNetIface.as_str(),
        family.as_str(),
    )
}

/// ICMPv6 types a pod sends from its link-local (or the unspecified)
/// address and that must never be dropped: MLD (130-132), router and
/// neighbour solicitation/advertisement (133-136), as Calico allows.
pub const ICMPV6_LINK_TYPES: [u8; 7] = [130, 131, 132, 133, 134, 135, 136];

/// The sources of link-local ICMPv6 (neighbour discovery, DAD).
pub const ICMPV6_LINK_SOURCES: [&str; 2] = ["fe80::/10", "::/128"];

/// The rules of `map` for one family (raw table, before conntrack):
///
/// ```text
/// CANAL-PREROUTING  (IPv6: -i cali+ -s fe80::/10 or :: ICMPv6 130-136 -j RETURN)
///                   -i cali+ -m rpfilter --invert -j DROP                       (rpf)
///                   -i cali+ -m set --match-set <assigned> src,src -j RETURN
///                   -i cali+ -m set --match-set <interfaces> src,src -j DROP   (source_not_assigned)
/// ```
///
/// The last two only when the endpoints are known; an unknown interface
/// falls through them.
pub fn render_raw(map: &SourceMap, family: Family) -> RawRules {
    let n = PREROUTING_CHAIN;
    let w = IFACE_WILDCARD;
    let mut out = RawRules::default();
    let mut drop = |chain: &mut Chain, spec: String, note: &str, reason: SpoofReason| {
        chain.push(n, spec, note);
        if let Some(r) = chain.rules.last() {
            out.drops.insert(r.hash.clone(), reason);
        }
    };
    let mut chain = Chain::default();
    if family == Family::V6 {
        // Neighbour discovery comes from link-local (DAD: unspecified)
        // sources, which are no pod's assigned address.
        for src in ICMPV6_LINK_SOURCES {
            for t in ICMPV6_LINK_TYPES {
                chain.push(
                    n,
                    format!("-s {src} -i {w} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN"),
                    "link-local ICMPv6",
                );
            }
        }
    }
    drop(
        &mut chain,
        format!("-i {w} -m rpfilter --invert -j DROP"),
        "spoofed source: does not route back to the pod interface",
        SpoofReason::Rpf,
    );
    if let Some(endpoints) = &map.endpoints {
        // The assigned (address, interface) pairs are a set: distinct
        // addresses hash apart. "Any source from this interface" is not:
        // hash:net,iface hashes the address part only, so more than 64
        // `0.0.0.0/0,<iface>` members collide into one full bucket and
        // the whole restore fails ("Hash is full"). Those are rules, one
        // per interface, reached only by packets no set entry returned.
        let mut assigned = IpSet::new(SetType::HashNetIface, family);
        for (iface, sources) in endpoints {
            match sources {
                Sources::Routed => chain.push(
                    n,
                    format!("-i {iface} -j RETURN"),
                    "pod IPs not known yet: reverse path only",
                ),
                Sources::Addresses(addrs) => {
                    for a in addrs {
                        // Each family's table filters its own addresses.
                        if Family::of(a) == family {
                            assigned.insert(format!("{a},{iface}"));
                        }
                    }
                }
            }
        }
        let assigned_name = assigned_set_name(family);
        chain.push(
            n,
            format!("-i {w} -m set --match-set {assigned_name} src,src -j RETURN"),
            "source assigned to the pod interface",
        );
        for (iface, sources) in endpoints {
            if matches!(sources, Sources::Addresses(_)) {
                drop(
                    &mut chain,
                    format!("-i {iface} -j DROP"),
                    "spoofed source: not an address of the pod",
                    SpoofReason::SourceNotAssigned,
                );
            }
        }
        out.sets.insert(assigned_name, assigned);
    }
    let mut h = Chain::default();
    h.push("PREROUTING", format!("-j {n}"), "canal anti-spoofing");
    out.hook = h.rules.first().map(|rule| Hook {
        table: Table::Raw,
        builtin: "PREROUTING",
        rule: rule.clone(),
    });
    out.chain = chain;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(iface: &str, ips: &[&str]) -> Endpoint {
        Endpoint {
            namespace: "x".into(),
            pod: iface.into(),
            interface: iface.into(),
            ips: ips.iter().map(|s| s.to_string()).collect(),
            ..Endpoint::default()
        }
    }

    #[test]
    fn map_lists_every_address_and_waits_for_unknown_ones() {
        let a = ep("calia", &["10.244.1.2", "fd00::2", "bogus"]);
        let b = ep("calib", &[]);
        let mut warnings = BTreeSet::new();
        let map = SourceMap::from_endpoints([("calia", &a), ("calib", &b)], &mut warnings);
        let eps = map.endpoints.as_ref().unwrap();
        assert_eq!(
            eps["calia"],
            Sources::Addresses(
                ["10.244.1.2", "fd00::2"]
                    .iter()
                    .map(|s| s.parse().unwrap())
                    .collect()
            )
        );
        assert_eq!(eps["calib"], Sources::Routed);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    }

    #[test]
    fn no_set_member_is_shared_by_many_interfaces() {
        // hash:net,iface hashes the address part: members with one address
        // and many interfaces fill one bucket (64) and fail the restore.
        let eps: Vec<(String, Endpoint)> = (0..300)
            .map(|i| {
                let iface = format!("cali{i:011x}");
                let ips = if i % 2 == 0 {
                    vec![]
                } else {
                    vec![format!("10.244.{}.{}", i / 200, i % 200 + 2)]
                };
                let e = ep(&iface, &ips.iter().map(String::as_str).collect::<Vec<_>>());
                (iface, e)
            })
            .collect();
        let map = SourceMap::from_endpoints(
            eps.iter().map(|(i, e)| (i.as_str(), e)),
            &mut BTreeSet::new(),
        );
        let r = render_raw(&map, Family::V4);
        for set in r.sets.values() {
            let mut per_address: BTreeMap<&str, usize> = BTreeMap::new();
            for m in set.members.iter() {
                *per_address
                    .entry(m.split(',').next().unwrap_or(m))
                    .or_default() += 1;
            }
            assert!(per_address.values().all(|&n| n == 1), "{per_address:?}");
        }
    }

    #[test]
    fn raw_rules_check_rpf_then_the_assigned_sources() {
        let a = ep("calia", &["10.244.1.2", "10.244.1.9"]);
        let b = ep("calib", &[]);
        let map = SourceMap::from_endpoints([("calia", &a), ("calib", &b)], &mut BTreeSet::new());
        let r = render_raw(&map, Family::V4);
        let specs: Vec<&str> = r.chain.rules.iter().map(|r| r.spec.as_str()).collect();
        assert_eq!(
            specs,
            vec![
                "-i cali+ -m rpfilter --invert -j DROP",
                "-i calib -j RETURN",
                &format!(
                    "-i cali+ -m set --match-set {} src,src -j RETURN",
                    assigned_set_name(Family::V4)
                ),
                "-i calia -j DROP",
            ]
        );
        let assigned = &r.sets[&assigned_set_name(Family::V4)];
        let members: Vec<&str> = assigned.members.iter().map(String::as_str).collect();
        assert_eq!(members, vec!["10.244.1.2,calia", "10.244.1.9,calia"]);
        assert_eq!(r.sets.len(), 1, "one set: the assigned pairs");
        let reasons: BTreeSet<SpoofReason> = r.drops.values().copied().collect();
        assert_eq!(reasons, SpoofReason::ALL.into_iter().collect());
        assert_eq!(r.hook.unwrap().table, Table::Raw);
    }

    #[test]
    fn unknown_endpoints_leave_only_the_reverse_path_check() {
        let r = render_raw(&SourceMap::unknown(), Family::V4);
        assert_eq!(r.chain.rules.len(), 1);
        assert!(r.sets.is_empty());
        assert_eq!(
            r.drops.values().copied().collect::<Vec<_>>(),
            vec![SpoofReason::Rpf]
        );
    }

    #[test]
    fn addresses_change_set_members_only() {
        // A pod's new address is a set member; only a new interface adds
        // a rule (its drop), so address churn leaves the chain and its
        // counters as they are.
        let a1 = ep("calia", &["10.244.1.2"]);
        let a2 = ep("calia", &["10.244.1.3"]);
        let one = render_raw(
            &SourceMap::from_endpoints([("calia", &a1)], &mut BTreeSet::new()),
            Family::V4,
        );
        let moved = render_raw(
            &SourceMap::from_endpoints([("calia", &a2)], &mut BTreeSet::new()),
            Family::V4,
        );
        assert_eq!(one.chain, moved.chain);
        assert_ne!(one.sets, moved.sets);
        let none = render_raw(
            &SourceMap::from_endpoints([], &mut BTreeSet::new()),
            Family::V4,
        );
        assert_eq!(none.chain.rules.len() + 1, one.chain.rules.len());
    }
}
