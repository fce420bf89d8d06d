//! A bounded table cache keyed by host offset, with least-recently-used eviction and dirty
//! tracking (write-back: an evicted dirty table is handed to the caller to write).

use std::collections::HashMap;

struct Slot<V> {
    value: V,
    dirty: bool,
    used: u64,
}

/// Bounded cache of tables (L2 tables, refcount blocks) keyed by their host offset.
pub struct TableCache<V> {
    map: HashMap<u64, Slot<V>>,
    capacity: usize,
    tick: u64,
}

impl<V> TableCache<V> {
    /// A cache holding at most `capacity` (>= 1) tables.
    pub fn new(capacity: usize) -> Self {
        TableCache { map: HashMap::new(), capacity: capacity.max(1), tick: 0 }
    }

    /// The table at `key`, marking it recently used.
    pub fn get(&mut self, key: u64) -> Option<&V> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(&key).map(|s| {
            s.used = t;
            &s.value
        })
    }

    /// Mutable access; marks the table dirty.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(&key).map(|s| {
            s.used = t;
            s.dirty = true;
            &mut s.value
        })
    }

    /// Inserts a table. If the cache is full, the least recently used table is evicted and, if
    /// it was dirty, returned so that the caller writes it back.
    pub fn insert(&mut self, key: u64, value: V, dirty: bool) -> Option<(u64, V)> {
        self.tick += 1;
        let mut evicted = None;
        if !self.map.contains_key(&key) && self.map.len() >= self.capacity {
            if let Some((&k, _)) = self.map.iter().min_by_key(|(_, s)| s.used) {
                if let Some(s) = self.map.remove(&k) {
                    if s.dirty {
                        evicted = Some((k, s.value));
                    }
                }
            }
        }
        self.map.insert(key, Slot { value, dirty, used: self.tick });
        evicted
    }

    /// Removes a table (its dirty state is dropped).
    pub fn remove(&mut self, key: u64) -> Option<V> {
        self.map.remove(&key).map(|s| s.value)
    }

    /// Keys of dirty tables, sorted.
    pub fn dirty_keys(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.map.iter().filter(|(_, s)| s.dirty).map(|(&k, _)| k).collect();
        v.sort_unstable();
        v
    }

    /// Marks a table clean (after writing it back).
    pub fn mark_clean(&mut self, key: u64) {
        if let Some(s) = self.map.get_mut(&key) {
            s.dirty = false;
        }
    }

    /// Drops every table.
    pub fn clear(&mut self) {
        self.map.clear();
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
}
