//! The readers' cache of whole blocks, bounded in bytes.
//!
//! Blocks are immutable (a key always names the same bytes), so a cached block is never stale
//! and nothing ever needs invalidating; the cache only has to choose what to forget when full.
//! It is a `moka` cache weighed by block length (TinyLFU admission, LRU eviction: one sequential
//! scan does not flush blocks that are read again and again).

use bytes::Bytes;
use shared::BlockKey;

/// Whole blocks, by key, at most `capacity_bytes` of them in all. Clones share one cache: the
/// writer adds the small blocks it writes, the readers find them there.
#[derive(Clone)]
pub struct BlockCache {
    cache: moka::sync::Cache<BlockKey, Bytes>,
}

impl BlockCache {
    pub fn new(capacity_bytes: u64) -> Self {
        BlockCache {
            cache: moka::sync::Cache::builder()
                .max_capacity(capacity_bytes)
                // Blocks are at most 4 MiB: the weight always fits.
                .weigher(|_key, data: &Bytes| u32::try_from(data.len()).unwrap_or(u32::MAX))
                .build(),
        }
    }

    pub fn get(&self, key: &BlockKey) -> Option<Bytes> {
        let found = self.cache.get(key);
        match found {
            Some(_) => metrics::counter!("stagefs_block_cache_hits_total").increment(1),
            None => metrics::counter!("stagefs_block_cache_misses_total").increment(1),
        }
        found
    }

    pub fn contains(&self, key: &BlockKey) -> bool {
        self.cache.contains_key(key)
    }

    /// Adds a block; the cache forgets others (or this one) to stay within its bytes.
    pub fn insert(&self, key: BlockKey, data: Bytes) {
        self.cache.insert(key, data);
    }

    /// Blocks and bytes held, once pending evictions are applied.
    #[cfg(test)]
    pub fn usage(&self) -> (u64, u64) {
        self.cache.run_pending_tasks();
        (self.cache.entry_count(), self.cache.weighted_size())
    }
}
