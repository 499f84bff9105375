//! A vector of slots with typed, reusable ids: the index's tables refer to
//! each other by small ids instead of names or pointers.

use std::marker::PhantomData;

/// A typed slot id.
pub struct Id<T>(u32, PhantomData<fn() -> T>);

impl<T> Id<T> {
    fn new(i: usize) -> Id<T> {
        // Ids are u32 to halve the size of the many id lists; four billion
        // live objects of one kind would exhaust memory long before this.
        Id(u32::try_from(i).unwrap_or(u32::MAX), PhantomData)
    }

    /// The slot number.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl<T> Clone for Id<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Id<T> {}
impl<T> PartialEq for Id<T> {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0
    }
}
impl<T> Eq for Id<T> {}
impl<T> PartialOrd for Id<T> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for Id<T> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.cmp(&o.0)
    }
}
impl<T> std::hash::Hash for Id<T> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.hash(h)
    }
}
impl<T> std::fmt::Debug for Id<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Slots holding `T`, with freed slots reused.
pub struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Stores `value` and returns its id.
    pub fn insert(&mut self, value: T) -> Id<T> {
        self.len += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(value);
                Id(i, PhantomData)
            }
            None => {
                self.slots.push(Some(value));
                Id::new(self.slots.len() - 1)
            }
        }
    }

    /// Makes room for `n` more values.
    pub fn reserve(&mut self, n: usize) {
        self.slots.reserve(n.saturating_sub(self.free.len()));
    }

    /// Removes and returns the value at `id`.
    pub fn remove(&mut self, id: Id<T>) -> Option<T> {
        let v = self.slots.get_mut(id.index())?.take();
        if v.is_some() {
            self.len -= 1;
            self.free.push(id.0);
        }
        v
    }

    /// The value at `id`, if the slot is in use.
    pub fn get(&self, id: Id<T>) -> Option<&T> {
        self.slots.get(id.index())?.as_ref()
    }

    /// The value at `id`, mutably.
    pub fn get_mut(&mut self, id: Id<T>) -> Option<&mut T> {
        self.slots.get_mut(id.index())?.as_mut()
    }

    /// Number of values stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every (id, value).
    pub fn iter(&self) -> impl Iterator<Item = (Id<T>, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|v| (Id::new(i), v)))
    }
}

impl<T> std::ops::Index<Id<T>> for Slab<T> {
    type Output = T;
    /// Ids are only ever taken from live slots and removed from every list
    /// before their slot is freed; a dangling id is a bug in the index.
    fn index(&self, id: Id<T>) -> &T {
        match self.get(id) {
            Some(v) => v,
            None => panic!("dangling index id {id:?}"),
        }
    }
}

impl<T> std::ops::IndexMut<Id<T>> for Slab<T> {
    fn index_mut(&mut self, id: Id<T>) -> &mut T {
        match self.get_mut(id) {
            Some(v) => v,
            None => panic!("dangling index id {id:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused() {
        let mut s: Slab<&str> = Slab::default();
        let a = s.insert("a");
        let b = s.insert("b");
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None);
        let c = s.insert("c");
        assert_eq!(c, a);
        assert_eq!(s[b], "b");
        assert_eq!(s.len(), 2);
        assert_eq!(
            s.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
            vec!["c", "b"]
        );
    }
}
