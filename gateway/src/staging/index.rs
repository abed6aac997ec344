//! The block index: what the log holds for each block key, and where.
//!
//! Guarantees:
//! - One entry per key. Blocks are immutable: the first durable record of a key stands, and a
//!   second record (a retried write) is redundant, unless the first was deleted; a write with
//!   other bytes under a held key is refused by the caller before it is staged.
//! - An entry is added only once its record is durable: nothing unacknowledged is ever served.
//! - An entry never outlives its record: when a segment is reused, the entries that pointed into
//!   its previous life are dropped ([`BlockIndex::evict`]). Until then an uploaded block's entry
//!   stays readable, and every read verifies the record against its checksums.

use std::collections::HashMap;
use std::time::Instant;

use shared::BlockKey;

use super::{BlockState, Entry};

#[derive(Default)]
pub(super) struct BlockIndex {
    entries: HashMap<BlockKey, Entry>,
}

impl BlockIndex {
    pub fn get(&self, key: &BlockKey) -> Option<&Entry> {
        self.entries.get(key)
    }

    pub fn get_mut(&mut self, key: &BlockKey) -> Option<&mut Entry> {
        self.entries.get_mut(key)
    }

    /// The live (not deleted) entry of `key`.
    pub fn live(&self, key: &BlockKey) -> Option<&Entry> {
        self.entries
            .get(key)
            .filter(|e| e.state != BlockState::Deleted)
    }

    /// Records a durable block; returns false (and changes nothing) when a live record of the
    /// key already stands.
    pub fn insert(&mut self, key: BlockKey, entry: Entry) -> bool {
        if self.live(&key).is_some() {
            return false;
        }
        self.entries.insert(key, entry);
        true
    }

    /// Drops the entries that point into the previous life (`sequence`) of `segment`; returns
    /// their keys.
    pub fn evict(&mut self, segment: usize, sequence: u64, keys: Vec<BlockKey>) -> Vec<BlockKey> {
        let mut removed = Vec::new();
        for key in keys {
            if self
                .entries
                .get(&key)
                .is_some_and(|e| e.segment == segment && e.segment_sequence == sequence)
            {
                self.entries.remove(&key);
                removed.push(key);
            }
        }
        removed
    }

    /// Drops `key`'s entry (a block the read cache let go).
    pub fn remove(&mut self, key: &BlockKey) {
        self.entries.remove(key);
    }

    pub fn iter(&self) -> impl Iterator<Item = (&BlockKey, &Entry)> {
        self.entries.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&BlockKey, &mut Entry)> {
        self.entries.iter_mut()
    }

    /// Bytes of the blocks that still need to reach the store.
    pub fn pending_bytes(&self) -> u64 {
        self.entries
            .values()
            .filter(|e| e.state.is_pending())
            .map(|e| e.data_len as u64)
            .sum()
    }

    /// A fresh entry for a block just made durable.
    pub fn entry(
        lsn: u64,
        segment: usize,
        segment_sequence: u64,
        device_offset: u64,
        data_len: u32,
        data_crc: u32,
    ) -> Entry {
        Entry {
            lsn,
            segment,
            segment_sequence,
            device_offset,
            data_len,
            data_crc,
            state: BlockState::Staged,
            staged_at: Instant::now(),
            failed_attempts: 0,
            last_error: None,
        }
    }
}
