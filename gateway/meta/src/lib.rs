//! stagefs metadata: the file-system types, the [`MetaEngine`] contract, the POSIX rules written
//! once ([`rules`]) over a transactional key-value contract ([`kv`]), and its backends: redb,
//! embedded ([`redb_kv`]), and PostgreSQL, shared by many gateways ([`postgres_kv`]).
//!
//! [`MetaEngine`] is the contract the gRPC `Meta` service and the FUSE client's file-system core are
//! written against (DESIGN.md, "Metadata"). Every method is one transaction: it either happens
//! completely or not at all, so a gateway killed mid-call never leaves a half-renamed tree. Adding
//! an operation touches the contract, the rules, the wire mapping and the client; never a backend.
//!
//! Data model (DESIGN.md, "Data model"): a regular file is a list of 64 MiB chunks; each chunk is a
//! list of [`Slice`]s in commit order, later ones shadowing earlier ones where they overlap. A slice
//! with id 0 is a *hole*: it reads as zeros and owns no data (truncate uses it to hide bytes past a
//! cut, so growing the file again later shows zeros, not the old bytes).
//!
//! Data cleanup: whenever a slice stops being visible anywhere (its file was deleted, truncated
//! away, or every byte of it was overwritten by later slices), or a client session dies with slices
//! it staged but never committed, the slice enters the *deleted data* queue with a due time. The
//! gateway takes due entries ([`MetaEngine::take_due_deleted_slices`]), drops the staged blocks and
//! deletes uploaded objects, then acknowledges them ([`MetaEngine::ack_deleted_slices`]).
//!
//! Sessions: each client mount opens a session and heartbeats it. Open file handles and slices that
//! are staged but not committed belong to a session, so when a client dies its open-but-unlinked
//! files are finally removed and its orphaned slices cleaned up by [`MetaEngine::close_session`].

pub mod blocking;
mod codec;
pub mod dump;
pub mod keys;
pub mod kv;
pub mod locks;
pub mod once;
pub mod pg_cluster;
pub mod postgres_kv;
pub mod redb_kv;
pub mod redb_region;
pub mod rules;
#[cfg(test)]
mod tests;

use std::ops::Range;
use std::time::Duration;

pub use kv::KvError;
pub use locks::{HeldLock, LockKind, LockRequest};
pub use rules::{KvMeta, MAX_SESSION_DESCRIPTION, MAX_SLICE_IDS_AT_ONCE};

pub use shared::meta::{
    now_ns, Attr, CommitAttrs, DirEntry, FileKind, GatewayId, Ino, MountView, NewNode, Renamed,
    SessionId, SetAttr, Slice, StatFs, TimeNs, DIR_LEASE_RECALL_WAIT, DIR_LEASE_TERM,
    MAX_DIR_LEASES_PER_CALL, MAX_FILE_SIZE, MAX_LINKS, MAX_NAME_LEN, MAX_SYMLINK_LEN,
    MAX_VIEW_GATEWAYS, MAX_XATTR_NAME_LEN, MAX_XATTR_VALUE_LEN, ROOT_INO, WRITE_POLICY_XATTR,
};

/// A slice whose data is no longer referenced and must be deleted from staging and the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeletedSlice {
    pub slice_id: u64,
    pub len: u32,
    pub gateway_id: GatewayId,
    /// Not to be deleted before this time (the configured delay protects in-flight readers).
    pub due_ns: TimeNs,
}

impl DeletedSlice {
    /// The object keys of this slice's blocks: cut into blocks of at most [`shared::BLOCK_SIZE`].
    pub fn block_keys(&self) -> Vec<shared::BlockKey> {
        shared::meta::slice_block_keys(self.slice_id, self.len)
    }
}

/// What `du` counts below a directory: each directory keeps statistics of its own children,
/// and these are their sums over the directories below.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirUsage {
    /// Non-directories, each counted once: in the directory of the name it was created under
    /// (or renamed with).
    pub files: u64,
    /// Directories below, not counting the one asked about.
    pub dirs: u64,
    /// Bytes of the regular files (their sizes, holes included).
    pub bytes: u64,
}

/// What one tenant owns: the inodes its sessions created with `create` (regular files made
/// through a mount), and their bytes (sizes). Nodes made otherwise (directories, symlinks,
/// `mknod`) and those of gateways without tenants belong to the tenant named "".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantUsage {
    pub tenant: String,
    pub files: u64,
    pub bytes: u64,
}

/// A gateway as the registry knows it (DESIGN.md, "Scale-out and takeover").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRecord {
    /// From the gateway's device superblock: it moves with the device.
    pub id: GatewayId,
    /// Where clients reach it (`--advertise`).
    pub address: String,
    /// Rises on every start of this id, so a process that finds a higher one knows another took
    /// its device over.
    pub epoch: u64,
    pub last_heartbeat_ns: TimeNs,
    /// What it held not yet uploaded at its last heartbeat.
    pub staged_blocks: u64,
    pub staged_bytes: u64,
    /// Blocks waiting for their upload, and how long the oldest has waited, at its last
    /// heartbeat.
    pub queue_len: u64,
    pub oldest_waiting_ms: u64,
    /// False once its device or a task of its own failed (it then exits for a restart).
    pub healthy: bool,
    /// A gateway of a mirror region (`serve --source`): it holds the blocks its own region's
    /// mounts stage, and other regions' mounts stage nothing on it.
    pub mirror: bool,
}

/// What a gateway reports with each heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayLoad {
    pub staged_blocks: u64,
    pub staged_bytes: u64,
    pub queue_len: u64,
    pub oldest_waiting_ms: u64,
    pub healthy: bool,
    /// It serves a mirror region ([`GatewayRecord::mirror`]).
    pub mirror: bool,
}

/// How `rename` treats an existing target (Linux `renameat2` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameMode {
    /// Replace the target if it exists (plain `rename`).
    Replace,
    /// `RENAME_NOREPLACE`: fail with EEXIST if the target exists.
    NoReplace,
    /// `RENAME_EXCHANGE`: swap source and target atomically; both must exist.
    Exchange,
}

impl RenameMode {
    /// From the `flags` of `renameat2` as FUSE passes them; unknown flags (such as
    /// `RENAME_WHITEOUT`) and contradicting ones are EINVAL.
    pub fn from_flags(flags: u32) -> Result<Self, MetaError> {
        match flags {
            0 => Ok(RenameMode::Replace),
            libc::RENAME_NOREPLACE => Ok(RenameMode::NoReplace),
            libc::RENAME_EXCHANGE => Ok(RenameMode::Exchange),
            other => Err(MetaError::Invalid(format!(
                "unsupported rename flags {other:#x}"
            ))),
        }
    }
}

/// How `setxattr` treats an existing attribute (Linux `XATTR_CREATE` / `XATTR_REPLACE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrMode {
    /// Create or replace.
    Upsert,
    /// `XATTR_CREATE`: fail with EEXIST if it exists.
    Create,
    /// `XATTR_REPLACE`: fail with ENODATA if it does not exist.
    Replace,
}

impl XattrMode {
    pub fn from_flags(flags: u32) -> Result<Self, MetaError> {
        match flags as i32 {
            0 => Ok(XattrMode::Upsert),
            libc::XATTR_CREATE => Ok(XattrMode::Create),
            libc::XATTR_REPLACE => Ok(XattrMode::Replace),
            other => Err(MetaError::Invalid(format!(
                "unsupported xattr flags {other:#x}"
            ))),
        }
    }
}

/// A client session as the engine records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: SessionId,
    /// The tenant that opened it (empty when the gateway authenticates nobody): only that
    /// tenant's calls may use it.
    pub tenant: String,
    pub last_heartbeat_ns: TimeNs,
    /// Free text from the client (host, mount point, version), for `status`.
    pub description: String,
    /// The gateways the client last said it uses (see [`MetaEngine::heartbeat`]).
    pub view: MountView,
}

/// Tunables of an engine.
#[derive(Debug, Clone)]
pub struct MetaConfig {
    /// How long deleted data waits before it is due for removal, so readers that resolved a slice
    /// just before it was deleted can still fetch its blocks.
    pub deleted_data_delay: Duration,
    /// ENOSPC past this many bytes of file data.
    pub capacity_bytes: Option<u64>,
    /// ENOSPC past this many inodes.
    pub max_files: Option<u64>,
    /// Every operation is durable before it returns (the durability contract); concurrent
    /// operations share one fsync (group commit). Tests that only need one process's view may
    /// turn it off to run faster.
    pub sync_commits: bool,
    /// Page cache of the embedded (redb) database; `None`: redb's default of 1 GiB.
    pub redb_cache_bytes: Option<usize>,
    /// Namespace changes (create, mknod, mkdir, symlink, link, unlink, rmdir, rename, setattr,
    /// setxattr, removexattr) return once committed and visible, before they are durable; the
    /// next durable commit carries them: a slice commit (an fsync or close that wrote data),
    /// [`MetaEngine::sync`], or the backend's own flush shortly after (redb: within
    /// [`redb_kv::EVENTUAL_FLUSH`]). A crash loses a suffix of them, never a change a durable
    /// commit came after, and never data a file names (slices are committed durably). What a
    /// local file system promises without fsync; README's SEMANTICS section says it per
    /// operation.
    pub lazy_namespace: bool,
    /// How long an eventual commit waits at most for a durable commit when nothing asks for one
    /// (redb; see [`MetaConfig::lazy_namespace`]).
    pub eventual_flush: Duration,
}

impl Default for MetaConfig {
    fn default() -> Self {
        MetaConfig {
            deleted_data_delay: Duration::from_secs(3600),
            capacity_bytes: None,
            max_files: None,
            sync_commits: true,
            redb_cache_bytes: None,
            lazy_namespace: false,
            eventual_flush: redb_kv::EVENTUAL_FLUSH,
        }
    }
}

/// Everything that can go wrong in the metadata engine; [`MetaError::errno`] is what the file
/// system returns to applications.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("no entry {name:?} in directory {parent}")]
    NoSuchEntry { parent: Ino, name: String },
    #[error("no inode {0}")]
    NoSuchInode(Ino),
    #[error("{name:?} already exists in directory {parent}")]
    AlreadyExists { parent: Ino, name: String },
    #[error("inode {0} is not a directory")]
    NotADirectory(Ino),
    #[error("inode {0} is a directory")]
    IsADirectory(Ino),
    #[error("directory {0} is not empty")]
    DirectoryNotEmpty(Ino),
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("name of {len} bytes is longer than {max}")]
    NameTooLong { len: usize, max: usize },
    #[error("cannot move directory {0} into its own subtree")]
    MoveIntoOwnSubtree(Ino),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
    /// The caller may read but not change the file system (a read-only token).
    #[error("read-only: {0}")]
    ReadOnly(String),
    #[error("inode {0} has too many links")]
    TooManyLinks(Ino),
    #[error("no extended attribute {name:?} on inode {ino}")]
    NoSuchXattr { ino: Ino, name: String },
    #[error("extended attribute {name:?} already exists on inode {ino}")]
    XattrExists { ino: Ino, name: String },
    #[error("extended attribute name of {len} bytes: must be 1..={max} bytes")]
    BadXattrName { len: usize, max: usize },
    #[error("extended attribute value of {len} bytes is larger than {max}")]
    XattrValueTooLarge { len: usize, max: usize },
    #[error("file size {0} is beyond the largest supported")]
    FileTooLarge(u64),
    #[error("no space: {0}")]
    NoSpace(String),
    #[error("session {0:032x} does not exist (expired or closed); open a new one and write again")]
    SessionGone(SessionId),
    #[error("slice {slice_id} was not recorded as pending for session {session:032x}")]
    SliceNotPending { session: SessionId, slice_id: u64 },
    #[error("session {session:032x} holds no open handle on inode {ino}")]
    NotOpen { session: SessionId, ino: Ino },
    #[error(
        "gateway {id} at epoch {epoch} was superseded by epoch {current}: another process took \
         over this gateway's device"
    )]
    Fenced {
        id: uuid::Uuid,
        epoch: u64,
        current: u64,
    },
    /// Another lock owner holds a conflicting lock (`F_SETLK` fails with EAGAIN).
    #[error("inode {ino}: bytes {start}..={end} are locked by another owner")]
    WouldBlock { ino: Ino, start: u64, end: u64 },
    #[error("inode {ino}: one owner may hold at most {max} separate lock ranges")]
    TooManyLocks { ino: Ino, max: usize },
    /// Another session holds the lease on directory `0` (an addition to it recalls the lease
    /// first, `rules/dir_leases`); a caller sees it only when the recall kept failing.
    #[error("directory {0} is leased to another mount, which did not give it back")]
    DirLeased(Ino),
    #[error("corrupt metadata record: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Backend(KvError),
}

impl MetaError {
    /// The Linux errno a file system returns for this error.
    pub fn errno(&self) -> i32 {
        use MetaError::*;
        match self {
            NoSuchEntry { .. } | NoSuchInode(_) => libc::ENOENT,
            AlreadyExists { .. } | XattrExists { .. } => libc::EEXIST,
            NotADirectory(_) => libc::ENOTDIR,
            IsADirectory(_) => libc::EISDIR,
            DirectoryNotEmpty(_) => libc::ENOTEMPTY,
            InvalidName { .. } | MoveIntoOwnSubtree(_) | Invalid(_) => libc::EINVAL,
            SliceNotPending { .. } => libc::EPERM,
            NotOpen { .. } => libc::EBADF,
            NameTooLong { .. } => libc::ENAMETOOLONG,
            NotPermitted(_) => libc::EPERM,
            ReadOnly(_) => libc::EROFS,
            TooManyLinks(_) => libc::EMLINK,
            NoSuchXattr { .. } => libc::ENODATA,
            BadXattrName { .. } => libc::ERANGE,
            FileTooLarge(_) => libc::EFBIG,
            XattrValueTooLarge { .. } => libc::E2BIG,
            NoSpace(_) => libc::ENOSPC,
            WouldBlock { .. } => libc::EAGAIN,
            TooManyLocks { .. } => libc::ENOLCK,
            DirLeased(_) => libc::EAGAIN,
            SessionGone(_) | Fenced { .. } | Corrupt(_) | Backend(_) => libc::EIO,
        }
    }

    /// Whether the same call may succeed if tried again unchanged: only passing trouble of the
    /// database. Everything else is an answer about the file system and will not change by itself.
    pub fn is_retryable(&self) -> bool {
        matches!(self, MetaError::Backend(error) if error.is_retryable())
    }

    /// A transaction lost a race with a concurrent one and left no trace: run it again.
    pub fn is_conflict(&self) -> bool {
        matches!(self, MetaError::Backend(KvError::Conflict(_)))
    }
}

pub type Result<T, E = MetaError> = std::result::Result<T, E>;

/// File-system metadata operations, each one transaction.
#[async_trait::async_trait]
pub trait MetaEngine: Send + Sync {
    /// The entry `name` of directory `parent`; `.` and `..` resolve too.
    async fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr>;
    async fn getattr(&self, ino: Ino) -> Result<Attr>;
    /// Changes attributes; a new `size` truncates or extends a regular file.
    async fn setattr(&self, ino: Ino, changes: &SetAttr) -> Result<Attr>;
    /// Creates a regular file and opens it for `session` in the same transaction (`creat`).
    async fn create(
        &self,
        session: SessionId,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
    ) -> Result<Attr>;
    /// Creates a regular file, FIFO, socket or device node. Directories and symlinks have their
    /// own calls.
    async fn mknod(&self, parent: Ino, name: &[u8], node: &NewNode) -> Result<Attr>;
    async fn mkdir(&self, parent: Ino, name: &[u8], mode: u32, uid: u32, gid: u32) -> Result<Attr>;
    async fn symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<Attr>;
    async fn readlink(&self, ino: Ino) -> Result<Vec<u8>>;
    /// Removes a name of a non-directory. The inode goes when its last name is gone and no
    /// session holds it open.
    async fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()>;
    async fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()>;
    async fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        mode: RenameMode,
    ) -> Result<Renamed>;
    /// A new name `new_parent/new_name` for the non-directory `ino`.
    async fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Result<Attr>;
    /// Up to `limit` entries of directory `ino` after `after_cookie` (0 = from the start), without
    /// `.` and `..`.
    async fn readdir(&self, ino: Ino, after_cookie: u64, limit: usize) -> Result<Vec<DirEntry>>;

    async fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>>;
    async fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], mode: XattrMode) -> Result<()>;
    async fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>>;
    async fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()>;

    async fn statfs(&self) -> Result<StatFs>;
    /// The file system's id, made (16 random bytes) the first time it is asked for: gateways
    /// claim the object store's prefix with it, so that two file systems never write one.
    async fn file_system_id(&self) -> Result<[u8; 16]>;
    /// What is below `ino` at any depth ([`DirUsage`]); for a non-directory, itself. Reads the
    /// statistics each directory keeps of its children, in one snapshot: the cost grows with
    /// the directories below, not the files.
    async fn dir_usage(&self, ino: Ino) -> Result<DirUsage>;
    /// Every tenant's usage totals ([`TenantUsage`]), in one snapshot; tenants that own nothing
    /// are left out.
    async fn tenant_usage(&self) -> Result<Vec<TenantUsage>>;
    /// Whether node `ino` lies in the tree of directory `root`: it is `root`, or one of its
    /// names is in `root` or a directory below it. A node with no name left counts while a
    /// session of `tenant` holds it open (it was in the tree when it was opened). What a tenant
    /// confined to `root` may reach; costs one read per directory between the node and `root`.
    async fn within(&self, root: Ino, ino: Ino, tenant: &str) -> Result<bool>;
    /// Where the backend's log stands ([`kv::KvStore::log_position`]): on a primary, at or
    /// after every change committed so far; on a replica (a mirror's hot standby), how far it
    /// has applied them. `None` for a backend without replicas (redb).
    async fn log_position(&self) -> Result<Option<u64>>;
    /// Waits until this replica has applied its primary's log up to `position` (what
    /// [`MetaEngine::log_position`] said there after a change), for at most `limit`: then the
    /// change reads back here. At once on a backend without replicas.
    async fn wait_position(&self, position: u64, limit: std::time::Duration) -> Result<()>;
    /// Returns once every change committed so far is durable (with
    /// [`MetaConfig::lazy_namespace`], namespace changes may return before): what `fsync` of a
    /// directory, or the close of a file whose creation wrote no data, asks for.
    async fn sync(&self) -> Result<()>;
    /// A read-only replica of another region's database (a hot standby): every change fails
    /// with EROFS, and what is read lags its primary by the replication delay.
    fn is_replica(&self) -> bool;
    /// How long ago the last change this replica applied was committed on its primary (the
    /// replication lag when the primary is busy; it grows while the primary is idle too).
    /// `None` on a primary or a backend without replicas.
    async fn replica_lag(&self) -> Result<Option<std::time::Duration>>;

    /// The slices of chunk `chunk_index` of file `ino`, in commit order (later shadows earlier).
    /// Bytes at or past the file's size are not part of the file, whatever a slice says.
    async fn read_chunk(&self, ino: Ino, chunk_index: u64) -> Result<Vec<Slice>>;
    /// Makes a staged slice part of the file: appended to the chunk, the file's size grown to at
    /// least `new_size` and the slice's end, `attrs` set (as `setattr` would; ctime is now), in
    /// one transaction. The slice must have been recorded with
    /// [`MetaEngine::record_pending_slice`] by the same live session; committing it again after a
    /// success is a no-op, so a commit whose answer was lost can be retried.
    async fn commit_slice(
        &self,
        session: SessionId,
        ino: Ino,
        chunk_index: u64,
        slice: &Slice,
        new_size: u64,
        attrs: &CommitAttrs,
    ) -> Result<Attr>;
    /// [`MetaEngine::commit_slice`] of a slice whose one block the caller has just staged itself
    /// after [`MetaEngine::check_slice_write`] (the gateway serving `WriteSlice`): the id may be
    /// still leased to the session rather than pending, and the commit then takes the lease.
    /// Never for a client's own `CommitSlice`: the pending record is what says its blocks were
    /// meant to be written, and a commit refused for want of one is how a client finds that it
    /// skipped them.
    async fn commit_written_slice(
        &self,
        session: SessionId,
        ino: Ino,
        chunk_index: u64,
        slice: &Slice,
        new_size: u64,
        attrs: &CommitAttrs,
    ) -> Result<Attr>;
    /// Slice compaction: swaps the slices `read[from..]` of a chunk for `merged`, one slice with
    /// the same bytes. `read` is the chunk's list as the compactor read it; `merged` was staged
    /// by `session` (recorded as pending), spans exactly what `read[from..]` spans, and holds
    /// the bytes all of `read` showed there. The swap happens only if the chunk still begins
    /// with `read` (slices committed since then stay after `merged`); the replaced slices, and
    /// any earlier one `merged` now hides, are queued for deletion. Otherwise (the chunk was
    /// overwritten, truncated or deleted meanwhile) nothing changes but `merged` is queued for
    /// deletion, and the answer is `false`. Size and times stay: the file's bytes are the same.
    async fn swap_compacted(
        &self,
        session: SessionId,
        ino: Ino,
        chunk_index: u64,
        read: &[Slice],
        from: usize,
        merged: &Slice,
    ) -> Result<bool>;
    /// `count` fresh slice ids, never handed out before and never again, leased to `session`:
    /// no other session may stage or commit them.
    async fn allocate_slice_ids(&self, session: SessionId, count: u64) -> Result<Range<u64>>;
    /// Records that `session` is staging `slice` (before its blocks are written), so the blocks
    /// are cleaned up if the session dies before committing it. Repeating it with a larger `len`
    /// grows the record. [`MetaError::NotPermitted`] unless the id was leased to `session` and
    /// not staged before (a committed id cannot be recorded again).
    async fn record_pending_slice(&self, session: SessionId, slice: &Slice) -> Result<()>;
    /// Like [`MetaEngine::record_pending_slice`], but returns before the record is durable; the
    /// next durable commit carries it. Only for a caller that then stages the slice's blocks and
    /// commits it into `ino` itself, without answering anyone in between (`WriteSlice`): should
    /// the engine crash first, the caller's client gets no answer and retries the whole write.
    /// Checks that `ino` is a regular file, so nothing is staged for a write that must fail.
    async fn record_pending_slice_lazily(
        &self,
        session: SessionId,
        ino: Ino,
        slice: &Slice,
    ) -> Result<()>;
    /// Whether `session` may stage `slice` for a commit into `ino` that follows at once
    /// (`WriteSlice`), without writing anything: the slice fits its chunk, the session is live,
    /// `ino` is a regular file, and the id is leased to the session (or recorded by it as
    /// pending). [`MetaError::NotPermitted`] when the id is not the session's to stage: not
    /// leased to it, or taken by a commit already (a retry whose first answer was lost, which
    /// the commit then answers). The commit ([`MetaEngine::commit_written_slice`]) takes the
    /// lease, so a `WriteSlice` is one write transaction; should it fail after the block was
    /// staged, the caller records the slice as pending, so that the block goes with the
    /// session.
    async fn check_slice_write(&self, session: SessionId, ino: Ino, slice: &Slice) -> Result<()>;

    /// Changes the byte-range locks of lock owner `request.owner` of `session` on `ino`, as
    /// `fcntl(F_SETLK)` does ([`locks::apply`]). [`MetaError::WouldBlock`] (EAGAIN) when another
    /// owner, of any session on any gateway, holds an overlapping lock and either is a write lock;
    /// nothing changes then. Locks are dropped by [`MetaEngine::release_locks`] and with their
    /// session (closed, or expired after 3 missed heartbeats).
    async fn set_lock(&self, session: SessionId, ino: Ino, request: &LockRequest) -> Result<()>;
    /// A lock of another owner that keeps `request` (its range and kind) from being taken, as
    /// `F_GETLK` reports it; `None` when it could be taken.
    async fn get_lock(
        &self,
        session: SessionId,
        ino: Ino,
        request: &LockRequest,
    ) -> Result<Option<HeldLock>>;
    /// Drops every lock of lock owner `owner` of `session` on `ino` (`None`: of all the
    /// session's owners). Dropping nothing is no error.
    async fn release_locks(&self, session: SessionId, ino: Ino, owner: Option<u64>) -> Result<()>;

    /// Whether slice id `slice_id` is still leased to `session` (handed to it, not recorded as
    /// pending yet): what lets a mirror region's gateway stage the block of a `WriteSlice`
    /// before the source records it.
    async fn slice_leased(&self, session: SessionId, slice_id: u64) -> Result<bool>;
    /// How many bytes of slice `slice_id` `session` has recorded as pending (staging it, not
    /// committed yet), and on which gateway; `None` when it holds no such pending slice. Blocks
    /// of a slice may be staged only by the session that recorded it, only within the recorded
    /// length, and only on the gateway it named (the one its readers will ask).
    async fn pending_slice(
        &self,
        session: SessionId,
        slice_id: u64,
    ) -> Result<Option<(u32, GatewayId)>>;

    /// A new session of `tenant` (the name of the caller's token, empty without tokens).
    async fn open_session(&self, tenant: &str, description: &str) -> Result<SessionId>;
    /// The session `session`; [`MetaError::SessionGone`] when there is none.
    async fn session(&self, session: SessionId) -> Result<SessionInfo>;
    /// Keeps a session alive and records the client's `view` of the gateways (an empty one
    /// clears it); [`MetaError::SessionGone`] once it was closed, [`MetaError::Invalid`] for a
    /// view naming more than [`shared::meta::MAX_VIEW_GATEWAYS`].
    async fn heartbeat(&self, session: SessionId, view: &MountView) -> Result<()>;
    /// Ends a session: releases its open handles (removing unlinked files nobody holds any more)
    /// and queues the slices it staged but never committed for deletion.
    /// [`MetaError::SessionGone`] for a session that does not exist (closed already, or never
    /// opened): a caller cleaning up treats that as done.
    async fn close_session(&self, session: SessionId) -> Result<()>;
    async fn list_sessions(&self) -> Result<Vec<SessionInfo>>;
    /// Sessions whose last heartbeat is older than `heartbeat_before_ns`: the caller closes them.
    async fn expired_sessions(&self, heartbeat_before_ns: TimeNs) -> Result<Vec<SessionId>>;

    /// Leases the empty directory `dir` to `session`: until the lease is recalled, nobody else
    /// adds a name to it, so the holder may answer a lookup of a name it did not add itself
    /// (absent) without asking. `false` if `dir` is not empty or another live session holds
    /// it. The holder keeps it with [`MetaEngine::keep_dir_leases`] (rules: `rules/dir_leases`).
    async fn take_dir_lease(&self, session: SessionId, dir: Ino) -> Result<bool>;
    /// Gives back the leases on `release` and says, for each of `keep`, whether `session` still
    /// holds it unrecalled; refreshes the session's heartbeat. At most
    /// [`MAX_DIR_LEASES_PER_CALL`] directories in all.
    async fn keep_dir_leases(
        &self,
        session: SessionId,
        keep: &[Ino],
        release: &[Ino],
    ) -> Result<Vec<bool>>;

    /// Records an open handle of `session` on `ino` and returns the current attributes
    /// (close-to-open: the size a reader must honour).
    async fn open(&self, session: SessionId, ino: Ino) -> Result<Attr>;
    /// Drops one handle of `session` per entry of `inos` (an inode listed twice gives back two),
    /// in one transaction; the last release of an unlinked file removes it. All or nothing:
    /// [`MetaError::NotOpen`] names the first inode `session` holds fewer handles on than
    /// listed, and nothing is released.
    async fn release(&self, session: SessionId, inos: &[Ino]) -> Result<()>;

    /// Up to `limit` queued slices due at `now_ns`, oldest due first: those staged by
    /// `gateway` (the one that can drop their staged blocks; each gateway cleans its own, so no
    /// two delete the same thing), or every gateway's with `None`. They stay queued until
    /// acknowledged, so a crash between deleting and acknowledging only repeats the deletion.
    async fn take_due_deleted_slices(
        &self,
        gateway: Option<GatewayId>,
        now_ns: TimeNs,
        limit: usize,
    ) -> Result<Vec<DeletedSlice>>;
    /// Removes slices from the queue once their data is gone; unknown ids are ignored.
    async fn ack_deleted_slices(&self, slice_ids: &[u64]) -> Result<()>;

    /// Registers gateway `id` at `address` with an epoch above every earlier one of this id, and
    /// returns it. `mirror`: it serves a mirror region ([`GatewayRecord::mirror`]), said in the
    /// same transaction so that no mount ever sees it as one to stage on.
    async fn register_gateway(&self, id: GatewayId, address: &str, mirror: bool) -> Result<u64>;
    /// Keeps a registration alive and records its load; [`MetaError::Fenced`] once a later start
    /// of the same id registered a higher epoch.
    async fn gateway_heartbeat(&self, id: GatewayId, epoch: u64, load: GatewayLoad) -> Result<()>;
    /// Every registered gateway, live or not.
    async fn list_gateways(&self) -> Result<Vec<GatewayRecord>>;

    /// Every slice id something still names: a chunk of a file, a pending record of a session,
    /// or the delete queue (whose data is still to be dropped). An object in the store whose
    /// slice is not among them, and that existed before this call began, belongs to nothing.
    async fn referenced_slice_ids(&self) -> Result<std::collections::BTreeSet<u64>>;
}

/// Where the metadata lives: `--meta` of the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaLocation {
    /// An embedded redb file.
    Redb(std::path::PathBuf),
    /// A PostgreSQL database, `postgres://USER[:PASS]@HOST[:PORT]/DB`.
    Postgres(String),
    /// The embedded redb database inside a staging device's metadata region (`device:PATH`).
    /// Only the gateway, which holds the device's lock and reads its superblock, opens it
    /// ([`open_region`]); [`open`] refuses it.
    Device(std::path::PathBuf),
}

impl MetaLocation {
    /// A `postgres://` or `postgresql://` URL names a database, `device:PATH` the metadata region
    /// of a staging device; anything else is a redb path.
    pub fn parse(text: &str) -> MetaLocation {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            MetaLocation::Postgres(text.to_string())
        } else if let Some(device) = text.strip_prefix("device:") {
            MetaLocation::Device(device.into())
        } else {
            MetaLocation::Redb(text.into())
        }
    }
}

impl std::fmt::Display for MetaLocation {
    /// Where, without a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetaLocation::Redb(path) => write!(f, "{}", path.display()),
            MetaLocation::Device(path) => write!(f, "device:{}", path.display()),
            MetaLocation::Postgres(url) => match url.find('@') {
                Some(at) => {
                    let scheme_end = url.find("://").map_or(0, |i| i + 3);
                    let user = &url[scheme_end..at];
                    let user = user.split(':').next().unwrap_or_default();
                    write!(f, "{}{}@{}", &url[..scheme_end], user, &url[at + 1..])
                }
                None => write!(f, "{url}"),
            },
        }
    }
}

/// Most slices of a file's first chunk an open answers with it; a chunk of more is left to
/// [`MetaEngine::read_chunk`]. Compaction keeps chunks far below it.
pub const MAX_OPEN_CHUNK_SLICES: usize = 1024;

/// What an open that asks for the file's first chunk answers besides `attr` (the open's answer):
/// chunk 0, read after the open as the reader's `read_chunk` would be, so at least as new as
/// `attr`, which is all close-to-open asks. None for anything but a regular file, or for a
/// chunk of more than [`MAX_OPEN_CHUNK_SLICES`].
pub async fn first_chunk(engine: &dyn MetaEngine, attr: &Attr) -> Result<Option<Vec<Slice>>> {
    if attr.kind != FileKind::File {
        return Ok(None);
    }
    let slices = engine.read_chunk(attr.ino, 0).await?;
    Ok(Some(slices).filter(|slices| slices.len() <= MAX_OPEN_CHUNK_SLICES))
}

/// Opens (creating, formatting or migrating as needed) the metadata at `location`.
pub async fn open(location: &MetaLocation, config: MetaConfig) -> Result<KvMeta> {
    let store = open_store_with(location, config.redb_cache_bytes).await?;
    KvMeta::open(store, config).await
}

/// The key-value store at `location`, without the file-system rules (dump and load).
pub async fn open_store(location: &MetaLocation) -> Result<std::sync::Arc<dyn kv::KvStore>> {
    open_store_with(location, None).await
}

/// [`open_store`], with a redb page cache of `redb_cache_bytes`.
async fn open_store_with(
    location: &MetaLocation,
    redb_cache_bytes: Option<usize>,
) -> Result<std::sync::Arc<dyn kv::KvStore>> {
    Ok(match location {
        MetaLocation::Redb(path) => {
            let path = path.clone();
            let store = tokio::task::spawn_blocking(move || {
                redb_kv::RedbKv::open_with_cache(path, redb_cache_bytes)
            })
            .await
            .map_err(|e| KvError::Failed(format!("opening the redb file failed: {e}")))??;
            std::sync::Arc::new(store)
        }
        MetaLocation::Postgres(url) => {
            std::sync::Arc::new(postgres_kv::PostgresKv::connect(url).await?)
        }
        MetaLocation::Device(path) => {
            return Err(KvError::Failed(format!(
                "the metadata inside {} is opened through the device by stagefs-gateway (it holds \
                 the device's lock and knows where the region is)",
                path.display()
            ))
            .into())
        }
    })
}

/// Opens (creating on first use) the metadata in the region of a staging device.
pub async fn open_region(
    backend: redb_region::RegionBackend,
    config: MetaConfig,
) -> Result<KvMeta> {
    let store = open_region_store(backend, config.redb_cache_bytes).await?;
    KvMeta::open(store, config).await
}

/// The key-value store in the region of a staging device, without the file-system rules (dump
/// and load).
pub async fn open_region_store(
    backend: redb_region::RegionBackend,
    redb_cache_bytes: Option<usize>,
) -> Result<std::sync::Arc<dyn kv::KvStore>> {
    let store = tokio::task::spawn_blocking(move || {
        let label = backend.describe();
        redb_kv::RedbKv::open_backend(backend, &label, redb_cache_bytes)
    })
    .await
    .map_err(|e| KvError::Failed(format!("opening the metadata region failed: {e}")))??;
    Ok(std::sync::Arc::new(store))
}

/// Checks the name of a new directory entry.
pub fn check_name(name: &[u8]) -> Result<()> {
    let invalid = |reason| {
        Err(MetaError::InvalidName {
            name: String::from_utf8_lossy(name).into_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("empty");
    }
    if name == b"." || name == b".." {
        return invalid("reserved");
    }
    if name.len() > MAX_NAME_LEN {
        return Err(MetaError::NameTooLong {
            len: name.len(),
            max: MAX_NAME_LEN,
        });
    }
    if name.contains(&b'/') {
        return invalid("contains '/'");
    }
    if name.contains(&0) {
        return invalid("contains NUL");
    }
    Ok(())
}
