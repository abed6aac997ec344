//! The embedded metadata engine: one redb file, every operation one redb transaction.
//!
//! Tables (keys sort as tuples, element by element):
//!
//! | table             | key                  | value                            |
//! |-------------------|----------------------|----------------------------------|
//! | `inodes`          | ino                  | inode record (`codec`)           |
//! | `dentries`        | (parent, name)       | (ino, cookie)                    |
//! | `dir_order`       | (parent, cookie)     | (ino, name)                      |
//! | `symlinks`        | ino                  | target                           |
//! | `xattrs`          | (ino, name)          | value                            |
//! | `chunks`          | (ino, chunk index)   | slices in commit order (`codec`) |
//! | `counters`        | name                 | u64 (ids, usage, format)         |
//! | `sessions`        | session              | (last heartbeat, description)    |
//! | `session_handles` | (session, ino)       | open handle count                |
//! | `pending_slices`  | (session, slice id)  | (len, gateway) (`codec`)         |
//! | `deleted_queue`   | (due time, slice id) | (len, gateway) (`codec`)         |
//! | `deleted_index`   | slice id             | due time                         |
//!
//! `dir_order` exists so that `readdir` can hand out cookies that only grow: a new entry always
//! gets a cookie larger than every cookie handed out before, so paging through a directory by
//! cookie never repeats an entry, whatever is added or removed meanwhile.
//!
//! Invariants the code keeps: a committed slice id is referenced by exactly one chunk (commit needs
//! the pending record, which it consumes); no slice shows bytes at or past its file's size
//! (truncate hides them behind a hole slice); a slice leaves every chunk before it is queued for
//! deletion, and enters the queue at most once.

use std::ops::Range;
use std::path::Path;
use std::sync::{Condvar, Mutex};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction,
};
use shared::CHUNK_SIZE;

use super::codec::{
    decode_inode, decode_slice_data, decode_slices, encode_inode, encode_slice_data, encode_slices,
    Inode,
};
use super::{
    check_name, now_ns, Attr, DeletedSlice, DirEntry, FileKind, GatewayId, Ino, MetaConfig,
    MetaEngine, MetaError, NewNode, RenameMode, Result, SessionId, SessionInfo, SetAttr, Slice,
    StatFs, TimeNs, XattrMode, MAX_FILE_SIZE, MAX_LINKS, MAX_SYMLINK_LEN, MAX_XATTR_NAME_LEN,
    MAX_XATTR_VALUE_LEN, ROOT_INO,
};

const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
const DENTRIES: TableDefinition<(u64, &[u8]), (u64, u64)> = TableDefinition::new("dentries");
const DIR_ORDER: TableDefinition<(u64, u64), (u64, &[u8])> = TableDefinition::new("dir_order");
const SYMLINKS: TableDefinition<u64, &[u8]> = TableDefinition::new("symlinks");
const XATTRS: TableDefinition<(u64, &[u8]), &[u8]> = TableDefinition::new("xattrs");
const CHUNKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("chunks");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const SESSIONS: TableDefinition<u64, (i64, &str)> = TableDefinition::new("sessions");
const SESSION_HANDLES: TableDefinition<(u64, u64), u64> = TableDefinition::new("session_handles");
const PENDING_SLICES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("pending_slices");
const DELETED_QUEUE: TableDefinition<(i64, u64), &[u8]> = TableDefinition::new("deleted_queue");
const DELETED_INDEX: TableDefinition<u64, i64> = TableDefinition::new("deleted_index");

/// Bumped when a table's layout changes incompatibly.
const FORMAT_VERSION: u64 = 1;
const FORMAT: &str = "format_version";
const NEXT_INO: &str = "next_ino";
const NEXT_SLICE_ID: &str = "next_slice_id";
const NEXT_COOKIE: &str = "next_cookie";
const NEXT_SESSION: &str = "next_session";
const FILES: &str = "files";
const USED_BYTES: &str = "used_bytes";

/// No real tree is this deep (a path is at most 4096 bytes, so at most 2048 levels).
const MAX_TREE_DEPTH: u32 = 1 << 16;

/// Cookies 1 and 2 are left for `.` and `..`, which a FUSE adapter lists itself.
const FIRST_COOKIE: u64 = 3;

/// The embedded [`MetaEngine`].
pub struct RedbMeta {
    db: Database,
    config: MetaConfig,
    group_sync: GroupSync,
}

/// Group commit for metadata: every operation commits without an fsync, then waits until one
/// durable commit made after it has returned. Whoever finds no sync running makes that commit for
/// everyone waiting, so concurrent operations share one fsync instead of queueing for one each
/// (redb serializes write transactions, and a durable commit costs two fsyncs).
///
/// redb guarantees that a durable commit also makes every earlier non-durable commit durable.
#[derive(Default)]
struct GroupSync {
    state: Mutex<SyncState>,
    synced: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Operations committed (not necessarily durable) so far.
    committed: u64,
    /// Operations known durable: every commit numbered at or below this one.
    durable: u64,
    /// A thread is making a durable commit right now.
    syncing: bool,
}

impl RedbMeta {
    /// Opens the database at `path`, creating and formatting it (root directory 1) if needed.
    pub fn open(path: impl AsRef<Path>, config: MetaConfig) -> Result<Self> {
        let db = Database::create(path)?;
        let meta = RedbMeta {
            db,
            config,
            group_sync: GroupSync::default(),
        };
        meta.write(|tx| tx.format_if_new())?;
        Ok(meta)
    }

    fn write<T>(&self, op: impl FnOnce(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        self.write_with(self.config.sync_commits, op)
    }

    /// [`MetaEngine::record_pending_slice`], waiting for durability only when `durable`.
    fn record_pending(&self, session: SessionId, slice: &Slice, durable: bool) -> Result<()> {
        if slice.slice_id == Slice::HOLE_ID || slice.len == 0 {
            return Err(MetaError::Invalid(format!(
                "slice {slice:?}: id 0 is reserved for holes, and a slice has data"
            )));
        }
        self.write_with(durable, |tx| {
            tx.check_session(session)?;
            if slice.slice_id >= tx.counter(NEXT_SLICE_ID)? {
                return Err(MetaError::Invalid(format!(
                    "slice id {} was never allocated",
                    slice.slice_id
                )));
            }
            let key = (session, slice.slice_id);
            let recorded_len = match tx.pending_slices.get(key)? {
                Some(bytes) => decode_slice_data(slice.slice_id, bytes.value())?.0,
                None => 0,
            };
            let len = recorded_len.max(slice.len);
            tx.pending_slices
                .insert(key, encode_slice_data(len, &slice.gateway_id).as_slice())?;
            Ok(())
        })
    }

    /// Like [`RedbMeta::write`], but returns without waiting for the commit to be durable; the
    /// next durable commit (any other operation's) carries it. Only for changes whose loss in a
    /// crash is harmless: giving back an open handle (lost, the handle is given back when its
    /// session expires after the restart, and an unlinked file is purged then), or a pending
    /// record its caller makes durable with its own commit (`record_pending_slice_lazily`).
    fn write_eventually<T>(&self, op: impl FnOnce(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        self.write_with(false, op)
    }

    fn write_with<T>(&self, durable: bool, op: impl FnOnce(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        // On error the transaction is dropped without commit, so nothing of it is kept.
        let out = {
            let mut tx = Tx::open(&txn, &self.config)?;
            op(&mut tx)?
        };
        txn.commit()?;
        if durable {
            let ticket = {
                let mut state = self.group_sync.state.lock().expect("sync state poisoned");
                state.committed += 1;
                state.committed
            };
            self.wait_durable(ticket)?;
        }
        Ok(out)
    }

    /// Returns once commit number `ticket` is durable, making a durable commit if no other thread
    /// is making one. A commit numbered at or below the count read before a durable commit began
    /// finished before it began, so that durable commit covers it.
    fn wait_durable(&self, ticket: u64) -> Result<()> {
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
    fn durable_commit(&self) -> Result<()> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.commit()?;
        Ok(())
    }

    fn read_inode(&self, ino: Ino) -> Result<Inode> {
        let txn = self.db.begin_read()?;
        load_inode(&txn.open_table(INODES)?, ino)
    }
}

fn load_inode(table: &impl ReadableTable<u64, &'static [u8]>, ino: Ino) -> Result<Inode> {
    match table.get(ino)? {
        Some(bytes) => decode_inode(ino, bytes.value()),
        None => Err(MetaError::NoSuchInode(ino)),
    }
}

fn load_dir(table: &impl ReadableTable<u64, &'static [u8]>, ino: Ino) -> Result<Inode> {
    let inode = load_inode(table, ino)?;
    match inode.attr.kind {
        FileKind::Dir => Ok(inode),
        _ => Err(MetaError::NotADirectory(ino)),
    }
}

fn load_entry(
    table: &impl ReadableTable<(u64, &'static [u8]), (u64, u64)>,
    parent: Ino,
    name: &[u8],
) -> Result<Option<(Ino, u64)>> {
    Ok(table.get((parent, name))?.map(|guard| guard.value()))
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
    Ok(())
}

/// Splits slices in commit order into those still showing at least one byte and those that later
/// slices cover completely. Partly covered slices stay whole: their blocks are still needed.
pub(super) fn drop_shadowed(slices: Vec<Slice>) -> (Vec<Slice>, Vec<Slice>) {
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

/// One write transaction with every table open.
struct Tx<'t> {
    config: &'t MetaConfig,
    now: TimeNs,
    inodes: Table<'t, u64, &'static [u8]>,
    dentries: Table<'t, (u64, &'static [u8]), (u64, u64)>,
    dir_order: Table<'t, (u64, u64), (u64, &'static [u8])>,
    symlinks: Table<'t, u64, &'static [u8]>,
    xattrs: Table<'t, (u64, &'static [u8]), &'static [u8]>,
    chunks: Table<'t, (u64, u64), &'static [u8]>,
    counters: Table<'t, &'static str, u64>,
    sessions: Table<'t, u64, (i64, &'static str)>,
    session_handles: Table<'t, (u64, u64), u64>,
    pending_slices: Table<'t, (u64, u64), &'static [u8]>,
    deleted_queue: Table<'t, (i64, u64), &'static [u8]>,
    deleted_index: Table<'t, u64, i64>,
}

impl<'t> Tx<'t> {
    fn open(txn: &'t WriteTransaction, config: &'t MetaConfig) -> Result<Self> {
        Ok(Tx {
            config,
            now: now_ns(),
            inodes: txn.open_table(INODES)?,
            dentries: txn.open_table(DENTRIES)?,
            dir_order: txn.open_table(DIR_ORDER)?,
            symlinks: txn.open_table(SYMLINKS)?,
            xattrs: txn.open_table(XATTRS)?,
            chunks: txn.open_table(CHUNKS)?,
            counters: txn.open_table(COUNTERS)?,
            sessions: txn.open_table(SESSIONS)?,
            session_handles: txn.open_table(SESSION_HANDLES)?,
            pending_slices: txn.open_table(PENDING_SLICES)?,
            deleted_queue: txn.open_table(DELETED_QUEUE)?,
            deleted_index: txn.open_table(DELETED_INDEX)?,
        })
    }

    fn format_if_new(&mut self) -> Result<()> {
        if let Some(version) = self.counters.get(FORMAT)?.map(|v| v.value()) {
            if version != FORMAT_VERSION {
                return Err(MetaError::Corrupt(format!(
                    "metadata format {version}, this build reads {FORMAT_VERSION}"
                )));
            }
            return Ok(());
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
        };
        self.put_inode(&root)?;
        for (name, value) in [
            (FORMAT, FORMAT_VERSION),
            (NEXT_INO, ROOT_INO + 1),
            (NEXT_SLICE_ID, 1),
            (NEXT_COOKIE, FIRST_COOKIE),
            (NEXT_SESSION, 1),
            (FILES, 1),
            (USED_BYTES, 0),
        ] {
            self.counters.insert(name, value)?;
        }
        Ok(())
    }

    // --- counters ---

    fn counter(&self, name: &str) -> Result<u64> {
        self.counters
            .get(name)?
            .map(|v| v.value())
            .ok_or_else(|| MetaError::Corrupt(format!("counter {name} is missing")))
    }

    /// Takes `count` consecutive values of a counter and returns the first.
    fn take_ids(&mut self, name: &str, count: u64) -> Result<u64> {
        let first = self.counter(name)?;
        let next = first
            .checked_add(count)
            .ok_or_else(|| MetaError::NoSpace(format!("{name} exhausted")))?;
        self.counters.insert(name, next)?;
        Ok(first)
    }

    fn add_usage(&mut self, files: i64, bytes: i64) -> Result<()> {
        for (name, delta) in [(FILES, files), (USED_BYTES, bytes)] {
            if delta != 0 {
                let value = self.counter(name)?.saturating_add_signed(delta);
                self.counters.insert(name, value)?;
            }
        }
        Ok(())
    }

    // --- inodes and entries ---

    fn inode(&self, ino: Ino) -> Result<Inode> {
        load_inode(&self.inodes, ino)
    }

    fn dir(&self, ino: Ino) -> Result<Inode> {
        load_dir(&self.inodes, ino)
    }

    fn put_inode(&mut self, inode: &Inode) -> Result<()> {
        self.inodes
            .insert(inode.attr.ino, encode_inode(inode).as_slice())?;
        Ok(())
    }

    /// Loads, changes and stores an inode; every change of a shared inode (a parent directory
    /// that may be both source and target of a rename) goes through here, so no stale copy is
    /// written back.
    fn update_inode(&mut self, ino: Ino, change: impl FnOnce(&mut Inode)) -> Result<Inode> {
        let mut inode = self.inode(ino)?;
        change(&mut inode);
        self.put_inode(&inode)?;
        Ok(inode)
    }

    /// A directory's content changed: mtime and ctime become now, nlink moves by `subdirs`.
    fn touch_dir(&mut self, dir: Ino, subdirs: i32) -> Result<()> {
        let now = self.now;
        self.update_inode(dir, |d| {
            d.attr.nlink = d.attr.nlink.saturating_add_signed(subdirs);
            d.attr.mtime_ns = now;
            d.attr.ctime_ns = now;
        })?;
        Ok(())
    }

    fn entry(&self, parent: Ino, name: &[u8]) -> Result<Option<(Ino, u64)>> {
        load_entry(&self.dentries, parent, name)
    }

    fn add_entry(&mut self, parent: Ino, name: &[u8], ino: Ino) -> Result<()> {
        let cookie = self.take_ids(NEXT_COOKIE, 1)?;
        self.dentries.insert((parent, name), (ino, cookie))?;
        self.dir_order.insert((parent, cookie), (ino, name))?;
        Ok(())
    }

    fn remove_entry(&mut self, parent: Ino, name: &[u8]) -> Result<Ino> {
        let (ino, cookie) = self
            .dentries
            .remove((parent, name))?
            .map(|v| v.value())
            .ok_or_else(|| no_entry(parent, name))?;
        self.dir_order.remove((parent, cookie))?;
        Ok(ino)
    }

    fn dir_is_empty(&self, dir: Ino) -> Result<bool> {
        let mut range = self.dir_order.range((dir, 0)..=(dir, u64::MAX))?;
        Ok(range.next().transpose()?.is_none())
    }

    /// Whether `ancestor` is `ino` or one of the directories above it.
    fn is_ancestor(&self, ancestor: Ino, mut ino: Ino) -> Result<bool> {
        // Bounded, so a corrupt parent chain that loops is reported instead of hanging.
        for _ in 0..MAX_TREE_DEPTH {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == ROOT_INO {
                return Ok(false);
            }
            ino = self.inode(ino)?.parent;
        }
        Err(MetaError::Corrupt(format!(
            "directory {ino} is more than {MAX_TREE_DEPTH} levels deep or its parents loop"
        )))
    }

    fn check_new_name(&self, parent: Ino, name: &[u8]) -> Result<()> {
        check_name(name)?;
        let dir = self.dir(parent)?;
        if dir.attr.nlink == 0 {
            return Err(MetaError::NoSuchInode(parent));
        }
        if self.entry(parent, name)?.is_some() {
            return Err(MetaError::AlreadyExists {
                parent,
                name: String::from_utf8_lossy(name).into_owned(),
            });
        }
        Ok(())
    }

    fn create_node(
        &mut self,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
        symlink_target: Option<&[u8]>,
    ) -> Result<Attr> {
        self.check_new_name(parent, name)?;
        if let Some(max) = self.config.max_files {
            if self.counter(FILES)? >= max {
                return Err(MetaError::NoSpace(format!("{max} inodes in use")));
            }
        }
        let ino = self.take_ids(NEXT_INO, 1)?;
        let is_dir = node.kind == FileKind::Dir;
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
        };
        self.put_inode(&inode)?;
        if let Some(target) = symlink_target {
            self.symlinks.insert(ino, target)?;
        }
        self.add_entry(parent, name, ino)?;
        self.touch_dir(parent, if is_dir { 1 } else { 0 })?;
        self.add_usage(1, 0)?;
        Ok(inode.attr)
    }

    /// One name of a non-directory is gone; the inode goes with its last name unless open.
    fn drop_link(&mut self, ino: Ino) -> Result<()> {
        let now = self.now;
        let inode = self.update_inode(ino, |i| {
            i.attr.nlink = i.attr.nlink.saturating_sub(1);
            i.attr.ctime_ns = now;
        })?;
        if inode.attr.nlink == 0 && inode.open_handles == 0 {
            self.purge(ino)?;
        }
        Ok(())
    }

    /// Removes an inode and everything it owns; its slices go to the deleted data queue.
    fn purge(&mut self, ino: Ino) -> Result<()> {
        let inode = self.inode(ino)?;
        self.inodes.remove(ino)?;
        self.symlinks.remove(ino)?;
        let xattr_names: Vec<Vec<u8>> = self
            .xattrs
            .range((ino, &[][..])..(ino + 1, &[][..]))?
            .map(|item| item.map(|(k, _)| k.value().1.to_vec()))
            .collect::<Result<_, _>>()?;
        for name in xattr_names {
            self.xattrs.remove((ino, name.as_slice()))?;
        }
        self.drop_chunks_from(ino, 0)?;
        let bytes = if inode.attr.kind == FileKind::File {
            inode.attr.size
        } else {
            0
        };
        self.add_usage(-1, -(bytes as i64))
    }

    // --- file data ---

    fn chunk(&self, ino: Ino, chunk_index: u64) -> Result<Vec<Slice>> {
        match self.chunks.get((ino, chunk_index))? {
            Some(bytes) => decode_slices(ino, chunk_index, bytes.value()),
            None => Ok(Vec::new()),
        }
    }

    fn put_chunk(&mut self, ino: Ino, chunk_index: u64, slices: &[Slice]) -> Result<()> {
        if slices.is_empty() {
            self.chunks.remove((ino, chunk_index))?;
        } else {
            self.chunks
                .insert((ino, chunk_index), encode_slices(slices).as_slice())?;
        }
        Ok(())
    }

    /// Removes chunks `first..` of a file and queues their slices.
    fn drop_chunks_from(&mut self, ino: Ino, first: u64) -> Result<()> {
        let doomed: Vec<(u64, Vec<u8>)> = self
            .chunks
            .range((ino, first)..=(ino, u64::MAX))?
            .map(|item| item.map(|(k, v)| (k.value().1, v.value().to_vec())))
            .collect::<Result<_, _>>()?;
        for (chunk_index, bytes) in doomed {
            self.chunks.remove((ino, chunk_index))?;
            for slice in decode_slices(ino, chunk_index, &bytes)? {
                self.queue_deleted(slice.slice_id, slice.len, &slice.gateway_id)?;
            }
        }
        Ok(())
    }

    fn queue_deleted(&mut self, slice_id: u64, len: u32, gateway_id: &GatewayId) -> Result<()> {
        if slice_id == Slice::HOLE_ID || self.deleted_index.get(slice_id)?.is_some() {
            return Ok(());
        }
        let delay = i64::try_from(self.config.deleted_data_delay.as_nanos()).unwrap_or(i64::MAX);
        let due = self.now.saturating_add(delay);
        self.deleted_queue.insert(
            (due, slice_id),
            encode_slice_data(len, gateway_id).as_slice(),
        )?;
        self.deleted_index.insert(slice_id, due)?;
        Ok(())
    }

    fn check_capacity(&self, growth: u64) -> Result<()> {
        if let Some(capacity) = self.config.capacity_bytes {
            let used = self.counter(USED_BYTES)?;
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
    fn resize_file(&mut self, inode: &mut Inode, new_size: u64) -> Result<()> {
        let ino = inode.attr.ino;
        let old_size = inode.attr.size;
        if new_size > MAX_FILE_SIZE {
            return Err(MetaError::FileTooLarge(new_size));
        }
        if new_size > old_size {
            self.check_capacity(new_size - old_size)?;
        } else if new_size < old_size {
            self.drop_chunks_from(ino, new_size.div_ceil(CHUNK_SIZE))?;
            let cut = new_size % CHUNK_SIZE;
            if cut != 0 {
                let chunk_index = new_size / CHUNK_SIZE;
                let (past_cut, mut kept): (Vec<Slice>, Vec<Slice>) = self
                    .chunk(ino, chunk_index)?
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
                    self.queue_deleted(slice.slice_id, slice.len, &slice.gateway_id)?;
                }
                self.put_chunk(ino, chunk_index, &kept)?;
            }
        }
        self.add_usage(0, new_size as i64 - old_size as i64)?;
        inode.attr.size = new_size;
        Ok(())
    }

    // --- sessions ---

    fn check_session(&self, session: SessionId) -> Result<()> {
        match self.sessions.get(session)? {
            Some(_) => Ok(()),
            None => Err(MetaError::SessionGone(session)),
        }
    }

    /// Drops `count` handles of `session` on `ino`; the last one of an unlinked file removes it.
    fn release_handles(&mut self, session: SessionId, ino: Ino, count: u64) -> Result<()> {
        let held = self
            .session_handles
            .get((session, ino))?
            .map_or(0, |v| v.value());
        let count = count.min(held);
        if count == 0 {
            return Ok(());
        }
        if held == count {
            self.session_handles.remove((session, ino))?;
        } else {
            self.session_handles.insert((session, ino), held - count)?;
        }
        // A directory may have been removed while open; its handles just go.
        if self.inodes.get(ino)?.is_none() {
            return Ok(());
        }
        let inode = self.update_inode(ino, |i| {
            i.open_handles = i.open_handles.saturating_sub(count)
        })?;
        if inode.open_handles == 0 && inode.attr.nlink == 0 {
            self.purge(ino)?;
        }
        Ok(())
    }

    // --- rename ---

    fn rename(
        &mut self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        mode: RenameMode,
    ) -> Result<()> {
        check_name(name)?;
        check_name(new_name)?;
        self.dir(parent)?;
        self.dir(new_parent)?;
        let (src_ino, _) = self
            .entry(parent, name)?
            .ok_or_else(|| no_entry(parent, name))?;
        let src = self.inode(src_ino)?;
        let target = self.entry(new_parent, new_name)?;
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
            return Ok(());
        }
        let src_is_dir = src.attr.kind == FileKind::Dir;
        if src_is_dir && parent != new_parent && self.is_ancestor(src_ino, new_parent)? {
            return Err(MetaError::MoveIntoOwnSubtree(src_ino));
        }
        let now = self.now;
        if mode == RenameMode::Exchange {
            let (dst_ino, _) = target.expect("checked above");
            let dst_is_dir = self.inode(dst_ino)?.attr.kind == FileKind::Dir;
            if dst_is_dir && parent != new_parent && self.is_ancestor(dst_ino, parent)? {
                return Err(MetaError::MoveIntoOwnSubtree(dst_ino));
            }
            self.remove_entry(parent, name)?;
            self.remove_entry(new_parent, new_name)?;
            self.add_entry(parent, name, dst_ino)?;
            self.add_entry(new_parent, new_name, src_ino)?;
            for (ino, is_dir, home) in [
                (src_ino, src_is_dir, new_parent),
                (dst_ino, dst_is_dir, parent),
            ] {
                self.update_inode(ino, |i| {
                    if is_dir {
                        i.parent = home;
                    }
                    i.attr.ctime_ns = now;
                })?;
            }
            let moved_subdirs = i32::from(src_is_dir) - i32::from(dst_is_dir);
            if parent == new_parent {
                self.touch_dir(parent, 0)?;
            } else {
                self.touch_dir(parent, -moved_subdirs)?;
                self.touch_dir(new_parent, moved_subdirs)?;
            }
            return Ok(());
        }
        let mut replaced_dir = false;
        if let Some((dst_ino, _)) = target {
            let dst = self.inode(dst_ino)?;
            let dst_is_dir = dst.attr.kind == FileKind::Dir;
            match (src_is_dir, dst_is_dir) {
                (true, false) => return Err(MetaError::NotADirectory(dst_ino)),
                (false, true) => return Err(MetaError::IsADirectory(dst_ino)),
                (true, true) if !self.dir_is_empty(dst_ino)? => {
                    return Err(MetaError::DirectoryNotEmpty(dst_ino))
                }
                _ => {}
            }
            self.remove_entry(new_parent, new_name)?;
            if dst_is_dir {
                self.purge(dst_ino)?;
                replaced_dir = true;
            } else {
                self.drop_link(dst_ino)?;
            }
        }
        self.remove_entry(parent, name)?;
        self.add_entry(new_parent, new_name, src_ino)?;
        self.update_inode(src_ino, |i| {
            if src_is_dir {
                i.parent = new_parent;
            }
            i.attr.ctime_ns = now;
        })?;
        let moved_subdirs = i32::from(src_is_dir);
        if parent == new_parent {
            self.touch_dir(parent, -i32::from(replaced_dir))?;
        } else {
            self.touch_dir(parent, -moved_subdirs)?;
            self.touch_dir(new_parent, moved_subdirs - i32::from(replaced_dir))?;
        }
        Ok(())
    }
}

impl MetaEngine for RedbMeta {
    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        let txn = self.db.begin_read()?;
        let inodes = txn.open_table(INODES)?;
        let dir = load_dir(&inodes, parent)?;
        match name {
            b"." => return Ok(dir.attr),
            b".." => return Ok(load_inode(&inodes, dir.parent)?.attr),
            _ => check_name(name)?,
        }
        let (ino, _) = load_entry(&txn.open_table(DENTRIES)?, parent, name)?
            .ok_or_else(|| no_entry(parent, name))?;
        Ok(load_inode(&inodes, ino)?.attr)
    }

    fn getattr(&self, ino: Ino) -> Result<Attr> {
        Ok(self.read_inode(ino)?.attr)
    }

    fn setattr(&self, ino: Ino, changes: &SetAttr) -> Result<Attr> {
        self.write(|tx| {
            let mut inode = tx.inode(ino)?;
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
                    tx.resize_file(&mut inode, size)?;
                    inode.attr.mtime_ns = tx.now;
                }
            }
            let a = &mut inode.attr;
            if let Some(mode) = changes.mode {
                a.mode = mode & 0o7777;
            }
            a.uid = changes.uid.unwrap_or(a.uid);
            a.gid = changes.gid.unwrap_or(a.gid);
            a.atime_ns = changes.atime_ns.unwrap_or(a.atime_ns);
            a.mtime_ns = changes.mtime_ns.unwrap_or(a.mtime_ns);
            a.ctime_ns = tx.now;
            tx.put_inode(&inode)?;
            Ok(inode.attr)
        })
    }

    fn create(&self, session: SessionId, parent: Ino, name: &[u8], node: &NewNode) -> Result<Attr> {
        if node.kind != FileKind::File {
            return Err(MetaError::Invalid("create makes regular files only".into()));
        }
        self.write(|tx| {
            tx.check_session(session)?;
            let attr = tx.create_node(parent, name, node, None)?;
            tx.update_inode(attr.ino, |i| i.open_handles += 1)?;
            tx.session_handles.insert((session, attr.ino), 1)?;
            Ok(attr)
        })
    }

    fn mknod(&self, parent: Ino, name: &[u8], node: &NewNode) -> Result<Attr> {
        if matches!(node.kind, FileKind::Dir | FileKind::Symlink) {
            return Err(MetaError::Invalid(
                "mknod does not make directories or symlinks".into(),
            ));
        }
        self.write(|tx| tx.create_node(parent, name, node, None))
    }

    fn mkdir(&self, parent: Ino, name: &[u8], mode: u32, uid: u32, gid: u32) -> Result<Attr> {
        let node = NewNode {
            kind: FileKind::Dir,
            mode,
            uid,
            gid,
            rdev: 0,
        };
        self.write(|tx| tx.create_node(parent, name, &node, None))
    }

    fn symlink(&self, parent: Ino, name: &[u8], target: &[u8], uid: u32, gid: u32) -> Result<Attr> {
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
        self.write(|tx| tx.create_node(parent, name, &node, Some(target)))
    }

    fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let txn = self.db.begin_read()?;
        let inode = load_inode(&txn.open_table(INODES)?, ino)?;
        if inode.attr.kind != FileKind::Symlink {
            return Err(MetaError::Invalid(format!("inode {ino} is not a symlink")));
        }
        match txn.open_table(SYMLINKS)?.get(ino)? {
            Some(target) => Ok(target.value().to_vec()),
            None => Err(MetaError::Corrupt(format!("symlink {ino} has no target"))),
        }
    }

    fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        check_name(name)?;
        self.write(|tx| {
            tx.dir(parent)?;
            let (ino, _) = tx
                .entry(parent, name)?
                .ok_or_else(|| no_entry(parent, name))?;
            if tx.inode(ino)?.attr.kind == FileKind::Dir {
                return Err(MetaError::IsADirectory(ino));
            }
            tx.remove_entry(parent, name)?;
            tx.touch_dir(parent, 0)?;
            tx.drop_link(ino)
        })
    }

    fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        check_name(name)?;
        self.write(|tx| {
            tx.dir(parent)?;
            let (ino, _) = tx
                .entry(parent, name)?
                .ok_or_else(|| no_entry(parent, name))?;
            tx.dir(ino)?;
            if !tx.dir_is_empty(ino)? {
                return Err(MetaError::DirectoryNotEmpty(ino));
            }
            tx.remove_entry(parent, name)?;
            tx.touch_dir(parent, -1)?;
            tx.purge(ino)
        })
    }

    fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        mode: RenameMode,
    ) -> Result<()> {
        self.write(|tx| tx.rename(parent, name, new_parent, new_name, mode))
    }

    fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Result<Attr> {
        self.write(|tx| {
            let inode = tx.inode(ino)?;
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
            tx.check_new_name(new_parent, new_name)?;
            tx.add_entry(new_parent, new_name, ino)?;
            tx.touch_dir(new_parent, 0)?;
            let now = tx.now;
            let inode = tx.update_inode(ino, |i| {
                i.attr.nlink += 1;
                i.attr.ctime_ns = now;
            })?;
            Ok(inode.attr)
        })
    }

    fn readdir(&self, ino: Ino, after_cookie: u64, limit: usize) -> Result<Vec<DirEntry>> {
        let txn = self.db.begin_read()?;
        let inodes = txn.open_table(INODES)?;
        load_dir(&inodes, ino)?;
        if after_cookie == u64::MAX {
            return Ok(Vec::new());
        }
        let order = txn.open_table(DIR_ORDER)?;
        let mut entries = Vec::new();
        for item in order
            .range((ino, after_cookie + 1)..=(ino, u64::MAX))?
            .take(limit)
        {
            let (key, value) = item?;
            let (child, name) = value.value();
            entries.push(DirEntry {
                name: name.to_vec(),
                cookie: key.value().1,
                attr: load_inode(&inodes, child)?.attr,
            });
        }
        Ok(entries)
    }

    fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        check_xattr_name(name)?;
        let txn = self.db.begin_read()?;
        load_inode(&txn.open_table(INODES)?, ino)?;
        match txn.open_table(XATTRS)?.get((ino, name))? {
            Some(value) => Ok(value.value().to_vec()),
            None => Err(MetaError::NoSuchXattr {
                ino,
                name: String::from_utf8_lossy(name).into_owned(),
            }),
        }
    }

    fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], mode: XattrMode) -> Result<()> {
        check_xattr_name(name)?;
        if value.len() > MAX_XATTR_VALUE_LEN {
            return Err(MetaError::XattrValueTooLarge {
                len: value.len(),
                max: MAX_XATTR_VALUE_LEN,
            });
        }
        self.write(|tx| {
            tx.inode(ino)?;
            let exists = tx.xattrs.get((ino, name))?.is_some();
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
            tx.xattrs.insert((ino, name), value)?;
            let now = tx.now;
            tx.update_inode(ino, |i| i.attr.ctime_ns = now)?;
            Ok(())
        })
    }

    fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        let txn = self.db.begin_read()?;
        load_inode(&txn.open_table(INODES)?, ino)?;
        let xattrs = txn.open_table(XATTRS)?;
        let names = xattrs
            .range((ino, &[][..])..(ino + 1, &[][..]))?
            .map(|item| item.map(|(k, _)| k.value().1.to_vec()))
            .collect::<Result<_, _>>()?;
        Ok(names)
    }

    fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        check_xattr_name(name)?;
        self.write(|tx| {
            tx.inode(ino)?;
            if tx.xattrs.remove((ino, name))?.is_none() {
                return Err(MetaError::NoSuchXattr {
                    ino,
                    name: String::from_utf8_lossy(name).into_owned(),
                });
            }
            let now = tx.now;
            tx.update_inode(ino, |i| i.attr.ctime_ns = now)?;
            Ok(())
        })
    }

    fn statfs(&self) -> Result<StatFs> {
        let txn = self.db.begin_read()?;
        let counters = txn.open_table(COUNTERS)?;
        let get = |name: &str| -> Result<u64> { Ok(counters.get(name)?.map_or(0, |v| v.value())) };
        Ok(StatFs {
            files: get(FILES)?,
            used_bytes: get(USED_BYTES)?,
            capacity_bytes: self.config.capacity_bytes,
            max_files: self.config.max_files,
        })
    }

    fn read_chunk(&self, ino: Ino, chunk_index: u64) -> Result<Vec<Slice>> {
        let txn = self.db.begin_read()?;
        load_inode(&txn.open_table(INODES)?, ino)?;
        match txn.open_table(CHUNKS)?.get((ino, chunk_index))? {
            Some(bytes) => decode_slices(ino, chunk_index, bytes.value()),
            None => Ok(Vec::new()),
        }
    }

    fn commit_slice(
        &self,
        session: SessionId,
        ino: Ino,
        chunk_index: u64,
        slice: &Slice,
        new_size: u64,
        mtime_ns: TimeNs,
    ) -> Result<Attr> {
        if slice.slice_id == Slice::HOLE_ID || slice.len == 0 || slice.end_in_chunk() > CHUNK_SIZE {
            return Err(MetaError::Invalid(format!(
                "slice {slice:?} does not fit in a chunk or has no data"
            )));
        }
        let slice_end = chunk_index
            .checked_mul(CHUNK_SIZE)
            .and_then(|start| start.checked_add(slice.end_in_chunk()))
            .filter(|&end| end <= super::MAX_FILE_SIZE)
            .ok_or(MetaError::FileTooLarge(u64::MAX))?;
        self.write(|tx| {
            tx.check_session(session)?;
            let was_pending = tx
                .pending_slices
                .remove((session, slice.slice_id))?
                .is_some();
            let mut inode = tx.inode(ino)?;
            match inode.attr.kind {
                FileKind::File => {}
                FileKind::Dir => return Err(MetaError::IsADirectory(ino)),
                _ => {
                    return Err(MetaError::Invalid(format!(
                        "inode {ino} is not a regular file"
                    )))
                }
            }
            let mut slices = tx.chunk(ino, chunk_index)?;
            if slices.iter().any(|s| s.slice_id == slice.slice_id) {
                // A retry of a commit that succeeded but whose answer was lost. Checked even when
                // the slice was recorded as pending again, so that no chunk ever holds an id twice.
                return Ok(inode.attr);
            }
            if !was_pending {
                return Err(MetaError::SliceNotPending {
                    session,
                    slice_id: slice.slice_id,
                });
            }
            slices.push(*slice);
            let (kept, shadowed) = drop_shadowed(slices);
            for s in &shadowed {
                tx.queue_deleted(s.slice_id, s.len, &s.gateway_id)?;
            }
            tx.put_chunk(ino, chunk_index, &kept)?;
            let size = inode.attr.size.max(new_size).max(slice_end);
            if size > inode.attr.size {
                tx.resize_file(&mut inode, size)?;
            }
            inode.attr.mtime_ns = mtime_ns;
            inode.attr.ctime_ns = tx.now;
            tx.put_inode(&inode)?;
            Ok(inode.attr)
        })
    }

    fn allocate_slice_ids(&self, count: u64) -> Result<Range<u64>> {
        self.write(|tx| {
            let first = tx.take_ids(NEXT_SLICE_ID, count)?;
            Ok(first..first + count)
        })
    }

    fn record_pending_slice(&self, session: SessionId, slice: &Slice) -> Result<()> {
        self.record_pending(session, slice, self.config.sync_commits)
    }

    fn record_pending_slice_lazily(&self, session: SessionId, slice: &Slice) -> Result<()> {
        self.record_pending(session, slice, false)
    }

    fn open_session(&self, description: &str) -> Result<SessionId> {
        self.write(|tx| {
            let id = tx.take_ids(NEXT_SESSION, 1)?;
            tx.sessions.insert(id, (tx.now, description))?;
            Ok(id)
        })
    }

    fn heartbeat(&self, session: SessionId) -> Result<()> {
        self.write(|tx| {
            let description = match tx.sessions.get(session)? {
                Some(record) => record.value().1.to_string(),
                None => return Err(MetaError::SessionGone(session)),
            };
            tx.sessions
                .insert(session, (tx.now, description.as_str()))?;
            Ok(())
        })
    }

    fn close_session(&self, session: SessionId) -> Result<()> {
        self.write(|tx| {
            let handles: Vec<(Ino, u64)> = tx
                .session_handles
                .range((session, 0)..=(session, u64::MAX))?
                .map(|item| item.map(|(k, v)| (k.value().1, v.value())))
                .collect::<Result<_, _>>()?;
            for (ino, count) in handles {
                tx.release_handles(session, ino, count)?;
            }
            let pending: Vec<(u64, Vec<u8>)> = tx
                .pending_slices
                .range((session, 0)..=(session, u64::MAX))?
                .map(|item| item.map(|(k, v)| (k.value().1, v.value().to_vec())))
                .collect::<Result<_, _>>()?;
            for (slice_id, bytes) in pending {
                tx.pending_slices.remove((session, slice_id))?;
                let (len, gateway_id) = decode_slice_data(slice_id, &bytes)?;
                tx.queue_deleted(slice_id, len, &gateway_id)?;
            }
            tx.sessions.remove(session)?;
            Ok(())
        })
    }

    fn list_sessions(&self) -> Result<Vec<SessionInfo>> {
        let txn = self.db.begin_read()?;
        let sessions = txn.open_table(SESSIONS)?;
        let mut out = Vec::new();
        for item in sessions.iter()? {
            let (id, record) = item?;
            let (last_heartbeat_ns, description) = record.value();
            out.push(SessionInfo {
                id: id.value(),
                last_heartbeat_ns,
                description: description.to_string(),
            });
        }
        Ok(out)
    }

    fn expired_sessions(&self, heartbeat_before_ns: TimeNs) -> Result<Vec<SessionId>> {
        Ok(self
            .list_sessions()?
            .into_iter()
            .filter(|s| s.last_heartbeat_ns < heartbeat_before_ns)
            .map(|s| s.id)
            .collect())
    }

    fn open(&self, session: SessionId, ino: Ino) -> Result<Attr> {
        self.write(|tx| {
            tx.check_session(session)?;
            let inode = tx.update_inode(ino, |i| i.open_handles += 1)?;
            let held = tx
                .session_handles
                .get((session, ino))?
                .map_or(0, |v| v.value());
            tx.session_handles.insert((session, ino), held + 1)?;
            Ok(inode.attr)
        })
    }

    fn release(&self, session: SessionId, ino: Ino) -> Result<()> {
        self.write_eventually(|tx| tx.release_handles(session, ino, 1))
    }

    fn take_due_deleted_slices(&self, now_ns: TimeNs, limit: usize) -> Result<Vec<DeletedSlice>> {
        let txn = self.db.begin_read()?;
        let queue = txn.open_table(DELETED_QUEUE)?;
        let mut out = Vec::new();
        for item in queue.range(..=(now_ns, u64::MAX))?.take(limit) {
            let (key, value) = item?;
            let (due_ns, slice_id) = key.value();
            let (len, gateway_id) = decode_slice_data(slice_id, value.value())?;
            out.push(DeletedSlice {
                slice_id,
                len,
                gateway_id,
                due_ns,
            });
        }
        Ok(out)
    }

    fn ack_deleted_slices(&self, slice_ids: &[u64]) -> Result<()> {
        self.write(|tx| {
            for &slice_id in slice_ids {
                if let Some(due) = tx.deleted_index.remove(slice_id)?.map(|v| v.value()) {
                    tx.deleted_queue.remove((due, slice_id))?;
                }
            }
            Ok(())
        })
    }
}
