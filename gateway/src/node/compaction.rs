//! Slice compaction. Every commit adds a slice to its chunk, so a log appended to with an `fsync`
//! per line ends up with thousands of slices: every commit rewrites the list and every read
//! resolves it. Once a chunk this gateway commits to holds more than `--compact-slices` slices,
//! the compactor reads the bytes they show, stages them as one fresh slice and swaps it in
//! ([`MetaEngine::swap_compacted`]), which queues the old slices for deletion.
//!
//! What it guarantees:
//! - **Readers never see a mix.** The merged slice holds exactly the bytes the replaced slices
//!   showed, and the swap is one transaction that happens only if the chunk still begins with
//!   the list that was read. A reader that resolved the old list reads the old blocks, which stay
//!   for `--deleted-data-delay` like any deleted data.
//! - **Nothing is lost to a crash.** The merged slice is recorded as pending for the compactor's
//!   own session before its blocks are staged; should the gateway die before the swap, the
//!   session expires and its pending slice is queued for deletion, as any client's would be.
//! - **Bounded work.** One chunk at a time (at most one chunk, 64 MiB, held), a bounded set of
//!   chunks waiting. Leading slices larger than everything after them are left alone, so the
//!   bytes of an append log are rewritten a logarithmic number of times, not at every compaction,
//!   and a chunk holds at most about `--compact-slices` + 26 slices.
//! - **Only bytes it can read.** Blocks staged here, or in the store. A chunk with a block staged
//!   on another gateway and not uploaded yet is left for a later commit; so is every chunk while
//!   the device is above its high-water mark.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt};
use shared::layout::{range_pieces, span};
use shared::BlockKey;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{IncomingBlock, Node};
use crate::meta::{GatewayId, Ino, MetaError, MountView, SessionId, Slice};
use crate::staging::StagingError;
use crate::tasks::{ticker, Tasks};

/// Chunks waiting for the compactor; more are dropped (their next commits ask again).
const WAITING: usize = 256;
/// Chunks whose commits are counted; past it the counts start over (they are only hints).
const COUNTED: usize = 4096;

/// Why a compaction did not happen; the chunk is tried again after more commits.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error(transparent)]
    Block(#[from] super::BlockInputError),
    #[error(transparent)]
    Key(#[from] shared::KeyError),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// Staged on another gateway and not uploaded yet: not readable from here.
    #[error("block {0} is neither staged here nor in the store yet")]
    Unreachable(BlockKey),
    #[error("block {key} from the store is {got} bytes long, not {}", key.len())]
    WrongLength { key: BlockKey, got: usize },
}

/// What one look at a chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `replaced` slices became one of `bytes` bytes.
    Compacted { replaced: usize, bytes: u64 },
    /// Not long enough (any more), or nothing worth merging.
    Short,
    /// The device is above its high-water mark: staging more now would push writers through.
    DeviceFull,
    /// The chunk changed other than by appends meanwhile; the merged slice was queued for
    /// deletion.
    Refused,
}

/// Totals since the start, for `Status` and metrics.
#[derive(Debug, Default)]
pub struct Totals {
    pub chunks: AtomicU64,
    pub slices: AtomicU64,
    pub bytes: AtomicU64,
    pub skipped: AtomicU64,
}

/// The compactor of one gateway: counts commits per chunk and compacts in one background task.
pub struct Compactor {
    /// Compact a chunk once it holds more slices than this; 0: never.
    threshold: usize,
    /// Commits seen per chunk since it was last looked at.
    counts: Mutex<HashMap<(Ino, u64), u32>>,
    wanted: mpsc::Sender<(Ino, u64)>,
    waiting: Mutex<Option<mpsc::Receiver<(Ino, u64)>>>,
    pub totals: Totals,
}

impl Compactor {
    pub fn new(threshold: usize) -> Compactor {
        let (wanted, waiting) = mpsc::channel(WAITING);
        Compactor {
            threshold,
            counts: Mutex::default(),
            wanted,
            waiting: Mutex::new(Some(waiting)),
            totals: Totals::default(),
        }
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// A slice was committed to chunk `chunk_index` of `ino` here. Every `threshold / 2` commits
    /// the chunk is looked at (reading its list on every commit would double their cost).
    pub fn note_commit(&self, ino: Ino, chunk_index: u64) {
        if self.threshold == 0 {
            return;
        }
        let every = (self.threshold / 2).max(1) as u32;
        let due = {
            let mut counts = self.counts.lock().unwrap();
            if counts.len() >= COUNTED && !counts.contains_key(&(ino, chunk_index)) {
                counts.clear();
            }
            let count = counts.entry((ino, chunk_index)).or_insert(0);
            *count += 1;
            if *count >= every {
                counts.remove(&(ino, chunk_index));
                true
            } else {
                false
            }
        };
        if due && self.wanted.try_send((ino, chunk_index)).is_err() {
            tracing::debug!(
                ino,
                chunk_index,
                "compactor busy; the chunk's next commits ask again"
            );
        }
    }
}

/// Where the run to merge starts: past the leading slices each larger than all after it
/// (size-tiered, so merged bytes are not rewritten at every compaction). `None` when the chunk
/// is not over `threshold` or no run of two or more slices is left.
pub fn run_start(slices: &[Slice], threshold: usize) -> Option<usize> {
    if threshold == 0 || slices.len() <= threshold {
        return None;
    }
    let mut rest: u64 = slices.iter().map(|s| u64::from(s.len)).sum();
    let mut from = 0;
    while from + 1 < slices.len() {
        let len = u64::from(slices[from].len);
        rest -= len;
        if len <= rest {
            break;
        }
        from += 1;
    }
    (slices.len() - from >= 2).then_some(from)
}

/// Starts the compactor of `node` in `tasks` (nothing when compaction is off). Its session is
/// heartbeat every `heartbeat_interval` and closed when the group drains.
pub fn start(node: &Arc<Node>, heartbeat_interval: Duration, tasks: &Tasks) {
    if node.compactor.threshold == 0 {
        return;
    }
    let Some(waiting) = node.compactor.waiting.lock().unwrap().take() else {
        return;
    };
    let node = node.clone();
    tasks.spawn("node.compaction", move |stop| async move {
        run(node, waiting, heartbeat_interval, stop).await;
        Ok(())
    });
}

async fn run(
    node: Arc<Node>,
    mut waiting: mpsc::Receiver<(Ino, u64)>,
    heartbeat_interval: Duration,
    stop: CancellationToken,
) {
    let mut session: Option<SessionId> = None;
    let mut beat = ticker(heartbeat_interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = beat.tick() => {
                if let Some(id) = session {
                    if let Err(error) = node.meta.heartbeat(id, &MountView::default()).await {
                        tracing::warn!(%error, "compaction session heartbeat failed");
                        if matches!(error, MetaError::SessionGone(_)) {
                            session = None;
                        }
                    }
                }
            }
            next = waiting.recv() => {
                let Some((ino, chunk_index)) = next else { break };
                match compact(&node, &mut session, ino, chunk_index).await {
                    Ok(outcome) => tracing::debug!(ino, chunk_index, ?outcome, "chunk looked at"),
                    Err(error) => {
                        node.compactor.totals.skipped.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("stagefs_gateway_compactions_skipped_total").increment(1);
                        tracing::warn!(ino, chunk_index, %error, "chunk not compacted; tried again after more commits");
                        if matches!(error, CompactError::Meta(MetaError::SessionGone(_))) {
                            session = None;
                        }
                    }
                }
            }
        }
    }
    if let Some(id) = session {
        if let Err(error) = node.meta.close_session(id).await {
            tracing::warn!(%error, "compaction session not closed; it expires");
        }
    }
}

/// Looks at chunk `chunk_index` of `ino` and compacts it if it is long.
pub async fn compact(
    node: &Node,
    session: &mut Option<SessionId>,
    ino: Ino,
    chunk_index: u64,
) -> Result<Outcome, CompactError> {
    let read = node.meta.read_chunk(ino, chunk_index).await?;
    let Some(from) = run_start(&read, node.compactor.threshold) else {
        return Ok(Outcome::Short);
    };
    if node.high_water.writes_go_through(&node.log) {
        return Ok(Outcome::DeviceFull);
    }
    let run = &read[from..];
    let std::ops::Range { start, end } = span(run);
    let me = node.settings.gateway_id;
    let bytes = BlockReader::new(node, me).read(&read, start..end).await?;
    let session = match *session {
        Some(id) => id,
        None => {
            let description = format!("slice compaction of gateway {}", uuid::Uuid::from_bytes(me));
            *session.insert(node.meta.open_session("", &description).await?)
        }
    };
    let merged = Slice {
        slice_id: node.meta.allocate_slice_ids(session, 1).await?.start,
        offset_in_chunk: start as u32,
        len: (end - start) as u32,
        gateway_id: me,
    };
    node.meta.record_pending_slice(session, &merged).await?;
    for (index, block) in bytes.chunks(shared::BLOCK_SIZE as usize).enumerate() {
        let key = BlockKey::new(merged.slice_id, index as u32, block.len() as u32)?;
        let mut incoming = IncomingBlock::for_key(key, key.to_string().len());
        incoming.append(block)?;
        node.stage(key, incoming.finish(crc32c::crc32c(block))?)
            .await?;
    }
    if !node
        .meta
        .swap_compacted(session, ino, chunk_index, &read, from, &merged)
        .await?
    {
        return Ok(Outcome::Refused);
    }
    let totals = &node.compactor.totals;
    totals.chunks.fetch_add(1, Ordering::Relaxed);
    totals.slices.fetch_add(run.len() as u64, Ordering::Relaxed);
    totals
        .bytes
        .fetch_add(u64::from(merged.len), Ordering::Relaxed);
    metrics::counter!("stagefs_gateway_compacted_chunks_total").increment(1);
    metrics::counter!("stagefs_gateway_compacted_slices_total").increment(run.len() as u64);
    metrics::counter!("stagefs_gateway_compacted_bytes_total").increment(u64::from(merged.len));
    Ok(Outcome::Compacted {
        replaced: run.len(),
        bytes: u64::from(merged.len),
    })
}

/// Reads the bytes a chunk's slices show, from this gateway's staged blocks or the store, one
/// block at a time (the last one kept: consecutive pieces of a read mostly share it).
struct BlockReader<'a> {
    node: &'a Node,
    me: GatewayId,
    last: Option<(BlockKey, Bytes)>,
}

impl<'a> BlockReader<'a> {
    fn new(node: &'a Node, me: GatewayId) -> Self {
        BlockReader {
            node,
            me,
            last: None,
        }
    }

    /// Bytes `range` of the chunk whose slices are `slices`, as a reader sees them.
    async fn read(
        &mut self,
        slices: &[Slice],
        range: std::ops::Range<u64>,
    ) -> Result<Vec<u8>, CompactError> {
        let mut out = vec![0u8; (range.end - range.start) as usize];
        for piece in range_pieces(slices, range) {
            let data = self.block(piece.block.key, piece.gateway_id).await?;
            let to = piece.offset_in_range as usize;
            let from = piece.block.range_in_block();
            out[to..to + piece.block.len as usize]
                .copy_from_slice(&data[from.start as usize..from.end as usize]);
        }
        Ok(out)
    }

    async fn block(&mut self, key: BlockKey, stager: GatewayId) -> Result<Bytes, CompactError> {
        if let Some((last, data)) = &self.last {
            if *last == key {
                return Ok(data.clone());
            }
        }
        let data = if stager == self.me {
            match self.node.log.read_block(&key).await {
                Ok((data, _)) => data,
                Err(StagingError::NotFound(_)) => self.stored_block(key).await?,
                Err(error) => return Err(error.into()),
            }
        } else {
            self.stored_block(key).await?
        };
        self.last = Some((key, data.clone()));
        Ok(data)
    }

    async fn stored_block(&self, key: BlockKey) -> Result<Bytes, CompactError> {
        let store: &dyn ObjectStore = self.node.store.as_ref();
        let data = match store.get(&key.object_path()).await {
            Ok(found) => found.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(CompactError::Unreachable(key))
            }
            Err(error) => return Err(error.into()),
        };
        if data.len() as u64 != key.len() {
            return Err(CompactError::WrongLength {
                key,
                got: data.len(),
            });
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slices(lens: &[u32]) -> Vec<Slice> {
        let mut at = 0;
        lens.iter()
            .enumerate()
            .map(|(i, &len)| {
                let slice = Slice {
                    slice_id: i as u64 + 1,
                    offset_in_chunk: at,
                    len,
                    gateway_id: [1; 16],
                };
                at += len;
                slice
            })
            .collect()
    }

    #[test]
    fn a_short_chunk_is_left_alone() {
        assert_eq!(run_start(&slices(&[100; 8]), 8), None);
        assert_eq!(run_start(&slices(&[100; 9]), 0), None, "0 is off");
        assert_eq!(run_start(&slices(&[100; 9]), 8), Some(0));
    }

    #[test]
    fn leading_slices_larger_than_the_rest_are_left_alone() {
        // 1000 > 40 + 20 + 9 × 1; 40 > 20 + 9; 20 > 9: the run is the nine small ones.
        let mut lens = vec![1000, 40, 20];
        lens.extend([1; 9]);
        assert_eq!(run_start(&slices(&lens), 8), Some(3));
        // A merged slice no larger than what follows is merged again.
        let mut lens = vec![9];
        lens.extend([1; 9]);
        assert_eq!(run_start(&slices(&lens), 8), Some(0));
    }

    #[test]
    fn size_tiers_keep_the_slice_count_bounded() {
        // Appends of one byte, compacted as the compactor would: the count stays near the
        // threshold however many come.
        let threshold = 16;
        let mut lens: Vec<u32> = Vec::new();
        let mut most = 0;
        for _ in 0..100_000 {
            lens.push(1);
            if let Some(from) = run_start(&slices(&lens), threshold) {
                let merged: u32 = lens[from..].iter().sum();
                lens.truncate(from);
                lens.push(merged);
            }
            most = most.max(lens.len());
        }
        assert_eq!(lens.iter().sum::<u32>(), 100_000);
        assert!(most <= threshold + 1 + 17, "{most} slices at most");
    }
}
