//! The read cache: which blocks fetched from the object store the log keeps, least recently read
//! first out (`--read-cache`).
//!
//! Guarantees:
//! - The blocks it admits never take more than its budget in bytes: admitting one past it
//!   names the least recently read ones, which the caller drops from the block index. Their
//!   bytes stay on the device until the ring reuses the space; nothing points at them.
//! - It only ever holds blocks that are in the store: staged blocks, which the device alone
//!   holds, are never its to drop.
//! - Staging never waits for it: its records do not pin their segments, so the ring reuses
//!   their space like that of any uploaded block, and the caller forgets those that go so.

use std::collections::{BTreeMap, HashMap, HashSet};

use shared::BlockKey;

#[derive(Debug, Default)]
pub(super) struct ReadCache {
    budget: u64,
    bytes: u64,
    next_tick: u64,
    /// Key → (tick of its last read or fill, length).
    by_key: HashMap<BlockKey, (u64, u64)>,
    /// Tick → key: the least recently read first.
    order: BTreeMap<u64, BlockKey>,
    /// Blocks being written again ahead of the ring's reuse (one copy at a time).
    refreshing: HashSet<BlockKey>,
}

impl ReadCache {
    pub fn new(budget: u64) -> ReadCache {
        ReadCache {
            budget,
            ..ReadCache::default()
        }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// (blocks, bytes) held now.
    pub fn held(&self) -> (u64, u64) {
        (self.by_key.len() as u64, self.bytes)
    }

    pub fn contains(&self, key: &BlockKey) -> bool {
        self.by_key.contains_key(key)
    }

    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    /// Takes in a block just written as read cache; returns the blocks that must go to keep
    /// within the budget, least recently read first (never `key` itself unless it alone is
    /// larger than the budget).
    pub fn admit(&mut self, key: BlockKey, len: u64) -> Vec<BlockKey> {
        self.forget(&key);
        let tick = self.tick();
        self.by_key.insert(key, (tick, len));
        self.order.insert(tick, key);
        self.bytes += len;
        let mut out = Vec::new();
        while self.bytes > self.budget {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, len)) = self.by_key.remove(&oldest) {
                self.bytes -= len;
            }
            out.push(oldest);
        }
        out
    }

    /// A read of `key`: it becomes the most recently read.
    pub fn touch(&mut self, key: &BlockKey) {
        let tick = self.tick();
        if let Some((old, _)) = self.by_key.get_mut(key) {
            let old = std::mem::replace(old, tick);
            self.order.remove(&old);
            self.order.insert(tick, *key);
        }
    }

    /// Whether `key` may be written again ahead of the ring now: not while a copy is on its way.
    pub fn begin_refresh(&mut self, key: BlockKey) -> bool {
        self.refreshing.insert(key)
    }

    pub fn end_refresh(&mut self, key: &BlockKey) {
        self.refreshing.remove(key);
    }

    #[cfg(test)]
    pub fn is_refreshing(&self, key: &BlockKey) -> bool {
        self.refreshing.contains(key)
    }

    /// `key` left the index another way (its space reused, or deleted).
    pub fn forget(&mut self, key: &BlockKey) {
        if let Some((tick, len)) = self.by_key.remove(key) {
            self.order.remove(&tick);
            self.bytes -= len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(slice: u64) -> BlockKey {
        BlockKey::new(slice, 0, 100).unwrap()
    }

    #[test]
    fn the_least_recently_read_go_first_and_the_budget_holds() {
        let mut cache = ReadCache::new(300);
        assert!(cache.admit(key(1), 100).is_empty());
        assert!(cache.admit(key(2), 100).is_empty());
        assert!(cache.admit(key(3), 100).is_empty());
        cache.touch(&key(1));
        // 2 is now the least recently read.
        assert_eq!(cache.admit(key(4), 100), vec![key(2)]);
        assert_eq!(cache.held(), (3, 300));
        assert_eq!(cache.admit(key(5), 200), vec![key(3), key(1)]);
        assert_eq!(cache.held(), (2, 300));
        assert!(cache.contains(&key(4)) && cache.contains(&key(5)));
    }

    #[test]
    fn forgetting_and_admitting_again_keep_the_count_exact() {
        let mut cache = ReadCache::new(1000);
        cache.admit(key(1), 100);
        cache.admit(key(1), 100);
        assert_eq!(cache.held(), (1, 100));
        cache.forget(&key(1));
        cache.forget(&key(1));
        cache.touch(&key(1));
        assert_eq!(cache.held(), (0, 0));
    }

    #[test]
    fn a_zero_budget_keeps_nothing() {
        let mut cache = ReadCache::new(0);
        assert_eq!(cache.admit(key(1), 100), vec![key(1)]);
        assert_eq!(cache.held(), (0, 0));
    }
}
