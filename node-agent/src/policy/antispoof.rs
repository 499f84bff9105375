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

use super::names::{self, IFACE_WILDCARD, PREROUTING_CHAIN};
use super::render::Warning;
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
pub fn assigned_set_name() -> String {
    names::set_name("spoof-assigned", SetType::HashNetIface.as_str(), "ipv4")
}

/// The set of every known pod interface (any source).
pub fn interfaces_set_name() -> String {
    names::set_name("spoof-interfaces", SetType::HashNetIface.as_str(), "ipv4")
}

/// Every source, as a `hash:net,iface` member prefix (the type accepts /0).
const ANY_V4: &str = "0.0.0.0/0";

/// The IPv4 rules of `map` (raw table, before conntrack):
///
/// ```text
/// CANAL-PREROUTING  -i cali+ -m rpfilter --invert -j DROP                       (rpf)
///                   -i cali+ -m set --match-set <assigned> src,src -j RETURN
///                   -i cali+ -m set --match-set <interfaces> src,src -j DROP   (source_not_assigned)
/// ```
///
/// The last two only when the endpoints are known; an unknown interface
/// falls through them.
pub fn render_raw(map: &SourceMap) -> RawRules {
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
    drop(
        &mut chain,
        format!("-i {w} -m rpfilter --invert -j DROP"),
        "spoofed source: does not route back to the pod interface",
        SpoofReason::Rpf,
    );
    if let Some(endpoints) = &map.endpoints {
        let mut assigned = IpSet::new(SetType::HashNetIface);
        let mut interfaces = IpSet::new(SetType::HashNetIface);
        for (iface, sources) in endpoints {
            interfaces.insert(format!("{ANY_V4},{iface}"));
            match sources {
                Sources::Routed => assigned.insert(format!("{ANY_V4},{iface}")),
                Sources::Addresses(addrs) => {
                    for a in addrs {
                        // This table filters IPv4; IPv6 gets its own family.
                        if let IpAddr::V4(a) = a {
                            assigned.insert(format!("{a},{iface}"));
                        }
                    }
                }
            }
        }
        let (assigned_name, interfaces_name) = (assigned_set_name(), interfaces_set_name());
        chain.push(
            n,
            format!("-i {w} -m set --match-set {assigned_name} src,src -j RETURN"),
            "source assigned to the pod interface",
        );
        drop(
            &mut chain,
            format!("-i {w} -m set --match-set {interfaces_name} src,src -j DROP"),
            "spoofed source: not an address of the pod",
            SpoofReason::SourceNotAssigned,
        );
        out.sets.insert(assigned_name, assigned);
        out.sets.insert(interfaces_name, interfaces);
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
    fn raw_rules_check_rpf_then_the_assigned_sources() {
        let a = ep("calia", &["10.244.1.2", "10.244.1.9"]);
        let b = ep("calib", &[]);
        let map = SourceMap::from_endpoints([("calia", &a), ("calib", &b)], &mut BTreeSet::new());
        let r = render_raw(&map);
        let specs: Vec<&str> = r.chain.rules.iter().map(|r| r.spec.as_str()).collect();
        assert_eq!(specs.len(), 3);
        assert!(specs[0].contains("rpfilter --invert -j DROP"));
        assert!(specs[1].ends_with("src,src -j RETURN"));
        assert!(specs[2].ends_with("src,src -j DROP"));
        let assigned = &r.sets[&assigned_set_name()];
        let members: Vec<&str> = assigned.members.iter().map(String::as_str).collect();
        assert_eq!(
            members,
            vec!["0.0.0.0/0,calib", "10.244.1.2,calia", "10.244.1.9,calia"]
        );
        assert_eq!(r.sets[&interfaces_set_name()].members.len(), 2);
        let reasons: BTreeSet<SpoofReason> = r.drops.values().copied().collect();
        assert_eq!(reasons, SpoofReason::ALL.into_iter().collect());
        assert_eq!(r.hook.unwrap().table, Table::Raw);
    }

    #[test]
    fn unknown_endpoints_leave_only_the_reverse_path_check() {
        let r = render_raw(&SourceMap::unknown());
        assert_eq!(r.chain.rules.len(), 1);
        assert!(r.sets.is_empty());
        assert_eq!(
            r.drops.values().copied().collect::<Vec<_>>(),
            vec![SpoofReason::Rpf]
        );
    }

    #[test]
    fn the_chain_does_not_change_with_the_pods() {
        // Pods come and go through set members only: the raw chain (and its
        // counters) stays as it is.
        let a = ep("calia", &["10.244.1.2"]);
        let one = render_raw(&SourceMap::from_endpoints(
            [("calia", &a)],
            &mut BTreeSet::new(),
        ));
        let none = render_raw(&SourceMap::from_endpoints([], &mut BTreeSet::new()));
        assert_eq!(one.chain, none.chain);
        assert_ne!(one.sets, none.sets);
    }
}
