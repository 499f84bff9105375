//! String interning for label keys and values, namespace and port names.
//!
//! A cluster repeats the same few label strings on thousands of pods; each
//! distinct string is stored once and compared by pointer. Interned strings
//! are reference counted, and strings nothing refers to any more are swept
//! when the table has doubled since the last sweep, so churn (every rollout
//! brings a new `pod-template-hash`) does not grow the table forever.

use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

/// An interned string. Two `Sym`s from the same [`Interner`] are equal
/// exactly when their text is equal, and comparing them is a pointer compare.
#[derive(Clone)]
pub struct Sym(Arc<str>);

impl Sym {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The shared text, for callers that keep it beyond the index.
    pub fn as_arc(&self) -> &Arc<str> {
        &self.0
    }
}

impl PartialEq for Sym {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Sym {}

impl Hash for Sym {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.0) as *const u8 as usize).hash(state);
    }
}

impl Deref for Sym {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Sym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Sym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The table of interned strings.
#[derive(Default)]
pub struct Interner {
    set: HashSet<Arc<str>>,
    live_after_sweep: usize,
}

impl Interner {
    /// Returns the interned copy of `s`, adding it if needed.
    pub fn intern(&mut self, s: &str) -> Sym {
        if let Some(existing) = self.set.get(s) {
            return Sym(existing.clone());
        }
        if self.set.len() >= 2 * self.live_after_sweep.max(1024) {
            self.sweep();
        }
        let new: Arc<str> = Arc::from(s);
        self.set.insert(new.clone());
        Sym(new)
    }

    /// Drops every string that only the table still holds.
    pub fn sweep(&mut self) {
        self.set.retain(|s| Arc::strong_count(s) > 1);
        self.live_after_sweep = self.set.len();
    }

    /// Number of strings in the table (live or awaiting a sweep).
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// True when the table holds no string.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_text_is_the_same_symbol() {
        let mut i = Interner::default();
        let a = i.intern("app");
        let b = i.intern(&String::from("app"));
        let c = i.intern("tier");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.as_str(), "app");
        assert_eq!(i.len(), 2);
    }

    #[test]
    fn sweep_drops_unreferenced_strings_only() {
        let mut i = Interner::default();
        let keep = i.intern("keep");
        drop(i.intern("gone"));
        i.sweep();
        assert_eq!(i.len(), 1);
        assert_eq!(i.intern("keep"), keep);
    }

    #[test]
    fn churn_does_not_grow_the_table_without_bound() {
        let mut i = Interner::default();
        let _live = i.intern("live");
        for n in 0..100_000 {
            drop(i.intern(&format!("pod-template-hash-{n}")));
        }
        assert!(i.len() <= 2 * 1024 + 1, "table grew to {}", i.len());
    }
}
