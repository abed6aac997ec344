//! The embedded backend: one redb database (a file, or a region of the staging device through
//! [`crate::redb_region`]), one table of keys and values.
//!
//! redb has one writer at a time, so a write transaction takes the writer's turn (an async lock,
//! so waiting never blocks a runtime thread) when it begins, reads a snapshot that no one else can
//! change meanwhile, and applies its buffered writes in one redb write transaction at commit:
//! serializable without conflicts. Reads take no turn.
//!
//! Group commit: every commit is made without an fsync; a commit that must be durable then waits
//! until one durable commit made after it has returned. Whoever finds no sync running makes that
//! commit for everyone waiting, so concurrent operations share one fsync (a durable redb commit
//! costs two) instead of queueing for one each. redb guarantees that a durable commit also makes
//! every earlier non-durable commit durable. A durable commit that no other writer waits behind
//! is made durable by itself instead: one transaction where the group needs two, the case of a
//! program that closes one file at a time.
//!
//! After an I/O error (a full metadata region among them) redb refuses every further call on that
//! database ("previous I/O error"); the next transaction opens it again on the same storage, so a
//! full region fails the writes that need room and nothing else. What a reopen drops was never
//! durable: commits waiting for their fsync at that moment fail instead of returning.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use async_trait::async_trait;
use redb::{Database, ReadOnlyTable, ReadTransaction, ReadableDatabase, TableDefinition};

use crate::keys;
use crate::kv::{Durability, KvError, KvResult, KvStore, KvTxn, Sequence, Write};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

/// The embedded [`KvStore`].
pub struct RedbKv {
    inner: Arc<Inner>,
}

type Reopen = Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send + Sync>;

struct Inner {
    /// `None` only while it is being opened again, or if that failed.
    db: RwLock<Option<Arc<Database>>>,
    /// Opens the database again on the same storage (see the module comment).
    reopen: Reopen,
    /// redb met an I/O error: it refuses every call on `db` until it is opened again.
    broken: AtomicBool,
    /// Names the database in messages.
    label: String,
    /// The writer's turn: held from a write transaction's begin to its commit or drop.
    writer: Arc<tokio::sync::Mutex<()>>,
    /// Write transactions that hold the turn or wait for it ([`Turn`]).
    writers: Arc<AtomicUsize>,
    group_sync: GroupSync,
    /// Each sequence's next id and its durable ceiling, once read: see [`RedbTxn::take_ids`].
    sequences: Mutex<HashMap<Vec<u8>, IdRange>>,
    /// A durable commit is already scheduled for the eventual commits made since the last one.
    flush_scheduled: AtomicBool,
    /// [`KvStore::set_eventual_flush`], in microseconds.
    flush_within_us: AtomicU64,
}

/// The ids of a sequence this process may hand out without a durable commit: `next..ceiling`,
/// where `ceiling` is what the database holds durably for the sequence (no id at or above it was
/// ever handed out).
#[derive(Debug, Clone, Copy)]
struct IdRange {
    next: u64,
    ceiling: u64,
}

/// Ids a durable raise of a sequence's ceiling reserves beyond what is taken: one durable commit
/// per this many ids, and at most this many skipped after a crash.
const ID_RESERVE: u64 = 4096;

/// By default, an eventual commit is made durable within about this long even if nothing asks
/// for it (a later fsync, close or sync usually does it sooner).
pub const EVENTUAL_FLUSH: std::time::Duration = std::time::Duration::from_millis(50);

#[derive(Default)]
struct GroupSync {
    state: Mutex<SyncState>,
    synced: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Commits made (not necessarily durable) so far.
    committed: u64,
    /// Commits known durable: every commit numbered at or below this one.
    durable: u64,
    /// A thread is making a durable commit right now.
    syncing: bool,
    /// Commits (first, last] that were not durable when the database was opened again: lost.
    lost: Vec<(u64, u64)>,
}

fn failed(error: impl std::fmt::Display) -> KvError {
    KvError::Failed(error.to_string())
}

/// redb's errors: I/O trouble may pass; the rest will not by itself, and neither does a storage
/// that is full (a metadata region of a device) or returned other bytes than were written.
fn storage(error: redb::StorageError) -> KvError {
    match error {
        redb::StorageError::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            KvError::Full(io.to_string())
        }
        redb::StorageError::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            KvError::Failed(io.to_string())
        }
        redb::StorageError::Io(io) => KvError::Unavailable(io.to_string()),
        other => KvError::Failed(other.to_string()),
    }
}

impl RedbKv {
    /// Opens the database at `path`, creating it if missing. A file in the layout of an older
    /// stagefs (one table per record type) is refused with a message that says so.
    pub fn open(path: impl AsRef<Path>) -> KvResult<RedbKv> {
        RedbKv::open_with_cache(path, None)
    }

    /// [`RedbKv::open`] with a page cache of at most `cache_bytes` (redb's default, 1 GiB, when
    /// `None`): what the database holds in memory whatever its size.
    pub fn open_with_cache(path: impl AsRef<Path>, cache_bytes: Option<usize>) -> KvResult<RedbKv> {
        let path = path.as_ref().to_path_buf();
        let label = path.display().to_string();
        RedbKv::with_opener(Box::new(move || builder(cache_bytes).create(&path)), &label)
    }

    /// The database in `backend` (created there if it is empty), e.g. the metadata region of a
    /// staging device ([`crate::redb_region`]); `label` names it in messages.
    pub fn open_backend(
        backend: impl redb::StorageBackend + Clone,
        label: &str,
        cache_bytes: Option<usize>,
    ) -> KvResult<RedbKv> {
        RedbKv::with_opener(
            Box::new(move || builder(cache_bytes).create_with_backend(backend.clone())),
            label,
        )
    }

    fn with_opener(reopen: Reopen, label: &str) -> KvResult<RedbKv> {
        let db = reopen().map_err(|e| open_failed(label, e))?;
        {
            let txn = db.begin_read().map_err(failed)?;
            let old = TableDefinition::<&str, u64>::new("counters");
            if txn.open_table(old).is_ok() {
                return Err(KvError::Failed(format!(
                    "{label} holds metadata in the layout of stagefs format 1 (a table per record \
                     type); this build reads the key-value layout of format {}. Start the \
                     previous release on it to copy the files out, or start afresh with a new \
                     --meta path",
                    crate::rules::FORMAT_VERSION
                )));
            }
        }
        let txn = db.begin_write().map_err(failed)?;
        txn.open_table(KV).map_err(failed)?;
        txn.commit().map_err(commit_failed)?;
        Ok(RedbKv {
            inner: Arc::new(Inner {
                db: RwLock::new(Some(Arc::new(db))),
                reopen,
                broken: AtomicBool::new(false),
                label: label.to_string(),
                writer: Arc::new(tokio::sync::Mutex::new(())),
                writers: Arc::new(AtomicUsize::new(0)),
                group_sync: GroupSync::default(),
                sequences: Mutex::new(HashMap::new()),
                flush_scheduled: AtomicBool::new(false),
                flush_within_us: AtomicU64::new(EVENTUAL_FLUSH.as_micros() as u64),
            }),
        })
    }
}

fn open_failed(label: &str, error: redb::DatabaseError) -> KvError {
    match error {
        redb::DatabaseError::Storage(s) => storage(s),
        other => failed(format!("cannot open {label}: {other}")),
    }
}

fn builder(cache_bytes: Option<usize>) -> redb::Builder {
    let mut builder = redb::Builder::new();
    if let Some(bytes) = cache_bytes {
        builder.set_cache_size(bytes);
    }
    builder
}

fn commit_failed(error: redb::CommitError) -> KvError {
    match error {
        redb::CommitError::Storage(s) => storage(s),
        other => failed(other),
    }
}

impl Inner {
    fn db(&self) -> KvResult<Arc<Database>> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                KvError::Unavailable(format!(
                    "{}: the database could not be opened again after an I/O error",
                    self.label
                ))
            })
    }

    /// Maps a redb error, noting an I/O error: after one, redb refuses every call until the
    /// database is opened again ([`Inner::reopen_if_broken`]).
    fn error(&self, error: impl Into<redb::Error>) -> KvError {
        match error.into() {
            redb::Error::Io(io) => {
                self.broken.store(true, Ordering::Release);
                storage(redb::StorageError::Io(io))
            }
            redb::Error::PreviousIo => {
                self.broken.store(true, Ordering::Release);
                KvError::Unavailable(format!(
                    "{}: an earlier I/O error stopped the database; it is opened again by the \
                     next transaction",
                    self.label
                ))
            }
            other => failed(other),
        }
    }

    /// Opens the database again if an I/O error stopped it. The caller holds the writer's turn,
    /// so no write transaction or durable commit runs meanwhile; commits not yet durable are
    /// lost with the old handle, and their waiters are told so.
    fn reopen_if_broken(&self) -> KvResult<()> {
        if !self.broken.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        if !self.broken.load(Ordering::Acquire) {
            return Ok(());
        }
        // Dropping the old handle closes its storage (and its lock) before the new one opens it.
        drop(db.take());
        let fresh = (self.reopen)().map_err(|e| open_failed(&self.label, e))?;
        *db = Some(Arc::new(fresh));
        {
            let mut state = self.group_sync.state.lock().expect("sync state poisoned");
            if state.committed > state.durable {
                let lost = (state.durable, state.committed);
                state.lost.push(lost);
            }
        }
        self.group_sync.synced.notify_all();
        self.broken.store(false, Ordering::Release);
        tracing::warn!(database = %self.label, "metadata database opened again after an I/O error");
        Ok(())
    }

    /// Returns once commit number `ticket` is durable, making a durable commit if no other thread
    /// is making one. A commit numbered at or below the count read before a durable commit began
    /// finished before it began, so that durable commit covers it. Blocking: call it off the
    /// async threads.
    fn wait_durable(&self, ticket: u64) -> KvResult<()> {
        let sync = &self.group_sync;
        let mut state = sync.state.lock().expect("sync state poisoned");
        loop {
            if state
                .lost
                .iter()
                .any(|&(after, upto)| after < ticket && ticket <= upto)
            {
                return Err(KvError::Unavailable(format!(
                    "{}: the commit was not yet durable when an I/O error stopped the database; \
                     it is lost",
                    self.label
                )));
            }
            if state.durable >= ticket {
                return Ok(());
            }
            if state.syncing {
                state = sync.synced.wait(state).expect("sync state poisoned");
                continue;
            }
            state.syncing = true;
            let covers = state.committed;
            drop(state);
            let outcome = self.durable_commit();
            state = sync.state.lock().expect("sync state poisoned");
            state.syncing = false;
            if outcome.is_ok() {
                state.durable = state.durable.max(covers);
            }
            sync.synced.notify_all();
            // On failure the waiters wake, find nothing durable and try the commit themselves.
            outcome?;
        }
    }

    /// Makes the commits made so far durable within the flush bound, unless a flush is already
    /// on its way (it will cover them: it reads the commit count when it starts).
    fn schedule_flush(inner: &Arc<Inner>) {
        if inner.flush_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = inner.clone();
        let within =
            std::time::Duration::from_micros(inner.flush_within_us.load(Ordering::Relaxed));
        tokio::spawn(async move {
            tokio::time::sleep(within).await;
            inner.flush_scheduled.store(false, Ordering::Release);
            let flushing = inner.clone();
            let outcome = tokio::task::spawn_blocking(move || flushing.wait_all_durable()).await;
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(database = %inner.label, %error, "the timed durable commit failed; the next fsync, close or sync tries again")
                }
                Err(error) => {
                    tracing::warn!(database = %inner.label, %error, "the timed durable commit task failed")
                }
            }
        });
    }

    /// Returns once every commit made so far is durable. Blocking.
    fn wait_all_durable(&self) -> KvResult<()> {
        let upto = self
            .group_sync
            .state
            .lock()
            .expect("sync state poisoned")
            .committed;
        self.wait_durable(upto)
    }

    /// The sequences' ceilings a durable commit raised (see [`RedbTxn::take_ids`]).
    fn raise_ceilings(&self, taken: Vec<(Vec<u8>, u64)>) {
        if taken.is_empty() {
            return;
        }
        let mut sequences = self.sequences.lock().expect("sequences poisoned");
        for (key, ceiling) in taken {
            if let Some(range) = sequences.get_mut(&key) {
                range.ceiling = range.ceiling.max(ceiling);
            }
        }
    }

    /// An empty transaction committed durably: it persists every non-durable commit before it.
    /// It takes the writer's turn, so no rules transaction waits inside redb (on a runtime thread)
    /// for the fsync.
    fn durable_commit(&self) -> KvResult<()> {
        let _turn = self.writer.blocking_lock();
        let mut txn = self.db()?.begin_write().map_err(|e| self.error(e))?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| self.error(e))?;
        let started = std::time::Instant::now();
        txn.commit().map_err(|e| self.error(e))?;
        record_durable_commit("group", started);
        Ok(())
    }
}

/// The time of one durable redb commit (its page writes and its flush): `alone` for a commit
/// made durable by itself, `group` for the empty one that makes the lazy ones before it durable.
fn record_durable_commit(kind: &'static str, started: std::time::Instant) {
    metrics::histogram!("stagefs_meta_durable_commit_seconds", "kind" => kind)
        .record(started.elapsed().as_secs_f64());
}

#[async_trait]
impl KvStore for RedbKv {
    fn kind(&self) -> &'static str {
        "redb"
    }

    fn set_eventual_flush(&self, within: std::time::Duration) {
        self.inner
            .flush_within_us
            .store(within.as_micros() as u64, Ordering::Relaxed);
    }

    async fn sync(&self) -> KvResult<()> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.wait_all_durable())
            .await
            .map_err(|e| KvError::Failed(format!("durable commit task failed: {e}")))?
    }

    async fn begin(&self, write: bool) -> KvResult<Box<dyn KvTxn>> {
        let turn = if write {
            let waiting = Waiting::new(&self.inner.writers);
            let guard = self.inner.writer.clone().lock_owned().await;
            Some(Turn {
                _guard: guard,
                _waiting: waiting,
            })
        } else {
            None
        };
        if self.inner.broken.load(Ordering::Acquire) {
            let inner = self.inner.clone();
            let own_turn = match turn {
                Some(_) => None,
                None => Some(self.inner.writer.clone().lock_owned().await),
            };
            tokio::task::spawn_blocking(move || inner.reopen_if_broken())
                .await
                .map_err(|e| KvError::Failed(format!("reopening the database failed: {e}")))??;
            drop(own_turn);
        }
        let inner = &self.inner;
        let read = inner.db()?.begin_read().map_err(|e| inner.error(e))?;
        let table = read.open_table(KV).map_err(|e| inner.error(e))?;
        Ok(Box::new(RedbTxn {
            inner: self.inner.clone(),
            _read: read,
            table,
            turn,
            taken: Vec::new(),
        }))
    }
}

/// The writer's turn, counted among [`Inner::writers`] from before it was waited for until it
/// is given back.
struct Turn {
    _guard: tokio::sync::OwnedMutexGuard<()>,
    _waiting: Waiting,
}

/// One write transaction counted in [`Inner::writers`] while it lives.
struct Waiting(Arc<AtomicUsize>);

impl Waiting {
    fn new(count: &Arc<AtomicUsize>) -> Waiting {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct RedbTxn {
    inner: Arc<Inner>,
    /// Keeps the snapshot alive for `table`.
    _read: ReadTransaction,
    table: ReadOnlyTable<&'static [u8], &'static [u8]>,
    turn: Option<Turn>,
    /// Sequences whose ceiling this transaction raises: (key, new ceiling), written at commit,
    /// which is then durable.
    taken: Vec<(Vec<u8>, u64)>,
}

#[async_trait]
impl KvTxn for RedbTxn {
    async fn get(&mut self, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
        Ok(self
            .table
            .get(key)
            .map_err(|e| self.inner.error(e))?
            .map(|v| v.value().to_vec()))
    }

    async fn scan(
        &mut self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> KvResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        let range = self
            .table
            .range(start..end)
            .map_err(|e| self.inner.error(e))?;
        for item in range.take(limit) {
            let (k, v) = item.map_err(|e| self.inner.error(e))?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Ids come from the sequence's range in memory, so taking them needs no durable commit even
    /// when the transaction's commit is eventual: what the database holds durably is a ceiling
    /// that no id handed out reaches, raised (by [`ID_RESERVE`] beyond what is taken) in a
    /// commit that is then durable. After a crash the ids between the last ones handed out and
    /// the ceiling are skipped, never handed out twice: an eventual commit lost in the crash
    /// cannot leave its inode or slice number to be given to something else while a client or
    /// the staging log still knows it.
    async fn take_ids(&mut self, sequence: Sequence, count: u64) -> KvResult<u64> {
        let key = keys::sequence(sequence);
        let mut sequences = self.inner.sequences.lock().expect("sequences poisoned");
        let range = match sequences.get(&key) {
            Some(range) => *range,
            None => {
                let stored = match self
                    .table
                    .get(key.as_slice())
                    .map_err(|e| self.inner.error(e))?
                {
                    Some(v) => crate::keys::decode_u64("sequence", v.value())
                        .map_err(|e| KvError::Failed(e.to_string()))?,
                    None => sequence.first(),
                };
                IdRange {
                    next: stored,
                    ceiling: stored,
                }
            }
        };
        if count == 0 {
            return Ok(range.next);
        }
        if self.turn.is_none() {
            return Err(KvError::Failed(
                "ids can only be taken in a write transaction".into(),
            ));
        }
        let after = range
            .next
            .checked_add(count)
            .ok_or_else(|| KvError::Failed(format!("sequence {} exhausted", sequence.name())))?;
        let raised = self
            .taken
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(range.ceiling, |(_, c)| *c);
        if after > raised {
            let ceiling = after.saturating_add(ID_RESERVE);
            self.taken.retain(|(k, _)| *k != key);
            self.taken.push((key.clone(), ceiling));
        }
        // Taken now, whatever becomes of the transaction: an id of one that rolls back is
        // skipped, which is harmless.
        sequences.insert(
            key,
            IdRange {
                next: after,
                ceiling: range.ceiling,
            },
        );
        Ok(range.next)
    }

    async fn commit(self: Box<Self>, writes: Vec<Write>, durability: Durability) -> KvResult<()> {
        let RedbTxn {
            inner, turn, taken, ..
        } = *self;
        if writes.is_empty() && taken.is_empty() {
            return Ok(());
        }
        if turn.is_none() {
            return Err(KvError::Failed(
                "a read transaction cannot commit writes".into(),
            ));
        }
        // A raised ceiling must be durable before an id above the old one can be lost in a crash
        // and given again, so it makes the commit durable.
        let durability = if taken.is_empty() {
            durability
        } else {
            Durability::Durable
        };
        let sequence_keys =
            [Sequence::Inode, Sequence::Slice, Sequence::Cookie].map(keys::sequence);
        // Alone (no other write transaction holds or waits for the turn, no group flush under
        // way), a durable commit is made durable itself: one redb transaction, where the group
        // commit makes two (this one, then an empty durable one that flushes it). It keeps the
        // turn through its flush, so a writer arriving meanwhile waits for that flush, as it
        // would wait for a group one. `tar` and `pip` close one file at a time, each `close`
        // such a commit.
        let direct = durability == Durability::Durable
            && inner.writers.load(Ordering::SeqCst) == 1
            && !inner
                .group_sync
                .state
                .lock()
                .expect("sync state poisoned")
                .syncing;
        let mut txn = inner.db()?.begin_write().map_err(|e| inner.error(e))?;
        txn.set_durability(if direct {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })
        .map_err(|e| inner.error(e))?;
        {
            let mut table = txn.open_table(KV).map_err(|e| inner.error(e))?;
            // A sequence written as a plain key (a load) replaces what memory holds of it.
            if writes.iter().any(|(k, _)| sequence_keys.contains(k)) {
                let mut sequences = inner.sequences.lock().expect("sequences poisoned");
                for (key, _) in &writes {
                    sequences.remove(key);
                }
            }
            for (key, value) in &writes {
                match value {
                    Some(value) => table.insert(key.as_slice(), value.as_slice()),
                    None => table.remove(key.as_slice()).map(|_| None),
                }
                .map_err(|e| inner.error(e))?;
            }
            for (key, next) in &taken {
                table
                    .insert(key.as_slice(), keys::encode_u64(*next).as_slice())
                    .map_err(|e| inner.error(e))?;
            }
        }
        if direct {
            let committing = inner.clone();
            // The commit flushes the device: on a blocking thread, which also gives the turn
            // back, so that a caller gone meanwhile never lets the next writer in (to wait in
            // redb on a runtime thread) before the commit is done.
            tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                txn.commit().map_err(|e| committing.error(e))?;
                record_durable_commit("alone", started);
                {
                    let sync = &committing.group_sync;
                    let mut state = sync.state.lock().expect("sync state poisoned");
                    state.committed += 1;
                    // A durable commit makes every earlier one durable too (redb's guarantee).
                    state.durable = state.committed;
                }
                committing.group_sync.synced.notify_all();
                drop(turn);
                Ok::<(), KvError>(())
            })
            .await
            .map_err(|e| KvError::Failed(format!("durable commit task failed: {e}")))??;
            inner.raise_ceilings(taken);
            return Ok(());
        }
        txn.commit().map_err(|e| inner.error(e))?;
        let ticket = {
            let mut state = inner.group_sync.state.lock().expect("sync state poisoned");
            state.committed += 1;
            state.committed
        };
        // The next writer may go while this one waits for its fsync: that is what lets many
        // commits share one.
        drop(turn);
        match durability {
            Durability::Durable => {
                let durable = inner.clone();
                tokio::task::spawn_blocking(move || durable.wait_durable(ticket))
                    .await
                    .map_err(|e| KvError::Failed(format!("durable commit task failed: {e}")))??;
                inner.raise_ceilings(taken);
            }
            Durability::Eventual => Inner::schedule_flush(&inner),
        }
        Ok(())
    }
}
