//! The live-change rule of the address plan, per family: a range (and its
//! node subnet length) changes only while no subnet of it is allocated,
//! because Kubernetes never lets a Node's podCIDRs change. Adding a family
//! to a running cluster is fine (Nodes that exist keep the podCIDRs they
//! have; new Nodes get both); removing one with allocations is refused.
//! Pure.

use ipnet::IpNet;

use crate::node_view::same_family;
use crate::status::RefusedChange;

/// A range and its node subnet length.
pub type RangePlan = (IpNet, u8);

/// One family's plan in force: range, subnet length, subnets allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InForce {
    /// The range.
    pub cidr: IpNet,
    /// Its node subnet length.
    pub len: u8,
    /// Subnets allocated from it.
    pub allocated: u64,
}

/// What the plans in force become.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NextPlans {
    /// The plans, the spec's order first, then refused removals.
    pub plans: Vec<(IpNet, u8)>,
    /// Changes that cannot be applied live.
    pub refused: Vec<RefusedChange>,
    /// Changes applied (for an Event): (from, to), None for a family
    /// added or removed.
    pub applied: Vec<(Option<RangePlan>, Option<RangePlan>)>,
}

/// Decides the plans in force given those in force now and those wanted.
pub fn next_plans(active: &[InForce], wanted: &[(IpNet, u8)]) -> NextPlans {
    let mut out = NextPlans::default();
    for &(cidr, len) in wanted {
        match active.iter().find(|a| same_family(&a.cidr, &cidr)) {
            None => {
                out.plans.push((cidr, len));
                out.applied.push((None, Some((cidr, len))));
            }
            Some(a) if (a.cidr, a.len) == (cidr, len) => out.plans.push((cidr, len)),
            Some(a) if a.allocated == 0 => {
                out.plans.push((cidr, len));
                out.applied.push((Some((a.cidr, a.len)), Some((cidr, len))));
            }
            Some(a) => {
                out.plans.push((a.cidr, a.len));
                out.refused.push(RefusedChange {
                    active: (a.cidr, a.len),
                    wanted: Some((cidr, len)),
                    allocated: a.allocated,
                });
            }
        }
    }
    for a in active {
        if wanted.iter().any(|(c, _)| same_family(c, &a.cidr)) {
            continue;
        }
        if a.allocated == 0 {
            out.applied.push((Some((a.cidr, a.len)), None));
        } else {
            out.plans.push((a.cidr, a.len));
            out.refused.push(RefusedChange {
                active: (a.cidr, a.len),
                wanted: None,
                allocated: a.allocated,
            });
        }
    }
    out
}

/// The Event note of an applied change.
pub fn applied_note(from: Option<(IpNet, u8)>, to: Option<(IpNet, u8)>) -> String {
    match (from, to) {
        (Some((fc, fl)), Some((tc, tl))) => format!(
            "clusterCIDR {tc} with node subnet length {tl} is now in force (was {fc} with {fl}); no subnet was allocated"
        ),
        (None, Some((tc, tl))) => format!(
            "the range {tc} with node subnet length {tl} is now in force; Nodes without a podCIDR get a subnet of it, Nodes that have podCIDRs keep them (Kubernetes never lets them change)"
        ),
        (Some((fc, _)), None) => {
            format!("the range {fc} is no longer in force; no subnet of it was allocated")
        }
        (None, None) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn f(cidr: &str, len: u8, allocated: u64) -> InForce {
        InForce {
            cidr: n(cidr),
            len,
            allocated,
        }
    }

    #[test]
    fn adding_ipv6_to_a_running_ipv4_cluster_is_live() {
        let next = next_plans(
            &[f("10.244.0.0/16", 24, 5)],
            &[(n("10.244.0.0/16"), 24), (n("fd00::/56"), 64)],
        );
        assert_eq!(
            next.plans,
            vec![(n("10.244.0.0/16"), 24), (n("fd00::/56"), 64)]
        );
        assert!(next.refused.is_empty());
        assert_eq!(next.applied, vec![(None, Some((n("fd00::/56"), 64)))]);
    }

    #[test]
    fn each_family_changes_only_while_nothing_of_it_is_allocated() {
        // IPv6 has no allocation: its change applies; IPv4 has: refused.
        let next = next_plans(
            &[f("10.244.0.0/16", 24, 3), f("fd00::/56", 64, 0)],
            &[(n("10.99.0.0/16"), 24), (n("fd01::/56"), 64)],
        );
        assert_eq!(
            next.plans,
            vec![(n("10.244.0.0/16"), 24), (n("fd01::/56"), 64)]
        );
        assert_eq!(next.refused.len(), 1);
        assert_eq!(next.refused[0].wanted, Some((n("10.99.0.0/16"), 24)));
        // The subnet length alone is a change too.
        let next = next_plans(&[f("fd00::/56", 64, 1)], &[(n("fd00::/56"), 60)]);
        assert_eq!(next.plans, vec![(n("fd00::/56"), 64)]);
        assert_eq!(next.refused[0].allocated, 1);
    }

    #[test]
    fn removing_a_family_with_allocations_is_refused() {
        let next = next_plans(
            &[f("10.244.0.0/16", 24, 3), f("fd00::/56", 64, 2)],
            &[(n("10.244.0.0/16"), 24)],
        );
        assert_eq!(
            next.plans,
            vec![(n("10.244.0.0/16"), 24), (n("fd00::/56"), 64)]
        );
        assert_eq!(next.refused[0].wanted, None);
        // Without allocations it goes.
        let next = next_plans(
            &[f("10.244.0.0/16", 24, 3), f("fd00::/56", 64, 0)],
            &[(n("10.244.0.0/16"), 24)],
        );
        assert_eq!(next.plans, vec![(n("10.244.0.0/16"), 24)]);
        assert!(next.refused.is_empty());
        // Swapping the primary keeps both plans, in the spec's order.
        let next = next_plans(
            &[f("10.244.0.0/16", 24, 3), f("fd00::/56", 64, 2)],
            &[(n("fd00::/56"), 64), (n("10.244.0.0/16"), 24)],
        );
        assert_eq!(
            next.plans,
            vec![(n("fd00::/56"), 64), (n("10.244.0.0/16"), 24)]
        );
        assert!(next.refused.is_empty() && next.applied.is_empty());
    }
}
