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
//! every earlier non-durable commit durable.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use async_trait::async_trait;
use redb::{Database, ReadOnlyTable, ReadTransaction, ReadableDatabase, TableDefinition};

use crate::keys;
use crate::kv::{Durability, KvError, KvResult, KvStore, KvTxn, Sequence, Write};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

/// The embedded [`KvStore`].
pub struct RedbKv {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    /// The writer's turn: held from a write transaction's begin to its commit or drop.
    writer: Arc<tokio::sync::Mutex<()>>,
    group_sync: GroupSync,
}

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
}

fn failed(error: impl std::fmt::Display) -> KvError {
    KvError::Failed(error.to_string())
}

/// redb's errors: I/O trouble may pass; the rest will not by itself, and neither does a storage
/// that is full (a metadata region of a device) or returned other bytes than were written.
fn storage(error: redb::StorageError) -> KvError {
    match error {
        redb::StorageError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::InvalidData
            ) =>
        {
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
        let path = path.as_ref();
        let db = builder(cache_bytes).create(path).map_err(|e| match e {
            redb::DatabaseError::Storage(s) => storage(s),
            other => failed(format!("cannot open {}: {other}", path.display())),
        })?;
        RedbKv::with_database(db, &path.display().to_string())
    }

    /// The database in `backend` (created there if it is empty), e.g. the metadata region of a
    /// staging device ([`crate::redb_region`]); `label` names it in messages.
    pub fn open_backend(
        backend: impl redb::StorageBackend,
        label: &str,
        cache_bytes: Option<usize>,
    ) -> KvResult<RedbKv> {
        let db = builder(cache_bytes)
            .create_with_backend(backend)
            .map_err(|e| match e {
                redb::DatabaseError::Storage(s) => storage(s),
                other => failed(format!("cannot open {label}: {other}")),
            })?;
        RedbKv::with_database(db, label)
    }

    fn with_database(db: Database, label: &str) -> KvResult<RedbKv> {
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
                db,
                writer: Arc::new(tokio::sync::Mutex::new(())),
                group_sync: GroupSync::default(),
            }),
        })
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
    /// Returns once commit number `ticket` is durable, making a durable commit if no other thread
    /// is making one. A commit numbered at or below the count read before a durable commit began
    /// finished before it began, so that durable commit covers it. Blocking: call it off the
    /// async threads.
    fn wait_durable(&self, ticket: u64) -> KvResult<()> {
        let sync = &self.group_sync;
        let mut state = sync.state.lock().expect("sync state poisoned");
        loop {
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

    /// An empty transaction committed durably: it persists every non-durable commit before it.
    /// It takes the writer's turn, so no rules transaction waits inside redb (on a runtime thread)
    /// for the fsync.
    fn durable_commit(&self) -> KvResult<()> {
        let _turn = self.writer.blocking_lock();
        let mut txn = self.db.begin_write().map_err(failed)?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(failed)?;
        txn.commit().map_err(commit_failed)
    }
}

#[async_trait]
impl KvStore for RedbKv {
    fn kind(&self) -> &'static str {
        "redb"
    }

    async fn begin(&self, write: bool) -> KvResult<Box<dyn KvTxn>> {
        let turn = if write {
            Some(self.inner.writer.clone().lock_owned().await)
        } else {
            None
        };
        let read = self.inner.db.begin_read().map_err(failed)?;
        let table = read.open_table(KV).map_err(failed)?;
        Ok(Box::new(RedbTxn {
            inner: self.inner.clone(),
            _read: read,
            table,
            turn,
            taken: Vec::new(),
        }))
    }
}

struct RedbTxn {
    inner: Arc<Inner>,
    /// Keeps the snapshot alive for `table`.
    _read: ReadTransaction,
    table: ReadOnlyTable<&'static [u8], &'static [u8]>,
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
    /// Sequences advanced by this transaction: (key, next value), written at commit.
    taken: Vec<(Vec<u8>, u64)>,
}

#[async_trait]
impl KvTxn for RedbTxn {
    async fn get(&mut self, key: &[u8]) -> KvResult<Option<Vec<u8>>> {
        Ok(self
            .table
            .get(key)
            .map_err(storage)?
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
        for item in self.table.range(start..end).map_err(storage)?.take(limit) {
            let (k, v) = item.map_err(storage)?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    async fn take_ids(&mut self, sequence: Sequence, count: u64) -> KvResult<u64> {
        let key = keys::sequence(sequence);
        let next = match self.taken.iter().find(|(k, _)| *k == key) {
            Some((_, next)) => *next,
            None => match self.table.get(key.as_slice()).map_err(storage)? {
                Some(v) => crate::keys::decode_u64("sequence", v.value())
                    .map_err(|e| KvError::Failed(e.to_string()))?,
                None => sequence.first(),
            },
        };
        if count == 0 {
            return Ok(next);
        }
        if self.turn.is_none() {
            return Err(KvError::Failed(
                "ids can only be taken in a write transaction".into(),
            ));
        }
        let after = next
            .checked_add(count)
            .ok_or_else(|| KvError::Failed(format!("sequence {} exhausted", sequence.name())))?;
        self.taken.retain(|(k, _)| *k != key);
        self.taken.push((key, after));
        Ok(next)
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
        let mut txn = inner.db.begin_write().map_err(failed)?;
        txn.set_durability(redb::Durability::None).map_err(failed)?;
        {
            let mut table = txn.open_table(KV).map_err(failed)?;
            for (key, value) in &writes {
                match value {
                    Some(value) => table.insert(key.as_slice(), value.as_slice()),
                    None => table.remove(key.as_slice()).map(|_| None),
                }
                .map_err(storage)?;
            }
            for (key, next) in &taken {
                table
                    .insert(key.as_slice(), keys::encode_u64(*next).as_slice())
                    .map_err(storage)?;
            }
        }
        txn.commit().map_err(commit_failed)?;
        let ticket = {
            let mut state = inner.group_sync.state.lock().expect("sync state poisoned");
            state.committed += 1;
            state.committed
        };
        // The next writer may go while this one waits for its fsync: that is what lets many
        // commits share one.
        drop(turn);
        if durability == Durability::Durable {
            tokio::task::spawn_blocking(move || inner.wait_durable(ticket))
                .await
                .map_err(|e| KvError::Failed(format!("durable commit task failed: {e}")))??;
        }
        Ok(())
    }
}
