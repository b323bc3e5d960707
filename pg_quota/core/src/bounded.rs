//! A map bounded in entries and in bytes, for what a backend keeps between calls (policy rows,
//! policy selections, channel facts). Past either bound it starts over: a backend serves a
//! bounded working set, and what it forgets it reads again. Entries larger than the byte bound
//! are not kept at all. Sizes are the caller's estimate of what an entry holds on the heap.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

pub struct BoundedMap<K, V> {
    map: HashMap<K, (V, usize)>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl<K: Hash + Eq, V> BoundedMap<K, V> {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        BoundedMap {
            map: HashMap::new(),
            bytes: 0,
            max_entries,
            max_bytes,
        }
    }

    pub fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.map.get(key).map(|(v, _)| v)
    }

    pub fn contains_key<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.map.contains_key(key)
    }

    /// Keeps `value` under `key`, taking `bytes`; starts over first when either bound would be
    /// passed.
    pub fn insert(&mut self, key: K, value: V, bytes: usize) {
        if bytes > self.max_bytes {
            self.map.remove(&key).inspect(|(_, old)| self.bytes -= old);
            return;
        }
        if let Some((_, old)) = self.map.remove(&key) {
            self.bytes -= old;
        }
        if self.map.len() >= self.max_entries || self.bytes + bytes > self.max_bytes {
            self.clear();
        }
        self.bytes += bytes;
        self.map.insert(key, (value, bytes));
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The bytes the entries kept take, by the callers' estimates.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_entries() {
        let mut m = BoundedMap::new(3, 1 << 20);
        for i in 0..3 {
            m.insert(i, i, 1);
        }
        assert_eq!(m.len(), 3);
        m.insert(3, 3, 1);
        assert_eq!((m.len(), m.get(&3)), (1, Some(&3)));
    }

    #[test]
    fn bounded_in_bytes() {
        let mut m = BoundedMap::new(1000, 100);
        m.insert("a", 1, 60);
        m.insert("b", 2, 30);
        assert_eq!((m.len(), m.bytes()), (2, 90));
        m.insert("c", 3, 20); // 110 > 100: starts over
        assert_eq!((m.len(), m.bytes(), m.get("c")), (1, 20, Some(&3)));
        // an entry above the bound is not kept, and does not evict the others
        m.insert("huge", 4, 101);
        assert_eq!((m.len(), m.get("huge")), (1, None));
    }

    #[test]
    fn replacing_an_entry_counts_its_bytes_once() {
        let mut m = BoundedMap::new(10, 100);
        for _ in 0..50 {
            m.insert("k", 0, 40);
        }
        assert_eq!((m.len(), m.bytes()), (1, 40));
    }

    #[test]
    fn never_holds_more_than_its_bounds() {
        let mut m = BoundedMap::new(50, 1000);
        for i in 0..10_000usize {
            m.insert(i, (), i % 97);
            assert!(m.len() <= 50 && m.bytes() <= 1000);
        }
    }
}
