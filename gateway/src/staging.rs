//! The staging log: blocks appended to a ring of segments on the device, acknowledged only once
//! durable (or, for a writer that has the device flushed itself right after, once queued:
//! [`Wait::Queued`], [`StagingLog::sync_device`]), indexed in memory, handed to the upload drain
//! oldest first, and reclaimed segment by segment once nothing in the oldest segment still waits
//! for upload.
//!
//! The state is split by job, each part a module that owns its state and says what it
//! guarantees: [`journal`] (lsns, the segment ring, the write queue and the durability
//! watermark), [`index`] (what is held for each key) and [`uploads`] (the upload order, retries
//! and quarantine, with its policy). This module drives them under one lock, so that a block's
//! state, its segment's pin and its place in the upload queue always change together, and runs
//! the background tasks: the write combiner and the group commit (one `fdatasync` acknowledges
//! every writer below the watermark), reclaim, and bookkeeping. Counters live outside the lock
//! ([`metrics`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shared::BlockKey;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::aligned::{AlignedBuf, ALIGN};
use crate::format::{record_len, RecordHeader, RecordKind, Superblock, RECORD_HEADER_BYTES};
use crate::io::IoEngine;
use crate::recovery::{CorruptRecord, ScanReport};
use crate::tasks::Tasks;

mod index;
mod journal;
pub mod metrics;
mod read_cache;
pub mod uploads;

use index::BlockIndex;
use journal::{Journal, RecordUse, WriteJob};
pub use metrics::Counters;
use metrics::StagingMetrics;
use read_cache::ReadCache;
pub use uploads::UploadPolicy;
use uploads::{Next, UploadQueue};

#[derive(Debug, thiserror::Error, Clone)]
pub enum StagingError {
    #[error("staging device is full: {waiting_bytes} bytes wait for upload and no space was freed within {waited:?}")]
    Full {
        waited: Duration,
        waiting_bytes: u64,
    },
    #[error("staging device failed, the gateway accepts no more writes until restarted: {0}")]
    Failed(String),
    #[error("block {key} is already staged with different content (crc32c {existing:#010x}, now {new:#010x})")]
    Conflict {
        key: String,
        existing: u32,
        new: u32,
    },
    #[error("block {0} is not held by this gateway")]
    NotFound(String),
    #[error("block {key} failed verification on the device: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("device I/O error: {0}")]
    Io(String),
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

impl StagingError {
    /// Whether a caller may retry the same request later and expect it to succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StagingError::Full { .. } | StagingError::Io(_) | StagingError::ShuttingDown
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    Staged,
    Uploading,
    Uploaded,
    Quarantined,
    Deleted,
}

impl BlockState {
    /// Still needs to reach the object store: pins its segment.
    pub fn is_pending(self) -> bool {
        matches!(
            self,
            BlockState::Staged | BlockState::Uploading | BlockState::Quarantined
        )
    }
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub lsn: u64,
    pub segment: usize,
    pub segment_sequence: u64,
    pub device_offset: u64,
    pub data_len: u32,
    pub data_crc: u32,
    pub state: BlockState,
    pub staged_at: Instant,
    pub failed_attempts: u32,
    pub last_error: Option<String>,
}

impl Entry {
    fn record_len(&self, key: &str) -> u64 {
        record_len(key.len(), self.data_len as usize)
    }
}

/// One unit of work for the upload drain.
#[derive(Debug, Clone)]
pub struct UploadJob {
    pub key: BlockKey,
    pub lsn: u64,
    pub entry: Entry,
}

pub enum NextUpload {
    Ready(UploadJob),
    /// Nothing is due before this instant (upload delay or retry backoff).
    WaitUntil(Instant),
    Idle,
}

/// Everything that changes together, under the log's one lock.
struct LogState {
    journal: Journal,
    index: BlockIndex,
    uploads: UploadQueue,
    /// Blocks fetched from the store and kept (`--read-cache`), least recently read first out.
    read_cache: ReadCache,
    waiting_for_space: u64,
    /// When a client's block was last staged: uploads wait for writers to pause.
    last_staged: Option<Instant>,
}

impl LogState {
    /// Drops from the index the blocks the read cache let go (if they are still its: uploaded).
    fn drop_cached(&mut self, keys: Vec<BlockKey>) {
        for key in keys {
            if self
                .index
                .get(&key)
                .is_some_and(|e| e.state == BlockState::Uploaded)
            {
                self.index.remove(&key);
            }
        }
    }
}

/// Above this share of used segments, uploads run outside their window (the device must not
/// fill because of it).
const WINDOW_OVERRIDE_USED: f64 = 0.9;
/// Writers count as paused once no block has been staged for this long.
const WRITERS_PAUSE: Duration = Duration::from_millis(100);
/// From this share of used segments on, uploads no longer wait for writers to pause: the rest
/// of the device is room for the drain to catch up before writes must go through or wait.
const DEFER_UNTIL_USED: f64 = 0.5;

impl LogState {
    /// Whether uploads may run now: inside `--upload-hours`, or at any hour while writers wait
    /// for space or the device is nearly full.
    fn upload_window_open(&self) -> bool {
        let Some(window) = self.uploads.policy.window else {
            return true;
        };
        if window.contains(uploads::local_hour()) || self.waiting_for_space > 0 {
            return true;
        }
        self.used_share() >= WINDOW_OVERRIDE_USED
    }

    /// When the writers staging blocks now will count as paused, if they hold uploads back:
    /// not with `--upload-defer-max 0s`, once the device is half full, or while a writer waits
    /// for space.
    fn writers_pause(&self, now: Instant) -> Option<Instant> {
        let pause = self.last_staged? + WRITERS_PAUSE;
        (pause > now
            && !self.uploads.policy.defer_max.is_zero()
            && self.waiting_for_space == 0
            && self.used_share() < DEFER_UNTIL_USED)
            .then_some(pause)
    }

    /// The share of the device's segments in use.
    fn used_share(&self) -> f64 {
        let (total, free) = self.journal.segment_counts();
        if total == 0 {
            return 0.0;
        }
        (total - free) as f64 / total as f64
    }
}

pub struct RecoveryInfo {
    pub duration: Duration,
    pub blocks: u64,
    pub corrupt: Vec<CorruptRecord>,
}

/// What a write into the log waits for before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The log's own group commit: an `fdatasync` issued after the record was written.
    Durable,
    /// Nothing: the record is queued for its write and indexed at once, and the write overlaps
    /// whatever the caller does next. Another writer of the device (the metadata region) waits
    /// until it and every record before it are written (a recovery scan stops only at a hole,
    /// and then there is none before it) before it writes pages that may name it
    /// ([`StagingLog::wait_queued_written`]), then flushes ([`StagingLog::sync_device`]); a
    /// read of the block waits so too. For a `WriteSlice`
    /// whose commit goes to the metadata in the same device: the block is written while the
    /// commit's transaction is made, and the commit's own flush makes both durable; the commit's
    /// pages never reach the device before the block.
    Queued,
}

pub struct StagingLog {
    engine: Arc<dyn IoEngine>,
    pub sb: Superblock,
    pub device_path: PathBuf,
    state: Mutex<LogState>,
    /// Highest durable lsn, or the reason the log failed (then it accepts no more writes).
    synced: watch::Sender<Result<u64, String>>,
    /// The write watermark: every record up to it is written, with no hole before it, so the
    /// next `fdatasync` of the device makes it durable, whoever issues it ([`Wait::Queued`]).
    written: watch::Sender<u64>,
    /// The highest lsn a writer waits to see durable ([`Wait::Durable`]). A completed write
    /// wakes the group commit only while it is above the durable lsn: a record whose writer
    /// has the device flushed itself right after ([`Wait::Queued`], a `WriteSlice` whose commit
    /// flushes it) must not also start a flush of the log's own, which made every such call
    /// wait for two `fdatasync`s where one covers it.
    durable_wanted: AtomicU64,
    /// The highest lsn queued with [`Wait::Queued`]: a flush for another writer waits until it
    /// is written.
    queued_for_device_sync: AtomicU64,
    sync_kick: Notify,
    write_kick: Notify,
    space_freed: Notify,
    /// Held while upload completions are being written: a flush returns only once every
    /// completion taken before it (by any flush) is durable, or put back.
    flushing: tokio::sync::Mutex<()>,
    reclaim_kick: Notify,
    /// Bumped on every block state change (uploads done, quarantine, delete): wakes waiters.
    changed: watch::Sender<u64>,
    /// Wakes the upload drain: new work, or a pause lifted.
    pub upload_wakeup: Notify,
    full_wait: Duration,
    /// A device write, sync or read that takes longer fails (the device stopped answering).
    device_timeout: Duration,
    /// When the flush that [`StagingLog::sync_device_here`] runs on its caller's thread began:
    /// watched by the bookkeeping task, which fails the log once it outlasts `device_timeout`.
    flushing_here_since: Mutex<Option<Instant>>,
    pub recovery: RecoveryInfo,
    /// The log's own background tasks (write combiner, sync, reclaim, bookkeeping).
    tasks: Tasks,
    metrics: StagingMetrics,
}

/// How the log behaves, fixed when it is opened.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// How long a writer waits for space on a full device.
    pub full_wait: Duration,
    pub uploads_paused: bool,
    /// Bound on one device operation; past it the device counts as failed.
    pub device_timeout: Duration,
    pub upload: UploadPolicy,
    /// Bytes of blocks fetched from the store the log may keep as read cache (0: none).
    pub read_cache_bytes: u64,
}

const META_FLUSH_INTERVAL: Duration = Duration::from_millis(200);
const MAX_META_ENTRIES: usize = 64 * 1024;
/// How long shutdown waits for the log's tasks (a hung device must not hang the exit).
const SHUTDOWN_BOUND: Duration = Duration::from_secs(10);

impl StagingLog {
    /// Builds the log from a recovery scan and starts its sync, reclaim and bookkeeping tasks in
    /// `tasks` (a group of their own: [`StagingLog::shutdown`] drains it). A fatal error anywhere
    /// in the process fails the log, which answers every waiting writer at once.
    pub fn open(
        engine: Arc<dyn IoEngine>,
        sb: Superblock,
        device_path: PathBuf,
        scan: ScanReport,
        scan_duration: Duration,
        config: &LogConfig,
        tasks: Tasks,
    ) -> Arc<Self> {
        let mut journal = Journal::recovered(&sb, &scan);
        let mut index = BlockIndex::default();
        let mut uploads = UploadQueue::new(config.upload.clone(), config.uploads_paused);
        let mut read_cache = ReadCache::new(config.read_cache_bytes);
        let mut cached_out = Vec::new();
        let mut recovered = 0;
        let mut corrupt = scan.corrupt.clone();
        for block in &scan.blocks {
            let key: BlockKey = match block.key.parse() {
                Ok(k) => k,
                Err(e) => {
                    corrupt.push(CorruptRecord {
                        segment: block.segment as u64,
                        device_offset: block.device_offset,
                        key: Some(block.key.clone()),
                        reason: format!("record has a checksum-valid but unusable key: {e}"),
                    });
                    continue;
                }
            };
            let cached = block.header.kind == RecordKind::Cached;
            let state = if scan.deleted.contains(&block.lsn) {
                BlockState::Deleted
            } else if cached || scan.uploaded.contains(&block.lsn) {
                BlockState::Uploaded
            } else {
                BlockState::Staged
            };
            journal.add_key(block.segment, key);
            let mut entry = BlockIndex::entry(
                block.lsn,
                block.segment,
                block.segment_sequence,
                block.device_offset,
                block.header.data_len,
                block.header.data_crc,
            );
            entry.state = state;
            // A second record of an immutable block (a retried write): the first one stands
            // unless it was deleted.
            if !index.insert(key, entry) {
                continue;
            }
            if cached && state == BlockState::Uploaded {
                // In lsn order: the least recent fills go first when the budget shrank.
                cached_out.extend(read_cache.admit(key, key.len()));
            }
            if state == BlockState::Staged {
                journal.pin(block.segment);
                recovered += 1;
                if let Err(held) = uploads.push(block.lsn, key) {
                    // Never two blocks under one lsn; should it happen, neither is dropped from
                    // sight: this one waits in quarantine (shown in Status) instead of being
                    // silently left out of the queue.
                    tracing::error!(lsn = block.lsn, %key, %held, "two recovered blocks share an lsn; the later one is quarantined");
                    corrupt.push(CorruptRecord {
                        segment: block.segment as u64,
                        device_offset: block.device_offset,
                        key: Some(key.to_string()),
                        reason: format!("shares lsn {} with block {held}; quarantined", block.lsn),
                    });
                    if let Some(entry) = index.get_mut(&key) {
                        entry.state = BlockState::Quarantined;
                    }
                }
            }
        }
        let mut state = LogState {
            journal,
            index,
            uploads,
            read_cache,
            waiting_for_space: 0,
            last_staged: None,
        };
        state.drop_cached(cached_out);
        for c in &corrupt {
            tracing::error!(segment = c.segment, device_offset = c.device_offset, key = ?c.key, reason = %c.reason, "corrupt record found during recovery; it is never served or uploaded");
        }
        let log = Arc::new(StagingLog {
            engine,
            sb,
            device_path,
            synced: watch::channel(Ok(scan.max_lsn)).0,
            written: watch::channel(scan.max_lsn).0,
            durable_wanted: AtomicU64::new(0),
            queued_for_device_sync: AtomicU64::new(0),
            state: Mutex::new(state),
            sync_kick: Notify::new(),
            write_kick: Notify::new(),
            space_freed: Notify::new(),
            flushing: tokio::sync::Mutex::new(()),
            reclaim_kick: Notify::new(),
            changed: watch::channel(0).0,
            upload_wakeup: Notify::new(),
            full_wait: config.full_wait,
            device_timeout: config.device_timeout,
            flushing_here_since: Mutex::new(None),
            recovery: RecoveryInfo {
                duration: scan_duration,
                blocks: recovered,
                corrupt,
            },
            tasks,
            metrics: StagingMetrics::default(),
        });
        type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
        let jobs: [(&'static str, Task); 4] = [
            ("staging.write", Box::pin(log.clone().write_task())),
            ("staging.sync", Box::pin(log.clone().sync_task())),
            ("staging.reclaim", Box::pin(log.clone().reclaim_task())),
            (
                "staging.bookkeeping",
                Box::pin(log.clone().meta_flush_task()),
            ),
        ];
        for (name, job) in jobs {
            log.tasks.spawn(name, |stop| async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = job => {}
                }
                Ok(())
            });
        }
        log.tasks.spawn("staging.failed-device", |stop| {
            log.clone().exit_when_drained(stop)
        });
        let weak = Arc::downgrade(&log);
        log.tasks.on_fatal(move |fatal| {
            if let Some(log) = weak.upgrade() {
                log.fail(fatal.to_string());
            }
        });
        log.reclaim_kick.notify_one();
        log
    }

    /// Fails the log: every writer waiting for durability or space is answered at once, and no
    /// write is accepted from now on. Reads and uploads of what is staged go on.
    pub fn fail(&self, reason: String) {
        self.synced.send_if_modified(|synced| {
            if synced.is_err() {
                return false;
            }
            *synced = Err(reason);
            true
        });
        self.space_freed.notify_waiters();
        self.changed.send_modify(|v| *v += 1);
    }

    /// Why the log accepts no more writes, if it does not.
    pub fn failure(&self) -> Option<String> {
        self.synced.borrow().as_ref().err().cloned()
    }

    /// The highest durable lsn; after a failure, 0 (whoever waits then is answered by it).
    fn durable_lsn(&self) -> u64 {
        *self.synced.borrow().as_ref().unwrap_or(&0)
    }

    /// The background tasks of the log (tests look for a fatal error there).
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// On a failed device the gateway keeps serving reads and draining uploads; once nothing it
    /// can still read waits for upload, it stops (a fatal error, so the process exits non-zero)
    /// for a supervisor to restart it, when recovery will find out what the device still holds.
    async fn exit_when_drained(self: Arc<Self>, stop: CancellationToken) -> Result<(), String> {
        let mut synced = self.synced.subscribe();
        let reason = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            failed = synced.wait_for(|s| s.is_err()) => match failed {
                Ok(failed) => failed.as_ref().err().cloned().unwrap_or_default(),
                Err(_) => return Ok(()),
            },
        };
        // Every upload done, quarantined or deleted, and every pause or resume, bumps `changed`.
        let mut changes = self.changed.subscribe();
        loop {
            let (backlog, paused) = self.upload_backlog();
            if backlog == 0 && !paused {
                return Err(format!(
                    "the staging device failed ({reason}); every block that could still be read \
                     was uploaded, stopping so that a restart recovers the device"
                ));
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                changed = changes.changed() => if changed.is_err() { return Ok(()) },
            }
        }
    }

    /// One device operation, bounded by `--device-timeout`; the error says what failed (`what`
    /// is only formatted then, not on every operation).
    async fn bounded<T>(
        &self,
        what: impl FnOnce() -> String,
        op: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.device_timeout, op).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(format!("{}: {e}", what())),
            Err(_) => Err(format!(
                "{}: the device did not answer within {:?} (--device-timeout)",
                what(),
                self.device_timeout
            )),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn io_engine_name(&self) -> &'static str {
        self.engine.name()
    }

    // ---------------------------------------------------------------- writing

    /// Stages one block whose data already sits in `record` at offset `RECORD_HEADER_BYTES + key
    /// length`; returns once it is durable, or with [`Wait::Queued`] once queued (the next
    /// flush of the device for another writer will make it so). An identical block already
    /// held is acknowledged without a second write, once durable: the writer that staged it may
    /// have asked only for [`Wait::Queued`], and this caller's promise is not that one's.
    pub async fn write_block(
        &self,
        key: BlockKey,
        record: AlignedBuf,
        data_crc: u32,
        wait: Wait,
    ) -> Result<u64, StagingError> {
        let held = self.lock().index.live(&key).map(|e| (e.data_crc, e.lsn));
        if let Some((existing_crc, existing_lsn)) = held {
            if existing_crc != data_crc {
                return Err(StagingError::Conflict {
                    key: key.to_string(),
                    existing: existing_crc,
                    new: data_crc,
                });
            }
            self.wait_durable(existing_lsn).await?;
            return Ok(existing_lsn);
        }
        let key_text = key.to_string();
        let lsn = self
            .append(
                RecordKind::Block,
                key_text.as_bytes(),
                record,
                key.block_len,
                data_crc,
                RecordUse::Staged,
                wait,
            )
            .await?;
        let (lsn, segment, device_offset, segment_sequence) = lsn;
        // Either this record is the block's (indexed and queued for upload in one critical
        // section) or a concurrent write of the same block won the race.
        let outcome = {
            let mut st = self.lock();
            st.journal.add_key(segment, key);
            let entry = BlockIndex::entry(
                lsn,
                segment,
                segment_sequence,
                device_offset,
                key.block_len,
                data_crc,
            );
            if st.index.insert(key, entry) {
                st.last_staged = Some(Instant::now());
                if let Err(held) = st.uploads.push(lsn, key) {
                    tracing::error!(lsn, %key, %held, "a fresh lsn was already queued for another block");
                }
                Ok(st.uploads.paused)
            } else {
                // This record is redundant and releases the pin its allocation took.
                st.journal.unpin(segment);
                Err(st.index.live(&key).map_or(lsn, |e| e.lsn))
            }
        };
        match outcome {
            Ok(paused) => {
                // One new block needs one worker; waking all of them for every block (or any
                // while uploads are paused) costs more CPU than the write itself for small
                // blocks.
                if !paused {
                    self.upload_wakeup.notify_one();
                }
                Ok(lsn)
            }
            Err(existing_lsn) => {
                self.reclaim_kick.notify_one();
                self.wait_durable(existing_lsn).await?;
                Ok(existing_lsn)
            }
        }
    }

    /// Whether the log keeps blocks fetched from the store (`--read-cache` above 0).
    pub fn keeps_read_cache(&self) -> bool {
        self.lock().read_cache.budget() > 0
    }

    /// Keeps block `key`, whose bytes `data` were just read from the object store, as read
    /// cache: written to the device like a staged block (so it survives a restart) but never
    /// uploaded and never holding space that staging needs. Returns whether it was written: not
    /// when the cache is off, the block is already held, or the device has no free space (a
    /// cache fill never waits for it).
    pub async fn fill(&self, key: BlockKey, data: &[u8]) -> Result<bool, StagingError> {
        self.write_cached(key, data, None).await
    }

    /// A read of `key` was served from the read cache with `data`: should the ring be about to
    /// reuse its space, the block is written again at the head, in the background, so that a
    /// block read often outlives the ring's turn (out goes the least recently read, not the
    /// first written).
    pub fn keep_hot(self: &Arc<Self>, key: BlockKey, data: Bytes) {
        let lsn = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let Some(entry) = st.index.get(&key) else {
                return;
            };
            if entry.state != BlockState::Uploaded
                || !st.read_cache.contains(&key)
                || !st.journal.reused_soon(entry.segment)
                || !st.read_cache.begin_refresh(key)
            {
                return;
            }
            entry.lsn
        };
        let log = self.clone();
        tokio::spawn(async move {
            if let Err(error) = log.write_cached(key, &data, Some(lsn)).await {
                tracing::warn!(%key, %error, "could not keep a hot block ahead of the ring");
            }
            log.lock().read_cache.end_refresh(&key);
        });
    }

    /// Writes `data` as a read-cache record of `key`: a new one (`replace` `None`), or a copy of
    /// the one at lsn `replace` moved to the head.
    async fn write_cached(
        &self,
        key: BlockKey,
        data: &[u8],
        replace: Option<u64>,
    ) -> Result<bool, StagingError> {
        if data.len() as u64 != key.len() {
            return Err(StagingError::Corrupt {
                key: key.to_string(),
                reason: format!(
                    "{} bytes from the store, the key says {}",
                    data.len(),
                    key.len()
                ),
            });
        }
        let still = |st: &LogState| match replace {
            None => st.index.live(&key).is_none(),
            Some(lsn) => st
                .index
                .get(&key)
                .is_some_and(|e| e.lsn == lsn && e.state == BlockState::Uploaded),
        };
        {
            let st = self.lock();
            if st.read_cache.budget() == 0 || !still(&st) {
                return Ok(false);
            }
        }
        let key_text = key.to_string();
        let crc = crc32c::crc32c(data);
        let record = crate::node::record_with(&key, data);
        let appended = self
            .append(
                RecordKind::Cached,
                key_text.as_bytes(),
                record,
                key.block_len,
                crc,
                RecordUse::Cached,
                Wait::Durable,
            )
            .await;
        let (lsn, segment, device_offset, segment_sequence) = match appended {
            Ok(at) => at,
            Err(StagingError::Full { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        let mut st = self.lock();
        st.journal.add_key(segment, key);
        let mut entry = BlockIndex::entry(
            lsn,
            segment,
            segment_sequence,
            device_offset,
            key.block_len,
            crc,
        );
        entry.state = BlockState::Uploaded;
        // A staged write or another fill of the same block may have won the race, or the block
        // moved meanwhile (deleted, dropped from the cache).
        if !still(&st) {
            return Ok(false);
        }
        if replace.is_some() {
            st.index.remove(&key);
        }
        st.index.insert(key, entry);
        let out = st.read_cache.admit(key, key.len());
        st.drop_cached(out);
        drop(st);
        self.metrics.cache_filled(key.len());
        Ok(true)
    }

    /// Allocates space, writes the record, waits until it is durable.
    /// Returns (lsn, segment index, device offset, segment sequence).
    async fn append(
        &self,
        kind: RecordKind,
        key: &[u8],
        mut record: AlignedBuf,
        data_len: u32,
        data_crc: u32,
        use_: RecordUse,
        wait: Wait,
    ) -> Result<(u64, usize, u64, u64), StagingError> {
        let len = record.len() as u64;
        let started = Instant::now();
        let alloc = loop {
            let notified = self.space_freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                if let Some(reason) = self.failure() {
                    return Err(StagingError::Failed(reason));
                }
                let mut st = self.lock();
                if let Some(mut alloc) = st.journal.allocate(len, use_, &self.sb) {
                    // Reuse: index entries still pointing into the segment's previous life go.
                    if let Some((segment, sequence, keys)) = alloc.evicted.take() {
                        for key in st.index.evict(segment, sequence, keys) {
                            st.read_cache.forget(&key);
                        }
                    }
                    break alloc;
                }
                if use_ == RecordUse::Cached {
                    // Read cache never waits for space: the block is in the store anyway.
                    return Err(StagingError::Full {
                        waited: Duration::ZERO,
                        waiting_bytes: st.index.pending_bytes(),
                    });
                }
                st.waiting_for_space += 1;
            }
            self.reclaim_kick.notify_one();
            let left = self.full_wait.saturating_sub(started.elapsed());
            let timed_out = tokio::time::timeout(left, notified).await.is_err();
            let mut st = self.lock();
            st.waiting_for_space -= 1;
            if timed_out {
                let waiting_bytes = st.index.pending_bytes();
                tracing::warn!(waited = ?self.full_wait, waiting_bytes, "staging device full: refusing a write");
                return Err(StagingError::Full {
                    waited: self.full_wait,
                    waiting_bytes,
                });
            }
        };
        RecordHeader {
            kind,
            key_len: key.len() as u16,
            data_len,
            segment_sequence: alloc.segment_sequence,
            generation: self.sb.generation,
            lsn: alloc.lsn,
            data_crc,
        }
        .encode(&mut record, key);

        if wait == Wait::Queued {
            // Before the caller's next step: the flush that step asks for must wait for it.
            self.queued_for_device_sync
                .fetch_max(alloc.lsn, Ordering::SeqCst);
        }
        {
            let mut st = self.lock();
            if let Some((lsn, offset, header)) = alloc.new_segment {
                st.journal.queue_write(WriteJob {
                    lsn,
                    offset,
                    buf: header,
                });
            }
            st.journal.queue_write(WriteJob {
                lsn: alloc.lsn,
                offset: alloc.device_offset,
                buf: record,
            });
        }
        self.write_kick.notify_one();
        self.wait(alloc.lsn, wait).await?;
        Ok((
            alloc.lsn,
            alloc.segment,
            alloc.device_offset,
            alloc.segment_sequence,
        ))
    }

    async fn wait(&self, lsn: u64, wait: Wait) -> Result<(), StagingError> {
        match wait {
            Wait::Durable => self.wait_durable(lsn).await,
            Wait::Queued => Ok(()),
        }
    }

    /// Until the write watermark passes `lsn`, or the log fails. At once if
    /// it has passed: a failure since does not unwrite the record (a failed log still serves
    /// reads), and a flush after it refuses anyway.
    async fn wait_written(&self, lsn: u64) -> Result<(), StagingError> {
        if *self.written.borrow() >= lsn {
            return Ok(());
        }
        let mut written = self.written.subscribe();
        let mut synced = self.synced.subscribe();
        loop {
            if let Err(reason) = &*synced.borrow_and_update() {
                return Err(StagingError::Failed(reason.clone()));
            }
            if *written.borrow_and_update() >= lsn {
                return Ok(());
            }
            tokio::select! {
                changed = written.changed() => changed,
                changed = synced.changed() => changed,
            }
            .map_err(|_| StagingError::ShuttingDown)?;
        }
    }

    async fn wait_durable(&self, lsn: u64) -> Result<(), StagingError> {
        // Before the kick below: a write completing after this sees the want and kicks again
        // (the group commit may run before the write is done, and cover less than `lsn`).
        self.durable_wanted.fetch_max(lsn, Ordering::SeqCst);
        let mut synced = self.synced.subscribe();
        loop {
            match &*synced.borrow_and_update() {
                Ok(durable) if *durable >= lsn => return Ok(()),
                Ok(_) => {}
                Err(reason) => return Err(StagingError::Failed(reason.clone())),
            }
            self.sync_kick.notify_one();
            if synced.changed().await.is_err() {
                return Err(StagingError::ShuttingDown);
            }
        }
    }

    /// The write combiner: takes every queued record and writes each run of records that are
    /// adjacent on the device as one vectored write, so many small blocks cost one submission
    /// (one doorbell on a virtual disk) instead of one each. Runs are written concurrently.
    async fn write_task(self: Arc<Self>) {
        loop {
            self.write_kick.notified().await;
            let mut jobs = self.lock().journal.take_writes();
            if jobs.is_empty() {
                continue;
            }
            jobs.sort_unstable_by_key(|j| j.offset);
            let mut run: Vec<WriteJob> = Vec::new();
            let mut run_bytes = 0usize;
            for job in jobs {
                let adjacent = run
                    .last()
                    .is_some_and(|last| last.offset + last.buf.len() as u64 == job.offset);
                if !run.is_empty()
                    && (!adjacent || run.len() >= MAX_RUN_RECORDS || run_bytes >= MAX_RUN_BYTES)
                {
                    let run = std::mem::take(&mut run);
                    self.tasks
                        .spawn_short("staging.write-run", self.clone().write_run(run));
                    run_bytes = 0;
                }
                run_bytes += job.buf.len();
                run.push(job);
            }
            if !run.is_empty() {
                self.tasks
                    .spawn_short("staging.write-run", self.clone().write_run(run));
            }
        }
    }

    async fn write_run(self: Arc<Self>, run: Vec<WriteJob>) -> Result<(), String> {
        let offset = run[0].offset;
        let lsns: Vec<u64> = run.iter().map(|j| j.lsn).collect();
        let bufs: Vec<AlignedBuf> = run.into_iter().map(|j| j.buf).collect();
        let what = || format!("write of {} records at device offset {offset}", lsns.len());
        let result = if bufs.len() == 1 {
            let buf = bufs.into_iter().next().expect("one buffer");
            self.bounded(what, self.engine.write_at(buf, offset))
                .await
                .map(drop)
        } else {
            self.bounded(what, self.engine.writev_at(bufs, offset))
                .await
                .map(drop)
        };
        match result {
            Ok(()) => {
                let watermark = {
                    let mut st = self.lock();
                    st.journal.written(&lsns);
                    st.journal.watermark()
                };
                self.written.send_if_modified(|written| {
                    let higher = watermark > *written;
                    if higher {
                        *written = watermark;
                    }
                    higher
                });
                if self.durable_wanted.load(Ordering::SeqCst) > self.durable_lsn() {
                    self.sync_kick.notify_one();
                }
            }
            // The failed lsns stay in `inflight`, so the watermark never passes them and nothing
            // written after them is acknowledged. A device failure fails the log, not the
            // process: reads and uploads go on.
            Err(reason) => {
                tracing::error!(device = %self.device_path.display(), %reason, "device write failed; refusing further writes");
                self.fail(reason);
            }
        }
        Ok(())
    }

    /// Flushes the device for another writer of it (the metadata region in the same device):
    /// returns once an `fdatasync` issued after this call completed, so every write of the
    /// caller's that completed before it is durable. It does not wait for [`Wait::Queued`]
    /// records: the caller waits for them first ([`StagingLog::wait_queued_written`]), before
    /// it holds anything a write of the log's may wait behind. The flush is the log's own kind,
    /// through its engine: it makes the log's written records durable too, and a failed one
    /// fails the log, and this call with it, as a failed flush of the log's own would. Once
    /// [`StagingLog::shutdown`] has begun it answers `ShuttingDown`: the caller flushes by itself.
    pub async fn sync_device(&self) -> Result<(), StagingError> {
        if self.tasks.is_stopped() {
            return Err(StagingError::ShuttingDown);
        }
        // A log that failed already answers with its reason, without a flush.
        self.flush().await.map_err(StagingError::Failed)?;
        self.not_failed_meanwhile()
    }

    /// Whether every [`Wait::Queued`] record is written.
    pub fn queued_written(&self) -> bool {
        *self.written.borrow() >= self.queued_for_device_sync.load(Ordering::SeqCst)
    }

    /// Until every [`Wait::Queued`] record is written, or the log fails: for the metadata
    /// region, before it writes pages that may name them. A log that stopped before they were
    /// written fails it: a flush without them could make durable a commit that names a block
    /// never written.
    pub async fn wait_queued_written(&self) -> Result<(), StagingError> {
        if self.tasks.is_stopped() && !self.queued_written() {
            return Err(StagingError::Failed(
                "the staging log stopped before a block queued for the metadata's flush was \
                 written"
                    .into(),
            ));
        }
        self.wait_written(self.queued_for_device_sync.load(Ordering::SeqCst))
            .await
    }

    /// [`StagingLog::wait_queued_written`], blocking the calling thread.
    pub fn wait_queued_written_here(&self) -> Result<(), StagingError> {
        // The write tasks run on the runtime's workers and the ring's thread, never this one.
        futures::executor::block_on(self.wait_queued_written())
    }

    /// A failure recorded while a flush for another writer ran (a write of the log's) stands.
    fn not_failed_meanwhile(&self) -> Result<(), StagingError> {
        match self.failure() {
            Some(reason) => Err(StagingError::Failed(reason)),
            None => Ok(()),
        }
    }

    /// One `fdatasync`: on success every record below the write watermark read before it is
    /// durable; on failure the log fails (nothing is acknowledged after a failed flush).
    async fn flush(&self) -> Result<(), String> {
        let (watermark, durable) = self.before_flush()?;
        let started = Instant::now();
        let result = self
            .bounded(|| "fdatasync".into(), self.engine.sync())
            .await;
        self.after_flush(watermark, durable, started, result)
    }

    /// [`StagingLog::sync_device`] on the calling thread, for a caller that may block: redb's
    /// durable commit of the metadata region, on a blocking thread. Handing the `fdatasync` to
    /// the pool and waiting for it cost that thread two wake-ups per commit, on a small VM a
    /// good part of a `WriteSlice`. A device that stops answering holds this thread (as it
    /// holds the region's own page writes before it); once the flush outlasts
    /// `--device-timeout` the bookkeeping task fails the log, so every other writer is answered.
    /// `None`: the engine cannot flush on this thread, or the log has stopped; use
    /// [`StagingLog::sync_device`], which it is in all but the thread.
    pub fn sync_device_here(&self) -> Option<Result<(), StagingError>> {
        if self.tasks.is_stopped() {
            return None;
        }
        let (watermark, durable) = match self.before_flush() {
            Ok(positions) => positions,
            Err(reason) => return Some(Err(StagingError::Failed(reason))),
        };
        let started = Instant::now();
        *self.flush_watch() = Some(started);
        let result = self.engine.sync_here();
        *self.flush_watch() = None;
        let result = result?.map_err(|e| format!("fdatasync: {e}"));
        Some(
            self.after_flush(watermark, durable, started, result)
                .map_err(StagingError::Failed)
                .and_then(|()| self.not_failed_meanwhile()),
        )
    }

    fn flush_watch(&self) -> MutexGuard<'_, Option<Instant>> {
        self.flushing_here_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Fails the log when a flush on a caller's thread ([`StagingLog::sync_device_here`]) has
    /// outlasted `--device-timeout`: that caller stays held until the device answers, but every
    /// other writer is answered, and `Status` says why.
    fn watch_flush_here(&self) {
        let since = *self.flush_watch();
        if since.is_some_and(|since| since.elapsed() > self.device_timeout) {
            let reason = format!(
                "fdatasync: the device did not answer within {:?} (--device-timeout)",
                self.device_timeout
            );
            tracing::error!(device = %self.device_path.display(), %reason, "refusing further writes");
            self.fail(reason);
        }
    }

    /// What a flush will cover (the write watermark now) and the durable lsn before it; the
    /// reason the log failed, if it did.
    fn before_flush(&self) -> Result<(u64, u64), String> {
        let watermark = self.lock().journal.watermark();
        match &*self.synced.borrow() {
            Ok(durable) => Ok((watermark, *durable)),
            Err(reason) => Err(reason.clone()),
        }
    }

    /// Records a flush begun at `started` that covered `watermark`: durable up to it, or the
    /// log failed.
    fn after_flush(
        &self,
        watermark: u64,
        durable: u64,
        started: Instant,
        result: Result<(), String>,
    ) -> Result<(), String> {
        self.metrics
            .synced(started.elapsed(), watermark.saturating_sub(durable));
        match result {
            Ok(()) => {
                // A failure recorded meanwhile stands: nobody is acknowledged after it.
                self.synced.send_if_modified(|synced| match synced {
                    Ok(durable) if *durable < watermark => {
                        *synced = Ok(watermark);
                        true
                    }
                    _ => false,
                });
                Ok(())
            }
            Err(reason) => {
                tracing::error!(device = %self.device_path.display(), %reason, "refusing further writes");
                self.fail(reason.clone());
                Err(reason)
            }
        }
    }

    /// The group commit: one fdatasync covers every write completed before it started.
    async fn sync_task(self: Arc<Self>) {
        loop {
            self.sync_kick.notified().await;
            loop {
                let watermark = self.lock().journal.watermark();
                let durable = match &*self.synced.borrow() {
                    Ok(d) => *d,
                    // Failed: writers behind a failed write were answered by `fail`.
                    Err(_) => return,
                };
                // Nobody waits for what is written past the durable lsn: whoever wrote it
                // has the device flushed itself ([`Wait::Queued`]).
                if watermark <= durable || self.durable_wanted.load(Ordering::SeqCst) <= durable {
                    break;
                }
                if self.flush().await.is_err() {
                    return;
                }
            }
        }
    }

    // ---------------------------------------------------------------- space

    /// Frees the oldest segments once nothing in them still needs uploading.
    async fn reclaim_task(self: Arc<Self>) {
        loop {
            self.reclaim_kick.notified().await;
            loop {
                let victim = {
                    if self.failure().is_some() {
                        break;
                    }
                    match self.lock().journal.start_reclaim() {
                        Some(victim) => victim,
                        None => break,
                    }
                };
                // Zero the header so a restart does not resurrect the segment. Its index entries
                // (uploaded blocks) stay readable until the segment is reused: reads verify.
                //
                // The invalidation is made durable before the next one is written: a volatile
                // disk cache may persist writes out of order, and a newer segment invalidated
                // while an older one came back after a power loss would bring back blocks whose
                // upload or delete record was in the newer one (found by the power-loss model).
                let offset = self.sb.segment_offset(victim as u64);
                let result: Result<(), String> = async {
                    let zeroed = self.engine.write_at(AlignedBuf::zeroed(ALIGN), offset);
                    self.bounded(|| "segment header invalidation".into(), zeroed)
                        .await?;
                    let sync = self.engine.sync();
                    self.bounded(|| "fdatasync of a segment invalidation".into(), sync)
                        .await
                }
                .await;
                match result {
                    Ok(()) => self.lock().journal.reclaimed(victim),
                    Err(reason) => {
                        tracing::error!(segment = victim, %reason, "cannot invalidate a reclaimed segment header; refusing further writes");
                        self.fail(reason);
                        break;
                    }
                }
                self.space_freed.notify_waiters();
            }
        }
    }

    // ---------------------------------------------------------------- reading

    pub fn entry(&self, key: &BlockKey) -> Option<Entry> {
        self.lock().index.get(key).cloned()
    }

    /// The block's bytes, verified against their checksums on the device.
    pub async fn read_block(&self, key: &BlockKey) -> Result<(Bytes, BlockState), StagingError> {
        let entry = self
            .entry(key)
            .filter(|e| e.state != BlockState::Deleted)
            .ok_or_else(|| StagingError::NotFound(key.to_string()))?;
        match self.read_verified(key, &entry).await {
            Ok(bytes) => {
                let mut st = self.lock();
                if st.read_cache.contains(key) {
                    st.read_cache.touch(key);
                    drop(st);
                    self.metrics.cache_hit(bytes.len() as u64);
                }
                Ok((bytes, entry.state))
            }
            Err(StagingError::Corrupt { .. }) if !entry.state.is_pending() => {
                // An uploaded block whose segment was reused since: not here any more.
                Err(StagingError::NotFound(key.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    async fn read_verified(&self, key: &BlockKey, entry: &Entry) -> Result<Bytes, StagingError> {
        // A block queued with [`Wait::Queued`] is indexed before its write completes.
        self.wait_written(entry.lsn).await?;
        let key_text = key.to_string();
        let len = entry.record_len(&key_text) as usize;
        let what = || {
            format!(
                "read of {key_text} at device offset {}",
                entry.device_offset
            )
        };
        let buf = self
            .bounded(
                what,
                self.engine
                    .read_at(AlignedBuf::uninit(len), entry.device_offset),
            )
            .await
            .map_err(StagingError::Io)?;
        let corrupt = |reason: &str| StagingError::Corrupt {
            key: key_text.clone(),
            reason: reason.to_string(),
        };
        let header = RecordHeader::decode(&buf, entry.segment_sequence)
            .map_err(|_| corrupt("record header invalid"))?;
        if header.lsn != entry.lsn
            || !matches!(header.kind, RecordKind::Block | RecordKind::Cached)
            || header.data_len != entry.data_len
        {
            return Err(corrupt("record header does not match the index"));
        }
        if &buf[RECORD_HEADER_BYTES..header.data_offset()] != key_text.as_bytes() {
            return Err(corrupt("record key does not match"));
        }
        let range = header.data_offset()..header.data_offset() + header.data_len as usize;
        if crc32c::crc32c(&buf[range.clone()]) != header.data_crc {
            return Err(corrupt("data checksum mismatch"));
        }
        Ok(Bytes::from_owner(buf).slice(range))
    }

    // ---------------------------------------------------------------- uploads

    /// The upload policy the log was opened with.
    pub fn upload_policy(&self) -> UploadPolicy {
        self.lock().uploads.policy.clone()
    }

    /// Blocks `keys` go to the store next, before older ones and whatever the upload delay (a
    /// client waits for them). Returns how many of them were waiting; the others are uploading,
    /// uploaded, quarantined or unknown here.
    pub fn expedite(&self, keys: &[BlockKey]) -> u64 {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut waiting = 0;
        for key in keys {
            let Some(entry) = st.index.get(key) else {
                continue;
            };
            if entry.state == BlockState::Staged && st.uploads.expedite(entry.lsn) {
                waiting += 1;
            }
        }
        drop(guard);
        if waiting > 0 {
            self.upload_wakeup.notify_waiters();
        }
        waiting
    }

    /// Every waiting block goes to the store next, whatever the upload delay (`sync --all`).
    pub fn expedite_all(&self) -> u64 {
        let waiting = self.lock().uploads.expedite_all();
        if waiting > 0 {
            self.upload_wakeup.notify_waiters();
        }
        waiting
    }

    /// The oldest block due for upload, marked as uploading.
    pub fn next_upload(&self) -> NextUpload {
        let mut guard = self.lock();
        let st = &mut *guard;
        let index = &st.index;
        let window_open = st.upload_window_open();
        let now = Instant::now();
        let writers_pause = st.writers_pause(now);
        match st.uploads.next(now, window_open, writers_pause, |key| {
            index.get(key).map(|e| e.staged_at)
        }) {
            Next::Idle => NextUpload::Idle,
            Next::WaitUntil(t) => NextUpload::WaitUntil(t),
            Next::Ready(lsn, key) => {
                let entry = st
                    .index
                    .get_mut(&key)
                    .expect("the queue offered an indexed key");
                entry.state = BlockState::Uploading;
                let entry = entry.clone();
                st.uploads.started(lsn);
                NextUpload::Ready(UploadJob { key, lsn, entry })
            }
        }
    }

    /// Reads a block for upload, verified. A block that fails verification is quarantined.
    pub async fn read_for_upload(&self, job: &UploadJob) -> Result<Bytes, StagingError> {
        self.read_verified(&job.key, &job.entry).await
    }

    /// Records a finished upload. Returns true if the block was deleted meanwhile (the caller
    /// then removes the object it just wrote).
    pub fn complete_upload(&self, job: &UploadJob) -> bool {
        self.metrics.uploaded(job.entry.data_len as u64);
        let mut guard = self.lock();
        let st = &mut *guard;
        let deleted = match st.index.get_mut(&job.key) {
            Some(e) if e.lsn == job.lsn && e.state == BlockState::Uploading => {
                e.state = BlockState::Uploaded;
                let segment = e.segment;
                st.uploads.ended();
                st.journal.unpin(segment);
                st.uploads.completed(job.lsn);
                false
            }
            // Deleted while it was uploading: the object just written must go. (A newer record of
            // the same key, staged after a delete, keeps its object.)
            Some(e) => e.lsn == job.lsn && e.state == BlockState::Deleted,
            None => false,
        };
        drop(guard);
        self.changed.send_modify(|v| *v += 1);
        self.reclaim_kick.notify_one();
        deleted
    }

    /// Records a failed upload. A failure that names the block counts towards its quarantine
    /// and is retried after the policy's backoff; a store outage (`outage_retry`) does not
    /// count, and is retried when the drain says.
    pub fn fail_upload(&self, job: &UploadJob, error: String, outage_retry: Option<Duration>) {
        self.metrics.upload_failed(&error);
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(e) = st.index.get_mut(&job.key).filter(|e| e.lsn == job.lsn) else {
            return;
        };
        if e.state != BlockState::Uploading {
            // Deleted while uploading: nothing to retry; its segment was already unpinned.
            return;
        }
        st.uploads.ended();
        e.last_error = Some(error.clone());
        let backoff = match outage_retry {
            Some(retry_in) => retry_in,
            None => {
                e.failed_attempts += 1;
                if e.failed_attempts >= st.uploads.policy.max_attempts {
                    e.state = BlockState::Quarantined;
                    let attempts = e.failed_attempts;
                    drop(guard);
                    self.metrics.quarantined();
                    tracing::error!(key = %job.key, attempts, %error, "upload failed repeatedly: block quarantined (its data stays on the device)");
                    self.changed.send_modify(|v| *v += 1);
                    return;
                }
                st.uploads.policy.backoff(e.failed_attempts - 1)
            }
        };
        e.state = BlockState::Staged;
        st.uploads.retry_after(backoff, job.lsn, job.key);
    }

    /// Quarantines a block whose record fails verification on the device: it is never uploaded.
    pub fn quarantine(&self, job: &UploadJob, reason: String) {
        let mut guard = self.lock();
        let st = &mut *guard;
        if let Some(e) = st
            .index
            .get_mut(&job.key)
            .filter(|e| e.lsn == job.lsn && e.state == BlockState::Uploading)
        {
            e.state = BlockState::Quarantined;
            e.last_error = Some(reason.clone());
            st.uploads.ended();
            self.metrics.quarantined();
        }
        drop(guard);
        tracing::error!(key = %job.key, %reason, "block quarantined");
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn retry_quarantined(&self) -> u64 {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut requeued = 0;
        for (key, e) in st.index.iter_mut() {
            if e.state == BlockState::Quarantined {
                e.state = BlockState::Staged;
                e.failed_attempts = 0;
                if let Err(held) = st.uploads.push(e.lsn, *key) {
                    tracing::error!(lsn = e.lsn, %key, %held, "cannot requeue: another block holds its lsn");
                    e.state = BlockState::Quarantined;
                    continue;
                }
                requeued += 1;
            }
        }
        drop(guard);
        self.upload_wakeup.notify_waiters();
        requeued
    }

    pub fn set_uploads_paused(&self, paused: bool) {
        self.lock().uploads.paused = paused;
        self.upload_wakeup.notify_waiters();
        self.changed.send_modify(|v| *v += 1);
    }

    /// Writes the accumulated upload completions as one record now and then. They only save a
    /// re-upload after a restart, so they are not waited for by anyone. Watches flushes made on
    /// callers' threads on the same tick.
    async fn meta_flush_task(self: Arc<Self>) {
        let mut tick = tokio::time::interval(META_FLUSH_INTERVAL);
        loop {
            tick.tick().await;
            self.watch_flush_here();
            if let Err(e) = self.flush_uploaded().await {
                tracing::debug!(error = %e, "upload completions not recorded yet");
            }
        }
    }

    /// Makes every upload completion so far durable. Serialized with the background flush: a
    /// flush that found nothing left to take must not return while another's record, holding
    /// completions made before this call, is still being written (a crash then would lose them,
    /// which the power-loss model caught).
    pub async fn flush_uploaded(&self) -> Result<(), StagingError> {
        let _flushing = self.flushing.lock().await;
        loop {
            let lsns = self.lock().uploads.take_completed(MAX_META_ENTRIES);
            if lsns.is_empty() {
                return Ok(());
            }
            // A full record may have left older completions behind; later ones wait their turn.
            let more = lsns.len() == MAX_META_ENTRIES;
            if let Err(e) = self.append_lsn_record(RecordKind::Uploaded, &lsns).await {
                self.lock().uploads.restore_completed(lsns);
                return Err(e);
            }
            if !more {
                return Ok(());
            }
        }
    }

    async fn append_lsn_record(&self, kind: RecordKind, lsns: &[u64]) -> Result<(), StagingError> {
        let data_len = lsns.len() * 8;
        let mut record = AlignedBuf::zeroed(record_len(0, data_len) as usize);
        for (i, lsn) in lsns.iter().enumerate() {
            record[RECORD_HEADER_BYTES + i * 8..RECORD_HEADER_BYTES + i * 8 + 8]
                .copy_from_slice(&lsn.to_le_bytes());
        }
        let crc = crc32c::crc32c(&record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + data_len]);
        self.append(
            kind,
            b"",
            record,
            data_len as u32,
            crc,
            RecordUse::Bookkeeping,
            Wait::Durable,
        )
        .await
        .map(|_| ())
    }

    /// Drops staged blocks of deleted data: those not yet uploaded never will be. Durable before
    /// it returns. Returns (dropped, not pending).
    ///
    /// An uploaded block gets a delete record too: its upload completion may not be durable yet,
    /// and without the record a crash would bring it back waiting for upload, and the drain
    /// would put back the object the cleaner just deleted.
    ///
    /// The record is written first, and the blocks change only once it is durable: a delete
    /// that fails (no room for its record, a failed device) or is cancelled leaves them as they
    /// were, waiting for upload and pinning their segments, for the caller's retry to delete.
    /// (Dropping them first let the ring reuse the space of a block whose delete then failed, so
    /// that a crash lost a block nothing had deleted, and the retry found it gone and wrote no
    /// record: found by the power-loss model.) A block may be uploaded while its record is
    /// written; the cleaner deletes its object after this returns.
    pub async fn delete_blocks(&self, keys: &[BlockKey]) -> Result<(u64, u64), StagingError> {
        let held: Vec<(BlockKey, u64)> = {
            let st = self.lock();
            keys.iter()
                .filter_map(|key| st.index.live(key).map(|e| (*key, e.lsn)))
                .collect()
        };
        let mut not_pending = (keys.len() - held.len()) as u64;
        let mut dropped = 0;
        for chunk in held.chunks(MAX_META_ENTRIES) {
            let lsns: Vec<u64> = chunk.iter().map(|(_, lsn)| *lsn).collect();
            self.append_lsn_record(RecordKind::Deleted, &lsns).await?;
            let (chunk_dropped, chunk_not_pending) = self.apply_deletes(chunk);
            dropped += chunk_dropped;
            not_pending += chunk_not_pending;
            self.changed.send_modify(|v| *v += 1);
            self.reclaim_kick.notify_one();
        }
        Ok((dropped, not_pending))
    }

    /// Marks deleted the blocks a durable delete record names (each by its key and lsn): those
    /// that waited for upload leave the queue and free their segments. Returns (dropped, not
    /// pending).
    fn apply_deletes(&self, recorded: &[(BlockKey, u64)]) -> (u64, u64) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let (mut dropped, mut not_pending) = (0, 0);
        for (key, lsn) in recorded {
            // Gone meanwhile (its segment reused after upload) or deleted by a concurrent call.
            let Some(e) = st
                .index
                .get_mut(key)
                .filter(|e| e.lsn == *lsn && e.state != BlockState::Deleted)
            else {
                not_pending += 1;
                continue;
            };
            let was = e.state;
            e.state = BlockState::Deleted;
            let segment = e.segment;
            st.read_cache.forget(key);
            if !was.is_pending() {
                not_pending += 1;
                continue;
            }
            dropped += 1;
            if was == BlockState::Uploading {
                st.uploads.ended();
            }
            st.uploads.remove(*lsn, key);
            st.journal.unpin(segment);
        }
        (dropped, not_pending)
    }

    /// A receiver that changes whenever a block changes state.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Number of blocks still waiting for (or in) upload, quarantined ones excepted.
    pub fn upload_backlog(&self) -> (u64, bool) {
        let st = self.lock();
        (st.uploads.backlog(), st.uploads.paused)
    }

    pub fn uploads_paused(&self) -> bool {
        self.lock().uploads.paused
    }

    /// Segments of the device, and how many of them are free.
    pub fn segment_usage(&self) -> (u64, u64) {
        self.lock().journal.segment_counts()
    }

    pub fn snapshot(&self) -> Snapshot {
        let counters = self.metrics.snapshot();
        let st = self.lock();
        let now = Instant::now();
        let (segments_total, segments_free) = st.journal.segment_counts();
        let mut snap = Snapshot {
            segments_total,
            segments_free,
            queue_len: st.uploads.waiting(),
            counters,
            uploads_paused: st.uploads.paused,
            upload_window: st.uploads.policy.window,
            upload_window_closed: !st.upload_window_open(),
            upload_defer_max: st.uploads.policy.defer_max,
            uploads_deferred: st.writers_pause(now).is_some(),
            writers_waiting_for_space: st.waiting_for_space,
            failure: self.failure(),
            read_cache_budget: st.read_cache.budget(),
            read_cache_held: st.read_cache.held(),
            ..Default::default()
        };
        for (key, e) in st.index.iter() {
            if !e.state.is_pending() {
                continue;
            }
            snap.blocks_staged += 1;
            snap.bytes_staged += e.data_len as u64;
            match e.state {
                BlockState::Staged => {
                    snap.oldest_waiting = snap.oldest_waiting.max(now.duration_since(e.staged_at))
                }
                BlockState::Uploading => snap.blocks_uploading += 1,
                BlockState::Quarantined => snap.quarantined.push((key.to_string(), e.clone())),
                _ => {}
            }
        }
        snap
    }

    /// Flushes bookkeeping records and stops the background tasks (which releases the device
    /// once the last handle is dropped).
    pub async fn shutdown(&self) {
        if let Err(e) = self.flush_uploaded().await {
            tracing::warn!(error = %e, "could not record the last upload completions; they will be uploaded again after restart");
        }
        self.tasks.drain(SHUTDOWN_BOUND).await;
    }
}

#[cfg(test)]
mod power_loss;
#[cfg(test)]
mod tests;

#[derive(Debug, Default)]
pub struct Snapshot {
    pub segments_total: u64,
    pub segments_free: u64,
    pub blocks_staged: u64,
    pub bytes_staged: u64,
    pub blocks_uploading: u64,
    pub queue_len: u64,
    pub oldest_waiting: Duration,
    /// Totals, the upload rate and the last store error.
    pub counters: Counters,
    pub quarantined: Vec<(String, Entry)>,
    pub uploads_paused: bool,
    /// `--upload-hours`, and whether it holds uploads right now.
    pub upload_window: Option<uploads::UploadWindow>,
    pub upload_window_closed: bool,
    /// `--upload-defer-max`, and whether uploads wait for writers to pause right now.
    pub upload_defer_max: Duration,
    pub uploads_deferred: bool,
    pub writers_waiting_for_space: u64,
    /// Why the log accepts no more writes.
    pub failure: Option<String>,
    /// `--read-cache`, and the (blocks, bytes) it holds now.
    pub read_cache_budget: u64,
    pub read_cache_held: (u64, u64),
}

/// Bounds of one vectored write (IOV_MAX is 1024).
const MAX_RUN_RECORDS: usize = 512;
const MAX_RUN_BYTES: usize = 64 << 20;
