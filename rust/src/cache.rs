//! A bounded table cache keyed by host offset (or table index), with least-recently-used
//! eviction in O(log n) and dirty tracking (write-back: an evicted dirty table is handed to the
//! caller to write, or never evicted at all with [`TableCache::insert_clean`]).

use std::collections::{BTreeMap, HashMap};

struct Slot<V> {
    value: V,
    dirty: bool,
    used: u64,
}

/// Bounded cache of tables (L2 tables, refcount blocks).
pub struct TableCache<V> {
    map: HashMap<u64, Slot<V>>,
    /// `used` tick -> key, oldest first.
    order: BTreeMap<u64, u64>,
    capacity: usize,
    tick: u64,
}

impl<V> TableCache<V> {
    /// A cache holding at most `capacity` (>= 1) tables (more only while they are dirty and
    /// were inserted with [`TableCache::insert_clean`] pressure).
    pub fn new(capacity: usize) -> Self {
        TableCache { map: HashMap::new(), order: BTreeMap::new(), capacity: capacity.max(1), tick: 0 }
    }

    fn touch(&mut self, key: u64) -> Option<&mut Slot<V>> {
        self.tick += 1;
        let t = self.tick;
        let s = self.map.get_mut(&key)?;
        self.order.remove(&s.used);
        s.used = t;
        self.order.insert(t, key);
        Some(s)
    }

    /// The table at `key`, marking it recently used.
    pub fn get(&mut self, key: u64) -> Option<&V> {
        self.touch(key).map(|s| &s.value)
    }

    /// Mutable access; marks the table dirty.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        self.touch(key).map(|s| {
            s.dirty = true;
            &mut s.value
        })
    }

    /// Drops a table (dirty or not): the caller freed it.
    pub fn remove(&mut self, key: u64) {
        self.remove_slot(key);
    }

    fn remove_slot(&mut self, key: u64) -> Option<Slot<V>> {
        let s = self.map.remove(&key)?;
        self.order.remove(&s.used);
        Some(s)
    }

    fn put(&mut self, key: u64, value: V, dirty: bool) {
        self.tick += 1;
        if let Some(old) = self.map.insert(key, Slot { value, dirty, used: self.tick }) {
            self.order.remove(&old.used);
        }
        self.order.insert(self.tick, key);
    }

    /// Inserts a table. If the cache is full, the least recently used table is evicted and, if
    /// it was dirty, returned so that the caller writes it back.
    pub fn insert(&mut self, key: u64, value: V, dirty: bool) -> Option<(u64, V)> {
        let mut evicted = None;
        if !self.map.contains_key(&key) && self.map.len() >= self.capacity {
            if let Some((_, &k)) = self.order.iter().next() {
                if let Some(s) = self.remove_slot(k) {
                    if s.dirty {
                        evicted = Some((k, s.value));
                    }
                }
            }
        }
        self.put(key, value, dirty);
        evicted
    }

    /// Inserts a clean table, evicting only clean tables: a dirty one is never dropped (the
    /// cache then holds more than its capacity until the owner writes its dirty tables back).
    pub fn insert_clean(&mut self, key: u64, value: V) {
        if !self.map.contains_key(&key) && self.map.len() >= self.capacity {
            let victim = self.order.values().copied().find(|k| self.map.get(k).is_some_and(|s| !s.dirty));
            if let Some(k) = victim {
                self.remove_slot(k);
            }
        }
        self.put(key, value, false);
    }

    /// Keys of dirty tables, sorted.
    pub fn dirty_keys(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.map.iter().filter(|(_, s)| s.dirty).map(|(&k, _)| k).collect();
        v.sort_unstable();
        v
    }

    /// Whether any table is dirty.
    pub fn has_dirty(&self) -> bool {
        self.map.values().any(|s| s.dirty)
    }

    /// Marks a table clean (after writing it back).
    pub fn mark_clean(&mut self, key: u64) {
        if let Some(s) = self.map.get_mut(&key) {
            s.dirty = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_lru_and_returns_dirty() {
        let mut c = TableCache::new(2);
        assert!(c.insert(1, "a", false).is_none());
        assert!(c.insert(2, "b", true).is_none());
        c.get(1);
        // 2 is least recently used and dirty: handed back.
        assert_eq!(c.insert(3, "c", false), Some((2, "b")));
        c.get(1);
        // 3 is LRU and clean: dropped silently.
        assert_eq!(c.insert(4, "d", false), None);
        assert!(c.get(3).is_none());
        assert_eq!(c.get(1), Some(&"a"));
    }

    #[test]
    fn clean_inserts_never_drop_dirty_tables() {
        let mut c = TableCache::new(2);
        c.insert(1, "a", true);
        c.insert(2, "b", true);
        c.insert_clean(3, "c");
        assert_eq!(c.map.len(), 3);
        assert_eq!(c.dirty_keys(), vec![1, 2]);
        c.insert_clean(4, "d");
        // 3 was the only clean one.
        assert!(c.get(3).is_none());
        assert_eq!(c.map.len(), 3);
    }
}
