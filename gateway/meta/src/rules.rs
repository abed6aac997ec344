//! The file-system rules, written once over the key-value contract ([`crate::kv`]): every
//! [`MetaEngine`] operation is one serializable transaction of gets, scans and buffered writes,
//! run again from the start when the backend reports a conflict with a concurrent transaction
//! (another gateway on the same database).
//!
//! Invariants the rules keep: a slice id belongs to the session it was handed to, and only that
//! session can record it as pending (which consumes the id's lease) or commit it (which consumes
//! the pending record), so a committed slice id is referenced by exactly one chunk and no other
//! client can make its data be deleted; no slice shows bytes at or past its file's size
//! (truncate hides them behind a hole slice); a slice leaves every chunk before it is queued for
//! deletion, and enters the queue at most once.
//!
//! Hot rows: a shared database would serialize every create on one counter row, so usage
//! counters (files, bytes) and directory statistics are split into shards that `statfs` and
//! `du` add up. A write transaction leases a shard no other transaction of this engine holds
//! ([`ShardPool`]), so two creates of one gateway never touch the same counter row, and each
//! engine leases from its own random order of the shards, so two gateways rarely do; ids come
//! from sequences outside the transactions ([`crate::kv::KvTxn::take_ids`]), taken in batches
//! when the backend asks for it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use shared::CHUNK_SIZE;

mod batch;
mod dir_leases;

use crate::codec::{
    decode_inode, decode_slice_data, decode_slices, encode_inode, encode_slice_data, encode_slices,
    Inode,
};
use crate::keys;
use crate::kv::{Durability, KvError, KvStore, KvTxn, Sequence, Write};
use crate::{
    check_name, locks, now_ns, Attr, CommitAttrs, DeletedSlice, DirEntry, DirUsage, FileKind,
    GatewayId, GatewayLoad, GatewayRecord, HeldLock, Ino, LockKind, LockRequest, MetaConfig,
    MetaEngine, MetaError, MountView, NewNode, RenameMode, Renamed, Result, SessionId, SessionInfo,
    SetAttr, Slice, StatFs, TenantUsage, TimeNs, XattrMode, MAX_FILE_SIZE, MAX_LINKS,
    MAX_SYMLINK_LEN, MAX_VIEW_GATEWAYS, MAX_XATTR_NAME_LEN, MAX_XATTR_VALUE_LEN, ROOT_INO,
    WRITE_POLICY_XATTR,
};

/// Records per page of the scan behind [`MetaEngine::referenced_slice_ids`] (tiny in tests, so
/// they cross pages).
#[cfg(not(test))]
const REFERENCE_SCAN_PAGE: usize = 4096;
#[cfg(test)]
const REFERENCE_SCAN_PAGE: usize = 2;

/// Bumped when the layout of the key space changes incompatibly. 3: session ids of 128 random
/// bits, and slice-id leases (`a`).
pub const FORMAT_VERSION: u64 = 4;

/// The last format [`Tx::migrate`] can bring up to [`FORMAT_VERSION`].
const OLDEST_MIGRATABLE_FORMAT: u64 = 2;

/// Usage counters, each split into [`USAGE_SHARDS`] keys.
const FILES: u8 = b'f';
const USED_BYTES: u8 = b'b';
/// Shards of each sharded counter on a shared database: above the transactions one gateway runs
/// at once (its PostgreSQL pool holds 64 connections), so that none of its transactions waits
/// for another's shard, with room for the shards other gateways hold.
const USAGE_SHARDS: u16 = 128;

/// The shards of the sharded counters, leased to one write transaction at a time. A store with
/// one writer at a time (redb) has no use for more than shard 0.
struct ShardPool {
    shards: u16,
    free: Mutex<Vec<u8>>,
}

impl ShardPool {
    fn new(shards: u16) -> ShardPool {
        use rand::seq::SliceRandom;
        let mut free: Vec<u8> = (0..shards).map(|s| s as u8).collect();
        free.shuffle(&mut rand::rng());
        ShardPool {
            shards,
            free: Mutex::new(free),
        }
    }

    /// A shard no other transaction of this engine holds; should every one be out (more write
    /// transactions at once than shards), one at random.
    fn lease(&self) -> ShardLease<'_> {
        let taken = self.free.lock().expect("shard pool poisoned").pop();
        match taken {
            Some(shard) => ShardLease {
                shard,
                pool: Some(self),
            },
            None => ShardLease {
                shard: rand::random_range(0..self.shards) as u8,
                pool: None,
            },
        }
    }
}

/// A shard held by one transaction; back to its pool when the transaction ends.
struct ShardLease<'p> {
    shard: u8,
    pool: Option<&'p ShardPool>,
}

impl Drop for ShardLease<'_> {
    fn drop(&mut self) {
        if let Some(pool) = self.pool {
            // Last in, first out: a quiet engine keeps to a few shards, so statfs and du read
            // few rows.
            pool.free
                .lock()
                .expect("shard pool poisoned")
                .push(self.shard);
        }
    }
}

/// No real tree is this deep (a path is at most 4096 bytes, so at most 2048 levels).
const MAX_TREE_DEPTH: u32 = 1 << 16;

/// Directories [`MetaEngine::within`] walks up at most (a path of 4096 bytes has at most 2048).
const MAX_WITHIN_DEPTH: u32 = 4096;

/// Most slice ids one call hands out: each call leaves one lease record until its ids are used.
pub const MAX_SLICE_IDS_AT_ONCE: u64 = 1 << 20;

/// Longest session description (host, mount point, version) a client may give.
pub const MAX_SESSION_DESCRIPTION: usize = 8 * 1024;

/// How often a conflicted transaction is run again before the conflict is returned (as a
/// retryable error). The backoff grows to about 25 ms, so this bounds a call to a few seconds of
/// contention: PostgreSQL's serializable isolation locks btree pages, not keys, so on a small,
/// hot key space many transactions that touch different records still conflict (see README,
/// `stagefs bench meta`).
const MAX_ATTEMPTS: u32 = 256;

/// The metadata engine: the rules over any [`KvStore`].
pub struct KvMeta {
    store: Arc<dyn KvStore>,
    config: MetaConfig,
    /// Ids taken from the store's sequences but not handed out yet (when the store batches).
    pools: Mutex<HashMap<Sequence, IdPool>>,
    /// Held while a pool is refilled, so that one transaction takes the next batch and the
    /// others wait for it: a batch taken by each transaction that found the pool empty made
    /// the sequence's row a hot spot, each update waiting for the previous one's commit.
    refill: tokio::sync::Mutex<()>,
    /// Transactions run again after a conflict with a concurrent one, since the start.
    conflicts: std::sync::atomic::AtomicU64,
    /// The counter shards write transactions lease.
    shards: ShardPool,
    /// Creates sharing transactions, on a shared database (`rules/batch`).
    batches: Option<batch::Batches>,
    /// The tenant each session created for last ([`KvMeta::tenant_hint`]).
    tenants: Mutex<HashMap<SessionId, String>>,
}

impl KvMeta {
    /// An engine over `store`, formatting an empty store (root directory 1).
    pub async fn open(store: Arc<dyn KvStore>, config: MetaConfig) -> Result<KvMeta> {
        store.set_eventual_flush(config.eventual_flush);
        let meta = KvMeta {
            config,
            pools: Mutex::new(HashMap::new()),
            refill: tokio::sync::Mutex::new(()),
            conflicts: std::sync::atomic::AtomicU64::new(0),
            shards: ShardPool::new(if store.id_batch() > 1 {
                USAGE_SHARDS
            } else {
                1
            }),
            // One writer at a time (redb) gains nothing from sharing a transaction.
            batches: (store.id_batch() > 1).then(batch::Batches::new),
            tenants: Mutex::new(HashMap::new()),
            store,
        };
        if meta.store.read_only() {
            // A replica: made by its primary's gateways; here only read.
            meta.check_formatted().await?;
        } else {
            crate::transact!(meta, Durability::Durable, |tx| tx.format_if_new().await)?;
        }
        Ok(meta)
    }

    /// On a read-only store: the file system must be there, in this build's format (its
    /// primary's gateways format and migrate it).
    async fn check_formatted(&self) -> Result<()> {
        let mut tx = self.read_tx().await?;
        let Some(bytes) = tx.get(keys::FORMAT).await? else {
            return Err(MetaError::ReadOnly(
                "this read-only database holds no stagefs file system yet: a gateway on its \
                 primary makes it"
                    .into(),
            ));
        };
        let version = keys::decode_u64("format version", &bytes)?;
        if version != FORMAT_VERSION {
            return Err(MetaError::ReadOnly(format!(
                "this read-only database is in metadata format {version}, this build serves \
                 {FORMAT_VERSION}: a gateway of this build on its primary migrates it"
            )));
        }
        Ok(())
    }

    /// The backend's name, for logs.
    pub fn backend(&self) -> &'static str {
        self.store.kind()
    }

    /// Transactions that conflicted with a concurrent one and ran again, since the start.
    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[doc(hidden)]
    pub fn count_conflict(&self) {
        self.conflicts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn durability(&self) -> Durability {
        if self.config.sync_commits {
            Durability::Durable
        } else {
            Durability::Eventual
        }
    }

    /// Creates, links, renames, removals and attribute changes: eventual with
    /// [`MetaConfig::lazy_namespace`] (SEMANTICS: durable at the next fsync, close or sync).
    fn namespace_durability(&self) -> Durability {
        if self.config.lazy_namespace {
            Durability::Eventual
        } else {
            self.durability()
        }
    }

    #[doc(hidden)]
    pub async fn begin_tx(&self, kind: TxKind) -> Result<Tx<'_>> {
        let write = kind != TxKind::Read;
        Ok(Tx {
            inner: match kind {
                TxKind::Explicit => self.store.begin_snapshot().await?,
                _ => self.store.begin(write).await?,
            },
            writes: BTreeMap::new(),
            pooled_ids: Vec::new(),
            undo: None,
            reads: HashMap::new(),
            explicit: kind == TxKind::Explicit,
            pinned: HashSet::new(),
            meta: self,
            now: now_ns(),
            // A read-only transaction writes no counter: shard 0, never used.
            shard: if write {
                self.shards.lease()
            } else {
                ShardLease {
                    shard: 0,
                    pool: None,
                }
            },
        })
    }

    /// An id left in this engine's batch of `sequence`, if any.
    fn take_pooled(&self, sequence: Sequence) -> Option<u64> {
        let mut pools = self.pools.lock().expect("id pools poisoned");
        pools.get_mut(&sequence).and_then(IdPool::next)
    }

    /// Ids a transaction took from the pools and never committed: handed out again.
    fn give_back(&self, ids: Vec<(Sequence, u64)>) {
        if ids.is_empty() {
            return;
        }
        let mut pools = self.pools.lock().expect("id pools poisoned");
        for (sequence, id) in ids {
            pools.entry(sequence).or_default().returned.insert(id);
        }
    }

    async fn read_tx(&self) -> Result<Tx<'_>> {
        self.begin_tx(TxKind::Read).await
    }

    /// [`MetaEngine::record_pending_slice`], waiting for durability only when `durability` says;
    /// with `file`, also checks that the slice is for a regular file, before anything is staged.
    async fn record_pending(
        &self,
        session: SessionId,
        file: Option<Ino>,
        slice: &Slice,
        durability: Durability,
    ) -> Result<()> {
        check_slice_shape(slice)?;
        crate::transact!(@explicit, self, durability, |tx| {
            let key = keys::pending(session, slice.slice_id);
            let mut reads = vec![key.clone()];
            reads.extend(file.map(keys::inode));
            tx.fetch(Some(keys::session(session)), reads).await?;
            tx.check_session(session).await?;
            // Whether it is a regular file is checked once, before anything is staged; should it
            // be removed meanwhile, the commit finds it gone and the pending record goes with
            // the session.
            if let Some(ino) = file {
                tx.regular_file(ino).await?;
            }
            let recorded_len = match tx.get(&key).await? {
                Some(bytes) => decode_slice_data(slice.slice_id, &bytes)?.0,
                None => {
                    tx.take_leased(session, slice.slice_id).await?;
                    0
                }
            };
            let len = recorded_len.max(slice.len);
            tx.put(key, encode_slice_data(len, &slice.gateway_id));
            Ok(())
        })
    }

    /// [`MetaEngine::mknod`] and [`MetaEngine::mkdir`]: a node counted for no tenant, in a
    /// transaction shared with other creates where the store gains from it (`rules/batch`).
    async fn make_node(&self, parent: Ino, name: &[u8], node: &NewNode) -> Result<Attr> {
        let alone = async {
            crate::transact_once!(@explicit, self, self.namespace_durability(), |tx| tx
                .create_node(parent, name, node, None, "")
                .await)
        };
        self.make_shared(None, parent, name, node, alone).await
    }

    /// [`MetaEngine::commit_slice`], or with `take_lease` [`MetaEngine::commit_written_slice`].
    #[allow(clippy::too_many_arguments)]
    async fn commit(
        &self,
        session: SessionId,
        ino: Ino,
        chunk_index: u64,
        slice: &Slice,
        new_size: u64,
        attrs: &CommitAttrs,
        take_lease: bool,
    ) -> Result<Attr> {
        check_slice_shape(slice)?;
        let slice_end = chunk_index
            .checked_mul(CHUNK_SIZE)
            .and_then(|start| start.checked_add(slice.end_in_chunk()))
            .filter(|&end| end <= MAX_FILE_SIZE)
            .ok_or(MetaError::FileTooLarge(u64::MAX))?;
        crate::transact!(@explicit, self, self.durability(), |tx| {
            let pending_key = keys::pending(session, slice.slice_id);
            let mut reads = vec![
                pending_key.clone(),
                keys::inode(ino),
                keys::chunk(ino, chunk_index),
            ];
            reads.extend(tx.counter_keys(Some(USED_BYTES), None, None));
            tx.fetch(Some(keys::session(session)), reads).await?;
            tx.check_session(session).await?;
            let was_pending = tx.get(&pending_key).await?.is_some();
            tx.delete(pending_key);
            let mut inode = tx.regular_file(ino).await?;
            let mut slices = tx.chunk(ino, chunk_index).await?;
            if slices.iter().any(|s| s.slice_id == slice.slice_id) {
                // A retry of a commit that succeeded but whose answer was lost. Checked even when
                // the slice was recorded as pending again, so that no chunk ever holds an id twice.
                // Attributes set since the first try come with the retry: they apply now.
                let changes = attrs.held();
                if changes != SetAttr::default() {
                    changes.apply_to(&mut inode.attr);
                    inode.attr.ctime_ns = tx.now;
                    tx.put_inode(&inode);
                }
                return Ok(inode.attr);
            }
            if !was_pending {
                let not_pending = MetaError::SliceNotPending {
                    session,
                    slice_id: slice.slice_id,
                };
                if !take_lease {
                    return Err(not_pending);
                }
                // A `WriteSlice`: checked before staging, leased still (nothing else takes a
                // lease but this session's own commits and records, and its end).
                match tx.take_leased(session, slice.slice_id).await {
                    Ok(()) => {}
                    Err(MetaError::NotPermitted(_)) => return Err(not_pending),
                    Err(error) => return Err(error),
                }
            }
            slices.push(*slice);
            let (kept, shadowed) = drop_shadowed(slices);
            for s in &shadowed {
                tx.queue_deleted(s.slice_id, s.len, &s.gateway_id).await?;
            }
            tx.put_chunk(ino, chunk_index, &kept);
            let size = inode.attr.size.max(new_size).max(slice_end);
            if size > inode.attr.size {
                let counters = tx.counter_keys(None, Some(&inode.owner), home_of(&inode));
                tx.prefetch(counters.collect()).await?;
                tx.resize_file(&mut inode, size).await?;
            }
            attrs.changes().apply_to(&mut inode.attr);
            inode.attr.ctime_ns = tx.now;
            tx.put_inode(&inode);
            Ok(inode.attr)
        })
    }
}

/// A slice a session may stage: not the hole id, with data, within its chunk.
fn check_slice_shape(slice: &Slice) -> Result<()> {
    if slice.slice_id == Slice::HOLE_ID || slice.len == 0 || slice.end_in_chunk() > CHUNK_SIZE {
        return Err(MetaError::Invalid(format!(
            "slice {slice:?}: id 0 is reserved for holes, and a slice has data and fits in its \
             chunk"
        )));
    }
    Ok(())
}

/// Runs `$body` (which uses the transaction `$tx`) in a write transaction committed with
/// `$durability`, from the start again while the backend reports a conflict.
#[macro_export]
#[doc(hidden)]
macro_rules! transact {
    ($meta:expr, $durability:expr, |$tx:ident| $body:expr) => {
        $crate::transact!(@kind $crate::rules::TxKind::Write, $meta, $durability, |$tx| $body)
    };
    (@explicit, $meta:expr, $durability:expr, |$tx:ident| $body:expr) => {
        $crate::transact!(@kind $crate::rules::TxKind::Explicit, $meta, $durability, |$tx| $body)
    };
    (@kind $kind:expr, $meta:expr, $durability:expr, |$tx:ident| $body:expr) => {{
        let mut attempt = 0u32;
        let mut recalls = 0u32;
        loop {
            attempt += 1;
            #[allow(unused_mut)]
            let mut $tx = $meta.begin_tx($kind).await?;
            #[allow(clippy::redundant_closure_call)]
            let outcome: $crate::Result<_> = async { $body }.await;
            let outcome = match outcome {
                Ok(value) => $tx.commit($durability).await.map(|()| value),
                Err(error) => {
                    // An error the reads led to must hold for the store, not only for what a
                    // backend remembered of it (`KvTxn::check_reads`).
                    let error = match error {
                        $crate::MetaError::Backend(_) => error,
                        error => $tx.check_reads().await.map_or_else(|e| e, |()| error),
                    };
                    // Ended before any wait below: a recall runs transactions of its own, and
                    // redb has one writer.
                    $tx.give_back_ids();
                    drop($tx);
                    Err(error)
                }
            };
            match outcome {
                Err(error) if error.is_conflict() && attempt < $crate::rules::max_attempts() => {
                    $meta.count_conflict();
                    $crate::rules::conflict_backoff(attempt).await;
                }
                // An addition to a directory another session holds the lease on: recall it,
                // then run again (`rules/dir_leases`).
                Err($crate::MetaError::DirLeased(dir)) if recalls < $crate::rules::MAX_RECALLS => {
                    recalls += 1;
                    if let Err(error) = Box::pin($meta.recall_dir_lease(dir)).await {
                        break Err(error);
                    }
                }
                outcome => break outcome,
            }
        }
    }};
}

/// [`transact!`] for a change a client may send twice ([`crate::once`]): with the request's tag,
/// a change already made answers its recorded result, and a change made now records one.
#[macro_export]
#[doc(hidden)]
macro_rules! transact_once {
    ($meta:expr, $durability:expr, |$tx:ident| $body:expr) => {
        $crate::transact_once!(@kind $crate::rules::TxKind::Write, $meta, $durability, |$tx| $body)
    };
    (@explicit, $meta:expr, $durability:expr, |$tx:ident| $body:expr) => {
        $crate::transact_once!(
            @kind $crate::rules::TxKind::Explicit, $meta, $durability, |$tx| $body
        )
    };
    (@kind $kind:expr, $meta:expr, $durability:expr, |$tx:ident| $body:expr) => {{
        let tag = $crate::once::current();
        let mut runs = 0u32;
        $crate::transact!(@kind $kind, $meta, $durability, |$tx| {
            runs += 1;
            if let Some(tag) = &tag {
                if let Some(done) = $tx.replayed(tag, runs).await? {
                    return Ok(done);
                }
            }
            let value: $crate::Result<_> = async { $body }.await;
            let value = value?;
            if let Some(tag) = &tag {
                $tx.record_change(tag, $crate::once::Replayable::recorded(&value));
            }
            Ok(value)
        })
    }};
}

#[doc(hidden)]
pub use dir_leases::MAX_RECALLS;

#[doc(hidden)]
pub fn max_attempts() -> u32 {
    MAX_ATTEMPTS
}

/// A short, growing, jittered pause before a conflicted transaction runs again, so two gateways
/// that keep colliding drift apart.
#[doc(hidden)]
pub async fn conflict_backoff(attempt: u32) {
    let ceiling_us = 100u64 << attempt.min(8);
    tokio::time::sleep(Duration::from_micros(rand::random_range(0..=ceiling_us))).await;
}

/// How a transaction is isolated.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxKind {
    /// Reads only, from one snapshot.
    Read,
    /// A serializable write transaction: whatever it read is protected.
    Write,
    /// A snapshot write transaction ([`KvStore::begin_snapshot`]), for the hot changes whose
    /// dependencies are all explicit. What such a change relies on, and how it is protected:
    /// - a record it also writes (the parent directory a create touches, a chunk, a file's inode,
    ///   a counter shard, a pending-slice record it deletes): two writers of one key never both
    ///   commit;
    /// - a name it finds free: it writes the name, and two creators of one key never both
    ///   commit;
    /// - its session: read pinned ([`Tx::session_record`]); closing a session first takes its
    ///   record ([`KvTxn::get_locked`], which waits for the pins) and marks it closing in a
    ///   transaction of its own, so a change either finishes before the close looks for what
    ///   the session holds, or sees the mark and fails;
    /// - a directory's write policy (an extended attribute): setting one writes the directory's
    ///   inode, which a create writes too.
    ///
    /// Not protected: the file-count and capacity limits (`max_files`, `capacity_bytes`) are
    /// checked against a snapshot of the totals, so concurrent changes on a shared database may
    /// pass them by what they add together (README, Known gaps).
    ///
    /// The other way round: a shared database's serializable checks do not see what snapshot
    /// transactions write, so a serializable change that relies on a record a snapshot change
    /// writes must write that record too (today every such record is an inode or name the
    /// serializable change also writes; a rename's walk up a chain of parents reads inodes a
    /// `mkdir` writes, harmless because a `mkdir` never changes an existing inode's parent).
    Explicit,
}

/// The ids of one sequence this engine took from the store and has not handed out.
#[derive(Default)]
struct IdPool {
    /// Taken by transactions that did not commit ([`Tx::give_back_ids`]): handed out first,
    /// lowest first.
    returned: std::collections::BTreeSet<u64>,
    fresh: Range<u64>,
}

impl IdPool {
    fn next(&mut self) -> Option<u64> {
        self.returned.pop_first().or_else(|| self.fresh.next())
    }
}

/// A key written, and what the transaction's writes held of it before (`None`: nothing).
type Undo = (Vec<u8>, Option<Option<Vec<u8>>>);

/// One transaction: reads go to the backend's snapshot unless this transaction wrote the key;
/// writes are buffered and handed to the backend at commit.
#[doc(hidden)]
pub struct Tx<'m> {
    inner: Box<dyn KvTxn>,
    /// Every key written so far, `None` for deleted.
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Ids taken from the engine's pools ([`Tx::give_back_ids`]).
    pooled_ids: Vec<(Sequence, u64)>,
    /// While a change shares this transaction with others (`rules/batch`): what `writes` held
    /// of each key it wrote before it did (`None`: nothing), so that a failed one is undone.
    undo: Option<Vec<Undo>>,
    /// Every key read so far: the snapshot does not change within a transaction, and the rules
    /// read some records more than once (a parent directory checked, then touched), which would
    /// otherwise cost a database round trip each.
    reads: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// A snapshot transaction ([`TxKind::Explicit`]).
    explicit: bool,
    /// Keys read pinned ([`KvTxn::get_pinned`]).
    pinned: HashSet<Vec<u8>>,
    meta: &'m KvMeta,
    now: TimeNs,
    /// The counter shard this transaction updates (its usage, its tenant's, and a directory's
    /// statistics).
    shard: ShardLease<'m>,
}

impl Tx<'_> {
    pub async fn commit(self, durability: Durability) -> Result<()> {
        let writes: Vec<Write> = self.writes.into_iter().collect();
        self.inner
            .commit(writes, durability)
            .await
            .map_err(|error| {
                // A conflict applied nothing; any other failure may have committed.
                if matches!(error, KvError::Conflict(_)) {
                    self.meta.give_back(self.pooled_ids);
                }
                error.into()
            })
    }

    /// [`KvTxn::check_reads`], before an error that came of this transaction's reads is
    /// returned instead of a commit.
    #[doc(hidden)]
    pub async fn check_reads(&mut self) -> Result<()> {
        Ok(self.inner.check_reads().await?)
    }

    // --- the key-value layer ---

    async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(written) = self.writes.get(key) {
            return Ok(written.clone());
        }
        if let Some(read) = self.reads.get(key) {
            return Ok(read.clone());
        }
        let value = self.inner.get(key).await?;
        self.reads.insert(key.to_vec(), value.clone());
        Ok(value)
    }

    /// Reads `keys` in one round trip where the backend can, so that the rules' later `get`s of
    /// them cost nothing: for a change that knows up front most of what it will read.
    async fn prefetch(&mut self, keys: Vec<Vec<u8>>) -> Result<()> {
        self.fetch(None, keys).await
    }

    /// [`Tx::prefetch`], with `pin` read as this transaction relies on it: pinned in a snapshot
    /// transaction (see [`TxKind::Explicit`]).
    async fn fetch(&mut self, pin: Option<Vec<u8>>, keys: Vec<Vec<u8>>) -> Result<()> {
        self.fetch_pinned(pin.into_iter().collect(), keys).await
    }

    /// [`Tx::fetch`] with any number of keys read pinned (`pins`, distinct).
    async fn fetch_pinned(&mut self, mut pins: Vec<Vec<u8>>, mut keys: Vec<Vec<u8>>) -> Result<()> {
        // Outside a snapshot transaction every read is protected: a pin is a plain read.
        if !self.explicit {
            keys.append(&mut pins);
        }
        pins.retain(|key| !self.writes.contains_key(key) && !self.pinned.contains(key));
        keys.retain(|key| {
            !self.writes.contains_key(key) && !self.reads.contains_key(key) && !pins.contains(key)
        });
        keys.sort();
        keys.dedup();
        let pinned = pins.len();
        keys.splice(0..0, pins);
        if keys.is_empty() {
            return Ok(());
        }
        let values = self.inner.get_many(&keys, pinned).await?;
        if values.len() != keys.len() {
            return Err(MetaError::Corrupt(format!(
                "the backend answered {} values for {} keys",
                values.len(),
                keys.len()
            )));
        }
        self.pinned.extend(keys[..pinned].iter().cloned());
        self.reads.extend(keys.into_iter().zip(values));
        Ok(())
    }

    /// [`KvTxn::get_locked`]: `key`, taken for this transaction.
    async fn get_locked(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(written) = self.writes.get(key) {
            return Ok(written.clone());
        }
        let value = self.inner.get_locked(key).await?;
        self.reads.insert(key.to_vec(), value.clone());
        Ok(value)
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.write(key, Some(value));
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.write(key, None);
    }

    fn write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        let before = self.writes.insert(key.clone(), value);
        if let Some(undo) = &mut self.undo {
            undo.push((key, before));
        }
    }

    /// From now on, every write can be undone by [`Tx::undo`] (until [`Tx::stop_undo`]): the
    /// next change sharing this transaction begins.
    fn start_undo(&mut self) {
        self.undo = Some(Vec::new());
    }

    /// Takes back every write since [`Tx::start_undo`]. What was read stays: the snapshot is
    /// the same.
    fn undo(&mut self) {
        for (key, before) in self.undo.take().unwrap_or_default().into_iter().rev() {
            match before {
                Some(value) => self.writes.insert(key, value),
                None => self.writes.remove(&key),
            };
        }
    }

    fn stop_undo(&mut self) {
        self.undo = None;
    }

    /// A name about to be made: expected free ([`KvTxn::expect_absent`]), before it is read.
    fn expect_new_name(&mut self, parent: Ino, name: &[u8]) {
        self.inner.expect_absent(&keys::dentry(parent, name));
    }

    /// Up to `limit` pairs with `start <= key < end` as this transaction sees them.
    async fn scan(
        &mut self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let buffered: Vec<(Vec<u8>, Option<Vec<u8>>)> = self
            .writes
            .range(start.to_vec()..end.to_vec())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Each buffered deletion may hide one stored pair, so ask for that many more.
        let stored = self
            .inner
            .scan(start, end, limit.saturating_add(buffered.len()))
            .await?;
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = stored.into_iter().collect();
        for (key, value) in buffered {
            match value {
                Some(value) => merged.insert(key, value),
                None => merged.remove(&key),
            };
        }
        Ok(merged.into_iter().take(limit).collect())
    }

    async fn scan_prefix(&mut self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan(prefix, &keys::prefix_end(prefix), usize::MAX)
            .await
    }

    /// A fresh id of `sequence`, from the engine's batch when the store batches.
    async fn next_id(&mut self, sequence: Sequence) -> Result<u64> {
        let batch = self.meta.store.id_batch();
        if batch <= 1 {
            return Ok(self.inner.take_ids(sequence, 1).await?);
        }
        if let Some(id) = self.meta.take_pooled(sequence) {
            self.pooled_ids.push((sequence, id));
            return Ok(id);
        }
        let _refilling = self.meta.refill.lock().await;
        // Refilled while this one waited.
        if let Some(id) = self.meta.take_pooled(sequence) {
            self.pooled_ids.push((sequence, id));
            return Ok(id);
        }
        let first = self.inner.take_ids(sequence, batch).await?;
        // Only the refill's holder fills a pool, and it found this one empty.
        self.meta
            .pools
            .lock()
            .expect("id pools poisoned")
            .entry(sequence)
            .or_default()
            .fresh = first + 1..first + batch;
        self.pooled_ids.push((sequence, first));
        Ok(first)
    }

    /// This transaction will not commit: the ids it took from the engine's pools go back
    /// (a transaction that guessed a name free and found it taken at its commit took one for
    /// nothing, and a run that failed should not leave a gap each time). Not after a commit
    /// whose outcome is unknown: it may have used them.
    pub fn give_back_ids(&mut self) {
        self.meta.give_back(std::mem::take(&mut self.pooled_ids));
    }

    // --- format and counters ---

    async fn format_if_new(&mut self) -> Result<()> {
        if let Some(bytes) = self.get(keys::FORMAT).await? {
            let version = keys::decode_u64("format version", &bytes)?;
            if version == FORMAT_VERSION {
                return Ok(());
            }
            if (OLDEST_MIGRATABLE_FORMAT..FORMAT_VERSION).contains(&version) {
                return self.migrate(version).await;
            }
            return Err(MetaError::Corrupt(format!(
                "metadata format {version}, this build reads {OLDEST_MIGRATABLE_FORMAT} to \
                 {FORMAT_VERSION}"
            )));
        }
        if !self.scan(&[], &[0xff], 1).await?.is_empty() {
            return Err(MetaError::Corrupt(
                "the database holds stagefs records but no format record (an interrupted \
                 `meta load`?): drop it and load again"
                    .into(),
            ));
        }
        let root = Inode {
            attr: Attr {
                ino: ROOT_INO,
                kind: FileKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                nlink: 2,
                size: 0,
                atime_ns: self.now,
                mtime_ns: self.now,
                ctime_ns: self.now,
                rdev: 0,
            },
            parent: ROOT_INO,
            open_handles: 0,
            has_xattrs: Some(false),
            owner: String::new(),
        };
        self.put_inode(&root);
        self.put(keys::FORMAT.to_vec(), keys::encode_u64(FORMAT_VERSION));
        self.add_usage("", 1, 0).await
    }

    /// Brings format `from` up to [`FORMAT_VERSION`] in this transaction, one step at a time.
    async fn migrate(&mut self, from: u64) -> Result<()> {
        // Counted first, so that files the session step purges leave their directories' counts.
        if from < 4 {
            self.count_directories().await?;
        }
        if from < 3 {
            self.migrate_sessions().await?;
        }
        self.put(keys::FORMAT.to_vec(), keys::encode_u64(FORMAT_VERSION));
        tracing::info!(from, to = FORMAT_VERSION, "migrated the metadata format");
        Ok(())
    }

    /// 3 → 4: directory statistics (`du`). Every directory is indexed under its parent and
    /// counted there; every other node gets as home the directory of its first name (format 3
    /// kept a file's parent only from its creation) and is counted there, or nowhere when it
    /// has no name left.
    async fn count_directories(&mut self) -> Result<()> {
        // Each node's names by directory, in directory order.
        let mut names: HashMap<Ino, Vec<(Ino, u64)>> = HashMap::new();
        for (key, value) in self.scan_prefix(b"d").await? {
            let ([parent], _) = keys::parse::<1>(&key)?;
            let (ino, _, _) = keys::decode_pair("directory entry", &value)?;
            let dirs = names.entry(ino).or_default();
            match dirs.last_mut() {
                Some((dir, count)) if *dir == parent => *count += 1,
                _ => dirs.push((parent, 1)),
            }
        }
        let mut stats: HashMap<Ino, [i64; 3]> = HashMap::new();
        for (key, value) in self.scan_prefix(b"i").await? {
            let ([ino], _) = keys::parse::<1>(&key)?;
            let mut inode = decode_inode(ino, &value)?;
            if inode.attr.kind == FileKind::Dir {
                if ino != ROOT_INO {
                    self.put(keys::subdir(inode.parent, ino), Vec::new());
                }
            } else {
                let dirs = names.get(&ino).map(Vec::as_slice).unwrap_or_default();
                let home = match inode.attr.nlink {
                    0 => 0,
                    _ => dirs.first().map_or(0, |&(dir, _)| dir),
                };
                if inode.attr.nlink >= 2 {
                    for &(dir, count) in dirs {
                        self.put(keys::names(ino, dir), keys::encode_u64(count));
                    }
                }
                if inode.parent != home {
                    inode.parent = home;
                    self.put_inode(&inode);
                }
            }
            if let Some(home) = home_of(&inode) {
                let total = stats.entry(home).or_default();
                for (t, d) in total.iter_mut().zip(counted(&inode.attr)) {
                    *t += d;
                }
            }
        }
        for (dir, delta) in stats {
            self.add_dir_stats(dir, delta).await?;
        }
        // Nothing had an owner before: every inode and byte is the no-tenant's.
        for (key, _) in self.scan_prefix(keys::TENANT_USAGE_PREFIX).await? {
            self.delete(key);
        }
        let (files, bytes) = (self.usage(FILES).await?, self.usage(USED_BYTES).await?);
        self.put(keys::tenant_usage(0, ""), encode_counters(&[files, bytes]));
        Ok(())
    }

    /// 2 → 3: sessions had sequential 64-bit ids, which any client could guess. Each one is
    /// closed as an expired session is (its handles released, unlinked files nobody holds purged,
    /// slices it staged but never committed queued for deletion); its client is told the session
    /// is gone and opens a new one.
    async fn migrate_sessions(&mut self) -> Result<()> {
        for (key, value) in self.scan_prefix(b"h").await? {
            let ([_session, ino], _) = keys::parse::<2>(&key)?;
            self.delete(key);
            let count = keys::decode_u64("open handles", &value)?;
            self.drop_open_handles(ino, count).await?;
        }
        for (key, value) in self.scan_prefix(b"p").await? {
            let ([_session, slice_id], _) = keys::parse::<2>(&key)?;
            self.delete(key);
            let (len, gateway_id) = decode_slice_data(slice_id, &value)?;
            self.queue_deleted(slice_id, len, &gateway_id).await?;
        }
        for (key, _) in self.scan_prefix(keys::SESSION_PREFIX).await? {
            self.delete(key);
        }
        // The session sequence of format 2, where the backend kept it in the key space.
        self.delete(b"nnext_session".to_vec());
        Ok(())
    }

    /// A usage counter: the sum of its shards.
    async fn usage(&mut self, counter: u8) -> Result<u64> {
        let [total] = self
            .sum_counters(&keys::usage_prefix(counter), "usage counter")
            .await?;
        Ok(total)
    }

    /// Adds `delta` to the counters at `key` (a shard of a sharded record: usage, a tenant's
    /// totals, a directory's statistics). A shard may wrap below zero when another shard holds
    /// the matching increment; the sum over the shards is what counts.
    async fn add_counters<const N: usize>(
        &mut self,
        key: Vec<u8>,
        what: &str,
        delta: [i64; N],
    ) -> Result<()> {
        if delta == [0; N] {
            return Ok(());
        }
        let mut values = match self.get(&key).await? {
            Some(bytes) => decode_counters::<N>(what, &bytes)?,
            None => [0; N],
        };
        for (value, d) in values.iter_mut().zip(delta) {
            *value = value.wrapping_add_signed(d);
        }
        self.put(key, encode_counters(&values));
        Ok(())
    }

    /// The sum of the shards of a sharded counter record, all under `prefix`.
    async fn sum_counters<const N: usize>(
        &mut self,
        prefix: &[u8],
        what: &str,
    ) -> Result<[u64; N]> {
        let mut total = [0; N];
        for (_, value) in self.scan_prefix(prefix).await? {
            add_wrapping(&mut total, decode_counters(what, &value)?);
        }
        Ok(total)
    }

    /// Adds to this transaction's shard of the usage counters, of the file system and of the
    /// tenant `owner`.
    async fn add_usage(&mut self, owner: &str, files: i64, bytes: i64) -> Result<()> {
        let key = keys::tenant_usage(self.shard.shard, owner);
        self.add_counters(key, "tenant usage", [files, bytes])
            .await?;
        for (counter, delta) in [(FILES, files), (USED_BYTES, bytes)] {
            self.add_counters(
                keys::usage(counter, self.shard.shard),
                "usage counter",
                [delta],
            )
            .await?;
        }
        Ok(())
    }

    /// Adds `delta` (files, directories, bytes) to this transaction's shard of `dir`'s
    /// statistics.
    async fn add_dir_stats(&mut self, dir: Ino, delta: [i64; 3]) -> Result<()> {
        let key = keys::dir_stats(dir, self.shard.shard);
        self.add_counters(key, "directory statistics", delta).await
    }

    /// The statistics of `dir`'s direct children: the sum of its shards.
    async fn dir_stats(&mut self, dir: Ino) -> Result<[u64; 3]> {
        self.sum_counters(&keys::dir_stats_prefix(dir), "directory statistics")
            .await
    }

    /// Moves what `inode` counts for from directory `from` to `to` (a rename); a directory's
    /// index entry moves with it. `inode.parent` is the caller's to update.
    async fn move_counted(&mut self, inode: &Inode, from: Ino, to: Ino) -> Result<()> {
        let delta = counted(&inode.attr);
        if from != 0 {
            self.add_dir_stats(from, delta.map(|d| -d)).await?;
        }
        if to != 0 {
            self.add_dir_stats(to, delta).await?;
        }
        if inode.attr.kind == FileKind::Dir {
            self.delete(keys::subdir(from, inode.attr.ino));
            self.put(keys::subdir(to, inode.attr.ino), Vec::new());
        }
        Ok(())
    }

    /// Adds `delta` to the names node `ino` has in `dir` (`P`); answers how many are left.
    async fn add_names(&mut self, ino: Ino, dir: Ino, delta: i64) -> Result<u64> {
        let key = keys::names(ino, dir);
        let count = match self.get(&key).await? {
            Some(bytes) => keys::decode_u64("names in a directory", &bytes)?,
            None => 0,
        }
        .saturating_add_signed(delta);
        if count == 0 {
            self.delete(key);
        } else {
            self.put(key, keys::encode_u64(count));
        }
        Ok(count)
    }

    /// The directories holding a name of `ino` (with several names), in order.
    async fn name_dirs(&mut self, ino: Ino) -> Result<Vec<(Vec<u8>, Ino)>> {
        let mut dirs = Vec::new();
        for (key, _) in self.scan_prefix(&keys::names_prefix(ino)).await? {
            let ([_, dir], _) = keys::parse::<2>(&key)?;
            dirs.push((key, dir));
        }
        Ok(dirs)
    }

    /// A name of `inode` moved from directory `from` to `to` (a rename). A directory, or another
    /// node with one name, is counted where its name is; a node with several names stays
    /// counted where it was unless that directory holds none of its names any more.
    async fn move_name(&mut self, inode: &mut Inode, from: Ino, to: Ino) -> Result<()> {
        if from == to {
            return Ok(());
        }
        let home_loses_it = if inode.attr.kind == FileKind::Dir || inode.attr.nlink < 2 {
            true
        } else {
            let left = self.add_names(inode.attr.ino, from, -1).await?;
            self.add_names(inode.attr.ino, to, 1).await?;
            left == 0
        };
        if inode.parent == from && home_loses_it {
            self.move_counted(inode, from, to).await?;
            inode.parent = to;
        }
        Ok(())
    }

    // --- inodes and entries ---

    async fn inode(&mut self, ino: Ino) -> Result<Inode> {
        match self.get(&keys::inode(ino)).await? {
            Some(bytes) => decode_inode(ino, &bytes),
            None => Err(MetaError::NoSuchInode(ino)),
        }
    }

    async fn dir(&mut self, ino: Ino) -> Result<Inode> {
        let inode = self.inode(ino).await?;
        match inode.attr.kind {
            FileKind::Dir => Ok(inode),
            _ => Err(MetaError::NotADirectory(ino)),
        }
    }

    fn put_inode(&mut self, inode: &Inode) {
        self.put(keys::inode(inode.attr.ino), encode_inode(inode));
    }

    /// Loads, changes and stores an inode; every change of a shared inode (a parent directory
    /// that may be both source and target of a rename) goes through here, so no stale copy is
    /// written back.
    async fn update_inode(&mut self, ino: Ino, change: impl FnOnce(&mut Inode)) -> Result<Inode> {
        let mut inode = self.inode(ino).await?;
        change(&mut inode);
        self.put_inode(&inode);
        Ok(inode)
    }

    /// A directory's content changed: mtime and ctime become now, nlink moves by `subdirs`.
    async fn touch_dir(&mut self, dir: Ino, subdirs: i32) -> Result<()> {
        let now = self.now;
        self.update_inode(dir, |d| {
            d.attr.nlink = d.attr.nlink.saturating_add_signed(subdirs);
            d.attr.mtime_ns = now;
            d.attr.ctime_ns = now;
        })
        .await?;
        Ok(())
    }

    async fn entry(&mut self, parent: Ino, name: &[u8]) -> Result<Option<(Ino, u64)>> {
        match self.get(&keys::dentry(parent, name)).await? {
            Some(bytes) => {
                let (ino, cookie, _) = keys::decode_pair("directory entry", &bytes)?;
                Ok(Some((ino, cookie)))
            }
            None => Ok(None),
        }
    }

    async fn add_entry(&mut self, parent: Ino, name: &[u8], ino: Ino) -> Result<()> {
        self.check_dir_lease(parent).await?;
        let cookie = self.next_id(Sequence::Cookie).await?;
        self.put(
            keys::dentry(parent, name),
            keys::encode_pair(ino, cookie, &[]),
        );
        self.put(
            keys::listing(parent, cookie),
            keys::encode_pair(ino, 0, name),
        );
        Ok(())
    }

    async fn remove_entry(&mut self, parent: Ino, name: &[u8]) -> Result<Ino> {
        let (ino, cookie) = self
            .entry(parent, name)
            .await?
            .ok_or_else(|| no_entry(parent, name))?;
        self.delete(keys::dentry(parent, name));
        self.delete(keys::listing(parent, cookie));
        Ok(ino)
    }

    async fn dir_is_empty(&mut self, dir: Ino) -> Result<bool> {
        let prefix = keys::listing_prefix(dir);
        let first = self.scan(&prefix, &keys::prefix_end(&prefix), 1).await?;
        Ok(first.is_empty())
    }

    /// Whether `ancestor` is `ino` or one of the directories above it.
    async fn is_ancestor(&mut self, ancestor: Ino, mut ino: Ino) -> Result<bool> {
        // Bounded, so a corrupt parent chain that loops is reported instead of hanging.
        for _ in 0..MAX_TREE_DEPTH {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == ROOT_INO {
                return Ok(false);
            }
            ino = self.inode(ino).await?.parent;
        }
        Err(MetaError::Corrupt(format!(
            "directory {ino} is more than {MAX_TREE_DEPTH} levels deep or its parents loop"
        )))
    }

    async fn check_new_name(&mut self, parent: Ino, name: &[u8]) -> Result<Inode> {
        check_name(name)?;
        let dir = self.dir(parent).await?;
        if dir.attr.nlink == 0 {
            return Err(MetaError::NoSuchInode(parent));
        }
        if self.entry(parent, name).await?.is_some() {
            return Err(MetaError::AlreadyExists {
                parent,
                name: String::from_utf8_lossy(name).into_owned(),
            });
        }
        Ok(dir)
    }

    /// What [`Tx::create_node`] reads (the tenant's usage when `owner` is known), to be read in
    /// one round trip.
    fn new_node_keys(&self, parent: Ino, name: &[u8], owner: Option<&str>) -> Vec<Vec<u8>> {
        let mut keys = vec![
            keys::inode(parent),
            keys::dentry(parent, name),
            keys::dir_lease(parent),
        ];
        keys.extend(self.counter_keys(Some(FILES), owner, Some(parent)));
        keys
    }

    /// This transaction's shards of the counters [`Tx::add_usage`] and [`Tx::add_dir_stats`]
    /// update: usage `counter`, `owner`'s totals, `dir`'s statistics (each when given).
    fn counter_keys(
        &self,
        counter: Option<u8>,
        owner: Option<&str>,
        dir: Option<Ino>,
    ) -> impl Iterator<Item = Vec<u8>> {
        let shard = self.shard.shard;
        let usage = counter.map(|counter| keys::usage(counter, shard));
        let tenant = owner.map(|owner| keys::tenant_usage(shard, owner));
        let stats = dir.map(|dir| keys::dir_stats(dir, shard));
        usage.into_iter().chain(tenant).chain(stats)
    }

    /// A regular file `name` in `parent`, open for `session` (a create).
    async fn create_file(
        &mut self,
        session: SessionId,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
    ) -> Result<Attr> {
        // The session (it names the tenant whose usage grows) with all else a create reads: the
        // tenant's totals too when the session's tenant is known from before.
        check_name(name)?;
        self.expect_new_name(parent, name);
        let hint = self.meta.tenant_hint(session);
        let keys = self.new_node_keys(parent, name, hint.as_deref());
        self.fetch(Some(keys::session(session)), keys).await?;
        let owner = self.session_tenant(session).await?;
        // Right as read, whether this transaction commits or not.
        self.meta.note_tenant(session, &owner);
        let attr = self.create_node(parent, name, node, None, &owner).await?;
        self.update_inode(attr.ino, |i| i.open_handles += 1).await?;
        self.put(keys::handle(session, attr.ino), keys::encode_u64(1));
        self.put(keys::holder(attr.ino, session), Vec::new());
        Ok(attr)
    }

    async fn create_node(
        &mut self,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
        symlink_target: Option<&[u8]>,
        owner: &str,
    ) -> Result<Attr> {
        check_name(name)?;
        self.expect_new_name(parent, name);
        self.prefetch(self.new_node_keys(parent, name, Some(owner)))
            .await?;
        let dir = self.check_new_name(parent, name).await?;
        if let Some(max) = self.meta.config.max_files {
            if self.usage(FILES).await? >= max {
                return Err(MetaError::NoSpace(format!("{max} inodes in use")));
            }
        }
        let ino = self.next_id(Sequence::Inode).await?;
        let is_dir = node.kind == FileKind::Dir;
        // The directory's write policy goes to what is made in it (`stagefs policy`). Only a
        // directory that has attributes (or may, from before the flag existed) is asked.
        let policy = match dir.has_xattrs {
            Some(false) => None,
            _ => self.get(&keys::xattr(parent, WRITE_POLICY_XATTR)).await?,
        }
        .filter(|_| node.kind != FileKind::Symlink);
        let inode = Inode {
            attr: Attr {
                ino,
                kind: node.kind,
                mode: node.mode & 0o7777,
                uid: node.uid,
                gid: node.gid,
                nlink: if is_dir { 2 } else { 1 },
                size: symlink_target.map_or(0, |t| t.len() as u64),
                atime_ns: self.now,
                mtime_ns: self.now,
                ctime_ns: self.now,
                rdev: node.rdev,
            },
            parent,
            open_handles: 0,
            has_xattrs: Some(policy.is_some()),
            owner: owner.to_string(),
        };
        self.put_inode(&inode);
        if let Some(policy) = policy {
            self.put(keys::xattr(ino, WRITE_POLICY_XATTR), policy);
        }
        if let Some(target) = symlink_target {
            self.put(keys::symlink(ino), target.to_vec());
        }
        self.add_entry(parent, name, ino).await?;
        self.touch_dir(parent, if is_dir { 1 } else { 0 }).await?;
        self.add_usage(owner, 1, 0).await?;
        self.add_dir_stats(parent, counted(&inode.attr)).await?;
        if is_dir {
            self.put(keys::subdir(parent, ino), Vec::new());
        }
        Ok(inode.attr)
    }

    /// The name of a non-directory in `dir` is gone; the inode goes with its last name unless
    /// open. When its home directory holds none of its names any more, the first directory that
    /// does counts it; after its last name, none.
    async fn drop_link(&mut self, dir: Ino, ino: Ino) -> Result<()> {
        let mut inode = self.inode(ino).await?;
        let names_before = inode.attr.nlink;
        inode.attr.nlink = names_before.saturating_sub(1);
        inode.attr.ctime_ns = self.now;
        let home = if names_before >= 2 {
            let left_here = self.add_names(ino, dir, -1).await?;
            let home_lost_it = inode.parent == dir && left_here == 0;
            if names_before == 2 || home_lost_it {
                let dirs = self.name_dirs(ino).await?;
                if names_before == 2 {
                    // One name left: no index needed any more.
                    for (key, _) in &dirs {
                        self.delete(key.clone());
                    }
                }
                // The first directory holding a name (the only one, with one name left).
                dirs.first().map_or(inode.parent, |&(_, first)| first)
            } else {
                inode.parent
            }
        } else {
            0
        };
        if home != inode.parent {
            self.move_counted(&inode, inode.parent, home).await?;
            inode.parent = home;
        }
        self.put_inode(&inode);
        if inode.attr.nlink == 0 && inode.open_handles == 0 {
            self.purge(ino).await?;
        }
        Ok(())
    }

    /// Removes an inode and everything it owns; its slices go to the deleted data queue.
    async fn purge(&mut self, ino: Ino) -> Result<()> {
        let inode = self.inode(ino).await?;
        self.delete(keys::inode(ino));
        self.delete(keys::symlink(ino));
        for (key, _) in self.scan_prefix(&keys::xattr_prefix(ino)).await? {
            self.delete(key);
        }
        for (key, _) in self.name_dirs(ino).await? {
            self.delete(key);
        }
        self.drop_chunks_from(ino, 0).await?;
        if let Some(home) = home_of(&inode) {
            self.add_dir_stats(home, counted(&inode.attr).map(|d| -d))
                .await?;
        }
        if inode.attr.kind == FileKind::Dir {
            self.forget_dir_lease(ino).await?;
            self.delete(keys::subdir(inode.parent, ino));
            for (key, _) in self.scan_prefix(&keys::dir_stats_prefix(ino)).await? {
                self.delete(key);
            }
        }
        let bytes = if inode.attr.kind == FileKind::File {
            inode.attr.size
        } else {
            0
        };
        self.add_usage(&inode.owner, -1, -(bytes as i64)).await
    }

    // --- file data ---

    async fn chunk(&mut self, ino: Ino, chunk_index: u64) -> Result<Vec<Slice>> {
        match self.get(&keys::chunk(ino, chunk_index)).await? {
            Some(bytes) => decode_slices(ino, chunk_index, &bytes),
            None => Ok(Vec::new()),
        }
    }

    fn put_chunk(&mut self, ino: Ino, chunk_index: u64, slices: &[Slice]) {
        let key = keys::chunk(ino, chunk_index);
        if slices.is_empty() {
            self.delete(key);
        } else {
            self.put(key, encode_slices(slices));
        }
    }

    /// Removes chunks `first..` of a file and queues their slices.
    async fn drop_chunks_from(&mut self, ino: Ino, first: u64) -> Result<()> {
        let end = keys::prefix_end(&keys::chunk_prefix(ino));
        let doomed = self
            .scan(&keys::chunk(ino, first), &end, usize::MAX)
            .await?;
        for (key, bytes) in doomed {
            let ([_, chunk_index], _) = keys::parse::<2>(&key)?;
            self.delete(key);
            for slice in decode_slices(ino, chunk_index, &bytes)? {
                self.queue_deleted(slice.slice_id, slice.len, &slice.gateway_id)
                    .await?;
            }
        }
        Ok(())
    }

    async fn queue_deleted(
        &mut self,
        slice_id: u64,
        len: u32,
        gateway_id: &GatewayId,
    ) -> Result<()> {
        if slice_id == Slice::HOLE_ID || self.get(&keys::queued(slice_id)).await?.is_some() {
            return Ok(());
        }
        let delay =
            i64::try_from(self.meta.config.deleted_data_delay.as_nanos()).unwrap_or(i64::MAX);
        let due = self.now.saturating_add(delay);
        self.put(
            keys::queue(gateway_id, due, slice_id),
            encode_slice_data(len, gateway_id),
        );
        let mut queued = encode_slice_data(0, gateway_id);
        queued.extend_from_slice(&due.to_le_bytes());
        self.put(keys::queued(slice_id), queued);
        Ok(())
    }

    async fn check_capacity(&mut self, growth: u64) -> Result<()> {
        if let Some(capacity) = self.meta.config.capacity_bytes {
            let used = self.usage(USED_BYTES).await?;
            if used.saturating_add(growth) > capacity {
                return Err(MetaError::NoSpace(format!(
                    "{used} of {capacity} bytes used, {growth} more requested"
                )));
            }
        }
        Ok(())
    }

    /// Sets a regular file's size. Shrinking drops the slices wholly past the new end and hides
    /// the rest of the cut chunk behind a hole slice, so bytes re-exposed by growing the file
    /// later read as zeros.
    async fn resize_file(&mut self, inode: &mut Inode, new_size: u64) -> Result<()> {
        let ino = inode.attr.ino;
        let old_size = inode.attr.size;
        if new_size > MAX_FILE_SIZE {
            return Err(MetaError::FileTooLarge(new_size));
        }
        if new_size > old_size {
            self.check_capacity(new_size - old_size).await?;
        } else if new_size < old_size {
            self.drop_chunks_from(ino, new_size.div_ceil(CHUNK_SIZE))
                .await?;
            let cut = new_size % CHUNK_SIZE;
            if cut != 0 {
                let chunk_index = new_size / CHUNK_SIZE;
                let (past_cut, mut kept): (Vec<Slice>, Vec<Slice>) = self
                    .chunk(ino, chunk_index)
                    .await?
                    .into_iter()
                    .partition(|s| u64::from(s.offset_in_chunk) >= cut);
                // Holes own no data, so older holes are simply clipped at the cut.
                for hole in kept.iter_mut().filter(|s| s.slice_id == Slice::HOLE_ID) {
                    hole.len = hole.len.min((cut - u64::from(hole.offset_in_chunk)) as u32);
                }
                let data_end = kept.iter().map(Slice::end_in_chunk).max().unwrap_or(0);
                if data_end > cut {
                    kept.push(Slice {
                        slice_id: Slice::HOLE_ID,
                        offset_in_chunk: cut as u32,
                        len: (data_end - cut) as u32,
                        gateway_id: [0; 16],
                    });
                }
                let (kept, shadowed) = drop_shadowed(kept);
                for slice in past_cut.iter().chain(&shadowed) {
                    self.queue_deleted(slice.slice_id, slice.len, &slice.gateway_id)
                        .await?;
                }
                self.put_chunk(ino, chunk_index, &kept);
            }
        }
        self.add_usage(&inode.owner, 0, new_size as i64 - old_size as i64)
            .await?;
        if let Some(home) = home_of(inode) {
            self.add_dir_stats(home, [0, 0, new_size as i64 - old_size as i64])
                .await?;
        }
        inode.attr.size = new_size;
        Ok(())
    }

    // --- sessions ---

    /// What the change `tag` names recorded, if it is done: `Some(ino)` (0 for none).
    async fn change_done(&mut self, tag: &crate::once::RequestTag) -> Result<Option<u64>> {
        let Some(record) = self.get(&keys::change_slot(tag.session, tag.slot)).await? else {
            return Ok(None);
        };
        let (seq, ino, _) = keys::decode_pair("change slot", &record)?;
        match seq.cmp(&tag.seq) {
            std::cmp::Ordering::Equal => Ok(Some(ino)),
            std::cmp::Ordering::Less => Ok(None),
            // A client reuses a slot only once its change was answered.
            std::cmp::Ordering::Greater => Err(MetaError::Invalid(format!(
                "change {} of slot {} is older than the slot's last one ({seq})",
                tag.seq, tag.slot
            ))),
        }
    }

    /// What a change already done recorded, answered again (`runs`: how often its transaction
    /// ran so far); `None` when it still has to be made. Only a retry, or a transaction run
    /// again, looks: a conflicted run may have been committed after all (a lost answer from the
    /// database).
    #[doc(hidden)]
    pub async fn replayed<T: crate::once::Replayable>(
        &mut self,
        tag: &crate::once::RequestTag,
        runs: u32,
    ) -> Result<Option<T>> {
        if !tag.retry && runs <= 1 {
            return Ok(None);
        }
        let Some(recorded) = self.change_done(tag).await? else {
            return Ok(None);
        };
        let attr = match recorded {
            0 => None,
            ino => Some(self.inode(ino).await?.attr),
        };
        T::replayed(attr).map(Some)
    }

    #[doc(hidden)]
    pub fn record_change(&mut self, tag: &crate::once::RequestTag, ino: u64) {
        self.put(
            keys::change_slot(tag.session, tag.slot),
            keys::encode_pair(tag.seq, ino, &[]),
        );
    }

    /// The record of `session`, which must be open (not gone, not closing), read as this
    /// transaction relies on it (pinned in a snapshot transaction, see [`TxKind::Explicit`]).
    async fn session_record(&mut self, session: SessionId) -> Result<Vec<u8>> {
        let key = keys::session(session);
        self.fetch(Some(key.clone()), Vec::new()).await?;
        match self.get(&key).await? {
            Some(record) if !session_closing(&record)? => Ok(record),
            _ => Err(MetaError::SessionGone(session)),
        }
    }

    /// The tenant that opened `session`, which must be open.
    async fn session_tenant(&mut self, session: SessionId) -> Result<String> {
        let record = self.session_record(session).await?;
        Ok(decode_session(session, &record, MountView::default())?.tenant)
    }

    async fn check_session(&mut self, session: SessionId) -> Result<()> {
        self.session_record(session).await.map(drop)
    }

    /// `session`, which must be open, is alive now: its heartbeat.
    async fn beat(&mut self, session: SessionId) -> Result<()> {
        let record = self.session_record(session).await?;
        let (_, tenant_len, tail) = keys::decode_pair("session", &record)?;
        let beat = keys::encode_pair(self.now as u64, tenant_len, tail);
        self.put(keys::session(session), beat);
        Ok(())
    }

    /// Drops the lock records of `session`: of lock owner `owner` on `ino`, of every owner on
    /// `ino`, or (no `ino`) every one it holds.
    async fn drop_locks(
        &mut self,
        session: SessionId,
        ino: Option<Ino>,
        owner: Option<u64>,
    ) -> Result<()> {
        if let (Some(ino), Some(owner)) = (ino, owner) {
            self.delete(keys::lock(ino, session, owner));
            self.delete(keys::session_lock(session, ino, owner));
            return Ok(());
        }
        for (key, _) in self
            .scan_prefix(&keys::session_lock_prefix(session, ino))
            .await?
        {
            let ([_, _, ino, owner], _) = keys::parse::<4>(&key)?;
            self.delete(keys::lock(ino, session, owner));
            self.delete(key);
        }
        Ok(())
    }

    /// Takes `slice_id` out of the lease of `session` that holds it: only the session the id was
    /// handed to may stage it, and only once (after its commit the id is in no lease and no
    /// pending record, so it cannot be recorded again and then dropped as orphaned).
    async fn take_leased(&mut self, session: SessionId, slice_id: u64) -> Result<()> {
        let (key, first, lease_end) = self.lease_of(session, slice_id).await?;
        self.delete(key);
        if first < slice_id {
            self.put(keys::lease(session, slice_id), keys::encode_u64(first));
        }
        if slice_id + 1 < lease_end {
            self.put(
                keys::lease(session, lease_end),
                keys::encode_u64(slice_id + 1),
            );
        }
        Ok(())
    }

    /// The lease of `session` that holds slice id `slice_id`: its key, first id and end.
    /// [`MetaError::NotPermitted`] when no lease of the session holds it.
    async fn lease_of(&mut self, session: SessionId, slice_id: u64) -> Result<(Vec<u8>, u64, u64)> {
        let not_leased = || {
            MetaError::NotPermitted(format!(
                "slice id {slice_id} was not handed to this session, or was staged already"
            ))
        };
        // Leases are keyed by their end: the first above the id is the only one that may hold it.
        let start = keys::lease(session, slice_id.checked_add(1).ok_or_else(not_leased)?);
        let end = keys::prefix_end(&keys::lease_prefix(session));
        let Some((key, value)) = self.scan(&start, &end, 1).await?.pop() else {
            return Err(not_leased());
        };
        let ([_, _, lease_end], _) = keys::parse::<3>(&key)?;
        let first = keys::decode_u64("slice-id lease", &value)?;
        if slice_id < first {
            return Err(not_leased());
        }
        Ok((key, first, lease_end))
    }

    /// The inode `ino`, which must be a regular file (data goes nowhere else).
    async fn regular_file(&mut self, ino: Ino) -> Result<Inode> {
        let inode = self.inode(ino).await?;
        match inode.attr.kind {
            FileKind::File => Ok(inode),
            FileKind::Dir => Err(MetaError::IsADirectory(ino)),
            _ => Err(MetaError::Invalid(format!(
                "inode {ino} is not a regular file"
            ))),
        }
    }

    /// [`MetaEngine::within`].
    async fn within(&mut self, root: Ino, ino: Ino, tenant: &str) -> Result<bool> {
        if ino == root {
            return Ok(true);
        }
        let inode = self.inode(ino).await?;
        if inode.attr.kind != FileKind::Dir && inode.attr.nlink == 0 {
            // Unlinked while open: the sessions that hold it, read from its own holder records
            // (handles opened by a release before those were kept do not count).
            for (key, _) in self.scan_prefix(&keys::holders_prefix(ino)).await? {
                let ([_, high, low], _) = keys::parse::<3>(&key)?;
                let session = keys::session_from_parts(high, low);
                if matches!(self.session_tenant(session).await, Ok(owner) if owner == tenant) {
                    return Ok(true);
                }
            }
            return Ok(false);
        }
        let mut dirs = vec![inode.parent];
        if inode.attr.kind != FileKind::Dir && inode.attr.nlink >= 2 {
            dirs.extend(self.name_dirs(ino).await?.into_iter().map(|(_, dir)| dir));
        }
        for dir in dirs {
            if self.dir_within(root, dir).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether directory `dir` is `root` or below it, walking up its parents, at most
    /// [`MAX_WITHIN_DEPTH`] of them: a client must not make one call cost unbounded reads.
    async fn dir_within(&mut self, root: Ino, mut dir: Ino) -> Result<bool> {
        let start = dir;
        for _ in 0..MAX_WITHIN_DEPTH {
            if dir == root {
                return Ok(true);
            }
            if dir == ROOT_INO || dir == 0 {
                return Ok(false);
            }
            dir = self.dir(dir).await?.parent;
        }
        Err(MetaError::NotPermitted(format!(
            "directory {start} is more than {MAX_WITHIN_DEPTH} levels below the tenant's root, or \
             outside it that deep: too deep to check"
        )))
    }

    async fn handles(&mut self, session: SessionId, ino: Ino) -> Result<u64> {
        match self.get(&keys::handle(session, ino)).await? {
            Some(bytes) => keys::decode_u64("open handles", &bytes),
            None => Ok(0),
        }
    }

    /// Drops `count` handles of `session` on `ino`; the last one of an unlinked file removes it.
    async fn release_handles(&mut self, session: SessionId, ino: Ino, count: u64) -> Result<()> {
        let held = self.handles(session, ino).await?;
        let count = count.min(held);
        if count == 0 {
            return Ok(());
        }
        let key = keys::handle(session, ino);
        if held == count {
            self.delete(key);
            self.delete(keys::holder(ino, session));
        } else {
            self.put(key, keys::encode_u64(held - count));
        }
        self.drop_open_handles(ino, count).await
    }

    /// Takes `count` handles off inode `ino`'s count; the last one of an unlinked file removes it.
    async fn drop_open_handles(&mut self, ino: Ino, count: u64) -> Result<()> {
        // A directory may have been removed while open; its handles just go.
        if self.get(&keys::inode(ino)).await?.is_none() {
            return Ok(());
        }
        let inode = self
            .update_inode(ino, |i| {
                i.open_handles = i.open_handles.saturating_sub(count)
            })
            .await?;
        if inode.open_handles == 0 && inode.attr.nlink == 0 {
            self.purge(ino).await?;
        }
        Ok(())
    }

    // --- rename ---

    async fn rename(
        &mut self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        mode: RenameMode,
    ) -> Result<Renamed> {
        check_name(name)?;
        check_name(new_name)?;
        self.dir(parent).await?;
        self.dir(new_parent).await?;
        let (src_ino, _) = self
            .entry(parent, name)
            .await?
            .ok_or_else(|| no_entry(parent, name))?;
        let src = self.inode(src_ino).await?;
        let target = self.entry(new_parent, new_name).await?;
        match (mode, target) {
            (RenameMode::NoReplace, Some(_)) => {
                return Err(MetaError::AlreadyExists {
                    parent: new_parent,
                    name: String::from_utf8_lossy(new_name).into_owned(),
                })
            }
            (RenameMode::Exchange, None) => return Err(no_entry(new_parent, new_name)),
            _ => {}
        }
        // Two names of one inode (or the same name twice): POSIX says rename does nothing.
        if target.is_some_and(|(ino, _)| ino == src_ino) {
            return Ok(Renamed::default());
        }
        let src_is_dir = src.attr.kind == FileKind::Dir;
        if src_is_dir && parent != new_parent && self.is_ancestor(src_ino, new_parent).await? {
            return Err(MetaError::MoveIntoOwnSubtree(src_ino));
        }
        let now = self.now;
        if mode == RenameMode::Exchange {
            let (dst_ino, _) = target.expect("checked above");
            let dst_is_dir = self.inode(dst_ino).await?.attr.kind == FileKind::Dir;
            if dst_is_dir && parent != new_parent && self.is_ancestor(dst_ino, parent).await? {
                return Err(MetaError::MoveIntoOwnSubtree(dst_ino));
            }
            self.remove_entry(parent, name).await?;
            self.remove_entry(new_parent, new_name).await?;
            self.add_entry(parent, name, dst_ino).await?;
            self.add_entry(new_parent, new_name, src_ino).await?;
            let mut moved_attr = src.attr;
            for (ino, from, to) in [(src_ino, parent, new_parent), (dst_ino, new_parent, parent)] {
                let mut inode = self.inode(ino).await?;
                self.move_name(&mut inode, from, to).await?;
                inode.attr.ctime_ns = now;
                self.put_inode(&inode);
                if ino == src_ino {
                    moved_attr = inode.attr;
                }
            }
            let moved_subdirs = i32::from(src_is_dir) - i32::from(dst_is_dir);
            if parent == new_parent {
                self.touch_dir(parent, 0).await?;
            } else {
                self.touch_dir(parent, -moved_subdirs).await?;
                self.touch_dir(new_parent, moved_subdirs).await?;
            }
            return Ok(Renamed {
                moved: src_ino,
                other: Some(dst_ino),
                attr: Some(moved_attr),
            });
        }
        let mut replaced_dir = false;
        if let Some((dst_ino, _)) = target {
            let dst = self.inode(dst_ino).await?;
            let dst_is_dir = dst.attr.kind == FileKind::Dir;
            match (src_is_dir, dst_is_dir) {
                (true, false) => return Err(MetaError::NotADirectory(dst_ino)),
                (false, true) => return Err(MetaError::IsADirectory(dst_ino)),
                (true, true) if !self.dir_is_empty(dst_ino).await? => {
                    return Err(MetaError::DirectoryNotEmpty(dst_ino))
                }
                _ => {}
            }
            self.remove_entry(new_parent, new_name).await?;
            if dst_is_dir {
                self.purge(dst_ino).await?;
                replaced_dir = true;
            } else {
                self.drop_link(new_parent, dst_ino).await?;
            }
        }
        self.remove_entry(parent, name).await?;
        self.add_entry(new_parent, new_name, src_ino).await?;
        let mut src = self.inode(src_ino).await?;
        self.move_name(&mut src, parent, new_parent).await?;
        src.attr.ctime_ns = now;
        self.put_inode(&src);
        let moved_subdirs = i32::from(src_is_dir);
        if parent == new_parent {
            self.touch_dir(parent, -i32::from(replaced_dir)).await?;
        } else {
            self.touch_dir(parent, -moved_subdirs).await?;
            self.touch_dir(new_parent, moved_subdirs - i32::from(replaced_dir))
                .await?;
        }
        Ok(Renamed {
            moved: src_ino,
            other: target.map(|(ino, _)| ino),
            attr: Some(src.attr),
        })
    }

    async fn sessions(&mut self) -> Result<Vec<SessionInfo>> {
        let mut views = HashMap::new();
        for (key, value) in self.scan_prefix(keys::MOUNT_VIEW_PREFIX).await? {
            let ([high, low], _) = keys::parse::<2>(&key)?;
            let session = keys::session_from_parts(high, low);
            views.insert(session, decode_mount_view(session, &value)?);
        }
        let mut out = Vec::new();
        for (key, value) in self.scan_prefix(keys::SESSION_PREFIX).await? {
            let ([high, low], _) = keys::parse::<2>(&key)?;
            let id = keys::session_from_parts(high, low);
            let view = views.remove(&id).unwrap_or_default();
            out.push(decode_session(id, &value, view)?);
        }
        Ok(out)
    }
}

/// A mount's view: how many gateways it uses (u16), their ids, then the ids it avoids.
fn encode_mount_view(view: &MountView) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + 16 * (view.using.len() + view.avoiding.len()));
    out.extend_from_slice(&(view.using.len() as u16).to_be_bytes());
    for id in view.using.iter().chain(&view.avoiding) {
        out.extend_from_slice(id);
    }
    out
}

fn decode_mount_view(session: SessionId, record: &[u8]) -> Result<MountView> {
    let corrupt = || MetaError::Corrupt(format!("gateway view of session {session:032x}"));
    let (count, ids) = record.split_first_chunk::<2>().ok_or_else(corrupt)?;
    let using = usize::from(u16::from_be_bytes(*count));
    if ids.len() % 16 != 0 || ids.len() / 16 < using {
        return Err(corrupt());
    }
    let mut all = ids
        .chunks_exact(16)
        .map(|id| GatewayId::try_from(id).map_err(|_| corrupt()))
        .collect::<Result<Vec<_>>>()?;
    let avoiding = all.split_off(using);
    Ok(MountView {
        using: all,
        avoiding,
    })
}

/// A session record: last heartbeat, the length of the tenant's name, then the name and the
/// description.
fn encode_session(heartbeat: TimeNs, tenant: &str, description: &str) -> Vec<u8> {
    let tail = [tenant.as_bytes(), description.as_bytes()].concat();
    keys::encode_pair(heartbeat as u64, tenant.len() as u64, &tail)
}

/// Set in a session record's tenant-length field once the session is closing
/// ([`MetaEngine::close_session`]): from then on no change may use it.
const SESSION_CLOSING: u64 = 1 << 63;

fn session_closing(record: &[u8]) -> Result<bool> {
    let (_, tenant_len, _) = keys::decode_pair("session", record)?;
    Ok(tenant_len & SESSION_CLOSING != 0)
}

fn decode_session(id: SessionId, record: &[u8], view: MountView) -> Result<SessionInfo> {
    let (heartbeat, tenant_len, tail) = keys::decode_pair("session", record)?;
    let tenant_len = tenant_len & !SESSION_CLOSING;
    let split = usize::try_from(tenant_len)
        .ok()
        .filter(|&len| len <= tail.len())
        .ok_or_else(|| {
            MetaError::Corrupt(format!("session {id:032x}: tenant name past the end"))
        })?;
    let (tenant, description) = tail.split_at(split);
    Ok(SessionInfo {
        id,
        tenant: String::from_utf8_lossy(tenant).into_owned(),
        last_heartbeat_ns: heartbeat as i64,
        description: String::from_utf8_lossy(description).into_owned(),
        view,
    })
}

fn no_entry(parent: Ino, name: &[u8]) -> MetaError {
    MetaError::NoSuchEntry {
        parent,
        name: String::from_utf8_lossy(name).into_owned(),
    }
}

fn check_xattr_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > MAX_XATTR_NAME_LEN {
        return Err(MetaError::BadXattrName {
            len: name.len(),
            max: MAX_XATTR_NAME_LEN,
        });
    }
    // The kernel passes names as C strings: one with a NUL could never be named again.
    if name.contains(&0) {
        return Err(MetaError::Invalid(
            "extended attribute name contains NUL".into(),
        ));
    }
    Ok(())
}

/// What a node counts for in its home directory's statistics: files (every non-directory),
/// directories, bytes (of regular files).
fn counted(attr: &Attr) -> [i64; 3] {
    match attr.kind {
        FileKind::Dir => [0, 1, 0],
        FileKind::File => [1, 0, attr.size as i64],
        _ => [1, 0, 0],
    }
}

/// The directory whose statistics count `inode`: a directory's parent (none for the root), the
/// directory of the name another node is counted under (none once that name is gone).
fn home_of(inode: &Inode) -> Option<Ino> {
    (inode.parent != 0 && inode.parent != inode.attr.ino).then_some(inode.parent)
}

fn decode_file_system_id(bytes: &[u8]) -> Result<[u8; 16]> {
    bytes
        .try_into()
        .map_err(|_| MetaError::Corrupt(format!("file-system id of {} bytes, not 16", bytes.len())))
}

/// A counter record: `N` little-endian u64s (one is what `keys::encode_u64` writes).
fn encode_counters(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn decode_counters<const N: usize>(what: &str, bytes: &[u8]) -> Result<[u64; N]> {
    if bytes.len() != 8 * N {
        return Err(MetaError::Corrupt(format!(
            "{what}: {} bytes, expected {}",
            bytes.len(),
            8 * N
        )));
    }
    let mut out = [0u64; N];
    for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        *value = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    }
    Ok(out)
}

/// Adds `values` to `total`, wrapping as the shards of a counter may.
fn add_wrapping<const N: usize>(total: &mut [u64; N], values: [u64; N]) {
    for (t, v) in total.iter_mut().zip(values) {
        *t = t.wrapping_add(v);
    }
}

/// Splits slices in commit order into those still showing at least one byte and those that later
/// slices cover completely. Partly covered slices stay whole: their blocks are still needed.
pub fn drop_shadowed(slices: Vec<Slice>) -> (Vec<Slice>, Vec<Slice>) {
    // Covered ranges of the chunk, disjoint, sorted and merged (touching ranges merge too, so
    // coverage by several neighbours counts).
    let mut covered: Vec<(u64, u64)> = Vec::new();
    let mut kept = Vec::with_capacity(slices.len());
    let mut dropped = Vec::new();
    for slice in slices.into_iter().rev() {
        let (start, end) = (u64::from(slice.offset_in_chunk), slice.end_in_chunk());
        if covered.iter().any(|&(s, e)| s <= start && end <= e) {
            dropped.push(slice);
            continue;
        }
        kept.push(slice);
        let (mut merged_start, mut merged_end) = (start, end);
        covered.retain(|&(s, e)| {
            let touches = s <= merged_end && merged_start <= e;
            if touches {
                merged_start = merged_start.min(s);
                merged_end = merged_end.max(e);
            }
            !touches
        });
        let at = covered.partition_point(|&(s, _)| s < merged_start);
        covered.insert(at, (merged_start, merged_end));
    }
    kept.reverse();
    (kept, dropped)
}

#[async_trait]
impl MetaEngine for KvMeta {
    async fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        let mut tx = self.read_tx().await?;
        let dir = tx.dir(parent).await?;
        match name {
            b"." => return Ok(dir.attr),
            b".." => return Ok(tx.inode(dir.parent).await?.attr),
            _ => check_name(name)?,
        }
        let (ino, _) = tx
            .entry(parent, name)
            .await?
            .ok_or_else(|| no_entry(parent, name))?;
        Ok(tx.inode(ino).await?.attr)
    }

    async fn getattr(&self, ino: Ino) -> Result<Attr> {
        Ok(self.read_tx().await?.inode(ino).await?.attr)
    }

    async fn setattr(&self, ino: Ino, changes: &SetAttr) -> Result<Attr> {
        crate::transact!(self, self.namespace_durability(), |tx| {
            let mut inode = tx.inode(ino).await?;
            if let Some(size) = changes.size {
                match inode.attr.kind {
                    FileKind::File => {}
                    FileKind::Dir => return Err(MetaError::IsADirectory(ino)),
                    _ => {
                        return Err(MetaError::Invalid(format!(
                            "inode {ino} is not a regular file"
                        )))
                    }
                }
                if size != inode.attr.size {
                    tx.resize_file(&mut inode, size).await?;
                    inode.attr.mtime_ns = tx.now;
                }
            }
            changes.apply_to(&mut inode.attr);
            inode.attr.ctime_ns = tx.now;
            tx.put_inode(&inode);
            Ok(inode.attr)
        })
    }

    async fn create(
        &self,
        session: SessionId,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
    ) -> Result<Attr> {
        if node.kind != FileKind::File {
            return Err(MetaError::Invalid("create makes regular files only".into()));
        }
        let alone = async {
            crate::transact_once!(@explicit, self, self.namespace_durability(), |tx| tx
                .create_file(session, parent, name, node)
                .await)
        };
        self.make_shared(Some(session), parent, name, node, alone)
            .await
    }

    async fn mknod(&self, parent: Ino, name: &[u8], node: &NewNode) -> Result<Attr> {
        if matches!(node.kind, FileKind::Dir | FileKind::Symlink) {
            return Err(MetaError::Invalid(
                "mknod does not make directories or symlinks".into(),
            ));
        }
        self.make_node(parent, name, node).await
    }

    async fn mkdir(&self, parent: Ino, name: &[u8], mode: u32, uid: u32, gid: u32) -> Result<Attr> {
        let node = NewNode {
            kind: FileKind::Dir,
            mode,
            uid,
            gid,
            rdev: 0,
        };
        self.make_node(parent, name, &node).await
    }

    async fn symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        if target.is_empty() {
            return Err(MetaError::NoSuchEntry {
                parent,
                name: "(empty symlink target)".into(),
            });
        }
        if target.len() > MAX_SYMLINK_LEN || target.contains(&0) {
            return Err(MetaError::NameTooLong {
                len: target.len(),
                max: MAX_SYMLINK_LEN,
            });
        }
        let node = NewNode {
            kind: FileKind::Symlink,
            mode: 0o777,
            uid,
            gid,
            rdev: 0,
        };
        crate::transact_once!(@explicit, self, self.namespace_durability(), |tx| tx
            .create_node(parent, name, &node, Some(target), "")
            .await)
    }

    async fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let mut tx = self.read_tx().await?;
        let inode = tx.inode(ino).await?;
        if inode.attr.kind != FileKind::Symlink {
            return Err(MetaError::Invalid(format!("inode {ino} is not a symlink")));
        }
        match tx.get(&keys::symlink(ino)).await? {
            Some(target) => Ok(target),
            None => Err(MetaError::Corrupt(format!("symlink {ino} has no target"))),
        }
    }

    async fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        check_name(name)?;
        crate::transact_once!(self, self.namespace_durability(), |tx| {
            tx.dir(parent).await?;
            let (ino, _) = tx
                .entry(parent, name)
                .await?
                .ok_or_else(|| no_entry(parent, name))?;
            if tx.inode(ino).await?.attr.kind == FileKind::Dir {
                return Err(MetaError::IsADirectory(ino));
            }
            tx.remove_entry(parent, name).await?;
            tx.touch_dir(parent, 0).await?;
            tx.drop_link(parent, ino).await
        })
    }

    async fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        check_name(name)?;
        crate::transact_once!(self, self.namespace_durability(), |tx| {
            tx.dir(parent).await?;
            let (ino, _) = tx
                .entry(parent, name)
                .await?
                .ok_or_else(|| no_entry(parent, name))?;
            tx.dir(ino).await?;
            if !tx.dir_is_empty(ino).await? {
                return Err(MetaError::DirectoryNotEmpty(ino));
            }
            tx.remove_entry(parent, name).await?;
            tx.touch_dir(parent, -1).await?;
            tx.purge(ino).await
        })
    }

    async fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        mode: RenameMode,
    ) -> Result<Renamed> {
        crate::transact_once!(self, self.namespace_durability(), |tx| tx
            .rename(parent, name, new_parent, new_name, mode)
            .await)
    }

    async fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Result<Attr> {
        crate::transact_once!(self, self.namespace_durability(), |tx| {
            let inode = tx.inode(ino).await?;
            if inode.attr.kind == FileKind::Dir {
                return Err(MetaError::NotPermitted(format!(
                    "hard link to directory {ino}"
                )));
            }
            if inode.attr.nlink == 0 {
                // Linux refuses to give an unlinked file a new name (except O_TMPFILE).
                return Err(MetaError::NoSuchInode(ino));
            }
            if inode.attr.nlink >= MAX_LINKS {
                return Err(MetaError::TooManyLinks(ino));
            }
            tx.check_new_name(new_parent, new_name).await?;
            tx.add_entry(new_parent, new_name, ino).await?;
            tx.touch_dir(new_parent, 0).await?;
            // From its second name on, the directories of its names are indexed.
            if inode.attr.nlink == 1 && inode.parent != 0 {
                tx.add_names(ino, inode.parent, 1).await?;
            }
            tx.add_names(ino, new_parent, 1).await?;
            let now = tx.now;
            let mut adopted = false;
            let inode = tx
                .update_inode(ino, |i| {
                    i.attr.nlink += 1;
                    i.attr.ctime_ns = now;
                    // Counted nowhere since the name it was counted under went: counted here.
                    if i.parent == 0 {
                        i.parent = new_parent;
                        adopted = true;
                    }
                })
                .await?;
            if adopted {
                tx.add_dir_stats(new_parent, counted(&inode.attr)).await?;
            }
            Ok(inode.attr)
        })
    }

    async fn readdir(&self, ino: Ino, after_cookie: u64, limit: usize) -> Result<Vec<DirEntry>> {
        let mut tx = self.read_tx().await?;
        tx.dir(ino).await?;
        if after_cookie == u64::MAX {
            return Ok(Vec::new());
        }
        let end = keys::prefix_end(&keys::listing_prefix(ino));
        let page = tx
            .scan(&keys::listing(ino, after_cookie + 1), &end, limit)
            .await?;
        let mut entries = Vec::with_capacity(page.len());
        for (key, value) in page {
            let ([_, cookie], _) = keys::parse::<2>(&key)?;
            let (child, _, name) = keys::decode_pair("listing", &value)?;
            let inode = tx.inode(child).await?;
            entries.push(DirEntry {
                name: name.to_vec(),
                cookie,
                attr: inode.attr,
                has_xattrs: inode.has_xattrs,
            });
        }
        Ok(entries)
    }

    async fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        check_xattr_name(name)?;
        let mut tx = self.read_tx().await?;
        tx.inode(ino).await?;
        match tx.get(&keys::xattr(ino, name)).await? {
            Some(value) => Ok(value),
            None => Err(MetaError::NoSuchXattr {
                ino,
                name: String::from_utf8_lossy(name).into_owned(),
            }),
        }
    }

    async fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], mode: XattrMode) -> Result<()> {
        check_xattr_name(name)?;
        if value.len() > MAX_XATTR_VALUE_LEN {
            return Err(MetaError::XattrValueTooLarge {
                len: value.len(),
                max: MAX_XATTR_VALUE_LEN,
            });
        }
        crate::transact_once!(self, self.namespace_durability(), |tx| {
            tx.inode(ino).await?;
            let key = keys::xattr(ino, name);
            let exists = tx.get(&key).await?.is_some();
            let name_text = || String::from_utf8_lossy(name).into_owned();
            match (mode, exists) {
                (XattrMode::Create, true) => {
                    return Err(MetaError::XattrExists {
                        ino,
                        name: name_text(),
                    })
                }
                (XattrMode::Replace, false) => {
                    return Err(MetaError::NoSuchXattr {
                        ino,
                        name: name_text(),
                    })
                }
                _ => {}
            }
            tx.put(key, value.to_vec());
            let now = tx.now;
            tx.update_inode(ino, |i| {
                i.attr.ctime_ns = now;
                i.has_xattrs = Some(true);
            })
            .await?;
            Ok(())
        })
    }

    async fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        let mut tx = self.read_tx().await?;
        tx.inode(ino).await?;
        let mut names = Vec::new();
        for (key, _) in tx.scan_prefix(&keys::xattr_prefix(ino)).await? {
            let (_, name) = keys::parse::<1>(&key)?;
            names.push(name.to_vec());
        }
        Ok(names)
    }

    async fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        check_xattr_name(name)?;
        crate::transact_once!(self, self.namespace_durability(), |tx| {
            tx.inode(ino).await?;
            let key = keys::xattr(ino, name);
            if tx.get(&key).await?.is_none() {
                return Err(MetaError::NoSuchXattr {
                    ino,
                    name: String::from_utf8_lossy(name).into_owned(),
                });
            }
            tx.delete(key);
            let left = !tx
                .scan(
                    &keys::xattr_prefix(ino),
                    &keys::prefix_end(&keys::xattr_prefix(ino)),
                    1,
                )
                .await?
                .is_empty();
            let now = tx.now;
            tx.update_inode(ino, |i| {
                i.attr.ctime_ns = now;
                i.has_xattrs = Some(left);
            })
            .await?;
            Ok(())
        })
    }

    async fn statfs(&self) -> Result<StatFs> {
        let mut tx = self.read_tx().await?;
        Ok(StatFs {
            files: tx.usage(FILES).await?,
            used_bytes: tx.usage(USED_BYTES).await?,
            capacity_bytes: self.config.capacity_bytes,
            max_files: self.config.max_files,
        })
    }

    async fn file_system_id(&self) -> Result<[u8; 16]> {
        let mut tx = self.read_tx().await?;
        if let Some(id) = tx.get(keys::FILE_SYSTEM_ID).await? {
            return decode_file_system_id(&id);
        }
        drop(tx);
        crate::transact!(self, self.durability(), |tx| {
            // Another gateway may have made it meanwhile: the first one made stays.
            if let Some(id) = tx.get(keys::FILE_SYSTEM_ID).await? {
                return decode_file_system_id(&id);
            }
            let id = *uuid::Uuid::new_v4().as_bytes();
            tx.put(keys::FILE_SYSTEM_ID.to_vec(), id.to_vec());
            Ok(id)
        })
    }

    async fn tenant_usage(&self) -> Result<Vec<TenantUsage>> {
        let mut tx = self.read_tx().await?;
        let mut totals: BTreeMap<String, [u64; 2]> = BTreeMap::new();
        for (key, value) in tx.scan_prefix(keys::TENANT_USAGE_PREFIX).await? {
            let total = totals.entry(keys::tenant_of_usage(&key)).or_default();
            add_wrapping(total, decode_counters("tenant usage", &value)?);
        }
        Ok(totals
            .into_iter()
            .filter(|(_, [files, _])| *files != 0)
            .map(|(tenant, [files, bytes])| TenantUsage {
                tenant,
                files,
                bytes,
            })
            .collect())
    }

    async fn log_position(&self) -> Result<Option<u64>> {
        Ok(self.store.log_position().await?)
    }

    fn is_replica(&self) -> bool {
        self.store.read_only()
    }

    async fn replica_lag(&self) -> Result<Option<Duration>> {
        Ok(self.store.replica_lag().await?)
    }

    async fn sync(&self) -> Result<()> {
        Ok(self.store.sync().await?)
    }

    async fn wait_position(&self, position: u64, limit: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        // Replay on a nearby standby takes milliseconds: look often, then less so.
        let mut pause = Duration::from_millis(1);
        loop {
            match self.store.log_position().await? {
                None => return Ok(()),
                Some(reached) if reached >= position => return Ok(()),
                Some(reached) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(MetaError::Backend(KvError::Unavailable(format!(
                            "the replica applied its primary's log to {} and not to {} within \
                             {limit:?}",
                            crate::pg_cluster::format_lsn(reached),
                            crate::pg_cluster::format_lsn(position)
                        ))));
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    async fn within(&self, root: Ino, ino: Ino, tenant: &str) -> Result<bool> {
        self.read_tx().await?.within(root, ino, tenant).await
    }

    async fn dir_usage(&self, ino: Ino) -> Result<DirUsage> {
        let mut tx = self.read_tx().await?;
        let inode = tx.inode(ino).await?;
        if inode.attr.kind != FileKind::Dir {
            let [files, _, bytes] = counted(&inode.attr);
            return Ok(DirUsage {
                files: files as u64,
                dirs: 0,
                bytes: bytes as u64,
            });
        }
        let mut total = [0u64; 3];
        let mut waiting = vec![ino];
        while let Some(dir) = waiting.pop() {
            add_wrapping(&mut total, tx.dir_stats(dir).await?);
            for (key, _) in tx.scan_prefix(&keys::subdir_prefix(dir)).await? {
                let ([_, child], _) = keys::parse::<2>(&key)?;
                waiting.push(child);
            }
        }
        Ok(DirUsage {
            files: total[0],
            dirs: total[1],
            bytes: total[2],
        })
    }

    async fn read_chunk(&self, ino: Ino, chunk_index: u64) -> Result<Vec<Slice>> {
        let mut tx = self.read_tx().await?;
        tx.inode(ino).await?;
        tx.chunk(ino, chunk_index).await
    }

    async fn commit_slice(
        &self,
        session: SessionId,
        ino: Ino,
        chunk_index: u64,
        slice: &Slice,
        new_size: u64,
        attrs: &CommitAttrs,
    ) -> Result<Attr> {
        self.commit(session, ino, chunk_index, slice, new_size, attrs, false)
            .await
    }

    async fn commit_written_slice(
        &self,
        session: SessionId,
        ino: Ino,
        chunk_index: u64,
        slice: &Slice,
        new_size: u64,
        attrs: &CommitAttrs,
    ) -> Result<Attr> {
        self.commit(session, ino, chunk_index, slice, new_size, attrs, true)
            .await
    }

    async fn swap_compacted(
        &self,
        session: SessionId,
        ino: Ino,
        chunk_index: u64,
        read: &[Slice],
        from: usize,
        merged: &Slice,
    ) -> Result<bool> {
        let run = read
            .get(from..)
            .filter(|run| !run.is_empty())
            .ok_or_else(|| {
                MetaError::Invalid(format!(
                    "compaction of slices {from}.. of a chunk of {} slices",
                    read.len()
                ))
            })?;
        let span = shared::layout::span(run);
        if merged.slice_id == Slice::HOLE_ID
            || u64::from(merged.offset_in_chunk) != span.start
            || merged.end_in_chunk() != span.end
            || span.end > CHUNK_SIZE
        {
            return Err(MetaError::Invalid(format!(
                "compacted slice {merged:?} must hold bytes {span:?} of the chunk, the span of \
                 the slices it replaces"
            )));
        }
        crate::transact!(self, self.durability(), |tx| {
            tx.check_session(session).await?;
            let pending_key = keys::pending(session, merged.slice_id);
            if tx.get(&pending_key).await?.is_none() {
                return Err(MetaError::SliceNotPending {
                    session,
                    slice_id: merged.slice_id,
                });
            }
            tx.delete(pending_key);
            // Not in the file any more, inode included, is an empty chunk here.
            let current = tx.chunk(ino, chunk_index).await?;
            // Only appends since the read keep the merged bytes true: a truncation or an
            // overwrite may have removed a slice, or clipped a hole, that the bytes depend on.
            if !current.starts_with(read) {
                tx.queue_deleted(merged.slice_id, merged.len, &merged.gateway_id)
                    .await?;
                return Ok(false);
            }
            let mut slices = Vec::with_capacity(current.len() - run.len() + 1);
            slices.extend_from_slice(&current[..from]);
            slices.push(*merged);
            slices.extend_from_slice(&current[read.len()..]);
            let (kept, shadowed) = drop_shadowed(slices);
            for s in run.iter().chain(&shadowed) {
                tx.queue_deleted(s.slice_id, s.len, &s.gateway_id).await?;
            }
            tx.put_chunk(ino, chunk_index, &kept);
            Ok(true)
        })
    }

    async fn allocate_slice_ids(&self, session: SessionId, count: u64) -> Result<Range<u64>> {
        if count == 0 || count > MAX_SLICE_IDS_AT_ONCE {
            return Err(MetaError::Invalid(format!(
                "{count} slice ids asked for: 1..={MAX_SLICE_IDS_AT_ONCE} at a time"
            )));
        }
        crate::transact!(self, self.durability(), |tx| {
            tx.check_session(session).await?;
            let first = tx.inner.take_ids(Sequence::Slice, count).await?;
            tx.put(keys::lease(session, first + count), keys::encode_u64(first));
            Ok(first..first + count)
        })
    }

    async fn record_pending_slice(&self, session: SessionId, slice: &Slice) -> Result<()> {
        self.record_pending(session, None, slice, self.durability())
            .await
    }

    async fn record_pending_slice_lazily(
        &self,
        session: SessionId,
        ino: Ino,
        slice: &Slice,
    ) -> Result<()> {
        self.record_pending(session, Some(ino), slice, Durability::Eventual)
            .await
    }

    async fn open_session(&self, tenant: &str, description: &str) -> Result<SessionId> {
        if description.len() > MAX_SESSION_DESCRIPTION {
            return Err(MetaError::Invalid(format!(
                "session description of {} bytes: at most {MAX_SESSION_DESCRIPTION}",
                description.len()
            )));
        }
        crate::transact!(self, self.durability(), |tx| {
            // 128 random bits from the thread's CSPRNG: unguessable, and a collision (checked
            // anyway) would take longer than the universe has.
            let id = loop {
                let id: SessionId = rand::random();
                if id != 0 && tx.get(&keys::session(id)).await?.is_none() {
                    break id;
                }
            };
            tx.put(
                keys::session(id),
                encode_session(tx.now, tenant, description),
            );
            Ok(id)
        })
    }

    async fn take_dir_lease(&self, session: SessionId, dir: Ino) -> Result<bool> {
        // Durable before the holder counts on it: a grant lost in a crash would let others add
        // names the holder answers as absent.
        crate::transact!(self, self.durability(), |tx| tx
            .take_dir_lease(session, dir)
            .await)
    }

    async fn keep_dir_leases(
        &self,
        session: SessionId,
        keep: &[Ino],
        release: &[Ino],
    ) -> Result<Vec<bool>> {
        let named = keep.len() + release.len();
        if named > crate::MAX_DIR_LEASES_PER_CALL {
            return Err(MetaError::Invalid(format!(
                "{named} directory leases in one call: at most {}",
                crate::MAX_DIR_LEASES_PER_CALL
            )));
        }
        // What it changes may be lost in a crash: a heartbeat, and leases given back (a
        // recall then waits them out).
        crate::transact!(self, Durability::Eventual, |tx| tx
            .keep_dir_leases(session, keep, release)
            .await)
    }

    async fn heartbeat(&self, session: SessionId, view: &MountView) -> Result<()> {
        let named = view.using.len() + view.avoiding.len();
        if named > MAX_VIEW_GATEWAYS {
            return Err(MetaError::Invalid(format!(
                "a view of {named} gateways: at most {MAX_VIEW_GATEWAYS}"
            )));
        }
        crate::transact!(self, self.durability(), |tx| {
            tx.beat(session).await?;
            if *view == MountView::default() {
                tx.delete(keys::mount_view(session));
            } else {
                tx.put(keys::mount_view(session), encode_mount_view(view));
            }
            Ok(())
        })
    }

    async fn close_session(&self, session: SessionId) -> Result<()> {
        // First the mark, in a transaction of its own: a snapshot change that uses the session
        // (a create, a slice commit) pins its record, so it either ends before the mark is
        // written (and what it left is found below) or fails on it (TxKind::Explicit).
        crate::transact!(self, Durability::Eventual, |tx| {
            let key = keys::session(session);
            let Some(record) = tx.get_locked(&key).await? else {
                return Err(MetaError::SessionGone(session));
            };
            let (heartbeat, tenant_len, tail) = keys::decode_pair("session", &record)?;
            if tenant_len & SESSION_CLOSING == 0 {
                tx.put(
                    key,
                    keys::encode_pair(heartbeat, tenant_len | SESSION_CLOSING, tail),
                );
            }
            Ok(())
        })?;
        crate::transact!(self, self.durability(), |tx| {
            if tx.get(&keys::session(session)).await?.is_none() {
                return Err(MetaError::SessionGone(session));
            }
            for (key, value) in tx.scan_prefix(&keys::handle_prefix(session)).await? {
                let ([_, _, ino], _) = keys::parse::<3>(&key)?;
                let count = keys::decode_u64("open handles", &value)?;
                tx.release_handles(session, ino, count).await?;
            }
            for (key, value) in tx.scan_prefix(&keys::pending_prefix(session)).await? {
                let ([_, _, slice_id], _) = keys::parse::<3>(&key)?;
                tx.delete(key);
                let (len, gateway_id) = decode_slice_data(slice_id, &value)?;
                tx.queue_deleted(slice_id, len, &gateway_id).await?;
            }
            // Ids handed out but never staged have no data: they just go.
            for (key, _) in tx.scan_prefix(&keys::lease_prefix(session)).await? {
                tx.delete(key);
            }
            tx.drop_locks(session, None, None).await?;
            tx.drop_session_dir_leases(session).await?;
            for (key, _) in tx.scan_prefix(&keys::change_slot_prefix(session)).await? {
                tx.delete(key);
            }
            tx.delete(keys::mount_view(session));
            tx.delete(keys::session(session));
            Ok(())
        })
    }

    async fn set_lock(&self, session: SessionId, ino: Ino, request: &LockRequest) -> Result<()> {
        locks::validate(request)?;
        crate::transact!(self, self.durability(), |tx| {
            tx.check_session(session).await?;
            tx.inode(ino).await?;
            let mine = keys::lock(ino, session, request.owner);
            let mut held = Vec::new();
            let owners = tx.scan_prefix(&keys::lock_prefix(ino)).await?;
            let new_owner = !owners.iter().any(|(key, _)| *key == mine);
            if new_owner && request.kind.is_some() && owners.len() >= locks::MAX_OWNERS_PER_INODE {
                return Err(MetaError::TooManyLocks {
                    ino,
                    max: locks::MAX_OWNERS_PER_INODE,
                });
            }
            for (key, value) in owners {
                let locks = locks::decode(&value)?;
                if key == mine {
                    held = locks;
                } else if let Some(kind) = request.kind {
                    if locks
                        .iter()
                        .any(|lock| lock.conflicts(request.start, request.end, kind))
                    {
                        return Err(MetaError::WouldBlock {
                            ino,
                            start: request.start,
                            end: request.end,
                        });
                    }
                }
            }
            let after = locks::apply(&held, request);
            if after.len() > locks::MAX_RANGES_PER_OWNER {
                return Err(MetaError::TooManyLocks {
                    ino,
                    max: locks::MAX_RANGES_PER_OWNER,
                });
            }
            let index = keys::session_lock(session, ino, request.owner);
            if after.is_empty() {
                tx.delete(mine);
                tx.delete(index);
            } else {
                tx.put(mine, locks::encode(&after));
                tx.put(index, Vec::new());
            }
            Ok(())
        })
    }

    async fn get_lock(
        &self,
        session: SessionId,
        ino: Ino,
        request: &LockRequest,
    ) -> Result<Option<HeldLock>> {
        locks::validate(request)?;
        let kind = request.kind.unwrap_or(LockKind::Write);
        let mine = keys::lock(ino, session, request.owner);
        let mut tx = self.read_tx().await?;
        for (key, value) in tx.scan_prefix(&keys::lock_prefix(ino)).await? {
            if key == mine {
                continue;
            }
            if let Some(lock) = locks::decode(&value)?
                .into_iter()
                .find(|lock| lock.conflicts(request.start, request.end, kind))
            {
                return Ok(Some(lock));
            }
        }
        Ok(None)
    }

    async fn release_locks(&self, session: SessionId, ino: Ino, owner: Option<u64>) -> Result<()> {
        crate::transact!(self, self.durability(), |tx| {
            tx.drop_locks(session, Some(ino), owner).await
        })
    }

    async fn slice_leased(&self, session: SessionId, slice_id: u64) -> Result<bool> {
        match self.read_tx().await?.lease_of(session, slice_id).await {
            Ok(_) => Ok(true),
            Err(MetaError::NotPermitted(_)) => Ok(false),
            Err(error) => Err(error),
        }
    }

    async fn check_slice_write(&self, session: SessionId, ino: Ino, slice: &Slice) -> Result<()> {
        check_slice_shape(slice)?;
        let mut tx = self.read_tx().await?;
        let pending_key = keys::pending(session, slice.slice_id);
        tx.fetch(
            Some(keys::session(session)),
            vec![pending_key.clone(), keys::inode(ino)],
        )
        .await?;
        tx.check_session(session).await?;
        tx.regular_file(ino).await?;
        if tx.get(&pending_key).await?.is_none() {
            tx.lease_of(session, slice.slice_id).await?;
        }
        Ok(())
    }

    async fn pending_slice(
        &self,
        session: SessionId,
        slice_id: u64,
    ) -> Result<Option<(u32, GatewayId)>> {
        match self
            .read_tx()
            .await?
            .get(&keys::pending(session, slice_id))
            .await?
        {
            Some(bytes) => Ok(Some(decode_slice_data(slice_id, &bytes)?)),
            None => Ok(None),
        }
    }

    async fn session(&self, session: SessionId) -> Result<SessionInfo> {
        let mut tx = self.read_tx().await?;
        let Some(record) = tx.get(&keys::session(session)).await? else {
            return Err(MetaError::SessionGone(session));
        };
        let view = match tx.get(&keys::mount_view(session)).await? {
            Some(view) => decode_mount_view(session, &view)?,
            None => MountView::default(),
        };
        decode_session(session, &record, view)
    }

    async fn list_sessions(&self) -> Result<Vec<SessionInfo>> {
        self.read_tx().await?.sessions().await
    }

    async fn expired_sessions(&self, heartbeat_before_ns: TimeNs) -> Result<Vec<SessionId>> {
        Ok(self
            .list_sessions()
            .await?
            .into_iter()
            .filter(|s| s.last_heartbeat_ns < heartbeat_before_ns)
            .map(|s| s.id)
            .collect())
    }

    async fn open(&self, session: SessionId, ino: Ino) -> Result<Attr> {
        // Durable as a create's handle is: lost in a crash (with the namespace changes after the
        // last durable commit), the handle no longer keeps an unlinked file's data.
        crate::transact_once!(self, self.namespace_durability(), |tx| {
            tx.check_session(session).await?;
            let inode = tx.update_inode(ino, |i| i.open_handles += 1).await?;
            let held = tx.handles(session, ino).await?;
            tx.put(keys::handle(session, ino), keys::encode_u64(held + 1));
            tx.put(keys::holder(ino, session), Vec::new());
            Ok(inode.attr)
        })
    }

    async fn release(&self, session: SessionId, inos: &[Ino]) -> Result<()> {
        // Handles given back per inode, in the order first listed (so the first not held is
        // the one named).
        let mut counts: Vec<(Ino, u64)> = Vec::with_capacity(inos.len());
        let mut index = std::collections::HashMap::with_capacity(inos.len());
        for &ino in inos {
            let at = *index.entry(ino).or_insert_with(|| {
                counts.push((ino, 0));
                counts.len() - 1
            });
            counts[at].1 += 1;
        }
        // Given back without waiting for durability: lost in a crash, the handle is given back
        // when its session expires after the restart, and an unlinked file is purged then.
        crate::transact_once!(self, Durability::Eventual, |tx| {
            // The session and every handle count and inode the release reads, in one round trip
            // where the backend can, instead of two per inode.
            let keys = counts
                .iter()
                .flat_map(|&(ino, _)| [keys::handle(session, ino), keys::inode(ino)])
                .collect();
            tx.fetch(Some(keys::session(session)), keys).await?;
            tx.check_session(session).await?;
            for &(ino, count) in &counts {
                if tx.handles(session, ino).await? < count {
                    return Err(MetaError::NotOpen { session, ino });
                }
            }
            for &(ino, count) in &counts {
                tx.release_handles(session, ino, count).await?;
            }
            Ok(())
        })
    }

    async fn take_due_deleted_slices(
        &self,
        gateway: Option<GatewayId>,
        now_ns: TimeNs,
        limit: usize,
    ) -> Result<Vec<DeletedSlice>> {
        let mut tx = self.read_tx().await?;
        let due = match gateway {
            Some(gateway) => {
                tx.scan(
                    &keys::queue_prefix(&gateway),
                    &keys::queue_due_end(&gateway, now_ns),
                    limit,
                )
                .await?
            }
            // Every gateway's queue, merged by due time (tools and tests).
            None => tx.scan_prefix(keys::QUEUE_PREFIX).await?,
        };
        let mut out = Vec::with_capacity(due.len());
        for (key, value) in due {
            let (due_ns, slice_id) = keys::parse_queue(&key)?;
            if due_ns > now_ns {
                continue;
            }
            let (len, gateway_id) = decode_slice_data(slice_id, &value)?;
            out.push(DeletedSlice {
                slice_id,
                len,
                gateway_id,
                due_ns,
            });
        }
        out.sort_by_key(|s| (s.due_ns, s.slice_id));
        out.truncate(limit);
        if !out.is_empty() {
            // The caller deletes their data next: the changes that queued them (an unlink may be
            // eventual) must not be lost in a crash after that.
            self.store.sync().await?;
        }
        Ok(out)
    }

    async fn ack_deleted_slices(&self, slice_ids: &[u64]) -> Result<()> {
        crate::transact!(self, self.durability(), |tx| {
            for &slice_id in slice_ids {
                let key = keys::queued(slice_id);
                if let Some(bytes) = tx.get(&key).await? {
                    let (due, gateway_id) = decode_queued(slice_id, &bytes)?;
                    tx.delete(key);
                    tx.delete(keys::queue(&gateway_id, due, slice_id));
                }
            }
            Ok(())
        })
    }

    async fn register_gateway(&self, id: GatewayId, address: &str, mirror: bool) -> Result<u64> {
        crate::transact!(self, Durability::Durable, |tx| {
            let key = keys::gateway(&id);
            let epoch = match tx.get(&key).await? {
                Some(bytes) => decode_gateway(id, &bytes)?.epoch + 1,
                None => 1,
            };
            let record = GatewayRecord {
                id,
                address: address.to_string(),
                epoch,
                last_heartbeat_ns: tx.now,
                staged_blocks: 0,
                staged_bytes: 0,
                queue_len: 0,
                oldest_waiting_ms: 0,
                healthy: true,
                mirror,
            };
            tx.put(key, encode_gateway(&record));
            Ok(epoch)
        })
    }

    async fn gateway_heartbeat(&self, id: GatewayId, epoch: u64, load: GatewayLoad) -> Result<()> {
        crate::transact!(self, Durability::Eventual, |tx| {
            let key = keys::gateway(&id);
            let Some(bytes) = tx.get(&key).await? else {
                return Err(MetaError::Invalid(format!(
                    "gateway {} is not registered",
                    uuid::Uuid::from_bytes(id)
                )));
            };
            let mut record = decode_gateway(id, &bytes)?;
            if record.epoch != epoch {
                return Err(MetaError::Fenced {
                    id: uuid::Uuid::from_bytes(id),
                    epoch,
                    current: record.epoch,
                });
            }
            record.last_heartbeat_ns = tx.now;
            record.staged_blocks = load.staged_blocks;
            record.staged_bytes = load.staged_bytes;
            record.queue_len = load.queue_len;
            record.oldest_waiting_ms = load.oldest_waiting_ms;
            record.healthy = load.healthy;
            record.mirror = load.mirror;
            tx.put(key, encode_gateway(&record));
            Ok(())
        })
    }

    async fn referenced_slice_ids(&self) -> Result<std::collections::BTreeSet<u64>> {
        // One snapshot, read in pages so a large file system is never one answer.
        let mut tx = self.read_tx().await?;
        let mut ids = std::collections::BTreeSet::new();
        for prefix in [b"c", b"p", b"Q"] {
            let end = keys::prefix_end(prefix);
            let mut start = prefix.to_vec();
            loop {
                let page = tx.scan(&start, &end, REFERENCE_SCAN_PAGE).await?;
                let Some((last, _)) = page.last() else {
                    break;
                };
                start = [last.as_slice(), &[0]].concat();
                let full = page.len() == REFERENCE_SCAN_PAGE;
                for (key, value) in page {
                    match prefix {
                        b"c" => {
                            let ([ino, chunk_index], _) = keys::parse::<2>(&key)?;
                            ids.extend(
                                decode_slices(ino, chunk_index, &value)?
                                    .iter()
                                    .map(|s| s.slice_id)
                                    .filter(|&id| id != Slice::HOLE_ID),
                            );
                        }
                        b"p" => {
                            ids.insert(keys::parse::<3>(&key)?.0[2]);
                        }
                        _ => {
                            ids.insert(keys::parse::<1>(&key)?.0[0]);
                        }
                    }
                }
                if !full {
                    break;
                }
            }
        }
        Ok(ids)
    }

    async fn list_gateways(&self) -> Result<Vec<GatewayRecord>> {
        let mut tx = self.read_tx().await?;
        let mut out = Vec::new();
        for (key, value) in tx.scan_prefix(keys::GATEWAY_PREFIX).await? {
            let id: GatewayId = key
                .get(1..)
                .and_then(|id| id.try_into().ok())
                .ok_or_else(|| MetaError::Corrupt(format!("gateway key {key:?}")))?;
            out.push(decode_gateway(id, &value)?);
        }
        Ok(out)
    }
}

/// A queued slice's index entry: its due time and the gateway whose queue holds it.
fn decode_queued(slice_id: u64, bytes: &[u8]) -> Result<(TimeNs, GatewayId)> {
    let corrupt = || MetaError::Corrupt(format!("queued slice {slice_id}: {} bytes", bytes.len()));
    if bytes.len() != 28 {
        return Err(corrupt());
    }
    let (_, gateway_id) = decode_slice_data(slice_id, &bytes[..20])?;
    let due = i64::from_le_bytes(bytes[20..].try_into().map_err(|_| corrupt())?);
    Ok((due, gateway_id))
}

/// Marks a gateway record that carries its upload queue and health before the address (a byte no
/// address holds; records written before it have the address right after the staged load).
const GATEWAY_RECORD_QUEUE: u8 = 0;

fn encode_gateway(record: &GatewayRecord) -> Vec<u8> {
    let mut out = keys::encode_pair(record.epoch, record.last_heartbeat_ns as u64, &[]);
    out.extend(keys::encode_pair(
        record.staged_blocks,
        record.staged_bytes,
        &[],
    ));
    out.push(GATEWAY_RECORD_QUEUE);
    out.extend(keys::encode_pair(
        record.queue_len,
        record.oldest_waiting_ms,
        // Bit 0: healthy; bit 1: a mirror region's (records from before read as not).
        &[u8::from(record.healthy) | u8::from(record.mirror) << 1],
    ));
    out.extend(record.address.as_bytes());
    out
}

fn decode_gateway(id: GatewayId, bytes: &[u8]) -> Result<GatewayRecord> {
    let (epoch, heartbeat, rest) = keys::decode_pair("gateway record", bytes)?;
    let (staged_blocks, staged_bytes, rest) = keys::decode_pair("gateway record", rest)?;
    let (queue_len, oldest_waiting_ms, healthy, address) = match rest.split_first() {
        Some((&GATEWAY_RECORD_QUEUE, rest)) => {
            let (queue, oldest, rest) = keys::decode_pair("gateway record", rest)?;
            let (healthy, address) = rest
                .split_first()
                .ok_or_else(|| MetaError::Corrupt("gateway record without health".into()))?;
            (queue, oldest, *healthy, address)
        }
        _ => (0, 0, 1, rest),
    };
    Ok(GatewayRecord {
        id,
        address: String::from_utf8_lossy(address).into_owned(),
        epoch,
        last_heartbeat_ns: heartbeat as i64,
        staged_blocks,
        staged_bytes,
        queue_len,
        oldest_waiting_ms,
        healthy: healthy & 1 != 0,
        mirror: healthy & 2 != 0,
    })
}

impl From<KvError> for MetaError {
    fn from(error: KvError) -> Self {
        match error {
            // ENOSPC, as a full disk under a local file system gives: the application's
            // problem to act on, not an I/O error.
            KvError::Full(message) => MetaError::NoSpace(message),
            // EROFS, as a file system mounted read-only gives.
            KvError::ReadOnly(message) => MetaError::ReadOnly(message),
            other => MetaError::Backend(other),
        }
    }
}

#[cfg(test)]
mod gateway_record_tests {
    use super::*;

    #[test]
    fn a_gateway_record_of_the_earlier_layout_still_reads() {
        let id = [9; 16];
        let old = [
            keys::encode_pair(1, 77, &[]),
            keys::encode_pair(4, 40, b"10.0.0.1:7070"),
        ]
        .concat();
        let record = decode_gateway(id, &old).unwrap();
        assert_eq!(
            (record.address.as_str(), record.epoch, record.staged_blocks),
            ("10.0.0.1:7070", 1, 4)
        );
        assert_eq!((record.queue_len, record.healthy), (0, true));
        // And the new layout reads back what it wrote.
        let new = GatewayRecord {
            queue_len: 5,
            oldest_waiting_ms: 6,
            healthy: false,
            ..record
        };
        assert_eq!(decode_gateway(id, &encode_gateway(&new)).unwrap(), new);
        let mirror = GatewayRecord {
            mirror: true,
            healthy: true,
            ..new
        };
        assert_eq!(
            decode_gateway(id, &encode_gateway(&mirror)).unwrap(),
            mirror
        );
    }
}

#[cfg(test)]
mod shard_tests {
    use super::*;

    #[test]
    fn transactions_in_flight_at_once_hold_different_shards() {
        let pool = ShardPool::new(4);
        let held: Vec<_> = (0..4).map(|_| pool.lease()).collect();
        let mut shards: Vec<u8> = held.iter().map(|l| l.shard).collect();
        shards.sort();
        assert_eq!(shards, [0, 1, 2, 3], "four leases, four shards");
        // A fifth at once shares one, within the pool's range, and gives nothing back.
        let extra = pool.lease();
        assert!(extra.shard < 4 && extra.pool.is_none());
        let last = held[3].shard;
        drop(held);
        drop(extra);
        assert_eq!(pool.free.lock().unwrap().len(), 4);
        // Last in, first out: a quiet engine keeps to the same few shards.
        assert_eq!(pool.lease().shard, last);
    }
}
