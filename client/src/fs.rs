//! The file-system core: every file-system operation of a stagefs mount, async, without FUSE.
//!
//! Layered like mountpoint-s3: a FUSE adapter (to come) is a thin shell that turns kernel
//! requests into calls on [`Fs`] and answers with the result or [`FsError::errno`]. Tests drive
//! [`Fs`] directly, with the metadata engine in-process and an in-memory gateway.
//!
//! Below [`Fs`]:
//! - [`MetaApi`]: the metadata engine's transactions (`meta.proto`); [`GrpcMeta`] talks to the
//!   gateway's `Meta` service.
//! - [`BlockApi`]: whole blocks written durably to a gateway and ranges read back;
//!   [`GrpcBlocks`] talks to its `Staging` service, [`MemoryBlocks`] is the in-memory double.
//!   Blocks the gateway no longer holds are read from the object store ([`BlockSource`]).
//! - `write`: dirty slices per file, blocks uploaded as they fill, commits on flush.
//! - `read`: slice resolution, block fetches through a small cache, readahead.
//!
//! Consistency (DESIGN.md, "Read path and consistency"): close-to-open. `flush`, `fsync` and
//! `release` return only once every byte written to the file is durable on the gateway and
//! committed; `open` fetches the current size and forgets the slices it knew, so it sees every
//! commit that happened before it. Within one mount, all handles of a file share its dirty data
//! and see each other's writes at once.

mod block_api;
mod block_grpc;
mod cache;
mod channel;
mod closed_attrs;
pub mod cluster;
mod dir_attrs;
mod dir_leases;
mod error;
pub mod gateways;
pub mod layout;
mod locks;
mod meta_api;
mod meta_grpc;
#[cfg(test)]
mod meta_local;
mod read;
mod releases;
mod unsynced;
mod write;
mod xattr_cache;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::ObjectStore;

pub use block_api::{BlockApi, BlockHome, BlockSource, MemoryBlocks, StoreBlocks};
pub use block_grpc::GrpcBlocks;
pub use channel::{
    connect_gateway, error_chain, gateway_endpoint, meta_client, staging_client, tls_hint,
    GatewayAccess, GatewayChannel,
};
pub use error::{FsError, FsResult};
pub use gateways::GatewayDirectory;
pub use meta_api::{
    now_ns, Attr, DirEntry, FileKind, GatewayId, HeldLock, Ino, LockKind, LockRequest, MetaApi,
    NewNode, Opened, SessionGrant, SessionId, SetAttr, Slice, StatFs, TimeNs, MAX_FILE_SIZE,
    ROOT_INO,
};
pub use meta_grpc::GrpcMeta;

use layout::{chunk_pieces, BLOCK_SIZE};
use read::{plan_chunk, BlockFetcher};
use write::{DirtyFile, WriteContext};
use xattr_cache::{XattrAbsence, CAPABILITY_XATTR};

/// An open file handle, as the kernel knows it.
pub type FileHandle = u64;

/// Tunables of a mount's file-system core.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Refuse every change with EROFS.
    pub read_only: bool,
    /// Slice ids fetched from the engine at a time.
    pub slice_id_batch: u32,
    /// A file holding more uncommitted bytes than this is flushed by the write that crossed it
    /// (bounds the memory of one writer; sequential writers still stream blocks meanwhile).
    pub max_dirty_bytes_per_file: u64,
    /// Likewise for the number of uncommitted slices (random writers make one per write).
    pub max_dirty_slices_per_file: usize,
    /// Blocks written to the gateway at once, across all files.
    pub max_concurrent_uploads: usize,
    /// Bytes of whole blocks kept for readers.
    pub block_cache_bytes: u64,
    /// Blocks fetched ahead of a sequential reader.
    pub readahead_blocks: u64,
    /// A slice shorter than a block goes to the gateway with its commit in one call
    /// (`write_slice`). Off in write-through mode, where blocks go to the object store.
    pub write_slices: bool,
    /// How long a file seen without `security.capability` is taken to still have none (the
    /// kernel asks before every write); the mount passes its attribute TTL.
    pub capability_absence_ttl: Duration,
    /// What every connection to another gateway (to read the blocks it staged) presents.
    pub gateway_access: GatewayAccess,
    /// How long attributes read from the engine answer `getattr` without asking it again: a
    /// directory's (brought forward by this mount's own creates in it, see `fs/dir_attrs.rs`)
    /// and an open file's (kept by its handles with this mount's own changes); zero asks the
    /// engine every time. The mount passes its attribute TTL, the bound the kernel's own cache
    /// gives to changes made elsewhere.
    pub attr_ttl: Duration,
    /// How long the releases of closed handles are gathered before they go to the engine as one
    /// call (`fs/releases.rs`); zero sends each as it comes. An unlinked file's data outlives
    /// its last `close` by this and the call.
    pub release_window: Duration,
    /// Take the lease of each directory this mount makes, and answer lookups of names it did
    /// not add there without asking the engine (`fs/dir_leases.rs`).
    pub dir_leases: bool,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            read_only: false,
            slice_id_batch: 64,
            max_dirty_bytes_per_file: 64 * 1024 * 1024,
            max_dirty_slices_per_file: 256,
            max_concurrent_uploads: 16,
            block_cache_bytes: 128 << 20,
            readahead_blocks: 4,
            write_slices: true,
            capability_absence_ttl: Duration::from_secs(1),
            gateway_access: GatewayAccess::default(),
            attr_ttl: Duration::ZERO,
            release_window: Duration::from_millis(50),
            dir_leases: true,
        }
    }
}

/// The file-system core of one mount (one metadata session).
pub struct Fs {
    meta: Arc<dyn MetaApi>,
    /// Namespace changes that `fsync` and `close` must still make durable.
    unsynced: unsynced::Unsynced,
    config: FsConfig,
    session: SessionId,
    writer: Arc<WriteContext>,
    fetcher: Arc<BlockFetcher>,
    /// Files with at least one open handle on this mount.
    files: Mutex<HashMap<Ino, Arc<OpenFile>>>,
    handles: Mutex<HashMap<FileHandle, Arc<Handle>>>,
    next_handle: AtomicU64,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    /// The directories this mount holds the lease on, and their keeper (with `dir_leases`).
    dir_leases: Arc<dir_leases::DirLeases>,
    lease_keeper: Option<tokio::task::JoinHandle<()>>,
    xattr_absence: XattrAbsence,
    dir_attrs: dir_attrs::DirAttrs,
    closed_attrs: closed_attrs::ClosedAttrs,
    /// Removals, renames, links and extended-attribute changes this mount made (each may change
    /// the link count or ctime of a file it has open, so attributes the engine answered before
    /// one, read before the call was sent, are asked for again), and its `setattr`s of files it
    /// has not open (counted so that [`closed_attrs`] orders them; open files ask again after
    /// those too).
    renamed: AtomicU64,
    /// Times attributes held for a commit left an open file's mirror (sent, or dropped by a
    /// write): an engine answer read before one may miss them (see [`Fs::settled`]).
    held_attrs_sent: AtomicU64,
    locks: locks::MountLocks,
    releases: releases::Releases,
    /// Directory listings in progress, by directory handle.
    listings: Mutex<HashMap<FileHandle, Listing>>,
}

/// The rest of the engine page a directory handle's last `readdir` fetched: the kernel asks for
/// a few dozen entries at a time (one 4 KiB buffer), so its calls share one engine page of
/// [`LISTING_PAGE`] entries instead of asking for one each. One page per open directory handle is
/// all the mount holds of a listing, whatever the directory's size.
#[derive(Default)]
struct Listing {
    /// The cookie the buffered entries follow.
    after: u64,
    entries: std::collections::VecDeque<DirEntry>,
    /// The engine said the page was its last.
    end: bool,
    /// When the page was read: its attributes are served no longer than the attribute TTL.
    fetched: Option<std::time::Instant>,
}

/// Entries one engine call returns for a listing.
pub const LISTING_PAGE: u32 = 512;

/// A file open on this mount: what all its handles share.
struct OpenFile {
    ino: Ino,
    /// Handles of this mount on the file; changed only with `Fs::files` locked.
    handles: AtomicUsize,
    /// End of this mount's uncommitted data (0 when clean) and the attributes set on it that
    /// wait for its commit ([`DirtyFile::set_attrs`]), readable without the state lock so
    /// attribute calls can report what this mount has written and set.
    dirty_end: AtomicU64,
    set_attrs: std::sync::Mutex<SetAttr>,
    state: tokio::sync::Mutex<FileState>,
}

struct FileState {
    /// Attributes as the engine last reported them.
    attr: Attr,
    /// When the engine reported them, and the mount's [`Fs::renamed`] count then.
    attr_read: Option<(std::time::Instant, u64)>,
    dirty: DirtyFile,
    /// Slices of chunks already asked for, since the last change this mount knows of.
    chunks: HashMap<u64, Arc<Vec<Slice>>>,
}

impl FileState {
    /// The engine reported `attr` just now.
    fn engine_says(&mut self, attr: Attr, renamed: u64) {
        self.attr = attr;
        self.attr_read = Some((std::time::Instant::now(), renamed));
    }

    /// The attributes this mount sees: the engine's, with the size its dirty bytes make and
    /// the attributes set that wait for their commit.
    fn seen_attr(&self) -> Attr {
        let mut attr = Attr {
            size: self.size(),
            ..self.attr
        };
        self.dirty.set_attrs.apply_to(&mut attr);
        attr
    }

    /// The size this mount sees: committed, or further if it wrote past the end.
    fn size(&self) -> u64 {
        self.attr.size.max(self.dirty.end())
    }
}

/// One open file handle.
struct Handle {
    file: Arc<OpenFile>,
    readable: bool,
    writable: bool,
    append: bool,
    /// Where the next read would start if the reader is sequential.
    next_sequential: AtomicU64,
}

/// How `open` flags translate for the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Access {
    readable: bool,
    writable: bool,
    append: bool,
    truncate: bool,
}

impl Access {
    fn from_flags(flags: i32) -> FsResult<Self> {
        let (readable, writable) = match flags & libc::O_ACCMODE {
            libc::O_RDONLY => (true, false),
            libc::O_WRONLY => (false, true),
            libc::O_RDWR => (true, true),
            other => return Err(FsError::Invalid(format!("access mode {other:#o}"))),
        };
        Ok(Access {
            readable,
            writable,
            append: flags & libc::O_APPEND != 0,
            // Truncating needs write access; Linux ignores O_TRUNC on a read-only open.
            truncate: flags & libc::O_TRUNC != 0 && writable,
        })
    }
}

impl Fs {
    /// The core of a mount over a session already opened with `meta.open_session`. Starts the
    /// session's heartbeat, so it needs a tokio runtime. Every slice is staged on `gateway`
    /// (the session's); blocks of other gateways are found through the registry.
    pub fn new(
        meta: Arc<dyn MetaApi>,
        gateway: Arc<dyn BlockApi>,
        store: Arc<dyn ObjectStore>,
        grant: &SessionGrant,
        config: FsConfig,
    ) -> Self {
        let directory = Arc::new(gateways::RegistryDirectory::new(
            grant.gateway_id,
            gateway,
            meta.clone(),
            gateways::grpc_connector(config.gateway_access.clone()),
        ));
        Fs::with_gateways(meta, directory, Some(store), grant, config)
    }

    /// The core of a mount whose slices go where `gateways` routes them. Without `store` (a
    /// tenant confined to a directory) uploaded blocks are read through the gateways.
    pub fn with_gateways(
        meta: Arc<dyn MetaApi>,
        directory: Arc<dyn GatewayDirectory>,
        store: Option<Arc<dyn ObjectStore>>,
        grant: &SessionGrant,
        config: FsConfig,
    ) -> Self {
        let fetcher = BlockFetcher::new(
            BlockSource::new(directory.clone(), store.clone()),
            config.block_cache_bytes,
        );
        let writer = Arc::new(
            WriteContext::new(
                meta.clone(),
                directory.clone(),
                grant.session_id,
                config.slice_id_batch,
                config.max_concurrent_uploads,
                config.write_slices,
                store.clone(),
            )
            .with_direct_threshold(grant.direct_threshold)
            .with_block_cache(fetcher.cache().clone()),
        );
        let heartbeat = grant.heartbeat_interval.map(|interval| {
            let (meta, session, directory) = (meta.clone(), grant.session_id, directory.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    if let Err(e) = meta.heartbeat(session, &directory.view()).await {
                        tracing::warn!(session, error = %e, "session heartbeat failed");
                    }
                }
            })
        });
        let dir_leases = Arc::new(dir_leases::DirLeases::new(grant.heartbeat_interval));
        let lease_keeper = config
            .dir_leases
            .then(|| tokio::spawn(dir_leases.clone().keep(meta.clone(), grant.session_id)));
        Fs {
            dir_leases,
            lease_keeper,
            xattr_absence: XattrAbsence::new(config.capability_absence_ttl),
            dir_attrs: dir_attrs::DirAttrs::new(config.attr_ttl),
            closed_attrs: closed_attrs::ClosedAttrs::new(config.attr_ttl),
            renamed: AtomicU64::new(0),
            held_attrs_sent: AtomicU64::new(0),
            locks: locks::MountLocks::new(meta.clone(), grant.session_id),
            releases: releases::Releases::new(
                meta.clone(),
                grant.session_id,
                config.release_window,
            ),
            listings: Mutex::new(HashMap::new()),
            meta,
            unsynced: unsynced::Unsynced::default(),
            config,
            session: grant.session_id,
            writer,
            fetcher,
            files: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            heartbeat,
        }
    }

    pub fn session(&self) -> SessionId {
        self.session
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    fn check_writable_mount(&self) -> FsResult<()> {
        if self.config.read_only {
            return Err(FsError::ReadOnly);
        }
        Ok(())
    }

    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<Ino, Arc<OpenFile>>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, HashMap<FileHandle, Arc<Handle>>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handle(&self, fh: FileHandle) -> FsResult<Arc<Handle>> {
        self.handles()
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle(fh))
    }

    fn open_file(&self, ino: Ino) -> Option<Arc<OpenFile>> {
        self.files().get(&ino).cloned()
    }

    /// `attr` with the size this mount sees, if it has the file open with data past the end.
    fn local_attr(&self, mut attr: Attr) -> Attr {
        if attr.kind == FileKind::File {
            if let Some(file) = self.open_file(attr.ino) {
                attr.size = attr.size.max(file.dirty_end.load(Ordering::Acquire));
                let set = *file.set_attrs.lock().unwrap_or_else(|p| p.into_inner());
                set.apply_to(&mut attr);
            }
        }
        attr
    }

    /// Commits every dirty byte of an open file (its state locked by the caller).
    async fn flush_locked(&self, file: &OpenFile, state: &mut FileState) -> FsResult<()> {
        let had_dirty = !state.dirty.is_empty();
        let renamed = self.renamed_count();
        let result = state
            .dirty
            .flush(&self.writer, file.ino, &mut state.attr)
            .await;
        if had_dirty {
            // Whatever got committed now comes from the engine, not the dirty overlay.
            state.chunks.clear();
            if result.is_ok() {
                state.attr_read = Some((std::time::Instant::now(), renamed));
            } else {
                state.attr_read = None;
            }
        }
        self.mirror(file, &state.dirty);
        result
    }

    /// [`Fs::flush_locked`], then makes every namespace change this mount made before durable
    /// (`fsync` and `close`): the slice commit of dirty data is durable and covers them, else a
    /// `Sync` call does.
    async fn flush_durably(&self, file: &OpenFile, state: &mut FileState) -> FsResult<()> {
        let mark = self.unsynced.mark();
        let had_dirty = !state.dirty.is_empty();
        self.flush_locked(file, state).await?;
        if had_dirty {
            self.unsynced.covered(mark);
            Ok(())
        } else {
            self.sync_namespace_upto(mark).await
        }
    }

    /// Calls `Sync` if changes up to `mark` may not be durable yet.
    async fn sync_namespace_upto(&self, mark: u64) -> FsResult<()> {
        if self.unsynced.pending(mark) {
            self.meta.sync().await?;
            self.unsynced.covered(mark);
        }
        Ok(())
    }

    /// `fsync` of a directory: every namespace change this mount made is durable on return.
    pub async fn fsyncdir(&self) -> FsResult<()> {
        self.sync_namespace_upto(self.unsynced.mark()).await
    }

    /// Counts a namespace change that was answered (see [`Fs::flush_durably`]).
    fn changed<T>(&self, outcome: FsResult<T>) -> FsResult<T> {
        if outcome.is_ok() {
            self.unsynced.changed();
        }
        outcome
    }

    // --- names and attributes ---

    pub async fn lookup(&self, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        if self.dir_leases.absent(parent, name) {
            metrics::counter!("stagefs_dir_lease_absent_answers_total").increment(1);
            return Err(FsError::Meta {
                op: "lookup",
                errno: libc::ENOENT,
                message: format!(
                    "no entry {:?} in directory {parent} (this mount holds its lease)",
                    String::from_utf8_lossy(name)
                ),
            });
        }
        let asked = self.dir_attrs.generation();
        let sent = self.held_attrs_sent.load(Ordering::Acquire);
        let attr = self.meta.lookup(parent, name).await?;
        self.dir_attrs.saw(&attr, asked);
        Ok(self.settled(self.local_attr(attr), sent).await)
    }

    /// Mirrors what attribute calls read of `file`'s `dirty` (after every change to it); counts
    /// in [`Fs::held_attrs_sent`] attributes that leave the mirror, before they do.
    fn mirror(&self, file: &OpenFile, dirty: &DirtyFile) {
        file.dirty_end.store(dirty.end(), Ordering::Release);
        let mut held = file.set_attrs.lock().unwrap_or_else(|p| p.into_inner());
        if *held != SetAttr::default() && *held != dirty.set_attrs {
            self.held_attrs_sent.fetch_add(1, Ordering::AcqRel);
        }
        *held = dirty.set_attrs;
    }

    /// `attr` as [`Fs::local_attr`] made it from an engine answer read after `sent` was
    /// [`Fs::held_attrs_sent`]; should attributes held for a commit have left an open file's
    /// mirror since, the answer may predate their commit and miss them: the file's own state
    /// (locked, so after that commit) answers instead.
    async fn settled(&self, attr: Attr, sent: u64) -> Attr {
        if self.held_attrs_sent.load(Ordering::Acquire) == sent {
            return attr;
        }
        match self.open_file(attr.ino) {
            Some(file) => file.state.lock().await.seen_attr(),
            None => attr,
        }
    }

    pub async fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        if let Some(attr) = self.getattr_here(ino) {
            return Ok(attr);
        }
        let asked = self.dir_attrs.generation();
        let sent = self.held_attrs_sent.load(Ordering::Acquire);
        let attr = self.meta.getattr(ino).await?;
        self.dir_attrs.saw(&attr, asked);
        Ok(self.settled(self.local_attr(attr), sent).await)
    }

    /// The attributes of `ino` when this mount can answer without the engine and without
    /// waiting (a directory it read within the TTL, a file it has open or closed within it): the
    /// FUSE adapter answers those on the kernel's thread.
    pub fn getattr_here(&self, ino: Ino) -> Option<Attr> {
        if let Some(attr) = self.dir_attrs.get(ino) {
            return Some(attr);
        }
        match self.open_file(ino) {
            Some(file) => self.open_file_attr(&file),
            None => self.closed_attrs.get(ino),
        }
    }

    /// The attributes of a file this mount has open, if the engine reported them within the
    /// TTL and this mount removed, renamed or linked nothing since (the kernel asks after every
    /// write, and `tar` sets mode, owner and times on each file it writes).
    fn open_file_attr(&self, file: &OpenFile) -> Option<Attr> {
        // A flush or write holds the state: ask the engine rather than wait.
        let state = file.state.try_lock().ok()?;
        let (read_at, renamed) = state.attr_read?;
        let fresh = read_at.elapsed() < self.config.attr_ttl && renamed == self.renamed_count();
        fresh.then(|| state.seen_attr())
    }

    /// [`Fs::renamed`], read before asking the engine for attributes to keep.
    fn renamed_count(&self) -> u64 {
        self.renamed.load(Ordering::Acquire)
    }

    /// Counts a change this mount made, once it was answered: attributes asked for before it
    /// are not kept. The count after it.
    fn count_change(&self) -> u64 {
        self.renamed.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// A change that may alter the link count or ctime of a file this mount has open, or of
    /// one it closed: which one, the mount does not know.
    fn renaming<T>(&self, outcome: FsResult<T>) -> FsResult<T> {
        self.closed_attrs.forget_all(self.count_change());
        outcome
    }

    /// A node made in `parent` by this mount: the directory's attributes follow.
    fn made_in(&self, parent: Ino, outcome: FsResult<Attr>) -> FsResult<Attr> {
        let attr = self.changed(outcome)?;
        self.dir_attrs.made_in(parent, &attr);
        Ok(attr)
    }

    /// A change whose effect on directories' attributes the mount does not follow.
    fn changed_dirs<T>(&self, outcome: FsResult<T>) -> FsResult<T> {
        self.dir_attrs.forget_all();
        self.changed(self.renaming(outcome))
    }

    /// [`Fs::setattr`] when it can be answered without the engine and without waiting: a
    /// change held for the commit of a file this mount is writing for the first time (see
    /// [`Fs::hold_attrs`]), or a read-only mount's refusal.
    pub fn setattr_here(&self, ino: Ino, changes: &SetAttr) -> Option<FsResult<Attr>> {
        if let Err(e) = self.check_writable_mount() {
            return Some(Err(e));
        }
        let file = self.open_file(ino)?;
        let mut state = file.state.try_lock().ok()?;
        self.hold_attrs(&file, &mut state, changes).map(Ok)
    }

    /// Holds mode, owner and times of a file being written for the first time (nothing of it
    /// committed yet) for the data's commit: no call now, and the close's durable commit
    /// covers them (`tar` and `pip` set them on each file they write; the kernel passes no
    /// handle for `fchmod`, so any caller's change waits). Nothing of the file can be read
    /// elsewhere meanwhile, so holding back a change that removes rights exposes nothing. The
    /// kernel checked the caller's right to make them (`default_permissions`); the gateway
    /// refuses none of them on a file this session holds open. SEMANTICS says when others see
    /// them. None: not such a change; it goes to the engine.
    fn hold_attrs(
        &self,
        file: &OpenFile,
        state: &mut FileState,
        changes: &SetAttr,
    ) -> Option<Attr> {
        if changes.size.is_some() || state.dirty.is_empty() || state.attr.size != 0 {
            return None;
        }
        state.dirty.set_attrs = state.dirty.set_attrs.then(changes);
        state.attr.ctime_ns = now_ns();
        self.mirror(file, &state.dirty);
        Some(state.seen_attr())
    }

    /// Changes attributes; a `size` truncates or extends. An open file's dirty data is committed
    /// first, so the change applies after the writes that came before it.
    pub async fn setattr(&self, ino: Ino, changes: &SetAttr) -> FsResult<Attr> {
        self.check_writable_mount()?;
        let Some(file) = self.open_file(ino) else {
            self.dir_attrs.forget(ino);
            let asked = self.dir_attrs.generation();
            let attr = self.changed(self.meta.setattr(ino, changes).await);
            // Answers about the file asked for before this change are not kept once it closed.
            self.closed_attrs.forget(ino, self.count_change());
            let attr = attr?;
            self.dir_attrs.saw(&attr, asked);
            return Ok(attr);
        };
        let mut state = file.state.lock().await;
        if let Some(attr) = self.hold_attrs(&file, &mut state, changes) {
            return Ok(attr);
        }
        let resizes = changes.size.is_some();
        // A size applies after the writes before it.
        if resizes {
            self.flush_locked(&file, &mut state).await?;
        }
        // Changes waiting for the data's commit (its flush just sent them) go first.
        let changes = state.dirty.set_attrs.then(changes);
        let renamed = self.renamed_count();
        let attr = self.changed(self.meta.setattr(ino, &changes).await)?;
        state.engine_says(attr, renamed);
        if resizes {
            state.chunks.clear();
        }
        // The commit of data still dirty (a file with committed bytes whose changes went at
        // once) keeps an mtime set now: it otherwise sets its own time.
        state.dirty.set_attrs = SetAttr {
            mtime_ns: changes.mtime_ns.filter(|_| !state.dirty.is_empty()),
            ..SetAttr::default()
        };
        self.mirror(&file, &state.dirty);
        Ok(state.seen_attr())
    }

    /// Creates a regular file and opens it (`flags` as for `open`).
    pub async fn create(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        flags: i32,
    ) -> FsResult<(Attr, FileHandle)> {
        self.check_writable_mount()?;
        let access = Access::from_flags(flags)?;
        let node = NewNode {
            kind: FileKind::File,
            mode,
            uid,
            gid,
            rdev: 0,
        };
        // The new file takes its directory's write policy (the engine copies it).
        let write_through = self.write_through(parent).await?;
        self.dir_leases.adding(parent, name);
        let renamed = self.renamed_count();
        let attr = self.made_in(
            parent,
            self.meta.create(self.session, parent, name, &node).await,
        )?;
        // A file made just now has no capability: its first write need not ask.
        self.xattr_absence.saw_absent(attr.ino, CAPABILITY_XATTR);
        self.xattr_absence.saw_write_policy(attr.ino, write_through);
        let file = self.attach(attr, renamed, None).await;
        file.state.lock().await.dirty.write_through = write_through;
        Ok((attr, self.add_handle(file, access)))
    }

    /// Creates a regular file (not opened), FIFO, socket or device node.
    #[allow(clippy::too_many_arguments)]
    pub async fn mknod(
        &self,
        parent: Ino,
        name: &[u8],
        kind: FileKind,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
    ) -> FsResult<Attr> {
        self.check_writable_mount()?;
        if matches!(kind, FileKind::Dir | FileKind::Symlink) {
            return Err(FsError::Invalid(
                "mknod makes neither directories nor symlinks".into(),
            ));
        }
        let node = NewNode {
            kind,
            mode,
            uid,
            gid,
            rdev,
        };
        self.dir_leases.adding(parent, name);
        self.made_in(parent, self.meta.mknod(parent, name, &node).await)
    }

    pub async fn mkdir(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        self.check_writable_mount()?;
        self.dir_leases.adding(parent, name);
        let attr = self.made_in(parent, self.meta.mkdir(parent, name, mode, uid, gid).await)?;
        self.take_dir_lease(attr.ino).await;
        Ok(attr)
    }

    /// Asks for the lease of `dir`, which this mount just made, before the kernel hears of it
    /// (so before any name this mount adds to it); a refusal or failure only costs the lease.
    async fn take_dir_lease(&self, dir: Ino) {
        if !self.config.dir_leases {
            return;
        }
        let Some(generation) = self.dir_leases.asking(dir) else {
            return;
        };
        let sent = std::time::Instant::now();
        let granted = match self.meta.take_dir_lease(self.session, dir).await {
            Ok(granted) => granted,
            Err(error) => {
                tracing::debug!(dir, %error, "directory lease not taken");
                false
            }
        };
        self.dir_leases.answered(dir, generation, sent, granted);
    }

    /// Removes a name. An open file lives on (the engine counts this session's handles), so its
    /// handles keep reading and writing it until they are released.
    pub async fn unlink(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        self.check_writable_mount()?;
        let outcome = self.renaming(self.meta.unlink(parent, name).await);
        self.dir_attrs.forget(parent);
        self.changed(outcome)
    }

    pub async fn rmdir(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        self.check_writable_mount()?;
        self.changed_dirs(self.meta.rmdir(parent, name).await)
    }

    /// `flags`: 0, `RENAME_NOREPLACE` or `RENAME_EXCHANGE`.
    pub async fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        self.check_writable_mount()?;
        self.dir_leases.adding(new_parent, new_name);
        if flags & libc::RENAME_EXCHANGE != 0 {
            self.dir_leases.adding(parent, name);
        }
        let renamed = match self
            .meta
            .rename(parent, name, new_parent, new_name, flags)
            .await
        {
            Ok(renamed) if renamed.moved != 0 => renamed,
            // The engine did not say which inodes changed: forget everything.
            outcome => return self.changed_dirs(outcome.map(drop)),
        };
        // Only the two directories and the inodes the rename moved or replaced changed: what
        // the mount knows of other directories and closed files stays (`pip` and `compileall`
        // rename every file they write, each a `stat` of the others away). Open files ask again,
        // as after any rename.
        let count = self.count_change();
        for ino in [renamed.moved].into_iter().chain(renamed.other) {
            self.dir_attrs.forget(ino);
            self.closed_attrs.forget(ino, count);
        }
        // A file moved (over another file or not): the directories keep their link counts, and
        // their mtime and ctime are the file's new ctime (one clock reading in the engine), as
        // after a create. The file's own attributes are the rename's answer, read after it.
        let file_moved = renamed
            .attr
            .filter(|attr| attr.kind != FileKind::Dir && flags & libc::RENAME_EXCHANGE == 0);
        match file_moved {
            Some(attr) => {
                self.dir_attrs.made_in(parent, &attr);
                self.dir_attrs.made_in(new_parent, &attr);
                if self.open_file(attr.ino).is_none() {
                    self.closed_attrs
                        .closed(attr, std::time::Instant::now(), count);
                }
            }
            None => {
                self.dir_attrs.forget(parent);
                self.dir_attrs.forget(new_parent);
            }
        }
        self.changed(Ok(()))
    }

    pub async fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> FsResult<Attr> {
        self.check_writable_mount()?;
        self.dir_leases.adding(new_parent, new_name);
        let outcome = self.renaming(self.meta.link(ino, new_parent, new_name).await);
        self.dir_attrs.forget(new_parent);
        Ok(self.local_attr(self.changed(outcome)?))
    }

    pub async fn symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        self.check_writable_mount()?;
        self.dir_leases.adding(parent, name);
        self.made_in(
            parent,
            self.meta.symlink(parent, name, target, uid, gid).await,
        )
    }

    pub async fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        self.meta.readlink(ino).await
    }

    /// Up to `limit` entries after `after_cookie` (0: from the start), without `.` and `..`.
    pub async fn readdir(
        &self,
        ino: Ino,
        after_cookie: u64,
        limit: u32,
    ) -> FsResult<Vec<DirEntry>> {
        let mut entries = self.meta.readdir(ino, after_cookie, limit).await?;
        for entry in &mut entries {
            entry.attr = self.local_attr(entry.attr);
            if entry.has_xattrs == Some(false) {
                self.xattr_absence.saw_none(entry.attr.ino);
            }
        }
        Ok(entries)
    }

    /// Opens a directory handle for a listing (`opendir`).
    pub fn opendir(&self) -> FileHandle {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.listings().insert(fh, Listing::default());
        fh
    }

    /// Forgets a directory handle's listing (`releasedir`).
    pub fn releasedir(&self, fh: FileHandle) {
        self.listings().remove(&fh);
    }

    fn listings(&self) -> std::sync::MutexGuard<'_, HashMap<FileHandle, Listing>> {
        self.listings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entries of directory `ino` after cookie `after`, for directory handle `fh`, and
    /// whether they reach the end of the directory: served from the handle's buffered engine page
    /// while it covers `after`, else from a new page. Entries come in cookie order; an entry that
    /// existed throughout the listing is returned once (cookies are fixed for an entry's life).
    pub async fn readdir_at(
        &self,
        fh: FileHandle,
        ino: Ino,
        after: u64,
    ) -> FsResult<(Vec<DirEntry>, bool)> {
        // From the start (a new listing, or rewinddir) the directory is read afresh, and so is a
        // page older than the attribute TTL.
        let ttl = self.config.capability_absence_ttl;
        let fresh_enough =
            |listing: &Listing| after > 0 && listing.fetched.is_some_and(|at| at.elapsed() < ttl);
        let buffered: Option<(Vec<DirEntry>, bool)> = {
            let mut listings = self.listings();
            match listings.get_mut(&fh) {
                Some(listing) if fresh_enough(listing) => {
                    let covers = listing.after <= after
                        && listing
                            .entries
                            .back()
                            .is_some_and(|last| last.cookie > after);
                    let exhausted = listing
                        .entries
                        .back()
                        .is_none_or(|last| last.cookie <= after);
                    if covers {
                        while listing.entries.front().is_some_and(|e| e.cookie <= after) {
                            listing.entries.pop_front();
                        }
                        listing.after = after;
                        Some((listing.entries.iter().cloned().collect(), listing.end))
                    } else if listing.end && listing.after <= after && exhausted {
                        Some((Vec::new(), true))
                    } else {
                        None
                    }
                }
                _ => None,
            }
        };
        if let Some((mut entries, end)) = buffered {
            // Sizes this mount has written since the page was read.
            for entry in &mut entries {
                entry.attr = self.local_attr(entry.attr);
            }
            return Ok((entries, end));
        }
        let entries = self.readdir(ino, after, LISTING_PAGE).await?;
        let end = entries.len() < LISTING_PAGE as usize;
        if let Some(listing) = self.listings().get_mut(&fh) {
            *listing = Listing {
                after,
                entries: entries.iter().cloned().collect(),
                end,
                fetched: Some(std::time::Instant::now()),
            };
        }
        Ok((entries, end))
    }

    /// [`Fs::getxattr`] when this mount remembers the attribute absent (the kernel asks for
    /// `security.capability` before every write).
    pub fn getxattr_here(&self, ino: Ino, name: &[u8]) -> Option<FsResult<Vec<u8>>> {
        self.xattr_absence.known_absent(ino, name).then(|| {
            Err(FsError::Meta {
                op: "getxattr",
                errno: libc::ENODATA,
                message: "no such attribute (remembered)".into(),
            })
        })
    }

    pub async fn getxattr(&self, ino: Ino, name: &[u8]) -> FsResult<Vec<u8>> {
        if let Some(answer) = self.getxattr_here(ino, name) {
            return answer;
        }
        let value = self.meta.getxattr(ino, name).await;
        if matches!(&value, Err(e) if e.errno() == libc::ENODATA) {
            self.xattr_absence.saw_absent(ino, name);
        }
        value
    }

    /// `flags`: 0, `XATTR_CREATE` or `XATTR_REPLACE`.
    pub async fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: u32) -> FsResult<()> {
        self.check_writable_mount()?;
        self.xattr_absence.forget(ino);
        let set = self.changed(self.renaming(self.meta.setxattr(ino, name, value, flags).await));
        self.dir_attrs.forget(ino);
        // Again: a listing answered meanwhile may have said "none" from before the change.
        self.xattr_absence.forget(ino);
        set
    }

    /// [`Fs::listxattr`] when this mount remembers the file has none.
    pub fn listxattr_here(&self, ino: Ino) -> Option<Vec<Vec<u8>>> {
        self.xattr_absence.known_none(ino).then(Vec::new)
    }

    pub async fn listxattr(&self, ino: Ino) -> FsResult<Vec<Vec<u8>>> {
        if let Some(names) = self.listxattr_here(ino) {
            return Ok(names);
        }
        self.meta.listxattr(ino).await
    }

    pub async fn removexattr(&self, ino: Ino, name: &[u8]) -> FsResult<()> {
        self.check_writable_mount()?;
        self.xattr_absence.forget(ino);
        let removed = self.changed(self.renaming(self.meta.removexattr(ino, name).await));
        self.dir_attrs.forget(ino);
        self.xattr_absence.forget(ino);
        removed
    }

    pub async fn statfs(&self) -> FsResult<StatFs> {
        self.meta.statfs().await
    }

    // --- open files ---

    /// Registers one more handle of this mount on a file the engine already counts as open.
    /// A file already open here has its view refreshed: close-to-open means an `open` sees
    /// every commit made before it, from any mount.
    /// `renamed`: [`Fs::renamed`] as it was before the engine answered `attr`.
    /// `first_chunk`: chunk 0 as the engine answered it with `attr`, kept only for a file this
    /// mount had not open (with a handle open here, a commit of this mount may be newer).
    async fn attach(
        &self,
        attr: Attr,
        renamed: u64,
        first_chunk: Option<Vec<Slice>>,
    ) -> Arc<OpenFile> {
        // Open again: the file's own state answers from now on, and its next close leaves newer
        // attributes.
        self.closed_attrs.opened(attr.ino);
        let (file, is_new) = {
            let mut files = self.files();
            let mut is_new = false;
            let file = files
                .entry(attr.ino)
                .or_insert_with(|| {
                    is_new = true;
                    Arc::new(OpenFile {
                        ino: attr.ino,
                        handles: AtomicUsize::new(0),
                        dirty_end: AtomicU64::new(0),
                        set_attrs: std::sync::Mutex::new(SetAttr::default()),
                        state: tokio::sync::Mutex::new(FileState {
                            attr,
                            attr_read: Some((std::time::Instant::now(), renamed)),
                            dirty: DirtyFile::default(),
                            chunks: first_chunk
                                .map(|slices| (0, Arc::new(slices)))
                                .into_iter()
                                .collect(),
                        }),
                    })
                })
                .clone();
            file.handles.fetch_add(1, Ordering::AcqRel);
            (file, is_new)
        };
        if !is_new {
            let mut state = file.state.lock().await;
            state.engine_says(attr, renamed);
            state.chunks.clear();
        }
        file
    }

    /// Drops one handle of this mount on a file; forgets the file with its last handle.
    fn detach(&self, file: &Arc<OpenFile>) -> bool {
        let mut files = self.files();
        let left = file
            .handles
            .fetch_sub(1, Ordering::AcqRel)
            .saturating_sub(1);
        if left == 0 {
            files.remove(&file.ino);
        }
        left == 0
    }

    fn add_handle(&self, file: Arc<OpenFile>, access: Access) -> FileHandle {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(Handle {
            file,
            readable: access.readable,
            writable: access.writable,
            append: access.append,
            next_sequential: AtomicU64::new(0),
        });
        self.handles().insert(fh, handle);
        fh
    }

    /// Opens a regular file. `flags` are the `open(2)` flags: the access mode, `O_APPEND`
    /// (writes go to the end of the file as this mount sees it) and `O_TRUNC`.
    pub async fn open(&self, ino: Ino, flags: i32) -> FsResult<(FileHandle, Attr)> {
        let access = Access::from_flags(flags)?;
        if access.writable {
            self.check_writable_mount()?;
        }
        let renamed = self.renamed_count();
        // A reader's first read needs chunk 0: the open brings it (one call, not two).
        let Opened { attr, first_chunk } = self
            .meta
            .open(self.session, ino, access.readable && !access.truncate)
            .await?;
        if attr.kind != FileKind::File {
            self.release_quietly(ino).await;
            return Err(match attr.kind {
                FileKind::Dir => FsError::IsDirectory(ino),
                _ => FsError::NotRegularFile(ino),
            });
        }
        let file = self.attach(attr, renamed, first_chunk).await;
        if access.writable {
            match self.write_through(ino).await {
                Ok(through) => file.state.lock().await.dirty.write_through = through,
                Err(e) => {
                    self.detach(&file);
                    self.release_quietly(ino).await;
                    return Err(e);
                }
            }
        }
        let attr = if access.truncate {
            let truncated = {
                let mut state = file.state.lock().await;
                match self.flush_locked(&file, &mut state).await {
                    Ok(()) => {
                        let changes = SetAttr {
                            size: Some(0),
                            ..SetAttr::default()
                        };
                        let renamed = self.renamed_count();
                        self.meta.setattr(ino, &changes).await.inspect(|attr| {
                            state.engine_says(*attr, renamed);
                            state.chunks.clear();
                        })
                    }
                    Err(e) => Err(e),
                }
            };
            match truncated {
                Ok(attr) => attr,
                Err(e) => {
                    self.detach(&file);
                    self.release_quietly(ino).await;
                    return Err(e);
                }
            }
        } else {
            attr
        };
        let attr = self.local_attr(attr);
        Ok((self.add_handle(file, access), attr))
    }

    /// Whether `ino`'s write policy says `through` (`stagefs policy`): its blocks then go to the
    /// object store before a flush returns. Cached for the attribute TTL.
    async fn write_through(&self, ino: Ino) -> FsResult<bool> {
        if let Some(known) = self.xattr_absence.write_through(ino) {
            return Ok(known);
        }
        let through = match self
            .meta
            .getxattr(ino, shared::meta::WRITE_POLICY_XATTR)
            .await
        {
            Ok(value) => value == b"through",
            Err(e) if e.errno() == libc::ENODATA => false,
            Err(e) => return Err(e),
        };
        self.xattr_absence.saw_write_policy(ino, through);
        Ok(through)
    }

    /// Gives back a handle the engine counted, when opening failed after all: at once, as the
    /// failed `open` is answered after it (no window to wait for).
    async fn release_quietly(&self, ino: Ino) {
        if let Err(e) = self.meta.release(self.session, &[ino]).await {
            tracing::warn!(ino, error = %e, "releasing a handle of a failed open");
        }
    }

    /// Up to `size` bytes at `offset`; fewer at the end of the file. Holes and bytes no slice
    /// covers read as zeros; this mount's uncommitted writes show.
    pub async fn read(&self, fh: FileHandle, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let handle = self.handle(fh)?;
        if !handle.readable {
            return Err(FsError::WrongAccess {
                fh,
                access: "reading",
            });
        }
        let file = &handle.file;
        let sequential = handle.next_sequential.load(Ordering::Relaxed) == offset;
        let (mut buf, fetches, overlay, prefetch) = {
            let mut state = file.state.lock().await;
            let file_size = state.size();
            if offset >= file_size || size == 0 {
                return Ok(Vec::new());
            }
            let len = u64::from(size).min(file_size - offset);
            let mut fetches = Vec::new();
            for piece in chunk_pieces(offset, len) {
                let slices = self
                    .chunk_slices(file.ino, &mut state, piece.chunk_index)
                    .await?;
                fetches.extend(plan_chunk(&slices, &piece, file.ino));
            }
            let overlay = state.dirty.overlay(offset, len);
            let prefetch = if sequential && self.config.readahead_blocks > 0 {
                let ahead_start = offset + len;
                let ahead_len = (self.config.readahead_blocks * BLOCK_SIZE)
                    .min(file_size.saturating_sub(ahead_start));
                let mut keys = Vec::new();
                for piece in chunk_pieces(ahead_start, ahead_len) {
                    let slices = self
                        .chunk_slices(file.ino, &mut state, piece.chunk_index)
                        .await?;
                    keys.extend(
                        plan_chunk(&slices, &piece, file.ino)
                            .into_iter()
                            .map(|f| (f.key, f.home)),
                    );
                }
                keys.dedup();
                keys
            } else {
                Vec::new()
            };
            (vec![0u8; len as usize], fetches, overlay, prefetch)
        };
        // Blocks are fetched without the file's lock: they are immutable, so a commit landing
        // meanwhile cannot change what this read resolved.
        self.fetcher.fill(&fetches, sequential, &mut buf).await?;
        for (at, bytes) in overlay {
            if let Some(target) = buf.get_mut(at..at + bytes.len()) {
                target.copy_from_slice(&bytes);
            }
        }
        for (key, home) in prefetch {
            self.fetcher.prefetch(key, home);
        }
        handle
            .next_sequential
            .store(offset + buf.len() as u64, Ordering::Relaxed);
        Ok(buf)
    }

    /// The slices of one chunk, from the engine unless already known since the last change.
    async fn chunk_slices(
        &self,
        ino: Ino,
        state: &mut FileState,
        chunk_index: u64,
    ) -> FsResult<Arc<Vec<Slice>>> {
        if let Some(slices) = state.chunks.get(&chunk_index) {
            return Ok(slices.clone());
        }
        let slices = Arc::new(self.meta.read_chunk(ino, chunk_index).await?);
        state.chunks.insert(chunk_index, slices.clone());
        Ok(slices)
    }

    /// Writes `data` at `offset` (at the end for `O_APPEND` handles) into the file's dirty
    /// data; full blocks start streaming to the gateway at once. Durable only after `flush`,
    /// `fsync` or `release`.
    pub async fn write(&self, fh: FileHandle, offset: u64, data: &[u8]) -> FsResult<u32> {
        let handle = self.handle(fh)?;
        if !handle.writable {
            return Err(FsError::WrongAccess {
                fh,
                access: "writing",
            });
        }
        self.check_writable_mount()?;
        let len = u32::try_from(data.len())
            .map_err(|_| FsError::Invalid(format!("write of {} bytes", data.len())))?;
        let file = &handle.file;
        let mut state = file.state.lock().await;
        let offset = if handle.append { state.size() } else { offset };
        match offset.checked_add(u64::from(len)) {
            Some(end) if end <= MAX_FILE_SIZE => {}
            _ => {
                return Err(FsError::FileTooLarge {
                    offset,
                    len: u64::from(len),
                })
            }
        }
        if len == 0 {
            return Ok(0);
        }
        let over_limit = |dirty: &DirtyFile| {
            dirty.bytes() >= self.config.max_dirty_bytes_per_file
                || dirty.slice_count() >= self.config.max_dirty_slices_per_file
        };
        if over_limit(&state.dirty) {
            // The flush after an earlier write failed: take nothing more until it succeeds, and
            // say so before taking these bytes, so that an error always means "not written".
            self.flush_locked(file, &mut state).await?;
        }
        state
            .dirty
            .write(&self.writer, file.ino, offset, data)
            .await;
        // A write after `utimensat` moves the mtime on again.
        state.dirty.set_attrs.mtime_ns = None;
        self.mirror(file, &state.dirty);
        if over_limit(&state.dirty) {
            if let Err(e) = self.flush_locked(file, &mut state).await {
                // These bytes are taken: the error is the next write's, fsync's or close's.
                tracing::debug!(ino = file.ino, error = %e, "flush at the dirty limit failed; kept");
            }
        }
        Ok(len)
    }

    /// Commits everything written to the handle's file (`close` calls this): returns once it
    /// is durable on the gateway and visible to every mount that opens the file afterwards,
    /// with every namespace change this mount made before.
    pub async fn flush(&self, fh: FileHandle) -> FsResult<()> {
        let handle = self.handle(fh)?;
        let mut state = handle.file.state.lock().await;
        self.flush_durably(&handle.file, &mut state).await
    }

    /// `close` of a handle (FUSE flush): [`Fs::flush`] for a handle opened for writing. One
    /// opened read-only wrote nothing to commit, and its close promises nothing durable
    /// (SEMANTICS), so it costs no call (`python3 -m venv` reads back every module it installs).
    pub async fn close(&self, fh: FileHandle) -> FsResult<()> {
        if !self.handle(fh)?.writable {
            return Ok(());
        }
        self.flush(fh).await
    }

    /// Like [`Fs::flush`]: data and size are committed together, so `fdatasync` is no cheaper.
    pub async fn fsync(&self, fh: FileHandle, _datasync: bool) -> FsResult<()> {
        self.flush(fh).await
    }

    /// Sets, changes or drops a lock of `owner` on the handle's file over bytes `start..=end`
    /// (`fcntl(F_SETLK)`, `F_SETLKW` with `wait`, and `flock` as a whole-file lock). The lock is
    /// held by the metadata engine, so it holds against every mount.
    /// `fcntl(F_SETLK[W])` or `flock`; `waiter` is the thread that asks (the FUSE request's
    /// pid; 0: unknown), whose signals end a wait with EINTR.
    pub async fn setlk(
        &self,
        fh: FileHandle,
        lock: &LockRequest,
        wait: bool,
        waiter: u32,
    ) -> FsResult<()> {
        let ino = self.handle(fh)?.file.ino;
        self.locks.set(ino, lock, wait, waiter).await
    }

    /// Another owner's lock that keeps `lock` from being taken (`fcntl(F_GETLK)`), on any mount.
    pub async fn getlk(&self, fh: FileHandle, lock: &LockRequest) -> FsResult<Option<HeldLock>> {
        let ino = self.handle(fh)?.file.ino;
        self.locks.get(ino, lock).await
    }

    /// A `close` by lock owner `owner` (FUSE flush): its locks on the file go, as Linux drops a
    /// process's POSIX locks on a file when it closes any descriptor of it.
    pub async fn close_by(&self, fh: FileHandle, owner: u64) {
        if let Ok(handle) = self.handle(fh) {
            self.locks.closed_by(handle.file.ino, owner).await;
        }
    }

    /// Closes a handle: commits the file's data, then gives the handle back to the engine within
    /// the release window (the last one of an unlinked file removes it). A flush error is
    /// returned, and the handle is gone either way. The locks of `lock_owner` (a `flock` owner)
    /// go, and with the mount's last handle on the file, every lock the mount holds on it.
    pub async fn release(&self, fh: FileHandle, lock_owner: Option<u64>) -> FsResult<()> {
        let handle = self.handles().remove(&fh).ok_or(FsError::BadHandle(fh))?;
        let file = &handle.file;
        // Data a failed `close` left uncommitted goes now. Nobody waits for a release (the
        // kernel sends it after the last `close` returned), so it promises nothing about the
        // namespace: `close` and `fsync` do that.
        let flushed = {
            let mut state = file.state.lock().await;
            self.flush_locked(file, &mut state).await
        };
        if let Some(owner) = lock_owner {
            self.locks.closed_by(file.ino, owner).await;
        }
        self.releases.give_back(file.ino).await;
        if self.detach(file) {
            self.locks.last_close(file.ino).await;
            let state = file.state.lock().await;
            if state.dirty.is_empty() {
                if let Some((read_at, renamed)) = state.attr_read {
                    self.closed_attrs
                        .closed(state.seen_attr(), read_at, renamed);
                }
            } else {
                tracing::error!(
                    ino = file.ino,
                    bytes = state.dirty.bytes(),
                    attributes = ?state.dirty.set_attrs,
                    error = ?flushed.as_ref().err(),
                    "last handle closed with data (and the attributes set on it) that could not be committed; it is lost"
                );
            }
        }
        flushed
    }

    /// Commits every open file, releases every handle and closes the session (unmount).
    pub async fn shutdown(&self) -> FsResult<()> {
        let handles: Vec<FileHandle> = self.handles().keys().copied().collect();
        let mut first_error = None;
        for fh in handles {
            if let Err(e) = self.release(fh, None).await {
                first_error.get_or_insert(e);
            }
        }
        // Closing the session would give the handles back too; sent first, the gathered
        // releases do not fail against a closed session, and later ones are not sent.
        self.releases.close().await;
        if let Err(e) = self.meta.close_session(self.session).await {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        if let Some(heartbeat) = &self.heartbeat {
            heartbeat.abort();
        }
        if let Some(keeper) = &self.lease_keeper {
            keeper.abort();
        }
    }
}
