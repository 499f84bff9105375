//! Who holds a pod IP that several Pods report. Pure.
//!
//! NetworkPolicy gives an IP the identity of the pod that holds it: the IP
//! joins the PeerSets the pod's labels select and is the pod's endpoint
//! address on its node. When two Pods report one IP (a runtime handed it
//! out twice, a stale Pod of a recreated sandbox, or a status forged by a
//! compromised kubelet), exactly one of them holds it and the other gets
//! nothing through it, so one pod never gets another pod's access.
//!
//! The holder is decided by a total order the caller gives (running before
//! terminating, then older, then namespace/name), not by arrival order, so
//! a restarted or failed-over controller decides the same, and when the
//! holder goes the next claimant takes the IP over.

use std::collections::HashMap;
use std::net::IpAddr;

use smallvec::SmallVec;

/// Claims on IPs by claimants of type `T`. Memory matters (one entry per
/// pod IP of the cluster): the holder of an uncontested IP is one map
/// entry, and only contested IPs keep a waiting list (in priority order).
#[derive(Debug)]
pub struct IpClaims<T> {
    holders: HashMap<IpAddr, T>,
    waiting: HashMap<IpAddr, SmallVec<[T; 2]>>,
}

impl<T> Default for IpClaims<T> {
    fn default() -> Self {
        IpClaims {
            holders: HashMap::new(),
            waiting: HashMap::new(),
        }
    }
}

impl<T: Copy + Eq> IpClaims<T> {
    /// `who` claims `ip`; `before(a, b)` is true when `a` has priority over
    /// `b`. Returns the holder `who` displaced, if any.
    pub fn claim(&mut self, ip: IpAddr, who: T, before: impl Fn(T, T) -> bool) -> Option<T> {
        let Some(&holder) = self.holders.get(&ip) else {
            self.holders.insert(ip, who);
            return None;
        };
        if holder == who {
            return None;
        }
        let list = self.waiting.entry(ip).or_default();
        if list.contains(&who) {
            return None;
        }
        if before(who, holder) {
            // The holder came before every waiting claimant.
            list.insert(0, holder);
            self.holders.insert(ip, who);
            return Some(holder);
        }
        let pos = list
            .iter()
            .position(|&c| before(who, c))
            .unwrap_or(list.len());
        list.insert(pos, who);
        None
    }

    /// `who` gives up `ip`. Returns the claimant that holds it now, if `who`
    /// held it and someone else was waiting.
    pub fn release(&mut self, ip: IpAddr, who: T) -> Option<T> {
        if self.holders.get(&ip) == Some(&who) {
            let next = self.waiting.get_mut(&ip).map(|list| list.remove(0));
            if self.waiting.get(&ip).is_some_and(|l| l.is_empty()) {
                self.waiting.remove(&ip);
            }
            match next {
                Some(n) => {
                    self.holders.insert(ip, n);
                }
                None => {
                    self.holders.remove(&ip);
                }
            }
            return next;
        }
        if let Some(list) = self.waiting.get_mut(&ip) {
            list.retain(|c| *c != who);
            if list.is_empty() {
                self.waiting.remove(&ip);
            }
        }
        None
    }

    /// Who holds `ip`.
    pub fn holder(&self, ip: IpAddr) -> Option<T> {
        self.holders.get(&ip).copied()
    }

    /// IPs more than one claimant reports.
    pub fn contested(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_first_in_priority_holds_and_hands_over_when_it_goes() {
        let mut c: IpClaims<u32> = IpClaims::default();
        let before = |a: u32, b: u32| a < b;
        let x = ip("10.0.0.1");
        assert_eq!(c.claim(x, 5, before), None);
        assert_eq!(c.holder(x), Some(5));
        // A later claimant with lower priority waits.
        assert_eq!(c.claim(x, 9, before), None);
        assert_eq!(c.holder(x), Some(5));
        // One with higher priority displaces the holder.
        assert_eq!(c.claim(x, 2, before), Some(5));
        assert_eq!(c.holder(x), Some(2));
        assert_eq!(c.contested(), 1);
        // Claiming twice changes nothing.
        assert_eq!(c.claim(x, 2, before), None);
        // A waiting claimant leaving hands over nothing.
        assert_eq!(c.release(x, 9), None);
        assert_eq!(c.release(x, 2), Some(5));
        assert_eq!(c.holder(x), Some(5));
        assert_eq!(c.release(x, 5), None);
        assert_eq!(c.holder(x), None);
        assert_eq!(c.release(x, 5), None);
        assert_eq!(c.contested(), 0);
    }

    proptest::proptest! {
        /// Against a plain model: the holder is always the claimant first in
        /// priority, and what claim/release report is the holder change.
        #[test]
        fn matches_a_plain_model(ops in proptest::collection::vec((0u8..3, 0u32..6, proptest::bool::ANY), 0..60)) {
            let mut c: IpClaims<u32> = IpClaims::default();
            let mut model: std::collections::BTreeMap<u8, std::collections::BTreeSet<u32>> = Default::default();
            for (addr, who, add) in ops {
                let x = IpAddr::from([10, 0, 0, addr]);
                let set = model.entry(addr).or_default();
                let before = set.first().copied();
                let reported = if add {
                    set.insert(who);
                    c.claim(x, who, |a, b| a < b)
                } else {
                    set.remove(&who);
                    c.release(x, who)
                };
                let after = set.first().copied();
                proptest::prop_assert_eq!(c.holder(x), after);
                let changed = (before != after).then_some(()).and(if add { before } else { after });
                proptest::prop_assert_eq!(reported, changed);
            }
            let contested = model.values().filter(|s| s.len() > 1).count();
            proptest::prop_assert_eq!(c.contested(), contested);
        }
    }
}
