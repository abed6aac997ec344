//! A small least-recently-used cache of whole blocks.
//!
//! Blocks are immutable (a key always names the same bytes), so a cached block is never stale
//! and nothing ever needs invalidating; the cache only has to forget the oldest when full.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;
use shared::BlockKey;

/// Whole blocks, by key, at most `capacity` of them.
pub struct BlockCache {
    capacity: usize,
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    /// Advances on every use; the smallest stamp is the least recently used entry.
    clock: u64,
    entries: HashMap<BlockKey, (Bytes, u64)>,
    by_stamp: BTreeMap<u64, BlockKey>,
}

impl BlockCache {
    pub fn new(capacity: usize) -> Self {
        BlockCache {
            capacity,
            inner: Mutex::new(Lru::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The block, marked as just used.
    pub fn get(&self, key: &BlockKey) -> Option<Bytes> {
        let mut lru = self.lock();
        lru.clock += 1;
        let stamp = lru.clock;
        let (data, old_stamp) = {
            let entry = lru.entries.get_mut(key)?;
            let old = entry.1;
            entry.1 = stamp;
            (entry.0.clone(), old)
        };
        lru.by_stamp.remove(&old_stamp);
        lru.by_stamp.insert(stamp, *key);
        Some(data)
    }

    pub fn contains(&self, key: &BlockKey) -> bool {
        self.lock().entries.contains_key(key)
    }

    /// Adds a block, forgetting the least recently used ones beyond the capacity.
    pub fn insert(&self, key: BlockKey, data: Bytes) {
        if self.capacity == 0 {
            return;
        }
        let mut lru = self.lock();
        lru.clock += 1;
        let stamp = lru.clock;
        if let Some((_, old_stamp)) = lru.entries.insert(key, (data, stamp)) {
            lru.by_stamp.remove(&old_stamp);
        }
        lru.by_stamp.insert(stamp, key);
        while lru.entries.len() > self.capacity {
            let Some((_, oldest)) = lru.by_stamp.pop_first() else {
                break;
            };
            lru.entries.remove(&oldest);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
