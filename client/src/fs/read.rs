//! The read path below the file-system core: which block ranges a read needs, and fetching them
//! through a small cache with readahead (DESIGN.md, "Read path and consistency").
//!
//! A read of a file range is planned chunk by chunk: the chunk's slices (from `ReadChunk`) are
//! resolved into segments ([`super::layout::resolve`]), and each segment with data into block
//! pieces. Sequential readers fetch whole blocks, which are cached, and the next block is
//! prefetched; random readers fetch only the bytes asked for. Every fetch of a whole block is a
//! task of its own, shared by all readers that want the block meanwhile, so readahead and the
//! reader that catches up with it fetch the block once.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use shared::BlockKey;

use super::block_api::{BlockHome, BlockSource};
use super::cache::BlockCache;
use super::error::{FsError, FsResult};
use super::layout::{range_pieces, ChunkPiece};
use super::meta_api::{Ino, Slice};

/// Bytes of one block that a read needs, and where they go in the read's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    pub key: BlockKey,
    pub home: BlockHome,
    pub range_in_block: Range<u64>,
    pub offset_in_buf: usize,
}

/// The block ranges that serve `piece` of a read of file `ino`, given the chunk's slices in
/// commit order. Bytes no slice with data covers are not fetched (the buffer already holds
/// zeros there).
pub fn plan_chunk(slices: &[Slice], piece: &ChunkPiece, ino: Ino) -> Vec<Fetch> {
    range_pieces(slices, piece.offset_in_chunk..piece.end_in_chunk())
        .into_iter()
        .map(|p| Fetch {
            key: p.block.key,
            home: BlockHome {
                gateway_id: p.gateway_id,
                ino,
                chunk_index: piece.chunk_index,
            },
            range_in_block: p.block.range_in_block(),
            offset_in_buf: (piece.offset_in_range + p.offset_in_range) as usize,
        })
        .collect()
}

type BlockFuture = Shared<BoxFuture<'static, FsResult<Bytes>>>;

/// Fetches blocks through the cache, at most once at a time per block.
pub struct BlockFetcher {
    source: BlockSource,
    cache: BlockCache,
    in_flight: Mutex<HashMap<BlockKey, BlockFuture>>,
}

impl BlockFetcher {
    pub fn new(source: BlockSource, cache_bytes: u64) -> Arc<Self> {
        Arc::new(BlockFetcher {
            source,
            cache: BlockCache::new(cache_bytes),
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<BlockKey, BlockFuture>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts fetching the whole block in a task of its own that fills the cache, so it finishes
    /// even if every reader waiting for it gives up.
    fn start_fetch(self: &Arc<Self>, key: BlockKey, home: BlockHome) -> BlockFuture {
        let fetcher = self.clone();
        let task = tokio::spawn(async move {
            let result = fetcher.source.read(key, 0..key.len(), &home).await;
            if let Ok(data) = &result {
                fetcher.cache.insert(key, data.clone());
            }
            fetcher.in_flight().remove(&key);
            result
        });
        async move {
            task.await
                .unwrap_or_else(|e| Err(FsError::Internal(format!("block fetch task: {e}"))))
        }
        .boxed()
        .shared()
    }

    /// The whole block: cached, being fetched, or fetched now.
    pub async fn whole(self: &Arc<Self>, key: BlockKey, home: BlockHome) -> FsResult<Bytes> {
        if let Some(data) = self.cache.get(&key) {
            return Ok(data);
        }
        let fetch = self
            .in_flight()
            .entry(key)
            .or_insert_with(|| self.start_fetch(key, home))
            .clone();
        fetch.await
    }

    /// Bytes `range` of a block: from the cache or a fetch already under way if there is one,
    /// else only those bytes.
    pub async fn range(
        self: &Arc<Self>,
        key: BlockKey,
        home: BlockHome,
        range: Range<u64>,
    ) -> FsResult<Bytes> {
        if let Some(data) = self.cache.get(&key) {
            return sub_range(&key, &data, range);
        }
        let under_way = self.in_flight().get(&key).cloned();
        if let Some(fetch) = under_way {
            return sub_range(&key, &fetch.await?, range);
        }
        self.source.read(key, range, &home).await
    }

    /// Fetches the whole block into the cache in the background, unless it is there already.
    pub fn prefetch(self: &Arc<Self>, key: BlockKey, home: BlockHome) {
        if self.cache.contains(&key) {
            return;
        }
        self.in_flight()
            .entry(key)
            .or_insert_with(|| self.start_fetch(key, home));
    }

    /// Copies every fetch into `buf`, fetching them concurrently. `whole_blocks` fetches (and
    /// caches) whole blocks, for sequential readers.
    pub async fn fill(
        self: &Arc<Self>,
        fetches: &[Fetch],
        whole_blocks: bool,
        buf: &mut [u8],
    ) -> FsResult<()> {
        let loads = fetches.iter().map(|fetch| async move {
            if whole_blocks {
                let block = self.whole(fetch.key, fetch.home).await?;
                sub_range(&fetch.key, &block, fetch.range_in_block.clone())
            } else {
                self.range(fetch.key, fetch.home, fetch.range_in_block.clone())
                    .await
            }
        });
        let loaded = futures::future::try_join_all(loads).await?;
        for (fetch, data) in fetches.iter().zip(loaded) {
            let end = fetch.offset_in_buf + data.len();
            let Some(target) = buf.get_mut(fetch.offset_in_buf..end) else {
                return Err(FsError::Internal(format!(
                    "block {} piece lands outside the read buffer",
                    fetch.key
                )));
            };
            target.copy_from_slice(&data);
        }
        Ok(())
    }

    /// The cache this fetcher fills and reads (clones share it).
    pub fn cache(&self) -> &BlockCache {
        &self.cache
    }

    #[cfg(test)]
    pub fn cached_blocks(&self) -> u64 {
        self.cache.usage().0
    }
}

/// `range` of a whole block, checked against its length.
fn sub_range(key: &BlockKey, block: &Bytes, range: Range<u64>) -> FsResult<Bytes> {
    if range.start > range.end || range.end > block.len() as u64 {
        return Err(FsError::BlockCorrupt {
            key: key.to_string(),
            message: format!("range {range:?} outside a block of {} bytes", block.len()),
        });
    }
    Ok(block.slice(range.start as usize..range.end as usize))
}
