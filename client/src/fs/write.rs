//! The write path below the file-system core: dirty slices of one file, their blocks streamed
//! to the gateway, and their commits (DESIGN.md, "Write path and the durability contract").
//!
//! - A write lands in the file's dirty slices, cut at chunk boundaries. Each chunk has a current
//!   slice; a write that continues it exactly is appended, any other write starts a new slice, so
//!   a slice is append-only and later slices shadow earlier ones like committed ones do.
//! - A slice is cut into blocks as it grows. Each block is handed to an upload task the moment it
//!   fills (4 MiB), so a sequential writer streams to the gateway while it writes.
//! - [`DirtyFile::flush`] (for `flush`, `fsync`, `release`, truncation, or too much dirty data)
//!   freezes every slice, uploads its last partial block, waits until every block is durable and
//!   then commits the slices in the order they were written, so shadowing on the engine matches
//!   what this client showed. Only then does it return: close-to-open and the durability contract
//!   both hang on that.
//! - Before any block of a slice is written, the slice is recorded as pending with the engine
//!   (`RecordPendingSlice`) covering at least that block, so a client that dies mid-way leaves
//!   nothing behind that the engine does not know how to clean up.
//! - A slice that is one block none of which was sent yet (a small file, an append before
//!   `fsync`) takes all three steps in one call instead, `write_slice`, where the gateway serves
//!   the metadata too. Each try gets a fresh slice id, so a retry after a lost answer can never
//!   commit one id twice; at worst it commits the same bytes again, shadowing the first copy.
//! - Each slice is staged on the gateway [`GatewayDirectory::route`] chooses for its chunk. A
//!   gateway that cannot be reached fails the flush's writes to it; the flush then stages those
//!   slices again, under fresh ids, wherever the directory now sends them (another live
//!   gateway, or the same one once it is back), for up to the directory's takeover wait.
//! - A gateway whose device is above its high-water mark answers a block (or a `write_slice`)
//!   with "write through": the block is PUT to the object store from here, and the slice is
//!   committed as usual, naming that gateway (which then answers reads with "not here", so
//!   readers go to the store). Its blocks go straight to the store for [`WRITE_THROUGH_FOR`].
//! - Failures keep the data: a block whose upload failed is uploaded again by the next flush, and
//!   slices not yet committed stay dirty. Blocks are immutable and commits idempotent, so repeating
//!   either is safe.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::ObjectStore;
use shared::BlockKey;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::block_api::{BlockApi, StoreBlocks};
use super::cache::BlockCache;
use super::error::{FsError, FsResult};
use super::gateways::{GatewayDirectory, Route};
use super::layout::{chunk_pieces, BLOCK_SIZE, CHUNK_SIZE};
use super::meta_api::{
    now_ns, Attr, CommitAttrs, GatewayId, Ino, MetaApi, SessionId, SetAttr, Slice,
};

/// What every file's write path shares: the services, the session, slice ids, upload slots.
pub struct WriteContext {
    pub meta: Arc<dyn MetaApi>,
    /// Where each new slice is staged.
    pub gateways: Arc<dyn GatewayDirectory>,
    pub session: SessionId,
    slice_ids: SliceIdPool,
    /// Bounds the blocks being written to the gateway at once, across all files.
    upload_slots: Arc<Semaphore>,
    /// Small slices go with their commit in one `write_slice` call; cleared for good when the
    /// metadata service answers that it cannot.
    write_slices: AtomicBool,
    /// Blocks written through to the store when a gateway asks for it; `None` for a mount not
    /// given the store (a tenant confined to a directory), whose blocks all go to gateways.
    store: Option<StoreBlocks>,
    /// Gateways that asked for writes through, and until when their blocks skip them.
    writing_through: Mutex<HashMap<GatewayId, Instant>>,
    /// Blocks of a file beyond its first this many bytes go straight to the store (the
    /// gateway's `--direct-threshold`); 0: none.
    pub direct_threshold: u64,
    /// The readers' cache, given the block of each small slice this mount writes and commits in
    /// one call: a file read back on this mount right after its `close` (a compiler's output, a
    /// package's files) costs no call. Large blocks are left out: a checkpoint would only push
    /// out what readers use.
    written_blocks: Option<BlockCache>,
}

impl WriteContext {
    pub fn new(
        meta: Arc<dyn MetaApi>,
        gateways: Arc<dyn GatewayDirectory>,
        session: SessionId,
        slice_id_batch: u32,
        max_concurrent_uploads: usize,
        write_slices: bool,
        store: Option<Arc<dyn ObjectStore>>,
    ) -> Self {
        WriteContext {
            meta,
            gateways,
            session,
            slice_ids: SliceIdPool::new(slice_id_batch),
            upload_slots: Arc::new(Semaphore::new(max_concurrent_uploads.max(1))),
            write_slices: AtomicBool::new(write_slices),
            store: store.map(StoreBlocks::new),
            writing_through: Mutex::new(HashMap::new()),
            direct_threshold: 0,
            written_blocks: None,
        }
    }

    /// Puts the block of every small slice written and committed in one call into `cache`.
    pub fn with_block_cache(mut self, cache: BlockCache) -> Self {
        self.written_blocks = Some(cache);
        self
    }

    /// With `--direct-threshold`: the blocks of a file beyond its first `threshold` bytes go
    /// straight to the store.
    pub fn with_direct_threshold(mut self, threshold: u64) -> Self {
        self.direct_threshold = threshold;
        self
    }

    /// Gateway `id` asked for writes through: its blocks go to the store for a while.
    fn write_through(&self, id: GatewayId) {
        if self.store.is_none() {
            return;
        }
        let mut through = self
            .writing_through
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if through
            .insert(id, Instant::now() + WRITE_THROUGH_FOR)
            .is_none()
        {
            tracing::info!(
                gateway = %uuid::Uuid::from_bytes(id),
                "gateway device above its high-water mark: writing blocks through to the store"
            );
        }
    }

    /// Whether blocks for gateway `id` go straight to the store now.
    fn writes_through(&self, id: &GatewayId) -> bool {
        let mut through = self
            .writing_through
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match through.get(id) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                through.remove(id);
                false
            }
            None => false,
        }
    }

    async fn next_slice_id(&self) -> FsResult<u64> {
        self.slice_ids.next(self.meta.as_ref(), self.session).await
    }
}

/// Slice ids fetched from the engine in batches, so a new slice rarely costs a round trip.
struct SliceIdPool {
    batch: u32,
    ids: tokio::sync::Mutex<Range<u64>>,
}

impl SliceIdPool {
    fn new(batch: u32) -> Self {
        SliceIdPool {
            batch: batch.max(1),
            ids: tokio::sync::Mutex::new(0..0),
        }
    }

    async fn next(&self, meta: &dyn MetaApi, session: SessionId) -> FsResult<u64> {
        let mut ids = self.ids.lock().await;
        if ids.is_empty() {
            let fresh = meta.allocate_slice_ids(session, self.batch).await?;
            // Id 0 means "hole"; an engine never hands it out, but a slice with it would read
            // as zeros, so it is skipped rather than trusted.
            *ids = fresh.start.max(1)..fresh.end;
            if ids.is_empty() {
                return Err(FsError::MetaProtocol {
                    op: "allocate_slice_ids",
                    message: format!("empty id range {fresh:?}"),
                });
            }
        }
        let id = ids.start;
        ids.start += 1;
        Ok(id)
    }
}

/// A slice whose blocks are being staged: what its upload tasks share.
struct StagedSlice {
    slice_id: u64,
    offset_in_chunk: u32,
    /// The gateway its blocks go to.
    route: Route,
    /// Bytes of the slice cut into blocks so far (the whole slice once frozen).
    sealed_len: AtomicU64,
    /// Length the engine has recorded as pending for this session, grown before each block.
    recorded_len: tokio::sync::Mutex<u64>,
}

impl StagedSlice {
    fn slice(&self, len: u64) -> Slice {
        Slice {
            slice_id: self.slice_id,
            offset_in_chunk: self.offset_in_chunk,
            // A slice never crosses a chunk, so its length fits; saturate rather than wrap.
            len: u32::try_from(len).unwrap_or(u32::MAX),
            gateway_id: self.route.id,
        }
    }

    /// Makes sure the engine's pending record covers the first `needed` bytes. One call records
    /// everything sealed so far, so blocks that filled meanwhile need no call of their own.
    async fn ensure_recorded(&self, ctx: &WriteContext, needed: u64) -> FsResult<()> {
        let mut recorded = self.recorded_len.lock().await;
        if *recorded >= needed {
            return Ok(());
        }
        let len = self.sealed_len.load(Ordering::Acquire).max(needed);
        ctx.meta
            .record_pending_slice(ctx.session, &self.slice(len))
            .await?;
        *recorded = len;
        Ok(())
    }
}

/// Where one block's upload stands.
enum Upload {
    NotStarted,
    Running(JoinHandle<FsResult<()>>),
    Done,
    Failed(FsError),
}

/// A block of a dirty slice: full, or the last one of a frozen slice.
struct SealedBlock {
    data: Bytes,
    upload: Upload,
}

/// How long blocks for a gateway that asked for writes through go straight to the store before
/// it is asked again.
const WRITE_THROUGH_FOR: Duration = Duration::from_secs(2);

/// First pause before a flush stages again the slices a gateway did not take; doubles up to 2 s.
const RESTAGE_PAUSE: Duration = Duration::from_millis(200);

/// A write at least this large starts its block with the whole block's buffer.
const LARGE_WRITE: usize = 64 * 1024;

/// Bytes written to one chunk that are not committed yet.
struct DirtySlice {
    ino: Ino,
    chunk_index: u64,
    offset_in_chunk: u64,
    blocks: Vec<SealedBlock>,
    /// The block being filled.
    tail: Vec<u8>,
    /// No more appends: the tail has become the last block.
    frozen: bool,
    /// Set once the slice has an id (when its first block is sealed).
    staged: Option<Arc<StagedSlice>>,
    /// The file's write policy is `through`: blocks go to the store, not to a gateway.
    write_through: bool,
}

impl DirtySlice {
    fn sealed_len(&self) -> u64 {
        self.blocks.iter().map(|b| b.data.len() as u64).sum()
    }

    fn len(&self) -> u64 {
        self.sealed_len() + self.tail.len() as u64
    }

    fn end_in_chunk(&self) -> u64 {
        self.offset_in_chunk + self.len()
    }

    fn file_start(&self) -> u64 {
        self.chunk_index * CHUNK_SIZE + self.offset_in_chunk
    }

    /// The slice's bytes as (offset in slice, bytes) runs: its blocks, then the tail.
    fn runs(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let blocks = self
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| (i as u64 * BLOCK_SIZE, &b.data[..]));
        let tail_start = self.sealed_len();
        blocks.chain(std::iter::once((tail_start, &self.tail[..])))
    }

    /// Appends bytes; seals every block that fills.
    fn append(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = BLOCK_SIZE as usize - self.tail.len();
            let take = room.min(data.len());
            if self.tail.is_empty() && take == BLOCK_SIZE as usize {
                // A whole block in one piece: no need to go through the tail buffer.
                self.seal(Bytes::copy_from_slice(&data[..take]));
            } else {
                if self.tail.is_empty() && take >= LARGE_WRITE {
                    // A large writer will fill the block: allocate it once rather than let the
                    // Vec double its way there, copying everything at each step.
                    self.tail.reserve_exact(BLOCK_SIZE as usize);
                }
                self.tail.extend_from_slice(&data[..take]);
                if self.tail.len() == BLOCK_SIZE as usize {
                    let full = std::mem::take(&mut self.tail);
                    self.seal(Bytes::from(full));
                }
            }
            data = &data[take..];
        }
    }

    fn seal(&mut self, data: Bytes) {
        self.blocks.push(SealedBlock {
            data,
            upload: Upload::NotStarted,
        });
    }

    /// No more appends: the tail becomes the last block.
    fn freeze(&mut self) {
        if !self.tail.is_empty() {
            let last = std::mem::take(&mut self.tail);
            self.seal(Bytes::from(last));
        }
        self.frozen = true;
    }

    /// Gives the slice an id if it has none and starts uploading the sealed blocks that are
    /// not uploaded or uploading (failed ones too when `retry_failed`).
    async fn start_uploads(&mut self, ctx: &Arc<WriteContext>, retry_failed: bool) -> FsResult<()> {
        let waiting = |b: &SealedBlock| match b.upload {
            Upload::NotStarted => true,
            Upload::Failed(_) => retry_failed,
            Upload::Running(_) | Upload::Done => false,
        };
        if !self.blocks.iter().any(waiting) {
            return Ok(());
        }
        let staged = self.staged(ctx).await?;
        staged
            .sealed_len
            .store(self.sealed_len(), Ordering::Release);
        for (index, block) in self.blocks.iter_mut().enumerate() {
            if !waiting(block) {
                continue;
            }
            let key = BlockKey::new(staged.slice_id, index as u32, block.data.len() as u32)
                .map_err(|e| FsError::Internal(e.to_string()))?;
            let file_offset =
                self.chunk_index * CHUNK_SIZE + self.offset_in_chunk + index as u64 * BLOCK_SIZE;
            let direct = ctx.direct_threshold > 0 && file_offset >= ctx.direct_threshold;
            let task = tokio::spawn(upload_block(
                ctx.clone(),
                staged.clone(),
                key,
                block.data.clone(),
                self.write_through || direct,
            ));
            block.upload = Upload::Running(task);
        }
        Ok(())
    }

    /// The slice's id and staging state, given on first use.
    async fn staged(&mut self, ctx: &WriteContext) -> FsResult<Arc<StagedSlice>> {
        if let Some(staged) = &self.staged {
            return Ok(staged.clone());
        }
        let route = ctx.gateways.route(self.ino, self.chunk_index).await?;
        let staged = Arc::new(StagedSlice {
            slice_id: ctx.next_slice_id().await?,
            offset_in_chunk: u32::try_from(self.offset_in_chunk).map_err(|_| {
                FsError::Internal(format!("slice offset {} in chunk", self.offset_in_chunk))
            })?,
            route,
            sealed_len: AtomicU64::new(0),
            recorded_len: tokio::sync::Mutex::new(0),
        });
        self.staged = Some(staged.clone());
        Ok(staged)
    }

    /// A frozen slice that can go with its commit in one `write_slice` call: one block, not
    /// sent yet, and a metadata service that takes such calls.
    fn fits_write_slice(&self, ctx: &WriteContext) -> bool {
        ctx.write_slices.load(Ordering::Relaxed)
            && !self.write_through
            && self.frozen
            && self.staged.is_none()
            && self.blocks.len() == 1
            && matches!(self.blocks[0].upload, Upload::NotStarted)
    }

    /// Writes and commits the frozen slice in one call. `None` when the metadata service cannot
    /// (then never tried again): the caller takes the usual steps.
    async fn write_with_commit(
        &mut self,
        ctx: &WriteContext,
        ino: Ino,
        new_size: u64,
        attrs: &CommitAttrs,
    ) -> FsResult<Option<Attr>> {
        let staged = self.staged(ctx).await?;
        let data = self.blocks[0].data.clone();
        let slice = staged.slice(data.len() as u64);
        let meta = staged.route.meta.as_ref().unwrap_or(&ctx.meta);
        let result = meta
            .write_slice(
                ctx.session,
                ino,
                self.chunk_index,
                &slice,
                new_size,
                attrs,
                data.clone(),
            )
            .await;
        match result {
            Ok(attr) => {
                self.blocks[0].upload = Upload::Done;
                if let (Some(cache), [key]) = (&ctx.written_blocks, &slice.block_keys()[..]) {
                    // Committed: these are the bytes its key names from now on, for every reader.
                    cache.insert(*key, data);
                }
                Ok(Some(attr))
            }
            Err(FsError::WriteThrough { .. }) => {
                // Nothing was recorded or staged: the usual steps write the block through.
                ctx.write_through(staged.route.id);
                Ok(None)
            }
            Err(e) => {
                // The next try takes a fresh id: this one may be committed already (a lost
                // answer), and recording it as pending again would let a commit reference it
                // twice.
                self.staged = None;
                if e.is_transient() {
                    ctx.gateways.forget(&staged.route.id);
                }
                if e.errno() != libc::ENOSYS {
                    return Err(e);
                }
                tracing::info!(error = %e, "small slices take three calls from now on");
                ctx.write_slices.store(false, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Waits for every running upload; the first failure, if any.
    async fn wait_uploads(&mut self) -> FsResult<()> {
        let mut first_error = None;
        for block in &mut self.blocks {
            if let Upload::Running(task) = &mut block.upload {
                block.upload = match task.await {
                    Ok(Ok(())) => Upload::Done,
                    Ok(Err(e)) => Upload::Failed(e),
                    Err(e) => Upload::Failed(FsError::Internal(format!("upload task: {e}"))),
                };
            }
            if let Upload::Failed(e) = &block.upload {
                first_error.get_or_insert_with(|| e.clone());
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Stages one block: records the slice as pending far enough, then writes the block to its
/// gateway, or to the store (`write_through`, or when the gateway asks for it).
async fn upload_block(
    ctx: Arc<WriteContext>,
    staged: Arc<StagedSlice>,
    key: BlockKey,
    data: Bytes,
    write_through: bool,
) -> FsResult<()> {
    let _slot = ctx
        .upload_slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| FsError::Internal("upload slots closed".into()))?;
    let block_end = u64::from(key.block_index) * BLOCK_SIZE + key.len();
    staged.ensure_recorded(&ctx, block_end).await?;
    let route = &staged.route;
    let write_through = write_through && ctx.store.is_some();
    if !write_through && !ctx.writes_through(&route.id) {
        match route
            .blocks
            .write_block(ctx.session, key, data.clone())
            .await
        {
            Err(FsError::WriteThrough { .. }) => ctx.write_through(route.id),
            other => return other,
        }
    }
    // Recorded as pending first, like a staged block: a client that dies before the commit
    // leaves an object the session's cleanup deletes.
    let len = key.len();
    let Some(store) = &ctx.store else {
        return Err(FsError::Internal(format!(
            "block {key}: a gateway asked this mount, which has no object store, to write it there"
        )));
    };
    store.write_block(ctx.session, key, data).await?;
    metrics::counter!("stagefs_written_through_bytes_total").increment(len);
    Ok(())
}

/// Every uncommitted byte one client wrote to one file, slices in the order they were started.
#[derive(Default)]
pub struct DirtyFile {
    slices: VecDeque<DirtySlice>,
    bytes: u64,
    /// The file's write policy says `through` (`stagefs policy`): its blocks are PUT to the
    /// object store, so a flush returns once they are there.
    pub write_through: bool,
    /// Mode, owner and times a `chmod`, `chown` or `utimensat` set while data was uncommitted
    /// (never a size): the data's commit sets them, so they cost no call of their own and are
    /// durable with the data (`tar` sets all three on each file it writes). A commit otherwise
    /// sets the mtime to its own time; a write clears an mtime set before it.
    pub set_attrs: SetAttr,
}

impl DirtyFile {
    pub fn is_empty(&self) -> bool {
        self.slices.is_empty()
    }

    /// Bytes held (overwritten ranges count once per write).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }

    /// End of the furthest dirty byte in the file; 0 when clean.
    pub fn end(&self) -> u64 {
        self.slices
            .iter()
            .map(|s| s.file_start() + s.len())
            .max()
            .unwrap_or(0)
    }

    /// Takes in `data` at file offset `offset`; starts uploading every block that filled.
    /// Nothing here fails: an upload that cannot start now is started by the next flush.
    pub async fn write(&mut self, ctx: &Arc<WriteContext>, ino: Ino, offset: u64, data: &[u8]) {
        for piece in chunk_pieces(offset, data.len() as u64) {
            let start = piece.offset_in_range as usize;
            let bytes = &data[start..start + piece.len as usize];
            let current = self
                .slices
                .iter()
                .rposition(|s| s.chunk_index == piece.chunk_index)
                .filter(|&i| {
                    let slice = &self.slices[i];
                    !slice.frozen && slice.end_in_chunk() == piece.offset_in_chunk
                });
            let index = match current {
                Some(index) => index,
                None => {
                    self.slices.push_back(DirtySlice {
                        ino,
                        chunk_index: piece.chunk_index,
                        offset_in_chunk: piece.offset_in_chunk,
                        blocks: Vec::new(),
                        tail: Vec::new(),
                        frozen: false,
                        staged: None,
                        write_through: self.write_through,
                    });
                    self.slices.len() - 1
                }
            };
            let slice = &mut self.slices[index];
            slice.append(bytes);
            self.bytes += piece.len;
            if let Err(e) = slice.start_uploads(ctx, false).await {
                tracing::debug!(error = %e, "block upload not started yet; flush will retry");
            }
        }
    }

    /// Dirty bytes overlapping the file range `[offset, offset + len)`, as (offset in range,
    /// bytes) in the order they were written: later ones overwrite earlier ones.
    pub fn overlay(&self, offset: u64, len: u64) -> Vec<(usize, Bytes)> {
        let end = offset.saturating_add(len);
        let mut pieces = Vec::new();
        for slice in &self.slices {
            let slice_start = slice.file_start();
            if slice_start >= end || slice_start + slice.len() <= offset {
                continue;
            }
            for (run_start, run) in slice.runs() {
                let run_start = slice_start + run_start;
                let from = run_start.max(offset);
                let to = (run_start + run.len() as u64).min(end);
                if from >= to {
                    continue;
                }
                let bytes = &run[(from - run_start) as usize..(to - run_start) as usize];
                pieces.push(((from - offset) as usize, Bytes::copy_from_slice(bytes)));
            }
        }
        pieces
    }

    /// Makes every dirty byte durable and committed: freezes all slices, uploads what is not
    /// uploaded, waits, then commits slices in order. `attr` follows each commit. A gateway that
    /// cannot be reached has its slices staged again wherever the directory sends them now, for
    /// up to its takeover wait. On error the uncommitted slices stay, to be retried.
    pub async fn flush(
        &mut self,
        ctx: &Arc<WriteContext>,
        ino: Ino,
        attr: &mut Attr,
    ) -> FsResult<()> {
        let deadline = Instant::now() + ctx.gateways.takeover_wait();
        let mut pause = RESTAGE_PAUSE;
        loop {
            match self.flush_once(ctx, ino, attr).await {
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    let moved = self.restage_unreachable(ctx);
                    tracing::info!(ino, error = %e, slices = moved, "a gateway did not take a write: staging again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                outcome => return outcome,
            }
        }
    }

    /// Forgets where the slices whose writes could not reach their gateway were staged (and
    /// tells the directory), so the next try stages them afresh: a fresh id, all blocks again.
    /// Their first copies stay pending for this session and are cleaned up with it.
    fn restage_unreachable(&mut self, ctx: &WriteContext) -> usize {
        let mut moved = 0;
        for slice in &mut self.slices {
            let unreachable = slice
                .blocks
                .iter()
                .any(|b| matches!(&b.upload, Upload::Failed(e) if e.is_transient()));
            let Some(staged) = slice.staged.as_ref().filter(|_| unreachable) else {
                continue;
            };
            ctx.gateways.forget(&staged.route.id);
            slice.staged = None;
            for block in &mut slice.blocks {
                block.upload = Upload::NotStarted;
            }
            moved += 1;
        }
        moved
    }

    async fn flush_once(
        &mut self,
        ctx: &Arc<WriteContext>,
        ino: Ino,
        attr: &mut Attr,
    ) -> FsResult<()> {
        if self.slices.is_empty() {
            return Ok(());
        }
        for slice in &mut self.slices {
            slice.freeze();
            if !slice.fits_write_slice(ctx) {
                slice.start_uploads(ctx, true).await?;
            }
        }
        let mut first_error = None;
        for slice in &mut self.slices {
            if let Err(e) = slice.wait_uploads().await {
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        while let Some(slice) = self.slices.front_mut() {
            let len = slice.len();
            let new_size = slice.file_start() + len;
            let mtime_ns = self.set_attrs.mtime_ns.unwrap_or_else(now_ns);
            let attrs = CommitAttrs::new(mtime_ns, &self.set_attrs);
            let written = if slice.fits_write_slice(ctx) {
                slice.write_with_commit(ctx, ino, new_size, &attrs).await?
            } else {
                None
            };
            let committed = match written {
                Some(attr) => attr,
                None => {
                    // `write_slice` was refused (write through) or turned out to be unavailable:
                    // the usual steps, for blocks not written yet (none, for a slice that never
                    // fitted it; the slice may have its id already, so the id says nothing).
                    slice.start_uploads(ctx, true).await?;
                    slice.wait_uploads().await?;
                    let staged = slice.staged.as_ref().ok_or_else(|| {
                        FsError::Internal("a frozen slice with uploaded blocks has no id".into())
                    })?;
                    ctx.meta
                        .commit_slice(
                            ctx.session,
                            ino,
                            slice.chunk_index,
                            &staged.slice(len),
                            new_size,
                            &attrs,
                        )
                        .await?
                }
            };
            // A gateway older than `CommitAttrs` drops them without a word; its answer shows
            // it, and they go as a change of their own.
            let committed = if attrs.shown_by(&committed) {
                committed
            } else {
                ctx.meta.setattr(ino, &attrs.held()).await?
            };
            *attr = committed;
            self.bytes = self.bytes.saturating_sub(len);
            self.slices.pop_front();
        }
        self.set_attrs = SetAttr::default();
        Ok(())
    }
}
