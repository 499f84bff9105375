//! Which slice holds which member of a growing object (a PeerSet's
//! members, a PolicyGroup's policies): pure, incremental, deterministic.
//!
//! Every item has a 128-bit *position* hash (a member's hash, a policy's
//! name hash) and a weight (its serialized bytes). The hash space is a
//! binary trie: a prefix is a slice when the items under it weigh at most
//! the budget (or it is at the deepest level); otherwise it is split in
//! two. The slices are therefore a function of the items alone: a
//! restarted controller computes the same ones, and adding or removing an
//! item changes one slice, or two when it pushes a prefix over or under the
//! budget (never a global reshuffle, unlike "hash mod N" where changing N
//! moves every member).
//!
//! Counts, weights and content sums are kept for every prefix down to
//! [`DEPTH`] once the object exceeds its budget (a complete binary tree in
//! one array, about 230 KB per large object; small objects, the vast
//! majority, keep only their totals). An add or remove is O(DEPTH).

use super::fingerprint::Fingerprint;

/// Deepest level of the trie: at most 4,096 slices per object.
pub const DEPTH: u8 = 12;

/// Totals of a prefix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Items.
    pub count: u32,
    /// Sum of their weights.
    pub weight: u64,
    /// Wrapping sum of their content hashes (an order-independent fingerprint).
    pub sum: Fingerprint,
}

impl Stats {
    fn add(&mut self, weight: u64, content: Fingerprint) {
        self.count += 1;
        self.weight += weight;
        self.sum = self.sum.wrapping_add(content);
    }

    fn remove(&mut self, weight: u64, content: Fingerprint) {
        self.count = self.count.saturating_sub(1);
        self.weight = self.weight.saturating_sub(weight);
        self.sum = self.sum.wrapping_sub(content);
    }
}

/// A slice: the items whose position starts with the `depth` bits of
/// `prefix`. Depth 0 is the whole object (it is not sharded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Leaf {
    /// Bits of the prefix.
    pub depth: u8,
    /// The prefix (its `depth` low bits).
    pub prefix: u64,
}

impl Leaf {
    /// The whole object.
    pub const ROOT: Leaf = Leaf {
        depth: 0,
        prefix: 0,
    };

    /// Whether an item at `position` falls in this slice.
    pub fn contains(&self, position: u128) -> bool {
        prefix_of(position, self.depth) == self.prefix
    }
}

/// The first `depth` bits of a position.
pub fn prefix_of(position: u128, depth: u8) -> u64 {
    if depth == 0 {
        0
    } else {
        (position >> (128 - u32::from(depth))) as u64
    }
}

fn index(depth: u8, prefix: u64) -> usize {
    (1usize << depth) + prefix as usize
}

/// The slices of one object. See the module documentation.
#[derive(Clone, Debug)]
pub struct Shards {
    budget: u64,
    total: Stats,
    /// Stats of every prefix down to DEPTH, at `index(depth, prefix)`;
    /// present while the object is (or recently was) over its budget.
    tree: Option<Box<[Stats]>>,
}

impl Shards {
    /// An empty object whose slices may weigh `budget` each.
    pub fn new(budget: u64) -> Shards {
        Shards {
            budget: budget.max(1),
            total: Stats::default(),
            tree: None,
        }
    }

    /// Totals of the whole object.
    pub fn total(&self) -> Stats {
        self.total
    }

    /// More than one slice.
    pub fn is_sharded(&self) -> bool {
        self.total.weight > self.budget
    }

    /// Adds an item. When this returns true the caller must call
    /// [`Shards::rebuild`] with every item before asking for slices.
    #[must_use]
    pub fn add(&mut self, position: u128, weight: u64, content: Fingerprint) -> bool {
        self.total.add(weight, content);
        if let Some(tree) = &mut self.tree {
            for d in 0..=DEPTH {
                tree[index(d, prefix_of(position, d))].add(weight, content);
            }
            false
        } else {
            self.is_sharded()
        }
    }

    /// Removes an item added before with the same values.
    pub fn remove(&mut self, position: u128, weight: u64, content: Fingerprint) {
        self.total.remove(weight, content);
        if let Some(tree) = &mut self.tree {
            for d in 0..=DEPTH {
                tree[index(d, prefix_of(position, d))].remove(weight, content);
            }
            // Small again: drop the tree, with hysteresis so an object
            // hovering at the budget does not rebuild on every change.
            if self.total.weight <= self.budget / 2 {
                self.tree = None;
            }
        }
    }

    /// Recomputes the per-prefix totals from every item (position, weight,
    /// content). O(items); happens when an object first exceeds its budget.
    pub fn rebuild(&mut self, items: impl Iterator<Item = (u128, u64, Fingerprint)>) {
        let mut tree = vec![Stats::default(); 1usize << (DEPTH + 1)].into_boxed_slice();
        let mut total = Stats::default();
        for (position, weight, content) in items {
            total.add(weight, content);
            for d in 0..=DEPTH {
                tree[index(d, prefix_of(position, d))].add(weight, content);
            }
        }
        self.total = total;
        self.tree = Some(tree);
    }

    fn stats(&self, depth: u8, prefix: u64) -> Stats {
        match (&self.tree, depth) {
            (_, 0) => self.total,
            (Some(tree), d) => tree[index(d, prefix)],
            (None, _) => Stats::default(),
        }
    }

    fn is_leaf(&self, depth: u8, prefix: u64) -> bool {
        depth == DEPTH || self.stats(depth, prefix).weight <= self.budget || self.tree.is_none()
    }

    /// The slice that holds (or would hold) an item at `position`.
    pub fn leaf_of(&self, position: u128) -> Leaf {
        let mut depth = 0;
        loop {
            let prefix = prefix_of(position, depth);
            if self.is_leaf(depth, prefix) {
                return Leaf { depth, prefix };
            }
            depth += 1;
        }
    }

    /// Every non-empty slice with its totals, in prefix order; `[ROOT]`
    /// when the object is not sharded (even when empty).
    pub fn leaves(&self) -> Vec<(Leaf, Stats)> {
        if !self.is_sharded() || self.tree.is_none() {
            return vec![(Leaf::ROOT, self.total)];
        }
        let mut out = Vec::new();
        let mut stack = vec![(1u8, 1u64), (1u8, 0u64)];
        while let Some((depth, prefix)) = stack.pop() {
            let s = self.stats(depth, prefix);
            if s.count == 0 {
                continue;
            }
            if self.is_leaf(depth, prefix) {
                out.push((Leaf { depth, prefix }, s));
            } else {
                stack.push((depth + 1, prefix << 1 | 1));
                stack.push((depth + 1, prefix << 1));
            }
        }
        out
    }

    /// The totals of one slice.
    pub fn leaf_stats(&self, leaf: Leaf) -> Stats {
        self.stats(leaf.depth, leaf.prefix)
    }

    /// Whether `leaf` is one of [`Shards::leaves`] now.
    pub fn is_current(&self, leaf: Leaf) -> bool {
        if leaf.depth == 0 || leaf.depth > DEPTH || self.tree.is_none() || !self.is_sharded() {
            return leaf == Leaf::ROOT && !self.is_sharded();
        }
        if leaf.prefix >> leaf.depth != 0 {
            return false;
        }
        self.stats(leaf.depth, leaf.prefix).count > 0
            && self.is_leaf(leaf.depth, leaf.prefix)
            && !self.is_leaf(leaf.depth - 1, leaf.prefix >> 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn pos(i: u64) -> u128 {
        xxhash_rust::xxh3::xxh3_128(&i.to_le_bytes())
    }

    /// Adds items 0..n of weight 10 (content = position).
    fn filled(budget: u64, items: impl Iterator<Item = u64> + Clone) -> Shards {
        let mut s = Shards::new(budget);
        let all: Vec<u64> = items.collect();
        for (k, &i) in all.iter().enumerate() {
            if s.add(pos(i), 10, pos(i)) {
                s.rebuild(all[..=k].iter().map(|&j| (pos(j), 10, pos(j))));
            }
        }
        s
    }

    #[test]
    fn small_objects_are_one_leaf_and_keep_no_tree() {
        let s = filled(1000, 0..50);
        assert!(!s.is_sharded());
        assert!(s.tree.is_none());
        assert_eq!(s.leaves(), vec![(Leaf::ROOT, s.total())]);
        assert_eq!(s.leaf_of(pos(3)), Leaf::ROOT);
        assert_eq!(s.total().count, 50);
    }

    #[test]
    fn large_objects_split_into_leaves_within_the_budget() {
        let s = filled(1000, 0..10_000);
        let leaves = s.leaves();
        assert!(leaves.len() > 100, "{} leaves", leaves.len());
        let mut count = 0;
        for (leaf, st) in &leaves {
            assert!(st.weight <= 1000, "{leaf:?} weighs {}", st.weight);
            count += st.count;
        }
        assert_eq!(count, 10_000, "the leaves partition the items");
        for i in 0..10_000 {
            let leaf = s.leaf_of(pos(i));
            assert!(leaf.contains(pos(i)));
            assert!(leaves.iter().any(|(l, _)| *l == leaf));
            assert!(s.is_current(leaf));
        }
        let (first, _) = leaves[0];
        assert!(!s.is_current(Leaf {
            depth: first.depth + 1,
            prefix: first.prefix << 1
        }));
        assert!(!s.is_current(Leaf::ROOT));
    }

    #[test]
    fn items_heavier_than_the_budget_sit_alone_at_the_deepest_level() {
        let mut s = Shards::new(100);
        assert!(s.add(pos(1), 500, 1));
        s.rebuild([(pos(1), 500, 1)].into_iter());
        assert_eq!(s.leaf_of(pos(1)).depth, DEPTH);
        assert_eq!(s.leaves().len(), 1);
    }

    proptest! {
        /// The slices are a function of the items only (a restart or a
        /// different history computes the same), and one add changes only
        /// the slice that held the item's position (possibly split).
        #[test]
        fn slices_depend_only_on_the_items_and_change_locally(
            items in prop::collection::btree_set(0u64..5000, 0..400),
            extra in 5000u64..6000,
            budget in 20u64..400,
        ) {
            let items: Vec<u64> = items.into_iter().collect();
            let forward = filled(budget, items.iter().copied());
            let backward = filled(budget, items.iter().rev().copied());
            prop_assert_eq!(forward.leaves(), backward.leaves());
            // Built by removing from a larger object.
            let mut shrunk = filled(budget, items.iter().copied().chain([extra]));
            shrunk.remove(pos(extra), 10, pos(extra));
            prop_assert_eq!(shrunk.leaves(), forward.leaves());
            // One more item: only the slices it touches differ.
            let grown = filled(budget, items.iter().copied().chain([extra]));
            let before: BTreeMap<Leaf, Stats> = forward.leaves().into_iter().collect();
            let after: BTreeMap<Leaf, Stats> = grown.leaves().into_iter().collect();
            let home = forward.leaf_of(pos(extra));
            let within = |l: &Leaf| l.depth >= home.depth
                && (l.prefix >> (l.depth - home.depth)) == home.prefix;
            for (l, s) in &before {
                if after.get(l) != Some(s) {
                    prop_assert!(within(l), "{:?} changed, outside {:?}", l, home);
                }
            }
            for l in after.keys() {
                if !before.contains_key(l) {
                    prop_assert!(within(l), "{:?} appeared, outside {:?}", l, home);
                }
            }
            for (l, s) in &after {
                // Only the deepest level may hold more (a hash collision).
                prop_assert!(s.weight <= budget.max(10) || l.depth == DEPTH);
            }
        }
    }
}
