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

/// Claims on IPs by claimants of type `T`, each IP's claimants in priority
/// order (the first holds it).
#[derive(Debug)]
pub struct IpClaims<T> {
    by_ip: HashMap<IpAddr, SmallVec<[T; 1]>>,
}

impl<T> Default for IpClaims<T> {
    fn default() -> Self {
        IpClaims {
            by_ip: HashMap::new(),
        }
    }
}

impl<T: Copy + Eq> IpClaims<T> {
    /// `who` claims `ip`; `before(a, b)` is true when `a` has priority over
    /// `b`. Returns the holder `who` displaced, if any.
    pub fn claim(&mut self, ip: IpAddr, who: T, before: impl Fn(T, T) -> bool) -> Option<T> {
        let list = self.by_ip.entry(ip).or_default();
        if list.contains(&who) {
            return None;
        }
        let pos = list
            .iter()
            .position(|&c| before(who, c))
            .unwrap_or(list.len());
        list.insert(pos, who);
        (pos == 0 && list.len() > 1).then(|| list[1])
    }

    /// `who` gives up `ip`. Returns the claimant that holds it now, if `who`
    /// held it and someone else was waiting.
    pub fn release(&mut self, ip: IpAddr, who: T) -> Option<T> {
        let list = self.by_ip.get_mut(&ip)?;
        let pos = list.iter().position(|&c| c == who)?;
        list.remove(pos);
        let next = (pos == 0).then(|| list.first().copied()).flatten();
        if list.is_empty() {
            self.by_ip.remove(&ip);
        }
        next
    }

    /// Who holds `ip`.
    pub fn holder(&self, ip: IpAddr) -> Option<T> {
        self.by_ip.get(&ip).and_then(|l| l.first().copied())
    }

    /// IPs more than one claimant reports.
    pub fn contested(&self) -> usize {
        self.by_ip.values().filter(|l| l.len() > 1).count()
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
}
