//! Node subnet allocator: hands out `subnet_len` subnets of a cluster CIDR to
//! named owners (Nodes), adopts subnets that owners already hold, and frees
//! them again. Pure data, no I/O. One allocator serves one family; a
//! dual-stack cluster has one per range. Addresses are handled as `u128`
//! so both families share the code.
//!
//! The cluster CIDR is cut into `2^(subnet_len - prefix)` slots. Free slots
//! are kept as a set of maximal disjoint ranges (`start -> end`, end
//! exclusive) in a `BTreeMap`, so every operation is O(log n) in the number
//! of ranges and memory grows with fragmentation, not with the size of the
//! CIDR (a /8 of /30s is 4 million slots and one range). Allocation walks
//! forward from a next-free cursor like kube-controller-manager's cidrset, so
//! a just-freed subnet is not handed to the next Node at once (stale routes
//! or conntrack entries of the old owner age out first) but is reused when
//! the cursor wraps or nothing else is free.
//!
//! Slots can be held back ([`Allocator::set_reserved`]): a Node whose own
//! address lies inside the cluster CIDR must not see that address handed to
//! a pod, so the subnet containing it is never allocated (a Node that
//! already holds it keeps it: podCIDRs never change).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Most bits a node subnet may be longer than its cluster CIDR: slots are
/// counted in a u64 (IPv4 never gets near; IPv6 validation allows 32).
pub const MAX_SLOT_BITS: u8 = 48;

/// Why a subnet could not be allocated or adopted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// The cluster CIDR and subnet length do not describe a usable plan.
    #[error(
        "node subnet length /{subnet_len} must be longer than the cluster CIDR {cluster}, fit the family and be at most 48 bits longer"
    )]
    Plan { cluster: IpNet, subnet_len: u8 },
    /// Every subnet is taken.
    #[error("all {total} /{subnet_len} subnets of {cluster} are allocated")]
    Exhausted {
        cluster: IpNet,
        subnet_len: u8,
        total: u64,
    },
    /// The subnet lies (partly) outside the cluster CIDR.
    #[error("{subnet} is not inside the cluster CIDR {cluster}")]
    Outside { subnet: IpNet, cluster: IpNet },
    /// The subnet overlaps one held by another owner.
    #[error("{subnet} overlaps {other_subnet} of {other}")]
    Taken {
        subnet: IpNet,
        other: String,
        other_subnet: IpNet,
    },
}

/// A contiguous run of slots held by one owner.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holding {
    owner: String,
    /// Number of slots (1 unless an adopted subnet is shorter than subnet_len).
    len: u32,
    /// The subnet as the owner holds it (may differ from the slot run for
    /// an adopted subnet longer than subnet_len).
    subnet: IpNet,
}

/// The allocator. See the module documentation.
#[derive(Debug, Clone)]
pub struct Allocator {
    cluster: IpNet,
    subnet_len: u8,
    total: u64,
    /// Free ranges, start slot -> end slot (exclusive). Maximal: two ranges
    /// never touch.
    free: BTreeMap<u64, u64>,
    free_slots: u64,
    /// Held runs, start slot -> holding.
    held: BTreeMap<u64, Holding>,
    /// Owner -> start slot of its run.
    by_owner: HashMap<String, u64>,
    /// Where the next allocation starts looking.
    cursor: u64,
    /// Slots allocate() never hands out (a Node address lies inside).
    reserved: BTreeSet<u64>,
}

impl Allocator {
    /// An empty allocator for `subnet_len` subnets of `cluster`.
    pub fn new(cluster: IpNet, subnet_len: u8) -> Result<Allocator, IpamError> {
        let cluster = cluster.trunc();
        if subnet_len <= cluster.prefix_len()
            || subnet_len > cluster.max_prefix_len()
            || subnet_len - cluster.prefix_len() > MAX_SLOT_BITS
        {
            return Err(IpamError::Plan {
                cluster,
                subnet_len,
            });
        }
        let total = 1u64 << (subnet_len - cluster.prefix_len());
        let mut free = BTreeMap::new();
        free.insert(0, total);
        Ok(Allocator {
            cluster,
            subnet_len,
            total,
            free,
            free_slots: total,
            held: BTreeMap::new(),
            by_owner: HashMap::new(),
            cursor: 0,
            reserved: BTreeSet::new(),
        })
    }

    /// The cluster CIDR.
    pub fn cluster(&self) -> IpNet {
        self.cluster
    }

    /// The node subnet length.
    pub fn subnet_len(&self) -> u8 {
        self.subnet_len
    }

    /// Subnets in the cluster CIDR.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Free subnets that can be allocated (held-back ones not counted).
    pub fn free(&self) -> u64 {
        self.free_slots - self.reserved_free()
    }

    /// Free subnets held back because a Node address lies inside.
    pub fn reserved_free(&self) -> u64 {
        self.reserved
            .iter()
            .filter(|&&slot| self.is_free(slot))
            .count() as u64
    }

    /// Holds back the subnets containing `addresses` (those outside the
    /// cluster CIDR are ignored), replacing what was held back before.
    pub fn set_reserved(&mut self, addresses: impl IntoIterator<Item = IpAddr>) {
        self.reserved = addresses
            .into_iter()
            .filter(|a| self.cluster.contains(a))
            .map(|a| self.slot_of(a))
            .collect();
    }

    /// The slot holding `address` (inside the cluster CIDR).
    fn slot_of(&self, address: IpAddr) -> u64 {
        let offset = to_u128(address) - to_u128(self.cluster.network());
        // Below 2^MAX_SLOT_BITS: the offset is inside the cluster CIDR.
        (offset >> self.host_bits()) as u64
    }

    /// Address bits of one node subnet.
    fn host_bits(&self) -> u8 {
        self.cluster.max_prefix_len() - self.subnet_len
    }

    /// The subnet of the allocation plan that contains `address`.
    pub fn subnet_containing(&self, address: IpAddr) -> Option<IpNet> {
        if !self.cluster.contains(&address) {
            return None;
        }
        Some(self.slot_subnet(self.slot_of(address)))
    }

    fn is_free(&self, slot: u64) -> bool {
        self.free
            .range(..=slot)
            .next_back()
            .is_some_and(|(_, &e)| e > slot)
    }

    /// Subnets held (adopted subnets shorter than the subnet length count
    /// every slot they cover).
    pub fn allocated(&self) -> u64 {
        self.total - self.free_slots
    }

    /// Number of owners holding a subnet.
    pub fn owners(&self) -> usize {
        self.by_owner.len()
    }

    /// The subnet `owner` holds.
    pub fn subnet_of(&self, owner: &str) -> Option<IpNet> {
        let start = self.by_owner.get(owner)?;
        self.held.get(start).map(|h| h.subnet)
    }

    /// Every (owner, subnet), in address order.
    pub fn holdings(&self) -> impl Iterator<Item = (&str, IpNet)> {
        self.held.values().map(|h| (h.owner.as_str(), h.subnet))
    }

    /// Gives `owner` a free subnet, or the one it already holds.
    pub fn allocate(&mut self, owner: &str) -> Result<IpNet, IpamError> {
        if let Some(subnet) = self.subnet_of(owner) {
            return Ok(subnet);
        }
        let slot = self.next_free().ok_or(IpamError::Exhausted {
            cluster: self.cluster,
            subnet_len: self.subnet_len,
            total: self.total,
        })?;
        let subnet = self.slot_subnet(slot);
        self.take(slot, 1);
        self.held.insert(
            slot,
            Holding {
                owner: owner.to_string(),
                len: 1,
                subnet,
            },
        );
        self.by_owner.insert(owner.to_string(), slot);
        self.cursor = (slot + 1) % self.total;
        Ok(subnet)
    }

    /// Records that `owner` holds `subnet` (a Node that already has a
    /// podCIDR). The subnet must lie inside the cluster CIDR and overlap no
    /// other owner's; it may be shorter or longer than the subnet length, in
    /// which case every slot it touches is reserved. An owner that held
    /// another subnet gives that one up.
    pub fn claim(&mut self, owner: &str, subnet: IpNet) -> Result<(), IpamError> {
        let subnet = subnet.trunc();
        if !self.cluster.contains(&subnet) {
            return Err(IpamError::Outside {
                subnet,
                cluster: self.cluster,
            });
        }
        if self.subnet_of(owner) == Some(subnet) {
            return Ok(());
        }
        let (start, len) = self.slots_of(subnet);
        if let Some(h) = self.overlapping(start, len).find(|h| h.owner != owner) {
            return Err(IpamError::Taken {
                subnet,
                other: h.owner.clone(),
                other_subnet: h.subnet,
            });
        }
        self.release(owner);
        // Checked above: no other owner overlaps and our own run is gone,
        // so every slot of the run is free.
        self.take(start, len);
        self.held.insert(
            start,
            Holding {
                owner: owner.to_string(),
                len: len as u32,
                subnet,
            },
        );
        self.by_owner.insert(owner.to_string(), start);
        Ok(())
    }

    /// Frees what `owner` holds and returns it.
    pub fn release(&mut self, owner: &str) -> Option<IpNet> {
        let start = self.by_owner.remove(owner)?;
        let holding = self.held.remove(&start)?;
        self.give_back(start, u64::from(holding.len));
        Some(holding.subnet)
    }

    /// The owner of a subnet overlapping `subnet`, if any.
    pub fn owner_overlapping(&self, subnet: IpNet) -> Option<(&str, IpNet)> {
        if !self.cluster.contains(&subnet) {
            return None;
        }
        let (start, len) = self.slots_of(subnet.trunc());
        self.overlapping(start, len)
            .next()
            .map(|h| (h.owner.as_str(), h.subnet))
    }

    fn slot_subnet(&self, slot: u64) -> IpNet {
        let base = to_u128(self.cluster.network());
        let addr = base + (u128::from(slot) << self.host_bits());
        let ip = match self.cluster {
            // slot < total keeps addr inside the cluster CIDR, a u32.
            IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(addr as u32)),
            IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(addr)),
        };
        // Provably infallible: subnet_len <= the family's length (new()).
        IpNet::new(ip, self.subnet_len).expect("prefix length fits the family")
    }

    /// Slot run covering `subnet` (which lies inside the cluster CIDR).
    fn slots_of(&self, subnet: IpNet) -> (u64, u64) {
        let start = self.slot_of(subnet.network());
        let len = if subnet.prefix_len() >= self.subnet_len {
            1
        } else {
            1u64 << (self.subnet_len - subnet.prefix_len())
        };
        (start, len)
    }

    /// Holdings overlapping slots `[start, start+len)`.
    fn overlapping(&self, start: u64, len: u64) -> impl Iterator<Item = &Holding> {
        let end = start + len;
        // The run starting at or before `start` may reach into the range.
        let before = self
            .held
            .range(..start)
            .next_back()
            .filter(move |(s, h)| **s + u64::from(h.len) > start)
            .map(|(_, h)| h);
        before
            .into_iter()
            .chain(self.held.range(start..end).map(|(_, h)| h))
    }

    /// The first free slot at or after the cursor that is not held back,
    /// wrapping around.
    fn next_free(&self) -> Option<u64> {
        if self.free_slots == 0 {
            return None;
        }
        // The range holding the cursor (from the cursor on), the ranges
        // after it, then from the start again (wrapped).
        let holding = self
            .free
            .range(..=self.cursor)
            .next_back()
            .filter(|(_, e)| **e > self.cursor)
            .map(|(&s, &e)| (self.cursor.max(s), e));
        let after = self.free.range(self.cursor + 1..).map(|(&s, &e)| (s, e));
        let wrapped = self.free.range(..=self.cursor).map(|(&s, &e)| (s, e));
        for (start, end) in holding.into_iter().chain(after).chain(wrapped) {
            let mut slot = start;
            for &r in self.reserved.range(start..end) {
                if r != slot {
                    break;
                }
                slot += 1;
            }
            if slot < end {
                return Some(slot);
            }
        }
        None
    }

    /// Removes the free slots `[start, start+len)`, which lie inside one free range.
    fn take(&mut self, start: u64, len: u64) {
        let end = start + len;
        let Some((&s, &e)) = self.free.range(..=start).next_back() else {
            return;
        };
        debug_assert!(s <= start && end <= e, "taking slots that are not free");
        self.free.remove(&s);
        if s < start {
            self.free.insert(s, start);
        }
        if end < e {
            self.free.insert(end, e);
        }
        self.free_slots -= len;
    }

    /// Returns the slots `[start, start+len)` to the free set, merging neighbours.
    fn give_back(&mut self, start: u64, len: u64) {
        let mut s = start;
        let mut e = start + len;
        if let Some((&ps, &pe)) = self.free.range(..start).next_back()
            && pe == start
        {
            self.free.remove(&ps);
            s = ps;
        }
        if let Some(ne) = self.free.remove(&e) {
            e = ne;
        }
        self.free.insert(s, e);
        self.free_slots += len;
    }
}

/// An address as a number (IPv4 in the low 32 bits).
fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    use ipnet::Ipv4Net;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_subnets_allocate_claim_and_hold_back_like_ipv4() {
        let mut a = Allocator::new(net("fd00:10:244::/56"), 64).unwrap();
        assert_eq!(a.total(), 256);
        assert_eq!(a.allocate("a"), Ok(net("fd00:10:244::/64")));
        assert_eq!(a.allocate("b"), Ok(net("fd00:10:244:1::/64")));
        // An adopted /64 and a conflicting claim.
        assert_eq!(a.claim("c", net("fd00:10:244:ff::/64")), Ok(()));
        assert!(matches!(
            a.claim("d", net("fd00:10:244:ff::/64")),
            Err(IpamError::Taken { .. })
        ));
        assert!(matches!(
            a.claim("d", net("fd00:10:245::/64")),
            Err(IpamError::Outside { .. })
        ));
        // A Node address inside the range holds its /64 back.
        a.set_reserved(["fd00:10:244:2::7".parse().unwrap()]);
        assert_eq!(a.allocate("e"), Ok(net("fd00:10:244:3::/64")));
        assert_eq!(
            a.subnet_containing("fd00:10:244:2::7".parse().unwrap()),
            Some(net("fd00:10:244:2::/64"))
        );
        // The other family never matches.
        assert_eq!(a.subnet_containing("10.0.0.1".parse().unwrap()), None);
        assert!(matches!(
            a.claim("f", net("10.244.0.0/24")),
            Err(IpamError::Outside { .. })
        ));
        // A /32 of /64s is 2^32 slots (the validation limit); the top one works.
        let mut big = Allocator::new(net("2001:db8::/32"), 64).unwrap();
        assert_eq!(big.total(), 1 << 32);
        assert_eq!(big.claim("top", net("2001:db8:ffff:ffff::/64")), Ok(()));
        assert_eq!(big.allocated(), 1);
        // Beyond what a u64 slot count holds: refused, not wrapped.
        assert!(Allocator::new(net("fd00::/8"), 120).is_err());
        assert!(Allocator::new(net("fd00::/56"), 129).is_err());
    }

    #[test]
    fn allocates_distinct_subnets_in_order() {
        let mut a = Allocator::new(net("10.244.0.0/16"), 24).unwrap();
        assert_eq!(a.total(), 256);
        assert_eq!(a.allocate("n1").unwrap(), net("10.244.0.0/24"));
        assert_eq!(a.allocate("n2").unwrap(), net("10.244.1.0/24"));
        assert_eq!(
            a.allocate("n1").unwrap(),
            net("10.244.0.0/24"),
            "idempotent"
        );
        assert_eq!(a.allocated(), 2);
        assert_eq!(a.free(), 254);
    }

    #[test]
    fn exhaustion_and_reuse_of_freed_subnets() {
        // A /28 cluster holds four /30 subnets.
        let mut a = Allocator::new(net("10.0.0.0/28"), 30).unwrap();
        for n in ["a", "b", "c", "d"] {
            a.allocate(n).unwrap();
        }
        assert!(matches!(
            a.allocate("e"),
            Err(IpamError::Exhausted { total: 4, .. })
        ));
        assert_eq!(a.release("b"), Some(net("10.0.0.4/30")));
        assert_eq!(a.allocate("e").unwrap(), net("10.0.0.4/30"));
        assert_eq!(a.release("nobody"), None);
    }

    #[test]
    fn cursor_does_not_hand_out_a_just_freed_subnet_first() {
        let mut a = Allocator::new(net("10.0.0.0/24"), 26).unwrap();
        a.allocate("a").unwrap();
        a.allocate("b").unwrap();
        a.release("a");
        assert_eq!(a.allocate("c").unwrap(), net("10.0.0.128/26"));
        assert_eq!(a.allocate("d").unwrap(), net("10.0.0.192/26"));
        // Wrapped: the freed one comes back.
        assert_eq!(a.allocate("e").unwrap(), net("10.0.0.0/26"));
    }

    #[test]
    fn claims_adopt_and_detect_conflicts() {
        let mut a = Allocator::new(net("10.244.0.0/16"), 24).unwrap();
        a.claim("n1", net("10.244.5.0/24")).unwrap();
        assert_eq!(a.subnet_of("n1"), Some(net("10.244.5.0/24")));
        assert_eq!(
            a.claim("n2", net("10.244.5.0/24")),
            Err(IpamError::Taken {
                subnet: net("10.244.5.0/24"),
                other: "n1".into(),
                other_subnet: net("10.244.5.0/24"),
            })
        );
        assert!(matches!(
            a.claim("n3", net("10.0.0.0/24")),
            Err(IpamError::Outside { .. })
        ));
        // A wider subnet reserves every slot it covers.
        a.claim("wide", net("10.244.8.0/23")).unwrap();
        assert_eq!(a.allocated(), 3);
        assert!(matches!(
            a.claim("n4", net("10.244.9.0/24")),
            Err(IpamError::Taken { other, .. }) if other == "wide"
        ));
        // A narrower one reserves its whole slot.
        a.claim("narrow", net("10.244.20.128/25")).unwrap();
        assert!(a.claim("n5", net("10.244.20.0/25")).is_err());
        // Allocation skips everything claimed.
        let mut seen = BTreeSet::new();
        while let Ok(s) = a.allocate(&format!("x{}", seen.len())) {
            assert!(seen.insert(s));
            for (owner, held) in [
                ("n1", net("10.244.5.0/24")),
                ("wide", net("10.244.8.0/23")),
                ("narrow", net("10.244.20.128/25")),
            ] {
                assert!(
                    !held.contains(&s) && !s.contains(&held),
                    "{s} overlaps {owner}"
                );
            }
        }
        assert_eq!(seen.len(), 256 - 4);
        // Re-claiming moves an owner and frees its old subnet.
        assert_eq!(a.release("x0"), Some(net("10.244.0.0/24")));
        a.claim("n1", net("10.244.0.0/24")).unwrap();
        assert_eq!(a.subnet_of("n1"), Some(net("10.244.0.0/24")));
        assert_eq!(a.allocate("y").unwrap(), net("10.244.5.0/24"));
    }

    #[test]
    fn subnets_holding_node_addresses_are_never_allocated() {
        let mut a = Allocator::new(net("10.0.0.0/24"), 26).unwrap();
        // A Node's address in the first and third /26; one outside.
        a.set_reserved([
            "10.0.0.7".parse().unwrap(),
            "10.0.0.130".parse().unwrap(),
            "192.168.1.1".parse().unwrap(),
        ]);
        assert_eq!(a.free(), 2);
        assert_eq!(a.reserved_free(), 2);
        assert_eq!(a.allocate("a").unwrap(), net("10.0.0.64/26"));
        assert_eq!(a.allocate("b").unwrap(), net("10.0.0.192/26"));
        assert!(matches!(a.allocate("c"), Err(IpamError::Exhausted { .. })));
        assert_eq!((a.allocated(), a.free()), (2, 0));
        // A Node that already holds such a subnet keeps it (adoption).
        a.claim("old", net("10.0.0.0/26")).unwrap();
        assert_eq!(a.reserved_free(), 1);
        // Once freed it stays held back.
        a.release("old");
        assert!(a.allocate("d").is_err());
        // The address moves away: the subnet is free again.
        a.set_reserved(["10.0.0.130".parse().unwrap()]);
        assert_eq!(a.allocate("d").unwrap(), net("10.0.0.0/26"));
        assert_eq!(
            a.subnet_containing("10.0.0.131".parse().unwrap()),
            Some(net("10.0.0.128/26"))
        );
        assert_eq!(a.subnet_containing("10.0.1.1".parse().unwrap()), None);
    }

    #[test]
    fn held_back_slots_are_skipped_from_the_cursor_and_after_wrapping() {
        let mut a = Allocator::new(net("10.0.0.0/28"), 30).unwrap();
        a.allocate("a").unwrap(); // .0/30, cursor at slot 1
        a.set_reserved(["10.0.0.5".parse().unwrap(), "10.0.0.9".parse().unwrap()]);
        assert_eq!(a.allocate("b").unwrap(), net("10.0.0.12/30"));
        a.release("a");
        // Wrapped to the start: slot 0 is free, 1 and 2 are held back.
        assert_eq!(a.allocate("c").unwrap(), net("10.0.0.0/30"));
        assert!(a.allocate("d").is_err());
    }

    #[test]
    fn rejects_impossible_plans() {
        assert!(Allocator::new(net("10.0.0.0/24"), 24).is_err());
        assert!(Allocator::new(net("10.0.0.0/24"), 33).is_err());
        assert_eq!(
            Allocator::new(net("0.0.0.0/0"), 30).unwrap().total(),
            1 << 30
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Allocate(u8),
        Release(u8),
        Claim(u8, u32, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => any::<u8>().prop_map(|o| Op::Allocate(o % 40)),
            2 => any::<u8>().prop_map(|o| Op::Release(o % 40)),
            1 => (any::<u8>(), any::<u32>(), 20u8..=30).prop_map(|(o, a, l)| Op::Claim(o % 40, a, l)),
        ]
    }

    proptest! {
        /// Whatever happens, holdings never overlap, always lie inside the
        /// cluster CIDR, and the counters add up.
        #[test]
        fn never_overlaps_and_stays_inside(ops in proptest::collection::vec(op(), 1..200)) {
            // A /24 of /28s: 16 subnets for up to 40 owners, so exhaustion happens.
            let cluster = net("10.1.2.0/24");
            let mut a = Allocator::new(cluster, 28).unwrap();
            for op in ops {
                match op {
                    Op::Allocate(o) => { let _ = a.allocate(&format!("n{o}")); }
                    Op::Release(o) => { a.release(&format!("n{o}")); }
                    Op::Claim(o, addr, len) => {
                        // Mostly inside the cluster CIDR, sometimes not.
                        let addr = if addr % 5 == 0 { addr } else { (to_u128(cluster.network()) as u32) | (addr & 0xff) };
                        let subnet = IpNet::V4(Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap().trunc());
                        let _ = a.claim(&format!("n{o}"), subnet);
                    }
                }
                let held: Vec<(String, IpNet)> =
                    a.holdings().map(|(o, s)| (o.to_string(), s)).collect();
                for (i, (o1, s1)) in held.iter().enumerate() {
                    prop_assert!(cluster.contains(s1), "{s1} of {o1} outside {cluster}");
                    prop_assert_eq!(a.subnet_of(o1), Some(*s1));
                    for (o2, s2) in &held[i + 1..] {
                        prop_assert!(!s1.contains(s2) && !s2.contains(s1), "{o1} {s1} overlaps {o2} {s2}");
                    }
                }
                prop_assert_eq!(a.owners(), held.len());
                prop_assert_eq!(a.allocated() + a.free(), a.total());
                let slots: u64 = held.iter().map(|(_, s)| if s.prefix_len() >= 28 { 1 } else { 1u64 << (28 - s.prefix_len()) }).sum();
                prop_assert_eq!(slots, a.allocated());
            }
        }

        /// Whatever Node addresses are held back, and wherever the cursor
        /// is, no allocation contains one, and every other subnet is handed out.
        #[test]
        fn allocations_avoid_held_back_addresses(
            addrs in proptest::collection::vec(0u32..256, 0..20),
            churn in 0usize..20,
        ) {
            let mut a = Allocator::new(net("10.7.0.0/24"), 28).unwrap();
            for i in 0..churn {
                a.allocate(&format!("tmp{i}")).unwrap();
                if i % 3 != 0 { a.release(&format!("tmp{i}")); }
            }
            let addrs: Vec<IpAddr> = addrs.iter().map(|o| IpAddr::V4(Ipv4Addr::new(10, 7, 0, *o as u8))).collect();
            a.set_reserved(addrs.iter().copied());
            let held_back: BTreeSet<u32> = addrs.iter().map(|ip| (to_u128(*ip) as u32) >> 4).collect();
            let mut n = 0;
            while let Ok(s) = a.allocate(&format!("n{n}")) {
                n += 1;
                for ip in &addrs {
                    prop_assert!(!s.contains(ip), "{s} holds Node address {ip}");
                }
            }
            prop_assert_eq!(a.free(), 0);
            prop_assert_eq!(a.allocated() + a.reserved_free(), a.total());
            let reserved_and_free = held_back.len() as u64 - a.holdings().filter(|(_, s)| held_back.contains(&((to_u128(s.network()) as u32) >> 4))).count() as u64;
            prop_assert_eq!(a.reserved_free(), reserved_and_free);
        }

        /// When the CIDR is full, freeing any subnet makes exactly that one
        /// the next allocation.
        #[test]
        fn freed_subnets_are_reused(victim in 0u8..16, churn in 0usize..50) {
            let mut a = Allocator::new(net("10.9.0.0/24"), 28).unwrap();
            for i in 0..churn {
                a.allocate(&format!("tmp{i}")).unwrap();
                a.release(&format!("tmp{i}"));
            }
            for i in 0..16 { a.allocate(&format!("n{i}")).unwrap(); }
            prop_assert!(a.allocate("late").is_err());
            let freed = a.release(&format!("n{victim}")).unwrap();
            prop_assert_eq!(a.allocate("late").unwrap(), freed);
        }
    }

    #[test]
    fn five_thousand_nodes_fill_and_refill() {
        let mut a = Allocator::new(net("10.0.0.0/8"), 24).unwrap();
        for i in 0..5_000 {
            a.allocate(&format!("n{i}")).unwrap();
        }
        for i in (0..5_000).step_by(2) {
            a.release(&format!("n{i}"));
        }
        let mut seen: BTreeSet<IpNet> = a.holdings().map(|(_, s)| s).collect();
        for i in 0..2_500 {
            assert!(seen.insert(a.allocate(&format!("m{i}")).unwrap()));
        }
        assert_eq!(a.owners(), 5_000);
    }
}
