//! The multiplexer's table of watchers: a slab indexed from the wire watch id, plus a map
//! from the watchers' stable ids for the commands.
//!
//! Every response names its watcher by wire id, and at a burst of responses (one per
//! watcher) each look-up reaches memory that is cold in the cache. Here it is one array
//! access to one entry (the multiplexer keeps an entry in one cache line) instead of a hash
//! probe through control bytes to a bucket that straddles two lines. Commands (create,
//! cancel, resume, progress) are rare and go through the id map.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A multiplicative hash for sequential integer ids (the default SipHash is needlessly slow).
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Entries kept when the table empties; a larger table is released.
const KEEP_ENTRIES: usize = 1024;

/// Values by stable id, each also reachable by its index (stable while it is in the table;
/// a freed index is reused by a later insert).
pub(super) struct Slots<T> {
    entries: Vec<Option<T>>,
    ids: HashMap<u64, u32, BuildHasherDefault<IdHasher>>,
    free: Vec<u32>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots {
            entries: Vec::new(),
            ids: HashMap::default(),
            free: Vec::new(),
        }
    }
}

impl<T> Slots<T> {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.ids.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Insert `value` under `id` (replacing the value already there, at the same index).
    /// Returns its index.
    pub(super) fn insert(&mut self, id: u64, value: T) -> u32 {
        if let Some(&i) = self.ids.get(&id)
            && let Some(e) = self.entries.get_mut(i as usize)
        {
            *e = Some(value);
            return i;
        }
        let i = match self.free.pop() {
            Some(i) => {
                if let Some(e) = self.entries.get_mut(i as usize) {
                    *e = Some(value);
                }
                i
            }
            None => {
                // More than 2^32 watchers in one table cannot be held in memory anyway.
                let i = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
                self.entries.push(Some(value));
                i
            }
        };
        self.ids.insert(id, i);
        i
    }

    /// The index of `id`'s entry.
    pub(super) fn index_of(&self, id: u64) -> Option<u32> {
        self.ids.get(&id).copied()
    }

    #[cfg(test)]
    fn get(&self, id: u64) -> Option<&T> {
        self.at(u64::from(self.index_of(id)?))
    }

    pub(super) fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        let i = self.index_of(id)?;
        self.at_mut(u64::from(i))
    }

    /// The entry at `index` (any number: out of range is `None`).
    #[inline]
    pub(super) fn at(&self, index: u64) -> Option<&T> {
        self.entries.get(usize::try_from(index).ok()?)?.as_ref()
    }

    #[inline]
    pub(super) fn at_mut(&mut self, index: u64) -> Option<&mut T> {
        self.entries.get_mut(usize::try_from(index).ok()?)?.as_mut()
    }

    pub(super) fn remove(&mut self, id: u64) -> Option<T> {
        let i = self.ids.remove(&id)?;
        let value = self.entries.get_mut(i as usize)?.take();
        if self.ids.is_empty() {
            self.release();
        } else {
            self.free.push(i);
        }
        value
    }

    /// The ids and values, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.ids
            .iter()
            .filter_map(|(&id, &i)| Some((id, self.entries.get(i as usize)?.as_ref()?)))
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.entries.iter_mut().filter_map(Option::as_mut)
    }

    /// Remove every value.
    pub(super) fn drain(&mut self) -> Vec<T> {
        let all = self.entries.drain(..).flatten().collect();
        self.ids.clear();
        self.release();
        all
    }

    /// The table is empty: forget the free list, and give back a large table.
    fn release(&mut self) {
        self.free.clear();
        self.entries.clear();
        if self.entries.capacity() > KEEP_ENTRIES {
            self.entries = Vec::new();
            self.free = Vec::new();
            self.ids = HashMap::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_indexes_find_the_same_value() {
        let mut s = Slots::default();
        assert!(s.is_empty());
        let a = s.insert(10, "a");
        let b = s.insert(11, "b");
        assert_ne!(a, b);
        assert_eq!(s.len(), 2);
        assert_eq!(s.get(10), Some(&"a"));
        assert_eq!(s.at(u64::from(b)), Some(&"b"));
        assert_eq!(s.index_of(11), Some(b));
        // Replacing keeps the index.
        assert_eq!(s.insert(10, "a2"), a);
        assert_eq!(s.at(u64::from(a)), Some(&"a2"));
        if let Some(v) = s.get_mut(11) {
            *v = "b2";
        }
        assert_eq!(s.at(u64::from(b)), Some(&"b2"));
        // Out of range and absent are None, never a panic.
        assert_eq!(s.at(u64::MAX), None);
        assert_eq!(s.at(99), None);
        assert_eq!(s.get(12), None);
        let mut seen: Vec<_> = s.iter().map(|(id, v)| (id, *v)).collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![(10, "a2"), (11, "b2")]);
    }

    #[test]
    fn freed_indexes_are_reused_and_an_empty_table_is_reset() {
        let mut s = Slots::default();
        let a = s.insert(1, 1);
        let _b = s.insert(2, 2);
        assert_eq!(s.remove(1), Some(1));
        assert_eq!(s.remove(1), None);
        assert_eq!(s.at(u64::from(a)), None);
        // The freed index serves the next watcher.
        assert_eq!(s.insert(3, 3), a);
        assert_eq!(s.get(3), Some(&3));
        for v in s.values_mut() {
            *v += 10;
        }
        let mut all = s.drain();
        all.sort_unstable();
        assert_eq!(all, vec![12, 13]);
        assert!(s.is_empty());
        assert_eq!(s.get(2), None);
        // Emptied: indexes start over.
        assert_eq!(s.insert(4, 4), 0);
        assert_eq!(s.remove(4), Some(4));
        assert_eq!(s.insert(5, 5), 0);
    }
}
